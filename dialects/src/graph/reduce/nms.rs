//! `NonMaxSuppression`: greedy box selection by score with IoU suppression.

use super::{float_scalar, int_scalar};
use crate::bail;
use crate::graph::{opt, req, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::{DType, Dim, TensorType};
use std::ops::{Add, Div, Mul, Sub};

pub fn register(r: &mut Registry) {
    r.add(&NonMaxSuppression);
}

/// `NonMaxSuppression`: for every batch and class, repeatedly picks the highest-scoring box
/// (ties: lowest index) above `score_threshold` that overlaps no already-picked box by more than
/// `iou_threshold`, up to `max_output_boxes_per_class`; outputs `[batch, class, box]` int64 rows.
/// Boxes are `[y1, x1, y2, x2]` (any corner order) or, with `center_point_box=1`,
/// `[x_center, y_center, width, height]`.
struct NonMaxSuppression;

impl OpDef for NonMaxSuppression {
    fn name(&self) -> &'static str {
        "NonMaxSuppression"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        for (i, what) in [(0, "boxes"), (1, "scores")] {
            let t = cx.input(i)?;
            if !t.dtype.is_float() {
                bail!("{what} must be a float tensor, found {}", t.dtype);
            }
        }
        let n = cx.fresh_dim();
        Ok(vec![TensorType::new(DType::I64, vec![n, Dim::Known(3)])])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (boxes, scores) = (req(inputs, 0)?, req(inputs, 1)?);
        if boxes.rank() != 3 || boxes.shape[2] != 4 {
            bail!("boxes must have shape [batch, boxes, 4], found {:?}", boxes.shape);
        }
        if scores.rank() != 3 || scores.shape[0] != boxes.shape[0] || scores.shape[2] != boxes.shape[1] {
            bail!(
                "scores must have shape [batch, classes, boxes] = [{}, C, {}], found {:?}",
                boxes.shape[0],
                boxes.shape[1],
                scores.shape
            );
        }
        if !boxes.dtype().is_float() || !scores.dtype().is_float() {
            bail!("boxes and scores must be float tensors, found {} and {}", boxes.dtype(), scores.dtype());
        }
        let max_out = match opt(inputs, 2) {
            Some(t) if !t.is_empty() => int_scalar(t, "max_output_boxes_per_class")?.max(0) as u64,
            _ => 0,
        };
        let iou_th = match opt(inputs, 3) {
            Some(t) if !t.is_empty() => float_scalar(t, "iou_threshold")?,
            _ => 0.0,
        };
        let score_th = match opt(inputs, 4) {
            Some(t) if !t.is_empty() => Some(float_scalar(t, "score_threshold")?),
            _ => None,
        };
        let center = cx.attrs.int("center_point_box", 0)?;
        if center != 0 && center != 1 {
            bail!("center_point_box must be 0 or 1, found {center}");
        }
        let (nb, nc, n) = (scores.shape[0], scores.shape[1], scores.shape[2]);
        let sv = scores.to_f64();
        let mut out: Vec<i64> = Vec::new();
        // Computes IoU in the boxes' own precision (f32 for f32 inputs, like the reference).
        let bx32: Option<Vec<f32>> =
            (boxes.dtype() != DType::F64).then(|| boxes.to_f64().iter().map(|&v| v as f32).collect());
        let bx64: Option<Vec<f64>> = (boxes.dtype() == DType::F64).then(|| boxes.to_f64());
        let iou_th32 = iou_th as f32;
        let mut cand: Vec<usize> = Vec::with_capacity(n);
        let mut picked: Vec<usize> = Vec::new();
        for b in 0..nb {
            for c in 0..nc {
                let s = &sv[(b * nc + c) * n..(b * nc + c + 1) * n];
                cand.clear();
                cand.extend((0..n).filter(|&i| score_th.is_none_or(|t| s[i] > t)));
                cand.sort_by(|&i, &j| s[j].partial_cmp(&s[i]).unwrap_or(std::cmp::Ordering::Equal).then(i.cmp(&j)));
                picked.clear();
                for &i in &cand {
                    if picked.len() as u64 >= max_out {
                        break;
                    }
                    let suppressed = picked.iter().any(|&j| match (&bx32, &bx64) {
                        (Some(bx), _) => {
                            let bb = &bx[b * n * 4..(b + 1) * n * 4];
                            overlaps(&bb[i * 4..i * 4 + 4], &bb[j * 4..j * 4 + 4], center == 1, iou_th32, 0.0, 2.0)
                        }
                        (_, Some(bx)) => {
                            let bb = &bx[b * n * 4..(b + 1) * n * 4];
                            overlaps(&bb[i * 4..i * 4 + 4], &bb[j * 4..j * 4 + 4], center == 1, iou_th, 0.0, 2.0)
                        }
                        _ => false,
                    });
                    if !suppressed {
                        picked.push(i);
                        out.extend([b as i64, c as i64, i as i64]);
                    }
                }
            }
        }
        Ok(vec![Tensor::from_i64(&[out.len() / 3, 3], out)])
    }
}

