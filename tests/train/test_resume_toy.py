"""Exact resume, end to end on CPU without sd-scripts: a tiny torch model trained on a dataset
shaped like sd-scripts' (items are bucket batches; flips, caption shuffle and tag dropout drawn
from a module-level `random`), with accelerate's step semantics (round-robin shards padded to
the process count, gradient accumulation synced at the end of each epoch).

For several GA / process / worker counts: train N steps straight, saving states at every
step; then for several k resume from the state at k and train to N. The per-step traces and
the final weights must be identical (bitwise), and chained resumes too.
"""
from __future__ import annotations

import copy
import math
import random as _stdlib_random
from typing import NamedTuple

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard

from kxl_train.resume.items import canonicalize, load_item
from kxl_train.resume.rng import RandomRouter
from kxl_train.resume.sampler import EpochItem, ExactBatchSampler
from kxl_train.resume.stepmath import EpochGeometry

# The toy "library" draws from a module-level `random`, like library.train_util; the patches
# replace it by a router, exactly as kxl_train.resume.sdscripts does for train_util.
ROUTER = RandomRouter(_stdlib_random)
random = ROUTER

DIM = 12
TAGS = [f"tag{i}" for i in range(20)]


class BucketBatchIndex(NamedTuple):
    bucket_index: int
    bucket_batch_size: int
    batch_index: int


class Info:
    def __init__(self, key: str, caption: str, vec: torch.Tensor):
        self.image_key, self.caption, self.vec = key, caption, vec


class BucketManager:
    def __init__(self, resos):
        self.resos = list(resos)
        self.buckets = [[] for _ in self.resos]


class ToyDataset(torch.utils.data.Dataset):
    """Shaped like sd-scripts' BaseDataset: one item = one bucket batch."""

    def __init__(self, num_images: int, batch_size: int, repeats: int = 1, seed: int = 0):
        gen = _stdlib_random.Random(seed)
        vec_gen = torch.Generator().manual_seed(seed)
        self.batch_size = batch_size
        self.current_epoch = 0
        self.current_step = 0
        self.image_data = {}
        self.bucket_manager = BucketManager([(64, 64), (64, 96), (96, 64)])
        for i in range(num_images):
            key = f"img{i:03d}.png"
            caption = "1girl ||| " + ", ".join(gen.sample(TAGS, gen.randint(3, 8))) + " ||| masterpiece"
            self.image_data[key] = Info(key, caption, torch.randn(DIM, generator=vec_gen))
            for _ in range(repeats):
                self.bucket_manager.buckets[gen.randrange(3)].append(key)
        self.buckets_indices = [
            BucketBatchIndex(b, batch_size, j)
            for b, bucket in enumerate(self.bucket_manager.buckets)
            for j in range(math.ceil(len(bucket) / batch_size))
        ]
        _stdlib_random.Random(seed + 1).shuffle(self.buckets_indices)  # as sd-scripts does at build

    def __len__(self):
        return len(self.buckets_indices)

    def process_caption(self, caption: str) -> str:
        fixed, flex, suffix = caption.split(" ||| ")
        tokens = [t.strip() for t in flex.split(",")]
        random.shuffle(tokens)
        tokens = [t for t in tokens if random.random() >= 0.2]
        return ", ".join([fixed, *tokens, suffix])

    def __getitem__(self, index):
        bbi = self.buckets_indices[index]
        bucket = self.bucket_manager.buckets[bbi.bucket_index]
        start = bbi.batch_index * bbi.bucket_batch_size
        images, captions, flippeds = [], [], []
        for key in bucket[start : start + bbi.bucket_batch_size]:
            info = self.image_data[key]
            flipped = random.random() < 0.5
            images.append(info.vec.flip(0) if flipped else info.vec)
            captions.append(self.process_caption(info.caption))
            flippeds.append(flipped)
        return {"images": torch.stack(images), "captions": captions, "flippeds": flippeds}


class ToyGroup(torch.utils.data.ConcatDataset):
    def __getitem__(self, idx):
        assert isinstance(idx, EpochItem)
        for ds_pos, end in enumerate(self.cumulative_sizes):
            if idx.index < end:
                local = idx.index - (self.cumulative_sizes[ds_pos - 1] if ds_pos else 0)
                return load_item(self.datasets[ds_pos], ds_pos, local, idx, ToyDataset.__getitem__, ROUTER)
        raise IndexError(idx)


