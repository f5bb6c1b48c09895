//! kiln's benchmarks. `cargo bench -p kiln-benches` times the reference target on the `light`
//! CNNs (load and run); side-by-side comparisons with onnxruntime arrive with the native
//! targets (`kiln bench` gives kiln's side).
