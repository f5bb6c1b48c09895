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

/// LayerNorm over the last axis: mean, variance, then the normalized, scaled row.
fn layernorm() -> kiln_ir::kernel::Kernel {
    use kiln_ir::kernel::Val::Scalar;
    let x = |j| ld(0, vec![v(0), v(j)]);
    let c = || kiln_ir::kernel::Val::FromIdx(dim(0, 1));
    let body = vec![for_(
        0,
        dim(3, 0),
        vec![
            let_(0, div(reduce(RedOp::Sum, 64, dim(0, 1), x(64)), c())),
            let_(1, div(reduce(RedOp::Sum, 65, dim(0, 1), mul(sub(x(65), Scalar(0)), sub(x(65), Scalar(0)))), c())),
            let_(2, un(UnOp::Recip, un(UnOp::Sqrt, add(Scalar(1), cst(1e-5))))),
            for_(
                1,
                dim(3, 1),
                vec![store(
                    3,
                    vec![v(0), v(1)],
                    add(mul(mul(sub(x(1), Scalar(0)), Scalar(2)), ld(1, vec![v(1)])), ld(2, vec![v(1)])),
                )],
            ),
        ],
    )];
    kernel(
        "layernorm",
        vec![buf("x", &["S", "D"]), buf("g", &["D"]), buf("b", &["D"]), buf("y", &["S", "D"])],
        3,
        vec![],
        body,
    )
}

#[test]
fn layernorm_rows() {
    let k = layernorm();
    for (s, d) in [(4, 10), (64, 768), (5, 3000)] {
        for p in PRESETS {
            let st = check(&k, &[vec![s, d], vec![d], vec![d], vec![s, d]], p);
            // The row is read from global memory once (x, then g and b once per stream).
            let input = (s * d + 2 * d) as u64 * 4;
            let read = st.bytes.iter().filter(|(k, _)| k.starts_with("GM->")).map(|(_, b)| b).sum::<u64>();
            println!("{p} [{s}, {d}]: {}", st.report());
            if d <= 768 {
                assert_eq!(read, input, "{p}");
            }
        }
    }
}

/// ReduceSum over the last axis into `[N, 1]`, and a mean over the last two axes.
#[test]
fn row_reductions_store_scalars() {
    let body = vec![for_(
        0,
        dim(1, 0),
        vec![
            let_(0, reduce(RedOp::Sum, 64, dim(0, 1), ld(0, vec![v(0), v(64)]))),
            store(1, vec![v(0), k(0)], kiln_ir::kernel::Val::Scalar(0)),
        ],
    )];
    let sum = kernel("reduce_sum", vec![buf("x", &["N", "C"]), buf("y", &["N", "1"])], 1, vec![], body);
    let mean2 = kernel(
        "reduce_mean2",
        vec![buf("x", &["N", "A", "B"]), buf("y", &["N", "1", "1"])],
        1,
        vec![],
        vec![for_(
            0,
            dim(1, 0),
            vec![store(
                1,
                vec![v(0), k(0), k(0)],
                div(
                    reduce(
                        RedOp::Max,
                        64,
                        dim(0, 1),
                        reduce(RedOp::Max, 65, dim(0, 2), ld(0, vec![v(0), v(64), v(65)])),
                    ),
                    cst(3.0),
                ),
            )],
        )],
    );
    for p in PRESETS {
        check(&sum, &[vec![37, 50], vec![37, 1]], p);
        check(&mean2, &[vec![6, 5, 40], vec![6, 1, 1]], p);
    }
}

