//! Bad input of every kind through the binary: each gives exit code 1 and a
//! one-sentence message naming what is wrong (or, where the input is
//! merely unusual, a warning and success) — never a panic, and never an
//! output file left behind by a failed run.

use dlc::io::{encode_npy, encode_safetensors, write_safetensors, TensorMap};
use dlc::tensor::Tensor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const AFFINE: &str = "model affine {
    input x: f32[N, 2]
    param w: f32[2, 1] = ones
    output y = x @ w
}
";

const CLF: &str = "model clf {
    input x: f32[N, 2]
    input label: i32[N]
    logits = x |> dense(2)
    loss = cross_entropy(logits, label)
}
";

const EMBED: &str = "model emb {
    input ids: i32[N, T]
    e = embedding(ids, 5, 3)
    output y = e
}
";

/// A scratch folder with the models and a good input file.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let f = Fixture {
            dir: tempfile::tempdir().unwrap(),
        };
        f.write("affine.dl", AFFINE.as_bytes());
        f.write("clf.dl", CLF.as_bytes());
        f.write("emb.dl", EMBED.as_bytes());
        f.tensors(
            "x.safetensors",
            vec![("x", Tensor::f32(vec![3, 2], vec![1., 2., 3., 4., 5., 6.]))],
        );
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn tensors(&self, name: &str, items: Vec<(&str, Tensor)>) -> PathBuf {
        let p = self.path(name);
        let m: TensorMap = items.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        write_safetensors(&p, &m, None).unwrap();
        p
    }

    /// Run dlc in the fixture folder.
    fn dlc(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_dlc"))
            .current_dir(self.dir.path())
            .args(args)
            .output()
            .expect("run dlc")
    }

    /// Assert a user error: exit code 1, `needles` in stderr, no panic.
    fn fails(&self, args: &[&str], needles: &[&str]) -> String {
        let o = self.dlc(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: expected `{n}` in:\n{err}");
        }
        err
    }

    /// Assert success with `needles` in stderr; returns stdout.
    fn warns(&self, args: &[&str], needles: &[&str]) -> String {
        let o = self.dlc(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: expected `{n}` in:\n{err}");
        }
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

fn assert_absent(p: &Path) {
    assert!(!p.exists(), "{} was left behind", p.display());
}

#[test]
fn missing_source_file() {
    let f = Fixture::new();
    f.fails(
        &["check", "nope.dl"],
        &["cannot read source file `nope.dl`"],
    );
    f.fails(
        &["run", "nope.dl", "--inputs", "x.safetensors"],
        &["`nope.dl`"],
    );
}

#[test]
fn bad_source_is_shown_with_location_and_caret() {
    let f = Fixture::new();
    f.write(
        "bad.dl",
        b"model m {\n    input x: f32[N, 2]\n    output y = relu(q)\n}\n",
    );
    let err = f.fails(
        &["check", "bad.dl"],
        &["bad.dl:3:21", "unknown name `q`", "^"],
    );
    assert!(err.contains("output y = relu(q)"), "{err}");
}

#[test]
fn every_source_error_is_reported_at_once() {
    let f = Fixture::new();
    f.write(
        "two.dl",
        b"model m {\n    input x: f32[N, 2]\n    a = relu(p)\n    b = tanh(q)\n}\n",
    );
    f.fails(
        &["check", "two.dl"],
        &["two.dl:3:", "two.dl:4:", "`p`", "`q`"],
    );
}

#[test]
fn missing_inputs_file() {
    let f = Fixture::new();
    f.fails(
        &["run", "affine.dl", "--inputs", "missing.safetensors"],
        &["cannot read `missing.safetensors`"],
    );
}

#[test]
fn missing_input_tensor() {
    let f = Fixture::new();
    f.fails(
        &["run", "clf.dl", "--inputs", "x.safetensors"],
        &["missing input `label`", "clf"],
    );
}

#[test]
fn input_of_the_wrong_shape() {
    let f = Fixture::new();
    f.tensors(
        "x33.safetensors",
        vec![("x", Tensor::f32(vec![3, 3], vec![0.0; 9]))],
    );
    f.fails(
        &["run", "affine.dl", "--inputs", "x33.safetensors"],
        &["affine.dl:2:", "`x`", "[3, 3]"],
    );
}

#[test]
fn input_of_the_wrong_dtype() {
    let f = Fixture::new();
    f.tensors(
        "xi.safetensors",
        vec![("x", Tensor::i32(vec![3, 2], vec![0; 6]))],
    );
    f.fails(
        &["run", "affine.dl", "--inputs", "xi.safetensors"],
        &["input `x` is i32", "expects f32"],
    );
}

#[test]
fn unsupported_dtype_in_a_safetensors_file() {
    let f = Fixture::new();
    let bytes = [0u8; 16];
    let v =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![1, 2], &bytes).unwrap();
    f.write(
        "f64.safetensors",
        &safetensors::serialize([("x", v)], None).unwrap(),
    );
    f.fails(
        &["run", "affine.dl", "--inputs", "f64.safetensors"],
        &["tensor `x`", "f64.safetensors", "F64", "F32 and I32"],
    );
}

