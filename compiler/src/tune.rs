//! Kernel autotuning (`kiln tune`): per kernel, search the lowering's schedule knobs
//! ([`Schedule`]) by measuring candidates on the target, keep every measurement in a tuning
//! database, and compile with the best known schedule per kernel (`--tuning-db`).
//!
//! - **Search space**: a [`Schedule`]'s knobs (register-tile columns and rows per contraction
//!   kind, attention's query block, MatMul's row block and cache tiles, Softmax's stored terms,
//!   and on matrix-unit machines the whole-matrix GEMM), each over a few values, with the
//!   target's validity rules (a register tile fits the vector register file). A candidate is
//!   lowered first: two candidates that lower to the same kernel are one point, measured once,
//!   so knobs a kernel does not read cost no trials.
//! - **Workloads**: kernels are keyed by [`workload_key`]; repeated blocks are tuned once.
//! - **Measurement**: `cpu`: the kernel JIT-compiled alone, run on seeded random operands
//!   (the model's constants for weights), its outputs checked against the default schedule's
//!   (a wrong result is a failed trial, never chosen), then timed warm: the median of at least
//!   7 runs and 30 ms. `npu`: the kernel compiled for the NPU and simulated; the cost is
//!   simulated cycles, outputs checked against the kernel-dialect evaluator.
//! - **Search**: `random` samples the space (the baseline); `learned` (the default) is an
//!   evolutionary search ranked by a cost model. Its pool of candidates grows each trial by
//!   mutations of the best measured and the best predicted ones and a few random points; each
//!   distinct kernel in it gets the target's **static estimate** (npu: [`kiln_npu::estimate`]
//!   of the compiled program, per-pipe work with an overlap model; cpu: [`estimate`], vector
//!   instructions by class over the loop nest), and the unmeasured candidate predicted
//!   cheapest is measured next. The prediction is the estimate's log-ratio to the workload's
//!   default plus a ridge correction on the estimate's parts and the knobs (as log-ratios to
//!   the default), learned online from measured log-ratios: one model for all the workloads
//!   of a run, plus a fit of each workload's own residuals once it has a few. Candidates the
//!   target cannot build (the estimate fails) are never measured. Both start with the
//!   default schedule.
//! - **Database**: JSON lines, one record per measurement ([`Record`], ../shared/CLI.md),
//!   appended and flushed as each is made, so an interrupted run loses nothing. A candidate
//!   already recorded is never measured again; with `resume`, recorded trials count toward
//!   each workload's budget, so an interrupted run continues where it stopped.
//! - **Applying**: [`load_best`] reads the database (records of the same target and machine
//!   description hash) and gives the best schedule per workload: compiling with it is
//!   deterministic and measures nothing.

pub mod estimate;

use crate::{CompiledModel, Error};
use kiln_ir::ir::OpId;
use kiln_ir::kernel::Kernel;
use kiln_ir::{DType, Dim, Module, Tensor};
use kiln_passes::lower::{fnv1a, workload_key, Schedule};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

thread_local! {
    /// Measurements made by this thread (what a compile with a database must not add to).
    /// Per thread: measuring happens on the thread that calls [`tune`] / [`remeasure`], and
    /// a count per thread is not disturbed by tuning runs on other threads (tests in one
    /// process).
    static MEASUREMENTS: Cell<u64> = const { Cell::new(0) };
}

fn count_measurements(n: u64) {
    MEASUREMENTS.with(|m| m.set(m.get() + n));
}

/// Number of candidate measurements made by this thread so far.
pub fn measurements() -> u64 {
    MEASUREMENTS.with(Cell::get)
}

/// How candidates are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Uniform samples of the space (the baseline).
    Random,
    /// Evolutionary search ranked by a cost model learned online.
    Learned,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Strategy, String> {
        match s {
            "random" => Ok(Strategy::Random),
            "learned" => Ok(Strategy::Learned),
            _ => Err(format!("unknown strategy '{s}' (random, learned)")),
        }
    }
}

/// Options of a tuning run.
#[derive(Clone, Debug)]
pub struct TuneOptions {
    /// The tuning database (JSON lines; created if missing, appended to).
    pub db: PathBuf,
    /// Measurements per workload.
    pub trials: usize,
    /// Wall-clock budget of the whole run (stops between measurements).
    pub budget: Option<Duration>,
    /// Count the database's records of a workload toward its trials (continue a run).
    pub resume: bool,
    pub strategy: Strategy,
    /// Seed of the random choices (a run is reproducible up to timing noise).
    pub seed: u64,
    /// Sizes of symbolic dims for measuring (`--dim`); unbound ones are 1.
    pub dims: HashMap<String, usize>,
    /// Noisy measurements (cpu): a candidate whose first measurement comes within
    /// `confirm_margin` of the best so far is measured again together with that best,
    /// interleaved, this many rounds each (0: never). A kernel's cost is the median of all its
    /// measurements, so one lucky reading does not make a kernel the best (the winner's
    /// curse). Deterministic targets (npu, rvv) never repeat a measurement.
    pub confirm_rounds: usize,
    /// The margin of `confirm_rounds`, relative to the best so far (0.05: within 5 %).
    pub confirm_margin: f64,
    /// cpu and rvv: compile (and check) the next candidate in parallel with the one about to
    /// be timed, one thread per core, before timing it ([`Measure::prepare`]). The search is
    /// the same either way (the same candidates in the same order); only its wall time differs.
    pub parallel_compile: bool,
}

impl Default for TuneOptions {
    fn default() -> TuneOptions {
        TuneOptions {
            db: PathBuf::from("kiln-tuning.jsonl"),
            trials: 32,
            budget: None,
            resume: false,
            strategy: Strategy::Learned,
            seed: 0,
            dims: HashMap::new(),
            confirm_rounds: 2,
            confirm_margin: 0.05,
            parallel_compile: true,
        }
    }
}

/// One measurement, as a line of the tuning database. A kernel measured more than once (cpu:
/// confirmations, [`TuneOptions::confirm_rounds`]) has a record per measurement; its cost is
/// their median.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub workload: String,
    pub target: String,
    /// Hash of the target's machine description (a record applies to the same machine only).
    pub target_hash: String,
    pub knobs: Schedule,
    pub result: Outcome,
    pub kiln_version: String,
    /// UTC, ISO 8601.
    pub time: String,
}

/// A measurement's result when `ok`: `median_ms` (cpu), `sim_cycles` (npu) or `est_cycles`
/// (rvv: a static estimate, not a measurement; `estimate` is then true).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub median_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sim_cycles: Option<u64>,
    /// Estimated cycles of the generated code (rvv): instructions by class over the loop nest
    /// and cache traffic ([`estimate`]).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub est_cycles: Option<f64>,
    /// The cost is a static estimate, not a measurement.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub estimate: bool,
    /// The clock `median_ms` was read from (cpu): `thread_cpu` (the measuring thread's CPU
    /// time, one thread) or `wall`. Records written before this field: wall.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub clock: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

impl Outcome {
    fn cost(&self) -> Option<f64> {
        if !self.ok {
            return None;
        }
        self.median_ms.or(self.sim_cycles.map(|c| c as f64)).or(self.est_cycles)
    }

    fn failed(error: String) -> Outcome {
        Outcome {
            ok: false,
            median_ms: None,
            sim_cycles: None,
            est_cycles: None,
            estimate: false,
            clock: None,
            error: Some(error),
        }
    }
}

/// The clock a cpu measurement reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// CPU time of the measuring thread (`CLOCK_THREAD_CPUTIME_ID`): time other processes
    /// take on a shared machine is not counted. Valid when the kernel runs on this thread
    /// alone (one thread).
    ThreadCpu,
    /// Wall time (several threads: the workers' time is not the caller's).
    Wall,
}

impl Clock {
    /// Thread CPU time for one thread (where the OS has it), wall time otherwise.
    pub fn for_threads(threads: usize) -> Clock {
        if threads <= 1 && thread_cpu_ns().is_some() {
            Clock::ThreadCpu
        } else {
            Clock::Wall
        }
    }

