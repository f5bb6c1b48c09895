//! Low-precision element formats: the float8 family, float4 (E2M1), the power-of-two scale
//! E8M0, and 4-bit / 2-bit integers.
//!
//! kiln stores each element in one byte: the bit pattern for the float formats (low bits for
//! float4), the value itself (sign-extended) for the small integers. Conversions follow ONNX's
//! reference (numpy + `ml_dtypes`): round to nearest, ties to even; a non-saturating cast maps
//! overflow to infinity where the format has one, else to NaN (float4, having neither, clamps);
//! a saturating cast clamps finite and infinite values to the largest finite value. The FNUZ
//! formats have a single NaN (0x80) and no negative zero.

use crate::types::DType;
use std::cmp::Ordering;

/// One element of the low-precision type whose ONNX code is `K`: its bit pattern, in the low
/// bits of the byte (two's complement for the signed integers). Equality is bitwise; ordering
/// compares values (NaN is unordered).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Lowp<const K: u8>(pub u8);

pub type F8E4M3FN = Lowp<17>;
pub type F8E4M3FNUZ = Lowp<18>;
pub type F8E5M2 = Lowp<19>;
pub type F8E5M2FNUZ = Lowp<20>;
pub type U4 = Lowp<21>;
pub type I4 = Lowp<22>;
pub type F4E2M1 = Lowp<23>;
pub type F8E8M0 = Lowp<24>;
pub type U2 = Lowp<25>;
pub type I2 = Lowp<26>;

impl<const K: u8> Lowp<K> {
    /// The element type.
    pub fn dtype() -> DType {
        DType::from_onnx_code(K as i64).unwrap_or(DType::U8)
    }

    /// An element from a bit pattern (bits above the type's width are dropped).
    pub fn from_bits(b: u8) -> Self {
        Lowp(b & mask(K))
    }

    /// The element's value (exact).
    pub fn to_f64(self) -> f64 {
        pattern_to_f64(Self::dtype(), self.0)
    }

    /// The element's value as an integer (floats truncate toward zero, NaN gives 0).
    pub fn to_i64(self) -> i64 {
        match Self::dtype().small_int() {
            Some(si) => si.wrap(self.0 as i64),
            None => self.to_f64() as i64,
        }
    }

    /// The lowest value (-Inf or the most negative one).
    pub const LOWEST: Self = Lowp(extreme_pattern(K, false));
    /// The highest value (+Inf or the largest one).
    pub const HIGHEST: Self = Lowp(extreme_pattern(K, true));
}

impl<const K: u8> PartialOrd for Lowp<K> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        self.to_f64().partial_cmp(&other.to_f64())
    }
}

/// Bits used by elements of the type with ONNX code `k`.
const fn mask(k: u8) -> u8 {
    match k {
        21..=23 => 0xF,
        25 | 26 => 0x3,
        _ => 0xFF,
    }
}

/// The pattern of the lowest (`high` false) or highest value of the type with ONNX code `k`.
const fn extreme_pattern(k: u8, high: bool) -> u8 {
    match (k, high) {
        (17, false) => 0xFE,
        (17, true) => 0x7E,
        (18 | 20, false) => 0xFF,
        (18 | 20, true) => 0x7F,
        (19, false) => 0xFC,
        (19, true) => 0x7C,
        (21, false) => 0,
        (21, true) => 0xF,
        (22, false) => 0x8,
        (22, true) => 0x7,
        (23, false) => 0xF,
        (23, true) => 0x7,
        (24, false) => 0,
        (24, true) => 0xFE,
        (25, false) => 0,
        (25, true) => 0x3,
        (26, false) => 0x2,
        (26, true) => 0x1,
        _ => 0,
    }
}

/// The value of bit pattern `b` of the low-precision type `t` (0 for other types).
pub fn pattern_to_f64(t: DType, b: u8) -> f64 {
    if let Some(f) = t.minifloat() {
        f.to_f64(b)
    } else if let Some(si) = t.small_int() {
        si.wrap(b as i64) as f64
    } else if t == DType::F8E8M0 {
        e8m0_to_f64(b)
    } else {
        0.0
    }
}