#[test]
fn truncated_safetensors() {
    let f = Fixture::new();
    let m = TensorMap::from([("x".to_string(), Tensor::f32(vec![3, 2], vec![1.0; 6]))]);
    let bytes = encode_safetensors(&m, None).unwrap();
    f.write("cut.safetensors", &bytes[..bytes.len() - 5]);
    f.fails(
        &["run", "affine.dl", "--inputs", "cut.safetensors"],
        &["`cut.safetensors` is not a valid safetensors file"],
    );
}

#[test]
fn garbage_safetensors() {
    let f = Fixture::new();
    f.write("junk.safetensors", b"this is not a tensor file at all");
    f.fails(
        &["run", "affine.dl", "--inputs", "junk.safetensors"],
        &["`junk.safetensors` is not a valid safetensors file"],
    );
    f.write("empty.safetensors", b"");
    f.fails(
        &["run", "affine.dl", "--inputs", "empty.safetensors"],
        &["`empty.safetensors`"],
    );
}

#[test]
fn garbage_and_truncated_npy() {
    let f = Fixture::new();
    f.write("x.npy", b"\x93NUMPY garbage");
    f.fails(
        &["run", "affine.dl", "--inputs", "x.npy"],
        &["`x.npy` is not a valid npy file"],
    );
    let good = encode_npy(&Tensor::f32(vec![3, 2], vec![1.0; 6]));
    f.write("x.npy", &good[..good.len() - 2]);
    f.fails(
        &["run", "affine.dl", "--inputs", "x.npy"],
        &["`x.npy`", "truncated"],
    );
}

#[test]
fn npy_of_an_unsupported_dtype() {
    let f = Fixture::new();
    let mut b = encode_npy(&Tensor::f32(vec![3], vec![1.0; 3]));
    let at = b.windows(3).position(|w| w == b"<f4").unwrap();
    b[at..at + 3].copy_from_slice(b"<f8");
    f.write("x.npy", &b);
    f.fails(
        &["run", "affine.dl", "--inputs", "x.npy"],
        &["`x.npy`", "<f8", "F32 and I32"],
    );
}

#[test]
fn label_out_of_range_and_no_output_file() {
    let f = Fixture::new();
    f.tensors(
        "bad_labels.safetensors",
        vec![
            ("x", Tensor::f32(vec![2, 2], vec![1., 2., 3., 4.])),
            ("label", Tensor::i32(vec![2], vec![0, 5])),
        ],
    );
    f.fails(
        &[
            "run",
            "clf.dl",
            "--inputs",
            "bad_labels.safetensors",
            "--out",
            "out.safetensors",
        ],
        &["cross_entropy", "label 5", "[0, 2)"],
    );
    assert_absent(&f.path("out.safetensors"));
}

#[test]
fn token_id_out_of_range() {
    let f = Fixture::new();
    f.tensors(
        "ids.safetensors",
        vec![("ids", Tensor::i32(vec![1, 3], vec![0, 4, 7]))],
    );
    f.fails(
        &[
            "run",
            "emb.dl",
            "--inputs",
            "ids.safetensors",
            "--out",
            "o.safetensors",
        ],
        &["gather", "id 7", "[0, 5)"],
    );
    assert_absent(&f.path("o.safetensors"));
    f.tensors(
        "neg.safetensors",
        vec![("ids", Tensor::i32(vec![1, 1], vec![-1]))],
    );
    f.fails(
        &["run", "emb.dl", "--inputs", "neg.safetensors"],
        &["id -1"],
    );
}

#[test]
fn missing_parameter_is_initialised() {
    let f = Fixture::new();
    f.tensors(
        "in.safetensors",
        vec![
            ("x", Tensor::f32(vec![1, 2], vec![1., 2.])),
            ("label", Tensor::i32(vec![1], vec![1])),
        ],
    );
    f.tensors(
        "p.safetensors",
        vec![("logits.bias", Tensor::f32(vec![2], vec![0.5, -0.5]))],
    );
    let out = f.warns(
        &[
            "run",
            "clf.dl",
            "--inputs",
            "in.safetensors",
            "--params",
            "p.safetensors",
        ],
        &["initialised 1 parameter", "logits.weight"],
    );
    assert!(out.contains("loss: f32[]"), "{out}");
}

