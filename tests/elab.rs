//! Elaboration of every example and every golden model: `check` is clean,
//! `elaborate` works, parameter names and shapes follow LANGUAGE.md §3/§7,
//! and the IR of each example is pinned by a snapshot.
//!
//! The golden cases were computed by an independent reference; their
//! `expected.safetensors` fixes the shape of every output and (through the
//! `grad.<param>` entries) the name and shape of every parameter.

use dlc::diag::{one_line, SourceMap};
use dlc::elab::{check, elaborate, model_names, ElabOptions, Elaborated};
use dlc::ir::{OutputKind, Value};
use dlc::model::{Optimizer, Regularizer};
use dlc::tensor::DType;
use expect_test::expect_file;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const EXAMPLES: &[&str] = &[
    "gemm",
    "mlp",
    "lenet",
    "vgg",
    "lstm",
    "gru",
    "transformer",
    "residual",
    "textclf",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load(path: &Path) -> (SourceMap, u32) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut sources = SourceMap::default();
    let file = sources.add(path.display().to_string(), text);
    (sources, file)
}

fn render(diags: &[dlc::diag::Diagnostic], sources: &SourceMap) -> String {
    diags
        .iter()
        .map(|d| one_line(d, sources))
        .collect::<Vec<_>>()
        .join("\n")
}

fn elab_ok(path: &Path, opts: &ElabOptions) -> Elaborated {
    let (mut sources, file) = load(path);
    let diags = check(&mut sources, file);
    assert!(
        diags.is_empty(),
        "check {}:\n{}",
        path.display(),
        render(&diags, &sources)
    );
    match elaborate(&mut sources, file, opts) {
        Ok(e) => {
            assert!(e.warnings.is_empty(), "{}", render(&e.warnings, &sources));
            e
        }
        Err(d) => panic!("elaborate {}:\n{}", path.display(), render(&d, &sources)),
    }
}

fn params(e: &Elaborated) -> BTreeMap<String, Vec<usize>> {
    let g = &e.model.graph;
    g.params()
        .into_iter()
        .map(|(n, v)| (n, g.ty(v).shape.clone()))
        .collect()
}

fn example(name: &str) -> Elaborated {
    elab_ok(
        &root().join(format!("lang/examples/{name}.dl")),
        &ElabOptions::default(),
    )
}

#[test]
fn examples_check_elaborate_and_match_snapshots() {
    for name in EXAMPLES {
        let e = example(name);
        let text = dlc::ir::print::print(&e.model.graph);
        expect_file![format!("snapshots/{name}.ir")].assert_eq(&text);
    }
}

/// Every example, including ones added later, checks and elaborates clean.
#[test]
fn every_example_file_checks_clean() {
    let mut n = 0;
    for e in std::fs::read_dir(root().join("lang/examples")).expect("examples dir") {
        let path = e.expect("entry").path();
        if path.extension().is_some_and(|x| x == "dl") {
            elab_ok(&path, &ElabOptions::default());
            n += 1;
        }
    }
    assert!(n >= EXAMPLES.len());
}

#[test]
fn lenet_parameter_names_and_shapes() {
    let e = example("lenet");
    let p = params(&e);
    assert_eq!(p["c1.weight"], vec![6, 1, 5, 5]);
    assert_eq!(p["c1.bias"], vec![6]);
    assert_eq!(p["c2.weight"], vec![16, 6, 5, 5]);
    assert_eq!(p["f1.weight"], vec![400, 120]);
    assert_eq!(p["f2.weight"], vec![120, 84]);
    assert_eq!(p["logits.weight"], vec![84, 10]);
    assert_eq!(p.len(), 10);
    assert_eq!(e.model.dims, BTreeMap::from([("N".to_string(), 32)]));
    let g = &e.model.graph;
    let outs: Vec<(&str, OutputKind, Vec<usize>)> = g
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.kind, g.ty(o.value).shape.clone()))
        .collect();
    assert_eq!(
        outs,
        vec![
            ("probs", OutputKind::Output, vec![32, 10]),
            ("loss", OutputKind::Loss, vec![])
        ]
    );
}

