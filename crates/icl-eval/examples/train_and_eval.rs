//! Trains a small GPT-Neo with tch on a public-domain text and evaluates LAMBADA and PIQA subsets every
//! N steps from inside the training loop, logging to TensorBoard, JSONL, CSV and PNG plots.
//!
//! ```sh
//! cargo xtask setup      # the venv, the GPT-2 tokenizer (reference models) and the corpus
//! cargo run --release -p icl-eval --example train_and_eval -- [--steps 300] [--eval-every 100] ...
//! ```
//!
//! Corpus: the Jargon File 4.4.7 (public domain) from Debian's `jargon-text` package, which `cargo xtask
//! setup` unpacks to `~/.cache/icl/corpus/jargon.txt`; nothing of it comes from LAMBADA (BookCorpus
//! novels) or PIQA. The last 5% of its tokens are held out for a validation loss.

use anyhow::{bail, Context, Result};
use clap::Parser;
use icl_log::{LogSinks, MetricLog, Panel, PlotOptions};
use icl_models::{CausalLm, GptNeo, GptNeoConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::nn::{OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

#[derive(Parser, Debug)]
#[command(about = "Train a small GPT-Neo and evaluate LAMBADA and PIQA every N steps")]
struct Args {
    /// Training text (default: `$ICL_CORPUS/jargon.txt`, `$ICL_CORPUS` defaulting to ~/.cache/icl/corpus).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// GPT-2 tokenizer (default: `$ICL_MODELS/gpt-neo-125m-random/tokenizer.json`).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Folder with lambada_openai.jsonl and piqa.jsonl (default: `$ICL_DATA`, else ../shared/data/icl).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where the event file, metrics.jsonl, metrics.csv, plots and the final checkpoint go.
    #[arg(long, default_value = "target/train_and_eval")]
    out: PathBuf,
    #[arg(long, default_value_t = 400)]
    steps: usize,
    /// Evaluate every this many steps (and at step 0 and the last step).
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Rows of each evaluation task (the first N).
    #[arg(long, default_value_t = 100)]
    eval_rows: usize,
    /// Shots before each evaluated example (prompts are built once, before training).
    #[arg(long, default_value_t = 0)]
    num_fewshot: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: i64,
    #[arg(long, default_value_t = 128)]
    seq_len: i64,
    #[arg(long, default_value_t = 128)]
    hidden: i64,
    #[arg(long, default_value_t = 4)]
    layers: i64,
    #[arg(long, default_value_t = 4)]
    heads: i64,
    /// Peak learning rate (linear warm-up over the first 5% of steps, cosine decay to 10%).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    #[arg(long)]
    threads: Option<i32>,
    /// Only draw the plots again from `OUT/metrics.jsonl` of a finished run.
    #[arg(long)]
    replot: bool,
}

fn env_dir(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(default))
}

/// The corpus as prose: the Jargon File's box-drawn tables are dropped, braces marking
/// cross-references removed, and each paragraph's indented lines joined into one line.
fn clean_corpus(text: &str) -> String {
    let mut paragraphs = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.chars().any(|c| ('\u{2500}'..='\u{257F}').contains(&c)) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() {
            if !current.is_empty() {
                paragraphs.push(std::mem::take(&mut current));
            }
            continue;
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.extend(line.chars().filter(|&c| c != '{' && c != '}'));
    }
    if !current.is_empty() {
        paragraphs.push(current);
    }
    paragraphs.join("\n\n")
}

/// SplitMix64: a seeded, dependency-free source of window offsets.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `rows` random windows of `len` tokens from `tokens`, as an i64 `[rows, len]` tensor.
fn sample_windows(tokens: &[i64], rows: i64, len: i64, rng: &mut SplitMix64, device: Device) -> Result<Tensor> {
    let len = len as usize;
    let mut ids = Vec::with_capacity(rows as usize * len);
    for _ in 0..rows {
        let start = rng.below(tokens.len() - len + 1);
        ids.extend_from_slice(&tokens[start..start + len]);
    }
    Ok(Tensor::from_slice(&ids).f_view([rows, len as i64])?.f_to_device(device)?)
}

/// Mean loss over consecutive windows of the held-out tokens (no gradients, evaluation mode).
fn validation_loss(model: &GptNeo, tokens: &[i64], rows: i64, len: i64, device: Device) -> Result<f64> {
    let _no_grad = tch::no_grad_guard();
    let was_training = model.is_training();
    model.set_training(false);
    let windows = tokens.len() / len as usize;
    let mut total = 0.0;
    let mut batches = 0;
    for chunk in (0..windows).collect::<Vec<_>>().chunks(rows as usize) {
        let ids: Vec<i64> =
            chunk.iter().flat_map(|&w| tokens[w * len as usize..(w + 1) * len as usize].iter().copied()).collect();
        let ids = Tensor::from_slice(&ids).f_view([chunk.len() as i64, len])?.f_to_device(device)?;
        total += model.next_token_loss(&ids)?.double_value(&[]);
        batches += 1;
    }
    model.set_training(was_training);
    Ok(total / batches.max(1) as f64)
}

/// Linear warm-up over the first 5% of the steps, then cosine decay to 10% of the peak.
fn learning_rate(step: usize, steps: usize, peak: f64) -> f64 {
    let warmup = (steps / 20).max(1);
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
}

/// CPU seconds this process has used, all threads together. Other processes on a shared machine
/// stretch wall-clock times but not this, so the evaluation/training ratio is also given in it.
fn process_cpu_seconds() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) } == 0;
    if ok {
        t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
    } else {
        f64::NAN
    }
}

