"""`kxl eval generate` throughput on this machine, against the plain pipeline call (the peer),
and the wall time of the card's 3600-character benchmark on one GPU (from stated assumptions).

  tiny:      kxl_testing's tiny random SDXL (diffusers backend), 64x64, 4 steps: what kxl's
             loop (jobs, resume check, per-image noise, PNG writes) costs over calling the
             diffusers pipeline on the same batches.
  full-size: (--full-size; heavy: run it alone on the machine) the random
             full-size SDXL through sd-scripts' inference at --size px: kxl's sd-scripts
             backend against sd-scripts' own pipeline call as train_util.sample_image_inference
             makes it (one image per call, torch.manual_seed).
  estimate:  3600 characters x seeds + the 5 style prompts at 1024x1024 from an ASSUMED GPU
             UNet speed (--assume-gpu-its, UNet steps per second of one image with CFG), not
             a measurement: no GPU was available.

Usage: .venv/bin/python bench/bench_eval.py [--full-size] [--json out.json]
Smallest form: .venv/bin/python bench/bench_eval.py --tiny-images 2 --reps 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _prompts(n: int):
    from kxl_tools.eval.prompts import Prompt

    return [Prompt(id=f"p{i:03d}", kind="custom", prompt=f"1girl, character {i}, series, masterpiece, newest, safe",
                   seeds=[1000 + i]) for i in range(n)]


def bench_tiny(n: int, work: Path, reps: int = 3) -> dict:
    import torch

    from kxl_testing.eval_sdxl import build_tiny_sdxl
    from kxl_tools.eval.backends import DiffusersBackend
    from kxl_tools.eval.generate import run_generate
    from kxl_tools.eval.samplers import make_scheduler
    from kxl_tools.eval.settings import load_settings

    settings = load_settings(REPO / "recipes" / "eval" / "generate-tiny.toml", batch_size=4)
    prompts = _prompts(n)
    backend = DiffusersBackend(build_tiny_sdxl(0), device="cpu", dtype="fp32")
    backend.generate([prompts[0].prompt], [1], settings)  # warm-up
    pipe = backend.pipe

    def peer() -> None:
        for start in range(0, n, settings.batch_size):
            batch = prompts[start:start + settings.batch_size]
            pipe.scheduler = make_scheduler(settings.sampler)
            torch.manual_seed(start)
            pipe(prompt=[p.prompt for p in batch], negative_prompt=[settings.negative_prompt] * len(batch),
                 height=settings.height, width=settings.width, num_inference_steps=settings.steps,
                 guidance_scale=settings.cfg, output_type="pil")

    kxl_times, peer_times = [], []
    for rep in range(reps):  # interleaved, best of each: the machine is shared
        t = time.perf_counter()
        run_generate(prompts, None, settings, backend, work / f"tiny-{rep}", progress=False)
        kxl_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        peer()
        peer_times.append(time.perf_counter() - t)
    kxl_s, peer_s = min(kxl_times), min(peer_times)
    return {"images": n, "size": settings.width, "steps": settings.steps, "batch": settings.batch_size,
            "reps": reps, "kxl_images_per_s": n / kxl_s, "peer_images_per_s": n / peer_s,
            "kxl_over_peer_time": kxl_s / peer_s}


def bench_full(n: int, size: int, steps: int, work: Path, model: Path, tokenizers: Path) -> dict:
    import torch

    from kxl_tools.eval.generate import run_generate
    from kxl_tools.eval.sdxl_backend import SdScriptsBackend
    from kxl_tools.eval.settings import GenSettings

    settings = GenSettings(width=size, height=size, steps=steps, cfg=5.0, sampler="euler_a",
                           negative_prompt="worst quality", batch_size=1, dtype="bf16").check()
    t = time.perf_counter()
    backend = SdScriptsBackend(model, tokenizer_cache_dir=tokenizers, device="cpu", dtype="bf16")
    load_s = time.perf_counter() - t
    prompts = _prompts(n)
    backend.generate([prompts[0].prompt], [1], settings)  # warm-up
    t = time.perf_counter()
    run_generate(prompts, None, settings, backend, work / "full", progress=False)
    kxl_s = time.perf_counter() - t
    pipe = backend.pipe  # sd-scripts' pipeline, called as sample_image_inference does
    t = time.perf_counter()
    for p in prompts:
        torch.manual_seed(p.seeds[0])
        pipe.scheduler = backend.train_util.get_my_scheduler(sample_sampler="euler_a", v_parameterization=False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            latents = pipe(prompt=p.prompt, height=size, width=size, num_inference_steps=steps,
                           guidance_scale=settings.cfg, negative_prompt=settings.negative_prompt)
        pipe.latents_to_image(latents)
    peer_s = time.perf_counter() - t
    return {"images": n, "size": size, "steps": steps, "dtype": "bf16", "load_s": load_s,
            "kxl_images_per_s": n / kxl_s, "peer_images_per_s": n / peer_s, "kxl_over_peer_time": kxl_s / peer_s,
            "s_per_unet_step": kxl_s / n / steps}


def estimate(characters: int, seeds: int, styles: int, steps: int, gpu_its: float, decode_s: float) -> dict:
    images = (characters + styles) * seeds
    per_image = steps / gpu_its + decode_s
    return {"images": images, "steps": steps, "ASSUMED_gpu_unet_steps_per_s": gpu_its,
            "ASSUMED_vae_decode_s": decode_s, "estimated_s_per_image": per_image,
            "estimated_hours": images * per_image / 3600, "measured": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny-images", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repeats of the tiny pair, best of each")
    ap.add_argument("--full-size", action="store_true")
    ap.add_argument("--full-images", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--model", type=Path, default=os.environ.get("KXL_EVAL_SDXL_MODEL"),
                    help="random full-size SDXL (python -m kxl_testing.sdxl_random); needed with --full-size")
    ap.add_argument("--tokenizers", type=Path, default=os.environ.get("KXL_EVAL_TOKENIZERS"),
                    help="offline tokenizer cache (kxl_common.clip_tokenizer); needed with --full-size")
    ap.add_argument("--assume-gpu-its", type=float, default=7.0,
                    help="ASSUMED UNet steps/s of one 1024x1024 SDXL image with CFG on the GPU")
    ap.add_argument("--assume-decode-s", type=float, default=0.3, help="ASSUMED VAE decode seconds per image")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.full_size and not (args.model and Path(args.model).is_file() and args.tokenizers and Path(args.tokenizers).is_dir()):
        ap.error("--full-size needs --model FILE and --tokenizers DIR (or KXL_EVAL_SDXL_MODEL / KXL_EVAL_TOKENIZERS)")
    out: dict = {"cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        out["tiny"] = bench_tiny(args.tiny_images, Path(tmp), args.reps)
        t = out["tiny"]
        print(f"tiny SDXL {t['size']}px {t['steps']} steps, batch {t['batch']}: kxl {t['kxl_images_per_s']:.2f} img/s, "
              f"plain diffusers call {t['peer_images_per_s']:.2f} img/s, kxl/peer time {t['kxl_over_peer_time']:.3f}")
        if args.full_size:
            out["full_size"] = f = bench_full(args.full_images, args.size, args.steps, Path(tmp), args.model,
                                              args.tokenizers)
            print(f"full-size SDXL (sd-scripts) {f['size']}px {f['steps']} steps bf16 CPU: load {f['load_s']:.1f} s, "
                  f"kxl {f['kxl_images_per_s']:.4f} img/s, sd-scripts' sample call {f['peer_images_per_s']:.4f} img/s, "
                  f"kxl/peer time {f['kxl_over_peer_time']:.3f}, {f['s_per_unet_step']:.2f} s per UNet step")
    out["estimate_3600_on_one_gpu"] = e = estimate(3600, 1, 5, 24, args.assume_gpu_its, args.assume_decode_s)
    print(f"3600-character benchmark on one GPU (NOT measured; assumes {e['ASSUMED_gpu_unet_steps_per_s']} UNet "
          f"steps/s and {e['ASSUMED_vae_decode_s']} s decode at 1024px): {e['images']} images x "
          f"{e['estimated_s_per_image']:.2f} s = {e['estimated_hours']:.1f} h")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
