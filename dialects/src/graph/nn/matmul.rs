//! Matrix products: MatMul, Gemm, MatMulInteger, QLinearMatMul.

use super::gemm::{gemm, MatRef};
use super::quant::{round_in, saturate_to, zero_point_dtype};
use super::{uses_f32, Real};
use crate::bail;
use crate::graph::{checked_numel, opt, req, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::{broadcast_index, Tensor};
use crate::types::{broadcast_dims, broadcast_shapes, DType, Dim, TensorType};

pub fn register(r: &mut Registry) {
    r.add_all(&[&MatMul, &Gemm, &MatMulInteger, &QLinearMatMul]);
}

/// The layout of a batched matrix product after 1-D promotion and batch broadcasting.
struct Plan {
    m: usize,
    k: usize,
    n: usize,
    out_shape: Vec<usize>,
    /// For each output batch, the offsets of its A and B matrices.
    batches: Vec<(usize, usize)>,
}

fn plan(a: &[usize], b: &[usize]) -> OpResult<Plan> {
    if a.is_empty() || b.is_empty() {
        bail!("MatMul inputs must have rank >= 1, found shapes {a:?} and {b:?}");
    }
    let a2: Vec<usize> = if a.len() == 1 { vec![1, a[0]] } else { a.to_vec() };
    let b2: Vec<usize> = if b.len() == 1 { vec![b[0], 1] } else { b.to_vec() };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        bail!("MatMul inner dims differ: shapes {a:?} and {b:?}");
    }
    let (ab, bb) = (&a2[..a2.len() - 2], &b2[..b2.len() - 2]);
    let Some(batch) = broadcast_shapes(ab, bb) else {
        bail!("MatMul batch dims {ab:?} and {bb:?} cannot be broadcast together");
    };
    let mut out_shape = batch.clone();
    if a.len() > 1 {
        out_shape.push(m);
    }
    if b.len() > 1 {
        out_shape.push(n);
    }
    checked_numel(&out_shape)?;
    let ia = broadcast_index(ab, &batch);
    let ib = broadcast_index(bb, &batch);
    let batches = ia.into_iter().zip(ib).map(|(i, j)| (i * m * k, j * k * n)).collect();
    Ok(Plan { m, k, n, out_shape, batches })
}

/// The batched product of two float views (`values` of the same length as the shapes say).
fn matmul_real<T: Real>(p: &Plan, a: &[T], b: &[T]) -> Vec<T> {
    let mn = p.m * p.n;
    let mut out = vec![T::ZERO; p.batches.len() * mn];
    for (bi, &(oa, ob)) in p.batches.iter().enumerate() {
        let c = &mut out[bi * mn..(bi + 1) * mn];
        gemm(p.m, p.n, p.k, MatRef::rows(a, oa, p.k), MatRef::rows(b, ob, p.n), c, p.n);
    }
    out
}

/// Wrapping integer batched product.
fn matmul_i64(p: &Plan, a: &[i64], b: &[i64]) -> Vec<i64> {
    let mn = p.m * p.n;
    let mut out = vec![0i64; p.batches.len() * mn];
    for (bi, &(oa, ob)) in p.batches.iter().enumerate() {
        for i in 0..p.m {
            let row = &mut out[bi * mn + i * p.n..bi * mn + (i + 1) * p.n];
            for q in 0..p.k {
                let x = a[oa + i * p.k + q];
                let brow = &b[ob + q * p.n..ob + (q + 1) * p.n];
                for (r, &y) in row.iter_mut().zip(brow) {
                    *r = r.wrapping_add(x.wrapping_mul(y));
                }
            }
        }
    }
    out
}

