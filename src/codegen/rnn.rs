//! LSTM and GRU over whole sequences (LANGUAGE.md §6) and their BPTT
//! gradients, lowered to the existing kernel steps.
//!
//! The input projection `x @ w_x + b` of all steps is one matmul; the time
//! loop is unrolled into per-step kernels (recurrent matmul against a
//! weight packed once, then the gate math as elementwise steps over strided
//! views), so no step allocates and every intermediate sits in the kernel's
//! scratch region. The gradients recompute the forward pass, keeping every
//! step's activations, run the reverse loop into `dz [N, T, gates·H]`, and
//! then form `dx`, `dw_x`, `dw_h` and `db` as one matmul (or reduction)
//! each over all steps. Every step splits its work by rows or elements
//! with fixed chunks, so results do not depend on the thread count.

use super::emit::Loc;
use super::kernel::{Copy, Elementwise, EwOp, Fill, MatmulPhase, Step, View};
use super::lower::{align64, Lowered};
use super::matmul::{Matmul, MmOperand};
use super::reduce::Reduce;
use crate::ir::{BinaryOp, ReduceOp, TensorType, UnaryOp};

/// Steps of one node under construction, with a bump allocator over the
/// node's scratch region.
pub(crate) struct Build {
    pub steps: Vec<Step>,
    base: usize,
    used: usize,
}

impl Build {
    pub fn new(scratch: usize) -> Build {
        Build {
            steps: Vec::new(),
            base: scratch,
            used: 0,
        }
    }

    /// A scratch buffer of `floats` f32s, 64-byte aligned.
    pub fn alloc(&mut self, floats: usize) -> Loc {
        self.alloc_bytes(floats * 4)
    }

