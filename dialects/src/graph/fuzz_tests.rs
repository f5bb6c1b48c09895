//! Randomized robustness test: every registered graph op's `infer` and `eval` must return
//! `Ok` or an `OpError` on any input, never panic, and never attempt a huge allocation.
//!
//! For each op, cases combine random attributes (the names the op's source file reads, with
//! values of the expected kind or of a wrong one, including negative, zero and huge numbers),
//! random input counts (some omitted), dtypes, ranks, dims and values (NaN, infinities, huge
//! integers), and `infer` on the same types made partly symbolic or unranked. The RNG is seeded,
//! so runs are reproducible. `KILN_OPFUZZ_CASES` sets the number of cases per op; a finding
//! prints the op and a description of the smallest case that reproduces it.
//!
//! Allocation guard: while an op runs, a single allocation over [`ALLOC_LIMIT`] bytes aborts the
//! process with the case printed (an op asked for a huge output must validate it and fail).

use crate::attr::{Attr, Attrs};
use crate::graph::{registry, AttrView, EvalCx, InferCx, OpDef, OpResult, RegionRunner};
use crate::ir::Region;
use crate::tensor::{Data, Tensor};
use crate::types::{DType, Dim, TensorType};
use half::{bf16, f16};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// Largest single allocation an op may make on fuzz inputs (inputs hold at most 256 elements).
const ALLOC_LIMIT: usize = 1 << 30;

/// The system allocator, which aborts on an oversized allocation while a fuzz case runs on the
/// current thread (after printing the case).
struct GuardAlloc;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static CASE: RefCell<String> = const { RefCell::new(String::new()) };
    static IN_FUZZ: Cell<bool> = const { Cell::new(false) };
    static PANIC_MSG: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn check_size(size: usize) {
    if size > ALLOC_LIMIT && ARMED.with(|a| a.get()) {
        ARMED.with(|a| a.set(false));
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(b"\nopfuzz: an op allocated more than 1 GiB on the case:\n");
        CASE.with(|c| {
            if let Ok(c) = c.try_borrow() {
                let _ = err.write_all(c.as_bytes());
            }
        });
        let _ = err.write_all(b"\n");
        std::process::abort();
    }
}

unsafe impl GlobalAlloc for GuardAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check_size(layout.size());
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check_size(layout.size());
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check_size(new_size);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: GuardAlloc = GuardAlloc;

/// xorshift64* generator.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// Sources of the graph ops, to find the attribute names each op reads.
const SOURCES: &[(&str, &str)] = &[
    ("elementwise/binary.rs", include_str!("elementwise/binary.rs")),
    ("elementwise/cast.rs", include_str!("elementwise/cast.rs")),
    ("elementwise/kernels.rs", include_str!("elementwise/kernels.rs")),
    ("elementwise/mod.rs", include_str!("elementwise/mod.rs")),
    ("elementwise/unary.rs", include_str!("elementwise/unary.rs")),
    ("elementwise/variadic.rs", include_str!("elementwise/variadic.rs")),
    ("misc/attention.rs", include_str!("misc/attention.rs")),
    ("misc/control.rs", include_str!("misc/control.rs")),
    ("misc/mod.rs", include_str!("misc/mod.rs")),
    ("misc/rnn.rs", include_str!("misc/rnn.rs")),
    ("misc/sampling.rs", include_str!("misc/sampling.rs")),
    ("misc/stateful.rs", include_str!("misc/stateful.rs")),
    ("nn/conv.rs", include_str!("nn/conv.rs")),
    ("nn/deform.rs", include_str!("nn/deform.rs")),
    ("nn/gemm.rs", include_str!("nn/gemm.rs")),
    ("nn/matmul.rs", include_str!("nn/matmul.rs")),
    ("nn/mod.rs", include_str!("nn/mod.rs")),
    ("nn/norm.rs", include_str!("nn/norm.rs")),
    ("nn/pool.rs", include_str!("nn/pool.rs")),
    ("nn/quant.rs", include_str!("nn/quant.rs")),
    ("nn/softmax.rs", include_str!("nn/softmax.rs")),
    ("reduce/arg.rs", include_str!("reduce/arg.rs")),
    ("reduce/einsum.rs", include_str!("reduce/einsum.rs")),
    ("reduce/linalg.rs", include_str!("reduce/linalg.rs")),
    ("reduce/loss.rs", include_str!("reduce/loss.rs")),
    ("reduce/mod.rs", include_str!("reduce/mod.rs")),
    ("reduce/nms.rs", include_str!("reduce/nms.rs")),
    ("reduce/reducers.rs", include_str!("reduce/reducers.rs")),
    ("reduce/scan.rs", include_str!("reduce/scan.rs")),
    ("reduce/signal.rs", include_str!("reduce/signal.rs")),
    ("reduce/unique.rs", include_str!("reduce/unique.rs")),
    ("shape/create.rs", include_str!("shape/create.rs")),
    ("shape/crop.rs", include_str!("shape/crop.rs")),
    ("shape/index.rs", include_str!("shape/index.rs")),
    ("shape/layout.rs", include_str!("shape/layout.rs")),
    ("shape/mod.rs", include_str!("shape/mod.rs")),
    ("shape/resize.rs", include_str!("shape/resize.rs")),
];

