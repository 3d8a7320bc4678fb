//! Batched matmul: operands are packed into panels (A: MR rows × K, B:
//! K × NR columns, zero-padded at the edges), then a register-tiled MR×NR
//! micro-kernel runs over KC-deep blocks of the packed panels.
//!
//! Cache blocking: a KC × (NCP·NR) block of packed B (256 KiB) stays in L2
//! while every row panel of a work chunk streams its MR × KC sliver of A
//! through L1. Work units are row panels of the output; each output element
//! is accumulated in the same k order whatever the chunking, so results do
//! not depend on the thread count.

use super::emit::{flags, ro_flags, Kb, Loc};
use super::kernel::MatmulPhase;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::Variable;

/// Rows of the micro-kernel tile.
pub const MR: usize = 5;
/// Columns of the micro-kernel tile (two f32x4 vectors).
pub const NR: usize = 8;
/// Depth of a packed block.
pub const KC: usize = 256;
/// Column panels per L2 block of B.
pub const NCP: usize = 32;
/// Copies of each A element in its packed panel: one per f32x4 column of
/// the tile, so every FMA has its own load, which Cranelift folds into a
/// `vbroadcastss` from memory (two uses of one load would be merged and
/// kept in a register instead, costing registers the accumulators need).
pub const AREP: usize = NR / 4;
/// Floats per k step of a packed A panel.
const AK: usize = MR * AREP;

/// One matmul operand: element `(batch…, i, j)` is at
/// `off + Σ batch_d · batch_strides_d + i·rs + j·cs` (elements).
#[derive(Clone, Debug, PartialEq)]
pub struct MmOperand {
    pub loc: Loc,
    pub off: usize,
    /// Per output batch dim; 0 where the operand is broadcast.
    pub batch_strides: Vec<i64>,
    pub rs: i64,
    pub cs: i64,
}

/// `C[batch] = A[batch] @ B[batch]`, C contiguous `[batch…, m, n]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Matmul {
    pub batch: Vec<usize>,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub a: MmOperand,
    pub b: MmOperand,
    pub c: Loc,
    pub c_off: usize,
    /// Scratch for the packed panels (see `pack_a_bytes`/`pack_b_bytes`).
    pub pack_a: Loc,
    pub pack_b: Loc,
}

fn pack_dims(batch: &[usize], strides: &[i64]) -> Vec<usize> {
    batch
        .iter()
        .zip(strides)
        .map(|(&d, &s)| if s == 0 { 1 } else { d })
        .collect()
}

/// Strides (in packed-batch units) to find an operand's packed batch from an
/// output batch index; 0 along broadcast dims.
fn pack_index_strides(batch: &[usize], strides: &[i64]) -> Vec<i64> {
    let pd = pack_dims(batch, strides);
    let mut cs = super::kernel::contiguous_strides(&pd);
    for (d, s) in cs.iter_mut().enumerate() {
        if strides[d] == 0 {
            *s = 0;
        }
    }
    cs
}

impl Matmul {
    fn mp(&self) -> usize {
        self.m.div_ceil(MR)
    }
    fn np(&self) -> usize {
        self.n.div_ceil(NR)
    }
    fn a_batches(&self) -> usize {
        pack_dims(&self.batch, &self.a.batch_strides)
            .iter()
            .product()
    }
    fn b_batches(&self) -> usize {
        pack_dims(&self.batch, &self.b.batch_strides)
            .iter()
            .product()
    }
    fn out_batches(&self) -> usize {
        self.batch.iter().product()
    }

    pub fn pack_a_bytes(&self) -> usize {
        self.a_batches() * self.mp() * self.k * AK * 4
    }
    pub fn pack_b_bytes(&self) -> usize {
        self.b_batches() * self.np() * self.k * NR * 4
    }

    pub fn units(&self, p: MatmulPhase) -> usize {
        match p {
            MatmulPhase::PackA => self.a_batches() * self.mp(),
            MatmulPhase::PackB => self.b_batches() * self.np(),
            MatmulPhase::Compute => self.out_batches() * self.mp(),
        }
    }

    pub fn unit_cost(&self, p: MatmulPhase) -> usize {
        match p {
            MatmulPhase::PackA => self.k * MR,
            MatmulPhase::PackB => self.k * NR,
            MatmulPhase::Compute => 2 * MR * self.n * self.k,
        }
    }

    /// Row panels per chunk: enough rows to reuse each B block, and about
    /// sixteen chunks on large products so two or three threads balance.
    pub fn compute_grain(&self) -> usize {
        let units = self.units(MatmulPhase::Compute);
        let flops = units * self.unit_cost(MatmulPhase::Compute);
        if flops < (1 << 20) {
            return units.max(1);
        }
        units.div_ceil(16).clamp(1, 24)
    }

