//! The primitive operations of the IR (LANGUAGE.md §6) and the helper ops
//! that autodiff emits for backward passes.
//!
//! Everything the language offers lowers to these; std.dl layers and sugar
//! (`flatten`, `last`, `global_avg_pool`, `mse`) are compositions of them.
//! Axes stored in ops are always normalised (non-negative, in range).

use super::dim::Dim;
use std::fmt;

/// Parameter initialisers (LANGUAGE.md §7).
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Normal { std: f32 },
    Uniform { lo: f32, hi: f32 },
    GlorotUniform,
    HeNormal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Relu,
    Sigmoid,
    Tanh,
    Exp,
    Log,
    Sqrt,
    Abs,
    Neg,
    /// `1` where `x > 0`, else `0` — the derivative of relu (relu'(0) = 0).
    Step,
    /// `-1, 0, 1` by the sign of `x` — the derivative of abs (abs'(0) = 0).
    Sign,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
    /// `1.0` where `a > b`, else `0.0` (f32 mask; used by gradients).
    Greater,
    /// `1.0` where `a == b`, else `0.0` (f32 mask; used by gradients).
    Equal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

/// Spatial attributes shared by conv and its gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2d {
    pub stride: usize,
    pub dilation: usize,
    /// Padding as `[top, left, bottom, right]`; `"same"` with an odd total
    /// puts the extra row/column at the bottom/right.
    pub pad: [usize; 4],
}

/// Window attributes of max/avg pooling (square windows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pool2d {
    pub window: usize,
    pub stride: usize,
    pub pad: usize,
}

/// An IR operation. `D` is the dimension type: `usize` in compiled graphs,
/// a symbolic expression while `dlc check` runs without bound sizes.
#[derive(Clone, Debug, PartialEq)]
pub enum Op<D = usize> {
    // ---- leaves ----
    /// A runtime input, fed by name.
    Input {
        name: String,
    },
    /// A trainable parameter, fed by name (or initialised with `init`).
    Param {
        name: String,
        init: Init,
    },
    /// A state tensor of the training step (optimizer moments, step count),
    /// fed by name like a parameter and saved with it; initialised to zeros.
    State {
        name: String,
    },
    /// A constant f32 tensor filled with one value.
    Fill {
        value: f32,
        shape: Vec<D>,
    },

    // ---- elementwise ----
    Unary(UnaryOp),
    /// NumPy broadcasting of the two operands.
    Binary(BinaryOp),

    // ---- reductions and normalisations ----
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
        keepdims: bool,
    },
    Softmax {
        axis: usize,
    },
    LogSoftmax {
        axis: usize,
    },

    // ---- linear algebra ----
    /// `[..., M, K] @ [..., K, N]`, both rank >= 2, batch dims broadcast.
    /// (1-D operands are reshaped by the front end, as NumPy does.)
    MatMul,

    // ---- layout ----
    Transpose {
        perm: Vec<usize>,
    },
    Reshape {
        shape: Vec<D>,
    },
    /// Broadcast the operand (NumPy rules) to `shape`.
    Expand {
        shape: Vec<D>,
    },
    Concat {
        axis: usize,
    },
    /// Half-open `[start, end)` along `axis`, already clamped.
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// Zero tensor of the input's source shape with the operand written at
    /// `[start, start + len)` along `axis` — the gradient of `Slice`.
    PadSlice {
        axis: usize,
        start: usize,
        full: D,
    },

    // ---- convolution and pooling (NCHW) ----
    /// `conv(x [N,C,H,W], w [O,C,KH,KW])`, cross-correlation.
    Conv(Conv2d),
    /// `dx` from `(dy, w)`; `input_hw` is the forward input's `[H, W]`.
    ConvGradInput {
        conv: Conv2d,
        input_hw: [D; 2],
    },
    /// `dw` from `(x, dy)`; `kernel_hw` is the forward filter's `[KH, KW]`.
    ConvGradFilter {
        conv: Conv2d,
        kernel_hw: [D; 2],
    },
    MaxPool(Pool2d),
    /// `dx` from `(x, dy)`: each window's gradient to its first maximum.
    MaxPoolGrad(Pool2d),
    AvgPool(Pool2d),
    /// `dx` from `(dy)`; padding cells are not counted.
    AvgPoolGrad {
        pool: Pool2d,
        input_hw: [D; 2],
    },

    // ---- sequence ops ----
    /// `(x [N,T,F], w_x [F,4H], w_h [H,4H], b [4H]) -> h [N,T,H]`.
    LstmSeq,
    /// `(x, w_x, w_h, b, dh [N,T,H]) -> (dx, dw_x, dw_h, db)`, BPTT.
    LstmSeqGrad,
    /// `(x [N,T,F], w_x [F,3H], w_h [H,3H], b [3H]) -> h [N,T,H]`.
    GruSeq,
    /// `(x, w_x, w_h, b, dh) -> (dx, dw_x, dw_h, db)`, BPTT.
    GruSeqGrad,
    /// `softmax(q kᵀ · scale [+ causal mask]) v`.
    Attention {
        causal: bool,
        scale: f32,
    },
    /// `(q, k, v, dy) -> (dq, dk, dv)`.
    AttentionGrad {
        causal: bool,
        scale: f32,
    },

    // ---- embeddings ----
    /// `(table [V, D], ids i32[...]) -> [..., D]`.
    Gather,
    /// `(ids i32[...], dy [..., D]) -> [rows, D]`: the gradient of `Gather`,
    /// repeated ids add up.
    ScatterAdd {
        rows: D,
    },

    // ---- losses (scalar results) ----
    /// `(logits [N, C], labels i32[N]) -> []`.
    CrossEntropy,
    /// `(logits, labels, dloss []) -> dlogits [N, C]`.
    CrossEntropyGrad,
    /// `(scores [N, C], labels i32[N]) -> []`, multi-class hinge.
    Hinge,
    /// `(scores, labels, dloss []) -> dscores [N, C]`.
    HingeGrad,
}

