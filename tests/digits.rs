//! The README's training claim, measured: a small CNN trained by
//! `dlc train` on scikit-learn's handwritten digits reaches at least 97%
//! accuracy on the held-out split.

use std::process::Command;

#[test]
fn digits_cnn_reaches_97_percent_on_the_held_out_split() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("digits.params.safetensors");
    let run = Command::new(env!("CARGO_BIN_EXE_dlc"))
        .current_dir(root)
        .args([
            "train",
            "lang/examples/digits.dl",
            "--data",
            "lang/examples/data/digits_train.safetensors",
            "--eval",
            "lang/examples/data/digits_test.safetensors",
            "--epochs",
            "8",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("dlc runs");
    let stderr = String::from_utf8_lossy(&run.stderr);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "dlc train failed:\n{stderr}{stdout}");
    let text = format!("{stdout}{stderr}");
    let last_accuracy: f64 = text
        .lines()
        .filter_map(|l| l.split("eval accuracy ").nth(1))
        .filter_map(|v| v.trim().parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no eval accuracy reported:\n{text}"));
    assert!(
        last_accuracy >= 0.97,
        "held-out accuracy {last_accuracy} is below 0.97:\n{text}"
    );
    assert!(out.exists(), "the checkpoint was written");
}
