//! LSTM and GRU over a whole sequence (LANGUAGE.md §6), and their gradients
//! by backpropagation through time.
//!
//! The gradients recompute the forward pass and keep every step's gates; the
//! backward loop then mirrors the forward formulas line by line in reverse.

use super::{floats, Array, InterpError};

/// The operands of a recurrent op, flattened row-major:
/// `x [n, t, f]`, `wx [f, g·h]`, `wh [h, g·h]`, `b [g·h]`.
struct Seq<'a> {
    x: &'a [f64],
    wx: &'a [f64],
    wh: &'a [f64],
    b: &'a [f64],
    n: usize,
    t: usize,
    f: usize,
    h: usize,
}

impl<'a> Seq<'a> {
    fn new(ins: &[&'a Array], op: &'static str) -> Result<Seq<'a>, InterpError> {
        let (x, wh) = (ins[0], ins[2]);
        Ok(Seq {
            x: floats(op, 0, x)?,
            wx: floats(op, 1, ins[1])?,
            wh: floats(op, 2, wh)?,
            b: floats(op, 3, ins[3])?,
            n: x.shape[0],
            t: x.shape[1],
            f: x.shape[2],
            h: wh.shape[0],
        })
    }

    fn x(&self, n: usize, t: usize, f: usize) -> f64 {
        self.x[(n * self.t + t) * self.f + f]
    }

    /// The column of unit `j` of gate block `gate` in `w_x`, `w_h` and `b`.
    fn col(&self, gate: usize, j: usize) -> usize {
        gate * self.h + j
    }
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

// ---------------------------------------------------------------- LSTM ----

/// Everything the LSTM computes at one step, per batch row: `[n·h]` each.
struct LstmStep {
    i: Vec<f64>,
    f: Vec<f64>,
    g: Vec<f64>,
    o: Vec<f64>,
    c: Vec<f64>,
    h: Vec<f64>,
}

/// The forward pass; `steps[t]` holds step t, `h_{-1} = c_{-1} = 0`.
fn lstm_forward(s: &Seq) -> Vec<LstmStep> {
    let (n, h) = (s.n, s.h);
    let gh = 4 * h;
    let mut steps: Vec<LstmStep> = Vec::with_capacity(s.t);
    for t in 0..s.t {
        let zero = vec![0.0; n * h];
        let (h_prev, c_prev) = match steps.last() {
            Some(p) => (p.h.clone(), p.c.clone()),
            None => (zero.clone(), zero),
        };
        let mut st = LstmStep {
            i: vec![0.0; n * h],
            f: vec![0.0; n * h],
            g: vec![0.0; n * h],
            o: vec![0.0; n * h],
            c: vec![0.0; n * h],
            h: vec![0.0; n * h],
        };
        for r in 0..n {
            // z = x_t @ w_x + h_{t-1} @ w_h + b, blocks i f g o.
            let mut z = vec![0.0; gh];
            for (col, zc) in z.iter_mut().enumerate() {
                let mut acc = s.b[col];
                for k in 0..s.f {
                    acc += s.x(r, t, k) * s.wx[k * gh + col];
                }
                for k in 0..h {
                    acc += h_prev[r * h + k] * s.wh[k * gh + col];
                }
                *zc = acc;
            }
            for j in 0..h {
                let at = r * h + j;
                st.i[at] = sigmoid(z[s.col(0, j)]);
                st.f[at] = sigmoid(z[s.col(1, j)]);
                st.g[at] = z[s.col(2, j)].tanh();
                st.o[at] = sigmoid(z[s.col(3, j)]);
                st.c[at] = st.f[at] * c_prev[at] + st.i[at] * st.g[at];
                st.h[at] = st.o[at] * st.c[at].tanh();
            }
        }
        steps.push(st);
    }
    steps
}

/// `(x [N,T,F], w_x [F,4H], w_h [H,4H], b [4H]) -> h [N,T,H]`.
pub(super) fn lstm_seq(ins: &[&Array], op: &'static str) -> Result<Array, InterpError> {
    let s = Seq::new(ins, op)?;
    let steps = lstm_forward(&s);
    Ok(stack_h(&s, steps.iter().map(|st| &st.h[..])))
}

/// `h [N,T,H]` from the per-step `[N·H]` hidden states.
fn stack_h<'a>(s: &Seq, hs: impl Iterator<Item = &'a [f64]>) -> Array {
    let mut out = vec![0.0; s.n * s.t * s.h];
    for (t, ht) in hs.enumerate() {
        for r in 0..s.n {
            for j in 0..s.h {
                out[(r * s.t + t) * s.h + j] = ht[r * s.h + j];
            }
        }
    }
    Array::f(vec![s.n, s.t, s.h], out)
}

/// Gradients accumulated over the steps of a recurrent op.
struct Grads {
    dx: Vec<f64>,
    dwx: Vec<f64>,
    dwh: Vec<f64>,
    db: Vec<f64>,
}

