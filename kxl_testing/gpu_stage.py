"""Stage what the GPU benchmark needs into one ignored folder that travels with the working tree
(the device tool's `carry`, 64 MiB in all with the tracked files): sd-scripts' files from a
checkout, the offline tokenizer cache, and the wheels of bench/gpu_wheels.txt for CPython 3.12 on
manylinux x86_64, bitsandbytes cut down to the CUDA builds the image's torch loads.

    python -m kxl_testing.gpu_stage [--dest .gpu] [--cuda 130,132]     (bench/stage_gpu.sh)

The random SDXL is not staged (6.9 GB): bench/gpu_run.sh builds it on the GPU machine.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from kxl_common.upstream import REPO_ROOT

WHEEL_LIST = REPO_ROOT / "bench" / "gpu_wheels.txt"
CARRY_LIMIT = 64 * 2**20
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
# what sdxl_train_network needs of sd-scripts: its scripts, library/, networks/ (LoRA modules it
# may import); not the docs, sample images, tests or the Windows bitsandbytes copy
SD_SCRIPTS_SKIP = {".git", ".github", "docs", "images", "tests", "bitsandbytes_windows", "__pycache__"}


class StageError(RuntimeError):
    pass


def read_wheel_list(path: Path = WHEEL_LIST) -> dict[str, str]:
    """{normalised name: version} from `name==version` lines (comments and blanks skipped)."""
    pins: dict[str, str] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
        if not match:
            raise StageError(f"{path}:{line_no}: expected name==version, got {line!r}")
        name = normalise(match.group(1))
        if name in pins:
            raise StageError(f"{path}:{line_no}: {name} listed twice")
        pins[name] = match.group(2)
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def copy_sd_scripts(src: Path, dest: Path) -> Path:
    if not (src / "sdxl_train_network.py").is_file():
        raise StageError(f"{src} is not an sd-scripts checkout (no sdxl_train_network.py)")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=lambda _d, names: [n for n in names if n in SD_SCRIPTS_SKIP or n.endswith(".pyc")])
    return dest


def download_wheels(pins: dict[str, str], dest: Path, python: str = sys.executable) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *platforms, "-d", str(dest), *[f"{n}=={v}" for n, v in pins.items()]]
    subprocess.run(cmd, check=True)
    return wheels_for(pins, dest)


def wheels_for(pins: dict[str, str], directory: Path) -> list[Path]:
    """The one wheel per pin in directory; an error names what is missing or doubled."""
    found = []
    for name, version in pins.items():
        matches = [p for p in directory.glob("*.whl")
                   if normalise(p.name.split("-")[0]) == name and p.name.split("-")[1] == version]
        if len(matches) != 1:
            raise StageError(f"{directory}: expected one wheel of {name}=={version}, found {len(matches)}")
        found.append(matches[0])
    return found


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def prune_wheel(path: Path, keep, out: Path | None = None) -> tuple[int, int]:
    """Rewrite a wheel without the members keep(name) rejects, its RECORD updated; returns
    (size before, size after)."""
    out = out or path
    before = path.stat().st_size
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        kept = [n for n in src.namelist() if n == record_name or keep(n)]
        rows = []
        for name in kept:
            if name == record_name:
                continue
            data = src.read(name)
            dst.writestr(src.getinfo(name), data)
            rows.append(f"{name},{_record_hash(data)},{len(data)}")
        rows.append(f"{record_name},,")
        dst.writestr(src.getinfo(record_name), "\n".join(rows) + "\n")
    os.replace(tmp, out)
    return before, out.stat().st_size


def bitsandbytes_keep(cuda: list[str]):
    """Keep everything but the native libraries of other CUDA / ROCm / XPU builds."""
    wanted = {f"libbitsandbytes_cuda{c}.so" for c in cuda} | {"libbitsandbytes_cpu.so"}

    def keep(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return not base.startswith("libbitsandbytes_") or base in wanted

    return keep


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def tracked_bytes(repo: Path = REPO_ROOT) -> int:
    """Bytes of the working tree's tracked and untracked-not-ignored files (what always travels)."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((repo / n.decode()).stat().st_size for n in names if n and (repo / n.decode()).is_file())


def stage(dest: Path, sd_scripts: Path, tokenizers: Path | None, cuda: list[str], wheels_from: Path | None = None,
          echo=print) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    copy_sd_scripts(sd_scripts, dest / "sd-scripts")
    tok = dest / "tokenizers"
    if tok.exists():
        shutil.rmtree(tok)
    if tokenizers is not None:
        shutil.copytree(tokenizers, tok)
    else:
        from kxl_common.clip_tokenizer import make_tokenizer_cache

        make_tokenizer_cache(tok)
    pins = read_wheel_list()
    wheel_dir = dest / "wheels"
    if wheel_dir.exists():
        shutil.rmtree(wheel_dir)
    if wheels_from is not None:
        wheel_dir.mkdir(parents=True)
        for wheel in wheels_for(pins, wheels_from):
            shutil.copy2(wheel, wheel_dir / wheel.name)
    else:
        download_wheels(pins, wheel_dir)
    bnb = wheels_for({"bitsandbytes": pins["bitsandbytes"]}, wheel_dir)[0]
    before, after = prune_wheel(bnb, bitsandbytes_keep(cuda))
    echo(f"bitsandbytes wheel: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB (CUDA {', '.join(cuda)} kept)")
    sizes = {"sd-scripts": tree_bytes(dest / "sd-scripts"), "tokenizers": tree_bytes(tok),
             **{w.name: w.stat().st_size for w in sorted(wheel_dir.glob("*.whl"))}}
    staged = sum(sizes.values())
    tracked = tracked_bytes()
    for name, size in sizes.items():
        echo(f"  {size / 2**20:7.2f} MiB  {name}")
    echo(f"staged {staged / 2**20:.1f} MiB + working tree {tracked / 2**20:.1f} MiB = "
         f"{(staged + tracked) / 2**20:.1f} MiB of {CARRY_LIMIT / 2**20:.0f} MiB")
    if staged + tracked > CARRY_LIMIT:
        raise StageError("what would travel is over the 64 MiB the device tool carries")
    return {"sizes": sizes, "staged": staged, "tracked": tracked}


def main(argv: list[str] | None = None) -> None:
    import click

    @click.command()
    @click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=REPO_ROOT / ".gpu",
                  show_default=True)
    @click.option("--cuda", default="130,132", show_default=True, help="bitsandbytes CUDA builds to keep.")
    @click.option("--tokenizers", type=click.Path(exists=True, file_okay=False, path_type=Path),
                  help="An offline tokenizer cache to copy (default: build one; needs open-clip-torch).")
    @click.option("--wheels-from", type=click.Path(exists=True, file_okay=False, path_type=Path),
                  help="Take the wheels from this folder instead of downloading them.")
    def cli(dest, cuda, tokenizers, wheels_from):
        """Stage sd-scripts, tokenizers and wheels for bench/gpu_run.sh into DEST (carry it)."""
        from kxl_common.upstream import require_sd_scripts

        try:
            stage(dest.resolve(), require_sd_scripts(), tokenizers, cuda.split(","), wheels_from, echo=click.echo)
        except StageError as exc:
            raise click.ClickException(str(exc)) from exc

    cli.main(args=argv, standalone_mode=True)


if __name__ == "__main__":
    main()