#[test]
fn transformer_parameter_names_and_shapes() {
    let e = example("transformer");
    let p = params(&e);
    assert_eq!(p["b1.a.wq"], vec![64, 64]);
    assert_eq!(p["b1.a.bo"], vec![64]);
    assert_eq!(p["e.weight"], vec![1000, 64]);
    assert_eq!(p["b1.n1.gamma"], vec![64]);
    assert_eq!(p["b1.up.weight"], vec![64, 256]);
    assert_eq!(p["b1.down.weight"], vec![256, 64]);
    assert_eq!(p["logits.weight"], vec![64, 1000]);
    assert_eq!(
        e.model.dims,
        BTreeMap::from([("N".to_string(), 8), ("T".to_string(), 64)])
    );
}

#[test]
fn std_initialisers_follow_the_spec() {
    use dlc::ir::{Init, Op};
    let e = example("textclf");
    let g = &e.model.graph;
    let init = |name: &str| {
        g.params()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v): (String, Value)| match &g.node(v.node).op {
                Op::Param { init, .. } => init.clone(),
                _ => unreachable!("params() yields params"),
            })
            .unwrap_or_else(|| panic!("no param {name}"))
    };
    assert_eq!(
        init("e.weight"),
        Init::Uniform {
            lo: -0.05,
            hi: 0.05
        }
    );
    assert_eq!(init("h.w_x"), Init::GlorotUniform);
    assert_eq!(init("h.w_h"), Init::GlorotUniform);
    assert_eq!(init("h.b"), Init::Zeros);
    assert_eq!(init("logits.bias"), Init::Zeros);
    let p = params(&e);
    assert_eq!(p["h.w_x"], vec![32, 192]);
    assert_eq!(p["h.w_h"], vec![64, 192]);
    assert_eq!(p["h.b"], vec![192]);
    assert_eq!(
        e.model.train.optimizer,
        Some(Optimizer::Adam {
            lr: 0.002,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8
        })
    );
    assert_eq!(e.model.train.regularize, Some(Regularizer::L2(1e-4)));
    let ln = elab_ok(
        &root().join("tests/golden/layers/layer_norm/model.dl"),
        &dims(&[("N", 2), ("T", 3)]),
    );
    let g = &ln.model.graph;
    let gamma = g
        .params()
        .into_iter()
        .find(|(n, _)| n == "n1.gamma")
        .map(|(_, v)| v);
    assert!(matches!(
        gamma.map(|v| &g.node(v.node).op),
        Some(Op::Param {
            init: Init::Ones,
            ..
        })
    ));
}

#[test]
fn residual_block_names_and_dims() {
    let e = example("residual");
    let p = params(&e);
    assert_eq!(p["stem.weight"], vec![8, 3, 3, 3]);
    assert_eq!(p["r1.a.weight"], vec![8, 8, 3, 3]);
    assert_eq!(p["r1.b.bias"], vec![8]);
    assert_eq!(p["r2.a.weight"], vec![8, 8, 3, 3]);
    assert_eq!(p["logits.weight"], vec![8, 10]);
    assert_eq!(p.len(), 12);
}

fn dims(d: &[(&str, usize)]) -> ElabOptions {
    ElabOptions {
        dims: d.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        ..ElabOptions::default()
    }
}

#[test]
fn dims_bind_from_input_shapes_then_flags_then_defaults() {
    let path = root().join("lang/examples/lstm.dl");
    // Defaults alone.
    assert_eq!(
        example("lstm").model.dims,
        BTreeMap::from([("N".into(), 16), ("T".into(), 32)])
    );
    // --dim overrides a default.
    let e = elab_ok(&path, &dims(&[("T", 5)]));
    assert_eq!(
        e.model.dims,
        BTreeMap::from([("N".into(), 16), ("T".into(), 5)])
    );
    // Input shapes bind first; --dim agreeing with them is fine.
    let mut opts = dims(&[("N", 3)]);
    opts.input_shapes.insert("x".into(), vec![3, 7, 64]);
    let e = elab_ok(&path, &opts);
    assert_eq!(
        e.model.dims,
        BTreeMap::from([("N".into(), 3), ("T".into(), 7)])
    );
    let g = &e.model.graph;
    assert_eq!(g.ty(g.inputs_by_name()[0].1).shape, vec![3]);
}

