//! LSTM and GRU over whole sequences (LANGUAGE.md §6) and their BPTT
//! gradients.
//!
//! The time loop is one step function ([`RnnSeq`]): per time step, each
//! block of four hidden columns runs its matmul `[h_{t-1}, x_t] @ [w_h;
//! w_x]` (weights packed once per run by [`RnnPack`]; the input
//! projection is part of it) with the bias and the gate math fused into
//! its epilogue; threads split the batch rows. The recurrent operand is
//! read from a compact double-buffered copy of the state; in the forward
//! steps, a unit's rows of it and of `x_t` are packed once per phase with
//! every element stored as the f32x4 the FMAs take. The gradients
//! recompute the forward pass keeping
//! every step's activations, run the reverse loop the same way into
//! `dz [N, T, gates·H]`, and then form `dx`, `dw_x`, `dw_h` and `db` as one
//! matmul (or reduction) each over all steps. Nothing allocates: every
//! intermediate sits in the kernel's scratch region.

use super::emit::{flags, ro_flags, step_order, Kb, Loc};
use super::kernel::{Copy, Fill, MatmulPhase, Step, View};
use super::lower::{align64, Lowered};
use super::matmul::{Matmul, MmOperand};
use super::reduce::Reduce;
use crate::ir::{ReduceOp, TensorType};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{InstBuilder, StackSlot, StackSlotData, StackSlotKind, Value};
use cranelift_frontend::Variable;

/// Steps of one node under construction, with a bump allocator over the
/// node's scratch region.
pub(crate) struct Build {
    pub steps: Vec<Step>,
    base: usize,
    used: usize,
    /// Whether the model runs on several threads (see `Matmul::split`).
    pub split: bool,
}

impl Build {
    pub fn new(scratch: usize) -> Build {
        Build {
            steps: Vec::new(),
            base: scratch,
            used: 0,
            split: false,
        }
    }

    /// A scratch buffer of `floats` f32s, 64-byte aligned.
    pub fn alloc(&mut self, floats: usize) -> Loc {
        self.alloc_bytes(floats * 4)
    }

    pub fn alloc_bytes(&mut self, bytes: usize) -> Loc {
        let l = Loc::Arena(self.base + self.used);
        self.used += align64(bytes.max(4));
        l
    }

    pub fn finish(self) -> Lowered {
        Lowered {
            steps: self.steps,
            scratch_bytes: self.used,
        }
    }

    pub fn copy(&mut self, dims: Vec<usize>, src: View, dst: View) {
        if dims.iter().product::<usize>() == 0 {
            return;
        }
        self.steps.push(Step::Copy(Copy { dims, src, dst }));
    }

    pub fn fill(&mut self, dst: Loc, n: usize, value: f32) {
        if n == 0 {
            return;
        }
        self.steps.push(Step::Fill(Fill {
            dst,
            off: 0,
            n,
            bits: value.to_bits(),
        }));
    }

    /// Pack `b` once for a matmul run later (possibly many times) with
    /// different A operands shaped like `a_like` by [`Build::run_packed`].
    pub fn prepack(
        &mut self,
        batch: Vec<usize>,
        (m, k, n): (usize, usize, usize),
        a_like: MmOperand,
        b: MmOperand,
    ) -> Matmul {
        let mut mm = Matmul {
            batch,
            m,
            k,
            n,
            a: a_like,
            b,
            c: Loc::Arena(0),
            c_off: 0,
            pack_a: Loc::Arena(0),
            pack_b: Loc::Arena(0),
            split: self.split,
            epilogue: None,
        };
        mm.pack_a = self.alloc_bytes(mm.pack_a_bytes());
        mm.pack_b = self.alloc_bytes(mm.pack_b_bytes());
        self.steps
            .push(Step::Matmul(mm.clone(), MatmulPhase::PackB));
        mm
    }

    /// `c = a @ (the B packed by `prepack`)`.
    pub fn run_packed(&mut self, mm: &Matmul, a: MmOperand, c: Loc) {
        let mut x = mm.clone();
        x.a = a;
        x.c = c;
        self.steps.push(Step::Matmul(x.clone(), MatmulPhase::PackA));
        self.steps.push(Step::Matmul(x, MatmulPhase::Compute));
    }

    /// `c = a @ b` (all dims non-zero).
    pub fn matmul(
        &mut self,
        batch: Vec<usize>,
        mkn: (usize, usize, usize),
        a: MmOperand,
        b: MmOperand,
        c: Loc,
    ) {
        let mm = self.prepack(batch, mkn, a.clone(), b);
        self.run_packed(&mm, a, c);
    }

    /// `dst[kept] = Σ src` over `red` (strides in elements).
    pub fn reduce_sum(&mut self, src: Loc, dst: Loc, kept: (usize, i64), red: (usize, i64)) {
        self.steps.push(Step::Reduce(Reduce {
            op: ReduceOp::Sum,
            src,
            dst,
            kept_dims: vec![kept.0],
            kept_strides: vec![kept.1],
            red_dims: vec![red.0],
            red_strides: vec![red.1],
        }));
    }
}

/// A contiguous `[rows, cols]` matrix.
pub(crate) fn mat(loc: Loc, cols: usize) -> View {
    View {
        loc,
        off: 0,
        strides: vec![cols as i64, 1],
    }
}

/// A matmul operand over a row-major `[rows, cols]` matrix at `off`;
/// `transposed` reads it as `[cols, rows]`.
pub(crate) fn operand(loc: Loc, off: usize, cols: usize, transposed: bool) -> MmOperand {
    let (rs, cs) = if transposed {
        (1, cols as i64)
    } else {
        (cols as i64, 1)
    };
    MmOperand {
        loc,
        off,
        batch_strides: vec![],
        rs,
        cs,
    }
}

/// A `[N, slots, width]` buffer holding one `[N, width]` matrix per time
/// step; step `t` lives in slot `t % slots` (with one slot, every step
/// overwrites the previous one in place).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Seq {
    pub loc: Loc,
    pub slots: usize,
    pub width: usize,
}

impl Seq {
    fn new(b: &mut Build, n: usize, slots: usize, width: usize) -> Seq {
        Seq {
            loc: b.alloc(n * slots * width),
            slots,
            width,
        }
    }
}

/// Sizes of a recurrent op: `x [n, t, f]`, hidden size `h`, `gates` blocks.
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    t: usize,
    f: usize,
    h: usize,
    gates: usize,
}

impl Dims {
    fn of(ins: &[(Loc, &TensorType)], gates: usize) -> Option<Dims> {
        let (x, wh) = (&ins.first()?.1.shape, &ins.get(2)?.1.shape);
        if x.len() != 3 || wh.len() != 2 {
            return None;
        }
        let d = Dims {
            n: x[0],
            t: x[1],
            f: x[2],
            h: wh[0],
            gates,
        };
        // Empty tensors are left to the interpreter.
        (d.n * d.t * d.f * d.h > 0).then_some(d)
    }
    fn g(&self) -> usize {
        self.gates * self.h
    }
}

/// The operands' places: x, w_x, w_h, b.
struct Weights {
    x: Loc,
    wx: Loc,
    wh: Loc,
    b: Loc,
}

/// `[w_h; w_x] [H + F, G]` packed for the forward step: per block of four
/// hidden columns, per row `k`, the four columns of every gate. The step
/// multiplies `[h_{t-1}, x_t]` by it, so the input projection is part of
/// the recurrent matmul (no `x @ w_x` pass over all steps to write and
/// read back).
fn pack_forward(bd: &mut Build, d: Dims, w: &Weights) -> Loc {
    let part = |src: Loc, k: usize, k0: usize| RnnPack {
        src,
        k,
        k0,
        kt: d.h + d.f,
        v: d.gates,
        vs: d.h,
        h: d.h,
        rs: d.g() as i64,
        cs: 1,
        dst: Loc::Arena(0),
    };
    let mut ph = part(w.wh, d.h, 0);
    let mut px = part(w.wx, d.f, d.h);
    let dst = bd.alloc_bytes(ph.bytes());
    ph.dst = dst;
    px.dst = dst;
    bd.steps.push(Step::RnnPack(ph));
    bd.steps.push(Step::RnnPack(px));
    dst
}

/// `w_hᵀ [G, H]` packed for the backward step: per block of four hidden
/// columns (rows of `w_h`), per gate column `k`, those four weights.
fn pack_backward(bd: &mut Build, d: Dims, w: &Weights) -> Loc {
    let p = RnnPack {
        src: w.wh,
        k: d.g(),
        k0: 0,
        kt: d.g(),
        v: 1,
        vs: 0,
        h: d.h,
        rs: 1,
        cs: d.g() as i64,
        dst: Loc::Arena(0),
    };
    push_pack(bd, p)
}

fn push_pack(bd: &mut Build, mut p: RnnPack) -> Loc {
    p.dst = bd.alloc_bytes(p.bytes());
    let dst = p.dst;
    bd.steps.push(Step::RnnPack(p));
    dst
}

/// `x [N, T, F]` as a sequence buffer.
fn input_seq(d: Dims, w: &Weights) -> Seq {
    Seq {
        loc: w.x,
        slots: d.t,
        width: d.f,
    }
}

/// The LSTM's saved activations for the gradient: activated gates
/// `(i, f, g, o)`, cell states and their tanh, all steps.
struct LstmSaved {
    act: Seq,
    c: Seq,
    tc: Seq,
}

/// The LSTM forward pass; `hs` receives the hidden states.
fn lstm_forward(bd: &mut Build, d: Dims, w: &Weights, hs: Seq, saved: Option<&LstmSaved>) {
    let wp = pack_forward(bd, d, w);
    let (c, save) = match saved {
        Some(s) => (s.c, Some((s.act, s.tc))),
        // The cell state is updated in place: each unit reads and writes
        // only its own columns.
        None => (Seq::new(bd, d.n, 1, d.h), None),
    };
    let rec = Rec::LstmFwd {
        x: input_seq(d, w),
        b: w.b,
        hs,
        st: Seq::new(bd, d.n, 2, d.h),
        c,
        save,
    };
    bd.steps.push(Step::Rnn(RnnSeq::new(rec, d, wp)));
}

/// The GRU forward pass; `act` (gates `z, r, h~`) and `rh` (`r·h_{t-1}`)
/// keep every step when they have `t` slots.
fn gru_forward(bd: &mut Build, d: Dims, w: &Weights, hs: Seq, act: Seq, rh: Seq) {
    let wp = pack_forward(bd, d, w);
    // `r·h_{t-1}` is the second phase's matmul operand: kept compact
    // next to the per-step copy the gradient needs.
    let rc = if rh.slots == 1 {
        rh
    } else {
        Seq::new(bd, d.n, 1, d.h)
    };
    let rec = Rec::GruFwd {
        x: input_seq(d, w),
        b: w.b,
        hs,
        st: Seq::new(bd, d.n, 2, d.h),
        act,
        rh,
        rc,
    };
    bd.steps.push(Step::Rnn(RnnSeq::new(rec, d, wp)));
}

fn weights(ins: &[(Loc, &TensorType)]) -> Option<Weights> {
    Some(Weights {
        x: ins.first()?.0,
        wx: ins.get(1)?.0,
        wh: ins.get(2)?.0,
        b: ins.get(3)?.0,
    })
}

