#!/usr/bin/env bash
# kiln's main job, end to end on a fresh machine: set up, build, then inspect, print and run the
# small model kept in the repo (examples/tiny_cnn, symbolic batch N) on the reference target and on
# the native cpu target (with --check), and
# check its output against onnxruntime's (stored next to the model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p kiln
KILN=target/release/kiln
M=examples/tiny_cnn
# check_output FILE TARGET: FILE matches onnxruntime's output stored next to the model.
check_output() {
  .venv/bin/python - "$1" "$2" <<'PY'
import sys, numpy as np, onnx
from onnx import numpy_helper
path, target = sys.argv[1], sys.argv[2]
got = numpy_helper.to_array(onnx.load_tensor(path))
want = numpy_helper.to_array(onnx.load_tensor("examples/tiny_cnn/expected_output_0.pb"))
err = np.abs(got - want).max()
assert got.shape == want.shape and np.allclose(got, want, rtol=1e-3, atol=1e-5), f"max abs err {err}"
print(f"{path} ({target}) matches onnxruntime: shape {got.shape}, max abs err {err:.2e}")
PY
}
echo "== kiln targets"; $KILN targets
echo "== kiln inspect $M/model.onnx"; $KILN inspect $M/model.onnx
echo "== kiln compile $M/model.onnx --emit graph (first lines)"; $KILN compile $M/model.onnx --emit graph | head -n 12
echo "== kiln compile $M/model.onnx --target cpu --emit fused (kernels, one line each)"
$KILN compile $M/model.onnx --target cpu --emit fused | grep -E '^    %[0-9]+ = "graph\.' | grep -v graph.Constant | cut -c1-140
echo "== kiln run $M/model.onnx --target ref"
$KILN run $M/model.onnx --target ref --input $M/input_0.pb --output-dir kiln-out --npy
check_output kiln-out/output_0.pb ref
echo "== kiln compile $M/model.onnx --target cpu --emit kernel (first lines)"
$KILN compile $M/model.onnx --target cpu --emit kernel | head -n 12
echo "== kiln run $M/model.onnx --target cpu --check (native code, checked kernel by kernel against ref)"
$KILN run $M/model.onnx --target cpu --input $M/input_0.pb --output-dir kiln-out-cpu --check
check_output kiln-out-cpu/output_0.pb cpu
echo "== kiln bench $M/model.onnx --target cpu --json"
$KILN bench $M/model.onnx --target cpu --json --iters 20
