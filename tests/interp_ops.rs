//! The reference interpreter, op by op: small cases worked out by hand, the
//! gradient ops against central finite differences of their forward ops (in
//! F64 mode), golden cases from the independent reference, and the run-time
//! errors.

#[rustfmt::skip]
#[path = "interp_ops/golden_data.rs"]
mod golden_data;

use dlc::init::SplitMix64;
use dlc::interp::{eval_op, run, run_f32, Array, ArrayData, InterpError, Precision};
use dlc::ir::{
    BinaryOp, Conv2d, Graph, Init, Op, OutputKind, Pool2d, ReduceOp, TensorType, UnaryOp, Value,
};
use dlc::tensor::{DType, Tensor};
use std::collections::BTreeMap;

// ------------------------------------------------------------ helpers ----

fn fa(shape: &[usize], data: &[f64]) -> Array {
    Array::f(shape.to_vec(), data.to_vec())
}

fn ia(shape: &[usize], data: &[i32]) -> Array {
    Array::i(shape.to_vec(), data.to_vec())
}

/// Deterministic values in [-1, 1).
fn rand_array(shape: &[usize], seed: u64) -> Array {
    let mut r = SplitMix64::new(seed);
    let n = shape.iter().product();
    Array::f(
        shape.to_vec(),
        (0..n).map(|_| 2.0 * r.uniform() - 1.0).collect(),
    )
}

fn eval(op: Op, ins: &[&Array]) -> Vec<Array> {
    eval_op(&op, ins, Precision::F64).unwrap_or_else(|e| panic!("{op}: {e}"))
}

fn eval1(op: Op, ins: &[&Array]) -> Array {
    eval(op, ins).remove(0)
}

fn data(a: &Array) -> &[f64] {
    a.as_f().expect("a float array")
}

#[track_caller]
fn assert_close(got: &Array, shape: &[usize], want: &[f64], tol: f64) {
    assert_eq!(got.shape, shape, "shape");
    let g = data(got);
    assert_eq!(g.len(), want.len(), "length");
    for (i, (a, b)) in g.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "element {i}: got {a}, want {b}\n got {g:?}"
        );
    }
}

/// Central differences of `L(ins) = Σ op(ins)[0] · weights` with respect to
/// operand `wrt`, in F64.
fn numeric_grad(op: &Op, ins: &[Array], wrt: usize, weights: &Array) -> Vec<f64> {
    let loss = |ins: &[Array]| {
        let refs: Vec<&Array> = ins.iter().collect();
        let y = eval_op(op, &refs, Precision::F64).expect("forward op");
        data(&y[0])
            .iter()
            .zip(data(weights))
            .map(|(a, b)| a * b)
            .sum::<f64>()
    };
    let h = 1e-6;
    let n = data(&ins[wrt]).len();
    (0..n)
        .map(|e| {
            let mut plus = ins.to_vec();
            let mut minus = ins.to_vec();
            if let ArrayData::F(v) = &mut plus[wrt].data {
                v[e] += h;
            }
            if let ArrayData::F(v) = &mut minus[wrt].data {
                v[e] -= h;
            }
            (loss(&plus) - loss(&minus)) / (2.0 * h)
        })
        .collect()
}

#[track_caller]
fn assert_matches_fd(analytic: &Array, op: &Op, ins: &[Array], wrt: usize, weights: &Array) {
    let numeric = numeric_grad(op, ins, wrt, weights);
    assert_eq!(analytic.shape, ins[wrt].shape);
    // A sanity check that the test is not vacuous.
    assert!(
        numeric.iter().any(|v| v.abs() > 1e-3),
        "{op}: the gradient w.r.t. operand {wrt} is all zero"
    );
    assert_close(analytic, &ins[wrt].shape, &numeric, 1e-6);
}

// ---------------------------------------------------------- elementwise ----

#[test]
fn unary_ops_by_hand() {
    let x = fa(&[5], &[-2.0, -0.5, 0.0, 1.0, 4.0]);
    let u = |op| eval1(Op::Unary(op), &[&x]);
    assert_close(&u(UnaryOp::Relu), &[5], &[0.0, 0.0, 0.0, 1.0, 4.0], 0.0);
    assert_close(&u(UnaryOp::Abs), &[5], &[2.0, 0.5, 0.0, 1.0, 4.0], 0.0);
    assert_close(&u(UnaryOp::Neg), &[5], &[2.0, 0.5, -0.0, -1.0, -4.0], 0.0);
    // relu'(0) = 0, abs'(0) = 0
    assert_close(&u(UnaryOp::Step), &[5], &[0.0, 0.0, 0.0, 1.0, 1.0], 0.0);
    assert_close(&u(UnaryOp::Sign), &[5], &[-1.0, -1.0, 0.0, 1.0, 1.0], 0.0);
    let y = fa(&[3], &[0.0, 1.0, 4.0]);
    let e = std::f64::consts::E;
    // sigmoid(1) = 1/(1 + e^-1) = 0.7310585786300049
    assert_close(
        &eval1(Op::Unary(UnaryOp::Sigmoid), &[&y]),
        &[3],
        &[0.5, 0.7310585786300049, 0.9820137900379085],
        1e-15,
    );
    assert_close(
        &eval1(Op::Unary(UnaryOp::Tanh), &[&y]),
        &[3],
        &[0.0, 0.7615941559557649, 0.999329299739067],
        1e-15,
    );
    assert_close(
        &eval1(Op::Unary(UnaryOp::Exp), &[&y]),
        &[3],
        &[1.0, e, 54.598150033144236],
        1e-15,
    );
    assert_close(
        &eval1(Op::Unary(UnaryOp::Sqrt), &[&y]),
        &[3],
        &[0.0, 1.0, 2.0],
        0.0,
    );
    assert_close(
        &eval1(Op::Unary(UnaryOp::Log), &[&fa(&[2], &[1.0, e])]),
        &[2],
        &[0.0, 1.0],
        1e-15,
    );
}

