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
    Saved(NodeIndex),
}

#[derive(Clone, Copy, Debug)]
struct Interval {
    holds: Holds,
    bytes: usize,
    first: usize,
    last: usize,
}

/// How kernels share work and bytes beyond one node, one buffer per value.
#[derive(Debug, Default)]
pub struct Sharing {
    /// A value with no buffer of its own (a reshape, say): a view of the
    /// value it maps to, which a kernel computes and which stays live for
    /// the alias's readers too.
    pub aliases: HashMap<Value, Value>,
    /// A node computed inside the kernel of the node it maps to (a fused
    /// elementwise chain): it has no buffer, and what it reads is read by
    /// that kernel.
    pub merged: HashMap<NodeIndex, NodeIndex>,
    /// A node whose results the kernel of the node it maps to also writes
    /// (a loss computed with its gradient): its buffers are live from that
    /// kernel on.
    pub co_computed: HashMap<NodeIndex, NodeIndex>,
    /// Aliases that are the transpose (last two axes swapped) of the value
    /// they map to: only matmuls read them, through swapped strides.
    pub transposed: HashSet<Value>,
    /// A recurrent forward node whose kernel saves its activations (bytes)
    /// for the gradient node it maps to, which then reads them and the
    /// forward's hidden states instead of running the forward again.
    pub saved: HashMap<NodeIndex, (NodeIndex, usize)>,
    /// Row groups by root: the root's kernel computes every member (each
    /// also in `merged` or, when read outside the group, `co_computed`).
    pub rows: HashMap<NodeIndex, super::rows::RowGroup>,
    /// A matmul epilogue's root and the elementwise node (with its chain)
    /// its kernel computes next (`co_computed` with that root too).
    pub follows: HashMap<NodeIndex, NodeIndex>,
}

impl Sharing {
    /// Whether `n` has no kernel of its own.
    pub fn absorbed(&self, n: NodeIndex) -> bool {
        self.aliases.contains_key(&Value::new(n))
            || self.merged.contains_key(&n)
            || self.co_computed.contains_key(&n)
    }
}