/// `lstm_seq` / `gru_seq`: `h [N, T, H]` written straight into the output.
pub fn lower_forward(
    lstm: bool,
    ins: &[(Loc, &TensorType)],
    outs: &[(Loc, &TensorType)],
    scratch: usize,
    split: bool,
    save: Option<Loc>,
) -> Option<Lowered> {
    let d = Dims::of(ins, if lstm { 4 } else { 3 })?;
    let w = weights(ins)?;
    let hs = Seq {
        loc: outs.first()?.0,
        slots: d.t,
        width: d.h,
    };
    let mut bd = Build::new(scratch);
    bd.split = split;
    match (lstm, save) {
        (true, None) => lstm_forward(&mut bd, d, &w, hs, None),
        (true, Some(at)) => lstm_forward(&mut bd, d, &w, hs, Some(&LstmSaved::at(d, at))),
        (false, None) => {
            let act = Seq::new(&mut bd, d.n, 1, d.g());
            let rh = Seq::new(&mut bd, d.n, 1, d.h);
            gru_forward(&mut bd, d, &w, hs, act, rh);
        }
        (false, Some(at)) => {
            let (act, rh) = gru_saved_at(d, at);
            gru_forward(&mut bd, d, &w, hs, act, rh);
        }
    }
    Some(bd.finish())
}

/// Bytes of the activations a training step's forward kernel saves for
/// the gradient kernel of the same sequence op (which then need not run
/// the forward again): LSTM gates, cell states and their tanh; GRU gates
/// and `r·h_{t-1}`, every step.
pub fn saved_bytes(lstm: bool, ins: &[(Loc, &TensorType)]) -> Option<usize> {
    let d = Dims::of(ins, if lstm { 4 } else { 3 })?;
    let per_row = if lstm { d.g() + 2 * d.h } else { d.g() + d.h };
    Some(d.n * d.t * per_row * 4)
}

impl LstmSaved {
    /// The saved activations laid out from `at`.
    fn at(d: Dims, at: Loc) -> LstmSaved {
        let (rows, g, h) = (d.n * d.t, d.g(), d.h);
        let seq = |floats: usize, width: usize| Seq {
            loc: offset(at, floats),
            slots: d.t,
            width,
        };
        LstmSaved {
            act: seq(0, g),
            c: seq(rows * g, h),
            tc: seq(rows * (g + h), h),
        }
    }
}

/// The GRU's saved gates and `r·h_{t-1}`, laid out from `at`.
fn gru_saved_at(d: Dims, at: Loc) -> (Seq, Seq) {
    let rows = d.n * d.t;
    let act = Seq {
        loc: at,
        slots: d.t,
        width: d.g(),
    };
    let rh = Seq {
        loc: offset(at, rows * d.g()),
        slots: d.t,
        width: d.h,
    };
    (act, rh)
}

/// `floats` f32s past `at`.
fn offset(at: Loc, floats: usize) -> Loc {
    match at {
        Loc::Arena(o) => Loc::Arena(o + floats * 4),
        // Saved activations live in the arena; an external base has no
        // byte offset to add.
        Loc::Extern(_) => at,
    }
}

/// The gradient's outputs and the steps shared by LSTM and GRU after the
/// reverse loop: `dx = dz w_xᵀ` (where `dx` is wanted), `dw_x = xᵀ dz`,
/// `db = Σ dz`.
fn input_grads(bd: &mut Build, d: Dims, w: &Weights, dz: Seq, dx: Option<Loc>, dwx: Loc, db: Loc) {
    let (rows, g) = (d.n * d.t, d.g());
    if let Some(dx) = dx {
        bd.matmul(
            vec![],
            (rows, g, d.f),
            operand(dz.loc, 0, g, false),
            operand(w.wx, 0, g, true),
            dx,
        );
    }
    bd.matmul(
        vec![],
        (d.f, rows, g),
        operand(w.x, 0, d.f, true),
        operand(dz.loc, 0, g, false),
        dwx,
    );
    bd.reduce_sum(dz.loc, db, (g, 1), (rows, g as i64));
}

/// `[N, T, w]` with step `t` holding step `t − 1` of `s` and step 0
/// holding zeros (`h_{-1} = c_{-1} = 0`).
fn shifted(bd: &mut Build, d: Dims, s: Seq) -> Loc {
    let (n, t, w) = (d.n, d.t, s.width);
    let out = bd.alloc(n * t * w);
    bd.fill(out, n * t * w, 0.0);
    let st = vec![(t * w) as i64, w as i64, 1];
    bd.copy(
        vec![n, t - 1, w],
        View {
            loc: s.loc,
            off: 0,
            strides: st.clone(),
        },
        View {
            loc: out,
            off: w,
            strides: st,
        },
    );
    out
}

/// LSTM BPTT: the forward pass again, keeping every step's activations,
/// then the reverse loop (one fused step per time step) into
/// `dz [N, T, 4H]`, then the weight gradients as one matmul each.
/// `from_forward`: where the step's forward kernel left its hidden states
/// and saved activations; without it, the forward runs again here.
fn lstm_grad(
    bd: &mut Build,
    d: Dims,
    w: &Weights,
    dh_in: Loc,
    outs: [Loc; 4],
    from_forward: Option<(Loc, Loc)>,
    want_dx: bool,
) {
    let (n, h, g, tt) = (d.n, d.h, d.g(), d.t);
    let (hs, saved) = match from_forward {
        Some((hs, at)) => (
            Seq {
                loc: hs,
                slots: tt,
                width: h,
            },
            LstmSaved::at(d, at),
        ),
        None => {
            let hs = Seq::new(bd, n, tt, h);
            let saved = LstmSaved {
                act: Seq::new(bd, n, tt, g),
                c: Seq::new(bd, n, tt, h),
                tc: Seq::new(bd, n, tt, h),
            };
            lstm_forward(bd, d, w, hs, Some(&saved));
            (hs, saved)
        }
    };
    let wt = pack_backward(bd, d, w);
    let dz = Seq::new(bd, n, tt, g);
    let rec = Rec::LstmBwd {
        dh: Seq {
            loc: dh_in,
            slots: tt,
            width: h,
        },
        act: saved.act,
        c: saved.c,
        tc: saved.tc,
        dz,
        dzs: Seq::new(bd, n, 2, g),
        dc: Seq::new(bd, n, 1, h),
    };
    bd.steps.push(Step::Rnn(RnnSeq::new(rec, d, wt)));
    let [dx, dwx, dwh, db] = outs;
    input_grads(bd, d, w, dz, want_dx.then_some(dx), dwx, db);
    let hp = shifted(bd, d, hs);
    bd.matmul(
        vec![],
        (h, n * tt, g),
        operand(hp, 0, h, true),
        operand(dz.loc, 0, g, false),
        dwh,
    );
}

/// GRU BPTT, as the LSTM's with two fused phases per time step.
fn gru_grad(
    bd: &mut Build,
    d: Dims,
    w: &Weights,
    dh_in: Loc,
    outs: [Loc; 4],
    from_forward: Option<(Loc, Loc)>,
    want_dx: bool,
) {
    let (n, h, g, tt) = (d.n, d.h, d.g(), d.t);
    let (hs, act, rh) = match from_forward {
        Some((hs, at)) => {
            let (act, rh) = gru_saved_at(d, at);
            let hs = Seq {
                loc: hs,
                slots: tt,
                width: h,
            };
            (hs, act, rh)
        }
        None => {
            let hs = Seq::new(bd, n, tt, h);
            let act = Seq::new(bd, n, tt, g);
            let rh = Seq::new(bd, n, tt, h);
            gru_forward(bd, d, w, hs, act, rh);
            (hs, act, rh)
        }
    };
    let wt = pack_backward(bd, d, w);
    let dz = Seq::new(bd, n, tt, g);
    let rec = Rec::GruBwd {
        dh: Seq {
            loc: dh_in,
            slots: tt,
            width: h,
        },
        act,
        hs,
        dz,
        dzs: Seq::new(bd, n, 2, g),
        dhs: Seq::new(bd, n, 1, h),
        dhc: Seq::new(bd, n, 1, h),
    };
    bd.steps.push(Step::Rnn(RnnSeq::new(rec, d, wt)));
    let [dx, dwx, dwh, db] = outs;
    input_grads(bd, d, w, dz, want_dx.then_some(dx), dwx, db);
    // dw_h[:, :2H] = hpᵀ dz_{z,r}, dw_h[:, 2H:] = (r·h_{t-1})ᵀ dz_h~, each
    // computed contiguously, then placed in its column block.
    let hp_all = shifted(bd, d, hs);
    let rows = n * tt;
    let w_zr = bd.alloc(h * 2 * h);
    let w_c = bd.alloc(h * h);
    bd.matmul(
        vec![],
        (h, rows, 2 * h),
        operand(hp_all, 0, h, true),
        operand(dz.loc, 0, g, false),
        w_zr,
    );
    bd.matmul(
        vec![],
        (h, rows, h),
        operand(rh.loc, 0, h, true),
        operand(dz.loc, 2 * h, g, false),
        w_c,
    );
    let place = |src: Loc, c0: usize, w: usize| {
        (
            vec![h, w],
            mat(src, w),
            View {
                loc: dwh,
                off: c0,
                strides: vec![g as i64, 1],
            },
        )
    };
    for (dims, s, dst) in [place(w_zr, 0, 2 * h), place(w_c, 2 * h, h)] {
        bd.copy(dims, s, dst);
    }
}

/// `lstm_seq_grad` / `gru_seq_grad`: `(x, w_x, w_h, b, dh) -> (dx, dw_x,
/// dw_h, db)`.
/// The gradient; `from_forward` (the forward's hidden states, the saved
/// activations) when the forward kernel saved them (see [`saved_bytes`]).
pub fn lower_grad(
    lstm: bool,
    ins: &[(Loc, &TensorType)],
    outs: &[(Loc, &TensorType)],
    scratch: usize,
    split: bool,
    from_forward: Option<(Loc, Loc)>,
) -> Option<Lowered> {
    lower_grad_for(lstm, ins, outs, scratch, split, from_forward, true)
}

/// [`lower_grad`], leaving `dx` unwritten unless `want_dx`: nothing reads
/// it where `x` is a model input (every training step), and its matmul is
/// a sixth of the gradient's flops.
pub fn lower_grad_for(
    lstm: bool,
    ins: &[(Loc, &TensorType)],
    outs: &[(Loc, &TensorType)],
    scratch: usize,
    split: bool,
    from_forward: Option<(Loc, Loc)>,
    want_dx: bool,
) -> Option<Lowered> {
    let d = Dims::of(ins, if lstm { 4 } else { 3 })?;
    let w = weights(ins)?;
    let dh = ins.get(4)?.0;
    let o = [
        outs.first()?.0,
        outs.get(1)?.0,
        outs.get(2)?.0,
        outs.get(3)?.0,
    ];
    let mut bd = Build::new(scratch);
    bd.split = split;
    if lstm {
        lstm_grad(&mut bd, d, &w, dh, o, from_forward, want_dx);
    } else {
        gru_grad(&mut bd, d, &w, dh, o, from_forward, want_dx);
    }
    Some(bd.finish())
}

// ---------------------------------------------------------------------------
// The fused recurrent step.
//
// One step function runs the whole time loop. A batch row's recurrence
// never reads another row, so the work units are fixed blocks of
// `ROW_BLOCK` rows, each running every time step for its rows: threads
// split the batch with no barrier between time steps (a per-step barrier
// costs a few µs when threads spin and whole scheduler slices when the
// machine has fewer free cores than the pool has threads). Within a step,
// for each block of four hidden columns, the unit runs the matmul of its
// rows of `[h_{t-1}, x_t]` for those columns of every gate against weights
// packed once by [`RnnPack`], with the bias and the gate math fused as its
// epilogue. The matmul reads `h_{t-1}` (or the backward's `dz_{t+1}`) from
// a two-slot buffer `[N, 2, ·]` the epilogues fill next to the full
// `[N, T, ·]` sequence: that keeps a tile's rows 1-2 KB apart, where the
// sequence buffers put them a power of two of 16 KB or more apart, all
// in the same few L1 sets. Each
// row's arithmetic is the same whatever block or tile it falls in, so the
// results do not depend on the thread count.
// ---------------------------------------------------------------------------

