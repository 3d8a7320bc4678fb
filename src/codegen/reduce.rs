//! Reductions, softmax / log_softmax and the cross-entropy loss and its
//! gradient. Each work unit owns whole output elements or lines, and
//! accumulates in a fixed order, so chunking never changes a result.

use super::emit::{Kb, Loc};
use super::kernel::{ew_scalar, EwOp};
use super::math::{EXP_P, MAGIC};
use crate::ir::{ReduceOp, UnaryOp};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32X4, I64};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value};

/// Reduce a strided source over `red_dims` for every output element
/// (contiguous over `kept_dims`). Work units are output elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Reduce {
    pub op: ReduceOp,
    pub src: Loc,
    pub dst: Loc,
    pub kept_dims: Vec<usize>,
    pub kept_strides: Vec<i64>,
    pub red_dims: Vec<usize>,
    pub red_strides: Vec<i64>,
}

/// Output elements per work unit when reducing over outer axes.
const COLS: usize = 64;

/// Elements per block of a long line's sum: each block's sum (sixteen
/// lanes of 64 terms here; four lanes of 256 in row programs and softmax
/// rows) is added to the running total in order, so that no running f32
/// adds more than a few hundred terms (one per lane over a whole
/// 40,000-wide row of positive terms was 4.5e-5 off the f64 sum).
pub(crate) const SUM_BLOCK: usize = 1024;

/// Rows per block of a column reduction (see [`Reduce::column_block`]):
/// each output adds one term per row, so its running sums get as many
/// terms per block as a row's lane in a block of [`SUM_BLOCK`].
const COLUMN_SUM_BLOCK: usize = SUM_BLOCK / 4;

impl Reduce {
    /// When the kept axes end in the source's contiguous axis and the
    /// reduction runs over outer axes (a bias gradient: `sum` over the
    /// rows of `[rows, d]`), neighbouring outputs read neighbouring inputs:
    /// each unit then owns `COLS` consecutive outputs and accumulates them
    /// as vectors, row after row. Returns the number of column blocks.
    fn column_blocks(&self) -> Option<usize> {
        let inner = *self.kept_dims.last()?;
        let contiguous = self.kept_strides.last() == Some(&1);
        let outer_reduction = !self.red_dims.is_empty() && self.red_strides.iter().all(|&s| s != 1);
        (contiguous && outer_reduction && inner >= 4).then(|| inner.div_ceil(COLS))
    }

    pub fn units(&self) -> usize {
        match self.column_blocks() {
            Some(blocks) => {
                let outer: usize = self.kept_dims[..self.kept_dims.len() - 1].iter().product();
                outer * blocks
            }
            None => self.kept_dims.iter().product(),
        }
    }
    pub fn unit_cost(&self) -> usize {
        let per_output = self.red_dims.iter().product::<usize>().max(1);
        if self.column_blocks().is_some() {
            per_output * COLS
        } else {
            per_output
        }
    }

    pub fn emit(&self, kb: &mut Kb) {
        if let Some(blocks) = self.column_blocks() {
            return self.emit_columns(kb, blocks);
        }
        let src = kb.base(self.src);
        let dst = kb.base(self.dst);
        let (start, end) = (kb.start, kb.end);
        let count: usize = self.red_dims.iter().product();
        kb.for_range(start, end, 1, |k, u| {
            let off =
                k.unflatten_offsets(u, &self.kept_dims, std::slice::from_ref(&self.kept_strides))
                    [0];
            let p = k.addr(src, off, 4);
            let init = match self.op {
                ReduceOp::Max => k.fconst(f32::NEG_INFINITY),
                _ => k.fconst(0.0),
            };
            let acc = k.var(F32, init);
            let op = self.op;
            let inner_contig = self.red_strides.last() == Some(&1);
            nest(
                k,
                p,
                &self.red_dims,
                &self.red_strides,
                &mut |k, ptr, n, stride| {
                    let zero = k.iconst(0);
                    let nv = k.iconst(n as i64);
                    if inner_contig && stride == 1 && n >= 8 && op != ReduceOp::Max {
                        // Long lines (a whole tensor's, once its axes are
                        // merged) in blocks: each lane of one long line
                        // would add thousands of terms to one f32, which
                        // lost 2e-5 of a 67k-element sum.
                        let add = |k: &mut Kb, p: Value, len: usize| {
                            let h = line_sum_contiguous(k, p, len);
                            let o = k.b.use_var(acc);
                            let s = k.b.ins().fadd(o, h);
                            k.b.def_var(acc, s);
                        };
                        for_chunks(k, (ptr, n, 4), SUM_BLOCK, add);
                    } else {
                        k.for_range(zero, nv, 1, |k, i| {
                            let a = k.addr(ptr, i, 4 * stride);
                            let x = k.load_f(a, 0);
                            let o = k.b.use_var(acc);
                            let s = match op {
                                ReduceOp::Max => k.b.ins().fmax(o, x),
                                _ => k.b.ins().fadd(o, x),
                            };
                            k.b.def_var(acc, s);
                        });
                    }
                },
            );
            let mut r = k.b.use_var(acc);
            if op == ReduceOp::Mean {
                let c = k.fconst(count as f32);
                r = k.b.ins().fdiv(r, c);
            }
            let d = k.addr(dst, u, 4);
            k.store_f(r, d, 0);
        });
    }
}

