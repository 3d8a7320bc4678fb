//! FLOP counts of ops, for profiles and benchmarks: a multiply-add counts
//! two, an elementwise op or a reduction one per element it reads. Layout
//! ops (copies, reshapes) and lookups have no count.

use super::{Op, TensorType};
use crate::tensor::numel;

/// Floating-point operations one execution of `op` performs, or `None`
/// when it moves data rather than computing. Attention counts the full
/// score matrix even when causal masking lets a kernel skip half of it, so
/// GFLOP/s figures compare across implementations.
pub fn flops(op: &Op, ins: &[&TensorType], outs: &[&TensorType]) -> Option<u64> {
    let n_in = |i: usize| ins.get(i).map(|t| numel(&t.shape) as u64);
    let n_out = outs.first().map(|t| numel(&t.shape) as u64);
    let dim = |i: usize, from_end: usize| -> Option<u64> {
        let s = &ins.get(i)?.shape;
        s.len()
            .checked_sub(from_end)
            .and_then(|d| s.get(d))
            .map(|&x| x as u64)
    };
    let window = |w: usize| -> Option<u64> {
        // Filter [O, C, KH, KW]: C·KH·KW multiply-adds per output element.
        let s = &ins.get(w)?.shape;
        Some(s.get(1..4)?.iter().map(|&x| x as u64).product())
    };
    match op {
        Op::MatMul => Some(2 * n_out? * dim(0, 1)?),
        Op::Conv(_) => Some(2 * n_out? * window(1)?),
        // dx = dy ⋆ wᵀ: as many multiply-adds as the forward conv, which
        // produced dy.
        Op::ConvGradInput { .. } => Some(2 * n_in(0)? * window(1)?),
        // dw[o, c, i, j] sums over N·OH·OW: again the forward's count.
        Op::ConvGradFilter { .. } => {
            let dw = &outs.first()?.shape;
            let per_out: u64 = dw.get(1..4)?.iter().map(|&x| x as u64).product();
            Some(2 * n_in(1)? * per_out)
        }
        Op::LstmSeq | Op::GruSeq => {
            // Both projections of every step: [N·T, F + H] @ [F + H, G·H].
            let (nt, f, gh) = (n_in(0)? / dim(0, 1)?, dim(0, 1)?, dim(1, 1)?);
            let h = dim(2, 2)?;
            Some(2 * nt * (f + h) * gh)
        }
        // BPTT: the data gradient and the weight gradient each cost a
        // forward's worth of matmul.
        Op::LstmSeqGrad | Op::GruSeqGrad => {
            let (nt, f, gh) = (n_in(0)? / dim(0, 1)?, dim(0, 1)?, dim(1, 1)?);
            let h = dim(2, 2)?;
            Some(4 * nt * (f + h) * gh)
        }
        Op::Attention { .. } => Some(attention_flops(ins)?),
        // dS = dY·Vᵀ, dV = Pᵀ·dY, dQ = dS·K, dK = dSᵀ·Q: twice the forward.
        Op::AttentionGrad { .. } => Some(2 * attention_flops(ins)?),
        Op::Unary(_) | Op::Binary(_) => n_out,
        Op::Reduce { .. } | Op::Softmax { .. } | Op::LogSoftmax { .. } => n_in(0),
        Op::CrossEntropy | Op::CrossEntropyGrad | Op::Hinge | Op::HingeGrad => n_in(0),
        Op::MaxPool(p) | Op::AvgPool(p) => Some(n_out? * (p.window * p.window) as u64),
        Op::MaxPoolGrad(p) => Some(n_in(1)? * (p.window * p.window) as u64),
        Op::AvgPoolGrad { pool, .. } => Some(n_in(0)? * (pool.window * pool.window) as u64),
        _ => None,
    }
}

/// `softmax(q kᵀ) v` over `[batch…, Tq, D]`, `[batch…, Tk, D]`, `[batch…, Tk, Dv]`.
fn attention_flops(ins: &[&TensorType]) -> Option<u64> {
    let q = &ins.first()?.shape;
    let k = &ins.get(1)?.shape;
    let v = &ins.get(2)?.shape;
    let (tq, d) = (*q.get(q.len().checked_sub(2)?)?, *q.last()?);
    let tk = *k.get(k.len().checked_sub(2)?)?;
    let dv = *v.last()?;
    let batch: usize = q[..q.len() - 2].iter().product();
    Some(2 * (batch * tq * tk * (d + dv)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Conv2d;
    use crate::tensor::DType;

    fn ty(shape: &[usize]) -> TensorType {
        TensorType {
            dtype: DType::F32,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn matmul_counts_two_per_multiply_add() {
        let (a, b, c) = (ty(&[3, 4, 5]), ty(&[5, 6]), ty(&[3, 4, 6]));
        assert_eq!(
            flops(&Op::MatMul, &[&a, &b], &[&c]),
            Some(2 * 3 * 4 * 6 * 5)
        );
    }

    #[test]
    fn conv_counts_the_window_per_output() {
        let conv = Op::Conv(Conv2d {
            stride: 1,
            dilation: 1,
            pad: [0; 4],
        });
        let (x, w, y) = (ty(&[2, 3, 8, 8]), ty(&[4, 3, 5, 5]), ty(&[2, 4, 4, 4]));
        assert_eq!(
            flops(&conv, &[&x, &w], &[&y]),
            Some(2 * (2 * 4 * 4 * 4) * (3 * 5 * 5))
        );
    }

    #[test]
    fn lstm_counts_both_projections_of_every_step() {
        let (x, wx, wh, b) = (ty(&[2, 7, 5]), ty(&[5, 12]), ty(&[3, 12]), ty(&[12]));
        let h = ty(&[2, 7, 3]);
        assert_eq!(
            flops(&Op::LstmSeq, &[&x, &wx, &wh, &b], &[&h]),
            Some(2 * 14 * (5 + 3) * 12)
        );
    }

    #[test]
    fn layout_ops_have_no_count() {
        let x = ty(&[2, 3]);
        let op = Op::Transpose { perm: vec![1, 0] };
        assert_eq!(flops(&op, &[&x], &[&ty(&[3, 2])]), None);
    }
}
