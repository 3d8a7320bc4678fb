//! Elaboration: AST → shape-checked IR graph.
//!
//! Expands `fn` calls (std.dl included), names parameters by the bindings
//! that created them (LANGUAGE.md §3), binds dimension symbols and checks
//! every op's shapes, reporting all errors of a file together. The same
//! code runs over symbolic dims ([`check`]) and over sizes ([`elaborate`]).
//!
//! Code map: `expand` walks statements and expressions, expands fns and
//! matches argument patterns; `prims` lowers primitive calls to IR ops;
//! `items` resolves names to fns and primitives; `train` reads the `train`
//! block; `dimexpr` is the symbolic dimension type; `value` the
//! compile-time values.
//!
//! Choices the language reference leaves open:
//! - Integer `/` floors (`H/2` with `H = 7` is 3), as sizes do in shape rules.
//! - std.dl resolves names in itself and the primitives only, so a user fn
//!   that shadows `dense` cannot change what `self_attention` means.
//! - Whether a fn creates parameters is decided from the source before any
//!   expansion, so two layers in one binding are rejected before they could
//!   create clashing names.
//! - `check` works over symbols and ignores `N=32` defaults, so messages
//!   speak of `N`; an error that disappears at the default sizes (the
//!   model only works for some sizes, e.g. `D / heads`) becomes a warning,
//!   because `dlc compile` would accept the model.
//! - The graph built by `check` only carries types: a slice over a
//!   symbolic extent records its size, not its bounds. It is never run.
//!
//! **Architecture invariant:** elaboration never panics on any source; every
//! problem is a [`Diagnostic`], and a value whose expression failed is
//! "poisoned" so its uses add no further errors.

pub mod dimexpr;
mod expand;
mod items;
mod prims;
mod train;
mod value;

pub use dimexpr::DimExpr;

use crate::diag::{Diagnostic, SourceMap};
use crate::ir::Span;
use crate::model::Model;
use crate::syntax::ast::{DimAst, ExprKind, File, Item, ModelDef, StmtKind, TensorTypeAst};
use expand::{Elab, Symbols};
use items::Items;
use std::collections::BTreeMap;

/// The standard library, parsed like user code as its own source file.
pub const STD_SOURCE: &str = include_str!("../../lang/std.dl");

/// The name std.dl gets in the source map (and so in its diagnostics).
pub const STD_NAME: &str = "std.dl";

#[derive(Clone, Debug, Default)]
pub struct ElabOptions {
    /// `--model`; default: the first model in the file.
    pub model: Option<String>,
    /// `--dim N=32`.
    pub dims: BTreeMap<String, usize>,
    /// Shapes of the actual input tensors (`dlc run`/`test`): symbols are
    /// bound from them.
    pub input_shapes: BTreeMap<String, Vec<usize>>,
}

pub struct Elaborated {
    pub model: Model,
    pub warnings: Vec<Diagnostic>,
}

/// Parse + check every model of the file over symbolic dims (no sizes
/// needed). Adds std.dl to `sources`. Returns errors and warnings.
pub fn check(sources: &mut SourceMap, file: u32) -> Vec<Diagnostic> {
    let Some((user, std, mut diags)) = parse_both(sources, file) else {
        return vec![missing_file(file)];
    };
    let items = Items::new(&user, &std, &mut diags);
    items.unknown_calls(&mut diags);
    let no_shapes = BTreeMap::new();
    for m in items.models.clone() {
        let mut el: Elab<'_, DimExpr> = Elab::new(&items, Symbols::default(), &no_shapes);
        let defaults = collect_defaults(m, &mut el.diags);
        el.model(m);
        let mut found = el.diags;
        if found.iter().any(Diagnostic::is_error) {
            demote_size_dependent(&items, m, defaults, &mut found);
        }
        diags.append(&mut found);
    }
    finish(diags)
}

