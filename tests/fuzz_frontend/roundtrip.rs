//! Random valid programs for the round-trip property: a generated tree is
//! printed as source with the fewest parentheses the precedence table
//! allows (and random line breaks where the language permits them), parsed
//! back, and must give the same tree. The printer follows LANGUAGE.md's
//! precedence independently of the parser, so a precedence or desugaring
//! slip in either shows up as a mismatch.

use dlc::ir::Span;
use dlc::syntax::ast::*;
use dlc::tensor::DType;
use proptest::prelude::*;

const NAMES: &[&str] = &[
    "x", "y", "h1", "_t", "N", "D", "relu_out", "modelx", "inputs",
];
const FUNCS: &[&str] = &["f", "dense", "relu", "conv2d", "sum", "g_2"];
const KEYS: &[&str] = &["k", "axis", "pad", "lr"];

fn ident(name: &str) -> Ident {
    Ident {
        name: name.to_string(),
        span: Span::default(),
    }
}

fn mk(kind: ExprKind) -> Expr {
    Expr {
        kind,
        span: Span::default(),
    }
}

fn leaf() -> impl Strategy<Value = Expr> {
    prop_oneof![
        3 => prop::sample::select(NAMES).prop_map(|n| mk(ExprKind::Name(n.to_string()))),
        2 => (0u32..1000).prop_map(|v| mk(ExprKind::Number { value: f64::from(v), is_int: true })),
        1 => prop::sample::select(&[0.5, 1e-4, 3.0, 0.25, 2.5e10, 1e-30][..])
            .prop_map(|value| mk(ExprKind::Number { value, is_int: false })),
        1 => prop::sample::select(&["same", "valid", ""][..]).prop_map(|s| mk(ExprKind::Str(s.to_string()))),
        1 => any::<bool>().prop_map(|b| mk(ExprKind::Bool(b))),
    ]
}

pub fn expr() -> impl Strategy<Value = Expr> {
    let ops = [
        BinOp::Add,
        BinOp::Sub,
        BinOp::Mul,
        BinOp::Div,
        BinOp::MatMul,
    ];
    leaf().prop_recursive(5, 48, 4, move |inner| {
        prop_oneof![
            3 => (inner.clone(), inner.clone(), prop::sample::select(ops.to_vec())).prop_map(
                |(l, r, op)| mk(ExprKind::Binary { op, lhs: Box::new(l), rhs: Box::new(r) })
            ),
            1 => inner.clone().prop_map(|x| mk(ExprKind::Neg(Box::new(x)))),
            2 => (
                prop::sample::select(FUNCS),
                prop::collection::vec((prop::option::of(prop::sample::select(KEYS)), inner.clone()), 0..4),
            )
                .prop_map(|(f, args)| {
                    let mut args: Vec<Arg> = args
                        .into_iter()
                        .map(|(k, value)| Arg { name: k.map(ident), value })
                        .collect();
                    // Keyword arguments come last, as the language requires.
                    args.sort_by_key(|a| a.name.is_some());
                    mk(ExprKind::Call { callee: ident(f), args })
                }),
            1 => prop::collection::vec(inner, 0..4).prop_map(|v| mk(ExprKind::List(v))),
        ]
    })
}

fn dim() -> impl Strategy<Value = DimAst> {
    prop_oneof![
        Just(DimAst::Ellipsis(Span::default())),
        expr().prop_map(|e| DimAst::Expr {
            expr: e,
            default: None
        }),
        (prop::sample::select(NAMES), 1u32..100).prop_map(|(n, v)| DimAst::Expr {
            expr: mk(ExprKind::Name(n.to_string())),
            default: Some(mk(ExprKind::Number {
                value: f64::from(v),
                is_int: true
            })),
        }),
    ]
}

fn tensor_type() -> impl Strategy<Value = TensorTypeAst> {
    (any::<bool>(), prop::collection::vec(dim(), 0..4)).prop_map(|(f, dims)| TensorTypeAst {
        dtype: if f { DType::F32 } else { DType::I32 },
        dims,
        span: Span::default(),
    })
}

fn stmt(in_fn: bool) -> impl Strategy<Value = Stmt> {
    let name = || prop::sample::select(NAMES).prop_map(ident);
    let common = prop_oneof![
        4 => (name(), expr()).prop_map(|(name, value)| StmtKind::Let { name, value }),
        1 => (name(), tensor_type(), prop::option::of(expr()))
            .prop_map(|(name, ty, init)| StmtKind::Param { name, ty, init }),
    ];
    let kind = if in_fn {
        prop_oneof![3 => common, 1 => expr().prop_map(StmtKind::Return)].boxed()
    } else {
        prop_oneof![
            4 => common,
            1 => (name(), tensor_type()).prop_map(|(name, ty)| StmtKind::Input { name, ty }),
            1 => (name(), prop::option::of(expr())).prop_map(|(name, value)| StmtKind::Output { name, value }),
            1 => expr().prop_map(|value| StmtKind::Loss { keyword: Span::default(), value }),
            1 => prop::collection::vec((prop::sample::select(KEYS).prop_map(ident), expr()), 0..3)
                .prop_map(|entries| StmtKind::Train { entries }),
        ]
        .boxed()
    };
    kind.prop_map(|kind| Stmt {
        kind,
        span: Span::default(),
    })
}

