//! Parameter sharding (`ModelSpec::load_sharded`): the sharded model's logits equal the unsharded
//! model's for every architecture and 1, 2 and 3 ranks, each rank holds `1/N` of the parameters plus
//! the stages it computes with, and a sharded checkpoint (several safetensors files) loads the same.
//! Ranks are threads of this process here (`icl_shard::ThreadRanks`); the same check
//! runs over MPI in `icl-shard`'s `mpirun` tests.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use icl_models::{CausalLm, Dtype, ModelInput, ModelSpec, ShardedModel};
use icl_shard::fsdp::SharedCollective;
use icl_shard::{Collective, SingleProcess, ThreadRanks};
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

fn input() -> ModelInput {
    let ids =
        Tensor::from_slice(&[15496i64, 11, 995, 13, 314, 716, 257, 1332, 286, 262, 6334, 13, 50256, 464, 3797, 3332])
            .view([2, 8]);
    ModelInput::causal(&ids).unwrap()
}

/// Logits of the sharded model on `rank` of `collective`, and its held bytes.
fn sharded_logits(name: &str, collective: SharedCollective) -> (Tensor, ShardedModel) {
    let spec = ModelSpec::read(&model_dir(name)).unwrap();
    let model = spec.load_sharded(Dtype::F32, Device::Cpu, collective).unwrap();
    let logits = model.logits(&input()).unwrap();
    (logits, model)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max().double_value(&[])
}

const MODELS: &[&str] = &[
    "gpt-neo-tiny",
    "gpt2-tiny",
    "pythia-tiny",
    "llama-tiny",
    "llama-tiny-tied",
    "phi3-tiny",
    "phi3-tiny-tied",
    "mpt-tiny",
    "mpt-tiny-odd",
    "qwen2-tiny",
    "qwen2-tiny-tied",
    "qwen3-tiny",
    "qwen3-tiny-tied",
    "gemma2-tiny",
    "olmo2-tiny",
];

#[test]
fn one_rank_equals_the_unsharded_model() {
    for name in MODELS {
        let want = load(name, Dtype::F32).logits(&input()).unwrap();
        let (got, model) = sharded_logits(name, Rc::new(SingleProcess));
        let diff = max_abs_diff(&got, &want);
        assert!(diff <= 1e-5, "{name}: max |diff| {diff}");
        // Scoring through hidden_at + head_log_probs in several chunks needs no other rank.
        let scored = Tensor::from_slice(&[0i64, 5, 7, 9, 15]);
        let hidden = model.hidden_at(&input(), &scored).unwrap();
        let first = model.head_log_probs(&hidden.narrow(0, 0, 2)).unwrap();
        let rest = model.head_log_probs(&hidden.narrow(0, 2, 3)).unwrap();
        let want = want.view([16, -1]).index_select(0, &scored).log_softmax(-1, Kind::Float);
        let diff = max_abs_diff(&Tensor::cat(&[first, rest], 0), &want);
        assert!(diff <= 1e-5, "{name}: log-probs max |diff| {diff}");
        let held = model.held_bytes();
        assert_eq!(held.shards, held.unsharded, "{name}: one rank holds everything");
        assert_eq!(model.parameter_bytes(), load(name, Dtype::F32).parameter_bytes(), "{name}");
    }
}