/// The pattern of the low-precision type `t` nearest to `x` (see [`Minifloat::from_f64`],
/// [`e8m0_from_f64`] and [`SmallInt::wrap_f64`]); 0 for other types.
pub fn pattern_from_f64(t: DType, x: f64, saturate: bool, round: E8M0Round) -> u8 {
    if let Some(f) = t.minifloat() {
        f.from_f64(x, saturate)
    } else if let Some(si) = t.small_int() {
        si.pattern(si.wrap_f64(x))
    } else if t == DType::F8E8M0 {
        e8m0_from_f64(x, saturate, round)
    } else {
        0
    }
}

/// How a float8 format encodes infinities and NaN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Special {
    /// IEEE-like: all-ones exponent is Inf (zero mantissa) or NaN.
    Ieee,
    /// "Finite": no Inf; all-ones exponent and mantissa is NaN.
    Fn,
    /// "Finite, unsigned zero": no Inf, no -0; 0x80 is the only NaN.
    Fnuz,
    /// No Inf, no NaN (float4 E2M1).
    None,
}

/// A sign/exponent/mantissa minifloat format (E8M0, which has no sign or mantissa, is separate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Minifloat {
    E4M3FN,
    E4M3FNUZ,
    E5M2,
    E5M2FNUZ,
    /// float4: one sign bit, two exponent bits, one mantissa bit, in the low nibble.
    E2M1,
}

impl Minifloat {
    /// (exponent bits, mantissa bits, bias, specials)
    fn params(self) -> (u32, u32, i32, Special) {
        match self {
            Minifloat::E4M3FN => (4, 3, 7, Special::Fn),
            Minifloat::E4M3FNUZ => (4, 3, 8, Special::Fnuz),
            Minifloat::E5M2 => (5, 2, 15, Special::Ieee),
            Minifloat::E5M2FNUZ => (5, 2, 16, Special::Fnuz),
            Minifloat::E2M1 => (2, 1, 1, Special::None),
        }
    }

    fn sign_bit(self) -> u8 {
        match self {
            Minifloat::E2M1 => 0x8,
            _ => 0x80,
        }
    }

    /// The magnitude bits of the largest finite value.
    fn max_code(self) -> u8 {
        match self {
            Minifloat::E4M3FN => 0x7E,
            Minifloat::E4M3FNUZ | Minifloat::E5M2FNUZ => 0x7F,
            Minifloat::E5M2 => 0x7B,
            Minifloat::E2M1 => 0x7,
        }
    }

    /// The largest finite value (448, 240, 57344, 57344, 6).
    pub fn max_finite(self) -> f64 {
        self.to_f64(self.max_code())
    }

    /// The value of bit pattern `b` (exact).
    pub fn to_f64(self, b: u8) -> f64 {
        let (eb, mb, bias, special) = self.params();
        let b = if self == Minifloat::E2M1 { b & 0xF } else { b };
        let neg = b & self.sign_bit() != 0;
        let mag = b & (self.sign_bit() - 1);
        let (e, m) = ((mag >> mb) as i32, (mag & ((1 << mb) - 1)) as i32);
        let emax = (1 << eb) - 1;
        match special {
            Special::Fnuz if b == 0x80 => return f64::NAN,
            Special::Fn if mag == 0x7F => return f64::NAN,
            Special::Ieee if e == emax => {
                let v = if m == 0 { f64::INFINITY } else { f64::NAN };
                return if neg { -v } else { v };
            }
            _ => {}
        }
        let v = if e == 0 {
            m as f64 * exp2i(1 - bias - mb as i32)
        } else {
            ((1 << mb) + m) as f64 * exp2i(e - bias - mb as i32)
        };
        if neg {
            -v
        } else {
            v
        }
    }

    /// The bit pattern nearest to `x` (ties to even). `saturate` clamps out-of-range values
    /// (and infinities) to the largest finite value; otherwise they become Inf or NaN.
    pub fn from_f64(self, x: f64, saturate: bool) -> u8 {
        let (_, mb, bias, special) = self.params();
        let sign = if x.is_sign_negative() { self.sign_bit() } else { 0 };
        if x.is_nan() {
            return match special {
                Special::Fn => 0x7F | sign,
                Special::Ieee => 0x7E | sign,
                Special::Fnuz => 0x80,
                // ml_dtypes turns NaN into float4's -0 (and -NaN into +0).
                Special::None => sign ^ 0x8,
            };
        }
        let max = self.max_finite();
        let mut a = x.abs();
        if saturate || special == Special::None {
            a = a.min(max);
        }
        if a.is_infinite() {
            return self.overflow(sign);
        }
        if a == 0.0 {
            return if special == Special::Fnuz { 0 } else { sign };
        }
        let min_exp = 1 - bias;
        let e = ((a.to_bits() >> 52) & 0x7FF) as i32 - 1023;
        let mut ex = e.max(min_exp);
        let q = ex - mb as i32;
        let mut n = (a * exp2i(-q)).round_ties_even() as u32;
        if n >= 2 << mb {
            n >>= 1;
            ex += 1;
        }
        let code = if n < 1 << mb { n } else { (((ex + bias) as u32) << mb) | (n - (1 << mb)) };
        if code > self.max_code() as u32 {
            return self.overflow(sign);
        }
        if code == 0 && special == Special::Fnuz {
            return 0;
        }
        code as u8 | sign
    }

