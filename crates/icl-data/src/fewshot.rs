//! Which examples serve as the shots of a few-shot prompt: [`FewshotSampler`] names the three rules,
//! [`shot_rows`] applies one to the rows of one dataset.
//!
//! - [`FewshotSampler::LlmFoundry`] and [`FewshotSampler::LmEval`] are the peers' own draws
//!   ([`crate::peer_fewshot`]): one CPython `random.Random(seed)` consumed by the examples in dataset
//!   order. [`shot_rows`] replays that order for the evaluated examples (the first `limit` rows) on
//!   every process, so the prompts are each peer's one-process prompts whatever the limit, the rank
//!   count or the batch order.
//! - [`FewshotSampler::Icl`] (this module's [`fewshot_indices`]): the shots of example `i` depend on
//!   `(seed, i, pool size, k)` only, never on which other examples are evaluated.
//!
//! Icl's algorithm: the candidates are the pool's `n` rows except `i` (`k` is capped at `n - 1`). A counter
//! based generator gives the `t`-th 64-bit draw as `mix(key + t * γ)`, where `key = mix(mix(seed) ^
//! (i + γ))`, `mix` is SplitMix64's finaliser and `γ = 0x9E3779B97F4A7C15`. A partial Fisher–Yates
//! shuffle over the `n - 1` candidates (sparse, so `O(k)` memory) picks `k` of them: step `t` swaps
//! position `t` with position `t + u` where `u` is uniform below `n - 1 - t` (rejection sampling, so
//! unbiased). The shots appear in the prompt in the order drawn.

use crate::peer_fewshot::{llm_foundry_sample_idxs, lm_eval_shots, LmEvalPoolTooSmall};
use crate::pyrandom::Random;
use crate::TaskExamples;
use std::collections::HashMap;

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijective mix of all 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `k` shots (pool row indices, in prompt order) of example `example` in a pool of `pool` rows.
pub fn fewshot_indices(seed: u64, example: usize, pool: usize, k: usize) -> Vec<usize> {
    let candidates = pool.saturating_sub(usize::from(example < pool));
    let k = k.min(candidates);
    let key = mix(mix(seed) ^ (example as u64).wrapping_add(GAMMA));
    let mut t = 0u64;
    let mut draw = || {
        t += 1;
        mix(key.wrapping_add(t.wrapping_mul(GAMMA)))
    };
    // Positions moved by earlier swaps; every other position p holds candidate p.
    let mut moved: HashMap<usize, usize> = HashMap::with_capacity(2 * k);
    let mut out = Vec::with_capacity(k);
    for step in 0..k {
        let span = (candidates - step) as u64;
        // Largest multiple of span that fits: draws at or above it would bias the low residues.
        let zone = u64::MAX - (u64::MAX % span);
        let u = loop {
            let r = draw();
            if r < zone {
                break r % span;
            }
        };
        let j = step + u as usize;
        let at_j = moved.get(&j).copied().unwrap_or(j);
        let at_step = moved.get(&step).copied().unwrap_or(step);
        moved.insert(j, at_step);
        // Candidate c is pool row c, skipping the example itself.
        out.push(if at_j >= example { at_j + 1 } else { at_j });
    }
    out
}

/// Whose rule picks the shots (and, for lm-eval, lays out the prompt; see [`crate::prompts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FewshotSampler {
    /// llm-foundry 0.22.0's `get_fewshot_sample_idxs`: the pool is the whole dataset file, example
    /// `i` never shows itself, shots in the iteration order of llm-foundry's Python `set`.
    LlmFoundry,
    /// lm-eval 0.4.13's `ContextSampler` with `fewshot_split == test_split`: the pool is the whole
    /// evaluated split, `sample(k + 1)` then every drawn row equal to the example removed.
    LmEval,
    /// icl's counter-based sampler ([`fewshot_indices`]).
    #[default]
    Icl,
}

impl FewshotSampler {
    pub const ALL: [FewshotSampler; 3] = [Self::LlmFoundry, Self::LmEval, Self::Icl];

    /// The name of the command-line flag and suite key value.
    pub fn name(self) -> &'static str {
        match self {
            Self::LlmFoundry => "llm-foundry",
            Self::LmEval => "lm-eval",
            Self::Icl => "icl",
        }
    }

    pub fn from_name(name: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| format!("unknown few-shot sampler `{name}` (expected llm-foundry, lm-eval or icl)"))
    }

    /// The example delimiter when none is set: lm-eval's `fewshot_delimiter` `"\n\n"`, else
    /// llm-foundry's `"\n"`.
    pub fn default_example_delimiter(self) -> &'static str {
        match self {
            Self::LmEval => "\n\n",
            Self::LlmFoundry | Self::Icl => "\n",
        }
    }
}

