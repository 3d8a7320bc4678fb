//! The dataflow graph: a petgraph `StableGraph` of ops.
//!
//! Nodes may have several results (`lstm_seq_grad` yields four tensors); a
//! [`Value`] names one result of one node. Edges go from producer to consumer
//! and carry which operand slot they feed and which result port they read.

use super::dim::Dim;
use super::op::Op;
use super::shape::{infer, ShapeError};
use crate::tensor::DType;
use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::fmt;

/// A source location: byte range in a source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Span {
    /// Index of the file in the compilation's source map.
    pub file: u32,
    pub start: u32,
    pub end: u32,
}

/// The type of one IR value: dtype and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType<D = usize> {
    pub dtype: DType,
    pub shape: Vec<D>,
}

impl<D: Dim> TensorType<D> {
    pub fn new(dtype: DType, shape: Vec<D>) -> Self {
        TensorType { dtype, shape }
    }
    pub fn f32(shape: Vec<D>) -> Self {
        TensorType::new(DType::F32, shape)
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl<D: Dim> fmt::Display for TensorType<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, fmt_shape(&self.shape))
    }
}

/// `[2, 3, N]`
pub fn fmt_shape<D: fmt::Display>(shape: &[D]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// One op in the graph with the types of its results.
#[derive(Clone, Debug)]
pub struct Node<D = usize> {
    pub op: Op<D>,
    pub outputs: Vec<TensorType<D>>,
    /// Where in the source the op came from (absent for ops made by passes
    /// that have no single origin).
    pub span: Option<Span>,
}

/// One result of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value {
    pub node: NodeIndex,
    pub port: u16,
}

impl Value {
    pub fn new(node: NodeIndex) -> Value {
        Value { node, port: 0 }
    }
}

/// Edge weight: the consumer's operand slot and the producer's result port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Use {
    pub slot: u16,
    pub port: u16,
}

/// What a named graph output is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// A model `output`.
    Output,
    /// The model's `loss`.
    Loss,
    /// `grad.<param>` of the loss.
    Grad,
    /// The updated value of a parameter or state tensor after a training step.
    Update,
}

#[derive(Clone, Debug)]
pub struct GraphOutput {
    pub name: String,
    pub kind: OutputKind,
    pub value: Value,
}

/// A dataflow graph of primitive ops.
#[derive(Clone, Debug)]
pub struct Graph<D = usize> {
    pub graph: StableGraph<Node<D>, Use>,
    /// Named results, in declaration order.
    pub outputs: Vec<GraphOutput>,
}

impl<D: Dim> Default for Graph<D> {
    fn default() -> Self {
        Graph {
            graph: StableGraph::new(),
            outputs: Vec::new(),
        }
    }
}

