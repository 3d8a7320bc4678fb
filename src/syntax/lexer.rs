//! The lexer: `logos` turns source text into tokens with byte spans.
//!
//! Lexing never fails: text that is not a token becomes an error token
//! (`Tok::Unknown`, `Tok::BadNumber`, `Tok::UnterminatedStr`) that the
//! parser reports and skips, so one stray character costs one diagnostic.

use logos::Logos;

use crate::diag::Diagnostic;
use crate::ir::Span;

#[derive(Logos, Clone, Copy, Debug, PartialEq, Eq)]
#[logos(skip r"[ \t\r\f\u{feff}]+")]
#[logos(skip r"#[^\n]*")]
pub enum Tok {
    #[token("\n")]
    Newline,

    #[token("model")]
    Model,
    #[token("fn")]
    Fn,
    #[token("input")]
    Input,
    #[token("param")]
    Param,
    #[token("output")]
    Output,
    #[token("loss")]
    Loss,
    #[token("train")]
    Train,
    #[token("return")]
    Return,
    #[token("int")]
    Int,
    #[token("float")]
    Float,
    #[token("bool")]
    Bool,
    #[token("f32")]
    F32,
    #[token("i32")]
    I32,
    #[token("true")]
    True,
    #[token("false")]
    False,

    #[regex(r"[A-Za-z_][A-Za-z0-9_]*")]
    Ident,
    /// `12`: digits only.
    #[regex(r"[0-9]+", priority = 4)]
    IntLit,
    /// `0.5`, `3.`, `1e-4`, `25e-2`.
    #[regex(r"[0-9]+\.[0-9]*([eE][+-]?[0-9]+)?", priority = 4)]
    #[regex(r"[0-9]+[eE][+-]?[0-9]+", priority = 4)]
    FloatLit,
    /// A number glued to letters (`12abc`, `1e`, `2.5x`), with two points
    /// (`3..4`) or none before the point (`.5`): reported as one bad number
    /// rather than a number followed by a surprising token.
    #[regex(
        r"[0-9]+(\.[0-9]*)?(([eE][+-]?[0-9]*)?[A-Za-z_][A-Za-z0-9_]*|[eE][+-])|[0-9]+\.[0-9]*(\.[0-9]*)+|\.[0-9][0-9A-Za-z_]*",
        priority = 2
    )]
    BadNumber,
    #[regex(r#""[^"\n]*""#)]
    Str,
    /// A string with no closing quote on its line.
    #[regex(r#""[^"\n]*"#, priority = 1)]
    UnterminatedStr,

    #[token("=")]
    Eq,
    #[token("|>")]
    Pipe,
    #[token("+")]
    Plus,
    #[token("-")]
    Minus,
    #[token("*")]
    Star,
    #[token("/")]
    Slash,
    #[token("@")]
    At,
    #[token("(")]
    LParen,
    #[token(")")]
    RParen,
    #[token("[")]
    LBracket,
    #[token("]")]
    RBracket,
    #[token("{")]
    LBrace,
    #[token("}")]
    RBrace,
    #[token(",")]
    Comma,
    #[token(":")]
    Colon,
    #[token("...")]
    Ellipsis,
    #[token(";")]
    Semi,

    /// Any character that starts no token.
    Unknown,
    /// End of input (added by [`lex`], never produced by logos).
    Eof,
}

impl Tok {
    /// How the token is named in messages: `'('`, `a name`, `end of file`.
    pub fn describe(self) -> &'static str {
        match self {
            Tok::Newline => "the end of the line",
            Tok::Model => "'model'",
            Tok::Fn => "'fn'",
            Tok::Input => "'input'",
            Tok::Param => "'param'",
            Tok::Output => "'output'",
            Tok::Loss => "'loss'",
            Tok::Train => "'train'",
            Tok::Return => "'return'",
            Tok::Int => "'int'",
            Tok::Float => "'float'",
            Tok::Bool => "'bool'",
            Tok::F32 => "'f32'",
            Tok::I32 => "'i32'",
            Tok::True => "'true'",
            Tok::False => "'false'",
            Tok::Ident => "a name",
            Tok::IntLit | Tok::FloatLit => "a number",
            Tok::BadNumber => "a malformed number",
            Tok::Str => "a string",
            Tok::UnterminatedStr => "an unterminated string",
            Tok::Eq => "'='",
            Tok::Pipe => "'|>'",
            Tok::Plus => "'+'",
            Tok::Minus => "'-'",
            Tok::Star => "'*'",
            Tok::Slash => "'/'",
            Tok::At => "'@'",
            Tok::LParen => "'('",
            Tok::RParen => "')'",
            Tok::LBracket => "'['",
            Tok::RBracket => "']'",
            Tok::LBrace => "'{'",
            Tok::RBrace => "'}'",
            Tok::Comma => "','",
            Tok::Colon => "':'",
            Tok::Ellipsis => "'...'",
            Tok::Semi => "';'",
            Tok::Unknown => "an unexpected character",
            Tok::Eof => "the end of the file",
        }
    }

    /// Keywords, for "is a keyword and cannot be a name" messages.
    pub fn is_keyword(self) -> bool {
        matches!(
            self,
            Tok::Model
                | Tok::Fn
                | Tok::Input
                | Tok::Param
                | Tok::Output
                | Tok::Loss
                | Tok::Train
                | Tok::Return
                | Tok::Int
                | Tok::Float
                | Tok::Bool
                | Tok::F32
                | Tok::I32
                | Tok::True
                | Tok::False
        )
    }
}

