//! Scaled dot-product attention and its gradient (LANGUAGE.md §6), batched
//! over the leading dims, as fused tile kernels with a streaming softmax.
//!
//! A work unit is one problem of the batch and a block of `R` query rows
//! (or, for `dk`/`dv`, of `R` key rows), so every output element is summed
//! by one unit in one fixed order: results never depend on the thread count.
//! Scores are formed `R × G` at a time (register blocking) with the
//! features as the reduction loop, vectorised along the other sequence, so
//! the operand on that side is read from a transposed copy `[batch, f, T']`
//! (`T'` = T rounded up to `G`, zero padded). Columns past the sequence
//! and, when causal, past the diagonal become `−∞` scores; key tiles wholly
//! above the diagonal are never visited. Nothing of size `Tq × Tk` exists
//! except, in the backward for small problems, the saved probabilities.
//!
//! Forward: per key tile, `S = q kᵀ · scale` into an `R × TILE` stack tile,
//! the online softmax update (running max `m`, running sum `l`, the output
//! accumulator rescaled by `exp(m_old − m_new)`), then `O += P v`.
//!
//! Backward (flash-attention style, from `lse = m + log l` and
//! `D_i = Σ_j P_ij dP_ij` per row, with `dP = dy vᵀ`):
//! 1. `Stats`, per query block: the online pass, accumulating `D` like `l`.
//! 2. `Dq`, per query block: `P = exp(S − lse)`,
//!    `dS = P ∘ (dP − D) · scale`, `dq += dS k`.
//! 3. `Dkv`, per key block: `dv += Pᵀ dy`, `dk += dSᵀ q`.
//!
//! Which tensors are formed twice is chosen by size
//! ([`saves_probabilities`]). Small problems keep two `[Tq, Tk']` buffers
//! per problem: `Stats` leaves `S` and `dP` there, `Dq` turns them into `P`
//! and `dS` in place, `Dkv` reads them by column. Larger ones keep only
//! `lse` and `D`: `Dq` recomputes `S` and `dP` tile by tile, and `Dkv`
//! recomputes the transposed tiles from `k`, `v` and transposed copies of
//! `q` and `dy`.
//!
//! The IR's `attention_grad` takes `(q, k, v, dy)` only, so the row
//! statistics are recomputed by the gradient node rather than kept from the
//! forward node.

use super::emit::{flags, ro_flags, Kb, Loc};
use super::kernel::{ew_scalar, EwOp, Step, View};
use super::lower::Lowered;
use super::reduce::{hmax, hsum};
use super::rnn::Build;
use crate::ir::{TensorType, UnaryOp};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value};

/// Rows per work unit (and per register block).
const R: usize = 4;
/// Columns per register block: two f32x4.
const G: usize = 8;
/// Columns per tile of the online softmax; a multiple of `G`.
const TILE: usize = 64;

/// Largest `Tq · Tk` per problem for which the backward keeps `S`/`P` and
/// `dP`/`dS` (two `[batch, Tq, Tk']`-sized buffers) instead of recomputing
/// them.
pub const SAVE_MAX: usize = 128 * 128;
/// Largest `batch · Tq · Tk` kept that way (2 × 8 MiB).
pub const SAVE_MAX_TOTAL: usize = 2 << 20;

/// Whether the gradient of attention over `batch` problems with these
/// sequence lengths saves the probabilities (else it recomputes them tile
/// by tile).
pub fn saves_probabilities(batch: usize, tq: usize, tk: usize) -> bool {
    tq * tk <= SAVE_MAX && batch * tq * tk <= SAVE_MAX_TOTAL
}

fn pad(n: usize) -> usize {
    n.div_ceil(G) * G
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    tq: usize,
    tk: usize,
    d: usize,
    dv: usize,
}

impl Dims {
    fn of(ins: &[(Loc, &TensorType)]) -> Option<Dims> {
        let (q, k, v) = (
            &ins.first()?.1.shape,
            &ins.get(1)?.1.shape,
            &ins.get(2)?.1.shape,
        );
        let r = q.len();
        if r < 2 || k.len() != r || v.len() != r {
            return None;
        }
        let d = Dims {
            batch: q[..r - 2].iter().product(),
            tq: q[r - 2],
            tk: k[r - 2],
            d: q[r - 1],
            dv: v[r - 1],
        };
        // Empty problems are left to the interpreter.
        (d.batch * d.tq * d.tk * d.d * d.dv > 0).then_some(d)
    }
}

/// Which pass of the attention kernels a step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// `y = softmax(S) v`.
    Forward,
    /// Row statistics `lse` and `D` for the backward.
    Stats,
    /// `dq`, and with saved buffers also `P` and `dS`.
    Dq,
    /// `dk` (into `out`) and `dv` (into `out2`).
    Dkv,
}

/// One attention step. Operands a phase does not read are ignored.
#[derive(Clone, Debug, PartialEq)]
pub struct Attn {
    pub phase: Phase,
    pub batch: usize,
    pub tq: usize,
    pub tk: usize,
    pub d: usize,
    pub dv: usize,
    pub causal: bool,
    pub scale: f32,
    pub q: Loc,
    pub k: Loc,
    pub v: Loc,
    pub dy: Loc,
    /// `kᵀ [batch, d, Tk']`, `vᵀ [batch, dv, Tk']`.
    pub kt: Loc,
    pub vt: Loc,
    /// `qᵀ [batch, d, Tq']`, `dyᵀ [batch, dv, Tq']` (recomputing `Dkv` only).
    pub qt: Loc,
    pub dyt: Loc,
    /// `lse`, `D`: `[batch, Tq']`.
    pub lse: Loc,
    pub dd: Loc,
    /// `P`, `dS`: `[batch, Tq rounded up to R, Tk']` when the backward
    /// saves them.
    pub saved: Option<(Loc, Loc)>,
    pub out: Loc,
    pub out2: Loc,
}