/// The kind of attribute value an accessor reads.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Int,
    Float,
    Str,
    Ints,
    Floats,
    Strs,
    Tensor,
    Type,
    Region,
    Any,
}

const KINDS: [Kind; 9] =
    [Kind::Int, Kind::Float, Kind::Str, Kind::Ints, Kind::Floats, Kind::Strs, Kind::Tensor, Kind::Type, Kind::Region];

/// What the fuzzer knows about one op's attributes.
#[derive(Default)]
struct OpInfo {
    /// Attribute names read through a literal, with the accessor's kind.
    attrs: Vec<(String, Kind)>,
    /// Every identifier-like string literal in the op's files (attribute names read through
    /// helpers, and string values such as modes).
    words: Vec<String>,
}

/// Identifier-like string literals of `src`, each with the accessor it is passed to (if any).
fn literals(src: &str) -> Vec<(String, Kind)> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'"' {
            i += 1;
            continue;
        }
        let start = i + 1;
        let mut j = start;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'.') {
            j += 1;
        }
        if j < b.len() && b[j] == b'"' && j > start && b[start].is_ascii_alphabetic() {
            let before = &src[src[..i].rfind(['.', ' ', '\n']).map_or(0, |p| p + 1)..i];
            let kind = match before {
                "int(" => Kind::Int,
                "float(" => Kind::Float,
                "string(" => Kind::Str,
                "ints(" => Kind::Ints,
                "floats(" => Kind::Floats,
                "strings(" => Kind::Strs,
                "tensor(" => Kind::Tensor,
                "dtype(" => Kind::Type,
                "region(" => Kind::Region,
                _ => Kind::Any,
            };
            out.push((src[start..j].to_string(), kind));
            i = j + 1;
        } else {
            // Skip to the end of this string literal (not identifier-like).
            i = j.max(start);
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        }
    }
    out
}