    pub fn emit(&self, kb: &mut Kb, p: MatmulPhase) {
        match p {
            MatmulPhase::PackA => self.emit_pack_a(kb),
            MatmulPhase::PackB => self.emit_pack_b(kb),
            MatmulPhase::Compute => self.emit_compute(kb),
        }
    }

    fn emit_pack_a(&self, kb: &mut Kb) {
        let src = kb.base(self.a.loc);
        let dst = kb.base(self.pack_a);
        let mp = self.mp() as i64;
        let pd = pack_dims(&self.batch, &self.a.batch_strides);
        let (start, end) = (kb.start, kb.end);
        let m_rem = self.m - (self.mp() - 1) * MR;
        kb.for_range(start, end, 1, |k, u| {
            let ai = k.b.ins().udiv_imm_u(u, mp);
            let ip = k.b.ins().urem_imm_u(u, mp);
            let off = k.unflatten_offsets(ai, &pd, std::slice::from_ref(&self.a.batch_strides))[0];
            let off = k.b.ins().iadd_imm_s(off, self.a.off as i64);
            let row0 = k.b.ins().imul_imm_s(ip, (MR as i64) * self.a.rs);
            let off = k.b.ins().iadd(off, row0);
            let sp = k.addr(src, off, 4);
            let dp = k.b.ins().imul_imm_s(u, (self.k * AK * 4) as i64);
            let dp = k.b.ins().iadd(dst, dp);
            let last = k.b.ins().icmp_imm_s(IntCC::Equal, ip, mp - 1);
            let panel = |k: &mut Kb, rows: usize| {
                let zero = k.iconst(0);
                let kk_n = k.iconst(self.k as i64);
                k.for_range(zero, kk_n, 1, |k, kk| {
                    let s = k.addr(sp, kk, 4 * self.a.cs);
                    let d = k.addr(dp, kk, 4 * AK as i64);
                    for r in 0..MR {
                        let v = if r < rows {
                            k.load_f(s, (r as i64 * self.a.rs * 4) as i32)
                        } else {
                            k.fconst(0.0)
                        };
                        for h in 0..AREP {
                            k.store_f(v, d, ((r * AREP + h) * 4) as i32);
                        }
                    }
                });
            };
            k.if_else(last, |k| panel(k, m_rem), |k| panel(k, MR));
        });
    }

    fn emit_pack_b(&self, kb: &mut Kb) {
        let src = kb.base(self.b.loc);
        let dst = kb.base(self.pack_b);
        let np = self.np() as i64;
        let pd = pack_dims(&self.batch, &self.b.batch_strides);
        let (start, end) = (kb.start, kb.end);
        let n_rem = self.n - (self.np() - 1) * NR;
        let cs = self.b.cs;
        kb.for_range(start, end, 1, |k, u| {
            let bi = k.b.ins().udiv_imm_u(u, np);
            let jp = k.b.ins().urem_imm_u(u, np);
            let off = k.unflatten_offsets(bi, &pd, std::slice::from_ref(&self.b.batch_strides))[0];
            let off = k.b.ins().iadd_imm_s(off, self.b.off as i64);
            let col0 = k.b.ins().imul_imm_s(jp, (NR as i64) * cs);
            let off = k.b.ins().iadd(off, col0);
            let sp = k.addr(src, off, 4);
            let dp = k.b.ins().imul_imm_s(u, (self.k * NR * 4) as i64);
            let dp = k.b.ins().iadd(dst, dp);
            let last = k.b.ins().icmp_imm_s(IntCC::Equal, jp, np - 1);
            let panel = |k: &mut Kb, cols: usize| {
                let zero = k.iconst(0);
                let kk_n = k.iconst(self.k as i64);
                k.for_range(zero, kk_n, 1, |k, kk| {
                    let s = k.addr(sp, kk, 4 * self.b.rs);
                    let d = k.addr(dp, kk, 4 * NR as i64);
                    if cols == NR && cs == 1 {
                        for h in 0..2 {
                            let v = k.load_v(s, h * 16);
                            k.b.ins().store(flags(), v, d, h * 16);
                        }
                    } else {
                        for c in 0..NR {
                            let v = if c < cols {
                                k.load_f(s, (c as i64 * cs * 4) as i32)
                            } else {
                                k.fconst(0.0)
                            };
                            k.store_f(v, d, (c * 4) as i32);
                        }
                    }
                });
            };
            k.if_else(last, |k| panel(k, n_rem), |k| panel(k, NR));
        });
    }

