//! Tests of the fusion rules.
//!
//! Every test builds a module by hand (with the e-graph tests' builder), fuses a copy, and
//! checks: the result verifies (so it is acyclic: every operand is defined before its use),
//! the interpreter gives the same outputs before and after on seeded random inputs, the model
//! output names are kept, [`figures`] reports fewer kernels and fewer bytes, and the kernels
//! have the expected kinds and members.

use super::{classify, figures, fuse, FusionReport, OpClass, EPILOGUE, LAYOUT_DUPLICATE, LAYOUT_PROLOGUE};
use super::{REDUCTION_PROLOGUE, RULES};
use crate::egraph::tests::{assert_same_outputs, attrs, body_ops, cost, count, output_names, Builder};
use kiln_ir::attr::{Attr, Attrs};
use kiln_ir::ir::Module;

/// A `graph.fused` op of the top-level body: its kind, its anchor, and the op types of its
/// region, in order.
#[derive(Debug)]
struct Kernel {
    kind: String,
    anchor: Option<String>,
    ops: Vec<String>,
}

fn kernels(m: &Module) -> Vec<Kernel> {
    let s = |a: Option<&Attr>| match a {
        Some(Attr::Str(s)) => Some(s.clone()),
        _ => None,
    };
    m.body
        .ops
        .iter()
        .map(|&o| m.op(o))
        .filter(|op| op.name == "graph.fused")
        .map(|op| Kernel {
            kind: s(op.attrs.get("kind")).expect("a fused op has a kind"),
            anchor: s(op.attrs.get("anchor")),
            ops: op.regions[0].blocks[0].ops.iter().map(|&i| m.op(i).op_type().to_string()).collect(),
        })
        .collect()
}

fn merges(r: &FusionReport, rule: &str) -> usize {
    r.merges.iter().find(|(n, _)| *n == rule).map_or(0, |&(_, k)| k)
}

/// Fuses a copy of `m` and checks what every fusion must keep: validity, outputs, output
/// names, and fewer kernels and bytes than the unfused plan.
fn fused(m: &Module) -> (Module, FusionReport) {
    fused_with(m, true)
}

/// [`fused`]; with `!fewer`, the plan need only be no worse than the unfused one.
fn fused_with(m: &Module, fewer: bool) -> (Module, FusionReport) {
    let c = cost();
    let mut f = m.clone();
    let report = fuse(&mut f, &c).expect("fusion");
    kiln_ir::verify::verify(&f).unwrap_or_else(|e| panic!("the fused module verifies: {e}"));
    assert_eq!(output_names(&f), output_names(m), "output names are kept");
    assert_same_outputs(m, &f);
    let (before, after) = (figures(m, &c, true), figures(&f, &c, false));
    let (k, by) = (format!("kernels: {} before, {} after", before.kernels, after.kernels), "bytes");
    if fewer {
        assert!(after.kernels < before.kernels, "{k}");
        assert!(
            after.bytes_moved < before.bytes_moved,
            "{by}: {} before, {} after",
            before.bytes_moved,
            after.bytes_moved
        );
        assert!(after.seconds < before.seconds);
    } else {
        assert!(after.kernels <= before.kernels, "{k}");
        assert!(
            after.bytes_moved <= before.bytes_moved,
            "{by}: {} before, {} after",
            before.bytes_moved,
            after.bytes_moved
        );
    }
    assert_eq!(report.kernels, after.kernels);
    assert_eq!(report.merges.iter().map(|(n, _)| *n).collect::<Vec<_>>(), RULES);
    (f, report)
}

