//! A small builder that appends ops to a graph on behalf of one gradient
//! rule, so the rules in `rules.rs` read like the math they implement.
//!
//! Every node it adds carries the span of the forward op being
//! differentiated, so a later error in the backward pass still points at
//! the source line that caused it.

use super::AutodiffError;
use crate::ir::{BinaryOp, Graph, Op, ReduceOp, Span, UnaryOp, Value};

pub(crate) struct Emit<'g> {
    pub g: &'g mut Graph,
    /// The forward op whose gradient is being built (for error messages).
    pub op: &'static str,
    pub span: Option<Span>,
}

impl<'g> Emit<'g> {
    pub fn new(g: &'g mut Graph, op: &'static str, span: Option<Span>) -> Self {
        Emit { g, op, span }
    }

    /// Add a single-result op; a shape-rule failure here means the rule
    /// built an ill-typed gradient, reported with the op it belongs to.
    pub fn op(&mut self, op: Op, ins: &[Value]) -> Result<Value, AutodiffError> {
        Ok(self.multi(op, ins)?[0])
    }

    pub fn multi(&mut self, op: Op, ins: &[Value]) -> Result<Vec<Value>, AutodiffError> {
        self.g
            .add_multi(op, ins, self.span)
            .map_err(|source| AutodiffError::Build {
                op: self.op,
                source,
            })
    }

    pub fn shape(&self, v: Value) -> Vec<usize> {
        self.g.ty(v).shape.clone()
    }

    pub fn fill(&mut self, value: f32, shape: Vec<usize>) -> Result<Value, AutodiffError> {
        self.op(Op::Fill { value, shape }, &[])
    }

    pub fn scalar(&mut self, value: f32) -> Result<Value, AutodiffError> {
        self.fill(value, vec![])
    }

    pub fn unary(&mut self, u: UnaryOp, x: Value) -> Result<Value, AutodiffError> {
        self.op(Op::Unary(u), &[x])
    }

    pub fn binary(&mut self, b: BinaryOp, x: Value, y: Value) -> Result<Value, AutodiffError> {
        self.op(Op::Binary(b), &[x, y])
    }

    pub fn add(&mut self, x: Value, y: Value) -> Result<Value, AutodiffError> {
        self.binary(BinaryOp::Add, x, y)
    }

    pub fn sub(&mut self, x: Value, y: Value) -> Result<Value, AutodiffError> {
        self.binary(BinaryOp::Sub, x, y)
    }

    pub fn mul(&mut self, x: Value, y: Value) -> Result<Value, AutodiffError> {
        self.binary(BinaryOp::Mul, x, y)
    }

    pub fn div(&mut self, x: Value, y: Value) -> Result<Value, AutodiffError> {
        self.binary(BinaryOp::Div, x, y)
    }

    pub fn neg(&mut self, x: Value) -> Result<Value, AutodiffError> {
        self.unary(UnaryOp::Neg, x)
    }

    /// `c · x` for a constant `c`.
    pub fn scale(&mut self, c: f32, x: Value) -> Result<Value, AutodiffError> {
        let c = self.scalar(c)?;
        self.mul(c, x)
    }

    /// `c - x` for a constant `c`.
    pub fn rsub(&mut self, c: f32, x: Value) -> Result<Value, AutodiffError> {
        let c = self.scalar(c)?;
        self.sub(c, x)
    }

    pub fn reduce(
        &mut self,
        op: ReduceOp,
        x: Value,
        axes: Vec<usize>,
        keepdims: bool,
    ) -> Result<Value, AutodiffError> {
        self.op(Op::Reduce { op, axes, keepdims }, &[x])
    }

    /// Reshape, skipped when the shape already matches. A reshape of a
    /// reshape reads the original: the data never moves, and the inner node
    /// may then become dead.
    pub fn reshape(&mut self, x: Value, shape: Vec<usize>) -> Result<Value, AutodiffError> {
        let x = match self.g.node(x.node).op {
            Op::Reshape { .. } => self.g.inputs(x.node).first().copied().unwrap_or(x),
            _ => x,
        };
        if self.shape(x) == shape {
            return Ok(x);
        }
        self.op(Op::Reshape { shape }, &[x])
    }

    /// Broadcast to `shape`, skipped when the shape already matches.
    pub fn expand(&mut self, x: Value, shape: Vec<usize>) -> Result<Value, AutodiffError> {
        if self.shape(x) == shape {
            return Ok(x);
        }
        self.op(Op::Expand { shape }, &[x])
    }

    /// Swap the last two axes (rank >= 2).
    pub fn transpose_last2(&mut self, x: Value) -> Result<Value, AutodiffError> {
        let r = self.shape(x).len();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.op(Op::Transpose { perm }, &[x])
    }

    /// The adjoint of broadcasting: sum `x` over the axes along which an
    /// operand of shape `target` was broadcast (the extra leading axes and
    /// the axes where `target` has size 1), then reshape to `target`.
    pub fn sum_to(&mut self, x: Value, target: &[usize]) -> Result<Value, AutodiffError> {
        let shape = self.shape(x);
        if shape == target {
            return Ok(x);
        }
        let lead = shape.len() - target.len().min(shape.len());
        let axes: Vec<usize> = (0..shape.len())
            .filter(|&i| i < lead || (target[i - lead] == 1 && shape[i] != 1))
            .collect();
        if axes.is_empty() {
            return self.reshape(x, target.to_vec());
        }
        // Dropping the summed axes often gives `target` already (a bias
        // gradient sums the leading batch axes); otherwise keep them as 1s
        // and reshape.
        let dropped: Vec<usize> = (0..shape.len())
            .filter(|i| !axes.contains(i))
            .map(|i| shape[i])
            .collect();
        let keepdims = dropped != target;
        let summed = self.reduce(ReduceOp::Sum, x, axes, keepdims)?;
        self.reshape(summed, target.to_vec())
    }
}
