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

use super::emit::{flags, ro_flags, step_order, Kb, Loc};
use super::kernel::{Step, View};
use super::lower::Lowered;
use super::rnn::Build;
use crate::ir::TensorType;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64};
use cranelift_codegen::ir::{
    InstBuilder, MemFlagsData, StackSlot, StackSlotData, StackSlotKind, Value,
};

/// Key (or query) steps per iteration of the `P·V`-style loops.
const ROW_UNROLL: i64 = 4;

/// Largest feature count whose score loop is fully unrolled.
const UNROLL_MAX: usize = 64;

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
        let fr = R * self.d.max(self.dv) * 4;
        let tile = R * TILE * 4;
        let bufs = Bufs([tile, tile, fa, fa, 2 * R * 16, fr, fr].map(|n| {
            kb.b.create_sized_stack_slot(StackSlotData::new(
                StackSlotKind::ExplicitSlot,
                n as u32,
                4,
            ))
        }));
        let iota = kb.lane_indices();
        let tab = consts_base(kb);
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
                tab,
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

/// Stack buffers: two `R × TILE` tiles, two `R × f` accumulators,
/// `2R` per-row splats (read as folded operands in the exp loops), and
/// two `R × f` copies of a last block's rows ([`unit_rows`]).
#[derive(Clone, Copy)]
enum Buf {
    T1,
    T2,
    A1,
    A2,
    Sp,
    Ra,
    Rb,
}

struct Bufs([StackSlot; 7]);

impl Bufs {
    /// The address of `buf`, formed where it is used: an address made
    /// once per kernel would be one more long-lived integer register, and
    /// the register-blocked loops need theirs.
    fn at(&self, k: &mut Kb, buf: Buf) -> Value {
        k.b.ins().stack_addr(I64, self.0[buf as usize], 0)
    }

    /// A stack tile's first row and its row stride in bytes.
    fn tile(&self, k: &mut Kb, buf: Buf) -> (Value, usize) {
        (self.at(k, buf), TILE * 4)
    }
}

/// The current unit: problem `b`, first row `r0`.
struct Cx<'a> {
    p: &'a Ptrs,
    bufs: &'a Bufs,
    iota: Value,
    /// The address of [`CONSTS`].
    tab: Value,
    b: Value,
    r0: Value,
}

/// Valid columns per row: `lo(r) ≤ c ≤ hi(r)`.
struct Mask {
    lo: Bound,
    hi: Bound,
}

/// One side of a [`Mask`], formed where it is tested (from `r0`, which is
/// live anyway) rather than held as four long-lived row indices.
#[derive(Clone, Copy)]
enum Bound {
    /// The same column for every row.
    Fixed(i64),
    /// The diagonal: row `r`'s own index `min(r0 + r, last)`.
    Diagonal { r0: Value, last: i64 },
}

impl Bound {
    fn at(self, k: &mut Kb, r: usize) -> Value {
        match self {
            Bound::Fixed(c) => k.iconst(c),
            Bound::Diagonal { r0, last } => {
                let i = k.b.ins().iadd_imm_s(r0, r as i64);
                let last = k.iconst(last);
                k.b.ins().smin(i, last)
            }
        }
    }
}

fn splat(k: &mut Kb, x: Value) -> Value {
    k.b.ins().splat(F32X4, x)
}

fn store(k: &mut Kb, v: Value, a: Value, off: i32) {
    k.b.ins().store(flags(), v, a, off);
}

/// Splatted constants of [`exp2_n`], 16-byte aligned: read by loads that
/// fold into the instructions using them, so the interleaved chains keep
/// every register.
#[repr(align(16))]
struct Consts([[u32; 4]; 11]);

const fn splat4(x: f32) -> [u32; 4] {
    let b = x.to_bits();
    [b; 4]
}

const K_LO: usize = 0;
const K_MAGIC: usize = 1;
/// Taylor coefficients of `2^f = e^(f ln 2)`, highest degree (7) first:
/// `ln2^k / k!`. On `|f| ≤ ½` the truncation error is 5e-9, so rounding
/// (about 1e-7 relative) dominates.
const K_POLY: usize = 2;
const K_BIAS: usize = 10;

static CONSTS: Consts = Consts([
    splat4(-127.0),
    splat4(12_582_912.0),
    splat4(1.525_273_4e-5),
    splat4(1.540_353e-4),
    splat4(1.333_355_8e-3),
    splat4(9.618_129e-3),
    splat4(5.550_411e-2),
    splat4(0.240_226_5),
    splat4(std::f32::consts::LN_2),
    splat4(1.0),
    [127; 4],
]);

/// Where kernels find [`CONSTS`]: loaded once per kernel, since an address
/// immediate would be rematerialised (a 10-byte `movabs`) at every use.
static CONSTS_AT: &[[u32; 4]; 11] = &CONSTS.0;

/// The address of [`CONSTS`].
fn consts_base(k: &mut Kb) -> Value {
    let at = k.iconst(&CONSTS_AT as *const &[[u32; 4]; 11] as i64);
    k.b.ins().load(I64, ro_flags(), at, 0)
}

fn tconst(k: &mut Kb, tab: Value, i: usize, ty: cranelift_codegen::ir::Type) -> Value {
    let fl = MemFlagsData::trusted().with_readonly().with_aligned();
    k.b.ins().load(ty, fl, tab, (16 * i) as i32)
}

/// `2^x` for lanes `x ≤ 0` (softmax exponents in log2 units: scores are
/// scaled by `log2 e`), each operation emitted for every vector of `xs`
/// before the next, so the independent chains interleave (attention steps
/// are compiled without the optimiser, which would undo that).
///
/// `x` is clamped to −127, where `n = −127` makes the power-of-two factor's
/// bits exactly 0: masked (`−∞`) lanes and results below 2^−126.5 become
/// exactly 0. NaN stays NaN (the clamp keeps it). `n` comes from the
/// round-to-nearest magic-number add: the low bits of `j = x + 1.5·2²³`
/// are `n`, and `(bits(j) + 127) << 23` shifts out the magic's own bits,
/// leaving the exponent field of `2^n`.
fn exp2_n(k: &mut Kb, tab: Value, xs: &[Value]) -> Vec<Value> {
    let xc: Vec<Value> = xs
        .iter()
        .map(|&x| {
            let lo = tconst(k, tab, K_LO, F32X4);
            let below = k.vcmp(FloatCC::LessThan, x, lo);
            k.vsel(below, lo, x)
        })
        .collect();
    let j: Vec<Value> = xc
        .iter()
        .map(|&x| {
            let m = tconst(k, tab, K_MAGIC, F32X4);
            k.b.ins().fadd(x, m)
        })
        .collect();
    let f: Vec<Value> = (0..xs.len())
        .map(|i| {
            let m = tconst(k, tab, K_MAGIC, F32X4);
            let n = k.b.ins().fsub(j[i], m);
            k.b.ins().fsub(xc[i], n)
        })
        .collect();
    let mut p: Vec<Value> = f
        .iter()
        .map(|&f| {
            let c7 = tconst(k, tab, K_POLY, F32X4);
            let c6 = tconst(k, tab, K_POLY + 1, F32X4);
            k.b.ins().fma(f, c7, c6)
        })
        .collect();
    for c in K_POLY + 2..K_POLY + 8 {
        for i in 0..xs.len() {
            let cv = tconst(k, tab, c, F32X4);
            p[i] = k.b.ins().fma(p[i], f[i], cv);
        }
    }
    (0..xs.len())
        .map(|i| {
            let jb = k.b.ins().bitcast(I32X4, MemFlagsData::new(), j[i]);
            let bias = tconst(k, tab, K_BIAS, I32X4);
            let e = k.b.ins().iadd(jb, bias);
            let e = k.b.ins().ishl_imm_u(e, 23);
            let s = k.b.ins().bitcast(F32X4, MemFlagsData::new(), e);
            k.b.ins().fmul(p[i], s)
        })
        .collect()
}