impl Attn {
    fn rows(&self) -> usize {
        if self.phase == Phase::Dkv {
            self.tk
        } else {
            self.tq
        }
    }

    pub fn units(&self) -> usize {
        self.batch * self.rows().div_ceil(R)
    }

    pub fn unit_cost(&self) -> usize {
        let (d, dv) = (self.d, self.dv);
        let (cols, flops) = match self.phase {
            Phase::Forward | Phase::Stats => (self.tk, d + dv + 12),
            Phase::Dq => (self.tk, 2 * d + dv + 12),
            Phase::Dkv if self.saved.is_some() => (self.tq, d + dv),
            Phase::Dkv => (self.tq, 2 * (d + dv) + 12),
        };
        let cols = if self.causal { cols.div_ceil(2) } else { cols };
        R * cols * flops
    }

    pub fn emit(&self, kb: &mut Kb) {
        let p = Ptrs {
            q: kb.base(self.q),
            k: kb.base(self.k),
            v: kb.base(self.v),
            dy: kb.base(self.dy),
            kt: kb.base(self.kt),
            vt: kb.base(self.vt),
            qt: kb.base(self.qt),
            dyt: kb.base(self.dyt),
            lse: kb.base(self.lse),
            dd: kb.base(self.dd),
            saved: self.saved.map(|(a, b)| (kb.base(a), kb.base(b))),
            out: kb.base(self.out),
            out2: kb.base(self.out2),
        };
        let fa = R * pad4(self.d.max(self.dv)) * 4;
        let bufs = Bufs {
            t1: kb.stack_buf((R * TILE * 4) as u32),
            t2: kb.stack_buf((R * TILE * 4) as u32),
            a1: kb.stack_buf(fa as u32),
            a2: kb.stack_buf(fa as u32),
        };
        let iota = iota(kb);
        let nblk = self.rows().div_ceil(R) as i64;
        let (start, end) = (kb.start, kb.end);
        kb.for_range(start, end, 1, |k, u| {
            let b = k.b.ins().udiv_imm_u(u, nblk);
            let blk = k.b.ins().urem_imm_u(u, nblk);
            let r0 = k.b.ins().imul_imm_s(blk, R as i64);
            let cx = Cx {
                p: &p,
                bufs: &bufs,
                iota,
                b,
                r0,
            };
            match self.phase {
                Phase::Forward | Phase::Stats => self.emit_online(k, &cx),
                Phase::Dq => self.emit_dq(k, &cx),
                Phase::Dkv => self.emit_dkv(k, &cx),
            }
        });
    }
}

/// Rows of the saved `P` and `dS` per problem: every row of a unit has its
/// own.
fn saved_rows(tq: usize) -> usize {
    tq.div_ceil(R) * R
}

fn pad4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

struct Ptrs {
    q: Value,
    k: Value,
    v: Value,
    dy: Value,
    kt: Value,
    vt: Value,
    qt: Value,
    dyt: Value,
    lse: Value,
    dd: Value,
    saved: Option<(Value, Value)>,
    out: Value,
    out2: Value,
}

/// Stack buffers: two `R × TILE` tiles, two `R × f` accumulators.
struct Bufs {
    t1: Value,
    t2: Value,
    a1: Value,
    a2: Value,
}

/// The current unit: problem `b`, first row `r0`.
struct Cx<'a> {
    p: &'a Ptrs,
    bufs: &'a Bufs,
    iota: Value,
    b: Value,
    r0: Value,
}

/// Valid columns per row: `lo[r] ≤ c ≤ hi[r]`, as i64 scalars.
struct Mask {
    lo: [Value; R],
    hi: [Value; R],
}

fn splat(k: &mut Kb, x: Value) -> Value {
    k.b.ins().splat(F32X4, x)
}

fn store(k: &mut Kb, v: Value, a: Value, off: i32) {
    k.b.ins().store(flags(), v, a, off);
}

fn exp1(k: &mut Kb, x: Value) -> Value {
    ew_scalar(k, &EwOp::Unary(UnaryOp::Exp), &[x])
}

/// `exp(x)` for lanes `x ≤ 0`, the exponents of softmax weights (`s − m`
/// with `m` the row max, or `s − lse`). Math.rs's range reduction and
/// polynomial; below −87 the result is `exp(−87) ≈ 1.6e−38` instead of a
/// subnormal, far below what a row sum ≥ 1 can resolve. It needs neither
/// the NaN-propagating clamps nor the split power of two of the general
/// `vexp`; `n` comes from the round-to-nearest magic-number add, whose bits
/// also give the integer. NaN stays NaN; callers zero masked (`−∞`) lanes.
fn exp_le0(k: &mut Kb, x: Value) -> Value {
    let lo = k.vconst(-87.0);
    let small = k.vcmp(FloatCC::LessThan, x, lo);
    let x = k.vsel(small, lo, x);
    let log2e = k.vconst(std::f32::consts::LOG2_E);
    let t = k.b.ins().fmul(x, log2e);
    let magic = k.vconst(12_582_912.0);
    let j = k.b.ins().fadd(t, magic);
    let n = k.b.ins().fsub(j, magic);
    let nn = k.b.ins().fneg(n);
    let c1 = k.vconst(0.693_359_4);
    let c2 = k.vconst(-2.121_944_4e-4);
    let r = k.b.ins().fma(nn, c1, x);
    let r = k.b.ins().fma(nn, c2, r);
    let coeffs = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];
    let mut p = k.vconst(coeffs[0]);
    for c in &coeffs[1..] {
        let cv = k.vconst(*c);
        p = k.b.ins().fma(p, r, cv);
    }
    let r2 = k.b.ins().fmul(r, r);
    let one = k.vconst(1.0);
    let rp1 = k.b.ins().fadd(r, one);
    let p = k.b.ins().fma(p, r2, rp1);
    // bits(j) − bits(magic) = n; the exponent field of 2^n is n + 127.
    let jb = k.b.ins().bitcast(I32X4, MemFlagsData::new(), j);
    let bias = k.b.ins().iconst(I32, 12_582_912f32.to_bits() as i64 - 127);
    let bias = k.b.ins().splat(I32X4, bias);
    let e = k.b.ins().isub(jb, bias);
    let e = k.b.ins().ishl_imm_u(e, 23);
    let s = k.b.ins().bitcast(F32X4, MemFlagsData::new(), e);
    k.b.ins().fmul(p, s)
}

