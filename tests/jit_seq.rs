//! Differential tests for the compiled sequence ops (LSTM, GRU, attention
//! and their gradients): the JIT against the reference interpreter on
//! random shape sets, bitwise-equal results for 1, 2 and 3 threads, and no
//! op left to the interpreter; and the shape of the recurrent and attention
//! kernels' register-blocked loops in the generated code.

use dlc::codegen::{self, JitOptions};
use dlc::interp;
use dlc::ir::{BinaryOp, Graph, Op, OutputKind, TensorType, Value};
use dlc::tensor::{numel, Tensor};
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
    /// Uniform in [-scale, scale).
    fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let data = (0..numel(shape))
            .map(|_| ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
            .collect();
        Tensor::f32(shape.to_vec(), data)
    }
}

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

    /// Add `op` and expose every result as an output `name0`, `name1`, …
    fn op(&mut self, name: &str, op: Op, ins: &[Value]) {
        let vs = self
            .g
            .add_multi(op, ins, None)
            .expect("test graphs are well-typed");
        for (i, v) in vs.into_iter().enumerate() {
            self.g
                .push_output(format!("{name}{i}"), OutputKind::Output, v);
        }
    }

    /// JIT vs interpreter within `atol + rtol·|expected|`, bitwise equality
    /// across 1, 2 and 3 threads, and every kernel compiled.
    fn check(&self, rtol: f32, atol: f32) {
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
                let (gv, wv) = (g.as_f32().expect("f32"), w.as_f32().expect("f32"));
                for (i, (a, e)) in gv.iter().zip(wv).enumerate() {
                    assert!(
                        (a - e).abs() <= atol + rtol * e.abs(),
                        "{name}[{i}] (threads={threads}): jit {a} vs interp {e}"
                    );
                }
            }
            match &first {
                None => first = Some(got),
                Some(f) => {
                    for (name, t) in f {
                        let bits = |t: &Tensor| -> Vec<u32> {
                            t.as_f32()
                                .unwrap_or(&[])
                                .iter()
                                .map(|x| x.to_bits())
                                .collect()
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

/// (N, T, F, H): T = 1, H not a multiple of 4, a single batch row; two
/// blocks of batch rows run in one call (N = 9, a small loop); three
/// blocks split over threads, the last one short with a short last tile
/// (N = 19, enough work to split). Hidden sizes that are multiples of 4
/// take the row epilogues over groups of blocks: a whole group and a
/// short one (H = 20), and a whole group with a short last row block (N =
/// 10, H = 16).
const RNN_SHAPES: [(usize, usize, usize, usize); 9] = [
    (2, 5, 3, 7),
    (1, 1, 4, 5),
    (3, 4, 6, 9),
    (1, 6, 1, 13),
    (4, 3, 5, 8),
    (9, 3, 2, 5),
    (19, 9, 5, 27),
    (3, 4, 5, 20),
    (10, 3, 6, 16),
];

/// A recurrent case: `x`, weights of `gates` blocks, and with `grad` an
/// incoming `dh`.
fn rnn_case(
    rng: &mut Rng,
    (n, t, f, h): (usize, usize, usize, usize),
    gates: usize,
    op: Op,
    grad: bool,
) -> Case {
    let mut c = Case::new();
    let x = c.input("x", rng.tensor(&[n, t, f], 1.0));
    let wx = c.input("wx", rng.tensor(&[f, gates * h], 0.6));
    let wh = c.input("wh", rng.tensor(&[h, gates * h], 0.6));
    let b = c.input("b", rng.tensor(&[gates * h], 0.3));
    let mut ins = vec![x, wx, wh, b];
    if grad {
        ins.push(c.input("dh", rng.tensor(&[n, t, h], 1.0)));
    }
    c.op("y", op, &ins);
    c
}

#[test]
fn lstm_seq_matches_interpreter() {
    let mut rng = Rng(11);
    for s in RNN_SHAPES {
        rnn_case(&mut rng, s, 4, Op::LstmSeq, false).check(1e-5, 1e-6);
    }
}

#[test]
fn lstm_seq_grad_matches_interpreter() {
    let mut rng = Rng(12);
    for s in RNN_SHAPES {
        rnn_case(&mut rng, s, 4, Op::LstmSeqGrad, true).check(1e-4, 1e-5);
    }
}

#[test]
fn gru_seq_matches_interpreter() {
    let mut rng = Rng(13);
    for s in RNN_SHAPES {
        rnn_case(&mut rng, s, 3, Op::GruSeq, false).check(1e-5, 1e-6);
    }
}

#[test]
fn gru_seq_grad_matches_interpreter() {
    let mut rng = Rng(14);
    for s in RNN_SHAPES {
        rnn_case(&mut rng, s, 3, Op::GruSeqGrad, true).check(1e-4, 1e-5);
    }
}

/// (leading dims, Tq, Tk, d, dv, causal): heads as leading dims, no leading
/// dims, Tq ≠ Tk, a single query.
type AttnShape = (&'static [usize], usize, usize, usize, usize, bool);
const ATTN_SHAPES: [AttnShape; 6] = [
    (&[2, 3], 5, 7, 6, 3, false),
    (&[], 4, 4, 8, 5, true),
    (&[3], 6, 6, 3, 9, true),
    (&[1, 2], 1, 9, 4, 4, false),
    (&[2], 9, 2, 5, 7, false),
    (&[2, 2], 1, 1, 1, 1, true),
];

fn attn_case(rng: &mut Rng, (lead, tq, tk, d, dv, causal): AttnShape, grad: bool) -> Case {
    let shape = |a: usize, b: usize| [lead, &[a, b]].concat();
    let mut c = Case::new();
    let q = c.input("q", rng.tensor(&shape(tq, d), 1.0));
    let k = c.input("k", rng.tensor(&shape(tk, d), 1.0));
    let v = c.input("v", rng.tensor(&shape(tk, dv), 1.0));
    let scale = 1.0 / (d as f32).sqrt();
    if grad {
        let dy = c.input("dy", rng.tensor(&shape(tq, dv), 1.0));
        c.op("g", Op::AttentionGrad { causal, scale }, &[q, k, v, dy]);
    } else {
        c.op("y", Op::Attention { causal, scale }, &[q, k, v]);
    }
    c
}

#[test]
fn attention_matches_interpreter() {
    let mut rng = Rng(21);
    for s in ATTN_SHAPES {
        attn_case(&mut rng, s, false).check(1e-5, 1e-6);
    }
}

#[test]
fn attention_grad_matches_interpreter() {
    let mut rng = Rng(22);
    for s in ATTN_SHAPES {
        attn_case(&mut rng, s, true).check(1e-4, 1e-5);
    }
}

/// Shapes across the kernels' blocking (4-row units, 8-column register
/// blocks, 64-column tiles, accumulators of 8, 4 and 1 lanes): T past one
/// tile and not a multiple of 8, dv not a multiple of 4; the first
/// two are small enough for the backward to save the probabilities, the
/// next two make it recompute them tile by tile. The last four reach the
/// looped score tile: features past the unrolled count (odd, with a last
/// single feature after the pairs; even), value widths that leave 4-lane
/// and scalar accumulator chunks, sequences that end inside a 4-row block
/// (its rows read from a padded copy), both backward paths.
const ATTN_TILE_SHAPES: [AttnShape; 8] = [
    (&[2], 70, 70, 6, 15, true),
    (&[1, 2], 67, 75, 37, 5, false),
    (&[1], 129, 129, 5, 6, true),
    (&[2], 130, 131, 7, 3, false),
    (&[2], 10, 10, 67, 5, true),
    (&[1, 2], 7, 9, 66, 14, false),
    (&[1], 13, 13, 3, 70, true),
    (&[1], 130, 130, 65, 6, true),
];

#[test]
fn attention_tiles_match_interpreter() {
    let mut rng = Rng(23);
    for s in ATTN_TILE_SHAPES {
        attn_case(&mut rng, s, false).check(1e-5, 1e-6);
    }
}

#[test]
fn attention_grad_both_paths_match_interpreter() {
    let saved: Vec<bool> = ATTN_TILE_SHAPES
        .iter()
        .map(|&(lead, tq, tk, ..)| {
            codegen::attention::saves_probabilities(lead.iter().product(), tq, tk)
        })
        .collect();
    assert_eq!(
        saved,
        [true, true, false, false, true, true, true, false],
        "both backward paths covered"
    );
    let mut rng = Rng(24);
    for s in ATTN_TILE_SHAPES {
        attn_case(&mut rng, s, true).check(1e-4, 1e-5);
    }
}

/// A hand-computed case: with one key, attention returns that key's value
/// for every query whatever the scores, and the causal mask hides the
/// second value from the first query.
#[test]
fn attention_hand_values() {
    let mut c = Case::new();
    let q = c.input("q", Tensor::f32(vec![2, 1], vec![1.0, -2.0]));
    let k = c.input("k", Tensor::f32(vec![2, 1], vec![0.5, 3.0]));
    let v = c.input("v", Tensor::f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]));
    c.op(
        "y",
        Op::Attention {
            causal: true,
            scale: 1.0,
        },
        &[q, k, v],
    );
    let m = codegen::compile(&c.g, &JitOptions { threads: 2 }).expect("compiles");
    assert_eq!(m.interpreted_kernels(), 0);
    let y = m.run(&c.feeds).expect("runs");
    let y = y["y0"].as_f32().expect("f32").to_vec();
    // Row 0 sees only key 0. Row 1: scores -1 and -6, weights
    // e^-1 / (e^-1 + e^-6) and e^-6 / (…).
    let w0 = 1.0 / (1.0 + (-5.0f32).exp());
    let w1 = 1.0 - w0;
    let want = [1.0, 2.0, w0 * 1.0 + w1 * 3.0, w0 * 2.0 + w1 * 4.0];
    for (a, e) in y.iter().zip(want) {
        assert!((a - e).abs() < 1e-6, "{y:?} vs {want:?}");
    }
}

/// A hand-computed LSTM step: with zero weights every gate is σ(0) = ½ and
/// g = tanh(0) = 0, so c and h stay 0; with bias 100 on g and the others,
/// c_0 = 1·1 = 1 (saturated), h_0 = tanh(1).
#[test]
fn lstm_hand_values() {
    let mut c = Case::new();
    let x = c.input("x", Tensor::f32(vec![1, 2, 1], vec![0.0, 0.0]));
    let wx = c.input("wx", Tensor::f32(vec![1, 4], vec![0.0; 4]));
    let wh = c.input("wh", Tensor::f32(vec![1, 4], vec![0.0; 4]));
    let b = c.input("b", Tensor::f32(vec![4], vec![100.0, -100.0, 100.0, 100.0]));
    c.op("h", Op::LstmSeq, &[x, wx, wh, b]);
    let m = codegen::compile(&c.g, &JitOptions { threads: 1 }).expect("compiles");
    assert_eq!(m.interpreted_kernels(), 0);
    let h = m.run(&c.feeds).expect("runs");
    let h = h["h0"].as_f32().expect("f32").to_vec();
    // f = 0 forgets: c_1 = i·g = 1 again.
    let want = 1.0f32.tanh();
    for a in &h {
        assert!((a - want).abs() < 1e-6, "{h:?}");
    }
}

/// A hand-computed GRU: with zero weights, z = σ(0) = ½ and, with a
/// saturating bias, h~ = 1, so h_t = ½·h_{t-1} + ½: 0.5, 0.75, 0.875.
#[test]
fn gru_hand_values() {
    let mut c = Case::new();
    let x = c.input("x", Tensor::f32(vec![1, 3, 1], vec![0.0; 3]));
    let wx = c.input("wx", Tensor::f32(vec![1, 3], vec![0.0; 3]));
    let wh = c.input("wh", Tensor::f32(vec![1, 3], vec![0.0; 3]));
    let b = c.input("b", Tensor::f32(vec![3], vec![0.0, 0.0, 100.0]));
    c.op("h", Op::GruSeq, &[x, wx, wh, b]);
    let m = codegen::compile(&c.g, &JitOptions { threads: 1 }).expect("compiles");
    assert_eq!(m.interpreted_kernels(), 0);
    let h = m.run(&c.feeds).expect("runs");
    let h = h["h0"].as_f32().expect("f32").to_vec();
    let want = [0.5f32, 0.75, 0.875];
    for (a, e) in h.iter().zip(want) {
        assert!((a - e).abs() < 1e-6, "{h:?} vs {want:?}");
    }
}

/// Whole models from source with their gradient graphs: the sequence ops
/// and their gradients (as autodiff emits them) are compiled, and every
/// output and gradient matches the interpreter.
#[test]
fn models_with_gradients_match_interpreter() {
    let sources = [
        "model m {
            input x: f32[N=3, T=5, 6]
            input label: i32[N]
            h = x |> lstm(7)
            loss = cross_entropy(h |> last |> dense(4), label)
        }",
        "model m {
            input x: f32[N=2, T=4, 3]
            input label: i32[N]
            h = x |> gru(9)
            loss = cross_entropy(h |> last |> dense(4), label)
        }",
        "model m {
            input x: f32[N=2, T=5, 8]
            input target: f32[N, T, 8]
            a = x |> self_attention(heads=2, causal=true)
            loss = mse(a, target)
        }",
    ];
    let mut rng = Rng(31);
    for src in sources {
        let model = dlc::api::Compiler::new()
            .compile_source("m.dl", src)
            .expect("model compiles");
        let g = dlc::autodiff::with_gradients(model.model()).expect("differentiable");
        let mut feeds = BTreeMap::new();
        let leaves = [g.inputs_by_name(), g.params(), g.states()].concat();
        for (name, v) in leaves {
            let ty = g.ty(v);
            let t = match ty.dtype {
                dlc::tensor::DType::I32 => {
                    let n = numel(&ty.shape);
                    Tensor::i32(
                        ty.shape.clone(),
                        (0..n).map(|_| (rng.next() % 4) as i32).collect(),
                    )
                }
                dlc::tensor::DType::F32 => rng.tensor(&ty.shape, 0.5),
            };
            feeds.insert(name, t);
        }
        let m = codegen::compile(&g, &JitOptions { threads: 2 }).expect("compiles");
        let seq_ops = [
            "lstm_seq",
            "lstm_seq_grad",
            "gru_seq",
            "gru_seq_grad",
            "attention",
            "attention_grad",
        ];
        let left: Vec<_> = m
            .interpreted_ops()
            .into_iter()
            .filter(|o| seq_ops.contains(o))
            .collect();
        assert!(left.is_empty(), "interpreted: {left:?}");
        let used = g
            .graph
            .node_indices()
            .filter(|&n| seq_ops.contains(&g.node(n).op.name()))
            .count();
        assert!(
            used >= 2,
            "the model should contain a sequence op and its gradient"
        );
        let want = interp::run_f32(&g, &feeds).expect("interpreter runs");
        let got = m.run(&feeds).expect("runs");
        for (name, w) in &want {
            let (gv, wv) = (got[name].as_f32().expect("f32"), w.as_f32().expect("f32"));
            for (i, (a, e)) in gv.iter().zip(wv).enumerate() {
                assert!(
                    (a - e).abs() <= 1e-5 + 1e-4 * e.abs(),
                    "{name}[{i}]: jit {a} vs interp {e}"
                );
            }
        }
    }
}

