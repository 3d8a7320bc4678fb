//! The training step as one graph: forward, the objective (loss plus
//! regulariser), its gradients, and the optimizer update (LANGUAGE.md §8).
//!
//! Optimizer state lives in `Op::State` leaves that the runtime feeds and
//! saves like parameters; the step returns their new values as `Update`
//! outputs named like the leaf they replace.

use super::emit::Emit;
use super::{gradients, loss_of, AutodiffError};
use crate::ir::{Graph, Op, OutputKind, ReduceOp, TensorType, UnaryOp, Value};
use crate::model::{Model, Optimizer, Regularizer};
use petgraph::stable_graph::NodeIndex;
use std::collections::HashSet;

/// One training step as a single graph: forward, backward of the objective
/// (loss + regulariser over params of rank >= 2, LANGUAGE.md §8), optimizer
/// update. Optimizer state is `Op::State` leaves named
/// `opt.velocity.<param>` (sgd with momentum != 0), `opt.m.<param>`,
/// `opt.v.<param>`, `opt.step` (adam; a scalar f32 step count). Outputs:
/// `loss` (OutputKind::Loss), `objective` (OutputKind::Output, loss +
/// regulariser), then one OutputKind::Update output per parameter and per
/// state tensor, named exactly like the leaf it replaces.
pub fn training_step(
    model: &Model,
    optimizer: &Optimizer,
    regularize: Option<Regularizer>,
) -> Result<Graph, AutodiffError> {
    check_hyperparameters(optimizer, regularize)?;
    let loss = loss_of(model)?;
    let mut g = model.graph.clone();
    let params = g.params();

    let objective = match regularize {
        Some(r) => {
            let penalty = regulariser(&mut g, &params, r)?;
            Emit::new(&mut g, "regularize", None).add(loss, penalty)?
        }
        None => loss,
    };
    let wrt: Vec<Value> = params.iter().map(|(_, v)| *v).collect();
    let grads = gradients(&mut g, objective, &wrt)?;

    let mut updates: Vec<(String, Value)> = Vec::new();
    let mut e = Emit::new(&mut g, "optimizer", None);
    match *optimizer {
        // w ← w − lr·g
        Optimizer::Sgd { lr, momentum: 0.0 } => {
            let lr = e.scalar(lr)?;
            for ((name, w), d) in params.iter().zip(&grads) {
                let step = e.mul(lr, *d)?;
                updates.push((name.clone(), e.sub(*w, step)?));
            }
        }
        // v ← μ·v + g;  w ← w − lr·v
        Optimizer::Sgd { lr, momentum } => {
            let (lr, momentum) = (e.scalar(lr)?, e.scalar(momentum)?);
            for ((name, w), d) in params.iter().zip(&grads) {
                let vname = format!("opt.velocity.{name}");
                let v = state(&mut e, &vname, *w);
                let mv = e.mul(momentum, v)?;
                let v_new = e.add(mv, *d)?;
                let step = e.mul(lr, v_new)?;
                updates.push((name.clone(), e.sub(*w, step)?));
                updates.push((vname, v_new));
            }
        }
        Optimizer::Adam {
            lr,
            beta1,
            beta2,
            eps,
        } => {
            // t ← t + 1, shared by all parameters
            let t = e.g.add_leaf(
                Op::State {
                    name: "opt.step".into(),
                },
                TensorType::f32(vec![]),
                None,
            );
            let one = e.scalar(1.0)?;
            let t_new = e.add(t, one)?;
            updates.push(("opt.step".into(), t_new));
            // Bias corrections 1 − βᵗ, with βᵗ = exp(t·ln β).
            let c1 = bias_correction(&mut e, beta1, t_new)?;
            let c2 = bias_correction(&mut e, beta2, t_new)?;
            let (b1, one_b1) = (e.scalar(beta1)?, e.scalar(1.0 - beta1)?);
            let (b2, one_b2) = (e.scalar(beta2)?, e.scalar(1.0 - beta2)?);
            let (lr, eps) = (e.scalar(lr)?, e.scalar(eps)?);
            for ((name, w), d) in params.iter().zip(&grads) {
                let (mname, vname) = (format!("opt.m.{name}"), format!("opt.v.{name}"));
                let m = state(&mut e, &mname, *w);
                let v = state(&mut e, &vname, *w);
                // m ← β1·m + (1 − β1)·g
                let bm = e.mul(b1, m)?;
                let gm = e.mul(one_b1, *d)?;
                let m_new = e.add(bm, gm)?;
                // v ← β2·v + (1 − β2)·g²
                let bv = e.mul(b2, v)?;
                let g2 = e.mul(*d, *d)?;
                let gv = e.mul(one_b2, g2)?;
                let v_new = e.add(bv, gv)?;
                // w ← w − lr·m̂/(sqrt(v̂) + eps), m̂ = m/c1, v̂ = v/c2
                let m_hat = e.div(m_new, c1)?;
                let v_hat = e.div(v_new, c2)?;
                let root = e.unary(UnaryOp::Sqrt, v_hat)?;
                let denom = e.add(root, eps)?;
                let ratio = e.div(m_hat, denom)?;
                let step = e.mul(lr, ratio)?;
                updates.push((name.clone(), e.sub(*w, step)?));
                updates.push((mname, m_new));
                updates.push((vname, v_new));
            }
        }
    }

    // Parameters first, then state, each sorted by name, so the output
    // order does not depend on the optimizer's bookkeeping above.
    let state_names: Vec<String> = g.states().into_iter().map(|(n, _)| n).collect();
    updates.sort_by(|a, b| {
        let is_state = |n: &str| state_names.iter().any(|s| s == n);
        (is_state(&a.0), &a.0).cmp(&(is_state(&b.0), &b.0))
    });
    g.outputs.clear();
    g.push_output("loss", OutputKind::Loss, loss);
    g.push_output("objective", OutputKind::Output, objective);
    for (name, v) in updates {
        g.push_output(name, OutputKind::Update, v);
    }
    remove_unused_ops(&mut g);
    Ok(g)
}