/// `[0, 1, 2, 3]` as i32 lanes.
fn iota(k: &mut Kb) -> Value {
    let z = k.b.ins().iconst(I32, 0);
    let mut v = k.b.ins().splat(I32X4, z);
    for i in 1..4u8 {
        let x = k.b.ins().iconst(I32, i as i64);
        v = k.b.ins().insertlane(v, x, i);
    }
    v
}

fn splat_i(k: &mut Kb, x: Value) -> Value {
    let x = k.b.ins().ireduce(I32, x);
    k.b.ins().splat(I32X4, x)
}

/// `min(r0 + r, n − 1)` for each of the unit's rows: rows past the end
/// repeat the last one, so every load stays in bounds, and are not stored.
fn clamped_rows(k: &mut Kb, r0: Value, n: usize) -> [Value; R] {
    let last = k.iconst(n as i64 - 1);
    std::array::from_fn(|r| {
        let i = k.b.ins().iadd_imm_s(r0, r as i64);
        k.b.ins().smin(i, last)
    })
}

/// Byte address of row `rows[r]` of problem `b` in a `[batch, n, f]` tensor.
fn row_addrs(
    k: &mut Kb,
    base: Value,
    b: Value,
    n: usize,
    f: usize,
    rows: &[Value; R],
) -> [Value; R] {
    let pb = k.b.ins().imul_imm_s(b, (n * f * 4) as i64);
    let pb = k.b.ins().iadd(base, pb);
    std::array::from_fn(|r| k.addr(pb, rows[r], (f * 4) as i64))
}

/// `out[r][c − col_base] = Σ_f a[r][f] · bt[f][c]` (times `scale`), for
/// `c` in `[c0, c1)` stepping by `G`; masked columns get `−∞`. `bt` rows
/// are `bt_row` floats apart; `out` rows are given by address.
#[allow(clippy::too_many_arguments)]
fn score_tile(
    k: &mut Kb,
    a: &[Value; R],
    f: usize,
    bt: Value,
    bt_row: usize,
    (c0, c1): (Value, Value),
    out: &[Value; R],
    col_base: Value,
    scale: Option<f32>,
    mask: Option<(&Mask, Value)>,
) {
    let shift = k.b.ins().imul_imm_s(col_base, 4);
    let out: [Value; R] = std::array::from_fn(|r| k.b.ins().isub(out[r], shift));
    let row_bytes = (bt_row * 4) as i64;
    k.for_range(c0, c1, G as i64, |k, c| {
        let btc = k.addr(bt, c, 4);
        let z = k.vconst(0.0);
        // A counted loop with the accumulators carried in variables: fully
        // unrolled, Cranelift's egraph elaborates each accumulator's whole
        // chain at its store and spills every loaded operand.
        let vars: Vec<_> = (0..2 * R).map(|_| k.var(F32X4, z)).collect();
        let bp = k.var(I64, btc);
        let zero = k.iconst(0);
        let fv = k.iconst(f as i64);
        k.for_range(zero, fv, 1, |k, fi| {
            let ptr = k.b.use_var(bp);
            let b0 = k.b.ins().load(F32X4, ro_flags(), ptr, 0);
            let b1 = k.b.ins().load(F32X4, ro_flags(), ptr, 16);
            for r in 0..R {
                let xa = k.addr(a[r], fi, 4);
                let x = k.b.ins().load(F32, ro_flags(), xa, 0);
                let x = splat(k, x);
                for (h, bv) in [b0, b1].into_iter().enumerate() {
                    let var = vars[2 * r + h];
                    let o = k.b.use_var(var);
                    let y = k.b.ins().fma(x, bv, o);
                    k.b.def_var(var, y);
                }
            }
            let next = k.b.ins().iadd_imm_s(ptr, row_bytes);
            k.b.def_var(bp, next);
        });
        let mut acc: [[Value; 2]; R] =
            std::array::from_fn(|r| [k.b.use_var(vars[2 * r]), k.b.use_var(vars[2 * r + 1])]);
        if let Some(s) = scale {
            let sv = k.vconst(s);
            for row in acc.iter_mut() {
                for x in row.iter_mut() {
                    *x = k.b.ins().fmul(*x, sv);
                }
            }
        }
        let addrs: [Value; R] = std::array::from_fn(|r| k.addr(out[r], c, 4));
        let plain = |k: &mut Kb| {
            for r in 0..R {
                store(k, acc[r][0], addrs[r], 0);
                store(k, acc[r][1], addrs[r], 16);
            }
        };
        match mask {
            None => plain(k),
            Some((m, iota)) => {
                // Only blocks that cross a boundary pay for the mask.
                let lo_max = m.lo[R - 1];
                let hi_min = m.hi[0];
                let below = k.b.ins().icmp(IntCC::SignedLessThan, c, lo_max);
                let cend = k.b.ins().iadd_imm_s(c, G as i64 - 1);
                let above = k.b.ins().icmp(IntCC::SignedGreaterThan, cend, hi_min);
                let needs = k.b.ins().bor(below, above);
                k.if_else(
                    needs,
                    |k| {
                        let cv = splat_i(k, c);
                        let c0v = k.b.ins().iadd(cv, iota);
                        let four = k.b.ins().iconst(I32, 4);
                        let four = k.b.ins().splat(I32X4, four);
                        let c1v = k.b.ins().iadd(c0v, four);
                        let ninf = k.vconst(f32::NEG_INFINITY);
                        for r in 0..R {
                            let lo = splat_i(k, m.lo[r]);
                            let hi = splat_i(k, m.hi[r]);
                            for (h, col) in [c0v, c1v].into_iter().enumerate() {
                                let a = k.b.ins().icmp(IntCC::SignedLessThan, col, lo);
                                let bb = k.b.ins().icmp(IntCC::SignedGreaterThan, col, hi);
                                let bad = k.b.ins().bor(a, bb);
                                let bad = k.b.ins().bitcast(F32X4, MemFlagsData::new(), bad);
                                let x = k.b.ins().bitselect(bad, ninf, acc[r][h]);
                                store(k, x, addrs[r], (16 * h) as i32);
                            }
                        }
                    },
                    plain,
                );
            }
        }
    });
}