impl Reduce {
    /// Column mode (see [`Reduce::column_blocks`]): every output element is
    /// accumulated over the reduced axes in row-major order, one element
    /// per lane, so a block's result does not depend on its width or on
    /// which unit computes it. A unit's outputs live in their place in
    /// `dst` while it runs; each pass over them adds `PASS_ROWS` rows, so
    /// the block's rows are read front to back and each output is loaded
    /// and stored once per pass rather than once per row.
    fn emit_columns(&self, kb: &mut Kb, blocks: usize) {
        let src = kb.base(self.src);
        let dst = kb.base(self.dst);
        let (start, end) = (kb.start, kb.end);
        let nk = self.kept_dims.len();
        let inner = self.kept_dims[nk - 1];
        let outer_dims = self.kept_dims[..nk - 1].to_vec();
        let outer_strides = self.kept_strides[..nk - 1].to_vec();
        let full = inner / COLS;
        kb.for_range(start, end, 1, |k, u| {
            let o = k.b.ins().udiv_imm_u(u, blocks as i64);
            let b = k.b.ins().urem_imm_u(u, blocks as i64);
            let src_off = if outer_dims.is_empty() {
                k.iconst(0)
            } else {
                k.unflatten_offsets(o, &outer_dims, std::slice::from_ref(&outer_strides))[0]
            };
            let col = k.b.ins().imul_imm_s(b, COLS as i64);
            let src_off = k.b.ins().iadd(src_off, col);
            let p = k.addr(src, src_off, 4);
            let dst_off = k.b.ins().imul_imm_s(o, inner as i64);
            let dst_off = k.b.ins().iadd(dst_off, col);
            let d = k.addr(dst, dst_off, 4);
            if inner.is_multiple_of(COLS) {
                self.column_block(k, p, d, COLS);
            } else {
                let fullv = k.iconst(full as i64);
                let is_full = k.b.ins().icmp(IntCC::UnsignedLessThan, b, fullv);
                k.if_else(
                    is_full,
                    |k| self.column_block(k, p, d, COLS),
                    |k| self.column_block(k, p, d, inner - full * COLS),
                );
            }
        });
    }

    /// The `width` outputs at `d` from the columns at `p`.
    fn column_block(&self, k: &mut Kb, p: Value, d: Value, width: usize) {
        let op = self.op;
        let init = match op {
            ReduceOp::Max => f32::NEG_INFINITY,
            _ => 0.0,
        };
        fill(k, d, width, init);
        // Rows `0..n` of a line (`row_bytes` apart from `line`) folded into
        // the `width` accumulators at `acc`, `PASS_ROWS` rows per pass.
        let fold = |k: &mut Kb, (line, n, row_bytes): (Value, usize, i64), acc: Value| {
            for_chunks(k, (line, n, row_bytes), PASS_ROWS, |k, q, rows| {
                add_rows(k, op, (q, rows, row_bytes), acc, width)
            });
        };
        // Lines longer than `COLUMN_SUM_BLOCK` rows are summed a block at a
        // time into a buffer, each block's sums then added to the outputs.
        let line_len = self.red_dims.last().copied().unwrap_or(1);
        let block_buf = (op != ReduceOp::Max && line_len > COLUMN_SUM_BLOCK)
            .then(|| k.stack_buf((4 * COLS) as u32));
        nest(
            k,
            p,
            &self.red_dims,
            &self.red_strides,
            &mut |k, line, n, stride| {
                let row_bytes = 4 * stride;
                let Some(buf) = block_buf else {
                    return fold(k, (line, n, row_bytes), d);
                };
                for_chunks(k, (line, n, row_bytes), COLUMN_SUM_BLOCK, |k, q, rows| {
                    fill(k, buf, width, 0.0);
                    fold(k, (q, rows, row_bytes), buf);
                    add_rows(k, op, (buf, 1, 0), d, width);
                });
            },
        );
        if op == ReduceOp::Mean {
            let count: usize = self.red_dims.iter().product();
            let (cv, cs) = (k.vconst(count as f32), k.fconst(count as f32));
            for v in 0..width / 4 {
                let x = k.load_v(d, (16 * v) as i32);
                let y = k.b.ins().fdiv(x, cv);
                k.b.ins().store(super::emit::flags(), y, d, (16 * v) as i32);
            }
            for j in width / 4 * 4..width {
                let x = k.load_f(d, (4 * j) as i32);
                let y = k.b.ins().fdiv(x, cs);
                k.store_f(y, d, (4 * j) as i32);
            }
        }
    }
}

/// `width` f32s at `d` set to `value`.
fn fill(k: &mut Kb, d: Value, width: usize, value: f32) {
    let (v, s) = (k.vconst(value), k.fconst(value));
    for i in 0..width / 4 {
        k.b.ins().store(super::emit::flags(), v, d, (16 * i) as i32);
    }
    for j in width / 4 * 4..width {
        k.store_f(s, d, (4 * j) as i32);
    }
}

/// Rows per pass of [`Reduce::column_block`] over its outputs.
const PASS_ROWS: usize = 8;

/// Fold `rows` rows (`row_bytes` apart, from `q`) of `width` columns into
/// the outputs at `d`, row after row for each output: four vectors at a
/// time, as independent chains, then single vectors, then single lanes.
fn add_rows(
    k: &mut Kb,
    op: ReduceOp,
    (q, rows, row_bytes): (Value, usize, i64),
    d: Value,
    width: usize,
) {
    let combine = |k: &mut Kb, acc: Value, x: Value| match op {
        ReduceOp::Max => k.b.ins().fmax(acc, x),
        _ => k.b.ins().fadd(acc, x),
    };
    let row_ptrs = |k: &mut Kb, q: Value| -> Vec<Value> {
        (0..rows)
            .map(|j| k.b.ins().iadd_imm_s(q, j as i64 * row_bytes))
            .collect()
    };
    let vectors = |k: &mut Kb, q: Value, d: Value, count: usize| {
        let mut accs: Vec<Value> = (0..count).map(|v| k.load_v(d, (16 * v) as i32)).collect();
        for r in row_ptrs(k, q) {
            for (v, acc) in accs.iter_mut().enumerate() {
                let x = k.load_v(r, (16 * v) as i32);
                *acc = combine(k, *acc, x);
            }
        }
        for (v, acc) in accs.into_iter().enumerate() {
            k.b.ins()
                .store(super::emit::flags(), acc, d, (16 * v) as i32);
        }
    };
    let nvec = width / 4;
    for_count(k, nvec / 4, |k, g| {
        let qg = k.addr(q, g, 64);
        let dg = k.addr(d, g, 64);
        vectors(k, qg, dg, 4);
    });
    let done = nvec / 4 * 4;
    if nvec > done {
        let qg = k.b.ins().iadd_imm_s(q, (16 * done) as i64);
        let dg = k.b.ins().iadd_imm_s(d, (16 * done) as i64);
        vectors(k, qg, dg, nvec - done);
    }
    for j in nvec * 4..width {
        let mut acc = k.load_f(d, (4 * j) as i32);
        for r in row_ptrs(k, q) {
            let x = k.load_f(r, (4 * j) as i32);
            acc = combine(k, acc, x);
        }
        k.store_f(acc, d, (4 * j) as i32);
    }
}

