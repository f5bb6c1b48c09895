//! Elementwise ops: unary math and activations, broadcasting binary arithmetic, logic and
//! comparisons, variadic folds, Where, Clip, and type conversions (Cast, CastLike, BitCast,
//! Identity).
//!
//! Floats compute in their own type (f16 and bf16 in f32), so f32 tensors never round-trip
//! through f64; integers compute natively with wrapping arithmetic. Broadcasting loops run over
//! coalesced contiguous rows ([`kernels`]).

mod binary;
mod cast;
mod kernels;
mod unary;
mod variadic;

#[cfg(test)]
mod tests;

use super::Registry;
use binary::{Arith, Bin, Cmp, Compare, Logic, Logical};
use unary::{BitwiseNot, Clip, IsInf, IsNaN, NotOp, Un, Unary};
use variadic::{Variadic, Where};

pub fn register(r: &mut Registry) {
    static UNARY: [Unary; Un::TABLE.len()] = {
        let mut ops = [const { Unary(Un::Abs) }; Un::TABLE.len()];
        let mut i = 0;
        while i < ops.len() {
            ops[i] = Unary(Un::TABLE[i].0);
            i += 1;
        }
        ops
    };
    for op in &UNARY {
        r.add(op);
    }
    r.add_all(&[
        &Arith { name: "Add", op: Bin::Add },
        &Arith { name: "Sub", op: Bin::Sub },
        &Arith { name: "Mul", op: Bin::Mul },
        &Arith { name: "Div", op: Bin::Div },
        &Arith { name: "Pow", op: Bin::Pow },
        &Arith { name: "Mod", op: Bin::Mod },
        &Arith { name: "BitShift", op: Bin::Shl },
        &Arith { name: "PRelu", op: Bin::PRelu },
        &Arith { name: "BitwiseAnd", op: Bin::BitAnd },
        &Arith { name: "BitwiseOr", op: Bin::BitOr },
        &Arith { name: "BitwiseXor", op: Bin::BitXor },
        &Logical { name: "And", op: Logic::And },
        &Logical { name: "Or", op: Logic::Or },
        &Logical { name: "Xor", op: Logic::Xor },
        &Compare { name: "Equal", op: Cmp::Eq },
        &Compare { name: "Less", op: Cmp::Lt },
        &Compare { name: "LessOrEqual", op: Cmp::Le },
        &Compare { name: "Greater", op: Cmp::Gt },
        &Compare { name: "GreaterOrEqual", op: Cmp::Ge },
        &Variadic { name: "Sum", op: Bin::Add, mean: false },
        &Variadic { name: "Mean", op: Bin::Add, mean: true },
        &Variadic { name: "Max", op: Bin::Max, mean: false },
        &Variadic { name: "Min", op: Bin::Min, mean: false },
        &Where,
        &Clip,
        &IsNaN,
        &IsInf,
        &NotOp,
        &BitwiseNot,
        &cast::Cast,
        &cast::CastLike,
        &cast::BitCast,
        &cast::Identity,
    ]);
}
