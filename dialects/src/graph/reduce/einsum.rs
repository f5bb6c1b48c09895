//! `Einsum`: Einstein summation over any number of operands.
//!
//! The equation is parsed into per-operand label lists (ellipsis dims become synthetic labels,
//! broadcast numpy-style). Repeated labels within an operand take diagonals; labels needed
//! nowhere else are summed out early; operands are then contracted pairwise, left to right,
//! each pair as a batched matrix product `[batch, M, K] x [batch, K, N]`.

use super::{fold_axes, permute};
use crate::bail;
use crate::graph::strided_copy;
use crate::graph::{req, EvalCx, InferCx, OpDef, OpResult, Registry};
use crate::tensor::{strides, Data, Tensor};
use crate::types::{DType, Dim, TensorType};

pub fn register(r: &mut Registry) {
    r.add(&Einsum);
}

/// `Einsum`: `Output = einsum(equation, Inputs...)` with numpy semantics: explicit (`->`) or
/// implicit output, `...` broadcasting, repeated indices (diagonals/traces) and summation over
/// every label missing from the output.
struct Einsum;

/// A label: a letter's code, or `ELLIPSIS + j` for the j-th broadcast dim.
type Label = u32;
const ELLIPSIS: Label = 1 << 16;

/// One term of the equation: letters with an optional ellipsis position.
struct Term {
    letters: Vec<Label>,
    ellipsis_at: Option<usize>,
}

fn parse_term(s: &str) -> OpResult<Term> {
    let mut letters = Vec::new();
    let mut ellipsis_at = None;
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            c if c.is_ascii_alphabetic() => {
                letters.push(c as Label);
                i += 1;
            }
            b'.' if b[i..].starts_with(b"...") && ellipsis_at.is_none() => {
                ellipsis_at = Some(letters.len());
                i += 3;
            }
            _ => bail!("invalid einsum term '{s}'"),
        }
    }
    Ok(Term { letters, ellipsis_at })
}

/// The label lists of every operand and of the output, for operands of `ranks`.
fn parse(eq: &str, ranks: &[usize]) -> OpResult<(Vec<Vec<Label>>, Vec<Label>)> {
    let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq.as_str(), None),
    };
    let terms: Vec<Term> = lhs.split(',').map(parse_term).collect::<OpResult<_>>()?;
    if terms.len() != ranks.len() {
        bail!("equation '{eq}' has {} operands, the op has {} inputs", terms.len(), ranks.len());
    }
    // Broadcast dims of each operand, and their common count.
    let mut ell = Vec::with_capacity(terms.len());
    for (t, &r) in terms.iter().zip(ranks) {
        let e = r as i64 - t.letters.len() as i64;
        if e < 0 || (t.ellipsis_at.is_none() && e != 0) {
            bail!("equation '{eq}' does not match an input of rank {r}");
        }
        ell.push(e as usize);
    }
    let n_ell = ell.iter().copied().max().unwrap_or(0);
    let inputs: Vec<Vec<Label>> = terms
        .iter()
        .zip(&ell)
        .map(|(t, &e)| {
            let at = t.ellipsis_at.unwrap_or(t.letters.len());
            let mut l = t.letters[..at].to_vec();
            l.extend((n_ell - e..n_ell).map(|j| ELLIPSIS + j as Label));
            l.extend_from_slice(&t.letters[at..]);
            l
        })
        .collect();
    let output = match rhs {
        Some(r) => {
            let t = parse_term(r)?;
            let at = t.ellipsis_at.unwrap_or(t.letters.len());
            let mut l = t.letters[..at].to_vec();
            if t.ellipsis_at.is_some() {
                l.extend((0..n_ell).map(|j| ELLIPSIS + j as Label));
            }
            l.extend_from_slice(&t.letters[at..]);
            for (i, x) in l.iter().enumerate() {
                if l[..i].contains(x) {
                    bail!("output of '{eq}' repeats a label");
                }
                if !inputs.iter().any(|ls| ls.contains(x)) {
                    bail!("output of '{eq}' has a label no input has");
                }
            }
            l
        }
        None => {
            let mut l: Vec<Label> = (0..n_ell).map(|j| ELLIPSIS + j as Label).collect();
            let mut once: Vec<Label> = Vec::new();
            for t in &terms {
                for &c in &t.letters {
                    let n: usize = terms.iter().map(|u| u.letters.iter().filter(|&&d| d == c).count()).sum();
                    if n == 1 {
                        once.push(c);
                    }
                }
            }
            once.sort_unstable();
            l.extend(once);
            l
        }
    };
    Ok((inputs, output))
}

