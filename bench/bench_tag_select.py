"""Benchmark the tag selector (kxl_prep.tags.select) on a synthetic danbooru-sized post table.

    .venv/bin/python bench/bench_tag_select.py --posts 1500000
    .venv/bin/python bench/bench_tag_select.py --posts 7600000 --prepare DIR   # alone on the machine

Builds a posts table in POSTS_SCHEMA with Zipf-distributed tags (about 25 general, 1
artist, 1-2 copyright, 1 character and 3 meta tags per post, vocabularies of danbooru's
order of size), writes it to a parquet file, then in a FRESH process reads it into pandas the
way the pipeline holds it (kxl_prep.sources' frame: ArrowDtype list<dictionary> tag
columns; --input object / arrow time the other forms) and runs a rev2-shaped selection:
an artist list (2,000 artists), a capped series list (100 copyrights), the figure-photo
expression, an exclusion. Prints wall time per phase, posts/s and peak RSS (the table itself
included; the RSS before selection is printed too so the selector's own share is visible).
With --prepare DIR the same process then runs the whole data prep job (kxl_prep.pipeline.
prepare: selection, filters, quality, captions, buckets, outputs) with that selection.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kxl_prep.schema import POSTS_SCHEMA, TAG_COLUMNS  # noqa: E402
from kxl_prep.sources.records import TABLE_SCHEMA, to_pandas  # noqa: E402

VOCAB = {"general": 300_000, "artist": 250_000, "character": 150_000, "copyright": 50_000, "meta": 1_500}
MEAN_TAGS = {"general": 25.0, "artist": 1.0, "character": 1.0, "copyright": 1.4, "meta": 3.0}


def _zipf_codes(rng: np.random.Generator, vocab: int, size: int, a: float = 1.05) -> np.ndarray:
    w = 1.0 / np.arange(1, vocab + 1) ** a
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(size)), vocab - 1).astype(np.int32)


@functools.lru_cache(maxsize=None)
def names(category: str) -> pa.Array:
    special = {"general": ["figure", "photo_(medium)", "comic"], "meta": ["ai-generated"]}.get(category, [])
    # the special tags sit at mid popularity (ranks 200..)
    out = [f"{category[:3]}_{i}" for i in range(VOCAB[category])]
    for k, s in enumerate(special):
        out[200 + 50 * k] = s
    return pa.array(out)


GEN_CHUNK = 500_000  # rows generated and written at a time (bounded memory)


def write_table(path: Path, n: int, seed: int) -> int:
    """Generate the table chunk by chunk into a parquet file; returns the row count."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(max(8_000_000, 2 * n), size=n, replace=False)).astype(np.int64) + 1
    with pq.ParquetWriter(path, TABLE_SCHEMA) as writer:
        for start in range(0, n, GEN_CHUNK):
            writer.write_table(make_table(ids[start : start + GEN_CHUNK], rng))
    return n


