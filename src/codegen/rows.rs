//! Row programs: the ops that live on the rows `[rows, d]` of a last-axis
//! sum or mean (layer norm, its gradient) computed one row at a time in one
//! step, instead of one step (a pass over the whole tensor and a barrier)
//! per op.
//!
//! A group grows from a last-axis `sum`/`mean` through elementwise ops and
//! `expand`s whose values are full rows `[…, d]`, one value per row
//! `[…, 1]`, or operands broadcast along the rows (`[d]`, a scalar). Per
//! row, the step makes a few passes over the row's `d` columns: a pass
//! computes every full-row value whose operands are ready, vectorised along
//! the row, and accumulates the sums over it; the per-row values that
//! depend on those sums are computed between passes. A full-row value a
//! later pass reads again is kept in a row-sized stack buffer (L1), unless
//! it is a result anyway. Only values read outside the group (or named
//! outputs) reach memory. Each row is one work unit and sums its columns in
//! one fixed order, so results do not depend on the thread count.

use super::emit::{Kb, Loc};
use super::kernel::{ew_scalar, ew_vec, EwOp};
use super::reduce::{hsum, SUM_BLOCK};
use crate::ir::{Graph, Op, ReduceOp, Value};
use crate::tensor::{numel, DType};
use cranelift_codegen::ir::types::{F32, F32X4};
use cranelift_codegen::ir::{InstBuilder, Value as ClValue};
use petgraph::stable_graph::NodeIndex;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Narrowest row worth a group: below it a pass is mostly loop overhead.
const MIN_WIDTH: usize = 8;
/// Stack bytes a step may keep rows in (values re-read by later passes,
/// for every row of a block).
const MAX_TEMP_BYTES: usize = 64 << 10;

/// Where an operand of a row program is, relative to row `r`, column `j`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowShape {
    /// `[rows, d]`, at `r·d + j`.
    Full,
    /// `[rows]`, at `r`.
    PerRow,
    /// `[d]`, at `j`: the same for every row (a layer norm's gain).
    Col,
    /// One value.
    Scalar,
}

/// An operand: an input of the step or an earlier node of the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RowArg {
    In(usize),
    Node(usize),
}

