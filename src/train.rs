//! `dlc train`: minibatch training over tensors sliced along axis 0.
//!
//! The training step is compiled once, for the batch size; the examples of
//! an epoch are shuffled with a generator seeded by `(seed, epoch number)`
//! and cut into full batches. **A last partial batch is dropped** (it would
//! need a second compiled step, and shuffling moves different examples into
//! it every epoch, so none is left out for good).
//!
//! After every epoch the parameters and the optimizer state are written
//! atomically to the checkpoint, with the number of epochs done in the
//! file's metadata; a checkpoint given back as `--params` resumes training
//! with the state and the epoch count (so the shuffles continue where they
//! left off).

use crate::api::{self, Backend, CompiledModel, Compiler, Executable, Session, TensorMap};
use crate::init::SplitMix64;
use crate::io::{self, IoError};
use crate::ir::{fmt_shape, OutputKind};
use crate::model::Optimizer;
use crate::tensor::{Data, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Metadata key of a checkpoint: how many epochs it has seen.
pub const EPOCHS_KEY: &str = "dlc.epochs";

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Api(#[from] api::Error),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("`{}` holds no examples (its tensors have 0 rows)", path.display())]
    Empty { path: PathBuf },
    #[error("tensors in `{}` disagree on the number of examples: `{a}` has {na} rows but `{b}` has {nb}", path.display())]
    Rows {
        path: PathBuf,
        a: String,
        na: usize,
        b: String,
        nb: usize,
    },
    #[error("`{}` has no tensor `{name}`, which model `{model}` takes as input", path.display())]
    MissingInput {
        path: PathBuf,
        name: String,
        model: String,
    },
    #[error("tensor `{name}` in `{}` is a scalar; training data must have the examples along axis 0", path.display())]
    Scalar { path: PathBuf, name: String },
    #[error("tensor `{name}` in `{}` has examples of shape {got} ({dtype}) but model `{model}` expects {want} ({want_dtype})", path.display())]
    ExampleShape {
        path: PathBuf,
        name: String,
        model: String,
        got: String,
        dtype: crate::tensor::DType,
        want: String,
        want_dtype: crate::tensor::DType,
    },
    #[error(
        "model `{model}` has no `loss`, so it cannot be trained; add a `loss = ...` statement"
    )]
    NoLoss { model: String },
    #[error("the batch size must be at least 1")]
    ZeroBatch,
    #[error("{0}")]
    Options(String),
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// Which optimizer `--optimizer` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    Sgd,
    Adam,
}

/// The optimizer of a run: the command line overrides the model's `train`
/// block, which overrides the defaults of LANGUAGE.md §8.
pub fn choose_optimizer(
    from_model: Option<&Optimizer>,
    kind: Option<OptimizerKind>,
    lr: Option<f32>,
    momentum: Option<f32>,
) -> Result<Optimizer> {
    let base = match (kind, from_model) {
        (Some(OptimizerKind::Sgd), Some(o @ Optimizer::Sgd { .. }))
        | (Some(OptimizerKind::Adam), Some(o @ Optimizer::Adam { .. })) => o.clone(),
        (Some(OptimizerKind::Sgd), _) => Optimizer::Sgd {
            lr: 0.01,
            momentum: 0.0,
        },
        (Some(OptimizerKind::Adam), _) => Optimizer::Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        (None, Some(o)) => o.clone(),
        (None, None) => Optimizer::default(),
    };
    let bad = |what: &str, v: f32| {
        TrainError::Options(format!(
            "{what} must be a finite number >= 0, but it is {v}"
        ))
    };
    if let Some(v) = lr.filter(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(TrainError::Options(format!(
            "--lr must be a finite number > 0, but it is {v}"
        )));
    }
    if let Some(v) = momentum.filter(|v| !(v.is_finite() && *v >= 0.0)) {
        return Err(bad("--momentum", v));
    }
    Ok(match base {
        Optimizer::Sgd { lr: l, momentum: m } => Optimizer::Sgd {
            lr: lr.unwrap_or(l),
            momentum: momentum.unwrap_or(m),
        },
        Optimizer::Adam {
            lr: l,
            beta1,
            beta2,
            eps,
        } => {
            if momentum.is_some() {
                return Err(TrainError::Options(
                    "--momentum applies to sgd only; adam has beta1 and beta2 instead".into(),
                ));
            }
            Optimizer::Adam {
                lr: lr.unwrap_or(l),
                beta1,
                beta2,
                eps,
            }
        }
    })
}

