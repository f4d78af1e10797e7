"""A small Hugging Face Hub look-alike on 127.0.0.1 for offline tests of hub clients.

Point huggingface_hub at it with `HF_ENDPOINT=server.url` (or `endpoint=server.url`) and its own
code paths run against it: `hf_hub_download`, `snapshot_download`, `HfApi.repo_info /
list_repo_tree / get_paths_info`, `HfFileSystem` (ranged reads). The routes and headers are the
ones huggingface_hub 0.34.3 calls and reads (file_download.py, hf_api.py, hf_file_system.py,
utils/_http.py), answered the way the hub answers them:

  GET  /api/{models|datasets|spaces}/{repo_id}[/revision/{rev}]   repo info: id, sha, siblings
       (?blobs=true adds size, blobId and lfs {size, sha256, pointerSize})
  GET  /api/{type}s/{repo_id}/tree/{rev}[/{path}]?recursive=&expand=   entries
       {type, oid, size, path[, lfs {oid, size, pointerSize}][, lastCommit]}, paginated by a
       `Link: <...>; rel="next"` header past `page_size` entries (the hub pages at 1000)
  POST /api/{type}s/{repo_id}/paths-info/{rev}   form `paths=...` -> the entries that exist
  HEAD/GET /[datasets/|spaces/]{repo_id}/resolve/{rev}/{path}
       a regular (git) file: 200 with ETag "<git blob sha1>", X-Repo-Commit, Content-Length;
       an LFS file: 302 with Location (the "CDN" below), X-Linked-Etag "<sha256>",
       X-Linked-Size, X-Repo-Commit, ETag "<pointer blob sha1>"
  HEAD/GET /cdn-lfs/{sha256}?repo_type=&repo=&file=   the LFS bytes, ETag "<sha256>" (stands
       for the hub's signed CDN address; like it, it needs no token)
  GET with `Range: bytes=a-b | a- | -n` answers 206 + Content-Range; past the end, 416;
  several ranges in one header are refused with 416 (huggingface_hub never sends them).
  Errors carry the hub's X-Error-Code / X-Error-Message headers, which hf_raise_for_status maps
  to its exceptions: RepoNotFound (401 without a token, 404 with one), RevisionNotFound (404),
  EntryNotFound (404, with X-Repo-Commit), GatedRepo (401 without a token, 403 with a wrong
  one; the messages are the hub's wording).

A file is LFS when its name matches `lfs_patterns` (the hub's default .gitattributes list plus
the database suffixes). A repository's one revision is "main" (or its commit sha, a sha1 of its
file list and contents, so changing a file changes the commit).

The mirror is a folder: `root/{models|datasets|spaces}/{owner}/{name}/<files>`. Write it
directly, or with `server.add_file(repo_id, path, data, repo_type="dataset")`.

Faults, each for the next `times` matching requests, then the server answers normally again:
  server.fault("status", file="*.tar", status=503)      # 429 / 5xx (Retry-After for 429)
  server.fault("cut", file="a.bin", after_bytes=1000)    # body cut: the connection closes
  server.fault("corrupt", file="a.bin", at=10)           # one body byte flipped (offset in body)
  server.fault("stall", file="a.bin", after_bytes=1000)  # body halts until release_stalls()
                                                         # (or stop()), then the connection closes
`file` is an fnmatch pattern on the path in the repo (`repo=` narrows to one repo id);
`methods` (default: GET only; status faults default to HEAD and GET) picks the requests;
`target="api"` makes a status fault hit the /api/ routes of matching repos instead.
`server.stalled.wait(timeout)` returns once a stall holds a response (for kill -9 tests).

Latency: `server.latency = 0.05` holds every answer to a file request (resolve and CDN) that
long before its first byte, as a distant hub does (0 by default); `server.bandwidth = 50 * 2**20`
caps the file bytes sent per second by all answers together, as one network link would (None
by default: as fast as loopback goes). For benchmarks of request counts against bytes.

Gating: `server.gate(repo_id, repo_type="dataset", token="hf_x")`: resolve requests need
`Authorization: Bearer hf_x`; repo info still answers, with `gated: "manual"` (as the hub does).

Log: `server.log` is a list of `Request(method, path, repo_type, repo_id, file, range,
status, body_bytes, authorized)`, one per answered request (`body_bytes` = body bytes
actually written). `server.requests(file=..., method=...)` filters it;
`server.bytes_served(file=...)` sums the file bytes sent (200 / 206 answers); `server.clear_log()` empties it.

Use: `with HubServer(tmp_path / "hub") as server: ...` or the `hub_server` fixture in
tests/conftest.py (which also sets HF_ENDPOINT and keeps the user's token and cache out).
"""
from __future__ import annotations

