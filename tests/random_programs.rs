//! Differential tests on random whole programs: seeded random `.dl` models
//! (chains and joins of every op family, with broadcasting, layout ops,
//! layers and losses) compiled through the whole pipeline — expansion,
//! fusion, the memory plan, reverse-mode AD and the JIT — and checked
//! against the interpreter on the same source: forward outputs, the loss
//! and every parameter gradient, and two optimizer steps (SGD or Adam, with
//! or without an L1/L2 penalty). The JIT must also be
//! bitwise identical on 1, 2 and 3 threads.
//!
//! The per-op tests check each kernel on its own; compositions are where a
//! fusion or buffer-reuse mistake shows (a value overwritten while a later
//! kernel still reads it, an epilogue applied to the wrong tile).
//!
//! `DLC_RANDOM_PROGRAMS=N` runs N programs instead of the default (to hunt
//! for bugs); a failure prints the program's source and seed.

use dlc::api::{Backend, Compiler, TensorMap};
use dlc::init::SplitMix64;
use dlc::model::{Optimizer, Regularizer};
use dlc::tensor::Tensor;

/// The crate's seeded generator, with the draws a generator of programs
/// needs.
struct Rng(SplitMix64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(SplitMix64::new(seed))
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.0.next_u64() % (hi - lo + 1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.0.next_u64() % 100 < percent
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.range(0, xs.len() - 1)]
    }
    fn normal(&mut self) -> f32 {
        self.0.normal() as f32
    }
}

/// A bound f32 value of the program under construction.
#[derive(Clone)]
struct Val {
    name: String,
    shape: Vec<usize>,
    /// Consumed by a later statement (else it feeds the loss).
    used: bool,
}

#[derive(Default)]
struct Program {
    inputs: Vec<String>,
    body: Vec<String>,
    vals: Vec<Val>,
    /// Loss terms beyond the unused values' (losses of labels, mse).
    terms: Vec<String>,
    /// Smallest class count a `labels` consumer has.
    classes: Option<usize>,
    /// Table rows of the `ids` input's consumers.
    vocab: Option<usize>,
    ids_shape: Vec<usize>,
    n: usize,
    fresh: usize,
    /// Larger sizes: kernels take their vector loops and split over
    /// threads (most programs are small, for the interpreter's sake).
    big: bool,
}

/// Unary forms, kept to ranges where what follows stays well-conditioned.
const UNARY_FORMS: [&str; 8] = [
    "relu(#)",
    "sigmoid(#)",
    "tanh(#)",
    "abs(#)",
    "-#",
    "exp(tanh(#))",
    "log(sigmoid(#) + 0.5)",
    "sqrt(sigmoid(#) + 0.1)",
];

/// Forms with scalar literals (broadcast `f32[]` operands).
const SCALAR_FORMS: [&str; 4] = [
    "# * 0.5 + 1.0",
    "maximum(#, 0.25)",
    "2.0 - # / 3.0",
    "minimum(0.5, # * #)",
];

fn dims(s: &[usize]) -> String {
    let d: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", d.join(", "))
}

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

/// NumPy broadcast of two shapes, if compatible.
fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

impl Program {
    fn name(&mut self, prefix: &str) -> String {
        self.fresh += 1;
        format!("{prefix}{}", self.fresh)
    }

    /// An existing value, preferring recent and unused ones so that chains
    /// grow long.
    fn operand(
        &mut self,
        rng: &mut Rng,
        ok: impl Fn(&Val) -> bool,
    ) -> Option<(String, Vec<usize>)> {
        let cands: Vec<usize> = (0..self.vals.len())
            .filter(|&i| ok(&self.vals[i]))
            .collect();
        if cands.is_empty() {
            return None;
        }
        let unused: Vec<usize> = cands
            .iter()
            .copied()
            .filter(|&i| !self.vals[i].used)
            .collect();
        let i = if !unused.is_empty() && rng.chance(75) {
            *rng.pick(&unused)
        } else {
            *rng.pick(&cands)
        };
        let v = &mut self.vals[i];
        v.used = true;
        Some((v.name.clone(), v.shape.clone()))
    }

