//! Differential tests: the JIT against the reference interpreter, for every
//! compiled op on several random shape sets (sizes not multiples of 4,
//! size-1 dims, broadcasts), and bitwise-equal outputs for 1, 2 and 3
//! threads.

use dlc::codegen::{self, JitOptions};
use dlc::interp;
use dlc::ir::{BinaryOp, Graph, Op, OutputKind, ReduceOp, TensorType, UnaryOp, Value};
use dlc::tensor::{numel, DType, Tensor};
use std::collections::BTreeMap;

mod common;
use common::check_fma_loop;

/// xorshift64*: deterministic test data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn rand_f32(rng: &mut Rng, shape: &[usize], scale: f32) -> Tensor {
    let n = numel(shape);
    Tensor::f32(shape.to_vec(), (0..n).map(|_| rng.f() * scale).collect())
}

fn rand_ids(rng: &mut Rng, shape: &[usize], below: usize) -> Tensor {
    let n = numel(shape);
    Tensor::i32(
        shape.to_vec(),
        (0..n).map(|_| rng.below(below) as i32).collect(),
    )
}

/// A graph under construction with its feeds.
struct Case {
    g: Graph,
    feeds: BTreeMap<String, Tensor>,
}

impl Case {
    fn new() -> Case {
        Case {
            g: Graph::new(),
            feeds: BTreeMap::new(),
        }
    }
    fn input(&mut self, name: &str, t: Tensor) -> Value {
        let ty = TensorType::new(t.dtype(), t.shape.clone());
        let v = self.g.add_leaf(Op::Input { name: name.into() }, ty, None);
        self.feeds.insert(name.into(), t);
        v
    }
    fn op(&mut self, op: Op, ins: &[Value]) -> Value {
        self.g
            .add(op, ins, None)
            .expect("test graphs are well-typed")
    }
    fn out(&mut self, name: &str, v: Value) {
        self.g.push_output(name, OutputKind::Output, v);
    }

    /// The mean of `v` over `axis`, kept as a size-1 axis.
    fn mean_keep(&mut self, v: Value, axis: usize) -> Value {
        self.op(
            Op::Reduce {
                op: ReduceOp::Mean,
                axes: vec![axis],
                keepdims: true,
            },
            &[v],
        )
    }

