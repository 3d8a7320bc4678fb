//! Fusion: partition the ops of a graph into kernel groups, each compiled to
//! one function.
//!
//! - An *anchor* (matmul, conv and its gradients, pooling, reduction,
//!   softmax, loss, attention, recurrence, gather) takes the elementwise ops
//!   that only feed it as its *prologue* (computed as its operands are
//!   loaded) and the elementwise ops that consume its result over the same
//!   number of elements as its *epilogue* (applied as results are stored):
//!   `conv + bias + relu`, `matmul + bias + relu`, a gradient and the
//!   optimizer update that consumes it.
//! - *Row* kernels (softmax, `log_softmax`, reductions over the last axis)
//!   take every op over the same rows `[..., D]` or per-row values
//!   `[..., 1]`, including further last-axis reductions: layer norm (two
//!   means and the normalisation) is one kernel.
//! - The losses (`cross_entropy`, `hinge`) and their gradients take the
//!   softmax of the same logits: the loss, its gradient and `probs` are one
//!   kernel.
//! - Remaining elementwise and layout ops form loops: an op joins the loop of
//!   a producer over the same number of elements; loops whose results are
//!   only read by one other group are inlined into it.
//!
//! **Invariants:** every non-leaf node is in exactly one group; `Fill`
//! constants are in no group (kernels inline them) unless they are a named
//! output; contracting each group to a point leaves the graph acyclic. A
//! value read outside its group, or named as an output, is materialised;
//! every other value lives only inside its kernel.

use super::rewrite::numel;
use crate::ir::{Graph, Op, Value};
use petgraph::stable_graph::NodeIndex;
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write;

/// Which code template a group is compiled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelKind {
    /// One loop over the elements of its outputs.
    Elementwise,
    MatMul,
    /// `conv`, `conv_grad_input`, `conv_grad_filter`.
    Conv,
    /// Max/avg pooling and their gradients.
    Pool,
    /// A reduction over axes other than only the last.
    Reduce,
    /// Softmax, `log_softmax`, last-axis reductions and what lives on their rows.
    Row,
    /// `cross_entropy`, `hinge`, their gradients and sibling softmaxes.
    Loss,
    Attention,
    /// LSTM / GRU sequences and their gradients.
    Recurrence,
    /// `gather`, `scatter_add`.
    Gather,
}

impl KernelKind {
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Elementwise => "elementwise",
            KernelKind::MatMul => "matmul",
            KernelKind::Conv => "conv",
            KernelKind::Pool => "pool",
            KernelKind::Reduce => "reduce",
            KernelKind::Row => "row",
            KernelKind::Loss => "loss",
            KernelKind::Attention => "attention",
            KernelKind::Recurrence => "recurrence",
            KernelKind::Gather => "gather",
        }
    }
}

/// A set of ops compiled into one function.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelGroup {
    /// The op whose template the kernel uses (`None` for elementwise loops).
    pub anchor: Option<NodeIndex>,
    /// Members in topological order.
    pub nodes: Vec<NodeIndex>,
    pub kind: KernelKind,
}

impl KernelGroup {
    fn members(&self) -> HashSet<NodeIndex> {
        self.nodes.iter().copied().collect()
    }

    /// Values computed here that must be written to memory: read by another
    /// group or named as a graph output.
    pub fn outputs(&self, g: &Graph) -> Vec<Value> {
        let members = self.members();
        let named: HashSet<Value> = g.outputs.iter().map(|o| o.value).collect();
        let mut out = Vec::new();
        for &n in &self.nodes {
            for port in 0..g.node(n).outputs.len() {
                let v = Value {
                    node: n,
                    port: port as u16,
                };
                let outside = g
                    .graph
                    .edges_directed(n, Direction::Outgoing)
                    .any(|e| e.weight().port == v.port && !members.contains(&e.target()));
                if outside || named.contains(&v) {
                    out.push(v);
                }
            }
        }
        out
    }

    /// Values read from outside the group (leaves included), sorted.
    pub fn inputs(&self, g: &Graph) -> Vec<Value> {
        let members = self.members();
        let mut ins = BTreeSet::new();
        for &n in &self.nodes {
            for v in g.inputs(n) {
                if !members.contains(&v.node) {
                    ins.insert(v);
                }
            }
        }
        ins.into_iter().collect()
    }

