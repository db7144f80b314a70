//! Aggregate results of one task, as `results.json` lists them.

use serde::Serialize;

/// Aggregate results of one task; metrics that do not apply to its type are absent.
#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    #[serde(skip)]
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm: Option<f64>,
    /// Composer's rule: lowest mean per-token NLL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_mean_nll: Option<f64>,
    /// lm-eval's: `exp(-mean per-example log-likelihood)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    /// `exp(-total log-likelihood / total continuation tokens)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_perplexity: Option<f64>,
    /// Examples evaluated (skipped rows excluded).
    pub n: usize,
    pub num_fewshot: usize,
    /// Chance accuracy: the mean of `1 / options` (multiple choice, schema), 0 (language modelling).
    pub random_baseline: f64,
    pub seconds: f64,
    /// Input tokens processed (padding excluded).
    pub tokens: usize,
    pub tokens_per_second: f64,
    /// Requests whose input lost tokens on the left to fit the model.
    pub truncated: usize,
    /// Rows left out by `skip_bad_rows`, with the reason of each.
    pub skipped: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped_rows: Vec<SkippedRow>,
    /// FLOPs the task needs (distinct tokens, head at scored positions; see `CausalLm::forward_flops`).
    pub flops: f64,
    /// `flops / seconds`, in GFLOP/s.
    pub gflops_per_second: f64,
}

/// A row of a task file that could not be scored and was left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedRow {
    /// Row of the task file (0-based).
    pub index: usize,
    pub reason: String,
}

impl TaskReport {
    pub fn new(name: &str, kind: &'static str, n: usize, seconds: f64, tokens: usize, truncated: usize) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            acc: None,
            acc_norm: None,
            acc_mean_nll: None,
            perplexity: None,
            token_perplexity: None,
            n,
            num_fewshot: 0,
            random_baseline: 0.0,
            seconds,
            tokens,
            tokens_per_second: tokens as f64 / seconds.max(1e-9),
            truncated,
            skipped: 0,
            skipped_rows: Vec::new(),
            flops: 0.0,
            gflops_per_second: 0.0,
        }
    }

    pub fn set_flops(&mut self, flops: f64) {
        self.flops = flops;
        self.gflops_per_second = flops / self.seconds.max(1e-9) / 1e9;
    }

    /// The task's metrics by name (`acc`, `acc_norm`, ...), those that apply to its type, in a fixed
    /// order: what loggers record.
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        [
            ("acc", self.acc),
            ("acc_norm", self.acc_norm),
            ("acc_mean_nll", self.acc_mean_nll),
            ("perplexity", self.perplexity),
            ("token_perplexity", self.token_perplexity),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.map(|v| (name, v)))
        .collect()
    }
}
