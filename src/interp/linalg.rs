//! Matrix multiplication and attention.

use super::{broadcast_source, floats, unravel, Array, InterpError};
use crate::tensor::numel;

pub(super) fn matmul(
    a: &Array,
    b: &Array,
    out_shape: &[usize],
    op: &'static str,
) -> Result<Array, InterpError> {
    let (xs, ys) = (floats(op, 0, a)?, floats(op, 1, b)?);
    let (ra, rb, ro) = (a.shape.len(), b.shape.len(), out_shape.len());
    let (m, k, n) = (a.shape[ra - 2], a.shape[ra - 1], b.shape[rb - 1]);
    let batch_shape = &out_shape[..ro - 2];
    let mut out = vec![0.0; numel(out_shape)];
    for bi in 0..numel(batch_shape) {
        let idx = unravel(bi, batch_shape);
        let a0 = broadcast_source(&idx, &a.shape[..ra - 2]) * m * k;
        let b0 = broadcast_source(&idx, &b.shape[..rb - 2]) * k * n;
        let o0 = bi * m * n;
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    s += xs[a0 + i * k + p] * ys[b0 + p * n + j];
                }
                out[o0 + i * n + j] = s;
            }
        }
    }
    Ok(Array::f(out_shape.to_vec(), out))
}

/// Sizes of one attention call: `batch` independent problems of
/// `q [tq, d]`, `k [tk, d]`, `v [tk, dv]`.
struct Dims {
    batch: usize,
    tq: usize,
    tk: usize,
    d: usize,
    dv: usize,
}

fn dims(q: &Array, v: &Array, k: &Array) -> Dims {
    let r = q.shape.len();
    Dims {
        batch: q.shape[..r - 2].iter().product(),
        tq: q.shape[r - 2],
        tk: k.shape[r - 2],
        d: q.shape[r - 1],
        dv: v.shape[r - 1],
    }
}

/// The attention weights `P [tq, tk]` of problem `b`: the row softmax of
/// `q kᵀ · scale`, with `j > i` masked out when causal.
fn weights(qs: &[f64], ks: &[f64], s: &Dims, b: usize, causal: bool, scale: f64) -> Vec<f64> {
    let mut p = vec![0.0; s.tq * s.tk];
    for i in 0..s.tq {
        let visible = |j: usize| !causal || j <= i;
        let mut logits = vec![f64::NEG_INFINITY; s.tk];
        for (j, l) in logits.iter_mut().enumerate() {
            if visible(j) {
                let mut dot = 0.0;
                for c in 0..s.d {
                    dot += qs[(b * s.tq + i) * s.d + c] * ks[(b * s.tk + j) * s.d + c];
                }
                *l = dot * scale;
            }
        }
        let mut m = f64::NEG_INFINITY;
        for &l in &logits {
            if super::elementwise::beats(l, m) {
                m = l;
            }
        }
        let mut sum = 0.0;
        for &l in logits.iter() {
            sum += if l == f64::NEG_INFINITY {
                0.0
            } else {
                (l - m).exp()
            };
        }
        for j in 0..s.tk {
            let l = logits[j];
            p[i * s.tk + j] = if l == f64::NEG_INFINITY {
                0.0
            } else {
                (l - m).exp() / sum
            };
        }
    }
    p
}

/// `(q, k, v) -> softmax(q kᵀ · scale [causal: mask j > i]) v`.
pub(super) fn attention(
    ins: &[&Array],
    causal: bool,
    scale: f64,
    op: &'static str,
) -> Result<Array, InterpError> {
    let (qs, ks, vs) = (
        floats(op, 0, ins[0])?,
        floats(op, 1, ins[1])?,
        floats(op, 2, ins[2])?,
    );
    let s = dims(ins[0], ins[2], ins[1]);
    let mut out = vec![0.0; s.batch * s.tq * s.dv];
    for b in 0..s.batch {
        let p = weights(qs, ks, &s, b, causal, scale);
        for i in 0..s.tq {
            for c in 0..s.dv {
                let mut acc = 0.0;
                for j in 0..s.tk {
                    acc += p[i * s.tk + j] * vs[(b * s.tk + j) * s.dv + c];
                }
                out[(b * s.tq + i) * s.dv + c] = acc;
            }
        }
    }
    let mut shape = ins[0].shape.clone();
    let r = shape.len();
    shape[r - 1] = s.dv;
    Ok(Array::f(shape, out))
}

/// `(q, k, v, dy) -> (dq, dk, dv)`. With `P` the weights and `S` the scaled
/// logits: `dv = Pᵀ dy`, `dP = dy vᵀ`, `dS = P ∘ (dP − rowsum(dP ∘ P))`,
/// `dq = dS k · scale`, `dk = dSᵀ q · scale`. Masked entries have `P = 0`,
/// hence `dS = 0`.
pub(super) fn attention_grad(
    ins: &[&Array],
    causal: bool,
    scale: f64,
    op: &'static str,
) -> Result<Vec<Array>, InterpError> {
    let qs = floats(op, 0, ins[0])?;
    let ks = floats(op, 1, ins[1])?;
    let vs = floats(op, 2, ins[2])?;
    let dys = floats(op, 3, ins[3])?;
    let s = dims(ins[0], ins[2], ins[1]);
    let mut dq = vec![0.0; qs.len()];
    let mut dk = vec![0.0; ks.len()];
    let mut dv = vec![0.0; vs.len()];
    for b in 0..s.batch {
        let p = weights(qs, ks, &s, b, causal, scale);
        let q_at = |i: usize, c: usize| (b * s.tq + i) * s.d + c;
        let k_at = |j: usize, c: usize| (b * s.tk + j) * s.d + c;
        let v_at = |j: usize, c: usize| (b * s.tk + j) * s.dv + c;
        let y_at = |i: usize, c: usize| (b * s.tq + i) * s.dv + c;
        for i in 0..s.tq {
            let mut dp = vec![0.0; s.tk];
            for (j, dpj) in dp.iter_mut().enumerate() {
                for c in 0..s.dv {
                    *dpj += dys[y_at(i, c)] * vs[v_at(j, c)];
                    dv[v_at(j, c)] += p[i * s.tk + j] * dys[y_at(i, c)];
                }
            }
            let mut row = 0.0;
            for j in 0..s.tk {
                row += dp[j] * p[i * s.tk + j];
            }
            for j in 0..s.tk {
                let ds = p[i * s.tk + j] * (dp[j] - row);
                for c in 0..s.d {
                    dq[q_at(i, c)] += ds * ks[k_at(j, c)] * scale;
                    dk[k_at(j, c)] += ds * qs[q_at(i, c)] * scale;
                }
            }
        }
    }
    Ok(vec![
        Array::f(ins[0].shape.clone(), dq),
        Array::f(ins[1].shape.clone(), dk),
        Array::f(ins[2].shape.clone(), dv),
    ])
}
