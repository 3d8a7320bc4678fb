//! Scheduling: an execution order of the kernel groups that keeps the peak
//! of simultaneously live intermediate bytes low.
//!
//! Two candidate orders are simulated and the one with the lower peak wins:
//! program order (Kahn's algorithm, earliest first member first) and a greedy
//! list schedule that always runs the ready group that grows the live set
//! least (bytes it writes minus bytes whose last reader it is). Training
//! steps benefit from the latter: an optimizer update runs as soon as its
//! gradient exists, freeing the gradient.

use super::fusion::KernelGroup;
use super::memplan::{needs, Need};
use crate::ir::{Graph, Op};
use petgraph::stable_graph::NodeIndex;
use std::collections::{BTreeSet, HashMap};

/// Order `groups` for execution. Fails when the groups do not partition the
/// graph's ops or depend on each other in a cycle.
pub fn schedule(g: &Graph, groups: Vec<KernelGroup>) -> Result<Vec<KernelGroup>, String> {
    let deps = dependencies(g, &groups)?;
    let topo: HashMap<NodeIndex, usize> = g
        .topo_order()
        .into_iter()
        .enumerate()
        .map(|(i, n)| (n, i))
        .collect();
    let first: Vec<usize> = groups
        .iter()
        .map(|k| k.nodes.iter().map(|n| topo[n]).min().unwrap_or(0))
        .collect();
    let program = list_schedule(&deps, |ready, _| {
        ready.iter().copied().min_by_key(|&i| first[i])
    })?;
    let in_order = |order: &[usize]| order.iter().map(|&i| groups[i].clone()).collect::<Vec<_>>();
    let program_peak = simulate(g, &in_order(&program));

    let probe = needs(g, &groups);
    let mut writes = vec![0usize; groups.len()];
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); groups.len()];
    for (bi, nd) in probe.iter().enumerate() {
        writes[nd.def] += nd.bytes;
        for &u in &nd.uses {
            readers[u].push(bi);
        }
    }
    let mut remaining: Vec<usize> = probe.iter().map(|nd| nd.uses.len()).collect();
    let greedy = list_schedule(&deps, |ready, done| {
        if let Some(&last) = done.last() {
            for &bi in &readers[last] {
                remaining[bi] -= 1;
            }
        }
        ready.iter().copied().min_by_key(|&i| {
            let freed: usize = readers[i]
                .iter()
                .filter(|&&bi| remaining[bi] == 1)
                .map(|&bi| probe[bi].bytes)
                .sum();
            (writes[i] as i64 - freed as i64, first[i])
        })
    })?;
    let greedy_peak = simulate(g, &in_order(&greedy));
    let best = if greedy_peak < program_peak {
        greedy
    } else {
        program
    };
    Ok(in_order(&best))
}

/// For each group, the groups it reads values from.
fn dependencies(g: &Graph, groups: &[KernelGroup]) -> Result<Vec<BTreeSet<usize>>, String> {
    let mut owner: HashMap<NodeIndex, usize> = HashMap::new();
    for (i, k) in groups.iter().enumerate() {
        for &n in &k.nodes {
            if owner.insert(n, i).is_some() {
                return Err(format!("node %{} is in two kernel groups", n.index()));
            }
        }
    }
    for n in g.graph.node_indices() {
        let leaf = g.node(n).op.is_leaf();
        if !leaf && !owner.contains_key(&n) {
            return Err(format!(
                "node %{} ({}) is in no kernel group",
                n.index(),
                g.node(n).op.name()
            ));
        }
    }
    let mut deps = vec![BTreeSet::new(); groups.len()];
    for (i, k) in groups.iter().enumerate() {
        for &n in &k.nodes {
            for v in g.inputs(n) {
                if matches!(g.node(v.node).op, Op::Fill { .. }) {
                    continue; // constants are inlined, whoever else stores them
                }
                if let Some(&j) = owner.get(&v.node) {
                    if j != i {
                        deps[i].insert(j);
                    }
                }
            }
        }
    }
    Ok(deps)
}

/// Kahn's algorithm; `pick(ready, done_so_far)` chooses the next group.
fn list_schedule(
    deps: &[BTreeSet<usize>],
    mut pick: impl FnMut(&BTreeSet<usize>, &[usize]) -> Option<usize>,
) -> Result<Vec<usize>, String> {
    let n = deps.len();
    let mut indeg: Vec<usize> = deps.iter().map(|d| d.len()).collect();
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, d) in deps.iter().enumerate() {
        for &j in d {
            users[j].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = pick(&ready, &order) {
        ready.remove(&i);
        order.push(i);
        for &u in &users[i] {
            indeg[u] -= 1;
            if indeg[u] == 0 {
                ready.insert(u);
            }
        }
    }
    if order.len() != n {
        return Err("the kernel groups depend on each other in a cycle".to_string());
    }
    Ok(order)
}

/// The peak of simultaneously live buffer bytes of groups run in this order
/// (before in-place reuse).
pub fn simulate(g: &Graph, ordered: &[KernelGroup]) -> usize {
    let ns: Vec<Need> = needs(g, ordered);
    let mut delta = vec![0i64; ordered.len() + 1];
    for nd in &ns {
        let end = nd.uses.iter().copied().max().unwrap_or(nd.def);
        delta[nd.def] += nd.bytes as i64;
        delta[end + 1] -= nd.bytes as i64;
    }
    let mut live = 0i64;
    let mut peak = 0i64;
    for d in delta.iter().take(ordered.len()) {
        live += d;
        peak = peak.max(live);
    }
    peak as usize
}
