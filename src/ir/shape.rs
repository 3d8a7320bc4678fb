//! Shape rules: one function that, given an op and its operand types, gives
//! its result types or an error naming the op and the sizes involved.
//!
//! Written generically over [`Dim`], so the same rules check symbolic shapes
//! (`dlc check`) and concrete ones (every compiled graph, every pass).

use super::dim::Dim;
use super::graph::{fmt_shape, TensorType};
use super::op::{BinaryOp, Conv2d, Op, Pool2d};
use crate::tensor::DType;
use std::fmt;

/// A shape-rule violation; the caller attaches the source span.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ShapeError {
    pub message: String,
}

fn err<T>(message: impl Into<String>) -> Result<T, ShapeError> {
    Err(ShapeError {
        message: message.into(),
    })
}

type Types<'a, D> = &'a [&'a TensorType<D>];

/// The result types of `op` applied to operands of the given types.
pub fn infer<D: Dim>(op: &Op<D>, ins: Types<'_, D>) -> Result<Vec<TensorType<D>>, ShapeError> {
    let name = op.name();
    let one = |t: TensorType<D>| Ok(vec![t]);
    match op {
        Op::Input { .. } | Op::Param { .. } | Op::State { .. } => err(format!(
            "{name}: a leaf has no shape rule; add it with its type"
        )),
        Op::Fill { shape, .. } => {
            arity(name, ins, 0)?;
            one(TensorType::f32(shape.clone()))
        }
        Op::Unary(_) => {
            arity(name, ins, 1)?;
            float(name, "operand", ins[0])?;
            one(ins[0].clone())
        }
        Op::Binary(b) => {
            arity(name, ins, 2)?;
            float(name, "left operand", ins[0])?;
            float(name, "right operand", ins[1])?;
            let shape =
                broadcast_shapes(&ins[0].shape, &ins[1].shape).ok_or_else(|| ShapeError {
                    message: format!(
                        "{}: shapes {} and {} do not broadcast",
                        binary_symbol(*b),
                        fmt_shape(&ins[0].shape),
                        fmt_shape(&ins[1].shape)
                    ),
                })?;
            one(TensorType::f32(shape))
        }
        Op::Reduce { axes, keepdims, .. } => {
            arity(name, ins, 1)?;
            float(name, "operand", ins[0])?;
            let x = ins[0];
            for &a in axes {
                if a >= x.rank() {
                    return err(format!(
                        "{name}: axis {a} is out of range for a tensor of rank {}",
                        x.rank()
                    ));
                }
            }
            let shape = x
                .shape
                .iter()
                .enumerate()
                .filter_map(|(i, d)| {
                    if axes.contains(&i) {
                        keepdims.then(|| D::lit(1))
                    } else {
                        Some(d.clone())
                    }
                })
                .collect();
            one(TensorType::f32(shape))
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            arity(name, ins, 1)?;
            float(name, "operand", ins[0])?;
            if *axis >= ins[0].rank() {
                return err(format!(
                    "{name}: axis {axis} is out of range for a tensor of rank {}",
                    ins[0].rank()
                ));
            }
            one(ins[0].clone())
        }
        Op::MatMul => {
            arity(name, ins, 2)?;
            float(name, "left operand", ins[0])?;
            float(name, "right operand", ins[1])?;
            let (a, b) = (&ins[0].shape, &ins[1].shape);
            if a.len() < 2 || b.len() < 2 {
                return err(format!(
                    "matmul: operands must have rank >= 2 after 1-D promotion, got {} and {}",
                    fmt_shape(a),
                    fmt_shape(b)
                ));
            }
            let (m, k1) = (&a[a.len() - 2], &a[a.len() - 1]);
            let (k2, n) = (&b[b.len() - 2], &b[b.len() - 1]);
            if k1 != k2 {
                return err(format!(
                    "matmul: inner dimensions differ: {} @ {} ({} vs {})",
                    fmt_shape(a),
                    fmt_shape(b),
                    k1,
                    k2
                ));
            }
            let batch =
                broadcast_shapes(&a[..a.len() - 2], &b[..b.len() - 2]).ok_or_else(|| {
                    ShapeError {
                        message: format!(
                            "matmul: batch dimensions of {} and {} do not broadcast",
                            fmt_shape(a),
                            fmt_shape(b)
                        ),
                    }
                })?;
            let mut shape = batch;
            shape.push(m.clone());
            shape.push(n.clone());
            one(TensorType::f32(shape))
        }
        Op::Transpose { perm } => {
            arity(name, ins, 1)?;
            let x = ins[0];
            let mut seen = vec![false; x.rank()];
            let valid = perm.len() == x.rank()
                && perm
                    .iter()
                    .all(|&p| p < seen.len() && !std::mem::replace(&mut seen[p], true));
            if !valid {
                return err(format!(
                    "transpose: {perm:?} is not a permutation of the {} axes of {}",
                    x.rank(),
                    fmt_shape(&x.shape)
                ));
            }
            let shape = perm.iter().map(|&p| x.shape[p].clone()).collect();
            one(TensorType::new(x.dtype, shape))
        }
        Op::Reshape { shape } => {
            arity(name, ins, 1)?;
            let x = ins[0];
            let (from, to) = (D::product(&x.shape), D::product(shape));
            if from != to {
                return err(format!(
                    "reshape: cannot reshape {} ({} elements) to {} ({} elements)",
                    fmt_shape(&x.shape),
                    from,
                    fmt_shape(shape),
                    to
                ));
            }
            one(TensorType::new(x.dtype, shape.clone()))
        }
        Op::Expand { shape } => {
            arity(name, ins, 1)?;
            let x = ins[0];
            match broadcast_shapes(&x.shape, shape) {
                Some(s) if &s == shape => one(TensorType::new(x.dtype, shape.clone())),
                _ => err(format!(
                    "expand: {} does not broadcast to {}",
                    fmt_shape(&x.shape),
                    fmt_shape(shape)
                )),
            }
        }
        Op::Concat { axis } => {
            if ins.is_empty() {
                return err("concat: needs at least one operand");
            }
            let first = ins[0];
            if *axis >= first.rank() {
                return err(format!(
                    "concat: axis {axis} is out of range for a tensor of rank {}",
                    first.rank()
                ));
            }
            let mut total = D::lit(0);
            for (i, t) in ins.iter().enumerate() {
                if t.dtype != first.dtype {
                    return err(format!(
                        "concat: operand {i} is {} but operand 0 is {}",
                        t.dtype, first.dtype
                    ));
                }
                let same_rest = t.rank() == first.rank()
                    && (0..t.rank()).all(|d| d == *axis || t.shape[d] == first.shape[d]);
                if !same_rest {
                    return err(format!(
                        "concat: operand {i} has shape {} but operand 0 has {}; \
                         all sizes except axis {axis} must match",
                        fmt_shape(&t.shape),
                        fmt_shape(&first.shape)
                    ));
                }
                total = total.add(&t.shape[*axis]);
            }
            let mut shape = first.shape.clone();
            shape[*axis] = total;
            one(TensorType::new(first.dtype, shape))
        }
        Op::Slice { axis, start, end } => {
            arity(name, ins, 1)?;
            let x = ins[0];
            if *axis >= x.rank() {
                return err(format!(
                    "slice: axis {axis} is out of range for a tensor of rank {}",
                    x.rank()
                ));
            }
            if let Some(n) = x.shape[*axis].known() {
                if end > &n || start > end {
                    return err(format!(
                        "slice: range {start}..{end} does not fit axis {axis} of size {n}"
                    ));
                }
            }
            let mut shape = x.shape.clone();
            shape[*axis] = D::lit(end - start);
            one(TensorType::new(x.dtype, shape))
        }
        Op::PadSlice { axis, full, .. } => {
            arity(name, ins, 1)?;
            let x = ins[0];
            if *axis >= x.rank() {
                return err(format!("pad_slice: axis {axis} is out of range"));
            }
            let mut shape = x.shape.clone();
            shape[*axis] = full.clone();
            one(TensorType::new(x.dtype, shape))
        }
        Op::Conv(c) => {
            arity(name, ins, 2)?;
            float(name, "input", ins[0])?;
            float(name, "weight", ins[1])?;
            let (x, w) = (&ins[0].shape, &ins[1].shape);
            rank(name, "input", x, 4, "[N, C, H, W]")?;
            rank(name, "weight", w, 4, "[O, C, KH, KW]")?;
            if x[1] != w[1] {
                return err(format!(
                    "conv: input has {} channels but the weight expects {}",
                    x[1], w[1]
                ));
            }
            let oh = conv_out(name, "height", &x[2], &w[2], c.pad[0] + c.pad[2], c)?;
            let ow = conv_out(name, "width", &x[3], &w[3], c.pad[1] + c.pad[3], c)?;
            one(TensorType::f32(vec![x[0].clone(), w[0].clone(), oh, ow]))
        }
        Op::ConvGradInput { conv, input_hw } => {
            // (dy [N, O, OH, OW], w [O, C, KH, KW]) -> dx [N, C, H, W]
            arity(name, ins, 2)?;
            let (dy, w) = (&ins[0].shape, &ins[1].shape);
            rank(name, "gradient", dy, 4, "[N, O, OH, OW]")?;
            rank(name, "weight", w, 4, "[O, C, KH, KW]")?;
            let oh = conv_out(
                name,
                "height",
                &input_hw[0],
                &w[2],
                conv.pad[0] + conv.pad[2],
                conv,
            )?;
            let ow = conv_out(
                name,
                "width",
                &input_hw[1],
                &w[3],
                conv.pad[1] + conv.pad[3],
                conv,
            )?;
            if dy[1] != w[0] || dy[2] != oh || dy[3] != ow {
                return err(format!(
                    "conv_grad_input: gradient {} does not match the conv output",
                    fmt_shape(dy)
                ));
            }
            one(TensorType::f32(vec![
                dy[0].clone(),
                w[1].clone(),
                input_hw[0].clone(),
                input_hw[1].clone(),
            ]))
        }
        Op::ConvGradFilter { conv, kernel_hw } => {
            // (x [N, C, H, W], dy [N, O, OH, OW]) -> dw [O, C, KH, KW]
            arity(name, ins, 2)?;
            let (x, dy) = (&ins[0].shape, &ins[1].shape);
            rank(name, "input", x, 4, "[N, C, H, W]")?;
            rank(name, "gradient", dy, 4, "[N, O, OH, OW]")?;
            let oh = conv_out(
                name,
                "height",
                &x[2],
                &kernel_hw[0],
                conv.pad[0] + conv.pad[2],
                conv,
            )?;
            let ow = conv_out(
                name,
                "width",
                &x[3],
                &kernel_hw[1],
                conv.pad[1] + conv.pad[3],
                conv,
            )?;
            if dy[0] != x[0] || dy[2] != oh || dy[3] != ow {
                return err(format!(
                    "conv_grad_filter: gradient {} does not match the conv output",
                    fmt_shape(dy)
                ));
            }
            one(TensorType::f32(vec![
                dy[1].clone(),
                x[1].clone(),
                kernel_hw[0].clone(),
                kernel_hw[1].clone(),
            ]))
        }
        Op::MaxPool(p) | Op::AvgPool(p) => {
            arity(name, ins, 1)?;
            float(name, "input", ins[0])?;
            let x = &ins[0].shape;
            rank(name, "input", x, 4, "[N, C, H, W]")?;
            let oh = pool_out(name, "height", &x[2], p)?;
            let ow = pool_out(name, "width", &x[3], p)?;
            one(TensorType::f32(vec![x[0].clone(), x[1].clone(), oh, ow]))
        }
        Op::MaxPoolGrad(p) => {
            // (x, dy) -> dx
            arity(name, ins, 2)?;
            let x = &ins[0].shape;
            rank(name, "input", x, 4, "[N, C, H, W]")?;
            let expect = vec![
                x[0].clone(),
                x[1].clone(),
                pool_out(name, "height", &x[2], p)?,
                pool_out(name, "width", &x[3], p)?,
            ];
            same_shape(name, "gradient", &ins[1].shape, &expect)?;
            one(ins[0].clone())
        }
        Op::AvgPoolGrad { pool, input_hw } => {
            arity(name, ins, 1)?;
            let dy = &ins[0].shape;
            rank(name, "gradient", dy, 4, "[N, C, OH, OW]")?;
            let expect = vec![
                dy[0].clone(),
                dy[1].clone(),
                pool_out(name, "height", &input_hw[0], pool)?,
                pool_out(name, "width", &input_hw[1], pool)?,
            ];
            same_shape(name, "gradient", dy, &expect)?;
            one(TensorType::f32(vec![
                dy[0].clone(),
                dy[1].clone(),
                input_hw[0].clone(),
                input_hw[1].clone(),
            ]))
        }
        Op::LstmSeq | Op::GruSeq => {
            arity(name, ins, 4)?;
            let gates = if matches!(op, Op::LstmSeq) { 4 } else { 3 };
            let (n, t, h) = recurrent(name, ins, gates)?;
            one(TensorType::f32(vec![n, t, h]))
        }
        Op::LstmSeqGrad | Op::GruSeqGrad => {
            arity(name, ins, 5)?;
            let gates = if matches!(op, Op::LstmSeqGrad) { 4 } else { 3 };
            let (n, t, h) = recurrent(name, ins, gates)?;
            same_shape(name, "gradient", &ins[4].shape, &[n, t, h])?;
            Ok(ins[..4].iter().map(|t| (*t).clone()).collect())
        }
        Op::Attention { causal, .. } => {
            arity(name, ins, 3)?;
            let out = attention(ins, *causal)?;
            one(out)
        }
        Op::AttentionGrad { causal, .. } => {
            arity(name, ins, 4)?;
            let out = attention(&ins[..3], *causal)?;
            same_shape("attention_grad", "gradient", &ins[3].shape, &out.shape)?;
            Ok(ins[..3].iter().map(|t| (*t).clone()).collect())
        }
        Op::Gather => {
            arity(name, ins, 2)?;
            let (table, ids) = (ins[0], ins[1]);
            float(name, "table", table)?;
            rank(name, "table", &table.shape, 2, "[V, D]")?;
            if ids.dtype != DType::I32 {
                return err(format!("gather: ids must be i32, got {}", ids.dtype));
            }
            let mut shape = ids.shape.clone();
            shape.push(table.shape[1].clone());
            one(TensorType::f32(shape))
        }
        Op::ScatterAdd { rows } => {
            arity(name, ins, 2)?;
            let (ids, dy) = (ins[0], ins[1]);
            if ids.dtype != DType::I32 {
                return err(format!("scatter_add: ids must be i32, got {}", ids.dtype));
            }
            if dy.rank() != ids.rank() + 1 || dy.shape[..ids.rank()] != ids.shape[..] {
                return err(format!(
                    "scatter_add: gradient {} does not match ids {}",
                    fmt_shape(&dy.shape),
                    fmt_shape(&ids.shape)
                ));
            }
            one(TensorType::f32(vec![
                rows.clone(),
                dy.shape[ids.rank()].clone(),
            ]))
        }
        Op::CrossEntropy | Op::Hinge => {
            arity(name, ins, 2)?;
            classification(name, ins[0], ins[1])?;
            one(TensorType::f32(vec![]))
        }
        Op::CrossEntropyGrad | Op::HingeGrad => {
            arity(name, ins, 3)?;
            classification(name, ins[0], ins[1])?;
            same_shape(name, "loss gradient", &ins[2].shape, &[])?;
            one(ins[0].clone())
        }
    }
}

/// NumPy broadcasting of two shapes.
/// `None` when the shapes do not broadcast.
pub fn broadcast_shapes<D: Dim>(a: &[D], b: &[D]) -> Option<Vec<D>> {
    let rank = a.len().max(b.len());
    let one = D::lit(1);
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = (i + a.len())
            .checked_sub(rank)
            .map(|j| &a[j])
            .unwrap_or(&one);
        let db = (i + b.len())
            .checked_sub(rank)
            .map(|j| &b[j])
            .unwrap_or(&one);
        if da == db || *db == one {
            out.push(da.clone());
        } else if *da == one {
            out.push(db.clone());
        } else {
            return None;
        }
    }
    Some(out)
}

