//! Suite files: llm-foundry's `tasks_*.yaml` (`icl_tasks`), its `eval_gauntlet_*.yaml` and its
//! top-level eval YAML, read unchanged, with llm-foundry 0.22.0's meaning for every key.
//!
//! # Files
//! - A tasks file: `icl_tasks: [TASK, ...]`, optionally with `eval_gauntlet: GAUNTLET`.
//! - llm-foundry's top-level eval YAML: `icl_tasks` (or `icl_tasks_str`) and `eval_gauntlet` (or
//!   `eval_gauntlet_str`), each inline or the path of a file holding `icl_tasks:` / `eval_gauntlet:`.
//!   Its run settings (`models`, `precision`, `max_seq_len`, `device_eval_batch_size`, `seed`,
//!   `loggers`, ...) are not read: the command line gives the model, dtype and batching; they are
//!   listed in [`Suite::unused_run_keys`] for the user. `icl_subset_num_batches`,
//!   `eval_subset_num_batches`, `eval_loader(s)` are refused.
//! - A separate gauntlet file (`--gauntlet`): `eval_gauntlet: GAUNTLET`; it replaces the suite's.
//!
//! Relative paths (`dataset_uri`, nested files) resolve against `data_dir` when given (the folder
//! llm-foundry runs in), else the suite file's folder. A `dataset_uri` that does not exist is an error
//! naming the task and path, unless `skip_missing`: the task is then listed in [`Suite::skipped`].
//!
//! # Task keys (llm-foundry's `build_icl_evaluators` and `InContextLearning*Dataset`)
//! `label`, `dataset_uri`, `icl_task_type` (language_modeling, multiple_choice, schema,
//! generation_task_with_answers / question_answering), `num_fewshot` (a number or a list: one task
//! `label/N-shot` per entry), `prompt_string`, `example_delimiter`, `continuation_delimiter`,
//! `fewshot_random_seed`, `question_prelimiter` (or its old name `prelimiter`; before every context),
//! `metric_names` (only each type's default metric), `batch_size` (results do not depend on it), and
//! `has_categories: true` (one task `label/N-shot/CATEGORY` per distinct `category` value of the
//! rows, sorted, each its own dataset with its own shots, as `partition_dataset_by_category`).
//! Generation tasks also take `cot_delimiter`, `do_normalization`, `early_stopping_criteria` (stop
//! strings; none by default, as llm-foundry) and `generation_kwargs: {max_new_tokens}`. `fields:
//! {canonical: file field}` and `fewshot_sampler` (`llm-foundry`, the default; `lm-eval`; `icl`; see
//! [`crate::FewshotSampler`]) are icl's own. Any other key (`max_seq_len`, `hf_loading_vars`,
//! `pass_at_k`, a typo) is an error naming the file, the task and the key.
//!
//! # Gauntlet (llm-foundry's `EvalGauntlet`)
//! `weighting` (EQUAL, SAMPLE_SZ, LOG_SAMPLE_SZ; default EQUAL), `subtract_random_baseline` (default
//! true), `rescale_accuracy` (default true; refused without `subtract_random_baseline`, as
//! llm-foundry refuses it), `averages: {NAME: [category, ...]}` (default `default_average` of every
//! category; a name may not be a category's) and `categories: [{name, benchmarks: [{name,
//! num_fewshot, random_baseline}]}]`. A benchmark must be one of `icl_tasks`.
//!
//! Scores ([`Gauntlet::scores`]), with `a` a benchmark's accuracy (for a `has_categories` task, the
//! unweighted mean of its categories' accuracies, as `extract_metrics_from_state` averages the
//! sub-evaluators) and `b` its `random_baseline`:
//! - benchmark score `s = a - b` when subtracting, then `/ (1 - b)` when rescaling (else `s = a`);
//! - weight `w` = 1 (EQUAL), `max(n, 1)` (SAMPLE_SZ) or `max(log2(max(n, 1)), 1)` (LOG_SAMPLE_SZ),
//!   `n` the benchmark's evaluated rows (all its categories);
//! - category = `Σ w s / Σ w`; a category with a benchmark without results (a skipped task) is
//!   dropped (null), as llm-foundry removes it;
//! - each average = the mean of its categories that were not dropped, 0 when none is left (as
//!   llm-foundry's `calculate_named_averages`).
//!
//! Standard errors (tasks independent): a `has_categories` task's `se(a) = sqrt(Σ_c se_c²) / C`; a
//! benchmark's `se(s) = se(a)`, divided by `1 - b` when rescaling; a category's `sqrt(Σ (w/Σw)² se(s)²)`;
//! an average's `sqrt(Σ se_cat²) / k` over its `k` categories. Absent when any input lacks one.
//!
//! Without a random_baseline a benchmark uses chance (mean `1/options` for multiple choice and
//! schema, 0 otherwise): llm-foundry has no default (it fails), so this only extends it.

use crate::task::read_categories;
use crate::{Error, FewshotSampler, FieldMap, PromptOptions, ReadOptions, Result, TaskKind};
use serde::de::DeserializeOwned;
use serde_norway::{Mapping, Value};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// One task to evaluate: where its file is, how to read it, how to prompt it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    /// Key of the task's results (`label/N-shot` in suites, `label/N-shot/CATEGORY` for a category).
    pub name: String,
    pub path: PathBuf,
    pub read: ReadOptions,
    pub prompt: PromptOptions,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GauntletCategory {
    pub name: String,
    /// Benchmark names (`label/N-shot`) with their `random_baseline`.
    pub benchmarks: Vec<(String, Option<f64>)>,
}

/// How benchmarks weigh within a category (llm-foundry's `Weighting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Weighting {
    Equal,
    SampleSz,
    LogSampleSz,
}

