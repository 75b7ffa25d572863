"""`pacofr data prepare SRC OUT`: images to WebDataset .tar shards that the training loader reads
as they are (`data.source=OUT`), each image checked as the loader checks it.

    pacofr data prepare /data/faces shards/faces --landmarks /data/faces.csv
    pacofr data prepare /data/faces_emore shards/emore --shard-size 20000 --workers 8
    pacofr data prepare /data/wild shards/aligned --landmarks /data/wild.csv --align 112

SRC: an image folder, a .txt list of paths, or an insightface RecordIO pair (a `.rec` file with
its `.idx` beside it, or a folder holding `train.rec` and `train.idx`; recordio.py).

Each image is read, identified and decoded as the loader does (decode.py): what the loader
skips is left out, with its reason. A JPEG or PNG in RGB or gray that DALI too reads as it is
(items.dali_reads_as_is) is stored as read; any other image is stored as a PNG of the RGB
pixels the loader's repair gives (so every decoder reads it without a repair). Landmarks
(--landmarks, keyed as data.landmarks is: paths relative to the folder or list; a RecordIO
record's index) go into the sample's .json member; insightface's identity (the label, its first
value when there are several) into .cls. With --align SIZE, each image is stored as the SIZE x
SIZE crop warped to the ArcFace template (align.py), a PNG, its landmarks moved into it; an image
without usable landmarks is skipped (landmarks_missing, landmarks_invalid). Samples are keyed
000000000, 000000001, ... in SRC's order.

Shards are written under a temporary name (.shard-000003.tar.tmp) and renamed when complete: an
interrupted prepare leaves complete shards beside temporary files that no shard pattern
matches. The report comes last: prepare.json (the counts) and prepare.csv (one row per
source file: status kept | repaired | skipped, its reasons, how it was stored, its shard and key).
"""

import csv
import io
import itertools
import json
import multiprocessing
import os
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .align import align as align_face
from .datasets import source_landmarks
from .decode import decode_rgb, open_image, read_bytes
from .items import MAX_PIXELS, dali_reads_as_is, png_bytes
from .landmarks import check_landmarks
from .recordio import BAD_RECORD, InsightFaceRecords, RecordIOError, identity, index_of
from .sources import image_files

SHARD = "shard-{:06d}.tar"
REPORT, FILES = "prepare.json", "prepare.csv"
STORED_AS_READ = {"JPEG": "jpg", "PNG": "png"}


@dataclass
class Entry:
    """One source image: `name` in the report, `key` in the landmarks file, its bytes or the
    reason they could not be read, and its identity label (RecordIO)."""

    name: str
    key: str
    raw: bytes | None
    reason: str | None = None
    detail: str = ""
    label: int | None = None


@dataclass
class Checked:
    """What the loader makes of an image: skipped (`skip`), or the bytes to store, their
    extension, the repairs (the loader's reasons) and whether they are the bytes as read."""

    skip: str | None = None
    data: bytes = b""
    ext: str = ""
    reasons: tuple[str, ...] = ()
    as_read: bool = False
    points: np.ndarray | None = None  # the landmarks in the stored image, when they moved (alignment)


def check(raw: bytes | None, points: np.ndarray | None, min_size: int, max_pixels: int = MAX_PIXELS,
          align: int = 0) -> Checked:
    """Checks one image as the loader does (decode.py) and gives the bytes to store. An image
    over the pixel budget is skipped (`too_large`), never decoded: the loader would decode a
    JPEG at reduced scale, but the shards keep each image at the scale of its landmarks.
    `align` (a size): the aligned crop, as PNG, or skipped without usable landmarks."""
    im, reason = open_image(raw, min_size)
    if im is None:
        return Checked(skip=reason)
    if im.size[0] * im.size[1] > max_pixels:
        return Checked(skip="too_large")
    as_read, fmt, (width, height) = dali_reads_as_is(im, raw), im.format, im.size
    usable = points is not None and check_landmarks(points, width, height)
    if align and not usable:
        return Checked(skip="landmarks_missing" if points is None else "landmarks_invalid")
    rgb, repair = decode_rgb(im)
    if rgb is None:
        return Checked(skip=repair)
    reasons = (repair,) if repair else ()
    if points is not None and not usable:
        reasons += ("landmarks_invalid",)
    if align:
        face, moved = align_face(rgb, points, align)
        return Checked(data=png_bytes(face), ext="png", reasons=reasons, points=moved)
    if as_read:
        return Checked(data=raw, ext=STORED_AS_READ[fmt], reasons=reasons, as_read=True)
    return Checked(data=png_bytes(rgb), ext="png", reasons=reasons)


def _check_job(job: tuple[Entry, np.ndarray | None, int, int, int]) -> tuple[Entry, Checked]:
    entry, points, min_size, max_pixels, align = job
    checked = Checked(skip=entry.reason) if entry.reason else check(entry.raw, points, min_size, max_pixels, align)
    entry.raw = None  # (not sent back from a worker)
    return entry, checked


