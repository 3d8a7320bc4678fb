//! The elaborator proper: walks a model's statements, expands fn calls,
//! names parameters, binds dimension symbols and builds the IR graph.
//!
//! Written once over [`ElabDim`]: `check` runs it over symbolic dims,
//! `elaborate` over sizes.

use super::items::{closest, Callee, Items};
use super::value::{Bound, ElabDim, Int, Val};
use crate::diag::Diagnostic;
use crate::ir::{
    BinaryOp, Graph, Init, Op, OutputKind, ShapeError, Span, TensorType, UnaryOp, Value,
};
use crate::model::TrainConfig;
use crate::syntax::ast::{
    Arg, BinOp, DimAst, Expr, ExprKind, FnDef, Ident, ModelDef, Stmt, StmtKind, TensorTypeAst,
    TypeAnn,
};
use crate::tensor::DType;
use std::collections::{BTreeMap, HashMap};

/// Fn expansion deeper than this is almost certainly runaway; recursion is
/// caught directly, this only bounds pathological chains.
const MAX_DEPTH: usize = 64;

/// Expression nesting beyond this (a 300-term sum is a left-leaning tree
/// 300 deep) is reported instead of risking the stack; the parser already
/// caps bracket nesting lower.
const MAX_EXPR_DEPTH: usize = 256;

/// Names visible in one model or one fn expansion.
pub(crate) struct Scope<D> {
    names: HashMap<String, (Val<D>, Span)>,
    /// Path of bindings that led here: the prefix of parameter names.
    prefix: String,
    /// Whether this scope's code lives in std.dl (for name resolution).
    in_std: bool,
    is_model: bool,
}

impl<D: ElabDim> Scope<D> {
    fn new(prefix: String, in_std: bool, is_model: bool) -> Self {
        Scope {
            names: HashMap::new(),
            prefix,
            in_std,
            is_model,
        }
    }
}

/// Where the expression being evaluated ends up; decides whether (and under
/// which name) a parameter-creating call may appear in it.
pub(crate) enum Ctx {
    Bind {
        /// Prefix for parameters created by the binding's call.
        prefix: String,
        binding: String,
        /// The parameter-creating call already seen in this right-hand side.
        first: Option<(String, Span)>,
    },
    Return,
    Unbound(&'static str),
}

struct Frame {
    name: String,
    in_std: bool,
    call: Span,
}

/// Symbol sizes fixed before a model is expanded (`elaborate` only).
#[derive(Default)]
pub(crate) struct Symbols {
    pub bound: BTreeMap<String, usize>,
    /// `N=32` defaults found in the model's types, with where they are.
    pub defaults: BTreeMap<String, (usize, Span)>,
    /// Inputs whose shape already contradicted another source of a symbol
    /// (reported once, not again as a declaration mismatch).
    pub conflicted: std::collections::BTreeSet<String>,
    /// Symbols left unbound only because their input was already reported.
    pub poisoned: std::collections::BTreeSet<String>,
}

pub(crate) struct Elab<'a, D: ElabDim> {
    pub(crate) items: &'a Items<'a>,
    pub graph: Graph<D>,
    pub diags: Vec<Diagnostic>,
    syms: Symbols,
    /// Every model-level symbol with its size (when known).
    pub model_dims: BTreeMap<String, usize>,
    params: HashMap<String, Span>,
    stack: Vec<Frame>,
    /// Current nesting of expression evaluation (see [`MAX_EXPR_DEPTH`]).
    depth: usize,
    /// Set once the depth error of the current outermost expression is out.
    too_deep: bool,
    pub train: TrainConfig,
    input_shapes: &'a BTreeMap<String, Vec<usize>>,
    outputs: HashMap<String, Span>,
    loss: Option<Span>,
    train_block: Option<Span>,
}

pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

impl<'a, D: ElabDim> Elab<'a, D> {
    pub fn new(
        items: &'a Items<'a>,
        syms: Symbols,
        input_shapes: &'a BTreeMap<String, Vec<usize>>,
    ) -> Self {
        Elab {
            items,
            graph: Graph::new(),
            diags: Vec::new(),
            syms,
            model_dims: BTreeMap::new(),
            params: HashMap::new(),
            stack: Vec::new(),
            depth: 0,
            too_deep: false,
            train: TrainConfig::default(),
            input_shapes,
            outputs: HashMap::new(),
            loss: None,
            train_block: None,
        }
    }

    /// Report an error; inside a fn expansion the call chain is attached so
    /// an error in std.dl also points at the user's call.
    pub(crate) fn error(&mut self, span: Span, msg: impl Into<String>) {
        let mut d = Diagnostic::error(span, msg);
        // A call that encloses the reported span (a bad argument) is already
        // on screen; fn bodies never lie inside a call expression.
        let encloses = |c: &Span| c.file == span.file && c.start <= span.start && span.end <= c.end;
        for f in self.stack.iter().rev().filter(|f| !encloses(&f.call)) {
            d = d.with_related(f.call, format!("in this call to `{}`", f.name));
        }
        self.diags.push(d);
    }

    // ---------------------------------------------------------------- model

    pub fn model(&mut self, m: &ModelDef) {
        let mut sc = Scope::new(String::new(), false, true);
        let mut ret = None;
        for st in &m.body {
            self.stmt(&mut sc, st, &mut ret);
        }
        let clean = !self.diags.iter().any(Diagnostic::is_error);
        if clean && self.outputs.is_empty() && self.loss.is_none() {
            self.diags.push(Diagnostic::warning(
                m.name.span,
                format!(
                    "model `{}` has no `output` and no `loss`, so it computes nothing",
                    m.name.name
                ),
            ));
        }
    }

