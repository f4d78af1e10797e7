"""Run dghs-imgutils' own CCIP on a local model folder; run by the Python of the separate
imgutils environment (kxl_testing.imgutils_env), never imported by kxl: stdlib, numpy and
imgutils only.

    python imgutils_ccip_run.py SPEC.json OUT.npz

SPEC: {"model_folder": ".../<model name>", "images": [paths], "cross": [[i...], [j...]],
"hub_cache": dir}.
imgutils loads models with huggingface_hub.hf_hub_download("deepghs/ccip_onnx",
"<model>/<file>"): the folder is laid out in `hub_cache` as the hub's cache lays out a
download of that repository, and HF_HUB_OFFLINE=1 makes huggingface_hub answer from there.

OUT holds imgutils' answers: features = ccip_batch_extract_features(images) (one batch),
single = ccip_extract_feature of each image, differences = ccip_batch_differences(features),
cross = ccip_batch_differences(features[i...] + features[j...])[:len(i), len(i):] (what kxl's
cross_differences gives for generated images i against references j),
threshold = ccip_default_threshold(), versions (JSON).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

REPO_ID = "deepghs/ccip_onnx"
COMMIT = "0" * 40  # any 40-hex revision: refs/main names it


def lay_out_hub_cache(cache: Path, model_folder: Path) -> None:
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT / model_folder.name
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(model_folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT, encoding="utf-8")


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    model_folder = Path(spec["model_folder"])
    lay_out_hub_cache(Path(spec["hub_cache"]), model_folder)
    # before huggingface_hub is imported: it reads these once
    os.environ.update(HF_HUB_CACHE=str(spec["hub_cache"]), HF_HUB_OFFLINE="1", ONNX_MODE="cpu")

    import numpy as np
    import onnxruntime
    import PIL
    from importlib.metadata import version
    from imgutils.metrics import ccip as imgutils_ccip

    model, images = model_folder.name, spec["images"]
    rows, cols = spec["cross"]
    features = imgutils_ccip.ccip_batch_extract_features(images, model=model)
    single = np.stack([imgutils_ccip.ccip_extract_feature(p, model=model) for p in images])
    differences = imgutils_ccip.ccip_batch_differences(list(features), model=model)
    cross = imgutils_ccip.ccip_batch_differences([features[i] for i in rows] + [features[j] for j in cols],
                                                 model=model)[:len(rows), len(rows):]
    versions = {"dghs-imgutils": version("dghs-imgutils"), "numpy": np.__version__,
                "onnxruntime": onnxruntime.__version__, "pillow": PIL.__version__}
    np.savez(out_path, features=features, single=single, differences=differences, cross=cross,
             threshold=np.float64(imgutils_ccip.ccip_default_threshold(model)),
             versions=np.array(json.dumps(versions)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