impl Grads {
    fn new(s: &Seq) -> Grads {
        Grads {
            dx: vec![0.0; s.x.len()],
            dwx: vec![0.0; s.wx.len()],
            dwh: vec![0.0; s.wh.len()],
            db: vec![0.0; s.b.len()],
        }
    }

    fn into_arrays(self, ins: &[&Array]) -> Vec<Array> {
        vec![
            Array::f(ins[0].shape.clone(), self.dx),
            Array::f(ins[1].shape.clone(), self.dwx),
            Array::f(ins[2].shape.clone(), self.dwh),
            Array::f(ins[3].shape.clone(), self.db),
        ]
    }

    /// For the pre-activation gradient `dz` of column `col` at row `r`, step
    /// `t`: accumulate `db`, `dw_x += x_tᵀ dz`, `dx_t += dz w_xᵀ`.
    fn input_path(&mut self, s: &Seq, gh: usize, r: usize, t: usize, col: usize, dz: f64) {
        self.db[col] += dz;
        for k in 0..s.f {
            self.dwx[k * gh + col] += s.x(r, t, k) * dz;
            self.dx[(r * s.t + t) * s.f + k] += dz * s.wx[k * gh + col];
        }
    }
}

/// The dh_t arriving from the op's output `dh [N,T,H]` at row `r`, unit `j`.
fn dh_out(dh: &[f64], s: &Seq, r: usize, t: usize, j: usize) -> f64 {
    dh[(r * s.t + t) * s.h + j]
}

/// `(x, w_x, w_h, b, dh) -> (dx, dw_x, dw_h, db)` by BPTT.
pub(super) fn lstm_seq_grad(ins: &[&Array], op: &'static str) -> Result<Vec<Array>, InterpError> {
    let s = Seq::new(ins, op)?;
    let dh = floats(op, 4, ins[4])?;
    let steps = lstm_forward(&s);
    let (n, h) = (s.n, s.h);
    let gh = 4 * h;
    let mut gr = Grads::new(&s);
    // Gradients flowing back from step t+1 into h_t and c_t.
    let mut dh_next = vec![0.0; n * h];
    let mut dc_next = vec![0.0; n * h];
    let zero = vec![0.0; n * h];
    for t in (0..s.t).rev() {
        let st = &steps[t];
        let (h_prev, c_prev) = if t > 0 {
            (&steps[t - 1].h, &steps[t - 1].c)
        } else {
            (&zero, &zero)
        };
        let mut dh_prev = vec![0.0; n * h];
        let mut dc_prev = vec![0.0; n * h];
        for r in 0..n {
            // dz for the 4H columns of this row.
            let mut dz = vec![0.0; gh];
            for j in 0..h {
                let at = r * h + j;
                let dht = dh_out(dh, &s, r, t, j) + dh_next[at];
                let tc = st.c[at].tanh();
                // h = o·tanh(c)
                let d_o = dht * tc;
                let dc = dht * st.o[at] * (1.0 - tc * tc) + dc_next[at];
                // c = f·c_prev + i·g
                let di = dc * st.g[at];
                let dg = dc * st.i[at];
                let df = dc * c_prev[at];
                dc_prev[at] = dc * st.f[at];
                dz[s.col(0, j)] = di * st.i[at] * (1.0 - st.i[at]);
                dz[s.col(1, j)] = df * st.f[at] * (1.0 - st.f[at]);
                dz[s.col(2, j)] = dg * (1.0 - st.g[at] * st.g[at]);
                dz[s.col(3, j)] = d_o * st.o[at] * (1.0 - st.o[at]);
            }
            for (col, &d) in dz.iter().enumerate() {
                gr.input_path(&s, gh, r, t, col, d);
                // z += h_{t-1} @ w_h
                for k in 0..h {
                    gr.dwh[k * gh + col] += h_prev[r * h + k] * d;
                    dh_prev[r * h + k] += d * s.wh[k * gh + col];
                }
            }
        }
        dh_next = dh_prev;
        dc_next = dc_prev;
    }
    Ok(gr.into_arrays(ins))
}

// ----------------------------------------------------------------- GRU ----

/// Everything the GRU computes at one step: `[n·h]` each.
struct GruStep {
    z: Vec<f64>,
    r: Vec<f64>,
    /// The candidate `h~`.
    c: Vec<f64>,
    h: Vec<f64>,
}

