//! The log-probability of each scored position's target token, and whether it is the greedy choice,
//! straight from the output head's logits on the CPU, without the `[positions, vocab]` log-softmax.
//!
//! Scoring needs two numbers per position, `log_softmax(x)[target]` and whether `target` is the
//! first argmax of the log-softmax, yet libtorch's `log_softmax` writes all of it: for a 50k
//! vocabulary, 200 KB of f32 per position, as long as the head's matmul itself on the 2-core EPYC of
//! the README (60-110 ms for 656 positions, against 85 ms for their bf16 head). Here each row is
//! read twice from cache, once for its maximum and once for the sum of `exp(x - max)` (the
//! polynomial `exp` of [`crate::gelu_tanh`], within a few ulp), and only the target's value is formed,
//! by libtorch's formula `(x - max) - ln(sum)`. The greedy flag compares those rounded values as
//! `argmax` over the log-softmax would (two logits a rounding apart tie there, and the first index
//! wins), so it agrees with the full computation except where the sums differ in their last bit.
//! A row is computed by one thread in a fixed order, so its result does not depend on its batch;
//! a row holding a NaN or an infinity is left to libtorch (`None`), whose rules for them apply.

use crate::skinny::{element_kernel_isa, parallel, Bf16, Isa, Weight};
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// One scored position's target: its log-probability (f32, as libtorch's log-softmax forms it) and
/// whether it is the first maximal index of the row's log-probabilities.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetScore {
    pub log_prob: f32,
    pub greedy: bool,
}

/// Lanes of the vectorized loops (a 512-bit register of f32; two 256-bit ones under AVX2).
const LANES: usize = 16;

/// Each row's [`TargetScore`] for `logits` (`[rows, vocab]`, f32 or bf16 on the CPU, wanting no
/// gradient) and its `targets` (one per row). `None` when the kernel does not apply (another device
/// or kind, no AVX2 with FMA); within, `None` for a row holding a NaN or an infinity.
pub fn target_scores(logits: &Tensor, targets: &[i64]) -> Result<Option<Vec<Option<TargetScore>>>> {
    let Some(isa) = element_kernel_isa(logits) else { return Ok(None) };
    let (rows, vocab) = logits.size2()?;
    if rows as usize != targets.len() {
        return Err(Error::Input { message: format!("{} targets for {rows} rows of logits", targets.len()) });
    }
    if let Some(&bad) = targets.iter().find(|&&t| !(0..vocab).contains(&t)) {
        return Err(Error::Input { message: format!("target token {bad} is outside the vocabulary of {vocab}") });
    }
    let logits = logits.f_contiguous()?;
    Ok(Some(if logits.kind() == Kind::Float {
        run::<f32>(isa, &logits, vocab as usize, targets)
    } else {
        run::<Bf16>(isa, &logits, vocab as usize, targets)
    }))
}

fn run<E: Weight>(isa: Isa, logits: &Tensor, vocab: usize, targets: &[i64]) -> Vec<Option<TargetScore>> {
    let mut results: Vec<Option<TargetScore>> = vec![None; targets.len()];
    let (data, out) = (logits.data_ptr() as usize, results.as_mut_ptr() as usize);
    let work = |begin: usize, end: usize| {
        for (row, &target) in targets.iter().enumerate().take(end).skip(begin) {
            // SAFETY: `logits` is contiguous `[rows, vocab]` of `E` and alive until `run` returns,
            // and only read; `results` holds `rows` entries, each thread writing its own rows.
            unsafe {
                let values = std::slice::from_raw_parts((data as *const E).add(row * vocab), vocab);
                *(out as *mut Option<TargetScore>).add(row) = isa.target_score(values, target as usize);
            }
        }
    };
    parallel(targets.len(), 1, &work);
    results
}

/// The maximum of `row`, or `None` when it holds a NaN or an infinity.
#[inline(always)]
fn finite_max<E: Weight>(row: &[E]) -> Option<f32> {
    let mut max = [f32::NEG_INFINITY; LANES];
    // `x * 0` is 0 for finite `x` and NaN otherwise, and a NaN stays in a sum.
    let mut poison = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for lane in 0..LANES {
            let x = chunk[lane].to_f32();
            max[lane] = if x > max[lane] { x } else { max[lane] };
            poison[lane] += x * 0.0;
        }
    }
    for (lane, x) in rest.iter().enumerate() {
        let x = x.to_f32();
        max[lane] = if x > max[lane] { x } else { max[lane] };
        poison[lane] += x * 0.0;
    }
    let finite = poison.iter().all(|p| !p.is_nan());
    finite.then(|| max.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)))
}

