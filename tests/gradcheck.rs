//! Gradient checks for autodiff: every op's rule against central finite
//! differences computed by the reference interpreter in f64, hand-computed
//! expectations at ties and kinks, and the training step against the §8
//! update formulas written out here.

use dlc::autodiff::{gradients, training_step, with_gradients, AutodiffError};
use dlc::interp::{run, Array, Precision};
use dlc::ir::{
    BinaryOp, Conv2d, Graph, Init, Op, OutputKind, Pool2d, ReduceOp, TensorType, UnaryOp, Value,
};
use dlc::model::{Model, Optimizer, Regularizer, TrainConfig};
use dlc::tensor::DType;
use std::collections::BTreeMap;

// ---------------------------------------------------------------- helpers

/// SplitMix64: a tiny seeded generator so every check is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[lo, hi)`.
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// A graph under test: differentiable `Param` leaves with random values and
/// non-differentiable `Input` leaves (ids, labels).
struct Check {
    g: Graph,
    rng: Rng,
    params: Vec<(String, Value)>,
    feeds: BTreeMap<String, Array>,
}

impl Check {
    fn new(seed: u64) -> Check {
        Check {
            g: Graph::new(),
            rng: Rng(seed),
            params: Vec::new(),
            feeds: BTreeMap::new(),
        }
    }

    /// A parameter with values uniform in `[-1, 1)`.
    fn param(&mut self, name: &str, shape: &[usize]) -> Value {
        self.param_in(name, shape, -1.0, 1.0)
    }

    fn param_in(&mut self, name: &str, shape: &[usize], lo: f64, hi: f64) -> Value {
        let data = (0..numel(shape))
            .map(|_| self.rng.uniform(lo, hi))
            .collect();
        self.param_with(name, shape, data)
    }

    fn param_with(&mut self, name: &str, shape: &[usize], data: Vec<f64>) -> Value {
        let v = self.g.add_leaf(
            Op::Param {
                name: name.into(),
                init: Init::Zeros,
            },
            TensorType::f32(shape.to_vec()),
            None,
        );
        self.feeds
            .insert(name.into(), Array::f(shape.to_vec(), data));
        self.params.push((name.into(), v));
        v
    }

    fn ints(&mut self, name: &str, shape: &[usize], data: Vec<i32>) -> Value {
        let v = self.g.add_leaf(
            Op::Input { name: name.into() },
            TensorType::new(DType::I32, shape.to_vec()),
            None,
        );
        self.feeds
            .insert(name.into(), Array::i(shape.to_vec(), data));
        v
    }

    fn op(&mut self, op: Op, ins: &[Value]) -> Value {
        self.g.add(op, ins, None).expect("test graph is well-typed")
    }

    /// `loss = Σ y ⊙ r` with fixed random `r`, so every element of `y` gets
    /// a different upstream gradient; returns the loss.
    fn weighted_sum(&mut self, y: Value) -> Value {
        let shape = self.g.ty(y).shape.clone();
        let r = self.g.add_leaf(
            Op::Input { name: "r".into() },
            TensorType::f32(shape.clone()),
            None,
        );
        let data = (0..numel(&shape))
            .map(|_| self.rng.uniform(-1.0, 1.0))
            .collect();
        self.feeds.insert("r".into(), Array::f(shape.clone(), data));
        let p = self.op(Op::Binary(BinaryOp::Mul), &[y, r]);
        let axes = (0..shape.len()).collect();
        self.op(
            Op::Reduce {
                op: ReduceOp::Sum,
                axes,
                keepdims: false,
            },
            &[p],
        )
    }

    /// The analytic gradient of scalar `loss` w.r.t. every param, by name.
    fn analytic(&self, loss: Value) -> BTreeMap<String, Vec<f64>> {
        let mut g = self.g.clone();
        let wrt: Vec<Value> = self.params.iter().map(|(_, v)| *v).collect();
        let grads = gradients(&mut g, loss, &wrt).expect("gradient graph builds");
        for ((name, _), d) in self.params.iter().zip(grads) {
            g.push_output(format!("grad.{name}"), OutputKind::Grad, d);
        }
        let out = run(&g, &self.feeds, Precision::F64).expect("gradient graph runs");
        self.params
            .iter()
            .map(|(name, _)| (name.clone(), floats(&out[&format!("grad.{name}")])))
            .collect()
    }

    /// Compare the analytic gradient of `loss` with central differences.
    fn check_fd(&self, loss: Value) -> BTreeMap<String, Vec<f64>> {
        self.check_fd_tol(loss, 1e-6, 1e-8)
    }

    fn check_fd_tol(&self, loss: Value, rtol: f64, atol: f64) -> BTreeMap<String, Vec<f64>> {
        let analytic = self.analytic(loss);
        let mut fwd = self.g.clone();
        fwd.push_output("loss", OutputKind::Loss, loss);
        let eval = |feeds: &BTreeMap<String, Array>| -> f64 {
            let out = run(&fwd, feeds, Precision::F64).expect("forward graph runs");
            floats(&out["loss"])[0]
        };
        let h = 1e-5;
        for (name, _) in &self.params {
            let base = floats(&self.feeds[name]);
            for i in 0..base.len() {
                let mut feeds = self.feeds.clone();
                let mut at = |x: f64| {
                    let mut d = base.clone();
                    d[i] = x;
                    feeds.insert(name.clone(), Array::f(self.feeds[name].shape.clone(), d));
                    eval(&feeds)
                };
                let fd = (at(base[i] + h) - at(base[i] - h)) / (2.0 * h);
                let a = analytic[name][i];
                assert!(
                    (a - fd).abs() <= atol + rtol * a.abs().max(fd.abs()),
                    "d loss / d {name}[{i}]: autodiff {a} but finite differences {fd}"
                );
            }
        }
        analytic
    }
}

fn floats(a: &Array) -> Vec<f64> {
    a.as_f().expect("a float array").to_vec()
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-9 + 1e-7 * w.abs(),
            "{what}[{i}]: got {g}, want {w} (all: {got:?})"
        );
    }
}

/// Build `loss = Σ r ⊙ op(params...)` and check it.
fn fd_op(seed: u64, op: Op, shapes: &[&[usize]]) {
    let mut c = Check::new(seed);
    let ins: Vec<Value> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| c.param(&format!("p{i}"), s))
        .collect();
    let y = c.op(op, &ins);
    let loss = c.weighted_sum(y);
    c.check_fd(loss);
}

