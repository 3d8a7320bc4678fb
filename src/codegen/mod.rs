//! The Cranelift JIT backend: every kernel of a graph becomes native code
//! specialised to its shapes.
//!
//! **Architecture invariants.** A kernel is a sequence of steps; each step is
//! one Cranelift function `fn(arena, ptrs, start, end) -> i64` over a range
//! of independent work units, so the runtime may split any step over
//! threads without changing a single bit of its result. JIT code never
//! allocates: intermediate buffers live at the [`MemoryPlan`]'s offsets in
//! the runtime's arena, fed tensors are read in place through the pointer
//! table. Ops without a compiled kernel run through the interpreter
//! ([`crate::interp::eval_op`]) and are counted by
//! [`JitModel::interpreted_kernels`].
//!
//! Today one kernel is one non-leaf node, in [`Graph::topo_order`]; fusion
//! will hand over groups through the same [`compile_with_plan`] seam.

pub mod attention;
pub mod conv;
pub mod emit;
pub mod kernel;
pub mod liveness;
pub mod lower;
pub mod math;
pub mod matmul;
pub mod peak;
pub mod plan;
pub mod reduce;
pub mod rnn;
pub mod rows;
pub mod transpose;
pub mod winograd;

pub use crate::runtime::{JitModel, RuntimeError};
pub use plan::MemoryPlan;

use crate::ir::{Graph, Op, TensorType, Value};
use crate::runtime::{Exec, ExecKernel, JitStep, StepCheck};
use cranelift_codegen::binemit::Reloc;
use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::Function;
use cranelift_codegen::isa::{CallConv, OwnedTargetIsa, TargetFrontendConfig, TargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::FunctionBuilderContext;
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module, ModuleReloc, ModuleRelocTarget};
use emit::{Addressing, Loc};
use kernel::Step;
use petgraph::stable_graph::NodeIndex;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Options of the JIT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JitOptions {
    /// Worker threads (including the calling one); at least 1.
    pub threads: usize,
}

impl Default for JitOptions {
    fn default() -> Self {
        JitOptions {
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

/// Why a graph could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    #[error("cannot set up the JIT for this machine: {0}")]
    Isa(String),
    #[error("Cranelift rejected the kernel of node %{node} ({op}): {message}")]
    Cranelift {
        node: usize,
        op: &'static str,
        message: String,
    },
    #[error("the graph has a cycle; kernels cannot be ordered")]
    Cycle,
    #[error("the memory plan is invalid: {0}")]
    Plan(String),
    #[error("output '{0}' refers to a value that is not in the graph")]
    BadOutput(String),
    #[error("the model's intermediate values need {}, more memory than the machine can give", crate::tensor::human_bytes(*.0 as u64))]
    Memory(usize),
}

/// How hard Cranelift optimises a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptLevel {
    /// Egraph optimisation (GVN, LICM, constant folding): for the kernels
    /// whose inner loops carry the run time.
    Speed,
    /// No optimisation passes: for the kernels whose loops are memory-bound
    /// and simple, where the optimiser costs compile time and buys nothing.
    Quick,
}

/// The host ISA with the flags our kernels rely on (FMA, SSE4.1 rounding),
/// optimising for speed.
pub fn host_isa() -> Result<OwnedTargetIsa, CodegenError> {
    host_isa_at(OptLevel::Speed)
}

/// The host ISA at an optimisation level.
pub fn host_isa_at(level: OptLevel) -> Result<OwnedTargetIsa, CodegenError> {
    let mut flags = settings::builder();
    let set = |f: &mut settings::Builder, k: &str, v: &str| {
        f.set(k, v)
            .map_err(|e| CodegenError::Isa(format!("setting {k}={v}: {e}")))
    };
    let opt = match level {
        OptLevel::Speed => "speed",
        OptLevel::Quick => "none",
    };
    set(&mut flags, "opt_level", opt)?;
    set(&mut flags, "is_pic", "false")?;
    // Our builders emit well-formed IR by construction and the test suite
    // runs every kernel template; verifying each function again at compile
    // time cost about a third of the JIT time.
    set(&mut flags, "enable_verifier", "false")?;
    let mut isa = cranelift_native::builder().map_err(|e| CodegenError::Isa(e.to_string()))?;
    #[cfg(target_arch = "x86_64")]
    {
        // Without `has_fma`, `fma` would become calls to `fmaf`.
        for (feature, present) in [
            ("has_sse41", std::is_x86_feature_detected!("sse4.1")),
            ("has_avx", std::is_x86_feature_detected!("avx")),
            ("has_avx2", std::is_x86_feature_detected!("avx2")),
            ("has_fma", std::is_x86_feature_detected!("fma")),
        ] {
            if present {
                isa.enable(feature)
                    .map_err(|e| CodegenError::Isa(format!("{feature}: {e}")))?;
            }
        }
    }
    isa.finish(settings::Flags::new(flags))
        .map_err(|e| CodegenError::Isa(e.to_string()))
}

/// One kernel before code generation.
enum Planned {
    Jit(Vec<Step>),
    Host,
}

struct Prepared {
    order: Vec<NodeIndex>,
    locs: HashMap<Value, Loc>,
    kernels: Vec<(NodeIndex, Planned)>,
    feeds: Vec<(String, &'static str, Value)>,
    plan: MemoryPlan,
}

fn leaf_kind(op: &Op) -> Option<(&'static str, &str)> {
    match op {
        Op::Input { name } => Some(("input", name)),
        Op::Param { name, .. } => Some(("param", name)),
        Op::State { name } => Some(("state", name)),
        _ => None,
    }
}

fn operands(g: &Graph, n: NodeIndex, locs: &HashMap<Value, Loc>) -> Vec<(Loc, TensorType)> {
    g.inputs(n)
        .into_iter()
        .map(|v| {
            (
                locs.get(&v).copied().unwrap_or(Loc::Arena(0)),
                g.ty(v).clone(),
            )
        })
        .collect()
}

fn results(g: &Graph, n: NodeIndex, locs: &HashMap<Value, Loc>) -> Vec<(Loc, TensorType)> {
    g.node(n)
        .outputs
        .iter()
        .enumerate()
        .map(|(p, t)| {
            let v = Value {
                node: n,
                port: p as u16,
            };
            (locs.get(&v).copied().unwrap_or(Loc::Arena(0)), t.clone())
        })
        .collect()
}

/// `(location, type)` pairs as the lowering functions take them.
fn refs(v: &[(Loc, TensorType)]) -> Vec<(Loc, &TensorType)> {
    v.iter().map(|(l, t)| (*l, t)).collect()
}

/// Elementwise ops fused into the op that consumes them: an elementwise
/// node whose result has exactly one reader, an elementwise op over the
/// same shape, and is no named output, is computed inside that reader's
/// loop. Maps each such node to the root of its chain (the node whose
/// kernel computes it). Chains stop at eight ops, which keeps a loop's
/// live vectors within the registers.
fn elementwise_chains(
    g: &Graph,
    order: &[NodeIndex],
    interpret: &[&str],
    in_rows: &std::collections::HashSet<NodeIndex>,
) -> HashMap<NodeIndex, NodeIndex> {
    const MAX_OPS: usize = 8;
    let fusable = |n: NodeIndex| {
        let node = g.node(n);
        matches!(node.op, Op::Unary(_) | Op::Binary(_))
            && node.outputs.len() == 1
            && node.outputs[0].dtype == crate::tensor::DType::F32
            && !interpret.contains(&node.op.name())
            && !in_rows.contains(&n)
    };
    let named: std::collections::HashSet<NodeIndex> =
        g.outputs.iter().map(|o| o.value.node).collect();
    let mut root: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    let mut size: HashMap<NodeIndex, usize> = HashMap::new();
    // Readers before producers, so each reader's chain is known.
    for &p in order.iter().rev() {
        if !fusable(p) || named.contains(&p) {
            continue;
        }
        let mut readers: Vec<NodeIndex> = g
            .graph
            .edges_directed(p, petgraph::Direction::Outgoing)
            .map(|e| petgraph::visit::EdgeRef::target(&e))
            .collect();
        readers.sort();
        readers.dedup();
        let [c] = readers[..] else {
            continue;
        };
        if !fusable(c) || g.node(c).outputs[0].shape != g.node(p).outputs[0].shape {
            continue;
        }
        let r = root.get(&c).copied().unwrap_or(c);
        let s = size.entry(r).or_insert(1);
        if *s < MAX_OPS {
            *s += 1;
            root.insert(p, r);
        }
    }
    root
}

/// The program of a chain's root and the values it reads, or `None` when
/// the node is no root. Merged members that are no elementwise op (a
/// matmul computed with the chain as its epilogue) are read as inputs.
fn chain_program(
    g: &Graph,
    root: NodeIndex,
    merged: &HashMap<NodeIndex, NodeIndex>,
) -> Option<(Vec<kernel::EwInstr>, Vec<Value>)> {
    if !merged.values().any(|r| *r == root) {
        return None;
    }
    program_of(g, root, merged)
}

/// The program of `root` and the chain merged into it (`root` alone when
/// nothing is), and the values it reads.
fn program_of(
    g: &Graph,
    root: NodeIndex,
    merged: &HashMap<NodeIndex, NodeIndex>,
) -> Option<(Vec<kernel::EwInstr>, Vec<Value>)> {
    use kernel::{EwArg, EwInstr, EwOp};
    struct Build<'a> {
        g: &'a Graph,
        root: NodeIndex,
        merged: &'a HashMap<NodeIndex, NodeIndex>,
        prog: Vec<EwInstr>,
        done: HashMap<NodeIndex, usize>,
        inputs: Vec<Value>,
    }
    impl Build<'_> {
        fn arg(&mut self, v: Value) -> Option<EwArg> {
            let elementwise = matches!(self.g.node(v.node).op, Op::Unary(_) | Op::Binary(_));
            if elementwise && self.merged.get(&v.node) == Some(&self.root) {
                return self.node(v.node).map(EwArg::Tmp);
            }
            let j = match self.inputs.iter().position(|x| *x == v) {
                Some(j) => j,
                None => {
                    self.inputs.push(v);
                    self.inputs.len() - 1
                }
            };
            Some(EwArg::In(j))
        }
        fn node(&mut self, n: NodeIndex) -> Option<usize> {
            if let Some(&t) = self.done.get(&n) {
                return Some(t);
            }
            let op = match self.g.node(n).op {
                Op::Unary(u) => EwOp::Unary(u),
                Op::Binary(b) => EwOp::Binary(b),
                _ => return None,
            };
            let args = self
                .g
                .inputs(n)
                .into_iter()
                .map(|v| self.arg(v))
                .collect::<Option<Vec<_>>>()?;
            self.prog.push(EwInstr { op, args });
            self.done.insert(n, self.prog.len() - 1);
            Some(self.prog.len() - 1)
        }
    }
    let mut b = Build {
        g,
        root,
        merged,
        prog: Vec::new(),
        done: HashMap::new(),
        inputs: Vec::new(),
    };
    b.node(root)?;
    Some((b.prog, b.inputs))
}

