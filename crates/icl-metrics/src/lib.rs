//! Pure tensor metrics for in-context-learning evaluation.
//!
//! Invariant: this crate depends on `tch` and `thiserror` only and does no I/O. Every function takes
//! tensors and returns tensors; every accumulated metric is a set of `(sum, count)` pairs that can be
//! summed across ranks (an all-reduce of [`Reducible::to_tensor`]) and merged with [`Reducible::merge`].
//!
//! These kinds of scoring are covered:
//! - **Language modelling** ([`score_continuations`], [`LmMetrics`]): a continuation is correct when every
//!   one of its tokens is the argmax of the model's distribution (LAMBADA accuracy); its log-likelihood and
//!   token count give perplexity.
//! - **Multiple choice** ([`predict_choices`], [`ChoiceMetrics`]): each choice is scored by its summed
//!   log-likelihood (lm-eval `acc`), by log-likelihood per character (lm-eval `acc_norm`) and by mean
//!   per-token negative log-likelihood (Composer's rule). Ties go to the lowest choice index.
//! - **Documents** ([`DocumentMetrics`], [`count_words`], [`count_bytes`]): lm-eval's word and byte
//!   perplexity and bits per byte of whole documents scored in rolling windows.
//! - **Generation** ([`exact_match`], [`GenerationMetrics`]): a generated answer is correct when its
//!   normalized text starts with a normalized accepted answer (pure string functions, no tensors).
//!
//! Standard errors ([`mean_stderr`], [`perplexity_stderr`], [`bootstrap_stderr`],
//! [`weighted_mean_stderr`]): lm-eval's closed form for means, a seeded bootstrap for perplexity and
//! other statistics of column means, and propagation through averages of independent tasks (formulas
//! in the [`stderr`] module).
//!
//! ```
//! use icl_metrics::{predict_choices, score_continuations, ChoiceMetrics, ChoiceScores, Reducible};
//! use tch::{Kind, Tensor};
//!
//! // Two choices of one question, each one token long, over a 3-word vocabulary.
//! let log_probs = Tensor::from_slice(&[0.5f32, 0.3, 0.2, 0.1, 0.1, 0.8]).view([2, 3]).log();
//! let targets = Tensor::from_slice(&[0i64, 2]);
//! let owner = Tensor::from_slice(&[0i64, 1]); // scored token -> continuation
//! let cont = score_continuations(&log_probs, &targets, &owner, 2)?;
//!
//! let scores = ChoiceScores {
//!     loglik: cont.loglik.shallow_clone(),
//!     n_tokens: cont.n_tokens.shallow_clone(),
//!     n_chars: Tensor::from_slice(&[4i64, 4]),
//!     question: Tensor::from_slice(&[0i64, 0]),
//!     choice: Tensor::from_slice(&[0i64, 1]),
//! };
//! let preds = predict_choices(&scores, 1)?;
//! assert_eq!(preds.acc.int64_value(&[0]), 1); // log 0.8 > log 0.5
//!
//! let mut metrics = ChoiceMetrics::default();
//! metrics.update(&preds, &Tensor::from_slice(&[1i64]))?;
//! let mut other_rank = ChoiceMetrics::default();
//! other_rank.update(&preds, &Tensor::from_slice(&[0i64]))?;
//! metrics.merge(&other_rank)?;
//! assert_eq!(metrics.acc.value(), 0.5);
//! # Ok::<(), icl_metrics::Error>(())
//! ```

mod exact_match;
mod perplexity;
pub mod stderr;

pub use exact_match::{answer_matches, cot_answer, cut_at_stop, exact_match, normalize_answer, GenerationMetrics};
pub use perplexity::{count_bytes, count_words, ratio_stderr, DocumentMetrics, RatioStatistic};
pub use stderr::{
    bootstrap_stderr, mean_stderr, perplexity_stderr, sample_stddev, weighted_mean_stderr, Bootstrap, Resampler,
};
use tch::{Kind, Tensor};

/// Errors from metric computations: shape mismatches in the caller's tensors, or libtorch failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("metric input shape: {0}")]
    Shape(String),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Per-continuation results of [`score_continuations`], one entry per continuation.
#[derive(Debug)]
pub struct ContinuationScores {
    /// Summed log-likelihood of the continuation's tokens, f64 `[n]`.
    pub loglik: Tensor,
    /// Whether every continuation token is the argmax of its distribution, bool `[n]`.
    pub is_greedy: Tensor,
    /// Number of continuation tokens, i64 `[n]`.
    pub n_tokens: Tensor,
}

