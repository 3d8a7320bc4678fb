//! The `dlc` commands end to end through the binary (CLI.md). Expected
//! numbers are computed by hand in the comments.

use dlc::io::{
    read_safetensors, read_safetensors_with_metadata, write_npy, write_safetensors, TensorMap,
};
use dlc::tensor::Tensor;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const AFFINE: &str = "model affine {
    input x: f32[N, 2]
    param w: f32[2, 1] = ones
    output y = x @ w
}
";

const FIT: &str = "model fit {
    input x: f32[N, 1]
    input t: f32[N, 1]
    param w: f32[1, 1]
    loss = mse(x @ w, t)
}
";

const CLF: &str = "model clf {
    input x: f32[N, 2]
    input label: i32[N]
    logits = x |> dense(2)
    output probs = softmax(logits)
    loss = cross_entropy(logits, label)
}
";

fn dlc(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dlc"));
    for a in args {
        c.arg(a);
    }
    c.output().expect("run dlc")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "dlc failed: {}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert!(!text(&o.stderr).contains("panicked"));
    text(&o.stdout)
}

fn file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

fn tensors(dir: &Path, name: &str, items: Vec<(&str, Tensor)>) -> PathBuf {
    let p = dir.join(name);
    let m: TensorMap = items.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    write_safetensors(&p, &m, None).unwrap();
    p
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.as_f32().expect("f32 tensor").to_vec()
}

#[test]
fn check_accepts_a_valid_file() {
    let d = tempfile::tempdir().unwrap();
    let src = file(d.path(), "clf.dl", CLF);
    let out = ok(&dlc(&[&"check", &src]));
    assert!(out.contains("no errors"), "{out}");
}

#[test]
fn run_prints_each_output_with_shape_and_values() {
    let d = tempfile::tempdir().unwrap();
    let src = file(d.path(), "affine.dl", AFFINE);
    // w = ones: y = x0 + x1 per row.
    let x = tensors(
        d.path(),
        "x.safetensors",
        vec![("x", Tensor::f32(vec![3, 2], vec![1., 2., 3., 4., 5., 6.]))],
    );
    let out = ok(&dlc(&[&"run", &src, &"--inputs", &x]));
    assert_eq!(out.trim(), "y: f32[3, 1] = [3.000000, 7.000000, 11.000000]");
}

#[test]
fn run_takes_npy_inputs_and_writes_outputs_atomically() {
    let d = tempfile::tempdir().unwrap();
    let src = file(d.path(), "affine.dl", AFFINE);
    let x = d.path().join("x.npy");
    write_npy(&x, &Tensor::f32(vec![2, 2], vec![1., -1., 0.5, 0.25])).unwrap();
    let out = d.path().join("out.safetensors");
    ok(&dlc(&[&"run", &src, &"--inputs", &x, &"--out", &out]));
    let got = read_safetensors(&out).unwrap();
    assert_eq!(got.keys().collect::<Vec<_>>(), ["y"]);
    assert_eq!(got["y"], Tensor::f32(vec![2, 1], vec![0.0, 0.75]));
    let names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp")), "{names:?}");
}

#[test]
fn run_grads_gives_loss_and_parameter_gradients() {
    let d = tempfile::tempdir().unwrap();
    let src = file(d.path(), "fit.dl", FIT);
    let inputs = tensors(
        d.path(),
        "in.safetensors",
        vec![
            ("x", Tensor::f32(vec![2, 1], vec![1., 2.])),
            ("t", Tensor::f32(vec![2, 1], vec![2., 4.])),
        ],
    );
    let out = d.path().join("o.safetensors");
    // w = 0 (zeros init): loss = (2² + 4²)/2 = 10; dL/dw = mean(2(wx - t)x) = (-4 - 16)/2 = -10.
    ok(&dlc(&[
        &"run",
        &src,
        &"--inputs",
        &inputs,
        &"--grads",
        &"--out",
        &out,
    ]));
    let got = read_safetensors(&out).unwrap();
    assert_eq!(f32s(&got["loss"]), [10.0]);
    assert_eq!(got["loss"].shape, Vec::<usize>::new());
    assert_eq!(f32s(&got["grad.w"]), [-10.0]);
    // w = 1: loss = (1 + 4)/2 = 2.5; dL/dw = (2·(-1)·1 + 2·(-2)·2)/2 = -5.
    let params = tensors(
        d.path(),
        "p.safetensors",
        vec![("w", Tensor::f32(vec![1, 1], vec![1.0]))],
    );
    ok(&dlc(&[
        &"run",
        &src,
        &"--inputs",
        &inputs,
        &"--params",
        &params,
        &"--grads",
        &"--out",
        &out,
    ]));
    let got = read_safetensors(&out).unwrap();
    assert_eq!(f32s(&got["loss"]), [2.5]);
    assert_eq!(f32s(&got["grad.w"]), [-5.0]);
}

