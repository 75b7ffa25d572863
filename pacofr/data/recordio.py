"""MXNet RecordIO files as insightface packs its face datasets (`train.rec` + `train.idx`),
read without MXNet.

Framing (dmlc-core's recordio): each record is a uint32 magic 0xced7230a, a uint32 `lrecord`
(upper 3 bits: continuation flag, lower 29: the length), the payload, zero padding to 4 bytes;
all little-endian. A payload holding the magic at a 4-byte aligned offset is cut there into
parts (flag 1 first, 2 middle, 3 last; 0 a record in one part) with the magic itself left out:
reading puts it back between the parts. The `.idx` file has a text line `index<TAB>offset` per
record.

Payload (mxnet.recordio.pack): struct 'IfQQ' (flag, label, id, id2), then, when flag > 0, the
label as `flag` float32 values (the header's label field is then unused), then the encoded
image. insightface's record 0 is a header, not an image: flag > 0 and label (a, b), the image
records being 1 .. a-1 and the identity records a .. b-1 (each labelled with its range of image
records). Without it (record 0 of flag 0) every record is an image. A record's identity is its
label (the first value of a label of several). A `property` file beside the pair reads
`classes,height,width`.
"""

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEAD = struct.Struct("<II")  # magic, lrecord
_IR = struct.Struct("<IfQQ")  # flag, label, id, id2 (the layout of native 'IfQQ' on little-endian machines)
_LENGTH_BITS = 29
BAD_RECORD = "bad_record"  # the skip reason of a record that cannot be read


class RecordIOError(ValueError):
    """A record that cannot be read (its message names the record and its offset)."""


@dataclass
class IRHeader:
    """flag: the number of float labels (0: one, in `label`); label: a float or a tuple of floats."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


def read_index(path: str | Path) -> dict[int, int]:
    """The .idx file -> {record index: byte offset}, in file order. A line that is not
    `index<TAB>offset` raises, naming the file and the line."""
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                index, offset = (int(v) for v in parts)
            except ValueError:
                raise RecordIOError(f"'{path}' line {n}: {line.strip()[:40]!r} is not 'index<TAB>offset'") from None
            out[index] = offset
    return out


def _read_part(f, where: str) -> tuple[int, bytes]:
    """(continuation flag, payload) of the part at f's position."""
    head = f.read(_HEAD.size)
    if len(head) < _HEAD.size:
        raise RecordIOError(f"{where}: the file ends inside a record header")
    magic, lrecord = _HEAD.unpack(head)
    if magic != MAGIC:
        raise RecordIOError(f"{where}: no RecordIO magic (found 0x{magic:08x})")
    length = lrecord & ((1 << _LENGTH_BITS) - 1)
    data = f.read((length + 3) & ~3)
    if len(data) < length:
        raise RecordIOError(f"{where}: the file ends inside a record ({length} bytes announced, {len(data)} there)")
    return lrecord >> _LENGTH_BITS, data[:length]


def read_record(f, offset: int, where: str = "record") -> bytes:
    """The payload of the record at `offset` of the open binary file `f`, its parts joined."""
    f.seek(offset)
    flag, data = _read_part(f, f"{where} at offset {offset}")
    if flag not in (0, 1):
        raise RecordIOError(f"{where} at offset {offset}: a continuation part (flag {flag}), not a record's start")
    parts = [data]
    while flag in (1, 2):
        flag, data = _read_part(f, f"{where} at offset {offset} (part {len(parts) + 1})")
        if flag not in (2, 3):
            raise RecordIOError(f"{where} at offset {offset}: part {len(parts) + 1} has flag {flag}, not 2 or 3")
        parts.append(data)
    return _MAGIC_BYTES.join(parts)


def identity(header: IRHeader, where: str) -> int:
    """The identity a record's label gives (its first value when there are several); a label
    that is not a whole number >= 0 raises, naming `where`."""
    label = header.label[0] if isinstance(header.label, tuple) else header.label
    if not (math.isfinite(label) and label >= 0 and label == int(label)):
        raise RecordIOError(f"{where}: its label {label} is not an identity (a whole number >= 0)")
    return int(label)


def read_property(rec: str | Path) -> int | None:
    """The class count of the `property` file beside `rec` (`classes,height,width`), None when
    there is none; one that does not parse raises, naming it."""
    path = Path(rec).with_name("property")
    if not path.is_file():
        return None
    text = path.read_text().strip()
    try:
        classes = int(text.split(",")[0])
    except ValueError:
        raise RecordIOError(f"'{path}': {text[:40]!r} is not 'classes,height,width'") from None
    if classes < 1:
        raise RecordIOError(f"'{path}': {classes} classes")
    return classes


def index_of(rec: str | Path, what: str) -> Path:
    """The .idx beside `rec`; a missing one raises, naming `what`."""
    idx = Path(rec).with_suffix(".idx")
    if not idx.is_file():
        raise FileNotFoundError(f"{what} '{rec}': its index '{idx}' does not exist (a RecordIO pair is .rec + .idx)")
    return idx