/// Hidden columns per unit of work: one f32x4 vector.
const LANES: usize = 4;

/// Batch rows per unit of work. Rows are independent through the whole
/// time loop, so units need no barrier between steps; also the height of
/// the stack tile (see [`tile_mm`]).
const ROW_BLOCK: usize = 8;

/// Below this many flops in all, the loop runs in one call on one thread.
const SPLIT_FLOPS: usize = 1 << 20;

/// Bytes of the stack tile of accumulators: up to `ROW_BLOCK` rows of
/// `EPI_BLOCKS` hidden blocks of up to four vectors (one per gate).
const TILE_BYTES: usize = ROW_BLOCK * EPI_BLOCKS * 4 * 16;

/// `w_h` (or its transpose, or `w_x`) packed per block of four hidden
/// columns: `dst[hb][k0 + k][v][l] = src[k·rs + (v·vs + 4·hb + l)·cs]`
/// for `k < self.k`, zero past `h`; a panel has `kt` rows. Work units are
/// hidden blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct RnnPack {
    pub src: Loc,
    pub k: usize,
    pub k0: usize,
    pub kt: usize,
    pub v: usize,
    pub vs: usize,
    pub h: usize,
    pub rs: i64,
    pub cs: i64,
    pub dst: Loc,
}

impl RnnPack {
    fn nb(&self) -> usize {
        self.h.div_ceil(LANES)
    }

    fn panel_bytes(&self) -> usize {
        self.kt * self.v * LANES * 4
    }

    pub fn bytes(&self) -> usize {
        self.nb() * self.panel_bytes()
    }

    pub fn units(&self) -> usize {
        self.nb()
    }

    pub fn unit_cost(&self) -> usize {
        self.k * self.v * LANES
    }

    pub fn emit(&self, kb: &mut Kb) {
        let src = kb.base(self.src);
        let dst = kb.base(self.dst);
        let (start, end) = (kb.start, kb.end);
        let nb = self.nb() as i64;
        let rem = self.h % LANES;
        kb.for_range(start, end, 1, |k, hb| {
            let e = k.b.ins().imul_imm_s(hb, LANES as i64 * self.cs);
            let s0 = k.addr(src, e, 4);
            let d0 = k.addr(dst, hb, self.panel_bytes() as i64);
            let d0 =
                k.b.ins()
                    .iadd_imm_s(d0, (self.k0 * self.v * LANES * 4) as i64);
            let body = |k: &mut Kb, lanes: usize| {
                k.for_const(0, self.k, |k, kk| {
                    let s = k.addr(s0, kk, 4 * self.rs);
                    let d = k.addr(d0, kk, (self.v * LANES * 4) as i64);
                    for vi in 0..self.v {
                        let sv = k.b.ins().iadd_imm_s(s, (vi * self.vs) as i64 * self.cs * 4);
                        let dv = k.b.ins().iadd_imm_s(d, (vi * LANES * 4) as i64);
                        if lanes == LANES && self.cs == 1 {
                            let x = k.load_v(sv, 0);
                            k.b.ins().store(flags(), x, dv, 0);
                        } else {
                            for l in 0..LANES {
                                let x = if l < lanes {
                                    let a = k.b.ins().iadd_imm_s(sv, l as i64 * self.cs * 4);
                                    k.load_f(a, 0)
                                } else {
                                    k.fconst(0.0)
                                };
                                k.store_f(x, dv, (l * 4) as i32);
                            }
                        }
                    }
                });
            };
            if rem == 0 {
                body(k, LANES);
            } else {
                let last = k.b.ins().icmp_imm_s(IntCC::Equal, hb, nb - 1);
                k.if_else(last, |k| body(k, rem), |k| body(k, LANES));
            }
        });
    }
}

/// The recurrences a fused step runs, with their buffers. `[N, T, ·]`
/// buffers hold every step; one-slot buffers are updated in place;
/// two-slot ones (`st`, `dzs`) hold step `t` in slot `t mod 2`, the
/// compact copy the next step's matmul reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Rec {
    /// LSTM forward: input `x`, bias `b`, hidden states `hs` (and `st`),
    /// cell state `c`; `save` receives the activated gates and `tanh c` of
    /// every step for the gradient.
    LstmFwd {
        x: Seq,
        b: Loc,
        hs: Seq,
        st: Seq,
        c: Seq,
        save: Option<(Seq, Seq)>,
    },
    /// GRU forward in two phases per step: `(z, r)` and `r·h_{t-1}`, then
    /// `h~` and `h_t`. `act` holds `(z, r, h~)`, `rh` holds `r·h_{t-1}`,
    /// `rc` its compact copy (`rh` itself when that has one slot).
    GruFwd {
        x: Seq,
        b: Loc,
        hs: Seq,
        st: Seq,
        act: Seq,
        rh: Seq,
        rc: Seq,
    },
    /// LSTM backward, steps in reverse: incoming `dh`, the forward's saved
    /// `act`, `c`, `tanh c`; gate gradients into `dz` (and `dzs`); `dc` carries
    /// `dc_{t+1}·f_{t+1}`.
    LstmBwd {
        dh: Seq,
        act: Seq,
        c: Seq,
        tc: Seq,
        dz: Seq,
        dzs: Seq,
        dc: Seq,
    },
    /// GRU backward in two phases per step: `dz_z`, `dz_h~` (phase A), then
    /// `d(r·h_{t-1})`, `dz_r` (phase B). `dhs` holds `dh_t` between the
    /// phases, `dhc` the part of `dh_{t-1}` not from `dz_{z,r} w_hᵀ`.
    GruBwd {
        dh: Seq,
        act: Seq,
        hs: Seq,
        dz: Seq,
        dzs: Seq,
        dhs: Seq,
        dhc: Seq,
    },
}

/// A whole recurrent time loop as one step (see the section comment).
#[derive(Clone, Debug, PartialEq)]
pub struct RnnSeq {
    pub rec: Rec,
    pub n: usize,
    pub t: usize,
    pub h: usize,
    /// Input features: the forward step's matmul runs over `h + f` rows
    /// of its panel (see [`pack_forward`]).
    pub f: usize,
    /// Recurrent weights packed by [`pack_forward`] (forward recurrences)
    /// or [`pack_backward`] (backward ones).
    pub wp: Loc,
}

/// A buffer's base address in a kernel.
#[derive(Clone, Copy)]
struct Bound {
    base: Value,
    s: Seq,
}

impl Bound {
    fn new(k: &mut Kb, s: Seq) -> Bound {
        Bound {
            base: k.base(s.loc),
            s,
        }
    }

    fn row_bytes(&self) -> i64 {
        (self.s.slots * self.s.width * 4) as i64
    }

    /// Address of `[row, t, col + c0]` (one-slot buffers ignore `t`).
    fn at(&self, k: &mut Kb, row: Value, t: Value, col: Value, c0: usize) -> Value {
        let mut e =
            k.b.ins()
                .imul_imm_s(row, (self.s.slots * self.s.width) as i64);
        if self.s.slots > 1 {
            let tt = k.b.ins().imul_imm_s(t, self.s.width as i64);
            e = k.b.ins().iadd(e, tt);
        }
        let e = k.b.ins().iadd(e, col);
        let e = k.b.ins().iadd_imm_s(e, c0 as i64);
        k.addr(self.base, e, 4)
    }

    /// Address of `[0, t, c0]`: the start of a matmul A operand.
    fn row0(&self, k: &mut Kb, t: Value, c0: usize) -> Value {
        let zero = k.iconst(0);
        self.at(k, zero, t, zero, c0)
    }
}

/// How many of a vector's lanes are real hidden columns: the last block
/// of a hidden size that is not a multiple of 4 loads and stores fewer.
#[derive(Clone, Copy)]
struct Lanes(usize);

impl Lanes {
    fn ld(self, k: &mut Kb, a: Value) -> Value {
        if self.0 == LANES {
            return k.load_v(a, 0);
        }
        let mut v = k.vconst(0.0);
        for l in 0..self.0 {
            let x = k.load_f(a, (l * 4) as i32);
            v = k.b.ins().insertlane(v, x, l as u8);
        }
        v
    }

    fn st(self, k: &mut Kb, v: Value, a: Value) {
        if self.0 == LANES {
            k.b.ins().store(flags(), v, a, 0);
            return;
        }
        for l in 0..self.0 {
            let x = k.b.ins().extractlane(v, l as u8);
            k.store_f(x, a, (l * 4) as i32);
        }
    }
}

/// One unit's recurrent matmul: rows of A start at `a`, `a_rs` bytes
/// apart, `kdim` contiguous f32s each; the packed panel has [`RnnSeq::vectors`] per
/// k, `pstride` bytes apart. Runs only where `run` is set (else the
/// product is zero: the state before step 0, or the gradient after the
/// last step). `x`, when set, continues the sum over a second A (rows
/// `x.a_rs` bytes apart, `x.kdim` f32s each: the step's input) against
/// the next `x.kdim` panel rows, whatever `run`.
#[derive(Clone, Copy)]
struct Mm {
    run: Value,
    a: Value,
    a_rs: i64,
    panel: Value,
    pstride: i64,
    kdim: usize,
    x: Option<XIn>,
}

impl Mm {
    /// Byte offset of the input part in the broadcast-packed A
    /// ([`RnnSeq::pack_a`]): after `ROW_BLOCK` rows of the state part.
    fn packed_x_at(&self) -> usize {
        ROW_BLOCK * self.kdim * 16
    }
}

/// The input part of a forward step's matmul (see [`Mm`]).
#[derive(Clone, Copy)]
struct XIn {
    a: Value,
    a_rs: i64,
    kdim: usize,
}

/// One run of k of a tile's matmul: A's first row, row stride in bytes,
/// the panel at its first k (already offset to the tile's column), and
/// whether it runs (always when `None`).
struct Seg {
    run: Option<Value>,
    a: Value,
    a_rs: i64,
    /// Bytes per k step of A: 4 in place, 16 when packed with every
    /// element stored as the broadcast vector the FMAs take.
    a_step: i64,
    panel: Value,
    kdim: usize,
}

/// Per-unit values shared by the epilogues.
#[derive(Clone, Copy)]
struct Cx {
    t: Value,
    has_prev: Value,
    has_next: Value,
    /// `max(t − 1, 0)` and `min(t + 1, T − 1)`: addresses that stay in
    /// the buffer; what they read is replaced by zeros at the ends.
    tprev: Value,
    tnext: Value,
    col: Value,
    /// Set for the last hidden block when `H % 4 ≠ 0`.
    last: Option<Value>,
    panel: Value,
    zeros: Value,
    /// The stack tile: its address is formed where it is used, since a
    /// value live across the k loops gets reloaded inside them.
    tile: StackSlot,
    /// First row of the unit's row block, and whether it is the last
    /// block.
    r_lo: Value,
    last_unit: Value,
}

type Epi<'a> = dyn Fn(&mut Kb, Value, &[Value], Lanes) + 'a;

/// Activations computed together in a row epilogue: more chains spill.
const ACT_CHAINS: usize = 4;

/// One row's epilogues over a whole group of hidden blocks (all four lanes
/// real), given the first block's context, the row of the tile and the
/// number of blocks. Block `i` sits `16·i` bytes past the first in every
/// buffer, so each buffer's address is formed once per row (per block,
/// the address arithmetic took more instructions than the gate math), and
/// the activations of several blocks interleave their dependency chains.
type RowEpi<'a> = dyn Fn(&mut Kb, Value, &Cx, Acc, usize) + 'a;