/// Attribute names and words of every op, from the files of the family that names it.
fn op_infos(names: &[&'static str]) -> BTreeMap<&'static str, OpInfo> {
    let parsed: Vec<(&str, Vec<(String, Kind)>)> = SOURCES.iter().map(|(p, s)| (*p, literals(s))).collect();
    let mut out = BTreeMap::new();
    for &name in names {
        let quoted = format!("\"{name}\"");
        let mut files: BTreeSet<&str> = BTreeSet::new();
        for (path, src) in SOURCES {
            if src.contains(&quoted) {
                let family = path.split('/').next().unwrap_or("");
                files.extend(SOURCES.iter().map(|s| s.0).filter(|p| p.starts_with(family)));
            }
        }
        let mut info = OpInfo::default();
        let mut seen = BTreeSet::new();
        for (path, lits) in &parsed {
            if !files.contains(path) {
                continue;
            }
            for (w, k) in lits {
                if *k != Kind::Any && seen.insert((w.clone(), KINDS.iter().position(|x| x == k))) {
                    info.attrs.push((w.clone(), *k));
                }
                if !info.words.contains(w) {
                    info.words.push(w.clone());
                }
            }
        }
        info.words.push("kiln.result_dtypes".into());
        out.insert(name, info);
    }
    out
}

/// Integer values: small ones, and huge ones chosen so that no quotient or product of two of them
/// (or with a small one) lands between 2^27 and 2^32: such a size is a legitimate allocation of
/// several GiB (kiln's limit is 2^32 elements), which this test must not attempt.
const INTS: &[i64] = &[0, 1, 1, 2, 2, 3, 4, -1, -1, -2, -3, -5, 1 << 40, -(1 << 40), i64::MAX, i64::MIN, i64::MAX - 1];

const FLOATS: &[f64] = &[
    0.0,
    1.0,
    -1.0,
    0.5,
    2.0,
    -0.5,
    3.7,
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    1e20,
    -1e20,
    1e-30,
    f32::MAX as f64,
    f32::MIN_POSITIVE as f64,
];

fn rand_int(r: &mut Rng) -> i64 {
    if r.chance(0.6) {
        r.below(5) as i64 - if r.chance(0.2) { 2 } else { 0 }
    } else {
        *r.pick(INTS)
    }
}

fn rand_float(r: &mut Rng) -> f64 {
    if r.chance(0.5) {
        (r.below(2001) as f64 - 1000.0) / 250.0
    } else {
        *r.pick(FLOATS)
    }
}

fn rand_dtype(r: &mut Rng) -> DType {
    if r.chance(0.4) {
        *r.pick(&[DType::F32, DType::I64, DType::F32, DType::I32, DType::Bool, DType::F16])
    } else {
        *r.pick(&DType::ALL)
    }
}

fn rand_shape(r: &mut Rng) -> Vec<usize> {
    let rank = r.below(5);
    (0..rank).map(|_| if r.chance(0.1) { 0 } else { 1 + r.below(4) }).collect()
}

fn rand_tensor_of(r: &mut Rng, dtype: DType, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let shape = shape.to_vec();
    let data = match dtype {
        DType::F16 => Data::F16((0..n).map(|_| f16::from_f64(rand_float(r))).collect()),
        DType::BF16 => Data::BF16((0..n).map(|_| bf16::from_f64(rand_float(r))).collect()),
        DType::F32 => Data::F32((0..n).map(|_| rand_float(r) as f32).collect()),
        DType::F64 => Data::F64((0..n).map(|_| rand_float(r)).collect()),
        DType::Bool => Data::Bool((0..n).map(|_| r.chance(0.5)).collect()),
        DType::String => {
            Data::Str((0..n).map(|_| r.pick(&["", "a", "1", "-2.5", "nan", "hello", "0"]).to_string()).collect())
        }
        // Unsigned values below 2^32 (255, 65535, ...) would make legitimate (checked)
        // allocations of many GiB: unsigned types up to u32 hold small values only.
        DType::U8 | DType::U16 | DType::U32 => {
            return Tensor::from_i64_as(dtype, &shape, (0..n).map(|_| r.below(5) as i64).collect())
        }
        _ => return Tensor::from_i64_as(dtype, &shape, (0..n).map(|_| rand_int(r)).collect()),
    };
    Tensor::new(shape, data)
}

fn rand_tensor(r: &mut Rng) -> Tensor {
    let dt = rand_dtype(r);
    let shape = rand_shape(r);
    rand_tensor_of(r, dt, &shape)
}

/// `t` with element `k` replaced by `one`'s element (same dtype).
fn with_elem(t: &Tensor, k: usize, one: &Tensor) -> Tensor {
    match t.dtype() {
        DType::String => t.clone(),
        d if d.is_float() => {
            let mut v = t.to_f64();
            v[k] = one.to_f64()[0];
            Tensor::from_f64(d, &t.shape, v)
        }
        d => {
            let mut v = t.to_i64();
            v[k] = one.to_i64()[0];
            Tensor::from_i64_as(d, &t.shape, v)
        }
    }
}

fn rand_opset(r: &mut Rng) -> i64 {
    *r.pick(&[25, 25, 22, 21, 19, 18, 17, 13, 12, 11, 10, 9, 7, 6, 1])
}

fn rand_attr(r: &mut Rng, kind: Kind, words: &[String]) -> Attr {
    let kind = if kind == Kind::Any || r.chance(0.15) { *r.pick(&KINDS) } else { kind };
    let word = |r: &mut Rng| {
        if words.is_empty() || r.chance(0.1) {
            r.pick(&["", "junk", "NOTSET", "constant"]).to_string()
        } else {
            r.pick(words).clone()
        }
    };
    let len = |r: &mut Rng| if r.chance(0.7) { r.below(5) } else { r.below(9) };
    match kind {
        Kind::Int | Kind::Any => Attr::Int(rand_int(r)),
        Kind::Float => Attr::Float(rand_float(r) as f32),
        Kind::Str => Attr::Str(word(r)),
        Kind::Ints => Attr::Ints((0..len(r)).map(|_| rand_int(r)).collect()),
        Kind::Floats => Attr::Floats((0..len(r)).map(|_| rand_float(r) as f32).collect()),
        Kind::Strs => {
            if r.chance(0.5) {
                let n = len(r);
                Attr::Strs((0..n).map(|_| r.pick(&DType::ALL).onnx_name().to_string()).collect())
            } else {
                Attr::Strs((0..len(r)).map(|_| word(r)).collect())
            }
        }
        Kind::Tensor => Attr::Tensor(rand_tensor(r)),
        Kind::Type => Attr::Type(*r.pick(&DType::ALL)),
        Kind::Region => Attr::Region(r.below(4) as u32),
    }
}

fn rand_attrs(r: &mut Rng, info: &OpInfo) -> Attrs {
    let mut attrs = Attrs::new();
    let n = r.below(5);
    for _ in 0..n {
        let (name, kind) = if !info.attrs.is_empty() && r.chance(0.75) {
            r.pick(&info.attrs).clone()
        } else if !info.words.is_empty() {
            (r.pick(&info.words).clone(), Kind::Any)
        } else {
            continue;
        };
        let v = rand_attr(r, kind, &info.words);
        attrs.insert(name, v);
    }
    attrs
}

/// Inputs of one case: often sharing a dtype and shape, sometimes 1-D integer "shape" tensors.
fn rand_inputs(r: &mut Rng) -> Vec<Option<Tensor>> {
    let n = r.below(7);
    let base_dt = rand_dtype(r);
    let base_shape = rand_shape(r);
    (0..n)
        .map(|_| {
            if r.chance(0.1) {
                return None;
            }
            if r.chance(0.15) {
                let dt = if r.chance(0.8) { DType::I64 } else { rand_dtype(r) };
                let len = r.below(5);
                return Some(rand_tensor_of(r, dt, &[len]));
            }
            let dt = if r.chance(0.6) { base_dt } else { rand_dtype(r) };
            let shape = if r.chance(0.5) { base_shape.clone() } else { rand_shape(r) };
            Some(rand_tensor_of(r, dt, &shape))
        })
        .collect()
}

/// The type of `t`, sometimes with symbolic or huge dims, or unranked; `exact` says whether the
/// type still describes `t` (only then is `t` offered as a constant).
fn rand_type(r: &mut Rng, t: &Tensor) -> (TensorType, bool) {
    if r.chance(0.1) {
        return (TensorType::unranked(t.dtype()), false);
    }
    let mut exact = true;
    let dims = t
        .shape
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            if r.chance(0.15) {
                exact = false;
                Dim::sym(&format!("s{}", i + r.below(2)))
            } else if r.chance(0.02) {
                exact = false;
                Dim::Known(*r.pick(&[1 << 40, i64::MAX as u64]))
            } else {
                Dim::Known(d as u64)
            }
        })
        .collect();
    (TensorType::new(t.dtype(), dims), exact)
}