    /// The name recorded in [`Outcome::clock`].
    pub fn name(self) -> &'static str {
        match self {
            Clock::ThreadCpu => "thread_cpu",
            Clock::Wall => "wall",
        }
    }

    /// Milliseconds `f` takes on this clock.
    fn time<E>(self, f: impl FnOnce() -> Result<(), E>) -> Result<f64, E> {
        match self {
            Clock::ThreadCpu => {
                let a = thread_cpu_ns().unwrap_or(0);
                f()?;
                Ok(thread_cpu_ns().unwrap_or(0).saturating_sub(a) as f64 * 1e-6)
            }
            Clock::Wall => {
                let t = Instant::now();
                f()?;
                Ok(t.elapsed().as_secs_f64() * 1e3)
            }
        }
    }
}

/// This thread's CPU time in nanoseconds (Linux: `clock_gettime(CLOCK_THREAD_CPUTIME_ID)`).
#[cfg(target_os = "linux")]
fn thread_cpu_ns() -> Option<u64> {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec (64-bit time_t and long on Linux's 64-bit
    // ABIs, the only ones kiln builds for).
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_ns() -> Option<u64> {
    None
}

/// What tuning did for one workload.
#[derive(Clone, Debug)]
pub struct KernelReport {
    /// The first kernel of the model with this workload, and how many kernels share it.
    pub kernel: String,
    pub instances: usize,
    pub workload: String,
    /// Cost unit: "ms" or "cycles".
    pub unit: &'static str,
    pub default_cost: Option<f64>,
    pub best_cost: Option<f64>,
    pub best: Schedule,
    /// Distinct kernels measured for this workload (this run's and the database's earlier
    /// ones), and how many of them failed.
    pub trials: usize,
    pub failed: usize,
    /// After each of this run's trials, in order: the cost of the kernel chosen then (the
    /// cheapest by its median measurement; confirmations can raise it, so not monotone on cpu).
    pub best_so_far: Vec<f64>,
    /// After each trial, which of this run's trials measured the kernel chosen then (an index
    /// into `measured`; `None`: a kernel of the database's earlier records).
    pub chosen: Vec<Option<usize>>,
    /// Measurements repeated to confirm a candidate against the best so far (not trials).
    pub repeats: usize,
    /// Each of this run's trials (a new kernel's first measurement): its cost (`None`: failed)
    /// and the static estimate's ratio to the default's (`None`: no estimate).
    pub measured: Vec<(Option<f64>, Option<f64>)>,
    /// Per measurement, the estimate of the instructions alone (no cache traffic) relative
    /// to the default's, and the candidate's knobs.
    pub estimates_compute: Vec<Option<f64>>,
    pub knobs: Vec<Schedule>,
    /// Why the workload was not tuned, if it was not.
    pub skipped: Option<String>,
}

/// What a tuning run did.
#[derive(Clone, Debug)]
pub struct TuneReport {
    pub target: String,
    pub kernels: Vec<KernelReport>,
    /// New records written by this run.
    pub measured: usize,
    /// Records of earlier runs found in the database (all targets), and unreadable lines.
    pub previous: usize,
    pub unreadable: usize,
    pub stopped_by_budget: bool,
    /// The clock cpu times were read from (`thread_cpu` or `wall`; `None` elsewhere).
    pub clock: Option<&'static str>,
    /// Candidates compiled in parallel ahead of their measurement ([`TuneOptions::parallel_compile`]).
    pub compiled_ahead: usize,
}

/// Hash of the target's machine description: records apply to the same machine only.
pub fn target_hash(t: &dyn kiln_targets::Target) -> String {
    let mut text = serde_json::to_string(&t.machine()).unwrap_or_default();
    if t.name() == "npu" {
        text.push_str(&serde_json::to_string(&kiln_targets::npu::config()).unwrap_or_default());
    }
    format!("{:016x}", fnv1a(text.as_bytes()))
}

/// Reads a tuning database: its records, and the number of lines that are not records (a
/// line cut short by a killed run, say). A missing file has no records.
pub fn read_db(path: &Path) -> Result<(Vec<Record>, usize), Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(Error::Io { path: path.display().to_string(), msg: e.to_string() }),
    };
    let mut records = Vec::new();
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Record>(line) {
            Ok(r) => records.push(r),
            Err(_) => bad += 1,
        }
    }
    Ok((records, bad))
}

/// The best schedule per workload among `records` of `target` on the machine `hash`: per
/// schedule the median of its measurements, the cheapest chosen (ties: the schedule recorded
/// first; a schedule with a failed record is never chosen).
pub fn best_of(records: &[Record], target: &str, hash: &str) -> HashMap<String, Schedule> {
    // (workload, knobs as JSON) → the schedule, its costs (`None`: failed once), first record.
    let mut groups: HashMap<(&str, String), (&Schedule, Option<Vec<f64>>, usize)> = HashMap::new();
    for (i, r) in records.iter().enumerate().filter(|(_, r)| r.target == target && r.target_hash == hash) {
        let key = (r.workload.as_str(), serde_json::to_string(&r.knobs).unwrap_or_default());
        let g = groups.entry(key).or_insert((&r.knobs, Some(Vec::new()), i));
        match (g.1.as_mut(), r.result.cost()) {
            (Some(v), Some(c)) => v.push(c),
            _ => g.1 = None,
        }
    }
    let mut best: HashMap<String, (f64, usize, Schedule)> = HashMap::new();
    for ((workload, _), (knobs, costs, first)) in groups {
        let Some(c) = costs.as_deref().filter(|v| !v.is_empty()).map(center) else { continue };
        match best.get(workload) {
            Some(&(b, bi, _)) if b < c || (b == c && bi < first) => {}
            _ => {
                best.insert(workload.to_string(), (c, first, knobs.clone()));
            }
        }
    }
    best.into_iter().map(|(k, (_, _, s))| (k, s)).collect()
}

/// The median of measurements (the mean of the middle two of an even count).
fn center(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// What a tuning run knows of one workload's kernels (by kernel identity): every measurement
/// of each, its cost (their median; `None`: a measurement failed, and the kernel is never
/// chosen), and the distinct kernels in the order they were first measured.
#[derive(Default)]
struct Known {
    samples: HashMap<String, Option<Vec<f64>>>,
    cost: HashMap<String, Option<f64>>,
    /// The first schedule measured for each kernel, and the kernel's identity.
    points: Vec<(Schedule, String)>,
}

impl Known {
    /// Adds a measurement of kernel `id` (schedule `s`); true if the kernel is new.
    fn add(&mut self, s: &Schedule, id: &str, c: Option<f64>) -> bool {
        let new = !self.samples.contains_key(id);
        if new {
            self.points.push((s.clone(), id.to_string()));
        }
        let e = self.samples.entry(id.to_string()).or_insert_with(|| Some(Vec::new()));
        match (e.as_mut(), c) {
            (Some(v), Some(c)) => v.push(c),
            _ => *e = None,
        }
        self.cost.insert(id.to_string(), e.as_deref().map(center));
        new
    }

    /// How many of the kernels failed.
    fn failed(&self) -> usize {
        self.cost.values().filter(|c| c.is_none()).count()
    }

    fn cost_of(&self, i: usize) -> Option<f64> {
        self.cost.get(&self.points[i].1).copied().flatten()
    }

    /// The cheapest kernel (ties: the first measured), but for kernel `except`.
    fn best(&self, except: Option<&str>) -> Option<(usize, f64)> {
        (0..self.points.len())
            .filter(|&i| Some(self.points[i].1.as_str()) != except)
            .filter_map(|i| self.cost_of(i).map(|c| (i, c)))
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
    }
}

/// The best known schedule per workload for `target` (as configured now), from database
/// `path`: what `--tuning-db` applies. Reads the file; measures nothing.
pub fn load_best(path: &Path, target: &dyn kiln_targets::Target) -> Result<HashMap<String, Schedule>, Error> {
    if !path.exists() {
        return Err(Error::Io { path: path.display().to_string(), msg: "no such tuning database".into() });
    }
    let (records, _) = read_db(path)?;
    Ok(best_of(&records, target.name(), &target_hash(target)))
}

/// The tuning database, opened for appending.
struct Db {
    file: std::fs::File,
    path: PathBuf,
}

impl Db {
    fn open(path: &Path) -> Result<Db, Error> {
        let io = |e: std::io::Error| Error::Io { path: path.display().to_string(), msg: e.to_string() };
        let mut file = std::fs::OpenOptions::new().create(true).append(true).read(true).open(path).map_err(io)?;
        // A line cut short by a killed run: end it, so the next record starts a line.
        let len = file.metadata().map_err(io)?.len();
        if len > 0 {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1)).map_err(io)?;
            file.read_exact(&mut last).map_err(io)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(io)?;
            }
        }
        Ok(Db { file, path: path.to_path_buf() })
    }

    /// Appends one record as one line, flushed to the file before returning.
    fn append(&mut self, r: &Record) -> Result<(), Error> {
        let mut line = serde_json::to_string(r).expect("records serialize");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(|e| Error::Io { path: self.path.display().to_string(), msg: e.to_string() })
    }
}