/// A row of the stack tile: vector `j` of block `i` at `(i·v + j)·16`
/// bytes from `row`. Epilogues load each accumulator where they use it:
/// loaded up front, a group's would not fit the registers.
#[derive(Clone, Copy)]
struct Acc {
    row: Value,
    v: usize,
}

impl Acc {
    fn get(self, k: &mut Kb, i: usize, j: usize) -> Value {
        k.load_v(self.row, ((i * self.v + j) * 16) as i32)
    }
}

/// A hidden block's context and epilogue, given the block.
type UnitAt<'a, 'r> = dyn Fn(&mut Kb, Value) -> (Cx, Box<Epi<'r>>) + 'a;

/// Vectors of a tile row: the hidden blocks of a group times the vectors
/// each block's matmul has (4 gates for the LSTM forward, 2 or 1 for the
/// others). Two make 4 × 2 tiles, whose loop takes 18 instructions per 8
/// FMAs with a broadcast-packed A (2 × 4 tiles: 20; GRU forward 2.09 ->
/// 1.87 ms on 2 threads, alternated; the LSTM forward keeps 2 × 4).
const TILE_VECS: usize = 2;

/// Hidden blocks per tile: their epilogues run together, row by row (see
/// [`RnnSeq::epilogues`]).
const EPI_BLOCKS: usize = 4;

/// Stack bytes up to which a forward step's A is packed as broadcast
/// vectors (`ROW_BLOCK` rows of `H + F`).
const A_PACK_MAX_BYTES: usize = 64 << 10;

/// k per chunk of [`tile_mm`]: a chunk's panel rows (up to 4 vectors
/// each, 8 KB) and A columns stay in L1 while every row group of the tile
/// runs over them.
const KC: usize = 128;

/// `tile[r][i] = Σ_k A[r, k] · panel[k] at byte offset vecs[i]` for
/// `rows` rows (at most [`ROW_BLOCK`]). The rows are taken a few at a
/// time, as many as keep all accumulators, the B vectors of one k, a
/// broadcast and its copy within the 16 vector registers (2 rows × 4
/// vectors, 4 × 2, 3 × 3), over chunks of [`KC`] k: each row group adds
/// a chunk to its part of the tile, so the panel is read from L2 once per
/// step, not once per row group. Each element sums its k terms in order,
/// whatever tile or chunk it falls in (its partial sum goes through the
/// tile exactly), so the results do not depend on the row split.
fn tile_mm(
    k: &mut Kb,
    segs: &[Seg],
    pstride: i64,
    rows: usize,
    tile: (StackSlot, (usize, usize)),
    vecs: &[i64],
) {
    let height = match vecs.len() {
        1 => ROW_BLOCK,
        2 => 4,
        3 => 3,
        _ => 2,
    };
    let groups: Vec<(usize, usize)> = (0..rows)
        .step_by(height)
        .map(|r0| (r0, height.min(rows - r0)))
        .collect();
    let (slot, (row_vecs, col0)) = tile;
    let at = k.b.ins().stack_addr(I64, slot, 0);
    let zero = k.vconst(0.0);
    for r in 0..rows {
        for i in 0..vecs.len() {
            let off = (r * row_vecs + col0 + i) * 16;
            k.b.ins().store(flags(), zero, at, off as i32);
        }
    }
    for seg in segs {
        let body = |k: &mut Kb| {
            let chunks = |k: &mut Kb, c0: Value, kc: usize| {
                let a = k.addr(seg.a, c0, KC as i64 * seg.a_step);
                let b = k.addr(seg.panel, c0, KC as i64 * pstride);
                for &g in &groups {
                    let a = k.b.ins().iadd_imm_s(a, g.0 as i64 * seg.a_rs);
                    let a = (a, seg.a_rs, seg.a_step);
                    chunk(k, (a, b, pstride), kc, g, tile, vecs);
                }
            };
            let full = seg.kdim / KC;
            if full > 0 {
                k.for_const(0, full, |k, c| chunks(k, c, KC));
            }
            if !seg.kdim.is_multiple_of(KC) {
                let c = k.iconst(full as i64);
                chunks(k, c, seg.kdim % KC);
            }
        };
        match seg.run {
            Some(c) => k.if_then(c, body),
            None => body(k),
        }
    }
}

/// `kc` k of rows `r0..r0 + rn` of [`tile_mm`] added to the tile, in the
/// matmul micro-kernel's form (see `matmul::micro_kernel`): per k, the B
/// vectors, then per row one broadcast of its A element (a vector load
/// when A is broadcast-packed, `a_step` 16) shared by the row's FMAs
/// through register copies (Cranelift's `fma` overwrites a
/// multiplicand); two k per loop iteration, the second visiting rows and
/// vectors in reverse, so each accumulator returns to its register by the
/// end of the iteration and the loop edge moves nothing. The step is
/// compiled without the optimiser, which would hoist the second k's loads
/// above the first's FMAs and break the rotation.
///
/// A (`a`, rows `a_rs` bytes apart) is a compact state buffer (rows 1-4
/// KB apart) or the input; B (`b`) has its k `pstride` bytes apart. The A
/// and B loads are marked read-only: no store of this function touches
/// them while the loop runs (A is the previous step's state, written
/// before this step's matmuls), and every address depends on the loop's
/// pointers, so no load can be hoisted or merged across the stores of
/// other steps.
fn chunk(
    k: &mut Kb,
    ((a, a_rs, a_step), b, pstride): ((Value, i64, i64), Value, i64),
    kc: usize,
    (r0, rn): (usize, usize),
    (tile, (row_vecs, col0)): (StackSlot, (usize, usize)),
    vecs: &[i64],
) {
    let nv = vecs.len();
    let at = k.b.ins().stack_addr(I64, tile, 0);
    let off = |r: usize, i: usize| (((r0 + r) * row_vecs + col0 + i) * 16) as i32;
    let accs: Vec<Vec<Variable>> = (0..rn)
        .map(|r| {
            (0..nv)
                .map(|i| {
                    let v = k.load_v(at, off(r, i));
                    k.var(F32X4, v)
                })
                .collect()
        })
        .collect();
    let ap = k.var(I64, a);
    let bp = k.var(I64, b);
    let step = |k: &mut Kb, ks: usize| {
        let a = k.b.use_var(ap);
        let b = k.b.use_var(bp);
        for u in 0..ks {
            let rev = u % 2 == 1;
            let bv: Vec<Value> = vecs
                .iter()
                .map(|&off| {
                    let off = (off + u as i64 * pstride) as i32;
                    k.b.ins().load(F32X4, ro_flags(), b, off)
                })
                .collect();
            let order = step_order(rn, rev);
            let cols = step_order(nv, rev);
            for &r in &order {
                let off = (r as i64 * a_rs + u as i64 * a_step) as i32;
                let x = if a_step == 16 {
                    k.b.ins().load(F32X4, ro_flags(), a, off)
                } else {
                    let s = k.b.ins().load(F32, ro_flags(), a, off);
                    k.b.ins().splat(F32X4, s)
                };
                for &i in &cols {
                    let old = k.b.use_var(accs[r][i]);
                    let new = k.b.ins().fma(x, bv[i], old);
                    k.b.def_var(accs[r][i], new);
                }
            }
        }
        let a2 = k.b.ins().iadd_imm_s(a, ks as i64 * a_step);
        let b2 = k.b.ins().iadd_imm_s(b, ks as i64 * pstride);
        k.b.def_var(ap, a2);
        k.b.def_var(bp, b2);
    };
    if kc >= 2 {
        // Tested at the bottom: one block that branches to itself and is
        // laid out before what follows. A top-tested loop's body is placed
        // after the rest of the function, where the register allocator
        // reloads values live across it.
        let body = k.b.create_block();
        let exit = k.b.create_block();
        let zero = k.iconst(0);
        let i = k.var(I64, zero);
        k.b.ins().jump(body, &[]);
        k.b.switch_to_block(body);
        step(k, 2);
        let iv = k.b.use_var(i);
        let next = k.b.ins().iadd_imm_s(iv, 1);
        k.b.def_var(i, next);
        let more =
            k.b.ins()
                .icmp_imm_s(IntCC::SignedLessThan, next, (kc / 2) as i64);
        k.b.ins().brif(more, body, &[], exit, &[]);
        k.b.switch_to_block(exit);
    }
    if kc % 2 == 1 {
        step(k, 1);
    }
    let at = k.b.ins().stack_addr(I64, tile, 0);
    for (r, row) in accs.iter().enumerate() {
        for (i, var) in row.iter().enumerate() {
            let v = k.b.use_var(*var);
            k.b.ins().store(flags(), v, at, off(r, i));
        }
    }
}

/// Address of `[row, t − 1, cx.col]` of `b`, or of zeros at `t = 0`.
fn prev_or_zero(k: &mut Kb, b: &Bound, row: Value, cx: &Cx) -> Value {
    let a = b.at(k, row, cx.tprev, cx.col, 0);
    k.b.ins().select(cx.has_prev, a, cx.zeros)
}

impl RnnSeq {
    fn new(rec: Rec, d: Dims, wp: Loc) -> RnnSeq {
        RnnSeq {
            rec,
            n: d.n,
            t: d.t,
            h: d.h,
            f: d.f,
            wp,
        }
    }

    fn nb(&self) -> usize {
        self.h.div_ceil(LANES)
    }

    fn gates(&self) -> usize {
        match self.rec {
            Rec::LstmFwd { .. } | Rec::LstmBwd { .. } => 4,
            Rec::GruFwd { .. } | Rec::GruBwd { .. } => 3,
        }
    }

    fn phases(&self) -> usize {
        match self.rec {
            Rec::LstmFwd { .. } | Rec::LstmBwd { .. } => 1,
            Rec::GruFwd { .. } | Rec::GruBwd { .. } => 2,
        }
    }

    fn backward(&self) -> bool {
        matches!(self.rec, Rec::LstmBwd { .. } | Rec::GruBwd { .. })
    }

    /// Batch rows of the last unit (`ROW_BLOCK` unless the batch is not a
    /// multiple of it).
    fn last_unit_rows(&self) -> usize {
        self.n - (self.units() - 1) * ROW_BLOCK
    }

    /// Work units are blocks of `ROW_BLOCK` batch rows, each running the
    /// whole time loop for its rows.
    pub fn units(&self) -> usize {
        self.n.div_ceil(ROW_BLOCK)
    }

    /// Flops of one unit: the matmuls of all its steps.
    pub fn unit_cost(&self) -> usize {
        let kx = if self.backward() { 0 } else { self.f };
        2 * ROW_BLOCK.min(self.n) * (self.h + kx) * self.gates() * self.h * self.t
    }

    /// One call for everything when the loop is small (waking a thread
    /// would cost more), else one unit per chunk.
    pub fn grain(&self) -> usize {
        if self.unit_cost() * self.units() < SPLIT_FLOPS {
            self.units()
        } else {
            1
        }
    }

    pub fn emit(&self, kb: &mut Kb) {
        let nb = self.nb();
        let tl = self.t as i64 - 1;
        let kx = if self.backward() { 0 } else { self.f };
        let panel_bytes = ((self.h + kx) * self.gates() * LANES * 4) as i64;
        let wp = kb.base(self.wp);
        // Zeros for a row epilogue's whole group of blocks at `t = 0`.
        let zeros = kb.stack_buf((16 * EPI_BLOCKS) as u32);
        let z = kb.vconst(0.0);
        for i in 0..EPI_BLOCKS {
            kb.b.ins().store(flags(), z, zeros, (16 * i) as i32);
        }
        let tile = kb.b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            TILE_BYTES as u32,
            4,
        ));
        let partial = !self.h.is_multiple_of(LANES);
        let units = self.units() as i64;
        let (start, end) = (kb.start, kb.end);
        let rec = self.bind(kb);
        // The unit's first row, kept on the stack and loaded where used:
        // held in a register across the matmul loops, the register
        // allocator reloads it inside them.
        let r_lo_at =
            kb.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 8, 3));
        // The forward steps' A (the state and the input rows of the unit)
        // packed once per phase as broadcast vectors: the FMA loop then
        // loads each row's multiplier as one vector (see `chunk`).
        let a_pack = (!self.backward())
            .then(|| ROW_BLOCK * (self.h + self.f) * 16)
            .filter(|&bytes| bytes <= A_PACK_MAX_BYTES)
            .map(|bytes| kb.stack_buf(bytes as u32));
        kb.for_range(start, end, 1, |k, u| {
            let r_lo = k.b.ins().imul_imm_s(u, ROW_BLOCK as i64);
            k.b.ins().stack_store(I64, r_lo, r_lo_at, 0);
            let last_unit = k.b.ins().icmp_imm_s(IntCC::Equal, u, units - 1);
            k.for_const(0, self.t, |k, step| {
                let t = if self.backward() {
                    let last = k.iconst(tl);
                    k.b.ins().isub(last, step)
                } else {
                    step
                };
                let zero = k.iconst(0);
                let tlv = k.iconst(tl);
                let tm1 = k.b.ins().iadd_imm_s(t, -1);
                let tp1 = k.b.ins().iadd_imm_s(t, 1);
                let has_prev = k.b.ins().icmp_imm_s(IntCC::SignedGreaterThan, t, 0);
                let has_next = k.b.ins().icmp_imm_s(IntCC::SignedLessThan, t, tl);
                let tprev = k.b.ins().smax(tm1, zero);
                let tnext = k.b.ins().smin(tp1, tlv);
                let cx_of = |k: &mut Kb, hb: Value| Cx {
                    t,
                    has_prev,
                    has_next,
                    tprev,
                    tnext,
                    col: k.b.ins().imul_imm_s(hb, LANES as i64),
                    last: partial.then(|| k.b.ins().icmp_imm_s(IntCC::Equal, hb, nb as i64 - 1)),
                    panel: k.addr(wp, hb, panel_bytes),
                    zeros,
                    tile,
                    r_lo: k.b.ins().stack_load(I64, I64, r_lo_at, 0),
                    last_unit,
                };
                // Phases run one after the other over all hidden blocks:
                // a phase reads every column the one before wrote. Within
                // a phase, groups of `EPI_BLOCKS` blocks share one tile:
                // their matmuls fill it (each matmul covering blocks worth
                // `TILE_VECS` vectors), then their epilogues run row by
                // row. A group's epilogues write only the state slot the
                // matmuls of this step do not read.
                for phase in 0..self.phases() {
                    let v = self.vectors(phase);
                    let g = (TILE_VECS / v).max(1);
                    if let Some(buf) = a_pack {
                        let zero_hb = k.iconst(0);
                        let cx = cx_of(k, zero_hb);
                        let (mm, _) = self.unit(k, &rec, &cx, phase);
                        self.pack_a(k, &cx, &mm, buf);
                    }
                    let packed = a_pack;
                    let group = |k: &mut Kb, hb0: Value, en: usize| {
                        let mut b0 = 0;
                        while b0 < en {
                            let gn = g.min(en - b0);
                            let hb = k.b.ins().iadd_imm_s(hb0, b0 as i64);
                            let cx = cx_of(k, hb);
                            let (mm, _) = self.unit(k, &rec, &cx, phase);
                            let vecs: Vec<i64> = (0..gn)
                                .flat_map(|gi| {
                                    (0..v).map(move |j| gi as i64 * panel_bytes + (j * 16) as i64)
                                })
                                .collect();
                            self.product(k, &cx, &mm, &vecs, (en * v, b0 * v), packed);
                            b0 += gn;
                        }
                        let at = |k: &mut Kb, hb: Value| {
                            let cx = cx_of(k, hb);
                            let (_, epi) = self.unit(k, &rec, &cx, phase);
                            (cx, epi)
                        };
                        let row_epi = if partial {
                            None
                        } else {
                            self.row_epilogue(&rec, phase)
                        };
                        self.epilogues(k, hb0, (v, en), &at, row_epi.as_deref());
                    };
                    let full = nb / EPI_BLOCKS;
                    if full > 0 {
                        k.for_const(0, full, |k, gi| {
                            let hb0 = k.b.ins().imul_imm_s(gi, EPI_BLOCKS as i64);
                            group(k, hb0, EPI_BLOCKS);
                        });
                    }
                    if !nb.is_multiple_of(EPI_BLOCKS) {
                        let hb0 = k.iconst((full * EPI_BLOCKS) as i64);
                        group(k, hb0, nb % EPI_BLOCKS);
                    }
                }
            });
        });
    }

    /// Every buffer of the recurrence bound to its address.
    fn bind(&self, k: &mut Kb) -> BoundRec {
        let mut b = |s: Seq| Bound::new(k, s);
        match &self.rec {
            Rec::LstmFwd {
                x,
                b: bias,
                hs,
                st,
                c,
                save,
            } => BoundRec::LstmFwd {
                x: b(*x),
                b: b(Seq {
                    loc: *bias,
                    slots: 1,
                    width: 0,
                }),
                hs: b(*hs),
                st: b(*st),
                c: b(*c),
                save: save.map(|(a, t)| (b(a), b(t))),
            },
            Rec::GruFwd {
                x,
                b: bias,
                hs,
                st,
                act,
                rh,
                rc,
            } => BoundRec::GruFwd {
                x: b(*x),
                b: b(Seq {
                    loc: *bias,
                    slots: 1,
                    width: 0,
                }),
                hs: b(*hs),
                st: b(*st),
                act: b(*act),
                rh: b(*rh),
                rc: (rc != rh).then(|| b(*rc)),
            },
            Rec::LstmBwd {
                dh,
                act,
                c,
                tc,
                dz,
                dzs,
                dc,
            } => BoundRec::LstmBwd {
                dh: b(*dh),
                act: b(*act),
                c: b(*c),
                tc: b(*tc),
                dz: b(*dz),
                dzs: b(*dzs),
                dc: b(*dc),
            },
            Rec::GruBwd {
                dh,
                act,
                hs,
                dz,
                dzs,
                dhs,
                dhc,
            } => BoundRec::GruBwd {
                dh: b(*dh),
                act: b(*act),
                hs: b(*hs),
                dz: b(*dz),
                dzs: b(*dzs),
                dhs: b(*dhs),
                dhc: b(*dhc),
            },
        }
    }

    /// Vectors of phase `phase`'s matmul per hidden block.
    fn vectors(&self, phase: usize) -> usize {
        match (&self.rec, phase) {
            (Rec::LstmFwd { .. }, _) => 4,
            (Rec::GruFwd { .. }, 0) => 2,
            _ => 1,
        }
    }

    /// The matmul of the unit's row block for a group of hidden blocks
    /// (panel vectors at byte offsets `vecs` from the first block's) into
    /// the stack tile. Only the last row block may be short.
    /// Copy the unit's rows of the phase's A (`mm`: the state part, then
    /// the input part) to `buf`, every element as a splatted f32x4: row `r`,
    /// step `kk` of the state part at `(r·kdim + kk)·16`, the input part
    /// after `ROW_BLOCK` such rows. Rows past the batch are not read.
    fn pack_a(&self, k: &mut Kb, cx: &Cx, mm: &Mm, buf: Value) {
        let n_last = self.last_unit_rows();
        let mut parts = vec![(Some(mm.run), mm.a, mm.a_rs, mm.kdim, 0usize)];
        if let Some(x) = mm.x {
            parts.push((None, x.a, x.a_rs, x.kdim, mm.packed_x_at()));
        }
        let rows = if n_last == ROW_BLOCK || self.units() == 1 {
            let n = if n_last == ROW_BLOCK {
                ROW_BLOCK
            } else {
                n_last
            };
            k.iconst(n as i64)
        } else {
            let full = k.iconst(ROW_BLOCK as i64);
            let last = k.iconst(n_last as i64);
            k.b.ins().select(cx.last_unit, last, full)
        };
        for (run, a, a_rs, kdim, at) in parts {
            let body = |k: &mut Kb| {
                let zero = k.iconst(0);
                k.for_range(zero, rows, 1, |k, r| {
                    let row = k.b.ins().iadd(cx.r_lo, r);
                    let src = k.addr(a, row, a_rs);
                    let dst = k.addr(buf, r, (kdim * 16) as i64);
                    let dst = k.b.ins().iadd_imm_s(dst, at as i64);
                    for kk in 0..kdim {
                        let x = k.load_f(src, (kk * 4) as i32);
                        let v = k.b.ins().splat(F32X4, x);
                        k.b.ins().store(flags(), v, dst, (kk * 16) as i32);
                    }
                });
            };
            match run {
                Some(c) => k.if_then(c, body),
                None => body(k),
            }
        }
    }

    /// The tile's matmul over the unit's rows of A, read in place or, with
    /// `packed` (see [`RnnSeq::pack_a`]), from the broadcast-packed copy.
    fn product(
        &self,
        k: &mut Kb,
        cx: &Cx,
        mm: &Mm,
        vecs: &[i64],
        place: (usize, usize),
        packed: Option<Value>,
    ) {
        let n_last = self.last_unit_rows();
        let r0 = cx.r_lo;
        let seg_a = |k: &mut Kb, a: Value, a_rs: i64, kdim: usize, at: usize| match packed {
            Some(p) => (k.b.ins().iadd_imm_s(p, at as i64), (kdim * 16) as i64, 16),
            None => (k.addr(a, r0, a_rs), a_rs, 4),
        };
        let (a, a_rs, a_step) = seg_a(k, mm.a, mm.a_rs, mm.kdim, 0);
        let mut segs = vec![Seg {
            run: Some(mm.run),
            a,
            a_rs,
            a_step,
            panel: mm.panel,
            kdim: mm.kdim,
        }];
        if let Some(x) = mm.x {
            let off = mm.kdim as i64 * mm.pstride;
            let (a, a_rs, a_step) = seg_a(k, x.a, x.a_rs, x.kdim, mm.packed_x_at());
            segs.push(Seg {
                run: None,
                a,
                a_rs,
                a_step,
                panel: k.b.ins().iadd_imm_s(mm.panel, off),
                kdim: x.kdim,
            });
        }
        let ps = mm.pstride;
        if n_last == ROW_BLOCK {
            tile_mm(k, &segs, ps, ROW_BLOCK, (cx.tile, place), vecs);
        } else if self.units() == 1 {
            tile_mm(k, &segs, ps, n_last, (cx.tile, place), vecs);
        } else {
            k.if_else(
                cx.last_unit,
                |k| tile_mm(k, &segs, ps, n_last, (cx.tile, place), vecs),
                |k| tile_mm(k, &segs, ps, ROW_BLOCK, (cx.tile, place), vecs),
            );
        }
    }

    /// The epilogues of blocks `hb0..hb0 + en` (`v` vectors each) over the
    /// tile their matmuls filled; `at` gives a block's context and
    /// epilogue. Rows outer: one row's blocks are adjacent columns of the
    /// `[N, T, ·]` buffers (four blocks fill a cache line), which sit a
    /// power of two apart from row to row, in the same few L1 sets.
    fn epilogues<'r>(
        &self,
        k: &mut Kb,
        hb0: Value,
        (v, en): (usize, usize),
        at: &UnitAt<'_, 'r>,
        row_epi: Option<&RowEpi<'r>>,
    ) {
        let n_last = self.last_unit_rows();
        let h_rem = self.h % LANES;
        let (cx0, _) = at(k, hb0);
        let full = k.iconst(ROW_BLOCK as i64);
        let nrows = if n_last != ROW_BLOCK {
            let l = k.iconst(n_last as i64);
            k.b.ins().select(cx0.last_unit, l, full)
        } else {
            full
        };
        let zero = k.iconst(0);
        if let Some(row_epi) = row_epi {
            k.for_range(zero, nrows, 1, |k, r| {
                let (cx, _) = at(k, hb0);
                let tile = k.b.ins().stack_addr(I64, cx.tile, 0);
                let tr = k.addr(tile, r, (en * v * 16) as i64);
                let row = k.b.ins().iadd(cx.r_lo, r);
                row_epi(k, row, &cx, Acc { row: tr, v }, en);
            });
            return;
        }
        k.for_range(zero, nrows, 1, |k, r| {
            k.for_const(0, en, |k, gi| {
                let hb = k.b.ins().iadd(hb0, gi);
                let (cx, epi) = at(k, hb);
                let row = k.b.ins().iadd(cx.r_lo, r);
                let tile = k.b.ins().stack_addr(I64, cx.tile, 0);
                let tr = k.addr(tile, r, (en * v * 16) as i64);
                let tr = k.addr(tr, gi, (v * 16) as i64);
                let acc: Vec<Value> = (0..v).map(|j| k.load_v(tr, (j * 16) as i32)).collect();
                match cx.last {
                    None => epi(k, row, &acc, Lanes(LANES)),
                    Some(l) => k.if_else(
                        l,
                        |k| epi(k, row, &acc, Lanes(h_rem)),
                        |k| epi(k, row, &acc, Lanes(LANES)),
                    ),
                }
            });
        });
    }

    /// The epilogue of phase `phase` over a row of a group of blocks at
    /// once ([`RowEpi`]) where it pays, for hidden sizes with no partial
    /// block. Each
    /// value is computed as by [`RnnSeq::unit`]'s per-block epilogue (which
    /// handles the partial block), in the same order of operations.
    fn row_epilogue<'a>(&self, rec: &'a BoundRec, phase: usize) -> Option<Box<RowEpi<'a>>> {
        let h = self.h;
        // Block `i` of the group sits `16·i` bytes past the first block's
        // column in every buffer: one address per buffer and row.
        let ld = |k: &mut Kb, p: Value, i: usize| k.load_v(p, (i * 16) as i32);
        let st = |k: &mut Kb, v: Value, p: Value, i: usize| {
            k.b.ins().store(flags(), v, p, (i * 16) as i32);
        };
        match (rec, phase) {
            (
                BoundRec::GruFwd {
                    b, hs, act, rh, rc, ..
                },
                0,
            ) => Some(Box::new(
                move |k: &mut Kb, row: Value, cx: &Cx, acc: Acc, en: usize| {
                    let zero = k.iconst(0);
                    let bz = b.at(k, zero, zero, cx.col, 0);
                    let br = b.at(k, zero, zero, cx.col, h);
                    let hp = prev_or_zero(k, hs, row, cx);
                    let az = act.at(k, row, cx.t, cx.col, 0);
                    let ar = act.at(k, row, cx.t, cx.col, h);
                    let arh = rh.at(k, row, cx.t, cx.col, 0);
                    let arc = rc.as_ref().map(|rc| rc.at(k, row, cx.t, cx.col, 0));
                    // Two gates per block: blocks in pairs, each pair's
                    // values consumed before the next pair's are formed.
                    let pair = ACT_CHAINS / 2;
                    for i0 in (0..en).step_by(pair) {
                        let blocks = i0..(i0 + pair).min(en);
                        let mut pre = Vec::with_capacity(ACT_CHAINS);
                        for i in blocks.clone() {
                            for (j, bp) in [bz, br].into_iter().enumerate() {
                                let a = acc.get(k, i, j);
                                let bb = ld(k, bp, i);
                                pre.push(k.b.ins().fadd(a, bb));
                            }
                        }
                        let s = k.vsigmoid_n(&pre);
                        for (i, zr) in blocks.zip(s.chunks(2)) {
                            let (zz, rr) = (zr[0], zr[1]);
                            let hpv = ld(k, hp, i);
                            let rhv = k.b.ins().fmul(rr, hpv);
                            st(k, zz, az, i);
                            st(k, rr, ar, i);
                            st(k, rhv, arh, i);
                            if let Some(arc) = arc {
                                st(k, rhv, arc, i);
                            }
                        }
                    }
                },
            )),
            (
                BoundRec::GruFwd {
                    b, hs, st: sb, act, ..
                },
                _,
            ) => Some(Box::new(
                move |k: &mut Kb, row: Value, cx: &Cx, acc: Acc, en: usize| {
                    let zero = k.iconst(0);
                    let bh = b.at(k, zero, zero, cx.col, 2 * h);
                    let pre: Vec<Value> = (0..en)
                        .map(|i| {
                            let a = acc.get(k, i, 0);
                            let bb = ld(k, bh, i);
                            k.b.ins().fadd(a, bb)
                        })
                        .collect();
                    let hcs: Vec<Value> =
                        pre.chunks(ACT_CHAINS).flat_map(|c| k.vtanh_n(c)).collect();
                    let hp = prev_or_zero(k, hs, row, cx);
                    let az = act.at(k, row, cx.t, cx.col, 0);
                    let ah = act.at(k, row, cx.t, cx.col, 2 * h);
                    let ahs = hs.at(k, row, cx.t, cx.col, 0);
                    let tp = k.b.ins().band_imm_u(cx.t, 1);
                    let ast = sb.at(k, row, tp, cx.col, 0);
                    for (i, &hc) in hcs.iter().enumerate() {
                        let zz = ld(k, az, i);
                        let hpv = ld(k, hp, i);
                        let one = k.vconst(1.0);
                        let hv = gru_blend(k, one, zz, hpv, hc);
                        st(k, hc, ah, i);
                        st(k, hv, ahs, i);
                        st(k, hv, ast, i);
                    }
                },
            )),
            (
                BoundRec::GruBwd {
                    dh,
                    act,
                    hs,
                    dz,
                    dzs,
                    dhs,
                    dhc,
                },
                0,
            ) => Some(Box::new(
                move |k: &mut Kb, row: Value, cx: &Cx, acc: Acc, en: usize| {
                    let zero = k.iconst(0);
                    let one = k.vconst(1.0);
                    let adh = dh.at(k, row, cx.t, cx.col, 0);
                    let a = dhc.at(k, row, zero, cx.col, 0);
                    let acarry = k.b.ins().select(cx.has_next, a, cx.zeros);
                    let az = act.at(k, row, cx.t, cx.col, 0);
                    let ahc = act.at(k, row, cx.t, cx.col, 2 * h);
                    let hp = prev_or_zero(k, hs, row, cx);
                    let tp = k.b.ins().band_imm_u(cx.t, 1);
                    let outs = [
                        dz.at(k, row, cx.t, cx.col, 0),
                        dzs.at(k, row, tp, cx.col, 0),
                        dz.at(k, row, cx.t, cx.col, 2 * h),
                        dzs.at(k, row, tp, cx.col, 2 * h),
                    ];
                    let adhs = dhs.at(k, row, zero, cx.col, 0);
                    for i in 0..en {
                        let dhv = ld(k, adh, i);
                        let carry = ld(k, acarry, i);
                        let a = acc.get(k, i, 0);
                        let dhv = k.b.ins().fadd(dhv, a);
                        let dhv = k.b.ins().fadd(dhv, carry);
                        let zz = ld(k, az, i);
                        let hc = ld(k, ahc, i);
                        let hpv = ld(k, hp, i);
                        let (dzz, dzc) = gru_update_grads(k, one, dhv, zz, hc, hpv);
                        for (v, p) in [dzz, dzz, dzc, dzc].into_iter().zip(outs) {
                            st(k, v, p, i);
                        }
                        st(k, dhv, adhs, i);
                    }
                },
            )),
            (
                BoundRec::GruBwd {
                    act,
                    hs,
                    dz,
                    dzs,
                    dhs,
                    dhc,
                    ..
                },
                _,
            ) => Some(Box::new(
                move |k: &mut Kb, row: Value, cx: &Cx, acc: Acc, en: usize| {
                    let zero = k.iconst(0);
                    let one = k.vconst(1.0);
                    let az = act.at(k, row, cx.t, cx.col, 0);
                    let ar = act.at(k, row, cx.t, cx.col, h);
                    let hp = prev_or_zero(k, hs, row, cx);
                    let adhs = dhs.at(k, row, zero, cx.col, 0);
                    let adhc = dhc.at(k, row, zero, cx.col, 0);
                    let tp = k.b.ins().band_imm_u(cx.t, 1);
                    let adz = dz.at(k, row, cx.t, cx.col, h);
                    let adzs = dzs.at(k, row, tp, cx.col, h);
                    for i in 0..en {
                        let drh = acc.get(k, i, 0);
                        let zz = ld(k, az, i);
                        let rr = ld(k, ar, i);
                        let hpv = ld(k, hp, i);
                        let dhv = ld(k, adhs, i);
                        let (dzr, carry) = gru_reset_grads(k, one, drh, (zz, rr), hpv, dhv);
                        st(k, carry, adhc, i);
                        st(k, dzr, adz, i);
                        st(k, dzr, adzs, i);
                    }
                },
            )),
            (
                BoundRec::LstmBwd {
                    dh,
                    act,
                    c,
                    tc,
                    dz,
                    dzs,
                    dc,
                },
                _,
            ) => Some(Box::new(
                move |k: &mut Kb, row: Value, cx: &Cx, acc: Acc, en: usize| {
                    let zero = k.iconst(0);
                    let one = k.vconst(1.0);
                    let adh = dh.at(k, row, cx.t, cx.col, 0);
                    let gates: Vec<Value> = (0..4)
                        .map(|gi| act.at(k, row, cx.t, cx.col, gi * h))
                        .collect();
                    let atc = tc.at(k, row, cx.t, cx.col, 0);
                    let a = dc.at(k, row, zero, cx.col, 0);
                    let adcn = k.b.ins().select(cx.has_next, a, cx.zeros);
                    let cp = prev_or_zero(k, c, row, cx);
                    let adc = dc.at(k, row, zero, cx.col, 0);
                    let tp = k.b.ins().band_imm_u(cx.t, 1);
                    let outs: Vec<(Value, Value)> = (0..4)
                        .map(|gi| {
                            let a = dz.at(k, row, cx.t, cx.col, gi * h);
                            let b = dzs.at(k, row, tp, cx.col, gi * h);
                            (a, b)
                        })
                        .collect();
                    for i in 0..en {
                        let dhv = ld(k, adh, i);
                        let a = acc.get(k, i, 0);
                        let dhv = k.b.ins().fadd(dhv, a);
                        let g: Vec<Value> = gates.iter().map(|&p| ld(k, p, i)).collect();
                        let (ig, fg, gg, og) = (g[0], g[1], g[2], g[3]);
                        let tcv = ld(k, atc, i);
                        let dcn = ld(k, adcn, i);
                        let cpv = ld(k, cp, i);
                        let (carry, dzs4) =
                            lstm_grads(k, one, dhv, [ig, fg, gg, og], (tcv, dcn, cpv));
                        st(k, carry, adc, i);
                        for (v, &(a, b)) in dzs4.into_iter().zip(&outs) {
                            st(k, v, a, i);
                            st(k, v, b, i);
                        }
                    }
                },
            )),
            // The gates go through the tile in three stages of at most
            // `ACT_CHAINS` chains each: the sigmoids of `i`, `f` and `o`
            // of every block, then `tanh(g)`, then the cell and `tanh(c)`,
            // each activation written back over its accumulator. The per-
            // block form runs `tanh(g)` and `tanh(c)` as lone chains,
            // bound by their latency.
            (
                BoundRec::LstmFwd {
                    b,
                    hs,
                    st: sb,
                    c,
                    save,
                    ..
                },
                _,
            ) => Some(Box::new(
                move |k: &mut Kb, row: Value, cx: &Cx, acc: Acc, en: usize| {
                    let zero = k.iconst(0);
                    let put = |k: &mut Kb, v: Value, i: usize, j: usize| {
                        k.b.ins()
                            .store(flags(), v, acc.row, ((i * acc.v + j) * 16) as i32);
                    };
                    // Each buffer's address formed once per row, as in
                    // the other row epilogues (see [`RowEpi`]).
                    let bias: Vec<Value> = (0..4)
                        .map(|gi| b.at(k, zero, zero, cx.col, gi * h))
                        .collect();
                    let saved: Vec<Option<Value>> = (0..4)
                        .map(|gi| {
                            save.as_ref()
                                .map(|(act, _)| act.at(k, row, cx.t, cx.col, gi * h))
                        })
                        .collect();
                    // Sigmoid gates first, then the tanh gate.
                    for (gates, tanh) in [(&[0usize, 1, 3][..], false), (&[2][..], true)] {
                        let cells: Vec<(usize, usize)> = gates
                            .iter()
                            .flat_map(|&gi| (0..en).map(move |i| (i, gi)))
                            .collect();
                        for part in cells.chunks(ACT_CHAINS) {
                            let pre: Vec<Value> = part
                                .iter()
                                .map(|&(i, gi)| {
                                    let a = acc.get(k, i, gi);
                                    let bb = ld(k, bias[gi], i);
                                    k.b.ins().fadd(a, bb)
                                })
                                .collect();
                            let act = if tanh {
                                k.vtanh_n(&pre)
                            } else {
                                k.vsigmoid_n(&pre)
                            };
                            for (&(i, gi), &v) in part.iter().zip(&act) {
                                put(k, v, i, gi);
                                if let Some(a) = saved[gi] {
                                    st(k, v, a, i);
                                }
                            }
                        }
                    }
                    let cp = prev_or_zero(k, c, row, cx);
                    let ac = c.at(k, row, cx.t, cx.col, 0);
                    let ahs = hs.at(k, row, cx.t, cx.col, 0);
                    let tp = k.b.ins().band_imm_u(cx.t, 1);
                    let ast = sb.at(k, row, tp, cx.col, 0);
                    let atc = save
                        .as_ref()
                        .map(|(_, tcs)| tcs.at(k, row, cx.t, cx.col, 0));
                    let blocks: Vec<usize> = (0..en).collect();
                    for part in blocks.chunks(ACT_CHAINS) {
                        let cvs: Vec<Value> = part
                            .iter()
                            .map(|&i| {
                                let (ig, fg) = (acc.get(k, i, 0), acc.get(k, i, 1));
                                let gg = acc.get(k, i, 2);
                                let cpv = ld(k, cp, i);
                                let cv = lstm_cell(k, (ig, fg, gg), cpv);
                                st(k, cv, ac, i);
                                cv
                            })
                            .collect();
                        let tcs = k.vtanh_n(&cvs);
                        for (&i, &tc) in part.iter().zip(&tcs) {
                            let og = acc.get(k, i, 3);
                            let hv = k.b.ins().fmul(og, tc);
                            st(k, hv, ahs, i);
                            st(k, hv, ast, i);
                            if let Some(a) = atc {
                                st(k, tc, a, i);
                            }
                        }
                    }
                },
            )),
        }
    }

    /// The forward step's input `x_t` as the second part of its matmul.
    fn input(&self, k: &mut Kb, x: &Bound, t: Value) -> XIn {
        XIn {
            a: x.row0(k, t, 0),
            a_rs: x.row_bytes(),
            kdim: self.f,
        }
    }

    /// The matmul and the epilogue of phase `phase` for the hidden block
    /// of `cx`.
    fn unit<'a>(&self, k: &mut Kb, rec: &'a BoundRec, cx: &Cx, phase: usize) -> (Mm, Box<Epi<'a>>) {
        let h = self.h;
        let cx = *cx;
        let (t, col) = (cx.t, cx.col);
        // `[row, t', col + c0]` of `b`, or zeros where `cond` is unset.
        let at_or_zero = move |k: &mut Kb, b: &Bound, row, t2, c0, cond| {
            let a = b.at(k, row, t2, col, c0);
            k.b.ins().select(cond, a, cx.zeros)
        };
        match (rec, phase) {
            (
                BoundRec::LstmFwd {
                    x,
                    b,
                    hs,
                    st,
                    c,
                    save,
                },
                _,
            ) => {
                let pp = k.b.ins().band_imm_u(cx.tprev, 1);
                let mm = Mm {
                    run: cx.has_prev,
                    a: st.row0(k, pp, 0),
                    a_rs: st.row_bytes(),
                    panel: cx.panel,
                    pstride: 4 * 16,
                    kdim: h,
                    x: Some(self.input(k, x, t)),
                };
                let epi = move |k: &mut Kb, row: Value, acc: &[Value], ln: Lanes| {
                    let zero = k.iconst(0);
                    let z: Vec<Value> = (0..4)
                        .map(|gi| {
                            let ba = b.at(k, zero, zero, col, gi * h);
                            let bb = ln.ld(k, ba);
                            k.b.ins().fadd(acc[gi], bb)
                        })
                        .collect();
                    // The three sigmoids' chains interleaved (same
                    // values as one at a time).
                    let s = k.vsigmoid_n(&[z[0], z[1], z[3]]);
                    let (i, f, o) = (s[0], s[1], s[2]);
                    let gg = k.vtanh(z[2]);
                    let cpa = at_or_zero(k, c, row, cx.tprev, 0, cx.has_prev);
                    let cp = ln.ld(k, cpa);
                    let cv = lstm_cell(k, (i, f, gg), cp);
                    let tc = k.vtanh(cv);
                    let hv = k.b.ins().fmul(o, tc);
                    let a = hs.at(k, row, t, col, 0);
                    ln.st(k, hv, a);
                    let tp = k.b.ins().band_imm_u(t, 1);
                    let a = st.at(k, row, tp, col, 0);
                    ln.st(k, hv, a);
                    let a = c.at(k, row, t, col, 0);
                    ln.st(k, cv, a);
                    if let Some((act, tcs)) = save {
                        for (gi, v) in [i, f, gg, o].into_iter().enumerate() {
                            let a = act.at(k, row, t, col, gi * h);
                            ln.st(k, v, a);
                        }
                        let a = tcs.at(k, row, t, col, 0);
                        ln.st(k, tc, a);
                    }
                };
                (mm, Box::new(epi))
            }
            (
                BoundRec::GruFwd {
                    x,
                    b,
                    hs,
                    st,
                    act,
                    rh,
                    rc,
                },
                0,
            ) => {
                let pp = k.b.ins().band_imm_u(cx.tprev, 1);
                let mm = Mm {
                    run: cx.has_prev,
                    a: st.row0(k, pp, 0),
                    a_rs: st.row_bytes(),
                    panel: cx.panel,
                    pstride: 3 * 16,
                    kdim: h,
                    x: Some(self.input(k, x, t)),
                };
                let epi = move |k: &mut Kb, row: Value, acc: &[Value], ln: Lanes| {
                    let zero = k.iconst(0);
                    let pre = |k: &mut Kb, gi: usize| {
                        let ba = b.at(k, zero, zero, col, gi * h);
                        let bb = ln.ld(k, ba);
                        k.b.ins().fadd(acc[gi], bb)
                    };
                    let (pz, pr) = (pre(k, 0), pre(k, 1));
                    let s = k.vsigmoid_n(&[pz, pr]);
                    let (zz, rr) = (s[0], s[1]);
                    let hpa = at_or_zero(k, hs, row, cx.tprev, 0, cx.has_prev);
                    let hp = ln.ld(k, hpa);
                    let rhv = k.b.ins().fmul(rr, hp);
                    let a = act.at(k, row, t, col, 0);
                    ln.st(k, zz, a);
                    let a = act.at(k, row, t, col, h);
                    ln.st(k, rr, a);
                    let a = rh.at(k, row, t, col, 0);
                    ln.st(k, rhv, a);
                    if let Some(rc) = rc {
                        let a = rc.at(k, row, t, col, 0);
                        ln.st(k, rhv, a);
                    }
                };
                (mm, Box::new(epi))
            }
            (
                BoundRec::GruFwd {
                    x,
                    b,
                    hs,
                    st,
                    act,
                    rh,
                    rc,
                },
                _,
            ) => {
                let rc = rc.as_ref().unwrap_or(rh);
                let mm = Mm {
                    run: cx.has_prev,
                    a: rc.row0(k, t, 0),
                    a_rs: rc.row_bytes(),
                    panel: k.b.ins().iadd_imm_s(cx.panel, 2 * 16),
                    pstride: 3 * 16,
                    kdim: h,
                    x: Some(self.input(k, x, t)),
                };
                let epi = move |k: &mut Kb, row: Value, acc: &[Value], ln: Lanes| {
                    let zero = k.iconst(0);
                    let ba = b.at(k, zero, zero, col, 2 * h);
                    let bb = ln.ld(k, ba);
                    let s = k.b.ins().fadd(acc[0], bb);
                    let hc = k.vtanh(s);
                    let za = act.at(k, row, t, col, 0);
                    let zz = ln.ld(k, za);
                    let hpa = at_or_zero(k, hs, row, cx.tprev, 0, cx.has_prev);
                    let hp = ln.ld(k, hpa);
                    let one = k.vconst(1.0);
                    let hv = gru_blend(k, one, zz, hp, hc);
                    let a = act.at(k, row, t, col, 2 * h);
                    ln.st(k, hc, a);
                    let a = hs.at(k, row, t, col, 0);
                    ln.st(k, hv, a);
                    let tp = k.b.ins().band_imm_u(t, 1);
                    let a = st.at(k, row, tp, col, 0);
                    ln.st(k, hv, a);
                };
                (mm, Box::new(epi))
            }
            (
                BoundRec::LstmBwd {
                    dh,
                    act,
                    c,
                    tc,
                    dz,
                    dzs,
                    dc,
                },
                _,
            ) => {
                let np = k.b.ins().band_imm_u(cx.tnext, 1);
                let mm = Mm {
                    run: cx.has_next,
                    a: dzs.row0(k, np, 0),
                    a_rs: dzs.row_bytes(),
                    panel: cx.panel,
                    pstride: 16,
                    kdim: 4 * h,
                    x: None,
                };
                let epi = move |k: &mut Kb, row: Value, acc: &[Value], ln: Lanes| {
                    let zero = k.iconst(0);
                    let one = k.vconst(1.0);
                    let a = dh.at(k, row, t, col, 0);
                    let dhv = ln.ld(k, a);
                    let dhv = k.b.ins().fadd(dhv, acc[0]);
                    let g: Vec<Value> = (0..4)
                        .map(|gi| {
                            let a = act.at(k, row, t, col, gi * h);
                            ln.ld(k, a)
                        })
                        .collect();
                    let (i, f, gg, o) = (g[0], g[1], g[2], g[3]);
                    let a = tc.at(k, row, t, col, 0);
                    let tcv = ln.ld(k, a);
                    let a = at_or_zero(k, dc, row, zero, 0, cx.has_next);
                    let dcn = ln.ld(k, a);
                    let a = at_or_zero(k, c, row, cx.tprev, 0, cx.has_prev);
                    let cp = ln.ld(k, a);
                    let (carry, dzs4) = lstm_grads(k, one, dhv, [i, f, gg, o], (tcv, dcn, cp));
                    let a = dc.at(k, row, zero, col, 0);
                    ln.st(k, carry, a);
                    let tp = k.b.ins().band_imm_u(t, 1);
                    for (gi, v) in dzs4.into_iter().enumerate() {
                        let a = dz.at(k, row, t, col, gi * h);
                        ln.st(k, v, a);
                        let a = dzs.at(k, row, tp, col, gi * h);
                        ln.st(k, v, a);
                    }
                };
                (mm, Box::new(epi))
            }
            (
                BoundRec::GruBwd {
                    dh,
                    act,
                    hs,
                    dz,
                    dzs,
                    dhs,
                    dhc,
                },
                0,
            ) => {
                // Phase A: dh_t, then dz_z and dz_h~.
                let np = k.b.ins().band_imm_u(cx.tnext, 1);
                let mm = Mm {
                    run: cx.has_next,
                    a: dzs.row0(k, np, 0),
                    a_rs: dzs.row_bytes(),
                    panel: cx.panel,
                    pstride: 16,
                    kdim: 2 * h,
                    x: None,
                };
                let epi = move |k: &mut Kb, row: Value, acc: &[Value], ln: Lanes| {
                    let zero = k.iconst(0);
                    let one = k.vconst(1.0);
                    let a = dh.at(k, row, t, col, 0);
                    let dhv = ln.ld(k, a);
                    let a = at_or_zero(k, dhc, row, zero, 0, cx.has_next);
                    let carry = ln.ld(k, a);
                    let dhv = k.b.ins().fadd(dhv, acc[0]);
                    let dhv = k.b.ins().fadd(dhv, carry);
                    let a = act.at(k, row, t, col, 0);
                    let zz = ln.ld(k, a);
                    let a = act.at(k, row, t, col, 2 * h);
                    let hc = ln.ld(k, a);
                    let a = at_or_zero(k, hs, row, cx.tprev, 0, cx.has_prev);
                    let hp = ln.ld(k, a);
                    let (dzz, dzc) = gru_update_grads(k, one, dhv, zz, hc, hp);
                    let tp = k.b.ins().band_imm_u(t, 1);
                    for (c0, v) in [(0, dzz), (2 * h, dzc)] {
                        let a = dz.at(k, row, t, col, c0);
                        ln.st(k, v, a);
                        let a = dzs.at(k, row, tp, col, c0);
                        ln.st(k, v, a);
                    }
                    let a = dhs.at(k, row, zero, col, 0);
                    ln.st(k, dhv, a);
                };
                (mm, Box::new(epi))
            }
            (
                BoundRec::GruBwd {
                    act,
                    hs,
                    dz,
                    dzs,
                    dhs,
                    dhc,
                    ..
                },
                _,
            ) => {
                // Phase B: d(r·h_{t-1}) = dz_h~ w_h[:, 2H:]ᵀ, then dz_r and
                // the rest of dh_{t-1}.
                let tp = k.b.ins().band_imm_u(t, 1);
                let mm = Mm {
                    run: cx.has_prev,
                    a: dzs.row0(k, tp, 2 * h),
                    a_rs: dzs.row_bytes(),
                    panel: k.b.ins().iadd_imm_s(cx.panel, (2 * h * 16) as i64),
                    pstride: 16,
                    kdim: h,
                    x: None,
                };
                let epi = move |k: &mut Kb, row: Value, acc: &[Value], ln: Lanes| {
                    let zero = k.iconst(0);
                    let one = k.vconst(1.0);
                    let drh = acc[0];
                    let a = act.at(k, row, t, col, 0);
                    let zz = ln.ld(k, a);
                    let a = act.at(k, row, t, col, h);
                    let rr = ln.ld(k, a);
                    let a = at_or_zero(k, hs, row, cx.tprev, 0, cx.has_prev);
                    let hp = ln.ld(k, a);
                    let a = dhs.at(k, row, zero, col, 0);
                    let dhv = ln.ld(k, a);
                    let (dzr, carry) = gru_reset_grads(k, one, drh, (zz, rr), hp, dhv);
                    let a = dhc.at(k, row, zero, col, 0);
                    ln.st(k, carry, a);
                    let a = dz.at(k, row, t, col, h);
                    ln.st(k, dzr, a);
                    let a = dzs.at(k, row, tp, col, h);
                    ln.st(k, dzr, a);
                };
                (mm, Box::new(epi))
            }
        }
    }
}

