//! Kernel steps: the unit the runtime schedules. An IR node lowers to one or
//! more steps run in order (matmul: pack A, pack B, compute); each step is
//! one Cranelift function over a range of independent work units.

use super::conv::{Col2im, Im2col, Pool};
use super::emit::{Kb, Loc};
use super::matmul::Matmul;
use super::reduce::{CrossEntropy, Hinge, Reduce, Softmax};
use super::rnn::{RnnPack, RnnSeq};
use crate::ir::{BinaryOp, UnaryOp};
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::types::{F32X4, I32};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value};

/// A strided view over `dims`: element `idx` sits at
/// `off + Σ idx_d · strides_d` (in elements) from the base of `loc`.
#[derive(Clone, Debug, PartialEq)]
pub struct View {
    pub loc: Loc,
    pub off: usize,
    pub strides: Vec<i64>,
}

impl View {
    /// Row-major strides of a contiguous tensor.
    pub fn contiguous(loc: Loc, dims: &[usize]) -> View {
        View {
            loc,
            off: 0,
            strides: contiguous_strides(dims),
        }
    }
}

pub fn contiguous_strides(dims: &[usize]) -> Vec<i64> {
    let mut s = vec![0i64; dims.len()];
    let mut acc = 1i64;
    for d in (0..dims.len()).rev() {
        s[d] = acc;
        acc *= dims[d] as i64;
    }
    s
}

/// NumPy-broadcast strides of a contiguous operand of shape `src` read as
/// `out` (0 where the operand has size 1 or is missing).
pub fn broadcast_strides(src: &[usize], out: &[usize]) -> Vec<i64> {
    let cs = contiguous_strides(src);
    let lead = out.len() - src.len();
    (0..out.len())
        .map(|d| {
            if d < lead || src[d - lead] == 1 {
                0
            } else {
                cs[d - lead]
            }
        })
        .collect()
}

/// Merge adjacent dims that every view walks contiguously, and drop size-1
/// dims, so loops run over as few and as long dims as possible.
pub fn collapse(dims: &[usize], views: &mut [&mut Vec<i64>]) -> Vec<usize> {
    let mut out_dims: Vec<usize> = Vec::new();
    let mut out_strides: Vec<Vec<i64>> = vec![Vec::new(); views.len()];
    for d in 0..dims.len() {
        if dims[d] == 1 {
            continue;
        }
        let mergeable = !out_dims.is_empty()
            && views.iter().enumerate().all(|(k, v)| {
                let prev = *out_strides[k].last().unwrap_or(&0);
                prev == v[d] * dims[d] as i64
            });
        if mergeable {
            let last = out_dims.len() - 1;
            out_dims[last] *= dims[d];
            for (k, v) in views.iter().enumerate() {
                let l = out_strides[k].len() - 1;
                out_strides[k][l] = v[d];
            }
        } else {
            out_dims.push(dims[d]);
            for (k, v) in views.iter().enumerate() {
                out_strides[k].push(v[d]);
            }
        }
    }
    if out_dims.is_empty() {
        out_dims.push(1);
        for s in out_strides.iter_mut() {
            s.push(0);
        }
    }
    for (k, v) in views.iter_mut().enumerate() {
        **v = std::mem::take(&mut out_strides[k]);
    }
    out_dims
}

/// An elementwise op over a (collapsed) output shape.
#[derive(Clone, Debug, PartialEq)]
pub enum EwOp {
    Unary(UnaryOp),
    Binary(BinaryOp),
}

/// An operand of a fused elementwise operation: an input view, or the
/// result of an earlier operation of the same program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EwArg {
    In(usize),
    Tmp(usize),
}

/// One operation of an elementwise program.
#[derive(Clone, Debug, PartialEq)]
pub struct EwInstr {
    pub op: EwOp,
    pub args: Vec<EwArg>,
}

/// `out = prog(ins...)`: a chain of elementwise ops computed per element in
/// registers (the fused ops' intermediate results never reach memory), out
/// contiguous, operands broadcast by strides. The last operation's result
/// is stored. Work units are output rows (all dims but the last).
#[derive(Clone, Debug, PartialEq)]
pub struct Elementwise {
    pub prog: Vec<EwInstr>,
    pub dims: Vec<usize>,
    pub out: View,
    pub ins: Vec<View>,
}

