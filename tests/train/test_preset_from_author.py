"""`kxl-train preset-from` on a LoKr made by LyCORIS itself from the author's config (Kohaku XL
Delta docs/lyco_config.toml with the network_args of its train_script.sh), on a small model whose
module classes and names are SDXL's (kxl_testing.sdxl_like): the class-level form gives back the
config's factor per class and default, its targets, the norm modules (train_norm), and LyCORIS
rebuilds the very keys and shapes from it."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytest.importorskip("lycoris")

from kxl_common.upstream import REPO_ROOT
from kxl_testing import sdxl_like as sx
from kxl_testing import tiny_lycoris as tl
from kxl_train import preset_from as pf
from kxl_train.lokr_preset import load_preset, network_kwargs

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

AUTHOR = tomllib.loads(sx.AUTHOR_PRESET.read_text())
AUTHOR_DEFAULT = int(network_kwargs(sx.AUTHOR_NETWORK_ARGS)["factor"])


@pytest.fixture(scope="module")
def author_file(tmp_path_factory):
    models = sx.sdxl_like_models()
    path = tmp_path_factory.mktemp("author") / "author-lokr.safetensors"
    shapes = tl.save_network(sx.author_network(models), path)
    return path, shapes, models


def _module_shapes(key_shapes: dict) -> dict:
    out: dict = {}
    for key, shape in key_shapes.items():
        name, _, param = key.partition(".")
        out.setdefault(name, {})[param] = tuple(shape)
    return out


def _rebuild(derived, models) -> dict:
    """LyCORIS's own network from the derived preset and its network_args (real tensors)."""
    from lycoris import kohya

    from kxl_train.lokr_preset import lycoris_class_state

    import tempfile

    import tomli_w

    args = network_kwargs([a for a in derived.network_args if not a.startswith("(")])
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/derived.toml"
        with open(path, "w") as fh:
            fh.write(tomli_w.dumps(derived.preset))
        load_preset(path)  # LyCORIS accepts it strictly
        unet, tes = models
        with lycoris_class_state():
            net = kohya.create_network(1.0, 100000, 1.0, None, tes, unet, **args, preset=path)
    return {k: tuple(v.shape) for k, v in tl.network_state(net).items()}


def _norm_layers_the_author_trains(models) -> set[str]:
    """Every LayerNorm / GroupNorm under the author's UNet target classes or matched by its UNet
    name patterns (re.match), as lycoris.kohya names them; the author targets no TE norm."""
    import torch.nn as nn

    unet, _ = models
    classes = set(AUTHOR["unet_target_module"])
    out = set()
    for path, m in unet.named_modules():
        if not isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            continue
        parts = path.split(".")
        in_target = any(type(unet.get_submodule(".".join(parts[:i]))).__name__ in classes for i in range(1, len(parts)))
        by_name = any(re.match(p, path) for p in AUTHOR["unet_target_name"])
        if in_target or by_name:
            out.add("lora_unet_" + path.replace(".", "_"))
    return out


def test_class_form_gives_back_the_authors_config(author_file):
    path, shapes, models = author_file
    file_shapes, _ = pf.read_shapes(path)
    layout, other = pf.layout_from_shapes(file_shapes)
    derived = pf.derive_best(layout, other, file_shapes, models, preferred_factor=None)
    assert derived.form == "class", derived.notes

    # the default factor and the factor of every class the author maps
    assert f"factor={AUTHOR_DEFAULT}" in derived.network_args
    cmap = derived.preset["module_algo_map"]
    for cls, conf in AUTHOR["module_algo_map"].items():
        got = cmap[cls]["factor"] if cls in cmap else AUTHOR_DEFAULT
        assert got == conf["factor"], cls
    assert all(c["full_matrix"] for c in cmap.values())  # dim 10000: every module full matrix
    assert set(cmap) <= set(AUTHOR["module_algo_map"])  # nothing the author did not need
    # the same target classes; the name patterns pick the same modules as the author's
    assert set(derived.preset["unet_target_module"]) == set(AUTHOR["unet_target_module"])
    assert set(derived.preset["text_encoder_target_module"]) == set(AUTHOR["text_encoder_target_module"])
    unet = models[0]
    paths = [p for p, _ in unet.named_modules() if p]

    def picked(patterns):
        return {p for p in paths if any(re.match(t, p) for t in patterns)}

    assert picked(derived.preset["unet_target_name"]) == picked(AUTHOR["unet_target_name"])
    assert derived.preset["text_encoder_target_name"] == AUTHOR["text_encoder_target_name"] == []

    # the norm modules (train_norm): every norm layer the author's targets hold, none other
    norms = pf.norm_modules(other)
    assert norms == _norm_layers_the_author_trains(models) and len(norms) == derived.norms > 0
    assert "train_norm=True" in derived.network_args

    # LyCORIS rebuilds the very keys and shapes
    assert _rebuild(derived, models) == shapes