    fn emit_compute(&self, kb: &mut Kb) {
        let (m, n, kdim) = (self.m, self.n, self.k);
        let (mp, np) = (self.mp(), self.np());
        let pa_base = kb.base(self.pack_a);
        let pb_base = kb.base(self.pack_b);
        let c_base = kb.base(self.c);
        let tile = kb.stack_buf((MR * NR * 4) as u32);
        let (start, end) = (kb.start, kb.end);
        let nkb = kdim.div_ceil(KC);
        let njc = np.div_ceil(NCP);
        let a_ps = pack_index_strides(&self.batch, &self.a.batch_strides);
        let b_ps = pack_index_strides(&self.batch, &self.b.batch_strides);
        let c_bs: Vec<i64> = super::kernel::contiguous_strides(&self.batch)
            .iter()
            .map(|s| s * (m * n) as i64)
            .collect();
        let m_rem = m - (mp - 1) * MR;
        let n_rem = n - (np - 1) * NR;
        kb.for_const(0, nkb, |k, kbi| {
            let k0 = k.b.ins().imul_imm_s(kbi, KC as i64);
            let kdv = k.iconst(kdim as i64);
            let kleft = k.b.ins().isub(kdv, k0);
            let kcap = k.iconst(KC as i64);
            let kc = k.b.ins().smin(kleft, kcap);
            let first = k.b.ins().icmp_imm_s(IntCC::Equal, kbi, 0);
            k.for_const(0, njc, |k, jc| {
                let j0 = k.b.ins().imul_imm_s(jc, NCP as i64);
                let j1 = k.b.ins().iadd_imm_s(j0, NCP as i64);
                let npv = k.iconst(np as i64);
                let j1 = k.b.ins().smin(j1, npv);
                k.for_range(start, end, 1, |k, u| {
                    let bi = k.b.ins().udiv_imm_u(u, mp as i64);
                    let ip = k.b.ins().urem_imm_u(u, mp as i64);
                    let offs = k.unflatten_offsets(
                        bi,
                        &self.batch,
                        &[a_ps.clone(), b_ps.clone(), c_bs.clone()],
                    );
                    let (ai, bj, coff) = (offs[0], offs[1], offs[2]);
                    // pa = pack_a + ((ai·mp + ip)·K + k0)·AK·4
                    let t = k.b.ins().imul_imm_s(ai, mp as i64);
                    let t = k.b.ins().iadd(t, ip);
                    let t = k.b.ins().imul_imm_s(t, kdim as i64);
                    let t = k.b.ins().iadd(t, k0);
                    let pa = k.addr(pa_base, t, (AK * 4) as i64);
                    let row0 = k.b.ins().imul_imm_s(ip, (MR * n) as i64);
                    let crow = k.b.ins().iadd(coff, row0);
                    let crow = k.b.ins().iadd_imm_s(crow, self.c_off as i64);
                    let crow = k.addr(c_base, crow, 4);
                    let last_row = k.b.ins().icmp_imm_s(IntCC::Equal, ip, mp as i64 - 1);
                    let mrv = {
                        let full = k.iconst(MR as i64);
                        let rem = k.iconst(m_rem as i64);
                        k.b.ins().select(last_row, rem, full)
                    };
                    k.for_range(j0, j1, 1, |k, jp| {
                        let t = k.b.ins().imul_imm_s(bj, np as i64);
                        let t = k.b.ins().iadd(t, jp);
                        let t = k.b.ins().imul_imm_s(t, kdim as i64);
                        let t = k.b.ins().iadd(t, k0);
                        let pb = k.addr(pb_base, t, (NR * 4) as i64);
                        let cptr = k.addr(crow, jp, (NR * 4) as i64);
                        let last_col = k.b.ins().icmp_imm_s(IntCC::Equal, jp, np as i64 - 1);
                        let nrv = {
                            let full = k.iconst(NR as i64);
                            let rem = k.iconst(n_rem as i64);
                            k.b.ins().select(last_col, rem, full)
                        };
                        let edge_r = if m_rem < MR { Some(last_row) } else { None };
                        let edge_c = if n_rem < NR { Some(last_col) } else { None };
                        let edge = match (edge_r, edge_c) {
                            (None, None) => None,
                            (Some(a), None) | (None, Some(a)) => Some(a),
                            (Some(a), Some(b)) => Some(k.b.ins().bor(a, b)),
                        };
                        let ldc_full = k.iconst((n * 4) as i64);
                        let (ptr, ldc) = match edge {
                            None => (cptr, ldc_full),
                            Some(e) => {
                                // Edge tiles work in a stack tile; copy the
                                // valid part in (after the first block) and out.
                                let not_first = k.b.ins().bxor_imm_u(first, 1);
                                let copy_in = k.b.ins().band(e, not_first);
                                k.if_then(copy_in, |k| {
                                    copy_tile(k, cptr, (n * 4) as i64, tile, mrv, nrv)
                                });
                                let ntile = k.iconst((NR * 4) as i64);
                                let ptr = k.b.ins().select(e, tile, cptr);
                                let ldc = k.b.ins().select(e, ntile, ldc_full);
                                (ptr, ldc)
                            }
                        };
                        micro_kernel(k, pa, pb, kc, ptr, ldc, first);
                        if let Some(e) = edge {
                            k.if_then(e, |k| {
                                copy_tile_out(k, tile, cptr, (n * 4) as i64, mrv, nrv)
                            });
                        }
                    });
                });
            });
        });
    }
}

