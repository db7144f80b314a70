//! Which examples serve as the shots of a few-shot prompt.
//!
//! The shots of example `i` depend on `(seed, i, pool size, k)` only, never on which other examples
//! are evaluated, in what order, on how many ranks or in what batches: every process that builds the
//! prompt of example `i` builds the same one.
//!
//! Algorithm: the candidates are the pool's `n` rows except `i` (`k` is capped at `n - 1`). A counter
//! based generator gives the `t`-th 64-bit draw as `mix(key + t * γ)`, where `key = mix(mix(seed) ^
//! (i + γ))`, `mix` is SplitMix64's finaliser and `γ = 0x9E3779B97F4A7C15`. A partial Fisher–Yates
//! shuffle over the `n - 1` candidates (sparse, so `O(k)` memory) picks `k` of them: step `t` swaps
//! position `t` with position `t + u` where `u` is uniform below `n - 1 - t` (rejection sampling, so
//! unbiased). The shots appear in the prompt in the order drawn.
//!
//! llm-foundry draws with one `random.Random(seed)` shared by all examples in dataset order, so its
//! shots for example `i` depend on every earlier example; the prompt format (see
//! [`crate::prompts`]) is llm-foundry's, the choice of shots is not.

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

#[cfg(test)]
mod tests {
    use super::*;

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
