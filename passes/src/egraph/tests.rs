//! Tests of the rewrite rules (one or more per rule), extraction and conversion.
//!
//! Each rule test builds the decomposed (or unoptimized) form by hand, saturates with only the
//! rule under test (plus the rules it needs, named at the call), checks the shape of the
//! extracted module, and runs the interpreter before and after on seeded random inputs.
//! Negative tests build a form where the rule would be wrong and check that it did not fire.
//!
//! The module builder, the machine description and the comparison helpers are shared with the
//! fusion tests (`crate::fusion::tests`).

use super::rules::{self, Rule};
use super::{saturate, Limits, SaturationStats};
use crate::cost::CostModel;
use kiln_ir::attr::{Attr, Attrs};
use kiln_ir::graph::{lookup, InferCx};
use kiln_ir::ir::{Module, OpId, ValueDef, ValueId, NODE_NAME_ATTR};
use kiln_ir::machine::{MachineDescription, MemoryLevel};
use kiln_ir::{DType, Tensor, TensorType};
use std::collections::{BTreeSet, HashMap};

// ---------------------------------------------------------------------------------------
// Test-only module builder and helpers.

/// Builds a module by hand: inputs, constants, and ops whose result types come from the op's
/// shape rule. Every op gets a node name (`<OpType>_<n>`); constants get none.
pub(crate) struct Builder {
    pub m: Module,
    consts: HashMap<ValueId, Tensor>,
    next_dim: u32,
    count: usize,
}

impl Builder {
    /// A module at the default (latest) opset.
    pub fn new(name: &str) -> Builder {
        Builder { m: Module::new(name), consts: HashMap::new(), next_dim: 0, count: 0 }
    }

    /// A module imported at `opset` (module attribute `kiln.opset`).
    pub fn with_opset(name: &str, opset: i64) -> Builder {
        let mut b = Builder::new(name);
        b.m.attrs.insert("kiln.opset".into(), Attr::Int(opset));
        b
    }

    pub fn opset(&self) -> i64 {
        kiln_ir::interp::module_opset(&self.m)
    }

    /// A graph input of type `dtype[shape]`.
    pub fn input_of(&mut self, name: &str, dtype: DType, shape: &[usize]) -> ValueId {
        let v = self.m.add_arg(TensorType::known(dtype, shape), Some(name.into()));
        self.m.body.args.push(v);
        v
    }

    /// An f32 graph input.
    pub fn input(&mut self, name: &str, shape: &[usize]) -> ValueId {
        self.input_of(name, DType::F32, shape)
    }

    /// A `graph.Constant`.
    pub fn constant(&mut self, t: Tensor) -> ValueId {
        let ty = TensorType::known(t.dtype(), &t.shape);
        let mut a = Attrs::new();
        a.insert("value".into(), Attr::Tensor(t.clone()));
        let o = self.m.push_op("graph.Constant", vec![], vec![ty], a);
        let v = self.m.op(o).results[0];
        self.consts.insert(v, t);
        v
    }

    /// An f32 scalar constant (shape `[]`).
    pub fn scalar(&mut self, v: f32) -> ValueId {
        self.constant(Tensor::from_f32(&[], vec![v]))
    }

    /// A 1-D i64 constant.
    pub fn ints(&mut self, v: &[i64]) -> ValueId {
        self.constant(Tensor::from_i64(&[v.len()], v.to_vec()))
    }

    /// An f32 constant of `shape` with seeded random values in `[lo, hi)`.
    pub fn random_const(&mut self, shape: &[usize], seed: u64, lo: f32, hi: f32) -> ValueId {
        let mut r = Rng::new(seed);
        let n = shape.iter().product();
        self.constant(Tensor::from_f32(shape, (0..n).map(|_| r.uniform(lo, hi)).collect()))
    }

    /// An op with possibly omitted operands and `n` results (types from its shape rule).
    pub fn op_n(&mut self, op_type: &str, operands: &[Option<ValueId>], attrs: Attrs, n: usize) -> Vec<ValueId> {
        let def = lookup(op_type).unwrap_or_else(|| panic!("unknown op {op_type}"));
        let inputs: Vec<Option<TensorType>> = operands.iter().map(|v| v.map(|v| self.m.value(v).ty.clone())).collect();
        let consts: Vec<Option<&Tensor>> = operands.iter().map(|v| v.and_then(|v| self.consts.get(&v))).collect();
        let opset = kiln_ir::interp::module_opset(&self.m);
        let mut types = {
            let mut cx = InferCx::new(&attrs, &inputs, &consts, n, opset, &[], &mut self.next_dim);
            def.infer(&mut cx).unwrap_or_else(|e| panic!("{op_type}: shape rule failed: {}", e.0))
        };
        assert!(types.len() >= n, "{op_type} infers {} results, wanted {n}", types.len());
        types.truncate(n);
        self.count += 1;
        let mut attrs = attrs;
        attrs.insert(NODE_NAME_ATTR.into(), Attr::Str(format!("{op_type}_{}", self.count)));
        let o = self.m.push_op(&format!("graph.{op_type}"), operands.to_vec(), types, attrs);
        self.m.op(o).results.clone()
    }

    /// A single-result op.
    pub fn op(&mut self, op_type: &str, operands: &[ValueId], attrs: Attrs) -> ValueId {
        let ops: Vec<Option<ValueId>> = operands.iter().map(|&v| Some(v)).collect();
        self.op_n(op_type, &ops, attrs, 1)[0]
    }

    /// A single-result op without attributes.
    pub fn op0(&mut self, op_type: &str, operands: &[ValueId]) -> ValueId {
        self.op(op_type, operands, Attrs::new())
    }

    /// A `keepdims` reduction over `axes`: the axes go in an attribute before the opset that
    /// made them an input (13 for ReduceSum, 18 for the others), in an input from then on.
    pub fn reduce(&mut self, op_type: &str, x: ValueId, axes: &[i64]) -> ValueId {
        let input_from = if op_type == "ReduceSum" { 13 } else { 18 };
        let mut a = attrs(&[("keepdims", Attr::Int(1))]);
        if self.opset() >= input_from {
            let c = self.ints(axes);
            self.op(op_type, &[x, c], a)
        } else {
            a.insert("axes".into(), Attr::Ints(axes.to_vec()));
            self.op(op_type, &[x], a)
        }
    }

    /// Names a value.
    pub fn name(&mut self, v: ValueId, name: &str) {
        self.m.value_mut(v).name = Some(name.into());
    }

    /// Makes `v` a model output named `name`.
    pub fn output(&mut self, v: ValueId, name: &str) {
        self.name(v, name);
        self.m.body.yields.push(v);
    }

    /// The module, verified.
    pub fn finish(self) -> Module {
        kiln_ir::verify::verify(&self.m).expect("the hand-built module verifies");
        self.m
    }
}

/// Attributes from a list.
pub(crate) fn attrs(list: &[(&str, Attr)]) -> Attrs {
    list.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// A small CPU-like machine: dram 16 GiB @ 20 GB/s, l1 32 KiB @ 400 GB/s, 80 GFLOP/s,
/// 2 µs per kernel launch.
pub(crate) fn machine() -> MachineDescription {
    let level = |name: &str, capacity_bytes: u64, bandwidth_gbps: f64, latency_cycles: u32| MemoryLevel {
        name: name.into(),
        capacity_bytes,
        bandwidth_gbps,
        latency_cycles,
        software_managed: false,
    };
    MachineDescription {
        name: "test-cpu".into(),
        clock_ghz: 2.0,
        cores: 4,
        levels: vec![level("dram", 16 << 30, 20.0, 200), level("l1", 32 << 10, 400.0, 4)],
        vector_gflops: 80.0,
        vector_bits: 256,
        vector_registers: 16,
        matrix_shape: vec![],
        matrix_gflops: 0.0,
        launch_us: 2.0,
        gpu: None,
    }
}

pub(crate) fn cost() -> CostModel {
    CostModel::new(&machine())
}

/// xorshift64*: seeded, portable, good enough for test data.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
}