/// Arithmetic that einsum needs, on the type it computes in.
trait Num: Copy + Default {
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
}
impl Num for f32 {
    fn add(self, o: Self) -> Self {
        self + o
    }
    fn mul(self, o: Self) -> Self {
        self * o
    }
}
impl Num for f64 {
    fn add(self, o: Self) -> Self {
        self + o
    }
    fn mul(self, o: Self) -> Self {
        self * o
    }
}
impl Num for i64 {
    fn add(self, o: Self) -> Self {
        self.wrapping_add(o)
    }
    fn mul(self, o: Self) -> Self {
        self.wrapping_mul(o)
    }
}

/// An operand during evaluation: distinct labels, one per axis.
struct Operand<T> {
    data: Vec<T>,
    labels: Vec<Label>,
    shape: Vec<usize>,
}

impl<T: Num> Operand<T> {
    /// Takes diagonals of repeated labels and broadcasts size-1 axes to the label's size.
    fn new(data: &[T], shape: &[usize], labels: &[Label], size: &dyn Fn(Label) -> usize) -> OpResult<Self> {
        let st = strides(shape);
        let (mut ul, mut us, mut ust) = (Vec::new(), Vec::new(), Vec::<usize>::new());
        for (i, &l) in labels.iter().enumerate() {
            if let Some(p) = ul.iter().position(|&x| x == l) {
                if us[p] != shape[i] {
                    bail!("repeated einsum index has sizes {} and {}", us[p], shape[i]);
                }
                ust[p] += st[i];
            } else {
                ul.push(l);
                us.push(shape[i]);
                ust.push(st[i]);
            }
        }
        for (i, &l) in ul.iter().enumerate() {
            let n = size(l);
            if us[i] != n {
                // Only size 1 broadcasts (checked when sizes were collected).
                us[i] = n;
                ust[i] = 0;
            }
        }
        super::super::checked_numel(&us)?;
        let ust: Vec<isize> = ust.iter().map(|&s| s as isize).collect();
        Ok(Operand { data: strided_copy(data, &us, &ust, 0), labels: ul, shape: us })
    }

    /// Sums out every label not in `keep`.
    fn sum_except(self, keep: &dyn Fn(Label) -> bool) -> Self {
        let mask: Vec<bool> = self.labels.iter().map(|&l| !keep(l)).collect();
        if !mask.contains(&true) {
            return self;
        }
        let data = fold_axes(&self.data, &self.shape, &mask, T::default(), |a, v| a.add(v));
        let (labels, shape) =
            self.labels.iter().zip(&self.shape).zip(&mask).filter(|(_, &m)| !m).map(|((&l, &s), _)| (l, s)).unzip();
        Operand { data, labels, shape }
    }

    /// Axes permuted to the order of `labels` (a permutation of this operand's labels).
    fn arranged(&self, labels: &[Label]) -> Vec<T> {
        let perm: Vec<usize> = labels.iter().filter_map(|l| self.labels.iter().position(|x| x == l)).collect();
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return self.data.clone();
        }
        permute(&self.data, &self.shape, &perm).0
    }
}

