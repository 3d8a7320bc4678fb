//! dlc: a small deep-learning compiler.
//!
//! `.dl` source → [`syntax`] (AST) → [`elab`] (shape-checked IR) →
//! [`autodiff`] → passes → Cranelift JIT. See ARCHITECTURE.md.

pub mod ir;
pub mod tensor;
pub mod diag;
pub mod syntax;
pub mod model;
