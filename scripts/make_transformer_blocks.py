#!/usr/bin/env python3
"""Builds GPT-2 and Llama transformer blocks as exporters write them, with onnxruntime outputs.

Each block is decomposed into primitive ops the way torch.onnx (and HF models through it)
export them: no LayerNormalization, Gelu, Attention or RMSNormalization ops.

- gpt2_block (opset 17): x [1,128,256]; LayerNorm as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/
  Mul/Add; Q, K, V as MatMul + Add; 4 heads of 64 (Reshape + Transpose, K transposed straight
  to [B,H,D,S]); scores / 8; causal mask via Where(bool mask, scores, -inf); Softmax; output
  projection, residual; LayerNorm; MLP 1024 with erf-GELU (Div/Erf/Add/Mul/Mul); residual.
- llama_block (opset 18, ReduceMean takes its axes as an input): x [1,128,256]; RMSNorm as
  Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul; bias-free Q, K, V; rotary embedding
  (rotate_half: Slice/Neg/Concat; cos/sin tables for base 10000); scores * 0.125 + additive
  causal mask (0 / -inf); Softmax; output projection, residual; RMSNorm; SwiGLU MLP 688
  (Sigmoid/Mul); residual.
- gpt2_block_dyn, llama_block_dyn: the same blocks (same weights) with x ["B","S",256]. The
  head-split shapes come from Shape(x) -> Gather -> Unsqueeze -> Concat; the head merge uses
  that form in gpt2_block_dyn and Reshape [0,0,256] in llama_block_dyn. The causal mask and
  the cos/sin tables are sliced to S from [128,128] / [128,64] tables (S <= 128).

Weights are seeded: projections ~ N(0, 0.02), norm weights ~ 1 + N(0, 0.1), biases ~ N(0, 0.02);
weights stay initializers, small scalars and shapes are Constant nodes (as torch writes them).
Inputs are seeded N(0, 1). Outputs come from onnxruntime (CPU provider, graph optimizations
off, so every op runs as written) and are checked against a float64 numpy model of the block.

    OUT/<model>/model.onnx, OUT/<model>/test_data_set_K/{input_0,output_0}.pb

Static blocks get one data set; the dynamic ones three, with (B, S) = (1,16), (2,64), (1,128).

Usage: make_transformer_blocks.py OUT
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HIDDEN, HEADS, HEAD_DIM, MAX_S = 256, 4, 64, 128
GPT2_MLP, LLAMA_MLP = 1024, 688
STATIC_BS = [(1, 128)]
DYN_BS = [(1, 16), (2, 64), (1, 128)]


class Graph:
    """A node list with torch-export-style names (`/scope/Op_k`, `/scope/Op_k_output_0`)."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes = []
        self.inits = []
        self.counts = {}

    def _name(self, scope: str, op: str) -> str:
        base = f"/{scope}/{op}" if scope else f"/{op}"
        k = self.counts.get(base, 0)
        self.counts[base] = k + 1
        return base if k == 0 else f"{base}_{k}"

    def op(self, scope, op, inputs, **attrs):
        name = self._name(scope, op)
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def const(self, scope, value) -> str:
        """A Constant node (torch writes small scalars and shapes this way)."""
        name = self._name(scope, "Constant")
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node("Constant", [], [out], name=name, value=numpy_helper.from_array(value)))
        return out

    def f(self, scope, v: float) -> str:
        return self.const(scope, np.array(v, dtype=np.float32))

    def i64(self, scope, v) -> str:
        return self.const(scope, np.array(v, dtype=np.int64))

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name


# ---- shared pieces ------------------------------------------------------------------------


def reduce_mean(g: Graph, scope: str, x: str) -> str:
    if g.opset >= 18:
        return g.op(scope, "ReduceMean", [x, g.i64(scope, [-1])], keepdims=1)
    return g.op(scope, "ReduceMean", [x], axes=[-1], keepdims=1)


