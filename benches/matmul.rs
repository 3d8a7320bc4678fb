//! Matmul throughput of the JIT: GFLOP/s at 512³ and 1024³ on 1 and 2
//! threads, and at the small-M shapes of the reference workloads (median
//! of several runs after a warm-up). Run with `cargo bench --bench matmul`;
//! `cargo bench --bench matmul -- 64x784x256 t1` times only the given
//! `MxKxN` shapes on the given thread counts.
//!
//! Each figure is also given as a share of the machine's f32x4 FMA peak,
//! measured between the timed runs by a Cranelift loop of independent
//! FMAs (`dlc::codegen::peak`): on a shared virtual machine the clock a
//! core gets changes by a third within minutes, and a GFLOP/s figure alone
//! cannot tell a slower kernel from a slower moment.

use dlc::codegen::peak::PeakProbe;
use dlc::codegen::{self, JitOptions};
use dlc::ir::{Graph, Op, OutputKind, TensorType};
use dlc::tensor::Tensor;
use std::collections::BTreeMap;
use std::time::Instant;

/// Products of the workloads (per batch element where batched): mlp's first
/// layer, the transformer's projections, lenet's conv1 and conv2 as im2col
/// (one image).
const DEFAULT_SHAPES: [(usize, usize, usize); 7] = [
    (512, 512, 512),
    (1024, 1024, 1024),
    (64, 784, 256),
    (512, 128, 512),
    (512, 512, 128),
    (6, 25, 784),
    (16, 150, 100),
];

fn main() {
    let mut shapes = Vec::new();
    let mut threads = Vec::new();
    for a in std::env::args().skip(1) {
        if a.starts_with("--") {
            continue;
        }
        if let Some(t) = a.strip_prefix('t').and_then(|t| t.parse().ok()) {
            threads.push(t);
            continue;
        }
        let dims: Vec<usize> = a.split('x').filter_map(|d| d.parse().ok()).collect();
        match dims[..] {
            [m, k, n] if m > 0 && k > 0 && n > 0 => shapes.push((m, k, n)),
            _ => eprintln!("ignoring `{a}`: expected MxKxN or tN"),
        }
    }
    if shapes.is_empty() {
        shapes = DEFAULT_SHAPES.to_vec();
    }
    if threads.is_empty() {
        threads = vec![1, 2];
    }
    let probe = match PeakProbe::new() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("peak probe: {e}");
            return;
        }
    };
    for (m, k, n) in shapes {
        for &t in &threads {
            if let Err(e) = bench(m, k, n, t, &probe) {
                eprintln!("matmul {m}x{k}x{n}: {e}");
                return;
            }
        }
    }
}

fn bench(m: usize, k: usize, n: usize, threads: usize, probe: &PeakProbe) -> Result<(), String> {
    let mut g = Graph::new();
    let a = g.add_leaf(
        Op::Input { name: "a".into() },
        TensorType::f32(vec![m, k]),
        None,
    );
    let b = g.add_leaf(
        Op::Input { name: "b".into() },
        TensorType::f32(vec![k, n]),
        None,
    );
    let c = g
        .add(Op::MatMul, &[a, b], None)
        .map_err(|e| e.to_string())?;
    g.push_output("c", OutputKind::Output, c);
    let data = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    };
    let mut feeds = BTreeMap::new();
    feeds.insert("a".to_string(), Tensor::f32(vec![m, k], data(m * k)));
    feeds.insert("b".to_string(), Tensor::f32(vec![k, n], data(k * n)));
    let model = codegen::compile(&g, &JitOptions { threads }).map_err(|e| e.to_string())?;
    let flops = 2.0 * (m * k * n) as f64;
    // About half a second of work, at least 8 timed runs.
    let reps = ((20e9 / flops) as usize).clamp(8, 2000);
    let mut times = Vec::new();
    let mut peaks = Vec::new();
    let mut cpu0 = 0.0;
    let mut out = BTreeMap::new();
    let layers = [&feeds];
    for i in 0..reps + 2 {
        if i == 2 {
            cpu0 = cpu_seconds();
        }
        let t = Instant::now();
        model
            .run_into(&layers, &mut out)
            .map_err(|e| e.to_string())?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
            // Every eighth run, on this thread between two runs, so that
            // the probe's own CPU time stays a small part of the CPU time
            // measured.
            if i % 8 == 2 {
                peaks.push(probe.gflops());
            }
        }
    }
    let cpu = (cpu_seconds() - cpu0) / reps as f64;
    times.sort_by(f64::total_cmp);
    peaks.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let peak = peaks[peaks.len() / 2] * threads as f64;
    println!(
        "matmul {m}x{k}x{n} threads={threads}: {:.3} ms median, {:.1} GFLOP/s (best {:.1}) \
         = {:.0}% of the f32x4 FMA peak ({peak:.1} GFLOP/s on {threads} core(s)); \
         {:.1} GFLOP per CPU-second",
        med * 1e3,
        flops / med / 1e9,
        flops / times[0] / 1e9,
        100.0 * flops / med / 1e9 / peak,
        flops / cpu / 1e9
    );
    Ok(())
}

/// CPU time of this process (all threads) from /proc, so that a loaded
/// machine can be told apart from a slow kernel; 0 where unavailable.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 12th and 13th of them, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}
