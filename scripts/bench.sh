#!/usr/bin/env bash
# kiln side by side with onnxruntime (CLI.md, "Benchmark shapes"): sets the machine up if needed,
# builds kiln (release), generates the synthetic benchmark models into target/bench-models and
# runs benches/run.py, which prints the table and writes benches/RESULTS.md.
#   scripts/bench.sh [run.py args]          e.g. --quick, --filter layernorm, --threads 1
#   KILN=path/to/kiln scripts/bench.sh      benchmark that binary instead of building one
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${KILN:-}" ]; then
  cargo build --release -p kiln >&2
  KILN="${CARGO_TARGET_DIR:-target}/release/kiln"
fi
PY=.venv/bin/python
"$PY" benches/models.py target/bench-models >/dev/null
"$PY" benches/run.py --kiln "$KILN" --out benches/RESULTS.md "$@"