/// [`Rec`] with every buffer's address bound in the kernel.
enum BoundRec {
    LstmFwd {
        x: Bound,
        b: Bound,
        hs: Bound,
        st: Bound,
        c: Bound,
        save: Option<(Bound, Bound)>,
    },
    GruFwd {
        x: Bound,
        b: Bound,
        hs: Bound,
        st: Bound,
        act: Bound,
        rh: Bound,
        /// A compact copy of `rh` when `rh` keeps every step.
        rc: Option<Bound>,
    },
    LstmBwd {
        dh: Bound,
        act: Bound,
        c: Bound,
        tc: Bound,
        dz: Bound,
        dzs: Bound,
        dc: Bound,
    },
    GruBwd {
        dh: Bound,
        act: Bound,
        hs: Bound,
        dz: Bound,
        dzs: Bound,
        dhs: Bound,
        dhc: Bound,
    },
}

// The gate arithmetic of the recurrent epilogues, shared by the per-block
// form (which handles a partial block) and the row form: each takes the
// loaded vectors and returns the vectors to store, so both forms compute
// every value with the same operations.

/// σ' from the sigmoid's output `s`: `s·(1 − s)`.
fn dsigmoid(k: &mut Kb, one: Value, s: Value) -> Value {
    let m = k.b.ins().fsub(one, s);
    k.b.ins().fmul(s, m)
}