import email.utils
import fnmatch
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# the hub's default .gitattributes (a new repository's), plus database files
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
    "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
    "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
    "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    "*.db", "*.duckdb", "*.sqlite", "*.webp", "*.png", "*.jpg", "*.jpeg",
)
CHUNK = 1 << 16
DATE = "2024-01-01T00:00:00.000Z"


@dataclass
class Request:
    method: str
    path: str
    repo_type: str | None = None
    repo_id: str | None = None
    file: str | None = None
    range: str | None = None
    status: int = 0
    body_bytes: int = 0
    authorized: str | None = None


@dataclass
class Fault:
    kind: str
    file: str = "*"
    repo: str | None = None
    times: int = 1
    status: int = 503
    after_bytes: int = 0
    at: int = 0
    methods: tuple = ("GET",)
    target: str = "file"


@dataclass
class _Entry:
    path: str
    size: int
    blob_id: str
    sha256: str | None = None  # LFS files only
    pointer_size: int = 0


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    folder: Path
    files: dict = field(default_factory=dict)  # path -> _Entry
    sha: str = ""


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubServer:
    """See the module docstring. `url` is valid between start() and stop()."""

    def __init__(self, root, *, lfs_patterns=LFS_PATTERNS, page_size: int = 1000):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lfs_patterns = tuple(lfs_patterns)
        self.page_size = page_size
        self.latency = 0.0  # seconds before each file answer (see the module docstring)
        self.bandwidth: float | None = None  # file bytes per second, all answers together
        self._link_free_at = 0.0
        self.log: list[Request] = []
        self.faults: list[Fault] = []
        self.gates: dict = {}  # (repo_type, repo_id) -> token
        self.stalled = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._hashes: dict = {}  # (path, size, mtime_ns) -> (blob sha1, sha256)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- life cycle
    def start(self) -> "HubServer":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ---- content
    def repo_folder(self, repo_id: str, repo_type: str = "model") -> Path:
        return self.root / f"{repo_type}s" / repo_id

    def add_file(self, repo_id: str, path: str, data: bytes | str | Path, repo_type: str = "model") -> Path:
        """Write `data` (bytes, or a file to copy) at `path` in the repo; returns the file."""
        target = self.repo_folder(repo_id, repo_type) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(data).read_bytes() if isinstance(data, (str, Path)) else data)
        return target

    def gate(self, repo_id: str, repo_type: str = "model", token: str = "hf_test_token") -> str:
        self.gates[(repo_type, repo_id)] = token
        return token

    def is_lfs(self, path: str) -> bool:
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(name, pattern) for pattern in self.lfs_patterns)

    # ---- faults and log
    def fault(self, kind: str, file: str = "*", *, times: int = 1, **options) -> Fault:
        if kind not in ("status", "cut", "corrupt", "stall"):
            raise ValueError(f"unknown fault kind {kind!r}")
        if kind == "status" and "methods" not in options:
            options["methods"] = ("HEAD", "GET")
        made = Fault(kind, file=file, times=times, **options)
        if kind == "stall":
            self.stalled.clear()
            self._release.clear()
        with self._lock:
            self.faults.append(made)
        return made

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()
        self.release_stalls()

    def release_stalls(self) -> None:
        self._release.set()

    def requests(self, *, file: str | None = None, method: str | None = None, repo: str | None = None):
        with self._lock:
            return [r for r in self.log
                    if (file is None or (r.file is not None and fnmatch.fnmatch(r.file, file)))
                    and (method is None or r.method == method)
                    and (repo is None or r.repo_id == repo)]

    def bytes_served(self, *, file: str | None = None, repo: str | None = None) -> int:
        """File bytes sent (200 / 206 answers of resolve and CDN requests; not redirect bodies)."""
        return sum(r.body_bytes for r in self.requests(file=file or "*", repo=repo) if r.status in (200, 206))

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def _take_fault(self, *, target: str, repo: "_Repo | None", file: str | None, method: str, kinds):
        with self._lock:
            for fault in self.faults:
                if fault.times <= 0 or fault.kind not in kinds or fault.target != target:
                    continue
                if method not in fault.methods:
                    continue
                if fault.repo is not None and (repo is None or repo.repo_id != fault.repo):
                    continue
                if target == "file" and (file is None or not fnmatch.fnmatch(file, fault.file)):
                    continue
                fault.times -= 1
                return fault
        return None

    # ---- repository state
    def _hash(self, path: Path) -> tuple[str, str]:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            sha1 = hashlib.sha1(b"blob %d\0" % stat.st_size)
            sha256 = hashlib.sha256()
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    sha1.update(chunk)
                    sha256.update(chunk)
            self._hashes[key] = (sha1.hexdigest(), sha256.hexdigest())
        return self._hashes[key]

    def _load(self, repo_type: str, repo_id: str) -> "_Repo | None":
        folder = self.repo_folder(repo_id, repo_type)
        if repo_id.count("/") != 1 or ".." in repo_id or not folder.is_dir():
            return None
        repo = _Repo(repo_type, repo_id, folder)
        digest = hashlib.sha1(f"{repo_type}/{repo_id}".encode())
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = file.relative_to(folder).as_posix()
            blob, sha256 = self._hash(file)
            size = file.stat().st_size
            if self.is_lfs(rel):
                pointer = lfs_pointer(sha256, size)
                entry = _Entry(rel, size, git_blob_sha1(pointer), sha256, len(pointer))
            else:
                entry = _Entry(rel, size, blob)
            repo.files[rel] = entry
            digest.update(f"{rel}\0{entry.blob_id}\0".encode())
        repo.sha = digest.hexdigest()
        return repo


