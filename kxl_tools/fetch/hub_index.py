"""The shard index of one tar on the hub: kxl_prep.export.index's table (id, ext, member,
offset, size) plus each member's sha256, cached as parquet beside the export's.

Two ways to get it, per tar:
- the published index (deepghs' hfutils form, hfutils/index/make.py `tar_get_index_info`):
  {"filesize": <tar bytes>, "hash": <git blob sha1 of the tar>, "hash_lfs": <sha256 of the
  tar>, "files": {<member name as in the tar>: {"offset": <data offset>, "size": <bytes>,
  "sha256": <hex>}}}, downloaded with hf_hub_download (cached by huggingface_hub). Its
  filesize and hash_lfs are checked against the tar the hub lists: an index made from
  another version of the tar is refused before a byte of it is read;
- no published index (none in the pool, or none for this tar): the tar's 512-byte headers
  are read by range requests (kxl_prep.export.index.read_tar_members over a RangedFile),
  once; no sha256 then (a tar header has none), sizes are still checked.
Members are kept by the export's own rule (post_of_member: `<id>.<image ext>`), so the same
tar gives the same rows either way, and the same rows as `kxl-prep export` indexing it.
The cache file is stamped with the tar's size and sha256: a changed tar is indexed again.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kxl_common.atomic import atomic_open
from kxl_common.errors import KxlError
from kxl_common.lock import file_lock
from kxl_prep.export.index import INDEX_SCHEMA, post_of_member, read_tar_members
from kxl_tools.fetch.ranged import HubFile, RangedFile, Retry

HUB_INDEX_VERSION = "1"
HUB_INDEX_SCHEMA = INDEX_SCHEMA.append(pa.field("sha256", pa.string()))


class IndexMismatch(KxlError, RuntimeError):
    """A published index that does not describe the tar the hub serves."""


@dataclass(frozen=True)
class HubTar:
    file: HubFile  # revision: the data repository's commit
    size: int
    sha256: str | None  # the LFS object id the hub lists (None for a non-LFS file)


def default_index_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kxl" / "hub-index"


def cache_file(index_dir: str | os.PathLike, tar: HubTar) -> Path:
    return Path(index_dir) / tar.file.repo.replace("/", "--") / (tar.file.path[: -len(".tar")] + ".parquet")


def _stamp(tar: HubTar) -> dict[str, str]:
    return {"kxl_hub_index_version": HUB_INDEX_VERSION, "tar": str(tar.file), "tar_size": str(tar.size),
            "tar_sha256": tar.sha256 or ""}


def table_from_hfutils(doc: dict, where: str) -> tuple[pa.Table, int]:
    """Our rows from an hfutils index document (same member rule as the export's indexing)."""
    files = doc.get("files")
    if not isinstance(files, dict):
        raise IndexMismatch(f"{where}: no `files` object (not an hfutils tar index)")
    rows = {"id": [], "ext": [], "member": [], "offset": [], "size": [], "sha256": []}
    skipped = 0
    for name, info in files.items():
        parsed = post_of_member(name)
        if parsed is None:
            skipped += 1
            continue
        try:
            offset, size = int(info["offset"]), int(info["size"])
        except (KeyError, TypeError, ValueError):
            raise IndexMismatch(f"{where}: member {name!r}: no integer `offset` / `size`") from None
        rows["id"].append(parsed[0])
        rows["ext"].append(parsed[1])
        rows["member"].append(name)
        rows["offset"].append(offset)
        rows["size"].append(size)
        rows["sha256"].append(info.get("sha256") or None)
    return pa.table(rows, schema=HUB_INDEX_SCHEMA), skipped


def check_against_tar(doc: dict, tar: HubTar, where: str) -> None:
    size = doc.get("filesize")
    if size is not None and int(size) != tar.size:
        raise IndexMismatch(f"{where}: filesize {size} but {tar.file} has {tar.size} bytes: the index "
                            "describes another version of the tar (pin --index-revision to the matching one)")
    lfs = doc.get("hash_lfs")
    if lfs and tar.sha256 and lfs != tar.sha256:
        raise IndexMismatch(f"{where}: hash_lfs {lfs} but {tar.file} is {tar.sha256}: the index describes "
                            "another version of the tar (pin --index-revision to the matching one)")


def _published(pool, tar: HubTar) -> tuple[dict, str] | None:
    """The tar's published index document, or None when the pool has none for it."""
    if not pool.index_repo:
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    name = pool.index_file_for(tar.file.path)
    where = f"{pool.index_repo}/{name}"
    try:
        path = hf_hub_download(pool.index_repo, name, repo_type="dataset", revision=pool.index_revision)
    except GatedRepoError:
        raise
    except (EntryNotFoundError, RepositoryNotFoundError):  # no index for this tar (or none left at all)
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh), where
    except (OSError, ValueError) as exc:
        raise IndexMismatch(f"{where}: not readable as JSON ({exc})") from None


def build_table(pool, tar: HubTar, retry: Retry) -> tuple[pa.Table, dict[str, str]]:
    published = _published(pool, tar)
    if published is not None:
        doc, where = published
        check_against_tar(doc, tar, where)
        table, skipped = table_from_hfutils(doc, where)
        return table, {"source": f"hfutils index {where}@{pool.index_revision}", "skipped_members": str(skipped)}
    ranged = RangedFile(tar.file, tar.size, retry)
    table, skipped = read_tar_members(str(tar.file), fileobj=ranged)
    table = table.append_column("sha256", pa.array([None] * table.num_rows, pa.string()))
    return table, {"source": "tar headers read by range requests", "skipped_members": str(skipped),
                   "header_requests": str(ranged.requests), "header_bytes": str(ranged.bytes_read)}


def is_current(path: Path, tar: HubTar) -> bool:
    if not path.exists():
        return False
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return False
    stamp = _stamp(tar)
    return {k.decode(): v.decode() for k, v in meta.items() if k.decode() in stamp} == stamp


def ensure_hub_index(pool, tar: HubTar, index_dir: str | os.PathLike, retry: Retry = Retry()) -> tuple[Path, bool]:
    """(cache file, built now). Built once per tar version; concurrent jobs build it once."""
    path = cache_file(index_dir, tar)
    if is_current(path, tar):
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock")):
        if is_current(path, tar):
            return path, False
        table, extra = build_table(pool, tar, retry)
        table = table.replace_schema_metadata({**_stamp(tar), **extra})
        with atomic_open(path, "wb") as fh:
            pq.write_table(table, fh)
        return path, True


def read_hub_index(path: Path):
    return pq.read_table(path).to_pandas()


def index_source(path: Path) -> str:
    meta = pq.read_schema(path).metadata or {}
    return meta.get(b"source", b"").decode()
