//! Convolution and pooling kernels (NCHW).
//!
//! Stride-1 convolutions (forward and input gradient) run as a direct
//! kernel: the input is copied once into a zero-padded buffer, so every
//! weight tap `(c, kh, kw)` reads an output row's pixels as plain f32x4
//! loads from that buffer, with no im2col matrix and no B packing. The
//! filter gradient of a stride-1 convolution correlates `dy` with the padded
//! input directly, vectorised over output columns. Other strides lower to
//! `im2col` + the matmul kernel (and `col2im` for the input gradient);
//! pooling runs directly, one (n, c) plane per work unit; a 2 × 2 max
//! pool at stride 2 computes four outputs per vector inside the input
//! (lenet's pools, forward and gradient, 2.2–2.8× faster than one output
//! at a time). 3 × 3 stride-1 layers with 24 or more channels in and out
//! take the Winograd kernels of `winograd.rs` instead (all three
//! directions), which reuse this module's epilogue helpers.

use super::emit::{flags, ro_flags, step_order, Kb, Loc};
use super::kernel::{eval_program, EwInstr};
use super::winograd::{WinoGradDy, WinoGradOut, WinoInput, WinoOutput, WinoWeights};
use crate::ir::Conv2d;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::Variable;

/// Spatial geometry shared by conv and pooling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geom {
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub stride: usize,
    pub dilation: usize,
    pub pad_top: usize,
    pub pad_left: usize,
}

impl Geom {
    pub fn conv(
        h: usize,
        w: usize,
        kh: usize,
        kw: usize,
        oh: usize,
        ow: usize,
        c: &Conv2d,
    ) -> Geom {
        Geom {
            h,
            w,
            kh,
            kw,
            oh,
            ow,
            stride: c.stride,
            dilation: c.dilation,
            pad_top: c.pad[0],
            pad_left: c.pad[1],
        }
    }
}

/// Input coordinate `o·stride + k·dilation - pad` and whether it lies in
/// `[0, size)` (an unsigned compare also rejects negatives).
fn in_coord(k: &mut Kb, o: Value, kk: Value, g: &Geom, pad: usize, size: usize) -> (Value, Value) {
    let a = k.b.ins().imul_imm_s(o, g.stride as i64);
    let b = k.b.ins().imul_imm_s(kk, g.dilation as i64);
    let i = k.b.ins().iadd(a, b);
    let i = k.b.ins().iadd_imm_s(i, -(pad as i64));
    let sz = k.iconst(size as i64);
    let ok = k.b.ins().icmp(IntCC::UnsignedLessThan, i, sz);
    (i, ok)
}

/// `cols[n, (c, kh, kw), (oh, ow)] = x[n, c, ih, iw]` (0 in the padding),
/// written at `n·sn + row·sr + p`. Work units are `(n, c, kh, kw)` rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Im2colRows {
    pub x: Loc,
    pub cols: Loc,
    pub n: usize,
    pub c: usize,
    pub g: Geom,
    pub sn: usize,
    pub sr: usize,
}

impl Im2colRows {
    pub fn units(&self) -> usize {
        self.n * self.c * self.g.kh * self.g.kw
    }
    pub fn unit_cost(&self) -> usize {
        self.g.oh * self.g.ow * 2
    }

    pub fn emit(&self, kb: &mut Kb) {
        let g = self.g;
        let x = kb.base(self.x);
        let cols = kb.base(self.cols);
        let (start, end) = (kb.start, kb.end);
        let rows_per_n = (self.c * g.kh * g.kw) as i64;
        kb.for_range(start, end, 1, |k, u| {
            let n = k.b.ins().udiv_imm_u(u, rows_per_n);
            let row = k.b.ins().urem_imm_u(u, rows_per_n);
            let kw = k.b.ins().urem_imm_u(row, g.kw as i64);
            let t = k.b.ins().udiv_imm_u(row, g.kw as i64);
            let kh = k.b.ins().urem_imm_u(t, g.kh as i64);
            let nc = k.b.ins().udiv_imm_u(u, (g.kh * g.kw) as i64);
            let plane = k.b.ins().imul_imm_s(nc, (g.h * g.w) as i64);
            let xp = k.addr(x, plane, 4);
            let a = k.b.ins().imul_imm_s(n, self.sn as i64);
            let b = k.b.ins().imul_imm_s(row, self.sr as i64);
            let o = k.b.ins().iadd(a, b);
            let dp = k.addr(cols, o, 4);
            k.for_const(0, g.oh, |k, oh| {
                let (ih, ok_h) = in_coord(k, oh, kh, &g, g.pad_top, g.h);
                let drow = k.addr(dp, oh, (g.ow * 4) as i64);
                let xrow = k.addr(xp, ih, (g.w * 4) as i64);
                k.for_const(0, g.ow, |k, ow| {
                    let (iw, ok_w) = in_coord(k, ow, kw, &g, g.pad_left, g.w);
                    let ok = k.b.ins().band(ok_h, ok_w);
                    let zero = k.fconst(0.0);
                    let v = k.var(F32, zero);
                    k.if_then(ok, |k| {
                        let a = k.addr(xrow, iw, 4);
                        let x = k.load_f(a, 0);
                        k.b.def_var(v, x);
                    });
                    let val = k.b.use_var(v);
                    let d = k.addr(drow, ow, 4);
                    k.store_f(val, d, 0);
                });
            });
        });
    }
}

/// `dx[n, c] = Σ_{kh, kw, oh, ow} cols[n, (c, kh, kw), (oh, ow)]` scattered
/// back to `(ih, iw)`, cols contiguous `[n, c·kh·kw, oh·ow]`. Work units are
/// `(n, c)` planes, each summed in one fixed order.
#[derive(Clone, Debug, PartialEq)]
pub struct Col2im {
    pub cols: Loc,
    pub dx: Loc,
    pub n: usize,
    pub c: usize,
    pub g: Geom,
}

impl Col2im {
    pub fn units(&self) -> usize {
        self.n * self.c
    }
    pub fn unit_cost(&self) -> usize {
        self.g.kh * self.g.kw * self.g.oh * self.g.ow * 2
    }

    pub fn emit(&self, kb: &mut Kb) {
        let g = self.g;
        let cols = kb.base(self.cols);
        let dx = kb.base(self.dx);
        let (start, end) = (kb.start, kb.end);
        let ohw = (g.oh * g.ow) as i64;
        kb.for_range(start, end, 1, |k, u| {
            let plane = k.b.ins().imul_imm_s(u, (g.h * g.w) as i64);
            let dp = k.addr(dx, plane, 4);
            let zero = k.iconst(0);
            let hw = k.iconst((g.h * g.w) as i64);
            k.for_range(zero, hw, 1, |k, i| {
                let a = k.addr(dp, i, 4);
                let z = k.fconst(0.0);
                k.store_f(z, a, 0);
            });
            // Row (c, kh, kw) of sample n is row u·kh·kw + kh·kw_size + kw.
            let r0 = k.b.ins().imul_imm_s(u, (g.kh * g.kw) as i64 * ohw);
            let cp = k.addr(cols, r0, 4);
            k.for_const(0, g.kh, |k, kh| {
                k.for_const(0, g.kw, |k, kw| {
                    let r = k.b.ins().imul_imm_s(kh, g.kw as i64);
                    let r = k.b.ins().iadd(r, kw);
                    let rp = k.addr(cp, r, ohw * 4);
                    k.for_const(0, g.oh, |k, oh| {
                        let (ih, ok_h) = in_coord(k, oh, kh, &g, g.pad_top, g.h);
                        k.if_then(ok_h, |k| {
                            let srow = k.addr(rp, oh, (g.ow * 4) as i64);
                            let drow = k.addr(dp, ih, (g.w * 4) as i64);
                            k.for_const(0, g.ow, |k, ow| {
                                let (iw, ok_w) = in_coord(k, ow, kw, &g, g.pad_left, g.w);
                                k.if_then(ok_w, |k| {
                                    let s = k.addr(srow, ow, 4);
                                    let v = k.load_f(s, 0);
                                    let d = k.addr(drow, iw, 4);
                                    let o = k.load_f(d, 0);
                                    let t = k.b.ins().fadd(o, v);
                                    k.store_f(t, d, 0);
                                });
                            });
                        });
                    });
                });
            });
        });
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    Avg,
    /// `(x, dy) -> dx`: each window's gradient to its first maximum.
    MaxGrad,
    /// `dy -> dx`: each window's gradient spread over its in-input cells.
    AvgGrad,
}

/// Pooling over square windows; work units are `(n, c)` planes.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    pub kind: PoolKind,
    /// `x` for Max/Avg/MaxGrad; unused for AvgGrad.
    pub x: Loc,
    /// `dy` for the gradients.
    pub dy: Loc,
    pub out: Loc,
    pub planes: usize,
    /// Channels per image: a plane `u` is channel `u % channels`.
    pub channels: usize,
    pub g: Geom,
    /// Elementwise ops applied to each output plane once it is complete
    /// (the mask of a relu's gradient on a max pool's): read while the
    /// plane is in cache, not by a kernel of their own.
    pub epilogue: Option<NchwEpilogue>,
}

