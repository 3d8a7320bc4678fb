//! Lowering of one IR node to kernel steps, specialised to its shapes and
//! to where its operands live.

use super::conv::{
    direct_tile_shape, Col2im, ConvStep, DirectConv, DirectGradFilter, Geom, Im2colRows, PackW,
    PadCopy, Pool, PoolKind,
};
use super::emit::Loc;
use super::kernel::{
    broadcast_strides, collapse, contiguous_strides, Copy, Elementwise, EwArg, EwInstr, EwOp, Fill,
    Gather, MatmulPhase, ScatterAdd, Step, View,
};
use super::matmul::{Matmul, MmOperand};
use super::reduce::{CrossEntropy, Hinge, Reduce, Softmax};
use super::winograd::{self, WinoGradDy, WinoGradOut, WinoInput, WinoOutput, WinoWeights};
use crate::ir::{Conv2d, Op, Pool2d, TensorType};
use crate::tensor::numel;

/// The steps of one node and the scratch bytes they use past `scratch`.
pub struct Lowered {
    pub steps: Vec<Step>,
    pub scratch_bytes: usize,
}

/// Bytes reserved for each scratch region, rounded to keep 64-byte alignment.
pub fn align64(n: usize) -> usize {
    n.div_ceil(64) * 64
}

/// Lower `op`, or `None` when it has no compiled kernel yet.
/// `split`: whether the model runs on several threads (see
/// `Matmul::split`).
pub fn lower(
    op: &Op,
    ins: &[(Loc, &TensorType)],
    outs: &[(Loc, &TensorType)],
    scratch: usize,
    split: bool,
) -> Option<Lowered> {
    let plain = |steps: Vec<Step>| {
        Some(Lowered {
            steps,
            scratch_bytes: 0,
        })
    };
    // Kernels index operands by the op's shape rule; a node that breaks it
    // goes to the interpreter, which reports the problem as an error.
    let in_types: Vec<&TensorType> = ins.iter().map(|(_, t)| *t).collect();
    let want = crate::ir::infer(op, &in_types).ok()?;
    if want.len() != outs.len() || want.iter().zip(outs).any(|(w, (_, t))| w != *t) {
        return None;
    }
    let out = outs.first()?;
    let oshape = &out.1.shape;
    match op {
        Op::Fill { value, .. } => plain(vec![Step::Fill(Fill {
            dst: out.0,
            off: 0,
            n: numel(oshape),
            bits: value.to_bits(),
        })]),
        Op::Unary(u) => plain(vec![elementwise(EwOp::Unary(*u), ins, out)]),
        Op::Binary(b) => plain(vec![elementwise(EwOp::Binary(*b), ins, out)]),
        Op::Reduce { op, axes, .. } => {
            let (src, st) = ins[0];
            let shape = &st.shape;
            let cs = contiguous_strides(shape);
            let mut kept = Vec::new();
            let mut kept_s = Vec::new();
            let mut red = Vec::new();
            let mut red_s = Vec::new();
            for d in 0..shape.len() {
                if axes.contains(&d) {
                    red.push(shape[d]);
                    red_s.push(cs[d]);
                } else {
                    kept.push(shape[d]);
                    kept_s.push(cs[d]);
                }
            }
            let mut out_s = contiguous_strides(&kept);
            let kept = collapse(&kept, &mut [&mut out_s, &mut kept_s]);
            let red = collapse(&red, &mut [&mut red_s]);
            plain(vec![Step::Reduce(Reduce {
                op: *op,
                src,
                dst: out.0,
                kept_dims: kept,
                kept_strides: kept_s,
                red_dims: red,
                red_strides: red_s,
            })])
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            let shape = &ins[0].1.shape;
            plain(vec![Step::Softmax(Softmax {
                src: ins[0].0,
                dst: out.0,
                outer: shape[..*axis].iter().product(),
                len: shape[*axis],
                inner: shape[axis + 1..].iter().product(),
                log: matches!(op, Op::LogSoftmax { .. }),
            })])
        }
        Op::MatMul => matmul(ins, out, scratch, split, [false, false]),
        Op::Conv(c) => {
            let (x, w) = (&ins[0].1.shape, &ins[1].1.shape);
            let (nb, ch, o) = (x[0], x[1], w[0]);
            let g = Geom::conv(x[2], x[3], w[2], w[3], oshape[2], oshape[3], c);
            let (ckk, p) = (ch * g.kh * g.kw, g.oh * g.ow);
            let cols = align64(nb * ckk * p * 4);
            if let Some(l) =
                direct_forward(ins[0].0, ins[1].0, out.0, x, w, oshape, c, (scratch, split))
            {
                return Some(l);
            }
            let im = Step::Im2col(ConvStep::Im2col(Im2colRows {
                x: ins[0].0,
                cols: Loc::Arena(scratch),
                n: nb,
                c: ch,
                g,
                sn: ckk * p,
                sr: p,
            }));
            let a_op = MmOperand {
                loc: ins[1].0,
                off: 0,
                batch_strides: vec![0],
                rs: ckk as i64,
                cs: 1,
            };
            let b_op = MmOperand {
                loc: Loc::Arena(scratch),
                off: 0,
                batch_strides: vec![(ckk * p) as i64],
                rs: p as i64,
                cs: 1,
            };
            let (mut steps, bytes) = matmul_steps(
                vec![nb],
                (o, ckk, p),
                a_op,
                b_op,
                out.0,
                scratch + cols,
                split,
            );
            steps.insert(0, im);
            Some(Lowered {
                steps,
                scratch_bytes: cols + bytes,
            })
        }
        Op::ConvGradInput { conv, .. } => {
            let (dy, w) = (&ins[0].1.shape, &ins[1].1.shape);
            let (nb, o, ch) = (dy[0], w[0], w[1]);
            if let Some(l) = direct_grad_input(
                ins[0].0,
                ins[1].0,
                out.0,
                dy,
                w,
                oshape,
                conv,
                (scratch, split),
            ) {
                return Some(l);
            }
            let g = Geom::conv(oshape[2], oshape[3], w[2], w[3], dy[2], dy[3], conv);
            let (ckk, p) = (ch * g.kh * g.kw, g.oh * g.ow);
            let cols = align64(nb * ckk * p * 4);
            // cols[n] = wᵀ [ckk, o] @ dy[n] [o, p], then scattered back.
            let a_op = MmOperand {
                loc: ins[1].0,
                off: 0,
                batch_strides: vec![0],
                rs: 1,
                cs: ckk as i64,
            };
            let b_op = MmOperand {
                loc: ins[0].0,
                off: 0,
                batch_strides: vec![(o * p) as i64],
                rs: p as i64,
                cs: 1,
            };
            let (mut steps, bytes) = matmul_steps(
                vec![nb],
                (ckk, o, p),
                a_op,
                b_op,
                Loc::Arena(scratch),
                scratch + cols,
                split,
            );
            steps.push(Step::Col2im(Col2im {
                cols: Loc::Arena(scratch),
                dx: out.0,
                n: nb,
                c: ch,
                g,
            }));
            Some(Lowered {
                steps,
                scratch_bytes: cols + bytes,
            })
        }
        Op::ConvGradFilter { conv, .. } => {
            let (x, dy) = (&ins[0].1.shape, &ins[1].1.shape);
            let (nb, ch, o) = (x[0], x[1], dy[1]);
            let g = Geom::conv(x[2], x[3], oshape[2], oshape[3], dy[2], dy[3], conv);
            if let Some(l) =
                winograd_grad_filter(ins[0].0, ins[1].0, out.0, x, dy, &g, (scratch, split))
            {
                return Some(l);
            }
            if let Some(l) = direct_grad_filter(ins[0].0, ins[1].0, out.0, x, dy, &g, scratch) {
                return Some(l);
            }
            let (ckk, p) = (ch * g.kh * g.kw, g.oh * g.ow);
            // dw [o, ckk] = dyᵀ-by-sample [o, (n, p)] @ cols [(n, p), ckk]:
            // im2col writes [ckk, (n, p)] and dy is regrouped to [o, n, p].
            let cols = align64(ckk * nb * p * 4);
            let dyt = align64(o * nb * p * 4);
            let im = Step::Im2col(ConvStep::Im2col(Im2colRows {
                x: ins[0].0,
                cols: Loc::Arena(scratch),
                n: nb,
                c: ch,
                g,
                sn: p,
                sr: nb * p,
            }));
            let regroup = copy(
                &[o, nb, p],
                ins[1].0,
                0,
                vec![p as i64, (o * p) as i64, 1],
                Loc::Arena(scratch + cols),
                0,
                contiguous_strides(&[o, nb, p]),
            );
            let a_op = MmOperand {
                loc: Loc::Arena(scratch + cols),
                off: 0,
                batch_strides: vec![],
                rs: (nb * p) as i64,
                cs: 1,
            };
            let b_op = MmOperand {
                loc: Loc::Arena(scratch),
                off: 0,
                batch_strides: vec![],
                rs: 1,
                cs: (nb * p) as i64,
            };
            let (mut steps, bytes) = matmul_steps(
                vec![],
                (o, nb * p, ckk),
                a_op,
                b_op,
                out.0,
                scratch + cols + dyt,
                split,
            );
            steps.insert(0, regroup);
            steps.insert(0, im);
            Some(Lowered {
                steps,
                scratch_bytes: cols + dyt + bytes,
            })
        }
        Op::MaxPool(p) | Op::AvgPool(p) | Op::MaxPoolGrad(p) => {
            let x = &ins[0].1.shape;
            let kind = match op {
                Op::MaxPool(_) => PoolKind::Max,
                Op::AvgPool(_) => PoolKind::Avg,
                _ => PoolKind::MaxGrad,
            };
            let (oh, ow) = match kind {
                PoolKind::MaxGrad => (ins[1].1.shape[2], ins[1].1.shape[3]),
                _ => (oshape[2], oshape[3]),
            };
            plain(vec![Step::Pool(Pool {
                kind,
                x: ins[0].0,
                dy: ins.get(1).map(|i| i.0).unwrap_or(ins[0].0),
                out: out.0,
                planes: x[0] * x[1],
                channels: x[1],
                g: pool_geom(x[2], x[3], oh, ow, p),
                epilogue: None,
            })])
        }
        Op::AvgPoolGrad { pool, .. } => {
            let dy = &ins[0].1.shape;
            plain(vec![Step::Pool(Pool {
                kind: PoolKind::AvgGrad,
                x: ins[0].0,
                dy: ins[0].0,
                out: out.0,
                planes: dy[0] * dy[1],
                channels: dy[1],
                g: pool_geom(oshape[2], oshape[3], dy[2], dy[3], pool),
                epilogue: None,
            })])
        }
        Op::Transpose { perm } => {
            let cs = contiguous_strides(&ins[0].1.shape);
            let src_s: Vec<i64> = perm.iter().map(|&p| cs[p]).collect();
            plain(vec![copy(
                oshape,
                ins[0].0,
                0,
                src_s,
                out.0,
                0,
                contiguous_strides(oshape),
            )])
        }
        Op::Reshape { .. } => {
            let n = numel(oshape);
            plain(vec![copy(&[n], ins[0].0, 0, vec![1], out.0, 0, vec![1])])
        }
        Op::Expand { shape } => {
            let src_s = broadcast_strides(&ins[0].1.shape, shape);
            plain(vec![copy(
                oshape,
                ins[0].0,
                0,
                src_s,
                out.0,
                0,
                contiguous_strides(oshape),
            )])
        }
        Op::Concat { axis } => {
            let os = contiguous_strides(oshape);
            let mut at = 0usize;
            let mut steps = Vec::new();
            for (loc, t) in ins {
                let s = &t.shape;
                steps.push(copy(
                    s,
                    *loc,
                    0,
                    contiguous_strides(s),
                    out.0,
                    at * os[*axis] as usize,
                    os.clone(),
                ));
                at += s[*axis];
            }
            plain(steps)
        }
        Op::Slice { axis, start, .. } => {
            let cs = contiguous_strides(&ins[0].1.shape);
            plain(vec![copy(
                oshape,
                ins[0].0,
                start * cs[*axis] as usize,
                cs,
                out.0,
                0,
                contiguous_strides(oshape),
            )])
        }
        Op::PadSlice { axis, start, .. } => {
            let os = contiguous_strides(oshape);
            let s = &ins[0].1.shape;
            plain(vec![
                Step::Fill(Fill {
                    dst: out.0,
                    off: 0,
                    n: numel(oshape),
                    bits: 0,
                }),
                copy(
                    s,
                    ins[0].0,
                    0,
                    contiguous_strides(s),
                    out.0,
                    start * os[*axis] as usize,
                    os,
                ),
            ])
        }
        Op::Gather => {
            let t = &ins[0].1.shape;
            plain(vec![Step::Gather(Gather {
                table: ins[0].0,
                ids: ins[1].0,
                out: out.0,
                rows: t[0],
                width: t[1],
                count: numel(&ins[1].1.shape),
            })])
        }
        Op::ScatterAdd { rows } => plain(vec![Step::ScatterAdd(ScatterAdd {
            ids: ins[0].0,
            dy: ins[1].0,
            out: out.0,
            rows: *rows,
            width: oshape[1],
            count: numel(&ins[0].1.shape),
        })]),
        Op::CrossEntropyGrad => {
            let s = &ins[0].1.shape;
            plain(vec![Step::CrossEntropy(CrossEntropy {
                logits: ins[0].0,
                labels: ins[1].0,
                out: out.0,
                n: s[0],
                c: s[1],
                grad: ins.get(2).map(|x| x.0),
                row_loss: None,
            })])
        }
        Op::CrossEntropy => {
            // Row losses in parallel into scratch, then their mean.
            let s = &ins[0].1.shape;
            let rows = Loc::Arena(scratch);
            Some(Lowered {
                steps: vec![
                    Step::CrossEntropy(CrossEntropy {
                        logits: ins[0].0,
                        labels: ins[1].0,
                        out: rows,
                        n: s[0],
                        c: s[1],
                        grad: None,
                        row_loss: None,
                    }),
                    Step::Reduce(Reduce {
                        op: crate::ir::ReduceOp::Mean,
                        src: rows,
                        dst: out.0,
                        kept_dims: vec![],
                        kept_strides: vec![],
                        red_dims: vec![s[0]],
                        red_strides: vec![1],
                    }),
                ],
                scratch_bytes: align64(s[0] * 4),
            })
        }
        Op::Hinge | Op::HingeGrad => {
            let s = &ins[0].1.shape;
            plain(vec![Step::Hinge(Hinge {
                scores: ins[0].0,
                labels: ins[1].0,
                out: out.0,
                n: s[0],
                c: s[1],
                grad: ins.get(2).map(|x| x.0),
            })])
        }
        Op::LstmSeq | Op::GruSeq => {
            super::rnn::lower_forward(matches!(op, Op::LstmSeq), ins, outs, scratch, split, None)
        }
        Op::LstmSeqGrad | Op::GruSeqGrad => super::rnn::lower_grad(
            matches!(op, Op::LstmSeqGrad),
            ins,
            outs,
            scratch,
            split,
            None,
        ),
        Op::Attention { causal, scale } => {
            super::attention::lower_forward(ins, outs, *causal, *scale, scratch)
        }
        Op::AttentionGrad { causal, scale } => {
            super::attention::lower_grad(ins, outs, *causal, *scale, scratch)
        }
        _ => None,
    }
}

