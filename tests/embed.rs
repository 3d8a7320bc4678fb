//! dlc as an embedding program uses it: only the public library API.

use dlc::api::{Compiler, Error, TensorMap};
use dlc::model::Optimizer;
use dlc::tensor::Tensor;
use std::sync::Arc;

const AFFINE: &str = "model affine {
    input x: f32[N, 2]
    param w: f32[2, 1] = ones
    param b: f32[1]
    output y = x @ w + b
}
";

const FIT: &str = "model fit {
    input x: f32[N, 1]
    input t: f32[N, 1]
    param w: f32[1, 1]
    loss = mse(x @ w, t)
}
";

fn map(items: Vec<(&str, Tensor)>) -> TensorMap {
    items.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

#[test]
fn compile_bind_run_and_read_outputs_by_name() {
    let model = Compiler::new()
        .dim("N", 2)
        .compile_source("affine.dl", AFFINE)
        .unwrap();
    assert_eq!(model.name(), "affine");
    assert_eq!(model.dims().get("N"), Some(&2));
    let params: Vec<String> = model.params().into_iter().map(|(n, _)| n).collect();
    assert_eq!(params, ["b", "w"]);
    let mut s = model.session();
    s.set_param("b", Tensor::f32(vec![1], vec![0.5])).unwrap();
    let out = s
        .run(&map(vec![(
            "x",
            Tensor::f32(vec![2, 2], vec![1., 2., -3., 4.]),
        )]))
        .unwrap();
    // y = x0 + x1 + 0.5
    assert_eq!(out["y"], Tensor::f32(vec![2, 1], vec![3.5, 1.5]));
    // An embedding program gets the compiled kernels unless it asks for the
    // interpreter, as the CLI does.
    assert_eq!(model.backend(), dlc::api::Backend::Jit);
}

#[test]
fn errors_are_typed_and_carry_rendered_diagnostics() {
    let e = Compiler::new()
        .compile_source("broken.dl", "model m {\n  output y = relu(nope)\n}\n")
        .unwrap_err();
    match e {
        Error::Compile {
            rendered,
            diagnostics,
        } => {
            assert!(rendered.contains("broken.dl:2:"), "{rendered}");
            assert!(rendered.contains('^'), "{rendered}");
            assert!(!diagnostics.is_empty());
        }
        other => panic!("expected a compile error, got {other}"),
    }
    let model = Compiler::new()
        .dim("N", 2)
        .compile_source("affine.dl", AFFINE)
        .unwrap();
    let mut s = model.session();
    let wrong = s
        .run(&map(vec![("x", Tensor::f32(vec![3, 2], vec![0.; 6]))]))
        .unwrap_err();
    assert!(
        matches!(&wrong, Error::Shape { name, .. } if name == "x"),
        "{wrong}"
    );
    assert!(matches!(
        s.run(&TensorMap::new()),
        Err(Error::MissingInput { .. })
    ));
    assert!(matches!(
        s.set_param("w", Tensor::f32(vec![2], vec![0.; 2])),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        s.set_param("zz", Tensor::scalar(0.0)),
        Err(Error::UnknownParam { .. })
    ));
}

#[test]
fn gradients_and_training_steps() {
    let model = Compiler::new()
        .dim("N", 2)
        .compile_source("fit.dl", FIT)
        .unwrap();
    let mut s = model.session();
    let batch = map(vec![
        ("x", Tensor::f32(vec![2, 1], vec![1., 2.])),
        ("t", Tensor::f32(vec![2, 1], vec![2., 4.])),
    ]);
    // w = 0: loss 10, dloss/dw = -10 (see the module docs of dlc::api).
    let g = s.gradients(&batch).unwrap();
    assert_eq!(g["grad.w"].as_f32(), Some(&[-10.0][..]));
    // Momentum 0.5, lr 0.1: v1 = -10, w1 = 1; at w = 1 the gradient is -5,
    // v2 = 0.5·(-10) - 5 = -10, w2 = 1 + 1 = 2 — the exact solution t = 2x.
    s.set_optimizer(
        Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.5,
        },
        None,
    );
    let first = s.train_step(&batch).unwrap();
    assert_eq!(first.loss, 10.0);
    assert_eq!(s.params()["w"].as_f32(), Some(&[1.0][..]));
    assert_eq!(s.state()["opt.velocity.w"].as_f32(), Some(&[-10.0][..]));
    let second = s.train_step(&batch).unwrap();
    assert_eq!(second.loss, 2.5);
    assert_eq!(s.params()["w"].as_f32(), Some(&[2.0][..]));
}

