"""Stand-in CCIP model folders for tests: laid out like deepghs/ccip_onnx/<model>/ with the
real models' input/output names and shapes, written with onnx's helpers.

model_feat.onnx  "input" float32 [N, 3, 384, 384] -> "output" [N, 768]: the image averaged
                 over 8x8 cells (192 numbers), its own mean taken off, projected by a fixed
                 random 192x768 matrix. Meaningful on purpose: two renderings of the same
                 picture get nearly the same feature, different pictures do not.
model_metrics.onnx "input" [N, 768] -> "output" [N, N]: (1 - cosine) / 2, a difference in 0..1.
metrics.json     {"threshold": ...}
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FEAT_DIM = 768
CELLS = 8
THRESHOLD = 0.1
OPSET = 17


def _feat_model(size: int, seed: int):
    from onnx import TensorProto, helper, numpy_helper

    pool = size // CELLS
    w = np.random.default_rng(seed).standard_normal((3 * CELLS * CELLS, FEAT_DIM)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input"], ["cells"], kernel_shape=[pool, pool], strides=[pool, pool]),
        helper.make_node("Flatten", ["cells"], ["flat"], axis=1),
        helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["flat", "mean"], ["centred"]),
        helper.make_node("MatMul", ["centred", "proj"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "ccip_feat_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", FEAT_DIM])],
        initializer=[numpy_helper.from_array(w, "proj")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _metrics_model():
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceL2", ["input"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Div", ["input", "norm"], ["unit"]),
        helper.make_node("Transpose", ["unit"], ["unit_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["unit", "unit_t"], ["cos"]),
        helper.make_node("Sub", ["one", "cos"], ["one_minus"]),
        helper.make_node("Mul", ["one_minus", "half"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "ccip_metrics_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEAT_DIM])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "batch"])],
        initializer=[numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                     numpy_helper.from_array(np.array(0.5, np.float32), "half")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def write_standin_ccip(root: str | Path, name: str = "ccip-caformer-24-randaug-pruned", *, seed: int = 0,
                       size: int = 384, threshold: float = THRESHOLD) -> Path:
    """Write <root>/<name>/{model_feat.onnx, model_metrics.onnx, metrics.json}; return the folder."""
    import onnx

    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    for model, file in ((_feat_model(size, seed), "model_feat.onnx"), (_metrics_model(), "model_metrics.onnx")):
        onnx.checker.check_model(model)
        onnx.save(model, str(folder / file))
    (folder / "metrics.json").write_text(json.dumps({"threshold": threshold, "standin": True}), encoding="utf-8")
    return folder


def _picture(width: int, height: int, seed: int) -> np.ndarray:
    """[h, w, 4] uint8: smooth colour waves (the stand-in features see 8x8 cell means, so
    structure, not noise) and an alpha that is 0 outside an ellipse and ramps inside it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    freq, phase = rng.uniform(1, 6, (3, 2)), rng.uniform(0, 2 * np.pi, 3)
    rgb = [127.5 + 127.5 * np.sin(2 * np.pi * (f[0] * u + f[1] * v) + p) for f, p in zip(freq, phase)]
    r = np.hypot((u - 0.5) / 0.45, (v - 0.5) / 0.4)
    alpha = np.clip((1.0 - r) * 400.0, 0, 255)
    return np.rint(np.stack([*rgb, alpha], axis=-1)).astype(np.uint8)


# (name, PIL mode after reopening, file suffix, size): every mode PIL opens files in, through the
# formats that keep it, with odd sizes; the "+t" ones carry a transparency key (PNG tRNS, GIF).
MODE_IMAGES = (
    ("1", "1", "png", (37, 23)),
    ("1+t", "1", "png", (41, 29)),
    ("L", "L", "png", (53, 31)),
    ("L+t", "L", "png", (61, 47)),
    ("LA", "LA", "png", (97, 59)),
    ("P", "P", "png", (73, 67)),
    ("P+t", "P", "png", (83, 79)),
    ("P+trns", "P", "png", (89, 71)),
    ("P+t-gif", "P", "gif", (101, 77)),
    ("PA", "PA", "tiff", (67, 113)),
    ("RGB", "RGB", "jpg", (211, 149)),
    ("RGB+t", "RGB", "png", (127, 131)),
    ("RGB-exif-rotated", "RGB", "jpg", (137, 97)),
    ("RGBA", "RGBA", "png", (521, 389)),
    ("RGBA-webp", "RGBA", "webp", (385, 383)),
    ("CMYK", "CMYK", "jpg", (151, 103)),
    ("CMYK-tiff", "CMYK", "tiff", (109, 157)),
    ("I", "I", "tiff", (163, 107)),
    ("I;16", "I;16", "png", (173, 117)),
    ("I;16+t", "I;16", "png", (59, 181)),
    ("F", "F", "tiff", (191, 127)),
    ("YCbCr", "YCbCr", "tiff", (197, 139)),
    ("tiny", "RGB", "png", (1, 1)),
    ("thin", "RGBA", "png", (1000, 3)),
)


