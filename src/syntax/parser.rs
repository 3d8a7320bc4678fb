//! Recursive-descent parser with precedence climbing for expressions.
//!
//! Error handling: a parse function that meets something it cannot use
//! reports one diagnostic and returns `Err(Fail)`. The nearest statement
//! (or item) catches it, skips to a boundary (newline, `;`, `}` or the next
//! item keyword) and carries on, so every independent error in a file is
//! reported. Values of statements that fail become `ExprKind::Error`, so the
//! binding still exists and elaboration does not cascade "undefined name".
//!
//! Newlines: they end statements, except inside `( )` and `[ ]` (tracked by
//! `open`), after an operator, `=` or `,` at the end of a line, and before a
//! line that starts with `|>`.
//!
//! The grammar, for reference (`SEP` is a newline or `;`):
//!
//! ```text
//! file    = item*
//! item    = "model" NAME "{" stmt* "}"
//!         | "fn" NAME "(" [param ("," param)* [","]] ")" "{" stmt* "}"
//! param   = NAME [":" ("int" | "float" | "bool" | ttype)] ["=" expr]
//! stmt    = "input" NAME ":" ttype | "param" NAME ":" ttype ["=" expr]
//!         | NAME "=" expr | "output" NAME ["=" expr] | "loss" "=" expr
//!         | "train" "{" (NAME "=" expr)* "}" | "return" expr        (then SEP)
//! ttype   = ("f32" | "i32") "[" [dim ("," dim)* [","]] "]"
//! dim     = "..." | add ["=" add]
//! expr    = add ("|>" NAME ["(" args ")"])*        -- desugared to calls
//! add     = mul (("+" | "-") mul)*
//! mul     = unary (("*" | "/" | "@") unary)*
//! unary   = "-" unary | primary
//! primary = NUMBER | STRING | "true" | "false" | NAME ["(" args ")"]
//!         | "(" expr ")" | "[" [expr ("," expr)* [","]] "]"
//! args    = [arg ("," arg)* [","]],  arg = [NAME "="] expr  (keywords last)
//! ```

use super::ast::*;
use super::lexer::{Tok, Token};
use crate::diag::Diagnostic;
use crate::tensor::DType;

/// A diagnostic was already recorded; unwind to the nearest recovery point.
#[derive(Debug)]
pub(crate) struct Fail;

type PResult<T> = Result<T, Fail>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Model,
    Fn,
}

pub(crate) struct Parser<'s> {
    src: &'s str,
    file: u32,
    toks: Vec<Token>,
    pos: usize,
    /// Currently open `(` / `[` tokens; while any is open, newlines are
    /// insignificant.
    open: Vec<Token>,
    prev_end: u32,
    /// Current expression nesting, bounded so that hostile input such as
    /// 100 000 `(` is an error rather than a stack overflow.
    nesting: u32,
    pub(crate) diags: Vec<Diagnostic>,
}

/// Deeper expressions than this are rejected (real models nest < 10).
const MAX_NESTING: u32 = 200;

fn sp(file: u32, start: u32, end: u32) -> Span {
    Span {
        file,
        start,
        end: end.max(start),
    }
}

/// Tokens that the lexer already reported: the parser stays quiet about them.
fn is_error_tok(t: Tok) -> bool {
    matches!(t, Tok::Unknown | Tok::BadNumber | Tok::UnterminatedStr)
}

fn starts_stmt(t: Tok) -> bool {
    matches!(
        t,
        Tok::Input | Tok::Param | Tok::Output | Tok::Loss | Tok::Train | Tok::Return
    )
}

impl<'s> Parser<'s> {
    pub(crate) fn new(src: &'s str, file: u32, mut toks: Vec<Token>) -> Self {
        if toks.last().is_none_or(|t| t.kind != Tok::Eof) {
            let end = u32::try_from(src.len()).unwrap_or(u32::MAX);
            toks.push(Token {
                kind: Tok::Eof,
                span: sp(file, end, end),
            });
        }
        Parser {
            src,
            file,
            toks,
            pos: 0,
            open: Vec::new(),
            prev_end: 0,
            nesting: 0,
            diags: Vec::new(),
        }
    }

    // ---- token access -------------------------------------------------

    fn raw(&self, i: usize) -> Token {
        // The stream always ends with Eof; reading past it yields Eof again.
        self.toks[i.min(self.toks.len() - 1)]
    }

    /// The current token; inside brackets newlines are skipped first.
    fn peek_tok(&mut self) -> Token {
        if !self.open.is_empty() {
            while self.raw(self.pos).kind == Tok::Newline {
                self.pos += 1;
            }
        }
        self.raw(self.pos)
    }

    fn peek(&mut self) -> Tok {
        self.peek_tok().kind
    }

    /// The token after the current one (newlines skipped inside brackets).
    fn peek2(&mut self) -> Tok {
        self.peek_tok();
        let mut i = self.pos + 1;
        if !self.open.is_empty() {
            while self.raw(i).kind == Tok::Newline {
                i += 1;
            }
        }
        self.raw(i).kind
    }