#[test]
fn parameters_and_state_survive_a_save_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fit.safetensors");
    let model = Compiler::new()
        .dim("N", 2)
        .compile_source("fit.dl", FIT)
        .unwrap();
    let batch = map(vec![
        ("x", Tensor::f32(vec![2, 1], vec![1., 2.])),
        ("t", Tensor::f32(vec![2, 1], vec![2., 4.])),
    ]);
    let mut a = model.session();
    a.set_optimizer(
        Optimizer::Adam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        None,
    );
    a.train_step(&batch).unwrap();
    a.save_params(&path).unwrap();
    let mut b = model.session();
    b.set_optimizer(
        Optimizer::Adam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        None,
    );
    assert!(b.load_params(&path).unwrap().is_empty());
    assert_eq!(b.params(), a.params());
    // Both continue identically: the loaded state (moments, step) is used.
    let (ra, rb) = (a.train_step(&batch).unwrap(), b.train_step(&batch).unwrap());
    assert_eq!(ra, rb);
    assert_eq!(a.checkpoint(), b.checkpoint());
    assert_eq!(b.state()["opt.step"].as_f32(), Some(&[2.0][..]));
}

#[test]
fn several_models_run_on_several_threads() {
    let affine = Arc::new(
        Compiler::new()
            .dim("N", 1)
            .compile_source("a.dl", AFFINE)
            .unwrap(),
    );
    let fit = Compiler::new()
        .dim("N", 1)
        .compile_source("f.dl", FIT)
        .unwrap();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let m = Arc::clone(&affine);
            std::thread::spawn(move || {
                let mut s = m.session();
                let x = Tensor::f32(vec![1, 2], vec![i as f32, 1.0]);
                s.run(&map(vec![("x", x)])).unwrap()["y"].clone()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(
            h.join().unwrap(),
            Tensor::f32(vec![1, 1], vec![i as f32 + 1.0])
        );
    }
    let out = fit
        .session()
        .gradients(&map(vec![
            ("x", Tensor::f32(vec![1, 1], vec![3.0])),
            ("t", Tensor::f32(vec![1, 1], vec![1.0])),
        ]))
        .unwrap();
    // w = 0: loss = 1, dloss/dw = 2·(0 - 1)·3 = -6.
    assert_eq!(out["loss"].as_f32(), Some(&[1.0][..]));
    assert_eq!(out["grad.w"].as_f32(), Some(&[-6.0][..]));
}

#[test]
fn symbols_bind_from_input_shapes_and_models_are_picked_by_name() {
    let src = format!("{AFFINE}\n{FIT}");
    let m = Compiler::new()
        .model("fit")
        .input_shape("x", vec![5, 1])
        .compile_source("two.dl", &src)
        .unwrap();
    assert_eq!(m.name(), "fit");
    assert_eq!(m.dims().get("N"), Some(&5));
    let inputs: Vec<String> = m.inputs().into_iter().map(|(n, _)| n).collect();
    assert_eq!(inputs, ["t", "x"]);
    assert!(m.has_loss());
}

#[test]
fn optimizer_state_of_another_optimizer_or_shape_is_not_used_silently() {
    let model = Compiler::new()
        .dim("N", 2)
        .compile_source("fit.dl", FIT)
        .unwrap();
    let batch = map(vec![
        ("x", Tensor::f32(vec![2, 1], vec![1., 2.])),
        ("t", Tensor::f32(vec![2, 1], vec![2., 4.])),
    ]);
    let mut s = model.session();
    let adam_state = map(vec![
        ("opt.m.w", Tensor::f32(vec![1, 1], vec![5.0])),
        ("opt.v.w", Tensor::f32(vec![1, 1], vec![5.0])),
        ("opt.step", Tensor::scalar(3.0)),
    ]);
    assert!(s.set_params(&adam_state).unwrap().is_empty());
    // Resuming with sgd: the adam moments are dropped, velocity starts at 0,
    // so the first step is plain sgd (w = 0 - 0.1·(-10) = 1).
    s.set_optimizer(
        Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.9,
        },
        None,
    );
    s.train_step(&batch).unwrap();
    assert_eq!(s.params()["w"].as_f32(), Some(&[1.0][..]));
    assert_eq!(s.state().keys().collect::<Vec<_>>(), ["opt.velocity.w"]);

    let mut bad = model.session();
    bad.set_params(&map(vec![(
        "opt.velocity.w",
        Tensor::f32(vec![3], vec![0.; 3]),
    )]))
    .unwrap();
    bad.set_optimizer(
        Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.9,
        },
        None,
    );
    let e = bad.train_step(&batch).unwrap_err();
    assert!(
        e.to_string().contains("optimizer state `opt.velocity.w`"),
        "{e}"
    );
}

