//! A small persistent thread pool that runs one kernel step at a time.
//!
//! A step is cut into fixed chunks of work units (the chunk size is chosen
//! by codegen from the step alone); threads take chunks from a shared
//! counter. Which thread runs a chunk varies, what a chunk computes does
//! not, so results are bitwise identical for any thread count.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// `fn(arena, ptrs, start, end) -> code`, as emitted by codegen.
pub type KernelFn = unsafe extern "C" fn(*mut u8, *const *const u8, i64, i64) -> i64;

#[derive(Clone, Copy)]
struct Job {
    func: usize,
    arena: usize,
    ptrs: usize,
    units: usize,
    grain: usize,
}

struct State {
    job: Option<Job>,
    generation: u64,
    /// Workers still busy with the current generation.
    pending: usize,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    done: Condvar,
    next: AtomicUsize,
    /// Smallest non-zero code reported by any chunk (i64::MAX: none).
    code: AtomicI64,
}

pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// A pool whose calling thread plus `threads - 1` workers share work.
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                job: None,
                generation: 0,
                pending: 0,
                shutdown: false,
            }),
            wake: Condvar::new(),
            done: Condvar::new(),
            next: AtomicUsize::new(0),
            code: AtomicI64::new(i64::MAX),
        });
        let workers = (1..threads.max(1))
            .map(|_| {
                let s = shared.clone();
                std::thread::spawn(move || worker(&s))
            })
            .collect();
        Pool { shared, workers }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Run units `[0, units)` of `func` in chunks of `grain`; returns the
    /// smallest non-zero code any chunk returned, or 0.
    ///
    /// # Safety
    /// `func` must be a finalized kernel whose every memory access stays in
    /// the arena and the tensors named by `ptrs`, both alive for the call.
    pub unsafe fn run(
        &self,
        func: KernelFn,
        arena: *mut u8,
        ptrs: *const *const u8,
        units: usize,
        grain: usize,
    ) -> i64 {
        let grain = grain.max(1);
        let chunks = units.div_ceil(grain);
        if chunks <= 1 || self.workers.is_empty() {
            let mut code = 0;
            for c in 0..chunks {
                let (s, e) = (c * grain, ((c + 1) * grain).min(units));
                // SAFETY: guaranteed by this function's contract.
                let r = unsafe { func(arena, ptrs, s as i64, e as i64) };
                if r != 0 {
                    code = if code == 0 { r } else { code.min(r) };
                }
            }
            return code;
        }
        let job = Job {
            func: func as usize,
            arena: arena as usize,
            ptrs: ptrs as usize,
            units,
            grain,
        };
        self.shared.next.store(0, Ordering::SeqCst);
        self.shared.code.store(i64::MAX, Ordering::SeqCst);
        {
            let mut st = lock(&self.shared.state);
            st.job = Some(job);
            st.generation += 1;
            st.pending = self.workers.len();
            self.shared.wake.notify_all();
        }
        run_chunks(&self.shared, job);
        let mut st = lock(&self.shared.state);
        while st.pending > 0 {
            st = self.shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.job = None;
        drop(st);
        match self.shared.code.load(Ordering::SeqCst) {
            i64::MAX => 0,
            c => c,
        }
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A worker never panics while holding the lock; recover regardless.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn run_chunks(shared: &Shared, job: Job) {
    loop {
        let c = shared.next.fetch_add(1, Ordering::SeqCst);
        let s = c * job.grain;
        if s >= job.units {
            break;
        }
        let e = (s + job.grain).min(job.units);
        // SAFETY: `job.func` was produced from a `KernelFn` by `Pool::run`,
        // whose caller guarantees the kernel, arena and pointer table are
        // valid until every worker has reported back (it waits for that).
        let r = unsafe {
            let f: KernelFn = std::mem::transmute::<usize, KernelFn>(job.func);
            f(
                job.arena as *mut u8,
                job.ptrs as *const *const u8,
                s as i64,
                e as i64,
            )
        };
        if r != 0 {
            shared.code.fetch_min(r, Ordering::SeqCst);
        }
    }
}

fn worker(shared: &Shared) {
    let mut seen = 0u64;
    loop {
        let job = {
            let mut st = lock(&shared.state);
            while !st.shutdown && st.generation == seen {
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.shutdown {
                return;
            }
            seen = st.generation;
            st.job
        };
        if let Some(job) = job {
            run_chunks(shared, job);
        }
        let mut st = lock(&shared.state);
        st.pending -= 1;
        if st.pending == 0 {
            shared.done.notify_all();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.shared.state);
            st.shutdown = true;
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
