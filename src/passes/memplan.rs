//! The memory plan: every materialised intermediate gets an offset in one
//! arena, from liveness intervals over the kernel schedule.
//!
//! - A buffer is needed for each value a group writes that another group
//!   reads (and for anchor results nothing reads, as scratch). Parameters,
//!   optimizer state, inputs, constants and named outputs live outside the
//!   arena; values internal to a fused group need no buffer.
//! - Its interval is `[step that writes it, last step that reads it]`.
//! - In place: a pure elementwise loop (unary/binary ops, all of one shape)
//!   writes its result over an operand of the same shape whose last reader it
//!   is. That is safe because such a loop reads element `i` of every operand
//!   before it writes element `i` of any result.
//! - Views: a kernel that only reshapes a stored value gets the same bytes
//!   (a row-major reshape does not move data), so both stay live together.
//! - Offsets: greedy by size — largest first, each at the lowest aligned
//!   offset that overlaps no placed buffer live at the same time.
//!
//! **Invariant** ([`check`]): no two buffers live at the same step overlap,
//! except a result and the operand it overwrites in place, and a view and
//! the buffer it views; every buffer is written before it is read.

use super::fusion::{KernelGroup, KernelKind};
use super::rewrite::bytes;
use crate::ir::{fmt_shape, Graph, Op, Value};
use petgraph::stable_graph::NodeIndex;
use std::collections::{HashMap, HashSet};
use std::fmt::Write;

/// Alignment of every buffer offset, in bytes (a cache line; SIMD loads of
/// f32x4 need 16).
pub const ALIGN: usize = 64;

/// One arena buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Buffer {
    pub value: Value,
    pub bytes: usize,
    pub offset: usize,
    /// Index (in schedule order) of the kernel that writes it.
    pub def: usize,
    /// Index of the last kernel that reads it (`def` when none does).
    pub last_use: usize,
    /// The operand whose storage this result overwrites.
    pub inplace_of: Option<Value>,
    /// The buffer this one is a reshape of: same bytes at the same offset,
    /// both live at once (its kernel only copies the data onto itself).
    pub view_of: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryPlan {
    pub buffers: Vec<Buffer>,
    /// Size of the arena: the end of the highest buffer.
    pub arena_bytes: usize,
    /// The most bytes live at once in this schedule (in-place pairs once):
    /// a lower bound for `arena_bytes`.
    pub peak_bytes: usize,
    /// Every intermediate value of the graph in its own buffer: what running
    /// op by op without fusion or reuse would take.
    pub naive_bytes: usize,
}

impl MemoryPlan {
    pub fn buffer(&self, v: Value) -> Option<&Buffer> {
        self.buffers.iter().find(|b| b.value == v)
    }
}

/// A value that needs arena space, with the groups that write and read it
/// (indices into the group list it was computed from).
#[derive(Debug, Clone)]
pub struct Need {
    pub value: Value,
    pub bytes: usize,
    pub def: usize,
    pub uses: Vec<usize>,
}

fn owners(kernels: &[KernelGroup]) -> HashMap<NodeIndex, usize> {
    kernels
        .iter()
        .enumerate()
        .flat_map(|(i, k)| k.nodes.iter().map(move |n| (*n, i)))
        .collect()
}

/// The values of `kernels` that need arena buffers.
pub fn needs(g: &Graph, kernels: &[KernelGroup]) -> Vec<Need> {
    let owner = owners(kernels);
    let named: HashSet<Value> = g.outputs.iter().map(|o| o.value).collect();
    let mut out = Vec::new();
    for (i, k) in kernels.iter().enumerate() {
        let mut vals = k.outputs(g);
        vals.extend(k.scratch(g));
        for v in vals {
            if named.contains(&v) || g.node(v.node).op.is_leaf() {
                continue;
            }
            let mut uses: Vec<usize> = g
                .graph
                .edges_directed(v.node, petgraph::Direction::Outgoing)
                .filter(|e| e.weight().port == v.port)
                .filter_map(|e| owner.get(&petgraph::visit::EdgeRef::target(&e)).copied())
                .filter(|&j| j != i)
                .collect();
            uses.sort_unstable();
            uses.dedup();
            out.push(Need {
                value: v,
                bytes: bytes(g, v),
                def: i,
                uses,
            });
        }
    }
    out
}

