//! One reverse-mode rule per op: given the operands `x`, the result `y` and
//! the gradient `dy` of the objective w.r.t. `y`, emit the gradient w.r.t.
//! each operand (`None` when none flows: integer operands, piecewise
//! constant ops).
//!
//! Notation in the comments: `dy` is ∂L/∂y, `dx` is ∂L/∂x; `unbroadcast`
//! sums a gradient back to the shape of an operand that was broadcast.

use super::emit::Emit;
use super::AutodiffError;
use crate::ir::{BinaryOp, Op, ReduceOp, UnaryOp, Value};
use std::collections::BTreeSet;

type Grads = Result<Vec<Option<Value>>, AutodiffError>;

/// The gradients of `op(x...) = y` w.r.t. each operand.
pub(crate) fn backward(e: &mut Emit, op: &Op, x: &[Value], y: Value, dy: Value) -> Grads {
    match op {
        Op::Unary(u) => unary(e, *u, x[0], y, dy).map(|d| vec![d]),
        Op::Binary(b) => binary(e, *b, x[0], x[1], y, dy),
        Op::Reduce { op, axes, .. } => reduce(e, *op, axes, x[0], y, dy),

        // y = softmax(x): dx = y ⊙ (dy − Σ_axis dy ⊙ y)
        Op::Softmax { axis } => {
            let dy_y = e.mul(dy, y)?;
            let s = e.reduce(ReduceOp::Sum, dy_y, vec![*axis], true)?;
            let centred = e.sub(dy, s)?;
            Ok(vec![Some(e.mul(y, centred)?)])
        }
        // y = log_softmax(x): dx = dy − exp(y) ⊙ Σ_axis dy
        Op::LogSoftmax { axis } => {
            let p = e.unary(UnaryOp::Exp, y)?;
            let s = e.reduce(ReduceOp::Sum, dy, vec![*axis], true)?;
            let ps = e.mul(p, s)?;
            Ok(vec![Some(e.sub(dy, ps)?)])
        }

        // y = a @ b: da = unbroadcast(dy @ bᵀ), db = unbroadcast(aᵀ @ dy);
        // the unbroadcast sums over batch dims an operand was broadcast along.
        Op::MatMul => {
            let (a, b) = (x[0], x[1]);
            let (sa, sb) = (e.shape(a), e.shape(b));
            let bt = e.transpose_last2(b)?;
            let da = e.op(Op::MatMul, &[dy, bt])?;
            let db = if sb.len() == 2 && sa.len() > 2 {
                // A weight shared by every batch: fold the batch into the
                // rows, dw = a[B·M, K]ᵀ @ dy[B·M, N], instead of a batched
                // product that is summed afterwards (a [B, K, N] temporary).
                let (k, n) = (sb[0], sb[1]);
                let rows = sa.iter().product::<usize>() / k.max(1);
                let a2 = e.reshape(a, vec![rows, k])?;
                let dy2 = e.reshape(dy, vec![rows, n])?;
                let a2t = e.transpose_last2(a2)?;
                e.op(Op::MatMul, &[a2t, dy2])?
            } else {
                let at = e.transpose_last2(a)?;
                e.op(Op::MatMul, &[at, dy])?
            };
            Ok(vec![Some(e.sum_to(da, &sa)?), Some(e.sum_to(db, &sb)?)])
        }

        // y = transpose(x, p): dx = transpose(dy, p⁻¹)
        Op::Transpose { perm } => {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            Ok(vec![Some(e.op(Op::Transpose { perm: inv }, &[dy])?)])
        }
        // y = reshape(x): dx = reshape(dy, shape(x))
        Op::Reshape { .. } => {
            let s = e.shape(x[0]);
            Ok(vec![Some(e.reshape(dy, s)?)])
        }
        // y = expand(x): dx = unbroadcast(dy)
        Op::Expand { .. } => {
            let s = e.shape(x[0]);
            Ok(vec![Some(e.sum_to(dy, &s)?)])
        }
        // y = concat(x₀, x₁, …): dxᵢ = the slice of dy that xᵢ occupies
        Op::Concat { axis } => {
            let mut start = 0;
            let mut out = Vec::with_capacity(x.len());
            for &xi in x {
                let end = start + e.shape(xi)[*axis];
                let d = e.op(
                    Op::Slice {
                        axis: *axis,
                        start,
                        end,
                    },
                    &[dy],
                )?;
                out.push(Some(d));
                start = end;
            }
            Ok(out)
        }
        // y = x[start..end]: dx = dy written into zeros of shape(x)
        Op::Slice { axis, start, .. } => {
            let full = e.shape(x[0])[*axis];
            let pad = Op::PadSlice {
                axis: *axis,
                start: *start,
                full,
            };
            Ok(vec![Some(e.op(pad, &[dy])?)])
        }
        // y = pad_slice(x): dx = dy[start..start + len(x)]
        Op::PadSlice { axis, start, .. } => {
            let end = start + e.shape(x[0])[*axis];
            let slice = Op::Slice {
                axis: *axis,
                start: *start,
                end,
            };
            Ok(vec![Some(e.op(slice, &[dy])?)])
        }

        // y = conv(x, w): dx = conv_grad_input(dy, w), dw = conv_grad_filter(x, dy)
        Op::Conv(c) => {
            let (sx, sw) = (e.shape(x[0]), e.shape(x[1]));
            let gi = Op::ConvGradInput {
                conv: *c,
                input_hw: [sx[2], sx[3]],
            };
            let gf = Op::ConvGradFilter {
                conv: *c,
                kernel_hw: [sw[2], sw[3]],
            };
            Ok(vec![
                Some(e.op(gi, &[dy, x[1]])?),
                Some(e.op(gf, &[x[0], dy])?),
            ])
        }
        // conv is bilinear, ⟨dy, conv(x, w)⟩ = ⟨cgi(dy, w), x⟩ = ⟨cgf(x, dy), w⟩,
        // so for z = cgi(dy, w) with upstream dz: d(dy) = conv(dz, w), dw = cgf(dz, dy).
        Op::ConvGradInput { conv, .. } => {
            let sw = e.shape(x[1]);
            let gf = Op::ConvGradFilter {
                conv: *conv,
                kernel_hw: [sw[2], sw[3]],
            };
            Ok(vec![
                Some(e.op(Op::Conv(*conv), &[dy, x[1]])?),
                Some(e.op(gf, &[dy, x[0]])?),
            ])
        }
        // z = cgf(x, dy) with upstream dz: dx = cgi(dy, dz), d(dy) = conv(x, dz).
        Op::ConvGradFilter { conv, .. } => {
            let sx = e.shape(x[0]);
            let gi = Op::ConvGradInput {
                conv: *conv,
                input_hw: [sx[2], sx[3]],
            };
            Ok(vec![
                Some(e.op(gi, &[x[1], dy])?),
                Some(e.op(Op::Conv(*conv), &[x[0], dy])?),
            ])
        }

        // y = max_pool(x): each window's dy goes to its first maximum
        Op::MaxPool(p) => Ok(vec![Some(e.op(Op::MaxPoolGrad(*p), &[x[0], dy])?)]),
        // y = avg_pool(x): each window's dy is spread over its in-input cells
        Op::AvgPool(p) => {
            let s = e.shape(x[0]);
            let grad = Op::AvgPoolGrad {
                pool: *p,
                input_hw: [s[2], s[3]],
            };
            Ok(vec![Some(e.op(grad, &[dy])?)])
        }
        // avg_pool_grad is the adjoint of the linear map avg_pool, and back.
        Op::AvgPoolGrad { pool, .. } => Ok(vec![Some(e.op(Op::AvgPool(*pool), &[dy])?)]),

        // Recurrences and attention: BPTT / the attention backward are
        // dedicated kernels that take the forward operands and dy.
        Op::LstmSeq => {
            let ins = [x[0], x[1], x[2], x[3], dy];
            Ok(e.multi(Op::LstmSeqGrad, &ins)?
                .into_iter()
                .map(Some)
                .collect())
        }
        Op::GruSeq => {
            let ins = [x[0], x[1], x[2], x[3], dy];
            Ok(e.multi(Op::GruSeqGrad, &ins)?
                .into_iter()
                .map(Some)
                .collect())
        }
        Op::Attention { causal, scale } => {
            let grad = Op::AttentionGrad {
                causal: *causal,
                scale: *scale,
            };
            let ins = [x[0], x[1], x[2], dy];
            Ok(e.multi(grad, &ins)?.into_iter().map(Some).collect())
        }

        // y = table[ids]: dtable = scatter_add(ids, dy), repeated ids add up
        Op::Gather => {
            let rows = e.shape(x[0])[0];
            Ok(vec![
                Some(e.op(Op::ScatterAdd { rows }, &[x[1], dy])?),
                None,
            ])
        }
        // z = scatter_add(ids, g): the adjoint of gather, so dg = gather(dz, ids)
        Op::ScatterAdd { .. } => Ok(vec![None, Some(e.op(Op::Gather, &[dy, x[0]])?)]),

        // Losses: dlogits = loss_grad(logits, labels, dloss); labels get none.
        Op::CrossEntropy => {
            let d = e.op(Op::CrossEntropyGrad, &[x[0], x[1], dy])?;
            Ok(vec![Some(d), None])
        }
        Op::Hinge => Ok(vec![Some(e.op(Op::HingeGrad, &[x[0], x[1], dy])?), None]),

        Op::Input { .. } | Op::Param { .. } | Op::State { .. } | Op::Fill { .. } => Ok(vec![]),

        Op::MaxPoolGrad(_)
        | Op::LstmSeqGrad
        | Op::GruSeqGrad
        | Op::AttentionGrad { .. }
        | Op::CrossEntropyGrad
        | Op::HingeGrad => Err(AutodiffError::NoGradientRule {
            op: op.name(),
            span: e.span,
        }),
    }
}