#[derive(Clone, Debug, PartialEq)]
pub enum RowOp {
    Ew(EwOp, Vec<RowArg>),
    /// A per-row value broadcast along the row (`expand`).
    Splat(RowArg),
    /// Sum of a full row, divided by `d` for a mean.
    Sum {
        arg: RowArg,
        mean: bool,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct RowNode {
    pub op: RowOp,
    /// `Full` or `PerRow`.
    pub shape: RowShape,
    /// Where the value is stored, when something outside the step reads it.
    pub out: Option<Loc>,
}

/// One step computing `nodes` (in dependency order) for every row.
#[derive(Clone, Debug, PartialEq)]
pub struct RowProgram {
    pub rows: usize,
    pub d: usize,
    pub ins: Vec<(Loc, RowShape)>,
    pub nodes: Vec<RowNode>,
}

/// The ops of one group, in topological order; the last is its root, whose
/// kernel computes them all.
#[derive(Clone, Debug, PartialEq)]
pub struct RowGroup {
    pub members: Vec<NodeIndex>,
    rows: usize,
    d: usize,
}

impl RowGroup {
    pub fn root(&self) -> NodeIndex {
        *self.members.last().expect("a row group has members")
    }
}

/// `(rows, d)` of a last-axis sum or mean over an f32 value.
fn row_reduce(g: &Graph, n: NodeIndex) -> Option<(usize, usize)> {
    let Op::Reduce { op, axes, .. } = &g.node(n).op else {
        return None;
    };
    let x = *g.inputs(n).first()?;
    let s = &g.ty(x).shape;
    let fits = matches!(op, ReduceOp::Sum | ReduceOp::Mean)
        && s.len() >= 2
        && axes.as_slice() == [s.len() - 1]
        && g.ty(x).dtype == DType::F32;
    fits.then(|| (numel(&s[..s.len() - 1]), s[s.len() - 1]))
}

/// What a node's own value of `shape` is on the rows `full`: a full row,
/// or one value per row (a reduction's result, kept axis or not).
fn value_kind(shape: &[usize], full: &[usize]) -> Option<RowShape> {
    let r = full.len() - 1;
    if shape == full {
        return Some(RowShape::Full);
    }
    let prefix = &full[..r];
    let per_row =
        shape == prefix || (shape.len() == r + 1 && shape[..r] == *prefix && shape[r] == 1);
    per_row.then_some(RowShape::PerRow)
}

/// How an op whose result (of kind `out`, shape `out_shape`) lives on the
/// rows `full` reads an operand of `shape`, under broadcasting (shapes
/// aligned at the right), if the row program can: `[.., 1]` with the
/// leading dims of the rows is one value per row, `[d]` (or `[1, .., d]`)
/// one value per column. A `[rows]` operand of a full-row op is aligned
/// with the columns, not the rows, so it is no per-row value.
fn operand_kind(
    shape: &[usize],
    out: RowShape,
    out_shape: &[usize],
    full: &[usize],
) -> Option<RowShape> {
    if numel(shape) == 1 {
        return Some(RowShape::Scalar);
    }
    if shape == out_shape {
        return Some(out);
    }
    if out != RowShape::Full {
        return None;
    }
    let r = full.len() - 1;
    let d = full[r];
    if shape.len() == full.len() && shape[..r] == full[..r] && shape[r] == 1 {
        return Some(RowShape::PerRow);
    }
    let col = shape.last() == Some(&d)
        && shape.len() <= full.len()
        && shape[..shape.len() - 1].iter().all(|&s| s == 1);
    col.then_some(RowShape::Col)
}

/// Groups found by [`row_groups`] and the state of the search.
struct Search<'g> {
    g: &'g Graph,
    pos: HashMap<NodeIndex, usize>,
    interpret: &'g [&'g str],
    taken: HashSet<NodeIndex>,
}

impl Search<'_> {
    /// Whether `n` can be computed on the rows `full` of a group.
    fn fits(&self, n: NodeIndex, full: &[usize], d: usize) -> bool {
        let g = self.g;
        let node = g.node(n);
        if self.taken.contains(&n)
            || node.outputs.len() != 1
            || node.outputs[0].dtype != DType::F32
            || self.interpret.contains(&node.op.name())
        {
            return false;
        }
        let out_shape = &node.outputs[0].shape;
        let Some(out) = value_kind(out_shape, full) else {
            return false;
        };
        let ins = g.inputs(n);
        let ins_fit = |allowed: &[RowShape]| {
            ins.iter().all(|v| {
                let shape = &g.ty(*v).shape;
                let kind = operand_kind(shape, out, out_shape, full);
                // A `[rows]` value read along the columns (rows == d): the
                // program would take it for the per-row value it is as a
                // member.
                let misread = kind == Some(Col) && value_kind(shape, full) == Some(PerRow);
                g.ty(*v).dtype == DType::F32
                    && !misread
                    && kind.is_some_and(|s| allowed.contains(&s))
            })
        };
        use RowShape::*;
        match &node.op {
            Op::Unary(_) | Op::Binary(_) => ins_fit(&[Full, PerRow, Col, Scalar]),
            Op::Expand { .. } => out == Full && ins_fit(&[PerRow, Scalar]),
            Op::Reduce { .. } => {
                out == PerRow
                    && row_reduce(g, n).is_some_and(|(_, w)| w == d)
                    && ins.iter().all(|v| g.ty(*v).shape == full)
            }
            _ => false,
        }
    }

    /// Whether every reader outside `members` runs after the group's root
    /// (the last member): the root's kernel writes every member's value.
    fn readers_after_root(&self, members: &HashSet<NodeIndex>) -> bool {
        let root = members.iter().map(|m| self.pos[m]).max().unwrap_or(0);
        members.iter().all(|&m| {
            self.g
                .users(m)
                .iter()
                .all(|u| members.contains(u) || self.pos.get(u).is_some_and(|&p| p > root))
        })
    }

    fn grow(&self, seed: NodeIndex, full: &[usize], d: usize) -> HashSet<NodeIndex> {
        let g = self.g;
        let mut members: HashSet<NodeIndex> = HashSet::from([seed]);
        loop {
            let mut changed = false;
            let mut sorted: Vec<NodeIndex> = members.iter().copied().collect();
            sorted.sort_by_key(|m| self.pos[m]);
            for m in sorted {
                // Producers whose every reader is in the group: their value
                // then never reaches memory.
                let producers = g.inputs(m).into_iter().map(|v| v.node);
                let consumers = g.users(m).into_iter();
                for c in producers.chain(consumers) {
                    if members.contains(&c) || !self.pos.contains_key(&c) || !self.fits(c, full, d)
                    {
                        continue;
                    }
                    let is_producer = self.pos[&c] < self.pos[&m];
                    if is_producer && !g.users(c).iter().all(|u| members.contains(u)) {
                        continue;
                    }
                    members.insert(c);
                    if self.readers_after_root(&members) {
                        changed = true;
                    } else {
                        members.remove(&c);
                    }
                }
            }
            if !changed {
                return members;
            }
        }
    }
}

