//! Lowering graph → kernel (first cut: elementwise kernels).
//!
//! A `graph.fused` kernel of kind `elementwise` (or `layout`), or a single elementwise op,
//! becomes one [`Kernel`]: a loop nest over the (first) output's dims, and per output a store of
//! an expression built by walking the kernel's ops backwards from the output element. Index
//! maps become index arithmetic, never copies: broadcasting (a dim of 1, known or only at run
//! time), Transpose (permuted indices) and the views (linearize, then delinearize). Sizes stay
//! symbolic: a symbolic dim reads the extent of a buffer that carries it.
//!
//! Anything else (reductions, contractions, non-f32 types) is refused with a reason; issue #5's
//! next steps extend this.

use kiln_ir::attr::Attr;
use kiln_ir::graph::AttrView;
use kiln_ir::ir::{Module, OpId, ValueDef, ValueId};
use kiln_ir::kernel::{BinOp, Buffer, Idx, Kernel, Knobs, Level, Stmt, UnOp, Val};
use kiln_ir::{DType, Dim};
use std::collections::HashMap;

/// Why an op was not lowered.
pub type LowerResult<T> = Result<T, String>;

struct Lowering<'m> {
    m: &'m Module,
    /// Buffer index of each kernel input value.
    arg: HashMap<ValueId, usize>,
    /// Ops of the kernel, by the value they define.
    inside: HashMap<ValueId, OpId>,
    /// A buffer and axis that carries each symbolic dim.
    syms: HashMap<String, (usize, usize)>,
}

fn b(i: Idx) -> Box<Idx> {
    Box::new(i)
}