#[test]
fn binary_ops_broadcast() {
    // [[1], [2]] + [10, 20, 30] = [[11, 21, 31], [12, 22, 32]]
    let a = fa(&[2, 1], &[1.0, 2.0]);
    let b = fa(&[3], &[10.0, 20.0, 30.0]);
    let add = eval1(Op::Binary(BinaryOp::Add), &[&a, &b]);
    assert_close(&add, &[2, 3], &[11.0, 21.0, 31.0, 12.0, 22.0, 32.0], 0.0);
    let sub = eval1(Op::Binary(BinaryOp::Sub), &[&b, &a]);
    assert_close(&sub, &[2, 3], &[9.0, 19.0, 29.0, 8.0, 18.0, 28.0], 0.0);
    let div = eval1(Op::Binary(BinaryOp::Div), &[&a, &fa(&[], &[4.0])]);
    assert_close(&div, &[2, 1], &[0.25, 0.5], 0.0);

    let x = fa(&[4], &[1.0, 2.0, 3.0, 2.0]);
    let y = fa(&[4], &[2.0, 2.0, 1.0, 5.0]);
    let bin = |op| eval1(Op::Binary(op), &[&x, &y]);
    assert_close(&bin(BinaryOp::Mul), &[4], &[2.0, 4.0, 3.0, 10.0], 0.0);
    assert_close(&bin(BinaryOp::Maximum), &[4], &[2.0, 2.0, 3.0, 5.0], 0.0);
    assert_close(&bin(BinaryOp::Minimum), &[4], &[1.0, 2.0, 1.0, 2.0], 0.0);
    assert_close(&bin(BinaryOp::Greater), &[4], &[0.0, 0.0, 1.0, 0.0], 0.0);
    assert_close(&bin(BinaryOp::Equal), &[4], &[0.0, 1.0, 0.0, 0.0], 0.0);
}

#[test]
fn nan_propagates_without_panicking() {
    let x = fa(&[3], &[f64::NAN, 1.0, -1.0]);
    for u in [
        UnaryOp::Relu,
        UnaryOp::Step,
        UnaryOp::Sign,
        UnaryOp::Sigmoid,
    ] {
        assert!(data(&eval1(Op::Unary(u), &[&x]))[0].is_nan(), "{u:?}");
    }
    let m = eval1(Op::Binary(BinaryOp::Maximum), &[&x, &fa(&[], &[0.0])]);
    assert!(data(&m)[0].is_nan());
    let r = eval1(
        Op::Reduce {
            op: ReduceOp::Max,
            axes: vec![0],
            keepdims: false,
        },
        &[&x],
    );
    assert!(data(&r)[0].is_nan());
    let s = eval1(Op::Softmax { axis: 0 }, &[&x]);
    assert!(data(&s).iter().all(|v| v.is_nan()));
    let p = eval1(
        Op::MaxPool(Pool2d {
            window: 2,
            stride: 2,
            pad: 0,
        }),
        &[&fa(&[1, 1, 2, 2], &[1.0, f64::NAN, 3.0, 2.0])],
    );
    assert!(data(&p)[0].is_nan());
}

// ----------------------------------------------------------- reductions ----

