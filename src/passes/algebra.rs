//! Algebraic identities, one small rule each, grouped by topic.
//!
//! Every rule returns the value that replaces the node (possibly built from
//! new nodes) or `None`. Rules only fire where the replacement has exactly
//! the node's type, so a broadcasting `x · 1` that enlarges `x` is left
//! alone. Exact rules keep results equal as IEEE values; the only bit that
//! may change is the sign of a zero (`-0 + 0 = +0`, but `x + 0 → x` keeps
//! `-0`). `x · 0 = 0` is *not* an identity for NaN or ±∞ (`NaN·0 = NaN`), so
//! it fires only when `x` is a 0/1 mask (`greater`, `equal`, `step`).
//! Reassociating rules (the sum of an expand) run only when asked (O2).

use super::rewrite::{add_fill, add_typed, fill_value, is_live, replace_value};
use super::{Pass, PassError, PassStats};
use crate::ir::{infer, BinaryOp, Graph, Op, ReduceOp, TensorType, UnaryOp, Value};
use petgraph::stable_graph::NodeIndex;

pub struct Algebra {
    /// Also apply rules that reorder floating-point sums.
    pub reassociate: bool,
}

impl Pass for Algebra {
    fn name(&self) -> &str {
        "algebra"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        let (stats, t) = PassStats::start(self.name(), g);
        let mut changes = 0;
        for n in g.topo_order() {
            let node = g.node(n);
            if node.op.is_leaf() || node.outputs.len() != 1 || !is_live(g, n) {
                continue;
            }
            let want = node.outputs[0].clone();
            let Some(r) = rewrite(g, n, self.reassociate) else {
                continue;
            };
            if *g.ty(r) != want {
                return Err(PassError::Invalid {
                    pass: self.name().into(),
                    message: format!(
                        "a rewrite of %{} ({}) gave type {} instead of {}",
                        n.index(),
                        g.node(n).op.name(),
                        g.ty(r),
                        want
                    ),
                });
            }
            replace_value(g, Value::new(n), r);
            changes += 1;
        }
        Ok(stats.finish(g, t, changes))
    }
}

fn rewrite(g: &mut Graph, n: NodeIndex, reassociate: bool) -> Option<Value> {
    let op = g.node(n).op.clone();
    let ins = g.inputs(n);
    let out = g.node(n).outputs[0].clone();
    match op {
        Op::Binary(b) => binary(g, b, ins[0], ins[1], &out),
        Op::Unary(u) => unary(g, n, u, ins[0]),
        Op::Transpose { perm } => transpose(g, &perm, ins[0]),
        Op::Reshape { shape } => reshape(g, &shape, ins[0], &out),
        Op::Expand { shape } => expand(g, &shape, ins[0], &out),
        Op::Slice { axis, start, end } => slice(g, axis, start, end, ins[0], &out),
        Op::Concat { .. } if ins.len() == 1 => Some(ins[0]),
        Op::Reduce { op, axes, keepdims } => {
            reduce(g, op, &axes, keepdims, ins[0], &out, reassociate)
        }
        _ => None,
    }
}

/// The producer op of `v`, when it is single-result.
fn producer(g: &Graph, v: Value) -> &Op {
    &g.node(v.node).op
}

fn is_fill(g: &Graph, v: Value, x: f32) -> bool {
    fill_value(g, v).is_some_and(|f| f == x)
}