/// Zero-padded copy of an `[n, c, h, w]` input at `scratch` whose planes
/// are `hp × wp` (source pixel `(i, j)` at `(i + off_h, j + off_w)`), plus
/// `slack` floats past the end; returns the step and its bytes.
#[allow(clippy::too_many_arguments)]
fn padded_input(
    src: Loc,
    planes: usize,
    h: usize,
    w: usize,
    hp: usize,
    wp: usize,
    off: (i64, i64),
    slack: usize,
    scratch: usize,
) -> (Step, usize) {
    let step = Step::Im2col(ConvStep::Pad(PadCopy {
        src,
        dst: Loc::Arena(scratch),
        planes,
        h,
        w,
        hp,
        wp,
        off_h: off.0,
        off_w: off.1,
    }));
    (step, align64((planes * hp * wp + slack) * 4))
}

/// Steps of a stride-1 convolution of `x` `[n, cin, h, w]` (placed in its
/// padded buffer at offset `off`) with the weights `pack` describes, into
/// `y` `[n, pack.m, oh, ow]`: the direct kernel, or the Winograd kernels
/// where they apply (`split`: the model runs on several threads).
#[allow(clippy::too_many_arguments)]
fn direct_steps(
    x: Loc,
    (n, cin, h, w): (usize, usize, usize, usize),
    off: (i64, i64),
    mut pack: PackW,
    y: Loc,
    (oh, ow): (usize, usize),
    dilation: usize,
    (scratch, split): (usize, bool),
) -> Lowered {
    let (kh, kw) = (pack.kh, pack.kw);
    if winograd::applies(kh, kw, dilation, cin, pack.m, oh, ow) {
        let x = (x, (n, cin, h, w), off);
        return winograd_steps(x, &pack, y, (oh, ow), (scratch, split));
    }
    let (mr, nv) = direct_tile_shape(pack.m, ow);
    pack.mr = mr;
    let hp = oh + (kh - 1) * dilation;
    let wp = ow + (kw - 1) * dilation;
    let mut conv = DirectConv {
        xp: Loc::Arena(scratch),
        w: Loc::Arena(scratch),
        y,
        n,
        c: cin,
        m: pack.m,
        hp,
        wp,
        kh,
        kw,
        dilation,
        oh,
        ow,
        mr,
        nv,
        data_rows: (
            off.0.clamp(0, hp as i64) as usize,
            (off.0 + h as i64).clamp(0, hp as i64) as usize,
        ),
        epilogue: None,
    };
    let (pad, pad_bytes) = padded_input(x, n * cin, h, w, hp, wp, off, conv.overread(), scratch);
    pack.dst = Loc::Arena(scratch + pad_bytes);
    conv.w = pack.dst;
    let bytes = pad_bytes + align64(pack.bytes());
    Lowered {
        steps: vec![
            pad,
            Step::Im2col(ConvStep::PackW(pack)),
            Step::Im2col(ConvStep::Direct(conv)),
        ],
        scratch_bytes: bytes,
    }
}