/// The fused loop of a chain's root over the values `inputs` it reads.
fn chain_step(
    g: &Graph,
    root: NodeIndex,
    prog: Vec<kernel::EwInstr>,
    inputs: &[Value],
    locs: &HashMap<Value, Loc>,
) -> Option<Step> {
    let ins: Vec<(Loc, TensorType)> = inputs
        .iter()
        .map(|v| {
            (
                locs.get(v).copied().unwrap_or(Loc::Arena(0)),
                g.ty(*v).clone(),
            )
        })
        .collect();
    let out = results(g, root, locs);
    let out = out.first()?;
    Some(lower::fused_elementwise(
        prog,
        &refs(&ins),
        &(out.0, &out.1),
    ))
}

/// Elementwise chains computed in a matmul's epilogue: a matmul result
/// with no other reader, no named output and k > 0, read by an elementwise
/// op of its shape, is computed by the kernel of that op's chain (a dense
/// layer's bias and activation, a weight gradient's optimizer update),
/// provided every other operand of the chain has C's shape, is a `[n]`
/// row or is a single value, and no other product is already computed
/// there. Maps each such matmul to the chain's root.
fn matmul_epilogues(
    g: &Graph,
    order: &[NodeIndex],
    chains: &HashMap<NodeIndex, NodeIndex>,
    interpret: &[&str],
    in_rows: &std::collections::HashSet<NodeIndex>,
) -> HashMap<NodeIndex, NodeIndex> {
    let named: std::collections::HashSet<NodeIndex> =
        g.outputs.iter().map(|o| o.value.node).collect();
    let mut out = HashMap::new();
    for &mm in order {
        if !matches!(g.node(mm).op, Op::MatMul) || named.contains(&mm) {
            continue;
        }
        let product = Value::new(mm);
        let shape = &g.ty(product).shape;
        let k = g
            .inputs(mm)
            .first()
            .and_then(|a| g.ty(*a).shape.last().copied());
        // The shapes `lower::matmul` lowers (its product then never falls
        // back to a kernel that would read the unwritten product).
        let matrices = shape.len() >= 2
            && g.inputs(mm).len() == 2
            && g.inputs(mm).iter().all(|v| g.ty(*v).shape.len() >= 2);
        if !(matrices && k.is_some_and(|k| k > 0)) {
            continue;
        }
        // One reader, counting each use (a reader of the product twice
        // keeps its own kernel).
        let readers: Vec<NodeIndex> = g
            .graph
            .edges_directed(mm, petgraph::Direction::Outgoing)
            .map(|e| petgraph::visit::EdgeRef::target(&e))
            .collect();
        let n = shape.last().copied().unwrap_or(1);
        let operand_ok = |s: &[usize]| s == shape || s == [n] || crate::tensor::numel(s) == 1;
        let chain = (product, &readers[..], chains);
        let Some(root) = epilogue_chain_root(g, chain, (interpret, in_rows), operand_ok) else {
            continue;
        };
        // One product per chain: a second (the sum of two matmuls, say)
        // keeps its own kernel and is read from its buffer.
        if !out.values().any(|r| *r == root) {
            out.insert(mm, root);
        }
    }
    out
}

/// The root of the elementwise chain that can run in the epilogue of
/// `product`'s kernel: `readers` (the product's) is one f32 elementwise op
/// of the product's shape, neither interpreted nor in a row group, and
/// every operand of its chain (`chains` maps members to roots) is a
/// member, the product, or of a shape `operand_ok` accepts.
fn epilogue_chain_root(
    g: &Graph,
    (product, readers, chains): (Value, &[NodeIndex], &HashMap<NodeIndex, NodeIndex>),
    (interpret, in_rows): (&[&str], &std::collections::HashSet<NodeIndex>),
    operand_ok: impl Fn(&[usize]) -> bool,
) -> Option<NodeIndex> {
    let [reader] = readers[..] else {
        return None;
    };
    let node = g.node(reader);
    let elementwise = matches!(node.op, Op::Unary(_) | Op::Binary(_))
        && node.outputs.len() == 1
        && node.outputs[0].dtype == crate::tensor::DType::F32
        && node.outputs[0].shape == g.ty(product).shape
        && !interpret.contains(&node.op.name())
        && !in_rows.contains(&reader);
    if !elementwise {
        return None;
    }
    let root = chains.get(&reader).copied().unwrap_or(reader);
    let members: Vec<NodeIndex> = std::iter::once(root)
        .chain(chains.iter().filter(|(_, r)| **r == root).map(|(m, _)| *m))
        .collect();
    let operands_fit = members.iter().all(|&m| {
        g.inputs(m)
            .iter()
            .all(|v| members.contains(&v.node) || *v == product || operand_ok(&g.ty(*v).shape))
    });
    operands_fit.then_some(root)
}

