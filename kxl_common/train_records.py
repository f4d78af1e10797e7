"""train_records.arrow: the per-image training records of one kxl-prep output, columnar.

One Arrow IPC file beside meta.json, written by kxl_prep.columnar with meta.json and read
memory-mapped by kxl_train.dataset, so every training process and DataLoader worker shares
one page-cache copy and builds no Python object per image. One record batch, N rows, in
meta.json's order:

  key, caption                 string / large_string: meta.json's key and caption
  width, height                int32: meta.json's image_size
  bucket                       int32: index into the header's bucket resolutions (sorted (w, h),
                               only the used ones: sd-scripts' BucketManager after sort())
  data_order                   rows in sd-scripts' image_data order (keys by length, longest
                               first, stable: FineTuningDataset registers them so)
  bucket_data_order            data_order grouped by bucket: each bucket's list as make_buckets
                               fills it
  bucket_key_order             rows grouped by bucket, each bucket sorted by key (the canonical
                               layout of kxl's exact resume)
  key_order                    rows sorted by key (lookups by key: binary search)

The schema metadata `kxl_train_records` holds the header (JSON): format, rows, the bucket grid
the buckets were computed for, the bucket resolutions and counts, the mean aspect-ratio error
(sd-scripts' bucket_info), the sha256 of the meta.json they were written with, and the
captions fingerprint of kxl's exact resume for a one-dataset group.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from kxl_common.jsontext import json_join, json_strings

TRAIN_RECORDS = "train_records.arrow"
HEADER_KEY = b"kxl_train_records"
FORMAT = 1
ORDER_COLUMNS = ("data_order", "bucket_data_order", "bucket_key_order", "key_order")
SCHEMA = pa.schema(
    [("key", pa.string()), ("caption", pa.large_string()), ("width", pa.int32()), ("height", pa.int32()),
     ("bucket", pa.int32())] + [(name, pa.int32()) for name in ORDER_COLUMNS]
)
FINGERPRINT_CHUNK = 1 << 16


class StaleRecords(RuntimeError):
    """train_records.arrow does not belong to the meta.json beside it."""


def records_path(metadata_file: str | os.PathLike) -> Path:
    return Path(metadata_file).with_name(TRAIN_RECORDS)


class _Keys:
    """Sorted key view for bisect: item i is the UTF-8 of the i-th smallest key."""

    def __init__(self, records: "TrainRecords"):
        self.records = records

    def __len__(self) -> int:
        return self.records.rows

    def __getitem__(self, i: int) -> bytes:
        return self.records.key_bytes(int(self.records.key_order[i]))


class TrainRecords:
    """Read-only, memory-mapped view of a train_records.arrow file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._source = pa.memory_map(str(self.path), "r")
        reader = pa.ipc.open_file(self._source)
        if reader.schema.remove_metadata() != SCHEMA:
            raise ValueError(f"{self.path}: not a kxl train records file (schema {reader.schema})")
        meta = reader.schema.metadata or {}
        if HEADER_KEY not in meta:
            raise ValueError(f"{self.path}: no {HEADER_KEY.decode()} header")
        self.header = json.loads(meta[HEADER_KEY])
        if self.header.get("format") != FORMAT:
            raise ValueError(f"{self.path}: format {self.header.get('format')}, this kxl reads {FORMAT}")
        if reader.num_record_batches != 1:
            raise ValueError(f"{self.path}: {reader.num_record_batches} record batches, expected 1")
        batch = reader.get_batch(0)
        self.rows = batch.num_rows
        if self.rows != self.header["rows"]:
            raise ValueError(f"{self.path}: {self.rows} rows, header says {self.header['rows']}")
        self._batch = batch  # keeps the mapped buffers alive
        self._key_offsets, self._key_data = self._string_buffers(batch.column(0), np.int32)
        self._cap_offsets, self._cap_data = self._string_buffers(batch.column(1), np.int64)
        ints = {name: batch.column(i).to_numpy(zero_copy_only=True) for i, name in enumerate(SCHEMA.names) if i >= 2}
        self.width, self.height, self.bucket = ints["width"], ints["height"], ints["bucket"]
        self.data_order, self.bucket_data_order = ints["data_order"], ints["bucket_data_order"]
        self.bucket_key_order, self.key_order = ints["bucket_key_order"], ints["key_order"]
        self.resos = [(int(w), int(h)) for w, h, _ in self.header["buckets"]]
        self.counts = [int(c) for _, _, c in self.header["buckets"]]
        self.bucket_starts = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])

    @staticmethod
    def _string_buffers(array: pa.Array, offset_type) -> tuple[np.ndarray, memoryview]:
        if array.null_count:
            raise ValueError("train records: null strings")
        _, offsets, data = array.buffers()
        offsets = np.frombuffer(offsets, dtype=offset_type)[array.offset : array.offset + len(array) + 1]
        return offsets, memoryview(data) if data is not None else memoryview(b"")

    # -- one row (nothing here outlives the call but the returned values)
    def key_bytes(self, row: int) -> bytes:
        return bytes(self._key_data[self._key_offsets[row] : self._key_offsets[row + 1]])

    def key(self, row: int) -> str:
        return self.key_bytes(row).decode("utf-8")

    def caption(self, row: int) -> str:
        return bytes(self._cap_data[self._cap_offsets[row] : self._cap_offsets[row + 1]]).decode("utf-8")

    def size(self, row: int) -> tuple[int, int]:
        return int(self.width[row]), int(self.height[row])

    def find(self, key: str) -> int:
        """The row of `key`, or -1."""
        wanted = key.encode("utf-8")
        keys = _Keys(self)
        i = bisect.bisect_left(keys, wanted)
        if i < self.rows and keys[i] == wanted:
            return int(self.key_order[i])
        return -1

    def bucket_rows(self, order: np.ndarray, bucket: int) -> np.ndarray:
        """One bucket's slice of a bucket-grouped order column (a view of the mapping)."""
        return order[self.bucket_starts[bucket] : self.bucket_starts[bucket + 1]]

    # -- fingerprints (text chunks of the JSON kxl_train.resume.state hashes)
    def column(self, name: str) -> pa.Array:
        return self._batch.column(SCHEMA.names.index(name))

    def bucket_keys_json(self, bucket: int) -> Iterator[str]:
        return keys_json(self.column("key"), self.bucket_rows(self.bucket_key_order, bucket))

    def captions_json(self) -> Iterator[str]:
        return pairs_json(self.column("key"), self.column("caption"), self.key_order)

    def check_fresh(self, metadata_file: str | os.PathLike) -> None:
        """Refuse records written for another meta.json: the manifest beside it must list
        meta.json with the size it has now and the sha256 the records were written with."""
        meta = Path(metadata_file)
        manifest_path = meta.with_name("manifest.json")
        how = (f"rewrite them (kxl-prep prepare, or `kxl-prep train-records {meta.parent}`) "
               f"or pass --kxl-no-columnar-data to use sd-scripts' own dataset")
        if not manifest_path.is_file():
            raise StaleRecords(f"{self.path}: no {manifest_path.name} beside {meta.name} to check them against; {how}")
        entry = json.loads(manifest_path.read_text(encoding="utf-8")).get("outputs", {}).get(meta.name)
        if not entry:
            raise StaleRecords(f"{self.path}: {manifest_path} does not list {meta.name}; {how}")
        if entry.get("sha256") != self.header.get("meta_sha256"):
            raise StaleRecords(
                f"{self.path} was written for {meta.name} sha256 {self.header.get('meta_sha256')}, the manifest "
                f"lists sha256 {entry.get('sha256')} (rewritten by {entry.get('rewritten_by', 'another run')}); {how}"
            )
        if meta.stat().st_size != entry.get("bytes"):
            raise StaleRecords(f"{meta} has {meta.stat().st_size} bytes, the manifest says {entry.get('bytes')}: "
                               f"it was changed after kxl-prep wrote it; {how}")


def _chunks(rows: np.ndarray) -> Iterator[pa.Array]:
    for start in range(0, len(rows), FINGERPRINT_CHUNK):
        yield pa.array(rows[start : start + FINGERPRINT_CHUNK])


def keys_json(keys: pa.Array, rows: np.ndarray) -> Iterator[str]:
    """`["k1", "k2", ...]` for keys[rows], as json.dumps(..., ensure_ascii=False) writes the list."""
    yield "["
    for i, idx in enumerate(_chunks(rows)):
        text = json_join([json_strings(keys.take(idx))], ", ")
        yield text if i == 0 else ", " + text
    yield "]"


def pairs_json(keys: pa.Array, captions: pa.Array, rows: np.ndarray) -> Iterator[str]:
    """`[["k1", "caption 1"], ...]` for rows, as json.dumps writes a list of (key, caption)."""
    yield "["
    for i, idx in enumerate(_chunks(rows)):
        text = json_join(["[", json_strings(keys.take(idx)), ", ", json_strings(captions.take(idx)), "]"], ", ")
        yield text if i == 0 else ", " + text
    yield "]"


def sha256_of_chunks(chunks: Iterator[str]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk.encode("utf-8"))
    return digest.hexdigest()
