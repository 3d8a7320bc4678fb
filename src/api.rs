//! The library API: the whole pipeline for programs that embed dlc.
//!
//! A [`Compiler`] turns `.dl` source into a [`CompiledModel`] (one model of
//! the file, every dimension symbol bound); a [`Session`] owns a model's
//! parameters and optimizer state and runs it: forward passes, gradients and
//! training steps, with tensors passed and returned by name. Nothing is
//! global: several models and sessions can live in one process, and both
//! types are `Send + Sync`.
//!
//! ```
//! use dlc::api::{Compiler, TensorMap};
//! use dlc::tensor::Tensor;
//!
//! let src = "model affine {
//!     input x: f32[N, 2]
//!     param w: f32[2, 1] = ones
//!     output y = x @ w
//! }";
//! let model = Compiler::new().dim("N", 3).compile_source("affine.dl", src)?;
//! let mut session = model.session();
//! let inputs = TensorMap::from([(
//!     "x".to_string(),
//!     Tensor::f32(vec![3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
//! )]);
//! let out = session.run(&inputs)?;
//! assert_eq!(out["y"].as_f32(), Some(&[3.0, 7.0, 11.0][..]));
//! # Ok::<(), dlc::api::Error>(())
//! ```
//!
//! Gradients and a training step, on a model with a loss:
//!
//! ```
//! use dlc::api::{Compiler, TensorMap};
//! use dlc::model::Optimizer;
//! use dlc::tensor::Tensor;
//!
//! let src = "model fit {
//!     input x: f32[N, 1]
//!     input t: f32[N, 1]
//!     param w: f32[1, 1]
//!     loss = mse(x @ w, t)
//! }";
//! let model = Compiler::new().dim("N", 2).compile_source("fit.dl", src)?;
//! let mut s = model.session();
//! let batch = TensorMap::from([
//!     ("x".to_string(), Tensor::f32(vec![2, 1], vec![1.0, 2.0])),
//!     ("t".to_string(), Tensor::f32(vec![2, 1], vec![2.0, 4.0])),
//! ]);
//! // w = 0: loss = (4 + 16) / 2 = 10, dloss/dw = mean(2·(w·x − t)·x) = −10.
//! let g = s.gradients(&batch)?;
//! assert_eq!(g["loss"].as_f32(), Some(&[10.0][..]));
//! assert_eq!(g["grad.w"].as_f32(), Some(&[-10.0][..]));
//! s.set_optimizer(Optimizer::Sgd { lr: 0.1, momentum: 0.0 }, None);
//! let step = s.train_step(&batch)?;
//! assert_eq!(step.loss, 10.0);
//! assert_eq!(s.params()["w"].as_f32(), Some(&[1.0][..]));
//! # Ok::<(), dlc::api::Error>(())
//! ```

use crate::autodiff::{self, AutodiffError};
use crate::diag::{Diagnostic, SourceMap};
use crate::interp;
use crate::io::{self, IoError};
use crate::ir::{fmt_shape, Graph, Op, OutputKind, TensorType};
use crate::model::{Model, Optimizer, Regularizer};
use crate::tensor::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub use crate::io::TensorMap;