impl Elementwise {
    /// [`eval_program`] of this program.
    fn eval(&self, k: &mut Kb, ins: &[Vec<Value>], scalar: bool) -> Vec<Value> {
        eval_program(k, &self.prog, ins, scalar)
    }
}

/// Evaluate an elementwise program on one group of independent vectors
/// (or scalars): `ins[j][g]` is input `j` of member `g`. Heavy operations
/// go through the math functions for the whole group at once. Returns the
/// last operation's result per member.
pub fn eval_program(k: &mut Kb, prog: &[EwInstr], ins: &[Vec<Value>], scalar: bool) -> Vec<Value> {
    let mut tmps: Vec<Vec<Value>> = Vec::with_capacity(prog.len());
    for instr in prog {
        let args: Vec<Vec<Value>> = instr
            .args
            .iter()
            .map(|a| match *a {
                EwArg::In(j) => ins[j].clone(),
                EwArg::Tmp(t) => tmps[t].clone(),
            })
            .collect();
        let r = if scalar {
            (0..args.first().map_or(1, |a| a.len()))
                .map(|g| {
                    let a: Vec<Value> = args.iter().map(|v| v[g]).collect();
                    ew_scalar(k, &instr.op, &a)
                })
                .collect()
        } else {
            ew_vec_n(k, &instr.op, &args)
        };
        tmps.push(r);
    }
    tmps.pop().unwrap_or_default()
}

/// Copy 4-byte elements from a strided view into another (layout ops,
/// any dtype). Work units are rows of `dims` (all dims but the last).
#[derive(Clone, Debug, PartialEq)]
pub struct Copy {
    pub dims: Vec<usize>,
    pub src: View,
    pub dst: View,
}

/// Write `value` (raw bits) into `n` contiguous elements. Work units are
/// blocks of `FILL_BLOCK` elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Fill {
    pub dst: Loc,
    pub off: usize,
    pub n: usize,
    pub bits: u32,
}

pub const FILL_BLOCK: usize = 4096;

/// `out[i, :] = table[ids[i], :]`; an id outside `[0, rows)` returns
/// `i + 1`. Work units are ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Gather {
    pub table: Loc,
    pub ids: Loc,
    pub out: Loc,
    pub rows: usize,
    pub width: usize,
    pub count: usize,
}

/// `out[ids[i], :] += dy[i, :]` over a zeroed `out`, ids in order; work
/// units are columns so every element keeps one summation order.
#[derive(Clone, Debug, PartialEq)]
pub struct ScatterAdd {
    pub ids: Loc,
    pub dy: Loc,
    pub out: Loc,
    pub rows: usize,
    pub width: usize,
    pub count: usize,
}

/// One schedulable step.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Fill(Fill),
    Copy(Copy),
    Elementwise(Elementwise),
    Matmul(Matmul, MatmulPhase),
    Reduce(Reduce),
    Softmax(Softmax),
    CrossEntropy(CrossEntropy),
    Hinge(Hinge),
    Gather(Gather),
    ScatterAdd(ScatterAdd),
    Im2col(Im2col),
    Col2im(Col2im),
    Pool(Pool),
    Attention(super::attention::Attn),
    /// A whole recurrent time loop (LSTM/GRU, forward or backward).
    Rnn(RnnSeq),
    RnnPack(RnnPack),
    /// The ops on the rows of a last-axis reduction, one row at a time.
    Rows(super::rows::RowProgram),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPhase {
    PackA,
    PackB,
    Compute,
}

fn rows_of(dims: &[usize]) -> usize {
    dims[..dims.len() - 1].iter().product()
}