/// What `dlc train` was asked to do.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub data: PathBuf,
    pub eval: Option<PathBuf>,
    pub batch: usize,
    pub seed: u64,
    pub model: Option<String>,
    pub dims: BTreeMap<String, usize>,
    pub optimizer: Option<OptimizerKind>,
    pub lr: Option<f32>,
    pub momentum: Option<f32>,
    pub backend: Backend,
    pub threads: Option<usize>,
}

/// The result of one epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochReport {
    /// 1-based, counting epochs of earlier runs that were resumed.
    pub epoch: usize,
    /// Mean training objective (loss + regulariser) over the epoch's batches.
    pub train_loss: f32,
    pub examples: usize,
    pub examples_per_sec: f64,
    pub eval: Option<EvalReport>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    /// Mean `loss` over the evaluation set.
    pub loss: f32,
    /// Fraction of examples whose argmax logit is the label, when the
    /// model's loss is a classification loss (`cross_entropy`, `hinge`).
    pub accuracy: Option<f32>,
}

/// A training run in progress.
pub struct Trainer {
    source: PathBuf,
    opts: TrainOptions,
    session: Session,
    data: TensorMap,
    rows: usize,
    batch: usize,
    epochs_done: usize,
    eval: Option<(TensorMap, usize)>,
    eval_models: BTreeMap<usize, (CompiledModel, Box<dyn Executable>)>,
    /// Names in the data or eval files that the model does not take.
    pub ignored: Vec<String>,
}