/// Whether `n`'s kernel can run an elementwise epilogue over its NCHW
/// result: a stride-1 convolution or its input gradient (the direct
/// kernel, on its register tiles), or a pooling op or pooling gradient
/// (on each finished plane).
fn nchw_epilogue_host(g: &Graph, n: NodeIndex, interpret: &[&str]) -> bool {
    let node = g.node(n);
    if interpret.contains(&node.op.name()) || node.outputs.len() != 1 {
        return false;
    }
    let y = &node.outputs[0].shape;
    match &node.op {
        Op::Conv(c) => match &g.inputs(n)[..] {
            [x, w] => lower::conv_runs_direct(c, &g.ty(*x).shape, &g.ty(*w).shape, y),
            _ => false,
        },
        Op::ConvGradInput { conv, .. } => match &g.inputs(n)[..] {
            [dy, w] => {
                lower::conv_grad_input_runs_direct(conv, &g.ty(*dy).shape, &g.ty(*w).shape, y)
            }
            _ => false,
        },
        Op::MaxPool(_) | Op::AvgPool(_) | Op::MaxPoolGrad(_) | Op::AvgPoolGrad { .. } => {
            y.len() == 4
        }
        _ => false,
    }
}

/// Elementwise chains computed in the epilogue of an NCHW kernel (see
/// `nchw_epilogue_host`), as `matmul_epilogues` does for matmuls: a
/// result with no other reader that is not a named output, read by an
/// elementwise op of its shape, is computed by the kernel of that op's
/// chain (a `conv2d` layer's bias and activation, a relu gradient's mask
/// on a max pool's gradient), provided every other operand of the chain
/// has the result's shape, is one value per channel (`[m, 1, 1]`,
/// `[1, m, 1, 1]`) or a single value, and no other product is computed
/// there already. Maps each such node to the chain's root.
fn nchw_epilogues(
    g: &Graph,
    order: &[NodeIndex],
    merged: &HashMap<NodeIndex, NodeIndex>,
    interpret: &[&str],
    in_rows: &std::collections::HashSet<NodeIndex>,
) -> HashMap<NodeIndex, NodeIndex> {
    let named: std::collections::HashSet<NodeIndex> =
        g.outputs.iter().map(|o| o.value.node).collect();
    let mut out = HashMap::new();
    for &host in order {
        if named.contains(&host) || !nchw_epilogue_host(g, host, interpret) {
            continue;
        }
        let product = Value::new(host);
        let shape = &g.ty(product).shape;
        // One reader (which may read the product more than once).
        let readers = g.users(host);
        let operand_ok = |s: &[usize]| nchw_epilogue_input(s, shape).is_some();
        let chain = (product, &readers[..], merged);
        let Some(root) = epilogue_chain_root(g, chain, (interpret, in_rows), operand_ok) else {
            continue;
        };
        // One product per chain (a matmul's, or another NCHW kernel's).
        let taken = out.values().any(|x| *x == root)
            || merged
                .iter()
                .any(|(m, x)| *x == root && matches!(g.node(*m).op, Op::MatMul));
        if !taken {
            out.insert(host, root);
        }
    }
    out
}

/// How an NCHW epilogue reads an operand of shape `s` against the
/// result's `y` `[n, m, oh, ow]`, up to its location.
fn nchw_epilogue_input(s: &[usize], y: &[usize]) -> Option<fn(Loc) -> conv::NchwInput> {
    use conv::NchwInput as In;
    let m = *y.get(1)?;
    if s == y {
        Some(In::Full)
    } else if crate::tensor::numel(s) == 1 {
        Some(In::Scalar)
    } else if s == [m, 1, 1] || s == [1, m, 1, 1] {
        Some(In::Channel)
    } else {
        None
    }
}

/// The kernel of a chain root whose chain reads the NCHW result `product`
/// merged into it (see `nchw_epilogues`): the direct convolution, the
/// Winograd output transform or the pooling kernel writing the root's
/// result, with the chain program over `inputs` as its epilogue.
fn lower_nchw_epilogue(
    g: &Graph,
    root: NodeIndex,
    (prog, inputs, product): (Vec<kernel::EwInstr>, &[Value], Value),
    locs: &HashMap<Value, Loc>,
    scratch: usize,
    split: bool,
) -> Option<lower::Lowered> {
    let outs = results(g, root, locs);
    let out = outs.first()?;
    let ins = inputs
        .iter()
        .map(|v| {
            if *v == product {
                return Some(conv::NchwInput::Product);
            }
            let loc = locs.get(v).copied().unwrap_or(Loc::Arena(0));
            nchw_epilogue_input(&g.ty(*v).shape, &out.1.shape).map(|f| f(loc))
        })
        .collect::<Option<Vec<_>>>()?;
    let host_ins = operands(g, product.node, locs);
    let op = &g.node(product.node).op;
    let mut l = lower::lower(op, &refs(&host_ins), &[(out.0, &out.1)], scratch, split)?;
    let epilogue = conv::NchwEpilogue { prog, ins };
    let mut found = false;
    for step in &mut l.steps {
        match step {
            Step::Im2col(conv::ConvStep::Direct(d)) => d.epilogue = Some(epilogue.clone()),
            Step::Im2col(conv::ConvStep::WinoOutput(d)) => d.epilogue = Some(epilogue.clone()),
            Step::Pool(p) => p.epilogue = Some(epilogue.clone()),
            _ => continue,
        }
        found = true;
    }
    // `nchw_epilogues` merges only nodes whose kernel has such a step.
    found.then_some(l)
}

/// Elementwise kernels computed after a matmul epilogue in the same
/// kernel: a chain (or op) of the epilogue's shape that reads the
/// epilogue's result, and otherwise only feeds or values of kernels that
/// run before the matmul, shaped like C, `[n]` or one value (an optimizer's
/// `w − lr·v` after its momentum `v = μ·v + g`). Maps each epilogue root
/// to its follower; at most one each.
fn epilogue_follows(
    g: &Graph,
    order: &[NodeIndex],
    sharing: &liveness::Sharing,
    interpret: &[&str],
    in_rows: &std::collections::HashSet<NodeIndex>,
) -> HashMap<NodeIndex, NodeIndex> {
    let pos: HashMap<NodeIndex, usize> = order.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    // The position of the kernel that writes `v` (feeds: before all).
    let written_at = |v: Value| -> Option<usize> {
        let owner = sharing.aliases.get(&v).copied().unwrap_or(v);
        if leaf_kind(&g.node(owner.node).op).is_some() {
            return Some(0);
        }
        if sharing.merged.contains_key(&owner.node) {
            return None; // never stored
        }
        let k = sharing
            .co_computed
            .get(&owner.node)
            .copied()
            .unwrap_or(owner.node);
        pos.get(&k).map(|p| p + 1)
    };
    let mut roots: Vec<NodeIndex> = sharing
        .merged
        .iter()
        .filter(|(m, _)| matches!(g.node(**m).op, Op::MatMul))
        .map(|(_, r)| *r)
        .collect();
    roots.sort_by_key(|r| pos.get(r).copied().unwrap_or(usize::MAX));
    let mut out = HashMap::new();
    let mut taken = std::collections::HashSet::new();
    for r in roots {
        let Some(&at) = pos.get(&r) else { continue };
        let shape = &g.ty(Value::new(r)).shape;
        let n = shape.last().copied().unwrap_or(1);
        // Each reader's chain root (the reader itself when unchained).
        let mut readers: Vec<NodeIndex> = g
            .users(r)
            .into_iter()
            .map(|u| sharing.merged.get(&u).copied().unwrap_or(u))
            .collect();
        readers.sort_by_key(|f| pos.get(f).copied().unwrap_or(usize::MAX));
        readers.dedup();
        for f in readers {
            let node = g.node(f);
            let fits = matches!(node.op, Op::Unary(_) | Op::Binary(_))
                && node.outputs.len() == 1
                && node.outputs[0].dtype == crate::tensor::DType::F32
                && node.outputs[0].shape == *shape
                && !interpret.contains(&node.op.name())
                && !in_rows.contains(&f)
                && !sharing.absorbed(f)
                && !taken.contains(&f)
                // Not a chain that computes a product of its own (a
                // matmul's, a convolution's or a pooling kernel's).
                && !sharing
                    .merged
                    .iter()
                    .any(|(m, rt)| *rt == f && !matches!(g.node(*m).op, Op::Unary(_) | Op::Binary(_)));
            if !fits {
                continue;
            }
            let Some((_, inputs)) = program_of(g, f, &sharing.merged) else {
                continue;
            };
            let reads_ok = inputs.iter().all(|v| {
                let s = &g.ty(*v).shape;
                *v == Value::new(r)
                    || ((s == shape || *s == [n] || crate::tensor::numel(s) == 1)
                        && written_at(*v).is_some_and(|w| w <= at))
            });
            if reads_ok && inputs.contains(&Value::new(r)) {
                out.insert(r, f);
                taken.insert(f);
                break;
            }
        }
    }
    out
}

