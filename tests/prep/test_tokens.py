"""Caption tokens against the budget (kxl_prep.tokens): the vectorized count against
transformers' CLIPTokenizer (the tokenizer sd-scripts loads) on the text sd-scripts'
process_caption builds, the sample's interval against the true share, and prepare's
manifest, report, plot and warning."""
from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from kxl_prep.pipeline import prepare
from kxl_prep.recipe import RecipeError, load_recipe, recipe_from_dict
from kxl_prep.schema import POSTS_SCHEMA, RATINGS
from kxl_prep.tokens import BudgetSpec, TokenCounter, budget_summary, load_tokenizer, wilson_interval

# tag shapes that tokenize differently: words, names with brackets (")," can be one token),
# emoticons, digits, non-ASCII (ftfy: full-width, curly quotes; accents), an HTML entity
TAGS = ["smile", "long hair", "hatsune miku", "pokemon (game)", "^_^", ">_<", "o_o", ":d", "2000s (style)",
        "1girl", "café", "ｆｕｌｌ ｗｉｄｔｈ", "“quoted”", "rock &amp; roll", "star (symbol)", "♥", "日本",
        "nsfw", "masterpiece", "best quality", "newest", "absurdres", "x-ray", "what's this?", "a,b"]


@pytest.fixture(scope="module")
def clip_slow(tmp_path_factory):
    """transformers' CLIPTokenizer from the open-clip vocabulary: what sd-scripts tokenizes with."""
    pytest.importorskip("transformers")
    pytest.importorskip("ftfy")
    from transformers import CLIPTokenizer

    from kxl_common.clip_tokenizer import make_tokenizer_cache

    cache = make_tokenizer_cache(tmp_path_factory.mktemp("tok"))
    return CLIPTokenizer.from_pretrained(str(cache / "openai_clip-vit-large-patch14"))


@pytest.fixture(scope="module")
def fast():
    return load_tokenizer()


def slow_count(tokenizer, text: str) -> int:
    return len(tokenizer(text).input_ids) - 2  # BOS, EOS


def process_caption_split(caption: str):
    """sd-scripts v0.10.1 process_caption's sections (its code, read, not imported)."""
    fixed, flex = caption.split("|||", 1)
    flex, suffix = flex.split("|||", 1)
    tok = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    return tok(fixed), tok(flex), tok(suffix)


def layout(prefix, general, suffix) -> str:
    return " ".join(x for x in (", ".join(prefix), "|||", ", ".join(general), "|||", ", ".join(suffix)) if x)


caption_parts = st.tuples(st.lists(st.sampled_from(TAGS), max_size=4), st.lists(st.sampled_from(TAGS), max_size=30),
                          st.lists(st.sampled_from(TAGS), min_size=1, max_size=5))


def count(captions: list[str], tokenizer, **spec) -> TokenCounter:
    counter = TokenCounter(len(captions), BudgetSpec(**{"sample": 0, **spec}), tokenizer=tokenizer)
    arr = pa.array(captions, pa.large_string())
    for start in range(0, len(captions), 7):  # several chunks, one offset slice each
        counter.add(start, arr.slice(start, 7))
    return counter


@settings(max_examples=40, deadline=None)
@given(parts=st.lists(caption_parts, min_size=1, max_size=12), seed=st.integers(0, 2**16))
def test_counts_are_sd_scripts_tokens_in_any_shuffle(clip_slow, fast, parts, seed):
    captions = [layout(*p) for p in parts]
    counter = count(captions, fast, tag_dropout_rate=0.0)
    shuffle = random.Random(seed)
    for caption, total, suffix in zip(captions, np.concatenate(counter.total), np.concatenate(counter.suffix)):
        prefix, general, fixed_suffix = process_caption_split(caption)
        shuffle.shuffle(general)  # the worst case is order-free: the count holds for any shuffle
        assert total == slow_count(clip_slow, ", ".join(prefix + general + fixed_suffix))
        # the suffix starts after the prefix and general tags and their commas (the pieces tokenize
        # as in the whole text unless ftfy would unescape an entity in one and not in the other)
        head = ", ".join(prefix + general) + ("," if prefix + general else "")
        if not ("<" in caption and "&" in caption):
            assert total - suffix == (slow_count(clip_slow, head) if prefix + general else 0)


@settings(max_examples=20, deadline=None)
@given(parts=st.lists(caption_parts, min_size=1, max_size=10), seed=st.integers(0, 2**16),
       rate=st.sampled_from([0.15, 0.5]))
