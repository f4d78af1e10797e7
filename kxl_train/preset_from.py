"""A LyCORIS preset from a LoKr file's header: the same modules, the same per-module factors.

    kxl-train preset-from kohaku-xl-epsilon-lyco.safetensors --out author-preset.toml

Only the safetensors header is read (names and shapes). A module the file holds was trained;
one it lacks was not. For each module, w1 (a, c) and w2 (b, d[, k...]) give the layer's shape
(a*b, c*d[, k...]) and the factor: LyCORIS 4.1.3's LokrModule builds w1 from
`factorization(out_dim, factor)[0]` and `factorization(in_dim, factor)[0]` (lycoris/modules/
lokr.py, lycoris/functional/general.py), so the derived factor is the first candidate for which
LyCORIS's own `factorization` gives back both w1 sides (max(a, c) whenever the factor divides a
side, which is what a preset factor of 2, 4 or 8 does on SDXL's layers).

The preset names every module on its own, with no class targets, so it creates exactly the
file's modules:
- `unet_target_name` / `text_encoder_target_name` hold one fnmatch pattern per module
  (`use_fnmatch = true`): the module's name after its `lora_unet_` / `lora_teN_` prefix with
  every `_` written `[._]`. LyCORIS names a module `prefix + path.replace(".", "_")` and refuses
  two modules with one name, so the pattern matches exactly the path(s) that get that name.
- `name_algo_map` gives each pattern its algo, factor and full_matrix (low-rank w2: dim = rank).
  LyCORIS looks names up there for name targets (kohya.py find_conf_for_name).
Text encoders share the target names and name_algo_map (LyCORIS matches the path inside each
encoder), so a path trained in TE1 and TE2 must take one factor that fits both; a file where no
factor does is reported, not approximated. Values that are not shapes (alpha of a low-rank
module) are not in the header; full-matrix modules have scale 1 whatever alpha says.
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path

# LokrError and SafetensorsError are imported for callers (the CLI catches them from here).
from kxl_common.errors import KxlError
from kxl_common.toml_file import read_toml
from kxl_common.lokr_layout import (  # noqa: F401
    LokrError, LokrShape, algorithm_of, group_modules, is_network_file, lokr_shape)
from kxl_common.digest import sha256_file
from kxl_common.safetensors_header import SafetensorsError, read_header  # noqa: F401 (re-exported for the CLI)
from kxl_common.upstream import REPO_ROOT
from kxl_train.preset_compact import dims as _dims, fits as _fits

PRESET_PATH = REPO_ROOT / "recipes" / "lycoris" / "epsilon-lokr.toml"
# The module plan our preset creates on SDXL (sd-scripts' UNet, both CLIP encoders), so the
# comparison runs without sd-scripts; `kxl-train lokr-plan --write` regenerates it
# and a test fails while it is stale.
PLAN_PATH = Path(__file__).with_name("epsilon_lokr_plan.json")
REV1_RECIPE = REPO_ROOT / "recipes" / "epsilon-rev1.toml"

# Network-file prefixes of lycoris.kohya (LORA_PREFIX_UNET, LORA_PREFIX_TEXT_ENCODER + index).
UNET_PREFIX = "lora_unet_"
TE_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te3_", "lora_te_")


class PresetFromError(KxlError, ValueError):
    pass


def split_name(name: str) -> tuple[str, str]:
    """('unet' | 'te', name after the prefix) of a lycoris.kohya module name."""
    if name.startswith(UNET_PREFIX):
        return "unet", name[len(UNET_PREFIX):]
    for p in TE_PREFIXES:
        if name.startswith(p):
            return "te", name[len(p):]
    raise PresetFromError(f"module {name!r}: not a lycoris.kohya name (lora_unet_*, lora_te1_*, lora_te2_*)")


def path_pattern(rest: str) -> str:
    """fnmatch pattern of the module paths LyCORIS names `rest` ('.' became '_')."""
    return rest.replace("_", "[._]")


def layout_from_shapes(shapes: dict[str, dict[str, tuple[int, ...]]]) -> tuple[dict[str, LokrShape], dict[str, str]]:
    """({module: LokrShape} of the LoKr modules, {module: algorithm} of the others)."""
    layout, other = {}, {}
    for name, params in shapes.items():
        algo = algorithm_of(params)
        if algo != "lokr":
            other[name] = algo
            continue
        layout[name] = lokr_shape(name, params)
    return layout, other


def read_shapes(path: str | Path) -> tuple[dict[str, dict[str, tuple[int, ...]]], dict]:
    """({module: {param: shape}}, file facts) of a network file, from its header only."""
    header = read_header(path)
    keys = list(header.tensors)
    if not is_network_file(keys):
        raise PresetFromError(f"{path}: not a LoKr / LyCORIS network file (keys lora_unet_*, lora_te1_*, lora_te2_*)")
    modules = group_modules(keys)
    shapes = {n: {p: header.tensors[k].shape for p, k in params.items()} for n, params in modules.items()}
    dtypes = collections.Counter(t.dtype for t in header.tensors.values())
    facts = {"path": str(path), "file_bytes": header.file_size, "tensor_bytes": header.tensor_bytes,
             "metadata_bytes": header.metadata_bytes, "dtypes": dict(dtypes),
             "ss_network_args": header.metadata.get("ss_network_args")}
    return shapes, facts


def read_layout(path: str | Path) -> tuple[dict[str, LokrShape], dict[str, str], dict]:
    """LoKr layout of a network file from its header only; plus non-LoKr modules (norm modules of
    train_norm among them, as "norm") and file facts."""
    shapes, facts = read_shapes(path)
    layout, other = layout_from_shapes(shapes)
    return layout, other, facts


def norm_modules(other: dict[str, str]) -> set[str]:
    """The norm modules (LyCORIS train_norm: w_norm / b_norm) among a file's non-LoKr modules."""
    return {n for n, a in other.items() if a == "norm"}


