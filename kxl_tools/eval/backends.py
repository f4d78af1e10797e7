"""Who turns (prompt, seed) into an image. Two backends, one contract:

- SdScriptsBackend (kxl_tools/eval/sdxl_backend.py): an SDXL single-file checkpoint (plus an
  optional LoKr) through sd-scripts' own inference code, the pipeline its trainer samples with.
- DiffusersBackend (here): any diffusers-format SDXL folder through diffusers'
  StableDiffusionXLPipeline, scheduled as sd-scripts schedules (kxl_tools.eval.samplers).
  It needs no sd-scripts; the CI tests run it on tiny random-weight models.

Both draw every random number of an image from its own CPU generator, seeded with the image's
seed (`seed_generators`): first the initial noise, then the ancestral samplers' step noise
(the pipelines pass a list of generators on to the scheduler), so an image does not depend
on the shard, on its neighbours in the batch or on the device's random state. (A different
batch SIZE can still move pixels a little: float sums round differently, one level in fp32,
several in bf16.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .errors import EvalError
from .prompts import webui_unescape
from .samplers import make_scheduler
from .settings import GenSettings


def resolve_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"device {name!r}: CUDA is not available here")
    return dev


def resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def seed_generators(seeds: Sequence[int], shape: tuple[int, int, int]):
    """(generators, noise): one CPU generator per seed and the (len(seeds), *shape) float32
    initial noise drawn from them; the generators go on to the scheduler's steps."""
    import torch

    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return gens, torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens])


class Backend:
    """generate(prompts, seeds, settings) -> PIL images, one per (prompt, seed) pair."""

    def describe(self) -> dict:  # what identifies the model (a resumed run must match it)
        raise NotImplementedError

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], settings: GenSettings) -> list:
        raise NotImplementedError


class DiffusersBackend(Backend):
    def __init__(self, pipe, *, device="auto", dtype: str = "auto", source: str | None = None):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dtype = resolve_dtype(dtype, self.device)
        # sd-scripts encodes an empty negative prompt like any text; diffusers would zero it
        pipe.register_to_config(force_zeros_for_empty_prompt=False)
        self.pipe = pipe.to(self.device, self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.source = source

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device="auto", dtype: str = "auto") -> "DiffusersBackend":
        from diffusers import StableDiffusionXLPipeline

        folder = Path(folder)
        if not (folder / "model_index.json").is_file():
            raise EvalError(f"{folder}: not a diffusers model folder (no model_index.json)")
        pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
        return cls(pipe, device=device, dtype=dtype, source=str(folder.resolve()))

    def describe(self) -> dict:
        n = sum(p.numel() for p in self.pipe.unet.parameters())
        return {"backend": "diffusers", "source": self.source, "unet_parameters": int(n)}

    def generate(self, prompts, seeds, settings: GenSettings) -> list:
        import torch

        unet = self.pipe.unet
        shape = (unet.config.in_channels, settings.height // self.pipe.vae_scale_factor,
                 settings.width // self.pipe.vae_scale_factor)
        gens, noise = seed_generators(seeds, shape)
        self.pipe.scheduler = make_scheduler(settings.sampler)
        with torch.no_grad():
            out = self.pipe(
                prompt=[webui_unescape(p) for p in prompts],  # diffusers reads no prompt weights
                negative_prompt=[webui_unescape(settings.negative_prompt)] * len(prompts),
                height=settings.height, width=settings.width, num_inference_steps=settings.steps,
                guidance_scale=settings.cfg, latents=noise.to(self.device, self.dtype), generator=gens,
                output_type="pil",
            )
        return list(out.images)
