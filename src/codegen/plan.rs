//! Where every buffer lives: the seam between the memory planner (in
//! `passes`, which will hand over liveness-based offsets) and code
//! generation. Codegen only needs a byte offset for every non-leaf value
//! and for every kernel's scratch; how they were chosen is the planner's
//! business.

use crate::ir::{Graph, Op, Value};
use petgraph::stable_graph::NodeIndex;
use std::collections::HashMap;

/// Byte offsets into one arena.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryPlan {
    /// Offset of every value computed by a kernel (leaves fed by name are
    /// read in place and have none).
    pub values: HashMap<Value, usize>,
    /// Offset of each kernel's scratch region, for nodes that need one.
    pub scratch: HashMap<NodeIndex, usize>,
    /// Offset of the activations a recurrent forward kernel saves for its
    /// gradient kernel, by forward node (see `liveness::Sharing`).
    pub saved: HashMap<NodeIndex, usize>,
    /// Arena size in bytes.
    pub size: usize,
}

fn elem_bytes(g: &Graph, v: Value) -> usize {
    crate::tensor::numel(&g.ty(v).shape) * 4
}

impl MemoryPlan {
    /// One buffer per value, back to back, never reused: always valid,
    /// never small. `scratch_bytes` gives each node's scratch need.
    pub fn naive(g: &Graph, scratch_bytes: &HashMap<NodeIndex, usize>) -> MemoryPlan {
        let mut plan = MemoryPlan::default();
        let mut at = 0usize;
        for n in g.topo_order() {
            let node = g.node(n);
            if matches!(
                node.op,
                Op::Input { .. } | Op::Param { .. } | Op::State { .. }
            ) {
                continue;
            }
            for port in 0..node.outputs.len() {
                let v = Value {
                    node: n,
                    port: port as u16,
                };
                plan.values.insert(v, at);
                at += super::lower::align64(elem_bytes(g, v));
            }
            if let Some(&s) = scratch_bytes.get(&n) {
                if s > 0 {
                    plan.scratch.insert(n, at);
                    at += super::lower::align64(s);
                }
            }
        }
        plan.size = at;
        plan
    }

    /// Check that the plan gives every computed value and scratch region
    /// its space inside the arena; the planner's overlap rules are its own.
    pub fn check(
        &self,
        g: &Graph,
        scratch_bytes: &HashMap<NodeIndex, usize>,
    ) -> Result<(), String> {
        for n in g.graph.node_indices() {
            let node = g.node(n);
            if matches!(
                node.op,
                Op::Input { .. } | Op::Param { .. } | Op::State { .. }
            ) {
                continue;
            }
            for port in 0..node.outputs.len() {
                let v = Value {
                    node: n,
                    port: port as u16,
                };
                let off = self
                    .values
                    .get(&v)
                    .ok_or(format!("value {v} has no buffer"))?;
                if off % 16 != 0 || off + elem_bytes(g, v) > self.size {
                    return Err(format!("buffer of {v} is misaligned or outside the arena"));
                }
            }
            if let Some(&s) = scratch_bytes.get(&n) {
                if s > 0 {
                    let off = self
                        .scratch
                        .get(&n)
                        .ok_or(format!("kernel %{} has no scratch", n.index()))?;
                    if off % 16 != 0 || off + s > self.size {
                        return Err(format!(
                            "scratch of %{} is misaligned or outside the arena",
                            n.index()
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