/// Shape rule of a batched matrix product, on symbolic dims.
fn infer_matmul(cx: &mut InferCx, a: &TensorType, b: &TensorType, dtype: DType) -> OpResult<TensorType> {
    let (Some(sa), Some(sb)) = (&a.shape, &b.shape) else { return Ok(TensorType::unranked(dtype)) };
    if sa.is_empty() || sb.is_empty() {
        bail!("MatMul inputs must have rank >= 1, found {a} and {b}");
    }
    let a2: Vec<Dim> = if sa.len() == 1 { vec![Dim::Known(1), sa[0].clone()] } else { sa.clone() };
    let b2: Vec<Dim> = if sb.len() == 1 { vec![sb[0].clone(), Dim::Known(1)] } else { sb.clone() };
    let (ka, kb) = (&a2[a2.len() - 1], &b2[b2.len() - 2]);
    if let (Some(x), Some(y)) = (ka.known(), kb.known()) {
        if x != y {
            bail!("MatMul inner dims differ: {a} and {b}");
        }
    }
    let mut fresh = Vec::new();
    let Some(mut out) = broadcast_dims(&a2[..a2.len() - 2], &b2[..b2.len() - 2], &mut || {
        fresh.push(());
        Dim::sym("?")
    }) else {
        bail!("MatMul batch dims of {a} and {b} cannot be broadcast together");
    };
    for d in out.iter_mut() {
        if *d == Dim::sym("?") {
            *d = cx.fresh_dim();
        }
    }
    if sa.len() > 1 {
        out.push(a2[a2.len() - 2].clone());
    }
    if sb.len() > 1 {
        out.push(b2[b2.len() - 1].clone());
    }
    Ok(TensorType::new(dtype, out))
}

/// `Y = A · B` with numpy batch broadcasting; a 1-D operand is promoted to a matrix and its dim dropped.
struct MatMul;

impl OpDef for MatMul {
    fn name(&self) -> &'static str {
        "MatMul"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (a, b) = (cx.input(0)?, cx.input(1)?);
        if a.dtype != b.dtype || !a.dtype.is_numeric() {
            bail!("MatMul needs two numeric inputs of one type, found {} and {}", a.dtype, b.dtype);
        }
        Ok(vec![infer_matmul(cx, a, b, a.dtype)?])
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
        if a.dtype() != b.dtype() || !a.dtype().is_numeric() {
            bail!("MatMul needs two numeric inputs of one type, found {} and {}", a.dtype(), b.dtype());
        }
        let p = plan(&a.shape, &b.shape)?;
        let t = a.dtype();
        let y = if uses_f32(t) {
            f32::tensor(t, &p.out_shape, matmul_real(&p, &f32::values(a), &f32::values(b)))
        } else if t == DType::F64 {
            f64::tensor(t, &p.out_shape, matmul_real(&p, &f64::values(a), &f64::values(b)))
        } else {
            Tensor::from_i64_as(t, &p.out_shape, matmul_i64(&p, &a.to_i64(), &b.to_i64()))
        };
        Ok(vec![y])
    }
}

/// `Y = alpha · op(A) · op(B) + beta · C`, `op` transposing when `transA`/`transB`; C broadcasts to `[M, N]`.
struct Gemm;

fn gemm_dims(a: &[Dim], b: &[Dim], ta: bool, tb: bool) -> OpResult<(Dim, Dim)> {
    if a.len() != 2 || b.len() != 2 {
        bail!("Gemm inputs must be matrices, found ranks {} and {}", a.len(), b.len());
    }
    let (m, ka) = if ta { (&a[1], &a[0]) } else { (&a[0], &a[1]) };
    let (kb, n) = if tb { (&b[1], &b[0]) } else { (&b[0], &b[1]) };
    if let (Some(x), Some(y)) = (ka.known(), kb.known()) {
        if x != y {
            bail!("Gemm inner dims differ: {x} and {y}");
        }
    }
    Ok((m.clone(), n.clone()))
}