fn binary(g: &mut Graph, b: BinaryOp, x: Value, y: Value, out: &TensorType) -> Option<Value> {
    let same = |g: &Graph, v: Value| g.ty(v) == out;
    match b {
        BinaryOp::Mul => {
            // x·1 = x
            if is_fill(g, y, 1.0) && same(g, x) {
                return Some(x);
            }
            // 1·x = x
            if is_fill(g, x, 1.0) && same(g, y) {
                return Some(y);
            }
            // m·0 = 0 for a 0/1 mask m (never NaN or ∞, so no NaN·0 to preserve)
            for (m, z) in [(x, y), (y, x)] {
                if let Some(zero) = fill_value(g, z).filter(|v| *v == 0.0) {
                    if is_mask(producer(g, m)) {
                        return Some(add_fill(g, zero, out.shape.clone()));
                    }
                }
            }
            // x·(-1) = -x
            if is_fill(g, y, -1.0) && same(g, x) {
                return Some(unary_node(g, UnaryOp::Neg, x));
            }
            // (-1)·x = -x
            if is_fill(g, x, -1.0) && same(g, y) {
                return Some(unary_node(g, UnaryOp::Neg, y));
            }
            None
        }
        BinaryOp::Div => {
            // x/1 = x
            (is_fill(g, y, 1.0) && same(g, x)).then_some(x)
        }
        BinaryOp::Add => {
            // x+0 = x (for x = -0 this keeps -0 where IEEE gives +0)
            if fill_value(g, y).is_some_and(|v| v == 0.0) && same(g, x) {
                return Some(x);
            }
            // 0+x = x
            if fill_value(g, x).is_some_and(|v| v == 0.0) && same(g, y) {
                return Some(y);
            }
            // x + (-y) = x - y
            if let Op::Unary(UnaryOp::Neg) = producer(g, y) {
                let inner = g.inputs(y.node)[0];
                return binary_node(g, BinaryOp::Sub, x, inner);
            }
            // (-x) + y = y - x
            if let Op::Unary(UnaryOp::Neg) = producer(g, x) {
                let inner = g.inputs(x.node)[0];
                return binary_node(g, BinaryOp::Sub, y, inner);
            }
            None
        }
        BinaryOp::Sub => {
            // x-0 = x (exact, also for x = -0)
            if fill_value(g, y).is_some_and(|v| v == 0.0) && same(g, x) {
                return Some(x);
            }
            // x - (-y) = x + y
            if let Op::Unary(UnaryOp::Neg) = producer(g, y) {
                let inner = g.inputs(y.node)[0];
                return binary_node(g, BinaryOp::Add, x, inner);
            }
            None
        }
        _ => None,
    }
}

/// Ops whose every result is exactly 0 or 1.
fn is_mask(op: &Op) -> bool {
    matches!(
        op,
        Op::Binary(BinaryOp::Greater | BinaryOp::Equal) | Op::Unary(UnaryOp::Step)
    )
}

fn unary_node(g: &mut Graph, u: UnaryOp, x: Value) -> Value {
    let ty = g.ty(x).clone();
    add_typed(g, Op::Unary(u), ty, &[x])
}

fn binary_node(g: &mut Graph, b: BinaryOp, x: Value, y: Value) -> Option<Value> {
    let op = Op::Binary(b);
    let ty = infer(&op, &[g.ty(x), g.ty(y)]).ok()?.pop()?;
    Some(add_typed(g, op, ty, &[x, y]))
}

fn unary(g: &mut Graph, n: NodeIndex, u: UnaryOp, x: Value) -> Option<Value> {
    match (u, producer(g, x)) {
        // -(-x) = x
        (UnaryOp::Neg, Op::Unary(UnaryOp::Neg)) => Some(g.inputs(x.node)[0]),
        // step(x) = step(relu(x)) since relu(x) > 0 ⇔ x > 0; reading the relu
        // (kept for the backward pass anyway) lets the pre-activation die early.
        (UnaryOp::Step, _) => {
            let relu = g.users(x.node).into_iter().find(|&u| {
                u != n && g.node(u).op == Op::Unary(UnaryOp::Relu) && g.inputs(u)[0] == x
            })?;
            let r = Value::new(relu);
            Some(unary_node(g, UnaryOp::Step, r))
        }
        _ => None,
    }
}

fn transpose(g: &mut Graph, perm: &[usize], x: Value) -> Option<Value> {
    // transpose(x, id) = x
    if perm.iter().enumerate().all(|(i, p)| i == *p) {
        return Some(x);
    }
    // transpose(transpose(x, p), q) = transpose(x, i ↦ p[q[i]])
    if let Op::Transpose { perm: inner } = producer(g, x) {
        let composed: Vec<usize> = perm.iter().map(|&q| inner[q]).collect();
        let src = g.inputs(x.node)[0];
        if composed.iter().enumerate().all(|(i, p)| i == *p) {
            return Some(src);
        }
        let op = Op::Transpose { perm: composed };
        let ty = infer(&op, &[g.ty(src)]).ok()?.pop()?;
        return Some(add_typed(g, op, ty, &[src]));
    }
    None
}