#[test]
fn model_selection() {
    let path = root().join("tests/golden/models/two_models/model.dl");
    let (sources, file) = load(&path);
    assert_eq!(model_names(&sources, file), vec!["first", "second"]);
    let first = elab_ok(&path, &dims(&[("N", 2)]));
    assert_eq!(first.model.name, "first");
    let mut opts = dims(&[("N", 2)]);
    opts.model = Some("second".into());
    let second = elab_ok(&path, &opts);
    assert_eq!(second.model.name, "second");
    assert_eq!(
        params(&second),
        BTreeMap::from([("h.weight".into(), vec![4, 3]), ("h.bias".into(), vec![3])])
    );
    let (mut sources, file) = load(&path);
    opts.model = Some("third".into());
    let err = elaborate(&mut sources, file, &opts)
        .err()
        .expect("no model third");
    assert_eq!(
        err[0].message,
        "the file has no model named `third`; it has first, second"
    );
}

// ------------------------------------------------------------ golden cases

/// `(dtype, shape)` of each tensor of a safetensors file, from its header.
fn tensor_shapes(path: &Path) -> BTreeMap<String, (String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("json header");
    header
        .as_object()
        .expect("object")
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dim") as usize)
                .collect();
            (
                k.clone(),
                (v["dtype"].as_str().expect("dtype").to_string(), shape),
            )
        })
        .collect()
}

fn golden_cases() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.join("model.dl").is_file() {
                out.push(p);
            } else if p.is_dir() {
                walk(&p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join("tests/golden"), &mut out);
    out
}

#[test]
fn golden_models_elaborate_with_the_reference_shapes_and_names() {
    let cases = golden_cases();
    assert!(cases.len() >= 60, "found only {} golden cases", cases.len());
    for case in cases {
        let inputs = tensor_shapes(&case.join("inputs.safetensors"));
        let expected = tensor_shapes(&case.join("expected.safetensors"));
        let mut opts = ElabOptions {
            input_shapes: inputs
                .iter()
                .map(|(k, (_, s))| (k.clone(), s.clone()))
                .collect(),
            ..ElabOptions::default()
        };
        if let Ok(toml) = std::fs::read_to_string(case.join("case.toml")) {
            let v: toml::Table = toml.parse().expect("case.toml");
            opts.model = v.get("model").and_then(|m| m.as_str()).map(String::from);
        }
        let e = elab_ok(&case.join("model.dl"), &opts);
        let g = &e.model.graph;
        let name = case.display();
        for (input, v) in g.inputs_by_name() {
            let (dtype, shape) = &inputs[&input];
            let want = if dtype == "I32" {
                DType::I32
            } else {
                DType::F32
            };
            assert_eq!(
                (g.ty(v).dtype, &g.ty(v).shape),
                (want, shape),
                "{name}: input {input}"
            );
        }
        let p = params(&e);
        let mut grads = BTreeMap::new();
        for (key, (_, shape)) in &expected {
            if let Some(param) = key.strip_prefix("grad.") {
                grads.insert(param.to_string(), shape.clone());
            } else {
                let out = g
                    .output(key)
                    .unwrap_or_else(|| panic!("{name}: no output {key}"));
                let kind = if key == "loss" {
                    OutputKind::Loss
                } else {
                    OutputKind::Output
                };
                assert_eq!(out.kind, kind, "{name}: {key}");
                assert_eq!(&g.ty(out.value).shape, shape, "{name}: output {key}");
            }
        }
        if !grads.is_empty() {
            assert_eq!(p, grads, "{name}: parameters vs the reference's gradients");
        }
        if case.join("params.safetensors").is_file() {
            for (k, (_, shape)) in tensor_shapes(&case.join("params.safetensors")) {
                assert_eq!(p.get(&k), Some(&shape), "{name}: param {k}");
            }
        }
        assert_eq!(
            g.outputs.len(),
            expected.keys().filter(|k| !k.starts_with("grad.")).count(),
            "{name}"
        );
    }
}