def find_factor(shapes: list[LokrShape]) -> tuple[int, bool] | None:
    """(factor, unbalanced_factorization) that rebuilds every shape's w1/w2, or None."""
    a, c = shapes[0].w1
    top = max(max(_dims(s)) for s in shapes)
    seen = set()
    for f in [max(a, c), min(a, c), -1, *range(1, top + 1)]:
        if f in seen or f == 0:
            continue
        seen.add(f)
        for unbalanced in (False, True):
            if all(_fits(s, f, unbalanced) for s in shapes):
                return f, unbalanced
    return None


def module_config(shapes: list[LokrShape]) -> dict:
    """The name_algo_map entry for the module(s) behind one pattern."""
    kinds = {(s.w1_low_rank, s.w2_low_rank, s.tucker, s.rank) for s in shapes}
    if len(kinds) > 1:
        raise PresetFromError(
            f"{', '.join(s.name for s in shapes)}: one module path, different kinds of LoKr "
            "(full / low-rank / rank); a LyCORIS preset gives a path one config")
    found = find_factor(shapes)
    if found is None:
        raise PresetFromError(
            f"{', '.join(s.name for s in shapes)}: no LoKr factor gives w1 "
            f"{' and '.join(str(list(s.w1)) for s in shapes)} with w2 {' and '.join(str(list(s.w2)) for s in shapes)}")
    factor, unbalanced = found
    s = shapes[0]
    # full_matrix always written: the network_args value (the recipes pass True) fills a missing key.
    conf = {"algo": "lokr", "factor": factor, "full_matrix": s.full_matrix}
    if not s.full_matrix:
        conf["dim"] = int(s.rank)  # the low-rank half's rank
    if unbalanced:
        conf["unbalanced_factorization"] = True
    return conf


@dataclass
class DerivedPreset:
    preset: dict  # the LyCORIS preset (TOML tables)
    module_configs: dict[str, dict]  # module name -> its config
    notes: list[str] = field(default_factory=list)
    modules: int = 0
    params: int = 0
    norms: int = 0  # norm modules (train_norm)
    network_args: list[str] = field(default_factory=list)  # what the preset needs beside it
    form: str = "per-module"  # or "class": targets by class, module_algo_map + default factor


