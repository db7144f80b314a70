//! `icl compare A B`: paired comparison of two runs, example by example, from their `--log-samples`
//! files, with standard errors and McNemar's exact test.
//!
//! # Inputs
//!
//! `A` and `B` are `samples.jsonl` files of `icl eval --log-samples` (or folders holding one). Each
//! line is one evaluated example, keyed by `task` and `index` (0-based row); the kind of task and its
//! per-example score are read from the fields the evaluator writes:
//!
//! | line has                         | kind                 | score (0/1)              | also |
//! |----------------------------------|----------------------|--------------------------|------|
//! | `loglik`, `is_greedy`            | `language_modeling`  | `acc` = `is_greedy`      | `loglik` |
//! | `logliks`, `pred`, `pred_norm`, `gold` | `choice` (multiple choice or schema) | `acc` = `pred == gold` | `acc_norm` = `pred_norm == gold`; `loglik` = `logliks[gold]` |
//! | `correct`                        | `generation`         | `exact_match` = `correct`| |
//!
//! The files must hold the same tasks with the same rows, and the same kind, `gold` and number of
//! choices per row; anything else is an error naming the file, line and field. With `--intersect`,
//! tasks or rows present in one file only are left out (and counted), but a row whose kind, `gold`
//! or choice count differs is still an error: those are different data, not missing data.
//!
//! # Statistics, per task (`n` rows present in both, `aᵢ`, `bᵢ` the scores)
//!
//! - `a`, `b`: the mean scores, with lm-eval's `mean_stderr` (`a_stderr`, `b_stderr`):
//!   `sqrt(Σ (xᵢ - x̄)² / (n - 1)) / sqrt(n)`.
//! - `diff = Σ (aᵢ - bᵢ) / n` and `diff_stderr`, the same formula over the differences `dᵢ = aᵢ - bᵢ`
//!   (the paired standard error: it accounts for both runs being scored on the same examples, so it
//!   is smaller than `sqrt(a_stderr² + b_stderr²)` when the runs' scores are positively correlated,
//!   as they usually are). `null` when `n < 2`.
//! - `a_only`, `b_only`: the discordant pairs (right in A only, right in B only).
//! - `p_value`: McNemar's exact two-sided test: with `m = a_only + b_only` and `X ~ Bin(m, 1/2)`,
//!   `p = min(1, 2 · P[X ≤ min(a_only, b_only)])` (1 when `m = 0`), the sum of binomial terms
//!   computed in log space so that large counts neither overflow nor underflow.
//! - `p_holm` (`--holm`): Holm's step-down correction over the compared tasks (primary score only):
//!   with the `m` p-values sorted `p₍₁₎ ≤ … ≤ p₍ₘ₎`, `p̃₍ᵢ₎ = max_{j ≤ i} min(1, (m - j + 1) p₍ⱼ₎)`.
//! - `significant`: `p_value < alpha` (with `--holm`: `p_holm < alpha`).
//! - `acc_norm` (choice tasks) holds the same fields for `acc_norm`; `loglik` (language modelling:
//!   the continuation's; choice tasks: the gold choice's) holds `a`, `b`, `diff`, `diff_stderr` of
//!   the per-example log-likelihood (natural log, comparable across tokenizers: both are the
//!   probability of the same text).
//! - `perplexity` (language modelling): lm-eval's `exp(-mean loglik)` of each run (`a`, `b`), with
//!   bootstrap standard errors (`icl_metrics::bootstrap_stderr`, `--bootstrap-iters` resamples of
//!   the rows, default 10 000, seeded counter stream `--bootstrap-seed`), and `diff = a - b` with
//!   the paired bootstrap's: the rows `(loglik_a, loglik_b)` are resampled together, so the shared
//!   examples cancel out of the difference.
//!
//! Choice tasks' `acc_mean_nll` is not in the samples, so it is not compared; generation tasks are
//! compared on `correct` (not on the texts). Language-modelling and generation lines carry nothing
//! that identifies the data (no `gold`), so a task of the same name over other data with the same
//! row indices is not detected.

use anyhow::{anyhow, bail, Context, Result};
use icl_metrics::{bootstrap_stderr, Bootstrap};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Samples of the first run: a `--log-samples` JSONL file, or a folder holding `samples.jsonl`.
    pub a: PathBuf,
    /// Samples of the second run (as A).
    pub b: PathBuf,
    /// Significance level of the `sig` column.
    #[arg(long, default_value_t = 0.05)]
    pub alpha: f64,
    /// Add Holm-corrected p-values over the tasks; `sig` then uses them.
    #[arg(long)]
    pub holm: bool,
    /// Compare the tasks and rows both files hold, leaving out (and counting) the others, instead
    /// of failing on them.
    #[arg(long)]
    pub intersect: bool,
    /// Resamples of the perplexity bootstrap (language-modelling tasks); 0 leaves its stderrs out.
    #[arg(long, default_value_t = 10_000)]
    pub bootstrap_iters: usize,
    /// Seed of the perplexity bootstrap (a counter-based stream: the same figures on any machine).
    #[arg(long, default_value_t = 0)]
    pub bootstrap_seed: u64,
    /// Write the comparison as JSON (`{"tasks": {NAME: {"n", "diff", "diff_stderr", "a_only",
    /// "b_only", "p_value", ...}}}`).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// The kind of task a samples line belongs to, from its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LanguageModeling,
    Choice,
    Generation,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::LanguageModeling => "language_modeling",
            Self::Choice => "choice",
            Self::Generation => "generation",
        }
    }

    /// Name of the primary score.
    fn metric(self) -> &'static str {
        match self {
            Self::LanguageModeling | Self::Choice => "acc",
            Self::Generation => "exact_match",
        }
    }
}