    fn stmt(&mut self, sc: &mut Scope<D>, st: &Stmt, ret: &mut Option<Val<D>>) {
        if ret.is_some() {
            self.error(
                st.span,
                "this statement comes after `return` and is never reached",
            );
            return;
        }
        let model_only = |what: &str| format!("`{what}` is only allowed in a model, not in a fn");
        match &st.kind {
            StmtKind::Input { name, ty } => {
                if !sc.is_model {
                    self.error(st.span, model_only("input"));
                    return;
                }
                self.input(sc, name, ty);
            }
            StmtKind::Param { name, ty, init } => self.param(sc, name, ty, init.as_ref()),
            StmtKind::Let { name, value } => {
                let v = self.bound_expr(sc, &name.name, value);
                let _ = self.bind(sc, name, v);
            }
            StmtKind::Output { name, value } => {
                if !sc.is_model {
                    self.error(st.span, model_only("output"));
                    return;
                }
                let v = match value {
                    Some(e) => {
                        let v = self.bound_expr(sc, &name.name, e);
                        if !self.bind(sc, name, v.clone()) {
                            return;
                        }
                        v
                    }
                    None => match sc.names.get(&name.name) {
                        Some((v, _)) => v.clone(),
                        None => {
                            self.unknown_name(sc, &name.name, name.span);
                            Val::Poison
                        }
                    },
                };
                self.output(name, v);
            }
            StmtKind::Loss { keyword, value } => {
                if !sc.is_model {
                    self.error(st.span, model_only("loss"));
                    return;
                }
                let v = self.bound_expr(sc, "loss", value);
                self.loss(*keyword, value.span, v);
            }
            StmtKind::Train { entries } => {
                if !sc.is_model {
                    self.error(st.span, model_only("train"));
                    return;
                }
                if let Some(prev) = self.train_block {
                    self.diags.push(
                        Diagnostic::error(st.span, "a model has at most one `train` block")
                            .with_related(prev, "first train block"),
                    );
                    return;
                }
                self.train_block = Some(st.span);
                self.train_block(sc, entries);
            }
            StmtKind::Return(e) => {
                if sc.is_model {
                    self.error(
                        st.span,
                        "`return` is only allowed in a fn; a model names its results with `output`",
                    );
                    return;
                }
                let mut ctx = Ctx::Return;
                *ret = Some(self.expr(sc, e, &mut ctx));
            }
        }
    }

    fn bound_expr(&mut self, sc: &Scope<D>, name: &str, e: &Expr) -> Val<D> {
        let mut ctx = Ctx::Bind {
            prefix: join(&sc.prefix, name),
            binding: name.to_string(),
            first: None,
        };
        self.expr(sc, e, &mut ctx)
    }

    /// Bind a name; false (after reporting) when it is already bound.
    fn bind(&mut self, sc: &mut Scope<D>, name: &Ident, v: Val<D>) -> bool {
        if let Some((_, prev)) = sc.names.get(&name.name) {
            let prev = *prev;
            self.diags.push(
                Diagnostic::error(
                    name.span,
                    format!(
                        "`{}` is already bound; a name is bound once per scope",
                        name.name
                    ),
                )
                .with_related(prev, "first bound here")
                .with_help("choose a new name for this value"),
            );
            return false;
        }
        sc.names.insert(name.name.clone(), (v, name.span));
        true
    }

    fn input(&mut self, sc: &mut Scope<D>, name: &Ident, ty: &TensorTypeAst) {
        let Some(shape) = self.type_shape(sc, ty) else {
            let _ = self.bind(sc, name, Val::Poison);
            return;
        };
        let given = self
            .input_shapes
            .get(&name.name)
            .filter(|_| !self.syms.conflicted.contains(&name.name));
        if let Some(given) = given {
            let given_d: Vec<D> = given.iter().map(|n| D::lit(*n)).collect();
            if given_d != shape {
                self.error(
                    ty.span,
                    format!(
                        "input `{}` is declared {} = {}, but the given tensor has shape {}",
                        name.name,
                        type_text(ty),
                        crate::ir::fmt_shape(&shape),
                        crate::ir::fmt_shape(given)
                    ),
                );
            }
        }
        let v = self.graph.add_leaf(
            Op::Input {
                name: name.name.clone(),
            },
            TensorType::new(ty.dtype, shape),
            Some(name.span),
        );
        let _ = self.bind(sc, name, Val::Tensor(v));
    }

    fn param(&mut self, sc: &mut Scope<D>, name: &Ident, ty: &TensorTypeAst, init: Option<&Expr>) {
        let shape = self.type_shape(sc, ty);
        let init = match init {
            None => Some(Init::Zeros),
            Some(e) => self.init(sc, e),
        };
        if ty.dtype != DType::F32 {
            self.error(
                ty.span,
                format!(
                    "parameter `{}` must be f32 (parameters are trained), not {}",
                    name.name, ty.dtype
                ),
            );
            let _ = self.bind(sc, name, Val::Poison);
            return;
        }
        let (Some(shape), Some(init)) = (shape, init) else {
            let _ = self.bind(sc, name, Val::Poison);
            return;
        };
        let full = join(&sc.prefix, &name.name);
        if let Some(prev) = self.params.get(&full) {
            let prev = *prev;
            self.diags.push(
                Diagnostic::error(name.span, format!("parameter `{full}` is created twice"))
                    .with_related(prev, "first created here"),
            );
            let _ = self.bind(sc, name, Val::Poison);
            return;
        }
        self.params.insert(full.clone(), name.span);
        let v = self.graph.add_leaf(
            Op::Param { name: full, init },
            TensorType::f32(shape),
            Some(name.span),
        );
        let _ = self.bind(sc, name, Val::Tensor(v));
    }