/// Scores continuations from the log-probabilities at their scored positions.
///
/// `log_probs` is `[t, vocab]` (any float kind; log-softmax already applied) for the `t` scored tokens of all
/// continuations, `targets` `[t]` the token that actually follows each position, and `owner` `[t]` the index
/// (in `0..n`) of the continuation each scored token belongs to. Greedy means `argmax == target` at every
/// token, with torch's rule that the first maximal index wins a tie (as lm-evaluation-harness does).
pub fn score_continuations(log_probs: &Tensor, targets: &Tensor, owner: &Tensor, n: i64) -> Result<ContinuationScores> {
    let (t, _vocab) = log_probs
        .size2()
        .map_err(|_| Error::Shape(format!("log_probs must be [tokens, vocab], got {:?}", log_probs.size())))?;
    if targets.size() != [t] || owner.size() != [t] {
        return Err(Error::Shape(format!(
            "targets {:?} and owner {:?} must both be [{t}]",
            targets.size(),
            owner.size()
        )));
    }
    let device = log_probs.device();
    let token_ll = log_probs.f_gather(1, &targets.f_unsqueeze(1)?, false)?.f_squeeze_dim(1)?;
    let missed = is_first_argmax(log_probs, targets, &token_ll)?.f_logical_not()?.f_to_kind(Kind::Int64)?;
    let zeros_f = Tensor::f_zeros([n], (Kind::Double, device))?;
    let zeros_i = Tensor::f_zeros([n], (Kind::Int64, device))?;
    let loglik = zeros_f.f_index_add(0, owner, &token_ll.f_to_kind(Kind::Double)?)?;
    let n_missed = zeros_i.f_index_add(0, owner, &missed)?;
    let n_tokens = zeros_i.f_index_add(0, owner, &Tensor::f_ones([t], (Kind::Int64, device))?)?;
    Ok(ContinuationScores { loglik, is_greedy: n_missed.f_eq(0)?, n_tokens })
}

/// Whether `targets[i]` is `argmax(log_probs[i])` (the first maximal index), bool `[t]`, given the
/// target's own value `at_target`. The same as comparing torch's `argmax`, which on the CPU scans a
/// row seven times slower than `amax` does: a target that does not hold its row's maximum is not the
/// argmax, and only the rows where it does (or whose maximum is NaN) go through `argmax`.
fn is_first_argmax(log_probs: &Tensor, targets: &Tensor, at_target: &Tensor) -> Result<Tensor> {
    let row_max = log_probs.f_amax([1].as_slice(), false)?;
    let candidates =
        at_target.f_eq_tensor(&row_max)?.f_logical_or(&row_max.f_isnan()?)?.f_nonzero()?.f_squeeze_dim(1)?;
    let result = Tensor::f_zeros(targets.size().as_slice(), (Kind::Bool, log_probs.device()))?;
    if candidates.numel() == 0 {
        return Ok(result);
    }
    let first = log_probs.f_index_select(0, &candidates)?.f_argmax(1, false)?;
    let hit = first.f_eq_tensor(&targets.f_index_select(0, &candidates)?)?;
    Ok(result.f_index_put(&[Some(candidates)], &hit, false)?)
}

/// The scores of every choice of a set of multiple-choice questions, one entry per choice.
#[derive(Debug)]
pub struct ChoiceScores {
    /// Summed log-likelihood of the choice's continuation tokens, `[c]`.
    pub loglik: Tensor,
    /// Number of continuation tokens of the choice, `[c]`.
    pub n_tokens: Tensor,
    /// Length of the choice in characters (Unicode scalar values, without the delimiter), `[c]`.
    pub n_chars: Tensor,
    /// Question index in `0..n_questions` of each choice, i64 `[c]`.
    pub question: Tensor,
    /// Position of the choice within its question, i64 `[c]`.
    pub choice: Tensor,
}

/// The chosen answer of each question under the three scoring rules, i64 `[n_questions]` each.
#[derive(Debug)]
pub struct ChoicePredictions {
    /// Highest summed log-likelihood (lm-eval `acc`).
    pub acc: Tensor,
    /// Highest log-likelihood per character (lm-eval `acc_norm`).
    pub acc_norm: Tensor,
    /// Lowest mean per-token negative log-likelihood (Composer's multiple-choice accuracy).
    pub mean_nll: Tensor,
}