    fn bump(&mut self) -> Token {
        let t = self.peek_tok();
        if t.kind != Tok::Eof {
            self.pos += 1;
            self.prev_end = t.span.end;
        }
        t
    }

    fn at(&mut self, k: Tok) -> bool {
        self.peek() == k
    }

    fn eat(&mut self, k: Tok) -> Option<Token> {
        if self.at(k) {
            Some(self.bump())
        } else {
            None
        }
    }

    fn skip_newlines(&mut self) {
        while self.raw(self.pos).kind == Tok::Newline {
            self.pos += 1;
        }
    }

    /// After a token that carries the statement onto the next line (an
    /// operator, `=`, `|>`): skips the line break, unless what follows
    /// cannot continue anything (`}` or the end of the file); then the error
    /// points at the end of this line, where the text is missing.
    fn continue_line(&mut self) {
        let mut j = self.pos;
        while self.raw(j).kind == Tok::Newline {
            j += 1;
        }
        if !matches!(self.raw(j).kind, Tok::RBrace | Tok::Eof) {
            self.pos = j;
        }
    }

    fn skip_separators(&mut self) {
        while matches!(self.raw(self.pos).kind, Tok::Newline | Tok::Semi) {
            self.pos += 1;
        }
    }

    /// Whether the token at `i` is the first on its line.
    fn at_line_start(&self, i: usize) -> bool {
        i == 0 || self.raw(i - 1).kind == Tok::Newline
    }

    /// How the token is named in a message: its text for names and numbers.
    fn show(&self, t: Token) -> String {
        match t.kind {
            Tok::Ident | Tok::IntLit | Tok::FloatLit | Tok::BadNumber | Tok::Str => {
                format!("'{}'", self.text(t.span))
            }
            k => k.describe().to_string(),
        }
    }

