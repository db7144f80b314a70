//! `icl`: evaluate causal language models on in-context-learning tasks.

mod compare;
mod convert;
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
    Eval(Box<EvalArgs>),
    /// Convert a JSONL, CSV or Parquet file into a canonical Parquet task file.
    Convert(convert::ConvertArgs),
    /// Measure this machine's matmul throughput (GFLOP/s) through libtorch, as JSON.
    Peak(PeakArgs),
    /// Convert a llama.cpp GGUF file (Llama architecture) into a Hugging Face folder.
    ImportGguf(import_gguf::ImportGgufArgs),
    /// Compare two runs example by example from their `--log-samples` files: paired differences with
    /// standard errors and McNemar's exact test per task.
    Compare(compare::CompareArgs),
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
    /// A task as NAME=PATH (JSONL, or Parquet by the `.parquet` extension); the task type is read
    /// from the file's fields unless `--type` is given. Repeatable.
    #[arg(long = "task", value_parser = parse_task, required_unless_present_any = ["suite", "named_tasks"])]
    pub tasks: Vec<(String, PathBuf)>,
    /// Known tasks by name, comma-separated: with `--suite`, its labels to run; otherwise labels of
    /// llm-foundry's `eval/yamls/tasks_*.yaml` or files NAME.jsonl / NAME.parquet, looked up in
    /// `--data-dir` (else ICL_DATA) and its sibling `llm-foundry` folder.
    #[arg(long = "tasks", value_delimiter = ',')]
    pub named_tasks: Vec<String>,
    /// A suite file (llm-foundry's `icl_tasks` YAML, with optional `eval_gauntlet` categories): its
    /// tasks with their types, shots and delimiters, and aggregate gauntlet scores.
    #[arg(long, conflicts_with_all = ["tasks", "task_type", "fields", "num_fewshot", "fewshot_seed", "prompt_string", "example_delimiter", "continuation_delimiter", "max_new_tokens", "stop"])]
    pub suite: Option<PathBuf>,
    /// Folder that the suite's relative `dataset_uri`s are resolved against (default: the suite
    /// file's folder), as llm-foundry resolves them against the folder it runs in.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// An llm-foundry gauntlet file (`eval_gauntlet:`): categories, weighting and averages of the
    /// suite's tasks, replacing the suite's own.
    #[arg(long, requires = "suite")]
    pub gauntlet: Option<PathBuf>,
    /// Suite tasks whose data file does not exist are left out (listed on the terminal and in
    /// results.json) instead of failing the run; gauntlet categories that need them are dropped.
    #[arg(long)]
    pub skip_missing: bool,
    /// Declared type of the `--task` files: language_modeling, multiple_choice, schema,
    /// generation_task_with_answers (alias question_answering) or perplexity.
    #[arg(long = "type")]
    pub task_type: Option<String>,
    /// Read a canonical field from another field (column) of the `--task` files, as
    /// CANONICAL=SOURCE (e.g. `query=ctx`). Repeatable.
    #[arg(long = "field", value_parser = parse_field)]
    pub fields: Vec<(String, String)>,
    /// Examples with answers put before each `--task` example.
    #[arg(long, default_value_t = 0)]
    pub num_fewshot: usize,
    /// Seed of the shot choice.
    #[arg(long, default_value_t = 1234)]
    pub fewshot_seed: u64,
    /// Whose shot choice: `llm-foundry` (its get_fewshot_sample_idxs), `lm-eval` (its ContextSampler,
    /// and its prompt layout), `icl` (shots depend on the seed and the example's row only). Default:
    /// `icl` for --task, the suite's `fewshot_sampler` (llm-foundry unless set) with --suite, which
    /// this flag overrides.
    #[arg(long, value_enum)]
    pub fewshot_sampler: Option<FewshotSamplerArg>,
    /// Put once before the shots and the example (taken literally; use $'...' for escapes).
    #[arg(long, default_value = "")]
    pub prompt_string: String,
    /// Put before each shot and before the example when anything precedes it (lm-eval sampler: after
    /// each shot). Default: "\n"; lm-eval's "\n\n" with --fewshot-sampler lm-eval.
    #[arg(long)]
    pub example_delimiter: Option<String>,
    /// Put between a context and its answer.
    #[arg(long, default_value = " ")]
    pub continuation_delimiter: String,
    /// Generation tasks: most new tokens per example (default: llm-foundry's, the token count of the
    /// task's longest answer or alias).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_new_tokens: Option<u64>,
    /// Generation tasks: a stop sequence (llm-foundry's early_stopping_criteria); repeatable. Default:
    /// the example delimiter.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Write each prompt as a conversation rendered by the model's chat template
    /// (`chat_template.jinja`, or `chat_template` in tokenizer_config.json), as lm-eval's
    /// `--apply_chat_template` does; NAME picks one of several named templates. Applies to suites too.
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "")]
    pub apply_chat_template: Option<String>,
    /// A system turn before the shots (lm-eval's `--system_instruction`); without a chat template it
    /// is put right before each prompt.
    #[arg(long, value_name = "TEXT")]
    pub system_instruction: Option<String>,
    /// With --apply-chat-template: each shot as a user and an assistant turn (lm-eval's default under
    /// a template); `--fewshot-as-multiturn false` puts the shots and the question in one user turn.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub fewshot_as_multiturn: Option<bool>,
    /// Write the prompt and target strings of every example as JSON lines (`task`, `index`,
    /// `context` or, for schema tasks, `contexts`, `targets`, `gold` for choice tasks, and `shots`:
    /// the rows shown as shots, in order).
    #[arg(long)]
    pub write_prompts: Option<PathBuf>,
    /// Evaluate only the first N rows of each task.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Longest model input in tokens, for every task type (lm-eval's `max_length`): longer inputs
    /// lose tokens on the left, perplexity documents are cut into windows of N tokens. Default: the
    /// model's (`n_positions`, `max_position_embeddings`, ...); at most that.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_length: Option<u64>,
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Write aggregate results as JSON.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Write one JSON line per example.
    #[arg(long)]
    pub log_samples: Option<PathBuf>,
    /// Most tokens (rows x padded length) in one forward pass: a number, or `auto` (sized from the
    /// free memory: `MemAvailable` on the CPU, the GPU's free memory on CUDA; said on stderr; on the
    /// CPU, scoring batches then hold at most 4096 tokens, 2048 in bf16 and f16, to stay in cache).
    #[arg(long, default_value = "auto", value_parser = parse_batch_tokens)]
    pub batch_tokens: BatchTokens,
    /// Most rows in one forward pass.
    #[arg(long, default_value_t = 256)]
    pub batch_rows: usize,
    /// Shortest packed row: sequences are packed into rows of this many tokens (or the longest
    /// sequence, if longer).
    #[arg(long, default_value_t = 512)]
    pub row_len: usize,
    /// Compute every token of every prompt, instead of computing a token prefix that a batch's prompts
    /// share (the same few-shot examples before every question) once per batch.
    #[arg(long)]
    pub no_prefix_reuse: bool,
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
    /// Leave out the rows that cannot be scored (a continuation with no tokens of its own, one longer
    /// than the model) instead of failing; each is named on stderr and counted in the results.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Ranks and how they talk: `auto` (one rank when started alone; MPI under `mpirun`/`srun`, NCCL
    /// over MPI when on GPUs in a build with NCCL; NCCL under `torchrun`), `none`, `mpi` or `nccl`.
    /// Several ranks share the examples (data parallel); rank 0 alone writes results, samples and the
    /// journal.
    #[arg(long, value_enum, default_value_t = DistArg::Auto)]
    pub dist: DistArg,
    /// Keep 1/N of the model's parameters on each of the N ranks (FSDP): each layer is gathered from
    /// all ranks just before it computes and freed after, while every rank scores its own examples;
    /// each rank reads only its slices of the checkpoint (safetensors only).
    #[arg(long)]
    pub shard_params: bool,
    /// Several ranks: a rank silent this many seconds counts as lost (its host left the network),
    /// and every rank ends with an error naming it; a rank whose process dies is noticed at once.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(2..))]
    pub peer_timeout: u64,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum DistArg {
    Auto,
    None,
    Mpi,
    Nccl,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum FewshotSamplerArg {
    LlmFoundry,
    LmEval,
    Icl,
}

impl FewshotSamplerArg {
    pub fn sampler(self) -> icl_data::FewshotSampler {
        match self {
            Self::LlmFoundry => icl_data::FewshotSampler::LlmFoundry,
            Self::LmEval => icl_data::FewshotSampler::LmEval,
            Self::Icl => icl_data::FewshotSampler::Icl,
        }
    }
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

/// `--batch-tokens`: a fixed figure, or sized from free memory.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BatchTokens {
    Auto,
    Fixed(usize),
}

impl std::fmt::Display for BatchTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(n) => write!(f, "{n}"),
        }
    }
}