impl Pool {
    pub fn units(&self) -> usize {
        self.planes
    }
    pub fn unit_cost(&self) -> usize {
        self.g.oh * self.g.ow * self.g.kh * self.g.kw * 2
    }

    pub fn emit(&self, kb: &mut Kb) {
        let g = self.g;
        let x = kb.base(self.x);
        let dy = kb.base(self.dy);
        let out = kb.base(self.out);
        let (start, end) = (kb.start, kb.end);
        let kind = self.kind;
        let ep_bases = self
            .epilogue
            .as_ref()
            .map(|ep| epilogue_bases(kb, ep, out))
            .unwrap_or_default();
        let out_plane = match kind {
            PoolKind::MaxGrad | PoolKind::AvgGrad => g.h * g.w,
            PoolKind::Max | PoolKind::Avg => g.oh * g.ow,
        };
        kb.for_range(start, end, 1, |k, u| {
            self.emit_plane(k, (x, dy, out), u);
            if let Some(ep) = &self.epilogue {
                let at = k.b.ins().imul_imm_s(u, (out_plane * 4) as i64);
                let c = k.b.ins().urem_imm_u(u, self.channels.max(1) as i64);
                plane_epilogue(k, (ep, &ep_bases), at, c, out_plane);
            }
        });
    }