fn param() -> impl Strategy<Value = FnParam> {
    let ann = prop_oneof![
        Just(TypeAnn::Int(Span::default())),
        Just(TypeAnn::Float(Span::default())),
        Just(TypeAnn::Bool(Span::default())),
        tensor_type().prop_map(TypeAnn::Tensor),
    ];
    (
        prop::sample::select(NAMES),
        prop::option::of(ann),
        prop::option::of(expr()),
    )
        .prop_map(|(n, ann, default)| FnParam {
            name: ident(n),
            ann,
            default,
            span: Span::default(),
        })
}

pub fn file() -> impl Strategy<Value = File> {
    let item = prop_oneof![
        (
            prop::sample::select(FUNCS),
            prop::collection::vec(param(), 0..4),
            prop::collection::vec(stmt(true), 0..5)
        )
            .prop_map(|(n, params, body)| Item::Fn(FnDef {
                name: ident(n),
                params,
                body,
                span: Span::default(),
            })),
        (
            prop::sample::select(NAMES),
            prop::collection::vec(stmt(false), 0..6)
        )
            .prop_map(|(n, body)| {
                Item::Model(ModelDef {
                    name: ident(n),
                    body,
                    span: Span::default(),
                })
            }),
    ];
    prop::collection::vec(item, 0..4).prop_map(|items| File { items })
}

/// Prints a tree as `.dl` source. `noise` picks among the equivalent
/// spellings (pipe or call, line break or space, `;` or newline).
pub struct Printer<'n> {
    out: String,
    noise: &'n [u8],
    at: usize,
}

const PIPE: u8 = 1;
const ADD: u8 = 2;
const MUL: u8 = 3;
const NEG: u8 = 4;

impl<'n> Printer<'n> {
    pub fn new(noise: &'n [u8]) -> Self {
        Printer {
            out: String::new(),
            noise,
            at: 0,
        }
    }

    fn coin(&mut self, one_in: u8) -> bool {
        if self.noise.is_empty() {
            return false;
        }
        let v = self.noise[self.at % self.noise.len()];
        self.at += 1;
        v.is_multiple_of(one_in)
    }

    /// A space, or a line break where the statement continues anyway.
    fn gap(&mut self) {
        if self.coin(4) {
            self.out.push_str("\n        ");
        } else {
            self.out.push(' ');
        }
    }

    pub fn file(mut self, f: &File) -> String {
        for item in &f.items {
            match item {
                Item::Fn(d) => {
                    self.out.push_str(&format!("fn {}(", d.name.name));
                    for (i, p) in d.params.iter().enumerate() {
                        if i > 0 {
                            self.out.push(',');
                            self.gap();
                        }
                        self.out.push_str(&p.name.name);
                        match &p.ann {
                            Some(TypeAnn::Int(_)) => self.out.push_str(": int"),
                            Some(TypeAnn::Float(_)) => self.out.push_str(": float"),
                            Some(TypeAnn::Bool(_)) => self.out.push_str(": bool"),
                            Some(TypeAnn::Tensor(t)) => {
                                self.out.push_str(": ");
                                self.ty(t);
                            }
                            None => {}
                        }
                        if let Some(e) = &p.default {
                            self.out.push_str(" = ");
                            self.expr(e, PIPE);
                        }
                    }
                    self.out.push_str(") {\n");
                    self.body(&d.body);
                }
                Item::Model(m) => {
                    self.out.push_str(&format!("model {} {{\n", m.name.name));
                    self.body(&m.body);
                }
            }
            self.out.push_str("}\n\n");
        }
        self.out
    }

    fn body(&mut self, stmts: &[Stmt]) {
        for s in stmts {
            self.out.push_str("    ");
            self.stmt(s);
            if self.coin(5) {
                self.out.push_str("; ");
            } else if self.coin(5) {
                self.out.push_str("  # note\n\n");
            } else {
                self.out.push('\n');
            }
        }
    }