/// Whether two boxes overlap by IoU above `th` (ONNX's reference `suppress_by_iou`).
fn overlaps<F>(b1: &[F], b2: &[F], center: bool, th: F, zero: F, two: F) -> bool
where
    F: Copy + PartialOrd + Add<Output = F> + Sub<Output = F> + Mul<Output = F> + Div<Output = F>,
{
    let minmax = |a: F, b: F| if a >= b { (b, a) } else { (a, b) };
    let fmax = |a: F, b: F| if a >= b { a } else { b };
    let fmin = |a: F, b: F| if a <= b { a } else { b };
    let ((x1min, x1max), (x2min, x2max), (y1min, y1max), (y2min, y2max)) = if center {
        let span = |c: F, w: F| (c - w / two, c + w / two);
        (span(b1[0], b1[2]), span(b2[0], b2[2]), span(b1[1], b1[3]), span(b2[1], b2[3]))
    } else {
        (minmax(b1[1], b1[3]), minmax(b2[1], b2[3]), minmax(b1[0], b1[2]), minmax(b2[0], b2[2]))
    };
    let (ix0, ix1) = (fmax(x1min, x2min), fmin(x1max, x2max));
    if ix1 <= ix0 {
        return false;
    }
    let (iy0, iy1) = (fmax(y1min, y2min), fmin(y1max, y2max));
    if iy1 <= iy0 {
        return false;
    }
    let inter = (ix1 - ix0) * (iy1 - iy0);
    if inter <= zero {
        return false;
    }
    let a1 = (x1max - x1min) * (y1max - y1min);
    let a2 = (x2max - x2min) * (y2max - y2min);
    let union = a1 + a2 - inter;
    if a1 <= zero || a2 <= zero || union <= zero {
        return false;
    }
    inter / union > th
}

#[cfg(test)]
mod tests {
    use super::super::tests::eval_op;
    use crate::tensor::Tensor;

    #[test]
    fn suppresses_overlapping_boxes() {
        let boxes = Tensor::from_f32(&[1, 3, 4], vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.1, 1.0, 1.1, 0.0, 10.0, 1.0, 11.0]);
        let scores = Tensor::from_f32(&[1, 1, 3], vec![0.9, 0.95, 0.3]);
        let max = Tensor::from_i64(&[1], vec![3]);
        let iou = Tensor::from_f32(&[1], vec![0.5]);
        let y =
            eval_op("NonMaxSuppression", &[], &[Some(&boxes), Some(&scores), Some(&max), Some(&iou)], 1, 11).unwrap();
        assert_eq!(y[0].shape, vec![2, 3]);
        assert_eq!(y[0].to_i64(), vec![0, 0, 1, 0, 0, 2]);
    }
}