def derive_preset(layout: dict[str, LokrShape], other: dict[str, str] | None = None) -> DerivedPreset:
    """The preset that makes LyCORIS create exactly `layout`'s modules with their shapes."""
    if not layout:
        raise PresetFromError("the file has no LoKr module: nothing to derive a preset from")
    by_pattern: dict[tuple[str, str], list[LokrShape]] = {}
    for name, shape in layout.items():
        side, rest = split_name(name)
        by_pattern.setdefault((side, path_pattern(rest)), []).append(shape)
    names = {"unet": [], "te": []}
    name_map: dict[str, dict] = {}
    module_configs = {}
    norms = sorted(norm_modules(other or {}))
    for name in norms:  # created by LyCORIS's train_norm for any norm layer a target names
        side, rest = split_name(name)
        names[side].append(path_pattern(rest))
    for (side, pattern), shapes in by_pattern.items():
        conf = module_config(shapes)
        if pattern in name_map and name_map[pattern] != conf:  # a UNet and a TE path alike
            raise PresetFromError(f"pattern {pattern!r} needs two configs ({name_map[pattern]} and {conf})")
        name_map[pattern] = conf
        names[side].append(pattern)
        for s in shapes:
            module_configs[s.name] = conf
    notes = []
    if norms:
        notes.append(f"{len(norms)} norm modules (w_norm / b_norm) are kept: they need network_args train_norm=True")
    left_out = {n: a for n, a in (other or {}).items() if a != "norm"}
    if left_out:
        notes.append(f"{len(left_out)} modules are not LoKr and are left out: "
                     + ", ".join(f"{n} ({a})" for n, a in list(left_out.items())[:5]) + (" ..." if len(left_out) > 5 else ""))
    if any(s.tucker for s in layout.values()):
        notes.append("tucker modules (lokr_t2) need network_args use_tucker=True; a preset cannot set it")
    if any(s.w1_low_rank for s in layout.values()):
        notes.append("low-rank w1 (lokr_w1_a/_b) needs network_args decompose_both=True; a preset cannot set it")
    if any(not s.full_matrix for s in layout.values()):
        notes.append("low-rank modules: alpha is a value, not in the header; set it in network_args (network_alpha)")
    preset = {
        "enable_conv": True,  # 3x3 convs need it (conv_lora_dim); it adds no module: all targets are names
        "use_fnmatch": True,
        "unet_target_module": [],
        "unet_target_name": names["unet"],
        "text_encoder_target_module": [],
        "text_encoder_target_name": names["te"],
        "exclude_name": [],
        "module_algo_map": {},
        "name_algo_map": name_map,
    }
    return DerivedPreset(preset, module_configs, notes, len(layout), sum(s.params for s in layout.values()),
                         norms=len(norms), network_args=["algo=lokr"] + (["train_norm=True"] if norms else []))


def derive_class_preset(layout: dict[str, LokrShape], other: dict[str, str] | None, models,
                        preferred_factor: int | None = None) -> DerivedPreset:
    """The compact form (kxl_train.preset_compact) on `models`' module tree, checked by building it
    with LyCORIS; PresetFromError saying why when the file does not allow it."""
    from kxl_train.preset_compact import CompactError, Config, derive_compact

    left_out = {n: a for n, a in (other or {}).items() if a != "norm"}
    if left_out:
        raise PresetFromError(f"no class-level form: {len(left_out)} modules are not LoKr (e.g. {next(iter(left_out))})")
    preferred = Config(preferred_factor, False, True, None) if preferred_factor else None
    try:
        compact = derive_compact(layout, norm_modules(other or {}), models, preferred)
    except CompactError as exc:
        raise PresetFromError(f"no class-level form: {exc}") from exc
    args = ["algo=lokr", *compact.default.network_args()] + (["train_norm=True"] if compact.train_norm else [])
    dim = compact.default.rank if not compact.default.full_matrix else 100000
    derived = DerivedPreset(compact.preset, {n: c.table() for n, c in compact.module_configs.items()}, [],
                            len(layout), sum(s.params for s in layout.values()), norms=len(norm_modules(other or {})),
                            network_args=args + ([f"(network_dim={dim})"] if not compact.default.full_matrix else []),
                            form="class")
    return derived


