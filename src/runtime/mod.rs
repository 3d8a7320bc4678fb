//! Running compiled graphs: the arena, the pointer table of fed tensors, the
//! thread pool, and the fallback to the interpreter for ops without a
//! compiled kernel.
//!
//! **Architecture invariant:** the runtime owns all memory JIT code touches.
//! Kernels receive the arena base, the pointer table and a range of work
//! units; they never allocate.

pub mod pool;

use crate::codegen::emit::Loc;
use crate::interp::{eval_op, Array, InterpError, Precision};
use crate::ir::{Op, TensorType};
use crate::tensor::{numel, Data, Tensor};
use cranelift_jit::JITModule;
use pool::{KernelFn, Pool};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// A failure while running a compiled graph; each says what is wrong and
/// where, with the interpreter's wording for the same problem.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A bad feed, a label or id out of range, or a failure of an op run by
    /// the interpreter.
    #[error(transparent)]
    Value(#[from] InterpError),
    #[error("kernel of node %{node} ({op}) failed with code {code}")]
    Kernel {
        node: usize,
        op: &'static str,
        code: i64,
    },
}

/// How a kernel's non-zero result code is explained.
#[derive(Clone, Debug)]
pub(crate) enum StepCheck {
    None,
    /// Code = flat index + 1 of an id outside `[0, rows)`.
    Id {
        op: &'static str,
        ids: Loc,
        shape: Vec<usize>,
        rows: usize,
    },
    /// Code = row + 1 of a label outside `[0, classes)`.
    Label {
        op: &'static str,
        labels: Loc,
        classes: usize,
    },
}

pub(crate) struct JitStep {
    /// Address of the finalized function (set once the module is final).
    pub func: Option<usize>,
    pub units: usize,
    pub grain: usize,
    pub check: StepCheck,
}

pub(crate) enum Exec {
    Jit(Vec<JitStep>),
    /// Run by the interpreter: operands and results with their places.
    Host {
        op: Op,
        ins: Vec<(Loc, TensorType)>,
        outs: Vec<(Loc, TensorType)>,
    },
}

pub(crate) struct ExecKernel {
    pub node: usize,
    pub op: &'static str,
    pub exec: Exec,
}

/// Keeps the JIT code alive as long as the model.
struct Code(Option<JITModule>);

// SAFETY: after `finalize_definitions` the module is never used again except
// to free its memory on drop; the code it holds is immutable and callable
// from any thread.
unsafe impl Send for Code {}
// SAFETY: as above, no method of the module is called through `&Code`.
unsafe impl Sync for Code {}

impl Drop for Code {
    fn drop(&mut self) {
        if let Some(m) = self.0.take() {
            // SAFETY: the model owning this code is being dropped, so no
            // kernel is running and no function pointer outlives it.
            unsafe { m.free_memory() };
        }
    }
}

/// Arena memory in 64-byte lines, zeroed. Allocated through `calloc` (a
/// `vec!` of zero `u128`), which takes fresh pages from the OS that stay
/// untouched until a kernel first writes them: a large arena costs no time
/// at compile time. The first line starts at the first 64-byte boundary.
struct Lines {
    buf: Vec<u128>,
    lines: usize,
}

impl Lines {
    /// `None` where the memory cannot be had: an arena larger than the
    /// machine is a user's model, not a bug, and must not abort the process
    /// as `vec!` would.
    fn zeroed(bytes: usize) -> Option<Lines> {
        let lines = bytes.div_ceil(64);
        // Three spare u128s cover the shift from 16- to 64-byte alignment.
        let len = lines.checked_mul(4)?.checked_add(3)?;
        let layout = std::alloc::Layout::array::<u128>(len).ok()?;
        // SAFETY: `layout` has a non-zero size (len ≥ 3); a null result is
        // handled. The memory comes from the global allocator with exactly
        // the layout of a `Vec<u128>` of capacity `len`, and zeroed memory
        // is `len` valid `u128`s, so the Vec may own it.
        let buf = unsafe {
            let p = std::alloc::alloc_zeroed(layout) as *mut u128;
            if p.is_null() {
                return None;
            }
            Vec::from_raw_parts(p, len, len)
        };
        Some(Lines { buf, lines })
    }

    fn len(&self) -> usize {
        self.lines
    }