/// Transpose (strided loads) and broadcasting through a run-time size (`ZeroIfOne`).
#[test]
fn index_maps() {
    let t = kernel(
        "transpose",
        vec![buf("x", &["C", "N"]), buf("y", &["N", "C"])],
        1,
        vec![],
        vec![for_(0, dim(1, 0), vec![for_(1, dim(1, 1), vec![store(1, vec![v(0), v(1)], ld(0, vec![v(1), v(0)]))])])],
    );
    let zi =
        |a: kiln_ir::kernel::Idx, b: kiln_ir::kernel::Idx| kiln_ir::kernel::Idx::ZeroIfOne(Box::new(a), Box::new(b));
    let bc = kernel(
        "broadcast",
        vec![buf("a", &["N", "C"]), buf("b", &["K", "C"]), buf("y", &["N", "C"])],
        2,
        vec![],
        vec![for_(
            0,
            dim(2, 0),
            vec![for_(
                1,
                dim(2, 1),
                vec![store(2, vec![v(0), v(1)], add(ld(0, vec![v(0), v(1)]), ld(1, vec![zi(dim(1, 0), v(0)), v(1)])))],
            )],
        )],
    );
    // Reshape [N, C] -> [N·C / 8, 8] read back through division and remainder.
    let rs = kernel(
        "reshape",
        vec![buf("x", &["N", "C"]), buf("y", &["R", "8"])],
        1,
        vec![],
        vec![for_(
            0,
            dim(1, 0),
            vec![for_(
                1,
                k(8),
                vec![store(
                    1,
                    vec![v(0), v(1)],
                    ld(
                        0,
                        vec![
                            idiv(iadd(imul(v(0), k(8)), v(1)), dim(0, 1)),
                            irem(iadd(imul(v(0), k(8)), v(1)), dim(0, 1)),
                        ],
                    ),
                )],
            )],
        )],
    );
    for p in PRESETS {
        check(&t, &[vec![33, 20], vec![20, 33]], p);
        check(&bc, &[vec![9, 70], vec![1, 70], vec![9, 70]], p);
        check(&bc, &[vec![9, 70], vec![9, 70], vec![9, 70]], p);
        check(&rs, &[vec![6, 16], vec![12, 8]], p);
        check(&rs, &[vec![4, 6], vec![3, 8]], p);
    }
}

/// Attention for one head as the lowering builds it: scores in a local buffer per query.
fn attention() -> kiln_ir::kernel::Kernel {
    use kiln_ir::kernel::{Local, Val::Scalar};
    // q [S, D], k [T, D], v [T, E], out [S, E]; local scores [T].
    let (q, kk, vv, out, scores) = (0, 1, 2, 3, 4);
    let sc = |j| ld(scores, vec![v(j)]);
    let body = vec![for_(
        0,
        dim(out, 0),
        vec![
            for_(
                2,
                dim(kk, 0),
                vec![store(
                    scores,
                    vec![v(2)],
                    mul(
                        reduce(RedOp::Sum, 64, dim(q, 1), mul(ld(q, vec![v(0), v(64)]), ld(kk, vec![v(2), v(64)]))),
                        cst(0.125),
                    ),
                )],
            ),
            let_(0, reduce(RedOp::Max, 65, dim(kk, 0), sc(65))),
            for_(3, dim(kk, 0), vec![store(scores, vec![v(3)], un(UnOp::Exp, sub(sc(3), Scalar(0))))]),
            let_(1, reduce(RedOp::Sum, 66, dim(kk, 0), sc(66))),
            for_(
                4,
                dim(out, 1),
                vec![store(
                    out,
                    vec![v(0), v(4)],
                    div(reduce(RedOp::Sum, 67, dim(kk, 0), mul(sc(67), ld(vv, vec![v(67), v(4)]))), Scalar(1)),
                )],
            ),
        ],
    )];
    kernel(
        "attention",
        vec![buf("q", &["S", "D"]), buf("k", &["T", "D"]), buf("v", &["T", "E"]), buf("out", &["S", "E"])],
        3,
        vec![Local { name: "scores".into(), size: vec![dim(kk, 0)] }],
        body,
    )
}

#[test]
fn attention_with_a_local() {
    let k = attention();
    for p in PRESETS {
        let s = check(&k, &[vec![12, 16], vec![20, 16], vec![20, 8], vec![12, 8]], p);
        println!("{p}: {}", s.report());
    }
}

