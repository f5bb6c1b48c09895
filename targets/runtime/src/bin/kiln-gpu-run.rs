//! `kiln-gpu-run DIR --input X.npy... [--output-dir OUT] [--expect Y.npy... --rtol R --atol A]
//! [--repeat N] [--json]`: runs a model compiled by `kiln compile MODEL --target cuda -o DIR` on
//! GPU 0 through the CUDA driver, writes its outputs as `OUT/output_<i>.npy`, checks them
//! against expected outputs and times `N` more runs. The plan's host steps (ops the GPU does not
//! run) run on this machine's CPU with kiln-ir's reference interpreter between launches.
//!
//! Exit status: 0 ran (and matched), 1 an output differs, 2 bad usage or files (plan, inputs),
//! 3 no CUDA driver or a CUDA error. Errors name what is wrong on stderr.

use kiln_runtime::cuda::CudaDevice;
use kiln_runtime::gpu::{check_inputs, read_plan, Executor};
use kiln_runtime::npy;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: kiln-gpu-run DIR --input X.npy... [--output-dir OUT] [--expect Y.npy... [--rtol R] [--atol A]] [--repeat N] [--json]";

struct Args {
    dir: PathBuf,
    inputs: Vec<PathBuf>,
    expect: Vec<PathBuf>,
    output_dir: Option<PathBuf>,
    rtol: f32,
    atol: f32,
    repeat: usize,
    json: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        dir: PathBuf::new(),
        inputs: Vec::new(),
        expect: Vec::new(),
        output_dir: None,
        rtol: 1e-3,
        atol: 1e-4,
        repeat: 0,
        json: false,
    };
    let mut dir = None;
    let mut list: Option<bool> = None; // Some(true): --input files follow, Some(false): --expect
    let mut it = std::env::args().skip(1);
    while let Some(s) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match s.as_str() {
            "--input" => list = Some(true),
            "--expect" => list = Some(false),
            "--output-dir" => a.output_dir = Some(value("--output-dir")?.into()),
            "--rtol" => a.rtol = value("--rtol")?.parse().map_err(|_| "--rtol needs a number")?,
            "--atol" => a.atol = value("--atol")?.parse().map_err(|_| "--atol needs a number")?,
            "--repeat" => a.repeat = value("--repeat")?.parse().map_err(|_| "--repeat needs a count")?,
            "--json" => a.json = true,
            "-h" | "--help" => return Err(String::new()),
            f if f.starts_with("--") => return Err(format!("unknown option {f}")),
            f => match list {
                Some(true) => a.inputs.push(f.into()),
                Some(false) => a.expect.push(f.into()),
                None if dir.is_none() => dir = Some(PathBuf::from(f)),
                None => return Err(format!("unexpected argument {f}")),
            },
        }
        if !matches!(s.as_str(), "--input" | "--expect") && s.starts_with("--") {
            list = None;
        }
    }
    a.dir = dir.ok_or("no model directory")?;
    Ok(a)
}

/// Says what is wrong on stderr (and with `--json` as `{"ok": false, "rc", "error"}` on stdout).
fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("kiln-gpu-run: {msg}");
    if std::env::args().any(|a| a == "--json") {
        println!("{}", serde_json::json!({"ok": false, "rc": code, "error": msg}));
    }
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(2, &format!("{e}\n{USAGE}")),
    };
    // Everything that needs no GPU first: the plan, the inputs, the expected outputs.
    let plan = match read_plan(&a.dir) {
        Ok(p) if p.target != "cuda" => {
            return fail(2, &format!("{}: a {} plan; kiln-gpu-run runs cuda plans", a.dir.display(), p.target))
        }
        Ok(p) => p,
        Err(e) => return fail(2, &e.0),
    };
    let read = |ps: &[PathBuf]| ps.iter().map(|p| npy::read(p)).collect::<Result<Vec<_>, _>>();
    let (inputs, expect) = match (read(&a.inputs), read(&a.expect)) {
        (Ok(i), Ok(e)) => (i, e),
        (Err(e), _) | (_, Err(e)) => return fail(2, &e.0),
    };
    if let Err(e) = check_inputs(&plan, &inputs) {
        return fail(2, &e.0);
    }
    if !expect.is_empty() && expect.len() != plan.outputs.len() {
        return fail(2, &format!("{} --expect files for {} outputs", expect.len(), plan.outputs.len()));
    }
    let device = match CudaDevice::open() {
        Ok(d) => d,
        Err(e) => return fail(3, &format!("{e} (this runner needs an NVIDIA GPU and its driver, libcuda.so.1)")),
    };
    let mut ex = match Executor::new(device, &a.dir) {
        Ok(x) => x,
        Err(e) => return fail(3, &e.0),
    };
    let outs = match ex.run(&inputs) {
        Ok(o) => o,
        Err(e) => return fail(3, &e.0),
    };
    if let Some(dir) = &a.output_dir {
        if let Err(e) = std::fs::create_dir_all(dir) {
            return fail(2, &format!("{}: {e}", dir.display()));
        }
        for (i, o) in outs.iter().enumerate() {
            if let Err(e) = npy::write(&dir.join(format!("output_{i}.npy")), o) {
                return fail(2, &e.0);
            }
        }
    }
    let mut bad = Vec::new();
    for ((p, o), w) in plan.outputs.iter().zip(&outs).zip(&expect) {
        if let Some(why) = npy::mismatch(o, w, a.rtol, a.atol) {
            bad.push(format!("output '{}': {why}", p.name));
        }
    }
    let times = match ex.time(a.repeat) {
        Ok(t) => t,
        Err(e) => return fail(3, &e.0),
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied();
    if a.json {
        let v = serde_json::json!({
            "rc": if bad.is_empty() { 0 } else { 1 },
            "error": if bad.is_empty() { None } else { Some(bad.join("; ")) },
            "dir": a.dir.display().to_string(),
            "launches": plan.launches.len(),
            "checked": !expect.is_empty(),
            "ok": bad.is_empty(),
            "mismatches": bad,
            "repeat": a.repeat,
            "median_ms": median,
            "min_ms": sorted.first(),
        });
        println!("{v}");
    } else {
        println!("{}: {} launches on the GPU", a.dir.display(), plan.launches.len());
        if !expect.is_empty() && bad.is_empty() {
            println!("outputs match (rtol {}, atol {})", a.rtol, a.atol);
        }
        if let (Some(m), Some(min)) = (median, sorted.first()) {
            println!("{} runs: median {m:.3} ms, min {min:.3} ms", a.repeat);
        }
    }
    if !bad.is_empty() {
        eprintln!("kiln-gpu-run: {}", bad.join("; "));
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