class _Files:
    """An image folder or a .txt list."""

    def __init__(self, src: str):
        self.kind = "list" if os.path.isfile(src) else "folder"
        self.paths, self.keys = image_files(src, "SRC")

    def entries(self):
        for path, key in zip(self.paths, self.keys):
            raw, reason = read_bytes(path)
            yield Entry(path, key, raw, reason)

    def close(self) -> None:
        pass


class _RecordIO:
    """An insightface RecordIO pair; its records are keyed by index."""

    kind = "recordio"

    def __init__(self, rec: Path, idx: Path):
        self.records = InsightFaceRecords(rec, idx)
        self.keys = [str(i) for i in self.records.images]

    def entries(self):
        for i in self.records.images:
            name = f"{self.records.rec}#{i}"
            try:
                header, image = self.records.read(i)
                label = identity(header, f"'{self.records.rec}' record {i}")
            except RecordIOError as e:
                yield Entry(name, str(i), None, BAD_RECORD, str(e))
                continue
            yield Entry(name, str(i), image, label=label)

    def close(self) -> None:
        self.records.close()


def open_source(src: str | Path):
    """SRC -> its entries' reader (an image folder, a .txt list, a RecordIO pair)."""
    p = Path(src)
    if not p.exists():
        raise FileNotFoundError(f"SRC '{src}': no such file or directory")
    rec = p / "train.rec" if p.is_dir() else p
    if rec.suffix == ".rec" and rec.is_file():
        return _RecordIO(rec, index_of(rec, "SRC"))
    if p.is_file() and p.suffix.lower() != ".txt":
        raise ValueError(f"SRC '{src}' is not an image folder, a .txt list or a .rec file")
    return _Files(str(src))


class ShardWriter:
    """Samples into OUT/shard-000000.tar, ...: `size` samples a shard, each written under a
    temporary name and renamed when complete. As a context manager: an error or an interrupt
    removes the shard being written."""

    def __init__(self, folder: Path, size: int):
        self.folder, self.size = folder, size
        self.shards: list[str] = []
        self.samples, self.tar, self.tmp = 0, None, None
        self.mtime = int(time.time())

    def add(self, members: dict[str, bytes]) -> tuple[str, str]:
        """Writes one sample ({extension: bytes}); returns (its shard's name, its key)."""
        if self.tar is None:
            self.tmp = self.folder / f".{SHARD.format(len(self.shards))}.tmp"
            self.tar = tarfile.open(self.tmp, "w")
        key = f"{self.samples:09d}"
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), self.mtime, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.samples += 1
        name = SHARD.format(len(self.shards))
        if self.samples % self.size == 0:
            self._finish()
        return name, key

    def _finish(self) -> None:
        self.tar.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        name = SHARD.format(len(self.shards))
        os.replace(self.tmp, self.folder / name)
        self.shards.append(name)
        self.tar = self.tmp = None

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None and self.tar is not None:
            self._finish()
        elif self.tar is not None:
            self.tar.close()
            self.tmp.unlink(missing_ok=True)


def _claim(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT '{out}' is a file: give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"OUT '{out}' is not empty: give a new or empty folder (shards of two prepares "
                          "would be read as one data set)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_options(shard_size: int, min_size: int, workers: int, max_pixels: int, align: int,
                   landmarks: str | None) -> None:
    for option, value, lowest in (("--shard-size", shard_size, 1), ("--min-size", min_size, 1),
                                  ("--workers", workers, 0), ("--max-pixels", max_pixels, 1), ("--align", align, 0)):
        if value < lowest:
            raise ConfigError(f"{option} must be at least {lowest}, got {value}")
    if align and not landmarks:
        raise ConfigError("--align warps each face by its landmarks: give --landmarks FILE")


def _json_points(points: np.ndarray) -> bytes:
    """[K, 2] -> JSON (a value that is not finite as null: strict JSON the loader reads as NaN)."""
    return json.dumps([[float(v) if np.isfinite(v) else None for v in p] for p in points]).encode()


class _Mapper:
    """map() in this process, or over `workers` processes, in order. The jobs go to the workers
    a few hundred at a time: Pool.imap would read all of SRC into memory ahead of them."""

    def __init__(self, workers: int):
        self.pool = multiprocessing.Pool(workers) if workers else None
        self.chunk = 256 * workers

    def __call__(self, fn, jobs):
        return self._in_chunks(fn, iter(jobs)) if self.pool else map(fn, jobs)

    def _in_chunks(self, fn, jobs):
        while chunk := list(itertools.islice(jobs, self.chunk)):
            yield from self.pool.map(fn, chunk, chunksize=16)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool:
            self.pool.terminate()
            self.pool.join()