/// Row groups of `g` (nodes in `order`, its topological order), none
/// containing an op the caller wants interpreted. Every group has at least
/// two ops and fits its row buffers in [`MAX_TEMP_BYTES`].
pub fn row_groups(g: &Graph, order: &[NodeIndex], interpret: &[&str]) -> Vec<RowGroup> {
    let mut s = Search {
        g,
        pos: order.iter().enumerate().map(|(i, n)| (*n, i)).collect(),
        interpret,
        taken: HashSet::new(),
    };
    let mut groups = Vec::new();
    for &seed in order {
        let Some((rows, d)) = row_reduce(g, seed) else {
            continue;
        };
        if d < MIN_WIDTH || s.taken.contains(&seed) {
            continue;
        }
        let Some(x) = g.inputs(seed).first().copied() else {
            continue;
        };
        let full = g.ty(x).shape.clone();
        if !s.fits(seed, &full, d) {
            continue;
        }
        let members = s.grow(seed, &full, d);
        if members.len() < 2 {
            continue;
        }
        let mut members: Vec<NodeIndex> = members.into_iter().collect();
        members.sort_by_key(|m| s.pos[m]);
        let group = RowGroup { members, rows, d };
        // Each row of a block keeps its own row buffers.
        let temps = program(g, &group, &HashMap::new())
            .map(|p| p.temp_rows() * d * 4 * ROW_BLOCK)
            .unwrap_or(usize::MAX);
        if temps > MAX_TEMP_BYTES {
            continue;
        }
        s.taken.extend(group.members.iter().copied());
        groups.push(group);
    }
    groups
}