#[test]
fn classify_sorts_ops_by_how_they_fuse() {
    let mut b = Builder::new("classes");
    let x = b.input("x", &[1, 4, 8, 8]);
    let w = b.random_const(&[4, 4, 1, 1], 1, -1.0, 1.0);
    let e = b.op0("Exp", &[x]);
    let c = b.op0("Conv", &[e, w]);
    let r = b.reduce("ReduceMean", c, &[-1]);
    let t = b.op("Transpose", &[x], attrs(&[("perm", Attr::Ints(vec![0, 1, 3, 2]))]));
    let shape = b.ints(&[1, 4, 64]);
    let v = b.op0("Reshape", &[t, shape]);
    let sh = b.op0("Shape", &[v]);
    let p = [0.5f32, 0.5, 0.5, 0.5];
    let params: Vec<_> =
        (0..4).map(|i| b.constant(kiln_ir::Tensor::from_f32(&[4], vec![p[i] + i as f32; 4]))).collect();
    let bn = b.op("BatchNormalization", &[x, params[0], params[1], params[2], params[3]], Attrs::new());
    let bnt = b.op(
        "BatchNormalization",
        &[x, params[0], params[1], params[2], params[3]],
        attrs(&[("training_mode", Attr::Int(1))]),
    );
    for (v, n) in [(r, "r"), (sh, "sh"), (bn, "bn"), (bnt, "bnt")] {
        b.output(v, n);
    }
    let m = b.finish();
    let classes: Vec<(String, OpClass)> =
        m.body.ops.iter().map(|&o| (m.op(o).op_type().to_string(), classify(&m, o))).collect();
    let class_of = |t: &str, nth: usize| classes.iter().filter(|(n, _)| n == t).nth(nth).map(|(_, c)| *c);
    assert_eq!(class_of("Constant", 0), Some(OpClass::Constant));
    assert_eq!(class_of("Exp", 0), Some(OpClass::Injective));
    assert_eq!(class_of("Conv", 0), Some(OpClass::Contraction));
    assert_eq!(class_of("ReduceMean", 0), Some(OpClass::Reduction));
    assert_eq!(class_of("Transpose", 0), Some(OpClass::Layout));
    assert_eq!(class_of("Reshape", 0), Some(OpClass::View));
    assert_eq!(class_of("Shape", 0), Some(OpClass::Host));
    assert_eq!(class_of("BatchNormalization", 0), Some(OpClass::Injective));
    assert_eq!(class_of("BatchNormalization", 1), Some(OpClass::Opaque), "training mode");
}

#[test]
fn elementwise_chain_becomes_one_kernel() {
    let mut b = Builder::new("chain");
    let x = b.input("x", &[4, 64]);
    let c = b.random_const(&[64], 1, -1.0, 1.0);
    let e = b.op0("Exp", &[x]);
    let a = b.op0("Add", &[e, c]);
    let r = b.op0("Relu", &[a]);
    let y = b.op0("Sigmoid", &[r]);
    b.output(y, "y");
    let m = b.finish();
    let (f, report) = fused(&m);
    assert_eq!(body_ops(&f), ["fused"]);
    let k = kernels(&f);
    assert_eq!(k[0].kind, "elementwise");
    assert_eq!(k[0].anchor, None);
    assert_eq!(k[0].ops, ["Exp", "Add", "Relu", "Sigmoid"]);
    assert_eq!(merges(&report, EPILOGUE), 3);
    assert_eq!(report.kernels, 1);
}

#[test]
fn matmul_bias_relu_residual_is_one_contraction_kernel() {
    let mut b = Builder::new("mlp");
    let x = b.input("x", &[16, 32]);
    let w = b.random_const(&[32, 32], 1, -0.5, 0.5);
    let bias = b.random_const(&[32], 2, -0.5, 0.5);
    let mm = b.op0("MatMul", &[x, w]);
    let a = b.op0("Add", &[mm, bias]);
    let r = b.op0("Relu", &[a]);
    let y = b.op0("Add", &[r, x]);
    b.output(y, "y");
    let m = b.finish();
    let (f, _) = fused(&m);
    assert_eq!(body_ops(&f), ["fused"]);
    let k = kernels(&f);
    assert_eq!(k[0].kind, "contraction");
    assert_eq!(k[0].anchor.as_deref(), Some("MatMul"));
    assert_eq!(k[0].ops, ["MatMul", "Add", "Relu", "Add"]);
    // The fused op is named after its anchor.
    let op = f.op(f.body.ops.iter().copied().find(|&o| f.op(o).name == "graph.fused").unwrap());
    let mm_name = m.op(m.body.ops.iter().copied().find(|&o| m.op(o).op_type() == "MatMul").unwrap()).node_name();
    assert_eq!(op.node_name(), mm_name);
}

