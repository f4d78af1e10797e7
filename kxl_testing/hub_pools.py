"""Tiny mirrors of the image pools on the test hub (kxl_testing.hub_server), in their real forms.

- `hfutils_index(tar)`: a tar's index in deepghs' hfutils form (hfutils/index/make.py
  `tar_get_index_info`): {"filesize", "hash" (git blob sha1 of the tar), "hash_lfs" (sha256 of
  the tar), "files": {member name: {"offset", "size", "sha256"}}} for every regular member,
  computed here independently of kxl's reader (tarfile over the whole file);
- `publish_pool(server, pool, tars_root, rels)`: the tars at their paths in the pool's
  repository, and (unless index=False) their index JSON at the pool's index path in its index
  repository (`{stem}.json`, hfutils' default naming);
- `tars_with_members(root)`: the tars under root that hold at least one member (the
  synthetic sample also writes empty original/ tars).
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path


def hfutils_index(tar_path: str | Path) -> dict:
    data = Path(tar_path).read_bytes()
    files = {}
    with tarfile.open(tar_path, mode="r|") as tar:  # a stream, as hfutils reads it
        for info in tar:
            if info.isreg():
                body = data[info.offset_data: info.offset_data + info.size]
                files[info.name] = {"offset": info.offset_data, "size": info.size,
                                    "sha256": hashlib.sha256(body).hexdigest()}
    return {"filesize": len(data), "hash": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
            "hash_lfs": hashlib.sha256(data).hexdigest(), "files": files}


def tars_with_members(root: str | Path) -> list[str]:
    root = Path(root)
    rels = []
    for path in sorted(root.rglob("*.tar")):
        with tarfile.open(path) as tar:
            if tar.next() is not None:
                rels.append(path.relative_to(root).as_posix())
    return rels


def publish_pool(server, pool, tars_root: str | Path, rels: list[str] | None = None, *, index: bool = True) -> list[str]:
    """Put the tars (relative paths under tars_root) on the server as `pool` lays them out."""
    tars_root = Path(tars_root)
    rels = tars_with_members(tars_root) if rels is None else rels
    for rel in rels:
        server.add_file(pool.repo, rel, tars_root / rel, repo_type=pool.repo_type)
        if index and pool.index_repo:
            doc = hfutils_index(tars_root / rel)
            server.add_file(pool.index_repo, pool.index_file_for(rel), json.dumps(doc).encode(), repo_type="dataset")
    return rels


def copy_tars(tars_root: str | Path, rels: list[str], dest: str | Path) -> Path:
    """The same tars "downloaded whole" (what kxl-prep export reads)."""
    dest = Path(dest)
    for rel in rels:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((Path(tars_root) / rel).read_bytes())
    return dest
