//! The reference interpreter: the executable meaning of the IR.
//!
//! **Architecture invariant:** this module is the oracle that the JIT and
//! autodiff are tested against, so it stays simple enough to trust by
//! reading: plain loops over row-major arrays, one function per op, no
//! caching, no vectorisation, never optimised.
//!
//! Values are stored as `f64` even in [`Precision::F32`] mode; there every op
//! rounds its float results through `f32` once at the end, so F32 mode has
//! exactly "f32 per op" semantics while the arithmetic *inside* an op (sums,
//! matmul accumulation) is done in `f64`. [`Precision::F64`] skips the
//! rounding, which makes finite-difference gradient checks meaningful.
//!
//! Every operand is shape-checked with the same rule the graph builder uses
//! ([`crate::ir::infer`]) before an op is evaluated, so a kernel never indexes
//! out of bounds, whatever a caller passes.

// Index loops are the point here: they read like the formulas they
// implement, with the same subscripts.
#![allow(clippy::needless_range_loop)]

mod conv;
mod elementwise;
mod layout;
mod linalg;
mod loss;
mod rnn;

use crate::ir::{fmt_shape, infer, Graph, Op, ShapeError, TensorType, Value};
use crate::tensor::{numel, DType, Data, Tensor};
use std::collections::{BTreeMap, HashMap};

/// How float values are rounded between ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Every op's float results are rounded to `f32` (what the JIT computes).
    F32,
    /// No rounding: `f64` throughout (for gradient checks).
    F64,
}

/// An array in the interpreter: f64 storage for float values (rounded
/// through f32 after every op when [`Precision::F32`], so F32 mode has
/// exactly f32-per-op semantics), i32 for integer values.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: ArrayData,
}

/// The elements of an [`Array`], row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum ArrayData {
    F(Vec<f64>),
    I(Vec<i32>),
}

impl Array {
    /// A float array; the caller keeps `data.len()` equal to the shape's size
    /// (an inconsistent array is reported by [`eval_op`], not a panic).
    pub fn f(shape: Vec<usize>, data: Vec<f64>) -> Array {
        Array {
            shape,
            data: ArrayData::F(data),
        }
    }

    /// An integer array.
    pub fn i(shape: Vec<usize>, data: Vec<i32>) -> Array {
        Array {
            shape,
            data: ArrayData::I(data),
        }
    }

