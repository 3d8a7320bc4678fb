//! Optimisation passes on concrete IR graphs, and the lowering that hands
//! the backend kernel groups, a schedule and a memory plan.
//!
//! ```text
//! Graph ──simplify (fold, algebra, CSE, DCE; to a fixpoint)──▶ Graph
//!       ──fusion──▶ kernel groups ──schedule──▶ order ──memplan──▶ arena offsets
//! ```
//!
//! **Invariant:** every pass maps a valid graph (see [`verify::verify`]) to a
//! valid graph with the same named outputs. `O1` rewrites are exact (results
//! equal as IEEE values; the sign of a zero is not preserved by `x + 0 = x`);
//! `O2` adds rewrites that reassociate sums (`sum(expand(x)) = k·sum(x)`).

pub mod algebra;
pub mod cse;
pub mod dce;
pub mod fold;
pub mod fusion;
pub mod memplan;
pub mod rewrite;
pub mod schedule;
pub mod verify;

use crate::ir::Graph;
use std::time::{Duration, Instant};

pub use fusion::{KernelGroup, KernelKind};
pub use memplan::MemoryPlan;

/// What went wrong inside a pass: a pass met a graph it cannot handle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassError {
    #[error("pass {pass}: {message}")]
    Invalid { pass: String, message: String },
    #[error("pass {pass} produced an invalid graph: {message}")]
    Verify { pass: String, message: String },
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassStats {
    pub name: String,
    /// Non-leaf ops before and after the pass.
    pub ops_before: usize,
    pub ops_after: usize,
    /// Number of rewrites (or groups, for fusion) the pass made.
    pub changes: usize,
    pub time: Duration,
}

impl PassStats {
    fn start(name: &str, g: &Graph) -> (PassStats, Instant) {
        let s = PassStats {
            name: name.to_string(),
            ops_before: g.op_count(),
            ..PassStats::default()
        };
        (s, Instant::now())
    }

    fn finish(mut self, g: &Graph, started: Instant, changes: usize) -> PassStats {
        self.ops_after = g.op_count();
        self.changes = changes;
        self.time = started.elapsed();
        self
    }
}

/// A graph-to-graph transformation with one job.
pub trait Pass {
    fn name(&self) -> &str;
    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError>;
}

/// How hard to optimise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum OptLevel {
    /// No pass; one kernel per op.
    O0,
    /// Exact simplifications only (results equal as values); one kernel per op.
    O1,
    /// Everything: O1 plus reassociating rewrites, and fusion into kernel groups.
    #[default]
    O2,
}

impl std::str::FromStr for OptLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "0" | "O0" => Ok(OptLevel::O0),
            "1" | "O1" => Ok(OptLevel::O1),
            "2" | "O2" => Ok(OptLevel::O2),
            _ => Err(format!(
                "unknown optimisation level '{s}'; use O0, O1 or O2"
            )),
        }
    }
}

/// The passes of one simplify round at `level`.
pub fn simplify_passes(level: OptLevel) -> Vec<Box<dyn Pass>> {
    match level {
        OptLevel::O0 => Vec::new(),
        OptLevel::O1 => vec![
            Box::new(fold::FoldConstants),
            Box::new(algebra::Algebra { reassociate: false }),
            Box::new(cse::Cse),
            Box::new(dce::Dce),
        ],
        OptLevel::O2 => vec![
            Box::new(fold::FoldConstants),
            Box::new(algebra::Algebra { reassociate: true }),
            Box::new(cse::Cse),
            Box::new(dce::Dce),
        ],
    }
}

/// Rounds of the simplify pipeline before giving up on a fixpoint; real
/// graphs settle in two or three.
const MAX_ROUNDS: usize = 8;

/// Run the simplify passes of `level` to a fixpoint, calling `check` on the
/// graph after every pass (tests pass [`verify::verify`]).
pub fn try_optimize_with(
    g: &Graph,
    level: OptLevel,
    check: &dyn Fn(&Graph) -> Result<(), String>,
) -> Result<(Graph, Vec<PassStats>), PassError> {
    let mut g = g.clone();
    let passes = simplify_passes(level);
    let mut stats: Vec<PassStats> = Vec::new();
    for _ in 0..MAX_ROUNDS {
        let mut changed = false;
        for p in &passes {
            let s = p.run(&mut g)?;
            check(&g).map_err(|message| PassError::Verify {
                pass: p.name().to_string(),
                message,
            })?;
            changed |= s.changes > 0;
            merge_stats(&mut stats, s);
        }
        if !changed {
            break;
        }
    }
    Ok((g, stats))
}

