//! Constant folding of `Fill`-only subgraphs.
//!
//! An op whose operands are all `Fill`s has a uniform result, so it becomes
//! one `Fill`. Values are computed in f64 and rounded to f32 once, which is
//! exactly what the interpreter does per op (and for `+ - * /` the same as
//! f32 arithmetic). Non-finite operands are left alone, so the interpreter
//! keeps the last word on NaN and infinity semantics.

use super::rewrite::{add_fill, fill_value, is_live, replace_value};
use super::{Pass, PassError, PassStats};
use crate::ir::{BinaryOp, Graph, Op, ReduceOp, UnaryOp, Value};

pub struct FoldConstants;

impl Pass for FoldConstants {
    fn name(&self) -> &str {
        "fold"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        let (stats, t) = PassStats::start(self.name(), g);
        let mut changes = 0;
        for n in g.topo_order() {
            let node = g.node(n);
            if node.op.is_leaf() || node.outputs.len() != 1 || !is_live(g, n) {
                continue;
            }
            let ins = g.inputs(n);
            let Some(vals) = ins
                .iter()
                .map(|v| fill_value(g, *v).filter(|x| x.is_finite()))
                .collect::<Option<Vec<f32>>>()
            else {
                continue;
            };
            if let Some(value) = fold(g, &node.op, &ins, &vals) {
                let shape = node.outputs[0].shape.clone();
                let f = add_fill(g, value, shape);
                replace_value(g, Value::new(n), f);
                changes += 1;
            }
        }
        Ok(stats.finish(g, t, changes))
    }
}

fn round(x: f64) -> f32 {
    x as f32
}

/// The uniform result of `op` on uniform operands `vals`, when known.
fn fold(g: &Graph, op: &Op, ins: &[Value], vals: &[f32]) -> Option<f32> {
    let numel = |v: Value| g.ty(v).shape.iter().product::<usize>();
    match op {
        Op::Unary(u) => {
            let x = vals[0] as f64;
            Some(round(match u {
                UnaryOp::Relu => x.max(0.0),
                UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
                UnaryOp::Tanh => x.tanh(),
                UnaryOp::Exp => x.exp(),
                UnaryOp::Log => x.ln(),
                UnaryOp::Sqrt => x.sqrt(),
                UnaryOp::Abs => x.abs(),
                UnaryOp::Neg => -x,
                UnaryOp::Step => f64::from(u8::from(x > 0.0)),
                UnaryOp::Sign => {
                    if x > 0.0 {
                        1.0
                    } else if x < 0.0 {
                        -1.0
                    } else {
                        0.0
                    }
                }
            }))
        }
        Op::Binary(b) => {
            let (x, y) = (vals[0] as f64, vals[1] as f64);
            Some(round(match b {
                BinaryOp::Add => x + y,
                BinaryOp::Sub => x - y,
                BinaryOp::Mul => x * y,
                BinaryOp::Div => x / y,
                BinaryOp::Maximum => x.max(y),
                BinaryOp::Minimum => x.min(y),
                BinaryOp::Greater => f64::from(u8::from(x > y)),
                BinaryOp::Equal => f64::from(u8::from(x == y)),
            }))
        }
        Op::Reshape { .. } | Op::Expand { .. } | Op::Transpose { .. } | Op::Slice { .. } => {
            Some(vals[0])
        }
        // pad_slice fills the rest with zeros, so only a zero stays uniform
        Op::PadSlice { .. } => (vals[0] == 0.0).then_some(vals[0]),
        Op::Concat { .. } => vals
            .iter()
            .all(|v| v.to_bits() == vals[0].to_bits())
            .then_some(vals[0]),
        Op::Reduce { op, axes, .. } => {
            let shape = &g.ty(ins[0]).shape;
            let count: usize = axes.iter().map(|a| shape[*a]).product();
            if count == 0 {
                return None;
            }
            Some(match op {
                ReduceOp::Sum => round(vals[0] as f64 * count as f64),
                ReduceOp::Mean | ReduceOp::Max => vals[0],
            })
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            let n = g.ty(ins[0]).shape[*axis];
            if n == 0 {
                return None;
            }
            // every entry equals the max, so exp(x - max) = 1 and the row sums to n
            Some(match op {
                Op::Softmax { .. } => round(1.0 / n as f64),
                _ => round(-(n as f64).ln()),
            })
        }
        Op::MatMul => {
            let a = &g.ty(ins[0]).shape;
            let k = a[a.len() - 1];
            if k == 0 || numel(ins[0]) == 0 {
                return None;
            }
            Some(round(vals[0] as f64 * vals[1] as f64 * k as f64))
        }
        _ => None,
    }
}