    fn init(&mut self, sc: &Scope<D>, e: &Expr) -> Option<Init> {
        const KNOWN: &str =
            "expected zeros, ones, normal(std), uniform(lo, hi), glorot_uniform or he_normal";
        let (name, span, args): (&str, Span, &[Arg]) = match &e.kind {
            ExprKind::Name(n) => (n, e.span, &[]),
            ExprKind::Call { callee, args } => (&callee.name, callee.span, args),
            ExprKind::Error => return None,
            _ => {
                self.error(
                    e.span,
                    format!("a parameter initialiser must be a name or a call; {KNOWN}"),
                );
                return None;
            }
        };
        let sig: &[(&str, bool)] = match name {
            "zeros" | "ones" | "glorot_uniform" | "he_normal" => &[],
            "normal" => &[("std", true)],
            "uniform" => &[("lo", false), ("hi", false)],
            _ => {
                let hint = closest(
                    name,
                    [
                        "zeros",
                        "ones",
                        "normal",
                        "uniform",
                        "glorot_uniform",
                        "he_normal",
                    ],
                )
                .map(|c| format!("did you mean `{c}`? "))
                .unwrap_or_default();
                self.error(span, format!("unknown initialiser `{name}`; {hint}{KNOWN}"));
                return None;
            }
        };
        let mut ctx = Ctx::Unbound("a parameter initialiser");
        let bound = self.eval_and_bind_args(sc, name, sig, args, e.span, &mut ctx)?;
        let num = |this: &mut Self, i: usize, pname: &str, default: f32| -> Option<f32> {
            match &bound[i] {
                None => Some(default),
                Some((v, s)) => this.float_of(v, *s, name, pname),
            }
        };
        Some(match name {
            "zeros" => Init::Zeros,
            "ones" => Init::Ones,
            "glorot_uniform" => Init::GlorotUniform,
            "he_normal" => Init::HeNormal,
            "normal" => {
                let std = num(self, 0, "std", 1.0)?;
                if std < 0.0 {
                    self.error(
                        e.span,
                        format!("normal: `std` must not be negative, got {std}"),
                    );
                    return None;
                }
                Init::Normal { std }
            }
            _ => {
                let lo = num(self, 0, "lo", 0.0)?;
                let hi = num(self, 1, "hi", 0.0)?;
                if lo > hi {
                    self.error(
                        e.span,
                        format!("uniform: `lo` ({lo}) is greater than `hi` ({hi})"),
                    );
                    return None;
                }
                Init::Uniform { lo, hi }
            }
        })
    }

    fn output(&mut self, name: &Ident, v: Val<D>) {
        if let Some(prev) = self.outputs.get(&name.name) {
            let prev = *prev;
            self.diags.push(
                Diagnostic::error(name.span, format!("`{}` is already an output", name.name))
                    .with_related(prev, "first declared here"),
            );
            return;
        }
        self.outputs.insert(name.name.clone(), name.span);
        match v {
            Val::Tensor(t) => self
                .graph
                .push_output(name.name.clone(), OutputKind::Output, t),
            Val::Poison => {}
            other => {
                let d = self.describe(&other);
                self.error(
                    name.span,
                    format!("output `{}` must be a tensor, got {d}", name.name),
                );
            }
        }
    }

    fn loss(&mut self, keyword: Span, span: Span, v: Val<D>) {
        if let Some(prev) = self.loss {
            self.diags.push(
                Diagnostic::error(keyword, "a model has at most one `loss`")
                    .with_related(prev, "first loss here"),
            );
            return;
        }
        self.loss = Some(keyword);
        let Some(t) = self.tensor(&v, span, "the loss") else {
            return;
        };
        let ty = self.graph.ty(t).clone();
        if ty.dtype != DType::F32 || !ty.shape.is_empty() {
            self.error(
                span,
                format!("the loss must be a scalar f32[], got {ty}; reduce it, e.g. with mean(...) or sum(...)"),
            );
            return;
        }
        self.graph.push_output("loss", OutputKind::Loss, t);
    }

    // ---------------------------------------------------------------- types

    /// The shape of a declared type in a model or fn body. At model level,
    /// free names are dimension symbols and get bound here.
    fn type_shape(&mut self, sc: &mut Scope<D>, ty: &TensorTypeAst) -> Option<Vec<D>> {
        let mut shape = Vec::with_capacity(ty.dims.len());
        let mut ok = true;
        for d in &ty.dims {
            match d {
                DimAst::Ellipsis(s) => {
                    self.error(
                        *s,
                        "`...` is only allowed in the type pattern of a fn argument",
                    );
                    ok = false;
                }
                DimAst::Expr { expr, .. } => {
                    if sc.is_model {
                        self.bind_free_symbols(sc, expr);
                    }
                    match self.dim_expr(sc, expr) {
                        Some(dim) => shape.push(dim),
                        None => ok = false,
                    }
                }
            }
        }
        ok.then_some(shape)
    }