    /// Plane `u`: its outputs, or for the gradients its `dx`.
    fn emit_plane(&self, k: &mut Kb, (x, dy, out): (Value, Value, Value), u: Value) {
        let g = self.g;
        let kind = self.kind;
        let ip = k.b.ins().imul_imm_s(u, (g.h * g.w) as i64);
        let xp = k.addr(x, ip, 4);
        let op = k.b.ins().imul_imm_s(u, (g.oh * g.ow) as i64);
        let yp = k.addr(out, op, 4);
        let dyp = k.addr(dy, op, 4);
        let dxp = k.addr(out, ip, 4);
        if matches!(kind, PoolKind::MaxGrad | PoolKind::AvgGrad) {
            zero_run(k, dxp, g.h * g.w);
        }
        let bufs = PoolBufs { xp, yp, dyp, dxp };
        // Windows that lie wholly inside the input (all but the border
        // rows and columns) take the unrolled path with no bounds checks,
        // where the window is small enough to unroll.
        let unroll = g.kh * g.kw <= POOL_UNROLL_MAX_TAPS;
        let (oh0, oh1) = interior(g.oh, g.h, g.kh, g.stride, g.pad_top);
        let (ow0, ow1) = interior(g.ow, g.w, g.kw, g.stride, g.pad_left);
        k.for_const(0, g.oh, |k, oh| {
            if !unroll {
                k.for_const(0, g.ow, |k, ow| self.emit_window(k, &bufs, oh, ow));
                return;
            }
            let lo = k.iconst(oh0 as i64);
            let hi = k.iconst(oh1 as i64);
            let ge = k.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, oh, lo);
            let lt = k.b.ins().icmp(IntCC::SignedLessThan, oh, hi);
            let inside = k.b.ins().band(ge, lt);
            k.if_else(
                inside,
                |k| {
                    k.for_const(0, ow0, |k, ow| self.emit_window(k, &bufs, oh, ow));
                    // Groups of four outputs at once where the pool
                    // has a vector form, then one at a time.
                    let quads = if self.is_max_2x2() {
                        (ow1 - ow0) / 4
                    } else {
                        0
                    };
                    k.for_const(0, quads, |k, q| {
                        let ow = k.b.ins().imul_imm_s(q, 4);
                        let ow = k.b.ins().iadd_imm_s(ow, ow0 as i64);
                        self.emit_max_2x2_quad(k, &bufs, oh, ow);
                    });
                    let ow0 = ow0 + 4 * quads;
                    k.for_const(ow0, ow1, |k, ow| self.emit_fast(k, &bufs, oh, ow));
                    k.for_const(ow1, g.ow, |k, ow| self.emit_window(k, &bufs, oh, ow));
                },
                |k| {
                    k.for_const(0, g.ow, |k, ow| self.emit_window(k, &bufs, oh, ow));
                },
            );
        });
    }

    /// One output `(oh, ow)` of a window that may cross the border.
    fn emit_window(&self, k: &mut Kb, bufs: &PoolBufs, oh: Value, ow: Value) {
        let g = self.g;
        let kind = self.kind;
        let PoolBufs { xp, yp, dyp, dxp } = *bufs;
        let ninf = k.fconst(f32::NEG_INFINITY);
        let zf = k.fconst(0.0);
        let best = k.var(F32, ninf);
        let sum = k.var(F32, zf);
        let m1 = k.iconst(-1);
        let best_at = k.var(I64, m1);
        let z = k.iconst(0);
        let count = k.var(I64, z);
        // Pass 1 over the window: max (and where) or sum/count.
        window(k, oh, ow, &g, &mut |k, ih, iw| {
            let off = k.b.ins().imul_imm_s(ih, g.w as i64);
            let off = k.b.ins().iadd(off, iw);
            let c = k.b.use_var(count);
            let c = k.b.ins().iadd_imm_s(c, 1);
            k.b.def_var(count, c);
            if kind == PoolKind::AvgGrad {
                return;
            }
            let a = k.addr(xp, off, 4);
            let v = k.load_f(a, 0);
            match kind {
                PoolKind::Avg => {
                    let s = k.b.use_var(sum);
                    let s = k.b.ins().fadd(s, v);
                    k.b.def_var(sum, s);
                }
                _ => {
                    // Strictly greater: the first maximum wins.
                    let b = k.b.use_var(best);
                    let at = k.b.use_var(best_at);
                    let gt = k.b.ins().fcmp(FloatCC::GreaterThan, v, b);
                    let none = k.b.ins().icmp_imm_s(IntCC::SignedLessThan, at, 0);
                    let take = k.b.ins().bor(gt, none);
                    let nb = k.b.ins().select(take, v, b);
                    let na = k.b.ins().select(take, off, at);
                    k.b.def_var(best, nb);
                    k.b.def_var(best_at, na);
                }
            }
        });
        let o = k.b.ins().imul_imm_s(oh, g.ow as i64);
        let o = k.b.ins().iadd(o, ow);
        let cnt = k.b.use_var(count);
        let cntf = k.b.ins().fcvt_from_sint(F32, cnt);
        match kind {
            PoolKind::Max => {
                let v = k.b.use_var(best);
                let a = k.addr(yp, o, 4);
                k.store_f(v, a, 0);
            }
            PoolKind::Avg => {
                let s = k.b.use_var(sum);
                let v = k.b.ins().fdiv(s, cntf);
                let a = k.addr(yp, o, 4);
                k.store_f(v, a, 0);
            }
            PoolKind::MaxGrad => {
                let at = k.b.use_var(best_at);
                let found = k.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, at, 0);
                k.if_then(found, |k| {
                    let ga = k.addr(dyp, o, 4);
                    let gv = k.load_f(ga, 0);
                    let d = k.addr(dxp, at, 4);
                    let old = k.load_f(d, 0);
                    let t = k.b.ins().fadd(old, gv);
                    k.store_f(t, d, 0);
                });
            }
            PoolKind::AvgGrad => {
                let ga = k.addr(dyp, o, 4);
                let gv = k.load_f(ga, 0);
                let share = k.b.ins().fdiv(gv, cntf);
                window(k, oh, ow, &g, &mut |k, ih, iw| {
                    let off = k.b.ins().imul_imm_s(ih, g.w as i64);
                    let off = k.b.ins().iadd(off, iw);
                    let d = k.addr(dxp, off, 4);
                    let old = k.load_f(d, 0);
                    let t = k.b.ins().fadd(old, share);
                    k.store_f(t, d, 0);
                });
            }
        }
    }

    /// A max pool (or its gradient) over 2 × 2 windows at stride 2, the
    /// `max_pool2d(2)` of most CNNs: windows that do not overlap and whose
    /// columns deinterleave from two vector loads per input row.
    fn is_max_2x2(&self) -> bool {
        let g = &self.g;
        matches!(self.kind, PoolKind::Max | PoolKind::MaxGrad)
            && (g.kh, g.kw, g.stride) == (2, 2, 2)
    }

    /// Outputs `(oh, ow..ow + 4)` of a 2 × 2, stride-2 max pool whose
    /// windows lie inside the input, one output per lane: each input row
    /// of the four windows is two vector loads, split into the windows'
    /// left and right columns. The taps are compared in the row-major
    /// order of [`Pool::emit_fast`], with the same strictly-greater rule,
    /// so the lanes hold bitwise what it computes one output at a time.
    /// The gradient writes the windows' eight cells per row whole: the
    /// windows do not overlap, so each cell gets `0 + dy` from its window's
    /// first maximum or stays `0`, as the scalar path's adds leave it.
    fn emit_max_2x2_quad(&self, k: &mut Kb, bufs: &PoolBufs, oh: Value, ow: Value) {
        let g = self.g;
        let ih = k.b.ins().imul_imm_s(oh, 2);
        let ih = k.b.ins().iadd_imm_s(ih, -(g.pad_top as i64));
        let iw = k.b.ins().imul_imm_s(ow, 2);
        let iw = k.b.ins().iadd_imm_s(iw, -(g.pad_left as i64));
        let off0 = k.b.ins().imul_imm_s(ih, g.w as i64);
        let off0 = k.b.ins().iadd(off0, iw);
        let o = k.b.ins().imul_imm_s(oh, g.ow as i64);
        let o = k.b.ins().iadd(o, ow);
        let row = (g.w * 4) as i32;
        let xw = k.addr(bufs.xp, off0, 4);
        // Taps (0, 0), (0, 1), (1, 0), (1, 1) of the four windows.
        let mut taps = Vec::with_capacity(4);
        for r in 0..2 {
            let lo = k.load_v(xw, r * row);
            let hi = k.load_v(xw, r * row + 16);
            taps.push(k.shuffle32(lo, hi, [0, 2, 4, 6]));
            taps.push(k.shuffle32(lo, hi, [1, 3, 5, 7]));
        }
        let mut best = taps[0];
        let mut wins = Vec::with_capacity(3);
        for &t in &taps[1..] {
            let gt = k.vcmp(FloatCC::GreaterThan, t, best);
            best = k.vsel(gt, t, best);
            wins.push(gt);
        }
        if self.kind == PoolKind::Max {
            let y = k.addr(bufs.yp, o, 4);
            k.b.ins().store(flags(), best, y, 0);
            return;
        }
        let dyv = {
            let a = k.addr(bufs.dyp, o, 4);
            k.load_v(a, 0)
        };
        let zero = k.vconst(0.0);
        // Tap q's share: dy where it is the window's first maximum (it
        // won its compare and no later tap did), else 0.
        let mut share = [dyv, zero, zero, zero];
        for (q, &gt) in (1..4).zip(&wins) {
            for s in share.iter_mut().take(q) {
                *s = k.vsel(gt, zero, *s);
            }
            share[q] = k.vsel(gt, dyv, zero);
        }
        let cells: Vec<Value> = share.iter().map(|&s| k.b.ins().fadd(zero, s)).collect();
        let dw = k.addr(bufs.dxp, off0, 4);
        for r in 0..2 {
            let (left, right) = (cells[2 * r], cells[2 * r + 1]);
            let a = k.shuffle32(left, right, [0, 4, 1, 5]);
            let b = k.shuffle32(left, right, [2, 6, 3, 7]);
            k.b.ins().store(flags(), a, dw, r as i32 * row);
            k.b.ins().store(flags(), b, dw, r as i32 * row + 16);
        }
    }

    /// One output `(oh, ow)` whose window lies inside the input: the window
    /// is unrolled at constant offsets, visited in the same row-major order
    /// as `emit_window`, so both paths give bitwise the same result.
    fn emit_fast(&self, k: &mut Kb, bufs: &PoolBufs, oh: Value, ow: Value) {
        let g = self.g;
        let ih = k.b.ins().imul_imm_s(oh, g.stride as i64);
        let ih = k.b.ins().iadd_imm_s(ih, -(g.pad_top as i64));
        let iw = k.b.ins().imul_imm_s(ow, g.stride as i64);
        let iw = k.b.ins().iadd_imm_s(iw, -(g.pad_left as i64));
        let off0 = k.b.ins().imul_imm_s(ih, g.w as i64);
        let off0 = k.b.ins().iadd(off0, iw);
        let o = k.b.ins().imul_imm_s(oh, g.ow as i64);
        let o = k.b.ins().iadd(o, ow);
        let taps: Vec<i64> = (0..g.kh)
            .flat_map(|a| (0..g.kw).map(move |b| (a * g.w + b) as i64))
            .collect();
        let cntf = k.fconst((g.kh * g.kw) as f32);
        match self.kind {
            PoolKind::Max | PoolKind::MaxGrad => {
                // Lane 0 of f32x4 registers: the vector compare and
                // bit-select are branch-free, where a scalar float select
                // becomes an unpredictable branch. The winning tap's offset
                // rides along as an (exact) float.
                let xw = k.addr(bufs.xp, off0, 4);
                let lane = |k: &mut Kb, t: i64| {
                    let v = k.load_f(xw, (t * 4) as i32);
                    k.b.ins().scalar_to_vector(F32X4, v)
                };
                let mut best = lane(k, 0);
                let mut at = k.vconst(0.0);
                for &t in &taps[1..] {
                    let v = lane(k, t);
                    let gt = k.vcmp(FloatCC::GreaterThan, v, best);
                    best = k.vsel(gt, v, best);
                    if self.kind == PoolKind::MaxGrad {
                        let here = k.vconst(t as f32);
                        at = k.vsel(gt, here, at);
                    }
                }
                if self.kind == PoolKind::Max {
                    let v = k.b.ins().extractlane(best, 0);
                    let a = k.addr(bufs.yp, o, 4);
                    k.store_f(v, a, 0);
                } else {
                    let t = k.b.ins().extractlane(at, 0);
                    let t = k.b.ins().fcvt_to_sint(I64, t);
                    let at = k.b.ins().iadd(off0, t);
                    let ga = k.addr(bufs.dyp, o, 4);
                    let gv = k.load_f(ga, 0);
                    let d = k.addr(bufs.dxp, at, 4);
                    let old = k.load_f(d, 0);
                    let t = k.b.ins().fadd(old, gv);
                    k.store_f(t, d, 0);
                }
            }
            PoolKind::Avg => {
                let xw = k.addr(bufs.xp, off0, 4);
                let mut sum = k.fconst(0.0);
                for &t in &taps {
                    let v = k.load_f(xw, (t * 4) as i32);
                    sum = k.b.ins().fadd(sum, v);
                }
                let v = k.b.ins().fdiv(sum, cntf);
                let a = k.addr(bufs.yp, o, 4);
                k.store_f(v, a, 0);
            }
            PoolKind::AvgGrad => {
                let ga = k.addr(bufs.dyp, o, 4);
                let gv = k.load_f(ga, 0);
                let share = k.b.ins().fdiv(gv, cntf);
                let dw = k.addr(bufs.dxp, off0, 4);
                for &t in &taps {
                    let old = k.load_f(dw, (t * 4) as i32);
                    let v = k.b.ins().fadd(old, share);
                    k.store_f(v, dw, (t * 4) as i32);
                }
            }
        }
    }
}

/// Window sizes (taps) up to which a pooling window inside the input is
/// unrolled; larger windows loop, so that code size does not grow with
/// the window.
const POOL_UNROLL_MAX_TAPS: usize = 64;

/// Base pointers of one pooling plane.
#[derive(Clone, Copy)]
struct PoolBufs {
    xp: Value,
    yp: Value,
    dyp: Value,
    dxp: Value,
}

