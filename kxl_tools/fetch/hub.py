"""What every `kxl fetch` job shares: the hub client, retries, verification, placement, errors.

The client is huggingface_hub (its cache, resumable downloads, HF_TOKEN / `hf auth login`
authentication, HF_ENDPOINT). What it does on its own, and what this layer adds:
- A download resumes from the cache's `.incomplete` file (a Range request); on a connection
  error while streaming it resumes up to 5 times itself. A cut that surfaces as
  requests' ChunkedEncodingError is not retried there: `with_retries` retries it, and the
  retry resumes from the partial file the same way.
- 429 is retried by huggingface_hub itself on file requests (5 times, 1..8 s backoff); 5xx on
  file requests, and any error on the /api/ listing calls, are not: `with_retries` retries
  429 / 500 / 502 / 503 / 504 and dropped connections with exponential backoff (KXL_FETCH_RETRY_BASE
  seconds, default 1, doubling up to 30; a Retry-After header wins), `retries` times.
- huggingface_hub checks only a download's size. `download` also checks its content against
  the hash the hub lists: the sha256 of an LFS file, the git blob sha1 of a regular file. A
  mismatch deletes the cached copy and downloads again (counted as a retry).
- A gated repository without access becomes one line naming HF_TOKEN; nothing is written to
  the target before every file of the job is in the cache and verified.

Files are placed in the target by a hard link to the cache's blob where the cache and the
target share a filesystem (no second copy of a 6.9 GB checkpoint, and the file survives a
cache clean-up, unlike a symlink), else by a copy; both through a temporary name and a rename,
so a target file is either absent or whole. `kxl-fetch.json` in the target records each file
placed (repository, commit, path in the repository, size, hashes); a rerun skips a file the
record says it already holds unchanged.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from kxl_common.atomic import atomic_open, fsync_dir, write_json
from kxl_common.errors import KxlError
from kxl_common.digest import sha256_file

T = TypeVar("T")
MANIFEST = "kxl-fetch.json"
TRANSIENT_STATUS = (429, 500, 502, 503, 504)
DEFAULT_RETRIES = 5
MAX_WAIT = 30.0


class FetchError(KxlError):
    """A fetch that cannot go on; the CLI prints it as one line."""


class VerifyError(FetchError):
    """Downloaded bytes that do not match the hub's hash or size."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files: the hub's sha256 of the content
    blob_id: str | None  # git blob sha1 (of the LFS pointer, for LFS files)


@dataclass(frozen=True)
class Snapshot:
    """One revision of a repository: its commit and files."""
    repo_id: str
    repo_type: str
    commit: str
    files: dict  # path -> RemoteFile

    @property
    def label(self) -> str:
        return f"{'' if self.repo_type == 'model' else self.repo_type + 's/'}{self.repo_id}"


def repo_label(repo_id: str, repo_type: str) -> str:
    return f"{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"


def git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def transient(exc: BaseException) -> bool:
    """Worth another try: 429 / 5xx, a dropped or cut connection, bytes that failed the check."""
    import requests
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, VerifyError):
        return True
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
        return True
    if _status(exc) in TRANSIENT_STATUS:
        return True
    # a failed HEAD comes back as "not in the local cache", the real error as its cause
    if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None:
        return transient(exc.__cause__)
    return False


def _wait(exc: BaseException, attempt: int) -> float:
    response = getattr(exc, "response", None) or getattr(exc.__cause__, "response", None)
    after = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    if after is not None and str(after).strip().isdigit():
        return min(float(after), MAX_WAIT)
    base = float(os.environ.get("KXL_FETCH_RETRY_BASE", "1"))
    return min(base * 2 ** attempt, MAX_WAIT)