def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
    """An insightface payload -> (its header, the encoded image)."""
    if len(payload) < _IR.size:
        raise RecordIOError(f"a payload of {len(payload)} bytes, shorter than its {_IR.size}-byte header")
    flag, label, id_, id2 = _IR.unpack_from(payload)
    rest = payload[_IR.size:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise RecordIOError(f"the header announces {flag} float labels, the payload holds {len(rest) // 4}")
        label = struct.unpack_from(f"<{flag}f", rest)
        rest = rest[4 * flag:]
    return IRHeader(flag, label, id_, id2), rest


def _record_end(f, offset: int, size: int, where: str) -> tuple[int, IRHeader]:
    """(the offset where the record at `offset` ends, its header), reading only the framing
    and the header of a record in one part (the common case), the whole of one in several.
    The header and its labels must lie in the record's first part (DALI's reader reads them
    there: a record is cut into parts where a label's bytes are the magic)."""
    f.seek(offset)
    head = f.read(_HEAD.size + _IR.size + 4)
    if len(head) < _HEAD.size:
        raise RecordIOError(f"{where} at offset {offset}: the file ends inside a record header")
    magic, lrecord = _HEAD.unpack_from(head)
    if magic != MAGIC:
        raise RecordIOError(f"{where} at offset {offset}: no RecordIO magic (found 0x{magic:08x})")
    length, parts = lrecord & ((1 << _LENGTH_BITS) - 1), lrecord >> _LENGTH_BITS
    if parts not in (0, 1):
        raise RecordIOError(f"{where} at offset {offset}: a continuation part (flag {parts}), not a record's start")
    payload = head[_HEAD.size:_HEAD.size + min(length, _IR.size + 4)]
    if len(payload) < _IR.size:
        raise RecordIOError(f"{where} at offset {offset}: a first part of {length} bytes, shorter than its header")
    flag, label, id_, id2 = _IR.unpack_from(payload)
    if length < _IR.size + 4 * flag:
        raise RecordIOError(f"{where} at offset {offset}: the header announces {flag} float labels, the "
                            f"record's first part holds {(length - _IR.size) // 4}")
    if flag > 0:  # (the first label is the identity: the others are not read)
        label = struct.unpack_from("<f", payload, _IR.size)
    if parts == 0:
        end = offset + _HEAD.size + ((length + 3) & ~3)
        if end > size:
            raise RecordIOError(f"{where} at offset {offset}: the file ends inside the record")
    else:
        read_record(f, offset, where)
        end = f.tell()
    return end, IRHeader(flag, label, id_, id2)


def check_records(records: "InsightFaceRecords") -> tuple[list[int], list[tuple[int, str]]]:
    """(the image records that can be read, (record, why) of the others), from the framing and
    headers alone: each record is whole within the file, starts with the magic, holds the labels
    its header announces and a label that is an identity, and ends before the next listed one
    begins. This is what a reader that trusts the .idx (DALI's) needs to be safe."""
    size, good, bad, ends = os.fstat(records.file.fileno()).st_size, [], [], {}
    for index in records.images:
        where = f"'{records.rec}' record {index}"
        try:
            if index not in records.offsets:
                raise RecordIOError(f"{where}: not in '{records.idx}'")
            ends[index], header = _record_end(records.file, records.offsets[index], size, where)
            identity(header, where)
            good.append(index)
        except RecordIOError as e:
            bad.append((index, str(e) if str(e).startswith(where) else f"{where}: {e}"))
    # records running into each other (a length that lies, an .idx offset inside a record):
    # which one is wrong cannot be told, and DALI would read the first over the second
    by_offset = sorted(good, key=records.offsets.get)
    overlapping = {i for a, b in zip(by_offset, by_offset[1:]) if ends[a] > records.offsets[b] for i in (a, b)}
    bad += [(i, f"'{records.rec}' record {i} at offset {records.offsets[i]}: it overlaps the record listed next to it")
            for i in sorted(overlapping)]
    return [i for i in good if i not in overlapping], sorted(bad)


class InsightFaceRecords:
    """An insightface RecordIO pair: `images` (the image records' indices, in order), `read`
    (a record's header and image). Use as a context manager, or call close().

    The .rec file is opened when first read, and again in a process forked after that (a
    DataLoader worker): processes sharing one handle would move each other's file position.
    Pickled (a worker started by spawn), it leaves its handle behind."""

    def __init__(self, rec: str | Path, idx: str | Path):
        self.rec, self.idx = Path(rec), Path(idx)
        self.offsets = read_index(self.idx)
        if not self.offsets:
            raise RecordIOError(f"'{self.idx}' lists no records")
        self._file, self._pid = None, None
        self.file  # (a .rec that cannot be opened fails here, not in a worker)
        self.identity_records = range(0)
        self.images = list(self.offsets)
        try:
            header, _ = self.read(min(self.offsets))  # (unreadable: the pair cannot be interpreted)
        except RecordIOError:
            self.close()
            raise
        if min(self.offsets) == 0 and header.flag > 0 and isinstance(header.label, tuple) and len(header.label) >= 2:
            a, b = int(header.label[0]), int(header.label[1])
            self.images, self.identity_records = list(range(1, a)), range(a, b)

    def read(self, index: int) -> tuple[IRHeader, bytes]:
        """(header, encoded image) of record `index`; raises RecordIOError naming it."""
        where = f"'{self.rec}' record {index}"
        if index not in self.offsets:
            raise RecordIOError(f"{where}: not in '{self.idx}'")
        try:
            return unpack(read_record(self.file, self.offsets[index], where))
        except RecordIOError as e:
            raise RecordIOError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None

    @property
    def file(self):
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.rec, "rb"), os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self):
        return dict(self.__dict__, _file=None, _pid=None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["MAGIC", "BAD_RECORD", "RecordIOError", "IRHeader", "read_index", "read_record", "unpack", "identity",
           "read_property", "index_of", "check_records", "InsightFaceRecords"]