/// Valid cases of ops that random inputs rarely satisfy, as starting points for mutation:
/// `op; inputs; attrs` with inputs `dtype[dims]` (random values) or `dtype[dims]=v,..`, `_` for
/// an omitted one, and attrs `name=i:3`, `is:1,2`, `f:0.5`, `fs:..`, `s:x`, `ss:x,y`, `r:0`
/// (region), or `@opset`.
const SEEDS: &[&str] = &[
    "AffineGrid; f32[1,2,3] i64[4]=1,1,2,3; align_corners=i:0",
    "Attention; f32[1,2,3,4] f32[1,2,3,4] f32[1,2,3,4]; is_causal=i:1",
    "Attention; f32[1,3,8] f32[1,3,4] f32[1,3,4]; q_num_heads=i:2 kv_num_heads=i:1",
    "AveragePool; f32[1,1,4,4]; kernel_shape=is:2,2 pads=is:1,1,0,0 strides=is:2,1",
    "MaxPool; f32[1,1,4,4]; kernel_shape=is:2,2 dilations=is:1,2 ceil_mode=i:1",
    "LpPool; f32[1,2,4]; kernel_shape=is:2 p=i:2",
    "GlobalAveragePool; f32[1,2,3,3];",
    "MaxRoiPool; f32[1,1,4,4] f32[1,5]=0,0,0,2,2; pooled_shape=is:2,2",
    "BitShift; u8[3] u8[3]; direction=s:LEFT",
    "CausalConvWithState; f32[1,2,4] f32[2,1,3] f32[2] f32[1,2,2];",
    "LinearAttention; f32[1,3,4] f32[1,3,4] f32[1,3,4]; q_num_heads=i:2 kv_num_heads=i:2",
    "Col2Im; f32[1,4,4] i64[2]=3,3 i64[2]=2,2;",
    "Conv; f32[1,2,4,4] f32[2,2,3,3] f32[2]; pads=is:1,1,1,1",
    "Conv; f32[1,2,5] f32[2,1,2]; group=i:2 strides=is:2 auto_pad=s:SAME_UPPER",
    "ConvTranspose; f32[1,2,3,3] f32[2,1,2,2]; strides=is:2,2 output_padding=is:1,0",
    "ConvInteger; u8[1,1,3,3] u8[1,1,2,2] u8[]=1;",
    "QLinearConv; u8[1,1,3,3] f32[]=0.5 u8[]=1 u8[1,1,2,2] f32[]=0.5 u8[]=0 f32[]=1 u8[]=2;",
    "DeformConv; f32[1,1,3,3] f32[1,1,2,2] f32[1,8,2,2];",
    "GRU; f32[2,1,3] f32[1,6,3] f32[1,6,2] f32[1,12]; hidden_size=i:2",
    "LSTM; f32[2,1,3] f32[1,8,3] f32[1,8,2] f32[1,16]; hidden_size=i:2",
    "RNN; f32[2,1,3] f32[2,2,3] f32[2,2,2] f32[2,4]; hidden_size=i:2 direction=s:bidirectional",
    "GroupNormalization; f32[1,4,2,2] f32[4] f32[4]; num_groups=i:2",
    "BatchNormalization; f32[2,3,2] f32[3] f32[3] f32[3] f32[3]=1,1,1;",
    "InstanceNormalization; f32[1,2,3] f32[2] f32[2];",
    "LayerNormalization; f32[2,3] f32[3] f32[3]; axis=i:-1",
    "LRN; f32[1,3,2,2]; size=i:3",
    "MaxUnpool; f32[1,1,2,2] i64[1,1,2,2]=0,1,2,3; kernel_shape=is:2,2 strides=is:2,2",
    "MelWeightMatrix; i64[]=2 i64[]=8 i64[]=8000 f32[]=0 f32[]=4000;",
    "NegativeLogLikelihoodLoss; f32[2,3] i64[2]=0,2 f32[3]; reduction=s:mean",
    "SoftmaxCrossEntropyLoss; f32[2,3] i64[2]=0,1; ignore_index=i:1",
    "NonMaxSuppression; f32[1,2,4]=0,0,1,1,0,0,1,1 f32[1,1,2] i64[]=2 f32[]=0.5 f32[]=0;",
    "QLinearMatMul; u8[2,2] f32[]=0.5 u8[]=1 u8[2,2] f32[]=0.5 u8[]=0 f32[]=1 u8[]=2;",
    "MatMulInteger; u8[2,3] u8[3,2];",
    "Gemm; f32[2,3] f32[3,2] f32[2]; transA=i:0",
    "MatMul; f32[2,2,3] f32[3,2];",
    "RoiAlign; f32[1,1,4,4] f32[1,4]=0,0,2,2 i64[1]=0; output_height=i:2 output_width=i:2",
    "GridSample; f32[1,1,3,3] f32[1,2,2,2];",
    "RotaryEmbedding; f32[1,2,3,4] f32[3,2] f32[3,2] i64[1,3]=0,1,2;",
    "STFT; f32[1,8,1] i64[]=2 f32[4] i64[]=4;",
    "DFT; f32[1,4,1]; @20",
    "DFT; f32[1,4,2] i64[]=4 i64[]=1; inverse=i:1",
    "Scatter; f32[3,3] i64[2,3]=0,1,2,0,1,2 f32[2,3];",
    "ScatterElements; f32[3,3] i64[2,3]=0,1,2,0,1,2 f32[2,3]; reduction=s:add",
    "ScatterND; f32[4] i64[2,1]=1,3 f32[2];",
    "TensorScatter; f32[1,2,4,3] f32[1,2,1,3] i64[1]=2;",
    "If; bool[]=1; then_branch=r:0 else_branch=r:1",
    "Loop; i64[]=3 bool[]=1 f32[2]; body=r:0",
    "Scan; f32[2,3]; body=r:0 num_scan_inputs=i:1",
    "Range; f32[]=0 f32[]=5 f32[]=1;",
    "SpaceToDepth; f32[1,1,4,4]; blocksize=i:2",
    "DepthToSpace; f32[1,4,2,2]; blocksize=i:2 mode=s:CRD",
    "OneHot; i64[3]=0,1,2 i64[]=3 f32[2];",
    "Pad; f32[2,3] i64[4]=1,0,0,1; mode=s:reflect",
    "Slice; f32[3,4] i64[1]=1 i64[1]=3 i64[1]=1 i64[1]=1;",
    "Where; bool[3] f32[3] f32[1];",
    "Einsum; f32[2,3] f32[3,4]; equation=s:ij,jk->ik",
    "TopK; f32[2,4] i64[1]=2; axis=i:1",
    "CumSum; f32[2,3] i64[]=1;",
    "ReverseSequence; f32[3,2] i64[2]=1,3;",
    "GatherND; f32[2,2] i64[2,2]=0,1,1,0;",
    "Gather; f32[3,2] i64[2]=0,2;",
    "GatherElements; f32[2,2] i64[2,2]=0,1,1,0; axis=i:1",
    "Unique; f32[5]; axis=i:0",
    "Tile; f32[2,2] i64[2]=2,1;",
    "Resize; f32[1,1,2,2] _ f32[4]=1,1,2,2; mode=s:linear",
    "Resize; f32[1,1,2,2] _ _ i64[4]=1,1,3,3; mode=s:cubic",
    "Upsample; f32[1,1,2,2] f32[4]=1,1,2,2;",
    "CenterCropPad; f32[3,4] i64[2]=2,5;",
    "Concat; f32[2,2] f32[2,3]; axis=i:1",
    "Det; f32[2,3,3];",
    "Reshape; f32[2,3] i64[2]=3,2;",
    "Split; f32[6] i64[2]=2,4;",
    "Squeeze; f32[1,3,1] i64[1]=0;",
    "Unsqueeze; f32[3] i64[1]=0;",
    "Expand; f32[3,1] i64[2]=2,3;",
    "Transpose; f32[2,3,1]; perm=is:2,0,1",
    "ConstantOfShape; i64[2]=2,3;",
    "EyeLike; f32[2,3]; k=i:1",
    "Trilu; f32[3,3] i64[]=1;",
    "ReduceSum; f32[2,3] i64[1]=1;",
    "ReduceMean; f32[2,3]; axes=is:1 @11",
    "ArgMax; f32[2,3]; axis=i:1",
    "Hardmax; f32[2,3];",
    "Softmax; f32[2,3]; axis=i:0",
    "Compress; f32[3,2] bool[3]=1,0,1; axis=i:0",
    "NonZero; f32[2,2];",
    "Shape; f32[2,3]; start=i:1",
    "Size; f32[2,3];",
    "Flatten; f32[2,3,4]; axis=i:2",
    "Dropout; f32[2,3] f32[]=0.5 bool[]=1; seed=i:1",
    "Bernoulli; f32[3];",
    "RandomNormalLike; f32[2,2];",
    "Multinomial; f32[2,3]; sample_size=i:2",
    "Clip; f32[3] f32[]=0 f32[]=1;",
    "Mod; i32[3] i32[3]; fmod=i:0",
    "Div; i32[3] i32[3];",
    "Pow; i32[3] i32[3];",
    "QuantizeLinear; f32[2,4] f32[2]=1,2 u8[2]; axis=i:0",
    "DequantizeLinear; u8[2,4] f32[2,2] u8[2,2]; axis=i:1 block_size=i:2",
    "DynamicQuantizeLinear; f32[4];",
    "Mean; f32[3] f32[1] f32[2,1];",
    "Sum; f32[3] f32[3];",
    "Celu; f32[3]; alpha=f:2",
    "LpNormalization; f32[2,3]; axis=i:1 p=i:1",
    "MeanVarianceNormalization; f32[1,2,2,2];",
    "Gelu; f32[3]; approximate=s:tanh",
    "Cast; f32[3]; to=i:7",
    "CastLike; f32[3] i32[1];",
    "StringNormalizer; str[3]; case_change_action=s:UPPER",
    "HannWindow; i64[]=4;",
    "BlackmanWindow; i64[]=4; periodic=i:0",
    "ImageDecoder; u8[4];",
    "RegexFullMatch; str[2]; pattern=s:a.*",
    "GlobalLpPool; f32[1,2,3]; p=i:3",
    "SequenceAt; f32[2];",
    "Optional; f32[2];",
];

