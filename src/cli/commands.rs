//! One function per command: call the library, print the result.

use super::{BenchArgs, Command, CompileArgs, ModelArgs, RunArgs, TestArgs, TrainArgs};
use dlc::api::{self, Backend, CompiledModel, Compiler};
use dlc::codegen;
use dlc::golden;
use dlc::io;
use dlc::ir::fmt_shape;
use dlc::model::Optimizer;
use dlc::passes::{self, OptLevel};
use dlc::profile::{Profile, ProfileTarget};
use dlc::tensor::{Data, Tensor};
use dlc::train::{OptimizerKind, TrainError, TrainOptions, Trainer};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// `println!` that never panics: a closed stdout (`dlc run | head -1`) is
/// not an error worth a crash, so write failures are ignored.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

macro_rules! err {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($t)*);
    }};
}

/// A failed command: rendered source diagnostics, or one sentence.
#[derive(Debug)]
pub enum Failure {
    Diagnostics(String),
    Message(String),
}

impl From<api::Error> for Failure {
    fn from(e: api::Error) -> Self {
        match e {
            api::Error::Compile { rendered, .. } => Failure::Diagnostics(rendered),
            other => Failure::Message(other.to_string()),
        }
    }
}

impl From<TrainError> for Failure {
    fn from(e: TrainError) -> Self {
        match e {
            TrainError::Api(a) => a.into(),
            other => Failure::Message(other.to_string()),
        }
    }
}

impl From<io::IoError> for Failure {
    fn from(e: io::IoError) -> Self {
        Failure::Message(e.to_string())
    }
}

impl From<golden::GoldenError> for Failure {
    fn from(e: golden::GoldenError) -> Self {
        Failure::Message(e.to_string())
    }
}

fn fail<T>(msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure::Message(msg.into()))
}

pub fn report(e: &Failure) {
    match e {
        Failure::Diagnostics(d) => {
            err!("{d}");
            if !d.ends_with('\n') {
                errln!();
            }
        }
        Failure::Message(m) => errln!("error: {m}"),
    }
}

fn warn(msg: impl AsRef<str>) {
    errln!("warning: {}", msg.as_ref());
}

pub fn dispatch(cmd: Command) -> Result<ExitCode, Failure> {
    match cmd {
        Command::Check { file } => check(&file),
        Command::Compile(a) => compile(a),
        Command::Run(a) => run(a),
        Command::Test(a) => test(a),
        Command::Train(a) => train_cmd(a),
        Command::Bench(a) => bench(a),
    }
    .map(|()| ExitCode::SUCCESS)
    .or_else(|e| match e {
        // `dlc test` prints its own report; failing cases only set the code.
        Failure::Message(m) if m.is_empty() => Ok(ExitCode::from(1)),
        e => Err(e),
    })
}

fn backend(name: &str) -> Result<Backend, Failure> {
    Ok(name.parse::<Backend>()?)
}

fn compiler(m: &ModelArgs) -> Result<Compiler, Failure> {
    let mut c = Compiler::new()
        .backend(backend(&m.backend)?)
        .dims(m.dims.iter().cloned());
    if let Some(name) = &m.model {
        c = c.model(name.clone());
    }
    if let Some(t) = m.threads {
        if t == 0 {
            return fail("--threads must be at least 1");
        }
        c = c.threads(t);
    }
    Ok(c)
}

fn show_warnings(model: &CompiledModel) {
    if !model.warnings().is_empty() {
        err!("{}", model.warnings());
    }
}

// ----------------------------------------------------------------- check ----

fn check(file: &Path) -> Result<(), Failure> {
    let warnings = Compiler::new().check_file(file)?;
    err!("{warnings}");
    outln!("{}: no errors", file.display());
    Ok(())
}

// --------------------------------------------------------------- compile ----