    /// A float scalar (shape `[]`).
    pub fn scalar(v: f64) -> Array {
        Array::f(vec![], vec![v])
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            ArrayData::F(_) => DType::F32,
            ArrayData::I(_) => DType::I32,
        }
    }

    /// Number of stored elements.
    pub fn len(&self) -> usize {
        match &self.data {
            ArrayData::F(v) => v.len(),
            ArrayData::I(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_f(&self) -> Option<&[f64]> {
        match &self.data {
            ArrayData::F(v) => Some(v),
            ArrayData::I(_) => None,
        }
    }

    pub fn as_i(&self) -> Option<&[i32]> {
        match &self.data {
            ArrayData::I(v) => Some(v),
            ArrayData::F(_) => None,
        }
    }

    /// The IR type of this array (float data is `f32` in the IR).
    pub fn ty(&self) -> TensorType {
        TensorType::new(self.dtype(), self.shape.clone())
    }

    /// Float values rounded to `f32`; integer values unchanged.
    pub fn to_tensor(&self) -> Tensor {
        let data = match &self.data {
            ArrayData::F(v) => Data::F32(v.iter().map(|&x| x as f32).collect()),
            ArrayData::I(v) => Data::I32(v.clone()),
        };
        // Built field by field so that an inconsistent array cannot panic here.
        Tensor {
            shape: self.shape.clone(),
            data,
        }
    }
}

impl From<&Tensor> for Array {
    fn from(t: &Tensor) -> Array {
        let data = match &t.data {
            Data::F32(v) => ArrayData::F(v.iter().map(|&x| f64::from(x)).collect()),
            Data::I32(v) => ArrayData::I(v.clone()),
        };
        Array {
            shape: t.shape.clone(),
            data,
        }
    }
}

/// A run-time failure of the interpreter; each says in one sentence what is
/// wrong and where.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InterpError {
    #[error("missing value for {kind} '{name}'")]
    MissingFeed { kind: &'static str, name: String },
    #[error("{kind} '{name}' has shape {} but the model expects {}", fmt_shape(.got), fmt_shape(.want))]
    FeedShape {
        kind: &'static str,
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("{kind} '{name}' is {got} but the model expects {want}")]
    FeedDType {
        kind: &'static str,
        name: String,
        got: DType,
        want: DType,
    },
    #[error("{kind} '{name}' holds {len} values but its shape {} needs {}", fmt_shape(.shape), numel(.shape))]
    FeedData {
        kind: &'static str,
        name: String,
        len: usize,
        shape: Vec<usize>,
    },
    #[error("{op}: label {label} at index {index} is outside [0, {classes})")]
    LabelOutOfRange {
        op: &'static str,
        label: i32,
        index: usize,
        classes: usize,
    },
    #[error("{op}: id {id} at index {} is outside [0, {rows})", fmt_shape(.index))]
    IdOutOfRange {
        op: &'static str,
        id: i32,
        index: Vec<usize>,
        rows: usize,
    },
    #[error("{op}: operand {slot} holds {len} values but its shape {} needs {}", fmt_shape(.shape), numel(.shape))]
    OperandData {
        op: &'static str,
        slot: usize,
        len: usize,
        shape: Vec<usize>,
    },
    #[error("{op}: operand {slot} is {got} but {want} is expected")]
    OperandDType {
        op: &'static str,
        slot: usize,
        got: DType,
        want: DType,
    },
    /// The operands violate the op's shape rule (a malformed graph or call).
    #[error(transparent)]
    Shape(#[from] ShapeError),
    /// An attribute the shape rule does not check is out of range.
    #[error("{op}: {message}")]
    Attribute { op: &'static str, message: String },
    #[error("{op}: a leaf is fed by name, it cannot be evaluated as an op")]
    Leaf { op: &'static str },
    #[error("malformed graph: {0}")]
    Graph(String),
}

/// Run a graph: every Input/Param/State leaf is fed by name from `feeds`
/// (all must be present with the right dtype and shape); returns every graph
/// output ([`Graph::outputs`]) by name.
///
/// Every node is evaluated, used or not, so a leaf that no output needs must
/// still be fed. In [`Precision::F32`] fed float values are rounded to `f32`
/// on entry, like every op result.
pub fn run(
    g: &Graph,
    feeds: &BTreeMap<String, Array>,
    precision: Precision,
) -> Result<BTreeMap<String, Array>, InterpError> {
    let order = g.topo_order();
    if order.len() != g.graph.node_count() {
        return Err(InterpError::Graph("the graph has a cycle".into()));
    }
    let mut values: HashMap<Value, Array> = HashMap::new();
    for n in order {
        let node = g.node(n);
        let results = match &node.op {
            Op::Input { name } => vec![feed(feeds, "input", name, &node.outputs, precision)?],
            Op::Param { name, .. } => vec![feed(feeds, "param", name, &node.outputs, precision)?],
            Op::State { name } => vec![feed(feeds, "state", name, &node.outputs, precision)?],
            op => {
                let mut operands = Vec::new();
                for v in g.inputs(n) {
                    let a = values.get(&v).ok_or_else(|| {
                        InterpError::Graph(format!("{} reads {v}, which has no value", op.name()))
                    })?;
                    operands.push(a);
                }
                let results = eval_op(op, &operands, precision)?;
                let computed: Vec<TensorType> = results.iter().map(Array::ty).collect();
                if computed != node.outputs {
                    return Err(InterpError::Graph(format!(
                        "node %{} ({}) declares {} but computes {}",
                        n.index(),
                        op.name(),
                        fmt_types(&node.outputs),
                        fmt_types(&computed)
                    )));
                }
                results
            }
        };
        for (port, a) in results.into_iter().enumerate() {
            values.insert(
                Value {
                    node: n,
                    port: port as u16,
                },
                a,
            );
        }
    }
    let mut out = BTreeMap::new();
    for o in &g.outputs {
        let a = values.get(&o.value).ok_or_else(|| {
            InterpError::Graph(format!(
                "output '{}' refers to {}, which has no value",
                o.name, o.value
            ))
        })?;
        out.insert(o.name.clone(), a.clone());
    }
    Ok(out)
}

/// Convenience in f32: Tensor in, Tensor out.
pub fn run_f32(
    g: &Graph,
    feeds: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>, InterpError> {
    let feeds: BTreeMap<String, Array> = feeds
        .iter()
        .map(|(k, t)| (k.clone(), Array::from(t)))
        .collect();
    let out = run(g, &feeds, Precision::F32)?;
    Ok(out.into_iter().map(|(k, a)| (k, a.to_tensor())).collect())
}

fn fmt_types(ts: &[TensorType]) -> String {
    ts.iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The fed value of one leaf, checked against the leaf's declared type.
fn feed(
    feeds: &BTreeMap<String, Array>,
    kind: &'static str,
    name: &str,
    types: &[TensorType],
    precision: Precision,
) -> Result<Array, InterpError> {
    let want = types
        .first()
        .ok_or_else(|| InterpError::Graph(format!("{kind} '{name}' has no declared type")))?;
    let a = feeds.get(name).ok_or_else(|| InterpError::MissingFeed {
        kind,
        name: name.to_string(),
    })?;
    if a.dtype() != want.dtype {
        return Err(InterpError::FeedDType {
            kind,
            name: name.to_string(),
            got: a.dtype(),
            want: want.dtype,
        });
    }
    if a.shape != want.shape {
        return Err(InterpError::FeedShape {
            kind,
            name: name.to_string(),
            got: a.shape.clone(),
            want: want.shape.clone(),
        });
    }
    if a.len() != numel(&a.shape) {
        return Err(InterpError::FeedData {
            kind,
            name: name.to_string(),
            len: a.len(),
            shape: a.shape.clone(),
        });
    }
    Ok(round(a.clone(), precision))
}

/// The semantics of one op on concrete operands (used by [`run`], and by the
/// JIT as a fallback for ops it does not compile yet).
pub fn eval_op(
    op: &Op,
    inputs: &[&Array],
    precision: Precision,
) -> Result<Vec<Array>, InterpError> {
    let name = op.name();
    if matches!(op, Op::Input { .. } | Op::Param { .. } | Op::State { .. }) {
        return Err(InterpError::Leaf { op: name });
    }
    for (slot, a) in inputs.iter().enumerate() {
        if a.len() != numel(&a.shape) {
            return Err(InterpError::OperandData {
                op: name,
                slot,
                len: a.len(),
                shape: a.shape.clone(),
            });
        }
    }
    let types: Vec<TensorType> = inputs.iter().map(|a| a.ty()).collect();
    let type_refs: Vec<&TensorType> = types.iter().collect();
    let out_types = infer(op, &type_refs)?;
    let out_shape = out_types[0].shape.clone();
    let results = match op {
        Op::Input { .. } | Op::Param { .. } | Op::State { .. } => {
            return Err(InterpError::Leaf { op: name })
        }
        Op::Fill { value, .. } => {
            vec![Array::f(
                out_shape.clone(),
                vec![f64::from(*value); numel(&out_shape)],
            )]
        }
        Op::Unary(u) => vec![elementwise::unary(*u, inputs[0], name)?],
        Op::Binary(b) => vec![elementwise::binary(
            *b, inputs[0], inputs[1], &out_shape, name,
        )?],
        Op::Reduce {
            op: r,
            axes,
            keepdims,
        } => {
            vec![elementwise::reduce(
                *r, inputs[0], axes, *keepdims, &out_shape, name,
            )?]
        }
        Op::Softmax { axis } => vec![elementwise::softmax(inputs[0], *axis, false, name)?],
        Op::LogSoftmax { axis } => vec![elementwise::softmax(inputs[0], *axis, true, name)?],
        Op::MatMul => vec![linalg::matmul(inputs[0], inputs[1], &out_shape, name)?],
        Op::Transpose { perm } => vec![layout::transpose(inputs[0], perm, &out_shape)],
        Op::Reshape { .. } => vec![Array {
            shape: out_shape.clone(),
            data: inputs[0].data.clone(),
        }],
        Op::Expand { .. } => vec![layout::expand(inputs[0], &out_shape)],
        Op::Concat { axis } => vec![layout::concat(inputs, *axis, &out_shape, name)?],
        Op::Slice { axis, start, .. } => vec![layout::slice(inputs[0], *axis, *start, &out_shape)],
        Op::PadSlice { axis, start, .. } => {
            vec![layout::pad_slice(
                inputs[0], *axis, *start, &out_shape, name,
            )?]
        }
        Op::Conv(c) => vec![conv::conv(inputs[0], inputs[1], c, &out_shape, name)?],
        Op::ConvGradInput { conv: c, .. } => {
            vec![conv::conv_grad_input(
                inputs[0], inputs[1], c, &out_shape, name,
            )?]
        }
        Op::ConvGradFilter { conv: c, .. } => {
            vec![conv::conv_grad_filter(
                inputs[0], inputs[1], c, &out_shape, name,
            )?]
        }
        Op::MaxPool(p) => vec![conv::max_pool(inputs[0], p, &out_shape, name)?],
        Op::MaxPoolGrad(p) => vec![conv::max_pool_grad(inputs[0], inputs[1], p, name)?],
        Op::AvgPool(p) => vec![conv::avg_pool(inputs[0], p, &out_shape, name)?],
        Op::AvgPoolGrad { pool, .. } => {
            vec![conv::avg_pool_grad(inputs[0], pool, &out_shape, name)?]
        }
        Op::LstmSeq => vec![rnn::lstm_seq(inputs, name)?],
        Op::LstmSeqGrad => rnn::lstm_seq_grad(inputs, name)?,
        Op::GruSeq => vec![rnn::gru_seq(inputs, name)?],
        Op::GruSeqGrad => rnn::gru_seq_grad(inputs, name)?,
        Op::Attention { causal, scale } => {
            vec![linalg::attention(inputs, *causal, f64::from(*scale), name)?]
        }
        Op::AttentionGrad { causal, scale } => {
            linalg::attention_grad(inputs, *causal, f64::from(*scale), name)?
        }
        Op::Gather => vec![loss::gather(inputs[0], inputs[1], &out_shape, name)?],
        Op::ScatterAdd { rows } => vec![loss::scatter_add(inputs[0], inputs[1], *rows, name)?],
        Op::CrossEntropy => vec![loss::cross_entropy(inputs[0], inputs[1], name)?],
        Op::CrossEntropyGrad => {
            vec![loss::cross_entropy_grad(
                inputs[0], inputs[1], inputs[2], name,
            )?]
        }
        Op::Hinge => vec![loss::hinge(inputs[0], inputs[1], name)?],
        Op::HingeGrad => vec![loss::hinge_grad(inputs[0], inputs[1], inputs[2], name)?],
    };
    Ok(results.into_iter().map(|a| round(a, precision)).collect())
}

/// Apply the precision's rounding to a float array.
fn round(a: Array, precision: Precision) -> Array {
    match (precision, a.data) {
        (Precision::F32, ArrayData::F(v)) => {
            Array::f(a.shape, v.into_iter().map(|x| x as f32 as f64).collect())
        }
        (_, data) => Array {
            shape: a.shape,
            data,
        },
    }
}

// ---- helpers shared by the kernels ----

/// The float data of operand `slot`, or an error naming the op.
fn floats<'a>(op: &'static str, slot: usize, a: &'a Array) -> Result<&'a [f64], InterpError> {
    a.as_f().ok_or(InterpError::OperandDType {
        op,
        slot,
        got: a.dtype(),
        want: DType::F32,
    })
}

/// The integer data of operand `slot`, or an error naming the op.
fn ints<'a>(op: &'static str, slot: usize, a: &'a Array) -> Result<&'a [i32], InterpError> {
    a.as_i().ok_or(InterpError::OperandDType {
        op,
        slot,
        got: a.dtype(),
        want: DType::I32,
    })
}

/// The multi-index of flat position `flat` in a row-major array of `shape`.
fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        if shape[d] > 0 {
            idx[d] = flat % shape[d];
            flat /= shape[d];
        }
    }
    idx
}

/// The flat position of a multi-index in a row-major array of `shape`.
fn ravel(idx: &[usize], shape: &[usize]) -> usize {
    idx.iter().zip(shape).fold(0, |acc, (&i, &n)| acc * n + i)
}

/// The flat position in an operand of shape `in_shape` that NumPy
/// broadcasting reads for the output multi-index `out_idx` (shapes aligned
/// on the right; size-1 dims always read index 0).
/// Callers have shape-checked that the operand broadcasts to the output, so
/// its rank is at most the output's.
fn broadcast_source(out_idx: &[usize], in_shape: &[usize]) -> usize {
    let skip = out_idx.len().saturating_sub(in_shape.len());
    let idx: Vec<usize> = in_shape
        .iter()
        .enumerate()
        .map(|(d, &n)| {
            if n == 1 {
                0
            } else {
                out_idx.get(skip + d).copied().unwrap_or(0)
            }
        })
        .collect();
    ravel(&idx, in_shape)
}
