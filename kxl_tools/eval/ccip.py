"""deepghs' CCIP character-similarity model, run with onnxruntime from a local folder.

A model folder is laid out as on the hub (deepghs/ccip_onnx/<model>/):
  model_feat.onnx     input "input"  float32 [N, 3, 384, 384] -> output "output" [N, 768]
  model_metrics.onnx  input "input"  float32 [N, 768]         -> output "output" [N, N]
                      (pairwise differences: small = same character)
  metrics.json        {"threshold": ...}: same character when difference <= threshold
(names, shapes and preprocessing as dghs-imgutils' imgutils/metrics/ccip.py uses them; its
default model is ccip-caformer-24-randaug-pruned). An image is taken as RGB (transparency
over white), resized to 384x384 bilinear, scaled to 0..1 and normalized with CLIP's mean/std.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import EvalError

DEFAULT_MODEL = "ccip-caformer-24-randaug-pruned"
SIZE = 384
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FEAT_FILE, METRICS_FILE, META_FILE = "model_feat.onnx", "model_metrics.onnx", "metrics.json"
IO_NAME = ("input", "output")


def load_rgb(path_or_image):
    from PIL import Image

    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    image.load()
    if image.mode in ("RGBA", "LA", "P") and (image.mode != "P" or "transparency" in image.info):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB")


def preprocess(image, size: int = SIZE) -> np.ndarray:
    """[3, size, size] float32, CLIP-normalized."""
    from PIL import Image

    data = np.asarray(load_rgb(image).resize((size, size), resample=Image.BILINEAR), dtype=np.float32) / 255.0
    data = data.transpose(2, 0, 1)
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    return ((data - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


class CCIP:
    def __init__(self, folder: str | Path, *, providers: Sequence[str] | None = None):
        import onnxruntime as ort

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
        providers = list(providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                       if p in ort.get_available_providers()])
        self.feat = ort.InferenceSession(str(folder / FEAT_FILE), providers=providers)
        self.metrics = ort.InferenceSession(str(folder / METRICS_FILE), providers=providers)
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
                "input_size": self.size}

    def features(self, images: Sequence, *, batch_size: int = 16) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            data = np.stack([preprocess(im, self.size) for im in images[start:start + batch_size]])
            out.append(self.feat.run([IO_NAME[1]], {IO_NAME[0]: data})[0])
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)

    def differences(self, feats: np.ndarray) -> np.ndarray:
        """[N, N] pairwise differences of N feature vectors."""
        return self.metrics.run([IO_NAME[1]], {IO_NAME[0]: np.ascontiguousarray(feats, dtype=np.float32)})[0]

    def cross_differences(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """[len(a), len(b)]: the metric model sees a and b together, as imgutils does."""
        full = self.differences(np.concatenate([a, b]))
        return full[: len(a), len(a):]