#[test]
fn residual_add_joins_the_reduction_it_feeds() {
    let mut b = Builder::new("resid-reduce");
    let x = b.input("x", &[4, 64]);
    let r = b.input("r", &[4, 64]);
    let h = b.op0("Add", &[x, r]);
    let mean = b.reduce("ReduceMean", h, &[-1]);
    b.output(mean, "mean");
    let m = b.finish();
    let (f, report) = fused(&m);
    assert_eq!(merges(&report, REDUCTION_PROLOGUE), 1);
    assert_eq!(body_ops(&f), ["fused"]);
    let k = kernels(&f);
    assert_eq!(k[0].kind, "reduction");
    assert_eq!(k[0].anchor.as_deref(), Some("ReduceMean"));
    assert_eq!(k[0].ops, ["Add", "ReduceMean"]);
}

/// The residual Add also feeds the centering Sub of a decomposed LayerNorm: it must still
/// share a kernel with the first ReduceMean, and each kernel keeps at most one reduction.
#[test]
fn residual_add_joins_a_decomposed_layernorm() {
    let mut b = Builder::new("resid-ln");
    let x = b.input("x", &[4, 64]);
    let r = b.input("r", &[4, 64]);
    let h = b.op0("Add", &[x, r]);
    let mean = b.reduce("ReduceMean", h, &[-1]);
    let d = b.op0("Sub", &[h, mean]);
    let sq = b.op0("Mul", &[d, d]);
    let var = b.reduce("ReduceMean", sq, &[-1]);
    let eps = b.scalar(1e-5);
    let ve = b.op0("Add", &[var, eps]);
    let den = b.op0("Sqrt", &[ve]);
    let y = b.op0("Div", &[d, den]);
    b.output(y, "y");
    let m = b.finish();
    let (f, _) = fused(&m);
    let k = kernels(&f);
    let first = k.iter().find(|k| k.ops.contains(&"ReduceMean".to_string())).expect("a reduction kernel");
    assert_eq!(first.ops[..2], ["Add", "ReduceMean"], "{k:?}");
    for kern in &k {
        assert!(kern.ops.iter().filter(|t| t.starts_with("Reduce")).count() <= 1, "{k:?}");
    }
    assert_eq!(count(&f, "ReduceMean"), 2);
}

#[test]
fn residual_add_joins_a_layernormalization() {
    let mut b = Builder::new("resid-lnop");
    let x = b.input("x", &[4, 64]);
    let r = b.input("r", &[4, 64]);
    let g = b.random_const(&[64], 1, 0.5, 1.5);
    let beta = b.random_const(&[64], 2, -0.5, 0.5);
    let h = b.op0("Add", &[x, r]);
    let y = b.op("LayerNormalization", &[h, g, beta], attrs(&[("axis", Attr::Int(-1))]));
    b.output(y, "y");
    let m = b.finish();
    let (f, report) = fused(&m);
    assert_eq!(merges(&report, REDUCTION_PROLOGUE), 1);
    let k = kernels(&f);
    assert_eq!(k.len(), 1);
    assert_eq!((k[0].kind.as_str(), k[0].anchor.as_deref()), ("reduction", Some("LayerNormalization")));
    assert_eq!(k[0].ops, ["Add", "LayerNormalization"]);
}

#[test]
fn transpose_with_two_users_is_duplicated_into_each() {
    let mut b = Builder::new("dup");
    let x = b.input("x", &[8, 16]);
    let w = b.random_const(&[8, 4], 1, -0.5, 0.5);
    let t = b.op("Transpose", &[x], attrs(&[("perm", Attr::Ints(vec![1, 0]))]));
    let e = b.op0("Exp", &[t]);
    let mm = b.op0("MatMul", &[t, w]);
    b.output(e, "e");
    b.output(mm, "mm");
    let m = b.finish();
    let (f, report) = fused(&m);
    assert_eq!(merges(&report, LAYOUT_DUPLICATE), 1);
    assert_eq!(merges(&report, LAYOUT_PROLOGUE), 2);
    assert_eq!(body_ops(&f), ["fused", "fused"]);
    let k = kernels(&f);
    assert_eq!((k[0].kind.as_str(), &k[0].ops[..]), ("elementwise", &["Transpose".to_string(), "Exp".into()][..]));
    assert_eq!((k[1].kind.as_str(), &k[1].ops[..]), ("contraction", &["Transpose".to_string(), "MatMul".into()][..]));
    assert_eq!(count(&f, "Transpose"), 2);
}