/// Now, as ISO 8601 UTC.
fn now_iso() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The knobs of a schedule and the values each may take on a machine.
struct Space {
    base: Schedule,
    registers: usize,
    matrix_unit: bool,
    /// Knobs that change this workload's kernel (the others are left at the base value, so
    /// no trial and no model feature is spent on them).
    active: Vec<usize>,
}

/// Number of knobs ([`Space::get`] / [`Space::set`] index them).
const KNOBS: usize = 10;

impl Space {
    fn values(&self, knob: usize) -> Vec<i64> {
        let l = self.base.lanes as i64;
        match knob {
            0 => vec![l, 2 * l, 3 * l, 4 * l],
            1..=4 => vec![1, 2, 3, 4, 6, 8],
            5 => vec![16, 32, 64, 128, 256],
            6 => vec![256, 512, 1024, 2048],
            7 => vec![32, 64, 128, 256, 512],
            8 => vec![0, 1],
            _ => {
                if self.matrix_unit {
                    vec![0, 1]
                } else {
                    vec![i64::from(self.base.whole_matmul)]
                }
            }
        }
    }

    fn get(s: &Schedule, knob: usize) -> i64 {
        match knob {
            0 => s.mma_cols as i64,
            1 => s.matmul_mma_rows as i64,
            2 => s.conv_channel_rows as i64,
            3 => s.conv_pixel_rows as i64,
            4 => s.attention_rows as i64,
            5 => s.matmul_row_block,
            6 => s.matmul_tile_n,
            7 => s.matmul_tile_k,
            8 => i64::from(s.store_row_terms),
            _ => i64::from(s.whole_matmul),
        }
    }

    fn set(s: &mut Schedule, knob: usize, v: i64) {
        match knob {
            0 => s.mma_cols = v as usize,
            1 => s.matmul_mma_rows = v as usize,
            2 => s.conv_channel_rows = v as usize,
            3 => s.conv_pixel_rows = v as usize,
            4 => s.attention_rows = v as usize,
            5 => s.matmul_row_block = v,
            6 => s.matmul_tile_n = v,
            7 => s.matmul_tile_k = v,
            8 => s.store_row_terms = v != 0,
            _ => s.whole_matmul = v != 0,
        }
    }

    /// A register tile of `rows × cols` accumulators, plus a `B` vector per column vector and a
    /// broadcast, fits the vector registers (machines without a matrix unit; an NPU's
    /// code generator checks its buffers itself).
    fn valid(&self, s: &Schedule) -> bool {
        if self.matrix_unit {
            return true;
        }
        let vecs = s.mma_cols.div_ceil(s.lanes.max(1));
        [s.matmul_mma_rows, s.conv_channel_rows, s.conv_pixel_rows, s.attention_rows]
            .iter()
            .all(|&r| r * vecs + vecs < self.registers.max(4))
    }

    /// Finds the knobs that change the kernel `lower` makes (each knob's values tried alone
    /// on the base schedule).
    /// Finds the knobs that change the kernel `lower` makes: each knob's values tried alone on
    /// the base schedule and on a few random ones (a knob may matter only once another has
    /// changed: MatMul's tiles once the whole-matrix form is off).
    fn find_active(&mut self, lower: &dyn Fn(&Schedule) -> Option<String>, rng: &mut Rng) {
        self.active = (0..KNOBS).collect();
        let mut contexts = vec![self.base.clone()];
        contexts.extend((0..6).map(|_| self.random(rng)));
        let active: Vec<usize> = (0..KNOBS)
            .filter(|&k| {
                contexts.iter().any(|ctx| {
                    let here = lower(ctx);
                    self.values(k).into_iter().any(|v| {
                        let mut s = ctx.clone();
                        Space::set(&mut s, k, v);
                        self.valid(&s) && lower(&s) != here
                    })
                })
            })
            .collect();
        self.active = active;
    }

    fn random(&self, rng: &mut Rng) -> Schedule {
        for _ in 0..1000 {
            let mut s = self.base.clone();
            for &k in &self.active {
                let vs = self.values(k);
                Space::set(&mut s, k, vs[rng.below(vs.len())]);
            }
            if self.valid(&s) {
                return s;
            }
        }
        self.base.clone()
    }

    fn mutate(&self, s: &Schedule, rng: &mut Rng) -> Schedule {
        if self.active.is_empty() {
            return s.clone();
        }
        for _ in 0..32 {
            let mut t = s.clone();
            for _ in 0..1 + rng.below(2) {
                let k = self.active[rng.below(self.active.len())];
                let vs = self.values(k);
                Space::set(&mut t, k, vs[rng.below(vs.len())]);
            }
            if self.valid(&t) && t != *s {
                return t;
            }
        }
        self.random(rng)
    }
}

/// Measures candidate kernels of one workload.
trait Measure {
    fn measure(&self, k: &Kernel) -> Result<f64, String>;
    /// The target's static cost estimate of a candidate, without running it: its cost first,
    /// then its parts (npu: [`kiln_npu::Estimate`]'s overlap and serial cycles and each pipe's
    /// work; cpu: [`estimate::KernelCost`]'s counts). An error: the candidate cannot be
    /// built for the machine (it would fail if measured).
    fn estimate(&self, k: &Kernel) -> Result<Vec<f64>, String>;
    /// What [`Measure::measure`] returns.
    fn unit(&self) -> Unit;
    /// Checks the candidate chosen as best once more where measuring did not run its code
    /// on the machine (rvv: under qemu against the reference): `Some(why)` when it is wrong
    /// (or its code cannot be built); an error when the check cannot run at all (no qemu),
    /// which says nothing of the candidate.
    fn check_best(&self, k: &Kernel) -> Result<Option<String>, kiln_targets::TargetError> {
        let _ = k;
        Ok(None)
    }
    /// Measures `ks` again together: `rounds` rounds, each measuring every kernel once in a
    /// rotated order (interleaved, so that a slow spell of the machine falls on all of them);
    /// per kernel its measurements in round order. Deterministic measurers measure once.
    fn measure_rounds(&self, ks: &[Kernel], rounds: usize) -> Vec<Result<Vec<f64>, String>> {
        let _ = rounds;
        ks.iter().map(|k| self.measure(k).map(|c| vec![c])).collect()
    }
    /// [`Measure::measure_rounds`], per kernel the median over the rounds.
    fn measure_interleaved(&self, ks: &[Kernel], rounds: usize) -> Vec<Result<f64, String>> {
        self.measure_rounds(ks, rounds).into_iter().map(|r| r.map(|v| center(&v))).collect()
    }
    /// Whether measuring the same kernel twice can give different costs (cpu time).
    fn noisy(&self) -> bool {
        false
    }
    /// Gets the kernels of `ks` ready to measure, in parallel where that pays (cpu: JIT
    /// compilation and the output check, one thread per core), so that compiling never runs
    /// while a kernel is timed. Only a speed-up: measuring a kernel not prepared builds it.
    fn prepare(&self, ks: &[Kernel]) {
        let _ = ks;
    }
    /// How many kernels [`Measure::prepare`] compiled in parallel so far.
    fn prepared(&self) -> usize {
        0
    }
}

