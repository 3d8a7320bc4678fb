//! Source text to syntax tree: the logos lexer and a recursive-descent parser.

pub mod ast;
