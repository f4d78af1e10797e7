"""sd-scripts' real training loop (NetworkTrainer.train, as SdxlNetworkTrainer runs it) with
tiny stand-in models, through kxl_train.entry's patch installation: exact resume in seconds.

Everything that decides *what* is trained and *when* is sd-scripts' own code: the dataset
(buckets, `|||` captions, shuffle, tag dropout, flips), the DataLoader and collator, accelerate's
gradient accumulation, the lr scheduler, `--save_state` / `--resume`, train_state.json,
checkpoint names and the stop at max_train_steps. Only the models are tiny (text encoders,
VAE and UNet of a few hundred weights and a small adapter network), so a run takes seconds.

The heavy counterpart with the real SDXL is in test_resume_sdscripts.py.
Run as a script, this file is the training process (`python tests/train/test_resume_tiny_sdxl.py ARGS`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))


# ----------------------------------------------------------------------------- the process
def tiny_modules():
    from safetensors.torch import save_file
    from torch import nn

    class WithDevice(nn.Module):
        @property
        def device(self):
            return next(self.parameters()).device

        @property
        def dtype(self):
            return next(self.parameters()).dtype

    class TinyTextEncoder(WithDevice):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(49408, 8)
            self.proj = nn.Linear(8, 8)

        def forward(self, ids):
            return self.proj(self.embed(ids)).reshape(ids.shape[0], -1, 8).mean(dim=1)

    class TinyVAE(WithDevice):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 8, stride=8)

        def forward(self, images):
            return self.conv(images)

    class TinyUNet(WithDevice):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.text = nn.Linear(8, 4)
            self.adapter = []  # set by the network's apply_to; a list keeps it out of the modules

        def forward(self, x, timesteps, text):
            cond = self.text(text) + sum(a(text) for a in self.adapter)
            return self.conv(x) * (timesteps.float().reshape(-1, 1, 1, 1) / 1000) + cond.reshape(cond.shape[0], -1, 1, 1)

    class TinyNetwork(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)
            self.drop = nn.Dropout(0.25)  # draws from the global torch RNG every step

        def forward(self, text):
            return self.lin(self.drop(text))

        def apply_to(self, text_encoders, unet, train_text_encoder, train_unet):
            unet.adapter.append(self)

        def prepare_optimizer_params_with_multiple_te_lrs(self, te_lr, unet_lr, lr):
            return [{"params": list(self.parameters()), "lr": unet_lr or lr}], ["unet"]

        def prepare_grad_etc(self, text_encoder, unet):
            self.requires_grad_(True)

        def on_epoch_start(self, text_encoder, unet):
            self.train()

        def get_trainable_params(self):
            return self.parameters()

        def save_weights(self, file, dtype, metadata):
            tensors = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
            save_file(tensors, file, {k: str(v) for k, v in (metadata or {}).items()})

    network_module = types.ModuleType("kxl_tiny_network")
    network_module.create_network = lambda *a, **kw: TinyNetwork()
    sys.modules["kxl_tiny_network"] = network_module
    return TinyTextEncoder, TinyVAE, TinyUNet


def run_training(argv: list[str]) -> None:
    from kxl_train import entry

    _sd, _options, rest = entry.prepare(argv)  # installs kxl's patches, as in a real launch
    import torch
    import sdxl_train_network
    from library import train_util

    TinyTextEncoder, TinyVAE, TinyUNet = tiny_modules()

    class TinyEncoding:
        def encode_tokens(self, tokenize_strategy, models, input_ids):
            return [models[0](input_ids[0]) + models[1](input_ids[1])]

    class TinySdxlTrainer(sdxl_train_network.SdxlNetworkTrainer):
        def load_target_model(self, args, weight_dtype, accelerator):
            torch.manual_seed(1)
            return "sdxl_tiny", [TinyTextEncoder(), TinyTextEncoder()], TinyVAE(), TinyUNet()

        def get_text_encoding_strategy(self, args):
            return TinyEncoding()

        def encode_images_to_latents(self, args, vae, images):
            return vae(images)

        def shift_scale_latents(self, args, latents):
            return latents

        def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype, indices=None):
            return unet(noisy_latents, timesteps, text_conds[0])

        def get_sai_model_spec(self, args):
            return {}

        def prepare_unet_with_accelerator(self, args, accelerator, unet):
            # the frozen tiny UNet stays out of DDP (accelerate wraps every model on multi-CPU,
            # and DDP refuses a module without trainable parameters); the network is prepared
            return unet.to(accelerator.device)

        def sample_images(self, *args, **kwargs):
            pass

    parser = sdxl_train_network.setup_parser()
    args = parser.parse_args(rest)
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    TinySdxlTrainer().train(args)


if __name__ == "__main__":
    run_training(sys.argv[1:])
    sys.exit(0)


# ----------------------------------------------------------------------------- the tests
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(tmp_path: Path, name: str, *extra: str, processes: int = 1, max_steps: int = 7, grad_accum: int = 2) -> Path:
    from test_resume_sdscripts import make_dataset

    data = tmp_path / "data" / "dataset.toml"
    if not data.exists():
        make_dataset(data.parent)
    tok = tmp_path / "tok"
    if not tok.exists():
        from kxl_common.clip_tokenizer import make_tokenizer_cache

        make_tokenizer_cache(tok)
    out = tmp_path / name
    argv = [
        "--pretrained_model_name_or_path", "tiny", "--tokenizer_cache_dir", str(tok),
        "--dataset_config", str(data), "--output_dir", str(out), "--output_name", "net",
        "--save_model_as", "safetensors", "--network_module", "kxl_tiny_network",
        "--network_train_unet_only", "--mixed_precision", "no", "--save_precision", "float",
        "--optimizer_type", "AdamW", "--learning_rate", "1e-2", "--lr_scheduler", "cosine",
        "--lr_warmup_steps", "2", "--max_train_steps", str(max_steps), "--gradient_accumulation_steps", str(grad_accum),
        "--seed", "42", "--save_every_n_steps", "1", "--save_state",
        f"--kxl-trace={out / 'trace.jsonl'}", *extra,
    ]
    log = tmp_path / f"{name}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    with open(log, "w") as fh:
        launcher = [sys.executable]
        if processes > 1:  # torch.distributed on CPU (gloo), as accelerate sets it up from torchrun's env
            launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                         "--master_port", str(free_port())]
        rc = subprocess.call([*launcher, __file__, *argv], stdout=fh, stderr=subprocess.STDOUT,
                             env=env, cwd=REPO, timeout=600)
    assert rc == 0, log.read_text()[-5000:]
    return out


@pytest.fixture(scope="module")
def straight(sd_scripts, tmp_path_factory):
    os.environ.setdefault("KXL_SD_SCRIPTS", str(sd_scripts))
    tmp = tmp_path_factory.mktemp("tiny")
    return tmp, train(tmp, "straight", "--max_data_loader_n_workers", "0")


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def assert_same(a: Path, b: Path) -> None:
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{a} and {b} differ"


def test_straight_run_shape(straight):
    from kxl_train.resume.trace import read_trace

    tmp, out = straight
    trace = read_trace(out / "trace.jsonl")
    # 3 items per epoch (2 square batches + 1 wide), GA 2 -> steps of 2 and 1 micro-batches
    assert [r["step"] for r in trace] == list(range(1, 8))
    assert [len(r["micro_batches"]) for r in trace] == [2, 1] * 3 + [2]
    assert [r["epoch"] for r in trace] == [1, 1, 2, 2, 3, 3, 4]
    for step in range(1, 8):
        assert (out / f"net-step{step:08d}.safetensors").is_file()
        state = json.loads((out / f"net-step{step:08d}-state" / "train_state.json").read_text())
        assert state["current_step"] == step
    epochs = {}
    for record in trace:
        for mb in record["micro_batches"]:
            epochs.setdefault(mb["epoch"], []).append(mb["index"])
    assert all(sorted(epochs[e]) == [0, 1, 2] for e in (0, 1, 2))  # each item once per full epoch
    assert len(epochs[3]) == 2  # the stop at max_train_steps, inside epoch 4


@pytest.mark.parametrize("k,workers,how", [(3, "2", "--resume"), (4, "0", "--kxl-resume")])
def test_resume_mid_epoch_matches_straight(straight, k, workers, how):
    """--resume, or --kxl-resume (the launch scripts' flag, turned into --resume by the patch)."""
    from kxl_train.resume.trace import read_trace

    tmp, out = straight
    state = str(out / f"net-step{k:08d}-state")
    resume = ["--resume", state] if how == "--resume" else [f"--kxl-resume={state}"]
    resumed = train(tmp, f"resumed{k}", *resume,
                    "--max_data_loader_n_workers", workers, *(["--persistent_data_loader_workers"] if workers != "0" else []))
    assert read_trace(resumed / "trace.jsonl") == read_trace(out / "trace.jsonl")[k:]
    assert not (resumed / f"net-step{k:08d}.safetensors").exists()
    for step in range(k + 1, 8):
        assert_same(out / f"net-step{step:08d}.safetensors", resumed / f"net-step{step:08d}.safetensors")
        state = json.loads((resumed / f"net-step{step:08d}-state" / "train_state.json").read_text())
        assert state["current_step"] == step
    assert_same(out / "net.safetensors", resumed / "net.safetensors")


def test_chained_resume(straight):
    from kxl_train.resume.trace import read_trace

    tmp, out = straight
    first = train(tmp, "chain1", "--resume", str(out / "net-step00000001-state"))
    second = train(tmp, "chain2", "--resume", str(first / "net-step00000005-state"))
    straight_trace = read_trace(out / "trace.jsonl")
    assert read_trace(second / "trace.jsonl") == straight_trace[5:]
    assert read_trace(first / "trace.jsonl") == straight_trace[1:]
    assert_same(out / "net.safetensors", second / "net.safetensors")


def test_resume_refuses_another_schedule(straight):
    tmp, out = straight
    with pytest.raises(AssertionError, match="lr_schedule.lr_warmup_steps: state has 2, this run has 3"):
        train(tmp, "refused", "--resume", str(out / "net-step00000003-state"), "--lr_warmup_steps", "3")


def test_two_processes_resume_matches_straight(straight):
    """Two ranks (gloo): 3 items padded to 4, 2 micro-batches per rank and epoch; resumed at step 3
    (mid epoch 2). Rank 1's RNG is not saved by sd-scripts (states are saved on the main process
    only); kxl gathers it into kxl_rank_rng_states.pt."""
    from kxl_train.resume.trace import read_trace

    tmp, _ = straight
    two = train(tmp, "two", processes=2, max_steps=5, grad_accum=1)
    resumed = train(tmp, "two_resumed", "--resume", str(two / "net-step00000003-state"),
                    processes=2, max_steps=5, grad_accum=1)
    for rank in (0, 1):
        full = read_trace(two / f"trace.rank{rank}.jsonl")
        assert [r["step"] for r in full] == [1, 2, 3, 4, 5]
        assert read_trace(resumed / f"trace.rank{rank}.jsonl") == full[3:]
    positions = sorted(mb["position"] for rank in (0, 1) for r in read_trace(two / f"trace.rank{rank}.jsonl")[:2]
                       for mb in r["micro_batches"])
    assert positions == [0, 1, 2, 3]  # one epoch: the padded order dealt to both ranks
    assert (two / "net-step00000003-state" / "kxl_rank_rng_states.pt").is_file()
    assert_same(two / "net.safetensors", resumed / "net.safetensors")


def step_checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("net-step*.safetensors"))