fn parse_batch_tokens(s: &str) -> Result<BatchTokens, String> {
    if s == "auto" {
        return Ok(BatchTokens::Auto);
    }
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(BatchTokens::Fixed(n)),
        _ => Err(format!("expected `auto` or a positive number of tokens, got `{s}`")),
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

fn parse_field(s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((canonical, source)) if !canonical.is_empty() && !source.is_empty() => {
            Ok((canonical.to_owned(), source.to_owned()))
        }
        _ => bail!("expected CANONICAL=SOURCE, got `{s}`"),
    }
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

fn main() {
    icl_models::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Eval(args) => eval::run(&args).context("icl eval"),
        Command::Convert(args) => convert::run(&args).context("icl convert"),
        Command::Peak(args) => peak(&args).context("icl peak"),
        Command::ImportGguf(args) => import_gguf::run(&args).context("icl import-gguf"),
        Command::Compare(args) => compare::run(&args).context("icl compare"),
    };
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            1
        }
    };
    exit_without_teardown(code)
}

/// Ends the process now, skipping the C++ static destructors that `exit` would run: libtorch's take
/// 0.1-0.15 s (unregistering every operator from its dispatcher), a twentieth of a short generation
/// task. Everything of ours is dropped by then (files written and closed, MPI finalized), and the
/// standard streams are flushed here.
fn exit_without_teardown(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process without running atexit handlers; nothing of this process
    // needs one (see above).
    unsafe { libc::_exit(code) }
}

/// An error and its causes, `: `-separated, as `{:#}` writes them, less a cause that the message
/// before it already ends with (the library errors name their source in their own message, e.g.
/// "file.yaml: No such file or directory", and `{:#}` would repeat it).
pub(crate) fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if text.ends_with(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod describe_tests {
    use super::describe;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let source = icl_data::Error::Io { path: "/x.yaml".into(), source: io };
        let e = anyhow::Error::new(source).context("icl eval");
        assert_eq!(describe(&e), "icl eval: /x.yaml: No such file or directory");
        let plain = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(describe(&plain), "outer: middle: inner");
    }
}
