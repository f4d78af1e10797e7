"""Staging for the GPU benchmark (kxl_testing.gpu_stage, bench/gpu_wheels.txt): the wheel list
matches the project's pins, bitsandbytes is cut to the image's CUDA build and still installs,
sd-scripts is copied without what training does not need, and the 64 MiB budget is enforced."""
from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kxl_common.upstream import REPO_ROOT
from kxl_testing import gpu_stage

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# the packages the runbook must bring (the CUDA image lacks them or holds other versions)
MUST_TRAVEL = {"diffusers", "lycoris-lora", "bitsandbytes", "voluptuous", "imagesize", "toml", "ftfy", "lion-pytorch",
               "transformers", "tokenizers", "huggingface-hub", "accelerate"}


def train_pins() -> dict[str, str]:
    extra = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    pins = {}
    for spec in extra:
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", spec)
        if match:
            pins[gpu_stage.normalise(match.group(1))] = match.group(2)
    return pins


def test_wheel_list_carries_the_pins():
    wheels = gpu_stage.read_wheel_list()
    assert MUST_TRAVEL <= set(wheels)
    pins = train_pins()
    for name, version in wheels.items():
        if name in pins:
            assert version == pins[name], f"{name}: {version} travels, pyproject pins {pins[name]}"
    assert "torch" not in wheels and "torchvision" not in wheels  # the image's CUDA build is used
    major, minor, patch = (int(x) for x in wheels["bitsandbytes"].split("."))
    assert (major, minor, patch) >= (0, 41, 1)


def test_wheel_list_errors_name_the_line(tmp_path):
    bad = tmp_path / "w.txt"
    bad.write_text("# c\nfoo==1.0\nbar>=2\n")
    with pytest.raises(gpu_stage.StageError, match=r"w.txt:3: expected name==version"):
        gpu_stage.read_wheel_list(bad)
    bad.write_text("Foo_Bar==1\nfoo-bar==2\n")
    with pytest.raises(gpu_stage.StageError, match=r":2: foo-bar listed twice"):
        gpu_stage.read_wheel_list(bad)


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel of package `bitsandbytes` holding `files`."""
    dist = "bitsandbytes-0.50.2.dist-info"
    meta = {f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.50.2\n",
            f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-any\n"}
    members = {**files, **meta}
    record = "".join(f"{n},{record_hash(d)},{len(d)}\n" for n, d in members.items()) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}/RECORD", record)
    return path


def test_bitsandbytes_is_cut_to_the_cuda_builds_and_installs(tmp_path):
    libs = {f"bitsandbytes/libbitsandbytes_{b}.so": bytes([i]) * 5000
            for i, b in enumerate(["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2025"])}
    wheel = make_wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-any.whl",
                       {"bitsandbytes/__init__.py": b"__version__ = '0.50.2'\n", **libs})
    before, after = gpu_stage.prune_wheel(wheel, gpu_stage.bitsandbytes_keep(["130", "132"]))
    assert after < before
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        record = zf.read("bitsandbytes-0.50.2.dist-info/RECORD").decode().splitlines()
        kept_libs = {n.rsplit("/", 1)[-1] for n in names if ".so" in n}
        assert kept_libs == {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"}
        rows = {r.split(",")[0]: r.split(",")[1:] for r in record}
        assert set(rows) == names
        for name in names - {"bitsandbytes-0.50.2.dist-info/RECORD"}:
            data = zf.read(name)
            assert rows[name] == [record_hash(data), str(len(data))]
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(target), str(wheel)], check=True)
    assert sorted(p.name for p in (target / "bitsandbytes").glob("*.so")) == sorted(kept_libs)


def fake_sd_scripts(root: Path) -> Path:
    for rel in ["sdxl_train_network.py", "train_network.py", "library/__init__.py", "library/train_util.py",
                "networks/lora.py", "docs/a.md", "images/x.png", "tests/test_x.py", ".git/HEAD",
                "bitsandbytes_windows/x.dll", "library/__pycache__/x.pyc"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


def test_sd_scripts_copy_keeps_the_code_only(tmp_path):
    src = fake_sd_scripts(tmp_path / "src")
    dest = gpu_stage.copy_sd_scripts(src, tmp_path / "out" / "sd-scripts")
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["library/__init__.py", "library/train_util.py", "networks/lora.py", "sdxl_train_network.py",
                   "train_network.py"]
    with pytest.raises(gpu_stage.StageError, match="not an sd-scripts checkout"):
        gpu_stage.copy_sd_scripts(tmp_path / "out", tmp_path / "again")


def fake_wheels(directory: Path, pins: dict[str, str]) -> None:
    directory.mkdir()
    for name, version in pins.items():
        path = directory / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        if name == "bitsandbytes":
            make_wheel(path, {"bitsandbytes/libbitsandbytes_cuda118.so": b"x" * 20000,
                              "bitsandbytes/libbitsandbytes_cuda130.so": b"y" * 100})
        else:
            with zipfile.ZipFile(path, "w") as zf:
                zf.writestr(f"{name}/__init__.py", "")


def test_stage_copies_everything_and_checks_the_budget(tmp_path, monkeypatch):
    pins = gpu_stage.read_wheel_list()
    fake_wheels(tmp_path / "wheels", pins)
    tok = tmp_path / "tok" / "openai_clip-vit-large-patch14"
    tok.mkdir(parents=True)
    (tok / "vocab.json").write_text("{}")
    src = fake_sd_scripts(tmp_path / "sd")
    dest = tmp_path / ".gpu"
    result = gpu_stage.stage(dest, src, tmp_path / "tok", ["130"], wheels_from=tmp_path / "wheels", echo=lambda _m: None)
    assert sorted(p.name for p in (dest / "wheels").glob("*.whl")) == sorted(p.name for p in (tmp_path / "wheels").glob("*.whl"))
    assert (dest / "tokenizers" / "openai_clip-vit-large-patch14" / "vocab.json").is_file()
    assert (dest / "sd-scripts" / "sdxl_train_network.py").is_file()
    assert result["staged"] == sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert result["tracked"] == gpu_stage.tracked_bytes() > 0
    with zipfile.ZipFile(next((dest / "wheels").glob("bitsandbytes-*.whl"))) as zf:
        assert not any("cuda118" in n for n in zf.namelist())
    monkeypatch.setattr(gpu_stage, "CARRY_LIMIT", result["tracked"] + 10)
    with pytest.raises(gpu_stage.StageError, match="over the 64 MiB"):
        gpu_stage.stage(dest, src, tmp_path / "tok", ["130"], wheels_from=tmp_path / "wheels", echo=lambda _m: None)
    for wheel in (tmp_path / "wheels").glob("voluptuous-*"):
        wheel.unlink()
    with pytest.raises(gpu_stage.StageError, match="one wheel of voluptuous==0.15.2, found 0"):
        gpu_stage.stage(dest, src, tmp_path / "tok", ["130"], wheels_from=tmp_path / "wheels", echo=lambda _m: None)


def test_gpu_data_folder_is_ignored_and_scripts_parse():
    ignored = subprocess.run(["git", "check-ignore", "-q", ".gpu/wheels/x.whl"], cwd=REPO_ROOT)
    assert ignored.returncode == 0
    for script in ("bench/gpu_run.sh", "bench/stage_gpu.sh"):
        assert subprocess.run(["bash", "-n", str(REPO_ROOT / script)]).returncode == 0