/// Parses a [`SEEDS`] entry into a case (values left unspecified are random).
fn parse_seed(r: &mut Rng, spec: &str) -> (String, Case) {
    let mut parts = spec.split(';').map(str::trim);
    let op = parts.next().unwrap_or("").to_string();
    let mut inputs = Vec::new();
    for t in parts.next().unwrap_or("").split_whitespace() {
        if t == "_" {
            inputs.push(None);
            continue;
        }
        let (head, vals) = t.split_once('=').map_or((t, None), |(h, v)| (h, Some(v)));
        let (dt, dims) = head.split_once('[').expect("seed input is dtype[dims]");
        let dtype = match dt {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "f64" => DType::F64,
            "i64" => DType::I64,
            "i32" => DType::I32,
            "i8" => DType::I8,
            "u8" => DType::U8,
            "bool" => DType::Bool,
            "str" => DType::String,
            _ => panic!("seed dtype {dt}"),
        };
        let shape: Vec<usize> =
            dims.trim_end_matches(']').split(',').filter(|d| !d.is_empty()).map(|d| d.parse().expect("dim")).collect();
        let t = match vals {
            None => rand_tensor_of(r, dtype, &shape),
            Some(v) => {
                let v: Vec<f64> = v.split(',').map(|x| x.parse().expect("seed value")).collect();
                assert_eq!(v.len(), shape.iter().product::<usize>(), "seed {spec}");
                Tensor::from_f64(dtype, &shape, v)
            }
        };
        inputs.push(Some(t));
    }
    let mut c = Case {
        attrs: Attrs::new(),
        inputs,
        types: Vec::new(),
        consts: Vec::new(),
        num_outputs: 1,
        opset: 25,
        regions: 3,
        runner_yields: true,
    };
    for a in parts.next().unwrap_or("").split_whitespace() {
        if let Some(v) = a.strip_prefix('@') {
            c.opset = v.parse().expect("opset");
            continue;
        }
        let (name, v) = a.split_once('=').expect("attr is name=kind:value");
        let (kind, v) = v.split_once(':').expect("attr is name=kind:value");
        let list = || v.split(',').filter(|x| !x.is_empty());
        let attr = match kind {
            "i" => Attr::Int(v.parse().expect("int")),
            "is" => Attr::Ints(list().map(|x| x.parse().expect("int")).collect()),
            "f" => Attr::Float(v.parse().expect("float")),
            "fs" => Attr::Floats(list().map(|x| x.parse().expect("float")).collect()),
            "s" => Attr::Str(v.to_string()),
            "ss" => Attr::Strs(list().map(str::to_string).collect()),
            "r" => Attr::Region(v.parse().expect("region")),
            _ => panic!("seed attr kind {kind}"),
        };
        c.attrs.insert(name.to_string(), attr);
    }
    c.retype(r);
    (op, c)
}

