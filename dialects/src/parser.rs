//! MLIR generic-syntax parser for what [`crate::printer`] writes (see its conventions).
//!
//! It reads a `builtin.module` with one `func.func @main` whose ops are in generic form.
//! Errors carry the line and column.

use crate::attr::{Attr, Attrs};
use crate::ir::{Block, Module, Region, ValueId};
use crate::tensor::{Data, Tensor, MAX_ELEMENTS};
use crate::types::{DType, Dim, TensorType};
use std::collections::HashMap;

/// A parse failure at a position.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{col}: {msg}")]
pub struct ParseError {
    pub line: usize,
    pub col: usize,
    pub msg: String,
}

/// Parses a module printed by [`crate::printer::print_module`].
pub fn parse_module(src: &str) -> Result<Module, ParseError> {
    let mut p = Parser { s: src.as_bytes(), pos: 0, m: Module::new("main"), names: HashMap::new() };
    p.module()?;
    Ok(p.m)
}

/// A value as the parser knows it: a real value or a `graph.none` placeholder.
#[derive(Clone, Copy)]
enum Slot {
    Value(ValueId),
    None,
}

struct Parser<'s> {
    s: &'s [u8],
    pos: usize,
    m: Module,
    names: HashMap<String, Slot>,
}

type PResult<T> = Result<T, ParseError>;

