#!/usr/bin/env python3
"""Builds randomized-weight copies of the onnx package's 9 `light` CNNs and their onnxruntime outputs.

The shipped `light` models fill every weight with a constant (ConstantOfShape), so their outputs
say little about numerics. Each copy here replaces those fills by seeded random initializers
(He-scaled conv/gemm weights, BatchNorm scale and variance near 1, small biases and means),
drops the trailing Softmax, and stores onnxruntime's output for a seeded random input:

    OUT/<model>/model.onnx, OUT/<model>/test_data_set_0/{input_0,output_0}.pb

Usage: make_light_random.py LIGHT_DIR OUT
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper


def randomize(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers = {}
    for n in g.node:
        for idx, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, idx))
    keep = []
    new_inits = {}
    for n in g.node:
        if n.op_type != "ConstantOfShape" or n.input[0] not in inits:
            keep.append(n)
            continue
        shape = [int(d) for d in numpy_helper.to_array(inits[n.input[0]])]
        out = n.output[0]
        uses = consumers.get(out, [])
        op, idx = (uses[0][0].op_type, uses[0][1]) if uses else ("", 0)
        if op in ("Conv",) and idx == 1:
            fan_in = int(np.prod(shape[1:]))
            data = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif op == "Gemm" and idx == 1:
            trans_b = any(a.name == "transB" and a.i == 1 for a in uses[0][0].attribute)
            fan_in = shape[1] if trans_b else shape[0]
            data = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif op == "BatchNormalization" and idx in (1, 4):
            data = rng.uniform(0.8, 1.2, shape)
        elif op == "Mul":
            data = rng.uniform(0.8, 1.2, shape)
        else:
            data = rng.uniform(-0.1, 0.1, shape)
        new_inits[out] = numpy_helper.from_array(data.astype(np.float32), out)
    del g.node[:]
    g.node.extend(keep)
    # Old IR: weights were listed as inputs and initializers too; keep only the new values.
    used = {x for n in g.node for x in n.input}
    old = [i for i in g.initializer if i.name not in new_inits and i.name in used]
    del g.initializer[:]
    g.initializer.extend(old + list(new_inits.values()))
    unused_inputs = [i for i in g.input if i.name not in used]
    for i in unused_inputs:
        g.input.remove(i)
    # Drop the trailing Softmax: compare logits, not saturated probabilities.
    last = g.node[-1]
    if last.op_type == "Softmax" and last.output[0] == g.output[0].name:
        src = last.input[0]
        g.node.remove(last)
        out = g.output[0]
        new_out = helper.make_tensor_value_info(src, out.type.tensor_type.elem_type, None)
        del g.output[:]
        g.output.append(new_out)
    return model


def main() -> None:
    light, out = sys.argv[1], sys.argv[2]
    for i, f in enumerate(sorted(x for x in os.listdir(light) if x.endswith(".onnx"))):
        name = f[: -len(".onnx")]
        model = randomize(onnx.load(os.path.join(light, f)), seed=1000 + i)
        d = os.path.join(out, name, "test_data_set_0")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(out, name, "model.onnx")
        onnx.save(model, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.log_severity_level = 3
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        x = np.random.default_rng(i).standard_normal([d if isinstance(d, int) else 1 for d in inp.shape]).astype(np.float32)
        (y,) = sess.run(None, {inp.name: x})
        onnx.save_tensor(numpy_helper.from_array(x, inp.name), os.path.join(d, "input_0.pb"))
        onnx.save_tensor(numpy_helper.from_array(y, sess.get_outputs()[0].name), os.path.join(d, "output_0.pb"))
        print(f"{name}: output {y.shape}, |y| max {np.abs(y).max():.3g}")


if __name__ == "__main__":
    main()