/// What a measurer's cost is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Unit {
    /// Milliseconds on a clock (cpu).
    Ms(Clock),
    /// Simulated cycles (npu).
    SimCycles,
    /// Statically estimated cycles (rvv).
    EstCycles,
}

/// A measurement as recorded.
fn outcome(r: &Result<f64, String>, unit: Unit) -> Outcome {
    let mut o = match r {
        Ok(_) => Outcome::failed(String::new()),
        Err(e) => return Outcome::failed(e.clone()),
    };
    let c = *r.as_ref().expect("ok above");
    o.ok = true;
    o.error = None;
    match unit {
        Unit::Ms(clock) => {
            o.median_ms = Some(c);
            o.clock = Some(clock.name().to_string());
        }
        Unit::SimCycles => o.sim_cycles = Some(c as u64),
        Unit::EstCycles => {
            o.est_cycles = Some(c);
            o.estimate = true;
        }
    }
    o
}

fn close(got: &[f32], want: &[f32]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} output values, expected {}", got.len(), want.len()));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= 1e-4 + 1e-3 * w.abs() || (g.is_nan() && w.is_nan()) || g == w;
        if !ok {
            return Err(format!("wrong result: element {i} is {g}, expected {w}"));
        }
    }
    Ok(())
}

/// `cpu`: time of the kernel JIT-compiled alone (thread CPU time on one thread, else wall).
struct CpuMeasure {
    operands: Vec<Tensor>,
    reference: Vec<Tensor>,
    host: estimate::Host,
    clock: Clock,
    /// Kernels compiled and checked already (by [`Measure::prepare`], or measured lately), by
    /// [`kernel_id`], oldest first; at most [`CpuMeasure::KEEP`].
    built: std::cell::RefCell<Vec<(String, std::rc::Rc<Built>)>>,
    /// Kernels compiled by [`Measure::prepare`] (in parallel).
    prepared: std::cell::Cell<usize>,
}

/// A candidate JIT-compiled, run once and checked against the reference, or why not.
type Built = Result<kiln_targets::native::NativeKernel, String>;

/// `k` compiled, run once on `operands` and checked against `reference`.
fn compile_checked(k: &Kernel, operands: &[Tensor], reference: &[Tensor]) -> Built {
    let nk = kiln_targets::native::NativeKernel::compile(k.clone()).map_err(|e| e.to_string())?;
    let refs: Vec<&Tensor> = operands.iter().collect();
    let out = nk.run(&refs).map_err(|e| e.to_string())?;
    check_outputs(&out, reference)?;
    Ok(nk)
}

impl CpuMeasure {
    fn new(
        m: &Module,
        o: OpId,
        default: &Kernel,
        dims: &HashMap<String, usize>,
        seed: u64,
        host: estimate::Host,
    ) -> Result<CpuMeasure, String> {
        let operands = operand_tensors(m, o, dims, seed)?;
        let k = kiln_targets::native::NativeKernel::compile(default.clone()).map_err(|e| e.to_string())?;
        let refs: Vec<&Tensor> = operands.iter().collect();
        let reference = k.run(&refs).map_err(|e| e.to_string())?;
        let clock = Clock::for_threads(kiln_targets::native::threads());
        // The default's kernel is built and checked (it made the reference).
        let built = vec![(kernel_id(default), std::rc::Rc::new(Ok(k)))];
        Ok(CpuMeasure {
            operands,
            reference,
            host,
            clock,
            built: std::cell::RefCell::new(built),
            prepared: std::cell::Cell::new(0),
        })
    }

    /// Compiled kernels kept for measuring again (the best so far is confirmed against often).
    const KEEP: usize = 8;

    /// `k` compiled, run once and checked against the default schedule's outputs: kept from
    /// [`Measure::prepare`] or an earlier call, else compiled now.
    fn checked(&self, k: &Kernel) -> std::rc::Rc<Built> {
        let key = kernel_id(k);
        let mut built = self.built.borrow_mut();
        let b = match built.iter().position(|(x, _)| *x == key) {
            Some(i) => built.remove(i).1,
            None => std::rc::Rc::new(compile_checked(k, &self.operands, &self.reference)),
        };
        built.push((key, b.clone()));
        if built.len() > Self::KEEP {
            built.remove(0);
        }
        b
    }

    /// [`CpuMeasure::checked`]'s kernel, or its error.
    fn with_checked<T>(
        &self,
        k: &Kernel,
        f: impl FnOnce(&kiln_targets::native::NativeKernel) -> Result<T, String>,
    ) -> Result<T, String> {
        match &*self.checked(k) {
            Ok(nk) => f(nk),
            Err(e) => Err(e.clone()),
        }
    }

    /// The median time of warm runs: 2 warm-up runs, then at least 7 and 30 ms of runs.
    fn time(&self, nk: &kiln_targets::native::NativeKernel) -> Result<f64, String> {
        let refs: Vec<&Tensor> = self.operands.iter().collect();
        for _ in 0..2 {
            nk.run(&refs).map_err(|e| e.to_string())?;
        }
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 7 || (start.elapsed() < Duration::from_millis(30) && times.len() < 10_000) {
            times.push(self.clock.time(|| nk.run(&refs).map(|_| ()).map_err(|e| e.to_string()))?);
        }
        Ok(median(&mut times))
    }

    /// The estimate's input: `k`'s buffers' shapes on the operands.
    fn shapes(&self, k: &Kernel) -> Result<Vec<Vec<usize>>, String> {
        let inputs: Vec<&Tensor> = k.operands.iter().map(|&j| &self.operands[j]).collect();
        let mut shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape.clone()).collect();
        shapes.extend(kiln_targets::native::kernel_output_shapes(k, &inputs).map_err(|e| e.to_string())?);
        Ok(shapes)
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn check_outputs(out: &[Tensor], reference: &[Tensor]) -> Result<(), String> {
    if out.len() != reference.len() {
        return Err(format!("{} outputs, expected {}", out.len(), reference.len()));
    }
    for (g, w) in out.iter().zip(reference) {
        match (g.as_f32(), w.as_f32()) {
            (Some(g), Some(w)) => close(g, w)?,
            _ if g == w => {}
            _ => return Err("wrong result".into()),
        }
    }
    Ok(())
}

impl Measure for CpuMeasure {
    fn measure(&self, k: &Kernel) -> Result<f64, String> {
        self.with_checked(k, |nk| self.time(nk))
    }