impl Step {
    /// Number of independent work units.
    pub fn units(&self) -> usize {
        match self {
            Step::Fill(f) => f.n.div_ceil(FILL_BLOCK),
            Step::Copy(c) => match super::transpose::transposed_slab(c) {
                Some((rows, _, _)) => super::transpose::units(c, rows),
                None => rows_of(&c.dims),
            },
            Step::Elementwise(e) => rows_of(&e.dims),
            Step::Matmul(m, p) => m.units(*p),
            Step::Reduce(r) => r.units(),
            Step::Softmax(s) => s.units(),
            Step::CrossEntropy(c) => c.units(),
            Step::Hinge(h) => h.units(),
            Step::Gather(g) => g.count,
            Step::ScatterAdd(s) => s.width,
            Step::Im2col(s) => s.units(),
            Step::Col2im(s) => s.units(),
            Step::Pool(s) => s.units(),
            Step::Attention(s) => s.units(),
            Step::Rnn(s) => s.units(),
            Step::RnnPack(s) => s.units(),
            Step::Rows(s) => s.units(),
        }
    }

    /// Rough cost of one unit in element operations, for chunking.
    pub fn unit_cost(&self) -> usize {
        match self {
            Step::Fill(_) => FILL_BLOCK,
            Step::Copy(c) => match super::transpose::transposed_slab(c) {
                Some((_, cols, _)) => 4 * cols,
                None => *c.dims.last().unwrap_or(&1) + COPY_ROW_COST,
            },
            Step::Elementwise(e) => {
                let per_element: usize = e
                    .prog
                    .iter()
                    .map(|i| if is_heavy(&i.op) { 8 } else { 1 })
                    .sum();
                e.dims.last().unwrap_or(&1) * per_element
            }
            Step::Matmul(m, p) => m.unit_cost(*p),
            Step::Reduce(r) => r.unit_cost(),
            Step::Softmax(s) => s.unit_cost(),
            Step::CrossEntropy(c) => c.unit_cost(),
            Step::Hinge(h) => h.unit_cost(),
            Step::Gather(g) => g.width,
            Step::ScatterAdd(s) => s.count,
            Step::Im2col(s) => s.unit_cost(),
            Step::Col2im(s) => s.unit_cost(),
            Step::Pool(s) => s.unit_cost(),
            Step::Attention(s) => s.unit_cost(),
            Step::Rnn(s) => s.unit_cost(),
            Step::RnnPack(s) => s.unit_cost(),
            Step::Rows(s) => s.unit_cost(),
        }
    }

    /// Fixed chunk size (in units) for splitting over threads: it depends
    /// only on the step, never on the thread count.
    pub fn grain(&self) -> usize {
        if let Step::Matmul(m, MatmulPhase::Compute) = self {
            return m.compute_grain();
        }
        if let Step::Rnn(r) = self {
            return r.grain();
        }
        // Per-unit work that does not depend on other units can be split
        // anywhere; aim at ~32k element operations per chunk.
        let cost = self.unit_cost().max(1);
        (32 * 1024usize).div_ceil(cost).max(1)
    }

    /// Emit the function body for work units `[kb.start, kb.end)`.
    pub fn emit(&self, kb: &mut Kb) {
        match self {
            Step::Fill(f) => emit_fill(kb, f),
            Step::Copy(c) => match super::transpose::transposed_slab(c) {
                Some((rows, cols, ss)) => super::transpose::emit(kb, c, rows, cols, ss),
                None => emit_copy(kb, c),
            },
            Step::Elementwise(e) => emit_elementwise(kb, e),
            Step::Matmul(m, p) => m.emit(kb, *p),
            Step::Reduce(r) => r.emit(kb),
            Step::Softmax(s) => s.emit(kb),
            Step::CrossEntropy(c) => c.emit(kb),
            Step::Hinge(h) => h.emit(kb),
            Step::Gather(g) => emit_gather(kb, g),
            Step::ScatterAdd(s) => emit_scatter_add(kb, s),
            Step::Im2col(s) => s.emit(kb),
            Step::Col2im(s) => s.emit(kb),
            Step::Pool(s) => s.emit(kb),
            Step::Attention(s) => s.emit(kb),
            Step::Rnn(s) => s.emit(kb),
            Step::RnnPack(s) => s.emit(kb),
            Step::Rows(s) => s.emit(kb),
        }
    }
}

