//! kiln's benchmarks. `cargo bench -p kiln-benches` times the reference target on the `light`
//! CNNs (load and run). The side-by-side comparison with onnxruntime is Python, next to this
//! crate: `models.py` builds the synthetic benchmark models, `run.py` runs `kiln bench --json` and
//! onnxruntime on them, the `light` CNNs and the transformer blocks and writes `RESULTS.md`
//! (`scripts/bench.sh`, `make bench`).
