//! Elementwise ops, reductions and softmax.

use super::{broadcast_source, floats, ravel, unravel, Array, InterpError};
use crate::ir::{BinaryOp, ReduceOp, UnaryOp};
use crate::tensor::numel;

pub(super) fn unary(u: UnaryOp, x: &Array, op: &'static str) -> Result<Array, InterpError> {
    let xs = floats(op, 0, x)?;
    Ok(Array::f(
        x.shape.clone(),
        xs.iter().map(|&v| unary_scalar(u, v)).collect(),
    ))
}

fn unary_scalar(u: UnaryOp, x: f64) -> f64 {
    // NaN is returned unchanged by every op, so it propagates through masks
    // (step, sign) as it does through arithmetic.
    if x.is_nan() {
        return x;
    }
    match u {
        UnaryOp::Relu => {
            if x > 0.0 {
                x
            } else {
                0.0
            }
        }
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Abs => x.abs(),
        UnaryOp::Neg => -x,
        UnaryOp::Step => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        UnaryOp::Sign => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
    }
}

pub(super) fn binary(
    b: BinaryOp,
    l: &Array,
    r: &Array,
    out_shape: &[usize],
    op: &'static str,
) -> Result<Array, InterpError> {
    let (ls, rs) = (floats(op, 0, l)?, floats(op, 1, r)?);
    let mut out = Vec::with_capacity(numel(out_shape));
    for flat in 0..numel(out_shape) {
        let idx = unravel(flat, out_shape);
        let a = ls[broadcast_source(&idx, &l.shape)];
        let c = rs[broadcast_source(&idx, &r.shape)];
        out.push(binary_scalar(b, a, c));
    }
    Ok(Array::f(out_shape.to_vec(), out))
}

fn binary_scalar(b: BinaryOp, x: f64, y: f64) -> f64 {
    let mask = |c: bool| if c { 1.0 } else { 0.0 };
    match b {
        BinaryOp::Add => x + y,
        BinaryOp::Sub => x - y,
        BinaryOp::Mul => x * y,
        BinaryOp::Div => x / y,
        // f64::max would drop a NaN operand; NumPy's maximum propagates it.
        BinaryOp::Maximum => {
            if x.is_nan() || y.is_nan() {
                f64::NAN
            } else {
                x.max(y)
            }
        }
        BinaryOp::Minimum => {
            if x.is_nan() || y.is_nan() {
                f64::NAN
            } else {
                x.min(y)
            }
        }
        // Masks follow IEEE comparisons: anything compared with NaN is false.
        BinaryOp::Greater => mask(x > y),
        BinaryOp::Equal => mask(x == y),
    }
}

/// True when `candidate` should replace `current` as a running maximum:
/// strictly greater, or the first NaN (so NaN propagates and ties keep the
/// earlier element).
pub(super) fn beats(candidate: f64, current: f64) -> bool {
    (candidate.is_nan() && !current.is_nan()) || candidate > current
}

pub(super) fn reduce(
    r: ReduceOp,
    x: &Array,
    axes: &[usize],
    keepdims: bool,
    out_shape: &[usize],
    op: &'static str,
) -> Result<Array, InterpError> {
    let xs = floats(op, 0, x)?;
    // The reduced result indexed with the kept shape (reduced axes of size 1);
    // with keepdims=false it is the same data under `out_shape`.
    let kept: Vec<usize> = x
        .shape
        .iter()
        .enumerate()
        .map(|(d, &n)| if axes.contains(&d) { 1 } else { n })
        .collect();
    let count: usize = x
        .shape
        .iter()
        .enumerate()
        .filter(|(d, _)| axes.contains(d))
        .map(|(_, &n)| n)
        .product();
    let init = match r {
        ReduceOp::Max => f64::NEG_INFINITY,
        ReduceOp::Sum | ReduceOp::Mean => 0.0,
    };
    let mut acc = vec![init; numel(&kept)];
    for (flat, &v) in xs.iter().enumerate() {
        let mut idx = unravel(flat, &x.shape);
        for &a in axes {
            idx[a] = 0;
        }
        let o = ravel(&idx, &kept);
        match r {
            ReduceOp::Sum | ReduceOp::Mean => acc[o] += v,
            ReduceOp::Max => {
                if beats(v, acc[o]) {
                    acc[o] = v;
                }
            }
        }
    }
    if r == ReduceOp::Mean {
        for a in &mut acc {
            *a /= count as f64;
        }
    }
    let shape = if keepdims { kept } else { out_shape.to_vec() };
    Ok(Array::f(shape, acc))
}

/// Softmax (or log-softmax) along `axis`, stabilised by subtracting the
/// maximum of each slice.
pub(super) fn softmax(
    x: &Array,
    axis: usize,
    log: bool,
    op: &'static str,
) -> Result<Array, InterpError> {
    let xs = floats(op, 0, x)?;
    let n = x.shape[axis];
    let outer: usize = x.shape[..axis].iter().product();
    let inner: usize = x.shape[axis + 1..].iter().product();
    let mut out = vec![0.0; xs.len()];
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| (o * n + j) * inner + i;
            let mut m = f64::NEG_INFINITY;
            for j in 0..n {
                if beats(xs[at(j)], m) {
                    m = xs[at(j)];
                }
            }
            let mut sum = 0.0;
            for j in 0..n {
                sum += (xs[at(j)] - m).exp();
            }
            for j in 0..n {
                out[at(j)] = if log {
                    xs[at(j)] - m - sum.ln()
                } else {
                    (xs[at(j)] - m).exp() / sum
                };
            }
        }
    }
    Ok(Array::f(x.shape.clone(), out))
}
