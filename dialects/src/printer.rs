//! MLIR generic-syntax printer.
//!
//! A module prints as a `builtin.module` holding one `func.func @main`, every op in generic form
//! (`%3 = "graph.Conv"(%0, %1) {kiln.name = "conv1", strides = array<i64: 1, 1>} :
//! (tensor<...>, tensor<...>) -> tensor<...>`), so `mlir-opt --allow-unregistered-dialect`
//! parses it, and [`crate::parser`] reads it back into an equal module.
//!
//! Conventions (the parser relies on them):
//! - An omitted optional operand is the result of a `"graph.none"() : () -> none` op printed
//!   just before its user.
//! - A region's yielded values are the operands of its `"graph.yield"` terminator.
//! - Graph attributes that refer to regions print as `#kiln.region<N>`.
//! - Value names from the source model are kept in `kiln.names` (a string array attribute per
//!   op, one entry per result) and `arg_attrs`/`res_attrs` of the function.

use crate::attr::Attr;
use crate::ir::{Block, Module, OpId, ValueId};
use crate::tensor::{Data, Tensor};
use crate::types::{DType, TensorType};
use std::collections::HashMap;
use std::fmt::{self, Write};

/// Printing options.
#[derive(Clone, Copy, Debug, Default)]
pub struct PrintOptions {
    /// Tensor constants with more elements than this print as `dense_resource<__elided__>`
    /// (readable, still parsed by mlir-opt, but not by kiln's parser). `None`: print all.
    pub elide_constants_over: Option<usize>,
}

/// Prints a module in MLIR generic syntax.
pub fn print_module(m: &Module, opts: PrintOptions) -> String {
    let mut p = Printer { m, opts, names: HashMap::new(), next: 0, out: String::new() };
    p.module().expect("writing to a String cannot fail");
    p.out
}

/// Writes `s` as an MLIR string literal (quotes, escapes as `\XX` hex).
pub fn write_string_literal(f: &mut dyn fmt::Write, s: &str) -> fmt::Result {
    f.write_char('"')?;
    for b in s.bytes() {
        match b {
            b'"' => f.write_str("\\\"")?,
            b'\\' => f.write_str("\\\\")?,
            0x20..=0x7e => f.write_char(b as char)?,
            _ => write!(f, "\\{b:02X}")?,
        }
    }
    f.write_char('"')
}

/// Formats a float so that MLIR reads it back (a `.` before any exponent; NaN/Inf as hex bits).
pub fn format_float(x: f64, dtype: DType) -> String {
    if !x.is_finite() {
        return match dtype {
            DType::F64 => format!("0x{:016X}", x.to_bits()),
            DType::F16 => format!("0x{:04X}", half::f16::from_f64(x).to_bits()),
            DType::BF16 => format!("0x{:04X}", half::bf16::from_f64(x).to_bits()),
            _ => format!("0x{:08X}", (x as f32).to_bits()),
        };
    }
    let s = match dtype {
        DType::F64 => format!("{x:e}"),
        _ => format!("{:e}", x as f32),
    };
    // Rust prints `1e0`, `1.5e-5`: MLIR wants a fraction part.
    match s.split_once('e') {
        Some((m, e)) if !m.contains('.') => format!("{m}.0e{e}"),
        _ => s,
    }
}

fn is_bare_id(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && s.chars().all(|ch| ch.is_ascii_alphanumeric() || "_$.".contains(ch))
}

struct Printer<'m> {
    m: &'m Module,
    opts: PrintOptions,
    names: HashMap<ValueId, usize>,
    next: usize,
    out: String,
}

