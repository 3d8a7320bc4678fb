//! Scaled dot-product attention and its gradient (LANGUAGE.md §6), batched
//! over the leading dims, lowered to the matmul, elementwise, softmax and
//! reduction steps.
//!
//! The causal mask is one `[Tq + Tk − 1]` buffer of zeros then `−∞`, read
//! with a row stride of −1: row `i`, column `j` reads element
//! `Tq − 1 − i + j`, which is 0 exactly when `j ≤ i`. The whole
//! `[Tq, Tk]` score matrix of each problem is materialised in scratch.

use super::emit::Loc;
use super::kernel::{EwOp, Fill, Step, View};
use super::lower::Lowered;
use super::matmul::MmOperand;
use super::reduce::Softmax;
use super::rnn::{bcast, mat, Build};
use crate::ir::{BinaryOp, TensorType};

#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    tq: usize,
    tk: usize,
    d: usize,
    dv: usize,
}

impl Dims {
    fn of(ins: &[(Loc, &TensorType)]) -> Option<Dims> {
        let (q, k, v) = (
            &ins.first()?.1.shape,
            &ins.get(1)?.1.shape,
            &ins.get(2)?.1.shape,
        );
        let r = q.len();
        if r < 2 || k.len() != r || v.len() != r {
            return None;
        }
        let d = Dims {
            batch: q[..r - 2].iter().product(),
            tq: q[r - 2],
            tk: k[r - 2],
            d: q[r - 1],
            dv: v[r - 1],
        };
        // Empty problems are left to the interpreter.
        (d.batch * d.tq * d.tk * d.d * d.dv > 0).then_some(d)
    }
}

/// A batched matmul operand over `[batch, rows, cols]` at `loc`;
/// `transposed` reads each matrix as `[cols, rows]`.
fn operand(loc: Loc, rows: usize, cols: usize, transposed: bool) -> MmOperand {
    let (rs, cs) = if transposed {
        (1, cols as i64)
    } else {
        (cols as i64, 1)
    };
    MmOperand {
        loc,
        off: 0,
        batch_strides: vec![(rows * cols) as i64],
        rs,
        cs,
    }
}

/// `P = softmax(q kᵀ · scale [+ mask])` into a fresh `[batch, tq, tk]`
/// buffer.
fn weights(bd: &mut Build, s: Dims, q: Loc, k: Loc, causal: bool, scale: f32) -> Loc {
    let (b, tq, tk) = (s.batch, s.tq, s.tk);
    let scores = bd.alloc(b * tq * tk);
    bd.matmul(
        vec![b],
        (tq, s.d, tk),
        operand(q, tq, s.d, false),
        operand(k, tk, s.d, true),
        scores,
    );
    let sc = bd.constant(scale);
    let rows = [b * tq, tk];
    bd.binary(
        BinaryOp::Mul,
        rows,
        mat(scores, tk),
        mat(scores, tk),
        bcast(sc),
    );
    if causal {
        let mask = bd.alloc(tq + tk - 1);
        bd.fill(mask, tq + tk - 1, f32::NEG_INFINITY);
        bd.steps.push(Step::Fill(Fill {
            dst: mask,
            off: 0,
            n: tq,
            bits: 0,
        }));
        let view = View {
            loc: mask,
            off: tq - 1,
            strides: vec![0, -1, 1],
        };
        let sv = View {
            loc: scores,
            off: 0,
            strides: vec![(tq * tk) as i64, tk as i64, 1],
        };
        bd.ew(
            EwOp::Binary(BinaryOp::Add),
            &[b, tq, tk],
            sv.clone(),
            vec![sv, view],
        );
    }
    let p = bd.alloc(b * tq * tk);
    bd.steps.push(Step::Softmax(Softmax {
        src: scores,
        dst: p,
        outer: b * tq,
        len: tk,
        inner: 1,
        log: false,
    }));
    p
}

/// `attention`: `(q, k, v) -> y`.
pub fn lower_forward(
    ins: &[(Loc, &TensorType)],
    outs: &[(Loc, &TensorType)],
    causal: bool,
    scale: f32,
    scratch: usize,
) -> Option<Lowered> {
    let s = Dims::of(ins)?;
    let (q, k, v) = (ins[0].0, ins[1].0, ins[2].0);
    let y = outs.first()?.0;
    let mut bd = Build::new(scratch);
    let p = weights(&mut bd, s, q, k, causal, scale);
    bd.matmul(
        vec![s.batch],
        (s.tq, s.tk, s.dv),
        operand(p, s.tq, s.tk, false),
        operand(v, s.tk, s.dv, false),
        y,
    );
    Some(bd.finish())
}

/// `attention_grad`: `(q, k, v, dy) -> (dq, dk, dv)` with `dv = Pᵀ dy`,
/// `dS = P ∘ (dy vᵀ − rowsum(dy vᵀ ∘ P))`, `dq = dS k · scale`,
/// `dk = dSᵀ q · scale`.
pub fn lower_grad(
    ins: &[(Loc, &TensorType)],
    outs: &[(Loc, &TensorType)],
    causal: bool,
    scale: f32,
    scratch: usize,
) -> Option<Lowered> {
    let s = Dims::of(ins)?;
    let (q, k, v, dy) = (ins[0].0, ins[1].0, ins[2].0, ins.get(3)?.0);
    let (dq, dk, dv) = (outs.first()?.0, outs.get(1)?.0, outs.get(2)?.0);
    let (b, tq, tk) = (s.batch, s.tq, s.tk);
    let mut bd = Build::new(scratch);
    let p = weights(&mut bd, s, q, k, causal, scale);
    bd.matmul(
        vec![b],
        (tk, tq, s.dv),
        operand(p, tq, tk, true),
        operand(dy, tq, s.dv, false),
        dv,
    );
    let ds = bd.alloc(b * tq * tk);
    bd.matmul(
        vec![b],
        (tq, s.dv, tk),
        operand(dy, tq, s.dv, false),
        operand(v, tk, s.dv, true),
        ds,
    );
    let tmp = bd.alloc(b * tq * tk);
    let rowsum = bd.alloc(b * tq);
    let rows = [b * tq, tk];
    bd.binary(BinaryOp::Mul, rows, mat(tmp, tk), mat(ds, tk), mat(p, tk));
    bd.reduce_sum(tmp, rowsum, (b * tq, tk as i64), (tk, 1));
    let per_row = View {
        loc: rowsum,
        off: 0,
        strides: vec![1, 0],
    };
    bd.binary(BinaryOp::Sub, rows, mat(ds, tk), mat(ds, tk), per_row);
    bd.binary(BinaryOp::Mul, rows, mat(ds, tk), mat(ds, tk), mat(p, tk));
    let sc = bd.constant(scale);
    bd.binary(BinaryOp::Mul, rows, mat(ds, tk), mat(ds, tk), bcast(sc));
    bd.matmul(
        vec![b],
        (tq, tk, s.d),
        operand(ds, tq, tk, false),
        operand(k, tk, s.d, false),
        dq,
    );
    bd.matmul(
        vec![b],
        (tk, tq, s.d),
        operand(ds, tq, tk, true),
        operand(q, tq, s.d, false),
        dk,
    );
    Some(bd.finish())
}