def _store(entry: Entry, checked: Checked, table: dict | None, writer: ShardWriter, counts: Counter) -> list:
    """Writes one checked entry (unless skipped) and counts it; returns its row of prepare.csv."""
    if checked.skip:
        counts.update(["skipped", f"skip:{checked.skip}"])
        return [entry.name, "skipped", checked.skip, "", "", "", entry.detail]
    members, reasons = {checked.ext: checked.data}, checked.reasons
    if checked.points is not None:
        members["json"] = _json_points(checked.points)
    elif table is not None and entry.key in table:
        members["json"] = _json_points(table[entry.key])
    elif table is not None:
        reasons += ("landmarks_missing",)  # (the loader counts it so for a shard sample without .json)
    if entry.label is not None:
        members["cls"] = str(entry.label).encode()
    shard, key = writer.add(members)
    status = "repaired" if reasons else "kept"
    counts.update([status, *(f"repair:{r}" for r in reasons)] + ([] if checked.as_read else ["stored_as_png"]))
    return [entry.name, status, ";".join(reasons), "as read" if checked.as_read else "png", shard, key, entry.detail]


def _write_all(source, table: dict | None, out: Path, shard_size: int, min_size: int, workers: int,
               max_pixels: int, align: int):
    """Checks and writes every entry of `source`, a row for each in OUT/prepare.csv (written
    under a temporary name, renamed when complete); returns (counts, shard names)."""
    from tqdm import tqdm

    counts, tmp = Counter(), out / f".{FILES}.tmp"
    jobs = ((e, None if table is None else table.get(e.key), min_size, max_pixels, align) for e in source.entries())
    try:
        with open(tmp, "w", newline="") as f, ShardWriter(out, shard_size) as writer, _Mapper(workers) as map_:
            rows = csv.writer(f)
            rows.writerow(["source", "status", "reasons", "stored", "shard", "key", "detail"])
            done = map_(_check_job, jobs)
            for entry, checked in tqdm(done, total=len(source.keys), unit="img", disable=not sys.stderr.isatty()):
                rows.writerow(_store(entry, checked, table, writer, counts))
        os.replace(tmp, out / FILES)
    finally:
        tmp.unlink(missing_ok=True)
    return counts, writer.shards


def _pattern(out: Path, shards: list[str]) -> str:
    if len(shards) < 2:
        return str(out / shards[0]) if shards else ""
    return str(out / SHARD.replace("{:06d}", f"{{{0:06d}..{len(shards) - 1:06d}}}"))


def prepare(src: str | Path, out: str | Path, shard_size: int = 10000, landmarks: str | None = None,
            min_size: int = 32, workers: int = 0, max_pixels: int = MAX_PIXELS, align: int = 0) -> dict:
    """Writes SRC's usable images to shards in OUT and the report; returns the report (as in
    prepare.json). `align`: the size of the aligned crops to store (0: the images as they are).
    No usable image at all raises (after the report is written)."""
    _check_options(shard_size, min_size, workers, max_pixels, align, landmarks)
    source = open_source(src)
    try:
        table = source_landmarks(landmarks, source.keys, str(src), "--landmarks", "SRC") if landmarks else None
        out = _claim(out)
        counts, shards = _write_all(source, table, out, shard_size, min_size, workers, max_pixels, align)
    finally:
        source.close()
    report = {
        "source": str(src), "kind": source.kind, "out": str(out), "shards": shards, "pattern": _pattern(out, shards),
        "images": len(source.keys), "samples": counts["kept"] + counts["repaired"], "kept": counts["kept"],
        "repaired": counts["repaired"], "repairs": _by_prefix(counts, "repair:"),
        "stored_as_png": counts["stored_as_png"], "skipped": counts["skipped"], "skips": _by_prefix(counts, "skip:"),
        "landmarks": landmarks, "align": align or None, "files": str(out / FILES),
    }
    tmp = out / f".{REPORT}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / REPORT)
    if not report["samples"]:
        raise ValueError(f"SRC '{src}': no usable image (every one was skipped: {json.dumps(report['skips'])}); "
                         f"per file: {out / FILES}")
    return report


def _by_prefix(counts: Counter, prefix: str) -> dict[str, int]:
    return {k[len(prefix):]: v for k, v in sorted(counts.items()) if k.startswith(prefix)}


def summary_lines(report: dict) -> list[str]:
    """The printed summary of a report."""
    listed = lambda d: ", ".join(f"{k}={v}" for k, v in d.items())  # noqa: E731
    n = len(report["shards"])
    return [
        f"prepared {report['samples']} of {report['images']} images into {n} shard{'s' * (n != 1)}: "
        f"data.source={report['out']} (or {report['pattern']})",
        f"  kept {report['kept']}, repaired {report['repaired']}"
        + (f" ({listed(report['repairs'])})" if report["repairs"] else "")
        + f"; {report['stored_as_png']} stored as RGB PNG",
        f"  skipped {report['skipped']}" + (f" ({listed(report['skips'])})" if report["skips"] else ""),
        f"  report: {Path(report['out']) / REPORT}, per file: {report['files']}",
    ]


__all__ = ["prepare", "check", "open_source", "ShardWriter", "summary_lines", "SHARD", "REPORT", "FILES"]
