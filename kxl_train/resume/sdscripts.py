"""Run-time patches that make sd-scripts v0.10.1 training exactly resumable.

Installed by kxl_train.entry (through kxl_train.patches) before sd-scripts builds anything;
the submodule is never edited. What changes (docs/resume.md has the why, with line numbers):

- data order: the training DataLoader's `shuffle=True` is replaced, when accelerate prepares
  it, by kxl_train.resume.sampler.ExactBatchSampler (order from (seed, epoch), padded to the
  process count, resumable at any position without loading what is skipped); the DataLoader
  gets its own torch.Generator so starting an epoch no longer draws from the global torch RNG;
- bucket contents per epoch: BaseDataset.shuffle_buckets becomes a pure function of
  (seed, epoch) (canonical sorted buckets, derived shuffles), applied by the item itself before
  it is loaded, in whichever worker loads it;
- caption shuffle / tag dropout / wildcard / flip / random crop / color aug: library.train_util's
  `random` becomes a RandomRouter; while one item loads, each image draws from
  sample_rng(seed, epoch, dataset, bucket, position in bucket);
- step arithmetic: NetworkTrainer.train gets two one-line edits (global_step starts at the
  resumed step; the progress bar counts what is left) and one call per optimizer step;
- state: every saved state gets kxl_resume.json (recipe fingerprint, global step, command
  line, the accelerate arguments of kxl-train launch); `--resume` of such a state checks the
  recipe before the model is loaded and positions the sampler; states without it are refused
  unless --kxl-inexact-resume.

Options (`--kxl-*`, taken off by kxl_train.entry):
  --kxl-trace PATH         log sample keys and final captions per optimizer step (JSONL)
  --kxl-resume STATE_DIR   resume exactly from a kxl state (sd-scripts' --resume, checked)
  --kxl-inexact-resume     leave sd-scripts' data order and resume as they are (no patches);
  --kxl-upstream-data-order  the same, named for runs that do not resume
  --kxl-accelerate-args ARGS  set by kxl-train launch: recorded, so a resume launches the same way
"""
from __future__ import annotations

import bisect
import logging
import multiprocessing
import os
import random
from pathlib import Path

import torch

from kxl_train.argv import ACCELERATE_ARGS, accelerate_args_of, without_option
from kxl_train.attribute_patches import AttributePatches
from kxl_train.resume import state as state_mod
from kxl_train.resume.items import PatchError, canonicalize, layout_for_epoch, load_item
from kxl_train.resume.rng import RandomRouter, derive_seed
from kxl_train.resume.sampler import EpochItem, ExactBatchSampler
from kxl_train.resume.stepmath import EpochGeometry
from kxl_train.resume.trace import TraceWriter, rank_path
from kxl_train.source_edits import edit_function

logger = logging.getLogger("kxl.resume")

RUNTIME_NAME = "_kxl_resume_runtime"
RANK_RNG_FILE = "kxl_rank_rng_states.pt"


# --------------------------------------------------------------------------- train() edits
# (anchor, replacement) pairs applied to the source of train_network.NetworkTrainer.train.
# Each anchor must occur exactly once; replacements keep the line count so tracebacks still
# point at the right lines of train_network.py.
TRAIN_EDITS = (
    (
        # train_network.py:1275 -- upstream restarts the count at 0 (or at the within-epoch
        # remainder with --skip_until_initial_step)
        "\n    global_step = 0\n",
        f"\n    global_step = {RUNTIME_NAME}.initial_global_step()\n",
    ),
    (
        # train_network.py:1358 -- the bar shows the steps this run still has to do
        "range(args.max_train_steps - initial_step)",
        "range(args.max_train_steps - initial_step - global_step)",
    ),
    (
        # train_network.py:1488 -- one call per optimizer step (trace, step bookkeeping)
        "\n                global_step += 1\n",
        f"\n                global_step += 1; {RUNTIME_NAME}.on_optimizer_step(global_step, epoch)\n",
    ),
)