impl<D: Dim> Op<D> {
    /// Short lower-case name used in the printer and in error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::State { .. } => "state",
            Op::Fill { .. } => "fill",
            Op::Unary(u) => match u {
                UnaryOp::Relu => "relu",
                UnaryOp::Sigmoid => "sigmoid",
                UnaryOp::Tanh => "tanh",
                UnaryOp::Exp => "exp",
                UnaryOp::Log => "log",
                UnaryOp::Sqrt => "sqrt",
                UnaryOp::Abs => "abs",
                UnaryOp::Neg => "neg",
                UnaryOp::Step => "step",
                UnaryOp::Sign => "sign",
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => "add",
                BinaryOp::Sub => "sub",
                BinaryOp::Mul => "mul",
                BinaryOp::Div => "div",
                BinaryOp::Maximum => "maximum",
                BinaryOp::Minimum => "minimum",
                BinaryOp::Greater => "greater",
                BinaryOp::Equal => "equal",
            },
            Op::Reduce { op, .. } => match op {
                ReduceOp::Sum => "sum",
                ReduceOp::Mean => "mean",
                ReduceOp::Max => "max",
            },
            Op::Softmax { .. } => "softmax",
            Op::LogSoftmax { .. } => "log_softmax",
            Op::MatMul => "matmul",
            Op::Transpose { .. } => "transpose",
            Op::Reshape { .. } => "reshape",
            Op::Expand { .. } => "expand",
            Op::Concat { .. } => "concat",
            Op::Slice { .. } => "slice",
            Op::PadSlice { .. } => "pad_slice",
            Op::Conv(_) => "conv",
            Op::ConvGradInput { .. } => "conv_grad_input",
            Op::ConvGradFilter { .. } => "conv_grad_filter",
            Op::MaxPool(_) => "max_pool2d",
            Op::MaxPoolGrad(_) => "max_pool2d_grad",
            Op::AvgPool(_) => "avg_pool2d",
            Op::AvgPoolGrad { .. } => "avg_pool2d_grad",
            Op::LstmSeq => "lstm_seq",
            Op::LstmSeqGrad => "lstm_seq_grad",
            Op::GruSeq => "gru_seq",
            Op::GruSeqGrad => "gru_seq_grad",
            Op::Attention { .. } => "attention",
            Op::AttentionGrad { .. } => "attention_grad",
            Op::Gather => "gather",
            Op::ScatterAdd { .. } => "scatter_add",
            Op::CrossEntropy => "cross_entropy",
            Op::CrossEntropyGrad => "cross_entropy_grad",
            Op::Hinge => "hinge",
            Op::HingeGrad => "hinge_grad",
        }
    }

    /// True for ops with no operands whose value is supplied from outside.
    pub fn is_leaf(&self) -> bool {
        matches!(
            self,
            Op::Input { .. } | Op::Param { .. } | Op::State { .. } | Op::Fill { .. }
        )
    }

    /// Map the dimension type (used to make a symbolic op concrete).
    pub fn map_dims<E: Dim>(&self, f: &mut impl FnMut(&D) -> E) -> Op<E> {
        match self {
            Op::Input { name } => Op::Input { name: name.clone() },
            Op::Param { name, init } => Op::Param {
                name: name.clone(),
                init: init.clone(),
            },
            Op::State { name } => Op::State { name: name.clone() },
            Op::Fill { value, shape } => Op::Fill {
                value: *value,
                shape: shape.iter().map(&mut *f).collect(),
            },
            Op::Unary(u) => Op::Unary(*u),
            Op::Binary(b) => Op::Binary(*b),
            Op::Reduce { op, axes, keepdims } => Op::Reduce {
                op: *op,
                axes: axes.clone(),
                keepdims: *keepdims,
            },
            Op::Softmax { axis } => Op::Softmax { axis: *axis },
            Op::LogSoftmax { axis } => Op::LogSoftmax { axis: *axis },
            Op::MatMul => Op::MatMul,
            Op::Transpose { perm } => Op::Transpose { perm: perm.clone() },
            Op::Reshape { shape } => Op::Reshape {
                shape: shape.iter().map(&mut *f).collect(),
            },
            Op::Expand { shape } => Op::Expand {
                shape: shape.iter().map(&mut *f).collect(),
            },
            Op::Concat { axis } => Op::Concat { axis: *axis },
            Op::Slice { axis, start, end } => Op::Slice {
                axis: *axis,
                start: *start,
                end: *end,
            },
            Op::PadSlice { axis, start, full } => Op::PadSlice {
                axis: *axis,
                start: *start,
                full: f(full),
            },
            Op::Conv(c) => Op::Conv(*c),
            Op::ConvGradInput { conv, input_hw } => Op::ConvGradInput {
                conv: *conv,
                input_hw: [f(&input_hw[0]), f(&input_hw[1])],
            },
            Op::ConvGradFilter { conv, kernel_hw } => Op::ConvGradFilter {
                conv: *conv,
                kernel_hw: [f(&kernel_hw[0]), f(&kernel_hw[1])],
            },
            Op::MaxPool(p) => Op::MaxPool(*p),
            Op::MaxPoolGrad(p) => Op::MaxPoolGrad(*p),
            Op::AvgPool(p) => Op::AvgPool(*p),
            Op::AvgPoolGrad { pool, input_hw } => Op::AvgPoolGrad {
                pool: *pool,
                input_hw: [f(&input_hw[0]), f(&input_hw[1])],
            },
            Op::LstmSeq => Op::LstmSeq,
            Op::LstmSeqGrad => Op::LstmSeqGrad,
            Op::GruSeq => Op::GruSeq,
            Op::GruSeqGrad => Op::GruSeqGrad,
            Op::Attention { causal, scale } => Op::Attention {
                causal: *causal,
                scale: *scale,
            },
            Op::AttentionGrad { causal, scale } => Op::AttentionGrad {
                causal: *causal,
                scale: *scale,
            },
            Op::Gather => Op::Gather,
            Op::ScatterAdd { rows } => Op::ScatterAdd { rows: f(rows) },
            Op::CrossEntropy => Op::CrossEntropy,
            Op::CrossEntropyGrad => Op::CrossEntropyGrad,
            Op::Hinge => Op::Hinge,
            Op::HingeGrad => Op::HingeGrad,
        }
    }
}