/// `acc[r][:] += Σ_j w[r](j) · m[j][:]` for `j` in `[j0, j1)`, where the
/// weight of row `r`, column `j` is at `w[r] + (j − col_base) · wstride`
/// bytes, `m` is row-major `[·, f]` and `acc` is `R` rows of `pad4(f)`.
#[allow(clippy::too_many_arguments)]
fn row_acc(
    k: &mut Kb,
    w: &[Value; R],
    wstride: i64,
    col_base: Value,
    m: Value,
    f: usize,
    (j0, j1): (Value, Value),
    acc: Value,
) {
    let shift = k.b.ins().imul_imm_s(col_base, wstride);
    let w: [Value; R] = std::array::from_fn(|r| k.b.ins().isub(w[r], shift));
    let arow = (pad4(f) * 4) as i32;
    let mut ch = 0;
    while ch < f {
        let width = match f - ch {
            n if n >= 8 => 8,
            n if n >= 4 => 4,
            n => n,
        };
        let vector = width >= 4;
        let lanes = if vector { width / 4 } else { width };
        let coff = (ch * 4) as i32;
        let mut vars = Vec::new();
        for r in 0..R {
            for h in 0..lanes {
                let off =
                    r as i32 * arow + coff + if vector { 16 * h as i32 } else { 4 * h as i32 };
                let x = if vector {
                    k.load_v(acc, off)
                } else {
                    k.load_f(acc, off)
                };
                vars.push(k.var(if vector { F32X4 } else { F32 }, x));
            }
        }
        k.for_range(j0, j1, 1, |k, j| {
            let mrow = k.addr(m, j, (f * 4) as i64);
            let mv: Vec<Value> = (0..lanes)
                .map(|h| {
                    if vector {
                        k.load_v(mrow, coff + 16 * h as i32)
                    } else {
                        k.load_f(mrow, coff + 4 * h as i32)
                    }
                })
                .collect();
            for r in 0..R {
                let wa = k.addr(w[r], j, wstride);
                let x = k.load_f(wa, 0);
                let x = if vector { splat(k, x) } else { x };
                for h in 0..lanes {
                    let var = vars[r * lanes + h];
                    let o = k.b.use_var(var);
                    let s = k.b.ins().fma(x, mv[h], o);
                    k.b.def_var(var, s);
                }
            }
        });
        for r in 0..R {
            for h in 0..lanes {
                let off =
                    r as i32 * arow + coff + if vector { 16 * h as i32 } else { 4 * h as i32 };
                let x = k.b.use_var(vars[r * lanes + h]);
                if vector {
                    store(k, x, acc, off);
                } else {
                    k.store_f(x, acc, off);
                }
            }
        }
        ch += width;
    }
}

/// `for t0 in (lo..hi).step_by(TILE)`, including a last partial tile.
fn for_tiles(k: &mut Kb, lo: Value, hi: Value, body: impl FnOnce(&mut Kb, Value)) {
    let span = k.b.ins().isub(hi, lo);
    let span = k.b.ins().iadd_imm_s(span, TILE as i64 - 1);
    let n = k.b.ins().sdiv_imm_s(span, TILE as i64);
    let zero = k.iconst(0);
    k.for_range(zero, n, 1, |k, t| {
        let off = k.b.ins().imul_imm_s(t, TILE as i64);
        let t0 = k.b.ins().iadd(lo, off);
        body(k, t0)
    });
}

/// Zero `R` accumulator rows of `pad4(f)`.
fn zero_acc(k: &mut Kb, acc: Value, f: usize) {
    let z = k.vconst(0.0);
    for i in 0..R * pad4(f) / 4 {
        store(k, z, acc, (16 * i) as i32);
    }
}

/// Write accumulator row `r` to row `row` of problem `b` of a
/// `[batch, n, f]` output, when `row < n`; divided by `div` (the softmax
/// denominator) when given.
#[allow(clippy::too_many_arguments)]
fn write_row(
    k: &mut Kb,
    acc: Value,
    r: usize,
    f: usize,
    out: Value,
    b: Value,
    row: Value,
    n: usize,
    div: Option<Value>,
) {
    let nv = k.iconst(n as i64);
    let ok = k.b.ins().icmp(IntCC::SignedLessThan, row, nv);
    k.if_then(ok, |k| {
        let flat = k.b.ins().imul_imm_s(b, n as i64);
        let flat = k.b.ins().iadd(flat, row);
        let dst = k.addr(out, flat, (f * 4) as i64);
        let src = k.b.ins().iadd_imm_s(acc, (r * pad4(f) * 4) as i64);
        let div_v = div.map(|l| splat(k, l));
        let zero = k.iconst(0);
        let fv = k.iconst(f as i64);
        k.for_vec_tail(
            zero,
            fv,
            |k, i| {
                let a = k.addr(src, i, 4);
                let mut x = k.load_v(a, 0);
                if let Some(lv) = div_v {
                    x = k.b.ins().fdiv(x, lv);
                }
                let d = k.addr(dst, i, 4);
                store(k, x, d, 0);
            },
            |k, i| {
                let a = k.addr(src, i, 4);
                let mut x = k.load_f(a, 0);
                if let Some(l) = div {
                    x = k.b.ins().fdiv(x, l);
                }
                let d = k.addr(dst, i, 4);
                k.store_f(x, d, 0);
            },
        );
    });
}