    /// Evaluate a dimension expression to a non-negative size.
    fn dim_expr(&mut self, sc: &Scope<D>, e: &Expr) -> Option<D> {
        let mut ctx = Ctx::Unbound("a type");
        let v = self.expr(sc, e, &mut ctx);
        match v {
            Val::Int(i) => match i.to_dim() {
                Some(d) => Some(d),
                None => {
                    self.error(e.span, format!("a dimension must not be negative, got {i}"));
                    None
                }
            },
            Val::Poison => None,
            other => {
                let d = self.describe(&other);
                self.error(e.span, format!("a dimension must be an integer, got {d}"));
                None
            }
        }
    }

    fn bind_free_symbols(&mut self, sc: &mut Scope<D>, e: &Expr) {
        let mut names = Vec::new();
        free_names(e, &mut names);
        for (n, span) in names {
            if sc.names.contains_key(n) {
                continue;
            }
            let v = match self.resolve_symbol(n, span) {
                Some(i) => Val::Int(i),
                None => Val::Poison,
            };
            sc.names.insert(n.to_string(), (v, span));
        }
    }

    /// A model-level symbol's value: from the inputs or `--dim` (sizes
    /// fixed before expansion), a free symbol while checking, else its
    /// default.
    fn resolve_symbol(&mut self, name: &str, span: Span) -> Option<Int<D>> {
        if let Some(&n) = self.syms.bound.get(name) {
            self.model_dims.insert(name.to_string(), n);
            // `as i64` would turn sizes past i64::MAX negative.
            let Ok(c) = i64::try_from(n) else {
                self.error(
                    span,
                    format!("dimension `{name}` = {n} is too large for any tensor"),
                );
                return None;
            };
            return Some(Int::C(c));
        }
        if let Some(d) = D::free_symbol(name) {
            return Some(Int::S(d));
        }
        if let Some((n, _)) = self.syms.defaults.get(name) {
            self.model_dims.insert(name.to_string(), *n);
            return Some(Int::C(*n as i64));
        }
        if self.syms.poisoned.contains(name) {
            return None;
        }
        self.diags.push(
            Diagnostic::error(
                span,
                format!("dimension symbol `{name}` has no size; give it with `--dim {name}=...`"),
            )
            .with_help(format!(
                "or give it a default where it first appears (`{name}=32`), or pass an input tensor that has it"
            )),
        );
        None
    }

    /// Check a fn argument against its annotation; a tensor annotation is a
    /// shape pattern whose symbols get bound in the fn's scope.
    fn check_ann(
        &mut self,
        sc: &mut Scope<D>,
        f: &str,
        arg: &str,
        ann: &TypeAnn,
        v: Val<D>,
        span: Span,
    ) -> Val<D> {
        let kind_err = |this: &mut Self, want: &str, v: &Val<D>| {
            let d = this.describe(v);
            this.error(
                span,
                format!("argument `{arg}` of `{f}` must be {want}, got {d}"),
            );
            Val::Poison
        };
        match ann {
            TypeAnn::Int(_) => match v {
                Val::Int(_) => v,
                other => kind_err(self, "an int", &other),
            },
            TypeAnn::Float(_) => match v {
                Val::Int(Int::C(n)) => Val::Float(n as f64),
                Val::Int(_) | Val::Float(_) => v,
                other => kind_err(self, "a float", &other),
            },
            TypeAnn::Bool(_) => match v {
                Val::Bool(_) => v,
                other => kind_err(self, "a bool", &other),
            },
            TypeAnn::Tensor(tt) => {
                let t = match &v {
                    Val::Tensor(t) => *t,
                    Val::Int(_) | Val::Float(_) if tt.dtype == DType::F32 => {
                        match self.tensor(&v, span, "") {
                            Some(t) => t,
                            None => return Val::Poison,
                        }
                    }
                    other => return kind_err(self, &format!("a tensor {}", type_text(tt)), other),
                };
                if self.match_pattern(sc, f, arg, tt, t, span) {
                    Val::Tensor(t)
                } else {
                    Val::Poison
                }
            }
        }
    }

    fn match_pattern(
        &mut self,
        sc: &mut Scope<D>,
        f: &str,
        arg: &str,
        tt: &TensorTypeAst,
        t: Value,
        span: Span,
    ) -> bool {
        let ty = self.graph.ty(t).clone();
        let pat = type_text(tt);
        if ty.dtype != tt.dtype {
            self.error(
                span,
                format!("argument `{arg}` of `{f}` must be {pat}, got {ty}"),
            );
            return false;
        }
        let ellipsis = matches!(tt.dims.first(), Some(DimAst::Ellipsis(_)));
        let fixed = &tt.dims[usize::from(ellipsis)..];
        if let Some(DimAst::Ellipsis(s)) = fixed.iter().find(|d| matches!(d, DimAst::Ellipsis(_))) {
            self.error(
                *s,
                "`...` may only stand for the leading dimensions of a pattern",
            );
            return false;
        }
        let rank_ok = if ellipsis {
            ty.rank() >= fixed.len()
        } else {
            ty.rank() == fixed.len()
        };
        if !rank_ok {
            let want = if ellipsis {
                format!("at least rank {}", fixed.len())
            } else {
                format!("rank {}", fixed.len())
            };
            self.error(
                span,
                format!("argument `{arg}` of `{f}` must have {want} ({pat}), got {ty}"),
            );
            return false;
        }
        let actual = ty.shape[ty.rank() - fixed.len()..].to_vec();
        for (d, a) in fixed.iter().zip(&actual) {
            let DimAst::Expr { expr, .. } = d else {
                continue;
            };
            if let ExprKind::Name(s) = &expr.kind {
                if !sc.names.contains_key(s) {
                    sc.names
                        .insert(s.clone(), (Val::Int(Int::from_dim(a)), expr.span));
                    continue;
                }
            }
            let Some(want) = self.dim_expr(sc, expr) else {
                return false;
            };
            if want != *a {
                self.error(
                    span,
                    format!(
                        "argument `{arg}` of `{f}` has size {a} where its pattern {pat} needs {} = {want}",
                        expr_text(expr)
                    ),
                );
                return false;
            }
        }
        true
    }

