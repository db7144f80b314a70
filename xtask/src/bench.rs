//! `cargo xtask bench`: `icl eval` against lm-evaluation-harness in one invocation, same model folder,
//! JSONL rows, prompts and thread count; whole-process wall time and peak RSS of each, and icl's
//! achieved FLOP/s as a share of this machine's matmul peak measured in the same run.

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Tasks, with rows per task.
    #[arg(long, value_delimiter = ',', default_values_t = ["lambada=500".to_owned(), "piqa=500".to_owned(), "hellaswag=300".to_owned()])]
    pub tasks: Vec<String>,
    /// Compute dtypes of icl (lm-eval runs each in the same dtype).
    #[arg(long, value_delimiter = ',', default_values_t = ["f32".to_owned()])]
    pub dtypes: Vec<String>,
    /// lm-eval batch sizes to run against.
    #[arg(long, value_delimiter = ',', default_values_t = [32usize])]
    pub lm_eval_batch_sizes: Vec<usize>,
    /// Threads for both tools.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Model folder (default: the random-init GPT-Neo-125M-shaped model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Markdown report.
    #[arg(long, default_value = "docs/bench.md")]
    pub out: PathBuf,
    /// Generation rows: TriviaQA (zero-shot, its 32-row sample) on this many rows, icl against
    /// transformers' batched greedy `generate` on the same prompts; 0 leaves them out.
    #[arg(long, default_value_t = 32)]
    pub generation_rows: usize,
    /// transformers' batch size for the generation rows.
    #[arg(long, default_value_t = 32)]
    pub generation_batch: usize,
    /// Prefix-reuse rows: llm-foundry's gsm8k 8-shot (the same eight worked examples before every
    /// question) on this many rows, icl with and without `--no-prefix-reuse`; 0 leaves them out.
    #[arg(long, default_value_t = 100)]
    pub prefix_reuse_rows: usize,
    /// Model of the generation and prefix-reuse rows (default: SmolLM2-135M-Instruct).
    #[arg(long)]
    pub generation_model: Option<PathBuf>,
    /// llm-foundry's gauntlet data folder, for gsm8k (default: `llm-foundry` next to the data folder).
    #[arg(long)]
    pub foundry_data: Option<PathBuf>,
}

/// What the bf16 speed rows say instead of figures on a CPU without native bf16 instructions.
const NO_NATIVE_BF16: &str = "not meaningful (no native bf16: no avx512_bf16/amx_bf16 in /proc/cpuinfo)";

/// Whether this CPU has native bf16 matmul instructions (AVX-512 BF16 or AMX).
fn native_bf16() -> bool {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.strip_prefix("flags"))
        .any(|f| f.split_whitespace().any(|w| w == "avx512_bf16" || w == "amx_bf16"))
}

/// Lines of `samples.jsonl`-like files keyed by `index`: how many of `ours`' outputs equal `theirs'`.
fn identical_outputs(ours: &Path, theirs: &Path) -> Result<(usize, usize)> {
    let read = |p: &Path| -> Result<std::collections::BTreeMap<u64, String>> {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).with_context(|| format!("{}: bad line", p.display()))?;
                let index = v["index"].as_u64().with_context(|| format!("{}: a line without `index`", p.display()))?;
                Ok((index, v["output"].as_str().unwrap_or_default().to_owned()))
            })
            .collect()
    };
    let (a, b) = (read(ours)?, read(theirs)?);
    Ok((a.iter().filter(|(i, out)| b.get(*i) == Some(*out)).count(), a.len().max(b.len())))
}