impl Weighting {
    /// A benchmark's weight from its number of rows.
    pub fn weight(self, n: usize) -> f64 {
        let n = n.max(1) as f64;
        match self {
            Self::Equal => 1.0,
            Self::SampleSz => n,
            Self::LogSampleSz => n.log2().max(1.0),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gauntlet {
    pub categories: Vec<GauntletCategory>,
    pub weighting: Weighting,
    pub subtract_random_baseline: bool,
    pub rescale_accuracy: bool,
    /// Named averages over categories, in file order.
    pub averages: Vec<(String, Vec<String>)>,
    /// `has_categories` tasks: task name (`label/N-shot`) → `(category, task name of the category)`,
    /// sorted by category.
    pub partitions: BTreeMap<String, Vec<(String, String)>>,
}

impl Gauntlet {
    /// One category `all` of `tasks` with llm-foundry's defaults (baseline subtracted and rescaled,
    /// equal weights, `default_average`).
    pub fn one_category(tasks: impl IntoIterator<Item = String>) -> Self {
        let all = GauntletCategory { name: "all".into(), benchmarks: tasks.into_iter().map(|t| (t, None)).collect() };
        Self {
            categories: vec![all],
            weighting: Weighting::Equal,
            subtract_random_baseline: true,
            rescale_accuracy: true,
            averages: vec![(DEFAULT_AVERAGE.into(), vec!["all".into()])],
            partitions: BTreeMap::new(),
        }
    }
}

/// llm-foundry's name for the average of every category when a gauntlet names none.
pub const DEFAULT_AVERAGE: &str = "default_average";

/// A suite task left out because its data file does not exist (`--skip-missing`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SkippedTask {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Suite {
    pub path: PathBuf,
    pub tasks: Vec<TaskSpec>,
    pub gauntlet: Gauntlet,
    pub skipped: Vec<SkippedTask>,
    /// Run settings of a top-level eval YAML that icl takes from its command line instead.
    pub unused_run_keys: Vec<String>,
}

/// How to read a suite.
#[derive(Debug, Clone, Copy, Default)]
pub struct SuiteOptions<'a> {
    /// Relative paths resolve against this (else the suite file's folder).
    pub data_dir: Option<&'a Path>,
    /// A gauntlet file (`eval_gauntlet:`) replacing the suite's.
    pub gauntlet: Option<&'a Path>,
    /// Leave out tasks whose data file does not exist instead of failing.
    pub skip_missing: bool,
}

/// A task's result as the gauntlet reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskOutcome {
    pub acc: f64,
    pub acc_stderr: Option<f64>,
    /// Evaluated rows.
    pub n: usize,
    /// Chance accuracy, the baseline when the gauntlet gives none.
    pub chance: f64,
}

impl TaskOutcome {
    /// A `has_categories` task from its categories: the mean accuracy (llm-foundry's gauntlet
    /// averages the categories' accuracies unweighted), every row, `sqrt(Σ se²) / C`.
    pub fn of_categories(parts: &[TaskOutcome]) -> Option<TaskOutcome> {
        if parts.is_empty() {
            return None;
        }
        let c = parts.len() as f64;
        let se: Option<f64> = parts.iter().map(|p| p.acc_stderr.map(|s| s * s)).sum();
        Some(TaskOutcome {
            acc: parts.iter().map(|p| p.acc).sum::<f64>() / c,
            acc_stderr: se.map(|v| v.sqrt() / c),
            n: parts.iter().map(|p| p.n).sum(),
            chance: parts.iter().map(|p| p.chance).sum::<f64>() / c,
        })
    }
}

/// Aggregate scores: per benchmark, per category (null when dropped), per named average.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GauntletScores {
    pub weighting: Weighting,
    pub subtract_random_baseline: bool,
    pub rescale_accuracy: bool,
    pub tasks: BTreeMap<String, TaskScore>,
    pub categories: BTreeMap<String, Option<f64>>,
    pub categories_stderr: BTreeMap<String, Option<f64>>,
    /// Dropped categories with the benchmarks that had no results.
    pub dropped: BTreeMap<String, Vec<String>>,
    pub averages: BTreeMap<String, f64>,
    pub averages_stderr: BTreeMap<String, Option<f64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TaskScore {
    pub acc: f64,
    pub random_baseline: f64,
    pub score: f64,
    pub score_stderr: Option<f64>,
    pub n: usize,
    pub weight: f64,
}

/// The results key of a suite task.
pub fn task_name(label: &str, shots: usize) -> String {
    format!("{label}/{shots}-shot")
}

/// The default (and only accepted) `metric_names` of each task type.
fn default_metric(kind: TaskKind) -> &'static str {
    match kind {
        TaskKind::LanguageModeling => "InContextLearningLMAccuracy",
        TaskKind::MultipleChoice | TaskKind::Schema => "InContextLearningMultipleChoiceAccuracy",
        TaskKind::GenerationWithAnswers => "InContextLearningGenerationExactMatchAccuracy",
        // Refused before metric_names is read: not an llm-foundry task type.
        TaskKind::Perplexity => "",
    }
}

/// Top-level eval YAML keys that set up the run, not the tasks: the command line sets these.
const RUN_KEYS: &[&str] = &[
    "models",
    "max_seq_len",
    "device_eval_batch_size",
    "code_paths",
    "python_log_level",
    "loggers",
    "console_log_interval",
    "log_config",
    "seed",
    "precision",
    "run_name",
    "metadata",
    "dist_timeout",
    "fsdp_config",
    "callbacks",
    "variables",
];

/// Keys of a task entry that icl reads.
const TASK_KEYS: &[&str] = &[
    "label",
    "dataset_uri",
    "num_fewshot",
    "icl_task_type",
    "prompt_string",
    "example_delimiter",
    "continuation_delimiter",
    "fewshot_random_seed",
    "question_prelimiter",
    "prelimiter",
    "metric_names",
    "batch_size",
    "has_categories",
    "cot_delimiter",
    "do_normalization",
    "early_stopping_criteria",
    "generation_kwargs",
    "fields",
    "fewshot_sampler",
];

/// Generation-only task keys (llm-foundry passes them to the generation dataset alone; another
/// dataset's constructor refuses them).
const GENERATION_KEYS: &[&str] = &["cot_delimiter", "do_normalization", "early_stopping_criteria", "generation_kwargs"];

/// Reads YAML text into a mapping; errors name the file (and the line and column of bad YAML).
fn read_yaml(path: &Path) -> Result<Mapping> {
    let err = |message: String| Error::Suite { path: path.to_owned(), message };
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    match serde_norway::from_str::<Value>(&text).map_err(|e| err(format!("malformed YAML: {e}")))? {
        Value::Mapping(m) => Ok(m),
        other => Err(err(format!("expected a mapping at the top, found {}", yaml_type(&other)))),
    }
}

fn yaml_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// The string keys of a mapping (a non-string key is an error).
fn keys<'m>(map: &'m Mapping, at: &dyn Fn(String) -> Error) -> Result<Vec<&'m str>> {
    map.keys().map(|k| k.as_str().ok_or_else(|| at(format!("key {k:?} is not a string")))).collect()
}

/// A typed value of `key`, if present; errors name the key.
fn get<T: DeserializeOwned>(map: &Mapping, key: &str, at: &dyn Fn(String) -> Error) -> Result<Option<T>> {
    match map.get(key) {
        None => Ok(None),
        Some(v) => serde_norway::from_value(v.clone()).map(Some).map_err(|e| at(format!("{key}: {e}"))),
    }
}