/// Seeded random values for `m`'s inputs: floats in [-2, 2), bools, small integers.
pub(crate) fn random_inputs(m: &Module, seed: u64) -> Vec<Tensor> {
    let mut r = Rng::new(seed);
    m.inputs()
        .iter()
        .map(|&v| {
            let ty = &m.value(v).ty;
            let shape = ty.static_shape().expect("tests use static input shapes");
            let n: usize = shape.iter().product();
            match ty.dtype {
                DType::F32 => Tensor::from_f32(&shape, (0..n).map(|_| r.uniform(-2.0, 2.0)).collect()),
                DType::Bool => Tensor::from_bool(&shape, (0..n).map(|_| r.next_u64() & 1 == 1).collect()),
                DType::I64 => Tensor::from_i64(&shape, (0..n).map(|_| (r.next_u64() % 4) as i64).collect()),
                d => panic!("no random inputs of type {d}"),
            }
        })
        .collect()
}

/// Asserts two output lists agree: dtypes and shapes exactly, values within
/// `atol + rtol·|expected|` (NaNs and infinities must match).
pub(crate) fn assert_close(got: &[Tensor], want: &[Tensor], rtol: f64, atol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: output count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.dtype(), w.dtype(), "{what}: output {i} dtype");
        assert_eq!(g.shape, w.shape, "{what}: output {i} shape");
        for (j, (&a, &b)) in g.to_f64().iter().zip(&w.to_f64()).enumerate() {
            let ok = if a.is_nan() || b.is_nan() {
                a.is_nan() && b.is_nan()
            } else if a.is_infinite() || b.is_infinite() {
                a == b
            } else {
                (a - b).abs() <= atol + rtol * b.abs()
            };
            assert!(ok, "{what}: output {i} element {j}: got {a}, want {b}");
        }
    }
}

/// Runs `before` and `after` on the same seeded random inputs and compares their outputs
/// (rtol 1e-4, atol 1e-5).
pub(crate) fn assert_same_outputs(before: &Module, after: &Module) {
    for seed in [1, 2, 3] {
        let inputs = random_inputs(before, seed);
        let want = kiln_ir::interp::run(before, inputs.clone()).expect("the original module runs");
        let got = kiln_ir::interp::run(after, inputs).expect("the rewritten module runs");
        assert_close(&got, &want, 1e-4, 1e-5, &format!("seed {seed}"));
    }
}

/// How many ops of type `op_type` (`graph.` omitted) `m` has, nested ones included.
pub(crate) fn count(m: &Module, op_type: &str) -> usize {
    let full = format!("graph.{op_type}");
    let mut n = 0;
    m.walk(&mut |_, op| n += (op.name == full) as usize);
    n
}

/// Op types of the top-level body, in order, constants left out.
pub(crate) fn body_ops(m: &Module) -> Vec<String> {
    m.body.ops.iter().map(|&o| m.op(o).op_type().to_string()).filter(|t| t != "Constant").collect()
}

/// Output names, in order.
pub(crate) fn output_names(m: &Module) -> Vec<Option<String>> {
    m.outputs().iter().map(|&v| m.value(v).name.clone()).collect()
}

/// The op defining `v` (panics on a block argument).
pub(crate) fn def_op(m: &Module, v: ValueId) -> OpId {
    match m.value(v).def {
        ValueDef::OpResult(o, _) => o,
        ValueDef::BlockArg => panic!("{} is a block argument", m.value_label(v)),
    }
}

/// The constant value of `v`, when a `graph.Constant` defines it.
fn const_of(m: &Module, v: ValueId) -> Option<&Tensor> {
    let ValueDef::OpResult(o, _) = m.value(v).def else { return None };
    match (m.op(o).op_type(), m.op(o).attrs.get("value")) {
        ("Constant", Some(Attr::Tensor(t))) => Some(t),
        _ => None,
    }
}

/// Saturates `m` with `rules` only, verifies the result, checks outputs and output names
/// are unchanged, and returns the result with the stats.
fn rewrite(m: &Module, rules: &[Rule]) -> (Module, SaturationStats) {
    let rws: Vec<_> = rules.iter().map(|r| r.rewrite()).collect();
    let (out, stats) = saturate(m, &rws, &cost(), Limits::default()).expect("saturation and extraction succeed");
    kiln_ir::verify::verify(&out).unwrap_or_else(|e| panic!("the rewritten module verifies: {e}"));
    assert_eq!(output_names(&out), output_names(m), "output names are kept");
    assert_same_outputs(m, &out);
    (out, stats)
}

fn fired(stats: &SaturationStats, rule: Rule) -> bool {
    stats.applied.get(rule.name).is_some_and(|&n| n > 0)
}

fn perm(p: &[i64]) -> Attrs {
    attrs(&[("perm", Attr::Ints(p.to_vec()))])
}

// ---------------------------------------------------------------------------------------
// Algebraic rules.

#[test]
fn transpose_transpose_identity_disappears() {
    let mut b = Builder::new("tt");
    let x = b.input("x", &[2, 3, 4]);
    let t1 = b.op("Transpose", &[x], perm(&[1, 2, 0]));
    let t2 = b.op("Transpose", &[t1], perm(&[2, 0, 1]));
    let y = b.op0("Relu", &[t2]);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::TRANSPOSE_TRANSPOSE]);
    assert!(fired(&stats, rules::TRANSPOSE_TRANSPOSE));
    assert_eq!(body_ops(&out), ["Relu"]);
    let relu = def_op(&out, out.outputs()[0]);
    assert_eq!(out.op(relu).operands[0], Some(out.inputs()[0]), "Relu reads x directly");
}

#[test]
fn transpose_transpose_composes_into_one() {
    let mut b = Builder::new("tt2");
    let x = b.input("x", &[2, 3, 4]);
    let t1 = b.op("Transpose", &[x], perm(&[1, 2, 0]));
    let t2 = b.op("Transpose", &[t1], perm(&[1, 2, 0]));
    let y = b.op0("Relu", &[t2]);
    b.output(y, "y");
    let m = b.finish();
    let (out, _) = rewrite(&m, &[rules::TRANSPOSE_TRANSPOSE]);
    assert_eq!(count(&out, "Transpose"), 1);
    let t = def_op(&out, out.op(def_op(&out, out.outputs()[0])).operands[0].unwrap());
    assert_eq!(out.op(t).attrs.get("perm"), Some(&Attr::Ints(vec![2, 0, 1])));
    assert_eq!(out.op(t).operands[0], Some(out.inputs()[0]));
}

#[test]
fn view_noop_drops_views_to_the_same_type() {
    let mut b = Builder::new("noop");
    let x = b.input("x", &[2, 3]);
    let s = b.ints(&[2, 3]);
    let r = b.op0("Reshape", &[x, s]);
    let i = b.op0("Identity", &[r]);
    let y = b.op0("Exp", &[i]);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::VIEW_NOOP]);
    assert!(fired(&stats, rules::VIEW_NOOP));
    assert_eq!(body_ops(&out), ["Exp"]);
}