    // ---------------------------------------------------------- expressions

    pub(crate) fn expr(&mut self, sc: &Scope<D>, e: &Expr, ctx: &mut Ctx) -> Val<D> {
        if self.depth >= MAX_EXPR_DEPTH {
            if !self.too_deep {
                self.too_deep = true;
                self.error(
                    e.span,
                    format!("expression nested more than {MAX_EXPR_DEPTH} levels deep; split it into several bindings"),
                );
            }
            return Val::Poison;
        }
        self.depth += 1;
        let v = self.expr_inner(sc, e, ctx);
        self.depth -= 1;
        if self.depth == 0 {
            self.too_deep = false;
        }
        v
    }

    fn expr_inner(&mut self, sc: &Scope<D>, e: &Expr, ctx: &mut Ctx) -> Val<D> {
        match &e.kind {
            ExprKind::Number { value, is_int } => {
                if *is_int && value.fract() == 0.0 && value.abs() < 9.0e15 {
                    Val::Int(Int::C(*value as i64))
                } else {
                    Val::Float(*value)
                }
            }
            ExprKind::Str(s) => Val::Str(s.clone()),
            ExprKind::Bool(b) => Val::Bool(*b),
            ExprKind::Name(n) => match sc.names.get(n) {
                Some((v, _)) => v.clone(),
                None => {
                    self.unknown_name(sc, n, e.span);
                    Val::Poison
                }
            },
            ExprKind::Binary { op, lhs, rhs } => {
                let a = self.expr(sc, lhs, ctx);
                let b = self.expr(sc, rhs, ctx);
                self.binary(*op, a, b, e.span)
            }
            ExprKind::Neg(x) => {
                let v = self.expr(sc, x, ctx);
                self.neg(v, e.span)
            }
            ExprKind::Call { callee, args } => self.call(sc, e.span, callee, args, ctx),
            ExprKind::List(xs) => Val::List(xs.iter().map(|x| self.expr(sc, x, ctx)).collect()),
            ExprKind::Error => Val::Poison,
        }
    }

    fn unknown_name(&mut self, sc: &Scope<D>, n: &str, span: Span) {
        if self.items.resolve(n, sc.in_std).is_some() {
            self.error(
                span,
                format!("`{n}` is a function, not a value; call it, e.g. `{n}(x)` or `x |> {n}`"),
            );
            return;
        }
        let hint = closest(n, sc.names.keys().map(|s| s.as_str()))
            .map(|c| format!("; did you mean `{c}`?"))
            .unwrap_or_default();
        self.error(span, format!("unknown name `{n}`{hint}"));
    }

    fn binary(&mut self, op: BinOp, a: Val<D>, b: Val<D>, span: Span) -> Val<D> {
        if a.is_poison() || b.is_poison() {
            return Val::Poison;
        }
        let sym = match op {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::MatMul => "@",
        };
        match (&a, &b) {
            (Val::Int(x), Val::Int(y)) if op != BinOp::MatMul => {
                let r = match op {
                    BinOp::Add => x.add(y),
                    BinOp::Sub => x.sub(y),
                    BinOp::Mul => x.mul(y),
                    _ => x.div(y),
                };
                match r {
                    Some(r) => Val::Int(r),
                    None => {
                        let why = if op == BinOp::Div {
                            "division by zero"
                        } else {
                            "integer overflow"
                        };
                        self.error(span, format!("{why} in `{x} {sym} {y}`"));
                        Val::Poison
                    }
                }
            }
            (Val::Int(_) | Val::Float(_), Val::Int(_) | Val::Float(_)) if op != BinOp::MatMul => {
                let (Some(x), Some(y)) = (num_f64(&a), num_f64(&b)) else {
                    // A symbolic size used as a float only happens while
                    // checking, where the value is irrelevant.
                    return Val::Float(1.0);
                };
                Val::Float(match op {
                    BinOp::Add => x + y,
                    BinOp::Sub => x - y,
                    BinOp::Mul => x * y,
                    _ => x / y,
                })
            }
            _ => {
                let what = format!("the left operand of `{sym}`");
                let Some(x) = self.tensor(&a, span, &what) else {
                    return Val::Poison;
                };
                let what = format!("the right operand of `{sym}`");
                let Some(y) = self.tensor(&b, span, &what) else {
                    return Val::Poison;
                };
                match op {
                    BinOp::MatMul => self.matmul(x, y, span),
                    BinOp::Add => self.op(Op::Binary(BinaryOp::Add), &[x, y], span),
                    BinOp::Sub => self.op(Op::Binary(BinaryOp::Sub), &[x, y], span),
                    BinOp::Mul => self.op(Op::Binary(BinaryOp::Mul), &[x, y], span),
                    BinOp::Div => self.op(Op::Binary(BinaryOp::Div), &[x, y], span),
                }
            }
        }
    }

