"""LoKr / LyCORIS network files by key names and shapes alone (no tensor data, no torch).

A network file is keyed `<module>.<param>` (lycoris/modules/lokr.py LokrModule state dict):
  w1 side:  lokr_w1 (a, c)                 or lokr_w1_a (a, r), lokr_w1_b (r, c)
  w2 side:  lokr_w2 (b, d[, k...])         or lokr_w2_a (b, r), lokr_w2_b (r, d*k...)
            or, tucker (conv, k != 1):  lokr_t2 (r, r, k...), lokr_w2_a (r, b), lokr_w2_b (r, d)
  alpha:    scalar
The module's delta is kron(w1, w2) of shape (a*b, c*d[, k...]). kxl_tools.lokr computes it;
kxl_train.preset_from derives presets from these shapes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from kxl_common.errors import KxlError

LOKR_PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2", "alpha", "dora_scale")

# Parameter names that identify each LyCORIS / sd-scripts algorithm in a saved file.
_ALGO_MARKERS = (
    ("lokr", ("lokr_w1", "lokr_w1_a")),
    ("loha", ("hada_w1_a",)),
    ("lora", ("lora_up.weight", "lora_down.weight", "lora_up", "lora_down")),
    ("full", ("diff",)),
    ("ia3", ("on_input",)),
    ("oft", ("oft_blocks", "oft_diag")),
    ("boft", ("boft_blocks",)),
    ("glora", ("a1.weight",)),
    ("norm", ("w_norm",)),
)

NETWORK_NAME = re.compile(r"^(lora|lycoris)_[A-Za-z0-9_]+$")


class LokrError(KxlError, ValueError):
    pass


def algorithm_of(params: Iterable[str]) -> str:
    """Algorithm of a saved module from its parameter names; weight-decomposed (DoRA)
    variants get a "+dora" suffix: their merged weight is not W + delta."""
    params = set(params)
    for algo, markers in _ALGO_MARKERS:
        if any(m in params for m in markers):
            return algo + ("+dora" if "dora_scale" in params else "")
    return "unknown"


def group_modules(keys) -> dict[str, dict[str, str]]:
    """{module name: {param: full key}} for network-file keys `<module>.<param>`."""
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        name, dot, param = key.partition(".")
        if not dot:
            continue
        modules.setdefault(name, {})[param] = key
    return modules


def is_network_file(keys) -> bool:
    names = {k.partition(".")[0] for k in keys if "." in k}
    return bool(names) and all(NETWORK_NAME.match(n) for n in names)


@dataclass(frozen=True)
class LokrShape:
    """Factor shapes of one LoKr module (what the file's header says)."""

    name: str
    w1: tuple[int, int]  # (a, c), whether stored whole or as w1_a @ w1_b
    w2: tuple[int, ...]  # (b, d[, k...]), whether stored whole, as w2_a @ w2_b or tucker
    w1_low_rank: bool
    w2_low_rank: bool
    tucker: bool
    rank: int | None  # rank of the low-rank half; None when both halves are full
    params: int  # stored weights (the scalar alpha not counted)

    @property
    def full_matrix(self) -> bool:
        return not self.w1_low_rank and not self.w2_low_rank

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return (self.w1[0] * self.w2[0], self.w1[1] * self.w2[1], *self.w2[2:])

    @property
    def conv(self) -> bool:
        return len(self.w2) > 2


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def lokr_shape(name: str, shapes: Mapping[str, tuple[int, ...]]) -> LokrShape:
    """The LokrShape of module `name` from {param: shape}; a clear error for anything LyCORIS
    4.1.3's LokrModule does not save or that does not chain."""
    unknown = set(shapes) - set(LOKR_PARAMS)
    if unknown:
        raise LokrError(f"{name}: not a LoKr module (unexpected tensors {sorted(unknown)})")
    if "dora_scale" in shapes:
        raise LokrError(
            f"{name}: weight-decomposed LoKr (dora_scale) is not supported: its merged weight is "
            "not W + delta, it depends on the base weight's norms"
        )
    if "lokr_t1" in shapes:
        raise LokrError(f"{name}: lokr_t1 (tucker on w1) is not produced by LyCORIS 4.1.3 and is not supported")
    s = {k: tuple(v) for k, v in shapes.items()}
    w1, w1a, w1b = s.get("lokr_w1"), s.get("lokr_w1_a"), s.get("lokr_w1_b")
    w2, w2a, w2b, t2 = s.get("lokr_w2"), s.get("lokr_w2_a"), s.get("lokr_w2_b"), s.get("lokr_t2")
    if (w1 is None) == (w1a is None or w1b is None):
        raise LokrError(f"{name}: needs either lokr_w1 or both lokr_w1_a and lokr_w1_b")
    if (w2 is None) == (w2a is None or w2b is None):
        raise LokrError(f"{name}: needs either lokr_w2 or both lokr_w2_a and lokr_w2_b")
    if t2 is not None and w2 is not None:
        raise LokrError(f"{name}: lokr_t2 given with a full lokr_w2")
    if w1 is None and w1a[1] != w1b[0]:
        raise LokrError(f"{name}: lokr_w1_a {list(w1a)} and lokr_w1_b {list(w1b)} do not chain")
    if w2 is None:
        if t2 is not None:
            if t2[:2] != (w2a[0], w2b[0]):
                raise LokrError(
                    f"{name}: lokr_t2 {list(t2)} does not match lokr_w2_a {list(w2a)} "
                    f"and lokr_w2_b {list(w2b)} (expected t2 (r, r, k...), w2_a (r, b), w2_b (r, d))"
                )
        elif w2a[1] != w2b[0]:
            raise LokrError(f"{name}: lokr_w2_a {list(w2a)} and lokr_w2_b {list(w2b)} do not chain")
    w1_full = w1 if w1 is not None else (w1a[0], w1b[1])
    if w2 is not None:
        w2_full = w2
    elif t2 is not None:
        w2_full = (w2a[1], w2b[1], *t2[2:])
    else:
        w2_full = (w2a[0], *w2b[1:])
    # r is read off the b factor (w1_b or w2_b, first axis), the rank in every layout.
    rank = w1b[0] if w1b is not None else (w2b[0] if w2b is not None else None)
    return LokrShape(name, tuple(w1_full), tuple(w2_full), w1 is None, w2 is None, t2 is not None, rank,
                     sum(_numel(v) for k, v in s.items() if k != "alpha"))