fn unary(
    e: &mut Emit,
    u: UnaryOp,
    x: Value,
    y: Value,
    dy: Value,
) -> Result<Option<Value>, AutodiffError> {
    let dx = match u {
        // relu'(x) = step(x), which is 0 at x = 0
        UnaryOp::Relu => {
            let s = e.unary(UnaryOp::Step, x)?;
            e.mul(dy, s)?
        }
        // σ' = y(1 − y)
        UnaryOp::Sigmoid => {
            let one_minus = e.rsub(1.0, y)?;
            let dsig = e.mul(y, one_minus)?;
            e.mul(dy, dsig)?
        }
        // tanh' = 1 − y²
        UnaryOp::Tanh => {
            let y2 = e.mul(y, y)?;
            let dt = e.rsub(1.0, y2)?;
            e.mul(dy, dt)?
        }
        // exp' = y
        UnaryOp::Exp => e.mul(dy, y)?,
        // log' = 1/x
        UnaryOp::Log => e.div(dy, x)?,
        // sqrt' = 1/(2y)
        UnaryOp::Sqrt => {
            let two_y = e.scale(2.0, y)?;
            e.div(dy, two_y)?
        }
        // abs' = sign(x), which is 0 at x = 0
        UnaryOp::Abs => {
            let s = e.unary(UnaryOp::Sign, x)?;
            e.mul(dy, s)?
        }
        // neg' = −1
        UnaryOp::Neg => e.neg(dy)?,
        // piecewise constant: zero gradient almost everywhere
        UnaryOp::Step | UnaryOp::Sign => return Ok(None),
    };
    Ok(Some(dx))
}

