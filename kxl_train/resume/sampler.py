"""A batch sampler whose order is a pure function of (seed, epoch) and that can start an epoch
at any position without touching the items before it.

It replaces the DataLoader's `shuffle=True` (a RandomSampler drawing its permutation from the
global torch RNG when an epoch's iterator starts). Each yielded "index" is an `EpochItem`
that carries the epoch and position along with the dataset index, so the dataset can derive
its per-sample randomness and bucket order from them, in whichever worker process loads it.

The global order is padded to a multiple of the process count here (cycling from its start,
as accelerate's even_batches does), so accelerate's BatchSamplerShard deals it round robin
without ever wrapping around itself, and a resume offset that is a multiple of the process
count keeps every rank on its own items.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

from kxl_train.resume.rng import derived_random
from kxl_train.resume.stepmath import EpochGeometry


class EpochItem(NamedTuple):
    epoch: int  # 0-based epoch
    position: int  # position in the epoch's padded global order
    index: int  # dataset index


def epoch_order(seed: int, epoch: int, num_items: int, num_processes: int = 1) -> list[int]:
    """The epoch's global order of dataset indices, padded to a multiple of num_processes."""
    order = list(range(num_items))
    derived_random(seed, "order", epoch).shuffle(order)
    padded = EpochGeometry(num_items, num_processes).padded_length
    while len(order) < padded:
        order.extend(order[: padded - len(order)])
    return order


class ExactBatchSampler:
    """Batch sampler (batches of one dataset item, like sd-scripts' DataLoader batch_size=1).

    The epoch of each iteration comes from `epoch_source()` when given (sd-scripts: its
    current_epoch counter, 1-based, minus one), else from `set_epoch`. `resume_at` makes the
    next iteration of that epoch start at a position of the padded global order.
    """

    batch_size = 1
    drop_last = False

    def __init__(self, num_items: int, seed: int, num_processes: int = 1,
                 epoch_source: Callable[[], int] | None = None):
        self.geometry = EpochGeometry(num_items, num_processes)
        self.num_items = num_items
        self.seed = int(seed)
        self.num_processes = num_processes
        self.epoch_source = epoch_source
        self._epoch = 0
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.geometry.padded_length

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def resume_at(self, epoch: int, order_offset: int) -> None:
        if order_offset % self.num_processes:
            raise ValueError(f"order offset {order_offset} is not a multiple of {self.num_processes} processes")
        if not 0 <= order_offset <= len(self):
            raise ValueError(f"order offset {order_offset} outside 0..{len(self)}")
        self._resume = (epoch, order_offset)

    def current_epoch(self) -> int:
        return self.epoch_source() if self.epoch_source is not None else self._epoch

    def __iter__(self) -> Iterator[list[EpochItem]]:
        epoch = self.current_epoch()
        start = 0
        if self._resume is not None:
            resume_epoch, offset = self._resume
            if epoch != resume_epoch:
                raise RuntimeError(
                    f"the resumed run iterates epoch {epoch} first, but the state is in epoch "
                    f"{resume_epoch}: the step arithmetic and the loop disagree"
                )
            start, self._resume = offset, None
        order = epoch_order(self.seed, epoch, self.num_items, self.num_processes)
        for position in range(start, len(order)):
            yield [EpochItem(epoch, position, order[position])]
