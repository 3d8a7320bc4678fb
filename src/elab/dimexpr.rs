//! Symbolic dimensions for `dlc check`: a normalised integer polynomial over
//! dimension symbols, with floor divisions that do not simplify kept as
//! opaque atoms.
//!
//! Normalisation makes structural equality mean algebraic equality for the
//! expressions shape rules build (`N*T*1000 / 1000 == N*T`), while `N` and
//! `N + 1` stay different, so a checker over symbols catches the same
//! mismatches as one over sizes would.

use crate::ir::Dim;
use std::collections::BTreeMap;
use std::fmt;

/// A factor of a monomial.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Atom {
    Sym(String),
    /// `floor(num / den)` that could not be simplified.
    FloorDiv(Box<DimExpr>, Box<DimExpr>),
}

/// A product of atoms, sorted (repetition encodes powers); empty is `1`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Monomial(Vec<Atom>);

impl Monomial {
    fn mul(&self, other: &Monomial) -> Monomial {
        let mut v = self.0.clone();
        v.extend(other.0.iter().cloned());
        v.sort();
        Monomial(v)
    }

    /// `self / other` when `other`'s atoms are a sub-multiset of `self`'s.
    fn div(&self, other: &Monomial) -> Option<Monomial> {
        let mut rest = self.0.clone();
        for a in &other.0 {
            let i = rest.iter().position(|b| b == a)?;
            rest.remove(i);
        }
        Some(Monomial(rest))
    }

    fn is_one(&self) -> bool {
        self.0.is_empty()
    }
}

/// An integer polynomial over symbols: monomial → non-zero coefficient.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DimExpr {
    terms: BTreeMap<Monomial, i64>,
}

impl DimExpr {
    /// The symbol `name`.
    pub fn sym(name: impl Into<String>) -> DimExpr {
        DimExpr::atom(Atom::Sym(name.into()))
    }

    /// A signed constant (differences of dims may be negative).
    pub fn constant(c: i64) -> DimExpr {
        let mut terms = BTreeMap::new();
        if c != 0 {
            terms.insert(Monomial::default(), c);
        }
        DimExpr { terms }
    }

    fn atom(a: Atom) -> DimExpr {
        let mut terms = BTreeMap::new();
        terms.insert(Monomial(vec![a]), 1);
        DimExpr { terms }
    }

    /// The value when the expression has no symbols.
    pub fn as_constant(&self) -> Option<i64> {
        match self.terms.len() {
            0 => Some(0),
            1 => self.terms.get(&Monomial::default()).copied(),
            _ => None,
        }
    }

    fn add_term(&mut self, m: Monomial, c: i64) {
        let e = self.terms.entry(m.clone()).or_insert(0);
        *e = e.saturating_add(c);
        if *e == 0 {
            self.terms.remove(&m);
        }
    }

    fn scaled(&self, k: i64) -> DimExpr {
        let mut out = DimExpr::default();
        for (m, c) in &self.terms {
            out.add_term(m.clone(), c.saturating_mul(k));
        }
        out
    }

    fn floor_div(&self, den: &DimExpr) -> DimExpr {
        if self.terms.is_empty() {
            return DimExpr::default();
        }
        if let Some(c) = den.as_constant() {
            if c <= 0 {
                // Mirrors `usize`'s convention for a zero divisor; shape
                // rules only divide by positive strides.
                return DimExpr::default();
            }
            // floor((c·P + R)/c) = P + floor(R/c) for integer-valued P.
            let mut quotient = DimExpr::default();
            let mut rem = DimExpr::default();
            for (m, k) in &self.terms {
                quotient.add_term(m.clone(), k.div_euclid(c));
                rem.add_term(m.clone(), k.rem_euclid(c));
            }
            return match rem.as_constant() {
                // 0 <= r < c, so floor(r / c) = 0.
                Some(_) => quotient,
                None => quotient.add(&DimExpr::atom(Atom::FloorDiv(
                    Box::new(rem),
                    Box::new(den.clone()),
                ))),
            };
        }
        if den.terms.len() == 1 {
            let (dm, dc) = den
                .terms
                .iter()
                .next()
                .map(|(m, c)| (m.clone(), *c))
                .unwrap_or_default();
            let mut quotient = DimExpr::default();
            let exact = dc > 0
                && self.terms.iter().all(|(m, k)| match m.div(&dm) {
                    Some(q) if k % dc == 0 => {
                        quotient.add_term(q, k / dc);
                        true
                    }
                    _ => false,
                });
            if exact {
                return quotient;
            }
        }
        DimExpr::atom(Atom::FloorDiv(
            Box::new(self.clone()),
            Box::new(den.clone()),
        ))
    }

