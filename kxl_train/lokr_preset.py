"""The Epsilon LyCORIS LoKr preset: validation and an exact count of what it creates.

The count instantiates sd-scripts' SDXL UNet (library/sdxl_original_unet.py) and the two CLIP
text encoders on the `meta` device (no memory), builds the LyCORIS network exactly as
`--network_module lycoris.kohya` does (lycoris.kohya.create_network), and reports every module:
its name, the shapes of lokr_w1 / lokr_w2 (or the norm weights, `train_norm`) and its parameter
count; what each target name / pattern of the preset matched; and the factors that do not divide
the layer they were asked for.

    kxl-train lokr-count [--recipe recipes/epsilon-rev1.toml] [--modules]
"""
from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from kxl_common.upstream import REPO_ROOT
# load_preset / PresetError live in kxl_train.lycoris_preset (the recipe checks presets too); they
# are re-exported here for the callers that count.
from kxl_train.lycoris_preset import PRESET_PATH, PresetError, load_preset, preset_problems  # noqa: F401
from kxl_train.sdxl_shapes import meta_models

FILE_LIMIT_BYTES = 800 * 10**6  # "the raw LoKr file is under 800 MB"


@dataclass
class LokrModuleInfo:
    name: str
    target_class: str  # class of the layer it wraps (Linear / Conv2d / GroupNorm / LayerNorm)
    w1: tuple
    w2: tuple
    params: int
    org_shape: tuple = ()  # weight shape of the wrapped layer
    tensors: dict = field(default_factory=dict)  # {param: shape} as the saved file will hold them
    kind: str = "lokr"  # "lokr", or "norm" (train_norm: the norm layer's own weight and bias)
    factor: int | None = None  # the factor LyCORIS was given for this module
    factor_from: str = ""  # "network_args" or "preset"


@dataclass
class TargetMatch:
    """One unet/text-encoder target name of the preset and the model paths it matched."""
    part: str  # "unet" or "te"
    target: str
    matched: list[tuple[str, str, bool]] = field(default_factory=list)  # (path, class, got a module)


@dataclass
class NetworkCount:
    modules: list[LokrModuleInfo] = field(default_factory=list)
    targets: list[TargetMatch] = field(default_factory=list)
    preset_path: str = ""
    preset: dict = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def missing_unet_names(self) -> list[str]:
        return [t.target for t in self.targets if t.part == "unet" and not t.matched]

    @property
    def missing_te_names(self) -> list[str]:
        return [t.target for t in self.targets if t.part == "te" and not t.matched]

    def of_kind(self, kind: str) -> list[LokrModuleInfo]:
        return [m for m in self.modules if m.kind == kind]

    def by_prefix(self) -> dict[str, tuple[int, int]]:
        out: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for m in self.modules:
            prefix = m.name.split("_")[1]  # unet / te1 / te2
            out[prefix][0] += 1
            out[prefix][1] += m.params
        return {k: (v[0], v[1]) for k, v in out.items()}

    def file_bytes(self, bytes_per_param: int) -> int:
        """Tensor bytes of the saved file: every tensor (a LoKr module's scalar alpha too)."""
        return sum(math.prod(shape) for m in self.modules for shape in m.tensors.values()) * bytes_per_param


# LycorisNetworkKohya.apply_preset writes the preset into CLASS attributes, and only the keys the
# preset names: a second network built in the same process would inherit the first one's rest.
_PRESET_CLASS_ATTRS = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                       "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME",
                       "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")


@contextlib.contextmanager
def lycoris_class_state():
    """Restore LycorisNetworkKohya's preset class attributes after building a network."""
    from lycoris.kohya import LycorisNetworkKohya

    saved = {a: getattr(LycorisNetworkKohya, a) for a in _PRESET_CLASS_ATTRS}
    try:
        yield
    finally:
        for a, v in saved.items():
            setattr(LycorisNetworkKohya, a, v)


