//! `rvv`: 64-bit RISC-V with the vector extension (RV64GCV, V 1.0), the class of XuanTie
//! C9xx and SpacemiT cores, executed here under `qemu-riscv64`.
//!
//! The path is `cpu`'s down to LLVM IR: each kernel of the fused graph is lowered to the
//! kernel dialect with the tile sizes of rvv's description (`Schedule::for_machine`: VLEN/32
//! f32 lanes per vector, 32 vector registers), emitted as upstream MLIR
//! ([`crate::native::to_mlir_with`], `exp` without `ldexp`, which RISC-V lacks) and lowered to
//! LLVM IR; LLVM's `-O3` pipeline then optimizes it for [`CodeTarget::riscv64`]
//! (`generic-rv64`, `+m,+a,+f,+d,+c,+v,+zvl<VLEN>b`). Its loop vectorizer makes
//! vector-length-agnostic loops (`vsetvli` strip-mining over scalable vectors); the register
//! tiles' fixed-width vectors fill one vector register each.
//!
//! Running: all native kernels of a model go into ONE static riscv64 executable, the kernel
//! runner (the kernels' object, and a small C `main`, `rvv_runner.c`, linked by
//! `riscv64-linux-gnu-gcc -static`). The host keeps one `qemu-riscv64 -cpu
//! rv64,v=true,vlen=<VLEN>` process per prepared model (spawned on first use, killed on drop)
//! and sends it one request per kernel launch: which function, the buffers' shapes and the
//! inputs' data; the outputs' data comes back ([`Runner`]). The riscv side runs one thread: a
//! launch is one call over the whole shared loop (`lo = 0, hi = extent`). Ops the kernel
//! dialect does not cover run on the host's reference interpreter, as on `cpu`, so every model
//! `cpu` runs also runs on `rvv`, with the same input/output contract.
//!
//! Wall times under qemu are the emulator's, not a RISC-V chip's.

use crate::jit::{emit_for, Artifact, CodeTarget};
use crate::native::{Backend, Launch, MlirOptions, NativeModel};
use crate::{Executable, Target, TargetError};
use kiln_ir::machine::{MachineDescription, MemoryLevel};
use kiln_ir::tensor::Data;
use kiln_ir::{Module, Tensor};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;

/// The VLEN `rvv` generates code for unless told otherwise (`--rvv-vlen`).
pub const DEFAULT_VLEN: u32 = 256;

/// Checks a VLEN: a power of two from 128 (the V extension's minimum for application
/// processors) to 1024 (the most `qemu-riscv64` 7.2 emulates).
pub fn check_vlen(vlen: u32) -> Result<(), String> {
    if vlen.is_power_of_two() && (128..=1024).contains(&vlen) {
        Ok(())
    } else {
        Err(format!("VLEN {vlen} is not a power of two from 128 to 1024"))
    }
}

/// The `rvv` target at one VLEN.
pub struct Rvv {
    vlen: u32,
    tuned: crate::Tuned,
}

impl Rvv {
    pub fn new(vlen: u32) -> Rvv {
        Rvv { vlen, tuned: crate::Tuned::default() }
    }

    /// With tuned schedules per workload (`--tuning-db`).
    pub fn with_tuned(mut self, tuned: crate::Tuned) -> Rvv {
        self.tuned = tuned;
        self
    }

    /// The vector register length, in bits, code is generated and emulated for.
    pub fn vlen(&self) -> u32 {
        self.vlen
    }

    fn compile(&self, m: &Module) -> Result<NativeModel, TargetError> {
        check_vlen(self.vlen)
            .map_err(|why| TargetError::Codegen(format!("rvv: {why} (give --rvv-vlen 128, 256, 512 or 1024)")))?;
        let vlen = self.vlen;
        let schedules = kiln_passes::lower::Schedules {
            default: kiln_passes::lower::Schedule::for_machine(&self.machine()),
            tuned: self.tuned.clone(),
        };
        let options = MlirOptions::for_code(&CodeTarget::riscv64(vlen));
        NativeModel::compile_with(m, &schedules, options, &|mlir, functions| {
            Ok(Box::new(Runner::build(mlir, functions, vlen)?))
        })
    }
}

fn level(name: &str, kib: u64, gbps: f64, latency: u32) -> MemoryLevel {
    MemoryLevel {
        name: name.into(),
        capacity_bytes: kib * 1024,
        bandwidth_gbps: gbps,
        latency_cycles: latency,
        software_managed: false,
    }
}

