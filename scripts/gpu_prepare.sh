#!/usr/bin/env bash
# Prepares everything a GPU machine with no compiler and no network needs to check kiln's cuda
# target: `bash scripts/gpu_prepare.sh OUTDIR` (on the build machine, after scripts/setup.sh).
#
# OUTDIR/bin/kiln-gpu-run   the stripped runner (kiln-runtime only; the CUDA driver is dlopened)
# OUTDIR/node/NAME/         each ONNX node test whose cuda plan is runnable: kernels (PTX),
#                           manifest.json, plan.json, weights.bin, input_<i>.npy and
#                           expect_<i>.npy (the outputs of `kiln run --target ref`)
# OUTDIR/node-host/NAME/    node tests whose plans are host steps only (no launch), the same way
# OUTDIR/cnn/NAME/          the light CNNs (random weights) the same way, smallest first while
#                           OUTDIR stays under $GPU_PREPARE_BUDGET_MIB (default 56) MiB
# OUTDIR/prepare.json       counts: node tests compiled, runnable, prepared; why not; sizes
#
# Then on the GPU machine, from the repository root: `bash scripts/gpu_check.sh OUTDIR`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_prepare.sh OUTDIR}
export KILN_ONNX_DATA=${KILN_ONNX_DATA:-$PWD/target/onnx-data}
target=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -p kiln --bin kiln -p kiln-runtime --bin kiln-gpu-run
mkdir -p "$out/bin"
cp "$target/release/kiln-gpu-run" "$out/bin/kiln-gpu-run"
strip "$out/bin/kiln-gpu-run"
echo "kiln-gpu-run: $(stat -c %s "$out/bin/kiln-gpu-run") bytes stripped"
python=${PYTHON:-${PYO3_PYTHON:-$PWD/.venv/bin/python}}
[ -x "$python" ] || python=python3
KILN_BIN="$target/release/kiln" "$python" scripts/gpu_prepare.py "$out"
echo "$out: $(du -sb "$out" | cut -f1) bytes ($(du -sh "$out" | cut -f1))"
