//! Matrix streams' data movement and arithmetic: multi-dim DMA patterns (gather, scatter),
//! C's tile, and the product on the vector unit where there is no matrix unit.

use super::super::{Gen, Op, R};
use super::{pin, MCtx, Plan};
use crate::isa::{AluOp, Instr, VBinOp};
use kiln_ir::kernel::Idx;

impl Gen<'_> {
    /// C's global-memory address and dims (rows, then valid columns).
    pub(super) fn c_pattern(&mut self, p: &Plan, valid: Op) -> R<(Op, Vec<(Op, i64)>)> {
        let src = self.sidx(&p.c.base)?;
        let src = pin(self.alu_ops(AluOp::Add, src, Op::K(self.gm[p.c.buf] as i64))?);
        Ok((src, vec![(Op::K(p.m.rows as i64), p.c.dims[0].1), (valid, p.c.dims[1].1)]))
    }

    /// `C += sum` for a local C (in V's level).
    pub(super) fn local_c_add(&mut self, p: &Plan, sum_at: Op, valid: Op) -> R<()> {
        let base = self.sidx(&p.c.base)?;
        let base = pin(self.alu_ops(AluOp::Add, base, Op::K(self.locals[p.c.buf - self.nparams()] as i64))?);
        let (rs, cs) = (p.c.dims[0].1, p.c.dims[1].1);
        for r in 0..p.m.rows as i64 {
            let m = self.mark();
            let row = self.alu_ops(AluOp::Add, base, Op::K(r * rs))?;
            let row = pin(row);
            let off = self.alu_ops(AluOp::Mul, valid, Op::K(r))?;
            let src = pin(self.alu_ops(AluOp::Add, off, sum_at)?);
            if cs == 1 {
                self.vbin(VBinOp::Add, row, row, src, valid, false, false)?;
            } else {
                let j = usize::MAX - 48;
                self.loop_op(j, valid, p.m.cols as i64, |g| {
                    let jr = Op::R(g.vars[&j]);
                    let d = g.alu_ops(AluOp::Mul, jr, Op::K(cs))?;
                    let d = g.alu_ops(AluOp::Add, d, row)?;
                    let s = g.alu_ops(AluOp::Add, jr, src)?;
                    g.vbin(VBinOp::Add, d, d, s, Op::K(1), false, false)
                })?;
            }
            self.reset(m);
        }
        Ok(())
    }

    /// `acc[rows × valid] = A·B` on the vector unit: one multiply-accumulate per row and
    /// reduction point.
    pub(super) fn vector_product(
        &mut self,
        p: &Plan,
        c: &MCtx,
        a: Op,
        b: Op,
        acc: Op,
        kk: Op,
        valid: Op,
        accumulate: bool,
    ) -> R<()> {
        let rows = p.m.rows as i64;
        let n = pin(self.alu_ops(AluOp::Mul, valid, Op::K(rows))?);
        if !accumulate {
            let (d, nr) = (self.in_reg(acc)?, self.in_reg(n)?);
            self.emit(Instr::VDup { d, n: nr, value: 0.0 });
        }
        // B in place (a local): each row of B at b + k·stride; else dense [K][valid].
        let b_in_place = c.b_ids.is_empty();
        let b_row_stride = if b_in_place { None } else { Some(valid) };
        let a_in_place = c.a_ids.is_empty();
        let k = usize::MAX - 40;
        let bpat = p.b.clone();
        let apat = p.a.clone();
        let red: Vec<(usize, Idx)> = p.m.red.clone();
        self.loop_op(k, kk, self.upper_k(&red), |g| {
            let kr = Op::R(g.vars[&k]);
            let brow = match b_row_stride {
                Some(s) => {
                    let o = g.alu_ops(AluOp::Mul, kr, s)?;
                    pin(g.alu_ops(AluOp::Add, o, b)?)
                }
                None => {
                    // The flat offset of point k: delinearize over the reduction extents.
                    let strides: Vec<i64> = bpat.dims[..red.len()].iter().map(|d| d.1).collect();
                    let off = g.point_offset(&red, &strides, kr)?;
                    pin(g.alu_ops(AluOp::Add, off, b)?)
                }
            };
            for r in 0..rows {
                let m = g.mark();
                let aat = if a_in_place {
                    let strides: Vec<i64> = apat.dims[1..].iter().map(|d| d.1).collect();
                    let off = g.point_offset(&red, &strides, kr)?;
                    let o = g.alu_ops(AluOp::Add, off, Op::K(r * apat.dims[0].1))?;
                    g.alu_ops(AluOp::Add, o, a)?
                } else {
                    let o = g.alu_ops(AluOp::Mul, kk, Op::K(r))?;
                    let o = g.alu_ops(AluOp::Add, o, kr)?;
                    g.alu_ops(AluOp::Add, o, a)?
                };
                let aat = pin(aat);
                let row = g.alu_ops(AluOp::Mul, valid, Op::K(r))?;
                let row = pin(g.alu_ops(AluOp::Add, row, acc)?);
                g.vbin(VBinOp::Mla, row, aat, brow, valid, true, false)?;
                g.reset(m);
            }
            Ok(())
        })
    }

    pub(super) fn upper_k(&self, red: &[(usize, Idx)]) -> i64 {
        red.iter().fold(1i64, |a, (_, e)| a.saturating_mul(self.upper(e).max(1)))
    }

    /// The source offset of reduction point `k` (linear, row-major over the reduction
    /// extents `red`) along a pattern whose reduction dims have `strides`.
    pub(super) fn point_offset(&mut self, red: &[(usize, Idx)], strides: &[i64], k: Op) -> R<Op> {
        let mut rest = k;
        let mut off = Op::K(0);
        for (i, ((_, e), s)) in red.iter().zip(strides).enumerate().rev() {
            let idx = if i == 0 {
                rest
            } else {
                let n = self.sidx(e)?;
                let n = pin(n);
                let q = pin(self.alu_ops(AluOp::Rem, rest, n)?);
                rest = pin(self.alu_ops(AluOp::Div, rest, n)?);
                q
            };
            let t = self.alu_ops(AluOp::Mul, idx, Op::K(*s))?;
            off = pin(self.alu_ops(AluOp::Add, off, t)?);
        }
        Ok(off)
    }

    /// One contiguous copy of `n` elements.
    pub(super) fn copy_run(&mut self, from: u8, to: u8, src: Op, dst: Op, n: Op) -> R<()> {
        let (s, d, n, one) = (self.in_reg(src)?, self.in_reg(dst)?, self.in_reg(n)?, self.konst(1)?);
        self.emit(Instr::Copy {
            dst_level: to,
            src_level: from,
            dst: d,
            src: s,
            n: one,
            len: n,
            dst_stride: n,
            src_stride: n,
        });
        Ok(())
    }

    /// Copies a multi-dim pattern (`(count, source stride)` per dim, outermost first) from
    /// `src` in level `from` to a dense array at `dst` in level `to`.
    pub(super) fn gather(&mut self, from: u8, to: u8, src: Op, dst: Op, dims: &[(Op, i64)]) -> R<()> {
        self.pattern_copy(from, to, src, dst, dims, true)
    }

    /// The inverse of [`Gen::gather`] from V's level to global memory.
    pub(super) fn scatter(&mut self, src: Op, dst: Op, dims: &[(Op, i64)]) -> R<()> {
        let v = self.vl;
        self.pattern_copy(v, 0, src, dst, dims, false)
    }

    /// Moves a pattern: `gather` reads the pattern and writes dense; otherwise reads dense and
    /// writes the pattern.
    pub(super) fn pattern_copy(
        &mut self,
        from: u8,
        to: u8,
        src: Op,
        dst: Op,
        dims: &[(Op, i64)],
        gather: bool,
    ) -> R<()> {
        // Dense strides of each dim.
        let mut dense: Vec<Op> = vec![Op::K(1); dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            let d = self.alu_ops(AluOp::Mul, dense[i + 1], dims[i + 1].0)?;
            dense[i] = pin(d);
        }
        // (count, pattern stride, dense stride), dropping dims of one element.
        let mut ds: Vec<(Op, i64, Op)> =
            dims.iter().zip(&dense).map(|(&(n, s), &d)| (n, s, d)).filter(|(n, _, _)| *n != Op::K(1)).collect();
        // Merge a dim into the next inner one when both walk contiguously.
        let mut i = 0;
        while i + 1 < ds.len() {
            let (n1, s1, d1) = ds[i];
            let (n2, s2, d2) = ds[i + 1];
            if let (Op::K(n2k), Op::K(d1k), Op::K(d2k)) = (n2, d1, d2) {
                if s1 == n2k * s2 && d1k == n2k * d2k {
                    let n = self.alu_ops(AluOp::Mul, n1, n2)?;
                    ds[i] = (pin(n), s2, d2);
                    ds.remove(i + 1);
                    continue;
                }
            }
            i += 1;
        }
        if ds.is_empty() {
            ds.push((Op::K(1), 1, Op::K(1)));
        }
        // The innermost dim is the burst when contiguous on both sides, else bursts of one.
        // The bursts walk the dim with the most elements (fewest copies); loops walk the rest.
        let last = ds.len() - 1;
        let (len, bdim) = if ds[last].1 == 1 && ds[last].2 == Op::K(1) {
            let l = ds[last].0;
            ds.pop();
            let best = (0..ds.len()).max_by_key(|&i| match ds[i].0 {
                Op::K(c) => c,
                _ => 1,
            });
            (l, best.map(|i| ds.remove(i)))
        } else {
            (Op::K(1), ds.pop())
        };
        let (n, ps, dsr) = bdim.unwrap_or((Op::K(1), 1, Op::K(1)));
        let loops = ds;
        self.pattern_loops(from, to, src, dst, &loops, (n, ps, dsr, len), gather)
    }

    pub(super) fn pattern_loops(
        &mut self,
        from: u8,
        to: u8,
        src: Op,
        dst: Op,
        loops: &[(Op, i64, Op)],
        burst: (Op, i64, Op, Op),
        gather: bool,
    ) -> R<()> {
        let Some(&(count, ps, dsr)) = loops.first() else {
            let (n, bs, bd, len) = burst;
            let (src_stride, dst_stride) = if gather { (Op::K(bs), bd) } else { (bd, Op::K(bs)) };
            let (s, d, nr, lr, ss, dd) = (
                self.in_reg(src)?,
                self.in_reg(dst)?,
                self.in_reg(n)?,
                self.in_reg(len)?,
                self.in_reg(src_stride)?,
                self.in_reg(dst_stride)?,
            );
            self.emit(Instr::Copy {
                dst_level: to,
                src_level: from,
                dst: d,
                src: s,
                n: nr,
                len: lr,
                dst_stride: dd,
                src_stride: ss,
            });
            return Ok(());
        };
        let var = usize::MAX - 60 - loops.len();
        let max = match count {
            Op::K(c) => c,
            _ => i64::MAX / 4,
        };
        let rest = loops[1..].to_vec();
        self.loop_op(var, count, max, |g| {
            let i = Op::R(g.vars[&var]);
            let (sstep, dstep) = if gather { (Op::K(ps), dsr) } else { (dsr, Op::K(ps)) };
            let so = g.alu_ops(AluOp::Mul, i, sstep)?;
            let s = pin(g.alu_ops(AluOp::Add, so, src)?);
            let dof = g.alu_ops(AluOp::Mul, i, dstep)?;
            let d = pin(g.alu_ops(AluOp::Add, dof, dst)?);
            g.pattern_loops(from, to, s, d, &rest, burst, gather)
        })
    }
}