    /// The op label of every compiled kernel (2 threads), in order.
    fn labels(&self) -> Vec<&'static str> {
        let m = codegen::compile(&self.g, &JitOptions { threads: 2 }).expect("compiles");
        m.kernel_nodes().into_iter().map(|(_, op)| op).collect()
    }

    /// The bits of the f32 outputs `names` (2 threads).
    fn bits(&self, names: &[&str]) -> Vec<Vec<u32>> {
        let m = codegen::compile(&self.g, &JitOptions { threads: 2 }).expect("compiles");
        let out = m.run(&self.feeds).expect("runs");
        names
            .iter()
            .map(|k| {
                let t = out[*k].as_f32().expect("f32");
                t.iter().map(|x| x.to_bits()).collect()
            })
            .collect()
    }

    /// JIT vs interpreter within `atol + rtol·|e|`, and bitwise equality
    /// across threads.
    fn check(&self, rtol: f32) {
        self.check_tol(rtol, rtol * 1e-3)
    }

    fn check_tol(&self, rtol: f32, atol: f32) {
        let want = interp::run_f32(&self.g, &self.feeds).expect("interpreter runs");
        let mut first: Option<BTreeMap<String, Tensor>> = None;
        for threads in [1, 2, 3] {
            let m = codegen::compile(&self.g, &JitOptions { threads }).expect("compiles");
            // Scratch never read before it is written: NaN everywhere first.
            m.poison_arena(f32::NAN.to_bits());
            assert_eq!(
                m.interpreted_kernels(),
                0,
                "ops interpreted: {:?}",
                m.interpreted_ops()
            );
            let got = m.run(&self.feeds).expect("runs");
            for (name, w) in &want {
                let g = &got[name];
                assert_eq!(g.shape, w.shape, "{name}: shape");
                match (g.as_f32(), w.as_f32()) {
                    (Some(gv), Some(wv)) => {
                        if std::env::var("XERR").is_ok() {
                            let m = gv
                                .iter()
                                .zip(wv)
                                .map(|(a, e)| ((a - e) / e).abs())
                                .fold(0f32, f32::max);
                            eprintln!("XERR {name} {:?} {m:.3e}", g.shape);
                        }
                        for (i, (a, e)) in gv.iter().zip(wv).enumerate() {
                            let ok = (a - e).abs() <= atol + rtol * e.abs()
                                || (a.is_nan() && e.is_nan())
                                || a == e;
                            assert!(ok, "{name}[{i}]: jit {a} vs interp {e}");
                        }
                    }
                    _ => assert_eq!(g, w, "{name}"),
                }
            }
            match &first {
                None => first = Some(got),
                Some(f) => {
                    for (name, t) in f {
                        let bits = |t: &Tensor| -> Vec<u32> {
                            match t.as_f32() {
                                Some(v) => v.iter().map(|x| x.to_bits()).collect(),
                                None => t
                                    .as_i32()
                                    .unwrap_or(&[])
                                    .iter()
                                    .map(|&x| x as u32)
                                    .collect(),
                            }
                        };
                        assert_eq!(
                            bits(t),
                            bits(&got[name]),
                            "{name}: threads={threads} differs bitwise"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_matches_interpreter() {
    let mut rng = Rng(1);
    // (a shape, b shape): odd sizes, size-1 dims, broadcast batch dims.
    let cases: &[(&[usize], &[usize])] = &[
        (&[7, 13], &[13, 9]),
        (&[1, 1], &[1, 1]),
        (&[5, 8], &[8, 8]),
        (&[3, 1, 6, 11], &[4, 11, 17]),
        (&[2, 37, 300], &[300, 21]),
        (&[131, 67], &[67, 259]),
        (&[1, 5], &[5, 1]),
        // Five k blocks, the last one with a step left after the unrolled
        // loop.
        (&[9, 517], &[517, 300]),
        // Enough column panels for A packed as broadcasts, which on
        // several threads each unit packs for itself: batches with their
        // own A, and batches sharing one A (packed once by a phase).
        (&[3, 12, 20], &[3, 20, 130]),
        (&[12, 20], &[2, 20, 130]),
    ];
    for (a, b) in cases {
        let mut c = Case::new();
        let x = c.input("a", rand_f32(&mut rng, a, 1.0));
        let y = c.input("b", rand_f32(&mut rng, b, 1.0));
        let z = c.op(Op::MatMul, &[x, y]);
        c.out("y", z);
        // f32 accumulation over K terms of size ≤ 1: cancellation can leave
        // a small result with an absolute error of a few K·ε.
        c.check_tol(1e-5, 1e-5);
    }
}

const UNARY: [UnaryOp; 10] = [
    UnaryOp::Relu,
    UnaryOp::Sigmoid,
    UnaryOp::Tanh,
    UnaryOp::Exp,
    UnaryOp::Log,
    UnaryOp::Sqrt,
    UnaryOp::Abs,
    UnaryOp::Neg,
    UnaryOp::Step,
    UnaryOp::Sign,
];

#[test]
fn unary_ops_match_interpreter() {
    let mut rng = Rng(2);
    for shape in [&[7usize, 5][..], &[1, 3, 1], &[33], &[]] {
        for u in UNARY {
            let mut c = Case::new();
            let mut t = rand_f32(&mut rng, shape, 6.0);
            if matches!(u, UnaryOp::Log | UnaryOp::Sqrt) {
                if let dlc::tensor::Data::F32(v) = &mut t.data {
                    v.iter_mut().for_each(|x| *x = x.abs() + 1e-3);
                }
            }
            let x = c.input("x", t);
            let y = c.op(Op::Unary(u), &[x]);
            c.out("y", y);
            c.check(1e-5);
        }
    }
}

#[test]
fn binary_ops_broadcast_like_the_interpreter() {
    let mut rng = Rng(3);
    let shapes: &[(&[usize], &[usize])] = &[
        (&[6, 7], &[6, 7]),
        (&[2, 3, 5], &[5]),
        (&[4, 1, 3], &[1, 7, 1]),
        (&[9], &[]),
        (&[3, 1], &[1, 1, 13]),
    ];
    for op in [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Maximum,
        BinaryOp::Minimum,
        BinaryOp::Greater,
        BinaryOp::Equal,
    ] {
        for (a, b) in shapes {
            let mut c = Case::new();
            let ta = rand_f32(&mut rng, a, 2.0);
            // Some equal elements so `equal` and ties are exercised.
            let mut tb = rand_f32(&mut rng, b, 2.0);
            if a == b {
                if let (Some(va), dlc::tensor::Data::F32(vb)) = (ta.as_f32(), &mut tb.data) {
                    vb[0] = va[0];
                }
            }
            let x = c.input("a", ta);
            let y = c.input("b", tb);
            let z = c.op(Op::Binary(op), &[x, y]);
            c.out("y", z);
            c.check(1e-5);
        }
    }
}

#[test]
fn reductions_match_interpreter() {
    let mut rng = Rng(4);
    let cases: &[(&[usize], &[usize])] = &[
        (&[5, 7], &[1]),
        (&[5, 7], &[0]),
        (&[3, 1, 9, 2], &[0, 2]),
        (&[6, 4, 3], &[0, 1, 2]),
        (&[2, 37], &[1]),
        // Outer-axis reductions run 16 outputs per unit as vectors: full
        // blocks, a narrower last block, kept outer dims, and one large
        // enough to be split over threads.
        (&[9, 37], &[0]),
        (&[4, 3, 32], &[0, 1]),
        (&[3, 40, 5], &[1]),
        (&[2, 6, 20], &[0]),
        (&[600, 130], &[0]),
    ];
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
        for (shape, axes) in cases {
            for keepdims in [false, true] {
                let mut c = Case::new();
                let x = c.input("x", rand_f32(&mut rng, shape, 3.0));
                let y = c.op(
                    Op::Reduce {
                        op,
                        axes: axes.to_vec(),
                        keepdims,
                    },
                    &[x],
                );
                c.out("y", y);
                // A sum of n terms |x| ≤ 3 in f32 may be off by n·u·Σ|x|
                // ≤ n·u·3n (u = 2⁻²⁴) in any summation order; a relative
                // tolerance alone fails wherever the terms cancel.
                let n: usize = axes.iter().map(|&a| shape[a]).product();
                let atol = (n * n) as f32 * 3.0 * f32::EPSILON / 2.0;
                c.check_tol(1e-5, atol.max(1e-8));
            }
        }
    }
}

/// A sum over a whole large tensor (one contiguous line of 66,992
/// positive terms) is accumulated in blocks: one f32 per lane over the
/// whole line was 2.4e-5 off the interpreter's f64 sum (found by a random
/// program), blocks of 1024 are 1.4e-7 off.
#[test]
fn long_sums_are_accumulated_in_blocks() {
    let shape = [53usize, 1264];
    let v = clamped_tanh(11, &shape);
    for op in [ReduceOp::Sum, ReduceOp::Mean] {
        let mut c = Case::new();
        let x = c.input("x", v.clone());
        let y = c.op(
            Op::Reduce {
                op,
                axes: vec![0, 1],
                keepdims: false,
            },
            &[x],
        );
        c.out("y", y);
        c.check_tol(2e-6, 0.0);
    }
}

/// Mostly one value (a clamp's floor, as in `tanh(maximum(x, 0.25))`):
/// the roundings of adding it to a running sum all go the same way.
fn clamped_tanh(seed: u64, shape: &[usize]) -> Tensor {
    let r = rand_f32(&mut Rng(seed), shape, 1.0);
    let v = r.as_f32().unwrap_or(&[]).iter().map(|x| x.max(0.25).tanh());
    Tensor::f32(shape.to_vec(), v.collect())
}

/// Long rows and columns are summed in blocks too: a row program's sum,
/// softmax's `Σ exp`, and sums over 40,000 rows. Measured against the
/// interpreter's f64 sums, with one f32 per lane (or per column) over the
/// whole line, then with the blocks: the row program 4.5e-5 then 7.9e-7,
/// softmax 4.5e-6 then 2.8e-7, log_softmax 4.7e-7 then 9.3e-8, the column
/// sums 2.4e-4 then 4.8e-7.
#[test]
fn long_rows_and_columns_are_summed_in_blocks() {
    // `sum(x, axis)`, of `x * x` with `square`.
    let check_sum = |x: Tensor, axis: usize, square: bool| {
        let mut c = Case::new();
        let mut v = c.input("x", x);
        if square {
            v = c.op(Op::Binary(BinaryOp::Mul), &[v, v]);
        }
        let reduce = Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![axis],
            keepdims: false,
        };
        let y = c.op(reduce, &[v]);
        c.out("y", y);
        c.check_tol(1e-6, 0.0);
    };
    let x_wide = clamped_tanh(12, &[3, 40_003]);
    // A row program.
    check_sum(x_wide.clone(), 1, true);
    for log in [false, true] {
        let mut c = Case::new();
        let x = c.input("x", x_wide.clone());
        let y = c.op(
            if log {
                Op::LogSoftmax { axis: 1 }
            } else {
                Op::Softmax { axis: 1 }
            },
            &[x],
        );
        c.out("y", y);
        c.check_tol(if log { 2e-7 } else { 5e-7 }, 0.0);
    }
    // Sums over the 40,000 rows of each column (a bias gradient's shape).
    check_sum(clamped_tanh(13, &[40_003, 13]), 0, false);
}

/// A product over a deep k sums each k block from zero and adds it to C:
/// with one f32 chain per element over K = 40,000 positive terms, C was
/// 1.05e-4 off the interpreter's f64 sums (beyond a golden case's output
/// tolerance); with the blocks, 7.7e-7.
#[test]
fn deep_products_sum_k_in_blocks() {
    let mut c = Case::new();
    let a = c.input("a", clamped_tanh(14, &[20, 40_000]));
    let b = c.input("b", clamped_tanh(15, &[40_000, 24]));
    let y = c.op(Op::MatMul, &[a, b]);
    c.out("y", y);
    c.check_tol(2e-6, 0.0);
}

/// The direct filter gradient sums each lane's terms in blocks of rows
/// too: over 40 images of 30 × 29 (34,800 positive terms per weight) one
/// chain per lane was 2.8e-5 off the interpreter's f64 sums, blocks of 32
/// rows are 1.4e-6 off.
#[test]
fn filter_gradient_sums_rows_in_blocks() {
    let conv = dlc::ir::Conv2d {
        stride: 1,
        dilation: 1,
        pad: [1, 1, 1, 1],
    };
    let x = clamped_tanh(16, &[40, 3, 30, 29]);
    let dy = clamped_tanh(17, &[40, 5, 30, 29]);
    filter_gradient_case(x, dy, conv).check_tol(2e-6, 0.0);
}

/// Short lines, and lines long enough for the blocked loops with
/// whole-vector and single-lane rests.
#[test]
fn softmax_and_log_softmax_match_interpreter() {
    let mut rng = Rng(5);
    for (shape, axis) in [
        (&[4usize, 11][..], 1usize),
        (&[3, 5, 2], 1),
        (&[1, 7], 0),
        (&[2, 3, 9], 2),
        (&[3, 1000], 1),
        (&[2, 4, 87], 2),
        (&[70, 3], 0),
    ] {
        for log in [false, true] {
            let mut c = Case::new();
            let x = c.input("x", rand_f32(&mut rng, shape, 5.0));
            let op = if log {
                Op::LogSoftmax { axis }
            } else {
                Op::Softmax { axis }
            };
            let y = c.op(op, &[x]);
            c.out("y", y);
            c.check(1e-5);
        }
    }
}

#[test]
fn cross_entropy_and_grad_match_interpreter() {
    let mut rng = Rng(6);
    // (300, 150): enough rows for the loss and its gradient to be split
    // over threads.
    for (n, classes) in [(4usize, 3usize), (1, 1), (9, 13), (300, 150)] {
        let mut c = Case::new();
        let x = c.input("x", rand_f32(&mut rng, &[n, classes], 4.0));
        let l = c.input("l", rand_ids(&mut rng, &[n], classes));
        let d = c.input("d", Tensor::scalar(0.7));
        let loss = c.op(Op::CrossEntropy, &[x, l]);
        let g = c.op(Op::CrossEntropyGrad, &[x, l, d]);
        c.out("loss", loss);
        c.out("g", g);
        c.check(1e-5);
    }
}

#[test]
fn a_label_out_of_range_is_the_interpreters_error() {
    let mut c = Case::new();
    let x = c.input("x", Tensor::f32(vec![2, 3], vec![0.0; 6]));
    let l = c.input("l", Tensor::i32(vec![2], vec![1, 3]));
    let loss = c.op(Op::CrossEntropy, &[x, l]);
    c.out("loss", loss);
    let m = codegen::compile(&c.g, &JitOptions { threads: 2 }).expect("compiles");
    let jit = m
        .run(&c.feeds)
        .expect_err("label 3 is out of range")
        .to_string();
    let reference = interp::run_f32(&c.g, &c.feeds)
        .expect_err("also in the interpreter")
        .to_string();
    assert_eq!(jit, reference);
}

#[test]
fn layout_ops_match_interpreter() {
    let mut rng = Rng(7);
    // Short rows copy as straight-line moves (whole vectors and single
    // lanes), rows beyond 64 floats in a loop.
    for shape in [
        &[2usize, 3, 5][..],
        &[1, 7, 1],
        &[4, 1, 6],
        &[2, 9, 37],
        &[3, 2, 70],
    ] {
        let n = shape.len();
        let ops = vec![
            Op::Transpose {
                perm: (0..n).rev().collect(),
            },
            Op::Reshape {
                shape: vec![numel(shape)],
            },
            Op::Slice {
                axis: n - 1,
                start: 0,
                end: shape[n - 1].div_ceil(2),
            },
            Op::Slice {
                axis: 1,
                start: shape[1] / 2,
                end: shape[1],
            },
            Op::PadSlice {
                axis: 1,
                start: 2,
                full: shape[1] + 3,
            },
            Op::Expand {
                shape: {
                    let mut s = vec![3];
                    s.extend(shape.iter().map(|&d| if d == 1 { 4 } else { d }));
                    s
                },
            },
        ];
        for op in ops {
            for dtype in [DType::F32, DType::I32] {
                let mut c = Case::new();
                let t = match dtype {
                    DType::F32 => rand_f32(&mut rng, shape, 1.0),
                    DType::I32 => rand_ids(&mut rng, shape, 1000),
                };
                if dtype == DType::I32 && matches!(op, Op::PadSlice { .. }) {
                    continue; // pad_slice is a gradient: f32 only
                }
                let x = c.input("x", t);
                let y = c.op(op.clone(), &[x]);
                c.out("y", y);
                c.check(0.0);
            }
        }
        // concat along each axis
        for axis in 0..n {
            let mut c = Case::new();
            let mut s2 = shape.to_vec();
            s2[axis] += 2;
            let a = c.input("a", rand_f32(&mut rng, shape, 1.0));
            let b = c.input("b", rand_f32(&mut rng, &s2, 1.0));
            let y = c.op(Op::Concat { axis }, &[a, b, a]);
            c.out("y", y);
            c.check(0.0);
        }
    }
}

#[test]
fn transposes_of_the_last_two_axes_move_whole_tiles() {
    // Swapping the last two axes copies 4×4 tiles through registers: whole
    // tiles, leftover rows and columns, batch dims, slabs smaller than a
    // tile (the strided path), i32 data, and enough rows to be split over
    // threads.
    let mut rng = Rng(17);
    for shape in [
        &[8usize, 12][..],
        &[7, 9],
        &[3, 5, 6],
        &[2, 4, 3, 13],
        &[3, 2],
        &[64, 784],
        &[5, 1001],
    ] {
        let n = shape.len();
        let mut perm: Vec<usize> = (0..n).collect();
        perm.swap(n - 2, n - 1);
        for dtype in [DType::F32, DType::I32] {
            let mut c = Case::new();
            let t = match dtype {
                DType::F32 => rand_f32(&mut rng, shape, 1.0),
                _ => rand_ids(&mut rng, shape, 1 << 30),
            };
            let x = c.input("x", t);
            let y = c.op(Op::Transpose { perm: perm.clone() }, &[x]);
            c.out("y", y);
            c.check(0.0);
        }
    }
}

#[test]
fn gather_and_scatter_add_match_interpreter() {
    let mut rng = Rng(8);
    for (rows, width, ids_shape) in [
        (10usize, 7usize, &[3usize, 5][..]),
        (1, 1, &[4]),
        (6, 9, &[1]),
        // Enough ids that the columns split into chunks of 11, whose
        // vector loops start off a multiple of four.
        (1000, 30, &[3000]),
    ] {
        // The interpreter sums in f64; f32 sums of a few terms of size ~1
        // differ from it by a few ulps, which the 1e-5 contract covers.
        let (rtol, atol) = if ids_shape == [3000] {
            (1e-5, 1e-6)
        } else {
            (1e-6, 1e-9)
        };
        let mut c = Case::new();
        let table = c.input("t", rand_f32(&mut rng, &[rows, width], 1.0));
        let ids = c.input("i", rand_ids(&mut rng, ids_shape, rows));
        let mut dys = ids_shape.to_vec();
        dys.push(width);
        let dy = c.input("dy", rand_f32(&mut rng, &dys, 1.0));
        let g = c.op(Op::Gather, &[table, ids]);
        let s = c.op(Op::ScatterAdd { rows }, &[ids, dy]);
        c.out("g", g);
        c.out("s", s);
        c.check_tol(rtol, atol);
    }
}

#[test]
fn fill_and_a_chain_of_kernels() {
    let mut c = Case::new();
    let mut rng = Rng(9);
    let x = c.input("x", rand_f32(&mut rng, &[3, 10], 1.0));
    let w = c.input("w", rand_f32(&mut rng, &[10, 6], 1.0));
    let b =
        c.g.add(
            Op::Fill {
                value: 0.25,
                shape: vec![6],
            },
            &[],
            None,
        )
        .expect("fill");
    let h = c.op(Op::MatMul, &[x, w]);
    let h = c.op(Op::Binary(BinaryOp::Add), &[h, b]);
    let h = c.op(Op::Unary(UnaryOp::Tanh), &[h]);
    let p = c.op(Op::Softmax { axis: 1 }, &[h]);
    c.out("p", p);
    c.out("h", h);
    c.check(1e-5);
}

#[test]
fn feeds_are_validated() {
    let mut c = Case::new();
    let x = c.input("x", Tensor::f32(vec![2], vec![1.0, 2.0]));
    let y = c.op(Op::Unary(UnaryOp::Neg), &[x]);
    c.out("y", y);
    let m = codegen::compile(&c.g, &JitOptions { threads: 1 }).expect("compiles");
    let mut bad = BTreeMap::new();
    assert!(m
        .run(&bad)
        .expect_err("missing")
        .to_string()
        .contains("missing value for input 'x'"));
    bad.insert("x".to_string(), Tensor::f32(vec![3], vec![0.0; 3]));
    assert!(m
        .run(&bad)
        .expect_err("shape")
        .to_string()
        .contains("shape [3]"));
    bad.insert("x".to_string(), Tensor::i32(vec![2], vec![0; 2]));
    assert!(m.run(&bad).expect_err("dtype").to_string().contains("i32"));
}

#[test]
fn matmul_kernel_uses_fused_multiply_add() {
    let mut c = Case::new();
    let mut rng = Rng(10);
    let a = c.input("a", rand_f32(&mut rng, &[16, 16], 1.0));
    let b = c.input("b", rand_f32(&mut rng, &[16, 16], 1.0));
    let y = c.op(Op::MatMul, &[a, b]);
    c.out("y", y);
    let asm = codegen::emit_asm(&c.g, &JitOptions::default()).expect("disassembles");
    if std::env::var("DLC_SHOW_ASM").is_ok() {
        println!("{asm}");
    }
    assert!(
        asm.contains("vfmadd"),
        "no FMA instruction in the matmul kernel"
    );
    assert!(!asm.contains("fmaf"), "FMA lowered to a libcall");
}

/// The unrolled loop of the 5 × 8 micro-kernel: four k steps of ten FMAs,
/// one broadcast per row and step, one register copy per broadcast (the
/// FMA overwrites a multiplicand), and nothing else moved: no
/// accumulator shuffled on the loop edge, nothing spilled to the stack.
/// With many column panels A is packed already broadcast: the same loop
/// with vector loads and no broadcast instruction. Products of under
/// 2 MFLOP take two k steps per iteration, with the same properties.
#[test]
fn matmul_micro_kernel_loop_keeps_accumulators_in_place() {
    // (m, k, n, FMAs per iteration, broadcasts in it)
    let cases = [
        (160, 1024, 8, 40, 20),
        (10, 1024, 128, 40, 0),
        (10, 64, 8, 20, 10),
        (10, 64, 128, 20, 0),
    ];
    for (m, k, n, fmas, broadcasts) in cases {
        let mut c = Case::new();
        let mut rng = Rng(12);
        let a = c.input("a", rand_f32(&mut rng, &[m, k], 1.0));
        let b = c.input("b", rand_f32(&mut rng, &[k, n], 1.0));
        let y = c.op(Op::MatMul, &[a, b]);
        c.out("y", y);
        let asm = codegen::emit_asm(&c.g, &JitOptions::default()).expect("disassembles");
        check_fma_loop(&asm, fmas, broadcasts, fmas / 2);
    }
}

/// The direct convolution's loop (two taps of a 5 × 8 tile, its weights
/// packed already broadcast: vector loads, no broadcast instruction) and
/// the filter gradient's (two column groups of a 3 × 3 tile) keep their
/// accumulators in place like the matmul micro-kernel.
#[test]
fn conv_micro_kernel_loops_keep_accumulators_in_place() {
    use dlc::ir::Conv2d;
    let mut rng = Rng(13);
    let conv = Conv2d {
        stride: 1,
        dilation: 1,
        pad: [1, 1, 1, 1],
    };
    let mut c = Case::new();
    let x = c.input("x", rand_f32(&mut rng, &[1, 4, 6, 16], 1.0));
    let w = c.input("w", rand_f32(&mut rng, &[10, 4, 3, 3], 1.0));
    let y = c.op(Op::Conv(conv), &[x, w]);
    c.out("y", y);
    check_fma_loop(
        &codegen::emit_asm(&c.g, &JitOptions::default()).expect("disassembles"),
        20,
        0,
        10,
    );

    let x = rand_f32(&mut rng, &[1, 4, 6, 16], 1.0);
    let dy = rand_f32(&mut rng, &[1, 6, 6, 16], 1.0);
    let c = filter_gradient_case(x, dy, conv);
    // Each dy vector feeds three FMAs: two copies per row and group.
    check_fma_loop(
        &codegen::emit_asm(&c.g, &JitOptions::default()).expect("disassembles"),
        18,
        0,
        12,
    );
}

#[test]
fn conv_and_its_gradients_match_interpreter() {
    use dlc::ir::Conv2d;
    let mut rng = Rng(11);
    let cases: &[(&[usize], &[usize], Conv2d)] = &[
        (
            &[2, 3, 7, 9],
            &[4, 3, 3, 2],
            Conv2d {
                stride: 1,
                dilation: 1,
                pad: [1, 0, 1, 0],
            },
        ),
        (
            &[1, 1, 5, 5],
            &[1, 1, 1, 1],
            Conv2d {
                stride: 2,
                dilation: 1,
                pad: [0, 0, 0, 0],
            },
        ),
        (
            &[3, 2, 9, 8],
            &[5, 2, 3, 3],
            Conv2d {
                stride: 2,
                dilation: 2,
                pad: [2, 1, 3, 2],
            },
        ),
        (
            &[2, 6, 12, 11],
            &[7, 6, 5, 5],
            Conv2d {
                stride: 1,
                dilation: 1,
                pad: [2, 2, 2, 2],
            },
        ),
        // Stride 1 runs the direct kernels: dilation with asymmetric pads,
        // 13 output channels (two full row panels of 5 and a remainder),
        // three input channels (a pair of taps per iteration and one left),
        // and a width that leaves a 5-lane tail tile.
        (
            &[2, 3, 9, 21],
            &[13, 3, 3, 3],
            Conv2d {
                stride: 1,
                dilation: 2,
                pad: [3, 1, 0, 4],
            },
        ),
        // Output narrower than one f32x4.
        (
            &[1, 2, 4, 3],
            &[7, 2, 2, 2],
            Conv2d {
                stride: 1,
                dilation: 1,
                pad: [0, 0, 0, 0],
            },
        ),
        // Padding beyond the kernel extent: the input gradient's padded
        // copy of dy starts inside dy (negative offset).
        (
            &[2, 2, 5, 6],
            &[3, 2, 1, 2],
            Conv2d {
                stride: 1,
                dilation: 1,
                pad: [2, 3, 2, 3],
            },
        ),
        // Whole tiles only: 10 channels, 16 columns.
        (
            &[1, 4, 6, 16],
            &[10, 4, 3, 3],
            Conv2d {
                stride: 1,
                dilation: 1,
                pad: [1, 1, 1, 1],
            },
        ),
        // lenet's layers, whose direct kernels take narrower register
        // tiles (`conv::direct_tile_shape`): 2 × 16 for the first layer's
        // 6 channels at 28 columns and its 1-channel input gradient, 3 × 12
        // for the second's 16 channels at 10 columns (five full panels and
        // a 1-row one), 2 × 16 for its 6-channel input gradient.
        (
            &[2, 1, 9, 28],
            &[6, 1, 5, 5],
            Conv2d {
                stride: 1,
                dilation: 1,
                pad: [2, 2, 2, 2],
            },
        ),
        (
            &[2, 6, 14, 14],
            &[16, 6, 5, 5],
            Conv2d {
                stride: 1,
                dilation: 1,
                pad: [0, 0, 0, 0],
            },
        ),
        // 3 × 3 layers with 24 or more channels in and out run as
        // Winograd (`codegen::winograd`), forward and input gradient;
        // with pad 0 the input gradient's 18 columns take the direct
        // kernel.
        (
            &[2, 24, 6, 16],
            &[25, 24, 3, 3],
            Conv2d {
                stride: 1,
                dilation: 1,
                pad: [1, 1, 1, 1],
            },
        ),
        (
            &[1, 24, 10, 18],
            &[24, 24, 3, 3],
            Conv2d {
                stride: 1,
                dilation: 1,
                pad: [0, 0, 0, 0],
            },
        ),
        // A kernel wider than the direct filter gradient takes (17 > 16
        // columns): its filter gradient runs through im2col.
        (
            &[1, 2, 3, 20],
            &[3, 2, 2, 17],
            Conv2d {
                stride: 1,
                dilation: 1,
                pad: [0, 8, 1, 8],
            },
        ),
    ];
    for (xs, ws, conv) in cases {
        let mut c = Case::new();
        let x = c.input("x", rand_f32(&mut rng, xs, 1.0));
        let w = c.input("w", rand_f32(&mut rng, ws, 1.0));
        let y = c.op(Op::Conv(*conv), &[x, w]);
        let ys = c.g.ty(y).shape.clone();
        let dy = c.input("dy", rand_f32(&mut rng, &ys, 1.0));
        let dx = c.op(
            Op::ConvGradInput {
                conv: *conv,
                input_hw: [xs[2], xs[3]],
            },
            &[dy, w],
        );
        let dw = c.op(
            Op::ConvGradFilter {
                conv: *conv,
                kernel_hw: [ws[2], ws[3]],
            },
            &[x, dy],
        );
        c.out("y", y);
        c.out("dx", dx);
        c.out("dw", dw);
        c.check_tol(1e-5, 1e-5);
    }
}

#[test]
fn pooling_and_its_gradients_match_interpreter() {
    use dlc::ir::Pool2d;
    let mut rng = Rng(12);
    let cases: &[(&[usize], Pool2d)] = &[
        (
            &[2, 3, 7, 6],
            Pool2d {
                window: 3,
                stride: 2,
                pad: 1,
            },
        ),
        (
            &[1, 2, 5, 5],
            Pool2d {
                window: 2,
                stride: 2,
                pad: 0,
            },
        ),
        (
            &[3, 1, 6, 9],
            Pool2d {
                window: 3,
                stride: 1,
                pad: 0,
            },
        ),
        (
            &[1, 1, 1, 1],
            Pool2d {
                window: 1,
                stride: 1,
                pad: 0,
            },
        ),
        // Interior windows take the unrolled path, the border the checked
        // one; ties (repeated values) must pick the first maximum in both.
        (
            &[2, 3, 11, 13],
            Pool2d {
                window: 3,
                stride: 2,
                pad: 1,
            },
        ),
        (
            &[1, 2, 8, 10],
            Pool2d {
                window: 2,
                stride: 2,
                pad: 0,
            },
        ),
        // 2 × 2 at stride 2 runs four outputs per vector inside the input
        // (`conv::Pool::emit_max_2x2_quad`): several groups of four and a
        // scalar rest per row, with and without a padded border.
        (
            &[2, 3, 17, 22],
            Pool2d {
                window: 2,
                stride: 2,
                pad: 1,
            },
        ),
        (
            &[1, 2, 6, 36],
            Pool2d {
                window: 2,
                stride: 2,
                pad: 0,
            },
        ),
        // A window too large to unroll (81 taps): every window loops.
        (
            &[1, 2, 21, 19],
            Pool2d {
                window: 9,
                stride: 4,
                pad: 2,
            },
        ),
    ];
    for (i, (xs, p)) in cases.iter().enumerate() {
        let mut c = Case::new();
        let mut x = rand_f32(&mut rng, xs, 1.0);
        if i >= 4 {
            // Values on a coarse grid, so windows hold tied maxima.
            let q = x.as_f32().expect("f32").iter().map(|v| (v * 2.0).round());
            x = Tensor::f32(xs.to_vec(), q.collect());
        }
        let x = c.input("x", x);
        let mx = c.op(Op::MaxPool(*p), &[x]);
        let av = c.op(Op::AvgPool(*p), &[x]);
        let ys = c.g.ty(mx).shape.clone();
        let dy = c.input("dy", rand_f32(&mut rng, &ys, 1.0));
        let dmx = c.op(Op::MaxPoolGrad(*p), &[x, dy]);
        let dav = c.op(
            Op::AvgPoolGrad {
                pool: *p,
                input_hw: [xs[2], xs[3]],
            },
            &[dy],
        );
        c.out("max", mx);
        c.out("avg", av);
        c.out("dmax", dmx);
        c.out("davg", dav);
        c.check(1e-5);
    }
}

/// A kernel or window as wide as the input does not unroll into code that
/// grows with it: a 3 × 2000 convolution's filter gradient was one
/// function of 137 000 instructions (seconds and gigabytes to compile),
/// and a pooling window is unrolled only up to 64 taps. The machine code
/// of each graph stays within a few kernels' worth.
#[test]
fn wide_kernels_and_windows_compile_to_bounded_code() {
    use dlc::ir::{Conv2d, Pool2d};
    let mut rng = Rng(14);
    let conv = Conv2d {
        stride: 1,
        dilation: 1,
        pad: [1, 999, 1, 1000],
    };
    let mut c = Case::new();
    let x = c.input("x", rand_f32(&mut rng, &[2, 3, 5, 4], 1.0));
    let dy = c.input("dy", rand_f32(&mut rng, &[2, 2, 5, 4], 1.0));
    let dw = c.op(
        Op::ConvGradFilter {
            conv,
            kernel_hw: [3, 2000],
        },
        &[x, dy],
    );
    c.out("dw", dw);
    let asm = codegen::emit_asm(&c.g, &JitOptions::default()).expect("disassembles");
    assert!(asm.lines().count() < 5_000, "{} lines", asm.lines().count());

    let p = Pool2d {
        window: 40,
        stride: 40,
        pad: 0,
    };
    let mut c = Case::new();
    let x = c.input("x", rand_f32(&mut rng, &[1, 2, 80, 80], 1.0));
    let dy = c.input("dy", rand_f32(&mut rng, &[1, 2, 2, 2], 1.0));
    let mx = c.op(Op::MaxPool(p), &[x]);
    let dmx = c.op(Op::MaxPoolGrad(p), &[x, dy]);
    c.out("max", mx);
    c.out("dmax", dmx);
    let asm = codegen::emit_asm(&c.g, &JitOptions::default()).expect("disassembles");
    assert!(asm.lines().count() < 5_000, "{} lines", asm.lines().count());
}

/// The inline exp/log/tanh/sigmoid approximations over the whole f32 range
/// (every 1021st bit pattern plus the special values) against f64 libm.
#[test]
fn transcendental_approximations_hold_their_error_bound_everywhere() {
    let mut xs: Vec<f32> = (0..=u32::MAX / 1021)
        .map(|i| f32::from_bits(i * 1021))
        .collect();
    xs.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::MIN,
        1e-45,
        88.72,
        88.73,
        -87.3,
        -103.9,
        -104.0,
        0.625,
        -0.625,
        1.0,
    ]);
    // Stated bounds (math.rs): relative error on normal results.
    type Reference = fn(f64) -> f64;
    let cases: [(UnaryOp, Reference, f64); 4] = [
        (UnaryOp::Exp, f64::exp, 2.5e-7),
        (UnaryOp::Log, f64::ln, 2.5e-7),
        (UnaryOp::Tanh, f64::tanh, 2.5e-7),
        (UnaryOp::Sigmoid, |x| 1.0 / (1.0 + (-x).exp()), 2.5e-7),
    ];
    for (op, reference, bound) in cases {
        let mut c = Case::new();
        let x = c.input("x", Tensor::f32(vec![xs.len()], xs.clone()));
        let y = c.op(Op::Unary(op), &[x]);
        c.out("y", y);
        let m = codegen::compile(&c.g, &JitOptions { threads: 2 }).expect("compiles");
        let got = m.run(&c.feeds).expect("runs");
        let got = got["y"].as_f32().expect("f32");
        let mut worst = 0.0f64;
        for (&x, &g) in xs.iter().zip(got) {
            let r = reference(f64::from(x));
            let r32 = r as f32;
            if r.is_nan() {
                assert!(g.is_nan(), "{op:?}({x:e}) = {g:e}, expected NaN");
            } else if r32.is_infinite() || r32 == 0.0 {
                assert_eq!(g, r32, "{op:?}({x:e})");
            } else if r32.abs() < f32::MIN_POSITIVE {
                let err = (f64::from(g) - r).abs();
                assert!(err <= 1e-40, "{op:?}({x:e}) = {g:e}, expected {r:e}");
            } else {
                let rel = (f64::from(g) - r).abs() / r.abs();
                assert!(
                    rel <= bound,
                    "{op:?}({x:e}) = {g:e}, expected {r:e} (rel {rel:e})"
                );
                worst = worst.max(rel);
            }
        }
        println!("{op:?}: max relative error {worst:e}");
    }
}

#[test]
fn ops_without_a_kernel_run_through_the_interpreter() {
    let mut rng = Rng(13);
    let mut c = Case::new();
    let s = c.input("s", rand_f32(&mut rng, &[4, 5], 2.0));
    let l = c.input("l", rand_ids(&mut rng, &[4], 5));
    let d = c.input("d", Tensor::scalar(1.5));
    // hinge_grad runs in the interpreter between two compiled kernels, which
    // write its operand to and read its result from the arena.
    let s2 = c.op(Op::Unary(UnaryOp::Abs), &[s]);
    let g = c.op(Op::HingeGrad, &[s2, l, d]);
    let y = c.op(Op::Unary(UnaryOp::Neg), &[g]);
    c.out("y", y);
    let want = interp::run_f32(&c.g, &c.feeds).expect("interpreter runs");
    let m = codegen::compile_interpreting(&c.g, &JitOptions { threads: 2 }, &["hinge_grad"])
        .expect("compiles");
    assert_eq!(m.interpreted_kernels(), 1);
    assert_eq!(m.interpreted_ops(), vec!["hinge_grad"]);
    assert_eq!(m.run(&c.feeds).expect("runs"), want);
    // Its own kernel agrees too.
    c.check(1e-6);
}

/// Rows of every width class (under a vector, whole vectors with and
/// without a rest, blocks of `SUM_BLOCK`), enough rows for blocks of rows,
/// and rows with infinite and NaN scores, at the label and elsewhere. In
/// (300, 1030) the loss sums 309,000 margins and each label's gradient
/// about 1000 equal shares: with one running f32 each, as before, they
/// were 4.2e-6 and 9.3e-6 off the interpreter's f64 sums; in blocks,
/// 3.0e-7 and 1.3e-6.
#[test]
fn hinge_and_its_gradient_match_interpreter() {
    let mut rng = Rng(16);
    for (n, classes) in [(4usize, 5usize), (1, 1), (7, 3), (9, 38), (300, 1030)] {
        let mut c = Case::new();
        let mut st = rand_f32(&mut rng, &[n, classes], 1.0);
        let lt = rand_ids(&mut rng, &[n], classes);
        if let (dlc::tensor::Data::F32(v), Some(ids)) = (&mut st.data, lt.as_i32()) {
            if n == 9 {
                // Row 1: +inf at the label (every margin -inf, so 0); row
                // 2: -inf elsewhere; row 3: NaN elsewhere (the loss is NaN).
                v[classes + ids[1] as usize] = f32::INFINITY;
                v[2 * classes + (ids[2] as usize + 1) % classes] = f32::NEG_INFINITY;
                v[3 * classes + (ids[3] as usize + 5) % classes] = f32::NAN;
            }
            if n == 300 {
                // Positive scores: margins that add up, as relu outputs do.
                v.iter_mut().for_each(|x| *x = x.abs() * 3.0);
            }
        }
        let s = c.input("s", st);
        let l = c.input("l", lt);
        let d = c.input("d", Tensor::scalar(0.3));
        let h = c.op(Op::Hinge, &[s, l]);
        let g = c.op(Op::HingeGrad, &[s, l, d]);
        c.out("h", h);
        c.out("g", g);
        if n == 300 {
            c.check_tol(2e-6, 0.0);
        } else {
            c.check(1e-5);
        }
    }
}

/// Shapes large enough that every kernel kind is cut into several chunks,
/// so the 2- and 3-thread runs really split the work.
#[test]
fn large_kernels_split_over_threads_bitwise_identically() {
    let mut rng = Rng(14);
    let mut c = Case::new();
    let x = c.input("x", rand_f32(&mut rng, &[300, 257], 2.0));
    let b = c.input("b", rand_f32(&mut rng, &[257], 1.0));
    let h = c.op(Op::Binary(BinaryOp::Add), &[x, b]);
    let h = c.op(Op::Unary(UnaryOp::Tanh), &[h]);
    let s = c.op(Op::Softmax { axis: 1 }, &[h]);
    let r0 = c.op(
        Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![0],
            keepdims: false,
        },
        &[s],
    );
    let r1 = c.op(
        Op::Reduce {
            op: ReduceOp::Max,
            axes: vec![1],
            keepdims: true,
        },
        &[x],
    );
    let a = c.input("a", rand_f32(&mut rng, &[3, 70, 90], 1.0));
    let w = c.input("w", rand_f32(&mut rng, &[90, 130], 1.0));
    let mm = c.op(Op::MatMul, &[a, w]);
    let img = c.input("img", rand_f32(&mut rng, &[4, 3, 20, 20], 1.0));
    let f = c.input("f", rand_f32(&mut rng, &[8, 3, 3, 3], 1.0));
    let conv = c.op(
        Op::Conv(dlc::ir::Conv2d {
            stride: 1,
            dilation: 1,
            pad: [1, 1, 1, 1],
        }),
        &[img, f],
    );
    let logits = c.input("logits", rand_f32(&mut rng, &[600, 10], 3.0));
    let labels = c.input("labels", rand_ids(&mut rng, &[600], 10));
    let d = c.input("d", Tensor::scalar(1.0));
    let ce = c.op(Op::CrossEntropyGrad, &[logits, labels, d]);
    c.out("s", s);
    c.out("r0", r0);
    c.out("r1", r1);
    c.out("mm", mm);
    c.out("conv", conv);
    c.out("ce", ce);
    c.check_tol(1e-5, 1e-5);
}

#[test]
fn several_models_coexist_and_run_on_several_threads() {
    let mut rng = Rng(15);
    let mut c1 = Case::new();
    let x = c1.input("x", rand_f32(&mut rng, &[40, 30], 1.0));
    let w = c1.input("w", rand_f32(&mut rng, &[30, 20], 1.0));
    let y = c1.op(Op::MatMul, &[x, w]);
    c1.out("y", y);
    let mut c2 = Case::new();
    let x2 = c2.input("x", rand_f32(&mut rng, &[17, 9], 1.0));
    let y2 = c2.op(Op::Unary(UnaryOp::Exp), &[x2]);
    c2.out("y", y2);
    let m1 = codegen::compile(&c1.g, &JitOptions { threads: 2 }).expect("compiles");
    let m2 = codegen::compile(&c2.g, &JitOptions { threads: 1 }).expect("compiles");
    let want1 = m1.run(&c1.feeds).expect("runs");
    let want2 = m2.run(&c2.feeds).expect("runs");
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                for _ in 0..20 {
                    assert_eq!(m1.run(&c1.feeds).expect("runs"), want1);
                    assert_eq!(m2.run(&c2.feeds).expect("runs"), want2);
                }
            });
        }
    });
    drop(m1);
    assert_eq!(
        m2.run(&c2.feeds)
            .expect("runs after another model is dropped"),
        want2
    );
}