fn binary_symbol(b: BinaryOp) -> &'static str {
    match b {
        BinaryOp::Add => "+",
        BinaryOp::Sub => "-",
        BinaryOp::Mul => "*",
        BinaryOp::Div => "/",
        BinaryOp::Maximum => "maximum",
        BinaryOp::Minimum => "minimum",
        BinaryOp::Greater => "greater",
        BinaryOp::Equal => "equal",
    }
}

fn arity<D: Dim>(name: &str, ins: Types<'_, D>, n: usize) -> Result<(), ShapeError> {
    if ins.len() != n {
        return err(format!("{name}: expects {n} operands, got {}", ins.len()));
    }
    Ok(())
}

fn float<D: Dim>(name: &str, what: &str, t: &TensorType<D>) -> Result<(), ShapeError> {
    if t.dtype != DType::F32 {
        return err(format!("{name}: the {what} must be f32, got {t}"));
    }
    Ok(())
}

fn rank<D: Dim>(name: &str, what: &str, s: &[D], r: usize, layout: &str) -> Result<(), ShapeError> {
    if s.len() != r {
        return err(format!(
            "{name}: the {what} must have rank {r} {layout}, got {}",
            fmt_shape(s)
        ));
    }
    Ok(())
}

fn same_shape<D: Dim>(name: &str, what: &str, got: &[D], want: &[D]) -> Result<(), ShapeError> {
    if got != want {
        return err(format!(
            "{name}: the {what} has shape {} but {} is expected",
            fmt_shape(got),
            fmt_shape(want)
        ));
    }
    Ok(())
}

