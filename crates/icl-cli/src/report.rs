//! The results table, `results.json` and `samples.jsonl`.

use anyhow::{Context, Result};
use icl_data::{Gauntlet, GauntletScores, SkippedTask, TaskKind, TaskOutcome};
use icl_eval::PreparedTask;
pub use icl_eval::TaskReport;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// The finished tasks' results as the gauntlet reads them: llm-foundry's accuracy with its standard
/// error, rows, chance. For multiple choice and schema tasks that is `acc_mean_nll`: llm-foundry's
/// `InContextLearningMultipleChoiceAccuracy` picks the choice of lowest per-token cross entropy
/// (ties to the first); for language modelling and generation it is `acc`.
fn outcomes(reports: &[TaskReport]) -> BTreeMap<String, TaskOutcome> {
    reports
        .iter()
        .filter_map(|r| {
            let (acc, acc_stderr) = match r.acc_mean_nll {
                Some(acc) => (acc, r.acc_mean_nll_stderr),
                None => (r.acc?, r.acc_stderr),
            };
            Some((r.name.clone(), TaskOutcome { acc, acc_stderr, n: r.n, chance: r.random_baseline }))
        })
        .collect()
}

/// Gauntlet scores of the finished tasks.
pub fn gauntlet_scores(gauntlet: &Gauntlet, reports: &[TaskReport]) -> GauntletScores {
    gauntlet.scores(&outcomes(reports))
}

/// `results.json`'s `tasks`: every task by name, except that the categories of a `has_categories`
/// task sit under it (`tasks["LABEL/N-shot"].categories.CAT`), the task itself carrying the mean of
/// their accuracies (llm-foundry's gauntlet value), every row, and summed time and tokens.
fn task_entries(reports: &[TaskReport], gauntlet: &Gauntlet) -> Result<BTreeMap<String, Value>> {
    let mut tasks: BTreeMap<String, Value> = BTreeMap::new();
    let part_of: BTreeMap<&str, (&str, &str)> = gauntlet
        .partitions
        .iter()
        .flat_map(|(parent, parts)| {
            parts.iter().map(move |(cat, part)| (part.as_str(), (parent.as_str(), cat.as_str())))
        })
        .collect();
    for r in reports.iter().filter(|r| !part_of.contains_key(r.name.as_str())) {
        tasks.insert(r.name.clone(), serde_json::to_value(r)?);
    }
    let benchmarks = gauntlet.benchmark_outcomes(&outcomes(reports));
    for (parent, parts) in &gauntlet.partitions {
        let done: Vec<&TaskReport> =
            parts.iter().filter_map(|(_, part)| reports.iter().find(|r| &r.name == part)).collect();
        let Some(first) = done.first() else { continue };
        let mut categories = serde_json::Map::new();
        for r in &done {
            if let Some((_, cat)) = part_of.get(r.name.as_str()) {
                categories.insert((*cat).to_owned(), serde_json::to_value(r)?);
            }
        }
        let mut entry = json!({
            "type": first.kind, "num_fewshot": first.num_fewshot, "categories": categories,
            "categories_done": done.len(), "categories_total": parts.len(),
            "n": done.iter().map(|r| r.n).sum::<usize>(),
            "seconds": done.iter().map(|r| r.seconds).sum::<f64>(),
            "tokens": done.iter().map(|r| r.tokens).sum::<usize>(),
        });
        // Only once every category is in.
        if let Some(b) = benchmarks.get(parent) {
            entry["acc"] = json!(b.acc);
            entry["acc_stderr"] = json!(b.acc_stderr);
            entry["random_baseline"] = json!(b.chance);
        }
        tasks.insert(parent.clone(), entry);
    }
    Ok(tasks)
}

