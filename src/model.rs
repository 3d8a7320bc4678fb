//! A compiled model: the elaborated forward graph plus what the source said
//! about training. Produced by `elab`, consumed by autodiff, passes and the
//! backends.

use crate::ir::Graph;
use std::collections::BTreeMap;

/// An optimizer and its hyper-parameters (LANGUAGE.md §8).
#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    /// `v = momentum·v + g; w -= lr·v`
    Sgd { lr: f32, momentum: f32 },
    /// Adam with bias correction.
    Adam {
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
    },
}

impl Default for Optimizer {
    fn default() -> Self {
        Optimizer::Sgd {
            lr: 0.01,
            momentum: 0.0,
        }
    }
}

/// A penalty over every parameter of rank >= 2, added to the training
/// objective (not to the `loss` output).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Regularizer {
    L1(f32),
    L2(f32),
}

/// The `train { ... }` block of a model; CLI flags override it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainConfig {
    pub optimizer: Option<Optimizer>,
    pub regularize: Option<Regularizer>,
}

/// An elaborated model with every dimension bound.
#[derive(Clone, Debug)]
pub struct Model {
    pub name: String,
    /// The forward graph: its outputs are the model's `output`s and `loss`.
    pub graph: Graph,
    /// The value of every dimension symbol of the model's inputs.
    pub dims: BTreeMap<String, usize>,
    pub train: TrainConfig,
}