/// The shots (rows of `pool`, in prompt order) of the first `evaluated` examples of `pool`, one
/// dataset (for a task split by category, call it once per category's rows). The peers' samplers
/// draw for examples `0..evaluated` in order from one generator seeded with `seed`, as they do in
/// one process; rows past `evaluated` are never drawn for, and change nothing before them.
/// `Err` where lm-eval itself fails (`num_fewshot` not below the pool size).
pub fn shot_rows(
    sampler: FewshotSampler,
    pool: &TaskExamples,
    num_fewshot: usize,
    seed: u64,
    evaluated: usize,
) -> std::result::Result<Vec<Vec<usize>>, LmEvalPoolTooSmall> {
    let n = pool.len();
    let evaluated = evaluated.min(n);
    if num_fewshot == 0 {
        return Ok(vec![Vec::new(); evaluated]);
    }
    match sampler {
        FewshotSampler::Icl => Ok((0..evaluated).map(|i| fewshot_indices(seed, i, n, num_fewshot)).collect()),
        FewshotSampler::LlmFoundry => {
            let mut rng = Random::new(i128::from(seed));
            Ok((0..evaluated).map(|i| llm_foundry_sample_idxs(n, num_fewshot, i, &mut rng)).collect())
        }
        FewshotSampler::LmEval => {
            // lm-eval removes every drawn doc that is `==` to the evaluated one: equal rows by value.
            let keys: Vec<String> = (0..n).map(|i| pool.row_key(i)).collect();
            let mut rows_by_key: HashMap<&str, Vec<usize>> = HashMap::new();
            for (row, key) in keys.iter().enumerate() {
                rows_by_key.entry(key.as_str()).or_default().push(row);
            }
            let docs = (0..evaluated).map(|i| Some(rows_by_key[keys[i].as_str()].as_slice()));
            lm_eval_shots(n, num_fewshot, i128::from(seed), docs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lm_rows(n: usize) -> TaskExamples {
        TaskExamples::LanguageModeling(
            (0..n).map(|i| crate::LmExample { context: format!("c{i}"), continuation: format!("k{i}") }).collect(),
        )
    }

    #[test]
    fn shot_rows_follow_each_sampler() {
        let pool = lm_rows(30);
        let foundry = crate::llm_foundry_shots(30, 4, 7);
        assert_eq!(shot_rows(FewshotSampler::LlmFoundry, &pool, 4, 7, 30).unwrap(), foundry);
        // A limit evaluates a prefix: the draws of the examples before it are unchanged.
        assert_eq!(shot_rows(FewshotSampler::LlmFoundry, &pool, 4, 7, 9).unwrap(), foundry[..9]);
        let lm_eval = crate::lm_eval_shots_same_split(30, 4, 7).unwrap();
        assert_eq!(shot_rows(FewshotSampler::LmEval, &pool, 4, 7, 30).unwrap(), lm_eval);
        assert_eq!(shot_rows(FewshotSampler::LmEval, &pool, 4, 7, 5).unwrap(), lm_eval[..5]);
        assert_eq!(shot_rows(FewshotSampler::Icl, &pool, 4, 7, 2).unwrap()[1], fewshot_indices(7, 1, 30, 4));
        for sampler in FewshotSampler::ALL {
            assert_eq!(shot_rows(sampler, &pool, 0, 7, 3).unwrap(), vec![Vec::<usize>::new(); 3]);
            assert_eq!(FewshotSampler::from_name(sampler.name()), Ok(sampler));
        }
        assert!(FewshotSampler::from_name("foundry").unwrap_err().contains("llm-foundry, lm-eval or icl"));
    }

    #[test]
    fn lm_eval_never_shows_a_copy_of_the_example() {
        // Rows 0, 3 and 5 are the same document: lm-eval removes all of them from row 0's shots.
        let mut rows: Vec<(String, String)> = (0..8).map(|i| (format!("c{i}"), format!("k{i}"))).collect();
        rows[3] = rows[0].clone();
        rows[5] = rows[0].clone();
        let pool = TaskExamples::LanguageModeling(
            rows.iter().map(|(c, k)| crate::LmExample { context: c.clone(), continuation: k.clone() }).collect(),
        );
        let equal: Vec<Option<Vec<usize>>> =
            (0..8).map(|i| Some(if [0, 3, 5].contains(&i) { vec![0, 3, 5] } else { vec![i] })).collect();
        for seed in 0..30 {
            let got = shot_rows(FewshotSampler::LmEval, &pool, 4, seed, 8).unwrap();
            assert_eq!(got, crate::lm_eval_shots(8, 4, i128::from(seed), equal.clone()).unwrap());
            for i in [0, 3, 5] {
                assert!(got[i].iter().all(|r| ![0, 3, 5].contains(r)), "seed {seed}: {:?}", got[i]);
            }
        }
        let err = shot_rows(FewshotSampler::LmEval, &lm_rows(4), 4, 1, 4).unwrap_err();
        assert_eq!((err.doc, err.draw, err.pool), (0, 5, 4));
    }

    #[test]
    fn shots_are_distinct_in_range_and_never_the_example() {
        for pool in [1, 2, 3, 10, 1000] {
            for example in [0, pool / 2, pool - 1] {
                for k in [0, 1, 5, 2000] {
                    let s = fewshot_indices(1234, example, pool, k);
                    assert_eq!(s.len(), k.min(pool - 1), "pool {pool} k {k}");
                    let mut sorted = s.clone();
                    sorted.sort_unstable();
                    sorted.dedup();
                    assert_eq!(sorted.len(), s.len(), "duplicates in {s:?}");
                    assert!(s.iter().all(|&x| x < pool && x != example), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn depends_on_seed_and_example_only() {
        let a = fewshot_indices(7, 42, 5000, 5);
        assert_eq!(a, fewshot_indices(7, 42, 5000, 5));
        assert_ne!(a, fewshot_indices(8, 42, 5000, 5));
        assert_ne!(a, fewshot_indices(7, 43, 5000, 5));
        // Asking for fewer shots gives a prefix of the same draw.
        assert_eq!(fewshot_indices(7, 42, 5000, 3), a[..3]);
    }

    #[test]
    fn draws_are_close_to_uniform() {
        // Over many seeds, every candidate of an 11-row pool is the first shot about equally often.
        let mut counts = [0usize; 11];
        for seed in 0..11_000u64 {
            let s = fewshot_indices(seed, (seed % 11) as usize, 11, 1);
            counts[s[0]] += 1;
        }
        for (c, &n) in counts.iter().enumerate() {
            // Each candidate is available in 10 of 11 example positions: expected 1000.
            assert!((850..=1150).contains(&n), "candidate {c} drawn {n} times: {counts:?}");
        }
    }
}
