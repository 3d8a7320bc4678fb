//! Robustness of the front end: random token soups, arbitrary text and
//! mutated versions of real models go through `parse`, then through
//! elaboration (`elab::check` over symbols and `elab::elaborate` at the
//! default sizes); none may panic, and every span they report (diagnostics
//! and tree nodes) must lie inside its file (the user's or std.dl), on char
//! boundaries, so rendering can always show it.
//!
//! A second property runs the other way: random valid programs, printed
//! with minimal parentheses and random line breaks, parse back to the same
//! tree with no diagnostics; they too go through elaboration, which sees
//! nonsense that parses (wrong arities, unknown names, shapes that clash).
//!
//! Cases: `DLC_FUZZ_CASES` (default 2000) per property.

#[path = "fuzz_frontend/corpus.rs"]
mod corpus;
#[path = "fuzz_frontend/roundtrip.rs"]
mod roundtrip;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use dlc::diag::{render, Diagnostic, SourceMap};
use dlc::elab::{check, elaborate, ElabOptions};
use dlc::ir::Span;
use dlc::syntax::ast::{
    DimAst, Expr, ExprKind, File, Item, Stmt, StmtKind, TensorTypeAst, TypeAnn,
};
use dlc::syntax::{parse, sexpr};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Real sources: the embedded corpus plus any `.dl` file the repository
/// itself holds under `lang/` or `tests/golden/`.
fn sources() -> Vec<String> {
    let mut out: Vec<String> = corpus::CORPUS.iter().map(|(_, s)| s.to_string()).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["lang", "tests/golden"] {
        collect_dl(&root.join(dir), &mut out);
    }
    out
}

fn collect_dl(dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_dl(&p, out);
        } else if p.extension().is_some_and(|x| x == "dl") {
            if let Ok(text) = std::fs::read_to_string(&p) {
                out.push(text);
            }
        }
    }
}

/// Pieces that token soups and mutations are made of: every token kind,
/// near-misses of tokens, error characters and multi-byte text.
const PIECES: &[&str] = &[
    "model",
    "fn",
    "input",
    "param",
    "output",
    "loss",
    "train",
    "return",
    "int",
    "float",
    "bool",
    "f32",
    "i32",
    "true",
    "false",
    "x",
    "y",
    "N",
    "dense",
    "relu",
    "conv2d",
    "_a1",
    "12",
    "0.5",
    "1e-4",
    "3.",
    "25e-2",
    "1e",
    "1e+",
    ".5",
    "3..4",
    "12abc",
    "\"same\"",
    "\"open",
    "=",
    "|>",
    "|",
    ">",
    "+",
    "-",
    "*",
    "/",
    "@",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "...",
    "..",
    ".",
    ";",
    "\n",
    "\n\n",
    " ",
    "\t",
    "\r\n",
    "# comment\n",
    "$",
    "%",
    "!",
    "é",
    "→",
    "😀",
    "\u{0}",
    "\u{feff}",
    "N=32",
    "f32[N, 784]",
    "x |> dense(3)",
    "k=2",
];

fn piece() -> impl Strategy<Value = String> {
    prop::sample::select(PIECES).prop_map(str::to_string)
}

fn token_soup() -> impl Strategy<Value = String> {
    prop::collection::vec((piece(), prop::bool::ANY), 0..80).prop_map(|v| {
        v.into_iter()
            .map(|(p, space)| if space { p + " " } else { p })
            .collect()
    })
}

#[derive(Clone, Debug)]
enum Mutation {
    Delete {
        at: usize,
        len: usize,
    },
    Insert {
        at: usize,
        text: String,
    },
    Duplicate {
        at: usize,
        len: usize,
    },
    Truncate {
        at: usize,
    },
    /// Replace the `at`-th number with another: keeps the source parsing
    /// so sizes that shape rules must refuse (0, huge, overflowing) reach
    /// the elaborator.
    Number {
        at: usize,
        text: &'static str,
    },
}

const NUMBERS: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "7",
    "64",
    "1000000",
    "4294967296",
    "18446744073709551616",
    "99999999999999999999999",
    "0.5",
    "1e308",
    "1e-45",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => (any::<usize>(), 1usize..12).prop_map(|(at, len)| Mutation::Delete { at, len }),
        2 => (any::<usize>(), piece()).prop_map(|(at, text)| Mutation::Insert { at, text }),
        2 => (any::<usize>(), 1usize..40).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
        2 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        3 => number_mutation(),
    ]
}