    fn neg(&mut self, v: Val<D>, span: Span) -> Val<D> {
        match v {
            Val::Poison => Val::Poison,
            Val::Int(i) => match i.neg() {
                Some(n) => Val::Int(n),
                None => {
                    self.error(span, "integer overflow in negation");
                    Val::Poison
                }
            },
            Val::Float(f) => Val::Float(-f),
            other => match self.tensor(&other, span, "the operand of `-`") {
                Some(t) => self.op(Op::Unary(UnaryOp::Neg), &[t], span),
                None => Val::Poison,
            },
        }
    }

    /// A value where a tensor is needed: numbers become `f32[]` constants.
    pub(crate) fn tensor(&mut self, v: &Val<D>, span: Span, what: &str) -> Option<Value> {
        match v {
            Val::Tensor(t) => Some(*t),
            Val::Int(_) | Val::Float(_) => {
                // A symbolic size as a value only occurs while checking,
                // whose graph is never run; any constant will do there.
                let value = num_f64(v).unwrap_or(1.0) as f32;
                Some(self.graph.add_leaf(
                    Op::Fill {
                        value,
                        shape: vec![],
                    },
                    TensorType::f32(vec![]),
                    Some(span),
                ))
            }
            Val::Poison => None,
            other => {
                let d = self.describe(other);
                self.error(span, format!("{what} must be a tensor, got {d}"));
                None
            }
        }
    }

    pub(crate) fn describe(&self, v: &Val<D>) -> String {
        match v {
            Val::Tensor(t) => format!("a tensor {}", self.graph.ty(*t)),
            Val::Int(i) => format!("the integer {i}"),
            Val::Float(f) => format!("the number {f}"),
            Val::Bool(b) => format!("the bool {b}"),
            Val::Str(s) => format!("the string \"{s}\""),
            Val::List(_) => "a list".to_string(),
            Val::Poison => "an invalid value".to_string(),
        }
    }

    /// Add an op; a shape error becomes a diagnostic at `span`, naming the
    /// parameter where an operand is one.
    pub(crate) fn op(&mut self, op: Op<D>, ins: &[Value], span: Span) -> Val<D> {
        match self.add(op, ins, span) {
            Some(v) => Val::Tensor(v),
            None => Val::Poison,
        }
    }

    pub(crate) fn add(&mut self, op: Op<D>, ins: &[Value], span: Span) -> Option<Value> {
        match self.graph.add(op.clone(), ins, Some(span)) {
            Ok(v) => Some(v),
            Err(e) => {
                let msg = self.name_params(&op, ins, e);
                self.error(span, msg);
                None
            }
        }
    }

    fn param_name(&self, v: Value) -> Option<String> {
        match &self.graph.node(v.node).op {
            Op::Param { name, .. } => Some(name.clone()),
            _ => None,
        }
    }

    fn name_params(&self, op: &Op<D>, ins: &[Value], e: ShapeError) -> String {
        let mut msg = e.message;
        let roles: &[(usize, &str)] = match op {
            Op::Conv(_) => &[(1, " the weight ")],
            Op::LstmSeq | Op::GruSeq => &[(1, " w_x "), (2, " w_h "), (3, " b ")],
            _ => &[],
        };
        for (i, word) in roles {
            if let Some(p) = ins.get(*i).and_then(|v| self.param_name(*v)) {
                msg = msg.replacen(word, &format!(" {p} "), 1);
            }
        }
        msg
    }

    pub(crate) fn matmul(&mut self, a: Value, b: Value, span: Span) -> Val<D> {
        let (ta, tb) = (self.graph.ty(a).clone(), self.graph.ty(b).clone());
        if ta.rank() == 0 || tb.rank() == 0 {
            self.error(
                span,
                format!("matmul: operands must have at least one dimension, got {ta} and {tb}"),
            );
            return Val::Poison;
        }
        // NumPy: a 1-D left operand is a row, a 1-D right operand a column;
        // the added axis is removed from the result.
        let a2 = if ta.rank() == 1 {
            let shape = vec![D::lit(1), ta.shape[0].clone()];
            match self.add(Op::Reshape { shape }, &[a], span) {
                Some(v) => v,
                None => return Val::Poison,
            }
        } else {
            a
        };
        let b2 = if tb.rank() == 1 {
            let shape = vec![tb.shape[0].clone(), D::lit(1)];
            match self.add(Op::Reshape { shape }, &[b], span) {
                Some(v) => v,
                None => return Val::Poison,
            }
        } else {
            b
        };
        let k_a = &ta.shape[ta.rank() - 1];
        let k_b = &tb.shape[tb.rank().saturating_sub(2)];
        if (ta.rank() == 1 || tb.rank() == 1) && k_a != k_b {
            self.error(
                span,
                format!(
                    "matmul: inner dimensions differ: {} @ {} ({k_a} vs {k_b})",
                    crate::ir::fmt_shape(&ta.shape),
                    crate::ir::fmt_shape(&tb.shape)
                ),
            );
            return Val::Poison;
        }
        let Some(y) = self.add(Op::MatMul, &[a2, b2], span) else {
            return Val::Poison;
        };
        if ta.rank() > 1 && tb.rank() > 1 {
            return Val::Tensor(y);
        }
        let mut shape = self.graph.ty(y).shape.clone();
        let r = shape.len();
        if tb.rank() == 1 {
            shape.remove(r - 1);
        }
        if ta.rank() == 1 {
            shape.remove(r - 2);
        }
        self.op(Op::Reshape { shape }, &[y], span)
    }

