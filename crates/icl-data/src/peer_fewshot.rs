//! The peers' choice of few-shot examples, shot for shot: llm-foundry's and lm-evaluation-harness's.
//!
//! Both draw with CPython's `random.Random` ([`crate::pyrandom`]) from one generator shared by all
//! examples, so the shots of an example depend on every example evaluated before it in the same
//! process. These functions return pool row indices only; the prompt text around them is
//! [`crate::prompts`]' business.
//!
//! # llm-foundry (0.22.0, `llmfoundry/eval/datasets/`)
//!
//! `InContextLearningDataset.__init__` (`in_context_learning_evaluation.py`) creates
//! `fewshot_rng = random.Random(fewshot_random_seed)` once per dataset; `_prepare_dataset` maps
//! `_prep_example` over the dataset in order (a single-process `datasets.map`), and for
//! `num_fewshot > 0` `_generate_few_shot_prompt` calls `get_fewshot_sample_idxs(len(dataset),
//! num_fewshot, example_idx, fewshot_rng)` (`utils.py`) and appends the shots in the iteration order
//! of the Python `set` it returns. That function draws `set(rng.sample(range(n), min(n - 1, k)))`; if
//! the example drew itself it is removed and `rng.choice(range(n))` is redrawn until it is neither
//! the example nor already chosen, then added. The pool is the evaluated dataset itself (after
//! llm-foundry's per-category split, when a task has categories, each category is its own dataset
//! with its own generator). With `num_fewshot == 0` nothing is drawn. Every rank of a distributed run
//! builds the whole dataset, so the prompts do not depend on the number of processes.
//! [`llm_foundry_shots`] gives every example's shots; [`llm_foundry_sample_idxs`] is one call.
//!
//! # lm-evaluation-harness (0.4.13, `lm_eval/api/`)
//!
//! `simple_evaluate` calls `task.set_fewshot_seed(fewshot_random_seed)` (default 1234) on every task,
//! which makes the task's `ContextSampler` (`samplers.py`) use `random.Random(seed)`; the sampler's
//! pool is `list(task.fewshot_docs())`: the `fewshot_split` if set, else the training, validation or
//! test docs, the first that exists. `build_all_requests` walks `doc_iterator` (the evaluated docs in
//! order, cut by `--limit` or `--samples`) and calls `fewshot_context` once per doc, which for
//! `num_fewshot > 0` calls `sampler.sample(n=num_fewshot, eval_doc=doc if fewshot_split ==
//! test_split else None)` and shows the returned docs in order. `sample` draws `rnd.sample(pool, n)`
//! without an `eval_doc`; with one it draws `rnd.sample(pool, n + 1)`, drops every drawn doc equal
//! (`==` on the doc dicts) to the evaluated doc and keeps the first `n`; if fewer than `n` remain
//! (duplicates of the evaluated doc were drawn) it draws again, `rnd.sample(pool without every copy
//! of the doc, n)`. A draw larger than the pool raises `ValueError` and stops lm-eval: with an
//! `eval_doc`, `num_fewshot` must be below the pool size. Note that `None == None` passes `eval_doc`
//! when the task has neither `fewshot_split` nor `test_split` (the eval docs then come from the
//! validation split), and that with `fewshot_split` unset and a `test_split` the test docs can serve
//! as their own shots (no `eval_doc`). [`lm_eval_shots`] takes, per evaluated doc, `None` (no
//! `eval_doc`) or the pool rows equal to it; [`lm_eval_shots_same_split`] is the common case of a
//! pool that is the evaluated split, without duplicate rows.
//!
//! Several processes: lm-eval gives rank `r` of `W` the docs `r, r + W, r + 2W, ...`
//! (`utils.create_iterator`, an `islice`), and every rank seeds its own sampler with the same seed, so
//! the doc at position `j` of rank `r`'s slice gets the shots of the `j`-th draw of a fresh generator:
//! the prompts change with the number of processes. [`lm_eval_shots`] on one rank's docs, in order,
//! reproduces that rank. icl always builds the one-process prompts (all docs, in order, one generator),
//! however many ranks it runs on.