def explain(exc: BaseException, label: str, what: str = "") -> FetchError:
    """A hub error as one line that says what to do."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{label}{'/' + what if what else ''}"
    if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None:
        # huggingface_hub wraps a failed HEAD as "not in the local cache"; say what failed
        return explain(exc.__cause__, label, what)
    if isinstance(exc, GatedRepoError):
        if os.environ.get("HF_TOKEN"):
            return FetchError(f"{label}: gated repository, and the token in HF_TOKEN has no access; accept "
                              f"the repository's conditions on its hub page with that account, then rerun")
        return FetchError(f"{label}: gated repository; accept its conditions on its hub page, then set "
                          f"HF_TOKEN to an access token of that account (or run `hf auth login`) and rerun")
    if isinstance(exc, RevisionNotFoundError):
        return FetchError(f"{label}: no such revision ({exc.server_message or 'revision not found'})")
    if isinstance(exc, EntryNotFoundError):
        return FetchError(f"{where}: no such file in the repository")
    if isinstance(exc, RepositoryNotFoundError):
        return FetchError(f"{label}: no such repository on the hub (or it is private: set HF_TOKEN)")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return FetchError(f"{where}: no space left on the device; free some and rerun "
                          "(the download resumes from what is already cached)")
    if transient(exc):
        return FetchError(f"{where}: the hub kept failing ({_short(exc)}); rerun later, the download resumes")
    return FetchError(f"{where}: {_short(exc)}")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def with_retries(fn: Callable[[], T], *, label: str, what: str = "", retries: int = DEFAULT_RETRIES,
                 log: Callable[[str], None] | None = None) -> T:
    """fn(), retried on transient errors with backoff; other errors become FetchError at once."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except FetchError as exc:
            if not isinstance(exc, VerifyError) or attempt == retries:
                raise
            error = exc
        except Exception as exc:  # noqa: BLE001 - sorted into transient / final just below
            if not transient(exc) or attempt == retries:
                raise explain(exc, label, what) from exc
            error = exc
        pause = _wait(error, attempt)
        if log is not None:
            log(f"{label}{'/' + what if what else ''}: {_short(error)}; retry {attempt + 1}/{retries} in {pause:g} s")
        time.sleep(pause)
    raise AssertionError("unreachable")


class Hub:
    """huggingface_hub, with the retries, checks and errors of this module.

    endpoint: HF_ENDPOINT at creation (huggingface_hub's default hub otherwise); token: None
    lets huggingface_hub find one (HF_TOKEN, then the `hf auth login` file); cache_dir: None
    is huggingface_hub's cache (HF_HUB_CACHE / HF_HOME)."""

    def __init__(self, *, cache_dir: str | Path | None = None, token: str | None = None,
                 retries: int = DEFAULT_RETRIES, log: Callable[[str], None] | None = None):
        from huggingface_hub import HfApi

        self.endpoint = os.environ.get("HF_ENDPOINT") or None
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.token = token
        self.retries = retries
        self.log = log
        self.api = HfApi(endpoint=self.endpoint, token=token)

    def snapshot(self, repo_id: str, repo_type: str = "model", revision: str | None = None) -> Snapshot:
        """The commit `revision` (default: main) resolves to, and every file in it with size and hash."""
        label = repo_label(repo_id, repo_type)

        def read() -> Snapshot:
            info = self.api.repo_info(repo_id, repo_type=repo_type, revision=revision, files_metadata=True)
            files = {}
            for sibling in info.siblings or []:
                files[sibling.rfilename] = RemoteFile(sibling.rfilename, int(sibling.size or 0),
                                                      sibling.lfs.sha256 if sibling.lfs else None,
                                                      sibling.blob_id)
            if not files:  # very large repositories list no siblings: walk the tree instead
                for entry in self.api.list_repo_tree(repo_id, repo_type=repo_type, revision=info.sha,
                                                     recursive=True):
                    if hasattr(entry, "size") and hasattr(entry, "blob_id"):
                        files[entry.path] = RemoteFile(entry.path, int(entry.size),
                                                       entry.lfs.sha256 if entry.lfs else None, entry.blob_id)
            return Snapshot(repo_id, repo_type, info.sha, files)

        return with_retries(read, label=label, retries=self.retries, log=self.log)

    def download(self, snap: Snapshot, remote: RemoteFile) -> Path:
        """The file of `snap` in the cache, downloaded (resumed) if needed, and checked."""
        from huggingface_hub import hf_hub_download

        def fetch() -> Path:
            path = Path(hf_hub_download(snap.repo_id, remote.path, repo_type=snap.repo_type,
                                        revision=snap.commit, cache_dir=self.cache_dir,
                                        endpoint=self.endpoint, token=self.token))
            try:
                verify(path, remote, f"{snap.label}/{remote.path}")
            except VerifyError:
                discard(path)
                raise
            return path

        return with_retries(fetch, label=snap.label, what=remote.path, retries=self.retries, log=self.log)