/// `sum(exp(x - max))` over `row`, in lanes (their order fixed, so a row's sum is always the same).
#[inline(always)]
fn exp_sum<E: Weight>(row: &[E], max: f32) -> f32 {
    let mut sum = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    // Below -87 `exp` leaves the normal range; such terms are under 2e-38 each against a sum of at
    // least 1 (the maximum's own term).
    for chunk in chunks {
        for lane in 0..LANES {
            sum[lane] += crate::gelu_tanh::exp((chunk[lane].to_f32() - max).max(-87.0));
        }
    }
    for (lane, x) in rest.iter().enumerate() {
        sum[lane] += crate::gelu_tanh::exp((x.to_f32() - max).max(-87.0));
    }
    sum.iter().sum()
}

#[inline(always)]
fn target_score<E: Weight>(row: &[E], target: usize) -> Option<TargetScore> {
    let max = finite_max(row)?;
    let log_sum = exp_sum(row, max).ln();
    let log_prob = |x: E| (x.to_f32() - max) - log_sum;
    let at_target = log_prob(row[target]);
    // The largest log-probability is the maximum's, `0 - log_sum`; the target is greedy when it
    // rounds to it and no earlier index does.
    let top = -log_sum;
    let greedy = at_target == top && row[..target].iter().all(|&x| log_prob(x) != top);
    Some(TargetScore { log_prob: at_target, greedy })
}

/// The row function compiled for each instruction set.
///
/// # Safety (of each)
/// The CPU must have the instructions named.
#[cfg(target_arch = "x86_64")]
mod compiled {
    use super::TargetScore;
    use crate::skinny::Weight;

