//! The fused attention kernels' register-blocked loops: their shape in the
//! generated code (one broadcast per row, accumulators kept in place, no
//! spills), and the JIT against the reference interpreter on the shapes
//! that reach each variant (features past the fully unrolled score loop,
//! odd and even, last row blocks past the sequence, both backward paths),
//! with bitwise-equal results for 1, 2 and 3 threads.

use dlc::codegen::{self, JitOptions};
use dlc::interp;
use dlc::ir::{Graph, Op, OutputKind, TensorType, Value};
use dlc::tensor::{numel, Tensor};
use std::collections::BTreeMap;

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
    fn tensor(&mut self, shape: &[usize]) -> Tensor {
        let data = (0..numel(shape))
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
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
            let bits = |t: &Tensor| -> Vec<u32> {
                t.as_f32()
                    .unwrap_or(&[])
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            match &first {
                None => first = Some(got),
                Some(f) => {
                    for (name, t) in f {
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

/// (leading dims, Tq, Tk, d, dv, causal).
type AttnShape = (&'static [usize], usize, usize, usize, usize, bool);

fn attn_case(rng: &mut Rng, (lead, tq, tk, d, dv, causal): AttnShape, grad: bool) -> Case {
    let shape = |a: usize, b: usize| [lead, &[a, b]].concat();
    let mut c = Case::new();
    let q = c.input("q", rng.tensor(&shape(tq, d)));
    let k = c.input("k", rng.tensor(&shape(tk, d)));
    let v = c.input("v", rng.tensor(&shape(tk, dv)));
    let scale = 1.0 / (d as f32).sqrt();
    if grad {
        let dy = c.input("dy", rng.tensor(&shape(tq, dv)));
        c.op("g", Op::AttentionGrad { causal, scale }, &[q, k, v, dy]);
    } else {
        c.op("y", Op::Attention { causal, scale }, &[q, k, v]);
    }
    c
}

/// Finds the block of `asm` with `fmas` FMAs (a kernel's unrolled loop
/// body) and checks its broadcasts and register moves: the copies the FMA
/// form needs and no more (no accumulator moved on the loop edge), and no
/// stack access (no spills).
fn check_fma_loop(asm: &str, fmas: usize, broadcasts: usize, moves: usize) {
    let body = asm
        .split("\nblock")
        .find(|b| b.matches("vfmadd").count() == fmas)
        .unwrap_or_else(|| panic!("no block with {fmas} FMAs in:\n{asm}"));
    // The disassembly of the next function follows the last block.
    let body = body.split("\n;").next().unwrap_or(body);
    let moved = body.matches("movdqa").count() + body.matches("movaps").count();
    assert_eq!(
        body.matches("vbroadcastss").count(),
        broadcasts,
        "broadcasts:\n{body}"
    );
    assert_eq!(moved, moves, "register moves:\n{body}");
    assert!(!body.contains("rsp"), "spills in the loop:\n{body}");
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
        let asm = codegen::emit_asm(&c.g).expect("disassembles");
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
    let asm = codegen::emit_asm(&c.g).expect("disassembles");
    check_fma_loop(&asm, 16, 8, 8);
}

/// Features past the unrolled score loop (odd: a last single feature
/// after the pairs; even), value widths that leave 4-lane and scalar
/// accumulator chunks, sequences that end inside a 4-row block (its rows
/// read from a padded copy), and, for the gradient, both the saved and
/// the recomputed probabilities.
const LOOP_SHAPES: [AttnShape; 4] = [
    (&[2], 10, 10, 67, 5, true),
    (&[1, 2], 7, 9, 66, 14, false),
    (&[1], 13, 13, 3, 70, true),
    (&[1], 130, 130, 65, 6, true),
];

#[test]
fn attention_loops_match_interpreter() {
    let mut rng = Rng(33);
    for s in LOOP_SHAPES {
        attn_case(&mut rng, s, false).check(1e-5, 1e-6);
    }
}

#[test]
fn attention_grad_loops_match_interpreter() {
    let saved: Vec<bool> = LOOP_SHAPES
        .iter()
        .map(|&(lead, tq, tk, ..)| {
            codegen::attention::saves_probabilities(lead.iter().product(), tq, tk)
        })
        .collect();
    assert_eq!(
        saved,
        [true, true, true, false],
        "both backward paths covered"
    );
    let mut rng = Rng(34);
    for s in LOOP_SHAPES {
        attn_case(&mut rng, s, true).check(1e-4, 1e-5);
    }
}