    /// Display ordering: higher degree first, the constant last.
    fn sorted_terms(&self) -> Vec<(&Monomial, i64)> {
        let mut v: Vec<(&Monomial, i64)> = self.terms.iter().map(|(m, c)| (m, *c)).collect();
        v.sort_by(|a, b| b.0 .0.len().cmp(&a.0 .0.len()).then(a.0.cmp(b.0)));
        v
    }

    /// True when the expression prints as a single factor (no operators).
    fn is_simple(&self) -> bool {
        match self.terms.len() {
            0 => true,
            1 => {
                let (m, c) = self
                    .terms
                    .iter()
                    .next()
                    .map(|(m, c)| (m, *c))
                    .unwrap_or((&EMPTY, 0));
                (m.is_one() && c >= 0) || (c == 1 && m.0.len() == 1)
            }
            _ => false,
        }
    }
}

static EMPTY: Monomial = Monomial(Vec::new());

impl Dim for DimExpr {
    fn lit(n: usize) -> Self {
        DimExpr::constant(i64::try_from(n).unwrap_or(i64::MAX))
    }
    fn known(&self) -> Option<usize> {
        self.as_constant().and_then(|c| usize::try_from(c).ok())
    }
    fn add(&self, other: &Self) -> Self {
        let mut out = self.clone();
        for (m, c) in &other.terms {
            out.add_term(m.clone(), *c);
        }
        out
    }
    fn sub(&self, other: &Self) -> Self {
        self.add(&other.scaled(-1))
    }
    fn mul(&self, other: &Self) -> Self {
        let mut out = DimExpr::default();
        for (ma, ca) in &self.terms {
            for (mb, cb) in &other.terms {
                out.add_term(ma.mul(mb), ca.saturating_mul(*cb));
            }
        }
        out
    }
    fn div_floor(&self, other: &Self) -> Self {
        self.floor_div(other)
    }
}

impl fmt::Display for Atom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Atom::Sym(s) => f.write_str(s),
            Atom::FloorDiv(n, d) => {
                let paren = |e: &DimExpr| {
                    if e.is_simple() {
                        e.to_string()
                    } else {
                        format!("({e})")
                    }
                };
                write!(f, "{}/{}", paren(n), paren(d))
            }
        }
    }
}