/// Per-example predictions of an icl `--log-samples` file keyed by `index`: multiple-choice rows'
/// `pred` and `pred_norm` against `gold`, language-modelling rows' `is_greedy`.
fn predictions(path: &Path) -> Result<std::collections::BTreeMap<u64, Vec<(i64, bool)>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            let at = || format!("{} line {}", path.display(), n + 1);
            let v: serde_json::Value = serde_json::from_str(l).with_context(|| format!("{}: bad JSON", at()))?;
            let index = v["index"].as_u64().with_context(|| format!("{}: no `index`", at()))?;
            let picks = if let Some(greedy) = v["is_greedy"].as_bool() {
                vec![(i64::from(greedy), greedy)]
            } else {
                let gold = v["gold"].as_i64().with_context(|| format!("{}: no `gold` or `is_greedy`", at()))?;
                ["pred", "pred_norm"]
                    .iter()
                    .map(|field| {
                        let pick = v[*field].as_i64().with_context(|| format!("{}: no `{field}`", at()))?;
                        Ok((pick, pick == gold))
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            Ok((index, picks))
        })
        .collect()
}

/// icl in bf16 against icl in f32 on one task's samples: per metric (`acc`, and `acc_norm` for
/// multiple choice), f32 accuracy, bf16 accuracy (both in points) and the share of examples whose
/// prediction is the same.
fn bf16_agreement(f32_samples: &Path, bf16_samples: &Path) -> Result<Vec<(&'static str, f64, f64, f64)>> {
    let (a, b) = (predictions(f32_samples)?, predictions(bf16_samples)?);
    if a.len() != b.len() || a.keys().ne(b.keys()) {
        bail!("{} and {} hold different examples", f32_samples.display(), bf16_samples.display());
    }
    let metrics = a.values().next().map_or(0, Vec::len);
    let n = a.len().max(1) as f64;
    Ok(["acc", "acc_norm"]
        .into_iter()
        .take(metrics)
        .enumerate()
        .map(|(m, name)| {
            let correct = |s: &std::collections::BTreeMap<u64, Vec<(i64, bool)>>| {
                100.0 * s.values().filter(|p| p[m].1).count() as f64 / n
            };
            let same = a.iter().filter(|(i, p)| b[*i][m].0 == p[m].0).count() as f64 / n;
            (name, correct(&a), correct(&b), 100.0 * same)
        })
        .collect())
}

struct Measured {
    seconds: f64,
    max_rss_mib: f64,
}

/// Runs `cmd` to completion and measures its wall time and peak resident memory (`wait4`).
fn measure(cmd: &mut Command) -> Result<Measured> {
    let start = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in; the child is ours and not waited on elsewhere.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = start.elapsed().as_secs_f64();
    if rc != pid {
        bail!("wait4 on {cmd:?}: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{cmd:?} failed (wait status {status})");
    }
    Ok(Measured { seconds, max_rss_mib: usage.ru_maxrss as f64 / 1024.0 })
}

/// Reads every file of the model folder `dir` once (into the page cache), if it exists.
fn warm_page_cache(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries {
        let path = entry?.path();
        if path.is_file() {
            std::io::copy(&mut std::fs::File::open(&path)?, &mut std::io::sink())
                .with_context(|| format!("reading {}", path.display()))?;
        }
    }
    Ok(())
}

/// This machine's matmul throughput through libtorch (`icl peak`), GFLOP/s.
fn matmul_peak(icl: &Path, dtype: &str, threads: &str) -> Result<f64> {
    let out = Command::new(icl)
        .args(["peak", "--dtype", dtype, "--threads", threads])
        .args(if dtype == "bf16" { ["--size", "1024"] } else { ["--size", "2048"] })
        .output()
        .context("icl peak")?;
    let peak: serde_json::Value = serde_json::from_slice(&out.stdout).context("icl peak output")?;
    peak["gflops"].as_f64().context("icl peak output: gflops")
}

fn task_file(task: &str) -> Result<&'static str> {
    Ok(match task {
        "lambada" => "lambada_openai.jsonl",
        "piqa" => "piqa.jsonl",
        "hellaswag" => "hellaswag.jsonl",
        other => bail!("unknown bench task `{other}` (lambada, piqa, hellaswag)"),
    })
}

fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let flags: Vec<&str> = info
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .map(|f| f.split_whitespace().filter(|w| ["avx2", "avx512f", "avx512_bf16", "amx_bf16"].contains(w)).collect())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cores} cores, {}", flags.join(" "))
}