def make_group(seed: int, geometry_args) -> tuple[ToyGroup, EpochGeometry]:
    group = ToyGroup([ToyDataset(13, 2, repeats=2, seed=seed), ToyDataset(5, 3, seed=seed + 7)])
    num_processes, grad_accum = geometry_args
    geometry = EpochGeometry(len(group), num_processes, grad_accum)
    for ds_pos, ds in enumerate(group.datasets):
        ds._kxl_seed, ds._kxl_pos, ds._kxl_geometry = seed, ds_pos, geometry
        canonicalize(ds)
    return group, geometry


def text_features(captions: list[str]) -> torch.Tensor:
    """Order-sensitive bag of tags, so caption shuffle and dropout change the gradient."""
    out = torch.zeros(len(captions), DIM)
    for row, caption in enumerate(captions):
        for pos, tag in enumerate(caption.split(", ")):
            out[row, sum(map(ord, tag)) % DIM] += 1.0 / (1 + pos)
    return out


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2 * DIM + 1, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(16, DIM))


def micro_batch_loss(model, batch, noise_gen: torch.Generator) -> torch.Tensor:
    x = batch["images"]
    t = torch.rand(x.shape[0], 1, generator=noise_gen)
    noise = torch.randn(x.shape, generator=noise_gen)
    noisy = x * (1 - t) + noise * t
    pred = model(torch.cat([noisy, text_features(batch["captions"]), t], dim=1))  # dropout: global RNG
    return torch.nn.functional.mse_loss(pred, noise)


class Config(NamedTuple):
    num_processes: int
    grad_accum: int
    workers: int
    seed: int = 1234


def lr_lambda(max_steps):
    return lambda s: min(1.0, (s + 1) / 3) * 0.5 * (1 + math.cos(math.pi * min(s, max_steps) / max_steps))


def first(examples):
    return examples[0]


def train(cfg: Config, max_steps: int, resume: dict | None = None, stop_at: int | None = None,
          keep_states: bool = False, order_seed: int | None = None):
    """One 'process' of training (ranks simulated in lockstep). Returns (weights, trace, states)."""
    group, geometry = make_group(cfg.seed, (cfg.num_processes, cfg.grad_accum))
    torch.manual_seed(cfg.seed)
    model = make_model(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(max_steps))
    noise_gens = [torch.Generator().manual_seed(cfg.seed * 31 + r) for r in range(cfg.num_processes)]
    order_seed = cfg.seed if order_seed is None else order_seed
    samplers = [ExactBatchSampler(len(group), order_seed, cfg.num_processes) for _ in range(cfg.num_processes)]
    micro_counter = [0] * cfg.num_processes  # accelerate's Accelerator.step, one per process
    global_step, start_epoch = 0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        for gen, state in zip(noise_gens, resume["noise"]):
            gen.set_state(state)
        torch.set_rng_state(resume["torch"])
        micro_counter = list(resume["micro_counter"])
        global_step = resume["global_step"]
        where = geometry.resumption(global_step, max_steps)
        for sampler in samplers:
            sampler.resume_at(where.epoch, where.order_offset)
        start_epoch = where.epoch
    trace, states, pending = [], {}, [[] for _ in range(cfg.num_processes)]
    model.train()
    for epoch in range(start_epoch, geometry.num_epochs(max_steps)):
        shards = []
        for rank, sampler in enumerate(samplers):
            sampler.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                group, batch_sampler=BatchSamplerShard(sampler, cfg.num_processes, rank),
                collate_fn=first, num_workers=cfg.workers,
                generator=torch.Generator().manual_seed(0),
                multiprocessing_context="fork" if cfg.workers else None,
            )
            shards.append(list(loader))
        lengths = {len(s) for s in shards}
        assert len(lengths) == 1, f"ranks got different micro-batch counts {lengths}"
        count = lengths.pop()
        for i in range(count):
            last = i == count - 1
            for rank in range(cfg.num_processes):
                batch = shards[rank][i]
                loss = micro_batch_loss(model, batch, noise_gens[rank]) / cfg.grad_accum
                loss.backward()
                pending[rank].append({"item": batch["kxl_item"], "keys": batch["kxl_keys"],
                                      "captions": batch["captions"], "flipped": batch["flippeds"]})
                micro_counter[rank] = 0 if last else micro_counter[rank] + 1
            if not (last or micro_counter[0] % cfg.grad_accum == 0):
                continue
            for p in model.parameters():
                p.grad /= cfg.num_processes  # DDP averages over ranks
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            trace.append({"step": global_step, "epoch": epoch + 1, "ranks": pending})
            pending = [[] for _ in range(cfg.num_processes)]
            if keep_states:
                states[global_step] = {
                    "model": copy.deepcopy(model.state_dict()),
                    "optimizer": copy.deepcopy(optimizer.state_dict()),
                    "scheduler": copy.deepcopy(scheduler.state_dict()),
                    "noise": [g.get_state() for g in noise_gens],
                    "torch": torch.get_rng_state(),
                    "micro_counter": list(micro_counter),
                    "global_step": global_step,
                }
            if global_step == stop_at or global_step >= max_steps:
                break
        if global_step == stop_at or global_step >= max_steps:
            break
    return {k: v.clone() for k, v in model.state_dict().items()}, trace, states


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"weights differ at {key}"


