"""deepghs' CCIP character-similarity model, run with onnxruntime from a local folder, giving
the numbers dghs-imgutils 0.19.0 gives (docs/eval-ccip.md).

A model folder is laid out as on the hub (deepghs/ccip_onnx/<model>/):
  model_feat.onnx     input "input"  float32 [N, 3, 384, 384] -> output "output" [N, 768]
  model_metrics.onnx  input "input"  float32 [N, 768]         -> output "output" [N, N]
                      (pairwise differences: small = same character)
  metrics.json        {"threshold": ...}: same character when difference <= threshold
(names and shapes as imgutils' imgutils/metrics/ccip.py uses them; its default model is
ccip-caformer-24-randaug-pruned). Images become inputs in kxl_tools.eval.ccip_image.

As in imgutils: sessions with every graph optimization, CUDA when onnxruntime has it (CPU as
the fallback), else the CPU with one intra-op thread per logical CPU; `features` runs one list
in one batch (ccip_batch_extract_features), `differences` one list of features in one batch
(ccip_batch_differences). The metric model's output for a pair depends on the other rows of
its batch by a few float32 ulps, so cross_differences keeps imgutils' batch: a + b together.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .ccip_image import SIZE, ccip_input
from .errors import EvalError

DEFAULT_MODEL = "ccip-caformer-24-randaug-pruned"
FEAT_FILE, METRICS_FILE, META_FILE = "model_feat.onnx", "model_metrics.onnx", "metrics.json"
IO_NAME = ("input", "output")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def default_providers() -> list[str]:
    import onnxruntime as ort

    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


def open_session(path: Path, providers: Sequence[str]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if providers[0] == CPU:
        options.intra_op_num_threads = os.cpu_count() or 0  # imgutils' choice on the CPU
    return ort.InferenceSession(str(path), options, providers=list(providers))


class CCIP:
    def __init__(self, folder: str | Path, *, providers: Sequence[str] | None = None):
        folder = Path(folder)
        missing = [f for f in (FEAT_FILE, METRICS_FILE, META_FILE) if not (folder / f).is_file()]
        if missing:
            raise EvalError(f"{folder}: not a CCIP model folder (missing {', '.join(missing)}); "
                            f"expected a local copy of deepghs/ccip_onnx/<model>/, e.g. {DEFAULT_MODEL}")
        try:
            self.threshold = float(json.loads((folder / META_FILE).read_text(encoding="utf-8"))["threshold"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EvalError(f"{folder / META_FILE}: field 'threshold' missing or not a number") from exc
        self.folder = folder
        self.providers = list(providers or default_providers())
        self.feat = open_session(folder / FEAT_FILE, self.providers)
        self.metrics = open_session(folder / METRICS_FILE, self.providers)
        for name, sess in ((FEAT_FILE, self.feat), (METRICS_FILE, self.metrics)):
            ins, outs = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
            if IO_NAME[0] not in ins or IO_NAME[1] not in outs:
                raise EvalError(f"{folder / name}: expected input {IO_NAME[0]!r} and output {IO_NAME[1]!r}, "
                                f"found inputs {ins} and outputs {outs}")
        self.size = SIZE
        shape = self.feat.get_inputs()[0].shape
        if len(shape) == 4 and isinstance(shape[2], int):
            self.size = int(shape[2])

    def describe(self) -> dict:
        return {"folder": str(self.folder.resolve()), "name": self.folder.name, "threshold": self.threshold,
                "input_size": self.size, "providers": self.providers}

    def features(self, images: Sequence, *, batch_size: int | None = None) -> np.ndarray:
        """[N, 768] float32 features of N images (paths or PIL images). One batch by default, as
        imgutils' ccip_batch_extract_features runs its list: a model may round differently at
        another batch size (the real CCIP on a GPU likely does), so smaller batches
        (batch_size, to bound memory) may move the last bits."""
        step = batch_size or max(len(images), 1)
        out = []
        for start in range(0, len(images), step):
            data = np.stack([ccip_input(im, self.size) for im in images[start:start + step]])
            out.append(self.feat.run([IO_NAME[1]], {IO_NAME[0]: data})[0])
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)

    def differences(self, feats: np.ndarray) -> np.ndarray:
        """[N, N] pairwise differences of N feature vectors."""
        return self.metrics.run([IO_NAME[1]], {IO_NAME[0]: np.ascontiguousarray(feats, dtype=np.float32)})[0]

    def cross_differences(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """[len(a), len(b)]: the metric model sees a and b together, as imgutils does."""
        full = self.differences(np.concatenate([a, b]))
        return full[: len(a), len(a):]
