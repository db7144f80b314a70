//! `icl_data::peer_fewshot` against the peers' own code, run by CPython
//! (`scripts/peer_fewshot_reference.py`): llm-foundry 0.22.0's `get_fewshot_sample_idxs` compiled
//! from its release, lm-eval 0.4.13's `ContextSampler` and whole `ConfigurableTask`s (seeding, split
//! rule, ranks) from the venv. Every example must get the same shot rows in the same order.
//!
//! Needs the venv of `cargo xtask setup` (`$ICL_VENV`, default `~/.cache/icl/venv`) and the
//! llm-foundry wheel (`$ICL_LLM_FOUNDRY`, a wheel or unpacked tree, default
//! `~/.cache/icl/llm_foundry-0.22.0-py3-none-any.whl`; fetch it with `python -m pip download
//! --no-deps llm-foundry==0.22.0 -d ~/.cache/icl`).
#![allow(clippy::unwrap_used)]

use icl_data::peer_fewshot::{llm_foundry_shots, lm_eval_shots, lm_eval_shots_same_split};
use serde_json::Value;
use std::sync::OnceLock;

/// 0, 1, 1234 (both peers' default), a 40-bit one, one past 64 bits (3 key words), negative ones.
const SEEDS: [i128; 7] = [0, 1, 1234, 987_654_321_987, (1 << 70) + 3, -1234, -7];

/// (dataset size, shots): n <= k + 1, k = 0, n = 1, both branches of `random.sample` and their
/// boundaries (setsize 21 for k <= 5, 85 for k = 10, 277 for k = 25).
const LLM_FOUNDRY_SIZES: [(usize, usize); 20] = [
    (1, 1),
    (1, 5),
    (2, 1),
    (2, 5),
    (3, 2),
    (4, 3),
    (5, 5),
    (6, 5),
    (10, 5),
    (21, 5),
    (22, 5),
    (40, 0),
    (30, 1),
    (85, 10),
    (86, 10),
    (200, 5),
    (277, 25),
    (278, 25),
    (64, 63),
    (500, 3),
];

/// One lm-eval sampler case: pool contents (equal ids are equal docs) and the evaluated docs.
struct SamplerCase {
    pool: Vec<u32>,
    eval: Vec<Option<u32>>,
    k: usize,
    seed: i128,
}

fn sampler_cases() -> Vec<SamplerCase> {
    let mut cases = Vec::new();
    for &seed in &SEEDS {
        // Pool = the evaluated split, distinct docs (lm_eval_shots_same_split), k = n - 1 included.
        for (n, k) in [(2, 1), (3, 2), (5, 3), (6, 5), (10, 5), (21, 5), (22, 5), (50, 3), (200, 10), (300, 25)] {
            cases.push(SamplerCase { pool: (0..n).collect(), eval: (0..n).map(Some).collect(), k, seed });
        }
        // k >= pool with an eval_doc: lm-eval fails.
        cases.push(SamplerCase { pool: (0..5).collect(), eval: (0..5).map(Some).collect(), k: 5, seed });
        // Another split (no eval_doc): the whole pool may be drawn; an empty pool fails.
        cases.push(SamplerCase { pool: (0..7).collect(), eval: vec![None; 9], k: 7, seed });
        cases.push(SamplerCase { pool: (0..40).collect(), eval: vec![None; 12], k: 5, seed });
        cases.push(SamplerCase { pool: vec![], eval: vec![None], k: 1, seed });
        // eval_doc passed but not in the pool: the first n of n + 1.
        cases.push(SamplerCase { pool: (0..30).collect(), eval: (100..110).map(Some).collect(), k: 4, seed });
        // Duplicate docs: every copy of the evaluated doc is dropped, sometimes too many (a redraw).
        let pool = vec![0, 0, 0, 1, 2, 3, 1, 4, 0, 5];
        cases.push(SamplerCase { pool: pool.clone(), eval: pool.iter().map(|&c| Some(c)).collect(), k: 3, seed });
        cases.push(SamplerCase { pool: vec![0, 0, 0, 1, 2], eval: vec![Some(0); 12], k: 2, seed });
    }
    cases
}