/// Writes `{"model", "dtype", "tasks": {NAME: {...}}, "gauntlet": {...}, "skipped": [...]}`
/// atomically: a temporary file renamed over the target, so a crash never leaves half a file.
pub fn write_results(
    path: &Path,
    model: &Path,
    dtype: &str,
    reports: &[TaskReport],
    gauntlet: &Gauntlet,
    skipped: &[SkippedTask],
) -> Result<()> {
    let doc = json!({
        "model": model, "dtype": dtype, "tasks": task_entries(reports, gauntlet)?,
        "gauntlet": gauntlet_scores(gauntlet, reports), "skipped": skipped,
    });
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The exact prompt strings of every example, one JSON line each: `task`, `index`, `shots` (the
/// rows shown as shots, in order), `context` (or `contexts` for schema tasks, one per option) and
/// `targets`, with `gold` for choice tasks; for
/// generation tasks `targets` are the accepted answers, with `max_new_tokens` and `stop` (the stop
/// sequences).
pub fn write_prompts(path: &Path, tasks: &[PreparedTask]) -> Result<()> {
    let mut out = SamplesWriter::create(path)?;
    for prepared in tasks {
        let task = &prepared.task;
        let lines: Vec<serde_json::Value> = prepared
            .prompts
            .iter()
            .map(|p| {
                let mut line =
                    serde_json::json!({"task": task.name, "index": p.example, "shots": p.shots, "targets": p.targets});
                if let Some(plan) = prepared.generation() {
                    line["max_new_tokens"] = serde_json::json!(plan.max_new_tokens);
                    line["stop"] = serde_json::json!(plan.stop_sequences);
                }
                if task.kind() == TaskKind::Schema {
                    line["contexts"] = serde_json::json!(p.contexts);
                } else {
                    line["context"] = serde_json::json!(p.contexts[0]);
                }
                if let Some((_, gold)) = task.choice(p.example) {
                    line["gold"] = serde_json::json!(gold);
                }
                line
            })
            .collect();
        out.write(&lines)?;
    }
    Ok(())
}

/// Gauntlet scores per benchmark, category and named average, with the dropped categories and why.
pub fn gauntlet_table(scores: &GauntletScores, skipped: &[SkippedTask]) -> String {
    let rule = match (scores.subtract_random_baseline, scores.rescale_accuracy) {
        (true, true) => "(acc - baseline) / (1 - baseline)",
        (true, false) => "acc - baseline",
        _ => "acc",
    };
    let weighting = serde_json::to_value(scores.weighting).ok().and_then(|v| v.as_str().map(str::to_owned));
    let mut out = format!("\ngauntlet: {rule}, {} weights\n", weighting.unwrap_or_default());
    let width = scores
        .tasks
        .keys()
        .chain(scores.categories.keys())
        .chain(scores.averages.keys())
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max(7);
    let value = |v: f64, se: Option<f64>| cell(Some(v), se, 4);
    for (name, t) in &scores.tasks {
        out += &format!(
            "  {name:<width$}  {:>16}  (acc {:.4}, baseline {:.4}, n {}, weight {:.3})\n",
            value(t.score, t.score_stderr),
            t.acc,
            t.random_baseline,
            t.n,
            t.weight
        );
    }
    for (name, v) in &scores.categories {
        match v {
            Some(v) => {
                out += &format!("  {name:<width$}  {:>16}  (category)\n", value(*v, scores.categories_stderr[name]))
            }
            None => {
                let missing = scores.dropped.get(name).map(|m| m.join(", ")).unwrap_or_default();
                out += &format!("  {name:<width$}  {:>16}  (category dropped: no results for {missing})\n", "-");
            }
        }
    }
    for (name, v) in &scores.averages {
        out += &format!("  {name:<width$}  {:>16}  (average)\n", value(*v, scores.averages_stderr[name]));
    }
    if !skipped.is_empty() {
        out += "skipped (no data file):\n";
        for s in skipped {
            out += &format!("  {}  {}\n", s.name, s.path.display());
        }
    }
    out
}

/// `samples.jsonl`, appended task by task.
#[derive(Debug)]
pub struct SamplesWriter {
    file: std::io::BufWriter<std::fs::File>,
    path: std::path::PathBuf,
}

impl SamplesWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { file: std::io::BufWriter::new(file), path: path.to_owned() })
    }

    pub fn write(&mut self, lines: &[serde_json::Value]) -> Result<()> {
        let io = |e| anyhow::Error::new(e).context(format!("writing {}", self.path.display()));
        for line in lines {
            serde_json::to_writer(&mut self.file, line)?;
            self.file.write_all(b"\n").map_err(io)?;
        }
        self.file.flush().map_err(io)
    }
}

/// A metric with its standard error where one was computed: `0.3400 ± 0.0336`.
fn cell(v: Option<f64>, stderr: Option<f64>, digits: usize) -> String {
    match (v, stderr) {
        (None, _) => "-".to_owned(),
        (Some(x), None) => format!("{x:.digits$}"),
        (Some(x), Some(se)) => format!("{x:.digits$} ± {se:.digits$}"),
    }
}