fn binary(e: &mut Emit, b: BinaryOp, a: Value, c: Value, y: Value, dy: Value) -> Grads {
    let (da, dc) = match b {
        // y = a + c: da = dy, dc = dy
        BinaryOp::Add => (dy, dy),
        // y = a − c: da = dy, dc = −dy
        BinaryOp::Sub => (dy, e.neg(dy)?),
        // y = a·c: da = dy·c, dc = dy·a (one node for both when a is c, as in x·x)
        BinaryOp::Mul => {
            let da = e.mul(dy, c)?;
            (da, if a == c { da } else { e.mul(dy, a)? })
        }
        // y = a/c: da = dy/c, dc = −dy·a/c² = −dy·y/c
        BinaryOp::Div => {
            let da = e.div(dy, c)?;
            let dy_y = e.mul(dy, y)?;
            let q = e.div(dy_y, c)?;
            (da, e.neg(q)?)
        }
        // y = max(a, c): the larger operand takes dy, a tie splits it in half
        BinaryOp::Maximum => (tie_split(e, a, c, dy)?, tie_split(e, c, a, dy)?),
        // y = min(a, c): the smaller operand takes dy, a tie splits it in half
        BinaryOp::Minimum => (tie_split(e, c, a, dy)?, tie_split(e, a, c, dy)?),
        // masks are piecewise constant
        BinaryOp::Greater | BinaryOp::Equal => return Ok(vec![None, None]),
    };
    let (sa, sc) = (e.shape(a), e.shape(c));
    Ok(vec![Some(e.sum_to(da, &sa)?), Some(e.sum_to(dc, &sc)?)])
}