    /// The pattern for a value too large for the format (non-saturating cast).
    fn overflow(self, sign: u8) -> u8 {
        match self.params().3 {
            Special::Ieee => 0x7C | sign,
            Special::Fn => 0x7F | sign,
            Special::Fnuz => 0x80,
            Special::None => self.max_code() | sign,
        }
    }
}

/// `2^k` for `-1022 <= k <= 1023` (exact).
fn exp2i(k: i32) -> f64 {
    f64::from_bits(((k.clamp(-1022, 1023) + 1023) as u64) << 52)
}

/// Rounding of a cast to float8 E8M0 (the `round_mode` attribute of Cast).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum E8M0Round {
    #[default]
    Up,
    Down,
    Nearest,
}

impl E8M0Round {
    pub fn parse(s: &str) -> Option<E8M0Round> {
        match s {
            "up" => Some(E8M0Round::Up),
            "down" => Some(E8M0Round::Down),
            "nearest" => Some(E8M0Round::Nearest),
            _ => None,
        }
    }
}

/// The value of an E8M0 pattern: `2^(b - 127)`, 0xFF is NaN.
pub fn e8m0_to_f64(b: u8) -> f64 {
    if b == 0xFF {
        f64::NAN
    } else {
        exp2i(b as i32 - 127)
    }
}

/// Converts to E8M0 the way ONNX's `to_float8e8m0` does: the value's float32 exponent,
/// rounded up/down/to nearest by its mantissa; the sign is dropped; NaN and Inf give 0xFF.
/// Saturation keeps the largest exponent (0xFE) from rounding into NaN.
pub fn e8m0_from_f64(x: f64, saturate: bool, mode: E8M0Round) -> u8 {
    let bits = (x as f32).to_bits();
    let exp = (bits >> 23) & 0xFF;
    if exp == 0xFF {
        return 0xFF;
    }
    let round_up = match mode {
        E8M0Round::Down => false,
        E8M0Round::Up => bits & 0x7F_FFFF != 0,
        E8M0Round::Nearest => {
            let g = bits & 0x40_0000 != 0;
            let r = bits & 0x20_0000 != 0;
            let s = bits & 0x1F_FFFF != 0;
            g && (r || s || exp > 0)
        }
    };
    if round_up && !(saturate && exp == 0xFE) {
        (exp + 1) as u8
    } else {
        exp as u8
    }
}

/// The width and signedness of a small integer type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmallInt {
    pub bits: u32,
    pub signed: bool,
}

impl SmallInt {
    pub const I4: SmallInt = SmallInt { bits: 4, signed: true };
    pub const U4: SmallInt = SmallInt { bits: 4, signed: false };
    pub const I2: SmallInt = SmallInt { bits: 2, signed: true };
    pub const U2: SmallInt = SmallInt { bits: 2, signed: false };

    /// Two's-complement wrap of `x` into the type (as a C cast to a narrow type does).
    pub fn wrap(self, x: i64) -> i64 {
        let low = x & ((1 << self.bits) - 1);
        if self.signed && low >= 1 << (self.bits - 1) {
            low - (1 << self.bits)
        } else {
            low
        }
    }

    /// A float converted as `ml_dtypes` does: truncated to int32 (out of range and NaN give
    /// int32's minimum, as x86 does), then wrapped.
    pub fn wrap_f64(self, x: f64) -> i64 {
        let t = x.trunc();
        let i = if (-2147483648.0..=2147483647.0).contains(&t) { t as i64 } else { i32::MIN as i64 };
        self.wrap(i)
    }