fn emit_fill(kb: &mut Kb, f: &Fill) {
    let base = kb.base(f.dst);
    let base = kb.b.ins().iadd_imm_s(base, (f.off * 4) as i64);
    let bits = kb.b.ins().iconst(I32, f.bits as i64);
    let vbits = kb.b.ins().splat(cranelift_codegen::ir::types::I32X4, bits);
    let v = kb.b.ins().bitcast(F32X4, MemFlagsData::new(), vbits);
    let n = kb.iconst(f.n as i64);
    let (start, end) = (kb.start, kb.end);
    let lo = kb.b.ins().imul_imm_s(start, FILL_BLOCK as i64);
    let hi = kb.b.ins().imul_imm_s(end, FILL_BLOCK as i64);
    let hi = kb.b.ins().smin(hi, n);
    kb.for_vec_tail(
        lo,
        hi,
        |k, i| {
            let a = k.addr(base, i, 4);
            k.b.ins().store(super::emit::flags(), v, a, 0);
        },
        |k, i| {
            let a = k.addr(base, i, 4);
            k.b.ins().store(super::emit::flags(), bits, a, 0);
        },
    );
}

/// Offsets (in elements) of each view at the start of row `row`.
fn row_offsets(kb: &mut Kb, row: Value, dims: &[usize], views: &[&View]) -> Vec<Value> {
    let outer = &dims[..dims.len() - 1];
    let strides: Vec<Vec<i64>> = views
        .iter()
        .map(|v| v.strides[..v.strides.len() - 1].to_vec())
        .collect();
    let offs = kb.unflatten_offsets(row, outer, &strides);
    offs.into_iter()
        .zip(views)
        .map(|(o, v)| kb.b.ins().iadd_imm_s(o, v.off as i64))
        .collect()
}

/// Longest contiguous row a copy moves without a loop.
const COPY_UNROLL_MAX: usize = 64;

/// Element operations a copied row costs beyond its elements: finding the
/// row's source and destination from its index.
const COPY_ROW_COST: usize = 16;

fn emit_copy(kb: &mut Kb, c: &Copy) {
    let sbase = kb.base(c.src.loc);
    let dbase = kb.base(c.dst.loc);
    let inner = *c.dims.last().unwrap_or(&1);
    let ss = *c.src.strides.last().unwrap_or(&1);
    let ds = *c.dst.strides.last().unwrap_or(&1);
    let (start, end) = (kb.start, kb.end);
    let dims = c.dims.clone();
    kb.for_range(start, end, 1, |k, row| {
        let offs = row_offsets(k, row, &dims, &[&c.src, &c.dst]);
        let s0 = k.addr(sbase, offs[0], 4);
        let d0 = k.addr(dbase, offs[1], 4);
        let zero = k.iconst(0);
        let n = k.iconst(inner as i64);
        if ss == 1 && ds == 1 && inner <= COPY_UNROLL_MAX {
            // Short rows (an attention head's features) as straight-line
            // moves: a loop would cost more than its few vectors.
            for i in 0..inner / 4 {
                let v = k.load_v(s0, 16 * i as i32);
                k.b.ins().store(super::emit::flags(), v, d0, 16 * i as i32);
            }
            for i in inner / 4 * 4..inner {
                let v = k.load_i(s0, 4 * i as i32);
                k.b.ins().store(super::emit::flags(), v, d0, 4 * i as i32);
            }
        } else if ss == 1 && ds == 1 {
            k.for_vec_tail(
                zero,
                n,
                |k, i| {
                    let sa = k.addr(s0, i, 4);
                    let v = k.load_v(sa, 0);
                    let da = k.addr(d0, i, 4);
                    k.b.ins().store(super::emit::flags(), v, da, 0);
                },
                |k, i| {
                    let sa = k.addr(s0, i, 4);
                    let v = k.load_i(sa, 0);
                    let da = k.addr(d0, i, 4);
                    k.b.ins().store(super::emit::flags(), v, da, 0);
                },
            );
        } else {
            k.for_range(zero, n, 1, |k, i| {
                let sa = k.addr(s0, i, 4 * ss);
                let v = k.load_i(sa, 0);
                let da = k.addr(d0, i, 4 * ds);
                k.b.ins().store(super::emit::flags(), v, da, 0);
            });
        }
    });
}