impl Printer<'_> {
    fn name(&mut self, v: ValueId) -> String {
        let next = &mut self.next;
        let n = *self.names.entry(v).or_insert_with(|| {
            *next += 1;
            *next - 1
        });
        format!("%{n}")
    }

    fn indent(&mut self, depth: usize) {
        for _ in 0..depth {
            self.out.push_str("  ");
        }
    }

    fn module(&mut self) -> fmt::Result {
        let m = self.m;
        self.out.push_str("\"builtin.module\"() ({\n");
        let ins: Vec<String> = m.body.args.iter().map(|&v| m.value(v).ty.to_string()).collect();
        let outs: Vec<String> = m.body.yields.iter().map(|&v| m.value(v).ty.to_string()).collect();
        let mut props = String::new();
        let arg_names: Vec<String> = m.body.args.iter().map(|&v| name_dict(m.value(v).name.as_deref())).collect();
        let res_names: Vec<String> = m.body.yields.iter().map(|&v| name_dict(m.value(v).name.as_deref())).collect();
        write!(props, "arg_attrs = [{}], ", arg_names.join(", "))?;
        write!(props, "function_type = ({}) -> ({}), ", ins.join(", "), outs.join(", "))?;
        write!(props, "res_attrs = [{}], sym_name = ", res_names.join(", "))?;
        write_string_literal(&mut props, "main")?;
        writeln!(self.out, "  \"func.func\"() <{{{props}}}> ({{")?;
        let body = m.body.clone();
        self.block(&body, 1, "func.return")?;
        self.out.push_str("  }) : () -> ()\n");
        self.out.push_str("})");
        if !m.attrs.is_empty() {
            self.out.push(' ');
            self.attr_dict(&m.attrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>())?;
        }
        self.out.push_str(" : () -> ()\n");
        Ok(())
    }

    /// Prints a block's header (if it has arguments), its ops, and its terminator.
    fn block(&mut self, b: &Block, depth: usize, terminator: &str) -> fmt::Result {
        self.indent(depth);
        self.out.push_str("^bb0(");
        for (i, &a) in b.args.iter().enumerate() {
            if i > 0 {
                self.out.push_str(", ");
            }
            let n = self.name(a);
            let ty = self.m.value(a).ty.to_string();
            write!(self.out, "{n}: {ty}")?;
        }
        self.out.push_str("):\n");
        for &o in &b.ops {
            self.op(o, depth + 1)?;
        }
        self.indent(depth + 1);
        let ys: Vec<String> = b.yields.iter().map(|&v| self.name(v)).collect();
        let ts: Vec<String> = b.yields.iter().map(|&v| self.m.value(v).ty.to_string()).collect();
        writeln!(self.out, "\"{terminator}\"({}) : ({}) -> ()", ys.join(", "), ts.join(", "))
    }

    fn op(&mut self, o: OpId, depth: usize) -> fmt::Result {
        let m = self.m;
        let op = m.op(o);
        // Omitted optional operands become `graph.none` values.
        let mut operand_names = Vec::new();
        let mut operand_types = Vec::new();
        for operand in &op.operands {
            match operand {
                Some(v) => {
                    operand_names.push(self.name(*v));
                    operand_types.push(m.value(*v).ty.to_string());
                }
                None => {
                    let n = format!("%{}", self.next);
                    self.next += 1;
                    self.indent(depth);
                    writeln!(self.out, "{n} = \"graph.none\"() : () -> none")?;
                    operand_names.push(n);
                    operand_types.push("none".into());
                }
            }
        }
        self.indent(depth);
        if !op.results.is_empty() {
            let rs: Vec<String> = op.results.iter().map(|&r| self.name(r)).collect();
            write!(self.out, "{} = ", rs.join(", "))?;
        }
        write!(self.out, "\"{}\"({})", op.name, operand_names.join(", "))?;
        if !op.regions.is_empty() {
            self.out.push_str(" (");
            for (i, r) in op.regions.iter().enumerate() {
                if i > 0 {
                    self.out.push_str(", ");
                }
                self.out.push_str("{\n");
                for b in &r.blocks {
                    self.block(b, depth + 1, "graph.yield")?;
                }
                self.indent(depth);
                self.out.push('}');
            }
            self.out.push(')');
        }
        let mut attrs: Vec<(String, Attr)> = op.attrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if op.results.iter().any(|&r| m.value(r).name.is_some()) {
            let names = op.results.iter().map(|&r| m.value(r).name.clone().unwrap_or_default()).collect();
            attrs.push(("kiln.names".into(), Attr::Strs(names)));
            attrs.sort_by(|a, b| a.0.cmp(&b.0));
        }
        if !attrs.is_empty() {
            self.out.push(' ');
            self.attr_dict(&attrs)?;
        }
        let rts: Vec<String> = op.results.iter().map(|&r| m.value(r).ty.to_string()).collect();
        let rt = if rts.len() == 1 { rts[0].clone() } else { format!("({})", rts.join(", ")) };
        writeln!(self.out, " : ({}) -> {rt}", operand_types.join(", "))
    }

    fn attr_dict(&mut self, attrs: &[(String, Attr)]) -> fmt::Result {
        self.out.push('{');
        for (i, (k, v)) in attrs.iter().enumerate() {
            if i > 0 {
                self.out.push_str(", ");
            }
            if is_bare_id(k) {
                self.out.push_str(k);
            } else {
                write_string_literal(&mut self.out, k)?;
            }
            self.out.push_str(" = ");
            let s = self.attr(v)?;
            self.out.push_str(&s);
        }
        self.out.push('}');
        Ok(())
    }

    fn attr(&self, a: &Attr) -> Result<String, fmt::Error> {
        let mut s = String::new();
        match a {
            Attr::Int(v) => write!(s, "{v} : i64")?,
            Attr::Float(v) => write!(s, "{} : f32", format_float(*v as f64, DType::F32))?,
            Attr::Str(v) => write_string_literal(&mut s, v)?,
            Attr::Ints(v) if v.is_empty() => s.push_str("array<i64>"),
            Attr::Ints(v) => {
                write!(s, "array<i64: {}>", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "))?
            }
            Attr::Floats(v) if v.is_empty() => s.push_str("array<f32>"),
            Attr::Floats(v) => write!(
                s,
                "array<f32: {}>",
                v.iter().map(|&x| format_float(x as f64, DType::F32)).collect::<Vec<_>>().join(", ")
            )?,
            Attr::Strs(v) => {
                s.push('[');
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        s.push_str(", ");
                    }
                    write_string_literal(&mut s, x)?;
                }
                s.push(']');
            }
            Attr::Tensor(t) => self.dense(&mut s, t)?,
            Attr::Type(t) => s.push_str(t.mlir_name()),
            Attr::Region(r) => write!(s, "#kiln.region<{r}>")?,
        }
        Ok(s)
    }

    fn dense(&self, s: &mut String, t: &Tensor) -> fmt::Result {
        let ty = TensorType::known(t.dtype(), &t.shape);
        if self.opts.elide_constants_over.is_some_and(|n| t.len() > n) {
            return write!(s, "dense_resource<__elided__> : {ty}");
        }
        // Large numeric tensors print as one hex blob of little-endian bytes (exact and compact);
        // low-precision types always do, one byte per element (their bit pattern, as MLIR
        // stores sub-byte and float8 elements).
        let lowp = t.data.patterns().is_some() && !t.is_empty();
        if lowp || (t.len() > 16 && !matches!(t.dtype(), DType::Bool | DType::String)) {
            s.push_str("dense<\"0x");
            let raw = t.data.to_le_bytes();
            for b in raw {
                write!(s, "{b:02X}")?;
            }
            return write!(s, "\"> : {ty}");
        }
        let elems: Vec<String> = match &t.data {
            Data::Str(v) => v
                .iter()
                .map(|x| {
                    let mut e = String::new();
                    let _ = write_string_literal(&mut e, x);
                    e
                })
                .collect(),
            Data::Bool(v) => v.iter().map(|&b| if b { "true" } else { "false" }.to_string()).collect(),
            _ if t.dtype().is_float() => t.to_f64().into_iter().map(|x| format_float(x, t.dtype())).collect(),
            Data::U64(v) => v.iter().map(|x| x.to_string()).collect(),
            _ => t.to_i64().into_iter().map(|x| x.to_string()).collect(),
        };
        s.push_str("dense<");
        if t.rank() == 0 {
            s.push_str(&elems[0]);
        } else {
            nested(s, &t.shape, &elems);
        }
        write!(s, "> : {ty}")
    }
}

/// Writes `elems` as nested lists following `shape` (`[[1, 2], [3, 4]]`).
fn nested(s: &mut String, shape: &[usize], elems: &[String]) {
    s.push('[');
    if shape.len() == 1 {
        s.push_str(&elems.join(", "));
    } else {
        let inner: usize = shape[1..].iter().product();
        for i in 0..shape[0] {
            if i > 0 {
                s.push_str(", ");
            }
            nested(s, &shape[1..], &elems[i * inner..(i + 1) * inner]);
        }
    }
    s.push(']');
}

fn name_dict(name: Option<&str>) -> String {
    match name {
        Some(n) => {
            let mut s = String::from("{kiln.name = ");
            let _ = write_string_literal(&mut s, n);
            s.push('}');
            s
        }
        None => "{}".into(),
    }
}
