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
pub mod lower;
pub mod math;
pub mod matmul;
pub mod plan;
pub mod reduce;
pub mod rnn;

pub use crate::runtime::{JitModel, RuntimeError};
pub use plan::MemoryPlan;

use crate::ir::{Graph, Op, TensorType, Value};
use crate::runtime::{Exec, ExecKernel, JitStep, StepCheck};
use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::{Function, UserFuncName};
use cranelift_codegen::isa::{OwnedTargetIsa, TargetFrontendConfig, TargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module, ModuleReloc};
use emit::Loc;
use kernel::Step;
use petgraph::stable_graph::NodeIndex;
use std::collections::HashMap;

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
}

/// The host ISA with the flags our kernels rely on (FMA, SSE4.1 rounding).
pub fn host_isa() -> Result<OwnedTargetIsa, CodegenError> {
    let mut flags = settings::builder();
    let set = |f: &mut settings::Builder, k: &str, v: &str| {
        f.set(k, v)
            .map_err(|e| CodegenError::Isa(format!("setting {k}={v}: {e}")))
    };
    set(&mut flags, "opt_level", "speed")?;
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

fn lower_node(
    g: &Graph,
    n: NodeIndex,
    locs: &HashMap<Value, Loc>,
    scratch: usize,
) -> Option<lower::Lowered> {
    let ins = operands(g, n, locs);
    let outs = results(g, n, locs);
    let ins_ref: Vec<(Loc, &TensorType)> = ins.iter().map(|(l, t)| (*l, t)).collect();
    let outs_ref: Vec<(Loc, &TensorType)> = outs.iter().map(|(l, t)| (*l, t)).collect();
    lower::lower(&g.node(n).op, &ins_ref, &outs_ref, scratch)
}

fn prepare(
    g: &Graph,
    plan: Option<MemoryPlan>,
    interpret: &[&str],
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
    // Scratch sizes come from a trial lowering; they do not depend on where
    // buffers are.
    let empty = HashMap::new();
    let mut scratch_bytes = HashMap::new();
    for &n in &order {
        if leaf_kind(&g.node(n).op).is_none() {
            if let Some(l) = lower_node(g, n, &empty, 0) {
                scratch_bytes.insert(n, l.scratch_bytes);
            }
        }
    }
    let plan = match plan {
        Some(p) => {
            p.check(g, &scratch_bytes).map_err(CodegenError::Plan)?;
            p
        }
        None => MemoryPlan::naive(g, &scratch_bytes),
    };
    let mut locs: HashMap<Value, Loc> = plan
        .values
        .iter()
        .map(|(v, o)| (*v, Loc::Arena(*o)))
        .collect();
    for (slot, (_, _, v)) in feeds.iter().enumerate() {
        locs.insert(*v, Loc::Extern(slot));
    }
    let mut kernels = Vec::new();
    for &n in &order {
        if leaf_kind(&g.node(n).op).is_some() {
            continue;
        }
        let scratch = plan.scratch.get(&n).copied().unwrap_or(0);
        let forced = interpret.contains(&g.node(n).op.name());
        let k = match lower_node(g, n, &locs, scratch) {
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
    let p = prepare(g, plan, interpret)?;
    let isa = host_isa()?;
    let config = isa.frontend_config();
    let call_conv = config.default_call_conv;
    let mut module = JITModule::new(JITBuilder::with_isa(
        isa,
        cranelift_module::default_libcall_names(),
    ));
    let sig = emit::kernel_signature(call_conv);
    let mut pending: Vec<(usize, usize, cranelift_module::FuncId)> = Vec::new();
    let mut execs: Vec<ExecKernel> = Vec::new();
    let mut fn_index = 0u32;
    let mut compiled: HashMap<String, cranelift_module::FuncId> = HashMap::new();
    let mut to_compile: Vec<Unit> = Vec::new();
    let mut funcs: Vec<Function> = Vec::new();
    for (ki, (n, k)) in p.kernels.iter().enumerate() {
        let node = g.node(*n);
        let exec = match k {
            Planned::Host => Exec::Host {
                op: node.op.clone(),
                ins: operands(g, *n, &p.locs),
                outs: results(g, *n, &p.locs),
            },
            Planned::Jit(steps) => {
                let mut js = Vec::new();
                for (si, step) in steps.iter().enumerate() {
                    // Steps are built under one name so that identical
                    // bodies print identically: the unrolled recurrent
                    // time loop repeats the same function many times, and
                    // identical IR compiles to identical machine code.
                    let mut func = build_step(config, 0, step);
                    let key = func.display().to_string();
                    let id = match compiled.get(&key) {
                        Some(&id) => id,
                        None => {
                            let id = module
                                .declare_function(&format!("k{fn_index}"), Linkage::Local, &sig)
                                .map_err(|e| cranelift_err(*n, &node.op, e.to_string()))?;
                            func.name = UserFuncName::user(0, fn_index);
                            compiled.insert(key, id);
                            to_compile.push(Unit {
                                node: *n,
                                op: &node.op,
                                id,
                            });
                            funcs.push(func);
                            fn_index += 1;
                            id
                        }
                    };
                    pending.push((ki, si, id));
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
        execs.push(ExecKernel {
            node: n.index(),
            op: node.op.name(),
            exec,
        });
    }
    let machine = compile_units(module.isa(), &to_compile, funcs, opts.threads)?;
    // Defined in declaration order, so the code layout does not depend on
    // which worker compiled what.
    for (unit, code) in to_compile.iter().zip(machine) {
        module
            .define_function_bytes(unit.id, code.alignment, &code.bytes, &code.relocs)
            .map_err(|e| cranelift_err(unit.node, unit.op, format!("{e:?}")))?;
    }
    module
        .finalize_definitions()
        .map_err(|e| CodegenError::Isa(format!("finalizing kernels: {e}")))?;
    for (ki, si, id) in pending {
        let ptr = module.get_finalized_function(id);
        if let Exec::Jit(steps) = &mut execs[ki].exec {
            steps[si].func = Some(ptr as usize);
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
    Ok(JitModel::new(
        module,
        execs,
        feeds,
        outputs,
        p.plan.size,
        opts.threads,
    ))
}

/// One distinct kernel function awaiting machine code.
struct Unit<'g> {
    node: NodeIndex,
    op: &'g Op,
    id: FuncId,
}

/// The machine code of one [`Unit`].
struct Machine {
    bytes: Vec<u8>,
    alignment: u64,
    relocs: Vec<ModuleReloc>,
}

fn compile_unit(
    isa: &dyn TargetIsa,
    ctx: &mut Context,
    unit: &Unit,
    func: Function,
) -> Result<Machine, CodegenError> {
    ctx.clear();
    ctx.func = func;
    let code = ctx
        .compile(isa, &mut ControlPlane::default())
        .map_err(|e| cranelift_err(unit.node, unit.op, format!("{:?}", e.inner)))?;
    let bytes = code.code_buffer().to_vec();
    let alignment = code.buffer.alignment as u64;
    let raw = code.buffer.relocs().to_vec();
    let relocs = raw
        .iter()
        .map(|r| ModuleReloc::from_mach_reloc(r, &ctx.func, unit.id))
        .collect();
    Ok(Machine {
        bytes,
        alignment,
        relocs,
    })
}

/// Compile `funcs` (one per unit), spread over up to `threads` workers:
/// functions are independent, and Cranelift's output depends only on the
/// function and the ISA, so the machine code is the same for any split.
fn compile_units(
    isa: &dyn TargetIsa,
    units: &[Unit],
    funcs: Vec<Function>,
    threads: usize,
) -> Result<Vec<Machine>, CodegenError> {
    let workers = threads.clamp(1, units.len().max(1));
    let chunk = units.len().div_ceil(workers).max(1);
    let mut funcs = funcs.into_iter();
    let jobs: Vec<(&[Unit], Vec<Function>)> = units
        .chunks(chunk)
        .map(|part| (part, funcs.by_ref().take(part.len()).collect()))
        .collect();
    let run = |(part, fs): (&[Unit], Vec<Function>)| {
        let mut ctx = Context::new();
        part.iter()
            .zip(fs)
            .map(|(u, f)| compile_unit(isa, &mut ctx, u, f))
            .collect::<Result<Vec<_>, _>>()
    };
    let parts: Vec<Result<Vec<Machine>, CodegenError>> = if jobs.len() <= 1 {
        jobs.into_iter().map(run).collect()
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = jobs.into_iter().map(|j| s.spawn(move || run(j))).collect();
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
    let mut out = Vec::with_capacity(units.len());
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
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

/// The Cranelift IR of every kernel function, for `--emit clif`; nodes run
/// by the interpreter are listed as comments.
pub fn emit_clif(g: &Graph) -> String {
    let p = match prepare(g, None, &[]) {
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

/// The machine code of every kernel function, disassembled by Cranelift,
/// for `--emit asm`.
pub fn emit_asm(g: &Graph) -> Result<String, CodegenError> {
    let p = prepare(g, None, &[])?;
    let isa = host_isa()?;
    let config = isa.frontend_config();
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
                        .compile(&*isa, &mut ctrl)
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