#[test]
fn view_noop_keeps_a_real_reshape() {
    let mut b = Builder::new("noop-neg");
    let x = b.input("x", &[2, 3]);
    let s = b.ints(&[3, 2]);
    let r = b.op0("Reshape", &[x, s]);
    let y = b.op0("Exp", &[r]);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::VIEW_NOOP]);
    assert!(!fired(&stats, rules::VIEW_NOOP));
    assert_eq!(body_ops(&out), ["Reshape", "Exp"]);
}

#[test]
fn view_chain_becomes_one_reshape() {
    let mut b = Builder::new("chain");
    let x = b.input("x", &[2, 3, 4]);
    let f = b.op("Flatten", &[x], attrs(&[("axis", Attr::Int(1))]));
    let axes = b.ints(&[0]);
    let u = b.op0("Unsqueeze", &[f, axes]);
    let y = b.op0("Neg", &[u]);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::VIEW_CHAIN]);
    assert!(fired(&stats, rules::VIEW_CHAIN));
    assert_eq!(body_ops(&out), ["Reshape", "Neg"]);
    let r = def_op(&out, out.op(def_op(&out, out.outputs()[0])).operands[0].unwrap());
    assert_eq!(out.op(r).operands[0], Some(out.inputs()[0]), "the Reshape reads x");
    assert_eq!(const_of(&out, out.op(r).operands[1].unwrap()).map(|t| t.to_i64()), Some(vec![1, 2, 12]));
}

/// `x[1,3,8,8]` → Conv (constant weights `[4,3,3,3]`, optional constant bias) → the result.
fn conv(b: &mut Builder, with_bias: bool) -> (ValueId, ValueId) {
    let x = b.input("x", &[1, 3, 8, 8]);
    let w = b.random_const(&[4, 3, 3, 3], 11, -0.5, 0.5);
    let a = attrs(&[("pads", Attr::Ints(vec![1, 1, 1, 1])), ("kernel_shape", Attr::Ints(vec![3, 3]))]);
    let y = if with_bias {
        let bias = b.random_const(&[4], 12, -0.5, 0.5);
        b.op("Conv", &[x, w, bias], a)
    } else {
        b.op("Conv", &[x, w], a)
    };
    (x, y)
}

fn batchnorm(b: &mut Builder, y: ValueId, training: bool) -> ValueId {
    let scale = b.random_const(&[4], 21, 0.5, 1.5);
    let beta = b.random_const(&[4], 22, -0.5, 0.5);
    let mean = b.random_const(&[4], 23, -0.5, 0.5);
    let var = b.random_const(&[4], 24, 0.5, 2.0);
    let mut a = attrs(&[("epsilon", Attr::Float(1e-3))]);
    if training {
        a.insert("training_mode".into(), Attr::Int(1));
    }
    b.op("BatchNormalization", &[y, scale, beta, mean, var], a)
}

#[test]
fn bn_into_conv_folds_inference_batchnorm() {
    let mut b = Builder::new("bn");
    let (_, c) = conv(&mut b, true);
    let y = batchnorm(&mut b, c, false);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::BN_INTO_CONV]);
    assert!(fired(&stats, rules::BN_INTO_CONV));
    assert_eq!(body_ops(&out), ["Conv"]);
}

#[test]
fn bn_into_conv_folds_into_a_conv_without_bias() {
    let mut b = Builder::new("bn-nobias");
    let (_, c) = conv(&mut b, false);
    let y = batchnorm(&mut b, c, false);
    b.output(y, "y");
    let m = b.finish();
    let (out, _) = rewrite(&m, &[rules::BN_INTO_CONV]);
    assert_eq!(body_ops(&out), ["Conv"]);
    let conv = def_op(&out, out.outputs()[0]);
    assert_eq!(out.op(conv).operands.len(), 3, "the folded Conv has a bias");
}

#[test]
fn bn_into_conv_skips_training_mode() {
    let mut b = Builder::new("bn-train");
    let (_, c) = conv(&mut b, true);
    let y = batchnorm(&mut b, c, true);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::BN_INTO_CONV]);
    assert!(!fired(&stats, rules::BN_INTO_CONV));
    assert_eq!(body_ops(&out), ["Conv", "BatchNormalization"]);
}

#[test]
fn bn_into_conv_skips_non_constant_weights() {
    let mut b = Builder::new("bn-dyn");
    let x = b.input("x", &[1, 3, 8, 8]);
    let w = b.input("w", &[4, 3, 3, 3]);
    let c = b.op("Conv", &[x, w], Attrs::new());
    let y = batchnorm(&mut b, c, false);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::BN_INTO_CONV]);
    assert!(!fired(&stats, rules::BN_INTO_CONV));
    assert_eq!(count(&out, "BatchNormalization"), 1);
}

#[test]
fn scale_into_conv_folds_per_channel_constants() {
    for shape in [vec![1, 4, 1, 1], vec![4, 1, 1], vec![1]] {
        let mut b = Builder::new("scale");
        let (_, c) = conv(&mut b, true);
        let k = b.random_const(&shape, 31, 0.5, 2.0);
        let y = b.op0("Mul", &[k, c]);
        b.output(y, "y");
        let m = b.finish();
        let (out, stats) = rewrite(&m, &[rules::SCALE_INTO_CONV]);
        assert!(fired(&stats, rules::SCALE_INTO_CONV), "constant of shape {shape:?}");
        assert_eq!(body_ops(&out), ["Conv"], "constant of shape {shape:?}");
    }
}

/// A constant that broadcasts along the width (or the batch), not the channels, must stay a
/// Mul, even where its length equals the channel count.
#[test]
fn scale_into_conv_skips_constants_that_are_not_per_channel() {
    // Output [4, 4, 4, 4]: batch, channels, height and width all 4, so every constant below
    // has 4 values, but only [4, 1, 1] or [1, 4, 1, 1] would be per channel.
    for shape in [vec![4], vec![1, 1, 1, 4], vec![4, 1, 1, 1]] {
        let mut b = Builder::new("scale-neg");
        let x = b.input("x", &[4, 3, 4, 4]);
        let w = b.random_const(&[4, 3, 1, 1], 11, -0.5, 0.5);
        let c = b.op("Conv", &[x, w], Attrs::new());
        let k = b.random_const(&shape, 32, 0.5, 2.0);
        let y = b.op0("Mul", &[c, k]);
        b.output(y, "y");
        let m = b.finish();
        let (out, stats) = rewrite(&m, &[rules::SCALE_INTO_CONV]);
        assert!(!fired(&stats, rules::SCALE_INTO_CONV), "constant of shape {shape:?}");
        assert_eq!(body_ops(&out), ["Conv", "Mul"], "constant of shape {shape:?}");
    }
}

#[test]
fn bias_into_conv_folds_per_channel_constants() {
    for with_bias in [false, true] {
        let mut b = Builder::new("bias");
        let (_, c) = conv(&mut b, with_bias);
        let k = b.random_const(&[1, 4, 1, 1], 41, -1.0, 1.0);
        let y = b.op0("Add", &[c, k]);
        b.output(y, "y");
        let m = b.finish();
        let (out, stats) = rewrite(&m, &[rules::BIAS_INTO_CONV]);
        assert!(fired(&stats, rules::BIAS_INTO_CONV));
        assert_eq!(body_ops(&out), ["Conv"]);
    }
}