/// Outputs `[lo, hi)` along one axis whose windows lie inside `[0, size)`.
fn interior(out: usize, size: usize, k: usize, stride: usize, pad: usize) -> (usize, usize) {
    let lo = pad.div_ceil(stride).min(out);
    let hi = if size + pad >= k {
        ((size + pad - k) / stride + 1).min(out)
    } else {
        0
    };
    (lo, hi.max(lo))
}

/// Visit the in-input cells of window `(oh, ow)` in row-major order.
fn window(k: &mut Kb, oh: Value, ow: Value, g: &Geom, f: &mut dyn FnMut(&mut Kb, Value, Value)) {
    let g = *g;
    k.for_const(0, g.kh, |k, kh| {
        let (ih, ok_h) = in_coord(k, oh, kh, &g, g.pad_top, g.h);
        k.if_then(ok_h, |k| {
            k.for_const(0, g.kw, |k, kw| {
                let (iw, ok_w) = in_coord(k, ow, kw, &g, g.pad_left, g.w);
                k.if_then(ok_w, |k| f(k, ih, iw));
            });
        });
    });
}

/// Every conv-specific step. `Step::Im2col` carries this type (the variant
/// name predates the direct kernels), so new conv steps need no change to
/// the step list.
pub type Im2col = ConvStep;

#[derive(Clone, Debug, PartialEq)]
pub enum ConvStep {
    Im2col(Im2colRows),
    Pad(PadCopy),
    PackW(PackW),
    Direct(DirectConv),
    GradFilter(DirectGradFilter),
    WinoWeights(WinoWeights),
    WinoInput(WinoInput),
    WinoOutput(WinoOutput),
    WinoGradDy(WinoGradDy),
    WinoGradOut(WinoGradOut),
}

impl ConvStep {
    pub fn units(&self) -> usize {
        match self {
            ConvStep::Im2col(s) => s.units(),
            ConvStep::Pad(s) => s.planes,
            ConvStep::PackW(s) => s.m.div_ceil(s.mr),
            ConvStep::Direct(s) => s.n * s.oh,
            ConvStep::GradFilter(s) => s.o.div_ceil(GF_MR) * s.c * s.kh,
            ConvStep::WinoWeights(s) => s.units(),
            ConvStep::WinoInput(s) => s.units(),
            ConvStep::WinoOutput(s) => s.units(),
            ConvStep::WinoGradDy(s) => s.units(),
            ConvStep::WinoGradOut(s) => s.units(),
        }
    }
    pub fn unit_cost(&self) -> usize {
        match self {
            ConvStep::Im2col(s) => s.unit_cost(),
            ConvStep::Pad(s) => s.hp * s.wp,
            ConvStep::PackW(s) => s.mr * s.r(),
            ConvStep::Direct(s) => 2 * s.m * s.ow * s.r(),
            ConvStep::GradFilter(s) => 2 * GF_MR * s.kw * s.n * s.oh * s.ow,
            ConvStep::WinoWeights(s) => s.unit_cost(),
            ConvStep::WinoInput(s) => s.unit_cost(),
            ConvStep::WinoOutput(s) => s.unit_cost(),
            ConvStep::WinoGradDy(s) => s.unit_cost(),
            ConvStep::WinoGradOut(s) => s.unit_cost(),
        }
    }
    pub fn emit(&self, kb: &mut Kb) {
        match self {
            ConvStep::Im2col(s) => s.emit(kb),
            ConvStep::Pad(s) => s.emit(kb),
            ConvStep::PackW(s) => s.emit(kb),
            ConvStep::Direct(s) => s.emit(kb),
            ConvStep::GradFilter(s) => s.emit(kb),
            ConvStep::WinoWeights(s) => s.emit(kb),
            ConvStep::WinoInput(s) => s.emit(kb),
            ConvStep::WinoOutput(s) => s.emit(kb),
            ConvStep::WinoGradDy(s) => s.emit(kb),
            ConvStep::WinoGradOut(s) => s.emit(kb),
        }
    }
}

/// `dst[p, i, j] = src[p, i - off_h, j - off_w]`, 0 where that is outside
/// the `h × w` source plane; `dst` planes are `hp × wp`. Work units are
/// planes.
#[derive(Clone, Debug, PartialEq)]
pub struct PadCopy {
    pub src: Loc,
    pub dst: Loc,
    pub planes: usize,
    pub h: usize,
    pub w: usize,
    pub hp: usize,
    pub wp: usize,
    pub off_h: i64,
    pub off_w: i64,
}

/// Zero `n` floats from byte address `p`.
pub(super) fn zero_run(k: &mut Kb, p: Value, n: usize) {
    if n == 0 {
        return;
    }
    let zero = k.iconst(0);
    let hi = k.iconst(n as i64);
    let zv = k.vconst(0.0);
    let zs = k.fconst(0.0);
    k.for_vec_tail(
        zero,
        hi,
        |k, i| {
            let a = k.addr(p, i, 4);
            k.b.ins().store(flags(), zv, a, 0);
        },
        |k, i| {
            let a = k.addr(p, i, 4);
            k.store_f(zs, a, 0);
        },
    );
}

impl PadCopy {
    fn emit(&self, kb: &mut Kb) {
        let src = kb.base(self.src);
        let dst = kb.base(self.dst);
        let (start, end) = (kb.start, kb.end);
        let (h, w, hp, wp) = (self.h as i64, self.w as i64, self.hp as i64, self.wp as i64);
        // Destination rows [r0, r1) and columns [c0, c1) come from the source.
        let r0 = self.off_h.clamp(0, hp);
        let r1 = (h + self.off_h).clamp(r0, hp);
        let c0 = self.off_w.clamp(0, wp);
        let c1 = (w + self.off_w).clamp(c0, wp);
        kb.for_range(start, end, 1, |k, u| {
            let sp = k.addr(src, u, h * w * 4);
            let dp = k.addr(dst, u, hp * wp * 4);
            zero_run(k, dp, (r0 * wp) as usize);
            let tail = k.b.ins().iadd_imm_s(dp, r1 * wp * 4);
            zero_run(k, tail, ((hp - r1) * wp) as usize);
            if r1 == r0 {
                return;
            }
            let lo = k.iconst(r0);
            let hi = k.iconst(r1);
            k.for_range(lo, hi, 1, |k, r| {
                let drow = k.addr(dp, r, wp * 4);
                zero_run(k, drow, c0 as usize);
                let right = k.b.ins().iadd_imm_s(drow, c1 * 4);
                zero_run(k, right, (wp - c1) as usize);
                let ir = k.b.ins().iadd_imm_s(r, -self.off_h);
                let srow = k.addr(sp, ir, w * 4);
                let s0 = k.b.ins().iadd_imm_s(srow, (c0 - self.off_w) * 4);
                let d0 = k.b.ins().iadd_imm_s(drow, c0 * 4);
                let zero = k.iconst(0);
                let n = k.iconst(c1 - c0);
                k.for_vec_tail(
                    zero,
                    n,
                    |k, i| {
                        let a = k.addr(s0, i, 4);
                        let v = k.load_v(a, 0);
                        let d = k.addr(d0, i, 4);
                        k.b.ins().store(flags(), v, d, 0);
                    },
                    |k, i| {
                        let a = k.addr(s0, i, 4);
                        let v = k.load_f(a, 0);
                        let d = k.addr(d0, i, 4);
                        k.store_f(v, d, 0);
                    },
                );
            });
        });
    }
}

/// Read-only data at any 4-byte alignment: such loads may move next to
/// their use, but (unlike `ro_flags`) never claim 16-byte alignment.
fn ro_unaligned() -> cranelift_codegen::ir::MemFlagsData {
    cranelift_codegen::ir::MemFlagsData::new()
        .with_notrap()
        .with_readonly()
        .with_can_move()
}

/// Register tiles of the direct kernel, `(output-channel rows, f32x4
/// columns)`, the first the default: 10, 9 and 8 accumulators, which with
/// a tile's column vectors, a weight and its copy fit the 16 xmm registers.
const DIRECT_TILES: [(usize, usize); 3] = [(5, 2), (3, 3), (2, 4)];

/// FMAs in flight that keep both FMA pipes busy through the FMA latency
/// (4 cycles × 2 pipes): a tile with fewer accumulators takes as long as
/// one with this many.
const FMA_SLOTS: usize = 8;