/// Everything that can go wrong in the library, one sentence each (compile
/// errors carry the rendered diagnostics, several lines with carets).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source has errors; `rendered` shows each with `file:line:col`.
    #[error("{rendered}")]
    Compile {
        rendered: String,
        diagnostics: Vec<Diagnostic>,
    },
    #[error("cannot read source file `{}`: {source}", path.display())]
    ReadSource {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("missing input `{name}` ({ty}) for model `{model}`")]
    MissingInput {
        model: String,
        name: String,
        ty: String,
    },
    #[error("{kind} `{name}` has shape {got} but model `{model}` expects {want}")]
    Shape {
        model: String,
        kind: &'static str,
        name: String,
        got: String,
        want: String,
    },
    #[error("{kind} `{name}` is {got} but model `{model}` expects {want}")]
    DType {
        model: String,
        kind: &'static str,
        name: String,
        got: DType,
        want: DType,
    },
    #[error("model `{model}` has no parameter named `{name}`")]
    UnknownParam { model: String, name: String },
    #[error("running model `{model}` failed: {source}")]
    Run { model: String, source: ExecError },
    #[error("cannot differentiate model `{model}`: {source}")]
    Autodiff {
        model: String,
        source: AutodiffError,
    },
    #[error("the `{0}` backend is not available yet; use `--backend interp`")]
    BackendUnavailable(&'static str),
    #[error("the JIT could not compile the model: {0}")]
    Codegen(String),
    #[error("unknown backend `{0}`; expected `interp` or `jit`")]
    UnknownBackend(String),
    #[error("profiling times compiled kernels, and the interpreter has none; use `--backend jit`")]
    ProfileNeedsJit,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Name the file a mis-shaped or mis-typed tensor came from.
    pub fn in_file(self, path: &Path) -> Error {
        let at = |name: String| format!("{name}` in `{}", path.display());
        match self {
            Error::Shape {
                model,
                kind,
                name,
                got,
                want,
            } => Error::Shape {
                model,
                kind,
                name: at(name),
                got,
                want,
            },
            Error::DType {
                model,
                kind,
                name,
                got,
                want,
            } => Error::DType {
                model,
                kind,
                name: at(name),
                got,
                want,
            },
            other => other,
        }
    }
}

// ------------------------------------------------------------ backends ----

/// Where graphs execute: the Cranelift JIT (the default, as in the CLI), or
/// the interpreter, the slow reference every kernel is tested against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    Interp,
    #[default]
    Jit,
}

impl std::str::FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "interp" => Ok(Backend::Interp),
            "jit" => Ok(Backend::Jit),
            other => Err(Error::UnknownBackend(other.to_string())),
        }
    }
}

/// How a backend runs a graph it has prepared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecOptions {
    /// Worker threads; results never depend on it.
    pub threads: usize,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// A run-time failure of any backend (a label out of range, a bad feed…),
/// one sentence naming the op or tensor.
pub type ExecError = Box<dyn std::error::Error + Send + Sync>;

/// A graph made ready to run by a backend: fed by leaf name, returns every
/// graph output by name (the contract of [`crate::interp::run_f32`]).
pub trait Executable: Send + Sync {
    fn run(&self, feeds: &TensorMap) -> std::result::Result<TensorMap, ExecError>;

    /// As [`Executable::run`], with leaves looked up in `layers` (a later
    /// map wins) and outputs written into `out`, reusing an entry's buffer
    /// when its dtype and shape fit. Lets a session feed its parameters
    /// without copying them and keep output buffers between calls.
    fn run_into(
        &self,
        layers: &[&TensorMap],
        out: &mut TensorMap,
    ) -> std::result::Result<(), ExecError> {
        let mut feeds = TensorMap::new();
        for m in layers {
            feeds.extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        out.extend(self.run(&feeds)?);
        Ok(())
    }
}

struct Interpreted(Graph);

impl Executable for Interpreted {
    fn run(&self, feeds: &TensorMap) -> std::result::Result<TensorMap, ExecError> {
        Ok(interp::run_f32(&self.0, feeds)?)
    }
}

impl Executable for crate::codegen::JitModel {
    fn run(&self, feeds: &TensorMap) -> std::result::Result<TensorMap, ExecError> {
        Ok(crate::codegen::JitModel::run(self, feeds)?)
    }

    fn run_into(
        &self,
        layers: &[&TensorMap],
        out: &mut TensorMap,
    ) -> std::result::Result<(), ExecError> {
        Ok(crate::codegen::JitModel::run_into(self, layers, out)?)
    }
}

impl Backend {
    /// Compile (or, for the interpreter, keep) a graph for execution.
    pub fn prepare(self, graph: &Graph, opts: &ExecOptions) -> Result<Box<dyn Executable>> {
        match self {
            Backend::Interp => Ok(Box::new(Interpreted(graph.clone()))),
            Backend::Jit => {
                let jit = crate::codegen::JitOptions {
                    threads: opts.threads.max(1),
                };
                // The JIT compiles the simplified graph: the passes keep
                // every leaf and named output, so it is fed and read alike.
                let (optimized, _) =
                    crate::passes::optimize(graph, crate::passes::OptLevel::default());
                let model = crate::codegen::compile(&optimized, &jit)
                    .map_err(|e| Error::Codegen(e.to_string()))?;
                Ok(Box::new(model))
            }
        }
    }
}

// ------------------------------------------------------------ compiler ----

/// Options of one compilation; a builder.
#[derive(Clone, Debug, Default)]
pub struct Compiler {
    model: Option<String>,
    dims: BTreeMap<String, usize>,
    input_shapes: BTreeMap<String, Vec<usize>>,
    backend: Backend,
    exec: ExecOptions,
}

impl Compiler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Pick a model of the file by name (default: the first).
    pub fn model(mut self, name: impl Into<String>) -> Self {
        self.model = Some(name.into());
        self
    }

