//! The golden runner behind `dlc test`: cases computed by an independent
//! reference, each a folder with `model.dl`, `inputs.safetensors`,
//! `expected.safetensors` and optionally `params.safetensors` and
//! `case.toml` (CLI.md, "Golden case folder").
//!
//! A case passes when every expected tensor has a computed counterpart of
//! the same shape with `|a - e| <= atol + rtol·|e|` elementwise (NaN matches
//! only NaN). `grad.<param>` entries ask for gradients and get their own,
//! looser, tolerances.

use crate::api::{Backend, Compiler, Error as ApiError, TensorMap};
use crate::io;
use crate::tensor::{Data, Tensor};
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// The optional `case.toml` of a case.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CaseConfig {
    pub model: Option<String>,
    pub rtol: Option<f64>,
    pub atol: Option<f64>,
    pub grad_rtol: Option<f64>,
    pub grad_atol: Option<f64>,
    pub threads: Option<usize>,
}

impl CaseConfig {
    /// `(rtol, atol)` for a tensor of `expected.safetensors`.
    pub fn tolerance(&self, name: &str) -> (f64, f64) {
        if name.starts_with("grad.") {
            (
                self.grad_rtol.unwrap_or(1e-3),
                self.grad_atol.unwrap_or(1e-4),
            )
        } else {
            (self.rtol.unwrap_or(1e-4), self.atol.unwrap_or(1e-5))
        }
    }
}

/// How one case ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Passed {
        max_abs: f64,
        max_rel: f64,
    },
    Failed {
        reason: String,
        max_abs: f64,
        max_rel: f64,
    },
    Skipped {
        reason: String,
    },
}

/// One case's result, displayed as the case line of `dlc test`.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseReport {
    /// The case folder as it was found (relative to the searched dir's parent).
    pub name: String,
    pub outcome: Outcome,
}

impl fmt::Display for CaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Passed { max_abs, max_rel } => write!(
                f,
                "PASS {}  max abs err {max_abs:.3e}  max rel err {max_rel:.3e}",
                self.name
            ),
            Outcome::Failed {
                reason,
                max_abs,
                max_rel,
            } => write!(
                f,
                "FAIL {}  max abs err {max_abs:.3e}  max rel err {max_rel:.3e}: {reason}",
                self.name
            ),
            Outcome::Skipped { reason } => write!(f, "SKIP {}: {reason}", self.name),
        }
    }
}