    fn bind(&mut self, expr: String, shape: Vec<usize>) {
        let name = self.name("v");
        self.body.push(format!("    {name} = {expr}"));
        self.vals.push(Val {
            name,
            shape,
            used: false,
        });
    }

    fn param(&mut self, rng: &mut Rng, shape: &[usize]) -> String {
        let name = self.name("p");
        let init = match rng.range(0, 2) {
            0 => "normal(0.5)".to_string(),
            1 => "uniform(-1, 1)".to_string(),
            _ => "glorot_uniform".to_string(),
        };
        self.body
            .push(format!("    param {name}: f32{} = {init}", dims(shape)));
        name
    }

    /// One random statement; false when the drawn op found no operand (or
    /// no valid attributes for it), and then every value keeps its use.
    fn step(&mut self, rng: &mut Rng) -> bool {
        let used: Vec<bool> = self.vals.iter().map(|v| v.used).collect();
        let made = self.op(rng);
        if !made {
            for (v, u) in self.vals.iter_mut().zip(used) {
                v.used = u;
            }
        }
        made
    }

    fn op(&mut self, rng: &mut Rng) -> bool {
        match rng.range(0, 21) {
            0..=2 => self.same_shape(rng, &UNARY_FORMS),
            3..=5 => self.binary(rng),
            6 => self.reduce(rng),
            7 => self.softmax(rng),
            8 => self.layout(rng),
            9 => self.concat_or_slice(rng),
            10 | 11 => self.dense(rng),
            12 => self.matmul(rng),
            13 => self.layer_norm(rng),
            14 | 15 => self.image(rng),
            16 | 17 => self.sequence(rng),
            18 => self.labelled_loss(rng),
            19 => self.embedding(rng),
            _ => self.same_shape(rng, &SCALAR_FORMS),
        }
    }

    /// One of `forms` (`#` stands for the operand), all of its shape.
    fn same_shape(&mut self, rng: &mut Rng, forms: &[&str]) -> bool {
        let Some((a, s)) = self.operand(rng, |_| true) else {
            return false;
        };
        let form = rng.pick(forms);
        self.bind(form.replace('#', &a), s);
        true
    }

    fn binary(&mut self, rng: &mut Rng) -> bool {
        let Some((a, sa)) = self.operand(rng, |_| true) else {
            return false;
        };
        // The other operand: a value of a compatible shape, else a
        // parameter of a broadcastable one.
        let other = if rng.chance(60) {
            self.operand(rng, |v| {
                broadcast(&sa, &v.shape).is_some() && v.shape.len() <= sa.len()
            })
        } else {
            None
        };
        let (b, sb) = match other {
            Some(b) => b,
            None => {
                let r = rng.range(0, sa.len());
                let mut s: Vec<usize> = sa[sa.len() - r..].to_vec();
                for d in s.iter_mut() {
                    if rng.chance(30) {
                        *d = 1;
                    }
                }
                let p = self.param(rng, &s);
                (p, s)
            }
        };
        let Some(out) = broadcast(&sa, &sb) else {
            return false;
        };
        let (x, y) = if rng.chance(50) { (a, b) } else { (b, a) };
        let expr = match rng.range(0, 5) {
            0 => format!("{x} + {y}"),
            1 => format!("{x} - {y}"),
            2 => format!("{x} * {y}"),
            3 => format!("{x} / (1.5 + tanh({y}))"),
            4 => format!("maximum({x}, {y})"),
            _ => format!("minimum({x}, {y})"),
        };
        self.bind(expr, out);
        true
    }