/// The LSTM cell `c = f·c_{t−1} + i·g`.
fn lstm_cell(k: &mut Kb, (i, f, g): (Value, Value, Value), cp: Value) -> Value {
    let fc = k.b.ins().fmul(f, cp);
    let ig = k.b.ins().fmul(i, g);
    k.b.ins().fadd(fc, ig)
}

/// The GRU state `h = (1 − z)·h_{t−1} + z·h̃`.
fn gru_blend(k: &mut Kb, one: Value, z: Value, hp: Value, hc: Value) -> Value {
    let keep = k.b.ins().fsub(one, z);
    let kh = k.b.ins().fmul(keep, hp);
    let zh = k.b.ins().fmul(z, hc);
    k.b.ins().fadd(kh, zh)
}

/// The GRU's update-gate and candidate pre-activation gradients from
/// `dh_t`: `dz_z = dh·(h̃ − h_{t−1})·σ'(z)`, `dz_h̃ = dh·z·(1 − h̃²)`.
fn gru_update_grads(
    k: &mut Kb,
    one: Value,
    dh: Value,
    z: Value,
    hc: Value,
    hp: Value,
) -> (Value, Value) {
    let sz = dsigmoid(k, one, z);
    let diff = k.b.ins().fsub(hc, hp);
    let dzz = k.b.ins().fmul(dh, diff);
    let dzz = k.b.ins().fmul(dzz, sz);
    let h2 = k.b.ins().fmul(hc, hc);
    let h2 = k.b.ins().fsub(one, h2);
    let dzc = k.b.ins().fmul(dh, z);
    let dzc = k.b.ins().fmul(dzc, h2);
    (dzz, dzc)
}

