"""`kxl eval prompts | generate | score | report` (see docs/eval.md)."""
from __future__ import annotations

from pathlib import Path

import click

from kxl_common.cli_support import InputDir, InputFile, InputPath, KxlGroup, OutputDir, OutputFile
from kxl_common.shard import HELP as SHARD_HELP

from .errors import EvalError


@click.group("eval", cls=KxlGroup)
def eval_group():
    """The Epsilon card's benchmark: CCIP over the most frequent characters, reproducible."""


_dir = InputDir()
_file = InputFile()


@eval_group.command()
@click.argument("dataset", type=_dir)
@click.option("--out", "out", type=OutputFile(), required=True,
              help="Prompt file to write (JSON lines).")
@click.option("--source", "sources", multiple=True, type=InputPath(),
              help="Post sources DATASET was prepared from [default: its manifest's inputs].")
@click.option("--characters", "n_characters", default=3600, show_default=True, help="How many characters.")
@click.option("--seeds", "seeds_per_prompt", default=1, show_default=True, help="Seeds per prompt.")
@click.option("--seed", "base_seed", default=0, show_default=True, help="Base seed the per-prompt seeds derive from.")
@click.option("--no-styles", is_flag=True, help="Leave out the card's style prompts.")
@click.option("--rating", default="general", show_default=True, help="Rating whose tag ends the prompts.")
def prompts(dataset, out, sources, n_characters, seeds_per_prompt, base_seed, no_styles, rating):
    """Write the benchmark prompt file for the kxl-prep output DATASET."""
    from .prompts import Suffix, build_prompt_set, write_prompt_file

    items, summary = build_prompt_set(dataset, list(sources) or None, n_characters=n_characters,
                                      seeds_per_prompt=seeds_per_prompt, base_seed=base_seed,
                                      styles=not no_styles, suffix=Suffix(rating=rating))
    write_prompt_file(out, items)
    click.echo(f"wrote {out}: {summary['characters']} character and {summary['styles']} style prompts, "
               f"{seeds_per_prompt} seed(s) each")


@eval_group.command()
@click.argument("prompt_file", type=_file)
@click.option("--out", "out", type=OutputDir(), required=True,
              help="Folder for the images (a rerun resumes it).")
@click.option("--settings", "settings_file", type=_file, help="TOML with a [generate] table.")
@click.option("--checkpoint", type=_file, help="SDXL single-file checkpoint (sd-scripts' inference).")
@click.option("--lokr", type=_file, help="LoKr / LyCORIS file applied on top of --checkpoint.")
@click.option("--multiplier", default=1.0, show_default=True, help="Strength of --lokr.")
@click.option("--tokenizer-cache-dir", type=_dir,
              help="sd-scripts' offline tokenizer cache [default: the one `kxl-train tokenizer-cache` wrote, "
                   "when it exists].")
