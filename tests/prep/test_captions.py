"""Captions: the vectorized builder against a plain per-post reading of the card's rules,
and the caption format against sd-scripts' own process_caption (gated)."""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kxl_prep.captions import build_captions
from kxl_prep.recipe import CaptionSpec, QualitySpec
from kxl_prep.schema import RATINGS

SPEC = CaptionSpec()
LABELS = QualitySpec().labels
LIST = pa.list_(pa.string())
CATS = ("general", "character", "copyright", "artist", "meta")

PEOPLE_ORDER = (
    "1girl 2girls 3girls 4girls 5girls 6+girls multiple_girls "
    "1boy 2boys 3boys 4boys 5boys 6+boys multiple_boys "
    "1other 2others 3others 4others 5others 6+others multiple_others"
).split()
NOISE = ("(medium)", "commentary", "bad", "translat", "request", "mismatch", "revision", "audio", "video")
RATING_WORDS = {"general": "safe", "sensitive": "sensitive", "questionable": "nsfw", "explicit": "nsfw, explicit"}


def reference_caption(post: dict) -> str:
    """The card's rules applied to one post, written independently of kxl_prep.captions."""

    def show(tag):
        return (tag if len(tag) <= 3 else tag.replace("_", " ")).strip()

    def ok(tag):
        return show(tag) != "" and tag != "banned_artist" and "|||" not in tag and "\n" not in tag and "\r" not in tag

    general = [t for t in post["general"] if ok(t)]
    people = sorted((t for t in general if t in PEOPLE_ORDER), key=PEOPLE_ORDER.index)
    rest = [t for t in general if t not in PEOPLE_ORDER]
    prefix = people + [t for c in ("character", "copyright", "artist") for t in post[c] if ok(t)]
    meta = [t for t in post["meta"] if ok(t) and not any(k in t for k in NOISE)]
    year = post["year"]
    if year < 0:
        year_tag = []
    elif year <= 2010:
        year_tag = ["old"]
    elif year <= 2014:
        year_tag = ["early"]
    elif year <= 2017:
        year_tag = ["mid"]
    elif year <= 2020:
        year_tag = ["recent"]
    else:
        year_tag = ["newest"]
    suffix = [LABELS[post["quality"]]] + year_tag + [show(t) for t in meta] + [RATING_WORDS[post["rating"]]]
    sections = [", ".join(show(t) for t in prefix), ", ".join(show(t) for t in rest), ", ".join(suffix)]
    return " ".join(x for x in (sections[0], "|||", sections[1], "|||", sections[2]) if x)


def run(posts: list[dict], spec: CaptionSpec = SPEC, chunk_rows: int = 7) -> list[str]:
    table = pa.table({f"tags_{c}": pa.array([p[c] for p in posts], LIST) for c in CATS})
    captions, _ = build_captions(
        table,
        np.array([p["quality"] for p in posts], dtype=np.int8),
        np.array([RATINGS.index(p["rating"]) for p in posts]),
        np.array([p["year"] for p in posts]),
        spec,
        LABELS,
        chunk_rows=chunk_rows,
        progress=False,
    )
    return captions.to_pylist()


def post(**kw):
    base = {c: [] for c in CATS}
    base.update(rating="general", year=2020, quality=3)
    base.update(kw)
    return base


def test_card_example():
    p = post(
        general=["smile", "1boy", "long_hair", "2girls", "^_^", "o_o", "multiple_girls"],
        character=["hatsune_miku"],
        copyright=["vocaloid"],
        artist=["banned_artist", "some_artist"],
        meta=["highres", "commentary_request", "bad_id", "absurdres", "photo_(medium)"],
        rating="explicit",
        year=2012,
        quality=0,
    )
    assert run([p]) == [
        "2girls, multiple girls, 1boy, hatsune miku, vocaloid, some artist ||| smile, long hair, ^_^, o_o"
        " ||| masterpiece, early, highres, absurdres, nsfw, explicit"
    ]


@pytest.mark.parametrize(
    "year,tag", [(2005, "old"), (2010, "old"), (2011, "early"), (2014, "early"), (2015, "mid"),
                 (2017, "mid"), (2018, "recent"), (2020, "recent"), (2021, "newest"), (2024, "newest")]
)
def test_year_bins(year, tag):
    assert run([post(year=year)])[0].endswith(f"||| good quality, {tag}, safe")


@pytest.mark.parametrize("rating", RATINGS)
def test_rating_words(rating):
    assert run([post(rating=rating)])[0] == f"||| ||| good quality, recent, {RATING_WORDS[rating]}"


def test_empty_sections_stay_well_formed():
    got = run([post(), post(general=["ab_c"]), post(artist=["xy_z"]), post(year=-1)])
    assert got == [
        "||| ||| good quality, recent, safe",
        "||| ab c ||| good quality, recent, safe",
        "xy z ||| ||| good quality, recent, safe",
        "||| ||| good quality, safe",
    ]
    for c in got:
        assert ", ," not in c and not c.endswith(",") and "  " not in c


