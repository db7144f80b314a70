//! `icl eval --shard-params` (FSDP) under a real `mpirun` on CPUs: every rank keeps 1/N of the
//! parameters and scores its own examples, and results and samples are bit-identical to an unsharded
//! run on one rank, on 1, 2 and 3 ranks and for a tied (GPT-Neo) and an untied (Pythia) head. Built
//! with `--features mpi`; needs Open MPI (`cargo xtask setup`).
#![cfg(feature = "mpi")]

mod common;

use common::*;
use std::process::{Command, Output};

fn run(ranks: Option<usize>, args: &[String]) -> Output {
    let mut cmd = match ranks {
        None => Command::new(env!("CARGO_BIN_EXE_icl")),
        Some(n) => mpirun(n),
    };
    cmd.args(args).output().expect("starting icl (is Open MPI installed? `cargo xtask setup`)")
}

#[test]
fn sharded_runs_equal_the_unsharded_run_bit_for_bit() {
    for model in ["gpt-neo-tiny", "pythia-tiny"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = dir.path().join("one");
        std::fs::create_dir(&one).expect("mkdir");
        let out = run(None, &four_task_args(model, &one, 23));
        assert!(out.status.success(), "{model}: {}", String::from_utf8_lossy(&out.stderr));
        let samples = std::fs::read(one.join("samples.jsonl")).expect("samples");
        let results = results_without_timing(&one.join("results.json"));
        for ranks in [None, Some(2), Some(3)] {
            let many = dir.path().join(format!("sharded{ranks:?}"));
            std::fs::create_dir(&many).expect("mkdir");
            let mut args = four_task_args(model, &many, 23);
            args.push("--shard-params".into());
            let out = run(ranks, &args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{model}, {ranks:?} ranks: {stderr}");
            assert!(
                std::fs::read(many.join("samples.jsonl")).expect("samples") == samples,
                "{model}, {ranks:?}: samples differ"
            );
            assert_eq!(results_without_timing(&many.join("results.json")), results, "{model}, {ranks:?} ranks");
        }
    }
}

#[test]
fn shard_params_refuses_pickles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = four_task_args("gpt-neo-tiny", dir.path(), 23);
    args.extend(["--shard-params".into(), "--allow-pickle".into()]);
    let out = run(None, &args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be combined with --allow-pickle"));
}