/// Counts over a run; `Display` is the summary line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Summary {
    pub fn add(&mut self, r: &CaseReport) {
        match r.outcome {
            Outcome::Passed { .. } => self.passed += 1,
            Outcome::Failed { .. } => self.failed += 1,
            Outcome::Skipped { .. } => self.skipped += 1,
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} passed, {} failed", self.passed, self.failed)?;
        if self.skipped > 0 {
            write!(f, ", {} skipped", self.skipped)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GoldenError {
    #[error("cannot read directory `{}`: {source}", path.display())]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no golden cases (folders with a model.dl) under `{}`", path.display())]
    NoCases { path: PathBuf },
}

/// Every case folder (one holding `model.dl`) under `dir`, sorted.
pub fn find_cases(dir: &Path) -> Result<Vec<PathBuf>, GoldenError> {
    let mut found = Vec::new();
    walk(dir, &mut found)?;
    if found.is_empty() {
        return Err(GoldenError::NoCases {
            path: dir.to_path_buf(),
        });
    }
    found.sort();
    Ok(found)
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> Result<(), GoldenError> {
    let err = |source| GoldenError::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    if dir.join("model.dl").is_file() {
        found.push(dir.to_path_buf());
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let path = entry.map_err(err)?.path();
        if path.is_dir() {
            walk(&path, found)?;
        }
    }
    Ok(())
}

/// Options of a golden run.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    pub backend: Backend,
    /// Overrides the thread count (`case.toml`'s `threads` wins over it).
    pub threads: Option<usize>,
}

/// Run one case folder.
pub fn run_case(dir: &Path, opts: &RunOptions) -> CaseReport {
    let name = dir.display().to_string();
    let outcome = match evaluate(dir, opts) {
        Ok(o) => o,
        Err(reason) => Outcome::Failed {
            reason,
            max_abs: 0.0,
            max_rel: 0.0,
        },
    };
    CaseReport { name, outcome }
}

fn evaluate(dir: &Path, opts: &RunOptions) -> Result<Outcome, String> {
    let config = read_config(&dir.join("case.toml"))?;
    let inputs =
        io::read_safetensors(&dir.join("inputs.safetensors")).map_err(|e| e.to_string())?;
    let expected =
        io::read_safetensors(&dir.join("expected.safetensors")).map_err(|e| e.to_string())?;
    let params_path = dir.join("params.safetensors");
    let params = if params_path.exists() {
        io::read_safetensors(&params_path).map_err(|e| e.to_string())?
    } else {
        TensorMap::new()
    };

    let mut compiler = Compiler::new()
        .backend(opts.backend)
        .input_shapes_of(&inputs);
    if let Some(m) = &config.model {
        compiler = compiler.model(m.clone());
    }
    if let Some(t) = config.threads.or(opts.threads) {
        compiler = compiler.threads(t);
    }
    let model = match compiler.compile_file(&dir.join("model.dl")) {
        Ok(m) => m,
        Err(e) => return Err(first_line(&e.to_string())),
    };
    let mut session = model.session();
    let unknown = session.set_params(&params).map_err(|e| e.to_string())?;
    if let Some(n) = unknown.first() {
        return Err(format!(
            "params.safetensors has `{n}`, which is not a parameter of model `{}`",
            model.name()
        ));
    }
    let wants_grads = expected.keys().any(|k| k.starts_with("grad."));
    let result = if wants_grads {
        session.gradients(&inputs)
    } else {
        session.run(&inputs)
    };
    let computed = match result {
        Ok(c) => c,
        Err(ApiError::BackendUnavailable(b)) => {
            return Ok(Outcome::Skipped {
                reason: format!("the `{b}` backend is not available yet"),
            })
        }
        Err(e) => return Err(e.to_string()),
    };
    let (mut max_abs, mut max_rel) = (0.0f64, 0.0f64);
    let mut failure = None;
    for (name, e) in &expected {
        let (rtol, atol) = config.tolerance(name);
        let Some(a) = computed.get(name) else {
            failure.get_or_insert_with(|| format!("the model computes no `{name}`"));
            continue;
        };
        match compare(a, e, rtol, atol) {
            Ok(c) => {
                max_abs = max_abs.max(c.max_abs);
                max_rel = max_rel.max(c.max_rel);
                if let Some(m) = c.first_mismatch {
                    failure.get_or_insert_with(|| format!("`{name}`{m}"));
                }
            }
            Err(m) => {
                failure.get_or_insert_with(|| format!("`{name}`: {m}"));
            }
        }
    }
    Ok(match failure {
        None => Outcome::Passed { max_abs, max_rel },
        Some(reason) => Outcome::Failed {
            reason,
            max_abs,
            max_rel,
        },
    })
}

fn first_line(s: &str) -> String {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(s)
        .trim()
        .to_string()
}

fn read_config(path: &Path) -> Result<CaseConfig, String> {
    if !path.exists() {
        return Ok(CaseConfig::default());
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        format!(
            "`{}` is invalid: {}",
            path.display(),
            first_line(e.message())
        )
    })
}

/// The largest errors of one comparison and where it first failed.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub max_abs: f64,
    /// Largest `|a - e| / |e|` over elements with `|e| > atol`.
    pub max_rel: f64,
    /// `[index]: got a, expected e` of the first element out of tolerance.
    pub first_mismatch: Option<String>,
}

/// Compare a computed tensor with an expected one; `Err` when they cannot be
/// compared at all (shape or dtype).
pub fn compare(
    actual: &Tensor,
    expected: &Tensor,
    rtol: f64,
    atol: f64,
) -> Result<Comparison, String> {
    if actual.shape != expected.shape {
        return Err(format!(
            "shape {} but expected {}",
            crate::ir::fmt_shape(&actual.shape),
            crate::ir::fmt_shape(&expected.shape)
        ));
    }
    let pairs: Vec<(f64, f64)> = match (&actual.data, &expected.data) {
        (Data::F32(a), Data::F32(e)) => a
            .iter()
            .zip(e)
            .map(|(a, e)| (*a as f64, *e as f64))
            .collect(),
        (Data::I32(a), Data::I32(e)) => a
            .iter()
            .zip(e)
            .map(|(a, e)| (*a as f64, *e as f64))
            .collect(),
        _ => {
            return Err(format!(
                "dtype {} but expected {}",
                actual.dtype(),
                expected.dtype()
            ))
        }
    };
    let mut c = Comparison {
        max_abs: 0.0,
        max_rel: 0.0,
        first_mismatch: None,
    };
    for (i, (a, e)) in pairs.into_iter().enumerate() {
        let ok = if e.is_nan() || a.is_nan() {
            e.is_nan() && a.is_nan()
        } else if e.is_infinite() || a.is_infinite() {
            a == e
        } else {
            let d = (a - e).abs();
            c.max_abs = c.max_abs.max(d);
            // Below atol the relative error says nothing (atol governs).
            if e.abs() > atol {
                c.max_rel = c.max_rel.max(d / e.abs());
            }
            d <= atol + rtol * e.abs()
        };
        if !ok && c.first_mismatch.is_none() {
            c.first_mismatch = Some(format!(
                "[{}]: got {a}, expected {e} (rtol {rtol:e}, atol {atol:e})",
                unravel(i, &actual.shape)
            ));
        }
    }
    Ok(c)
}

