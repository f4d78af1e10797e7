"""The Epsilon LoKr preset (the author's published config) and kxl's compact one: keys LyCORIS
accepts, the author's values, what they create on SDXL (module and parameter counts, factors,
full lokr_w2, norm modules), target patterns matched as LyCORIS matches them, bad presets refused."""
from __future__ import annotations

import json
import math
import re

import pytest

from kxl_common.upstream import REPO_ROOT
from kxl_train import lokr_preset as lp
from kxl_train.recipe import load_recipe, resolved_network_args

PRESET = REPO_ROOT / "recipes" / "lycoris" / "epsilon-lokr.toml"
COMPACT = REPO_ROOT / "recipes" / "lycoris" / "compact-lokr.toml"
PLAN = REPO_ROOT / "kxl_train" / "epsilon_lokr_plan.json"
REV1 = REPO_ROOT / "recipes" / "epsilon-rev1.toml"

# The author's docs/lyco_config.toml (KBlueLeaf/Kohaku-XL-Delta @ a3a596a4), written out here from
# the published file's values, independently of the preset in recipes/.
AUTHOR = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": [r".*time_embed\..+", r".*label_emb\..+", r".*input_blocks\.0.+", r"^out\..+"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
    "module_algo_map": {
        "CrossAttention": {"algo": "lokr", "dim": 10000, "alpha": 10000, "factor": 4},
        "FeedForward": {"algo": "lokr", "dim": 10000, "alpha": 10000, "factor": 2},
        "CLIPAttention": {"algo": "lokr", "dim": 10000, "alpha": 10000, "factor": 8},
        "CLIPMLP": {"algo": "lokr", "dim": 10000, "alpha": 10000, "factor": 8},
    },
}
# Factor per module kind: the author's map, else the network_args default (factor=8).
AUTHOR_FACTOR = {"attn": 4, "ff": 2, "proj": 8, "resnet": 8, "resample": 8, "named": 8, "te_attn": 8, "te_mlp": 8}
COMPACT_FACTOR = {"attn": 4, "ff": 4, "proj": 4, "resnet": 4, "resample": 8, "named": 2, "te_attn": 4, "te_mlp": 8}
# SDXL: 70 transformer blocks x (attn1 q/k/v/out + attn2 q/k/v/out + ff in/out) + 11 transformers'
# proj_in/out + 17 ResNet blocks x 3 layers + 11 skip convs + 2 down + 2 up + 6 named layers.
LOKR_KINDS = {"attn": 70 * 8, "ff": 70 * 2, "proj": 11 * 2, "resnet": 17 * 3 + 11, "resample": 4, "named": 6,
              "te_attn": (12 + 32) * 4, "te_mlp": (12 + 32) * 2}
# train_norm: each transformer's GroupNorm and its blocks' norm1/2/3, each ResNet block's two
# GroupNorms, and out.0 (the final GroupNorm, matched by the author's `^out\..+`).
NORM_KINDS = {"transformer_norm": 11 + 70 * 3, "resnet_norm": 17 * 2, "out_norm": 1}


def kind_of(name: str) -> str:
    if name.startswith("lora_te"):
        return "te_attn" if "_self_attn_" in name else "te_mlp"
    if re.search(r"_(attn1|attn2)_", name):
        return "attn"
    if "_ff_net_" in name:
        return "ff"
    if name.endswith(("_proj_in", "_proj_out")):
        return "proj"
    if name.endswith(("_in_layers_2", "_emb_layers_1", "_out_layers_3", "_skip_connection")):
        return "resnet"
    if name.endswith(("_op", "_conv")):
        return "resample"
    return "named"


def norm_kind(name: str) -> str:
    if name == "lora_unet_out_0":
        return "out_norm"
    if name.endswith(("_in_layers_0", "_out_layers_0")):
        return "resnet_norm"
    assert re.search(r"_(norm|norm[123])$", name), name
    return "transformer_norm"


def lycoris_split(dim: int, factor: int) -> int:
    """The w1 side LyCORIS should give a layer side: the factor when it divides the side (and fits),
    else the most even split (a 4-wide side at factor 8 -> 2 x 2). Written from the rule, not copied
    from lycoris.functional.factorization."""
    if dim % factor == 0 and factor * factor <= dim:
        return factor
    return max(m for m in range(1, math.isqrt(dim) + 1) if dim % m == 0 and m <= factor)