#[test]
fn fn_nested_names_from_its_comment() {
    let e = elab_ok(
        &root().join("tests/golden/models/fn_nested/model.dl"),
        &dims(&[("N", 2)]),
    );
    let p = params(&e);
    for name in [
        "b1.a.weight",
        "b2.a.bias",
        "st.inner.a.weight",
        "st.s.g",
        "logits.weight",
        "w",
    ] {
        assert!(p.contains_key(name), "missing {name}: {:?}", p.keys());
    }
    assert_eq!(p["st.s.g"], vec![8]);
    assert_eq!(p["st.inner.a.weight"], vec![3, 4, 3, 3]);
}

fn elab_src(src: &str, opts: &ElabOptions) -> Elaborated {
    let mut sources = SourceMap::default();
    let file = sources.add("inline.dl", src);
    let diags = check(&mut sources, file);
    assert!(diags.is_empty(), "{}", render(&diags, &sources));
    elaborate(&mut sources, file, opts).unwrap_or_else(|d| panic!("{}", render(&d, &sources)))
}

#[test]
fn output_and_loss_bind_like_assignments() {
    let e = elab_src(
        "model m {\n    input x: f32[N=2, 4]\n    input t: f32[N, 1]\n    output y = x |> dense(3)\n    loss = mse(y |> dense(1), t)\n    train {\n        optimizer = sgd(lr=0.1)\n    }\n}\n",
        &ElabOptions::default(),
    );
    let p = params(&e);
    assert_eq!(p["y.weight"], vec![4, 3]);
    assert_eq!(p["loss.weight"], vec![3, 1]);
    assert_eq!(p["loss.bias"], vec![1]);
    assert_eq!(
        e.model.train.optimizer,
        Some(Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.0
        })
    );
    assert_eq!(e.model.train.regularize, None);
}

/// Sugar lowers to the primitive ops of the IR as LANGUAGE.md §4/§6 says;
/// the expected text is worked out by hand from those rules.
#[test]
fn sugar_lowering() {
    let e = elab_src(
        "model m {\n    input v: f32[4]\n    input b: f32[4, 5]\n    input s: f32[2, 7, 3]\n    input x: f32[1, 2, 6, 5]\n    param w: f32[3, 2, 4, 3]\n    output vm = v @ b\n    output c = maximum(v, 0.5)\n    output l = last(s)\n    output t = slice(s, 1, -3, 100)\n    output y = conv(x, w, pad=\"same\")\n    output m = mean(s, axis=[-1, 0])\n}\n",
        &ElabOptions::default(),
    );
    let text = dlc::ir::print::print(&e.model.graph);
    // v @ b: [4] -> [1, 4], matmul -> [1, 5], drop the added axis -> [5].
    // last: slice step 6..7 of axis 1, then drop that axis.
    // slice -3..100 of 7 steps: 4..7 (the end clamps).
    // "same" with a 4x3 kernel: totals 3 and 2 -> [top 1, left 1, bottom 2, right 1].
    expect_test::expect![[r#"
        %0 = input "v" : f32[4]
        %1 = input "b" : f32[4, 5]
        %2 = input "s" : f32[2, 7, 3]
        %3 = input "x" : f32[1, 2, 6, 5]
        %4 = param "w" init=Zeros : f32[3, 2, 4, 3]
        %5 = reshape [1, 4] (%0) : f32[1, 4]
        %6 = matmul (%5, %1) : f32[1, 5]
        %7 = reshape [5] (%6) : f32[5]
        %8 = fill 0.5 [] : f32[]
        %9 = maximum (%0, %8) : f32[4]
        %10 = slice axis=1 start=6 end=7 (%2) : f32[2, 1, 3]
        %11 = reshape [2, 3] (%10) : f32[2, 3]
        %12 = slice axis=1 start=4 end=7 (%2) : f32[2, 3, 3]
        %13 = conv stride=1 dilation=1 pad=[1, 1, 2, 1] (%3, %4) : f32[1, 3, 6, 5]
        %14 = mean axes=[0, 2] keepdims=false (%2) : f32[7]
        Output vm = %7
        Output c = %9
        Output l = %11
        Output t = %12
        Output y = %13
        Output m = %14
    "#]]
    .assert_eq(&text);
}