    // ---------------------------------------------------------------- calls

    fn call(
        &mut self,
        sc: &Scope<D>,
        span: Span,
        callee: &Ident,
        args: &[Arg],
        ctx: &mut Ctx,
    ) -> Val<D> {
        let target = self.items.resolve(&callee.name, sc.in_std);
        let Some(target) = target else {
            // Still look inside the arguments for their own errors.
            for a in args {
                self.expr(sc, &a.value, ctx);
            }
            let msg = self.items.unknown_fn_message(&callee.name, sc.in_std);
            self.error(callee.span, msg);
            return Val::Poison;
        };
        let (fname, sig): (String, Vec<(String, bool)>) = match target {
            Callee::Prim(p) => (
                p.name().to_string(),
                p.signature()
                    .iter()
                    .map(|(n, d)| (n.to_string(), *d))
                    .collect(),
            ),
            Callee::Fn(f, _) => (
                f.name.name.clone(),
                f.params
                    .iter()
                    .map(|p| (p.name.name.clone(), p.default.is_some()))
                    .collect(),
            ),
        };
        let sig_ref: Vec<(&str, bool)> = sig.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        let Some(bound) = self.eval_and_bind_args(sc, &fname, &sig_ref, args, span, ctx) else {
            return Val::Poison;
        };
        match target {
            Callee::Prim(p) => self.prim(p, bound, span),
            Callee::Fn(f, in_std) => self.call_fn(f, in_std, bound, span, callee, ctx),
        }
    }

    /// Evaluate a call's arguments and match them to the signature with
    /// Python's rules. `None` after an error (reported here) or when an
    /// argument is already poisoned.
    pub(crate) fn eval_and_bind_args(
        &mut self,
        sc: &Scope<D>,
        fname: &str,
        sig: &[(&str, bool)],
        args: &[Arg],
        span: Span,
        ctx: &mut Ctx,
    ) -> Option<Bound<D>> {
        let mut bound: Bound<D> = vec![None; sig.len()];
        let mut ok = true;
        let mut poisoned = false;
        let mut seen_kw = false;
        let mut npos = 0;
        for a in args {
            let v = self.expr(sc, &a.value, ctx);
            poisoned |= v.is_poison();
            match &a.name {
                None => {
                    if seen_kw {
                        self.error(
                            a.value.span,
                            format!("`{fname}`: a positional argument follows a keyword argument"),
                        );
                        ok = false;
                        continue;
                    }
                    if npos < sig.len() {
                        bound[npos] = Some((v, a.value.span));
                    } else if npos == sig.len() {
                        self.error(
                            a.value.span,
                            format!(
                                "`{fname}` takes at most {} argument{} but {} were given",
                                sig.len(),
                                if sig.len() == 1 { "" } else { "s" },
                                args.iter().filter(|a| a.name.is_none()).count()
                            ),
                        );
                        ok = false;
                    }
                    npos += 1;
                }
                Some(k) => {
                    seen_kw = true;
                    match sig.iter().position(|(n, _)| *n == k.name) {
                        None => {
                            let hint = closest(&k.name, sig.iter().map(|(n, _)| *n))
                                .map(|c| format!("; did you mean `{c}`?"))
                                .unwrap_or_default();
                            self.error(
                                k.span,
                                format!("`{fname}` has no argument named `{}`{hint}", k.name),
                            );
                            ok = false;
                        }
                        Some(i) if bound[i].is_some() => {
                            self.error(
                                k.span,
                                format!("`{fname}` got two values for argument `{}`", k.name),
                            );
                            ok = false;
                        }
                        Some(i) => bound[i] = Some((v, a.value.span)),
                    }
                }
            }
        }
        if !ok {
            return None;
        }
        let missing: Vec<&str> = sig
            .iter()
            .zip(&bound)
            .filter(|((_, has_default), b)| !has_default && b.is_none())
            .map(|((n, _), _)| *n)
            .collect();
        if !missing.is_empty() {
            let list: Vec<String> = missing.iter().map(|n| format!("`{n}`")).collect();
            self.error(
                span,
                format!(
                    "`{fname}` is missing argument{} {}",
                    if missing.len() == 1 { "" } else { "s" },
                    list.join(", ")
                ),
            );
            return None;
        }
        (!poisoned).then_some(bound)
    }

    fn call_fn(
        &mut self,
        f: &FnDef,
        in_std: bool,
        bound: Bound<D>,
        span: Span,
        callee: &Ident,
        ctx: &mut Ctx,
    ) -> Val<D> {
        let name = &f.name.name;
        if let Some(first) = self
            .stack
            .iter()
            .position(|fr| fr.name == *name && fr.in_std == in_std)
        {
            let chain: Vec<&str> = self.stack[first..]
                .iter()
                .map(|fr| fr.name.as_str())
                .chain([name.as_str()])
                .collect();
            let through = if chain.len() > 2 {
                format!(" ({})", chain.join(" -> "))
            } else {
                String::new()
            };
            self.error(
                callee.span,
                format!("`{name}` calls itself{through}; recursion is not supported because fns are expanded at each call"),
            );
            return Val::Poison;
        }
        if self.stack.len() >= MAX_DEPTH {
            self.error(
                callee.span,
                format!("fn calls are nested more than {MAX_DEPTH} deep"),
            );
            return Val::Poison;
        }
        let prefix = if self.items.creates_params(f, in_std) {
            match ctx {
                Ctx::Bind {
                    prefix,
                    binding,
                    first,
                } => {
                    if let Some((other, other_span)) = first.clone() {
                        self.diags.push(
                            Diagnostic::error(
                                callee.span,
                                format!(
                                    "the binding `{binding}` has two calls that create parameters (`{other}` and `{name}`)"
                                ),
                            )
                            .with_related(other_span, "first parameter-creating call")
                            .with_help("split the binding: bind each layer to its own name"),
                        );
                        return Val::Poison;
                    }
                    *first = Some((name.clone(), callee.span));
                    prefix.clone()
                }
                Ctx::Return => {
                    self.error(
                        callee.span,
                        format!("`{name}` creates parameters, so it cannot be called inside `return`; bind it to a name first"),
                    );
                    return Val::Poison;
                }
                Ctx::Unbound(place) => {
                    self.error(
                        callee.span,
                        format!("`{name}` creates parameters, so it cannot be called in {place}; bind it to a name"),
                    );
                    return Val::Poison;
                }
            }
        } else {
            String::new()
        };
        self.expand(f, in_std, bound, span, prefix)
    }