    /// Bind a dimension symbol (`--dim N=32`).
    pub fn dim(mut self, symbol: impl Into<String>, size: usize) -> Self {
        self.dims.insert(symbol.into(), size);
        self
    }

    pub fn dims(mut self, dims: impl IntoIterator<Item = (String, usize)>) -> Self {
        self.dims.extend(dims);
        self
    }

    /// Bind symbols from the shape an input will have.
    pub fn input_shape(mut self, input: impl Into<String>, shape: Vec<usize>) -> Self {
        self.input_shapes.insert(input.into(), shape);
        self
    }

    /// Bind symbols from the shapes of actual input tensors.
    pub fn input_shapes_of(mut self, inputs: &TensorMap) -> Self {
        for (n, t) in inputs {
            self.input_shapes.insert(n.clone(), t.shape.clone());
        }
        self
    }

    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    pub fn threads(mut self, threads: usize) -> Self {
        self.exec.threads = threads.max(1);
        self
    }

    /// Parse and shape-check every model of a source over symbolic dims;
    /// `Ok` carries the rendered warnings (possibly empty).
    pub fn check_source(&self, name: &str, src: &str) -> Result<String> {
        let mut sm = SourceMap::default();
        let file = sm.add(name, src);
        let diags = crate::elab::check(&mut sm, file);
        split_diagnostics(diags, &sm)
    }

    pub fn check_file(&self, path: &Path) -> Result<String> {
        let src = read_source(path)?;
        self.check_source(&path.display().to_string(), &src)
    }

    /// Compile one model of a source text; `name` is shown in diagnostics.
    pub fn compile_source(&self, name: &str, src: &str) -> Result<CompiledModel> {
        let mut sm = SourceMap::default();
        let file = sm.add(name, src);
        let opts = crate::elab::ElabOptions {
            model: self.model.clone(),
            dims: self.dims.clone(),
            input_shapes: self.input_shapes.clone(),
        };
        let started = std::time::Instant::now();
        match crate::elab::elaborate(&mut sm, file, &opts) {
            Ok(e) => {
                let warnings = if e.warnings.is_empty() {
                    String::new()
                } else {
                    crate::diag::render(&e.warnings, &sm)
                };
                Ok(CompiledModel(Arc::new(Inner {
                    model: e.model,
                    warnings,
                    backend: self.backend,
                    exec: self.exec,
                    elab_time: started.elapsed(),
                    grad_graph: OnceLock::new(),
                })))
            }
            Err(diags) => Err(Error::Compile {
                rendered: crate::diag::render(&diags, &sm),
                diagnostics: diags,
            }),
        }
    }

    pub fn compile_file(&self, path: &Path) -> Result<CompiledModel> {
        let src = read_source(path)?;
        self.compile_source(&path.display().to_string(), &src)
    }
}

fn read_source(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::ReadSource {
        path: path.to_path_buf(),
        source,
    })
}

fn split_diagnostics(diags: Vec<Diagnostic>, sm: &SourceMap) -> Result<String> {
    if diags.iter().any(Diagnostic::is_error) {
        Err(Error::Compile {
            rendered: crate::diag::render(&diags, sm),
            diagnostics: diags,
        })
    } else if diags.is_empty() {
        Ok(String::new())
    } else {
        Ok(crate::diag::render(&diags, sm))
    }
}

// ------------------------------------------------------- compiled model ----

struct Inner {
    model: Model,
    warnings: String,
    backend: Backend,
    exec: ExecOptions,
    elab_time: std::time::Duration,
    grad_graph: OnceLock<Graph>,
}