impl<D: Dim> fmt::Display for Op<D> {
    /// The op with its attributes, as the IR printer shows it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims = |v: &[D]| {
            v.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Op::Input { name } => write!(f, "input \"{name}\""),
            Op::Param { name, init } => write!(f, "param \"{name}\" init={init:?}"),
            Op::State { name } => write!(f, "state \"{name}\""),
            Op::Fill { value, shape } => write!(f, "fill {value:?} [{}]", dims(shape)),
            Op::Reduce { axes, keepdims, .. } => {
                write!(f, "{} axes={axes:?} keepdims={keepdims}", self.name())
            }
            Op::Softmax { axis } | Op::LogSoftmax { axis } => {
                write!(f, "{} axis={axis}", self.name())
            }
            Op::Transpose { perm } => write!(f, "transpose perm={perm:?}"),
            Op::Reshape { shape } => write!(f, "reshape [{}]", dims(shape)),
            Op::Expand { shape } => write!(f, "expand [{}]", dims(shape)),
            Op::Concat { axis } => write!(f, "concat axis={axis}"),
            Op::Slice { axis, start, end } => {
                write!(f, "slice axis={axis} start={start} end={end}")
            }
            Op::PadSlice { axis, start, full } => {
                write!(f, "pad_slice axis={axis} start={start} full={full}")
            }
            Op::Conv(c) => write!(f, "conv {}", fmt_conv(c)),
            Op::ConvGradInput { conv, input_hw } => write!(
                f,
                "conv_grad_input {} input_hw=[{}, {}]",
                fmt_conv(conv),
                input_hw[0],
                input_hw[1]
            ),
            Op::ConvGradFilter { conv, kernel_hw } => write!(
                f,
                "conv_grad_filter {} kernel_hw=[{}, {}]",
                fmt_conv(conv),
                kernel_hw[0],
                kernel_hw[1]
            ),
            Op::MaxPool(p) | Op::MaxPoolGrad(p) | Op::AvgPool(p) => {
                write!(f, "{} {}", self.name(), fmt_pool(p))
            }
            Op::AvgPoolGrad { pool, input_hw } => write!(
                f,
                "avg_pool2d_grad {} input_hw=[{}, {}]",
                fmt_pool(pool),
                input_hw[0],
                input_hw[1]
            ),
            Op::Attention { causal, scale } | Op::AttentionGrad { causal, scale } => {
                write!(f, "{} causal={causal} scale={scale:?}", self.name())
            }
            Op::ScatterAdd { rows } => write!(f, "scatter_add rows={rows}"),
            _ => f.write_str(self.name()),
        }
    }
}

fn fmt_conv(c: &Conv2d) -> String {
    format!(
        "stride={} dilation={} pad=[{}, {}, {}, {}]",
        c.stride, c.dilation, c.pad[0], c.pad[1], c.pad[2], c.pad[3]
    )
}

fn fmt_pool(p: &Pool2d) -> String {
    format!("window={} stride={} pad={}", p.window, p.stride, p.pad)
}
