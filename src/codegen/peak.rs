//! The machine's f32x4 FMA peak as Cranelift code reaches it: the ceiling
//! our kernels are measured against (`cargo bench --bench matmul`,
//! `dlc bench --json`).
//!
//! The probe is a loop of [`CHAINS`] independent chains `acc = acc · x + y`.
//! Cranelift emits each as one `vfmadd213ps` with no register copy (the
//! accumulator is the multiplicand it overwrites), and twelve chains cover
//! the FMA latency on two pipes while fitting the 16 xmm registers with
//! `x` and `y`. On a shared virtual machine the clock a core gets changes
//! by a third within minutes, so a kernel's GFLOP/s means something only
//! next to a peak measured in the same minutes.

use super::{host_isa, CodegenError};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32X4, I64};
use cranelift_codegen::ir::{AbiParam, BlockArg, InstBuilder, MemFlagsData, UserFuncName};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module};
use std::time::Instant;

/// Independent FMA chains of the loop.
const CHAINS: usize = 12;
/// The multiplier and addend of every chain: the accumulators stay near
/// their start, far from overflow and subnormals.
const X: f32 = 0.999_999;
const Y: f32 = 1e-6;
/// Loop iterations of one [`PeakProbe::gflops`] call: about a millisecond
/// at 2–3 GHz.
const ITERS: i64 = 200_000;

/// `fn(iterations, out)`: runs the loop and stores each chain's first lane
/// to `out[0..CHAINS]`.
type ProbeFn = extern "C" fn(i64, *mut f32);

/// The compiled probe loop.
pub struct PeakProbe {
    func: ProbeFn,
    /// Owns the code `func` points into.
    _module: JITModule,
}

impl PeakProbe {
    /// Compile the probe for the host.
    pub fn new() -> Result<PeakProbe, CodegenError> {
        let isa = host_isa()?;
        let config = isa.frontend_config();
        let mut module = JITModule::new(JITBuilder::with_isa(
            isa,
            cranelift_module::default_libcall_names(),
        ));
        let mut ctx = Context::new();
        ctx.func.signature.params.push(AbiParam::new(I64));
        ctx.func.signature.params.push(AbiParam::new(I64));
        ctx.func.name = UserFuncName::user(0, 0);
        let mut fctx = FunctionBuilderContext::new();
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        let (entry, body, exit) = (b.create_block(), b.create_block(), b.create_block());
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let (iters, out) = (b.block_params(entry)[0], b.block_params(entry)[1]);
        let splat = |b: &mut FunctionBuilder, v: f32| {
            let s = b.ins().f32const(v);
            b.ins().splat(F32X4, s)
        };
        let (x, y) = (splat(&mut b, X), splat(&mut b, Y));
        // Chain j starts at j.
        let mut start: Vec<BlockArg> = (0..CHAINS)
            .map(|j| splat(&mut b, j as f32).into())
            .collect();
        start.push(b.ins().iconst(I64, 0).into());
        for _ in 0..CHAINS {
            b.append_block_param(body, F32X4);
            b.append_block_param(exit, F32X4);
        }
        b.append_block_param(body, I64);
        b.ins().jump(body, &start);
        b.switch_to_block(body);
        let params = b.block_params(body).to_vec();
        let accs: Vec<BlockArg> = params[..CHAINS]
            .iter()
            .map(|&acc| b.ins().fma(acc, x, y).into())
            .collect();
        let i = b.ins().iadd_imm_s(params[CHAINS], 1);
        let more = b.ins().icmp(IntCC::SignedLessThan, i, iters);
        let mut next = accs.clone();
        next.push(i.into());
        b.ins().brif(more, body, &next, exit, &accs);
        b.switch_to_block(exit);
        for (j, acc) in b.block_params(exit).to_vec().into_iter().enumerate() {
            let lane = b.ins().extractlane(acc, 0);
            b.ins()
                .store(MemFlagsData::new(), lane, out, (4 * j) as i32);
        }
        b.ins().return_(&[]);
        b.seal_all_blocks();
        b.finalize(config);
        let cranelift = |e: String| CodegenError::Isa(format!("the FMA peak probe: {e}"));
        let id = module
            .declare_function("fma_peak", Linkage::Local, &ctx.func.signature)
            .map_err(|e| cranelift(e.to_string()))?;
        module
            .define_function(id, &mut ctx)
            .map_err(|e| cranelift(e.to_string()))?;
        module
            .finalize_definitions()
            .map_err(|e| cranelift(e.to_string()))?;
        let ptr = module.get_finalized_function(id);
        // SAFETY: `ptr` is the code of the function just defined and
        // finalized, whose signature is `(i64, i64)` in the host's default
        // calling convention, that is `extern "C" fn(i64, *mut f32)`; it
        // stays mapped as long as `_module`, which the probe owns.
        let func = unsafe { std::mem::transmute::<*const u8, ProbeFn>(ptr) };
        Ok(PeakProbe {
            func,
            _module: module,
        })
    }

    /// Run the loop `iters` times (at least once); each chain's first lane.
    fn run(&self, iters: i64) -> [f32; CHAINS] {
        let mut out = [0f32; CHAINS];
        (self.func)(iters.max(1), out.as_mut_ptr());
        out
    }

    /// GFLOP/s of one run of the loop on the calling thread (a core's
    /// peak: a multiply-add counts two, four lanes per FMA).
    pub fn gflops(&self) -> f64 {
        let t = Instant::now();
        std::hint::black_box(self.run(ITERS));
        let s = t.elapsed().as_secs_f64().max(1e-9);
        (ITERS as usize * CHAINS * 8) as f64 / s / 1e9
    }

    /// Median GFLOP/s of `runs` runs.
    pub fn median_gflops(&self, runs: usize) -> f64 {
        let mut g: Vec<f64> = (0..runs.max(1)).map(|_| self.gflops()).collect();
        g.sort_by(f64::total_cmp);
        g[g.len() / 2]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop computes what it claims, step for step: each chain is the
    /// fused recurrence from its start, so the timed work is really done.
    #[test]
    fn probe_runs_every_chain_for_every_iteration() {
        let probe = PeakProbe::new().expect("compiles");
        for iters in [1i64, 2, 7, 1000] {
            let got = probe.run(iters);
            for (j, &g) in got.iter().enumerate() {
                let mut acc = j as f32;
                for _ in 0..iters {
                    acc = acc.mul_add(X, Y);
                }
                assert_eq!(g.to_bits(), acc.to_bits(), "chain {j} after {iters}");
            }
        }
        let g = probe.gflops();
        assert!(g.is_finite() && g > 0.0, "{g}");
    }
}
