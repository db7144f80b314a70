//! `icl compare` end to end: two tiny models (`gpt-neo-tiny`, `gpt2-tiny`) evaluated by `icl eval
//! --log-samples` on 20 rows of PIQA (multiple choice) and LAMBADA (language modelling), then
//! compared; the JSON is checked against counts recomputed from the sample files, and bad inputs
//! (a missing row, different tasks, a changed gold answer, a malformed line) fail with the file,
//! line and field named.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const LIMIT: usize = 20;

/// Runs `icl eval` on both models once (shared by the tests of this file): the two result folders.
fn runs() -> &'static (PathBuf, PathBuf) {
    static RUNS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    RUNS.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("compare");
        let run = |model: &str| {
            let out = root.join(model);
            std::fs::create_dir_all(&out).expect("mkdir");
            let data = data_dir();
            let run = Command::new(env!("CARGO_BIN_EXE_icl"))
                .args(["eval", "--quiet", "--threads", "1", "--limit", &LIMIT.to_string(), "--model"])
                .arg(models_dir().join(model))
                .arg("--task")
                .arg(format!("piqa={}", data.join("piqa.jsonl").display()))
                .arg("--task")
                .arg(format!("lambada={}", data.join("lambada_openai.jsonl").display()))
                .arg("--output")
                .arg(out.join("results.json"))
                .arg("--log-samples")
                .arg(out.join("samples.jsonl"))
                .output()
                .expect("run icl eval");
            assert!(run.status.success(), "icl eval {model}: {}", String::from_utf8_lossy(&run.stderr));
            out
        };
        (run("gpt-neo-tiny"), run("gpt2-tiny"))
    })
}