/// The step of a group with its values at `locs` (an input or result not
/// in `locs` is at arena offset 0: sizing only).
pub fn program(g: &Graph, group: &RowGroup, locs: &HashMap<Value, Loc>) -> Option<RowProgram> {
    let (rows, d) = (group.rows, group.d);
    let index: HashMap<NodeIndex, usize> = group
        .members
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, i))
        .collect();
    let named: HashSet<Value> = g.outputs.iter().map(|o| o.value).collect();
    let loc = |v: Value| locs.get(&v).copied().unwrap_or(Loc::Arena(0));
    let mut ins: Vec<(Value, RowShape)> = Vec::new();
    let mut nodes: Vec<RowNode> = Vec::new();
    let full = {
        let seed = group
            .members
            .iter()
            .find(|&&n| row_reduce(g, n).is_some())?;
        g.ty(*g.inputs(*seed).first()?).shape.clone()
    };
    for &n in &group.members {
        let out_shape = &g.node(n).outputs.first()?.shape;
        let out = value_kind(out_shape, &full)?;
        let reduces = matches!(g.node(n).op, Op::Reduce { .. });
        let mut arg = |v: Value| -> Option<RowArg> {
            if let Some(&i) = index.get(&v.node) {
                return Some(RowArg::Node(i));
            }
            // A reduction reads the full rows (checked by `fits`).
            let shape = if reduces {
                RowShape::Full
            } else {
                operand_kind(&g.ty(v).shape, out, out_shape, &full)?
            };
            let j = match ins.iter().position(|x| *x == (v, shape)) {
                Some(j) => j,
                None => {
                    ins.push((v, shape));
                    ins.len() - 1
                }
            };
            Some(RowArg::In(j))
        };
        let args = g
            .inputs(n)
            .into_iter()
            .map(&mut arg)
            .collect::<Option<Vec<_>>>()?;
        let op = match &g.node(n).op {
            Op::Unary(u) => RowOp::Ew(EwOp::Unary(*u), args),
            Op::Binary(b) => RowOp::Ew(EwOp::Binary(*b), args),
            Op::Expand { .. } => RowOp::Splat(*args.first()?),
            Op::Reduce { op, .. } => RowOp::Sum {
                arg: *args.first()?,
                mean: *op == ReduceOp::Mean,
            },
            _ => return None,
        };
        let v = Value::new(n);
        let escapes = named.contains(&v) || g.users(n).iter().any(|u| !index.contains_key(u));
        nodes.push(RowNode {
            op,
            shape: out,
            out: escapes.then(|| loc(v)),
        });
    }
    Some(RowProgram {
        rows,
        d,
        ins: ins.into_iter().map(|(v, s)| (loc(v), s)).collect(),
        nodes,
    })
}

/// When each node's value is ready: a full-row node is computed in pass
/// `level`; a per-row node is ready before pass `level` (after the last
/// pass when `level == passes`).
struct Schedule {
    level: Vec<usize>,
    passes: usize,
    /// Full-row nodes a later pass reads again.
    reread: Vec<bool>,
}

impl RowProgram {
    fn schedule(&self) -> Schedule {
        let mut level = vec![0usize; self.nodes.len()];
        let mut passes = 0;
        let mut reread = vec![false; self.nodes.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            let of = |a: &RowArg| match *a {
                RowArg::In(_) => 0,
                RowArg::Node(j) => level[j],
            };
            level[i] = match &node.op {
                RowOp::Ew(_, args) => args.iter().map(of).max().unwrap_or(0),
                RowOp::Splat(a) => of(a),
                // Accumulated in the pass computing its operand, ready after it.
                RowOp::Sum { arg, .. } => of(arg) + 1,
            };
            passes = passes.max(match (&node.op, node.shape) {
                (RowOp::Sum { .. }, _) => level[i],
                (_, RowShape::Full) => level[i] + 1,
                _ => 0,
            });
            if let (RowOp::Ew(_, args), RowShape::Full) = (&node.op, node.shape) {
                for a in args {
                    if let RowArg::Node(j) = *a {
                        if self.nodes[j].shape == RowShape::Full && level[j] < level[i] {
                            reread[j] = true;
                        }
                    }
                }
            }
        }
        Schedule {
            level,
            passes,
            reread,
        }
    }

    /// Row buffers the step keeps on its stack.
    fn temp_rows(&self) -> usize {
        let s = self.schedule();
        (0..self.nodes.len())
            .filter(|&i| s.reread[i] && self.nodes[i].out.is_none())
            .count()
    }

    pub fn units(&self) -> usize {
        self.rows
    }

    pub fn unit_cost(&self) -> usize {
        self.d * self.nodes.len().max(1)
    }