/// One elaborated model with every dimension bound; cheap to clone (shared).
#[derive(Clone)]
pub struct CompiledModel(Arc<Inner>);

impl std::fmt::Debug for CompiledModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledModel")
            .field("name", &self.0.model.name)
            .field("dims", &self.0.model.dims)
            .finish()
    }
}

impl CompiledModel {
    pub fn name(&self) -> &str {
        &self.0.model.name
    }

    /// The bound value of every dimension symbol.
    pub fn dims(&self) -> &BTreeMap<String, usize> {
        &self.0.model.dims
    }

    pub fn model(&self) -> &Model {
        &self.0.model
    }

    pub fn graph(&self) -> &Graph {
        &self.0.model.graph
    }

    pub fn backend(&self) -> Backend {
        self.0.backend
    }

    pub fn exec_options(&self) -> ExecOptions {
        self.0.exec
    }

    /// Time spent parsing and elaborating.
    pub fn elab_time(&self) -> std::time::Duration {
        self.0.elab_time
    }

    /// Rendered warnings of the compilation (empty when there were none).
    pub fn warnings(&self) -> &str {
        &self.0.warnings
    }

    /// The model's inputs with their types, sorted by name.
    pub fn inputs(&self) -> Vec<(String, TensorType)> {
        leaf_types(self.graph(), self.graph().inputs_by_name())
    }

    /// The model's parameters with their types, sorted by name.
    pub fn params(&self) -> Vec<(String, TensorType)> {
        leaf_types(self.graph(), self.graph().params())
    }

    /// The named outputs (model outputs and `loss`) in declaration order.
    pub fn outputs(&self) -> Vec<(String, OutputKind, TensorType)> {
        let g = self.graph();
        g.outputs
            .iter()
            .map(|o| (o.name.clone(), o.kind, g.ty(o.value).clone()))
            .collect()
    }

    pub fn has_loss(&self) -> bool {
        self.graph()
            .outputs
            .iter()
            .any(|o| o.kind == OutputKind::Loss)
    }

    /// The forward graph plus `grad.<param>` outputs, built once.
    pub fn gradient_graph(&self) -> Result<&Graph> {
        if let Some(g) = self.0.grad_graph.get() {
            return Ok(g);
        }
        let g = autodiff::with_gradients(&self.0.model).map_err(|source| Error::Autodiff {
            model: self.name().to_string(),
            source,
        })?;
        Ok(self.0.grad_graph.get_or_init(|| g))
    }

    /// The training-step graph for an optimizer and regulariser.
    pub fn training_graph(
        &self,
        optimizer: &Optimizer,
        regularize: Option<Regularizer>,
    ) -> Result<Graph> {
        autodiff::training_step(&self.0.model, optimizer, regularize).map_err(|source| {
            Error::Autodiff {
                model: self.name().to_string(),
                source,
            }
        })
    }

    /// Initialise every parameter from a seed (LANGUAGE.md §7).
    pub fn init_params(&self, seed: u64) -> TensorMap {
        crate::init::init_params(self.graph(), seed, &TensorMap::new())
    }

    /// A session with parameters initialised from seed 0.
    pub fn session(&self) -> Session {
        self.session_with_seed(0)
    }

    pub fn session_with_seed(&self, seed: u64) -> Session {
        Session {
            model: self.clone(),
            params: self.init_params(seed),
            state: TensorMap::new(),
            forward: None,
            grads: None,
            train: None,
            spare: TensorMap::new(),
            optimizer: self.0.model.train.optimizer.clone().unwrap_or_default(),
            regularize: self.0.model.train.regularize,
        }
    }

