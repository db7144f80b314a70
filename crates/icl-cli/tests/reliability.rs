//! Surviving failures: `icl eval --resume` after a `kill -9` recomputes nothing finished and ends
//! bit-identical to an uninterrupted run; a batch that runs out of memory is retried smaller.

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `icl eval` on the tiny model, HellaSwag then PIQA, in small batches so that a run has many of them.
fn command(out: &Path, extra: &[&str]) -> Command {
    let data = data_dir();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_icl"));
    cmd.arg("eval");
    if !extra.contains(&"--threads") {
        cmd.args(["--threads", "1"]);
    }
    cmd.args(["--quiet", "--limit", "150", "--batch-tokens", "512", "--model"])
        .arg(models_dir().join("gpt-neo-tiny"))
        .arg("--task")
        .arg(format!("hellaswag={}", data.join("hellaswag.jsonl").display()))
        .arg("--task")
        .arg(format!("piqa={}", data.join("piqa.jsonl").display()))
        .arg("--output")
        .arg(out.join("results.json"))
        .arg("--log-samples")
        .arg(out.join("samples.jsonl"))
        .args(extra);
    cmd
}

fn journal_records(out: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(out.join("results.json.journal")).unwrap_or_default();
    text.lines().skip(1).filter(|l| l.ends_with('}')).map(str::to_owned).collect()
}

fn metrics(out: &Path) -> Value {
    let mut r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).expect("results")).expect("json");
    for task in r["tasks"].as_object_mut().expect("tasks").values_mut() {
        for timing in ["seconds", "tokens_per_second", "gflops_per_second"] {
            task.as_object_mut().expect("task").remove(timing);
        }
    }
    r
}

#[test]
fn a_killed_run_resumes_without_recomputing_and_ends_identical() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (whole, killed) = (tmp.path().join("whole"), tmp.path().join("killed"));
    std::fs::create_dir_all(&whole).expect("mkdir");
    std::fs::create_dir_all(&killed).expect("mkdir");

    let out = command(&whole, &[]).output().expect("run icl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let total = journal_records(&whole).len();
    assert!(total > 600, "expected every request journaled, got {total}");

    let mut child = command(&killed, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn icl");
    let start = Instant::now();
    while journal_records(&killed).len() < total / 3 {
        assert!(child.try_wait().expect("wait").is_none(), "the run finished before it could be killed");
        assert!(start.elapsed() < Duration::from_secs(120), "no progress in the journal");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let before = journal_records(&killed).len();
    assert!(before < total, "killed after the end");

    let out = command(&killed, &["--resume"]).output().expect("resume icl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("{before} finished request(s)")), "{stderr}");
    let after = journal_records(&killed);
    // Nothing recovered was computed again: every request appears once.
    assert_eq!(after.len(), total, "journal holds duplicates or gaps");
    let keys: HashSet<String> = after
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l.split_once(' ').expect("crc").1).expect("json");
            format!("{}/{}", v["task"], v["request"])
        })
        .collect();
    assert_eq!(keys.len(), total);

    let samples = |dir: &Path| std::fs::read_to_string(dir.join("samples.jsonl")).expect("samples");
    let (a, b) = (samples(&whole), samples(&killed));
    assert_eq!(a.lines().count(), b.lines().count());
    if let Some((x, y)) = a.lines().zip(b.lines()).find(|(x, y)| x != y) {
        panic!("per-example results differ after resuming:\n{x}\n{y}");
    }
    assert_eq!(metrics(&whole), metrics(&killed));

    // A different setting refuses the journal instead of mixing results.
    let out = command(&killed, &["--resume", "--row-len", "128"]).output().expect("run icl");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("row_len"));
}

/// Per-choice log-likelihoods of a samples file.
fn logliks(path: &Path) -> Vec<Vec<f64>> {
    std::fs::read_to_string(path)
        .expect("samples")
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("json");
            v["logliks"].as_array().expect("logliks").iter().map(|x| x.as_f64().expect("f64")).collect()
        })
        .collect()
}