#[test]
fn unknown_extra_tensors_are_warnings() {
    let f = Fixture::new();
    f.tensors(
        "extra.safetensors",
        vec![
            ("x", Tensor::f32(vec![1, 2], vec![1., 2.])),
            ("bogus", Tensor::f32(vec![1], vec![0.])),
        ],
    );
    f.tensors(
        "p.safetensors",
        vec![
            ("w", Tensor::f32(vec![2, 1], vec![1., 1.])),
            ("old.w", Tensor::scalar(1.0)),
        ],
    );
    let out = f.warns(
        &[
            "run",
            "affine.dl",
            "--inputs",
            "extra.safetensors",
            "--params",
            "p.safetensors",
        ],
        &["warning:", "`bogus`", "`old.w`", "ignored"],
    );
    assert!(out.contains("[3.000000]"), "{out}");
}

#[test]
fn nan_in_an_input_propagates() {
    let f = Fixture::new();
    f.tensors(
        "nan.safetensors",
        vec![("x", Tensor::f32(vec![2, 2], vec![f32::NAN, 1., 2., 3.]))],
    );
    let out = f.warns(&["run", "affine.dl", "--inputs", "nan.safetensors"], &[]);
    assert!(out.contains("[NaN, 5.000000]"), "{out}");
}

#[test]
fn parameter_of_the_wrong_shape_names_file_and_tensor() {
    let f = Fixture::new();
    f.tensors(
        "p.safetensors",
        vec![("w", Tensor::f32(vec![1, 2], vec![1., 1.]))],
    );
    f.fails(
        &[
            "run",
            "affine.dl",
            "--inputs",
            "x.safetensors",
            "--params",
            "p.safetensors",
        ],
        &["`w` in `p.safetensors`", "[1, 2]", "[2, 1]"],
    );
    f.tensors(
        "pi.safetensors",
        vec![("w", Tensor::i32(vec![2, 1], vec![1, 1]))],
    );
    f.fails(
        &[
            "run",
            "affine.dl",
            "--inputs",
            "x.safetensors",
            "--params",
            "pi.safetensors",
        ],
        &["`w` in `pi.safetensors` is i32", "expects f32"],
    );
}

/// RAM plus swap of this machine, from /proc/meminfo (GiB).
fn machine_gib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((kib("MemTotal:")? + kib("SwapTotal:").unwrap_or(0)) >> 20)
}

/// Models too large for the machine get an error, not an aborted process
/// (Rust aborts when an allocation fails): parameters and inputs beyond its
/// memory are refused at elaboration, at the largest one, and a memory plan
/// the machine cannot give is refused when the JIT allocates it. Each
/// tensor here has 2^34 elements (64 GiB), the most a tensor may have, so
/// the test checks machines with less than 128 GiB of RAM and swap.
#[test]
fn models_too_large_for_the_machine() {
    let Some(gib) = machine_gib().filter(|&g| g < 128) else {
        eprintln!("skipped: this machine has 128 GiB of memory or more, or no /proc/meminfo");
        return;
    };
    let f = Fixture::new();
    f.write(
        "params.dl",
        b"model big {
    input x: f32[1, 131072]
    param w: f32[131072, 131072] = zeros
    param v: f32[131072, 131072] = zeros
    output y = x @ w + x @ v
}
",
    );
    let err = f.fails(
        &["compile", "params.dl"],
        &[
            "parameter `w` takes 64.0 GiB",
            "parameters and inputs 128.0 GiB",
            "more than this machine's memory",
            "params.dl:3:11",
            "^",
        ],
    );
    assert!(err.contains(&format!("({gib}.")), "{err}");
    // 4 MiB of inputs, 128 GiB of intermediate values: `c` and `d` are
    // both live while `e` is computed.
    f.write(
        "plan.dl",
        b"model big {
    input a: f32[131072, 1]
    input b: f32[1, 131072]
    c = a @ b
    d = c * c
    output e = sum(c + d)
}
",
    );
    f.fails(
        &["compile", "plan.dl"],
        &[
            "intermediate values need",
            "more memory than the machine can give",
        ],
    );
}

#[test]
fn bad_dim_flag() {
    let f = Fixture::new();
    for bad in ["N", "N=abc", "N=0", "=4"] {
        f.fails(
            &["compile", "affine.dl", "--dim", bad],
            &["--dim", "NAME=SIZE"],
        );
    }
}

#[test]
fn unbound_dimension_suggests_the_dim_flag() {
    let f = Fixture::new();
    f.fails(&["compile", "affine.dl"], &["`N`", "--dim"]);
}