/// A reshape of a computed value is a view of its buffer (no kernel), and
/// that buffer stays live until the reshape's last reader: the values
/// computed in between (same size, so the arena would reuse the bytes if
/// the lifetime ended early) must not overwrite it. A reshape of a fed
/// tensor, a reshape of a reshape and a reshape named as an output are
/// covered too.
#[test]
fn reshapes_are_views_that_keep_their_buffer_alive() {
    let mut rng = Rng(29);
    let mut c = Case::new();
    let x = c.input("x", rand_f32(&mut rng, &[6, 10], 1.0));
    let fed = c.op(Op::Reshape { shape: vec![60] }, &[x]);
    let a = c.op(Op::Unary(UnaryOp::Exp), &[x]);
    let r = c.op(Op::Reshape { shape: vec![3, 20] }, &[a]);
    let rr = c.op(Op::Reshape { shape: vec![60] }, &[r]);
    let s = c.op(Op::Unary(UnaryOp::Sigmoid), &[x]);
    let named = c.op(Op::Reshape { shape: vec![60] }, &[s]);
    let mut t = c.op(Op::Unary(UnaryOp::Neg), &[x]);
    for _ in 0..4 {
        let u = c.op(Op::Unary(UnaryOp::Tanh), &[t]);
        t = c.op(Op::Binary(BinaryOp::Add), &[u, x]);
    }
    let t = c.op(Op::Reshape { shape: vec![60] }, &[t]);
    let late = c.op(Op::Binary(BinaryOp::Mul), &[rr, t]);
    let late = c.op(Op::Binary(BinaryOp::Add), &[late, fed]);
    c.out("late", late);
    c.out("named", named);
    c.check(1e-5);
    let m = codegen::compile(&c.g, &JitOptions { threads: 1 }).expect("compiles");
    let ops: Vec<&str> = m.kernel_nodes().into_iter().map(|(_, op)| op).collect();
    // Only the reshape of the fed tensor is a kernel (a copy).
    assert_eq!(
        ops.iter().filter(|op| **op == "reshape").count(),
        1,
        "{ops:?}"
    );
}