/// `floor((size + pad - d(k-1) - 1)/s) + 1`, an error when below 1.
fn conv_out<D: Dim>(
    name: &str,
    axis: &str,
    size: &D,
    k: &D,
    pad_total: usize,
    c: &Conv2d,
) -> Result<D, ShapeError> {
    let span = k.sub(&D::lit(1)).mul(&D::lit(c.dilation)).add(&D::lit(1));
    if let (Some(n), Some(s)) = (size.known(), span.known()) {
        if n + pad_total < s {
            return err(format!(
                "{name}: the kernel spans {s} along the {axis} but the padded input has only {}",
                n + pad_total
            ));
        }
    }
    Ok(size
        .add(&D::lit(pad_total))
        .sub(&span)
        .div_floor(&D::lit(c.stride))
        .add(&D::lit(1)))
}

/// `floor((size + 2p - window)/stride) + 1`, an error when below 1.
fn pool_out<D: Dim>(name: &str, axis: &str, size: &D, p: &Pool2d) -> Result<D, ShapeError> {
    if let Some(n) = size.known() {
        if n + 2 * p.pad < p.window {
            return err(format!(
                "{name}: window {} is larger than the padded input {} along the {axis}",
                p.window,
                n + 2 * p.pad
            ));
        }
    }
    Ok(size
        .add(&D::lit(2 * p.pad))
        .sub(&D::lit(p.window))
        .div_floor(&D::lit(p.stride))
        .add(&D::lit(1)))
}

