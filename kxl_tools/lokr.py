"""The weight delta of a LoKr module, as LyCORIS 4.1.3 trains it.

Stored tensors per module `<name>.<param>` (lycoris/modules/lokr.py LokrModule):
  w1 side:  lokr_w1 (a, c)                     or lokr_w1_a (a, r) @ lokr_w1_b (r, c)
  w2 side:  lokr_w2 (b, d[, k...])             or lokr_w2_a (b, r) @ lokr_w2_b (r, d*k...)
            or, tucker (conv, k != 1):  lokr_t2 (r, r, k...), lokr_w2_a (r, b), lokr_w2_b (r, d)
            rebuilt as w2[p, q, ...] = sum_ij t2[i, j, ...] w2_a[i, p] w2_b[j, q]
  alpha:    scalar
delta = scale * kron(w1, w2), with w1 given trailing singleton axes to match a conv w2; the
result is (a*b, c*d[, k...]) in the target weight's row-major layout.

Scale (LokrModule.__init__, lokr.py:207-218): scale = alpha / r, where r is the rank of the
low-rank half (alpha 0 or missing means alpha = r). When both halves are full matrices
(lokr_w1 and lokr_w2 stored) alpha is overridden by r, so scale = 1 whatever alpha says. The
training forward (_rebuild_forward, lokr.py:560-576) applies the scale once, through
get_weight (lokr.py:359-369 passes scale=self.scale to kron_weight). The saved alpha already
folds in rs_lora (lokr.py:220: alpha * r / sqrt(r)), so alpha / r is right for both.

r is read off the b factor (w1_b or w2_b, first axis), which is the rank in every layout;
LyCORIS's own state-dict loader reads w2_a.size(1) (lokr.py:265-267), which for a tucker
module is the output factor b, not the rank.

Known LyCORIS defect, not reproduced here: LokrModule.get_diff_weight (lycoris/modules/
lokr.py:381-386) multiplies get_weight(), which already carries self.scale, by
self.scale * multiplier again, so get_diff_weight, get_merged_weight (lokr.py:388-395) and
merge_to (lycoris/modules/base.py:397-418, which calls get_merged_weight) apply scale**2 to
a LOW-RANK LoKr. Full-matrix modules have scale 1 and are unaffected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

# Names and shapes (no tensor data) live in kxl_common, shared with kxl_train's preset derivation.
from kxl_common.lokr_layout import (  # noqa: F401 (re-exported)
    LOKR_PARAMS,
    NETWORK_NAME,
    LokrError,
    algorithm_of,
    group_modules,
    is_network_file,
    lokr_shape,
)


@dataclass
class LokrFactors:
    """The stored tensors of one LoKr module (float32), named as in the file."""

    name: str
    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_tensors(cls, name: str, tensors: Mapping[str, torch.Tensor]) -> "LokrFactors":
        lokr_shape(name, {k: tuple(v.shape) for k, v in tensors.items()})  # names the first problem
        f = {k: v.float() for k, v in tensors.items() if k != "alpha"}
        alpha = float(tensors["alpha"].float().reshape(-1)[0]) if "alpha" in tensors else None
        return cls(
            name,
            w1=f.get("lokr_w1"),
            w1_a=f.get("lokr_w1_a"),
            w1_b=f.get("lokr_w1_b"),
            w2=f.get("lokr_w2"),
            w2_a=f.get("lokr_w2_a"),
            w2_b=f.get("lokr_w2_b"),
            t2=f.get("lokr_t2"),
            alpha=alpha,
        )

    def _stored(self) -> dict[str, torch.Tensor]:
        names = {"w1": "lokr_w1", "w1_a": "lokr_w1_a", "w1_b": "lokr_w1_b", "w2": "lokr_w2",
                 "w2_a": "lokr_w2_a", "w2_b": "lokr_w2_b", "t2": "lokr_t2"}
        return {p: getattr(self, a) for a, p in names.items() if getattr(self, a) is not None}

    def shape(self):
        """The module's kxl_common.lokr_layout.LokrShape (validated)."""
        return lokr_shape(self.name, {p: tuple(v.shape) for p, v in self._stored().items()})

    def validate(self) -> None:
        self.shape()

    @property
    def full_matrix(self) -> bool:
        return self.w1 is not None and self.w2 is not None

    @property
    def rank(self) -> int | None:
        """Rank of the low-rank half; None when both halves are full."""
        if self.w1_b is not None:
            return int(self.w1_b.shape[0])
        if self.w2_b is not None:
            return int(self.w2_b.shape[0])
        return None

    @property
    def scale(self) -> float:
        r = self.rank
        if r is None:
            return 1.0
        alpha = r if self.alpha is None or self.alpha == 0 else self.alpha
        return alpha / r

    def w1_full(self) -> torch.Tensor:
        return self.w1 if self.w1 is not None else self.w1_a @ self.w1_b

    def w2_full(self) -> torch.Tensor:
        if self.w2 is not None:
            return self.w2
        if self.t2 is not None:
            return torch.einsum("ij...,ip,jq->pq...", self.t2, self.w2_a, self.w2_b).contiguous()
        flat = self.w2_a @ self.w2_b.reshape(self.w2_b.shape[0], -1)
        return flat.reshape(self.w2_a.shape[0], *self.w2_b.shape[1:])

    def delta(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """scale * kron(w1, w2), reshaped to `shape` (the target weight's) when given."""
        w1, w2 = self.w1_full(), self.w2_full()
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
        d = torch.kron(w1.contiguous(), w2.contiguous())
        s = self.scale
        if s != 1.0:
            d.mul_(s)
        if shape is not None:
            if d.numel() != _numel(shape):
                raise LokrError(
                    f"{self.name}: LoKr delta has shape {list(d.shape)} ({d.numel()} values) but the target "
                    f"weight has shape {list(shape)}"
                )
            d = d.reshape(shape)
        return d

    def describe(self) -> dict:
        """Factor shapes and scale, for `kxl inspect`."""
        s = self.shape()
        return {
            "w1": list(s.w1),
            "w1_low_rank": s.w1_low_rank,
            "w2": list(s.w2),
            "w2_low_rank": s.w2_low_rank,
            "tucker": s.tucker,
            "rank": self.rank,
            "alpha": self.alpha,
            "scale": self.scale,
            "delta_shape": list(s.delta_shape),
        }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class NetworkFile:
    """A LoKr (LyCORIS / sd-scripts) safetensors file, read one module at a time."""

    def __init__(self, reader):
        self.reader = reader
        self.path = reader.path
        self.modules = group_modules(reader.keys())
        self.loose_keys = [k for k in reader.keys() if "." not in k]
        self.algorithms = {name: algorithm_of(set(params)) for name, params in self.modules.items()}

    def lokr_names(self) -> list[str]:
        return [n for n, a in self.algorithms.items() if a == "lokr"]

    def norm_names(self) -> list[str]:
        """Norm modules (LyCORIS train_norm, lycoris/modules/norms.py NormModule): w_norm and b_norm
        are added to the layer's weight and bias, times the multiplier."""
        return [n for n, a in self.algorithms.items() if a == "norm"]

    def unsupported(self) -> dict[str, str]:
        return {n: a for n, a in self.algorithms.items() if a not in ("lokr", "norm")}

    def delta_names(self) -> list[str]:
        """Canonical names (kxl_tools.keys) this file changes: each LoKr module's weight, each norm
        module's weight and bias (`<name>.bias`)."""
        out = self.lokr_names()
        for n in self.norm_names():
            out.append(n)
            if "b_norm" in self.modules[n]:
                out.append(f"{n}.bias")
        return out

    def delta(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The float32 change this file makes to canonical `name` at multiplier 1."""
        module, _, param = name.partition(".")
        if self.algorithms.get(module) == "norm":
            key = self.modules[module]["b_norm" if param == "bias" else "w_norm"]
            return self.reader.read(key).float()
        return self.factors(name).delta(shape)

    def factors(self, name: str) -> LokrFactors:
        params = self.modules[name]
        return LokrFactors.from_tensors(name, {p: self.reader.read(k) for p, k in params.items()})

    def factors_from_header(self, name: str) -> LokrFactors:
        """Factors with meta tensors (shapes only) except alpha, which is read: cheap inspect."""
        tensors = {}
        for p, k in self.modules[name].items():
            info = self.reader.tensors[k]
            tensors[p] = self.reader.read(k) if p == "alpha" else torch.empty(info.shape, dtype=info.torch_dtype, device="meta")
        return LokrFactors.from_tensors(name, tensors)
