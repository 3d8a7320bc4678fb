//! Source text to syntax tree: the logos lexer and a recursive-descent parser.

pub mod ast;
pub mod lexer;
pub mod parser;

use crate::diag::Diagnostic;

/// Parses one source file. Never panics and never stops at the first
/// error: it returns the tree it could build (broken expressions become
/// `ExprKind::Error`) together with every diagnostic, in source order.
pub fn parse(src: &str, file: u32) -> (ast::File, Vec<Diagnostic>) {
    let (toks, mut diags) = lexer::lex(src, file);
    let mut p = parser::Parser::new(src, file, toks);
    let tree = p.parse_file();
    diags.append(&mut p.diags);
    diags.sort_by_key(|d| (d.span.start, d.span.end));
    (tree, diags)
}

/// A compact one-line-per-statement rendering of a tree, for tests and
/// `--emit ast`: `(let y (call relu (- a b)))`. Spans are left out.
pub fn sexpr(file: &ast::File) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for item in &file.items {
        match item {
            ast::Item::Model(m) => {
                let _ = writeln!(out, "(model {}", m.name.name);
                for s in &m.body {
                    let _ = writeln!(out, "  {}", sexpr_stmt(s));
                }
            }
            ast::Item::Fn(f) => {
                let params: Vec<String> = f.params.iter().map(sexpr_param).collect();
                let _ = writeln!(out, "(fn {} ({})", f.name.name, params.join(" "));
                for s in &f.body {
                    let _ = writeln!(out, "  {}", sexpr_stmt(s));
                }
            }
        }
        out.push_str(")\n");
    }
    out
}

fn sexpr_param(p: &ast::FnParam) -> String {
    let mut s = p.name.name.clone();
    if let Some(ann) = &p.ann {
        s.push(':');
        s.push_str(&match ann {
            ast::TypeAnn::Tensor(t) => sexpr_type(t),
            ast::TypeAnn::Int(_) => "int".into(),
            ast::TypeAnn::Float(_) => "float".into(),
            ast::TypeAnn::Bool(_) => "bool".into(),
        });
    }
    if let Some(d) = &p.default {
        s.push('=');
        s.push_str(&sexpr_expr(d));
    }
    s
}

fn sexpr_type(t: &ast::TensorTypeAst) -> String {
    let dims: Vec<String> = t
        .dims
        .iter()
        .map(|d| match d {
            ast::DimAst::Ellipsis(_) => "...".to_string(),
            ast::DimAst::Expr {
                expr,
                default: None,
            } => sexpr_expr(expr),
            ast::DimAst::Expr {
                expr,
                default: Some(v),
            } => format!("{}={}", sexpr_expr(expr), sexpr_expr(v)),
        })
        .collect();
    format!("{}[{}]", t.dtype, dims.join(" "))
}

/// One statement as an s-expression.
pub fn sexpr_stmt(s: &ast::Stmt) -> String {
    use ast::StmtKind as S;
    match &s.kind {
        S::Input { name, ty } => format!("(input {} {})", name.name, sexpr_type(ty)),
        S::Param { name, ty, init } => match init {
            Some(i) => format!("(param {} {} {})", name.name, sexpr_type(ty), sexpr_expr(i)),
            None => format!("(param {} {})", name.name, sexpr_type(ty)),
        },
        S::Let { name, value } => format!("(let {} {})", name.name, sexpr_expr(value)),
        S::Output { name, value } => match value {
            Some(v) => format!("(output {} {})", name.name, sexpr_expr(v)),
            None => format!("(output {})", name.name),
        },
        S::Loss { value, .. } => format!("(loss {})", sexpr_expr(value)),
        S::Train { entries } => {
            let e: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{}={}", k.name, sexpr_expr(v)))
                .collect();
            format!("(train {})", e.join(" "))
        }
        S::Return(e) => format!("(return {})", sexpr_expr(e)),
    }
}

/// One expression as an s-expression: `(+ a (* b c))`, `(call f x k=1)`.
pub fn sexpr_expr(e: &ast::Expr) -> String {
    use ast::ExprKind as E;
    match &e.kind {
        E::Number { value, is_int } => {
            if *is_int {
                format!("{value}")
            } else {
                format!("{value:?}")
            }
        }
        E::Str(s) => format!("{s:?}"),
        E::Bool(b) => b.to_string(),
        E::Name(n) => n.clone(),
        E::Binary { op, lhs, rhs } => {
            let o = match op {
                ast::BinOp::Add => "+",
                ast::BinOp::Sub => "-",
                ast::BinOp::Mul => "*",
                ast::BinOp::Div => "/",
                ast::BinOp::MatMul => "@",
            };
            format!("({o} {} {})", sexpr_expr(lhs), sexpr_expr(rhs))
        }
        E::Neg(x) => format!("(neg {})", sexpr_expr(x)),
        E::Call { callee, args } => {
            let mut s = format!("(call {}", callee.name);
            for a in args {
                s.push(' ');
                if let Some(n) = &a.name {
                    s.push_str(&n.name);
                    s.push('=');
                }
                s.push_str(&sexpr_expr(&a.value));
            }
            s.push(')');
            s
        }
        E::List(items) => {
            let v: Vec<String> = items.iter().map(sexpr_expr).collect();
            format!("[{}]", v.join(" "))
        }
        E::Error => "<error>".to_string(),
    }
}