/// A batch of row-major matrices in the arena at byte offset `at`, as a
/// matmul operand: rows `rs` elements apart, matrices `batch` apart.
fn arena_batch(at: usize, rs: usize, batch: usize) -> MmOperand {
    MmOperand {
        loc: Loc::Arena(at),
        off: 0,
        batch_strides: vec![batch as i64],
        rs: rs as i64,
        cs: 1,
    }
}

/// The input transform of images `n0..n0 + gn` (see
/// `codegen::winograd::WinoInput`), from the padded copy at `xp` into `V`
/// at `v`, whose rows are `pp` tiles apart.
fn winograd_input(
    (xp, n0, gn, cin): (usize, usize, usize, usize),
    t: winograd::Tiling,
    v: usize,
    pp: usize,
) -> Step {
    Step::Im2col(ConvStep::WinoInput(WinoInput {
        xp: Loc::Arena(xp + n0 * cin * t.hp * t.wp * 4),
        v: Loc::Arena(v),
        n: gn,
        c: cin,
        hp: t.hp,
        wp: t.wp,
        th: t.th,
        tw: t.tw,
        pp,
    }))
}

/// The Winograd steps of [`direct_steps`] (see `codegen::winograd`): the
/// padded input, `U` from the weights `w` describes, `V`, the 16 products
/// `M[e] = U[e] @ V[e]`, and the output transform into `y`.
fn winograd_steps(
    (x, (n, cin, h, w), off): (Loc, (usize, usize, usize, usize), (i64, i64)),
    wt: &PackW,
    y: Loc,
    (oh, ow): (usize, usize),
    (scratch, split): (usize, bool),
) -> Lowered {
    let m = wt.m;
    let tiling = winograd::Tiling::of(oh, ow);
    let winograd::Tiling { th, tw, hp, wp } = tiling;
    let (pad, pad_bytes) = padded_input(x, n * cin, h, w, hp, wp, off, 0, scratch);
    let group = winograd::group_images(n, cin, m, tiling);
    let (u_bytes, v_bytes, m_bytes) = winograd::buffer_bytes(m, cin, group * th * tw);
    let u = scratch + pad_bytes;
    let v = u + align64(u_bytes);
    let prod = v + align64(v_bytes);
    let mm_scratch = prod + align64(m_bytes);
    let positions = winograd::TILE_POSITIONS;
    let weights = WinoWeights {
        src: wt.src,
        dst: Loc::Arena(u),
        m,
        c: cin,
        off: wt.off,
        so: wt.so,
        sc: wt.sc,
        skh: wt.skh,
        skw: wt.skw,
    };
    let mut steps = vec![pad, Step::Im2col(ConvStep::WinoWeights(weights))];
    let mut mm_bytes = 0;
    // A group of images at a time, through the same `V` and `M`.
    for n0 in (0..n).step_by(group) {
        let gn = group.min(n - n0);
        let pp = winograd::row_stride(gn * th * tw);
        let (products, bytes) = matmul_steps(
            vec![positions],
            (m, cin, pp),
            arena_batch(u, cin, m * cin),
            arena_batch(v, pp, cin * pp),
            Loc::Arena(prod),
            mm_scratch,
            split,
        );
        mm_bytes = mm_bytes.max(bytes);
        let output = WinoOutput {
            mm: Loc::Arena(prod),
            y,
            n0,
            n: gn,
            m,
            oh,
            ow,
            th,
            tw,
            pp,
            epilogue: None,
        };
        steps.push(winograd_input((scratch, n0, gn, cin), tiling, v, pp));
        steps.extend(products);
        steps.push(Step::Im2col(ConvStep::WinoOutput(output)));
    }
    Lowered {
        steps,
        scratch_bytes: mm_scratch - scratch + mm_bytes,
    }
}

