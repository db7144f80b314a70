//! Suite files: llm-foundry's `icl_tasks` YAML (`tasks_*.yaml`) and eval-gauntlet categories.
//!
//! ```yaml
//! icl_tasks:
//! - label: piqa
//!   dataset_uri: piqa.jsonl        # relative to the suite file, or to --data-dir when given
//!   num_fewshot: [0, 5]            # one task per shot count: piqa/0-shot, piqa/5-shot
//!   icl_task_type: multiple_choice
//!   continuation_delimiter: "\nAnswer: "   # optional: prompt_string, example_delimiter,
//!   fields: {query: goal}                  # fewshot_random_seed, fields (canonical: file name),
//!                                          # fewshot_sampler (llm-foundry, the default; lm-eval; icl)
//! - label: triviaqa                # generation_task_with_answers (or question_answering) also takes
//!   dataset_uri: triviaqa.jsonl    # early_stopping_criteria (default: [example_delimiter]) and
//!   num_fewshot: [0, 5]            # generation_kwargs: {max_new_tokens: N} (default: the token
//!   icl_task_type: generation_task_with_answers   # count of the longest answer or alias)
//! eval_gauntlet:                   # optional; without it every task counts in one category `all`
//!   categories:
//!   - name: commonsense_reasoning
//!     benchmarks:
//!     - {name: piqa, num_fewshot: 0}          # random_baseline: optional override
//! ```
//!
//! Gauntlet scores (llm-foundry's `subtract_random_baseline` and `rescale_accuracy`, equal weights):
//! each task's `(acc - baseline) / (1 - baseline)`, where the baseline is the benchmark's
//! `random_baseline` or else chance (the mean of `1 / options` for multiple choice and schema, 0 for
//! language modelling); the mean per category; the mean of the categories.