#[test]
fn the_backend_is_a_compiler_option_with_the_same_results() {
    use dlc::api::Backend;
    let x = map(vec![("x", Tensor::f32(vec![2, 2], vec![1., 2., -3., 4.]))]);
    let mut outs = Vec::new();
    for backend in [Backend::Interp, Backend::Jit] {
        let m = Compiler::new()
            .dim("N", 2)
            .backend(backend)
            .threads(2)
            .compile_source("affine.dl", AFFINE)
            .unwrap();
        assert_eq!(m.backend(), backend);
        outs.push(m.session().run(&x).unwrap());
    }
    // w = ones, b = 0: y = x0 + x1.
    assert_eq!(outs[0]["y"], Tensor::f32(vec![2, 1], vec![3.0, 1.0]));
    assert_eq!(outs[0], outs[1]);
}

#[test]
fn profile_times_every_kernel_and_counts_matmul_flops() {
    use dlc::profile::ProfileTarget;
    let model = Compiler::new()
        .dim("N", 4)
        .threads(2)
        .backend(dlc::api::Backend::Jit)
        .compile_source("affine.dl", AFFINE)
        .unwrap();
    let mut s = model.session();
    s.set_param("w", Tensor::f32(vec![2, 1], vec![1.0, -1.0]))
        .unwrap();
    s.set_param("b", Tensor::f32(vec![1], vec![0.5])).unwrap();
    let x = Tensor::f32(vec![4, 2], vec![1., 2., 3., 5., 8., 13., 21., 34.]);
    let inputs = map(vec![("x", x)]);
    let (profile, out) = s.profile(&inputs, ProfileTarget::Forward, 3).unwrap();
    // y = x0 - x1 + 0.5, as a plain run gives it.
    assert_eq!(out["y"].as_f32().unwrap(), [-0.5, -1.5, -4.5, -12.5]);
    assert_eq!(s.run(&inputs).unwrap()["y"], out["y"]);
    assert_eq!(profile.runs, 3);
    assert_eq!(profile.threads, 2);
    assert!(profile.total_ns > 0);
    // [4, 2] @ [2, 1]: 4 outputs of 2 multiply-adds each = 16 FLOPs; the
    // bias add, computed in the matmul's kernel, one per element = 4.
    let dense = profile
        .kernels
        .iter()
        .find(|k| k.op == "matmul+epilogue")
        .unwrap();
    assert_eq!(dense.flops, Some(20));
    assert_eq!(dense.result, "f32[4, 1]");
    assert!(!profile.kernels.iter().any(|k| k.op == "add"));
    let times: Vec<u64> = profile.kernels.iter().map(|k| k.median_ns).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    // The step is not applied: a profiled training step leaves w alone.
    let fit = Compiler::new()
        .dim("N", 2)
        .backend(dlc::api::Backend::Jit)
        .compile_source("fit.dl", FIT)
        .unwrap();
    let mut s = fit.session();
    let inputs = map(vec![
        ("x", Tensor::f32(vec![2, 1], vec![1., 2.])),
        ("t", Tensor::f32(vec![2, 1], vec![2., 4.])),
    ]);
    let before = s.params().clone();
    let (p, out) = s.profile(&inputs, ProfileTarget::TrainStep, 1).unwrap();
    assert!(p.kernels.iter().any(|k| k.op.starts_with("matmul")));
    assert_eq!(out["loss"].as_f32().unwrap(), [10.0]);
    assert_eq!(s.params(), &before);
}

#[test]
fn profile_needs_the_jit() {
    use dlc::profile::ProfileTarget;
    let model = Compiler::new()
        .dim("N", 1)
        .backend(dlc::api::Backend::Interp)
        .compile_source("affine.dl", AFFINE)
        .unwrap();
    let inputs = map(vec![("x", Tensor::f32(vec![1, 2], vec![1., 2.]))]);
    let err = model
        .session()
        .profile(&inputs, ProfileTarget::Forward, 1)
        .unwrap_err();
    assert!(matches!(err, Error::ProfileNeedsJit), "{err}");
    assert!(err.to_string().contains("--backend jit"));
}
