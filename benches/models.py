#!/usr/bin/env python3
"""Builds kiln's synthetic benchmark models (CLI.md, "Benchmark shapes"), f32, batch 1.

    OUT/<name>.onnx

- layernorm:        x [512,768]; ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add, as
                    torch.onnx writes LayerNorm (eps 1e-5, affine weight and bias).
- layernorm_op:     the same with the LayerNormalization op (opset 17).
- softmax:          x [512,768]; ReduceMax/Sub/Exp/ReduceSum/Div over the last axis.
- softmax_op:       the same with the Softmax op (axis -1).
- gelu:             x [512,768]; x * 0.5 * (1 + erf(x / sqrt 2)) (Mul/Div/Erf/Add/Mul).
- matmul_bias_relu: x [512,768] . W [768,768] + b [768], Relu.
- attention:        Q, K, V [1,12,512,64]; MatMul(Q, Transpose(K)) * 1/8 + causal mask (a
                    [512,512] initializer, 0 on and below the diagonal, -inf above), Softmax,
                    MatMul V.
- conv_bn_relu:     x [1,64,56,56]; Conv 64 filters 3x3 pad 1 with bias, BatchNormalization,
                    Relu.

Weights are seeded (numpy default_rng(0)): He-scaled matmul/conv weights, norm scales near 1,
small biases, BatchNorm variance near 1. Opset 17, IR version 8 (what onnxruntime 1.32 and
kiln both read).

Usage: models.py OUT [--only NAME]...
"""
import argparse
import os
from typing import Callable, Dict, List

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
ROWS, HIDDEN = 512, 768
HEADS, SEQ, HEAD_DIM = 12, 512, 64
CONV_C, CONV_HW = 64, 56
EPS = 1e-5


class Builder:
    """Nodes, initializers and graph inputs/outputs of one model, named `<op>_<k>`."""

    def __init__(self, name: str, rng: np.random.Generator):
        self.name = name
        self.rng = rng
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self.inputs: List[onnx.ValueInfoProto] = []
        self.outputs: List[onnx.ValueInfoProto] = []
        self.counts: Dict[str, int] = {}

    def input(self, name: str, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    def output(self, value: str, shape) -> None:
        self.outputs.append(helper.make_tensor_value_info(value, TensorProto.FLOAT, list(shape)))

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def scalar(self, name: str, v: float) -> str:
        return self.init(name, np.array(v, dtype=np.float32))

    def op(self, op: str, inputs: List[str], out: str = "", **attrs) -> str:
        k = self.counts.get(op, 0)
        self.counts[op] = k + 1
        name = f"{op}_{k}"
        out = out or f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="kiln-benches")
        m.ir_version = IR_VERSION
        onnx.checker.check_model(m, full_check=True)
        return m


def norm_params(b: Builder, n: int):
    gamma = (1.0 + 0.1 * b.rng.standard_normal(n)).astype(np.float32)
    beta = (0.02 * b.rng.standard_normal(n)).astype(np.float32)
    return b.init("weight", gamma), b.init("bias", beta)


def layernorm(b: Builder) -> None:
    x = b.input("x", [ROWS, HIDDEN])
    gamma, beta = norm_params(b, HIDDEN)
    mean = b.op("ReduceMean", [x], axes=[-1], keepdims=1)
    d = b.op("Sub", [x, mean])
    sq = b.op("Pow", [d, b.scalar("two", 2.0)])
    var = b.op("ReduceMean", [sq], axes=[-1], keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [var, b.scalar("eps", EPS)])])
    y = b.op("Add", [b.op("Mul", [b.op("Div", [d, std]), gamma]), beta], out="y")
    b.output(y, [ROWS, HIDDEN])


def layernorm_op(b: Builder) -> None:
    x = b.input("x", [ROWS, HIDDEN])
    gamma, beta = norm_params(b, HIDDEN)
    y = b.op("LayerNormalization", [x, gamma, beta], out="y", axis=-1, epsilon=EPS)
    b.output(y, [ROWS, HIDDEN])


def softmax(b: Builder) -> None:
    x = b.input("x", [ROWS, HIDDEN])
    mx = b.op("ReduceMax", [x], axes=[-1], keepdims=1)
    e = b.op("Exp", [b.op("Sub", [x, mx])])
    axes = b.init("axes", np.array([-1], dtype=np.int64))
    s = b.op("ReduceSum", [e, axes], keepdims=1)
    y = b.op("Div", [e, s], out="y")
    b.output(y, [ROWS, HIDDEN])