impl Trainer {
    /// Read the data, compile the training step for the batch size and
    /// initialise parameters from the seed.
    pub fn new(source: &Path, opts: TrainOptions) -> Result<Trainer> {
        if opts.batch == 0 {
            return Err(TrainError::ZeroBatch);
        }
        // Reject contradictory flags before any file is read.
        choose_optimizer(None, opts.optimizer, opts.lr, opts.momentum)?;
        let data = io::read_tensors(&opts.data)?;
        let rows = count_rows(&data, &opts.data)?;
        let batch = opts.batch.min(rows);
        let model = compile_for(source, &opts, &data, batch)?;
        if !model.has_loss() {
            return Err(TrainError::NoLoss {
                model: model.name().to_string(),
            });
        }
        let (data, mut ignored) = select_inputs(&model, data, &opts.data)?;
        let eval = match &opts.eval {
            Some(p) => {
                let e = io::read_tensors(p)?;
                let n = count_rows(&e, p)?;
                let (e, ign) = select_inputs(&model, e, p)?;
                ignored.extend(ign);
                Some((e, n))
            }
            None => None,
        };
        let mut session = model.session_with_seed(opts.seed);
        let optimizer = choose_optimizer(
            model.model().train.optimizer.as_ref(),
            opts.optimizer,
            opts.lr,
            opts.momentum,
        )?;
        session.set_optimizer(optimizer, model.model().train.regularize);
        Ok(Trainer {
            source: source.to_path_buf(),
            opts,
            session,
            data,
            rows,
            batch,
            epochs_done: 0,
            eval,
            eval_models: BTreeMap::new(),
            ignored,
        })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Examples per epoch (full batches only).
    pub fn examples_per_epoch(&self) -> usize {
        (self.rows / self.batch) * self.batch
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.rows / self.batch
    }

    pub fn epochs_done(&self) -> usize {
        self.epochs_done
    }

    /// Load parameters, optimizer state and the epoch count from a
    /// checkpoint (or plain parameters); returns the names the model does
    /// not use.
    pub fn load(&mut self, path: &Path) -> Result<Vec<String>> {
        let (tensors, meta) = if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
        {
            (io::read_tensors(path)?, BTreeMap::new())
        } else {
            io::read_safetensors_with_metadata(path)?
        };
        let unknown = self
            .session
            .set_params(&tensors)
            .map_err(|e| e.in_file(path))?;
        self.epochs_done = meta
            .get(EPOCHS_KEY)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok(unknown)
    }

    /// Write parameters, optimizer state and the epoch count, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let meta = BTreeMap::from([
            (EPOCHS_KEY.to_string(), self.epochs_done.to_string()),
            (
                "dlc.model".to_string(),
                self.session.model().name().to_string(),
            ),
        ]);
        io::write_safetensors(path, &self.session.checkpoint(), Some(&meta))?;
        Ok(())
    }

    /// One pass over the shuffled training data; `on_batch(done, running
    /// mean loss)` after every batch (for a progress bar).
    pub fn epoch(&mut self, mut on_batch: impl FnMut(usize, f32)) -> Result<EpochReport> {
        let epoch = self.epochs_done + 1;
        let order = shuffled(self.rows, self.opts.seed, epoch as u64);
        let started = Instant::now();
        let mut total = 0.0f64;
        let batches = self.batches_per_epoch();
        for b in 0..batches {
            let idx = &order[b * self.batch..(b + 1) * self.batch];
            let inputs = gather_rows(&self.data, idx);
            let step = self.session.train_step(&inputs)?;
            total += step.objective as f64;
            on_batch(b + 1, (total / (b + 1) as f64) as f32);
        }
        let secs = started.elapsed().as_secs_f64();
        self.epochs_done = epoch;
        let eval = self.evaluate()?;
        let examples = batches * self.batch;
        Ok(EpochReport {
            epoch,
            train_loss: (total / batches.max(1) as f64) as f32,
            examples,
            examples_per_sec: if secs > 0.0 {
                examples as f64 / secs
            } else {
                0.0
            },
            eval,
        })
    }

    /// Loss and accuracy on the evaluation set with the current parameters.
    pub fn evaluate(&mut self) -> Result<Option<EvalReport>> {
        let Some((data, rows)) = &self.eval else {
            return Ok(None);
        };
        let (data, rows) = (data.clone(), *rows);
        let mut loss_sum = 0.0f64;
        let (mut correct, mut counted) = (0usize, 0usize);
        let mut classifies = true;
        let mut start = 0;
        while start < rows {
            let size = self.batch.min(rows - start);
            let idx: Vec<usize> = (start..start + size).collect();
            let inputs = gather_rows(&data, &idx);
            let out = self.eval_batch(size, &inputs)?;
            let loss = out
                .get("loss")
                .and_then(|t| t.as_f32())
                .and_then(|v| v.first())
                .copied()
                .unwrap_or(f32::NAN);
            loss_sum += loss as f64 * size as f64;
            match (out.get(LOGITS), out.get(LABELS)) {
                (Some(l), Some(y)) => {
                    if let Some((c, n)) = count_correct(l, y) {
                        correct += c;
                        counted += n;
                    }
                }
                _ => classifies = false,
            }
            start += size;
        }
        Ok(Some(EvalReport {
            loss: (loss_sum / rows as f64) as f32,
            accuracy: (classifies && counted > 0).then(|| correct as f32 / counted as f32),
        }))
    }

    fn eval_batch(&mut self, size: usize, inputs: &TensorMap) -> Result<TensorMap> {
        if !self.eval_models.contains_key(&size) {
            let m = compile_for(&self.source, &self.opts, inputs, size)?;
            let mut g = m.graph().clone();
            if let Some((logits, labels)) = api::classification_operands(&g) {
                g.push_output(LOGITS, OutputKind::Output, logits);
                g.push_output(LABELS, OutputKind::Output, labels);
            }
            let exe = m.backend().prepare(&g, &m.exec_options())?;
            self.eval_models.insert(size, (m, exe));
        }
        let Some((m, exe)) = self.eval_models.get(&size) else {
            return Err(TrainError::Options("evaluation model missing".into()));
        };
        m.check_inputs(inputs)?;
        let mut out = TensorMap::new();
        exe.run_into(&[self.session.params(), inputs], &mut out)
            .map_err(|source| {
                TrainError::Api(api::Error::Run {
                    model: m.name().to_string(),
                    source,
                })
            })?;
        Ok(out)
    }
}

