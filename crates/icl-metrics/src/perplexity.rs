//! Document perplexity, as lm-evaluation-harness scores `loglikelihood_rolling` tasks (wikitext):
//! each document's log-likelihood `llᵢ` (natural log, summed over all its tokens) is weighted by its
//! word count `wᵢ` or UTF-8 byte count `bᵢ` (`lm_eval.api.task.ConfigurableTask.process_results`,
//! `count_words` = `len(re.split(r"\s+", text))`, `count_bytes` = `len(text.encode("utf-8"))`), and
//! the aggregations of `lm_eval.api.metrics` are ratios of sums over the documents:
//!
//! ```text
//! word_perplexity = exp(-Σ llᵢ / Σ wᵢ)    byte_perplexity = exp(-Σ llᵢ / Σ bᵢ)    bits_per_byte = -Σ llᵢ / Σ bᵢ / ln 2
//! ```
//!
//! The same ratio gives a language-modelling task's `bits_per_byte` over its continuations.
//! lm-eval reports no standard error for these aggregations (they are not in its bootstrappable
//! list); here [`ratio_stderr`] bootstraps the documents (pairs `(llᵢ, wᵢ)` resampled together) with
//! the seeded resampler of [`crate::stderr`], as `perplexity_stderr` does.

use crate::stderr::{bootstrap_stderr, Bootstrap};
use crate::{pack, unpack, Error, Mean, Reducible, Result};
use tch::{Kind, Tensor};

/// Python's `len(re.split(r"\s+", text))`: one more than the number of maximal runs of white space
/// (so a leading or trailing run counts an empty word, and `""` is one word). White space is
/// Python's `str.isspace()`, which `\s` matches for `str` patterns: Rust's White_Space plus the
/// ASCII separators U+001C..U+001F.
pub fn count_words(text: &str) -> usize {
    let mut words = 1;
    let mut in_space = false;
    for c in text.chars() {
        let space = c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
        if space && !in_space {
            words += 1;
        }
        in_space = space;
    }
    words
}

/// Python's `len(text.encode("utf-8"))`.
pub fn count_bytes(text: &str) -> usize {
    text.len()
}

/// Accumulated document metrics: log-likelihood per word and per byte, as `(sum, count)` pairs
/// that ranks can add up.
#[derive(Debug, Default, Clone)]
pub struct DocumentMetrics {
    /// `Σ llᵢ` counted in words.
    pub per_word: Mean,
    /// `Σ llᵢ` counted in bytes.
    pub per_byte: Mean,
}

impl DocumentMetrics {
    /// Adds documents: log-likelihoods `[n]` and their word and byte counts `[n]`.
    pub fn update(&mut self, loglik: &Tensor, n_words: &Tensor, n_bytes: &Tensor) -> Result<()> {
        if n_words.size() != loglik.size() || n_bytes.size() != loglik.size() {
            return Err(Error::Shape(format!(
                "{:?} log-likelihoods for {:?} word and {:?} byte counts",
                loglik.size(),
                n_words.size(),
                n_bytes.size()
            )));
        }
        self.per_word.update_weighted(loglik, n_words)?;
        self.per_byte.update_weighted(loglik, n_bytes)?;
        Ok(())
    }

    /// lm-eval's `word_perplexity`: `exp(-Σ ll / Σ words)`.
    pub fn word_perplexity(&self) -> f64 {
        (-self.per_word.value()).exp()
    }

    /// lm-eval's `byte_perplexity`: `exp(-Σ ll / Σ bytes)`.
    pub fn byte_perplexity(&self) -> f64 {
        (-self.per_byte.value()).exp()
    }

    /// lm-eval's `bits_per_byte`: `-Σ ll / Σ bytes / ln 2`.
    pub fn bits_per_byte(&self) -> f64 {
        -self.per_byte.value() / std::f64::consts::LN_2
    }
}

impl Reducible for DocumentMetrics {
    fn to_tensor(&self) -> Tensor {
        pack(&[&self.per_word, &self.per_byte])
    }
    fn from_tensor(t: &Tensor) -> Result<Self> {
        let [per_word, per_byte] = unpack::<2>(t)?;
        Ok(Self { per_word, per_byte })
    }
}

/// Which function of `r = Σ llᵢ / Σ wᵢ` a [`ratio_stderr`] is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RatioStatistic {
    /// `exp(-r)`: word or byte perplexity.
    Perplexity,
    /// `-r / ln 2`: bits per byte (with byte weights).
    Bits,
}