/// A transpose that is also a model output stays a kernel writing the output; each other user
/// gets a copy. (Nothing is saved here: three kernels either way, the same bytes.)
#[test]
fn transpose_that_is_an_output_keeps_a_copy() {
    let mut b = Builder::new("dup-out");
    let x = b.input("x", &[8, 16]);
    let t = b.op("Transpose", &[x], attrs(&[("perm", Attr::Ints(vec![1, 0]))]));
    let e = b.op0("Exp", &[t]);
    let n = b.op0("Neg", &[t]);
    b.output(t, "t");
    b.output(e, "e");
    b.output(n, "n");
    let m = b.finish();
    let (f, report) = fused_with(&m, false);
    assert_eq!(merges(&report, LAYOUT_DUPLICATE), 2);
    assert_eq!(count(&f, "Transpose"), 3);
    assert_eq!(body_ops(&f), ["Transpose", "fused", "fused"]);
}

/// `a = Exp(x); b = ReduceSum(a); c = Add(a, b)`: Exp and Add cannot share a kernel without
/// the reduction between them. The partition must stay acyclic.
#[test]
fn merging_never_creates_a_cycle_around_a_reduction() {
    for a_is_output in [false, true] {
        let mut b = Builder::new("cycle");
        let x = b.input("x", &[4, 64]);
        let a = b.op0("Exp", &[x]);
        let s = b.reduce("ReduceSum", a, &[-1]);
        let c = b.op0("Add", &[a, s]);
        b.output(c, "c");
        if a_is_output {
            b.output(a, "a");
        }
        let m = b.finish();
        let (f, _) = fused(&m);
        for k in kernels(&f) {
            let has = |t: &str| k.ops.iter().any(|o| o == t);
            assert!(!(has("Exp") && has("Add")) || has("ReduceSum"), "{k:?}");
        }
    }
}

/// The same around a contraction, where the prologue (Exp) may not join the MatMul: the Add
/// joins the MatMul, the Exp stays alone.
#[test]
fn merging_never_creates_a_cycle_around_a_contraction() {
    let mut b = Builder::new("cycle-mm");
    let x = b.input("x", &[8, 8]);
    let w = b.random_const(&[8, 8], 1, -0.5, 0.5);
    let a = b.op0("Exp", &[x]);
    let mm = b.op0("MatMul", &[a, w]);
    let c = b.op0("Add", &[a, mm]);
    b.output(c, "c");
    let m = b.finish();
    let (f, _) = fused(&m);
    assert_eq!(body_ops(&f), ["Exp", "fused"]);
    let k = kernels(&f);
    assert_eq!(k[0].ops, ["MatMul", "Add"]);
}

/// Two elementwise branches of one input join into one kernel when their join point reads
/// both; a diamond is not a cycle.
#[test]
fn diamond_of_elementwise_ops_is_one_kernel() {
    let mut b = Builder::new("diamond");
    let x = b.input("x", &[4, 64]);
    let a = b.op0("Exp", &[x]);
    let l = b.op0("Neg", &[a]);
    let r = b.op0("Sigmoid", &[a]);
    let y = b.op0("Mul", &[l, r]);
    b.output(y, "y");
    let m = b.finish();
    let (f, _) = fused(&m);
    assert_eq!(body_ops(&f), ["fused"]);
    assert_eq!(kernels(&f)[0].ops.len(), 4);
}

/// Two reduction kernels, each with an epilogue reading the other's reduction:
///
/// ```text
/// r  = ReduceSum(z)      pm = ReduceMax(w)
/// f  = r + big           e  = w - pm
/// c1 = f + pm            bb = e + r
/// ```
///
/// `c1` joins `{r, f}` (it saves the large `f`), `bb` joins `{pm, e}` (it saves the large `e`).
/// No op-level path leads from one kernel through another op back into it, but the kernels
/// read each other: `{r, f, c1}` needs `pm`, `{pm, e, bb}` needs `r`. Once each is one fused
/// op, that is a cycle; the partition must not make it.
#[test]
fn merging_never_creates_a_cycle_between_kernels() {
    let mut b = Builder::new("cross");
    let z = b.input("z", &[8, 64]);
    let big = b.input("big", &[8, 64]);
    let w = b.input("w", &[8, 64]);
    let r = b.reduce("ReduceSum", z, &[-1]);
    let f = b.op0("Add", &[r, big]);
    let pm = b.reduce("ReduceMax", w, &[-1]);
    let e = b.op0("Sub", &[w, pm]);
    let c1 = b.op0("Add", &[f, pm]);
    let bb = b.op0("Add", &[e, r]);
    b.output(c1, "c1");
    b.output(bb, "bb");
    let m = b.finish();
    let (f, _) = fused(&m);
    assert_eq!(count(&f, "ReduceSum") + count(&f, "ReduceMax"), 2);
    // Every op of the source is still there, once.
    assert_eq!(count(&f, "Add"), 3);
    assert_eq!(count(&f, "Sub"), 1);
}