/// Plan the arena for `kernels` (the nodes with a kernel, in execution
/// order); `scratch_bytes` gives each node's scratch need.
pub fn plan(
    g: &Graph,
    kernels: &[NodeIndex],
    scratch_bytes: &HashMap<NodeIndex, usize>,
    sharing: &Sharing,
) -> MemoryPlan {
    let Sharing {
        aliases,
        merged,
        co_computed,
        saved,
        ..
    } = sharing;
    let mut position: HashMap<NodeIndex, usize> =
        kernels.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    // Co-computed nodes first: a chain may be merged into one (an epilogue
    // follower), and then takes the position it gets here.
    for (member, root) in co_computed.iter().chain(merged) {
        if let Some(&at) = position.get(root) {
            position.insert(*member, at);
        }
    }
    let named: HashSet<Value> = g.outputs.iter().map(|o| o.value).collect();
    // Last kernel reading each value's bytes, through its aliases too.
    let mut last_read: HashMap<Value, usize> = HashMap::new();
    for e in g.graph.edge_indices() {
        let Some((src, dst)) = g.graph.edge_endpoints(e) else {
            continue;
        };
        let v = Value {
            node: src,
            port: g.graph[e].port,
        };
        let owner = aliases.get(&v).copied().unwrap_or(v);
        let at = if named.contains(&v) {
            Some(usize::MAX)
        } else {
            position.get(&dst).copied()
        };
        if let Some(at) = at {
            let l = last_read.entry(owner).or_insert(at);
            *l = (*l).max(at);
        }
    }
    for v in &named {
        let owner = aliases.get(v).copied().unwrap_or(*v);
        last_read.insert(owner, usize::MAX);
    }
    // The gradient kernel reads the forward's hidden states.
    for (fwd, (grad, _)) in saved {
        if let Some(&at) = position.get(grad) {
            let l = last_read.entry(Value::new(*fwd)).or_insert(at);
            *l = (*l).max(at);
        }
    }
    let mut intervals = Vec::new();
    for (i, &k) in kernels.iter().enumerate() {
        let mut written = vec![k];
        written.extend(
            co_computed
                .iter()
                .filter(|(_, r)| **r == k)
                .map(|(m, _)| *m),
        );
        written.sort();
        for &n in &written {
            let node = g.node(n);
            for port in 0..node.outputs.len() {
                let v = Value {
                    node: n,
                    port: port as u16,
                };
                let last = last_read.get(&v).copied().unwrap_or(i).max(i);
                intervals.push(Interval {
                    holds: Holds::Value(v),
                    bytes: align64(crate::tensor::numel(&g.ty(v).shape) * 4),
                    first: i,
                    last,
                });
            }
        }
        if let Some(&(grad, bytes)) = saved.get(&k) {
            intervals.push(Interval {
                holds: Holds::Saved(k),
                bytes: align64(bytes),
                first: i,
                last: position.get(&grad).copied().unwrap_or(i).max(i),
            });
        }
        if let Some(&s) = scratch_bytes.get(&k) {
            if s > 0 {
                intervals.push(Interval {
                    holds: Holds::Scratch(k),
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
            Holds::Saved(n) => {
                out.saved.insert(n, *off);
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
        y.bytes
            .cmp(&x.bytes)
            .then(x.first.cmp(&y.first))
            .then(a.cmp(&b))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Compiler;
    use crate::model::Optimizer;

    const MLP: &str = "model m {
        input x: f32[N, 12]
        input label: i32[N]
        h1 = x |> dense(9) |> relu
        h2 = h1 |> dense(7) |> relu
        logits = h2 |> dense(3)
        output probs = softmax(logits)
        loss = cross_entropy(logits, label)
    }";

    fn training_step() -> Graph {
        let m = Compiler::new()
            .dim("N", 5)
            .compile_source("m.dl", MLP)
            .expect("compiles");
        let g = m
            .training_graph(
                &Optimizer::Sgd {
                    lr: 0.1,
                    momentum: 0.9,
                },
                None,
            )
            .expect("training step");
        crate::passes::optimize(&g, crate::passes::OptLevel::default()).0
    }

    fn kernels(g: &Graph) -> Vec<NodeIndex> {
        g.topo_order()
            .into_iter()
            .filter(|&n| {
                !matches!(
                    g.node(n).op,
                    crate::ir::Op::Input { .. }
                        | crate::ir::Op::Param { .. }
                        | crate::ir::Op::State { .. }
                )
            })
            .collect()
    }

    #[test]
    fn live_buffers_never_share_bytes_and_the_arena_shrinks() {
        let g = training_step();
        let ks = kernels(&g);
        // Scratch on every kernel, to check it against the values too.
        let scratch: HashMap<NodeIndex, usize> = ks.iter().map(|&n| (n, 100)).collect();
        let p = plan(&g, &ks, &scratch, &Sharing::default());
        assert_eq!(overlaps(&g, &ks, &scratch, &p), Vec::<String>::new());
        let naive = MemoryPlan::naive(&g, &scratch);
        assert!(p.size < naive.size, "{} vs naive {}", p.size, naive.size);
        assert!(p.check(&g, &scratch).is_ok());
        for off in p.values.values().chain(p.scratch.values()) {
            assert_eq!(off % 64, 0);
        }
    }

    #[test]
    fn the_checker_sees_a_clash() {
        let g = training_step();
        let ks = kernels(&g);
        let scratch = HashMap::new();
        let mut p = plan(&g, &ks, &scratch, &Sharing::default());
        // Every value at offset 0: a kernel's operand and result then meet.
        for off in p.values.values_mut() {
            *off = 0;
        }
        assert!(!overlaps(&g, &ks, &scratch, &p).is_empty());
    }

    #[test]
    fn a_result_never_shares_bytes_with_its_operands() {
        let g = training_step();
        let ks = kernels(&g);
        let p = plan(&g, &ks, &HashMap::new(), &Sharing::default());
        for &n in &ks {
            for v in g.inputs(n) {
                let Some(&a) = p.values.get(&v) else { continue };
                let ab = crate::tensor::numel(&g.ty(v).shape) * 4;
                for port in 0..g.node(n).outputs.len() {
                    let r = Value {
                        node: n,
                        port: port as u16,
                    };
                    let b = p.values[&r];
                    let bb = crate::tensor::numel(&g.ty(r).shape) * 4;
                    assert!(a + ab <= b || b + bb <= a, "{r} over its operand {v}");
                }
            }
        }
    }
}