impl Attn {
    /// Query-side mask: keys `0 ≤ j ≤ i` when causal, else `j < Tk`.
    fn query_mask(&self, k: &mut Kb, rows: &[Value; R]) -> Option<Mask> {
        if !self.causal && self.tk.is_multiple_of(G) {
            return None;
        }
        let zero = k.iconst(0);
        let last = k.iconst(self.tk as i64 - 1);
        Some(Mask {
            lo: [zero; R],
            hi: std::array::from_fn(|r| if self.causal { rows[r] } else { last }),
        })
    }

    /// End of the key range of a query block: causal blocks stop at their
    /// last row, so tiles above the diagonal are skipped.
    fn key_end(&self, k: &mut Kb, r0: Value) -> Value {
        let tk = k.iconst(self.tk as i64);
        if self.causal {
            let e = k.b.ins().iadd_imm_s(r0, R as i64);
            k.b.ins().smin(e, tk)
        } else {
            tk
        }
    }

    /// `[t0, min(t0 + TILE, end))` and its end rounded up to `G`.
    fn tile_bounds(&self, k: &mut Kb, t0: Value, end: Value) -> (Value, Value) {
        let t1 = k.b.ins().iadd_imm_s(t0, TILE as i64);
        let t1 = k.b.ins().smin(t1, end);
        let c1 = k.b.ins().iadd_imm_s(t1, G as i64 - 1);
        let c1 = k.b.ins().band_imm_s(c1, !(G as i64 - 1));
        (t1, c1)
    }

    /// Where a query block's score and `dP` tiles live: rows of the saved
    /// buffers (indexed from column 0), or the stack tiles (indexed from
    /// the tile start). Saved rows are not clamped, so a repeated last row
    /// never transforms the same saved row twice in place.
    fn tiles(&self, k: &mut Kb, cx: &Cx) -> ([Value; R], [Value; R], bool) {
        match cx.p.saved.filter(|_| self.phase != Phase::Forward) {
            Some((ps, ds)) => {
                let own: [Value; R] =
                    std::array::from_fn(|r| k.b.ins().iadd_imm_s(cx.r0, r as i64));
                let (n, tkp) = (saved_rows(self.tq), pad(self.tk));
                let rs = row_addrs(k, ps, cx.b, n, tkp, &own);
                let rd = row_addrs(k, ds, cx.b, n, tkp, &own);
                (rs, rd, true)
            }
            None => {
                let (t1, t2) = (cx.bufs.t1, cx.bufs.t2);
                let a: [Value; R] =
                    std::array::from_fn(|r| k.b.ins().iadd_imm_s(t1, (r * TILE * 4) as i64));
                let c: [Value; R] =
                    std::array::from_fn(|r| k.b.ins().iadd_imm_s(t2, (r * TILE * 4) as i64));
                (a, c, false)
            }
        }
    }

