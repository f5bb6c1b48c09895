//! The parser of the kernel dialect's text form: what `Kernel`'s `Display` prints (and
//! `kiln compile --emit kernel` shows) reads back into the same [`Kernel`], so kernels can be
//! written by hand, kept in test files and edited between stages.
//!
//! A buffer's `operands` entry (which operand of the graph op it binds) is not printed: a
//! buffer named `in<k>` (the lowering's names) binds operand `k`, any other input buffer its
//! position.

use crate::kernel::{BinOp, Buffer, Idx, Kernel, Knobs, Level, Local, Mma, RedOp, Stmt, UnOp, Val};
use crate::types::{DType, Dim};

/// Why kernel text did not parse: the line (1-based) and what was expected there.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("kernel text line {line}: {msg}")]
pub struct KernelParseError {
    pub line: usize,
    pub msg: String,
}

/// Parses one kernel.
pub fn parse_kernel(text: &str) -> Result<Kernel, KernelParseError> {
    let mut ks = parse_kernels(text)?;
    match ks.len() {
        1 => Ok(ks.remove(0)),
        n => Err(KernelParseError { line: 1, msg: format!("expected one kernel, found {n}") }),
    }
}

/// Parses every kernel of `text` (as `--emit kernel` prints them; `//` comment lines, such as
/// the notes on kernels left to the host, are skipped).
pub fn parse_kernels(text: &str) -> Result<Vec<Kernel>, KernelParseError> {
    let mut p = Parser { s: text.as_bytes(), pos: 0 };
    let mut out = Vec::new();
    loop {
        p.ws();
        if p.pos >= p.s.len() {
            return Ok(out);
        }
        out.push(p.kernel()?);
    }
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

type R<T> = Result<T, KernelParseError>;

const UN_OPS: [(&str, UnOp); 12] = [
    ("neg", UnOp::Neg),
    ("abs", UnOp::Abs),
    ("exp", UnOp::Exp),
    ("log", UnOp::Log),
    ("sqrt", UnOp::Sqrt),
    ("tanh", UnOp::Tanh),
    ("erf", UnOp::Erf),
    ("floor", UnOp::Floor),
    ("ceil", UnOp::Ceil),
    ("recip", UnOp::Recip),
    ("relu", UnOp::Relu),
    ("sigmoid", UnOp::Sigmoid),
];

const BIN_OPS: [(&str, BinOp); 7] = [
    ("add", BinOp::Add),
    ("sub", BinOp::Sub),
    ("mul", BinOp::Mul),
    ("div", BinOp::Div),
    ("max", BinOp::Max),
    ("min", BinOp::Min),
    ("pow", BinOp::Pow),
];

impl Parser<'_> {
    fn line(&self) -> usize {
        1 + self.s[..self.pos.min(self.s.len())].iter().filter(|&&c| c == b'\n').count()
    }

    fn err<T>(&self, msg: impl Into<String>) -> R<T> {
        let rest: String = String::from_utf8_lossy(&self.s[self.pos.min(self.s.len())..]).chars().take(24).collect();
        Err(KernelParseError { line: self.line(), msg: format!("{} (at '{rest}')", msg.into()) })
    }

    /// Skips blanks and `//` comments.
    fn ws(&mut self) {
        loop {
            while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
                self.pos += 1;
            }
            if self.s[self.pos..].starts_with(b"//") {
                while self.pos < self.s.len() && self.s[self.pos] != b'\n' {
                    self.pos += 1;
                }
            } else {
                return;
            }
        }
    }

    fn peek(&mut self, tok: &str) -> bool {
        self.ws();
        self.s[self.pos..].starts_with(tok.as_bytes())
    }

    fn eat(&mut self, tok: &str) -> bool {
        if self.peek(tok) {
            self.pos += tok.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, tok: &str) -> R<()> {
        if self.eat(tok) {
            Ok(())
        } else {
            self.err(format!("expected '{tok}'"))
        }
    }

    /// A name: letters, digits, `_`, `.`, `-` (kernel and buffer names, symbols).
    fn word(&mut self) -> R<String> {
        self.ws();
        let start = self.pos;
        while self.pos < self.s.len()
            && (self.s[self.pos].is_ascii_alphanumeric() || b"_.-".contains(&self.s[self.pos]))
        {
            self.pos += 1;
        }
        if start == self.pos {
            return self.err("expected a name");
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.pos]).into_owned())
    }

    fn int(&mut self) -> R<i64> {
        self.ws();
        let start = self.pos;
        if self.pos < self.s.len() && self.s[self.pos] == b'-' {
            self.pos += 1;
        }
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_digit() {
            self.pos += 1;
        }
        match std::str::from_utf8(&self.s[start..self.pos]).ok().and_then(|t| t.parse().ok()) {
            Some(n) => Ok(n),
            None => {
                self.pos = start;
                self.err("expected an integer")
            }
        }
    }

    fn usize(&mut self) -> R<usize> {
        let n = self.int()?;
        usize::try_from(n).or_else(|_| self.err("expected a non-negative integer"))
    }

    /// A quoted string (no escapes: names never hold quotes).
    fn string(&mut self) -> R<String> {
        self.expect("\"")?;
        let start = self.pos;
        while self.pos < self.s.len() && self.s[self.pos] != b'"' {
            self.pos += 1;
        }
        let s = String::from_utf8_lossy(&self.s[start..self.pos]).into_owned();
        self.expect("\"")?;
        Ok(s)
    }

    /// `%N` (a buffer).
    fn buf(&mut self) -> R<usize> {
        self.expect("%")?;
        self.usize()
    }

    /// `iN` (a loop variable).
    fn var(&mut self) -> R<usize> {
        self.expect("i")?;
        self.usize()
    }

    fn kernel(&mut self) -> R<Kernel> {
        self.expect("kernel.kernel")?;
        self.expect("@")?;
        let name = self.word()?;
        self.expect("(")?;
        let (mut buffers, mut inputs, mut operands) = (Vec::new(), 0, Vec::new());
        let mut outputs_seen = false;
        while !self.eat(")") {
            if !buffers.is_empty() {
                self.expect(",")?;
            }
            if self.buf()? != buffers.len() {
                return self.err("buffers must be numbered %0, %1, ... in order");
            }
            self.expect(":")?;
            let io = self.word()?;
            let (dtype, shape) = self.shape()?;
            let level = match self.word()?.as_str() {
                "Global" => Level::Global,
                "Local" => Level::Local,
                "Register" => Level::Register,
                other => return self.err(format!("unknown level '{other}'")),
            };
            let bname = self.string()?;
            match io.as_str() {
                "in" if !outputs_seen => {
                    let op = bname.strip_prefix("in").and_then(|k| k.parse().ok()).unwrap_or(inputs);
                    operands.push(op);
                    inputs += 1;
                }
                "in" => return self.err("inputs come before outputs"),
                "out" => outputs_seen = true,
                other => return self.err(format!("expected 'in' or 'out', found '{other}'")),
            }
            buffers.push(Buffer { name: bname, dtype, shape, level });
        }
        self.expect("{")?;
        self.expect("vector_width")?;
        self.expect("=")?;
        let vector_width = self.usize()? as u32;
        self.expect(",")?;
        self.expect("unroll")?;
        self.expect("=")?;
        let unroll = self.usize()? as u32;
        self.expect("}")?;
        self.expect("{")?;
        let mut locals = Vec::new();
        while self.peek("%") && self.local_ahead() {
            if self.buf()? != buffers.len() + locals.len() {
                return self.err("locals are numbered after the buffers, in order");
            }
            self.expect("=")?;
            self.expect("kernel.local")?;
            self.expect("float")?;
            self.expect("[")?;
            let size = self.idx_list("]")?;
            self.expect("Local")?;
            let lname = self.string()?;
            locals.push(Local { name: lname, size });
        }
        let body = self.stmts()?;
        Ok(Kernel { name, buffers, inputs, operands, locals, body, knobs: Knobs { vector_width, unroll } })
    }

    /// Whether the statement ahead declares a local (`%N = kernel.local`).
    fn local_ahead(&mut self) -> bool {
        let save = self.pos;
        let yes = self.buf().is_ok() && self.eat("=") && self.peek("kernel.local");
        self.pos = save;
        yes
    }

    /// `dtype[d, ...]`.
    fn shape(&mut self) -> R<(DType, Vec<Dim>)> {
        let t = self.word()?;
        let Some(dtype) = DType::ALL.into_iter().find(|d| d.onnx_name() == t) else {
            return self.err(format!("unknown element type '{t}'"));
        };
        self.expect("[")?;
        let mut dims = Vec::new();
        while !self.eat("]") {
            if !dims.is_empty() {
                self.expect(",")?;
            }
            self.ws();
            if self.pos < self.s.len() && self.s[self.pos].is_ascii_digit() {
                dims.push(Dim::Known(self.usize()? as u64));
            } else {
                dims.push(Dim::sym(&self.word()?));
            }
        }
        Ok((dtype, dims))
    }

    /// Statements up to the closing `}` (consumed).
    fn stmts(&mut self) -> R<Vec<Stmt>> {
        let mut body = Vec::new();
        while !self.eat("}") {
            if self.pos >= self.s.len() {
                return self.err("unterminated block: expected '}'");
            }
            body.push(self.stmt()?);
        }
        Ok(body)
    }

    fn stmt(&mut self) -> R<Stmt> {
        if self.eat("kernel.for") {
            let parallel = self.eat(".parallel");
            let var = self.var()?;
            self.expect("in")?;
            self.expect("0..")?;
            let extent = self.idx()?;
            self.expect("{")?;
            let body = self.stmts()?;
            return Ok(Stmt::For { var, extent, parallel, body });
        }
        if self.eat("kernel.mma") {
            return self.mma().map(|m| Stmt::Mma(Box::new(m)));
        }
        if self.eat("%s") {
            let slot = self.usize()?;
            self.expect("=")?;
            return Ok(Stmt::Let { slot, value: self.val()? });
        }
        let buf = self.buf()?;
        self.expect("[")?;
        let index = self.idx_list("]")?;
        self.expect("=")?;
        Ok(Stmt::Store { buf, index, value: self.val()? })
    }

    fn mma(&mut self) -> R<Mma> {
        self.expect("{")?;
        let field = |p: &mut Self, name: &str| -> R<()> {
            p.expect(name)?;
            p.expect("=")
        };
        field(self, "rows")?;
        let rows = self.usize()?;
        self.expect(",")?;
        field(self, "cols")?;
        let cols = self.usize()?;
        self.expect(",")?;
        field(self, "lanes")?;
        let lanes = self.usize()?;
        self.expect(",")?;
        field(self, "valid")?;
        let valid = self.idx()?;
        self.expect("}")?;
        let row = self.var()?;
        self.expect("over")?;
        self.expect("(")?;
        let mut red = Vec::new();
        while !self.eat(")") {
            if !red.is_empty() {
                self.expect(",")?;
            }
            let v = self.var()?;
            self.expect("in")?;
            self.expect("0..")?;
            red.push((v, self.idx()?));
        }
        self.expect(":")?;
        let cb = self.buf()?;
        self.expect("[")?;
        let ci = self.idx_list("]")?;
        self.expect("(+j·")?;
        let c_col = self.idx()?;
        self.expect(")")?;
        self.expect("+=")?;
        let a = self.val()?;
        self.expect("*")?;
        let bb = self.buf()?;
        self.expect("[")?;
        let bi = self.idx_list("]")?;
        self.expect("(+j)")?;
        Ok(Mma { rows, cols, lanes, valid, row, red, a, b: (bb, bi), c: (cb, ci), c_col })
    }

    /// Index expressions separated by commas, up to `close` (consumed).
    fn idx_list(&mut self, close: &str) -> R<Vec<Idx>> {
        let mut v = Vec::new();
        while !self.eat(close) {
            if !v.is_empty() {
                self.expect(",")?;
            }
            v.push(self.idx()?);
        }
        Ok(v)
    }

    fn idx(&mut self) -> R<Idx> {
        let b = Box::new;
        if self.eat("dim(") {
            let buf = self.buf()?;
            self.expect(",")?;
            let axis = self.usize()?;
            self.expect(")")?;
            return Ok(Idx::Dim { buf, axis });
        }
        for (name, min) in [("min(", true), ("max(", false)] {
            if self.eat(name) {
                let x = self.idx()?;
                self.expect(",")?;
                let y = self.idx()?;
                self.expect(")")?;
                return Ok(if min { Idx::Min(b(x), b(y)) } else { Idx::Max(b(x), b(y)) });
            }
        }
        if self.eat("(") {
            let x = self.idx()?;
            self.ws();
            let e = if self.eat("==") {
                // (a == 1 ? 0 : b)
                self.expect("1")?;
                self.expect("?")?;
                self.expect("0")?;
                self.expect(":")?;
                Idx::ZeroIfOne(b(x), b(self.idx()?))
            } else {
                let op = match self.s.get(self.pos).copied() {
                    Some(c @ (b'+' | b'-' | b'*' | b'/' | b'%')) => c,
                    _ => return self.err("expected an index operator (+ - * / %)"),
                };
                self.pos += 1;
                let y = self.idx()?;
                match op {
                    b'+' => Idx::Add(b(x), b(y)),
                    b'-' => Idx::Sub(b(x), b(y)),
                    b'*' => Idx::Mul(b(x), b(y)),
                    b'/' => Idx::Div(b(x), b(y)),
                    _ => Idx::Rem(b(x), b(y)),
                }
            };
            self.expect(")")?;
            return Ok(e);
        }
        if self.peek("i") {
            return self.var().map(Idx::Var);
        }
        self.int().map(Idx::Const)
    }

    fn val(&mut self) -> R<Val> {
        let b = Box::new;
        if self.eat("%s") {
            return self.usize().map(Val::Scalar);
        }
        if self.peek("%") {
            let buf = self.buf()?;
            self.expect("[")?;
            return Ok(Val::Load { buf, index: self.idx_list("]")? });
        }
        if self.eat("reduce.") {
            let op = match self.word()?.as_str() {
                "sum" => RedOp::Sum,
                "max" => RedOp::Max,
                "min" => RedOp::Min,
                other => return self.err(format!("unknown reduction '{other}'")),
            };
            self.expect("(")?;
            let var = self.var()?;
            self.expect("in")?;
            self.expect("0..")?;
            let extent = self.idx()?;
            self.expect(":")?;
            let body = b(self.val()?);
            self.expect(")")?;
            return Ok(Val::Reduce { op, var, extent, body });
        }
        if self.eat("float(") {
            let i = self.idx()?;
            self.expect(")")?;
            return Ok(Val::FromIdx(i));
        }
        if self.eat("select(") {
            let lhs = self.idx()?;
            self.expect("<")?;
            let rhs = self.idx()?;
            self.expect(",")?;
            let then = b(self.val()?);
            self.expect(",")?;
            let other = b(self.val()?);
            self.expect(")")?;
            return Ok(Val::Select { lhs, rhs, then, other });
        }
        if self.eat("where(") {
            let cond = b(self.val()?);
            self.expect(",")?;
            let then = b(self.val()?);
            self.expect(",")?;
            let other = b(self.val()?);
            self.expect(")")?;
            return Ok(Val::Where { cond, then, other });
        }
        if self.eat("(") {
            // (lhs < rhs ? then : other)
            let lhs = self.idx()?;
            self.expect("<")?;
            let rhs = self.idx()?;
            self.expect("?")?;
            let then = b(self.val()?);
            self.expect(":")?;
            let other = b(self.val()?);
            self.expect(")")?;
            return Ok(Val::IfLess { lhs, rhs, then, other });
        }
        for (name, op) in UN_OPS {
            if self.peek(name) && self.s[self.pos + name.len()..].starts_with(b"(") {
                self.pos += name.len() + 1;
                let x = self.val()?;
                self.expect(")")?;
                return Ok(Val::Un(op, b(x)));
            }
        }
        for (name, op) in BIN_OPS {
            if self.peek(name) && self.s[self.pos + name.len()..].starts_with(b"(") {
                self.pos += name.len() + 1;
                let x = self.val()?;
                self.expect(",")?;
                let y = self.val()?;
                self.expect(")")?;
                return Ok(Val::Bin(op, b(x), b(y)));
            }
        }
        self.number().map(Val::Const)
    }

    /// A float as Rust prints it with `{:e}` (`1.25e-1`, `-inf`, `NaN`).
    fn number(&mut self) -> R<f64> {
        self.ws();
        let start = self.pos;
        while self.pos < self.s.len()
            && (self.s[self.pos].is_ascii_alphanumeric() || b"+-.".contains(&self.s[self.pos]))
        {
            self.pos += 1;
        }
        let t = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
        match t.parse::<f64>() {
            Ok(v) => Ok(v),
            Err(_) => {
                self.pos = start;
                self.err("expected a value")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel using every form of the text (locals, Mma, reductions, selects, masks).
    const SAMPLE: &str = "kernel.kernel @k0_fused(%0: in float[B, 4] Global \"in0\", %1: in bool[4] Global \"in2\", \
%2: out float[B, 4] Global \"out0\") {vector_width = 1, unroll = 1} {
  %3 = kernel.local float[8, (dim(%0, 0) + 1)] Local \"panel\"
  kernel.for.parallel i0 in 0..dim(%2, 0) {
    %s0 = max(reduce.max(i64 in 0..4: %0[i0, i64]), -3.4028234663852886e38)
    %s1 = recip(reduce.sum(i65 in 0..min(4, (dim(%0, 1) - -2)): exp(sub(%0[i0, i65], %s0))))
    kernel.for i1 in 0..((4 / 2) % 3) {
      %2[i0, i1] = where(%1[i1], (i1 < 2 ? float((dim(%0, 0) == 1 ? 0 : i0)) : NaN), select(i1 < max(i0, 1), -inf, 1.5e0))
      %3[i1, 0] = pow(%2[i0, i1], inf)
    }
    kernel.mma {rows = 2, cols = 32, lanes = 16, valid = (4 * 1)} i63 over (i1 in 0..4, i2 in 0..2): \
%2[(i0 + i63), 0] (+j·1) += mul(%0[i63, i1], %s1) * %3[i1, i2] (+j)
  }
}
";

    #[test]
    fn every_form_reads_back() {
        let k = parse_kernel(SAMPLE).unwrap();
        assert_eq!(k.operands, vec![0, 2]);
        assert_eq!(k.buffers[1].dtype, DType::Bool);
        // (Compared as text: the sample holds a NaN, which equals nothing.)
        let again = parse_kernel(&k.to_string()).unwrap();
        assert_eq!(again.to_string(), k.to_string());
    }

    #[test]
    fn damaged_text_errs_without_panicking() {
        let bytes = SAMPLE.as_bytes();
        for cut in 0..bytes.len() {
            let _ = parse_kernels(&String::from_utf8_lossy(&bytes[..cut]));
        }
        for at in 0..bytes.len() {
            for c in [b'(', b')', b'%', b'-', b' ', b'9', b'i', b'{', b'}', b'\n', b',', b'#'] {
                let mut b = bytes.to_vec();
                b[at] = c;
                let _ = parse_kernels(&String::from_utf8_lossy(&b));
            }
        }
    }

    #[test]
    fn bad_text_names_the_line() {
        let e = parse_kernel("kernel.kernel @k(%0: in float[4] Global \"in0\") {vector_width = 1, unroll = 1} {\n  %0[i0] = frob(1)\n}\n")
            .unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        for bad in [
            "",
            "kernel.kernel",
            "kernel.kernel @k(%0: in float[4 Global",
            "kernel.kernel @k() {",
            "%%%",
            "kernel.kernel @k(%1: in float[4] Global \"x\")",
        ] {
            assert!(parse_kernels(bad).is_err() || bad.is_empty(), "{bad}");
        }
    }
}