def patch_train_source(trainer_class) -> None:
    original = trainer_class.train
    if getattr(original, "_kxl_patched", False):
        return
    patched = edit_function(original, TRAIN_EDITS, "kxl exact resume")
    patched._kxl_patched = True
    trainer_class.train = patched


# --------------------------------------------------------------------------- runtime
class Runtime(AttributePatches):
    """State shared by the patches during one training process; uninstall() undoes every patch."""

    def __init__(self, options: dict, argv: list[str]):
        super().__init__()
        self.options = dict(options)
        self.argv = list(argv)
        self.router = RandomRouter(random)
        self.group = None
        self.args = None
        self.accelerator = None
        self.geometry: EpochGeometry | None = None
        self.recipe: dict | None = None
        self.sampler: ExactBatchSampler | None = None
        self.start_step = 0
        self.resumption = None
        self.global_step = 0
        self.trace: TraceWriter | None = None
        self.rank_rng_states: list[dict] = []

    # -- called from the edited train()
    def initial_global_step(self) -> int:
        self.global_step = self.start_step
        return self.start_step

    def on_optimizer_step(self, global_step: int, epoch: int) -> None:
        self.global_step = global_step
        if self.trace is not None:
            self.trace.end_step(global_step, epoch + 1)
        if self.geometry.num_processes > 1 and (self.args.save_state or self.args.save_state_on_train_end):
            # sd-scripts saves states on the main process only, so accelerate writes no RNG file
            # for the other ranks; collect every rank's RNG at each step for the next save
            from accelerate.utils import gather_object

            self.rank_rng_states = gather_object([rng_snapshot(self.accelerator)])

    def on_micro_batch(self, batch: dict) -> None:
        if self.trace is None:
            return
        self.trace.add_micro_batch({
            "epoch": batch["kxl_item"][0], "position": batch["kxl_item"][1], "index": batch["kxl_item"][2],
            "keys": list(batch["kxl_keys"]), "captions": list(batch["captions"]),
            "flipped": [bool(f) for f in batch.get("flippeds", [])],
        })

    # -- set-up, from the prepare_accelerator wrapper (before any model is loaded)
    def set_up(self, args, accelerator) -> None:
        self.args, self.accelerator = args, accelerator
        for flag in ("skip_until_initial_step", "initial_step", "initial_epoch", "resume_from_huggingface"):
            if getattr(args, flag, None):
                raise state_mod.ResumeRefused(
                    f"--{flag} cannot be combined with kxl's exact resume (it replaces sd-scripts' step "
                    f"skipping); drop it, or pass --kxl-inexact-resume for sd-scripts' own behaviour"
                )
        if self.group is None:
            raise state_mod.ResumeRefused(
                "kxl exact resume needs a dataset built from a dataset config / train_data_dir / in_json; "
                "--dataset_class is not supported (pass --kxl-inexact-resume)"
            )
        num_processes = accelerator.num_processes
        grad_accum = args.gradient_accumulation_steps
        self.geometry = EpochGeometry(len(self.group), num_processes, grad_accum)
        for ds_pos, ds in enumerate(self.group.datasets):
            ds._kxl_seed = int(args.seed)
            ds._kxl_pos = ds_pos
            ds._kxl_geometry = self.geometry
            canonicalize(ds)
        max_train_steps = args.max_train_steps
        if args.max_train_epochs is not None:  # what train_network.py:799-802 will compute
            max_train_steps = args.max_train_epochs * self.geometry.steps_per_epoch
        recipe_args = _ArgsView(args, max_train_steps=max_train_steps)
        self.recipe = state_mod.recipe_description(
            recipe_args, num_processes, state_mod.dataset_description(self.group)
        )
        if args.resume:
            record = state_mod.read_state(args.resume)
            state_mod.check_resumable(args.resume, record, self.recipe)
            try:
                self.resumption = self.geometry.resumption(record["global_step"], max_train_steps)
            except ValueError as exc:
                raise state_mod.ResumeRefused(f"resume state {args.resume}: {exc}") from None
            self.start_step = record["global_step"]
            logger.info(
                "kxl exact resume: step %d = epoch %d, %d steps in (%d micro-batches per rank, "
                "position %d of %d); nothing before it is loaded",
                self.start_step, self.resumption.epoch + 1, self.resumption.step_in_epoch,
                self.resumption.micro_batch_offset, self.resumption.order_offset, self.geometry.padded_length,
            )
        trace_path = self.options.get("trace")
        if trace_path:
            path = rank_path(trace_path, accelerator.process_index, num_processes)
            self.trace = TraceWriter(path, accelerator.process_index,
                                     resume_after_step=self.start_step if args.resume else None)
        accelerator.register_save_state_pre_hook(self.save_hook)
        accelerator.register_load_state_pre_hook(self.load_hook)
        original_prepare = accelerator.prepare

        def prepare(*objects, **kwargs):
            return original_prepare(*[self.replace_dataloader(o) for o in objects], **kwargs)

        accelerator.prepare = prepare

    def replace_dataloader(self, obj):
        if not isinstance(obj, torch.utils.data.DataLoader) or obj.dataset is not self.group:
            return obj
        if not isinstance(obj.sampler, torch.utils.data.RandomSampler):
            raise PatchError("kxl exact resume: sd-scripts' training DataLoader is not shuffle=True as expected")
        collator = obj.collate_fn
        self.sampler = ExactBatchSampler(
            len(self.group), self.args.seed, self.geometry.num_processes,
            epoch_source=lambda: collator.current_epoch.value - 1,
        )
        if self.resumption is not None:
            self.sampler.resume_at(self.resumption.epoch, self.resumption.order_offset)
        generator = torch.Generator()
        generator.manual_seed(derive_seed(self.args.seed, "loader") % (2**63))
        extra = {}
        if obj.num_workers > 0 and "fork" in multiprocessing.get_all_start_methods():
            extra["multiprocessing_context"] = "fork"  # workers must inherit the patches
        return torch.utils.data.DataLoader(
            obj.dataset,
            batch_sampler=self.sampler,
            collate_fn=collator,
            num_workers=obj.num_workers,
            persistent_workers=obj.persistent_workers,
            generator=generator,
            **extra,
        )

    def save_hook(self, models, weights, output_dir) -> None:
        if self.geometry.num_processes > 1:
            if len(self.rank_rng_states) != self.geometry.num_processes:
                raise PatchError("kxl exact resume: a state is saved before any optimizer step gathered the ranks' RNG")
            torch.save(self.rank_rng_states, Path(output_dir) / RANK_RNG_FILE)
        state_mod.write_resume_record(output_dir, {
            "global_step": self.global_step,
            "recipe": self.recipe,
            "argv": self.argv,
            "kxl_options": {k: v for k, v in self.options.items() if k not in ("resume", ACCELERATE_ARGS)},
            # how kxl-train launch started accelerate (None: the run did not come from it)
            "accelerate_args": accelerate_args_of(self.options),
            "num_processes": self.geometry.num_processes,
            "seed": int(self.args.seed),
            "cwd": os.getcwd(),
        })

    def load_hook(self, models, input_dir) -> None:
        if self.args.resume is None or Path(input_dir).resolve() != Path(self.args.resume).resolve():
            raise PatchError(f"kxl exact resume: loading {input_dir}, but the run was checked for {self.args.resume}")
        rank = self.accelerator.process_index
        path = Path(input_dir) / RANK_RNG_FILE
        if rank > 0:  # rank 0's RNG and step come from accelerate's own random_states_0.pkl
            if not path.is_file():
                raise state_mod.ResumeRefused(
                    f"resume state {input_dir} has no {RANK_RNG_FILE}: the RNG of rank {rank} was not saved"
                )
            restore_rng(self.accelerator, torch.load(path, weights_only=False)[rank])