impl OpDef for Gemm {
    fn name(&self) -> &'static str {
        "Gemm"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (a, b) = (cx.input(0)?, cx.input(1)?);
        if a.dtype != b.dtype || !a.dtype.is_numeric() {
            bail!("Gemm needs two numeric inputs of one type, found {} and {}", a.dtype, b.dtype);
        }
        let (ta, tb) = (cx.attrs.int("transA", 0)? != 0, cx.attrs.int("transB", 0)? != 0);
        let (Some(sa), Some(sb)) = (&a.shape, &b.shape) else { return Ok(vec![TensorType::unranked(a.dtype)]) };
        let (m, n) = gemm_dims(sa, sb, ta, tb)?;
        Ok(vec![TensorType::new(a.dtype, vec![m, n])])
    }
    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (a, b, c) = (req(inputs, 0)?, req(inputs, 1)?, opt(inputs, 2));
        let t = a.dtype();
        if b.dtype() != t || !t.is_numeric() || c.is_some_and(|c| c.dtype() != t) {
            bail!("Gemm inputs must be numeric and of one type, found {} and {}", t, b.dtype());
        }
        let (ta, tb) = (cx.attrs.int("transA", 0)? != 0, cx.attrs.int("transB", 0)? != 0);
        let (alpha, beta) = (cx.attrs.float("alpha", 1.0)? as f64, cx.attrs.float("beta", 1.0)? as f64);
        let dims = |s: &[usize]| s.iter().map(|&d| Dim::Known(d as u64)).collect::<Vec<_>>();
        let (m, n) = gemm_dims(&dims(&a.shape), &dims(&b.shape), ta, tb)?;
        let (m, n) = (m.known().unwrap_or(0) as usize, n.known().unwrap_or(0) as usize);
        let k = if ta { a.shape[0] } else { a.shape[1] };
        checked_numel(&[m, n])?;
        let cidx = match c {
            Some(c) => {
                if broadcast_shapes(&c.shape, &[m, n]).as_deref() != Some(&[m, n][..]) || c.rank() > 2 {
                    bail!("Gemm C of shape {:?} does not broadcast to [{m}, {n}]", c.shape);
                }
                Some(broadcast_index(&c.shape, &[m, n]))
            }
            None => None,
        };
        fn run<T: Real>(
            a: &Tensor,
            b: &Tensor,
            c: Option<(&Tensor, Vec<usize>)>,
            (m, n, k, ta, tb): (usize, usize, usize, bool, bool),
            (alpha, beta): (f64, f64),
        ) -> Vec<T> {
            let (av, bv) = (T::values(a), T::values(b));
            let mut am = MatRef::rows(&av, 0, a.shape[1]);
            if ta {
                am = am.t();
            }
            let mut bm = MatRef::rows(&bv, 0, b.shape[1]);
            if tb {
                bm = bm.t();
            }
            let mut y = vec![T::ZERO; m * n];
            gemm(m, n, k, am, bm, &mut y, n);
            let (alpha, beta) = (T::of(alpha), T::of(beta));
            if alpha != T::ONE {
                y.iter_mut().for_each(|v| *v = *v * alpha);
            }
            if let Some((c, idx)) = c {
                let cv = T::values(c);
                for (v, &i) in y.iter_mut().zip(&idx) {
                    *v += beta * cv[i];
                }
            }
            y
        }
        let c = c.zip(cidx);
        let shape = [m, n];
        let y = if uses_f32(t) {
            f32::tensor(t, &shape, run::<f32>(a, b, c, (m, n, k, ta, tb), (alpha, beta)))
        } else {
            let v = run::<f64>(a, b, c, (m, n, k, ta, tb), (alpha, beta));
            if t.is_int() {
                Tensor::from_i64_as(t, &shape, v.into_iter().map(|x| x as i64).collect())
            } else {
                Tensor::from_f64(t, &shape, v)
            }
        };
        Ok(vec![y])
    }
}

/// Subtracts a zero point (scalar, or one per row `axis == 0` / column `axis == 1` of each matrix).
fn sub_zero_point(v: &mut [f64], shape: &[usize], zp: Option<&Tensor>, per_col: bool) -> OpResult<()> {
    let Some(zp) = zp else { return Ok(()) };
    let z = zp.to_f64();
    if z.len() == 1 {
        v.iter_mut().for_each(|x| *x -= z[0]);
        return Ok(());
    }
    let r = shape.len();
    let (rows, cols) = match r {
        0 => (1, 1),
        1 => {
            if per_col {
                (shape[0], 1)
            } else {
                (1, shape[0])
            }
        }
        _ => (shape[r - 2], shape[r - 1]),
    };
    let want = if per_col { cols } else { rows };
    if z.len() != want {
        bail!("zero point has {} elements, expected 1 or {want}", z.len());
    }
    for (i, x) in v.iter_mut().enumerate() {
        let idx = if per_col { i % cols } else { (i / cols) % rows };
        *x -= z[idx];
    }
    Ok(())
}

