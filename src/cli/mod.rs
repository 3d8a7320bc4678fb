//! The `dlc` command line (CLI.md): argument definitions and dispatch.
//!
//! Thin on purpose: every command is a few calls into the library
//! (`dlc::api`, `dlc::golden`, `dlc::train`) plus printing. A user error is
//! one message on stderr and exit code 1; nothing here panics.

mod commands;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "dlc", version, about = "A small deep-learning compiler")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Parse, expand and shape-check a file; print diagnostics only.
    Check { file: PathBuf },
    /// Compile one model and print a summary (or what --emit asks for).
    Compile(CompileArgs),
    /// One forward pass (and with --grads the gradients of `loss`).
    Run(RunArgs),
    /// Run every golden case found under the given folders.
    Test(TestArgs),
    /// Minibatch training with checkpoints.
    Train(TrainArgs),
    /// Time compilation, the forward pass and the training step.
    Bench(BenchArgs),
}

/// Options shared by the commands that compile a model.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model of the file to use (default: the first).
    #[arg(long)]
    pub model: Option<String>,
    /// Bind a dimension symbol, e.g. `--dim N=32` (repeatable).
    #[arg(long = "dim", value_name = "NAME=SIZE", value_parser = parse_dim)]
    pub dims: Vec<(String, usize)>,
    /// Execution backend.
    #[arg(long, value_name = "interp|jit", default_value = "jit")]
    pub backend: String,
    /// Worker threads (default: all cores); results do not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Args, Debug)]
pub struct CompileArgs {
    pub file: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Optimisation level: -O0, -O1 or -O2.
    #[arg(short = 'O', value_name = "LEVEL", value_parser = ["0", "1", "2"])]
    pub opt: Option<String>,
    /// Compile the training step (forward, backward, update).
    #[arg(long)]
    pub train: bool,
    /// What to print: ast, ir, opt-ir, grad-ir, kernels, plan, clif, asm.
    #[arg(long, value_name = "WHAT")]
    pub emit: Option<String>,
    /// Print the statistics as one JSON object (`--stats json`).
    #[arg(long, value_name = "json")]
    pub stats: Option<String>,
    /// Write the output to a file instead of stdout.
    #[arg(short = 'o', value_name = "OUT")]
    pub out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    pub file: PathBuf,
    /// Input tensors (safetensors, or one tensor as .npy named by its stem).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Parameters; missing ones are initialised from --seed.
    #[arg(long)]
    pub params: Option<PathBuf>,
    /// Write the outputs here instead of printing them.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also compute `grad.<param>` of `loss` for every parameter.
    #[arg(long)]
    pub grads: bool,
    /// Seed of the parameter initialisers.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also print the time of every compiled kernel, slowest first, with
    /// GFLOP/s (median of --runs runs after one warm-up).
    #[arg(long)]
    pub profile: bool,
    /// Timed runs of `--profile`.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub runs: u64,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Args, Debug)]
pub struct TestArgs {
    /// Folders to search for golden cases (folders holding model.dl).
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    #[arg(long, value_name = "interp|jit", default_value = "jit")]
    pub backend: String,
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    pub file: PathBuf,
    /// Training tensors named like the model's inputs, examples along axis 0.
    #[arg(long)]
    pub data: PathBuf,
    /// Evaluation tensors, same layout; loss and accuracy after each epoch.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Batch size (a last partial batch of an epoch is dropped).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Start from these parameters, or resume from a checkpoint.
    #[arg(long)]
    pub params: Option<PathBuf>,
    #[arg(long, value_name = "sgd|adam", value_parser = ["sgd", "adam"])]
    pub optimizer: Option<String>,
    /// Learning rate (overrides the model's `train` block).
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f32>,
    /// SGD momentum (overrides the model's `train` block).
    #[arg(long, allow_negative_numbers = true)]
    pub momentum: Option<f32>,
    /// Checkpoint file (default: `<model>.params.safetensors`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    pub file: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Also time the training step.
    #[arg(long)]
    pub train: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also time every compiled kernel (forward, and the training step with
    /// --train), slowest first, over --steps runs.
    #[arg(long)]
    pub profile: bool,
    /// Timed steps after the warm-up (at least; see --min-time).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed steps before timing starts.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Keep timing steps until this many seconds have passed (as
    /// anchors.py's 1.5 s windows): a median of a few milliseconds of steps
    /// shows one moment of a shared machine, not its steady state.
    #[arg(long, default_value_t = 0.0, value_name = "SECONDS")]
    pub min_time: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// SGD learning rate of the timed training step (overrides the model's
    /// `train` block; the reference workloads use 0.01).
    #[arg(long)]
    pub lr: Option<f32>,
    /// SGD momentum of the timed training step (the reference workloads
    /// use 0.9).
    #[arg(long)]
    pub momentum: Option<f32>,
}

fn parse_dim(s: &str) -> Result<(String, usize), String> {
    let bad = || format!("`{s}` is not NAME=SIZE with a positive integer size (e.g. N=32)");
    let (name, size) = s.split_once('=').ok_or_else(bad)?;
    let name = name.trim();
    let valid_name = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let size: usize = size.trim().parse().map_err(|_| bad())?;
    if !valid_name || size == 0 {
        return Err(bad());
    }
    Ok((name.to_string(), size))
}

/// Parse the arguments, run the command, map failures to exit code 1.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match commands::dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            commands::report(&e);
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_parse_name_equals_size() {
        assert_eq!(parse_dim("N=32"), Ok(("N".to_string(), 32)));
        assert_eq!(parse_dim("seq_len = 7"), Ok(("seq_len".to_string(), 7)));
        for bad in ["N", "N=", "=3", "N=-1", "N=0", "3=4", "N=x"] {
            assert!(parse_dim(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
