"""created_at in every style real dumps use; the year is the one written in the record."""
from __future__ import annotations

import datetime as dt
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from kxl_prep.sources import read_posts
from kxl_prep.sources.records import _dates


def _record(pid, created):
    return {"id": pid, "created_at": created, "rating": "g", "fav_count": 1, "score": 1,
            "image_width": 10, "image_height": 10, "file_ext": "jpg", "file_size": 1,
            "md5": "a", "file_url": "u", "is_deleted": False, "is_banned": False,
            "tag_string_general": "smile"}


ACCEPTED = {  # text -> year in the record's own offset
    "2013-03-21 23:01:00.000 UTC": 2013,  # older danbooru20xx exports
    "2005-05-24 03:35:31 UTC": 2005,
    "2024-05-19T01:30:25.096-04:00": 2024,  # the API
    "2024-05-19T01:30:25-0400": 2024,
    "2010-12-31T23:30:00.000-05:00": 2010,  # 2011 in UTC, 2010 where it was posted
    "2011-01-01T00:30:00+09:00": 2011,
    "2019-07-01T00:00:00Z": 2019,
    "2019-07-01 00:00:00.123456Z": 2019,
    "2019-07-01 00:00:00+08": 2019,
    "2019-07-01T12:00": 2019,  # no zone: UTC
    "2019-07-01 12:00:00": 2019,
    "2019-07-01": 2019,
    "2016-12-31T23:59:60Z": 2016,  # a leap second
    "2020-02-29 10:00:00 UTC": 2020,
}
REJECTED = (
    "yesterday", "31/12/2010", "2013-03-21 23:01:00.000 GMT", "2013-03-21T25:00:00Z",
    "2013-03-21T23:61:00Z", "2013-03-21T23:01:00+25:00", "2013-13-01 00:00:00 UTC",
    "2021-02-29 10:00:00 UTC", "2013-03-21UTC", "2013-03-21T23:01:00.000UTC ", "",
)


def test_known_answers_through_the_reader(tmp_path):
    texts = list(ACCEPTED) + list(REJECTED)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(_record(i + 1, t)) + "\n" for i, t in enumerate(texts)))
    res = read_posts([path], progress=False)
    got = dict(zip(res.posts["created_at"], res.posts["year"]))
    assert got == ACCEPTED  # kept as written, with the year of its own offset
    rejected = res.rejects.set_index("record")
    assert len(rejected) == len(REJECTED)
    for k, text in enumerate(REJECTED, start=len(ACCEPTED) + 1):
        assert rejected.loc[str(k), "field"] == "created_at"
        assert rejected.loc[str(k), "reason"] == ("missing" if text == "" else f"not an ISO 8601 date: {text!r}")


_zones = st.one_of(st.just(""), st.just("Z"), st.just(" UTC"),
                   st.builds(lambda sign, h, m, colon: f"{sign}{h:02d}{':' if colon else ''}{m:02d}",
                             st.sampled_from("+-"), st.integers(0, 14), st.sampled_from([0, 30, 45]),
                             st.booleans()))


@settings(max_examples=300, deadline=None)
@given(st.datetimes(min_value=dt.datetime(1000, 1, 1), max_value=dt.datetime(9999, 12, 31)),
       st.sampled_from(["T", " "]), st.sampled_from([None, 0, 3, 6]), _zones)
def test_every_well_formed_date_is_accepted_with_its_written_year(when, sep, digits, zone):
    text = when.strftime(f"%Y-%m-%d{sep}%H:%M:%S")
    if digits is not None and digits > 0:
        text += "." + f"{when.microsecond:06d}"[:digits]
    text += zone
    _, year, bad = _dates([text])
    assert bad == {} and int(year[0]) == when.year
