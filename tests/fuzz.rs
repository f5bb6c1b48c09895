//! Fuzzing the ONNX loader with proptest: real models (node tests and a `light` CNN) with
//! random byte-level mutations (bit flips, overwrites, truncation, splices) and structural
//! mutations (dims, attribute values, op types) must load, or be refused with an error,
//! and never panic; what loads is verified, optimized (e-graph rewriting and fusion) and run on
//! small inputs, fused and unfused, which must not panic either.
//! Runs briefly in CI (PROPTEST_CASES overrides the case count).

use crate::common::data_dir;
use kiln::Tensor;
use kiln_onnx::proto::ModelProto;
use proptest::prelude::*;
use prost::Message;
use std::sync::OnceLock;

/// A spread of real models to mutate.
fn corpus() -> &'static Vec<Vec<u8>> {
    static C: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    C.get_or_init(|| {
        let cases = kiln_onnx::testcase::list_cases(&data_dir().join("node"));
        let mut v: Vec<Vec<u8>> =
            cases.iter().step_by(37).filter_map(|c| std::fs::read(c.dir.join("model.onnx")).ok()).collect();
        v.push(std::fs::read(data_dir().join("light/light_squeezenet.onnx")).expect("squeezenet"));
        v
    })
}

/// Loads, verifies and (for small inputs) runs a model; errors are fine, panics are not.
fn exercise(bytes: &[u8]) {
    let Ok(m) = kiln_onnx::load_model_bytes(bytes, "fuzz.onnx", None) else { return };
    if kiln_ir::verify::verify(&m).is_err() {
        return;
    }
    let mut inputs = Vec::new();
    for &v in m.inputs() {
        let ty = &m.value(v).ty;
        let Some(shape) = ty.shape.as_ref() else { return };
        let dims: Vec<usize> = shape.iter().map(|d| d.known().unwrap_or(2) as usize).collect();
        if dims.iter().product::<usize>() > 1 << 16 {
            return;
        }
        inputs.push(Tensor::zeros(ty.dtype, &dims));
    }
    let mut fused = m.clone();
    static MACHINE: OnceLock<kiln_ir::machine::MachineDescription> = OnceLock::new();
    let machine = MACHINE.get_or_init(|| kiln_targets::lookup("cpu").expect("cpu").machine());
    if kiln_passes::optimize(&mut fused, machine, true).is_ok() {
        let _ = kiln_ir::interp::run(&fused, inputs.clone());
    }
    let _ = kiln_ir::interp::run(&m, inputs);
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Overwrite { at: usize, byte: u8 },
    Truncate { at: usize },
    Splice { from: usize, to: usize, len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Overwrite { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), any::<usize>(), 1usize..64).prop_map(|(from, to, len)| Mutation::Splice { from, to, len }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let n = bytes.len();
    match *m {
        Mutation::Flip { at, bit } => bytes[at % n] ^= 1 << bit,
        Mutation::Overwrite { at, byte } => bytes[at % n] = byte,
        Mutation::Truncate { at } => bytes.truncate(at % n),
        Mutation::Splice { from, to, len } => {
            let (from, to) = (from % n, to % n);
            let chunk: Vec<u8> = bytes[from..(from + len).min(n)].to_vec();
            bytes.splice(to..to, chunk);
        }
    }
}

/// Structural mutations of a decoded model: what a buggy exporter writes.
fn mutate_structure(m: &mut ModelProto, pick: usize, value: i64) {
    let Some(g) = m.graph.as_mut() else { return };
    match pick % 5 {
        0 => {
            let inits = g.initializer.len().max(1);
            if let Some(t) = g.initializer.get_mut(pick % inits) {
                if let Some(d) = t.dims.first_mut() {
                    *d = value;
                }
            }
        }
        1 => {
            let nodes = g.node.len().max(1);
            if let Some(n) = g.node.get_mut(pick % nodes) {
                for a in &mut n.attribute {
                    a.i = Some(value);
                    a.ints.iter_mut().for_each(|x| *x = value);
                }
            }
        }
        2 => {
            let nodes = g.node.len().max(1);
            if let Some(n) = g.node.get_mut(pick % nodes) {
                n.input.push(format!("undefined_{value}"));
            }
        }
        3 => {
            if let Some(o) = m.opset_import.first_mut() {
                o.version = Some(value);
            }
        }
        _ => {
            let nodes = g.node.len().max(1);
            let other = g.node.get(value.unsigned_abs() as usize % nodes).and_then(|n| n.op_type.clone());
            if let Some(n) = g.node.get_mut(pick % nodes) {
                n.op_type = other;
            }
        }
    }
}

/// Cases per property: `PROPTEST_CASES`, default 2000 (about a second in release).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_bytes_never_panic(pick in any::<usize>(), muts in prop::collection::vec(mutation(), 1..4)) {
        let c = corpus();
        let mut bytes = c[pick % c.len()].clone();
        for m in &muts {
            apply(&mut bytes, m);
        }
        exercise(&bytes);
    }

    #[test]
    fn mutated_structure_never_panics(pick in any::<usize>(), field in any::<usize>(), value in prop_oneof![Just(-1i64), Just(0), Just(1 << 40), Just(i64::MAX), -3i64..70]) {
        let c = corpus();
        let bytes = &c[pick % c.len()];
        let Ok(mut m) = ModelProto::decode(&bytes[..]) else { return Ok(()) };
        mutate_structure(&mut m, field, value);
        exercise(&m.encode_to_vec());
    }
}