/// Paths the bench needs besides its arguments.
pub struct BenchPaths<'a> {
    pub icl: &'a Path,
    pub venv: &'a Path,
    /// Model of the scoring rows.
    pub model: &'a Path,
    /// Model of the generation and prefix-reuse rows.
    pub generation_model: &'a Path,
    pub data: &'a Path,
    pub foundry: &'a Path,
    pub root: &'a Path,
}

pub fn run(args: &BenchArgs, paths: &BenchPaths<'_>) -> Result<()> {
    let BenchPaths { icl, venv, model, data, root, .. } = *paths;
    let threads = args.threads.to_string();
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work)?;
    let native = native_bf16();
    // Whichever program reads a model first would pay for reading it from disk (8.6 s against 0.3 s
    // for SmolLM2 here): read both models' files once, so every timed run finds them cached.
    for dir in [model, paths.generation_model] {
        warm_page_cache(dir)?;
    }
    let mut rows = String::new();
    let mut peaks = String::new();
    let mut generation_rows = String::new();
    let mut prefix_rows = String::new();
    let mut icl_seconds = std::collections::BTreeMap::new();
    let mut lm_eval_seconds = std::collections::BTreeMap::new();
    for dtype in &args.dtypes {
        let torch_dtype = match dtype.as_str() {
            "f32" => "float32",
            "bf16" => "bfloat16",
            other => bail!("unknown dtype `{other}` (f32, bf16)"),
        };
        let peak_gflops = matmul_peak(icl, dtype, &threads)?;
        println!("bench: {dtype} matmul peak {peak_gflops:.1} GFLOP/s on {threads} threads");
        writeln!(
            peaks,
            "- {dtype} matmul peak (tch, {threads} threads): {peak_gflops:.1} GFLOP/s at the start; each row's share \
             is of the mean of the peaks measured just before and just after its icl run (this machine's speed drifts)"
        )?;

        for spec in &args.tasks {
            let (task, limit) = spec.split_once('=').unwrap_or((spec.as_str(), "500"));
            let file = data.join(task_file(task)?);
            let results = work.join(format!("icl_{task}_{dtype}.json"));
            let peak_before = matmul_peak(icl, dtype, &threads)?;
            let icl_run = measure(
                Command::new(icl)
                    .args(["eval", "--quiet", "--model"])
                    .arg(model)
                    .arg("--task")
                    .arg(format!("{task}={}", file.display()))
                    .args(["--limit", limit, "--dtype", dtype, "--threads", &threads, "--output"])
                    .arg(&results)
                    .arg("--log-samples")
                    .arg(work.join(format!("icl_{task}_{dtype}.samples.jsonl")))
                    .stdout(std::process::Stdio::null()),
            )?;
            icl_seconds.insert((task.to_owned(), dtype.clone()), icl_run.seconds);
            let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&results)?)?;
            let r = &report["tasks"][task];
            let compute_s = r["seconds"].as_f64().unwrap_or(f64::NAN);
            let gflops = r["flops"].as_f64().unwrap_or(f64::NAN) / compute_s / 1e9;
            let tokens_s = r["tokens"].as_f64().unwrap_or(f64::NAN) / icl_run.seconds;
            let peak_after = matmul_peak(icl, dtype, &threads)?;
            let peak_gflops = (peak_before + peak_after) / 2.0;
            for &batch in &args.lm_eval_batch_sizes {
                let lm_out = work.join(format!("lm_eval_{task}_{dtype}_b{batch}"));
                let _ = std::fs::remove_dir_all(&lm_out);
                let lm = measure(
                    Command::new("bash")
                        .arg(root.join("scripts/run_lm_eval.sh"))
                        .arg(model)
                        .arg(&lm_out)
                        .arg(limit)
                        .arg(format!("icl_{task}"))
                        .env("PY", venv.join("bin/python"))
                        .env("DATA_DIR", data)
                        .env("BATCH_SIZE", batch.to_string())
                        .env("DTYPE", torch_dtype)
                        .env("OMP_NUM_THREADS", &threads)
                        .env("MKL_NUM_THREADS", &threads)
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null()),
                )?;
                let line = if dtype == "bf16" && !native {
                    format!(
                        "| {task} | {limit} | {dtype} | {batch} | {NO_NATIVE_BF16} | | | | {:.0} | {:.0} | | | |",
                        icl_run.max_rss_mib, lm.max_rss_mib,
                    )
                } else {
                    format!(
                        "| {task} | {limit} | {dtype} | {batch} | {:.1} | {:.1} | **{:.2}x** | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} / {:.0} | {:.0}% |",
                        icl_run.seconds,
                        lm.seconds,
                        lm.seconds / icl_run.seconds,
                        tokens_s,
                        icl_run.max_rss_mib,
                        lm.max_rss_mib,
                        gflops,
                        peak_before,
                        peak_after,
                        100.0 * gflops / peak_gflops,
                    )
                };
                println!("{line}");
                rows += &line;
                rows.push('\n');
                lm_eval_seconds.insert((task.to_owned(), dtype.clone(), batch), lm.seconds);
            }
        }
        let speed_note = |seconds: String| if dtype == "bf16" && !native { NO_NATIVE_BF16.to_owned() } else { seconds };
        if args.generation_rows > 0 {
            let (icl_s, hf_s, same, n) = generation_row(args, paths, &work, dtype, torch_dtype, &threads)?;
            let line = format!(
                "| triviaqa (0-shot) | {n} | {dtype} | {} | {} | {same}/{n} |",
                args.generation_batch,
                speed_note(format!("{icl_s:.1} | {hf_s:.1} | **{:.2}x**", hf_s / icl_s)),
            );
            println!("{line}");
            generation_rows += &line;
            generation_rows.push('\n');
        }
        if args.prefix_reuse_rows > 0 {
            let (with_s, without_s, same, n) = prefix_reuse_row(args, paths, &work, dtype, &threads)?;
            let line = format!(
                "| gsm8k 8-shot | {n} | {dtype} | {} | {same}/{n} |",
                speed_note(format!("{with_s:.1} | {without_s:.1} | **{:.2}x**", without_s / with_s)),
            );
            println!("{line}");
            prefix_rows += &line;
            prefix_rows.push('\n');
        }
    }
    let mut extra = String::new();
    let both = |task: &str| {
        icl_seconds.contains_key(&(task.to_owned(), "f32".to_owned()))
            && icl_seconds.contains_key(&(task.to_owned(), "bf16".to_owned()))
    };
    let tasks: Vec<&str> =
        args.tasks.iter().map(|t| t.split_once('=').map_or(t.as_str(), |(task, _)| task)).filter(|t| both(t)).collect();
    if !tasks.is_empty() {
        let mut ratios = Vec::new();
        for task in &tasks {
            let key = (task.to_string(), "f32".to_owned(), 1);
            if let (Some(lm), Some(ours)) =
                (lm_eval_seconds.get(&key), icl_seconds.get(&(task.to_string(), "bf16".to_owned())))
            {
                let ratio = if native {
                    format!("{lm:.1} / {ours:.1} s = **{:.2}x**", lm / ours)
                } else {
                    NO_NATIVE_BF16.to_owned()
                };
                ratios.push(format!("{task} {ratio}"));
            }
        }
        if !ratios.is_empty() {
            writeln!(extra, "\nicl in bf16 against lm-eval's default run (f32, batch size 1): {}.", ratios.join(", "))?;
        }
        write!(
            extra,
            "\n## bf16 against f32\n\nicl's own samples of the runs above (`--log-samples`), example by example: accuracy in \
             points and the share of examples whose prediction (the chosen answer; for language modelling, whether \
             the continuation is greedy) is the same in both.\n\n\
             | task | metric | f32 | bf16 | difference (points) | predictions the same |\n|---|---|---|---|---|---|\n"
        )?;
        for task in &tasks {
            let samples = |dtype: &str| work.join(format!("icl_{task}_{dtype}.samples.jsonl"));
            for (metric, f32_acc, bf16_acc, same) in bf16_agreement(&samples("f32"), &samples("bf16"))? {
                let line = format!(
                    "| {task} | {metric} | {f32_acc:.1} | {bf16_acc:.1} | {:+.1} | {same:.1}% |",
                    bf16_acc - f32_acc
                );
                println!("{line}");
                writeln!(extra, "{line}")?;
            }
        }
    }
    if !generation_rows.is_empty() {
        write!(
            extra,
            "\n## Generation\n\nModel: `{}`. icl's greedy decoding against transformers' batched greedy `generate` \
             (`scripts/generate_batched.py`: left-padded batches, the same stop sequences per row, the same length \
             cap) on the prompts icl wrote (`--write-prompts`); whole-process seconds of each.\n\n\
             | task | rows | dtype | transformers batch | icl s | transformers s | speed-up | outputs identical |\n\
             |---|---|---|---|---|---|---|---|\n{generation_rows}",
            paths.generation_model.display()
        )?;
    }
    if !prefix_rows.is_empty() {
        write!(
            extra,
            "\n## Shared prefixes\n\nModel: `{}`. llm-foundry's `gsm8k_prepended_8shot.jsonl` (v0.3 gauntlet settings), \
             icl with the shared prefix computed once and with `--no-prefix-reuse`; whole-process seconds.\n\n\
             | task | rows | dtype | with reuse s | without s | speed-up | outputs identical |\n\
             |---|---|---|---|---|---|---|\n{prefix_rows}",
            paths.generation_model.display()
        )?;
    }
    let command: Vec<String> = std::env::args().skip(1).collect();
    let report = format!(
        "# icl against lm-evaluation-harness\n\n\
         `cargo xtask {}` on {} ({}).\n\n\
         Model: `{}`. lm-eval 0.4.13, Hugging Face backend, offline, same JSONL rows and prompts, same thread count.\n\
         Seconds are whole-process wall time (start-up included) for one task each; icl's GFLOP/s counts the FLOPs \
         the rows need (distinct tokens, head at scored positions only, each multiple-choice context once) over its \
         compute time.\n\n{peaks}\n\
         | task | rows | dtype | lm-eval batch | icl s | lm-eval s | speed-up | icl tokens/s | icl peak RSS MiB | lm-eval peak RSS MiB | icl GFLOP/s | peak before / after | share of peak |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n{rows}{extra}",
        command.join(" "),
        cpu_description(),
        std::process::Command::new("date").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default(),
        model.display(),
    );
    let out = root.join(&args.out);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, report)?;
    println!("bench: wrote {}", out.display());
    Ok(())
}

