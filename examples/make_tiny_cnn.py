#!/usr/bin/env python3
"""Writes examples/tiny_cnn: a small CNN (Conv+BatchNorm+Relu, MaxPool, depthwise Conv, Gelu-free
classic ops, GlobalAveragePool, Gemm, Softmax) with seeded random weights and a symbolic batch
dim `N`, plus one input and onnxruntime's output for it. Committed; rerun to regenerate."""
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(7)
here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_cnn")


def w(name, *shape, scale=None):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    s = scale if scale is not None else np.sqrt(2.0 / fan_in)
    return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)


inits = [
    w("c1_w", 8, 3, 3, 3), w("c1_b", 8, scale=0.1),
    numpy_helper.from_array(rng.uniform(0.8, 1.2, 8).astype(np.float32), "bn_s"),
    numpy_helper.from_array(rng.uniform(-0.1, 0.1, 8).astype(np.float32), "bn_b"),
    numpy_helper.from_array(rng.uniform(-0.1, 0.1, 8).astype(np.float32), "bn_m"),
    numpy_helper.from_array(rng.uniform(0.8, 1.2, 8).astype(np.float32), "bn_v"),
    w("dw_w", 8, 1, 3, 3), w("pw_w", 16, 8, 1, 1),
    w("fc_w", 16, 10), w("fc_b", 10, scale=0.1),
]
nodes = [
    helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
    helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn1"),
    helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
    helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
    helper.make_node("Conv", ["p1", "dw_w"], ["dw"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
    helper.make_node("Conv", ["dw", "pw_w"], ["pw"], name="pointwise"),
    helper.make_node("HardSwish", ["pw"], ["act"], name="hswish"),
    helper.make_node("GlobalAveragePool", ["act"], ["gap"], name="gap"),
    helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
    helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc"),
    helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
]
graph = helper.make_graph(
    nodes, "tiny_cnn",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
    [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
    inits,
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kiln-example")
onnx.checker.check_model(model, full_check=True)
os.makedirs(here, exist_ok=True)
onnx.save(model, os.path.join(here, "model.onnx"))
x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
(y,) = ort.InferenceSession(os.path.join(here, "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
onnx.save_tensor(numpy_helper.from_array(x, "x"), os.path.join(here, "input_0.pb"))
onnx.save_tensor(numpy_helper.from_array(y, "probs"), os.path.join(here, "expected_output_0.pb"))
print("wrote", here, "output", y.shape)