/// Picks each question's answer under the three rules; ties go to the lowest choice index.
pub fn predict_choices(scores: &ChoiceScores, n_questions: i64) -> Result<ChoicePredictions> {
    let c = scores.loglik.size();
    for (name, t) in [
        ("n_tokens", &scores.n_tokens),
        ("n_chars", &scores.n_chars),
        ("question", &scores.question),
        ("choice", &scores.choice),
    ] {
        if t.size() != c {
            return Err(Error::Shape(format!("{name} is {:?}, loglik is {c:?}", t.size())));
        }
    }
    let loglik = scores.loglik.f_to_kind(Kind::Double)?;
    let per_char = loglik.f_div(&scores.n_chars.f_to_kind(Kind::Double)?)?;
    let per_token = loglik.f_div(&scores.n_tokens.f_to_kind(Kind::Double)?)?;
    Ok(ChoicePredictions {
        acc: grouped_argmax(&loglik, scores, n_questions)?,
        acc_norm: grouped_argmax(&per_char, scores, n_questions)?,
        mean_nll: grouped_argmax(&per_token, scores, n_questions)?,
    })
}

/// Argmax of `values` within each question; questions may have different numbers of choices.
fn grouped_argmax(values: &Tensor, scores: &ChoiceScores, n_questions: i64) -> Result<Tensor> {
    let max_choices = if scores.choice.numel() == 0 { 1 } else { scores.choice.f_max()?.int64_value(&[]) + 1 };
    let table = Tensor::f_full([n_questions, max_choices], f64::NEG_INFINITY, (Kind::Double, values.device()))?;
    let indices = [Some(scores.question.shallow_clone()), Some(scores.choice.shallow_clone())];
    let table = table.f_index_put(&indices, values, false)?;
    // torch's argmax returns the first maximal index, which is the tie rule we document.
    Ok(table.f_argmax(1, false)?)
}

/// State that is a fixed set of sums; ranks exchange it as one f64 tensor and add it up.
pub trait Reducible: Sized {
    /// The state as a flat f64 tensor, suitable for an all-reduce with sum.
    fn to_tensor(&self) -> Tensor;
    /// Rebuilds the state from a (reduced) tensor made by [`Reducible::to_tensor`].
    fn from_tensor(t: &Tensor) -> Result<Self>;
    /// Adds another rank's (or batch's) state into this one.
    fn merge(&mut self, other: &Self) -> Result<()> {
        let sum = self.to_tensor().f_add(&other.to_tensor())?;
        *self = Self::from_tensor(&sum)?;
        Ok(())
    }
}

/// A running mean kept as `(sum, count)`, both f64 scalars.
#[derive(Debug)]
pub struct Mean {
    pub sum: Tensor,
    pub count: Tensor,
}

impl Default for Mean {
    fn default() -> Self {
        Self { sum: Tensor::from(0f64), count: Tensor::from(0f64) }
    }
}

impl Clone for Mean {
    fn clone(&self) -> Self {
        Self { sum: self.sum.copy(), count: self.count.copy() }
    }
}

impl Mean {
    /// Adds every element of `values` with weight one.
    pub fn update(&mut self, values: &Tensor) -> Result<()> {
        let values = values.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?;
        self.sum = self.sum.f_add(&values.f_sum(Kind::Double)?)?;
        self.count = self.count.f_add_scalar(values.numel() as f64)?;
        Ok(())
    }

    /// Adds a sum that counts as `count` items (for token-weighted means).
    pub fn update_weighted(&mut self, sum: &Tensor, count: &Tensor) -> Result<()> {
        self.sum = self.sum.f_add(&sum.f_sum(Kind::Double)?.f_to_device(tch::Device::Cpu)?)?;
        self.count = self.count.f_add(&count.f_sum(Kind::Double)?.f_to_device(tch::Device::Cpu)?)?;
        Ok(())
    }

    /// The mean, NaN when nothing was added.
    pub fn value(&self) -> f64 {
        let count = self.count.double_value(&[]);
        if count == 0.0 {
            f64::NAN
        } else {
            self.sum.double_value(&[]) / count
        }
    }

    pub fn count(&self) -> f64 {
        self.count.double_value(&[])
    }
}

fn pack(means: &[&Mean]) -> Tensor {
    let parts: Vec<Tensor> = means.iter().flat_map(|m| [m.sum.view([1]), m.count.view([1])]).collect();
    Tensor::cat(&parts, 0)
}

fn unpack<const N: usize>(t: &Tensor) -> Result<[Mean; N]> {
    if t.size() != [2 * N as i64] {
        return Err(Error::Shape(format!("state tensor is {:?}, expected [{}]", t.size(), 2 * N)));
    }
    let t = t.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?;
    Ok(std::array::from_fn(|i| Mean { sum: t.get(2 * i as i64), count: t.get(2 * i as i64 + 1) }))
}