/// One example's scores.
#[derive(Debug, Clone)]
struct Example {
    line: usize,
    kind: Kind,
    correct: bool,
    correct_norm: Option<bool>,
    loglik: Option<f64>,
    /// (gold, number of choices) of choice tasks.
    choice: Option<(u64, usize)>,
}

/// The examples of one task in one file, by row index.
#[derive(Debug)]
struct TaskRows {
    first_line: usize,
    rows: BTreeMap<u64, Example>,
}

/// A samples file, by task.
#[derive(Debug)]
struct Samples {
    path: PathBuf,
    tasks: BTreeMap<String, TaskRows>,
}

/// A folder means its `samples.jsonl`.
fn samples_path(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        let file = path.join("samples.jsonl");
        if !file.is_file() {
            bail!("{}: a folder without samples.jsonl (write one with `icl eval --log-samples`)", path.display());
        }
        Ok(file)
    } else {
        Ok(path.to_owned())
    }
}

fn read_samples(path: &Path) -> Result<Samples> {
    let path = samples_path(path)?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut tasks: BTreeMap<String, TaskRows> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{line_no}", path.display());
        let value: Value = serde_json::from_str(line).map_err(|e| anyhow!("{}: malformed JSON: {e}", at()))?;
        let (task, index, example) = parse_line(&value, line_no).map_err(|e| anyhow!("{}: {e}", at()))?;
        let entry =
            tasks.entry(task.clone()).or_insert_with(|| TaskRows { first_line: line_no, rows: BTreeMap::new() });
        if let Some(first) = entry.rows.values().next() {
            if first.kind != example.kind {
                bail!(
                    "{}: task `{task}` is {} here but {} at line {}",
                    at(),
                    example.kind.name(),
                    first.kind.name(),
                    first.line
                );
            }
        }
        if let Some(earlier) = entry.rows.get(&index) {
            bail!("{}: field `index`: row {index} of task `{task}` again (first at line {})", at(), earlier.line);
        }
        entry.rows.insert(index, example);
    }
    if tasks.is_empty() {
        bail!("{}: no samples (expected one JSON line per example from `icl eval --log-samples`)", path.display());
    }
    Ok(Samples { path, tasks })
}

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a Value> {
    v.get(name).ok_or_else(|| anyhow!("field `{name}`: missing"))
}

fn bool_field(v: &Value, name: &str) -> Result<bool> {
    field(v, name)?.as_bool().ok_or_else(|| anyhow!("field `{name}`: expected true or false, got {}", v[name]))
}

fn uint_field(v: &Value, name: &str) -> Result<u64> {
    field(v, name)?.as_u64().ok_or_else(|| anyhow!("field `{name}`: expected a non-negative integer, got {}", v[name]))
}

/// A finite number (serde_json writes a non-finite one as `null`, refused here: no mean survives it).
fn number(v: &Value, name: &str) -> Result<f64> {
    v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| anyhow!("field `{name}`: expected a number, got {v}"))
}

/// `(task, index, example)` of one samples line.
fn parse_line(v: &Value, line: usize) -> Result<(String, u64, Example)> {
    if !v.is_object() {
        bail!("expected a JSON object, got {v}");
    }
    let task =
        field(v, "task")?.as_str().ok_or_else(|| anyhow!("field `task`: expected a string, got {}", v["task"]))?;
    let index = uint_field(v, "index")?;
    if v.get("n_windows").is_some() {
        bail!("field `n_windows`: a perplexity document; icl compare does not compare perplexity tasks (no 0/1 score)");
    }
    let example = if v.get("is_greedy").is_some() || v.get("loglik").is_some() {
        Example {
            line,
            kind: Kind::LanguageModeling,
            correct: bool_field(v, "is_greedy")?,
            correct_norm: None,
            loglik: Some(number(field(v, "loglik")?, "loglik")?),
            choice: None,
        }
    } else if v.get("logliks").is_some() || v.get("pred").is_some() {
        let logliks = field(v, "logliks")?
            .as_array()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| anyhow!("field `logliks`: expected a non-empty list of numbers, got {}", v["logliks"]))?;
        let logliks: Vec<f64> = logliks.iter().map(|x| number(x, "logliks")).collect::<Result<_>>()?;
        let k = logliks.len();
        let in_range = |name: &str| -> Result<u64> {
            let x = uint_field(v, name)?;
            if x as usize >= k {
                bail!("field `{name}`: {x} is out of range for {k} choices");
            }
            Ok(x)
        };
        let (gold, pred, pred_norm) = (in_range("gold")?, in_range("pred")?, in_range("pred_norm")?);
        Example {
            line,
            kind: Kind::Choice,
            correct: pred == gold,
            correct_norm: Some(pred_norm == gold),
            loglik: Some(logliks[gold as usize]),
            choice: Some((gold, k)),
        }
    } else if v.get("correct").is_some() {
        Example {
            line,
            kind: Kind::Generation,
            correct: bool_field(v, "correct")?,
            correct_norm: None,
            loglik: None,
            choice: None,
        }
    } else {
        bail!("none of the fields `is_greedy` (language modelling), `logliks` (choice) or `correct` (generation): not an icl samples line");
    };
    Ok((task.to_owned(), index, example))
}