#[test]
fn bias_into_conv_skips_a_per_position_constant() {
    let mut b = Builder::new("bias-neg");
    let (_, c) = conv(&mut b, true);
    let k = b.random_const(&[1, 1, 8, 8], 42, -1.0, 1.0);
    let y = b.op0("Add", &[c, k]);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::BIAS_INTO_CONV]);
    assert!(!fired(&stats, rules::BIAS_INTO_CONV));
    assert_eq!(body_ops(&out), ["Conv", "Add"]);
}

#[test]
fn scalar_chain_folds_adds_and_muls() {
    for sym in ["Add", "Mul"] {
        let mut b = Builder::new("scalars");
        let x = b.input("x", &[4, 5]);
        let c1 = b.scalar(1.5);
        let c2 = b.scalar(-0.25);
        let a = b.op0(sym, &[x, c1]);
        let y = b.op0(sym, &[c2, a]);
        b.output(y, "y");
        let m = b.finish();
        let (out, stats) = rewrite(&m, &[rules::SCALAR_CHAIN]);
        assert!(fired(&stats, rules::SCALAR_CHAIN));
        assert_eq!(body_ops(&out), [sym]);
        let op = out.op(def_op(&out, out.outputs()[0]));
        let k = op.operands.iter().flatten().find_map(|&v| const_of(&out, v)).expect("a constant operand");
        let want = if sym == "Add" { 1.25 } else { -0.375 };
        assert_eq!(k.to_f64(), [want]);
    }
}

#[test]
fn scalar_chain_leaves_mixed_chains() {
    let mut b = Builder::new("mixed");
    let x = b.input("x", &[4, 5]);
    let c1 = b.scalar(1.5);
    let c2 = b.scalar(2.0);
    let a = b.op0("Add", &[x, c1]);
    let y = b.op0("Mul", &[a, c2]);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::SCALAR_CHAIN]);
    assert!(!fired(&stats, rules::SCALAR_CHAIN));
    assert_eq!(body_ops(&out), ["Add", "Mul"]);
}

#[test]
fn scalar_chain_skips_non_scalar_constants() {
    let mut b = Builder::new("vec");
    let x = b.input("x", &[4, 5]);
    let c1 = b.random_const(&[5], 3, -1.0, 1.0);
    let c2 = b.scalar(2.0);
    let a = b.op0("Add", &[x, c1]);
    let y = b.op0("Add", &[a, c2]);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::SCALAR_CHAIN]);
    assert!(!fired(&stats, rules::SCALAR_CHAIN));
    assert_eq!(body_ops(&out), ["Add", "Add"]);
}

/// `(a·b)·c` with `a: [64,2]`, `b: [2,64]`, `c: [64,2]`: `a·(b·c)` never builds the 64×64
/// product; and the mirror image.
#[test]
fn matmul_assoc_picks_the_cheaper_order() {
    for left_first in [true, false] {
        let mut b = Builder::new("assoc");
        let (n, k) = if left_first { (64, 2) } else { (2, 64) };
        let a = b.input("a", &[n, k]);
        let bb = b.input("b", &[k, n]);
        let c = b.input("c", &[n, k]);
        let y = if left_first {
            let ab = b.op0("MatMul", &[a, bb]);
            b.op0("MatMul", &[ab, c])
        } else {
            let bc = b.op0("MatMul", &[bb, c]);
            b.op0("MatMul", &[a, bc])
        };
        b.output(y, "y");
        let m = b.finish();
        let (out, stats) = rewrite(&m, &[rules::MATMUL_ASSOC]);
        assert!(fired(&stats, rules::MATMUL_ASSOC));
        assert_eq!(body_ops(&out), ["MatMul", "MatMul"]);
        let root = out.op(def_op(&out, out.outputs()[0]));
        let ins = out.inputs();
        if left_first {
            // a·(b·c)
            assert_eq!(root.operands[0], Some(ins[0]));
            let inner = out.op(def_op(&out, root.operands[1].unwrap()));
            assert_eq!(inner.operands, [Some(ins[1]), Some(ins[2])]);
        } else {
            // (a·b)·c
            assert_eq!(root.operands[1], Some(ins[2]));
            let inner = out.op(def_op(&out, root.operands[0].unwrap()));
            assert_eq!(inner.operands, [Some(ins[0]), Some(ins[1])]);
        }
    }
}

#[test]
fn matmul_assoc_keeps_the_cheap_order() {
    let mut b = Builder::new("assoc-keep");
    let a = b.input("a", &[2, 64]);
    let bb = b.input("b", &[64, 2]);
    let c = b.input("c", &[2, 64]);
    let ab = b.op0("MatMul", &[a, bb]);
    let y = b.op0("MatMul", &[ab, c]);
    b.output(y, "y");
    let m = b.finish();
    let (out, _) = rewrite(&m, &[rules::MATMUL_ASSOC]);
    let root = out.op(def_op(&out, out.outputs()[0]));
    assert_eq!(root.operands[1], Some(out.inputs()[2]), "(a·b)·c is kept");
}

#[test]
fn matmul_merge_makes_one_matmul_of_qkv() {
    let mut b = Builder::new("qkv");
    let x = b.input("x", &[2, 8, 16]);
    let mut outs = vec![];
    for (i, n) in [16usize, 16, 8].into_iter().enumerate() {
        let w = b.random_const(&[16, n], 50 + i as u64, -0.5, 0.5);
        outs.push(b.op0("MatMul", &[x, w]));
    }
    for (v, name) in outs.into_iter().zip(["q", "k", "v"]) {
        b.output(v, name);
    }
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::MATMUL_MERGE]);
    assert!(fired(&stats, rules::MATMUL_MERGE));
    assert_eq!(count(&out, "MatMul"), 1);
    assert_eq!(count(&out, "Slice"), 3);
    let mm = out.body.ops.iter().copied().find(|&o| out.op(o).op_type() == "MatMul").unwrap();
    let w = const_of(&out, out.op(mm).operands[1].unwrap()).expect("constant merged weights");
    assert_eq!(w.shape, [16, 40]);
}

#[test]
fn matmul_merge_skips_matmuls_of_different_inputs() {
    let mut b = Builder::new("qkv-neg");
    let x = b.input("x", &[8, 16]);
    let w1 = b.random_const(&[16, 8], 1, -0.5, 0.5);
    let y1 = b.op0("MatMul", &[x, w1]);
    let x2 = b.op0("Relu", &[x]);
    let w2 = b.random_const(&[16, 8], 2, -0.5, 0.5);
    let y2 = b.op0("MatMul", &[x2, w2]);
    b.output(y1, "y1");
    b.output(y2, "y2");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::MATMUL_MERGE]);
    assert!(!fired(&stats, rules::MATMUL_MERGE), "different left operands");
    assert_eq!(count(&out, "MatMul"), 2);
}

// ---------------------------------------------------------------------------------------
// Recognition of decomposed ops.

#[derive(Clone, Copy, Debug)]
enum Square {
    Pow,
    Mul,
}

/// `(x - mean(x)) / sqrt(mean((x - mean(x))²) + eps)`, the means over `axis`.
fn layernorm_decomposed(b: &mut Builder, x: ValueId, axis: i64, sq: Square) -> ValueId {
    let mean = b.reduce("ReduceMean", x, &[axis]);
    let d = b.op0("Sub", &[x, mean]);
    let s = match sq {
        Square::Pow => {
            let two = b.scalar(2.0);
            b.op0("Pow", &[d, two])
        }
        Square::Mul => b.op0("Mul", &[d, d]),
    };
    let var = b.reduce("ReduceMean", s, &[axis]);
    let eps = b.scalar(1e-5);
    let ve = b.op0("Add", &[var, eps]);
    let den = b.op0("Sqrt", &[ve]);
    b.op0("Div", &[d, den])
}