#[test]
fn two_and_three_ranks_equal_the_unsharded_model_and_hold_a_share() {
    for name in MODELS {
        let want = load(name, Dtype::F32).logits(&input()).unwrap();
        for n in [2, 3] {
            let results: Vec<(f64, icl_shard::fsdp::HeldBytes, usize)> = std::thread::scope(|s| {
                let handles: Vec<_> = ThreadRanks::group(n)
                    .into_iter()
                    .map(|rank| {
                        s.spawn(move || {
                            let (got, model) = sharded_logits(name, Rc::new(rank));
                            // A second pass reuses the shards (and the head kept from the first).
                            let again = model.logits(&input()).unwrap();
                            assert!(got.equal(&again), "{name}: a second forward pass differs");
                            // Gather buffers are allocated once, at load: per gather size, one per
                            // stage of that size, at most two (a stage and the next one, prefetched).
                            let mut sizes: Vec<usize> = model.stage_bytes().iter().map(|(_, b)| *b).collect();
                            sizes.sort_unstable();
                            let mut reserved = 0;
                            for (i, size) in sizes.iter().enumerate() {
                                let same_before = sizes[..i].iter().filter(|s| *s == size).count();
                                if same_before < 2 {
                                    reserved += size;
                                }
                            }
                            (got, model.held_bytes(), reserved)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        let (got, held, largest) = h.join().unwrap();
                        (max_abs_diff(&got, &want), held, largest)
                    })
                    .collect()
            });
            for (rank, (diff, held, reserved)) in results.iter().enumerate() {
                assert!(*diff <= 1e-5, "{name}, {n} ranks, rank {rank}: max |diff| {diff}");
                // Each stage's shard is ceil(stage / n): at most one element of padding per stage.
                let share = held.unsharded / n;
                assert!(held.shards >= share && held.shards <= share + 4 * 64, "{name}, {n} ranks: {held:?}");
                // Never a gather buffer beyond those: two stages at most at once, buffers reused.
                assert_eq!(held.peak, held.shards + reserved, "{name}, {n} ranks: {held:?}");
                assert_eq!(held.gathered + held.spare, *reserved, "{name}, {n} ranks: {held:?}");
            }
        }
    }
}

/// Ranks run their own batches (of different shapes) and different numbers of forward passes, as
/// data-parallel ranks do; `finish_collectives` keeps them in step, after which every rank can use the
/// collective for something else and run more forward passes.
#[test]
fn ranks_with_different_batches_and_pass_counts_stay_in_step() {
    for name in ["llama-tiny", "gpt-neo-tiny"] {
        let model_full = load(name, Dtype::F32);
        let passes = [2usize, 0, 3];
        std::thread::scope(|s| {
            let handles: Vec<_> = ThreadRanks::group(passes.len())
                .into_iter()
                .map(|rank| {
                    s.spawn(move || {
                        let r = rank.rank();
                        let collective: Rc<dyn Collective> = Rc::new(rank);
                        let spec = ModelSpec::read(&model_dir(name)).unwrap();
                        let model = spec.load_sharded(Dtype::F32, Device::Cpu, collective.clone()).unwrap();
                        let mut outputs = Vec::new();
                        for pass in 0..passes[r] + 1 {
                            if pass == passes[r] {
                                // Everyone's passes are done: something else collective, then one more pass each.
                                model.finish_collectives().unwrap();
                                let ranks = collective.all_gather(&Tensor::from_slice(&[r as i64])).unwrap();
                                assert_eq!(ranks.len(), passes.len());
                            }
                            let len = 3 + r as i64 + pass as i64;
                            let ids =
                                Tensor::arange(2 * len, (Kind::Int64, Device::Cpu)).view([2, len]) + 100 * r as i64;
                            let logits = model.logits(&ModelInput::causal(&ids).unwrap()).unwrap();
                            outputs.push((ids, logits));
                        }
                        model.finish_collectives().unwrap();
                        outputs
                    })
                })
                .collect();
            for h in handles {
                for (ids, got) in h.join().unwrap() {
                    let want = model_full.logits(&ModelInput::causal(&ids).unwrap()).unwrap();
                    assert!(max_abs_diff(&got, &want) <= 1e-5, "{name}");
                }
            }
        });
    }
}

/// A checkpoint split over several safetensors files (`model.safetensors.index.json`): each rank's
/// slices come from whichever file holds each tensor.
#[test]
fn split_checkpoints_shard_the_same() {
    let dir = model_dir("gpt-neo-tiny").with_file_name("gpt-neo-tiny-sharded");
    assert!(dir.join("model.safetensors.index.json").is_file(), "{} missing: run `cargo xtask setup`", dir.display());
    let want = icl_models::load_model(&dir, Dtype::F32, Device::Cpu).unwrap().logits(&input()).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = ThreadRanks::group(2)
            .into_iter()
            .map(|rank| {
                let dir = dir.clone();
                s.spawn(move || {
                    let model =
                        ModelSpec::read(&dir).unwrap().load_sharded(Dtype::F32, Device::Cpu, Rc::new(rank)).unwrap();
                    model.logits(&input()).unwrap()
                })
            })
            .collect();
        for h in handles {
            assert!(max_abs_diff(&h.join().unwrap(), &want) <= 1e-5);
        }
    });
}
