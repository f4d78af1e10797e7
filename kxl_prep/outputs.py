"""The files of one prepared dataset directory, each written atomically.

meta.json          sd-scripts fine-tuning metadata {"<id>.<ext>": {"caption", "image_size"}}
buckets.json       side file {"<id>.<ext>": [bucket_w, bucket_h]} (sd-scripts' own choice,
                   precomputed; sd-scripts does not read it)
selection.parquet  one row per image: id, image_key, file_ext, width, height, bucket_w,
                   bucket_h, md5, rating, caption (what the export step reads)
rejects.csv        malformed source records: source, record, field, reason
train_records.arrow  the same records, columnar and memory-mappable, with sd-scripts'
                   buckets and orders (kxl_prep.columnar; read by kxl_train.dataset)
dataset.toml       sd-scripts dataset config (fine-tuning subset)
manifest.json      written last; lists every other output with its sha256
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kxl_common.atomic import atomic_open, write_json, write_text
from kxl_common.digest import sha256_file
from kxl_common.jsontext import LARGE, json_ints, json_join, json_strings
from kxl_common.train_records import TRAIN_RECORDS
from kxl_prep.buckets import BucketGrid
from kxl_prep.columnar import TrainRecordsWriter
from kxl_prep.recipe import DataRecipe
from kxl_prep.schema import REJECTS_SCHEMA, empty_rejects

META_JSON = "meta.json"
BUCKETS_JSON = "buckets.json"
SELECTION_PARQUET = "selection.parquet"
REJECTS_CSV = "rejects.csv"
DATASET_TOML = "dataset.toml"
MANIFEST_JSON = "manifest.json"

SELECTION_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("image_key", pa.string()),
        ("file_ext", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bucket_w", pa.int32()),
        ("bucket_h", pa.int32()),
        ("md5", pa.string()),
        ("rating", pa.string()),
        ("caption", pa.large_string()),
    ]
)


class MetaJsonWriter:
    """meta.json streamed chunk by chunk, in the one byte form kxl writes (prep and export):
    `{`, one `"<key>": {"caption": ..., "image_size": [w, h]}` line per image, `}`. It keeps
    the file's sha256 as it goes (train_records.arrow names the meta.json it belongs to) and
    hands each chunk to `records` (a TrainRecordsWriter), which finish() closes with that digest.
    A temp file until the context exits without an error (atomic_open)."""

    def __init__(self, path: Path, records: TrainRecordsWriter | None = None):
        self.path = Path(path)
        self.records = records
        self.rows = 0
        self._sha256 = hashlib.sha256()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "MetaJsonWriter":
        self._fh = self._stack.enter_context(atomic_open(self.path, "w", encoding="utf-8", newline="\n"))
        self._put("{\n")
        return self

    def _put(self, text: str) -> None:
        self._fh.write(text)
        self._sha256.update(text.encode("utf-8"))

    def write(self, keys: Any, captions: Any, widths: Any, heights: Any) -> None:
        """One chunk: keys and captions (pyarrow string arrays or lists of str), sizes."""
        if not len(keys):
            return
        keys = keys.cast(LARGE) if isinstance(keys, pa.Array) else pa.array(keys, LARGE)
        captions = captions if isinstance(captions, pa.Array) else pa.array(captions, LARGE)
        self._put(
            (",\n" if self.rows else "")
            + json_join(['"', keys, '": {"caption": ', json_strings(captions), ', "image_size": [',
                         json_ints(widths), ", ", json_ints(heights), "]}"])
        )
        if self.records is not None:
            self.records.add(keys, captions, widths, heights)
        self.rows += len(keys)

    def finish(self) -> str:
        """The closing brace; closes `records`. Returns meta.json's sha256 (hex)."""
        self._put("\n}\n" if self.rows else "}\n")
        digest = self._sha256.hexdigest()
        if self.records is not None:
            self.records.close(meta_sha256=digest)
        return digest

    def __exit__(self, exc_type, exc, tb) -> bool:
        return self._stack.__exit__(exc_type, exc, tb)  # renamed into place, or removed


class DatasetWriter:
    """meta.json, buckets.json and selection.parquet (and train_records.arrow, given the bucket
    grid) written together, chunk by chunk, so a run never holds every caption in memory. Each
    file is a temp file until close(); an exception removes them all (the previous files stay
    as they were)."""

    def __init__(self, out_dir: Path, n_rows: int, grid: BucketGrid | None = None):
        self.n = n_rows
        self.done = 0
        self._stack = contextlib.ExitStack()
        try:
            records = None
            if grid is not None:
                records = TrainRecordsWriter(out_dir / TRAIN_RECORDS, grid)
                self._stack.callback(records.abort)  # closed after the other files, or removed
            self._meta = self._stack.enter_context(MetaJsonWriter(out_dir / META_JSON, records))
            self._buckets = self._stack.enter_context(
                atomic_open(out_dir / BUCKETS_JSON, "w", encoding="utf-8", newline="\n")
            )
            parquet_fh = self._stack.enter_context(atomic_open(out_dir / SELECTION_PARQUET, "wb"))
            self._parquet = pq.ParquetWriter(parquet_fh, SELECTION_SCHEMA, compression="zstd")
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        self._buckets.write("{\n")

    def __enter__(self) -> "DatasetWriter":
        return self

    def write(self, columns: dict[str, Any]) -> None:
        """One chunk of rows: the SELECTION_SCHEMA columns (caption a pyarrow string array)."""
        n = len(columns["image_key"])
        self.done += n
        tail = ",\n" if self.done < self.n else "\n"
        if n:
            keys = columns["image_key"]
            keys = keys.cast(LARGE) if isinstance(keys, pa.Array) else pa.array(keys, LARGE)
            self._meta.write(keys, columns["caption"], columns["width"], columns["height"])
            self._buckets.write(
                json_join(['"', keys, '": [', json_ints(columns["bucket_w"]), ", ", json_ints(columns["bucket_h"]), "]"])
                + tail
            )
        table = pa.table({name: columns[name] for name in SELECTION_SCHEMA.names}, schema=SELECTION_SCHEMA)
        self._parquet.write_table(table, row_group_size=n or 1)

    def __exit__(self, exc_type, exc, tb) -> bool:
        short = exc_type is None and self.done != self.n
        if short:
            exc_type, exc, tb = RuntimeError, RuntimeError(f"wrote {self.done} of {self.n} rows"), None
        if exc_type is None:
            self._buckets.write("}\n")
            self._parquet.close()
            try:
                self._meta.finish()  # and train_records.arrow, with meta.json's sha256
            except BaseException:
                self._stack.__exit__(*sys.exc_info())  # no output of a failed run is kept
                raise
        else:
            try:
                self._parquet.close()
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        suppressed = self._stack.__exit__(exc_type, exc, tb)  # temp files renamed, or removed
        if short:
            raise exc
        return suppressed