#[test]
fn out_of_memory_backs_off_to_smaller_batches() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = data_dir();
    let run = |samples: &Path, extra: &[&str], address_space: Option<u64>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_icl"));
        cmd.args(["eval", "--quiet", "--threads", "1", "--limit", "100", "--model"])
            .arg(models_dir().join("gpt-neo-tiny"))
            .arg("--task")
            .arg(format!("h={}", data.join("hellaswag.jsonl").display()))
            .arg("--log-samples")
            .arg(samples)
            .args(extra);
        if let Some(bytes) = address_space {
            // SAFETY: setrlimit is async-signal-safe; the closure runs in the child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        cmd.output().expect("run icl")
    };
    let (normal, limited) = (tmp.path().join("normal.jsonl"), tmp.path().join("limited.jsonl"));
    let out = run(&normal, &[], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // One packed row of every question needs a 100000^2 mask (10 GB): over a 3 GB address space.
    let huge = ["--batch-tokens", "200000", "--batch-rows", "100000", "--row-len", "100000"];
    let out = run(&limited, &huge, Some(3 << 30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("out of memory on a batch"), "{stderr}");
    let (a, b) = (logliks(&normal), logliks(&limited));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for (u, v) in x.iter().zip(y) {
            assert!((u - v).abs() <= 1e-4, "{x:?} vs {y:?}");
        }
    }
}

#[test]
fn the_same_command_gives_bit_identical_results() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for dir in [&a, &b] {
        std::fs::create_dir_all(dir).expect("mkdir");
        let out = command(dir, &["--threads", "2"]).output().expect("run icl");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let read = |dir: &Path| std::fs::read(dir.join("samples.jsonl")).expect("samples");
    assert!(read(&a) == read(&b), "two runs of one command differ");
    assert_eq!(metrics(&a), metrics(&b));
}

/// Batch size (`--batch-tokens`, `--batch-rows`) only changes how many packed rows go through the
/// model together; every row and every output-head call keeps its shape, so results are bitwise equal.
#[test]
fn results_are_bit_identical_across_batch_sizes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = data_dir();
    let mut runs = Vec::new();
    for (tokens, rows) in [("512", "256"), ("2048", "3"), ("100000", "256")] {
        let samples = tmp.path().join(format!("samples-{tokens}-{rows}.jsonl"));
        let out = Command::new(env!("CARGO_BIN_EXE_icl"))
            .args(["eval", "--quiet", "--threads", "2", "--limit", "120", "--row-len", "512"])
            .args(["--batch-tokens", tokens, "--batch-rows", rows, "--model"])
            .arg(models_dir().join("gpt-neo-tiny"))
            .arg("--task")
            .arg(format!("lambada={}", data.join("lambada_openai.jsonl").display()))
            .arg("--task")
            .arg(format!("piqa={}", data.join("piqa.jsonl").display()))
            .arg("--task")
            .arg(format!("hellaswag={}", data.join("hellaswag.jsonl").display()))
            .arg("--log-samples")
            .arg(&samples)
            .output()
            .expect("run icl");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        runs.push(std::fs::read(&samples).expect("samples"));
    }
    assert!(runs[0].len() > 1000);
    assert!(runs[0] == runs[1], "batch sizes 512 and 2048 tokens (3 rows) give different bits");
    assert!(runs[0] == runs[2], "batch sizes 512 and 100000 tokens give different bits");
}

#[test]
fn non_finite_scores_stop_the_run_naming_the_example() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let tiny = models_dir().join("gpt-neo-tiny");
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(tiny.join(file), tmp.path().join(file)).expect("copy");
    }
    let mut tensors = tch::Tensor::read_safetensors(tiny.join("model.safetensors")).expect("weights");
    for (name, t) in &mut tensors {
        if name == "transformer.ln_f.weight" {
            *t = t.full_like(f64::NAN);
        }
    }
    tch::Tensor::write_safetensors(&tensors, tmp.path().join("model.safetensors")).expect("write");
    let task = tmp.path().join("lm.jsonl");
    std::fs::write(&task, "{\"context\": \"The cat sat on the\", \"continuation\": \"mat\"}\n").expect("task");
    let out = Command::new(env!("CARGO_BIN_EXE_icl"))
        .args(["eval", "--quiet", "--model"])
        .arg(tmp.path())
        .arg("--task")
        .arg(format!("lm={}", task.display()))
        .output()
        .expect("run icl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("lm example 0") && stderr.contains("non-finite"), "{stderr}");
}