def verify(path: Path, remote: RemoteFile, label: str) -> None:
    size = path.stat().st_size
    if size != remote.size:
        raise VerifyError(f"{label}: {size} bytes, the hub lists {remote.size}")
    if remote.sha256 is not None:
        got = sha256_file(path)
        if got != remote.sha256:
            raise VerifyError(f"{label}: sha256 {got}, the hub lists {remote.sha256}")
    elif remote.blob_id is not None:
        got = git_blob_sha1(path)
        if got != remote.blob_id:
            raise VerifyError(f"{label}: git blob sha1 {got}, the hub lists {remote.blob_id}")


def discard(path: Path) -> None:
    """Drop a cached file: its blob and the snapshot link to it."""
    blob = Path(os.path.realpath(path))
    for item in (path, blob):
        with contextlib.suppress(FileNotFoundError):
            item.unlink()


def check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise FetchError(f"{target}: exists and is not a folder; pass a folder to fetch into")


def place(source: Path, target: Path, *, copy: bool = False) -> str:
    """Put `source` (a cached file) at `target` whole or not at all: a hard link, else a copy.
    Returns "link" or "copy"."""
    blob = Path(os.path.realpath(source))
    target.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        tmp = target.parent / f".{target.name}.kxl-link"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(blob, tmp)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
        else:
            os.replace(tmp, target)
            fsync_dir(target.parent)
            return "link"
    try:
        with atomic_open(target, "wb") as out, open(blob, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise FetchError(f"{target}: no space left on the device while copying; free some and rerun "
                             "(what is cached stays)") from exc
        raise
    return "copy"


def read_manifest(target: Path) -> dict:
    import json

    try:
        return json.loads((target / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}


def up_to_date(target: Path, name: str, remote: RemoteFile, manifest: dict) -> bool:
    """`name` in target is the file the manifest recorded for this content, unchanged since."""
    record = manifest.get("files", {}).get(name)
    path = target / name
    if not record or not path.is_file():
        return False
    stat = path.stat()
    same_content = record.get("sha256") == remote.sha256 and record.get("blob_id") == remote.blob_id
    return same_content and record.get("size") == stat.st_size == remote.size and record.get("mtime_ns") == stat.st_mtime_ns


@dataclass
class Placement:
    """One file of a job: where it comes from and the name it gets in the target."""
    remote: RemoteFile
    name: str


def fetch_into(hub: Hub, snap: Snapshot, placements: Iterable[Placement], target: Path, *,
               copy: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Download every file (cache), verify, then place them all in `target`; write the manifest.
    Nothing reaches `target` until every file is in the cache and checked."""
    placements = list(placements)
    if not placements:
        raise FetchError(f"{snap.label}: nothing to fetch")
    check_target(target)
    manifest = read_manifest(target)
    todo = []
    for p in placements:
        if up_to_date(target, p.name, p.remote, manifest):
            continue
        present = target / p.name
        if present.exists() and p.name not in manifest.get("files", {}):
            # a file kxl did not put there: keep it if it is the hub's file, never overwrite it
            try:
                verify(present, p.remote, str(present))
            except (VerifyError, OSError) as exc:
                raise FetchError(f"{present}: exists and is not {snap.label}/{p.remote.path} ({exc}); move it "
                                 "away and rerun (nothing was overwritten)") from exc
            continue
        todo.append(p)
    total = sum(p.remote.size for p in placements)
    echo(f"{snap.label} @ {snap.commit[:12]}: {len(placements)} files, {_human(total)}; "
         f"{len(placements) - len(todo)} already in {target}")
    cached = {}
    for p in todo:
        cached[p.name] = hub.download(snap, p.remote)
    how = {}
    for p in todo:
        how[p.name] = place(cached[p.name], target / p.name, copy=copy)
    files = dict(manifest.get("files", {}))
    for p in placements:
        stat = (target / p.name).stat()
        files[p.name] = {"repo": snap.label, "commit": snap.commit, "path": p.remote.path,
                         "size": p.remote.size, "sha256": p.remote.sha256, "blob_id": p.remote.blob_id,
                         "mtime_ns": stat.st_mtime_ns}
    write_json(target / MANIFEST, {"files": dict(sorted(files.items()))})
    return {"target": str(target), "placed": how, "kept": [p.name for p in placements if p.name not in how],
            "bytes": total}


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
