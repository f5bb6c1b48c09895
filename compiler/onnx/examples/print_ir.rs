//! Prints a model's graph IR (MLIR generic syntax) and checks that it parses back equal.
//! Usage: `cargo run -p kiln-onnx --example print_ir -- MODEL.onnx`
fn main() {
    let path = std::env::args().nth(1).expect("usage: print_ir MODEL.onnx");
    let m = match kiln_onnx::load_model(std::path::Path::new(&path)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let text = kiln_ir::printer::print_module(&m, Default::default());
    print!("{text}");
    match kiln_ir::parser::parse_module(&text) {
        Ok(back) if kiln_ir::printer::print_module(&back, Default::default()) == text => {
            eprintln!("round-trip: ok")
        }
        Ok(_) => eprintln!("round-trip: DIFFERENT"),
        Err(e) => eprintln!("round-trip: parse error {e}"),
    }
}
