//! Figures: cycles, utilization and global-memory traffic of a few blocks per preset, fused
//! (one kernel) against unfused (one kernel per op, intermediates through global memory).
//! `cargo test -p kiln-npu --test figures -- --nocapture` prints the table.

mod common;
use common::*;
use kiln_ir::kernel::{Idx, Kernel, Mma, RedOp, Stmt, UnOp, Val};
use kiln_npu::SimStats;

fn rows2(name: &str, bufs: &[&str], inputs: usize, body: Vec<Stmt>) -> Kernel {
    kernel(name, bufs.iter().map(|b| buf(b, &["N", "C"])).collect(), inputs, vec![], body)
}

/// `for i, j: out[i, j] = f(loads at [i, j])`.
fn elementwise(name: &str, bufs: &[&str], inputs: usize, value: Val) -> Kernel {
    let out = bufs.len() - 1;
    rows2(
        name,
        bufs,
        inputs,
        vec![for_(0, dim(out, 0), vec![for_(1, dim(out, 1), vec![store(out, vec![v(0), v(1)], value)])])],
    )
}

fn x(b: usize) -> Val {
    ld(b, vec![v(0), v(1)])
}

/// `out[i] = reduce_j f(row i)` into a `[N, 1]` buffer.
fn row_reduce(name: &str, inputs: &[&str], op: RedOp, body: Val, scale: f64) -> Kernel {
    let mut bufs: Vec<_> = inputs.iter().map(|b| buf(b, &["N", "C"])).collect();
    bufs.push(buf("r", &["N", "1"]));
    let out = inputs.len();
    kernel(
        name,
        bufs,
        inputs.len(),
        vec![],
        vec![for_(
            0,
            dim(out, 0),
            vec![store(out, vec![v(0), k(0)], mul(reduce(op, 64, dim(0, 1), body), cst(scale)))],
        )],
    )
}

fn at64(b: usize) -> Val {
    ld(b, vec![v(0), v(64)])
}

/// Row scalar `s[i, 0]` of a `[N, 1]` buffer.
fn s(b: usize) -> Val {
    ld(b, vec![v(0), k(0)])
}

fn cols(name: &str, inputs: &[(&str, bool)], value: Val) -> Kernel {
    // Inputs flagged `true` are [N, 1] row scalars.
    let mut bufs: Vec<_> = inputs.iter().map(|(b, r)| buf(b, if *r { &["N", "1"] } else { &["N", "C"] })).collect();
    bufs.push(buf("y", &["N", "C"]));
    let out = inputs.len();
    kernel(
        name,
        bufs,
        inputs.len(),
        vec![],
        vec![for_(0, dim(out, 0), vec![for_(1, dim(out, 1), vec![store(out, vec![v(0), v(1)], value)])])],
    )
}

struct Block {
    name: &'static str,
    fused: (Kernel, Vec<Vec<usize>>),
    unfused: Vec<(Kernel, Vec<Vec<usize>>)>,
}

