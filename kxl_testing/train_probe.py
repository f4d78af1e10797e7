"""Measurements from inside a training process, the same for kxl and plain sd-scripts.

Started by kxl_testing/probe_site/sitecustomize.py (the benchmark puts that folder first on
PYTHONPATH and sets KXL_BENCH_PROBE=DIR), so neither command line changes. Nothing here alters
what is trained: it wraps `library.sdxl_train_util.sample_images`, which sd-scripts calls once
before the loop (epoch 0), once after every optimizer step (epoch None) and at each epoch end, and
which returns at once when no sampling is configured. At each call it records the wall clock
(after a CUDA synchronize), the CUDA allocator's peaks (max_memory_allocated / reserved), the
process's CPU seconds and peak RSS and the grad scaler's scale, and rewrites DIR/probe-<pid>.json. The
accelerate launcher process also starts the probe but never reaches training, so it writes none.

Optional, the same in both: KXL_BENCH_TINY=1 narrows sd-scripts' SDXL architecture
(kxl_testing.tiny_sdxl.shrink) when library.sdxl_model_util is imported; KXL_BENCH_DETERMINISTIC=1
turns on torch.use_deterministic_algorithms (warn_only) for the resume check.
"""
from __future__ import annotations

import importlib.abc
import os
import resource
import sys
import time
from pathlib import Path

PROBE_ENV = "KXL_BENCH_PROBE"
TINY_ENV = "KXL_BENCH_TINY"
DETERMINISTIC_ENV = "KXL_BENCH_DETERMINISTIC"


class AfterImport(importlib.abc.MetaPathFinder):
    """Runs hook(module) right after the named module executes (a post-import hook)."""

    def __init__(self, hooks: dict):
        self.hooks = dict(hooks)

    def find_spec(self, name, path=None, target=None):
        if name not in self.hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        hook = self.hooks.pop(name)
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            hook(module)

        loader.exec_module = exec_module
        return spec


class Probe:
    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / f"probe-{os.getpid()}.json"
        self.record = {"pid": os.getpid(), "argv": sys.argv, "t_process_start": time.time(),
                       "tiny": os.environ.get(TINY_ENV) == "1",
                       "deterministic": os.environ.get(DETERMINISTIC_ENV) == "1",
                       "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                       "t_loop_start": None, "start_step": None, "steps": [], "epoch_ends": []}

    def snapshot(self, accelerator) -> dict:
        import torch

        usage = resource.getrusage(resource.RUSAGE_SELF)
        # CPU seconds of this process's threads: on a shared CPU, steadier than the wall clock
        point = {"t": None, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_peak_bytes": usage.ru_maxrss * 1024}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            point["cuda_allocated_peak_bytes"] = torch.cuda.max_memory_allocated()
            point["cuda_reserved_peak_bytes"] = torch.cuda.max_memory_reserved()
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:
            point["grad_scale"] = float(scaler.get_scale())
        point["t"] = time.time()
        return point

    def on_sample_images(self, accelerator, epoch, global_step) -> None:
        point = self.snapshot(accelerator)
        point["step"] = int(global_step)
        if epoch is None:
            self.record["steps"].append(point)
        elif epoch == 0 and self.record["t_loop_start"] is None:
            self.record["t_loop_start"] = point["t"]
            self.record["cpu_s_loop_start"] = point["cpu_s"]
            self.record["start_step"] = int(global_step)
            self.record["environment"] = environment()
        else:
            self.record["epoch_ends"].append(point)
        self.write()

    def write(self) -> None:
        from kxl_common.atomic import write_json

        write_json(self.path, self.record)


def environment() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
    for name in ("transformers", "diffusers", "accelerate", "lycoris", "bitsandbytes", "safetensors"):
        module = sys.modules.get(name)
        info[name] = getattr(module, "__version__", None) if module else None
    return info


def _wrap_sample_images(probe: Probe):
    def hook(sdxl_train_util):
        original = sdxl_train_util.sample_images

        def sample_images(accelerator, args, epoch, global_step, *rest, **kw):
            probe.on_sample_images(accelerator, epoch, global_step)
            return original(accelerator, args, epoch, global_step, *rest, **kw)

        sdxl_train_util.sample_images = sample_images

    return hook


def _shrink(sdxl_model_util):
    from kxl_testing.tiny_sdxl import shrink
    from library import model_util, sdxl_original_unet

    shrink(sdxl_original_unet, model_util, sdxl_model_util)


def _torchvision(_library):
    from kxl_train import torchvision_compat

    torchvision_compat.install()


def _deterministic(torch):
    torch.use_deterministic_algorithms(True, warn_only=True)


def install() -> Probe | None:
    out = os.environ.get(PROBE_ENV)
    if not out:
        return None
    probe = Probe(Path(out))
    hooks = {"library.sdxl_train_util": _wrap_sample_images(probe)}
    if os.environ.get(TINY_ENV) == "1":
        hooks["library.sdxl_model_util"] = _shrink
    if os.environ.get(DETERMINISTIC_ENV) == "1":
        hooks["torch"] = _deterministic
    # sd-scripts imports torchvision's transforms at module level; where no working torchvision
    # exists (a CPU-only torch) both runs get the stand-in kxl_train.entry installs for itself
    hooks["library"] = _torchvision
    sys.meta_path.insert(0, AfterImport(hooks))
    return probe