/// The register tile `(mr, nv)` of a direct convolution with `m` output
/// channels and `ow` output columns: the default unless another is at
/// least 10% cheaper. A model of the FMA issue slots each tap costs:
/// every `rows × vectors` tile (the last panel and the last column tile
/// may be partial) takes `max(rows · vectors, FMA_SLOTS)`. Wide layers fill
/// the default's tiles (vgg's 32 and 64 channels at 16 and 32 columns);
/// small ones waste most of a 5 × 8 tile on their edges: lenet's 6
/// channels take a 5-row and a 1-row panel, and its 10 columns an
/// 8-column and a 2-column tile, where 3 × 12 or 2 × 16 tiles cover them
/// with less waste. The model expects lenet's kernels 1.3–1.5× faster;
/// measured (best of four alternated one-thread profiles), its second
/// layer took 17% less time, its first 7% less, its input gradient 18%.
pub fn direct_tile_shape(m: usize, ow: usize) -> (usize, usize) {
    let cost = |(mr, nv): (usize, usize)| -> usize {
        let nr = 4 * nv;
        let rows = std::iter::repeat_n(mr, m / mr).chain((!m.is_multiple_of(mr)).then_some(m % mr));
        let vecs: Vec<usize> = std::iter::repeat_n(nv, ow / nr)
            .chain((!ow.is_multiple_of(nr)).then_some((ow % nr).div_ceil(4)))
            .collect();
        rows.map(|r| vecs.iter().map(|v| (r * v).max(FMA_SLOTS)).sum::<usize>())
            .sum()
    };
    let default = DIRECT_TILES[0];
    let best = DIRECT_TILES
        .into_iter()
        .min_by_key(|&t| cost(t))
        .unwrap_or(default);
    if cost(best) * 10 <= cost(default) * 9 {
        best
    } else {
        default
    }
}

/// Taps (input channels × kernel cells) up to which the direct kernel's
/// tap loops are unrolled.
const DIRECT_UNROLL_TAPS: usize = 32;

/// Bytes of one packed weight: each is stored as the broadcast f32x4 the
/// direct kernel's FMAs take, so its loop loads a vector per row instead of
/// a scalar and a shuffle (see `matmul::A_BROADCAST_MIN_PANELS`; the
/// weights are small and every output pixel reuses them).
const W_ELEM_BYTES: usize = 16;

/// Packs the effective weights `w'[o, c, kh, kw]` (element at
/// `off + o·so + c·sc + kh·skh + kw·skw`, strides may be negative to flip)
/// into panels of `mr` rows: `(p·R + r)·mr + i`, with the taps `r` in
/// `(kh, kw, c)` order, the order [`DirectConv`] visits them, each weight
/// stored four times ([`W_ELEM_BYTES`]). Work units are panels.
#[derive(Clone, Debug, PartialEq)]
pub struct PackW {
    pub src: Loc,
    pub dst: Loc,
    pub m: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub mr: usize,
    pub off: i64,
    pub so: i64,
    pub sc: i64,
    pub skh: i64,
    pub skw: i64,
}

impl PackW {
    fn r(&self) -> usize {
        self.c * self.kh * self.kw
    }
    pub fn bytes(&self) -> usize {
        self.m.div_ceil(self.mr) * self.mr * self.r() * W_ELEM_BYTES
    }
    fn emit(&self, kb: &mut Kb) {
        let src = kb.base(self.src);
        let dst = kb.base(self.dst);
        let (start, end) = (kb.start, kb.end);
        let (mr, r) = (self.mr, self.r());
        let s = self.clone();
        kb.for_range(start, end, 1, |k, p| {
            let dp = k.addr(dst, p, (r * mr * W_ELEM_BYTES) as i64);
            let o0 = k.b.ins().imul_imm_s(p, mr as i64);
            let m = k.iconst(s.m as i64);
            let sp = k.addr(src, o0, s.so * 4);
            let sp = k.b.ins().iadd_imm_s(sp, s.off * 4);
            // Rows of this panel that exist (the last panel may be short).
            let inside: Vec<Value> = (0..mr)
                .map(|i| {
                    let o = k.b.ins().iadd_imm_s(o0, i as i64);
                    k.b.ins().icmp(IntCC::SignedLessThan, o, m)
                })
                .collect();
            let tap_bytes = (mr * W_ELEM_BYTES) as i64;
            let c_taps = s.c as i64 * tap_bytes;
            // Loops rather than unrolled taps: a 5×5 filter unrolled was
            // ~1700 instructions of compile time for a copy.
            k.for_const(0, s.c, |k, c| {
                let sc = k.addr(sp, c, s.sc * 4);
                let dc = k.addr(dp, c, tap_bytes);
                k.for_const(0, s.kh, |k, kh| {
                    let sh = k.addr(sc, kh, s.skh * 4);
                    let dh = k.addr(dc, kh, s.kw as i64 * c_taps);
                    k.for_const(0, s.kw, |k, kw| {
                        let st = k.addr(sh, kw, s.skw * 4);
                        let dt = k.addr(dh, kw, c_taps);
                        for (i, &inside) in inside.iter().enumerate() {
                            let zero = k.fconst(0.0);
                            let v = k.var(F32, zero);
                            k.if_then(inside, |k| {
                                let x = k.load_f(st, (i as i64 * s.so * 4) as i32);
                                k.b.def_var(v, x);
                            });
                            let x = k.b.use_var(v);
                            let x = k.b.ins().splat(F32X4, x);
                            k.b.ins().store(flags(), x, dt, (i * W_ELEM_BYTES) as i32);
                        }
                    });
                });
            });
        });
    }
}

/// Stride-1 direct convolution over a zero-padded input:
/// `y[n, o, i, j] = Σ_{c, kh, kw} w'[o, c, kh, kw] · xp[n, c, i + kh·d, j + kw·d]`
/// with `xp` planes `hp × wp` and `w'` packed by [`PackW`]. Work units are
/// `(n, output row)`; each output element sums its taps in `(c, kh, kw)`
/// order whatever the partition.
#[derive(Clone, Debug, PartialEq)]
pub struct DirectConv {
    pub xp: Loc,
    pub w: Loc,
    pub y: Loc,
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Output channels.
    pub m: usize,
    pub hp: usize,
    pub wp: usize,
    pub kh: usize,
    pub kw: usize,
    pub dilation: usize,
    pub oh: usize,
    pub ow: usize,
    /// The register tile, from [`direct_tile_shape`]: `mr` output
    /// channels (the packed weights' panel height) by `nv` f32x4 columns.
    pub mr: usize,
    pub nv: usize,
    /// Rows `[lo, hi)` of the padded input that hold data; the others are
    /// zeros. With dilation 1, a unit skips the kernel rows whose taps
    /// would all read zero rows (a zero tap adds an exact `±0`), which are
    /// many in an input gradient: lenet's second layer's reads dy with 4
    /// zero rows above and below its 10, and 20 of its 70 (row, kernel
    /// row) pairs read only zeros.
    pub data_rows: (usize, usize),
    /// Elementwise ops applied to every output tile before its one store
    /// (a `conv2d` layer's bias and activation): `y` is written once, and
    /// each value rounds as in the separate elementwise kernel.
    pub epilogue: Option<NchwEpilogue>,
}

/// An elementwise program over an NCHW kernel's result (a direct
/// convolution's, a pooling op's or gradient's) and other operands,
/// indexed like that result `y` `[n, m, oh, ow]`.
#[derive(Clone, Debug, PartialEq)]
pub struct NchwEpilogue {
    pub prog: Vec<EwInstr>,
    pub ins: Vec<NchwInput>,
}

/// How an epilogue operand is indexed at `y`'s element `(n, o, i, j)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NchwInput {
    /// The kernel's result itself.
    Product,
    /// A contiguous tensor of `y`'s shape, at the same index.
    Full(Loc),
    /// One value per output channel, at `o` (a bias as `[m, 1, 1]`).
    Channel(Loc),
    /// One value for every element.
    Scalar(Loc),
}