fn number_mutation() -> impl Strategy<Value = Mutation> {
    (any::<usize>(), prop::sample::select(NUMBERS))
        .prop_map(|(at, text)| Mutation::Number { at, text })
}

/// Applies mutations on chars, so the result is always valid UTF-8 (the
/// parser takes `&str`; byte-level damage is the file reader's concern).
fn mutate(src: &str, muts: &[Mutation]) -> String {
    let mut c: Vec<char> = src.chars().collect();
    for m in muts {
        let n = c.len() + 1;
        match m {
            Mutation::Delete { at, len } => {
                let a = at % n;
                let b = (a + len).min(c.len());
                c.drain(a.min(b)..b);
            }
            Mutation::Insert { at, text } => {
                let a = at % n;
                c.splice(a..a, text.chars());
            }
            Mutation::Duplicate { at, len } => {
                let a = at % n;
                let b = (a + len).min(c.len());
                let dup: Vec<char> = c[a.min(b)..b].to_vec();
                c.splice(a..a, dup);
            }
            Mutation::Truncate { at } => c.truncate(at % n),
            Mutation::Number { at, text } => {
                let runs = digit_runs(&c);
                if !runs.is_empty() {
                    let (a, b) = runs[at % runs.len()];
                    c.splice(a..b, text.chars());
                }
            }
        }
    }
    c.into_iter().collect()
}

/// Char ranges of the maximal digit runs that start a number (not the
/// digits inside a name like `h1`).
fn digit_runs(c: &[char]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let starts = c[i].is_ascii_digit()
            && (i == 0 || !(c[i - 1].is_alphanumeric() || c[i - 1] == '_' || c[i - 1] == '.'));
        if starts {
            let a = i;
            while i < c.len() && c[i].is_ascii_digit() {
                i += 1;
            }
            runs.push((a, i));
        } else {
            i += 1;
        }
    }
    runs
}

fn check_span(src: &str, file: u32, span: Span, what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(span.file, file, "{} span in the wrong file", what);
    prop_assert!(span.start <= span.end, "{} span reversed: {:?}", what, span);
    prop_assert!(
        (span.end as usize) <= src.len(),
        "{} span past the end: {:?} (len {})",
        what,
        span,
        src.len()
    );
    prop_assert!(
        src.is_char_boundary(span.start as usize) && src.is_char_boundary(span.end as usize),
        "{} span splits a char: {:?}",
        what,
        span
    );
    Ok(())
}

fn walk_type(t: &TensorTypeAst, spans: &mut Vec<Span>) {
    spans.push(t.span);
    for d in &t.dims {
        match d {
            DimAst::Ellipsis(s) => spans.push(*s),
            DimAst::Expr { expr, default } => {
                walk_expr(expr, spans);
                if let Some(e) = default {
                    walk_expr(e, spans);
                }
            }
        }
    }
}

fn walk_expr(e: &Expr, spans: &mut Vec<Span>) {
    spans.push(e.span);
    match &e.kind {
        ExprKind::Binary { lhs, rhs, .. } => {
            walk_expr(lhs, spans);
            walk_expr(rhs, spans);
        }
        ExprKind::Neg(x) => walk_expr(x, spans),
        ExprKind::Call { callee, args } => {
            spans.push(callee.span);
            for a in args {
                if let Some(n) = &a.name {
                    spans.push(n.span);
                }
                walk_expr(&a.value, spans);
            }
        }
        ExprKind::List(items) => items.iter().for_each(|x| walk_expr(x, spans)),
        _ => {}
    }
}

fn walk_stmt(s: &Stmt, spans: &mut Vec<Span>) {
    spans.push(s.span);
    match &s.kind {
        StmtKind::Input { name, ty } => {
            spans.push(name.span);
            walk_type(ty, spans);
        }
        StmtKind::Param { name, ty, init } => {
            spans.push(name.span);
            walk_type(ty, spans);
            if let Some(e) = init {
                walk_expr(e, spans);
            }
        }
        StmtKind::Let { name, value } => {
            spans.push(name.span);
            walk_expr(value, spans);
        }
        StmtKind::Output { name, value } => {
            spans.push(name.span);
            if let Some(e) = value {
                walk_expr(e, spans);
            }
        }
        StmtKind::Loss { keyword, value } => {
            spans.push(*keyword);
            walk_expr(value, spans);
        }
        StmtKind::Train { entries } => {
            for (k, v) in entries {
                spans.push(k.span);
                walk_expr(v, spans);
            }
        }
        StmtKind::Return(e) => walk_expr(e, spans),
    }
}