    fn as_mut_ptr(&mut self) -> *mut u128 {
        let p = self.buf.as_mut_ptr();
        // 16-byte units up to the next 64-byte boundary.
        p.wrapping_add(((p as usize).wrapping_neg() & 63) / 16)
    }
}

struct Arena {
    lines: Lines,
    pool: Pool,
}

/// A compiled graph, ready to run. Several can coexist; one model runs one
/// call at a time (concurrent calls wait for the arena).
pub struct JitModel {
    kernels: Vec<ExecKernel>,
    feeds: Vec<(String, &'static str, TensorType)>,
    outputs: Vec<(String, Loc, TensorType)>,
    arena: Mutex<Arena>,
    threads: usize,
    // Dropped last: kernels point into it.
    _code: Code,
}

impl JitModel {
    pub(crate) fn new(
        module: JITModule,
        kernels: Vec<ExecKernel>,
        feeds: Vec<(String, &'static str, TensorType)>,
        outputs: Vec<(String, Loc, TensorType)>,
        arena_bytes: usize,
        threads: usize,
    ) -> Option<JitModel> {
        let threads = threads.max(1);
        let lines = Lines::zeroed(arena_bytes)?;
        Some(JitModel {
            kernels,
            feeds,
            outputs,
            arena: Mutex::new(Arena {
                lines,
                pool: Pool::new(threads),
            }),
            threads,
            _code: Code(Some(module)),
        })
    }

    /// Kernels run by the interpreter because no compiled kernel exists.
    pub fn interpreted_kernels(&self) -> usize {
        self.kernels
            .iter()
            .filter(|k| matches!(k.exec, Exec::Host { .. }))
            .count()
    }

    /// Names of the ops run by the interpreter, one per kernel.
    pub fn interpreted_ops(&self) -> Vec<&'static str> {
        self.kernels
            .iter()
            .filter(|k| matches!(k.exec, Exec::Host { .. }))
            .map(|k| k.op)
            .collect()
    }

    /// Number of kernels (one per non-leaf node today).
    pub fn kernel_count(&self) -> usize {
        self.kernels.len()
    }

    /// Number of compiled steps (functions) a run calls.
    pub fn step_count(&self) -> usize {
        self.kernels
            .iter()
            .map(|k| match &k.exec {
                Exec::Jit(steps) => steps.len(),
                Exec::Host { .. } => 0,
            })
            .sum()
    }

