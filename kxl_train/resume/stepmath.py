"""Where a global optimizer step lies in the data, for any gradient accumulation, process count
and epoch length. Pure arithmetic, no torch, no sd-scripts.

Model of one epoch (what accelerate does with sd-scripts' DataLoader):
- the epoch has `num_items` dataset items (sd-scripts: bucket batches; each item is one
  micro-batch on one process);
- items are dealt round robin to `num_processes` ranks; the order is padded to a multiple of
  the process count (accelerate's `even_batches` pads by cycling from the start), so every
  rank sees `micro_batches_per_rank = ceil(num_items / num_processes)` micro-batches;
- a rank steps the optimizer after every `grad_accum` micro-batches and after the last
  micro-batch of the epoch (accelerate syncs at the end of the dataloader and resets its
  accumulation counter), so an epoch has `ceil(micro_batches_per_rank / grad_accum)` steps,
  the last one possibly shorter.

Every epoch has the same length, so global step S (S steps done) is epoch `S // steps_per_epoch`
(0-based), `S % steps_per_epoch` steps into it, which is `(S % steps_per_epoch) * grad_accum`
micro-batches per rank and `that * num_processes` positions into the padded global order.
"""
from __future__ import annotations

from dataclasses import dataclass


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Resumption:
    """Where training continues after `global_step` optimizer steps."""

    global_step: int
    epoch: int  # 0-based epoch to start in
    step_in_epoch: int  # optimizer steps already done in that epoch
    micro_batch_offset: int  # micro-batches already consumed per rank in that epoch
    order_offset: int  # positions already consumed in the epoch's padded global order


@dataclass(frozen=True)
class EpochGeometry:
    num_items: int
    num_processes: int = 1
    grad_accum: int = 1

    def __post_init__(self):
        for name in ("num_items", "num_processes", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EpochGeometry.{name} must be a positive int, got {value!r}")

    @property
    def micro_batches_per_rank(self) -> int:
        return ceil_div(self.num_items, self.num_processes)

    @property
    def padded_length(self) -> int:
        """Length of the global order once padded to a multiple of the process count."""
        return self.micro_batches_per_rank * self.num_processes

    @property
    def steps_per_epoch(self) -> int:
        return ceil_div(self.micro_batches_per_rank, self.grad_accum)

    def num_epochs(self, max_train_steps: int) -> int:
        """Epochs the loop runs to reach max_train_steps (sd-scripts: ceil(max / per epoch))."""
        return ceil_div(max_train_steps, self.steps_per_epoch)

    def micro_batches_in_step(self, step_in_epoch: int) -> int:
        """Micro-batches per rank accumulated into the given (0-based) step of an epoch."""
        if not 0 <= step_in_epoch < self.steps_per_epoch:
            raise ValueError(f"step_in_epoch {step_in_epoch} outside 0..{self.steps_per_epoch - 1}")
        start = step_in_epoch * self.grad_accum
        return min(self.grad_accum, self.micro_batches_per_rank - start)

    def resumption(self, global_step: int, max_train_steps: int | None = None) -> Resumption:
        """Where to continue after `global_step` completed optimizer steps."""
        if global_step < 0:
            raise ValueError(f"global_step must be >= 0, got {global_step}")
        if max_train_steps is not None and global_step >= max_train_steps:
            raise ValueError(
                f"the state is at step {global_step}, which is not before max_train_steps="
                f"{max_train_steps}: there is nothing left to train"
            )
        epoch, step_in_epoch = divmod(global_step, self.steps_per_epoch)
        micro = step_in_epoch * self.grad_accum
        return Resumption(
            global_step=global_step,
            epoch=epoch,
            step_in_epoch=step_in_epoch,
            micro_batch_offset=micro,
            order_offset=micro * self.num_processes,
        )

    def global_step_at(self, epoch: int, micro_batches_done: int) -> int:
        """Completed optimizer steps after `micro_batches_done` micro-batches of `epoch`
        (counting a partial accumulation as not yet stepped, except at the epoch's end)."""
        if not 0 <= micro_batches_done <= self.micro_batches_per_rank:
            raise ValueError(f"micro_batches_done {micro_batches_done} outside the epoch")
        if micro_batches_done == self.micro_batches_per_rank:
            done = self.steps_per_epoch
        else:
            done = micro_batches_done // self.grad_accum
        return epoch * self.steps_per_epoch + done


def upstream_skip_global_step(global_step: int, num_items_per_rank: int, grad_accum: int) -> tuple[int, int]:
    """What sd-scripts v0.10.1 does with `--resume --skip_until_initial_step` (train_network.py
    1252-1273 and 1340-1344), kept as a model for the documentation and tests of the defects:
    returns (epoch_to_start, global_step it continues from)."""
    initial_step = global_step * grad_accum
    epoch_to_start = initial_step // ceil_div(num_items_per_rank, grad_accum)
    for _ in range(epoch_to_start):
        initial_step -= num_items_per_rank
    return epoch_to_start, initial_step
