"""kxl_testing.train_probe through its sitecustomize, on stand-in sd-scripts modules (no
sd-scripts): what it records at sd-scripts' sample_images calls, that it changes nothing the
call returns, the tiny shrink and the shadowed sitecustomize still running."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from kxl_common.upstream import REPO_ROOT
from kxl_testing import tiny_sdxl
from kxl_testing.bench_train import PROBE_SITE

FAKE = {
    "library/__init__.py": "",
    "library/sdxl_train_util.py": """
        calls = []
        def sample_images(accelerator, args, epoch, global_step, *rest, **kw):
            calls.append((epoch, global_step, rest, kw))
            return ("sampled", global_step)
    """,
    "library/sdxl_original_unet.py": "MODEL_CHANNELS = 320\nTIME_EMBED_DIM = 320 * 4\n",
    "library/model_util.py": "VAE_PARAMS_CH = 128\n",
    "library/sdxl_model_util.py": """
        from library import model_util, sdxl_original_unet
        def CLIPTextConfig(**kw):
            return kw
    """,
    "later/sitecustomize.py": "import os\nos.environ['KXL_TEST_SHADOWED_SITE'] = 'ran'\n",
}

SCRIPT = """
import json, os, sys
from library import sdxl_train_util, sdxl_model_util, sdxl_original_unet, model_util
class Scaler:
    def get_scale(self):
        return 1024.0
class Accelerator:
    scaler = Scaler()
acc = Accelerator()
results = [sdxl_train_util.sample_images(acc, None, 0, 0, "vae", k=1)]
for step in (1, 2, 3):
    results.append(sdxl_train_util.sample_images(acc, None, None, step))
results.append(sdxl_train_util.sample_images(acc, None, 1, 3))
te1 = sdxl_model_util.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12)
te2 = sdxl_model_util.CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32)
print(json.dumps({"results": results, "calls": len(sdxl_train_util.calls), "first": list(sdxl_train_util.calls[0][2:3]),
                  "unet": [sdxl_original_unet.MODEL_CHANNELS, sdxl_original_unet.TIME_EMBED_DIM],
                  "vae": model_util.VAE_PARAMS_CH, "te1": te1, "te2": te2,
                  "shadowed": os.environ.get("KXL_TEST_SHADOWED_SITE")}))
"""


def run_probe(tmp_path: Path, tiny: bool) -> tuple[dict, list[dict]]:
    for rel, text in FAKE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    probe_dir = tmp_path / ("probe-tiny" if tiny else "probe")
    env = dict(os.environ, KXL_BENCH_PROBE=str(probe_dir),
               PYTHONPATH=os.pathsep.join([str(PROBE_SITE), str(REPO_ROOT), str(tmp_path), str(tmp_path / "later")]))
    env.pop("KXL_BENCH_TINY", None)
    if tiny:
        env["KXL_BENCH_TINY"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout
    records = [json.loads(p.read_text()) for p in sorted(probe_dir.glob("probe-*.json"))]
    return json.loads(out), records


def test_probe_records_every_step_and_passes_calls_through(tmp_path):
    got, records = run_probe(tmp_path, tiny=False)
    assert got["results"] == [["sampled", 0], ["sampled", 1], ["sampled", 2], ["sampled", 3], ["sampled", 3]]
    assert got["calls"] == 5 and got["first"] == [["vae"]]
    assert got["shadowed"] == "ran"  # the sitecustomize the probe's one shadows still runs
    assert got["unet"] == [320, 1280] and got["vae"] == 128  # no shrink unless asked
    assert got["te2"] == {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32}
    (record,) = records
    assert [s["step"] for s in record["steps"]] == [1, 2, 3]
    assert record["start_step"] == 0 and record["t_loop_start"] <= record["steps"][0]["t"]
    times = [s["t"] for s in record["steps"]]
    assert times == sorted(times)
    assert [e["step"] for e in record["epoch_ends"]] == [3]
    assert all(s["grad_scale"] == 1024.0 and s["rss_peak_bytes"] > 0 and s["cpu_s"] > 0 for s in record["steps"])
    assert not record["tiny"] and record["environment"]["cuda"] in (True, False)


def test_tiny_shrinks_sd_scripts_architecture(tmp_path):
    got, records = run_probe(tmp_path, tiny=True)
    assert got["unet"] == [tiny_sdxl.UNET_CHANNELS, 4 * tiny_sdxl.UNET_CHANNELS]
    assert got["vae"] == tiny_sdxl.VAE_CHANNELS
    assert got["te1"] == {"hidden_size": 768, "intermediate_size": tiny_sdxl.TE_INTERMEDIATE, "num_hidden_layers": 12}
    assert got["te2"] == {"hidden_size": 1280, "intermediate_size": tiny_sdxl.TE_INTERMEDIATE,
                          "num_hidden_layers": tiny_sdxl.TE2_LAYERS}
    assert records[0]["tiny"]


def test_without_the_variable_the_probe_does_nothing(tmp_path):
    for rel, text in FAKE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if k != "KXL_BENCH_PROBE"}
    env["PYTHONPATH"] = os.pathsep.join([str(PROBE_SITE), str(REPO_ROOT), str(tmp_path)])
    out = subprocess.run([sys.executable, "-c", "import sys; from library import sdxl_train_util as s; "
                          "print(s.sample_images.__module__, 'kxl_testing.train_probe' in sys.modules)"],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["library.sdxl_train_util", "False"]
