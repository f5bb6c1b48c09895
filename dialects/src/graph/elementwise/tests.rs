//! Unit tests of the elementwise ops through their `OpDef`s.

use crate::attr::{Attr, Attrs};
use crate::graph::{lookup, AttrView, EvalCx, OpResult};
use crate::tensor::{Data, Tensor};
use crate::types::DType;

fn run_attrs(op: &str, attrs: &Attrs, opset: i64, inputs: &[&Tensor]) -> OpResult<Tensor> {
    let def = lookup(op).expect("op registered");
    let cx = EvalCx { attrs: AttrView(attrs), num_outputs: 1, opset, regions: &[], runner: &crate::graph::NoRegions };
    let ins: Vec<Option<&Tensor>> = inputs.iter().map(|&t| Some(t)).collect();
    Ok(def.eval(&cx, &ins)?.remove(0))
}

fn run(op: &str, inputs: &[&Tensor]) -> Tensor {
    run_attrs(op, &Attrs::new(), 25, inputs).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.as_f32().expect("an f32 tensor").to_vec()
}

#[test]
fn activations_follow_onnx_defaults() {
    let x = Tensor::from_f32(&[4], vec![-2.0, -0.5, 0.0, 3.0]);
    assert_eq!(f32s(&run("Relu", &[&x])), vec![0.0, 0.0, 0.0, 3.0]);
    assert_eq!(f32s(&run("LeakyRelu", &[&x])), vec![-0.02, -0.005, 0.0, 3.0]);
    let hs = f32s(&run("HardSigmoid", &[&x]));
    assert!(hs.iter().zip([0.1, 0.4, 0.5, 1.0]).all(|(a, b)| (a - b).abs() < 1e-6), "{hs:?}");
    let g = f32s(&run("Gelu", &[&x]));
    assert!((g[0] + 0.0455003).abs() < 1e-6 && (g[3] - 2.9959502).abs() < 1e-6);
    let mut tanh = Attrs::new();
    tanh.insert("approximate".into(), Attr::Str("tanh".into()));
    let gt = f32s(&run_attrs("Gelu", &tanh, 25, &[&x]).unwrap());
    assert!((gt[0] + 0.04540231).abs() < 1e-6);
    let s = f32s(&run("Sigmoid", &[&Tensor::from_f32(&[2], vec![-100.0, 100.0])]));
    assert!(s[0] >= 0.0 && s[0] < 1e-40 && s[1] == 1.0);
}

#[test]
fn round_is_half_to_even_and_ints_work() {
    let x = Tensor::from_f32(&[4], vec![0.5, 1.5, 2.5, -2.5]);
    assert_eq!(f32s(&run("Round", &[&x])), vec![0.0, 2.0, 2.0, -2.0]);
    let i = Tensor::new(vec![3], Data::I8(vec![-128, -3, 4]));
    assert_eq!(run("Abs", &[&i]).data, Data::I8(vec![-128, 3, 4]));
    assert_eq!(run("Sign", &[&i]).data, Data::I8(vec![-1, -1, 1]));
    assert!(run_attrs("Exp", &Attrs::new(), 25, &[&i]).is_err());
}

#[test]
fn integer_division_and_mod() {
    let a = Tensor::new(vec![4], Data::I32(vec![-7, 7, -7, 5]));
    let b = Tensor::new(vec![4], Data::I32(vec![2, -2, -2, 0]));
    assert_eq!(run("Div", &[&a, &b]).data, Data::I32(vec![-3, -3, 3, 0]));
    assert_eq!(run("Mod", &[&a, &b]).data, Data::I32(vec![1, -1, -1, 0]));
    let mut fmod = Attrs::new();
    fmod.insert("fmod".into(), Attr::Int(1));
    assert_eq!(run_attrs("Mod", &fmod, 25, &[&a, &b]).unwrap().data, Data::I32(vec![-1, 1, -1, 0]));
    let x = Tensor::from_f32(&[2], vec![-3.0, 3.0]);
    let y = Tensor::from_f32(&[2], vec![2.0, -2.0]);
    assert_eq!(f32s(&run("Mod", &[&x, &y])), vec![1.0, -1.0]);
}

