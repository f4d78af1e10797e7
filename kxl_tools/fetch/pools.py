"""The image pools (pools.toml, shipped data): which tars of which repository may hold a post.

`Pool.candidates(ids, tar_paths)` routes every selected id to the tars its layout allows
(`pattern` with n = id % modulo + add; `*` globbed over the repository's actual tar list),
so only those tars' indexes are read. A table, not code: a new pool is a new entry.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from kxl_common.errors import KxlError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

POOLS_FILE = Path(__file__).with_name("pools.toml")


class PoolError(KxlError, ValueError):
    pass


@dataclass(frozen=True)
class TarRule:
    pattern: str
    modulo: int
    add: int = 0

    def name_for(self, post_id: int) -> str:
        return self.pattern.format(n=post_id % self.modulo + self.add)


@dataclass(frozen=True)
class Pool:
    name: str
    repo: str
    repo_type: str
    revision: str
    index_repo: str  # "" : no published index (tar headers are read by ranges)
    index_revision: str
    index_path: str
    tars: tuple[TarRule, ...]
    gated: bool = False
    description: str = ""

    def index_file_for(self, tar_rel: str) -> str:
        return self.index_path.format(stem=tar_rel[: -len(".tar")] if tar_rel.endswith(".tar") else tar_rel)

    def candidates(self, ids, tar_paths: list[str]) -> set[str]:
        """The tars (of `tar_paths`, the repository's) any of `ids` may be in."""
        present = set(tar_paths)
        names: set[str] = set()
        for rule in self.tars:
            wanted = {rule.name_for(int(i)) for i in {int(i) % rule.modulo for i in ids}}
            for name in wanted:
                if "*" in name or "?" in name or "[" in name:
                    names.update(fnmatch.filter(tar_paths, name))
                elif name in present:
                    names.add(name)
        return names


def load_pools(path: str | os.PathLike = POOLS_FILE) -> dict[str, Pool]:
    with open(path, "rb") as fh:
        doc = tomllib.load(fh)
    pools = {}
    for name, entry in doc.get("pools", {}).items():
        try:
            rules = tuple(TarRule(r["pattern"], int(r["modulo"]), int(r.get("add", 0))) for r in entry["tars"])
            pools[name] = Pool(name, entry["repo"], entry.get("repo_type", "dataset"), entry.get("revision", "main"),
                               entry.get("index_repo", ""), entry.get("index_revision", "main"),
                               entry.get("index_path", "{stem}.json"), rules, bool(entry.get("gated", False)),
                               entry.get("description", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise PoolError(f"{path}: pool {name!r}: bad entry ({type(exc).__name__}: {exc})") from None
    return pools


def get_pool(name: str, path: str | os.PathLike = POOLS_FILE) -> Pool:
    pools = load_pools(path)
    if name not in pools:
        raise PoolError(f"--pool {name!r}: unknown pool (known: {', '.join(sorted(pools))}; they are listed in {path})")
    return pools[name]