    /// Forward (`y`) or `Stats` (`lse`, `D`): the online softmax over key
    /// tiles.
    fn emit_online(&self, k: &mut Kb, cx: &Cx) {
        let stats = self.phase == Phase::Stats;
        let (p, bufs, b) = (cx.p, cx.bufs, cx.b);
        let rows = clamped_rows(k, cx.r0, self.tq);
        let qrows = row_addrs(k, p.q, b, self.tq, self.d, &rows);
        let kt = k.b.ins().imul_imm_s(b, (self.d * pad(self.tk) * 4) as i64);
        let kt = k.b.ins().iadd(p.kt, kt);
        let grad = stats.then(|| {
            let dyrows = row_addrs(k, p.dy, b, self.tq, self.dv, &rows);
            let vt = k.b.ins().imul_imm_s(b, (self.dv * pad(self.tk) * 4) as i64);
            (dyrows, k.b.ins().iadd(p.vt, vt))
        });
        let vb = k.b.ins().imul_imm_s(b, (self.tk * self.dv * 4) as i64);
        let vb = k.b.ins().iadd(p.v, vb);
        let mask = self.query_mask(k, &rows);
        let ninf = k.fconst(f32::NEG_INFINITY);
        let fz = k.fconst(0.0);
        let m: [_; R] = std::array::from_fn(|_| k.var(F32, ninf));
        let l: [_; R] = std::array::from_fn(|_| k.var(F32, fz));
        let dacc: [_; R] = std::array::from_fn(|_| k.var(F32, fz));
        if !stats {
            zero_acc(k, bufs.a1, self.dv);
        }
        // With saved buffers, `Stats` leaves the scores and `dP` there for
        // `Dq`, so it must not overwrite them with probabilities.
        let (st, dt, from_zero) = self.tiles(k, cx);
        let keep_scores = from_zero;
        let kend = self.key_end(k, cx.r0);
        let zero = k.iconst(0);
        for_tiles(k, zero, kend, |k, t0| {
            let (t1, c1) = self.tile_bounds(k, t0, kend);
            let base = if from_zero { k.iconst(0) } else { t0 };
            let mk = mask.as_ref().map(|m| (m, cx.iota));
            let sc = Some(self.scale);
            let tkp = pad(self.tk);
            score_tile(k, &qrows, self.d, kt, tkp, (t0, c1), &st, base, sc, mk);
            if let Some((dyrows, vt)) = &grad {
                score_tile(
                    k,
                    dyrows,
                    self.dv,
                    *vt,
                    tkp,
                    (t0, c1),
                    &dt,
                    base,
                    None,
                    None,
                );
            }
            let shift = k.b.ins().imul_imm_s(base, 4);
            let st: [Value; R] = std::array::from_fn(|r| k.b.ins().isub(st[r], shift));
            let dt: [Value; R] = std::array::from_fn(|r| k.b.ins().isub(dt[r], shift));
            let (zero, n) = (t0, c1);
            for r in 0..R {
                // Tile max, then the running max and the rescale factor.
                let vn = k.vconst(f32::NEG_INFINITY);
                let vmax = k.var(F32X4, vn);
                k.for_range(zero, n, 4, |k, j| {
                    let a = k.addr(st[r], j, 4);
                    let x = k.load_v(a, 0);
                    let o = k.b.use_var(vmax);
                    let y = k.b.ins().fmax(o, x);
                    k.b.def_var(vmax, y);
                });
                let vm = k.b.use_var(vmax);
                let mt = hmax(k, vm);
                let mo = k.b.use_var(m[r]);
                let mn = k.b.ins().fmax(mo, mt);
                let dm = k.b.ins().fsub(mo, mn);
                let corr = exp1(k, dm);
                k.b.def_var(m[r], mn);
                let mv = splat(k, mn);
                let vz = k.vconst(0.0);
                let vsum = k.var(F32X4, vz);
                let vdot = k.var(F32X4, vz);
                let vninf = k.vconst(f32::NEG_INFINITY);
                k.for_range(zero, n, 4, |k, j| {
                    let a = k.addr(st[r], j, 4);
                    let s = k.load_v(a, 0);
                    let masked = k.vcmp(FloatCC::Equal, s, vninf);
                    let x = k.b.ins().fsub(s, mv);
                    let e = exp_le0(k, x);
                    let e = k.vsel(masked, vz, e);
                    if !keep_scores {
                        store(k, e, a, 0);
                    }
                    let o = k.b.use_var(vsum);
                    let o = k.b.ins().fadd(o, e);
                    k.b.def_var(vsum, o);
                    if stats {
                        let da = k.addr(dt[r], j, 4);
                        let dp = k.load_v(da, 0);
                        let o = k.b.use_var(vdot);
                        let o = k.b.ins().fma(e, dp, o);
                        k.b.def_var(vdot, o);
                    }
                });
                let vs = k.b.use_var(vsum);
                let ts = hsum(k, vs);
                let lo = k.b.use_var(l[r]);
                let ln = k.b.ins().fma(lo, corr, ts);
                k.b.def_var(l[r], ln);
                if stats {
                    let vd = k.b.use_var(vdot);
                    let td = hsum(k, vd);
                    let o = k.b.use_var(dacc[r]);
                    let o = k.b.ins().fma(o, corr, td);
                    k.b.def_var(dacc[r], o);
                } else {
                    let cv = splat(k, corr);
                    let row =
                        k.b.ins()
                            .iadd_imm_s(bufs.a1, (r * pad4(self.dv) * 4) as i64);
                    for i in 0..pad4(self.dv) / 4 {
                        let x = k.load_v(row, (16 * i) as i32);
                        let x = k.b.ins().fmul(x, cv);
                        store(k, x, row, (16 * i) as i32);
                    }
                }
            }
            if !stats {
                let zero = k.iconst(0);
                row_acc(k, &st, 4, zero, vb, self.dv, (t0, t1), bufs.a1);
            }
        });
        for r in 0..R {
            let i = k.b.ins().iadd_imm_s(cx.r0, r as i64);
            let lr = k.b.use_var(l[r]);
            if stats {
                let tqv = k.iconst(self.tq as i64);
                let ok = k.b.ins().icmp(IntCC::SignedLessThan, i, tqv);
                let mr = k.b.use_var(m[r]);
                let dr = k.b.use_var(dacc[r]);
                k.if_then(ok, |k| {
                    let log = ew_scalar(k, &EwOp::Unary(UnaryOp::Log), &[lr]);
                    let lse = k.b.ins().fadd(mr, log);
                    let dd = k.b.ins().fdiv(dr, lr);
                    let flat = k.b.ins().imul_imm_s(b, pad(self.tq) as i64);
                    let flat = k.b.ins().iadd(flat, i);
                    let a = k.addr(p.lse, flat, 4);
                    k.store_f(lse, a, 0);
                    let a = k.addr(p.dd, flat, 4);
                    k.store_f(dd, a, 0);
                });
            } else {
                write_row(k, bufs.a1, r, self.dv, p.out, b, i, self.tq, Some(lr));
            }
        }
    }