@contextlib.contextmanager
def recording_lokr_factor():
    """LyCORIS' LokrModule, for the length of a count, keeps the factor it was given (it only
    uses it in __init__) and where it came from: network_args hand it over as the text of
    `factor=8`, a preset table as a TOML integer."""
    from lycoris import wrapper
    from lycoris.modules.lokr import LokrModule

    class FactorRecordingLokr(LokrModule):
        def __init__(self, *args, factor=-1, **kwargs):
            super().__init__(*args, factor=factor, **kwargs)
            self.kxl_factor = int(factor)
            self.kxl_factor_from = "network_args" if isinstance(factor, str) else "preset"

    saved = wrapper.network_module_dict["lokr"]
    wrapper.network_module_dict["lokr"] = FactorRecordingLokr
    try:
        yield
    finally:
        wrapper.network_module_dict["lokr"] = saved


@contextlib.contextmanager
def quiet_lycoris():
    """LyCORIS logs every module class and every full-matrix fallback at INFO / WARNING; a count
    reports them itself."""
    from lycoris.logging import logger

    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)


def network_kwargs(network_args: list[str]) -> dict:
    """`--network_args key=value ...` as sd-scripts hands them to create_network."""
    kwargs = {}
    for item in network_args:
        key, value = item.split("=", 1)
        kwargs[key.strip()] = value.strip()
    return kwargs


def _module_info(lora) -> LokrModuleInfo:
    w1 = getattr(lora, "lokr_w1", None)
    w2 = getattr(lora, "lokr_w2", None)
    org = lora.org_module[0]
    is_norm = type(lora).__name__ == "NormModule"
    return LokrModuleInfo(
        name=lora.lora_name, target_class=type(org).__name__,
        w1=tuple(w1.shape) if w1 is not None else (), w2=tuple(w2.shape) if w2 is not None else (),
        params=sum(p.numel() for p in lora.parameters()),
        org_shape=tuple(getattr(lora, "shape", ())) or tuple(org.weight.shape),
        tensors={k: tuple(v.shape) for k, v in lora.state_dict().items()},
        kind="norm" if is_norm else "lokr",
        factor=getattr(lora, "kxl_factor", None), factor_from=getattr(lora, "kxl_factor_from", ""))


def _target_matches(network, part: str, roots, targets, created: set[str], prefixes) -> list[TargetMatch]:
    """Each target name and the model paths LyCORIS matches it with: the exact name, or the
    network's own match_fn (re.match, or fnmatch when the preset sets use_fnmatch)."""
    out = []
    for target in targets:
        tm = TargetMatch(part, target)
        for root, prefix in zip(roots, prefixes):
            for path, module in root.named_modules():
                if path and not network.is_excluded(path) and (path == target or network.match_fn(target, path)):
                    got = f"{prefix}_{path}".replace(".", "_") in created
                    if (path, type(module).__name__, got) not in tm.matched:
                        tm.matched.append((path, type(module).__name__, got))
        out.append(tm)
    return out


def count_network(sd_scripts: Path, network_args: list[str], network_dim: int, network_alpha: float,
                  models=None) -> NetworkCount:
    """Build the LyCORIS network on meta models and describe every module it creates.

    `models` (unet, [text encoders]) replaces sd-scripts' SDXL models (tests use tiny ones)."""
    import torch
    from lycoris import kohya

    if models is None:
        unet, te1, te2 = meta_models(sd_scripts)
        tes = [te1, te2]
    else:
        unet, tes = models
    kwargs = network_kwargs(network_args)
    preset = load_preset(kwargs["preset"]) if "preset" in kwargs and kwargs["preset"].endswith(".toml") else {}
    count = NetworkCount(preset_path=kwargs.get("preset", ""), preset=preset)
    with torch.device("meta"), lycoris_class_state(), recording_lokr_factor(), quiet_lycoris():
        try:
            network = kohya.create_network(1.0, network_dim, network_alpha, None, tes, unet, **kwargs)
        except AssertionError as exc:  # LyCORIS asserts, e.g. a name target inside a class target
            raise PresetError(f"LyCORIS refuses network_args {' '.join(network_args)}: {exc}; fix: name each "
                              "module once (a target name must not lie inside a targeted module class)") from None
        count.modules = [_module_info(lora) for lora in network.unet_loras + network.text_encoder_loras]
        created = {m.name for m in count.modules}
        te_prefixes = [f"{network.LORA_PREFIX_TEXT_ENCODER}{i + 1}" for i in range(len(tes))] \
            if len(tes) > 1 else [network.LORA_PREFIX_TEXT_ENCODER]
        count.targets = (
            _target_matches(network, "unet", [unet], preset.get("unet_target_name", []), created,
                            [network.LORA_PREFIX_UNET])
            + _target_matches(network, "te", tes, preset.get("text_encoder_target_name", []), created, te_prefixes))
    return count


