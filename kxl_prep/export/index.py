"""Shard index: post id -> (tar, byte offset, size), built once per tar and reused.

nyanko7/danbooru2023 ships its images as plain (uncompressed) tars:
  original/data-0000..0999.tar          tar id % 1000
  recent/data-1000..1999.tar
  updates/20240319/dataset-0..9.tar     tar id % 10 (so is updates/20240522/)
members named `<id>.<ext>` at the tar root (sometimes `./<id>.<ext>`); a tar made from the
directory tree holds `<id % 1000>/<id>.<ext>`, and the pre-resized danbooru2023-webp-4Mpixel
shards hold `<id>.webp`. Rather than trusting shard names (HakuBooru's exporter derives
shard numbers from `data-NNNN.tar` names and silently finds nothing when they differ), every
`*.tar` under the given roots is read once, header by header, and each member whose file name
is `<digits>.<image extension>` is recorded with the offset of its data, whatever folder
prefix it has. Only images: a `<id>.json` or `<id>.txt` beside `<id>.jpg` (webdataset-style
side files) is skipped, never taken for the post's image. The per-tar index is a parquet
file in a cache directory, tagged with the tar's size and mtime: a changed tar is
re-indexed, an unchanged one never again.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kxl_common.atomic import atomic_open
from kxl_common.lock import file_lock

INDEX_VERSION = "2"  # 2: image members only
MEMBER_RE = re.compile(r"^(?:.*/)?(\d+)\.([A-Za-z0-9]+)$")
# extensions of the images danbooru2023 tars hold (Danbooru's still formats and gif, the
# webp of the re-encoded sets); anything else beside them is not a post's image
IMAGE_EXTS = frozenset({"jpg", "jpeg", "jpe", "png", "webp", "gif", "bmp", "avif"})
SHARD_NO_RE = re.compile(r"^data-(\d+)\.tar$")

INDEX_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("ext", pa.string()),  # lower case, as in the member name
        ("member", pa.string()),
        ("offset", pa.int64()),  # byte offset of the member's data in the tar
        ("size", pa.int64()),
    ]
)

# Within one root, which copy of a post wins when several tars hold it: the newest.
KIND_RANK = {"updates": 0, "recent": 1, "original": 2, "other": 3}


@dataclass(frozen=True)
class Shard:
    path: str  # absolute path of the tar
    root: str  # the root it was found under
    rel: str  # path relative to its root, '/'-separated
    root_rank: int  # position of the root in the user's list (earlier wins)
    kind: str  # original / recent / updates / other
    update_date: str  # for updates/<date>/x.tar, else ""

    @property
    def key(self) -> str:
        """A file-name-safe unique name: root rank + relative path."""
        return f"r{self.root_rank}-" + self.rel.replace("/", "__")

    @property
    def priority(self) -> tuple:
        # earlier root first; inside a root updates (newest date first), recent, original
        date_rank = "".join(chr(0x10FFFF - ord(c)) for c in self.update_date)
        return (self.root_rank, KIND_RANK[self.kind], date_rank, self.rel)


def _kind_of(rel: str) -> tuple[str, str]:
    parts = rel.split("/")
    if "updates" in parts[:-1]:
        i = parts.index("updates")
        date = parts[i + 1] if i + 2 < len(parts) else ""
        return "updates", date
    if "recent" in parts[:-1]:
        return "recent", ""
    if "original" in parts[:-1]:
        return "original", ""
    return "other", ""


def discover_shards(roots: Iterable[str | os.PathLike]) -> list[Shard]:
    """Every `*.tar` under each root (recursively), in a stable order."""
    shards: list[Shard] = []
    for rank, root in enumerate(roots):
        root_path = Path(root).resolve()
        if not root_path.is_dir():
            raise FileNotFoundError(f"shard root {root}: not a directory")
        for dirpath, dirnames, filenames in os.walk(root_path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.endswith(".tar"):
                    continue
                path = Path(dirpath) / name
                shards.append(make_shard(str(root_path), path.relative_to(root_path).as_posix(), rank, str(path)))
    return shards


def post_of_member(name: str) -> tuple[int, str] | None:
    """(post id, lower-case extension) of a member named `[folders/]<id>.<image ext>`, else None."""
    m = MEMBER_RE.match(name)
    if m is None or m.group(2).lower() not in IMAGE_EXTS:
        return None
    return int(m.group(1)), m.group(2).lower()


def make_shard(root: str, rel: str, rank: int, path: str | None = None) -> Shard:
    """A shard at `rel` ('/'-separated) under `root`; its kind from the folders in `rel`."""
    kind, date = _kind_of(rel)
    return Shard(path if path is not None else str(Path(root) / rel), root, rel, rank, kind, date)


def read_tar_members(path: str | os.PathLike, fileobj=None) -> tuple[pa.Table, int]:
    """Index one tar: (table of `<id>.<image ext>` members, number of other members skipped).

    Reads only the 512-byte headers (tarfile seeks over member data). `fileobj`: read the tar
    from it instead (any seekable file: kxl fetch passes one over HTTP range requests)."""
    ids, exts, members, offsets, sizes = [], [], [], [], []
    skipped = 0
    try:
        tf = tarfile.open(path, mode="r:", fileobj=fileobj)  # plain tar only: offsets must be real file offsets
    except tarfile.ReadError as exc:
        raise ValueError(f"{path}: not a plain (uncompressed) tar: {exc}") from exc
    with tf:
        for info in tf:
            if not info.isfile():
                continue
            parsed = post_of_member(info.name)
            if parsed is None:
                skipped += 1
                continue
            ids.append(parsed[0])
            exts.append(parsed[1])
            members.append(info.name)
            offsets.append(info.offset_data)
            sizes.append(info.size)
    table = pa.table(
        {"id": ids, "ext": exts, "member": members, "offset": offsets, "size": sizes},
        schema=INDEX_SCHEMA,
    )
    return table, skipped


def _tar_stamp(path: str) -> dict[str, str]:
    st = os.stat(path)
    return {
        "kxl_index_version": INDEX_VERSION,
        "tar_path": path,
        "tar_size": str(st.st_size),
        "tar_mtime_ns": str(st.st_mtime_ns),
    }


def default_index_dir(shards: list[Shard]) -> Path:
    """`.kxl-index/` in the first root when writable, else ~/.cache/kxl/shard-index."""
    if shards:
        root = Path(shards[0].root)
        candidate = root / ".kxl-index"
        if os.access(root, os.W_OK) or os.access(candidate, os.W_OK):
            return candidate
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kxl" / "shard-index"


def index_file_for(index_dir: str | os.PathLike, shard: Shard) -> Path:
    digest = hashlib.sha1(shard.path.encode()).hexdigest()[:12]
    return Path(index_dir) / f"{Path(shard.path).stem}-{digest}.parquet"


def is_index_current(index_file: Path, shard: Shard) -> bool:
    if not index_file.exists():
        return False
    try:
        meta = pq.read_schema(index_file).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return False
    stamp = _tar_stamp(shard.path)
    return {k.decode(): v.decode() for k, v in meta.items() if k.decode() in stamp} == stamp


def ensure_index(shard: Shard, index_dir: str | os.PathLike) -> tuple[Path, bool]:
    """Build the shard's index unless a current one exists. Returns (file, rebuilt)."""
    index_file = index_file_for(index_dir, shard)
    if is_index_current(index_file, shard):
        return index_file, False
    with file_lock(index_file.with_suffix(".lock")):
        if is_index_current(index_file, shard):  # another job built it while we waited
            return index_file, False
        stamp = _tar_stamp(shard.path)
        table, skipped = read_tar_members(shard.path)
        stamp["skipped_members"] = str(skipped)
        table = table.replace_schema_metadata(stamp)
        with atomic_open(index_file, "wb") as fh:
            pq.write_table(table, fh)
        if _tar_stamp(shard.path) != {k: v for k, v in stamp.items() if k != "skipped_members"}:
            # the tar changed while it was read: the next run indexes it again
            os.unlink(index_file)
            raise RuntimeError(f"{shard.path}: changed while being indexed; run again")
        return index_file, True