    /// Names in `tensors` that are neither an input nor a parameter nor
    /// optimizer state of this model (for "ignored" warnings).
    pub fn unknown_names<'a>(&self, tensors: &'a TensorMap) -> Vec<&'a str> {
        let g = self.graph();
        let known: std::collections::BTreeSet<String> = g
            .inputs_by_name()
            .into_iter()
            .chain(g.params())
            .map(|(n, _)| n)
            .collect();
        tensors
            .keys()
            .filter(|n| !known.contains(*n) && !n.starts_with("opt."))
            .map(String::as_str)
            .collect()
    }

    /// Check that every input is present with its declared dtype and shape.
    pub fn check_inputs(&self, inputs: &TensorMap) -> Result<()> {
        for (name, ty) in self.inputs() {
            let t = inputs.get(&name).ok_or_else(|| Error::MissingInput {
                model: self.name().to_string(),
                name: name.clone(),
                ty: ty.to_string(),
            })?;
            self.check_tensor("input", &name, t, &ty)?;
        }
        Ok(())
    }

    fn check_tensor(
        &self,
        kind: &'static str,
        name: &str,
        t: &Tensor,
        ty: &TensorType,
    ) -> Result<()> {
        if t.dtype() != ty.dtype {
            return Err(Error::DType {
                model: self.name().to_string(),
                kind,
                name: name.to_string(),
                got: t.dtype(),
                want: ty.dtype,
            });
        }
        if t.shape != ty.shape {
            return Err(Error::Shape {
                model: self.name().to_string(),
                kind,
                name: name.to_string(),
                got: fmt_shape(&t.shape),
                want: fmt_shape(&ty.shape),
            });
        }
        Ok(())
    }

    fn run_error(&self, source: ExecError) -> Error {
        Error::Run {
            model: self.name().to_string(),
            source,
        }
    }
}

fn leaf_types(g: &Graph, leaves: Vec<(String, crate::ir::Value)>) -> Vec<(String, TensorType)> {
    let mut out: Vec<(String, TensorType)> = leaves
        .into_iter()
        .map(|(n, v)| (n, g.ty(v).clone()))
        .collect();
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

// ------------------------------------------------------------- session ----

/// The result of one training step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepResult {
    /// The model's `loss` on the batch, before the update.
    pub loss: f32,
    /// `loss` plus the regulariser: what the step minimised.
    pub objective: f32,
}

/// A model with its parameters and optimizer state; runs it.
pub struct Session {
    model: CompiledModel,
    params: TensorMap,
    state: TensorMap,
    forward: Option<Box<dyn Executable>>,
    grads: Option<Box<dyn Executable>>,
    /// The training step and the names of its `Update` outputs.
    train: Option<(Box<dyn Executable>, Vec<String>)>,
    /// Outputs of the last training step, with the buffers of the
    /// parameters and state it replaced: the next step writes into them
    /// instead of allocating.
    spare: TensorMap,
    optimizer: Optimizer,
    regularize: Option<Regularizer>,
}

impl Session {
    pub fn model(&self) -> &CompiledModel {
        &self.model
    }

    pub fn params(&self) -> &TensorMap {
        &self.params
    }

    /// Optimizer state (`opt.m.<p>`, `opt.step`, …); empty before training.
    pub fn state(&self) -> &TensorMap {
        &self.state
    }