/// A model whose shapes fail over symbols but line up at its default sizes
/// (say `reshape(x, [N, T, heads, D / heads])` with `D=64`) is valid for
/// some sizes only: `dlc compile` accepts it, so `dlc check` warns instead
/// of failing. Any error that does not depend on sizes shows up in the
/// concrete pass too, and then nothing is demoted.
fn demote_size_dependent(
    items: &Items<'_>,
    m: &ModelDef,
    defaults: BTreeMap<String, (usize, Span)>,
    found: &mut [Diagnostic],
) {
    let at = defaults
        .iter()
        .map(|(k, (v, _))| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let no_shapes = BTreeMap::new();
    let syms = Symbols {
        defaults,
        ..Symbols::default()
    };
    let mut el: Elab<'_, usize> = Elab::new(items, syms, &no_shapes);
    el.model(m);
    check_sizes(&el.graph, &mut el.diags);
    if el.diags.iter().any(Diagnostic::is_error) {
        return;
    }
    for d in found.iter_mut().filter(|d| d.is_error()) {
        d.severity = crate::diag::Severity::Warning;
        d.help = Some(format!(
            "this holds at the default sizes ({at}) but not for every size"
        ));
    }
}

/// Parse + elaborate one model with all symbols bound to sizes → concrete
/// IR graph.
pub fn elaborate(
    sources: &mut SourceMap,
    file: u32,
    opts: &ElabOptions,
) -> Result<Elaborated, Vec<Diagnostic>> {
    let Some((user, std, mut diags)) = parse_both(sources, file) else {
        return Err(vec![missing_file(file)]);
    };
    let items = Items::new(&user, &std, &mut diags);
    let whole_file = Span {
        file,
        start: 0,
        end: 0,
    };
    let names: Vec<&str> = items.models.iter().map(|m| m.name.name.as_str()).collect();
    let chosen = match &opts.model {
        Some(want) => items
            .models
            .iter()
            .find(|m| m.name.name == *want)
            .copied()
            .ok_or_else(|| {
                let list = if names.is_empty() {
                    "it has none".to_string()
                } else {
                    format!("it has {}", names.join(", "))
                };
                Diagnostic::error(
                    whole_file,
                    format!("the file has no model named `{want}`; {list}"),
                )
            }),
        None => items
            .models
            .first()
            .copied()
            .ok_or_else(|| Diagnostic::error(whole_file, "the file has no model to compile")),
    };
    let m = match chosen {
        Ok(m) => m,
        Err(d) => {
            diags.push(d);
            return Err(finish(diags));
        }
    };
    let mut syms = Symbols {
        defaults: collect_defaults(m, &mut diags),
        ..Symbols::default()
    };
    prebind_symbols(m, opts, &mut syms, &mut diags);
    let mut el: Elab<'_, usize> = Elab::new(&items, syms, &opts.input_shapes);
    el.model(m);
    diags.append(&mut el.diags);
    check_sizes(&el.graph, &mut diags);
    if !diags.iter().any(Diagnostic::is_error) {
        check_memory(&el.graph, machine_memory(), &mut diags);
    }
    let diags = finish(diags);
    if diags.iter().any(Diagnostic::is_error) {
        return Err(diags);
    }
    Ok(Elaborated {
        model: Model {
            name: m.name.name.clone(),
            graph: el.graph,
            dims: el.model_dims,
            train: el.train,
        },
        warnings: diags,
    })
}

/// The names of the models in a file, in order (for `--model` errors and
/// listing). Parse errors are ignored here; `check` reports them.
pub fn model_names(sources: &SourceMap, file: u32) -> Vec<String> {
    let Some(f) = sources.get(file) else {
        return Vec::new();
    };
    let (ast, _) = crate::syntax::parse(&f.text, file);
    ast.items
        .iter()
        .filter_map(|it| match it {
            Item::Model(m) => Some(m.name.name.clone()),
            Item::Fn(_) => None,
        })
        .collect()
}

/// Tensors beyond this many elements (64 GiB of f32) cannot be meant, and
/// later stages compute byte sizes and offsets from these counts.
const MAX_ELEMENTS: usize = 1 << 34;

/// Reject any tensor too large to plan, at the op that makes it.
fn check_sizes(g: &crate::ir::Graph, diags: &mut Vec<Diagnostic>) {
    for n in g.graph.node_indices() {
        let node = g.node(n);
        for t in &node.outputs {
            let count = t
                .shape
                .iter()
                .try_fold(1usize, |acc, d| acc.checked_mul(*d));
            if count.is_none_or(|c| c > MAX_ELEMENTS) {
                let span = node.span.unwrap_or_default();
                diags.push(Diagnostic::error(
                    span,
                    format!(
                        "{}: the tensor {t} has more than 2^34 elements",
                        describe(&node.op)
                    ),
                ));
                return;
            }
        }
    }
}

/// How a size error names the op that makes the tensor.
fn describe(op: &crate::ir::Op) -> String {
    use crate::ir::Op;
    match op {
        Op::Input { name } => format!("input `{name}`"),
        Op::Param { name, .. } => format!("parameter `{name}`"),
        op => op.name().to_string(),
    }
}

/// Parameters and inputs are allocated whole before anything runs, so a
/// model whose parameters and inputs alone exceed `memory` (the machine's
/// RAM and swap) cannot run here: it is rejected at its largest such
/// tensor, rather than aborting the process when the allocation fails.
fn check_memory(g: &crate::ir::Graph, memory: Option<u64>, diags: &mut Vec<Diagnostic>) {
    use crate::ir::Op;
    let Some(memory) = memory else {
        return;
    };
    let mut total = 0u64;
    let mut largest: Option<(u64, petgraph::graph::NodeIndex)> = None;
    for n in g.graph.node_indices() {
        let node = g.node(n);
        if !matches!(node.op, Op::Param { .. } | Op::Input { .. }) {
            continue;
        }
        let bytes: u64 = node
            .outputs
            .iter()
            .map(|t| 4 * crate::tensor::numel(&t.shape) as u64)
            .sum();
        total = total.saturating_add(bytes);
        if largest.is_none_or(|(b, _)| bytes > b) {
            largest = Some((bytes, n));
        }
    }
    let Some((bytes, n)) = largest.filter(|_| total > memory) else {
        return;
    };
    let node = g.node(n);
    let human = crate::tensor::human_bytes;
    diags.push(Diagnostic::error(
        node.span.unwrap_or_default(),
        format!(
            "{} takes {}, and the model's parameters and inputs {}: more than this machine's memory ({})",
            describe(&node.op),
            human(bytes),
            human(total),
            human(memory)
        ),
    ));
}

/// RAM plus swap, from `/proc/meminfo`; `None` where it cannot be read
/// (then no model is refused for its size).
fn machine_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some(kib("MemTotal:")?.saturating_add(kib("SwapTotal:").unwrap_or(0)) * 1024)
}