def build_shapes(derived: DerivedPreset, models) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module: {param: shape}} LyCORIS creates from a derived preset and its network_args on `models`
    (meta device)."""
    import tempfile

    import tomli_w

    from kxl_train import lokr_preset as lp

    args = [a for a in derived.network_args if not a.startswith("(")]
    dim = next((int(a[len("(network_dim="):-1]) for a in derived.network_args if a.startswith("(network_dim=")), 100000)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "preset.toml"
        path.write_text(tomli_w.dumps(derived.preset))
        count = lp.count_network(None, args + [f"preset={path}"], dim, 1.0, models=models)
    return shapes_of_count(count)


def shape_differences(built: dict, file_shapes: dict, limit: int = 3) -> list[str]:
    """What differs between two {module: {param: shape}} maps (empty when they are the same)."""
    out = [f"{n}: only in the file" for n in file_shapes if n not in built][:limit]
    out += [f"{n}: only in the rebuilt network" for n in built if n not in file_shapes][:limit]
    out += [f"{n}: file {file_shapes[n]} rebuilt {built[n]}" for n in file_shapes
            if n in built and {p: tuple(s) for p, s in file_shapes[n].items()} != built[n]][:limit]
    return out


def derive_best(layout: dict[str, LokrShape], other: dict[str, str], file_shapes: dict, models=None,
                preferred_factor: int | None = None) -> DerivedPreset:
    """The class-level form when a module tree is given and LyCORIS rebuilds the file from it;
    otherwise one name per module, with a note saying why."""
    per_module = derive_preset(layout, other)
    if models is None:
        per_module.notes.append("one name per module: the class-level form needs the model's module tree "
                                "(sd-scripts' SDXL: KXL_SD_SCRIPTS or the submodule)")
        return per_module
    try:
        derived = derive_class_preset(layout, other, models, preferred_factor)
        diffs = shape_differences(build_shapes(derived, models), file_shapes)
        if diffs:
            raise PresetFromError("no class-level form: LyCORIS does not rebuild the file from it (" + "; ".join(diffs) + ")")
    except PresetFromError as exc:
        per_module.notes.append(str(exc))
        return per_module
    return derived


def sdxl_tree():
    """(unet, [te1, te2]) of sd-scripts' SDXL on the meta device, or None without sd-scripts."""
    from kxl_common.upstream import find_sd_scripts
    from kxl_train.sdxl_shapes import meta_models

    sd = find_sd_scripts()
    if sd is None:
        return None
    unet, te1, te2 = meta_models(sd)
    return unet, [te1, te2]


def recipe_default_factor(recipe: Path = REV1_RECIPE) -> int | None:
    """The network_args factor of the recipe (the default a class-level form should keep)."""
    from kxl_train.recipe import load_recipe, resolved_network_args

    values = load_recipe(recipe)
    for arg in resolved_network_args(values, recipe):
        key, _, value = arg.partition("=")
        if key.strip() == "factor":
            return int(value)
    return None


def preset_toml(derived: DerivedPreset, source: str, facts: dict | None = None) -> str:
    import tomli_w

    factors = collections.Counter(c["factor"] for c in derived.module_configs.values())
    head = [
        f"# LyCORIS preset derived by `kxl-train preset-from` from {source} (header only).",
        f"# {derived.modules} LoKr modules, {derived.params:,} parameters, {derived.norms} norm modules (train_norm)"
        + (f", file {facts['file_bytes']:,} bytes {facts['dtypes']}" if facts else "") + ".",
        "# factors: " + ", ".join(f"{f}: {n} modules" for f, n in sorted(factors.items())),
    ]
    if derived.form == "per-module":
        head += [
            "# Every module is named on its own (fnmatch, '[._]' where LyCORIS wrote '_'); a module the",
            "# file lacks was not trained. Use: network_args " + " ".join(derived.network_args) + " preset=THIS_FILE",
            "# (with full_matrix and factor set per module here, the network_args defaults do not change any module).",
        ]
    else:
        head += [
            "# Targets by class and by regular expression (re.match); a factor per module class (module_algo_map),",
            "# every other module takes the network_args default. Checked: LyCORIS builds the file's very keys",
            "# and shapes from it on the model's module tree.",
            "# Use: network_args " + " ".join(derived.network_args) + " preset=THIS_FILE",
        ]
    head += [f"# note: {n}" for n in derived.notes]
    return "\n".join(head) + "\n\n" + tomli_w.dumps(derived.preset)