/// Accumulated language-modelling metrics.
#[derive(Debug, Default, Clone)]
pub struct LmMetrics {
    /// Share of continuations whose every token is the argmax.
    pub acc: Mean,
    /// Mean per-continuation log-likelihood: lm-eval's `perplexity` is `exp(-mean)`.
    pub loglik: Mean,
    /// Log-likelihood summed over all continuation tokens, counted in tokens: token perplexity.
    pub token_loglik: Mean,
}

impl LmMetrics {
    pub fn update(&mut self, scores: &ContinuationScores) -> Result<()> {
        self.acc.update(&scores.is_greedy)?;
        self.loglik.update(&scores.loglik)?;
        self.token_loglik.update_weighted(&scores.loglik, &scores.n_tokens)?;
        Ok(())
    }

    /// lm-eval's perplexity: `exp(-mean per-example log-likelihood)`.
    pub fn perplexity(&self) -> f64 {
        (-self.loglik.value()).exp()
    }

    /// Perplexity per token: `exp(-total log-likelihood / total tokens)`.
    pub fn token_perplexity(&self) -> f64 {
        (-self.token_loglik.value()).exp()
    }
}

impl Reducible for LmMetrics {
    fn to_tensor(&self) -> Tensor {
        pack(&[&self.acc, &self.loglik, &self.token_loglik])
    }
    fn from_tensor(t: &Tensor) -> Result<Self> {
        let [acc, loglik, token_loglik] = unpack::<3>(t)?;
        Ok(Self { acc, loglik, token_loglik })
    }
}

/// Accumulated multiple-choice accuracies under the three rules of [`ChoicePredictions`].
#[derive(Debug, Default, Clone)]
pub struct ChoiceMetrics {
    pub acc: Mean,
    pub acc_norm: Mean,
    pub acc_mean_nll: Mean,
}

impl ChoiceMetrics {
    /// Adds a batch of predictions against `gold`, i64 `[n_questions]`.
    pub fn update(&mut self, preds: &ChoicePredictions, gold: &Tensor) -> Result<()> {
        if preds.acc.size() != gold.size() {
            return Err(Error::Shape(format!("{:?} predictions for {:?} gold answers", preds.acc.size(), gold.size())));
        }
        self.acc.update(&preds.acc.f_eq_tensor(gold)?)?;
        self.acc_norm.update(&preds.acc_norm.f_eq_tensor(gold)?)?;
        self.acc_mean_nll.update(&preds.mean_nll.f_eq_tensor(gold)?)?;
        Ok(())
    }
}

impl Reducible for ChoiceMetrics {
    fn to_tensor(&self) -> Tensor {
        pack(&[&self.acc, &self.acc_norm, &self.acc_mean_nll])
    }
    fn from_tensor(t: &Tensor) -> Result<Self> {
        let [acc, acc_norm, acc_mean_nll] = unpack::<3>(t)?;
        Ok(Self { acc, acc_norm, acc_mean_nll })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_probs(rows: &[[f32; 4]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, 4]).log_softmax(-1, Kind::Float)
    }

    #[test]
    fn greedy_needs_every_token_to_be_the_argmax() {
        // Continuation 0: tokens 0,1 (both argmax). Continuation 1: tokens 2 (argmax), 3 (not).
        let lp = log_probs(&[[5., 1., 1., 1.], [1., 5., 1., 1.], [1., 1., 5., 1.], [1., 1., 5., 1.]]);
        let targets = Tensor::from_slice(&[0i64, 1, 2, 3]);
        let owner = Tensor::from_slice(&[0i64, 0, 1, 1]);
        let s = score_continuations(&lp, &targets, &owner, 2).unwrap();
        assert_eq!(Vec::<bool>::try_from(&s.is_greedy).unwrap(), vec![true, false]);
        assert_eq!(Vec::<i64>::try_from(&s.n_tokens).unwrap(), vec![2, 2]);
        let expected0 = lp.double_value(&[0, 0]) + lp.double_value(&[1, 1]);
        assert!((s.loglik.double_value(&[0]) - expected0).abs() < 1e-6);
    }

