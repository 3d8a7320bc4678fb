//! The golden suite through the binary, as CI and users run it.

use std::process::Command;

/// Runs `dlc test` on a folder of cases under `tests/` with `backend`:
/// every case passes, and there are at least `min_cases` of them.
fn run_all(folder: &str, backend: &str, min_cases: usize) {
    let dir = format!("{}/tests/{folder}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_dlc"))
        .args(["test", &dir, "--backend", backend])
        .output()
        .expect("run dlc");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let cases = stdout.lines().filter(|l| l.starts_with("PASS ")).count();
    let failing: Vec<&str> = stdout.lines().filter(|l| !l.starts_with("PASS ")).collect();
    assert!(out.status.success(), "dlc test failed:\n{stdout}\n{stderr}");
    assert!(
        cases >= min_cases,
        "expected every case to pass, got {cases}:\n{stdout}"
    );
    assert_eq!(failing, [format!("{cases} passed, 0 failed")], "{stdout}");
}

#[test]
fn every_golden_case_passes_on_the_interpreter() {
    run_all("golden", "interp", 64);
}

#[test]
fn every_golden_case_passes_on_the_jit() {
    run_all("golden", "jit", 64);
}

/// The cases `tests/golden_jax/gen.py` computed with JAX (in float64,
/// from LANGUAGE.md's formulas): random shapes and attributes for every
/// op family, composed graphs, small pipelines and edge cases (ties,
/// "same" padding with even kernels, empty slices, pools over padding).
#[test]
fn every_jax_reference_case_passes_on_both_backends() {
    for backend in ["interp", "jit"] {
        run_all("golden_jax/cases", backend, 261);
    }
}

#[test]
fn a_wrong_expectation_fails_the_run_with_exit_code_1() {
    let tmp = tempfile::tempdir().unwrap();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/layers/dense");
    let case = tmp.path().join("dense");
    std::fs::create_dir(&case).unwrap();
    for f in std::fs::read_dir(src).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), case.join(f.file_name())).unwrap();
    }
    // Perturb one expected value beyond the tolerance.
    let exp = case.join("expected.safetensors");
    let mut tensors = dlc::io::read_safetensors(&exp).unwrap();
    let (name, t) = tensors.iter_mut().next().unwrap();
    let name = name.clone();
    if let dlc::tensor::Data::F32(v) = &mut t.data {
        v[0] += 1.0;
    }
    dlc::io::write_safetensors(&exp, &tensors, None).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dlc"))
        .args(["test"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL "), "{stdout}");
    assert!(stdout.contains(&format!("`{name}`[")), "{stdout}");
    assert!(
        stdout.trim_end().ends_with("0 passed, 1 failed"),
        "{stdout}"
    );
}
