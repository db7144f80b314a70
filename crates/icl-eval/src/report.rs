//! Aggregate results of one task, as `results.json` lists them.

use icl_metrics::{Bootstrap, Resampler};
use serde::Serialize;

/// The bootstrap behind `perplexity_stderr`: 1000 resamples of the per-example log-likelihoods
/// drawn from the counter stream with seed 1234, on one thread (the figure does not depend on the
/// thread count, the rank count or the machine). Fewer resamples than lm-eval's 100 000 keep
/// evaluation fast; the estimate's own relative noise is about `1 / sqrt(2 · 1000)` ≈ 2 %.
pub const PERPLEXITY_BOOTSTRAP: Bootstrap =
    Bootstrap { iters: 1000, seed: 1234, resampler: Resampler::Counter, threads: 1 };

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
    /// Perplexity tasks (lm-eval's `loglikelihood_rolling` metrics): `exp(-Σ loglik / Σ words)`,
    /// `exp(-Σ loglik / Σ bytes)` and `-Σ loglik / Σ bytes / ln 2` over the documents;
    /// `bits_per_byte` also for language modelling, over the continuations' UTF-8 bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub word_perplexity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub byte_perplexity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits_per_byte: Option<f64>,
    /// Generation tasks: share of outputs that start with an accepted answer after normalization
    /// (also reported as `acc`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
    /// Standard errors of the metrics above (absent when fewer than two examples): lm-eval's
    /// `mean_stderr`, `sqrt(Σ (xᵢ - x̄)² / (n - 1)) / sqrt(n)` over the per-example 0/1 values, for
    /// the means; a seeded bootstrap for `perplexity`, `word_perplexity`, `byte_perplexity` and
    /// `bits_per_byte` (see [`PERPLEXITY_BOOTSTRAP`]; documents or examples resampled whole).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_stderr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm_stderr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_mean_nll_stderr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity_stderr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match_stderr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub word_perplexity_stderr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub byte_perplexity_stderr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits_per_byte_stderr: Option<f64>,
    /// Generation tasks: the length cap used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    /// Examples evaluated (skipped rows excluded).
    pub n: usize,
    pub num_fewshot: usize,
    /// Chance accuracy: the mean of `1 / options` (multiple choice, schema), 0 (language modelling,
    /// generation).
    pub random_baseline: f64,
    pub seconds: f64,
    /// Input tokens processed (padding excluded; for generation tasks prompt plus generated tokens).
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
            exact_match: None,
            word_perplexity: None,
            byte_perplexity: None,
            bits_per_byte: None,
            acc_stderr: None,
            acc_norm_stderr: None,
            acc_mean_nll_stderr: None,
            perplexity_stderr: None,
            exact_match_stderr: None,
            word_perplexity_stderr: None,
            byte_perplexity_stderr: None,
            bits_per_byte_stderr: None,
            max_new_tokens: None,
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
            ("exact_match", self.exact_match),
            ("word_perplexity", self.word_perplexity),
            ("byte_perplexity", self.byte_perplexity),
            ("bits_per_byte", self.bits_per_byte),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.map(|v| (name, v)))
        .collect()
    }

    /// The standard error of metric `name` (as [`TaskReport::metrics`] names it), where one was
    /// computed.
    pub fn stderr(&self, name: &str) -> Option<f64> {
        match name {
            "acc" => self.acc_stderr,
            "acc_norm" => self.acc_norm_stderr,
            "acc_mean_nll" => self.acc_mean_nll_stderr,
            "perplexity" => self.perplexity_stderr,
            "exact_match" => self.exact_match_stderr,
            "word_perplexity" => self.word_perplexity_stderr,
            "byte_perplexity" => self.byte_perplexity_stderr,
            "bits_per_byte" => self.bits_per_byte_stderr,
            _ => None,
        }
    }
}
