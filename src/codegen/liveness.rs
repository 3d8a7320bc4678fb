//! The arena plan codegen uses when it is not handed one: one buffer per
//! computed value and per kernel scratch, placed by liveness over the
//! kernel order so that buffers whose lifetimes do not meet share bytes.
//!
//! A buffer lives from the kernel that writes it to the last kernel that
//! reads it (named outputs to the end of the run: the runtime reads them
//! after the last kernel). Lifetimes are closed intervals, so a kernel's
//! results and scratch never share bytes with its own operands: no kernel
//! template has to be safe in place. The arena is smaller than one buffer
//! per value by the ratio `passes::memplan` reports, which is what keeps
//! allocating (and touching) it off the compile and run times.

use super::lower::align64;
use super::plan::MemoryPlan;
use crate::ir::{Graph, Value};
use petgraph::stable_graph::NodeIndex;
use petgraph::visit::EdgeRef;
use std::collections::{HashMap, HashSet};

/// What a buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holds {
    Value(Value),
    Scratch(NodeIndex),
}

#[derive(Clone, Copy, Debug)]
struct Interval {
    holds: Holds,
    bytes: usize,
    first: usize,
    last: usize,
}

/// Plan the arena for `kernels` (the non-leaf nodes, in execution order);
/// `scratch_bytes` gives each node's scratch need.
pub fn plan(
    g: &Graph,
    kernels: &[NodeIndex],
    scratch_bytes: &HashMap<NodeIndex, usize>,
) -> MemoryPlan {
    let position: HashMap<NodeIndex, usize> =
        kernels.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let named: HashSet<Value> = g.outputs.iter().map(|o| o.value).collect();
    let mut intervals = Vec::new();
    for (i, &n) in kernels.iter().enumerate() {
        let node = g.node(n);
        for port in 0..node.outputs.len() {
            let v = Value {
                node: n,
                port: port as u16,
            };
            let last = if named.contains(&v) {
                usize::MAX
            } else {
                g.graph
                    .edges_directed(n, petgraph::Direction::Outgoing)
                    .filter(|e| e.weight().port == v.port)
                    .filter_map(|e| position.get(&e.target()).copied())
                    .max()
                    .unwrap_or(i)
                    .max(i)
            };
            intervals.push(Interval {
                holds: Holds::Value(v),
                bytes: align64(crate::tensor::numel(&g.ty(v).shape) * 4),
                first: i,
                last,
            });
        }
        if let Some(&s) = scratch_bytes.get(&n) {
            if s > 0 {
                intervals.push(Interval {
                    holds: Holds::Scratch(n),
                    bytes: align64(s),
                    first: i,
                    last: i,
                });
            }
        }
    }
    let offsets = place(&intervals);
    let mut out = MemoryPlan::default();
    for (iv, off) in intervals.iter().zip(&offsets) {
        match iv.holds {
            Holds::Value(v) => {
                out.values.insert(v, *off);
            }
            Holds::Scratch(n) => {
                out.scratch.insert(n, *off);
            }
        }
        out.size = out.size.max(off + iv.bytes);
    }
    out
}

/// Offsets for `intervals` (same order): largest first, each at the lowest
/// 64-byte-aligned offset clear of every placed buffer whose lifetime meets
/// its own. Ties go by first use, so the plan depends only on the graph.
fn place(intervals: &[Interval]) -> Vec<usize> {
    let mut by_size: Vec<usize> = (0..intervals.len()).collect();
    by_size.sort_by(|&a, &b| {
        let (x, y) = (&intervals[a], &intervals[b]);
        y.bytes.cmp(&x.bytes).then(x.first.cmp(&y.first)).then(a.cmp(&b))
    });
    let mut offsets = vec![0usize; intervals.len()];
    let mut placed: Vec<usize> = Vec::with_capacity(intervals.len());
    let mut clash: Vec<(usize, usize)> = Vec::new();
    for &i in &by_size {
        let me = &intervals[i];
        clash.clear();
        clash.extend(
            placed
                .iter()
                .filter(|&&j| {
                    let other = &intervals[j];
                    other.first <= me.last && me.first <= other.last
                })
                .map(|&j| (offsets[j], offsets[j] + intervals[j].bytes)),
        );
        clash.sort_unstable();
        let mut at = 0usize;
        for &(lo, hi) in &clash {
            if at + me.bytes <= lo {
                break;
            }
            at = at.max(hi);
        }
        offsets[i] = at;
        placed.push(i);
    }
    offsets
}

/// Every pair of buffers that are live at the same kernel and share bytes;
/// empty for a valid plan. For tests and debugging.
pub fn overlaps(
    g: &Graph,
    kernels: &[NodeIndex],
    scratch_bytes: &HashMap<NodeIndex, usize>,
    plan: &MemoryPlan,
) -> Vec<String> {
    let position: HashMap<NodeIndex, usize> =
        kernels.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let named: HashSet<Value> = g.outputs.iter().map(|o| o.value).collect();
    // (name, offset, bytes, first, last)
    let mut live: Vec<(String, usize, usize, usize, usize)> = Vec::new();
    for (v, &off) in &plan.values {
        let Some(&first) = position.get(&v.node) else {
            continue;
        };
        let last = if named.contains(v) {
            usize::MAX
        } else {
            g.graph
                .edges_directed(v.node, petgraph::Direction::Outgoing)
                .filter(|e| e.weight().port == v.port)
                .filter_map(|e| position.get(&e.target()).copied())
                .max()
                .unwrap_or(first)
                .max(first)
        };
        let bytes = crate::tensor::numel(&g.ty(*v).shape) * 4;
        live.push((format!("{v}"), off, bytes, first, last));
    }
    for (n, &off) in &plan.scratch {
        if let (Some(&i), Some(&bytes)) = (position.get(n), scratch_bytes.get(n)) {
            live.push((format!("scratch of %{}", n.index()), off, bytes, i, i));
        }
    }
    let mut out = Vec::new();
    for a in 0..live.len() {
        for b in a + 1..live.len() {
            let (x, y) = (&live[a], &live[b]);
            let meet = x.3 <= y.4 && y.3 <= x.4;
            let share = x.1 < y.1 + y.2 && y.1 < x.1 + x.2;
            if meet && share && x.2 > 0 && y.2 > 0 {
                out.push(format!("{} and {} overlap", x.0, y.0));
            }
        }
    }
    out.sort();
    out
}