    fn text(&self, span: Span) -> &'s str {
        self.src
            .get(span.start as usize..span.end as usize)
            .unwrap_or("")
    }

    fn span_from(&self, start: u32) -> Span {
        sp(self.file, start, self.prev_end)
    }

    // ---- diagnostics --------------------------------------------------

    fn error(&mut self, d: Diagnostic) -> Fail {
        self.diags.push(d);
        Fail
    }

    /// Reports `message, found X` at token `t`, unless the lexer already
    /// reported `t` (then the second message would only be noise).
    fn unexpected(&mut self, t: Token, expected: &str) -> Fail {
        if !is_error_tok(t.kind) {
            let found = self.show(t);
            self.diags.push(Diagnostic::error(
                t.span,
                format!("{expected}, found {found}"),
            ));
        }
        Fail
    }

    /// Called when the innermost bracket `open` cannot continue with the
    /// current token: either the bracket was never closed (the token is on a
    /// later line, or the file ended) or the token is simply out of place.
    fn bad_in_bracket(&mut self, open: Token, close: Tok, expected: &str) -> Fail {
        let t = self.peek_tok();
        let o = open.kind.describe();
        let c = close.describe();
        if t.kind == Tok::Eof {
            return self.error(Diagnostic::error(
                open.span,
                format!("unclosed {o} — expected {c} before the end of the file"),
            ));
        }
        if self.pos > 0 && self.raw(self.pos - 1).kind == Tok::Newline {
            // A string left open swallowed the closing bracket: the lexer
            // already said so, and that is the one thing to fix.
            let swallowed = self.toks[..self.pos]
                .iter()
                .rev()
                .take_while(|x| x.span.start > open.span.start)
                .any(|x| x.kind == Tok::UnterminatedStr);
            // Rewind to the end of the line that should have closed the
            // bracket, so recovery resumes with the next line's statement.
            while self.pos > 0 && self.raw(self.pos - 1).kind == Tok::Newline {
                self.pos -= 1;
            }
            self.open.clear();
            if swallowed {
                return Fail;
            }
            return self.error(Diagnostic::error(
                open.span,
                format!("unclosed {o} — expected {c} before the end of the line"),
            ));
        }
        if matches!(t.kind, Tok::RParen | Tok::RBracket | Tok::RBrace) {
            return self.error(
                Diagnostic::error(
                    t.span,
                    format!(
                        "mismatched {} — expected {c} to close {o}",
                        t.kind.describe()
                    ),
                )
                .with_related(open.span, format!("{o} opened here")),
            );
        }
        self.unexpected(t, expected)
    }

    // ---- recovery -----------------------------------------------------

    /// Skips the rest of a broken statement: up to a newline or `;` outside
    /// brackets, a `}` that closes the enclosing body, or the next item.
    fn recover_stmt(&mut self) {
        let mut nesting = self.open.len();
        let mut braces = 0usize;
        self.open.clear();
        loop {
            let t = self.raw(self.pos);
            match t.kind {
                Tok::Eof => break,
                Tok::Newline | Tok::Semi if nesting == 0 => break,
                Tok::Newline => {
                    // An unclosed bracket must not swallow the whole body:
                    // a line starting with a statement keyword starts anew.
                    let mut j = self.pos;
                    while self.raw(j).kind == Tok::Newline {
                        j += 1;
                    }
                    let next = self.raw(j).kind;
                    if starts_stmt(next) || matches!(next, Tok::Model | Tok::Fn) {
                        break;
                    }
                }
                Tok::RBrace if braces == 0 => break,
                Tok::RBrace => braces -= 1,
                Tok::LBrace => braces += 1,
                Tok::LParen | Tok::LBracket => nesting += 1,
                Tok::RParen | Tok::RBracket => nesting = nesting.saturating_sub(1),
                Tok::Model | Tok::Fn if self.at_line_start(self.pos) => break,
                _ => {}
            }
            self.pos += 1;
            self.prev_end = t.span.end;
        }
    }

    /// Skips to the next `model` / `fn` that starts a line.
    fn recover_item(&mut self) {
        self.open.clear();
        loop {
            let t = self.raw(self.pos);
            match t.kind {
                Tok::Eof => break,
                Tok::Model | Tok::Fn if self.at_line_start(self.pos) => break,
                _ => self.pos += 1,
            }
        }
    }

    // ---- items --------------------------------------------------------

    pub(crate) fn parse_file(&mut self) -> File {
        let mut items = Vec::new();
        loop {
            self.skip_separators();
            let t = self.peek_tok();
            match t.kind {
                Tok::Eof => break,
                Tok::Model => {
                    if let Some(m) = self.parse_model() {
                        items.push(Item::Model(m));
                    }
                }
                Tok::Fn => {
                    if let Some(f) = self.parse_fn() {
                        items.push(Item::Fn(f));
                    }
                }
                Tok::RBrace | Tok::RParen | Tok::RBracket => {
                    self.diags.push(Diagnostic::error(
                        t.span,
                        format!("unmatched {} — no bracket is open here", t.kind.describe()),
                    ));
                    self.pos += 1;
                    self.recover_item();
                }
                _ => {
                    let mut d = Diagnostic::error(
                        t.span,
                        format!(
                            "expected 'model' or 'fn' to start an item, found {}",
                            self.show(t)
                        ),
                    );
                    if t.kind == Tok::Ident && self.peek2() == Tok::LBrace {
                        d = d.with_help(format!(
                            "write 'model {} {{ ... }}' to define a model",
                            self.text(t.span)
                        ));
                    } else if t.kind == Tok::Ident && self.peek2() == Tok::LParen {
                        d = d.with_help(format!(
                            "write 'fn {}(...) {{ ... }}' to define a fn",
                            self.text(t.span)
                        ));
                    }
                    if !is_error_tok(t.kind) {
                        self.diags.push(d);
                    }
                    self.pos += 1;
                    self.recover_item();
                }
            }
        }
        File { items }
    }

    fn parse_model(&mut self) -> Option<ModelDef> {
        let kw = self.bump();
        let header = (|| -> PResult<(Ident, Token)> {
            let name = self.expect_name("after 'model'")?;
            self.skip_newlines();
            let t = self.peek_tok();
            if t.kind != Tok::LBrace {
                return Err(self.unexpected(t, "expected '{' after the model name"));
            }
            Ok((name, self.bump()))
        })();
        let Ok((name, lbrace)) = header else {
            self.recover_item();
            return None;
        };
        let body = self.parse_body(BodyKind::Model, lbrace);
        Some(ModelDef {
            name,
            body,
            span: self.span_from(kw.span.start),
        })
    }

    fn parse_fn(&mut self) -> Option<FnDef> {
        let kw = self.bump();
        let name = match self.expect_name("after 'fn'") {
            Ok(n) => n,
            Err(Fail) => {
                self.recover_item();
                return None;
            }
        };
        let mut params = Vec::new();
        let header_ok = self.parse_params(&mut params).is_ok();
        if !header_ok {
            // Keep the fn (with the parameters read so far) when its body
            // can be found, so errors inside the body are reported too.
            self.open.clear();
            loop {
                let t = self.raw(self.pos);
                match t.kind {
                    Tok::LBrace | Tok::Eof => break,
                    Tok::Model | Tok::Fn if self.at_line_start(self.pos) => break,
                    _ => self.pos += 1,
                }
            }
        }
        if header_ok {
            self.skip_newlines();
        }
        let t = self.peek_tok();
        if t.kind != Tok::LBrace {
            if header_ok {
                self.unexpected(t, "expected '{' and the fn body after the parameter list");
            }
            self.recover_item();
            return None;
        }
        let lbrace = self.bump();
        let body = self.parse_body(BodyKind::Fn, lbrace);
        Some(FnDef {
            name,
            params,
            body,
            span: self.span_from(kw.span.start),
        })
    }

    fn parse_params(&mut self, params: &mut Vec<FnParam>) -> PResult<()> {
        let t = self.peek_tok();
        if t.kind != Tok::LParen {
            return Err(self.unexpected(t, "expected '(' and the parameter list after the fn name"));
        }
        let open = self.bump();
        self.open.push(open);
        loop {
            if self.at(Tok::RParen) {
                self.bump();
                self.open.pop();
                return Ok(());
            }
            let name = self.expect_name("for a parameter")?;
            let ann = if self.eat(Tok::Colon).is_some() {
                Some(self.parse_ann()?)
            } else {
                None
            };
            let default = if self.eat(Tok::Eq).is_some() {
                Some(self.parse_expr()?)
            } else {
                None
            };
            params.push(FnParam {
                span: self.span_from(name.span.start),
                name,
                ann,
                default,
            });
            if self.list_sep(open, Tok::RParen, "expected ',' or ')' after a parameter")? {
                return Ok(());
            }
        }
    }

    /// After a list element: eats `,` (returns false) or the closing
    /// bracket (returns true, popping `open`).
    fn list_sep(&mut self, open: Token, close: Tok, expected: &str) -> PResult<bool> {
        let t = self.peek_tok();
        if t.kind == Tok::Comma {
            self.bump();
            return Ok(false);
        }
        if t.kind == close {
            self.bump();
            self.open.pop();
            return Ok(true);
        }
        Err(self.bad_in_bracket(open, close, expected))
    }

    fn parse_ann(&mut self) -> PResult<TypeAnn> {
        let t = self.peek_tok();
        match t.kind {
            Tok::Int => Ok(TypeAnn::Int(self.bump().span)),
            Tok::Float => Ok(TypeAnn::Float(self.bump().span)),
            Tok::Bool => Ok(TypeAnn::Bool(self.bump().span)),
            Tok::F32 | Tok::I32 => Ok(TypeAnn::Tensor(self.parse_tensor_type()?)),
            _ => Err(self.unexpected(
                t,
                "expected a type ('int', 'float', 'bool' or a tensor type such as f32[N, C])",
            )),
        }
    }

    fn expect_name(&mut self, ctx: &str) -> PResult<Ident> {
        let t = self.peek_tok();
        if t.kind == Tok::Ident {
            self.bump();
            return Ok(Ident {
                name: self.text(t.span).to_string(),
                span: t.span,
            });
        }
        if t.kind.is_keyword() && !matches!(t.kind, Tok::Model | Tok::Fn) {
            // Reported, but parsing goes on as if it were the name, so the
            // rest of the item is still checked.
            self.bump();
            self.diags.push(Diagnostic::error(
                t.span,
                format!(
                    "{} is a keyword and cannot be used as a name",
                    t.kind.describe()
                ),
            ));
            return Ok(Ident {
                name: self.text(t.span).to_string(),
                span: t.span,
            });
        }
        if t.kind.is_keyword() {
            return Err(self.error(Diagnostic::error(
                t.span,
                format!(
                    "{} is a keyword and cannot be used as a name",
                    t.kind.describe()
                ),
            )));
        }
        Err(self.unexpected(t, &format!("expected a name {ctx}")))
    }

    // ---- statements ---------------------------------------------------

    fn parse_body(&mut self, kind: BodyKind, lbrace: Token) -> Vec<Stmt> {
        let mut body = Vec::new();
        loop {
            self.skip_separators();
            let t = self.peek_tok();
            match t.kind {
                Tok::RBrace => {
                    self.bump();
                    return body;
                }
                Tok::Eof => {
                    self.diags.push(Diagnostic::error(
                        lbrace.span,
                        "unclosed '{' — expected '}' before the end of the file",
                    ));
                    return body;
                }
                Tok::Model | Tok::Fn => {
                    self.diags.push(
                        Diagnostic::error(
                            lbrace.span,
                            format!(
                                "unclosed '{{' — expected '}}' before the next item ({})",
                                t.kind.describe()
                            ),
                        )
                        .with_related(t.span, "next item starts here"),
                    );
                    return body;
                }
                _ => {}
            }
            let before = self.pos;
            match self.parse_stmt(kind) {
                Ok(stmt) => {
                    let end = self.peek_tok();
                    if !matches!(end.kind, Tok::Newline | Tok::Semi | Tok::RBrace | Tok::Eof) {
                        self.unexpected(
                            end,
                            "expected the end of the statement (a new line or ';')",
                        );
                        self.recover_stmt();
                    }
                    if let Some(s) = stmt {
                        body.push(s);
                    }
                }
                Err(Fail) => self.recover_stmt(),
            }
            self.ensure_progress(before);
        }
    }

    /// Guarantees that every round of a statement loop consumes input, so
    /// no combination of errors can make the parser spin.
    fn ensure_progress(&mut self, before: usize) {
        if self.pos <= before {
            self.pos = before + 1;
            self.open.clear();
        }
    }

    /// An expression that, when it cannot be parsed, becomes an
    /// `ExprKind::Error` after the statement's rest is skipped.
    fn value_expr(&mut self) -> Expr {
        let start = self.peek_tok().span.start;
        match self.parse_expr() {
            Ok(e) => e,
            Err(Fail) => {
                self.recover_stmt();
                Expr {
                    kind: ExprKind::Error,
                    span: self.span_from(start),
                }
            }
        }
    }

    /// Eats `=` (and a line break after it), or reports `message`.
    fn expect_eq(&mut self, message: &str) -> PResult<()> {
        let t = self.peek_tok();
        if t.kind == Tok::Eq {
            self.bump();
            self.continue_line();
            Ok(())
        } else {
            Err(self.unexpected(t, message))
        }
    }

    /// Returns `Ok(None)` for a statement that was parsed but is not allowed
    /// here (already reported).
    fn parse_stmt(&mut self, kind: BodyKind) -> PResult<Option<Stmt>> {
        let t = self.peek_tok();
        let start = t.span.start;
        let stmt = match t.kind {
            Tok::Input => {
                self.bump();
                let name = self.expect_name("after 'input'")?;
                let c = self.peek_tok();
                if c.kind != Tok::Colon {
                    return Err(self.unexpected(c, "expected ':' and a tensor type after the input name"));
                }
                self.bump();
                let ty = self.parse_tensor_type()?;
                StmtKind::Input { name, ty }
            }
            Tok::Param => {
                self.bump();
                let name = self.expect_name("after 'param'")?;
                let c = self.peek_tok();
                if c.kind != Tok::Colon {
                    return Err(self.unexpected(c, "expected ':' and a tensor type after the param name"));
                }
                self.bump();
                let ty = self.parse_tensor_type()?;
                let init = if self.eat(Tok::Eq).is_some() {
                    self.continue_line();
                    Some(self.value_expr())
                } else {
                    let t = self.peek_tok();
                    if !matches!(t.kind, Tok::Newline | Tok::Semi | Tok::RBrace | Tok::Eof) {
                        return Err(self.unexpected(
                            t,
                            "expected '=' and an initialiser (or the end of the statement) after the param type",
                        ));
                    }
                    None
                };
                StmtKind::Param { name, ty, init }
            }
            Tok::Output => {
                self.bump();
                let name = self.expect_name("after 'output'")?;
                let value = if self.eat(Tok::Eq).is_some() {
                    self.continue_line();
                    Some(self.value_expr())
                } else {
                    None
                };
                StmtKind::Output { name, value }
            }
            Tok::Loss => {
                let kw = self.bump();
                if self.peek() != Tok::Eq {
                    let found = self.peek_tok();
                    let d = Diagnostic::error(
                        found.span,
                        format!("'loss' takes '=' and an expression, found {}", self.show(found)),
                    )
                    .with_help("write 'loss = EXPR'");
                    if !is_error_tok(found.kind) {
                        self.diags.push(d);
                    }
                    return Err(Fail);
                }
                self.expect_eq("")?;
                StmtKind::Loss {
                    keyword: kw.span,
                    value: self.value_expr(),
                }
            }
            Tok::Train => {
                self.bump();
                StmtKind::Train {
                    entries: self.parse_train_entries()?,
                }
            }
            Tok::Return => {
                self.bump();
                StmtKind::Return(self.value_expr())
            }
            Tok::Ident => {
                self.bump();
                let name = Ident {
                    name: self.text(t.span).to_string(),
                    span: t.span,
                };
                if self.peek() == Tok::Colon {
                    let c = self.peek_tok();
                    return Err(self.error(
                        Diagnostic::error(
                            c.span,
                            format!("expected '=' after '{0}' in a binding '{0} = EXPR', found ':'", name.name),
                        )
                        .with_help(format!(
                            "declare an input with 'input {0}: TYPE' or a parameter with 'param {0}: TYPE'",
                            name.name
                        )),
                    ));
                }
                self.expect_eq(&format!(
                    "expected '=' after '{0}' in a binding '{0} = EXPR'",
                    name.name
                ))?;
                StmtKind::Let {
                    name,
                    value: self.value_expr(),
                }
            }
            Tok::Ellipsis => {
                return Err(self.error(Diagnostic::error(
                    t.span,
                    "'...' is only allowed inside a tensor type, as in f32[..., D]",
                )))
            }
            k if k.is_keyword() && self.peek2() == Tok::Eq => {
                return Err(self.error(Diagnostic::error(
                    t.span,
                    format!("{} is a keyword and cannot be used as a name", k.describe()),
                )))
            }
            Tok::RParen | Tok::RBracket => {
                return Err(self.error(Diagnostic::error(
                    t.span,
                    format!("unmatched {} — no bracket is open here", t.kind.describe()),
                )))
            }
            _ => {
                return Err(self.unexpected(
                    t,
                    "expected a statement ('NAME = EXPR', 'input', 'param', 'output', 'loss', 'train' or 'return')",
                ))
            }
        };
        let span = self.span_from(start);
        let misplaced = match (kind, &stmt) {
            (BodyKind::Fn, StmtKind::Input { .. }) => Some("'input'"),
            (BodyKind::Fn, StmtKind::Output { .. }) => Some("'output'"),
            (BodyKind::Fn, StmtKind::Loss { .. }) => Some("'loss'"),
            (BodyKind::Fn, StmtKind::Train { .. }) => Some("'train'"),
            _ => None,
        };
        if let Some(what) = misplaced {
            self.diags.push(Diagnostic::error(
                t.span,
                format!(
                    "{what} is not allowed in a fn; a fn body holds bindings, 'param' and 'return'"
                ),
            ));
            return Ok(None);
        }
        if kind == BodyKind::Model && matches!(stmt, StmtKind::Return(_)) {
            self.diags.push(
                Diagnostic::error(t.span, "'return' is only allowed in a fn")
                    .with_help("a model names its results with 'output NAME = EXPR'"),
            );
            return Ok(None);
        }
        Ok(Some(Stmt { kind: stmt, span }))
    }

    fn parse_train_entries(&mut self) -> PResult<Vec<(Ident, Expr)>> {
        self.skip_newlines();
        let t = self.peek_tok();
        if t.kind != Tok::LBrace {
            return Err(self.unexpected(t, "expected '{' after 'train'"));
        }
        let lbrace = self.bump();
        let mut entries = Vec::new();
        loop {
            while matches!(
                self.raw(self.pos).kind,
                Tok::Newline | Tok::Semi | Tok::Comma
            ) {
                self.pos += 1;
            }
            let t = self.peek_tok();
            match t.kind {
                Tok::RBrace => {
                    self.bump();
                    return Ok(entries);
                }
                Tok::Eof => {
                    return Err(self.error(Diagnostic::error(
                        lbrace.span,
                        "unclosed '{' — expected '}' before the end of the file",
                    )))
                }
                Tok::Model | Tok::Fn => {
                    return Err(self.error(Diagnostic::error(
                        lbrace.span,
                        format!(
                            "unclosed '{{' — expected '}}' before the next item ({})",
                            t.kind.describe()
                        ),
                    )))
                }
                _ => {}
            }
            let before = self.pos;
            let entry = (|| -> PResult<(Ident, Expr)> {
                let key = self.expect_name("for a training setting (such as 'optimizer')")?;
                self.expect_eq(&format!(
                    "expected '=' after the training setting '{}'",
                    key.name
                ))?;
                Ok((key, self.value_expr()))
            })();
            match entry {
                Ok(e) => {
                    entries.push(e);
                    let end = self.peek_tok();
                    if !matches!(
                        end.kind,
                        Tok::Newline | Tok::Semi | Tok::Comma | Tok::RBrace | Tok::Eof
                    ) {
                        self.unexpected(
                            end,
                            "expected the end of the training setting (a new line or ';')",
                        );
                        self.recover_stmt();
                    }
                }
                Err(Fail) => self.recover_stmt(),
            }
            self.ensure_progress(before);
        }
    }

    // ---- types --------------------------------------------------------

    fn parse_tensor_type(&mut self) -> PResult<TensorTypeAst> {
        let t = self.peek_tok();
        let dtype = match t.kind {
            Tok::F32 => DType::F32,
            Tok::I32 => DType::I32,
            Tok::Int | Tok::Float | Tok::Bool => {
                return Err(self.error(
                    Diagnostic::error(
                        t.span,
                        format!(
                            "expected a tensor type, found the scalar type {}",
                            t.kind.describe()
                        ),
                    )
                    .with_help("inputs and params are tensors: write f32[] for a scalar"),
                ))
            }
            _ => return Err(self.unexpected(t, "expected a tensor type such as f32[N, 784]")),
        };
        self.bump();
        let l = self.peek_tok();
        if l.kind != Tok::LBracket {
            return Err(self.unexpected(
                l,
                &format!(
                    "expected '[' and the dimensions after {} (write {}[] for a scalar)",
                    t.kind.describe(),
                    dtype
                ),
            ));
        }
        let open = self.bump();
        self.open.push(open);
        let mut dims = Vec::new();
        loop {
            if self.at(Tok::RBracket) {
                self.bump();
                self.open.pop();
                break;
            }
            if let Some(e) = self.eat(Tok::Ellipsis) {
                dims.push(DimAst::Ellipsis(e.span));
            } else {
                let expr = self.parse_additive()?;
                let default = if let Some(eq) = self.eat(Tok::Eq) {
                    if !matches!(expr.kind, ExprKind::Name(_)) {
                        return Err(self.error(Diagnostic::error(
                            eq.span,
                            "a default ('N=32') can only follow a symbol name",
                        )));
                    }
                    Some(self.parse_additive()?)
                } else {
                    None
                };
                dims.push(DimAst::Expr { expr, default });
            }
            if self.list_sep(open, Tok::RBracket, "expected ',' or ']' after a dimension")? {
                break;
            }
        }
        Ok(TensorTypeAst {
            dtype,
            dims,
            span: self.span_from(t.span.start),
        })
    }

    // ---- expressions --------------------------------------------------

    pub(crate) fn parse_expr(&mut self) -> PResult<Expr> {
        self.nesting += 1;
        let r = self.parse_pipe();
        self.nesting -= 1;
        r
    }

    fn parse_pipe(&mut self) -> PResult<Expr> {
        let mut lhs = self.parse_additive()?;
        loop {
            if self.peek() != Tok::Pipe {
                // A line that starts with `|>` continues the pipeline.
                let mut j = self.pos;
                while self.raw(j).kind == Tok::Newline {
                    j += 1;
                }
                if j == self.pos || self.raw(j).kind != Tok::Pipe {
                    break;
                }
                self.pos = j;
            }
            self.bump();
            self.continue_line();
            let t = self.peek_tok();
            if self.open.is_empty() && !starts_expr(t.kind) {
                return Err(self.unexpected(t, "expected a function name or a call after '|>'"));
            }
            let rhs = self.parse_additive()?;
            let span = sp(self.file, lhs.span.start, rhs.span.end);
            lhs = match rhs.kind {
                ExprKind::Name(name) => Expr {
                    kind: ExprKind::Call {
                        callee: Ident {
                            name,
                            span: rhs.span,
                        },
                        args: vec![Arg {
                            name: None,
                            value: lhs,
                        }],
                    },
                    span,
                },
                ExprKind::Call { callee, mut args } => {
                    args.insert(
                        0,
                        Arg {
                            name: None,
                            value: lhs,
                        },
                    );
                    Expr {
                        kind: ExprKind::Call { callee, args },
                        span,
                    }
                }
                // Already reported where it was parsed.
                ExprKind::Error => Expr {
                    kind: ExprKind::Error,
                    span,
                },
                _ => {
                    let shown = self.text(rhs.span);
                    let shown = if shown.chars().count() > 40 {
                        format!("{}…", shown.chars().take(40).collect::<String>())
                    } else {
                        shown.to_string()
                    };
                    self.diags.push(
                        Diagnostic::error(
                            rhs.span,
                            format!("the right side of '|>' must be a function name or a call, found '{shown}'"),
                        )
                        .with_help("'|>' passes its left side as the first argument: 'x |> f(a)' is 'f(x, a)'"),
                    );
                    Expr {
                        kind: ExprKind::Error,
                        span,
                    }
                }
            };
        }
        Ok(lhs)
    }

    fn binary(&mut self, lhs: Expr, op: BinOp, rhs: Expr) -> Expr {
        Expr {
            span: sp(self.file, lhs.span.start, rhs.span.end),
            kind: ExprKind::Binary {
                op,
                lhs: Box::new(lhs),
                rhs: Box::new(rhs),
            },
        }
    }

    fn parse_additive(&mut self) -> PResult<Expr> {
        let mut lhs = self.parse_mul()?;
        loop {
            let op = match self.peek() {
                Tok::Plus => BinOp::Add,
                Tok::Minus => BinOp::Sub,
                _ => return Ok(lhs),
            };
            self.bump();
            self.continue_line();
            let rhs = self.parse_mul()?;
            lhs = self.binary(lhs, op, rhs);
        }
    }

    fn parse_mul(&mut self) -> PResult<Expr> {
        let mut lhs = self.parse_unary()?;
        loop {
            let op = match self.peek() {
                Tok::Star => BinOp::Mul,
                Tok::Slash => BinOp::Div,
                Tok::At => BinOp::MatMul,
                _ => return Ok(lhs),
            };
            self.bump();
            self.continue_line();
            let rhs = self.parse_unary()?;
            lhs = self.binary(lhs, op, rhs);
        }
    }

    fn parse_unary(&mut self) -> PResult<Expr> {
        if self.nesting > MAX_NESTING {
            let t = self.peek_tok();
            return Err(self.error(Diagnostic::error(
                t.span,
                format!("expression nested too deeply (more than {MAX_NESTING} levels)"),
            )));
        }
        if let Some(minus) = self.eat(Tok::Minus) {
            self.nesting += 1;
            let operand = self.parse_unary();
            self.nesting -= 1;
            let operand = operand?;
            return Ok(Expr {
                span: sp(self.file, minus.span.start, operand.span.end),
                kind: ExprKind::Neg(Box::new(operand)),
            });
        }
        self.parse_primary()
    }

    fn parse_primary(&mut self) -> PResult<Expr> {
        let t = self.peek_tok();
        let kind = match t.kind {
            Tok::IntLit | Tok::FloatLit => {
                self.bump();
                let text = self.text(t.span);
                // The lexer only accepts digit/point/exponent shapes, which
                // f64 parsing accepts; huge integers round like any float.
                let value = text.parse::<f64>().unwrap_or(f64::NAN);
                ExprKind::Number {
                    value,
                    is_int: t.kind == Tok::IntLit,
                }
            }
            Tok::Str => {
                self.bump();
                let text = self.text(t.span);
                ExprKind::Str(
                    text.get(1..text.len().saturating_sub(1))
                        .unwrap_or("")
                        .to_string(),
                )
            }
            Tok::True => {
                self.bump();
                ExprKind::Bool(true)
            }
            Tok::False => {
                self.bump();
                ExprKind::Bool(false)
            }
            Tok::BadNumber | Tok::UnterminatedStr | Tok::Unknown => {
                self.bump();
                ExprKind::Error
            }
            Tok::Ident => {
                self.bump();
                let name = self.text(t.span).to_string();
                if self.peek() == Tok::LParen {
                    let callee = Ident { name, span: t.span };
                    let args = self.parse_call_args()?;
                    return Ok(Expr {
                        kind: ExprKind::Call { callee, args },
                        span: self.span_from(t.span.start),
                    });
                }
                ExprKind::Name(name)
            }
            Tok::LParen => {
                let open = self.bump();
                self.open.push(open);
                let inner = self.parse_expr()?;
                if self.peek() != Tok::RParen {
                    return Err(self.bad_in_bracket(
                        open,
                        Tok::RParen,
                        "expected ')' to close '('",
                    ));
                }
                self.bump();
                self.open.pop();
                return Ok(Expr {
                    kind: inner.kind,
                    span: self.span_from(t.span.start),
                });
            }
            Tok::LBracket => {
                let open = self.bump();
                self.open.push(open);
                let mut items = Vec::new();
                loop {
                    if self.at(Tok::RBracket) {
                        self.bump();
                        self.open.pop();
                        break;
                    }
                    items.push(self.parse_expr()?);
                    if self.list_sep(
                        open,
                        Tok::RBracket,
                        "expected ',' or ']' after a list element",
                    )? {
                        break;
                    }
                }
                ExprKind::List(items)
            }
            Tok::Ellipsis => {
                return Err(self.error(Diagnostic::error(
                    t.span,
                    "'...' is only allowed inside a tensor type, as in f32[..., D]",
                )))
            }
            _ => {
                if let Some(&open) = self.open.last() {
                    let newline_before =
                        self.pos > 0 && self.raw(self.pos - 1).kind == Tok::Newline;
                    if t.kind == Tok::Eof || (newline_before && !starts_expr(t.kind)) {
                        let close = if open.kind == Tok::LParen {
                            Tok::RParen
                        } else {
                            Tok::RBracket
                        };
                        return Err(self.bad_in_bracket(open, close, "expected an expression"));
                    }
                }
                if t.kind.is_keyword() {
                    return Err(self.error(Diagnostic::error(
                        t.span,
                        format!(
                            "{} is a keyword and cannot be used in an expression",
                            t.kind.describe()
                        ),
                    )));
                }
                return Err(self.unexpected(t, "expected an expression"));
            }
        };
        Ok(Expr {
            kind,
            span: self.span_from(t.span.start),
        })
    }

    /// `( ARG, name = ARG, ... )` after a callee.
    fn parse_call_args(&mut self) -> PResult<Vec<Arg>> {
        let open = self.bump();
        self.open.push(open);
        let mut args: Vec<Arg> = Vec::new();
        loop {
            if self.at(Tok::RParen) {
                self.bump();
                self.open.pop();
                return Ok(args);
            }
            let t = self.peek_tok();
            let name = if t.kind == Tok::Ident && self.peek2() == Tok::Eq {
                self.bump();
                self.bump();
                self.continue_line();
                Some(Ident {
                    name: self.text(t.span).to_string(),
                    span: t.span,
                })
            } else {
                None
            };
            let value = self.parse_expr()?;
            if name.is_none() && args.iter().any(|a| a.name.is_some()) {
                self.diags.push(Diagnostic::error(
                    value.span,
                    "a positional argument cannot follow a keyword argument",
                ));
            }
            args.push(Arg { name, value });
            if self.list_sep(
                open,
                Tok::RParen,
                "expected ',' or ')' after a call argument",
            )? {
                return Ok(args);
            }
        }
    }
}

fn starts_expr(t: Tok) -> bool {
    matches!(
        t,
        Tok::IntLit
            | Tok::FloatLit
            | Tok::Str
            | Tok::True
            | Tok::False
            | Tok::Ident
            | Tok::LParen
            | Tok::LBracket
            | Tok::Minus
            | Tok::BadNumber
            | Tok::UnterminatedStr
            | Tok::Unknown
    )
}