/// `log(exp(a) + exp(b))` without overflow.
fn log_add_exp(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        hi
    } else {
        hi + (lo - hi).exp().ln_1p()
    }
}

/// McNemar's exact two-sided p-value for `a_only` and `b_only` discordant pairs:
/// `min(1, 2 · P[X ≤ min(a_only, b_only)])`, `X ~ Bin(a_only + b_only, 1/2)`; 1 with no discordant pair.
pub fn mcnemar_exact(a_only: u64, b_only: u64) -> f64 {
    let m = a_only + b_only;
    let k = a_only.min(b_only);
    // log C(m, j) by the recurrence C(m, j + 1) = C(m, j) (m - j) / (j + 1); log-sum-exp of the terms.
    let (mut log_c, mut log_sum) = (0.0f64, 0.0f64);
    for j in 0..k {
        log_c += ((m - j) as f64).ln() - ((j + 1) as f64).ln();
        log_sum = log_add_exp(log_sum, log_c);
    }
    let log_p = std::f64::consts::LN_2 + log_sum - m as f64 * std::f64::consts::LN_2;
    log_p.exp().min(1.0)
}

/// Holm's step-down adjusted p-values, in the input order.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&i, &j| p[i].total_cmp(&p[j]));
    let mut adjusted = vec![0.0; m];
    let mut running = 0.0f64;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p[i]).min(1.0));
        adjusted[i] = running;
    }
    adjusted
}

