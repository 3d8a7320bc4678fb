//! The items of a compilation — user fns, std.dl fns, primitives — and name
//! resolution between them.

use super::prims::Prim;
use crate::diag::Diagnostic;
use crate::syntax::ast::{Expr, ExprKind, File, FnDef, Ident, Item, ModelDef, Stmt, StmtKind};
use std::collections::{HashMap, HashSet};

/// What a call's callee resolves to.
#[derive(Clone, Copy)]
pub(crate) enum Callee<'a> {
    Fn(&'a FnDef, bool),
    Prim(Prim),
}

/// All fns visible to a compilation and the models of the user file.
pub(crate) struct Items<'a> {
    user: HashMap<&'a str, &'a FnDef>,
    std: HashMap<&'a str, &'a FnDef>,
    pub models: Vec<&'a ModelDef>,
    /// `(name, in_std)` of every fn whose expansion creates parameters.
    creates: HashSet<(&'a str, bool)>,
}

impl<'a> Items<'a> {
    /// Collects items, reporting duplicates and (as warnings) user fns that
    /// shadow std.dl or a primitive op.
    pub fn new(user: &'a File, std: &'a File, diags: &mut Vec<Diagnostic>) -> Items<'a> {
        let mut items = Items {
            user: HashMap::new(),
            std: HashMap::new(),
            models: Vec::new(),
            creates: HashSet::new(),
        };
        for it in &std.items {
            if let Item::Fn(f) = it {
                items.std.entry(&f.name.name).or_insert(f);
            }
        }
        let mut models: HashMap<&str, &ModelDef> = HashMap::new();
        for it in &user.items {
            match it {
                Item::Fn(f) => {
                    let name = f.name.name.as_str();
                    if let Some(prev) = items.user.get(name) {
                        diags.push(
                            Diagnostic::error(f.name.span, format!("fn `{name}` is defined twice"))
                                .with_related(prev.name.span, "first defined here"),
                        );
                        continue;
                    }
                    if let Some(s) = items.std.get(name) {
                        diags.push(
                            Diagnostic::warning(
                                f.name.span,
                                format!("fn `{name}` shadows the standard library's `{name}`"),
                            )
                            .with_related(s.name.span, "std definition"),
                        );
                    } else if Prim::from_name(name).is_some() {
                        diags.push(Diagnostic::warning(
                            f.name.span,
                            format!("fn `{name}` shadows the primitive op `{name}`"),
                        ));
                    }
                    items.user.insert(name, f);
                }
                Item::Model(m) => {
                    let name = m.name.name.as_str();
                    if let Some(prev) = models.get(name) {
                        diags.push(
                            Diagnostic::error(
                                m.name.span,
                                format!("model `{name}` is defined twice"),
                            )
                            .with_related(prev.name.span, "first defined here"),
                        );
                        continue;
                    }
                    models.insert(name, m);
                    items.models.push(m);
                }
            }
        }
        items.find_param_creators();
        items
    }

    /// User code sees user fns, then std, then primitives; std.dl sees only
    /// itself and primitives, so shadowing cannot break the library.
    pub fn resolve(&self, name: &str, from_std: bool) -> Option<Callee<'a>> {
        if !from_std {
            if let Some(f) = self.user.get(name) {
                return Some(Callee::Fn(f, false));
            }
        }
        if let Some(f) = self.std.get(name) {
            return Some(Callee::Fn(f, true));
        }
        Prim::from_name(name).map(Callee::Prim)
    }

    pub fn callable_names(&self, from_std: bool) -> Vec<&str> {
        let mut v: Vec<&str> = Prim::NAMES.to_vec();
        v.extend(self.std.keys().copied());
        if !from_std {
            v.extend(self.user.keys().copied());
        }
        v
    }

    pub fn unknown_fn_message(&self, name: &str, from_std: bool) -> String {
        let hint = closest(name, self.callable_names(from_std))
            .map(|c| format!("; did you mean `{c}`?"))
            .unwrap_or_default();
        format!("unknown function `{name}`{hint}")
    }

    /// Calls to unknown functions anywhere in user fns, including fns no
    /// model calls (which expansion alone would never look at).
    pub fn unknown_calls(&self, diags: &mut Vec<Diagnostic>) {
        let mut fns: Vec<&FnDef> = self.user.values().copied().collect();
        fns.sort_by_key(|f| f.span.start);
        for f in fns {
            let mut calls = Vec::new();
            for p in &f.params {
                if let Some(d) = &p.default {
                    called_idents(d, &mut calls);
                }
            }
            for st in &f.body {
                match &st.kind {
                    StmtKind::Let { value, .. }
                    | StmtKind::Loss { value, .. }
                    | StmtKind::Return(value) => called_idents(value, &mut calls),
                    StmtKind::Output { value: Some(v), .. } => called_idents(v, &mut calls),
                    _ => {}
                }
            }
            for c in calls {
                if self.resolve(&c.name, false).is_none() {
                    diags.push(Diagnostic::error(
                        c.span,
                        self.unknown_fn_message(&c.name, false),
                    ));
                }
            }
        }
    }

    pub fn creates_params(&self, f: &FnDef, in_std: bool) -> bool {
        self.creates.contains(&(f.name.name.as_str(), in_std))
    }

    /// Whether a fn creates parameters is decided before expansion (a fixed
    /// point over the call graph), so a second layer in one binding is
    /// rejected before it could create clashing names.
    fn find_param_creators(&mut self) {
        let fns: Vec<(&'a FnDef, bool)> = self
            .user
            .values()
            .map(|f| (*f, false))
            .chain(self.std.values().map(|f| (*f, true)))
            .collect();
        let calls: Vec<Vec<&'a str>> = fns
            .iter()
            .map(|(f, _)| {
                let mut names = Vec::new();
                for p in &f.params {
                    if let Some(d) = &p.default {
                        called_names(d, &mut names);
                    }
                }
                for st in &f.body {
                    stmt_calls(st, &mut names);
                }
                names
            })
            .collect();
        for (f, in_std) in &fns {
            if f.body
                .iter()
                .any(|s| matches!(s.kind, StmtKind::Param { .. }))
            {
                self.creates.insert((f.name.name.as_str(), *in_std));
            }
        }
        loop {
            let mut changed = false;
            for ((f, in_std), names) in fns.iter().zip(&calls) {
                let key = (f.name.name.as_str(), *in_std);
                if self.creates.contains(&key) {
                    continue;
                }
                let creates = names.iter().any(|n| match self.resolve(n, *in_std) {
                    Some(Callee::Fn(g, g_std)) => {
                        self.creates.contains(&(g.name.name.as_str(), g_std))
                    }
                    _ => false,
                });
                if creates {
                    self.creates.insert(key);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
    }
}

fn stmt_calls<'a>(st: &'a Stmt, out: &mut Vec<&'a str>) {
    match &st.kind {
        StmtKind::Let { value, .. } | StmtKind::Loss { value, .. } | StmtKind::Return(value) => {
            called_names(value, out)
        }
        StmtKind::Output { value: Some(v), .. } => called_names(v, out),
        _ => {}
    }
}

fn called_idents<'a>(e: &'a Expr, out: &mut Vec<&'a Ident>) {
    match &e.kind {
        ExprKind::Call { callee, args } => {
            out.push(callee);
            for a in args {
                called_idents(&a.value, out);
            }
        }
        ExprKind::Binary { lhs, rhs, .. } => {
            called_idents(lhs, out);
            called_idents(rhs, out);
        }
        ExprKind::Neg(x) => called_idents(x, out),
        ExprKind::List(xs) => xs.iter().for_each(|x| called_idents(x, out)),
        _ => {}
    }
}

fn called_names<'a>(e: &'a Expr, out: &mut Vec<&'a str>) {
    match &e.kind {
        ExprKind::Call { callee, args } => {
            out.push(&callee.name);
            for a in args {
                called_names(&a.value, out);
            }
        }
        ExprKind::Binary { lhs, rhs, .. } => {
            called_names(lhs, out);
            called_names(rhs, out);
        }
        ExprKind::Neg(x) => called_names(x, out),
        ExprKind::List(xs) => xs.iter().for_each(|x| called_names(x, out)),
        _ => {}
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The candidate closest to `name`, if it is close enough to be a typo.
pub(crate) fn closest<'c>(
    name: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    let limit = 1 + name.chars().count() / 4;
    candidates
        .into_iter()
        .filter(|c| *c != name)
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= limit && *d < c.chars().count())
        .min()
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(edit_distance("desne", "dense"), 2);
        assert_eq!(closest("desne", ["dense", "conv2d"]), Some("dense"));
        assert_eq!(closest("relu2", ["relu", "tanh"]), Some("relu"));
        assert_eq!(closest("xyz", ["dense", "conv2d"]), None);
    }
}