/// A region runner that fails, or yields a few random values a few times, then fails.
struct FuzzRunner {
    rng: RefCell<Rng>,
    yields: bool,
    calls: Cell<u32>,
}

impl RegionRunner for FuzzRunner {
    fn run_region(&self, _: &Region, args: Vec<Tensor>) -> OpResult<Vec<Tensor>> {
        self.calls.set(self.calls.get() + 1);
        if !self.yields || self.calls.get() > 6 {
            crate::bail!("fuzz runner: regions are not run");
        }
        let mut r = self.rng.borrow_mut();
        let n = r.below(5);
        Ok((0..n)
            .map(|i| match args.get(i) {
                Some(a) if r.chance(0.5) => a.clone(),
                _ if i == 0 && r.chance(0.5) => Tensor::from_bool(&[], vec![r.chance(0.7)]),
                _ => rand_tensor(&mut r),
            })
            .collect())
    }
}

fn describe_tensor(t: &Tensor) -> String {
    let vals: String = match &t.data {
        Data::Str(v) => format!("{v:?}"),
        Data::F16(_) | Data::BF16(_) | Data::F32(_) | Data::F64(_) => format!("{:?}", t.to_f64()),
        _ => format!("{:?}", t.to_i64()),
    };
    format!("{}{:?} {vals}", t.dtype(), t.shape)
}

/// One random case of an op.
#[derive(Clone)]
struct Case {
    attrs: Attrs,
    inputs: Vec<Option<Tensor>>,
    types: Vec<Option<TensorType>>,
    consts: Vec<bool>,
    num_outputs: usize,
    opset: i64,
    regions: usize,
    runner_yields: bool,
}

impl Case {
    fn gen(r: &mut Rng, info: &OpInfo) -> Case {
        let attrs = rand_attrs(r, info);
        let inputs = rand_inputs(r);
        let mut c = Case {
            attrs,
            inputs,
            types: Vec::new(),
            consts: Vec::new(),
            num_outputs: 1,
            opset: 25,
            regions: 3,
            runner_yields: r.chance(0.5),
        };
        c.num_outputs = if r.chance(0.6) { 1 } else { r.below(5) };
        c.opset = rand_opset(r);
        c.regions = if r.chance(0.8) { 3 } else { r.below(2) };
        c.retype(r);
        c
    }

    /// Types (and constness) of the inputs for `infer`.
    fn retype(&mut self, r: &mut Rng) {
        self.types.clear();
        self.consts.clear();
        for t in &self.inputs {
            match t {
                Some(t) => {
                    let (ty, exact) =
                        if r.chance(0.5) { (TensorType::known(t.dtype(), &t.shape), true) } else { rand_type(r, t) };
                    self.types.push(Some(ty));
                    self.consts.push(exact && r.chance(0.5));
                }
                None => {
                    self.types.push(None);
                    self.consts.push(false);
                }
            }
        }
    }

