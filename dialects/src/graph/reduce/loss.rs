//! `NegativeLogLikelihoodLoss` and `SoftmaxCrossEntropyLoss`.

use super::split_at_axis;
use crate::bail;
use crate::graph::{opt, req, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::Tensor;
use crate::types::TensorType;

pub fn register(r: &mut Registry) {
    r.add_all(&[
        &Loss { name: "NegativeLogLikelihoodLoss", softmax: false },
        &Loss { name: "SoftmaxCrossEntropyLoss", softmax: true },
    ]);
}

/// `NegativeLogLikelihoodLoss` (input: log-probabilities) and `SoftmaxCrossEntropyLoss`
/// (input: scores, log-softmaxed over axis 1 first; optional second output the
/// log-probabilities). Input `[N, C, d...]`, labels `[N, d...]`, optional class weights `[C]`:
/// `loss[n, d] = -w[t] * x[n, t, d]` with `t = labels[n, d]` (0 where `t == ignore_index`),
/// then `reduction` `none`, `sum`, or `mean` (sum divided by the sum of the applied weights).
struct Loss {
    name: &'static str,
    softmax: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reduction {
    None,
    Sum,
    Mean,
}

fn reduction(s: &str) -> OpResult<Reduction> {
    Ok(match s {
        "none" => Reduction::None,
        "sum" => Reduction::Sum,
        "mean" => Reduction::Mean,
        _ => bail!("reduction must be 'none', 'sum' or 'mean', found '{s}'"),
    })
}

impl OpDef for Loss {
    fn name(&self) -> &'static str {
        self.name
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let x = cx.input(0)?;
        let t = cx.input(1)?;
        if !x.dtype.is_float() {
            bail!("{} expects float input, found {}", self.name, x.dtype);
        }
        if !t.dtype.is_int() {
            bail!("{} expects integer labels, found {}", self.name, t.dtype);
        }
        let red = reduction(&cx.attrs.string("reduction", "mean")?)?;
        let loss = match red {
            Reduction::None => TensorType { dtype: x.dtype, shape: t.shape.clone() },
            _ => TensorType::new(x.dtype, vec![]),
        };
        Ok(vec![loss, x.clone()])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (x, t) = (req(inputs, 0)?, req(inputs, 1)?);
        if !x.dtype().is_float() || !t.dtype().is_int() {
            bail!("{} expects float input and integer labels, found {} and {}", self.name, x.dtype(), t.dtype());
        }
        if x.rank() < 2 {
            bail!("{} expects input of shape [N, C, ...], found {:?}", self.name, x.shape);
        }
        let mut want = x.shape.clone();
        want.remove(1);
        if t.shape != want {
            bail!("labels must have shape {want:?} for input {:?}, found {:?}", x.shape, t.shape);
        }
        let (n, c, d) = split_at_axis(&x.shape, 1);
        let weights = match opt(inputs, 2) {
            Some(w) if w.shape != [c] => {
                bail!("weights must have shape [{c}], found {:?}", w.shape)
            }
            Some(w) => Some(w.to_f64()),
            None => None,
        };
        let ignore = if cx.attrs.has("ignore_index") { Some(cx.attrs.int("ignore_index", 0)?) } else { None };
        let red = reduction(&cx.attrs.string("reduction", "mean")?)?;
        let mut logp = x.to_f64();
        if self.softmax {
            log_softmax_axis1(&mut logp, n, c, d);
        }
        let labels = t.to_i64();
        let mut loss = vec![0.0; n * d];
        let mut wsum = 0.0;
        for ni in 0..n {
            for di in 0..d {
                let p = ni * d + di;
                let tv = labels[p];
                if Some(tv) == ignore {
                    continue;
                }
                if tv < 0 || tv as usize >= c {
                    bail!("label {tv} is out of range for {c} classes");
                }
                let w = weights.as_ref().map_or(1.0, |w| w[tv as usize]);
                loss[p] = -logp[(ni * c + tv as usize) * d + di] * w;
                wsum += w;
            }
        }
        let y = match red {
            Reduction::None => Tensor::from_f64(x.dtype(), &t.shape, loss),
            Reduction::Sum => Tensor::from_f64(x.dtype(), &[], vec![loss.iter().sum()]),
            Reduction::Mean => Tensor::from_f64(x.dtype(), &[], vec![loss.iter().sum::<f64>() / wsum]),
        };
        let mut outs = vec![y];
        if self.softmax && cx.num_outputs > 1 {
            outs.push(Tensor::from_f64(x.dtype(), &x.shape, logp));
        }
        Ok(outs)
    }
}

/// In-place log-softmax over the middle axis of an `[n, c, d]` buffer.
fn log_softmax_axis1(v: &mut [f64], n: usize, c: usize, d: usize) {
    for ni in 0..n {
        for di in 0..d {
            let idx = |k: usize| (ni * c + k) * d + di;
            let m = (0..c).map(|k| v[idx(k)]).fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = (0..c).map(|k| (v[idx(k)] - m).exp()).sum();
            let lse = m + s.ln();
            for k in 0..c {
                v[idx(k)] -= lse;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::eval_op;
    use crate::attr::Attr;
    use crate::tensor::Tensor;

    #[test]
    fn nll_and_sce() {
        let x = Tensor::from_f32(&[2, 3], vec![-1.0, -2.0, -3.0, -0.5, -1.5, -2.5]);
        let t = Tensor::from_i64(&[2], vec![2, 0]);
        let y = eval_op("NegativeLogLikelihoodLoss", &[], &[Some(&x), Some(&t)], 1, 13).unwrap();
        assert!((y[0].to_f64()[0] - 1.75).abs() < 1e-6);
        let w = Tensor::from_f32(&[3], vec![1.0, 1.0, 3.0]);
        let a = [("reduction", Attr::Str("none".into())), ("ignore_index", Attr::Int(0))];
        let y = eval_op("NegativeLogLikelihoodLoss", &a, &[Some(&x), Some(&t), Some(&w)], 1, 13).unwrap();
        assert_eq!(y[0].to_f64(), vec![9.0, 0.0]);
        let s = Tensor::from_f32(&[1, 2], vec![0.0, 0.0]);
        let l = Tensor::from_i64(&[1], vec![1]);
        let y = eval_op("SoftmaxCrossEntropyLoss", &[], &[Some(&s), Some(&l)], 2, 13).unwrap();
        assert!((y[0].to_f64()[0] - 2f64.ln()).abs() < 1e-6);
        assert_eq!(y[1].shape, vec![1, 2]);
    }
}