/// A plain-text table of every task.
pub fn table(reports: &[TaskReport]) -> String {
    let header = [
        "task",
        "type",
        "shots",
        "n",
        "acc",
        "acc_norm",
        "exact_match",
        "perplexity",
        "word_perplexity",
        "bits_per_byte",
        "seconds",
        "tokens/s",
    ];
    let rows: Vec<[String; 12]> = reports
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.kind.to_owned(),
                r.num_fewshot.to_string(),
                r.n.to_string(),
                cell(r.acc, r.acc_stderr, 4),
                cell(r.acc_norm, r.acc_norm_stderr, 4),
                cell(r.exact_match, r.exact_match_stderr, 4),
                cell(r.perplexity, r.perplexity_stderr, 2),
                cell(r.word_perplexity, r.word_perplexity_stderr, 2),
                cell(r.bits_per_byte, r.bits_per_byte_stderr, 4),
                format!("{:.1}", r.seconds),
                format!("{:.0}", r.tokens_per_second),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).chain([header[c].len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(c, s)| if c < 2 { format!("{s:<w$}", w = widths[c]) } else { format!("{s:>w$}", w = widths[c]) })
            .collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(&header.map(str::to_owned));
    out += &line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>());
    for r in &rows {
        out += &line(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_applicable_metrics() {
        let mut lm = TaskReport::new("lambada", "language_modeling", 10, 2.0, 100, 0);
        lm.acc = Some(0.5);
        lm.perplexity = Some(12.345);
        let t = table(&[lm]);
        assert!(t.contains("lambada"));
        assert!(t.contains("0.5000") && t.contains("12.35") && t.contains("50"), "{t}");
        assert!(t.lines().nth(2).unwrap().contains(" - "), "acc_norm absent: {t}");
    }

    #[test]
    fn table_shows_standard_errors_next_to_their_metrics() {
        let mut mc = TaskReport::new("piqa", "multiple_choice", 200, 2.0, 100, 0);
        (mc.acc, mc.acc_stderr) = (Some(0.34), Some(0.033_6));
        mc.acc_norm = Some(0.5);
        let t = table(&[mc]);
        assert!(t.contains("0.3400 ± 0.0336"), "{t}");
        assert!(t.contains("0.5000") && !t.contains("0.5000 ±"), "no stderr, no ±: {t}");
    }

    #[test]
    fn table_shows_document_perplexity() {
        let mut doc = TaskReport::new("jargon", "perplexity", 8, 2.0, 100, 0);
        (doc.word_perplexity, doc.word_perplexity_stderr) = (Some(1234.567), Some(89.01));
        (doc.bits_per_byte, doc.bits_per_byte_stderr) = (Some(2.5), Some(0.125));
        let t = table(&[doc]);
        assert!(t.contains("1234.57 ± 89.01") && t.contains("2.5000 ± 0.1250"), "{t}");
    }

    #[test]
    fn results_are_written_atomically_with_the_documented_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.json");
        let mut mc = TaskReport::new("piqa", "multiple_choice", 3, 1.0, 30, 1);
        mc.acc = Some(1.0 / 3.0);
        mc.acc_norm = Some(2.0 / 3.0);
        mc.random_baseline = 0.5;
        let gauntlet = Gauntlet::one_category(["piqa".to_owned()]);
        write_results(&path, Path::new("m"), "f32", &[mc], &gauntlet, &[]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let piqa = &v["tasks"]["piqa"];
        assert_eq!(piqa["n"], 3);
        assert!(piqa["acc_norm"].as_f64().unwrap() > 0.66);
        assert!(piqa.get("perplexity").is_none());
        assert!(!dir.path().join("results.json.tmp").exists());
        // (1/3 - 1/2) / (1 - 1/2)
        let score = v["gauntlet"]["tasks"]["piqa"]["score"].as_f64().unwrap();
        assert!((score + 1.0 / 3.0).abs() < 1e-12, "{v}");
        assert!((v["gauntlet"]["averages"]["default_average"].as_f64().unwrap() - score).abs() < 1e-12);
        assert_eq!(v["skipped"], serde_json::json!([]));
    }
}
