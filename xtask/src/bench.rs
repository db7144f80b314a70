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

pub fn run(args: &BenchArgs, icl: &Path, venv: &Path, model: &Path, data: &Path, root: &Path) -> Result<()> {
    let threads = args.threads.to_string();
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work)?;
    let mut rows = String::new();
    let mut peaks = String::new();
    for dtype in &args.dtypes {
        let torch_dtype = match dtype.as_str() {
            "f32" => "float32",
            "bf16" => "bfloat16",
            other => bail!("unknown dtype `{other}` (f32, bf16)"),
        };
        let out = Command::new(icl)
            .args(["peak", "--dtype", dtype, "--threads", &threads])
            .args(if dtype == "bf16" { ["--size", "1024"] } else { ["--size", "2048"] })
            .output()
            .context("icl peak")?;
        let peak: serde_json::Value = serde_json::from_slice(&out.stdout).context("icl peak output")?;
        let peak_gflops = peak["gflops"].as_f64().context("gflops")?;
        println!("bench: {dtype} matmul peak {peak_gflops:.1} GFLOP/s on {threads} threads");
        writeln!(peaks, "- {dtype} matmul peak (tch, {threads} threads): {peak_gflops:.1} GFLOP/s")?;

        for spec in &args.tasks {
            let (task, limit) = spec.split_once('=').unwrap_or((spec.as_str(), "500"));
            let file = data.join(task_file(task)?);
            let results = work.join(format!("icl_{task}_{dtype}.json"));
            let icl_run = measure(
                Command::new(icl)
                    .args(["eval", "--quiet", "--model"])
                    .arg(model)
                    .arg("--task")
                    .arg(format!("{task}={}", file.display()))
                    .args(["--limit", limit, "--dtype", dtype, "--threads", &threads, "--output"])
                    .arg(&results)
                    .stdout(std::process::Stdio::null()),
            )?;
            let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&results)?)?;
            let r = &report["tasks"][task];
            let compute_s = r["seconds"].as_f64().unwrap_or(f64::NAN);
            let gflops = r["flops"].as_f64().unwrap_or(f64::NAN) / compute_s / 1e9;
            let tokens_s = r["tokens"].as_f64().unwrap_or(f64::NAN) / icl_run.seconds;
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
                let line = format!(
                    "| {task} | {limit} | {dtype} | {batch} | {:.1} | {:.1} | **{:.2}x** | {:.0} | {:.0} | {:.0} | {:.1} | {:.0}% |",
                    icl_run.seconds,
                    lm.seconds,
                    lm.seconds / icl_run.seconds,
                    tokens_s,
                    icl_run.max_rss_mib,
                    lm.max_rss_mib,
                    gflops,
                    100.0 * gflops / peak_gflops,
                );
                println!("{line}");
                rows += &line;
                rows.push('\n');
            }
        }
    }
    let command: Vec<String> = std::env::args().skip(1).collect();
    let report = format!(
        "# icl against lm-evaluation-harness\n\n\
         `cargo xtask {}` on {} ({}).\n\n\
         Model: `{}`. lm-eval 0.4.13, Hugging Face backend, offline, same JSONL rows and prompts, same thread count.\n\
         Seconds are whole-process wall time (start-up included) for one task each; icl's GFLOP/s counts the FLOPs \
         the rows need (distinct tokens, head at scored positions only, each multiple-choice context once) over its \
         compute time.\n\n{peaks}\n\
         | task | rows | dtype | lm-eval batch | icl s | lm-eval s | speed-up | icl tokens/s | icl peak RSS MiB | lm-eval peak RSS MiB | icl GFLOP/s | share of peak |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n{rows}",
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