/// Apply an elementwise op to f32x4 lanes.
pub fn ew_vec(kb: &mut Kb, op: &EwOp, a: &[Value]) -> Value {
    let b = &mut kb.b;
    match op {
        EwOp::Unary(u) => {
            let x = a[0];
            match u {
                UnaryOp::Relu => {
                    // NaN stays NaN (the compare is false for it).
                    let zero = kb.vconst(0.0);
                    let le = kb.vcmp(FloatCC::LessThanOrEqual, x, zero);
                    kb.vsel(le, zero, x)
                }
                UnaryOp::Sigmoid => kb.vsigmoid(x),
                UnaryOp::Tanh => kb.vtanh(x),
                UnaryOp::Exp => kb.vexp(x),
                UnaryOp::Log => kb.vlog(x),
                UnaryOp::Sqrt => b.ins().sqrt(x),
                UnaryOp::Abs => b.ins().fabs(x),
                UnaryOp::Neg => b.ins().fneg(x),
                UnaryOp::Step => {
                    let zero = kb.vconst(0.0);
                    let one = kb.vconst(1.0);
                    let gt = kb.vcmp(FloatCC::GreaterThan, x, zero);
                    kb.vsel(gt, one, zero)
                }
                UnaryOp::Sign => {
                    let zero = kb.vconst(0.0);
                    let one = kb.vconst(1.0);
                    let mone = kb.vconst(-1.0);
                    let gt = kb.vcmp(FloatCC::GreaterThan, x, zero);
                    let lt = kb.vcmp(FloatCC::LessThan, x, zero);
                    let r = kb.vsel(gt, one, zero);
                    kb.vsel(lt, mone, r)
                }
            }
        }
        EwOp::Binary(op) => {
            let (x, y) = (a[0], a[1]);
            match op {
                BinaryOp::Add => b.ins().fadd(x, y),
                BinaryOp::Sub => b.ins().fsub(x, y),
                BinaryOp::Mul => b.ins().fmul(x, y),
                BinaryOp::Div => b.ins().fdiv(x, y),
                BinaryOp::Maximum => b.ins().fmax(x, y),
                BinaryOp::Minimum => b.ins().fmin(x, y),
                BinaryOp::Greater | BinaryOp::Equal => {
                    let cc = if *op == BinaryOp::Greater {
                        FloatCC::GreaterThan
                    } else {
                        FloatCC::Equal
                    };
                    let m = kb.vcmp(cc, x, y);
                    let one = kb.vconst(1.0);
                    let zero = kb.vconst(0.0);
                    kb.vsel(m, one, zero)
                }
            }
        }
    }
}

/// Vectors per block of the unrolled loops of the transcendental ops: the
/// math functions interleave this many independent chains.
pub const MATH_GROUP: usize = 4;

/// Whether an op is one of the long polynomial approximations, whose
/// loops are latency-bound unless several vectors go through at once.
pub fn is_heavy(op: &EwOp) -> bool {
    matches!(
        op,
        EwOp::Unary(UnaryOp::Exp | UnaryOp::Log | UnaryOp::Tanh | UnaryOp::Sigmoid)
    )
}

/// [`ew_vec`] on a group of independent operand sets (`args[j][g]`:
/// operand `j` of group member `g`), the transcendental ops interleaved.
pub fn ew_vec_n(kb: &mut Kb, op: &EwOp, args: &[Vec<Value>]) -> Vec<Value> {
    match op {
        EwOp::Unary(UnaryOp::Exp) => kb.vexp_n(&args[0]),
        EwOp::Unary(UnaryOp::Log) => kb.vlog_n(&args[0]),
        EwOp::Unary(UnaryOp::Tanh) => kb.vtanh_n(&args[0]),
        EwOp::Unary(UnaryOp::Sigmoid) => kb.vsigmoid_n(&args[0]),
        _ => (0..args[0].len())
            .map(|g| {
                let a: Vec<Value> = args.iter().map(|v| v[g]).collect();
                ew_vec(kb, op, &a)
            })
            .collect(),
    }
}

