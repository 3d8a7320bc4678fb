//! Copies that swap the last two axes (`[.., C, R] → [.., R, C]`, what
//! autodiff's transposes of matmul operands are): 4×4 tiles moved through
//! registers, so both the reads and the writes are 16-byte vectors instead
//! of one strided scalar load per element.

use super::emit::Kb;
use super::kernel::Copy;
use cranelift_codegen::ir::types::I8X16;
use cranelift_codegen::ir::{ConstantData, InstBuilder, Value};

/// Rows of the output per work unit.
const TILE: usize = 4;

/// The shape of a copy this module handles: the destination is contiguous
/// along its last two axes and the source is contiguous along the
/// destination's second-to-last axis. Returns `(rows, cols, src_col_stride)`
/// of the 2-D slabs.
pub fn transposed_slab(c: &Copy) -> Option<(usize, usize, i64)> {
    let n = c.dims.len();
    if n < 2 {
        return None;
    }
    let (rows, cols) = (c.dims[n - 2], c.dims[n - 1]);
    let ds = &c.dst.strides;
    let ss = &c.src.strides;
    let dst_rows_contiguous = ds[n - 1] == 1 && ds[n - 2] == cols as i64;
    let src_transposed = ss[n - 2] == 1 && ss[n - 1] != 1;
    (dst_rows_contiguous && src_transposed && rows >= TILE && cols >= TILE).then_some((
        rows,
        cols,
        ss[n - 1],
    ))
}

/// Work units: blocks of `TILE` output rows of every slab.
pub fn units(c: &Copy, rows: usize) -> usize {
    let slabs: usize = c.dims[..c.dims.len() - 2].iter().product();
    slabs * rows.div_ceil(TILE)
}

fn mask(k: &mut Kb, bytes: [u8; 16]) -> cranelift_codegen::ir::Immediate {
    k.b.func.dfg.immediates.push(ConstantData::from(&bytes[..]))
}

/// `[a0 b0 a1 b1]`, `[a2 b2 a3 b3]`, `[a0 a1 b0 b1]`, `[a2 a3 b2 b3]` for
/// 32-bit lanes: each lowers to one unpack instruction.
fn lanes(k: &mut Kb) -> [cranelift_codegen::ir::Immediate; 4] {
    let lo32 = [0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23];
    let hi32 = [8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31];
    let lo64 = [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23];
    let hi64 = [8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31];
    [mask(k, lo32), mask(k, hi32), mask(k, lo64), mask(k, hi64)]
}

pub fn emit(kb: &mut Kb, c: &Copy, rows: usize, cols: usize, ss: i64) {
    let sbase = kb.base(c.src.loc);
    let dbase = kb.base(c.dst.loc);
    let (start, end) = (kb.start, kb.end);
    let n = c.dims.len();
    let blocks = rows.div_ceil(TILE);
    let slab_dims = c.dims[..n - 2].to_vec();
    let slab_strides = vec![
        c.src.strides[..n - 2].to_vec(),
        c.dst.strides[..n - 2].to_vec(),
    ];
    let [lo32, hi32, lo64, hi64] = lanes(kb);
    let flags = super::emit::flags();
    kb.for_range(start, end, 1, |k, u| {
        let slab = k.b.ins().udiv_imm_u(u, blocks as i64);
        let block = k.b.ins().urem_imm_u(u, blocks as i64);
        let offs = if slab_dims.is_empty() {
            vec![k.iconst(0), k.iconst(0)]
        } else {
            k.unflatten_offsets(slab, &slab_dims, &slab_strides)
        };
        let r0 = k.b.ins().imul_imm_s(block, TILE as i64);
        // Source element (r, j) at r + j·ss; destination at r·cols + j.
        let s_off = k.b.ins().iadd(offs[0], r0);
        let s_off = k.b.ins().iadd_imm_s(s_off, c.src.off as i64);
        let d_row = k.b.ins().imul_imm_s(r0, cols as i64);
        let d_off = k.b.ins().iadd(offs[1], d_row);
        let d_off = k.b.ins().iadd_imm_s(d_off, c.dst.off as i64);
        let s0 = k.addr(sbase, s_off, 4);
        let d0 = k.addr(dbase, d_off, 4);
        let scalar_rows = |k: &mut Kb, nrows: Value| {
            let zero = k.iconst(0);
            k.for_range(zero, nrows, 1, |k, r| {
                let sr = k.addr(s0, r, 4);
                let dr = k.addr(d0, r, 4 * cols as i64);
                let zero = k.iconst(0);
                let nc = k.iconst(cols as i64);
                k.for_range(zero, nc, 1, |k, j| {
                    let sa = k.addr(sr, j, 4 * ss);
                    let v = k.load_i(sa, 0);
                    let da = k.addr(dr, j, 4);
                    k.b.ins().store(flags, v, da, 0);
                });
            });
        };
        let full_block = |k: &mut Kb| {
            let zero = k.iconst(0);
            let full_cols = k.iconst((cols / TILE * TILE) as i64);
            k.for_range(zero, full_cols, TILE as i64, |k, j| {
                let v: Vec<Value> = (0..TILE as i64)
                    .map(|t| {
                        let jt = k.b.ins().iadd_imm_s(j, t);
                        let a = k.addr(s0, jt, 4 * ss);
                        k.b.ins().load(I8X16, flags, a, 0)
                    })
                    .collect();
                let t0 = k.b.ins().shuffle(v[0], v[1], lo32);
                let t1 = k.b.ins().shuffle(v[2], v[3], lo32);
                let t2 = k.b.ins().shuffle(v[0], v[1], hi32);
                let t3 = k.b.ins().shuffle(v[2], v[3], hi32);
                let out = [
                    k.b.ins().shuffle(t0, t1, lo64),
                    k.b.ins().shuffle(t0, t1, hi64),
                    k.b.ins().shuffle(t2, t3, lo64),
                    k.b.ins().shuffle(t2, t3, hi64),
                ];
                let dj = k.addr(d0, j, 4);
                for (r, w) in out.into_iter().enumerate() {
                    k.b.ins().store(flags, w, dj, (r * cols * 4) as i32);
                }
            });
            // Columns past the last whole tile, one element at a time.
            if !cols.is_multiple_of(TILE) {
                let lo = k.iconst((cols / TILE * TILE) as i64);
                let hi = k.iconst(cols as i64);
                k.for_range(lo, hi, 1, |k, j| {
                    let sa = k.addr(s0, j, 4 * ss);
                    let da = k.addr(d0, j, 4);
                    for r in 0..TILE {
                        let v = k.load_i(sa, (4 * r) as i32);
                        k.b.ins().store(flags, v, da, (r * cols * 4) as i32);
                    }
                });
            }
        };
        if rows.is_multiple_of(TILE) {
            full_block(k);
        } else {
            let last = k.iconst((blocks - 1) as i64);
            let is_last =
                k.b.ins()
                    .icmp(cranelift_codegen::ir::condcodes::IntCC::Equal, block, last);
            k.if_else(
                is_last,
                |k| {
                    let left = k.iconst((rows % TILE) as i64);
                    scalar_rows(k, left)
                },
                full_block,
            );
        }
    });
}
