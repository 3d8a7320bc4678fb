//! Primitive op calls (LANGUAGE.md §6): their signatures and their lowering
//! to IR ops, including the sugar that is a composition of ops (`flatten`,
//! `last`, `global_avg_pool`, `mse`, 1-D matmul).

use super::expand::Elab;
use super::value::{Bound, ElabDim, Int, Val};
use crate::ir::{
    fmt_shape, BinaryOp, Conv2d, Op, Pool2d, ReduceOp, Span, TensorType, UnaryOp, Value,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prim {
    Unary(UnaryOp),
    Maximum,
    Minimum,
    Softmax,
    LogSoftmax,
    Reduce(ReduceOp),
    MatMul,
    Transpose,
    Reshape,
    Flatten,
    Concat,
    Slice,
    Last,
    Conv,
    MaxPool,
    AvgPool,
    GlobalAvgPool,
    LstmSeq,
    GruSeq,
    Attention,
    Gather,
    CrossEntropy,
    Hinge,
    Mse,
}

/// Strides, windows, paddings and dilations above this are certainly
/// mistakes, and keeping them small keeps size arithmetic far from overflow.
const MAX_ATTR: i64 = 1 << 24;

type Sig = &'static [(&'static str, bool)];

impl Prim {
    pub const NAMES: &'static [&'static str] = &[
        "relu",
        "sigmoid",
        "tanh",
        "exp",
        "log",
        "sqrt",
        "abs",
        "neg",
        "maximum",
        "minimum",
        "softmax",
        "log_softmax",
        "sum",
        "mean",
        "max",
        "matmul",
        "transpose",
        "reshape",
        "flatten",
        "concat",
        "slice",
        "last",
        "conv",
        "max_pool2d",
        "avg_pool2d",
        "global_avg_pool",
        "lstm_seq",
        "gru_seq",
        "attention",
        "gather",
        "cross_entropy",
        "hinge",
        "mse",
    ];

    pub fn from_name(name: &str) -> Option<Prim> {
        use UnaryOp as U;
        Some(match name {
            "relu" => Prim::Unary(U::Relu),
            "sigmoid" => Prim::Unary(U::Sigmoid),
            "tanh" => Prim::Unary(U::Tanh),
            "exp" => Prim::Unary(U::Exp),
            "log" => Prim::Unary(U::Log),
            "sqrt" => Prim::Unary(U::Sqrt),
            "abs" => Prim::Unary(U::Abs),
            "neg" => Prim::Unary(U::Neg),
            "maximum" => Prim::Maximum,
            "minimum" => Prim::Minimum,
            "softmax" => Prim::Softmax,
            "log_softmax" => Prim::LogSoftmax,
            "sum" => Prim::Reduce(ReduceOp::Sum),
            "mean" => Prim::Reduce(ReduceOp::Mean),
            "max" => Prim::Reduce(ReduceOp::Max),
            "matmul" => Prim::MatMul,
            "transpose" => Prim::Transpose,
            "reshape" => Prim::Reshape,
            "flatten" => Prim::Flatten,
            "concat" => Prim::Concat,
            "slice" => Prim::Slice,
            "last" => Prim::Last,
            "conv" => Prim::Conv,
            "max_pool2d" => Prim::MaxPool,
            "avg_pool2d" => Prim::AvgPool,
            "global_avg_pool" => Prim::GlobalAvgPool,
            "lstm_seq" => Prim::LstmSeq,
            "gru_seq" => Prim::GruSeq,
            "attention" => Prim::Attention,
            "gather" => Prim::Gather,
            "cross_entropy" => Prim::CrossEntropy,
            "hinge" => Prim::Hinge,
            "mse" => Prim::Mse,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        Prim::NAMES
            .iter()
            .copied()
            .find(|n| Prim::from_name(n) == Some(self))
            .unwrap_or("op")
    }

    /// Argument names in order, each with whether it has a default.
    pub fn signature(self) -> Sig {
        match self {
            Prim::Unary(_) | Prim::Flatten | Prim::Last | Prim::GlobalAvgPool => &[("x", false)],
            Prim::Maximum | Prim::Minimum | Prim::MatMul => &[("a", false), ("b", false)],
            Prim::Softmax | Prim::LogSoftmax => &[("x", false), ("axis", true)],
            Prim::Reduce(_) => &[("x", false), ("axis", true), ("keepdims", true)],
            Prim::Transpose => &[("x", false), ("perm", true)],
            Prim::Reshape => &[("x", false), ("shape", false)],
            Prim::Concat => &[("xs", false), ("axis", true)],
            Prim::Slice => &[
                ("x", false),
                ("axis", false),
                ("start", false),
                ("end", false),
            ],
            Prim::Conv => &[
                ("x", false),
                ("w", false),
                ("stride", true),
                ("pad", true),
                ("dilation", true),
            ],
            Prim::MaxPool | Prim::AvgPool => &[
                ("x", false),
                ("window", false),
                ("stride", true),
                ("pad", true),
            ],
            Prim::LstmSeq | Prim::GruSeq => {
                &[("x", false), ("w_x", false), ("w_h", false), ("b", false)]
            }
            Prim::Attention => &[
                ("q", false),
                ("k", false),
                ("v", false),
                ("causal", true),
                ("scale", true),
            ],
            Prim::Gather => &[("table", false), ("ids", false)],
            Prim::CrossEntropy => &[("logits", false), ("labels", false)],
            Prim::Hinge => &[("scores", false), ("labels", false)],
            Prim::Mse => &[("pred", false), ("target", false)],
        }
    }
}

impl<D: ElabDim> Elab<'_, D> {
    pub(crate) fn prim(&mut self, p: Prim, args: Bound<D>, span: Span) -> Val<D> {
        self.lower(p, &args, span).unwrap_or(Val::Poison)
    }

    fn arg_tensor(&mut self, p: Prim, args: &Bound<D>, i: usize) -> Option<Value> {
        let (v, s) = args[i].as_ref()?;
        let what = format!("{}: argument `{}`", p.name(), p.signature()[i].0);
        self.tensor(v, *s, &what)
    }

    /// A constant integer argument (or `default` when omitted).
    fn arg_int(&mut self, p: Prim, args: &Bound<D>, i: usize, default: Option<i64>) -> Option<i64> {
        let Some((v, s)) = &args[i] else {
            return default;
        };
        let name = p.signature()[i].0;
        match v {
            Val::Int(n) => match n.as_const() {
                Some(c) => Some(c),
                None => {
                    self.error(
                        *s,
                        format!("{}: `{name}` must be a known integer, got {n}", p.name()),
                    );
                    None
                }
            },
            other => {
                let d = self.describe(other);
                self.error(
                    *s,
                    format!("{}: `{name}` must be an integer, got {d}", p.name()),
                );
                None
            }
        }
    }

    /// A constant integer argument that must be at least `min`.
    fn arg_count(
        &mut self,
        p: Prim,
        args: &Bound<D>,
        i: usize,
        default: Option<i64>,
        min: i64,
    ) -> Option<usize> {
        let n = self.arg_int(p, args, i, default)?;
        if n < min {
            let s = args[i].as_ref().map_or(Span::default(), |a| a.1);
            self.error(
                s,
                format!(
                    "{}: `{}` must be at least {min}, got {n}",
                    p.name(),
                    p.signature()[i].0
                ),
            );
            return None;
        }
        if n > MAX_ATTR {
            let s = args[i].as_ref().map_or(Span::default(), |a| a.1);
            self.error(
                s,
                format!(
                    "{}: `{}` is {n}, larger than the supported {MAX_ATTR}",
                    p.name(),
                    p.signature()[i].0
                ),
            );
            return None;
        }
        usize::try_from(n).ok()
    }

    fn arg_bool(&mut self, p: Prim, args: &Bound<D>, i: usize, default: bool) -> Option<bool> {
        match &args[i] {
            None => Some(default),
            Some((Val::Bool(b), _)) => Some(*b),
            Some((other, s)) => {
                let d = self.describe(other);
                self.error(
                    *s,
                    format!(
                        "{}: `{}` must be true or false, got {d}",
                        p.name(),
                        p.signature()[i].0
                    ),
                );
                None
            }
        }
    }

    fn axis(&mut self, p: Prim, axis: i64, rank: usize, span: Span) -> Option<usize> {
        let r = rank as i64;
        if axis < -r || axis >= r {
            self.error(
                span,
                format!(
                    "{}: axis {axis} is out of range for a tensor of rank {rank}",
                    p.name()
                ),
            );
            return None;
        }
        Some(if axis < 0 { axis + r } else { axis } as usize)
    }

    fn int_list(&mut self, p: Prim, v: &Val<D>, span: Span, what: &str) -> Option<Vec<Int<D>>> {
        let Val::List(items) = v else {
            let d = self.describe(v);
            self.error(
                span,
                format!("{}: `{what}` must be a list of integers, got {d}", p.name()),
            );
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            match it {
                Val::Int(i) => out.push(i.clone()),
                other => {
                    let d = self.describe(other);
                    self.error(
                        span,
                        format!(
                            "{}: `{what}` must be a list of integers, but it holds {d}",
                            p.name()
                        ),
                    );
                    return None;
                }
            }
        }
        Some(out)
    }

    fn lower(&mut self, p: Prim, args: &Bound<D>, span: Span) -> Option<Val<D>> {
        let ty = |this: &Self, v: Value| this.graph.ty(v).clone();
        Some(match p {
            Prim::Unary(u) => {
                let x = self.arg_tensor(p, args, 0)?;
                self.op(Op::Unary(u), &[x], span)
            }
            Prim::Maximum | Prim::Minimum => {
                let a = self.arg_tensor(p, args, 0)?;
                let b = self.arg_tensor(p, args, 1)?;
                let op = if p == Prim::Maximum {
                    BinaryOp::Maximum
                } else {
                    BinaryOp::Minimum
                };
                self.op(Op::Binary(op), &[a, b], span)
            }
            Prim::Softmax | Prim::LogSoftmax => {
                let x = self.arg_tensor(p, args, 0)?;
                let a = self.arg_int(p, args, 1, Some(-1))?;
                let axis = self.axis(p, a, ty(self, x).rank(), span)?;
                let op = if p == Prim::Softmax {
                    Op::Softmax { axis }
                } else {
                    Op::LogSoftmax { axis }
                };
                self.op(op, &[x], span)
            }
            Prim::Reduce(op) => {
                let x = self.arg_tensor(p, args, 0)?;
                let rank = ty(self, x).rank();
                let axes = match &args[1] {
                    None => (0..rank).collect(),
                    Some((Val::Int(_), _)) => {
                        let a = self.arg_int(p, args, 1, None)?;
                        vec![self.axis(p, a, rank, span)?]
                    }
                    Some((v, s)) => {
                        let list = self.int_list(p, v, *s, "axis")?;
                        let mut axes = Vec::new();
                        for i in list {
                            let Some(c) = i.as_const() else {
                                self.error(
                                    *s,
                                    format!("{}: axes must be known integers, got {i}", p.name()),
                                );
                                return None;
                            };
                            let a = self.axis(p, c, rank, *s)?;
                            if axes.contains(&a) {
                                self.error(*s, format!("{}: axis {c} is listed twice", p.name()));
                                return None;
                            }
                            axes.push(a);
                        }
                        axes.sort_unstable();
                        axes
                    }
                };
                let keepdims = self.arg_bool(p, args, 2, false)?;
                self.op(Op::Reduce { op, axes, keepdims }, &[x], span)
            }
            Prim::MatMul => {
                let a = self.arg_tensor(p, args, 0)?;
                let b = self.arg_tensor(p, args, 1)?;
                self.matmul(a, b, span)
            }
            Prim::Transpose => {
                let x = self.arg_tensor(p, args, 0)?;
                let rank = ty(self, x).rank();
                let perm = match &args[1] {
                    None => {
                        if rank < 2 {
                            self.error(
                                span,
                                format!(
                                    "transpose: swapping the last two axes needs rank >= 2, got {}",
                                    ty(self, x)
                                ),
                            );
                            return None;
                        }
                        let mut perm: Vec<usize> = (0..rank).collect();
                        perm.swap(rank - 2, rank - 1);
                        perm
                    }
                    Some((v, s)) => {
                        let list = self.int_list(p, v, *s, "perm")?;
                        let mut perm = Vec::new();
                        for i in list {
                            let c = i.as_const().unwrap_or(i64::MAX);
                            perm.push(self.axis(p, c, rank, *s)?);
                        }
                        perm
                    }
                };
                self.op(Op::Transpose { perm }, &[x], span)
            }
            Prim::Reshape => {
                let x = self.arg_tensor(p, args, 0)?;
                let (v, s) = args[1].as_ref()?;
                let list = self.int_list(p, v, *s, "shape")?;
                let mut shape: Vec<Option<D>> = Vec::new();
                for i in &list {
                    match i.as_const() {
                        Some(-1) => {
                            if shape.iter().any(Option::is_none) {
                                self.error(*s, "reshape: at most one size may be -1");
                                return None;
                            }
                            shape.push(None);
                        }
                        _ => match i.to_dim() {
                            Some(d) => shape.push(Some(d)),
                            None => {
                                self.error(
                                    *s,
                                    format!("reshape: sizes must be non-negative or -1, got {i}"),
                                );
                                return None;
                            }
                        },
                    }
                }
                let known = D::product(shape.iter().flatten());
                let total = D::product(&ty(self, x).shape);
                let fill = if shape.iter().any(Option::is_none) {
                    if known == D::lit(0) {
                        self.error(
                            *s,
                            "reshape: cannot infer -1 when the other sizes multiply to 0",
                        );
                        return None;
                    }
                    let q = total.div_floor(&known);
                    if q.mul(&known) != total {
                        let parts: Vec<String> = list.iter().map(|i| i.to_string()).collect();
                        self.error(
                            span,
                            format!(
                                "reshape: cannot reshape {} ({total} elements) to [{}]",
                                fmt_shape(&ty(self, x).shape),
                                parts.join(", ")
                            ),
                        );
                        return None;
                    }
                    q
                } else {
                    D::lit(0)
                };
                let shape = shape
                    .into_iter()
                    .map(|d| d.unwrap_or_else(|| fill.clone()))
                    .collect();
                self.op(Op::Reshape { shape }, &[x], span)
            }
            Prim::Flatten => {
                let x = self.arg_tensor(p, args, 0)?;
                let t = ty(self, x);
                if t.rank() == 0 {
                    self.error(
                        span,
                        format!("flatten: expects [N, ...], got the scalar {t}"),
                    );
                    return None;
                }
                let shape = vec![t.shape[0].clone(), D::product(&t.shape[1..])];
                self.op(Op::Reshape { shape }, &[x], span)
            }
            Prim::Concat => {
                let (v, s) = args[0].as_ref()?;
                let Val::List(items) = v else {
                    let d = self.describe(v);
                    self.error(
                        *s,
                        format!("concat: expects a list of tensors `[a, b, ...]`, got {d}"),
                    );
                    return None;
                };
                if items.is_empty() {
                    self.error(*s, "concat: the list of tensors is empty");
                    return None;
                }
                let mut xs = Vec::new();
                for it in items {
                    xs.push(self.tensor(it, *s, "concat: each operand")?);
                }
                let a = self.arg_int(p, args, 1, Some(0))?;
                let axis = self.axis(p, a, ty(self, xs[0]).rank(), span)?;
                self.op(Op::Concat { axis }, &xs, span)
            }
            Prim::Slice => {
                let x = self.arg_tensor(p, args, 0)?;
                let a = self.arg_int(p, args, 1, None)?;
                let t = ty(self, x);
                let axis = self.axis(p, a, t.rank(), span)?;
                let (Some((sv, ss)), Some((ev, es))) = (&args[2], &args[3]) else {
                    return None;
                };
                let start = self.int_arg_any(p, sv, *ss, "start")?;
                let end = self.int_arg_any(p, ev, *es, "end")?;
                self.slice(x, t, axis, start, end, span)?
            }
            Prim::Last => {
                let x = self.arg_tensor(p, args, 0)?;
                let t = ty(self, x);
                if t.rank() < 2 {
                    self.error(
                        span,
                        format!("last: expects a sequence [N, T, ...], got {t}"),
                    );
                    return None;
                }
                if t.shape[1].known() == Some(0) {
                    self.error(span, format!("last: the sequence {t} has no time steps"));
                    return None;
                }
                let Val::Tensor(s) = self.slice(
                    x,
                    t.clone(),
                    1,
                    Int::C(-1),
                    Int::from_dim(&t.shape[1]),
                    span,
                )?
                else {
                    return None;
                };
                let mut shape = t.shape.clone();
                shape.remove(1);
                self.op(Op::Reshape { shape }, &[s], span)
            }
            Prim::Conv => {
                let x = self.arg_tensor(p, args, 0)?;
                let w = self.arg_tensor(p, args, 1)?;
                let stride = self.arg_count(p, args, 2, Some(1), 1)?;
                let dilation = self.arg_count(p, args, 4, Some(1), 1)?;
                let pad = match &args[3] {
                    Some((Val::Str(s), sp)) if s == "same" => {
                        if stride != 1 {
                            self.error(
                                *sp,
                                format!("conv: pad=\"same\" needs stride 1, got stride {stride}"),
                            );
                            return None;
                        }
                        let wt = ty(self, w);
                        if wt.rank() != 4 {
                            // The shape rule reports the bad weight.
                            [0; 4]
                        } else {
                            let (Some(kh), Some(kw)) = (wt.shape[2].known(), wt.shape[3].known())
                            else {
                                self.error(
                                    *sp,
                                    format!(
                                        "conv: pad=\"same\" needs a known kernel size, got {wt}"
                                    ),
                                );
                                return None;
                            };
                            // Total padding d(K-1); an odd total puts the extra
                            // row/column at the bottom/right.
                            let th = dilation.saturating_mul(kh.saturating_sub(1));
                            let tw = dilation.saturating_mul(kw.saturating_sub(1));
                            [th / 2, tw / 2, th - th / 2, tw - tw / 2]
                        }
                    }
                    Some((Val::Str(s), _)) if s == "valid" => [0; 4],
                    Some((Val::Str(s), sp)) => {
                        self.error(
                            *sp,
                            format!("conv: pad must be an integer or \"same\", got \"{s}\""),
                        );
                        return None;
                    }
                    _ => {
                        let n = self.arg_count(p, args, 3, Some(0), 0)?;
                        [n; 4]
                    }
                };
                let op = Op::Conv(Conv2d {
                    stride,
                    dilation,
                    pad,
                });
                self.op(op, &[x, w], span)
            }
            Prim::MaxPool | Prim::AvgPool => {
                let x = self.arg_tensor(p, args, 0)?;
                let window = self.arg_count(p, args, 1, None, 1)?;
                let stride = self.arg_count(p, args, 2, Some(window as i64), 1)?;
                let pad = self.arg_count(p, args, 3, Some(0), 0)?;
                if pad >= window {
                    let s = args[3].as_ref().map_or(span, |a| a.1);
                    self.error(
                        s,
                        format!(
                            "{}: pad {pad} must be smaller than the window {window}",
                            p.name()
                        ),
                    );
                    return None;
                }
                let pool = Pool2d {
                    window,
                    stride,
                    pad,
                };
                let op = if p == Prim::MaxPool {
                    Op::MaxPool(pool)
                } else {
                    Op::AvgPool(pool)
                };
                self.op(op, &[x], span)
            }
            Prim::GlobalAvgPool => {
                let x = self.arg_tensor(p, args, 0)?;
                let t = ty(self, x);
                if t.rank() != 4 {
                    self.error(
                        span,
                        format!(
                            "global_avg_pool: the input must have rank 4 [N, C, H, W], got {t}"
                        ),
                    );
                    return None;
                }
                self.op(
                    Op::Reduce {
                        op: ReduceOp::Mean,
                        axes: vec![2, 3],
                        keepdims: false,
                    },
                    &[x],
                    span,
                )
            }
            Prim::LstmSeq | Prim::GruSeq => {
                let mut ins = Vec::new();
                for i in 0..4 {
                    ins.push(self.arg_tensor(p, args, i)?);
                }
                let op = if p == Prim::LstmSeq {
                    Op::LstmSeq
                } else {
                    Op::GruSeq
                };
                self.op(op, &ins, span)
            }
            Prim::Attention => {
                let q = self.arg_tensor(p, args, 0)?;
                let k = self.arg_tensor(p, args, 1)?;
                let v = self.arg_tensor(p, args, 2)?;
                let causal = self.arg_bool(p, args, 3, false)?;
                let scale = match &args[4] {
                    Some((val, s)) => self.float_of(val, *s, "attention", "scale")?,
                    None => {
                        let d = ty(self, q).shape.last().and_then(|d| d.known());
                        // Symbolic d only while checking, whose graph never runs.
                        d.map_or(1.0, |d| 1.0 / (d.max(1) as f32).sqrt())
                    }
                };
                self.op(Op::Attention { causal, scale }, &[q, k, v], span)
            }
            Prim::Gather => {
                let t = self.arg_tensor(p, args, 0)?;
                let ids = self.arg_tensor(p, args, 1)?;
                self.op(Op::Gather, &[t, ids], span)
            }
            Prim::CrossEntropy | Prim::Hinge => {
                let s = self.arg_tensor(p, args, 0)?;
                let l = self.arg_tensor(p, args, 1)?;
                let op = if p == Prim::CrossEntropy {
                    Op::CrossEntropy
                } else {
                    Op::Hinge
                };
                self.op(op, &[s, l], span)
            }
            Prim::Mse => {
                let pr = self.arg_tensor(p, args, 0)?;
                let tg = self.arg_tensor(p, args, 1)?;
                let Val::Tensor(d) = self.op(Op::Binary(BinaryOp::Sub), &[pr, tg], span) else {
                    return None;
                };
                let Val::Tensor(sq) = self.op(Op::Binary(BinaryOp::Mul), &[d, d], span) else {
                    return None;
                };
                let rank = ty(self, sq).rank();
                self.op(
                    Op::Reduce {
                        op: ReduceOp::Mean,
                        axes: (0..rank).collect(),
                        keepdims: false,
                    },
                    &[sq],
                    span,
                )
            }
        })
    }

    fn int_arg_any(&mut self, p: Prim, v: &Val<D>, s: Span, name: &str) -> Option<Int<D>> {
        match v {
            Val::Int(i) => Some(i.clone()),
            other => {
                let d = self.describe(other);
                self.error(
                    s,
                    format!("{}: `{name}` must be an integer, got {d}", p.name()),
                );
                None
            }
        }
    }

    /// NumPy slicing along one axis: negative bounds count from the end,
    /// out-of-range bounds clamp.
    fn slice(
        &mut self,
        x: Value,
        t: TensorType<D>,
        axis: usize,
        start: Int<D>,
        end: Int<D>,
        span: Span,
    ) -> Option<Val<D>> {
        let n = &t.shape[axis];
        if let (Some(n), Some(s), Some(e)) = (n.as_i64(), start.as_const(), end.as_const()) {
            let norm = |i: i64| (if i < 0 { i + n } else { i }).clamp(0, n) as usize;
            let (s, e) = (norm(s), norm(e));
            let e = e.max(s);
            return Some(self.op(
                Op::Slice {
                    axis,
                    start: s,
                    end: e,
                },
                &[x],
                span,
            ));
        }
        // Symbolic extent (checking only): the result's size is known as an
        // expression, the bounds are not; the check graph is never run, so
        // the node carries the type with placeholder bounds.
        let norm = |i: &Int<D>| match i.as_const() {
            Some(c) if c < 0 => Int::from_dim(n).add(&Int::C(c)),
            _ => Some(i.clone()),
        };
        let (Some(s), Some(e)) = (norm(&start), norm(&end)) else {
            self.error(span, "slice: bounds overflow");
            return None;
        };
        let Some(len) = e.sub(&s).and_then(|l| l.to_dim()) else {
            self.error(
                span,
                format!("slice: the range {start}..{end} is empty or reversed"),
            );
            return None;
        };
        let mut shape = t.shape.clone();
        shape[axis] = len;
        let v = self.graph.add_node_unchecked(
            Op::Slice {
                axis,
                start: 0,
                end: 0,
            },
            vec![TensorType::new(t.dtype, shape)],
            &[x],
            Some(span),
        );
        Some(Val::Tensor(v[0]))
    }
}