/// The kernel of a chain root whose chain reads the matmul `product`
/// merged into it (see `matmul_epilogues`): the matmul writing the root's
/// result, with the chain program over `inputs` as its epilogue.
fn lower_matmul_epilogue(
    g: &Graph,
    root: NodeIndex,
    (prog, inputs, product): (Vec<kernel::EwInstr>, &[Value], Value),
    locs: &HashMap<Value, Loc>,
    scratch: usize,
    split: bool,
    sharing: &liveness::Sharing,
) -> Option<lower::Lowered> {
    use matmul::EpilogueInput;
    let outs = results(g, root, locs);
    let out = outs.first()?;
    let n = out.1.shape.last().copied().unwrap_or(1);
    // How a program reads `v`, where `product` is the value it gets from
    // the tile rather than from memory.
    let epilogue_input = |v: &Value, product: Value| {
        let loc = locs.get(v).copied().unwrap_or(Loc::Arena(0));
        let s = &g.ty(*v).shape;
        if *v == product {
            Some(EpilogueInput::Product)
        } else if *s == out.1.shape {
            Some(EpilogueInput::Full(loc))
        } else if *s == [n] {
            Some(EpilogueInput::Row(loc))
        } else if crate::tensor::numel(s) == 1 {
            Some(EpilogueInput::Scalar(loc))
        } else {
            None
        }
    };
    let ins = inputs
        .iter()
        .map(|v| epilogue_input(v, product))
        .collect::<Option<Vec<_>>>()?;
    let mm_ins = operands(g, product.node, locs);
    let mm_inputs = g.inputs(product.node);
    let flags = [0, 1].map(|i| {
        mm_inputs
            .get(i)
            .is_some_and(|v| sharing.transposed.contains(v))
    });
    let mut l = lower::matmul(&refs(&mm_ins), &(out.0, &out.1), scratch, split, flags)?;
    let then = match sharing.follows.get(&root) {
        Some(&f) => {
            let (prog, inputs) = program_of(g, f, &sharing.merged)?;
            let ins = inputs
                .iter()
                .map(|v| epilogue_input(v, Value::new(root)))
                .collect::<Option<Vec<_>>>()?;
            let out = locs.get(&Value::new(f)).copied().unwrap_or(Loc::Arena(0));
            Some(Box::new(matmul::Follow { prog, ins, out }))
        }
        None => None,
    };
    let epilogue = matmul::Epilogue { prog, ins, then };
    for step in &mut l.steps {
        match step {
            Step::Matmul(mm, _) => mm.epilogue = Some(epilogue.clone()),
            // k > 0 (checked by matmul_epilogues) leaves no other step.
            _ => return None,
        }
    }
    Some(l)
}

/// The steps of node `n`'s kernel: its op's lowering, or what `sharing`
/// makes of it (a fused elementwise chain, a loss with its gradient, a
/// recurrence that saves or reads saved activations, a matmul reading
/// absorbed transposes through swapped strides).
fn lower_kernel(
    g: &Graph,
    n: NodeIndex,
    locs: &HashMap<Value, Loc>,
    scratch: usize,
    split: bool,
    sharing: &liveness::Sharing,
    plan: Option<&MemoryPlan>,
) -> Option<lower::Lowered> {
    if let Some(group) = sharing.rows.get(&n) {
        return Some(lower::Lowered {
            steps: vec![Step::Rows(rows::program(g, group, locs)?)],
            scratch_bytes: 0,
        });
    }
    if let Some((prog, inputs)) = chain_program(g, n, &sharing.merged) {
        let product = inputs
            .iter()
            .find(|v| sharing.merged.get(&v.node) == Some(&n));
        if let Some(&product) = product {
            if !matches!(g.node(product.node).op, Op::MatMul) {
                return lower_nchw_epilogue(g, n, (prog, &inputs, product), locs, scratch, split);
            }
            return lower_matmul_epilogue(
                g,
                n,
                (prog, &inputs, product),
                locs,
                scratch,
                split,
                sharing,
            );
        }
        return Some(lower::Lowered {
            steps: vec![chain_step(g, n, prog, &inputs, locs)?],
            scratch_bytes: 0,
        });
    }
    let (ins, outs) = (operands(g, n, locs), results(g, n, locs));
    let (ins_ref, outs_ref) = (refs(&ins), refs(&outs));
    let op = &g.node(n).op;
    let inputs = g.inputs(n);
    let transposed = |i: usize| {
        inputs
            .get(i)
            .is_some_and(|v| sharing.transposed.contains(v))
    };
    let lstm = matches!(op, Op::LstmSeq | Op::LstmSeqGrad);
    let saved_at =
        |fwd: NodeIndex| Loc::Arena(plan.and_then(|p| p.saved.get(&fwd)).copied().unwrap_or(0));
    let loss = sharing.co_computed.iter().find(|(_, r)| **r == n);
    let fwd = sharing.saved.iter().find(|(_, (grad, _))| *grad == n);
    match op {
        Op::CrossEntropyGrad if loss.is_some() => {
            let loss = results(g, *loss?.0, locs);
            lower::cross_entropy_with_loss(&ins_ref, outs_ref.first()?.0, loss.first()?.0, scratch)
        }
        Op::LstmSeq | Op::GruSeq if sharing.saved.contains_key(&n) => {
            rnn::lower_forward(lstm, &ins_ref, &outs_ref, scratch, split, Some(saved_at(n)))
        }
        Op::LstmSeqGrad | Op::GruSeqGrad if fwd.is_some() => {
            let fwd = *fwd?.0;
            let hs = locs.get(&Value::new(fwd)).copied().unwrap_or(Loc::Arena(0));
            let saved = Some((hs, saved_at(fwd)));
            // dx (result 0) is read by nothing when x is a model input.
            let dx = Value::new(n);
            let want_dx = g.outputs.iter().any(|o| o.value == dx)
                || g.graph
                    .edges_directed(n, petgraph::Direction::Outgoing)
                    .any(|e| e.weight().port == 0);
            rnn::lower_grad_for(lstm, &ins_ref, &outs_ref, scratch, split, saved, want_dx)
        }
        Op::MatMul if transposed(0) || transposed(1) => {
            let flags = [transposed(0), transposed(1)];
            lower::matmul(&ins_ref, outs_ref.first()?, scratch, split, flags)
        }
        _ => lower::lower(op, &ins_ref, &outs_ref, scratch, split),
    }
}