/// icl and transformers' batched `generate` on the same TriviaQA prompts: (icl seconds, transformers
/// seconds, identical outputs, rows).
fn generation_row(
    args: &BenchArgs,
    paths: &BenchPaths<'_>,
    work: &Path,
    dtype: &str,
    torch_dtype: &str,
    threads: &str,
) -> Result<(f64, f64, usize, usize)> {
    let file = paths.data.join("triviaqa_small.jsonl");
    let (prompts, ours, theirs) = (
        work.join(format!("gen_prompts_{dtype}.jsonl")),
        work.join(format!("gen_icl_{dtype}.jsonl")),
        work.join(format!("gen_hf_{dtype}.jsonl")),
    );
    let icl = measure(
        Command::new(paths.icl)
            .args(["eval", "--quiet", "--model"])
            .arg(paths.generation_model)
            .arg("--task")
            .arg(format!("triviaqa={}", file.display()))
            .args(["--limit", &args.generation_rows.to_string(), "--dtype", dtype, "--threads", threads])
            .arg("--write-prompts")
            .arg(&prompts)
            .arg("--log-samples")
            .arg(&ours)
            .stdout(std::process::Stdio::null()),
    )?;
    let hf = measure(
        Command::new(paths.venv.join("bin/python"))
            .arg(paths.root.join("scripts/generate_batched.py"))
            .arg(paths.generation_model)
            .arg(&prompts)
            .arg(&theirs)
            .arg(args.generation_batch.to_string())
            .arg(torch_dtype)
            .env("OMP_NUM_THREADS", threads)
            .env("MKL_NUM_THREADS", threads)
            .stdout(std::process::Stdio::null()),
    )?;
    let (same, n) = identical_outputs(&ours, &theirs)?;
    Ok((icl.seconds, hf.seconds, same, n))
}

