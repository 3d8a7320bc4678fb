//! Parameter initialisation (LANGUAGE.md §7).
//!
//! One generator, seeded once, draws the parameters in sorted name order, so
//! a model initialises identically on every machine, thread count and run.
//! The generator is written out here (SplitMix64, Box–Muller) rather than
//! taken from a crate, so its stream can never change under us.
//!
//! Choices that fix the stream (changing any of them changes every model's
//! initial weights):
//! - A parameter present in `given` consumes no draws; the others draw in the
//!   same order as if it were absent from the model.
//! - `zeros` and `ones` consume no draws.
//! - Every normal draw consumes exactly two `u64`s (one Box–Muller pair, of
//!   which only the cosine branch is used), so no state carries from one
//!   parameter to the next except the generator's.
//! - Values are computed in `f64` and rounded to `f32` once.

use crate::ir::{Graph, Init, Op};
use crate::tensor::{numel, Tensor};
use std::collections::BTreeMap;

/// SplitMix64 (Steele, Lea, Flood 2014; Vigna's `splitmix64.c`).
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`: the top 53 bits as a fraction.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal by Box–Muller; consumes two `u64`s.
    pub fn normal(&mut self) -> f64 {
        // 1 − u lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// `(fan_in, fan_out)` of a weight, as Keras computes them for our layouts:
/// rank 2 `[in, out]`; rank ≥ 3 `[out, in, k...]` (conv `[O, C, kh, kw]`:
/// `C·kh·kw` and `O·kh·kw`); rank 1: both the size; rank 0: both 1.
pub fn fans(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (*n, *n),
        [i, o] => (*i, *o),
        [o, i, rest @ ..] => {
            let receptive: usize = rest.iter().product();
            (i * receptive, o * receptive)
        }
    }
}

/// `numel(shape)` values of `init`, drawn from `rng`.
pub fn sample(init: &Init, shape: &[usize], rng: &mut SplitMix64) -> Vec<f32> {
    let n = numel(shape);
    let uniform = |rng: &mut SplitMix64, lo: f64, hi: f64| lo + (hi - lo) * rng.uniform();
    match init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Normal { std } => (0..n)
            .map(|_| (f64::from(*std) * rng.normal()) as f32)
            .collect(),
        Init::Uniform { lo, hi } => (0..n)
            .map(|_| uniform(rng, f64::from(*lo), f64::from(*hi)) as f32)
            .collect(),
        // Glorot/Xavier uniform: U(−l, l), l = sqrt(6 / (fan_in + fan_out)).
        Init::GlorotUniform => {
            let (fi, fo) = fans(shape);
            let limit = (6.0 / (fi + fo) as f64).sqrt();
            (0..n).map(|_| uniform(rng, -limit, limit) as f32).collect()
        }
        // He normal: a plain (not truncated) normal with std sqrt(2 / fan_in).
        Init::HeNormal => {
            let (fi, _) = fans(shape);
            let std = (2.0 / fi as f64).sqrt();
            (0..n).map(|_| (std * rng.normal()) as f32).collect()
        }
    }
}

/// Initialise every Param of `g` missing from `given`, drawing from one
/// generator seeded with `seed`, in sorted parameter-name order (a parameter
/// that is given still consumes nothing), so a model initialises identically
/// on every machine and thread count.
///
/// Returns one tensor per parameter name of `g`: the given tensor when there
/// is one (passed through unchecked), else the initialised one. Entries of
/// `given` that name no parameter are left out. A name used by several param
/// nodes is initialised once, from the first node (in node order).
pub fn init_params(
    g: &Graph,
    seed: u64,
    given: &BTreeMap<String, Tensor>,
) -> BTreeMap<String, Tensor> {
    let mut rng = SplitMix64::new(seed);
    let mut out = BTreeMap::new();
    // `Graph::params` is sorted by name, which fixes the draw order.
    for (name, value) in g.params() {
        if out.contains_key(&name) {
            continue;
        }
        if let Some(t) = given.get(&name) {
            out.insert(name, t.clone());
            continue;
        }
        let node = g.node(value.node);
        let (Op::Param { init, .. }, Some(ty)) = (&node.op, node.outputs.first()) else {
            continue;
        };
        let data = sample(init, &ty.shape, &mut rng);
        out.insert(
            name,
            Tensor {
                shape: ty.shape.clone(),
                data: crate::tensor::Data::F32(data),
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::TensorType;

    /// The reference values of Apache Commons RNG's `SplitMix64Test`
    /// (seed 0x1a2b3c4d5e6f7531), an independent implementation of
    /// Vigna's algorithm.
    #[test]
    fn splitmix64_matches_published_vector() {
        let mut r = SplitMix64::new(0x1a2b_3c4d_5e6f_7531);
        let want = [
            0x4141_3027_68c9_e9d0u64,
            0x64df_48c4_eab5_1b1a,
            0x4e72_3b53_dbd9_01b3,
            0xead8_3944_09dd_6454,
            0x3ef6_0e48_5b41_2a0a,
        ];
        for w in want {
            assert_eq!(r.next_u64(), w);
        }
    }

    fn graph(params: &[(&str, Vec<usize>, Init)]) -> Graph {
        let mut g = Graph::new();
        for (name, shape, init) in params {
            g.add_leaf(
                Op::Param {
                    name: name.to_string(),
                    init: init.clone(),
                },
                TensorType::f32(shape.clone()),
                None,
            );
        }
        g
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.as_f32().map(<[f32]>::to_vec).unwrap_or_default()
    }

    #[test]
    fn same_seed_same_values_different_seed_different_values() {
        let g = graph(&[
            ("w", vec![3, 4], Init::GlorotUniform),
            ("v", vec![5], Init::Normal { std: 1.0 }),
        ]);
        let a = init_params(&g, 7, &BTreeMap::new());
        let b = init_params(&g, 7, &BTreeMap::new());
        let c = init_params(&g, 8, &BTreeMap::new());
        assert_eq!(a, b);
        assert_ne!(values(&a["w"]), values(&c["w"]));
        assert_eq!(a["w"].shape, vec![3, 4]);
        assert_eq!(a["v"].shape, vec![5]);
    }

    #[test]
    fn draw_order_is_by_name_not_by_node_order() {
        let p1 = ("a", vec![2, 3], Init::Uniform { lo: -1.0, hi: 1.0 });
        let p2 = ("b", vec![4], Init::Normal { std: 0.5 });
        let g1 = graph(&[p1.clone(), p2.clone()]);
        let g2 = graph(&[p2, p1]);
        assert_eq!(
            init_params(&g1, 3, &BTreeMap::new()),
            init_params(&g2, 3, &BTreeMap::new())
        );
    }

    #[test]
    fn first_parameter_uses_the_first_draws() {
        // "a" sorts first, so its first value is lo + (hi - lo)·u with u the
        // top 53 bits of the generator's first output for seed 0.
        let g = graph(&[
            ("z", vec![1], Init::Zeros),
            ("a", vec![1], Init::Uniform { lo: 2.0, hi: 4.0 }),
        ]);
        let got = init_params(&g, 0, &BTreeMap::new());
        let first = SplitMix64::new(0).next_u64();
        let u = (first >> 11) as f64 / (1u64 << 53) as f64;
        assert_eq!(values(&got["a"]), vec![(2.0 + 2.0 * u) as f32]);
        assert_eq!(values(&got["z"]), vec![0.0]);
    }

    #[test]
    fn given_parameters_are_kept_and_consume_nothing() {
        let g = graph(&[
            ("a", vec![2], Init::Normal { std: 1.0 }),
            ("b", vec![3], Init::Normal { std: 1.0 }),
        ]);
        let mut given = BTreeMap::new();
        given.insert("a".to_string(), Tensor::f32(vec![2], vec![9.0, 9.0]));
        given.insert("unrelated".to_string(), Tensor::scalar(1.0));
        let with = init_params(&g, 11, &given);
        assert_eq!(values(&with["a"]), vec![9.0, 9.0]);
        assert!(!with.contains_key("unrelated"));
        // "b" draws as if "a" did not exist: the same as a model with b only.
        let only_b = init_params(
            &graph(&[("b", vec![3], Init::Normal { std: 1.0 })]),
            11,
            &BTreeMap::new(),
        );
        assert_eq!(with["b"], only_b["b"]);
    }

    #[test]
    fn fans_follow_keras() {
        assert_eq!(fans(&[]), (1, 1));
        assert_eq!(fans(&[7]), (7, 7));
        assert_eq!(fans(&[3, 5]), (3, 5));
        // conv [O, C, kh, kw] = [8, 3, 5, 5]: 3·25 and 8·25
        assert_eq!(fans(&[8, 3, 5, 5]), (75, 200));
    }

    #[test]
    fn glorot_respects_its_bound_and_fills_it() {
        // [100, 200]: limit = sqrt(6/300) = 0.14142…
        let g = graph(&[("w", vec![100, 200], Init::GlorotUniform)]);
        let w = values(&init_params(&g, 0, &BTreeMap::new())["w"]);
        let limit = (6.0f32 / 300.0).sqrt();
        assert!(w.iter().all(|v| v.abs() <= limit));
        // 20 000 uniform draws reach within 1% of both ends of the interval.
        assert!(w.iter().cloned().fold(f32::MIN, f32::max) > 0.99 * limit);
        assert!(w.iter().cloned().fold(f32::MAX, f32::min) < -0.99 * limit);
    }

    #[test]
    fn normal_and_he_normal_have_the_right_spread() {
        // conv [16, 8, 3, 3]: fan_in 72, std sqrt(2/72) = 1/6.
        let g = graph(&[
            ("h", vec![16, 8, 3, 3], Init::HeNormal),
            ("n", vec![100, 100], Init::Normal { std: 2.0 }),
            ("o", vec![2, 2], Init::Ones),
        ]);
        let p = init_params(&g, 5, &BTreeMap::new());
        let std = |v: &[f32]| {
            let m = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
            (v.iter().map(|&x| (f64::from(x) - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
        };
        // 1152 samples: the sample std is within ~6% of 1/6 with overwhelming probability.
        let sh = std(&values(&p["h"]));
        assert!((sh - 1.0 / 6.0).abs() < 0.1 / 6.0, "he_normal std {sh}");
        // Plain, not truncated at 2σ as Keras' truncated variant would be:
        // about 5% of 1152 draws (≈52) lie beyond 2σ.
        let beyond = values(&p["h"])
            .iter()
            .filter(|v| v.abs() > 2.0 / 6.0)
            .count();
        assert!(beyond > 20, "only {beyond} draws beyond 2σ");
        let sn = std(&values(&p["n"]));
        assert!((sn - 2.0).abs() < 0.05, "normal std {sn}");
        assert_eq!(values(&p["o"]), vec![1.0; 4]);
    }
}