/// Chains of elementwise ops run as one loop: every intermediate result
/// stays in registers. Covered: operands broadcast along rows and columns,
/// a value used twice by its reader (`t * t`), transcendental ops inside a
/// chain (the interleaved block path and the tails: 37 columns), a chain
/// longer than the fusion limit, and a named intermediate (materialised,
/// so it ends a chain). Compared with the interpreter and across threads.
#[test]
fn elementwise_chains_fuse_into_one_loop() {
    let mut rng = Rng(31);
    let mut c = Case::new();
    let x = c.input("x", rand_f32(&mut rng, &[5, 37], 2.0));
    let row = c.input("row", rand_f32(&mut rng, &[37], 1.0));
    let col = c.input("col", rand_f32(&mut rng, &[5, 1], 1.0));
    let a = c.op(Op::Binary(BinaryOp::Add), &[x, row]);
    let t = c.op(Op::Unary(UnaryOp::Tanh), &[a]);
    let sq = c.op(Op::Binary(BinaryOp::Mul), &[t, t]);
    let e = c.op(Op::Unary(UnaryOp::Exp), &[sq]);
    let d = c.op(Op::Binary(BinaryOp::Div), &[e, col]);
    let named = c.op(Op::Unary(UnaryOp::Sigmoid), &[d]);
    c.out("named", named);
    let mut y = c.op(Op::Binary(BinaryOp::Sub), &[named, x]);
    for i in 0..12 {
        let u = if i % 2 == 0 {
            UnaryOp::Neg
        } else {
            UnaryOp::Relu
        };
        y = c.op(Op::Unary(u), &[y]);
        y = c.op(Op::Binary(BinaryOp::Mul), &[y, row]);
    }
    c.out("y", y);
    c.check(1e-5);
    let m = codegen::compile(&c.g, &JitOptions { threads: 1 }).expect("compiles");
    let kernels = m.kernel_nodes().len();
    // 6 ops up to `named` (one loop), then 1 + 24 ops in loops of at most
    // eight: four loops.
    assert_eq!(kernels, 5, "{:?}", m.kernel_nodes());
}