    /// Parameters and optimizer state together: what a checkpoint holds.
    pub fn checkpoint(&self) -> TensorMap {
        let mut all = self.params.clone();
        all.extend(self.state.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }

    /// Re-initialise every parameter from a seed and drop optimizer state.
    pub fn init_params(&mut self, seed: u64) {
        self.params = self.model.init_params(seed);
        self.state.clear();
    }

    /// Set one parameter; its dtype and shape must match the model's.
    pub fn set_param(&mut self, name: &str, t: Tensor) -> Result<()> {
        let ty = self
            .model
            .params()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, ty)| ty)
            .ok_or_else(|| Error::UnknownParam {
                model: self.model.name().to_string(),
                name: name.to_string(),
            })?;
        self.model.check_tensor("parameter", name, &t, &ty)?;
        self.params.insert(name.to_string(), t);
        Ok(())
    }

    /// Take every parameter and optimizer-state tensor found in `tensors`
    /// (checking each), leave the others as they are, and return the names
    /// that are neither, in order.
    pub fn set_params(&mut self, tensors: &TensorMap) -> Result<Vec<String>> {
        let types: BTreeMap<String, TensorType> = self.model.params().into_iter().collect();
        let mut unknown = Vec::new();
        for (name, t) in tensors {
            if let Some(ty) = types.get(name) {
                self.model.check_tensor("parameter", name, t, ty)?;
                self.params.insert(name.clone(), t.clone());
            } else if name.starts_with("opt.") {
                self.state.insert(name.clone(), t.clone());
            } else {
                unknown.push(name.clone());
            }
        }
        Ok(unknown)
    }

    /// Load parameters (and optimizer state) from a tensor file; returns the
    /// names in the file that the model does not use.
    pub fn load_params(&mut self, path: &Path) -> Result<Vec<String>> {
        let tensors = io::read_tensors(path)?;
        self.set_params(&tensors).map_err(|e| e.in_file(path))
    }

    /// Save parameters and optimizer state, atomically.
    pub fn save_params(&self, path: &Path) -> Result<()> {
        io::write_safetensors(path, &self.checkpoint(), None)?;
        Ok(())
    }

    /// Compile the forward pass now (it is otherwise compiled on the first
    /// [`Session::run`]); for timing compilation apart from running.
    pub fn prepare_forward(&mut self) -> Result<()> {
        if self.forward.is_none() {
            let m = &self.model;
            self.forward = Some(m.backend().prepare(m.graph(), &m.exec_options())?);
        }
        Ok(())
    }

    /// One forward pass: every model output (and `loss`) by name.
    pub fn run(&mut self, inputs: &TensorMap) -> Result<TensorMap> {
        self.model.check_inputs(inputs)?;
        self.prepare_forward()?;
        let exe = self
            .forward
            .as_ref()
            .ok_or(Error::BackendUnavailable("forward"))?;
        let mut out = TensorMap::new();
        exe.run_into(&[&self.params, inputs], &mut out)
            .map_err(|e| self.model.run_error(e))?;
        Ok(out)
    }

    /// A forward pass plus the gradient of `loss` w.r.t. every parameter:
    /// the outputs, `loss`, and `grad.<param>` for each parameter.
    pub fn gradients(&mut self, inputs: &TensorMap) -> Result<TensorMap> {
        self.model.check_inputs(inputs)?;
        if self.grads.is_none() {
            let m = &self.model;
            let g = m.gradient_graph()?;
            self.grads = Some(m.backend().prepare(g, &m.exec_options())?);
        }
        let exe = self
            .grads
            .as_ref()
            .ok_or(Error::BackendUnavailable("gradients"))?;
        let mut out = TensorMap::new();
        exe.run_into(&[&self.params, inputs], &mut out)
            .map_err(|e| self.model.run_error(e))?;
        Ok(out)
    }

    /// Time every compiled kernel of the forward pass, the gradient graph
    /// or the training step over `runs` runs after one warm-up; returns the
    /// profile and the outputs of the last run. The step is not applied:
    /// parameters and optimizer state are left as they are. Needs the JIT
    /// backend: the interpreter has no kernels.
    pub fn profile(
        &mut self,
        inputs: &TensorMap,
        target: crate::profile::ProfileTarget,
        runs: usize,
    ) -> Result<(crate::profile::Profile, TensorMap)> {
        use crate::profile::ProfileTarget;
        self.model.check_inputs(inputs)?;
        if self.model.backend() != Backend::Jit {
            return Err(Error::ProfileNeedsJit);
        }
        if target == ProfileTarget::TrainStep {
            // Sets up the optimizer state the step reads.
            self.prepare_training()?;
        }
        let m = &self.model;
        let training;
        let graph = match target {
            ProfileTarget::Forward => m.graph(),
            ProfileTarget::Gradients => m.gradient_graph()?,
            ProfileTarget::TrainStep => {
                training = m.training_graph(&self.optimizer, self.regularize)?;
                &training
            }
        };
        // The same graph the JIT backend compiles, kept so kernels can be
        // named by their nodes.
        let (optimized, _) = crate::passes::optimize(graph, crate::passes::OptLevel::default());
        let jit = crate::codegen::JitOptions {
            threads: m.exec_options().threads.max(1),
        };
        let compiled =
            crate::codegen::compile(&optimized, &jit).map_err(|e| Error::Codegen(e.to_string()))?;
        let layers = [&self.params, inputs, &self.state];
        crate::profile::collect(&optimized, &compiled, &layers, runs)
            .map_err(|e| m.run_error(Box::new(e)))
    }

    /// Choose the optimizer and regulariser of [`Session::train_step`]
    /// (default: the model's `train` block, else sgd(lr=0.01)). Optimizer
    /// state is kept when the kind of optimizer stays the same.
    pub fn set_optimizer(&mut self, optimizer: Optimizer, regularize: Option<Regularizer>) {
        if std::mem::discriminant(&optimizer) != std::mem::discriminant(&self.optimizer) {
            self.state.clear();
        }
        self.optimizer = optimizer;
        self.regularize = regularize;
        self.train = None;
    }

    pub fn optimizer(&self) -> (&Optimizer, Option<Regularizer>) {
        (&self.optimizer, self.regularize)
    }

    /// Build and compile the training step now (it is otherwise compiled on
    /// the first [`Session::train_step`]); for timing compilation.
    pub fn prepare_training(&mut self) -> Result<()> {
        if self.train.is_none() {
            let m = &self.model;
            let g = m.training_graph(&self.optimizer, self.regularize)?;
            // State starts at zero (LANGUAGE.md §8); a resumed checkpoint
            // has already put its values here. State of another optimizer
            // (velocity when resuming with adam) is dropped.
            let states = g.states();
            self.state
                .retain(|name, _| states.iter().any(|(n, _)| n == name));
            for (name, v) in states {
                let ty = g.ty(v);
                match self.state.get(&name) {
                    Some(t) => m.check_tensor("optimizer state", &name, t, ty)?,
                    None => {
                        self.state
                            .insert(name, Tensor::zeros(ty.dtype, ty.shape.clone()));
                    }
                }
            }
            let updates = g
                .outputs
                .iter()
                .filter(|o| o.kind == OutputKind::Update)
                .map(|o| o.name.clone())
                .collect();
            self.train = Some((m.backend().prepare(&g, &m.exec_options())?, updates));
        }
        Ok(())
    }

    /// One optimizer step on a batch: updates parameters and state in place.
    pub fn train_step(&mut self, inputs: &TensorMap) -> Result<StepResult> {
        self.model.check_inputs(inputs)?;
        self.prepare_training()?;
        let (exe, updates) = self
            .train
            .as_ref()
            .ok_or(Error::BackendUnavailable("train"))?;
        // Same precedence as one merged map: params, then inputs, then state.
        exe.run_into(&[&self.params, inputs, &self.state], &mut self.spare)
            .map_err(|e| self.model.run_error(e))?;
        let out = &mut self.spare;
        let scalar =
            |t: Option<&Tensor>| t.and_then(|t| t.as_f32()).and_then(|v| v.first()).copied();
        let loss = scalar(out.get("loss")).unwrap_or(f32::NAN);
        let objective = scalar(out.get("objective")).unwrap_or(loss);
        for name in updates {
            let Some(t) = out.get_mut(name) else { continue };
            // The replaced tensor stays in `spare` as next step's buffer.
            let target = if self.params.contains_key(name) {
                &mut self.params
            } else {
                &mut self.state
            };
            match target.get_mut(name) {
                Some(old) => std::mem::swap(old, t),
                None => {
                    if let Some(t) = out.remove(name) {
                        target.insert(name.clone(), t);
                    }
                }
            }
        }
        Ok(StepResult { loss, objective })
    }
}

