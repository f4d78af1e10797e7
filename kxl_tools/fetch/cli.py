"""`kxl fetch metadata | release | ccip` (docs/fetch.md). Each job module plans which files of
which repository go where; kxl_tools.fetch.hub downloads, checks and places them."""
from __future__ import annotations


import click

from kxl_common.cli_support import KxlGroup, OutputDir

from .hub import FetchError


def _hub_options(fn):
    """Options every fetch job takes."""
    fn = click.option("--quiet", is_flag=True, help="No progress bars.")(fn)
    fn = click.option("--retries", default=5, show_default=True,
                      help="Tries again after 429 / 5xx, a dropped connection or bytes failing the check.")(fn)
    fn = click.option("--copy", is_flag=True,
                      help="Copy from the cache instead of hard-linking (a link is used where the cache and "
                           "the target share a filesystem).")(fn)
    fn = click.option("--cache-dir", type=OutputDir(),
                      help="huggingface_hub cache to download into [default: HF_HUB_CACHE, or HF_HOME/hub].")(fn)
    fn = click.option("--revision", default=None, help="Branch, tag or commit of the repository [default: main].")(fn)
    return fn


def _hub(cache_dir, retries, quiet):
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as exc:
        raise FetchError("kxl fetch needs huggingface_hub: pip install 'kxl[fetch]'") from exc
    from huggingface_hub.utils import disable_progress_bars

    from .hub import Hub

    if quiet:
        disable_progress_bars()
    return Hub(cache_dir=cache_dir, retries=retries, log=lambda line: click.echo(line, err=True))


def _run(hub, repo_id, repo_type, revision, plan, target, copy):
    """List the repository, plan, fetch, place; echo the outcome."""
    from .hub import fetch_into

    snap = hub.snapshot(repo_id, repo_type, revision)
    placements = plan(snap)
    result = fetch_into(hub, snap, placements, target, copy=copy, echo=click.echo)
    linked = sum(1 for how in result["placed"].values() if how == "link")
    click.echo(f"{target}: {len(result['placed'])} placed ({linked} hard-linked from the cache, "
               f"{len(result['placed']) - linked} copied), {len(result['kept'])} already there")
    return placements


@click.group("fetch", cls=KxlGroup)
def fetch_group():
    """From the hub, exactly what a run needs (huggingface_hub; HF_TOKEN for gated repositories)."""


_target = click.argument("target", type=OutputDir())


@fetch_group.command("metadata")
@_target
@click.option("--form", type=click.Choice(["sqlite", "parquet", "duckdb"]), default="sqlite", show_default=True,
              help="sqlite: the HakuBooru database of KBlueLeaf/danbooru2023-sqlite; parquet / duckdb: the "
                   "tables of KBlueLeaf/danbooru2023-metadata-database (gated: HF_TOKEN).")
@click.option("--repo", "repo_id", help="Dataset repository [default: by --form, see above].")
@click.option("--file", "files", multiple=True, help="Path in the repository to fetch instead of the rule's "
                                                      "choice (repeat for several).")
@_hub_options
def metadata_cmd(target, form, repo_id, files, revision, cache_dir, copy, retries, quiet):
    """HakuBooru's post / tag tables into TARGET, in a form `kxl-prep prepare` reads as is."""
    from . import metadata

    hub = _hub(cache_dir, retries, quiet)
    placements = _run(hub, repo_id or metadata.DEFAULT_REPO[form], "dataset", revision,
                      lambda snap: metadata.plan(snap, form, files), target, copy)
    click.echo(f"next: kxl-prep prepare {metadata.prepare_input(target, form, placements)} --out DATA_DIR")


@fetch_group.command("release")
@_target
@click.option("--steps", default=None, metavar="all|N,N,...,final",
              help="Which saved steps: numbers (1700, 3400, ...) and/or 'final' [default: all].")
@click.option("--checkpoint", is_flag=True,
              help="Also the full SDXL checkpoints of the selected steps (13600 in rev1: 6.9 GB).")
@click.option("--repo", "repo_id", default=None, help="Model repository [default: KBlueLeaf/Kohaku-XL-Epsilon].")
@click.option("--folder", default=None, help="Folder of the step files in the repository [default: intermediate].")
@_hub_options
def release_cmd(target, steps, checkpoint, repo_id, folder, revision, cache_dir, copy, retries, quiet):
    """The released rev1 LoKr step files (and, with --checkpoint, full checkpoints) into TARGET,
    the folder `kxl compare-run MINE TARGET` reads."""
    from . import release

    wanted = release.parse_steps(steps)
    hub = _hub(cache_dir, retries, quiet)
    _run(hub, repo_id or release.REPO, "model", revision,
         lambda snap: release.plan(snap, wanted, checkpoint, release.FOLDER if folder is None else folder),
         target, copy)
    click.echo(f"next: kxl compare-run MY_RUN_DIR {target}")


@fetch_group.command("ccip")
@_target
@click.option("--model", default=None, help="Model folder of the repository [default: ccip-caformer-24-randaug-pruned, "
                                            "dghs-imgutils' default].")
@click.option("--repo", "repo_id", default=None, help="Model repository [default: deepghs/ccip_onnx].")
@_hub_options
def ccip_cmd(target, model, repo_id, revision, cache_dir, copy, retries, quiet):
    """deepghs' CCIP model into TARGET, the folder `kxl eval score --ccip-model` takes."""
    from . import ccip

    hub = _hub(cache_dir, retries, quiet)
    _run(hub, repo_id or ccip.REPO, "model", revision,
         lambda snap: ccip.plan(snap, model or ccip.DEFAULT_MODEL), target, copy)
    click.echo(f"next: kxl eval score GENERATED_DIR --dataset DATA_DIR --ccip-model {target}")


from .images_cli import images  # noqa: E402 - `kxl fetch images` lives with its modules

fetch_group.add_command(images)
