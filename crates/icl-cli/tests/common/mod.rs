//! Helpers shared by the integration tests (each test file is its own crate; not every one uses all).
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The reference models of `cargo xtask setup`: `$ICL_MODELS`, else ~/.cache/icl/models.
pub fn models_dir() -> PathBuf {
    std::env::var_os("ICL_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/icl/models"))
}

/// The task files: `$ICL_DATA`, else ../shared/data/icl next to the repository.
pub fn data_dir() -> PathBuf {
    std::env::var_os("ICL_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/icl"))
}

/// `icl eval` arguments for the multi-rank tests: four task types (generation too), `limit` rows each
/// in small batches, so that the batch count does not divide by the rank count and the last batches
/// are uneven; results and samples go to `out`.
pub fn four_task_args(model: &str, out: &Path, limit: usize) -> Vec<String> {
    let data = data_dir();
    let task = |name: &str, file: &str| format!("{name}={}", data.join(file).display());
    let mut args: Vec<String> = vec!["eval".into(), "--quiet".into(), "--threads".into(), "1".into()];
    args.extend(["--limit".into(), limit.to_string(), "--batch-tokens".into(), "1024".into()]);
    args.extend(["--model".into(), models_dir().join(model).display().to_string()]);
    for (name, file) in [
        ("lambada", "lambada_openai.jsonl"),
        ("piqa", "piqa.jsonl"),
        ("winograd", "winograd_wsc.jsonl"),
        ("triviaqa", "triviaqa_small.jsonl"),
    ] {
        args.extend(["--task".into(), task(name, file)]);
    }
    args.extend(["--output".into(), out.join("results.json").display().to_string()]);
    args.extend(["--log-samples".into(), out.join("samples.jsonl").display().to_string()]);
    args
}

/// `mpirun -np ranks icl`, arguments to follow.
pub fn mpirun(ranks: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", &ranks.to_string(), "--oversubscribe", "--bind-to", "none"])
        // CI runs as root; Open MPI refuses root without these.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .arg(env!("CARGO_BIN_EXE_icl"));
    cmd
}

/// Every line of a JSONL file, parsed.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// results.json less what depends on timing.
pub fn results_without_timing(path: &Path) -> Value {
    let mut results: Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default()).expect("results.json");
    for (_, task) in results["tasks"].as_object_mut().expect("tasks").iter_mut() {
        let task = task.as_object_mut().expect("task");
        for timing in ["seconds", "tokens_per_second", "gflops_per_second"] {
            assert!(task.remove(timing).is_some(), "{timing} missing");
        }
    }
    results
}