    /// Compiles and checks the kernels of `ks` not built yet, in parallel (one thread per
    /// core): nothing is being timed meanwhile, and the measurements that follow find them
    /// built.
    fn prepare(&self, ks: &[Kernel]) {
        let have: HashSet<String> = self.built.borrow().iter().map(|(x, _)| x.clone()).collect();
        let mut todo: Vec<(String, &Kernel)> = Vec::new();
        for k in ks {
            let key = kernel_id(k);
            if !have.contains(&key) && !todo.iter().any(|(x, _)| *x == key) {
                todo.push((key, k));
            }
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if todo.len() < 2 || cores < 2 {
            return; // nothing to overlap: built when measured
        }
        todo.truncate(cores.min(Self::KEEP / 2));
        let (operands, reference) = (&self.operands, &self.reference);
        let done: Vec<(String, Built)> = std::thread::scope(|sc| {
            let hs: Vec<_> = todo
                .into_iter()
                .map(|(key, k)| sc.spawn(move || (key, compile_checked(k, operands, reference))))
                .collect();
            hs.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        self.prepared.set(self.prepared.get() + done.len());
        let mut built = self.built.borrow_mut();
        for (key, b) in done {
            built.push((key, std::rc::Rc::new(b)));
        }
        while built.len() > Self::KEEP {
            built.remove(0);
        }
    }

    fn estimate(&self, k: &Kernel) -> Result<Vec<f64>, String> {
        Ok(estimate::kernel_cost_on(k, &self.shapes(k)?, &self.host)?.to_vec())
    }

    fn unit(&self) -> Unit {
        Unit::Ms(self.clock)
    }

    fn noisy(&self) -> bool {
        true
    }

    fn prepared(&self) -> usize {
        self.prepared.get()
    }

    fn measure_rounds(&self, ks: &[Kernel], rounds: usize) -> Vec<Result<Vec<f64>, String>> {
        let built: Vec<std::rc::Rc<Built>> = ks.iter().map(|k| self.checked(k)).collect();
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); ks.len()];
        let mut errors: Vec<Option<String>> = vec![None; ks.len()];
        for r in 0..rounds.max(1) {
            for j in 0..ks.len() {
                let i = (j + r) % ks.len();
                if let (Ok(nk), None) = (&*built[i], &errors[i]) {
                    match self.time(nk) {
                        Ok(t) => times[i].push(t),
                        Err(e) => errors[i] = Some(e),
                    }
                }
            }
        }
        built
            .into_iter()
            .zip(times.iter_mut().zip(errors))
            .map(|(b, (t, e))| match (&*b, e) {
                (Err(e), _) => Err(e.clone()),
                (_, Some(e)) => Err(e),
                (Ok(_), None) => Ok(std::mem::take(t)),
            })
            .collect()
    }
}

/// `npu`: simulated cycles of the kernel's NPU program.
struct NpuMeasure {
    cfg: kiln_npu::NpuConfig,
    shapes: Vec<Vec<usize>>,
    inputs: Vec<Vec<f32>>,
    reference: Vec<Vec<f32>>,
    n_inputs: usize,
}

impl NpuMeasure {
    fn new(
        m: &Module,
        o: OpId,
        default: &Kernel,
        dims: &HashMap<String, usize>,
        seed: u64,
    ) -> Result<NpuMeasure, String> {
        let operands = operand_tensors(m, o, dims, seed)?;
        let mut shapes = Vec::new();
        let mut inputs = Vec::new();
        for j in 0..default.inputs {
            let t = &operands[default.operands[j]];
            let v =
                t.as_f32().ok_or_else(|| format!("input {j} is {}; the NPU tuner measures f32 kernels", t.dtype()))?;
            shapes.push(t.shape.clone());
            inputs.push(v.to_vec());
        }
        let refs: Vec<&Tensor> = (0..default.inputs).map(|j| &operands[default.operands[j]]).collect();
        let outs = kiln_targets::native::kernel_output_shapes(default, &refs).map_err(|e| e.to_string())?;
        shapes.extend(outs);
        let mut buffers: Vec<Vec<f32>> = inputs.clone();
        for s in &shapes[default.inputs..] {
            buffers.push(vec![0.0; s.iter().product()]);
        }
        kiln_npu::eval::eval_kernel(default, &shapes, &mut buffers).map_err(|e| e.to_string())?;
        let reference = buffers.split_off(default.inputs);
        Ok(NpuMeasure { cfg: kiln_targets::npu::config(), shapes, inputs, reference, n_inputs: default.inputs })
    }
}

impl Measure for NpuMeasure {
    fn measure(&self, k: &Kernel) -> Result<f64, String> {
        let p = kiln_npu::compile(k, &self.shapes, &self.cfg).map_err(|e| e.to_string())?;
        let mut buffers = self.inputs.clone();
        for s in &self.shapes[self.n_inputs..] {
            buffers.push(vec![0.0; s.iter().product()]);
        }
        let stats = kiln_npu::simulate(&p, &self.cfg, &mut buffers).map_err(|e| e.to_string())?;
        for (g, w) in buffers[self.n_inputs..].iter().zip(&self.reference) {
            close(g, w)?;
        }
        Ok(stats.cycles as f64)
    }

    fn unit(&self) -> Unit {
        Unit::SimCycles
    }

    fn estimate(&self, k: &Kernel) -> Result<Vec<f64>, String> {
        let p = kiln_npu::compile(k, &self.shapes, &self.cfg).map_err(|e| e.to_string())?;
        let e = kiln_npu::estimate::estimate_with(&p, &self.cfg, 50_000_000).map_err(|e| e.to_string())?;
        let mut v = vec![e.cycles as f64, e.serial as f64];
        v.extend(e.busy.iter().map(|&b| b as f64));
        Ok(v)
    }
}

/// The targets `kiln tune` searches, and how it measures on each.
fn check_target(target: &str) -> Result<(), Error> {
    if matches!(target, "cpu" | "npu" | "rvv") {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "kiln tune measures on cpu (thread CPU or wall time), npu (simulated cycles) and rvv (a static \
         estimate of the generated code, checked under qemu), not '{target}'"
    )))
}

fn unit_name(target: &str) -> &'static str {
    match target {
        "npu" => "cycles",
        "rvv" => "est. cycles",
        _ => "ms",
    }
}

/// The measurer of one workload on `target`.
fn make_measurer(
    target: &str,
    m: &Module,
    o: OpId,
    default: &Kernel,
    dims: &HashMap<String, usize>,
    seed: u64,
    machine: &kiln_ir::machine::MachineDescription,
) -> Result<Box<dyn Measure>, String> {
    let lanes = Schedule::for_machine(machine).lanes;
    let host = estimate::Host::from_machine(machine, lanes);
    Ok(match target {
        "npu" => Box::new(NpuMeasure::new(m, o, default, dims, seed)?),
        "rvv" => {
            Box::new(RvvMeasure { cpu: CpuMeasure::new(m, o, default, dims, seed, host)?, vlen: machine.vector_bits })
        }
        _ => Box::new(CpuMeasure::new(m, o, default, dims, seed, host)?),
    })
}

/// `rvv`: no measurement (qemu's time is not the chip's). The cost is the static estimate of
/// the kernel for rvv's description (its VLEN's lanes, 32 vector registers, its caches),
/// reported as an estimate. Every candidate's results are checked on the host first (the
/// same kernel-dialect kernel, JIT-compiled), and the best one's riscv64 code under qemu
/// ([`Measure::check_best`]).
struct RvvMeasure {
    cpu: CpuMeasure,
    vlen: u32,
}

impl Measure for RvvMeasure {
    fn measure(&self, k: &Kernel) -> Result<f64, String> {
        self.cpu.with_checked(k, |_| Ok(()))?;
        Ok(self.estimate(k)?[0])
    }

    fn prepare(&self, ks: &[Kernel]) {
        self.cpu.prepare(ks);
    }

    fn prepared(&self) -> usize {
        self.cpu.prepared()
    }

    fn estimate(&self, k: &Kernel) -> Result<Vec<f64>, String> {
        self.cpu.estimate(k)
    }

    fn unit(&self) -> Unit {
        Unit::EstCycles
    }

    fn check_best(&self, k: &Kernel) -> Result<Option<String>, kiln_targets::TargetError> {
        use kiln_targets::TargetError;
        // A tool that cannot be started says nothing of the candidate; a runner that fails
        // running it (a crash) does.
        let tool = |e: TargetError| match e {
            TargetError::Tool { ref why, .. }
                if why.starts_with("not found") || why.starts_with("cannot be started") =>
            {
                Err(e)
            }
            e => Ok(Some(format!("rvv: {e}"))),
        };
        let rk = match kiln_targets::rvv::RvvKernel::compile(k.clone(), self.vlen) {
            Ok(rk) => rk,
            Err(e) => return tool(e),
        };
        let refs: Vec<&Tensor> = self.cpu.operands.iter().collect();
        match rk.run(&refs) {
            Ok(out) => Ok(check_outputs(&out, &self.cpu.reference).err().map(|e| format!("under qemu: {e}"))),
            Err(e) => tool(e),
        }
    }
}