fn expect_int8(t: &Tensor, what: &str) -> OpResult<()> {
    if !matches!(t.dtype(), DType::I8 | DType::U8) {
        bail!("{what} must be int8 or uint8, found {}", t.dtype());
    }
    Ok(())
}

/// `Y = (A - a_zero_point) · (B - b_zero_point)` on 8-bit integers, accumulated exactly in int32.
struct MatMulInteger;

impl OpDef for MatMulInteger {
    fn name(&self) -> &'static str {
        "MatMulInteger"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (a, b) = (cx.input(0)?, cx.input(1)?);
        Ok(vec![infer_matmul(cx, a, b, DType::I32)?])
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
        expect_int8(a, "A")?;
        expect_int8(b, "B")?;
        let p = plan(&a.shape, &b.shape)?;
        let (mut av, mut bv) = (a.to_f64(), b.to_f64());
        sub_zero_point(&mut av, &a.shape, opt(inputs, 2), false)?;
        sub_zero_point(&mut bv, &b.shape, opt(inputs, 3), true)?;
        let y = matmul_real(&p, &av, &bv);
        Ok(vec![Tensor::from_f64(DType::I32, &p.out_shape, y)])
    }
}

/// Quantized MatMul: dequantizes A and B, multiplies, and requantizes with `y_scale`/`y_zero_point`.
struct QLinearMatMul;

impl OpDef for QLinearMatMul {
    fn name(&self) -> &'static str {
        "QLinearMatMul"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (a, b) = (cx.input(0)?, cx.input(3)?);
        let dtype = zero_point_dtype(cx.opt_input(7).map(|t| t.dtype), None, a.dtype)?;
        Ok(vec![infer_matmul(cx, a, b, dtype)?])
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (a, a_scale, b, b_scale, y_scale) =
            (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 3)?, req(inputs, 4)?, req(inputs, 6)?);
        expect_int8(a, "A")?;
        expect_int8(b, "B")?;
        let yzp = opt(inputs, 7);
        let out_t = yzp.map_or(a.dtype(), |z| z.dtype());
        let p = plan(&a.shape, &b.shape)?;
        let (mut av, mut bv) = (a.to_f64(), b.to_f64());
        sub_zero_point(&mut av, &a.shape, opt(inputs, 2), false)?;
        sub_zero_point(&mut bv, &b.shape, opt(inputs, 5), true)?;
        let acc = matmul_real(&p, &av, &bv);
        let (Some(sa), Some(sb), Some(sy)) =
            (a_scale.scalar_value_f64(), b_scale.scalar_value_f64(), y_scale.scalar_value_f64())
        else {
            bail!("QLinearMatMul supports per-tensor (single-element) scales only");
        };
        // The scale factor is computed in the scales' own precision, as ONNX does.
        let st = a_scale.dtype();
        let factor = round_in(st, round_in(st, sa * sb) / sy);
        let zy = yzp.and_then(|z| z.scalar_value_f64()).unwrap_or(0.0);
        let v = acc.into_iter().map(|x| (x * factor + zy).round_ties_even()).collect();
        Ok(vec![saturate_to(out_t, &p.out_shape, v)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_promotes_vectors_and_broadcasts_batches() {
        let p = plan(&[2, 1, 3, 4], &[5, 4, 6]).unwrap();
        assert_eq!(p.out_shape, vec![2, 5, 3, 6]);
        assert_eq!(plan(&[4], &[4]).unwrap().out_shape, Vec::<usize>::new());
        assert_eq!(plan(&[3, 4], &[4]).unwrap().out_shape, vec![3]);
        assert!(plan(&[3, 4], &[5, 6]).is_err());
    }

    #[test]
    fn matmul_1d_dot_product() {
        let a = Tensor::from_f32(&[3], vec![1.0, 2.0, 3.0]);
        let p = plan(&a.shape, &a.shape).unwrap();
        let y = matmul_real(&p, &f32::values(&a), &f32::values(&a));
        assert_eq!(y, vec![14.0]);
    }
}
