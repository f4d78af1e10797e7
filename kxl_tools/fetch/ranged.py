"""Byte ranges of a file on the hub, through huggingface_hub's own URL, auth and retry code.

`hf_hub_url` builds the resolve address (HF_ENDPOINT honoured), `build_hf_headers` adds the
token (HF_TOKEN or the stored login), `http_backoff` (huggingface_hub's retry loop, on its
shared session) retries 429 / 5xx answers, timeouts, refused connections and bodies cut
short with exponential backoff, and `hf_raise_for_status` turns the rest into
huggingface_hub's errors (GatedRepoError, RepositoryNotFoundError, EntryNotFoundError...).
The hub answers a resolve of an LFS file with a redirect to its CDN (a signed address);
`resolve_location` asks for it once (a HEAD, not followed) and `get_range(location=...)`
then reads ranges from it directly, without the token (requests drops it on that redirect
too): one resolve per tar and reader instead of one per range, since the hub counts and
rate-limits resolves. A location that stops answering (expired: 401 / 403 / 404 / 410)
raises LocationExpired, and the reader resolves again. http_backoff does not read
Retry-After: a 429 waits the backoff's own time (base_wait, doubling, at most max_wait).
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
from huggingface_hub import hf_hub_url
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

RETRY_STATUS = (429, 500, 502, 503, 504)
RETRY_EXCEPTIONS = (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError)
CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
EXPIRED_STATUS = (401, 403, 404, 410)


class LocationExpired(OSError):
    """The signed CDN address of a file no longer answers: resolve it again."""


@dataclass(frozen=True)
class Retry:
    attempts: int = 8  # retries of one request before the unit gives up (a rerun resumes)
    base_wait: float = 1.0
    max_wait: float = 30.0
    timeout: float = 60.0  # seconds without a byte before a request is retried


@dataclass(frozen=True)
class HubFile:
    repo: str
    path: str
    repo_type: str = "dataset"
    revision: str = "main"  # a commit sha pins what every worker reads
    endpoint: str | None = None  # the hub the job planned against (a Ray node may not have HF_ENDPOINT)

    @property
    def url(self) -> str:
        return hf_hub_url(self.repo, self.path, repo_type=self.repo_type, revision=self.revision,
                          endpoint=self.endpoint)

    def __str__(self) -> str:
        return f"{self.repo}/{self.path}"


def _backoff(method: str, url: str, headers: dict, retry: "Retry", **kwargs):
    return http_backoff(method, url, headers=headers, max_retries=retry.attempts, base_wait_time=retry.base_wait,
                        max_wait_time=retry.max_wait, retry_on_exceptions=RETRY_EXCEPTIONS,
                        retry_on_status_codes=RETRY_STATUS, timeout=retry.timeout, **kwargs)


def resolve_location(file: "HubFile", retry: "Retry" = None) -> str | None:
    """Where the hub sends reads of `file` (its CDN's signed address), or None when the hub
    serves it itself (a regular git file) or redirects within itself (a renamed repository)."""
    retry = retry or Retry()
    response = _backoff("HEAD", file.url, build_hf_headers(), retry, allow_redirects=False)
    hf_raise_for_status(response)
    location = response.headers.get("Location") if 300 <= response.status_code < 400 else None
    if not location:
        return None
    location = urljoin(file.url, location)
    return None if urlsplit(location).netloc == urlsplit(file.url).netloc and "/resolve/" in location else location


def get_range(file: HubFile, start: int, end: int, retry: Retry = Retry(), location: str | None = None) -> bytes:
    """Bytes [start, end) of `file` (read from `location` when given); fewer when the file ends
    first (none past its end)."""
    if end <= start:
        return b""
    if location is None:
        url, headers = file.url, build_hf_headers()
    else:
        url, headers = location, {}  # a signed address: the token stays with the hub
    headers["Range"] = f"bytes={start}-{end - 1}"
    response = _backoff("GET", url, headers, retry)
    if response.status_code == 416:
        return b""
    if location is not None and response.status_code in EXPIRED_STATUS:
        raise LocationExpired(f"{file}: its CDN address answered {response.status_code}")
    hf_raise_for_status(response)
    data = response.content
    if response.status_code == 200:  # a server that ignores Range sends the whole file
        return data[start:end]
    match = CONTENT_RANGE_RE.match(response.headers.get("Content-Range", ""))
    if match is None or int(match.group(1)) != start:
        raise OSError(f"{file}: asked for bytes {start}-{end - 1}, the answer's Content-Range is "
                      f"{response.headers.get('Content-Range')!r}")
    return data[: end - start]


class RangedFile(io.RawIOBase):
    """A read-only, seekable file over ranged reads (for tarfile, reading only headers).

    Each read past the buffer fetches at least `block` bytes, so the headers of small members
    come with one request per several members."""

    def __init__(self, file: HubFile, size: int, retry: Retry = Retry(), block: int = 256 << 10):
        super().__init__()
        self.file, self.size, self.retry, self.block = file, size, retry, block
        self.pos = 0
        self._buf_start, self._buf = 0, b""
        self.requests = 0
        self.bytes_read = 0
        self._location: str | None = None
        self._resolved = False

    def _get(self, start: int, end: int) -> bytes:
        """A range, from the tar's CDN address (resolved once; again when it expires)."""
        for again in (False, True):
            if again or not self._resolved:
                self._location, self._resolved = resolve_location(self.file, self.retry), True
            try:
                return get_range(self.file, start, end, self.retry, self._location)
            except LocationExpired:
                if again:
                    raise
        raise AssertionError("unreachable")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        n = min(n, max(self.size - self.pos, 0))
        if n == 0:
            return b""
        lo, hi = self.pos - self._buf_start, self.pos - self._buf_start + n
        if not (0 <= lo and hi <= len(self._buf)):
            self._buf_start = self.pos
            self._buf = self._get(self.pos, min(self.size, self.pos + max(n, self.block)))
            self.requests += 1
            self.bytes_read += len(self._buf)
            lo, hi = 0, n
        data = self._buf[lo:hi]
        self.pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