/// Walk all but the innermost of `dims` with nested loops and hand the
/// innermost line (pointer, length, stride) to `line`.
fn nest(
    k: &mut Kb,
    ptr: Value,
    dims: &[usize],
    strides: &[i64],
    line: &mut dyn FnMut(&mut Kb, Value, usize, i64),
) {
    if dims.is_empty() {
        line(k, ptr, 1, 0);
    } else if dims.len() == 1 {
        line(k, ptr, dims[0], strides[0]);
    } else {
        let (d0, s0) = (dims[0], strides[0]);
        k.for_const(0, d0, |k, i| {
            let p = k.addr(ptr, i, 4 * s0);
            nest(k, p, &dims[1..], &strides[1..], line);
        });
    }
}

/// `(l0 + l2) + (l1 + l3)`.
pub(crate) fn hsum(k: &mut Kb, v: Value) -> Value {
    let l: Vec<Value> = (0..4).map(|i| k.b.ins().extractlane(v, i as u8)).collect();
    let a = k.b.ins().fadd(l[0], l[2]);
    let b = k.b.ins().fadd(l[1], l[3]);
    k.b.ins().fadd(a, b)
}

/// `max(max(l0, l2), max(l1, l3))`, IEEE `fmax` (NaN propagates).
pub(crate) fn hmax(k: &mut Kb, v: Value) -> Value {
    let l: Vec<Value> = (0..4).map(|i| k.b.ins().extractlane(v, i as u8)).collect();
    let a = k.b.ins().fmax(l[0], l[2]);
    let b = k.b.ins().fmax(l[1], l[3]);
    k.b.ins().fmax(a, b)
}

/// Max over a line of `n` elements `stride` apart, for softmax-like
/// kernels only: the vector part skips NaN lanes (one `maxps` instead of
/// IEEE `fmax`'s seven instructions), which changes nothing downstream as
/// a NaN element makes `Σ exp(x - max)`, and so every result, NaN anyway.
fn line_max(k: &mut Kb, p: Value, n: usize, stride: i64) -> Value {
    if stride == 1 {
        return line_max_contiguous(k, p, n);
    }
    let ninf = k.fconst(f32::NEG_INFINITY);
    let acc = k.var(F32, ninf);
    let zero = k.iconst(0);
    let nv = k.iconst(n as i64);
    k.for_range(zero, nv, 1, |k, i| {
        let a = k.addr(p, i, 4 * stride);
        let x = k.load_f(a, 0);
        let o = k.b.use_var(acc);
        let m = k.b.ins().fmax(o, x);
        k.b.def_var(acc, m);
    });
    k.b.use_var(acc)
}

/// Vectors per block of the contiguous line loops: their chains are
/// independent, and the loop runs `LINE_GROUP` times fewer iterations.
const LINE_GROUP: usize = 4;

/// `max` that skips a NaN in `x` (see [`line_max`]): one `maxps`.
fn vmax_skip_nan(k: &mut Kb, acc: Value, x: Value) -> Value {
    let lt = k.vcmp(FloatCC::LessThan, acc, x);
    k.vsel(lt, x, acc)
}

/// [`line_max`] of a contiguous line: each block of `LINE_GROUP` vectors
/// reduced pairwise, then into one running max (the order
/// [`line_sum_exp_and_max`] also follows for the next line), then the
/// remaining whole vectors, the lanes, and the last `n % 4` elements by
/// IEEE `fmax`.
fn line_max_contiguous(k: &mut Kb, p: Value, n: usize) -> Value {
    let width = 4 * LINE_GROUP;
    let ninf = k.vconst(f32::NEG_INFINITY);
    let acc = k.var(F32X4, ninf);
    for_count(k, n / width, |k, b| {
        let a = k.addr(p, b, (4 * width) as i64);
        let o = k.b.use_var(acc);
        let m = max_block(k, o, a, LINE_GROUP);
        k.b.def_var(acc, m);
    });
    let acc = k.b.use_var(acc);
    finish_max(k, acc, p, n)
}

/// `Σ x` over a contiguous line: blocks of `LINE_GROUP` vectors into as
/// many partial sums, the remaining whole vectors into the first ones,
/// then `(s0 + s1) + (s2 + s3)`, its lanes, and the last `n % 4` elements
/// in order.
fn line_sum_contiguous(k: &mut Kb, p: Value, n: usize) -> Value {
    let width = 4 * LINE_GROUP;
    let zero = k.vconst(0.0);
    let accs: Vec<_> = (0..LINE_GROUP).map(|_| k.var(F32X4, zero)).collect();
    let add = |k: &mut Kb, a: Value, count: usize| {
        for (g, &acc) in accs[..count].iter().enumerate() {
            let x = k.load_v(a, (16 * g) as i32);
            let o = k.b.use_var(acc);
            let s = k.b.ins().fadd(o, x);
            k.b.def_var(acc, s);
        }
    };
    for_count(k, n / width, |k, b| {
        let a = k.addr(p, b, (4 * width) as i64);
        add(k, a, LINE_GROUP);
    });
    let done = n / width * width;
    let a = k.b.ins().iadd_imm_s(p, (4 * done) as i64);
    add(k, a, (n - done) / 4);
    let v: Vec<Value> = accs.iter().map(|a| k.b.use_var(*a)).collect();
    let v = tree_sum(k, &v);
    let mut s = hsum(k, v);
    for j in n / 4 * 4..n {
        let x = k.load_f(p, (4 * j) as i32);
        s = k.b.ins().fadd(s, x);
    }
    s
}

/// The running max `acc` after the `count` vectors at `a`, reduced
/// pairwise first.
fn max_block(k: &mut Kb, acc: Value, a: Value, count: usize) -> Value {
    let xs: Vec<Value> = (0..count).map(|g| k.load_v(a, (16 * g) as i32)).collect();
    let m = tree_max(k, &xs);
    vmax_skip_nan(k, acc, m)
}