/// Bootstrap standard error of `exp(-Σ llᵢ / Σ wᵢ)` or `-Σ llᵢ / Σ wᵢ / ln 2` over documents with
/// log-likelihoods `logliks` `[n]` and weights `weights` `[n]` (words or bytes): each replicate
/// resamples the `n` pairs `(llᵢ, wᵢ)` together and takes the ratio of their means (= of their
/// sums). `None` when `n < 2`; a replicate whose weights sum to zero gives NaN.
pub fn ratio_stderr(
    logliks: &Tensor,
    weights: &Tensor,
    statistic: RatioStatistic,
    options: &Bootstrap,
) -> Result<Option<f64>> {
    if logliks.dim() != 1 || weights.size() != logliks.size() {
        return Err(Error::Shape(format!(
            "log-likelihoods {:?} and weights {:?} must both be [n]",
            logliks.size(),
            weights.size()
        )));
    }
    let rows = Tensor::f_stack(&[logliks.f_to_kind(Kind::Double)?, weights.f_to_kind(Kind::Double)?], 1)?;
    bootstrap_stderr(&rows, options, |means| {
        let ratio = means.f_select(1, 0)?.f_div(&means.f_select(1, 1)?)?;
        Ok(match statistic {
            RatioStatistic::Perplexity => ratio.f_neg()?.f_exp()?,
            RatioStatistic::Bits => ratio.f_div_scalar(-std::f64::consts::LN_2)?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stderr::Resampler;

    #[test]
    fn words_are_pythons_split_on_white_space() {
        // Python: len(re.split(r"\s+", s)) for each s.
        for (text, words) in [
            ("", 1),
            ("a", 1),
            ("a b", 2),
            ("a  b", 2),
            (" a b ", 4),
            ("a\n\nb\tc", 3),
            ("\u{1f}a\u{a0}b\u{2003}c", 4),
            ("é ü", 2),
        ] {
            assert_eq!(count_words(text), words, "{text:?}");
        }
        assert_eq!(count_bytes("é ü"), 5);
    }

    #[test]
    fn ratios_of_sums_over_documents() -> Result<()> {
        let ll = Tensor::from_slice(&[-10.0f64, -30.0]);
        let mut m = DocumentMetrics::default();
        m.update(&ll, &Tensor::from_slice(&[2i64, 3]), &Tensor::from_slice(&[10i64, 30]))?;
        assert!((m.word_perplexity() / 8f64.exp() - 1.0).abs() < 1e-12);
        assert!((m.byte_perplexity() - 1f64.exp()).abs() < 1e-12);
        assert!((m.bits_per_byte() - 1.0 / std::f64::consts::LN_2).abs() < 1e-12);
        let mut other = DocumentMetrics::default();
        other.update(&Tensor::from_slice(&[-0.0f64]), &Tensor::from_slice(&[1i64]), &Tensor::from_slice(&[0i64]))?;
        m.merge(&other)?;
        assert!((m.word_perplexity() / (40f64 / 6.0).exp() - 1.0).abs() < 1e-12);
        assert!(m.update(&ll, &Tensor::from_slice(&[1i64]), &Tensor::from_slice(&[1i64, 2])).is_err());
        Ok(())
    }

    #[test]
    fn ratio_stderr_bootstraps_the_documents() -> Result<()> {
        let options = Bootstrap { iters: 2000, seed: 1, resampler: Resampler::Counter, threads: 1 };
        // Equal weights: the ratio is a mean, so bits per byte's stderr is the mean's over ln 2 (biased
        // low by sqrt((n - 1) / n) as every bootstrap), up to Monte-Carlo noise.
        let ll: Vec<f64> = (0..50).map(|i| -((i * 7919) % 13) as f64).collect();
        let w = Tensor::from_slice(&[1i64; 50]);
        let se = ratio_stderr(&Tensor::from_slice(&ll), &w, RatioStatistic::Bits, &options)?.unwrap();
        let expected =
            crate::mean_stderr(&Tensor::from_slice(&ll))?.unwrap() / std::f64::consts::LN_2 * (49.0f64 / 50.0).sqrt();
        assert!((se / expected - 1.0).abs() < 0.08, "{se} vs {expected}");
        // Perplexity of the same resamples: a monotone transform, so larger for larger spreads.
        let ppl = ratio_stderr(&Tensor::from_slice(&ll), &w, RatioStatistic::Perplexity, &options)?.unwrap();
        assert!(ppl > 0.0);
        assert_eq!(
            ratio_stderr(
                &Tensor::from_slice(&[-1.0f64]),
                &Tensor::from_slice(&[1i64]),
                RatioStatistic::Bits,
                &options
            )?,
            None
        );
        assert!(ratio_stderr(&Tensor::from_slice(&ll), &Tensor::from_slice(&[1i64]), RatioStatistic::Bits, &options)
            .is_err());
        Ok(())
    }
}