/// Measures given schedules of workloads of compiled model `c` again, all together:
/// `rounds` interleaved rounds per workload (each round measures every schedule of the
/// workload once, in a rotated order) and the median over rounds ([`Measure`]'s protocol:
/// cpu kernels timed warm; npu simulated and rvv estimated once, being deterministic). What
/// a fair comparison of schedules chosen by different searches needs: each search's choice
/// was the minimum of noisy single measurements. Per schedule: its cost and its static
/// estimate; `None`: the workload is not in the model, or the schedule does not lower or
/// fails (costs: also `rounds == 0`, which only estimates).
pub fn remeasure(
    c: &CompiledModel,
    wanted: &[(String, Schedule)],
    rounds: usize,
    dims: &HashMap<String, usize>,
) -> Result<Vec<(Option<f64>, Option<f64>)>, Error> {
    let target = c.target().name().to_string();
    check_target(&target)?;
    let m = c.module();
    let machine = c.target().machine();
    let mut out = vec![(None, None); wanted.len()];
    let mut done: HashSet<String> = HashSet::new();
    let mut order: Vec<String> = Vec::new();
    for (o, name) in kiln_targets::native::launched_kernels(m) {
        let key = workload_key(m, o);
        if !order.contains(&key) {
            order.push(key.clone());
        }
        if !done.insert(key.clone()) {
            continue;
        }
        let idx: Vec<usize> = (0..wanted.len()).filter(|&i| wanted[i].0 == key).collect();
        if idx.is_empty() {
            continue;
        }
        let base = Schedule::for_machine(&machine);
        let Ok(default) = kiln_passes::lower::lower_with(m, o, &name, &base) else { continue };
        let seed = (order.len() as u64 - 1).wrapping_mul(0x9e37_79b9);
        let Ok(measurer) = make_measurer(&target, m, o, &default, dims, seed, &machine) else { continue };
        let mut kernels = Vec::new();
        let mut at = Vec::new();
        for &i in &idx {
            if let Ok(k) = kiln_passes::lower::lower_with(m, o, &name, &wanted[i].1) {
                kernels.push(k);
                at.push(i);
            }
        }
        let costs = if rounds == 0 {
            vec![Err(String::new()); kernels.len()]
        } else {
            count_measurements(kernels.len() as u64);
            measurer.measure_interleaved(&kernels, rounds)
        };
        for ((i, r), k) in at.into_iter().zip(costs).zip(&kernels) {
            out[i] = (r.ok(), measurer.estimate(k).ok().and_then(|e| e.first().copied()));
        }
    }
    Ok(out)
}

/// The operands of kernel op `o`: constants as they are, other values seeded random data of
/// their type (symbolic dims bound by `dims`, else 1).
fn operand_tensors(m: &Module, o: OpId, dims: &HashMap<String, usize>, seed: u64) -> Result<Vec<Tensor>, String> {
    let mut rng = Rng(seed ^ 0x5eed);
    let mut out = Vec::new();
    for v in m.op(o).operands.iter() {
        let Some(v) = v else {
            out.push(Tensor::from_f32(&[0], vec![]));
            continue;
        };
        if let kiln_ir::ValueDef::OpResult(d, 0) = m.value(*v).def {
            if let Some(kiln_ir::Attr::Tensor(t)) =
                m.op(d).attrs.get("value").filter(|_| m.op(d).name == "graph.Constant")
            {
                out.push(t.clone());
                continue;
            }
        }
        let ty = &m.value(*v).ty;
        let shape: Vec<usize> = ty
            .shape
            .as_ref()
            .ok_or("an operand of unknown rank")?
            .iter()
            .map(|d| match d {
                Dim::Known(n) => *n as usize,
                Dim::Sym(s) => dims.get(&**s).copied().unwrap_or(1),
            })
            .collect();
        let n: usize = shape.iter().product();
        let data = match ty.dtype {
            DType::F32 => kiln_ir::Data::F32((0..n).map(|_| (rng.unit() * 2.0 - 1.0) as f32).collect()),
            DType::Bool => kiln_ir::Data::Bool((0..n).map(|_| rng.below(4) != 0).collect()),
            DType::I64 => kiln_ir::Data::I64((0..n).map(|_| rng.below(4) as i64).collect()),
            DType::I32 => kiln_ir::Data::I32((0..n).map(|_| rng.below(4) as i32).collect()),
            other => return Err(format!("operands of type {other} are not generated for tuning")),
        };
        out.push(Tensor::new(shape, data));
    }
    Ok(out)
}

/// A kernel's identity for deduplication: its text without its name.
fn kernel_id(k: &Kernel) -> String {
    format!("{:?}", Kernel { name: String::new(), ..k.clone() })
}

