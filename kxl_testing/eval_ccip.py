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