def make_table(ids: np.ndarray, rng: np.random.Generator) -> pa.Table:
    n = len(ids)
    cols: dict[str, pa.Array] = {
        "id": pa.array(ids),
        "created_at": pa.array(np.full(n, "2020-01-01T00:00:00.000+00:00", dtype=object), pa.string()),
        "year": pa.array(rng.integers(2005, 2025, size=n).astype(np.int16)),
        "rating": pa.array(np.array(["general", "sensitive", "questionable", "explicit"], dtype=object)[rng.integers(0, 4, size=n)], pa.string()),
        "fav_count": pa.array(rng.integers(0, 500, size=n)),
        "score": pa.array(rng.integers(0, 300, size=n)),
        "width": pa.array(rng.integers(400, 4000, size=n).astype(np.int32)),
        "height": pa.array(rng.integers(400, 4000, size=n).astype(np.int32)),
        "file_ext": pa.array(np.full(n, "jpg", dtype=object), pa.string()),
        "file_size": pa.array(rng.integers(10_000, 10_000_000, size=n)),
        "md5": pa.array(np.full(n, "0" * 32, dtype=object), pa.string()),
        "file_url": pa.array(np.full(n, "https://x/y.jpg", dtype=object), pa.string()),
        "is_deleted": pa.array(rng.random(n) < 0.02),
        "is_banned": pa.array(rng.random(n) < 0.005),
    }
    for cat, vocab in VOCAB.items():
        counts = rng.poisson(MEAN_TAGS[cat], size=n).astype(np.int64)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        codes = _zipf_codes(rng, vocab, int(offsets[-1]), a=1.05 if cat == "general" else 0.9)
        # as kxl_prep.sources holds them: list<dictionary<int32, string>>, one shared dictionary
        values = pa.DictionaryArray.from_arrays(pa.array(codes), names(cat))
        cols[f"tags_{cat}"] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    return pa.table(cols, schema=TABLE_SCHEMA)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_selection(parquet: Path, kind: str, prepare_out: Path | None = None, tags_only: bool = False) -> dict:
    from kxl_prep.tags.rules import parse_tag_selection
    from kxl_prep.tags.select import TagIndex, select_by_tags

    t0 = time.perf_counter()
    dictionaries = [f"{c}.list.element" for c in TAG_COLUMNS]
    if tags_only:  # row group by row group: the load peak stays near the table's own size
        pf = pq.ParquetFile(parquet, read_dictionary=dictionaries)
        table = pa.concat_tables(
            pf.read_row_group(i, columns=["id", "rating", "year", *TAG_COLUMNS]) for i in range(pf.num_row_groups)
        )
    else:
        table = pq.read_table(parquet, read_dictionary=dictionaries)
    if tags_only:  # only the columns the selector reads, tag columns as the readers give them
        tag_types = {f.name: f.type for f in TABLE_SCHEMA if f.name in TAG_COLUMNS}
        posts = pd.DataFrame({"id": table.column("id").to_numpy(), "rating": table.column("rating").to_numpy(),
                              "year": table.column("year").to_numpy()})
        for col in TAG_COLUMNS:
            posts[col] = pd.Series(pd.arrays.ArrowExtensionArray(table.column(col).cast(tag_types[col])), index=posts.index)
    elif kind == "readers":  # what kxl_prep.sources.read_posts returns
        posts = to_pandas(table.cast(TABLE_SCHEMA))
    elif kind == "object":  # plain pandas: object columns of name arrays
        posts = table.cast(POSTS_SCHEMA).to_pandas()
    else:
        posts = table.cast(TABLE_SCHEMA)
    del table
    t_load = time.perf_counter() - t0
    rss_before = _rss_mb()
    peak_before = _peak_mb()
    rules = {
        "rules": [
            {"name": "artists", "artists": [f"art_{i}" for i in range(0, 20_000, 10)]},
            {"name": "series", "copyrights": [f"cop_{i}" for i in range(0, 1000, 10)], "cap": None},
            {"name": "figure-photos", "all_of": ["photo_(medium)", "figure"]},
            {"name": "mixed", "any_of": ["gen_5", "gen_6"], "none_of": ["comic"], "characters": ["cha_3"], "cap": 1000},
        ],
        "exclude": {"tags": ["ai-generated"]},
    }
    t1, c1 = time.perf_counter(), time.process_time()
    index = TagIndex.build(posts, progress=False)
    t_index = time.perf_counter() - t1
    rules["rules"][1]["cap"] = index.n_posts // 10  # ~1.5M selected of 7.6M, rev2's size
    # Zipf tails may miss a few listed names on a small table: keep the ones that exist.
    vocab = index.vocabulary()
    keep = {"artists": "artist", "copyrights": "copyright", "characters": "character"}
    for rule in rules["rules"]:
        for key, cat in keep.items():
            if key in rule:
                rule[key] = [t for t in rule[key] if t in vocab[cat]]
    spec = parse_tag_selection(rules, base_dir=".", seed=1)
    t2 = time.perf_counter()
    result = select_by_tags(posts, spec, index=index, progress=False)
    t_select = time.perf_counter() - t2
    cpu = time.process_time() - c1
    peak_selector = _peak_mb()
    selected = int(len(result.ids))
    per_rule = {o.name: int(o.sampled.sum()) for o in result.rules}
    general_names = len(index.categories["general"].vocabulary)
    general_entries = int(sum(len(seg.codes) for seg in index.categories["general"].segments))
    n = index.n_posts
    full = {}
    if prepare_out is not None:  # the whole data prep job with this selection
        import tomli_w

        from kxl_prep.pipeline import prepare

        del index, result
        recipe = prepare_out / "bench-tags.toml"
        prepare_out.mkdir(parents=True, exist_ok=True)
        recipe.write_text(tomli_w.dumps({"name": "bench-tags", "seed": 1, "selection": {"method": "tags", **rules}}))
        t3, c3 = time.perf_counter(), time.process_time()
        manifest = prepare(posts, prepare_out / "out", recipe=recipe, progress=False)
        full = {
            "prepare_s": round(time.perf_counter() - t3, 1),
            "prepare_cpu_s": round(time.process_time() - c3, 1),
            "prepare_images": manifest["counts"]["images"],
            "prepare_timings_s": manifest["timings_s"],
            "prepare_peak_rss_mb": round(_peak_mb(), 0),
        }
    return {
        **full,
        "posts": n,
        "input": kind,
        "load_s": round(t_load, 2),
        "index_s": round(t_index, 2),
        "select_s": round(t_select, 2),
        "total_selector_s": round(t_index + t_select, 2),
        "posts_per_s": round(n / (t_index + t_select)),
        "cpu_s": round(cpu, 2),  # user+sys of this process: steadier than wall time on a busy machine
        "load_avg_1min": round(os.getloadavg()[0], 1),
        "selected": selected,
        "per_rule_sampled": per_rule,
        "rss_before_selector_mb": round(rss_before, 0),
        "peak_rss_before_selector_mb": round(peak_before, 0),
        "peak_rss_mb": round(peak_selector, 0),
        "general_vocabulary": general_names,
        "general_tag_entries": general_entries,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posts", type=int, default=1_500_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input", choices=("readers", "object", "arrow"), action="append",
                    help="table form(s) to time: readers = pandas with ArrowDtype list<dictionary> tag "
                         "columns as kxl_prep.sources returns (default); object = pandas object lists; "
                         "arrow = a pyarrow Table")
    ap.add_argument("--parquet", type=Path, default=None, help="reuse / keep the generated table here")
    ap.add_argument("--prepare", type=Path, default=None,
                    help="also run the whole prepare() job with this selection, outputs under this folder")
    ap.add_argument("--tags-only", action="store_true",
                    help="load only id, rating, year and the tag columns (what the selector reads): "
                         "the selector's own cost at full scale without holding the whole table")
    ap.add_argument("--_child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_as", default="readers", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tags_only and args.prepare:
        ap.error("--prepare needs the whole table; drop --tags-only")
    if args._child is not None:
        print(json.dumps(run_selection(args._child, args._as, args.prepare, args.tags_only)))
        return

    tmp = None
    parquet = args.parquet
    if parquet is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_tag_select_")
        parquet = Path(tmp.name) / "posts.parquet"
    if not parquet.exists():
        t0 = time.perf_counter()
        n = write_table(parquet, args.posts, args.seed)
        print(f"generated {n:,} posts in {time.perf_counter() - t0:.1f} s -> {parquet}")
    inputs = args.input or ["readers"]
    for kind in inputs:
        out = subprocess.run(
            [sys.executable, __file__, "--_child", str(parquet), "--_as", kind]
            + (["--prepare", str(args.prepare / kind)] if args.prepare else [])
            + (["--tags-only"] if args.tags_only else []),
            check=True, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"[{r['input'] + (' tags-only' if args.tags_only else ''):>7}] {r['posts']:,} posts ({r['general_tag_entries']:,} general tag entries, "
            f"{r['general_vocabulary']:,} general names): index {r['index_s']} s + select {r['select_s']} s "
            f"= {r['total_selector_s']} s -> {r['posts_per_s']:,} posts/s (CPU {r['cpu_s']} s, load {r['load_avg_1min']}); "
            f"selected {r['selected']:,}; "
            f"RSS before selector {r['rss_before_selector_mb']:.0f} MB, peak {r['peak_rss_mb']:.0f} MB "
            f"(peak while loading {r['peak_rss_before_selector_mb']:.0f} MB)"
        )
        print("         per rule:", r["per_rule_sampled"])
        if "prepare_s" in r:
            print(
                f"         whole prepare(): {r['prepare_s']} s wall, {r['prepare_cpu_s']} s CPU, "
                f"{r['prepare_images']:,} images, peak RSS {r['prepare_peak_rss_mb']:.0f} MB; "
                f"phases {r['prepare_timings_s']}"
            )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