/// Checks `(x [N,T,F], w_x [F,G*H], w_h [H,G*H], b [G*H])`, returns `(N, T, H)`.
fn recurrent<D: Dim>(name: &str, ins: Types<'_, D>, gates: usize) -> Result<(D, D, D), ShapeError> {
    for (t, what) in ins.iter().zip(["input", "w_x", "w_h", "b"]) {
        float(name, what, t)?;
    }
    let (x, wx, wh, b) = (&ins[0].shape, &ins[1].shape, &ins[2].shape, &ins[3].shape);
    rank(name, "input", x, 3, "[N, T, F]")?;
    rank(name, "w_x", wx, 2, "[F, G*H]")?;
    rank(name, "w_h", wh, 2, "[H, G*H]")?;
    rank(name, "b", b, 1, "[G*H]")?;
    let h = wh[0].clone();
    let gh = h.mul(&D::lit(gates));
    if wx[0] != x[2] {
        return err(format!(
            "{name}: input has {} features but w_x expects {}",
            x[2], wx[0]
        ));
    }
    for (what, s) in [("w_x", &wx[1]), ("w_h", &wh[1]), ("b", &b[0])] {
        if *s != gh {
            return err(format!(
                "{name}: {what} has {s} gate columns but {gates} gates of hidden size {h} need {gh}"
            ));
        }
    }
    Ok((x[0].clone(), x[1].clone(), h))
}