/// One whole lm-eval task: the `split` variants of the script.
struct TaskCase {
    n: usize,
    k: usize,
    seed: i128,
    world_size: usize,
    split: &'static str,
    train_n: usize,
}

fn task_cases() -> Vec<TaskCase> {
    let case = |n, k, seed, world_size, split, train_n| TaskCase { n, k, seed, world_size, split, train_n };
    vec![
        case(12, 3, 1234, 1, "test", 0),
        case(12, 3, 1234, 3, "test", 0),
        case(6, 5, 0, 1, "test", 0),
        case(5, 5, 1, 1, "test", 0),
        case(4, 0, 1, 1, "test", 0),
        case(8, 4, -3, 2, "train", 20),
        case(8, 3, 7, 1, "none", 0),
        case(9, 2, (1 << 70) + 3, 1, "validation", 0),
    ]
}

fn cases_json() -> String {
    let llm_foundry: Vec<String> = SEEDS
        .iter()
        .flat_map(|seed| LLM_FOUNDRY_SIZES.iter().map(move |(n, k)| format!(r#"{{"n":{n},"k":{k},"seed":"{seed}"}}"#)))
        .collect();
    let opt = |c: &Option<u32>| c.map_or("null".to_owned(), |c| c.to_string());
    let sampler: Vec<String> = sampler_cases()
        .iter()
        .map(|c| {
            let pool: Vec<String> = c.pool.iter().map(u32::to_string).collect();
            let eval: Vec<String> = c.eval.iter().map(opt).collect();
            format!(r#"{{"pool":[{}],"eval":[{}],"k":{},"seed":"{}"}}"#, pool.join(","), eval.join(","), c.k, c.seed)
        })
        .collect();
    let task: Vec<String> = task_cases()
        .iter()
        .map(|c| {
            format!(
                r#"{{"n":{},"k":{},"seed":"{}","world_size":{},"split":"{}","train_n":{}}}"#,
                c.n, c.k, c.seed, c.world_size, c.split, c.train_n
            )
        })
        .collect();
    format!(
        r#"{{"llm_foundry":[{}],"lm_eval_sampler":[{}],"lm_eval_task":[{}]}}"#,
        llm_foundry.join(","),
        sampler.join(","),
        task.join(",")
    )
}

/// The script's answers to all cases (one CPython process for every test of this file).
fn reference() -> &'static Value {
    static REFERENCE: OnceLock<Value> = OnceLock::new();
    REFERENCE.get_or_init(|| icl_test_support::llm_foundry_reference("peer_fewshot_reference.py", &cases_json()))
}

fn shot_rows(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|r| r.as_u64().unwrap() as usize).collect()
}

fn rows(v: &Value) -> Vec<Vec<usize>> {
    v.as_array().unwrap().iter().map(shot_rows).collect()
}

/// A rank's `[[doc_id, [row, ...]], ...]` as (doc ids, shots).
fn rank_docs(v: &Value) -> (Vec<usize>, Vec<Vec<usize>>) {
    v.as_array().unwrap().iter().map(|d| (d[0].as_u64().unwrap() as usize, shot_rows(&d[1]))).unzip()
}

#[test]
fn llm_foundry_shots_match_llm_foundry() {
    let answers = reference()["llm_foundry"].as_array().unwrap();
    let mut cases = SEEDS.iter().flat_map(|&seed| LLM_FOUNDRY_SIZES.iter().map(move |&(n, k)| (n, k, seed)));
    let mut self_drawn = 0;
    for answer in answers {
        let (n, k, seed) = cases.next().unwrap();
        let theirs = rows(&answer["shots"]);
        assert_eq!(llm_foundry_shots(n, k, seed), theirs, "n {n} k {k} seed {seed}");
        self_drawn += answer["choice_calls"].as_u64().unwrap();
    }
    assert!(cases.next().is_none(), "fewer answers than cases");
    // The replacement draw (`rng.choice` after an example drew itself) ran, more than once.
    assert!(self_drawn > 10, "the self-draw path ran {self_drawn} times");
}

#[test]
fn lm_eval_shots_match_lm_eval_sampler() {
    let answers = reference()["lm_eval_sampler"].as_array().unwrap();
    let cases = sampler_cases();
    assert_eq!(answers.len(), cases.len());
    let (mut self_drawn, mut resampled, mut errors) = (0, 0, 0);
    for (c, answer) in cases.iter().zip(answers) {
        let equal: Vec<Option<Vec<usize>>> =
            c.eval.iter().map(|e| e.map(|id| (0..c.pool.len()).filter(|&r| c.pool[r] == id).collect())).collect();
        let ours = lm_eval_shots(c.pool.len(), c.k, c.seed, equal);
        let what = format!("pool {:?} eval {:?} k {} seed {}", c.pool, c.eval, c.k, c.seed);
        match answer.get("error") {
            Some(e) => {
                assert!(ours.is_err(), "{what}: lm-eval raised {e}, icl gave {ours:?}");
                errors += 1;
            }
            None => assert_eq!(ours.unwrap(), rows(&answer["shots"]), "{what}"),
        }
        // Pool = the evaluated docs, distinct, in order: the convenience form gives the same.
        let n = c.pool.len() as u32;
        if c.pool == (0..n).collect::<Vec<_>>() && c.eval == (0..n).map(Some).collect::<Vec<_>>() {
            let same = lm_eval_shots_same_split(c.pool.len(), c.k, c.seed);
            assert_eq!(same.ok(), answer.get("shots").map(rows), "{what}");
        }
        self_drawn += answer["self_drawn"].as_u64().unwrap();
        resampled += answer["resampled"].as_u64().unwrap();
    }
    // The paths exercised: eval doc drawn and dropped, the redraw after duplicates, lm-eval's errors.
    assert!(self_drawn > 100 && resampled > 0 && errors == 2 * SEEDS.len(), "{self_drawn} {resampled} {errors}");
}

#[test]
fn lm_eval_shots_match_whole_lm_eval_tasks() {
    let answers = reference()["lm_eval_task"].as_array().unwrap();
    let cases = task_cases();
    assert_eq!(answers.len(), cases.len());
    for (c, answer) in cases.iter().zip(answers) {
        let what = format!("n {} k {} seed {} world {} split {}", c.n, c.k, c.seed, c.world_size, c.split);
        for rank in 0..c.world_size {
            // The rank's docs, as lm-eval's islice(docs, rank, None, world_size) deals them.
            let docs: Vec<usize> = (rank..c.n).step_by(c.world_size).collect();
            let ours = match c.split {
                "test" | "validation" => lm_eval_shots(c.n, c.k, c.seed, docs.iter().map(|&i| Some([i]))),
                "none" => lm_eval_shots(c.n, c.k, c.seed, docs.iter().map(|_| None::<[usize; 0]>)),
                "train" => lm_eval_shots(c.train_n, c.k, c.seed, docs.iter().map(|_| None::<[usize; 0]>)),
                _ => unreachable!(),
            };
            if answer.get("error").is_some() {
                assert!(ours.is_err(), "{what}: lm-eval failed, icl gave {ours:?}");
                continue;
            }
            let (doc_ids, shots) = rank_docs(&answer["ranks"][rank]);
            assert_eq!(doc_ids, docs, "{what} rank {rank}: docs");
            assert_eq!(ours.unwrap(), shots, "{what} rank {rank}");
        }
        if c.world_size == 1 && (c.split == "test" || c.split == "validation") && answer.get("error").is_none() {
            let (_, shots) = rank_docs(&answer["ranks"][0]);
            assert_eq!(lm_eval_shots_same_split(c.n, c.k, c.seed).unwrap(), shots, "{what}");
        }
    }
    // Several ranks give other prompts than one process (the 3-rank case against the 1-rank one).
    let one = lm_eval_shots_same_split(12, 3, 1234).unwrap();
    let rank1: Vec<Vec<usize>> = lm_eval_shots(12, 3, 1234, (1..12).step_by(3).map(|i| Some([i]))).unwrap();
    assert_ne!(rank1, (1..12).step_by(3).map(|i| one[i].clone()).collect::<Vec<_>>());
}