fn tree_spans(file: &File) -> Vec<Span> {
    let mut spans = Vec::new();
    for item in &file.items {
        match item {
            Item::Model(m) => {
                spans.extend([m.span, m.name.span]);
                m.body.iter().for_each(|s| walk_stmt(s, &mut spans));
            }
            Item::Fn(f) => {
                spans.extend([f.span, f.name.span]);
                for p in &f.params {
                    spans.extend([p.span, p.name.span]);
                    match &p.ann {
                        Some(TypeAnn::Tensor(t)) => walk_type(t, &mut spans),
                        Some(TypeAnn::Int(s) | TypeAnn::Float(s) | TypeAnn::Bool(s)) => {
                            spans.push(*s)
                        }
                        None => {}
                    }
                    if let Some(d) = &p.default {
                        walk_expr(d, &mut spans);
                    }
                }
                f.body.iter().for_each(|s| walk_stmt(s, &mut spans));
            }
        }
    }
    spans
}

/// The whole front-end contract on one input.
fn check_frontend(src: &str) -> Result<(), TestCaseError> {
    const FILE: u32 = 3;
    let (tree, diags) = parse(src, FILE);
    for d in &diags {
        check_span(src, FILE, d.span, "diagnostic")?;
        for (s, _) in &d.related {
            check_span(src, FILE, *s, "related")?;
        }
        prop_assert!(!d.message.is_empty());
    }
    for s in tree_spans(&tree) {
        check_span(src, FILE, s, "tree")?;
    }
    let mut map = SourceMap::default();
    for i in 0..=FILE {
        map.add(format!("f{i}.dl"), if i == FILE { src } else { "" });
    }
    let out = render(&diags, &map);
    prop_assert_eq!(out.matches("error").count() >= diags.len(), true);
    check_elab(src)
}

/// Every span of an elaboration diagnostic lies inside the file it names,
/// which must be one the map holds (the user's file or std.dl).
fn check_diag_spans(map: &SourceMap, diags: &[Diagnostic]) -> Result<(), TestCaseError> {
    for d in diags {
        prop_assert!(!d.message.is_empty());
        let spans = std::iter::once((d.span, "elab diagnostic"))
            .chain(d.related.iter().map(|(s, _)| (*s, "elab related")));
        for (s, what) in spans {
            let file = map.get(s.file);
            prop_assert!(
                file.is_some(),
                "{} span in unknown file: {:?} ({})",
                what,
                s,
                d.message
            );
            if let Some(f) = file {
                check_span(&f.text, s.file, s, what)?;
            }
        }
    }
    Ok(())
}

/// Sources that elaborated to a graph, to show the fuzzing reaches past
/// the error paths.
static ELABORATED: AtomicUsize = AtomicUsize::new(0);

/// Elaboration of one source: symbolic `check`, then `elaborate` with the
/// default options (first model, `N=32`-style defaults). Either may report
/// anything, but must not panic and must point inside the sources.
fn check_elab(src: &str) -> Result<(), TestCaseError> {
    let mut map = SourceMap::default();
    let file = map.add("user.dl", src);
    let diags = check(&mut map, file);
    check_diag_spans(&map, &diags)?;
    let _ = render(&diags, &map);

    let mut map = SourceMap::default();
    let file = map.add("user.dl", src);
    let diags = match elaborate(&mut map, file, &ElabOptions::default()) {
        Ok(e) => {
            ELABORATED.fetch_add(1, Ordering::Relaxed);
            e.warnings
        }
        Err(d) => {
            prop_assert!(
                d.iter().any(Diagnostic::is_error),
                "elaborate failed without an error: {:?}",
                d
            );
            d
        }
    };
    check_diag_spans(&map, &diags)?;
    let _ = render(&diags, &map);

    // Sizes bound from outside (`--dim`), including ones the CLI refuses
    // (0) and ones whose products overflow: the library must still answer
    // with diagnostics.
    let size = EXTREME_SIZES[src.len() % EXTREME_SIZES.len()];
    let opts = ElabOptions {
        dims: ["N", "T", "D", "M", "K", "P", "H", "W", "C"]
            .iter()
            .map(|s| (s.to_string(), size))
            .collect(),
        ..ElabOptions::default()
    };
    let mut map = SourceMap::default();
    let file = map.add("user.dl", src);
    let diags = match elaborate(&mut map, file, &opts) {
        Ok(e) => e.warnings,
        Err(d) => d,
    };
    check_diag_spans(&map, &diags)?;
    Ok(())
}

