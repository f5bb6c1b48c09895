//! Load and run time of each `light` CNN on the reference interpreter (all-ones input).
//! Needs `scripts/setup.sh` to have generated `target/onnx-data`.
use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/onnx-data/light");
    let mut models: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("target/onnx-data/light: run scripts/setup.sh")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    models.sort();
    println!("{:<28} {:>10} {:>10}", "model", "load ms", "run ms");
    for p in models {
        let t0 = Instant::now();
        let m = kiln::load_model(&p).expect("load");
        let c = kiln::compile(m, "ref").expect("compile");
        let load = t0.elapsed().as_secs_f64() * 1e3;
        let ty = c.inputs()[0].1.clone();
        let shape = ty.static_shape().expect("static input");
        let x = kiln::Tensor::from_f32(&shape, vec![1.0; shape.iter().product()]);
        let t1 = Instant::now();
        c.run(vec![x]).expect("run");
        let run = t1.elapsed().as_secs_f64() * 1e3;
        println!("{:<28} {load:>10.1} {run:>10.1}", p.file_stem().unwrap().to_string_lossy());
    }
}
