//! `Det`: determinants of square matrices.

use crate::bail;
use crate::graph::{req, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::TensorType;

pub fn register(r: &mut Registry) {
    r.add(&Det);
}

/// `Det`: the determinant of each `[M, M]` matrix in the trailing two axes of `X` (shape
/// `[*, M, M]` → `[*]`), by LU decomposition with partial pivoting in f64.
struct Det;

impl OpDef for Det {
    fn name(&self) -> &'static str {
        "Det"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        if !x.dtype.is_float() {
            bail!("Det expects a float tensor, found {}", x.dtype);
        }
        let Some(s) = &x.shape else {
            return Ok(vec![TensorType::unranked(x.dtype)]);
        };
        if s.len() < 2 {
            bail!("Det expects a tensor of rank >= 2, found rank {}", s.len());
        }
        if let (Some(a), Some(b)) = (s[s.len() - 2].known(), s[s.len() - 1].known()) {
            if a != b {
                bail!("Det expects square matrices, found {a}x{b}");
            }
        }
        Ok(vec![TensorType::new(x.dtype, s[..s.len() - 2].to_vec())])
    }

    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        if !x.dtype().is_float() {
            bail!("Det expects a float tensor, found {}", x.dtype());
        }
        let r = x.rank();
        if r < 2 || x.shape[r - 1] != x.shape[r - 2] {
            bail!("Det expects shape [*, M, M], found {:?}", x.shape);
        }
        let m = x.shape[r - 1];
        let batch: usize = x.shape[..r - 2].iter().product();
        let v = x.to_f64();
        let mut a = vec![0.0f64; m * m];
        let dets = (0..batch)
            .map(|b| {
                a.copy_from_slice(&v[b * m * m..(b + 1) * m * m]);
                lu_det(&mut a, m)
            })
            .collect();
        Ok(vec![Tensor::from_f64(x.dtype(), &x.shape[..r - 2], dets)])
    }
}

/// Determinant of the row-major `m`x`m` matrix `a` (destroyed).
fn lu_det(a: &mut [f64], m: usize) -> f64 {
    let mut det = 1.0;
    for k in 0..m {
        let p = (k..m).max_by(|&i, &j| a[i * m + k].abs().total_cmp(&a[j * m + k].abs())).unwrap_or(k);
        let pivot = a[p * m + k];
        if pivot == 0.0 {
            return 0.0;
        }
        if p != k {
            for j in 0..m {
                a.swap(k * m + j, p * m + j);
            }
            det = -det;
        }
        det *= pivot;
        for i in k + 1..m {
            let f = a[i * m + k] / pivot;
            if f != 0.0 {
                for j in k + 1..m {
                    a[i * m + j] -= f * a[k * m + j];
                }
            }
        }
    }
    det
}

#[cfg(test)]
mod tests {
    use super::super::tests::eval_op;
    use crate::tensor::Tensor;

    #[test]
    fn det_of_batch() {
        let x = Tensor::from_f32(&[2, 2, 2], vec![1.0, 2.0, 3.0, 4.0, 0.0, 1.0, 1.0, 0.0]);
        let y = eval_op("Det", &[], &[Some(&x)], 1, 11).unwrap();
        assert_eq!(y[0].shape, vec![2]);
        let d = y[0].to_f64();
        assert!((d[0] + 2.0).abs() < 1e-6 && (d[1] + 1.0).abs() < 1e-6);
    }
}
