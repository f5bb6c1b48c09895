//! Autotuning (`kiln tune`, `kiln::tune`): records in the database's format, a killed run
//! resumed without losing or duplicating a record, and compiles with the database that are
//! deterministic and measure nothing. The NPU simulator's cycles make these deterministic;
//! cpu tuning is exercised on a small model (its timings are not asserted).

use crate::common::*;
use kiln::tune::{best_of, read_db, Outcome, Record, Strategy, TuneOptions};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

fn gpt2() -> std::path::PathBuf {
    data_dir().join("transformers/gpt2_block/model.onnx")
}

fn records(db: &Path) -> Vec<Record> {
    let (r, bad) = read_db(db).unwrap();
    assert_eq!(bad, 0, "{} has unreadable lines", db.display());
    r
}

fn per_workload(rs: &[Record]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in rs {
        *m.entry(r.workload.clone()).or_insert(0) += 1;
    }
    m
}

#[test]
fn tune_on_npu_writes_records_and_the_database_compiles_deterministically() {
    let dir = temp_dir("tune-npu");
    let db = dir.join("db.jsonl");
    let model = gpt2();
    let out = kiln(&[
        "tune",
        model.to_str().unwrap(),
        "--target",
        "npu",
        "--npu-preset",
        "davinci",
        "--tuning-db",
        db.to_str().unwrap(),
        "--trials",
        "12",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rs = records(&db);
    assert_eq!(rs.len() as u64, report["measured"].as_u64().unwrap());
    // The record format of ../shared/CLI.md.
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&db).unwrap().lines().next().unwrap()).unwrap();
    for field in ["workload", "target", "target_hash", "knobs", "result", "kiln_version", "time"] {
        assert!(line.get(field).is_some(), "no {field} in {line}");
    }
    assert_eq!(line["target"], "npu");
    assert!(line["result"]["sim_cycles"].is_u64() && line["result"]["ok"] == true, "{line}");
    // No candidate is measured twice; at most 12 per workload; the default is always measured.
    let pairs: HashSet<(String, String)> =
        rs.iter().map(|r| (r.workload.clone(), serde_json::to_string(&r.knobs).unwrap())).collect();
    assert_eq!(pairs.len(), rs.len(), "a duplicated measurement");
    assert!(per_workload(&rs).values().all(|&n| (1..=12).contains(&n)));
    // Each measurement is reported with the static estimate the learned search ranked it by
    // (relative to the default, which is measured first).
    for k in report["kernels"].as_array().unwrap() {
        let (costs, est) = (k["costs"].as_array().unwrap(), k["estimates"].as_array().unwrap());
        assert_eq!(costs.len(), est.len(), "{k}");
        if let Some(first) = est.first() {
            assert_eq!(first.as_f64(), Some(1.0), "{k}");
        }
        assert!(est.iter().all(|e| e.as_f64().is_some_and(|e| e > 0.0)), "{k}");
    }
    // Tuning never makes a kernel worse than its default, and the model gains as a whole.
    for k in report["kernels"].as_array().unwrap() {
        if let (Some(d), Some(b)) = (k["default"].as_f64(), k["best"].as_f64()) {
            assert!(b <= d, "{k}");
        }
    }
    let whole = &report["model"];
    assert!(whole["tuned"].as_f64().unwrap() <= whole["default"].as_f64().unwrap(), "{whole}");

    // Compiling with the database: deterministic, and no measurement.
    let emit = |with_db: bool| {
        let mut args =
            vec!["compile", model.to_str().unwrap(), "--target", "npu", "--npu-preset", "davinci", "--emit", "kernel"];
        if with_db {
            args.extend(["--tuning-db", db.to_str().unwrap()]);
        }
        let o = kiln(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let (a, b, plain) = (emit(true), emit(true), emit(false));
    assert_eq!(a, b, "compiles with the same database differ");
    let improved = report["kernels"].as_array().unwrap().iter().any(|k| k["best"].as_f64() < k["default"].as_f64());
    assert_eq!(a != plain, improved, "the database must change exactly the kernels tuning improved");
    let m = kiln::load_model(&model).unwrap();
    let before = kiln::tune::measurements();
    let c = kiln::Compiler::new("npu")
        .npu_config(kiln::NpuConfig::preset("davinci").unwrap())
        .tuning_db(&db)
        .compile(&m)
        .unwrap();
    assert_eq!(kiln::tune::measurements(), before, "compiling with a database measured something");
    assert_eq!(c.host_kernels().unwrap().len(), 0);
}

#[test]
fn a_killed_tuning_run_resumes_without_losing_or_duplicating_records() {
    let dir = temp_dir("tune-resume");
    let (db, full) = (dir.join("killed.jsonl"), dir.join("full.jsonl"));
    let model = gpt2();
    let args = |db: &Path| {
        vec![
            "tune".to_string(),
            model.display().to_string(),
            "--target".into(),
            "npu".into(),
            "--npu-preset".into(),
            "mlu".into(),
            "--tuning-db".into(),
            db.display().to_string(),
            "--trials".into(),
            "10".into(),
            "--no-model-bench".into(),
        ]
    };
    // Uninterrupted, for comparison.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(args(&full)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Killed (SIGKILL) once some records are written.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args(&db))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        let n = std::fs::read_to_string(&db).map(|t| t.lines().count()).unwrap_or(0);
        if n >= 12 || start.elapsed() > Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before: Vec<String> = std::fs::read_to_string(&db).unwrap().lines().map(String::from).collect();
    let whole = records(&full).len();
    assert!(before.len() >= 12 && before.len() < whole, "killed after {} of {whole} records", before.len());
    // Resumed.
    let mut resume = args(&db);
    resume.push("--resume".into());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(&resume).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&db).unwrap();
    let after: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    // Nothing lost: the killed run's complete records are still there, in order.
    let complete: Vec<&String> = before.iter().filter(|l| serde_json::from_str::<Record>(l).is_ok()).collect();
    assert!(complete.len() + 1 >= before.len(), "more than the last line was cut");
    for (a, b) in complete.iter().zip(&after) {
        assert_eq!(a.as_str(), *b);
    }
    // Nothing duplicated, and each workload has the trials an uninterrupted run gives it.
    let rs: Vec<Record> = after.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let pairs: HashSet<(String, String)> =
        rs.iter().map(|r| (r.workload.clone(), serde_json::to_string(&r.knobs).unwrap())).collect();
    assert_eq!(pairs.len(), rs.len(), "a record was duplicated by the resumed run");
    assert_eq!(per_workload(&rs), per_workload(&records(&full)));
}

#[test]
fn tuning_on_cpu_checks_candidates_and_the_api_reports_best_so_far() {
    let dir = temp_dir("tune-cpu");
    let db = dir.join("db.jsonl");
    let model = kiln::load_model(&data_dir().join("transformers/gpt2_block/model.onnx")).unwrap();
    let c = kiln::Compiler::new("cpu").lower(&model).unwrap();
    // Every candidate is confirmed against the best so far (an infinite margin), so the
    // repeats are known in advance.
    let opts = TuneOptions {
        db: db.clone(),
        trials: 4,
        strategy: Strategy::Random,
        seed: 7,
        confirm_rounds: 2,
        confirm_margin: f64::INFINITY,
        ..TuneOptions::default()
    };
    let mut calls = 0;
    let report = kiln::tune::tune(&c, &opts, &mut |_, _| calls += 1).unwrap();
    let trials: usize = report.kernels.iter().map(|k| k.measured.len()).sum();
    assert_eq!(calls, trials, "one progress call per trial");
    let rs = records(&db);
    assert_eq!(rs.len(), report.measured);
    let repeats: usize = report.kernels.iter().map(|k| k.repeats).sum();
    assert_eq!(report.measured, trials + repeats);
    let best = kiln::tune::best_of(&rs, "cpu", &rs[0].target_hash);
    for k in &report.kernels {
        assert!(k.skipped.is_none(), "{}: {:?}", k.kernel, k.skipped);
        assert_eq!(k.failed, 0, "{}: a candidate failed", k.kernel);
        // Each trial after the first: 2 rounds of the candidate and of the best so far.
        assert_eq!(k.repeats, 4 * k.measured.len().saturating_sub(1), "{}", k.kernel);
        assert_eq!(k.chosen.len(), k.best_so_far.len());
        assert_eq!(k.best_so_far.last().copied(), k.best_cost, "{}", k.kernel);
        assert!(k.best_cost.unwrap() <= k.default_cost.unwrap());
        // The cost of the chosen kernel is the median of its records, and the database
        // chooses the same schedule.
        let mut mine: Vec<f64> = rs
            .iter()
            .filter(|r| r.workload == k.workload && r.knobs == k.best)
            .map(|r| r.result.median_ms.unwrap())
            .collect();
        mine.sort_by(f64::total_cmp);
        let n = mine.len();
        let median = if n % 2 == 1 { mine[n / 2] } else { (mine[n / 2 - 1] + mine[n / 2]) / 2.0 };
        // (within a JSON round trip's last bit)
        assert!((median - k.best_cost.unwrap()).abs() <= 1e-12 * median, "{}: {mine:?}", k.kernel);
        assert_eq!(best[&k.workload], k.best, "{}", k.kernel);
    }
    // The compiled model with the database runs and matches the default one.
    let x = |n| kiln::Tensor::from_f32(&[1, 128, 256], values(128 * 256, n));
    let tuned = kiln::Compiler::new("cpu").tuning_db(&db).compile(&model).unwrap();
    let plain = kiln::Compiler::new("cpu").compile(&model).unwrap();
    let (a, b) = (tuned.run(vec![x(1)]).unwrap(), plain.run(vec![x(1)]).unwrap());
    for (a, b) in a[0].as_f32().unwrap().iter().zip(b[0].as_f32().unwrap()) {
        assert!((a - b).abs() <= 1e-4 + 1e-3 * b.abs(), "{a} vs {b}");
    }
    // Unusable requests are clear errors.
    let e = kiln::tune::tune(&kiln::Compiler::new("ref").lower(&model).unwrap(), &opts, &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("kiln tune measures on cpu"), "{e}");
    let e = kiln::Compiler::new("cpu").tuning_db(&dir.join("missing.jsonl")).compile(&model).err().unwrap();
    assert!(e.to_string().contains("no such tuning database"), "{e}");
}

#[test]
fn compiling_candidates_in_parallel_changes_nothing_but_time() {
    let dir = temp_dir("tune-parallel");
    let model = kiln::load_model(&gpt2()).unwrap();
    let c = kiln::Compiler::new("cpu").lower(&model).unwrap();
    let run = |parallel: bool| {
        let opts = TuneOptions {
            db: dir.join(format!("db-{parallel}.jsonl")),
            trials: 4,
            strategy: Strategy::Random,
            seed: 3,
            confirm_rounds: 0,
            parallel_compile: parallel,
            ..TuneOptions::default()
        };
        kiln::tune::tune(&c, &opts, &mut |_, _| {}).unwrap()
    };
    let (on, off) = (run(true), run(false));
    // The same candidates in the same order (random search's draws do not depend on times).
    let knobs = |r: &kiln::tune::TuneReport| r.kernels.iter().map(|k| k.knobs.clone()).collect::<Vec<_>>();
    assert_eq!(knobs(&on), knobs(&off));
    assert_eq!(off.compiled_ahead, 0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores >= 2 {
        assert!(on.compiled_ahead > 0, "nothing was compiled ahead on {cores} cores");
    }
}

#[test]
fn the_cpu_estimate_counts_vectors_and_spilled_register_tiles() {
    use kiln::tune::estimate::kernel_cost;
    use kiln_ir::kernel::{Buffer, Idx, Kernel, Knobs, Level, Stmt, UnOp, Val};
    use kiln_ir::{DType, Dim};
    let buf =
        |name: &str| Buffer { name: name.into(), dtype: DType::F32, shape: vec![Dim::sym("N")], level: Level::Global };
    let relu = Kernel {
        name: "relu".into(),
        buffers: vec![buf("x"), buf("y")],
        inputs: 1,
        operands: vec![0],
        locals: vec![],
        body: vec![Stmt::For {
            var: 0,
            extent: Idx::Dim { buf: 1, axis: 0 },
            parallel: true,
            body: vec![Stmt::Store {
                buf: 1,
                index: vec![Idx::Var(0)],
                value: Val::Un(UnOp::Relu, Box::new(Val::Load { buf: 0, index: vec![Idx::Var(0)] })),
            }],
        }],
        knobs: Knobs::default(),
    };
    // 1024 elements in vectors of 16: 64 loads, ops, stores and iterations.
    let c = kernel_cost(&relu, &[vec![1024], vec![1024]], 16, 32).unwrap();
    assert_eq!((c.loads, c.stores, c.flops, c.iterations), (64.0, 64.0, 64.0, 64.0));
    let narrow = kernel_cost(&relu, &[vec![1024], vec![1024]], 8, 32).unwrap();
    assert!((narrow.cycles - 2.0 * c.cycles).abs() < 1e-9);
    assert_eq!(kernel_cost(&relu, &[vec![0], vec![0]], 16, 32).unwrap().cycles, 0.0);
    assert!(kernel_cost(&relu, &[vec![4]], 16, 32).unwrap_err().contains("1 shapes for 2 buffers"));

    // A MatMul's register tile: 8 × 2 vectors fit 32 registers; 8 × 4 vectors do not and spill.
    let mut g = kiln::GraphBuilder::new("matmul");
    let x = g.input("x", kiln::TensorType::new(kiln::DType::F32, vec![Dim::Known(256), Dim::Known(512)])).unwrap();
    let w = g.constant("w", kiln::Tensor::from_f32(&[512, 512], values(512 * 512, 3)));
    let y = g.op("MatMul", &[x, w]).unwrap();
    g.output(y, "y").unwrap();
    let m = kiln::Compiler::new("cpu").lower(&g.finish().unwrap()).unwrap();
    let module = m.module();
    let (o, name) = kiln_targets::native::launched_kernels(module).into_iter().next().unwrap();
    let shapes = [vec![256, 512], vec![512, 512], vec![256, 512]];
    let cost = |rows: usize, cols: usize| {
        let s = kiln_passes::lower::Schedule {
            matmul_mma_rows: rows,
            mma_cols: cols,
            ..kiln_passes::lower::Schedule::for_vectors(16, 32)
        };
        let k = kiln_passes::lower::lower_with(module, o, &name, &s).unwrap();
        kernel_cost(&k, &shapes, 16, 32).unwrap()
    };
    let (fits, spills, small) = (cost(8, 32), cost(8, 64), cost(1, 16));
    assert_eq!(fits.spills, 0.0);
    assert!(spills.spills > 0.0);
    // Every tile does the same FMAs; a 1 × 1 tile loads a B vector per FMA.
    assert!(small.loads > 2.0 * fits.loads, "{small:?} vs {fits:?}");
    assert!(fits.cycles < small.cycles && fits.cycles < spills.cycles, "{fits:?} {small:?} {spills:?}");
}

#[test]
fn learned_search_on_npu_is_reproducible_and_beats_random_search_in_half_the_trials() {
    let dir = temp_dir("tune-learned");
    let model = kiln::load_model(&gpt2()).unwrap();
    let c = kiln::Compiler::new("npu").npu_config(kiln::NpuConfig::preset("davinci").unwrap()).lower(&model).unwrap();
    let trials = 8;
    let run = |db: &str, strategy| {
        let opts = TuneOptions { db: dir.join(db), trials, strategy, seed: 0, ..TuneOptions::default() };
        kiln::tune::tune(&c, &opts, &mut |_, _| {}).unwrap()
    };
    let (a, b, random) =
        (run("a.jsonl", Strategy::Learned), run("b.jsonl", Strategy::Learned), run("r.jsonl", Strategy::Random));
    // The same seed measures the same candidates in the same order, with the same cycles.
    let strip = |db: &str| -> Vec<(String, String, Option<u64>)> {
        records(&dir.join(db))
            .into_iter()
            .map(|r| (r.workload, serde_json::to_string(&r.knobs).unwrap(), r.result.sim_cycles))
            .collect()
    };
    assert_eq!(strip("a.jsonl"), strip("b.jsonl"));
    assert_eq!(a.measured, b.measured);
    // Candidates the target cannot build are never measured by the learned search.
    assert!(a.kernels.iter().all(|k| k.failed == 0), "{:?}", a.kernels.iter().map(|k| k.failed).collect::<Vec<_>>());
    // The whole model's cycles with each kernel's best after half the learned trials are at
    // most those with random search's best after all of them.
    let total = |r: &kiln::tune::TuneReport, n: usize| -> f64 {
        r.kernels
            .iter()
            .filter_map(|k| {
                let b = k.best_so_far.get(n.min(k.best_so_far.len()).checked_sub(1)?)?;
                Some(*b * k.instances as f64)
            })
            .sum()
    };
    let (learned_half, random_all) = (total(&a, trials / 2), total(&random, trials));
    assert!(learned_half > 0.0 && learned_half <= random_all, "learned {learned_half} vs random {random_all}");
}

#[test]
fn cpu_records_name_their_clock_and_remeasure_measures_given_schedules_again() {
    let dir = temp_dir("tune-clock");
    let db = dir.join("db.jsonl");
    let model = gpt2();
    let out = kiln(&[
        "tune",
        model.to_str().unwrap(),
        "--target",
        "cpu",
        "--threads",
        "1",
        "--tuning-db",
        db.to_str().unwrap(),
        "--trials",
        "2",
        "--strategy",
        "random",
        "--no-model-bench",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // One thread: the thread's CPU time, recorded in every record and the report.
    assert_eq!(report["clock"], "thread_cpu", "{report}");
    let rs = records(&db);
    assert!(!rs.is_empty());
    for r in &rs {
        assert!(r.result.ok && r.result.median_ms.unwrap() > 0.0, "{r:?}");
        assert_eq!(r.result.clock.as_deref(), Some("thread_cpu"), "{r:?}");
        assert!(!r.result.estimate);
    }
    // A record written before the clock field still reads (as a wall-clock record), and
    // the database still applies.
    let mut old: serde_json::Value = serde_json::to_value(&rs[0]).unwrap();
    old["result"].as_object_mut().unwrap().remove("clock");
    let mut text = std::fs::read_to_string(&db).unwrap();
    text.push_str(&format!("{old}\n"));
    std::fs::write(&db, text).unwrap();
    let all = records(&db);
    assert_eq!(all.len(), rs.len() + 1);
    assert_eq!(all.last().unwrap().result.clock, None);
    assert!(!kiln::tune::best_of(&all, "cpu", &rs[0].target_hash).is_empty());
    // Each kernel's trial knobs are reported, in the order measured.
    let k = &report["kernels"][1];
    assert_eq!(k["trial_knobs"].as_array().unwrap().len(), k["costs"].as_array().unwrap().len(), "{k}");
    // --remeasure: the recorded schedules, and one of an unknown workload.
    let mut want: Vec<serde_json::Value> =
        rs.iter().map(|r| serde_json::json!({"workload": r.workload, "knobs": r.knobs})).collect();
    want.push(serde_json::json!({"workload": "no-such-workload", "knobs": rs[0].knobs}));
    let wf = dir.join("want.json");
    std::fs::write(&wf, serde_json::to_string(&want).unwrap()).unwrap();
    let args = |rounds: &str| {
        let mut a: Vec<String> = ["tune", model.to_str().unwrap(), "--target", "cpu", "--threads", "1", "--tuning-db"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend([db.display().to_string(), "--remeasure".into(), wf.display().to_string()]);
        a.extend(["--rounds".into(), rounds.into()]);
        a
    };
    let run = |rounds: &str| -> serde_json::Value {
        let a = args(rounds);
        let o = kiln(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let v = run("2");
    let costs = v["costs"].as_array().unwrap();
    let ests = v["estimates"].as_array().unwrap();
    assert_eq!(costs.len(), want.len());
    for (c, e) in costs.iter().zip(ests).take(rs.len()) {
        assert!(c.as_f64().unwrap() > 0.0 && e.as_f64().unwrap() > 0.0, "{v}");
    }
    assert!(costs[rs.len()].is_null() && ests[rs.len()].is_null(), "{v}");
    assert_eq!(v["clock"], "thread_cpu");
    // No database record is added by re-measuring.
    assert_eq!(records(&db).len(), rs.len() + 1);
    // Rounds 0: estimates only.
    let v0 = run("0");
    assert!(v0["costs"].as_array().unwrap().iter().all(|c| c.is_null()), "{v0}");
    assert_eq!(v0["estimates"], v["estimates"]);
    // A file that is not a list of schedules is a clear error.
    std::fs::write(&wf, "{\"workload\": 1}").unwrap();
    let a = args("1");
    let o = kiln(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("expected a JSON array"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn the_cpu_estimate_prices_cache_traffic_of_matmul_tiles() {
    use kiln::tune::estimate::{kernel_cost, kernel_cost_on, Cache, Host};
    let mut g = kiln::GraphBuilder::new("matmul");
    let x = g
        .input("x", kiln::TensorType::new(kiln::DType::F32, vec![kiln_ir::Dim::Known(256), kiln_ir::Dim::Known(1024)]))
        .unwrap();
    let w = g.constant("w", kiln::Tensor::from_f32(&[1024, 1024], values(1024 * 1024, 3)));
    let y = g.op("MatMul", &[x, w]).unwrap();
    g.output(y, "y").unwrap();
    let m = kiln::Compiler::new("cpu").lower(&g.finish().unwrap()).unwrap();
    let module = m.module();
    let (o, name) = kiln_targets::native::launched_kernels(module).into_iter().next().unwrap();
    let shapes = [vec![256, 1024], vec![1024, 1024], vec![256, 1024]];
    let cache = |name: &str, kib: f64, fill: f64| Cache {
        name: name.into(),
        capacity_bytes: kib * 1024.0,
        fill_bytes_per_cycle: fill,
    };
    let host = Host {
        lanes: 16,
        registers: 32,
        caches: vec![cache("l1", 32.0, 64.0), cache("l2", 512.0, 32.0), cache("l3", 8192.0, 8.0)],
    };
    let cost = |row_block: i64, tile_n: i64, tile_k: i64| {
        let s = kiln_passes::lower::Schedule {
            matmul_row_block: row_block,
            matmul_tile_n: tile_n,
            matmul_tile_k: tile_k,
            whole_matmul: false,
            ..kiln_passes::lower::Schedule::for_vectors(16, 32)
        };
        let k = kiln_passes::lower::lower_with(module, o, &name, &s).unwrap();
        (kernel_cost_on(&k, &shapes, &host).unwrap(), kernel_cost(&k, &shapes, 16, 32).unwrap())
    };
    // B panel tile_k × tile_n: 128 × 512 floats (256 KiB) fits the 512 KiB L2; 512 × 1024
    // (2 MiB) does not, so more of it is brought into L2 again for every row block.
    let (fits, fits_plain) = cost(64, 512, 128);
    let (spills, _) = cost(64, 1024, 512);
    assert!(spills.traffic[1] > 2.0 * fits.traffic[1], "{fits:?}\n{spills:?}");
    assert!(fits.memory > 0.0 && fits.cycles > fits.compute, "{fits:?}");
    // Without caches, the instructions alone (what the estimate was before).
    assert_eq!((fits_plain.memory, fits_plain.traffic), (0.0, [0.0; 3]));
    assert!((fits_plain.cycles - fits.compute).abs() < 1e-6 * fits.compute, "{fits_plain:?} {fits:?}");
    // Smaller row blocks bring each B panel into L2 more often; the whole MatMul (6 MiB)
    // fits the 8 MiB L3 and comes from memory once either way.
    let (small_rows, _) = cost(16, 512, 128);
    assert!(small_rows.traffic[1] > 2.0 * fits.traffic[1], "{small_rows:?}\n{fits:?}");
    assert_eq!(small_rows.traffic[2], fits.traffic[2]);
    // A, B, C and the packed B panel (tile_k × the register tile's 32 columns), once.
    assert_eq!(fits.traffic[2], 4.0 * (256.0 * 1024.0 + 1024.0 * 1024.0 + 256.0 * 1024.0 + 128.0 * 32.0));
    // The host's description: its caches fastest first, filled at the next level's bandwidth.
    let h = Host::from_machine(&kiln_targets::lookup("cpu").unwrap().machine(), 16);
    assert_eq!(h.caches.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["l1", "l2", "l3"]);
    assert!(h.caches.windows(2).all(|w| w[0].capacity_bytes < w[1].capacity_bytes));
}

/// `kiln tune` of the GPT-2 block on rvv with `qemu` as the emulator.
fn tune_rvv(db: &Path, qemu: Option<&Path>, trials: &str) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(["tune", gpt2().to_str().unwrap(), "--target", "rvv", "--tuning-db", db.to_str().unwrap()]);
    cmd.args(["--trials", trials]);
    if let Some(q) = qemu {
        cmd.env("KILN_QEMU_RISCV64", q);
    }
    cmd.output().unwrap()
}

#[test]
fn tuning_on_rvv_records_estimates_and_never_chooses_a_schedule_wrong_under_qemu() {
    let dir = temp_dir("tune-rvv");
    let db = dir.join("db.jsonl");
    let out = tune_rvv(&db, None, "3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Printed and recorded as estimates, not measurements.
    assert!(
        text.contains("costs are ESTIMATES") && text.contains("est. cycles") && text.contains("an estimate"),
        "{text}"
    );
    let rs = records(&db);
    assert!(!rs.is_empty());
    for r in &rs {
        assert_eq!(r.target, "rvv");
        assert!(r.result.ok && r.result.estimate, "{r:?}");
        assert!(r.result.est_cycles.unwrap() > 0.0 && r.result.median_ms.is_none(), "{r:?}");
    }
    let line = std::fs::read_to_string(&db).unwrap();
    assert!(line.lines().next().unwrap().contains("\"estimate\":true"), "{line}");
    // Some workload's best differs from the default (the estimate sees the knobs), and a
    // compile with the database applies it (rvv, deterministic).
    let best = kiln::tune::best_of(&rs, "rvv", &rs[0].target_hash);
    assert!(!best.is_empty());
    // An emulator that runs nothing: every chosen candidate's check fails, each is recorded as
    // failed (the next best is checked then), and none is ever chosen.
    let fake = dir.join("fake-qemu");
    std::fs::write(&fake, "#!/bin/sh\nexit 3\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let bad = dir.join("bad.jsonl");
    let out = tune_rvv(&bad, Some(&fake), "2");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rs = records(&bad);
    let failed: Vec<&Record> = rs.iter().filter(|r| !r.result.ok).collect();
    let ok: Vec<&Record> = rs.iter().filter(|r| r.result.ok).collect();
    assert!(!ok.is_empty());
    assert_eq!(failed.len(), ok.len(), "each estimated candidate was checked and failed");
    assert!(failed.iter().all(|r| r.result.error.as_deref().unwrap_or("").contains("rvv")), "{failed:?}");
    assert!(kiln::tune::best_of(&rs, "rvv", &rs[0].target_hash).is_empty());
    // A resumed run keeps them failed and checks nothing again.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["tune", gpt2().to_str().unwrap(), "--target", "rvv", "--tuning-db", bad.to_str().unwrap()])
        .args(["--trials", "2", "--resume"])
        .env("KILN_QEMU_RISCV64", &fake)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(records(&bad).len(), rs.len());
    // No emulator at all is an error, not a failed candidate.
    let out = tune_rvv(&dir.join("none.jsonl"), Some(&dir.join("no-such-qemu")), "1");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `kiln tune --rvv-vlen`: the estimates are for that VLEN (its description, so its records'
/// target hash differs from the default 256's); on another target the flag is refused.
#[test]
fn tune_takes_the_rvv_vlen_and_refuses_it_elsewhere() {
    let dir = temp_dir("tune-rvv-vlen");
    let db = dir.join("db.jsonl");
    let model = gpt2();
    let out = kiln(&[
        "tune",
        model.to_str().unwrap(),
        "--target",
        "cpu",
        "--rvv-vlen",
        "128",
        "--tuning-db",
        db.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--rvv-vlen applies to --target rvv"), "{err}");
    assert!(!db.exists(), "a refused run writes no database");
    let hash = |vlen: u32| {
        let t = kiln_targets::TargetOptions { rvv_vlen: vlen, ..Default::default() };
        kiln::tune::target_hash(&*kiln_targets::lookup_with("rvv", &t).unwrap())
    };
    assert_ne!(hash(128), hash(256), "records of different VLENs must not mix");
}

/// A record of `knobs` for workload `w` costing `cost` ms (`None`: a failed measurement).
fn record(w: &str, knobs: &kiln_passes::lower::Schedule, cost: Option<f64>) -> Record {
    Record {
        workload: w.into(),
        target: "cpu".into(),
        target_hash: "h".into(),
        knobs: knobs.clone(),
        result: Outcome {
            ok: cost.is_some(),
            median_ms: cost,
            sim_cycles: None,
            est_cycles: None,
            estimate: false,
            clock: cost.map(|_| "wall".into()),
            error: cost.is_none().then(|| "wrong result".into()),
        },
        kiln_version: "0".into(),
        time: String::new(),
    }
}

/// `best_of` (what `--tuning-db` applies) takes each schedule's median, not its luckiest
/// reading: the middle one of an odd count, the mean of the middle two of an even one; a
/// failed measurement rules a schedule out; other machines' records do not count; ties go to
/// the schedule recorded first.
#[test]
fn best_of_takes_each_schedules_median_not_its_luckiest_measurement() {
    let a = kiln_passes::lower::Schedule::for_machine(&kiln_targets::lookup("cpu").unwrap().machine());
    let b = kiln_passes::lower::Schedule { matmul_tile_k: a.matmul_tile_k * 2, ..a.clone() };
    let c = kiln_passes::lower::Schedule { matmul_tile_k: a.matmul_tile_k * 4, ..a.clone() };
    let d = kiln_passes::lower::Schedule { matmul_tile_k: a.matmul_tile_k * 8, ..a.clone() };
    // `a` read 1.0 once (lucky) but 3.0 twice; `b` 2.0 and 2.1; `c` was cheapest but failed
    // once; another machine's record and another workload's are not counted.
    let mut rs = vec![
        record("w", &a, Some(1.0)),
        record("w", &b, Some(2.0)),
        record("w", &a, Some(3.0)),
        record("w", &c, Some(0.5)),
        record("w", &a, Some(3.0)),
        record("w", &b, Some(2.1)),
        record("w", &c, None),
        record("v", &c, Some(0.1)),
    ];
    rs.push(Record { target_hash: "other".into(), ..record("w", &c, Some(0.01)) });
    let best = best_of(&rs, "cpu", "h");
    assert_eq!(best["w"], b);
    assert_eq!(best["v"], c);
    // Ties: the schedule recorded first.
    let tie = best_of(&[record("w", &b, Some(2.0)), record("w", &a, Some(2.0))], "cpu", "h");
    assert_eq!(tie["w"], b);
    // `a`'s readings against one of `d`: the median is the middle one of an odd count (5, 1,
    // 3 → 3.0) and the mean of the middle two of an even one (4, 1, 2, 10 → 3.0): `d` wins
    // just below it and loses just above (so not the least, the largest or the mean reading).
    let race = |readings: &[f64], other: f64| {
        let rs: Vec<Record> =
            readings.iter().map(|&x| record("u", &a, Some(x))).chain([record("u", &d, Some(other))]).collect();
        best_of(&rs, "cpu", "h")["u"].clone()
    };
    for readings in [&[5.0, 1.0, 3.0][..], &[4.0, 1.0, 2.0, 10.0]] {
        assert_eq!(race(readings, 2.95), d, "{readings:?}");
        assert_eq!(race(readings, 3.05), a, "{readings:?}");
    }
}