def seq_dims(g: Graph, x: str):
    """Shape(x) -> Gather 0 / Gather 1 -> Unsqueeze: ([B], [S]) as int64 1-D tensors."""
    s = g.op("", "Shape", [x])
    b = g.op("", "Gather", [s, g.i64("", 0)], axis=0)
    n = g.op("", "Gather", [s, g.i64("", 1)], axis=0)
    b1 = g.op("", "Unsqueeze", [b, g.i64("", [0])])
    n1 = g.op("", "Unsqueeze", [n, g.i64("", [0])])
    return b1, n1


def split_shape(g: Graph, scope: str, dyn, batch: int, seq: int) -> str:
    if dyn is None:
        return g.i64(scope, [batch, seq, HEADS, HEAD_DIM])
    b1, n1 = dyn
    return g.op(scope, "Concat", [b1, n1, g.i64(scope, [HEADS, HEAD_DIM])], axis=0)


def merge_shape(g: Graph, scope: str, dyn, batch: int, seq: int, concat: bool) -> str:
    if dyn is None:
        return g.i64(scope, [batch, seq, HIDDEN])
    if not concat:
        return g.i64(scope, [0, 0, HIDDEN])
    b1, n1 = dyn
    return g.op(scope, "Concat", [b1, n1, g.i64(scope, [HIDDEN])], axis=0)


def causal_table(g: Graph, name: str, table: np.ndarray, dyn) -> str:
    """The [128,128] table itself, or Slice(table, [0,0], [S,S]) for a dynamic S."""
    t = g.init(name, table)
    if dyn is None:
        return t
    _, n1 = dyn
    ends = g.op("attn", "Concat", [n1, n1], axis=0)
    return g.op("attn", "Slice", [t, g.i64("attn", [0, 0]), ends, g.i64("attn", [0, 1])])


