//! Matmul throughput of the JIT: GFLOP/s at 512³ and 1024³ on 1 and 2
//! threads, and at the small-M shapes of the reference workloads (median
//! of several runs after a warm-up). Run with `cargo bench --bench matmul`;
//! `cargo bench --bench matmul -- 64x784x256 t1` times only the given
//! `MxKxN` shapes on the given thread counts.
//!
//! Each figure is also given as a share of the machine's f32x4 FMA peak,
//! measured between the timed runs by a Cranelift loop of independent
//! FMAs ([`PeakProbe`]): on a shared virtual machine the clock a core gets
//! changes by a third within minutes, and a GFLOP/s figure alone cannot
//! tell a slower kernel from a slower moment.

use cranelift_codegen::ir::types::{F32X4, I64};
use cranelift_codegen::ir::{AbiParam, InstBuilder, MemFlagsData, UserFuncName};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module};
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
            // Every eighth run, so that the probe (on this thread while
            // the pool's workers sleep) does not count in the CPU time
            // of most runs.
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

/// The f32x4 FMA peak of one core, as Cranelift code reaches it: a loop
/// of `ACCS` independent chains `acc = acc · x + y`, which Cranelift
/// emits as `vfmadd213ps` with no register copies (the accumulator is the
/// multiplicand it overwrites). Enough chains to cover the FMA latency on
/// two pipes, few enough for the 16 xmm registers with `x` and `y`.
struct PeakProbe {
    func: extern "C" fn(i64, *mut f32),
    /// Owns the code `func` points into.
    _module: JITModule,
}

const ACCS: usize = 12;
/// Loop iterations per probe: about a millisecond at 2–3 GHz.
const PROBE_ITERS: i64 = 200_000;

impl PeakProbe {
    fn new() -> Result<PeakProbe, String> {
        let isa = codegen::host_isa().map_err(|e| e.to_string())?;
        let mut module = JITModule::new(JITBuilder::with_isa(
            isa,
            cranelift_module::default_libcall_names(),
        ));
        let config = module.isa().frontend_config();
        let mut ctx = Context::new();
        let sig = &mut ctx.func.signature;
        sig.params.push(AbiParam::new(I64));
        sig.params.push(AbiParam::new(I64));
        ctx.func.name = UserFuncName::user(0, 0);
        let mut fctx = FunctionBuilderContext::new();
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        let entry = b.create_block();
        let body = b.create_block();
        let exit = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let (iters, out) = (b.block_params(entry)[0], b.block_params(entry)[1]);
        let splat = |b: &mut FunctionBuilder, v: f32| {
            let s = b.ins().f32const(v);
            b.ins().splat(F32X4, s)
        };
        let x = splat(&mut b, 0.999_999);
        let y = splat(&mut b, 1e-6);
        let init: Vec<_> = (0..ACCS).map(|i| splat(&mut b, i as f32).into()).collect();
        let zero = b.ins().iconst(I64, 0);
        let mut args = init;
        args.push(zero.into());
        for _ in 0..ACCS {
            b.append_block_param(body, F32X4);
        }
        b.append_block_param(body, I64);
        b.ins().jump(body, &args);
        b.switch_to_block(body);
        let params = b.block_params(body).to_vec();
        let mut next: Vec<_> = params[..ACCS]
            .iter()
            .map(|&acc| b.ins().fma(acc, x, y).into())
            .collect();
        let i = b.ins().iadd_imm_s(params[ACCS], 1);
        next.push(i.into());
        let more = b.ins().icmp(
            cranelift_codegen::ir::condcodes::IntCC::SignedLessThan,
            i,
            iters,
        );
        let sums: Vec<_> = next[..ACCS].to_vec();
        b.ins().brif(more, body, &next, exit, &sums);
        for _ in 0..ACCS {
            b.append_block_param(exit, F32X4);
        }
        b.switch_to_block(exit);
        // Store every accumulator's first lane, so that none is dead.
        for (j, &acc) in b.block_params(exit).to_vec().iter().enumerate() {
            let lane = b.ins().extractlane(acc, 0);
            b.ins()
                .store(MemFlagsData::new(), lane, out, (4 * j) as i32);
        }
        b.ins().return_(&[]);
        b.seal_all_blocks();
        b.finalize(config);
        let id = module
            .declare_function("peak", Linkage::Local, &ctx.func.signature)
            .map_err(|e| e.to_string())?;
        module
            .define_function(id, &mut ctx)
            .map_err(|e| e.to_string())?;
        module.finalize_definitions().map_err(|e| e.to_string())?;
        let ptr = module.get_finalized_function(id);
        // SAFETY: `ptr` is the code of the function just defined, whose
        // signature is `(i64, i64)` in the host's default calling
        // convention, i.e. `extern "C" fn(i64, *mut f32)`; it stays mapped
        // as long as `_module`, which the probe owns.
        let func = unsafe { std::mem::transmute::<*const u8, extern "C" fn(i64, *mut f32)>(ptr) };
        Ok(PeakProbe {
            func,
            _module: module,
        })
    }

    /// GFLOP/s of one run of the loop on this thread.
    fn gflops(&self) -> f64 {
        let mut out = [0f32; ACCS];
        let t = Instant::now();
        (self.func)(PROBE_ITERS, out.as_mut_ptr());
        let s = t.elapsed().as_secs_f64();
        std::hint::black_box(out);
        (PROBE_ITERS as usize * ACCS * 8) as f64 / s / 1e9
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
