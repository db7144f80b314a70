//! `icl eval --shard-params` (FSDP) under a real `mpirun` on CPUs: every rank keeps 1/N of the
//! parameters and scores its own examples, and results and samples are bit-identical to an unsharded
//! run on one rank, on 1, 2 and 3 ranks and for a tied (GPT-Neo) and an untied (Pythia) head. Built
//! with `--features mpi`; needs Open MPI (`cargo xtask setup`).
#![cfg(feature = "mpi")]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn models_dir() -> PathBuf {
    std::env::var_os("ICL_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/icl/models"))
}

fn data_dir() -> PathBuf {
    std::env::var_os("ICL_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/icl"))
}

/// Four task types (generation too), 23 rows each in small batches: the batch count does not divide
/// by the rank count, so ranks run different numbers of forward passes.
fn eval_args(model: &str, out: &Path) -> Vec<String> {
    let data = data_dir();
    let task = |name: &str, file: &str| format!("{name}={}", data.join(file).display());
    let mut args: Vec<String> = vec!["eval".into(), "--quiet".into(), "--threads".into(), "1".into()];
    args.extend(["--limit".into(), "23".into(), "--batch-tokens".into(), "1024".into()]);
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

fn run(ranks: Option<usize>, args: &[String]) -> Output {
    let mut cmd = match ranks {
        None => Command::new(env!("CARGO_BIN_EXE_icl")),
        Some(n) => {
            let mut cmd = Command::new("mpirun");
            cmd.args(["-np", &n.to_string(), "--oversubscribe", "--bind-to", "none"])
                // CI runs as root; Open MPI refuses root without these.
                .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
                .arg(env!("CARGO_BIN_EXE_icl"));
            cmd
        }
    };
    cmd.args(args).output().expect("starting icl (is Open MPI installed? `cargo xtask setup`)")
}

/// results.json less what depends on timing.
fn results_without_timing(path: &Path) -> Value {
    let mut results: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default()).expect("results.json");
    for (_, task) in results["tasks"].as_object_mut().expect("tasks").iter_mut() {
        let task = task.as_object_mut().expect("task");
        for timing in ["seconds", "tokens_per_second", "gflops_per_second"] {
            task.remove(timing);
        }
    }
    results
}

#[test]
fn sharded_runs_equal_the_unsharded_run_bit_for_bit() {
    for model in ["gpt-neo-tiny", "pythia-tiny"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = dir.path().join("one");
        std::fs::create_dir(&one).expect("mkdir");
        let out = run(None, &eval_args(model, &one));
        assert!(out.status.success(), "{model}: {}", String::from_utf8_lossy(&out.stderr));
        let samples = std::fs::read(one.join("samples.jsonl")).expect("samples");
        let results = results_without_timing(&one.join("results.json"));
        for ranks in [None, Some(2), Some(3)] {
            let many = dir.path().join(format!("sharded{ranks:?}"));
            std::fs::create_dir(&many).expect("mkdir");
            let mut args = eval_args(model, &many);
            args.push("--shard-params".into());
            let out = run(ranks, &args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{model}, {ranks:?} ranks: {stderr}");
            assert!(std::fs::read(many.join("samples.jsonl")).expect("samples") == samples, "{model}, {ranks:?}: samples differ");
            assert_eq!(results_without_timing(&many.join("results.json")), results, "{model}, {ranks:?} ranks");
        }
    }
}

#[test]
fn shard_params_refuses_pickles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = eval_args("gpt-neo-tiny", dir.path());
    args.extend(["--shard-params".into(), "--allow-pickle".into()]);
    let out = run(None, &args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be combined with --allow-pickle"));
}