def rng_snapshot(accelerator) -> dict:
    """This process's RNG states and accelerate's accumulation counter, as accelerate saves them."""
    import numpy as np

    snapshot = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "step": accelerator.step}
    if torch.cuda.is_available():
        snapshot["cuda"] = torch.cuda.get_rng_state_all()
    return snapshot


def restore_rng(accelerator, snapshot: dict) -> None:
    import numpy as np

    random.setstate(snapshot["python"])
    np.random.set_state(snapshot["numpy"])
    torch.set_rng_state(snapshot["torch"])
    if "cuda" in snapshot and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snapshot["cuda"])
    accelerator.step = snapshot["step"]


class _ArgsView:
    def __init__(self, args, **overrides):
        self._args, self._overrides = args, overrides

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._args, name)


# --------------------------------------------------------------------------- installer
def install(kxl_options: dict, argv: list[str]) -> Runtime | None:
    if kxl_options.get("inexact_resume") or kxl_options.get("upstream_data_order"):
        logger.warning("kxl: --kxl-inexact-resume / --kxl-upstream-data-order: sd-scripts' own data order "
                       "and resume are used unchanged (no exact resume, no --kxl-trace)")
        return None
    import train_network
    from library import config_util, train_util

    resume_dir = kxl_options.get("resume")
    if resume_dir:
        if resume_dir is True:
            raise state_mod.ResumeRefused("--kxl-resume needs a state directory: --kxl-resume=OUT/NAME-step00013600-state")
        # --kxl-resume=STATE on a launch script: becomes sd-scripts' --resume (argv is edited in
        # place, as kxl_train.patches allows, so the launch scripts need no resume logic)
        argv[:] = [*without_option(argv, "--resume"), "--resume", str(resume_dir)]

    runtime = Runtime(kxl_options, argv)
    replace = runtime.replace
    replace(train_network, RUNTIME_NAME, runtime)
    original_train = train_network.NetworkTrainer.__dict__["train"]
    patch_train_source(train_network.NetworkTrainer)
    runtime.restore.append((train_network.NetworkTrainer, "train", original_train))

    replace(train_util, "random", runtime.router)

    original_generate = config_util.generate_dataset_group_by_blueprint

    def generate_dataset_group_by_blueprint(*a, **kw):
        train_group, val_group = original_generate(*a, **kw)
        runtime.group = train_group
        return train_group, val_group

    replace(config_util, "generate_dataset_group_by_blueprint", generate_dataset_group_by_blueprint)

    original_prepare_accelerator = train_util.prepare_accelerator

    def prepare_accelerator(args):
        accelerator = original_prepare_accelerator(args)
        runtime.set_up(args, accelerator)
        return accelerator

    replace(train_util, "prepare_accelerator", prepare_accelerator)

    original_shuffle = train_util.BaseDataset.shuffle_buckets

    def shuffle_buckets(self):
        if getattr(self, "_kxl_layout_epoch", "absent") == "absent":
            return original_shuffle(self)  # before set-up (make_buckets at construction)
        layout_for_epoch(self)

    replace(train_util.BaseDataset, "shuffle_buckets", shuffle_buckets)

    original_base_getitem = train_util.BaseDataset.__getitem__
    original_group_getitem = train_util.DatasetGroup.__getitem__

    def group_getitem(self, idx):
        if not isinstance(idx, EpochItem):
            return original_group_getitem(self, idx)
        ds_pos = bisect.bisect_right(self.cumulative_sizes, idx.index)
        local = idx.index - (self.cumulative_sizes[ds_pos - 1] if ds_pos else 0)
        return load_item(self.datasets[ds_pos], ds_pos, local, idx, original_base_getitem, runtime.router)

    replace(train_util.DatasetGroup, "__getitem__", group_getitem)

    original_process_batch = train_network.NetworkTrainer.process_batch

    def process_batch(self, batch, *a, **kw):
        if kw.get("is_train", True) and "kxl_item" in batch:
            runtime.on_micro_batch(batch)
        return original_process_batch(self, batch, *a, **kw)

    replace(train_network.NetworkTrainer, "process_batch", process_batch)
    return runtime