/// `max(max(v0, v1), max(v2, v3))` by [`vmax_skip_nan`], for any count ≥ 1.
fn tree_max(k: &mut Kb, vs: &[Value]) -> Value {
    if vs.len() == 1 {
        return vs[0];
    }
    let (a, b) = vs.split_at(vs.len().div_ceil(2));
    let a = tree_max(k, a);
    let b = tree_max(k, b);
    vmax_skip_nan(k, a, b)
}

/// The max of a contiguous line of `n` at `p` from `acc`, the running max
/// of its whole blocks of `LINE_GROUP` vectors.
fn finish_max(k: &mut Kb, acc: Value, p: Value, n: usize) -> Value {
    let width = 4 * LINE_GROUP;
    let done = n / width * width;
    let rest = (n - done) / 4;
    let acc = if rest > 0 {
        let a = k.b.ins().iadd_imm_s(p, (4 * done) as i64);
        max_block(k, acc, a, rest)
    } else {
        acc
    };
    let mut m = hmax(k, acc);
    for j in n / 4 * 4..n {
        let x = k.load_f(p, (4 * j) as i32);
        m = k.b.ins().fmax(m, x);
    }
    m
}

/// `body(k, q, len)` over the `n` items from `p`, `item_bytes` apart, in
/// chunks: a loop over the whole chunks of `chunk` items, then the rest
/// (`len` is known when emitting).
fn for_chunks(
    k: &mut Kb,
    (p, n, item_bytes): (Value, usize, i64),
    chunk: usize,
    body: impl Fn(&mut Kb, Value, usize),
) {
    for_count(k, n / chunk, |k, c| {
        let q = k.addr(p, c, chunk as i64 * item_bytes);
        body(k, q, chunk);
    });
    let rest = n % chunk;
    if rest > 0 {
        let q = k.b.ins().iadd_imm_s(p, (n - rest) as i64 * item_bytes);
        body(k, q, rest);
    }
}

/// `for b in 0..count` with `count` known when emitting, tested at the
/// bottom: one branch per iteration, none when `count` is 0.
fn for_count(k: &mut Kb, count: usize, body: impl FnOnce(&mut Kb, Value)) {
    if count == 0 {
        return;
    }
    let zero = k.iconst(0);
    let iv = k.var(I64, zero);
    let bb = k.b.create_block();
    let exit = k.b.create_block();
    k.b.ins().jump(bb, &[]);
    k.b.switch_to_block(bb);
    let i = k.b.use_var(iv);
    body(k, i);
    let i = k.b.use_var(iv);
    let next = k.b.ins().iadd_imm_s(i, 1);
    k.b.def_var(iv, next);
    let more =
        k.b.ins()
            .icmp_imm_s(IntCC::SignedLessThan, next, count as i64);
    k.b.ins().brif(more, bb, &[], exit, &[]);
    k.b.switch_to_block(exit);
}

/// The clamp below which `exp` is 0: it rounds to n = -127, whose `2^n`
/// built from the exponent field (below) is exactly 0.
const EXP_FLUSH: f32 = -88.0;

/// `exp(d)` of each of `ds`, for lanes `d ≤ 0` or NaN: `x - max` along a
/// line, whose exps meet a sum of at least 1 (the max's own). Each
/// operation is emitted for all vectors before the next, interleaving
/// their chains (see `math.rs`). Cheaper than the general `vexp_n`: no
/// upper clamp, the rounding shift fused into the scaling `fma`, and
/// `2^n` one factor made from the shift's bits. Lanes whose n rounds to
/// -127 or below (d < -87.68) give 0 rather than a subnormal, an absolute
/// error below 1.2e-38; elsewhere the same polynomial and range reduction
/// as `vexp_n`, so the same relative error bound where the result is
/// normal.
fn exp_nonpos_n(k: &mut Kb, ds: &[Value]) -> Vec<Value> {
    let f = |k: &mut Kb, v: f32| k.table_const(F32X4, v.to_bits());
    // The clamp keeps NaN lanes (the compare-and-select shape is one
    // `maxps`, which returns `d` when it is NaN).
    let xc: Vec<Value> = ds
        .iter()
        .map(|&d| {
            let lo = k.vconst(EXP_FLUSH);
            let below = k.vcmp(FloatCC::LessThan, d, lo);
            k.vsel(below, lo, d)
        })
        .collect();
    // n = round(x·log2 e) by the 1.5·2²³ shift: the sum's low mantissa bits
    // hold n (in [-127, 0] after the clamp).
    let shifted: Vec<Value> = xc
        .iter()
        .map(|&x| {
            let log2e = f(k, std::f32::consts::LOG2_E);
            let magic = f(k, MAGIC);
            k.b.ins().fma(x, log2e, magic)
        })
        .collect();
    let nn: Vec<Value> = shifted
        .iter()
        .map(|&s| {
            let magic = f(k, MAGIC);
            let n = k.b.ins().fsub(s, magic);
            k.b.ins().fneg(n)
        })
        .collect();
    // 2^n: the shift's bits moved into the exponent field (MAGIC's own
    // low bits are zero) plus the bias, as 1.0's bits; for n = -127 the
    // field wraps to 0, so 2^n is +0. A NaN lane's bits give 1.0, and the
    // NaN polynomial makes the product NaN.
    let scale: Vec<Value> = shifted
        .iter()
        .map(|&s| {
            let bits = k.b.ins().bitcast(I32X4, MemFlagsData::new(), s);
            let e = k.b.ins().ishl_imm_u(bits, 23);
            let one = k.table_const(I32X4, 1f32.to_bits());
            let e = k.b.ins().iadd(e, one);
            k.b.ins().bitcast(F32X4, MemFlagsData::new(), e)
        })
        .collect();
    let r: Vec<Value> = nn
        .iter()
        .zip(&xc)
        .map(|(&nn, &x)| {
            let c1 = f(k, 0.693_359_4);
            k.b.ins().fma(nn, c1, x)
        })
        .collect();
    let r: Vec<Value> = nn
        .iter()
        .zip(&r)
        .map(|(&nn, &r)| {
            let c2 = f(k, -2.121_944_4e-4);
            k.b.ins().fma(nn, c2, r)
        })
        .collect();
    let mut p: Vec<Value> = r.iter().map(|_| f(k, EXP_P[0])).collect();
    for &c in &EXP_P[1..] {
        p = p
            .iter()
            .zip(&r)
            .map(|(&p, &r)| {
                let cv = f(k, c);
                k.b.ins().fma(p, r, cv)
            })
            .collect();
    }
    let r2: Vec<Value> = r.iter().map(|&r| k.b.ins().fmul(r, r)).collect();
    let rp1: Vec<Value> = r
        .iter()
        .map(|&r| {
            let one = f(k, 1.0);
            k.b.ins().fadd(r, one)
        })
        .collect();
    (0..ds.len())
        .map(|i| {
            let e = k.b.ins().fma(p[i], r2[i], rp1[i]);
            k.b.ins().fmul(e, scale[i])
        })
        .collect()
}