impl Parser<'_> {
    fn err<T>(&self, msg: impl Into<String>) -> PResult<T> {
        let before = &self.s[..self.pos.min(self.s.len())];
        let line = before.iter().filter(|&&c| c == b'\n').count() + 1;
        let col = self.pos - before.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1) + 1;
        Err(ParseError { line, col, msg: msg.into() })
    }

    fn ws(&mut self) {
        while self.pos < self.s.len() {
            let c = self.s[self.pos];
            if c.is_ascii_whitespace() {
                self.pos += 1;
            } else if self.s[self.pos..].starts_with(b"//") {
                while self.pos < self.s.len() && self.s[self.pos] != b'\n' {
                    self.pos += 1;
                }
            } else {
                break;
            }
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.pos).copied()
    }

    fn eat(&mut self, tok: &str) -> bool {
        self.ws();
        if self.s[self.pos..].starts_with(tok.as_bytes()) {
            self.pos += tok.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, tok: &str) -> PResult<()> {
        if self.eat(tok) {
            Ok(())
        } else {
            let found: String = String::from_utf8_lossy(&self.s[self.pos..(self.pos + 12).min(self.s.len())]).into();
            self.err(format!("expected '{tok}', found '{found}'"))
        }
    }

    fn ident(&mut self) -> PResult<String> {
        self.ws();
        let start = self.pos;
        while self.pos < self.s.len()
            && (self.s[self.pos].is_ascii_alphanumeric() || b"_$.".contains(&self.s[self.pos]))
        {
            self.pos += 1;
        }
        if start == self.pos {
            return self.err("expected an identifier");
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.pos]).into_owned())
    }

    fn string(&mut self) -> PResult<String> {
        self.ws();
        self.expect("\"")?;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.pos) else { return self.err("unterminated string") };
            self.pos += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&n) = self.s.get(self.pos) else { return self.err("unterminated string") };
                    match n {
                        b'"' | b'\\' => {
                            out.push(n);
                            self.pos += 1;
                        }
                        b'n' => {
                            out.push(b'\n');
                            self.pos += 1;
                        }
                        b't' => {
                            out.push(b'\t');
                            self.pos += 1;
                        }
                        _ => {
                            let hex = self.s.get(self.pos..self.pos + 2).and_then(|h| std::str::from_utf8(h).ok());
                            let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                                return self.err("bad escape in string");
                            };
                            out.push(b);
                            self.pos += 2;
                        }
                    }
                }
                _ => out.push(c),
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// A number token (integer, float, or hex), as text.
    fn number(&mut self) -> PResult<String> {
        self.ws();
        let start = self.pos;
        while self.pos < self.s.len()
            && (self.s[self.pos].is_ascii_alphanumeric() || b"+-.".contains(&self.s[self.pos]))
        {
            // A '-' or '+' only starts a number or follows an exponent.
            let c = self.s[self.pos];
            if (c == b'-' || c == b'+') && self.pos > start && !matches!(self.s[self.pos - 1], b'e' | b'E') {
                break;
            }
            self.pos += 1;
        }
        if start == self.pos {
            return self.err("expected a number");
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.pos]).into_owned())
    }

    fn int(&mut self) -> PResult<i64> {
        let t = self.number()?;
        match t.parse() {
            Ok(v) => Ok(v),
            Err(_) => self.err(format!("bad integer '{t}'")),
        }
    }

    fn float(&mut self, dtype: DType) -> PResult<f64> {
        let t = self.number()?;
        if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            let Ok(bits) = u64::from_str_radix(h, 16) else { return self.err(format!("bad hex float '{t}'")) };
            return Ok(match dtype {
                DType::F64 => f64::from_bits(bits),
                DType::F16 => half::f16::from_bits(bits as u16).to_f64(),
                DType::BF16 => half::bf16::from_bits(bits as u16).to_f64(),
                t if t.is_low_precision_float() => crate::lowp::pattern_to_f64(t, bits as u8),
                _ => f32::from_bits(bits as u32) as f64,
            });
        }
        match t.parse::<f64>() {
            Ok(v) => Ok(v),
            Err(_) => self.err(format!("bad float '{t}'")),
        }
    }

    fn module(&mut self) -> PResult<()> {
        self.expect("\"builtin.module\"")?;
        self.expect("(")?;
        self.expect(")")?;
        self.expect("(")?;
        self.expect("{")?;
        self.func()?;
        self.expect("}")?;
        self.expect(")")?;
        if self.peek() == Some(b'{') {
            self.m.attrs = self.attr_dict_raw()?;
        }
        self.expect(":")?;
        self.expect("(")?;
        self.expect(")")?;
        self.expect("->")?;
        self.expect("(")?;
        self.expect(")")?;
        if self.peek().is_some() {
            return self.err("unexpected text after the module");
        }
        Ok(())
    }

    fn func(&mut self) -> PResult<()> {
        self.expect("\"func.func\"")?;
        self.expect("(")?;
        self.expect(")")?;
        self.expect("<")?;
        let props = self.attr_dict_raw()?;
        self.expect(">")?;
        match props.get("sym_name") {
            Some(Attr::Str(n)) if n == "main" => {}
            _ => return self.err("expected func.func @main"),
        }
        let names_of = |k: &str| -> Vec<Option<String>> {
            match props.get(k) {
                Some(Attr::Strs(v)) => v.iter().map(|s| if s.is_empty() { None } else { Some(s.clone()) }).collect(),
                _ => vec![],
            }
        };
        let (arg_names, res_names) = (names_of("arg_attrs"), names_of("res_attrs"));
        self.expect("(")?;
        self.expect("{")?;
        let body = self.block("func.return")?;
        self.expect("}")?;
        self.expect(")")?;
        self.expect(":")?;
        self.expect("(")?;
        self.expect(")")?;
        self.expect("->")?;
        self.expect("(")?;
        self.expect(")")?;
        for (&v, n) in body.args.iter().zip(arg_names) {
            self.m.value_mut(v).name = n;
        }
        for (&v, n) in body.yields.iter().zip(res_names) {
            if n.is_some() {
                self.m.value_mut(v).name = n;
            }
        }
        self.m.body = body;
        Ok(())
    }

    fn value_name(&mut self) -> PResult<String> {
        self.ws();
        self.expect("%")?;
        Ok(format!("%{}", self.ident()?))
    }

    fn use_value(&mut self) -> PResult<Slot> {
        let n = self.value_name()?;
        match self.names.get(&n) {
            Some(s) => Ok(*s),
            None => self.err(format!("use of undefined value {n}")),
        }
    }

    fn block(&mut self, terminator: &str) -> PResult<Block> {
        let mut b = Block::default();
        if self.eat("^") {
            self.ident()?;
            self.expect("(")?;
            if !self.eat(")") {
                loop {
                    let n = self.value_name()?;
                    self.expect(":")?;
                    let ty = self.tensor_type()?;
                    let v = self.m.add_arg(ty, None);
                    self.names.insert(n, Slot::Value(v));
                    b.args.push(v);
                    if self.eat(")") {
                        break;
                    }
                    self.expect(",")?;
                }
            }
            self.expect(":")?;
        }
        loop {
            let term = format!("\"{terminator}\"");
            if self.eat(&term) {
                self.expect("(")?;
                if !self.eat(")") {
                    loop {
                        match self.use_value()? {
                            Slot::Value(v) => b.yields.push(v),
                            Slot::None => return self.err("a terminator cannot yield a none value"),
                        }
                        if self.eat(")") {
                            break;
                        }
                        self.expect(",")?;
                    }
                }
                self.expect(":")?;
                self.type_list_skip()?;
                self.expect("->")?;
                self.expect("(")?;
                self.expect(")")?;
                return Ok(b);
            }
            self.op(&mut b)?;
        }
    }

    /// Skips a parenthesized type list (the terminator's operand types).
    fn type_list_skip(&mut self) -> PResult<()> {
        self.expect("(")?;
        let mut depth = 1;
        while depth > 0 {
            let Some(&c) = self.s.get(self.pos) else { return self.err("unterminated type list") };
            self.pos += 1;
            match c {
                b'(' => depth += 1,
                b')' => depth -= 1,
                _ => {}
            }
        }
        Ok(())
    }

    fn op(&mut self, b: &mut Block) -> PResult<()> {
        let mut results = Vec::new();
        if self.peek() == Some(b'%') {
            loop {
                results.push(self.value_name()?);
                if self.eat("=") {
                    break;
                }
                self.expect(",")?;
            }
        }
        let name = self.string()?;
        self.expect("(")?;
        let mut operands = Vec::new();
        if !self.eat(")") {
            loop {
                operands.push(match self.use_value()? {
                    Slot::Value(v) => Some(v),
                    Slot::None => None,
                });
                if self.eat(")") {
                    break;
                }
                self.expect(",")?;
            }
        }
        if name == "graph.none" {
            self.expect(":")?;
            self.expect("(")?;
            self.expect(")")?;
            self.expect("->")?;
            self.expect("none")?;
            if results.len() != 1 {
                return self.err("graph.none has one result");
            }
            self.names.insert(results.remove(0), Slot::None);
            return Ok(());
        }
        let mut regions = Vec::new();
        if self.eat("(") {
            loop {
                self.expect("{")?;
                let blk = self.block("graph.yield")?;
                self.expect("}")?;
                regions.push(Region { blocks: vec![blk] });
                if self.eat(")") {
                    break;
                }
                self.expect(",")?;
            }
        }
        let mut attrs = if self.peek() == Some(b'{') { self.attr_dict_raw()? } else { Attrs::new() };
        self.expect(":")?;
        self.expect("(")?;
        if !self.eat(")") {
            loop {
                if !self.eat("none") {
                    self.tensor_type()?;
                }
                if self.eat(")") {
                    break;
                }
                self.expect(",")?;
            }
        }
        self.expect("->")?;
        let mut types = Vec::new();
        if self.eat("(") {
            if !self.eat(")") {
                loop {
                    types.push(self.tensor_type()?);
                    if self.eat(")") {
                        break;
                    }
                    self.expect(",")?;
                }
            }
        } else {
            types.push(self.tensor_type()?);
        }
        if types.len() != results.len() {
            return self.err(format!("{} results named, {} result types given", results.len(), types.len()));
        }
        let names = match attrs.remove("kiln.names") {
            Some(Attr::Strs(v)) => v,
            _ => vec![],
        };
        let id = self.m.create_op(&name, operands, types, attrs, regions);
        b.ops.push(id);
        let rs = self.m.op(id).results.clone();
        for (i, (n, v)) in results.into_iter().zip(rs).enumerate() {
            if self.names.insert(n.clone(), Slot::Value(v)).is_some() {
                return self.err(format!("value {n} is defined twice"));
            }
            if let Some(src) = names.get(i).filter(|s| !s.is_empty()) {
                self.m.value_mut(v).name = Some(src.clone());
            }
        }
        Ok(())
    }

    /// `{name = attr, ...}`; function arg/res attribute lists come back as string arrays of names.
    fn attr_dict_raw(&mut self) -> PResult<Attrs> {
        self.expect("{")?;
        let mut attrs = Attrs::new();
        if self.eat("}") {
            return Ok(attrs);
        }
        loop {
            let key = if self.peek() == Some(b'"') { self.string()? } else { self.ident()? };
            self.expect("=")?;
            let v = if key == "arg_attrs" || key == "res_attrs" {
                Some(self.name_dict_list()?)
            } else if key == "function_type" {
                // Derived from the body's arguments and terminator: not stored.
                self.skip_function_type()?;
                None
            } else {
                Some(self.attr()?)
            };
            if let Some(v) = v {
                attrs.insert(key, v);
            }
            if self.eat("}") {
                return Ok(attrs);
            }
            self.expect(",")?;
        }
    }

    fn skip_function_type(&mut self) -> PResult<()> {
        self.type_list_skip()?;
        self.expect("->")?;
        if self.peek() == Some(b'(') {
            self.type_list_skip()
        } else {
            self.tensor_type().map(|_| ())
        }
    }

    /// `[{kiln.name = "x"}, {}]` → names ("" where absent).
    fn name_dict_list(&mut self) -> PResult<Attr> {
        self.expect("[")?;
        let mut names = Vec::new();
        if self.eat("]") {
            return Ok(Attr::Strs(names));
        }
        loop {
            let d = self.attr_dict_raw()?;
            names.push(match d.get("kiln.name") {
                Some(Attr::Str(s)) => s.clone(),
                _ => String::new(),
            });
            if self.eat("]") {
                return Ok(Attr::Strs(names));
            }
            self.expect(",")?;
        }
    }

    fn attr(&mut self) -> PResult<Attr> {
        match self.peek() {
            Some(b'"') => Ok(Attr::Str(self.string()?)),
            Some(b'[') => {
                self.expect("[")?;
                let mut v = Vec::new();
                if !self.eat("]") {
                    loop {
                        v.push(self.string()?);
                        if self.eat("]") {
                            break;
                        }
                        self.expect(",")?;
                    }
                }
                Ok(Attr::Strs(v))
            }
            Some(b'#') => {
                self.expect("#kiln.region<")?;
                let r = self.int()?;
                self.expect(">")?;
                Ok(Attr::Region(r as u32))
            }
            _ => {
                if self.eat("array<") {
                    let elt = self.ident()?;
                    let mut ints = Vec::new();
                    let mut floats = Vec::new();
                    if self.eat(":") {
                        loop {
                            if elt == "f32" {
                                floats.push(self.float(DType::F32)? as f32);
                            } else {
                                ints.push(self.int()?);
                            }
                            if !self.eat(",") {
                                break;
                            }
                        }
                    }
                    self.expect(">")?;
                    return Ok(if elt == "f32" { Attr::Floats(floats) } else { Attr::Ints(ints) });
                }
                if self.eat("dense_resource<") {
                    return self.err("an elided constant (dense_resource) cannot be read back; print without elision");
                }
                if self.eat("dense<") {
                    return Ok(Attr::Tensor(self.dense()?));
                }
                // A number with a type, or a type attribute.
                let save = self.pos;
                if let Ok(ty) = self.element_type() {
                    return Ok(Attr::Type(ty));
                }
                self.pos = save;
                let num = self.number()?;
                self.expect(":")?;
                let ty = self.ident()?;
                let bad = |p: &Self| p.err::<Attr>(format!("bad {ty} literal '{num}'"));
                match ty.as_str() {
                    "i64" => num.parse().map(Attr::Int).or_else(|_| bad(self)),
                    "f32" => {
                        let v = if let Some(h) = num.strip_prefix("0x") {
                            u32::from_str_radix(h, 16).map(f32::from_bits).ok()
                        } else {
                            num.parse::<f64>().ok().map(|v| v as f32)
                        };
                        v.map(Attr::Float).map_or_else(|| bad(self), Ok)
                    }
                    _ => self.err(format!("unsupported attribute type '{ty}'")),
                }
            }
        }
    }

    fn element_type(&mut self) -> PResult<DType> {
        self.ws();
        let start = self.pos;
        if self.eat("!kiln.string") {
            return Ok(DType::String);
        }
        let id = self.ident()?;
        match DType::from_mlir_name(&id) {
            Some(t) => Ok(t),
            None => {
                self.pos = start;
                self.err(format!("unknown element type '{id}'"))
            }
        }
    }

    fn tensor_type(&mut self) -> PResult<TensorType> {
        self.expect("tensor<")?;
        let mut dims: Option<Vec<Option<u64>>> = Some(Vec::new());
        if self.eat("*x") {
            dims = None;
        } else {
            loop {
                self.ws();
                if self.eat("?x") {
                    dims.as_mut().expect("ranked").push(None);
                    continue;
                }
                let c = self.s.get(self.pos).copied();
                if c.is_some_and(|c| c.is_ascii_digit()) {
                    let start = self.pos;
                    while self.s.get(self.pos).is_some_and(|c| c.is_ascii_digit()) {
                        self.pos += 1;
                    }
                    let n: u64 = match std::str::from_utf8(&self.s[start..self.pos]).ok().and_then(|t| t.parse().ok()) {
                        Some(n) => n,
                        None => return self.err("bad dimension"),
                    };
                    if !self.eat("x") {
                        return self.err("expected 'x' after a dimension");
                    }
                    dims.as_mut().expect("ranked").push(Some(n));
                    continue;
                }
                break;
            }
        }
        let dtype = self.element_type()?;
        let mut syms = Vec::new();
        if self.eat(",") {
            self.expect("[")?;
            loop {
                syms.push(self.string()?);
                if self.eat("]") {
                    break;
                }
                self.expect(",")?;
            }
        }
        self.expect(">")?;
        let Some(dims) = dims else { return Ok(TensorType::unranked(dtype)) };
        let mut it = syms.into_iter();
        let mut shape = Vec::with_capacity(dims.len());
        for d in dims {
            shape.push(match d {
                Some(n) => Dim::Known(n),
                None => match it.next() {
                    Some(s) => Dim::sym(&s),
                    None => return self.err("a '?' dimension has no name in the type's encoding"),
                },
            });
        }
        Ok(TensorType::new(dtype, shape))
    }

    /// After `dense<`: a hex blob, a scalar, or nested lists; then `> : tensor<...>`.
    fn dense(&mut self) -> PResult<Tensor> {
        self.ws();
        let body_start = self.pos;
        // Find the matching '>' of `dense<` (strings may hold '>').
        let mut depth = 1;
        let mut in_str = false;
        while depth > 0 {
            let Some(&c) = self.s.get(self.pos) else { return self.err("unterminated dense<...>") };
            self.pos += 1;
            match c {
                b'\\' if in_str => self.pos += 1,
                b'"' => in_str = !in_str,
                b'<' if !in_str => depth += 1,
                b'>' if !in_str => depth -= 1,
                _ => {}
            }
        }
        let body_end = self.pos - 1;
        self.expect(":")?;
        let ty = self.tensor_type()?;
        let Some(shape) = ty.static_shape() else { return self.err("a dense constant needs a static shape") };
        let n: u128 = shape.iter().map(|&d| d as u128).product();
        if n > MAX_ELEMENTS {
            return self.err("constant too large");
        }
        let n = n as usize;
        let after = self.pos;
        self.pos = body_start;
        let t = if self.eat("\"0x") {
            let start = self.pos;
            let end = body_end - 1;
            let hex = &self.s[start..end];
            let bytes: Option<Vec<u8>> = hex
                .chunks(2)
                .map(|c| std::str::from_utf8(c).ok().and_then(|h| u8::from_str_radix(h, 16).ok()))
                .collect();
            let Some(bytes) = bytes else { return self.err("bad hex in dense<\"0x...\">") };
            let size = ty.dtype.size_bytes();
            if bytes.len() != n * size {
                return self.err(format!("hex constant has {} bytes, its type needs {}", bytes.len(), n * size));
            }
            match Data::from_le_bytes(ty.dtype, &bytes) {
                Some(data) => Tensor::new(shape.clone(), data),
                None => return self.err(format!("a hex constant cannot hold {} elements", ty.dtype)),
            }
        } else {
            let mut elems = Vec::new();
            self.dense_elems(ty.dtype, body_end, &mut elems)?;
            if elems.len() == 1 && n != 1 {
                elems = vec![elems[0].clone(); n];
            }
            if elems.len() != n {
                return self.err(format!("dense constant has {} elements, its type needs {n}", elems.len()));
            }
            build(ty.dtype, &shape, elems)
        };
        self.pos = after;
        Ok(t)
    }

    fn dense_elems(&mut self, dtype: DType, end: usize, out: &mut Vec<Elem>) -> PResult<()> {
        while self.pos < end {
            match self.peek() {
                Some(b'[') | Some(b']') | Some(b',') => self.pos += 1,
                Some(b'"') => out.push(Elem::S(self.string()?)),
                _ if self.pos >= end => break,
                _ => {
                    if self.eat("true") {
                        out.push(Elem::I(1));
                    } else if self.eat("false") {
                        out.push(Elem::I(0));
                    } else if dtype.is_float() {
                        out.push(Elem::F(self.float(dtype)?));
                    } else if dtype == DType::U64 {
                        let t = self.number()?;
                        match t.parse::<u64>() {
                            Ok(v) => out.push(Elem::U(v)),
                            Err(_) => return self.err(format!("bad integer '{t}'")),
                        }
                    } else {
                        out.push(Elem::I(self.int()?));
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone)]
enum Elem {
    I(i64),
    U(u64),
    F(f64),
    S(String),
}

impl Elem {
    /// The element as a number, converted as a C cast would (strings, which only string
    /// tensors hold, count as 0).
    fn num<T: Default>(&self, i: fn(i64) -> T, u: fn(u64) -> T, f: fn(f64) -> T) -> T {
        match *self {
            Elem::I(v) => i(v),
            Elem::U(v) => u(v),
            Elem::F(v) => f(v),
            Elem::S(_) => T::default(),
        }
    }
}

fn build(dtype: DType, shape: &[usize], elems: Vec<Elem>) -> Tensor {
    match dtype {
        DType::String => Tensor::new(
            shape.to_vec(),
            Data::Str(elems.into_iter().map(|e| if let Elem::S(s) = e { s } else { String::new() }).collect()),
        ),
        DType::U64 => Tensor::new(
            shape.to_vec(),
            Data::U64(elems.iter().map(|e| e.num(|v| v as u64, |v| v, |v| v as u64)).collect()),
        ),
        // Not saturating: the values are exact, and float8 infinities must stay infinite.
        t if t.is_float() => Tensor::from_f64_with(
            t,
            shape,
            elems.iter().map(|e| e.num(|v| v as f64, |v| v as f64, |v| v)).collect(),
            false,
            crate::lowp::E8M0Round::Up,
        ),
        t => Tensor::from_i64_as(t, shape, elems.iter().map(|e| e.num(|v| v, |v| v as i64, |v| v as i64)).collect()),
    }
}