    fn expand(
        &mut self,
        f: &FnDef,
        in_std: bool,
        bound: Bound<D>,
        call: Span,
        prefix: String,
    ) -> Val<D> {
        self.stack.push(Frame {
            name: f.name.name.clone(),
            in_std,
            call,
        });
        let mut sc = Scope::new(prefix, in_std, false);
        let mut ok = true;
        for (p, arg) in f.params.iter().zip(bound) {
            let (v, vspan) = match (arg, &p.default) {
                (Some(a), _) => a,
                (None, Some(d)) => {
                    let mut ctx = Ctx::Unbound("a default argument");
                    (self.expr(&sc, d, &mut ctx), d.span)
                }
                (None, None) => (Val::Poison, p.span),
            };
            let v = match (&p.ann, v.is_poison()) {
                (Some(ann), false) => {
                    self.check_ann(&mut sc, &f.name.name, &p.name.name, ann, v, vspan)
                }
                (_, _) => v,
            };
            ok &= !v.is_poison();
            if let Some((_, prev)) = sc.names.get(&p.name.name) {
                let prev = *prev;
                self.diags.push(
                    Diagnostic::error(
                        p.name.span,
                        format!("`{}` is already bound in `{}`", p.name.name, f.name.name),
                    )
                    .with_related(prev, "first bound here"),
                );
                ok = false;
                continue;
            }
            sc.names.insert(p.name.name.clone(), (v, p.name.span));
        }
        let mut ret = None;
        if ok {
            for st in &f.body {
                self.stmt(&mut sc, st, &mut ret);
            }
            if ret.is_none() {
                self.error(f.name.span, format!("fn `{}` has no `return`", f.name.name));
            }
        }
        self.stack.pop();
        ret.unwrap_or(Val::Poison)
    }

    // -------------------------------------------------------- small helpers

    pub(crate) fn float_of(&mut self, v: &Val<D>, span: Span, f: &str, arg: &str) -> Option<f32> {
        match v {
            Val::Poison => None,
            Val::Int(_) | Val::Float(_) => Some(num_f64(v).unwrap_or(1.0) as f32),
            other => {
                let d = self.describe(other);
                self.error(
                    span,
                    format!("`{f}`: argument `{arg}` must be a number, got {d}"),
                );
                None
            }
        }
    }
}

/// A number's value; `None` for a symbolic size.
fn num_f64<D: ElabDim>(v: &Val<D>) -> Option<f64> {
    match v {
        Val::Int(i) => i.as_const().map(|n| n as f64),
        Val::Float(f) => Some(*f),
        _ => None,
    }
}

fn free_names<'e>(e: &'e Expr, out: &mut Vec<(&'e str, Span)>) {
    match &e.kind {
        ExprKind::Name(n) => out.push((n, e.span)),
        ExprKind::Binary { lhs, rhs, .. } => {
            free_names(lhs, out);
            free_names(rhs, out);
        }
        ExprKind::Neg(x) => free_names(x, out),
        _ => {}
    }
}

/// Source-like text of a dimension expression, for messages.
pub(crate) fn expr_text(e: &Expr) -> String {
    match &e.kind {
        ExprKind::Number { value, .. } => format!("{value}"),
        ExprKind::Name(n) => n.clone(),
        ExprKind::Neg(x) => format!("-{}", expr_text(x)),
        ExprKind::Binary { op, lhs, rhs } => {
            let s = match op {
                BinOp::Add => " + ",
                BinOp::Sub => " - ",
                BinOp::Mul => "*",
                BinOp::Div => "/",
                BinOp::MatMul => " @ ",
            };
            let wrap = |x: &Expr| match x.kind {
                ExprKind::Binary {
                    op: BinOp::Add | BinOp::Sub,
                    ..
                } if matches!(op, BinOp::Mul | BinOp::Div) => {
                    format!("({})", expr_text(x))
                }
                _ => expr_text(x),
            };
            format!("{}{s}{}", wrap(lhs), wrap(rhs))
        }
        _ => "...".to_string(),
    }
}

pub(crate) fn type_text(t: &TensorTypeAst) -> String {
    let dims: Vec<String> = t
        .dims
        .iter()
        .map(|d| match d {
            DimAst::Ellipsis(_) => "...".to_string(),
            DimAst::Expr { expr, .. } => expr_text(expr),
        })
        .collect();
    format!("{}[{}]", t.dtype, dims.join(", "))
}