@click.option("--diffusers", "diffusers_dir", type=_dir, help="A diffusers-format SDXL folder instead.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
@click.option("--shard", default="0/1", show_default=True, metavar="K/N", help=SHARD_HELP)
@click.option("--limit", type=int, help="Make at most this many of the shard's images.")
@click.option("--batch-size", type=int, help="Overrides the settings' batch_size.")
def generate(prompt_file, out, settings_file, checkpoint, lokr, multiplier, tokenizer_cache_dir, diffusers_dir,
             device, shard, limit, batch_size):
    """Generate an image per prompt and seed of PROMPT_FILE (missing ones only)."""
    from kxl_common.model_files import check_network_file, check_sdxl_checkpoint
    from kxl_common.shard import parse_shard

    from .generate import run_generate
    from .prompts import read_prompt_file
    from .settings import load_settings

    if (checkpoint is None) == (diffusers_dir is None):
        raise EvalError("give exactly one of --checkpoint (sd-scripts) or --diffusers")
    if lokr and not checkpoint:
        raise EvalError("--lokr needs --checkpoint")
    # the model files are checked from their headers before anything loads (kxl_common.model_files)
    if checkpoint:
        check_sdxl_checkpoint(checkpoint, role="--checkpoint")
    if lokr:
        check_network_file(lokr, role="--lokr")
    if diffusers_dir:
        check_sdxl_checkpoint(diffusers_dir, role="--diffusers", diffusers_ok=True)
    settings = load_settings(settings_file, batch_size=batch_size)
    items = read_prompt_file(prompt_file)
    k_n = parse_shard(shard)
    from .backends import resolve_device
    from .generate import cpu_warning

    slow = cpu_warning(settings, resolve_device(device).type)
    if slow:
        click.echo(f"warning: {slow}", err=True)
    if checkpoint:
        from kxl_common import clip_tokenizer as tk

        from .sdxl_backend import SdScriptsBackend

        tokenizer_cache_dir = tk.find_cache(tokenizer_cache_dir)  # the default offline cache when it exists
        if tokenizer_cache_dir is None and tk.offline():
            raise EvalError(tk.missing_cache_message())

        backend = SdScriptsBackend(checkpoint, tokenizer_cache_dir=tokenizer_cache_dir, lokr=lokr,
                                   multiplier=multiplier, device=device, dtype=settings.dtype)
    else:
        from .backends import DiffusersBackend

        backend = DiffusersBackend.from_pretrained(diffusers_dir, device=device, dtype=settings.dtype)
    res = run_generate(items, prompt_file, settings, backend, out, shard=k_n, limit=limit)
    click.echo(f"{res['out']}: {res['done']} made, {res['skipped']} already there "
               f"(shard {res['shard']}: {res['shard_total']} of {res['all_total']})")


@eval_group.command()
@click.argument("generated", type=_dir)
@click.option("--dataset", type=_dir, required=True, help="The kxl-prep output the references come from.")
@click.option("--ccip-model", type=_dir, required=True, help="Local copy of deepghs/ccip_onnx/<model>/.")
@click.option("--image-dir", type=_dir, help="Exported images [default: DATASET/dataset.toml's image_dir].")
@click.option("--prompts", "prompt_file", type=_file, help="Prompt file [default: the one GENERATED was made from].")
@click.option("--refs", default=8, show_default=True, help="References per character.")
@click.option("--out", "out", type=OutputDir(),
              help="Folder for score.json / score_per_character.csv [default: GENERATED].")
def score(generated, dataset, ccip_model, image_dir, prompt_file, refs, out):
    """CCIP-score the character images in GENERATED against the dataset's references."""
    from .score import run_score

    res = run_score(generated, dataset, ccip_model, out or generated, prompt_file=prompt_file,
                    image_dir=image_dir, refs=refs)
    o, c = res["overall"], res["control_shuffled_references"]
    click.echo(f"score {o['score']:.4f} over {o['characters']} characters (images {o['image_score']:.4f}, "
               f"mean difference {o['mean_difference']:.4f})"
               + (f"; control with shuffled references {c['score']:.4f}" if c else ""))
    if res["characters_without_references"]:
        click.echo(f"{len(res['characters_without_references'])} character(s) without references (listed in score.json)")


@eval_group.command()
@click.argument("a", type=_dir)
@click.argument("b", type=_dir)
@click.option("--out", "out", type=OutputDir(), default=Path("kxl-eval-report"),
              show_default=True)
@click.option("--min-delta", default=0.25, show_default=True, help="Listed as much worse / better from this change.")
@click.option("--top", default=20, show_default=True, help="At most this many listed each way.")
@click.option("--grid-rows", default=8, show_default=True)
def report(a, b, out, min_delta, top, grid_rows):
    """Put two scored folders A and B side by side (JSON, markdown, grid and plot)."""
    from .report import format_markdown, run_report

    res = run_report(a, b, out, min_delta=min_delta, top=top, grid_rows=grid_rows)
    click.echo(format_markdown(res))
    click.echo(f"written under {out}")