// ---------------------------------------------------------------- elementwise

#[test]
fn unary_ops_match_finite_differences() {
    let cases = [
        (UnaryOp::Relu, -1.0, 1.0),
        (UnaryOp::Sigmoid, -3.0, 3.0),
        (UnaryOp::Tanh, -2.0, 2.0),
        (UnaryOp::Exp, -2.0, 2.0),
        (UnaryOp::Log, 0.3, 3.0),
        (UnaryOp::Sqrt, 0.3, 3.0),
        (UnaryOp::Abs, -1.0, 1.0),
        (UnaryOp::Neg, -1.0, 1.0),
    ];
    for (k, (u, lo, hi)) in cases.into_iter().enumerate() {
        let mut c = Check::new(100 + k as u64);
        let x = c.param_in("x", &[3, 4], lo, hi);
        let y = c.op(Op::Unary(u), &[x]);
        let loss = c.weighted_sum(y);
        c.check_fd(loss);
    }
}

#[test]
fn step_and_sign_have_zero_gradient() {
    for u in [UnaryOp::Step, UnaryOp::Sign] {
        let mut c = Check::new(7);
        let x = c.param("x", &[5]);
        let y = c.op(Op::Unary(u), &[x]);
        let loss = c.weighted_sum(y);
        assert_eq!(c.analytic(loss)["x"], vec![0.0; 5]);
    }
}

#[test]
fn relu_and_abs_have_zero_derivative_at_zero() {
    for (u, want) in [
        (UnaryOp::Relu, [0.0, 0.0, 1.0]),
        (UnaryOp::Abs, [-1.0, 0.0, 1.0]),
    ] {
        let mut c = Check::new(1);
        let x = c.param_with("x", &[3], vec![-1.0, 0.0, 2.0]);
        let y = c.op(Op::Unary(u), &[x]);
        let loss = c.op(
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![0],
                keepdims: false,
            },
            &[y],
        );
        assert_eq!(c.analytic(loss)["x"], want.to_vec(), "{u:?}");
    }
}

#[test]
fn binary_ops_with_broadcasting_match_finite_differences() {
    let ops = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Maximum,
        BinaryOp::Minimum,
    ];
    // same shape, rank-extending, size-1 axes on both sides, scalar
    let shapes: [(&[usize], &[usize]); 5] = [
        (&[2, 3], &[2, 3]),
        (&[2, 3, 4], &[4]),
        (&[2, 1, 4], &[3, 1]),
        (&[1, 3], &[2, 3, 1]),
        (&[], &[2, 2]),
    ];
    for (k, b) in ops.into_iter().enumerate() {
        for (j, (sa, sb)) in shapes.iter().enumerate() {
            let mut c = Check::new(1000 + 10 * k as u64 + j as u64);
            let a = c.param("a", sa);
            // keep the divisor away from 0
            let bv = if b == BinaryOp::Div {
                c.param_in("b", sb, 0.5, 2.0)
            } else {
                c.param("b", sb)
            };
            let y = c.op(Op::Binary(b), &[a, bv]);
            let loss = c.weighted_sum(y);
            c.check_fd(loss);
        }
    }
}

#[test]
fn maximum_and_minimum_split_ties_equally() {
    // a = [1, 2, 3], b = [1, 5, 0]: a tie, b wins, a wins.
    for (b_op, want_a, want_b) in [
        (BinaryOp::Maximum, [0.5, 0.0, 1.0], [0.5, 1.0, 0.0]),
        (BinaryOp::Minimum, [0.5, 1.0, 0.0], [0.5, 0.0, 1.0]),
    ] {
        let mut c = Check::new(2);
        let a = c.param_with("a", &[3], vec![1.0, 2.0, 3.0]);
        let b = c.param_with("b", &[3], vec![1.0, 5.0, 0.0]);
        let y = c.op(Op::Binary(b_op), &[a, b]);
        let loss = c.op(
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![0],
                keepdims: false,
            },
            &[y],
        );
        let g = c.analytic(loss);
        assert_eq!(g["a"], want_a.to_vec(), "{b_op:?} a");
        assert_eq!(g["b"], want_b.to_vec(), "{b_op:?} b");
    }
}

#[test]
fn greater_and_equal_pass_no_gradient() {
    for b_op in [BinaryOp::Greater, BinaryOp::Equal] {
        let mut c = Check::new(3);
        let a = c.param("a", &[4]);
        let b = c.param("b", &[4]);
        let y = c.op(Op::Binary(b_op), &[a, b]);
        let loss = c.weighted_sum(y);
        let g = c.analytic(loss);
        assert_eq!(g["a"], vec![0.0; 4]);
        assert_eq!(g["b"], vec![0.0; 4]);
    }
}

// ---------------------------------------------------------------- reductions

#[test]
fn reductions_over_several_axes_match_finite_differences() {
    let mut k = 0;
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
        // leading, inner, mixed, all, none, and an axis listed twice
        for axes in [
            vec![0, 1],
            vec![1],
            vec![0, 2],
            vec![0, 1, 2],
            vec![],
            vec![2, 2],
        ] {
            for keepdims in [false, true] {
                k += 1;
                let reduce = Op::Reduce {
                    op,
                    axes: axes.clone(),
                    keepdims,
                };
                fd_op(2000 + k, reduce, &[&[2, 3, 4]]);
            }
        }
    }
}

#[test]
fn max_reduction_splits_ties_equally() {
    // rows [3, 1, 3] and [0, 2, 1]: the first row's max ties.
    let mut c = Check::new(4);
    let x = c.param_with("x", &[2, 3], vec![3.0, 1.0, 3.0, 0.0, 2.0, 1.0]);
    let m = c.op(
        Op::Reduce {
            op: ReduceOp::Max,
            axes: vec![1],
            keepdims: false,
        },
        &[x],
    );
    let w = c.param_with("w", &[2], vec![2.0, 10.0]);
    let y = c.op(Op::Binary(BinaryOp::Mul), &[m, w]);
    let loss = c.op(
        Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![0],
            keepdims: false,
        },
        &[y],
    );
    let g = c.analytic(loss);
    assert_eq!(g["x"], vec![1.0, 0.0, 1.0, 0.0, 10.0, 0.0]);
    assert_eq!(g["w"], vec![3.0, 2.0]);
}

#[test]
fn softmax_and_log_softmax_match_finite_differences() {
    for (k, axis) in [0usize, 1, 2].into_iter().enumerate() {
        fd_op(3000 + k as u64, Op::Softmax { axis }, &[&[2, 3, 4]]);
        fd_op(3100 + k as u64, Op::LogSoftmax { axis }, &[&[2, 3, 4]]);
    }
}

