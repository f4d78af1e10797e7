"""Write train_records.arrow (format: kxl_common.train_records) beside meta.json.

Rows come in meta.json's order, chunk by chunk (keys, captions, sizes); captions are spooled
to a temp file and memory-mapped back, so the writer never holds every caption in memory.
close() computes the buckets (kxl_prep.buckets, sd-scripts' choice), sd-scripts' image_data
order, the sorted layouts and the captions fingerprint, and writes the file atomically.

    kxl-prep train-records DATA_DIR     # (re)write it for an existing kxl-prep output
"""
from __future__ import annotations

import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kxl_common.atomic import atomic_open
from kxl_common.train_records import (FORMAT, HEADER_KEY, SCHEMA, TRAIN_RECORDS, TrainRecords, pairs_json,
                                      sha256_of_chunks)
from kxl_prep.buckets import BucketAssigner, BucketGrid


def grid_header(grid: BucketGrid) -> dict:
    return {"resolution": list(grid.resolution), "min_reso": grid.min_reso, "max_reso": grid.max_reso,
            "step": grid.step, "no_upscale": False}


def grid_from_header(header: dict) -> BucketGrid:
    g = header["grid"]
    return BucketGrid(tuple(g["resolution"]), g["min_reso"], g["max_reso"], g["step"])


class TrainRecordsWriter:
    def __init__(self, path: str | os.PathLike, grid: BucketGrid):
        self.path = Path(path)
        self.grid = grid
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._keys: list[pa.Array] = []
        self._widths: list[np.ndarray] = []
        self._heights: list[np.ndarray] = []
        self._cap_offsets: list[np.ndarray] = [np.zeros(1, np.int64)]
        self._cap_total = 0
        fd, self._spool_path = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".captions", dir=self.path.parent)
        self._spool = os.fdopen(fd, "wb")
        self.rows = 0

    def __enter__(self) -> "TrainRecordsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()  # the spool never outlives the writer (close() has removed it already)

    def add(self, keys: Any, captions: Any, widths: Any, heights: Any) -> None:
        keys = keys.cast(pa.string()) if isinstance(keys, pa.Array) else pa.array(keys, pa.string())
        captions = captions.cast(pa.large_string()) if isinstance(captions, pa.Array) else pa.array(captions, pa.large_string())
        n = len(keys)
        if not (len(captions) == len(widths) == len(heights) == n):
            raise ValueError(f"train records: chunk columns of {n}, {len(captions)}, {len(widths)}, {len(heights)} rows")
        for name, column in (("key", keys), ("caption", captions)):
            if column.null_count:
                row = self.rows + pc.index(pc.is_null(column), True).as_py()
                raise ValueError(f"train records: row {row}: field {name!r} is null")
        # the chunk's caption bytes, appended to the spool; offsets continue the running total
        _, offsets, data = captions.buffers()
        offsets = np.frombuffer(offsets, np.int64)[captions.offset : captions.offset + n + 1] if n else np.zeros(1, np.int64)
        lo, hi = int(offsets[0]), int(offsets[-1])
        if hi > lo:
            self._spool.write(memoryview(data)[lo:hi])
        self._cap_offsets.append(offsets[1:] - lo + self._cap_total)
        self._cap_total += hi - lo
        self._keys.append(keys)
        self._widths.append(np.asarray(widths, dtype=np.int32))
        self._heights.append(np.asarray(heights, dtype=np.int32))
        self.rows += n

    def abort(self) -> None:
        if not self._spool.closed:
            self._spool.close()
        try:
            os.unlink(self._spool_path)
        except FileNotFoundError:
            pass

    def close(self, meta_sha256: str) -> dict:
        """Write the file; returns its header."""
        try:
            self._spool.close()
            return self._write(meta_sha256)
        finally:
            self.abort()

    def _write(self, meta_sha256: str) -> dict:
        n = self.rows
        keys = pa.concat_arrays(self._keys) if self._keys else pa.array([], pa.string())
        width = np.concatenate(self._widths) if self._widths else np.zeros(0, np.int32)
        height = np.concatenate(self._heights) if self._heights else np.zeros(0, np.int32)
        offsets = np.concatenate(self._cap_offsets)
        source = pa.memory_map(self._spool_path, "r") if self._cap_total else None
        data = source.read_buffer() if source is not None else pa.py_buffer(b"")
        captions = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), data)

        bad = np.flatnonzero((width <= 0) | (height <= 0))
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"train records: row {i} ({keys[i].as_py()!r}): field 'image_size' is "
                             f"{[int(width[i]), int(height[i])]}, sizes must be positive")
        bucket_w, bucket_h = BucketAssigner(self.grid).assign(width, height)
        packed = bucket_w.astype(np.int64) << 32 | bucket_h.astype(np.int64)
        resos, bucket, counts = np.unique(packed, return_inverse=True, return_counts=True)
        bucket = bucket.astype(np.int32).reshape(-1)

        key_order = pc.sort_indices(keys).to_numpy().astype(np.int64)  # UTF-8 bytes: code point order
        if n > 1:
            ordered = keys.take(pa.array(key_order))
            same = pc.equal(ordered.slice(1), ordered.slice(0, n - 1)).to_numpy(zero_copy_only=False)
            if same.any():
                i = int(np.flatnonzero(same)[0])
                raise ValueError(f"train records: key {ordered[i].as_py()!r} occurs more than once "
                                 f"(rows {int(key_order[i])} and {int(key_order[i + 1])})")
        # FineTuningDataset registers keys sorted by len (code points), longest first, stable
        lengths = pc.utf8_length(keys).to_numpy(zero_copy_only=False).astype(np.int64)
        data_order = np.argsort(-lengths, kind="stable")
        bucket_data_order = data_order[np.argsort(bucket[data_order], kind="stable")]
        bucket_key_order = key_order[np.argsort(bucket[key_order], kind="stable")]
        # sd-scripts' bucket_info["mean_img_ar_error"]: mean |bucket ratio - image ratio| in image_data order
        errors = np.abs(bucket_w[data_order] / bucket_h[data_order] - width[data_order] / height[data_order])
        mean_ar_error = float(np.mean(errors)) if n else 0.0

        header = {
            "format": FORMAT,
            "rows": n,
            "meta_sha256": meta_sha256,
            "grid": grid_header(self.grid),
            "buckets": [[int(r >> 32), int(r & 0xFFFFFFFF), int(c)] for r, c in zip(resos, counts)],
            "mean_ar_error": mean_ar_error,
            # kxl_train.resume.state's captions_sha256 of a group holding this one dataset
            "captions_sha256": sha256_of_chunks(itertools.chain("[", pairs_json(keys, captions, key_order), "]")),
        }
        schema = SCHEMA.with_metadata({HEADER_KEY: json.dumps(header)})
        columns = [keys, captions, pa.array(width), pa.array(height), pa.array(bucket)] + [
            pa.array(order.astype(np.int32)) for order in (data_order, bucket_data_order, bucket_key_order, key_order)
        ]
        batch = pa.record_batch(columns, schema=schema)
        with atomic_open(self.path, "wb") as fh:
            with pa.ipc.new_file(fh, schema) as writer:
                writer.write_batch(batch)
        del batch, captions, data, source
        return header


def writer_following(prep_dir: str | os.PathLike) -> TrainRecordsWriter | None:
    """A writer for the records of a rewritten meta.json, with the grid of the records that
    exist there now (None where kxl-prep wrote none)."""
    path = Path(prep_dir) / TRAIN_RECORDS
    if not path.is_file():
        return None
    return TrainRecordsWriter(path, grid_from_header(TrainRecords(path).header))