/// The filter gradient of a convolution the Winograd kernels run (see
/// `codegen::winograd`): `V` from the padded input as in the forward,
/// `dy` transposed to `[n, h, w, m]` (zeros where the tiles reach past
/// it) and transformed to `Sᵀ`, the 16 products `DW[e] = V[e] @ Sᵀ[e]`
/// (`[c, tiles] @ [tiles, m]`, each a sum over the tiles of a group of
/// images, in order), and `dw = Gᵀ (Σ_groups DW) G`.
fn winograd_grad_filter(
    x_loc: Loc,
    dy_loc: Loc,
    dw_loc: Loc,
    x: &[usize],
    dy: &[usize],
    g: &Geom,
    (scratch, split): (usize, bool),
) -> Option<Lowered> {
    let (n, cin, m) = (x[0], x[1], dy[1]);
    let (oh, ow) = (g.oh, g.ow);
    if g.stride != 1 || !winograd::applies(g.kh, g.kw, g.dilation, cin, m, oh, ow) {
        return None;
    }
    let tiling = winograd::Tiling::of(oh, ow);
    let winograd::Tiling { th, tw, hp, wp } = tiling;
    let positions = winograd::TILE_POSITIONS;
    let off = (g.pad_top as i64, g.pad_left as i64);
    let (pad, pad_bytes) = padded_input(x_loc, n * cin, x[2], x[3], hp, wp, off, 0, scratch);
    // A group of images at a time through the same `V`, `dyt` and `Sᵀ`,
    // each group's 16 products into a slice of `DW` of their own, which
    // the last step sums in group order.
    let group = winograd::group_images(n, cin, m, tiling);
    let groups = n.div_ceil(group);
    let pp = winograd::row_stride(group * th * tw);
    let v = scratch + pad_bytes;
    // `dy` as `[n, 2·th, 2·tw, m]`, zeros past `oh × ow`.
    let (hd, wd) = (2 * th, 2 * tw);
    let dyt_len = group * hd * wd * m;
    let dyt = v + align64(positions * cin * pp * 4);
    let st = dyt + align64(dyt_len * 4);
    let dw_t = st + align64(positions * pp * m * 4);
    let dw_group = positions * cin * m;
    let mm_scratch = dw_t + align64(groups * dw_group * 4);
    let mut steps = vec![pad];
    if (hd, wd) != (oh, ow) {
        steps.push(Step::Fill(Fill {
            dst: Loc::Arena(dyt),
            off: 0,
            n: dyt_len,
            bits: 0,
        }));
    }
    let mut mm_bytes = 0;
    let plane = oh * ow;
    for (gi, n0) in (0..n).step_by(group).enumerate() {
        let gn = group.min(n - n0);
        let pp = winograd::row_stride(gn * th * tw);
        steps.push(winograd_input((scratch, n0, gn, cin), tiling, v, pp));
        steps.push(copy(
            &[gn, oh, ow, m],
            dy_loc,
            n0 * m * plane,
            vec![(m * plane) as i64, ow as i64, 1, plane as i64],
            Loc::Arena(dyt),
            0,
            vec![(hd * wd * m) as i64, (wd * m) as i64, m as i64, 1],
        ));
        steps.push(Step::Im2col(ConvStep::WinoGradDy(WinoGradDy {
            dyt: Loc::Arena(dyt),
            st: Loc::Arena(st),
            n: gn,
            m,
            wd,
            th,
            tw,
            pp,
        })));
        let (products, bytes) = matmul_steps(
            vec![positions],
            (cin, pp, m),
            arena_batch(v, pp, cin * pp),
            arena_batch(st, m, pp * m),
            Loc::Arena(dw_t + gi * dw_group * 4),
            mm_scratch,
            split,
        );
        mm_bytes = mm_bytes.max(bytes);
        steps.extend(products);
    }
    steps.push(Step::Im2col(ConvStep::WinoGradOut(WinoGradOut {
        dw_t: Loc::Arena(dw_t),
        dw: dw_loc,
        m,
        c: cin,
        groups,
    })));
    Some(Lowered {
        steps,
        scratch_bytes: mm_scratch - scratch + mm_bytes,
    })
}

