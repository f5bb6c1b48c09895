//! Variadic broadcasting ops (Sum, Mean, Max, Min) and Where.

use super::binary::{binary, infer_broadcast, zip_all_data, Bin};
use super::kernels::{f32_to_half, half_to_f32, zip3_map};
use crate::bail;
use crate::graph::{req, EvalCx, InferCx, OpDef, OpResult};
use crate::tensor::{Data, Tensor};
use crate::types::{DType, TensorType};

/// Sum, Mean, Max, Min: fold of one or more inputs with numpy broadcasting. Sum and Mean take
/// floats, Max and Min any numeric type (NaN propagates).
pub(super) struct Variadic {
    pub(super) name: &'static str,
    /// The pairwise function (Add for Sum and Mean).
    pub(super) op: Bin,
    /// Divide by the input count at the end (Mean).
    pub(super) mean: bool,
}

impl Variadic {
    fn check_dtype(&self, t: DType) -> OpResult<()> {
        let ok = if self.op == Bin::Add { t.is_float() } else { t.is_numeric() };
        if !ok {
            bail!("{} is not defined on {t} tensors", self.name);
        }
        Ok(())
    }
}

impl OpDef for Variadic {
    fn name(&self) -> &'static str {
        self.name
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let t = cx.input(0)?.dtype;
        self.check_dtype(t)?;
        let mut shapes = Vec::new();
        for (i, inp) in cx.inputs.iter().enumerate() {
            let Some(inp) = inp else { bail!("expected input {i} to be present") };
            if inp.dtype != t {
                bail!("all inputs must have one type, input 0 is {t} and input {i} is {}", inp.dtype);
            }
            shapes.push(inp.shape.clone());
        }
        infer_broadcast(cx, &shapes, t)
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let first = req(inputs, 0)?;
        self.check_dtype(first.dtype())?;
        let mut acc: Option<Tensor> = None;
        for i in 1..inputs.len() {
            let t = req(inputs, i)?;
            let prev = acc.as_ref().unwrap_or(first);
            acc = Some(binary(self.op, prev, t, &t.shape)?);
        }
        let acc = acc.unwrap_or_else(|| first.clone());
        if !self.mean || inputs.len() < 2 {
            return Ok(vec![acc]);
        }
        let n = inputs.len();
        let data = match &acc.data {
            Data::F32(v) => Data::F32(v.iter().map(|x| x / n as f32).collect()),
            Data::F64(v) => Data::F64(v.iter().map(|x| x / n as f64).collect()),
            d => match half_to_f32(d) {
                Some(v) => f32_to_half(d, v.into_iter().map(|x| x / n as f32).collect()),
                None => bail!("Mean is not defined on {} tensors", d.dtype()),
            },
        };
        Ok(vec![Tensor::new(acc.shape, data)])
    }
}

/// Where: `condition ? x : y` elementwise with numpy broadcasting of all three; `x` and `y`
/// have one type (any, strings included).
pub(super) struct Where;

impl OpDef for Where {
    fn name(&self) -> &'static str {
        "Where"
    }
    fn infer(&self, cx: &mut InferCx) -> OpResult<Vec<TensorType>> {
        let (c, x, y) = (cx.input(0)?, cx.input(1)?, cx.input(2)?);
        if c.dtype != DType::Bool {
            bail!("Where condition must be bool, found {}", c.dtype);
        }
        if x.dtype != y.dtype {
            bail!("Where branches must have one type, found {} and {}", x.dtype, y.dtype);
        }
        let shapes = [c.shape.clone(), x.shape.clone(), y.shape.clone()];
        infer_broadcast(cx, &shapes, x.dtype)
    }
    fn eval(&self, _cx: &EvalCx, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let (c, x, y) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        let Data::Bool(cv) = &c.data else { bail!("Where condition must be bool, found {}", c.dtype()) };
        let shape: Vec<usize>;
        let data = zip_all_data!(same, &x.data, &y.data, (p, q) => {
            let (s, v) = zip3_map((cv, &c.shape), (p, &x.shape), (q, &y.shape), |&c, p, q| {
                ToOwned::to_owned(if c { p } else { q })
            })?;
            shape = s;
            v
        }, else bail!("Where branches must have one type, found {} and {}", x.dtype(), y.dtype()));
        Ok(vec![Tensor::new(shape, data)])
    }
}
