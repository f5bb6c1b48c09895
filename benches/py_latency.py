#!/usr/bin/env python3
"""kiln vs onnxruntime from Python, in one process: the latency a framework sees through
kiln's Python package (`import kiln`), next to onnxruntime's InferenceSession, on the `light`
ResNet-50 (randomized weights) and the GPT-2 transformer block (B=1, S=128).

Both get the same seeded inputs and the same thread count; outputs are compared (largest
difference relative to the largest onnxruntime output). Each side is
warmed up, then timed over alternating rounds (kiln, onnxruntime, kiln, ...), each round at
least --iters runs and 0.5 s; each side keeps its best round median. Prints one line per model
and the ratio kiln / onnxruntime (below 1: kiln faster).

Usage: py_latency.py [--data target/onnx-data] [--threads 2] [--iters 10] [--rounds 3] [--target cpu]
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

import kiln

MODELS = [
    ("resnet50", "light-random/light_resnet50/model.onnx", {}),
    ("gpt2_block", "transformers/gpt2_block/model.onnx", {"B": 1, "S": 128}),
]


def inputs_for(session: ort.InferenceSession, dims: dict) -> dict:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else dims.get(d, 1) for d in i.shape]
        if i.type == "tensor(float)":
            feeds[i.name] = rng.standard_normal(shape, dtype=np.float32)
        elif i.type == "tensor(int64)":
            feeds[i.name] = rng.integers(0, 100, size=shape, dtype=np.int64)
        else:
            raise SystemExit(f"{i.name}: input type {i.type} not handled by this script")
    return feeds


def round_median(fn, iters: int, min_s: float = 0.5) -> float:
    times = []
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("KILN_ONNX_DATA", "target/onnx-data"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--target", default="cpu")
    args = ap.parse_args()

    print(f"kiln {kiln.__version__} (target {args.target}) vs onnxruntime {ort.__version__}, "
          f"{args.threads} threads, one Python process")
    print(f"{'model':<12} {'compile s':>9} {'kiln ms':>9} {'ORT ms':>9} {'kiln/ORT':>9} {'max rel diff':>13}")
    status = 0
    for name, rel, dims in MODELS:
        path = os.path.join(args.data, rel)
        if not os.path.exists(path):
            print(f"{name:<12} missing {path} (scripts/setup.sh makes it)")
            status = 1
            continue
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        feeds = inputs_for(sess, dims)
        t0 = time.perf_counter()
        model = kiln.compile(path, target=args.target, threads=args.threads, dims=dims)
        compile_s = time.perf_counter() - t0

        ordered = [feeds[n] for n, _, _ in model.inputs]
        got = model.run(ordered)
        want = sess.run(None, feeds)
        diff = max(float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30)) for g, w in zip(got, want))
        for _ in range(3):
            model.run(ordered)
            sess.run(None, feeds)
        k_best = o_best = float("inf")
        for _ in range(args.rounds):
            k_best = min(k_best, round_median(lambda: model.run(ordered), args.iters))
            o_best = min(o_best, round_median(lambda: sess.run(None, feeds), args.iters))
        print(f"{name:<12} {compile_s:>9.2f} {k_best * 1e3:>9.2f} {o_best * 1e3:>9.2f} "
              f"{k_best / o_best:>9.2f} {diff:>13.2e}")
    return status


if __name__ == "__main__":
    sys.exit(main())