/// The direct kernel applies to stride-1 convolutions with no empty dim.
fn direct_ok(c: &Conv2d, dims: &[usize]) -> bool {
    c.stride == 1 && dims.iter().all(|&d| d > 0)
}

/// Whether the input gradient `dx` of a convolution, from `dy` and `w`,
/// lowers to the direct kernel (which can run an epilogue).
pub fn conv_grad_input_runs_direct(c: &Conv2d, dy: &[usize], w: &[usize], dx: &[usize]) -> bool {
    dy.len() == 4
        && w.len() == 4
        && dx.len() == 4
        && direct_ok(
            c,
            &[dy[0], dy[1], dy[2], dy[3], w[1], dx[2], dx[3], w[2], w[3]],
        )
}

/// Whether a convolution of `x` with `w` into `y` lowers to the direct
/// kernel (which can run an epilogue), not to im2col and a matmul.
pub fn conv_runs_direct(c: &Conv2d, x: &[usize], w: &[usize], y: &[usize]) -> bool {
    x.len() == 4
        && w.len() == 4
        && y.len() == 4
        && direct_ok(c, &[x[0], x[1], w[0], y[2], y[3], w[2], w[3]])
}

#[allow(clippy::too_many_arguments)]
fn direct_forward(
    x_loc: Loc,
    w_loc: Loc,
    y_loc: Loc,
    x: &[usize],
    w: &[usize],
    y: &[usize],
    c: &Conv2d,
    scratch: (usize, bool),
) -> Option<Lowered> {
    if !conv_runs_direct(c, x, w, y) {
        return None;
    }
    let pack = PackW {
        src: w_loc,
        dst: w_loc,
        m: w[0],
        c: w[1],
        kh: w[2],
        kw: w[3],
        // Chosen with the register tile by `direct_steps`.
        mr: 0,
        off: 0,
        so: (w[1] * w[2] * w[3]) as i64,
        sc: (w[2] * w[3]) as i64,
        skh: w[3] as i64,
        skw: 1,
    };
    let off = (c.pad[0] as i64, c.pad[1] as i64);
    Some(direct_steps(
        x_loc,
        (x[0], x[1], x[2], x[3]),
        off,
        pack,
        y_loc,
        (y[2], y[3]),
        c.dilation,
        scratch,
    ))
}