/// `(v0 + v1) + (v2 + v3)`, pairwise for any count ≥ 1.
fn tree_sum(k: &mut Kb, vs: &[Value]) -> Value {
    if vs.len() == 1 {
        return vs[0];
    }
    let (a, b) = vs.split_at(vs.len().div_ceil(2));
    let a = tree_sum(k, a);
    let b = tree_sum(k, b);
    k.b.ins().fadd(a, b)
}

/// `Σ exp(x - m)` over a line; with `store`, also writes each `exp(x - m)`
/// to the same position of the `store` line.
fn line_sum_exp(
    k: &mut Kb,
    p: Value,
    n: usize,
    stride: i64,
    m: Value,
    store: Option<Value>,
) -> Value {
    if stride == 1 {
        return line_sum_exp_contiguous(k, p, n, m, store);
    }
    let z = k.fconst(0.0);
    let acc = k.var(F32, z);
    let zero = k.iconst(0);
    let nv = k.iconst(n as i64);
    k.for_range(zero, nv, 1, |k, i| {
        let a = k.addr(p, i, 4 * stride);
        let x = k.load_f(a, 0);
        let d = k.b.ins().fsub(x, m);
        let dv = k.b.ins().splat(F32X4, d);
        let ev = exp_nonpos_n(k, &[dv])[0];
        let e = k.b.ins().extractlane(ev, 0);
        if let Some(s) = store {
            let sa = k.addr(s, i, 4 * stride);
            k.store_f(e, sa, 0);
        }
        let o = k.b.use_var(acc);
        let t = k.b.ins().fadd(o, e);
        k.b.def_var(acc, t);
    });
    k.b.use_var(acc)
}

/// [`line_sum_exp`] of a contiguous line: blocks of `LINE_GROUP` vectors
/// (their exps interleaved, summed pairwise into one accumulator), then
/// the remaining whole vectors as one smaller group, then the last
/// `n % 4` elements as the lanes of one vector.
fn line_sum_exp_contiguous(
    k: &mut Kb,
    p: Value,
    n: usize,
    m: Value,
    store: Option<Value>,
) -> Value {
    line_sum_exp_and_max(k, p, n, m, store, None).0
}

/// [`line_sum_exp_contiguous`], and with `next`, the [`line_max`] of the
/// contiguous line of `n` there, read in the same loop: the next line's
/// first reads (from memory beyond the cache, where a line is read first)
/// overlap this line's arithmetic.
fn line_sum_exp_and_max(
    k: &mut Kb,
    p: Value,
    n: usize,
    m: Value,
    store: Option<Value>,
    next: Option<Value>,
) -> (Value, Option<Value>) {
    let width = 4 * LINE_GROUP;
    let mv = k.b.ins().splat(F32X4, m);
    // Cranelift folds a constant's load into its use only where no value
    // of the constant's expression tree has two uses: so the loop is
    // tested at the top (the accumulator reaches the next iteration
    // through one use), and a stored exp is summed as loaded back rather
    // than used twice.
    let group = |k: &mut Kb, src: Value, dst: Option<Value>, count: usize| -> Value {
        let ds: Vec<Value> = (0..count)
            .map(|g| {
                let x = k.load_v(src, (16 * g) as i32);
                k.b.ins().fsub(x, mv)
            })
            .collect();
        let es = exp_nonpos_n(k, &ds);
        match dst {
            Some(d) => {
                for (g, &e) in es.iter().enumerate() {
                    k.b.ins().store(super::emit::flags(), e, d, (16 * g) as i32);
                }
                let back: Vec<Value> = (0..count).map(|g| k.load_v(d, (16 * g) as i32)).collect();
                tree_sum(k, &back)
            }
            None => tree_sum(k, &es),
        }
    };
    let v0 = k.vconst(0.0);
    let acc = k.var(F32X4, v0);
    let ninf = k.vconst(f32::NEG_INFINITY);
    let next_max = k.var(F32X4, ninf);
    let blocks = |k: &mut Kb, lo: Value, hi: Value| {
        k.for_blocks(lo, hi, width as i64, |k, i| {
            if let Some(q) = next {
                let a = k.addr(q, i, 4);
                let o = k.b.use_var(next_max);
                let nm = max_block(k, o, a, LINE_GROUP);
                k.b.def_var(next_max, nm);
            }
            let a = k.addr(p, i, 4);
            let d = store.map(|s| k.addr(s, i, 4));
            let t = group(k, a, d, LINE_GROUP);
            let o = k.b.use_var(acc);
            let s = k.b.ins().fadd(o, t);
            k.b.def_var(acc, s);
        });
    };
    // Whole groups, a long line's in blocks (see `Kb::sum_in_blocks`); a
    // line shorter than a group (ten classes) has no group loop.
    let done = n / width * width;
    if done > 0 {
        k.sum_in_blocks(done, SUM_BLOCK, (&[acc], v0), blocks);
    }
    let rest = (n - done) / 4;
    if rest > 0 {
        let a = k.b.ins().iadd_imm_s(p, (4 * done) as i64);
        let d = store.map(|s| k.b.ins().iadd_imm_s(s, (4 * done) as i64));
        let t = group(k, a, d, rest);
        let o = k.b.use_var(acc);
        let s = k.b.ins().fadd(o, t);
        k.b.def_var(acc, s);
    }
    let total = k.b.use_var(acc);
    let mut total = hsum(k, total);
    let tail = n / 4 * 4..n;
    if !tail.is_empty() {
        // The last elements as lanes of one vector; unused lanes repeat
        // the first and are ignored.
        let mut dv = None;
        for (lane, j) in tail.clone().enumerate() {
            let x = k.load_f(p, (4 * j) as i32);
            let d = k.b.ins().fsub(x, m);
            dv = Some(match dv {
                None => k.b.ins().splat(F32X4, d),
                Some(v) => k.b.ins().insertlane(v, d, lane as u8),
            });
        }
        let ev = exp_nonpos_n(k, &[dv.unwrap_or(mv)])[0];
        for (lane, j) in tail.enumerate() {
            let e = k.b.ins().extractlane(ev, lane as u8);
            if let Some(s) = store {
                k.store_f(e, s, (4 * j) as i32);
            }
            total = k.b.ins().fadd(total, e);
        }
    }
    let next_max = next.map(|q| {
        let acc = k.b.use_var(next_max);
        finish_max(k, acc, q, n)
    });
    (total, next_max)
}