/// One token and where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub kind: Tok,
    pub span: Span,
}

fn clamp_u32(x: usize) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

/// Tokenises `src`; the result always ends with one `Tok::Eof`. Error
/// tokens are kept in the stream (the parser reports them in context) and
/// also described in the returned diagnostics.
pub fn lex(src: &str, file: u32) -> (Vec<Token>, Vec<Diagnostic>) {
    let mut toks: Vec<Token> = Vec::new();
    let mut lexer = Tok::lexer(src);
    while let Some(res) = lexer.next() {
        let r = lexer.span();
        let span = Span {
            file,
            start: clamp_u32(r.start),
            end: clamp_u32(r.end),
        };
        let kind = res.unwrap_or(Tok::Unknown);
        // A run of junk (`$$$`, pasted binary) is one problem, not one per
        // byte.
        if let Some(last) = toks.last_mut() {
            if kind == Tok::Unknown && last.kind == Tok::Unknown && last.span.end == span.start {
                last.span.end = span.end;
                continue;
            }
        }
        toks.push(Token { kind, span });
    }
    let text = |t: &Token| {
        src.get(t.span.start as usize..t.span.end as usize)
            .unwrap_or("")
    };
    let mut diags = Vec::new();
    for t in &toks {
        match t.kind {
            Tok::Unknown => diags.push(unknown_diag(t.span, text(t))),
            Tok::BadNumber => {
                let text = text(t);
                let help = if text.starts_with('.') {
                    format!("write a digit before the point: 0{text}")
                } else {
                    "numbers look like 12, 0.5, 3. or 1e-4".to_string()
                };
                diags.push(
                    Diagnostic::error(t.span, format!("malformed number '{text}'")).with_help(help),
                );
            }
            Tok::UnterminatedStr => diags.push(Diagnostic::error(
                t.span,
                "unterminated string — expected a closing '\"' before the end of the line",
            )),
            _ => {}
        }
    }
    let end = clamp_u32(src.len());
    toks.push(Token {
        kind: Tok::Eof,
        span: Span {
            file,
            start: end,
            end,
        },
    });
    (toks, diags)
}

fn unknown_diag(span: Span, text: &str) -> Diagnostic {
    let shown: String = text.chars().take(20).flat_map(char::escape_debug).collect();
    let more = if text.chars().count() > 20 { "…" } else { "" };
    let mut d = if text.chars().count() == 1 {
        Diagnostic::error(span, format!("unexpected character '{shown}'"))
    } else {
        Diagnostic::error(span, format!("unexpected characters '{shown}{more}'"))
    };
    if text.starts_with('.') {
        d = d.with_help("'...' (three dots) is the only token with a point outside numbers");
    } else if text.starts_with('|') {
        d = d.with_help("the pipe operator is written '|>'");
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(src: &str) -> Vec<Tok> {
        lex(src, 0).0.into_iter().map(|t| t.kind).collect()
    }

    #[test]
    fn numbers() {
        use Tok::*;
        assert_eq!(
            kinds("12 0.5 1e-4 3. 25e-2"),
            vec![IntLit, FloatLit, FloatLit, FloatLit, FloatLit, Eof]
        );
        assert_eq!(
            kinds("12abc 1e 2.5x 1e+ .5 3..4 1.2.3"),
            vec![BadNumber, BadNumber, BadNumber, BadNumber, BadNumber, BadNumber, BadNumber, Eof]
        );
        assert_eq!(
            kinds("[..., 3]"),
            vec![LBracket, Ellipsis, Comma, IntLit, RBracket, Eof]
        );
    }

    #[test]
    fn keywords_and_operators() {
        use Tok::*;
        assert_eq!(
            kinds("model fn f32 models x|>y ... = # comment\n;"),
            vec![Model, Fn, F32, Ident, Ident, Pipe, Ident, Ellipsis, Eq, Newline, Semi, Eof]
        );
    }

    #[test]
    fn errors_are_tokens() {
        let (toks, diags) = lex("a $ \"abc\n", 0);
        assert_eq!(toks[1].kind, Tok::Unknown);
        assert_eq!(toks[2].kind, Tok::UnterminatedStr);
        assert_eq!(diags.len(), 2);
        assert_eq!(diags[0].message, "unexpected character '$'");
        let (toks, diags) = lex("a $%! b", 0);
        assert_eq!(toks.len(), 4);
        assert_eq!(diags.len(), 1);
        assert_eq!(diags[0].message, "unexpected characters '$%!'");
    }
}