/// The forward pass; `steps[t]` holds step t, `h_{-1} = 0`.
fn gru_forward(s: &Seq) -> Vec<GruStep> {
    let (n, h) = (s.n, s.h);
    let gh = 3 * h;
    let mut steps: Vec<GruStep> = Vec::with_capacity(s.t);
    for t in 0..s.t {
        let h_prev = match steps.last() {
            Some(p) => p.h.clone(),
            None => vec![0.0; n * h],
        };
        let mut st = GruStep {
            z: vec![0.0; n * h],
            r: vec![0.0; n * h],
            c: vec![0.0; n * h],
            h: vec![0.0; n * h],
        };
        for row in 0..n {
            // x_t @ w_x[:, col] + b[col]
            let x_part = |col: usize| {
                let mut acc = s.b[col];
                for k in 0..s.f {
                    acc += s.x(row, t, k) * s.wx[k * gh + col];
                }
                acc
            };
            // v @ w_h[:, col] for a length-h vector v of this row
            let h_part = |v: &[f64], col: usize| {
                let mut acc = 0.0;
                for k in 0..h {
                    acc += v[k] * s.wh[k * gh + col];
                }
                acc
            };
            let hp = &h_prev[row * h..(row + 1) * h];
            for j in 0..h {
                let at = row * h + j;
                st.z[at] = sigmoid(x_part(s.col(0, j)) + h_part(hp, s.col(0, j)));
                st.r[at] = sigmoid(x_part(s.col(1, j)) + h_part(hp, s.col(1, j)));
            }
            // The reset gate applies before the recurrent matmul.
            let rh: Vec<f64> = (0..h).map(|k| st.r[row * h + k] * hp[k]).collect();
            for j in 0..h {
                let at = row * h + j;
                st.c[at] = (x_part(s.col(2, j)) + h_part(&rh, s.col(2, j))).tanh();
                st.h[at] = (1.0 - st.z[at]) * hp[j] + st.z[at] * st.c[at];
            }
        }
        steps.push(st);
    }
    steps
}

/// `(x [N,T,F], w_x [F,3H], w_h [H,3H], b [3H]) -> h [N,T,H]`.
pub(super) fn gru_seq(ins: &[&Array], op: &'static str) -> Result<Array, InterpError> {
    let s = Seq::new(ins, op)?;
    let steps = gru_forward(&s);
    Ok(stack_h(&s, steps.iter().map(|st| &st.h[..])))
}

/// `(x, w_x, w_h, b, dh) -> (dx, dw_x, dw_h, db)` by BPTT.
pub(super) fn gru_seq_grad(ins: &[&Array], op: &'static str) -> Result<Vec<Array>, InterpError> {
    let s = Seq::new(ins, op)?;
    let dh = floats(op, 4, ins[4])?;
    let steps = gru_forward(&s);
    let (n, h) = (s.n, s.h);
    let gh = 3 * h;
    let mut gr = Grads::new(&s);
    let mut dh_next = vec![0.0; n * h];
    let zero = vec![0.0; n * h];
    for t in (0..s.t).rev() {
        let st = &steps[t];
        let h_prev = if t > 0 { &steps[t - 1].h } else { &zero };
        let mut dh_prev = vec![0.0; n * h];
        for row in 0..n {
            let hp = &h_prev[row * h..(row + 1) * h];
            let mut da_z = vec![0.0; h];
            let mut da_c = vec![0.0; h];
            for j in 0..h {
                let at = row * h + j;
                let dht = dh_out(dh, &s, row, t, j) + dh_next[at];
                // h_t = (1 − z)·h_{t−1} + z·h~
                let dz = dht * (st.c[at] - hp[j]);
                let dc = dht * st.z[at];
                dh_prev[at] += dht * (1.0 - st.z[at]);
                da_z[j] = dz * st.z[at] * (1.0 - st.z[at]);
                da_c[j] = dc * (1.0 - st.c[at] * st.c[at]);
            }
            // h~ = tanh(x w_x[:,h] + (r·h_{t−1}) w_h[:,h] + b[h]):
            // d(r·h_{t−1})_k = Σ_j da_c[j] · w_h[k, h-block j].
            let mut d_rh = vec![0.0; h];
            for j in 0..h {
                let col = s.col(2, j);
                for k in 0..h {
                    let rh_k = st.r[row * h + k] * hp[k];
                    gr.dwh[k * gh + col] += rh_k * da_c[j];
                    d_rh[k] += da_c[j] * s.wh[k * gh + col];
                }
            }
            let mut da_r = vec![0.0; h];
            for k in 0..h {
                let rk = st.r[row * h + k];
                dh_prev[row * h + k] += d_rh[k] * rk;
                da_r[k] = d_rh[k] * hp[k] * rk * (1.0 - rk);
            }
            // z and r: pre-activations x w_x + h_{t−1} w_h + b.
            for (gate, da) in [(0, &da_z), (1, &da_r)] {
                for j in 0..h {
                    let col = s.col(gate, j);
                    for k in 0..h {
                        gr.dwh[k * gh + col] += hp[k] * da[j];
                        dh_prev[row * h + k] += da[j] * s.wh[k * gh + col];
                    }
                }
            }
            for (gate, da) in [(0, &da_z), (1, &da_r), (2, &da_c)] {
                for j in 0..h {
                    gr.input_path(&s, gh, row, t, s.col(gate, j), da[j]);
                }
            }
        }
        dh_next = dh_prev;
    }
    Ok(gr.into_arrays(ins))
}