    fn reduce(&mut self, rng: &mut Rng) -> bool {
        let Some((a, s)) = self.operand(rng, |v| v.shape.len() >= 2) else {
            return false;
        };
        let op = rng.pick(&["sum", "mean", "max"]).to_string();
        let keep = rng.chance(40);
        let mut axes = vec![rng.range(0, s.len() - 1)];
        if s.len() >= 3 && rng.chance(30) {
            let b = rng.range(0, s.len() - 1);
            if b != axes[0] {
                axes.push(b);
            }
        }
        // Never all axes: the result stays a tensor.
        if axes.len() == s.len() {
            axes.pop();
        }
        let axis = if axes.len() == 1 {
            let ax = axes[0] as i64 - if rng.chance(30) { s.len() as i64 } else { 0 };
            ax.to_string()
        } else {
            let l: Vec<String> = axes.iter().map(|a| a.to_string()).collect();
            format!("[{}]", l.join(", "))
        };
        let out: Vec<usize> = (0..s.len())
            .filter_map(|d| match (axes.contains(&d), keep) {
                (false, _) => Some(s[d]),
                (true, true) => Some(1),
                (true, false) => None,
            })
            .collect();
        self.bind(format!("{op}({a}, axis={axis}, keepdims={keep})"), out);
        true
    }

    fn softmax(&mut self, rng: &mut Rng) -> bool {
        let Some((a, s)) = self.operand(rng, |v| !v.shape.is_empty()) else {
            return false;
        };
        let f = rng.pick(&["softmax", "log_softmax"]);
        let expr = if rng.chance(50) {
            format!("{f}({a})")
        } else {
            format!("{f}({a}, axis={})", rng.range(0, s.len() - 1))
        };
        self.bind(expr, s);
        true
    }

    fn layout(&mut self, rng: &mut Rng) -> bool {
        let Some((a, s)) = self.operand(rng, |v| v.shape.len() >= 2) else {
            return false;
        };
        match rng.range(0, 3) {
            0 => {
                let mut t = s.clone();
                let r = t.len();
                t.swap(r - 1, r - 2);
                self.bind(format!("transpose({a})"), t);
            }
            1 => {
                let mut perm: Vec<usize> = (0..s.len()).collect();
                for k in (1..perm.len()).rev() {
                    let j = rng.range(0, k);
                    perm.swap(k, j);
                }
                let t: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
                let p: Vec<String> = perm.iter().map(|p| p.to_string()).collect();
                self.bind(format!("transpose({a}, [{}])", p.join(", ")), t);
            }
            2 => {
                // Merge two neighbours, or split one by a divisor; one
                // dimension may be written as -1.
                let mut t = s.clone();
                let k = rng.range(0, t.len() - 1);
                let divs: Vec<usize> = (2..t[k]).filter(|d| t[k] % d == 0).collect();
                if !divs.is_empty() && rng.chance(50) {
                    let d = *rng.pick(&divs);
                    let rest = t[k] / d;
                    t[k] = rest;
                    t.insert(k + 1, d);
                } else if k + 1 < t.len() {
                    let m = t[k] * t[k + 1];
                    t[k] = m;
                    t.remove(k + 1);
                }
                let mut w: Vec<String> = t.iter().map(|d| d.to_string()).collect();
                if rng.chance(40) {
                    let j = rng.range(0, w.len() - 1);
                    w[j] = "-1".into();
                }
                self.bind(format!("reshape({a}, [{}])", w.join(", ")), t);
            }
            _ => {
                let t = vec![s[0], numel(&s[1..])];
                self.bind(format!("flatten({a})"), t);
            }
        }
        true
    }