/// A cross-entropy loss and its gradient over the same logits share one
/// kernel (one softmax per row); the loss is the mean of row losses from
/// that kernel. When the gradient's seed depends on the loss itself, the
/// loss must run first, and the two stay separate kernels.
#[test]
fn cross_entropy_loss_is_computed_with_its_gradient() {
    for dependent_seed in [false, true] {
        let mut rng = Rng(37);
        let mut c = Case::new();
        let x = c.input("x", rand_f32(&mut rng, &[7, 23], 3.0));
        let l = c.input("l", rand_ids(&mut rng, &[7], 23));
        let loss = c.op(Op::CrossEntropy, &[x, l]);
        let seed = if dependent_seed {
            c.op(Op::Binary(BinaryOp::Mul), &[loss, loss])
        } else {
            c.input("d", Tensor::scalar(0.75))
        };
        let grad = c.op(Op::CrossEntropyGrad, &[x, l, seed]);
        c.out("loss", loss);
        c.out("grad", grad);
        c.check(1e-5);
        let m = codegen::compile(&c.g, &JitOptions { threads: 2 }).expect("compiles");
        let ops: Vec<&str> = m.kernel_nodes().into_iter().map(|(_, op)| op).collect();
        assert_eq!(
            ops.contains(&"cross_entropy"),
            dependent_seed,
            "dependent seed {dependent_seed}: {ops:?}"
        );
    }
}

/// A transpose of the last two axes read only by matmuls costs no copy:
/// the matmuls read its source through swapped strides (as A and as B,
/// batched, of a fed tensor and of a computed one, with edge sizes). A
/// transpose that anything else reads stays a kernel.
#[test]
fn transposes_into_matmuls_are_strided_reads() {
    let mut rng = Rng(41);
    let mut c = Case::new();
    let x = c.input("x", rand_f32(&mut rng, &[3, 13, 7], 1.0));
    let w = c.input("w", rand_f32(&mut rng, &[11, 13], 1.0));
    let w2 = c.input("w2", rand_f32(&mut rng, &[5, 11], 1.0));
    let swap = |r: usize| -> Vec<usize> {
        let mut p: Vec<usize> = (0..r).collect();
        p.swap(r - 1, r - 2);
        p
    };
    // [3, 7, 13] @ [13, 11]: A is the transpose of a fed tensor, B of one.
    let xt = c.op(Op::Transpose { perm: swap(3) }, &[x]);
    let wt = c.op(Op::Transpose { perm: swap(2) }, &[w]);
    let y = c.op(Op::MatMul, &[xt, wt]);
    // A computed value transposed into B, batched: [3, 7, 11] @ [3, 11, 7].
    let e = c.op(Op::Unary(UnaryOp::Tanh), &[y]);
    let et = c.op(Op::Transpose { perm: swap(3) }, &[e]);
    let z = c.op(Op::MatMul, &[y, et]);
    // Read by a matmul and by an elementwise op: stays a copy.
    let kept = c.op(Op::Transpose { perm: swap(2) }, &[w2]);
    let u = c.op(Op::MatMul, &[y, kept]);
    let v = c.op(Op::Unary(UnaryOp::Neg), &[kept]);
    c.out("z", z);
    c.out("u", u);
    c.out("v", v);
    c.check(1e-5);
    let m = codegen::compile(&c.g, &JitOptions { threads: 1 }).expect("compiles");
    let ops: Vec<&str> = m.kernel_nodes().into_iter().map(|(_, op)| op).collect();
    assert_eq!(
        ops.iter().filter(|op| **op == "transpose").count(),
        1,
        "{ops:?}"
    );
}

/// Cross-entropy rows long enough for the blocked exp loop (and for
/// `SUM_BLOCK`s of it), with a rest of
/// whole vectors and of single lanes, chunks of several rows (each row's
/// exp pass also reads the next row's max), and logits far below their
/// row's max (exps that underflow, and -inf).
#[test]
fn cross_entropy_long_rows_and_underflow_match_interpreter() {
    let mut rng = Rng(43);
    for (n, classes) in [(40usize, 1000usize), (7, 2603), (33, 71), (5, 16), (3, 2)] {
        let mut xt = rand_f32(&mut rng, &[n, classes], 6.0);
        if let dlc::tensor::Data::F32(v) = &mut xt.data {
            for r in 0..n {
                let row = &mut v[r * classes..(r + 1) * classes];
                row[r % classes] = -95.0 - r as f32;
                row[(r + 1) % classes] = if r % 3 == 0 { f32::NEG_INFINITY } else { -86.9 };
                row[(r + 2) % classes] = 30.0;
            }
        }
        let mut c = Case::new();
        let x = c.input("x", xt);
        let l = c.input("l", rand_ids(&mut rng, &[n], classes));
        let d = c.input("d", Tensor::scalar(1.3));
        let loss = c.op(Op::CrossEntropy, &[x, l]);
        let g = c.op(Op::CrossEntropyGrad, &[x, l, d]);
        c.out("loss", loss);
        c.out("g", g);
        c.check(1e-5);
    }
}

/// Reductions over outer axes add every output's rows in row-major order,
/// whatever the column block, pass or thread count: the result is the
/// plain f32 loop's, bit for bit (full and partial column blocks, passes
/// with a rest of rows, a kept outer axis, reduced axes that do not merge),
/// except that a line of more than 256 rows is summed in blocks of 256
/// rows, each from 0.0, then added to the output in order.
#[test]
fn column_sums_add_rows_in_order() {
    const BLOCK: usize = 256;
    let mut rng = Rng(45);
    for (shape, axes) in [
        (&[37usize, 150][..], &[0usize][..]),
        (&[4, 7, 3, 70], &[0, 2]),
        (&[2, 19, 64], &[1]),
        (&[600, 9], &[0]),
        (&[2, 513, 13], &[1]),
    ] {
        let xt = rand_f32(&mut rng, shape, 3.0);
        let xs = xt.as_f32().expect("f32").to_vec();
        // The reference: kept coordinates in row-major order, each summed
        // over its reduced coordinates in row-major order from 0.0.
        let kept: Vec<usize> = (0..shape.len()).filter(|d| !axes.contains(d)).collect();
        let strides: Vec<usize> = (0..shape.len())
            .map(|d| shape[d + 1..].iter().product())
            .collect();
        let coords = |mut flat: usize, dims: &[usize]| -> Vec<usize> {
            let mut c = vec![0; dims.len()];
            for i in (0..dims.len()).rev() {
                c[i] = flat % shape[dims[i]];
                flat /= shape[dims[i]];
            }
            c
        };
        let n_kept: usize = kept.iter().map(|&d| shape[d]).product();
        let n_red: usize = axes.iter().map(|&d| shape[d]).product();
        let want: Vec<f32> = (0..n_kept)
            .map(|o| {
                let ko = coords(o, &kept);
                let base: usize = kept.iter().zip(&ko).map(|(&d, &c)| c * strides[d]).sum();
                let term = |r: usize| {
                    let rc = coords(r, axes);
                    let off: usize = axes.iter().zip(&rc).map(|(&d, &c)| c * strides[d]).sum();
                    xs[base + off]
                };
                let line = shape[axes[axes.len() - 1]];
                if line <= BLOCK {
                    return (0..n_red).fold(0.0f32, |acc, r| acc + term(r));
                }
                let blocks = (0..n_red).step_by(line).flat_map(|l| {
                    (l..l + line)
                        .step_by(BLOCK)
                        .map(move |b| (b, (b + BLOCK).min(l + line)))
                });
                blocks.fold(0.0f32, |acc, (lo, hi)| {
                    acc + (lo..hi).fold(0.0f32, |s, r| s + term(r))
                })
            })
            .collect();
        let mut c = Case::new();
        let x = c.input("x", xt);
        let y = c.op(
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: axes.to_vec(),
                keepdims: false,
            },
            &[x],
        );
        c.out("y", y);
        for threads in [1, 2, 3] {
            let m = codegen::compile(&c.g, &JitOptions { threads }).expect("compiles");
            let got = m.run(&c.feeds).expect("runs");
            let got = got["y"].as_f32().expect("f32");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(got),
                bits(&want),
                "{shape:?} over {axes:?}, {threads} threads"
            );
        }
    }
}