    pub fn emit(&self, kb: &mut Kb) {
        let s = self.schedule();
        let ins: Vec<ClValue> = self.ins.iter().map(|(l, _)| kb.base(*l)).collect();
        let outs: Vec<Option<ClValue>> = self
            .nodes
            .iter()
            .map(|n| n.out.map(|l| kb.base(l)))
            .collect();
        // Full rows re-read by a later pass and not stored anyway, per row
        // of a block.
        let temps: Vec<Vec<Option<ClValue>>> = (0..ROW_BLOCK)
            .map(|_| {
                (0..self.nodes.len())
                    .map(|i| {
                        (s.reread[i] && self.nodes[i].out.is_none())
                            .then(|| kb.stack_buf((self.d * 4) as u32))
                    })
                    .collect()
            })
            .collect();
        let scalars: Vec<Option<ClValue>> = self
            .ins
            .iter()
            .zip(&ins)
            .map(|((_, shape), &p)| (*shape == RowShape::Scalar).then(|| kb.load_f(p, 0)))
            .collect();
        let bufs = Bufs {
            ins: &ins,
            outs: &outs,
            scalars: &scalars,
        };
        let (start, end) = (kb.start, kb.end);
        let rest = kb.for_blocks(start, end, ROW_BLOCK as i64, |k, r0| {
            let rows: Vec<ClValue> = (0..ROW_BLOCK)
                .map(|b| k.b.ins().iadd_imm_s(r0, b as i64))
                .collect();
            self.emit_rows(k, &s, &bufs, &rows, &temps);
        });
        kb.for_range(rest, end, 1, |k, r| {
            self.emit_rows(k, &s, &bufs, &[r], &temps[..1]);
        });
    }

    /// Every pass for `rows` together: their loops interleave, so the
    /// dependency chains of one row's sums and statistics overlap with the
    /// others' (one row alone is latency-bound).
    fn emit_rows(
        &self,
        k: &mut Kb,
        s: &Schedule,
        bufs: &Bufs,
        rows: &[ClValue],
        temps: &[Vec<Option<ClValue>>],
    ) {
        let mut states: Vec<RowState> = rows
            .iter()
            .zip(temps)
            .map(|(&r, temps)| self.row_state(k, bufs, r, temps))
            .collect();
        for pass in 0..=s.passes {
            for st in states.iter_mut() {
                self.per_row_nodes(k, s, pass, st, bufs.outs);
            }
            if pass < s.passes {
                self.pass(k, s, pass, &mut states);
            }
        }
    }

    /// Row `r`'s per-row inputs and the addresses of its rows.
    fn row_state(
        &self,
        k: &mut Kb,
        bufs: &Bufs,
        r: ClValue,
        temps: &[Option<ClValue>],
    ) -> RowState {
        let row_off = k.b.ins().imul_imm_s(r, (self.d * 4) as i64);
        let mut vals: BTreeMap<RowArg, ClValue> = BTreeMap::new();
        let mut in_rows = Vec::with_capacity(self.ins.len());
        for (j, (_, shape)) in self.ins.iter().enumerate() {
            let p = bufs.ins[j];
            in_rows.push(match shape {
                RowShape::Full => Some(k.b.ins().iadd(p, row_off)),
                RowShape::Col => Some(p),
                _ => None,
            });
            let v = match shape {
                RowShape::PerRow => {
                    let a = k.addr(p, r, 4);
                    k.load_f(a, 0)
                }
                RowShape::Scalar => match bufs.scalars[j] {
                    Some(v) => v,
                    None => continue,
                },
                _ => continue,
            };
            vals.insert(RowArg::In(j), v);
        }
        let node_rows = (0..self.nodes.len())
            .map(|i| match bufs.outs[i] {
                Some(o) if self.nodes[i].shape == RowShape::Full => {
                    Some(k.b.ins().iadd(o, row_off))
                }
                _ => temps[i],
            })
            .collect();
        RowState {
            r,
            vals,
            in_rows,
            node_rows,
        }
    }

