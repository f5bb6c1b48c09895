#!/usr/bin/env bash
# Sets up a fresh machine (idempotent) and runs kiln's whole test suite: unit tests of every
# crate, the one integration-test binary (ONNX node-test conformance on `ref` against
# tests/expectations, the 9 `light` CNNs shipped and randomized vs onnxruntime, IR snapshots,
# mlir-opt parsing, the CLI, fuzzing of the loader), the C and C++ examples of the C API, and doc
# tests; then kiln's Python package, built and installed into .venv, under pytest (its API, and
# onnx's backend test runner through kiln.onnx_backend on `ref` and `cpu`). Release mode: the
# reference interpreter runs full CNNs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PROPTEST_CASES="${PROPTEST_CASES:-2000}"
status=0
# kiln-python is built by maturin below (linked into the interpreter), not as a cargo test.
cargo test --release --workspace --exclude kiln-python --no-fail-fast -- --test-threads=2 --show-output 2>&1 || status=$?
# The Python package: built in release mode into target/ (reusing what cargo built), installed
# into .venv, tested with pytest.
PATH="$PWD/.venv/bin:$PATH" .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
  --force-reinstall ./compiler/python >&2
.venv/bin/python -m pytest -q -p no:cacheprovider compiler/python/tests 2>&1 || status=$?
exit $status