// ---------------------------------------------------------------- linear algebra and layout

#[test]
fn matmul_with_batch_broadcasting_matches_finite_differences() {
    let shapes: [(&[usize], &[usize]); 5] = [
        (&[3, 4], &[4, 2]),
        (&[2, 3, 4], &[4, 5]),
        (&[2, 2, 3, 4], &[4, 2]),
        (&[2, 1, 3, 4], &[3, 4, 2]),
        (&[1, 3, 4], &[2, 4, 2]),
    ];
    for (k, (a, b)) in shapes.iter().enumerate() {
        fd_op(4000 + k as u64, Op::MatMul, &[a, b]);
    }
}

#[test]
fn layout_ops_match_finite_differences() {
    fd_op(
        5000,
        Op::Transpose {
            perm: vec![2, 0, 1],
        },
        &[&[2, 3, 4]],
    );
    fd_op(5001, Op::Reshape { shape: vec![4, 6] }, &[&[2, 3, 4]]);
    fd_op(
        5002,
        Op::Expand {
            shape: vec![2, 3, 4],
        },
        &[&[3, 1]],
    );
    fd_op(
        5003,
        Op::Concat { axis: 1 },
        &[&[2, 1, 3], &[2, 3, 3], &[2, 2, 3]],
    );
    fd_op(
        5004,
        Op::Slice {
            axis: 1,
            start: 1,
            end: 3,
        },
        &[&[2, 4, 3]],
    );
    fd_op(
        5005,
        Op::PadSlice {
            axis: 0,
            start: 2,
            full: 5,
        },
        &[&[2, 3]],
    );
}

#[test]
fn a_value_used_twice_accumulates_both_gradients() {
    // loss = Σ r ⊙ (x ⊙ x + x) has d/dx = r ⊙ (2x + 1)
    let mut c = Check::new(5);
    let x = c.param("x", &[4]);
    let xx = c.op(Op::Binary(BinaryOp::Mul), &[x, x]);
    let y = c.op(Op::Binary(BinaryOp::Add), &[xx, x]);
    let loss = c.weighted_sum(y);
    let g = c.check_fd(loss);
    let (xs, r) = (floats(&c.feeds["x"]), floats(&c.feeds["r"]));
    let want: Vec<f64> = xs
        .iter()
        .zip(&r)
        .map(|(x, r)| r * (2.0 * x + 1.0))
        .collect();
    assert_close(&g["x"], &want, "x");
}

// ---------------------------------------------------------------- conv and pooling

#[test]
fn conv_matches_finite_differences() {
    let convs = [
        Conv2d {
            stride: 1,
            dilation: 1,
            pad: [0, 0, 0, 0],
        },
        Conv2d {
            stride: 2,
            dilation: 1,
            pad: [1, 1, 1, 1],
        },
        Conv2d {
            stride: 1,
            dilation: 2,
            pad: [1, 0, 2, 1],
        },
    ];
    for (k, c) in convs.into_iter().enumerate() {
        fd_op(
            6000 + k as u64,
            Op::Conv(c),
            &[&[2, 2, 5, 6], &[3, 2, 3, 2]],
        );
    }
}

#[test]
fn conv_gradient_ops_have_adjoint_gradients() {
    let conv = Conv2d {
        stride: 2,
        dilation: 1,
        pad: [1, 0, 1, 1],
    };
    // forward conv of [2, 2, 5, 6] by [3, 2, 3, 2] gives [2, 3, 3, 3]: (5+2−3)/2+1, (6+1−2)/2+1
    fd_op(
        6100,
        Op::ConvGradInput {
            conv,
            input_hw: [5, 6],
        },
        &[&[2, 3, 3, 3], &[3, 2, 3, 2]],
    );
    fd_op(
        6101,
        Op::ConvGradFilter {
            conv,
            kernel_hw: [3, 2],
        },
        &[&[2, 2, 5, 6], &[2, 3, 3, 3]],
    );
}

#[test]
fn pooling_matches_finite_differences() {
    let pools = [
        Pool2d {
            window: 2,
            stride: 2,
            pad: 0,
        },
        Pool2d {
            window: 3,
            stride: 2,
            pad: 1,
        },
        Pool2d {
            window: 2,
            stride: 1,
            pad: 1,
        },
    ];
    for (k, p) in pools.into_iter().enumerate() {
        fd_op(7000 + k as u64, Op::MaxPool(p), &[&[2, 2, 5, 5]]);
        fd_op(7100 + k as u64, Op::AvgPool(p), &[&[2, 2, 5, 5]]);
    }
    // avg_pool_grad of [1, 2, 3, 3] back to the 5×5 input of window 3 / stride 2 / pad 1
    fd_op(
        7200,
        Op::AvgPoolGrad {
            pool: pools[1],
            input_hw: [5, 5],
        },
        &[&[1, 2, 3, 3]],
    );
}

#[test]
fn max_pool_routes_ties_to_the_first_maximum() {
    // One 2×4 image, window 2: the left window is all 1s (tie everywhere),
    // the right one ties between (0, 3) and (1, 2).
    let mut c = Check::new(6);
    let x = c.param_with(
        "x",
        &[1, 1, 2, 4],
        vec![1.0, 1.0, 0.0, 5.0, 1.0, 1.0, 5.0, 2.0],
    );
    let p = Pool2d {
        window: 2,
        stride: 2,
        pad: 0,
    };
    let y = c.op(Op::MaxPool(p), &[x]);
    let w = c.param_with("w", &[1, 1, 1, 2], vec![3.0, 7.0]);
    let yw = c.op(Op::Binary(BinaryOp::Mul), &[y, w]);
    let loss = c.op(
        Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![0, 1, 2, 3],
            keepdims: false,
        },
        &[yw],
    );
    let g = c.analytic(loss);
    assert_eq!(g["x"], vec![3.0, 0.0, 0.0, 7.0, 0.0, 0.0, 0.0, 0.0]);
}

// ---------------------------------------------------------------- sequences and attention

#[test]
fn lstm_and_gru_match_finite_differences() {
    for t in [1usize, 3] {
        let (n, f, h) = (2usize, 3usize, 2usize);
        let shapes_lstm: [&[usize]; 4] = [&[n, t, f], &[f, 4 * h], &[h, 4 * h], &[4 * h]];
        fd_op(8000 + t as u64, Op::LstmSeq, &shapes_lstm);
        let shapes_gru: [&[usize]; 4] = [&[n, t, f], &[f, 3 * h], &[h, 3 * h], &[3 * h]];
        fd_op(8100 + t as u64, Op::GruSeq, &shapes_gru);
    }
}

