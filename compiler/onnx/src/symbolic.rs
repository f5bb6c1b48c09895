//! Symbolic shape values: integer tensors known at import element by element, some elements
//! being symbolic dimensions.
//!
//! Exporters compute shapes at run time (`Shape → Gather → Unsqueeze → Concat → Reshape`). With
//! a symbolic batch or sequence dim those chains cannot fold to constants, but their elements
//! are still known symbolically: `[N, 12, 64]`. Tracking them lets `Reshape`, `Expand` and
//! `ConstantOfShape` keep `N` in their result types instead of inventing fresh dims.

use kiln_ir::graph::{AttrView, SymInt};
use kiln_ir::{Attrs, DType, TensorType};

/// What is known of one operand: its symbolic elements, if any.
pub type SymOperand = Option<Vec<SymInt>>;

/// Computes the symbolic value of a shape-computation node's (first) output, when its
/// operands' values are known. `None`: not a shape computation kiln tracks, or not known.
pub fn propagate(op: &str, attrs: &Attrs, opset: i64, vals: &[SymOperand], types: &[Option<TensorType>]) -> SymOperand {
    let a = AttrView(attrs);
    let val = |i: usize| vals.get(i).cloned().flatten();
    let rank = |i: usize| types.get(i).and_then(|t| t.as_ref()).and_then(|t| t.rank());
    let int_list = |i: usize| -> Option<Vec<i64>> {
        val(i)?.into_iter().map(|s| if let SymInt::Int(n) = s { Some(n) } else { None }).collect()
    };
    let out = match op {
        "Shape" => {
            let dims = types.first()?.as_ref()?.shape.clone()?;
            let r = dims.len() as i64;
            let clamp = |v: i64| if v < 0 { (v + r).max(0) } else { v.min(r) } as usize;
            let (start, end) = if opset >= 15 {
                (clamp(a.int("start", 0).ok()?), clamp(a.int("end", r).ok()?))
            } else {
                (0, r as usize)
            };
            dims.get(start..end.max(start))?.iter().map(SymInt::from_dim).collect()
        }
        "Identity" => val(0)?,
        "Cast" => {
            let to = a.dtype("to").ok()??;
            if !matches!(to, DType::I64 | DType::I32) {
                return None;
            }
            val(0)?
        }
        "Gather" => {
            let data = val(0)?;
            if rank(0)? != 1 || a.int("axis", 0).ok()? != 0 || rank(1)? > 1 {
                return None;
            }
            let n = data.len() as i64;
            int_list(1)?
                .into_iter()
                .map(|i| data.get(if i < 0 { i + n } else { i } as usize).cloned())
                .collect::<Option<Vec<_>>>()?
        }
        "Unsqueeze" | "Squeeze" => {
            let v = val(0)?;
            if v.len() != 1 || rank(0)? > 1 {
                return None;
            }
            v
        }
        "Concat" => {
            if !matches!(a.int("axis", 0).ok()?, 0 | -1) {
                return None;
            }
            let mut out = Vec::new();
            for i in 0..vals.len() {
                if rank(i)? > 1 {
                    return None;
                }
                out.extend(val(i)?);
            }
            out
        }
        "Slice" if opset >= 10 => {
            let data = val(0)?;
            let n = data.len() as i64;
            let (starts, ends) = (int_list(1)?, int_list(2)?);
            let step = match vals.get(4).cloned().flatten() {
                Some(_) => *int_list(4)?.first()?,
                None => 1,
            };
            if starts.len() != 1 || ends.len() != 1 || step <= 0 {
                return None;
            }
            let clamp = |v: i64| if v < 0 { (v + n).max(0) } else { v.min(n) } as usize;
            let (s, e) = (clamp(starts[0]), clamp(ends[0]));
            data.get(s..e.max(s))?.iter().step_by(step as usize).cloned().collect()
        }
        _ => return None,
    };
    // Fully numeric values fold as constants already; only symbolic ones are worth keeping.
    out.iter().any(|s| matches!(s, SymInt::Sym(_))).then_some(out)
}
