//! Forward pass and training step of the reference workloads
//! (../shared/bench/workloads/README.md sizes) through the library API.
//!
//! `DLC_BACKEND=interp|jit` picks the backend (default: the library's
//! `Backend::default()`, the JIT), `DLC_THREADS` the worker threads
//! (default: all cores).
//! Each sample is one call; setup and one warm-up call (where the backend
//! prepares its plan) stay outside the timing. The interpreter takes
//! seconds per step on the larger models, so keep runs short with divan's
//! flags, e.g. `cargo bench --bench workloads -- --sample-count 3 forward`.
//! `benches/compare.py` puts the same figures next to JAX/XLA.

use dlc::api::{random_inputs, Backend, Compiler, Session, TensorMap};
use dlc::model::Optimizer;
use std::path::Path;

fn main() {
    divan::main();
}

struct Workload {
    name: &'static str,
    /// Under lang/examples.
    file: &'static str,
    dims: &'static [(&'static str, usize)],
}

const fn w(
    name: &'static str,
    file: &'static str,
    dims: &'static [(&'static str, usize)],
) -> Workload {
    Workload { name, file, dims }
}

const WORKLOADS: &[Workload] = &[
    w("mlp", "mlp.dl", &[("N", 64)]),
    w("lenet", "lenet.dl", &[("N", 32)]),
    w("vgg", "vgg.dl", &[("N", 16)]),
    w("lstm", "lstm.dl", &[("N", 16), ("T", 32)]),
    w("gru", "gru.dl", &[("N", 16), ("T", 32)]),
    w("transformer", "transformer.dl", &[("N", 8), ("T", 64)]),
    w("gemm512", "gemm.dl", &[("M", 512), ("K", 512), ("P", 512)]),
    w(
        "gemm1024",
        "gemm.dl",
        &[("M", 1024), ("K", 1024), ("P", 1024)],
    ),
];

const TRAINABLE: &[&str] = &["mlp", "lenet", "vgg", "lstm", "gru", "transformer"];
const ALL: &[&str] = &[
    "mlp",
    "lenet",
    "vgg",
    "lstm",
    "gru",
    "transformer",
    "gemm512",
    "gemm1024",
];

fn backend() -> Backend {
    match std::env::var("DLC_BACKEND") {
        Ok(s) => s.parse().unwrap_or_else(|e| panic!("DLC_BACKEND: {e}")),
        Err(_) => Backend::default(),
    }
}

fn compiler(name: &str) -> (Compiler, std::path::PathBuf) {
    let Some(wl) = WORKLOADS.iter().find(|w| w.name == name) else {
        panic!("no workload named `{name}`");
    };
    let mut c = Compiler::new()
        .backend(backend())
        .dims(wl.dims.iter().map(|(k, v)| (k.to_string(), *v)));
    if let Some(t) = std::env::var("DLC_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
    {
        c = c.threads(t);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("lang/examples")
        .join(wl.file);
    (c, path)
}

/// A session on seeded parameters and inputs, trained like anchors.py
/// (sgd, lr 0.01, momentum 0.9) so both sides do the same work.
fn session(name: &str) -> (Session, TensorMap) {
    let (c, path) = compiler(name);
    let model = c
        .compile_file(&path)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let inputs = random_inputs(&model, 1);
    let mut s = model.session_with_seed(0);
    s.set_optimizer(
        Optimizer::Sgd {
            lr: 0.01,
            momentum: 0.9,
        },
        None,
    );
    (s, inputs)
}

/// Source to a runnable forward plan: elaboration, then the backend's
/// preparation (which a session otherwise does on its first run).
#[divan::bench(args = ALL, sample_count = 10, sample_size = 1)]
fn compile(bencher: divan::Bencher, name: &str) {
    let (c, path) = compiler(name);
    bencher.bench_local(|| {
        let model = c
            .compile_file(&path)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        model
            .backend()
            .prepare(model.graph(), &model.exec_options())
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    });
}

#[divan::bench(args = ALL, sample_count = 10, sample_size = 1)]
fn forward(bencher: divan::Bencher, name: &str) {
    let (mut s, inputs) = session(name);
    s.run(&inputs)
        .unwrap_or_else(|e| panic!("{name} forward: {e}"));
    bencher.bench_local(|| {
        s.run(&inputs)
            .unwrap_or_else(|e| panic!("{name} forward: {e}"))
    });
}

#[divan::bench(args = TRAINABLE, sample_count = 10, sample_size = 1)]
fn train_step(bencher: divan::Bencher, name: &str) {
    let (mut s, inputs) = session(name);
    s.train_step(&inputs)
        .unwrap_or_else(|e| panic!("{name} train step: {e}"));
    bencher.bench_local(|| {
        s.train_step(&inputs)
            .unwrap_or_else(|e| panic!("{name} train step: {e}"))
    });
}