/// Wall-clock and CPU seconds of a part of the run.
#[derive(Debug, Default, Clone, Copy)]
struct Spent {
    wall: f64,
    cpu: f64,
}

impl Spent {
    fn since(wall: Instant, cpu: f64) -> Self {
        Self { wall: wall.elapsed().as_secs_f64(), cpu: process_cpu_seconds() - cpu }
    }

    fn add(&mut self, other: Self) {
        self.wall += other.wall;
        self.cpu += other.cpu;
    }
}

/// Time spent training and evaluating.
#[derive(Debug, Default)]
struct Timing {
    train: Spent,
    eval: Spent,
    eval_calls: usize,
    first_eval: Spent,
}

/// One PNG per metric in `out/plots`, and `out/train_and_eval.png` with the main curves side by side.
fn write_plots(out: &Path, history: &BTreeMap<String, Vec<(i64, f64)>>) -> Result<(PathBuf, Vec<PathBuf>)> {
    let options = PlotOptions::default();
    let plots = icl_log::write_plots(history, &out.join("plots"), &options)?;
    let overview = ["train/loss", "val/loss", "lambada/perplexity", "lambada/acc", "piqa/acc", "piqa/acc_norm"];
    let panels: Vec<Panel<'_>> = overview
        .iter()
        .filter_map(|name| {
            let errors = history.get(&format!("{name}{}", icl_log::STDERR_SUFFIX)).map_or(&[][..], Vec::as_slice);
            history.get(*name).map(|points| Panel { title: name, points, errors })
        })
        .collect();
    let overview_path = out.join("train_and_eval.png");
    icl_log::plot_grid_png(&overview_path, &panels, 3, &PlotOptions { width: 420, height: 300, ..options })?;
    Ok((overview_path, plots))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.replot {
        let history = icl_log::read_metrics_jsonl(&args.out.join("metrics.jsonl"))?;
        let (overview, plots) = write_plots(&args.out, &history)?;
        println!("plots: {} and {} per-metric PNGs", overview.display(), plots.len());
        return Ok(());
    }
    icl_models::keep_freed_memory();
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    if args.steps == 0 || args.eval_every == 0 {
        bail!("--steps and --eval-every must be positive");
    }
    let device = Device::cuda_if_available();
    let corpus_path =
        args.corpus.clone().unwrap_or_else(|| env_dir("ICL_CORPUS", ".cache/icl/corpus").join("jargon.txt"));
    let tokenizer_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| env_dir("ICL_MODELS", ".cache/icl/models").join("gpt-neo-125m-random/tokenizer.json"));
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| std::env::var_os("ICL_DATA").map(PathBuf::from))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/icl"));

    // Corpus: tokenized once; the last 5% held out.
    let raw = std::fs::read_to_string(&corpus_path)
        .with_context(|| format!("{}: the training corpus (run `cargo xtask setup`)", corpus_path.display()))?;
    let tokenizer = icl_data::Tokenizer::from_file(&tokenizer_path)?;
    let text = clean_corpus(&raw);
    let start = Instant::now();
    let tokens: Vec<i64> = tokenizer.encode(&text)?.into_iter().map(i64::from).collect();
    let split = tokens.len() * 95 / 100;
    let (train_tokens, val_tokens) = tokens.split_at(split);
    if train_tokens.len() < args.seq_len as usize * 2 || val_tokens.len() < args.seq_len as usize {
        bail!("{}: too little text ({} tokens) for windows of {}", corpus_path.display(), tokens.len(), args.seq_len);
    }
    // Validation on at most 8 windows (one batch) keeps its cost small next to the task evaluation.
    let val_tokens = &val_tokens[..val_tokens.len().min(8 * args.seq_len as usize)];
    println!(
        "corpus {}: {} characters of prose, {} tokens ({} train, {} validation used), tokenized in {:.1}s",
        corpus_path.display(),
        text.len(),
        tokens.len(),
        train_tokens.len(),
        val_tokens.len(),
        start.elapsed().as_secs_f64()
    );

    // The model: GPT-Neo with the GPT-2 vocabulary, alternating global and local attention.
    let vocab_size = tokenizer.vocab_size() as i64;
    if args.layers < 2 || args.layers % 2 != 0 {
        bail!("--layers must be even and positive (global and local layers alternate)");
    }
    let config_json = serde_json::json!({
        "vocab_size": vocab_size, "hidden_size": args.hidden, "num_layers": args.layers,
        "num_heads": args.heads, "attention_types": [[["global", "local"], args.layers / 2]],
        "window_size": 256, "max_position_embeddings": 512, "intermediate_size": 4 * args.hidden,
        "eos_token_id": 50256, "embed_dropout": args.dropout,
        "attention_dropout": args.dropout, "resid_dropout": args.dropout,
    });
    // from_json validates (sizes, dropout range) with errors that name the field.
    let config = GptNeoConfig::from_json(Path::new("config.json"), &config_json.to_string())?;
    tch::manual_seed(args.seed as i64);
    let mut vs = VarStore::new(device);
    vs.set_kind(Kind::Float);
    let model = GptNeo::new(vs, &config)?;
    model.init_weights()?;
    println!(
        "model: GPT-Neo, {} layers, hidden {}, {} heads, {:.2}M parameters, on {device:?}",
        args.layers,
        args.hidden,
        args.heads,
        GptNeo::parameter_count(&config).unwrap_or(0) as f64 / 1e6
    );

    // The evaluator: LAMBADA and PIQA subsets read, prompted, tokenized and batched once.
    let specs = [("lambada", "lambada_openai.jsonl"), ("piqa", "piqa.jsonl")]
        .iter()
        .map(|(name, file)| icl_data::TaskSpec {
            name: (*name).into(),
            path: data_dir.join(file),
            read: icl_data::ReadOptions::default(),
            prompt: icl_data::PromptOptions { num_fewshot: args.num_fewshot, ..Default::default() },
        })
        .collect();
    let encode = icl_data::EncodeOptions { max_length: config.max_position_embeddings as usize, prefix_token: 50256 };
    let options = icl_eval::EvalOptions { limit: Some(args.eval_rows), ..Default::default() };
    let start = Instant::now();
    let evaluator = icl_eval::TrainingEvaluator::new(icl_eval::Evaluator::new(specs, &tokenizer, encode, options)?);
    println!(
        "evaluation: {} rows each of LAMBADA and PIQA ({}-shot), prepared in {:.1}s",
        args.eval_rows,
        args.num_fewshot,
        start.elapsed().as_secs_f64()
    );

    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    // metrics.jsonl and metrics.csv are rewritten; an earlier run's event file would stay beside the
    // new one, and TensorBoard would draw both runs as one.
    for entry in std::fs::read_dir(&args.out).with_context(|| format!("listing {}", args.out.display()))? {
        let path = entry?.path();
        if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("events.out.tfevents.")) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    let mut log = MetricLog::create(&args.out, LogSinks::default())?;
    let mut optimizer = tch::nn::AdamW::default().build(model.var_store(), args.lr)?;
    let mut rng = SplitMix64(args.seed);
    let mut timing = Timing::default();
    model.set_training(true);
    let run_start = Instant::now();
    for step in 0..=args.steps {
        if step % args.eval_every == 0 || step == args.steps {
            let (start, cpu) = (Instant::now(), process_cpu_seconds());
            let results = evaluator.evaluate(&model, &icl_shard::SingleProcess)?;
            let task_seconds = start.elapsed().as_secs_f64();
            let val_loss = validation_loss(&model, val_tokens, args.batch_size, args.seq_len, device)?;
            let spent = Spent::since(start, cpu);
            let seconds = spent.wall;
            if timing.eval_calls == 0 {
                timing.first_eval = spent;
            }
            timing.eval.add(spent);
            timing.eval_calls += 1;
            let mut metrics = icl_eval::logged_metrics(&results);
            metrics.push(("val/loss".into(), val_loss));
            metrics.push(("eval/seconds".into(), seconds));
            let named: Vec<(&str, f64)> = metrics.iter().map(|(n, v)| (n.as_str(), *v)).collect();
            log.log(step as i64, &named)?;
            let shown: Vec<String> = metrics.iter().map(|(n, v)| format!("{n} {v:.4}")).collect();
            println!(
                "step {step:>5} eval ({task_seconds:.2}s tasks, {:.2}s validation): {}",
                seconds - task_seconds,
                shown.join(", ")
            );
        }
        if step == args.steps {
            break;
        }
        let (start, cpu) = (Instant::now(), process_cpu_seconds());
        let lr = learning_rate(step, args.steps, args.lr);
        optimizer.set_lr(lr);
        let batch = sample_windows(train_tokens, args.batch_size, args.seq_len, &mut rng, device)?;
        let loss = model.next_token_loss(&batch)?;
        optimizer.backward_step_clip_norm(&loss, 1.0);
        let loss = loss.double_value(&[]);
        timing.train.add(Spent::since(start, cpu));
        log.log(step as i64 + 1, &[("train/loss", loss), ("train/lr", lr)])?;
        if (step + 1) % 10 == 0 {
            println!(
                "step {:>5} loss {loss:.4} lr {lr:.2e} ({:.3}s/step)",
                step + 1,
                timing.train.wall / (step + 1) as f64
            );
        }
    }
    let total = run_start.elapsed().as_secs_f64();

    let (overview_path, plots) = write_plots(&args.out, log.history())?;
    let checkpoint = args.out.join("checkpoint");
    model.save(&checkpoint)?;
    std::fs::copy(&tokenizer_path, checkpoint.join("tokenizer.json"))
        .with_context(|| format!("copying {} into {}", tokenizer_path.display(), checkpoint.display()))?;

    let steps = args.steps as f64;
    let calls = timing.eval_calls as f64;
    println!();
    println!(
        "training: {} steps, {:.3}s per step ({:.3} CPU-s), {:.1}s in all",
        args.steps,
        timing.train.wall / steps,
        timing.train.cpu / steps,
        timing.train.wall
    );
    println!(
        "evaluation: {} calls, {:.2}s per call ({:.2} CPU-s; the first {:.2}s), {:.1}s in all = {:.1} training steps per call",
        timing.eval_calls,
        timing.eval.wall / calls,
        timing.eval.cpu / calls,
        timing.first_eval.wall,
        timing.eval.wall,
        (timing.eval.wall / calls) / (timing.train.wall / steps)
    );
    println!(
        "slowdown at --eval-every {}: {:.1}% wall-clock, {:.1}% CPU time (evaluation / training); run {total:.1}s in all",
        args.eval_every,
        100.0 * timing.eval.wall / timing.train.wall,
        100.0 * timing.eval.cpu / timing.train.cpu
    );
    println!("event file: {}", log.event_file().map_or("-".into(), |p| p.display().to_string()));
    println!("metrics: {} and {}", args.out.join("metrics.jsonl").display(), args.out.join("metrics.csv").display());
    println!(
        "plots: {} and {} per-metric PNGs in {}",
        overview_path.display(),
        plots.len(),
        args.out.join("plots").display()
    );
    println!("checkpoint: {} (`icl eval --model` reads it)", checkpoint.display());
    Ok(())
}