    /// The smallest and largest values (for saturating quantization).
    pub fn range(self) -> (i64, i64) {
        if self.signed {
            (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1)
        } else {
            (0, (1 << self.bits) - 1)
        }
    }

    /// The low `bits` of a stored value (its two's-complement pattern).
    pub fn pattern(self, x: i64) -> u8 {
        (x & ((1 << self.bits) - 1)) as u8
    }
}

/// Packs patterns of `bits` (4 or 2) low-bits-first into bytes (ONNX raw_data layout).
pub fn pack(patterns: &[u8], bits: u32) -> Vec<u8> {
    let per = (8 / bits) as usize;
    let mask = (1u8 << bits) - 1;
    patterns
        .chunks(per)
        .map(|c| c.iter().enumerate().fold(0u8, |acc, (i, &p)| acc | ((p & mask) << (i as u32 * bits))))
        .collect()
}

/// Unpacks `n` patterns of `bits` (4 or 2) from bytes, low bits first; `None` if too short.
pub fn unpack(bytes: &[u8], bits: u32, n: usize) -> Option<Vec<u8>> {
    let per = (8 / bits) as usize;
    if bytes.len() < n.div_ceil(per) {
        return None;
    }
    let mask = (1u8 << bits) - 1;
    Some((0..n).map(|i| (bytes[i / per] >> ((i % per) as u32 * bits)) & mask).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_known_patterns() {
        assert_eq!(Minifloat::E4M3FN.to_f64(0x38), 1.0);
        assert_eq!(Minifloat::E4M3FN.to_f64(0x7E), 448.0);
        assert!(Minifloat::E4M3FN.to_f64(0xFF).is_nan());
        assert_eq!(Minifloat::E4M3FN.to_f64(0x01), 2f64.powi(-9));
        assert_eq!(Minifloat::E4M3FNUZ.to_f64(0x7F), 240.0);
        assert!(Minifloat::E4M3FNUZ.to_f64(0x80).is_nan());
        assert_eq!(Minifloat::E5M2.to_f64(0x7C), f64::INFINITY);
        assert!(Minifloat::E5M2.to_f64(0x7E).is_nan());
        assert_eq!(Minifloat::E5M2.to_f64(0x7B), 57344.0);
        assert_eq!(Minifloat::E5M2FNUZ.to_f64(0x7F), 57344.0);
        assert_eq!(Minifloat::E2M1.to_f64(0x7), 6.0);
        assert_eq!(Minifloat::E2M1.to_f64(0x9), -0.5);
        assert_eq!(e8m0_to_f64(0x7F), 1.0);
        assert!(e8m0_to_f64(0xFF).is_nan());
    }

    #[test]
    fn encodes_like_ml_dtypes() {
        // Values and expected non-saturating patterns, checked against ml_dtypes 0.6.
        let xs = [0.0, -0.0, 1.0, 7.0, 100.0, f64::INFINITY, f64::NAN, 460.0, 464.0, 465.0, 248.0, 61440.0, -1e-9];
        let want: [(Minifloat, [u8; 13]); 5] = [
            (Minifloat::E4M3FN, [0, 0x80, 0x38, 0x4E, 0x6C, 0x7F, 0x7F, 0x7E, 0x7E, 0x7F, 0x78, 0x7F, 0x80]),
            (Minifloat::E4M3FNUZ, [0, 0, 0x40, 0x56, 0x74, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0]),
            (Minifloat::E5M2, [0, 0x80, 0x3C, 0x47, 0x56, 0x7C, 0x7E, 0x5F, 0x5F, 0x5F, 0x5C, 0x7C, 0x80]),
            (Minifloat::E5M2FNUZ, [0, 0, 0x40, 0x4B, 0x5A, 0x80, 0x80, 0x63, 0x63, 0x63, 0x60, 0x80, 0]),
            (Minifloat::E2M1, [0, 0x8, 0x2, 0x7, 0x7, 0x7, 0x8, 0x7, 0x7, 0x7, 0x7, 0x7, 0x8]),
        ];
        for (f, w) in want {
            let got: Vec<u8> = xs.iter().map(|&x| f.from_f64(x, false)).collect();
            assert_eq!(got, w, "{f:?}");
        }
        assert_eq!(Minifloat::E2M1.from_f64(0.25, false), 0);
        assert_eq!(Minifloat::E2M1.from_f64(0.26, false), 1);
        assert_eq!(Minifloat::E4M3FN.from_f64(1e6, true), 0x7E);
        assert_eq!(Minifloat::E5M2.from_f64(f64::NEG_INFINITY, true), 0xFB);
        assert!(Minifloat::E5M2FNUZ.to_f64(Minifloat::E5M2FNUZ.from_f64(f64::NAN, true)).is_nan());
    }

    #[test]
    fn every_pattern_round_trips() {
        for f in [Minifloat::E4M3FN, Minifloat::E4M3FNUZ, Minifloat::E5M2, Minifloat::E5M2FNUZ, Minifloat::E2M1] {
            let top = if f == Minifloat::E2M1 { 16 } else { 256 };
            for b in 0..top {
                let v = f.to_f64(b as u8);
                if !v.is_nan() {
                    assert_eq!(f.from_f64(v, false), b as u8, "{f:?} {b:#x}");
                }
            }
        }
    }

    #[test]
    fn e8m0_rounds_by_mode() {
        assert_eq!(e8m0_from_f64(0.0, true, E8M0Round::Up), 0);
        assert_eq!(e8m0_from_f64(1.1, true, E8M0Round::Up), 0x80);
        assert_eq!(e8m0_from_f64(1.1, true, E8M0Round::Down), 0x7F);
        assert_eq!(e8m0_from_f64(1.6, true, E8M0Round::Nearest), 0x80);
        assert_eq!(e8m0_from_f64(-4.0, true, E8M0Round::Up), 0x81);
        assert_eq!(e8m0_from_f64(f64::INFINITY, true, E8M0Round::Up), 0xFF);
        assert_eq!(e8m0_from_f64(3e38, true, E8M0Round::Up), 0xFE);
        assert_eq!(e8m0_from_f64(3e38, false, E8M0Round::Up), 0xFF);
    }

    #[test]
    fn dense_constants_print_and_parse() {
        // Element lists as mlir-opt prints them (hex for float8 specials), then kiln's hex form.
        let src = r#""builtin.module"() ({
  "func.func"() <{arg_attrs = [], function_type = () -> (tensor<3xf8E5M2>, tensor<3xi4>), res_attrs = [{}, {}], sym_name = "main"}> ({
  ^bb0():
    %0 = "graph.Constant"() {value = dense<[0x7C, -1.5, 0x7E]> : tensor<3xf8E5M2>} : () -> tensor<3xf8E5M2>
    %1 = "graph.Constant"() {value = dense<[-8, 7, -1]> : tensor<3xi4>} : () -> tensor<3xi4>
    "func.return"(%0, %1) : (tensor<3xf8E5M2>, tensor<3xi4>) -> ()
  }) : () -> ()
}) : () -> ()"#;
        let m = crate::parser::parse_module(src).expect("parses");
        let text = crate::printer::print_module(&m, Default::default());
        assert!(text.contains(r#"dense<"0x7CBE7E"> : tensor<3xf8E5M2>"#), "{text}");
        assert!(text.contains(r#"dense<"0x08070F"> : tensor<3xi4>"#), "{text}");
        let back = crate::parser::parse_module(&text).expect("parses back");
        assert_eq!(crate::printer::print_module(&back, Default::default()), text);
    }

    #[test]
    fn small_ints_wrap_and_pack() {
        assert_eq!(SmallInt::I4.wrap(-9), 7);
        assert_eq!(SmallInt::U4.wrap(-1), 15);
        assert_eq!(SmallInt::I2.wrap(2), -2);
        assert_eq!(SmallInt::U2.wrap(5), 1);
        assert_eq!(SmallInt::I4.wrap_f64(300.7), -4);
        assert_eq!(SmallInt::I4.wrap_f64(f64::NAN), 0);
        assert_eq!(SmallInt::I4.wrap_f64(2f64.powi(33) + 5.0), 0);
        assert_eq!(SmallInt::I2.range(), (-2, 1));
        assert_eq!(pack(&[1, 0xF, 3], 4), vec![0xF1, 0x03]);
        assert_eq!(unpack(&[0xF1, 0x03], 4, 3), Some(vec![1, 0xF, 3]));
        assert_eq!(pack(&[1, 2, 3, 0, 1], 2), vec![0b0011_1001, 1]);
        assert_eq!(unpack(&[0b0011_1001, 1], 2, 5), Some(vec![1, 2, 3, 0, 1]));
        assert_eq!(unpack(&[0], 2, 5), None);
    }
}