def load_index(shards: list[Shard], index_dir: str | os.PathLike) -> pd.DataFrame:
    """All shards' indexes as one frame with a `shard` column (position in `shards`)."""
    frames = []
    for i, shard in enumerate(shards):
        table = pq.read_table(index_file_for(index_dir, shard))
        frame = table.to_pandas()
        frame["shard"] = i
        frames.append(frame)
    if not frames:
        frame = INDEX_SCHEMA.empty_table().to_pandas()
        frame["shard"] = pd.Series(dtype="int64")
        return frame
    return pd.concat(frames, ignore_index=True)


def resolve_duplicates(index: pd.DataFrame, shards: list[Shard]) -> pd.DataFrame:
    """One row per id: the copy in the highest-priority shard (see Shard.priority)."""
    if index.empty:
        return index
    order = sorted(range(len(shards)), key=lambda i: shards[i].priority)
    rank = pd.Series(range(len(order)), index=order)
    ranked = index.assign(_rank=index["shard"].map(rank))
    ranked = ranked.sort_values(["_rank", "offset"], kind="stable")
    return ranked.drop_duplicates("id", keep="first").drop(columns="_rank")


ORIGINAL_BUCKETS = 1000  # original/data-0000..0999.tar


def expected_original_shard(post_id: int) -> str:
    """Where danbooru2023 puts a post in `original/`: bucket id % 1000 (for ids in its range)."""
    return f"original/data-{post_id % ORIGINAL_BUCKETS:04d}.tar"


def original_id_bound(index: pd.DataFrame, shards: list[Shard]) -> int | None:
    """The first post id that cannot be in an original/ tar, from the indexed original/ tars
    (None without any): 1000 above the largest id found in them. Each of the 1000 original
    tars takes every 1000th id over the whole range, so any one of them holds an id within
    1000 of the range's end; an id past this bound belongs to recent/ or updates/, however
    few original tars are downloaded."""
    if index.empty:
        return None
    is_original = np.array([s.kind == "original" for s in shards], dtype=bool)
    ids = index["id"].to_numpy()[is_original[index["shard"].to_numpy(dtype=np.int64)]]
    return int(ids.max()) + ORIGINAL_BUCKETS if len(ids) else None