/// Copy the valid `rows × cols` corner of C (row stride `ldc` bytes) into
/// the stack tile.
fn copy_tile(k: &mut Kb, c: Value, ldc: i64, tile: Value, rows: Value, cols: Value) {
    let zero = k.iconst(0);
    k.for_range(zero, rows, 1, |k, r| {
        let src = k.addr(c, r, ldc);
        let dst = k.addr(tile, r, (NR * 4) as i64);
        let zero = k.iconst(0);
        k.for_range(zero, cols, 1, |k, j| {
            let s = k.addr(src, j, 4);
            let v = k.load_f(s, 0);
            let d = k.addr(dst, j, 4);
            k.store_f(v, d, 0);
        });
    });
}

fn copy_tile_out(k: &mut Kb, tile: Value, c: Value, ldc: i64, rows: Value, cols: Value) {
    let zero = k.iconst(0);
    k.for_range(zero, rows, 1, |k, r| {
        let src = k.addr(tile, r, (NR * 4) as i64);
        let dst = k.addr(c, r, ldc);
        let zero = k.iconst(0);
        k.for_range(zero, cols, 1, |k, j| {
            let s = k.addr(src, j, 4);
            let v = k.load_f(s, 0);
            let d = k.addr(dst, j, 4);
            k.store_f(v, d, 0);
        });
    });
}

/// `C[MR×NR] (=|+=) Apanel[:, 0..kc] · Bpanel[0..kc, :]`, C rows `ldc`
/// bytes apart; `first` selects overwrite.
fn micro_kernel(k: &mut Kb, pa: Value, pb: Value, kc: Value, c: Value, ldc: Value, first: Value) {
    let zero_v = k.vconst(0.0);
    let accs: Vec<[Variable; 2]> = (0..MR)
        .map(|_| [k.var(F32X4, zero_v), k.var(F32X4, zero_v)])
        .collect();
    let not_first = k.b.ins().bxor_imm_u(first, 1);
    k.if_then(not_first, |k| {
        for (r, acc) in accs.iter().enumerate() {
            let row = k.b.ins().imul_imm_s(ldc, r as i64);
            let row = k.b.ins().iadd(c, row);
            for (h, var) in acc.iter().enumerate() {
                let v = k.load_v(row, (h * 16) as i32);
                k.b.def_var(*var, v);
            }
        }
    });
    let pa_v = k.var(I64, pa);
    let pb_v = k.var(I64, pb);
    let step = |k: &mut Kb, unroll: usize| {
        let a = k.b.use_var(pa_v);
        let bp = k.b.use_var(pb_v);
        for u in 0..unroll {
            let b0 = k.b.ins().load(F32X4, ro_flags(), bp, (u * NR * 4) as i32);
            let b1 =
                k.b.ins()
                    .load(F32X4, ro_flags(), bp, (u * NR * 4 + 16) as i32);
            for (r, acc) in accs.iter().enumerate() {
                for (h, var) in acc.iter().enumerate() {
                    let off = ((u * AK + r * AREP + h) * 4) as i32;
                    let s = k.b.ins().load(F32, ro_flags(), a, off);
                    let av = k.b.ins().splat(F32X4, s);
                    let bv = if h == 0 { b0 } else { b1 };
                    let old = k.b.use_var(*var);
                    let new = k.b.ins().fma(av, bv, old);
                    k.b.def_var(*var, new);
                }
            }
        }
        let a2 = k.b.ins().iadd_imm_s(a, (unroll * AK * 4) as i64);
        let b2 = k.b.ins().iadd_imm_s(bp, (unroll * NR * 4) as i64);
        k.b.def_var(pa_v, a2);
        k.b.def_var(pb_v, b2);
    };
    let zero = k.iconst(0);
    k.for_range(zero, kc, 2, |k, _| step(k, 2));
    let odd = k.b.ins().band_imm_u(kc, 1);
    k.if_then(odd, |k| step(k, 1));
    for (r, acc) in accs.iter().enumerate() {
        let row = k.b.ins().imul_imm_s(ldc, r as i64);
        let row = k.b.ins().iadd(c, row);
        for (h, var) in acc.iter().enumerate() {
            let v = k.b.use_var(*var);
            k.b.ins().store(flags(), v, row, (h * 16) as i32);
        }
    }
}
