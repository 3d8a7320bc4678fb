//! Tests of the optimisation passes, fusion and the memory plan on graphs
//! built with the Graph API (and through autodiff's training step).
//!
//! Every optimised graph is verified after every pass, every plan is checked,
//! and results are compared with the interpreter before and after.

use dlc::interp::run_f32;
use dlc::ir::{
    BinaryOp, Conv2d, Graph, Init, Op, OutputKind, Pool2d, ReduceOp, TensorType, UnaryOp, Value,
};
use dlc::model::{Model, Optimizer, Regularizer, TrainConfig};
use dlc::passes::{
    fusion, lower_with, memplan, optimize, try_optimize_with, verify::verify, KernelKind, Lowered,
    OptLevel,
};
use dlc::tensor::{DType, Data, Tensor};
use std::collections::BTreeMap;

// ---------- helpers ----------

fn input(g: &mut Graph, name: &str, shape: &[usize]) -> Value {
    g.add_leaf(
        Op::Input { name: name.into() },
        TensorType::f32(shape.to_vec()),
        None,
    )
}

fn labels(g: &mut Graph, name: &str, n: usize) -> Value {
    g.add_leaf(
        Op::Input { name: name.into() },
        TensorType::new(DType::I32, vec![n]),
        None,
    )
}

fn param(g: &mut Graph, name: &str, shape: &[usize]) -> Value {
    g.add_leaf(
        Op::Param {
            name: name.into(),
            init: Init::Zeros,
        },
        TensorType::f32(shape.to_vec()),
        None,
    )
}

fn fill(g: &mut Graph, value: f32, shape: &[usize]) -> Value {
    g.add(
        Op::Fill {
            value,
            shape: shape.to_vec(),
        },
        &[],
        None,
    )
    .unwrap()
}

fn un(g: &mut Graph, u: UnaryOp, x: Value) -> Value {
    g.add(Op::Unary(u), &[x], None).unwrap()
}

fn bin(g: &mut Graph, b: BinaryOp, x: Value, y: Value) -> Value {
    g.add(Op::Binary(b), &[x, y], None).unwrap()
}

fn op(g: &mut Graph, o: Op, ins: &[Value]) -> Value {
    g.add(o, ins, None).unwrap()
}

/// A small deterministic generator (xorshift) for feed values.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Random values for every leaf the graph is fed; i32 leaves get ids in
/// `0..2`, valid for every class count and vocabulary used here.
fn feeds(g: &Graph, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut f = BTreeMap::new();
    let mut leaves = g.inputs_by_name();
    leaves.extend(g.params());
    leaves.extend(g.states());
    for (name, v) in leaves {
        let t = g.ty(v);
        let n: usize = t.shape.iter().product();
        let tensor = match t.dtype {
            DType::F32 => Tensor::f32(t.shape.clone(), (0..n).map(|_| rng.next()).collect()),
            DType::I32 => Tensor::i32(t.shape.clone(), (0..n).map(|i| (i % 2) as i32).collect()),
        };
        f.insert(name, tensor);
    }
    f
}

fn values(t: &Tensor) -> Vec<f32> {
    match &t.data {
        Data::F32(v) => v.clone(),
        Data::I32(v) => v.iter().map(|x| *x as f32).collect(),
    }
}

/// Interpreter results of `a` and `b` agree: equal as IEEE values when
/// `rtol` is 0, else within `rtol` relative (with a tiny absolute floor).
fn assert_same(a: &Graph, b: &Graph, rtol: f32) {
    for seed in [1, 2] {
        let f = feeds(a, seed);
        let ra = run_f32(a, &f).expect("original graph runs");
        let rb = run_f32(b, &f).expect("optimised graph runs");
        assert_eq!(ra.keys().collect::<Vec<_>>(), rb.keys().collect::<Vec<_>>());
        for (name, ta) in &ra {
            let tb = &rb[name];
            assert_eq!(ta.shape, tb.shape, "output {name}");
            for (i, (x, y)) in values(ta).iter().zip(values(tb)).enumerate() {
                let ok = if rtol == 0.0 {
                    *x == y || (x.is_nan() && y.is_nan())
                } else {
                    (x - y).abs() <= 1e-6 + rtol * x.abs().max(y.abs())
                };
                assert!(ok, "output {name}[{i}]: {x} before vs {y} after");
            }
        }
    }
}

fn lower_checked(g: &Graph, level: OptLevel) -> Lowered {
    verify(g).expect("the input graph is valid");
    let l = lower_with(g, level, &verify).expect("lowering succeeds");
    memplan::check(&l.graph, &l.kernels, &l.plan).expect("the memory plan is sound");
    l
}

fn count(g: &Graph, pred: impl Fn(&Op) -> bool) -> usize {
    g.graph
        .node_indices()
        .filter(|n| pred(&g.node(*n).op))
        .count()
}

/// The kernel group containing the node that computes output `name`.
fn group_of<'a>(l: &'a Lowered, name: &str) -> &'a dlc::passes::KernelGroup {
    let v = l.graph.output(name).expect("named output").value;
    l.kernels
        .iter()
        .find(|k| k.nodes.contains(&v.node))
        .expect("every op is in a group")
}

fn ops_in(l: &Lowered, k: &dlc::passes::KernelGroup) -> Vec<&'static str> {
    k.nodes.iter().map(|n| l.graph.node(*n).op.name()).collect()
}

// ---------- simplify ----------