    fn concat_or_slice(&mut self, rng: &mut Rng) -> bool {
        let Some((a, s)) = self.operand(rng, |v| !v.shape.is_empty()) else {
            return false;
        };
        let axis = rng.range(0, s.len() - 1);
        if rng.chance(50) {
            // Another value equal but along the axis, else a function of a.
            let same = |v: &Val| {
                v.shape.len() == s.len()
                    && (0..s.len()).all(|d| d == axis || v.shape[d] == s[d])
                    && v.name != a
            };
            let (b, bn) = match self.operand(rng, same) {
                Some((b, sb)) => (b, sb[axis]),
                None => (format!("tanh({a})"), s[axis]),
            };
            let mut t = s.clone();
            t[axis] += bn;
            let ax = if rng.chance(30) {
                axis as i64 - s.len() as i64
            } else {
                axis as i64
            };
            self.bind(format!("concat([{a}, {b}], {ax})"), t);
        } else {
            let n = s[axis] as i64;
            let start = rng.range(0, (n - 1) as usize) as i64;
            let end = rng.range(start as usize + 1, n as usize + 2) as i64;
            let len = end.min(n) - start;
            // Negative forms of the same bounds (and an end past the size,
            // which clamps).
            let st = if rng.chance(30) { start - n } else { start };
            let en = if rng.chance(30) && end < n {
                end - n
            } else {
                end
            };
            let mut t = s.clone();
            t[axis] = len as usize;
            self.bind(format!("slice({a}, {axis}, {st}, {en})"), t);
        }
        true
    }

    fn dense(&mut self, rng: &mut Rng) -> bool {
        let Some((a, mut s)) = self.operand(rng, |v| !v.shape.is_empty() && v.shape.len() <= 4)
        else {
            return false;
        };
        let units = if self.big {
            rng.range(1, 40)
        } else {
            rng.range(1, 12)
        };
        *s.last_mut().expect("rank >= 1") = units;
        let act = *rng.pick(&["", " |> relu", " |> tanh", " |> sigmoid"]);
        self.bind(format!("{a} |> dense({units}){act}"), s);
        true
    }

    fn matmul(&mut self, rng: &mut Rng) -> bool {
        let Some((a, s)) = self.operand(rng, |v| v.shape.len() >= 2) else {
            return false;
        };
        let r = s.len();
        match rng.range(0, 4) {
            0 => {
                let p = if self.big {
                    rng.range(1, 40)
                } else {
                    rng.range(1, 9)
                };
                let w = self.param(rng, &[s[r - 1], p]);
                let mut t = s.clone();
                t[r - 1] = p;
                self.bind(format!("{a} @ {w}"), t);
            }
            1 => {
                let mut t = s.clone();
                t[r - 2] = s[r - 1];
                // Divided by the contracted size: a gram matrix's entries
                // grow with it, and a softmax over large values saturates
                // into a function too ill-conditioned to compare.
                self.bind(format!("transpose({a}) @ {a} / {}.0", s[r - 2]), t);
            }
            2 => {
                let mut t = s.clone();
                t[r - 1] = s[r - 2];
                self.bind(format!("{a} @ transpose({a}) / {}.0", s[r - 1]), t);
            }
            3 => {
                // 1-D operands, as NumPy: a vector on the right drops the
                // last axis, on the left the second-to-last.
                if rng.chance(50) {
                    let w = self.param(rng, &[s[r - 1]]);
                    self.bind(format!("{a} @ {w}"), s[..r - 1].to_vec());
                } else {
                    let w = self.param(rng, &[s[r - 2]]);
                    let mut t = s[..r - 2].to_vec();
                    t.push(s[r - 1]);
                    self.bind(format!("{w} @ {a}"), t);
                }
            }
            _ => {
                // A batched weight whose batch dims broadcast (some 1).
                let p = rng.range(1, 6);
                let mut ws: Vec<usize> = s[..r - 2]
                    .iter()
                    .map(|&d| if rng.chance(50) { 1 } else { d })
                    .collect();
                if !ws.is_empty() && rng.chance(30) {
                    ws.remove(0);
                }
                ws.extend([s[r - 1], p]);
                let w = self.param(rng, &ws);
                let mut t = s.clone();
                t[r - 1] = p;
                self.bind(format!("{a} @ {w}"), t);
            }
        }
        true
    }

