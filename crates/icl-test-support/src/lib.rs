//! Helpers for the workspace's tests, and for tests only: every crate takes it as a dev-dependency,
//! never as a dependency, and no tool or library calls it.
//!
//! It holds what integration tests of several crates need alike: where `cargo xtask setup` puts the
//! fixtures (the reference models, [`models_dir`]; the task files, [`data_dir`]; the Python venv with
//! torch, transformers and lm-eval, [`venv_dir`]), each overridable by an environment variable; a
//! JSONL reader; and what multi-process tests start (`mpirun`, the crate's built examples). Helpers
//! particular to one crate (tch reference-logit checks, the `icl` binary's arguments) stay in that
//! crate's `tests/common`. Standard library and `serde_json` only, so it builds at once and ties no
//! test to tch.
//!
//! A missing fixture panics with a message that names the path and says to run `cargo xtask setup`.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `$HOME`.
pub fn home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").expect("HOME"))
}

/// The folder named by the environment variable `var`, else `default()`.
pub fn env_dir(var: &str, default: impl FnOnce() -> PathBuf) -> PathBuf {
    std::env::var_os(var).map_or_else(default, PathBuf::from)
}

/// The workspace's root folder (scripts/, suites/, crates/).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

/// The reference models: `$ICL_MODELS`, else `~/.cache/icl/models`.
pub fn models_dir() -> PathBuf {
    env_dir("ICL_MODELS", || home().join(".cache/icl/models"))
}

/// The model folder `name` under [`models_dir`], which must hold a `config.json`.
pub fn model_dir(name: &str) -> PathBuf {
    let dir = models_dir().join(name);
    assert!(dir.join("config.json").is_file(), "{}: missing, run `cargo xtask setup`", dir.display());
    dir
}

/// The task files: `$ICL_DATA`, else `../shared/data/icl` next to the workspace.
pub fn data_dir() -> PathBuf {
    env_dir("ICL_DATA", || workspace_dir().join("../shared/data/icl"))
}

/// The project's Python venv: `$ICL_VENV`, else `~/.cache/icl/venv`.
pub fn venv_dir() -> PathBuf {
    env_dir("ICL_VENV", || home().join(".cache/icl/venv"))
}

/// The program `name` of the venv (`python`, `torchrun`), which must exist.
pub fn venv_bin(name: &str) -> PathBuf {
    let bin = venv_dir().join("bin").join(name);
    assert!(bin.is_file(), "{}: missing, run `cargo xtask setup`", bin.display());
    bin
}

/// The venv's `python`, which must exist.
pub fn venv_python() -> PathBuf {
    venv_bin("python")
}

/// Every line of a JSONL file, parsed.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: not a JSON line ({e}): {l}", path.display())))
        .collect()
}

/// `mpirun -np ranks`, oversubscribed, bound to no core, and allowed to run as root (CI runs as root;
/// Open MPI refuses root without this); the program and its arguments follow.
pub fn mpirun(ranks: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", &ranks.to_string(), "--oversubscribe", "--bind-to", "none"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd
}

/// The example `name` of the crate under test, which `cargo test` builds next to its integration
/// tests (`target/<profile>/examples`), and which must exist.
pub fn example(name: &str) -> PathBuf {
    // Integration tests live in target/<profile>/deps.
    let exe = std::env::current_exe().expect("the test's path");
    let profile = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let example = profile.join("examples").join(name);
    assert!(
        example.is_file(),
        "{} is missing: `cargo test` builds it with the tests (not `--test NAME` alone; with the \
         example's required features, e.g. `--features mpi`)",
        example.display()
    );
    example
}

/// Runs `scripts/SCRIPT` with the venv's python on llm-foundry 0.22.0's wheel (`$ICL_LLM_FOUNDRY`,
/// default `~/.cache/icl/llm_foundry-0.22.0-py3-none-any.whl`, fetched by `cargo xtask setup`) in a
/// fresh work folder, `input` on its stdin; returns its stdout parsed as JSON, panicking with its
/// stderr when it fails.
pub fn llm_foundry_reference(script: &str, input: &str) -> Value {
    use std::io::Write;
    use std::process::Stdio;
    let wheel = env_dir("ICL_LLM_FOUNDRY", || home().join(".cache/icl/llm_foundry-0.22.0-py3-none-any.whl"));
    assert!(wheel.exists(), "{}: llm-foundry's wheel is missing, run `cargo xtask setup`", wheel.display());
    let script = workspace_dir().join("scripts").join(script);
    let work = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(venv_python())
        .arg(&script)
        .arg("--llm-foundry")
        .arg(&wheel)
        .arg("--workdir")
        .arg(work.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("reference input");
    let out = child.wait_with_output().expect("reference script");
    assert!(out.status.success(), "{} failed:\n{}", script.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON from the reference script")
}