const LOGITS: &str = "__eval.logits";
const LABELS: &str = "__eval.labels";

/// `(correct, counted)` of argmax over the last axis of `[N, C]` logits
/// against `[N]` i32 labels (ties go to the first maximum).
fn count_correct(logits: &Tensor, labels: &Tensor) -> Option<(usize, usize)> {
    let (l, y) = (logits.as_f32()?, labels.as_i32()?);
    let c = *logits.shape.last()?;
    if c == 0 || l.len() != y.len() * c {
        return None;
    }
    let correct = l
        .chunks(c)
        .zip(y)
        .filter(|(row, label)| {
            let mut best = 0;
            for (j, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = j;
                }
            }
            best as i64 == **label as i64
        })
        .count();
    Some((correct, y.len()))
}

fn compile_for(
    source: &Path,
    opts: &TrainOptions,
    data: &TensorMap,
    batch: usize,
) -> Result<CompiledModel> {
    let mut c = Compiler::new()
        .backend(opts.backend)
        .dims(opts.dims.clone());
    if let Some(m) = &opts.model {
        c = c.model(m.clone());
    }
    if let Some(t) = opts.threads {
        c = c.threads(t);
    }
    for (name, t) in data {
        if let Some((_, rest)) = t.shape.split_first() {
            let mut shape = vec![batch];
            shape.extend_from_slice(rest);
            c = c.input_shape(name.clone(), shape);
        }
    }
    Ok(c.compile_file(source)?)
}

/// The number of examples: the common size of axis 0.
fn count_rows(data: &TensorMap, path: &Path) -> Result<usize> {
    let mut first: Option<(&str, usize)> = None;
    for (name, t) in data {
        let Some(n) = t.shape.first().copied() else {
            return Err(TrainError::Scalar {
                path: path.to_path_buf(),
                name: name.clone(),
            });
        };
        match first {
            None => first = Some((name, n)),
            Some((a, na)) if na != n => {
                return Err(TrainError::Rows {
                    path: path.to_path_buf(),
                    a: a.to_string(),
                    na,
                    b: name.clone(),
                    nb: n,
                })
            }
            Some(_) => {}
        }
    }
    match first {
        Some((_, n)) if n > 0 => Ok(n),
        _ => Err(TrainError::Empty {
            path: path.to_path_buf(),
        }),
    }
}

/// Keep the tensors the model takes as inputs (checking their per-example
/// shape and dtype); return the others' names.
fn select_inputs(
    model: &CompiledModel,
    mut data: TensorMap,
    path: &Path,
) -> Result<(TensorMap, Vec<String>)> {
    let mut kept = TensorMap::new();
    for (name, ty) in model.inputs() {
        let t = data.remove(&name).ok_or_else(|| TrainError::MissingInput {
            path: path.to_path_buf(),
            name: name.clone(),
            model: model.name().to_string(),
        })?;
        let per_example_ok = t.dtype() == ty.dtype
            && !ty.shape.is_empty()
            && t.shape.len() == ty.shape.len()
            && t.shape[1..] == ty.shape[1..];
        if !per_example_ok {
            return Err(TrainError::ExampleShape {
                path: path.to_path_buf(),
                name,
                model: model.name().to_string(),
                got: fmt_shape(t.shape.get(1..).unwrap_or(&[])),
                dtype: t.dtype(),
                want: fmt_shape(ty.shape.get(1..).unwrap_or(&[])),
                want_dtype: ty.dtype,
            });
        }
        kept.insert(name, t);
    }
    Ok((kept, data.into_keys().collect()))
}