def test_upstream_skip_until_initial_step_defects_reproduced(straight):
    """sd-scripts' own resume (patches off) run on the same loop: the documented defects
    (docs/resume.md, 1 and 2) show in the checkpoint names it writes."""
    tmp, _ = straight
    upstream = ("--kxl-upstream-data-order",)
    # GA 1: 3 items = 3 steps per epoch; the state at step 4 is one step into epoch 2
    ga1 = train(tmp, "up_ga1", *upstream, grad_accum=1, max_steps=6)
    assert step_checkpoints(ga1) == [f"net-step{s:08d}.safetensors" for s in range(1, 7)]
    resumed = train(tmp, "up_ga1_resumed", *upstream, "--resume", str(ga1 / "net-step00000004-state"),
                    "--skip_until_initial_step", grad_accum=1, max_steps=6)
    # defect 1: the count continues from the within-epoch remainder (1), not from 4: the two
    # remaining steps (5 and 6) are saved as steps 2 and 3, and the last state says step 3
    assert step_checkpoints(resumed) == ["net-step00000002.safetensors", "net-step00000003.safetensors"]
    assert json.loads((resumed / "net-state" / "train_state.json").read_text())["current_step"] == 3
    # defect 2, GA 2: 2 steps per epoch; state at step 3 (epoch 2). initial_step = 3*2 = 6,
    # epoch_to_start = 6 // 2 = 3 (should be 1), remainder 6 - 3*3 = -3: epochs 2 and 3 are
    # never trained, epoch 4's two steps are counted from -3 and saved as steps -2 and -1
    ga2 = train(tmp, "up_ga2", *upstream, grad_accum=2, max_steps=7)
    resumed2 = train(tmp, "up_ga2_resumed", *upstream, "--resume", str(ga2 / "net-step00000003-state"),
                     "--skip_until_initial_step", grad_accum=2, max_steps=7)
    assert step_checkpoints(resumed2) == ["net-step-0000001.safetensors", "net-step-0000002.safetensors"]
    assert "epoch 4/4" in (tmp / "up_ga2_resumed.log").read_text()
    assert "epoch 2/4" not in (tmp / "up_ga2_resumed.log").read_text()