/// `softmax`/`log_softmax` along an axis of length `len` with `inner`
/// elements after it. Work units are lines (`outer · inner`).
#[derive(Clone, Debug, PartialEq)]
pub struct Softmax {
    pub src: Loc,
    pub dst: Loc,
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
    pub log: bool,
}

impl Softmax {
    pub fn units(&self) -> usize {
        self.outer * self.inner
    }
    pub fn unit_cost(&self) -> usize {
        self.len * 12
    }

    pub fn emit(&self, kb: &mut Kb) {
        let src = kb.base(self.src);
        let dst = kb.base(self.dst);
        let (start, end) = (kb.start, kb.end);
        let stride = self.inner as i64;
        let n = self.len;
        kb.for_range(start, end, 1, |k, u| {
            let o = k.b.ins().udiv_imm_u(u, self.inner as i64);
            let i = k.b.ins().urem_imm_u(u, self.inner as i64);
            let off = k.b.ins().imul_imm_s(o, (self.len * self.inner) as i64);
            let off = k.b.ins().iadd(off, i);
            let sp = k.addr(src, off, 4);
            let dp = k.addr(dst, off, 4);
            let m = line_max(k, sp, n, stride);
            let zero = k.iconst(0);
            let nv = k.iconst(n as i64);
            if self.log && stride == 1 {
                let s = line_sum_exp(k, sp, n, stride, m, None);
                let ls = ew_scalar(k, &EwOp::Unary(UnaryOp::Log), &[s]);
                let (mv, lsv) = (k.b.ins().splat(F32X4, m), k.b.ins().splat(F32X4, ls));
                k.for_vec_tail(
                    zero,
                    nv,
                    |k, j| {
                        let a = k.addr(sp, j, 4);
                        let x = k.load_v(a, 0);
                        let y = k.b.ins().fsub(x, mv);
                        let y = k.b.ins().fsub(y, lsv);
                        let d = k.addr(dp, j, 4);
                        k.b.ins().store(super::emit::flags(), y, d, 0);
                    },
                    |k, j| {
                        let a = k.addr(sp, j, 4);
                        let x = k.load_f(a, 0);
                        let y = k.b.ins().fsub(x, m);
                        let y = k.b.ins().fsub(y, ls);
                        let d = k.addr(dp, j, 4);
                        k.store_f(y, d, 0);
                    },
                );
            } else if self.log {
                let s = line_sum_exp(k, sp, n, stride, m, None);
                let ls = ew_scalar(k, &EwOp::Unary(UnaryOp::Log), &[s]);
                k.for_range(zero, nv, 1, |k, j| {
                    let a = k.addr(sp, j, 4 * stride);
                    let x = k.load_f(a, 0);
                    let y = k.b.ins().fsub(x, m);
                    let y = k.b.ins().fsub(y, ls);
                    let d = k.addr(dp, j, 4 * stride);
                    k.store_f(y, d, 0);
                });
            } else if stride == 1 {
                let s = line_sum_exp(k, sp, n, stride, m, Some(dp));
                let one = k.fconst(1.0);
                let q = k.b.ins().fdiv(one, s);
                scale_line(k, dp, n, q);
            } else {
                let s = line_sum_exp(k, sp, n, stride, m, Some(dp));
                k.for_range(zero, nv, 1, |k, j| {
                    let d = k.addr(dp, j, 4 * stride);
                    let e = k.load_f(d, 0);
                    let y = k.b.ins().fdiv(e, s);
                    k.store_f(y, d, 0);
                });
            }
        });
    }
}

/// `d[j] = d[j] · q` over a contiguous line of `n`.
fn scale_line(k: &mut Kb, d: Value, n: usize, q: Value) {
    let width = 4 * LINE_GROUP;
    let qv = k.b.ins().splat(F32X4, q);
    let scale = |k: &mut Kb, a: Value, count: usize| {
        for g in 0..count {
            let x = k.load_v(a, (16 * g) as i32);
            let y = k.b.ins().fmul(x, qv);
            k.b.ins().store(super::emit::flags(), y, a, (16 * g) as i32);
        }
    };
    for_count(k, n / width, |k, b| {
        let a = k.addr(d, b, (4 * width) as i64);
        scale(k, a, LINE_GROUP);
    });
    let done = n / width * width;
    let a = k.b.ins().iadd_imm_s(d, (4 * done) as i64);
    scale(k, a, (n - done) / 4);
    for j in n / 4 * 4..n {
        let x = k.load_f(d, (4 * j) as i32);
        let y = k.b.ins().fmul(x, q);
        k.store_f(y, d, (4 * j) as i32);
    }
}

/// Per-row `cross_entropy(logits [n, c], labels)` losses; with `grad`, instead
/// `dlogits = dloss/n · (softmax(logits) - onehot(labels))`. A label outside
/// `[0, c)` returns its row + 1.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossEntropy {
    pub logits: Loc,
    pub labels: Loc,
    pub out: Loc,
    pub n: usize,
    pub c: usize,
    /// The incoming scalar gradient, for the gradient kernel.
    pub grad: Option<Loc>,
    /// With `grad`: also write each row's loss here, from the same softmax.
    pub row_loss: Option<Loc>,
}