const EXTREME_SIZES: &[usize] = &[0, 1, 2, 5, 1 << 20, 1 << 33, usize::MAX / 3, usize::MAX];

fn cases() -> u32 {
    std::env::var("DLC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

#[test]
fn corpus_parses_cleanly() {
    let mut valid: Vec<String> = corpus::CORPUS.iter().map(|(_, s)| s.to_string()).collect();
    // The standard library is parsed on every compile; it must stay clean.
    let std_dl = Path::new(env!("CARGO_MANIFEST_DIR")).join("lang/std.dl");
    if let Ok(text) = std::fs::read_to_string(std_dl) {
        valid.push(text);
    }
    for src in valid {
        let (tree, diags) = parse(&src, 0);
        assert!(
            diags.is_empty(),
            "diagnostics for a valid model: {diags:?}\n{src}"
        );
        assert!(!tree.items.is_empty());
    }
}

#[test]
fn fuzz_parse_never_panics_and_spans_stay_inside() {
    let corpus = sources();
    let n = corpus.len();
    let input = prop_oneof![
        2 => token_soup(),
        1 => any::<String>(),
        4 => (0..n, prop::collection::vec(mutation(), 1..6))
            .prop_map({
                let corpus = corpus.clone();
                move |(i, muts)| mutate(&corpus[i], &muts)
            }),
        // Only sizes changed: most of these still parse and name things
        // right, so they exercise shape rules rather than recovery.
        2 => (0..n, prop::collection::vec(number_mutation(), 1..4))
            .prop_map(move |(i, muts)| mutate(&corpus[i], &muts)),
    ];
    let cases = cases();
    let start = std::time::Instant::now();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&input, |src| check_frontend(&src));
    eprintln!(
        "fuzz_frontend: {cases} cases in {:.1?} ({} elaborated to a graph, both tests)",
        start.elapsed(),
        ELABORATED.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn random_programs_round_trip() {
    let cases = cases();
    let start = std::time::Instant::now();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let input = (roundtrip::file(), prop::collection::vec(any::<u8>(), 0..64));
    let result = runner.run(&input, |(tree, noise)| {
        let src = roundtrip::Printer::new(&noise).file(&tree);
        let (parsed, diags) = parse(&src, 0);
        prop_assert!(diags.is_empty(), "diagnostics {:?} for\n{}", diags, src);
        prop_assert_eq!(sexpr(&parsed), sexpr(&tree), "source:\n{}", src);
        check_elab(&src)
    });
    eprintln!("round trip: {cases} cases in {:.1?}", start.elapsed());
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Found by the `--dim` pass of the fuzzer: a size past i64::MAX wrapped
/// to a negative number and was reported as "must not be negative, got -1".
#[test]
fn dim_past_i64_max_is_reported_as_too_large() {
    let src = "model m {\n    input x: f32[N, 4]\n    output y = x\n}\n";
    let mut map = SourceMap::default();
    let file = map.add("user.dl", src);
    let opts = ElabOptions {
        dims: [("N".to_string(), usize::MAX)].into_iter().collect(),
        ..ElabOptions::default()
    };
    let Err(diags) = elaborate(&mut map, file, &opts) else {
        panic!("N = usize::MAX elaborated");
    };
    let msgs: Vec<&str> = diags.iter().map(|d| d.message.as_str()).collect();
    assert!(
        msgs.iter()
            .any(|m| m.contains("`N`") && m.contains("too large")),
        "{msgs:?}"
    );
    assert!(!msgs.iter().any(|m| m.contains("negative")), "{msgs:?}");
    let at = diags[0].span;
    assert_eq!(&src[at.start as usize..at.end as usize], "N");
}
