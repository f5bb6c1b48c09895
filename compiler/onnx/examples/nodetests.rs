//! Runs ONNX backend node tests on the reference interpreter and prints PASS/FAIL per case.
//!
//! Usage: `cargo run --release -p kiln-onnx --example nodetests -- [SUBSTRING]...`
//! Cases come from `$KILN_ONNX_DATA/node` (default `target/onnx-data/node`, written by
//! `scripts/setup.sh`). A panic in a case is caught and reported as a failure (it is a bug).
use kiln_onnx::testcase::{list_cases, run_case_ref};
use std::path::PathBuf;

fn main() {
    let root = std::env::var("KILN_ONNX_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/onnx-data"));
    let filters: Vec<String> = std::env::args().skip(1).collect();
    let (mut pass, mut fail) = (0, 0);
    for case in list_cases(&root.join("node")) {
        if !filters.is_empty() && !filters.iter().any(|f| case.name.contains(f.as_str())) {
            continue;
        }
        let r = std::panic::catch_unwind(|| run_case_ref(&case))
            .unwrap_or_else(|_| Err("PANIC (a bug: ops must return errors, never panic)".into()));
        match r {
            Ok(()) => {
                pass += 1;
                println!("PASS {}", case.name);
            }
            Err(e) => {
                fail += 1;
                let e: String = e.chars().take(300).collect();
                println!("FAIL {}: {e}", case.name);
            }
        }
    }
    println!("{pass} passed, {fail} failed");
}