#[test]
fn run_seed_changes_initialised_parameters() {
    let d = tempfile::tempdir().unwrap();
    let src = file(d.path(), "clf.dl", CLF);
    let inputs = tensors(
        d.path(),
        "in.safetensors",
        vec![
            ("x", Tensor::f32(vec![1, 2], vec![1., 2.])),
            ("label", Tensor::i32(vec![1], vec![0])),
        ],
    );
    let a = ok(&dlc(&[&"run", &src, &"--inputs", &inputs, &"--seed", &"1"]));
    let b = ok(&dlc(&[&"run", &src, &"--inputs", &inputs, &"--seed", &"1"]));
    let c = ok(&dlc(&[&"run", &src, &"--inputs", &inputs, &"--seed", &"2"]));
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn compile_prints_a_summary_and_json_stats() {
    let d = tempfile::tempdir().unwrap();
    let src = file(d.path(), "clf.dl", CLF);
    let out = ok(&dlc(&[&"compile", &src, &"--dim", &"N=4"]));
    assert!(out.contains("model clf (N=4)"), "{out}");
    assert!(out.contains("ops"), "{out}");
    let json = ok(&dlc(&[
        &"compile", &src, &"--dim", &"N=4", &"--stats", &"json",
    ]));
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    for key in [
        "ops_before",
        "ops_after",
        "kernels",
        "peak_bytes",
        "naive_bytes",
        "compile_ms",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {json}");
    }
    assert!(v["ops_before"].as_u64().unwrap() > 0);
    // What the compiled model allocates, scratch included.
    assert!(v["jit_arena_bytes"].as_u64().unwrap() > 0, "{json}");
    let train = ok(&dlc(&[
        &"compile", &src, &"--dim", &"N=4", &"--train", &"--stats", &"json",
    ]));
    let t: serde_json::Value = serde_json::from_str(train.trim()).unwrap();
    assert!(
        t["ops_before"].as_u64() > v["ops_before"].as_u64(),
        "the training step is bigger"
    );
}

#[test]
fn compile_emits_ast_ir_and_gradient_ir() {
    let d = tempfile::tempdir().unwrap();
    let src = file(d.path(), "fit.dl", FIT);
    let ast = ok(&dlc(&[&"compile", &src, &"--emit", &"ast"]));
    assert!(ast.contains("ModelDef") && ast.contains("\"fit\""), "{ast}");
    let ir = ok(&dlc(&[
        &"compile", &src, &"--dim", &"N=2", &"--emit", &"ir",
    ]));
    assert!(ir.contains("matmul") && ir.contains("Loss loss"), "{ir}");
    let grad = ok(&dlc(&[
        &"compile", &src, &"--dim", &"N=2", &"--emit", &"grad-ir",
    ]));
    assert!(grad.contains("Grad grad.w"), "{grad}");
    let train = ok(&dlc(&[
        &"compile", &src, &"--dim", &"N=2", &"--train", &"--emit", &"grad-ir",
    ]));
    assert!(train.contains("Update w"), "{train}");
    let o = d.path().join("ir.txt");
    ok(&dlc(&[
        &"compile", &src, &"--dim", &"N=2", &"--emit", &"ir", &"-o", &o,
    ]));
    assert_eq!(std::fs::read_to_string(&o).unwrap(), ir);
}

/// The lines of the Cranelift function headed `; {header}` in `--emit clif`
/// output.
fn clif_function<'a>(clif: &'a str, header: &str) -> Vec<&'a str> {
    clif.lines()
        .skip_while(|l| *l != format!("; {header}"))
        .skip(1)
        .take_while(|l| !l.starts_with("; "))
        .collect()
}