/// `build(false)` (no second reader of the product) against the
/// interpreter, compiled to one `matmul+epilogue` kernel, with the bits of
/// `outs` equal to those of `build(true)`, whose product is also an output
/// and so has a kernel of its own first. Returns that split case.
fn fuses_like_split(build: impl Fn(bool) -> Case, what: &str, outs: &[&str]) -> Case {
    let fused = build(false);
    fused.check_tol(1e-5, 1e-5);
    assert_eq!(fused.labels(), ["matmul+epilogue"], "{what}");
    let split = build(true);
    assert_eq!(split.labels().first(), Some(&"matmul"), "{what}");
    assert_eq!(fused.bits(outs), split.bits(outs), "{what}: bits");
    split
}

/// Elementwise chains that read a matmul run in its epilogue: one kernel,
/// labelled `matmul+epilogue`, with the interpreter's values and the same
/// bits as the separate kernels that a second reader of the product
/// forces. Chains: a dense layer's bias (given first or second) and its
/// relu or tanh, a momentum update reading a tensor of C's shape and
/// scalars. Shapes cover edge rows and columns, two k blocks, a batch and a
/// product cut into several column chunks.
#[test]
fn elementwise_chains_run_in_the_matmul_epilogue() {
    #[derive(Clone, Copy, Debug)]
    enum Chain {
        BiasFirst,
        BiasRelu,
        BiasTanh,
        Momentum,
    }
    let mut rng = Rng(31);
    let cases: &[(&[usize], &[usize], Chain)] = &[
        (&[7, 5], &[5, 13], Chain::BiasRelu),
        (&[3, 11, 300], &[300, 21], Chain::BiasFirst),
        (&[64, 100], &[100, 300], Chain::Momentum),
        (&[1, 1], &[1, 1], Chain::BiasTanh),
        (&[9, 3], &[3, 6], Chain::Momentum),
    ];
    for &(a_shape, w_shape, chain) in cases {
        let (ta, tw) = (
            rand_f32(&mut rng, a_shape, 1.0),
            rand_f32(&mut rng, w_shape, 1.0),
        );
        let tb = rand_f32(&mut rng, &w_shape[1..], 1.0);
        let mut c_shape = a_shape[..a_shape.len() - 1].to_vec();
        c_shape.push(w_shape[1]);
        let tv = rand_f32(&mut rng, &c_shape, 1.0);
        let build = |keep_product: bool| {
            let mut c = Case::new();
            let a = c.input("a", ta.clone());
            let w = c.input("w", tw.clone());
            let b = c.input("b", tb.clone());
            let mm = c.op(Op::MatMul, &[a, w]);
            let add = |c: &mut Case, x: Value, y: Value| c.op(Op::Binary(BinaryOp::Add), &[x, y]);
            let y = match chain {
                Chain::BiasFirst => add(&mut c, b, mm),
                Chain::BiasRelu => {
                    let z = add(&mut c, mm, b);
                    c.op(Op::Unary(UnaryOp::Relu), &[z])
                }
                Chain::BiasTanh => {
                    let z = add(&mut c, mm, b);
                    c.op(Op::Unary(UnaryOp::Tanh), &[z])
                }
                Chain::Momentum => {
                    // v' = 0.9·v + g, the product being the gradient g.
                    let v = c.input("v", tv.clone());
                    let mu = c.input("mu", Tensor::f32(vec![], vec![0.9]));
                    let mv = c.op(Op::Binary(BinaryOp::Mul), &[mu, v]);
                    add(&mut c, mv, mm)
                }
            };
            c.out("y", y);
            if keep_product {
                c.out("mm", mm);
            }
            c
        };
        let what = format!("{a_shape:?} @ {w_shape:?}, {chain:?}");
        let split = fuses_like_split(build, &what, &["y"]);
        assert_eq!(split.labels().len(), 2, "{what}");
    }
}

/// Elementwise chains that read a stride-1 convolution or its input
/// gradient run in its epilogue: one kernel, labelled `conv+epilogue`,
/// with the interpreter's values and the same bits as the separate
/// kernels that a second reader of the product forces. Chains: a `conv2d`
/// layer's bias as `[m, 1, 1]` (or `[1, m, 1, 1]`) and its relu, a
/// residual of the result's shape and a scalar, a relu gradient's mask. Shapes cover each register tile (`conv::direct_tile_shape`),
/// partial row panels and partial column tiles. A strided convolution
/// (im2col and a matmul) keeps its own kernel and the chain its own.
#[test]
fn elementwise_chains_run_in_the_conv_epilogue() {
    use dlc::ir::Conv2d;
    let mut rng = Rng(37);
    // (x, w, stride, chain): 0 bias + relu, 1 bias as [1, m, 1, 1] then
    // tanh, 2 a residual times a scalar plus the product, 3 the input
    // gradient (the product then) masked by a relu gradient `step(x)`.
    let cases: &[(&[usize], &[usize], usize, u8)] = &[
        (&[2, 1, 9, 28], &[6, 1, 5, 5], 1, 0),
        (&[2, 6, 14, 14], &[16, 6, 5, 5], 1, 0),
        (&[1, 3, 7, 9], &[13, 3, 3, 3], 1, 1),
        (&[2, 2, 5, 6], &[3, 2, 2, 2], 1, 2),
        (&[1, 2, 9, 8], &[5, 2, 3, 3], 2, 0),
        (&[2, 6, 14, 14], &[16, 6, 5, 5], 1, 3),
        (&[1, 3, 7, 9], &[4, 3, 3, 3], 2, 3),
        // The Winograd kernels' output transform (`codegen::winograd`),
        // the first with two groups of images (4 and 1, 2 MiB each).
        (&[5, 64, 32, 32], &[64, 64, 3, 3], 1, 0),
        (&[2, 24, 6, 16], &[28, 24, 3, 3], 1, 0),
        (&[1, 25, 4, 8], &[24, 25, 3, 3], 1, 1),
        (&[2, 28, 6, 16], &[24, 28, 3, 3], 1, 3),
    ];
    for &(xs, ws, stride, chain) in cases {
        let conv = Conv2d {
            stride,
            dilation: 1,
            pad: [1, 1, 1, 1],
        };
        let (tx, tw) = (rand_f32(&mut rng, xs, 1.0), rand_f32(&mut rng, ws, 1.0));
        let m = ws[0];
        let tb = rand_f32(&mut rng, &[m], 1.0);
        let build = |keep_product: bool| {
            let mut c = Case::new();
            let x = c.input("x", tx.clone());
            let w = c.input("w", tw.clone());
            let mut y = c.op(Op::Conv(conv), &[x, w]);
            let ys = c.g.ty(y).shape.clone();
            let bias = |c: &mut Case, shape: Vec<usize>| {
                let b = c.input("b", tb.clone());
                c.op(Op::Reshape { shape }, &[b])
            };
            let out = match chain {
                0 => {
                    let b = bias(&mut c, vec![m, 1, 1]);
                    let z = c.op(Op::Binary(BinaryOp::Add), &[y, b]);
                    c.op(Op::Unary(UnaryOp::Relu), &[z])
                }
                1 => {
                    let b = bias(&mut c, vec![1, m, 1, 1]);
                    let z = c.op(Op::Binary(BinaryOp::Add), &[b, y]);
                    c.op(Op::Unary(UnaryOp::Tanh), &[z])
                }
                2 => {
                    let r = c.input("r", rand_f32(&mut Rng(5), &ys, 1.0));
                    let s = c.input("s", Tensor::f32(vec![], vec![0.5]));
                    let rs = c.op(Op::Binary(BinaryOp::Mul), &[r, s]);
                    c.op(Op::Binary(BinaryOp::Add), &[y, rs])
                }
                _ => {
                    c.out("conv", y);
                    let dy = c.input("dy", rand_f32(&mut Rng(6), &ys, 1.0));
                    y = c.op(
                        Op::ConvGradInput {
                            conv,
                            input_hw: [xs[2], xs[3]],
                        },
                        &[dy, w],
                    );
                    let mask = c.op(Op::Unary(UnaryOp::Step), &[x]);
                    c.op(Op::Binary(BinaryOp::Mul), &[y, mask])
                }
            };
            c.out("y", out);
            if keep_product {
                c.out("product", y);
            }
            c
        };
        let what = format!("{xs:?} * {ws:?} stride {stride}, chain {chain}");
        // A reshaped feed (the bias) is copied by a kernel of its own;
        // the input gradient's cases keep the forward as an output.
        let ignore: &[&str] = if chain < 3 {
            &["reshape"]
        } else {
            &["reshape", "conv"]
        };
        let (fused, split) = fused_and_split(build, &what, ignore);
        let plain = if chain < 3 { "conv" } else { "conv_grad_input" };
        if stride == 1 {
            assert_eq!(fused, ["conv+epilogue"], "{what}");
            assert_eq!(split.first(), Some(&plain), "{what}");
        } else {
            assert_eq!(fused.first(), Some(&plain), "{what}");
            assert_eq!(fused.len(), 2, "{what}");
        }
    }
}

/// `build(false)` against the interpreter, and its output `y` bitwise
/// equal to that of `build(true)`, where the product the chain reads is
/// also an output (so it has a kernel of its own). Returns the kernel
/// labels of both, without the `ignore`d ones.
fn fused_and_split(
    build: impl Fn(bool) -> Case,
    what: &str,
    ignore: &[&str],
) -> (Vec<&'static str>, Vec<&'static str>) {
    let fused = build(false);
    fused.check_tol(1e-5, 1e-5);
    let split = build(true);
    assert_eq!(fused.bits(&["y"]), split.bits(&["y"]), "{what}: bits");
    let labels = |c: &Case| {
        let mut l = c.labels();
        l.retain(|op| !ignore.contains(op));
        l
    };
    (labels(&fused), labels(&split))
}

