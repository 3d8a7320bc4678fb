//! Convolution and pooling kernels (NCHW). Convolutions are lowered to
//! `im2col` + the matmul kernel (and `col2im` for the input gradient);
//! pooling runs directly, one (n, c) plane per work unit.

use super::emit::{Kb, Loc};
use crate::ir::Conv2d;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, I64};
use cranelift_codegen::ir::{InstBuilder, Value};

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
pub struct Im2col {
    pub x: Loc,
    pub cols: Loc,
    pub n: usize,
    pub c: usize,
    pub g: Geom,
    pub sn: usize,
    pub sr: usize,
}

impl Im2col {
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
    pub g: Geom,
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
        kb.for_range(start, end, 1, |k, u| {
            let ip = k.b.ins().imul_imm_s(u, (g.h * g.w) as i64);
            let xp = k.addr(x, ip, 4);
            let op = k.b.ins().imul_imm_s(u, (g.oh * g.ow) as i64);
            let yp = k.addr(out, op, 4);
            let dyp = k.addr(dy, op, 4);
            let dxp = k.addr(out, ip, 4);
            if matches!(kind, PoolKind::MaxGrad | PoolKind::AvgGrad) {
                let zero = k.iconst(0);
                let hw = k.iconst((g.h * g.w) as i64);
                k.for_range(zero, hw, 1, |k, i| {
                    let a = k.addr(dxp, i, 4);
                    let z = k.fconst(0.0);
                    k.store_f(z, a, 0);
                });
            }
            k.for_const(0, g.oh, |k, oh| {
                k.for_const(0, g.ow, |k, ow| {
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
                            let found =
                                k.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, at, 0);
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
                });
            });
        });
    }
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
