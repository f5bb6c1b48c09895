//! Attention kernels: `softmax(Q·Kᵀ·scale + mask)·V` for one `Attention` op (4-D `[B, H, S, D]`
//! operands, optional additive or boolean mask, `is_causal`, grouped-query heads), with the
//! layout prologue of its fused group (head-split reshapes and transposes) folded into the loads.
//!
//! The parallel loop runs over batch × heads. Per head, `Kᵀ` is packed once into a local
//! `[D, T]` panel; then blocks of `attention_rows` queries (8 on AVX-512) (the last ones one at a time):
//! - `scores[r, j] = q_r · k_j` on register tiles ([`Mma`]: rows are queries, columns
//!   `mma_cols` keys, the head dim reduced), into a local `[attention_rows, T]`;
//! - per row: scale and mask, max, `exp(s - max)` in place, sum, normalize (a row masked out
//!   entirely gives zeros, as the reference does); with `is_causal` a row sees keys `j <= i`
//!   and its later keys are zeroed;
//! - `out = P·V` on register tiles (rows are queries, columns the head dim, keys reduced) when
//!   V's rows are contiguous runs of a buffer, else a per-key loop with the head dim innermost.
//!
//! With `Schedule::attention_per_query` (the GPU schedule) the parallel loop runs over batch ×
//! heads × queries instead, and each iteration walks its keys once: the score `q·k` (head dim
//! reduced), scaled and masked; the running max `m` (from the lowest finite value, so masked
//! `-inf` scores add `exp(-inf) = 0` and never NaN) and sum `l`, rescaled by `exp(m_old − m)`
//! with the output row `acc` (a local of the head dim) as the max grows; then `acc / l` (`l`
//! floored, so a row masked out entirely gives zeros, as the reference does).

use super::{b, LowerResult, Lowering};
use kiln_ir::graph::AttrView;
use kiln_ir::ir::{Module, OpId};
use kiln_ir::kernel::{BinOp, Idx, Local, Mma, RedOp, Stmt, UnOp, Val};
use kiln_ir::Dim;

/// The output shape `[B, Hq, S, Dv]` of Attention op `att`, from its operands (the graph's
/// result type may carry a symbol no operand binds; these are the sizes it computes).
pub(super) fn output_shape(m: &Module, att: OpId) -> LowerResult<Vec<Dim>> {
    let op = m.op(att);
    let q = op.operands.first().copied().flatten().ok_or("Attention without Q")?;
    let v = op.operands.get(2).copied().flatten().ok_or("Attention without V")?;
    let shape = |x| m.value(x).ty.shape.clone().ok_or("Attention operands of unknown rank");
    let (qs, vs) = (shape(q)?, shape(v)?);
    if qs.len() != 4 || vs.len() != 4 {
        return Err("Attention on 3-D inputs is not lowered yet (4-D [B, H, S, D] only)".into());
    }
    Ok(vec![qs[0].clone(), qs[1].clone(), qs[2].clone(), vs[3].clone()])
}