/// Concat on the last axis (`IfLess` picks the input) and a padded max pool (a window
/// reduction whose taps outside the input are −∞): conditions split the lanes of streams.
#[test]
fn conditions_split_lanes() {
    use kiln_ir::kernel::Val;
    let concat = kernel(
        "concat",
        vec![buf("a", &["N", "3"]), buf("b", &["N", "5"]), buf("y", &["N", "8"])],
        2,
        vec![],
        vec![for_(
            0,
            dim(2, 0),
            vec![for_(
                1,
                k(8),
                vec![store(
                    2,
                    vec![v(0), v(1)],
                    Val::IfLess {
                        lhs: v(1),
                        rhs: k(3),
                        then: Box::new(ld(0, vec![v(0), v(1)])),
                        other: Box::new(ld(1, vec![v(0), isub(v(1), k(3))])),
                    },
                )],
            )],
        )],
    );
    // 1-D max pool, kernel 3, stride 2, pad 1: y[i] = max over t < 3 of x[2i + t - 1].
    let pos = iadd(imul(v(0), k(2)), isub(v(64), k(1)));
    let tap = Val::IfLess {
        lhs: pos.clone(),
        rhs: k(0),
        then: Box::new(cst(f64::NEG_INFINITY)),
        other: Box::new(Val::IfLess {
            lhs: pos.clone(),
            rhs: dim(0, 0),
            then: Box::new(ld(0, vec![pos])),
            other: Box::new(cst(f64::NEG_INFINITY)),
        }),
    };
    let pool = kernel(
        "maxpool",
        vec![buf("x", &["L"]), buf("y", &["O"])],
        1,
        vec![],
        vec![for_(0, dim(1, 0), vec![store(1, vec![v(0)], reduce(RedOp::Max, 64, k(3), tap))])],
    );
    for p in PRESETS {
        let s = check(&concat, &[vec![40, 3], vec![40, 5], vec![40, 8]], p);
        // Streams, not one-element copies.
        assert!(s.instr_counts["copy"] < 20, "{p}: {}", s.report());
        let s = check(&pool, &[vec![1001], vec![501]], p);
        assert!(s.instr_counts["copy"] < 20, "{p}: {}", s.report());
        check_with(&pool, &[vec![11], vec![6]], p, &generic());
    }
}

/// A local too big for UB lives in global memory by default (a `tmp` buffer of the program).
#[test]
fn big_locals_spill_to_global_memory() {
    use kiln_ir::kernel::Local;
    let n = dim(0, 0);
    let k = kernel(
        "spill",
        vec![buf("x", &["N"]), buf("y", &["N"])],
        1,
        vec![Local { name: "big".into(), size: vec![n.clone()] }],
        vec![
            for_(0, n.clone(), vec![store(2, vec![v(0)], mul(ld(0, vec![v(0)]), cst(2.0)))]),
            for_(
                1,
                n.clone(),
                vec![store(1, vec![v(1)], add(ld(2, vec![isub(isub(n.clone(), k(1)), v(1))]), ld(0, vec![v(1)])))],
            ),
        ],
    );
    for p in PRESETS {
        let s = check(&k, &[vec![300_000], vec![300_000]], p);
        assert!(s.gm_bytes >= 4 * 4 * 300_000, "{p}: {}", s.report());
    }
    let cfg = kiln_npu::NpuConfig::preset("davinci").unwrap();
    let prog = kiln_npu::compile(&k, &[vec![300_000], vec![300_000]], &cfg).unwrap();
    assert!(prog.to_asm().contains(".buffer tmp big "), "{}", &prog.to_asm()[..300]);
}

#[test]
fn a_local_larger_than_every_scratchpad_does_not_fit() {
    use kiln_ir::kernel::Local;
    let k = kernel(
        "k3_fused",
        vec![buf("x", &["N"]), buf("y", &["N"])],
        1,
        vec![Local { name: "big".into(), size: vec![dim(0, 0)] }],
        vec![for_(0, dim(1, 0), vec![store(1, vec![v(0)], ld(0, vec![v(0)]))])],
    );
    let cfg = kiln_npu::NpuConfig::preset("davinci").unwrap();
    let keep = Options { spill_locals: false, ..Options::default() };
    let e = kiln_npu::codegen::compile_with(&k, &[vec![76800], vec![76800]], &cfg, &keep).unwrap_err();
    assert_eq!(e.to_string(), "kernel k3_fused: needs 300 KiB of UB, the davinci config has 192 KiB");
    assert!(matches!(e, kiln_npu::NpuError::DoesNotFit { .. }));
    // Wrong shapes are errors too.
    let e = kiln_npu::compile(&k, &[vec![5]], &cfg).unwrap_err();
    assert_eq!(e.to_string(), "unsupported: kernel k3_fused: 1 shapes given for 2 buffers");
    let e = kiln_npu::compile(&k, &[vec![5], vec![6]], &cfg).unwrap_err();
    assert_eq!(e.to_string(), "unsupported: kernel k3_fused: dim 'N' is bound to 5 and to 6");
}

