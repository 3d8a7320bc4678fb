//! The intermediate representation: a dataflow graph of primitive ops with
//! concrete (or, while checking, symbolic) shapes.

pub mod cost;
pub mod dim;
pub mod graph;
pub mod op;
pub mod print;
pub mod shape;

pub use dim::Dim;
pub use graph::{fmt_shape, Graph, GraphOutput, Node, OutputKind, Span, TensorType, Use, Value};
pub use op::{BinaryOp, Conv2d, Init, Op, Pool2d, ReduceOp, UnaryOp};
pub use shape::{broadcast_shapes, infer, ShapeError};
