"""The class-level form of a LoKr file's preset, found on the model's module tree.

A LoKr file names its modules and shapes, not the classes they sit in. Given the model the file
was trained on (sd-scripts' SDXL on the meta device, or a test's stand-in), this finds what an
author writes by hand:
- target classes: a class whose every instance has all its trainable layers in the file (LyCORIS
  then creates exactly those), the outermost one over each module;
- target names for the rest, one regular expression per subtree (`^time_embed\\..+`), or the
  module's own path when its parent holds more than the file trained;
- a factor per module class (module_algo_map) plus the default factor (network_args factor=),
  the fewest map entries that give every module a factor LyCORIS's factorization turns into the
  file's shapes (LyCORIS applies the innermost mapped class around a layer);
- train_norm when the file holds norm modules (w_norm / b_norm).
The result is checked by building the network with LyCORIS on the same tree: only a preset that
gives back the file's keys and shapes is returned; otherwise the reason (the caller falls back to
one name per module).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from kxl_common.lokr_layout import LokrShape
from kxl_common.lycoris_helpers import lycoris_module

UNET_PREFIX = "lora_unet"


class CompactError(ValueError):
    """The file's modules cannot be written as classes on this tree (the message says why)."""


@dataclass(frozen=True)
class Config:
    """What one module_algo_map entry (or the network_args default) sets for a LoKr module."""

    factor: int
    unbalanced: bool
    full_matrix: bool
    rank: int | None  # the low-rank half's rank (dim) when not full matrix

    def table(self) -> dict:
        out = {"algo": "lokr", "factor": self.factor, "full_matrix": self.full_matrix}
        if not self.full_matrix:
            out["dim"] = self.rank
        if self.unbalanced:
            out["unbalanced_factorization"] = True
        return out

    def network_args(self) -> list[str]:
        """The network_args that make this the default (network_dim is the rank when not full)."""
        out = [f"factor={self.factor}", f"full_matrix={self.full_matrix}"]
        if not self.full_matrix:
            out.append(f"conv_dim={self.rank}")
        if self.unbalanced:
            out.append("unbalanced_factorization=True")
        return out


@dataclass
class Node:
    side: str  # "unet" | "te"
    path: str
    module: object
    ancestors: list  # Nodes from the root's child down to the parent


@dataclass
class CompactPreset:
    preset: dict
    default: Config
    train_norm: bool
    module_configs: dict[str, Config] = field(default_factory=dict)  # LoKr module -> its effective config


def _is_builtin(module) -> bool:
    return type(module).__module__.startswith("torch.nn")


def trainable_kind(module, train_norm: bool, enable_conv: bool = True) -> str | None:
    """'norm' / 'lokr' / None: what LyCORIS's create_single_module makes of a layer (algo lokr)."""
    import torch.nn as nn

    if train_norm and "Norm" in type(module).__name__ and isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return "norm"
    if isinstance(module, nn.Linear):
        return "lokr"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "lokr" if (module.kernel_size[0] == 1 or enable_conv) else None
    return None


def index_tree(models) -> dict[str, Node]:
    """{lycoris.kohya module name: Node} of every module under (unet, [te1, te2])."""
    unet, tes = models
    roots = [(UNET_PREFIX, "unet", unet)] + [(f"lora_te{i + 1}", "te", te) for i, te in enumerate(tes)]
    out: dict[str, Node] = {}
    for prefix, side, root in roots:
        nodes: dict[str, Node] = {}
        for path, module in root.named_modules():
            if not path:
                continue
            parent = path.rpartition(".")[0]
            ancestors = (nodes[parent].ancestors + [nodes[parent]]) if parent else []
            node = Node(side, path, module, ancestors)
            nodes[path] = node
            out[f"{prefix}_{path}".replace(".", "_")] = node
    return out


def _leaves(node_module, train_norm):
    for path, m in node_module.named_modules():
        kind = trainable_kind(m, train_norm)
        if kind:
            yield path, m


def _config_candidates(layout: dict[str, LokrShape]) -> list[int]:
    found = {-1}
    for s in layout.values():
        found.update(s.w1)
        found.update(s.w2[:2])
    found.update(2 ** k for k in range(1, 8))
    return sorted(f for f in found if f != 0 and f != 1) + [1]


def dims(s: LokrShape) -> tuple[int, int]:
    """(out_dim, in_dim) of the layer; for a low-rank conv w2 (w2_b flattened to d*k) the in side
    is c * d*k, which is what w1 is factored against as well when k = 1."""
    return s.w1[0] * s.w2[0], s.w1[1] * s.w2[1]