/// A permutation of `0..n`, Fisher–Yates with a generator seeded by the run
/// seed and the epoch number.
pub fn shuffled(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// The rows `idx` (along axis 0) of every tensor.
pub fn gather_rows(data: &TensorMap, idx: &[usize]) -> TensorMap {
    data.iter()
        .map(|(name, t)| {
            let row: usize = t.shape.iter().skip(1).product();
            let mut shape = t.shape.clone();
            if let Some(d) = shape.first_mut() {
                *d = idx.len();
            }
            let data = match &t.data {
                Data::F32(v) => Data::F32(
                    idx.iter()
                        .flat_map(|&i| v[i * row..(i + 1) * row].iter().copied())
                        .collect(),
                ),
                Data::I32(v) => Data::I32(
                    idx.iter()
                        .flat_map(|&i| v[i * row..(i + 1) * row].iter().copied())
                        .collect(),
                ),
            };
            (name.clone(), Tensor { shape, data })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffles_are_permutations_that_depend_on_seed_and_epoch() {
        let a = shuffled(50, 7, 1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, shuffled(50, 7, 1));
        assert_ne!(a, shuffled(50, 7, 2));
        assert_ne!(a, shuffled(50, 8, 1));
    }

    #[test]
    fn rows_are_gathered_along_axis_zero() {
        let data = TensorMap::from([
            (
                "x".to_string(),
                Tensor::f32(vec![3, 2], vec![0., 1., 10., 11., 20., 21.]),
            ),
            ("y".to_string(), Tensor::i32(vec![3], vec![5, 6, 7])),
        ]);
        let b = gather_rows(&data, &[2, 0]);
        assert_eq!(b["x"], Tensor::f32(vec![2, 2], vec![20., 21., 0., 1.]));
        assert_eq!(b["y"], Tensor::i32(vec![2], vec![7, 5]));
    }

    #[test]
    fn row_counts_must_agree() {
        let p = Path::new("d.safetensors");
        let data = TensorMap::from([
            ("a".to_string(), Tensor::f32(vec![3], vec![0.; 3])),
            ("b".to_string(), Tensor::f32(vec![2], vec![0.; 2])),
        ]);
        let e = count_rows(&data, p).unwrap_err().to_string();
        assert!(e.contains("`a` has 3 rows but `b` has 2"), "{e}");
        let empty = TensorMap::from([("a".to_string(), Tensor::f32(vec![0, 2], vec![]))]);
        assert!(matches!(
            count_rows(&empty, p),
            Err(TrainError::Empty { .. })
        ));
    }

    #[test]
    fn accuracy_uses_argmax_with_first_maximum_on_ties() {
        let logits = Tensor::f32(vec![3, 2], vec![0.1, 0.9, 0.5, 0.5, 2.0, -1.0]);
        let labels = Tensor::i32(vec![3], vec![1, 1, 0]);
        // Row 1 ties, so its prediction is class 0, not the label 1.
        assert_eq!(count_correct(&logits, &labels), Some((2, 3)));
    }

    #[test]
    fn command_line_overrides_the_train_block() {
        let block = Optimizer::Sgd {
            lr: 0.05,
            momentum: 0.9,
        };
        let o = choose_optimizer(Some(&block), None, Some(0.5), None).unwrap();
        assert_eq!(
            o,
            Optimizer::Sgd {
                lr: 0.5,
                momentum: 0.9
            }
        );
        let o = choose_optimizer(Some(&block), Some(OptimizerKind::Adam), None, None).unwrap();
        assert!(matches!(o, Optimizer::Adam { lr, .. } if lr == 1e-3));
        assert!(choose_optimizer(None, Some(OptimizerKind::Adam), None, Some(0.9)).is_err());
        assert!(choose_optimizer(None, None, Some(-1.0), None).is_err());
        assert_eq!(
            choose_optimizer(None, None, None, None).unwrap(),
            Optimizer::default()
        );
    }
}