def w1_factor(info: LokrModuleInfo) -> int:
    """The Kronecker factor a module ended up with (the larger side of lokr_w1)."""
    return max(info.w1) if info.w1 else 1


def factor_problems(count: NetworkCount, network_factor: str | None = None) -> list[str]:
    """Factors f that do not divide a side d >= f of a layer they apply to: LyCORIS then silently
    falls back to another split (its `factorization`), so the file is not what the preset says.
    A side smaller than f (conv_in's 4 input channels at factor 8) cannot hold an f x f block at
    all; LyCORIS splits it as evenly as it can (2 x 2), as the author's own config does."""
    bad: dict[tuple, dict] = {}
    for m in count.of_kind("lokr"):
        f = m.factor
        if not f or f < 1:
            continue
        for side, d in zip(("out", "in"), m.org_shape[:2]):
            if d >= f and d % f:
                entry = bad.setdefault((f, m.factor_from), {"sides": set(), "modules": []})
                entry["sides"].add(d)
                if m.name not in entry["modules"]:
                    entry["modules"].append(m.name)
    lines = []
    for (f, source), entry in sorted(bad.items()):
        sides, names = sorted(entry["sides"]), entry["modules"]
        fits = [k for k in range(2, 17) if all(d % k == 0 for d in sides)]
        if source == "network_args":
            where = f"network_args factor={network_factor or f}"
        else:
            keys = [f"[{table}.{name}] factor = {f}" for table in ("module_algo_map", "name_algo_map")
                    for name, conf in (count.preset.get(table) or {}).items() if conf.get("factor") == f]
            where = f"{count.preset_path}: " + (" / ".join(keys) or f"factor = {f}")
        lines.append(f"{where}: {f} does not divide the layer side(s) {', '.join(map(str, sides))} of "
                     f"{len(names)} module(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}), so LyCORIS "
                     "would silently split them otherwise; fix: a factor that divides "
                     + (f"them all: {', '.join(map(str, fits))}" if fits else "each side"))
    return lines


def target_problems(count: NetworkCount) -> list[str]:
    key = {"unet": "unet_target_name", "te": "text_encoder_target_name"}
    return [f"{count.preset_path}: {key[t.part]} {t.target!r} matches no module of the model; fix: a module "
            "path of sd-scripts' SDXL (SGM names: input_blocks.0.0, time_embed.0, out.2, ...) or a regular "
            "expression LyCORIS matches with re.match (fnmatch with use_fnmatch = true)"
            for t in count.targets if not t.matched]


def network_problems(count: NetworkCount, network_args: list[str] = ()) -> list[str]:
    """Every error of a built network: target names matching nothing, factors not dividing."""
    return target_problems(count) + factor_problems(count, network_kwargs(list(network_args)).get("factor"))


def target_lines(count: NetworkCount) -> list[str]:
    """What each target name / pattern matched (a path without a module has nothing to train)."""
    key = {"unet": "unet_target_name", "te": "text_encoder_target_name"}
    lines = []
    for t in count.targets:
        if not t.matched:
            continue
        what = ", ".join(f"{p}" if got else f"{p} ({cls}: nothing to train)" for p, cls, got in t.matched)
        lines.append(f"{key[t.part]} {t.target!r} matched {what}")
    return lines