/// `dx` of a stride-1 convolution is the direct convolution of `dy`, padded
/// by the kernel extent minus the forward padding, with the weights
/// transposed to `[c, o]` and flipped in both spatial dims.
#[allow(clippy::too_many_arguments)]
fn direct_grad_input(
    dy_loc: Loc,
    w_loc: Loc,
    dx_loc: Loc,
    dy: &[usize],
    w: &[usize],
    dx: &[usize],
    c: &Conv2d,
    scratch: (usize, bool),
) -> Option<Lowered> {
    if !conv_grad_input_runs_direct(c, dy, w, dx) {
        return None;
    }
    let (kh, kw, d) = (w[2], w[3], c.dilation);
    let pack = PackW {
        src: w_loc,
        dst: w_loc,
        m: w[1],
        c: w[0],
        kh,
        kw,
        // Chosen with the register tile by `direct_steps`.
        mr: 0,
        off: ((kh - 1) * kw + (kw - 1)) as i64,
        so: (kh * kw) as i64,
        sc: (w[1] * kh * kw) as i64,
        skh: -(kw as i64),
        skw: -1,
    };
    let off = (
        ((kh - 1) * d) as i64 - c.pad[0] as i64,
        ((kw - 1) * d) as i64 - c.pad[1] as i64,
    );
    Some(direct_steps(
        dy_loc,
        (dy[0], dy[1], dy[2], dy[3]),
        off,
        pack,
        dx_loc,
        (dx[2], dx[3]),
        d,
        scratch,
    ))
}