def _tree_entry(repo: _Repo, path: str, expand: bool) -> dict:
    entry = repo.files.get(path)
    commit = {"id": repo.sha, "title": "mirror", "date": DATE}
    if entry is None:  # a folder
        out = {"type": "directory", "oid": hashlib.sha1(f"{repo.sha}/{path}".encode()).hexdigest(),
               "size": 0, "path": path}
    else:
        out = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": path}
        if entry.sha256 is not None:
            out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    if expand:
        out["lastCommit"] = commit
    return out


def _folders(repo: _Repo) -> set[str]:
    found = set()
    for path in repo.files:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            found.add("/".join(parts[:i]))
    return found


def _parse_range(header: str | None, size: int):
    """(start, end inclusive) of a single `bytes=` range, None for no range, "bad" if unsatisfiable."""
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or (not match.group(1) and not match.group(2)):
        return "bad"
    start, end = match.groups()
    if not start:
        length = int(end)
        if length == 0:
            return "bad"
        return max(size - length, 0), size - 1
    start = int(start)
    end = int(end) if end else size - 1
    if start >= size or end < start:
        return "bad"
    return start, min(end, size - 1)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the hub's own log is the record
        pass

    # ---- plumbing
    def _record(self, **fields) -> Request:
        record = Request(self.command, urlsplit(self.path).path, range=self.headers.get("Range"),
                         authorized=self._token(), **fields)
        with self.hub._lock:
            self.hub.log.append(record)
        return record

    def _token(self) -> str | None:
        value = self.headers.get("Authorization", "")
        return value[len("Bearer "):] if value.startswith("Bearer ") else None

    def _send(self, record: Request, status: int, headers: dict | None = None, body: bytes = b"") -> None:
        record.status = status
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            record.body_bytes = len(body)

    def _json(self, record: Request, payload, headers: dict | None = None) -> None:
        self._send(record, 200, {"Content-Type": "application/json", **(headers or {})},
                   json.dumps(payload).encode())

    def _error(self, record: Request, status: int, code: str | None, message: str, headers=None) -> None:
        extra = {"X-Error-Message": message, **(headers or {})}
        if code:
            extra["X-Error-Code"] = code
        self._send(record, status, extra, json.dumps({"error": message}).encode())

    def _status_fault(self, record: Request, target: str, repo, file) -> bool:
        fault = self.hub._take_fault(target=target, repo=repo, file=file, method=self.command,
                                     kinds=("status",))
        if fault is None:
            return False
        headers = {"Retry-After": "0"} if fault.status == 429 else {}
        self._error(record, fault.status, None, f"injected {fault.status}", headers)
        return True

    def _repo_or_error(self, record: Request, repo_type: str, repo_id: str, revision: str | None):
        repo = self.hub._load(repo_type, repo_id)
        if repo is None:
            self._error(record, 404 if self._token() else 401, "RepoNotFound", "Repository not found")
            return None
        if revision is not None and revision not in ("main", repo.sha):
            self._error(record, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _gate_error(self, record: Request, repo: _Repo) -> bool:
        token = self.hub.gates.get((repo.repo_type, repo.repo_id))
        if token is None or self._token() == token:
            return False
        if self._token() is None:
            message = (f"Access to {repo.repo_type} {repo.repo_id} is restricted. You must have access "
                       "to it and be authenticated to access it. Please log in.")
            self._error(record, 401, "GatedRepo", message)
        else:
            message = (f"Access to {repo.repo_type} {repo.repo_id} is restricted and you are not in the "
                       f"authorized list. Visit {self.hub.url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id} "
                       "to ask for access.")
            self._error(record, 403, "GatedRepo", message)
        return True

    # ---- routes
    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        query = parse_qs(split.query)
        try:
            if path.startswith("/api/"):
                self._api(path[len("/api/"):], query)
            elif path.startswith("/cdn-lfs/"):
                self._cdn(path[len("/cdn-lfs/"):], query)
            else:
                self._resolve(path.lstrip("/"))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _api(self, rest: str, query: dict) -> None:
        record = self._record()
        parts = rest.split("/")
        if len(parts) < 3 or parts[0] not in REPO_TYPES:
            self._error(record, 404, None, "Not found")
            return
        repo_type, repo_id, tail = REPO_TYPES[parts[0]], "/".join(parts[1:3]), parts[3:]
        record.repo_type, record.repo_id = repo_type, repo_id
        if self._status_fault(record, "api", self.hub._load(repo_type, repo_id), None):
            return
        if self.command == "GET" and (not tail or (tail[0] == "revision" and len(tail) >= 2)):
            revision = "/".join(tail[1:]) if tail else None
            repo = self._repo_or_error(record, repo_type, repo_id, revision)
            if repo is not None:
                self._json(record, self._info(repo, query.get("blobs", ["false"])[0].lower() == "true"))
        elif self.command == "GET" and tail and tail[0] == "tree" and len(tail) >= 2:
            repo = self._repo_or_error(record, repo_type, repo_id, tail[1])
            if repo is not None:
                self._tree(record, repo, "/".join(tail[2:]).strip("/"), query)
        elif self.command == "POST" and tail and tail[0] == "paths-info" and len(tail) >= 2:
            repo = self._repo_or_error(record, repo_type, repo_id, "/".join(tail[1:]))
            if repo is not None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                expand = form.get("expand", ["False"])[0].lower() == "true"
                folders = _folders(repo)
                wanted = [p.strip("/") for p in form.get("paths", [])]
                self._json(record, [_tree_entry(repo, p, expand) for p in wanted
                                    if p in repo.files or p in folders])
        else:
            self._error(record, 404, None, "Not found")

    def _info(self, repo: _Repo, blobs: bool) -> dict:
        siblings = []
        for entry in repo.files.values():
            sibling = {"rfilename": entry.path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.blob_id)
                if entry.sha256 is not None:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256,
                                      "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        gated = "manual" if (repo.repo_type, repo.repo_id) in self.hub.gates else False
        return {"_id": repo.sha[:24], "id": repo.repo_id, "author": repo.repo_id.split("/")[0],
                "sha": repo.sha, "lastModified": DATE, "createdAt": DATE, "private": False,
                "gated": gated, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "siblings": siblings}

    def _tree(self, record: Request, repo: _Repo, base: str, query: dict) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        expand = query.get("expand", ["false"])[0].lower() == "true"
        folders = _folders(repo)
        if base and base not in folders:
            if base in repo.files:
                self._json(record, [_tree_entry(repo, base, expand)])
            else:
                self._error(record, 404, "EntryNotFound", f"{base} does not exist on \"main\"",
                            {"X-Repo-Commit": repo.sha})
            return
        prefix = f"{base}/" if base else ""
        paths = sorted(p for p in (*repo.files, *folders) if p.startswith(prefix)
                       and (recursive or "/" not in p[len(prefix):]))
        start = int(query.get("cursor", ["0"])[0])
        page = paths[start:start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(paths):
            split = urlsplit(self.path)
            next_url = (f"{self.hub.url}{split.path}?recursive={recursive}&expand={expand}"
                        f"&cursor={start + self.hub.page_size}")
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._json(record, [_tree_entry(repo, p, expand) for p in page], headers)

    def _resolve(self, path: str) -> None:
        record = self._record()
        if self.hub.latency:
            time.sleep(self.hub.latency)
        repo_type = "model"
        for kind, prefix in URL_PREFIXES.items():
            if prefix and path.startswith(prefix):
                repo_type, path = kind, path[len(prefix):]
        parts = path.split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            self._error(record, 404, None, "Not found")
            return
        repo_id, revision, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        record.repo_type, record.repo_id, record.file = repo_type, repo_id, file
        repo = self._repo_or_error(record, repo_type, repo_id, revision)
        if repo is None or self._gate_error(record, repo):
            return
        if self._status_fault(record, "file", repo, file):
            return
        entry = repo.files.get(file)
        if entry is None:
            self._error(record, 404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": repo.sha})
            return
        if entry.sha256 is not None:  # LFS: redirect to the "CDN", as the hub does
            where = f"repo_type={repo.repo_type}&repo={quote(repo.repo_id)}&file={quote(file)}"
            headers = {"Location": f"{self.hub.url}/cdn-lfs/{entry.sha256}?{where}",
                       "X-Repo-Commit": repo.sha, "X-Linked-Etag": f'"{entry.sha256}"',
                       "X-Linked-Size": str(entry.size), "ETag": f'"{entry.blob_id}"',
                       "Accept-Ranges": "bytes"}
            self._send(record, 302, headers, f"Found. Redirecting to /cdn-lfs/{entry.sha256}".encode())
            return
        self._body(record, repo.folder / file, repo, file,
                   {"ETag": f'"{entry.blob_id}"', "X-Repo-Commit": repo.sha})

    def _cdn(self, sha256: str, query: dict) -> None:
        record = self._record()
        if self.hub.latency:
            time.sleep(self.hub.latency)
        repo_type = query.get("repo_type", ["model"])[0]
        repo_id, in_repo = query.get("repo", [""])[0], query.get("file", [""])[0]
        record.repo_type, record.repo_id, record.file = repo_type, repo_id, in_repo
        repo = self.hub._load(repo_type, repo_id) if repo_type in URL_PREFIXES else None
        entry = repo.files.get(in_repo) if repo is not None else None
        if entry is None or entry.sha256 != sha256:
            self._error(record, 404, None, "NoSuchKey")
            return
        if self._status_fault(record, "file", repo, in_repo):
            return
        self._body(record, repo.folder / in_repo, repo, in_repo, {"ETag": f'"{sha256}"'})

    def _throttle(self, n: int) -> None:
        """Wait for this chunk's turn on the shared link (server.bandwidth bytes/s)."""
        rate = self.hub.bandwidth
        if not rate:
            return
        with self.hub._lock:
            now = time.monotonic()
            start = max(now, self.hub._link_free_at)
            self.hub._link_free_at = start + n / rate
        if start + n / rate > now:
            time.sleep(start + n / rate - now)

    def _body(self, record: Request, file: Path, repo, in_repo: str, headers: dict) -> None:
        size = file.stat().st_size
        wanted = _parse_range(self.headers.get("Range"), size)
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "Last-Modified": email.utils.formatdate(usegmt=True)}
        if wanted == "bad":
            self._error(record, 416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{size}"})
            return
        start, end = (0, size - 1) if wanted is None else wanted
        length = max(end - start + 1, 0)
        status = 200 if wanted is None else 206
        if wanted is not None:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        record.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        fault = self.hub._take_fault(target="file", repo=repo, file=in_repo, method=self.command,
                                     kinds=("cut", "corrupt", "stall"))
        limit = min(fault.after_bytes, length) if fault and fault.kind in ("cut", "stall") else length
        sent = 0
        with open(file, "rb") as handle:
            handle.seek(start)
            while sent < limit:
                chunk = bytearray(handle.read(min(CHUNK, limit - sent)))
                if not chunk:
                    break
                if fault is not None and fault.kind == "corrupt" and sent <= fault.at < sent + len(chunk):
                    chunk[fault.at - sent] ^= 0xFF
                self._throttle(len(chunk))
                self.wfile.write(chunk)
                sent += len(chunk)
                record.body_bytes = sent
        if fault is not None and fault.kind == "stall":
            self.wfile.flush()
            self.hub.stalled.set()
            self.hub._release.wait()
        if fault is not None and fault.kind in ("cut", "stall") and sent < length:
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
