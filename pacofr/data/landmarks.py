"""Landmark files and landmark values.

CSV: `relative/path.jpg,x1,y1,...,x5,y5` (10 numbers) or 136 numbers for 68 points; a first
line whose numbers do not parse is a header and is skipped. JSON:
`{"relative/path.jpg": [[x, y], ...]}` (5 or 68 points; a flat list of 10/136 numbers or
`{"landmarks": [...]}` is accepted too). Paths are relative to the source folder (or to the
folder of the file list). 68 points (iBUG order) become 5 with `five_points`.

An entry that cannot be used (wrong count, a value that is not a number, null) is kept as
all-NaN: the sample then reports "landmarks_invalid", exactly like NaN, infinite or
out-of-image values, and the masker uses its template. A file that does not parse (JSON
syntax, a stray CSV quote, bytes that are not UTF-8) fails, naming the file and the line.
"""

import csv
import json
import posixpath
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

NAN5 = np.full((5, 2), np.nan, dtype=np.float32)


def five_points(landmarks: Tensor) -> Tensor:
    """[B, 5, 2] or 68-point [B, 68, 2] (iBUG order) -> [B, 5, 2]."""
    if landmarks.shape[1] == 5:
        return landmarks
    if landmarks.shape[1] == 68:
        lm = landmarks
        return torch.stack(
            [lm[:, 36:42].mean(1), lm[:, 42:48].mean(1), lm[:, 30], lm[:, 48], lm[:, 54]], dim=1
        )
    raise ValueError(f"landmarks must be [B, 5, 2] or [B, 68, 2], got {tuple(landmarks.shape)}")


def norm_key(path: str) -> str:
    return posixpath.normpath(str(path).replace("\\", "/"))


def parse_points(value, keep_all: bool = False) -> np.ndarray | None:
    """A JSON/CSV value -> [5, 2] float32 (all NaN when it cannot be used). With keep_all:
    every point as given, [K, 2] for any K (None when it cannot be used)."""
    unusable = None if keep_all else NAN5.copy()
    if isinstance(value, dict):
        value = value.get("landmarks")
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return unusable
    if keep_all:  # [K, 2] or a flat list of 2K numbers; not [K, 3] (x, y, visibility)
        if not a.size or not (a.ndim == 1 and a.size % 2 == 0 or a.ndim == 2 and a.shape[1] == 2):
            return unusable
    elif a.ndim == 0 or a.size not in (10, 136):
        return unusable
    a = a.reshape(-1, 2)
    if len(a) == 68 and not keep_all:
        a = five_points(torch.from_numpy(a)[None])[0].numpy()
    return a.astype(np.float32)


def _parse_csv(path: Path, keep_all: bool, what: str) -> dict[str, np.ndarray]:
    out = {}
    with open(path, newline="") as f:
        reader = csv.reader(f, strict=True)  # (strict: a stray quote fails, naming its line)
        try:
            _parse_rows(reader, out, path, keep_all)
        except csv.Error as err:
            raise ValueError(f"{what} '{path}' line {reader.line_num}: {err}: fix that line "
                             "(quotes come in pairs: a path holding a comma is quoted whole)") from None
    return out


def _parse_rows(rows, out: dict, path: Path, keep_all: bool) -> None:
    first = True
    for row in rows:
        row = [c.strip() for c in row]
        if not row or not any(row) or row[0].startswith("#"):
            continue
        key, values = row[0], [c for c in row[1:] if c != ""]
        try:
            nums = [float(v) for v in values]
        except ValueError:
            if first:  # a header line
                first = False
                continue
            nums = None
        first = False
        _add(out, norm_key(key), parse_points(nums, keep_all), path)


def _add(table: dict, key: str, points, path: Path) -> None:
    """One image's points; an image given twice (a join gone wrong, most likely) stops the run."""
    if key in table:
        raise ValueError(f"landmarks file {path}: '{key}' has more than one entry")
    table[key] = points


def _parse_json(path: Path, keep_all: bool, what: str) -> dict[str, np.ndarray]:
    def unique(pairs):  # (json's dict would keep a repeated path's last entry alone)
        table = {}
        for k, v in pairs:
            _add(table, k, v, path)
        return table

    with open(path) as f:
        try:
            data = json.load(f, object_pairs_hook=unique)
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} '{path}' is not valid JSON (line {err.lineno}, column {err.colno}: "
                             f"{err.msg}): fix the file at that line") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} '{path}' must hold a JSON object {{path: points}}")
    out = {}
    for k, v in data.items():
        _add(out, norm_key(k), parse_points(v, keep_all), path)
    return out


def load_landmarks_file(path: str, keep_all: bool = False, what: str = "data.landmarks") -> dict[str, np.ndarray]:
    """path -> {relative image path: [5, 2] points}; keep_all: [K, 2] as given (None where
    unusable), for evaluation against every annotated point. Errors name the file as `what`."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} '{path}' is a folder: give the .csv or .json landmarks file")
    if not p.is_file():
        raise FileNotFoundError(f"{what} '{path}': no such file")
    parse = {".csv": _parse_csv, ".json": _parse_json}.get(p.suffix.lower())
    if parse is None:
        raise ValueError(f"{what} '{path}' must be a .csv or .json file")
    try:
        return parse(p, keep_all, what)
    except UnicodeDecodeError:
        raise ValueError(f"{what} '{path}' is not UTF-8 text: give a CSV or JSON text file") from None


def check_landmarks(points: np.ndarray, width: int, height: int) -> bool:
    """Given landmarks are usable: finite and inside [0, W) x [0, H) (as the masker)."""
    x, y = points[:, 0], points[:, 1]
    with np.errstate(invalid="ignore"):
        return bool(np.isfinite(points).all() and (x >= 0).all() and (x < width).all()
                    and (y >= 0).all() and (y < height).all())


__all__ = ["NAN5", "norm_key", "parse_points", "load_landmarks_file", "check_landmarks"]