/// lm-eval's `mean_stderr` of a list (`None` for fewer than two values).
fn mean_stderr(values: &[f64]) -> Result<Option<f64>> {
    Ok(icl_metrics::mean_stderr(&tch::Tensor::from_slice(values))?)
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// Paired statistics of one 0/1 score.
#[derive(Debug, Clone, PartialEq)]
struct Paired {
    a: f64,
    a_stderr: Option<f64>,
    b: f64,
    b_stderr: Option<f64>,
    diff: f64,
    diff_stderr: Option<f64>,
    a_only: u64,
    b_only: u64,
    p_value: f64,
}

fn paired(pairs: &[(bool, bool)]) -> Result<Paired> {
    let a: Vec<f64> = pairs.iter().map(|p| f64::from(u8::from(p.0))).collect();
    let b: Vec<f64> = pairs.iter().map(|p| f64::from(u8::from(p.1))).collect();
    let d: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
    let a_only = pairs.iter().filter(|p| p.0 && !p.1).count() as u64;
    let b_only = pairs.iter().filter(|p| !p.0 && p.1).count() as u64;
    Ok(Paired {
        a: mean(&a),
        a_stderr: mean_stderr(&a)?,
        b: mean(&b),
        b_stderr: mean_stderr(&b)?,
        diff: mean(&d),
        diff_stderr: mean_stderr(&d)?,
        a_only,
        b_only,
        p_value: mcnemar_exact(a_only, b_only),
    })
}

impl Paired {
    fn to_json(&self) -> Map<String, Value> {
        let v = json!({
            "a": self.a, "a_stderr": self.a_stderr, "b": self.b, "b_stderr": self.b_stderr,
            "diff": self.diff, "diff_stderr": self.diff_stderr, "a_only": self.a_only, "b_only": self.b_only,
            "p_value": self.p_value,
        });
        v.as_object().cloned().unwrap_or_default()
    }
}

/// Mean log-likelihoods and their paired difference.
#[derive(Debug, Clone, PartialEq)]
struct LoglikDiff {
    a: f64,
    b: f64,
    diff: f64,
    diff_stderr: Option<f64>,
}

/// lm-eval's perplexity `exp(-mean loglik)` of both runs and their difference, with bootstrap
/// standard errors (`None` with `--bootstrap-iters 0`).
#[derive(Debug, Clone, PartialEq)]
struct PerplexityDiff {
    a: f64,
    a_stderr: Option<f64>,
    b: f64,
    b_stderr: Option<f64>,
    diff: f64,
    diff_stderr: Option<f64>,
}

/// The paired bootstrap: rows `(loglik_a, loglik_b)` resampled together, so the stderr of the
/// difference accounts for the runs sharing their examples.
fn perplexity_diff(la: &[f64], lb: &[f64], bootstrap: &Bootstrap) -> Result<PerplexityDiff> {
    let rows: Vec<f64> = la.iter().zip(lb).flat_map(|(x, y)| [*x, *y]).collect();
    let rows = tch::Tensor::from_slice(&rows).view([la.len() as i64, 2]);
    let ppl = |m: &tch::Tensor, c: i64| m.f_select(1, c)?.f_neg()?.f_exp();
    let stderr = |f: &dyn Fn(&tch::Tensor) -> Result<tch::Tensor, tch::TchError>| -> Result<Option<f64>> {
        if bootstrap.iters == 0 {
            return Ok(None);
        }
        Ok(bootstrap_stderr(&rows, bootstrap, |m| Ok(f(m)?))?)
    };
    let (a, b) = ((-mean(la)).exp(), (-mean(lb)).exp());
    Ok(PerplexityDiff {
        a,
        a_stderr: stderr(&|m| ppl(m, 0))?,
        b,
        b_stderr: stderr(&|m| ppl(m, 1))?,
        diff: a - b,
        diff_stderr: stderr(&|m| ppl(m, 0)?.f_sub(&ppl(m, 1)?))?,
    })
}

/// One compared task.
#[derive(Debug)]
struct TaskComparison {
    name: String,
    kind: Kind,
    n: usize,
    score: Paired,
    acc_norm: Option<Paired>,
    loglik: Option<LoglikDiff>,
    perplexity: Option<PerplexityDiff>,
    rows_only_in_a: usize,
    rows_only_in_b: usize,
    p_holm: Option<f64>,
}

/// Where a row is in a file, for messages.
fn at(s: &Samples, line: usize) -> String {
    format!("{}:{line}", s.path.display())
}

fn compare_task(
    name: &str,
    a: &Samples,
    b: &Samples,
    intersect: bool,
    bootstrap: &Bootstrap,
) -> Result<TaskComparison> {
    let (ta, tb) = (&a.tasks[name], &b.tasks[name]);
    let (ka, kb) = (ta.rows.values().next(), tb.rows.values().next());
    if let (Some(ea), Some(eb)) = (ka, kb) {
        if ea.kind != eb.kind {
            bail!(
                "different tasks named `{name}`: {} is {} ({}) but {} is {} ({})",
                at(a, ea.line),
                ea.kind.name(),
                ea.kind.metric(),
                at(b, eb.line),
                eb.kind.name(),
                eb.kind.metric()
            );
        }
    }
    let mut common = Vec::new();
    let (mut only_a, mut only_b) = (0, 0);
    for (index, ea) in &ta.rows {
        match tb.rows.get(index) {
            Some(eb) => common.push((ea, eb)),
            None if intersect => only_a += 1,
            None => bail!(
                "{}: field `index`: row {index} of task `{name}` is not in {} (--intersect compares the common rows)",
                at(a, ea.line),
                b.path.display()
            ),
        }
    }
    for (index, eb) in &tb.rows {
        if !ta.rows.contains_key(index) {
            if !intersect {
                bail!(
                    "{}: field `index`: row {index} of task `{name}` is not in {} (--intersect compares the common rows)",
                    at(b, eb.line),
                    a.path.display()
                );
            }
            only_b += 1;
        }
    }
    if common.is_empty() {
        bail!("task `{name}`: no row in common between {} and {}", a.path.display(), b.path.display());
    }
    for (ea, eb) in &common {
        if let (Some((ga, ca)), Some((gb, cb))) = (ea.choice, eb.choice) {
            if ca != cb {
                bail!(
                    "different tasks named `{name}`: field `logliks` has {ca} choices at {} but {cb} at {}",
                    at(a, ea.line),
                    at(b, eb.line)
                );
            }
            if ga != gb {
                bail!(
                    "different tasks named `{name}`: field `gold` is {ga} at {} but {gb} at {}",
                    at(a, ea.line),
                    at(b, eb.line)
                );
            }
        }
    }
    let kind = common[0].0.kind;
    let score = paired(&common.iter().map(|(x, y)| (x.correct, y.correct)).collect::<Vec<_>>())?;
    let acc_norm = match kind {
        Kind::Choice => Some(paired(
            &common
                .iter()
                .map(|(x, y)| (x.correct_norm.unwrap_or_default(), y.correct_norm.unwrap_or_default()))
                .collect::<Vec<_>>(),
        )?),
        _ => None,
    };
    let (mut loglik, mut perplexity) = (None, None);
    if kind != Kind::Generation {
        let la: Vec<f64> = common.iter().map(|(x, _)| x.loglik.unwrap_or_default()).collect();
        let lb: Vec<f64> = common.iter().map(|(_, y)| y.loglik.unwrap_or_default()).collect();
        let d: Vec<f64> = la.iter().zip(&lb).map(|(x, y)| x - y).collect();
        loglik = Some(LoglikDiff { a: mean(&la), b: mean(&lb), diff: mean(&d), diff_stderr: mean_stderr(&d)? });
        if kind == Kind::LanguageModeling {
            perplexity = Some(perplexity_diff(&la, &lb, bootstrap)?);
        }
    }
    Ok(TaskComparison {
        name: name.to_owned(),
        kind,
        n: common.len(),
        score,
        acc_norm,
        loglik,
        perplexity,
        rows_only_in_a: only_a,
        rows_only_in_b: only_b,
        p_holm: None,
    })
}

/// The comparison of two samples files: every common task, and the tasks only one holds.
#[derive(Debug)]
struct Comparison {
    tasks: Vec<TaskComparison>,
    only_in_a: Vec<String>,
    only_in_b: Vec<String>,
}

fn compare(a: &Samples, b: &Samples, intersect: bool, with_holm: bool, bootstrap: &Bootstrap) -> Result<Comparison> {
    let only = |x: &Samples, y: &Samples| -> Vec<String> {
        x.tasks.keys().filter(|t| !y.tasks.contains_key(*t)).cloned().collect()
    };
    let (only_in_a, only_in_b) = (only(a, b), only(b, a));
    if !intersect {
        for (x, y, names) in [(a, b, &only_in_a), (b, a, &only_in_b)] {
            if let Some(t) = names.first() {
                bail!(
                    "{}: field `task`: task `{t}` is not in {} (--intersect compares the common tasks)",
                    at(x, x.tasks[t].first_line),
                    y.path.display()
                );
            }
        }
    }
    let mut tasks = a
        .tasks
        .keys()
        .filter(|t| b.tasks.contains_key(*t))
        .map(|t| compare_task(t, a, b, intersect, bootstrap))
        .collect::<Result<Vec<_>>>()?;
    if tasks.is_empty() {
        bail!("{} and {} have no task in common", a.path.display(), b.path.display());
    }
    if with_holm {
        let adjusted = holm(&tasks.iter().map(|t| t.score.p_value).collect::<Vec<_>>());
        for (t, p) in tasks.iter_mut().zip(adjusted) {
            t.p_holm = Some(p);
        }
    }
    Ok(Comparison { tasks, only_in_a, only_in_b })
}

impl TaskComparison {
    fn significant(&self, alpha: f64) -> bool {
        self.p_holm.unwrap_or(self.score.p_value) < alpha
    }

    fn to_json(&self, alpha: f64) -> Value {
        let mut v = Map::new();
        v.insert("type".into(), json!(self.kind.name()));
        v.insert("metric".into(), json!(self.kind.metric()));
        v.insert("n".into(), json!(self.n));
        v.extend(self.score.to_json());
        if let Some(p) = self.p_holm {
            v.insert("p_holm".into(), json!(p));
        }
        v.insert("significant".into(), json!(self.significant(alpha)));
        if let Some(norm) = &self.acc_norm {
            let mut norm = norm.to_json();
            norm.insert("significant".into(), json!(norm["p_value"].as_f64().is_some_and(|p| p < alpha)));
            v.insert("acc_norm".into(), Value::Object(norm));
        }
        if let Some(l) = &self.loglik {
            v.insert("loglik".into(), json!({"a": l.a, "b": l.b, "diff": l.diff, "diff_stderr": l.diff_stderr}));
        }
        if let Some(p) = &self.perplexity {
            let ppl = json!({
                "a": p.a, "a_stderr": p.a_stderr, "b": p.b, "b_stderr": p.b_stderr,
                "diff": p.diff, "diff_stderr": p.diff_stderr,
            });
            v.insert("perplexity".into(), ppl);
        }
        v.insert("rows_only_in_a".into(), json!(self.rows_only_in_a));
        v.insert("rows_only_in_b".into(), json!(self.rows_only_in_b));
        Value::Object(v)
    }
}

fn cell(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "-".to_owned(), |x| format!("{x:.digits$}"))
}