#[test]
fn reductions_by_hand() {
    // [[1, 2, 3], [4, 5, 6]]
    let x = fa(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let red = |op, axes: &[usize], keepdims| {
        eval1(
            Op::Reduce {
                op,
                axes: axes.to_vec(),
                keepdims,
            },
            &[&x],
        )
    };
    assert_close(
        &red(ReduceOp::Sum, &[0], false),
        &[3],
        &[5.0, 7.0, 9.0],
        0.0,
    );
    assert_close(&red(ReduceOp::Sum, &[1], true), &[2, 1], &[6.0, 15.0], 0.0);
    assert_close(&red(ReduceOp::Mean, &[1], true), &[2, 1], &[2.0, 5.0], 0.0);
    assert_close(&red(ReduceOp::Mean, &[0, 1], false), &[], &[3.5], 0.0);
    assert_close(&red(ReduceOp::Max, &[0, 1], true), &[1, 1], &[6.0], 0.0);
    assert_close(
        &red(ReduceOp::Max, &[0], false),
        &[3],
        &[4.0, 5.0, 6.0],
        0.0,
    );
    // A middle axis of a rank-3 tensor: [2, 2, 2] summed over axis 1.
    let y = fa(&[2, 2, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    let s = eval1(
        Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![1],
            keepdims: false,
        },
        &[&y],
    );
    assert_close(&s, &[2, 2], &[4.0, 6.0, 12.0, 14.0], 0.0);
}

#[test]
fn softmax_and_log_softmax() {
    // e^(x−3) / Σ e^(x−3) for x = 1, 2, 3
    let want = [0.09003057317038046, 0.24472847105479764, 0.6652409557748218];
    let x = fa(&[1, 3], &[1.0, 2.0, 3.0]);
    assert_close(
        &eval1(Op::Softmax { axis: 1 }, &[&x]),
        &[1, 3],
        &want,
        1e-15,
    );
    let logs: Vec<f64> = want.iter().map(|p| p.ln()).collect();
    assert_close(
        &eval1(Op::LogSoftmax { axis: 1 }, &[&x]),
        &[1, 3],
        &logs,
        1e-14,
    );
    // Along axis 0 of a column: the same numbers.
    let col = fa(&[3, 1], &[1.0, 2.0, 3.0]);
    assert_close(
        &eval1(Op::Softmax { axis: 0 }, &[&col]),
        &[3, 1],
        &want,
        1e-15,
    );
    // Large magnitudes stay finite: softmax([1000, 1000]) = [1/2, 1/2].
    let big = fa(&[2], &[1000.0, 1000.0]);
    assert_close(
        &eval1(Op::Softmax { axis: 0 }, &[&big]),
        &[2],
        &[0.5, 0.5],
        0.0,
    );
    let ln_half = -std::f64::consts::LN_2;
    assert_close(
        &eval1(Op::LogSoftmax { axis: 0 }, &[&big]),
        &[2],
        &[ln_half, ln_half],
        1e-15,
    );
}

// --------------------------------------------------------------- matmul ----

#[test]
fn matmul_by_hand_and_with_batch_broadcast() {
    // [[1, 2, 3], [4, 5, 6]] @ [[1, 0], [0, 1], [1, 1]] = [[4, 5], [10, 11]]
    let a = fa(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b = fa(&[3, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    assert_close(
        &eval1(Op::MatMul, &[&a, &b]),
        &[2, 2],
        &[4.0, 5.0, 10.0, 11.0],
        0.0,
    );
    // batch [2, 1] x [3]: each of two 1x2 rows times three 2x1 columns.
    let x = fa(&[2, 1, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
    let y = fa(&[3, 2, 1], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    // rows (1,2), (3,4); columns (1,0), (0,1), (1,1)
    let out = eval1(Op::MatMul, &[&x, &y]);
    assert_close(&out, &[2, 3, 1, 1], &[1.0, 2.0, 3.0, 3.0, 4.0, 7.0], 0.0);
}

// --------------------------------------------------------------- layout ----

#[test]
fn layout_ops() {
    let x = fa(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let t = eval1(Op::Transpose { perm: vec![1, 0] }, &[&x]);
    assert_close(&t, &[3, 2], &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0], 0.0);
    let r = eval1(Op::Reshape { shape: vec![3, 2] }, &[&x]);
    assert_close(&r, &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 0.0);
    let e = eval1(
        Op::Expand {
            shape: vec![2, 2, 3],
        },
        &[&fa(&[2, 1, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])],
    );
    assert_close(
        &e,
        &[2, 2, 3],
        &[1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 4.0, 5.0, 6.0],
        0.0,
    );
    let c = eval1(Op::Concat { axis: 1 }, &[&x, &fa(&[2, 1], &[7.0, 8.0])]);
    assert_close(&c, &[2, 4], &[1.0, 2.0, 3.0, 7.0, 4.0, 5.0, 6.0, 8.0], 0.0);
    let s = eval1(
        Op::Slice {
            axis: 1,
            start: 1,
            end: 3,
        },
        &[&x],
    );
    assert_close(&s, &[2, 2], &[2.0, 3.0, 5.0, 6.0], 0.0);
    let p = eval1(
        Op::PadSlice {
            axis: 1,
            start: 1,
            full: 4,
        },
        &[&fa(&[2, 2], &[1.0, 2.0, 3.0, 4.0])],
    );
    assert_close(&p, &[2, 4], &[0.0, 1.0, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0], 0.0);
    // A 3-axis permutation: out[i, j, k] = x[k, i, j] for x of shape [2, 1, 3].
    let y = fa(&[2, 1, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let t3 = eval1(
        Op::Transpose {
            perm: vec![1, 2, 0],
        },
        &[&y],
    );
    assert_close(&t3, &[1, 3, 2], &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0], 0.0);
}

#[test]
fn layout_ops_keep_integers() {
    let ids = ia(&[2, 2], &[1, 2, 3, 4]);
    let t = eval1(Op::Transpose { perm: vec![1, 0] }, &[&ids]);
    assert_eq!(t, ia(&[2, 2], &[1, 3, 2, 4]));
    let c = eval1(Op::Concat { axis: 0 }, &[&ids, &ia(&[1, 2], &[5, 6])]);
    assert_eq!(c, ia(&[3, 2], &[1, 2, 3, 4, 5, 6]));
    let s = eval1(
        Op::Slice {
            axis: 0,
            start: 1,
            end: 2,
        },
        &[&ids],
    );
    assert_eq!(s, ia(&[1, 2], &[3, 4]));
    let r = eval1(Op::Reshape { shape: vec![4] }, &[&ids]);
    assert_eq!(r, ia(&[4], &[1, 2, 3, 4]));
}

#[test]
fn pad_slice_is_the_gradient_of_slice() {
    let x = rand_array(&[3, 5, 2], 1);
    let dy = rand_array(&[3, 2, 2], 2);
    let slice = Op::Slice {
        axis: 1,
        start: 2,
        end: 4,
    };
    let grad = eval1(
        Op::PadSlice {
            axis: 1,
            start: 2,
            full: 5,
        },
        &[&dy],
    );
    assert_matches_fd(&grad, &slice, &[x], 0, &dy);
}

// ----------------------------------------------------------------- conv ----

fn conv2d(stride: usize, dilation: usize, pad: [usize; 4]) -> Conv2d {
    Conv2d {
        stride,
        dilation,
        pad,
    }
}

#[test]
fn conv_by_hand() {
    // x = [[1, 2, 3], [4, 5, 6], [7, 8, 9]], w = [[1, 0], [0, 1]]:
    // y[i, j] = x[i, j] + x[i+1, j+1]
    let x = fa(
        &[1, 1, 3, 3],
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
    );
    let w = fa(&[1, 1, 2, 2], &[1.0, 0.0, 0.0, 1.0]);
    let y = eval1(Op::Conv(conv2d(1, 1, [0; 4])), &[&x, &w]);
    assert_close(&y, &[1, 1, 2, 2], &[6.0, 8.0, 12.0, 14.0], 0.0);
    // pad 1, stride 2: windows start at rows/cols -1 and 1.
    // (0,0): w11·x[0,0] = 1; (0,1): w11·x[0,2] = 3;
    // (1,0): w11·x[2,0] = 7; (1,1): x[1,1] + x[2,2] = 14
    let y = eval1(Op::Conv(conv2d(2, 1, [1; 4])), &[&x, &w]);
    assert_close(&y, &[1, 1, 2, 2], &[1.0, 3.0, 7.0, 14.0], 0.0);
    // dilation 2: the 2x2 kernel spans 3x3, touching x[0,0] and x[2,2].
    let y = eval1(Op::Conv(conv2d(1, 2, [0; 4])), &[&x, &w]);
    assert_close(&y, &[1, 1, 1, 1], &[10.0], 0.0);
    // Asymmetric padding [top 0, left 1, bottom 0, right 0] with a 1x2
    // all-ones kernel: y[i, j] = x[i, j-1] + x[i, j].
    let ones = fa(&[1, 1, 1, 2], &[1.0, 1.0]);
    let y = eval1(Op::Conv(conv2d(1, 1, [0, 1, 0, 0])), &[&x, &ones]);
    assert_close(
        &y,
        &[1, 1, 3, 3],
        &[1.0, 3.0, 5.0, 4.0, 9.0, 11.0, 7.0, 15.0, 17.0],
        0.0,
    );
    // Two input channels add up; two output channels are separate.
    let x2 = fa(&[1, 2, 1, 1], &[2.0, 3.0]);
    let w2 = fa(&[2, 2, 1, 1], &[1.0, 10.0, -1.0, 1.0]);
    let y = eval1(Op::Conv(conv2d(1, 1, [0; 4])), &[&x2, &w2]);
    assert_close(&y, &[1, 2, 1, 1], &[32.0, 1.0], 0.0);
}

#[test]
fn conv_gradients_match_finite_differences() {
    for (c, kh, kw) in [
        (conv2d(1, 1, [0; 4]), 3, 3),
        (conv2d(2, 1, [1, 1, 1, 1]), 3, 2),
        (conv2d(1, 2, [1, 0, 2, 1]), 2, 2),
        (conv2d(2, 2, [2, 2, 2, 2]), 3, 3),
    ] {
        let x = rand_array(&[2, 3, 6, 5], 3);
        let w = rand_array(&[2, 3, kh, kw], 4);
        let fwd = Op::Conv(c);
        let y = eval1(fwd.clone(), &[&x, &w]);
        let dy = rand_array(&y.shape, 5);
        let dx = eval1(
            Op::ConvGradInput {
                conv: c,
                input_hw: [6, 5],
            },
            &[&dy, &w],
        );
        assert_matches_fd(&dx, &fwd, &[x.clone(), w.clone()], 0, &dy);
        let dw = eval1(
            Op::ConvGradFilter {
                conv: c,
                kernel_hw: [kh, kw],
            },
            &[&x, &dy],
        );
        assert_matches_fd(&dw, &fwd, &[x, w], 1, &dy);
    }
}

// ----------------------------------------------------------------- pool ----

fn pool(window: usize, stride: usize, pad: usize) -> Pool2d {
    Pool2d {
        window,
        stride,
        pad,
    }
}

#[test]
fn max_pool_by_hand() {
    // 4x4 = 0..15, 2x2 windows: the bottom-right of each window.
    let x = fa(&[1, 1, 4, 4], &(0..16).map(f64::from).collect::<Vec<_>>());
    let y = eval1(Op::MaxPool(pool(2, 2, 0)), &[&x]);
    assert_close(&y, &[1, 1, 2, 2], &[5.0, 7.0, 13.0, 15.0], 0.0);
    // All negative with padding 1: padding never wins, so no output is 0.
    // x = [[-1, -2], [-3, -4]], window 2, stride 1, pad 1 -> 3x3 output,
    // each the max of the real cells in its window.
    let neg = fa(&[1, 1, 2, 2], &[-1.0, -2.0, -3.0, -4.0]);
    let y = eval1(Op::MaxPool(pool(2, 1, 1)), &[&neg]);
    assert_close(
        &y,
        &[1, 1, 3, 3],
        &[-1.0, -1.0, -2.0, -1.0, -1.0, -2.0, -3.0, -3.0, -4.0],
        0.0,
    );
}

#[test]
fn max_pool_grad_routes_to_the_first_maximum() {
    // One 2x2 window full of ties: all of dy goes to the top-left cell.
    let x = fa(&[1, 1, 2, 2], &[7.0, 7.0, 7.0, 7.0]);
    let dy = fa(&[1, 1, 1, 1], &[3.0]);
    let dx = eval1(Op::MaxPoolGrad(pool(2, 2, 0)), &[&x, &dy]);
    assert_close(&dx, &[1, 1, 2, 2], &[3.0, 0.0, 0.0, 0.0], 0.0);
    // Overlapping windows (window 2, stride 1) on [[1, 5], [5, 2]] padded
    // by 1: the nine windows' maxima are 1, 5, 5, 5, 5, 5, 5, 5, 2; the
    // center window's tie between (0,1) and (1,0) goes to (0,1) first.
    let x = fa(&[1, 1, 2, 2], &[1.0, 5.0, 5.0, 2.0]);
    let dy = fa(
        &[1, 1, 3, 3],
        &[1.0, 10.0, 100.0, 1000.0, 10000.0, 1e5, 1e6, 1e7, 1e8],
    );
    let dx = eval1(Op::MaxPoolGrad(pool(2, 1, 1)), &[&x, &dy]);
    // (0,0) gets window 0; (0,1) gets windows 1, 2, 4, 5; (1,0) gets 3, 6, 7; (1,1) gets 8.
    assert_close(&dx, &[1, 1, 2, 2], &[1.0, 110110.0, 11001000.0, 1e8], 0.0);
}

#[test]
fn avg_pool_excludes_padding() {
    // x = [[1, 2], [3, 4]], window 2, stride 1, pad 1: a corner window holds
    // one real cell, an edge window two, the center window all four.
    let x = fa(&[1, 1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let y = eval1(Op::AvgPool(pool(2, 1, 1)), &[&x]);
    assert_close(
        &y,
        &[1, 1, 3, 3],
        &[1.0, 1.5, 2.0, 2.0, 2.5, 3.0, 3.0, 3.5, 4.0],
        0.0,
    );
    // The gradient of the center window alone: 1/4 to each cell.
    let mut dy = vec![0.0; 9];
    dy[4] = 1.0;
    let dx = eval1(
        Op::AvgPoolGrad {
            pool: pool(2, 1, 1),
            input_hw: [2, 2],
        },
        &[&fa(&[1, 1, 3, 3], &dy)],
    );
    assert_close(&dx, &[1, 1, 2, 2], &[0.25; 4], 0.0);
    // The top-left corner window alone: everything to x[0, 0].
    let mut dy = vec![0.0; 9];
    dy[0] = 1.0;
    let dx = eval1(
        Op::AvgPoolGrad {
            pool: pool(2, 1, 1),
            input_hw: [2, 2],
        },
        &[&fa(&[1, 1, 3, 3], &dy)],
    );
    assert_close(&dx, &[1, 1, 2, 2], &[1.0, 0.0, 0.0, 0.0], 0.0);
}

#[test]
fn pool_gradients_match_finite_differences() {
    for p in [pool(2, 2, 0), pool(3, 2, 1), pool(3, 1, 2), pool(2, 3, 1)] {
        let x = rand_array(&[2, 2, 7, 6], 6);
        let y = eval1(Op::MaxPool(p), &[&x]);
        let dy = rand_array(&y.shape, 7);
        let dx = eval1(Op::MaxPoolGrad(p), &[&x, &dy]);
        assert_matches_fd(&dx, &Op::MaxPool(p), std::slice::from_ref(&x), 0, &dy);
        let dx = eval1(
            Op::AvgPoolGrad {
                pool: p,
                input_hw: [7, 6],
            },
            &[&dy],
        );
        assert_matches_fd(&dx, &Op::AvgPool(p), &[x], 0, &dy);
    }
}

#[test]
fn pool_padding_must_be_smaller_than_the_window() {
    let x = fa(&[1, 1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let err = eval_op(&Op::MaxPool(pool(2, 1, 2)), &[&x], Precision::F64).unwrap_err();
    assert_eq!(
        err.to_string(),
        "max_pool2d: padding 2 must be smaller than the window 2"
    );
}

// ------------------------------------------------------------ recurrent ----

#[test]
fn lstm_two_steps_by_hand() {
    // F = H = 1; only the g gate has weights: w_x = w_h = [0, 0, 1, 0], b = 0,
    // x = [1, 0]. So i = f = o = 1/2 at both steps and
    // t=0: g = tanh(1), c1 = g/2, h1 = tanh(c1)/2 = 0.18169974219452625
    // t=1: g = tanh(h1), c2 = c1/2 + g/2, h2 = tanh(c2)/2 = 0.13657360970855884
    let x = fa(&[1, 2, 1], &[1.0, 0.0]);
    let wx = fa(&[1, 4], &[0.0, 0.0, 1.0, 0.0]);
    let wh = fa(&[1, 4], &[0.0, 0.0, 1.0, 0.0]);
    let b = fa(&[4], &[0.0; 4]);
    let h = eval1(Op::LstmSeq, &[&x, &wx, &wh, &b]);
    assert_close(
        &h,
        &[1, 2, 1],
        &[0.18169974219452625, 0.13657360970855884],
        1e-15,
    );
}

#[test]
fn gru_two_steps_by_hand() {
    // F = H = 1, w_x = [0, 0, 1], w_h = [0, 0, 2], b = [1, 0, 0], x = [1, 0].
    // t=0: z = σ(1), r = 1/2, h~ = tanh(1), h1 = z·h~ = 0.5567699411459397
    // t=1: z = σ(1), r = 1/2, h~ = tanh(2·(r·h1)), h2 = (1−z)·h1 + z·h~
    //      = 0.5193448522835833
    let x = fa(&[1, 2, 1], &[1.0, 0.0]);
    let wx = fa(&[1, 3], &[0.0, 0.0, 1.0]);
    let wh = fa(&[1, 3], &[0.0, 0.0, 2.0]);
    let b = fa(&[3], &[1.0, 0.0, 0.0]);
    let h = eval1(Op::GruSeq, &[&x, &wx, &wh, &b]);
    assert_close(
        &h,
        &[1, 2, 1],
        &[0.5567699411459397, 0.5193448522835833],
        1e-15,
    );
}

#[test]
fn recurrent_gradients_match_finite_differences() {
    for (fwd, grad, gates) in [
        (Op::LstmSeq, Op::LstmSeqGrad, 4),
        (Op::GruSeq, Op::GruSeqGrad, 3),
    ] {
        let (n, t, f, h) = (2, 4, 3, 2);
        let ins = vec![
            rand_array(&[n, t, f], 10),
            rand_array(&[f, gates * h], 11),
            rand_array(&[h, gates * h], 12),
            rand_array(&[gates * h], 13),
        ];
        let dh = rand_array(&[n, t, h], 14);
        let refs: Vec<&Array> = ins.iter().chain([&dh]).collect();
        let grads = eval(grad, &refs);
        assert_eq!(grads.len(), 4);
        for (wrt, g) in grads.iter().enumerate() {
            assert_matches_fd(g, &fwd, &ins, wrt, &dh);
        }
    }
}

// ------------------------------------------------------------ attention ----

#[test]
fn attention_by_hand() {
    // q = [1, 0], k = [[1, 0], [0, 1]], v = [[1, 2], [3, 4]], scale 1:
    // logits [1, 0], p = [e/(e+1), 1/(e+1)], y = p0·v0 + p1·v1.
    let q = fa(&[1, 2], &[1.0, 0.0]);
    let k = fa(&[2, 2], &[1.0, 0.0, 0.0, 1.0]);
    let v = fa(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let y = eval1(
        Op::Attention {
            causal: false,
            scale: 1.0,
        },
        &[&q, &k, &v],
    );
    assert_close(
        &y,
        &[1, 2],
        &[1.5378828427399902, 2.5378828427399904],
        1e-15,
    );
    // Causal with two queries: the first sees only key 0, so y0 = v0.
    let q2 = fa(&[2, 2], &[1.0, 0.0, 1.0, 0.0]);
    let y = eval1(
        Op::Attention {
            causal: true,
            scale: 1.0,
        },
        &[&q2, &k, &v],
    );
    assert_close(
        &y,
        &[2, 2],
        &[1.0, 2.0, 1.5378828427399902, 2.5378828427399904],
        1e-15,
    );
}

#[test]
fn attention_gradients_match_finite_differences() {
    for (causal, qs, ks, vs) in [
        (false, vec![3, 4], vec![5, 4], vec![5, 2]),
        (true, vec![2, 4, 3], vec![2, 4, 3], vec![2, 4, 2]),
        (false, vec![2, 1, 3, 2], vec![2, 1, 4, 2], vec![2, 1, 4, 3]),
    ] {
        let ins = vec![
            rand_array(&qs, 20),
            rand_array(&ks, 21),
            rand_array(&vs, 22),
        ];
        let fwd = Op::Attention { causal, scale: 0.7 };
        let y = eval1(fwd.clone(), &[&ins[0], &ins[1], &ins[2]]);
        let dy = rand_array(&y.shape, 23);
        let grads = eval(
            Op::AttentionGrad { causal, scale: 0.7 },
            &[&ins[0], &ins[1], &ins[2], &dy],
        );
        for (wrt, g) in grads.iter().enumerate() {
            assert_matches_fd(g, &fwd, &ins, wrt, &dy);
        }
    }
}

// --------------------------------------------------- embeddings, losses ----

#[test]
fn gather_and_scatter_add() {
    let table = fa(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let ids = ia(&[2, 2], &[2, 0, 2, 1]);
    let y = eval1(Op::Gather, &[&table, &ids]);
    assert_close(
        &y,
        &[2, 2, 2],
        &[5.0, 6.0, 1.0, 2.0, 5.0, 6.0, 3.0, 4.0],
        0.0,
    );
    // Repeated id 2 adds up: row 2 = (1, 1) + (100, 100).
    let dy = fa(
        &[2, 2, 2],
        &[1.0, 1.0, 10.0, 10.0, 100.0, 100.0, 1000.0, 1000.0],
    );
    let dt = eval1(Op::ScatterAdd { rows: 3 }, &[&ids, &dy]);
    assert_close(
        &dt,
        &[3, 2],
        &[10.0, 10.0, 1000.0, 1000.0, 101.0, 101.0],
        0.0,
    );
    let dy = rand_array(&[2, 2, 2], 30);
    let dt = eval1(Op::ScatterAdd { rows: 3 }, &[&ids, &dy]);
    assert_matches_fd(&dt, &Op::Gather, &[table, ids], 0, &dy);
}

#[test]
fn gather_rejects_out_of_range_ids() {
    let table = fa(&[9, 1], &[0.0; 9]);
    let ids = ia(&[2, 2], &[0, 1, 12, 3]);
    let err = eval_op(&Op::Gather, &[&table, &ids], Precision::F32).unwrap_err();
    assert_eq!(
        err.to_string(),
        "gather: id 12 at index [1, 0] is outside [0, 9)"
    );
    let neg = ia(&[1], &[-1]);
    let err = eval_op(
        &Op::ScatterAdd { rows: 4 },
        &[&neg, &fa(&[1, 2], &[0.0, 0.0])],
        Precision::F32,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "scatter_add: id -1 at index [0] is outside [0, 4)"
    );
}

#[test]
fn cross_entropy_by_hand() {
    // Row 0: logits [0, 0], label 1 -> ln 2. Row 1: [ln 3, 0], label 0 ->
    // ln(3 + 1) − ln 3 = ln(4/3). Mean: (ln 2 + ln(4/3)) / 2.
    let logits = fa(&[2, 2], &[0.0, 0.0, 3f64.ln(), 0.0]);
    let labels = ia(&[2], &[1, 0]);
    let l = eval1(Op::CrossEntropy, &[&logits, &labels]);
    let want = (2f64.ln() + (4.0f64 / 3.0).ln()) / 2.0;
    assert_close(&l, &[], &[want], 1e-15);
    // dloss·(softmax − onehot)/N with dloss = 2, N = 2:
    // row 0: [1/2, 1/2 − 1], row 1: [3/4 − 1, 1/4].
    let g = eval1(Op::CrossEntropyGrad, &[&logits, &labels, &fa(&[], &[2.0])]);
    assert_close(&g, &[2, 2], &[0.5, -0.5, -0.25, 0.25], 1e-15);
}

#[test]
fn hinge_by_hand_with_derivative_zero_at_the_kink() {
    // Row 0: s = [1, 2, 3], y = 0: max(0, 1+2−1) + max(0, 1+3−1) = 5.
    // Row 1: s = [1, 0, -5], y = 0: margins 0 (the kink) and −5: 0.
    let s = fa(&[2, 3], &[1.0, 2.0, 3.0, 1.0, 0.0, -5.0]);
    let y = ia(&[2], &[0, 0]);
    assert_close(&eval1(Op::Hinge, &[&s, &y]), &[], &[2.5], 0.0);
    // dloss = 1, N = 2: row 0 gets +1/2 on classes 1, 2 and −1 on the label;
    // row 1 is all zero (the kink contributes nothing).
    let g = eval1(Op::HingeGrad, &[&s, &y, &fa(&[], &[1.0])]);
    assert_close(&g, &[2, 3], &[-1.0, 0.5, 0.5, 0.0, 0.0, 0.0], 0.0);
}

#[test]
fn loss_gradients_match_finite_differences() {
    let scores = rand_array(&[4, 5], 40);
    let labels = ia(&[4], &[0, 3, 4, 1]);
    let dloss = fa(&[], &[0.7]);
    let g = eval1(Op::CrossEntropyGrad, &[&scores, &labels, &dloss]);
    assert_matches_fd(
        &g,
        &Op::CrossEntropy,
        &[scores.clone(), labels.clone()],
        0,
        &dloss,
    );
    // Uniform draws in [-1, 1) put no margin within 1e-6 of the kink.
    let g = eval1(Op::HingeGrad, &[&scores, &labels, &dloss]);
    assert_matches_fd(&g, &Op::Hinge, &[scores, labels], 0, &dloss);
}

#[test]
fn labels_outside_the_classes_are_errors() {
    let logits = fa(&[4, 5], &[0.0; 20]);
    let labels = ia(&[4], &[0, 1, 2, 7]);
    for (op, name) in [(Op::CrossEntropy, "cross_entropy"), (Op::Hinge, "hinge")] {
        let err = eval_op(&op, &[&logits, &labels], Precision::F32).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{name}: label 7 at index 3 is outside [0, 5)")
        );
    }
    let neg = ia(&[4], &[0, -2, 0, 0]);
    let err = eval_op(
        &Op::CrossEntropyGrad,
        &[&logits, &neg, &fa(&[], &[1.0])],
        Precision::F32,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cross_entropy_grad: label -2 at index 1 is outside [0, 5)"
    );
}

// ------------------------------------------------------- eval_op errors ----

#[test]
fn malformed_operands_are_errors_not_panics() {
    let x = fa(&[2, 3], &[0.0; 6]);
    // Wrong arity.
    let err = eval_op(&Op::MatMul, &[&x], Precision::F32).unwrap_err();
    assert!(matches!(err, InterpError::Shape(_)), "{err}");
    // Shapes that do not fit the op.
    let err = eval_op(&Op::MatMul, &[&x, &x], Precision::F32).unwrap_err();
    assert!(err.to_string().contains("inner dimensions differ"), "{err}");
    // Data that does not fill the shape.
    let bad = Array::f(vec![2, 3], vec![0.0; 5]);
    let err = eval_op(&Op::Unary(UnaryOp::Relu), &[&bad], Precision::F32).unwrap_err();
    assert_eq!(
        err.to_string(),
        "relu: operand 0 holds 5 values but its shape [2, 3] needs 6"
    );
    // Integer operand to a float op.
    let err = eval_op(&Op::Unary(UnaryOp::Exp), &[&ia(&[1], &[1])], Precision::F32).unwrap_err();
    assert!(matches!(err, InterpError::Shape(_)), "{err}");
    // A slice written past the end of its axis.
    let err = eval_op(
        &Op::PadSlice {
            axis: 1,
            start: 2,
            full: 4,
        },
        &[&x],
        Precision::F32,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "pad_slice: a slice of size 3 at start 2 does not fit axis 1 of size 4"
    );
    // Leaves are fed, not evaluated.
    let err = eval_op(&Op::Input { name: "x".into() }, &[], Precision::F32).unwrap_err();
    assert!(matches!(err, InterpError::Leaf { .. }));
}

// ------------------------------------------------------------------ run ----

/// `y = relu(x @ w + b)`, `loss = cross_entropy(y, label)`.
fn mlp_graph() -> Graph {
    let mut g = Graph::new();
    let x = g.add_leaf(
        Op::Input { name: "x".into() },
        TensorType::f32(vec![2, 2]),
        None,
    );
    let label = g.add_leaf(
        Op::Input {
            name: "label".into(),
        },
        TensorType::new(DType::I32, vec![2]),
        None,
    );
    let w = g.add_leaf(
        Op::Param {
            name: "w".into(),
            init: Init::Zeros,
        },
        TensorType::f32(vec![2, 2]),
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
    let z = g.add(Op::Binary(BinaryOp::Add), &[xw, b], None).unwrap();
    let y = g.add(Op::Unary(UnaryOp::Relu), &[z], None).unwrap();
    let l = g.add(Op::CrossEntropy, &[y, label], None).unwrap();
    g.push_output("y", OutputKind::Output, y);
    g.push_output("loss", OutputKind::Loss, l);
    g
}

fn mlp_feeds() -> BTreeMap<String, Tensor> {
    let mut f = BTreeMap::new();
    f.insert(
        "x".to_string(),
        Tensor::f32(vec![2, 2], vec![1.0, 2.0, -1.0, 0.5]),
    );
    f.insert("label".to_string(), Tensor::i32(vec![2], vec![0, 1]));
    f.insert(
        "w".to_string(),
        Tensor::f32(vec![2, 2], vec![1.0, -1.0, 0.0, 2.0]),
    );
    f.insert("b".to_string(), Tensor::f32(vec![2], vec![0.5, 0.0]));
    f
}

#[test]
fn run_evaluates_a_graph_by_name() {
    // x @ w = [[1, 3], [-1, 2]]; + b = [[1.5, 3], [-0.5, 2]]; relu = [[1.5, 3], [0, 2]].
    // loss = mean(lse(1.5, 3) − 1.5, lse(0, 2) − 2) = (softplus(1.5) + softplus(−2))/2.
    let out = run_f32(&mlp_graph(), &mlp_feeds()).unwrap();
    assert_eq!(out["y"], Tensor::f32(vec![2, 2], vec![1.5, 3.0, 0.0, 2.0]));
    let softplus = |v: f64| (1.0 + v.exp()).ln();
    let want = ((softplus(1.5) + softplus(-2.0)) / 2.0) as f32;
    let got = out["loss"].as_f32().unwrap()[0];
    assert!((got - want).abs() <= 1e-7, "{got} vs {want}");
    assert_eq!(out.len(), 2);
}

#[test]
fn run_reports_bad_feeds() {
    let g = mlp_graph();
    let mut f = mlp_feeds();
    f.remove("b");
    assert_eq!(
        run_f32(&g, &f).unwrap_err().to_string(),
        "missing value for param 'b'"
    );
    let mut f = mlp_feeds();
    f.insert("x".into(), Tensor::f32(vec![2, 3], vec![0.0; 6]));
    assert_eq!(
        run_f32(&g, &f).unwrap_err().to_string(),
        "input 'x' has shape [2, 3] but the model expects [2, 2]"
    );
    let mut f = mlp_feeds();
    f.insert("label".into(), Tensor::f32(vec![2], vec![0.0, 1.0]));
    assert_eq!(
        run_f32(&g, &f).unwrap_err().to_string(),
        "input 'label' is f32 but the model expects i32"
    );
    let mut f = mlp_feeds();
    f.insert("label".into(), Tensor::i32(vec![2], vec![0, 2]));
    assert_eq!(
        run_f32(&g, &f).unwrap_err().to_string(),
        "cross_entropy: label 2 at index 1 is outside [0, 2)"
    );
    let mut f = mlp_feeds();
    f.insert(
        "w".into(),
        Tensor {
            shape: vec![2, 2],
            data: dlc::tensor::Data::F32(vec![1.0]),
        },
    );
    assert_eq!(
        run_f32(&g, &f).unwrap_err().to_string(),
        "param 'w' holds 1 values but its shape [2, 2] needs 4"
    );
}

#[test]
fn state_leaves_are_fed_by_name() {
    let mut g = Graph::new();
    let m = g.add_leaf(
        Op::State { name: "w.m".into() },
        TensorType::f32(vec![2]),
        None,
    );
    let y = g.add(Op::Unary(UnaryOp::Neg), &[m], None).unwrap();
    g.push_output("y", OutputKind::Update, y);
    let err = run_f32(&g, &BTreeMap::new()).unwrap_err();
    assert_eq!(err.to_string(), "missing value for state 'w.m'");
    let mut f = BTreeMap::new();
    f.insert("w.m".to_string(), Tensor::f32(vec![2], vec![1.5, -2.0]));
    assert_eq!(
        run_f32(&g, &f).unwrap()["y"],
        Tensor::f32(vec![2], vec![-1.5, 2.0])
    );
}

#[test]
fn f32_mode_rounds_after_every_op_and_f64_mode_does_not() {
    // 1/3 then ·3: in f64, (1/3)·3 = 1 exactly; in f32 the quotient rounds
    // to 0.3333333432674408 first, and ·3 gives 1.0000000298023224, which
    // rounds to f32 1.0. The quotient itself shows the rounding.
    let mut g = Graph::new();
    let one = g
        .add(
            Op::Fill {
                value: 1.0,
                shape: vec![],
            },
            &[],
            None,
        )
        .unwrap();
    let three = g
        .add(
            Op::Fill {
                value: 3.0,
                shape: vec![],
            },
            &[],
            None,
        )
        .unwrap();
    let q = g
        .add(Op::Binary(BinaryOp::Div), &[one, three], None)
        .unwrap();
    g.push_output("q", OutputKind::Output, q);
    let f32_out = run(&g, &BTreeMap::new(), Precision::F32).unwrap();
    let f64_out = run(&g, &BTreeMap::new(), Precision::F64).unwrap();
    assert_eq!(data(&f32_out["q"]), &[f64::from(1.0f32 / 3.0)]);
    assert_eq!(data(&f64_out["q"]), &[1.0 / 3.0]);
}

#[test]
fn run_checks_the_declared_types() {
    // A node whose declared type disagrees with what the op computes is a
    // malformed graph, reported rather than silently passed on.
    let mut g = Graph::new();
    let x = g.add_leaf(
        Op::Input { name: "x".into() },
        TensorType::f32(vec![2]),
        None,
    );
    let y = g.add_node_unchecked(
        Op::Unary(UnaryOp::Neg),
        vec![TensorType::f32(vec![3])],
        &[x],
        None,
    )[0];
    g.push_output("y", OutputKind::Output, y);
    let mut f = BTreeMap::new();
    f.insert("x".to_string(), Array::f(vec![2], vec![1.0, 2.0]));
    let err = run(&g, &f, Precision::F32).unwrap_err();
    assert!(matches!(err, InterpError::Graph(_)), "{err}");
}

// --------------------------------------------------------------- golden ----

/// A graph builder over one golden case's tensors.
struct Golden {
    case: &'static golden_data::GoldenCase,
    g: Graph,
    feeds: BTreeMap<String, Tensor>,
}

impl Golden {
    fn new(name: &str) -> Golden {
        let case = golden_data::CASES
            .iter()
            .find(|c| c.name == name)
            .expect("a golden case");
        Golden {
            case,
            g: Graph::new(),
            feeds: BTreeMap::new(),
        }
    }

    fn tensor(&self, key: &str) -> Tensor {
        let t = self
            .case
            .tensors
            .iter()
            .find(|t| t.name == key)
            .unwrap_or_else(|| panic!("no {key}"));
        if t.i.is_empty() && !t.f.is_empty() {
            Tensor::f32(t.shape.to_vec(), t.f.to_vec())
        } else {
            Tensor::i32(t.shape.to_vec(), t.i.to_vec())
        }
    }

    /// The leaf for `inputs.NAME` or `params.NAME`, fed from the case.
    fn leaf(&mut self, key: &str) -> Value {
        let t = self.tensor(key);
        let (kind, name) = key.split_once('.').unwrap();
        let op = if kind == "params" {
            Op::Param {
                name: name.into(),
                init: Init::Zeros,
            }
        } else {
            Op::Input { name: name.into() }
        };
        self.feeds.insert(name.to_string(), t.clone());
        self.g
            .add_leaf(op, TensorType::new(t.dtype(), t.shape.clone()), None)
    }

    fn op(&mut self, op: Op, ins: &[Value]) -> Vec<Value> {
        self.g.add_multi(op, ins, None).unwrap()
    }

    /// `sum(y * dy)` over all axes.
    fn dot_loss(&mut self, y: Value, dy: Value) -> Value {
        let rank = self.g.ty(y).shape.len();
        let p = self.op(Op::Binary(BinaryOp::Mul), &[y, dy])[0];
        self.op(
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: (0..rank).collect(),
                keepdims: false,
            },
            &[p],
        )[0]
    }

    fn out(&mut self, name: &str, v: Value) {
        self.g.push_output(name, OutputKind::Output, v);
    }

    /// Every `expected.*` tensor matches within the golden tolerances
    /// (CLI.md: outputs rtol 1e-4, atol 1e-5; `grad.*` rtol 1e-3, atol 1e-4).
    fn check(self) {
        let out =
            run_f32(&self.g, &self.feeds).unwrap_or_else(|e| panic!("{}: {e}", self.case.name));
        let mut checked = 0;
        for t in self
            .case
            .tensors
            .iter()
            .filter(|t| t.name.starts_with("expected."))
        {
            let name = &t.name["expected.".len()..];
            let got = out
                .get(name)
                .unwrap_or_else(|| panic!("{}: no output {name}", self.case.name));
            assert_eq!(got.shape, t.shape, "{}: {name}", self.case.name);
            let (rtol, atol) = if name.starts_with("grad.") {
                (1e-3, 1e-4)
            } else {
                (1e-4, 1e-5)
            };
            for (i, (a, e)) in got.as_f32().unwrap().iter().zip(t.f).enumerate() {
                assert!(
                    (a - e).abs() <= atol + rtol * e.abs(),
                    "{}: {name}[{i}] = {a}, expected {e}",
                    self.case.name
                );
            }
            checked += 1;
        }
        assert!(checked >= 2, "{}: nothing checked", self.case.name);
    }
}

#[test]
fn golden_recurrent() {
    for (case, fwd, grad) in [
        ("rnn/lstm_t6", Op::LstmSeq, Op::LstmSeqGrad),
        ("rnn/gru_t6", Op::GruSeq, Op::GruSeqGrad),
    ] {
        let mut c = Golden::new(case);
        let ins = ["inputs.x", "params.w_x", "params.w_h", "params.b"].map(|k| c.leaf(k));
        let dy = c.leaf("inputs.dy");
        let y = c.op(fwd, &ins)[0];
        let grads = c.op(grad, &[ins[0], ins[1], ins[2], ins[3], dy]);
        let loss = c.dot_loss(y, dy);
        c.out("y", y);
        c.out("loss", loss);
        c.out("grad.w_x", grads[1]);
        c.out("grad.w_h", grads[2]);
        c.out("grad.b", grads[3]);
        c.check();
    }
}

#[test]
fn golden_conv() {
    for (case, conv) in [
        ("conv/dilation2_pad2", conv2d(1, 2, [2; 4])),
        ("conv/stride2_pad1", conv2d(2, 1, [1; 4])),
        ("conv/nonsquare", conv2d(1, 1, [1; 4])),
    ] {
        let mut c = Golden::new(case);
        let (x, w, dy) = (c.leaf("params.x"), c.leaf("params.w"), c.leaf("inputs.dy"));
        let (xs, ws) = (c.g.ty(x).shape.clone(), c.g.ty(w).shape.clone());
        let y = c.op(Op::Conv(conv), &[x, w])[0];
        let dx = c.op(
            Op::ConvGradInput {
                conv,
                input_hw: [xs[2], xs[3]],
            },
            &[dy, w],
        )[0];
        let dw = c.op(
            Op::ConvGradFilter {
                conv,
                kernel_hw: [ws[2], ws[3]],
            },
            &[x, dy],
        )[0];
        let loss = c.dot_loss(y, dy);
        c.out("y", y);
        c.out("loss", loss);
        c.out("grad.x", dx);
        c.out("grad.w", dw);
        c.check();
    }
}

#[test]
fn golden_attention() {
    for (case, causal) in [
        ("attention/causal", true),
        ("attention/cross_tq3_tk5", false),
        ("attention/batched_causal", true),
    ] {
        let mut c = Golden::new(case);
        let qkv = ["params.q", "params.k", "params.v"].map(|k| c.leaf(k));
        let dy = c.leaf("inputs.dy");
        // The default scale 1/sqrt(d), d = 4 in every case.
        let scale = 0.5;
        let y = c.op(Op::Attention { causal, scale }, &qkv)[0];
        let grads = c.op(
            Op::AttentionGrad { causal, scale },
            &[qkv[0], qkv[1], qkv[2], dy],
        );
        let loss = c.dot_loss(y, dy);
        c.out("y", y);
        c.out("loss", loss);
        c.out("grad.q", grads[0]);
        c.out("grad.k", grads[1]);
        c.out("grad.v", grads[2]);
        c.check();
    }
}

#[test]
fn golden_pool() {
    let p = pool(3, 2, 1);
    for (case, max) in [
        ("pool/max_overlap_pad_grad", true),
        ("pool/max_ties_pad_grad", true),
        ("pool/avg_pad_grad", false),
    ] {
        let mut c = Golden::new(case);
        let (x, dy) = (c.leaf("params.x"), c.leaf("inputs.dy"));
        let xs = c.g.ty(x).shape.clone();
        let (y, dx) = if max {
            (
                c.op(Op::MaxPool(p), &[x])[0],
                c.op(Op::MaxPoolGrad(p), &[x, dy])[0],
            )
        } else {
            let dx = c.op(
                Op::AvgPoolGrad {
                    pool: p,
                    input_hw: [xs[2], xs[3]],
                },
                &[dy],
            )[0];
            (c.op(Op::AvgPool(p), &[x])[0], dx)
        };
        let loss = c.dot_loss(y, dy);
        c.out("y", y);
        c.out("loss", loss);
        c.out("grad.x", dx);
        c.check();
    }
}

#[test]
fn golden_losses_and_gather() {
    let mut c = Golden::new("losses/hinge_grad");
    let (s, l) = (c.leaf("params.scores"), c.leaf("inputs.labels"));
    let h = c.op(Op::Hinge, &[s, l])[0];
    let one = c.op(
        Op::Fill {
            value: 1.0,
            shape: vec![],
        },
        &[],
    )[0];
    let g = c.op(Op::HingeGrad, &[s, l, one])[0];
    c.out("h", h);
    c.out("loss", h);
    c.out("grad.scores", g);
    c.check();

    let mut c = Golden::new("losses/cross_entropy_grad");
    let (s, l) = (c.leaf("params.logits"), c.leaf("inputs.labels"));
    let loss = c.op(Op::CrossEntropy, &[s, l])[0];
    let one = c.op(
        Op::Fill {
            value: 1.0,
            shape: vec![],
        },
        &[],
    )[0];
    let g = c.op(Op::CrossEntropyGrad, &[s, l, one])[0];
    c.out("loss", loss);
    c.out("grad.logits", g);
    c.check();

    let mut c = Golden::new("gather/repeated_ids_grad");
    let (t, ids, dy) = (
        c.leaf("params.table"),
        c.leaf("inputs.ids"),
        c.leaf("inputs.dy"),
    );
    let y = c.op(Op::Gather, &[t, ids])[0];
    let dt = c.op(Op::ScatterAdd { rows: 6 }, &[ids, dy])[0];
    let loss = c.dot_loss(y, dy);
    c.out("y", y);
    c.out("loss", loss);
    c.out("grad.table", dt);
    c.check();
}