    fn layer_norm(&mut self, rng: &mut Rng) -> bool {
        let Some((a, s)) = self.operand(rng, |v| {
            !v.shape.is_empty() && v.shape[v.shape.len() - 1] > 1
        }) else {
            return false;
        };
        self.bind(format!("{a} |> layer_norm"), s);
        true
    }

    fn image(&mut self, rng: &mut Rng) -> bool {
        let Some((a, s)) = self.operand(rng, |v| v.shape.len() == 4) else {
            return false;
        };
        let (h, w) = (s[2], s[3]);
        match rng.range(0, 4) {
            0 | 1 => {
                // Up to 28 channels in big programs: 3 × 3 layers with 24
                // or more in and out take the Winograd kernels.
                let c = if self.big {
                    rng.range(1, 28)
                } else {
                    rng.range(1, 6)
                };
                let k = rng.range(1, 3.min(h.min(w)));
                let d = if k > 1 && rng.chance(25) { 2 } else { 1 };
                let span = d * (k - 1) + 1;
                if rng.chance(30) {
                    let out = vec![s[0], c, h, w];
                    self.bind(
                        format!("{a} |> conv2d({c}, kernel={k}, pad=\"same\", dilation={d})"),
                        out,
                    );
                    return true;
                }
                let stride = rng.range(1, 2);
                let pad = rng.range(0, 2);
                if h + 2 * pad < span || w + 2 * pad < span {
                    return false;
                }
                let oh = (h + 2 * pad - span) / stride + 1;
                let ow = (w + 2 * pad - span) / stride + 1;
                self.bind(
                    format!(
                        "{a} |> conv2d({c}, kernel={k}, stride={stride}, pad={pad}, dilation={d})"
                    ),
                    vec![s[0], c, oh, ow],
                );
            }
            2 | 3 => {
                let op = if rng.chance(50) {
                    "max_pool2d"
                } else {
                    "avg_pool2d"
                };
                let win = rng.range(1, 3.min(h.min(w)));
                let stride = rng.range(1, win);
                let pad = rng.range(0, win - 1);
                let oh = (h + 2 * pad - win) / stride + 1;
                let ow = (w + 2 * pad - win) / stride + 1;
                self.bind(
                    format!("{op}({a}, {win}, stride={stride}, pad={pad})"),
                    vec![s[0], s[1], oh, ow],
                );
            }
            _ => self.bind(format!("global_avg_pool({a})"), vec![s[0], s[1]]),
        }
        true
    }

    fn sequence(&mut self, rng: &mut Rng) -> bool {
        let Some((a, s)) = self.operand(rng, |v| v.shape.len() == 3) else {
            return false;
        };
        match rng.range(0, 4) {
            0 => {
                let h = rng.range(1, 9);
                self.bind(format!("{a} |> lstm({h})"), vec![s[0], s[1], h]);
            }
            1 => {
                let h = rng.range(1, 9);
                self.bind(format!("{a} |> gru({h})"), vec![s[0], s[1], h]);
            }
            2 => self.bind(format!("last({a})"), vec![s[0], s[2]]),
            3 => {
                let heads: Vec<usize> = (1..=s[2]).filter(|h| s[2] % h == 0 && *h <= 4).collect();
                let h = *rng.pick(&heads);
                let causal = rng.chance(50);
                self.bind(
                    format!("{a} |> self_attention(heads={h}, causal={causal})"),
                    s,
                );
            }
            _ => {
                // Cross attention where another sequence has the same batch
                // and width (any length), else self attention.
                let other = |v: &Val| {
                    v.shape.len() == 3 && v.shape[0] == s[0] && v.shape[2] == s[2] && v.name != a
                };
                match self.operand(rng, other) {
                    Some((b, _)) => {
                        self.bind(format!("attention({a}, {b}, tanh({b}))"), s);
                    }
                    None => {
                        let causal = rng.chance(50);
                        self.bind(
                            format!("attention({a}, {a}, tanh({a}), causal={causal})"),
                            s,
                        );
                    }
                }
            }
        }
        true
    }

