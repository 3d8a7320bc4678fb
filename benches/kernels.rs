//! The heavy kernels of the reference workloads, one op at a time, at the
//! workloads' sizes: the convolutions of lenet and vgg, the LSTM and GRU
//! sequences (32 steps; a step is a 32nd of the figure), and the
//! transformer's causal attention.
//!
//! Each case is a model of one op whose operands are all parameters, so
//! that its gradient graph holds every gradient kernel of the op (data,
//! weights, bias); its loss is `sum(y * y)`, which gives the op an upstream
//! gradient that is not a constant. `forward` times the op alone;
//! `gradients` the forward and backward pass. Throughput is in FLOPs
//! counted as in `dlc bench --profile` (`ir::cost`), so `Gitem/s` reads as
//! GFLOP/s.
//!
//! Run with `cargo bench --bench kernels` (`-- conv` for a subset);
//! `DLC_THREADS` sets the worker threads (default: all cores).

use dlc::api::{Backend, Compiler, Session, TensorMap};
use dlc::ir::cost::flops;
use dlc::ir::graph::Graph;
use dlc::ir::TensorType;

fn main() {
    divan::main();
}

struct Kernel {
    name: &'static str,
    /// The op, as statements of a model (params and `y = …`).
    body: &'static str,
}

const KERNELS: &[Kernel] = &[
    Kernel {
        name: "conv_lenet1",
        body: "param x: f32[32, 1, 28, 28] = normal(1.0)
               param w: f32[6, 1, 5, 5] = glorot_uniform
               y = conv(x, w, pad=2)",
    },
    Kernel {
        name: "conv_lenet2",
        body: "param x: f32[32, 6, 14, 14] = normal(1.0)
               param w: f32[16, 6, 5, 5] = glorot_uniform
               y = conv(x, w)",
    },
    Kernel {
        name: "conv_vgg_3x32",
        body: "param x: f32[16, 3, 32, 32] = normal(1.0)
               param w: f32[32, 3, 3, 3] = glorot_uniform
               y = conv(x, w, pad=1)",
    },
    Kernel {
        name: "conv_vgg_32x32",
        body: "param x: f32[16, 32, 32, 32] = normal(1.0)
               param w: f32[32, 32, 3, 3] = glorot_uniform
               y = conv(x, w, pad=1)",
    },
    Kernel {
        name: "conv_vgg_64x64",
        body: "param x: f32[16, 64, 16, 16] = normal(1.0)
               param w: f32[64, 64, 3, 3] = glorot_uniform
               y = conv(x, w, pad=1)",
    },
    Kernel {
        name: "lstm_seq",
        body: "param x: f32[16, 32, 64] = normal(1.0)
               param w_x: f32[64, 512] = glorot_uniform
               param w_h: f32[128, 512] = glorot_uniform
               param b: f32[512]
               y = lstm_seq(x, w_x, w_h, b)",
    },
    Kernel {
        name: "gru_seq",
        body: "param x: f32[16, 32, 64] = normal(1.0)
               param w_x: f32[64, 384] = glorot_uniform
               param w_h: f32[128, 384] = glorot_uniform
               param b: f32[384]
               y = gru_seq(x, w_x, w_h, b)",
    },
    Kernel {
        name: "attention_causal",
        body: "param q: f32[8, 4, 64, 16] = normal(1.0)
               param k: f32[8, 4, 64, 16] = normal(1.0)
               param v: f32[8, 4, 64, 16] = normal(1.0)
               y = attention(q, k, v, causal=true)",
    },
];

const NAMES: &[&str] = &[
    "conv_lenet1",
    "conv_lenet2",
    "conv_vgg_3x32",
    "conv_vgg_32x32",
    "conv_vgg_64x64",
    "lstm_seq",
    "gru_seq",
    "attention_causal",
];

fn source(name: &str) -> String {
    let Some(k) = KERNELS.iter().find(|k| k.name == name) else {
        panic!("no kernel case named `{name}`");
    };
    format!(
        "model {name} {{\n{}\n    output y\n    loss = sum(y * y)\n}}\n",
        k.body
    )
}

/// A JIT session on seeded parameters; the model has no inputs.
fn session(name: &str) -> Session {
    let mut c = Compiler::new().backend(Backend::Jit);
    if let Some(t) = std::env::var("DLC_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
    {
        c = c.threads(t);
    }
    let model = c
        .compile_source(name, &source(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    model.session_with_seed(0)
}

/// FLOPs of one run of `g`, as the profiles count them.
fn graph_flops(g: &Graph) -> u64 {
    g.topo_order()
        .into_iter()
        .filter_map(|n| {
            let ins: Vec<&TensorType> = g.inputs(n).into_iter().map(|v| g.ty(v)).collect();
            let outs: Vec<&TensorType> = g.node(n).outputs.iter().collect();
            flops(&g.node(n).op, &ins, &outs)
        })
        .sum()
}

#[divan::bench(args = NAMES, sample_count = 20, sample_size = 1)]
fn forward(bencher: divan::Bencher, name: &str) {
    let mut s = session(name);
    let inputs = TensorMap::new();
    let count = graph_flops(s.model().graph());
    s.run(&inputs)
        .unwrap_or_else(|e| panic!("{name} forward: {e}"));
    bencher
        .counter(divan::counter::ItemsCount::new(count))
        .bench_local(|| {
            s.run(&inputs)
                .unwrap_or_else(|e| panic!("{name} forward: {e}"))
        });
}

#[divan::bench(args = NAMES, sample_count = 20, sample_size = 1)]
fn gradients(bencher: divan::Bencher, name: &str) {
    let mut s = session(name);
    let inputs = TensorMap::new();
    let graph = s
        .model()
        .gradient_graph()
        .unwrap_or_else(|e| panic!("{name} gradients: {e}"));
    let count = graph_flops(graph);
    s.gradients(&inputs)
        .unwrap_or_else(|e| panic!("{name} gradients: {e}"));
    bencher
        .counter(divan::counter::ItemsCount::new(count))
        .bench_local(|| {
            s.gradients(&inputs)
                .unwrap_or_else(|e| panic!("{name} gradients: {e}"))
        });
}