def test_the_cli_per_module_form_keeps_the_norm_modules(author_file, tmp_path):
    """Per-module form through the CLI (no SDXL tree there): the norm modules kept as names."""
    path, shapes, models = author_file
    out = tmp_path / "derived.toml"
    res = subprocess.run([sys.executable, "-m", "kxl_train.cli", "preset-from", str(path), "--out", str(out),
                          "--per-module", "--no-compare"], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    norms = {k.split(".")[0] for k in shapes if k.endswith(".w_norm")}
    assert f"{len(norms)} norm modules" in res.stdout and "train_norm=True" in res.stdout
    derived = load_preset(out)
    assert derived["unet_target_module"] == [] and derived["use_fnmatch"] is True
    from lycoris import kohya

    from kxl_train.lokr_preset import lycoris_class_state

    unet, tes = models
    with lycoris_class_state():
        net = kohya.create_network(1.0, 100000, 1.0, None, tes, unet, algo="lokr", train_norm="True", preset=str(out))
    assert {k: tuple(v.shape) for k, v in tl.network_state(net).items()} == shapes


def test_a_file_without_some_layers_still_rebuilds_exactly(author_file, tmp_path):
    """One ResNet conv and one attention norm missing: those classes are no longer whole targets;
    whatever form comes out, LyCORIS rebuilds exactly the file."""
    path, shapes, models = author_file
    gone = ("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_middle_block_1_transformer_blocks_0_norm2")
    cut = {k: s for k, s in shapes.items() if k.split(".")[0] not in gone}
    f = tmp_path / "cut.safetensors"
    tl.write_header_only(f, cut)
    file_shapes, _ = pf.read_shapes(f)
    layout, other = pf.layout_from_shapes(file_shapes)
    derived = pf.derive_best(layout, other, file_shapes, models, preferred_factor=8)
    assert derived.form == "class", derived.notes
    assert "ResnetBlock2D" not in derived.preset["unet_target_module"]
    assert "Transformer2DModel" not in derived.preset["unet_target_module"]
    assert _rebuild(derived, models) == cut


def test_no_class_map_fits_falls_back_to_names(author_file, tmp_path):
    """Two attn1.to_q of one class chain with different factors: no class map gives both, so the
    preset names every module, and says why."""
    path, shapes, models = author_file
    odd = dict(shapes)
    name = "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q"
    assert odd[f"{name}.lokr_w1"] == (4, 4)  # CrossAttention: factor 4 on 128 x 128
    odd[f"{name}.lokr_w1"], odd[f"{name}.lokr_w2"] = (8, 8), (16, 16)  # factor 8
    f = tmp_path / "odd.safetensors"
    tl.write_header_only(f, odd)
    file_shapes, _ = pf.read_shapes(f)
    layout, other = pf.layout_from_shapes(file_shapes)
    derived = pf.derive_best(layout, other, file_shapes, models, preferred_factor=8)
    assert derived.form == "per-module"
    assert any("no class-level form" in n for n in derived.notes)
    assert derived.module_configs[name]["factor"] == 8


@pytest.mark.sdscripts
def test_class_form_on_sdxl(sd_scripts, tmp_path):
    """The author's config on sd-scripts' SDXL (meta device): 1058 LoKr + 256 norm modules,
    384,645,360 parameters; the class form gives the author's factors back and rebuilds exactly."""
    from kxl_train import lokr_preset as lp
    from kxl_train.sdxl_shapes import meta_models

    count = lp.count_network(sd_scripts, sx.AUTHOR_NETWORK_ARGS + [f"preset={sx.AUTHOR_PRESET}"],
                             sx.AUTHOR_NETWORK_DIM, float(sx.AUTHOR_NETWORK_ALPHA))
    shapes = pf.shapes_of_count(count)
    f = tmp_path / "author-sdxl.safetensors"
    tl.write_header_only(f, {f"{n}.{p}": s for n, ps in shapes.items() for p, s in ps.items()})
    file_shapes, _ = pf.read_shapes(f)
    layout, other = pf.layout_from_shapes(file_shapes)
    assert (len(layout), len(pf.norm_modules(other)), count.params) == (1058, 256, 384_645_360)
    unet, te1, te2 = meta_models(sd_scripts)
    derived = pf.derive_best(layout, other, file_shapes, (unet, [te1, te2]), preferred_factor=8)
    assert derived.form == "class", derived.notes
    cmap = derived.preset["module_algo_map"]
    for cls, conf in AUTHOR["module_algo_map"].items():
        assert (cmap[cls]["factor"] if cls in cmap else AUTHOR_DEFAULT) == conf["factor"], cls
    assert set(derived.preset["unet_target_module"]) == set(AUTHOR["unet_target_module"])
    assert set(derived.preset["text_encoder_target_module"]) == set(AUTHOR["text_encoder_target_module"])
    assert pf.build_shapes(derived, (unet, [te1, te2])) == shapes


@pytest.mark.sdscripts
def test_the_cli_finds_sdxls_tree(sd_scripts, tmp_path):
    """With sd-scripts at hand the CLI writes the class form of the author's SDXL file."""
    from kxl_train import lokr_preset as lp

    count = lp.count_network(sd_scripts, sx.AUTHOR_NETWORK_ARGS + [f"preset={sx.AUTHOR_PRESET}"],
                             sx.AUTHOR_NETWORK_DIM, float(sx.AUTHOR_NETWORK_ALPHA))
    f = tmp_path / "author-sdxl.safetensors"
    tl.write_header_only(f, {f"{m.name}.{p}": s for m in count.modules for p, s in m.tensors.items()})
    out = tmp_path / "found.toml"
    res = subprocess.run([sys.executable, "-m", "kxl_train.cli", "preset-from", str(f), "--out", str(out), "--no-compare"],
                         capture_output=True, text=True, timeout=600,
                         env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "KXL_SD_SCRIPTS": str(sd_scripts)})
    assert res.returncode == 0, res.stderr
    assert "class form, 1058 LoKr modules, 256 norm modules" in res.stdout and "train_norm=True" in res.stdout
    found = load_preset(out)
    assert {c: m["factor"] for c, m in found["module_algo_map"].items()} == {"CrossAttention": 4, "FeedForward": 2}