fn reshape(g: &mut Graph, shape: &[usize], x: Value, out: &TensorType) -> Option<Value> {
    // reshape(x, shape(x)) = x
    if g.ty(x) == out {
        return Some(x);
    }
    // reshape(reshape(x, s1), s2) = reshape(x, s2)
    if let Op::Reshape { .. } = producer(g, x) {
        let src = g.inputs(x.node)[0];
        if g.ty(src) == out {
            return Some(src);
        }
        let op = Op::Reshape {
            shape: shape.to_vec(),
        };
        return Some(add_typed(g, op, out.clone(), &[src]));
    }
    None
}

fn expand(g: &mut Graph, shape: &[usize], x: Value, out: &TensorType) -> Option<Value> {
    // expand(x, shape(x)) = x
    if g.ty(x) == out {
        return Some(x);
    }
    // expand(expand(x, s1), s2) = expand(x, s2): broadcasting is transitive
    if let Op::Expand { .. } = producer(g, x) {
        let src = g.inputs(x.node)[0];
        let op = Op::Expand {
            shape: shape.to_vec(),
        };
        let ty = infer(&op, &[g.ty(src)]).ok()?.pop()?;
        return Some(add_typed(g, op, ty, &[src]));
    }
    None
}

fn slice(
    g: &mut Graph,
    axis: usize,
    start: usize,
    end: usize,
    x: Value,
    out: &TensorType,
) -> Option<Value> {
    // slice(x, 0..len) = x
    if g.ty(x) == out {
        return Some(x);
    }
    // slice(pad_slice(x, start), start..start+len(x)) = x
    if let Op::PadSlice {
        axis: a, start: s, ..
    } = producer(g, x)
    {
        let src = g.inputs(x.node)[0];
        if *a == axis && *s == start && g.ty(src) == out && end - start == out.shape[axis] {
            return Some(src);
        }
    }
    None
}

fn reduce(
    g: &mut Graph,
    op: ReduceOp,
    axes: &[usize],
    keepdims: bool,
    x: Value,
    out: &TensorType,
    reassociate: bool,
) -> Option<Value> {
    let xs = g.ty(x).shape.clone();
    // reduce over axes of size 1 = reshape (a sum of one element is the element)
    if axes.iter().all(|a| xs[*a] == 1) {
        if g.ty(x) == out {
            return Some(x);
        }
        let op = Op::Reshape {
            shape: out.shape.clone(),
        };
        return Some(add_typed(g, op, out.clone(), &[x]));
    }
    if !reassociate {
        return None;
    }
    let Op::Expand { .. } = producer(g, x) else {
        return None;
    };
    // sum_A(expand(x)) = expand(k · sum_A'(x)): the broadcast axes in A hold k
    // copies of each value (A' are A's axes within x); mean and max of copies
    // are the value itself, so they drop the factor.
    let src = g.inputs(x.node)[0];
    let ss = g.ty(src).shape.clone();
    let lead = xs.len() - ss.len();
    let broadcast = |j: usize| j < lead || (ss[j - lead] == 1 && xs[j] != 1);
    let k: usize = axes
        .iter()
        .filter(|&&j| broadcast(j))
        .map(|&j| xs[j])
        .product();
    let inner_axes: Vec<usize> = axes
        .iter()
        .filter(|&&a| a >= lead)
        .map(|&a| a - lead)
        .collect();
    let mut v = src;
    if !inner_axes.is_empty() {
        let rop = Op::Reduce {
            op,
            axes: inner_axes,
            keepdims,
        };
        let ty = infer(&rop, &[g.ty(v)]).ok()?.pop()?;
        v = add_typed(g, rop, ty, &[v]);
    }
    if op == ReduceOp::Sum && k != 1 {
        let kf = add_fill(g, k as f32, vec![]);
        v = binary_node(g, BinaryOp::Mul, v, kf)?;
    }
    if g.ty(v).shape != out.shape {
        // only size-1 axes differ when the counts agree: a reshape, not a broadcast
        let same_count =
            g.ty(v).shape.iter().product::<usize>() == out.shape.iter().product::<usize>();
        let ex = if same_count {
            Op::Reshape {
                shape: out.shape.clone(),
            }
        } else {
            Op::Expand {
                shape: out.shape.clone(),
            }
        };
        let ty = infer(&ex, &[g.ty(v)]).ok()?.pop()?;
        v = add_typed(g, ex, ty, &[v]);
    }
    Some(v)
}