    /// Bytes of the arena.
    pub fn arena_bytes(&self) -> usize {
        self.arena
            .lock()
            .map(|a| a.lines.len() * 64)
            .unwrap_or_else(|e| e.into_inner().lines.len() * 64)
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Fill every 32-bit word of the arena with `bits` (a NaN in tests):
    /// no kernel may read scratch or a buffer it has not written first, so
    /// results must not change. Zeroed fresh memory would hide such reads.
    #[doc(hidden)]
    pub fn poison_arena(&self, bits: u32) {
        let word = u128::from(bits);
        let pattern = word | word << 32 | word << 64 | word << 96;
        let mut guard = self.arena.lock().unwrap_or_else(|e| e.into_inner());
        guard.lines.buf.fill(pattern);
    }

    /// Run the graph: every input/param/state leaf fed by name; returns every
    /// graph output by name (as `interp::run_f32`).
    pub fn run(
        &self,
        feeds: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        let mut out = BTreeMap::new();
        self.run_into(&[feeds], &mut out)?;
        Ok(out)
    }

    /// Run the graph with leaves looked up in `layers` (a later map wins
    /// over an earlier one), writing every output into `out`. An entry of
    /// `out` with the output's dtype and shape is overwritten in place, so
    /// a caller that keeps `out` between calls allocates nothing; callers
    /// can feed parameters without first copying them into one map.
    pub fn run_into(
        &self,
        layers: &[&BTreeMap<String, Tensor>],
        out: &mut BTreeMap<String, Tensor>,
    ) -> Result<(), RuntimeError> {
        self.execute(layers, out, None)
    }

    /// As [`JitModel::run_into`], adding each kernel's wall time (ns) to
    /// `nanos[k]`, in the order of [`JitModel::kernel_nodes`]. Timing reads
    /// the clock twice per kernel and changes no result.
    pub fn run_profiled(
        &self,
        layers: &[&BTreeMap<String, Tensor>],
        out: &mut BTreeMap<String, Tensor>,
        nanos: &mut [u64],
    ) -> Result<(), RuntimeError> {
        self.execute(layers, out, Some(nanos))
    }

    /// The graph node and op name of each kernel, in execution order.
    pub fn kernel_nodes(&self) -> Vec<(usize, &'static str)> {
        self.kernels.iter().map(|k| (k.node, k.op)).collect()
    }

    fn execute(
        &self,
        layers: &[&BTreeMap<String, Tensor>],
        out: &mut BTreeMap<String, Tensor>,
        mut nanos: Option<&mut [u64]>,
    ) -> Result<(), RuntimeError> {
        let lookup = |name: &str| layers.iter().rev().find_map(|m| m.get(name));
        let mut fed: Vec<&Tensor> = Vec::with_capacity(self.feeds.len());
        let mut ptrs: Vec<*const u8> = Vec::with_capacity(self.feeds.len());
        for (name, kind, ty) in &self.feeds {
            let t = check_feed(lookup(name), name, kind, ty)?;
            fed.push(t);
            ptrs.push(match &t.data {
                Data::F32(v) => v.as_ptr() as *const u8,
                Data::I32(v) => v.as_ptr() as *const u8,
            });
        }
        let mut guard = self.arena.lock().unwrap_or_else(|e| e.into_inner());
        let arena = &mut *guard;
        let base = arena.lines.as_mut_ptr() as *mut u8;
        let arena_len = arena.lines.len() * 64;
        for (ki, k) in self.kernels.iter().enumerate() {
            let started = nanos.is_some().then(std::time::Instant::now);
            match &k.exec {
                Exec::Jit(steps) => {
                    for s in steps {
                        let Some(addr) = s.func else { continue };
                        if s.units == 0 {
                            continue;
                        }
                        // SAFETY: `addr` is a finalized kernel of this model's
                        // module (alive as long as `self`) with the
                        // `KernelFn` signature it was declared with.
                        let f: KernelFn = unsafe { std::mem::transmute::<usize, KernelFn>(addr) };
                        // SAFETY: codegen specialised the kernel to the
                        // checked feed shapes and to this arena's plan, so
                        // every access is inside the arena or a fed tensor,
                        // both alive and unaliased for the call (the arena
                        // is locked, feeds are borrowed).
                        let code =
                            unsafe { arena.pool.run(f, base, ptrs.as_ptr(), s.units, s.grain) };
                        if code != 0 {
                            return Err(explain(k, &s.check, code, base, &ptrs));
                        }
                    }
                }
                Exec::Host { op, ins, outs } => {
                    let arrays: Vec<Array> = ins
                        .iter()
                        .map(|(loc, ty)| {
                            let mut t = Tensor::zeros(ty.dtype, ty.shape.clone());
                            read_into(*loc, ty, base, arena_len, &fed, &mut t);
                            Array::from(&t)
                        })
                        .collect();
                    let refs: Vec<&Array> = arrays.iter().collect();
                    let res = eval_op(op, &refs, Precision::F32)?;
                    for ((loc, ty), a) in outs.iter().zip(res) {
                        write(*loc, ty, &a.to_tensor(), base, arena_len);
                    }
                }
            }
            if let (Some(t0), Some(ns)) = (started, nanos.as_deref_mut()) {
                if let Some(slot) = ns.get_mut(ki) {
                    *slot += t0.elapsed().as_nanos() as u64;
                }
            }
        }
        for (name, loc, ty) in &self.outputs {
            match out.get_mut(name) {
                Some(t)
                    if t.dtype() == ty.dtype
                        && t.shape == ty.shape
                        && data_len(t) == numel(&ty.shape) =>
                {
                    read_into(*loc, ty, base, arena_len, &fed, t)
                }
                _ => {
                    let mut t = Tensor::zeros(ty.dtype, ty.shape.clone());
                    read_into(*loc, ty, base, arena_len, &fed, &mut t);
                    out.insert(name.clone(), t);
                }
            }
        }
        Ok(())
    }
}

fn data_len(t: &Tensor) -> usize {
    match &t.data {
        Data::F32(v) => v.len(),
        Data::I32(v) => v.len(),
    }
}

fn check_feed<'a>(
    found: Option<&'a Tensor>,
    name: &str,
    kind: &'static str,
    ty: &TensorType,
) -> Result<&'a Tensor, InterpError> {
    let t = found.ok_or_else(|| InterpError::MissingFeed {
        kind,
        name: name.to_string(),
    })?;
    if t.dtype() != ty.dtype {
        return Err(InterpError::FeedDType {
            kind,
            name: name.to_string(),
            got: t.dtype(),
            want: ty.dtype,
        });
    }
    if t.shape != ty.shape {
        return Err(InterpError::FeedShape {
            kind,
            name: name.to_string(),
            got: t.shape.clone(),
            want: ty.shape.clone(),
        });
    }
    let len = data_len(t);
    if len != numel(&t.shape) {
        return Err(InterpError::FeedData {
            kind,
            name: name.to_string(),
            len,
            shape: t.shape.clone(),
        });
    }
    Ok(t)
}