    /// A variation of this case: one to three changes to an input, an attribute or the context.
    fn mutate(&self, r: &mut Rng, info: &OpInfo) -> Case {
        let mut c = self.clone();
        for _ in 0..1 + r.below(3) {
            let n = c.inputs.len();
            match r.below(10) {
                0..=2 if n > 0 => {
                    // New values, or one extreme value.
                    let i = r.below(n);
                    if let Some(t) = &c.inputs[i] {
                        let t2 = if r.chance(0.5) && !t.is_empty() {
                            let k = r.below(t.len());
                            let one = rand_tensor_of(r, t.dtype(), &[1]);
                            with_elem(t, k, &one)
                        } else {
                            rand_tensor_of(r, t.dtype(), &t.shape)
                        };
                        c.inputs[i] = Some(t2);
                    }
                }
                3..=4 if n > 0 => {
                    // One dim changed (or the rank), values regenerated.
                    let i = r.below(n);
                    if let Some(t) = &c.inputs[i] {
                        let mut shape = t.shape.clone();
                        if shape.is_empty() || r.chance(0.2) {
                            if r.chance(0.5) || shape.is_empty() {
                                shape.insert(r.below(shape.len() + 1), 1 + r.below(3));
                            } else {
                                shape.remove(r.below(shape.len()));
                            }
                        } else {
                            let k = r.below(shape.len());
                            shape[k] = *r.pick(&[0, 1, 2, 3, shape[k] + 1, shape[k].saturating_sub(1)]);
                        }
                        if shape.iter().product::<usize>() <= 4096 {
                            c.inputs[i] = Some(rand_tensor_of(r, t.dtype(), &shape));
                        }
                    }
                }
                5 if n > 0 => {
                    // Another dtype, an omitted input, or one input fewer.
                    let i = r.below(n);
                    match r.below(3) {
                        0 => {
                            if let Some(t) = &c.inputs[i] {
                                let dt = rand_dtype(r);
                                c.inputs[i] = Some(rand_tensor_of(r, dt, &t.shape.clone()));
                            }
                        }
                        1 => c.inputs[i] = None,
                        _ => {
                            c.inputs.pop();
                        }
                    }
                }
                6 => c.inputs.push(if r.chance(0.2) { None } else { Some(rand_tensor(r)) }),
                7..=8 => {
                    // Change, add or remove an attribute.
                    if !c.attrs.is_empty() && r.chance(0.3) {
                        let k = r.pick(&c.attrs.keys().cloned().collect::<Vec<_>>()).clone();
                        c.attrs.remove(&k);
                    } else if !c.attrs.is_empty() && r.chance(0.6) {
                        let k = r.pick(&c.attrs.keys().cloned().collect::<Vec<_>>()).clone();
                        let kind = info.attrs.iter().find(|a| a.0 == k).map_or(Kind::Any, |a| a.1);
                        let v = rand_attr(r, kind, &info.words);
                        c.attrs.insert(k, v);
                    } else {
                        let extra = rand_attrs(r, info);
                        c.attrs.extend(extra);
                    }
                }
                _ => {
                    if r.chance(0.5) {
                        c.opset = rand_opset(r);
                    } else {
                        c.num_outputs = r.below(5);
                    }
                }
            }
        }
        c.retype(r);
        c
    }

    fn describe(&self, op: &str, what: &str) -> String {
        let mut s = format!(
            "{op} {what}: opset {}, {} outputs, {} regions{}\n  attrs: {:?}\n",
            self.opset,
            self.num_outputs,
            self.regions,
            if self.runner_yields { " (runner yields)" } else { "" },
            self.attrs
        );
        for (i, t) in self.inputs.iter().enumerate() {
            match t {
                None => s += &format!("  input {i}: none\n"),
                Some(t) => {
                    let ty = self.types[i].as_ref().map(|t| t.to_string()).unwrap_or_default();
                    let c = if self.consts[i] { " (const)" } else { "" };
                    s += &format!("  input {i}: {} type {ty}{c}\n", describe_tensor(t));
                }
            }
        }
        s
    }

    fn size(&self) -> usize {
        self.inputs.iter().flatten().map(|t| t.len() + 1).sum::<usize>() + self.attrs.len()
    }
}