#[test]
fn exact_identities_fire_and_keep_values_bitwise() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[3, 4]);
    let one = fill(&mut g, 1.0, &[]);
    let zero = fill(&mut g, 0.0, &[]);
    let a = bin(&mut g, BinaryOp::Mul, x, one); // x·1 = x
    let b = bin(&mut g, BinaryOp::Add, a, zero); // x+0 = x
    let c = bin(&mut g, BinaryOp::Div, b, one); // x/1 = x
    let d = bin(&mut g, BinaryOp::Sub, c, zero); // x-0 = x
    let n1 = un(&mut g, UnaryOp::Neg, d);
    let n2 = un(&mut g, UnaryOp::Neg, n1); // -(-x) = x
    let t1 = op(&mut g, Op::Transpose { perm: vec![1, 0] }, &[n2]);
    let t2 = op(&mut g, Op::Transpose { perm: vec![1, 0] }, &[t1]); // transpose∘transpose = id
    let r1 = op(&mut g, Op::Reshape { shape: vec![12] }, &[t2]);
    let r2 = op(&mut g, Op::Reshape { shape: vec![3, 4] }, &[r1]); // reshape∘reshape back = id
    let e = op(&mut g, Op::Expand { shape: vec![3, 4] }, &[r2]); // expand to same shape = id
    let s = op(
        &mut g,
        Op::Slice {
            axis: 0,
            start: 0,
            end: 3,
        },
        &[e],
    ); // full slice = id
    let y = un(&mut g, UnaryOp::Exp, s);
    g.push_output("y", OutputKind::Output, y);

    let (opt, stats) = try_optimize_with(&g, OptLevel::O1, &verify).unwrap();
    assert_eq!(opt.op_count(), 1, "{}", dlc::ir::print::print(&opt));
    let algebra = stats.iter().find(|s| s.name == "algebra").unwrap();
    assert!(algebra.changes >= 8, "{stats:?}");
    assert_same(&g, &opt, 0.0);
}

#[test]
fn transpose_pair_composes_into_one_permutation() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[2, 3, 4]);
    let t1 = op(
        &mut g,
        Op::Transpose {
            perm: vec![1, 2, 0],
        },
        &[x],
    );
    let t2 = op(
        &mut g,
        Op::Transpose {
            perm: vec![0, 2, 1],
        },
        &[t1],
    );
    let y = un(&mut g, UnaryOp::Relu, t2);
    g.push_output("y", OutputKind::Output, y);
    let (opt, _) = try_optimize_with(&g, OptLevel::O1, &verify).unwrap();
    // x[2,3,4] -perm[1,2,0]-> [3,4,2] -perm[0,2,1]-> [3,2,4] = x -perm[1,0,2]->
    let perms: Vec<Vec<usize>> = opt
        .graph
        .node_indices()
        .filter_map(|n| match &opt.node(n).op {
            Op::Transpose { perm } => Some(perm.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(perms, vec![vec![1, 0, 2]]);
    assert_same(&g, &opt, 0.0);
}

#[test]
fn times_zero_folds_only_for_masks() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[5]);
    let zero = fill(&mut g, 0.0, &[]);
    // NaN·0 = NaN, so x·0 must stay
    let keep = bin(&mut g, BinaryOp::Mul, x, zero);
    let m = un(&mut g, UnaryOp::Step, x);
    let gone = bin(&mut g, BinaryOp::Mul, m, zero); // mask·0 = 0
    let y = bin(&mut g, BinaryOp::Add, keep, gone);
    g.push_output("y", OutputKind::Output, y);
    let (opt, _) = try_optimize_with(&g, OptLevel::O1, &verify).unwrap();
    assert_eq!(count(&opt, |o| matches!(o, Op::Unary(UnaryOp::Step))), 0);
    assert_eq!(count(&opt, |o| matches!(o, Op::Binary(BinaryOp::Mul))), 1);
    assert_same(&g, &opt, 0.0);

    let f = BTreeMap::from([(
        "x".to_string(),
        Tensor::f32(vec![5], vec![f32::NAN, 1.0, -2.0, f32::INFINITY, 0.0]),
    )]);
    let before = run_f32(&g, &f).unwrap();
    let after = run_f32(&opt, &f).unwrap();
    let (b, a) = (values(&before["y"]), values(&after["y"]));
    assert!(b[0].is_nan() && a[0].is_nan() && b[3].is_nan() && a[3].is_nan());
    assert_eq!(&b[1..3], &a[1..3]);
}

#[test]
fn fill_only_subgraphs_fold_to_one_fill() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[2, 3]);
    let two = fill(&mut g, 2.0, &[3]);
    let three = fill(&mut g, 3.0, &[2, 3]);
    let p = bin(&mut g, BinaryOp::Mul, two, three); // 6
    let s = op(
        &mut g,
        Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![0],
            keepdims: false,
        },
        &[p],
    ); // 12 each
    let l = un(&mut g, UnaryOp::Log, s);
    let y = bin(&mut g, BinaryOp::Add, x, l);
    g.push_output("y", OutputKind::Output, y);
    let (opt, _) = try_optimize_with(&g, OptLevel::O1, &verify).unwrap();
    assert_eq!(opt.op_count(), 1);
    let fills: Vec<f32> = opt
        .graph
        .node_indices()
        .filter_map(|n| match opt.node(n).op {
            Op::Fill { value, .. } => Some(value),
            _ => None,
        })
        .collect();
    assert_eq!(fills, vec![(12.0f64).ln() as f32]);
    assert_same(&g, &opt, 0.0);
}

#[test]
fn cse_merges_commuted_duplicates_and_dce_keeps_interface() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[4]);
    let w = input(&mut g, "w", &[4]);
    let _unused = input(&mut g, "unused", &[2]);
    let a = bin(&mut g, BinaryOp::Add, x, w);
    let b = bin(&mut g, BinaryOp::Add, w, x); // a + b = b + a
    let ea = un(&mut g, UnaryOp::Exp, a);
    let eb = un(&mut g, UnaryOp::Exp, b);
    let y = bin(&mut g, BinaryOp::Mul, ea, eb);
    let dead = un(&mut g, UnaryOp::Tanh, y);
    let _ = un(&mut g, UnaryOp::Sqrt, dead);
    g.push_output("y", OutputKind::Output, y);
    let (opt, stats) = try_optimize_with(&g, OptLevel::O1, &verify).unwrap();
    assert_eq!(opt.op_count(), 3, "{}", dlc::ir::print::print(&opt));
    assert!(opt.inputs_by_name().iter().any(|(n, _)| n == "unused"));
    let cse = stats.iter().find(|s| s.name == "cse").unwrap();
    assert_eq!(cse.changes, 2);
    assert_same(&g, &opt, 0.0);
}

