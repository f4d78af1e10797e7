"""Tag-driven selection against small generated sources with known answers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kxl_prep.schema import POSTS_SCHEMA, TAG_CATEGORIES
from kxl_prep.tags.rules import TagRule, TagExclusion, TagSelectionSpec, UnknownTagsError, parse_tag_selection
from kxl_prep.tags.select import TagIndex, seeded_cap, select_by_tags


def make_posts(rows: list[dict]) -> pd.DataFrame:
    """A posts table in POSTS_SCHEMA from {id, general, artist, ...} dicts."""
    n = len(rows)
    data = {
        "id": [r["id"] for r in rows],
        "created_at": ["2020-01-01T00:00:00.000+00:00"] * n,
        "year": [r.get("year", 2020) for r in rows],
        "rating": [r.get("rating", "general") for r in rows],
        "fav_count": [r.get("fav", 0) for r in rows],
        "score": [0] * n,
        "width": [1024] * n,
        "height": [1024] * n,
        "file_ext": ["jpg"] * n,
        "file_size": [1] * n,
        "md5": ["0" * 32] * n,
        "file_url": ["u"] * n,
        "is_deleted": [False] * n,
        "is_banned": [False] * n,
    }
    for cat in TAG_CATEGORIES:
        data[f"tags_{cat}"] = [r.get(cat, []) for r in rows]
    return pa.Table.from_pydict(data, schema=POSTS_SCHEMA).to_pandas()


POSTS = make_posts(
    [
        {"id": 10, "general": ["figure", "photo_(medium)", "1girl"], "artist": ["alpha"], "copyright": ["s1"]},
        {"id": 11, "general": ["figure"], "artist": ["beta"], "copyright": ["s2"]},
        {"id": 12, "general": ["photo_(medium)"], "artist": ["alpha", "gamma"]},
        {"id": 13, "general": ["1girl", "solo"], "artist": ["gamma"], "copyright": ["s1", "s2"]},
        {"id": 14, "general": ["figure", "photo_(medium)", "comic"], "copyright": ["s3"]},
        {"id": 15, "general": ["solo"], "artist": ["delta"], "character": ["c1"], "meta": ["photo_(medium)"]},
        {"id": 16, "general": [], "artist": [], "copyright": []},
    ]
)


def spec(rules, exclude=None, seed=0):
    table = {"rules": rules}
    if exclude:
        table["exclude"] = exclude
    return parse_tag_selection(table, base_dir=".", seed=seed)


def run(rules, exclude=None, seed=0, posts=POSTS):
    return select_by_tags(posts, spec(rules, exclude, seed), progress=False)


def test_artist_rule_matches_any_listed_artist_only_in_the_artist_column():
    r = run([{"name": "a", "artists": ["alpha", "delta"]}])
    assert r.ids.tolist() == [10, 12, 15]


def test_copyright_rule():
    r = run([{"name": "s", "copyrights": ["s2"]}])
    assert r.ids.tolist() == [11, 13]


def test_character_rule():
    r = run([{"name": "c", "characters": ["c1"]}])
    assert r.ids.tolist() == [15]


def test_all_of_expression_is_the_documented_figure_photo_rule():
    r = run([{"name": "fig", "all_of": ["photo (medium)", "Figure"]}])
    assert r.ids.tolist() == [10, 14]


def test_expression_tags_match_in_any_category():
    # 15 has photo_(medium) as a meta tag only
    r = run([{"name": "p", "any_of": ["photo_(medium)"]}])
    assert r.ids.tolist() == [10, 12, 14, 15]


def test_none_of_and_combined_keys_are_anded():
    r = run([{"name": "fig", "all_of": ["photo_(medium)", "figure"], "none_of": ["comic"]}])
    assert r.ids.tolist() == [10]
    r = run([{"name": "x", "artists": ["alpha", "gamma"], "copyrights": ["s1"]}])
    assert r.ids.tolist() == [10, 13]
    r = run([{"name": "x", "any_of": ["solo", "comic"], "copyrights": ["s1", "s3"]}])
    assert r.ids.tolist() == [13, 14]


def test_union_has_no_duplicates_and_keeps_per_rule_membership():
    r = run(
        [
            {"name": "a", "artists": ["alpha"]},
            {"name": "fig", "all_of": ["photo_(medium)", "figure"]},
            {"name": "s", "copyrights": ["s1"]},
        ]
    )
    assert r.ids.tolist() == [10, 12, 13, 14]
    membership = r.rule_membership()
    assert membership.tolist() == [
        [True, True, True],  # 10
        [True, False, False],  # 12
        [False, False, True],  # 13
        [False, True, False],  # 14
    ]
    assert POSTS["id"].to_numpy()[r.rows].tolist() == r.ids.tolist()


def test_exclusions_apply_to_every_rule_before_caps():
    r = run(
        [{"name": "a", "artists": ["alpha", "gamma"]}, {"name": "p", "any_of": ["photo_(medium)"]}],
        exclude={"tags": ["1girl"], "ids": [14]},
    )
    # 10 and 13 have 1girl; 14 excluded by id
    assert r.ids.tolist() == [12, 15]
    assert POSTS["id"].to_numpy()[r.excluded].tolist() == [10, 13, 14]
    # matched counts ignore exclusions, eligible counts apply them
    assert [int(o.matched.sum()) for o in r.rules] == [3, 4]
    assert [int(o.eligible.sum()) for o in r.rules] == [1, 2]
    r = run([{"name": "a", "artists": ["alpha", "gamma"], "cap": 2}], exclude={"artists": ["gamma"]})
    assert r.ids.tolist() == [10]  # the cap is filled from eligible posts only


def test_unknown_tag_is_refused_before_matching():
    with pytest.raises(UnknownTagsError, match="closest: alpha"):
        run([{"name": "a", "artists": ["alpah"]}])
    with pytest.raises(UnknownTagsError, match="exists as a copyright tag"):
        run([{"name": "a", "artists": ["s1"]}])


def test_null_and_empty_tag_lists_are_handled():
    posts = POSTS.copy()
    posts.at[6, "tags_general"] = None
    r = select_by_tags(posts, spec([{"name": "p", "any_of": ["solo"]}]), progress=False)
    assert r.ids.tolist() == [13, 15]


# ------------------------------------------------------------------ caps and determinism


def test_seeded_cap_follows_the_documented_pcg64_rule():
    ids = np.array([50, 10, 40, 20, 30, 60, 70], dtype=np.int64)
    rows = np.arange(len(ids))
    got = seeded_cap(rows, ids, 3, seed=123, rule_index=2)
    # independent statement of the rule: raw PCG64 words in id order, keep the 3 smallest
    words = np.random.PCG64(np.random.SeedSequence([123, 2])).random_raw(len(ids))
    by_id = np.argsort(ids)
    expected_ids = sorted(ids[by_id][np.argsort(words)[:3]].tolist())
    assert sorted(ids[got].tolist()) == expected_ids
    assert ids[got].tolist() == sorted(ids[got].tolist())  # returned in id order
    assert len(seeded_cap(rows, ids, 0, 1, 0)) == 0
    assert sorted(ids[seeded_cap(rows, ids, 99, 1, 0)].tolist()) == sorted(ids.tolist())


def test_caps_are_without_replacement_and_uniform():
    ids = np.arange(1000, 1020, dtype=np.int64)
    counts = np.zeros(len(ids))
    for seed in range(2000):
        got = seeded_cap(np.arange(len(ids)), ids, 5, seed, 0)
        assert len(np.unique(got)) == 5
        counts[got] += 1
    # each id should be drawn with probability 5/20: 500 +- a few standard deviations (~19)
    assert np.all(np.abs(counts - 500) < 100), counts


def generated_source(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    general = [f"g{i}" for i in range(30)] + ["figure", "photo_(medium)"]
    rows = []
    ids = rng.choice(10 * n, size=n, replace=False) + 1
    for i in range(n):
        rows.append(
            {
                "id": int(ids[i]),
                "general": list(rng.choice(general, size=rng.integers(0, 8), replace=False)),
                "artist": list(rng.choice([f"a{i}" for i in range(12)], size=rng.integers(0, 3), replace=False)),
                "copyright": list(rng.choice([f"s{i}" for i in range(6)], size=rng.integers(0, 3), replace=False)),
                "rating": ["general", "sensitive", "questionable", "explicit"][int(rng.integers(4))],
                "year": int(rng.integers(2005, 2025)),
            }
        )
    return make_posts(rows)


RULES = [
    {"name": "artists", "artists": ["a1", "a2", "a3"], "cap": 40},
    {"name": "series", "copyrights": ["s0", "s4"], "cap": 60},
    {"name": "figures", "all_of": ["figure", "photo_(medium)"], "none_of": ["g0"]},
    {"name": "mixed", "any_of": ["g5", "g6"], "copyrights": ["s2"], "cap": 10},
]


def test_same_seed_same_selection_whatever_the_row_order():
    posts = generated_source(600, seed=4)
    a = run(RULES, exclude={"tags": ["g7"]}, seed=99, posts=posts)
    shuffled = posts.sample(frac=1.0, random_state=1).reset_index(drop=True)
    b = run(RULES, exclude={"tags": ["g7"]}, seed=99, posts=shuffled)
    assert a.ids.tolist() == b.ids.tolist()
    for ra, rb in zip(a.rules, b.rules):
        assert sorted(posts["id"][ra.sampled]) == sorted(shuffled["id"][rb.sampled])
    c = run(RULES, exclude={"tags": ["g7"]}, seed=100, posts=posts)
    assert a.ids.tolist() != c.ids.tolist()


def test_arrow_table_input_gives_the_same_selection():
    posts = generated_source(300, seed=5)
    table = pa.Table.from_pandas(posts, schema=POSTS_SCHEMA, preserve_index=False)
    a = select_by_tags(posts, spec(RULES, seed=3), progress=False)
    b = select_by_tags(table, spec(RULES, seed=3), progress=False)
    assert a.ids.tolist() == b.ids.tolist()


def reference_selection(posts: pd.DataFrame, s: TagSelectionSpec):
    """Plain-Python statement of the rules (no index, no vectorization)."""
    ids = posts["id"].tolist()
    tags = [{c: set(posts[f"tags_{c}"].iloc[i] if posts[f"tags_{c}"].iloc[i] is not None else ()) for c in TAG_CATEGORIES} for i in range(len(posts))]
    every = [set().union(*t.values()) for t in tags]
    ex = s.exclude
    excluded = set()
    for i, pid in enumerate(ids):
        if (
            tags[i]["artist"] & set(ex.artists)
            or tags[i]["copyright"] & set(ex.copyrights)
            or tags[i]["character"] & set(ex.characters)
            or every[i] & set(ex.tags)
            or pid in set(ex.ids)
        ):
            excluded.add(pid)
    per_rule = []
    for rule in s.rules:
        hit = set()
        for i, pid in enumerate(ids):
            ok = True
            for key, cat in (("artists", "artist"), ("copyrights", "copyright"), ("characters", "character")):
                if getattr(rule, key) and not tags[i][cat] & set(getattr(rule, key)):
                    ok = False
            ok = ok and set(rule.all_of) <= every[i]
            ok = ok and (not rule.any_of or bool(every[i] & set(rule.any_of)))
            ok = ok and not every[i] & set(rule.none_of)
            if ok:
                hit.add(pid)
        per_rule.append((hit, hit - excluded))
    return excluded, per_rule


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 80),
    source_seed=st.integers(0, 10_000),
    seed=st.integers(0, 2**32 - 1),
    caps=st.lists(st.one_of(st.none(), st.integers(0, 30)), min_size=4, max_size=4),
    exclude_tag=st.sampled_from([None, "g1", "g2", "figure"]),
)
def test_matches_the_plain_python_reference(n, source_seed, seed, caps, exclude_tag):
    posts = generated_source(n, source_seed)
    rules = [dict(r, cap=c) if c is not None else {k: v for k, v in r.items() if k != "cap"} for r, c in zip(RULES, caps)]
    vocab = {t for col in ("tags_general", "tags_artist", "tags_copyright") for lst in posts[col] for t in lst}
    rules = [r for r in rules if all(t in vocab for k in ("artists", "copyrights", "all_of", "any_of", "none_of") for t in r.get(k, []))]
    if not rules:
        return
    exclude = {"tags": [exclude_tag]} if exclude_tag in vocab else None
    s = spec(rules, exclude, seed)
    result = select_by_tags(posts, s, progress=False)
    excluded, per_rule = reference_selection(posts, s)
    ids = posts["id"].to_numpy()
    assert set(ids[result.excluded].tolist()) == excluded
    union = set()
    for outcome, rule, (hit, eligible) in zip(result.rules, s.rules, per_rule):
        assert set(ids[outcome.matched].tolist()) == hit
        assert set(ids[outcome.eligible].tolist()) == eligible
        sampled = set(ids[outcome.sampled].tolist())
        assert sampled <= eligible
        assert len(sampled) == (len(eligible) if rule.cap is None else min(rule.cap, len(eligible)))
        union |= sampled
    assert result.ids.tolist() == sorted(union)


def test_index_vocabulary_and_dataclass_spec_interface():
    index = TagIndex.build(POSTS, progress=False)
    assert set(index.vocabulary()["artist"]) == {"alpha", "beta", "gamma", "delta"}
    s = TagSelectionSpec(rules=(TagRule(name="x", characters=("c1",)),), exclude=TagExclusion(), seed=0)
    assert select_by_tags(POSTS, s, index=index, progress=False).ids.tolist() == [15]


def test_chunked_encoding_and_lookup_give_the_same_answer(monkeypatch):
    import kxl_prep.tags.select as ts

    posts = generated_source(200, seed=8)
    whole = select_by_tags(posts, spec(RULES, seed=5), progress=False)
    monkeypatch.setattr(ts, "ENCODE_CHUNK_ROWS", 7)  # dictionaries differ per chunk, then unify
    monkeypatch.setattr(ts, "LOOKUP_CHUNK", 13)
    chunked = select_by_tags(posts, spec(RULES, seed=5), progress=False)
    assert chunked.ids.tolist() == whole.ids.tolist()
    for a, b in zip(whole.rules, chunked.rules):
        assert (a.matched == b.matched).all() and (a.sampled == b.sampled).all()


def test_duplicate_post_ids_are_refused():
    posts = pd.concat([POSTS, POSTS.iloc[:1]], ignore_index=True)
    with pytest.raises(ValueError, match="duplicate post ids"):
        TagIndex.build(posts, progress=False)


def test_dictionary_encoded_tag_columns_as_the_readers_give_them(monkeypatch):
    """kxl_prep.sources hands tag columns as ArrowDtype(list<dictionary<int32, string>>);
    dictionaries may hold names no post uses, repeat a name, or differ between chunks."""
    import kxl_prep.tags.select as ts

    posts = generated_source(120, seed=9)
    reference = select_by_tags(posts, spec(RULES, seed=2), progress=False)

    def as_dictionary_lists(series, seed):
        rng = np.random.default_rng(seed)
        lists = pa.array(series, type=pa.list_(pa.string()))
        names = sorted(set(pc_flat for pc_flat in lists.flatten().to_pylist()))
        dictionary = names + ["never_used_name"] + names[:3]  # unused and repeated names
        order = rng.permutation(len(dictionary))
        dictionary = [dictionary[i] for i in order]
        first = {}
        for i, name in enumerate(dictionary):
            first.setdefault(name, []).append(i)
        # point each value at a random one of its copies in the dictionary
        idx = [first[v][int(rng.integers(len(first[v])))] for v in lists.flatten().to_pylist()]
        values = pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32()), pa.array(dictionary))
        return pd.Series(
            pd.arrays.ArrowExtensionArray(pa.ListArray.from_arrays(lists.offsets, values)), index=series.index
        )

    converted = posts.copy()
    for k, cat in enumerate(TAG_CATEGORIES):
        converted[f"tags_{cat}"] = as_dictionary_lists(posts[f"tags_{cat}"], k)
    assert isinstance(converted["tags_general"].dtype, pd.ArrowDtype)
    index = TagIndex.build(converted, progress=False)
    assert "never_used_name" not in index.vocabulary()["general"]
    got = select_by_tags(converted, spec(RULES, seed=2), index=index, progress=False)
    assert got.ids.tolist() == reference.ids.tolist()
    # chunks whose dictionaries differ
    halves = pd.concat([converted.iloc[:60], converted.iloc[60:]])
    for cat in TAG_CATEGORIES:
        col = f"tags_{cat}"
        a = pa.array(as_dictionary_lists(posts[col].iloc[:60], 1))
        b = pa.array(as_dictionary_lists(posts[col].iloc[60:], 2))
        halves[col] = pd.Series(pd.arrays.ArrowExtensionArray(pa.chunked_array([a, b])), index=halves.index)
    monkeypatch.setattr(ts, "ENCODE_CHUNK_ROWS", 50)
    got = select_by_tags(halves, spec(RULES, seed=2), progress=False)
    assert got.ids.tolist() == reference.ids.tolist()


def test_null_names_inside_tag_lists_are_ignored():
    posts = POSTS.copy()
    posts["tags_artist"] = pd.Series(
        pd.arrays.ArrowExtensionArray(
            pa.array([["alpha", None], None, [None, "gamma"], ["gamma"], [], ["delta"], [None]], pa.list_(pa.string()))
        )
    )
    index = TagIndex.build(posts, progress=False)
    art = index.categories["artist"]
    assert art.lengths().tolist() == [1, 0, 1, 1, 0, 1, 0]
    r = select_by_tags(posts, spec([{"name": "a", "artists": ["gamma", "delta"]}]), index=index, progress=False)
    assert r.ids.tolist() == [12, 13, 15]


def test_readers_shared_dictionary_chunks_are_indexed_without_copying_codes():
    names = pa.array(["figure", "photo_(medium)", "solo", "unused"])
    chunks = []
    for idx, offs in (([0, 1, 2], [0, 2, 3]), ([2, 0, 1, 1], [0, 1, 4])):
        values = pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32()), names)
        chunks.append(pa.ListArray.from_arrays(pa.array(offs, pa.int32()), values))
    column = pa.chunked_array(chunks)
    index_cat = TagIndex.build(
        pa.table({"id": pa.array([1, 2, 3, 4]), **{f"tags_{c}": column for c in TAG_CATEGORIES}}), progress=False
    ).categories["general"]
    for seg, chunk in zip(index_cat.segments, chunks):
        assert seg.codes.ctypes.data == chunk.values.indices.buffers()[1].address  # the source's own buffer
    assert index_cat.lengths().tolist() == [2, 1, 1, 3]
    assert set(index_cat.code_of) == {"figure", "photo_(medium)", "solo"}