    fn labelled_loss(&mut self, rng: &mut Rng) -> bool {
        if rng.chance(30) {
            let Some((a, s)) = self.operand(rng, |v| !v.shape.is_empty()) else {
                return false;
            };
            let j = self.operand(rng, |v| v.shape == s && v.name != a);
            let b = match j {
                Some((b, _)) => b,
                None => format!("sigmoid({a})"),
            };
            self.terms.push(format!("mse({a}, {b})"));
            return true;
        }
        let n = self.n;
        let Some((a, s)) = self.operand(rng, |v| v.shape.len() == 2 && v.shape[0] == n) else {
            return false;
        };
        self.classes = Some(self.classes.map_or(s[1], |c| c.min(s[1])));
        let f = if rng.chance(70) {
            "cross_entropy"
        } else {
            "hinge"
        };
        self.terms.push(format!("{f}({a}, labels)"));
        true
    }

    fn embedding(&mut self, rng: &mut Rng) -> bool {
        if self.ids_shape.is_empty() {
            let t = rng.range(1, 5);
            self.ids_shape = vec![self.n, t];
        }
        let vocab = self.vocab.unwrap_or_else(|| rng.range(2, 12));
        self.vocab = Some(vocab);
        let d = rng.range(1, 8);
        let mut s = self.ids_shape.clone();
        s.push(d);
        if rng.chance(70) {
            self.bind(format!("ids |> embedding({vocab}, {d})"), s);
        } else {
            let table = self.param(rng, &[vocab, d]);
            self.bind(format!("gather({table}, ids)"), s);
        }
        true
    }

    fn source(&self, rng: &mut Rng) -> String {
        let mut src = String::from("model random {\n");
        for i in &self.inputs {
            src += &format!("    {i}\n");
        }
        if !self.ids_shape.is_empty() {
            src += &format!("    input ids: i32{}\n", dims(&self.ids_shape));
        }
        if self.classes.is_some() {
            src += &format!("    input labels: i32[{}]\n", self.n);
        }
        for line in &self.body {
            src += line;
            src.push('\n');
        }
        let mut terms = self.terms.clone();
        for v in self.vals.iter().filter(|v| !v.used) {
            let t = match rng.range(0, 2) {
                0 => format!("mean({} * {})", v.name, v.name),
                1 => format!("mean({})", v.name),
                _ => format!("sum(tanh({})) * 0.1", v.name),
            };
            terms.push(t);
        }
        // Outputs: a few values (inputs too) besides the loss.
        for v in self.vals.iter() {
            if rng.chance(20) {
                src += &format!("    output {}\n", v.name);
            }
        }
        src += &format!("    loss = {}\n}}\n", terms.join(" + "));
        src
    }
}