/// Transposes of the last two axes whose every reader is a matmul, which
/// can read the source through swapped strides instead (its packing pass
/// reads strided operands anyway): transpose value → source value.
fn transposes_into_matmuls(g: &Graph, order: &[NodeIndex]) -> Vec<(Value, Value)> {
    let named: std::collections::HashSet<Value> = g.outputs.iter().map(|o| o.value).collect();
    let mut out = Vec::new();
    for &n in order {
        let Op::Transpose { perm } = &g.node(n).op else {
            continue;
        };
        let r = perm.len();
        let swaps_last_two = r >= 2
            && perm[..r - 2].iter().enumerate().all(|(i, &p)| p == i)
            && perm[r - 2] == r - 1
            && perm[r - 1] == r - 2;
        let t = Value::new(n);
        let only_matmuls = g
            .graph
            .edges_directed(n, petgraph::Direction::Outgoing)
            .all(|e| matches!(g.node(petgraph::visit::EdgeRef::target(&e)).op, Op::MatMul));
        if swaps_last_two && only_matmuls && !named.contains(&t) {
            if let Some(&src) = g.inputs(n).first() {
                out.push((t, src));
            }
        }
    }
    out
}

/// LSTM/GRU forward nodes whose gradient node (same `x`, weights and
/// bias) runs later in the same graph, a training step: the forward
/// kernel saves its activations for the gradient, which then skips running
/// the forward again. Maps forward → (gradient, saved bytes).
fn recurrences_with_gradients(
    g: &Graph,
    order: &[NodeIndex],
    interpret: &[&str],
) -> HashMap<NodeIndex, (NodeIndex, usize)> {
    let position: HashMap<NodeIndex, usize> =
        order.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut out = HashMap::new();
    for &fwd in order {
        let lstm = match g.node(fwd).op {
            Op::LstmSeq => true,
            Op::GruSeq => false,
            _ => continue,
        };
        let grad_op = if lstm {
            Op::LstmSeqGrad
        } else {
            Op::GruSeqGrad
        };
        if interpret.contains(&g.node(fwd).op.name()) || interpret.contains(&grad_op.name()) {
            continue;
        }
        let fins = g.inputs(fwd);
        let grad = order.iter().copied().find(|&n| {
            g.node(n).op == grad_op
                && position[&n] > position[&fwd]
                && fins.len() >= 4
                && g.inputs(n).get(..4) == fins.get(..4)
                && !out.values().any(|(gr, _): &(NodeIndex, usize)| *gr == n)
        });
        let Some(grad) = grad else {
            continue;
        };
        let types: Vec<(Loc, &TensorType)> =
            fins.iter().map(|v| (Loc::Arena(0), g.ty(*v))).collect();
        if let Some(bytes) = rnn::saved_bytes(lstm, &types) {
            out.insert(fwd, (grad, bytes));
        }
    }
    out
}

/// Cross-entropy losses whose gradient node reads the same logits and
/// labels, mapped to that gradient node: its kernel computes the row
/// softmax once for both. Only where every reader of the loss runs after
/// the gradient (true of a training step, whose loss is an output).
fn losses_with_gradients(g: &Graph, order: &[NodeIndex]) -> HashMap<NodeIndex, NodeIndex> {
    let position: HashMap<NodeIndex, usize> =
        order.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut out = HashMap::new();
    for &grad in order {
        if !matches!(g.node(grad).op, Op::CrossEntropyGrad) {
            continue;
        }
        let gins = g.inputs(grad);
        let loss = order.iter().copied().find(|&l| {
            matches!(g.node(l).op, Op::CrossEntropy)
                && !out.contains_key(&l)
                && g.inputs(l).get(..2) == gins.get(..2)
        });
        let Some(loss) = loss else {
            continue;
        };
        let readers_after = g
            .graph
            .edges_directed(loss, petgraph::Direction::Outgoing)
            .all(|e| position[&petgraph::visit::EdgeRef::target(&e)] > position[&grad]);
        if readers_after {
            out.insert(loss, grad);
        }
    }
    out
}

/// Reshapes whose result can share its operand's buffer (every arena
/// buffer is contiguous, so a reshape changes nothing in memory), mapped to
/// the computed value that owns the bytes. A reshape of a fed tensor stays
/// a copy: feeds are read in place from the caller's memory, which the
/// runtime does not hand out as a result.
fn reshape_aliases(g: &Graph, order: &[NodeIndex]) -> HashMap<Value, Value> {
    let mut aliases: HashMap<Value, Value> = HashMap::new();
    for &n in order {
        if !matches!(g.node(n).op, Op::Reshape { .. }) {
            continue;
        }
        let Some(&src) = g.inputs(n).first() else {
            continue;
        };
        let owner = aliases.get(&src).copied().unwrap_or(src);
        if leaf_kind(&g.node(owner.node).op).is_none() {
            aliases.insert(Value::new(n), owner);
        }
    }
    aliases
}