/// Sum of all intermediate values (every result of every op that is not a
/// named output).
pub fn naive_bytes(g: &Graph) -> usize {
    let named: HashSet<Value> = g.outputs.iter().map(|o| o.value).collect();
    g.graph
        .node_indices()
        .filter(|n| !g.node(*n).op.is_leaf())
        .flat_map(|n| {
            (0..g.node(n).outputs.len()).map(move |p| Value {
                node: n,
                port: p as u16,
            })
        })
        .filter(|v| !named.contains(v))
        .map(|v| bytes(g, v))
        .sum()
}

/// Can group `k` write its results over a same-shaped operand?
fn pure_elementwise(g: &Graph, k: &KernelGroup) -> bool {
    let Some(first) = k.nodes.first() else {
        return false;
    };
    let shape = &g.node(*first).outputs[0].shape;
    k.kind == KernelKind::Elementwise
        && k.nodes.iter().all(|n| {
            matches!(g.node(*n).op, Op::Unary(_) | Op::Binary(_))
                && g.node(*n).outputs[0].shape == *shape
        })
}

/// Plan the arena for `kernels` run in the given order.
pub fn plan(g: &Graph, kernels: &[KernelGroup]) -> MemoryPlan {
    let ns = needs(g, kernels);
    let mut bufs: Vec<Buffer> = ns
        .iter()
        .map(|nd| Buffer {
            value: nd.value,
            bytes: nd.bytes,
            offset: 0,
            def: nd.def,
            last_use: nd.uses.iter().copied().max().unwrap_or(nd.def),
            inplace_of: None,
            view_of: None,
        })
        .collect();
    let index: HashMap<Value, usize> = bufs.iter().enumerate().map(|(i, b)| (b.value, i)).collect();

    // Views and in-place reuse: storage[i] is the buffer whose storage buffer
    // i shares; end[root] is the last step any sharer is read.
    let mut storage: Vec<usize> = (0..bufs.len()).collect();
    let mut end: Vec<usize> = bufs.iter().map(|b| b.last_use).collect();
    for (s, k) in kernels.iter().enumerate() {
        if let Some((iv, ov)) = view(g, k) {
            if let (Some(&b), Some(&o)) = (index.get(&iv), index.get(&ov)) {
                if bufs[b].bytes == bufs[o].bytes {
                    let root = storage[b];
                    bufs[o].view_of = Some(iv);
                    storage[o] = root;
                    end[root] = end[root].max(bufs[o].last_use);
                }
            }
            continue;
        }
        if !pure_elementwise(g, k) {
            continue;
        }
        let ins = k.inputs(g);
        let mut taken: HashSet<usize> = HashSet::new();
        for v in k.outputs(g) {
            let Some(&o) = index.get(&v) else { continue };
            let cand = ins.iter().find_map(|iv| {
                let &b = index.get(iv)?;
                let root = storage[b];
                // every operand in that storage is read at the result's own
                // index (same type, no broadcast), so reads precede writes
                let same_index = ins.iter().all(|jv| {
                    index
                        .get(jv)
                        .is_none_or(|&j| storage[j] != root || g.ty(*jv) == g.ty(v))
                });
                let ok = end[root] == s
                    && bufs[b].bytes == bufs[o].bytes
                    && same_index
                    && !taken.contains(&root);
                ok.then_some(b)
            });
            if let Some(b) = cand {
                let root = storage[b];
                taken.insert(root);
                bufs[o].inplace_of = Some(bufs[b].value);
                storage[o] = root;
                end[root] = end[root].max(bufs[o].last_use);
            }
        }
    }

    // One interval per storage chain: [first write, last read].
    let mut chains: HashMap<usize, (usize, usize, usize)> = HashMap::new();
    for (i, b) in bufs.iter().enumerate() {
        let e = chains
            .entry(storage[i])
            .or_insert((b.def, b.last_use, b.bytes));
        e.0 = e.0.min(b.def);
        e.1 = e.1.max(b.last_use);
        e.2 = e.2.max(b.bytes);
    }
    let mut order: Vec<(usize, (usize, usize, usize))> = chains.into_iter().collect();
    order.sort_by_key(|(root, (start, _, size))| (std::cmp::Reverse(*size), *start, *root));
    let mut placed: Vec<(usize, usize, usize, usize)> = Vec::new(); // start, end, offset, size
    let mut offset_of: HashMap<usize, usize> = HashMap::new();
    for (root, (start, end, size)) in order {
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|p| p.0 <= end && start <= p.1)
            .map(|p| (p.2, p.2 + p.3))
            .collect();
        busy.sort_unstable();
        let mut at = 0;
        for (lo, hi) in busy {
            if at + size <= lo {
                break;
            }
            at = at.max(align(hi));
        }
        placed.push((start, end, at, size));
        offset_of.insert(root, at);
    }
    for (i, b) in bufs.iter_mut().enumerate() {
        b.offset = offset_of[&storage[i]];
    }
    let arena_bytes = bufs.iter().map(|b| b.offset + b.bytes).max().unwrap_or(0);
    let peak_bytes = peak(&placed, kernels.len());
    MemoryPlan {
        buffers: bufs,
        arena_bytes,
        peak_bytes,
        naive_bytes: naive_bytes(g),
    }
}