fn compile(a: CompileArgs) -> Result<(), Failure> {
    if let Some(s) = &a.stats {
        if s != "json" {
            return fail(format!("--stats takes `json`, not `{s}`"));
        }
    }
    let level: OptLevel = match a.opt.as_deref() {
        None => OptLevel::default(),
        Some(l) => l.parse().map_err(Failure::Message)?,
    };
    if let Some(what) = a.emit.as_deref() {
        if what == "ast" {
            return emit_ast(&a.file, a.out.as_deref());
        }
    }
    let started = Instant::now();
    let model = compiler(&a.model)?.compile_file(&a.file)?;
    show_warnings(&model);
    let frontend_ms = ms(started.elapsed());
    let graph = if a.train {
        let (opt, reg) = (
            model.model().train.optimizer.clone().unwrap_or_default(),
            model.model().train.regularize,
        );
        Some(model.training_graph(&opt, reg)?)
    } else {
        None
    };
    let g = graph.as_ref().unwrap_or(model.graph());
    let autodiff_ms = ms(started.elapsed()) - frontend_ms;
    if a.emit.as_deref() == Some("ir") {
        return write_or_print(a.out.as_deref(), &dlc::ir::print::print(g));
    }
    if a.emit.as_deref() == Some("grad-ir") {
        let grad = match &graph {
            Some(t) => t,
            None => model.gradient_graph()?,
        };
        return write_or_print(a.out.as_deref(), &dlc::ir::print::print(grad));
    }
    let lowered = passes::lower(g, level).map_err(|e| Failure::Message(e.to_string()))?;
    let passes_ms = ms(started.elapsed()) - frontend_ms - autodiff_ms;
    let jit_started = Instant::now();
    // The kernels as `run` and `bench` would compile them: the thread
    // count decides how some matmuls split their work.
    let jit_options = codegen::JitOptions {
        threads: model.exec_options().threads,
    };
    let jit = codegen::compile(&lowered.graph, &jit_options)
        .map_err(|e| Failure::Message(format!("the JIT could not compile the model: {e}")))?;
    let jit_ms = ms(jit_started.elapsed());
    let compile_ms = ms(started.elapsed());
    let text = match a.emit.as_deref() {
        None => None,
        Some("opt-ir") => Some(dlc::ir::print::print(&lowered.graph)),
        Some("kernels") => Some(passes::fusion::print_kernels(
            &lowered.graph,
            &lowered.kernels,
        )),
        Some("plan") => Some(passes::memplan::print_plan(
            &lowered.graph,
            &lowered.kernels,
            &lowered.plan,
        )),
        Some("clif") => Some(codegen::emit_clif(&lowered.graph, &jit_options)),
        Some("asm") => Some(
            codegen::emit_asm(&lowered.graph, &jit_options)
                .map_err(|e| Failure::Message(e.to_string()))?,
        ),
        Some(other) => {
            return fail(format!(
            "--emit takes one of ast, ir, opt-ir, grad-ir, kernels, plan, clif, asm, not `{other}`"
        ))
        }
    };
    let ops_before = g.op_count();
    let ops_after = lowered.graph.op_count();
    let plan = &lowered.plan;
    let summary = if a.stats.is_some() {
        serde_json::json!({
            "model": model.name(),
            "dims": model.dims(),
            "ops_before": ops_before,
            "ops_after": ops_after,
            "kernels": lowered.kernels.len(),
            "peak_bytes": plan.peak_bytes,
            "arena_bytes": plan.arena_bytes,
            "naive_bytes": plan.naive_bytes,
            "interpreted_kernels": jit.interpreted_kernels(),
            // What the compiled model allocates: the values' arena plus
            // every kernel's scratch (padded copies, packed panels,
            // Winograd's transformed tiles).
            "jit_arena_bytes": jit.arena_bytes(),
            "compile_ms": compile_ms,
        })
        .to_string()
            + "\n"
    } else {
        format!(
            "model {} ({}){}\n{}  interpreted kernels: {}\n  time: front end {frontend_ms:.2} ms, autodiff {autodiff_ms:.2} ms, passes {passes_ms:.2} ms, JIT {jit_ms:.2} ms, total {compile_ms:.2} ms\n",
            model.name(),
            fmt_dims(model.dims()),
            if a.train { ", training step" } else { "" },
            lowered.summary(),
            jit.interpreted_kernels(),
        )
    };
    let body = match text {
        Some(t) => {
            // The stats go to stderr so that the emitted text stays clean.
            if a.stats.is_some() {
                err!("{summary}");
            }
            t
        }
        None => summary,
    };
    write_or_print(a.out.as_deref(), &body)
}