#[test]
fn attention_matches_finite_differences() {
    // (causal, q, k, v shapes)
    type Case<'a> = (bool, &'a [usize], &'a [usize], &'a [usize]);
    let cases: [Case; 4] = [
        (false, &[2, 3, 4], &[2, 5, 4], &[2, 5, 3]),
        (true, &[2, 4, 3], &[2, 4, 3], &[2, 4, 2]),
        (true, &[4, 3], &[4, 3], &[4, 3]),
        (false, &[2, 2, 1, 3], &[2, 2, 1, 3], &[2, 2, 1, 2]),
    ];
    for (k, (causal, q, kk, v)) in cases.into_iter().enumerate() {
        let scale = 1.0 / (q[q.len() - 1] as f32).sqrt();
        fd_op(
            9000 + k as u64,
            Op::Attention { causal, scale },
            &[q, kk, v],
        );
    }
}

// ---------------------------------------------------------------- embeddings and losses

#[test]
fn gather_with_repeated_ids_adds_up() {
    let mut c = Check::new(10);
    let table = c.param("table", &[4, 3]);
    let ids = c.ints("ids", &[2, 3], vec![0, 2, 0, 3, 0, 2]);
    let y = c.op(Op::Gather, &[table, ids]);
    let loss = c.weighted_sum(y);
    let g = c.check_fd(loss);
    // row v of the gradient is the sum of the r rows whose id is v
    let r = floats(&c.feeds["r"]);
    let mut want = vec![0.0; 12];
    for (pos, id) in [0usize, 2, 0, 3, 0, 2].into_iter().enumerate() {
        for d in 0..3 {
            want[id * 3 + d] += r[pos * 3 + d];
        }
    }
    assert_close(&g["table"], &want, "table");
    assert_eq!(
        &g["table"][3..6],
        &[0.0, 0.0, 0.0],
        "row 1 is never gathered"
    );
}

#[test]
fn scatter_add_has_gather_as_gradient() {
    let mut c = Check::new(11);
    let ids = c.ints("ids", &[4], vec![1, 1, 0, 3]);
    let dy = c.param("dy", &[4, 2]);
    let y = c.op(Op::ScatterAdd { rows: 5 }, &[ids, dy]);
    let loss = c.weighted_sum(y);
    c.check_fd(loss);
}

#[test]
fn losses_match_finite_differences() {
    let mut rng = Rng(12);
    for (k, op) in [Op::CrossEntropy, Op::Hinge].into_iter().enumerate() {
        let mut c = Check::new(1200 + k as u64);
        let s = c.param("s", &[4, 5]);
        let labels = (0..4).map(|_| rng.below(5) as i32).collect();
        let l = c.ints("labels", &[4], labels);
        let loss = c.op(op, &[s, l]);
        // scale the loss so dloss is not 1
        let w = c.param_in("w", &[], 0.5, 2.0);
        let scaled = c.op(Op::Binary(BinaryOp::Mul), &[loss, w]);
        c.check_fd(scaled);
    }
}

#[test]
fn hinge_has_zero_derivative_at_zero_margin() {
    // Sample 0 (label 0): margin 1 + 0 − 1 = 0 exactly, no gradient.
    // Sample 1 (label 1): margin 1 + 0.5 − 0 = 1.5 > 0 for class 0, so
    // d/ds₁₀ = +1/N and d/ds₁₁ = −1/N with N = 2.
    let mut c = Check::new(13);
    let s = c.param_with("s", &[2, 2], vec![1.0, 0.0, 0.5, 0.0]);
    let l = c.ints("labels", &[2], vec![0, 1]);
    let loss = c.op(Op::Hinge, &[s, l]);
    assert_eq!(c.analytic(loss)["s"], vec![0.0, 0.0, 0.5, -0.5]);
}

// ---------------------------------------------------------------- gradients() contract

#[test]
fn unrelated_values_get_a_zero_gradient() {
    let mut c = Check::new(14);
    let x = c.param("x", &[3]);
    c.param("unused", &[2, 2]);
    let y = c.op(Op::Unary(UnaryOp::Exp), &[x]);
    let loss = c.weighted_sum(y);
    let g = c.analytic(loss);
    assert_eq!(g["unused"], vec![0.0; 4]);
    assert!(g["x"].iter().all(|d| *d != 0.0));
}

#[test]
fn rejects_a_non_scalar_loss() {
    let mut c = Check::new(15);
    let x = c.param("x", &[3]);
    let err = gradients(&mut c.g, x, &[x]).unwrap_err();
    assert!(matches!(err, AutodiffError::LossNotScalar { .. }), "{err}");
    assert!(err.to_string().contains("f32[3]"), "{err}");
}

#[test]
fn rejects_a_gradient_with_respect_to_integers() {
    let mut c = Check::new(16);
    let table = c.param("table", &[3, 2]);
    let ids = c.ints("ids", &[2], vec![0, 1]);
    let y = c.op(Op::Gather, &[table, ids]);
    let loss = c.weighted_sum(y);
    let err = gradients(&mut c.g, loss, &[ids]).unwrap_err();
    assert!(matches!(err, AutodiffError::NotFloat { .. }), "{err}");
    assert!(err.to_string().contains("`ids`"), "{err}");
}