#[test]
fn sum_of_expand_becomes_scaled_sum_at_o2_only() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[3, 1]);
    let e = op(
        &mut g,
        Op::Expand {
            shape: vec![2, 3, 5],
        },
        &[x],
    );
    let s = op(
        &mut g,
        Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![0, 2],
            keepdims: true,
        },
        &[e],
    );
    g.push_output("s", OutputKind::Output, s);
    let (o1, _) = try_optimize_with(&g, OptLevel::O1, &verify).unwrap();
    assert_eq!(count(&o1, |o| matches!(o, Op::Expand { .. })), 1);
    let (o2, _) = try_optimize_with(&g, OptLevel::O2, &verify).unwrap();
    assert_eq!(count(&o2, |o| matches!(o, Op::Expand { .. })), 0);
    assert!(o2.graph.node_indices().any(|n| o2.node(n).op
        == Op::Fill {
            value: 10.0,
            shape: vec![]
        }));
    assert_same(&g, &o2, 1e-6);
}

#[test]
fn step_reads_the_relu_so_the_preactivation_can_die() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[6]);
    let dy = input(&mut g, "dy", &[6]);
    let r = un(&mut g, UnaryOp::Relu, x);
    let s = un(&mut g, UnaryOp::Step, x);
    let dx = bin(&mut g, BinaryOp::Mul, dy, s);
    g.push_output("r", OutputKind::Output, r);
    g.push_output("dx", OutputKind::Output, dx);
    let (opt, _) = try_optimize_with(&g, OptLevel::O1, &verify).unwrap();
    let step = opt
        .graph
        .node_indices()
        .find(|n| opt.node(*n).op == Op::Unary(UnaryOp::Step))
        .unwrap();
    let src = opt.inputs(step)[0];
    assert_eq!(opt.node(src.node).op, Op::Unary(UnaryOp::Relu));
    let f = BTreeMap::from([
        (
            "x".to_string(),
            Tensor::f32(vec![6], vec![-1.0, 0.0, -0.0, 2.0, f32::NAN, 1e-30]),
        ),
        ("dy".to_string(), Tensor::f32(vec![6], vec![1.0; 6])),
    ]);
    let before = values(&run_f32(&g, &f).unwrap()["dx"]);
    let after = values(&run_f32(&opt, &f).unwrap()["dx"]);
    for (b, a) in before.iter().zip(&after) {
        assert!(
            b.to_bits() == a.to_bits() || (b.is_nan() && a.is_nan()),
            "{before:?} vs {after:?}"
        );
    }
}

#[test]
fn optimize_at_o0_changes_nothing() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[2]);
    let one = fill(&mut g, 1.0, &[]);
    let y = bin(&mut g, BinaryOp::Mul, x, one);
    g.push_output("y", OutputKind::Output, y);
    let (opt, stats) = optimize(&g, OptLevel::O0);
    assert!(stats.is_empty());
    assert_eq!(opt.op_count(), 1);
    let (opt, _) = optimize(&g, OptLevel::O1);
    assert_eq!(opt.op_count(), 0);
}

#[test]
fn verifier_rejects_a_wrong_recorded_type() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[2, 3]);
    let bad = g.add_node_unchecked(
        Op::Unary(UnaryOp::Exp),
        vec![TensorType::f32(vec![3, 2])],
        &[x],
        None,
    )[0];
    g.push_output("y", OutputKind::Output, bad);
    let e = verify(&g).unwrap_err();
    assert!(e.contains("records type f32[3, 2]"), "{e}");
}

// ---------- fusion ----------

/// `relu(x @ w + b)` then a second dense layer, softmax and cross-entropy.
fn mlp(n: usize, i: usize, h: usize, c: usize) -> Graph {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[n, i]);
    let y = labels(&mut g, "label", n);
    let w1 = param(&mut g, "l1.weight", &[i, h]);
    let b1 = param(&mut g, "l1.bias", &[h]);
    let w2 = param(&mut g, "l2.weight", &[h, c]);
    let b2 = param(&mut g, "l2.bias", &[c]);
    let m1 = op(&mut g, Op::MatMul, &[x, w1]);
    let a1 = bin(&mut g, BinaryOp::Add, m1, b1);
    let h1 = un(&mut g, UnaryOp::Relu, a1);
    let m2 = op(&mut g, Op::MatMul, &[h1, w2]);
    let logits = bin(&mut g, BinaryOp::Add, m2, b2);
    let probs = op(&mut g, Op::Softmax { axis: 1 }, &[logits]);
    let loss = op(&mut g, Op::CrossEntropy, &[logits, y]);
    g.push_output("hidden", OutputKind::Output, h1);
    g.push_output("probs", OutputKind::Output, probs);
    g.push_output("loss", OutputKind::Loss, loss);
    g
}

fn model(name: &str, g: Graph) -> Model {
    Model {
        name: name.into(),
        graph: g,
        dims: BTreeMap::new(),
        train: TrainConfig::default(),
    }
}

#[test]
fn matmul_bias_relu_is_one_kernel() {
    let g = mlp(4, 6, 5, 3);
    let l = lower_checked(&g, OptLevel::O2);
    let k = group_of(&l, "hidden");
    assert_eq!(k.kind, KernelKind::MatMul);
    assert_eq!(ops_in(&l, k), vec!["matmul", "add", "relu"]);
    assert_same(&g, &l.graph, 0.0);
}

#[test]
fn softmax_and_cross_entropy_share_one_kernel_forward_and_backward() {
    let g = mlp(4, 6, 5, 3);
    let l = lower_checked(&g, OptLevel::O2);
    let k = group_of(&l, "loss");
    assert_eq!(k.kind, KernelKind::Loss);
    assert!(ops_in(&l, k).contains(&"softmax"), "{:?}", ops_in(&l, k));

    let step = dlc::autodiff::training_step(
        &model("mlp", g),
        &Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.9,
        },
        None,
    )
    .unwrap();
    let l = lower_checked(&step, OptLevel::O2);
    let k = group_of(&l, "loss");
    let ops = ops_in(&l, k);
    assert!(
        ops.contains(&"cross_entropy") && ops.contains(&"cross_entropy_grad"),
        "{ops:?}"
    );
    assert_same(&step, &l.graph, 1e-6);
}

