//! Dimensions: concrete sizes (`usize`) or symbolic expressions.
//!
//! The shape rules of `ir::shape` are written once, generically over [`Dim`],
//! so that `dlc check` can check a model over its dimension symbols
//! (`N`, `T`, `4*H`) and `dlc compile` over the bound sizes with the very same
//! code. A symbolic implementation lives in `elab::dimexpr`.

use std::fmt::{Debug, Display};
use std::hash::Hash;

/// A tensor dimension.
pub trait Dim: Clone + PartialEq + Eq + Hash + Debug + Display {
    /// A known size.
    fn lit(n: usize) -> Self;
    /// The size, when it is known.
    fn known(&self) -> Option<usize>;
    fn add(&self, other: &Self) -> Self;
    /// `self - other`; only called where the caller knows it is meaningful.
    fn sub(&self, other: &Self) -> Self;
    fn mul(&self, other: &Self) -> Self;
    /// Floor division by a positive divisor.
    fn div_floor(&self, other: &Self) -> Self;

    /// The product of several dims (1 for none).
    fn product<'a>(dims: impl IntoIterator<Item = &'a Self>) -> Self
    where
        Self: 'a,
    {
        dims.into_iter().fold(Self::lit(1), |acc, d| acc.mul(d))
    }
}

impl Dim for usize {
    fn lit(n: usize) -> Self {
        n
    }
    fn known(&self) -> Option<usize> {
        Some(*self)
    }
    fn add(&self, other: &Self) -> Self {
        self.saturating_add(*other)
    }
    fn sub(&self, other: &Self) -> Self {
        self.saturating_sub(*other)
    }
    fn mul(&self, other: &Self) -> Self {
        self.saturating_mul(*other)
    }
    fn div_floor(&self, other: &Self) -> Self {
        if *other == 0 {
            0
        } else {
            self / other
        }
    }
}