/// Scalar version through lane 0 of a splat, so both paths share one
/// definition (and one rounding behaviour).
pub fn ew_scalar(kb: &mut Kb, op: &EwOp, a: &[Value]) -> Value {
    let vs: Vec<Value> = a.iter().map(|&x| kb.b.ins().splat(F32X4, x)).collect();
    let r = ew_vec(kb, op, &vs);
    kb.b.ins().extractlane(r, 0)
}

fn emit_elementwise(kb: &mut Kb, e: &Elementwise) {
    let obase = kb.base(e.out.loc);
    let ibases: Vec<Value> = e.ins.iter().map(|v| kb.base(v.loc)).collect();
    let inner = *e.dims.last().unwrap_or(&1);
    let (start, end) = (kb.start, kb.end);
    let mut views: Vec<&View> = vec![&e.out];
    views.extend(e.ins.iter());
    let inner_strides: Vec<i64> = e
        .ins
        .iter()
        .map(|v| *v.strides.last().unwrap_or(&0))
        .collect();
    kb.for_range(start, end, 1, |k, row| {
        let offs = row_offsets(k, row, &e.dims, &views);
        let o0 = k.addr(obase, offs[0], 4);
        let starts: Vec<Value> = (0..e.ins.len())
            .map(|j| k.addr(ibases[j], offs[j + 1], 4))
            .collect();
        // Operands broadcast along the row are loaded once.
        let mut scal: Vec<Option<(Value, Value)>> = Vec::new();
        for j in 0..e.ins.len() {
            if inner_strides[j] == 0 {
                let s = k.load_f(starts[j], 0);
                let v = k.b.ins().splat(F32X4, s);
                scal.push(Some((s, v)));
            } else {
                scal.push(None);
            }
        }
        // `group` vectors (or scalars) of every input from element `i` on.
        let load = |k: &mut Kb, i: Value, group: usize, scalar: bool| -> Vec<Vec<Value>> {
            (0..starts.len())
                .map(|j| {
                    let a = k.addr(starts[j], i, 4 * inner_strides[j]);
                    (0..group)
                        .map(|g| match (scal[j], scalar) {
                            (Some((s, _)), true) => s,
                            (Some((_, v)), false) => v,
                            (None, true) => k.load_f(a, 0),
                            (None, false) => k.load_v(a, (16 * g) as i32),
                        })
                        .collect()
                })
                .collect()
        };
        let zero = k.iconst(0);
        let n = k.iconst(inner as i64);
        // MATH_GROUP vectors at a time: the math functions of transcendental
        // programs interleave independent chains, and every program forms
        // each operand's address once per group rather than per vector
        // (these steps are compiled without the optimiser, which would
        // otherwise strength-reduce the per-vector address arithmetic).
        let from = k.for_blocks(zero, n, (4 * MATH_GROUP) as i64, |k, i| {
            let args = load(k, i, MATH_GROUP, false);
            let rs = e.eval(k, &args, false);
            let a = k.addr(o0, i, 4);
            for (g, r) in rs.into_iter().enumerate() {
                k.b.ins().store(super::emit::flags(), r, a, (16 * g) as i32);
            }
        });
        k.for_vec_tail(
            from,
            n,
            |k, i| {
                let args = load(k, i, 1, false);
                let r = e.eval(k, &args, false);
                let a = k.addr(o0, i, 4);
                k.b.ins().store(super::emit::flags(), r[0], a, 0);
            },
            |k, i| {
                let args = load(k, i, 1, true);
                let r = e.eval(k, &args, true);
                let a = k.addr(o0, i, 4);
                k.store_f(r[0], a, 0);
            },
        );
    });
}

