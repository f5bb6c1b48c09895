#!/usr/bin/env bash
# Sets up a fresh machine (idempotent) and runs kiln's whole test suite: unit tests of every
# crate, the one integration-test binary (ONNX node-test conformance on `ref` against
# tests/expectations, the 9 `light` CNNs shipped and randomized vs onnxruntime, IR snapshots,
# mlir-opt parsing, the CLI, fuzzing of the loader) and doc tests. Release mode: the reference
# interpreter runs full CNNs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PROPTEST_CASES="${PROPTEST_CASES:-2000}"
cargo test --release --workspace --no-fail-fast -- --test-threads=2 --show-output 2>&1