impl<D: Dim> Graph<D> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add an op whose result types follow from its shape rule; returns all
    /// of its results.
    pub fn add_multi(
        &mut self,
        op: Op<D>,
        inputs: &[Value],
        span: Option<Span>,
    ) -> Result<Vec<Value>, ShapeError> {
        let types: Vec<&TensorType<D>> = inputs.iter().map(|v| self.ty(*v)).collect();
        let outputs = infer(&op, &types)?;
        Ok(self.add_node_unchecked(op, outputs, inputs, span))
    }

    /// Add a single-result op, inferring its type.
    pub fn add(
        &mut self,
        op: Op<D>,
        inputs: &[Value],
        span: Option<Span>,
    ) -> Result<Value, ShapeError> {
        let vals = self.add_multi(op, inputs, span)?;
        Ok(vals[0])
    }

    /// Add a node with given result types (for leaves and for passes that
    /// already know the types). The verifier re-checks them.
    pub fn add_node_unchecked(
        &mut self,
        op: Op<D>,
        outputs: Vec<TensorType<D>>,
        inputs: &[Value],
        span: Option<Span>,
    ) -> Vec<Value> {
        let n = outputs.len();
        let id = self.graph.add_node(Node { op, outputs, span });
        for (slot, v) in inputs.iter().enumerate() {
            self.graph.add_edge(
                v.node,
                id,
                Use {
                    slot: slot as u16,
                    port: v.port,
                },
            );
        }
        (0..n)
            .map(|p| Value {
                node: id,
                port: p as u16,
            })
            .collect()
    }

    /// Add a leaf (input, param, state, fill) with an explicit type.
    pub fn add_leaf(&mut self, op: Op<D>, ty: TensorType<D>, span: Option<Span>) -> Value {
        self.add_node_unchecked(op, vec![ty], &[], span)[0]
    }

    pub fn node(&self, n: NodeIndex) -> &Node<D> {
        &self.graph[n]
    }

    pub fn ty(&self, v: Value) -> &TensorType<D> {
        &self.graph[v.node].outputs[v.port as usize]
    }

    /// The operands of a node, in slot order.
    pub fn inputs(&self, n: NodeIndex) -> Vec<Value> {
        let mut uses: Vec<(u16, Value)> = self
            .graph
            .edges_directed(n, Direction::Incoming)
            .map(|e| {
                (
                    e.weight().slot,
                    Value {
                        node: e.source(),
                        port: e.weight().port,
                    },
                )
            })
            .collect();
        uses.sort_by_key(|(slot, _)| *slot);
        uses.into_iter().map(|(_, v)| v).collect()
    }

    /// Nodes that consume any result of `n`.
    pub fn users(&self, n: NodeIndex) -> Vec<NodeIndex> {
        let mut u: Vec<NodeIndex> = self
            .graph
            .neighbors_directed(n, Direction::Outgoing)
            .collect();
        u.sort();
        u.dedup();
        u
    }

    /// All nodes in a deterministic topological order (ties broken by
    /// node index, so the order is stable across runs).
    pub fn topo_order(&self) -> Vec<NodeIndex> {
        let mut indeg: std::collections::HashMap<NodeIndex, usize> = self
            .graph
            .node_indices()
            .map(|n| (n, self.graph.edges_directed(n, Direction::Incoming).count()))
            .collect();
        let mut ready: std::collections::BTreeSet<NodeIndex> = indeg
            .iter()
            .filter(|(_, d)| **d == 0)
            .map(|(n, _)| *n)
            .collect();
        let mut order = Vec::with_capacity(indeg.len());
        while let Some(n) = ready.pop_first() {
            order.push(n);
            for e in self.graph.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("edge to a known node");
                *d -= 1;
                if *d == 0 {
                    ready.insert(e.target());
                }
            }
        }
        order
    }

    /// Register a named graph result.
    pub fn push_output(&mut self, name: impl Into<String>, kind: OutputKind, value: Value) {
        self.outputs.push(GraphOutput {
            name: name.into(),
            kind,
            value,
        });
    }

    pub fn output(&self, name: &str) -> Option<&GraphOutput> {
        self.outputs.iter().find(|o| o.name == name)
    }

    /// Leaves of a kind, as `(name, value)` sorted by name.
    pub fn params(&self) -> Vec<(String, Value)> {
        self.leaves(|op| match op {
            Op::Param { name, .. } => Some(name.clone()),
            _ => None,
        })
    }

    pub fn inputs_by_name(&self) -> Vec<(String, Value)> {
        self.leaves(|op| match op {
            Op::Input { name } => Some(name.clone()),
            _ => None,
        })
    }

    pub fn states(&self) -> Vec<(String, Value)> {
        self.leaves(|op| match op {
            Op::State { name } => Some(name.clone()),
            _ => None,
        })
    }

    fn leaves(&self, pick: impl Fn(&Op<D>) -> Option<String>) -> Vec<(String, Value)> {
        let mut v: Vec<(String, Value)> = self
            .graph
            .node_indices()
            .filter_map(|n| pick(&self.graph[n].op).map(|name| (name, Value::new(n))))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Number of op nodes that are not leaves.
    pub fn op_count(&self) -> usize {
        self.graph
            .node_indices()
            .filter(|n| !self.graph[*n].op.is_leaf())
            .count()
    }
}