/// The local buffers (numbered from `locals_at`) and loop nest of Attention op `att` storing
/// into buffer `out_buf`.
pub(super) fn body(lw: &Lowering, att: OpId, out_buf: usize, locals_at: usize) -> LowerResult<(Vec<Local>, Vec<Stmt>)> {
    let op = lw.m.op(att);
    let attrs = AttrView(&op.attrs);
    let operand = |i: usize| op.operands.get(i).copied().flatten();
    if (4..op.operands.len()).any(|i| operand(i).is_some()) {
        return Err("Attention with a KV cache or nonpad lengths is not lowered yet".into());
    }
    if attrs.float("softcap", 0.0).map_err(|e| e.0)? != 0.0 {
        return Err("Attention with softcap is not lowered yet".into());
    }
    if attrs.int("qk_matmul_output_mode", 0).map_err(|e| e.0)? != 0 {
        return Err("Attention returning its QK matrix is not lowered yet".into());
    }
    let (q, k, v) = (operand(0).ok_or("no Q")?, operand(1).ok_or("no K")?, operand(2).ok_or("no V")?);
    let (qs, ks, vs) = (lw.shape(q)?.to_vec(), lw.shape(k)?.to_vec(), lw.shape(v)?.to_vec());
    if qs.len() != 4 || ks.len() != 4 || vs.len() != 4 {
        return Err("Attention on 3-D inputs is not lowered yet (4-D [B, H, S, D] only)".into());
    }
    let head_dim = qs[3].known().ok_or("Attention with a symbolic head size")?;
    let scale = attrs.float("scale", 1.0 / (head_dim as f32).sqrt()).map_err(|e| e.0)? as f64;
    // Extents: B·Hq rows of heads, S queries, T keys, D and Dv.
    let (hq, hkv) = (lw.dim(&qs[1])?, lw.dim(&ks[1])?);
    let (s, t, d, dv) = (lw.dim(&qs[2])?, lw.dim(&ks[2])?, lw.dim(&qs[3])?, lw.dim(&vs[3])?);
    let heads = Idx::Mul(b(lw.dim(&qs[0])?), b(hq.clone()));
    let per_query = lw.sched.attention_per_query;
    // Per query, the parallel variable is `bh · S + i`.
    let bh = if per_query { Idx::Div(b(Idx::Var(0)), b(s.clone())) } else { Idx::Var(0) };
    let batch = Idx::Div(b(bh.clone()), b(hq.clone()));
    let head = Idx::Rem(b(bh), b(hq.clone()));
    // Grouped-query attention: query head h reads key/value head h / (Hq / Hkv).
    let kv_head = if qs[1] == ks[1] { head.clone() } else { Idx::Div(b(head.clone()), b(Idx::Div(b(hq), b(hkv)))) };
    if attrs.int("left_window_size", -1).map_err(|e| e.0)? >= 0
        || attrs.int("right_window_size", -1).map_err(|e| e.0)? >= 0
    {
        return Err("Attention with a sliding window is not lowered yet".into());
    }
    // Causal (without a cache): key j takes part iff j <= i, so a row's keys stop at i + 1,
    // which stays within the keys when S <= T.
    let causal = attrs.int("is_causal", 0).map_err(|e| e.0)? != 0;
    if causal {
        match (&qs[2], &ks[2]) {
            (a, c) if a == c => {}
            (Dim::Known(a), Dim::Known(c)) if c >= a => {}
            _ => return Err("causal Attention whose key length may be shorter than the query length".into()),
        }
    }
    let (kt, scores) = (locals_at, locals_at + 1);
    let locals = vec![
        Local { name: "keys_t".into(), size: vec![d.clone(), t.clone()] },
        Local { name: "scores".into(), size: vec![Idx::Const(lw.sched.attention_rows as i64), t.clone()] },
    ];
    // Kᵀ of the head, packed once: kt[e, j] = K[b, kv_head, j, e] (loop variables 1, 2).
    let pack = for_(
        1,
        t.clone(),
        vec![for_(
            2,
            d.clone(),
            vec![Stmt::Store {
                buf: kt,
                index: vec![Idx::Var(2), Idx::Var(1)],
                value: lw.value(k, &[batch.clone(), kv_head.clone(), Idx::Var(1), Idx::Var(2)])?,
            }],
        )],
    );
    // `B` of the P·V tiles: V's rows, when they are contiguous runs of a buffer.
    let v_rows = {
        const COL: usize = 62;
        match lw.value(v, &[batch.clone(), kv_head.clone(), Idx::Var(COL - 1), Idx::Var(COL)])? {
            Val::Load { buf, index } => match index.split_last() {
                Some((last, lead)) if !lead.iter().any(|i| i.uses(COL)) => {
                    last.offset_of(COL).map(|base| (buf, lead.to_vec(), base, COL - 1))
                }
                _ => None,
            },
            _ => None,
        }
    };
    let scale_mask = |i: &Idx, j: Idx, s: Val| -> LowerResult<Val> {
        let mut score = Val::Bin(BinOp::Mul, Box::new(s), Box::new(Val::Const(scale)));
        if let Some(mask) = operand(3) {
            let full = [qs[0].clone(), qs[1].clone(), qs[2].clone(), ks[2].clone()];
            let at = [batch.clone(), head.clone(), i.clone(), j];
            let m = lw.value(mask, &lw.broadcast(&at, &full, lw.shape(mask)?)?)?;
            score = if lw.m.value(mask).ty.dtype == kiln_ir::DType::Bool {
                // A boolean mask: keys where it is false take no part (`-inf`).
                Val::Where { cond: Box::new(m), then: Box::new(score), other: Box::new(Val::Const(f64::NEG_INFINITY)) }
            } else {
                Val::Bin(BinOp::Add, Box::new(score), Box::new(m))
            };
        }
        Ok(score)
    };
    if per_query {
        let locals = vec![
            Local { name: "state".into(), size: vec![Idx::Const(2)] },
            Local { name: "acc".into(), size: vec![dv.clone()] },
        ];
        let (state, acc) = (locals_at, locals_at + 1);
        let i = Idx::Rem(b(Idx::Var(0)), b(s.clone()));
        let (j, z, e) = (Idx::Var(1), Idx::Var(2), lw.fresh_var());
        let st = |x: i64| Val::Load { buf: state, index: vec![Idx::Const(x)] };
        let set = |x: i64, value: Val| Stmt::Store { buf: state, index: vec![Idx::Const(x)], value };
        let a = |z: &Idx| Val::Load { buf: acc, index: vec![z.clone()] };
        let bin = |op: BinOp, x: Val, y: Val| Val::Bin(op, Box::new(x), Box::new(y));
        let exp = |x: Val| Val::Un(UnOp::Exp, Box::new(x));
        let dot = Val::Reduce {
            op: RedOp::Sum,
            var: e,
            extent: d.clone(),
            body: Box::new(bin(
                BinOp::Mul,
                lw.value(q, &[batch.clone(), head.clone(), i.clone(), Idx::Var(e)])?,
                lw.value(k, &[batch.clone(), kv_head.clone(), j.clone(), Idx::Var(e)])?,
            )),
        };
        let kend = if causal { Idx::Add(b(i.clone()), b(Idx::Const(1))) } else { t.clone() };
        // A statement per element of the output row: unrolled when the head dim is known and
        // at most 128 (every `acc` index a constant, so a GPU back end keeps the row in
        // registers), else a loop (variable 2).
        let per_z = |f: &dyn Fn(Idx) -> LowerResult<Stmt>| -> LowerResult<Vec<Stmt>> {
            match dv.clone().simplify() {
                Idx::Const(n) if n <= 128 => (0..n).map(|x| f(Idx::Const(x))).collect(),
                n => Ok(vec![for_(2, n, vec![f(z.clone())?])]),
            }
        };
        let (score, m_new, corr, p, inv) = (0, 1, 2, 3, 4);
        let mut key = vec![
            Stmt::Let { slot: score, value: scale_mask(&i, j.clone(), dot)? },
            Stmt::Let { slot: m_new, value: bin(BinOp::Max, st(0), Val::Scalar(score)) },
            Stmt::Let { slot: corr, value: exp(bin(BinOp::Sub, st(0), Val::Scalar(m_new))) },
            Stmt::Let { slot: p, value: exp(bin(BinOp::Sub, Val::Scalar(score), Val::Scalar(m_new))) },
            set(1, bin(BinOp::Add, bin(BinOp::Mul, st(1), Val::Scalar(corr)), Val::Scalar(p))),
        ];
        key.extend(per_z(&|z| {
            Ok(Stmt::Store {
                buf: acc,
                index: vec![z.clone()],
                value: bin(
                    BinOp::Add,
                    bin(BinOp::Mul, a(&z), Val::Scalar(corr)),
                    bin(BinOp::Mul, Val::Scalar(p), lw.value(v, &[batch.clone(), kv_head.clone(), j.clone(), z])?),
                ),
            })
        })?);
        key.push(set(0, Val::Scalar(m_new)));
        let mut body = vec![set(0, Val::Const(f32::MIN as f64)), set(1, Val::Const(0.0))];
        body.extend(per_z(&|z| Ok(Stmt::Store { buf: acc, index: vec![z], value: Val::Const(0.0) }))?);
        body.push(for_(1, kend, key));
        body.push(Stmt::Let {
            slot: inv,
            value: Val::Un(UnOp::Recip, Box::new(bin(BinOp::Max, st(1), Val::Const(f32::MIN_POSITIVE as f64)))),
        });
        body.extend(per_z(&|z| {
            Ok(Stmt::Store {
                buf: out_buf,
                index: vec![batch.clone(), head.clone(), i.clone(), z.clone()],
                value: bin(BinOp::Mul, a(&z), Val::Scalar(inv)),
            })
        })?);
        return Ok((locals, vec![for_par(Idx::Mul(b(heads), b(s)), body)]));
    }
    // A block of `rows` queries from `i0` (loop variables from 2; `ROW` stands for a tile's row).
    let block = |i0: Idx, rows: usize| -> LowerResult<Vec<Stmt>> {
        let row_i = |r: Idx| Idx::Add(b(i0.clone()), b(r));
        // Keys any row of the block sees: [0, kend).
        let kend = if causal { Idx::Min(b(t.clone()), b(row_i(Idx::Const(rows as i64)))) } else { t.clone() };
        let sc = |r: Idx, j: Idx| Val::Load { buf: scores, index: vec![r, j] };
        let mut stmts = vec![for_(
            2,
            Idx::Const(rows as i64),
            vec![for_(
                3,
                kend.clone(),
                vec![Stmt::Store { buf: scores, index: vec![Idx::Var(2), Idx::Var(3)], value: Val::Const(0.0) }],
            )],
        )];
        // scores = Q·Kᵀ, tiles of rows × `mma_cols` keys (loop variable 2; 3 runs over e).
        stmts.extend(tiles(lw.sched.mma_cols, kend.clone(), &|j0, valid| {
            Ok(Stmt::Mma(Box::new(Mma {
                rows,
                cols: lw.sched.mma_cols,
                lanes: lw.sched.lanes,
                valid,
                row: ROW,
                red: vec![(3, d.clone())],
                a: lw.value(q, &[batch.clone(), head.clone(), row_i(Idx::Var(ROW)), Idx::Var(3)])?,
                b: (kt, vec![Idx::Var(3), j0.clone()]),
                c: (scores, vec![Idx::Var(ROW), j0]),
                c_col: Idx::Const(1),
            })))
        })?);
        // Per row (loop variable 2): scale and mask, softmax over the keys it sees, zeros for
        // the keys only later rows see (loop variable 3 over keys).
        let r = Idx::Var(2);
        let i = row_i(r.clone());
        let seen = if causal { Idx::Add(b(i.clone()), b(Idx::Const(1))) } else { kend.clone() };
        let j = Idx::Var(3);
        let (max_var, sum_var) = (lw.fresh_var(), lw.fresh_var());
        let set = |value: Val| Stmt::Store { buf: scores, index: vec![r.clone(), j.clone()], value };
        let per_row = nonempty(vec![
            for_(3, seen.clone(), vec![set(scale_mask(&i, j.clone(), sc(r.clone(), j.clone()))?)]),
            Stmt::Let {
                slot: 0,
                // At least the lowest finite value: a row masked out entirely gives
                // exp(-inf) = 0 everywhere, not NaN, and (with the sum's floor) zeros.
                value: Val::Bin(
                    BinOp::Max,
                    Box::new(Val::Reduce {
                        op: RedOp::Max,
                        var: max_var,
                        extent: seen.clone(),
                        body: Box::new(sc(r.clone(), Idx::Var(max_var))),
                    }),
                    Box::new(Val::Const(f32::MIN as f64)),
                ),
            },
            for_(
                3,
                seen.clone(),
                vec![set(Val::Un(
                    UnOp::Exp,
                    Box::new(Val::Bin(BinOp::Sub, Box::new(sc(r.clone(), j.clone())), Box::new(Val::Scalar(0)))),
                ))],
            ),
            Stmt::Let {
                slot: 1,
                value: Val::Un(
                    UnOp::Recip,
                    Box::new(Val::Bin(
                        BinOp::Max,
                        Box::new(Val::Reduce {
                            op: RedOp::Sum,
                            var: sum_var,
                            extent: seen.clone(),
                            body: Box::new(sc(r.clone(), Idx::Var(sum_var))),
                        }),
                        Box::new(Val::Const(f32::MIN_POSITIVE as f64)),
                    )),
                ),
            },
            for_(
                3,
                seen.clone(),
                vec![set(Val::Bin(BinOp::Mul, Box::new(sc(r.clone(), j.clone())), Box::new(Val::Scalar(1))))],
            ),
            for_(
                3,
                Idx::Sub(b(kend.clone()), b(seen.clone())),
                vec![Stmt::Store {
                    buf: scores,
                    index: vec![r.clone(), Idx::Add(b(seen.clone()), b(j.clone()))],
                    value: Val::Const(0.0),
                }],
            ),
            for_(
                3,
                dv.clone(),
                vec![Stmt::Store {
                    buf: out_buf,
                    index: vec![batch.clone(), head.clone(), i.clone(), j.clone()],
                    value: Val::Const(0.0),
                }],
            ),
        ]);
        stmts.push(for_(2, Idx::Const(rows as i64), per_row));
        // out += P·V: tiles of rows × `mma_cols` of the head dim over the keys (loop
        // variable 3), or per row and key with the head dim innermost.
        match &v_rows {
            Some((vbuf, lead, base, key_var)) => stmts.extend(tiles(lw.sched.mma_cols, dv.clone(), &|z0, valid| {
                let mut index: Vec<Idx> = lead.iter().map(|x| x.subst(*key_var, &Idx::Var(3))).collect();
                index.push(Idx::Add(b(base.subst(*key_var, &Idx::Var(3))), b(z0.clone())).simplify());
                Ok(Stmt::Mma(Box::new(Mma {
                    rows,
                    cols: lw.sched.mma_cols,
                    lanes: lw.sched.lanes,
                    valid,
                    row: ROW,
                    red: vec![(3, kend.clone())],
                    a: sc(Idx::Var(ROW), Idx::Var(3)),
                    b: (*vbuf, index),
                    c: (out_buf, vec![batch.clone(), head.clone(), row_i(Idx::Var(ROW)), z0]),
                    c_col: Idx::Const(1),
                })))
            })?),
            None => {
                let (r, j, z) = (Idx::Var(2), Idx::Var(3), Idx::Var(4));
                let at = vec![batch.clone(), head.clone(), row_i(r.clone()), z.clone()];
                let acc = Stmt::Store {
                    buf: out_buf,
                    index: at.clone(),
                    value: Val::Bin(
                        BinOp::Add,
                        Box::new(Val::Load { buf: out_buf, index: at }),
                        Box::new(Val::Bin(
                            BinOp::Mul,
                            Box::new(sc(r, j.clone())),
                            Box::new(lw.value(v, &[batch.clone(), kv_head.clone(), j, z])?),
                        )),
                    ),
                };
                stmts.push(for_(
                    2,
                    Idx::Const(rows as i64),
                    vec![for_(3, kend.clone(), vec![for_(4, dv.clone(), vec![acc])])],
                ));
            }
        }
        Ok(stmts)
    };
    let qr = lw.sched.attention_rows as i64;
    let full = Idx::Div(b(s.clone()), b(Idx::Const(qr)));
    let rest = Idx::Mul(b(full.clone()), b(Idx::Const(qr)));
    let body = vec![for_par(
        heads,
        nonempty(vec![
            pack,
            for_(1, full, block(Idx::Mul(b(Idx::Var(1)), b(Idx::Const(qr))), lw.sched.attention_rows)?),
            for_(1, Idx::Rem(b(s), b(Idx::Const(qr))), block(Idx::Add(b(rest), b(Idx::Var(1))), 1)?),
        ]),
    )];
    Ok((locals, body))
}