def test_configurable_rules():
    spec = CaptionSpec(meta_noise=("foo",), drop_tags=(), keep_underscores_max_len=0)
    p = post(meta=["foo_bar", "bad_id"], artist=["banned_artist"], general=["^_^"])
    assert run([p], spec) == ["banned artist ||| ^ ^ ||| good quality, recent, bad id, safe"]


tag_names = st.one_of(
    st.sampled_from(PEOPLE_ORDER + ["banned_artist", "^_^", "o_o", "a_b", "", " ", "x|||y", "bad_id", "____", "_a_b_", "line\nbreak",
                                    "commentary_request", "photo_(medium)", "highres", "long_hair"]),
    st.text(alphabet="ab_c()^:,'\"\\é", min_size=1, max_size=8),
)
posts_strategy = st.lists(
    st.builds(
        lambda g, ch, co, ar, me, r, y, q: post(general=g, character=ch, copyright=co, artist=ar, meta=me,
                                                rating=r, year=y, quality=q),
        *[st.lists(tag_names, max_size=8) for _ in CATS],
        st.sampled_from(RATINGS),
        st.one_of(st.just(-1), st.integers(2000, 2030)),
        st.integers(0, 6),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(posts=posts_strategy, chunk=st.integers(1, 9))
def test_matches_reference_rules(posts, chunk):
    assert run(posts, chunk_rows=chunk) == [reference_caption(p) for p in posts]


def parse_like_sd_scripts(caption: str, sep="|||"):
    """sd-scripts v0.10.1 process_caption's section split (shuffle/dropout aside)."""
    fixed, flex = caption.split(sep, 1)
    suffix = ""
    if sep in flex:
        flex, suffix = flex.split(sep, 1)
    tok = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    return tok(fixed), tok(flex), tok(suffix)


@settings(max_examples=100, deadline=None)
@given(posts=posts_strategy)
def test_sections_survive_sd_scripts_split(posts):
    for p, caption in zip(posts, run(posts)):
        ref = reference_caption(p)
        prefix, middle, suffix = parse_like_sd_scripts(caption)
        # a tag holding a comma splits into pieces at train time; compare at that granularity
        sections = ref.replace("|||", "\0").split("\0")
        expect = [[t.strip() for t in s.split(",") if t.strip()] for s in sections]
        assert [prefix, middle, suffix] == expect


# ---- against sd-scripts' process_caption ----------------------------------------------------


@pytest.mark.sdscripts
def test_process_caption_keeps_prefix_and_suffix(train_util):
    subset = SimpleNamespace(
        caption_prefix=None, caption_suffix=None, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
        enable_wildcard=False, shuffle_caption=True, token_warmup_step=0, token_warmup_min=1,
        caption_tag_dropout_rate=0.15, keep_tokens_separator="|||", caption_separator=",", keep_tokens=0,
        secondary_separator=None,
    )
    dataset = SimpleNamespace(current_epoch=1, current_step=0, max_train_steps=100, replacements={})
    cases = [
        post(general=["1girl", "smile", "long_hair", "a", "b", "c"], character=["c_1"], meta=["highres"], rating="explicit"),
        post(general=["smile", "long_hair"], rating="questionable", year=-1),  # empty prefix
        post(general=["1girl"], artist=["x_y"]),  # empty middle
        post(),  # both empty
    ]
    random.seed(0)
    for p, caption in zip(cases, run(cases)):
        prefix, middle, suffix = parse_like_sd_scripts(caption)
        for _ in range(50):
            out = train_util.BaseDataset.process_caption(dataset, subset, caption)
            tokens = out.split(", ")
            assert tokens[: len(prefix)] == prefix
            assert tokens[len(tokens) - len(suffix):] == suffix
            mid = tokens[len(prefix): len(tokens) - len(suffix)]
            assert set(mid) <= set(middle) and len(mid) == len(set(mid))
            assert "|||" not in out and "" not in tokens


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5),
    data=st.data(),
)
def test_chunked_tag_columns_are_read_by_position(sizes, data):
    from kxl_prep.captions import _take_chunked

    rows = [[f"t{i}_{j}" for j in range(i % 3)] for i in range(sum(sizes))]
    chunks, start = [], 0
    for size in sizes:
        chunks.append(pa.array(rows[start:start + size], LIST))
        start += size
    column = pa.chunked_array(chunks, LIST)
    n = len(rows)
    positions = np.array(data.draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=20) if n else st.just([])),
                         dtype=np.int64)
    assert _take_chunked(column, positions).to_pylist() == [rows[p] for p in positions]


def test_stats_count_empty_sections_and_drops():
    posts = [post(), post(general=["1girl"]), post(general=["smile"], meta=["bad_id", "highres"]),
             post(artist=["banned_artist"])]
    table = pa.table({f"tags_{c}": pa.array([p[c] for p in posts], LIST) for c in CATS})
    _, stats = build_captions(table, np.zeros(4, np.int8), np.zeros(4, int), np.full(4, 2020), SPEC, LABELS,
                              progress=False)
    assert stats.to_dict() == {"dropped_tags": {"drop_tags": 1, "meta_noise": 1}, "empty_prefix": 3,
                               "empty_middle": 3}