/// The op that computes a classification loss (`cross_entropy`, `hinge`)
/// in a graph, as `(logits, labels)` operand values, for accuracy.
pub fn classification_operands(g: &Graph) -> Option<(crate::ir::Value, crate::ir::Value)> {
    g.topo_order().into_iter().find_map(|n| match g.node(n).op {
        Op::CrossEntropy | Op::Hinge => {
            let ins = g.inputs(n);
            (ins.len() == 2).then(|| (ins[0], ins[1]))
        }
        _ => None,
    })
}

/// Seeded random values for every input of a model (for `dlc bench`):
/// f32 inputs from a standard normal, i32 inputs uniform over the range
/// their consumer accepts (classes of a loss, rows of a `gather`), else 0.
pub fn random_inputs(model: &CompiledModel, seed: u64) -> TensorMap {
    let g = model.graph();
    let mut rng = crate::init::SplitMix64::new(seed);
    let mut out = TensorMap::new();
    for (name, v) in g.inputs_by_name() {
        let ty = g.ty(v);
        let n = crate::tensor::numel(&ty.shape);
        let t = match ty.dtype {
            DType::F32 => Tensor::f32(
                ty.shape.clone(),
                (0..n).map(|_| rng.normal() as f32).collect(),
            ),
            DType::I32 => {
                let range = i32_range(g, v).max(1) as u64;
                Tensor::i32(
                    ty.shape.clone(),
                    (0..n).map(|_| (rng.next_u64() % range) as i32).collect(),
                )
            }
        };
        out.insert(name, t);
    }
    out
}