/// A direct 3×3 Conv as the lowering builds it: the weights packed into a local panel, `Mma`
/// tiles of output pixels × 16 channels (columns strided by the output plane).
fn direct_conv(mr: i64) -> kiln_ir::kernel::Kernel {
    use kiln_ir::kernel::{Local, Mma, Stmt};
    const ROW: usize = 63;
    let (x, w, y, panel) = (0, 1, 2, 3);
    let nr = 16;
    let blocks = idiv(dim(w, 0), k(nr));
    let ni = idiv(v(0), blocks.clone());
    let co0 = imul(irem(v(0), blocks.clone()), k(nr));
    let (kh, kw) = (dim(w, 2), dim(w, 3));
    let init = for_(
        1,
        k(nr),
        vec![for_(
            2,
            dim(y, 2),
            vec![for_(3, dim(y, 3), vec![store(y, vec![ni.clone(), iadd(co0.clone(), v(1)), v(2), v(3)], cst(0.5))])],
        )],
    );
    let pk = iadd(imul(iadd(imul(v(1), kh.clone()), v(2)), kw.clone()), v(3));
    let pack = for_(
        1,
        dim(x, 1),
        vec![for_(
            2,
            kh.clone(),
            vec![for_(
                3,
                kw.clone(),
                vec![for_(
                    4,
                    k(nr),
                    vec![store(panel, vec![pk, v(4)], ld(w, vec![iadd(co0.clone(), v(4)), v(1), v(2), v(3)]))],
                )],
            )],
        )],
    );
    let tile = Stmt::Mma(Box::new(Mma {
        rows: mr as usize,
        cols: nr as usize,
        lanes: 16,
        valid: k(nr),
        row: ROW,
        red: vec![(3, dim(x, 1)), (4, kh.clone()), (5, kw.clone())],
        a: ld(x, vec![ni.clone(), v(3), iadd(v(1), v(4)), iadd(iadd(imul(v(2), k(mr)), v(ROW)), v(5))]),
        b: (panel, vec![iadd(imul(iadd(imul(v(3), kh.clone()), v(4)), kw.clone()), v(5)), k(0)]),
        c: (y, vec![ni.clone(), co0.clone(), v(1), iadd(imul(v(2), k(mr)), v(ROW))]),
        c_col: imul(dim(y, 2), dim(y, 3)),
    }));
    let rows = for_(1, dim(y, 2), vec![for_(2, idiv(dim(y, 3), k(mr)), vec![tile])]);
    kernel(
        "conv3x3",
        vec![buf("x", &["N", "C", "H", "W"]), buf("w", &["M", "C", "KH", "KW"]), buf("y", &["N", "M", "OH", "OW"])],
        2,
        vec![Local { name: "panel".into(), size: vec![imul(imul(dim(x, 1), kh), kw), k(nr)] }],
        vec![for_(0, imul(dim(y, 0), blocks), vec![init, pack, rows])],
    )
}

#[test]
fn mma_direct_conv_with_a_local_panel() {
    let kern = direct_conv(4);
    // 8 input channels: the reduction fits; 64: it goes in chunks, the panel staying whole in
    // L1 on davinci.
    for c in [8, 64] {
        let shapes = vec![vec![1, c, 10, 10], vec![32, c, 3, 3], vec![1, 32, 8, 8]];
        for p in PRESETS {
            let s = check(&kern, &shapes, p);
            println!("{p} C {c}: {}", s.report());
        }
    }
}

