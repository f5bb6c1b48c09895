//! Shared helpers: where the data is, and a small builder of ONNX models in code.

use kiln_onnx::proto::{
    attribute_proto::AttributeType, tensor_shape_proto, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use prost::Message;
use std::path::PathBuf;

/// Runs the `kiln` binary built with these tests.
pub fn kiln(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln")
}

/// Seeded values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// Root of the generated test data.
pub fn data_dir() -> PathBuf {
    let d = std::env::var("KILN_ONNX_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/onnx-data"));
    assert!(d.join(".done-1.23.2").exists(), "test data missing at {}: run `bash scripts/setup.sh` first", d.display());
    d
}

/// A fresh temporary directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A tensor value-info: `dims` entries are sizes, or names for symbolic dims.
pub fn value_info(name: &str, elem: i32, dims: &[&str]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d.parse::<i64>() {
                Ok(n) => tensor_shape_proto::dimension::Value::DimValue(n),
                Err(_) => tensor_shape_proto::dimension::Value::DimParam(d.to_string()),
            }),
            denotation: None,
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem),
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

pub fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        t: Some(t),
        r#type: Some(AttributeType::Tensor as i32),
        ..Default::default()
    }
}

pub fn f32_tensor(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(1),
        float_data: v.to_vec(),
        ..Default::default()
    }
}

pub fn i64_tensor(name: &str, dims: &[i64], v: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(7),
        int64_data: v.to_vec(),
        ..Default::default()
    }
}

/// A model with one graph at the given default-domain opset.
pub fn model(
    opset: i64,
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    inits: Vec<TensorProto>,
) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        producer_name: Some("kiln-tests".into()),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        graph: Some(GraphProto {
            name: Some("g".into()),
            node: nodes,
            input: inputs,
            output: outputs,
            initializer: inits,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Writes a model to `dir/name` and returns its path.
pub fn save(dir: &std::path::Path, name: &str, m: &ModelProto) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, m.encode_to_vec()).expect("write model");
    p
}

/// A small MLP-like model with a symbolic batch dim: y = Relu(x @ W + b), x: [N, 4].
pub fn symbolic_mlp() -> ModelProto {
    let w: Vec<f32> = (0..12).map(|i| (i as f32 - 6.0) / 4.0).collect();
    model(
        17,
        vec![
            node("MatMul", "mm", &["x", "W"], &["h"], vec![]),
            node("Add", "bias", &["h", "b"], &["z"], vec![]),
            node("Relu", "act", &["z"], &["y"], vec![]),
        ],
        vec![value_info("x", 1, &["N", "4"])],
        vec![value_info("y", 1, &["N", "3"])],
        vec![f32_tensor("W", &[4, 3], &w), f32_tensor("b", &[3], &[0.5, -0.5, 0.0])],
    )
}

/// Multi-head split of a `[B, S, 8]` activation as exporters write it: the target shape of the
/// Reshape is computed at run time from `Shape(x)` (`[B, S, 2, 4]`), then heads move forward.
pub fn dynamic_head_split() -> ModelProto {
    let i64s = |name: &str, v: &[i64]| i64_tensor(name, &[v.len() as i64], v);
    let scalar = |name: &str, v: i64| i64_tensor(name, &[], &[v]);
    model(
        17,
        vec![
            node("Shape", "shape", &["x"], &["s"], vec![]),
            node("Gather", "batch", &["s", "zero"], &["b"], vec![]),
            node("Gather", "seq", &["s", "one"], &["q"], vec![]),
            node("Unsqueeze", "b1", &["b", "axes0"], &["b_1"], vec![]),
            node("Unsqueeze", "q1", &["q", "axes0"], &["q_1"], vec![]),
            node("Concat", "target", &["b_1", "q_1", "heads"], &["t"], vec![attr_int("axis", 0)]),
            node("Reshape", "split", &["x", "t"], &["r"], vec![]),
            node("Transpose", "to_bhsd", &["r"], &["y"], vec![attr_ints("perm", &[0, 2, 1, 3])]),
        ],
        vec![value_info("x", 1, &["B", "S", "8"])],
        vec![value_info("y", 1, &["B", "2", "S", "4"])],
        vec![scalar("zero", 0), scalar("one", 1), i64s("axes0", &[0]), i64s("heads", &[2, 4])],
    )
}

pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        i: Some(v),
        r#type: Some(AttributeType::Int as i32),
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        ints: v.to_vec(),
        r#type: Some(AttributeType::Ints as i32),
        ..Default::default()
    }
}

pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        f: Some(v),
        r#type: Some(AttributeType::Float as i32),
        ..Default::default()
    }
}