#[test]
fn layernorm_recognized_with_axes_attribute_and_input() {
    // (opset, axis, square): opset 17 takes axes as an attribute, 18 as an input.
    for (opset, axis, sq) in [(17, -1, Square::Pow), (17, 2, Square::Mul), (18, -1, Square::Mul), (18, 2, Square::Pow)]
    {
        let mut b = Builder::with_opset("ln", opset);
        let x = b.input("x", &[2, 4, 8]);
        let y = layernorm_decomposed(&mut b, x, axis, sq);
        b.output(y, "y");
        let m = b.finish();
        let has_axes_input =
            m.body.ops.iter().any(|&o| m.op(o).op_type() == "ReduceMean" && m.op(o).operands.len() == 2);
        assert_eq!(has_axes_input, opset >= 18);
        let (out, stats) = rewrite(&m, &[rules::LAYERNORM]);
        let case = format!("opset {opset}, axis {axis}, {sq:?}");
        assert!(fired(&stats, rules::LAYERNORM), "{case}");
        assert_eq!(body_ops(&out), ["LayerNormalization"], "{case}");
        assert_eq!(count(&out, "ReduceMean"), 0, "{case}");
    }
}

#[test]
fn layernorm_not_recognized_over_another_axis() {
    let mut b = Builder::with_opset("ln-neg", 18);
    let x = b.input("x", &[2, 4, 8]);
    let y = layernorm_decomposed(&mut b, x, 1, Square::Pow);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::LAYERNORM]);
    assert!(!fired(&stats, rules::LAYERNORM));
    assert_eq!(count(&out, "LayerNormalization"), 0);
    assert_eq!(count(&out, "ReduceMean"), 2);
}

#[test]
fn layernorm_not_recognized_with_variance_over_another_axis() {
    let mut b = Builder::with_opset("ln-neg2", 18);
    let x = b.input("x", &[2, 4, 8]);
    let mean = b.reduce("ReduceMean", x, &[-1]);
    let d = b.op0("Sub", &[x, mean]);
    let s = b.op0("Mul", &[d, d]);
    let var = b.reduce("ReduceMean", s, &[1]);
    let eps = b.scalar(1e-5);
    let ve = b.op0("Add", &[var, eps]);
    let den = b.op0("Sqrt", &[ve]);
    let y = b.op0("Div", &[d, den]);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::LAYERNORM]);
    assert!(!fired(&stats, rules::LAYERNORM));
    assert_eq!(count(&out, "LayerNormalization"), 0);
}

#[test]
fn layernorm_affine_folds_gamma_and_beta() {
    for gshape in [vec![8], vec![1, 1, 8]] {
        let mut b = Builder::new("ln-affine");
        let x = b.input("x", &[2, 4, 8]);
        let n = layernorm_decomposed(&mut b, x, -1, Square::Pow);
        let g = b.random_const(&gshape, 61, 0.5, 1.5);
        let beta = b.random_const(&[8], 62, -0.5, 0.5);
        let s = b.op0("Mul", &[g, n]);
        let y = b.op0("Add", &[s, beta]);
        b.output(y, "y");
        let m = b.finish();
        // LAYERNORM_AFFINE needs LAYERNORM to see the LayerNormalization.
        let (out, stats) = rewrite(&m, &[rules::LAYERNORM, rules::LAYERNORM_AFFINE]);
        assert!(fired(&stats, rules::LAYERNORM_AFFINE));
        assert_eq!(body_ops(&out), ["LayerNormalization"], "gamma of shape {gshape:?}");
        let ln = out.op(def_op(&out, out.outputs()[0]));
        let gamma = const_of(&out, ln.operands[1].unwrap()).unwrap();
        assert!(gamma.to_f64().iter().any(|&v| v != 1.0), "gamma folded in");
    }
}

/// `x / sqrt(mean(x²) + eps)` (or `x · 1/sqrt(..)`).
fn rms_decomposed(b: &mut Builder, x: ValueId, sq: Square, reciprocal: bool) -> ValueId {
    let s = match sq {
        Square::Pow => {
            let two = b.scalar(2.0);
            b.op0("Pow", &[x, two])
        }
        Square::Mul => b.op0("Mul", &[x, x]),
    };
    let ms = b.reduce("ReduceMean", s, &[-1]);
    let eps = b.scalar(1e-6);
    let a = b.op0("Add", &[eps, ms]);
    let den = b.op0("Sqrt", &[a]);
    if reciprocal {
        let r = b.op0("Reciprocal", &[den]);
        b.op0("Mul", &[r, x])
    } else {
        b.op0("Div", &[x, den])
    }
}

#[test]
fn rmsnorm_recognized_with_div_and_reciprocal() {
    for (sq, reciprocal) in [(Square::Pow, false), (Square::Mul, true), (Square::Mul, false), (Square::Pow, true)] {
        let mut b = Builder::new("rms");
        let x = b.input("x", &[2, 4, 8]);
        let y = rms_decomposed(&mut b, x, sq, reciprocal);
        b.output(y, "y");
        let m = b.finish();
        let (out, stats) = rewrite(&m, &[rules::RMSNORM]);
        let case = format!("{sq:?}, reciprocal {reciprocal}");
        assert!(fired(&stats, rules::RMSNORM), "{case}");
        assert_eq!(body_ops(&out), ["RMSNormalization"], "{case}");
    }
}

#[test]
fn rmsnorm_not_recognized_over_another_axis_or_another_input() {
    // The mean over axis 1.
    let mut b = Builder::new("rms-neg");
    let x = b.input("x", &[2, 4, 8]);
    let s = b.op0("Mul", &[x, x]);
    let ms = b.reduce("ReduceMean", s, &[1]);
    let eps = b.scalar(1e-6);
    let a = b.op0("Add", &[ms, eps]);
    let den = b.op0("Sqrt", &[a]);
    let y = b.op0("Div", &[x, den]);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::RMSNORM]);
    assert!(!fired(&stats, rules::RMSNORM));
    assert_eq!(count(&out, "RMSNormalization"), 0);

    // Another tensor divided by the RMS of x.
    let mut b = Builder::new("rms-neg2");
    let x = b.input("x", &[2, 4, 8]);
    let z = b.input("z", &[2, 4, 8]);
    let s = b.op0("Mul", &[x, x]);
    let ms = b.reduce("ReduceMean", s, &[-1]);
    let eps = b.scalar(1e-6);
    let a = b.op0("Add", &[ms, eps]);
    let den = b.op0("Sqrt", &[a]);
    let y = b.op0("Div", &[z, den]);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::RMSNORM]);
    assert!(!fired(&stats, rules::RMSNORM));
    assert_eq!(count(&out, "RMSNormalization"), 0);
}

#[test]
fn rmsnorm_scale_folds_the_weight() {
    let mut b = Builder::new("rms-scale");
    let x = b.input("x", &[2, 4, 8]);
    let n = rms_decomposed(&mut b, x, Square::Pow, false);
    let w = b.random_const(&[8], 71, 0.5, 1.5);
    let y = b.op0("Mul", &[n, w]);
    b.output(y, "y");
    let m = b.finish();
    // RMSNORM_SCALE needs RMSNORM to see the RMSNormalization.
    let (out, stats) = rewrite(&m, &[rules::RMSNORM, rules::RMSNORM_SCALE]);
    assert!(fired(&stats, rules::RMSNORM_SCALE));
    assert_eq!(body_ops(&out), ["RMSNormalization"]);
}