impl Lowering<'_> {
    fn shape(&self, v: ValueId) -> LowerResult<&[Dim]> {
        self.m.value(v).ty.shape.as_deref().ok_or_else(|| format!("{} has an unknown rank", self.m.value_label(v)))
    }

    fn dim(&self, d: &Dim) -> LowerResult<Idx> {
        match d {
            Dim::Known(n) => Ok(Idx::Const(*n as i64)),
            Dim::Sym(s) => match self.syms.get(&**s) {
                Some(&(buf, axis)) => Ok(Idx::Dim { buf, axis }),
                None => Err(format!("symbolic dim '{s}' is carried by no buffer of the kernel")),
            },
        }
    }

    /// The index into a value of shape `inp` read by an element `idx` of shape `out` under
    /// numpy broadcasting.
    fn broadcast(&self, idx: &[Idx], out: &[Dim], inp: &[Dim]) -> LowerResult<Vec<Idx>> {
        let offset = out.len().checked_sub(inp.len()).ok_or("an operand has a higher rank than the result")?;
        inp.iter()
            .enumerate()
            .map(|(j, d)| {
                let i = idx[offset + j].clone();
                Ok(match (d, &out[offset + j]) {
                    (Dim::Known(1), _) => Idx::Const(0),
                    (Dim::Known(_), _) => i,
                    (Dim::Sym(a), Dim::Sym(o)) if a == o => i,
                    (d, _) => Idx::ZeroIfOne(b(self.dim(d)?), b(i)),
                })
            })
            .collect()
    }

    /// Row-major linear offset of `idx` in `shape`.
    fn linearize(&self, idx: &[Idx], shape: &[Dim]) -> LowerResult<Idx> {
        let mut lin = Idx::Const(0);
        for (i, d) in idx.iter().zip(shape) {
            lin = Idx::Add(b(Idx::Mul(b(lin), b(self.dim(d)?))), b(i.clone()));
        }
        Ok(lin)
    }

    /// The index in `shape` of linear offset `lin`.
    fn delinearize(&self, lin: Idx, shape: &[Dim]) -> LowerResult<Vec<Idx>> {
        let mut out = vec![Idx::Const(0); shape.len()];
        let mut rest = lin;
        for (k, d) in shape.iter().enumerate().rev() {
            let size = self.dim(d)?;
            if k == 0 {
                out[k] = rest.clone();
            } else {
                out[k] = Idx::Rem(b(rest.clone()), b(size.clone()));
                rest = Idx::Div(b(rest), b(size));
            }
        }
        Ok(out)
    }

    /// The scalar value of `v` at element `idx`.
    fn value(&self, v: ValueId, idx: &[Idx]) -> LowerResult<Val> {
        if let Some(&buf) = self.arg.get(&v) {
            return Ok(Val::Load { buf, index: idx.to_vec() });
        }
        let o = *self.inside.get(&v).ok_or_else(|| format!("value {} is not in the kernel", self.m.value_label(v)))?;
        let op = self.m.op(o);
        let t = op.op_type();
        let out = self.shape(v)?.to_vec();
        let x = |i: usize| op.operands.get(i).copied().flatten().ok_or_else(|| format!("{t}: operand {i} is missing"));
        let operand = |i: usize| -> LowerResult<Val> {
            let a = x(i)?;
            let ix = self.broadcast(idx, &out, self.shape(a)?)?;
            self.value(a, &ix)
        };
        let un = |u: UnOp| -> LowerResult<Val> { Ok(Val::Un(u, Box::new(operand(0)?))) };
        let bin = |op: BinOp| -> LowerResult<Val> { Ok(Val::Bin(op, Box::new(operand(0)?), Box::new(operand(1)?))) };
        let attrs = AttrView(&op.attrs);
        match t {
            "Neg" => un(UnOp::Neg),
            "Abs" => un(UnOp::Abs),
            "Exp" => un(UnOp::Exp),
            "Log" => un(UnOp::Log),
            "Sqrt" => un(UnOp::Sqrt),
            "Tanh" => un(UnOp::Tanh),
            "Erf" => un(UnOp::Erf),
            "Floor" => un(UnOp::Floor),
            "Ceil" => un(UnOp::Ceil),
            "Reciprocal" => un(UnOp::Recip),
            "Relu" => un(UnOp::Relu),
            "Sigmoid" => un(UnOp::Sigmoid),
            "Add" => bin(BinOp::Add),
            "Sub" => bin(BinOp::Sub),
            "Mul" => bin(BinOp::Mul),
            "Div" => bin(BinOp::Div),
            "Pow" => bin(BinOp::Pow),
            "Max" | "Min" if op.operands.len() == 2 => bin(if t == "Max" { BinOp::Max } else { BinOp::Min }),
            "Gelu" if attrs.string("approximate", "none").map_err(|e| e.0)? == "none" => {
                // 0.5·x·(1 + erf(x/√2))
                let xv = operand(0)?;
                let scaled =
                    Val::Bin(BinOp::Mul, Box::new(xv.clone()), Box::new(Val::Const(std::f64::consts::FRAC_1_SQRT_2)));
                let erf1 =
                    Val::Bin(BinOp::Add, Box::new(Val::Const(1.0)), Box::new(Val::Un(UnOp::Erf, Box::new(scaled))));
                let half_x = Val::Bin(BinOp::Mul, Box::new(Val::Const(0.5)), Box::new(xv));
                Ok(Val::Bin(BinOp::Mul, Box::new(half_x), Box::new(erf1)))
            }
            "Swish" => {
                let alpha = attrs.float("alpha", 1.0).map_err(|e| e.0)? as f64;
                let xv = operand(0)?;
                let ax = Val::Bin(BinOp::Mul, Box::new(Val::Const(alpha)), Box::new(xv.clone()));
                Ok(Val::Bin(BinOp::Mul, Box::new(xv), Box::new(Val::Un(UnOp::Sigmoid, Box::new(ax)))))
            }
            "Identity" => self.value(x(0)?, idx),
            "Transpose" => {
                let a = x(0)?;
                let r = idx.len();
                let perm: Vec<usize> = match attrs.ints("perm").map_err(|e| e.0)? {
                    Some(p) => p.iter().map(|&p| if p < 0 { (p + r as i64) as usize } else { p as usize }).collect(),
                    None => (0..r).rev().collect(),
                };
                let mut inner = vec![Idx::Const(0); r];
                for (i, &p) in perm.iter().enumerate() {
                    *inner.get_mut(p).ok_or("Transpose: bad perm")? = idx[i].clone();
                }
                self.value(a, &inner)
            }
            "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => {
                let a = x(0)?;
                let lin = self.linearize(idx, &out)?;
                let inner = self.delinearize(lin, self.shape(a)?)?;
                self.value(a, &inner)
            }
            other => Err(format!("{other} is not lowered to the kernel dialect yet")),
        }
    }
}