/// Lane `r` of `v` in every lane.
fn bcast_lane(k: &mut Kb, v: Value, r: usize) -> Value {
    let l = r as u8;
    k.shuffle32(v, v, [l; 4])
}

/// `[op-reduce v[0], …, op-reduce v[3]]`: the four horizontal reductions
/// at once, as a 4×4 transpose interleaved with `op` (lane `i` is reduced
/// as `(x0 ∘ x2) ∘ (x1 ∘ x3)`, the same order for every row).
fn reduce4(k: &mut Kb, v: [Value; R], op: impl Fn(&mut Kb, Value, Value) -> Value) -> Value {
    let a = k.shuffle32(v[0], v[1], [0, 4, 1, 5]);
    let b = k.shuffle32(v[0], v[1], [2, 6, 3, 7]);
    let u = op(k, a, b);
    let a = k.shuffle32(v[2], v[3], [0, 4, 1, 5]);
    let b = k.shuffle32(v[2], v[3], [2, 6, 3, 7]);
    let w = op(k, a, b);
    let a = k.shuffle32(u, w, [0, 1, 4, 5]);
    let b = k.shuffle32(u, w, [2, 3, 6, 7]);
    op(k, a, b)
}

/// `max(a, b)` lane-wise as one `maxps` (a NaN in `b` is dropped; scores
/// are NaN only for NaN inputs, which make every result NaN anyway).
fn vmax(k: &mut Kb, a: Value, b: Value) -> Value {
    let lt = k.vcmp(FloatCC::LessThan, a, b);
    k.vsel(lt, b, a)
}

fn vadd(k: &mut Kb, a: Value, b: Value) -> Value {
    k.b.ins().fadd(a, b)
}

/// `bcast(v, r)` to `buf + 16 (first + r)` for each row `r`: per-row
/// operands the exp loops read from memory (folded into the instruction)
/// instead of holding four registers.
fn store_splats(k: &mut Kb, v: Value, buf: Value, first: usize) {
    for r in 0..R {
        let x = bcast_lane(k, v, r);
        store(k, x, buf, (16 * (first + r)) as i32);
    }
}

/// A just-stored exp result, read back: with its store as the result's
/// only use, Cranelift's lowering can fold the polynomial's constant loads
/// (a value used twice makes everything it is computed from "used
/// several times", and such loads are not folded).
fn reload(k: &mut Kb, a: Value, off: i32) -> Value {
    k.load_v(a, off)
}

/// Lane `r`: the max of row `r` over columns `[c0, c1)` (a multiple of 4
/// apart), the rows' chains side by side. `rows` is the first row's
/// address and the bytes between rows (one base register for the loop).
fn rows_max(k: &mut Kb, (rows, row_bytes): (Value, usize), (c0, c1): (Value, Value)) -> Value {
    let ninf = k.vconst(f32::NEG_INFINITY);
    let vars: [_; R] = std::array::from_fn(|_| k.var(F32X4, ninf));
    k.for_range(c0, c1, 4, |k, j| {
        let a = k.addr(rows, j, 4);
        for (r, &var) in vars.iter().enumerate() {
            let x = k.load_v(a, (r * row_bytes) as i32);
            let o = k.b.use_var(var);
            let y = vmax(k, o, x);
            k.b.def_var(var, y);
        }
    });
    let v = std::array::from_fn(|r| k.b.use_var(vars[r]));
    reduce4(k, v, vmax)
}