use crate::pyrandom::{IntSet, Random, SampleTooLarge};

/// llm-foundry's `get_fewshot_sample_idxs(dataset_size, num_fewshot, example_idx, rng)`, returned in
/// the iteration order of its Python `set` (the order llm-foundry writes the shots in), drawing from
/// `rng` as it does. llm-foundry calls it only for `num_fewshot > 0` (with 0 it would draw nothing
/// anyway). `example_idx < dataset_size`.
pub fn llm_foundry_sample_idxs(
    dataset_size: usize,
    num_fewshot: usize,
    example_idx: usize,
    rng: &mut Random,
) -> Vec<usize> {
    assert!(example_idx < dataset_size, "example {example_idx} outside a dataset of {dataset_size}");
    let num_fewshot = num_fewshot.min(dataset_size - 1);
    let drawn = rng.sample_range(dataset_size, num_fewshot).expect("num_fewshot < dataset_size");
    let mut idxs = IntSet::from_values(drawn.iter().map(|&i| i as u64));
    let example = example_idx as u64;
    if idxs.discard(example) {
        // `if len(fewshot_idxs) >= dataset_size - 1: return` cannot fire: one was just removed.
        if idxs.len() >= dataset_size - 1 {
            return to_rows(&idxs);
        }
        let mut replacement = rng.choice_index(dataset_size) as u64;
        while idxs.contains(replacement) || replacement == example {
            replacement = rng.choice_index(dataset_size) as u64;
        }
        idxs.add(replacement);
    }
    to_rows(&idxs)
}

fn to_rows(set: &IntSet) -> Vec<usize> {
    set.iter().map(|i| i as usize).collect()
}

/// The shots (dataset row indices, in prompt order) of every example of an llm-foundry ICL dataset of
/// `dataset_size` rows, seeded with `fewshot_random_seed` (llm-foundry's default is 1234). Example `i`
/// is entry `i`; all examples are drawn in order, whichever of them are evaluated.
pub fn llm_foundry_shots(dataset_size: usize, num_fewshot: usize, fewshot_random_seed: i128) -> Vec<Vec<usize>> {
    let mut rng = Random::new(fewshot_random_seed);
    (0..dataset_size)
        .map(|i| if num_fewshot > 0 { llm_foundry_sample_idxs(dataset_size, num_fewshot, i, &mut rng) } else { vec![] })
        .collect()
}

/// lm-eval would fail: `random.sample` was asked for more few-shot docs than the pool holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "lm-eval cannot draw the shots of evaluated document {doc}: it samples {draw} of {pool} few-shot \
     documents (random.sample raises ValueError)"
)]
pub struct LmEvalPoolTooSmall {
    /// Position of the evaluated doc in the sequence given.
    pub doc: usize,
    pub draw: usize,
    pub pool: usize,
}

/// One call of lm-eval's `ContextSampler.sample(n, eval_doc)` on a pool of `pool_size` docs:
/// `equal_rows` is `None` without an `eval_doc`, else the pool rows equal to the evaluated doc
/// (empty if none). Returns the pool rows shown, in order; `Err` where lm-eval raises `ValueError`.
pub fn lm_eval_sample(
    rng: &mut Random,
    pool_size: usize,
    n: usize,
    equal_rows: Option<&[usize]>,
) -> Result<Vec<usize>, SampleTooLarge> {
    if n == 0 {
        return Ok(vec![]);
    }
    let Some(equal) = equal_rows else {
        return rng.sample_range(pool_size, n);
    };
    let mut shots: Vec<usize> =
        rng.sample_range(pool_size, n + 1)?.into_iter().filter(|r| !equal.contains(r)).collect();
    shots.truncate(n);
    if shots.len() < n {
        let pool: Vec<usize> = (0..pool_size).filter(|r| !equal.contains(r)).collect();
        shots = rng.sample_range(pool.len(), n)?.into_iter().map(|p| pool[p]).collect();
    }
    Ok(shots)
}