/// `icl compare ARGS`: (exit code, stdout, stderr).
fn compare(args: &[&Path], flags: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_icl")).arg("compare").args(args).args(flags).output().expect("run");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// Per task, per row: (acc, loglik) with loglik of the continuation or of the gold choice.
fn scores(samples: &Path) -> BTreeMap<String, BTreeMap<u64, (bool, f64)>> {
    let mut out: BTreeMap<String, BTreeMap<u64, (bool, f64)>> = BTreeMap::new();
    for line in read_jsonl(samples) {
        let number = |v: &Value| v.as_f64().expect("number");
        let (acc, loglik) = match line.get("is_greedy") {
            Some(g) => (g.as_bool().expect("is_greedy"), number(&line["loglik"])),
            None => {
                let gold = line["gold"].as_u64().expect("gold");
                (line["pred"].as_u64() == Some(gold), number(&line["logliks"][gold as usize]))
            }
        };
        let task = line["task"].as_str().expect("task").to_owned();
        out.entry(task).or_default().insert(line["index"].as_u64().expect("index"), (acc, loglik));
    }
    out
}

fn write_lines(path: &Path, lines: &[Value]) {
    let text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
    std::fs::write(path, text).expect("write");
}

#[test]
fn compares_two_models_example_by_example() {
    let (a, b) = runs();
    let tmp = tempfile::tempdir().unwrap();
    let cmp = tmp.path().join("cmp.json");
    let (sa, sb) = (a.join("samples.jsonl"), b.join("samples.jsonl"));
    let (code, stdout, stderr) = compare(&[&sa, &sb], &["--holm", "--output", cmp.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    eprintln!("{stdout}");
    assert!(stdout.contains("piqa") && stdout.contains("lambada") && stdout.contains("p_holm"), "{stdout}");
    assert!(!tmp.path().join("cmp.json.tmp").exists());
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&cmp).unwrap()).unwrap();
    let (ra, rb) = (scores(&sa), scores(&sb));
    for task in ["piqa", "lambada"] {
        let t = &v["tasks"][task];
        let (xa, xb) = (&ra[task], &rb[task]);
        assert_eq!(t["n"], LIMIT, "{t}");
        let a_only = xa.iter().filter(|(i, s)| s.0 && !xb[*i].0).count();
        let b_only = xa.iter().filter(|(i, s)| !s.0 && xb[*i].0).count();
        assert_eq!((t["a_only"].as_u64(), t["b_only"].as_u64()), (Some(a_only as u64), Some(b_only as u64)), "{t}");
        let n = LIMIT as f64;
        let diff = (a_only as f64 - b_only as f64) / n;
        assert!((t["diff"].as_f64().unwrap() - diff).abs() < 1e-12, "{t}");
        // Paired stderr of d in {-1, 0, 1}: sqrt((Σd² - n d̄²) / (n - 1)) / sqrt(n).
        let sd = (((a_only + b_only) as f64 - n * diff * diff) / (n - 1.0)).sqrt();
        assert!((t["diff_stderr"].as_f64().unwrap() - sd / n.sqrt()).abs() < 1e-12, "{t}");
        let acc_a = xa.values().filter(|s| s.0).count() as f64 / n;
        assert!((t["a"].as_f64().unwrap() - acc_a).abs() < 1e-12);
        let p = t["p_value"].as_f64().unwrap();
        let p_holm = t["p_holm"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p) && p <= p_holm && p_holm <= 1.0, "{t}");
        assert_eq!(t["significant"], p_holm < 0.05);
        let ll_diff = xa.iter().map(|(i, s)| s.1 - xb[i].1).sum::<f64>() / n;
        assert!((t["loglik"]["diff"].as_f64().unwrap() - ll_diff).abs() < 1e-9, "{t}");
        assert!(t["loglik"]["diff_stderr"].as_f64().unwrap() > 0.0);
        assert_eq!(t["rows_only_in_a"], 0);
    }
    // lm-eval's perplexity of each run, with a paired-bootstrap stderr of the difference.
    let ppl = &v["tasks"]["lambada"]["perplexity"];
    let mean_ll = ra["lambada"].values().map(|s| s.1).sum::<f64>() / LIMIT as f64;
    assert!((ppl["a"].as_f64().unwrap() / (-mean_ll).exp() - 1.0).abs() < 1e-9, "{ppl}");
    for key in ["a_stderr", "b_stderr", "diff_stderr"] {
        assert!(ppl[key].as_f64().unwrap() > 0.0, "{key}: {ppl}");
    }
    assert!(v["tasks"]["piqa"].get("perplexity").is_none());
    assert_eq!(v["tasks"]["piqa"]["type"], "choice");
    assert_eq!(v["tasks"]["lambada"]["type"], "language_modeling");
    assert!(v["tasks"]["piqa"]["acc_norm"]["p_value"].as_f64().is_some());

    // Result folders work as well as the files, and a run against itself differs by nothing.
    let (code, stdout, stderr) = compare(&[a, b], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("p_holm"));
    let same = tmp.path().join("same.json");
    let (code, _, stderr) = compare(&[a, a], &["--output", same.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&same).unwrap()).unwrap();
    assert_eq!((v["tasks"]["piqa"]["diff"].as_f64(), v["tasks"]["piqa"]["p_value"].as_f64()), (Some(0.0), Some(1.0)));
    assert_eq!(v["tasks"]["lambada"]["diff_stderr"].as_f64(), Some(0.0));
}