/// `e = 2^(s − m_r)` over columns `[c0, c1)` (a multiple of `G` apart) of
/// each row's scores (`m_r` splatted in `sp` at `16r`), stored in place of
/// the scores; returns lane-per-row `Σ e` and, given the `dP` rows,
/// `Σ e·dP`. Two rows and two vectors each make four interleaved chains.
/// Rows are given as in [`rows_max`].
fn exp_pass(
    k: &mut Kb,
    tab: Value,
    (st, st_row): (Value, usize),
    dt: Option<(Value, usize)>,
    (bufs, sp): (&Bufs, Buf),
    (c0, c1): (Value, Value),
) -> (Value, Option<Value>) {
    let z = k.vconst(0.0);
    let sums: [_; R] = std::array::from_fn(|_| k.var(F32X4, z));
    let dots: [_; R] = std::array::from_fn(|_| k.var(F32X4, z));
    for pair in 0..R / 2 {
        k.for_range(c0, c1, G as i64, |k, j| {
            let sj = k.addr(st, j, 4);
            let dj = dt.map(|(d, row)| (k.addr(d, j, 4), row));
            let msp = bufs.at(k, sp);
            // (row, byte offset of the vector within the row)
            let at: Vec<(usize, usize)> =
                (0..4).map(|c| (2 * pair + c / 2, 16 * (c % 2))).collect();
            let s_off = |r: usize, h: usize| (r * st_row + h) as i32;
            let xs: Vec<Value> = at
                .iter()
                .map(|&(r, h)| {
                    let s = k.load_v(sj, s_off(r, h));
                    let mv = k.load_v(msp, (16 * r) as i32);
                    k.b.ins().fsub(s, mv)
                })
                .collect();
            let es = exp2_n(k, tab, &xs);
            for (&(r, h), e) in at.iter().zip(&es) {
                store(k, *e, sj, s_off(r, h));
            }
            for &(r, h) in &at {
                let e = reload(k, sj, s_off(r, h));
                let o = k.b.use_var(sums[r]);
                let o = k.b.ins().fadd(o, e);
                k.b.def_var(sums[r], o);
                if let Some((da, row)) = dj {
                    let dp = k.load_v(da, (r * row + h) as i32);
                    let o = k.b.use_var(dots[r]);
                    let o = k.b.ins().fma(e, dp, o);
                    k.b.def_var(dots[r], o);
                }
            }
        });
    }
    let s = std::array::from_fn(|r| k.b.use_var(sums[r]));
    let s = reduce4(k, s, vadd);
    let d = dt.map(|_| {
        let d = std::array::from_fn(|r| k.b.use_var(dots[r]));
        reduce4(k, d, vadd)
    });
    (s, d)
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

/// The unit's `R` rows (from `r0`) of problem `b` of a `[batch, n, f]`
/// tensor, as one address with rows `f` floats apart, so the register
/// blocked loops reach every row from one base register instead of
/// holding (and spilling) one pointer per row. A block running past `n`
/// gets a copy in `buf` (`R · f` floats) repeating the last row, which
/// keeps every load in bounds; its extra rows are never stored.
fn unit_rows(
    k: &mut Kb,
    base: Value,
    b: Value,
    n: usize,
    f: usize,
    r0: Value,
    (bufs, buf): (&Bufs, Buf),
) -> Value {
    let pb = k.b.ins().imul_imm_s(b, (n * f * 4) as i64);
    let pb = k.b.ins().iadd(base, pb);
    let first = k.addr(pb, r0, (f * 4) as i64);
    if n.is_multiple_of(R) {
        return first;
    }
    let end = k.b.ins().iadd_imm_s(r0, R as i64);
    let nv = k.iconst(n as i64);
    let partial = k.b.ins().icmp(IntCC::SignedGreaterThan, end, nv);
    k.if_then(partial, |k| {
        let rows = clamped_rows(k, r0, n);
        let buf = bufs.at(k, buf);
        let zero = k.iconst(0);
        let fv = k.iconst(f as i64);
        for (r, row) in rows.into_iter().enumerate() {
            let src = k.addr(pb, row, (f * 4) as i64);
            let dst = k.b.ins().iadd_imm_s(buf, (r * f * 4) as i64);
            k.for_range(zero, fv, 1, |k, i| {
                let s = k.addr(src, i, 4);
                let x = k.load_f(s, 0);
                let d = k.addr(dst, i, 4);
                k.store_f(x, d, 0);
            });
        }
    });
    let copy = bufs.at(k, buf);
    k.b.ins().select(partial, copy, first)
}

/// `R` row addresses `row_bytes` apart from `first`.
fn row_ptrs(k: &mut Kb, first: Value, row_bytes: usize) -> [Value; R] {
    std::array::from_fn(|r| k.b.ins().iadd_imm_s(first, (r * row_bytes) as i64))
}

/// One reduction step of a register block: `acc[r][h] += x_r · bv[h]`
/// with one broadcast per row shared by the row's products (`x_r` a
/// scalar load at `rows + r · row_bytes + off`). Cranelift's FMA form
/// overwrites a multiplicand, so the row's first products take a register
/// copy of the broadcast (renamed, not executed) and each result lands in
/// the register its broadcast or copy held: the step moves every
/// accumulator into the register the previous one freed. A `reverse` step
/// visits rows and columns backwards and moves them back, so a loop of
/// step pairs needs no moves on its back edge (see
/// `matmul::micro_kernel`; attention steps are compiled without the
/// optimiser, which keeps this order). `first` starts the sums with a
/// product instead.
#[allow(clippy::too_many_arguments)]
fn block_step(
    k: &mut Kb,
    bv: &[Value],
    (rows, row_bytes, off): (Value, i64, i64),
    acc: &mut [Vec<Value>],
    reverse: bool,
    first: bool,
) {
    let order = step_order(acc.len(), reverse);
    let cols = step_order(bv.len(), reverse);
    for r in order {
        let x =
            k.b.ins()
                .load(F32, ro_flags(), rows, (r as i64 * row_bytes + off) as i32);
        let x = splat(k, x);
        for &h in &cols {
            acc[r][h] = if first {
                k.b.ins().fmul(x, bv[h])
            } else {
                k.b.ins().fma(x, bv[h], acc[r][h])
            };
        }
    }
}

/// `out[r][c − col_base] = Σ_f a[r][f] · bt[f][c]` (times `scale`), for
/// `c` in `[c0, c1)` stepping by `G`; masked columns get `−∞`. `a` is the
/// first of `R` rows `a_row` bytes apart, `bt` rows are `bt_row` floats
/// apart, `out` the first of `R` rows `out_row` bytes apart.
#[allow(clippy::too_many_arguments)]
fn score_tile(
    k: &mut Kb,
    (a, a_row): (Value, usize),
    f: usize,
    bt: Value,
    bt_row: usize,
    (c0, c1): (Value, Value),
    (out, out_row): (Value, usize),
    col_base: Value,
    scale: Option<f32>,
    mask: Option<(&Mask, Value)>,
) {
    let shift = k.b.ins().imul_imm_s(col_base, 4);
    let out = k.b.ins().isub(out, shift);
    let row_bytes = (bt_row * 4) as i64;
    let a_row = a_row as i64;
    let load_b = |k: &mut Kb, ptr: Value, boff: i64| -> Vec<Value> {
        (0..G / 4)
            .map(|h| {
                k.b.ins()
                    .load(F32X4, ro_flags(), ptr, (boff + 16 * h as i64) as i32)
            })
            .collect()
    };
    // The loop's pointers are its own short-lived values: the kernels'
    // long-lived integers outnumber the registers, and a spilled pointer
    // is reloaded at every use (four times per feature).
    let bt0 = k.addr(bt, c0, 4);
    let out0 = k.addr(out, c0, 4);
    let (bp_col, op_col) = (k.var(I64, bt0), k.var(I64, out0));
    k.for_range(c0, c1, G as i64, |k, c| {
        let btc = k.b.use_var(bp_col);
        let at = k.b.use_var(op_col);
        let next = k.b.ins().iadd_imm_s(btc, 4 * G as i64);
        k.b.def_var(bp_col, next);
        let next = k.b.ins().iadd_imm_s(at, 4 * G as i64);
        k.b.def_var(op_col, next);
        // An opaque copy (`a & !0`): used directly, `a` would stay a
        // spilled long-lived value.
        let a = k.b.ins().band_imm_s(a, -1);
        let z = k.vconst(0.0);
        let mut acc: Vec<Vec<Value>> = vec![vec![z; G / 4]; R];
        if f <= UNROLL_MAX {
            // Straight-line code: even and odd features alternate
            // direction, so the accumulators rotate in place.
            for fi in 0..f {
                let bv = load_b(k, btc, fi as i64 * row_bytes);
                let at = (a, a_row, 4 * fi as i64);
                block_step(k, &bv, at, &mut acc, fi % 2 == 1, fi == 0);
            }
        } else {
            let vars: Vec<Vec<_>> = (0..R)
                .map(|_| (0..G / 4).map(|_| k.var(F32X4, z)).collect())
                .collect();
            // From `c`, not the column pointer: a value of its own, which
            // regalloc does not tie to the (spilled) column pointer.
            let bt_first = k.addr(bt, c, 4);
            let bp = k.var(I64, bt_first);
            let ap = k.var(I64, a);
            let zero = k.iconst(0);
            let fv = k.iconst(f as i64);
            // Two features per iteration, the second in reverse.
            let pair = |k: &mut Kb, n: usize| {
                let ptr = k.b.use_var(bp);
                let aptr = k.b.use_var(ap);
                let mut cur = k.use_vars(&vars);
                for u in 0..n {
                    let bv = load_b(k, ptr, u as i64 * row_bytes);
                    block_step(k, &bv, (aptr, a_row, 4 * u as i64), &mut cur, u == 1, false);
                }
                k.def_vars(&vars, &cur);
                let next = k.b.ins().iadd_imm_s(ptr, n as i64 * row_bytes);
                k.b.def_var(bp, next);
                let next = k.b.ins().iadd_imm_s(aptr, 4 * n as i64);
                k.b.def_var(ap, next);
            };
            k.for_blocks(zero, fv, 2, |k, _| pair(k, 2));
            if f % 2 == 1 {
                pair(k, 1);
            }
            acc = k.use_vars(&vars);
        }
        if let Some(s) = scale {
            let sv = k.vconst(s);
            for row in acc.iter_mut() {
                for x in row.iter_mut() {
                    *x = k.b.ins().fmul(*x, sv);
                }
            }
        }
        let oat = |r: usize, h: usize| (r * out_row + 16 * h) as i32;
        let plain = |k: &mut Kb| {
            for (r, row) in acc.iter().enumerate() {
                for (h, &x) in row.iter().enumerate() {
                    store(k, x, at, oat(r, h));
                }
            }
        };
        match mask {
            None => plain(k),
            Some((m, iota)) => {
                // Only blocks that cross a boundary pay for the mask.
                let lo_max = m.lo.at(k, R - 1);
                let hi_min = m.hi.at(k, 0);
                let below = k.b.ins().icmp(IntCC::SignedLessThan, c, lo_max);
                let cend = k.b.ins().iadd_imm_s(c, G as i64 - 1);
                let above = k.b.ins().icmp(IntCC::SignedGreaterThan, cend, hi_min);
                let needs = k.b.ins().bor(below, above);
                k.if_else(
                    needs,
                    |k| {
                        let cv = k.splat_i32(c);
                        let c0v = k.b.ins().iadd(cv, iota);
                        let four = k.b.ins().iconst(I32, 4);
                        let four = k.b.ins().splat(I32X4, four);
                        let c1v = k.b.ins().iadd(c0v, four);
                        let ninf = k.vconst(f32::NEG_INFINITY);
                        for (r, row) in acc.iter().enumerate() {
                            let lo = m.lo.at(k, r);
                            let lo = k.splat_i32(lo);
                            let hi = m.hi.at(k, r);
                            let hi = k.splat_i32(hi);
                            for (h, col) in [c0v, c1v].into_iter().enumerate() {
                                let a = k.b.ins().icmp(IntCC::SignedLessThan, col, lo);
                                let bb = k.b.ins().icmp(IntCC::SignedGreaterThan, col, hi);
                                let bad = k.b.ins().bor(a, bb);
                                let bad = k.b.ins().bitcast(F32X4, MemFlagsData::new(), bad);
                                let x = k.b.ins().bitselect(bad, ninf, row[h]);
                                store(k, x, at, oat(r, h));
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
/// weight of row `r`, column `j` is at `w + r · w_row + (j − col_base) ·
/// wstride` bytes, `m` is row-major `[·, f]` and `acc` is `R` rows of
/// `pad4(f)`.
#[allow(clippy::too_many_arguments)]
fn row_acc(
    k: &mut Kb,
    (w, w_row): (Value, usize),
    wstride: i64,
    col_base: Value,
    m: Value,
    f: usize,
    (j0, j1): (Value, Value),
    acc: Value,
) {
    let skip = k.b.ins().isub(j0, col_base);
    let w0 = k.addr(w, skip, wstride);
    let m0 = k.addr(m, j0, (f * 4) as i64);
    let w_row = w_row as i64;
    let arow = (pad4(f) * 4) as i32;
    // `width` columns of every row, `coff` bytes past column 0 of `acc`
    // and `m0` (which the looped chunks advance instead).
    let chunk = |k: &mut Kb, acc: Value, m0: Value, coff: i32, width: usize| {
        let vector = width >= 4;
        let lanes = if vector { width / 4 } else { width };
        let at = |r: usize, h: usize| {
            r as i32 * arow + coff + if vector { 16 * h as i32 } else { 4 * h as i32 }
        };
        let mut vars = Vec::new();
        for r in 0..R {
            let row: Vec<_> = (0..lanes)
                .map(|h| {
                    let (ty, x) = if vector {
                        (F32X4, k.load_v(acc, at(r, h)))
                    } else {
                        (F32, k.load_f(acc, at(r, h)))
                    };
                    k.var(ty, x)
                })
                .collect();
            vars.push(row);
        }
        // Pointers advanced per iteration keep the loop at two integer
        // registers besides its counter.
        let wp = k.var(I64, w0);
        let mp = k.var(I64, m0);
        let steps = |k: &mut Kb, ju: i64| {
            let wrow = k.b.use_var(wp);
            let mrow = k.b.use_var(mp);
            let mut cur = k.use_vars(&vars);
            for u in 0..ju {
                let moff = coff as i64 + u * (f * 4) as i64;
                let woff = u * wstride;
                if vector {
                    let mv: Vec<Value> = (0..lanes)
                        .map(|h| k.load_v(mrow, (moff + 16 * h as i64) as i32))
                        .collect();
                    block_step(k, &mv, (wrow, w_row, woff), &mut cur, u % 2 == 1, false);
                } else {
                    let mv: Vec<Value> = (0..lanes)
                        .map(|h| k.load_f(mrow, (moff + 4 * h as i64) as i32))
                        .collect();
                    for (r, row) in cur.iter_mut().enumerate() {
                        let x = k.load_f(wrow, (r as i64 * w_row + woff) as i32);
                        for (c, &mh) in row.iter_mut().zip(&mv) {
                            *c = k.b.ins().fma(x, mh, *c);
                        }
                    }
                }
            }
            k.def_vars(&vars, &cur);
            let next = k.b.ins().iadd_imm_s(wrow, ju * wstride);
            k.b.def_var(wp, next);
            let next = k.b.ins().iadd_imm_s(mrow, ju * (f * 4) as i64);
            k.b.def_var(mp, next);
        };
        // An even unroll: the reversed steps bring the accumulators back.
        let from = k.for_blocks(j0, j1, ROW_UNROLL, |k, _| steps(k, ROW_UNROLL));
        k.for_range(from, j1, 1, |k, _| steps(k, 1));
        for (r, row) in vars.iter().enumerate() {
            for (h, &v) in row.iter().enumerate() {
                let x = k.b.use_var(v);
                if vector {
                    store(k, x, acc, at(r, h));
                } else {
                    k.store_f(x, acc, at(r, h));
                }
            }
        }
    };
    // Wide rows loop over their 8-column chunks, so that the code does not
    // grow with the feature count (a 4096-wide head made 140 000
    // instructions); up to `UNROLL_MAX` columns each chunk is emitted.
    let mut ch = 0;
    if f > UNROLL_MAX {
        let full = k.iconst((f / 8) as i64);
        let zero = k.iconst(0);
        k.for_range(zero, full, 1, |k, c| {
            let a = k.addr(acc, c, 32);
            let m = k.addr(m0, c, 32);
            chunk(k, a, m, 0, 8);
        });
        ch = f / 8 * 8;
    }
    while ch < f {
        let width = match f - ch {
            n if n >= 8 => 8,
            n if n >= 4 => 4,
            n => n,
        };
        chunk(k, acc, m0, (ch * 4) as i32, width);
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
    each_vector(k, acc, R * pad4(f) / 4, |k, at, off| store(k, z, at, off));
}

/// `body(k, base', off)` for each of `count` consecutive f32x4 at `base`
/// (the vector at `base' + off`): emitted one by one up to `UNROLL_MAX`
/// floats, else as a loop, so that the code does not grow with the
/// feature count.
fn each_vector(k: &mut Kb, base: Value, count: usize, mut body: impl FnMut(&mut Kb, Value, i32)) {
    if 4 * count <= UNROLL_MAX {
        for i in 0..count {
            body(k, base, (16 * i) as i32);
        }
    } else {
        k.for_const(0, count, |k, i| {
            let at = k.addr(base, i, 16);
            body(k, at, 0)
        });
    }
}

/// Write accumulator row `r` to row `row` of problem `b` of a
/// `[batch, n, f]` output, when `row < n`; times `mul` (the reciprocal of
/// the softmax denominator) when given.
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
    mul: Option<Value>,
) {
    let nv = k.iconst(n as i64);
    let ok = k.b.ins().icmp(IntCC::SignedLessThan, row, nv);
    k.if_then(ok, |k| {
        let flat = k.b.ins().imul_imm_s(b, n as i64);
        let flat = k.b.ins().iadd(flat, row);
        let dst = k.addr(out, flat, (f * 4) as i64);
        let src = k.b.ins().iadd_imm_s(acc, (r * pad4(f) * 4) as i64);
        let mul_v = mul.map(|l| splat(k, l));
        let zero = k.iconst(0);
        let fv = k.iconst(f as i64);
        k.for_vec_tail(
            zero,
            fv,
            |k, i| {
                let a = k.addr(src, i, 4);
                let mut x = k.load_v(a, 0);
                if let Some(lv) = mul_v {
                    x = k.b.ins().fmul(x, lv);
                }
                let d = k.addr(dst, i, 4);
                store(k, x, d, 0);
            },
            |k, i| {
                let a = k.addr(src, i, 4);
                let mut x = k.load_f(a, 0);
                if let Some(l) = mul {
                    x = k.b.ins().fmul(x, l);
                }
                let d = k.addr(dst, i, 4);
                k.store_f(x, d, 0);
            },
        );
    });
}

impl Attn {
    /// Query-side mask: keys `0 ≤ j ≤ i` when causal, else `j < Tk`.
    fn query_mask(&self, r0: Value) -> Option<Mask> {
        if !self.causal && self.tk.is_multiple_of(G) {
            return None;
        }
        let hi = if self.causal {
            Bound::Diagonal {
                r0,
                last: self.tq as i64 - 1,
            }
        } else {
            Bound::Fixed(self.tk as i64 - 1)
        };
        Some(Mask {
            lo: Bound::Fixed(0),
            hi,
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

    /// The unit's two `R × TILE` stack tiles.
    fn stack_tiles(&self, k: &mut Kb, cx: &Cx) -> ([Value; R], [Value; R]) {
        let t1 = cx.bufs.at(k, Buf::T1);
        let t2 = cx.bufs.at(k, Buf::T2);
        let a = std::array::from_fn(|r| k.b.ins().iadd_imm_s(t1, (r * TILE * 4) as i64));
        let c = std::array::from_fn(|r| k.b.ins().iadd_imm_s(t2, (r * TILE * 4) as i64));
        (a, c)
    }

    /// Forward (`y`) or `Stats` (`lse`, `D`, when the backward recomputes):
    /// the online softmax over key tiles, the unit's four rows side by side
    /// (lane `r` of `m`, `l`, `dacc` belongs to row `r`). Scores are in
    /// log2 units.
    fn emit_online(&self, k: &mut Kb, cx: &Cx) {
        let stats = self.phase == Phase::Stats;
        let (p, bufs, b, tab) = (cx.p, cx.bufs, cx.b, cx.tab);
        let qrows = unit_rows(k, p.q, b, self.tq, self.d, cx.r0, (bufs, Buf::Ra));
        let kt = k.b.ins().imul_imm_s(b, (self.d * pad(self.tk) * 4) as i64);
        let kt = k.b.ins().iadd(p.kt, kt);
        let grad = stats.then(|| {
            let dyrows = unit_rows(k, p.dy, b, self.tq, self.dv, cx.r0, (bufs, Buf::Rb));
            let vt = k.b.ins().imul_imm_s(b, (self.dv * pad(self.tk) * 4) as i64);
            (dyrows, k.b.ins().iadd(p.vt, vt))
        });
        let vb = k.b.ins().imul_imm_s(b, (self.tk * self.dv * 4) as i64);
        let vb = k.b.ins().iadd(p.v, vb);
        let mask = self.query_mask(cx.r0);
        let ninf = k.vconst(f32::NEG_INFINITY);
        let vz = k.vconst(0.0);
        let m = k.var(F32X4, ninf);
        let l = k.var(F32X4, vz);
        let dacc = k.var(F32X4, vz);
        if !stats {
            let a1_at = bufs.at(k, Buf::A1);
            zero_acc(k, a1_at, self.dv);
        }
        let kend = self.key_end(k, cx.r0);
        let zero = k.iconst(0);
        for_tiles(k, zero, kend, |k, t0| {
            let (t1, c1) = self.tile_bounds(k, t0, kend);
            let mk = mask.as_ref().map(|m| (m, cx.iota));
            let sc = Some(self.scale * std::f32::consts::LOG2_E);
            let tkp = pad(self.tk);
            let qa = (qrows, self.d * 4);
            let tile0 = bufs.tile(k, Buf::T1);
            score_tile(k, qa, self.d, kt, tkp, (t0, c1), tile0, t0, sc, mk);
            if let Some((dyrows, vt)) = grad {
                let dya = (dyrows, self.dv * 4);
                let tile1 = bufs.tile(k, Buf::T2);
                score_tile(k, dya, self.dv, vt, tkp, (t0, c1), tile1, t0, None, None);
            }
            let shift = k.b.ins().imul_imm_s(t0, 4);
            let tile = |k: &mut Kb, buf: Buf| {
                let (t, row) = bufs.tile(k, buf);
                (k.b.ins().isub(t, shift), row)
            };
            let sts = tile(k, Buf::T1);
            // Every row has a valid column in every tile it visits (key 0,
            // or the tile start ≤ its own index), so `mn` is finite and the
            // first tile's `corr` is 2^−∞ = 0.
            let mt = rows_max(k, sts, (t0, c1));
            let mo = k.b.use_var(m);
            let mn = vmax(k, mo, mt);
            k.b.def_var(m, mn);
            let dm = k.b.ins().fsub(mo, mn);
            let corr = exp2_n(k, tab, &[dm])[0];
            let sp_at = bufs.at(k, Buf::Sp);
            store_splats(k, mn, sp_at, 0);
            let dts = stats.then(|| tile(k, Buf::T2));
            let (ts, td) = exp_pass(k, tab, sts, dts, (bufs, Buf::Sp), (t0, c1));
            let lo = k.b.use_var(l);
            let ln = k.b.ins().fma(lo, corr, ts);
            k.b.def_var(l, ln);
            if let Some(td) = td {
                let o = k.b.use_var(dacc);
                let o = k.b.ins().fma(o, corr, td);
                k.b.def_var(dacc, o);
            } else {
                let a1_at = bufs.at(k, Buf::A1);
                for r in 0..R {
                    let cv = bcast_lane(k, corr, r);
                    let row = k.b.ins().iadd_imm_s(a1_at, (r * pad4(self.dv) * 4) as i64);
                    each_vector(k, row, pad4(self.dv) / 4, |k, at, off| {
                        let x = k.load_v(at, off);
                        let x = k.b.ins().fmul(x, cv);
                        store(k, x, at, off);
                    });
                }
                let a1_at = bufs.at(k, Buf::A1);
                let tile0 = bufs.tile(k, Buf::T1);
                row_acc(k, tile0, 4, t0, vb, self.dv, (t0, t1), a1_at);
            }
        });
        let lv = k.b.use_var(l);
        if stats {
            // lse = m + log2 l, D = Σ e·dP / l.
            let mv = k.b.use_var(m);
            let log = k.vlog(lv);
            let log2e = k.vconst(std::f32::consts::LOG2_E);
            let lse = k.b.ins().fma(log, log2e, mv);
            let dv = k.b.use_var(dacc);
            let dd = k.b.ins().fdiv(dv, lv);
            let flat = k.b.ins().imul_imm_s(b, pad(self.tq) as i64);
            let tqv = k.iconst(self.tq as i64);
            for r in 0..R {
                let i = k.b.ins().iadd_imm_s(cx.r0, r as i64);
                let ok = k.b.ins().icmp(IntCC::SignedLessThan, i, tqv);
                k.if_then(ok, |k| {
                    let f = k.b.ins().iadd(flat, i);
                    let a = k.addr(p.lse, f, 4);
                    let x = k.b.ins().extractlane(lse, r as u8);
                    k.store_f(x, a, 0);
                    let a = k.addr(p.dd, f, 4);
                    let x = k.b.ins().extractlane(dd, r as u8);
                    k.store_f(x, a, 0);
                });
            }
        } else {
            let one = k.vconst(1.0);
            let inv = k.b.ins().fdiv(one, lv);
            for r in 0..R {
                let i = k.b.ins().iadd_imm_s(cx.r0, r as i64);
                let lr = k.b.ins().extractlane(inv, r as u8);
                let a1_at = bufs.at(k, Buf::A1);
                write_row(k, a1_at, r, self.dv, p.out, b, i, self.tq, Some(lr));
            }
        }
    }

    /// `dq` for a query block. With saved buffers this is the whole row
    /// pass: scores and `dP` for every key into the block's own saved
    /// rows, the row max, `e = 2^(s − m)` with `l = Σ e` and `Σ e·dP`, then
    /// `P = e / l` and `dS` in place. Otherwise `P` and `dS` are recomputed
    /// per tile from `lse` and `D`.
    fn emit_dq(&self, k: &mut Kb, cx: &Cx) {
        let (p, bufs, b, tab) = (cx.p, cx.bufs, cx.b, cx.tab);
        let qrows = (
            unit_rows(k, p.q, b, self.tq, self.d, cx.r0, (bufs, Buf::Ra)),
            self.d * 4,
        );
        let dyrows = (
            unit_rows(k, p.dy, b, self.tq, self.dv, cx.r0, (bufs, Buf::Rb)),
            self.dv * 4,
        );
        let tkp = pad(self.tk);
        let kt = k.b.ins().imul_imm_s(b, (self.d * tkp * 4) as i64);
        let kt = k.b.ins().iadd(p.kt, kt);
        let vt = k.b.ins().imul_imm_s(b, (self.dv * tkp * 4) as i64);
        let vt = k.b.ins().iadd(p.vt, vt);
        let kb_ = k.b.ins().imul_imm_s(b, (self.tk * self.d * 4) as i64);
        let kb_ = k.b.ins().iadd(p.k, kb_);
        let mask = self.query_mask(cx.r0);
        let sc2 = Some(self.scale * std::f32::consts::LOG2_E);
        let a1_at = bufs.at(k, Buf::A1);
        zero_acc(k, a1_at, self.d);
        let kend = self.key_end(k, cx.r0);
        let zero = k.iconst(0);
        if let Some((ps, ds)) = p.saved {
            // Saved rows are not clamped, so a repeated last row never
            // transforms the same saved row twice.
            let n = saved_rows(self.tq);
            let own = |k: &mut Kb, base: Value| {
                let pb = k.b.ins().imul_imm_s(b, (n * tkp * 4) as i64);
                let pb = k.b.ins().iadd(base, pb);
                (k.addr(pb, cx.r0, (tkp * 4) as i64), tkp * 4)
            };
            let (pown, down) = (own(k, ps), own(k, ds));

            let cend = k.b.ins().iadd_imm_s(kend, G as i64 - 1);
            let cend = k.b.ins().band_imm_s(cend, !(G as i64 - 1));
            let mk = mask.as_ref().map(|m| (m, cx.iota));
            score_tile(k, qrows, self.d, kt, tkp, (zero, cend), pown, zero, sc2, mk);
            let cols = (zero, cend);
            score_tile(k, dyrows, self.dv, vt, tkp, cols, down, zero, None, None);
            let mt = rows_max(k, pown, (zero, cend));
            let sp_at = bufs.at(k, Buf::Sp);
            store_splats(k, mt, sp_at, 0);
            let (ts, td) = exp_pass(k, tab, pown, Some(down), (bufs, Buf::Sp), (zero, cend));
            let pt = row_ptrs(k, pown.0, pown.1);
            let dt = row_ptrs(k, down.0, down.1);
            let one = k.vconst(1.0);
            let inv = k.b.ins().fdiv(one, ts);
            let td = td.unwrap_or(ts);
            let dd = k.b.ins().fmul(td, inv);
            let sp_at = bufs.at(k, Buf::Sp);
            store_splats(k, inv, sp_at, 0);
            let sp_at = bufs.at(k, Buf::Sp);
            store_splats(k, dd, sp_at, R);
            let sc = k.vconst(self.scale);
            for r in 0..R {
                k.for_range(zero, cend, 4, |k, j| {
                    let pa = k.addr(pt[r], j, 4);
                    let da = k.addr(dt[r], j, 4);
                    let e = k.load_v(pa, 0);
                    let sp_at = bufs.at(k, Buf::Sp);
                    let iv = k.load_v(sp_at, (16 * r) as i32);
                    let pv = k.b.ins().fmul(e, iv);
                    let dp = k.load_v(da, 0);
                    let sp_at = bufs.at(k, Buf::Sp);
                    let dr = k.load_v(sp_at, (16 * (R + r)) as i32);
                    let g = k.b.ins().fsub(dp, dr);
                    let g = k.b.ins().fmul(g, pv);
                    let g = k.b.ins().fmul(g, sc);
                    store(k, pv, pa, 0);
                    store(k, g, da, 0);
                });
            }
            let a1_at = bufs.at(k, Buf::A1);
            row_acc(k, down, 4, zero, kb_, self.d, (zero, kend), a1_at);
        } else {
            let rows = clamped_rows(k, cx.r0, self.tq);
            let stat = |k: &mut Kb, base: Value| -> Value {
                let flat = k.b.ins().imul_imm_s(b, pad(self.tq) as i64);
                let mut v = k.vconst(0.0);
                for (r, row) in rows.iter().enumerate() {
                    let f = k.b.ins().iadd(flat, *row);
                    let a = k.addr(base, f, 4);
                    let x = k.load_f(a, 0);
                    v = k.b.ins().insertlane(v, x, r as u8);
                }
                v
            };
            let lse = stat(k, p.lse);
            let dd = stat(k, p.dd);
            let sp_at = bufs.at(k, Buf::Sp);
            store_splats(k, lse, sp_at, 0);
            let sp_at = bufs.at(k, Buf::Sp);
            store_splats(k, dd, sp_at, R);
            for_tiles(k, zero, kend, |k, t0| {
                let (t1, c1) = self.tile_bounds(k, t0, kend);
                let mk = mask.as_ref().map(|m| (m, cx.iota));
                let tile0 = bufs.tile(k, Buf::T1);
                score_tile(k, qrows, self.d, kt, tkp, (t0, c1), tile0, t0, sc2, mk);
                let tile1 = bufs.tile(k, Buf::T2);
                score_tile(k, dyrows, self.dv, vt, tkp, (t0, c1), tile1, t0, None, None);
                let (pt, dt) = self.stack_tiles(k, cx);
                let shift = k.b.ins().imul_imm_s(t0, 4);
                let pts: [Value; R] = std::array::from_fn(|r| k.b.ins().isub(pt[r], shift));
                let dts: [Value; R] = std::array::from_fn(|r| k.b.ins().isub(dt[r], shift));
                let sc = self.scale;
                for pair in 0..R / 2 {
                    k.for_range(t0, c1, G as i64, |k, j| {
                        let at: Vec<(usize, Value, Value, i32)> = (0..4)
                            .map(|c| {
                                let r = 2 * pair + c / 2;
                                let pa = k.addr(pts[r], j, 4);
                                let da = k.addr(dts[r], j, 4);
                                (r, pa, da, (16 * (c % 2)) as i32)
                            })
                            .collect();
                        let xs: Vec<Value> = at
                            .iter()
                            .map(|&(r, pa, _, off)| {
                                let s = k.load_v(pa, off);
                                let sp_at = bufs.at(k, Buf::Sp);
                                let lv = k.load_v(sp_at, (16 * r) as i32);
                                k.b.ins().fsub(s, lv)
                            })
                            .collect();
                        let es = exp2_n(k, tab, &xs);
                        for (&(_, pa, _, off), e) in at.iter().zip(&es) {
                            store(k, *e, pa, off);
                        }
                        for &(r, pa, da, off) in &at {
                            let e = reload(k, pa, off);
                            let dp = k.load_v(da, off);
                            let sp_at = bufs.at(k, Buf::Sp);
                            let dr = k.load_v(sp_at, (16 * (R + r)) as i32);
                            let g = k.b.ins().fsub(dp, dr);
                            let g = k.b.ins().fmul(g, e);
                            let scv = k.vconst(sc);
                            let g = k.b.ins().fmul(g, scv);
                            store(k, g, da, off);
                        }
                    });
                }
                let a1_at = bufs.at(k, Buf::A1);
                let tile1 = bufs.tile(k, Buf::T2);
                row_acc(k, tile1, 4, t0, kb_, self.d, (t0, t1), a1_at);
            });
        }
        for r in 0..R {
            let i = k.b.ins().iadd_imm_s(cx.r0, r as i64);
            let a1_at = bufs.at(k, Buf::A1);
            write_row(k, a1_at, r, self.d, p.out, b, i, self.tq, None);
        }
    }

    /// `dk` and `dv` for a key block.
    fn emit_dkv(&self, k: &mut Kb, cx: &Cx) {
        let (p, bufs, b) = (cx.p, cx.bufs, cx.b);
        let tqp = pad(self.tq);
        let qb = k.b.ins().imul_imm_s(b, (self.tq * self.d * 4) as i64);
        let qb = k.b.ins().iadd(p.q, qb);
        let dyb = k.b.ins().imul_imm_s(b, (self.tq * self.dv * 4) as i64);
        let dyb = k.b.ins().iadd(p.dy, dyb);
        let a1_at = bufs.at(k, Buf::A1);
        zero_acc(k, a1_at, self.d);
        let a2_at = bufs.at(k, Buf::A2);
        zero_acc(k, a2_at, self.dv);
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
                // The block's key columns, unclamped: they stay below
                // `Tk'`, and past `Tk` the saved `P` and `dS` are 0 (masked
                // scores) and feed rows that are never stored.
                let col = |k: &mut Kb, base: Value| {
                    let a = k.b.ins().iadd(base, pb);
                    (k.addr(a, cx.r0, 4), 4)
                };
                let (wp, wd) = (col(k, ps), col(k, ds));
                let zero = k.iconst(0);
                let ws = (tkp * 4) as i64;
                let i0 = if self.causal { cx.r0 } else { zero };
                let a2_at = bufs.at(k, Buf::A2);
                row_acc(k, wp, ws, zero, dyb, self.dv, (i0, tq), a2_at);
                let a1_at = bufs.at(k, Buf::A1);
                row_acc(k, wd, ws, zero, qb, self.d, (i0, tq), a1_at);
            }
            None => {
                let krows = (
                    unit_rows(k, p.k, b, self.tk, self.d, cx.r0, (bufs, Buf::Ra)),
                    self.d * 4,
                );
                let vrows = (
                    unit_rows(k, p.v, b, self.tk, self.dv, cx.r0, (bufs, Buf::Rb)),
                    self.dv * 4,
                );
                let qt = k.b.ins().imul_imm_s(b, (self.d * tqp * 4) as i64);
                let qt = k.b.ins().iadd(p.qt, qt);
                let dyt = k.b.ins().imul_imm_s(b, (self.dv * tqp * 4) as i64);
                let dyt = k.b.ins().iadd(p.dyt, dyt);
                let sb = k.b.ins().imul_imm_s(b, (tqp * 4) as i64);
                let lse = k.b.ins().iadd(p.lse, sb);
                let ddb = k.b.ins().iadd(p.dd, sb);
                let lo = if self.causal {
                    Bound::Diagonal {
                        r0: cx.r0,
                        last: self.tk as i64 - 1,
                    }
                } else {
                    Bound::Fixed(0)
                };
                let mask = Mask {
                    lo,
                    hi: Bound::Fixed(self.tq as i64 - 1),
                };
                let use_mask = self.causal || !self.tq.is_multiple_of(G);
                for_tiles(k, istart, tq, |k, t0| {
                    let (t1, c1) = self.tile_bounds(k, t0, tq);
                    let mk = use_mask.then_some((&mask, cx.iota));
                    let tile0 = bufs.tile(k, Buf::T1);
                    score_tile(
                        k,
                        krows,
                        self.d,
                        qt,
                        tqp,
                        (t0, c1),
                        tile0,
                        t0,
                        Some(self.scale * std::f32::consts::LOG2_E),
                        mk,
                    );
                    let tile1 = bufs.tile(k, Buf::T2);
                    score_tile(k, vrows, self.dv, dyt, tqp, (t0, c1), tile1, t0, None, None);
                    let (pt, dt) = self.stack_tiles(k, cx);
                    let n = k.b.ins().isub(c1, t0);
                    let zero = k.iconst(0);
                    // Masked scores are −∞, so `e` and with it `dS` are 0.
                    k.for_range(zero, n, 4, |k, j| {
                        let col = k.b.ins().iadd(t0, j);
                        let la = k.addr(lse, col, 4);
                        let lv = k.load_v(la, 0);
                        let pa: [Value; R] = std::array::from_fn(|r| k.addr(pt[r], j, 4));
                        let xs: Vec<Value> = pa
                            .iter()
                            .map(|&a| {
                                let s = k.load_v(a, 0);
                                k.b.ins().fsub(s, lv)
                            })
                            .collect();
                        let es = exp2_n(k, cx.tab, &xs);
                        for (r, e) in es.into_iter().enumerate() {
                            store(k, e, pa[r], 0);
                        }
                        let da = k.addr(ddb, col, 4);
                        let dv = k.load_v(da, 0);
                        for r in 0..R {
                            let e = reload(k, pa[r], 0);
                            let ga = k.addr(dt[r], j, 4);
                            let dp = k.load_v(ga, 0);
                            let g = k.b.ins().fsub(dp, dv);
                            let g = k.b.ins().fmul(g, e);
                            let sc = k.vconst(self.scale);
                            let g = k.b.ins().fmul(g, sc);
                            store(k, g, ga, 0);
                        }
                    });
                    let a2_at = bufs.at(k, Buf::A2);
                    let tile0 = bufs.tile(k, Buf::T1);
                    row_acc(k, tile0, 4, t0, dyb, self.dv, (t0, t1), a2_at);
                    let a1_at = bufs.at(k, Buf::A1);
                    let tile1 = bufs.tile(k, Buf::T2);
                    row_acc(k, tile1, 4, t0, qb, self.d, (t0, t1), a1_at);
                });
            }
        }
        for r in 0..R {
            let j = k.b.ins().iadd_imm_s(cx.r0, r as i64);
            let a1_at = bufs.at(k, Buf::A1);
            write_row(k, a1_at, r, self.d, p.out, b, j, self.tk, None);
            let a2_at = bufs.at(k, Buf::A2);
            write_row(k, a2_at, r, self.dv, p.out2, b, j, self.tk, None);
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
    if saves_probabilities(s.batch, s.tq, s.tk) {
        // `Dq` forms whole rows, so it needs no statistics beforehand.
        let n = s.batch * saved_rows(s.tq) * pad(s.tk);
        a.saved = Some((bd.alloc(n), bd.alloc(n)));
    } else {
        a.lse = bd.alloc(s.batch * pad(s.tq));
        a.dd = bd.alloc(s.batch * pad(s.tq));
        a.qt = transposed(&mut bd, q, s.batch, s.tq, s.d);
        a.dyt = transposed(&mut bd, dy, s.batch, s.tq, s.dv);
        bd.steps.push(Step::Attention(a.clone()));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// [`exp2_n`]'s arithmetic, lane by lane, on the table's constants
    /// (`mul_add` is the fused multiply-add the kernel emits).
    fn exp2_model(x: f32) -> f32 {
        let c = |i: usize| f32::from_bits(CONSTS.0[i][0]);
        let xc = if x < c(K_LO) { c(K_LO) } else { x };
        let j = xc + c(K_MAGIC);
        let f = xc - (j - c(K_MAGIC));
        let mut p = f.mul_add(c(K_POLY), c(K_POLY + 1));
        for i in K_POLY + 2..K_POLY + 8 {
            p = p.mul_add(f, c(i));
        }
        let bits = j.to_bits().wrapping_add(CONSTS.0[K_BIAS][0]) << 23;
        p * f32::from_bits(bits)
    }

    #[test]
    fn exp2_is_accurate_on_the_softmax_range() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -126.0 * i as f32 / 200_000.0;
            let want = 2f64.powf(x as f64);
            let got = exp2_model(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp2_model(0.0), 1.0);
        assert_eq!(exp2_model(-1.0), 0.5);
    }

    #[test]
    fn exp2_of_masked_scores_is_exactly_zero() {
        assert_eq!(exp2_model(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp2_model(-127.0), 0.0);
        assert_eq!(exp2_model(-1e30), 0.0);
        assert!(exp2_model(f32::NAN).is_nan());
        // The smallest exponent still represented: 2^-126.
        assert_eq!(exp2_model(-126.0), f32::MIN_POSITIVE);
    }

    #[test]
    fn small_problems_save_probabilities() {
        // The transformer's 32 heads of 64 × 64 keep P; a 256-long
        // sequence or a huge batch recomputes it.
        assert!(saves_probabilities(32, 64, 64));
        assert!(!saves_probabilities(1, 256, 256));
        assert!(!saves_probabilities(1024, 64, 64));
    }
}