def test_dropout_draw_counts_the_kept_tags(clip_slow, fast, parts, seed, rate):
    """One draw per general tag, in caption order, kept when random() >= rate (process_caption)."""
    captions = [layout(*p) for p in parts]
    counter = count(captions, fast, tag_dropout_rate=rate, seed=seed)
    rng = np.random.default_rng([seed, 0xD807])
    expected = []
    for start in range(0, len(captions), 7):
        chunk = [process_caption_split(c) for c in captions[start:start + 7]]
        keep = rng.random(sum(len(g) for _, g, _ in chunk)) >= rate
        for prefix, general, suffix in chunk:
            kept, keep = [t for t, k in zip(general, keep) if k], keep[len(general):]
            expected.append(slow_count(clip_slow, ", ".join(prefix + kept + suffix)))
    assert np.concatenate(counter.dropped).tolist() == expected


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10_000), data=st.data())
def test_wilson_interval_solves_the_score_equation(n, data):
    hits = data.draw(st.integers(0, n))
    lo, hi = wilson_interval(hits, n)
    p, z = hits / n, 1.959963984540054
    assert lo <= p <= hi
    for bound in (lo, hi):  # |p - bound| = z * sqrt(bound (1 - bound) / n), unless clipped at 0 or 1
        if 0 < bound < 1:
            assert abs(abs(p - bound) - z * np.sqrt(bound * (1 - bound) / n)) < 1e-9
    assert wilson_interval(hits, n, population=n) == (p, p)  # everything counted: no error bar
    if n > 1:
        flo, fhi = wilson_interval(hits, n, population=10 * n)
        assert lo - 1e-12 <= flo and fhi <= hi + 1e-12  # finite population: narrower


def test_sample_interval_covers_the_true_share(fast):
    """Seeded samples of 150 of 2,000 captions (budget 75): the 95% interval holds the share counted over all
    of them in about 95% of the seeds (>= 90% of 200 asserted; the seeds are fixed)."""
    rng = np.random.default_rng(7)
    words = [f"{a} {b}" for a in ("red", "blue", "long", "short", "open") for b in ("hair", "eyes", "mouth", "skirt")]
    captions = [layout(["1girl"], list(rng.choice(words, rng.integers(10, 35))), ["masterpiece", "newest", "safe"])
                for _ in range(2000)]
    full = count(captions, fast, max_token_length=75)
    truth = full.result()
    assert not truth["sampled"] and truth["suffix_cut"]["ci95"][0] == truth["suffix_cut"]["ci95"][1]
    share = truth["suffix_cut"]["share"]
    assert 0.2 < share < 0.8  # the budget cuts through the distribution
    totals = np.concatenate(full.total)
    covered = 0
    for seed in range(200):
        sampled = TokenCounter(2000, BudgetSpec(max_token_length=75, sample=150, seed=seed), tokenizer=fast)
        arr = pa.array(captions, pa.large_string())
        for start in range(0, 2000, 512):
            sampled.add(start, arr.slice(start, 512))
        result = sampled.result()
        assert result["sampled"] and result["counted"] == 150
        # the sampled captions' counts are those of the full count at the sampled rows
        assert np.array_equal(np.concatenate(sampled.total), totals[sampled.rows])
        lo, hi = result["suffix_cut"]["ci95"]
        covered += lo <= share <= hi
    assert covered >= 180


def test_summary_counts_and_histogram():
    total = np.array([10, 75, 76, 150, 151, 225, 226, 300])
    suffix = np.array([5, 5, 5, 80, 10, 10, 1, 100])
    s = budget_summary(total, suffix, total - 2, BudgetSpec(max_token_length=150), population=8)
    assert s["suffix_cut"]["count"] == 4  # 151, 225, 226, 300
    assert s["suffix_wholly_lost"]["count"] == 3  # 225 - 10, 226 - 1, 300 - 100 >= 150; 151 - 10 < 150
    assert s["with_dropout"]["count"] == 3  # 149, 223, 224, 298
    assert s["length"]["over"] == {"75": 6, "150": 4, "225": 2}
    edges, counts = s["histogram"]["edges"], s["histogram"]["counts"]
    assert sum(counts) == 8 and 76 in edges and 151 in edges and 226 in edges  # budgets end bins
    assert counts[edges.index(151) - 1] == 1 and counts[edges.index(151)] == 1  # 150 | 151


# ---- prepare -------------------------------------------------------------------------------------