impl fmt::Display for DimExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("0");
        }
        for (i, (m, c)) in self.sorted_terms().into_iter().enumerate() {
            let mag = c.unsigned_abs();
            if i == 0 {
                if c < 0 {
                    f.write_str("-")?;
                }
            } else {
                f.write_str(if c < 0 { " - " } else { " + " })?;
            }
            // `4*(D/4)`, not `4*D/4`, which would read as `(4*D)/4`.
            let alone = mag == 1 && m.0.len() == 1;
            let factors: Vec<String> =
                m.0.iter()
                    .map(|a| match a {
                        Atom::FloorDiv(..) if !alone => format!("({a})"),
                        _ => a.to_string(),
                    })
                    .collect();
            match (mag, factors.is_empty()) {
                (_, true) => write!(f, "{mag}")?,
                (1, false) => f.write_str(&factors.join("*"))?,
                (_, false) => write!(f, "{mag}*{}", factors.join("*"))?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: &str) -> DimExpr {
        DimExpr::sym(n)
    }
    fn c(n: usize) -> DimExpr {
        DimExpr::lit(n)
    }

    #[test]
    fn product_then_division_cancels() {
        let e = s("N").mul(&s("T")).mul(&c(1000)).div_floor(&c(1000));
        assert_eq!(e, s("N").mul(&s("T")));
        assert_eq!(e.to_string(), "N*T");
    }

    #[test]
    fn successor_differs() {
        assert_ne!(s("N"), s("N").add(&c(1)));
        assert_eq!(s("N").add(&c(1)).sub(&c(1)), s("N"));
        assert_eq!(s("N").add(&c(1)).to_string(), "N + 1");
    }

    #[test]
    fn commutative_normal_form() {
        let a = s("H").mul(&c(4)).add(&s("N"));
        let b = s("N").add(&c(4).mul(&s("H")));
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "4*H + N");
    }

    #[test]
    fn floor_division_by_constant() {
        // floor((H + 2 - 3)/2) + 1 == floor((H + 1)/2)
        let e = s("H").add(&c(2)).sub(&c(3)).div_floor(&c(2)).add(&c(1));
        let f = s("H").add(&c(1)).div_floor(&c(2));
        assert_eq!(e, f);
        assert_eq!(f.to_string(), "(H + 1)/2");
        // floor((2N + 1)/2) == N
        assert_eq!(s("N").mul(&c(2)).add(&c(1)).div_floor(&c(2)), s("N"));
        // stride 1 conv output: H + 2 - 3 + 1 == H
        assert_eq!(
            s("H").add(&c(2)).sub(&c(3)).div_floor(&c(1)).add(&c(1)),
            s("H")
        );
    }

    #[test]
    fn division_by_symbol() {
        let nd = s("N").mul(&s("D"));
        assert_eq!(nd.div_floor(&s("D")), s("N"));
        let opaque = s("N").div_floor(&s("D"));
        assert_eq!(opaque.to_string(), "N/D");
        assert_eq!(opaque.mul(&c(4)).mul(&s("T")).to_string(), "4*T*(N/D)");
        assert_ne!(opaque.mul(&s("D")), s("N"));
    }

    fn eval(e: &DimExpr, env: &dyn Fn(&str) -> i64) -> i64 {
        e.terms
            .iter()
            .map(|(m, c)| {
                m.0.iter().fold(*c, |acc, a| {
                    acc * match a {
                        Atom::Sym(s) => env(s),
                        Atom::FloorDiv(n, d) => eval(n, env).div_euclid(eval(d, env)),
                    }
                })
            })
            .sum()
    }

    /// A random integer expression over N, T, H as (symbolic, direct
    /// evaluation at the given sizes).
    #[derive(Clone, Debug)]
    enum Tree {
        Sym(usize),
        Lit(usize),
        Add(Box<Tree>, Box<Tree>),
        Sub(Box<Tree>, Box<Tree>),
        Mul(Box<Tree>, Box<Tree>),
        Div(Box<Tree>, usize),
        DivSym(Box<Tree>, usize),
    }

    const SYMS: [&str; 3] = ["N", "T", "H"];

    fn tree() -> impl proptest::strategy::Strategy<Value = Tree> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            (0..3usize).prop_map(Tree::Sym),
            (0..6usize).prop_map(Tree::Lit)
        ];
        leaf.prop_recursive(4, 24, 2, |t| {
            prop_oneof![
                (t.clone(), t.clone()).prop_map(|(a, b)| Tree::Add(Box::new(a), Box::new(b))),
                (t.clone(), t.clone()).prop_map(|(a, b)| Tree::Sub(Box::new(a), Box::new(b))),
                (t.clone(), t.clone()).prop_map(|(a, b)| Tree::Mul(Box::new(a), Box::new(b))),
                (t.clone(), 1..5usize).prop_map(|(a, d)| Tree::Div(Box::new(a), d)),
                (t, 0..3usize).prop_map(|(a, s)| Tree::DivSym(Box::new(a), s)),
            ]
        })
    }

    fn build(t: &Tree) -> DimExpr {
        match t {
            Tree::Sym(i) => s(SYMS[*i]),
            Tree::Lit(n) => c(*n),
            Tree::Add(a, b) => build(a).add(&build(b)),
            Tree::Sub(a, b) => build(a).sub(&build(b)),
            Tree::Mul(a, b) => build(a).mul(&build(b)),
            Tree::Div(a, d) => build(a).div_floor(&c(*d)),
            Tree::DivSym(a, i) => build(a).div_floor(&s(SYMS[*i])),
        }
    }

    fn direct(t: &Tree, v: &[i64; 3]) -> i64 {
        match t {
            Tree::Sym(i) => v[*i],
            Tree::Lit(n) => *n as i64,
            Tree::Add(a, b) => direct(a, v) + direct(b, v),
            Tree::Sub(a, b) => direct(a, v) - direct(b, v),
            Tree::Mul(a, b) => direct(a, v) * direct(b, v),
            Tree::Div(a, d) => direct(a, v).div_euclid(*d as i64),
            Tree::DivSym(a, i) => direct(a, v).div_euclid(v[*i]),
        }
    }

    proptest::proptest! {
        /// Normalisation keeps the value: the normal form evaluates like
        /// the expression it came from, at every size, so two expressions
        /// it calls equal are equal at every size.
        #[test]
        fn normal_form_preserves_value(t in tree(), n in 1..9i64, tt in 1..9i64, h in 1..9i64) {
            let v = [n, tt, h];
            let env = |name: &str| v[SYMS.iter().position(|x| *x == name).unwrap_or(0)];
            proptest::prop_assert_eq!(eval(&build(&t), &env), direct(&t, &v));
        }
    }

    #[test]
    fn constants_are_known() {
        assert_eq!(c(6).mul(&c(7)).known(), Some(42));
        assert_eq!(c(3).sub(&c(5)).known(), None);
        assert_eq!(c(3).sub(&c(5)).to_string(), "-2");
        assert_eq!(s("N").known(), None);
        assert_eq!(c(7).div_floor(&c(2)).known(), Some(3));
    }
}