/// Lowers top-level op `o` of `m` (an elementwise `graph.fused` kernel or one elementwise op)
/// to a kernel named `name`.
pub fn lower(m: &Module, o: OpId, name: &str) -> LowerResult<Kernel> {
    let op = m.op(o);
    let (args, ops, yields): (Vec<ValueId>, Vec<OpId>, Vec<ValueId>) = if op.name == "graph.fused" {
        let kind = match op.attrs.get("kind") {
            Some(Attr::Str(k)) => k.as_str(),
            _ => "",
        };
        if kind != "elementwise" && kind != "layout" {
            return Err(format!("a {kind} kernel is not lowered to the kernel dialect yet"));
        }
        let blk = op.regions.first().and_then(|r| r.blocks.first()).ok_or("a fused op without a body")?;
        (blk.args.clone(), blk.ops.clone(), blk.yields.clone())
    } else {
        let args = op.operands.iter().map(|v| v.ok_or("an omitted operand")).collect::<Result<Vec<_>, _>>()?;
        (args, vec![o], op.results.clone())
    };
    let mut buffers = Vec::new();
    for (i, &v) in args.iter().chain(&yields).enumerate() {
        let vd = m.value(v);
        if vd.ty.dtype != DType::F32 {
            return Err(format!("{} elements are not lowered yet (f32 only)", vd.ty.dtype));
        }
        let shape = vd.ty.shape.clone().ok_or("a value of unknown rank")?;
        let io = if i < args.len() { "in" } else { "out" };
        buffers.push(Buffer { name: format!("{io}{i}"), dtype: DType::F32, shape, level: Level::Global });
    }
    let mut syms = HashMap::new();
    for (bi, buf) in buffers.iter().enumerate() {
        for (axis, d) in buf.shape.iter().enumerate() {
            if let Dim::Sym(s) = d {
                syms.entry(s.to_string()).or_insert((bi, axis));
            }
        }
    }
    let inside: HashMap<ValueId, OpId> =
        ops.iter().flat_map(|&i| m.op(i).results.iter().map(move |&r| (r, i))).collect();
    let arg: HashMap<ValueId, usize> = args.iter().enumerate().map(|(i, &v)| (v, i)).collect();
    let lw = Lowering { m, arg, inside, syms };
    let out_shape = buffers.get(args.len()).ok_or("a kernel without outputs")?.shape.clone();
    for (k, &y) in yields.iter().enumerate() {
        if lw.shape(y)? != out_shape.as_slice() {
            return Err(format!("kernel output {k} has another shape than output 0"));
        }
        if matches!(m.value(y).def, ValueDef::BlockArg) {
            return Err("a kernel output that is one of its inputs".into());
        }
    }
    let rank = out_shape.len();
    let vars: Vec<Idx> = (0..rank).map(Idx::Var).collect();
    let mut body: Vec<Stmt> = yields
        .iter()
        .enumerate()
        .map(|(k, &y)| Ok(Stmt::Store { buf: args.len() + k, index: vars.clone(), value: lw.value(y, &vars)? }))
        .collect::<LowerResult<_>>()?;
    for axis in (0..rank).rev() {
        let extent = Idx::Dim { buf: args.len(), axis };
        body = vec![Stmt::For { var: axis, extent, parallel: axis == 0, body }];
    }
    Ok(Kernel { name: name.to_string(), buffers, inputs: args.len(), body, knobs: Knobs::default() })
}
