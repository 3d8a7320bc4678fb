//! Small graph-editing helpers shared by the rewriting passes.
//!
//! Rewrites never delete nodes: they reroute the uses of a value to its
//! replacement and leave the old node without users, for DCE to collect.
//! That keeps node indices stable while a pass walks its precomputed order.

use crate::ir::{Graph, Op, Use, Value};
use petgraph::stable_graph::{EdgeIndex, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

/// Make every consumer of `old` (and every named output) read `new` instead.
/// The caller guarantees both have the same type.
pub fn replace_value(g: &mut Graph, old: Value, new: Value) {
    if old == new {
        return;
    }
    let uses: Vec<(EdgeIndex, NodeIndex, u16)> = g
        .graph
        .edges_directed(old.node, Direction::Outgoing)
        .filter(|e| e.weight().port == old.port)
        .map(|e| (e.id(), e.target(), e.weight().slot))
        .collect();
    for (e, target, slot) in uses {
        g.graph.remove_edge(e);
        g.graph.add_edge(
            new.node,
            target,
            Use {
                slot,
                port: new.port,
            },
        );
    }
    for o in &mut g.outputs {
        if o.value == old {
            o.value = new;
        }
    }
}

/// True when some op or named output reads a result of `n`.
pub fn is_live(g: &Graph, n: NodeIndex) -> bool {
    g.graph
        .edges_directed(n, Direction::Outgoing)
        .next()
        .is_some()
        || g.outputs.iter().any(|o| o.value.node == n)
}

/// The constant value of `v` when it is a `Fill`.
pub fn fill_value(g: &Graph, v: Value) -> Option<f32> {
    match &g.node(v.node).op {
        Op::Fill { value, .. } => Some(*value),
        _ => None,
    }
}

/// Number of elements of a value.
pub fn numel(g: &Graph, v: Value) -> usize {
    g.ty(v).shape.iter().product()
}

/// Bytes of a value (f32 and i32 are both four bytes).
pub fn bytes(g: &Graph, v: Value) -> usize {
    numel(g, v) * 4
}

/// Add a single-result node whose type the caller already knows (it is
/// re-checked by the verifier in tests).
pub fn add_typed(g: &mut Graph, op: Op, ty: crate::ir::TensorType, inputs: &[Value]) -> Value {
    g.add_node_unchecked(op, vec![ty], inputs, None)[0]
}

/// A `Fill` of `value` with `shape`.
pub fn add_fill(g: &mut Graph, value: f32, shape: Vec<usize>) -> Value {
    let ty = crate::ir::TensorType::f32(shape.clone());
    g.add_leaf(Op::Fill { value, shape }, ty, None)
}
