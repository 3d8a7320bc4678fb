//! `dlc run --profile`: wall time per compiled kernel, sorted, with GFLOP/s
//! where the op has a FLOP count — the tool for finding what to speed up.
//!
//! A kernel is what the runtime dispatches: today one node of the
//! optimised graph (its steps: packing, compute, epilogue). Times are
//! medians over the profiled runs, after one untimed warm-up run.

use crate::ir::cost::flops;
use crate::ir::{fmt_shape, Graph, TensorType};
use crate::runtime::{JitModel, RuntimeError};
use crate::tensor::Tensor;
use petgraph::stable_graph::NodeIndex;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;

/// Which compiled graph to profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileTarget {
    Forward,
    /// Forward plus the gradient of `loss` for every parameter.
    Gradients,
    /// Forward, backward and the optimizer update.
    TrainStep,
}

/// One kernel's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelProfile {
    /// Node of the optimised graph (`dlc compile --emit opt-ir` numbering).
    pub node: usize,
    pub op: &'static str,
    /// Type of the kernel's first result, e.g. `f32[64, 256]`.
    pub result: String,
    /// Median wall time of one execution.
    pub median_ns: u64,
    pub flops: Option<u64>,
}

impl KernelProfile {
    pub fn gflops(&self) -> Option<f64> {
        let f = self.flops?;
        (self.median_ns > 0).then(|| f as f64 / self.median_ns as f64)
    }
}

/// Kernels sorted by median time, slowest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub kernels: Vec<KernelProfile>,
    pub runs: usize,
    pub threads: usize,
    /// Median over runs of the summed kernel times of a run.
    pub total_ns: u64,
}

/// Run `model` (compiled from `graph`) once untimed, then `runs` times
/// with a clock around every kernel.
pub fn collect(
    graph: &Graph,
    model: &JitModel,
    layers: &[&BTreeMap<String, Tensor>],
    runs: usize,
) -> Result<(Profile, BTreeMap<String, Tensor>), RuntimeError> {
    let runs = runs.max(1);
    let nodes = model.kernel_nodes();
    let mut out = BTreeMap::new();
    model.run_into(layers, &mut out)?;
    let mut per_run: Vec<Vec<u64>> = Vec::with_capacity(runs);
    for _ in 0..runs {
        let mut ns = vec![0u64; nodes.len()];
        model.run_profiled(layers, &mut out, &mut ns)?;
        per_run.push(ns);
    }
    let mut totals: Vec<u64> = per_run.iter().map(|r| r.iter().sum()).collect();
    let kernel_set: HashSet<usize> = nodes.iter().map(|&(n, _)| n).collect();
    let mut kernels: Vec<KernelProfile> = nodes
        .iter()
        .enumerate()
        .map(|(k, &(node, op))| {
            let mut times: Vec<u64> = per_run.iter().map(|r| r[k]).collect();
            let (result, count) = describe(graph, node, &kernel_set);
            KernelProfile {
                node,
                op,
                result,
                median_ns: median(&mut times),
                flops: count,
            }
        })
        .collect();
    kernels.sort_by(|a, b| b.median_ns.cmp(&a.median_ns).then(a.node.cmp(&b.node)));
    let profile = Profile {
        kernels,
        runs,
        threads: model.threads(),
        total_ns: median(&mut totals),
    };
    Ok((profile, out))
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The first result's type and the FLOP count of a kernel, if it exists:
/// its node's, plus those of the nodes it computes inside (an elementwise
/// chain's members, a matmul with its bias add), which have no kernel.
fn describe(g: &Graph, node: usize, kernels: &HashSet<usize>) -> (String, Option<u64>) {
    let n = NodeIndex::new(node);
    let Some(nd) = g.graph.node_weight(n) else {
        return (String::from("?"), None);
    };
    let result = nd
        .outputs
        .first()
        .map(|t| format!("{}{}", t.dtype, fmt_shape(&t.shape)))
        .unwrap_or_default();
    let count = |n: NodeIndex| {
        let ins: Vec<&TensorType> = g.inputs(n).into_iter().map(|v| g.ty(v)).collect();
        let outs: Vec<&TensorType> = g.node(n).outputs.iter().collect();
        flops(&g.node(n).op, &ins, &outs)
    };
    let mut total = count(n);
    let mut stack: Vec<NodeIndex> = g.inputs(n).into_iter().map(|v| v.node).collect();
    let mut seen: HashSet<NodeIndex> = HashSet::new();
    while let Some(m) = stack.pop() {
        if kernels.contains(&m.index()) || !seen.insert(m) {
            continue;
        }
        if let Some(f) = count(m) {
            if f > 0 {
                total = Some(total.unwrap_or(0) + f);
                stack.extend(g.inputs(m).into_iter().map(|v| v.node));
            }
        }
    }
    (result, total)
}

impl Profile {
    /// The sorted table, then the time per op kind.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let total = self.total_ns.max(1) as f64;
        let _ = writeln!(
            s,
            "profile: {} kernels, median of {} runs on {} thread(s), {:.3} ms per run",
            self.kernels.len(),
            self.runs,
            self.threads,
            self.total_ns as f64 / 1e6
        );
        let _ = writeln!(
            s,
            "{:>10} {:>6} {:>8}  {:<6} {:<18} {:<24}",
            "time µs", "share", "GFLOP/s", "node", "op", "result"
        );
        for k in &self.kernels {
            let gf = k.gflops().map(|g| format!("{g:.1}")).unwrap_or_default();
            let _ = writeln!(
                s,
                "{:>10.1} {:>5.1}% {:>8}  %{:<5} {:<18} {:<24}",
                k.median_ns as f64 / 1e3,
                100.0 * k.median_ns as f64 / total,
                gf,
                k.node,
                k.op,
                k.result
            );
        }
        let mut by_op: BTreeMap<&str, (u64, usize, u64)> = BTreeMap::new();
        for k in &self.kernels {
            let e = by_op.entry(k.op).or_default();
            e.0 += k.median_ns;
            e.1 += 1;
            e.2 += k.flops.unwrap_or(0);
        }
        let mut by_op: Vec<_> = by_op.into_iter().collect();
        by_op.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(b.0)));
        let _ = writeln!(s, "by op:");
        for (op, (ns, count, fl)) in by_op {
            let gf = if fl > 0 && ns > 0 {
                format!("{:.1}", fl as f64 / ns as f64)
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "{:>10.1} {:>5.1}% {:>8}  {count:>3} × {op}",
                ns as f64 / 1e3,
                100.0 * ns as f64 / total,
                gf
            );
        }
        let _ = writeln!(
            s,
            "GFLOP/s counts each op's FLOPs as the textbook algorithm does them \
             (a convolution: 2 per output per window tap), so a Winograd \
             convolution, which does fewer, can show more than the peak."
        );
        s
    }
}