/// Elementwise chains that read a pooling result or gradient run on each
/// finished plane of its kernel: one kernel, labelled `pool+epilogue`,
/// with the interpreter's values and the same bits as the separate
/// kernels that a second reader of the pooled value forces. Chains: a
/// relu gradient's mask `dx · step(x)` on a max pool's gradient, a
/// per-channel scale and a scalar on an average pool's gradient, a relu
/// after a max pool. Planes whose size is not a multiple of four.
#[test]
fn elementwise_chains_run_in_the_pool_epilogue() {
    use dlc::ir::Pool2d;
    let mut rng = Rng(41);
    let cases: &[(&[usize], usize, usize, u8)] = &[
        (&[2, 3, 8, 12], 2, 2, 0),
        (&[1, 2, 7, 9], 3, 2, 0),
        (&[2, 3, 5, 7], 2, 1, 1),
        (&[1, 2, 9, 10], 2, 2, 2),
    ];
    for &(xs, window, stride, chain) in cases {
        let p = Pool2d {
            window,
            stride,
            pad: 0,
        };
        let tx = rand_f32(&mut rng, xs, 1.0);
        let c_ch = xs[1];
        let ts = rand_f32(&mut rng, &[c_ch], 1.0);
        let build = |keep: bool| {
            let mut c = Case::new();
            let x = c.input("x", tx.clone());
            let pooled = c.op(Op::MaxPool(p), &[x]);
            let ys = c.g.ty(pooled).shape.clone();
            let (product, out) = match chain {
                0 => {
                    let dy = c.input("dy", rand_f32(&mut Rng(3), &ys, 1.0));
                    let dx = c.op(Op::MaxPoolGrad(p), &[x, dy]);
                    let mask = c.op(Op::Unary(UnaryOp::Step), &[x]);
                    (dx, c.op(Op::Binary(BinaryOp::Mul), &[dx, mask]))
                }
                1 => {
                    let dy = c.input("dy", rand_f32(&mut Rng(4), &ys, 1.0));
                    let dx = c.op(
                        Op::AvgPoolGrad {
                            pool: p,
                            input_hw: [xs[2], xs[3]],
                        },
                        &[dy],
                    );
                    let s = c.input("s", ts.clone());
                    let s = c.op(
                        Op::Reshape {
                            shape: vec![c_ch, 1, 1],
                        },
                        &[s],
                    );
                    let h = c.input("h", Tensor::f32(vec![], vec![0.5]));
                    let z = c.op(Op::Binary(BinaryOp::Mul), &[dx, s]);
                    (dx, c.op(Op::Binary(BinaryOp::Sub), &[z, h]))
                }
                _ => (pooled, c.op(Op::Unary(UnaryOp::Relu), &[pooled])),
            };
            c.out("y", out);
            if keep {
                c.out("pooled", product);
            }
            c
        };
        let what = format!("{xs:?} window {window} stride {stride}, chain {chain}");
        // The gradients' cases also pool `x` forward, unread.
        let ignore: &[&str] = if chain < 2 {
            &["reshape", "max_pool2d"]
        } else {
            &[]
        };
        let (fused, split) = fused_and_split(build, &what, ignore);
        assert_eq!(fused, ["pool+epilogue"], "{what}");
        assert_eq!(split.len(), 2, "{what}");
    }
}

/// The weight update after a momentum epilogue (`p − lr·v'` with
/// `v' = μ·v + g`, the product being `g`) runs in the same kernel and is
/// stored from there: one kernel, the interpreter's values, and the bits of
/// the separate kernels that a second reader of the product forces. Edge
/// rows and columns, several k blocks and column chunks, a batch, and a
/// follower that also reads a `[n]` row.
#[test]
fn a_weight_update_runs_after_the_momentum_in_the_matmul_epilogue() {
    let mut rng = Rng(33);
    let cases: &[(&[usize], &[usize], bool)] = &[
        (&[13, 37], &[37, 21], false),
        (&[64, 300], &[300, 300], true),
        (&[3, 9, 5], &[5, 6], false),
    ];
    for &(a_shape, w_shape, with_row) in cases {
        let (ta, tw) = (
            rand_f32(&mut rng, a_shape, 1.0),
            rand_f32(&mut rng, w_shape, 1.0),
        );
        let mut c_shape = a_shape[..a_shape.len() - 1].to_vec();
        c_shape.push(w_shape[1]);
        let (tv, tp) = (
            rand_f32(&mut rng, &c_shape, 1.0),
            rand_f32(&mut rng, &c_shape, 1.0),
        );
        let trow = rand_f32(&mut rng, &w_shape[1..], 1.0);
        let build = |keep_product: bool| {
            let mut c = Case::new();
            let a = c.input("a", ta.clone());
            let w = c.input("w", tw.clone());
            let v = c.input("v", tv.clone());
            let p = c.input("p", tp.clone());
            let mu = c.input("mu", Tensor::scalar(0.9));
            let lr = c.input("lr", Tensor::scalar(0.01));
            let bin =
                |c: &mut Case, op: BinaryOp, x: Value, y: Value| c.op(Op::Binary(op), &[x, y]);
            let g = c.op(Op::MatMul, &[a, w]);
            let mv = bin(&mut c, BinaryOp::Mul, mu, v);
            let v2 = bin(&mut c, BinaryOp::Add, mv, g);
            let step = bin(&mut c, BinaryOp::Mul, lr, v2);
            let base = if with_row {
                let row = c.input("row", trow.clone());
                bin(&mut c, BinaryOp::Add, p, row)
            } else {
                p
            };
            let p2 = bin(&mut c, BinaryOp::Sub, base, step);
            c.out("v", v2);
            c.out("p", p2);
            if keep_product {
                c.out("g", g);
            }
            c
        };
        let what = format!("{a_shape:?} @ {w_shape:?}");
        fuses_like_split(build, &what, &["v", "p"]);
    }
}

/// A chain reading two products computes one in its epilogue and reads the
/// other from that matmul's own kernel (a weight used twice sums two
/// gradient products).
#[test]
fn a_chain_over_two_products_fuses_one() {
    let mut rng = Rng(32);
    let mut c = Case::new();
    let a = c.input("a", rand_f32(&mut rng, &[6, 9], 1.0));
    let w = c.input("w", rand_f32(&mut rng, &[9, 11], 1.0));
    let x = c.input("x", rand_f32(&mut rng, &[6, 3], 1.0));
    let u = c.input("u", rand_f32(&mut rng, &[3, 11], 1.0));
    let p = c.op(Op::MatMul, &[a, w]);
    let q = c.op(Op::MatMul, &[x, u]);
    let y = c.op(Op::Binary(BinaryOp::Add), &[p, q]);
    c.out("y", y);
    c.check_tol(1e-5, 1e-5);
    let m = codegen::compile(&c.g, &JitOptions { threads: 1 }).expect("compiles");
    let mut ops: Vec<&str> = m.kernel_nodes().into_iter().map(|(_, op)| op).collect();
    ops.sort();
    assert_eq!(ops, ["matmul", "matmul+epilogue"]);
}

/// Layer norm and a gradient shaped like its autodiff (per-row sums of
/// products, `expand`s of per-row values, a `[d]` gain, a scalar epsilon)
/// compute as row programs: every op on the rows in one kernel, intermediate
/// rows kept on the stack or re-read from a result. Widths with and without
/// a rest of single columns, row counts with and without a rest of single
/// rows, two leading dims, and intermediates read outside the group (a
/// named output, a per-row statistic, a column sum after the group).
#[test]
fn row_programs_match_interpreter() {
    let mut rng = Rng(43);
    for shape in [
        vec![5usize, 37],
        vec![2, 3, 64],
        vec![9, 8],
        vec![1, 13],
        vec![17, 20],
        vec![12, 12],
    ] {
        let r = shape.len() - 1;
        let d = shape[r];
        let mut keep = shape.clone();
        keep[r] = 1;
        let mut c = Case::new();
        let x = c.input("x", rand_f32(&mut rng, &shape, 2.0));
        let dy = c.input("dy", rand_f32(&mut rng, &shape, 1.0));
        let gamma = c.input("gamma", rand_f32(&mut rng, &[d], 1.0));
        let eps = c.input("eps", Tensor::scalar(1e-5));
        let mean = |c: &mut Case, v: Value| c.mean_keep(v, r);
        let bin = |c: &mut Case, op: BinaryOp, a: Value, b: Value| c.op(Op::Binary(op), &[a, b]);
        // Forward.
        let m = mean(&mut c, x);
        let xc = bin(&mut c, BinaryOp::Sub, x, m);
        let sq = bin(&mut c, BinaryOp::Mul, xc, xc);
        let var = mean(&mut c, sq);
        let ve = bin(&mut c, BinaryOp::Add, var, eps);
        let sd = c.op(Op::Unary(UnaryOp::Sqrt), &[ve]);
        let xhat = bin(&mut c, BinaryOp::Div, xc, sd);
        let mut y = bin(&mut c, BinaryOp::Mul, xhat, gamma);
        if shape == [12, 12] {
            // A `[rows]` mean added to the rows broadcasts along the
            // columns (as a `[d]` operand), not along the rows.
            let flat = c.op(
                Op::Reduce {
                    op: ReduceOp::Mean,
                    axes: vec![r],
                    keepdims: false,
                },
                &[x],
            );
            y = bin(&mut c, BinaryOp::Add, y, flat);
        }
        c.out("y", y);
        c.out("sd", sd);
        // A reduction inside the group that is also a named output: the
        // row kernel stores it like any member read outside.
        c.out("var", var);
        // Backward: dx = (g - expand(mean(g)) - xhat·expand(mean(g·xhat))) / sd.
        let g = bin(&mut c, BinaryOp::Mul, dy, gamma);
        let gx = bin(&mut c, BinaryOp::Mul, g, xhat);
        let s1 = c.op(
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![r],
                keepdims: true,
            },
            &[gx],
        );
        let dv = c.input("d", Tensor::scalar(d as f32));
        let a1 = bin(&mut c, BinaryOp::Div, s1, dv);
        let e1 = c.op(
            Op::Expand {
                shape: shape.clone(),
            },
            &[a1],
        );
        let t1 = bin(&mut c, BinaryOp::Mul, e1, xhat);
        let mg = mean(&mut c, g);
        let e2 = c.op(
            Op::Expand {
                shape: shape.clone(),
            },
            &[mg],
        );
        let u = bin(&mut c, BinaryOp::Sub, g, e2);
        let u = bin(&mut c, BinaryOp::Sub, u, t1);
        let dx = bin(&mut c, BinaryOp::Div, u, sd);
        let dx = c.op(Op::Unary(UnaryOp::Neg), &[dx]);
        c.out("dx", dx);
        // Read after the group: a sum over the rows.
        let cols = c.op(
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: (0..r).collect(),
                keepdims: false,
            },
            &[gx],
        );
        c.out("cols", cols);
        c.check_tol(1e-5, 1e-5);
        let ops = c.labels();
        if shape == [12, 12] {
            // The gain `[12]` and the `[12]` mean read along the columns
            // stay out of the groups; the rest still forms row kernels.
            assert!(ops.contains(&"rows"), "{ops:?}");
        } else {
            // The forward and the gradient: one row kernel (the gradient
            // reads only the forward's rows), plus the column sum.
            assert_eq!(ops, ["rows", "sum"], "{shape:?}");
        }
    }
}

/// Rows too wide for a row program's stack buffers (a re-read `[8200]`
/// row, four rows per block) run as one kernel per op, with the same
/// values.
#[test]
fn rows_too_wide_for_the_stack_run_op_by_op() {
    let mut rng = Rng(44);
    let shape = [3usize, 8200];
    let mut c = Case::new();
    let x = c.input("x", rand_f32(&mut rng, &shape, 2.0));
    let mean = |c: &mut Case, v: Value| c.mean_keep(v, 1);
    let m = mean(&mut c, x);
    let xc = c.op(Op::Binary(BinaryOp::Sub), &[x, m]);
    let sq = c.op(Op::Binary(BinaryOp::Mul), &[xc, xc]);
    let var = mean(&mut c, sq);
    let y = c.op(Op::Binary(BinaryOp::Div), &[xc, var]);
    c.out("y", y);
    c.check_tol(1e-5, 1e-5);
    assert!(!c.labels().contains(&"rows"), "{:?}", c.labels());
}