fn prepare(
    g: &Graph,
    plan: Option<MemoryPlan>,
    interpret: &[&str],
    split: bool,
) -> Result<Prepared, CodegenError> {
    let order = g.topo_order();
    if order.len() != g.graph.node_count() {
        return Err(CodegenError::Cycle);
    }
    for o in &g.outputs {
        let ok = g
            .graph
            .node_weight(o.value.node)
            .is_some_and(|nd| (o.value.port as usize) < nd.outputs.len());
        if !ok {
            return Err(CodegenError::BadOutput(o.name.clone()));
        }
    }
    let mut feeds = Vec::new();
    for &n in &order {
        if let Some((kind, name)) = leaf_kind(&g.node(n).op) {
            feeds.push((name.to_string(), kind, Value::new(n)));
        }
    }
    feeds.sort_by(|a, b| (a.0.as_str(), a.1).cmp(&(b.0.as_str(), b.1)));
    // When codegen plans the arena itself (a given plan has a buffer for
    // every value and a kernel for every node): reshapes are views of
    // their operand's bytes, elementwise chains one loop, a cross-entropy
    // loss is computed with its gradient.
    let mut sharing = liveness::Sharing::default();
    if plan.is_none() {
        if !interpret.contains(&"reshape") {
            sharing.aliases = reshape_aliases(g, &order);
        }
        if !interpret.contains(&"transpose") && !interpret.contains(&"matmul") {
            for (t, src) in transposes_into_matmuls(g, &order) {
                let owner = sharing.aliases.get(&src).copied().unwrap_or(src);
                sharing.aliases.insert(t, owner);
                sharing.transposed.insert(t);
            }
        }
        let groups = rows::row_groups(g, &order, interpret);
        let in_rows: std::collections::HashSet<NodeIndex> = groups
            .iter()
            .flat_map(|gr| gr.members.iter().copied())
            .collect();
        sharing.merged = elementwise_chains(g, &order, interpret, &in_rows);
        if !interpret.contains(&"matmul") {
            let epilogues = matmul_epilogues(g, &order, &sharing.merged, interpret, &in_rows);
            sharing.merged.extend(epilogues);
        }
        let epilogues = nchw_epilogues(g, &order, &sharing.merged, interpret, &in_rows);
        sharing.merged.extend(epilogues);
        if !interpret.contains(&"cross_entropy") && !interpret.contains(&"cross_entropy_grad") {
            sharing.co_computed = losses_with_gradients(g, &order);
        }
        sharing.saved = recurrences_with_gradients(g, &order, interpret);
        // A row group's root computes every member: those read outside
        // the group are written there too, the others have no buffer.
        let named: std::collections::HashSet<Value> = g.outputs.iter().map(|o| o.value).collect();
        for gr in groups {
            let root = gr.root();
            for &m in &gr.members[..gr.members.len() - 1] {
                let escapes = named.contains(&Value::new(m))
                    || g.users(m).iter().any(|u| !gr.members.contains(u));
                if escapes {
                    sharing.co_computed.insert(m, root);
                } else {
                    sharing.merged.insert(m, root);
                }
            }
            sharing.rows.insert(root, gr);
        }
        // Last: a follower moves to its matmul's kernel, earlier than its
        // own place, so it may only read values whose writers (row roots
        // included) run before that kernel.
        if !interpret.contains(&"matmul") {
            sharing.follows = epilogue_follows(g, &order, &sharing, interpret, &in_rows);
            for (r, f) in &sharing.follows {
                sharing.co_computed.insert(*f, *r);
            }
        }
    }
    // Scratch sizes come from a trial lowering; they do not depend on where
    // buffers are.
    let empty = HashMap::new();
    let mut scratch_bytes: HashMap<NodeIndex, usize> = HashMap::new();
    for &n in &order {
        if leaf_kind(&g.node(n).op).is_none() {
            if let Some(l) = lower_kernel(g, n, &empty, 0, split, &sharing, None) {
                scratch_bytes.insert(n, l.scratch_bytes);
            }
        }
    }
    let plan = match plan {
        Some(p) => {
            p.check(g, &scratch_bytes).map_err(CodegenError::Plan)?;
            p
        }
        None => {
            let kernels: Vec<NodeIndex> = order
                .iter()
                .copied()
                .filter(|&n| leaf_kind(&g.node(n).op).is_none())
                .filter(|&n| !sharing.absorbed(n))
                .collect();
            liveness::plan(g, &kernels, &scratch_bytes, &sharing)
        }
    };
    let mut locs: HashMap<Value, Loc> = plan
        .values
        .iter()
        .map(|(v, o)| (*v, Loc::Arena(*o)))
        .collect();
    for (slot, (_, _, v)) in feeds.iter().enumerate() {
        locs.insert(*v, Loc::Extern(slot));
    }
    for (v, owner) in &sharing.aliases {
        if let Some(&l) = locs.get(owner) {
            locs.insert(*v, l);
        }
    }
    let mut kernels = Vec::new();
    for &n in &order {
        if leaf_kind(&g.node(n).op).is_some() || sharing.absorbed(n) {
            continue;
        }
        let scratch = plan.scratch.get(&n).copied().unwrap_or(0);
        let forced = interpret.contains(&g.node(n).op.name());
        let lowered = lower_kernel(g, n, &locs, scratch, split, &sharing, Some(&plan));
        let k = match lowered {
            Some(l) if !forced => Planned::Jit(l.steps),
            _ => Planned::Host,
        };
        kernels.push((n, k));
    }
    Ok(Prepared {
        order,
        locs,
        kernels,
        feeds,
        plan,
    })
}

/// Compile a graph with the default memory plan.
pub fn compile(g: &Graph, opts: &JitOptions) -> Result<JitModel, CodegenError> {
    compile_with_plan(g, None, opts)
}

/// Compile a graph with a given memory plan (checked), or the default one.
pub fn compile_with_plan(
    g: &Graph,
    plan: Option<MemoryPlan>,
    opts: &JitOptions,
) -> Result<JitModel, CodegenError> {
    compile_inner(g, plan, opts, &[])
}

/// Compile, but run the ops named in `interpret` (e.g. `"conv"`) through
/// the interpreter: to bisect a suspected kernel bug, and to test the
/// fallback path.
pub fn compile_interpreting(
    g: &Graph,
    opts: &JitOptions,
    interpret: &[&str],
) -> Result<JitModel, CodegenError> {
    compile_inner(g, None, opts, interpret)
}

fn compile_inner(
    g: &Graph,
    plan: Option<MemoryPlan>,
    opts: &JitOptions,
    interpret: &[&str],
) -> Result<JitModel, CodegenError> {
    let p = prepare(g, plan, interpret, opts.threads > 1)?;
    let isa = host_isa_at(OptLevel::Speed)?;
    let quick = host_isa_at(OptLevel::Quick)?;
    let config = isa.frontend_config();
    let mut module = JITModule::new(JITBuilder::with_isa(
        isa,
        cranelift_module::default_libcall_names(),
    ));
    let sig = emit::kernel_signature(config.default_call_conv);
    let mut jobs: Vec<Job> = Vec::new();
    let mut execs: Vec<ExecKernel> = Vec::new();
    for (n, k) in &p.kernels {
        let node = g.node(*n);
        let exec = match k {
            Planned::Host => Exec::Host {
                op: node.op.clone(),
                ins: operands(g, *n, &p.locs),
                outs: results(g, *n, &p.locs),
            },
            Planned::Jit(steps) => {
                let mut js = Vec::new();
                for step in steps {
                    jobs.push(Job {
                        node: *n,
                        op: &node.op,
                        step,
                    });
                    js.push(JitStep {
                        func: None,
                        units: step.units(),
                        grain: step.grain(),
                        check: step_check(g, *n, step),
                    });
                }
                Exec::Jit(js)
            }
        };
        // An elementwise chain computed in its matmul's epilogue.
        let epilogue = matches!(k, Planned::Jit(steps)
            if steps.iter().any(|s| matches!(s, Step::Matmul(m, _) if m.epilogue.is_some())));
        // Or in its convolution's or pooling kernel's.
        let conv_epilogue = matches!(k, Planned::Jit(steps)
            if steps.iter().any(|s| matches!(s,
                Step::Im2col(conv::ConvStep::Direct(d)) if d.epilogue.is_some())
                || matches!(s, Step::Im2col(conv::ConvStep::WinoOutput(d)) if d.epilogue.is_some())));
        let pool_epilogue = matches!(k, Planned::Jit(steps)
            if steps.iter().any(|s| matches!(s, Step::Pool(p) if p.epilogue.is_some())));
        let row_program = matches!(k, Planned::Jit(steps)
            if steps.iter().any(|s| matches!(s, Step::Rows(_))));
        execs.push(ExecKernel {
            node: n.index(),
            op: if epilogue {
                "matmul+epilogue"
            } else if conv_epilogue {
                "conv+epilogue"
            } else if pool_epilogue {
                "pool+epilogue"
            } else if row_program {
                "rows"
            } else {
                node.op.name()
            },
            exec,
        });
    }
    let addressing = table_addressing(config.default_call_conv);
    let isas = Isas {
        speed: module.isa(),
        quick: &*quick,
        config,
        addressing,
    };
    let built = build_and_compile(&isas, &jobs, opts.threads)?;
    // A job compiled here or the same function as an earlier one: functions
    // are declared and defined in order of their first job, so the code
    // layout does not depend on which worker compiled what.
    let mut root: Vec<usize> = (0..jobs.len()).collect();
    let mut tables: Vec<Vec<i64>> = Vec::with_capacity(jobs.len());
    let mut codes: Vec<Option<Machine>> = Vec::with_capacity(jobs.len());
    for (j, b) in built.into_iter().enumerate() {
        match b {
            Built::Code(m, t) => {
                codes.push(Some(m));
                tables.push(t);
            }
            Built::Same(c, t) => {
                root[j] = c;
                codes.push(None);
                tables.push(t);
            }
        }
    }
    let mut first_of: HashMap<usize, usize> = HashMap::new();
    for (j, &r) in root.iter().enumerate() {
        first_of.entry(r).or_insert(j);
    }
    let mut roots: Vec<usize> = first_of.keys().copied().collect();
    roots.sort_by_key(|r| first_of[r]);
    let body_sig = emit::signature_for(config.default_call_conv, addressing);
    let mut bodies: HashMap<usize, FuncId> = HashMap::new();
    for (index, &r) in roots.iter().enumerate() {
        let job = &jobs[r];
        let id = module
            .declare_function(&format!("k{index}"), Linkage::Local, &body_sig)
            .map_err(|e| cranelift_err(job.node, job.op, e.to_string()))?;
        let Some(mut code) = codes[r].take() else {
            return Err(cranelift_err(
                job.node,
                job.op,
                "a deduplicated kernel has no machine code".into(),
            ));
        };
        for reloc in &mut code.relocs {
            if let ModuleRelocTarget::FunctionOffset(_, off) = reloc.name {
                reloc.name = ModuleRelocTarget::FunctionOffset(id, off);
            }
        }
        module
            .define_function_bytes(id, code.alignment, &code.bytes, &code.relocs)
            .map_err(|e| cranelift_err(job.node, job.op, format!("{e:?}")))?;
        bodies.insert(r, id);
    }
    // What the runtime calls for each job: the body itself, or a thunk that
    // hands the body this job's operand table.
    let mut entries: Vec<FuncId> = Vec::with_capacity(jobs.len());
    for (j, job) in jobs.iter().enumerate() {
        let body = bodies[&root[j]];
        let id = match addressing {
            Addressing::Baked => body,
            Addressing::Table => {
                let id = module
                    .declare_anonymous_function(&sig)
                    .map_err(|e| cranelift_err(job.node, job.op, e.to_string()))?;
                let (bytes, relocs) = thunk(body, &tables[j]);
                module
                    .define_function_bytes(id, 16, &bytes, &relocs)
                    .map_err(|e| cranelift_err(job.node, job.op, format!("{e:?}")))?;
                id
            }
        };
        entries.push(id);
    }
    module
        .finalize_definitions()
        .map_err(|e| CodegenError::Isa(format!("finalizing kernels: {e}")))?;
    let mut j = 0;
    for e in &mut execs {
        if let Exec::Jit(steps) = &mut e.exec {
            for s in steps {
                let ptr = module.get_finalized_function(entries[j]);
                s.func = Some(ptr as usize);
                j += 1;
            }
        }
    }
    let feeds = p
        .feeds
        .iter()
        .map(|(name, kind, v)| (name.clone(), *kind, g.ty(*v).clone()))
        .collect();
    let outputs = g
        .outputs
        .iter()
        .map(|o| {
            (
                o.name.clone(),
                p.locs.get(&o.value).copied().unwrap_or(Loc::Arena(0)),
                g.ty(o.value).clone(),
            )
        })
        .collect();
    let _ = &p.order;
    JitModel::new(module, execs, feeds, outputs, p.plan.size, opts.threads)
        .ok_or(CodegenError::Memory(p.plan.size))
}