#[test]
fn broadcasting_arithmetic_and_comparisons() {
    let a = Tensor::from_f32(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b = Tensor::from_f32(&[3], vec![10.0, 20.0, 30.0]);
    let s = run("Add", &[&a, &b]);
    assert_eq!(s.shape, vec![2, 3]);
    assert_eq!(f32s(&s), vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
    let c = Tensor::from_f32(&[2, 1], vec![2.0, 5.0]);
    let g = run("Greater", &[&a, &c]);
    assert_eq!(g.data, Data::Bool(vec![false, false, true, false, false, true]));
    let s1 = Tensor::new(vec![2], Data::Str(vec!["a".into(), "b".into()]));
    let s2 = Tensor::new(vec![1], Data::Str(vec!["b".into()]));
    assert_eq!(run("Equal", &[&s1, &s2]).data, Data::Bool(vec![false, true]));
    assert!(run_attrs("Add", &Attrs::new(), 25, &[&a, &Tensor::from_f32(&[2], vec![0.0; 2])]).is_err());
}

#[test]
fn legacy_axis_broadcast_before_opset_7() {
    let a = Tensor::from_f32(&[2, 3], vec![0.0; 6]);
    let b = Tensor::from_f32(&[2], vec![1.0, 2.0]);
    let mut attrs = Attrs::new();
    attrs.insert("broadcast".into(), Attr::Int(1));
    attrs.insert("axis".into(), Attr::Int(0));
    let y = run_attrs("Add", &attrs, 6, &[&a, &b]).unwrap();
    assert_eq!(f32s(&y), vec![1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
}

#[test]
fn pow_mixed_types_and_bitshift() {
    let x = Tensor::from_f32(&[2], vec![3.0, -4.0]);
    assert_eq!(f32s(&run("Pow", &[&x, &Tensor::scalar_f32(2.0)])), vec![9.0, 16.0]);
    let r = f32s(&run("Pow", &[&x, &Tensor::scalar_f32(0.5)]));
    assert!(r[0] == 3f32.sqrt() && r[1].is_nan());
    let a = Tensor::new(vec![3], Data::I32(vec![1, 2, 3]));
    let e = Tensor::from_f32(&[3], vec![4.0, 5.0, 6.0]);
    assert_eq!(run("Pow", &[&a, &e]).data, Data::I32(vec![1, 32, 729]));
    let x = Tensor::new(vec![3], Data::I8(vec![-16, 1, 64]));
    let s = Tensor::new(vec![3], Data::I8(vec![2, 9, 1]));
    let mut right = Attrs::new();
    right.insert("direction".into(), Attr::Str("RIGHT".into()));
    assert_eq!(run_attrs("BitShift", &right, 25, &[&x, &s]).unwrap().data, Data::I8(vec![-4, 0, 32]));
    let mut left = Attrs::new();
    left.insert("direction".into(), Attr::Str("LEFT".into()));
    assert_eq!(run_attrs("BitShift", &left, 25, &[&x, &s]).unwrap().data, Data::I8(vec![-64, 0, -128]));
}

#[test]
fn variadic_where_and_clip() {
    let a = Tensor::from_f32(&[2], vec![1.0, f32::NAN]);
    let b = Tensor::from_f32(&[1], vec![3.0]);
    let m = f32s(&run("Max", &[&a, &b]));
    assert!(m[0] == 3.0 && m[1].is_nan());
    assert_eq!(f32s(&run("Mean", &[&b, &b, &Tensor::from_f32(&[1], vec![0.0])])), vec![2.0]);
    let c = Tensor::from_bool(&[2, 1], vec![true, false]);
    let x = Tensor::from_i64(&[2], vec![1, 2]);
    let y = Tensor::from_i64(&[], vec![9]);
    assert_eq!(run("Where", &[&c, &x, &y]).data, Data::I64(vec![1, 2, 9, 9]));
    let v = Tensor::new(vec![3], Data::I8(vec![-100, 0, 100]));
    let lo = Tensor::new(vec![], Data::I8(vec![-5]));
    assert_eq!(run("Clip", &[&v, &lo]).data, Data::I8(vec![-5, 0, 100]));
    let hi = Tensor::new(vec![], Data::I8(vec![-10]));
    assert_eq!(run("Clip", &[&v, &lo, &hi]).data, Data::I8(vec![-10, -10, -10]));
    let mut attrs = Attrs::new();
    attrs.insert("max".into(), Attr::Float(6.0));
    attrs.insert("min".into(), Attr::Float(0.0));
    let f = Tensor::from_f32(&[3], vec![-1.0, 3.0, 7.0]);
    assert_eq!(f32s(&run_attrs("Clip", &attrs, 6, &[&f]).unwrap()), vec![0.0, 3.0, 6.0]);
}

#[test]
fn cast_and_predicates() {
    let x = Tensor::from_f32(&[3], vec![f32::NAN, f32::INFINITY, -1.5]);
    assert_eq!(run("IsNaN", &[&x]).data, Data::Bool(vec![true, false, false]));
    let mut attrs = Attrs::new();
    attrs.insert("detect_positive".into(), Attr::Int(0));
    assert_eq!(run_attrs("IsInf", &attrs, 25, &[&x]).unwrap().data, Data::Bool(vec![false, false, false]));
    let mut to = Attrs::new();
    to.insert("to".into(), Attr::Type(DType::F16));
    let h = run_attrs("Cast", &to, 25, &[&x]).unwrap();
    assert_eq!(h.dtype(), DType::F16);
    let back = run("CastLike", &[&h, &Tensor::from_f64(DType::F64, &[], vec![0.0])]);
    assert_eq!(back.to_f64()[2], -1.5);
}
