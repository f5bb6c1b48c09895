//! Generates `include/kiln.h` from the `extern "C"` items of `src/lib.rs` (cbindgen).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("cbindgen.toml");
    let header = format!("{dir}/include/kiln.h");
    match cbindgen::Builder::new().with_crate(&dir).with_config(config).generate() {
        // `write_to_file` leaves the file alone when it is unchanged.
        Ok(bindings) => {
            bindings.write_to_file(&header);
        }
        Err(e) => panic!("cbindgen could not generate {header}: {e}"),
    }
}
