"""Exact resume for sd-scripts training: step arithmetic (stepmath), a (seed, epoch) sampler
that starts anywhere (sampler), per-sample random streams (rng, items), the recipe check
(state), the per-step trace (trace) and the run-time patches of sd-scripts (sdscripts)."""