    fn alloc_bytes(&mut self, bytes: usize) -> Loc {
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

    pub fn unary(&mut self, op: UnaryOp, dims: [usize; 2], out: View, a: View) {
        self.ew(EwOp::Unary(op), &dims, out, vec![a]);
    }

    pub fn binary(&mut self, op: BinaryOp, dims: [usize; 2], out: View, a: View, b: View) {
        self.ew(EwOp::Binary(op), &dims, out, vec![a, b]);
    }

    /// An elementwise step over any dims; views carry one stride per dim.
    pub fn ew(&mut self, op: EwOp, dims: &[usize], out: View, ins: Vec<View>) {
        if dims.iter().product::<usize>() == 0 {
            return;
        }
        self.steps.push(Step::Elementwise(Elementwise {
            op,
            dims: dims.to_vec(),
            out,
            ins,
        }));
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

    /// A one-element buffer holding `value`, read through [`bcast`].
    pub fn constant(&mut self, value: f32) -> Loc {
        let l = self.alloc(1);
        self.fill(l, 1, value);
        l
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
        };
        mm.pack_a = self.alloc_bytes(mm.pack_a_bytes());
        mm.pack_b = self.alloc_bytes(mm.pack_b_bytes());
        self.steps.push(Step::Matmul(mm.clone(), MatmulPhase::PackB));
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
    pub fn matmul(&mut self, batch: Vec<usize>, mkn: (usize, usize, usize), a: MmOperand, b: MmOperand, c: Loc) {
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

/// A one-element buffer broadcast over a `[rows, cols]` step.
pub(crate) fn bcast(loc: Loc) -> View {
    View {
        loc,
        off: 0,
        strides: vec![0, 0],
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
    let (rs, cs) = if transposed { (1, cols as i64) } else { (cols as i64, 1) };
    MmOperand {
        loc,
        off,
        batch_strides: vec![],
        rs,
        cs,
    }
}

/// A `[N, slots, width]` buffer holding one `[N, width]` matrix per time
/// step; step `t` lives in slot `t % slots` (a ring when fewer slots than
/// steps are kept).
#[derive(Clone, Copy, Debug)]
struct Seq {
    loc: Loc,
    slots: usize,
    width: usize,
}

impl Seq {
    fn new(b: &mut Build, n: usize, slots: usize, width: usize) -> Seq {
        Seq {
            loc: b.alloc(n * slots * width),
            slots,
            width,
        }
    }

    /// Columns `c0..` of step `t` as a `[N, w]` view.
    fn at(&self, t: usize, c0: usize) -> View {
        View {
            loc: self.loc,
            off: (t % self.slots) * self.width + c0,
            strides: vec![(self.slots * self.width) as i64, 1],
        }
    }

    /// Columns `c0..` of step `t` as a matmul A operand.
    fn a(&self, t: usize, c0: usize) -> MmOperand {
        MmOperand {
            loc: self.loc,
            off: (t % self.slots) * self.width + c0,
            batch_strides: vec![],
            rs: (self.slots * self.width) as i64,
            cs: 1,
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

/// `xw [N, T, G] = x @ w_x + b`, one matmul over all steps.
fn input_projection(bd: &mut Build, d: Dims, w: &Weights) -> Seq {
    let g = d.g();
    let xw = Seq::new(bd, d.n, d.t, g);
    bd.matmul(
        vec![],
        (d.n * d.t, d.f, g),
        operand(w.x, 0, d.f, false),
        operand(w.wx, 0, g, false),
        xw.loc,
    );
    let bias = View {
        loc: w.b,
        off: 0,
        strides: vec![0, 1],
    };
    bd.binary(BinaryOp::Add, [d.n * d.t, g], mat(xw.loc, g), mat(xw.loc, g), bias);
    xw
}

/// What the LSTM forward pass keeps: activated gates `(i, f, g, o)`, cell
/// states, their tanh, and hidden states.
struct LstmState {
    act: Seq,
    c: Seq,
    tc: Seq,
    hs: Seq,
}

/// The LSTM forward pass; `hs` receives the hidden states. With `keep`,
/// every step's activations are kept for the gradient.
fn lstm_forward(bd: &mut Build, d: Dims, w: &Weights, hs: Seq, keep: bool) -> LstmState {
    let (n, h, g) = (d.n, d.h, d.g());
    let xw = input_projection(bd, d, w);
    let slots = if keep { d.t } else { 1 };
    let act = Seq::new(bd, n, slots, g);
    let c = Seq::new(bd, n, if keep { d.t } else { 2 }, h);
    let tc = Seq::new(bd, n, slots, h);
    let tmp = bd.alloc(n * h);
    let rec = bd.alloc(n * g);
    let wh = (d.t > 1).then(|| bd.prepack(vec![], (n, h, g), hs.a(0, 0), operand(w.wh, 0, g, false)));
    let dh = [n, h];
    for t in 0..d.t {
        // Pre-activations: at t = 0, h_{-1} = 0 leaves only x w_x + b.
        let z = match &wh {
            Some(mm) if t > 0 => {
                bd.run_packed(mm, hs.a(t - 1, 0), rec);
                bd.binary(BinaryOp::Add, [n, g], act.at(t, 0), mat(rec, g), xw.at(t, 0));
                act
            }
            _ => xw,
        };
        bd.unary(UnaryOp::Sigmoid, [n, 2 * h], act.at(t, 0), z.at(t, 0));
        bd.unary(UnaryOp::Tanh, dh, act.at(t, 2 * h), z.at(t, 2 * h));
        bd.unary(UnaryOp::Sigmoid, dh, act.at(t, 3 * h), z.at(t, 3 * h));
        let (gi, gf, gg, go) = (act.at(t, 0), act.at(t, h), act.at(t, 2 * h), act.at(t, 3 * h));
        // c_t = f·c_{t-1} + i·g
        if t == 0 {
            bd.binary(BinaryOp::Mul, dh, c.at(t, 0), gi, gg);
        } else {
            bd.binary(BinaryOp::Mul, dh, mat(tmp, h), gi, gg);
            bd.binary(BinaryOp::Mul, dh, c.at(t, 0), gf, c.at(t - 1, 0));
            bd.binary(BinaryOp::Add, dh, c.at(t, 0), c.at(t, 0), mat(tmp, h));
        }
        // h_t = o·tanh(c_t)
        bd.unary(UnaryOp::Tanh, dh, tc.at(t, 0), c.at(t, 0));
        bd.binary(BinaryOp::Mul, dh, hs.at(t, 0), go, tc.at(t, 0));
    }
    LstmState { act, c, tc, hs }
}

/// What the GRU forward pass keeps: activated gates `(z, r, h~)`, the
/// reset hidden states `r·h_{t-1}`, and hidden states.
struct GruState {
    act: Seq,
    rh: Seq,
    hs: Seq,
}

fn gru_forward(bd: &mut Build, d: Dims, w: &Weights, hs: Seq, keep: bool) -> GruState {
    let (n, h, g) = (d.n, d.h, d.g());
    let xw = input_projection(bd, d, w);
    let slots = if keep { d.t } else { 1 };
    let act = Seq::new(bd, n, slots, g);
    let rh = Seq::new(bd, n, slots, h);
    let t1 = bd.alloc(n * h);
    let t2 = bd.alloc(n * h);
    let rec = bd.alloc(n * 2 * h);
    let one = bd.constant(1.0);
    let packed = (d.t > 1).then(|| {
        let zr = bd.prepack(vec![], (n, h, 2 * h), hs.a(0, 0), operand(w.wh, 0, g, false));
        let cand = bd.prepack(vec![], (n, h, h), rh.a(0, 0), operand(w.wh, 2 * h, g, false));
        (zr, cand)
    });
    if keep {
        // r·h_{-1} = 0 for the dw_h of the candidate block.
        bd.fill(rh.loc, n * slots * h, 0.0);
    }
    let dh = [n, h];
    for t in 0..d.t {
        let (gz, gr, gc) = (act.at(t, 0), act.at(t, h), act.at(t, 2 * h));
        match &packed {
            Some((zr, cand)) if t > 0 => {
                bd.run_packed(zr, hs.a(t - 1, 0), rec);
                bd.binary(BinaryOp::Add, [n, 2 * h], gz.clone(), mat(rec, 2 * h), xw.at(t, 0));
                bd.unary(UnaryOp::Sigmoid, [n, 2 * h], gz.clone(), gz.clone());
                // The reset gate applies before the recurrent matmul.
                bd.binary(BinaryOp::Mul, dh, rh.at(t, 0), gr, hs.at(t - 1, 0));
                bd.run_packed(cand, rh.a(t, 0), rec);
                bd.binary(BinaryOp::Add, dh, gc.clone(), mat(rec, h), xw.at(t, 2 * h));
                bd.unary(UnaryOp::Tanh, dh, gc.clone(), gc.clone());
                // h_t = (1 − z)·h_{t−1} + z·h~
                bd.binary(BinaryOp::Sub, dh, mat(t1, h), bcast(one), gz.clone());
                bd.binary(BinaryOp::Mul, dh, mat(t1, h), mat(t1, h), hs.at(t - 1, 0));
                bd.binary(BinaryOp::Mul, dh, mat(t2, h), gz, gc);
                bd.binary(BinaryOp::Add, dh, hs.at(t, 0), mat(t1, h), mat(t2, h));
            }
            _ => {
                bd.unary(UnaryOp::Sigmoid, [n, 2 * h], gz.clone(), xw.at(t, 0));
                bd.unary(UnaryOp::Tanh, dh, gc.clone(), xw.at(t, 2 * h));
                bd.binary(BinaryOp::Mul, dh, hs.at(t, 0), gz, gc);
            }
        }
    }
    GruState { act, rh, hs }
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
) -> Option<Lowered> {
    let d = Dims::of(ins, if lstm { 4 } else { 3 })?;
    let w = weights(ins)?;
    let hs = Seq {
        loc: outs.first()?.0,
        slots: d.t,
        width: d.h,
    };
    let mut bd = Build::new(scratch);
    if lstm {
        lstm_forward(&mut bd, d, &w, hs, false);
    } else {
        gru_forward(&mut bd, d, &w, hs, false);
    }
    Some(bd.finish())
}

/// The gradient's outputs and the steps shared by LSTM and GRU after the
/// reverse loop: `dx = dz w_xᵀ`, `dw_x = xᵀ dz`, `db = Σ dz`.
fn input_grads(bd: &mut Build, d: Dims, w: &Weights, dz: Seq, dx: Loc, dwx: Loc, db: Loc) {
    let (rows, g) = (d.n * d.t, d.g());
    bd.matmul(vec![], (rows, g, d.f), operand(dz.loc, 0, g, false), operand(w.wx, 0, g, true), dx);
    bd.matmul(vec![], (d.f, rows, g), operand(w.x, 0, d.f, true), operand(dz.loc, 0, g, false), dwx);
    bd.reduce_sum(dz.loc, db, (g, 1), (rows, g as i64));
}

/// `hp [N, T, H]` with `hp_t = h_{t-1}` and `hp_0 = 0`, for `dw_h`.
fn shifted_hidden(bd: &mut Build, d: Dims, hs: Seq) -> Loc {
    let (n, t, h) = (d.n, d.t, d.h);
    let hp = bd.alloc(n * t * h);
    bd.fill(hp, n * t * h, 0.0);
    let s = vec![(t * h) as i64, h as i64, 1];
    bd.copy(
        vec![n, t - 1, h],
        View {
            loc: hs.loc,
            off: 0,
            strides: s.clone(),
        },
        View {
            loc: hp,
            off: h,
            strides: s,
        },
    );
    hp
}

fn lstm_grad(bd: &mut Build, d: Dims, w: &Weights, dh_in: Loc, outs: [Loc; 4]) {
    let (n, h, g, tt) = (d.n, d.h, d.g(), d.t);
    let hs = Seq::new(bd, n, tt, h);
    let st = lstm_forward(bd, d, w, hs, true);
    let dz = Seq::new(bd, n, tt, g);
    let dh_out = Seq {
        loc: dh_in,
        slots: tt,
        width: h,
    };
    let one = bd.constant(1.0);
    let zero = bd.constant(0.0);
    let dht_buf = bd.alloc(n * h);
    let dhn = bd.alloc(n * h);
    let dc_buf = bd.alloc(n * h);
    let dcn = bd.alloc(n * h);
    let t1 = mat(bd.alloc(n * h), h);
    let t2 = mat(bd.alloc(n * h), h);
    // dh_{t-1} = dz_t @ w_hᵀ, w_hᵀ packed once.
    let wh_t = (tt > 1).then(|| bd.prepack(vec![], (n, g, h), dz.a(0, 0), operand(w.wh, 0, g, true)));
    let dh = [n, h];
    let (mul, sub, add) = (BinaryOp::Mul, BinaryOp::Sub, BinaryOp::Add);
    for t in (0..tt).rev() {
        let (gi, gf, gg, go) = (st.act.at(t, 0), st.act.at(t, h), st.act.at(t, 2 * h), st.act.at(t, 3 * h));
        let tc = st.tc.at(t, 0);
        let last = t + 1 == tt;
        // dh_t from the output plus from step t+1.
        let dht = if last {
            dh_out.at(t, 0)
        } else {
            bd.binary(add, dh, mat(dht_buf, h), dh_out.at(t, 0), mat(dhn, h));
            mat(dht_buf, h)
        };
        // h = o·tanh(c): dz_o = dh·tanh(c)·o·(1 − o)
        bd.binary(mul, dh, t1.clone(), dht.clone(), tc.clone());
        bd.binary(sub, dh, t2.clone(), bcast(one), go.clone());
        bd.binary(mul, dh, t2.clone(), t2.clone(), go.clone());
        bd.binary(mul, dh, dz.at(t, 3 * h), t1.clone(), t2.clone());
        // dc = dh·o·(1 − tanh²c) + dc_{t+1}
        bd.binary(mul, dh, t1.clone(), tc.clone(), tc);
        bd.binary(sub, dh, t1.clone(), bcast(one), t1.clone());
        bd.binary(mul, dh, t1.clone(), t1.clone(), go);
        bd.binary(mul, dh, t1.clone(), t1.clone(), dht);
        let dc = if last {
            t1.clone()
        } else {
            bd.binary(add, dh, mat(dc_buf, h), t1.clone(), mat(dcn, h));
            mat(dc_buf, h)
        };
        // c = f·c_{t-1} + i·g
        bd.binary(sub, dh, t2.clone(), bcast(one), gi.clone());
        bd.binary(mul, dh, t2.clone(), t2.clone(), gi.clone());
        bd.binary(mul, dh, t2.clone(), t2.clone(), gg.clone());
        bd.binary(mul, dh, dz.at(t, 0), t2.clone(), dc.clone());
        if t > 0 {
            bd.binary(sub, dh, t2.clone(), bcast(one), gf.clone());
            bd.binary(mul, dh, t2.clone(), t2.clone(), gf.clone());
            bd.binary(mul, dh, t2.clone(), t2.clone(), st.c.at(t - 1, 0));
            bd.binary(mul, dh, dz.at(t, h), t2.clone(), dc.clone());
        } else {
            bd.copy(dh.to_vec(), bcast(zero), dz.at(t, h));
        }
        bd.binary(mul, dh, t2.clone(), gg.clone(), gg);
        bd.binary(sub, dh, t2.clone(), bcast(one), t2.clone());
        bd.binary(mul, dh, t2.clone(), t2.clone(), gi);
        bd.binary(mul, dh, dz.at(t, 2 * h), t2.clone(), dc.clone());
        if t > 0 {
            bd.binary(mul, dh, mat(dcn, h), dc, gf);
            if let Some(mm) = &wh_t {
                bd.run_packed(mm, dz.a(t, 0), dhn);
            }
        }
    }
    let [dx, dwx, dwh, db] = outs;
    input_grads(bd, d, w, dz, dx, dwx, db);
    let hp = shifted_hidden(bd, d, st.hs);
    bd.matmul(vec![], (h, n * tt, g), operand(hp, 0, h, true), operand(dz.loc, 0, g, false), dwh);
}

fn gru_grad(bd: &mut Build, d: Dims, w: &Weights, dh_in: Loc, outs: [Loc; 4]) {
    let (n, h, g, tt) = (d.n, d.h, d.g(), d.t);
    let hs = Seq::new(bd, n, tt, h);
    let st = gru_forward(bd, d, w, hs, true);
    let dz = Seq::new(bd, n, tt, g);
    let dh_out = Seq {
        loc: dh_in,
        slots: tt,
        width: h,
    };
    let one = bd.constant(1.0);
    let zero = bd.constant(0.0);
    let dht_buf = bd.alloc(n * h);
    let dhn = bd.alloc(n * h);
    let drh = bd.alloc(n * h);
    let m = bd.alloc(n * h);
    let t1 = mat(bd.alloc(n * h), h);
    let t2 = mat(bd.alloc(n * h), h);
    // d(r·h_{t-1}) = dz_h~ @ w_h[:, 2H:]ᵀ and the (z, r) part of dh_{t-1}
    // = dz_{z,r} @ w_h[:, :2H]ᵀ, both weights packed once.
    let packed = (tt > 1).then(|| {
        let cand = bd.prepack(vec![], (n, h, h), dz.a(0, 2 * h), operand(w.wh, 2 * h, g, true));
        let zr = bd.prepack(vec![], (n, 2 * h, h), dz.a(0, 0), operand(w.wh, 0, g, true));
        (cand, zr)
    });
    let dh = [n, h];
    let (mul, sub, add) = (BinaryOp::Mul, BinaryOp::Sub, BinaryOp::Add);
    for t in (0..tt).rev() {
        let (gz, gr, gc) = (st.act.at(t, 0), st.act.at(t, h), st.act.at(t, 2 * h));
        let hp = if t > 0 { st.hs.at(t - 1, 0) } else { bcast(zero) };
        let dht = if t + 1 == tt {
            dh_out.at(t, 0)
        } else {
            bd.binary(add, dh, mat(dht_buf, h), dh_out.at(t, 0), mat(dhn, h));
            mat(dht_buf, h)
        };
        // h_t = (1 − z)·h_{t−1} + z·h~
        bd.binary(sub, dh, t1.clone(), gc.clone(), hp.clone());
        bd.binary(mul, dh, t1.clone(), t1.clone(), dht.clone());
        bd.binary(sub, dh, t2.clone(), bcast(one), gz.clone());
        bd.binary(mul, dh, t2.clone(), t2.clone(), gz.clone());
        bd.binary(mul, dh, dz.at(t, 0), t1.clone(), t2.clone());
        bd.binary(mul, dh, t1.clone(), gc.clone(), gc);
        bd.binary(sub, dh, t1.clone(), bcast(one), t1.clone());
        bd.binary(mul, dh, t1.clone(), t1.clone(), gz.clone());
        bd.binary(mul, dh, dz.at(t, 2 * h), t1.clone(), dht.clone());
        match &packed {
            Some((cand, zr)) if t > 0 => {
                bd.run_packed(cand, dz.a(t, 2 * h), drh);
                bd.binary(sub, dh, t1.clone(), bcast(one), gr.clone());
                bd.binary(mul, dh, t1.clone(), t1.clone(), gr.clone());
                bd.binary(mul, dh, t1.clone(), t1.clone(), hp);
                bd.binary(mul, dh, dz.at(t, h), t1.clone(), mat(drh, h));
                bd.run_packed(zr, dz.a(t, 0), m);
                bd.binary(sub, dh, t1.clone(), bcast(one), gz);
                bd.binary(mul, dh, t1.clone(), t1.clone(), dht);
                bd.binary(mul, dh, t2.clone(), mat(drh, h), gr);
                bd.binary(add, dh, t1.clone(), t1.clone(), t2.clone());
                bd.binary(add, dh, mat(dhn, h), t1.clone(), mat(m, h));
            }
            // h_{-1} = 0: no reset-gate gradient, nothing flows further back.
            _ => bd.copy(dh.to_vec(), bcast(zero), dz.at(t, h)),
        }
    }
    let [dx, dwx, dwh, db] = outs;
    input_grads(bd, d, w, dz, dx, dwx, db);
    // dw_h[:, :2H] = hpᵀ dz_{z,r}, dw_h[:, 2H:] = (r·h_{t-1})ᵀ dz_h~, each
    // computed contiguously, then placed in its column block.
    let hp = shifted_hidden(bd, d, st.hs);
    let rows = n * tt;
    let w_zr = bd.alloc(h * 2 * h);
    let w_c = bd.alloc(h * h);
    bd.matmul(vec![], (h, rows, 2 * h), operand(hp, 0, h, true), operand(dz.loc, 0, g, false), w_zr);
    let dz_c = operand(dz.loc, 2 * h, g, false);
    bd.matmul(vec![], (h, rows, h), operand(st.rh.loc, 0, h, true), dz_c, w_c);
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
pub fn lower_grad(
    lstm: bool,
    ins: &[(Loc, &TensorType)],
    outs: &[(Loc, &TensorType)],
    scratch: usize,
) -> Option<Lowered> {
    let d = Dims::of(ins, if lstm { 4 } else { 3 })?;
    let w = weights(ins)?;
    let dh = ins.get(4)?.0;
    let o = [outs.first()?.0, outs.get(1)?.0, outs.get(2)?.0, outs.get(3)?.0];
    let mut bd = Build::new(scratch);
    if lstm {
        lstm_grad(&mut bd, d, &w, dh, o);
    } else {
        gru_grad(&mut bd, d, &w, dh, o);
    }
    Some(bd.finish())
}