/// One kernel step awaiting machine code, in execution order.
struct Job<'g> {
    node: NodeIndex,
    op: &'g Op,
    step: &'g Step,
}

/// What became of a [`Job`]; each with the job's operand table when
/// kernels are built with [`Addressing::Table`].
enum Built {
    /// Its function, compiled.
    Code(Machine, Vec<i64>),
    /// Its function is identical to that of this earlier-claimed job.
    Same(usize, Vec<i64>),
}

/// The machine code of one function.
struct Machine {
    bytes: Vec<u8>,
    alignment: u64,
    relocs: Vec<ModuleReloc>,
}

/// The two optimisation levels kernels are compiled at, and how they
/// address their operands.
struct Isas<'a> {
    speed: &'a dyn TargetIsa,
    quick: &'a dyn TargetIsa,
    config: TargetFrontendConfig,
    addressing: Addressing,
}

impl Isas<'_> {
    fn for_step(&self, step: &Step) -> &dyn TargetIsa {
        match opt_level(step) {
            OptLevel::Speed => self.speed,
            OptLevel::Quick => self.quick,
        }
    }
}

/// How a step is compiled. Steps whose loops only move data or do one
/// cheap operation per element (copies, fills, packing, pooling, plain
/// elementwise arithmetic, reductions) are memory-bound, and measured no
/// slower without the optimiser, which roughly halves their compile time.
/// (Cranelift's single-pass register allocator, tried for the pure data
/// movers, spilled their loop values to the stack in every iteration:
/// transposes, gathers and packing ran 20–30% slower with it.) Everything
/// else, including any step kind added later, is optimised.
fn opt_level(step: &Step) -> OptLevel {
    use conv::ConvStep;
    use kernel::MatmulPhase;
    match step {
        // Data movement and memory-bound loops.
        Step::Fill(_)
        | Step::Copy(_)
        | Step::Gather(_)
        | Step::ScatterAdd(_)
        | Step::Matmul(_, MatmulPhase::PackA | MatmulPhase::PackB)
        | Step::Im2col(ConvStep::Im2col(_) | ConvStep::Pad(_) | ConvStep::PackW(_))
        | Step::Reduce(_)
        | Step::Pool(_)
        | Step::Col2im(_) => OptLevel::Quick,
        // The micro-kernels' steps are emitted in the order that keeps their
        // accumulators in place (see `matmul::micro_kernel`).
        Step::Matmul(_, MatmulPhase::Compute)
        | Step::Im2col(ConvStep::Direct(_) | ConvStep::GradFilter(_)) => OptLevel::Quick,
        // Their exps are interleaved across vectors, an order Cranelift's
        // optimiser would undo (it places each chain just before its use).
        Step::Elementwise(_) | Step::Softmax(_) | Step::CrossEntropy(_) | Step::Attention(_) => {
            OptLevel::Quick
        }
        Step::Rnn(_) => OptLevel::Quick, // its tiles keep accumulators in place (rnn::chunk)
        // The optimiser would move each row's statistics (a horizontal sum,
        // a square root, their splats) from before a pass into its loop.
        Step::Rows(_) => OptLevel::Quick,
        _ => OptLevel::Speed,
    }
}

/// Whether kernels take their operand table as a fifth argument: where a
/// hand-written thunk can pass it (x86-64 System V, where it goes in `r8`).
fn table_addressing(call_conv: CallConv) -> Addressing {
    if cfg!(target_arch = "x86_64") && call_conv == CallConv::SystemV {
        Addressing::Table
    } else {
        Addressing::Baked
    }
}

/// The machine code of a thunk that calls `body` with `table` as its fifth
/// argument: `lea r8, [rip + table]; movabs rax, body; jmp rax`, the table
/// following the code. The jump keeps the caller's stack and return
/// address, so the body returns straight to the runtime; `rax` is free at
/// a call boundary.
fn thunk(body: FuncId, table: &[i64]) -> (Vec<u8>, Vec<ModuleReloc>) {
    const TABLE_AT: usize = 24;
    let mut code = Vec::with_capacity(TABLE_AT + 8 * table.len());
    // lea r8, [rip + disp32]; rip is the end of this 7-byte instruction.
    code.extend_from_slice(&[0x4c, 0x8d, 0x05]);
    code.extend_from_slice(&((TABLE_AT - 7) as i32).to_le_bytes());
    // movabs rax, imm64 (the body's address, by relocation).
    code.extend_from_slice(&[0x48, 0xb8]);
    let imm_at = code.len();
    code.extend_from_slice(&[0; 8]);
    // jmp rax
    code.extend_from_slice(&[0xff, 0xe0]);
    code.resize(TABLE_AT, 0xcc);
    for v in table {
        code.extend_from_slice(&v.to_le_bytes());
    }
    let reloc = ModuleReloc {
        offset: imm_at as u32,
        kind: Reloc::Abs8,
        name: ModuleRelocTarget::from(body),
        addend: 0,
    };
    (code, vec![reloc])
}