/// The shots (pool row indices, in prompt order) lm-eval shows for each evaluated doc of one process,
/// with `fewshot_random_seed` (lm-eval's default 1234) and `num_fewshot` shots drawn from a pool of
/// `pool_size` docs. `docs` are the evaluated docs in lm-eval's order, each `None` (no `eval_doc`:
/// the fewshot split is not the test split) or `Some(rows)`, the pool rows equal to that doc.
pub fn lm_eval_shots<I, R>(
    pool_size: usize,
    num_fewshot: usize,
    fewshot_random_seed: i128,
    docs: I,
) -> Result<Vec<Vec<usize>>, LmEvalPoolTooSmall>
where
    I: IntoIterator<Item = Option<R>>,
    R: AsRef<[usize]>,
{
    let mut rng = Random::new(fewshot_random_seed);
    docs.into_iter()
        .enumerate()
        .map(|(doc, equal)| {
            let equal = equal.as_ref().map(AsRef::as_ref);
            if let Some(rows) = equal {
                assert!(rows.iter().all(|&r| r < pool_size), "doc {doc}: equal rows {rows:?} outside the pool");
            }
            lm_eval_sample(&mut rng, pool_size, num_fewshot, equal).map_err(|e| LmEvalPoolTooSmall {
                doc,
                draw: e.k,
                pool: e.n,
            })
        })
        .collect()
}

/// [`lm_eval_shots`] for a task whose few-shot split is its test split (`fewshot_split ==
/// test_split`) and has no duplicate docs: all `n` docs evaluated in order, doc `i` equal to row `i`
/// only. Needs `num_fewshot < n` (else lm-eval fails) unless `num_fewshot == 0`.
pub fn lm_eval_shots_same_split(
    n: usize,
    num_fewshot: usize,
    fewshot_random_seed: i128,
) -> Result<Vec<Vec<usize>>, LmEvalPoolTooSmall> {
    lm_eval_shots(n, num_fewshot, fewshot_random_seed, (0..n).map(|i| Some([i])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llm_foundry_shots_are_distinct_and_never_the_example() {
        for n in [1, 2, 3, 6, 22, 100] {
            for k in [0, 1, 5, 30] {
                let all = llm_foundry_shots(n, k, 1234);
                assert_eq!(all.len(), n);
                for (i, s) in all.iter().enumerate() {
                    assert_eq!(s.len(), if k == 0 { 0 } else { k.min(n - 1) }, "n {n} k {k}");
                    assert!(!s.contains(&i) && s.iter().all(|&r| r < n), "{s:?}");
                    let mut sorted = s.clone();
                    sorted.sort_unstable();
                    sorted.dedup();
                    assert_eq!(sorted.len(), s.len());
                }
            }
        }
    }

    #[test]
    fn lm_eval_needs_a_pool_larger_than_the_shots() {
        assert_eq!(lm_eval_shots_same_split(5, 4, 1).unwrap().len(), 5);
        assert_eq!(lm_eval_shots_same_split(5, 5, 1), Err(LmEvalPoolTooSmall { doc: 0, draw: 6, pool: 5 }));
        assert_eq!(lm_eval_shots_same_split(3, 0, 1).unwrap(), vec![Vec::<usize>::new(); 3]);
        // Without an eval_doc the whole pool can be drawn, the doc itself included.
        let all = lm_eval_shots(4, 4, 1, [None::<[usize; 0]>]).unwrap();
        assert_eq!(all[0].len(), 4);
    }

    #[test]
    fn lm_eval_resamples_when_copies_of_the_doc_were_drawn() {
        // A pool of 3 rows all equal to the doc: the n + 1 draw keeps nothing and the redraw fails.
        let mut rng = Random::new(0);
        assert_eq!(lm_eval_sample(&mut rng, 3, 2, Some(&[0, 1, 2])), Err(SampleTooLarge { n: 0, k: 2 }));
        // Rows 0 and 1 equal the doc; of 4 rows, 2 shots must come from rows 2 and 3.
        for seed in 0..20 {
            let mut rng = Random::new(seed);
            let mut s = lm_eval_sample(&mut rng, 4, 2, Some(&[0, 1])).unwrap();
            s.sort_unstable();
            assert_eq!(s, [2, 3]);
        }
    }
}