/// An intermediate value that is also a model output leaves the kernel as a second result,
/// under its name.
#[test]
fn intermediate_output_leaves_the_kernel_by_name() {
    let mut b = Builder::new("mid-out");
    let x = b.input("x", &[4, 64]);
    let e = b.op0("Exp", &[x]);
    let n = b.op0("Neg", &[e]);
    let y = b.op0("Tanh", &[n]);
    b.output(y, "y");
    b.output(e, "e");
    let m = b.finish();
    let (f, _) = fused(&m);
    assert_eq!(body_ops(&f), ["fused"]);
    let op = f.op(f.body.ops.iter().copied().find(|&o| f.op(o).name == "graph.fused").unwrap());
    assert_eq!(op.results.len(), 2);
    assert_eq!(output_names(&f), [Some("y".to_string()), Some("e".to_string())]);
}

/// A view between a MatMul and its bias joins the kernel; its shape constant becomes a kernel
/// input.
#[test]
fn reshape_between_matmul_and_bias_joins_the_kernel() {
    let mut b = Builder::new("mm-reshape");
    let x = b.input("x", &[8, 32]);
    let w = b.random_const(&[32, 16], 1, -0.5, 0.5);
    let mm = b.op0("MatMul", &[x, w]);
    let shape = b.ints(&[2, 4, 16]);
    let r = b.op0("Reshape", &[mm, shape]);
    let bias = b.random_const(&[16], 2, -0.5, 0.5);
    let y = b.op0("Add", &[r, bias]);
    b.output(y, "y");
    let m = b.finish();
    let (f, _) = fused(&m);
    assert_eq!(body_ops(&f), ["fused"]);
    assert_eq!(kernels(&f)[0].ops, ["MatMul", "Reshape", "Add"]);
}

/// A value read inside a region op (an If branch capturing it) must leave its kernel, and the
/// branch must read the kernel's result.
#[test]
fn value_captured_by_a_region_leaves_its_kernel() {
    use kiln_ir::ir::{Block, Region};
    let mut b = Builder::new("captured");
    let x = b.input("x", &[4, 64]);
    let cond = b.input_of("cond", kiln_ir::DType::Bool, &[]);
    let e = b.op0("Exp", &[x]);
    let n = b.op0("Neg", &[e]);
    let ty = kiln_ir::TensorType::known(kiln_ir::DType::F32, &[4, 64]);
    let mut regions = vec![];
    for (op, v) in [("Relu", e), ("Sigmoid", x)] {
        let o = b.m.create_op(&format!("graph.{op}"), vec![Some(v)], vec![ty.clone()], Attrs::new(), vec![]);
        regions.push(Region { blocks: vec![Block { args: vec![], ops: vec![o], yields: b.m.op(o).results.clone() }] });
    }
    let a = attrs(&[("then_branch", Attr::Region(0)), ("else_branch", Attr::Region(1))]);
    let iff = b.m.create_op("graph.If", vec![Some(cond)], vec![ty], a, regions);
    b.m.body.ops.push(iff);
    let r = b.m.op(iff).results[0];
    let y = b.op0("Add", &[r, n]);
    b.output(y, "y");
    let m = b.finish();
    let (f, _) = fused(&m);
    for seed in 10..16 {
        // Both branches.
        let inputs = crate::egraph::tests::random_inputs(&m, seed);
        let want = kiln_ir::interp::run(&m, inputs.clone()).unwrap();
        let got = kiln_ir::interp::run(&f, inputs).unwrap();
        crate::egraph::tests::assert_close(&got, &want, 1e-6, 0.0, &format!("seed {seed}"));
    }
    let k = kernels(&f);
    assert!(k.iter().any(|k| k.ops == ["Exp", "Neg"]), "{k:?}");
}