/// `y = (a + b)` → `exp` → `· c` as one fused kernel and as three kernels.
#[test]
fn fusion_moves_fewer_bytes_and_takes_fewer_cycles() {
    let two = |name: &str, f: fn(kiln_ir::kernel::Val, kiln_ir::kernel::Val) -> kiln_ir::kernel::Val| {
        kernel(
            name,
            vec![buf("a", &["N", "C"]), buf("b", &["N", "C"]), buf("y", &["N", "C"])],
            2,
            vec![],
            vec![for_(
                0,
                dim(2, 0),
                vec![for_(
                    1,
                    dim(2, 1),
                    vec![store(2, vec![v(0), v(1)], f(ld(0, vec![v(0), v(1)]), ld(1, vec![v(0), v(1)])))],
                )],
            )],
        )
    };
    let exp = kernel(
        "exp",
        vec![buf("a", &["N", "C"]), buf("y", &["N", "C"])],
        1,
        vec![],
        vec![for_(
            0,
            dim(1, 0),
            vec![for_(1, dim(1, 1), vec![store(1, vec![v(0), v(1)], un(UnOp::Exp, ld(0, vec![v(0), v(1)])))])],
        )],
    );
    let fused = kernel(
        "fused",
        vec![buf("a", &["N", "C"]), buf("b", &["N", "C"]), buf("c", &["N", "C"]), buf("y", &["N", "C"])],
        3,
        vec![],
        vec![for_(
            0,
            dim(3, 0),
            vec![for_(
                1,
                dim(3, 1),
                vec![store(
                    3,
                    vec![v(0), v(1)],
                    mul(un(UnOp::Exp, add(ld(0, vec![v(0), v(1)]), ld(1, vec![v(0), v(1)]))), ld(2, vec![v(0), v(1)])),
                )],
            )],
        )],
    );
    let (n, c) = (64, 1024);
    let s2 = vec![vec![n, c]; 3];
    for p in PRESETS {
        let f = check(&fused, &vec![vec![n, c]; 4], p);
        let parts = [check(&two("add", add), &s2, p), check(&exp, &s2[..2], p), check(&two("mul", mul), &s2, p)];
        let (cycles, bytes) = parts.iter().fold((0, 0), |(c, b), s| (c + s.cycles, b + s.gm_bytes));
        println!("{p}: fused {} cycles {} bytes; unfused {cycles} cycles {bytes} bytes", f.cycles, f.gm_bytes);
        assert_eq!(f.gm_bytes * 2, bytes, "{p}: 4 tensors moved instead of 8");
        // Each DMA pays its latency, so the fused kernel's three input streams cost more per byte
        // than one: the gain is below the 8/4 ratio of bytes.
        assert!(f.cycles * 4 < cycles * 3, "{p}: fused {} unfused {cycles}", f.cycles);
    }
}

/// Loops whose trip count depends on an outer loop and is sometimes zero (a triangle).
#[test]
fn zero_trip_inner_loops() {
    let tri = kernel(
        "triangle",
        vec![buf("x", &["N", "N"]), buf("y", &["N", "N"])],
        1,
        vec![],
        vec![for_(
            0,
            dim(1, 0),
            vec![
                let_(0, reduce(RedOp::Sum, 64, v(0), ld(0, vec![v(0), v(64)]))),
                for_(
                    1,
                    v(0),
                    vec![store(1, vec![v(0), v(1)], add(ld(0, vec![v(0), v(1)]), kiln_ir::kernel::Val::Scalar(0)))],
                ),
            ],
        )],
    );
    for p in PRESETS {
        check(&tri, &[vec![9, 9], vec![9, 9]], p);
        check(&tri, &[vec![1, 1], vec![1, 1]], p);
    }
}

/// A MatMul as the CPU lowering builds it: `C[i, j] += Σ_v A[i, k + v]·B[k + v, j]` over
/// blocks of `k`, the `A` values as per-row scalars and the `B` values bound in the inner
/// loop. The `C` row stays in UB across the `k` loop (an accumulator).
#[test]
fn matmul_accumulates_in_ub() {
    use kiln_ir::kernel::Val::Scalar;
    // a [M, K], b [K, N], c [M, N]; rows of C in blocks of 2, k in steps of 2.
    let (a, b, c) = (0, 1, 2);
    let init = for_(1, dim(c, 1), vec![store(c, vec![v(0), v(1)], cst(0.0))]);
    let kk = |d: i64| iadd(imul(v(1), k(2)), k(d));
    let body = vec![
        let_(0, ld(a, vec![v(0), kk(0)])),
        let_(1, ld(a, vec![v(0), kk(1)])),
        for_(
            2,
            dim(c, 1),
            vec![
                let_(2, ld(b, vec![kk(0), v(2)])),
                let_(3, ld(b, vec![kk(1), v(2)])),
                store(
                    c,
                    vec![v(0), v(2)],
                    add(add(ld(c, vec![v(0), v(2)]), mul(Scalar(0), Scalar(2))), mul(Scalar(1), Scalar(3))),
                ),
            ],
        ),
    ];
    let kern = kernel(
        "matmul",
        vec![buf("a", &["M", "K"]), buf("b", &["K", "N"]), buf("c", &["M", "N"])],
        2,
        vec![],
        vec![for_(0, dim(c, 0), vec![init, for_(1, idiv(dim(a, 1), k(2)), body)])],
    );
    for p in PRESETS {
        let s = check(&kern, &[vec![6, 64], vec![64, 300], vec![6, 300]], p);
        // C is written once per row of C, not once per step of k.
        assert_eq!(
            s.bytes.iter().filter(|(k, _)| k.ends_with("->GM")).map(|(_, b)| b).sum::<u64>(),
            2 * 6 * 300 * 4,
            "{p}: {}",
            s.report()
        );
    }
}