fn p_cell(p: f64) -> String {
    if p < 1e-4 {
        format!("{p:.1e}")
    } else {
        format!("{p:.4}")
    }
}

/// The printed table: one line per task and score (acc_norm on a line of its own).
fn table(c: &Comparison, alpha: f64, with_holm: bool) -> String {
    let mut header =
        vec!["task", "metric", "n", "A", "B", "diff", "±se", "a_only", "b_only", "p", "sig", "Δloglik", "±se"];
    if with_holm {
        header.insert(10, "p_holm");
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut push = |mut r: Vec<String>, p_holm: String| {
        if with_holm {
            r.insert(10, p_holm);
        }
        rows.push(r);
    };
    let dash = || "-".to_owned();
    for t in &c.tasks {
        let score_row = |metric: &str, s: &Paired, sig: bool, loglik: Option<&LoglikDiff>| {
            vec![
                t.name.clone(),
                metric.to_owned(),
                t.n.to_string(),
                format!("{:.4}", s.a),
                format!("{:.4}", s.b),
                format!("{:+.4}", s.diff),
                cell(s.diff_stderr, 4),
                s.a_only.to_string(),
                s.b_only.to_string(),
                p_cell(s.p_value),
                if sig { "*".into() } else { String::new() },
                loglik.map_or_else(dash, |l| format!("{:+.4}", l.diff)),
                cell(loglik.and_then(|l| l.diff_stderr), 4),
            ]
        };
        let main = score_row(t.kind.metric(), &t.score, t.significant(alpha), t.loglik.as_ref());
        push(main, t.p_holm.map_or_else(dash, p_cell));
        if let Some(norm) = &t.acc_norm {
            push(score_row("acc_norm", norm, norm.p_value < alpha, None), dash());
        }
        if let Some(p) = &t.perplexity {
            let mut r = vec![t.name.clone(), "perplexity".into(), t.n.to_string()];
            r.extend([format!("{:.2}", p.a), format!("{:.2}", p.b), format!("{:+.2}", p.diff), cell(p.diff_stderr, 2)]);
            r.extend(std::iter::repeat_with(dash).take(6));
            push(r, dash());
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).chain([header[c].chars().count()]).max().unwrap_or(0))
        .collect();
    let format_line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(c, s)| {
                let pad = widths[c].saturating_sub(s.chars().count());
                if c < 2 {
                    format!("{s}{}", " ".repeat(pad))
                } else {
                    format!("{}{s}", " ".repeat(pad))
                }
            })
            .collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = format_line(&header.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
    out += &format_line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>());
    for r in &rows {
        out += &format_line(r);
    }
    let test = if with_holm { "Holm-corrected McNemar" } else { "McNemar exact" };
    let _ = writeln!(
        out,
        "diff = A - B (paired, ± its standard error; perplexity: paired bootstrap); * = {test} p < {alpha}; \
         Δloglik = mean log-likelihood A - B"
    );
    out
}