def softmax_op(b: Builder) -> None:
    x = b.input("x", [ROWS, HIDDEN])
    y = b.op("Softmax", [x], out="y", axis=-1)
    b.output(y, [ROWS, HIDDEN])


def gelu(b: Builder) -> None:
    x = b.input("x", [ROWS, HIDDEN])
    half = b.op("Mul", [x, b.scalar("half", 0.5)])
    erf = b.op("Erf", [b.op("Div", [x, b.scalar("sqrt2", float(np.sqrt(2.0)))])])
    one_plus = b.op("Add", [erf, b.scalar("one", 1.0)])
    y = b.op("Mul", [half, one_plus], out="y")
    b.output(y, [ROWS, HIDDEN])


def matmul_bias_relu(b: Builder) -> None:
    x = b.input("x", [ROWS, HIDDEN])
    w = b.init("weight", (b.rng.standard_normal((HIDDEN, HIDDEN)) * np.sqrt(2.0 / HIDDEN)).astype(np.float32))
    bias = b.init("bias", (0.02 * b.rng.standard_normal(HIDDEN)).astype(np.float32))
    y = b.op("Relu", [b.op("Add", [b.op("MatMul", [x, w]), bias])], out="y")
    b.output(y, [ROWS, HIDDEN])


def attention(b: Builder) -> None:
    shape = [1, HEADS, SEQ, HEAD_DIM]
    q, k, v = (b.input(n, shape) for n in ("q", "k", "v"))
    mask = np.triu(np.full((SEQ, SEQ), -np.inf, dtype=np.float32), k=1)
    kt = b.op("Transpose", [k], perm=[0, 1, 3, 2])
    scores = b.op("Mul", [b.op("MatMul", [q, kt]), b.scalar("scale", 1.0 / np.sqrt(HEAD_DIM))])
    masked = b.op("Add", [scores, b.init("causal_mask", mask)])
    probs = b.op("Softmax", [masked], axis=-1)
    y = b.op("MatMul", [probs, v], out="y")
    b.output(y, shape)


def conv_bn_relu(b: Builder) -> None:
    c, hw = CONV_C, CONV_HW
    x = b.input("x", [1, c, hw, hw])
    w = b.init("conv.weight", (b.rng.standard_normal((c, c, 3, 3)) * np.sqrt(2.0 / (c * 9))).astype(np.float32))
    cb = b.init("conv.bias", (0.02 * b.rng.standard_normal(c)).astype(np.float32))
    scale = b.init("bn.weight", (1.0 + 0.1 * b.rng.standard_normal(c)).astype(np.float32))
    shift = b.init("bn.bias", (0.02 * b.rng.standard_normal(c)).astype(np.float32))
    mean = b.init("bn.running_mean", (0.1 * b.rng.standard_normal(c)).astype(np.float32))
    var = b.init("bn.running_var", (1.0 + 0.1 * np.abs(b.rng.standard_normal(c))).astype(np.float32))
    conv = b.op("Conv", [x, w, cb], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    bn = b.op("BatchNormalization", [conv, scale, shift, mean, var], epsilon=EPS)
    y = b.op("Relu", [bn], out="y")
    b.output(y, [1, c, hw, hw])


MODELS: Dict[str, Callable[[Builder], None]] = {
    "layernorm": layernorm,
    "layernorm_op": layernorm_op,
    "softmax": softmax,
    "softmax_op": softmax_op,
    "gelu": gelu,
    "matmul_bias_relu": matmul_bias_relu,
    "attention": attention,
    "conv_bn_relu": conv_bn_relu,
}

# Kernels of a few flops per byte: their figure of merit is bandwidth (run.py reports GB/s).
MEMORY_BOUND = {"layernorm", "layernorm_op", "softmax", "softmax_op", "gelu"}


def build(name: str) -> onnx.ModelProto:
    """One model; every model draws from its own default_rng(0), so each is reproducible alone."""
    b = Builder(name, np.random.default_rng(0))
    MODELS[name](b)
    return b.model()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output directory")
    ap.add_argument("--only", action="append", choices=sorted(MODELS), help="build only these (repeatable)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in args.only or MODELS:
        path = os.path.join(args.out, f"{name}.onnx")
        onnx.save(build(name), path)
        print(path)


if __name__ == "__main__":
    main()
