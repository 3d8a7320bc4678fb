//! A small persistent thread pool that runs one kernel step at a time.
//!
//! A step is cut into fixed chunks of work units (the chunk size is chosen
//! by codegen from the step alone); threads take chunks from a shared
//! counter. Which thread runs a chunk varies, what a chunk computes does
//! not, so results are bitwise identical for any thread count.
//!
//! A model runs hundreds of short steps back to back, so waking a sleeping
//! thread per step (a futex round trip, tens of µs on a VM) would cost more
//! than many steps themselves. Workers therefore spin for a while after
//! each step, watching for the next one, and only then sleep on the
//! condition variable; the caller spins the same way for the workers to
//! finish.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a thread spins for new work (or for workers to finish) before
/// it sleeps: longer than the gap between the steps of a run, short enough
/// that an idle model does not hold a core.
const SPIN: Duration = Duration::from_micros(300);

/// Spin until `ready()` or SPIN has passed; whether it became ready.
fn spin_until(ready: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() > SPIN {
            return ready();
        }
        // Gives the core away at once when other threads want it (a loaded
        // machine, parallel tests); returns at once on an idle one.
        std::thread::yield_now();
    }
}

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
    /// Workers asleep on `wake`.
    sleeping: usize,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    done: Condvar,
    /// `State::generation`, readable without the lock by spinning workers.
    generation: AtomicU64,
    /// Workers still busy with the current generation.
    pending: AtomicUsize,
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
                sleeping: 0,
                shutdown: false,
            }),
            wake: Condvar::new(),
            done: Condvar::new(),
            generation: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
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
            self.shared
                .pending
                .store(self.workers.len(), Ordering::SeqCst);
            self.shared
                .generation
                .store(st.generation, Ordering::SeqCst);
            if st.sleeping > 0 {
                self.shared.wake.notify_all();
            }
        }
        run_chunks(&self.shared, job);
        let pending = &self.shared.pending;
        if !spin_until(|| pending.load(Ordering::SeqCst) == 0) {
            let mut st = lock(&self.shared.state);
            while pending.load(Ordering::SeqCst) > 0 {
                st = self.shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        lock(&self.shared.state).job = None;
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
        spin_until(|| shared.generation.load(Ordering::SeqCst) != seen);
        let job = {
            let mut st = lock(&shared.state);
            while !st.shutdown && st.generation == seen {
                st.sleeping += 1;
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                st.sleeping -= 1;
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
        if shared.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Under the lock, so a caller between its check and its wait
            // cannot miss this.
            let _st = lock(&shared.state);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Per-unit visit counters of the test kernel (`arena` points at them).
    unsafe extern "C" fn count_units(
        arena: *mut u8,
        _ptrs: *const *const u8,
        start: i64,
        end: i64,
    ) -> i64 {
        // SAFETY: the tests pass a live slice of AtomicU32 with at least
        // `end` elements as the arena.
        let counts = arena as *const AtomicU32;
        let mut code = 0;
        for u in start..end {
            // SAFETY: as above.
            unsafe { (*counts.add(u as usize)).fetch_add(1, Ordering::SeqCst) };
            if u % 97 == 13 {
                code = if code == 0 { u + 1 } else { code };
            }
        }
        code
    }

    /// Back-to-back steps (workers spinning) and steps after a pause
    /// (workers asleep) each run every unit exactly once and report the
    /// smallest error code, for 1 to 3 threads.
    #[test]
    fn every_unit_runs_once_per_step_awake_or_asleep() {
        for threads in 1..=3 {
            let pool = Pool::new(threads);
            for round in 0..400usize {
                let units = 1 + (round * 37) % 300;
                let grain = 1 + round % 7;
                let counts: Vec<AtomicU32> = (0..units).map(|_| AtomicU32::new(0)).collect();
                if round % 100 == 99 {
                    std::thread::sleep(SPIN * 3);
                }
                // SAFETY: the kernel touches only `counts[..units]`.
                let code = unsafe {
                    pool.run(
                        count_units,
                        counts.as_ptr() as *mut u8,
                        std::ptr::null(),
                        units,
                        grain,
                    )
                };
                assert!(counts.iter().all(|c| c.load(Ordering::SeqCst) == 1));
                let want = if units > 13 { 14 } else { 0 };
                assert_eq!(code, want, "threads {threads}, round {round}");
            }
        }
    }
}