fn align(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// The most bytes live at one step; `storages` are `(start, end, offset,
/// size)`, each counted once however many buffers share it.
fn peak(storages: &[(usize, usize, usize, usize)], steps: usize) -> usize {
    let mut live = vec![0usize; steps.max(1)];
    for &(start, end, _, size) in storages {
        for l in live.iter_mut().take(end + 1).skip(start) {
            *l += size;
        }
    }
    live.into_iter().max().unwrap_or(0)
}

/// A kernel that is one reshape of a value: `(operand, result)`.
fn view(g: &Graph, k: &KernelGroup) -> Option<(Value, Value)> {
    match k.nodes.as_slice() {
        [n] if matches!(g.node(*n).op, Op::Reshape { .. }) => {
            Some((g.inputs(*n)[0], Value::new(*n)))
        }
        _ => None,
    }
}

/// Prove the plan sound for `kernels` (in schedule order): the right values
/// have buffers, each written before it is read and live until its last
/// read, and no two buffers live at the same step overlap in the arena.
pub fn check(g: &Graph, kernels: &[KernelGroup], plan: &MemoryPlan) -> Result<(), String> {
    let owner = owners(kernels);
    let named: HashSet<Value> = g.outputs.iter().map(|o| o.value).collect();
    let show = |v: Value| format!("%{}.{}", v.node.index(), v.port);
    // Independently of `needs`: a value read by a node of another group must
    // be in memory; if it is not a leaf or named output, it is in the arena.
    let mut required: HashMap<Value, (usize, Vec<usize>)> = HashMap::new();
    for e in g.graph.edge_indices() {
        let Some((src, dst)) = g.graph.edge_endpoints(e) else {
            continue;
        };
        let v = Value {
            node: src,
            port: g.graph[e].port,
        };
        if g.node(src).op.is_leaf() || named.contains(&v) {
            continue;
        }
        let (Some(&ws), Some(&rs)) = (owner.get(&src), owner.get(&dst)) else {
            return Err(format!("an edge into or out of {} has no kernel", show(v)));
        };
        if ws != rs {
            required.entry(v).or_insert((ws, Vec::new())).1.push(rs);
        }
    }
    let by_value: HashMap<Value, &Buffer> = plan.buffers.iter().map(|b| (b.value, b)).collect();
    if by_value.len() != plan.buffers.len() {
        return Err("a value has two buffers".to_string());
    }
    for (v, (w, readers)) in &required {
        let b = by_value
            .get(v)
            .ok_or_else(|| format!("{} is read by another kernel but has no buffer", show(*v)))?;
        if b.def != *w {
            return Err(format!(
                "buffer {} is written at step {} but its kernel runs at step {w}",
                show(*v),
                b.def
            ));
        }
        for &r in readers {
            if r <= b.def {
                return Err(format!(
                    "buffer {} is read at step {r} before it is written at step {}",
                    show(*v),
                    b.def
                ));
            }
            if r > b.last_use {
                return Err(format!(
                    "buffer {} is read at step {r} after its last use {}",
                    show(*v),
                    b.last_use
                ));
            }
        }
    }
    for b in &plan.buffers {
        if !required.contains_key(&b.value)
            && !kernels
                .get(b.def)
                .is_some_and(|k| k.scratch(g).contains(&b.value))
        {
            return Err(format!(
                "buffer {} is neither read across kernels nor scratch",
                show(b.value)
            ));
        }
        if b.bytes != bytes(g, b.value) {
            return Err(format!(
                "buffer {} has {} bytes but its value needs {}",
                show(b.value),
                b.bytes,
                bytes(g, b.value)
            ));
        }
        if b.offset % ALIGN != 0 || b.offset + b.bytes > plan.arena_bytes {
            return Err(format!(
                "buffer {} at {} is misaligned or outside the arena",
                show(b.value),
                b.offset
            ));
        }
    }
    for (i, a) in plan.buffers.iter().enumerate() {
        for b in &plan.buffers[i + 1..] {
            let live_together = a.def <= b.last_use && b.def <= a.last_use;
            let overlap = a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes;
            if !(live_together && overlap) {
                continue;
            }
            let same_place = a.offset == b.offset && a.bytes == b.bytes;
            let family = |x: &Buffer| root_view(plan, x.value);
            let in_place = |r: &Buffer, o: &Buffer| {
                r.inplace_of
                    .is_some_and(|x| root_view(plan, x) == family(o))
                    && o.last_use == r.def
            };
            let views = family(a) == family(b);
            if !(same_place && (in_place(a, b) || in_place(b, a) || views)) {
                return Err(format!(
                    "buffers {} (steps {}..{}, bytes {}..{}) and {} (steps {}..{}, bytes {}..{}) overlap",
                    show(a.value), a.def, a.last_use, a.offset, a.offset + a.bytes,
                    show(b.value), b.def, b.last_use, b.offset, b.offset + b.bytes
                ));
            }
        }
    }
    Ok(())
}

/// The buffer a chain of views ends at.
fn root_view(plan: &MemoryPlan, mut v: Value) -> Value {
    for _ in 0..plan.buffers.len() {
        match plan.buffer(v).and_then(|b| b.view_of) {
            Some(u) => v = u,
            None => break,
        }
    }
    v
}

/// `--emit plan`: the schedule with what each kernel writes, then the totals.
pub fn print_plan(g: &Graph, kernels: &[KernelGroup], plan: &MemoryPlan) -> String {
    let ids: HashMap<NodeIndex, usize> = g
        .topo_order()
        .into_iter()
        .enumerate()
        .map(|(i, n)| (n, i))
        .collect();
    let name = |v: Value| {
        let i = ids.get(&v.node).copied().unwrap_or(usize::MAX);
        if g.node(v.node).outputs.len() == 1 {
            format!("%{i}")
        } else {
            format!("%{i}.{}", v.port)
        }
    };
    let mut s = String::new();
    for (step, k) in kernels.iter().enumerate() {
        let writes: Vec<String> = plan
            .buffers
            .iter()
            .filter(|b| b.def == step)
            .map(|b| {
                let inplace = match (b.inplace_of, b.view_of) {
                    (Some(o), _) => format!(" over {}", name(o)),
                    (_, Some(o)) => format!(" view of {}", name(o)),
                    _ => String::new(),
                };
                format!(
                    "{} {} @{}+{} live {}..{}{inplace}",
                    name(b.value),
                    fmt_shape(&g.ty(b.value).shape),
                    b.offset,
                    b.bytes,
                    b.def,
                    b.last_use
                )
            })
            .collect();
        let anchor = k
            .anchor
            .map(|a| format!(" {}", name(Value::new(a))))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "step {step} {}{anchor}: {}",
            k.kind.name(),
            if writes.is_empty() {
                "-".to_string()
            } else {
                writes.join(", ")
            }
        );
    }
    let _ = writeln!(s, "peak_bytes {}", plan.peak_bytes);
    let _ = writeln!(s, "arena_bytes {}", plan.arena_bytes);
    let _ = writeln!(s, "naive_bytes {}", plan.naive_bytes);
    s
}