#[test]
fn mismatched_files_are_errors_naming_file_line_and_field() {
    let (a, b) = runs();
    let tmp = tempfile::tempdir().unwrap();
    let sa = a.join("samples.jsonl");
    let lines = read_jsonl(&b.join("samples.jsonl"));
    let is = |l: &Value, task: &str| l["task"] == task;

    // A LAMBADA row missing from B: an error naming A's line of that row, unless --intersect.
    let missing = tmp.path().join("missing.jsonl");
    let dropped = lines.iter().position(|l| is(l, "lambada") && l["index"] == 7).unwrap();
    let kept: Vec<Value> = lines.iter().enumerate().filter(|(i, _)| *i != dropped).map(|(_, l)| l.clone()).collect();
    write_lines(&missing, &kept);
    let a_line = read_jsonl(&sa).iter().position(|l| is(l, "lambada") && l["index"] == 7).unwrap() + 1;
    let (code, _, stderr) = compare(&[&sa, &missing], &[]);
    assert_eq!(code, 1, "{stderr}");
    let expected =
        format!("{}:{a_line}: field `index`: row 7 of task `lambada` is not in {}", sa.display(), missing.display());
    assert!(stderr.contains(&expected), "{stderr}");
    let cmp = tmp.path().join("cmp.json");
    let (code, _, stderr) = compare(&[&sa, &missing], &["--intersect", "--output", cmp.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("task `lambada` compared on the 19 rows in both files"), "{stderr}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&cmp).unwrap()).unwrap();
    assert_eq!(
        (v["tasks"]["lambada"]["n"].as_u64(), v["tasks"]["lambada"]["rows_only_in_a"].as_u64()),
        (Some(19), Some(1))
    );
    assert_eq!(v["tasks"]["piqa"]["n"], LIMIT);

    // Different task sets: PIQA alone against LAMBADA alone.
    let piqa = tmp.path().join("piqa.jsonl");
    let lambada = tmp.path().join("lambada.jsonl");
    write_lines(&piqa, &lines.iter().filter(|l| is(l, "piqa")).cloned().collect::<Vec<_>>());
    write_lines(&lambada, &lines.iter().filter(|l| is(l, "lambada")).cloned().collect::<Vec<_>>());
    let (code, _, stderr) = compare(&[&piqa, &lambada], &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains(&format!("{}:1: field `task`: task `piqa` is not in", piqa.display())), "{stderr}");
    let (code, _, stderr) = compare(&[&piqa, &lambada], &["--intersect"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no task in common"), "{stderr}");
    // A superset is an error too, and fine with --intersect (said so).
    let (code, _, stderr) = compare(&[&sa, &piqa], &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("task `lambada` is not in"), "{stderr}");
    let (code, _, stderr) = compare(&[&sa, &piqa], &["--intersect"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("left out task(s) only in") && stderr.contains("lambada"), "{stderr}");

    // The same task name over different data: a gold answer changed, or LM rows named `piqa`.
    let mut regold = lines.clone();
    let row = regold.iter().position(|l| is(l, "piqa") && l["index"] == 3).unwrap();
    let gold = regold[row]["gold"].as_u64().unwrap();
    regold[row]["gold"] = Value::from(1 - gold);
    let regold_path = tmp.path().join("regold.jsonl");
    write_lines(&regold_path, &regold);
    let (code, _, stderr) = compare(&[&sa, &regold_path], &["--intersect"]);
    assert_eq!(code, 1);
    let expected = format!("field `gold` is {gold} at {}:", sa.display());
    let theirs = format!("but {} at {}:{}", 1 - gold, regold_path.display(), row + 1);
    assert!(stderr.contains(&theirs), "{stderr}");
    assert!(stderr.contains("different tasks named `piqa`") && stderr.contains(&expected), "{stderr}");
    let renamed: Vec<Value> = lines
        .iter()
        .map(|l| {
            let mut l = l.clone();
            l["task"] = Value::from(if is(&l, "lambada") { "piqa" } else { "lambada" });
            l
        })
        .collect();
    let renamed_path = tmp.path().join("renamed.jsonl");
    write_lines(&renamed_path, &renamed);
    let (code, _, stderr) = compare(&[&sa, &renamed_path], &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("different tasks named `lambada`") && stderr.contains("choice"), "{stderr}");

    // Malformed lines, a duplicated row, a missing file, an empty file: named, never a panic.
    let bad = tmp.path().join("bad.jsonl");
    let mut text: String = lines[..3].iter().map(|l| l.to_string() + "\n").collect();
    text += "{\"task\": \"piqa\",\n";
    std::fs::write(&bad, &text).unwrap();
    let duplicate = tmp.path().join("duplicate.jsonl");
    write_lines(&duplicate, &[lines[0].clone(), lines[1].clone(), lines[0].clone()]);
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let cases: [(&Path, String); 4] = [
        (&bad, format!("{}:4: malformed JSON", bad.display())),
        (&duplicate, format!("{}:3: field `index`: row {} of task", duplicate.display(), lines[0]["index"])),
        (&empty, format!("{}: no samples", empty.display())),
        (tmp.path(), "a folder without samples.jsonl".to_owned()),
    ];
    for (path, expected) in cases {
        let (code, _, stderr) = compare(&[&sa, path], &[]);
        assert_eq!(code, 1, "{}", path.display());
        assert!(stderr.contains(&expected) && !stderr.contains("panicked"), "{stderr}");
    }
    let (code, _, stderr) = compare(&[&sa, Path::new("/nonexistent/samples.jsonl")], &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/samples.jsonl"), "{stderr}");
    let (code, _, stderr) = compare(&[&sa, &sa], &["--alpha", "2"]);
    assert_eq!(code, 1, "{stderr}");
}