/// Timing harness, not a check: fuses `LAYERS` (default 60) decomposed transformer layers
/// (about 43 ops each) and prints the best of three times.
/// `LAYERS=240 cargo test --release -p kiln-passes fuse_timing -- --ignored --nocapture`
#[test]
#[ignore]
fn fuse_timing_on_a_large_synthetic_model() {
    let mut b = Builder::new("big");
    let mut x = b.input("x", &[1, 8, 16]);
    let heads = b.ints(&[1, 8, 2, 8]);
    let back = b.ints(&[1, 8, 16]);
    let layers: u64 = std::env::var("LAYERS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    for layer in 0..layers {
        let mean = b.reduce("ReduceMean", x, &[-1]);
        let d = b.op0("Sub", &[x, mean]);
        let sq = b.op0("Mul", &[d, d]);
        let var = b.reduce("ReduceMean", sq, &[-1]);
        let eps = b.scalar(1e-5);
        let ve = b.op0("Add", &[var, eps]);
        let den = b.op0("Sqrt", &[ve]);
        let ln = b.op0("Div", &[d, den]);
        let mut qkv = vec![];
        for i in 0..3 {
            let w = b.random_const(&[16, 16], 100 + i + layer * 7, -0.5, 0.5);
            let p = b.op0("MatMul", &[ln, w]);
            let r = b.op0("Reshape", &[p, heads]);
            let t = if i == 1 { vec![0, 2, 3, 1] } else { vec![0, 2, 1, 3] };
            qkv.push(b.op("Transpose", &[r], attrs(&[("perm", Attr::Ints(t))])));
        }
        let s = b.op0("MatMul", &[qkv[0], qkv[1]]);
        let sc = b.scalar(0.3);
        let s = b.op0("Mul", &[s, sc]);
        let mx = b.reduce("ReduceMax", s, &[-1]);
        let sub = b.op0("Sub", &[s, mx]);
        let e = b.op0("Exp", &[sub]);
        let sum = b.reduce("ReduceSum", e, &[-1]);
        let p = b.op0("Div", &[e, sum]);
        let o = b.op0("MatMul", &[p, qkv[2]]);
        let ot = b.op("Transpose", &[o], attrs(&[("perm", Attr::Ints(vec![0, 2, 1, 3]))]));
        let merged = b.op0("Reshape", &[ot, back]);
        let h = b.op0("Add", &[x, merged]);
        let w1 = b.random_const(&[16, 32], 110 + layer * 7, -0.5, 0.5);
        let up = b.op0("MatMul", &[h, w1]);
        let g = b.op0("Sigmoid", &[up]);
        let g = b.op0("Mul", &[up, g]);
        let w2 = b.random_const(&[32, 16], 111 + layer * 7, -0.5, 0.5);
        let down = b.op0("MatMul", &[g, w2]);
        x = b.op0("Add", &[h, down]);
    }
    b.output(x, "y");
    let m = b.finish();
    let c = cost();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut f = m.clone();
        let t0 = std::time::Instant::now();
        let r = fuse(&mut f, &c).expect("fusion");
        best = best.min(t0.elapsed().as_secs_f64() * 1e3);
        kiln_ir::verify::verify(&f).unwrap();
        eprintln!("kernels {}", r.kernels);
    }
    eprintln!("ops {} fuse best {best:.1} ms", m.body.ops.len());
}

/// A Concat feeding a Conv stays a kernel of its own (the Conv's register tiles read X as a
/// buffer); the Conv still takes its epilogue.
#[test]
fn concat_stays_out_of_a_conv() {
    let mut b = Builder::new("concat-conv");
    let x = b.input("x", &[1, 8, 6, 6]);
    let y = b.input("y", &[1, 8, 6, 6]);
    let w = b.random_const(&[16, 16, 1, 1], 1, -0.5, 0.5);
    let c = b.op("Concat", &[x, y], attrs(&[("axis", Attr::Int(1))]));
    let conv = b.op0("Conv", &[c, w]);
    let r = b.op0("Relu", &[conv]);
    b.output(r, "r");
    let m = b.finish();
    let (f, _) = fused(&m);
    assert_eq!(body_ops(&f), ["Concat", "fused"]);
    let k = kernels(&f);
    assert_eq!((k[0].kind.as_str(), &k[0].ops[..]), ("contraction", &["Conv".to_string(), "Relu".into()][..]));
}
