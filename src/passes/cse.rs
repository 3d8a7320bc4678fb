//! Common-subexpression elimination: two nodes with the same op, attributes
//! and operands compute the same value, so the later one is replaced by the
//! earlier. `a + b` and `b + a` (likewise `*`) are the same value in IEEE
//! arithmetic, so their operands are compared as a set.

use super::rewrite::replace_value;
use super::{Pass, PassError, PassStats};
use crate::ir::{BinaryOp, Graph, Op, Value};
use petgraph::stable_graph::NodeIndex;
use std::collections::HashMap;

pub struct Cse;

impl Pass for Cse {
    fn name(&self) -> &str {
        "cse"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        let (stats, t) = PassStats::start(self.name(), g);
        let mut seen: HashMap<(String, Vec<Value>), NodeIndex> = HashMap::new();
        let mut changes = 0;
        // Topological order: a node's operands are already canonical when it is visited.
        for n in g.topo_order() {
            let op = &g.node(n).op;
            // Named leaves are distinct by construction, and a second `input "x"` would
            // be a front-end bug that CSE should not hide.
            if matches!(op, Op::Input { .. } | Op::Param { .. } | Op::State { .. }) {
                continue;
            }
            let mut ins = g.inputs(n);
            if matches!(op, Op::Binary(BinaryOp::Add | BinaryOp::Mul)) {
                ins.sort();
            }
            // Debug of an op prints f32 attributes in round-trip form, so equal
            // keys mean bitwise-equal attributes.
            let key = (format!("{op:?}"), ins);
            match seen.get(&key) {
                Some(&first) => {
                    for port in 0..g.node(n).outputs.len() {
                        let port = port as u16;
                        replace_value(g, Value { node: n, port }, Value { node: first, port });
                    }
                    changes += 1;
                }
                None => {
                    seen.insert(key, n);
                }
            }
        }
        Ok(stats.finish(g, t, changes))
    }
}