fn emit_ast(file: &Path, out: Option<&Path>) -> Result<(), Failure> {
    let src = std::fs::read_to_string(file).map_err(|source| api::Error::ReadSource {
        path: file.to_path_buf(),
        source,
    })?;
    let (ast, diags) = dlc::syntax::parse(&src, 0);
    if diags.iter().any(|d| d.is_error()) {
        // The checker renders the same parse errors with their carets.
        Compiler::new().check_source(&file.display().to_string(), &src)?;
    }
    write_or_print(out, &format!("{ast:#?}\n"))
}

fn write_or_print(out: Option<&Path>, text: &str) -> Result<(), Failure> {
    match out {
        Some(p) => Ok(io::write_atomic(p, text.as_bytes())?),
        None => {
            out!("{text}");
            Ok(())
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn fmt_dims(dims: &std::collections::BTreeMap<String, usize>) -> String {
    if dims.is_empty() {
        return "no dimension symbols".into();
    }
    dims.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ------------------------------------------------------------------- run ----

fn run(a: RunArgs) -> Result<(), Failure> {
    let inputs = io::read_tensors(&a.inputs)?;
    let model = compiler(&a.model)?
        .input_shapes_of(&inputs)
        .compile_file(&a.file)?;
    show_warnings(&model);
    for name in model.unknown_names(&inputs) {
        warn(format!(
            "`{}` has a tensor `{name}` that model `{}` does not take as input; it is ignored",
            a.inputs.display(),
            model.name()
        ));
    }
    let mut session = model.session_with_seed(a.seed);
    if let Some(p) = &a.params {
        let given = io::read_tensors(p)?;
        for name in session.set_params(&given).map_err(|e| e.in_file(p))? {
            warn(format!(
                "`{}` has a tensor `{name}` that is not a parameter of model `{}`; it is ignored",
                p.display(),
                model.name()
            ));
        }
        let missing: Vec<String> = model
            .params()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| !given.contains_key(n))
            .collect();
        if !missing.is_empty() {
            errln!(
                "note: initialised {} parameter(s) missing from `{}` with seed {}: {}",
                missing.len(),
                p.display(),
                a.seed,
                missing.join(", ")
            );
        }
    }
    let mut profile = None;
    let outputs = if a.profile {
        let target = if a.grads {
            ProfileTarget::Gradients
        } else {
            ProfileTarget::Forward
        };
        let (p, outputs) = session.profile(&inputs, target, a.runs as usize)?;
        profile = Some(p);
        outputs
    } else if a.grads {
        session.gradients(&inputs)?
    } else {
        session.run(&inputs)?
    };
    match &a.out {
        Some(p) => io::write_tensors(p, &outputs)?,
        None => {
            for (name, t) in &outputs {
                outln!("{name}: {}", preview(t));
            }
        }
    }
    if let Some(p) = profile {
        outln!("{}", p.table().trim_end());
    }
    Ok(())
}

/// `f32[2, 3] = [0.1, 0.2, 0.3, 0.4, …]`
fn preview(t: &Tensor) -> String {
    const SHOW: usize = 6;
    let vals: Vec<String> = match &t.data {
        Data::F32(v) => v.iter().take(SHOW).map(|x| format!("{x:.6}")).collect(),
        Data::I32(v) => v.iter().take(SHOW).map(|x| x.to_string()).collect(),
    };
    let more = if t.numel() > SHOW { ", …" } else { "" };
    format!(
        "{}{} = [{}{more}]",
        t.dtype(),
        fmt_shape(&t.shape),
        vals.join(", ")
    )
}

// ------------------------------------------------------------------ test ----

fn test(a: TestArgs) -> Result<(), Failure> {
    let opts = golden::RunOptions {
        backend: backend(&a.backend)?,
        threads: a.threads,
    };
    let mut cases = Vec::new();
    for d in &a.dirs {
        cases.extend(golden::find_cases(d)?);
    }
    let mut summary = golden::Summary::default();
    for c in &cases {
        let r = golden::run_case(c, &opts);
        outln!("{r}");
        summary.add(&r);
    }
    outln!("{summary}");
    if summary.failed > 0 {
        // Already reported above: exit 1 without another message.
        return fail("");
    }
    Ok(())
}

// ----------------------------------------------------------------- train ----

fn train_cmd(a: TrainArgs) -> Result<(), Failure> {
    let opts = TrainOptions {
        data: a.data.clone(),
        eval: a.eval.clone(),
        batch: a.batch,
        seed: a.seed,
        model: a.model.model.clone(),
        dims: a.model.dims.iter().cloned().collect(),
        optimizer: a.optimizer.as_deref().map(|o| match o {
            "adam" => OptimizerKind::Adam,
            _ => OptimizerKind::Sgd,
        }),
        lr: a.lr,
        momentum: a.momentum,
        backend: backend(&a.model.backend)?,
        threads: a.model.threads,
    };
    let mut trainer = Trainer::new(&a.file, opts)?;
    show_warnings(trainer.session().model());
    let name = trainer.session().model().name().to_string();
    for n in &trainer.ignored {
        warn(format!(
            "tensor `{n}` is not an input of model `{name}`; it is ignored"
        ));
    }
    if let Some(p) = &a.params {
        for n in trainer.load(p)? {
            warn(format!(
                "`{}` has a tensor `{n}` that is not a parameter of model `{name}`; it is ignored",
                p.display()
            ));
        }
        if trainer.epochs_done() > 0 {
            errln!(
                "resuming from `{}` after epoch {}",
                p.display(),
                trainer.epochs_done()
            );
        }
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{name}.params.safetensors")));
    errln!(
        "training `{name}`: {} examples per epoch in batches of {}",
        trainer.examples_per_epoch(),
        trainer.batch_size()
    );
    for _ in 0..a.epochs {
        let epoch = trainer.epochs_done() + 1;
        let bar = progress_bar(trainer.batches_per_epoch(), epoch);
        let started = Instant::now();
        let batch = trainer.batch_size();
        let r = trainer.epoch(|done, loss| {
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "loss {loss:.4}  {:.0} examples/s",
                (done * batch) as f64 / secs
            ));
            bar.set_position(done as u64);
        });
        bar.finish_and_clear();
        let r = r?;
        trainer.save(&out)?;
        let mut line = format!(
            "epoch {}: loss {:.6}, {:.0} examples/s",
            r.epoch, r.train_loss, r.examples_per_sec
        );
        if let Some(e) = &r.eval {
            line.push_str(&format!(", eval loss {:.6}", e.loss));
            if let Some(acc) = e.accuracy {
                line.push_str(&format!(", eval accuracy {acc:.4}"));
            }
        }
        outln!("{line}");
    }
    errln!("checkpoint: {}", out.display());
    Ok(())
}

fn progress_bar(len: usize, epoch: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "epoch {prefix} [{bar:20}] {pos}/{len} batches {msg} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(epoch.to_string());
    bar
}

// ----------------------------------------------------------------- bench ----

fn bench(a: BenchArgs) -> Result<(), Failure> {
    if a.steps == 0 {
        return fail("--steps must be at least 1");
    }
    if !(a.min_time.is_finite() && (0.0..=3600.0).contains(&a.min_time)) {
        return fail("--min-time must be a number of seconds between 0 and 3600");
    }
    let window = Window {
        warmup: a.warmup,
        steps: a.steps,
        min_time: Duration::from_secs_f64(a.min_time),
    };
    // Compile time is source to runnable: parsing, elaboration, and for the
    // measured step autodiff, passes and JIT code generation.
    let started = Instant::now();
    let model = compiler(&a.model)?.compile_file(&a.file)?;
    let mut session = model.session_with_seed(a.seed);
    if a.lr.is_some() || a.momentum.is_some() {
        let optimizer = Optimizer::Sgd {
            lr: a.lr.unwrap_or(0.01),
            momentum: a.momentum.unwrap_or(0.0),
        };
        session.set_optimizer(optimizer, model.model().train.regularize);
    }
    if a.train {
        session.prepare_training()?;
    } else {
        session.prepare_forward()?;
    }
    let compile_ms = ms(started.elapsed());
    show_warnings(&model);
    let inputs = api::random_inputs(&model, a.seed);
    let forward = time_steps(&window, || session.run(&inputs).map(|_| ()))?;
    let train = if a.train {
        Some(time_steps(&window, || {
            session.train_step(&inputs).map(|_| ())
        })?)
    } else {
        None
    };
    let mut profiles: Vec<(&str, Profile)> = Vec::new();
    if a.profile {
        profiles.push((
            "forward",
            session.profile(&inputs, ProfileTarget::Forward, a.steps)?.0,
        ));
        if a.train {
            let p = session.profile(&inputs, ProfileTarget::TrainStep, a.steps)?;
            profiles.push(("train_step", p.0));
        }
    }
    let threads = model.exec_options().threads;
    let peak = api::naive_bytes(model.graph());
    // The ceiling of the JIT's f32x4 kernels in the same minutes as the
    // timings (see `codegen::peak`); absent where the probe cannot compile.
    let fma_peak = dlc::codegen::peak::PeakProbe::new()
        .ok()
        .map(|p| p.median_gflops(9));
    if a.json {
        let v = serde_json::json!({
            "model": model.name(),
            "dims": model.dims(),
            "threads": threads,
            "compile_ms": compile_ms,
            "forward_ms": forward.median,
            "train_step_ms": train.as_ref().map(|t| t.median),
            "peak_bytes": peak,
            "fma_peak_gflops_per_core": fma_peak,
        });
        let mut v = v;
        for (what, p) in &profiles {
            v[format!("profile_{what}")] = profile_json(p);
        }
        outln!("{v}");
    } else {
        outln!(
            "model {} ({}), {threads} thread(s)",
            model.name(),
            fmt_dims(model.dims())
        );
        outln!("compile: {compile_ms:.2} ms");
        outln!("forward: {forward}");
        if let Some(t) = &train {
            outln!("train step: {t}");
        }
        outln!("memory: {peak} bytes (one buffer per value)");
        if let Some(g) = fma_peak {
            outln!("f32x4 FMA peak: {g:.1} GFLOP/s per core, measured now");
        }
        for (what, p) in &profiles {
            outln!("\n{what} {}", p.table().trim_end());
        }
    }
    Ok(())
}

fn profile_json(p: &Profile) -> serde_json::Value {
    let kernels: Vec<serde_json::Value> = p
        .kernels
        .iter()
        .map(|k| {
            serde_json::json!({
                "node": k.node,
                "op": k.op,
                "result": k.result,
                "median_us": k.median_ns as f64 / 1e3,
                "flops": k.flops,
                "gflops": k.gflops(),
            })
        })
        .collect();
    serde_json::json!({
        "runs": p.runs,
        "threads": p.threads,
        "total_us": p.total_ns as f64 / 1e3,
        "kernels": kernels,
    })
}

struct Timing {
    median: f64,
    min: f64,
    max: f64,
    steps: usize,
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "median {:.3} ms, min {:.3} ms, max {:.3} ms over {} steps",
            self.median, self.min, self.max, self.steps
        )
    }
}

/// How `dlc bench` times a step.
struct Window {
    /// Untimed steps first.
    warmup: usize,
    /// Timed steps, at least.
    steps: usize,
    /// And timed steps until this much time has passed.
    min_time: Duration,
}

/// `window.warmup` untimed steps, then timed ones until both `steps` and
/// `min_time` are reached.
fn time_steps(
    window: &Window,
    mut step: impl FnMut() -> Result<(), api::Error>,
) -> Result<Timing, Failure> {
    for _ in 0..window.warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(window.steps);
    let started = Instant::now();
    while times.len() < window.steps || started.elapsed() < window.min_time {
        let t = Instant::now();
        step()?;
        times.push(ms(t.elapsed()));
    }
    times.sort_by(f64::total_cmp);
    Ok(Timing {
        median: times[times.len() / 2],
        min: times[0],
        max: times[times.len() - 1],
        steps: times.len(),
    })
}
