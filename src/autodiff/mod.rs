//! Reverse-mode automatic differentiation on the IR.
//!
//! Differentiation is a graph transformation: it appends ordinary IR nodes
//! (including the gradient helper ops such as `conv_grad_input`) to the
//! forward graph, so the backward pass and the optimizer update are just
//! more IR that the passes optimise and the JIT compiles. Nothing
//! downstream knows a node came from differentiation.
//!
//! - [`gradients`] — the core: walk the graph in reverse topological order
//!   from a scalar loss, apply one rule per op (`rules.rs`), sum the
//!   contributions that reach each value.
//! - [`with_gradients`] — the forward graph plus `grad.<param>` outputs.
//! - [`training_step`] — forward, backward of the objective and the
//!   optimizer update as one graph (`train.rs`).

mod emit;
mod rules;
mod train;

pub use train::training_step;

use crate::ir::{infer, Graph, Op, OutputKind, ShapeError, Span, TensorType, Value};
use crate::model::Model;
use crate::tensor::DType;
use emit::Emit;
use petgraph::stable_graph::NodeIndex;
use std::collections::{BTreeMap, HashSet};

/// Why a gradient or training graph could not be built.
#[derive(thiserror::Error, Debug)]
pub enum AutodiffError {
    #[error("the loss must be a scalar f32 (type f32[]), but it is {ty}")]
    LossNotScalar { ty: String },
    #[error("model `{model}` has no `loss`, so there is nothing to differentiate; add a `loss = ...` statement")]
    NoLoss { model: String },
    #[error("cannot take a gradient with respect to {what}: it is {ty}, and only f32 values have gradients")]
    NotFloat { what: String, ty: String },
    #[error("`{op}` has no gradient rule, but the loss depends on its result through a value being differentiated")]
    NoGradientRule {
        op: &'static str,
        /// Where the op came from in the source, when known.
        span: Option<Span>,
    },
    #[error("building the gradient of `{op}` produced an ill-typed op: {source}")]
    Build {
        op: &'static str,
        #[source]
        source: ShapeError,
    },
    #[error("malformed graph at a `{op}` node: {message}")]
    Malformed { op: &'static str, message: String },
    #[error("invalid optimizer setting: {0}")]
    BadHyperparameter(String),
}

/// Append to `g` the gradient of scalar `loss` w.r.t. each of `wrt`; returns
/// one Value per entry of `wrt` (a zero Fill when the loss does not depend on
/// it).
pub fn gradients(g: &mut Graph, loss: Value, wrt: &[Value]) -> Result<Vec<Value>, AutodiffError> {
    let lt = g.ty(loss);
    if lt.dtype != DType::F32 || !lt.shape.is_empty() {
        return Err(AutodiffError::LossNotScalar { ty: lt.to_string() });
    }
    for &w in wrt {
        let t = g.ty(w);
        if t.dtype != DType::F32 {
            return Err(AutodiffError::NotFloat {
                what: describe(g, w),
                ty: t.to_string(),
            });
        }
    }

    // Only nodes on a path from some `wrt` to the loss carry gradient; the
    // rest (e.g. branches that only read inputs) would be dead code.
    let order = g.topo_order();
    let existing: HashSet<NodeIndex> = order.iter().copied().collect();
    let on_path = on_path(g, loss, wrt);

    // ∂loss/∂value for every value reached so far; several contributions
    // to one value are summed as they arrive.
    let mut grad: BTreeMap<Value, Value> = BTreeMap::new();
    let seed = Emit::new(g, "loss", None).scalar(1.0)?;
    grad.insert(loss, seed);

    for &n in order.iter().rev() {
        if !on_path.contains(&n) || g.node(n).op.is_leaf() {
            continue;
        }
        let node = g.node(n);
        let (op, span) = (node.op.clone(), node.span);
        if node.outputs.len() != 1 {
            // Only the gradient helper ops have several results, and they
            // have no rules; say so rather than drop a port's gradient.
            let reached = (0..node.outputs.len()).any(|p| {
                let port = p as u16;
                grad.contains_key(&Value { node: n, port })
            });
            if reached {
                return Err(AutodiffError::NoGradientRule {
                    op: op.name(),
                    span,
                });
            }
            continue;
        }
        let Some(&dy) = grad.get(&Value::new(n)) else {
            continue;
        };
        let xs = g.inputs(n);
        check_node(g, n, &xs)?;
        let y = Value::new(n);
        let mut e = Emit::new(g, op.name(), span);
        let dxs = rules::backward(&mut e, &op, &xs, y, dy)?;
        for (&x, dx) in xs.iter().zip(dxs) {
            let Some(dx) = dx else { continue };
            if !on_path.contains(&x.node) || e.g.ty(x).dtype != DType::F32 {
                continue;
            }
            // A rule that got a shape wrong would otherwise be broadcast
            // silently by the `add` that accumulates it.
            if e.g.ty(dx) != e.g.ty(x) {
                let message = format!(
                    "the gradient has type {} but its operand is {}",
                    e.g.ty(dx),
                    e.g.ty(x)
                );
                return Err(AutodiffError::Build {
                    op: op.name(),
                    source: ShapeError { message },
                });
            }
            let total = match grad.get(&x) {
                Some(&prev) => e.add(prev, dx)?,
                None => dx,
            };
            grad.insert(x, total);
        }
    }

    let results = wrt
        .iter()
        .map(|&w| match grad.get(&w) {
            Some(&d) => Ok(d),
            None => {
                let shape = g.ty(w).shape.clone();
                Emit::new(g, "loss", None).fill(0.0, shape)
            }
        })
        .collect::<Result<Vec<Value>, AutodiffError>>()?;
    remove_dead(g, &existing, &results);
    Ok(results)
}

/// Remove the nodes added since `existing` that no result depends on: rules
/// emit the gradient of every float operand (`dx` of `x @ w` when only `dw`
/// is wanted), and leaving that dead code to later passes would only make
/// every consumer of the raw graph pay for it.
fn remove_dead(g: &mut Graph, existing: &HashSet<NodeIndex>, results: &[Value]) {
    let mut live = HashSet::new();
    let mut stack: Vec<NodeIndex> = results.iter().map(|v| v.node).collect();
    while let Some(n) = stack.pop() {
        if !existing.contains(&n) && live.insert(n) {
            stack.extend(g.inputs(n).iter().map(|v| v.node));
        }
    }
    let dead: Vec<NodeIndex> = g
        .graph
        .node_indices()
        .filter(|n| !existing.contains(n) && !live.contains(n))
        .collect();
    for n in dead {
        g.graph.remove_node(n);
    }
}

/// The rules index operands and their dims by position, so make sure the
/// node really is what its op's shape rule says (a graph built with
/// `add_node_unchecked` could claim anything).
fn check_node(g: &Graph, n: NodeIndex, xs: &[Value]) -> Result<(), AutodiffError> {
    let node = g.node(n);
    let types: Vec<&TensorType> = xs.iter().map(|v| g.ty(*v)).collect();
    let malformed = |message: String| AutodiffError::Malformed {
        op: node.op.name(),
        message,
    };
    let want = infer(&node.op, &types).map_err(|e| malformed(e.message))?;
    if want != node.outputs {
        let got: Vec<String> = node.outputs.iter().map(|t| t.to_string()).collect();
        let want: Vec<String> = want.iter().map(|t| t.to_string()).collect();
        return Err(malformed(format!(
            "the node declares {} but its operands give {}",
            got.join(", "),
            want.join(", ")
        )));
    }
    Ok(())
}

/// The forward graph plus one output `grad.<param>` (OutputKind::Grad) per
/// parameter (sorted by name) — gradients of the `loss` output alone (no
/// regulariser). Used by `dlc run --grads` and golden tests.
pub fn with_gradients(model: &Model) -> Result<Graph, AutodiffError> {
    let mut g = model.graph.clone();
    let loss = loss_of(model)?;
    let params = g.params();
    let wrt: Vec<Value> = params.iter().map(|(_, v)| *v).collect();
    let grads = gradients(&mut g, loss, &wrt)?;
    for ((name, _), d) in params.iter().zip(grads) {
        g.push_output(format!("grad.{name}"), OutputKind::Grad, d);
    }
    Ok(g)
}

/// The value of the model's `loss` output.
fn loss_of(model: &Model) -> Result<Value, AutodiffError> {
    model
        .graph
        .outputs
        .iter()
        .find(|o| o.kind == OutputKind::Loss)
        .map(|o| o.value)
        .ok_or_else(|| AutodiffError::NoLoss {
            model: model.name.clone(),
        })
}

/// Nodes that both depend on some `wrt` value and feed the loss.
fn on_path(g: &Graph, loss: Value, wrt: &[Value]) -> HashSet<NodeIndex> {
    let mut feeds_loss = HashSet::new();
    let mut stack = vec![loss.node];
    while let Some(n) = stack.pop() {
        if feeds_loss.insert(n) {
            stack.extend(g.inputs(n).iter().map(|v| v.node));
        }
    }
    let mut from_wrt = HashSet::new();
    let mut stack: Vec<NodeIndex> = wrt.iter().map(|v| v.node).collect();
    while let Some(n) = stack.pop() {
        if feeds_loss.contains(&n) && from_wrt.insert(n) {
            stack.extend(g.users(n));
        }
    }
    from_wrt
}

/// A value as a user would name it: the leaf's name, or the op that made it.
fn describe(g: &Graph, v: Value) -> String {
    match &g.node(v.node).op {
        Op::Input { name } => format!("input `{name}`"),
        Op::Param { name, .. } => format!("parameter `{name}`"),
        Op::State { name } => format!("state `{name}`"),
        op => format!("the result of `{}`", op.name()),
    }
}
