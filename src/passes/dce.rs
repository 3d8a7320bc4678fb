//! Dead-code elimination: keep what the named outputs depend on.
//!
//! `Input`, `Param` and `State` leaves are kept even when unused: they are
//! the graph's interface (what callers feed and what `init` initialises), and
//! removing one would change which feeds a caller must supply.

use super::{Pass, PassError, PassStats};
use crate::ir::{Graph, Op};
use petgraph::Direction;
use std::collections::HashSet;

pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &str {
        "dce"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        let (stats, t) = PassStats::start(self.name(), g);
        let mut live = HashSet::new();
        let mut stack: Vec<_> = g.outputs.iter().map(|o| o.value.node).collect();
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(g.graph.neighbors_directed(n, Direction::Incoming));
            }
        }
        let dead: Vec<_> = g
            .graph
            .node_indices()
            .filter(|n| {
                !live.contains(n)
                    && !matches!(
                        g.graph[*n].op,
                        Op::Input { .. } | Op::Param { .. } | Op::State { .. }
                    )
            })
            .collect();
        for n in &dead {
            g.graph.remove_node(*n);
        }
        Ok(stats.finish(g, t, dead.len()))
    }
}