use crate::{Error, FewshotSampler, FieldMap, PromptOptions, ReadOptions, Result, TaskKind};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// One task to evaluate: where its file is, how to read it, how to prompt it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    /// Key of the task's results (`label/N-shot` in suites).
    pub name: String,
    pub path: PathBuf,
    pub read: ReadOptions,
    pub prompt: PromptOptions,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GauntletCategory {
    pub name: String,
    /// Task names with their `random_baseline` override.
    pub benchmarks: Vec<(String, Option<f64>)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gauntlet {
    pub categories: Vec<GauntletCategory>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Suite {
    pub path: PathBuf,
    pub tasks: Vec<TaskSpec>,
    pub gauntlet: Gauntlet,
}

/// Aggregate scores: per task (rescaled accuracy and the baseline used), per category, overall.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GauntletScores {
    pub tasks: BTreeMap<String, TaskScore>,
    pub categories: BTreeMap<String, f64>,
    pub average: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TaskScore {
    pub acc: f64,
    pub random_baseline: f64,
    pub score: f64,
}

#[derive(Deserialize)]
struct SuiteFile {
    icl_tasks: Vec<TaskEntry>,
    #[serde(default)]
    eval_gauntlet: Option<GauntletFile>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Shots {
    One(usize),
    Many(Vec<usize>),
}

#[derive(Deserialize)]
struct TaskEntry {
    label: String,
    dataset_uri: String,
    num_fewshot: Shots,
    icl_task_type: String,
    prompt_string: Option<String>,
    example_delimiter: Option<String>,
    continuation_delimiter: Option<String>,
    fewshot_random_seed: Option<u64>,
    /// icl's key: `llm-foundry` (default), `lm-eval` or `icl`.
    fewshot_sampler: Option<String>,
    #[serde(default)]
    fields: FieldMap,
    #[serde(default)]
    has_categories: bool,
    hf_loading_vars: Option<serde_norway::Value>,
    early_stopping_criteria: Option<Vec<String>>,
    generation_kwargs: Option<GenerationKwargs>,
    do_normalization: Option<bool>,
    cot_delimiter: Option<String>,
}

/// The `generate` arguments a suite may set; others are refused rather than ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerationKwargs {
    max_new_tokens: Option<usize>,
}

#[derive(Deserialize)]
struct GauntletFile {
    categories: Vec<CategoryFile>,
}

#[derive(Deserialize)]
struct CategoryFile {
    name: String,
    benchmarks: Vec<BenchmarkFile>,
}

#[derive(Deserialize)]
struct BenchmarkFile {
    name: String,
    num_fewshot: usize,
    random_baseline: Option<f64>,
}

/// The results key of a suite task.
pub fn task_name(label: &str, shots: usize) -> String {
    format!("{label}/{shots}-shot")
}

impl Suite {
    /// Reads a suite file; relative `dataset_uri`s resolve against `data_dir` when given, else the
    /// suite file's folder.
    pub fn read(path: &Path, data_dir: Option<&Path>) -> Result<Suite> {
        let err = |message: String| Error::Suite { path: path.to_owned(), message };
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
        let file: SuiteFile = serde_norway::from_str(&text).map_err(|e| err(e.to_string()))?;
        let base = data_dir.map(Path::to_owned).unwrap_or_else(|| path.parent().unwrap_or(Path::new(".")).to_owned());
        let mut tasks = Vec::new();
        let mut names = HashSet::new();
        for (i, t) in file.icl_tasks.iter().enumerate() {
            let at = |message: String| err(format!("icl_tasks[{i}] (`{}`): {message}", t.label));
            let kind = TaskKind::from_name(&t.icl_task_type).map_err(|m| at(format!("icl_task_type: {m}")))?;
            if t.has_categories {
                return Err(at("has_categories: per-category tasks are not supported".into()));
            }
            if t.hf_loading_vars.is_some() || t.dataset_uri.contains("://") {
                return Err(at(format!("dataset_uri `{}`: only local files are supported", t.dataset_uri)));
            }
            let generation = kind == TaskKind::GenerationWithAnswers;
            for (key, set) in [
                ("early_stopping_criteria", t.early_stopping_criteria.is_some()),
                ("generation_kwargs", t.generation_kwargs.is_some()),
            ] {
                if set && !generation {
                    return Err(at(format!("{key}: only generation_task_with_answers tasks generate")));
                }
            }
            if t.do_normalization == Some(false) {
                return Err(at("do_normalization: only normalized exact match is supported".into()));
            }
            if t.cot_delimiter.as_deref().is_some_and(|d| !d.is_empty()) {
                return Err(at("cot_delimiter: chain-of-thought answers are not supported".into()));
            }
            let max_new_tokens = t.generation_kwargs.as_ref().and_then(|g| g.max_new_tokens);
            if max_new_tokens == Some(0) {
                return Err(at("generation_kwargs.max_new_tokens: must be at least 1".into()));
            }
            let uri = Path::new(&t.dataset_uri);
            let file_path = if uri.is_absolute() { uri.to_owned() } else { base.join(uri) };
            let shots = match &t.num_fewshot {
                Shots::One(n) => vec![*n],
                Shots::Many(v) if v.is_empty() => return Err(at("num_fewshot: the list is empty".into())),
                Shots::Many(v) => v.clone(),
            };
            let defaults = PromptOptions::default();
            // A suite is llm-foundry's format, so its shots are llm-foundry's unless it says otherwise.
            let fewshot_sampler = match &t.fewshot_sampler {
                Some(name) => FewshotSampler::from_name(name).map_err(|m| at(format!("fewshot_sampler: {m}")))?,
                None => FewshotSampler::LlmFoundry,
            };
            for n in shots {
                let name = task_name(&t.label, n);
                if !names.insert(name.clone()) {
                    return Err(at(format!("task `{name}` is defined twice")));
                }
                tasks.push(TaskSpec {
                    name,
                    path: file_path.clone(),
                    read: ReadOptions { kind: Some(kind), fields: t.fields.clone() },
                    prompt: PromptOptions {
                        num_fewshot: n,
                        fewshot_seed: t.fewshot_random_seed.unwrap_or(defaults.fewshot_seed),
                        prompt_string: t.prompt_string.clone().unwrap_or(defaults.prompt_string.clone()),
                        fewshot_sampler,
                        example_delimiter: t.example_delimiter.clone(),
                        continuation_delimiter: t
                            .continuation_delimiter
                            .clone()
                            .unwrap_or(defaults.continuation_delimiter.clone()),
                        max_new_tokens,
                        stop_sequences: t.early_stopping_criteria.clone(),
                        ..Default::default()
                    },
                });
            }
        }
        if tasks.is_empty() {
            return Err(err("icl_tasks is empty".into()));
        }
        let gauntlet = match file.eval_gauntlet {
            None => Gauntlet {
                categories: vec![GauntletCategory {
                    name: "all".into(),
                    benchmarks: tasks.iter().map(|t| (t.name.clone(), None)).collect(),
                }],
            },
            Some(g) => {
                let mut categories = Vec::new();
                for c in g.categories {
                    let mut benchmarks = Vec::new();
                    for b in c.benchmarks {
                        let name = task_name(&b.name, b.num_fewshot);
                        if !names.contains(&name) {
                            return Err(err(format!(
                                "eval_gauntlet category `{}`: benchmark `{}` with {} shots is not among icl_tasks",
                                c.name, b.name, b.num_fewshot
                            )));
                        }
                        if let Some(r) = b.random_baseline.filter(|r| !(0.0..1.0).contains(r)) {
                            return Err(err(format!(
                                "eval_gauntlet category `{}`: benchmark `{}`: random_baseline {r} is not in [0, 1)",
                                c.name, b.name
                            )));
                        }
                        benchmarks.push((name, b.random_baseline));
                    }
                    if benchmarks.is_empty() {
                        return Err(err(format!("eval_gauntlet category `{}` has no benchmarks", c.name)));
                    }
                    categories.push(GauntletCategory { name: c.name, benchmarks });
                }
                Gauntlet { categories }
            }
        };
        Ok(Suite { path: path.to_owned(), tasks, gauntlet })
    }
}

impl Gauntlet {
    /// Scores from each task's `(acc, chance baseline)`; tasks without results are left out (a
    /// category with none is left out too).
    pub fn scores(&self, results: &BTreeMap<String, (f64, f64)>) -> GauntletScores {
        let mut tasks = BTreeMap::new();
        let mut categories = BTreeMap::new();
        for c in &self.categories {
            let mut sum = 0.0;
            let mut n = 0usize;
            for (name, baseline) in &c.benchmarks {
                let Some(&(acc, chance)) = results.get(name) else { continue };
                let random_baseline = baseline.unwrap_or(chance);
                let score = (acc - random_baseline) / (1.0 - random_baseline);
                tasks.insert(name.clone(), TaskScore { acc, random_baseline, score });
                sum += score;
                n += 1;
            }
            if n > 0 {
                categories.insert(c.name.clone(), sum / n as f64);
            }
        }
        let average =
            if categories.is_empty() { f64::NAN } else { categories.values().sum::<f64>() / categories.len() as f64 };
        GauntletScores { tasks, categories, average }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suite(text: &str, data_dir: Option<&Path>) -> Result<Suite> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("suite.yaml");
        std::fs::write(&path, text).unwrap();
        Suite::read(&path, data_dir)
    }

    const TASKS: &str = r#"
icl_tasks:
- label: lambada_openai
  dataset_uri: eval/lambada.jsonl
  num_fewshot: [0, 5]
  icl_task_type: language_modeling
- label: piqa
  dataset_uri: /abs/piqa.parquet
  num_fewshot: 0
  icl_task_type: multiple_choice
  continuation_delimiter: "\nAnswer: "
  fewshot_random_seed: 7
  fewshot_sampler: lm-eval
  fields: {query: goal}
  metric_names: [InContextLearningMultipleChoiceAccuracy]
"#;

    #[test]
    fn reads_llm_foundry_task_lists() {
        let s = suite(TASKS, Some(Path::new("/data"))).unwrap();
        let names: Vec<&str> = s.tasks.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["lambada_openai/0-shot", "lambada_openai/5-shot", "piqa/0-shot"]);
        assert_eq!(s.tasks[0].path, Path::new("/data/eval/lambada.jsonl"));
        assert_eq!(
            s.tasks[1].prompt,
            PromptOptions { num_fewshot: 5, fewshot_sampler: FewshotSampler::LlmFoundry, ..Default::default() }
        );
        assert_eq!(s.tasks[2].path, Path::new("/abs/piqa.parquet"));
        assert_eq!(s.tasks[2].read.kind, Some(TaskKind::MultipleChoice));
        assert_eq!(s.tasks[2].read.fields.get("query").map(String::as_str), Some("goal"));
        assert_eq!(s.tasks[2].prompt.continuation_delimiter, "\nAnswer: ");
        assert_eq!(s.tasks[2].prompt.fewshot_seed, 7);
        assert_eq!(s.tasks[2].prompt.fewshot_sampler, FewshotSampler::LmEval);
        assert_eq!(s.tasks[2].prompt.example_delimiter(), "\n\n");
        assert_eq!(s.gauntlet.categories[0].benchmarks.len(), 3);
        // Without --data-dir, relative to the suite file.
        let s = suite(TASKS, None).unwrap();
        assert!(s.tasks[0].path.ends_with("eval/lambada.jsonl") && s.tasks[0].path.is_absolute());
    }

    #[test]
    fn bad_suites_are_named() {
        let e = suite(
            "icl_tasks:\n- label: x\n  dataset_uri: x.jsonl\n  num_fewshot: [0]\n  icl_task_type: code_evaluation\n",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("icl_tasks[0] (`x`): icl_task_type: task type `code_evaluation` is not supported yet"),
            "{e}"
        );
        let gen =
            "icl_tasks:\n- label: x\n  dataset_uri: x.jsonl\n  num_fewshot: [0]\n  icl_task_type: question_answering\n";
        let e = suite(&format!("{gen}  generation_kwargs: {{max_new_tokens: 0}}\n"), None).unwrap_err().to_string();
        assert!(e.contains("generation_kwargs.max_new_tokens: must be at least 1"), "{e}");
        let e = suite(&format!("{gen}  generation_kwargs: {{temperature: 0.7}}\n"), None).unwrap_err().to_string();
        assert!(e.contains("temperature"), "{e}");
        let e = suite(&format!("{gen}  fewshot_sampler: foundry\n"), None).unwrap_err().to_string();
        assert!(e.contains("fewshot_sampler: unknown few-shot sampler `foundry`"), "{e}");
        let e = suite(&format!("{gen}  do_normalization: false\n"), None).unwrap_err().to_string();
        assert!(e.contains("do_normalization"), "{e}");
        let e = suite(&format!("{TASKS}  early_stopping_criteria: [\"\\n\"]\n"), None).unwrap_err().to_string();
        assert!(e.contains("icl_tasks[1] (`piqa`): early_stopping_criteria: only generation_task_with_answers"), "{e}");
        let e = suite("icl_tasks:\n- label: x\n  num_fewshot: [0]\n", None).unwrap_err().to_string();
        assert!(e.starts_with("suite ") && e.contains("dataset_uri"), "{e}");
        let e = suite(&format!("{TASKS}eval_gauntlet:\n  categories:\n  - name: c\n    benchmarks:\n    - {{name: piqa, num_fewshot: 5}}\n"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("benchmark `piqa` with 5 shots is not among icl_tasks"), "{e}");
    }

    #[test]
    fn reads_generation_tasks() {
        let text = "icl_tasks:\n- label: triviaqa\n  dataset_uri: t.jsonl\n  num_fewshot: [0, 5]\n  \
                    icl_task_type: generation_task_with_answers\n  continuation_delimiter: \"\\nAnswer: \"\n  \
                    early_stopping_criteria: [\"\\n\", \"Question:\"]\n  generation_kwargs: {max_new_tokens: 16}\n  \
                    do_normalization: true\n- label: tqa\n  dataset_uri: t.jsonl\n  num_fewshot: 0\n  icl_task_type: question_answering\n";
        let s = suite(text, None).unwrap();
        assert_eq!(s.tasks.len(), 3);
        assert_eq!(s.tasks[1].read.kind, Some(TaskKind::GenerationWithAnswers));
        assert_eq!(s.tasks[1].prompt.max_new_tokens, Some(16));
        assert_eq!(s.tasks[1].prompt.stop_sequences, Some(vec!["\n".to_owned(), "Question:".to_owned()]));
        assert_eq!(s.tasks[2].read.kind, Some(TaskKind::GenerationWithAnswers));
        assert_eq!((s.tasks[2].prompt.max_new_tokens, s.tasks[2].prompt.stop_sequences.clone()), (None, None));
    }

    #[test]
    fn gauntlet_rescales_and_averages_per_category() {
        let text = format!(
            "{TASKS}eval_gauntlet:\n  categories:\n  - name: lm\n    benchmarks:\n    - {{name: lambada_openai, num_fewshot: 0}}\n    - {{name: lambada_openai, num_fewshot: 5}}\n  - name: reasoning\n    benchmarks:\n    - {{name: piqa, num_fewshot: 0, random_baseline: 0.5}}\n"
        );
        let s = suite(&text, None).unwrap();
        let results: BTreeMap<String, (f64, f64)> = [
            ("lambada_openai/0-shot".to_owned(), (0.2, 0.0)),
            ("lambada_openai/5-shot".to_owned(), (0.4, 0.0)),
            ("piqa/0-shot".to_owned(), (0.75, 0.25)),
        ]
        .into();
        let g = s.gauntlet.scores(&results);
        assert!((g.categories["lm"] - 0.3).abs() < 1e-12);
        // The suite's baseline 0.5 wins over chance: (0.75 - 0.5) / 0.5.
        assert!((g.categories["reasoning"] - 0.5).abs() < 1e-12);
        assert!((g.average - 0.4).abs() < 1e-12);
        assert_eq!(g.tasks["piqa/0-shot"].random_baseline, 0.5);
    }
}
