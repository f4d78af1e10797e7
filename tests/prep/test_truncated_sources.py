"""A source cut short (a partial download) stops the run with its path, plain or gzip-compressed;
a bad line in the middle stays one reject."""
from __future__ import annotations

import gzip
import json

import pytest

from kxl_prep.sources import SourceError, read_posts

POST = {"id": 1, "created_at": "2020-01-01T00:00:00.000-05:00", "rating": "g", "image_width": 100,
        "image_height": 100, "file_ext": "png", "file_size": 1000, "md5": "0" * 32, "fav_count": 1, "score": 1, "tag_string_general": "smile",
        "tag_string_artist": "", "tag_string_character": "", "tag_string_copyright": "", "tag_string_meta": ""}


def lines(n: int) -> bytes:
    return b"".join(json.dumps(dict(POST, id=i + 1)).encode() + b"\n" for i in range(n))


def test_a_truncated_jsonl_is_refused_naming_the_line(tmp_path):
    data = lines(5)
    path = tmp_path / "posts.jsonl"
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(SourceError, match=r"posts\.jsonl: line 5 ends the file in the middle of a record"):
        read_posts([path], progress=False)


def test_a_bad_line_inside_is_one_reject(tmp_path):
    path = tmp_path / "posts.jsonl"
    path.write_bytes(lines(2) + b"{not json\n" + lines(1).replace(b'"id": 1', b'"id": 9'))
    res = read_posts([path], progress=False)
    assert len(res.posts) == 3 and len(res.rejects) == 1


def test_a_truncated_gzip_is_refused(tmp_path):
    packed = gzip.compress(lines(200))
    path = tmp_path / "posts.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(SourceError, match=r"posts\.jsonl\.gz: the compressed file is truncated or corrupt"):
        read_posts([path], progress=False)