fn direct_grad_filter(
    x_loc: Loc,
    dy_loc: Loc,
    dw_loc: Loc,
    x: &[usize],
    dy: &[usize],
    g: &Geom,
    scratch: usize,
) -> Option<Lowered> {
    let dims = [x[0], x[1], dy[1], g.oh, g.ow, g.kh, g.kw];
    if g.stride != 1 || dims.contains(&0) || g.kw > super::conv::GF_MAX_KW {
        return None;
    }
    let hp = g.oh + (g.kh - 1) * g.dilation;
    let wp = g.ow + (g.kw - 1) * g.dilation;
    let off = (g.pad_top as i64, g.pad_left as i64);
    let (pad, bytes) = padded_input(x_loc, x[0] * x[1], x[2], x[3], hp, wp, off, 0, scratch);
    let gf = DirectGradFilter {
        xp: Loc::Arena(scratch),
        dy: dy_loc,
        dw: dw_loc,
        n: x[0],
        c: x[1],
        o: dy[1],
        hp,
        wp,
        kh: g.kh,
        kw: g.kw,
        dilation: g.dilation,
        oh: g.oh,
        ow: g.ow,
    };
    Some(Lowered {
        steps: vec![pad, Step::Im2col(ConvStep::GradFilter(gf))],
        scratch_bytes: bytes,
    })
}

fn pool_geom(h: usize, w: usize, oh: usize, ow: usize, p: &Pool2d) -> Geom {
    Geom {
        h,
        w,
        kh: p.window,
        kw: p.window,
        oh,
        ow,
        stride: p.stride,
        dilation: 1,
        pad_top: p.pad,
        pad_left: p.pad,
    }
}

/// Pack A, pack B, compute; packed panels at `scratch`. Returns the steps
/// and the scratch bytes used.
/// `C = A @ B`; an operand flagged in `transposed` is read through its
/// location as the transpose (last two axes swapped) of a contiguous
/// tensor, which is how a `transpose` feeding only matmuls costs no copy.
pub fn matmul(
    ins: &[(Loc, &TensorType)],
    out: &(Loc, &TensorType),
    scratch: usize,
    split: bool,
    transposed: [bool; 2],
) -> Option<Lowered> {
    let oshape = &out.1.shape;
    let (a, b) = (&ins.first()?.1.shape, &ins.get(1)?.1.shape);
    let r = oshape.len();
    if r < 2 || a.len() < 2 || b.len() < 2 {
        return None;
    }
    let batch = oshape[..r - 2].to_vec();
    let (m, k, n) = (a[a.len() - 2], a[a.len() - 1], b[b.len() - 1]);
    let bs = |s: &[usize], mat: usize| -> Vec<i64> {
        broadcast_strides(&s[..s.len() - 2], &batch)
            .into_iter()
            .map(|x| x * mat as i64)
            .collect()
    };
    // Operand `i`, `rows × cols`, contiguous or the transpose of a
    // contiguous `cols × rows`.
    let operand = |i: usize, s: &[usize], rows: usize, cols: usize| {
        let (rs, cs) = if transposed[i] {
            (1, rows as i64)
        } else {
            (cols as i64, 1)
        };
        MmOperand {
            loc: ins[i].0,
            off: 0,
            batch_strides: bs(s, rows * cols),
            rs,
            cs,
        }
    };
    let a_op = operand(0, a, m, k);
    let b_op = operand(1, b, k, n);
    let (steps, bytes) = matmul_steps(batch, (m, k, n), a_op, b_op, out.0, scratch, split);
    Some(Lowered {
        steps,
        scratch_bytes: bytes,
    })
}