/// The GRU's reset-gate gradient and the part of `dh_{t−1}` outside the
/// recurrent matmuls, from `drh = d(r·h_{t−1})`: `dz_r = drh·h_{t−1}·σ'(r)`,
/// `dh·(1 − z) + drh·r`.
fn gru_reset_grads(
    k: &mut Kb,
    one: Value,
    drh: Value,
    (z, r): (Value, Value),
    hp: Value,
    dh: Value,
) -> (Value, Value) {
    let sr = dsigmoid(k, one, r);
    let dzr = k.b.ins().fmul(drh, hp);
    let dzr = k.b.ins().fmul(dzr, sr);
    let keep = k.b.ins().fsub(one, z);
    let d1 = k.b.ins().fmul(dh, keep);
    let d2 = k.b.ins().fmul(drh, r);
    let carry = k.b.ins().fadd(d1, d2);
    (dzr, carry)
}

/// The LSTM's gate gradients `[dz_i, dz_f, dz_g, dz_o]` and `dc_t·f` (the
/// cell gradient carried to `t − 1`) from `dh_t`, the gates, `tanh c_t`,
/// the carried `dc_{t+1}·f_{t+1}` and `c_{t−1}`:
/// `dc_t = dh·o·(1 − tanh²c) + dc_next`.
fn lstm_grads(
    k: &mut Kb,
    one: Value,
    dh: Value,
    [i, f, g, o]: [Value; 4],
    (tc, dc_next, cp): (Value, Value, Value),
) -> (Value, [Value; 4]) {
    let t2 = k.b.ins().fmul(tc, tc);
    let t2 = k.b.ins().fsub(one, t2);
    let dho = k.b.ins().fmul(dh, o);
    let dc = k.b.ins().fmul(dho, t2);
    let dc = k.b.ins().fadd(dc, dc_next);
    let so = dsigmoid(k, one, o);
    let dzo = k.b.ins().fmul(dh, tc);
    let dzo = k.b.ins().fmul(dzo, so);
    let si = dsigmoid(k, one, i);
    let dzi = k.b.ins().fmul(dc, g);
    let dzi = k.b.ins().fmul(dzi, si);
    let sf = dsigmoid(k, one, f);
    let dzf = k.b.ins().fmul(dc, cp);
    let dzf = k.b.ins().fmul(dzf, sf);
    let g2 = k.b.ins().fmul(g, g);
    let g2 = k.b.ins().fsub(one, g2);
    let dzg = k.b.ins().fmul(dc, i);
    let dzg = k.b.ins().fmul(dzg, g2);
    let carry = k.b.ins().fmul(dc, f);
    (carry, [dzi, dzf, dzg, dzo])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused step of `lstm_seq` on `x [n, t, f]` with hidden size `h`.
    fn lstm_step(n: usize, t: usize, f: usize, h: usize) -> RnnSeq {
        let ty = |s: Vec<usize>| TensorType::f32(s);
        let ins = [
            ty(vec![n, t, f]),
            ty(vec![f, 4 * h]),
            ty(vec![h, 4 * h]),
            ty(vec![4 * h]),
        ];
        let out = ty(vec![n, t, h]);
        let ins: Vec<(Loc, &TensorType)> = ins
            .iter()
            .enumerate()
            .map(|(i, t)| (Loc::Extern(i), t))
            .collect();
        let lowered =
            lower_forward(true, &ins, &[(Loc::Arena(0), &out)], 4096, false, None).expect("lowers");
        lowered
            .steps
            .into_iter()
            .find_map(|s| match s {
                Step::Rnn(r) => Some(r),
                _ => None,
            })
            .expect("one fused recurrent step")
    }

    /// The shapes of tests/jit_seq.rs reach both ways of running the loop:
    /// one call when small, one row block per chunk when large.
    #[test]
    fn small_loops_run_in_one_call_large_ones_split_by_row_blocks() {
        let small = lstm_step(9, 3, 2, 5);
        assert_eq!(small.units(), 2);
        assert_eq!(small.grain(), 2);
        let large = lstm_step(19, 9, 5, 27);
        assert_eq!(large.units(), 3);
        assert_eq!(large.grain(), 1);
        // The reference workload splits its 16 rows over two threads.
        let bench = lstm_step(16, 32, 64, 128);
        assert_eq!((bench.units(), bench.grain()), (2, 1));
    }
}