#[test]
fn optimizer_updates_fuse_with_their_gradient() {
    let g = mlp(4, 6, 5, 3);
    let step = dlc::autodiff::training_step(
        &model("mlp", g),
        &Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.9,
        },
        Some(Regularizer::L2(1e-3)),
    )
    .unwrap();
    let l = lower_checked(&step, OptLevel::O2);
    for p in ["l1.weight", "l2.weight"] {
        let k = group_of(&l, p);
        assert_eq!(k.kind, KernelKind::MatMul, "{p}: {:?}", ops_in(&l, k));
        let v = group_of(&l, &format!("opt.velocity.{p}"));
        assert_eq!(
            k, v,
            "the velocity and weight updates of {p} share a kernel"
        );
    }
    for p in ["l1.bias", "l2.bias"] {
        let k = group_of(&l, p);
        assert!(
            matches!(k.kind, KernelKind::Reduce | KernelKind::Loss),
            "{p}: {:?} {:?}",
            k.kind,
            ops_in(&l, k)
        );
    }
    assert_same(&step, &l.graph, 1e-6);
}

#[test]
fn conv_bias_relu_is_one_kernel() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[2, 3, 8, 8]);
    let w = param(&mut g, "c.weight", &[4, 3, 3, 3]);
    let b = param(&mut g, "c.bias", &[4]);
    let c = op(
        &mut g,
        Op::Conv(Conv2d {
            stride: 1,
            dilation: 1,
            pad: [1, 1, 1, 1],
        }),
        &[x, w],
    );
    let rb = op(
        &mut g,
        Op::Reshape {
            shape: vec![4, 1, 1],
        },
        &[b],
    );
    let a = bin(&mut g, BinaryOp::Add, c, rb);
    let r = un(&mut g, UnaryOp::Relu, a);
    let p = op(
        &mut g,
        Op::MaxPool(Pool2d {
            window: 2,
            stride: 2,
            pad: 0,
        }),
        &[r],
    );
    g.push_output("p", OutputKind::Output, p);
    let l = lower_checked(&g, OptLevel::O2);
    let conv = l
        .kernels
        .iter()
        .find(|k| k.kind == KernelKind::Conv)
        .unwrap();
    let mut ops = ops_in(&l, conv);
    ops.sort_unstable();
    assert_eq!(ops, vec!["add", "conv", "relu", "reshape"]);
    assert_eq!(l.kernels.len(), 2);
    assert_same(&g, &l.graph, 0.0);
}

/// `layer_norm(x)·gamma + beta` over the last axis, as std.dl writes it.
fn layer_norm(g: &mut Graph, x: Value, d: usize) -> Value {
    let rank = g.ty(x).shape.len();
    let mean = |g: &mut Graph, v: Value| {
        op(
            g,
            Op::Reduce {
                op: ReduceOp::Mean,
                axes: vec![rank - 1],
                keepdims: true,
            },
            &[v],
        )
    };
    let gamma = param(g, "ln.gamma", &[d]);
    let beta = param(g, "ln.beta", &[d]);
    let m = mean(g, x);
    let c = bin(g, BinaryOp::Sub, x, m);
    let sq = bin(g, BinaryOp::Mul, c, c);
    let var = mean(g, sq);
    let eps = fill(g, 1e-5, &[]);
    let ve = bin(g, BinaryOp::Add, var, eps);
    let sd = un(g, UnaryOp::Sqrt, ve);
    let nx = bin(g, BinaryOp::Div, c, sd);
    let sc = bin(g, BinaryOp::Mul, nx, gamma);
    bin(g, BinaryOp::Add, sc, beta)
}

#[test]
fn layer_norm_is_one_kernel() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[2, 5, 8]);
    let y = layer_norm(&mut g, x, 8);
    g.push_output("y", OutputKind::Output, y);
    let l = lower_checked(&g, OptLevel::O2);
    assert_eq!(
        l.kernels.len(),
        1,
        "{}",
        fusion::print_kernels(&l.graph, &l.kernels)
    );
    assert_eq!(l.kernels[0].kind, KernelKind::Row);
    assert_eq!(l.kernels[0].nodes.len(), l.graph.op_count());
    assert_same(&g, &l.graph, 0.0);
}

#[test]
fn a_value_read_outside_its_group_is_materialised() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[4, 4]);
    let w = param(&mut g, "w", &[4, 4]);
    let m = op(&mut g, Op::MatMul, &[x, w]);
    let r = un(&mut g, UnaryOp::Relu, m);
    let t = op(&mut g, Op::Transpose { perm: vec![1, 0] }, &[r]);
    let m2 = op(&mut g, Op::MatMul, &[t, r]);
    g.push_output("y", OutputKind::Output, m2);
    let l = lower_checked(&g, OptLevel::O2);
    let first = &l.kernels[0];
    let relu = l
        .graph
        .graph
        .node_indices()
        .find(|n| l.graph.node(*n).op == Op::Unary(UnaryOp::Relu))
        .unwrap();
    assert!(first.nodes.contains(&relu));
    assert_eq!(first.outputs(&l.graph), vec![Value::new(relu)]);
    assert!(l.plan.buffer(Value::new(relu)).is_some());
    // the matmul result lives only inside its kernel
    assert!(l.plan.buffer(Value::new(first.anchor.unwrap())).is_none());
    assert_same(&g, &l.graph, 0.0);
}

// ---------- memory plan ----------

#[test]
fn elementwise_chain_reuses_its_operand_in_place() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[64]);
    let w = param(&mut g, "w", &[64, 64]);
    let xm = op(&mut g, Op::Reshape { shape: vec![1, 64] }, &[x]);
    let mut v = op(&mut g, Op::MatMul, &[xm, w]);
    // each softmax is an anchor; the exp between them is a loop that can
    // overwrite the softmax result it is the last reader of
    for _ in 0..3 {
        let s = op(&mut g, Op::Softmax { axis: 1 }, &[v]);
        let t = op(&mut g, Op::Transpose { perm: vec![1, 0] }, &[s]);
        let e = un(&mut g, UnaryOp::Exp, s);
        let u = op(&mut g, Op::MatMul, &[e, t]);
        v = op(&mut g, Op::MatMul, &[u, e]);
    }
    g.push_output("y", OutputKind::Output, v);
    let l = lower_checked(&g, OptLevel::O2);
    assert!(l.plan.peak_bytes <= l.plan.arena_bytes);
    assert!(l.plan.arena_bytes < l.plan.naive_bytes);
    assert_same(&g, &l.graph, 0.0);
}