def summary_lines(count: NetworkCount) -> list[str]:
    lines = []
    for prefix, (n, params) in sorted(count.by_prefix().items()):
        lines.append(f"{prefix:5s} {n:5d} modules {params:13,d} params")
    lokr, norm = count.of_kind("lokr"), count.of_kind("norm")
    lines.append(f"total {len(count.modules):5d} modules {count.params:13,d} params "
                 f"({len(lokr)} LoKr, {len(norm)} norm)")
    lines.append(f"file  fp16 {count.file_bytes(2) / 1e6:8.1f} MB   fp32 {count.file_bytes(4) / 1e6:8.1f} MB (tensors)")
    factors = collections.Counter(w1_factor(m) for m in lokr)
    lines.append("w1 factors: " + ", ".join(f"{f}: {n} modules" for f, n in sorted(factors.items())))
    low_rank = [m.name for m in lokr if "lokr_w2" not in m.tensors]
    lines.append("lokr_w2: full matrix in every LoKr module" if not low_rank
                 else f"lokr_w2: low rank in {len(low_rank)} modules ({', '.join(low_rank[:3])}, ...)")
    return lines


def one_line(count: NetworkCount) -> str:
    factors = collections.Counter(w1_factor(m) for m in count.of_kind("lokr"))
    return (f"{len(count.of_kind('lokr'))} LoKr + {len(count.of_kind('norm'))} norm modules, {count.params:,} "
            f"parameters, {count.file_bytes(2) / 1e6:.1f} MB at fp16; w1 factors "
            + ", ".join(f"{f}: {n}" for f, n in sorted(factors.items())))


def main(argv: list[str] | None = None) -> None:
    import click

    from kxl_common.upstream import require_sd_scripts

    @click.command()
    @click.option("--recipe", type=click.Path(exists=True, dir_okay=False),
                  default=str(REPO_ROOT / "recipes" / "epsilon-rev1.toml"), show_default=True,
                  help="Recipe whose network_* settings to use.")
    @click.option("--modules", is_flag=True, help="List every module.")
    def cli(recipe, modules):
        """Count the LoKr modules and parameters a recipe's preset creates on SDXL."""
        from kxl_train.recipe import RecipeError, load_recipe, resolved_network_args

        try:
            values = load_recipe(recipe)
            args = resolved_network_args(values, Path(recipe))
            count = count_network(require_sd_scripts(), args, int(values["network_dim"]),
                                  float(values["network_alpha"]))
        except (RecipeError, PresetError) as exc:
            raise click.ClickException(str(exc)) from None
        if modules:
            for m in count.modules:
                shapes = f"w1={m.w1} w2={m.w2}" if m.kind == "lokr" else f"norm {m.org_shape}"
                click.echo(f"{m.name:80s} {m.target_class:9s} {shapes} {m.params:,d}")
        for line in summary_lines(count) + target_lines(count):
            click.echo(line)
        problems = network_problems(count, args)
        for line in problems:
            click.echo(f"error: {line}", err=True)
        if problems:
            raise SystemExit(1)

    cli.main(args=argv, standalone_mode=True)


_RECIPE_COUNTS: dict[tuple, NetworkCount] = {}


def check_recipe_network(values: dict, recipe_path: str | Path, sd_scripts: Path) -> tuple[NetworkCount | None, list[str]]:
    """(the network a recipe's LyCORIS settings create on SDXL, its problems): target names that
    match nothing, factors that do not divide a layer. (None, []) when the recipe trains no
    LyCORIS network. Built once per process for the same settings (a meta-device build)."""
    from kxl_train.recipe import resolved_network_args

    if values.get("network_module") != "lycoris.kohya":
        return None, []
    args = resolved_network_args(values, Path(recipe_path))
    key = (tuple(args), values.get("network_dim"), values.get("network_alpha"), str(sd_scripts))
    if key not in _RECIPE_COUNTS:
        _RECIPE_COUNTS[key] = count_network(sd_scripts, args, int(values.get("network_dim") or 4),
                                            float(values.get("network_alpha") or 1.0))
    count = _RECIPE_COUNTS[key]
    return count, network_problems(count, args)
