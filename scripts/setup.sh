#!/usr/bin/env bash
# Idempotent setup for kiln on a fresh Debian 12 (bookworm) machine.
# Installs LLVM/MLIR 22 (what melior and inkwell link against), lld, clang, qemu-user and
# the riscv64 cross libc (for the rvv target), protobuf-compiler, and a Python virtualenv
# (.venv) with the pinned test dependencies. Safe to run again: each step checks first.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

PKGS=(llvm-22-dev libmlir-22-dev mlir-22-tools lld-22 clang-22 libpolly-22-dev
      libzstd-dev zlib1g-dev libxml2-dev libncurses-dev libffi-dev
      qemu-user gcc-riscv64-linux-gnu libc6-dev-riscv64-cross
      libclang-22-dev protobuf-compiler python3-venv pkg-config)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# Python test dependencies, pinned as in CLI.md.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# ml_dtypes is pinned too: onnx computes the expected outputs of the int4/int2 Cast node tests
# with it, and 0.7 turns out-of-range values into 0 where 0.5 wraps them as ONNX's Cast does.
if ! .venv/bin/python -c 'import onnx, onnxruntime, numpy, ml_dtypes; assert onnx.__version__ == "1.23.2" and onnxruntime.__version__ == "1.32.0" and numpy.__version__.startswith("2.") and ml_dtypes.__version__ == "0.5.4"' 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "onnx==1.23.2" "onnxruntime==1.32.0" "numpy>=2,<3" "ml_dtypes==0.5.4" pytest >&2
fi
# maturin builds kiln's Python package (compiler/python) into the same venv.
if ! .venv/bin/python -c 'import maturin, pytest' 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "maturin>=1.9,<2" pytest >&2
fi

# ptxas (NVIDIA's PTX assembler, a binary inside the PyPI wheel): the gpu tests assemble every
# PTX kiln emits with it (no GPU needed).
if ! ls .venv/lib/python3*/site-packages/nvidia/cuda_nvcc/bin/ptxas >/dev/null 2>&1; then
  .venv/bin/pip install -q --disable-pip-version-check "nvidia-cuda-nvcc-cu12==12.9.86" >&2
fi

# ONNX backend node tests (1,884 cases with onnx 1.23.2) and the `light` models, generated from
# the installed onnx package into target/onnx-data (not committed).
DATA=target/onnx-data
if [ ! -f "$DATA/.done-1.23.2-mld0.5.4" ]; then
  rm -rf "$DATA"; mkdir -p "$DATA"
  .venv/bin/python scripts/gen_onnx_node_tests.py "$DATA" >&2
  .venv/bin/python -c 'import onnx, os, shutil, sys; s = os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light"); shutil.copytree(s, sys.argv[1] + "/light")' "$DATA"
  .venv/bin/python scripts/make_light_random.py "$DATA/light" "$DATA/light-random" >&2
  touch "$DATA/.done-1.23.2-mld0.5.4" "$DATA/.done-1.23.2"
fi
# GPT-2 / Llama transformer blocks as exporters write them, with onnxruntime outputs. A separate
# stamp so that machines set up before these existed get them too.
if [ ! -f "$DATA/transformers/.done-v1" ]; then
  rm -rf "$DATA/transformers"
  .venv/bin/python scripts/make_transformer_blocks.py "$DATA/transformers" >&2
  touch "$DATA/transformers/.done-v1"
fi
echo "setup: ok" >&2