impl CrossEntropy {
    /// Rows: the forward kernel writes one loss per row (their mean is a
    /// separate reduction, in one fixed order), the gradient one row each.
    pub fn units(&self) -> usize {
        self.n
    }
    /// Per row, in units that make a chunk about ten rows of a wide
    /// matrix: a chunk's first row takes a max pass of its own (the others'
    /// come with the previous row's exp pass).
    pub fn unit_cost(&self) -> usize {
        self.c * 3
    }

    /// Rows `[start, end)`: `row(k, r, xp, label, m, s)` finishes row `r`
    /// (at `xp`, with its label, max and `Σ exp(x - m)`). Each row's exp
    /// pass also finds the next row's max (the last row's re-reads
    /// itself), so a row is read from memory once, by arithmetic-heavy
    /// code; with `grad`, the exps go to the row of `out`.
    fn rows(
        &self,
        k: &mut Kb,
        (logits, labels, out): (Value, Value, Value),
        grad: bool,
        mut row: impl FnMut(&mut Kb, Value, Value, Value, Value, Value),
    ) {
        let (start, end) = (k.start, k.end);
        let row_bytes = (self.c * 4) as i64;
        let ninf = k.fconst(f32::NEG_INFINITY);
        let max = k.var(F32, ninf);
        let any = k.b.ins().icmp(IntCC::SignedLessThan, start, end);
        k.if_then(any, |k| {
            let first = k.addr(logits, start, row_bytes);
            let m0 = line_max(k, first, self.c, 1);
            k.b.def_var(max, m0);
        });
        k.for_range(start, end, 1, |k, r| {
            let (xp, label) = labelled_row(k, logits, labels, r, self.c);
            let m = k.b.use_var(max);
            let after = k.b.ins().iadd_imm_s(r, 1);
            let more = k.b.ins().icmp(IntCC::SignedLessThan, after, end);
            let following = k.b.ins().iadd_imm_s(xp, row_bytes);
            let next = k.b.ins().select(more, following, xp);
            let dp = grad.then(|| k.addr(out, r, row_bytes));
            let (s, next_m) = line_sum_exp_and_max(k, xp, self.c, m, dp, Some(next));
            k.b.def_var(max, next_m.unwrap_or(m));
            row(k, r, xp, label, m, s);
        });
    }

    pub fn emit(&self, kb: &mut Kb) {
        let logits = kb.base(self.logits);
        let labels = kb.base(self.labels);
        let out = kb.base(self.out);
        let bases = (logits, labels, out);
        match self.grad {
            None => {
                self.rows(kb, bases, false, |k, r, xp, label, m, s| {
                    store_row_loss(k, (xp, label, m, s), out, r);
                });
            }
            Some(g) => {
                let gp = kb.base(g);
                let dl = kb.load_f(gp, 0);
                let nf = kb.fconst(self.n as f32);
                let scale = kb.b.ins().fdiv(dl, nf);
                let row_loss = self.row_loss.map(|l| kb.base(l));
                let c = self.c;
                self.rows(kb, bases, true, |k, r, xp, label, m, s| {
                    if let Some(rl) = row_loss {
                        store_row_loss(k, (xp, label, m, s), rl, r);
                    }
                    // (p - onehot) · scale as exp · (scale / Σ exp), less
                    // scale at the label, whose exp is read before the
                    // vector pass overwrites it.
                    let dp = k.addr(out, r, (c * 4) as i64);
                    let q = k.b.ins().fdiv(scale, s);
                    let la = k.addr(dp, label, 4);
                    let el = k.load_f(la, 0);
                    let yl = k.b.ins().fmul(el, q);
                    let yl = k.b.ins().fsub(yl, scale);
                    scale_line(k, dp, c, q);
                    k.store_f(yl, la, 0);
                });
            }
        }
    }
}

/// `out[r] = m + log(s) - x[label]`, row `r`'s loss from its max `m` and
/// `s = Σ exp(x - m)`.
fn store_row_loss(
    k: &mut Kb,
    (xp, label, m, s): (Value, Value, Value, Value),
    out: Value,
    r: Value,
) {
    let ls = ew_scalar(k, &EwOp::Unary(UnaryOp::Log), &[s]);
    let lse = k.b.ins().fadd(m, ls);
    let xa = k.addr(xp, label, 4);
    let xl = k.load_f(xa, 0);
    let l = k.b.ins().fsub(lse, xl);
    let oa = k.addr(out, r, 4);
    k.store_f(l, oa, 0);
}

/// Multi-class hinge loss `mean_n Σ_{j≠y} max(0, 1 + s_j - s_y)`; with
/// `grad`, its subgradient scaled by `dloss/n` (a margin of exactly 0
/// contributes nothing, a NaN margin makes both entries NaN). A label
/// outside `[0, c)` returns its row + 1.
#[derive(Clone, Debug, PartialEq)]
pub struct Hinge {
    pub scores: Loc,
    pub labels: Loc,
    pub out: Loc,
    pub n: usize,
    pub c: usize,
    pub grad: Option<Loc>,
}

impl Hinge {
    pub fn units(&self) -> usize {
        if self.grad.is_some() {
            self.n
        } else {
            1
        }
    }
    pub fn unit_cost(&self) -> usize {
        if self.grad.is_some() {
            self.c * 4
        } else {
            self.n * self.c * 4
        }
    }

    /// Row pointer, label and the label's score, after the range check.
    fn row(&self, k: &mut Kb, scores: Value, labels: Value, r: Value) -> (Value, Value, Value) {
        let (sp, label) = labelled_row(k, scores, labels, r, self.c);
        let ya = k.addr(sp, label, 4);
        let sy = k.load_f(ya, 0);
        (sp, label, sy)
    }

    /// `1 + s_j - s_y` for column `j`.
    fn margin(k: &mut Kb, sp: Value, j: Value, sy: Value) -> Value {
        let a = k.addr(sp, j, 4);
        let s = k.load_f(a, 0);
        let one = k.fconst(1.0);
        let m = k.b.ins().fadd(one, s);
        k.b.ins().fsub(m, sy)
    }

