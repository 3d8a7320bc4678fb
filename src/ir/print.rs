//! A stable text form of a graph, for `--emit ir` and snapshot tests.
//!
//! Nodes are renumbered densely in topological order, so the text does not
//! depend on how the graph was built or edited.

use super::dim::Dim;
use super::graph::{Graph, Value};
use std::collections::HashMap;
use std::fmt::Write;

/// Render a graph: one line per node, then the named outputs.
pub fn print<D: Dim>(g: &Graph<D>) -> String {
    let order = g.topo_order();
    let ids: HashMap<_, usize> = order.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let name = |v: Value| {
        let i = ids[&v.node];
        if v.port == 0 && g.node(v.node).outputs.len() == 1 {
            format!("%{i}")
        } else {
            format!("%{i}.{}", v.port)
        }
    };
    let mut out = String::new();
    for n in &order {
        let node = g.node(*n);
        let types: Vec<String> = node.outputs.iter().map(|t| t.to_string()).collect();
        let args: Vec<String> = g.inputs(*n).into_iter().map(name).collect();
        let _ = write!(out, "%{} = {}", ids[n], node.op);
        if !args.is_empty() {
            let _ = write!(out, " ({})", args.join(", "));
        }
        let _ = writeln!(out, " : {}", types.join(", "));
    }
    for o in &g.outputs {
        let _ = writeln!(out, "{:?} {} = {}", o.kind, o.name, name(o.value));
    }
    out
}