#[test]
fn reports_ops_without_a_gradient_rule() {
    let mut c = Check::new(17);
    let x = c.param("x", &[1, 1, 2, 2]);
    let dy = c.param("dy", &[1, 1, 1, 1]);
    let p = Pool2d {
        window: 2,
        stride: 2,
        pad: 0,
    };
    let dx = c.op(Op::MaxPoolGrad(p), &[x, dy]);
    let loss = c.weighted_sum(dx);
    let err = gradients(&mut c.g, loss, &[dy]).unwrap_err();
    assert!(
        matches!(
            err,
            AutodiffError::NoGradientRule {
                op: "max_pool2d_grad",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn ops_off_the_path_to_wrt_are_not_differentiated() {
    // The loss also depends on max_pool_grad of an input, but nothing we
    // differentiate flows through it, so no rule is needed there.
    let mut c = Check::new(18);
    let x = c.param("x", &[1, 1, 2, 2]);
    let w = c.param("w", &[1, 1, 2, 2]);
    let dy = c.param("dy", &[1, 1, 1, 1]);
    let p = Pool2d {
        window: 2,
        stride: 2,
        pad: 0,
    };
    let dx = c.op(Op::MaxPoolGrad(p), &[x, dy]);
    let y = c.op(Op::Binary(BinaryOp::Mul), &[dx, w]);
    let loss = c.weighted_sum(y);
    let before = c.g.graph.node_count();
    let grads = gradients(&mut c.g, loss, &[w]).expect("w's gradient avoids max_pool_grad");
    assert_eq!(c.g.ty(grads[0]).shape, vec![1, 1, 2, 2]);
    assert!(c.g.graph.node_count() > before);
}

// ---------------------------------------------------------------- with_gradients and training_step

/// `pred = x @ w + b`; `loss = mean((pred − t)²)`; also an output `pred`.
fn tiny_model() -> (Model, BTreeMap<String, Array>) {
    let mut g = Graph::new();
    let x = g.add_leaf(
        Op::Input { name: "x".into() },
        TensorType::f32(vec![4, 3]),
        None,
    );
    let t = g.add_leaf(
        Op::Input { name: "t".into() },
        TensorType::f32(vec![4, 2]),
        None,
    );
    let w = g.add_leaf(
        Op::Param {
            name: "w".into(),
            init: Init::GlorotUniform,
        },
        TensorType::f32(vec![3, 2]),
        None,
    );
    let b = g.add_leaf(
        Op::Param {
            name: "b".into(),
            init: Init::Zeros,
        },
        TensorType::f32(vec![2]),
        None,
    );
    let xw = g.add(Op::MatMul, &[x, w], None).unwrap();
    let pred = g.add(Op::Binary(BinaryOp::Add), &[xw, b], None).unwrap();
    let diff = g.add(Op::Binary(BinaryOp::Sub), &[pred, t], None).unwrap();
    let sq = g
        .add(Op::Binary(BinaryOp::Mul), &[diff, diff], None)
        .unwrap();
    let loss = g
        .add(
            Op::Reduce {
                op: ReduceOp::Mean,
                axes: vec![0, 1],
                keepdims: false,
            },
            &[sq],
            None,
        )
        .unwrap();
    g.push_output("pred", OutputKind::Output, pred);
    g.push_output("loss", OutputKind::Loss, loss);
    let model = Model {
        name: "tiny".into(),
        graph: g,
        dims: BTreeMap::new(),
        train: TrainConfig::default(),
    };
    let mut rng = Rng(99);
    let mut feeds = BTreeMap::new();
    for (name, shape) in [
        ("x", vec![4, 3]),
        ("t", vec![4, 2]),
        ("w", vec![3, 2]),
        ("b", vec![2]),
    ] {
        let data = (0..numel(&shape)).map(|_| rng.uniform(-1.0, 1.0)).collect();
        feeds.insert(name.to_string(), Array::f(shape, data));
    }
    (model, feeds)
}

/// `loss` and `grad.w`, `grad.b` of the tiny model from `with_gradients`.
fn tiny_grads(model: &Model, feeds: &BTreeMap<String, Array>) -> (f64, Vec<f64>, Vec<f64>) {
    let g = with_gradients(model).unwrap();
    let out = run(&g, feeds, Precision::F64).unwrap();
    (
        floats(&out["loss"])[0],
        floats(&out["grad.w"]),
        floats(&out["grad.b"]),
    )
}

#[test]
fn with_gradients_adds_sorted_grad_outputs_matching_hand_math() {
    let (model, feeds) = tiny_model();
    let g = with_gradients(&model).unwrap();
    let names: Vec<(&str, OutputKind)> = g
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.kind))
        .collect();
    assert_eq!(
        names,
        [
            ("pred", OutputKind::Output),
            ("loss", OutputKind::Loss),
            ("grad.b", OutputKind::Grad),
            ("grad.w", OutputKind::Grad),
        ]
    );
    // d/dpred mean((pred − t)²) = 2(pred − t)/8; grad.w = xᵀ·that, grad.b = column sums.
    let (_, gw, gb) = tiny_grads(&model, &feeds);
    let (x, t, w, b) = (
        floats(&feeds["x"]),
        floats(&feeds["t"]),
        floats(&feeds["w"]),
        floats(&feeds["b"]),
    );
    let mut dpred = [0.0; 8];
    for n in 0..4 {
        for j in 0..2 {
            let pred: f64 = (0..3).map(|k| x[n * 3 + k] * w[k * 2 + j]).sum::<f64>() + b[j];
            dpred[n * 2 + j] = 2.0 * (pred - t[n * 2 + j]) / 8.0;
        }
    }
    let mut want_w = vec![0.0; 6];
    let mut want_b = vec![0.0; 2];
    for n in 0..4 {
        for j in 0..2 {
            want_b[j] += dpred[n * 2 + j];
            for k in 0..3 {
                want_w[k * 2 + j] += x[n * 3 + k] * dpred[n * 2 + j];
            }
        }
    }
    assert_close(&gw, &want_w, "grad.w");
    assert_close(&gb, &want_b, "grad.b");
}

#[test]
fn with_gradients_needs_a_loss() {
    let (mut model, _) = tiny_model();
    model.graph.outputs.retain(|o| o.kind != OutputKind::Loss);
    let err = with_gradients(&model).unwrap_err();
    assert!(matches!(err, AutodiffError::NoLoss { .. }), "{err}");
    assert!(err.to_string().contains("tiny"), "{err}");
}

fn output_names(g: &Graph) -> Vec<(String, OutputKind)> {
    g.outputs.iter().map(|o| (o.name.clone(), o.kind)).collect()
}

fn kinds(names: &[&str]) -> Vec<(String, OutputKind)> {
    let mut v = vec![
        ("loss".to_string(), OutputKind::Loss),
        ("objective".to_string(), OutputKind::Output),
    ];
    v.extend(names.iter().map(|n| (n.to_string(), OutputKind::Update)));
    v
}

#[test]
fn sgd_step_without_momentum() {
    let (model, feeds) = tiny_model();
    let (loss, gw, gb) = tiny_grads(&model, &feeds);
    let lr = 0.1f32;
    let g = training_step(&model, &Optimizer::Sgd { lr, momentum: 0.0 }, None).unwrap();
    assert_eq!(output_names(&g), kinds(&["b", "w"]));
    assert!(g.states().is_empty(), "plain sgd keeps no state");
    let out = run(&g, &feeds, Precision::F64).unwrap();
    let lr = lr as f64;
    // w ← w − lr·g
    let want_w: Vec<f64> = floats(&feeds["w"])
        .iter()
        .zip(&gw)
        .map(|(w, g)| w - lr * g)
        .collect();
    let want_b: Vec<f64> = floats(&feeds["b"])
        .iter()
        .zip(&gb)
        .map(|(w, g)| w - lr * g)
        .collect();
    assert_close(&floats(&out["w"]), &want_w, "w");
    assert_close(&floats(&out["b"]), &want_b, "b");
    assert_close(&floats(&out["loss"]), &[loss], "loss");
    assert_close(&floats(&out["objective"]), &[loss], "objective");
}

#[test]
fn sgd_step_with_momentum() {
    let (model, mut feeds) = tiny_model();
    let (_, gw, gb) = tiny_grads(&model, &feeds);
    let (lr, mu) = (0.05f32, 0.9f32);
    let g = training_step(&model, &Optimizer::Sgd { lr, momentum: mu }, None).unwrap();
    assert_eq!(
        output_names(&g),
        kinds(&["b", "w", "opt.velocity.b", "opt.velocity.w"])
    );
    // a non-zero previous velocity, as after earlier steps
    let v_w = vec![0.3, -0.2, 0.1, 0.0, 0.5, -0.4];
    let v_b = vec![-0.1, 0.2];
    feeds.insert("opt.velocity.w".into(), Array::f(vec![3, 2], v_w.clone()));
    feeds.insert("opt.velocity.b".into(), Array::f(vec![2], v_b.clone()));
    let out = run(&g, &feeds, Precision::F64).unwrap();
    let (lr, mu) = (lr as f64, mu as f64);
    for (p, v0, grad) in [("w", &v_w, &gw), ("b", &v_b, &gb)] {
        // v ← μ·v + g;  w ← w − lr·v
        let v: Vec<f64> = v0
            .iter()
            .zip(grad.iter())
            .map(|(v, g)| mu * v + g)
            .collect();
        let w: Vec<f64> = floats(&feeds[p])
            .iter()
            .zip(&v)
            .map(|(w, v)| w - lr * v)
            .collect();
        assert_close(&floats(&out[&format!("opt.velocity.{p}")]), &v, p);
        assert_close(&floats(&out[p]), &w, p);
    }
}

#[test]
fn adam_step_with_bias_correction() {
    let (model, mut feeds) = tiny_model();
    let (_, gw, gb) = tiny_grads(&model, &feeds);
    let (lr, b1, b2, eps) = (0.01f32, 0.9f32, 0.999f32, 1e-8f32);
    let opt = Optimizer::Adam {
        lr,
        beta1: b1,
        beta2: b2,
        eps,
    };
    let g = training_step(&model, &opt, None).unwrap();
    assert_eq!(
        output_names(&g),
        kinds(&["b", "w", "opt.m.b", "opt.m.w", "opt.step", "opt.v.b", "opt.v.w"])
    );
    // state as after two earlier steps
    let t0 = 2.0;
    let (m_w, v_w) = (
        vec![0.1, -0.2, 0.0, 0.3, 0.05, -0.1],
        vec![0.01, 0.02, 0.0, 0.5, 0.1, 0.2],
    );
    let (m_b, v_b) = (vec![0.2, -0.1], vec![0.04, 0.3]);
    feeds.insert("opt.step".into(), Array::scalar(t0));
    feeds.insert("opt.m.w".into(), Array::f(vec![3, 2], m_w.clone()));
    feeds.insert("opt.v.w".into(), Array::f(vec![3, 2], v_w.clone()));
    feeds.insert("opt.m.b".into(), Array::f(vec![2], m_b.clone()));
    feeds.insert("opt.v.b".into(), Array::f(vec![2], v_b.clone()));
    let out = run(&g, &feeds, Precision::F64).unwrap();
    let (lr, b1, b2, eps) = (lr as f64, b1 as f64, b2 as f64, eps as f64);
    // t ← t + 1
    let t = t0 + 1.0;
    assert_eq!(floats(&out["opt.step"]), vec![t]);
    for (p, m0, v0, grad) in [("w", &m_w, &v_w, &gw), ("b", &m_b, &v_b, &gb)] {
        let w0 = floats(&feeds[p]);
        let (mut m, mut v, mut w) = (vec![], vec![], vec![]);
        for i in 0..w0.len() {
            // m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²
            m.push(b1 * m0[i] + (1.0 - b1) * grad[i]);
            v.push(b2 * v0[i] + (1.0 - b2) * grad[i] * grad[i]);
            // m̂ = m/(1−β1ᵗ);  v̂ = v/(1−β2ᵗ);  w ← w − lr·m̂/(sqrt(v̂)+eps)
            let m_hat = m[i] / (1.0 - b1.powf(t));
            let v_hat = v[i] / (1.0 - b2.powf(t));
            w.push(w0[i] - lr * m_hat / (v_hat.sqrt() + eps));
        }
        assert_close(&floats(&out[&format!("opt.m.{p}")]), &m, "m");
        assert_close(&floats(&out[&format!("opt.v.{p}")]), &v, "v");
        // ln β rounded to f32 perturbs βᵗ in the 8th digit
        for (got, want) in floats(&out[p]).iter().zip(&w) {
            assert!(
                (got - want).abs() <= 1e-9 + 1e-6 * want.abs(),
                "{p}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn regulariser_changes_objective_and_update_but_not_loss() {
    let (model, feeds) = tiny_model();
    let (loss, gw, gb) = tiny_grads(&model, &feeds);
    let (w0, b0) = (floats(&feeds["w"]), floats(&feeds["b"]));
    let lr = 0.1f32;
    let sgd = Optimizer::Sgd { lr, momentum: 0.0 };
    let lr = lr as f64;
    for reg in [Regularizer::L2(0.25), Regularizer::L1(0.5)] {
        let g = training_step(&model, &sgd, Some(reg)).unwrap();
        let out = run(&g, &feeds, Precision::F64).unwrap();
        // only w (rank 2) is penalised; b (rank 1) is not
        let (penalty, dpen): (f64, Vec<f64>) = match reg {
            // λ·Σw², gradient 2λw
            Regularizer::L2(l) => {
                let l = l as f64;
                (
                    l * w0.iter().map(|w| w * w).sum::<f64>(),
                    w0.iter().map(|w| 2.0 * l * w).collect(),
                )
            }
            // λ·Σ|w|, gradient λ·sign(w)
            Regularizer::L1(l) => {
                let l = l as f64;
                (
                    l * w0.iter().map(|w| w.abs()).sum::<f64>(),
                    w0.iter().map(|w| l * w.signum()).collect(),
                )
            }
        };
        assert_close(&floats(&out["loss"]), &[loss], "loss");
        assert_close(&floats(&out["objective"]), &[loss + penalty], "objective");
        let want_w: Vec<f64> = (0..6).map(|i| w0[i] - lr * (gw[i] + dpen[i])).collect();
        let want_b: Vec<f64> = (0..2).map(|i| b0[i] - lr * gb[i]).collect();
        assert_close(&floats(&out["w"]), &want_w, "w");
        assert_close(&floats(&out["b"]), &want_b, "b");
    }
}

#[test]
fn training_step_rejects_bad_hyperparameters() {
    let (model, _) = tiny_model();
    let adam = Optimizer::Adam {
        lr: 0.001,
        beta1: 1.0,
        beta2: 0.999,
        eps: 1e-8,
    };
    let err = training_step(&model, &adam, None).unwrap_err();
    assert!(err.to_string().contains("beta1"), "{err}");
    let sgd = Optimizer::Sgd {
        lr: f32::NAN,
        momentum: 0.0,
    };
    assert!(matches!(
        training_step(&model, &sgd, None),
        Err(AutodiffError::BadHyperparameter(_))
    ));
}

// ---------------------------------------------------------------- golden gradients

/// Every golden case that asks for `grad.*` entries: elaborate the model,
/// build `with_gradients`, run it in f64 and compare with the independent
/// reference's gradients at the golden tolerances (CLI.md).
#[test]
fn golden_gradients_match_the_reference() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let root = root.as_path();
    let mut cases = Vec::new();
    collect_cases(root, &mut cases);
    cases.sort();
    let mut failures = Vec::new();
    let mut checked = 0;
    for dir in &cases {
        match golden_case(dir) {
            Ok(true) => checked += 1,
            Ok(false) => {}
            Err(e) => failures.push(format!("{}: {e}", dir.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} failed:\n{}",
        failures.len(),
        checked + failures.len(),
        failures.join("\n")
    );
    eprintln!("checked the gradients of {checked} golden cases");
    assert!(
        checked > 0,
        "no golden case with gradients found under {}",
        root.display()
    );
}

fn collect_cases(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    if dir.join("model.dl").is_file() {
        out.push(dir.to_path_buf());
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.path().is_dir() {
            collect_cases(&e.path(), out);
        }
    }
}

/// `Ok(false)` when the case has no gradients to check.
fn golden_case(dir: &std::path::Path) -> Result<bool, String> {
    use dlc::io::read_safetensors;
    let expected =
        read_safetensors(&dir.join("expected.safetensors")).map_err(|e| e.to_string())?;
    if !expected.keys().any(|k| k.starts_with("grad.")) {
        return Ok(false);
    }
    let inputs = read_safetensors(&dir.join("inputs.safetensors")).map_err(|e| e.to_string())?;
    let params_path = dir.join("params.safetensors");
    let params = if params_path.is_file() {
        read_safetensors(&params_path).map_err(|e| e.to_string())?
    } else {
        Default::default()
    };
    let (mut model_name, mut rtol, mut atol) = (None, 1e-3, 1e-4);
    if let Ok(text) = std::fs::read_to_string(dir.join("case.toml")) {
        let t: toml::Table = text.parse().map_err(|e| format!("case.toml: {e}"))?;
        model_name = t.get("model").and_then(|v| v.as_str()).map(String::from);
        let num = |v: &toml::Value| v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
        rtol = t.get("grad_rtol").and_then(num).unwrap_or(rtol);
        atol = t.get("grad_atol").and_then(num).unwrap_or(atol);
    }
    let src = std::fs::read_to_string(dir.join("model.dl")).map_err(|e| e.to_string())?;
    let mut sources = dlc::diag::SourceMap::default();
    let file = sources.add("model.dl", src);
    let opts = dlc::elab::ElabOptions {
        model: model_name,
        input_shapes: inputs
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect(),
        ..Default::default()
    };
    let model = dlc::elab::elaborate(&mut sources, file, &opts)
        .map_err(|d| format!("elaboration failed: {}", dlc::diag::render(&d, &sources)))?
        .model;
    let g = with_gradients(&model).map_err(|e| format!("autodiff: {e}"))?;
    let feeds: BTreeMap<String, Array> = inputs
        .iter()
        .chain(params.iter())
        .map(|(k, t)| (k.clone(), Array::from(t)))
        .collect();
    let out = run(&g, &feeds, Precision::F64).map_err(|e| format!("interpreter: {e}"))?;
    for (name, want) in expected.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let got = out.get(name).ok_or_else(|| format!("no output {name}"))?;
        if got.shape != want.shape {
            return Err(format!(
                "{name}: shape {:?} but expected {:?}",
                got.shape, want.shape
            ));
        }
        let want = want.as_f32().ok_or_else(|| format!("{name} is not f32"))?;
        for (i, (g, w)) in floats(got).iter().zip(want).enumerate() {
            let w = f64::from(*w);
            if (g - w).abs() > atol + rtol * w.abs() {
                return Err(format!("{name}[{i}]: got {g}, expected {w}"));
            }
        }
    }
    Ok(true)
}

#[test]
fn no_gradient_is_built_for_values_not_asked_for() {
    // tiny model: pred = x @ w + b. Only dw = xᵀ·dpred needs a matmul;
    // dx = dpred·wᵀ (x is an input) must not be left in the graph.
    let (model, _) = tiny_model();
    let g = with_gradients(&model).unwrap();
    let matmuls = g
        .graph
        .node_indices()
        .filter(|n| matches!(g.node(*n).op, Op::MatMul))
        .count();
    assert_eq!(matmuls, 2, "{}", dlc::ir::print::print(&g));
    // the bias gradient sums the batch axis straight to [2], no reshape
    let gb = g.output("grad.b").unwrap().value;
    assert_eq!(
        g.node(gb.node).op,
        Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![0],
            keepdims: false
        }
    );
}

#[test]
fn rejects_a_node_whose_declared_type_contradicts_its_operands() {
    let mut c = Check::new(19);
    let a = c.param("a", &[2, 3]);
    let b = c.param("b", &[3, 4]);
    // claims [2, 5] where the shape rule gives [2, 4]
    let y =
        c.g.add_node_unchecked(Op::MatMul, vec![TensorType::f32(vec![2, 5])], &[a, b], None)[0];
    let loss = c.weighted_sum(y);
    let err = gradients(&mut c.g, loss, &[a]).unwrap_err();
    assert!(
        matches!(err, AutodiffError::Malformed { op: "matmul", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("f32[2, 5]"), "{err}");
}

#[test]
fn training_step_drops_ops_that_only_fed_other_outputs() {
    let (mut model, feeds) = tiny_model();
    let pred = model.graph.output("pred").unwrap().value;
    let probs = model
        .graph
        .add(Op::Softmax { axis: 1 }, &[pred], None)
        .unwrap();
    model.graph.push_output("probs", OutputKind::Output, probs);
    let sgd = Optimizer::Sgd {
        lr: 0.1,
        momentum: 0.0,
    };
    let g = training_step(&model, &sgd, None).unwrap();
    let softmaxes = g
        .graph
        .node_indices()
        .filter(|n| matches!(g.node(*n).op, Op::Softmax { .. }))
        .count();
    assert_eq!(softmaxes, 0);
    // still fed like the model, and still runs
    let names = |g: &Graph| {
        g.inputs_by_name()
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&g), names(&model.graph));
    assert!(run(&g, &feeds, Precision::F64).is_ok());
}

#[test]
fn a_shared_weight_gets_a_flat_matmul_gradient() {
    // x [2, 3, 4] @ w [4, 5]: dw = x[6, 4]ᵀ @ dy[6, 5], one 2-D product with
    // no [2, 4, 5] temporary summed afterwards.
    let mut c = Check::new(20);
    let x = c.param("x", &[2, 3, 4]);
    let w = c.param("w", &[4, 5]);
    let y = c.op(Op::MatMul, &[x, w]);
    let loss = c.weighted_sum(y);
    let grads = gradients(&mut c.g, loss, &[w]).unwrap();
    let dw = c.g.node(grads[0].node);
    assert_eq!(dw.op, Op::MatMul);
    let operands: Vec<Vec<usize>> =
        c.g.inputs(grads[0].node)
            .iter()
            .map(|v| c.g.ty(*v).shape.clone())
            .collect();
    assert_eq!(operands, vec![vec![4, 6], vec![6, 5]]);
}

#[test]
fn max_over_several_axes_with_keepdims_splits_ties_among_all() {
    // x [2, 1, 2] reduced over axes [0, 2] with keepdims gives [1, 1, 1];
    // three of the four elements tie at the max 4, so each gets dy/3.
    let mut c = Check::new(21);
    let x = c.param_with("x", &[2, 1, 2], vec![4.0, 1.0, 4.0, 4.0]);
    let m = c.op(
        Op::Reduce {
            op: ReduceOp::Max,
            axes: vec![0, 2],
            keepdims: true,
        },
        &[x],
    );
    let w = c.param_with("w", &[1, 1, 1], vec![3.0]);
    let y = c.op(Op::Binary(BinaryOp::Mul), &[m, w]);
    let loss = c.op(
        Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![0, 1, 2],
            keepdims: false,
        },
        &[y],
    );
    let g = c.analytic(loss);
    assert_close(&g["x"], &[1.0, 0.0, 1.0, 1.0], "x");
}

#[test]
fn gradient_graphs_are_deterministic() {
    let (model, _) = tiny_model();
    let print = |g: &Graph| dlc::ir::print::print(g);
    let a = print(&with_gradients(&model).unwrap());
    let b = print(&with_gradients(&model).unwrap());
    assert_eq!(a, b);
    let adam = Optimizer::Adam {
        lr: 0.001,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    let a = print(&training_step(&model, &adam, Some(Regularizer::L2(0.1))).unwrap());
    let b = print(&training_step(&model, &adam, Some(Regularizer::L2(0.1))).unwrap());
    assert_eq!(a, b);
}

#[test]
fn repeated_training_steps_fit_a_linear_target() {
    // t is an exact linear function of x, so the loss can go to ~0; each
    // step's Update outputs are fed back as the next step's params/state.
    let (model, mut feeds) = tiny_model();
    let (x, w_true) = (floats(&feeds["x"]), [0.5, -1.0, 2.0, 0.0, -0.5, 1.5]);
    let t: Vec<f64> = (0..8)
        .map(|i| {
            let (n, j) = (i / 2, i % 2);
            (0..3)
                .map(|k| x[n * 3 + k] * w_true[k * 2 + j])
                .sum::<f64>()
                + 0.25
        })
        .collect();
    feeds.insert("t".into(), Array::f(vec![4, 2], t));
    for opt in [
        Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.9,
        },
        Optimizer::Adam {
            lr: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
    ] {
        let g = training_step(&model, &opt, None).unwrap();
        let mut feeds = feeds.clone();
        for (name, v) in g.states() {
            feeds.insert(
                name,
                Array::f(g.ty(v).shape.clone(), vec![0.0; numel(&g.ty(v).shape)]),
            );
        }
        let mut losses = Vec::new();
        for _ in 0..300 {
            let out = run(&g, &feeds, Precision::F64).unwrap();
            losses.push(floats(&out["loss"])[0]);
            for o in g.outputs.iter().filter(|o| o.kind == OutputKind::Update) {
                feeds.insert(o.name.clone(), out[&o.name].clone());
            }
        }
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        assert!(last < 1e-2 * first, "{opt:?}: loss {first} -> {last}");
    }
}

#[test]
fn reports_a_multi_result_op_reached_through_any_port() {
    // Differentiating through dw_x (port 1) of lstm_seq_grad must not
    // silently drop the gradient because port 0 is unused.
    let mut c = Check::new(22);
    let x = c.param("x", &[1, 2, 3]);
    let wx = c.param("wx", &[3, 8]);
    let wh = c.param("wh", &[2, 8]);
    let b = c.param("b", &[8]);
    let dh = c.param("dh", &[1, 2, 2]);
    let grads =
        c.g.add_multi(Op::LstmSeqGrad, &[x, wx, wh, b, dh], None)
            .unwrap();
    let loss = c.weighted_sum(grads[1]);
    let err = gradients(&mut c.g, loss, &[dh]).unwrap_err();
    assert!(
        matches!(
            err,
            AutodiffError::NoGradientRule {
                op: "lstm_seq_grad",
                ..
            }
        ),
        "{err}"
    );
}