    /// Anchor results that nothing reads: the kernel still writes them, so
    /// they need scratch space (an unused port of `lstm_seq_grad`, say).
    pub fn scratch(&self, g: &Graph) -> Vec<Value> {
        let Some(a) = self.anchor else {
            return Vec::new();
        };
        let named: HashSet<Value> = g.outputs.iter().map(|o| o.value).collect();
        (0..g.node(a).outputs.len())
            .map(|p| Value {
                node: a,
                port: p as u16,
            })
            .filter(|v| {
                !named.contains(v)
                    && !g
                        .graph
                        .edges_directed(a, Direction::Outgoing)
                        .any(|e| e.weight().port == v.port)
            })
            .collect()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Leaf,
    /// Unary and binary ops: a value per element.
    Elem,
    /// Layout ops: each output element is one input element (or zero).
    Layout,
    Anchor(KernelKind),
}

fn class(op: &Op) -> Class {
    match op {
        Op::Input { .. } | Op::Param { .. } | Op::State { .. } | Op::Fill { .. } => Class::Leaf,
        Op::Unary(_) | Op::Binary(_) => Class::Elem,
        Op::Reshape { .. }
        | Op::Expand { .. }
        | Op::Transpose { .. }
        | Op::Slice { .. }
        | Op::PadSlice { .. }
        | Op::Concat { .. } => Class::Layout,
        Op::MatMul => Class::Anchor(KernelKind::MatMul),
        Op::Conv(_) | Op::ConvGradInput { .. } | Op::ConvGradFilter { .. } => {
            Class::Anchor(KernelKind::Conv)
        }
        Op::MaxPool(_) | Op::MaxPoolGrad(_) | Op::AvgPool(_) | Op::AvgPoolGrad { .. } => {
            Class::Anchor(KernelKind::Pool)
        }
        Op::Reduce { .. } => Class::Anchor(KernelKind::Reduce),
        Op::Softmax { .. } | Op::LogSoftmax { .. } => Class::Anchor(KernelKind::Row),
        Op::CrossEntropy | Op::CrossEntropyGrad | Op::Hinge | Op::HingeGrad => {
            Class::Anchor(KernelKind::Loss)
        }
        Op::Attention { .. } | Op::AttentionGrad { .. } => Class::Anchor(KernelKind::Attention),
        Op::LstmSeq | Op::LstmSeqGrad | Op::GruSeq | Op::GruSeqGrad => {
            Class::Anchor(KernelKind::Recurrence)
        }
        Op::Gather | Op::ScatterAdd { .. } => Class::Anchor(KernelKind::Gather),
    }
}

/// The rows `(prefix, width)` a row-wise op works on, when it is one.
fn row_space(g: &Graph, n: NodeIndex) -> Option<(Vec<usize>, usize)> {
    let node = g.node(n);
    let last_axis_of = |v: Value| {
        let s = &g.ty(v).shape;
        (!s.is_empty()).then(|| (s[..s.len() - 1].to_vec(), s[s.len() - 1]))
    };
    match &node.op {
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            let x = g.inputs(n)[0];
            (*axis + 1 == g.ty(x).shape.len())
                .then(|| last_axis_of(x))
                .flatten()
        }
        Op::Reduce { axes, .. } => {
            let x = g.inputs(n)[0];
            let r = g.ty(x).shape.len();
            (r > 0 && axes.as_slice() == [r - 1])
                .then(|| last_axis_of(x))
                .flatten()
        }
        _ => None,
    }
}

/// A value shape that lives on the rows `(p, d)`: a full row, one value per
/// row (kept or dropped axis), or a broadcast constant.
fn on_rows(shape: &[usize], p: &[usize], d: usize) -> bool {
    let r = p.len();
    (shape.len() == r + 1 && shape[..r] == *p && (shape[r] == d || shape[r] == 1)) || shape == p
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Anchor,
    Prologue,
    Epilogue,
}

struct Builder<'g> {
    g: &'g Graph,
    topo: HashMap<NodeIndex, usize>,
    group_of: HashMap<NodeIndex, usize>,
    groups: Vec<Option<Build>>,
}

