//! Scalar f32 math shared by the simulator's vector unit and the kernel-dialect evaluator, so
//! that both round the same way.

use crate::isa::{VBinOp, VUnOp};

/// `max` that propagates NaN (IEEE `maximum`, as `arith.maximumf`).
pub fn fmax(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// `min` that propagates NaN.
pub fn fmin(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.min(b)
    }
}

/// The error function in f32 (Taylor series near 0, Numerical Recipes' `erfcc` fit elsewhere;
/// the same fits as the reference interpreter).
pub fn erf(x: f32) -> f32 {
    let z = x.abs();
    if z < 0.5 {
        let x2 = x * x;
        let p = 1.0
            + x2 * (-1.0 / 3.0
                + x2 * (1.0 / 10.0
                    + x2 * (-1.0 / 42.0 + x2 * (1.0 / 216.0 + x2 * (-1.0 / 1320.0 + x2 * (1.0 / 9360.0))))));
        return x * p * std::f32::consts::FRAC_2_SQRT_PI;
    }
    if z.is_nan() {
        return x;
    }
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204 + t * (1.488_515_9 + t * (-0.822_152_2 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

/// A unary op.
pub fn unop(op: VUnOp, x: f32) -> f32 {
    match op {
        VUnOp::Mov => x,
        VUnOp::Neg => -x,
        VUnOp::Abs => x.abs(),
        VUnOp::Exp => x.exp(),
        VUnOp::Log => x.ln(),
        VUnOp::Sqrt => x.sqrt(),
        VUnOp::Recip => 1.0 / x,
        VUnOp::Tanh => x.tanh(),
        VUnOp::Erf => erf(x),
        VUnOp::Relu => fmax(x, 0.0),
        VUnOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        VUnOp::Floor => x.floor(),
        VUnOp::Ceil => x.ceil(),
    }
}

/// A binary op (`Mla` is `d + a·b`, given `d`).
pub fn binop(op: VBinOp, a: f32, b: f32, d: f32) -> f32 {
    match op {
        VBinOp::Add => a + b,
        VBinOp::Sub => a - b,
        VBinOp::Mul => a * b,
        VBinOp::Div => a / b,
        VBinOp::Max => fmax(a, b),
        VBinOp::Min => fmin(a, b),
        VBinOp::Pow => a.powf(b),
        VBinOp::Mla => d + a * b,
    }
}