def write_rejects(path: Path, rejects: pd.DataFrame | None) -> int:
    if rejects is None:
        rejects = empty_rejects()
    missing = [c for c in REJECTS_SCHEMA.names if c not in rejects.columns]
    if missing:
        raise ValueError(f"rejects table lacks column(s) {missing}")
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        rejects[list(REJECTS_SCHEMA.names)].to_csv(fh, index=False, lineterminator="\n")
    return len(rejects)


def dataset_config(recipe: DataRecipe, metadata_file: Path, image_dir: Path) -> dict[str, Any]:
    """The sd-scripts dataset config: one dataset, one fine-tuning subset."""
    b, d, c = recipe.buckets, recipe.dataset, recipe.captions
    resolution = b.resolution[0] if b.resolution[0] == b.resolution[1] else list(b.resolution)
    return {
        "general": {
            "shuffle_caption": d.shuffle_caption,
            "keep_tokens_separator": c.keep_tokens_separator,
            "caption_tag_dropout_rate": d.caption_tag_dropout_rate,
        },
        "datasets": [
            {
                "resolution": resolution,
                "enable_bucket": True,
                "bucket_no_upscale": False,
                "min_bucket_reso": b.min_reso,
                "max_bucket_reso": b.max_reso,
                "bucket_reso_steps": b.step,
                "subsets": [{"metadata_file": str(metadata_file), "image_dir": str(image_dir)}],
            }
        ],
    }


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def render_dataset_toml(config: dict[str, Any]) -> str:
    """Plain tables and [[arrays of tables]] only: read the same by tomllib and by the
    `toml` package sd-scripts uses."""
    lines = [
        "# sd-scripts dataset config written by kxl-prep (pass it as --dataset_config).",
        "# Captions are `prefix ||| general tags ||| suffix`: only the general tags are",
        "# shuffled and tag-dropped.",
        "",
        "[general]",
    ]
    lines += [f"{k} = {_toml_value(v)}" for k, v in config["general"].items()]
    for dataset in config["datasets"]:
        lines += ["", "[[datasets]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in dataset.items() if k != "subsets"]
        for subset in dataset["subsets"]:
            lines += ["", "  [[datasets.subsets]]"]
            lines += [f"  {k} = {_toml_value(v)}" for k, v in subset.items()]
    return "\n".join(lines) + "\n"


def write_dataset_toml(path: Path, config: dict[str, Any]) -> None:
    write_text(path, render_dataset_toml(config))


def describe_outputs(out_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in names:
        path = out_dir / name
        out[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def refresh_output_entry(out_dir: Path, name: str, note: str, *, sha256: str | None = None) -> bool:
    """After a later step rewrote output `name` (export rewrites meta.json to the files it
    wrote), put its new size and sha256 into manifest.json so the manifest stays true.
    `sha256`: the caller's digest of the file, when it has one (saves reading it again).
    Returns False (and writes nothing) where there is no manifest: an incomplete prep."""
    manifest_path = out_dir / MANIFEST_JSON
    if not manifest_path.exists():
        return False
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    path = out_dir / name
    entry = {"bytes": path.stat().st_size, "sha256": sha256 or sha256_file(path), "rewritten_by": note}
    manifest.setdefault("outputs", {})[name] = entry
    write_json(manifest_path, manifest)
    return True


def rewrite_from_meta(prep_dir: str | os.PathLike) -> dict:
    """(Re)write train_records.arrow from meta.json and the manifest's bucket grid, and record it in
    the manifest. Reads meta.json whole (json.load), as sd-scripts does."""
    prep_dir = Path(prep_dir)
    manifest = json.loads((prep_dir / MANIFEST_JSON).read_text(encoding="utf-8"))
    b = manifest["buckets"]
    grid = BucketGrid(tuple(b["resolution"]), b["min_reso"], b["max_reso"], b["step"])
    with open(prep_dir / META_JSON, encoding="utf-8") as fh:
        meta = json.load(fh)
    with TrainRecordsWriter(prep_dir / TRAIN_RECORDS, grid) as writer:
        for key, entry in meta.items():
            if "image_size" not in entry:
                raise ValueError(f"{prep_dir / META_JSON}: record {key!r}: field 'image_size' is missing")
        writer.add(list(meta), [e.get("caption") or "" for e in meta.values()],
                   [e["image_size"][0] for e in meta.values()], [e["image_size"][1] for e in meta.values()])
        header = writer.close(meta_sha256=sha256_file(prep_dir / META_JSON))
    refresh_output_entry(prep_dir, TRAIN_RECORDS, "kxl-prep train-records")
    return header
