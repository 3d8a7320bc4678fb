//! The graph verifier: the invariants every pass must keep.
//!
//! Checked: every edge reads an existing result port; every node's operand
//! slots are `0..k` with no gap or duplicate; leaves have no operands; the
//! graph is acyclic; every named output exists and names are unique; and
//! every node's recorded result types are exactly what `ir::infer` gives for
//! its operands.

use crate::ir::{infer, Graph, Op};
use crate::tensor::DType;
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use petgraph::Direction;
use std::collections::BTreeSet;

/// `Ok` when `g` is well formed, else one sentence naming the node.
pub fn verify(g: &Graph) -> Result<(), String> {
    for e in g.graph.edge_references() {
        let src = &g.graph[e.source()];
        if e.weight().port as usize >= src.outputs.len() {
            return Err(format!(
                "edge %{} -> %{} reads port {} but {} has {} result(s)",
                e.source().index(),
                e.target().index(),
                e.weight().port,
                src.op.name(),
                src.outputs.len()
            ));
        }
    }
    for n in g.graph.node_indices() {
        let node = &g.graph[n];
        let mut slots: Vec<u16> = g
            .graph
            .edges_directed(n, Direction::Incoming)
            .map(|e| e.weight().slot)
            .collect();
        slots.sort_unstable();
        if slots.iter().enumerate().any(|(i, s)| *s as usize != i) {
            return Err(format!(
                "node %{} ({}) has operand slots {slots:?}, expected 0..{}",
                n.index(),
                node.op.name(),
                slots.len()
            ));
        }
        match &node.op {
            Op::Input { .. } | Op::Param { .. } | Op::State { .. } => {
                if !slots.is_empty() || node.outputs.len() != 1 {
                    return Err(format!(
                        "leaf %{} ({}) must have no operands and one result",
                        n.index(),
                        node.op
                    ));
                }
            }
            op => {
                let ins = g.inputs(n);
                let types: Vec<_> = ins.iter().map(|v| g.ty(*v)).collect();
                let want = infer(op, &types).map_err(|e| {
                    format!(
                        "node %{} ({}) fails its shape rule: {e}",
                        n.index(),
                        op.name()
                    )
                })?;
                if want != node.outputs {
                    let show = |ts: &[crate::ir::TensorType]| {
                        ts.iter()
                            .map(|t| t.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    return Err(format!(
                        "node %{} ({}) records type {} but its operands give {}",
                        n.index(),
                        op.name(),
                        show(&node.outputs),
                        show(&want)
                    ));
                }
            }
        }
        for t in &node.outputs {
            if t.dtype != DType::F32 && matches!(node.op, Op::Fill { .. }) {
                return Err(format!("fill %{} must be f32, is {}", n.index(), t));
            }
        }
    }
    if g.topo_order().len() != g.graph.node_count() {
        return Err("the graph has a cycle".to_string());
    }
    let mut names = BTreeSet::new();
    for o in &g.outputs {
        let Some(node) = g.graph.node_weight(o.value.node) else {
            return Err(format!("output '{}' refers to a removed node", o.name));
        };
        if o.value.port as usize >= node.outputs.len() {
            return Err(format!(
                "output '{}' reads port {} of a node with {} result(s)",
                o.name,
                o.value.port,
                node.outputs.len()
            ));
        }
        if !names.insert(o.name.as_str()) {
            return Err(format!("output '{}' is named twice", o.name));
        }
    }
    Ok(())
}
