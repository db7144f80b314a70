//! `icl`: evaluate causal language models on in-context-learning tasks.

mod eval;
mod import_gguf;
mod journal;
mod peak;
mod report;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "icl", version, about = "Fast in-context-learning evaluation for causal language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Evaluate a Hugging Face model folder on task files.
    Eval(EvalArgs),
    /// Measure this machine's matmul throughput (GFLOP/s) through libtorch, as JSON.
    Peak(PeakArgs),
    /// Convert a llama.cpp GGUF file (Llama architecture) into a Hugging Face folder.
    ImportGguf(import_gguf::ImportGgufArgs),
}

#[derive(clap::Args, Debug)]
pub struct PeakArgs {
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Side of the square matrices.
    #[arg(long, default_value_t = 2048)]
    pub size: i64,
    /// Minimum measuring time.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    #[arg(long)]
    pub threads: Option<i32>,
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Hugging Face model folder: config.json, *.safetensors, tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// A task as NAME=PATH (JSONL); the task type is read from the file's fields. Repeatable.
    #[arg(long = "task", value_parser = parse_task, required = true)]
    pub tasks: Vec<(String, PathBuf)>,
    /// Evaluate only the first N rows of each task.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Write aggregate results as JSON.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Write one JSON line per example.
    #[arg(long)]
    pub log_samples: Option<PathBuf>,
    /// Most tokens (rows x padded length) in one forward pass.
    #[arg(long, default_value_t = 16384)]
    pub batch_tokens: usize,
    /// Most rows in one forward pass.
    #[arg(long, default_value_t = 256)]
    pub batch_rows: usize,
    /// Shortest packed row: sequences are packed into rows of this many tokens (or the longest
    /// sequence, if longer).
    #[arg(long, default_value_t = 512)]
    pub row_len: usize,
    /// Intra-op threads (default: libtorch's choice, one per core).
    #[arg(long)]
    pub threads: Option<i32>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Journal of per-request results, appended as batches finish (default: OUTPUT.journal when
    /// --output is given).
    #[arg(long)]
    pub journal: Option<PathBuf>,
    /// Continue an interrupted run from its journal: finished batches are not recomputed.
    #[arg(long)]
    pub resume: bool,
    /// Read a pickle checkpoint (`pytorch_model.bin`) when the folder has no safetensors. Pickles are
    /// refused by default: only use this for files you trust.
    #[arg(long)]
    pub allow_pickle: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
}

impl DtypeArg {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

fn parse_task(s: &str) -> Result<(String, PathBuf)> {
    let Some((name, path)) = s.split_once('=') else {
        bail!("expected NAME=PATH, got `{s}`");
    };
    if name.is_empty() || path.is_empty() {
        bail!("expected NAME=PATH, got `{s}`");
    }
    Ok((name.to_owned(), PathBuf::from(path)))
}

fn peak(args: &PeakArgs) -> Result<()> {
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    let kind = match args.dtype {
        DtypeArg::F32 => tch::Kind::Float,
        DtypeArg::Bf16 => tch::Kind::BFloat16,
    };
    let device = tch::Device::cuda_if_available();
    let gflops = peak::matmul_gflops(kind, args.size, args.seconds, device)?;
    let report = serde_json::json!({
        "dtype": args.dtype.name(), "size": args.size, "gflops": gflops,
        "threads": tch::get_num_threads(), "device": format!("{device:?}"),
    });
    println!("{report}");
    Ok(())
}

fn main() -> std::process::ExitCode {
    icl_models::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Eval(args) => eval::run(&args).context("icl eval"),
        Command::Peak(args) => peak(&args).context("icl peak"),
        Command::ImportGguf(args) => import_gguf::run(&args).context("icl import-gguf"),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