fn required<T: DeserializeOwned>(map: &Mapping, key: &str, at: &dyn Fn(String) -> Error) -> Result<T> {
    get(map, key, at)?.ok_or_else(|| at(format!("{key}: missing")))
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Shots {
    One(usize),
    Many(Vec<usize>),
}

/// Resolves a relative path against `base`.
fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

/// `icl_tasks` or `eval_gauntlet` of a top-level file: inline, or the path of a file holding it.
fn section(file: &Path, map: &Mapping, key: &str, base: &Path) -> Result<Option<(PathBuf, Value)>> {
    let err = |message: String| Error::Suite { path: file.to_owned(), message };
    let str_key = format!("{key}_str");
    let value = match (map.get(key), map.get(str_key.as_str())) {
        (Some(_), Some(_)) => return Err(err(format!("both {key} and {str_key} are given"))),
        (Some(v), None) | (None, Some(v)) => v,
        (None, None) => return Ok(None),
    };
    match value {
        Value::String(path) => {
            let nested = resolve(base, path);
            if !nested.exists() {
                return Err(err(format!("{key}: no such file {}", nested.display())));
            }
            let inner = read_yaml(&nested)?;
            let v = inner.get(key).cloned().ok_or_else(|| Error::Suite {
                path: nested.clone(),
                message: format!("{key}: missing (the file is named by {} as its {key})", file.display()),
            })?;
            Ok(Some((nested, v)))
        }
        v => Ok(Some((file.to_owned(), v.clone()))),
    }
}

impl Suite {
    /// Reads a suite (see the module documentation).
    pub fn read(path: &Path, options: SuiteOptions<'_>) -> Result<Suite> {
        let err = |message: String| Error::Suite { path: path.to_owned(), message };
        let top = read_yaml(path)?;
        let base =
            options.data_dir.map(Path::to_owned).unwrap_or_else(|| path.parent().unwrap_or(Path::new(".")).to_owned());
        let mut unused_run_keys = Vec::new();
        for key in keys(&top, &err)? {
            match key {
                "icl_tasks" | "icl_tasks_str" | "eval_gauntlet" | "eval_gauntlet_str" => {}
                k if RUN_KEYS.contains(&k) => unused_run_keys.push(k.to_owned()),
                "icl_subset_num_batches" | "eval_subset_num_batches" => {
                    return Err(err(format!("{key}: not supported (icl evaluates every row, or --limit N rows)")))
                }
                "eval_loader" | "eval_loaders" => {
                    return Err(err(format!("{key}: not supported (only icl_tasks are evaluated)")))
                }
                other => return Err(err(format!("unknown key `{other}`"))),
            }
        }
        let (tasks_file, tasks_value) =
            section(path, &top, "icl_tasks", &base)?.ok_or_else(|| err("icl_tasks: missing".into()))?;
        let Value::Sequence(entries) = tasks_value else {
            return Err(Error::Suite {
                path: tasks_file,
                message: format!("icl_tasks: expected a list of tasks, found {}", yaml_type(&tasks_value)),
            });
        };
        let mut tasks = Vec::new();
        let mut skipped = Vec::new();
        let mut partitions = BTreeMap::new();
        let mut names = HashSet::new();
        for (i, entry) in entries.iter().enumerate() {
            read_task_entry(
                &tasks_file,
                i,
                entry,
                &base,
                options.skip_missing,
                &mut names,
                &mut tasks,
                &mut skipped,
                &mut partitions,
            )?;
        }
        if names.is_empty() {
            return Err(Error::Suite { path: tasks_file, message: "icl_tasks is empty".into() });
        }
        let gauntlet_section = match options.gauntlet {
            Some(g) => {
                let map = read_yaml(g)?;
                let v = map.get("eval_gauntlet").cloned().ok_or_else(|| Error::Suite {
                    path: g.to_owned(),
                    message: "eval_gauntlet: missing (a gauntlet file holds `eval_gauntlet:`)".into(),
                })?;
                Some((g.to_owned(), v))
            }
            None => section(path, &top, "eval_gauntlet", &base)?,
        };
        let mut gauntlet = match gauntlet_section {
            None => {
                let mut all: Vec<String> = tasks.iter().map(|t: &TaskSpec| t.name.clone()).collect();
                all.retain(|t| !partitions.values().flatten().any(|(_, part): &(String, String)| part == t));
                all.extend(partitions.keys().cloned());
                all.sort();
                all.dedup();
                Gauntlet::one_category(all)
            }
            Some((file, value)) => read_gauntlet(&file, &value, &names)?,
        };
        gauntlet.partitions = partitions;
        Ok(Suite { path: path.to_owned(), tasks, gauntlet, skipped, unused_run_keys })
    }
}

/// The labels of a tasks file's inline `icl_tasks` (none when it has no such list).
pub fn suite_labels(path: &Path) -> Result<Vec<String>> {
    let top = read_yaml(path)?;
    let Some(Value::Sequence(tasks)) = top.get("icl_tasks") else { return Ok(Vec::new()) };
    Ok(tasks.iter().filter_map(|t| t.get("label").and_then(Value::as_str).map(str::to_owned)).collect())
}

/// One entry of `icl_tasks`: its tasks (one per shot count, or per shot count and category).
#[allow(clippy::too_many_arguments)]
fn read_task_entry(
    file: &Path,
    i: usize,
    entry: &Value,
    base: &Path,
    skip_missing: bool,
    names: &mut HashSet<String>,
    tasks: &mut Vec<TaskSpec>,
    skipped: &mut Vec<SkippedTask>,
    partitions: &mut BTreeMap<String, Vec<(String, String)>>,
) -> Result<()> {
    let Value::Mapping(t) = entry else {
        return Err(Error::Suite {
            path: file.to_owned(),
            message: format!("icl_tasks[{i}]: expected a mapping, found {}", yaml_type(entry)),
        });
    };
    let label: Option<String> = t.get("label").and_then(|v| v.as_str()).map(str::to_owned);
    let at = |message: String| Error::Suite {
        path: file.to_owned(),
        message: match &label {
            Some(l) => format!("icl_tasks[{i}] (`{l}`): {message}"),
            None => format!("icl_tasks[{i}]: {message}"),
        },
    };
    let label: String = required(t, "label", &at)?;
    for key in keys(t, &at)? {
        if !TASK_KEYS.contains(&key) {
            let why = match key {
                "max_seq_len" => "not supported: icl uses the model's own context length",
                "hf_loading_vars" | "hf_parsing_map" => "not supported: only local files are read",
                "strip_dataset" | "padding_side" | "tokenize_labels" | "padding_size" => {
                    "not supported: icl always strips and pads as llm-foundry's defaults do"
                }
                "num_beams" | "pass_at_k" | "generations_per_sample" => {
                    "not supported: generation is greedy, one sample"
                }
                _ => "unknown key",
            };
            return Err(at(format!("{key}: {why}")));
        }
    }
    let type_name: String = required(t, "icl_task_type", &at)?;
    let kind = TaskKind::from_name(&type_name).map_err(|m| at(format!("icl_task_type: {m}")))?;
    if kind == TaskKind::Perplexity {
        // Document perplexity has no accuracy for a gauntlet; it runs with `--task --type perplexity`.
        return Err(at(
            "icl_task_type: `perplexity` is not an llm-foundry task type (use --task with --type perplexity)".into(),
        ));
    }
    let dataset_uri: String = required(t, "dataset_uri", &at)?;
    if dataset_uri.contains("://") {
        return Err(at(format!("dataset_uri `{dataset_uri}`: only local files are supported")));
    }
    let generation = kind == TaskKind::GenerationWithAnswers;
    for key in GENERATION_KEYS {
        if t.contains_key(*key) && !generation {
            return Err(at(format!("{key}: only generation_task_with_answers tasks take it (this is {type_name})")));
        }
    }
    if let Some(metrics) = get::<Vec<String>>(t, "metric_names", &at)? {
        let expected = default_metric(kind);
        if metrics != [expected] {
            return Err(at(format!(
                "metric_names: only [{expected}] is supported for {type_name} tasks, found {metrics:?}"
            )));
        }
    }
    let _batch_size: Option<usize> = get(t, "batch_size", &at)?;
    if t.contains_key("question_prelimiter") && t.contains_key("prelimiter") {
        return Err(at("question_prelimiter and prelimiter are both given (they are the same setting)".into()));
    }
    let prelimiter: Option<String> = match get(t, "question_prelimiter", &at)? {
        Some(p) => Some(p),
        None => get(t, "prelimiter", &at)?,
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct GenerationKwargs {
        max_new_tokens: Option<usize>,
    }
    let generation_kwargs: Option<GenerationKwargs> = get(t, "generation_kwargs", &at)?;
    let max_new_tokens = generation_kwargs.and_then(|g| g.max_new_tokens);
    if max_new_tokens == Some(0) {
        return Err(at("generation_kwargs.max_new_tokens: must be at least 1".into()));
    }
    let stops: Option<Vec<String>> = get(t, "early_stopping_criteria", &at)?;
    for stop in stops.iter().flatten() {
        // llm-foundry cuts the output with re.split('|'.join(stops)); icl matches literally, which is
        // the same only for strings without regular-expression syntax.
        if stop.is_empty() || stop.chars().any(|c| "\\.^$*+?()[]{}|".contains(c)) {
            return Err(at(format!(
                "early_stopping_criteria: {stop:?}: llm-foundry reads stop strings as one regular expression; \
                 icl supports non-empty strings without regular-expression syntax (\\.^$*+?()[]{{}}|)"
            )));
        }
    }
    let has_categories: bool = get(t, "has_categories", &at)?.unwrap_or(false);
    let fields: FieldMap = get(t, "fields", &at)?.unwrap_or_default();
    let shots = match required::<Shots>(t, "num_fewshot", &at)? {
        Shots::One(n) => vec![n],
        Shots::Many(v) if v.is_empty() => return Err(at("num_fewshot: the list is empty".into())),
        Shots::Many(v) => v,
    };
    let defaults = PromptOptions::default();
    // A suite is llm-foundry's format, so its shots are llm-foundry's unless it says otherwise.
    let fewshot_sampler = match get::<String>(t, "fewshot_sampler", &at)? {
        Some(name) => FewshotSampler::from_name(&name).map_err(|m| at(format!("fewshot_sampler: {m}")))?,
        None => FewshotSampler::LlmFoundry,
    };
    let prompt = PromptOptions {
        num_fewshot: 0,
        fewshot_seed: get(t, "fewshot_random_seed", &at)?.unwrap_or(defaults.fewshot_seed),
        prompt_string: get(t, "prompt_string", &at)?.unwrap_or(defaults.prompt_string),
        example_delimiter: get(t, "example_delimiter", &at)?,
        continuation_delimiter: get(t, "continuation_delimiter", &at)?.unwrap_or(defaults.continuation_delimiter),
        max_new_tokens,
        // llm-foundry stops only at the given criteria (and the end-of-text token).
        stop_sequences: Some(stops.unwrap_or_default()),
        prelimiter: prelimiter.unwrap_or_default(),
        cot_delimiter: get(t, "cot_delimiter", &at)?.unwrap_or_default(),
        normalize_answers: get(t, "do_normalization", &at)?.unwrap_or(true),
        fewshot_sampler,
        ..defaults
    };
    let path = resolve(base, &dataset_uri);
    let exists = path.is_file();
    if !exists && !skip_missing {
        return Err(at(format!(
            "dataset_uri `{dataset_uri}`: no such file {} (--skip-missing evaluates the other tasks)",
            path.display()
        )));
    }
    let categories = if has_categories && exists {
        read_categories(&path).map_err(|e| at(format!("has_categories: {e}")))?
    } else {
        Vec::new()
    };
    for n in shots {
        let name = task_name(&label, n);
        if !names.insert(name.clone()) {
            return Err(at(format!("task `{name}` is defined twice")));
        }
        if !exists {
            skipped.push(SkippedTask { name, path: path.clone() });
            continue;
        }
        let spec = |name: String, category: Option<String>| TaskSpec {
            name,
            path: path.clone(),
            read: ReadOptions { kind: Some(kind), fields: fields.clone(), category },
            prompt: PromptOptions { num_fewshot: n, ..prompt.clone() },
        };
        if has_categories {
            let mut parts = Vec::new();
            for c in &categories {
                let part = format!("{name}/{c}");
                tasks.push(spec(part.clone(), Some(c.clone())));
                parts.push((c.clone(), part));
            }
            partitions.insert(name, parts);
        } else {
            tasks.push(spec(name, None));
        }
    }
    Ok(())
}

/// The `eval_gauntlet` mapping; `tasks` are the names the suite defines (skipped ones included).
fn read_gauntlet(file: &Path, value: &Value, tasks: &HashSet<String>) -> Result<Gauntlet> {
    let err = |message: String| Error::Suite { path: file.to_owned(), message: format!("eval_gauntlet: {message}") };
    let Value::Mapping(g) = value else {
        return Err(err(format!("expected a mapping, found {}", yaml_type(value))));
    };
    for key in keys(g, &err)? {
        if !["weighting", "subtract_random_baseline", "rescale_accuracy", "averages", "categories"].contains(&key) {
            return Err(err(format!("unknown key `{key}`")));
        }
    }
    let weighting = match get::<String>(g, "weighting", &err)?.as_deref() {
        None | Some("EQUAL") => Weighting::Equal,
        Some("SAMPLE_SZ") => Weighting::SampleSz,
        Some("LOG_SAMPLE_SZ") => Weighting::LogSampleSz,
        Some(other) => {
            return Err(err(format!("weighting: `{other}` is not one of EQUAL, SAMPLE_SZ, LOG_SAMPLE_SZ")));
        }
    };
    let subtract_random_baseline: bool = get(g, "subtract_random_baseline", &err)?.unwrap_or(true);
    let rescale_accuracy: bool = get(g, "rescale_accuracy", &err)?.unwrap_or(true);
    if rescale_accuracy && !subtract_random_baseline {
        return Err(err("rescale_accuracy: true needs subtract_random_baseline: true (llm-foundry refuses accuracy \
             rescaling without subtracting the random baseline)"
            .into()));
    }
    let Some(Value::Sequence(entries)) = g.get("categories") else {
        return Err(err("categories: missing or not a list".into()));
    };
    let mut categories = Vec::new();
    for (ci, c) in entries.iter().enumerate() {
        let Value::Mapping(c) = c else {
            return Err(err(format!("categories[{ci}]: expected a mapping, found {}", yaml_type(c))));
        };
        let at_c = |message: String| err(format!("categories[{ci}]: {message}"));
        let name: String = required(c, "name", &at_c)?;
        let at_c = |message: String| err(format!("category `{name}`: {message}"));
        for key in keys(c, &at_c)? {
            if !["name", "benchmarks"].contains(&key) {
                return Err(at_c(format!("unknown key `{key}`")));
            }
        }
        let Some(Value::Sequence(bs)) = c.get("benchmarks") else {
            return Err(at_c("benchmarks: missing or not a list".into()));
        };
        let mut benchmarks = Vec::new();
        for (bi, b) in bs.iter().enumerate() {
            let Value::Mapping(b) = b else {
                return Err(at_c(format!("benchmarks[{bi}]: expected a mapping, found {}", yaml_type(b))));
            };
            let at_b = |message: String| at_c(format!("benchmarks[{bi}]: {message}"));
            for key in keys(b, &at_b)? {
                if !["name", "num_fewshot", "random_baseline"].contains(&key) {
                    return Err(at_b(format!("unknown key `{key}`")));
                }
            }
            let bname: String = required(b, "name", &at_b)?;
            let shots: usize = required(b, "num_fewshot", &at_b)?;
            let baseline: Option<f64> = get(b, "random_baseline", &at_b)?;
            let task = task_name(&bname, shots);
            if !tasks.contains(&task) {
                return Err(at_c(format!("benchmark `{bname}` with {shots} shots is not among icl_tasks")));
            }
            if let Some(r) = baseline.filter(|r| !(0.0..1.0).contains(r)) {
                return Err(at_c(format!("benchmark `{bname}`: random_baseline {r} is not in [0, 1)")));
            }
            benchmarks.push((task, baseline));
        }
        if benchmarks.is_empty() {
            return Err(at_c("has no benchmarks".into()));
        }
        if categories.iter().any(|k: &GauntletCategory| k.name == name) {
            return Err(at_c("is defined twice".into()));
        }
        categories.push(GauntletCategory { name, benchmarks });
    }
    if categories.is_empty() {
        return Err(err("categories: the list is empty".into()));
    }
    let averages = match g.get("averages") {
        None => vec![(DEFAULT_AVERAGE.to_owned(), categories.iter().map(|c| c.name.clone()).collect())],
        Some(Value::Mapping(m)) => {
            let mut out = Vec::new();
            for (k, v) in m {
                let name = k.as_str().ok_or_else(|| err(format!("averages: key {k:?} is not a string")))?;
                let members: Vec<String> = serde_norway::from_value(v.clone())
                    .map_err(|e| err(format!("averages.{name}: expected a list of category names: {e}")))?;
                if categories.iter().any(|c| c.name == name) {
                    return Err(err(format!(
                        "averages.{name}: `{name}` is a category's name (llm-foundry needs average and category names apart)"
                    )));
                }
                if let Some(unknown) = members.iter().find(|m| !categories.iter().any(|c| &c.name == *m)) {
                    return Err(err(format!("averages.{name}: `{unknown}` is not a category")));
                }
                out.push((name.to_owned(), members));
            }
            out
        }
        Some(other) => return Err(err(format!("averages: expected a mapping, found {}", yaml_type(other)))),
    };
    Ok(Gauntlet {
        categories,
        weighting,
        subtract_random_baseline,
        rescale_accuracy,
        averages,
        partitions: BTreeMap::new(),
    })
}

impl Gauntlet {
    /// The results of the benchmarks: each task's own, and for `has_categories` tasks the combination
    /// of its categories (when every category has one).
    pub fn benchmark_outcomes(&self, results: &BTreeMap<String, TaskOutcome>) -> BTreeMap<String, TaskOutcome> {
        let mut out = results.clone();
        for (name, parts) in &self.partitions {
            let got: Option<Vec<TaskOutcome>> = parts.iter().map(|(_, part)| results.get(part).copied()).collect();
            if let Some(combined) = got.as_deref().and_then(TaskOutcome::of_categories) {
                out.insert(name.clone(), combined);
            }
        }
        out
    }

    /// Scores from the tasks' results (see the module documentation); `results` holds every
    /// finished task, categories of `has_categories` tasks under their own names.
    pub fn scores(&self, results: &BTreeMap<String, TaskOutcome>) -> GauntletScores {
        let outcomes = self.benchmark_outcomes(results);
        let mut tasks = BTreeMap::new();
        let mut categories = BTreeMap::new();
        let mut categories_stderr = BTreeMap::new();
        let mut dropped = BTreeMap::new();
        for c in &self.categories {
            let mut scored = Vec::new();
            let mut missing = Vec::new();
            for (name, baseline) in &c.benchmarks {
                let Some(o) = outcomes.get(name) else {
                    missing.push(name.clone());
                    continue;
                };
                let random_baseline = baseline.unwrap_or(o.chance);
                let (mut score, mut se) = (o.acc, o.acc_stderr);
                if self.subtract_random_baseline {
                    score -= random_baseline;
                    if self.rescale_accuracy {
                        score /= 1.0 - random_baseline;
                        se = se.map(|s| s / (1.0 - random_baseline));
                    }
                }
                let weight = self.weighting.weight(o.n);
                let t = TaskScore { acc: o.acc, random_baseline, score, score_stderr: se, n: o.n, weight };
                tasks.insert(name.clone(), t);
                scored.push(t);
            }
            if !missing.is_empty() {
                categories.insert(c.name.clone(), None);
                categories_stderr.insert(c.name.clone(), None);
                dropped.insert(c.name.clone(), missing);
                continue;
            }
            let total: f64 = scored.iter().map(|t| t.weight).sum();
            categories.insert(c.name.clone(), Some(scored.iter().map(|t| t.score * t.weight / total).sum()));
            let var: Option<f64> = scored.iter().map(|t| t.score_stderr.map(|s| (t.weight / total * s).powi(2))).sum();
            categories_stderr.insert(c.name.clone(), var.map(f64::sqrt));
        }
        let mut averages = BTreeMap::new();
        let mut averages_stderr = BTreeMap::new();
        for (name, members) in &self.averages {
            let present: Vec<(f64, Option<f64>)> = members
                .iter()
                .filter_map(|m| categories.get(m).copied().flatten().map(|v| (v, categories_stderr[m])))
                .collect();
            let k = present.len() as f64;
            // llm-foundry's calculate_named_averages: 0 when none of its categories is left.
            let value = if present.is_empty() { 0.0 } else { present.iter().map(|p| p.0).sum::<f64>() / k };
            let var: Option<f64> = present.iter().map(|p| p.1.map(|s| s * s)).sum();
            averages.insert(name.clone(), value);
            averages_stderr.insert(name.clone(), if present.is_empty() { None } else { var.map(|v| v.sqrt() / k) });
        }
        GauntletScores {
            weighting: self.weighting,
            subtract_random_baseline: self.subtract_random_baseline,
            rescale_accuracy: self.rescale_accuracy,
            tasks,
            categories,
            categories_stderr,
            dropped,
            averages,
            averages_stderr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder with the suite file and the data files its tests name.
    struct Dir(tempfile::TempDir);

    impl Dir {
        fn new() -> Self {
            let d = Dir(tempfile::tempdir().unwrap());
            d.write("eval/lambada.jsonl", "{\"context\": \"a\", \"continuation\": \"b\"}\n");
            d.write("piqa.jsonl", "{\"query\": \"q\", \"choices\": [\"x\", \"y\"], \"gold\": 0}\n");
            d.write("t.jsonl", "{\"context\": \"q\", \"answer\": \"a\"}\n");
            d.write(
                "cats.jsonl",
                "{\"context\": \"a\", \"continuation\": \"b\", \"category\": \"zoo\"}\n\
                 {\"context\": \"c\", \"continuation\": \"d\", \"category\": \"art\"}\n\
                 {\"context\": \"e\", \"continuation\": \"f\", \"category\": \"zoo\"}\n",
            );
            d
        }
        fn path(&self, name: &str) -> PathBuf {
            self.0.path().join(name)
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.path(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, text).unwrap();
            p
        }
        fn suite(&self, text: &str) -> Result<Suite> {
            self.suite_with(text, SuiteOptions::default())
        }
        fn suite_with(&self, text: &str, options: SuiteOptions<'_>) -> Result<Suite> {
            Suite::read(&self.write("suite.yaml", text), options)
        }
    }

    const TASKS: &str = r#"
icl_tasks:
- label: lambada_openai
  dataset_uri: eval/lambada.jsonl
  num_fewshot: [0, 5]
  icl_task_type: language_modeling
- label: piqa
  dataset_uri: piqa.jsonl
  num_fewshot: 0
  icl_task_type: multiple_choice
  continuation_delimiter: "\nAnswer: "
  fewshot_random_seed: 7
  fewshot_sampler: lm-eval
  fields: {query: query}
  metric_names: [InContextLearningMultipleChoiceAccuracy]
  batch_size: 4
"#;

    fn err(d: &Dir, text: &str) -> String {
        d.suite(text).unwrap_err().to_string()
    }

    #[test]
    fn reads_llm_foundry_task_lists() {
        let d = Dir::new();
        let s = d.suite(TASKS).unwrap();
        let names: Vec<&str> = s.tasks.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["lambada_openai/0-shot", "lambada_openai/5-shot", "piqa/0-shot"]);
        assert_eq!(s.tasks[0].path, d.path("eval/lambada.jsonl"));
        let lm = PromptOptions {
            num_fewshot: 5,
            stop_sequences: Some(vec![]),
            fewshot_sampler: FewshotSampler::LlmFoundry,
            ..Default::default()
        };
        assert_eq!(s.tasks[1].prompt, lm);
        assert_eq!(s.tasks[2].read.kind, Some(TaskKind::MultipleChoice));
        assert_eq!(s.tasks[2].prompt.continuation_delimiter, "\nAnswer: ");
        assert_eq!(s.tasks[2].prompt.fewshot_seed, 7);
        assert_eq!(s.tasks[2].prompt.fewshot_sampler, FewshotSampler::LmEval);
        assert_eq!(s.tasks[2].prompt.example_delimiter(), "\n\n");
        let e = err(&d, &TASKS.replace("sampler: lm-eval", "sampler: foundry"));
        assert!(e.contains("(`piqa`): fewshot_sampler: unknown few-shot sampler `foundry`"), "{e}");
        assert_eq!(s.gauntlet.categories[0].benchmarks.len(), 3);
        assert_eq!(s.gauntlet.averages, vec![(DEFAULT_AVERAGE.to_owned(), vec!["all".to_owned()])]);
        // With a data folder, relative to it.
        let data = tempfile::tempdir().unwrap();
        let e = Suite::read(&d.path("suite.yaml"), SuiteOptions { data_dir: Some(data.path()), ..Default::default() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("icl_tasks[0] (`lambada_openai`): dataset_uri `eval/lambada.jsonl`: no such file"), "{e}");
        assert!(e.contains(&data.path().join("eval/lambada.jsonl").display().to_string()), "{e}");
    }

    #[test]
    fn missing_data_is_an_error_or_skipped() {
        let d = Dir::new();
        let text = format!("{TASKS}- label: arc\n  dataset_uri: gone/arc.jsonl\n  num_fewshot: [3, 25]\n  icl_task_type: multiple_choice\n");
        let e = err(&d, &text);
        assert!(
            e.contains("icl_tasks[2] (`arc`): dataset_uri `gone/arc.jsonl`: no such file")
                && e.contains("--skip-missing"),
            "{e}"
        );
        let s = d.suite_with(&text, SuiteOptions { skip_missing: true, ..Default::default() }).unwrap();
        let skipped: Vec<&str> = s.skipped.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(skipped, ["arc/3-shot", "arc/25-shot"]);
        assert_eq!(s.tasks.len(), 3);
    }

    #[test]
    fn every_key_is_read_or_refused() {
        let d = Dir::new();
        let gen =
            "icl_tasks:\n- label: x\n  dataset_uri: t.jsonl\n  num_fewshot: [0]\n  icl_task_type: question_answering\n";
        let e = err(
            &d,
            "icl_tasks:\n- label: x\n  dataset_uri: t.jsonl\n  num_fewshot: [0]\n  icl_task_type: code_evaluation\n",
        );
        assert!(
            e.contains(
                "suite.yaml: icl_tasks[0] (`x`): icl_task_type: task type `code_evaluation` is not supported yet"
            ),
            "{e}"
        );
        let e =
            err(&d, "icl_tasks:\n- label: x\n  dataset_uri: t.jsonl\n  num_fewshot: [0]\n  icl_task_type: ranking\n");
        assert!(e.contains("icl_tasks[0] (`x`): icl_task_type: unknown task type `ranking`"), "{e}");
        for (extra, expected) in [
            ("  generation_kwargs: {max_new_tokens: 0}\n", "generation_kwargs.max_new_tokens: must be at least 1"),
            ("  generation_kwargs: {temperature: 0.7}\n", "temperature"),
            ("  max_seq_len: 1024\n", "icl_tasks[0] (`x`): max_seq_len: not supported"),
            ("  hf_loading_vars: {split: test}\n", "icl_tasks[0] (`x`): hf_loading_vars: not supported"),
            ("  cot_delimitr: x\n", "icl_tasks[0] (`x`): cot_delimitr: unknown key"),
            ("  do_normalization: maybe\n", "icl_tasks[0] (`x`): do_normalization:"),
            ("  early_stopping_criteria: [\"a.b\"]\n", "regular expression"),
            ("  question_prelimiter: Q\n  prelimiter: Q\n", "both given"),
            (
                "  metric_names: [InContextLearningLMAccuracy]\n",
                "metric_names: only [InContextLearningGenerationExactMatchAccuracy]",
            ),
        ] {
            let e = err(&d, &format!("{gen}{extra}"));
            assert!(e.contains(expected), "{extra}: {e}");
        }
        let e = err(&d, &format!("{TASKS}  early_stopping_criteria: [\"\\n\"]\n"));
        assert!(e.contains("icl_tasks[1] (`piqa`): early_stopping_criteria: only generation_task_with_answers"), "{e}");
        let e = err(&d, &format!("{TASKS}  cot_delimiter: \"The answer is \"\n"));
        assert!(e.contains("icl_tasks[1] (`piqa`): cot_delimiter: only generation_task_with_answers"), "{e}");
        let e = err(&d, "icl_tasks:\n- label: x\n  num_fewshot: [0]\n  icl_task_type: schema\n");
        assert!(e.starts_with("suite ") && e.contains("icl_tasks[0] (`x`): dataset_uri: missing"), "{e}");
        let e = err(&d, "icl_tasks:\n- label: x\n  dataset_uri: [unclosed\n");
        assert!(e.contains("suite.yaml: malformed YAML") && e.contains("line"), "{e}");
        let e = err(&d, &format!("{TASKS}icl_subset_num_batches: 2\n"));
        assert!(e.contains("icl_subset_num_batches: not supported"), "{e}");
        let e = err(&d, &format!("{TASKS}modles: []\n"));
        assert!(e.contains("unknown key `modles`"), "{e}");
    }

    #[test]
    fn reads_generation_tasks() {
        let d = Dir::new();
        let text = "icl_tasks:\n- label: triviaqa\n  dataset_uri: t.jsonl\n  num_fewshot: [0, 5]\n  \
                    icl_task_type: generation_task_with_answers\n  continuation_delimiter: \"\\n\\nA:\"\n  \
                    early_stopping_criteria: [\"\\n\\n\", \"Question:\"]\n  generation_kwargs: {max_new_tokens: 16}\n  \
                    cot_delimiter: \"The answer is \"\n  question_prelimiter: \"Question: \"\n  \
                    do_normalization: false\n- label: tqa\n  dataset_uri: t.jsonl\n  num_fewshot: 0\n  icl_task_type: question_answering\n";
        let s = d.suite(text).unwrap();
        assert_eq!(s.tasks.len(), 3);
        let p = &s.tasks[1].prompt;
        assert_eq!(s.tasks[1].read.kind, Some(TaskKind::GenerationWithAnswers));
        assert_eq!(p.max_new_tokens, Some(16));
        assert_eq!(p.stop_sequences, Some(vec!["\n\n".to_owned(), "Question:".to_owned()]));
        assert_eq!(
            (p.cot_delimiter.as_str(), p.prelimiter.as_str(), p.normalize_answers),
            ("The answer is ", "Question: ", false)
        );
        // llm-foundry's defaults: no stop strings, normalized answers, no chain of thought.
        let p = &s.tasks[2].prompt;
        assert_eq!((p.max_new_tokens, p.stop_sequences.clone()), (None, Some(vec![])));
        assert!(p.normalize_answers && p.cot_delimiter.is_empty() && p.prelimiter.is_empty());
    }

    #[test]
    fn has_categories_makes_a_task_per_category() {
        let d = Dir::new();
        let text = "icl_tasks:\n- label: jeopardy\n  dataset_uri: cats.jsonl\n  num_fewshot: [3]\n  \
                    icl_task_type: language_modeling\n  has_categories: true\n";
        let s = d.suite(text).unwrap();
        let names: Vec<&str> = s.tasks.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["jeopardy/3-shot/art", "jeopardy/3-shot/zoo"]);
        assert_eq!(s.tasks[1].read.category.as_deref(), Some("zoo"));
        assert_eq!(s.gauntlet.partitions["jeopardy/3-shot"].len(), 2);
        assert_eq!(s.gauntlet.categories[0].benchmarks, vec![("jeopardy/3-shot".to_owned(), None)]);
        d.write("cats.jsonl", "{\"context\": \"a\", \"continuation\": \"b\", \"category\": \"zoo\"}\n{\"context\": \"c\", \"continuation\": \"d\"}\n");
        let e = err(&d, text);
        assert!(
            e.contains("icl_tasks[0] (`jeopardy`): has_categories:")
                && e.contains("cats.jsonl:2: field `category`: missing"),
            "{e}"
        );
    }

    fn gauntlet_suite(d: &Dir, gauntlet: &str) -> Result<Suite> {
        d.suite(&format!("{TASKS}eval_gauntlet:\n{gauntlet}"))
    }

    const CATEGORIES: &str = "  categories:\n  - name: lm\n    benchmarks:\n    - {name: lambada_openai, num_fewshot: 0, random_baseline: 0}\n    - {name: lambada_openai, num_fewshot: 5, random_baseline: 0}\n  - name: reasoning\n    benchmarks:\n    - {name: piqa, num_fewshot: 0, random_baseline: 0.5}\n";

    #[test]
    fn bad_gauntlets_are_named() {
        let d = Dir::new();
        for (g, expected) in [
            ("  categories:\n  - name: c\n    benchmarks:\n    - {name: piqa, num_fewshot: 5}\n", "eval_gauntlet: category `c`: benchmark `piqa` with 5 shots is not among icl_tasks"),
            (&format!("  subtract_random_baseline: false\n{CATEGORIES}"), "eval_gauntlet: rescale_accuracy: true needs subtract_random_baseline: true"),
            (&format!("  weighting: HEAVY\n{CATEGORIES}"), "eval_gauntlet: weighting: `HEAVY` is not one of"),
            (&format!("  averages: {{lm: [lm]}}\n{CATEGORIES}"), "averages.lm: `lm` is a category's name"),
            (&format!("  averages: {{core: [lm, nope]}}\n{CATEGORIES}"), "averages.core: `nope` is not a category"),
            (&format!("  logger_keys: []\n{CATEGORIES}"), "eval_gauntlet: unknown key `logger_keys`"),
            ("  categories:\n  - name: c\n    benchmarks:\n    - {name: piqa, num_fewshot: 0, random_baseline: 1.5}\n", "random_baseline 1.5 is not in [0, 1)"),
            ("  categories:\n  - name: c\n    benchmarks:\n    - {name: piqa, num_fewshot: 0, baseline: 0.5}\n", "category `c`: benchmarks[0]: unknown key `baseline`"),
        ] {
            let e = gauntlet_suite(&d, g).unwrap_err().to_string();
            assert!(e.contains(expected), "{g}: {e}");
        }
        // A separate gauntlet file's errors name that file.
        let gfile = d.write("gauntlet.yaml", &format!("eval_gauntlet:\n  weighting: HEAVY\n{CATEGORIES}"));
        let e =
            d.suite_with(TASKS, SuiteOptions { gauntlet: Some(&gfile), ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("gauntlet.yaml: eval_gauntlet: weighting"), "{e}");
    }

    fn outcome(acc: f64, se: f64, n: usize) -> TaskOutcome {
        TaskOutcome { acc, acc_stderr: Some(se), n, chance: 0.0 }
    }

    #[test]
    fn gauntlet_rescales_weights_drops_and_averages() {
        let d = Dir::new();
        let results: BTreeMap<String, TaskOutcome> = [
            ("lambada_openai/0-shot".to_owned(), outcome(0.2, 0.01, 100)),
            ("lambada_openai/5-shot".to_owned(), outcome(0.4, 0.02, 300)),
            ("piqa/0-shot".to_owned(), TaskOutcome { chance: 0.25, ..outcome(0.75, 0.04, 50) }),
        ]
        .into();
        let g = gauntlet_suite(&d, &format!("  averages: {{core: [lm, reasoning], only_lm: [lm]}}\n{CATEGORIES}"))
            .unwrap()
            .gauntlet
            .scores(&results);
        assert!((g.categories["lm"].unwrap() - 0.3).abs() < 1e-12);
        // The gauntlet's baseline 0.5: (0.75 - 0.5) / 0.5, its stderr 0.04 / 0.5.
        assert!((g.categories["reasoning"].unwrap() - 0.5).abs() < 1e-12);
        assert!((g.categories_stderr["reasoning"].unwrap() - 0.08).abs() < 1e-12);
        assert!(
            (g.categories_stderr["lm"].unwrap() - (0.5f64.powi(2) * (0.01f64.powi(2) + 0.02f64.powi(2))).sqrt()).abs()
                < 1e-12
        );
        assert!((g.averages["core"] - 0.4).abs() < 1e-12 && (g.averages["only_lm"] - 0.3).abs() < 1e-12);
        let se = (g.categories_stderr["lm"].unwrap().powi(2) + 0.08f64.powi(2)).sqrt() / 2.0;
        assert!((g.averages_stderr["core"].unwrap() - se).abs() < 1e-12);
        // SAMPLE_SZ: (0.2 * 100 + 0.4 * 300) / 400; LOG_SAMPLE_SZ: weights log2(n).
        let g2 =
            gauntlet_suite(&d, &format!("  weighting: SAMPLE_SZ\n{CATEGORIES}")).unwrap().gauntlet.scores(&results);
        assert!((g2.categories["lm"].unwrap() - 0.35).abs() < 1e-12);
        assert!((g2.averages[DEFAULT_AVERAGE] - (0.35 + 0.5) / 2.0).abs() < 1e-12);
        let g3 =
            gauntlet_suite(&d, &format!("  weighting: LOG_SAMPLE_SZ\n{CATEGORIES}")).unwrap().gauntlet.scores(&results);
        let (a, b) = (100f64.log2(), 300f64.log2());
        assert!((g3.categories["lm"].unwrap() - (0.2 * a + 0.4 * b) / (a + b)).abs() < 1e-12);
        // Without subtracting: raw accuracies.
        let g4 =
            gauntlet_suite(&d, &format!("  subtract_random_baseline: false\n  rescale_accuracy: false\n{CATEGORIES}"))
                .unwrap()
                .gauntlet
                .scores(&results);
        assert!((g4.categories["reasoning"].unwrap() - 0.75).abs() < 1e-12);
        // A benchmark without results drops its category; an average of dropped categories is 0.
        let partial: BTreeMap<String, TaskOutcome> =
            results.iter().filter(|(k, _)| k.as_str() != "piqa/0-shot").map(|(k, v)| (k.clone(), *v)).collect();
        let g5 = gauntlet_suite(&d, &format!("  averages: {{core: [lm, reasoning], r: [reasoning]}}\n{CATEGORIES}"))
            .unwrap()
            .gauntlet
            .scores(&partial);
        assert_eq!(g5.categories["reasoning"], None);
        assert_eq!(g5.dropped["reasoning"], vec!["piqa/0-shot".to_owned()]);
        assert!((g5.averages["core"] - 0.3).abs() < 1e-12);
        assert_eq!((g5.averages["r"], g5.averages_stderr["r"]), (0.0, None));
    }

    #[test]
    fn categories_combine_into_their_benchmark() {
        let parts = [outcome(0.2, 0.03, 10), outcome(0.6, 0.04, 30)];
        let c = TaskOutcome::of_categories(&parts).unwrap();
        assert!((c.acc - 0.4).abs() < 1e-12 && c.n == 40);
        assert!((c.acc_stderr.unwrap() - 0.025).abs() < 1e-12);
    }

    #[test]
    fn reads_top_level_eval_yamls() {
        let d = Dir::new();
        d.write("yamls/tasks.yaml", TASKS);
        d.write("yamls/gauntlet.yaml", &format!("eval_gauntlet:\n{CATEGORIES}"));
        let s = d
            .suite("models: []\nprecision: amp_bf16\nmax_seq_len: 1024\nicl_tasks: yamls/tasks.yaml\neval_gauntlet: yamls/gauntlet.yaml\n")
            .unwrap();
        assert_eq!(s.tasks.len(), 3);
        assert_eq!(s.gauntlet.categories.len(), 2);
        assert_eq!(s.unused_run_keys, ["models", "precision", "max_seq_len"]);
        let e = d.suite("icl_tasks: yamls/none.yaml\n").unwrap_err().to_string();
        assert!(e.contains("icl_tasks: no such file"), "{e}");
        // Inline gauntlet in a top-level file naming a tasks file.
        let s = d.suite(&format!("icl_tasks_str: yamls/tasks.yaml\neval_gauntlet:\n{CATEGORIES}")).unwrap();
        assert_eq!(s.gauntlet.categories[1].name, "reasoning");
    }
}
