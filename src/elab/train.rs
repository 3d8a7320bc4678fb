//! The `train { ... }` block: optimizer and regulariser defaults (§8).

use super::expand::{Ctx, Elab, Scope};
use super::items::closest;
use super::value::ElabDim;
use crate::model::{Optimizer, Regularizer};
use crate::syntax::ast::{Arg, Expr, ExprKind, Ident};

impl<D: ElabDim> Elab<'_, D> {
    pub(crate) fn train_block(&mut self, sc: &Scope<D>, entries: &[(Ident, Expr)]) {
        let mut seen: Vec<&Ident> = Vec::new();
        for (key, value) in entries {
            if let Some(prev) = seen.iter().find(|k| k.name == key.name) {
                let prev = prev.span;
                self.diags.push(
                    crate::diag::Diagnostic::error(
                        key.span,
                        format!("`{}` is set twice in the train block", key.name),
                    )
                    .with_related(prev, "first set here"),
                );
                continue;
            }
            seen.push(key);
            match key.name.as_str() {
                "optimizer" => {
                    if let Some(o) = self.optimizer(sc, value) {
                        self.train.optimizer = Some(o);
                    }
                }
                "regularize" => {
                    if let Some(r) = self.regularizer(sc, value) {
                        self.train.regularize = Some(r);
                    }
                }
                other => {
                    let hint = closest(other, ["optimizer", "regularize"])
                        .map(|c| format!("did you mean `{c}`? "))
                        .unwrap_or_default();
                    self.error(
                        key.span,
                        format!("unknown train setting `{other}`; {hint}the settings are `optimizer` and `regularize`"),
                    );
                }
            }
        }
    }

    /// `name(args)` or a bare `name`, with its numeric arguments bound.
    fn settings_call<'e>(
        &mut self,
        sc: &Scope<D>,
        e: &'e Expr,
        choices: &[(&str, &[(&str, bool)])],
        what: &str,
    ) -> Option<(&'e str, Vec<Option<f32>>)> {
        let (name, span, args): (&str, _, &[Arg]) = match &e.kind {
            ExprKind::Name(n) => (n, e.span, &[]),
            ExprKind::Call { callee, args } => (&callee.name, callee.span, args),
            ExprKind::Error => return None,
            _ => {
                self.error(e.span, format!("expected {what}"));
                return None;
            }
        };
        let Some((_, sig)) = choices.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            let hint = closest(name, names.iter().copied())
                .map(|c| format!("did you mean `{c}`? "))
                .unwrap_or_default();
            self.error(
                span,
                format!(
                    "unknown {what} `{name}`; {hint}expected one of {}",
                    names.join(", ")
                ),
            );
            return None;
        };
        let mut ctx = Ctx::Unbound("a train block");
        let bound = self.eval_and_bind_args(sc, name, sig, args, e.span, &mut ctx)?;
        let mut out = Vec::new();
        for (b, (arg, _)) in bound.iter().zip(sig.iter()) {
            out.push(match b {
                None => None,
                Some((v, s)) => {
                    let x = self.float_of(v, *s, name, arg)?;
                    if !x.is_finite() || x < 0.0 {
                        self.error(
                            *s,
                            format!(
                                "`{name}`: `{arg}` must be a finite non-negative number, got {x}"
                            ),
                        );
                        return None;
                    }
                    Some(x)
                }
            });
        }
        Some((name, out))
    }

    fn optimizer(&mut self, sc: &Scope<D>, e: &Expr) -> Option<Optimizer> {
        const SGD: &[(&str, bool)] = &[("lr", true), ("momentum", true)];
        const ADAM: &[(&str, bool)] = &[
            ("lr", true),
            ("beta1", true),
            ("beta2", true),
            ("eps", true),
        ];
        let (name, a) = self.settings_call(sc, e, &[("sgd", SGD), ("adam", ADAM)], "optimizer")?;
        Some(if name == "sgd" {
            Optimizer::Sgd {
                lr: a[0].unwrap_or(0.01),
                momentum: a[1].unwrap_or(0.0),
            }
        } else {
            Optimizer::Adam {
                lr: a[0].unwrap_or(1e-3),
                beta1: a[1].unwrap_or(0.9),
                beta2: a[2].unwrap_or(0.999),
                eps: a[3].unwrap_or(1e-8),
            }
        })
    }

    fn regularizer(&mut self, sc: &Scope<D>, e: &Expr) -> Option<Regularizer> {
        const ONE: &[(&str, bool)] = &[("lambda", false)];
        let (name, a) = self.settings_call(sc, e, &[("l2", ONE), ("l1", ONE)], "regularizer")?;
        let lambda = a[0].unwrap_or(0.0);
        Some(if name == "l2" {
            Regularizer::L2(lambda)
        } else {
            Regularizer::L1(lambda)
        })
    }
}