struct Build {
    anchor: Option<NodeIndex>,
    kind: KernelKind,
    members: BTreeSet<NodeIndex>,
    roles: HashMap<NodeIndex, Role>,
    /// For row kernels: the rows every member lives on.
    rows: Option<(Vec<usize>, usize)>,
}

/// Partition `g` into fused kernel groups (unordered; see `schedule`).
pub fn fuse(g: &Graph) -> Vec<KernelGroup> {
    let order = g.topo_order();
    let mut b = Builder {
        g,
        topo: order.iter().enumerate().map(|(i, n)| (*n, i)).collect(),
        group_of: HashMap::new(),
        groups: Vec::new(),
    };
    // Anchors first, each its own group.
    for &n in &order {
        if let Class::Anchor(kind) = class(&g.node(n).op) {
            let rows = row_space(g, n);
            let kind = if kind == KernelKind::Reduce && rows.is_some() {
                KernelKind::Row
            } else {
                kind
            };
            b.new_group(Some(n), kind, n, Role::Anchor, rows);
        }
    }
    // Losses take their sibling softmaxes and gradients over the same logits.
    for &n in &order {
        if matches!(class(&g.node(n).op), Class::Anchor(KernelKind::Loss)) {
            b.absorb_loss_siblings(n);
        }
    }
    // Grow each anchor group in topological order of its anchor.
    for &n in &order {
        if let Some(&gi) = b.group_of.get(&n) {
            if b.groups[gi].as_ref().is_some_and(|gr| gr.anchor == Some(n)) {
                b.grow(gi);
            }
        }
    }
    b.eject_redundant_outputs();
    // What is left are elementwise and layout ops: loops.
    for &n in &order {
        if b.group_of.contains_key(&n) {
            continue;
        }
        match class(&g.node(n).op) {
            Class::Elem | Class::Layout => b.place_in_loop(n),
            Class::Leaf => {
                let named = g.outputs.iter().any(|o| o.value.node == n);
                if named && matches!(g.node(n).op, Op::Fill { .. }) {
                    b.new_group(None, KernelKind::Elementwise, n, Role::Epilogue, None);
                }
            }
            Class::Anchor(_) => {}
        }
    }
    b.inline_loops();
    b.finish()
}

/// One group per non-leaf op (and per named `Fill`): no fusion.
pub fn singletons(g: &Graph) -> Vec<KernelGroup> {
    g.topo_order()
        .into_iter()
        .filter_map(|n| {
            let c = class(&g.node(n).op);
            let named = g.outputs.iter().any(|o| o.value.node == n);
            let kind = match c {
                Class::Leaf if named && matches!(g.node(n).op, Op::Fill { .. }) => {
                    KernelKind::Elementwise
                }
                Class::Leaf => return None,
                Class::Elem | Class::Layout => KernelKind::Elementwise,
                Class::Anchor(k) => match (&g.node(n).op, row_space(g, n)) {
                    (Op::Reduce { .. }, Some(_)) => KernelKind::Row,
                    _ => k,
                },
            };
            let anchor = matches!(c, Class::Anchor(_)).then_some(n);
            Some(KernelGroup {
                anchor,
                nodes: vec![n],
                kind,
            })
        })
        .collect()
}