/// In a training step the forward kernel of a sequence op saves its
/// activations and the gradient kernel reads them instead of running the
/// forward again: fewer steps than the two kernels alone, and gradients
/// bitwise equal to those of the gradient op alone (which recomputes).
#[test]
fn recurrent_gradient_reads_the_activations_its_forward_saved() {
    let shape = (19, 9, 5, 27);
    for (gates, fwd, grad) in [
        (4, Op::LstmSeq, Op::LstmSeqGrad),
        (3, Op::GruSeq, Op::GruSeqGrad),
    ] {
        // h = fwd(x, w…); dh = h · s; grads = grad(x, w…, dh): the
        // gradient depends on the forward, as in a training step.
        let mut rng = Rng(23);
        let mut step = rnn_case(&mut rng, shape, gates, fwd.clone(), false);
        let h = step.g.output("y0").expect("forward output").value;
        let ins: Vec<Value> = step.g.inputs(h.node);
        let (n, t, _, hd) = shape;
        let s = step.input("s", rng.tensor(&[n, t, hd], 1.0));
        let dh = step
            .g
            .add(Op::Binary(BinaryOp::Mul), &[h, s], None)
            .expect("mul");
        let mut gins = ins.clone();
        gins.push(dh);
        step.op("g", grad.clone(), &gins);
        step.check(1e-4, 1e-5);
        let compile =
            |g: &Graph| codegen::compile(g, &JitOptions { threads: 2 }).expect("compiles");
        let m = compile(&step.g);
        let out = m.run(&step.feeds).expect("runs");
        // The gradient op alone, fed the same dh (an f32 product, exact to
        // the bit on both sides).
        let hv = out["y0"].as_f32().expect("f32");
        let sv = step.feeds["s"].as_f32().expect("f32");
        let dhv: Vec<f32> = hv.iter().zip(sv).map(|(a, b)| a * b).collect();
        let mut alone = Case {
            g: Graph::new(),
            feeds: step.feeds.clone(),
        };
        let names = ["x", "wx", "wh", "b"];
        let mut ains: Vec<Value> = names
            .iter()
            .map(|nm| alone.input(nm, step.feeds[*nm].clone()))
            .collect();
        ains.push(alone.input("dh", Tensor::f32(vec![n, t, hd], dhv)));
        alone.op("g", grad.clone(), &ains);
        let reference = compile(&alone.g).run(&alone.feeds).expect("runs");
        for i in 0..4 {
            let name = format!("g{i}");
            let bits = |t: &Tensor| -> Vec<u32> {
                t.as_f32()
                    .expect("f32")
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            assert_eq!(bits(&reference[&name]), bits(&out[&name]), "{fwd:?} {name}");
        }
        let mut rng = Rng(23);
        let fwd_alone = rnn_case(&mut rng, shape, gates, fwd.clone(), false);
        let separate = compile(&fwd_alone.g).step_count() + compile(&alone.g).step_count() + 1;
        assert!(
            m.step_count() < separate,
            "{fwd:?}: the gradient still runs the forward ({} steps)",
            m.step_count()
        );
    }
}

/// The loop bodies of the `n` time loops (the compiled steps with the
/// most FMAs: their tiles are unrolled over row groups and k chunks), in
/// step order: each one's first block of 16 FMAs, as its broadcasts and
/// register copies (after checking it has no spills).
fn time_loops(c: &Case, n: usize) -> Vec<(usize, usize)> {
    let asm = codegen::emit_asm(&c.g, &JitOptions::default()).expect("disassembles");
    let steps: Vec<&str> = asm.split("\n; ").collect();
    let mut by_fmas: Vec<usize> = (0..steps.len()).collect();
    by_fmas.sort_by_key(|&i| std::cmp::Reverse(steps[i].matches("vfmadd").count()));
    let mut loops: Vec<usize> = by_fmas.into_iter().take(n).collect();
    loops.sort();
    loops
        .into_iter()
        .map(|i| {
            let body = steps[i]
                .split("\nblock")
                .find(|b| b.matches("vfmadd").count() == 16)
                .unwrap_or_else(|| panic!("no loop of 16 FMAs in:\n{}", steps[i]));
            assert!(!body.contains("rsp"), "spills in the loop:\n{body}");
            let moves = body.matches("movdqa").count() + body.matches("movaps").count();
            (body.matches("vbroadcastss").count(), moves)
        })
        .collect()
}

/// The recurrent matmuls take the matmul micro-kernel's form: per k, one
/// multiplier per row shared by the row's FMAs through register copies,
/// two k per loop iteration with the second reversed, so no edge moves or
/// spills. The forward steps read their multipliers as vectors from the
/// broadcast-packed copy of A (no broadcast in the loop); the backward
/// steps broadcast them in place. The LSTM forward's 2 × 4 tile (its four
/// gates): 16 FMAs and 12 copies per iteration; the other loops' 4 × 2
/// tiles (two gates, or two hidden blocks): 16 FMAs and 8 copies. The
/// gradients run the forward loop again, then the backward one.
#[test]
fn recurrent_loops_keep_accumulators_in_place() {
    let mut rng = Rng(21);
    // H = 16: four hidden blocks, two tiles for the single-vector phases.
    let shape = (8, 3, 6, 16);
    let lstm = rnn_case(&mut rng, shape, 4, Op::LstmSeq, false);
    assert_eq!(time_loops(&lstm, 1), [(0, 12)]);
    let lstm_grad = rnn_case(&mut rng, shape, 4, Op::LstmSeqGrad, true);
    assert_eq!(time_loops(&lstm_grad, 2), [(0, 12), (8, 8)]);
    let gru = rnn_case(&mut rng, shape, 3, Op::GruSeq, false);
    assert_eq!(time_loops(&gru, 1), [(0, 8)]);
    let gru_grad = rnn_case(&mut rng, shape, 3, Op::GruSeqGrad, true);
    assert_eq!(time_loops(&gru_grad, 2), [(0, 8), (8, 8)]);
}

/// The `P·V`-style accumulation (forward `O += P v`, and the backward's
/// `dq`, `dk`, `dv`): four key steps of four rows × two vectors per
/// iteration, one broadcast per row and step and one copy of it.
#[test]
fn attention_row_accumulation_keeps_accumulators_in_place() {
    let mut rng = Rng(31);
    let shape: AttnShape = (&[2], 64, 64, 16, 16, true);
    for grad in [false, true] {
        let c = attn_case(&mut rng, shape, grad);
        let asm = codegen::emit_asm(&c.g, &JitOptions::default()).expect("disassembles");
        check_fma_loop(&asm, 32, 16, 16);
    }
}

/// Past the fully unrolled feature count, the score tile loops over
/// features two at a time: 4 rows × 2 vectors per feature, the second
/// feature in reverse.
#[test]
fn attention_score_loop_keeps_accumulators_in_place() {
    let mut rng = Rng(32);
    let shape: AttnShape = (&[1], 64, 64, 128, 16, false);
    let c = attn_case(&mut rng, shape, false);
    let asm = codegen::emit_asm(&c.g, &JitOptions::default()).expect("disassembles");
    check_fma_loop(&asm, 16, 8, 8);
}

/// H a multiple of 4 takes the row epilogues (every block of a group at
/// once): one and several groups of four hidden blocks, a short last
/// group, two row blocks with a short second one; forward and gradient of
/// both recurrences.
#[test]
fn recurrences_with_whole_blocks_match_interpreter() {
    let mut rng = Rng(41);
    for s in [(11, 4, 6, 20), (3, 5, 4, 32), (9, 3, 7, 16), (2, 2, 3, 4)] {
        rnn_case(&mut rng, s, 3, Op::GruSeq, false).check(1e-5, 1e-6);
        rnn_case(&mut rng, s, 3, Op::GruSeqGrad, true).check(1e-4, 1e-5);
        rnn_case(&mut rng, s, 4, Op::LstmSeq, false).check(1e-5, 1e-6);
        rnn_case(&mut rng, s, 4, Op::LstmSeqGrad, true).check(1e-4, 1e-5);
    }
}

/// A training step reads the recurrent gradient's weight gradients but
/// not `dx` (x is a model input): the kernel leaves out dx's matmul, and
/// the weight gradients are bitwise those of the step that also reads dx.
#[test]
fn recurrent_gradient_skips_unread_dx() {
    let shape = (19, 9, 5, 27);
    for (gates, fwd, grad) in [
        (4, Op::LstmSeq, Op::LstmSeqGrad),
        (3, Op::GruSeq, Op::GruSeqGrad),
    ] {
        let build = |with_dx: bool| {
            let mut rng = Rng(29);
            let mut step = rnn_case(&mut rng, shape, gates, fwd.clone(), false);
            let h = step.g.output("y0").expect("forward output").value;
            let mut ins: Vec<Value> = step.g.inputs(h.node);
            let (n, t, _, hd) = shape;
            let s = step.input("s", rng.tensor(&[n, t, hd], 1.0));
            let dh = step
                .g
                .add(Op::Binary(BinaryOp::Mul), &[h, s], None)
                .expect("mul");
            ins.push(dh);
            let gs = step
                .g
                .add_multi(grad.clone(), &ins, None)
                .expect("well-typed");
            let first = if with_dx { 0 } else { 1 };
            for (i, v) in gs.into_iter().enumerate().skip(first) {
                step.g.push_output(format!("g{i}"), OutputKind::Output, v);
            }
            step
        };
        let (without, with) = (build(false), build(true));
        without.check(1e-4, 1e-5);
        let compile =
            |c: &Case| codegen::compile(&c.g, &JitOptions { threads: 2 }).expect("compiles");
        let (mw, mo) = (compile(&with), compile(&without));
        // dx's matmul: packing each operand, then the product.
        assert!(
            mo.step_count() + 3 <= mw.step_count(),
            "{grad:?}: {} steps without dx, {} with",
            mo.step_count(),
            mw.step_count()
        );
        let (a, b) = (
            mw.run(&with.feeds).expect("runs"),
            mo.run(&without.feeds).expect("runs"),
        );
        for name in ["g1", "g2", "g3"] {
            let bits = |t: &Tensor| -> Vec<u32> {
                t.as_f32()
                    .expect("f32")
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            assert_eq!(bits(&a[name]), bits(&b[name]), "{grad:?} {name}");
        }
        assert!(!b.contains_key("g0"));
    }
}

/// The attention kernels loop over the columns of wide heads instead of
/// emitting each chunk or vector: a 4096-wide head made 140 000
/// instructions in one kernel (2 s to compile), and a 16 384-wide one,
/// with the score loops already rolled, still 50 000 asm lines (150 ms).
/// Forward and gradient, the machine code for 1024 features and values is
/// as long as for 256 (one chunk more or less for the odd value width),
/// and the values those loops compute still match the interpreter's.
#[test]
fn wide_attention_heads_compile_to_bounded_code() {
    let mut rng = Rng(33);
    for grad in [false, true] {
        let lines = |rng: &mut Rng, f: usize| {
            let c = attn_case(rng, (&[1], 5, 6, f, f + 3, false), grad);
            let asm = codegen::emit_asm(&c.g, &JitOptions::default()).expect("disassembles");
            (asm.lines().count(), c)
        };
        let (narrow, _) = lines(&mut rng, 256);
        let (wide, c) = lines(&mut rng, 1024);
        assert!(
            wide <= narrow + 200 && wide < 6_000,
            "{narrow} lines at 256 features, {wide} at 1024"
        );
        if grad {
            c.check(1e-4, 1e-5);
        } else {
            c.check(1e-5, 1e-6);
        }
    }
}
