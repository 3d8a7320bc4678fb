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
        let a = g.add_leaf(Op::Input { name: "a".into() }, TensorType::f32(vec![n, n]), None);
        let b = g.add_leaf(Op::Input { name: "b".into() }, TensorType::f32(vec![n, n]), None);
        let c = match g.add(Op::MatMul, &[a, b], None) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("matmul graph: {e}");
                return;
            }
        };
        g.push_output("c", OutputKind::Output, c);
        let data: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
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
            for i in 0..reps + 2 {
                let t = Instant::now();
                if let Err(e) = m.run(&feeds) {
                    eprintln!("run: {e}");
                    return;
                }
                if i >= 2 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            let med = times[times.len() / 2];
            let flops = 2.0 * (n * n * n) as f64;
            println!(
                "matmul {n}x{n}x{n} threads={threads}: {:.2} ms median, {:.1} GFLOP/s (best {:.1})",
                med * 1e3,
                flops / med / 1e9,
                flops / times[0] / 1e9
            );
        }
    }
}
