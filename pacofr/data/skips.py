"""The files a run skipped, by name: `SkipLog` collects them from the batches as they reach the
main process (each Batch lists its skipped samples, batch.py), `write_csv` writes them as
skipped.csv (columns path, reason; one row per file and reason, however often it was read).

A run that reads no usable sample is an error, not a success (`SkipLog.nothing_usable`)."""

import csv
import os
from collections import Counter
from pathlib import Path

HEADER = ("path", "reason")


class NoUsableSample(ValueError):
    pass


def read_csv(path: Path) -> set[tuple[str, ...]]:
    """The rows of a skipped.csv (empty when there is none)."""
    if not path.is_file():
        return set()
    with open(path, newline="") as f:
        return {tuple(row) for row in list(csv.reader(f))[1:] if row}


def write_csv(path: Path, rows, header: tuple[str, ...] = HEADER) -> None:
    """Sorted rows under `header`, written to a temporary file renamed into place (a reader
    never sees half a list)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        out.writerows(sorted(rows))
    os.replace(tmp, path)


class SkipLog:
    """This process's skipped files (`rows`: (name, reason)), their count by reason each time
    one was read (`counts`), and the usable samples seen (`usable`). `path`: the skipped.csv
    it writes (None on ranks other than the main one); `keep`: start from the rows it holds
    (a resumed run)."""

    def __init__(self, path: Path | None = None, keep: bool = False):
        self.path = path
        self.rows = read_csv(path) if path is not None and keep else set()
        self.counts, self.usable = Counter(), 0

    def record(self, batch) -> None:
        self.rows.update(batch.skipped)
        self.counts.update(reason for _, reason in batch.skipped)
        self.usable += int(batch.images.shape[0])

    def write(self, rows=None) -> None:
        if self.path is not None:
            write_csv(self.path, self.rows if rows is None else rows)

    def nothing_usable(self, source: str) -> NoUsableSample:
        """The error for a run that has read samples and could use none of them (the list
        written first, so the message can point to it)."""
        self.write()
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"
        where = f"; the files: {self.path}" if self.path is not None else ""
        return NoUsableSample(f"data.source '{source}': no usable sample: every one read was skipped "
                              f"({counts}){where}")


__all__ = ["SkipLog", "NoUsableSample", "read_csv", "write_csv", "HEADER"]