/// Copy the bytes of a value, wherever it lives, into `t`, whose dtype,
/// shape and buffer length already match `ty`.
fn read_into(
    loc: Loc,
    ty: &TensorType,
    base: *mut u8,
    arena_len: usize,
    fed: &[&Tensor],
    t: &mut Tensor,
) {
    let n = numel(&ty.shape);
    let src: *const u8 = match loc {
        Loc::Extern(slot) => match fed.get(slot) {
            Some(f) => {
                t.data.clone_from(&f.data);
                return;
            }
            None => {
                *t = Tensor::zeros(ty.dtype, ty.shape.clone());
                return;
            }
        },
        Loc::Arena(off) => {
            assert!(
                off + n * 4 <= arena_len,
                "value outside the arena (a codegen bug)"
            );
            base.wrapping_add(off)
        }
    };
    let dst = match &mut t.data {
        Data::F32(v) => v.as_mut_ptr() as *mut u8,
        Data::I32(v) => v.as_mut_ptr() as *mut u8,
    };
    assert_eq!(data_len(t), n, "output buffer of the wrong size");
    // SAFETY: `[off, off + 4n)` was just checked to lie in the arena (locked
    // by the caller), `t` holds exactly n 4-byte elements, and the two are
    // distinct allocations.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, n * 4) };
}

fn write(loc: Loc, ty: &TensorType, t: &Tensor, base: *mut u8, arena_len: usize) {
    let Loc::Arena(off) = loc else { return };
    let n = numel(&ty.shape);
    assert!(
        off + n * 4 <= arena_len,
        "value outside the arena (a codegen bug)"
    );
    // SAFETY: checked to lie inside the arena, whose lock the caller holds.
    let dst = unsafe { std::slice::from_raw_parts_mut(base.add(off), n * 4) };
    match &t.data {
        Data::F32(v) => {
            for (d, x) in dst.chunks_exact_mut(4).zip(v) {
                d.copy_from_slice(&x.to_ne_bytes());
            }
        }
        Data::I32(v) => {
            for (d, x) in dst.chunks_exact_mut(4).zip(v) {
                d.copy_from_slice(&x.to_ne_bytes());
            }
        }
    }
}

/// Turn a kernel's error code into the interpreter's error for the same
/// bad value.
fn explain(
    k: &ExecKernel,
    check: &StepCheck,
    code: i64,
    base: *mut u8,
    ptrs: &[*const u8],
) -> RuntimeError {
    let index = (code - 1) as usize;
    let read_i32 = |loc: Loc| -> i32 {
        let p = match loc {
            Loc::Arena(off) => base.wrapping_add(off) as *const u8,
            Loc::Extern(slot) => ptrs.get(slot).copied().unwrap_or(std::ptr::null()),
        };
        if p.is_null() {
            return 0;
        }
        // SAFETY: the kernel reported `index` as an element it read from
        // this i32 buffer, so the element exists.
        unsafe { (p as *const i32).add(index).read_unaligned() }
    };
    match check {
        StepCheck::Id {
            op,
            ids,
            shape,
            rows,
        } => InterpError::IdOutOfRange {
            op,
            id: read_i32(*ids),
            index: unravel(index, shape),
            rows: *rows,
        }
        .into(),
        StepCheck::Label {
            op,
            labels,
            classes,
        } => InterpError::LabelOutOfRange {
            op,
            label: read_i32(*labels),
            index,
            classes: *classes,
        }
        .into(),
        StepCheck::None => RuntimeError::Kernel {
            node: k.node,
            op: k.op,
            code,
        },
    }
}

fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        let n = shape[d].max(1);
        idx[d] = flat % n;
        flat /= n;
    }
    idx
}