def posts_with_lengths(n_general: list[int]) -> pd.DataFrame:
    words = [f"{a}_{b}" for a in ("red", "blue", "long", "short", "open", "black") for b in ("hair", "eyes", "skirt")]
    words += [f"extra_{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    n = len(n_general)
    data = {
        "id": np.arange(1, n + 1, dtype=np.int64) * 1000, "created_at": ["2020-03-01T10:00:00.000-05:00"] * n,
        "year": np.full(n, 2020, np.int16), "rating": [RATINGS[i % 4] for i in range(n)],
        "fav_count": np.arange(n, dtype=np.int64), "score": np.zeros(n, np.int64),
        "width": np.full(n, 1024, np.int32), "height": np.full(n, 1024, np.int32), "file_ext": ["png"] * n,
        "file_size": np.full(n, 1000), "md5": ["0" * 32] * n, "file_url": ["https://cdn.example/x"] * n,
        "is_deleted": np.zeros(n, bool), "is_banned": np.zeros(n, bool),
        "tags_general": [["1girl", *words[:k]] for k in n_general], "tags_artist": [["some_artist"]] * n,
        "tags_character": [[]] * n, "tags_copyright": [[]] * n, "tags_meta": [["highres"]] * n,
    }
    return pa.Table.from_pydict(data, schema=POSTS_SCHEMA).to_pandas()


@pytest.fixture()
def long_posts():
    return posts_with_lengths([2, 5, 10, 20, 30, 40, 50] * 6)


def independent_counts(out_dir, tokenizer) -> list[int]:
    meta = json.loads((out_dir / "meta.json").read_text())
    return [slow_count(tokenizer, ", ".join(sum(process_caption_split(v["caption"]), []))) for v in meta.values()]


def test_prepare_reports_tokens_and_warns(tmp_path, long_posts, clip_slow, capsys):
    m = prepare(long_posts, tmp_path, recipe=load_recipe(), max_token_length=75, progress=False)
    lengths = np.array(independent_counts(tmp_path, clip_slow))
    tokens = m["tokens"]
    assert tokens["max_token_length"] == 75 and m["recipe"]["resolved"]["captions"]["max_token_length"] == 75
    assert tokens["counted"] == tokens["captions"] == len(lengths) and not tokens["sampled"]
    assert tokens["suffix_cut"]["count"] == int((lengths > 75).sum()) > 0
    assert tokens["length"]["max"] == lengths.max()
    assert tokens["length"]["over"]["150"] == int((lengths > 150).sum())
    # the loud warning: stderr and the manifest
    [warning] = [w for w in m["warnings"] if "max_token_length 75" in w]
    assert f"{100 * tokens['suffix_cut']['share']:.1f}% of captions" in warning
    assert "max_token_length 75" in capsys.readouterr().err
    report = (tmp_path / "report.md").read_text()
    assert "## Caption tokens" in report and f"{tokens['suffix_cut']['count']:,}" in report
    assert (tmp_path / "caption_tokens.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "caption_tokens.png" in manifest["outputs"] and manifest["tokens"] == json.loads(json.dumps(tokens))


def test_prepare_under_budget_does_not_warn(tmp_path, long_posts):
    m = prepare(long_posts, tmp_path, recipe=load_recipe(), progress=False)  # the recipe's 225
    assert m["tokens"]["max_token_length"] == 225 and m["tokens"]["suffix_cut"]["count"] == 0
    assert not [w for w in m["warnings"] if "max_token_length" in w]


def test_prepare_without_vocabulary_warns_and_writes(tmp_path, long_posts, monkeypatch, capsys):
    from kxl_common import clip_tokenizer

    def missing():
        raise FileNotFoundError("open-clip-torch is not installed; it supplies the CLIP BPE vocabulary "
                                "(pip install --no-deps open-clip-torch)")

    monkeypatch.setattr(clip_tokenizer, "clip_bpe_path", missing)
    m = prepare(long_posts, tmp_path, recipe=load_recipe(), progress=False)
    assert m["tokens"]["counted"] == 0 and "open-clip-torch" in m["tokens"]["skipped"]
    assert any("not counted" in w for w in m["warnings"]) and "not counted" in capsys.readouterr().err
    assert (tmp_path / "meta.json").is_file() and not (tmp_path / "caption_tokens.png").exists()
    assert "Not counted against max_token_length 225" in (tmp_path / "report.md").read_text()


def test_budget_values_are_sd_scripts_values(tmp_path, long_posts):
    with pytest.raises(RecipeError, match=r"captions.max_token_length: .*\[75, 150, 225\].*got 100"):
        recipe_from_dict({"name": "x", "captions": {"max_token_length": 100}})
    from kxl_prep.cli import main

    result = CliRunner().invoke(main, ["prepare", str(tmp_path), "--out", str(tmp_path / "o"),
                                       "--max-token-length", "77"])
    assert result.exit_code == 2 and "'77' is not one of '75', '150', '225'" in result.output
    from kxl_prep.pipeline import PrepError

    with pytest.raises(PrepError, match="--max-token-length: max_token_length must be one of"):
        prepare(long_posts, tmp_path / "p", recipe=load_recipe(), max_token_length=100, progress=False)