#[test]
fn gelu_erf_recognized_in_both_export_orders() {
    for order in 0..2 {
        let mut b = Builder::new("gelu");
        let x = b.input("x", &[4, 16]);
        let y = if order == 0 {
            // x·(1+erf(x/√2))·0.5
            let s2 = b.scalar(std::f32::consts::SQRT_2);
            let d = b.op0("Div", &[x, s2]);
            let e = b.op0("Erf", &[d]);
            let one = b.scalar(1.0);
            let p = b.op0("Add", &[e, one]);
            let xp = b.op0("Mul", &[x, p]);
            let half = b.scalar(0.5);
            b.op0("Mul", &[xp, half])
        } else {
            // (x·0.5)·(1+erf(x·(1/√2)))
            let half = b.scalar(0.5);
            let xh = b.op0("Mul", &[x, half]);
            let r2 = b.scalar(std::f32::consts::FRAC_1_SQRT_2);
            let d = b.op0("Mul", &[x, r2]);
            let e = b.op0("Erf", &[d]);
            let one = b.scalar(1.0);
            let p = b.op0("Add", &[one, e]);
            b.op0("Mul", &[xh, p])
        };
        b.output(y, "y");
        let m = b.finish();
        let (out, stats) = rewrite(&m, &[rules::GELU_ERF]);
        assert!(fired(&stats, rules::GELU_ERF), "order {order}");
        assert_eq!(body_ops(&out), ["Gelu"], "order {order}");
    }
}

#[test]
fn gelu_erf_not_recognized_with_a_wrong_constant() {
    let mut b = Builder::new("gelu-neg");
    let x = b.input("x", &[4, 16]);
    let s2 = b.scalar(1.5);
    let d = b.op0("Div", &[x, s2]);
    let e = b.op0("Erf", &[d]);
    let one = b.scalar(1.0);
    let p = b.op0("Add", &[e, one]);
    let xp = b.op0("Mul", &[x, p]);
    let half = b.scalar(0.5);
    let y = b.op0("Mul", &[xp, half]);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::GELU_ERF]);
    assert!(!fired(&stats, rules::GELU_ERF));
    assert_eq!(count(&out, "Gelu"), 0);
}

#[test]
fn silu_recognized_in_both_orders() {
    for swap in [false, true] {
        let mut b = Builder::new("silu");
        let x = b.input("x", &[4, 16]);
        let s = b.op0("Sigmoid", &[x]);
        let y = if swap { b.op0("Mul", &[s, x]) } else { b.op0("Mul", &[x, s]) };
        b.output(y, "y");
        let m = b.finish();
        let (out, stats) = rewrite(&m, &[rules::SILU]);
        assert!(fired(&stats, rules::SILU));
        assert_eq!(body_ops(&out), ["Swish"]);
    }
}

#[test]
fn silu_not_recognized_on_another_tensor() {
    let mut b = Builder::new("silu-neg");
    let x = b.input("x", &[4, 16]);
    let z = b.input("z", &[4, 16]);
    let s = b.op0("Sigmoid", &[z]);
    let y = b.op0("Mul", &[x, s]);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::SILU]);
    assert!(!fired(&stats, rules::SILU));
    assert_eq!(count(&out, "Swish"), 0);
}

/// `exp(x - max(x)) / sum(exp(x - max(x)))` (or without the max), max over `max_axis`,
/// sum over `sum_axis`.
fn softmax_decomposed(b: &mut Builder, x: ValueId, max_axis: Option<i64>, sum_axis: i64) -> ValueId {
    let arg = match max_axis {
        Some(a) => {
            let mx = b.reduce("ReduceMax", x, &[a]);
            b.op0("Sub", &[x, mx])
        }
        None => x,
    };
    let e = b.op0("Exp", &[arg]);
    let s = b.reduce("ReduceSum", e, &[sum_axis]);
    b.op0("Div", &[e, s])
}

#[test]
fn softmax_recognized_with_and_without_max() {
    for (max_axis, opset) in [(Some(-1), 28), (None, 28), (Some(2), 17), (None, 13)] {
        let mut b = Builder::with_opset("softmax", opset);
        let x = b.input("x", &[2, 4, 8]);
        let y = softmax_decomposed(&mut b, x, max_axis, -1);
        b.output(y, "y");
        let m = b.finish();
        let (out, stats) = rewrite(&m, &[rules::SOFTMAX]);
        let case = format!("max over {max_axis:?}, opset {opset}");
        assert!(fired(&stats, rules::SOFTMAX), "{case}");
        assert_eq!(body_ops(&out), ["Softmax"], "{case}");
        let sm = out.op(def_op(&out, out.outputs()[0]));
        assert_eq!(sm.operands[0], Some(out.inputs()[0]), "{case}: Softmax of x itself");
    }
}

#[test]
fn softmax_not_recognized_when_the_sum_is_over_another_axis() {
    for max_axis in [Some(1), None] {
        let mut b = Builder::new("softmax-neg");
        let x = b.input("x", &[2, 4, 8]);
        let y = softmax_decomposed(&mut b, x, max_axis, 1);
        b.output(y, "y");
        let m = b.finish();
        let (out, stats) = rewrite(&m, &[rules::SOFTMAX]);
        assert!(!fired(&stats, rules::SOFTMAX));
        assert_eq!(count(&out, "Softmax"), 0);
    }
}

