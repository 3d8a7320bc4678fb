//! Reductions, softmax / log_softmax and the cross-entropy loss and its
//! gradient. Each work unit owns whole output elements or lines, and
//! accumulates in a fixed order, so chunking never changes a result.

use super::emit::{Kb, Loc};
use super::kernel::{ew_scalar, EwOp, MATH_GROUP};
use crate::ir::{ReduceOp, UnaryOp};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{InstBuilder, Value};

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
const COLS: usize = 16;

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
                        // Four partial sums, combined at the end of the line.
                        let add = |k: &mut Kb, a: Value, x: Value, _| k.b.ins().fadd(a, x);
                        let h = fold_contiguous(k, ptr, n, 0.0, add, add, hsum, |k, h, t| {
                            k.b.ins().fadd(h, t)
                        });
                        let o = k.b.use_var(acc);
                        let s = k.b.ins().fadd(o, h);
                        k.b.def_var(acc, s);
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
    /// which unit computes it.
    fn emit_columns(&self, kb: &mut Kb, blocks: usize) {
        let src = kb.base(self.src);
        let dst = kb.base(self.dst);
        let (start, end) = (kb.start, kb.end);
        let nk = self.kept_dims.len();
        let inner = self.kept_dims[nk - 1];
        let outer_dims = self.kept_dims[..nk - 1].to_vec();
        let outer_strides = self.kept_strides[..nk - 1].to_vec();
        let count: usize = self.red_dims.iter().product();
        let op = self.op;
        let full = inner / COLS;
        let init_val = match op {
            ReduceOp::Max => f32::NEG_INFINITY,
            _ => 0.0,
        };
        let combine = move |k: &mut Kb, acc: Value, x: Value| match op {
            ReduceOp::Max => k.b.ins().fmax(acc, x),
            _ => k.b.ins().fadd(acc, x),
        };
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
            let full_block = |k: &mut Kb| {
                let init = k.vconst(init_val);
                let accs: Vec<_> = (0..COLS / 4).map(|_| k.var(F32X4, init)).collect();
                nest(
                    k,
                    p,
                    &self.red_dims,
                    &self.red_strides,
                    &mut |k, ptr, n, stride| {
                        let zero = k.iconst(0);
                        let nv = k.iconst(n as i64);
                        k.for_range(zero, nv, 1, |k, i| {
                            let a = k.addr(ptr, i, 4 * stride);
                            for (j, acc) in accs.iter().enumerate() {
                                let x = k.load_v(a, (16 * j) as i32);
                                let o = k.b.use_var(*acc);
                                let r = combine(k, o, x);
                                k.b.def_var(*acc, r);
                            }
                        });
                    },
                );
                for (j, acc) in accs.iter().enumerate() {
                    let mut r = k.b.use_var(*acc);
                    if op == ReduceOp::Mean {
                        let c = k.vconst(count as f32);
                        r = k.b.ins().fdiv(r, c);
                    }
                    k.b.ins().store(super::emit::flags(), r, d, (16 * j) as i32);
                }
            };
            let partial_block = |k: &mut Kb| {
                // The last, narrower block: one lane at a time.
                let zero = k.iconst(0);
                let width = k.iconst((inner - full * COLS) as i64);
                k.for_range(zero, width, 1, |k, c| {
                    let init = k.fconst(init_val);
                    let acc = k.var(F32, init);
                    let pc = k.addr(p, c, 4);
                    nest(
                        k,
                        pc,
                        &self.red_dims,
                        &self.red_strides,
                        &mut |k, ptr, n, stride| {
                            let zero = k.iconst(0);
                            let nv = k.iconst(n as i64);
                            k.for_range(zero, nv, 1, |k, i| {
                                let a = k.addr(ptr, i, 4 * stride);
                                let x = k.load_f(a, 0);
                                let o = k.b.use_var(acc);
                                let r = combine(k, o, x);
                                k.b.def_var(acc, r);
                            });
                        },
                    );
                    let mut r = k.b.use_var(acc);
                    if op == ReduceOp::Mean {
                        let cf = k.fconst(count as f32);
                        r = k.b.ins().fdiv(r, cf);
                    }
                    let da = k.addr(d, c, 4);
                    k.store_f(r, da, 0);
                });
            };
            if inner.is_multiple_of(COLS) {
                full_block(k);
            } else {
                let fullv = k.iconst(full as i64);
                let is_full = k.b.ins().icmp(IntCC::UnsignedLessThan, b, fullv);
                k.if_else(is_full, full_block, partial_block);
            }
        });
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
        return fold_contiguous(
            k,
            p,
            n,
            f32::NEG_INFINITY,
            |k, acc, x, _| {
                let lt = k.vcmp(cranelift_codegen::ir::condcodes::FloatCC::LessThan, acc, x);
                k.vsel(lt, x, acc)
            },
            |k, acc, x, _| k.b.ins().fmax(acc, x),
            hmax,
            |k, h, t| k.b.ins().fmax(h, t),
        );
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