/// The loop variable standing for a register tile's row (never a loop of its own).
const ROW: usize = 63;

fn for_(var: usize, extent: Idx, body: Vec<Stmt>) -> Stmt {
    Stmt::For { var, extent: extent.simplify(), parallel: false, body }
}

fn for_par(extent: Idx, body: Vec<Stmt>) -> Stmt {
    Stmt::For { var: 0, extent: extent.simplify(), parallel: true, body }
}

/// Register tiles over `0..n` columns in steps of `cols` (loop variable 2): full
/// tiles, then a masked last one; `tile(first column, valid columns)`.
fn tiles(cols: usize, n: Idx, tile: &dyn Fn(Idx, Idx) -> LowerResult<Stmt>) -> LowerResult<Vec<Stmt>> {
    let cols = Idx::Const(cols as i64);
    let full = Idx::Div(b(n.clone()), b(cols.clone()));
    let done = Idx::Mul(b(full.clone()), b(cols.clone()));
    Ok(nonempty(vec![
        for_(2, full, vec![tile(Idx::Mul(b(Idx::Var(2)), b(cols.clone())), cols.clone())?]),
        for_(
            2,
            Idx::Min(b(Idx::Const(1)), b(Idx::Rem(b(n.clone()), b(cols)))),
            vec![tile(done.clone().simplify(), Idx::Sub(b(n), b(done)).simplify())?],
        ),
    ]))
}

/// `stmts` without the loops that run zero times.
fn nonempty(stmts: Vec<Stmt>) -> Vec<Stmt> {
    stmts.into_iter().filter(|s| !matches!(s, Stmt::For { extent: Idx::Const(0), .. })).collect()
}