#[test]
fn pickle_checkpoints_are_refused_unless_allowed() {
    let venv_python = venv_python();
    let tmp = tempfile::tempdir().expect("tempdir");
    let tiny = models_dir().join("gpt-neo-tiny");
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(tiny.join(file), tmp.path().join(file)).expect("copy");
    }
    // A real torch.save pickle of the tiny model's weights.
    let status = Command::new(&venv_python)
        .args(["-c", "import sys, torch; from safetensors.torch import load_file; torch.save(load_file(sys.argv[1]), sys.argv[2])"])
        .arg(tiny.join("model.safetensors"))
        .arg(tmp.path().join("pytorch_model.bin"))
        .status()
        .expect("run python");
    assert!(status.success());
    let task = tmp.path().join("lm.jsonl");
    std::fs::write(&task, "{\"context\": \"The cat sat on the\", \"continuation\": \"mat\"}\n").expect("task");
    let run = |model: &Path, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_icl"))
            .args(["eval", "--quiet", "--model"])
            .arg(model)
            .arg("--task")
            .arg(format!("lm={}", task.display()))
            .args(["--log-samples", "/dev/stdout"])
            .args(extra)
            .output()
            .expect("run icl")
    };
    let refused = run(tmp.path(), &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("pytorch_model.bin") && stderr.contains("--allow-pickle"), "{stderr}");
    let allowed = run(tmp.path(), &["--allow-pickle"]);
    assert!(allowed.status.success(), "{}", String::from_utf8_lossy(&allowed.stderr));
    let reference = run(&tiny, &[]);
    let first_line =
        |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().to_owned();
    assert_eq!(first_line(&allowed), first_line(&reference), "pickle and safetensors weights give different results");
}

/// `icl eval` on the tiny model (its context is 256 tokens) over one task file, quietly.
fn eval_file(task: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_icl"))
        .args(["eval", "--quiet", "--threads", "1", "--model"])
        .arg(models_dir().join("gpt-neo-tiny"))
        .arg("--task")
        .arg(format!("odd={}", task.display()))
        .arg("--output")
        .arg(out.join("results.json"))
        .arg("--log-samples")
        .arg(out.join("samples.jsonl"))
        .args(extra)
        .output()
        .expect("run icl")
}

fn samples(out: &Path) -> Vec<Value> {
    read_jsonl(&out.join("samples.jsonl"))
}

#[test]
fn odd_rows_are_scored_truncated_or_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let long_words = vec!["word"; 400].join(" ");
    let rows = [
        serde_json::json!({"context": "The cat sat on the", "continuation": "mat"}),
        serde_json::json!({"context": "Ünïcödé and emoji 🐈‍⬛🎉 then", "continuation": "日本語 ✓"}),
        serde_json::json!({"context": "", "continuation": "Nothing came before this"}),
        serde_json::json!({"context": long_words, "continuation": "end"}),
        serde_json::json!({"context": "The cat sat on the", "continuation": "mat"}),
        serde_json::json!({"context": "Too long an answer:", "continuation": long_words}),
    ];
    let task = dir.path().join("odd.jsonl");
    std::fs::write(&task, rows.iter().map(|r| r.to_string() + "\n").collect::<String>()).expect("write task");

    let failed = eval_file(&task, dir.path(), &[]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(stderr.contains("odd example 5") && stderr.contains("more than the model's maximum length"), "{stderr}");

    let ok = eval_file(&task, dir.path(), &["--skip-bad-rows"]);
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert!(ok.status.success(), "{stderr}");
    assert!(stderr.contains("odd row 5 skipped"), "{stderr}");
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json")).expect("results"))
            .expect("json");
    let odd = &results["tasks"]["odd"];
    assert_eq!(odd["n"], 5, "{odd}");
    assert_eq!(odd["skipped"], 1, "{odd}");
    assert_eq!(odd["skipped_rows"][0]["index"], 5, "{odd}");
    assert_eq!(odd["truncated"], 1, "the 400-word context loses tokens on the left: {odd}");
    let lines = samples(dir.path());
    let index: Vec<u64> = lines.iter().map(|l| l["index"].as_u64().expect("index")).collect();
    assert_eq!(index, [0, 1, 2, 3, 4]);
    for line in &lines {
        let loglik = line["loglik"].as_f64().expect("loglik");
        assert!(loglik.is_finite() && loglik < 0.0, "{line}");
    }
    // A duplicate row is scored like the original.
    assert!((lines[0]["loglik"].as_f64().unwrap() - lines[4]["loglik"].as_f64().unwrap()).abs() < 1e-4);
}