fn blocks() -> Vec<Block> {
    let (n, c) = (128usize, 1024usize);
    let nc = vec![n, c];
    let n1 = vec![n, 1];
    let add_exp_mul = Block {
        name: "add→exp→mul [128×1024]",
        fused: (
            elementwise("fused", &["a", "b", "c", "y"], 3, mul(un(UnOp::Exp, add(x(0), x(1))), x(2))),
            vec![nc.clone(); 4],
        ),
        unfused: vec![
            (elementwise("add", &["a", "b", "t"], 2, add(x(0), x(1))), vec![nc.clone(); 3]),
            (elementwise("exp", &["t", "u"], 1, un(UnOp::Exp, x(0))), vec![nc.clone(); 2]),
            (elementwise("mul", &["u", "c", "y"], 2, mul(x(0), x(1))), vec![nc.clone(); 3]),
        ],
    };
    let (ns, cs) = (128usize, 512usize);
    let nsc = vec![ns, cs];
    let ns1 = vec![ns, 1];
    let xs = |j: usize| ld(0, vec![v(0), v(j)]);
    let softmax_fused = kernel(
        "softmax",
        vec![buf("x", &["N", "C"]), buf("y", &["N", "C"])],
        1,
        vec![],
        vec![for_(
            0,
            dim(1, 0),
            vec![
                let_(0, reduce(RedOp::Max, 64, dim(0, 1), xs(64))),
                let_(1, reduce(RedOp::Sum, 65, dim(0, 1), un(UnOp::Exp, sub(xs(65), Val::Scalar(0))))),
                for_(
                    1,
                    dim(1, 1),
                    vec![store(1, vec![v(0), v(1)], div(un(UnOp::Exp, sub(xs(1), Val::Scalar(0))), Val::Scalar(1)))],
                ),
            ],
        )],
    );
    let softmax = Block {
        name: "softmax [128×512]",
        fused: (softmax_fused, vec![nsc.clone(); 2]),
        unfused: vec![
            (row_reduce("max", &["x"], RedOp::Max, at64(0), 1.0), vec![nsc.clone(), ns1.clone()]),
            (
                cols("sub_exp", &[("x", false), ("m", true)], un(UnOp::Exp, sub(x(0), s(1)))),
                vec![nsc.clone(), ns1.clone(), nsc.clone()],
            ),
            (row_reduce("sum", &["e"], RedOp::Sum, at64(0), 1.0), vec![nsc.clone(), ns1.clone()]),
            (cols("div", &[("e", false), ("s", true)], div(x(0), s(1))), vec![nsc.clone(), ns1.clone(), nsc.clone()]),
        ],
    };
    let (nl, cl) = (128usize, 768usize);
    let nlc = vec![nl, cl];
    let nl1 = vec![nl, 1];
    let xl = |j: usize| ld(0, vec![v(0), v(j)]);
    let ln_fused = kernel(
        "layernorm",
        vec![buf("x", &["N", "C"]), buf("g", &["C"]), buf("b", &["C"]), buf("y", &["N", "C"])],
        3,
        vec![],
        vec![for_(
            0,
            dim(3, 0),
            vec![
                let_(0, mul(reduce(RedOp::Sum, 64, dim(0, 1), xl(64)), cst(1.0 / cl as f64))),
                let_(
                    1,
                    mul(
                        reduce(
                            RedOp::Sum,
                            65,
                            dim(0, 1),
                            mul(sub(xl(65), Val::Scalar(0)), sub(xl(65), Val::Scalar(0))),
                        ),
                        cst(1.0 / cl as f64),
                    ),
                ),
                let_(2, un(UnOp::Recip, un(UnOp::Sqrt, add(Val::Scalar(1), cst(1e-5))))),
                for_(
                    1,
                    dim(3, 1),
                    vec![store(
                        3,
                        vec![v(0), v(1)],
                        add(mul(mul(sub(xl(1), Val::Scalar(0)), Val::Scalar(2)), ld(1, vec![v(1)])), ld(2, vec![v(1)])),
                    )],
                ),
            ],
        )],
    );
    let gb = |name: &str| buf(name, &["C"]);
    let ln_last = kernel(
        "scale_shift",
        vec![buf("d", &["N", "C"]), buf("r", &["N", "1"]), gb("g"), gb("b"), buf("y", &["N", "C"])],
        4,
        vec![],
        vec![for_(
            0,
            dim(4, 0),
            vec![for_(
                1,
                dim(4, 1),
                vec![store(4, vec![v(0), v(1)], add(mul(mul(x(0), s(1)), ld(2, vec![v(1)])), ld(3, vec![v(1)])))],
            )],
        )],
    );
    let layernorm = Block {
        name: "LayerNorm [128×768]",
        fused: (ln_fused, vec![nlc.clone(), vec![cl], vec![cl], nlc.clone()]),
        unfused: vec![
            (row_reduce("mean", &["x"], RedOp::Sum, at64(0), 1.0 / cl as f64), vec![nlc.clone(), nl1.clone()]),
            (
                cols("center", &[("x", false), ("m", true)], sub(x(0), s(1))),
                vec![nlc.clone(), nl1.clone(), nlc.clone()],
            ),
            (
                row_reduce("var", &["d"], RedOp::Sum, mul(at64(0), at64(0)), 1.0 / cl as f64),
                vec![nlc.clone(), nl1.clone()],
            ),
            (
                kernel(
                    "rstd",
                    vec![buf("v", &["N", "1"]), buf("r", &["N", "1"])],
                    1,
                    vec![],
                    vec![for_(
                        0,
                        dim(1, 0),
                        vec![store(1, vec![v(0), k(0)], un(UnOp::Recip, un(UnOp::Sqrt, add(s(0), cst(1e-5)))))],
                    )],
                ),
                vec![nl1.clone(), nl1.clone()],
            ),
            (ln_last, vec![nlc.clone(), nl1.clone(), vec![cl], vec![cl], nlc.clone()]),
        ],
    };
    let _ = (n1, Idx::Const(0));
    vec![add_exp_mul, softmax, layernorm]
}