    /// The per-row nodes ready before pass `pass`, storing those read
    /// outside.
    fn per_row_nodes(
        &self,
        k: &mut Kb,
        s: &Schedule,
        pass: usize,
        st: &mut RowState,
        outs: &[Option<ClValue>],
    ) {
        for (i, node) in self.nodes.iter().enumerate() {
            if node.shape != RowShape::PerRow || s.level[i] != pass {
                continue;
            }
            let v = match &node.op {
                RowOp::Ew(op, args) => {
                    let a: Vec<ClValue> = args.iter().map(|a| st.vals[a]).collect();
                    ew_scalar(k, op, &a)
                }
                // Sums are finished by the pass that accumulates them (the
                // one before this), but stored here like the others.
                RowOp::Sum { .. } => st.vals[&RowArg::Node(i)],
                RowOp::Splat(_) => continue,
            };
            st.vals.insert(RowArg::Node(i), v);
            if let Some(o) = outs[i] {
                let a = k.addr(o, st.r, 4);
                k.store_f(v, a, 0);
            }
        }
    }

    /// One pass over the rows of `states`: the full-row nodes of level
    /// `pass`, and the sums over them (whose results go to each row's
    /// `vals`).
    fn pass(&self, k: &mut Kb, s: &Schedule, pass: usize, states: &mut [RowState]) {
        let sums: Vec<(usize, RowArg)> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match n.op {
                RowOp::Sum { arg, .. } if s.level[i] == pass + 1 => Some((i, arg)),
                _ => None,
            })
            .collect();
        let used: Vec<RowArg> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|&(i, n)| n.shape == RowShape::Full && s.level[i] == pass)
            .flat_map(|(_, n)| match &n.op {
                RowOp::Ew(_, args) => args.clone(),
                RowOp::Splat(a) => vec![*a],
                RowOp::Sum { .. } => vec![],
            })
            .collect();
        // Each row's per-row operands of this pass, splatted once.
        let splats: Vec<BTreeMap<RowArg, ClValue>> = states
            .iter()
            .map(|st| {
                st.vals
                    .iter()
                    .filter(|(a, _)| used.contains(a))
                    .map(|(a, &v)| (*a, k.b.ins().splat(F32X4, v)))
                    .collect()
            })
            .collect();
        let zero_v = k.vconst(0.0);
        let zero_s = k.fconst(0.0);
        let vacc: Vec<Vec<_>> = states
            .iter()
            .map(|_| sums.iter().map(|_| k.var(F32X4, zero_v)).collect())
            .collect();
        let sacc: Vec<Vec<_>> = states
            .iter()
            .map(|_| sums.iter().map(|_| k.var(F32, zero_s)).collect())
            .collect();
        let hi = k.iconst(self.d as i64);
        let accumulate = |k: &mut Kb, j: ClValue, vector: bool| {
            // Byte offset of the column, formed once for every row read.
            let j = k.b.ins().imul_imm_s(j, 4);
            for (b, st) in states.iter().enumerate() {
                let per_row = if vector { &splats[b] } else { &st.vals };
                let at = At {
                    pass,
                    j,
                    vector,
                    st,
                    per_row,
                };
                let mut vals = self.columns(k, s, &at);
                for (si, &(_, arg)) in sums.iter().enumerate() {
                    let x = self.arg_at(k, &at, &mut vals, arg);
                    let acc = if vector { vacc[b][si] } else { sacc[b][si] };
                    let o = k.b.use_var(acc);
                    let n = k.b.ins().fadd(o, x);
                    k.b.def_var(acc, n);
                }
            }
        };
        // Long rows sum in blocks (see `Kb::sum_in_blocks`).
        let whole = self.d / 4 * 4;
        let vaccs: Vec<_> = vacc.iter().flatten().copied().collect();
        k.sum_in_blocks(whole, SUM_BLOCK, (&vaccs, zero_v), |k, lo, hi| {
            k.for_blocks(lo, hi, 4, |k, j| accumulate(k, j, true));
        });
        let from = k.iconst(whole as i64);
        if !self.d.is_multiple_of(4) {
            k.for_range(from, hi, 1, |k, j| accumulate(k, j, false));
        }
        for (b, st) in states.iter_mut().enumerate() {
            for (si, &(i, _)) in sums.iter().enumerate() {
                let v = k.b.use_var(vacc[b][si]);
                let h = hsum(k, v);
                let t = k.b.use_var(sacc[b][si]);
                let mut total = k.b.ins().fadd(h, t);
                if let RowOp::Sum { mean: true, .. } = self.nodes[i].op {
                    let n = k.fconst(self.d as f32);
                    total = k.b.ins().fdiv(total, n);
                }
                st.vals.insert(RowArg::Node(i), total);
            }
        }
    }

    /// Operand `a` at the column of `at`: a per-row value, a node computed
    /// in this pass, or a row loaded from memory.
    fn arg_at(
        &self,
        k: &mut Kb,
        at: &At,
        vals: &mut HashMap<usize, ClValue>,
        a: RowArg,
    ) -> ClValue {
        if let Some(&v) = at.per_row.get(&a) {
            return v;
        }
        if let RowArg::Node(x) = a {
            if let Some(&v) = vals.get(&x) {
                return v;
            }
        }
        let row = match a {
            RowArg::In(x) => at.st.in_rows[x],
            RowArg::Node(x) => at.st.node_rows[x],
        };
        // The schedule puts every full-row operand of a pass in memory or
        // in this pass; a missing row would be a scheduling bug.
        let row = row.unwrap_or_else(|| k.iconst(0));
        let p = k.b.ins().iadd(row, at.j);
        let v = if at.vector {
            k.load_v(p, 0)
        } else {
            k.load_f(p, 0)
        };
        if let RowArg::Node(x) = a {
            vals.insert(x, v);
        }
        v
    }

    /// The full-row nodes of pass `at.pass` at the column of `at`: four
    /// columns as f32x4 (`at.vector`) or one as f32. Returns each computed
    /// node's value; stores those read outside or by a later pass.
    fn columns(&self, k: &mut Kb, s: &Schedule, at: &At) -> HashMap<usize, ClValue> {
        let mut vals: HashMap<usize, ClValue> = HashMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.shape != RowShape::Full || s.level[i] != at.pass {
                continue;
            }
            let v = match &node.op {
                RowOp::Ew(op, args) => {
                    let a: Vec<ClValue> = args
                        .iter()
                        .map(|&a| self.arg_at(k, at, &mut vals, a))
                        .collect();
                    if at.vector {
                        ew_vec(k, op, &a)
                    } else {
                        ew_scalar(k, op, &a)
                    }
                }
                RowOp::Splat(a) => self.arg_at(k, at, &mut vals, *a),
                RowOp::Sum { .. } => continue,
            };
            vals.insert(i, v);
            if let Some(p) = at.st.node_rows[i] {
                let p = k.b.ins().iadd(p, at.j);
                k.b.ins().store(super::emit::flags(), v, p, 0);
            }
        }
        vals
    }
}

/// Rows per block of [`RowProgram::emit`].
const ROW_BLOCK: usize = 4;

/// The step's buffers.
struct Bufs<'a> {
    ins: &'a [ClValue],
    outs: &'a [Option<ClValue>],
    /// Scalar inputs, loaded once.
    scalars: &'a [Option<ClValue>],
}

/// One row of a block: its index, its per-row values so far (f32), and
/// where its rows are.
struct RowState {
    r: ClValue,
    vals: BTreeMap<RowArg, ClValue>,
    /// Per input: its row (full inputs) or itself (column inputs).
    in_rows: Vec<Option<ClValue>>,
    /// Per full-row node: its row in its result or stack buffer, where it
    /// is stored and re-read.
    node_rows: Vec<Option<ClValue>>,
}

/// One row at one column of one pass.
struct At<'a> {
    pass: usize,
    /// Byte offset of the column.
    j: ClValue,
    vector: bool,
    st: &'a RowState,
    /// The row's per-row values, splatted when `vector`.
    per_row: &'a BTreeMap<RowArg, ClValue>,
}