CONFIGS = [
    Config(num_processes=1, grad_accum=1, workers=0),
    Config(num_processes=1, grad_accum=3, workers=0),  # 10 micro-batches per epoch: not a multiple of 3
    Config(num_processes=2, grad_accum=2, workers=0),  # 10 items over 2 ranks, 5 per rank, GA 2
    Config(num_processes=3, grad_accum=2, workers=2),  # padding to 12, worker processes
    Config(num_processes=2, grad_accum=1, workers=1),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"P{c.num_processes}-GA{c.grad_accum}-W{c.workers}")
def test_resume_matches_straight_run(cfg):
    group, geometry = make_group(cfg.seed, (cfg.num_processes, cfg.grad_accum))
    spe = geometry.steps_per_epoch
    max_steps = 2 * spe + max(1, spe // 2)  # ends inside the third epoch
    straight_w, straight_trace, states = train(cfg, max_steps, keep_states=True)
    assert [r["step"] for r in straight_trace] == list(range(1, max_steps + 1))
    # k: first step, mid first epoch, last step of epoch 1 (epoch boundary), inside epoch 2, last but one
    ks = sorted({1, max(1, spe // 2), spe, spe + 1, max_steps - 1})
    for k in ks:
        resumed_w, resumed_trace, _ = train(cfg, max_steps, resume=states[k])
        assert resumed_trace == straight_trace[k:], f"trace differs after resuming at step {k}"
        assert_same_weights(straight_w, resumed_w)


def test_chained_resume_and_interrupted_first_leg():
    cfg = Config(num_processes=2, grad_accum=3, workers=0)
    _, geometry = make_group(cfg.seed, (cfg.num_processes, cfg.grad_accum))
    max_steps = 3 * geometry.steps_per_epoch
    straight_w, straight_trace, _ = train(cfg, max_steps)
    # leg 1 stops ("crashes") at step 2; leg 2 resumes and stops at 5; leg 3 resumes to the end
    _, trace1, states1 = train(cfg, max_steps, stop_at=2, keep_states=True)
    _, trace2, states2 = train(cfg, max_steps, resume=states1[2], stop_at=5, keep_states=True)
    final_w, trace3, _ = train(cfg, max_steps, resume=states2[5])
    assert trace1 + trace2 + trace3 == straight_trace
    assert_same_weights(straight_w, final_w)


def test_harness_detects_right_count_wrong_samples():
    """Control (upstream defect 3): resuming at the right step with the right number of items
    skipped, but over another epoch permutation, must be caught by the same comparison."""
    cfg = Config(num_processes=1, grad_accum=1, workers=0)
    _, geometry = make_group(cfg.seed, (1, 1))
    max_steps = geometry.steps_per_epoch + 2
    straight_w, straight_trace, states = train(cfg, max_steps, keep_states=True)
    k = geometry.steps_per_epoch // 2
    _, resumed_trace, _ = train(cfg, max_steps, resume=states[k], order_seed=cfg.seed + 1)
    assert [r["step"] for r in resumed_trace] == [r["step"] for r in straight_trace[k:]]
    assert resumed_trace != straight_trace[k:]


def test_item_captions_do_not_depend_on_what_was_loaded_before():
    group, _ = make_group(99, (1, 1))
    item = EpochItem(epoch=1, position=4, index=3)
    alone = group[item]
    for other in range(len(group)):
        group[EpochItem(1, other, other)]
        group[EpochItem(2, other, other)]
    again = group[item]
    assert alone["captions"] == again["captions"] and alone["flippeds"] == again["flippeds"]
    assert alone["kxl_keys"] == again["kxl_keys"]
    assert torch.equal(alone["images"], again["images"])
    # and another epoch of the same index gives another batch or other captions
    other_epoch = group[EpochItem(epoch=2, position=4, index=3)]
    assert (other_epoch["kxl_keys"], other_epoch["captions"]) != (alone["kxl_keys"], alone["captions"])