def _mode_image(name: str, rgba: np.ndarray):
    """The PIL image saved for `name`, and the save() keywords it needs."""
    from PIL import Image

    im = Image.fromarray(rgba, "RGBA")
    gray = np.asarray(im.convert("L"))
    opaque = rgba[..., 3] >= 128
    if name in ("1", "1+t"):
        return im.convert("1"), ({"transparency": 0} if name == "1+t" else {})
    if name in ("L", "L+t"):
        # the key: the most common gray level, so that many pixels carry it
        key = int(np.bincount(gray.ravel()).argmax())
        return im.convert("L"), ({"transparency": key} if name == "L+t" else {})
    if name in ("P", "P+t", "P+trns", "P+t-gif"):
        pal = im.convert("RGB").quantize(32)
        if name == "P":
            return pal, {}
        if name == "P+trns":  # a per-index alpha table (PNG tRNS with several entries)
            return pal, {"transparency": bytes(int(a) for a in np.linspace(0, 255, 32))}
        # one transparent index (31) painted where the picture is see-through
        idx = np.where(opaque, np.minimum(np.asarray(pal), 30), 31).astype(np.uint8)
        out = Image.fromarray(idx, "P")
        out.putpalette(pal.getpalette()[: 32 * 3])
        return out, {"transparency": 31}
    if name in ("LA", "PA"):
        return im.convert(name), {}
    if name == "RGB+t":
        return im.convert("RGB"), {"transparency": tuple(int(c) for c in rgba[0, 0, :3])}
    if name == "RGB-exif-rotated":  # EXIF orientation 6: imgutils does not rotate; neither does kxl
        exif = Image.Exif()
        exif[0x0112] = 6
        return im.convert("RGB"), {"exif": exif.tobytes(), "quality": 90}
    if name in ("RGBA", "RGBA-webp", "thin"):
        return im, ({"lossless": True} if name == "RGBA-webp" else {})
    if name in ("CMYK", "CMYK-tiff"):
        return im.convert("CMYK"), {}
    if name == "I":  # beyond 0..255 both ways: convert("RGB") clips
        return Image.fromarray(gray.astype(np.int32) * 3 - 200, "I"), {}
    if name in ("I;16", "I;16+t"):  # 0..510 (convert("RGB") clips above 255) / the full 16 bits
        wide = gray.astype(np.uint16) * (2 if name == "I;16" else 257)
        return Image.fromarray(wide).convert("I;16"), ({"transparency": int(wide[0, 0])} if name == "I;16+t" else {})
    if name == "F":
        return Image.fromarray(gray.astype(np.float32) * 1.3 - 40.25, "F"), {}
    if name == "YCbCr":
        return im.convert("YCbCr"), {}
    if name in ("RGB", "tiny"):
        return im.convert("RGB"), ({"quality": 90} if name == "RGB" else {})
    raise ValueError(name)


def write_mode_images(folder: str | Path, *, seed: int = 0) -> list[tuple[str, Path]]:
    """One file per MODE_IMAGES entry; returns (name, path) in that order. Raises if a file
    does not reopen in the mode it stands for."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (name, mode, suffix, (w, h)) in enumerate(MODE_IMAGES):
        image, kwargs = _mode_image(name, _picture(w, h, seed * 1000 + i))
        path = folder / f"{i:02d}-{name.replace(';', '_').replace('+', '_')}.{suffix}"
        image.save(path, **kwargs)
        with Image.open(path) as back:
            keyed = "transparency" in back.info
            if back.mode != mode or keyed != ("+t" in name):
                raise AssertionError(f"{path}: reopens as {back.mode} (transparency key: {keyed}), wanted {mode}")
        out.append((name, path))
    return out
