//! Compile-time values of the elaborator: what a name or expression stands
//! for while a model is being expanded.

use super::dimexpr::DimExpr;
use crate::ir::{Dim, Span, Value};

/// A dimension type the elaborator can work over: concrete sizes when a
/// model is compiled, symbolic expressions when it is only checked.
pub trait ElabDim: Dim {
    /// A free symbol, when this dimension type can stand for an unknown size.
    fn free_symbol(name: &str) -> Option<Self>;
    /// The value as a signed integer, when it is a constant.
    fn as_i64(&self) -> Option<i64>;
}

impl ElabDim for usize {
    fn free_symbol(_: &str) -> Option<Self> {
        None
    }
    fn as_i64(&self) -> Option<i64> {
        i64::try_from(*self).ok()
    }
}

impl ElabDim for DimExpr {
    fn free_symbol(name: &str) -> Option<Self> {
        Some(DimExpr::sym(name))
    }
    fn as_i64(&self) -> Option<i64> {
        self.as_constant()
    }
}

/// An integer: a constant, or (only while checking) a symbolic size.
#[derive(Clone, Debug, PartialEq)]
pub enum Int<D> {
    C(i64),
    S(D),
}

impl<D: ElabDim> Int<D> {
    pub fn from_dim(d: &D) -> Int<D> {
        match d.as_i64() {
            Some(n) => Int::C(n),
            None => Int::S(d.clone()),
        }
    }

    pub fn as_const(&self) -> Option<i64> {
        match self {
            Int::C(n) => Some(*n),
            Int::S(d) => d.as_i64(),
        }
    }

    /// As a dimension; `None` for a negative constant.
    pub fn to_dim(&self) -> Option<D> {
        match self {
            Int::C(n) => usize::try_from(*n).ok().map(D::lit),
            Int::S(d) => Some(d.clone()),
        }
    }

    /// As a dimension operand of arithmetic, where a negative constant is
    /// meaningful (symbolic dims only; constants never reach here together).
    fn signed_dim(&self) -> D {
        match self {
            Int::C(n) if *n < 0 => D::lit(0).sub(&D::lit(n.unsigned_abs() as usize)),
            Int::C(n) => D::lit(*n as usize),
            Int::S(d) => d.clone(),
        }
    }

    pub fn add(&self, o: &Int<D>) -> Option<Int<D>> {
        match (self, o) {
            (Int::C(a), Int::C(b)) => a.checked_add(*b).map(Int::C),
            _ => Some(Int::from_dim(&self.signed_dim().add(&o.signed_dim()))),
        }
    }

    pub fn sub(&self, o: &Int<D>) -> Option<Int<D>> {
        match (self, o) {
            (Int::C(a), Int::C(b)) => a.checked_sub(*b).map(Int::C),
            _ => Some(Int::from_dim(&self.signed_dim().sub(&o.signed_dim()))),
        }
    }

    pub fn mul(&self, o: &Int<D>) -> Option<Int<D>> {
        match (self, o) {
            (Int::C(a), Int::C(b)) => a.checked_mul(*b).map(Int::C),
            _ => Some(Int::from_dim(&self.signed_dim().mul(&o.signed_dim()))),
        }
    }

    /// Floor division; `None` when dividing by zero (or a non-positive
    /// constant under symbols) or on overflow.
    pub fn div(&self, o: &Int<D>) -> Option<Int<D>> {
        match (self, o) {
            (_, Int::C(0)) => None,
            (Int::C(a), Int::C(b)) => {
                let q = a.checked_div(*b)?;
                let floor = if a % b != 0 && ((*a < 0) != (*b < 0)) {
                    q - 1
                } else {
                    q
                };
                Some(Int::C(floor))
            }
            (_, Int::C(b)) if *b < 0 => None,
            _ => Some(Int::from_dim(&self.signed_dim().div_floor(&o.signed_dim()))),
        }
    }

    pub fn neg(&self) -> Option<Int<D>> {
        Int::C(0).sub(self)
    }
}

impl<D: ElabDim> std::fmt::Display for Int<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Int::C(n) => write!(f, "{n}"),
            Int::S(d) => write!(f, "{d}"),
        }
    }
}

/// The value of an expression during elaboration.
#[derive(Clone, Debug)]
pub enum Val<D> {
    /// A tensor in the graph being built.
    Tensor(Value),
    Int(Int<D>),
    Float(f64),
    Bool(bool),
    Str(String),
    List(Vec<Val<D>>),
    /// The result of an expression that already produced an error; its uses
    /// stay silent so one mistake gives one diagnostic.
    Poison,
}

impl<D: ElabDim> Val<D> {
    pub fn is_poison(&self) -> bool {
        match self {
            Val::Poison => true,
            Val::List(v) => v.iter().any(Val::is_poison),
            _ => false,
        }
    }
}

/// Call arguments matched to a signature, by position: the value and where
/// it was written, or `None` where the default applies.
pub type Bound<D> = Vec<Option<(Val<D>, Span)>>;