fn missing_file(file: u32) -> Diagnostic {
    Diagnostic::error(
        Span {
            file,
            start: 0,
            end: 0,
        },
        format!("no source file with id {file}"),
    )
}

/// Parse the user file and std.dl (added to `sources` once).
fn parse_both(sources: &mut SourceMap, file: u32) -> Option<(File, File, Vec<Diagnostic>)> {
    let text = sources.get(file)?.text.clone();
    let std_file = match sources
        .files
        .iter()
        .position(|f| f.name == STD_NAME && f.text == STD_SOURCE)
    {
        Some(i) => i as u32,
        None => sources.add(STD_NAME, STD_SOURCE),
    };
    let (user, mut diags) = crate::syntax::parse(&text, file);
    let (std, std_diags) = crate::syntax::parse(STD_SOURCE, std_file);
    diags.extend(std_diags);
    Some((user, std, diags))
}

/// Drop exact duplicates (a fn expanded twice reports its errors once) and
/// order by place.
fn finish(diags: Vec<Diagnostic>) -> Vec<Diagnostic> {
    let mut out: Vec<Diagnostic> = Vec::with_capacity(diags.len());
    for d in diags {
        if !out
            .iter()
            .any(|o| o.span == d.span && o.message == d.message)
        {
            out.push(d);
        }
    }
    out.sort_by_key(|d| (d.span.file, d.span.start, d.span.end));
    out
}

fn model_types(m: &ModelDef) -> impl Iterator<Item = (Option<&str>, &TensorTypeAst)> {
    m.body.iter().filter_map(|st| match &st.kind {
        StmtKind::Input { name, ty } => Some((Some(name.name.as_str()), ty)),
        StmtKind::Param { ty, .. } => Some((None, ty)),
        _ => None,
    })
}

/// `N=32` defaults of the model's types; a default must be a non-negative
/// integer literal, and a symbol gets at most one.
fn collect_defaults(m: &ModelDef, diags: &mut Vec<Diagnostic>) -> BTreeMap<String, (usize, Span)> {
    let mut out: BTreeMap<String, (usize, Span)> = BTreeMap::new();
    for (_, ty) in model_types(m) {
        for d in &ty.dims {
            let DimAst::Expr {
                expr,
                default: Some(def),
            } = d
            else {
                continue;
            };
            let ExprKind::Name(sym) = &expr.kind else {
                diags.push(Diagnostic::error(
                    expr.span,
                    "only a plain symbol can have a default (`N=32`)",
                ));
                continue;
            };
            let value = match def.kind {
                ExprKind::Number {
                    value,
                    is_int: true,
                } if (0.0..1e15).contains(&value) => value as usize,
                ExprKind::Error => continue,
                _ => {
                    diags.push(Diagnostic::error(
                        def.span,
                        format!("the default of `{sym}` must be a non-negative integer"),
                    ));
                    continue;
                }
            };
            match out.get(sym) {
                Some((prev, prev_span)) if *prev != value => diags.push(
                    Diagnostic::error(
                        def.span,
                        format!("`{sym}` is given two different defaults ({prev} and {value})"),
                    )
                    .with_related(*prev_span, "first default"),
                ),
                Some(_) => {}
                None => {
                    out.insert(sym.clone(), (value, def.span));
                }
            }
        }
    }
    out
}