/// A max over another axis does not shift each softmax row by one constant, so `Softmax(x)`
/// would be wrong: the rule may recognize `Softmax(x - max)`, keeping the subtraction.
#[test]
fn softmax_keeps_a_max_over_another_axis() {
    let mut b = Builder::new("softmax-max");
    let x = b.input("x", &[2, 4, 8]);
    let y = softmax_decomposed(&mut b, x, Some(1), -1);
    b.output(y, "y");
    let m = b.finish();
    let (out, _) = rewrite(&m, &[rules::SOFTMAX]);
    assert_eq!(count(&out, "Softmax"), 1);
    let sm = out.op(def_op(&out, out.outputs()[0]));
    assert_ne!(sm.operands[0], Some(out.inputs()[0]), "the Softmax reads x - max, not x");
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mask {
    /// `Where(mask, s, -inf)` with a boolean causal mask `[1,1,8,8]`.
    Where,
    /// `s + mask` with an additive causal mask `[1,1,8,8]` (0 / -1e9).
    Additive,
    None,
}

/// `softmax(mask(scale(Q·Kᵀ)))·V` on `[1,2,8,4]` inputs, with `Kᵀ = Transpose(K)`.
fn attention_decomposed(b: &mut Builder, mask: Mask, fill: f32, softmax_axis: i64) -> ValueId {
    let q = b.input("q", &[1, 2, 8, 4]);
    let k = b.input("k", &[1, 2, 8, 4]);
    let v = b.input("v", &[1, 2, 8, 4]);
    let kt = b.op("Transpose", &[k], perm(&[0, 1, 3, 2]));
    let s = b.op0("MatMul", &[q, kt]);
    let scaled = if mask == Mask::Additive {
        let h = b.scalar(0.5);
        b.op0("Mul", &[s, h])
    } else {
        let d = b.scalar(2.0);
        b.op0("Div", &[s, d])
    };
    let causal = |i: usize| (i % 8) <= (i / 8) % 8;
    let masked = match mask {
        Mask::Where => {
            let mv = b.constant(Tensor::from_bool(&[1, 1, 8, 8], (0..64).map(causal).collect()));
            let f = b.scalar(fill);
            b.op0("Where", &[mv, scaled, f])
        }
        Mask::Additive => {
            let vals = (0..64).map(|i| if causal(i) { 0.0 } else { -1e9 }).collect();
            let mv = b.constant(Tensor::from_f32(&[1, 1, 8, 8], vals));
            b.op0("Add", &[scaled, mv])
        }
        Mask::None => scaled,
    };
    let p = b.op("Softmax", &[masked], attrs(&[("axis", Attr::Int(softmax_axis))]));
    b.op0("MatMul", &[p, v])
}

#[test]
fn attention_recognized_with_bool_and_additive_masks() {
    for (mask, axis) in [(Mask::Where, -1), (Mask::Additive, 3), (Mask::None, -1)] {
        let mut b = Builder::new("attn");
        let y = attention_decomposed(&mut b, mask, f32::NEG_INFINITY, axis);
        b.output(y, "y");
        let m = b.finish();
        // TRANSPOSE_TRANSPOSE composes the rule's Transpose of Kᵀ with the given one.
        let (out, stats) = rewrite(&m, &[rules::ATTENTION, rules::TRANSPOSE_TRANSPOSE]);
        let case = format!("{mask:?} mask");
        assert!(fired(&stats, rules::ATTENTION), "{case}");
        assert_eq!(body_ops(&out), ["Attention"], "{case}");
        let at = out.op(def_op(&out, out.outputs()[0]));
        let ins = out.inputs();
        assert_eq!(&at.operands[..3], &[Some(ins[0]), Some(ins[1]), Some(ins[2])], "{case}: Attention(q, k, v)");
        assert_eq!(at.operands.len(), if mask == Mask::None { 3 } else { 4 }, "{case}");
    }
}

#[test]
fn attention_alone_keeps_k_through_two_transposes() {
    let mut b = Builder::new("attn-alone");
    let y = attention_decomposed(&mut b, Mask::Where, f32::NEG_INFINITY, -1);
    b.output(y, "y");
    let m = b.finish();
    let (out, stats) = rewrite(&m, &[rules::ATTENTION]);
    assert!(fired(&stats, rules::ATTENTION));
    assert_eq!(count(&out, "Attention"), 1);
    assert_eq!(count(&out, "Softmax"), 0);
}

#[test]
fn attention_not_recognized_with_a_finite_where_fill_or_another_softmax_axis() {
    for (fill, axis) in [(0.0, -1), (f32::NEG_INFINITY, 2)] {
        let mut b = Builder::new("attn-neg");
        let y = attention_decomposed(&mut b, Mask::Where, fill, axis);
        b.output(y, "y");
        let m = b.finish();
        let (out, _) = rewrite(&m, &[rules::ATTENTION, rules::TRANSPOSE_TRANSPOSE]);
        assert_eq!(count(&out, "Attention"), 0, "fill {fill}, axis {axis}");
        if fill == 0.0 {
            // The unmasked form (no Where) would be recognizable; the Where must stay.
            assert_eq!(count(&out, "Where"), 1);
        }
    }
}

/// A mask that broadcasts along the keys (last dim 1) treats a whole row alike, but Attention
/// pads a mask shorter than the key length with -inf: it is not an attention mask.
#[test]
fn attention_not_recognized_with_a_mask_broadcast_along_keys() {
    for (mask_shape, boolean) in [(vec![1, 1, 8, 1], false), (vec![8, 1], false), (vec![1, 1, 8, 1], true)] {
        let mut b = Builder::new("attn-rowmask");
        let q = b.input("q", &[1, 2, 8, 4]);
        let k = b.input("k", &[1, 2, 8, 4]);
        let v = b.input("v", &[1, 2, 8, 4]);
        let kt = b.op("Transpose", &[k], perm(&[0, 1, 3, 2]));
        let s = b.op0("MatMul", &[q, kt]);
        let masked = if boolean {
            // All true: the Where keeps every score (rows fully masked would give NaN).
            let mk = b.constant(Tensor::from_bool(&mask_shape, vec![true; 8]));
            let ninf = b.scalar(f32::NEG_INFINITY);
            b.op0("Where", &[mk, s, ninf])
        } else {
            let mk = b.random_const(&mask_shape, 81, -1.0, 1.0);
            b.op0("Add", &[s, mk])
        };
        let p = b.op("Softmax", &[masked], attrs(&[("axis", Attr::Int(-1))]));
        let y = b.op0("MatMul", &[p, v]);
        b.output(y, "y");
        let m = b.finish();
        // `rewrite` compares outputs: an Attention taking this mask would attend one key.
        let (out, stats) = rewrite(&m, &[rules::ATTENTION, rules::TRANSPOSE_TRANSPOSE]);
        assert!(!fired(&stats, rules::ATTENTION), "mask {mask_shape:?}, bool {boolean}");
        assert_eq!(count(&out, "Attention"), 0, "mask {mask_shape:?}, bool {boolean}");
    }
}

// ---------------------------------------------------------------------------------------
// Conversion and extraction.

/// Without rules, conversion and extraction give back an equivalent module: multi-result ops
/// (through projections), omitted optional operands, region ops capturing outer values,
/// constants, an output that is an input, and a value yielded twice.
#[test]
fn round_trip_without_rules_keeps_every_kind_of_op() {
    use kiln_ir::ir::{Block, Region};
    let mut b = Builder::new("roundtrip");
    let x = b.input("x", &[4, 6]);
    let cond = b.input_of("cond", DType::Bool, &[]);
    let halves = b.op_n("Split", &[Some(x)], attrs(&[("axis", Attr::Int(0))]), 2);
    let hi = b.scalar(0.5);
    let clipped = b.op_n("Clip", &[Some(halves[0]), None, Some(hi)], Attrs::new(), 1)[0];
    let e = b.op0("Exp", &[halves[1]]);
    // If(cond) { Relu(e) } else { Neg(clipped) }: the branches capture e and clipped.
    let ty = TensorType::known(DType::F32, &[2, 6]);
    let branch = |b: &mut Builder, op: &str, v: ValueId| {
        let o = b.m.create_op(&format!("graph.{op}"), vec![Some(v)], vec![ty.clone()], Attrs::new(), vec![]);
        Region { blocks: vec![Block { args: vec![], ops: vec![o], yields: b.m.op(o).results.clone() }] }
    };
    let then_r = branch(&mut b, "Relu", e);
    let else_r = branch(&mut b, "Neg", clipped);
    let a = attrs(&[
        ("then_branch", Attr::Region(0)),
        ("else_branch", Attr::Region(1)),
        (NODE_NAME_ATTR, Attr::Str("the_if".into())),
    ]);
    let iff = b.m.create_op("graph.If", vec![Some(cond)], vec![ty.clone()], a, vec![then_r, else_r]);
    b.m.body.ops.push(iff);
    let r = b.m.op(iff).results[0];
    let c2 = b.scalar(2.0);
    let c3 = b.scalar(3.0);
    let folded = b.op0("Mul", &[c2, c3]);
    let y = b.op0("Mul", &[r, folded]);
    b.output(y, "y");
    b.output(halves[1], "second_half");
    b.output(e, "e");
    b.m.body.yields.push(e);
    b.output(x, "x_again");
    let m = b.finish();
    let (out, stats) = saturate(&m, &[], &cost(), Limits::default()).expect("round trip");
    kiln_ir::verify::verify(&out).unwrap_or_else(|e| panic!("verifies: {e}"));
    assert!(stats.applied.is_empty());
    assert_eq!(output_names(&out), output_names(&m));
    // Both branches of the If, on several inputs.
    for seed in 0..8 {
        let inputs = random_inputs(&m, seed);
        let want = kiln_ir::interp::run(&m, inputs.clone()).unwrap();
        let got = kiln_ir::interp::run(&out, inputs).unwrap();
        assert_close(&got, &want, 1e-6, 0.0, &format!("seed {seed}"));
    }
    assert_eq!(count(&out, "Split"), 1);
    assert_eq!(count(&out, "If"), 1);
    let clip = out.body.ops.iter().map(|&o| out.op(o)).find(|op| op.op_type() == "Clip").unwrap();
    assert_eq!(clip.operands[1], None, "the omitted min stays omitted");
    let iff = out.body.ops.iter().map(|&o| out.op(o)).find(|op| op.op_type() == "If").unwrap();
    assert_eq!(iff.node_name(), "the_if");
}

// ---------------------------------------------------------------------------------------
// Saturation with every rule: determinism and names.

/// A small transformer block: decomposed LayerNorm, Q/K/V projections, heads split by
/// Reshape + Transpose, attention with a causal Where mask, a GELU MLP and residuals.
fn transformer_block() -> Module {
    let mut b = Builder::new("block");
    let x = b.input("x", &[1, 8, 16]);
    let ln = layernorm_decomposed(&mut b, x, -1, Square::Pow);
    b.name(ln, "ln_out");
    let heads = b.ints(&[1, 8, 2, 8]);
    let mut qkv = vec![];
    for (i, name) in ["q", "k", "v"].into_iter().enumerate() {
        let w = b.random_const(&[16, 16], 100 + i as u64, -0.5, 0.5);
        let p = b.op0("MatMul", &[ln, w]);
        b.name(p, &format!("{name}_proj"));
        let r = b.op0("Reshape", &[p, heads]);
        let t = if name == "k" { perm(&[0, 2, 3, 1]) } else { perm(&[0, 2, 1, 3]) };
        qkv.push(b.op("Transpose", &[r], t));
    }
    let s = b.op0("MatMul", &[qkv[0], qkv[1]]);
    let d = b.scalar(8f32.sqrt());
    let scaled = b.op0("Div", &[s, d]);
    let mv = b.constant(Tensor::from_bool(&[8, 8], (0..64).map(|i| i % 8 <= i / 8).collect()));
    let ninf = b.scalar(f32::NEG_INFINITY);
    let masked = b.op0("Where", &[mv, scaled, ninf]);
    let p = b.op("Softmax", &[masked], attrs(&[("axis", Attr::Int(-1))]));
    let o = b.op0("MatMul", &[p, qkv[2]]);
    let ot = b.op("Transpose", &[o], perm(&[0, 2, 1, 3]));
    let back = b.ints(&[1, 8, 16]);
    let merged = b.op0("Reshape", &[ot, back]);
    let h = b.op0("Add", &[x, merged]);
    b.name(h, "h");
    let w1 = b.random_const(&[16, 32], 110, -0.5, 0.5);
    let up = b.op0("MatMul", &[h, w1]);
    let s2 = b.scalar(std::f32::consts::SQRT_2);
    let e = b.op0("Div", &[up, s2]);
    let erf = b.op0("Erf", &[e]);
    let one = b.scalar(1.0);
    let pe = b.op0("Add", &[erf, one]);
    let g = b.op0("Mul", &[up, pe]);
    let half = b.scalar(0.5);
    let gelu = b.op0("Mul", &[g, half]);
    let w2 = b.random_const(&[32, 16], 111, -0.5, 0.5);
    let down = b.op0("MatMul", &[gelu, w2]);
    let y = b.op0("Add", &[h, down]);
    b.output(y, "y");
    b.output(h, "hidden");
    b.finish()
}

fn saturate_all(m: &Module) -> (Module, SaturationStats) {
    let (out, stats) = saturate(m, &rules::rewrites(), &cost(), Limits::default()).expect("saturates");
    kiln_ir::verify::verify(&out).unwrap_or_else(|e| panic!("verifies: {e}"));
    (out, stats)
}

#[test]
fn saturation_with_every_rule_is_deterministic_and_correct() {
    let m = transformer_block();
    let (a, sa) = saturate_all(&m);
    let (b, sb) = saturate_all(&m);
    let print = |m: &Module| kiln_ir::printer::print_module(m, Default::default());
    assert_eq!(print(&a), print(&b), "two runs give the same module");
    assert_eq!(sa.applied, sb.applied);
    assert_eq!((sa.nodes, sa.classes, sa.iterations), (sb.nodes, sb.classes, sb.iterations));
    assert_same_outputs(&m, &a);
    for (rule, op) in
        [(rules::LAYERNORM, "LayerNormalization"), (rules::GELU_ERF, "Gelu"), (rules::ATTENTION, "Attention")]
    {
        assert!(fired(&sa, rule), "{} applies", rule.name);
        assert_eq!(count(&a, op), 1, "{op} is extracted");
    }
    assert_eq!(count(&a, "ReduceMean"), 0);
    assert_eq!(count(&a, "Softmax"), 0);
    assert!(count(&a, "MatMul") < count(&m, "MatMul"), "Q/K/V projections merged");
}

#[test]
fn saturation_keeps_names() {
    let m = transformer_block();
    let (out, _) = saturate_all(&m);
    assert_eq!(output_names(&out), output_names(&m));
    let in_names = |m: &Module| m.inputs().iter().map(|&v| m.value(v).name.clone()).collect::<Vec<_>>();
    assert_eq!(in_names(&out), in_names(&m));
    // Every node name and value name of the result comes from the source.
    let node_names = |m: &Module| {
        let mut s = BTreeSet::new();
        m.walk(&mut |_, op| {
            if !op.node_name().is_empty() {
                s.insert(op.node_name().to_string());
            }
        });
        s
    };
    let (src_nodes, out_nodes) = (node_names(&m), node_names(&out));
    assert!(out_nodes.is_subset(&src_nodes), "invented node names: {:?}", out_nodes.difference(&src_nodes));
    let value_names = |m: &Module| m.values.iter().filter_map(|v| v.name.clone()).collect::<BTreeSet<_>>();
    let live: BTreeSet<String> = {
        let mut s: BTreeSet<String> = out.inputs().iter().filter_map(|&v| out.value(v).name.clone()).collect();
        out.walk(&mut |_, op| s.extend(op.results.iter().filter_map(|&r| out.value(r).name.clone())));
        s
    };
    assert!(live.is_subset(&value_names(&m)), "invented value names: {:?}", live.difference(&value_names(&m)));
    // The ops producing the outputs keep the source node names (a rewritten class keeps the
    // name of the node it stands for).
    for (&vo, &vm) in out.outputs().iter().zip(m.outputs()) {
        let (po, pm) = (out.op(def_op(&out, vo)), m.op(def_op(&m, vm)));
        if po.op_type() != "Identity" {
            assert_eq!(po.node_name(), pm.node_name(), "output {}", m.value_label(vm));
        }
    }
    // The recognized LayerNormalization is named after the Div it replaces.
    let ln = out.body.ops.iter().map(|&o| out.op(o)).find(|op| op.op_type() == "LayerNormalization").unwrap();
    let div = m.op(def_op(
        &m,
        m.values.iter().position(|v| v.name.as_deref() == Some("ln_out")).map(|i| ValueId(i as u32)).unwrap(),
    ));
    assert_eq!(ln.node_name(), div.node_name());
    let ln_out = ln.results[0];
    assert_eq!(out.value(ln_out).name.as_deref(), Some("ln_out"));
}