impl Target for Rvv {
    fn name(&self) -> &'static str {
        "rvv"
    }

    fn summary(&self) -> &'static str {
        "RISC-V 64 with the vector extension (XuanTie C9xx, SpacemiT) through MLIR and LLVM, run under qemu-riscv64"
    }

    fn machine(&self) -> MachineDescription {
        // XuanTie C920-like: 64 KB L1D, 1 MB L2 per cluster; 64 GFLOP/s of f32 vector FMA per
        // 4 cores at VLEN 256, scaled with VLEN.
        MachineDescription {
            name: "rvv".into(),
            clock_ghz: 2.0,
            cores: 4,
            levels: vec![level("dram", 8 << 20, 12.0, 200), level("l2", 1024, 64.0, 20), level("l1", 64, 128.0, 4)],
            vector_gflops: 64.0 * f64::from(self.vlen) / 256.0,
            vector_bits: self.vlen,
            // v0-v31; register tiles are sized by them (`Schedule::for_machine`).
            vector_registers: 32,
            matrix_shape: vec![],
            matrix_gflops: 0.0,
            launch_us: 2.0,
            gpu: None,
        }
    }

    fn can_run(&self) -> bool {
        true
    }

    fn run(&self, m: &Module, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, TargetError> {
        self.compile(m)?.run(inputs)
    }

    fn prepare(&self, m: &Module) -> Result<Option<Box<dyn Executable>>, TargetError> {
        Ok(Some(Box::new(self.compile(m)?)))
    }

    fn code_target(&self) -> Option<CodeTarget> {
        Some(CodeTarget::riscv64(self.vlen))
    }
}

/// The emulator: `$KILN_QEMU_RISCV64`, else `qemu-riscv64` on the PATH (Debian's `qemu-user`).
fn qemu() -> String {
    std::env::var("KILN_QEMU_RISCV64").unwrap_or_else(|_| "qemu-riscv64".into())
}

/// The cross compiler that links the runner: `$KILN_RISCV64_CC`, else `riscv64-linux-gnu-gcc`
/// (Debian's `gcc-riscv64-linux-gnu` with `libc6-dev-riscv64-cross`).
fn cross_cc() -> String {
    std::env::var("KILN_RISCV64_CC").unwrap_or_else(|_| "riscv64-linux-gnu-gcc".into())
}

/// What `kiln compile --target rvv -o DIR` builds for: riscv64 code at `vlen`, the driver
/// compiled and the shared library linked by the riscv64 cross gcc.
pub fn aot_target(vlen: u32) -> crate::aot::AotTarget {
    crate::aot::AotTarget {
        target: "rvv",
        code: CodeTarget::riscv64(vlen),
        cc: cross_cc(),
        schedule: kiln_passes::lower::Schedule::for_machine(&Rvv::new(vlen).machine()),
    }
}

fn tool_error(tool: &str, why: impl std::fmt::Display) -> TargetError {
    TargetError::Tool { tool: tool.to_string(), why: why.to_string() }
}

/// Why `tool` could not be started, with how to install it.
fn spawn_error(tool: &str, e: &std::io::Error) -> TargetError {
    if e.kind() == std::io::ErrorKind::NotFound {
        tool_error(tool, "not found: the rvv target needs it (scripts/setup.sh installs qemu-user, gcc-riscv64-linux-gnu and libc6-dev-riscv64-cross)")
    } else {
        tool_error(tool, format!("cannot be started: {e}"))
    }
}

/// The first word of the runner's hello: `"kilnrvv1"` read little-endian.
const MAGIC: i64 = i64::from_le_bytes(*b"kilnrvv1");

/// A model's kernels as a static riscv64 executable, and (once used) the `qemu-riscv64`
/// process running it. The protocol is described in `rvv_runner.c`.
pub struct Runner {
    dir: PathBuf,
    exe: PathBuf,
    vlen: u32,
    functions: usize,
    process: Mutex<Option<Process>>,
}

/// A live runner under qemu.
struct Process {
    child: Child,
    to: BufWriter<ChildStdin>,
    from: BufReader<ChildStdout>,
}

/// A fresh directory for one runner's files.
fn scratch_dir() -> Result<PathBuf, TargetError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kiln-rvv-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| TargetError::Codegen(format!("{}: {e}", dir.display())))?;
    Ok(dir)
}