/// Tunes every kernel of compiled model `c` (lowered for its target) as `opts` says, appending
/// to the database; `progress` is told of each measurement (kernel, trial, best so far).
pub fn tune(
    c: &CompiledModel,
    opts: &TuneOptions,
    progress: &mut dyn FnMut(&KernelReport, usize),
) -> Result<TuneReport, Error> {
    let target = c.target().name().to_string();
    check_target(&target)?;
    let m = c.module();
    let hash = target_hash(c.target());
    let machine = c.target().machine();
    let base = Schedule::for_machine(&machine);
    let mut space = Space {
        base: base.clone(),
        registers: machine.vector_registers as usize,
        matrix_unit: machine.levels.iter().any(|l| l.software_managed) && base.whole_matmul,
        active: Vec::new(),
    };
    let (previous, unreadable) = read_db(&opts.db)?;
    let n_previous = previous.len();
    let mut db = Db::open(&opts.db)?;
    let start = Instant::now();
    let mut report = TuneReport {
        target: target.clone(),
        kernels: Vec::new(),
        measured: 0,
        previous: n_previous,
        unreadable,
        stopped_by_budget: false,
        clock: (target == "cpu").then(|| Clock::for_threads(kiln_targets::native::threads()).name()),
        compiled_ahead: 0,
    };
    // Workloads in program order, each once.
    let mut order: Vec<(String, OpId, String, usize)> = Vec::new();
    for (o, name) in kiln_targets::native::launched_kernels(m) {
        let key = workload_key(m, o);
        match order.iter_mut().find(|w| w.0 == key) {
            Some(w) => w.3 += 1,
            None => order.push((key, o, name, 1)),
        }
    }
    // The learned search's model, shared by every workload of the run.
    let mut learner = Learner::default();
    let n_est = if target == "npu" { 8 } else { estimate::KernelCost::LEN };
    for (wi, (key, o, name, instances)) in order.into_iter().enumerate() {
        let mut kr = KernelReport {
            kernel: name.clone(),
            instances,
            workload: key.clone(),
            unit: unit_name(&target),
            default_cost: None,
            best_cost: None,
            best: base.clone(),
            trials: 0,
            failed: 0,
            best_so_far: Vec::new(),
            chosen: Vec::new(),
            repeats: 0,
            measured: Vec::new(),
            estimates_compute: Vec::new(),
            knobs: Vec::new(),
            skipped: None,
        };
        let default_kernel = match kiln_passes::lower::lower_with(m, o, &name, &base) {
            Ok(k) => k,
            Err(why) => {
                kr.skipped = Some(format!("not lowered: {why}"));
                report.kernels.push(kr);
                continue;
            }
        };
        let default_id = kernel_id(&default_kernel);
        let seed = opts.seed ^ (wi as u64).wrapping_mul(0x9e37_79b9);
        let measurer = match make_measurer(&target, m, o, &default_kernel, &opts.dims, seed, &machine) {
            Ok(x) => x,
            Err(why) => {
                kr.skipped = Some(why);
                report.kernels.push(kr);
                continue;
            }
        };
        space.find_active(
            &|s| kiln_passes::lower::lower_with(m, o, &name, s).ok().map(|k| kernel_id(&k)),
            &mut Rng(seed ^ 0xac71),
        );
        // What the database knows of this workload on this machine.
        let mut known = Known::default();
        for r in previous.iter().filter(|r| r.workload == key && r.target == target && r.target_hash == hash) {
            if let Ok(k) = kiln_passes::lower::lower_with(m, o, &name, &r.knobs) {
                // A later failure of a recorded kernel (rvv: its check under qemu) wins.
                known.add(&r.knobs, &kernel_id(&k), r.result.cost());
            }
        }
        kr.trials = known.points.len();
        kr.failed = known.failed();
        // The learned search's candidates: the default and what the database knows first.
        let lower = |s: &Schedule| kiln_passes::lower::lower_with(m, o, &name, s).ok();
        let mut pool = Pool {
            cands: Vec::new(),
            ids: HashMap::new(),
            proposed: HashSet::new(),
            default_est: measurer.estimate(&default_kernel).ok(),
            n_est,
        };
        let mut local: Vec<(Vec<f64>, f64)> = Vec::new();
        let mut fed: HashSet<String> = HashSet::new();
        if opts.strategy == Strategy::Learned {
            pool.add(base.clone(), &space, &lower, &*measurer);
            for (s, _) in &known.points {
                pool.add(s.clone(), &space, &lower, &*measurer);
            }
            pool.feed(&known.cost, &default_id, &mut learner, &mut local, &mut fed);
        }
        let budget_left = if opts.resume { opts.trials.saturating_sub(known.points.len()) } else { opts.trials };
        let n_before = known.points.len();
        let mut rng = Rng(seed);
        // Random draws made ahead of their turn (to compile them early), used in order.
        let mut pending: std::collections::VecDeque<Schedule> = std::collections::VecDeque::new();
        // The learned search's runners-up of its last ranking.
        let mut ahead: Vec<Schedule> = Vec::new();
        let mut measured_here = 0;
        let mut dry = 0;
        let record = |knobs: &Schedule, result: Outcome| Record {
            workload: key.clone(),
            target: target.clone(),
            target_hash: hash.clone(),
            knobs: knobs.clone(),
            result,
            kiln_version: env!("CARGO_PKG_VERSION").to_string(),
            time: now_iso(),
        };
        while measured_here < budget_left {
            if opts.budget.is_some_and(|b| start.elapsed() >= b) {
                report.stopped_by_budget = true;
                break;
            }
            // The next candidate: the default first, then by strategy.
            let cand = if !known.cost.contains_key(&default_id) {
                base.clone()
            } else {
                match opts.strategy {
                    Strategy::Random => pending.pop_front().unwrap_or_else(|| space.random(&mut rng)),
                    Strategy::Learned => {
                        let mut top = next_learned(
                            &space,
                            &mut pool,
                            &learner,
                            &local,
                            &known.cost,
                            &mut rng,
                            &lower,
                            &*measurer,
                        );
                        if top.is_empty() {
                            space.random(&mut rng)
                        } else {
                            ahead = top.split_off(1);
                            top.remove(0)
                        }
                    }
                }
            };
            let Ok(k) = kiln_passes::lower::lower_with(m, o, &name, &cand) else {
                dry += 1;
                if dry > 500 {
                    break;
                }
                continue;
            };
            let id = kernel_id(&k);
            if known.cost.contains_key(&id) {
                // The same kernel as a measured candidate: no new point.
                dry += 1;
                if dry > 500 {
                    break; // the space is exhausted for this kernel
                }
                continue;
            }
            dry = 0;
            // The candidates after this one, compiled with it before it is timed.
            let mut batch = vec![k.clone()];
            match opts.strategy {
                Strategy::Learned => batch.extend(ahead.drain(..).filter_map(|s| lower(&s))),
                Strategy::Random => {
                    // Random search's next new kernel (its draws kept for their turn).
                    for _ in 0..64 {
                        let s = space.random(&mut rng);
                        pending.push_back(s.clone());
                        if let Some(nk) = lower(&s) {
                            let nid = kernel_id(&nk);
                            if nid != id && !known.cost.contains_key(&nid) {
                                batch.push(nk);
                                break;
                            }
                        }
                    }
                }
            }
            if opts.parallel_compile {
                measurer.prepare(&batch);
            }
            count_measurements(1);
            let r = measurer.measure(&k);
            let first = outcome(&r, measurer.unit());
            let cost = first.cost();
            db.append(&record(&cand, first))?;
            report.measured += 1;
            measured_here += 1;
            known.add(&cand, &id, cost);
            // Noisy costs: a candidate close to the best so far is measured again with it,
            // interleaved, before either counts as the better one.
            if let (Some(c), true) = (cost, opts.confirm_rounds > 0 && measurer.noisy()) {
                if let Some((bi, _)) = known.best(Some(&id)).filter(|&(_, bc)| c < bc * (1.0 + opts.confirm_margin)) {
                    let (bs, bid) = known.points[bi].clone();
                    if let Some(bk) = lower(&bs) {
                        count_measurements(2);
                        let rs = measurer.measure_rounds(&[bk, k.clone()], opts.confirm_rounds);
                        for ((s, kid), r) in [(&bs, &bid), (&cand, &id)].into_iter().zip(rs) {
                            let runs = match r {
                                Ok(v) => v.into_iter().map(Ok).collect(),
                                Err(e) => vec![Err(e)],
                            };
                            for r in runs {
                                let o = outcome(&r, measurer.unit());
                                db.append(&record(s, o.clone()))?;
                                report.measured += 1;
                                kr.repeats += 1;
                                known.add(s, kid, o.cost());
                            }
                        }
                    }
                }
            }
            if opts.strategy == Strategy::Learned {
                pool.add(cand.clone(), &space, &lower, &*measurer);
                pool.feed(&known.cost, &default_id, &mut learner, &mut local, &mut fed);
            }
            // The static estimate of every measured candidate (both strategies), relative to
            // the default's: the total, and the instructions alone.
            let est = match (&pool.default_est, measurer.estimate(&k)) {
                (Some(d), Ok(e)) if d.len() >= 2 && e.len() >= 2 => {
                    Some((e[0] / d[0].max(1e-12), e[1] / d[1].max(1e-12)))
                }
                _ => None,
            };
            kr.measured.push((cost, est.map(|e| e.0)));
            kr.estimates_compute.push(est.map(|e| e.1));
            kr.knobs.push(cand);
            kr.trials += 1;
            kr.failed = known.failed();
            let best = known.best(None);
            kr.best_so_far.push(best.map_or(f64::INFINITY, |b| b.1));
            // This run's trials are the kernels measured after the database's.
            kr.chosen.push(best.and_then(|b| b.0.checked_sub(n_before)));
            progress(&kr, opts.trials);
        }
        // Targets whose cost is not a run of the code (rvv: an estimate) check the best
        // candidate's code on the machine itself; a wrong one is recorded as failed and the
        // next best is checked.
        while let Some((i, _)) = known.best(None) {
            let (s, id) = known.points[i].clone();
            let Some(k) = lower(&s) else { break };
            match measurer.check_best(&k)? {
                None => break,
                Some(why) => {
                    db.append(&record(&s, Outcome::failed(why)))?;
                    report.measured += 1;
                    known.add(&s, &id, None);
                    kr.failed = known.failed();
                }
            }
        }
        report.compiled_ahead += measurer.prepared();
        // Default and best, from everything known.
        kr.default_cost = known.cost.get(&default_id).copied().flatten();
        if let Some((i, c)) = known.best(None) {
            kr.best = known.points[i].0.clone();
            kr.best_cost = Some(c);
        }
        report.kernels.push(kr);
        if report.stopped_by_budget {
            break;
        }
    }
    Ok(report)
}

/// Candidates compiled together before the first of them is timed ([`Measure::prepare`]):
/// the one measured now and the next the search would measure (learned: the runner-up of the
/// model's ranking; random: its next draw).
const AHEAD: usize = 2;

/// A candidate of the learned search: a schedule, its kernel's identity, and its features
/// relative to the workload's default (`None`: the target cannot build it).
struct Cand {
    sched: Schedule,
    id: String,
    x: Option<Vec<f64>>,
}

/// The learned search's state for one workload: every distinct kernel proposed so far, with
/// its static estimate.
struct Pool {
    cands: Vec<Cand>,
    ids: HashMap<String, usize>,
    /// Every schedule proposed so far (as JSON): a schedule proposed again is not lowered,
    /// identified and estimated again (most proposals of a small space are repeats).
    proposed: HashSet<String>,
    /// The default kernel's estimate (`None`: the target has none for it; ranking then uses
    /// the knobs alone).
    default_est: Option<Vec<f64>>,
    /// Length of the target's estimates.
    n_est: usize,
}

/// Features of a candidate, relative to the workload's default so that workloads share one
/// model: the log-ratios of the static estimate's parts (the cost first), then per knob the
/// log2-ratio of its value to the default's.
fn features(space: &Space, s: &Schedule, est: Option<&[f64]>, default_est: Option<&[f64]>, n_est: usize) -> Vec<f64> {
    let mut x: Vec<f64> = match (est, default_est) {
        (Some(e), Some(d)) if e.len() == n_est && d.len() == n_est => {
            e.iter().zip(d).map(|(a, b)| ((a + 1.0) / (b + 1.0)).ln()).collect()
        }
        _ => vec![0.0; n_est],
    };
    for k in 0..KNOBS {
        let (v, b) = (Space::get(s, k), Space::get(&space.base, k));
        x.push(((v.max(0) as f64 + 1.0) / (b.max(0) as f64 + 1.0)).log2());
    }
    x
}