/// Bind symbols from the given input shapes, then from `--dim`; a
/// contradiction names both sources.
fn prebind_symbols(
    m: &ModelDef,
    opts: &ElabOptions,
    syms: &mut Symbols,
    diags: &mut Vec<Diagnostic>,
) {
    let mut origin: BTreeMap<String, (String, Span)> = BTreeMap::new();
    for (name, ty) in model_types(m) {
        let Some(name) = name else { continue };
        let Some(given) = opts.input_shapes.get(name) else {
            continue;
        };
        if given.len() != ty.dims.len() {
            diags.push(Diagnostic::error(
                ty.span,
                format!(
                    "input `{name}` is declared with rank {} ({}), but the given tensor has shape {}",
                    ty.dims.len(),
                    expand::type_text(ty),
                    crate::ir::fmt_shape(given)
                ),
            ));
            syms.conflicted.insert(name.to_string());
            for d in &ty.dims {
                if let DimAst::Expr { expr, .. } = d {
                    if let ExprKind::Name(sym) = &expr.kind {
                        syms.poisoned.insert(sym.clone());
                    }
                }
            }
            continue;
        }
        for (d, &size) in ty.dims.iter().zip(given) {
            let DimAst::Expr { expr, .. } = d else {
                continue;
            };
            let ExprKind::Name(sym) = &expr.kind else {
                continue;
            };
            match syms.bound.get(sym) {
                Some(&prev) if prev != size => {
                    let (prev_input, prev_span) = origin.get(sym).cloned().unwrap_or_default();
                    diags.push(
                        Diagnostic::error(
                            expr.span,
                            format!(
                                "dimension `{sym}` is {size} in input `{name}` but {prev} in input `{prev_input}`"
                            ),
                        )
                        .with_related(prev_span, format!("`{sym}` = {prev} here")),
                    );
                    syms.conflicted.insert(name.to_string());
                }
                Some(_) => {}
                None => {
                    syms.bound.insert(sym.clone(), size);
                    origin.insert(sym.clone(), (name.to_string(), expr.span));
                }
            }
        }
    }
    for (sym, &size) in &opts.dims {
        match syms.bound.get(sym) {
            Some(&prev) if prev != size => {
                let (input, span) = origin.get(sym).cloned().unwrap_or_default();
                syms.conflicted.insert(input.clone());
                diags.push(Diagnostic::error(
                    span,
                    format!("`--dim {sym}={size}` contradicts input `{input}`, whose shape gives `{sym}` = {prev}"),
                ));
            }
            Some(_) => {}
            None => {
                syms.bound.insert(sym.clone(), size);
            }
        }
    }
    let bound = &syms.bound;
    syms.poisoned.retain(|s| !bound.contains_key(s));
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "model m {
    input x: f32[4, 8]
    param small: f32[8, 2] = ones
    param big: f32[8, 100] = ones
    output y = x @ small
    output z = x @ big
}
";

    fn graph() -> (SourceMap, crate::ir::Graph) {
        let mut sm = SourceMap::default();
        let file = sm.add("m.dl", SRC);
        let e = elaborate(&mut sm, file, &ElabOptions::default()).expect("elaborates");
        (sm, e.model.graph)
    }

    /// Parameters and inputs take 4·(32 + 16 + 800) = 3392 bytes: a
    /// machine with less memory refuses the model at its largest tensor,
    /// one with as much (or of unknown size) accepts it.
    #[test]
    fn parameters_and_inputs_beyond_the_machine_memory_are_refused() {
        let (sm, g) = graph();
        let mut diags = Vec::new();
        check_memory(&g, Some(3391), &mut diags);
        assert_eq!(diags.len(), 1, "{diags:?}");
        let d = &diags[0];
        assert!(d.is_error());
        assert!(
            d.message.starts_with("parameter `big` takes 3.1 KiB")
                && d.message.contains("parameters and inputs 3.3 KiB")
                && d.message.contains("memory (3.3 KiB)"),
            "{}",
            d.message
        );
        let at = &sm.get(d.span.file).expect("file").text[d.span.start as usize..];
        assert!(at.starts_with("big"), "points at {at:?}");
        for memory in [Some(3392), None] {
            let mut diags = Vec::new();
            check_memory(&g, memory, &mut diags);
            assert!(diags.is_empty(), "{diags:?}");
        }
    }
}