impl Runner {
    /// Compiles `mlir` for riscv64 at `vlen` and links it with the runner's `main` into one
    /// static executable; `functions` are its kernel functions in launch order. The emulator
    /// starts on the first launch.
    pub fn build(mlir: &str, functions: &[String], vlen: u32) -> Result<Runner, TargetError> {
        // Fail early, before code generation, when the cross compiler is missing.
        let cc = cross_cc();
        Command::new(&cc).arg("--version").output().map_err(|e| spawn_error(&cc, &e))?;
        let object = emit_for(mlir, Artifact::Object, &CodeTarget::riscv64(vlen))?;
        let dir = scratch_dir()?;
        let runner =
            Runner { exe: dir.join("runner"), dir, vlen, functions: functions.len(), process: Mutex::new(None) };
        let write = |p: &Path, bytes: &[u8]| {
            std::fs::write(p, bytes).map_err(|e| TargetError::Codegen(format!("{}: {e}", p.display())))
        };
        let mut main = format!("#define KILN_FUNCTIONS {}\n", functions.len());
        for f in functions {
            main.push_str(&format!("extern void _mlir_{f}(void **);\n"));
        }
        let table: Vec<String> = functions.iter().map(|f| format!("_mlir_{f}")).collect();
        main.push_str(&format!(
            "static void (*const kiln_functions[])(void **) = {{ {} }};\n\n",
            if table.is_empty() { "0".to_string() } else { table.join(", ") }
        ));
        main.push_str(include_str!("rvv_runner.c"));
        let (main_c, kernels_o) = (runner.dir.join("runner.c"), runner.dir.join("kernels.o"));
        write(&main_c, main.as_bytes())?;
        write(&kernels_o, &object)?;
        let out = Command::new(&cc)
            .args(["-static", "-O2", "-o"])
            .arg(&runner.exe)
            .arg(&main_c)
            .arg(&kernels_o)
            .arg("-lm")
            .output()
            .map_err(|e| spawn_error(&cc, &e))?;
        if !out.status.success() {
            return Err(tool_error(
                &cc,
                format!("linking the rvv kernel runner failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
            ));
        }
        let _ = std::fs::remove_file(&kernels_o);
        Ok(runner)
    }

    /// The runner executable (static riscv64 ELF).
    pub fn executable(&self) -> &Path {
        &self.exe
    }

    /// Starts the runner under qemu and checks its hello (magic, functions, VLEN).
    fn spawn(&self) -> Result<Process, TargetError> {
        let qemu = qemu();
        let mut child = Command::new(&qemu)
            .arg("-cpu")
            .arg(format!("rv64,v=true,vlen={},vext_spec=v1.0", self.vlen))
            .arg(&self.exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| spawn_error(&qemu, &e))?;
        let to = BufWriter::with_capacity(1 << 20, child.stdin.take().expect("piped stdin"));
        let from = BufReader::with_capacity(1 << 20, child.stdout.take().expect("piped stdout"));
        let mut p = Process { child, to, from };
        let hello = (0..3).map(|_| read_word(&mut p.from)).collect::<Result<Vec<_>, _>>();
        let why = match hello {
            Ok(h) if h == [MAGIC, self.functions as i64, i64::from(self.vlen)] => return Ok(p),
            Ok(h) => format!(
                "the rvv kernel runner said {h:?}, expected [{MAGIC}, {}, {}] (magic, functions, VLEN)",
                self.functions, self.vlen
            ),
            Err(e) => format!("the rvv kernel runner did not start: {e}"),
        };
        Err(tool_error(&qemu, format!("{why}{}", p.end())))
    }

    /// Sends one launch and reads its outputs.
    fn exchange(p: &mut Process, function: usize, l: &Launch) -> std::io::Result<Result<Vec<Tensor>, i64>> {
        let buffers = l.inputs.len() + l.outputs.len();
        let mut words = vec![function as i64, buffers as i64, l.inputs.len() as i64, 0, l.extent];
        for t in &l.inputs {
            let elem = if matches!(t.data, Data::Bool(_)) { 1 } else { 4 };
            words.extend([elem, t.shape.len() as i64]);
            words.extend(t.shape.iter().map(|&d| d as i64));
        }
        for s in &l.outputs {
            words.extend([4, s.len() as i64]);
            words.extend(s.iter().map(|&d| d as i64));
        }
        for w in words {
            p.to.write_all(&w.to_le_bytes())?;
        }
        for t in &l.inputs {
            match &t.data {
                Data::F32(d) => write_f32s(&mut p.to, d)?,
                Data::Bool(d) => {
                    let bytes: Vec<u8> = d.iter().map(|&b| u8::from(b)).collect();
                    p.to.write_all(&bytes)?;
                }
                // `Launch::new` admits f32 and bool buffers only.
                _ => unreachable!("a kernel buffer is f32 or bool"),
            }
        }
        p.to.flush()?;
        let status = read_word(&mut p.from)?;
        if status != 0 {
            return Ok(Err(status));
        }
        let mut outs = Vec::with_capacity(l.outputs.len());
        for s in &l.outputs {
            let n: usize = s.iter().product();
            let mut bytes = vec![0u8; n * 4];
            p.from.read_exact(&mut bytes)?;
            let values = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            outs.push(Tensor::from_f32(s, values));
        }
        Ok(Ok(outs))
    }
}

impl Process {
    /// Ends the process and says how it ended, with what it wrote on stderr.
    fn end(&mut self) -> String {
        let _ = self.child.kill();
        let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let err = err.trim();
        if err.is_empty() {
            format!(" (qemu {status})")
        } else {
            format!(" (qemu {status}: {err})")
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Ok(slot) = self.process.get_mut() {
            if let Some(mut p) = slot.take() {
                p.end();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Backend for Runner {
    fn launch(&self, function: usize, l: &Launch) -> Result<Vec<Tensor>, TargetError> {
        let mut slot = self.process.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(self.spawn()?);
        }
        let p = slot.as_mut().expect("spawned above");
        let why = match Runner::exchange(p, function, l) {
            Ok(Ok(outs)) => return Ok(outs),
            Ok(Err(status)) => format!(
                "the rvv kernel runner refused kernel {} (status {status}: {})",
                l.kernel.name,
                match status {
                    1 => "no such function, a kiln bug",
                    2 => "out of memory",
                    _ => "a malformed request, a kiln bug",
                }
            ),
            Err(e) => format!("the rvv kernel runner failed running kernel {}: {e}", l.kernel.name),
        };
        // The runner is gone or out of step: end it; the next launch starts a fresh one.
        let ended = slot.take().map(|mut p| p.end()).unwrap_or_default();
        Err(tool_error(&qemu(), format!("{why}{ended}")))
    }
}

fn read_word(r: &mut impl Read) -> std::io::Result<i64> {
    let mut w = [0u8; 8];
    r.read_exact(&mut w)?;
    Ok(i64::from_le_bytes(w))
}

/// Writes f32 values little-endian.
fn write_f32s(w: &mut impl Write, d: &[f32]) -> std::io::Result<()> {
    let mut chunk = Vec::with_capacity(4 * d.len().min(1 << 16));
    for part in d.chunks(1 << 16) {
        chunk.clear();
        chunk.extend(part.iter().flat_map(|x| x.to_le_bytes()));
        w.write_all(&chunk)?;
    }
    Ok(())
}

/// One kernel compiled for rvv on its own and run under qemu (what `kiln tune --target rvv`
/// checks a candidate schedule with against the reference).
pub struct RvvKernel {
    kernel: kiln_ir::kernel::Kernel,
    runner: Runner,
}

impl RvvKernel {
    /// Generates riscv64 code at `vlen` for `kernel` and links its runner.
    pub fn compile(kernel: kiln_ir::kernel::Kernel, vlen: u32) -> Result<RvvKernel, TargetError> {
        check_vlen(vlen).map_err(|why| TargetError::Codegen(format!("rvv: {why}")))?;
        let mlir = crate::native::to_mlir_with(&kernel, MlirOptions::for_code(&CodeTarget::riscv64(vlen)));
        let runner = Runner::build(&mlir, std::slice::from_ref(&kernel.name), vlen)?;
        Ok(RvvKernel { kernel, runner })
    }

    /// Runs the kernel under qemu on the graph op's `operands` (as [`crate::native::NativeKernel::run`]).
    pub fn run(&self, operands: &[&Tensor]) -> Result<Vec<Tensor>, TargetError> {
        self.runner.launch(0, &Launch::new(&self.kernel, operands, false)?)
    }
}
