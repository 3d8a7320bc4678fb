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
    bd.binary(
        BinaryOp::Add,
        [d.n * d.t, g],
        mat(xw.loc, g),
        mat(xw.loc, g),
        bias,
    );
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
    let wh =
        (d.t > 1).then(|| bd.prepack(vec![], (n, h, g), hs.a(0, 0), operand(w.wh, 0, g, false)));
    let dh = [n, h];
    for t in 0..d.t {
        // Pre-activations: at t = 0, h_{-1} = 0 leaves only x w_x + b.
        let z = match &wh {
            Some(mm) if t > 0 => {
                bd.run_packed(mm, hs.a(t - 1, 0), rec);
                bd.binary(BinaryOp::Add, [n, g], mat(rec, g), mat(rec, g), xw.at(t, 0));
                mat(rec, g)
            }
            _ => xw.at(t, 0),
        };
        // σ over all four blocks (one step), then g's block redone as tanh.
        let zg = View {
            off: z.off + 2 * h,
            ..z.clone()
        };
        bd.unary(UnaryOp::Sigmoid, [n, g], act.at(t, 0), z);
        bd.unary(UnaryOp::Tanh, dh, act.at(t, 2 * h), zg);
        let (gi, gf, gg, go) = (
            act.at(t, 0),
            act.at(t, h),
            act.at(t, 2 * h),
            act.at(t, 3 * h),
        );
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
        let zr = bd.prepack(
            vec![],
            (n, h, 2 * h),
            hs.a(0, 0),
            operand(w.wh, 0, g, false),
        );
        let cand = bd.prepack(
            vec![],
            (n, h, h),
            rh.a(0, 0),
            operand(w.wh, 2 * h, g, false),
        );
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
                bd.binary(
                    BinaryOp::Add,
                    [n, 2 * h],
                    gz.clone(),
                    mat(rec, 2 * h),
                    xw.at(t, 0),
                );
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
    bd.matmul(
        vec![],
        (rows, g, d.f),
        operand(dz.loc, 0, g, false),
        operand(w.wx, 0, g, true),
        dx,
    );
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

/// Columns `c0..` of every step of a `[N, T, width]` buffer as one
/// `[N·T, w]` view.
fn all_steps(loc: Loc, width: usize, c0: usize) -> View {
    View {
        loc,
        off: c0,
        strides: vec![width as i64, 1],
    }
}

/// Blocks `c0, c0 + step, …` (`blocks` of them, `h` wide) of step `t` as a
/// `[N, blocks, h]` view.
fn blocks(s: Seq, t: usize, c0: usize, step: usize) -> View {
    View {
        loc: s.loc,
        off: (t % s.slots) * s.width + c0,
        strides: vec![(s.slots * s.width) as i64, step as i64, 1],
    }
}

/// A `[N, h]` matrix repeated over the middle dim of a `[N, blocks, h]`
/// step.
fn repeated(v: &View) -> View {
    View {
        loc: v.loc,
        off: v.off,
        strides: vec![v.strides[0], 0, 1],
    }
}

/// LSTM BPTT. Everything that only depends on forward values is computed
/// for all steps before the loop, as coefficients `a [N, T, 4H]` with
/// `dz_{i,f,g} = dc · a_{i,f,g}` and `dz_o = dh · a_o`, and `a_c` with
/// `dc = dh · a_c + dc_{t+1}`; the loop then only carries `dh` and `dc`.
fn lstm_grad(bd: &mut Build, d: Dims, w: &Weights, dh_in: Loc, outs: [Loc; 4]) {
    let (n, h, g, tt) = (d.n, d.h, d.g(), d.t);
    let hs = Seq::new(bd, n, tt, h);
    let st = lstm_forward(bd, d, w, hs, true);
    let (mul, sub, add) = (BinaryOp::Mul, BinaryOp::Sub, BinaryOp::Add);
    let one = bd.constant(1.0);
    let rows = [n * tt, h];
    let act = |c0: usize| all_steps(st.act.loc, g, c0);
    let (gi, gf, gg, go) = (act(0), act(h), act(2 * h), act(3 * h));
    let tc = all_steps(st.tc.loc, h, 0);
    let cp = all_steps(shifted(bd, d, st.c), h, 0);
    let coef = Seq::new(bd, n, tt, g);
    let ac = Seq::new(bd, n, tt, h);
    let tmp = all_steps(bd.alloc(n * tt * h), h, 0);
    let a = |c0: usize| all_steps(coef.loc, g, c0);
    // h = o·tanh(c): a_o = tanh(c)·o·(1 − o), a_c = o·(1 − tanh²c)
    bd.binary(sub, rows, tmp.clone(), bcast(one), go.clone());
    bd.binary(mul, rows, tmp.clone(), tmp.clone(), go.clone());
    bd.binary(mul, rows, a(3 * h), tmp.clone(), tc.clone());
    bd.binary(mul, rows, tmp.clone(), tc.clone(), tc);
    bd.binary(sub, rows, tmp.clone(), bcast(one), tmp.clone());
    bd.binary(mul, rows, all_steps(ac.loc, h, 0), tmp.clone(), go);
    // c = f·c_{t-1} + i·g: a_i = g·i·(1 − i), a_f = c_{t-1}·f·(1 − f),
    // a_g = i·(1 − g²)
    bd.binary(sub, rows, tmp.clone(), bcast(one), gi.clone());
    bd.binary(mul, rows, tmp.clone(), tmp.clone(), gi.clone());
    bd.binary(mul, rows, a(0), tmp.clone(), gg.clone());
    bd.binary(sub, rows, tmp.clone(), bcast(one), gf.clone());
    bd.binary(mul, rows, tmp.clone(), tmp.clone(), gf);
    bd.binary(mul, rows, a(h), tmp.clone(), cp);
    bd.binary(mul, rows, tmp.clone(), gg.clone(), gg);
    bd.binary(sub, rows, tmp.clone(), bcast(one), tmp.clone());
    bd.binary(mul, rows, a(2 * h), tmp, gi);

    let dz = Seq::new(bd, n, tt, g);
    let dh_out = Seq {
        loc: dh_in,
        slots: tt,
        width: h,
    };
    let dht_buf = mat(bd.alloc(n * h), h);
    let dhn = bd.alloc(n * h);
    let dc = mat(bd.alloc(n * h), h);
    let dcn = mat(bd.alloc(n * h), h);
    // dh_{t-1} = dz_t @ w_hᵀ, w_hᵀ packed once.
    let wh_t =
        (tt > 1).then(|| bd.prepack(vec![], (n, g, h), dz.a(0, 0), operand(w.wh, 0, g, true)));
    let dh = [n, h];
    for t in (0..tt).rev() {
        let last = t + 1 == tt;
        let dht = if last {
            dh_out.at(t, 0)
        } else {
            bd.binary(add, dh, dht_buf.clone(), dh_out.at(t, 0), mat(dhn, h));
            dht_buf.clone()
        };
        bd.binary(mul, dh, dc.clone(), dht.clone(), ac.at(t, 0));
        if !last {
            bd.binary(add, dh, dc.clone(), dc.clone(), dcn.clone());
        }
        let three = blocks(coef, t, 0, h);
        bd.ew(
            EwOp::Binary(mul),
            &[n, 3, h],
            blocks(dz, t, 0, h),
            vec![three, repeated(&dc)],
        );
        bd.binary(mul, dh, dz.at(t, 3 * h), coef.at(t, 3 * h), dht);
        if t > 0 {
            bd.binary(mul, dh, dcn.clone(), dc.clone(), st.act.at(t, h));
            if let Some(mm) = &wh_t {
                bd.run_packed(mm, dz.a(t, 0), dhn);
            }
        }
    }
    let [dx, dwx, dwh, db] = outs;
    input_grads(bd, d, w, dz, dx, dwx, db);
    let hp = shifted(bd, d, st.hs);
    bd.matmul(
        vec![],
        (h, n * tt, g),
        operand(hp, 0, h, true),
        operand(dz.loc, 0, g, false),
        dwh,
    );
}

/// GRU BPTT, with the coefficients of forward values hoisted out of the
/// loop: `dz_z = dh · (h~ − h_{t-1})·z·(1 − z)`, `dz_h~ = dh · z·(1 − h~²)`,
/// `dz_r = d(r·h_{t-1}) · h_{t-1}·r·(1 − r)`.
fn gru_grad(bd: &mut Build, d: Dims, w: &Weights, dh_in: Loc, outs: [Loc; 4]) {
    let (n, h, g, tt) = (d.n, d.h, d.g(), d.t);
    let hs = Seq::new(bd, n, tt, h);
    let st = gru_forward(bd, d, w, hs, true);
    let (mul, sub, add) = (BinaryOp::Mul, BinaryOp::Sub, BinaryOp::Add);
    let one = bd.constant(1.0);
    let zero = bd.constant(0.0);
    let rows = [n * tt, h];
    let act = |c0: usize| all_steps(st.act.loc, g, c0);
    let (gz, gr, gc) = (act(0), act(h), act(2 * h));
    let hp_all = shifted(bd, d, st.hs);
    let hp = all_steps(hp_all, h, 0);
    let coef = Seq::new(bd, n, tt, g);
    let keep = Seq::new(bd, n, tt, h);
    let tmp = all_steps(bd.alloc(n * tt * h), h, 0);
    let tmp2 = all_steps(bd.alloc(n * tt * h), h, 0);
    let a = |c0: usize| all_steps(coef.loc, g, c0);
    // h_t = (1 − z)·h_{t−1} + z·h~
    bd.binary(sub, rows, all_steps(keep.loc, h, 0), bcast(one), gz.clone());
    bd.binary(sub, rows, tmp.clone(), gc.clone(), hp.clone());
    bd.binary(
        mul,
        rows,
        tmp2.clone(),
        all_steps(keep.loc, h, 0),
        gz.clone(),
    );
    bd.binary(mul, rows, a(0), tmp.clone(), tmp2.clone());
    bd.binary(mul, rows, tmp.clone(), gc.clone(), gc);
    bd.binary(sub, rows, tmp.clone(), bcast(one), tmp.clone());
    bd.binary(mul, rows, a(2 * h), tmp.clone(), gz);
    bd.binary(sub, rows, tmp.clone(), bcast(one), gr.clone());
    bd.binary(mul, rows, tmp.clone(), tmp.clone(), gr);
    bd.binary(mul, rows, a(h), tmp, hp);

    let dz = Seq::new(bd, n, tt, g);
    let dh_out = Seq {
        loc: dh_in,
        slots: tt,
        width: h,
    };
    let dht_buf = mat(bd.alloc(n * h), h);
    let dhn = mat(bd.alloc(n * h), h);
    let drh = bd.alloc(n * h);
    let m = bd.alloc(n * h);
    let t2 = mat(bd.alloc(n * h), h);
    // d(r·h_{t-1}) = dz_h~ @ w_h[:, 2H:]ᵀ and the (z, r) part of dh_{t-1}
    // = dz_{z,r} @ w_h[:, :2H]ᵀ, both weights packed once.
    let packed = (tt > 1).then(|| {
        let cand = bd.prepack(
            vec![],
            (n, h, h),
            dz.a(0, 2 * h),
            operand(w.wh, 2 * h, g, true),
        );
        let zr = bd.prepack(vec![], (n, 2 * h, h), dz.a(0, 0), operand(w.wh, 0, g, true));
        (cand, zr)
    });
    let dh = [n, h];
    for t in (0..tt).rev() {
        let dht = if t + 1 == tt {
            dh_out.at(t, 0)
        } else {
            bd.binary(add, dh, dht_buf.clone(), dh_out.at(t, 0), dhn.clone());
            dht_buf.clone()
        };
        // dz_z and dz_h~ (blocks 0 and 2) in one step.
        bd.ew(
            EwOp::Binary(mul),
            &[n, 2, h],
            blocks(dz, t, 0, 2 * h),
            vec![blocks(coef, t, 0, 2 * h), repeated(&dht)],
        );
        match &packed {
            Some((cand, zr)) if t > 0 => {
                bd.run_packed(cand, dz.a(t, 2 * h), drh);
                bd.binary(mul, dh, dz.at(t, h), coef.at(t, h), mat(drh, h));
                bd.run_packed(zr, dz.a(t, 0), m);
                // dh_{t-1} = dh·(1 − z) + d(r·h_{t-1})·r + dz_{z,r} w_hᵀ
                bd.binary(mul, dh, dhn.clone(), dht, keep.at(t, 0));
                bd.binary(mul, dh, t2.clone(), mat(drh, h), st.act.at(t, h));
                bd.binary(add, dh, dhn.clone(), dhn.clone(), t2.clone());
                bd.binary(add, dh, dhn.clone(), dhn.clone(), mat(m, h));
            }
            // h_{-1} = 0: no reset-gate gradient, nothing flows further back.
            _ => bd.copy(dh.to_vec(), bcast(zero), dz.at(t, h)),
        }
    }
    let [dx, dwx, dwh, db] = outs;
    input_grads(bd, d, w, dz, dx, dwx, db);
    // dw_h[:, :2H] = hpᵀ dz_{z,r}, dw_h[:, 2H:] = (r·h_{t-1})ᵀ dz_h~, each
    // computed contiguously, then placed in its column block.
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
    let dz_c = operand(dz.loc, 2 * h, g, false);
    bd.matmul(
        vec![],
        (h, rows, h),
        operand(st.rh.loc, 0, h, true),
        dz_c,
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
pub fn lower_grad(
    lstm: bool,
    ins: &[(Loc, &TensorType)],
    outs: &[(Loc, &TensorType)],
    scratch: usize,
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
    if lstm {
        lstm_grad(&mut bd, d, &w, dh, o);
    } else {
        gru_grad(&mut bd, d, &w, dh, o);
    }
    Some(bd.finish())
}
