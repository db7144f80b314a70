//! The standard errors against lm-eval's own functions (`lm_eval.api.metrics`), run by the project's
//! venv (`$ICL_VENV`, default `~/.cache/icl/venv`; `cargo xtask setup` installs it) on the same
//! numbers: `mean_stderr` to the last bits, `bootstrap_stderr(perplexity, ...)` replayed exactly by
//! [`Resampler::LmEval`] (with and without lm-eval's multiprocessing pool) and approached by the
//! default counter stream within Monte-Carlo error, and `unweighted_mean_stderr` by
//! [`weighted_mean_stderr`] with equal weights.

use icl_metrics::{mean_stderr, perplexity_stderr, weighted_mean_stderr, Bootstrap, Resampler};
use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use tch::Tensor;

const SCRIPT: &str = r#"
import os, sys
from lm_eval.api import metrics as m
lines = [[float(x) for x in l.split()] for l in sys.stdin.read().splitlines() if l.strip()]
*means, logliks, stderrs = lines
for i, xs in enumerate(means):
    print(f"RESULT mean_stderr_{i} {m.mean_stderr(xs)!r}")
print(f"RESULT bootstrap_pool {m.bootstrap_stderr(m.perplexity, logliks, iters=2500)!r}")
os.environ["DISABLE_MULTIPROC"] = "1"
print(f"RESULT bootstrap_serial {m.bootstrap_stderr(m.perplexity, logliks, iters=2500)!r}")
print(f"RESULT bootstrap_big {m.bootstrap_stderr(m.perplexity, logliks, iters=20000)!r}")
print(f"RESULT unweighted {float(m.unweighted_mean_stderr(stderrs))!r}")
"#;

fn line(values: &[f64]) -> String {
    values.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(" ") + "\n"
}

/// Runs the script on the numbers; `RESULT name value` lines.
fn lm_eval(input: &str) -> BTreeMap<String, f64> {
    let mut child = Command::new(icl_test_support::venv_python())
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the venv's python");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
    let out = child.wait_with_output().expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "lm-eval script failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(|l| {
            let (name, value) = l.split_once(' ').expect("name value");
            (name.to_owned(), value.parse().expect("float"))
        })
        .collect()
}

#[test]
fn standard_errors_match_lm_eval() {
    // 0/1 accuracies, irregular reals, two values; per-example log-likelihoods; task stderrs.
    let acc: Vec<f64> = (0..101).map(|i| f64::from(u8::from(i * 37 % 11 < 4))).collect();
    let reals: Vec<f64> = (0..257).map(|i| (f64::from(i) * 0.731).sin() * 3.0 - f64::from(i % 7) / 3.0).collect();
    let two = vec![0.1, 0.7];
    let logliks: Vec<f64> =
        (0..300).map(|i| -(f64::from(i) * 1.37).cos().abs() * 4.0 - f64::from(i % 5) * 0.3).collect();
    let stderrs = vec![0.013, 0.021, 0.0087];
    let means = [&acc, &reals, &two];
    let mut input: String = means.iter().map(|m| line(m)).collect();
    input += &line(&logliks);
    input += &line(&stderrs);
    let reference = lm_eval(&input);

    for (i, xs) in means.iter().enumerate() {
        let ours = mean_stderr(&Tensor::from_slice(xs)).unwrap().unwrap();
        let theirs = reference[&format!("mean_stderr_{i}")];
        assert!((ours - theirs).abs() <= 4.0 * f64::EPSILON * theirs, "mean_stderr {i}: {ours} vs lm-eval {theirs}");
    }

    let ll = Tensor::from_slice(&logliks);
    let exact = |iters| {
        let opts = Bootstrap { iters, resampler: Resampler::LmEval, ..Default::default() };
        perplexity_stderr(&ll, &opts).unwrap().unwrap()
    };
    // Same draws, same sums: only exp() and the final sums' rounding may differ.
    let ours = exact(2500);
    for key in ["bootstrap_pool", "bootstrap_serial"] {
        let theirs = reference[key];
        eprintln!("{key}: icl {ours:?}, lm-eval {theirs:?}");
        assert!((ours / theirs - 1.0).abs() < 1e-12, "{key}: {ours} vs lm-eval {theirs}");
    }
    let (ours, theirs) = (exact(20_000), reference["bootstrap_big"]);
    eprintln!("20000 iterations: icl {ours:?}, lm-eval {theirs:?}");
    assert!((ours / theirs - 1.0).abs() < 1e-12, "20000 iterations: {ours} vs lm-eval {theirs}");
    // The counter stream estimates the same quantity: each estimate has a relative Monte-Carlo sd of
    // about 1 / sqrt(2 * 20000) = 0.5 %.
    let counter = perplexity_stderr(&ll, &Bootstrap { iters: 20_000, ..Default::default() }).unwrap().unwrap();
    eprintln!("counter stream: {counter:?}");
    assert!((counter / theirs - 1.0).abs() < 0.03, "counter stream {counter} vs lm-eval {theirs}");

    let ours = weighted_mean_stderr(&[1.0; 3], &stderrs).unwrap();
    let theirs = reference["unweighted"];
    assert!((ours - theirs).abs() <= 4.0 * f64::EPSILON * theirs, "{ours} vs lm-eval {theirs}");
}
