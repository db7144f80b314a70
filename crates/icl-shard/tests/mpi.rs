//! The MPI backend under a real `mpirun`: every collective on 2 and 3 ranks, and a failing rank ending
//! the whole job quickly. Needs Open MPI (`cargo xtask setup` installs it); built with `--features mpi`.
#![allow(clippy::unwrap_used)]
#![cfg(feature = "mpi")]

use icl_test_support::example;
use std::process::Output;
use std::time::{Duration, Instant};

fn mpirun(ranks: usize, args: &[&str]) -> (Output, Duration) {
    let start = Instant::now();
    let output = icl_test_support::mpirun(ranks)
        .arg(example("collective_check"))
        .args(["--dist", "mpi"])
        .args(args)
        .output()
        .expect("mpirun (Open MPI) is not installed: run `cargo xtask setup`");
    (output, start.elapsed())
}

#[test]
fn every_collective_agrees_on_two_and_three_ranks() {
    for ranks in [2, 3] {
        let (out, _) = mpirun(ranks, &[]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{ranks} ranks: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
        for rank in 0..ranks {
            assert!(
                stdout.contains(&format!("rank {rank} of {ranks}: all collectives agree (mpi on Cpu)")),
                "{stdout}"
            );
        }
    }
}

#[test]
fn a_failing_rank_ends_every_rank_quickly() {
    let (out, took) = mpirun(3, &["--fail-rank", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job succeeded although rank 1 failed");
    assert!(stderr.contains("rank 1 of 3: rank 1 fails on purpose"), "{stderr}");
    assert!(took < Duration::from_secs(60), "the job took {took:?} to end");
}