/// A random program and inputs for it.
fn generate(seed: u64) -> (String, TensorMap) {
    let mut rng = Rng::new(seed);
    // 15% big, of which a fifth huge: batches large enough that even
    // elementwise and row kernels split over threads (no images there,
    // which the interpreter would take seconds over).
    let size = rng.range(0, 99);
    let (big, huge) = (size < 15, size < 3);
    let mut p = Program {
        n: if huge {
            rng.range(16, 64)
        } else if big {
            rng.range(1, 9)
        } else {
            rng.range(1, 4)
        },
        big,
        ..Program::default()
    };
    let n = p.n;
    let families = rng.range(1, 3);
    let mut shapes: Vec<Vec<usize>> = Vec::new();
    // Huge inputs reach the 64k element operations from which a kernel
    // takes two chunks (`Step::grain`).
    let scale = if huge {
        16
    } else if big {
        4
    } else {
        1
    };
    for _ in 0..families {
        let s = match rng.range(0, if huge { 1 } else { 2 }) {
            0 => vec![n, rng.range(1, 12 * scale * scale.min(8))],
            1 => vec![n, rng.range(1, 6 * scale.min(2)), rng.range(1, 8 * scale)],
            _ => vec![
                n,
                rng.range(1, 3 * scale),
                rng.range(3, 8 * scale.min(2)),
                rng.range(3, 8 * scale.min(2)),
            ],
        };
        shapes.push(s);
    }
    for s in &shapes {
        let name = p.name("x");
        p.inputs.push(format!("input {name}: f32{}", dims(s)));
        p.vals.push(Val {
            name,
            shape: s.clone(),
            used: false,
        });
    }
    let statements = if rng.chance(20) {
        rng.range(10, 20)
    } else {
        rng.range(3, 10)
    };
    let mut made = 0;
    let mut tries = 0;
    while made < statements && tries < 100 {
        tries += 1;
        if p.step(&mut rng) {
            made += 1;
        }
    }
    let src = p.source(&mut rng);
    let mut inputs = TensorMap::new();
    for (i, s) in shapes.iter().enumerate() {
        let v: Vec<f32> = (0..numel(s)).map(|_| rng.normal()).collect();
        inputs.insert(format!("x{}", i + 1), Tensor::f32(s.clone(), v));
    }
    if let Some(vocab) = p.vocab {
        let v = (0..numel(&p.ids_shape))
            .map(|_| rng.range(0, vocab - 1) as i32)
            .collect();
        inputs.insert("ids".into(), Tensor::i32(p.ids_shape.clone(), v));
    }
    if let Some(c) = p.classes {
        let v = (0..n).map(|_| rng.range(0, c - 1) as i32).collect();
        inputs.insert("labels".into(), Tensor::i32(vec![n], v));
    }
    (src, inputs)
}

/// Every f32 tensor of `want` in `got`, within `atol·scale + rtol·|e|`,
/// `scale` the tensor's largest magnitude (at least 1): reductions and
/// products sum in another order in the JIT, so their error is relative
/// to the terms, not to the result.
fn close(
    what: &str,
    got: &TensorMap,
    want: &TensorMap,
    rtol: f32,
    atol: f32,
) -> Result<(), String> {
    for (name, w) in want {
        // An attention key bias adds the same logit to a whole row, which
        // the softmax cancels: its gradient is zero, computed as a sum of
        // terms that cancel, so its rounding has no scale of its own.
        if name.ends_with(".bk") {
            continue;
        }
        let g = got.get(name).ok_or(format!("{what}: {name} missing"))?;
        if g.shape != w.shape {
            return Err(format!(
                "{what}: {name} shape {:?} vs {:?}",
                g.shape, w.shape
            ));
        }
        let (Some(gv), Some(wv)) = (g.as_f32(), w.as_f32()) else {
            continue;
        };
        let scale = wv.iter().fold(1f32, |m, x| m.max(x.abs()));
        for (i, (a, e)) in gv.iter().zip(wv).enumerate() {
            let ok = (a - e).abs() <= atol * scale + rtol * e.abs()
                || (a.is_nan() && e.is_nan())
                || a == e;
            if !ok {
                return Err(format!("{what}: {name}[{i}]: jit {a} vs interp {e}"));
            }
        }
    }
    Ok(())
}

fn bits(m: &TensorMap) -> Vec<(String, Vec<u32>)> {
    m.iter()
        .map(|(k, t)| {
            let b = match (t.as_f32(), t.as_i32()) {
                (Some(v), _) => v.iter().map(|x| x.to_bits()).collect(),
                (_, Some(v)) => v.iter().map(|&x| x as u32).collect(),
                _ => Vec::new(),
            };
            (k.clone(), b)
        })
        .collect()
}