def model_proto(g: Graph, name: str, dyn: bool) -> onnx.ModelProto:
    dims = ["B", "S", HIDDEN] if dyn else [1, MAX_S, HIDDEN]
    graph = helper.make_graph(
        g.nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        g.inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", g.opset)], producer_name="kiln-tfm")
    m.ir_version = 8
    return m


# ---- GPT-2 ---------------------------------------------------------------------------------


def gpt2_weights(seed: int):
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.normal(0.0, 0.02, s).astype(np.float32)
    norm = lambda n: (1.0 + rng.normal(0.0, 0.1, n)).astype(np.float32)
    return {
        "ln_1.weight": norm(HIDDEN), "ln_1.bias": w(HIDDEN),
        "attn.q.weight": w(HIDDEN, HIDDEN), "attn.q.bias": w(HIDDEN),
        "attn.k.weight": w(HIDDEN, HIDDEN), "attn.k.bias": w(HIDDEN),
        "attn.v.weight": w(HIDDEN, HIDDEN), "attn.v.bias": w(HIDDEN),
        "attn.o.weight": w(HIDDEN, HIDDEN), "attn.o.bias": w(HIDDEN),
        "ln_2.weight": norm(HIDDEN), "ln_2.bias": w(HIDDEN),
        "mlp.fc.weight": w(HIDDEN, GPT2_MLP), "mlp.fc.bias": w(GPT2_MLP),
        "mlp.proj.weight": w(GPT2_MLP, HIDDEN), "mlp.proj.bias": w(HIDDEN),
    }  # fmt: skip


def layer_norm(g: Graph, scope: str, x: str, W) -> str:
    mean = reduce_mean(g, scope, x)
    d = g.op(scope, "Sub", [x, mean])
    p = g.op(scope, "Pow", [d, g.f(scope, 2.0)])
    var = reduce_mean(g, scope, p)
    ve = g.op(scope, "Add", [var, g.f(scope, 1e-5)])
    s = g.op(scope, "Sqrt", [ve])
    n = g.op(scope, "Div", [d, s])
    m = g.op(scope, "Mul", [n, W[f"{scope}.weight"]])
    return g.op(scope, "Add", [m, W[f"{scope}.bias"]])


def linear(g: Graph, scope: str, x: str, W, bias: bool = True) -> str:
    h = g.op(scope, "MatMul", [x, W[f"{scope}.weight"]])
    return g.op(scope, "Add", [h, W[f"{scope}.bias"]]) if bias else h


def gpt2_block(dyn: bool, seed: int) -> onnx.ModelProto:
    g = Graph(17)
    W = {k: g.init(k, v) for k, v in gpt2_weights(seed).items()}
    B, S = STATIC_BS[0]
    d = seq_dims(g, "x") if dyn else None
    h = layer_norm(g, "ln_1", "x", W)
    heads = {}
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        t = linear(g, f"attn.{p}", h, W)
        t = g.op(f"attn.{p}", "Reshape", [t, split_shape(g, f"attn.{p}", d, B, S)])
        heads[p] = g.op(f"attn.{p}", "Transpose", [t], perm=perm)
    s = g.op("attn", "MatMul", [heads["q"], heads["k"]])
    s = g.op("attn", "Div", [s, g.f("attn", float(np.sqrt(HEAD_DIM)))])
    mask = causal_table(g, "attn.causal_mask", np.tril(np.ones((MAX_S, MAX_S), dtype=bool)), d)
    s = g.op("attn", "Where", [mask, s, g.f("attn", -np.inf)])
    a = g.op("attn", "Softmax", [s], axis=-1)
    o = g.op("attn", "MatMul", [a, heads["v"]])
    o = g.op("attn", "Transpose", [o], perm=[0, 2, 1, 3])
    o = g.op("attn", "Reshape", [o, merge_shape(g, "attn", d, B, S, concat=True)])
    o = linear(g, "attn.o", o, W)
    r = g.op("", "Add", ["x", o])
    h = layer_norm(g, "ln_2", r, W)
    h = linear(g, "mlp.fc", h, W)
    e = g.op("mlp", "Div", [h, g.f("mlp", 1.4142135381698608)])
    e = g.op("mlp", "Erf", [e])
    e = g.op("mlp", "Add", [e, g.f("mlp", 1.0)])
    e = g.op("mlp", "Mul", [h, e])
    e = g.op("mlp", "Mul", [e, g.f("mlp", 0.5)])
    o = linear(g, "mlp.proj", e, W)
    g.nodes.append(helper.make_node("Add", [r, o], ["y"], name="/Add_1"))
    return model_proto(g, "gpt2_block_dyn" if dyn else "gpt2_block", dyn)


def gpt2_ref(x: np.ndarray, seed: int) -> np.ndarray:
    W = {k: v.astype(np.float64) for k, v in gpt2_weights(seed).items()}
    x = x.astype(np.float64)
    B, S, _ = x.shape

    def ln(t, p):
        mu = t.mean(-1, keepdims=True)
        var = ((t - mu) ** 2).mean(-1, keepdims=True)
        return (t - mu) / np.sqrt(var + 1e-5) * W[f"{p}.weight"] + W[f"{p}.bias"]

    lin = lambda t, p: t @ W[f"{p}.weight"] + W[f"{p}.bias"]
    split = lambda t: t.reshape(B, S, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
    h = ln(x, "ln_1")
    q, k, v = (split(lin(h, f"attn.{p}")) for p in "qkv")
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HEAD_DIM)
    s = np.where(np.tril(np.ones((S, S), dtype=bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(B, S, HIDDEN)
    r = x + lin(o, "attn.o")
    h = lin(ln(r, "ln_2"), "mlp.fc")
    from math import erf

    h = 0.5 * h * (1.0 + np.vectorize(erf)(h / np.sqrt(2.0)))
    return r + lin(h, "mlp.proj")


# ---- Llama ---------------------------------------------------------------------------------


def llama_weights(seed: int):
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.normal(0.0, 0.02, s).astype(np.float32)
    norm = lambda n: (1.0 + rng.normal(0.0, 0.1, n)).astype(np.float32)
    return {
        "input_layernorm.weight": norm(HIDDEN),
        "self_attn.q_proj.weight": w(HIDDEN, HIDDEN),
        "self_attn.k_proj.weight": w(HIDDEN, HIDDEN),
        "self_attn.v_proj.weight": w(HIDDEN, HIDDEN),
        "self_attn.o_proj.weight": w(HIDDEN, HIDDEN),
        "post_attention_layernorm.weight": norm(HIDDEN),
        "mlp.gate_proj.weight": w(HIDDEN, LLAMA_MLP),
        "mlp.up_proj.weight": w(HIDDEN, LLAMA_MLP),
        "mlp.down_proj.weight": w(LLAMA_MLP, HIDDEN),
    }


def rotary_tables():
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM))
    freqs = np.outer(np.arange(MAX_S, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def rms_norm(g: Graph, scope: str, x: str, W) -> str:
    p = g.op(scope, "Pow", [x, g.f(scope, 2.0)])
    var = reduce_mean(g, scope, p)
    ve = g.op(scope, "Add", [var, g.f(scope, 1e-6)])
    s = g.op(scope, "Sqrt", [ve])
    r = g.op(scope, "Reciprocal", [s])
    n = g.op(scope, "Mul", [x, r])
    return g.op(scope, "Mul", [W[f"{scope}.weight"], n])


def rotate_half(g: Graph, scope: str, t: str) -> str:
    half = HEAD_DIM // 2
    axes = g.i64(scope, [-1])
    x1 = g.op(scope, "Slice", [t, g.i64(scope, [0]), g.i64(scope, [half]), axes, g.i64(scope, [1])])
    x2 = g.op(scope, "Slice", [t, g.i64(scope, [half]), g.i64(scope, [np.iinfo(np.int64).max]), axes, g.i64(scope, [1])])
    return g.op(scope, "Concat", [g.op(scope, "Neg", [x2]), x1], axis=-1)


def llama_block(dyn: bool, seed: int) -> onnx.ModelProto:
    g = Graph(18)
    W = {k: g.init(k, v) for k, v in llama_weights(seed).items()}
    B, S = STATIC_BS[0]
    d = seq_dims(g, "x") if dyn else None
    cos_t, sin_t = rotary_tables()
    cos, sin = g.init("rotary.cos_cached", cos_t), g.init("rotary.sin_cached", sin_t)
    if dyn:
        _, n1 = d
        z, ax = g.i64("rotary", [0]), g.i64("rotary", [0])
        cos = g.op("rotary", "Slice", [cos, z, n1, ax])
        sin = g.op("rotary", "Slice", [sin, z, n1, ax])
    h = rms_norm(g, "input_layernorm", "x", W)
    heads = {}
    for p in "qkv":
        sc = f"self_attn.{p}_proj"
        t = linear(g, sc, h, W, bias=False)
        t = g.op(sc, "Reshape", [t, split_shape(g, sc, d, B, S)])
        t = g.op(sc, "Transpose", [t], perm=[0, 2, 1, 3])
        if p != "v":
            a = g.op("self_attn", "Mul", [t, cos])
            b = g.op("self_attn", "Mul", [rotate_half(g, "self_attn", t), sin])
            t = g.op("self_attn", "Add", [a, b])
        heads[p] = t
    kt = g.op("self_attn", "Transpose", [heads["k"]], perm=[0, 1, 3, 2])
    s = g.op("self_attn", "MatMul", [heads["q"], kt])
    s = g.op("self_attn", "Mul", [s, g.f("self_attn", 1.0 / np.sqrt(HEAD_DIM))])
    mask = np.triu(np.full((MAX_S, MAX_S), -np.inf, dtype=np.float32), k=1)
    s = g.op("self_attn", "Add", [s, causal_table(g, "self_attn.causal_mask", mask, d)])
    a = g.op("self_attn", "Softmax", [s], axis=-1)
    o = g.op("self_attn", "MatMul", [a, heads["v"]])
    o = g.op("self_attn", "Transpose", [o], perm=[0, 2, 1, 3])
    o = g.op("self_attn", "Reshape", [o, merge_shape(g, "self_attn", d, B, S, concat=False)])
    o = linear(g, "self_attn.o_proj", o, W, bias=False)
    r = g.op("", "Add", ["x", o])
    h = rms_norm(g, "post_attention_layernorm", r, W)
    gate = linear(g, "mlp.gate_proj", h, W, bias=False)
    up = linear(g, "mlp.up_proj", h, W, bias=False)
    act = g.op("mlp.act_fn", "Mul", [gate, g.op("mlp.act_fn", "Sigmoid", [gate])])
    o = linear(g, "mlp.down_proj", g.op("mlp", "Mul", [act, up]), W, bias=False)
    g.nodes.append(helper.make_node("Add", [r, o], ["y"], name="/Add_1"))
    return model_proto(g, "llama_block_dyn" if dyn else "llama_block", dyn)


def llama_ref(x: np.ndarray, seed: int) -> np.ndarray:
    W = {k: v.astype(np.float64) for k, v in llama_weights(seed).items()}
    x = x.astype(np.float64)
    B, S, _ = x.shape
    cos, sin = (t[:S].astype(np.float64) for t in rotary_tables())

    def rms(t, p):
        return W[f"{p}.weight"] * (t / np.sqrt((t**2).mean(-1, keepdims=True) + 1e-6))

    split = lambda t: t.reshape(B, S, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
    rot = lambda t: np.concatenate([-t[..., HEAD_DIM // 2 :], t[..., : HEAD_DIM // 2]], -1)
    h = rms(x, "input_layernorm")
    q, k, v = (split(h @ W[f"self_attn.{p}_proj.weight"]) for p in "qkv")
    q, k = (t * cos + rot(t) * sin for t in (q, k))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HEAD_DIM)
    s = np.where(np.tril(np.ones((S, S), dtype=bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(B, S, HIDDEN)
    r = x + o @ W["self_attn.o_proj.weight"]
    h = rms(r, "post_attention_layernorm")
    gate, up = h @ W["mlp.gate_proj.weight"], h @ W["mlp.up_proj.weight"]
    return r + (gate / (1.0 + np.exp(-gate)) * up) @ W["mlp.down_proj.weight"]


# ---- driver --------------------------------------------------------------------------------

# name: (builder, numpy reference, dynamic, weight seed). A block and its _dyn copy share weights.
MODELS = {
    "gpt2_block": (gpt2_block, gpt2_ref, False, 2001),
    "llama_block": (llama_block, llama_ref, False, 2002),
    "gpt2_block_dyn": (gpt2_block, gpt2_ref, True, 2001),
    "llama_block_dyn": (llama_block, llama_ref, True, 2002),
}


def main() -> None:
    out = sys.argv[1]
    for mi, (name, (build, ref, dyn, seed)) in enumerate(MODELS.items()):
        model = build(dyn, seed)
        onnx.checker.check_model(model, full_check=True)
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "model.onnx")
        onnx.save(model, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        ops = sum(n.op_type != "Constant" for n in model.graph.node)
        worst = 0.0
        for k, (b, s) in enumerate(DYN_BS if dyn else STATIC_BS):
            x = np.random.default_rng(100 * mi + k).standard_normal((b, s, HIDDEN)).astype(np.float32)
            (y,) = sess.run(None, {"x": x})
            want = ref(x, seed)
            assert y.shape == want.shape, (name, y.shape, want.shape)
            err = float(np.abs(y - want).max())
            assert err < 1e-4, f"{name}: onnxruntime differs from the numpy block by {err:.3g}"
            worst = max(worst, err)
            sd = os.path.join(d, f"test_data_set_{k}")
            os.makedirs(sd, exist_ok=True)
            onnx.save_tensor(numpy_helper.from_array(x, "x"), os.path.join(sd, "input_0.pb"))
            onnx.save_tensor(numpy_helper.from_array(y, "y"), os.path.join(sd, "output_0.pb"))
        print(f"{name}: {ops} ops, |onnxruntime - float64 numpy| max {worst:.2e}")


if __name__ == "__main__":
    main()