/// Contracts `a` and `b` over their shared labels not in `keep`, as a batched matmul.
fn contract<T: Num>(a: Operand<T>, b: Operand<T>, keep: &dyn Fn(Label) -> bool) -> OpResult<Operand<T>> {
    let a = a.sum_except(&|l| keep(l) || b.labels.contains(&l));
    let b = b.sum_except(&|l| keep(l) || a.labels.contains(&l));
    let size = |l: Label| -> usize {
        let (ops, i) = match a.labels.iter().position(|&x| x == l) {
            Some(i) => (&a, i),
            None => (&b, b.labels.iter().position(|&x| x == l).unwrap_or(0)),
        };
        ops.shape.get(i).copied().unwrap_or(1)
    };
    let batch: Vec<Label> = a.labels.iter().copied().filter(|l| b.labels.contains(l) && keep(*l)).collect();
    let kl: Vec<Label> = a.labels.iter().copied().filter(|l| b.labels.contains(l) && !keep(*l)).collect();
    let ml: Vec<Label> = a.labels.iter().copied().filter(|l| !b.labels.contains(l)).collect();
    let nl: Vec<Label> = b.labels.iter().copied().filter(|l| !a.labels.contains(l)).collect();
    let prod = |ls: &[Label]| ls.iter().map(|&l| size(l)).product::<usize>();
    let (nb, m, k, n) = (prod(&batch), prod(&ml), prod(&kl), prod(&nl));
    let av = a.arranged(&[batch.clone(), ml.clone(), kl.clone()].concat());
    let bv = b.arranged(&[batch.clone(), kl, nl.clone()].concat());
    let labels: Vec<Label> = [batch, ml, nl].concat();
    let shape: Vec<usize> = labels.iter().map(|&l| size(l)).collect();
    super::super::checked_numel(&shape)?;
    let mut out = vec![T::default(); nb * m * n];
    for bi in 0..nb {
        let (ab, bb) = (&av[bi * m * k..(bi + 1) * m * k], &bv[bi * k * n..(bi + 1) * k * n]);
        let ob = &mut out[bi * m * n..(bi + 1) * m * n];
        for (arow, orow) in ab.chunks_exact(k.max(1)).zip(ob.chunks_exact_mut(n.max(1))) {
            if k == 0 || n == 0 {
                break;
            }
            for (&x, brow) in arow.iter().zip(bv_rows(bb, n)) {
                for (o, &y) in orow.iter_mut().zip(brow) {
                    *o = o.add(x.mul(y));
                }
            }
        }
    }
    Ok(Operand { data: out, labels, shape })
}

fn bv_rows<T>(b: &[T], n: usize) -> std::slice::ChunksExact<'_, T> {
    b.chunks_exact(n)
}

/// Evaluates the whole equation in the compute type `T`.
fn run<T: Num>(
    datas: &[&[T]],
    shapes: &[&[usize]],
    labels: &[Vec<Label>],
    output: &[Label],
) -> OpResult<(Vec<T>, Vec<usize>)> {
    // The size of every label (size-1 axes broadcast).
    let mut sizes: Vec<(Label, usize)> = Vec::new();
    for (ls, sh) in labels.iter().zip(shapes) {
        for (&l, &d) in ls.iter().zip(sh.iter()) {
            match sizes.iter_mut().find(|(x, _)| *x == l) {
                None => sizes.push((l, d)),
                Some((_, s)) if *s == d || d == 1 => {}
                Some((_, s)) if *s == 1 => *s = d,
                Some((_, s)) => bail!("einsum index has sizes {s} and {d} in different operands"),
            }
        }
    }
    let size = |l: Label| sizes.iter().find(|(x, _)| *x == l).map_or(1, |p| p.1);
    let mut ops: Vec<Operand<T>> = Vec::with_capacity(datas.len());
    for ((d, s), l) in datas.iter().zip(shapes).zip(labels) {
        ops.push(Operand::new(d, s, l, &size)?);
    }
    let mut rest = ops.into_iter();
    let Some(mut acc) = rest.next() else { bail!("Einsum needs at least one input") };
    let rest: Vec<Operand<T>> = rest.collect();
    for (i, b) in rest.into_iter().enumerate() {
        let later = &labels[i + 2..];
        let keep = |l: Label| output.contains(&l) || later.iter().any(|ls| ls.contains(&l));
        acc = contract(acc, b, &keep)?;
    }
    let acc = acc.sum_except(&|l| output.contains(&l));
    let data = acc.arranged(output);
    Ok((data, output.iter().map(|&l| size(l)).collect()))
}