/// What one backend computes for a program: forward outputs, gradients,
/// and the parameters and state after two optimizer steps.
fn evaluate(
    src: &str,
    inputs: &TensorMap,
    (optimizer, regularizer): (Optimizer, Option<Regularizer>),
    backend: Backend,
    threads: usize,
) -> Result<[TensorMap; 3], String> {
    let model = Compiler::new()
        .backend(backend)
        .threads(threads)
        .compile_source("random.dl", src)
        .map_err(|e| format!("compile: {e}"))?;
    // Random parameters (the same for both backends), not the
    // initialisers' ones and zeros: a layer norm's zero-mean rows, pooled,
    // are zero up to rounding, and a relu of that takes the rounding's sign.
    let mut s = model.session_with_seed(7);
    let mut rng = Rng::new(0x5eed);
    for (name, ty) in model.params() {
        let v = (0..numel(&ty.shape)).map(|_| 0.5 * rng.normal()).collect();
        s.set_param(&name, Tensor::f32(ty.shape.clone(), v))
            .map_err(|e| format!("set_param: {e}"))?;
    }
    let fwd = s.run(inputs).map_err(|e| format!("run: {e}"))?;
    let grads = s.gradients(inputs).map_err(|e| format!("gradients: {e}"))?;
    s.set_optimizer(optimizer, regularizer);
    for _ in 0..2 {
        s.train_step(inputs).map_err(|e| format!("train: {e}"))?;
    }
    Ok([fwd, grads, s.checkpoint()])
}

/// SGD with momentum, or Adam with a large epsilon, at a small rate: a
/// random program's gradients can be large, and a step far into a region
/// where they explode compares rounding noise. Adam's first steps
/// move every weight by about ±lr whatever its gradient's size (`m̂ /
/// sqrt(v̂)` is the gradient's sign), so with the usual epsilon a gradient
/// that is zero up to rounding (a key bias's) would move by ±lr either
/// way; an epsilon near the gradients' size keeps the step smooth in them.
fn optimizer(seed: u64) -> Optimizer {
    if seed.is_multiple_of(2) {
        Optimizer::Sgd {
            lr: 0.01,
            momentum: 0.9,
        }
    } else {
        Optimizer::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 0.5,
        }
    }
}

/// No penalty, or an L2 or L1 one (over the parameters of rank 2 or more).
fn regularizer(seed: u64) -> Option<Regularizer> {
    match (seed / 2) % 3 {
        0 => None,
        1 => Some(Regularizer::L2(0.01)),
        _ => Some(Regularizer::L1(0.01)),
    }
}

fn check(seed: u64) -> Result<(), String> {
    let (src, inputs) = generate(seed);
    let opt = (optimizer(seed), regularizer(seed));
    let want = evaluate(&src, &inputs, opt.clone(), Backend::Interp, 1)?;
    let mut first: Option<[TensorMap; 3]> = None;
    for threads in [1, 2, 3] {
        let got = evaluate(&src, &inputs, opt.clone(), Backend::Jit, threads)?;
        close("forward", &got[0], &want[0], 1e-5, 1e-5)?;
        close("gradients", &got[1], &want[1], 1e-4, 1e-4)?;
        close("after two optimizer steps", &got[2], &want[2], 1e-4, 1e-4)?;
        match &first {
            None => first = Some(got),
            Some(f) => {
                for (a, b) in f.iter().zip(&got) {
                    if bits(a) != bits(b) {
                        return Err(format!("threads={threads} differs bitwise from threads=1"));
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn random_programs_match_the_interpreter() {
    let count: u64 = std::env::var("DLC_RANDOM_PROGRAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let first: u64 = std::env::var("DLC_RANDOM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut failures = Vec::new();
    for seed in first..first + count {
        if let Err(e) = check(seed) {
            let (src, inputs) = generate(seed);
            // `DLC_RANDOM_DUMP=DIR` keeps the failing programs for `dlc run`.
            if let Ok(dir) = std::env::var("DLC_RANDOM_DUMP") {
                let dir = std::path::Path::new(&dir);
                let _ = std::fs::write(dir.join(format!("{seed}.dl")), &src);
                let path = dir.join(format!("{seed}.safetensors"));
                let _ = dlc::io::write_tensors(&path, &inputs);
            }
            eprintln!("seed {seed}: {e}\n{src}");
            failures.push(seed);
        }
    }
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
}
