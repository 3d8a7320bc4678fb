//! Matmul throughput of the JIT: GFLOP/s at 512³ and 1024³ on 1 and 2
//! threads (median of several runs after a warm-up). Run with
//! `cargo bench --bench matmul`.

use dlc::codegen::{self, JitOptions};
use dlc::ir::{Graph, Op, OutputKind, TensorType};
use dlc::tensor::Tensor;
use std::collections::BTreeMap;
use std::time::Instant;

fn main() {
    for n in [512usize, 1024] {
        let mut g = Graph::new();
        let a = g.add_leaf(
            Op::Input { name: "a".into() },
            TensorType::f32(vec![n, n]),
            None,
        );
        let b = g.add_leaf(
            Op::Input { name: "b".into() },
            TensorType::f32(vec![n, n]),
            None,
        );
        let c = match g.add(Op::MatMul, &[a, b], None) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("matmul graph: {e}");
                return;
            }
        };
        g.push_output("c", OutputKind::Output, c);
        let data: Vec<f32> = (0..n * n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let mut feeds = BTreeMap::new();
        feeds.insert("a".to_string(), Tensor::f32(vec![n, n], data.clone()));
        feeds.insert("b".to_string(), Tensor::f32(vec![n, n], data));
        for threads in [1usize, 2] {
            let m = match codegen::compile(&g, &JitOptions { threads }) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("compile: {e}");
                    return;
                }
            };
            let reps = if n <= 512 { 30 } else { 8 };
            let mut times = Vec::new();
            let mut cpu0 = 0.0;
            for i in 0..reps + 2 {
                if i == 2 {
                    cpu0 = cpu_seconds();
                }
                let t = Instant::now();
                if let Err(e) = m.run(&feeds) {
                    eprintln!("run: {e}");
                    return;
                }
                if i >= 2 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            let cpu = (cpu_seconds() - cpu0) / reps as f64;
            times.sort_by(f64::total_cmp);
            let med = times[times.len() / 2];
            let flops = 2.0 * (n * n * n) as f64;
            println!(
                "matmul {n}x{n}x{n} threads={threads}: {:.2} ms median, {:.1} GFLOP/s (best {:.1}); \
                 {:.1} GFLOP per CPU-second",
                med * 1e3,
                flops / med / 1e9,
                flops / times[0] / 1e9,
                flops / cpu / 1e9
            );
        }
    }
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