/// `--threads` reaches the kernels `compile` shows: mlp's first layer
/// packs its A operand in a phase of its own on one thread, and inside
/// each work unit on two (`codegen::matmul`), so the packing step's
/// function has a loop only on one thread.
#[test]
fn compile_emits_the_kernels_of_the_thread_count_given() {
    let mlp = Path::new(env!("CARGO_MANIFEST_DIR")).join("lang/examples/mlp.dl");
    let clif = |threads: &str| {
        ok(&dlc(&[
            &"compile",
            &mlp,
            &"--threads",
            &threads,
            &"--emit",
            &"clif",
        ]))
    };
    let (one, two) = (clif("1"), clif("2"));
    let pack = "%6 relu, step 0";
    let stores = |c: &str| {
        clif_function(c, pack)
            .iter()
            .filter(|l| l.contains("store"))
            .count()
    };
    assert!(stores(&one) > 0, "{}", clif_function(&one, pack).join("\n"));
    assert_eq!(stores(&two), 0, "{}", clif_function(&two, pack).join("\n"));
}

#[test]
fn bench_prints_the_json_contract() {
    let d = tempfile::tempdir().unwrap();
    let src = file(d.path(), "clf.dl", CLF);
    let out = ok(&dlc(&[
        &"bench",
        &src,
        &"--dim",
        &"N=8",
        &"--train",
        &"--json",
        &"--threads",
        &"1",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["model"], "clf");
    assert_eq!(v["dims"]["N"], 8);
    assert_eq!(v["threads"], 1);
    for key in ["compile_ms", "forward_ms", "train_step_ms", "peak_bytes"] {
        assert!(v[key].is_number(), "{key} in {out}");
    }
    let plain = ok(&dlc(&[&"bench", &src, &"--dim", &"N=8"]));
    assert!(plain.contains("median"), "{plain}");
}

/// The number in `… over N steps` of `dlc bench`'s forward line.
fn forward_steps(out: &str) -> usize {
    let line = out.lines().find(|l| l.starts_with("forward:")).unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    words[words.len() - 2].parse().unwrap()
}

#[test]
fn bench_times_steps_for_at_least_min_time() {
    let d = tempfile::tempdir().unwrap();
    let src = file(d.path(), "clf.dl", CLF);
    let args = |extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> =
            vec![&"bench", &src, &"--dim", &"N=8", &"--steps", &"3"];
        a.extend_from_slice(extra);
        ok(&dlc(&a))
    };
    assert_eq!(forward_steps(&args(&[])), 3);
    // A forward pass of this model takes microseconds: 0.2 s holds
    // hundreds of them.
    let started = Instant::now();
    let timed = args(&[&"--min-time", &"0.2", &"--warmup", &"2"]);
    assert!(started.elapsed().as_secs_f64() >= 0.2);
    assert!(forward_steps(&timed) > 3, "{timed}");
    let bad = dlc(&[&"bench", &src, &"--dim", &"N=8", &"--min-time=-1"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--min-time"),
        "{bad:?}"
    );
}

#[test]
fn bench_and_run_profile_every_kernel() {
    let d = tempfile::tempdir().unwrap();
    let src = file(d.path(), "clf.dl", CLF);
    let out = ok(&dlc(&[
        &"bench",
        &src,
        &"--dim",
        &"N=8",
        &"--train",
        &"--json",
        &"--profile",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for what in ["profile_forward", "profile_train_step"] {
        let kernels = v[what]["kernels"].as_array().unwrap();
        // dense(2) on [8, 2]: 8·2 outputs of 2 multiply-adds = 64 FLOPs,
        // and 16 for the bias, added in the same kernel.
        let mm = kernels
            .iter()
            .find(|k| k["op"] == "matmul+epilogue" && k["result"] == "f32[8, 2]")
            .unwrap_or_else(|| panic!("no forward dense kernel in {what}: {out}"));
        assert_eq!(mm["flops"], 80);
        assert!(mm["median_us"].is_number());
    }
    let forward = v["profile_forward"]["kernels"].as_array().unwrap().len();
    let train = v["profile_train_step"]["kernels"].as_array().unwrap().len();
    assert!(
        train > forward,
        "{forward} forward vs {train} training kernels"
    );

    let inputs = tensors(
        d.path(),
        "in.safetensors",
        vec![
            ("x", Tensor::f32(vec![2, 2], vec![1., -1., 0.5, 2.])),
            ("label", Tensor::i32(vec![2], vec![0, 1])),
        ],
    );
    let plain = ok(&dlc(&[&"run", &src, &"--inputs", &inputs]));
    let profiled = ok(&dlc(&[
        &"run",
        &src,
        &"--inputs",
        &inputs,
        &"--profile",
        &"--runs",
        &"3",
    ]));
    // The outputs come first, unchanged, then the table.
    assert!(profiled.starts_with(&plain), "{plain}\n---\n{profiled}");
    let table = &profiled[plain.len()..];
    assert!(table.contains("median of 3 runs"), "{table}");
    assert!(
        table.contains("matmul") && table.contains("by op:"),
        "{table}"
    );
    let interp = dlc(&[
        &"run",
        &src,
        &"--inputs",
        &inputs,
        &"--profile",
        &"--backend",
        &"interp",
    ]);
    assert_eq!(interp.status.code(), Some(1));
    assert!(
        text(&interp.stderr).contains("--backend jit"),
        "{}",
        text(&interp.stderr)
    );
}

/// 64 examples of two separable classes: label 1 exactly when x0 + x1 > 0.
fn classes(n: usize, offset: usize) -> Vec<(&'static str, Tensor)> {
    let mut x = Vec::new();
    let mut y = Vec::new();
    for i in offset..offset + n {
        let a = ((i * 37) % 17) as f32 / 4.0 - 2.0;
        let b = ((i * 11) % 13) as f32 / 3.0 - 2.1;
        x.extend([a, b]);
        y.push(i32::from(a + b > 0.0));
    }
    vec![
        ("x", Tensor::f32(vec![n, 2], x)),
        ("label", Tensor::i32(vec![n], y)),
    ]
}

fn epoch_lines(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("epoch ")).collect()
}

fn field(line: &str, name: &str) -> f32 {
    let at = line
        .find(name)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + name.len();
    line[at..]
        .trim_start()
        .split([',', ' '])
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad {name} in {line}"))
}

#[test]
fn train_lowers_the_loss_and_reports_eval_accuracy() {
    let d = tempfile::tempdir().unwrap();
    let src = file(d.path(), "clf.dl", CLF);
    let data = tensors(d.path(), "train.safetensors", classes(64, 0));
    let eval = tensors(d.path(), "eval.safetensors", classes(20, 100));
    let ckpt = d.path().join("clf.ckpt.safetensors");
    let o = dlc(&[
        &"train",
        &src,
        &"--data",
        &data,
        &"--eval",
        &eval,
        &"--epochs",
        &"15",
        &"--batch",
        &"8",
        &"--optimizer",
        &"adam",
        &"--lr",
        &"0.1",
        &"--out",
        &ckpt,
    ]);
    let out = ok(&o);
    let lines = epoch_lines(&out);
    assert_eq!(lines.len(), 15, "{out}");
    let first = field(lines[0], "loss");
    let last = field(lines[14], "loss");
    assert!(last < first * 0.5, "loss {first} -> {last}\n{out}");
    assert!(field(lines[14], "eval accuracy") >= 0.9, "{out}");
    // Not a terminal: no progress bar drawn on stderr.
    assert!(
        !text(&o.stderr).contains("/8 batches"),
        "{}",
        text(&o.stderr)
    );
    let (ck, meta) = read_safetensors_with_metadata(&ckpt).unwrap();
    assert_eq!(meta.get("dlc.epochs").map(String::as_str), Some("15"));
    // 64 / 8 = 8 adam steps per epoch.
    assert_eq!(f32s(&ck["opt.step"]), [120.0]);
    for k in [
        "logits.weight",
        "logits.bias",
        "opt.m.logits.weight",
        "opt.v.logits.bias",
    ] {
        assert!(ck.contains_key(k), "{k} missing: {:?}", ck.keys());
    }
}

#[test]
fn train_drops_the_last_partial_batch() {
    let d = tempfile::tempdir().unwrap();
    let src = file(d.path(), "clf.dl", CLF);
    let data = tensors(d.path(), "train.safetensors", classes(20, 0));
    let ckpt = d.path().join("c.safetensors");
    // 20 examples in batches of 8: two steps per epoch, 4 examples dropped.
    let o = dlc(&[
        &"train",
        &src,
        &"--data",
        &data,
        &"--batch",
        &"8",
        &"--epochs",
        &"3",
        &"--optimizer",
        &"adam",
        &"--out",
        &ckpt,
    ]);
    ok(&o);
    assert!(
        text(&o.stderr).contains("16 examples per epoch"),
        "{}",
        text(&o.stderr)
    );
    let ck = read_safetensors(&ckpt).unwrap();
    assert_eq!(f32s(&ck["opt.step"]), [6.0]);
}

#[test]
fn train_default_checkpoint_is_named_after_the_model() {
    let d = tempfile::tempdir().unwrap();
    let src = file(d.path(), "clf.dl", CLF);
    let data = tensors(d.path(), "train.safetensors", classes(16, 0));
    let o = Command::new(env!("CARGO_BIN_EXE_dlc"))
        .current_dir(d.path())
        .args([
            "train",
            "clf.dl",
            "--data",
            "train.safetensors",
            "--batch",
            "4",
        ])
        .output()
        .unwrap();
    ok(&o);
    let _ = (src, data);
    let ck = read_safetensors(&d.path().join("clf.params.safetensors")).unwrap();
    assert!(ck.contains_key("logits.weight"));
}

/// Kills the child on drop, so a failed assertion leaves no process behind.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_killed_training_run_resumes_from_its_last_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let src = file(d.path(), "clf.dl", CLF);
    let data = tensors(d.path(), "train.safetensors", classes(64, 0));
    let ckpt = d.path().join("run.safetensors");
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_dlc"))
            .args(["train"])
            .arg(&src)
            .arg("--data")
            .arg(&data)
            .args([
                "--epochs",
                "1000000",
                "--batch",
                "8",
                "--optimizer",
                "adam",
                "--out",
            ])
            .arg(&ckpt)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    // Wait for a few checkpoints, then kill the run wherever it is.
    loop {
        if let Ok((_, meta)) = read_safetensors_with_metadata(&ckpt) {
            if meta.get("dlc.epochs").and_then(|e| e.parse::<usize>().ok()) >= Some(3) {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint written"
        );
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "training stopped early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    drop(child);

    // Whatever moment the kill hit, the checkpoint is complete and consistent.
    let (ck, meta) = read_safetensors_with_metadata(&ckpt).unwrap();
    let epochs: usize = meta["dlc.epochs"].parse().unwrap();
    assert_eq!(f32s(&ck["opt.step"]), [(epochs * 8) as f32]);

    let resumed = d.path().join("resumed.safetensors");
    let o = dlc(&[
        &"train",
        &src,
        &"--data",
        &data,
        &"--epochs",
        &"1",
        &"--batch",
        &"8",
        &"--optimizer",
        &"adam",
        &"--params",
        &ckpt,
        &"--out",
        &resumed,
    ]);
    let out = ok(&o);
    assert!(
        text(&o.stderr).contains(&format!("after epoch {epochs}")),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(
        epoch_lines(&out)[0].split(':').next(),
        Some(format!("epoch {}", epochs + 1).as_str())
    );
    let (after, meta) = read_safetensors_with_metadata(&resumed).unwrap();
    assert_eq!(meta["dlc.epochs"], (epochs + 1).to_string());
    // The optimizer state carried over: the step count continued.
    assert_eq!(f32s(&after["opt.step"]), [((epochs + 1) * 8) as f32]);
    assert_ne!(after["logits.weight"], ck["logits.weight"]);
}

#[test]
fn resuming_equals_training_without_interruption() {
    let d = tempfile::tempdir().unwrap();
    let src = file(d.path(), "clf.dl", CLF);
    let data = tensors(d.path(), "train.safetensors", classes(32, 0));
    let common: [&dyn AsRef<std::ffi::OsStr>; 7] = [
        &"--data",
        &data,
        &"--batch",
        &"8",
        &"--optimizer",
        &"adam",
        &"--seed",
    ];
    let whole = d.path().join("whole.safetensors");
    let half = d.path().join("half.safetensors");
    let rest = d.path().join("rest.safetensors");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"train", &src];
    args.extend(common);
    args.extend([&"3" as &dyn AsRef<std::ffi::OsStr>]);
    let run = |extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut a = args.clone();
        a.extend_from_slice(extra);
        ok(&dlc(&a));
    };
    run(&[&"--epochs", &"4", &"--out", &whole]);
    run(&[&"--epochs", &"2", &"--out", &half]);
    run(&[&"--epochs", &"2", &"--params", &half, &"--out", &rest]);
    assert_eq!(
        read_safetensors(&whole).unwrap(),
        read_safetensors(&rest).unwrap()
    );
}
