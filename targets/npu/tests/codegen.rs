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

/// A 1×1 Conv + bias + ReLU as the lowering builds it (`conv_tiled`'s pointwise form): per
/// image and block of `mr` output channels, init the block with the bias, add `Mma` tiles of
/// `mr` channels × `cols` pixels (a full-tile loop and a partial tail), then the epilogue.
fn pointwise_conv(mr: i64, cols: usize, relu: bool) -> kiln_ir::kernel::Kernel {
    use kiln_ir::kernel::{Mma, Stmt};
    const ROW: usize = 63;
    // Buffers: x [N, C, H, W], w [M, C, 1, 1], bias [M], y [N, M, H, W].
    let (x, w, bias, y) = (0, 1, 2, 3);
    let tiles = idiv(dim(w, 0), k(mr));
    let ni = idiv(v(0), tiles.clone());
    let co0 = imul(irem(v(0), tiles.clone()), k(mr));
    let pixels = imul(dim(y, 2), dim(y, 3));
    let full = idiv(pixels.clone(), k(cols as i64));
    let tile = |p0: Idx, valid: Idx| {
        Stmt::Mma(Box::new(Mma {
            rows: mr as usize,
            cols,
            lanes: 16,
            valid,
            row: ROW,
            red: vec![(2, dim(x, 1))],
            a: ld(w, vec![iadd(co0.clone(), v(ROW)), v(2), k(0), k(0)]),
            b: (x, vec![ni.clone(), v(2), k(0), p0.clone()]),
            c: (y, vec![ni.clone(), iadd(co0.clone(), v(ROW)), k(0), p0]),
            c_col: k(1),
        }))
    };
    let out = |i1| vec![ni.clone(), iadd(co0.clone(), v(i1)), v(2), v(3)];
    let init = for_(
        1,
        k(mr),
        vec![for_(
            2,
            dim(y, 2),
            vec![for_(3, dim(y, 3), vec![store(y, out(1), ld(bias, vec![iadd(co0.clone(), v(1))]))])],
        )],
    );
    let tail0 = imul(full.clone(), k(cols as i64));
    let mut body = vec![
        init,
        for_(1, full, vec![tile(imul(v(1), k(cols as i64)), k(cols as i64))]),
        for_(1, imin(k(1), irem(pixels.clone(), k(cols as i64))), vec![tile(tail0.clone(), isub(pixels, tail0))]),
    ];
    if relu {
        body.push(for_(
            1,
            k(mr),
            vec![for_(2, dim(y, 2), vec![for_(3, dim(y, 3), vec![store(y, out(1), un(UnOp::Relu, ld(y, out(1))))])])],
        ));
    }
    use kiln_ir::kernel::Idx;
    kernel(
        "conv1x1",
        vec![
            buf("x", &["N", "C", "H", "W"]),
            buf("w", &["M", "C", "1", "1"]),
            buf("bias", &["M"]),
            buf("y", &["N", "M", "H", "W"]),
        ],
        3,
        vec![],
        vec![for_(0, imul(dim(y, 0), tiles), body)],
    )
}

#[test]
fn mma_pointwise_conv() {
    for (mr, cols, c, m, hw) in [(8, 32, 16, 32, 7), (16, 16, 64, 32, 12), (4, 32, 300, 8, 9)] {
        let kern = pointwise_conv(mr, cols, true);
        let shapes = vec![vec![2, c, hw, hw], vec![m, c, 1, 1], vec![m], vec![2, m, hw, hw]];
        for p in PRESETS {
            let s = check(&kern, &shapes, p);
            println!("{p} mr {mr} cols {cols} C {c} M {m} HW {hw}: {}", s.report());
        }
    }
}
