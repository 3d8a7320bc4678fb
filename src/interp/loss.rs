//! Embedding lookup and the classification losses, with their gradients.
//! Ids and labels come from user data, so each is range-checked with an
//! error naming the op and the position.

use super::{floats, ints, unravel, Array, InterpError};
use crate::tensor::numel;

/// `id` as a row index of a table with `rows` rows.
fn row(
    op: &'static str,
    id: i32,
    flat: usize,
    ids_shape: &[usize],
    rows: usize,
) -> Result<usize, InterpError> {
    match usize::try_from(id) {
        Ok(r) if r < rows => Ok(r),
        _ => Err(InterpError::IdOutOfRange {
            op,
            id,
            index: unravel(flat, ids_shape),
            rows,
        }),
    }
}

/// `(table [V, D], ids i32[...]) -> [..., D]`.
pub(super) fn gather(
    table: &Array,
    ids: &Array,
    out_shape: &[usize],
    op: &'static str,
) -> Result<Array, InterpError> {
    let (ts, is) = (floats(op, 0, table)?, ints(op, 1, ids)?);
    let (v, d) = (table.shape[0], table.shape[1]);
    let mut out = Vec::with_capacity(numel(out_shape));
    for (flat, &id) in is.iter().enumerate() {
        let r = row(op, id, flat, &ids.shape, v)?;
        out.extend_from_slice(&ts[r * d..(r + 1) * d]);
    }
    Ok(Array::f(out_shape.to_vec(), out))
}

/// `(ids i32[...], dy [..., D]) -> [rows, D]`; repeated ids add up.
pub(super) fn scatter_add(
    ids: &Array,
    dy: &Array,
    rows: usize,
    op: &'static str,
) -> Result<Array, InterpError> {
    let (is, dys) = (ints(op, 0, ids)?, floats(op, 1, dy)?);
    let d = dy.shape[dy.shape.len() - 1];
    let mut out = vec![0.0; rows * d];
    for (flat, &id) in is.iter().enumerate() {
        let r = row(op, id, flat, &ids.shape, rows)?;
        for c in 0..d {
            out[r * d + c] += dys[flat * d + c];
        }
    }
    Ok(Array::f(vec![rows, d], out))
}

/// Checked labels of a `[N, C]` classification: the class of each row.
fn labels(op: &'static str, scores: &Array, labels: &Array) -> Result<Vec<usize>, InterpError> {
    let ls = ints(op, 1, labels)?;
    let classes = scores.shape[1];
    ls.iter()
        .enumerate()
        .map(|(index, &label)| match usize::try_from(label) {
            Ok(y) if y < classes => Ok(y),
            _ => Err(InterpError::LabelOutOfRange {
                op,
                label,
                index,
                classes,
            }),
        })
        .collect()
}

/// `log Σ_j exp(s_j)` of one row, stabilised by its maximum.
fn logsumexp(row: &[f64]) -> f64 {
    let mut m = f64::NEG_INFINITY;
    for &v in row {
        if super::elementwise::beats(v, m) {
            m = v;
        }
    }
    let mut sum = 0.0;
    for &v in row {
        sum += (v - m).exp();
    }
    m + sum.ln()
}

/// `mean_n(logsumexp(logits_n) − logits_n[label_n])`.
pub(super) fn cross_entropy(
    logits: &Array,
    lab: &Array,
    op: &'static str,
) -> Result<Array, InterpError> {
    let xs = floats(op, 0, logits)?;
    let ys = labels(op, logits, lab)?;
    let (n, c) = (logits.shape[0], logits.shape[1]);
    let mut total = 0.0;
    for (i, &y) in ys.iter().enumerate() {
        let row = &xs[i * c..(i + 1) * c];
        total += logsumexp(row) - row[y];
    }
    Ok(Array::scalar(total / n as f64))
}

/// `dloss · (softmax(logits) − onehot(labels)) / N`.
pub(super) fn cross_entropy_grad(
    logits: &Array,
    lab: &Array,
    dloss: &Array,
    op: &'static str,
) -> Result<Array, InterpError> {
    let xs = floats(op, 0, logits)?;
    let ys = labels(op, logits, lab)?;
    let g = floats(op, 2, dloss)?[0];
    let (n, c) = (logits.shape[0], logits.shape[1]);
    let mut out = vec![0.0; n * c];
    for (i, &y) in ys.iter().enumerate() {
        let row = &xs[i * c..(i + 1) * c];
        let lse = logsumexp(row);
        for j in 0..c {
            let onehot = if j == y { 1.0 } else { 0.0 };
            out[i * c + j] = g * ((row[j] - lse).exp() - onehot) / n as f64;
        }
    }
    Ok(Array::f(logits.shape.clone(), out))
}

/// `mean_n Σ_{j≠y_n} max(0, 1 + s_nj − s_ny_n)`.
pub(super) fn hinge(scores: &Array, lab: &Array, op: &'static str) -> Result<Array, InterpError> {
    let xs = floats(op, 0, scores)?;
    let ys = labels(op, scores, lab)?;
    let (n, c) = (scores.shape[0], scores.shape[1]);
    let mut total = 0.0;
    for (i, &y) in ys.iter().enumerate() {
        for j in 0..c {
            if j != y {
                let margin = 1.0 + xs[i * c + j] - xs[i * c + y];
                // NaN margins are added as they are, so NaN propagates.
                total += if margin.is_nan() {
                    margin
                } else {
                    margin.max(0.0)
                };
            }
        }
    }
    Ok(Array::scalar(total / n as f64))
}

/// The subgradient of [`hinge`]: each positive margin adds `dloss/N` to its
/// class and subtracts it from the label's; a margin of exactly 0 (the kink)
/// contributes nothing.
pub(super) fn hinge_grad(
    scores: &Array,
    lab: &Array,
    dloss: &Array,
    op: &'static str,
) -> Result<Array, InterpError> {
    let xs = floats(op, 0, scores)?;
    let ys = labels(op, scores, lab)?;
    let g = floats(op, 2, dloss)?[0];
    let (n, c) = (scores.shape[0], scores.shape[1]);
    let share = g / n as f64;
    let mut out = vec![0.0; n * c];
    for (i, &y) in ys.iter().enumerate() {
        for j in 0..c {
            if j == y {
                continue;
            }
            let margin = 1.0 + xs[i * c + j] - xs[i * c + y];
            if margin > 0.0 {
                out[i * c + j] += share;
                out[i * c + y] -= share;
            } else if margin.is_nan() {
                out[i * c + j] = f64::NAN;
                out[i * c + y] = f64::NAN;
            }
        }
    }
    Ok(Array::f(scores.shape.clone(), out))
}