impl DirectConv {
    fn r(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Floats read past the last padded plane by the widest tail tile.
    pub fn overread(&self) -> usize {
        4 * self.nv
    }

    fn emit(&self, kb: &mut Kb) {
        let xbase = kb.base(self.xp);
        let wbase = kb.base(self.w);
        let ybase = kb.base(self.y);
        let (start, end) = (kb.start, kb.end);
        let s = self.clone();
        let nr = 4 * s.nv;
        let plane = (s.hp * s.wp) as i64;
        let oplane = (s.oh * s.ow) as i64;
        let panel_bytes = (s.r() * s.mr * W_ELEM_BYTES) as i64;
        let ep_bases = s
            .epilogue
            .as_ref()
            .map(|ep| epilogue_bases(kb, ep, ybase))
            .unwrap_or_default();
        let skips_rows = s.dilation == 1 && s.data_rows != (0, s.hp);
        kb.for_range(start, end, 1, |k, u| {
            let n = k.b.ins().udiv_imm_u(u, s.oh as i64);
            let oh = k.b.ins().urem_imm_u(u, s.oh as i64);
            // Kernel rows `[kh_lo, kh_hi)` whose taps read data rows:
            // `data_rows.0 ≤ oh + kh < data_rows.1`.
            let kh_rows = if skips_rows {
                let zero = k.iconst(0);
                let lo = k.iconst(s.data_rows.0 as i64);
                let lo = k.b.ins().isub(lo, oh);
                let lo = k.b.ins().smax(lo, zero);
                let hi = k.iconst(s.data_rows.1 as i64);
                let hi = k.b.ins().isub(hi, oh);
                let kh = k.iconst(s.kh as i64);
                let hi = k.b.ins().smin(hi, kh);
                Some((lo, hi))
            } else {
                None
            };
            let xs = k.addr(xbase, n, plane * s.c as i64 * 4);
            let xrow = k.addr(xs, oh, (s.wp * 4) as i64);
            let ys = k.addr(ybase, n, oplane * s.m as i64 * 4);
            let yrow = k.addr(ys, oh, (s.ow * 4) as i64);
            let panels = |k: &mut Kb, p: Value, rows: usize| {
                let wp = k.addr(wbase, p, panel_bytes);
                let yo = k.b.ins().imul_imm_s(p, s.mr as i64);
                let yp = k.addr(yrow, yo, oplane * 4);
                // The epilogue's operands: each one's base, and the panel's
                // first output channel.
                let ep = s.epilogue.as_ref().map(|ep| (ep, &ep_bases[..], ybase, yo));
                let full = s.ow / nr;
                if full > 0 {
                    k.for_const(0, full, |k, q| {
                        let xq = k.addr(xrow, q, (nr * 4) as i64);
                        let yq = k.addr(yp, q, (nr * 4) as i64);
                        direct_tile(k, &s, (xq, wp, yq), (rows, nr), kh_rows, ep);
                    });
                }
                let rem = s.ow % nr;
                if rem > 0 {
                    let xq = k.b.ins().iadd_imm_s(xrow, (full * nr * 4) as i64);
                    let yq = k.b.ins().iadd_imm_s(yp, (full * nr * 4) as i64);
                    direct_tile(k, &s, (xq, wp, yq), (rows, rem), kh_rows, ep);
                }
            };
            let fp = s.m / s.mr;
            if fp > 0 {
                k.for_const(0, fp, |k, p| panels(k, p, s.mr));
            }
            if !s.m.is_multiple_of(s.mr) {
                let p = k.iconst(fp as i64);
                panels(k, p, s.m % s.mr);
            }
        });
    }
}

/// Each epilogue operand's base address; the result's own (`out`) for
/// the product.
pub(super) fn epilogue_bases(kb: &mut Kb, ep: &NchwEpilogue, out: Value) -> Vec<Value> {
    ep.ins
        .iter()
        .map(|i| match *i {
            NchwInput::Product => out,
            NchwInput::Full(l) | NchwInput::Channel(l) | NchwInput::Scalar(l) => kb.base(l),
        })
        .collect()
}

/// The `Channel` and `Scalar` operands of an epilogue as vectors for
/// channel `c` (`None` for the others).
pub(super) fn fixed_operands(
    k: &mut Kb,
    ep: &NchwEpilogue,
    bases: &[Value],
    c: Value,
) -> Vec<Option<Value>> {
    ep.ins
        .iter()
        .zip(bases)
        .map(|(inp, &p)| {
            let x = match inp {
                NchwInput::Channel(_) => {
                    let a = k.addr(p, c, 4);
                    k.load_f(a, 0)
                }
                NchwInput::Scalar(_) => k.load_f(p, 0),
                NchwInput::Product | NchwInput::Full(_) => return None,
            };
            Some(k.b.ins().splat(F32X4, x))
        })
        .collect()
}

/// The epilogue's value at byte offset `off` of the result, where the
/// product is `product`, the `Full` operands are read at `at + off` of
/// their bases, and `fixed` holds the others.
pub(super) fn epilogue_value(
    k: &mut Kb,
    (ep, bases, fixed): (&NchwEpilogue, &[Value], &[Option<Value>]),
    product: Value,
    (at, off, n): (Value, i32, usize),
) -> Value {
    let args: Vec<Vec<Value>> = ep
        .ins
        .iter()
        .zip(bases)
        .zip(fixed)
        .map(|((inp, &p), f)| {
            vec![match (inp, f) {
                (_, Some(v)) => *v,
                (NchwInput::Full(_), None) => {
                    let q = k.b.ins().iadd(p, at);
                    k.load_lanes(q, off, n)
                }
                _ => product,
            }]
        })
        .collect();
    eval_program(k, &ep.prog, &args, false)
        .first()
        .copied()
        .unwrap_or(product)
}

/// Apply a pool's epilogue to the `len` outputs of one plane, at byte
/// offset `at` of the result, all of channel `c`: loaded, computed and
/// stored back a vector at a time.
fn plane_epilogue(
    k: &mut Kb,
    (ep, bases): (&NchwEpilogue, &[Value]),
    at: Value,
    c: Value,
    len: usize,
) {
    let fixed = fixed_operands(k, ep, bases, c);
    let Some(&out) = ep
        .ins
        .iter()
        .zip(bases)
        .find(|(i, _)| **i == NchwInput::Product)
        .map(|(_, p)| p)
    else {
        return;
    };
    let one = |k: &mut Kb, at: Value, n: usize| {
        let p = k.b.ins().iadd(out, at);
        let product = k.load_lanes(p, 0, n);
        let y = epilogue_value(k, (ep, bases, &fixed), product, (at, 0, n));
        super::matmul::store_lanes(k, y, p, 0, n);
    };
    let whole = len / 4;
    if whole > 0 {
        k.for_const(0, whole, |k, i| {
            let o = k.b.ins().imul_imm_s(i, 16);
            let a = k.b.ins().iadd(at, o);
            one(k, a, 4);
        });
    }
    if !len.is_multiple_of(4) {
        let a = k.b.ins().iadd_imm_s(at, (whole * 16) as i64);
        one(k, a, len % 4);
    }
}

/// An epilogue as one direct-conv tile applies it: the program, each operand's
/// base address, `y`'s base and the tile's first output channel.
type TileEp<'a> = (&'a NchwEpilogue, &'a [Value], Value, Value);

/// One `rows × lanes` output tile (`lanes ≤ 4·nv`) at `yq`, reading the
/// padded input at `xq` and the weight panel at `wp`: accumulate every
/// tap over all input channels (of the kernel rows `kh_rows` only, where
/// given), run the epilogue, then store.
fn direct_tile(
    k: &mut Kb,
    s: &DirectConv,
    (xq, wp, yq): (Value, Value, Value),
    (rows, lanes): (usize, usize),
    kh_rows: Option<(Value, Value)>,
    ep: Option<TileEp>,
) {
    let nvec = lanes.div_ceil(4);
    let zero_v = k.vconst(0.0);
    let accs: Vec<Vec<Variable>> = (0..rows)
        .map(|_| (0..nvec).map(|_| k.var(F32X4, zero_v)).collect())
        .collect();
    let plane = (s.hp * s.wp * 4) as i64;
    let tap_bytes = (s.mr * W_ELEM_BYTES) as i64;
    let row_bytes = (s.wp * s.dilation * 4) as i64;
    // One tap: input pixels at `px + x_off`, its packed weights (already
    // broadcast) at `pw + w_off`. As in the matmul micro-kernel, each
    // row's weight vector is shared by the row's FMAs through register copies,
    // and every second tap visits rows and columns in reverse, so that a
    // pair of taps leaves every accumulator in the register it started in
    // (see `matmul::micro_kernel`; the kernel is compiled without the
    // optimiser, which would reorder the taps).
    let tap = |k: &mut Kb, px: Value, pw: Value, (x_off, w_off): (i64, i64), reverse: bool| {
        let bv: Vec<Value> = (0..nvec)
            .map(|j| {
                let off = (x_off + (j * 16) as i64) as i32;
                k.b.ins().load(F32X4, ro_unaligned(), px, off)
            })
            .collect();
        let rows_order = step_order(rows, reverse);
        let cols_order = step_order(nvec, reverse);
        for &i in &rows_order {
            let off = (w_off + (i * W_ELEM_BYTES) as i64) as i32;
            let a = k.b.ins().load(F32X4, ro_flags(), pw, off);
            for &j in &cols_order {
                let var = accs[i][j];
                let old = k.b.use_var(var);
                let new = k.b.ins().fma(a, bv[j], old);
                k.b.def_var(var, new);
            }
        }
    };
    let kw_bytes = (s.dilation * 4) as i64;
    // Few taps (lenet's first layer has 25, vgg's 27) run unrolled at
    // constant offsets: with one or three input channels the loops below
    // leave a tap without its pair in every iteration, and an unpaired tap
    // costs a register move per accumulator on the loop edge.
    let reach = s.c as i64 * plane + s.kh as i64 * row_bytes + s.kw as i64 * kw_bytes + 64;
    if s.r() <= DIRECT_UNROLL_TAPS && reach < i32::MAX as i64 {
        for a in 0..s.kh {
            let row = |k: &mut Kb| {
                for b in 0..s.kw {
                    for c in 0..s.c {
                        let r = (a * s.kw + b) * s.c + c;
                        let x_off = c as i64 * plane + a as i64 * row_bytes + b as i64 * kw_bytes;
                        tap(k, xq, wp, (x_off, r as i64 * tap_bytes), r % 2 == 1);
                    }
                }
            };
            match kh_rows {
                Some((lo, hi)) => {
                    let ge =
                        k.b.ins()
                            .icmp_imm_s(IntCC::SignedLessThanOrEqual, lo, a as i64);
                    let lt = k.b.ins().icmp_imm_s(IntCC::SignedGreaterThan, hi, a as i64);
                    let inside = k.b.ins().band(ge, lt);
                    k.if_then(inside, row);
                }
                None => row(k),
            }
        }
    } else {
        // Taps in `(kh, kw, c)` order, two input channels per iteration.
        // The tap pointers are loop-carried (bumped, not recomputed from
        // the loop counters), since address arithmetic is not hoisted out
        // of the loops.
        let (kh_lo, kh_hi) = match kh_rows {
            Some(r) => r,
            None => (k.iconst(0), k.iconst(s.kh as i64)),
        };
        let px0 = k.addr(xq, kh_lo, row_bytes);
        let pw0 = k.addr(wp, kh_lo, (s.kw * s.c) as i64 * tap_bytes);
        let px_v = k.var(I64, px0);
        let pw_v = k.var(I64, pw0);
        let bump = |k: &mut Kb, v: Variable, by: i64| {
            let p = k.b.use_var(v);
            let p = k.b.ins().iadd_imm_s(p, by);
            k.b.def_var(v, p);
        };
        let pairs = s.c / 2;
        k.for_range(kh_lo, kh_hi, 1, |k, _| {
            k.for_const(0, s.kw, |k, _| {
                if pairs > 0 {
                    k.for_const(0, pairs, |k, _| {
                        let px = k.b.use_var(px_v);
                        let pw = k.b.use_var(pw_v);
                        tap(k, px, pw, (0, 0), false);
                        tap(k, px, pw, (plane, tap_bytes), true);
                        bump(k, px_v, 2 * plane);
                        bump(k, pw_v, 2 * tap_bytes);
                    });
                }
                if s.c % 2 == 1 {
                    let px = k.b.use_var(px_v);
                    let pw = k.b.use_var(pw_v);
                    tap(k, px, pw, (0, 0), false);
                    bump(k, px_v, plane);
                    bump(k, pw_v, tap_bytes);
                }
                bump(k, px_v, kw_bytes - s.c as i64 * plane);
            });
            bump(k, px_v, row_bytes - s.kw as i64 * kw_bytes);
        });
    }
    let ob = (s.oh * s.ow * 4) as i64;
    if let Some(ep) = ep {
        tile_epilogue(k, ep, yq, &accs, (ob, lanes));
    }
    for (i, acc) in accs.iter().enumerate() {
        for (j, var) in acc.iter().enumerate() {
            let v = k.b.use_var(*var);
            let off = (i as i64 * ob + (j * 16) as i64) as i32;
            super::matmul::store_lanes(k, v, yq, off, (lanes - 4 * j).min(4));
        }
    }
}

/// Replace each accumulator of a tile at `yq` (rows `ob` bytes apart, the
/// first `lanes` columns valid) with the epilogue program's value there.
fn tile_epilogue(
    k: &mut Kb,
    (ep, bases, ybase, o0): TileEp,
    yq: Value,
    accs: &[Vec<Variable>],
    (ob, lanes): (i64, usize),
) {
    // Byte offset of the tile in `y`, which a `Full` operand shares.
    let at = k.b.ins().isub(yq, ybase);
    for (i, acc) in accs.iter().enumerate() {
        let o = k.b.ins().iadd_imm_s(o0, i as i64);
        let fixed = fixed_operands(k, ep, bases, o);
        for (j, var) in acc.iter().enumerate() {
            let off = (i as i64 * ob + (j * 16) as i64) as i32;
            let n = (lanes - 4 * j).min(4);
            let product = k.b.use_var(*var);
            let y = epilogue_value(k, (ep, bases, &fixed), product, (at, off, n));
            k.b.def_var(*var, y);
        }
    }
}

/// Output-channel rows per filter-gradient work unit.
pub const GF_MR: usize = 3;
/// Kernel columns accumulated at once by the filter-gradient kernel.
const GF_KWC: usize = 3;
/// Terms a filter-gradient lane adds to one running sum before it is
/// added to the total (see [`gf_tile`]), as `reduce::SUM_BLOCK`'s rows.
const GF_BLOCK_TERMS: usize = 256;
/// Kernel widths up to which the filter gradient takes the direct kernel,
/// whose code holds one tile per `GF_KWC` columns: a 2000-wide kernel made
/// 137 000 instructions and took seconds and gigabytes to compile. Wider
/// kernels take the im2col route, whose loops do not grow with the kernel.
pub const GF_MAX_KW: usize = 16;

/// Filter gradient of a stride-1 convolution:
/// `dw[o, c, kh, kw] = Σ_{n, i, j} dy[n, o, i, j] · xp[n, c, i + kh·d, j + kw·d]`
/// over the padded input. Each f32x4 accumulator lane sums columns
/// `j ≡ lane (mod 4)` in `(n, i, j)` order, the lanes are then added in a
/// fixed order. Work units are `(o panel, c, kh)`; a unit owns its outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct DirectGradFilter {
    pub xp: Loc,
    pub dy: Loc,
    pub dw: Loc,
    pub n: usize,
    pub c: usize,
    pub o: usize,
    pub hp: usize,
    pub wp: usize,
    pub kh: usize,
    pub kw: usize,
    pub dilation: usize,
    pub oh: usize,
    pub ow: usize,
}