# ---- the comparison with a preset -------------------------------------------------------------

def shapes_of_count(count) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module: {param: shape}} of a kxl_train.lokr_preset.NetworkCount."""
    return {m.name: dict(m.tensors) for m in count.modules}


def expand_preset(preset: str | Path, sd_scripts: Path | None = None, models=None,
                  network_args: list[str] | None = None) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module: {param: shape}} that LyCORIS creates from `preset` with the rev1 recipe's
    network_args (sd-scripts' SDXL models on the meta device, or `models`)."""
    from kxl_train import lokr_preset as lp
    from kxl_train.recipe import load_recipe, resolved_network_args

    values = load_recipe(REV1_RECIPE)
    args = network_args if network_args is not None else resolved_network_args(values, REV1_RECIPE)
    args = [a for a in args if not a.startswith("preset=")] + [f"preset={preset}"]
    count = lp.count_network(sd_scripts, args, int(values["network_dim"]), float(values["network_alpha"]), models=models)
    return shapes_of_count(count)


def plan_record(shapes: dict, preset: Path = PRESET_PATH) -> dict:
    from importlib.metadata import version

    return {"preset": preset.name, "preset_sha256": sha256_file(preset), "lycoris": version("lycoris-lora"),
            "modules": {n: {p: list(s) for p, s in params.items()} for n, params in shapes.items()}}


def plan_json(record: dict) -> str:
    """One module a line: small diffs when the preset changes."""
    head = {k: v for k, v in record.items() if k != "modules"}
    lines = [json.dumps(head)[:-1] + ', "modules": {']
    items = list(record["modules"].items())
    lines += [f"  {json.dumps(n)}: {json.dumps(p, separators=(',', ':'))}" + ("," if i < len(items) - 1 else "")
              for i, (n, p) in enumerate(items)]
    return "\n".join(lines + ["}}"]) + "\n"


def reference_shapes(preset: str | Path = PRESET_PATH) -> tuple[dict, str]:
    """(module shapes the preset creates on SDXL, where they came from): the committed plan when
    the preset is ours and unchanged, else a meta-device build (needs sd-scripts)."""
    preset = Path(preset)
    read_toml(preset, what="LyCORIS preset", error=PresetFromError)  # missing, a folder, not TOML: one line
    if PLAN_PATH.is_file():
        plan = json.loads(PLAN_PATH.read_text())
        if plan["preset_sha256"] == sha256_file(preset):
            return ({n: {p: tuple(s) for p, s in ps.items()} for n, ps in plan["modules"].items()},
                    f"{PLAN_PATH.name} (LyCORIS {plan['lycoris']} on SDXL)")
    from kxl_common.upstream import find_sd_scripts

    sd = find_sd_scripts()
    if sd is None:
        raise PresetFromError(
            f"comparing with {preset} needs the modules it creates on SDXL: built from sd-scripts' UNet "
            "(git submodule update --init third_party/sd-scripts, or KXL_SD_SCRIPTS=...)")
    return expand_preset(preset, sd), f"LyCORIS on sd-scripts' SDXL (meta device), {sd}"


def _factor(s: LokrShape) -> int:
    return max(s.w1)


def compare_layouts(file_layout: dict[str, LokrShape], ref_layout: dict[str, LokrShape],
                    file_norms: set[str] = frozenset(), ref_norms: set[str] = frozenset()) -> dict:
    """Modules on one side only, factor / shape differences, parameter counts and sizes; and the
    norm modules (train_norm) of each side."""
    only_file = [n for n in file_layout if n not in ref_layout]
    only_ref = [n for n in ref_layout if n not in file_layout]
    differ = []
    for n, s in file_layout.items():
        r = ref_layout.get(n)
        if r is None:
            continue
        if (s.w1, s.w2, s.w1_low_rank, s.w2_low_rank, s.tucker, s.rank) != (r.w1, r.w2, r.w1_low_rank, r.w2_low_rank, r.tucker, r.rank):
            differ.append({"name": n, "file_w1": list(s.w1), "file_w2": list(s.w2), "preset_w1": list(r.w1),
                           "preset_w2": list(r.w2), "file_full": s.full_matrix, "preset_full": r.full_matrix,
                           "file_params": s.params, "preset_params": r.params})
    moves = collections.Counter((_factor(ref_layout[d["name"]]), _factor(file_layout[d["name"]])) for d in differ)

    def side(layout):
        params = sum(s.params for s in layout.values())
        return {"modules": len(layout), "params": params, "fp16_bytes": 2 * params, "fp32_bytes": 4 * params,
                "factors": dict(sorted(collections.Counter(_factor(s) for s in layout.values()).items()))}

    norms = {"file": len(file_norms), "preset": len(ref_norms), "only_file": sorted(set(file_norms) - set(ref_norms)),
             "only_preset": sorted(set(ref_norms) - set(file_norms))}
    return {"file": side(file_layout), "preset": side(ref_layout), "only_file": only_file, "only_preset": only_ref,
            "factor_differs": differ, "factor_moves": {f"{a}->{b}": n for (a, b), n in sorted(moves.items())},
            "norms": norms, "same": not (only_file or only_ref or differ or norms["only_file"] or norms["only_preset"])}