#[test]
fn skipped_questions_leave_the_others_scored_as_without_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let long_words = vec!["word"; 400].join(" ");
    let question =
        |q: &str, choices: &[&str], gold: usize| serde_json::json!({"query": q, "choices": choices, "gold": gold});
    let good = [
        question("To open a jar,", &["twist the lid.", "bake it."], 0),
        question("Water boils at", &["a hundred degrees.", "noon."], 0),
        question("The sky is", &["green.", "blue."], 1),
    ];
    let bad = question("A question with a very long answer:", &["short.", long_words.as_str()], 0);
    let write = |name: &str, rows: &[&Value]| {
        let path = dir.path().join(name);
        std::fs::write(&path, rows.iter().map(|r| r.to_string() + "\n").collect::<String>()).expect("write");
        path
    };
    let with_bad = write("with_bad.jsonl", &[&good[0], &bad, &good[1], &good[2]]);
    let without = write("without.jsonl", &[&good[0], &good[1], &good[2]]);
    let out_bad = dir.path().join("bad");
    let out_clean = dir.path().join("clean");
    std::fs::create_dir_all(&out_bad).expect("mkdir");
    std::fs::create_dir_all(&out_clean).expect("mkdir");
    let run = eval_file(&with_bad, &out_bad, &["--skip-bad-rows"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let run = eval_file(&without, &out_clean, &[]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let (skipping, clean) = (samples(&out_bad), samples(&out_clean));
    let index: Vec<u64> = skipping.iter().map(|l| l["index"].as_u64().expect("index")).collect();
    assert_eq!(index, [0, 2, 3], "rows keep their file index");
    for (a, b) in skipping.iter().zip(&clean) {
        assert_eq!(a["gold"], b["gold"]);
        assert_eq!(a["pred"], b["pred"]);
        let (la, lb) = (a["logliks"].as_array().expect("logliks"), b["logliks"].as_array().expect("logliks"));
        assert_eq!(la.len(), lb.len());
        for (x, y) in la.iter().zip(lb) {
            assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4, "{a} vs {b}");
        }
    }
}

/// Generation tasks journal each request's generated tokens: a run cut short after three batches
/// (its journal cut there, with a torn last line) resumes without generating those again and ends
/// with the samples and metrics of an uninterrupted run.
#[test]
fn generation_runs_resume_from_their_journal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
    let run = |dir: &Path, extra: &[&str]| {
        std::fs::create_dir_all(dir).expect("mkdir");
        let out = Command::new(env!("CARGO_BIN_EXE_icl"))
            .args([
                "eval",
                "--quiet",
                "--threads",
                "1",
                "--batch-rows",
                "4",
                "--max-new-tokens",
                "8",
                "--num-fewshot",
                "1",
            ])
            .arg("--model")
            .arg(models_dir().join("gpt2-tiny"))
            .arg("--task")
            .arg(format!("triviaqa={}", data_dir().join("triviaqa_small.jsonl").display()))
            .arg("--output")
            .arg(dir.join("results.json"))
            .arg("--log-samples")
            .arg(dir.join("samples.jsonl"))
            .args(extra)
            .output()
            .expect("run icl");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    run(&whole, &[]);
    let records = journal_records(&whole);
    assert_eq!(records.len(), 32, "one record per generated answer");
    let journal = std::fs::read_to_string(whole.join("results.json.journal")).expect("journal");
    let header = journal.lines().next().expect("header");
    std::fs::create_dir_all(&cut).expect("mkdir");
    let kept = format!("{header}\n{}\n{}", records[..12].join("\n"), &records[12][..records[12].len() / 2]);
    std::fs::write(cut.join("results.json.journal"), kept).expect("write journal");

    let stderr = run(&cut, &["--resume"]);
    assert!(stderr.contains("12 finished request(s)"), "{stderr}");
    let after = journal_records(&cut);
    let keys: HashSet<String> = after
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l.split_once(' ').expect("crc").1).expect("json");
            format!("{}/{}", v["task"], v["generation"])
        })
        .collect();
    assert_eq!((after.len(), keys.len()), (32, 32), "every answer generated once");
    let samples = |dir: &Path| std::fs::read_to_string(dir.join("samples.jsonl")).expect("samples");
    assert_eq!(samples(&whole), samples(&cut));
    assert!(samples(&whole).contains("\"output\""));
    assert_eq!(metrics(&whole), metrics(&cut));
}