    fn stmt(&mut self, s: &Stmt) {
        match &s.kind {
            StmtKind::Input { name, ty } => {
                self.out.push_str(&format!("input {}: ", name.name));
                self.ty(ty);
            }
            StmtKind::Param { name, ty, init } => {
                self.out.push_str(&format!("param {}: ", name.name));
                self.ty(ty);
                if let Some(e) = init {
                    self.out.push_str(" =");
                    self.gap();
                    self.expr(e, PIPE);
                }
            }
            StmtKind::Let { name, value } => {
                self.out.push_str(&format!("{} =", name.name));
                self.gap();
                self.expr(value, PIPE);
            }
            StmtKind::Output { name, value } => {
                self.out.push_str(&format!("output {}", name.name));
                if let Some(e) = value {
                    self.out.push_str(" = ");
                    self.expr(e, PIPE);
                }
            }
            StmtKind::Loss { value, .. } => {
                self.out.push_str("loss = ");
                self.expr(value, PIPE);
            }
            StmtKind::Train { entries } => {
                self.out.push_str("train {");
                for (k, v) in entries {
                    self.out.push_str(&format!("\n        {} = ", k.name));
                    self.expr(v, PIPE);
                }
                self.out.push_str("\n    }");
            }
            StmtKind::Return(e) => {
                self.out.push_str("return ");
                self.expr(e, PIPE);
            }
        }
    }

    fn ty(&mut self, t: &TensorTypeAst) {
        self.out.push_str(&format!("{}[", t.dtype));
        for (i, d) in t.dims.iter().enumerate() {
            if i > 0 {
                self.out.push_str(", ");
            }
            match d {
                DimAst::Ellipsis(_) => self.out.push_str("..."),
                DimAst::Expr { expr, default } => {
                    // A dim is an additive expression: a pipe needs parens.
                    self.expr(expr, ADD);
                    if let Some(v) = default {
                        self.out.push('=');
                        self.expr(v, ADD);
                    }
                }
            }
        }
        self.out.push(']');
    }

    fn open_if(&mut self, cond: bool) {
        if cond {
            self.out.push('(');
        }
    }

    fn close_if(&mut self, cond: bool) {
        if cond {
            self.out.push(')');
        }
    }

    /// Prints `e` where an expression of precedence at least `min` is
    /// expected, adding parentheses only when its own is lower.
    fn expr(&mut self, e: &Expr, min: u8) {
        match &e.kind {
            ExprKind::Number { value, is_int } => {
                if *is_int {
                    self.out.push_str(&format!("{value}"));
                } else {
                    self.out.push_str(&format!("{value:?}"));
                }
            }
            ExprKind::Str(s) => self.out.push_str(&format!("\"{s}\"")),
            ExprKind::Bool(b) => self.out.push_str(&b.to_string()),
            ExprKind::Name(n) => self.out.push_str(n),
            ExprKind::Binary { op, lhs, rhs } => {
                let (p, sym) = match op {
                    BinOp::Add => (ADD, "+"),
                    BinOp::Sub => (ADD, "-"),
                    BinOp::Mul => (MUL, "*"),
                    BinOp::Div => (MUL, "/"),
                    BinOp::MatMul => (MUL, "@"),
                };
                let paren = p < min;
                self.open_if(paren);
                self.expr(lhs, p);
                self.out.push(' ');
                self.out.push_str(sym);
                self.gap();
                self.expr(rhs, p + 1);
                self.close_if(paren);
            }
            ExprKind::Neg(x) => {
                let paren = NEG < min;
                self.open_if(paren);
                self.out.push('-');
                self.expr(x, NEG);
                self.close_if(paren);
            }
            ExprKind::Call { callee, args } => {
                let pipe = args.first().is_some_and(|a| a.name.is_none()) && self.coin(2);
                if pipe {
                    let paren = PIPE < min;
                    self.open_if(paren);
                    self.expr(&args[0].value, PIPE);
                    if self.coin(3) {
                        self.out.push_str("\n        |> ");
                    } else {
                        self.out.push_str(" |> ");
                    }
                    self.out.push_str(&callee.name);
                    if args.len() > 1 || self.coin(2) {
                        self.args(&args[1..]);
                    }
                    self.close_if(paren);
                } else {
                    self.out.push_str(&callee.name);
                    self.args(args);
                }
            }
            ExprKind::List(items) => {
                self.out.push('[');
                for (i, x) in items.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                        self.gap();
                    }
                    self.expr(x, PIPE);
                }
                self.out.push(']');
            }
            ExprKind::Error => self.out.push_str("<error>"),
        }
    }

    fn args(&mut self, args: &[Arg]) {
        self.out.push('(');
        for (i, a) in args.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
                self.gap();
            }
            if let Some(n) = &a.name {
                self.out.push_str(&n.name);
                self.out.push('=');
            }
            self.expr(&a.value, PIPE);
        }
        self.out.push(')');
    }
}