impl Builder<'_> {
    fn new_group(
        &mut self,
        anchor: Option<NodeIndex>,
        kind: KernelKind,
        n: NodeIndex,
        role: Role,
        rows: Option<(Vec<usize>, usize)>,
    ) -> usize {
        let gi = self.groups.len();
        self.groups.push(Some(Build {
            anchor,
            kind,
            members: [n].into_iter().collect(),
            roles: [(n, role)].into_iter().collect(),
            rows,
        }));
        self.group_of.insert(n, gi);
        gi
    }

    fn group(&self, gi: usize) -> &Build {
        self.groups[gi]
            .as_ref()
            .expect("a merged-away group is never asked for")
    }

    fn is_leaf(&self, n: NodeIndex) -> bool {
        class(&self.g.node(n).op) == Class::Leaf
    }

    /// Would the group, with `extra` added, still contract to a point without
    /// making a cycle? A cycle needs a path that leaves the set and comes
    /// back, so search forward from the set's outside successors; nodes
    /// after the set's last member in topological order cannot lead back.
    fn convex_with(&self, gi: usize, extra: &[NodeIndex]) -> bool {
        let set: HashSet<NodeIndex> = self
            .group(gi)
            .members
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .collect();
        let last = set.iter().map(|n| self.topo[n]).max().unwrap_or(0);
        let mut seen = HashSet::new();
        let mut stack: Vec<NodeIndex> = Vec::new();
        for &m in &set {
            for s in self.g.graph.neighbors_directed(m, Direction::Outgoing) {
                if !set.contains(&s) {
                    stack.push(s);
                }
            }
        }
        while let Some(n) = stack.pop() {
            if self.topo[&n] > last || !seen.insert(n) {
                continue;
            }
            for s in self.g.graph.neighbors_directed(n, Direction::Outgoing) {
                if set.contains(&s) {
                    return false;
                }
                stack.push(s);
            }
        }
        true
    }

    fn add(&mut self, gi: usize, n: NodeIndex, role: Role) {
        let gr = self.groups[gi].as_mut().expect("live group");
        gr.members.insert(n);
        gr.roles.insert(n, role);
        self.group_of.insert(n, gi);
    }

    /// Move every member of group `from` into `to`.
    fn merge(&mut self, to: usize, from: usize) {
        let Some(src) = self.groups[from].take() else {
            return;
        };
        for n in src.members {
            let role = src.roles.get(&n).copied().unwrap_or(Role::Epilogue);
            self.add(to, n, role);
        }
    }

    fn absorb_loss_siblings(&mut self, n: NodeIndex) {
        let Some(&gi) = self.group_of.get(&n) else {
            return;
        };
        let logits = self.g.inputs(n)[0];
        let cols = self.g.ty(logits).shape.len();
        for u in self.g.users(logits.node) {
            if u == n || self.group_of.get(&u).is_some_and(|&o| o == gi) {
                continue;
            }
            let ins = self.g.inputs(u);
            let same_logits = ins.first() == Some(&logits);
            let sibling = match &self.g.node(u).op {
                Op::Softmax { axis } | Op::LogSoftmax { axis } => *axis + 1 == cols,
                op => matches!(class(op), Class::Anchor(KernelKind::Loss)),
            };
            if !(same_logits && sibling) {
                continue;
            }
            let Some(&other) = self.group_of.get(&u) else {
                continue;
            };
            let extra: Vec<NodeIndex> = self.group(other).members.iter().copied().collect();
            if self.convex_with(gi, &extra) {
                self.merge(gi, other);
            }
        }
    }

    /// May `p`, a producer of a member, be computed inside group `gi`?
    fn fits_prologue(&self, gi: usize, p: NodeIndex) -> bool {
        let gr = self.group(gi);
        let ok_class = match class(&self.g.node(p).op) {
            Class::Elem => true,
            Class::Layout => gr.rows.is_none() || matches!(self.g.node(p).op, Op::Reshape { .. }),
            _ => false,
        };
        if !ok_class || self.group_of.contains_key(&p) || self.g.node(p).outputs.len() != 1 {
            return false;
        }
        if self.g.outputs.iter().any(|o| o.value.node == p) {
            // a named output is materialised anyway; computing it at the
            // anchor's loads would store it from inside a gather loop
            return false;
        }
        if let Some((pre, d)) = &gr.rows {
            if !on_rows(&self.g.node(p).outputs[0].shape, pre, *d) {
                return false;
            }
        }
        self.g.users(p).iter().all(|u| gr.members.contains(u))
    }

    /// May `c`, a consumer of members, be applied to the group's results?
    fn fits_epilogue(&self, gi: usize, c: NodeIndex) -> bool {
        let gr = self.group(gi);
        if self.group_of.contains_key(&c) || self.g.node(c).outputs.len() != 1 {
            return false;
        }
        let op = &self.g.node(c).op;
        let shape = &self.g.node(c).outputs[0].shape;
        if let Some((pre, d)) = &gr.rows {
            let ok = match class(op) {
                Class::Elem => true,
                Class::Layout => matches!(op, Op::Reshape { .. }),
                _ => false,
            };
            return ok
                && on_rows(shape, pre, *d)
                && self.g.inputs(c).iter().all(|v| {
                    self.is_leaf(v.node)
                        || on_rows(&self.g.ty(*v).shape, pre, *d)
                        || !gr.members.contains(&v.node)
                });
        }
        let ok_class = matches!(class(op), Class::Elem) || matches!(op, Op::Reshape { .. });
        if !ok_class {
            return false;
        }
        let n = shape.iter().product::<usize>();
        let mut from_group = false;
        for v in self.g.inputs(c) {
            if let Some(role) = gr.roles.get(&v.node) {
                if *role == Role::Prologue {
                    return false;
                }
                // the epilogue runs over the anchor's results: same element count
                if numel(self.g, v) != n {
                    return false;
                }
                from_group = true;
            }
        }
        from_group
    }

    /// Take out epilogue ops that only add a stored result: ops no member
    /// reads, whose result is read elsewhere, and whose group operands are
    /// all stored anyway. Their readers recompute them from the stored
    /// operand instead (`step(relu(x))` for the backward pass would
    /// otherwise double the activation memory). Removing a member no other
    /// member reads keeps the group convex.
    fn eject_redundant_outputs(&mut self) {
        let named: HashSet<Value> = self.g.outputs.iter().map(|o| o.value).collect();
        for gi in 0..self.groups.len() {
            while let Some(gr) = &self.groups[gi] {
                let stored = |v: Value, except: NodeIndex| {
                    named.contains(&v)
                        || self
                            .g
                            .graph
                            .edges_directed(v.node, Direction::Outgoing)
                            .any(|e| {
                                e.weight().port == v.port
                                    && e.target() != except
                                    && !gr.members.contains(&e.target())
                            })
                };
                let victim = gr.members.iter().copied().find(|&c| {
                    gr.roles.get(&c) == Some(&Role::Epilogue)
                        && self.g.node(c).outputs.len() == 1
                        && !named.contains(&Value::new(c))
                        && !self.g.users(c).is_empty()
                        && self.g.users(c).iter().all(|u| !gr.members.contains(u))
                        && self
                            .g
                            .inputs(c)
                            .into_iter()
                            .filter(|v| gr.members.contains(&v.node))
                            .all(|v| stored(v, c))
                });
                let Some(c) = victim else { break };
                if let Some(gr) = self.groups[gi].as_mut() {
                    gr.members.remove(&c);
                    gr.roles.remove(&c);
                }
                self.group_of.remove(&c);
            }
        }
    }

    /// Pull in prologue producers and epilogue consumers until nothing fits.
    fn grow(&mut self, gi: usize) {
        loop {
            let mut changed = false;
            let members: Vec<NodeIndex> = self.group(gi).members.iter().copied().collect();
            for m in members {
                for v in self.g.inputs(m) {
                    let p = v.node;
                    if self.fits_prologue(gi, p) && self.convex_with(gi, &[p]) {
                        self.add(gi, p, Role::Prologue);
                        changed = true;
                    }
                }
                for c in self.g.users(m) {
                    if self.fits_epilogue(gi, c) && self.convex_with(gi, &[c]) {
                        self.add(gi, c, Role::Epilogue);
                        changed = true;
                    } else if self.group(gi).rows.is_some() {
                        changed |= self.absorb_row_anchor(gi, c);
                    }
                }
            }
            if !changed {
                break;
            }
        }
    }

    /// A later softmax or last-axis reduction over the same rows joins a row
    /// kernel (layer norm's second mean).
    fn absorb_row_anchor(&mut self, gi: usize, c: NodeIndex) -> bool {
        let Some(&other) = self.group_of.get(&c) else {
            return false;
        };
        if other == gi {
            return false;
        }
        let (Some(theirs), Some(ours)) = (&self.group(other).rows, &self.group(gi).rows) else {
            return false;
        };
        // only a group that has not grown yet (its anchor alone) is taken whole
        if theirs != ours || self.group(other).members.len() != 1 {
            return false;
        }
        let extra: Vec<NodeIndex> = self.group(other).members.iter().copied().collect();
        if !self.convex_with(gi, &extra) {
            return false;
        }
        self.merge(gi, other);
        true
    }

    /// An elementwise or layout op joins the loop of a producer over the same
    /// number of elements, else starts a loop.
    fn place_in_loop(&mut self, n: NodeIndex) {
        let size: usize = self.g.node(n).outputs[0].shape.iter().product();
        let mut cands: Vec<usize> = self
            .g
            .inputs(n)
            .iter()
            .filter(|v| numel(self.g, **v) == size)
            .filter_map(|v| self.group_of.get(&v.node).copied())
            .filter(|gi| self.group(*gi).anchor.is_none())
            .collect();
        cands.dedup();
        for gi in cands {
            if self.convex_with(gi, &[n]) {
                self.add(gi, n, Role::Epilogue);
                return;
            }
        }
        self.new_group(None, KernelKind::Elementwise, n, Role::Epilogue, None);
    }

    /// A loop whose results are all read by one other group, and by nothing
    /// else, is recomputed inside that group instead of stored (a bias
    /// reshape, a scalar step-size computation feeding an update).
    fn inline_loops(&mut self) {
        loop {
            let mut changed = false;
            for gi in 0..self.groups.len() {
                let Some(gr) = &self.groups[gi] else {
                    continue;
                };
                if gr.anchor.is_some() {
                    continue;
                }
                if gr
                    .members
                    .iter()
                    .any(|m| self.g.outputs.iter().any(|o| o.value.node == *m))
                {
                    continue;
                }
                let mut readers = BTreeSet::new();
                for m in &gr.members {
                    for u in self.g.users(*m) {
                        let ug = self.group_of[&u];
                        if ug != gi {
                            readers.insert(ug);
                        }
                    }
                }
                if readers.len() != 1 {
                    continue;
                }
                let Some(&to) = readers.iter().next() else {
                    continue;
                };
                if let Some((pre, d)) = &self.group(to).rows {
                    let fits = gr.members.iter().all(|m| {
                        on_rows(&self.g.node(*m).outputs[0].shape, pre, *d)
                            && matches!(class(&self.g.node(*m).op), Class::Elem)
                    });
                    if !fits {
                        continue;
                    }
                }
                let extra: Vec<NodeIndex> = gr.members.iter().copied().collect();
                if self.convex_with(to, &extra) {
                    let from = self.groups[gi].take().expect("checked above");
                    for m in from.members {
                        self.add(to, m, Role::Prologue);
                    }
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
    }

    fn finish(self) -> Vec<KernelGroup> {
        let topo = &self.topo;
        let mut out: Vec<KernelGroup> = self
            .groups
            .into_iter()
            .flatten()
            .map(|gr| {
                let mut nodes: Vec<NodeIndex> = gr.members.into_iter().collect();
                nodes.sort_by_key(|n| topo[n]);
                KernelGroup {
                    anchor: gr.anchor,
                    nodes,
                    kind: gr.kind,
                }
            })
            .collect();
        out.sort_by_key(|k| k.nodes.last().map(|n| topo[n]));
        out
    }
}

/// `--emit kernels`: one block per group, nodes numbered as `ir::print` does.
pub fn print_kernels(g: &Graph, kernels: &[KernelGroup]) -> String {
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
    for (k, grp) in kernels.iter().enumerate() {
        let anchor = grp
            .anchor
            .map(|a| format!(" anchor={}", name(Value::new(a))))
            .unwrap_or_default();
        let ins: Vec<String> = grp.inputs(g).into_iter().map(name).collect();
        let outs: Vec<String> = grp.outputs(g).into_iter().map(name).collect();
        let _ = writeln!(
            s,
            "kernel {k} {}{anchor} ({}) -> ({})",
            grp.kind.name(),
            ins.join(", "),
            outs.join(", ")
        );
        for &n in &grp.nodes {
            let node = g.node(n);
            let args: Vec<String> = g.inputs(n).into_iter().map(name).collect();
            let types: Vec<String> = node.outputs.iter().map(|t| t.to_string()).collect();
            let _ = writeln!(
                s,
                "  %{} = {} ({}) : {}",
                ids.get(&n).copied().unwrap_or(usize::MAX),
                node.op,
                args.join(", "),
                types.join(", ")
            );
        }
    }
    let ops = g.op_count();
    let _ = writeln!(s, "{} kernels for {} ops", kernels.len(), ops);
    s
}