    /// `dq` for a query block; `P` and `dS` into the saved buffers or
    /// stack tiles.
    fn emit_dq(&self, k: &mut Kb, cx: &Cx) {
        let (p, bufs, b) = (cx.p, cx.bufs, cx.b);
        let rows = clamped_rows(k, cx.r0, self.tq);
        let qrows = row_addrs(k, p.q, b, self.tq, self.d, &rows);
        let dyrows = row_addrs(k, p.dy, b, self.tq, self.dv, &rows);
        let tkp = pad(self.tk);
        let kt = k.b.ins().imul_imm_s(b, (self.d * tkp * 4) as i64);
        let kt = k.b.ins().iadd(p.kt, kt);
        let vt = k.b.ins().imul_imm_s(b, (self.dv * tkp * 4) as i64);
        let vt = k.b.ins().iadd(p.vt, vt);
        let kb_ = k.b.ins().imul_imm_s(b, (self.tk * self.d * 4) as i64);
        let kb_ = k.b.ins().iadd(p.k, kb_);
        let mask = self.query_mask(k, &rows);
        let stat = |k: &mut Kb, base: Value| -> [Value; R] {
            let flat = k.b.ins().imul_imm_s(b, pad(self.tq) as i64);
            std::array::from_fn(|r| {
                let f = k.b.ins().iadd(flat, rows[r]);
                let a = k.addr(base, f, 4);
                k.load_f(a, 0)
            })
        };
        let lse = stat(k, p.lse);
        let dd = stat(k, p.dd);
        zero_acc(k, bufs.a1, self.d);
        let (pt, dt, from_zero) = self.tiles(k, cx);
        let kend = self.key_end(k, cx.r0);
        let zero = k.iconst(0);
        for_tiles(k, zero, kend, |k, t0| {
            let (t1, c1) = self.tile_bounds(k, t0, kend);
            // Saved buffers already hold the scores and `dP` from `Stats`.
            let base = if from_zero { k.iconst(0) } else { t0 };
            if !from_zero {
                let mk = mask.as_ref().map(|m| (m, cx.iota));
                let sc = Some(self.scale);
                score_tile(k, &qrows, self.d, kt, tkp, (t0, c1), &pt, base, sc, mk);
                score_tile(
                    k,
                    &dyrows,
                    self.dv,
                    vt,
                    tkp,
                    (t0, c1),
                    &dt,
                    base,
                    None,
                    None,
                );
            }
            let sc = k.vconst(self.scale);
            let vninf = k.vconst(f32::NEG_INFINITY);
            let vz = k.vconst(0.0);
            for r in 0..R {
                let lv = splat(k, lse[r]);
                let dv = splat(k, dd[r]);
                let shift = k.b.ins().imul_imm_s(base, 4);
                let prow = k.b.ins().isub(pt[r], shift);
                let drow = k.b.ins().isub(dt[r], shift);
                k.for_range(t0, c1, 4, |k, j| {
                    let pa = k.addr(prow, j, 4);
                    let da = k.addr(drow, j, 4);
                    let s = k.load_v(pa, 0);
                    let dp = k.load_v(da, 0);
                    let masked = k.vcmp(FloatCC::Equal, s, vninf);
                    let x = k.b.ins().fsub(s, lv);
                    let e = exp_le0(k, x);
                    let e = k.vsel(masked, vz, e);
                    let g = k.b.ins().fsub(dp, dv);
                    let g = k.b.ins().fmul(g, e);
                    let g = k.b.ins().fmul(g, sc);
                    let g = k.vsel(masked, vz, g);
                    store(k, e, pa, 0);
                    store(k, g, da, 0);
                });
            }
            row_acc(k, &dt, 4, base, kb_, self.d, (t0, t1), bufs.a1);
        });
        for r in 0..R {
            let i = k.b.ins().iadd_imm_s(cx.r0, r as i64);
            write_row(k, bufs.a1, r, self.d, p.out, b, i, self.tq, None);
        }
    }

    /// `dk` and `dv` for a key block.
    fn emit_dkv(&self, k: &mut Kb, cx: &Cx) {
        let (p, bufs, b) = (cx.p, cx.bufs, cx.b);
        let rows = clamped_rows(k, cx.r0, self.tk);
        let tqp = pad(self.tq);
        let qb = k.b.ins().imul_imm_s(b, (self.tq * self.d * 4) as i64);
        let qb = k.b.ins().iadd(p.q, qb);
        let dyb = k.b.ins().imul_imm_s(b, (self.tq * self.dv * 4) as i64);
        let dyb = k.b.ins().iadd(p.dy, dyb);
        zero_acc(k, bufs.a1, self.d);
        zero_acc(k, bufs.a2, self.dv);
        let tq = k.iconst(self.tq as i64);
        // Causal: queries before the block's first key see none of it.
        let istart = if self.causal {
            k.b.ins().band_imm_s(cx.r0, !(G as i64 - 1))
        } else {
            k.iconst(0)
        };
        match p.saved {
            Some((ps, ds)) => {
                let tkp = pad(self.tk);
                let pb =
                    k.b.ins()
                        .imul_imm_s(b, (saved_rows(self.tq) * tkp * 4) as i64);
                let wp: [Value; R] = std::array::from_fn(|r| {
                    let a = k.b.ins().iadd(ps, pb);
                    k.addr(a, rows[r], 4)
                });
                let wd: [Value; R] = std::array::from_fn(|r| {
                    let a = k.b.ins().iadd(ds, pb);
                    k.addr(a, rows[r], 4)
                });
                let zero = k.iconst(0);
                let ws = (tkp * 4) as i64;
                let i0 = if self.causal { cx.r0 } else { zero };
                row_acc(k, &wp, ws, zero, dyb, self.dv, (i0, tq), bufs.a2);
                row_acc(k, &wd, ws, zero, qb, self.d, (i0, tq), bufs.a1);
            }
            None => {
                let krows = row_addrs(k, p.k, b, self.tk, self.d, &rows);
                let vrows = row_addrs(k, p.v, b, self.tk, self.dv, &rows);
                let qt = k.b.ins().imul_imm_s(b, (self.d * tqp * 4) as i64);
                let qt = k.b.ins().iadd(p.qt, qt);
                let dyt = k.b.ins().imul_imm_s(b, (self.dv * tqp * 4) as i64);
                let dyt = k.b.ins().iadd(p.dyt, dyt);
                let sb = k.b.ins().imul_imm_s(b, (tqp * 4) as i64);
                let lse = k.b.ins().iadd(p.lse, sb);
                let ddb = k.b.ins().iadd(p.dd, sb);
                let zero = k.iconst(0);
                let last = k.iconst(self.tq as i64 - 1);
                let mask = Mask {
                    lo: std::array::from_fn(|r| if self.causal { rows[r] } else { zero }),
                    hi: [last; R],
                };
                let use_mask = self.causal || !self.tq.is_multiple_of(G);
                let pt: [Value; R] =
                    std::array::from_fn(|r| k.b.ins().iadd_imm_s(bufs.t1, (r * TILE * 4) as i64));
                let dt: [Value; R] =
                    std::array::from_fn(|r| k.b.ins().iadd_imm_s(bufs.t2, (r * TILE * 4) as i64));
                for_tiles(k, istart, tq, |k, t0| {
                    let (t1, c1) = self.tile_bounds(k, t0, tq);
                    let mk = use_mask.then_some((&mask, cx.iota));
                    score_tile(
                        k,
                        &krows,
                        self.d,
                        qt,
                        tqp,
                        (t0, c1),
                        &pt,
                        t0,
                        Some(self.scale),
                        mk,
                    );
                    score_tile(k, &vrows, self.dv, dyt, tqp, (t0, c1), &dt, t0, None, None);
                    let sc = k.vconst(self.scale);
                    let vninf = k.vconst(f32::NEG_INFINITY);
                    let vz = k.vconst(0.0);
                    let n = k.b.ins().isub(c1, t0);
                    let zero = k.iconst(0);
                    k.for_range(zero, n, 4, |k, j| {
                        let col = k.b.ins().iadd(t0, j);
                        let la = k.addr(lse, col, 4);
                        let lv = k.load_v(la, 0);
                        let da = k.addr(ddb, col, 4);
                        let dv = k.load_v(da, 0);
                        for r in 0..R {
                            let pa = k.addr(pt[r], j, 4);
                            let ga = k.addr(dt[r], j, 4);
                            let s = k.load_v(pa, 0);
                            let dp = k.load_v(ga, 0);
                            let masked = k.vcmp(FloatCC::Equal, s, vninf);
                            let x = k.b.ins().fsub(s, lv);
                            let e = exp_le0(k, x);
                            let e = k.vsel(masked, vz, e);
                            let g = k.b.ins().fsub(dp, dv);
                            let g = k.b.ins().fmul(g, e);
                            let g = k.b.ins().fmul(g, sc);
                            let g = k.vsel(masked, vz, g);
                            store(k, e, pa, 0);
                            store(k, g, ga, 0);
                        }
                    });
                    row_acc(k, &pt, 4, t0, dyb, self.dv, (t0, t1), bufs.a2);
                    row_acc(k, &dt, 4, t0, qb, self.d, (t0, t1), bufs.a1);
                });
            }
        }
        for r in 0..R {
            let j = k.b.ins().iadd_imm_s(cx.r0, r as i64);
            write_row(k, bufs.a1, r, self.d, p.out, b, j, self.tk, None);
            write_row(k, bufs.a2, r, self.dv, p.out2, b, j, self.tk, None);
        }
    }
}