#[test]
fn unknown_model() {
    let f = Fixture::new();
    f.fails(
        &["compile", "affine.dl", "--dim", "N=2", "--model", "nope"],
        &["nope", "affine"],
    );
}

#[test]
fn unknown_flags_and_values() {
    let f = Fixture::new();
    f.fails(&["run", "affine.dl"], &["--inputs"]);
    f.fails(&["frobnicate"], &["frobnicate"]);
    f.fails(
        &["compile", "affine.dl", "--dim", "N=2", "--emit", "pixels"],
        &["--emit", "`pixels`"],
    );
    f.fails(
        &["compile", "affine.dl", "--dim", "N=2", "-O3"],
        &["invalid value '3'", "-O"],
    );
    f.fails(
        &["compile", "affine.dl", "--dim", "N=2", "--backend", "gpu"],
        &["unknown backend `gpu`"],
    );
    f.fails(
        &["compile", "affine.dl", "--dim", "N=2", "--stats", "yaml"],
        &["--stats", "`yaml`"],
    );
}

#[test]
fn output_into_a_missing_directory_leaves_nothing() {
    let f = Fixture::new();
    f.fails(
        &[
            "run",
            "affine.dl",
            "--inputs",
            "x.safetensors",
            "--out",
            "no/such/dir/out.safetensors",
        ],
        &["cannot write `no/such/dir/out.safetensors`"],
    );
    assert_absent(&f.path("no"));
}

#[test]
fn training_data_problems() {
    let f = Fixture::new();
    f.tensors(
        "rows.safetensors",
        vec![
            ("x", Tensor::f32(vec![3, 2], vec![0.; 6])),
            ("label", Tensor::i32(vec![2], vec![0, 1])),
        ],
    );
    f.fails(
        &[
            "train",
            "clf.dl",
            "--data",
            "rows.safetensors",
            "--out",
            "c.safetensors",
        ],
        &["`rows.safetensors`", "`label` has 2 rows but `x` has 3"],
    );
    assert_absent(&f.path("c.safetensors"));
    f.fails(
        &["train", "clf.dl", "--data", "x.safetensors"],
        &["`x.safetensors` has no tensor `label`"],
    );
    f.fails(
        &["train", "affine.dl", "--data", "x.safetensors"],
        &["no `loss`"],
    );
    f.fails(
        &["train", "clf.dl", "--data", "x.safetensors", "--batch", "0"],
        &["batch size"],
    );
    f.fails(
        &[
            "train",
            "clf.dl",
            "--data",
            "x.safetensors",
            "--optimizer",
            "adam",
            "--momentum",
            "0.9",
        ],
        &["--momentum"],
    );
    f.fails(
        &["train", "clf.dl", "--data", "x.safetensors", "--lr", "-1"],
        &["--lr"],
    );
}

#[test]
fn training_with_a_bad_label_keeps_no_checkpoint() {
    let f = Fixture::new();
    f.tensors(
        "d.safetensors",
        vec![
            ("x", Tensor::f32(vec![2, 2], vec![0.; 4])),
            ("label", Tensor::i32(vec![2], vec![0, 9])),
        ],
    );
    f.fails(
        &[
            "train",
            "clf.dl",
            "--data",
            "d.safetensors",
            "--out",
            "c.safetensors",
        ],
        &["label 9"],
    );
    assert_absent(&f.path("c.safetensors"));
}

#[test]
fn golden_runner_without_cases() {
    let f = Fixture::new();
    std::fs::create_dir(f.path("empty")).unwrap();
    f.fails(&["test", "empty"], &["no golden cases"]);
    f.fails(
        &["test", "does-not-exist"],
        &["cannot read directory `does-not-exist`"],
    );
}

#[test]
fn malformed_case_toml_fails_its_case() {
    let f = Fixture::new();
    let case = f.path("case");
    std::fs::create_dir(&case).unwrap();
    std::fs::write(case.join("model.dl"), AFFINE).unwrap();
    std::fs::write(case.join("case.toml"), "rtol = \"tight\"\n").unwrap();
    let o = f.dlc(&["test", "case"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out.contains("FAIL case") && out.contains("case.toml"),
        "{out}"
    );
    assert!(out.contains("0 passed, 1 failed"), "{out}");
}

#[test]
fn a_closed_stdout_is_not_a_crash() {
    let f = Fixture::new();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dlc"))
        .current_dir(f.dir.path())
        .args(["compile", "clf.dl", "--emit", "ast"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end before dlc writes: its writes fail with EPIPE.
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(o.status.code(), Some(0), "{err}");
}
