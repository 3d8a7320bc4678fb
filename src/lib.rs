//! dlc: a small deep-learning compiler.
//!
//! `.dl` source → [`syntax`] (AST) → [`elab`] (shape-checked IR) →
//! [`autodiff`] → passes → Cranelift JIT. See ARCHITECTURE.md.

pub mod ir;
pub mod tensor;
pub mod diag;
pub mod syntax;
pub mod elab;
pub mod model;
pub mod io;
pub mod autodiff;
pub mod interp;
pub mod init;
pub mod passes;
pub mod codegen;
pub mod runtime;
pub mod api;
pub mod golden;
pub mod train;