fn write_json(path: &Path, doc: &Value) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, serde_json::to_string_pretty(doc)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn run(args: &CompareArgs) -> Result<()> {
    if !(args.alpha > 0.0 && args.alpha < 1.0) {
        bail!("--alpha {} is not between 0 and 1", args.alpha);
    }
    let a = read_samples(&args.a)?;
    let b = read_samples(&args.b)?;
    let bootstrap = Bootstrap { iters: args.bootstrap_iters, seed: args.bootstrap_seed, ..Default::default() };
    let c = compare(&a, &b, args.intersect, args.holm, &bootstrap)?;
    for (names, path) in [(&c.only_in_a, &a.path), (&c.only_in_b, &b.path)] {
        if !names.is_empty() {
            eprintln!("note: left out task(s) only in {}: {}", path.display(), names.join(", "));
        }
    }
    for t in &c.tasks {
        if t.rows_only_in_a + t.rows_only_in_b > 0 {
            eprintln!(
                "note: task `{}` compared on the {} rows in both files ({} only in A, {} only in B left out)",
                t.name, t.n, t.rows_only_in_a, t.rows_only_in_b
            );
        }
    }
    print!("A: {}\nB: {}\n\n{}", a.path.display(), b.path.display(), table(&c, args.alpha, args.holm));
    if let Some(out) = &args.output {
        let tasks: Map<String, Value> = c.tasks.iter().map(|t| (t.name.clone(), t.to_json(args.alpha))).collect();
        let doc = json!({
            "a": a.path, "b": b.path, "alpha": args.alpha, "holm": args.holm, "intersect": args.intersect,
            "only_in_a": c.only_in_a, "only_in_b": c.only_in_b, "tasks": tasks,
        });
        write_json(out, &doc)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// P[X <= k] for X ~ Bin(m, 1/2) by exact integer sums (small m).
    fn binomial_cdf_half(m: u64, k: u64) -> f64 {
        let mut c = 1u128;
        let mut total = 0u128;
        for j in 0..=k {
            total += c;
            c = c * u128::from(m - j) / u128::from(j + 1);
        }
        total as f64 / 2f64.powi(m as i32)
    }

    #[test]
    fn mcnemar_matches_exact_binomial_sums() {
        // By hand: (1, 4): m = 5, P[X <= 1] = (1 + 5) / 32, p = 12 / 32.
        assert!((mcnemar_exact(1, 4) - 0.375).abs() < 1e-15);
        assert!((mcnemar_exact(4, 1) - 0.375).abs() < 1e-15);
        // (0, 6): 2 / 64. (0, 0), (3, 3), (2, 3): 1 (capped).
        assert!((mcnemar_exact(0, 6) - 2.0 / 64.0).abs() < 1e-15);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(3, 3), 1.0);
        assert_eq!(mcnemar_exact(2, 3), 1.0);
        // (2, 10): m = 12, P[X <= 2] = (1 + 12 + 66) / 4096, p = 158 / 4096 (scipy: 0.03857421875).
        assert!((mcnemar_exact(2, 10) - 0.03857421875).abs() < 1e-15);
        for m in 1..60u64 {
            for k in 0..=m / 2 {
                let expected = (2.0 * binomial_cdf_half(m, k)).min(1.0);
                let got = mcnemar_exact(k, m - k);
                assert!((got - expected).abs() <= 1e-12 * expected.max(1e-300), "({k}, {}) {got} vs {expected}", m - k);
            }
        }
    }

    #[test]
    fn mcnemar_handles_large_counts_without_overflow() {
        // 2^-2000 underflows to 0 but nothing overflows or turns NaN.
        assert_eq!(mcnemar_exact(0, 2000), 0.0);
        // Balanced large counts: p close to 1; a 5 % imbalance on 100 000 pairs is decisive.
        let p = mcnemar_exact(50_000, 50_001);
        assert!(p > 0.99 && p <= 1.0, "{p}");
        let p = mcnemar_exact(48_750, 51_250);
        assert!(p > 0.0 && p < 1e-10, "{p}");
        // Normal approximation: z = (k + 0.5 - m/2) / sqrt(m/4) for (4900, 5100): z = -1.99, p ~ 0.0466.
        let p = mcnemar_exact(4900, 5100);
        assert!((p - 0.0466).abs() < 0.001, "{p}");
    }

    #[test]
    fn holm_steps_down_and_stays_monotone() {
        let adjusted = holm(&[0.01, 0.04, 0.03, 0.5]);
        // Sorted 0.01, 0.03, 0.04, 0.5 -> 4 * 0.01, max(0.04, 3 * 0.03), max(0.09, 2 * 0.04), 0.5.
        let expected = [0.04, 0.09, 0.09, 0.5];
        for (a, e) in adjusted.iter().zip(expected) {
            assert!((a - e).abs() < 1e-15, "{adjusted:?}");
        }
        assert_eq!(holm(&[0.6, 0.7]), vec![1.0, 1.0]);
        assert!(holm(&[]).is_empty());
    }

    #[test]
    fn perplexity_difference_uses_a_paired_bootstrap() {
        let la: Vec<f64> = (0..50).map(|i| -1.0 - f64::from(i % 7) * 0.5).collect();
        let opts = Bootstrap { iters: 2000, ..Default::default() };
        let same = perplexity_diff(&la, &la, &opts).unwrap();
        assert_eq!((same.diff, same.diff_stderr), (0.0, Some(0.0)));
        assert_eq!(same.a_stderr, same.b_stderr);
        assert!(same.a_stderr.unwrap() > 0.0);
        assert!((same.a - (-la.iter().sum::<f64>() / 50.0).exp()).abs() < 1e-12);
        // B one nat worse on every example: ppl_b = e * ppl_a, and the difference's stderr is
        // (e - 1) times A's (same resamples, seed 0).
        let lb: Vec<f64> = la.iter().map(|x| x - 1.0).collect();
        let shifted = perplexity_diff(&la, &lb, &opts).unwrap();
        let e = std::f64::consts::E;
        assert!((shifted.b / shifted.a - e).abs() < 1e-12);
        let (se_a, se_d) = (shifted.a_stderr.unwrap(), shifted.diff_stderr.unwrap());
        assert!((se_d / se_a - (e - 1.0)).abs() < 1e-9, "{se_d} vs {se_a}");
        let off = perplexity_diff(&la, &lb, &NO_BOOTSTRAP).unwrap();
        assert_eq!((off.a_stderr, off.diff_stderr), (None, None));
    }

    #[test]
    fn paired_stderr_uses_the_differences() {
        // A: 1 1 0 1, B: 1 0 0 0 -> d = 0 1 0 1, mean 0.5, sd sqrt(1/3), se sqrt(1/3) / 2.
        let s = paired(&[(true, true), (true, false), (false, false), (true, false)]).unwrap();
        assert_eq!((s.a_only, s.b_only), (2, 0));
        assert_eq!(s.diff, 0.5);
        assert!((s.diff_stderr.unwrap() - (1.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-15);
        assert!((s.a_stderr.unwrap() - 0.25).abs() < 1e-15);
        assert!((s.p_value - 0.5).abs() < 1e-15, "2 * P[Bin(2, 1/2) <= 0]");
        let one = paired(&[(true, false)]).unwrap();
        assert_eq!(one.diff_stderr, None);
    }

    const NO_BOOTSTRAP: Bootstrap =
        Bootstrap { iters: 0, seed: 0, resampler: icl_metrics::Resampler::Counter, threads: 1 };

    fn samples(name: &str, lines: &[Value]) -> Samples {
        let text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
        let path = PathBuf::from(name);
        let mut tasks: BTreeMap<String, TaskRows> = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let (task, index, e) = parse_line(&serde_json::from_str(line).unwrap(), i + 1).unwrap();
            tasks
                .entry(task)
                .or_insert_with(|| TaskRows { first_line: i + 1, rows: BTreeMap::new() })
                .rows
                .insert(index, e);
        }
        Samples { path, tasks }
    }

    fn mc(index: u64, pred: u64, pred_norm: u64, gold: u64) -> Value {
        json!({"task": "mc", "index": index, "logliks": [-1.0, -2.0], "n_tokens": [1, 1], "pred": pred, "pred_norm": pred_norm, "gold": gold})
    }

    #[test]
    fn choice_tasks_compare_acc_acc_norm_and_gold_loglik() {
        let a = samples("a", &[mc(0, 0, 0, 0), mc(1, 1, 0, 1), mc(2, 0, 1, 1)]);
        let b = samples("b", &[mc(0, 1, 0, 0), mc(1, 1, 1, 1), mc(2, 1, 1, 1)]);
        let c = compare(&a, &b, false, true, &Bootstrap::default()).unwrap();
        let t = &c.tasks[0];
        assert_eq!((t.kind, t.n), (Kind::Choice, 3));
        // acc: A 1 1 0, B 0 1 1.
        assert_eq!((t.score.a_only, t.score.b_only), (1, 1));
        // acc_norm: A 1 0 1, B 1 1 1.
        let norm = t.acc_norm.as_ref().unwrap();
        assert_eq!((norm.a_only, norm.b_only), (0, 1));
        // gold logliks: both files -1, -2, -2.
        assert_eq!(t.loglik.as_ref().unwrap().diff, 0.0);
        assert_eq!(t.p_holm, Some(1.0));
        let j = t.to_json(0.05);
        for key in ["n", "diff", "diff_stderr", "a_only", "b_only", "p_value", "p_holm", "acc_norm", "loglik"] {
            assert!(j.get(key).is_some(), "{key}: {j}");
        }
    }

    #[test]
    fn mismatches_are_errors_naming_file_line_and_field() {
        let a = samples("a.jsonl", &[mc(0, 0, 0, 0), mc(1, 1, 0, 1)]);
        let gold = samples("b.jsonl", &[mc(0, 0, 0, 0), mc(1, 0, 0, 0)]);
        let e = compare(&a, &gold, true, false, &NO_BOOTSTRAP).unwrap_err().to_string();
        assert!(e.contains("a.jsonl:2") && e.contains("b.jsonl:2") && e.contains("`gold`"), "{e}");
        let missing = samples("b.jsonl", &[mc(0, 0, 0, 0)]);
        let e = compare(&a, &missing, false, false, &NO_BOOTSTRAP).unwrap_err().to_string();
        assert!(e.contains("a.jsonl:2") && e.contains("row 1") && e.contains("b.jsonl"), "{e}");
        let c = compare(&a, &missing, true, false, &NO_BOOTSTRAP).unwrap();
        assert_eq!((c.tasks[0].n, c.tasks[0].rows_only_in_a), (1, 1));
        let lm =
            samples("b.jsonl", &[json!({"task": "mc", "index": 0, "loglik": -1.0, "is_greedy": true, "n_tokens": 1})]);
        let e = compare(&a, &lm, true, false, &NO_BOOTSTRAP).unwrap_err().to_string();
        assert!(e.contains("different tasks") && e.contains("language_modeling"), "{e}");
        let other =
            samples("b.jsonl", &[json!({"task": "gen", "index": 0, "output": "x", "correct": true, "n_tokens": 1})]);
        let e = compare(&a, &other, false, false, &NO_BOOTSTRAP).unwrap_err().to_string();
        assert!(e.contains("a.jsonl:1") && e.contains("task `mc`"), "{e}");
        let e = compare(&a, &other, true, false, &NO_BOOTSTRAP).unwrap_err().to_string();
        assert!(e.contains("no task in common"), "{e}");
    }

    #[test]
    fn bad_lines_are_reported_not_panicked_on() {
        let cases = [
            (json!([1, 2]), "JSON object"),
            (json!({"index": 0, "correct": true}), "field `task`: missing"),
            (json!({"task": "t", "index": -1, "correct": true}), "field `index`"),
            (json!({"task": "t", "index": 0}), "not an icl samples line"),
            (json!({"task": "t", "index": 0, "loglik": -1.0}), "field `is_greedy`: missing"),
            (
                json!({"task": "t", "index": 0, "loglik": -1.0, "n_windows": 2}),
                "field `n_windows`: a perplexity document",
            ),
            (json!({"task": "t", "index": 0, "loglik": "x", "is_greedy": true}), "field `loglik`"),
            (json!({"task": "t", "index": 0, "logliks": [], "pred": 0, "pred_norm": 0, "gold": 0}), "field `logliks`"),
            (
                json!({"task": "t", "index": 0, "logliks": [-1.0], "pred": 0, "pred_norm": 0, "gold": 3}),
                "field `gold`: 3",
            ),
            (json!({"task": "t", "index": 0, "correct": 1}), "field `correct`"),
        ];
        for (line, expected) in cases {
            let e = parse_line(&line, 1).unwrap_err().to_string();
            assert!(e.contains(expected), "{line}: {e}");
        }
    }

    #[test]
    fn table_marks_significant_tasks() {
        let lines: Vec<Value> =
            (0..30).map(|i| json!({"task": "gen", "index": i, "output": "", "correct": i < 15})).collect();
        let a = samples("a", &lines);
        let lines: Vec<Value> =
            (0..30).map(|i| json!({"task": "gen", "index": i, "output": "", "correct": false})).collect();
        let b = samples("b", &lines);
        let c = compare(&a, &b, false, false, &NO_BOOTSTRAP).unwrap();
        let t = table(&c, 0.05, false);
        // 15 discordant pairs all for A: p = 2 / 2^15.
        assert!((c.tasks[0].score.p_value - 2.0 / 32768.0).abs() < 1e-18);
        assert!(t.contains("exact_match") && t.contains("+0.5000") && t.contains('*'), "{t}");
    }
}