impl Pool {
    /// Adds `s` if it lowers to a kernel not in the pool yet, estimating it.
    fn add(&mut self, s: Schedule, space: &Space, lower: &dyn Fn(&Schedule) -> Option<Kernel>, measurer: &dyn Measure) {
        if !self.proposed.insert(serde_json::to_string(&s).unwrap_or_default()) {
            return;
        }
        let Some(k) = lower(&s) else { return };
        let id = kernel_id(&k);
        if self.ids.contains_key(&id) {
            return;
        }
        let x = match &self.default_est {
            Some(d) => measurer.estimate(&k).ok().map(|e| features(space, &s, Some(&e), Some(d), self.n_est)),
            None => Some(features(space, &s, None, None, self.n_est)),
        };
        self.ids.insert(id.clone(), self.cands.len());
        self.cands.push(Cand { sched: s, id, x });
    }
}

impl Pool {
    /// Measured candidates not fed yet teach the shared model and this workload's data
    /// (`local`), once the default's cost is known.
    fn feed(
        &self,
        seen: &HashMap<String, Option<f64>>,
        default_id: &str,
        learner: &mut Learner,
        local: &mut Vec<(Vec<f64>, f64)>,
        fed: &mut HashSet<String>,
    ) {
        let Some(Some(d)) = seen.get(default_id) else { return };
        for c in &self.cands {
            if let (Some(Some(cost)), Some(x)) = (seen.get(&c.id), &c.x) {
                if fed.insert(c.id.clone()) {
                    let y = (cost.max(1e-12) / d.max(1e-12)).ln();
                    learner.add(x.clone(), y);
                    local.push((x.clone(), y));
                }
            }
        }
    }
}

/// The learned model: ridge regression of a measured cost's log-ratio to its workload's
/// default, minus the static estimate's log-ratio, on [`features`]; one model for all the
/// workloads of a run, refitted after each measurement.
#[derive(Default)]
struct Learner {
    data: Vec<(Vec<f64>, f64)>,
    w: Option<Vec<f64>>,
}

impl Learner {
    fn add(&mut self, x: Vec<f64>, log_ratio: f64) {
        let prior = x.first().copied().unwrap_or(0.0);
        self.data.push((x, log_ratio - prior));
        self.w = ridge(&self.data, 1.0);
    }

    /// Predicted log-ratio of a candidate to its workload's default.
    fn predict(&self, x: &[f64]) -> f64 {
        x.first().copied().unwrap_or(0.0) + self.w.as_ref().map_or(0.0, |w| dot(w, x))
    }
}

fn dot(w: &[f64], x: &[f64]) -> f64 {
    w.iter().zip(x).map(|(w, x)| w * x).sum()
}

/// Ridge regression without an intercept (features are relative to a default whose target is
/// zero): solves `(XᵀX + λI) w = Xᵀy`.
fn ridge(points: &[(Vec<f64>, f64)], lambda: f64) -> Option<Vec<f64>> {
    let n = points.first()?.0.len();
    if points.iter().any(|p| p.0.len() != n) {
        return None;
    }
    let mut a = vec![vec![0.0; n + 1]; n];
    for (x, y) in points {
        for i in 0..n {
            for j in 0..n {
                a[i][j] += x[i] * x[j];
            }
            a[i][n] += x[i] * y;
        }
    }
    for (i, row) in a.iter_mut().enumerate() {
        row[i] += lambda;
    }
    // Gaussian elimination with partial pivoting.
    for col in 0..n {
        let piv = (col..n).max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))?;
        a.swap(col, piv);
        let d = a[col][col];
        if d.abs() < 1e-12 {
            return None;
        }
        for r in 0..n {
            if r != col {
                let f = a[r][col] / d;
                if f != 0.0 {
                    for c in col..=n {
                        a[r][c] -= f * a[col][c];
                    }
                }
            }
        }
    }
    Some((0..n).map(|i| a[i][n] / a[i][i]).collect())
}

/// The learned strategy's next candidate: the pool grows by mutations of the best measured
/// and the best predicted candidates and by random points (an evolutionary step), then the
/// unmeasured candidate the model predicts cheapest is measured. Returns the [`AHEAD`]
/// unmeasured candidates predicted cheapest, best first (the next ones are compiled with the
/// first, [`Measure::prepare`]). The model: the static
/// estimate, corrected by the run's shared [`Learner`] and by a ridge fit of this workload's
/// own residuals once it has a few measurements.
#[allow(clippy::too_many_arguments)]
fn next_learned(
    space: &Space,
    pool: &mut Pool,
    learner: &Learner,
    local: &[(Vec<f64>, f64)],
    seen: &HashMap<String, Option<f64>>,
    rng: &mut Rng,
    lower: &dyn Fn(&Schedule) -> Option<Kernel>,
    measurer: &dyn Measure,
) -> Vec<Schedule> {
    let local_w = if local.len() >= 3 {
        let resid: Vec<(Vec<f64>, f64)> = local.iter().map(|(x, y)| (x.clone(), y - learner.predict(x))).collect();
        ridge(&resid, 2.0)
    } else {
        None
    };
    let predict = |x: &[f64]| learner.predict(x) + local_w.as_ref().map_or(0.0, |w| dot(w, x));
    let rank = |pool: &Pool, measured: bool| -> Vec<usize> {
        let mut r: Vec<(f64, usize)> = pool
            .cands
            .iter()
            .enumerate()
            .filter(|(_, c)| seen.contains_key(&c.id) == measured)
            .filter_map(|(i, c)| {
                let x = c.x.as_ref()?;
                Some((if measured { seen[&c.id].map_or(f64::INFINITY, |v| v) } else { predict(x) }, i))
            })
            .collect();
        r.sort_by(|a, b| a.0.total_cmp(&b.0));
        r.into_iter().map(|(_, i)| i).collect()
    };
    // Evolve: mutations of the best measured and the best predicted, and random points.
    let mut parents: Vec<Schedule> =
        rank(pool, true).into_iter().take(4).map(|i| pool.cands[i].sched.clone()).collect();
    parents.extend(rank(pool, false).into_iter().take(4).map(|i| pool.cands[i].sched.clone()));
    let mut fresh: Vec<Schedule> = Vec::new();
    for p in &parents {
        fresh.extend((0..4).map(|_| space.mutate(p, rng)));
    }
    let randoms = if pool.cands.len() < 64 { 64 } else { 8 };
    fresh.extend((0..randoms).map(|_| space.random(rng)));
    for s in fresh {
        pool.add(s, space, lower, measurer);
    }
    rank(pool, false).into_iter().take(AHEAD).map(|i| pool.cands[i].sched.clone()).collect()
}

/// A report as JSON (what `kiln tune --json` prints, without the whole-model figures).
pub fn report_json(r: &TuneReport) -> serde_json::Value {
    let kernels: Vec<serde_json::Value> = r
        .kernels
        .iter()
        .map(|k| {
            serde_json::json!({
                "kernel": k.kernel, "instances": k.instances, "workload": k.workload, "unit": k.unit,
                "default": k.default_cost, "best": k.best_cost, "trials": k.trials, "failed": k.failed,
                "best_so_far": k.best_so_far, "chosen": k.chosen, "repeats": k.repeats,
                "knobs": k.best, "skipped": k.skipped,
                "costs": k.measured.iter().map(|m| m.0).collect::<Vec<_>>(),
                "estimates": k.measured.iter().map(|m| m.1).collect::<Vec<_>>(),
                "estimates_compute": k.estimates_compute, "trial_knobs": k.knobs,
            })
        })
        .collect();
    serde_json::json!({
        "target": r.target, "measured": r.measured, "clock": r.clock, "compiled_ahead": r.compiled_ahead, "estimated": r.target == "rvv", "previous_records": r.previous,
        "unreadable_lines": r.unreadable, "stopped_by_budget": r.stopped_by_budget, "kernels": kernels,
    })
}