#[test]
fn in_place_reuse_shares_the_dying_operand() {
    let mut g = Graph::new();
    let a = input(&mut g, "a", &[8, 8]);
    let b = input(&mut g, "b", &[8, 8]);
    let m = op(&mut g, Op::MatMul, &[a, b]);
    let s = op(
        &mut g,
        Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![0],
            keepdims: true,
        },
        &[m],
    );
    // the loop m·s must follow the reduction, so it is the last reader of m
    // and may overwrite it; two matmuls read its result, so it is stored
    let e = bin(&mut g, BinaryOp::Mul, m, s);
    let t1 = op(&mut g, Op::MatMul, &[e, b]);
    let t2 = op(&mut g, Op::MatMul, &[b, e]);
    g.push_output("s", OutputKind::Output, s);
    g.push_output("t1", OutputKind::Output, t1);
    g.push_output("t2", OutputKind::Output, t2);
    let l = lower_checked(&g, OptLevel::O2);
    let reused: Vec<_> = l
        .plan
        .buffers
        .iter()
        .filter(|b| b.inplace_of.is_some())
        .collect();
    assert_eq!(
        reused.len(),
        1,
        "{}",
        memplan::print_plan(&l.graph, &l.kernels, &l.plan)
    );
    let src = l.plan.buffer(reused[0].inplace_of.unwrap()).unwrap();
    assert_eq!(src.offset, reused[0].offset);
    assert_eq!(l.plan.arena_bytes, 256);
    assert_same(&g, &l.graph, 0.0);
}

#[test]
fn checker_rejects_overlapping_live_buffers() {
    let g = mlp(8, 16, 32, 4);
    let step = dlc::autodiff::training_step(
        &model("mlp", g),
        &Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.0,
        },
        None,
    )
    .unwrap();
    let l = lower_checked(&step, OptLevel::O2);
    let mut bad = l.plan.clone();
    // find two buffers live at once and put them at the same offset
    let pair = (0..bad.buffers.len()).find_map(|i| {
        (i + 1..bad.buffers.len()).find_map(|j| {
            let (a, b) = (&bad.buffers[i], &bad.buffers[j]);
            (a.def <= b.last_use
                && b.def <= a.last_use
                && a.inplace_of.is_none()
                && b.inplace_of.is_none())
            .then_some((i, j))
        })
    });
    let (i, j) = pair.expect("a training step has two buffers live at once");
    bad.buffers[j].offset = bad.buffers[i].offset;
    bad.arena_bytes = bad
        .arena_bytes
        .max(bad.buffers[j].offset + bad.buffers[j].bytes);
    let e = memplan::check(&l.graph, &l.kernels, &bad).unwrap_err();
    assert!(e.contains("overlap"), "{e}");

    let mut late = l.plan.clone();
    let k = late
        .buffers
        .iter()
        .position(|b| b.last_use > b.def)
        .unwrap();
    late.buffers[k].last_use = late.buffers[k].def;
    assert!(memplan::check(&l.graph, &l.kernels, &late).is_err());
}

/// LeNet as the language reference writes it, built op by op.
fn lenet(n: usize) -> Graph {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[n, 1, 28, 28]);
    let y = labels(&mut g, "label", n);
    let conv = |g: &mut Graph, x: Value, name: &str, cin: usize, cout: usize, pad: usize| {
        let w = param(g, &format!("{name}.weight"), &[cout, cin, 5, 5]);
        let b = param(g, &format!("{name}.bias"), &[cout]);
        let c = op(
            g,
            Op::Conv(Conv2d {
                stride: 1,
                dilation: 1,
                pad: [pad; 4],
            }),
            &[x, w],
        );
        let rb = op(
            g,
            Op::Reshape {
                shape: vec![cout, 1, 1],
            },
            &[b],
        );
        let a = bin(g, BinaryOp::Add, c, rb);
        let r = un(g, UnaryOp::Relu, a);
        op(
            g,
            Op::MaxPool(Pool2d {
                window: 2,
                stride: 2,
                pad: 0,
            }),
            &[r],
        )
    };
    let dense = |g: &mut Graph, x: Value, name: &str, i: usize, o: usize, relu: bool| {
        let w = param(g, &format!("{name}.weight"), &[i, o]);
        let b = param(g, &format!("{name}.bias"), &[o]);
        let m = op(g, Op::MatMul, &[x, w]);
        let a = bin(g, BinaryOp::Add, m, b);
        if relu {
            un(g, UnaryOp::Relu, a)
        } else {
            a
        }
    };
    let c1 = conv(&mut g, x, "c1", 1, 6, 2);
    let c2 = conv(&mut g, c1, "c2", 6, 16, 0);
    let flat = op(
        &mut g,
        Op::Reshape {
            shape: vec![n, 400],
        },
        &[c2],
    );
    let f1 = dense(&mut g, flat, "f1", 400, 120, true);
    let f2 = dense(&mut g, f1, "f2", 120, 84, true);
    let logits = dense(&mut g, f2, "logits", 84, 10, false);
    let probs = op(&mut g, Op::Softmax { axis: 1 }, &[logits]);
    let loss = op(&mut g, Op::CrossEntropy, &[logits, y]);
    g.push_output("probs", OutputKind::Output, probs);
    g.push_output("loss", OutputKind::Loss, loss);
    g
}

#[test]
fn lenet_training_step_fuses_to_at_most_40_percent_kernels() {
    let step = dlc::autodiff::training_step(
        &model("lenet", lenet(4)),
        &Optimizer::Sgd {
            lr: 0.05,
            momentum: 0.9,
        },
        Some(Regularizer::L2(5e-4)),
    )
    .unwrap();
    let prim = step.op_count();
    let l = lower_checked(&step, OptLevel::O2);
    let ratio = l.kernels.len() as f64 / prim as f64;
    assert!(
        ratio <= 0.40,
        "{} kernels for {prim} ops ({ratio:.2})\n{}",
        l.kernels.len(),
        fusion::print_kernels(&l.graph, &l.kernels)
    );
    assert!(l.plan.arena_bytes as f64 <= 1.10 * l.plan.peak_bytes as f64);
    assert!(l.plan.arena_bytes * 2 <= l.plan.naive_bytes);
    assert_same(&step, &l.graph, 1e-6);
}

#[test]
fn o0_and_o1_give_one_kernel_per_op() {
    let g = mlp(4, 6, 5, 3);
    for level in [OptLevel::O0, OptLevel::O1] {
        let l = lower_checked(&g, level);
        assert_eq!(l.kernels.len(), l.graph.op_count());
    }
}