def fits(s: LokrShape, factor: int, unbalanced: bool) -> bool:
    factorization = lycoris_module("functional.general").factorization  # no bitsandbytes for a header read

    out_dim, in_dim = dims(s)
    out_l, out_k = factorization(out_dim, factor)
    if unbalanced:
        out_l, out_k = out_k, out_l
    in_m, in_n = factorization(in_dim, factor)
    return (out_l, in_m) == tuple(s.w1) and (out_k, in_n) == tuple(s.w2[:2])


def feasible_configs(s: LokrShape, factors: list[int]) -> set[Config]:
    rank = None if s.full_matrix else int(s.rank)
    return {Config(f, u, s.full_matrix, rank) for f in factors for u in (False, True) if fits(s, f, u)}


def derive_compact(layout: dict[str, LokrShape], norms: set[str], models,
                   preferred_default: Config | None = None) -> CompactPreset:
    """The class-level preset of a file on `models`' tree (see the module doc); CompactError if none."""
    tree = index_tree(models)
    names = set(layout) | set(norms)
    missing = sorted(n for n in names if n not in tree)
    if missing:
        raise CompactError(f"{len(missing)} of the file's modules are not in the model tree (e.g. {missing[0]})")
    if any(s.tucker or s.w1_low_rank for s in layout.values()):
        raise CompactError("tucker / low-rank w1 modules: written one name per module")
    train_norm = bool(norms)
    unet, tes = models
    roots = {"unet": [(UNET_PREFIX, unet)], "te": [(f"lora_te{i + 1}", te) for i, te in enumerate(tes)]}

    def lora_name(prefix, path):
        return f"{prefix}_{path}".replace(".", "_")

    # 1. classes whose every instance has all its trainable layers (and at least one) in the file
    covered: dict[tuple[str, str], bool] = {}
    for side, side_roots in roots.items():
        for prefix, root in side_roots:
            for path, m in root.named_modules():
                if not path or _is_builtin(m) or not list(m.children()):
                    continue
                leaves = [lora_name(prefix, f"{path}.{p}" if p else path) for p, _ in _leaves(m, train_norm)]
                ok = bool(leaves) and all(n in names for n in leaves)
                key = (side, type(m).__name__)
                covered[key] = covered.get(key, True) and ok
    # 2. the outermost covered class over each module is its target
    targets = {"unet": [], "te": []}
    target_of: dict[str, Node] = {}
    for n in sorted(names):
        node = tree[n]
        for a in node.ancestors:
            if covered.get((node.side, type(a.module).__name__)):
                target_of[n] = a
                cls = type(a.module).__name__
                if cls not in targets[node.side]:
                    targets[node.side].append(cls)
                break
    # LyCORIS walks every module: a target class inside another target would be created twice
    for side, side_roots in roots.items():
        for prefix, root in side_roots:
            for path, m in root.named_modules():
                if type(m).__name__ in targets[side]:
                    inner = [p for p, c in m.named_modules() if p and type(c).__name__ in targets[side]]
                    if inner:
                        raise CompactError(f"target class {type(m).__name__} holds another target at {path}.{inner[0]}")
    # 3. the others by name: the largest subtree that holds only them
    named = sorted(n for n in names if n not in target_of)
    patterns: dict[str, list[str]] = {"unet": [], "te": []}
    pattern_of: dict[str, str] = {}

    def side_leaves(side, path):
        """The trainable layers at and under `path` in every root of the side (TE names apply to both encoders)."""
        return [lora_name(prefix, f"{path}.{p}" if p else path) for prefix, root in roots[side] if _has(root, path)
                for p, _ in _leaves(root.get_submodule(path), train_norm)]

    for n in named:
        node = tree[n]
        widest = None
        for a in reversed(node.ancestors):
            holds_target = any(type(c).__name__ in targets[node.side] for _, c in a.module.named_modules())
            if holds_target or not all(x in names and x not in target_of for x in side_leaves(node.side, a.path)):
                break
            widest = a
        pattern = f"^{re.escape(widest.path)}\\..+" if widest else f"^{re.escape(node.path)}$"
        if pattern not in patterns[node.side]:
            patterns[node.side].append(pattern)
        pattern_of[n] = pattern
    # 4. the default factor and the fewest map entries
    factors = _config_candidates(layout)
    feasible = {n: feasible_configs(s, factors) for n, s in layout.items()}
    empty = [n for n, f in feasible.items() if not f]
    if empty:
        raise CompactError(f"{empty[0]}: no factor gives its shapes")
    chains: dict[tuple[str, ...], set[Config]] = {}
    for n in layout:
        if n in target_of:
            node = tree[n]
            start = node.ancestors.index(target_of[n])
            chain = tuple(type(a.module).__name__ for a in node.ancestors[start:] if not _is_builtin(a.module))
            chains[chain] = chains.get(chain, feasible[n]) & feasible[n]
    by_pattern: dict[str, set[Config]] = {}
    for n in layout:
        if n in pattern_of:
            by_pattern[pattern_of[n]] = by_pattern.get(pattern_of[n], feasible[n]) & feasible[n]
    if any(not v for v in chains.values()) or any(not v for v in by_pattern.values()):
        raise CompactError("modules of one class chain need different factors")
    map_classes = sorted({c for chain in chains for c in chain})
    natural = _natural_order(layout)
    defaults = sorted({c for v in feasible.values() for c in v},
                      key=lambda c: (c != preferred_default, -sum(c in v for v in feasible.values()), natural(c)))
    best = None
    for default in defaults:
        for k in range(len(map_classes) + 1):
            if best is not None and k >= best[0]:
                break
            # among equal-size maps, the one whose entries are least overridden by inner entries
            # (FeedForward: 2 rather than BasicTransformerBlock: 2 under CrossAttention: 4)
            found, fewest = None, None
            for subset in itertools.combinations(map_classes, k):
                got = _assign(chains, by_pattern, set(subset), default, natural)
                if got is not None:
                    shadowed = sum(1 for chain in chains for i, c in enumerate(chain)
                                   if c in subset and any(x in subset for x in chain[i + 1:]))
                    if fewest is None or shadowed < fewest:
                        found, fewest = got, shadowed
            if found is not None:
                class_map, name_map = found
                cost = len(class_map) + len(name_map)
                if best is None or cost < best[0]:
                    best = (cost, default, class_map, name_map)
                break
    if best is None:
        raise CompactError("no default factor and class map give every module its shapes")
    _, default, class_map, name_map = best
    effective = {}
    for n in layout:
        if n in target_of:
            node = tree[n]
            start = node.ancestors.index(target_of[n])
            chain = [type(a.module).__name__ for a in node.ancestors[start:] if not _is_builtin(a.module)]
            inner = [c for c in chain if c in class_map]
            effective[n] = class_map[inner[-1]] if inner else default
        else:
            effective[n] = name_map.get(pattern_of[n], default)
    preset = {
        "enable_conv": any(s.conv for s in layout.values()),
        "unet_target_module": targets["unet"],
        "unet_target_name": patterns["unet"],
        "text_encoder_target_module": targets["te"],
        "text_encoder_target_name": patterns["te"],
        "module_algo_map": {c: class_map[c].table() for c in map_classes if c in class_map},
    }
    if name_map:
        preset["name_algo_map"] = {p: c.table() for p, c in name_map.items()}
    return CompactPreset(preset, default, train_norm, effective)


def _has(root, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


def _natural_order(layout):
    """Sort key for configs: balanced first, then the factor most modules show as their larger
    w1 side (what people write: 2, 4, 8), positive before -1."""
    import collections

    common = collections.Counter(max(s.w1) for s in layout.values())

    def key(c: Config):
        return (c.unbalanced, c.factor < 0, -common.get(c.factor, 0), c.factor)

    return key


def _assign(chains, by_pattern, subset, default, natural):
    """({class: Config}, {pattern: Config}) giving every chain / name group a feasible config with
    `subset` mapped, or None. The innermost mapped class of a chain decides; unmapped chains take
    the default; a name group the default does not fit gets a name_algo_map entry."""
    buckets: dict[str, set[Config]] = {}
    for chain, ok in chains.items():
        inner = [c for c in chain if c in subset]
        if not inner:
            if default not in ok:
                return None
            continue
        c = inner[-1]
        buckets[c] = buckets.get(c, ok) & ok
    if any(not b for b in buckets.values()) or len(buckets) < len(subset):
        return None
    class_map = {c: (default if default in b else min(b, key=natural)) for c, b in buckets.items()}
    name_map = {p: min(ok, key=natural) for p, ok in by_pattern.items() if default not in ok}
    return class_map, name_map
