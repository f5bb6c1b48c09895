//! Code generation: kernels built by hand, compiled, simulated and compared with the
//! evaluator on every preset.

mod common;
use common::*;
use kiln_ir::kernel::{RedOp, UnOp};
use kiln_npu::codegen::Options;

fn generic() -> Options {
    Options { streams: false, ..Options::default() }
}

/// `y[i, j] = exp(a[i, j] + b[i, j]) * c[j]` over `[N, C]`.
fn add_exp_mul() -> kiln_ir::kernel::Kernel {
    let body = vec![for_(
        0,
        dim(3, 0),
        vec![for_(
            1,
            dim(3, 1),
            vec![store(
                3,
                vec![v(0), v(1)],
                mul(un(UnOp::Exp, add(ld(0, vec![v(0), v(1)]), ld(1, vec![v(0), v(1)]))), ld(2, vec![v(1)])),
            )],
        )],
    )];
    kernel(
        "add_exp_mul",
        vec![buf("a", &["N", "C"]), buf("b", &["N", "C"]), buf("c", &["C"]), buf("y", &["N", "C"])],
        3,
        vec![],
        body,
    )
}

#[test]
fn generic_elementwise() {
    let k = add_exp_mul();
    let shapes = vec![vec![3, 5], vec![3, 5], vec![5], vec![3, 5]];
    for p in PRESETS {
        check_with(&k, &shapes, p, &generic());
    }
}

/// Softmax over rows.
fn softmax() -> kiln_ir::kernel::Kernel {
    let x = |j| ld(0, vec![v(0), v(j)]);
    let body = vec![for_(
        0,
        dim(1, 0),
        vec![
            let_(0, reduce(RedOp::Max, 64, dim(0, 1), x(64))),
            let_(1, reduce(RedOp::Sum, 65, dim(0, 1), un(UnOp::Exp, sub(x(65), kiln_ir::kernel::Val::Scalar(0))))),
            for_(
                1,
                dim(1, 1),
                vec![store(
                    1,
                    vec![v(0), v(1)],
                    div(un(UnOp::Exp, sub(x(1), kiln_ir::kernel::Val::Scalar(0))), kiln_ir::kernel::Val::Scalar(1)),
                )],
            ),
        ],
    )];
    kernel("softmax", vec![buf("x", &["N", "C"]), buf("y", &["N", "C"])], 1, vec![], body)
}

#[test]
fn generic_softmax() {
    let k = softmax();
    for p in PRESETS {
        check_with(&k, &[vec![2, 7], vec![2, 7]], p, &generic());
    }
}

#[test]
fn stream_elementwise() {
    let k = add_exp_mul();
    for shape in [[3usize, 5], [64, 300], [1, 20000]] {
        let [n, c] = shape;
        let shapes = vec![vec![n, c], vec![n, c], vec![c], vec![n, c]];
        for p in PRESETS {
            let s = check(&k, &shapes, p);
            println!("{p} {shape:?}: {}", s.report());
        }
    }
}

#[test]
fn stream_softmax() {
    let k = softmax();
    for shape in [[2usize, 7], [100, 128], [3, 1000]] {
        for p in PRESETS {
            let s = check(&k, &[shape.to_vec(), shape.to_vec()], p);
            println!("{p} {shape:?}: {}", s.report());
        }
    }
}