impl DirectGradFilter {
    fn emit(&self, kb: &mut Kb) {
        let xbase = kb.base(self.xp);
        let dybase = kb.base(self.dy);
        let dwbase = kb.base(self.dw);
        let (start, end) = (kb.start, kb.end);
        let s = self.clone();
        let op = s.o.div_ceil(GF_MR);
        let rem = s.o - (op - 1) * GF_MR;
        kb.for_range(start, end, 1, |k, u| {
            let kh = k.b.ins().urem_imm_u(u, s.kh as i64);
            let t = k.b.ins().udiv_imm_u(u, s.kh as i64);
            let c = k.b.ins().urem_imm_u(t, s.c as i64);
            let p = k.b.ins().udiv_imm_u(t, s.c as i64);
            let o0 = k.b.ins().imul_imm_s(p, GF_MR as i64);
            // x of (n = 0, c, row kh·d); dy of (n = 0, o0); dw of (o0, c, kh).
            let xc = k.addr(xbase, c, (s.hp * s.wp * 4) as i64);
            let xc = k.addr(xc, kh, (s.dilation * s.wp * 4) as i64);
            let dyo = k.addr(dybase, o0, (s.oh * s.ow * 4) as i64);
            let dwo = k.b.ins().imul_imm_s(o0, s.c as i64);
            let dwo = k.b.ins().iadd(dwo, c);
            let dwo = k.b.ins().imul_imm_s(dwo, s.kh as i64);
            let dwo = k.b.ins().iadd(dwo, kh);
            let dwp = k.addr(dwbase, dwo, (s.kw * 4) as i64);
            let body = |k: &mut Kb, rows: usize| {
                let mut kw0 = 0;
                while kw0 < s.kw {
                    let cols = GF_KWC.min(s.kw - kw0);
                    gf_tile(k, &s, xc, dyo, dwp, rows, kw0, cols);
                    kw0 += cols;
                }
            };
            if rem < GF_MR {
                let last = k.b.ins().icmp_imm_s(IntCC::Equal, p, op as i64 - 1);
                k.if_else(last, |k| body(k, rem), |k| body(k, GF_MR));
            } else {
                body(k, GF_MR);
            }
        });
    }
}