/// Runs `f` with panics caught and the allocation guard armed; `Err` holds the panic message.
fn guarded<T>(case: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    CASE.with(|c| *c.borrow_mut() = case.to_string());
    IN_FUZZ.with(|x| x.set(true));
    ARMED.with(|a| a.set(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    ARMED.with(|a| a.set(false));
    IN_FUZZ.with(|x| x.set(false));
    r.map_err(|_| PANIC_MSG.with(|m| m.borrow_mut().take()).unwrap_or_else(|| "panic".into()))
}

/// A panic found: where, how often, and the smallest case.
struct Finding {
    count: usize,
    size: usize,
    case: String,
}

/// Runs one case; returns whether (infer, eval) succeeded.
fn run_case(op: &dyn OpDef, case: &Case, findings: &mut BTreeMap<(String, String), Finding>) -> (bool, bool) {
    let name = op.name();
    let mut record = |phase: &str, msg: String, case: &Case| {
        // Key by op and panic location (the message's first line without its values).
        let loc = msg.lines().next().unwrap_or("").to_string();
        let f = findings.entry((name.to_string(), loc)).or_insert(Finding {
            count: 0,
            size: usize::MAX,
            case: String::new(),
        });
        f.count += 1;
        if case.size() < f.size {
            f.size = case.size();
            f.case = format!("{msg}\n{}", case.describe(name, phase));
        }
    };
    let regions = vec![Region::default(); case.regions];
    // infer
    let const_refs: Vec<Option<&Tensor>> =
        case.inputs.iter().zip(&case.consts).map(|(t, &c)| if c { t.as_ref() } else { None }).collect();
    let mut next_dim = 0u32;
    let desc = case.describe(name, "infer");
    let res = guarded(&desc, || {
        let mut cx =
            InferCx::new(&case.attrs, &case.types, &const_refs, case.num_outputs, case.opset, &regions, &mut next_dim);
        op.infer(&mut cx).map(|_| ())
    });
    let infer_ok = matches!(res, Ok(Ok(())));
    if let Err(msg) = res {
        record("infer", msg, case);
    }
    // eval (inputs are small; the guard of the brief: skip anything over 1e5 elements)
    if case.inputs.iter().flatten().any(|t| t.len() > 100_000) {
        return (infer_ok, false);
    }
    let runner =
        FuzzRunner { rng: RefCell::new(Rng::new(case.size() as u64)), yields: case.runner_yields, calls: Cell::new(0) };
    let ins: Vec<Option<&Tensor>> = case.inputs.iter().map(|t| t.as_ref()).collect();
    let desc = case.describe(name, "eval");
    let start = Instant::now();
    let res = guarded(&desc, || {
        let cx = EvalCx {
            attrs: AttrView(&case.attrs),
            num_outputs: case.num_outputs,
            opset: case.opset,
            regions: &regions,
            runner: &runner,
        };
        op.eval(&cx, &ins).map(|_| ())
    });
    let eval_ok = matches!(res, Ok(Ok(())));
    if let Err(msg) = res {
        record("eval", msg, case);
    }
    let took = start.elapsed();
    if took > Duration::from_secs(2) {
        record("eval", format!("slow: eval took {took:?}"), case);
    }
    (infer_ok, eval_ok)
}

#[test]
fn no_op_panics_on_random_inputs() {
    let cases: usize = std::env::var("KILN_OPFUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let seed: u64 = std::env::var("KILN_OPFUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let only = std::env::var("KILN_OPFUZZ_OPS").ok();
    let verbose = std::env::var("KILN_OPFUZZ_VERBOSE").is_ok();
    let skip = std::env::var("KILN_OPFUZZ_SKIP").unwrap_or_default();
    let names = registry().names();
    let infos = op_infos(&names);
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |p| {
        if IN_FUZZ.with(|x| x.get()) {
            let payload = p
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let mut loc = p.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
            if !loc.contains("dialects/src") {
                // A panic inside std: name the innermost graph function on the stack.
                let bt = std::backtrace::Backtrace::force_capture().to_string();
                let frame = bt
                    .lines()
                    .map(str::trim)
                    .find(|l| l.contains("kiln_ir::") && !l.contains("fuzz_tests") && !l.contains("panic"));
                if let Some(f) = frame {
                    loc = format!("{loc} in {}", f.split_once(": ").map_or(f, |x| x.1));
                }
            }
            PANIC_MSG.with(|m| *m.borrow_mut() = Some(format!("{loc}\n{payload}")));
        } else {
            prev(p);
        }
    }));
    let mut findings = BTreeMap::new();
    let start = Instant::now();
    for (k, &name) in names.iter().enumerate() {
        if only.as_ref().is_some_and(|o| !o.split(',').any(|x| x == name)) || skip.split(',').any(|x| x == name) {
            continue;
        }
        let op = registry().get(name).expect("registered");
        let info = &infos[name];
        let mut r = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(k as u64));
        let (mut infer_ok, mut eval_ok) = (0, 0);
        // Cases that evaluate successfully seed later ones (mutated), with the hand-written seeds.
        let mut corpus: Vec<Case> =
            SEEDS.iter().map(|s| parse_seed(&mut r, s)).filter(|(o, _)| o == name).map(|(_, c)| c).collect();
        for _ in 0..cases {
            let case = if !corpus.is_empty() && r.chance(0.6) {
                let base = r.below(corpus.len());
                corpus[base].mutate(&mut r, info)
            } else {
                Case::gen(&mut r, info)
            };
            let (i, e) = run_case(op, &case, &mut findings);
            infer_ok += i as usize;
            eval_ok += e as usize;
            if e && corpus.len() < 64 {
                corpus.push(case);
            }
        }
        if verbose {
            eprintln!("{name}: infer ok {infer_ok}, eval ok {eval_ok} of {cases}; attrs {:?}", info.attrs);
        }
    }
    eprintln!("opfuzz: {cases} cases per op, {} ops, {:?}", names.len(), start.elapsed());
    let mut report = String::new();
    for ((op, loc), f) in &findings {
        report += &format!("== {op} at {loc} ({} cases)\n{}\n", f.count, f.case);
    }
    assert!(findings.is_empty(), "{} panics found:\n{report}", findings.len());
}
