//! Random elementwise and row-reduction kernels (broadcasts, transposes, expression trees):
//! the stream form and the generic form against the evaluator.

mod common;
use common::*;
use kiln_ir::kernel::{BinOp, Idx, Kernel, RedOp, Stmt, UnOp, Val};
use kiln_npu::codegen::Options;
use proptest::prelude::*;

/// How an input maps the output's index: each input axis is an output axis or a broadcast 1.
#[derive(Clone, Debug)]
struct Input {
    axes: Vec<Option<usize>>,
}

#[derive(Clone, Debug)]
enum Expr {
    Load(usize),
    Const(f64),
    Un(UnOp, Box<Expr>),
    Bin(BinOp, Box<Expr>, Box<Expr>),
    /// `axis < t ? a : b` with `b`'s loads shifted by `t` along `axis` (Concat): `b` would
    /// read out of bounds on `a`'s lanes.
    Concat(usize, i64, Box<Expr>, Box<Expr>),
}

fn expr(inputs: usize) -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![(0..inputs).prop_map(Expr::Load), (-3i32..4).prop_map(|c| Expr::Const(c as f64 * 0.5))];
    leaf.prop_recursive(3, 12, 2, |inner| {
        prop_oneof![
            (
                prop::sample::select(vec![UnOp::Neg, UnOp::Abs, UnOp::Exp, UnOp::Tanh, UnOp::Relu, UnOp::Sigmoid]),
                inner.clone()
            )
                .prop_map(|(o, x)| Expr::Un(o, Box::new(x))),
            (
                prop::sample::select(vec![BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Max, BinOp::Min]),
                inner.clone(),
                inner.clone()
            )
                .prop_map(|(o, a, b)| Expr::Bin(o, Box::new(a), Box::new(b))),
            (0usize..3, 0i64..8, inner.clone(), inner).prop_map(|(ax, t, a, b)| Expr::Concat(
                ax,
                t,
                Box::new(a),
                Box::new(b)
            )),
        ]
    })
}

fn val(e: &Expr, inputs: &[Input], vars: &[Idx]) -> Val {
    match e {
        Expr::Concat(ax, t, a, b) => {
            let ax = ax % vars.len();
            let mut shifted = vars.to_vec();
            shifted[ax] = Idx::Sub(Box::new(vars[ax].clone()), Box::new(Idx::Const(*t)));
            Val::IfLess {
                lhs: vars[ax].clone(),
                rhs: Idx::Const(*t),
                then: Box::new(val(a, inputs, vars)),
                other: Box::new(val(b, inputs, &shifted)),
            }
        }
        Expr::Load(i) => {
            let index = inputs[*i].axes.iter().map(|a| a.map_or(Idx::Const(0), |a| vars[a].clone())).collect();
            Val::Load { buf: *i, index }
        }
        Expr::Const(c) => Val::Const(*c),
        Expr::Un(o, x) => Val::Un(*o, Box::new(val(x, inputs, vars))),
        Expr::Bin(o, a, b) => Val::Bin(*o, Box::new(val(a, inputs, vars)), Box::new(val(b, inputs, vars))),
    }
}

#[derive(Clone, Debug)]
struct Case {
    dims: Vec<usize>,
    inputs: Vec<Input>,
    body: Expr,
    /// Reduce the last axis of input 0 per row and add it (a row reduction).
    reduce: Option<RedOp>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(prop_oneof![1usize..6, 6usize..40, Just(300usize)], 1..4)
            .prop_filter("small enough", |d| d.iter().product::<usize>() <= 30_000),
        1usize..4,
    )
        .prop_flat_map(|(dims, n)| {
            let rank = dims.len();
            let input = prop::collection::vec(any::<bool>(), rank)
                .prop_flat_map(move |bcast| {
                    Just((0..rank).collect::<Vec<usize>>()).prop_shuffle().prop_map(move |perm| Input {
                        axes: perm.iter().map(|&a| if bcast[a] && a + 1 != rank { None } else { Some(a) }).collect(),
                    })
                })
                .boxed();
            (
                Just(dims),
                prop::collection::vec(input, n),
                expr(n),
                prop::option::of(prop::sample::select(vec![RedOp::Sum, RedOp::Max, RedOp::Min])),
            )
                .prop_map(|(dims, inputs, body, reduce)| Case { dims, inputs, body, reduce })
        })
}

fn build(c: &Case) -> (Kernel, Vec<Vec<usize>>) {
    let rank = c.dims.len();
    let n = c.inputs.len();
    let out = n;
    let vars: Vec<Idx> = (0..rank).map(Idx::Var).collect();
    let mut value = val(&c.body, &c.inputs, &vars);
    let mut shapes: Vec<Vec<usize>> =
        c.inputs.iter().map(|i| i.axes.iter().map(|a| a.map_or(1, |a| c.dims[a])).collect()).collect();
    shapes.push(c.dims.clone());
    let mut bufs: Vec<_> = (0..n)
        .map(|i| {
            buf(
                &format!("x{i}"),
                &shapes[i]
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    bufs.push(buf(
        "y",
        &c.dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    ));
    let store = Stmt::Store { buf: out, index: vars.clone(), value: value.clone() };
    let body = match c.reduce {
        None => {
            let mut s = store;
            for a in (0..rank).rev() {
                s = for_(a, Idx::Const(c.dims[a] as i64), vec![s]);
            }
            vec![s]
        }
        Some(op) => {
            // Per row (all axes but the last): s = reduce over the last axis of the body.
            let mut rvars = vars.clone();
            rvars[rank - 1] = Idx::Var(64);
            let r = Val::Reduce {
                op,
                var: 64,
                extent: Idx::Const(c.dims[rank - 1] as i64),
                body: Box::new(val(&c.body, &c.inputs, &rvars)),
            };
            value = Val::Bin(BinOp::Add, Box::new(value), Box::new(Val::Scalar(0)));
            let mut row = vec![
                let_(0, r),
                for_(
                    rank - 1,
                    Idx::Const(c.dims[rank - 1] as i64),
                    vec![Stmt::Store { buf: out, index: vars.clone(), value }],
                ),
            ];
            for a in (0..rank - 1).rev() {
                row = vec![for_(a, Idx::Const(c.dims[a] as i64), row)];
            }
            row
        }
    };
    (kernel("random", bufs, n, vec![], body), shapes)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("NPU_RANDOM_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(32), ..ProptestConfig::default() })]

    #[test]
    fn random_kernels_match_the_evaluator(c in case()) {
        let (k, shapes) = build(&c);
        for p in PRESETS {
            check(&k, &shapes, p);
        }
        let small: usize = c.dims.iter().product();
        if small <= 400 {
            check_with(&k, &shapes, "davinci", &Options { streams: false, ..Options::default() });
            check_with(&k, &shapes, "mlu", &Options { slots: 1, ..Options::default() });
        }
    }
}
