"""Benchmark of kxl-prep's caption token count (kxl_prep.tokens.TokenCounter) on Epsilon captions
of the synthetic danbooru2023 generator (kxl_testing.sample's vocabulary and tag draws at the
size's scale, captioned by kxl_prep.captions as prepare captions them).

In the same run it measures the peers on the same captions: the same CLIP tokenizer encoding
each whole caption (`tokenizers`, batch encoding, the text process_caption builds), and
transformers' CLIPTokenizer (the slow one sd-scripts tokenizes with) on a subset. It prints
captions/s, the ratios, and the share of captions over each budget.

    .venv/bin/python bench/bench_caption_tokens.py                     # 200k captions
    .venv/bin/python bench/bench_caption_tokens.py --captions 1000000 --peer-captions 200000 --slow-captions 5000
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's code first, installed or not

CHUNK = 131_072


def synthetic_captions(n: int, seed: int) -> pa.Array:
    """n Epsilon captions of posts drawn like kxl_testing.sample.make_bench_db draws them."""
    from kxl_prep.captions import build_captions
    from kxl_prep.recipe import load_recipe
    from kxl_testing.sample import draw_post_tags, make_vocabulary

    rng = np.random.default_rng(seed)
    scale = max(n / 7_600_000, 0.01)
    vocab = make_vocabulary(max(2000, int(30_000 * scale ** 0.5)), max(1000, int(250_000 * scale ** 0.7)),
                            max(500, int(60_000 * scale ** 0.7)), max(100, int(15_000 * scale ** 0.7)), rng)
    posts, tags = draw_post_tags(rng, vocab, n)
    names = pa.array(vocab.names, pa.string())
    columns = {}
    # HakuBooru tag types: 0 general, 1 artist, 2 character, 3 copyright, 4 meta
    for column, kind in (("tags_general", 0), ("tags_artist", 1), ("tags_character", 2), ("tags_copyright", 3),
                         ("tags_meta", 4)):
        keep = vocab.types[tags] == kind
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(np.bincount(posts[keep], minlength=n), out=offsets[1:])
        columns[column] = pa.ListArray.from_arrays(pa.array(offsets), names.take(pa.array(tags[keep])))
    recipe = load_recipe()
    captions, _ = build_captions(pa.table(columns), rng.integers(0, 7, n), rng.integers(0, 4, n),
                                 rng.integers(2005, 2025, n), recipe.captions, recipe.quality.labels, progress=False)
    return captions.combine_chunks()


def sd_scripts_texts(captions: list[str]) -> list[str]:
    out = []
    for caption in captions:
        fixed, flex = caption.split("|||", 1)
        flex, suffix = flex.split("|||", 1)
        out.append(", ".join(t.strip() for part in (fixed, flex, suffix) for t in part.split(",") if t.strip()))
    return out


@click.command()
@click.option("--captions", "n", default=200_000, show_default=True, help="Captions to count.")
@click.option("--peer-captions", default=100_000, show_default=True,
              help="Captions the whole-caption peer tokenizes (the first ones).")
@click.option("--slow-captions", default=2_000, show_default=True,
              help="Captions transformers' CLIPTokenizer tokenizes (it is slow).")
@click.option("--seed", default=0, show_default=True)
def main(n, peer_captions, slow_captions, seed):
    from kxl_common.clip_tokenizer import clip_fast_tokenizer, ftfy_fixed, make_tokenizer_cache
    from kxl_prep.tokens import BudgetSpec, TokenCounter

    t0 = time.perf_counter()
    captions = synthetic_captions(n, seed)
    click.echo(f"{len(captions):,} synthetic captions built in {time.perf_counter() - t0:.1f} s")
    tokenizer = clip_fast_tokenizer()

    counter = TokenCounter(len(captions), BudgetSpec(max_token_length=225), tokenizer=tokenizer)
    t0 = time.perf_counter()
    for start in range(0, len(captions), CHUNK):
        counter.add(start, captions.slice(start, CHUNK))
    ours = time.perf_counter() - t0
    summary = counter.result()

    texts = sd_scripts_texts(captions.slice(0, peer_captions).to_pylist())
    t0 = time.perf_counter()
    whole = []
    for start in range(0, len(texts), 10_000):  # Encoding objects are large: keep only the lengths
        batch = [ftfy_fixed(t) for t in texts[start:start + 10_000]]
        whole += [len(e.ids) for e in tokenizer.encode_batch_fast(batch, add_special_tokens=False)]
    peer = time.perf_counter() - t0
    assert whole == np.concatenate(counter.total)[:len(texts)].tolist(), "the count differs from whole captions"

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        slow = CLIPTokenizer.from_pretrained(str(make_tokenizer_cache(tmp) / "openai_clip-vit-large-patch14"))
        subset = texts[:slow_captions]
        t0 = time.perf_counter()
        slow_counts = [len(slow.tokenize(t)) for t in subset]
        slow_s = time.perf_counter() - t0
    assert slow_counts == whole[:len(subset)], "transformers' CLIPTokenizer counts differently"

    rows = [("kxl TokenCounter (tags, cached, vectorized)", len(captions), ours),
            ("tokenizers, whole captions (encode_batch_fast)", len(texts), peer),
            ("transformers CLIPTokenizer (sd-scripts')", len(subset), slow_s)]
    click.echo(f"\n| counter | captions | seconds | captions/s | kxl ratio |\n|---|---|---|---|---|")
    ours_rate = len(captions) / ours
    for name, count, seconds in rows:
        rate = count / seconds
        click.echo(f"| {name} | {count:,} | {seconds:.2f} | {rate:,.0f} | {ours_rate / rate:.1f}x |")
    length = summary["length"]
    click.echo(f"\ntokens per caption: mean {length['mean']:.1f}, p50 {length['percentiles']['p50']:g}, "
               f"p99 {length['percentiles']['p99']:g}, max {length['max']}")
    for budget, over in length["over"].items():
        click.echo(f"over {budget}: {over:,} ({100 * over / len(captions):.2f}%)")


if __name__ == "__main__":
    main()