def expected_lokr(org_shape: tuple, factor: int) -> tuple[tuple, tuple, int]:
    """(w1, w2, params) of a full-matrix LoKr module on a layer of `org_shape`."""
    out_dim, in_dim, *kernel = org_shape
    a, c = lycoris_split(out_dim, factor), lycoris_split(in_dim, factor)
    w2 = (out_dim // a, in_dim // c, *kernel)
    return (a, c), w2, a * c + math.prod(w2)


def header_numbers(path) -> dict[str, tuple[int, int]]:
    text = path.read_text()
    found = {}
    for label in ("UNet", "TE1", "TE2", "total"):
        m = re.search(rf"#\s+{label}\s+(\d+) modules\s+([\d,]+) params", text)
        found[label] = (int(m.group(1)), int(m.group(2).replace(",", "")))
    return found


def test_preset_is_the_authors_config_and_lycoris_accepts_it():
    assert lp.load_preset(PRESET) == AUTHOR
    assert "a3a596a4598e55f874560103c1c7b4195087df02" in PRESET.read_text()  # its provenance


def test_compact_preset_is_accepted_and_says_how_it_differs():
    data = lp.load_preset(COMPACT)
    for table in ("module_algo_map", "name_algo_map"):
        for name, conf in data[table].items():
            assert conf["algo"] == "lokr" and conf["full_matrix"] is True and 2 <= conf["factor"] <= 8, name
    text = COMPACT.read_text()
    assert "epsilon-lokr.toml" in text and "instead of" in text


def test_recipes_use_the_authors_network_settings():
    for path in (REV1, REPO_ROOT / "recipes" / "epsilon-rev2.toml"):
        v = load_recipe(path)
        assert v["network_module"] == "lycoris.kohya" and (v["network_dim"], v["network_alpha"]) == (10000, 10000)
        args = dict(a.split("=", 1) for a in resolved_network_args(v, path))
        assert args == {"conv_dim": "10000", "conv_alpha": "10000", "algo": "lokr", "dropout": "0", "factor": "8",
                        "train_norm": "True", "preset": str(PRESET)}


@pytest.mark.parametrize("edit,message", [
    (lambda t: "unet_target_modules = []\n" + t,
     r"preset key unet_target_modules = \[\] is not one LyCORIS reads; fix: did you mean 'unet_target_module'\?"),
    (lambda t: t + "ranks = 4\n",
     r"\[module_algo_map.CLIPMLP\] ranks = 4: algo 'lokr' takes no option 'ranks'; fix: "),
    (lambda t: t.replace('algo = "lokr"\ndim = 10000\nalpha = 10000\nfactor = 2', 'algo = "lokrr"\nfactor = 2'),
     r"\[module_algo_map.FeedForward\] algo = 'lokrr' is not a LyCORIS algorithm; fix: did you mean 'lokr'\?"),
    (lambda t: t.replace("factor = 2", "factor = 0"), r"\[module_algo_map.FeedForward\] factor = 0 is not a Kronecker factor"),
])
def test_bad_preset_names_key_value_and_fix(tmp_path, edit, message):
    bad = tmp_path / "p.toml"
    bad.write_text(edit(PRESET.read_text()))
    with pytest.raises(lp.PresetError, match=message):
        lp.load_preset(bad)


def test_committed_plan_is_the_authors_config_module_by_module():
    """The committed plan (LyCORIS on sd-scripts' SDXL, kxl-train lokr-plan --write) against the
    author's factors per kind, computed from each layer's shape; runs without sd-scripts."""
    modules = json.loads(PLAN.read_text())["modules"]
    lokr_kinds, norm_kinds, total = {}, {}, 0
    for name, tensors in modules.items():
        if "w_norm" in tensors:
            assert set(tensors) == {"w_norm", "b_norm"} and tensors["w_norm"] == tensors["b_norm"], name
            norm_kinds[norm_kind(name)] = norm_kinds.get(norm_kind(name), 0) + 1
            total += 2 * tensors["w_norm"][0]
            continue
        assert set(tensors) == {"alpha", "lokr_w1", "lokr_w2"}, name  # full lokr_w2: no w2_a / w2_b
        (a, c), (b, d, *kernel) = tensors["lokr_w1"], tensors["lokr_w2"]
        w1, w2, params = expected_lokr((a * b, c * d, *kernel), AUTHOR_FACTOR[kind_of(name)])
        assert (tuple(tensors["lokr_w1"]), tuple(tensors["lokr_w2"])) == (w1, w2), name
        lokr_kinds[kind_of(name)] = lokr_kinds.get(kind_of(name), 0) + 1
        total += params
    assert lokr_kinds == LOKR_KINDS and norm_kinds == NORM_KINDS
    assert header_numbers(PRESET)["total"] == (len(modules), total)


@pytest.fixture(scope="module")
def author_count(sd_scripts):
    v = load_recipe(REV1)
    return lp.count_network(sd_scripts, resolved_network_args(v, REV1), int(v["network_dim"]), float(v["network_alpha"]))


def count_with(sd_scripts, preset, factor="8"):
    v = load_recipe(REV1)
    args = [a for a in resolved_network_args(v, REV1) if not a.startswith(("preset=", "factor="))]
    return lp.count_network(sd_scripts, args + [f"factor={factor}", f"preset={preset}"],
                            int(v["network_dim"]), float(v["network_alpha"]))


@pytest.mark.sdscripts
@pytest.mark.parametrize("which", ["author", "compact"])
def test_lycoris_count_matches_the_layer_by_layer_computation(sd_scripts, author_count, which):
    count = author_count if which == "author" else count_with(sd_scripts, COMPACT)
    factor_of = AUTHOR_FACTOR if which == "author" else COMPACT_FACTOR
    total, kinds, norms = 0, {}, {}
    for m in count.modules:
        if m.kind == "norm":
            assert m.target_class in ("GroupNorm", "GroupNorm32", "LayerNorm") and m.params == 2 * m.org_shape[0]
            norms[norm_kind(m.name)] = norms.get(norm_kind(m.name), 0) + 1
        else:
            w1, w2, params = expected_lokr(m.org_shape, factor_of[kind_of(m.name)])
            assert (m.w1, m.w2, m.params) == (w1, w2, params), m.name  # lokr_w2 a FULL matrix: no rank
            kinds[kind_of(m.name)] = kinds.get(kind_of(m.name), 0) + 1
        total += m.params
    assert kinds == LOKR_KINDS
    # the compact preset names out.2 exactly: out.0 (a GroupNorm) is not targeted
    assert norms == (NORM_KINDS if which == "author" else {"transformer_norm": 221, "resnet_norm": 34})
    assert total == count.params
    noted = header_numbers(PRESET if which == "author" else COMPACT)
    by = count.by_prefix()
    assert (noted["UNet"], noted["TE1"], noted["TE2"]) == (by["unet"], by["te1"], by["te2"])
    assert noted["total"] == (len(count.modules), count.params)
    fp16 = f"{count.file_bytes(2) / 1e6:.1f} MB at save_precision fp16"
    assert fp16 in (PRESET if which == "author" else COMPACT).read_text()
    assert count.file_bytes(2) < lp.FILE_LIMIT_BYTES  # "under 800 MB" at save_precision fp16


@pytest.mark.sdscripts
def test_authors_patterns_match_as_lycoris_matches_them(author_count):
    """re.match over sd-scripts' SGM module paths: each pattern reported with what it matched."""
    assert lp.network_problems(author_count) == []
    matched = {t.target: [(p, got) for p, _, got in t.matched] for t in author_count.targets}
    assert matched == {
        r".*time_embed\..+": [("time_embed.0", True), ("time_embed.1", False), ("time_embed.2", True)],
        r".*label_emb\..+": [("label_emb.0", False), ("label_emb.0.0", True), ("label_emb.0.1", False),
                             ("label_emb.0.2", True)],
        r".*input_blocks\.0.+": [("input_blocks.0.0", True)],
        r"^out\..+": [("out.0", True), ("out.1", False), ("out.2", True)],
    }
    lines = "\n".join(lp.target_lines(author_count))
    assert "'^out\\\\..+' matched out.0, out.1 (SiLU: nothing to train), out.2" in lines


@pytest.mark.sdscripts
def test_unmatched_name_and_nondividing_factor_are_errors(sd_scripts, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(PRESET.read_text().replace(r'"^out\\..+"', r'"^output\\.9.+", "conv_in"')
                   .replace("factor = 2", "factor = 3"))
    count = count_with(sd_scripts, bad)
    problems = lp.network_problems(count, ["factor=8"])
    assert any(r"unet_target_name '^output\\.9.+' matches no module" in p for p in problems)
    assert any("unet_target_name 'conv_in' matches no module" in p for p in problems)
    ff = [p for p in problems if "[module_algo_map.FeedForward] factor = 3" in p]
    # FeedForward layers are 640..10240 wide: 3 divides none of them
    assert len(ff) == 1 and "does not divide the layer side(s) 640, 1280, 2560, 5120, 10240 of 140 module(s)" in ff[0]
    assert "fix: a factor that divides them all: 2, 4, 5, 8" in ff[0]
    # the network_args default, too
    problems = lp.network_problems(count_with(sd_scripts, PRESET, factor="6"), ["factor=6"])
    assert len(problems) == 1 and problems[0].startswith("network_args factor=6: 6 does not divide")
