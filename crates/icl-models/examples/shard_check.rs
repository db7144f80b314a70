//! One rank of a parameter-sharded model under `mpirun`: loads `MODEL_DIR` with
//! `ModelSpec::load_sharded`, runs forward passes on this rank's own batch, and prints what it holds.
//!
//! `mpirun -np N target/release/examples/shard_check MODEL_DIR [--compare] [--forwards K]
//! [--rows R] [--tokens T] [--threads H] [--malloc-default]`
//!
//! Every rank prints one line `rank r of N: ...` with its parameter bytes (shards, peak with gathered
//! stages, unsharded total), its resident memory (before loading, after loading, peak), and the
//! seconds per forward pass with and without prefetching the next stage. Rank `r` first runs `r`
//! extra forward passes, which `ShardedModel::finish_collectives` lets the other ranks wait out. With `--compare`, each rank
//! also loads the unsharded model (so memory figures then include it) and checks that its logits
//! equal the sharded model's within 1e-5; `tests/sharded_mpi.rs` runs that on 1 to 3 ranks.

use anyhow::{bail, Context};
use icl_models::{load_model, CausalLm, Dtype, ModelInput, ModelSpec};
use icl_shard::{Collective, MpiCollective};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// `VmRSS` and `VmHWM` (peak) of this process, in MiB.
fn resident_mib() -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line =
            status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name} in /proc/self/status"))?;
        let kib: f64 = line.split_whitespace().nth(1).context("malformed status line")?.parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

struct Args {
    dir: PathBuf,
    compare: bool,
    forwards: usize,
    rows: i64,
    tokens: i64,
    threads: i32,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args { dir: PathBuf::new(), compare: false, forwards: 3, rows: 4, tokens: 64, threads: 1 };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--compare" => args.compare = true,
            "--malloc-default" => {}
            "--forwards" => args.forwards = value("--forwards")?.parse()?,
            "--rows" => args.rows = value("--rows")?.parse()?,
            "--tokens" => args.tokens = value("--tokens")?.parse()?,
            "--threads" => args.threads = value("--threads")?.parse()?,
            other if other.starts_with("--") => bail!("unknown option {other}"),
            other => args.dir = PathBuf::from(other),
        }
    }
    if args.dir.as_os_str().is_empty() {
        bail!("usage: shard_check MODEL_DIR [--compare] [--forwards K] [--rows R] [--tokens T] [--threads H]");
    }
    Ok(args)
}

fn run(collective: Rc<dyn Collective>, args: &Args) -> anyhow::Result<String> {
    let (rank, world) = (collective.rank(), collective.world_size());
    tch::set_num_threads(args.threads);
    let (rss_start, _) = resident_mib()?;
    let spec = ModelSpec::read(&args.dir)?;
    let model = spec.load_sharded(Dtype::F32, Device::Cpu, collective.clone())?;
    let (rss_loaded, hwm_loaded) = resident_mib()?;
    // This rank's own batch: every rank evaluates different examples.
    tch::manual_seed(1000 + rank as i64);
    let vocab = model.vocab_size().min(50000);
    let ids = Tensor::randint(vocab, [args.rows, args.tokens], (Kind::Int64, Device::Cpu));
    let input = ModelInput::causal(&ids)?;
    let logits = model.logits(&input)?;
    // Ranks run different numbers of passes (rank r runs r more), as data-parallel ranks do, and
    // stay in step through finish_collectives.
    for _ in 0..rank {
        let _extra = model.logits(&input)?;
    }
    model.finish_collectives()?;
    let mut timings = Vec::new();
    for prefetch in [true, false] {
        model.set_prefetch(prefetch);
        collective.barrier()?;
        let (start, blocked) = (Instant::now(), model.blocked_seconds());
        for _ in 0..args.forwards {
            let _logits = model.logits(&input)?;
        }
        collective.barrier()?;
        let per_forward = |s: f64| s / args.forwards as f64;
        timings.push((per_forward(start.elapsed().as_secs_f64()), per_forward(model.blocked_seconds() - blocked)));
    }
    let held = model.held_bytes();
    let (rss_end, hwm_end) = resident_mib()?;
    let largest = model.stage_bytes().into_iter().max_by_key(|(_, b)| *b).unwrap_or_default();
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let mut line = format!(
        "rank {rank} of {world}: parameters MiB: shards {:.1}, peak held {:.1}, unsharded {:.1}, largest stage {} {:.1}; \
         RSS MiB: before load {rss_start:.0}, after load {rss_loaded:.0} (peak {hwm_loaded:.0}), after forwards {rss_end:.0} \
         (peak {hwm_end:.0}); s/forward ({}x{} tokens): prefetch {:.3} (blocked in gathers {:.3}), no prefetch {:.3} \
         (blocked {:.3})",
        mib(held.shards),
        mib(held.peak),
        mib(held.unsharded),
        largest.0,
        mib(largest.1),
        args.rows,
        args.tokens,
        timings[0].0,
        timings[0].1,
        timings[1].0,
        timings[1].1,
    );
    if args.compare {
        let want = load_model(&args.dir, Dtype::F32, Device::Cpu)?.logits(&input)?;
        let diff = (&logits - &want).abs().max().double_value(&[]);
        if diff > 1e-5 {
            bail!("rank {rank} of {world}: sharded logits differ from the unsharded model's by {diff}");
        }
        line.push_str(&format!("; max |logit diff| vs unsharded {diff:.2e}"));
    }
    Ok(line)
}

fn main() -> std::process::ExitCode {
    // As `icl eval` does, unless asked not to (to see how much of the resident memory is freed memory
    // kept for reuse).
    if !std::env::args().any(|a| a == "--malloc-default") {
        icl_models::keep_freed_memory();
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let collective: Rc<dyn Collective> = match MpiCollective::init() {
        Ok(c) => Rc::new(c),
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match run(collective.clone(), &args) {
        Ok(line) => {
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rank {} of {}: {e:#}", collective.rank(), collective.world_size());
            // The other ranks may be waiting in a gather: end the whole job.
            collective.abort(1)
        }
    }
}