/// `i` as a multi-index `2, 0, 1` of a row-major shape.
fn unravel(mut i: usize, shape: &[usize]) -> String {
    let mut idx = vec![0; shape.len()];
    for (k, d) in shape.iter().enumerate().rev() {
        if *d > 0 {
            idx[k] = i % d;
            i /= d;
        }
    }
    idx.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_is_atol_plus_rtol_times_expected() {
        let e = Tensor::f32(vec![2], vec![100.0, 0.0]);
        // 100 ± (1e-5 + 1e-4·100) = ± 0.01001
        let ok = Tensor::f32(vec![2], vec![100.01, 1e-5]);
        let c = compare(&ok, &e, 1e-4, 1e-5).unwrap();
        assert_eq!(c.first_mismatch, None);
        let bad = Tensor::f32(vec![2], vec![100.0, 2e-5]);
        let c = compare(&bad, &e, 1e-4, 1e-5).unwrap();
        assert!(c.first_mismatch.unwrap().starts_with("[1]: got"));
    }

    #[test]
    fn max_errors_are_reported() {
        let e = Tensor::f32(vec![2], vec![2.0, 4.0]);
        let a = Tensor::f32(vec![2], vec![2.5, 4.0]);
        let c = compare(&a, &e, 1.0, 0.0).unwrap();
        assert_eq!((c.max_abs, c.max_rel), (0.5, 0.25));
    }

    #[test]
    fn shape_dtype_and_nan_mismatches_fail() {
        let e = Tensor::f32(vec![2, 1], vec![1.0, f32::NAN]);
        assert!(compare(&Tensor::f32(vec![2], vec![1.0, 1.0]), &e, 1e-4, 1e-5).is_err());
        assert!(compare(&Tensor::i32(vec![2, 1], vec![1, 1]), &e, 1e-4, 1e-5).is_err());
        let nan_ok = compare(&Tensor::f32(vec![2, 1], vec![1.0, f32::NAN]), &e, 0.0, 0.0).unwrap();
        assert_eq!(nan_ok.first_mismatch, None);
        let not_nan = compare(&Tensor::f32(vec![2, 1], vec![1.0, 0.0]), &e, 1.0, 1.0).unwrap();
        assert_eq!(
            not_nan.first_mismatch.as_deref().map(|m| &m[..6]),
            Some("[1, 0]")
        );
    }

    #[test]
    fn grad_entries_get_grad_tolerances() {
        let c: CaseConfig = toml::from_str("rtol = 1e-2\ngrad_atol = 0.5").unwrap();
        assert_eq!(c.tolerance("y"), (1e-2, 1e-5));
        assert_eq!(c.tolerance("grad.w"), (1e-3, 0.5));
        assert!(toml::from_str::<CaseConfig>("tolerance = 1").is_err());
    }

    #[test]
    fn summary_mentions_skips_only_when_there_are_some() {
        let mut s = Summary {
            passed: 3,
            failed: 1,
            skipped: 0,
        };
        assert_eq!(s.to_string(), "3 passed, 1 failed");
        s.skipped = 2;
        assert_eq!(s.to_string(), "3 passed, 1 failed, 2 skipped");
    }

    #[test]
    fn cases_are_found_recursively() {
        let d = tempfile::tempdir().unwrap();
        for c in ["a/one", "a/two", "b"] {
            std::fs::create_dir_all(d.path().join(c)).unwrap();
            std::fs::write(d.path().join(c).join("model.dl"), "").unwrap();
        }
        std::fs::create_dir_all(d.path().join("empty")).unwrap();
        let found = find_cases(d.path()).unwrap();
        let rel: Vec<_> = found
            .iter()
            .map(|p| {
                p.strip_prefix(d.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(rel, ["a/one", "a/two", "b"]);
        assert!(find_cases(&d.path().join("empty")).is_err());
    }
}