/// Fold a contiguous line of `n` elements at `p`: whole f32x4 groups into
/// a vector accumulator (`vec_step(acc, x, i)`), the last `n % 4` elements
/// into a scalar one (`tail_step`), then the lanes by `horizontal` and the
/// two results by `join`. Both accumulators start at `init`.
#[allow(clippy::too_many_arguments)]
fn fold_contiguous(
    k: &mut Kb,
    p: Value,
    n: usize,
    init: f32,
    vec_step: impl Fn(&mut Kb, Value, Value, Value) -> Value,
    tail_step: impl Fn(&mut Kb, Value, Value, Value) -> Value,
    horizontal: fn(&mut Kb, Value) -> Value,
    join: impl Fn(&mut Kb, Value, Value) -> Value,
) -> Value {
    let s0 = k.fconst(init);
    let acc = k.var(F32, s0);
    let zero = k.iconst(0);
    let nv = k.iconst(n as i64);
    let v0 = k.vconst(init);
    let vacc = k.var(F32X4, v0);
    fold_line_from(k, p, (zero, nv), (vacc, acc), vec_step, tail_step);
    let v = k.b.use_var(vacc);
    let h = horizontal(k, v);
    let t = k.b.use_var(acc);
    join(k, h, t)
}

/// The loops of [`fold_contiguous`] over elements `from..n` of the line at
/// `p`, into the vector and scalar accumulators `vacc`, `acc`.
fn fold_line_from(
    k: &mut Kb,
    p: Value,
    (from, n): (Value, Value),
    (vacc, acc): (cranelift_frontend::Variable, cranelift_frontend::Variable),
    vec_step: impl Fn(&mut Kb, Value, Value, Value) -> Value,
    tail_step: impl Fn(&mut Kb, Value, Value, Value) -> Value,
) {
    k.for_vec_tail(
        from,
        n,
        |k, i| {
            let a = k.addr(p, i, 4);
            let x = k.load_v(a, 0);
            let o = k.b.use_var(vacc);
            let r = vec_step(k, o, x, i);
            k.b.def_var(vacc, r);
        },
        |k, i| {
            let a = k.addr(p, i, 4);
            let x = k.load_f(a, 0);
            let o = k.b.use_var(acc);
            let r = tail_step(k, o, x, i);
            k.b.def_var(acc, r);
        },
    );
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
    let exp = EwOp::Unary(UnaryOp::Exp);
    if stride == 1 {
        // Blocks of MATH_GROUP vectors, one accumulator each, so the
        // interleaved exps are independent; then single vectors into the
        // first accumulator, then scalars.
        let mv = k.b.ins().splat(F32X4, m);
        let v0 = k.vconst(0.0);
        let accs: Vec<_> = (0..MATH_GROUP).map(|_| k.var(F32X4, v0)).collect();
        let zero = k.iconst(0);
        let nv = k.iconst(n as i64);
        let from = k.for_blocks(zero, nv, (4 * MATH_GROUP) as i64, |k, i| {
            let a = k.addr(p, i, 4);
            let ds: Vec<Value> = (0..MATH_GROUP)
                .map(|g| {
                    let x = k.load_v(a, (16 * g) as i32);
                    k.b.ins().fsub(x, mv)
                })
                .collect();
            let es = k.vexp_n(&ds);
            for (g, e) in es.into_iter().enumerate() {
                if let Some(s) = store {
                    let sa = k.addr(s, i, 4);
                    k.b.ins()
                        .store(super::emit::flags(), e, sa, (16 * g) as i32);
                }
                let o = k.b.use_var(accs[g]);
                let r = k.b.ins().fadd(o, e);
                k.b.def_var(accs[g], r);
            }
        });
        let z = k.fconst(0.0);
        let acc = k.var(F32, z);
        fold_line_from(
            k,
            p,
            (from, nv),
            (accs[0], acc),
            |k, acc, x, i| {
                let d = k.b.ins().fsub(x, mv);
                let e = k.vexp(d);
                if let Some(s) = store {
                    let sa = k.addr(s, i, 4);
                    k.b.ins().store(super::emit::flags(), e, sa, 0);
                }
                k.b.ins().fadd(acc, e)
            },
            |k, acc, x, i| {
                let d = k.b.ins().fsub(x, m);
                let e = ew_scalar(k, &exp, &[d]);
                if let Some(s) = store {
                    let sa = k.addr(s, i, 4);
                    k.store_f(e, sa, 0);
                }
                k.b.ins().fadd(acc, e)
            },
        );
        let v: Vec<Value> = accs.iter().map(|a| k.b.use_var(*a)).collect();
        let lo = k.b.ins().fadd(v[0], v[1]);
        let hi = k.b.ins().fadd(v[2], v[3]);
        let v = k.b.ins().fadd(lo, hi);
        let h = hsum(k, v);
        let t = k.b.use_var(acc);
        return k.b.ins().fadd(h, t);
    }
    let z = k.fconst(0.0);
    let acc = k.var(F32, z);
    let zero = k.iconst(0);
    let nv = k.iconst(n as i64);
    k.for_range(zero, nv, 1, |k, i| {
        let a = k.addr(p, i, 4 * stride);
        let x = k.load_f(a, 0);
        let d = k.b.ins().fsub(x, m);
        let e = ew_scalar(k, &exp, &[d]);
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
                divide_line(k, dp, n, s, None);
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

/// `d[j] = d[j] / s` (then `· scale`) over a contiguous line, with the same
/// rounding as the scalar division.
fn divide_line(k: &mut Kb, d: Value, n: usize, s: Value, scale: Option<Value>) {
    let zero = k.iconst(0);
    let nv = k.iconst(n as i64);
    let sv = k.b.ins().splat(F32X4, s);
    let scale_v = scale.map(|c| k.b.ins().splat(F32X4, c));
    k.for_vec_tail(
        zero,
        nv,
        |k, j| {
            let a = k.addr(d, j, 4);
            let e = k.load_v(a, 0);
            let mut y = k.b.ins().fdiv(e, sv);
            if let Some(c) = scale_v {
                y = k.b.ins().fmul(y, c);
            }
            k.b.ins().store(super::emit::flags(), y, a, 0);
        },
        |k, j| {
            let a = k.addr(d, j, 4);
            let e = k.load_f(a, 0);
            let mut y = k.b.ins().fdiv(e, s);
            if let Some(c) = scale {
                y = k.b.ins().fmul(y, c);
            }
            k.store_f(y, a, 0);
        },
    );
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
    pub fn unit_cost(&self) -> usize {
        if self.grad.is_some() {
            self.c * 24
        } else {
            self.c * 12
        }
    }

    fn row(&self, k: &mut Kb, logits: Value, labels: Value, r: Value) -> (Value, Value, Value) {
        let (xp, label) = labelled_row(k, logits, labels, r, self.c);
        (xp, label, line_max(k, xp, self.c, 1))
    }

    pub fn emit(&self, kb: &mut Kb) {
        let logits = kb.base(self.logits);
        let labels = kb.base(self.labels);
        let out = kb.base(self.out);
        let (start, end) = (kb.start, kb.end);
        match self.grad {
            None => {
                kb.for_range(start, end, 1, |k, r| {
                    let (xp, label, m) = self.row(k, logits, labels, r);
                    let s = line_sum_exp(k, xp, self.c, 1, m, None);
                    store_row_loss(k, (xp, label, m, s), out, r);
                });
            }
            Some(g) => {
                let gp = kb.base(g);
                let dl = kb.load_f(gp, 0);
                let nf = kb.fconst(self.n as f32);
                let scale = kb.b.ins().fdiv(dl, nf);
                let row_loss = self.row_loss.map(|l| kb.base(l));
                kb.for_range(start, end, 1, |k, r| {
                    let (xp, label, m) = self.row(k, logits, labels, r);
                    let dp = k.addr(out, r, (self.c * 4) as i64);
                    let s = line_sum_exp(k, xp, self.c, 1, m, Some(dp));
                    if let Some(rl) = row_loss {
                        store_row_loss(k, (xp, label, m, s), rl, r);
                    }
                    // (p - onehot) · scale: the label's entry is computed
                    // before the vector pass overwrites its exp.
                    let la = k.addr(dp, label, 4);
                    let el = k.load_f(la, 0);
                    let pl = k.b.ins().fdiv(el, s);
                    let one = k.fconst(1.0);
                    let pl = k.b.ins().fsub(pl, one);
                    let yl = k.b.ins().fmul(pl, scale);
                    divide_line(k, dp, self.c, s, Some(scale));
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

    pub fn emit(&self, kb: &mut Kb) {
        use cranelift_codegen::ir::condcodes::FloatCC;
        let scores = kb.base(self.scores);
        let labels = kb.base(self.labels);
        let out = kb.base(self.out);
        let (start, end) = (kb.start, kb.end);
        match self.grad {
            None => {
                let z = kb.fconst(0.0);
                let total = kb.var(F32, z);
                kb.for_const(0, self.n, |k, r| {
                    let (sp, label, sy) = self.row(k, scores, labels, r);
                    let zero = k.iconst(0);
                    let cv = k.iconst(self.c as i64);
                    k.for_range(zero, cv, 1, |k, j| {
                        let other = k.b.ins().icmp(IntCC::NotEqual, j, label);
                        k.if_then(other, |k| {
                            let m = Self::margin(k, sp, j, sy);
                            // max(0, m), NaN kept so that it propagates.
                            let zf = k.fconst(0.0);
                            let neg = k.b.ins().fcmp(FloatCC::LessThanOrEqual, m, zf);
                            let m = k.b.ins().select(neg, zf, m);
                            let t = k.b.use_var(total);
                            let t = k.b.ins().fadd(t, m);
                            k.b.def_var(total, t);
                        });
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
                    let zero = k.iconst(0);
                    let cv = k.iconst(self.c as i64);
                    k.for_range(zero, cv, 1, |k, j| {
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