fn attention<D: Dim>(ins: Types<'_, D>, causal: bool) -> Result<TensorType<D>, ShapeError> {
    let name = "attention";
    for (t, what) in ins.iter().zip(["q", "k", "v"]) {
        float(name, what, t)?;
    }
    let (q, k, v) = (&ins[0].shape, &ins[1].shape, &ins[2].shape);
    if q.len() < 2 || k.len() != q.len() || v.len() != q.len() {
        return err(format!(
            "attention: q, k, v must have the same rank >= 2, got {}, {}, {}",
            fmt_shape(q),
            fmt_shape(k),
            fmt_shape(v)
        ));
    }
    let r = q.len();
    if q[..r - 2] != k[..r - 2] || q[..r - 2] != v[..r - 2] {
        return err(format!(
            "attention: q, k, v must have the same leading dims, got {}, {}, {}",
            fmt_shape(q),
            fmt_shape(k),
            fmt_shape(v)
        ));
    }
    if q[r - 1] != k[r - 1] {
        return err(format!(
            "attention: q has feature size {} but k has {}",
            q[r - 1],
            k[r - 1]
        ));
    }
    if k[r - 2] != v[r - 2] {
        return err(format!(
            "attention: k has {} positions but v has {}",
            k[r - 2],
            v[r - 2]
        ));
    }
    if causal && q[r - 2] != k[r - 2] {
        return err(format!(
            "attention: causal attention needs as many queries as keys, got {} and {}",
            q[r - 2],
            k[r - 2]
        ));
    }
    let mut shape = q.clone();
    shape[r - 1] = v[r - 1].clone();
    Ok(TensorType::f32(shape))
}

fn classification<D: Dim>(
    name: &str,
    scores: &TensorType<D>,
    labels: &TensorType<D>,
) -> Result<(), ShapeError> {
    float(name, "scores", scores)?;
    rank(name, "scores", &scores.shape, 2, "[N, C]")?;
    if labels.dtype != DType::I32 {
        return err(format!("{name}: labels must be i32, got {}", labels.dtype));
    }
    if labels.shape.len() != 1 || labels.shape[0] != scores.shape[0] {
        return err(format!(
            "{name}: labels have shape {} but the scores {} need [{}]",
            fmt_shape(&labels.shape),
            fmt_shape(&scores.shape),
            scores.shape[0]
        ));
    }
    Ok(())
}

impl fmt::Display for crate::ir::Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port == 0 {
            write!(f, "%{}", self.node.index())
        } else {
            write!(f, "%{}.{}", self.node.index(), self.port)
        }
    }
}