fn emit_gather(kb: &mut Kb, g: &Gather) {
    let table = kb.base(g.table);
    let ids = kb.base(g.ids);
    let out = kb.base(g.out);
    let (start, end) = (kb.start, kb.end);
    kb.for_range(start, end, 1, |k, i| {
        let ia = k.addr(ids, i, 4);
        let id = k.load_i(ia, 0);
        let id = k.b.ins().sextend(cranelift_codegen::ir::types::I64, id);
        let rows = k.iconst(g.rows as i64);
        // Unsigned compare also rejects negative ids.
        let bad = k.b.ins().icmp(
            cranelift_codegen::ir::condcodes::IntCC::UnsignedGreaterThanOrEqual,
            id,
            rows,
        );
        k.if_then(bad, |k| {
            let code = k.b.ins().iadd_imm_s(i, 1);
            k.jump_ret(code);
        });
        let src = k.b.ins().imul_imm_s(id, (g.width * 4) as i64);
        let src = k.b.ins().iadd(table, src);
        let dst = k.b.ins().imul_imm_s(i, (g.width * 4) as i64);
        let dst = k.b.ins().iadd(out, dst);
        let zero = k.iconst(0);
        let n = k.iconst(g.width as i64);
        k.for_vec_tail(
            zero,
            n,
            |k, j| {
                let a = k.addr(src, j, 4);
                let v = k.load_v(a, 0);
                let d = k.addr(dst, j, 4);
                k.b.ins().store(super::emit::flags(), v, d, 0);
            },
            |k, j| {
                let a = k.addr(src, j, 4);
                let v = k.load_f(a, 0);
                let d = k.addr(dst, j, 4);
                k.store_f(v, d, 0);
            },
        );
    });
}

fn emit_scatter_add(kb: &mut Kb, s: &ScatterAdd) {
    let ids = kb.base(s.ids);
    let dy = kb.base(s.dy);
    let out = kb.base(s.out);
    let (start, end) = (kb.start, kb.end);
    // Zero this call's columns, then add the rows in id order, four
    // columns per vector (each column still sums its rows in id order).
    kb.for_const(0, s.rows, |k, r| {
        let row = k.b.ins().imul_imm_s(r, (s.width * 4) as i64);
        let row = k.b.ins().iadd(out, row);
        k.for_vec_tail(
            start,
            end,
            |k, c| {
                let a = k.addr(row, c, 4);
                let z = k.vconst(0.0);
                k.b.ins().store(super::emit::flags(), z, a, 0);
            },
            |k, c| {
                let a = k.addr(row, c, 4);
                let z = k.fconst(0.0);
                k.store_f(z, a, 0);
            },
        );
    });
    kb.for_const(0, s.count, |k, i| {
        let ia = k.addr(ids, i, 4);
        let id = k.load_i(ia, 0);
        let id = k.b.ins().sextend(cranelift_codegen::ir::types::I64, id);
        let rows = k.iconst(s.rows as i64);
        let bad = k.b.ins().icmp(
            cranelift_codegen::ir::condcodes::IntCC::UnsignedGreaterThanOrEqual,
            id,
            rows,
        );
        k.if_then(bad, |k| {
            let code = k.b.ins().iadd_imm_s(i, 1);
            k.jump_ret(code);
        });
        let drow = k.b.ins().imul_imm_s(i, (s.width * 4) as i64);
        let drow = k.b.ins().iadd(dy, drow);
        let orow = k.b.ins().imul_imm_s(id, (s.width * 4) as i64);
        let orow = k.b.ins().iadd(out, orow);
        k.for_vec_tail(
            start,
            end,
            |k, c| {
                let da = k.addr(drow, c, 4);
                let oa = k.addr(orow, c, 4);
                let x = k.load_v(da, 0);
                let y = k.load_v(oa, 0);
                let z = k.b.ins().fadd(y, x);
                k.b.ins().store(super::emit::flags(), z, oa, 0);
            },
            |k, c| {
                let da = k.addr(drow, c, 4);
                let oa = k.addr(orow, c, 4);
                let x = k.load_f(da, 0);
                let y = k.load_f(oa, 0);
                let z = k.b.ins().fadd(y, x);
                k.store_f(z, oa, 0);
            },
        );
    });
}
