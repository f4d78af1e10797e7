"""Sampler names -> diffusers schedulers, configured as sd-scripts' trainer samples.

sd-scripts' own table is library/train_util.get_my_scheduler; the sd-scripts backend calls
it directly. The diffusers backend (no sd-scripts needed) uses this copy of its choices:
the SD noise schedule (1000 steps, scaled_linear 0.00085..0.012), clip_sample on where the
scheduler has it, dpmsolver / dpmsolver++ as the algorithm type. The gated test
tests/tools/test_eval_sdscripts.py checks every name against get_my_scheduler's config.
"""
from __future__ import annotations

from .errors import EvalError

TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END, BETA_SCHEDULE = 0.00085, 0.0120, "scaled_linear"

# name -> (diffusers class name, extra init args); aliases as sd-scripts accepts them
_TABLE = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}
ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a"}
SAMPLERS = tuple(_TABLE) + tuple(ALIASES)


def canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in _TABLE:
        # sd-scripts silently falls back to DDIM for an unknown name; a benchmark must not
        raise EvalError(f"sampler {name!r}: must be one of {', '.join(SAMPLERS)}")
    return name


def make_scheduler(name: str, *, v_parameterization: bool = False):
    import diffusers

    cls_name, extra = _TABLE[canonical(name)]
    args = dict(extra)
    if v_parameterization:
        args["prediction_type"] = "v_prediction"
    scheduler = getattr(diffusers, cls_name)(
        num_train_timesteps=TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
        beta_schedule=BETA_SCHEDULE, **args)
    if getattr(scheduler.config, "clip_sample", None) is False:
        scheduler.config.clip_sample = True  # as sd-scripts does
    return scheduler