/// A padded 3×3 Conv whose tiles guard their taps (`select` on the column, the load's index
/// clamped) as the lowering's edge tiles do: split into one plain tile per row.
#[test]
fn mma_guarded_edge_tiles() {
    use kiln_ir::kernel::{Local, Mma, Stmt, Val};
    const ROW: usize = 63;
    let (x, w, y, panel) = (0, 1, 2, 3);
    let (nr, mr) = (16i64, 4i64);
    let co0 = imul(v(0), k(nr));
    let pk = iadd(imul(iadd(imul(v(1), k(3)), v(2)), k(3)), v(3));
    let pack = for_(
        1,
        dim(x, 1),
        vec![for_(
            2,
            k(3),
            vec![for_(
                3,
                k(3),
                vec![for_(
                    4,
                    k(nr),
                    vec![store(panel, vec![pk, v(4)], ld(w, vec![iadd(co0.clone(), v(4)), v(1), v(2), v(3)]))],
                )],
            )],
        )],
    );
    let init = for_(
        1,
        k(nr),
        vec![for_(
            2,
            dim(y, 2),
            vec![for_(3, dim(y, 3), vec![store(y, vec![k(0), iadd(co0.clone(), v(1)), v(2), v(3)], cst(0.0))])],
        )],
    );
    // Rows of taps in bounds: ky in [y0, y0 + ny).
    let y0 = Idx::Max(Box::new(k(0)), Box::new(isub(k(1), v(1))));
    let y1 = imin(k(3), isub(iadd(dim(x, 2), k(1)), v(1)));
    let ny = Idx::Max(Box::new(k(0)), Box::new(isub(y1, y0.clone())));
    use kiln_ir::kernel::Idx;
    let o = iadd(imul(v(2), k(mr)), v(ROW));
    let iw = isub(iadd(o.clone(), v(5)), k(1));
    let inside = Idx::Max(Box::new(k(0)), Box::new(imin(iw.clone(), isub(dim(x, 3), k(1)))));
    let ih = isub(iadd(v(1), iadd(y0.clone(), v(4))), k(1));
    let a = Val::Select {
        lhs: iw.clone(),
        rhs: k(0),
        then: Box::new(cst(0.0)),
        other: Box::new(Val::Select {
            lhs: iw,
            rhs: dim(x, 3),
            then: Box::new(ld(x, vec![k(0), v(3), ih, inside])),
            other: Box::new(cst(0.0)),
        }),
    };
    let tile = Stmt::Mma(Box::new(Mma {
        rows: mr as usize,
        cols: nr as usize,
        lanes: 16,
        valid: k(nr),
        row: ROW,
        red: vec![(3, dim(x, 1)), (4, ny), (5, k(3))],
        a,
        b: (panel, vec![iadd(imul(iadd(imul(v(3), k(3)), iadd(y0, v(4))), k(3)), v(5)), k(0)]),
        c: (y, vec![k(0), co0.clone(), v(1), o]),
        c_col: imul(dim(y, 2), dim(y, 3)),
    }));
    let rows = for_(1, dim(y, 2), vec![for_(2, idiv(dim(y, 3), k(mr)), vec![tile])]);
    let kern = kernel(
        "conv3x3_pad",
        vec![buf("x", &["1", "C", "H", "W"]), buf("w", &["M", "C", "3", "3"]), buf("y", &["1", "M", "H", "W"])],
        2,
        vec![Local { name: "panel".into(), size: vec![imul(dim(x, 1), k(9)), k(nr)] }],
        vec![for_(0, idiv(dim(w, 0), k(nr)), vec![init, pack, rows])],
    );
    let shapes = [vec![1, 8, 8, 8], vec![32, 8, 3, 3], vec![1, 32, 8, 8]];
    for p in PRESETS {
        let s = check(&kern, &shapes, p);
        let one_by_one =
            check_with(&kern, &shapes, p, &Options { matrix: false, streams: false, ..Options::default() });
        println!("{p}: {} cycles; {} without streams or the matrix unit", s.cycles, one_by_one.cycles);
        // Plain tiles, not one element at a time.
        assert!(s.instr_counts.get("mmad").copied().unwrap_or(0) > 0 || p == "sunway", "{p}: {}", s.report());
        assert!(s.cycles * 5 < one_by_one.cycles, "{p}: {} vs {}", s.cycles, one_by_one.cycles);
    }
}