/// Drop ops that only fed the model's other outputs (`probs = softmax(..)`):
/// the step does not return them. Leaves stay, so the step is fed exactly
/// like the model.
fn remove_unused_ops(g: &mut Graph) {
    let mut live = HashSet::new();
    let mut stack: Vec<NodeIndex> = g.outputs.iter().map(|o| o.value.node).collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(g.inputs(n).iter().map(|v| v.node));
        }
    }
    let dead: Vec<NodeIndex> = g
        .graph
        .node_indices()
        .filter(|n| {
            let fed = matches!(
                g.node(*n).op,
                Op::Input { .. } | Op::Param { .. } | Op::State { .. }
            );
            !live.contains(n) && !fed
        })
        .collect();
    for n in dead {
        g.graph.remove_node(n);
    }
}

/// `λ·Σ_w Σ w²` (l2) or `λ·Σ_w Σ |w|` (l1) over parameters of rank >= 2.
fn regulariser(
    g: &mut Graph,
    params: &[(String, Value)],
    r: Regularizer,
) -> Result<Value, AutodiffError> {
    let mut e = Emit::new(g, "regularize", None);
    let (lambda, l1) = match r {
        Regularizer::L1(l) => (l, true),
        Regularizer::L2(l) => (l, false),
    };
    let mut total = e.scalar(0.0)?;
    for (_, w) in params {
        let rank = e.shape(*w).len();
        if rank < 2 {
            continue;
        }
        let term = if l1 {
            e.unary(UnaryOp::Abs, *w)?
        } else {
            e.mul(*w, *w)?
        };
        let s = e.reduce(ReduceOp::Sum, term, (0..rank).collect(), false)?;
        total = e.add(total, s)?;
    }
    e.scale(lambda, total)
}

/// A zero-initialised optimizer state tensor shaped like `like`.
fn state(e: &mut Emit, name: &str, like: Value) -> Value {
    let ty = TensorType::f32(e.shape(like));
    e.g.add_leaf(Op::State { name: name.into() }, ty, None)
}

/// `1 − βᵗ` as IR, with `βᵗ = exp(t·ln β)`; β = 0 makes it the constant 1
/// (ln 0 would put an infinity into the graph).
fn bias_correction(e: &mut Emit, beta: f32, t: Value) -> Result<Value, AutodiffError> {
    if beta == 0.0 {
        return e.scalar(1.0);
    }
    let ln_beta = (beta as f64).ln() as f32;
    let exponent = e.scale(ln_beta, t)?;
    let pow = e.unary(UnaryOp::Exp, exponent)?;
    e.rsub(1.0, pow)
}

fn check_hyperparameters(
    optimizer: &Optimizer,
    regularize: Option<Regularizer>,
) -> Result<(), AutodiffError> {
    let bad = |msg: String| Err(AutodiffError::BadHyperparameter(msg));
    match *optimizer {
        Optimizer::Sgd { lr, momentum } => {
            if !lr.is_finite() {
                return bad(format!("sgd learning rate must be finite, got {lr}"));
            }
            if !momentum.is_finite() {
                return bad(format!("sgd momentum must be finite, got {momentum}"));
            }
        }
        Optimizer::Adam {
            lr,
            beta1,
            beta2,
            eps,
        } => {
            if !lr.is_finite() {
                return bad(format!("adam learning rate must be finite, got {lr}"));
            }
            for (name, b) in [("beta1", beta1), ("beta2", beta2)] {
                if !(0.0..1.0).contains(&b) {
                    return bad(format!("adam {name} must be in [0, 1), got {b}"));
                }
            }
            if !(eps.is_finite() && eps >= 0.0) {
                return bad(format!("adam eps must be finite and >= 0, got {eps}"));
            }
        }
    }
    if let Some(Regularizer::L1(l) | Regularizer::L2(l)) = regularize {
        if !l.is_finite() {
            return bad(format!(
                "the regularisation strength must be finite, got {l}"
            ));
        }
    }
    Ok(())
}