// ---------- whole models through the front end ----------

use dlc::diag::SourceMap;
use dlc::elab::{elaborate, ElabOptions};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn elab(
    path: &Path,
    model: Option<String>,
    dims: &[(&str, usize)],
    shapes: BTreeMap<String, Vec<usize>>,
) -> Model {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut sm = SourceMap::default();
    let file = sm.add(path.display().to_string(), text);
    let opts = ElabOptions {
        model,
        dims: dims.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        input_shapes: shapes,
    };
    match elaborate(&mut sm, file, &opts) {
        Ok(e) => e.model,
        Err(d) => panic!("{}: {:?}", path.display(), d),
    }
}

/// The graphs a model is compiled as: forward, forward with gradients, and
/// training steps with sgd + momentum + l2 and (when `adam`) adam + l1.
fn variants(m: &Model, adam: bool) -> Vec<(String, Graph)> {
    let mut out = vec![("forward".to_string(), m.graph.clone())];
    if m.graph.output("loss").is_some() {
        out.push((
            "with_gradients".into(),
            dlc::autodiff::with_gradients(m).expect("gradients build"),
        ));
        let sgd = Optimizer::Sgd {
            lr: 0.01,
            momentum: 0.9,
        };
        out.push((
            "train sgd".into(),
            dlc::autodiff::training_step(m, &sgd, Some(Regularizer::L2(1e-4)))
                .expect("training step builds"),
        ));
        let opt = Optimizer::Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        if !adam {
            return out;
        }
        out.push((
            "train adam".into(),
            dlc::autodiff::training_step(m, &opt, Some(Regularizer::L1(1e-4)))
                .expect("training step builds"),
        ));
    }
    out
}

/// Optimise at O1 (results equal as values) and O2 (1e-6 relative), with the
/// verifier after every pass and the plan checked.
fn check_model(label: &str, m: &Model, known: &BTreeMap<String, Tensor>, adam: bool) {
    for (what, g) in variants(m, adam) {
        verify(&g).unwrap_or_else(|e| panic!("{label} {what}: the input graph is invalid: {e}"));
        let mut f = feeds(&g, 7);
        for (k, t) in known {
            if f.get(k)
                .is_some_and(|x| x.shape == t.shape && x.dtype() == t.dtype())
            {
                f.insert(k.clone(), t.clone());
            }
        }
        let before = run_f32(&g, &f).unwrap_or_else(|e| panic!("{label} {what}: original: {e}"));
        for (level, rtol) in [(OptLevel::O1, 0.0), (OptLevel::O2, 1e-6)] {
            let label = format!("{label} {what} {level:?}");
            let l = lower_with(&g, level, &verify).unwrap_or_else(|e| panic!("{label}: {e}"));
            memplan::check(&l.graph, &l.kernels, &l.plan)
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let after = run_f32(&l.graph, &f).unwrap_or_else(|e| panic!("{label}: optimised: {e}"));
            assert_close(&before, &after, rtol, &label);
        }
    }
}

fn assert_close(
    ra: &BTreeMap<String, Tensor>,
    rb: &BTreeMap<String, Tensor>,
    rtol: f32,
    label: &str,
) {
    assert_eq!(
        ra.keys().collect::<Vec<_>>(),
        rb.keys().collect::<Vec<_>>(),
        "{label}"
    );
    for (name, ta) in ra {
        let tb = &rb[name];
        assert_eq!(ta.shape, tb.shape, "{label}: output {name}");
        let (va, vb) = (values(ta), values(tb));
        let scale = va.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (i, (x, y)) in va.iter().zip(&vb).enumerate() {
            let ok = if rtol == 0.0 {
                x == y || (x.is_nan() && y.is_nan())
            } else {
                // relative to the output's magnitude: a sum reordered near a
                // cancellation moves by ulps of its terms, not of its result
                (x - y).abs() <= rtol * x.abs().max(y.abs()).max(scale) + 1e-30
                    || (x.is_nan() && y.is_nan())
            };
            assert!(ok, "{label}: output {name}[{i}]: {x} before vs {y} after");
        }
    }
}

#[test]
fn example_models_keep_their_results() {
    let dir = root().join("lang/examples");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "dl") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut sm = SourceMap::default();
        let file = sm.add("m.dl", text);
        for name in dlc::elab::model_names(&sm, file) {
            // small sizes keep the interpreter quick; symbols a model lacks are ignored
            let dims = [("N", 2), ("T", 5), ("M", 8), ("K", 8), ("P", 8)];
            let m = elab(&path, Some(name.clone()), &dims, BTreeMap::new());
            check_model(
                &format!("{} {name}", path.display()),
                &m,
                &BTreeMap::new(),
                false,
            );
            n += 1;
        }
    }
    assert!(n >= 7, "only {n} example models found");
}

/// Every golden case folder below `dir` (one holding a model.dl).
fn golden_cases(dir: &Path, out: &mut Vec<PathBuf>) {
    if dir.join("model.dl").exists() {
        out.push(dir.to_path_buf());
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut subs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    subs.sort();
    for s in subs {
        golden_cases(&s, out);
    }
}

#[test]
fn golden_models_keep_their_results() {
    let mut cases = Vec::new();
    golden_cases(&root().join("tests/golden"), &mut cases);
    assert!(cases.len() >= 40, "found {} golden cases", cases.len());
    for case in cases {
        let mut known = dlc::io::read_tensors(&case.join("inputs.safetensors")).unwrap();
        let shapes = known
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect();
        if let Ok(p) = dlc::io::read_tensors(&case.join("params.safetensors")) {
            known.extend(p);
        }
        let model = std::fs::read_to_string(case.join("case.toml"))
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok())
            .and_then(|t| t.get("model").and_then(|m| m.as_str()).map(String::from));
        let m = elab(&case.join("model.dl"), model, &[], shapes);
        let known: BTreeMap<String, Tensor> = known.into_iter().collect();
        check_model(&case.display().to_string(), &m, &known, true);
    }
}

