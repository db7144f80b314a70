//! Parameter sharding over MPI under a real `mpirun`: on 1, 2 and 3 ranks, every rank's logits from
//! `ModelSpec::load_sharded` equal the unsharded model's within 1e-5 (f32) on its own batch, and each
//! rank holds about `1/N` of the parameters. Runs the `shard_check` example; needs Open MPI (`cargo
//! xtask setup` installs it) and is built with `--features mpi`.
#![allow(clippy::unwrap_used)]
#![cfg(feature = "mpi")]

use icl_test_support::{example, model_dir, mpirun};

/// Runs `shard_check --compare` on `ranks` ranks and returns each rank's line.
fn shard_check(name: &str, ranks: usize) -> Vec<String> {
    let output = mpirun(ranks)
        .arg(example("shard_check"))
        .arg(model_dir(name))
        .args(["--compare", "--forwards", "1", "--rows", "3", "--tokens", "24"])
        .output()
        .expect("mpirun (Open MPI) is not installed: run `cargo xtask setup`");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{name}, {ranks} ranks: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    (0..ranks)
        .map(|r| {
            let prefix = format!("rank {r} of {ranks}: ");
            stdout
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("no line for rank {r}:\n{stdout}"))
                .to_owned()
        })
        .collect()
}

/// The number after `label` in a `shard_check` line.
fn figure(line: &str, label: &str) -> f64 {
    let at = line.find(label).unwrap_or_else(|| panic!("no `{label}` in {line}")) + label.len();
    line[at..].split([',', ';', ' ']).find(|s| !s.is_empty()).unwrap().parse().unwrap()
}

const MODELS: &[&str] = &[
    "gpt-neo-tiny",
    "llama-tiny",
    "llama-tiny-tied",
    "pythia-tiny",
    "gpt2-tiny",
    "qwen2-tiny",
    "qwen2-tiny-tied",
    "qwen3-tiny",
    "qwen3-tiny-tied",
    "phi3-tiny",
    "phi3-tiny-tied",
    "mpt-tiny",
    "mpt-tiny-odd",
    "gemma2-tiny",
    "olmo2-tiny",
];

#[test]
fn sharded_logits_equal_the_unsharded_model_on_one_to_three_ranks() {
    for name in MODELS {
        for ranks in [1, 2, 3] {
            for line in shard_check(name, ranks) {
                let diff = figure(&line, "max |logit diff| vs unsharded ");
                assert!(diff <= 1e-5, "{name}, {ranks} ranks: {line}");
                let (shards, unsharded) = (figure(&line, "shards "), figure(&line, "unsharded "));
                // Shards are 1/N of the parameters, up to the padding of each stage (and MiB rounding).
                assert!((shards - unsharded / ranks as f64).abs() <= 0.1, "{name}, {ranks} ranks: {line}");
            }
        }
    }
}