/// A 1×1 Conv (GEMM) on `Mma` tiles of `mr` channels × `cols` pixels, K = C.
fn gemm(mr: i64, cols: usize) -> Kernel {
    const ROW: usize = 63;
    let (xb, w, y) = (0, 1, 2);
    let tiles = idiv(dim(w, 0), k(mr));
    let ni = idiv(v(0), tiles.clone());
    let co0 = imul(irem(v(0), tiles.clone()), k(mr));
    let pixels = imul(dim(y, 2), dim(y, 3));
    let tile = Stmt::Mma(Box::new(Mma {
        rows: mr as usize,
        cols,
        lanes: 16,
        valid: k(cols as i64),
        row: ROW,
        red: vec![(2, dim(xb, 1))],
        a: ld(w, vec![iadd(co0.clone(), v(ROW)), v(2), k(0), k(0)]),
        b: (xb, vec![ni.clone(), v(2), k(0), imul(v(1), k(cols as i64))]),
        c: (y, vec![ni.clone(), iadd(co0.clone(), v(ROW)), k(0), imul(v(1), k(cols as i64))]),
        c_col: k(1),
    }));
    let init = for_(
        1,
        k(mr),
        vec![for_(2, pixels.clone(), vec![store(y, vec![ni.clone(), iadd(co0.clone(), v(1)), k(0), v(2)], cst(0.0))])],
    );
    kernel(
        "gemm",
        vec![buf("x", &["N", "C", "H", "W"]), buf("w", &["M", "C", "1", "1"]), buf("y", &["N", "M", "H", "W"])],
        2,
        vec![],
        vec![for_(0, imul(dim(y, 0), tiles), vec![init, for_(1, idiv(pixels, k(cols as i64)), vec![tile])])],
    )
}

fn row(preset: &str, what: &str, s: &SimStats) -> String {
    format!(
        "| {preset} | {what} | {} | {:.0}% | {:.0}% | {:.0}% | {} |",
        s.cycles,
        100.0 * s.matrix_utilization,
        100.0 * s.vector_utilization,
        100.0 * s.dma_utilization,
        kiln_npu::human_bytes(s.gm_bytes)
    )
}

fn sum(parts: &[SimStats]) -> SimStats {
    let cycles: u64 = parts.iter().map(|s| s.cycles).sum();
    let w = |f: fn(&SimStats) -> f64| parts.iter().map(|s| f(s) * s.cycles as f64).sum::<f64>() / cycles.max(1) as f64;
    SimStats {
        cycles,
        gm_bytes: parts.iter().map(|s| s.gm_bytes).sum(),
        matrix_utilization: w(|s| s.matrix_utilization),
        vector_utilization: w(|s| s.vector_utilization),
        dma_utilization: w(|s| s.dma_utilization),
        ..SimStats::default()
    }
}

#[test]
fn fused_blocks_beat_unfused_ones() {
    let mut table = vec![
        "| preset | kernel | cycles | matrix | vector | busiest DMA | GM traffic |".to_string(),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |".to_string(),
    ];
    for preset in PRESETS {
        for b in blocks() {
            let f = check(&b.fused.0, &b.fused.1, preset);
            let parts: Vec<SimStats> = b.unfused.iter().map(|(k, sh)| check(k, sh, preset)).collect();
            let u = sum(&parts);
            table.push(row(preset, &format!("{} fused", b.name), &f));
            table.push(row(preset, &format!("{} unfused ({} kernels)", b.name, parts.len()), &u));
            assert!(f.gm_bytes < u.gm_bytes, "{preset} {}", b.name);
            assert!(f.cycles < u.cycles, "{preset} {}: fused {} unfused {}", b.name, f.cycles, u.cycles);
        }
        for (mr, cols) in [(16, 64), (64, 128)] {
            let g = gemm(mr, cols);
            let s = check(&g, &[vec![1, 256, 32, 32], vec![128, 256, 1, 1], vec![1, 128, 32, 32]], preset);
            table.push(row(preset, &format!("1×1 Conv 256→128 @32×32, Mma {mr}×{cols}"), &s));
        }
    }
    println!("{}", table.join("\n"));
}