/// The reference workloads' training steps (bench/workloads/README sizes,
/// sgd with momentum 0.9, no regulariser): the planned arena is within 10%
/// of the schedule's peak, at most half of one buffer per intermediate, and
/// below the temp bytes XLA plans for the same step on this machine.
#[test]
fn workload_training_steps_fit_in_planned_memory() {
    type Workload<'a> = (&'a str, &'a [(&'a str, usize)], f64);
    let cases: [Workload; 6] = [
        ("mlp", &[("N", 64)], 0.87e6),
        ("lenet", &[("N", 32)], 6.3e6),
        ("vgg", &[("N", 16)], 28.1e6),
        ("lstm", &[("N", 16), ("T", 32)], 6.9e6),
        ("gru", &[("N", 16), ("T", 32)], 5.4e6),
        ("transformer", &[("N", 8), ("T", 64)], 8.9e6),
    ];
    let sgd = Optimizer::Sgd {
        lr: 0.01,
        momentum: 0.9,
    };
    println!(
        "{:<12} {:>6} {:>8} {:>12} {:>12} {:>12} {:>12} {:>7}",
        "workload",
        "ops",
        "kernels",
        "peak_bytes",
        "arena_bytes",
        "naive_bytes",
        "xla_bytes",
        "arena/naive"
    );
    for (name, dims, xla) in cases {
        let m = elab(
            &root().join(format!("lang/examples/{name}.dl")),
            None,
            dims,
            BTreeMap::new(),
        );
        let step = dlc::autodiff::training_step(&m, &sgd, None).unwrap();
        let l = lower_checked(&step, OptLevel::O2);
        let p = &l.plan;
        println!(
            "{:<12} {:>6} {:>8} {:>12} {:>12} {:>12} {:>12} {:>7.3}",
            name,
            step.op_count(),
            l.kernels.len(),
            p.peak_bytes,
            p.arena_bytes,
            p.naive_bytes,
            xla as usize,
            p.arena_bytes as f64 / p.naive_bytes as f64
        );
        assert!(p.peak_bytes <= p.arena_bytes, "{name}");
        assert!(
            p.arena_bytes as f64 <= 1.10 * p.peak_bytes as f64,
            "{name}: arena {} vs peak {}",
            p.arena_bytes,
            p.peak_bytes
        );
        assert!(
            p.arena_bytes * 2 <= p.naive_bytes,
            "{name}: arena {} vs naive {}",
            p.arena_bytes,
            p.naive_bytes
        );
        assert!(
            (p.arena_bytes as f64) < xla,
            "{name}: arena {} vs XLA {xla}",
            p.arena_bytes
        );
    }
}

// ---------- filetests ----------

/// `tests/filetests/NAME.dl` is compiled at O2 and printed as `NAME.opt-ir`
/// (the optimised graph) and `NAME.kernels` (the kernel groups), compared
/// with the sibling files; `BLESS=1` rewrites them. A `# filetest: grad` or
/// `# filetest: train` line compiles the gradient graph or the training step
/// (sgd, momentum 0.9) instead of the forward graph. Results are also
/// checked against the interpreter.
#[test]
fn filetests() {
    let dir = root().join("tests/filetests");
    let bless = std::env::var("BLESS").is_ok_and(|v| v == "1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "dl"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "only {} filetests", files.len());
    let mut failures = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let mode = text
            .lines()
            .find_map(|l| l.strip_prefix("# filetest:"))
            .map(|m| m.trim().to_string())
            .unwrap_or_default();
        let m = elab(&path, None, &[], BTreeMap::new());
        let g = match mode.as_str() {
            "grad" => dlc::autodiff::with_gradients(&m).unwrap(),
            "train" => dlc::autodiff::training_step(
                &m,
                &Optimizer::Sgd {
                    lr: 0.1,
                    momentum: 0.9,
                },
                None,
            )
            .unwrap(),
            "" => m.graph.clone(),
            other => panic!("{}: unknown filetest mode '{other}'", path.display()),
        };
        let l = lower_checked(&g, OptLevel::O2);
        let f = feeds(&g, 3);
        let before = run_f32(&g, &f).unwrap();
        let after = run_f32(&l.graph, &f).unwrap();
        assert_close(&before, &after, 1e-6, &path.display().to_string());
        for (ext, got) in [
            ("opt-ir", dlc::ir::print::print(&l.graph)),
            ("kernels", fusion::print_kernels(&l.graph, &l.kernels)),
        ] {
            let expected_path = path.with_extension(ext);
            if bless {
                std::fs::write(&expected_path, &got).unwrap();
                continue;
            }
            let want = std::fs::read_to_string(&expected_path).unwrap_or_default();
            if want != got {
                failures.push(format!(
                    "{} differs (run with BLESS=1 to accept):\n--- expected\n{want}--- got\n{got}",
                    expected_path.display()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------- edge cases ----------

#[test]
fn leaves_constants_and_repeated_values_as_outputs() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[3]);
    let c = fill(&mut g, 2.5, &[2]);
    let e = un(&mut g, UnaryOp::Exp, x);
    g.push_output("x_again", OutputKind::Output, x);
    g.push_output("constant", OutputKind::Output, c);
    g.push_output("e1", OutputKind::Output, e);
    g.push_output("e2", OutputKind::Output, e);
    let l = lower_checked(&g, OptLevel::O2);
    // the named constant is written by a kernel of its own; nothing is in the arena
    assert_eq!(l.kernels.len(), 2);
    assert!(l.plan.buffers.is_empty());
    assert_eq!(l.plan.arena_bytes, 0);
    assert_same(&g, &l.graph, 0.0);
    assert!(
        l.summary().contains("kernels 2 for 1 ops"),
        "{}",
        l.summary()
    );
}

#[test]
fn lowering_rejects_an_invalid_graph_with_an_error() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[2, 3]);
    let w = input(&mut g, "w", &[4, 5]);
    let bad = g.add_node_unchecked(Op::MatMul, vec![TensorType::f32(vec![2, 5])], &[x, w], None)[0];
    g.push_output("y", OutputKind::Output, bad);
    let e = dlc::passes::lower(&g, OptLevel::O2).unwrap_err();
    assert!(e.to_string().contains("inner dimensions differ"), "{e}");
    // optimize keeps the graph as it was rather than fail
    let (same, _) = optimize(&g, OptLevel::O2);
    assert_eq!(same.op_count(), 1);
}

#[test]
fn an_unused_result_of_a_multi_result_op_gets_scratch_space() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[2, 3, 4]);
    let wx = param(&mut g, "wx", &[4, 8]);
    let wh = param(&mut g, "wh", &[2, 8]);
    let b = param(&mut g, "b", &[8]);
    let dh = input(&mut g, "dh", &[2, 3, 2]);
    let grads = g
        .add_multi(Op::LstmSeqGrad, &[x, wx, wh, b, dh], None)
        .unwrap();
    let one = fill(&mut g, 0.5, &[]);
    let upd = bin(&mut g, BinaryOp::Mul, grads[1], one);
    g.push_output("dwx", OutputKind::Output, upd);
    g.push_output("db", OutputKind::Output, grads[3]);
    let l = lower_checked(&g, OptLevel::O2);
    assert_eq!(l.kernels.len(), 1);
    let scratch: Vec<u16> = l.plan.buffers.iter().map(|b| b.value.port).collect();
    // dx (port 0) and dw_h (port 2) are written but never read
    assert_eq!(scratch, vec![0, 2]);
    assert_same(&g, &l.graph, 0.0);
}