def format_comparison(cmp: dict, file_label: str, preset_label: str, facts: dict | None = None, limit: int = 12) -> list[str]:
    f, p = cmp["file"], cmp["preset"]
    lines = [f"file   {file_label}: {f['modules']} modules, {f['params']:,} params"
             + (f", {facts['file_bytes']:,} bytes on disk {facts['dtypes']}" if facts else ""),
             f"preset {preset_label}: {p['modules']} modules, {p['params']:,} params "
             f"({p['fp16_bytes'] / 1e6:.1f} MB fp16, {p['fp32_bytes'] / 1e6:.1f} MB fp32)",
             f"params file - preset: {f['params'] - p['params']:+,} ({f['params'] / p['params']:.4f}x)" if p["params"] else "",
             f"w1 factor (largest w1 side): file {f['factors']}, preset {p['factors']}"]
    if facts and f["params"]:
        lines.append(f"file bytes per parameter: {facts['tensor_bytes'] / f['params']:.3f}")
    for key, title in (("only_file", "modules only in the file"), ("only_preset", "modules only in the preset")):
        names = cmp[key]
        lines.append(f"{title}: {len(names)}")
        lines += [f"  {n}" for n in names[:limit]] + ([f"  ... ({len(names)} in all)"] if len(names) > limit else [])
    nm = cmp.get("norms")
    if nm and (nm["file"] or nm["preset"]):
        lines.append(f"norm modules (train_norm): file {nm['file']}, preset {nm['preset']}"
                     + (f"; only in the file {len(nm['only_file'])}, only in the preset {len(nm['only_preset'])}"
                        if nm["only_file"] or nm["only_preset"] else ", the same"))
        for n in (nm["only_file"] + nm["only_preset"])[:limit]:
            lines.append(f"  {n} ({'file' if n in nm['only_file'] else 'preset'} only)")
    d = cmp["factor_differs"]
    lines.append(f"modules with other factors / shapes: {len(d)}" + (f" (preset->file factor: {cmp['factor_moves']})" if d else ""))
    for m in d[:limit]:
        lines.append(f"  {m['name']}: file w1 {m['file_w1']} w2 {m['file_w2']}, preset w1 {m['preset_w1']} w2 {m['preset_w2']}")
    if len(d) > limit:
        lines.append(f"  ... ({len(d)} in all)")
    lines.append("same modules and factors as the preset" if cmp["same"] else "differs from the preset")
    return [x for x in lines if x]


def compare_with_preset(file_layout: dict[str, LokrShape], preset: str | Path = PRESET_PATH,
                        file_norms: set[str] = frozenset()) -> tuple[dict, str]:
    shapes, source = reference_shapes(preset)
    ref, ref_other = layout_from_shapes(shapes)
    return compare_layouts(file_layout, ref, file_norms, norm_modules(ref_other)), source


def write_plan(sd_scripts: Path) -> int:
    """Regenerate the committed module plan of our preset from sd-scripts' SDXL; returns its size."""
    from kxl_common.atomic import write_text

    shapes = expand_preset(PRESET_PATH, sd_scripts)
    write_text(PLAN_PATH, plan_json(plan_record(shapes)))
    return len(shapes)
