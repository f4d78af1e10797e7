"""The sd-scripts backend: an SDXL single-file checkpoint through sd-scripts' own inference.

The same pieces sd-scripts' trainer samples with (train_util.sample_images_common ->
sdxl_train_util.sample_images): sdxl_model_util.load_models_from_sdxl_checkpoint, the SDXL
tokenize/encode strategies with `tokenizer_cache_dir` (offline), train_util.get_my_scheduler
and library/sdxl_lpw_stable_diffusion's SdxlStableDiffusionLongPromptWeightingPipeline (which
parses sd-webui weights and `\\(` escapes). A LoKr is applied with LyCORIS' kohya loader
(lycoris.kohya.create_network_from_weights + apply_to, at `multiplier`), as sd-scripts'
generation scripts do. Noise as in kxl_tools.eval.backends (one generator per image).
"""
from __future__ import annotations

from pathlib import Path

from kxl_common.upstream import SdScriptsNotFound
from kxl_train.sd_scripts_library import use_sd_scripts_library

from .backends import Backend, resolve_device, resolve_dtype, seed_generators
from .errors import EvalError
from .samplers import canonical
from .settings import GenSettings


def _set_strategy(cls, strategy) -> None:
    # sd-scripts keeps one strategy per process and refuses a second set_strategy; a second
    # backend in the same process replaces it (tests, notebooks)
    if cls.get_strategy() is not None:
        cls._strategy = None
    cls.set_strategy(strategy)


class SdScriptsBackend(Backend):
    def __init__(self, checkpoint: str | Path, *, tokenizer_cache_dir: str | Path | None = None,
                 lokr: str | Path | None = None, multiplier: float = 1.0, device="auto", dtype: str = "auto",
                 sd_scripts: str | Path | None = None):
        import torch

        try:
            use_sd_scripts_library(sd_scripts)
        except SdScriptsNotFound as exc:
            raise EvalError(f"--checkpoint needs sd-scripts: {exc}") from exc
        from library import sdxl_model_util, strategy_base, strategy_sdxl, train_util
        from library.sdxl_lpw_stable_diffusion import SdxlStableDiffusionLongPromptWeightingPipeline

        self.train_util = train_util
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dtype = resolve_dtype(dtype, self.device)
        self.checkpoint, self.lokr, self.multiplier = Path(checkpoint), lokr, float(multiplier)
        te1, te2, vae, unet, _logit_scale, _info = sdxl_model_util.load_models_from_sdxl_checkpoint(
            sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0, str(checkpoint), "cpu", self.dtype)
        tokenize = strategy_sdxl.SdxlTokenizeStrategy(None, str(tokenizer_cache_dir) if tokenizer_cache_dir else None)
        _set_strategy(strategy_base.TokenizeStrategy, tokenize)
        _set_strategy(strategy_base.TextEncodingStrategy, strategy_sdxl.SdxlTextEncodingStrategy())
        self.network = None
        if lokr is not None:
            from lycoris.kohya import create_network_from_weights

            network, weights = create_network_from_weights(self.multiplier, str(lokr), vae, [te1, te2], unet,
                                                           for_inference=True)
            network.apply_to([te1, te2], unet, apply_text_encoder=True, apply_unet=True)
            info = network.load_state_dict(weights, strict=False)
            if info.unexpected_keys:
                raise EvalError(f"{lokr}: {len(info.unexpected_keys)} tensors match no module of the "
                                f"checkpoint, e.g. {info.unexpected_keys[0]}")
            self.network = network.to(self.device, self.dtype).eval()
        for model in (te1, te2, vae, unet):
            model.to(self.device, self.dtype).eval().requires_grad_(False)
        vae.to(torch.float32 if self.dtype == torch.float16 else self.dtype)  # the SDXL VAE overflows in fp16
        self.pipe = SdxlStableDiffusionLongPromptWeightingPipeline(
            vae=vae, text_encoder=[te1, te2], unet=unet, tokenizer=[tokenize.tokenizer1, tokenize.tokenizer2],
            scheduler=train_util.get_my_scheduler(sample_sampler="euler_a", v_parameterization=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        self.pipe.to(self.device)
        self.pipe.progress_bar = lambda x: x
        self.unet_in = unet.in_channels

    def describe(self) -> dict:
        st = self.checkpoint.stat()
        return {"backend": "sd-scripts", "checkpoint": str(self.checkpoint.resolve()), "bytes": st.st_size,
                "lokr": str(Path(self.lokr).resolve()) if self.lokr else None,
                "multiplier": self.multiplier if self.lokr else None}

    def generate(self, prompts, seeds, settings: GenSettings) -> list:
        import torch

        shape = (self.unet_in, settings.height // 8, settings.width // 8)
        gens, noise = seed_generators(seeds, shape)
        self.pipe.scheduler = self.train_util.get_my_scheduler(sample_sampler=canonical(settings.sampler),
                                                               v_parameterization=False)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype,
                                             enabled=self.dtype != torch.float32):
            latents = self.pipe(
                prompt=list(prompts), negative_prompt=[settings.negative_prompt] * len(prompts),
                height=settings.height, width=settings.width, num_inference_steps=settings.steps,
                guidance_scale=settings.cfg, latents=noise.to(self.device, self.dtype), generator=gens,
            )
        return list(self.pipe.latents_to_image(latents))