    /// `Σ_{j≠y} max(0, 1 + s_j - s_y)` over one row (at `sp`, label `y`,
    /// its score `sy`): four columns at a time, the label's lane masked
    /// (`iota`: the lane indices), a long row in blocks; the last `c % 4`
    /// columns one by one. A NaN margin is kept, so that it propagates.
    fn row_margins(
        &self,
        k: &mut Kb,
        (sp, label, sy): (Value, Value, Value),
        iota: Value,
    ) -> Value {
        let zero_v = k.vconst(0.0);
        let one_v = k.vconst(1.0);
        let sy_v = k.b.ins().splat(F32X4, sy);
        let label_v = k.splat_i32(label);
        let acc = k.var(F32X4, zero_v);
        let whole = self.c / 4 * 4;
        k.sum_in_blocks(whole, SUM_BLOCK, (&[acc], zero_v), |k, lo, hi| {
            k.for_blocks(lo, hi, 4, |k, j| {
                let a = k.addr(sp, j, 4);
                let s = k.load_v(a, 0);
                let m = k.b.ins().fadd(one_v, s);
                let m = k.b.ins().fsub(m, sy_v);
                let le = k.vcmp(FloatCC::LessThanOrEqual, m, zero_v);
                let m = k.vsel(le, zero_v, m);
                let j_v = k.splat_i32(j);
                let cols = k.b.ins().iadd(j_v, iota);
                let is_label = k.b.ins().icmp(IntCC::Equal, cols, label_v);
                let m = k.vsel(is_label, zero_v, m);
                let o = k.b.use_var(acc);
                let o = k.b.ins().fadd(o, m);
                k.b.def_var(acc, o);
            });
        });
        let acc = k.b.use_var(acc);
        let h = hsum(k, acc);
        let sum = k.var(F32, h);
        for j in whole..self.c {
            let j = k.iconst(j as i64);
            let other = k.b.ins().icmp(IntCC::NotEqual, j, label);
            k.if_then(other, |k| {
                let m = Self::margin(k, sp, j, sy);
                let zf = k.fconst(0.0);
                let neg = k.b.ins().fcmp(FloatCC::LessThanOrEqual, m, zf);
                let m = k.b.ins().select(neg, zf, m);
                let t = k.b.use_var(sum);
                let t = k.b.ins().fadd(t, m);
                k.b.def_var(sum, t);
            });
        }
        k.b.use_var(sum)
    }

    pub fn emit(&self, kb: &mut Kb) {
        let scores = kb.base(self.scores);
        let labels = kb.base(self.labels);
        let out = kb.base(self.out);
        let (start, end) = (kb.start, kb.end);
        match self.grad {
            None => {
                // Each row's margins summed four columns at a time, then
                // the rows added in blocks of `COLUMN_SUM_BLOCK` (one
                // running f32 over all 34,000 margins of 53 rows was 2.6e-5
                // off the f64 sum).
                let z = kb.fconst(0.0);
                let total = kb.var(F32, z);
                let iota = kb.lane_indices();
                kb.sum_in_blocks(self.n, COLUMN_SUM_BLOCK, (&[total], z), |k, lo, hi| {
                    k.for_range(lo, hi, 1, |k, r| {
                        let (sp, label, sy) = self.row(k, scores, labels, r);
                        let m = self.row_margins(k, (sp, label, sy), iota);
                        let t = k.b.use_var(total);
                        let t = k.b.ins().fadd(t, m);
                        k.b.def_var(total, t);
                    });
                });
                let t = kb.b.use_var(total);
                let nf = kb.fconst(self.n as f32);
                let r = kb.b.ins().fdiv(t, nf);
                kb.store_f(r, out, 0);
            }
            Some(g) => {
                let gp = kb.base(g);
                let dl = kb.load_f(gp, 0);
                let nf = kb.fconst(self.n as f32);
                let share = kb.b.ins().fdiv(dl, nf);
                kb.for_range(start, end, 1, |k, r| {
                    let (sp, label, sy) = self.row(k, scores, labels, r);
                    let dp = k.addr(out, r, (self.c * 4) as i64);
                    let zf = k.fconst(0.0);
                    let acc = k.var(F32, zf);
                    // The label's entry sums the row's shares, a long row's
                    // in blocks (one running f32 over 1030 equal shares was
                    // 9.3e-6 off).
                    k.sum_in_blocks(self.c, COLUMN_SUM_BLOCK, (&[acc], zf), |k, lo, hi| {
                        k.for_range(lo, hi, 1, |k, j| {
                            let m = Self::margin(k, sp, j, sy);
                            let zf = k.fconst(0.0);
                            let pos = k.b.ins().fcmp(FloatCC::GreaterThan, m, zf);
                            let nan = k.b.ins().fcmp(FloatCC::Unordered, m, m);
                            let nanv = k.fconst(f32::NAN);
                            let v = k.b.ins().select(pos, share, zf);
                            let v = k.b.ins().select(nan, nanv, v);
                            let other = k.b.ins().icmp(IntCC::NotEqual, j, label);
                            let v = k.b.ins().select(other, v, zf);
                            let a = k.addr(dp, j, 4);
                            k.store_f(v, a, 0);
                            let t = k.b.use_var(acc);
                            let t = k.b.ins().fadd(t, v);
                            k.b.def_var(acc, t);
                        });
                    });
                    let t = k.b.use_var(acc);
                    let t = k.b.ins().fneg(t);
                    let ya = k.addr(dp, label, 4);
                    k.store_f(t, ya, 0);
                });
            }
        }
    }
}

/// Row `r` of a `[n, c]` score matrix and its label, widened to i64. A label
/// outside `[0, c)` makes the kernel return `r + 1`, which the runtime turns
/// into the interpreter's out-of-range error; shared by the classification
/// losses and their gradients.
fn labelled_row(k: &mut Kb, scores: Value, labels: Value, r: Value, c: usize) -> (Value, Value) {
    let lp = k.addr(labels, r, 4);
    let label = k.load_i(lp, 0);
    let label = k.b.ins().sextend(I64, label);
    let cv = k.iconst(c as i64);
    let bad = k.b.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, label, cv);
    k.if_then(bad, |k| {
        let code = k.b.ins().iadd_imm_s(r, 1);
        k.jump_ret(code);
    });
    (k.addr(scores, r, (c * 4) as i64), label)
}