impl OpDef for Einsum {
    fn name(&self) -> &'static str {
        "Einsum"
    }

    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let eq = cx.attrs.string("equation", "")?;
        let first = cx.input(0)?;
        let dtype = first.dtype;
        if !dtype.is_numeric() {
            bail!("Einsum expects numeric inputs, found {dtype}");
        }
        let mut shapes = Vec::new();
        for (i, t) in cx.inputs.iter().enumerate() {
            let Some(t) = t else { bail!("expected input {i} to be present") };
            if t.dtype != dtype {
                bail!("Einsum inputs must share one type, found {dtype} and {}", t.dtype);
            }
            match &t.shape {
                Some(s) => shapes.push(s.clone()),
                None => return Ok(vec![TensorType::unranked(dtype)]),
            }
        }
        let ranks: Vec<usize> = shapes.iter().map(|s| s.len()).collect();
        let (labels, output) = parse(&eq, &ranks)?;
        let dims = output
            .iter()
            .map(|&l| {
                let mut found: Option<Dim> = None;
                for (ls, sh) in labels.iter().zip(&shapes) {
                    for (&x, d) in ls.iter().zip(sh) {
                        if x == l && (found.is_none() || found == Some(Dim::Known(1))) {
                            found = Some(d.clone());
                        }
                    }
                }
                found.unwrap_or(Dim::Known(1))
            })
            .collect();
        Ok(vec![TensorType::new(dtype, dims)])
    }

    fn eval(&self, cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let eq = cx.attrs.string("equation", "")?;
        let xs: Vec<&Tensor> = (0..inputs.len()).map(|i| req(inputs, i)).collect::<OpResult<_>>()?;
        let Some(first) = xs.first() else { bail!("Einsum needs at least one input") };
        let dt = first.dtype();
        if !dt.is_numeric() {
            bail!("Einsum expects numeric inputs, found {dt}");
        }
        if let Some(x) = xs.iter().find(|x| x.dtype() != dt) {
            bail!("Einsum inputs must share one type, found {dt} and {}", x.dtype());
        }
        let ranks: Vec<usize> = xs.iter().map(|x| x.rank()).collect();
        let (labels, output) = parse(&eq, &ranks)?;
        let shapes: Vec<&[usize]> = xs.iter().map(|x| x.shape.as_slice()).collect();
        let y = if dt == DType::F32 {
            let ds: Vec<&[f32]> = xs.iter().filter_map(|x| x.as_f32()).collect();
            let (v, s) = run(&ds, &shapes, &labels, &output)?;
            Tensor::new(s, Data::F32(v))
        } else if dt.is_float() {
            let owned: Vec<Vec<f64>> = xs.iter().map(|x| x.to_f64()).collect();
            let ds: Vec<&[f64]> = owned.iter().map(|v| v.as_slice()).collect();
            let (v, s) = run(&ds, &shapes, &labels, &output)?;
            Tensor::from_f64(dt, &s, v)
        } else {
            let owned: Vec<Vec<i64>> = xs.iter().map(|x| x.to_i64()).collect();
            let ds: Vec<&[i64]> = owned.iter().map(|v| v.as_slice()).collect();
            let (v, s) = run(&ds, &shapes, &labels, &output)?;
            Tensor::from_i64_as(dt, &s, v)
        };
        Ok(vec![y])
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::eval_op;
    use crate::attr::Attr;
    use crate::tensor::Tensor;

    fn es(eq: &str, xs: &[&Tensor]) -> Tensor {
        let ins: Vec<Option<&Tensor>> = xs.iter().map(|x| Some(*x)).collect();
        eval_op("Einsum", &[("equation", Attr::Str(eq.into()))], &ins, 1, 12).unwrap().remove(0)
    }

    #[test]
    fn matmul_trace_transpose_and_batch() {
        let a = Tensor::from_f32(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let b = Tensor::from_f32(&[3, 2], vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        let y = es("ij,jk->ik", &[&a, &b]);
        assert_eq!((y.shape.clone(), y.to_f64()), (vec![2, 2], vec![4.0, 5.0, 10.0, 11.0]));
        let y = es("ij", &[&a]);
        assert_eq!(y.to_f64(), a.to_f64());
        let y = es("ji", &[&a]);
        assert_eq!((y.shape.clone(), y.to_f64()), (vec![3, 2], vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]));
        let sq = Tensor::from_f32(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(es("ii", &[&sq]).to_f64(), vec![5.0]);
        assert_eq!(es("ii->i", &[&sq]).to_f64(), vec![1.0, 4.0]);
        let x = Tensor::from_i64(&[2, 1, 2], vec![1, 2, 3, 4]);
        let w = Tensor::from_i64(&[2, 1], vec![1, 1]);
        let y = es("...ij,jk->...ik", &[&x, &w]);
        assert_eq!((y.shape.clone(), y.to_i64()), (vec![2, 1, 1], vec![3, 7]));
        let v = Tensor::from_f32(&[3], vec![1.0, 2.0, 3.0]);
        assert_eq!(es("i,i", &[&v, &v]).to_f64(), vec![14.0]);
    }
}
