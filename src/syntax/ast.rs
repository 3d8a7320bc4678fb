//! The syntax tree of a `.dl` file. Every node carries its source span.
//!
//! Sugar is removed by the parser where it is purely syntactic: `a |> f(b)`
//! becomes the call `f(a, b)` and `a @ b` the binary op `MatMul`.

pub use crate::ir::Span;

/// An identifier with its location.
#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A parsed file: its items in source order.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Fn(FnDef),
    Model(ModelDef),
}

/// `fn NAME(ARG, ARG = DEFAULT, ...) { STATEMENT* }`
#[derive(Clone, Debug, PartialEq)]
pub struct FnDef {
    pub name: Ident,
    pub params: Vec<FnParam>,
    pub body: Vec<Stmt>,
    pub span: Span,
}

/// One formal argument: `x`, `x: f32[N, C]`, `units: int`, `k = 3`.
#[derive(Clone, Debug, PartialEq)]
pub struct FnParam {
    pub name: Ident,
    pub ann: Option<TypeAnn>,
    pub default: Option<Expr>,
    pub span: Span,
}

/// `model NAME { STATEMENT* }`
#[derive(Clone, Debug, PartialEq)]
pub struct ModelDef {
    pub name: Ident,
    pub body: Vec<Stmt>,
    pub span: Span,
}

/// An argument annotation.
#[derive(Clone, Debug, PartialEq)]
pub enum TypeAnn {
    Tensor(TensorTypeAst),
    Int(Span),
    Float(Span),
    Bool(Span),
}

/// `f32[N=32, 784]`, `i32[...]`, `f32[]`, `f32[..., D]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorTypeAst {
    pub dtype: crate::tensor::DType,
    pub dims: Vec<DimAst>,
    pub span: Span,
}

/// One dimension of a tensor type.
#[derive(Clone, Debug, PartialEq)]
pub enum DimAst {
    /// `...`: any number of leading dimensions (shape patterns only).
    Ellipsis(Span),
    /// An integer expression over symbols, with an optional default for a
    /// symbol at its first appearance (`N=32`; then `expr` is the name `N`).
    Expr { expr: Expr, default: Option<Expr> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stmt {
    pub kind: StmtKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum StmtKind {
    /// `input NAME: TYPE`
    Input { name: Ident, ty: TensorTypeAst },
    /// `param NAME: TYPE [= INIT]`
    Param {
        name: Ident,
        ty: TensorTypeAst,
        init: Option<Expr>,
    },
    /// `NAME = EXPR`
    Let { name: Ident, value: Expr },
    /// `output NAME = EXPR` or `output NAME`
    Output { name: Ident, value: Option<Expr> },
    /// `loss = EXPR` (`name` is the `loss` keyword's span)
    Loss { keyword: Span, value: Expr },
    /// `train { KEY = EXPR ... }`
    Train { entries: Vec<(Ident, Expr)> },
    /// `return EXPR`
    Return(Expr),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    MatMul,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    /// A number literal; `is_int` when written without `.` or exponent.
    Number {
        value: f64,
        is_int: bool,
    },
    Str(String),
    Bool(bool),
    Name(String),
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    Neg(Box<Expr>),
    /// `f(args)`; also the desugared form of `a |> f(args)`, where `a` is
    /// the first positional argument.
    Call {
        callee: Ident,
        args: Vec<Arg>,
    },
    /// `[e1, e2, ...]`
    List(Vec<Expr>),
    /// Placeholder left by error recovery; elaboration skips it silently
    /// (its diagnostic was already reported).
    Error,
}

/// A call argument, positional or `key=value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
}