/// `dy · (greater(p, q) + ½·equal(p, q))`: the share of `dy` that goes to
/// `p` where `p` wins against `q`.
fn tie_split(e: &mut Emit, p: Value, q: Value, dy: Value) -> Result<Value, AutodiffError> {
    let gt = e.binary(BinaryOp::Greater, p, q)?;
    let eq = e.binary(BinaryOp::Equal, p, q)?;
    let half_eq = e.scale(0.5, eq)?;
    let share = e.add(gt, half_eq)?;
    e.mul(dy, share)
}

fn reduce(e: &mut Emit, op: ReduceOp, axes: &[usize], x: Value, y: Value, dy: Value) -> Grads {
    // An axis listed twice is still reduced once.
    let axes: Vec<usize> = axes
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let sx = e.shape(x);
    // The reduced shape with the reduced axes kept as 1, so dy broadcasts
    // back over them whether or not the forward op kept them.
    let kept: Vec<usize> = sx
        .iter()
        .enumerate()
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect();
    // Broadcasting aligns trailing axes, so when only leading axes were
    // dropped (a full reduction to a scalar, a sum over the batch) dy and y
    // broadcast as they are.
    let leading = axes.iter().all(|&a| a < axes.len());
    let to_kept = |e: &mut Emit, v: Value| match leading {
        true => Ok(v),
        false => e.reshape(v, kept.clone()),
    };
    let dy_k = to_kept(e, dy)?;
    let dx = match op {
        // y = Σ x: dx = dy broadcast
        ReduceOp::Sum => e.expand(dy_k, sx)?,
        // y = Σ x / n: dx = dy / n broadcast
        ReduceOp::Mean => {
            let n: usize = axes.iter().map(|&a| sx[a]).product();
            let n = e.scalar(n as f32)?;
            let d = e.div(dy_k, n)?;
            e.expand(d, sx)?
        }
        // y = max x: dx = dy · mask / count, mask = (x == y) — ties split equally
        ReduceOp::Max => {
            let y_k = to_kept(e, y)?;
            let mask = e.binary(BinaryOp::Equal, x, y_k)?;
            let count = e.reduce(ReduceOp::Sum, mask, axes.clone(), true)?;
            let share = e.div(dy_k, count)?;
            e.mul(mask, share)?
        }
    };
    Ok(vec![Some(dx)])
}