    #[test]
    fn the_argmax_shortcut_is_torchs_argmax() {
        let check = |lp: &Tensor, targets: &Tensor| {
            let at_target = lp.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1);
            let ours = is_first_argmax(lp, targets, &at_target).unwrap();
            assert!(ours.equal(&lp.argmax(1, false).eq_tensor(targets)), "{lp} {targets}");
        };
        // Ties (the first maximum wins), NaN (torch's argmax takes the first NaN), a plain row.
        let nan = f32::NAN;
        let lp =
            Tensor::from_slice(&[3f32, 5., 5., 1., 3., 5., 5., 1., 1., 2., nan, nan, 1., 2., nan, 0., 9., 1., 2., 3.])
                .view([5, 4]);
        for targets in [[1i64, 2, 2, 3, 0], [0, 1, 3, 2, 0], [2, 0, 1, 0, 3]] {
            check(&lp, &Tensor::from_slice(&targets));
        }
        // Random rows whose targets are often the argmax; bf16 values tie often.
        tch::manual_seed(3);
        let lp = Tensor::randn([64, 50], (Kind::Float, tch::Device::Cpu)).log_softmax(-1, Kind::Float);
        let targets =
            lp.argmax(1, false).where_scalarother(&Tensor::rand([64], (Kind::Float, tch::Device::Cpu)).lt(0.5), 7);
        check(&lp, &targets);
        check(&lp.to_kind(Kind::BFloat16).round_decimals(1), &targets);
        check(&lp.narrow(0, 0, 0), &targets.narrow(0, 0, 0));
    }

    #[test]
    fn ties_go_to_the_lowest_choice_and_rules_differ() {
        // Question 0: equal logliks -> choice 0. Question 1: three choices where the rules disagree.
        let scores = ChoiceScores {
            loglik: Tensor::from_slice(&[-2.0f64, -2.0, -6.0, -4.0, -9.0]),
            n_tokens: Tensor::from_slice(&[1i64, 1, 6, 1, 3]),
            n_chars: Tensor::from_slice(&[3i64, 3, 30, 4, 10]),
            question: Tensor::from_slice(&[0i64, 0, 1, 1, 1]),
            choice: Tensor::from_slice(&[0i64, 1, 0, 1, 2]),
        };
        let p = predict_choices(&scores, 2).unwrap();
        assert_eq!(Vec::<i64>::try_from(&p.acc).unwrap(), vec![0, 1]);
        // per char: -0.2, -1.0, -0.9 -> choice 0
        assert_eq!(Vec::<i64>::try_from(&p.acc_norm).unwrap(), vec![0, 0]);
        // per token: -1, -4, -3 -> choice 0 as well; make it differ with a question of its own below
        assert_eq!(Vec::<i64>::try_from(&p.mean_nll).unwrap(), vec![0, 0]);

        let scores = ChoiceScores {
            loglik: Tensor::from_slice(&[-6.0f64, -4.0]),
            n_tokens: Tensor::from_slice(&[6i64, 2]),
            n_chars: Tensor::from_slice(&[5i64, 5]),
            question: Tensor::from_slice(&[0i64, 0]),
            choice: Tensor::from_slice(&[0i64, 1]),
        };
        let p = predict_choices(&scores, 1).unwrap();
        assert_eq!(p.acc.int64_value(&[0]), 1);
        assert_eq!(p.mean_nll.int64_value(&[0]), 0);
    }

    #[test]
    fn state_round_trips_and_merges_like_one_pass() {
        let mut a = LmMetrics::default();
        let mut b = LmMetrics::default();
        let mut whole = LmMetrics::default();
        let s1 = ContinuationScores {
            loglik: Tensor::from_slice(&[-1.0f64, -3.0]),
            is_greedy: Tensor::from_slice(&[true, false]),
            n_tokens: Tensor::from_slice(&[1i64, 3]),
        };
        let s2 = ContinuationScores {
            loglik: Tensor::from_slice(&[-2.0f64]),
            is_greedy: Tensor::from_slice(&[true]),
            n_tokens: Tensor::from_slice(&[2i64]),
        };
        a.update(&s1).unwrap();
        b.update(&s2).unwrap();
        whole.update(&s1).unwrap();
        whole.update(&s2).unwrap();
        let reduced = LmMetrics::from_tensor(&(a.to_tensor() + b.to_tensor())).unwrap();
        a.merge(&b).unwrap();
        for m in [&a, &reduced] {
            assert_eq!(m.acc.value(), whole.acc.value());
            assert!((m.acc.value() - 2.0 / 3.0).abs() < 1e-12);
            assert!((m.perplexity() - 2f64.exp()).abs() < 1e-9);
            assert!((m.token_perplexity() - 1f64.exp()).abs() < 1e-9);
        }
        assert!(LmMetrics::from_tensor(&Tensor::zeros([5], (Kind::Double, tch::Device::Cpu))).is_err());
    }

    #[test]
    fn shape_errors_are_reported() {
        let lp = log_probs(&[[1., 2., 3., 4.]]);
        let err = score_continuations(&lp, &Tensor::from_slice(&[0i64, 1]), &Tensor::from_slice(&[0i64]), 1);
        assert!(matches!(err, Err(Error::Shape(_))));
    }
}
