"""CelebA's own annotation files, as the release ships them:

- `list_attr_celeba.txt`: the number of images on the first line, the 40 attribute names on
  the second, then one image a line: its name and 40 values, 1 or -1, separated by spaces.
- `list_eval_partition.txt`: one image a line, its name and its split (0 train, 1 val, 2 test).
- CelebAMask-HQ's `CelebA-HQ-to-CelebA-mapping.txt`: a header `idx orig_idx orig_file`, then
  one CelebA-HQ image a line: its index (the name of `CelebA-HQ-img/<idx>.jpg`), its CelebA
  index and CelebA file name, by which the partition gives its split.
"""

import os

import numpy as np

from ..data.landmarks import norm_key

SPLITS = {"train": 0, "val": 1, "test": 2}


def _lines(path: str, what: str) -> list[list[str]]:
    """The file's non-empty lines, split on white space."""
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "no such file", path)
    try:
        with open(path, encoding="utf-8") as f:
            return [ln.split() for ln in f if ln.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"{what} '{path}' is not UTF-8 text") from None


def read_attributes(path: str, what: str) -> tuple[list[str], dict[str, np.ndarray | None]]:
    """list_attr_celeba.txt -> (the attribute names, {image name: 0/1 float32 [A], None for a
    line that is not A values of 1 / -1})."""
    lines = _lines(path, what)
    if len(lines) < 2 or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise ValueError(f"{what} '{path}': not CelebA's list_attr_celeba.txt (first line: the image count, "
                         "second: the attribute names)")
    names, table = lines[1], {}
    for cols in lines[2:]:
        key = norm_key(cols[0])
        if key in table:
            raise ValueError(f"{what} '{path}': '{cols[0]}' has more than one line")
        ok = len(cols) == len(names) + 1 and all(v in ("1", "-1") for v in cols[1:])
        table[key] = np.array([v == "1" for v in cols[1:]], dtype=np.float32) if ok else None
    if int(lines[0][0]) != len(table):
        raise ValueError(f"{what} '{path}': its first line counts {lines[0][0]} images, it lists {len(table)}: "
                         "a truncated copy?")
    return names, table


def read_partition(path: str, what: str) -> dict[str, int]:
    """list_eval_partition.txt -> {image name: 0 train, 1 val, 2 test}."""
    parts = {}
    for n, cols in enumerate(_lines(path, what), 1):
        if len(cols) != 2 or cols[1] not in ("0", "1", "2"):
            raise ValueError(f"{what} '{path}' line {n}: expected `image split` with split 0, 1 or 2")
        parts[norm_key(cols[0])] = int(cols[1])
    return parts


def read_hq_mapping(path: str, what: str) -> dict[int, str]:
    """CelebA-HQ-to-CelebA-mapping.txt -> {CelebA-HQ index: CelebA file name}."""
    lines = _lines(path, what)
    if not lines or lines[0][:1] != ["idx"]:
        raise ValueError(f"{what} '{path}': not CelebAMask-HQ's mapping (header `idx orig_idx orig_file`)")
    mapping = {}
    for n, cols in enumerate(lines[1:], 2):
        if len(cols) != 3 or not cols[0].isdigit():
            raise ValueError(f"{what} '{path}' line {n}: expected `idx orig_idx orig_file`")
        mapping[int(cols[0])] = norm_key(cols[2])
    return mapping


def split_keys(keys, partition: dict[str, int], split: str, what: str, path: str) -> list:
    """The `keys` (CelebA names, in order) that `partition` puts in `split`; a key it does not
    list is an error (another release's file)."""
    missing = next((k for k in keys if k not in partition), None)
    if missing is not None:
        raise ValueError(f"{what} '{path}' does not list '{missing}': give CelebA's list_eval_partition.txt")
    return [k for k in keys if partition[k] == SPLITS[split]]


def attribute_split(attributes: str, partition: str, split: str, what: str,
                    limit: int | None = None) -> tuple[list[str], dict]:
    """(names, {image: targets}) of the images of `split` ("train", "test"), the first `limit`
    of them in the attribute file's order when given."""
    names, table = read_attributes(attributes, f"{what}-labels")
    keys = split_keys(list(table), read_partition(partition, "--partition"), split, "--partition", partition)
    return names, {k: table[k] for k in keys[:limit]}


def attribute_protocol(max_train: int | None) -> dict:
    """The result's protocol and conventions for CelebA's attributes."""
    return {"protocol": "celeba", "source": "CelebA (Liu et al., ICCV 2015): list_attr_celeba.txt, "
                                            "list_eval_partition.txt, img_align_celeba",
            "conventions": {
                "split": "list_eval_partition.txt: 0 train (--train), 2 test (--test); 1 (val) unused",
                "max_train": max_train, "train_subset": "all" if max_train is None else
                f"the first {max_train} train images in list_attr_celeba.txt's order",
                "crop": "the centred square of the aligned image (178 x 178 of img_align_celeba's 178 x 218), "
                        "resized to the model's input",
                "prediction": "the ridge's output above 0.5; accuracy per attribute, mean over the 40"}}


__all__ = ["SPLITS", "attribute_split", "attribute_protocol", "read_attributes", "read_partition", "read_hq_mapping",
           "split_keys"]