#[test]
fn a_stored_reshape_views_its_operand_and_shares_its_bytes() {
    let mut g = Graph::new();
    let a = input(&mut g, "a", &[4, 6]);
    let w = input(&mut g, "w", &[6, 6]);
    let v = input(&mut g, "v", &[2, 12]);
    let m = op(&mut g, Op::MatMul, &[a, w]); // [4, 6], read by two kernels below
    let r = op(&mut g, Op::Reshape { shape: vec![2, 12] }, &[m]);
    let s = op(
        &mut g,
        Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![0],
            keepdims: false,
        },
        &[r],
    );
    let t = op(&mut g, Op::Transpose { perm: vec![1, 0] }, &[r]);
    let u = op(&mut g, Op::MatMul, &[t, v]);
    let n = op(&mut g, Op::MatMul, &[m, w]);
    g.push_output("s", OutputKind::Output, s);
    g.push_output("u", OutputKind::Output, u);
    g.push_output("n", OutputKind::Output, n);
    let l = lower_checked(&g, OptLevel::O2);
    let view = l
        .plan
        .buffers
        .iter()
        .find(|b| b.view_of.is_some())
        .unwrap_or_else(|| panic!("{}", memplan::print_plan(&l.graph, &l.kernels, &l.plan)));
    let src = l.plan.buffer(view.view_of.unwrap()).unwrap();
    assert_eq!((view.offset, view.bytes), (src.offset, src.bytes));
    // 96 bytes, once: the view costs nothing
    assert_eq!(l.plan.arena_bytes, 96);
    assert_eq!(l.plan.peak_bytes, 96);

    // without the view mark, the shared bytes are an overlap
    let mut bad = l.plan.clone();
    let vi = bad
        .buffers
        .iter()
        .position(|b| b.view_of.is_some())
        .unwrap();
    bad.buffers[vi].view_of = None;
    assert!(memplan::check(&l.graph, &l.kernels, &bad)
        .unwrap_err()
        .contains("overlap"));
    assert_same(&g, &l.graph, 0.0);
}

/// Random DAGs of elementwise, layout, matmul, row and reduction ops over
/// `[4, 4]` values: every lowering verifies, its plan checks, and the
/// optimised graph computes the same outputs.
#[test]
fn random_graphs_lower_soundly() {
    let mut rng = Rng(0x5eed);
    let mut pick = |n: usize| ((rng.next() + 1.0) * 0.5 * n as f32) as usize % n;
    for case in 0..300 {
        let mut g = Graph::new();
        let mut vals: Vec<Value> = vec![input(&mut g, "a", &[4, 4]), input(&mut g, "b", &[4, 4])];
        for _ in 0..(8 + case % 20) {
            let x = vals[pick(vals.len())];
            let y = vals[pick(vals.len())];
            let v = match pick(10) {
                0 => un(
                    &mut g,
                    [UnaryOp::Tanh, UnaryOp::Relu, UnaryOp::Neg, UnaryOp::Step][pick(4)],
                    x,
                ),
                1 | 2 => bin(
                    &mut g,
                    [
                        BinaryOp::Add,
                        BinaryOp::Mul,
                        BinaryOp::Sub,
                        BinaryOp::Maximum,
                    ][pick(4)],
                    x,
                    y,
                ),
                3 => op(&mut g, Op::MatMul, &[x, y]),
                4 => op(&mut g, Op::Transpose { perm: vec![1, 0] }, &[x]),
                5 => {
                    let r = op(&mut g, Op::Reshape { shape: vec![2, 8] }, &[x]);
                    op(&mut g, Op::Reshape { shape: vec![4, 4] }, &[r])
                }
                6 => op(&mut g, Op::Softmax { axis: 1 }, &[x]),
                7 => {
                    let axis = pick(2);
                    let s = op(
                        &mut g,
                        Op::Reduce {
                            op: [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max][pick(3)],
                            axes: vec![axis],
                            keepdims: true,
                        },
                        &[x],
                    );
                    bin(&mut g, BinaryOp::Sub, y, s)
                }
                8 => {
                    let one = fill(&mut g, 1.0, &[]);
                    bin(&mut g, BinaryOp::Mul, x, one)
                }
                _ => {
                    let e = op(
                        &mut g,
                        Op::Expand {
                            shape: vec![2, 4, 4],
                        },
                        &[x],
                    );
                    op(
                        &mut g,
                        Op::Reduce {
                            op: ReduceOp::Sum,
                            axes: vec![0],
                            keepdims: false,
                        },
                        &[e],
                    )
                }
            };
            vals.push(v);
        }
        let outs = 1 + pick(3);
        for i in 0..outs {
            let v = vals[vals.len() - 1 - pick(vals.len().min(6))];
            if !g.outputs.iter().any(|o| o.value == v) {
                g.push_output(format!("o{i}"), OutputKind::Output, v);
            }
        }
        for level in [OptLevel::O0, OptLevel::O1, OptLevel::O2] {
            let l = lower_checked(&g, level);
            let f = feeds(&g, case as u64 + 11);
            let before = run_f32(&g, &f).unwrap();
            let after = run_f32(&l.graph, &f).unwrap();
            let rtol = if level == OptLevel::O2 { 1e-6 } else { 0.0 };
            assert_close(
                &before,
                &after,
                rtol,
                &format!("case {case} {level:?}\n{}", dlc::ir::print::print(&g)),
            );
        }
    }
}