/// gsm8k 8-shot with the shared prefix computed once and without: (seconds with, seconds without,
/// identical outputs, rows).
fn prefix_reuse_row(
    args: &BenchArgs,
    paths: &BenchPaths<'_>,
    work: &Path,
    dtype: &str,
    threads: &str,
) -> Result<(f64, f64, usize, usize)> {
    let suite = paths.foundry.join("eval/yamls/tasks_v0.3.yaml");
    if !suite.is_file() {
        bail!("{}: missing (llm-foundry's gauntlet data, see --foundry-data)", suite.display());
    }
    let run = |reuse: bool| -> Result<(f64, PathBuf)> {
        let samples = work.join(format!("gsm8k_{dtype}_{}.jsonl", if reuse { "reuse" } else { "no_reuse" }));
        let mut cmd = Command::new(paths.icl);
        cmd.args(["eval", "--quiet", "--model"])
            .arg(paths.generation_model)
            .arg("--suite")
            .arg(&suite)
            .arg("--data-dir")
            .arg(paths.foundry)
            .args(["--tasks", "gsm8k", "--limit", &args.prefix_reuse_rows.to_string(), "--dtype", dtype])
            .args(["--threads", threads, "--log-samples"])
            .arg(&samples)
            .stdout(std::process::Stdio::null());
        if !reuse {
            cmd.arg("--no-prefix-reuse");
        }
        Ok((measure(&mut cmd)?.seconds, samples))
    };
    let (with_s, with) = run(true)?;
    let (without_s, without) = run(false)?;
    let (same, n) = identical_outputs(&with, &without)?;
    Ok((with_s, without_s, same, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, lines: &[&str]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("icl-bench-{}-{name}", std::process::id()));
        std::fs::write(&path, lines.join("\n")).unwrap();
        path
    }

    #[test]
    fn bf16_agreement_counts_accuracy_and_unchanged_predictions_per_metric() {
        let f32 = write(
            "mc-f32",
            &[
                r#"{"index":0,"gold":1,"pred":1,"pred_norm":0}"#,
                r#"{"index":1,"gold":2,"pred":0,"pred_norm":2}"#,
                r#"{"index":2,"gold":0,"pred":0,"pred_norm":0}"#,
                r#"{"index":3,"gold":3,"pred":3,"pred_norm":3}"#,
            ],
        );
        let bf16 = write(
            "mc-bf16",
            &[
                r#"{"index":1,"gold":2,"pred":2,"pred_norm":2}"#,
                r#"{"index":0,"gold":1,"pred":1,"pred_norm":0}"#,
                r#"{"index":2,"gold":0,"pred":0,"pred_norm":1}"#,
                r#"{"index":3,"gold":3,"pred":3,"pred_norm":3}"#,
            ],
        );
        let rows = bf16_agreement(&f32, &bf16).unwrap();
        assert_eq!(rows, [("acc", 75.0, 100.0, 75.0), ("acc_norm", 75.0, 50.0, 75.0)]);
        let greedy_f32 = write("lm-f32", &[r#"{"index":0,"is_greedy":true}"#, r#"{"index":1,"is_greedy":false}"#]);
        let greedy_bf16 = write("lm-bf16", &[r#"{"index":0,"is_greedy":true}"#, r#"{"index":1,"is_greedy":true}"#]);
        assert_eq!(bf16_agreement(&greedy_f32, &greedy_bf16).unwrap(), [("acc", 50.0, 100.0, 50.0)]);
        let fewer = write("lm-fewer", &[r#"{"index":0,"is_greedy":true}"#]);
        assert!(bf16_agreement(&greedy_f32, &fewer).is_err());
        let bad = write("bad", &[r#"{"index":0,"gold":1}"#]);
        let message = format!("{:#}", predictions(&bad).unwrap_err());
        assert!(message.contains("line 1") && message.contains("`pred`"), "{message}");
        for path in [f32, bf16, greedy_f32, greedy_bf16, fewer, bad] {
            let _ = std::fs::remove_file(path);
        }
    }
}
