"""InsightFace RecordIO (``train.rec`` + ``train.idx``) read without mxnet.

Layout of the ``.rec`` file: a sequence of records, each ``uint32 magic (0xced7230a)``,
``uint32 lrecord`` (top 3 bits: continuation flag, low 29 bits: length), the payload, and padding
to 4 bytes. A payload starts with an image header ``<I f Q Q`` (flag, label, id, id2); when
``flag > 0`` it is followed by ``flag`` float32 labels. The ``.idx`` file maps keys to offsets,
one ``key<TAB>offset`` line each.

InsightFace's releases (MS1MV2/MS1MV3, CASIA-WebFace, Glint360K) start with a header record
(key 0) whose labels ``(a, b)`` say that images have keys ``1 .. a-1`` and that keys ``a .. b-1``
are identity records whose labels ``(start, end)`` give each identity's range of image keys.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from .datasets import FaceDataset, RawSample
from .errors import DataError
from .images import read_image

MAGIC = 0xCED7230A
_HEADER = struct.Struct("<IfQQ")


class RecordFile:
    """Random access to the records of a ``.rec`` file through its ``.idx``; safe to use from
    DataLoader workers (each process opens its own handle)."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise DataError(f"{path}: file not found")
        self.offsets: dict[int, int] = {}
        size = self.rec_path.stat().st_size
        with self.idx_path.open() as handle:
            for line_number, line in enumerate(handle, start=1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    key, offset = int(parts[0]), int(parts[1])
                except (ValueError, IndexError) as error:
                    raise DataError(f"{self.idx_path}:{line_number}: expected 'key<TAB>offset', got {line!r}") from error
                if not 0 <= offset < size:
                    raise DataError(f"{self.idx_path}:{line_number}: offset {offset} lies outside {self.rec_path} ({size} bytes)")
                self.offsets[key] = offset
        if not self.offsets:
            raise DataError(f"{self.idx_path}: empty index")
        self._handle = None
        self._pid = -1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"], state["_pid"] = None, -1
        return state

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (multi-part records joined)."""
        if self._pid != os.getpid():
            self._handle, self._pid = self.rec_path.open("rb"), os.getpid()
        if key not in self.offsets:
            raise DataError(f"{self.rec_path}: no record with key {key} in {self.idx_path.name}")
        handle = self._handle
        handle.seek(self.offsets[key])
        parts = []
        while True:
            head = handle.read(8)
            if len(head) < 8:
                raise DataError(f"{self.rec_path}: record {key} is truncated")
            magic, lrecord = struct.unpack("<II", head)
            if magic != MAGIC:
                raise DataError(f"{self.rec_path}: record {key} has a bad magic number (file corrupt or index wrong)")
            flag, length = lrecord >> 29, lrecord & ((1 << 29) - 1)
            parts.append(handle.read(length))
            handle.read((4 - length % 4) % 4)
            if flag in (0, 3):  # a whole record, or the last part of a split one
                break
        return struct.pack("<I", MAGIC).join(parts)


def unpack_record(payload: bytes) -> tuple[np.ndarray, bytes]:
    """Split a payload into (labels float32 [n >= 1], image bytes)."""
    flag, label, _, _ = _HEADER.unpack_from(payload)
    if flag > 0:
        labels = np.frombuffer(payload, np.float32, count=flag, offset=_HEADER.size)
        return labels, payload[_HEADER.size + 4 * flag :]
    return np.array([label], np.float32), payload[_HEADER.size :]


class RecordIODataset(FaceDataset):
    """Face images with identity labels from an InsightFace ``.rec``/``.idx`` pair.

    Class count and per-image labels come from the identity records where the file has them,
    otherwise from a pass over the image headers; labels are renumbered 0..N-1 in sorted order
    and ``identities`` holds the original label values as strings.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.records = RecordFile(rec_path, idx_path)
        first_key = min(self.records.offsets)
        labels0, image0 = unpack_record(self.records.read(first_key))
        raw_labels: list[int]
        if first_key == 0 and labels0.size >= 2 and labels0[0] > 0 and not image0:  # InsightFace's header record
            image_end, identity_end = int(labels0[0]), int(labels0[1])
            self.keys = [k for k in range(1, image_end) if k in self.records.offsets]
            identity_keys = [k for k in range(image_end, identity_end) if k in self.records.offsets]
            if identity_keys:
                label_of: dict[int, int] = {}
                for identity, key in enumerate(identity_keys):
                    start, end = (int(v) for v in unpack_record(self.records.read(key))[0][:2])
                    label_of.update((k, identity) for k in range(start, end))
                raw_labels = [label_of.get(k, -1) for k in self.keys]
            else:
                raw_labels = [int(unpack_record(self.records.read(k))[0][0]) for k in self.keys]
        else:
            self.keys = sorted(self.records.offsets)
            raw_labels = [int(unpack_record(self.records.read(k))[0][0]) for k in self.keys]
        if not self.keys:
            raise DataError(f"{self.records.rec_path}: no image records")
        known = sorted({label for label in raw_labels if label >= 0})
        index = {label: i for i, label in enumerate(known)}
        self.identities = [str(label) for label in known]
        self.targets = [index[label] if label >= 0 else -1 for label in raw_labels]
        self.occluded_flags = [False] * len(self.keys)

    def read(self, index: int) -> RawSample:
        key = self.keys[index]
        _, image_bytes = unpack_record(self.records.read(key))
        try:
            image = read_image(image_bytes)
        except DataError as error:
            raise DataError(f"{self.records.rec_path}: record {key}: {error}") from error
        return RawSample(image, None, self.targets[index])
