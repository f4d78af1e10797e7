"""Generation settings, one TOML file (`[generate]` table): resolution, steps, CFG, sampler,
negative prompt, batch size, dtype. Everything that changes the pixels goes into the digest
that a resumed run must match."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from kxl_common.toml_file import read_toml

from .errors import EvalError
from .samplers import canonical

DTYPES = ("auto", "fp16", "bf16", "fp32")


@dataclass(frozen=True)
class GenSettings:
    width: int = 1024
    height: int = 1024
    steps: int = 24
    cfg: float = 6.0
    sampler: str = "euler_a"
    negative_prompt: str = ""
    batch_size: int = 4
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on the CPU

    # batch_size does not change an image (each has its own noise); the rest does
    PIXEL_FIELDS = ("width", "height", "steps", "cfg", "sampler", "negative_prompt", "dtype")

    def check(self, where: str = "settings") -> "GenSettings":
        for name in ("width", "height"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 64 and v % 8 == 0):
                raise EvalError(f"{where}: {name} = {v!r}: must be an integer >= 64 and divisible by 8")
        if not (isinstance(self.steps, int) and 1 <= self.steps <= 1000):
            raise EvalError(f"{where}: steps = {self.steps!r}: must be an integer in 1..1000")
        if not (isinstance(self.cfg, (int, float)) and self.cfg >= 0):
            raise EvalError(f"{where}: cfg = {self.cfg!r}: must be a number >= 0")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise EvalError(f"{where}: batch_size = {self.batch_size!r}: must be an integer >= 1")
        if self.dtype not in DTYPES:
            raise EvalError(f"{where}: dtype = {self.dtype!r}: must be one of {DTYPES}")
        if not isinstance(self.negative_prompt, str):
            raise EvalError(f"{where}: negative_prompt must be a string")
        try:
            canonical(self.sampler)
        except EvalError as exc:
            raise EvalError(f"{where}: {exc}") from exc
        return replace(self, cfg=float(self.cfg))

    def pixel_dict(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in self.PIXEL_FIELDS}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.pixel_dict(), sort_keys=True).encode()).hexdigest()[:16]


def load_settings(path: Path | None, **overrides) -> GenSettings:
    data: dict = {}
    where = "settings"
    if path is not None:
        path = Path(path)
        where = str(path)
        doc = read_toml(path, what="settings file", error=EvalError, allow_empty=True)
        data = doc.get("generate")
        if not isinstance(data, dict):
            raise EvalError(f"{path}: needs a [generate] table")
    known = {f.name for f in fields(GenSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise EvalError(f"{where}: [generate] has unknown key(s) {unknown}; known: {sorted(known)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return GenSettings(**data).check(where)
