//! The C and C++ examples, compiled against `include/kiln.h` and linked with the
//! `libkiln_capi.so` cargo built for these tests, run on the repo's small model. Each example
//! checks the native outputs against the reference interpreter and that bad calls (NULL
//! pointers, a closed handle, a wrong input, a missing file) are refused with a status and a
//! message; this test requires both to exit 0 and looks for what they print.
//!
//! This binary does not link kiln itself (no LLVM inside): it drives a C compiler.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The directory holding `libkiln_capi.so`: this test binary is in `<profile>/deps`, and cargo
/// builds the library's cdylib for integration tests beside it and in `<profile>`.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir").to_path_buf();
    for d in [deps.clone(), deps.parent().expect("profile dir").to_path_buf()] {
        if d.join("libkiln_capi.so").exists() {
            return d;
        }
    }
    panic!("libkiln_capi.so is not beside {} (cargo builds it for this test)", exe.display());
}

fn build_and_run(compiler: &str, source: &str, extra: &[&str]) -> String {
    let out_dir = std::env::temp_dir().join(format!("kiln-capi-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join(Path::new(source).file_stem().unwrap()).with_extension(compiler);
    let lib = lib_dir();
    let src = repo().join("compiler/capi/examples").join(source);
    let status = Command::new(compiler)
        .args(extra)
        .arg(&src)
        .arg("-I")
        .arg(repo().join("compiler/capi/include"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lkiln_capi", "-lm", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .status()
        .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    assert!(status.success(), "{compiler} could not build {}", src.display());
    let out = Command::new(&exe).arg(repo().join("examples/tiny_cnn/model.onnx")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{} failed ({}):\n{stdout}\n{stderr}", exe.display(), out.status);
    assert!(stdout.contains("all checks passed"), "{stdout}");
    stdout
}

#[test]
fn c_example_runs_the_model_and_refuses_bad_calls() {
    let out = build_and_run("cc", "example.c", &["-std=c11"]);
    for refused in [
        "NULL path",
        "missing file",
        "unknown target",
        "junk bytes",
        "NULL outputs",
        "missing input",
        "int32 for a float input",
        "wrong shape",
        "closed model",
        "double free",
        "a model passed as a tensor",
    ] {
        assert!(out.contains(&format!("refused as expected: {refused}: ")), "no '{refused}' in:\n{out}");
    }
    // The messages name what is wrong.
    assert!(out.contains("no/such/model.onnx"), "{out}");
    assert!(out.contains("tpu9000"), "{out}");
    assert!(out.contains("expected element type float, got int32"), "{out}");
}

#[test]
fn cpp_example_runs_the_model_with_raii_and_exceptions() {
    let out = build_and_run("c++", "example.cpp", &["-std=c++17"]);
    assert!(out.contains("refused as expected (status 6)"), "{out}");
}

#[test]
fn the_header_is_current_and_self_contained() {
    // build.rs regenerated it; it must compile on its own as C and as C++.
    let header = repo().join("compiler/capi/include/kiln.h");
    let text = std::fs::read_to_string(&header).unwrap();
    for item in ["kiln_compile_file", "kiln_run", "kiln_last_error", "KILN_ERR_INVALID_HANDLE", "KilnTensorView"] {
        assert!(text.contains(item), "{item} missing from {}", header.display());
    }
    for (cc, lang) in [("cc", "c"), ("c++", "c++")] {
        let st =
            Command::new(cc).args(["-fsyntax-only", "-Wall", "-Werror", "-x", lang]).arg(&header).status().unwrap();
        assert!(st.success(), "{cc} rejects {}", header.display());
    }
}