fn matmul_steps(
    batch: Vec<usize>,
    (m, k, n): (usize, usize, usize),
    a: MmOperand,
    b: MmOperand,
    c: Loc,
    scratch: usize,
    split: bool,
) -> (Vec<Step>, usize) {
    let count: usize = batch.iter().product::<usize>() * m * n;
    if count == 0 {
        return (vec![], 0);
    }
    if k == 0 {
        let fill = Step::Fill(Fill {
            dst: c,
            off: 0,
            n: count,
            bits: 0,
        });
        return (vec![fill], 0);
    }
    let mut mm = Matmul {
        batch,
        m,
        k,
        n,
        a,
        b,
        c,
        c_off: 0,
        pack_a: Loc::Arena(scratch),
        pack_b: Loc::Arena(scratch),
        split,
        epilogue: None,
    };
    let pa = align64(mm.pack_a_bytes());
    mm.pack_b = Loc::Arena(scratch + pa);
    let total = pa + align64(mm.pack_b_bytes());
    let steps = vec![
        Step::Matmul(mm.clone(), MatmulPhase::PackA),
        Step::Matmul(mm.clone(), MatmulPhase::PackB),
        Step::Matmul(mm, MatmulPhase::Compute),
    ];
    (steps, total)
}

/// `cross_entropy_grad` (`ins`: logits, labels, dloss) writing the
/// gradient to `grad` and, from the same row softmax, the loss (the mean of
/// the row losses, which go to scratch first) to `loss`.
pub fn cross_entropy_with_loss(
    ins: &[(Loc, &TensorType)],
    grad: Loc,
    loss: Loc,
    scratch: usize,
) -> Option<Lowered> {
    let s = &ins.first()?.1.shape;
    let (n, c) = (*s.first()?, *s.get(1)?);
    let rows = Loc::Arena(scratch);
    Some(Lowered {
        steps: vec![
            Step::CrossEntropy(CrossEntropy {
                logits: ins[0].0,
                labels: ins.get(1)?.0,
                out: grad,
                n,
                c,
                grad: Some(ins.get(2)?.0),
                row_loss: Some(rows),
            }),
            Step::Reduce(Reduce {
                op: crate::ir::ReduceOp::Mean,
                src: rows,
                dst: loss,
                kept_dims: vec![],
                kept_strides: vec![],
                red_dims: vec![n],
                red_strides: vec![1],
            }),
        ],
        scratch_bytes: align64(n * 4),
    })
}

fn elementwise(op: EwOp, ins: &[(Loc, &TensorType)], out: &(Loc, &TensorType)) -> Step {
    let args = (0..ins.len()).map(EwArg::In).collect();
    fused_elementwise(vec![EwInstr { op, args }], ins, out)
}

/// One loop computing `prog` over the elements of `out`; every input
/// broadcasts into `out`'s shape.
pub fn fused_elementwise(
    prog: Vec<EwInstr>,
    ins: &[(Loc, &TensorType)],
    out: &(Loc, &TensorType),
) -> Step {
    let oshape = &out.1.shape;
    let mut out_s = contiguous_strides(oshape);
    let mut in_s: Vec<Vec<i64>> = ins
        .iter()
        .map(|(_, t)| broadcast_strides(&t.shape, oshape))
        .collect();
    let dims = {
        let mut views: Vec<&mut Vec<i64>> = vec![&mut out_s];
        views.extend(in_s.iter_mut());
        collapse(oshape, &mut views)
    };
    Step::Elementwise(Elementwise {
        prog,
        dims,
        out: View {
            loc: out.0,
            off: 0,
            strides: out_s,
        },
        ins: ins
            .iter()
            .zip(in_s)
            .map(|((loc, _), strides)| View {
                loc: *loc,
                off: 0,
                strides,
            })
            .collect(),
    })
}

fn copy(
    dims: &[usize],
    src: Loc,
    src_off: usize,
    mut src_s: Vec<i64>,
    dst: Loc,
    dst_off: usize,
    mut dst_s: Vec<i64>,
) -> Step {
    let dims = collapse(dims, &mut [&mut dst_s, &mut src_s]);
    Step::Copy(Copy {
        dims,
        src: View {
            loc: src,
            off: src_off,
            strides: src_s,
        },
        dst: View {
            loc: dst,
            off: dst_off,
            strides: dst_s,
        },
    })
}