/// How many distinct values an i32 input may take: the class count of a
/// loss or the row count of a gather table that reads it.
fn i32_range(g: &Graph, v: crate::ir::Value) -> usize {
    for user in g.users(v.node) {
        let ins = g.inputs(user);
        let slot = ins.iter().position(|x| *x == v);
        match (&g.node(user).op, slot) {
            (Op::CrossEntropy | Op::Hinge, Some(1)) => {
                return g.ty(ins[0]).shape.last().copied().unwrap_or(1)
            }
            (Op::Gather, Some(1)) => return g.ty(ins[0]).shape.first().copied().unwrap_or(1),
            _ => {}
        }
    }
    1
}

/// Bytes of every value a graph computes, if each had its own buffer (what
/// a memory plan would improve on).
pub fn naive_bytes(g: &Graph) -> usize {
    g.graph
        .node_indices()
        .flat_map(|n| g.node(n).outputs.iter())
        .map(|t| crate::tensor::numel(&t.shape) * 4)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn models_and_sessions_are_send_and_sync() {
        assert_send_sync::<CompiledModel>();
        assert_send_sync::<Session>();
        assert_send_sync::<Error>();
    }

    #[test]
    fn jit_steps_reuse_buffers_without_stale_values() {
        let model = Compiler::new()
            .backend(Backend::Jit)
            .threads(2)
            .dim("N", 2)
            .compile_source(
                "fit.dl",
                "model fit {\n  input x: f32[N, 1]\n  input t: f32[N, 1]\n  \
                 param w: f32[1, 1]\n  loss = mse(x @ w, t)\n}\n",
            )
            .unwrap();
        let mut s = model.session();
        let batch: TensorMap = [
            ("x".to_string(), Tensor::f32(vec![2, 1], vec![1., 2.])),
            ("t".to_string(), Tensor::f32(vec![2, 1], vec![2., 4.])),
        ]
        .into_iter()
        .collect();
        s.set_optimizer(
            Optimizer::Sgd {
                lr: 0.1,
                momentum: 0.5,
            },
            None,
        );
        let w = |s: &Session| s.params()["w"].as_f32().unwrap()[0];
        // loss = mean((x·w - t)²), dloss/dw = mean(2(x·w - t)x); v = 0.5v + g,
        // w -= 0.1v. w = 0: loss 10, g = -10, v = -10, w = 1.
        assert_eq!(s.train_step(&batch).unwrap().loss, 10.0);
        assert!((w(&s) - 1.0).abs() < 1e-6);
        // w = 1: loss 2.5, g = -5, v = -10, w = 2.
        assert_eq!(s.train_step(&batch).unwrap().loss, 2.5);
        assert!((w(&s) - 2.0).abs() < 1e-6);
        // The forward pass sees the trained parameter: w = 2 fits exactly.
        assert_eq!(s.run(&batch).unwrap()["loss"].as_f32(), Some(&[0.0][..]));
        // A parameter set by hand is what the next step reads, not a buffer
        // kept from an earlier step: w = 0, g = -10, v = -15, w = 1.5.
        s.set_param("w", Tensor::f32(vec![1, 1], vec![0.0]))
            .unwrap();
        assert_eq!(s.train_step(&batch).unwrap().loss, 10.0);
        assert!((w(&s) - 1.5).abs() < 1e-6);
        assert!((s.state()["opt.velocity.w"].as_f32().unwrap()[0] + 15.0).abs() < 1e-6);
    }

    #[test]
    fn backend_names_parse() {
        assert_eq!("interp".parse::<Backend>().ok(), Some(Backend::Interp));
        assert_eq!("jit".parse::<Backend>().ok(), Some(Backend::Jit));
        let e = "gpu".parse::<Backend>().unwrap_err();
        assert!(e.to_string().contains("`gpu`"));
    }
}
