//! dlc: a small deep-learning compiler.
//!
//! `.dl` source → [`syntax`] (AST) → [`elab`] (shape-checked IR) →
//! [`autodiff`] → passes → Cranelift JIT. See ARCHITECTURE.md.

pub mod api;
pub mod autodiff;
pub mod codegen;
pub mod diag;
pub mod elab;
pub mod golden;
pub mod init;
pub mod interp;
pub mod io;
pub mod ir;
pub mod model;
pub mod passes;
pub mod profile;
pub mod runtime;
pub mod syntax;
pub mod tensor;
pub mod train;