fn compile_function(
    isa: &dyn TargetIsa,
    ctx: &mut Context,
    job: &Job,
    func: Function,
) -> Result<Machine, CodegenError> {
    ctx.clear();
    ctx.func = func;
    let code = ctx
        .compile(isa, &mut ControlPlane::default())
        .map_err(|e| cranelift_err(job.node, job.op, format!("{:?}", e.inner)))?;
    let bytes = code.code_buffer().to_vec();
    let alignment = code.buffer.alignment as u64;
    let raw = code.buffer.relocs().to_vec();
    // The function's own id is not known yet; the caller fills it in.
    let relocs = raw
        .iter()
        .map(|r| ModuleReloc::from_mach_reloc(r, &ctx.func, FuncId::from_u32(0)))
        .collect();
    Ok(Machine {
        bytes,
        alignment,
        relocs,
    })
}

/// Build every job's function and compile each distinct one, on up to
/// `threads` workers taking jobs in turn. A function identical to one
/// already claimed (the unrolled recurrences repeat the same step many
/// times) is compiled once: Cranelift's output depends only on the function
/// and the ISA, so the machine code is the same whichever worker compiles
/// it and however the jobs are split.
fn build_and_compile(
    isas: &Isas,
    jobs: &[Job],
    threads: usize,
) -> Result<Vec<Built>, CodegenError> {
    type Seen = HashMap<u64, Vec<(usize, Function)>>;
    // Longest first, so that no worker starts a slow kernel near the end
    // while the others sit idle: the recurrence and attention kernels take
    // the longest to compile, then the other optimised ones.
    let mut queue: Vec<usize> = (0..jobs.len()).collect();
    queue.sort_by_key(|&j| {
        let step = jobs[j].step;
        let weight = match step {
            Step::Rnn(_) | Step::Attention(_) => 0,
            _ if opt_level(step) == OptLevel::Speed => 1,
            _ => 2,
        };
        (weight, j)
    });
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let seen: Mutex<Seen> = Mutex::new(HashMap::new());
    let work = || -> Result<Vec<(usize, Built)>, CodegenError> {
        let mut ctx = Context::new();
        let mut fctx = FunctionBuilderContext::new();
        let mut out = Vec::new();
        loop {
            let q = next.fetch_add(1, Ordering::Relaxed);
            if q >= queue.len() || failed.load(Ordering::Relaxed) {
                return Ok(out);
            }
            let j = queue[q];
            let job = &jobs[j];
            let (func, operands) =
                emit::build_kernel_in(&mut fctx, isas.config, 0, isas.addressing, |kb| {
                    job.step.emit(kb)
                });
            let table: Vec<i64> = operands.into_iter().map(emit::table_entry).collect();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            func.stencil.hash(&mut h);
            let same = {
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                let bucket = seen.entry(h.finish()).or_default();
                match bucket.iter().find(|(_, f)| *f == func) {
                    Some((c, _)) => Some(*c),
                    None => {
                        bucket.push((j, func.clone()));
                        None
                    }
                }
            };
            let b = match same {
                Some(c) => Built::Same(c, table),
                None => {
                    let isa = isas.for_step(job.step);
                    match compile_function(isa, &mut ctx, job, func) {
                        Ok(m) => Built::Code(m, table),
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                }
            };
            out.push((j, b));
        }
    };
    let workers = threads.clamp(1, jobs.len().max(1));
    let parts: Vec<Result<Vec<(usize, Built)>, CodegenError>> = if workers == 1 {
        vec![work()]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers).map(|_| s.spawn(work)).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(CodegenError::Isa(
                            "a compiler worker thread panicked".into(),
                        ))
                    })
                })
                .collect()
        })
    };
    let mut slots: Vec<Option<Built>> = (0..jobs.len()).map(|_| None).collect();
    for part in parts {
        for (j, b) in part? {
            slots[j] = Some(b);
        }
    }
    slots
        .into_iter()
        .map(|b| b.ok_or_else(|| CodegenError::Isa("a kernel was not compiled".into())))
        .collect()
}

fn cranelift_err(n: NodeIndex, op: &Op, message: String) -> CodegenError {
    CodegenError::Cranelift {
        node: n.index(),
        op: op.name(),
        message,
    }
}

fn build_step(config: TargetFrontendConfig, index: u32, step: &Step) -> Function {
    emit::build_kernel(config, index, |kb| step.emit(kb))
}

/// How a non-zero kernel result is turned into an error.
fn step_check(g: &Graph, n: NodeIndex, step: &Step) -> StepCheck {
    let ins = g.inputs(n);
    let op = g.node(n).op.name();
    match step {
        Step::Gather(s) => StepCheck::Id {
            op,
            ids: s.ids,
            shape: g.ty(ins[1]).shape.clone(),
            rows: s.rows,
        },
        Step::ScatterAdd(s) => StepCheck::Id {
            op,
            ids: s.ids,
            shape: g.ty(ins[0]).shape.clone(),
            rows: s.rows,
        },
        Step::CrossEntropy(c) => StepCheck::Label {
            op,
            labels: c.labels,
            classes: c.c,
        },
        Step::Hinge(h) => StepCheck::Label {
            op,
            labels: h.labels,
            classes: h.c,
        },
        _ => StepCheck::None,
    }
}

/// The Cranelift IR of every kernel function, as compiled with `opts`
/// (the thread count decides how some matmuls are split), for
/// `--emit clif`; nodes run by the interpreter are listed as comments.
pub fn emit_clif(g: &Graph, opts: &JitOptions) -> String {
    let p = match prepare(g, None, &[], opts.threads > 1) {
        Ok(p) => p,
        Err(e) => return format!("; error: {e}\n"),
    };
    let config = match host_isa() {
        Ok(isa) => isa.frontend_config(),
        Err(e) => return format!("; error: {e}\n"),
    };
    let mut out = String::new();
    let mut index = 0u32;
    for (n, k) in &p.kernels {
        let op = &g.node(*n).op;
        match k {
            Planned::Host => out.push_str(&format!("; %{} {op}: interpreted\n\n", n.index())),
            Planned::Jit(steps) => {
                for (si, step) in steps.iter().enumerate() {
                    out.push_str(&format!("; %{} {op}, step {si}\n", n.index()));
                    let f = build_step(config, index, step);
                    out.push_str(&f.display().to_string());
                    out.push('\n');
                    index += 1;
                }
            }
        }
    }
    out
}

/// The machine code of every kernel function as compiled with `opts`,
/// disassembled by Cranelift, for `--emit asm`.
pub fn emit_asm(g: &Graph, opts: &JitOptions) -> Result<String, CodegenError> {
    let p = prepare(g, None, &[], opts.threads > 1)?;
    let speed = host_isa_at(OptLevel::Speed)?;
    let quick = host_isa_at(OptLevel::Quick)?;
    let config = speed.frontend_config();
    let isas = Isas {
        speed: &*speed,
        quick: &*quick,
        config,
        addressing: Addressing::Baked,
    };
    let mut ctx = cranelift_codegen::Context::new();
    ctx.set_disasm(true);
    let mut out = String::new();
    let mut index = 0u32;
    for (n, k) in &p.kernels {
        let op = &g.node(*n).op;
        match k {
            Planned::Host => out.push_str(&format!("; %{} {op}: interpreted\n\n", n.index())),
            Planned::Jit(steps) => {
                for (si, step) in steps.iter().enumerate() {
                    ctx.clear();
                    ctx.set_disasm(true);
                    ctx.func = build_step(config, index, step);
                    let mut ctrl = cranelift_codegen::control::ControlPlane::default();
                    let code = ctx
                        .compile(isas.for_step(step), &mut ctrl)
                        .map_err(|e| cranelift_err(*n, op, format!("{:?}", e.inner)))?;
                    out.push_str(&format!("; %{} {op}, step {si}\n", n.index()));
                    out.push_str(code.vcode.as_deref().unwrap_or(""));
                    out.push('\n');
                    index += 1;
                }
            }
        }
    }
    Ok(out)
}