/// Accumulate `dw[o0 + i, c, kh, kw0 + j]` for `i < rows`, `j < cols`.
#[allow(clippy::too_many_arguments)]
fn gf_tile(
    k: &mut Kb,
    s: &DirectGradFilter,
    xc: Value,
    dyo: Value,
    dwp: Value,
    rows: usize,
    kw0: usize,
    cols: usize,
) {
    let zero_v = k.vconst(0.0);
    let accs: Vec<Vec<Variable>> = (0..rows)
        .map(|_| (0..cols).map(|_| k.var(F32X4, zero_v)).collect())
        .collect();
    let dy_plane = (s.oh * s.ow * 4) as i64;
    let full = s.ow / 4;
    let tail = s.ow % 4;
    // One group of 4 output columns at `dyr + off` / `xr + off`. As in the
    // matmul micro-kernel, every second group visits the accumulators in
    // reverse, so that a pair of groups leaves each in the register it
    // started in (see `matmul::micro_kernel`); `dy` is loaded row by row,
    // just before its FMAs, to keep the live vectors within the 16 xmm
    // registers.
    let step = |k: &mut Kb, dyr: Value, xr: Value, off: i64, lanes: usize, reverse: bool| {
        let load = |k: &mut Kb, p: Value, off: i64| -> Value {
            if lanes == 4 {
                k.b.ins().load(F32X4, ro_unaligned(), p, off as i32)
            } else {
                let mut v = k.vconst(0.0);
                for l in 0..lanes {
                    let e =
                        k.b.ins()
                            .load(F32, ro_unaligned(), p, (off + 4 * l as i64) as i32);
                    v = k.b.ins().insertlane(v, e, l as u8);
                }
                v
            }
        };
        let xv: Vec<Value> = (0..cols)
            .map(|j| load(k, xr, off + ((kw0 + j) * s.dilation * 4) as i64))
            .collect();
        let rows_order = step_order(rows, reverse);
        let cols_order = step_order(cols, reverse);
        for &i in &rows_order {
            let dv = load(k, dyr, off + i as i64 * dy_plane);
            for &j in &cols_order {
                let var = accs[i][j];
                let old = k.b.use_var(var);
                let new = k.b.ins().fma(dv, xv[j], old);
                k.b.def_var(var, new);
            }
        }
    };
    // Long sums in blocks: every `block_rows` rows of `(n, i)`, the
    // accumulators are added to totals on the stack and start again from
    // zero, so that no lane adds more than about `GF_BLOCK_TERMS` terms
    // to one running f32 (a 65k-term sum over 64 images of 32 × 32 was
    // 8.5e-5 off the f64 sum in one chain per lane).
    let block_rows = (GF_BLOCK_TERMS / s.ow.div_ceil(4)).max(1);
    let blocked = s.n * s.oh > block_rows;
    let totals = blocked.then(|| {
        let buf = k.stack_buf((rows * cols * 16) as u32);
        for t in 0..rows * cols {
            k.b.ins().store(flags(), zero_v, buf, (16 * t) as i32);
        }
        let zero = k.iconst(0);
        (buf, k.var(I64, zero))
    });
    let flush = |k: &mut Kb, buf: Value| {
        for (t, &var) in accs.iter().flatten().enumerate() {
            let acc = k.b.use_var(var);
            let sum = k.load_v(buf, (16 * t) as i32);
            let sum = k.b.ins().fadd(sum, acc);
            k.b.ins().store(flags(), sum, buf, (16 * t) as i32);
            k.b.def_var(var, zero_v);
        }
    };
    let (pairs, odd) = (full / 2, full % 2 == 1);
    k.for_const(0, s.n, |k, n| {
        let xn = k.addr(xc, n, (s.c * s.hp * s.wp * 4) as i64);
        let dyn_ = k.addr(dyo, n, (s.o * s.oh * s.ow * 4) as i64);
        k.for_const(0, s.oh, |k, i| {
            let xr = k.addr(xn, i, (s.wp * 4) as i64);
            let dyr = k.addr(dyn_, i, (s.ow * 4) as i64);
            // Two column groups per iteration, with loop-carried pointers.
            let d_v = k.var(I64, dyr);
            let x_v = k.var(I64, xr);
            if pairs > 0 {
                k.for_const(0, pairs, |k, _| {
                    let d = k.b.use_var(d_v);
                    let x = k.b.use_var(x_v);
                    step(k, d, x, 0, 4, false);
                    step(k, d, x, 16, 4, true);
                    let d = k.b.ins().iadd_imm_s(d, 32);
                    let x = k.b.ins().iadd_imm_s(x, 32);
                    k.b.def_var(d_v, d);
                    k.b.def_var(x_v, x);
                });
            }
            let d = k.b.use_var(d_v);
            let x = k.b.use_var(x_v);
            if odd {
                step(k, d, x, 0, 4, false);
            }
            if tail > 0 {
                let off = if odd { 16 } else { 0 };
                step(k, d, x, off, tail, false);
            }
            if let Some((buf, count)) = totals {
                let c = k.b.use_var(count);
                let c = k.b.ins().iadd_imm_s(c, 1);
                k.b.def_var(count, c);
                let full = k.b.ins().icmp_imm_s(IntCC::Equal, c, block_rows as i64);
                k.if_then(full, |k| {
                    flush(k, buf);
                    let zero = k.iconst(0);
                    k.b.def_var(count, zero);
                });
            }
        });
    });
    if let Some((buf, _)) = totals {
        flush(k, buf);
    }
    let kk = (s.c * s.kh * s.kw * 4) as i64;
    for (i, acc) in accs.iter().enumerate() {
        for (j, var) in acc.iter().enumerate() {
            let v = match totals {
                Some((buf, _)) => k.load_v(buf, (16 * (i * cols + j)) as i32),
                None => k.b.use_var(*var),
            };
            let l: Vec<Value> = (0..4).map(|l| k.b.ins().extractlane(v, l as u8)).collect();
            let a = k.b.ins().fadd(l[0], l[1]);
            let b = k.b.ins().fadd(l[2], l[3]);
            let t = k.b.ins().fadd(a, b);
            k.store_f(t, dwp, (i as i64 * kk + ((kw0 + j) * 4) as i64) as i32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_tiles_fit_the_layer() {
        // vgg's layers (and their input gradients) fill 5 × 8 tiles.
        for (m, ow) in [(32, 32), (64, 16), (32, 16)] {
            assert_eq!(direct_tile_shape(m, ow), (5, 2), "m = {m}, ow = {ow}");
        }
        // lenet's waste most of them: 6 channels at 28 columns (and the
        // input gradient's 6 at 14 and 1 at 28) take 2 × 16, 16 channels
        // at 10 columns 3 × 12.
        assert_eq!(direct_tile_shape(6, 28), (2, 4));
        assert_eq!(direct_tile_shape(6, 14), (2, 4));
        assert_eq!(direct_tile_shape(1, 28), (2, 4));
        assert_eq!(direct_tile_shape(16, 10), (3, 3));
    }
}