/// A weight-update follower moves into its matmul's kernel, earlier than
/// its own place: when it also reads a value that a later kernel writes
/// (here `x − mean(x)`, added to the graph before the matmul but written
/// by its row program's last op, after it), it must stay a kernel of its
/// own. It reads that value through two reshapes, so that the row program
/// does not take the update in.
#[test]
fn a_follower_never_reads_a_value_written_after_its_matmul() {
    let mut rng = Rng(45);
    let mut c = Case::new();
    let a = c.input("a", rand_f32(&mut rng, &[6, 5], 1.0));
    let w = c.input("w", rand_f32(&mut rng, &[5, 12], 1.0));
    let v = c.input("v", rand_f32(&mut rng, &[6, 12], 1.0));
    let p = c.input("p", rand_f32(&mut rng, &[6, 12], 1.0));
    let x = c.input("x", rand_f32(&mut rng, &[6, 12], 2.0));
    let mu = c.input("mu", Tensor::scalar(0.9));
    let lr = c.input("lr", Tensor::scalar(0.01));
    let bin = |c: &mut Case, op: BinaryOp, l: Value, r: Value| c.op(Op::Binary(op), &[l, r]);
    let mean = |c: &mut Case, t: Value| c.mean_keep(t, 1);
    let m = mean(&mut c, x);
    let xc = bin(&mut c, BinaryOp::Sub, x, m);
    let g = c.op(Op::MatMul, &[a, w]);
    let mv = bin(&mut c, BinaryOp::Mul, mu, v);
    let v2 = bin(&mut c, BinaryOp::Add, mv, g);
    let sq = bin(&mut c, BinaryOp::Mul, xc, xc);
    let var = mean(&mut c, sq);
    let y = bin(&mut c, BinaryOp::Div, xc, var);
    let flat = c.op(Op::Reshape { shape: vec![72] }, &[xc]);
    let back = c.op(Op::Reshape { shape: vec![6, 12] }, &[flat]);
    let step = bin(&mut c, BinaryOp::Mul, lr, v2);
    let base = bin(&mut c, BinaryOp::Add, p, back);
    let p2 = bin(&mut c, BinaryOp::Sub, base, step);
    c.out("v", v2);
    c.out("y", y);
    c.out("p", p2);
    c.check_tol(1e-5, 1e-5);
    let labels = c.labels();
    assert!(labels.contains(&"rows"), "{labels:?}");
}

/// Stride-1 convolutions on random shapes (1–7 input and 1–17 output
/// channels, kernels up to 5 × 5, dilation 1 or 2, pads up to 5 on each
/// side): the forward with its bias and relu as an epilogue, the input
/// gradient masked by a relu gradient, the filter gradient, against the
/// interpreter on 1, 2 and 3 threads. This covers every register tile,
/// unrolled and looped taps, and skipped padding rows. (Swept with 400
/// draws when written: all 374 valid shapes passed.)
#[test]
fn convolutions_on_random_shapes_match_interpreter() {
    use dlc::ir::Conv2d;
    let mut rng = Rng(97);
    let mut done = 0;
    for _ in 0..80 {
        let n = 1 + rng.below(2);
        let c = 1 + rng.below(7);
        let m = 1 + rng.below(17);
        let kh = 1 + rng.below(5);
        let kw = 1 + rng.below(5);
        let h = 1 + rng.below(12);
        let w = 1 + rng.below(30);
        let d = 1 + rng.below(2);
        let pad = [rng.below(6), rng.below(6), rng.below(6), rng.below(6)];
        let conv = Conv2d {
            stride: 1,
            dilation: d,
            pad,
        };
        let oh = (h + pad[0] + pad[2]) as i64 - (d * (kh - 1)) as i64;
        let ow = (w + pad[1] + pad[3]) as i64 - (d * (kw - 1)) as i64;
        if oh < 1 || ow < 1 {
            continue;
        }
        let (mut cs, [x, dy, _]) = conv_layer_case(&mut rng, [n, c, h, w], [m, c, kh, kw], conv);
        let dw = cs.op(
            Op::ConvGradFilter {
                conv,
                kernel_hw: [kh, kw],
            },
            &[x, dy],
        );
        cs.out("dw", dw);
        cs.check_tol(1e-4, 1e-4);
        done += 1;
    }
    assert!(done >= 60, "only {done} valid shapes");
}

/// 3 × 3 stride-1 convolutions on random shapes that take the Winograd
/// kernels (`codegen::winograd`: 24–39 channels in and out, outputs up to
/// 12 × 30, half of them tiled exactly, pads up to 2 on each side),
/// forward with a bias and relu epilogue, the input gradient (Winograd
/// too where its own output qualifies) with a relu-gradient mask, and the
/// filter gradient, against the f64 interpreter within 1e-5 on 1, 2 and 3
/// threads, bitwise equal across them, and a filter gradient over two
/// groups of images. A transform with one sign wrong fails it (checked
/// for the forward's and the filter gradient's).
#[test]
fn winograd_convolutions_on_random_shapes_match_interpreter() {
    use dlc::codegen::winograd;
    use dlc::ir::Conv2d;
    let mut rng = Rng(99);
    let mut done = 0;
    for _ in 0..40 {
        let n = 1 + rng.below(3);
        let c = 24 + rng.below(16);
        let m = 24 + rng.below(16);
        let pad = [rng.below(3), rng.below(3), rng.below(3), rng.below(3)];
        // Half the draws tile exactly.
        let (oh, ow) = if rng.below(2) == 0 {
            (2 * (1 + rng.below(6)), 8 * (1 + rng.below(3)))
        } else {
            (1 + rng.below(12), 1 + rng.below(30))
        };
        // Input sizes that give those outputs: o = i + pads - 2.
        let (Some(h), Some(w)) = (
            (oh + 2).checked_sub(pad[0] + pad[2]),
            (ow + 2).checked_sub(pad[1] + pad[3]),
        ) else {
            continue;
        };
        if h == 0 || w == 0 || !winograd::applies(3, 3, 1, c, m, oh, ow) {
            continue;
        }
        done += 1;
        let conv = Conv2d {
            stride: 1,
            dilation: 1,
            pad,
        };
        let (xs, ws) = ([n, c, h, w], [m, c, 3, 3]);
        let (cs, [_, _, y]) = conv_layer_case(&mut rng, xs, ws, conv);
        assert_eq!(cs.g.ty(y).shape, [n, m, oh, ow]);
        cs.check_tol(1e-5, 1e-5);
        let labels = cs.labels();
        assert_eq!(
            labels.iter().filter(|l| **l == "conv+epilogue").count(),
            2,
            "{xs:?} pad {pad:?}: {labels:?}"
        );
        // The filter gradient sums the transformed products of every
        // tile, which cancel in its output transform: within the 1e-4 of
        // a gradient (a weight summing to 0.18 from terms of ±0.3 was off
        // by 1.7e-5).
        let (x, dy) = (cs.feeds["x"].clone(), cs.feeds["dy"].clone());
        filter_gradient_case(x, dy, conv).check_tol(1e-4, 1e-4);
    }
    assert!(done >= 25, "only {done} shapes take the Winograd kernels");
    // Two groups of images (4 and 1, of 2 MiB each: `winograd::group_images`),
    // whose filter-gradient products are summed group by group.
    let conv = Conv2d {
        stride: 1,
        dilation: 1,
        pad: [1, 1, 1, 1],
    };
    let x = rand_f32(&mut rng, &[5, 64, 32, 32], 1.0);
    let dy = rand_f32(&mut rng, &[5, 64, 32, 32], 1.0);
    filter_gradient_case(x, dy, conv).check_tol(1e-4, 1e-4);
}

/// A `conv2d` layer and its input gradient on random data: outputs `y =
/// relu(conv(x, w) + b)` and `dx = conv_grad_input(dy, w) · step(x)`, the
/// chains their kernels' epilogues run. Returns the case and its `x`,
/// `dy` and the convolution's result.
fn conv_layer_case(
    rng: &mut Rng,
    xs: [usize; 4],
    ws: [usize; 4],
    conv: dlc::ir::Conv2d,
) -> (Case, [Value; 3]) {
    let m = ws[0];
    let mut cs = Case::new();
    let x = cs.input("x", rand_f32(rng, &xs, 1.0));
    let wv = cs.input("w", rand_f32(rng, &ws, 1.0));
    let b = cs.input("b", rand_f32(rng, &[m], 1.0));
    let y = cs.op(Op::Conv(conv), &[x, wv]);
    let ys = cs.g.ty(y).shape.clone();
    let b = cs.op(
        Op::Reshape {
            shape: vec![m, 1, 1],
        },
        &[b],
    );
    let z = cs.op(Op::Binary(BinaryOp::Add), &[y, b]);
    let r = cs.op(Op::Unary(UnaryOp::Relu), &[z]);
    cs.out("y", r);
    let dy = cs.input("dy", rand_f32(rng, &ys, 1.0));
    let dx = cs.op(
        Op::ConvGradInput {
            conv,
            input_hw: [xs[2], xs[3]],
        },
        &[dy, wv],
    );
    let mask = cs.op(Op::Unary(UnaryOp::Step), &[x]);
    let dxm = cs.op(Op::Binary(BinaryOp::Mul), &[dx, mask]);
    cs.out("dx", dxm);
    (cs, [x, dy, y])
}

/// The 3 × 3 filter gradient of a convolution, from `x` and `dy`, as its
/// only output `dw`.
fn filter_gradient_case(x: Tensor, dy: Tensor, conv: dlc::ir::Conv2d) -> Case {
    let mut c = Case::new();
    let x = c.input("x", x);
    let dy = c.input("dy", dy);
    let dw = c.op(
        Op::ConvGradFilter {
            conv,
            kernel_hw: [3, 3],
        },
        &[x, dy],
    );
    c.out("dw", dw);
    c
}

/// Pooling on random shapes (windows up to 4, strides up to 3, any
/// legal pad, half the inputs on a coarse grid so windows tie): a max
/// pool with a relu epilogue, its gradient masked by a relu gradient, an
/// average pool's gradient under a tanh, against the interpreter on 1, 2
/// and 3 threads. (Swept with 400 draws when written: all 374 valid shapes
/// passed.) The absolute tolerance allows for the average gradient's
/// overlapping windows, whose shares can cancel in f32.
#[test]
fn pooling_on_random_shapes_matches_interpreter() {
    use dlc::ir::Pool2d;
    let mut rng = Rng(98);
    let mut done = 0;
    for _ in 0..80 {
        let window = 1 + rng.below(4);
        let stride = 1 + rng.below(3);
        let pad = rng.below(window);
        let p = Pool2d {
            window,
            stride,
            pad,
        };
        let xs = [
            1 + rng.below(2),
            1 + rng.below(4),
            1 + rng.below(14),
            1 + rng.below(30),
        ];
        let oh = (xs[2] + 2 * pad) as i64 - window as i64;
        let ow = (xs[3] + 2 * pad) as i64 - window as i64;
        if oh < 0 || ow < 0 {
            continue;
        }
        let mut c = Case::new();
        let mut x = rand_f32(&mut rng, &xs, 1.0);
        if rng.below(2) == 0 {
            let q = x.as_f32().expect("f32").iter().map(|v| (v * 2.0).round());
            x = Tensor::f32(xs.to_vec(), q.collect());
        }
        let x = c.input("x", x);
        let mx = c.op(Op::MaxPool(p), &[x]);
        let ys = c.g.ty(mx).shape.clone();
        let r = c.op(Op::Unary(UnaryOp::Relu), &[mx]);
        c.out("max", r);
        let dy = c.input("dy", rand_f32(&mut rng, &ys, 1.0));
        let dmx = c.op(Op::MaxPoolGrad(p), &[x, dy]);
        let mask = c.op(Op::Unary(UnaryOp::Step), &[x]);
        let dm = c.op(Op::Binary(BinaryOp::Mul), &[dmx, mask]);
        c.out("dmax", dm);
        let dav = c.op(
            Op::AvgPoolGrad {
                pool: p,
                input_hw: [xs[2], xs[3]],
            },
            &[dy],
        );
        let t = c.op(Op::Unary(UnaryOp::Tanh), &[dav]);
        c.out("davg", t);
        c.check_tol(1e-5, 1e-6);
        done += 1;
    }
    assert!(done >= 60, "only {done} valid shapes");
}