/// Accumulate repeated runs of one pass into one line per pass name.
fn merge_stats(all: &mut Vec<PassStats>, s: PassStats) {
    match all.iter_mut().find(|a| a.name == s.name) {
        Some(a) => {
            a.ops_after = s.ops_after;
            a.changes += s.changes;
            a.time += s.time;
        }
        None => all.push(s),
    }
}

/// Simplify `g` at `level`. A pass that fails leaves the graph as it was
/// before that run (passes only fail on graphs they do not understand), and
/// its error is recorded as a stats line named `<pass> (failed: …)`.
pub fn optimize(g: &Graph, level: OptLevel) -> (Graph, Vec<PassStats>) {
    match try_optimize_with(g, level, &|_| Ok(())) {
        Ok(r) => r,
        Err(e) => {
            let s = PassStats {
                name: format!("simplify (failed: {e})"),
                ops_before: g.op_count(),
                ops_after: g.op_count(),
                ..PassStats::default()
            };
            (g.clone(), vec![s])
        }
    }
}

/// Everything the backend needs: the optimised graph, its kernel groups in
/// execution order and the memory plan.
#[derive(Debug, Clone)]
pub struct Lowered {
    pub graph: Graph,
    /// Kernel groups, already in schedule order.
    pub kernels: Vec<KernelGroup>,
    pub plan: MemoryPlan,
    pub stats: Vec<PassStats>,
}

/// Verify `g`, optimise, fuse (at O2; one kernel per op below), schedule and
/// plan memory (checked before it is returned).
pub fn lower(g: &Graph, level: OptLevel) -> Result<Lowered, PassError> {
    lower_with(g, level, &|_| Ok(()))
}

/// [`lower`] with a check after every graph pass.
pub fn lower_with(
    g: &Graph,
    level: OptLevel,
    check: &dyn Fn(&Graph) -> Result<(), String>,
) -> Result<Lowered, PassError> {
    verify::verify(g).map_err(|message| PassError::Verify {
        pass: "input".into(),
        message,
    })?;
    let (graph, mut stats) = try_optimize_with(g, level, check)?;
    let (s, t) = PassStats::start("fusion", &graph);
    let groups = if level == OptLevel::O2 {
        fusion::fuse(&graph)
    } else {
        fusion::singletons(&graph)
    };
    stats.push(s.finish(&graph, t, groups.len()));
    let (s, t) = PassStats::start("schedule", &graph);
    let kernels = schedule::schedule(&graph, groups).map_err(|message| PassError::Invalid {
        pass: "schedule".into(),
        message,
    })?;
    stats.push(s.finish(&graph, t, kernels.len()));
    let (s, t) = PassStats::start("memplan", &graph);
    let plan = memplan::plan(&graph, &kernels);
    memplan::check(&graph, &kernels, &plan).map_err(|message| PassError::Verify {
        pass: "memplan".into(),
        message,
    })?;
    stats.push(s.finish(&graph, t, plan.buffers.len()));
    Ok(Lowered {
        graph,
        kernels,
        plan,
        stats,
    })
}

impl Lowered {
    /// The compile summary: one line per pass with ops before/after, changes
    /// and time, then the kernel count and the memory plan.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        for p in &self.stats {
            let _ = writeln!(
                s,
                "{:<10} ops {:>5} -> {:<5} changes {:<5} {:>9.3} ms",
                p.name,
                p.ops_before,
                p.ops_after,
                p.changes,
                p.time.as_secs_f64() * 1e3
            );
        }
        let _ = writeln!(
            s,
            "kernels {} for {} ops",
            self.kernels.len(),
            self.graph.op_count()
        );
        let _ = writeln!(
            s,
            "memory: peak {} B, arena {} B, {} B with one buffer per intermediate",
            self.plan.peak_bytes, self.plan.arena_bytes, self.plan.naive_bytes
        );
        s
    }
}
