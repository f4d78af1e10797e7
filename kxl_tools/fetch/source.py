"""A unit's member bytes by range requests (the export's MemberSource for a tar on the hub).

The unit's members are coalesced into ranges (kxl_tools.fetch.coalesce); up to
`concurrency` ranges are in flight at once and a window of `concurrency + 1` is fetched
ahead of the image processing; members come out in offset order, as the export reads them.
Every member is checked against the index: its size, and its sha256 where the index has
one. A member that fails is read again on its own (bytes damaged on the way); one that
still fails after `verify_attempts` reads means the index disagrees with the tar, and the
unit stops with an error naming both (nothing of it is written; the other units go on).
A member past the tar's end comes out as EOFError, which the export rejects as
`shard_truncated`, as it does for a short local tar. The tar's CDN address is resolved once
per reader (kxl_tools.fetch.ranged), again only when it expires.
"""
from __future__ import annotations

import hashlib
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kxl_tools.fetch.coalesce import DEFAULT_MAX_GAP, DEFAULT_MAX_SPAN, Range, coalesce
from kxl_tools.fetch.hub_index import IndexMismatch
from kxl_tools.fetch.ranged import HubFile, LocationExpired, Retry, get_range, resolve_location


@dataclass(frozen=True)
class HubTarSource:
    file: HubFile
    sha256: dict = field(default_factory=dict)  # post id -> hex digest (posts without one: size only)
    max_gap: int = DEFAULT_MAX_GAP
    max_span: int = DEFAULT_MAX_SPAN
    concurrency: int = 4
    retry: Retry = Retry()
    verify_attempts: int = 3

    def open(self) -> "HubTarReader":
        return HubTarReader(self)


class HubTarReader:
    def __init__(self, source: HubTarSource):
        self.source = source
        self._pool = ThreadPoolExecutor(max(1, source.concurrency), thread_name_prefix="kxl-fetch")
        self._lock = threading.Lock()
        self._location: str | None = None
        self._resolved = False
        self.resolves = 0

    def _where(self, again: bool = False) -> str | None:
        with self._lock:
            if again or not self._resolved:
                self._location = resolve_location(self.source.file, self.source.retry)
                self._resolved = True
                self.resolves += 1
            return self._location

    def _get(self, start: int, end: int) -> bytes:
        try:
            return get_range(self.source.file, start, end, self.source.retry, self._where())
        except LocationExpired:
            return get_range(self.source.file, start, end, self.source.retry, self._where(again=True))

    def __enter__(self) -> "HubTarReader":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def read_members(self, posts):
        src = self.source
        pending = iter(coalesce(posts, src.max_gap, src.max_span))
        window: deque = deque()

        def submit_next() -> None:
            r = next(pending, None)
            if r is not None:
                window.append(self._pool.submit(self._fetch_checked, r))

        for _ in range(max(1, src.concurrency) + 1):
            submit_next()
        while window:
            members = window.popleft().result()
            submit_next()
            yield from members

    def _fetch_checked(self, r: Range) -> list:
        src = self.source
        data = self._get(r.start, r.end)
        out, bad = {}, []
        for post in r.members:
            got = data[post.offset - r.start: post.offset - r.start + post.size]
            problem = self._problem(post, got)
            if problem == "short":
                out[post.id] = (post, EOFError(f"{src.file}: wanted {post.size} bytes at offset {post.offset}, "
                                               f"got {len(got)} (tar truncated?)"))
            elif problem:
                bad.append(post)
            else:
                out[post.id] = (post, got)
        for post in bad:  # read again on its own
            out[post.id] = (post, self._reread(post))
        return [out[p.id] for p in r.members]

    def _problem(self, post, got: bytes) -> str:
        if len(got) < post.size:
            return "short"
        expected = self.source.sha256.get(post.id)
        if expected and hashlib.sha256(got).hexdigest() != expected:
            return "sha256"
        return ""

    def _reread(self, post):
        src = self.source
        digest = ""
        for _ in range(max(1, src.verify_attempts - 1)):
            got = self._get(post.offset, post.offset + post.size)
            problem = self._problem(post, got)
            if not problem:
                return got
            if problem == "short":
                return EOFError(f"{src.file}: wanted {post.size} bytes at offset {post.offset}, got {len(got)}")
            digest = hashlib.sha256(got).hexdigest()
        raise IndexMismatch(
            f"{src.file}: member {post.member!r} (post {post.id}, {post.size} bytes at offset {post.offset}): "
            f"sha256 {digest}, the index says {src.sha256.get(post.id)} ({src.verify_attempts} reads): "
            "the index disagrees with the tar")