/// `dst [batch, f, T']` = the transpose of `src [batch, T, f]`, zero
/// padded past `T`.
fn transposed(bd: &mut Build, src: Loc, batch: usize, t: usize, f: usize) -> Loc {
    let tp = pad(t);
    let dst = bd.alloc(batch * f * tp);
    if tp != t {
        bd.fill(dst, batch * f * tp, 0.0);
    }
    bd.copy(
        vec![batch, f, t],
        View {
            loc: src,
            off: 0,
            strides: vec![(t * f) as i64, 1, f as i64],
        },
        View {
            loc: dst,
            off: 0,
            strides: vec![(f * tp) as i64, tp as i64, 1],
        },
    );
    dst
}

fn base_step(s: Dims, phase: Phase, causal: bool, scale: f32, ops: [Loc; 4]) -> Attn {
    let [q, k, v, dy] = ops;
    Attn {
        phase,
        batch: s.batch,
        tq: s.tq,
        tk: s.tk,
        d: s.d,
        dv: s.dv,
        causal,
        scale,
        q,
        k,
        v,
        dy,
        kt: q,
        vt: q,
        qt: q,
        dyt: q,
        lse: q,
        dd: q,
        saved: None,
        out: q,
        out2: q,
    }
}

/// `attention`: `(q, k, v) -> y`.
pub fn lower_forward(
    ins: &[(Loc, &TensorType)],
    outs: &[(Loc, &TensorType)],
    causal: bool,
    scale: f32,
    scratch: usize,
) -> Option<Lowered> {
    let s = Dims::of(ins)?;
    let (q, k, v) = (ins[0].0, ins[1].0, ins[2].0);
    let y = outs.first()?.0;
    let mut bd = Build::new(scratch);
    let kt = transposed(&mut bd, k, s.batch, s.tk, s.d);
    let mut a = base_step(s, Phase::Forward, causal, scale, [q, k, v, q]);
    a.kt = kt;
    a.out = y;
    bd.steps.push(Step::Attention(a));
    Some(bd.finish())
}

/// `attention_grad`: `(q, k, v, dy) -> (dq, dk, dv)`.
pub fn lower_grad(
    ins: &[(Loc, &TensorType)],
    outs: &[(Loc, &TensorType)],
    causal: bool,
    scale: f32,
    scratch: usize,
) -> Option<Lowered> {
    let s = Dims::of(ins)?;
    let (q, k, v, dy) = (ins[0].0, ins[1].0, ins[2].0, ins.get(3)?.0);
    let (dq, dk, dv) = (outs.first()?.0, outs.get(1)?.0, outs.get(2)?.0);
    let mut bd = Build::new(scratch);
    let mut a = base_step(s, Phase::Stats, causal, scale, [q, k, v, dy]);
    a.kt = transposed(&mut bd, k, s.batch, s.tk, s.d);
    a.vt = transposed(&mut bd, v, s.batch, s.tk, s.dv);
    a.lse = bd.alloc(s.batch * pad(s.tq));
    a.dd = bd.alloc(s.batch * pad(s.tq));
    if saves_probabilities(s.batch, s.tq, s.tk) {
        let n = s.batch * saved_rows(s.tq) * pad(s.tk);
        a.saved = Some((bd.alloc(n), bd.alloc(n)));
    } else {
        a.qt = transposed(&mut bd, q, s.batch, s.tq, s.d);
        a.dyt = transposed(&mut bd, dy, s.batch, s.tq, s.dv);
    }
    bd.steps.push(Step::Attention(a.clone()));
    bd.steps.push(Step::Attention(Attn {
        phase: Phase::Dq,
        out: dq,
        ..a.clone()
    }));
    bd.steps.push(Step::Attention(Attn {
        phase: Phase::Dkv,
        out: dk,
        out2: dv,
        ..a
    }));
    Some(bd.finish())
}