    #[target_feature(enable = "avx512f,avx512bw,fma")]
    pub(super) unsafe fn avx512<E: Weight>(row: &[E], target: usize) -> Option<TargetScore> {
        super::target_score(row, target)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<E: Weight>(row: &[E], target: usize) -> Option<TargetScore> {
        super::target_score(row, target)
    }
}

impl Isa {
    fn target_score<E: Weight>(self, row: &[E], target: usize) -> Option<TargetScore> {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detected` found the instructions of the loop chosen.
        unsafe {
            match self {
                Isa::Avx512 => compiled::avx512(row, target),
                Isa::Avx2 => compiled::avx2(row, target),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        target_score(row, target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// libtorch's answer: the log-softmax in f32, the target's entry, and `argmax == target`.
    fn libtorch(logits: &Tensor, targets: &[i64]) -> Vec<TargetScore> {
        let log_probs = logits.log_softmax(-1, Kind::Float);
        let picked =
            Vec::<f32>::try_from(log_probs.gather(1, &Tensor::from_slice(targets).unsqueeze(1), false).view([-1]))
                .unwrap();
        let argmax = Vec::<i64>::try_from(log_probs.argmax(-1, false)).unwrap();
        picked
            .iter()
            .zip(&argmax)
            .zip(targets)
            .map(|((&log_prob, &a), &t)| TargetScore { log_prob, greedy: a == t })
            .collect()
    }

    fn ours(logits: &Tensor, targets: &[i64]) -> Vec<Option<TargetScore>> {
        target_scores(logits, targets).unwrap().expect("applies")
    }

    /// Within `ulps` of libtorch's log-probability (relative to the row's log-sum, the larger term),
    /// and the same greedy flags.
    fn assert_agrees(logits: &Tensor, targets: &[i64], ulps: f32) {
        let (ours, theirs) = (ours(logits, targets), libtorch(logits, targets));
        for (row, (ours, theirs)) in ours.iter().zip(&theirs).enumerate() {
            let ours = ours.expect("finite row");
            let scale = theirs.log_prob.abs().max(1.0) * f32::EPSILON;
            assert!((ours.log_prob - theirs.log_prob).abs() <= ulps * scale, "row {row}: {ours:?} against {theirs:?}");
            assert_eq!(ours.greedy, theirs.greedy, "row {row}: {ours:?} against {theirs:?}");
        }
    }

    #[test]
    fn agrees_with_libtorchs_log_softmax_in_f32_and_bf16() {
        if Isa::detected().is_none() {
            return;
        }
        tch::manual_seed(7);
        // A vocabulary that is no multiple of the lanes, large logits and small ones.
        let logits = Tensor::randn([40, 50_257], (Kind::Float, Device::Cpu)) * 4.0;
        let mut targets: Vec<i64> = (0..40).map(|r| (r * 1_237) % 50_257).collect();
        // Some targets at their row's maximum, so that the greedy flag is true there.
        let argmax = Vec::<i64>::try_from(logits.argmax(-1, false)).unwrap();
        targets[..10].copy_from_slice(&argmax[..10]);
        assert_agrees(&logits, &targets, 4.0);
        // bf16 logits tie often: the first maximal index wins.
        let bf16 = (logits / 16.0).round().to_kind(Kind::BFloat16);
        let argmax = Vec::<i64>::try_from(bf16.to_kind(Kind::Float).argmax(-1, false)).unwrap();
        targets[..10].copy_from_slice(&argmax[..10]);
        assert_agrees(&bf16, &targets, 4.0);
        assert!(ours(&bf16, &targets)[..10].iter().all(|s| s.unwrap().greedy), "first maxima");
    }

    #[test]
    fn ties_go_to_the_first_index_and_a_later_tie_is_not_greedy() {
        if Isa::detected().is_none() {
            return;
        }
        let row = [1.0f32, 3.0, -2.0, 3.0, 0.5, 3.0];
        let logits = Tensor::from_slice(&row).view([1, 6]).repeat([3, 1]);
        let scores = ours(&logits, &[1, 3, 4]);
        assert_eq!(scores.iter().map(|s| s.unwrap().greedy).collect::<Vec<_>>(), [true, false, false]);
        assert_agrees(&logits, &[1, 3, 4], 4.0);
        // Logits a rounding apart tie in the log-softmax, as libtorch's argmax sees them.
        let near = Tensor::from_slice(&[20.0f32, 20.000_002, 19.0]).view([1, 3]);
        assert_agrees(&near, &[0], 4.0);
        assert_agrees(&near, &[1], 4.0);
    }

    #[test]
    fn rows_with_nan_or_infinity_are_left_to_libtorch_and_rows_stand_alone() {
        if Isa::detected().is_none() {
            return;
        }
        let logits = Tensor::randn([5, 1000], (Kind::Float, Device::Cpu));
        let _ = logits.get(1).get(17).fill_(f64::NAN);
        let _ = logits.get(2).get(999).fill_(f64::INFINITY);
        let _ = logits.get(3).get(0).fill_(f64::NEG_INFINITY);
        let targets = [3, 4, 5, 6, 7];
        let scores = ours(&logits, &targets);
        assert!(scores[0].is_some() && scores[1].is_none() && scores[2].is_none() && scores[3].is_none());
        assert!(scores[4].is_some());
        // Alone, a row scores what it scored among others (and a transposed view is read in order).
        let alone = ours(&logits.narrow(0, 4, 1), &targets[4..]);
        assert_eq!(alone[0], scores[4]);
        let transposed = logits.narrow(0, 4, 1).tr().contiguous().tr();
        assert_eq!(ours(&transposed, &targets[4..])[0], scores[4]);
    }

    #[test]
    fn declines_what_it_does_not_compute_and_rejects_bad_targets() {
        let logits = Tensor::randn([2, 8], (Kind::Float, Device::Cpu));
        assert!(target_scores(&logits.to_kind(Kind::Half), &[0, 1]).unwrap().is_none(), "f16");
        assert!(target_scores(&logits.to_kind(Kind::Double), &[0, 1]).unwrap().is_none(), "f64");
        if Isa::detected().is_some() {
            assert!(target_scores(&logits, &[0]).is_err(), "one target for two rows");
            assert!(target_scores(&logits, &[0, 8]).is_err(), "outside the vocabulary");
        }
        // `set_requires_grad` marks `logits` itself.
        let wanted = logits.set_requires_grad(true);
        assert!(target_scores(&wanted, &[0, 1]).unwrap().is_none(), "a gradient is wanted");
        let _guard = tch::no_grad_guard();
        assert_eq!(target_scores(&wanted, &[0, 1]).unwrap().is_some(), Isa::detected().is_some(), "no grad mode");
    }
}
