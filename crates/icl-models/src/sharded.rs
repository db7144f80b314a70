//! Parameter sharding (FSDP) for the models: each rank keeps `1/N` of every stage's parameters and
//! gathers a stage's just before the model computes it.
//!
//! The models run each [`Stage`] of their forward pass inside `Hooks::around`, which calls
//! [`ParameterHooks::enter`] and [`ParameterHooks::leave`] around it; without hooks it only runs it. [`ModelSpec::load_sharded`] declares a model without reading any
//! weight, groups its parameters into stages by their checkpoint names ([`ModelSpec::stage_of`], which each
//! architecture answers), reads this
//! rank's slice of each stage from the checkpoint into `icl_shard::fsdp` flat shards, and installs
//! hooks that gather a stage when it is entered, start gathering the next one at the same time (so
//! the exchange overlaps the computation), and free it when it is left.
//!
//! Why the split: icl-shard stays model-agnostic (tch only): flat layouts, gathers and prefetch over
//! any [`icl_shard::Collective`]. This crate owns what is model-specific: names, stages and the
//! checkpoint reader.

use crate::model::Declared;
use crate::weights::CheckpointReader;
use crate::{layers, CausalLm, Dtype, Error, KvCache, ModelInput, ModelSpec, Result};
use icl_shard::fsdp::{HeldBytes, ShardedParameters, SharedCollective, UnitTensor};
use std::collections::BTreeMap;
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

/// A part of the forward pass whose parameters are used together, in the order a forward pass runs
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// Token (and learned position) embeddings.
    Embedding,
    /// Transformer block `i`.
    Block(usize),
    /// The norm after the last block.
    FinalNorm,
    /// The output projection. A tied head has no parameters of its own: it uses the embedding's.
    Head,
}

/// Called by a model around each stage of its forward pass.
pub trait ParameterHooks: std::fmt::Debug {
    /// Before the stage computes: its parameters must hold their values when this returns.
    fn enter(&self, stage: Stage) -> Result<()>;
    /// After the stage computed.
    fn leave(&self, stage: Stage) -> Result<()>;
}

/// The hooks a model calls; none by default.
#[derive(Debug, Clone, Default)]
pub struct Hooks(Option<Rc<dyn ParameterHooks>>);

impl Hooks {
    pub fn new(hooks: Rc<dyn ParameterHooks>) -> Self {
        Self(Some(hooks))
    }

    /// Runs `compute`, one stage of a forward pass, between the hooks' `enter` and `leave`.
    pub(crate) fn around<T>(&self, stage: Stage, compute: impl FnOnce() -> Result<T>) -> Result<T> {
        let Some(hooks) = &self.0 else { return compute() };
        hooks.enter(stage)?;
        let out = compute()?;
        hooks.leave(stage)?;
        Ok(out)
    }
}

/// Gathers stages of one model's sharded parameters as its forward pass enters them.
#[derive(Debug)]
struct StageGatherer {
    parameters: Rc<ShardedParameters>,
    /// The units (indices into `parameters`) each stage computes with.
    units_of: BTreeMap<Stage, Vec<usize>>,
    /// Stages in forward order, for prefetching the next one.
    order: Vec<Stage>,
    /// Whether entering a stage starts the next one's gather (on by default; off to measure it).
    prefetch: std::cell::Cell<bool>,
}

impl StageGatherer {
    fn units(&self, stage: Stage) -> &[usize] {
        self.units_of.get(&stage).map_or(&[], Vec::as_slice)
    }

    fn next(&self, stage: Stage) -> Option<Stage> {
        let at = self.order.iter().position(|s| *s == stage)?;
        self.order.get(at + 1).copied()
    }
}

impl StageGatherer {
    /// Every rank says whether it is about to run a forward pass; returns how many are. The first
    /// collective of every forward pass, and of every turn of [`ShardedModel::finish_collectives`].
    fn vote(&self, running: bool) -> Result<i64> {
        let collective = self.parameters.collective();
        if collective.world_size() == 1 {
            return Ok(i64::from(running));
        }
        let mut count = Tensor::from_slice(&[i64::from(running)]);
        collective.all_reduce_sum(&mut count)?;
        Ok(count.f_int64_value(&[0])?)
    }

    fn enter_stage(&self, stage: Stage) -> Result<()> {
        if stage == Stage::Embedding {
            // A new forward pass: drop the head kept from the previous one (unless it is this stage's).
            for &unit in self.units(Stage::Head) {
                if !self.units(stage).contains(&unit) {
                    self.parameters.release(unit)?;
                }
            }
        }
        for &unit in self.units(stage) {
            self.parameters.gather(unit)?;
        }
        // Start the next stage's exchange now, so that it runs while this stage computes.
        if let Some(next) = self.next(stage).filter(|_| self.prefetch.get()) {
            for &unit in self.units(next) {
                self.parameters.prefetch(unit)?;
            }
        }
        Ok(())
    }

    fn leave_stage(&self, stage: Stage) -> Result<()> {
        // The head stays gathered until the next forward pass: callers apply it in chunks, as many as
        // their own batch needs, and a collective per chunk would need every rank to make the same
        // number. Every other stage is freed at once.
        if stage == Stage::Head {
            return Ok(());
        }
        for &unit in self.units(stage) {
            self.parameters.release(unit)?;
        }
        Ok(())
    }
}

impl ParameterHooks for StageGatherer {
    fn enter(&self, stage: Stage) -> Result<()> {
        if stage == Stage::Embedding {
            self.vote(true)?;
        }
        self.enter_stage(stage)
    }

    fn leave(&self, stage: Stage) -> Result<()> {
        self.leave_stage(stage)
    }
}

/// A model whose parameters are sharded over ranks. Each forward pass ([`CausalLm::hidden_at`],
/// [`CausalLm::hidden_cached`], [`CausalLm::logits`], [`CausalLm::log_probs_at`]) gathers every stage
/// with the other ranks, so ranks may run different numbers of forward passes (each its own
/// examples) only if every rank then calls [`ShardedModel::finish_collectives`], which takes part in
/// the others' remaining passes.
/// [`CausalLm::head_logits`] (and so [`CausalLm::head_log_probs`]) after a forward pass needs no other rank and may be called any
/// number of times.
pub struct ShardedModel {
    model: Box<dyn CausalLm>,
    parameters: Rc<ShardedParameters>,
    gatherer: Rc<StageGatherer>,
}

impl std::fmt::Debug for ShardedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedModel").field("parameters", &self.parameters).finish_non_exhaustive()
    }
}

impl ShardedModel {
    /// Parameter bytes this rank holds: shards, gathered now, peak so far, and the unsharded total.
    pub fn held_bytes(&self) -> HeldBytes {
        self.parameters.held_bytes()
    }

    /// Takes part in the other ranks' forward passes (gathering every stage with them, computing
    /// nothing) until every rank has called this: how ranks that ran fewer forward passes than others
    /// stay in step. Call it after this rank's last forward pass of a phase, before any other
    /// collective (such as gathering results); every rank must call it the same number of times.
    pub fn finish_collectives(&self) -> Result<()> {
        let g = &self.gatherer;
        while g.vote(false)? > 0 {
            for &stage in g.order.iter().filter(|s| **s != Stage::Head) {
                g.enter_stage(stage)?;
                g.leave_stage(stage)?;
            }
        }
        Ok(())
    }

    /// Turns prefetching on (the default) or off: with it, entering a stage starts the next stage's
    /// gather so that it overlaps this stage's computation; without, each gather starts when its
    /// stage is entered. Every rank must choose the same.
    pub fn set_prefetch(&self, on: bool) {
        self.gatherer.prefetch.set(on);
    }

    /// Seconds spent blocked in gathers so far: communication that did not overlap computation.
    pub fn blocked_seconds(&self) -> f64 {
        self.parameters.blocked_seconds()
    }

    /// Each stage's name and the bytes its parameters take while gathered.
    pub fn stage_bytes(&self) -> Vec<(String, usize)> {
        self.parameters.unit_bytes()
    }
}

impl CausalLm for ShardedModel {
    fn hidden_at(&self, input: &ModelInput, scored: &Tensor) -> Result<Tensor> {
        self.model.hidden_at(input, scored)
    }
    fn hidden_cached(&self, input: &ModelInput, cache: &mut KvCache) -> Result<Tensor> {
        self.model.hidden_cached(input, cache)
    }
    fn head_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.model.head_logits(hidden)
    }
    fn logits(&self, input: &ModelInput) -> Result<Tensor> {
        self.model.logits(input)
    }
    fn vocab_size(&self) -> i64 {
        self.model.vocab_size()
    }
    fn max_length(&self) -> usize {
        self.model.max_length()
    }
    fn eos_token_id(&self) -> Option<u32> {
        self.model.eos_token_id()
    }
    fn device(&self) -> Device {
        self.model.device()
    }
    fn kind(&self) -> Kind {
        self.model.kind()
    }
    /// The whole model's parameter bytes (what one unsharded copy holds), as for any model.
    fn parameter_bytes(&self) -> usize {
        self.parameters.held_bytes().unsharded
    }
    fn forward_flops(&self, lengths: &[usize], scored: usize) -> f64 {
        self.model.forward_flops(lengths, scored)
    }
    fn finish_collectives(&self) -> Result<()> {
        ShardedModel::finish_collectives(self)
    }
    fn is_training(&self) -> bool {
        self.model.is_training()
    }
    fn set_training(&self, training: bool) {
        self.model.set_training(training);
    }
}

impl ModelSpec {
    /// Loads the model with its parameters sharded over `collective`'s ranks (every rank calls this
    /// with the same arguments). No rank reads or holds more of the checkpoint than its shard: the
    /// model is declared with shapes only (no memory for its parameters), and each rank reads its
    /// slice of each stage's tensors from the safetensors files.
    pub fn load_sharded(&self, dtype: Dtype, device: Device, collective: SharedCollective) -> Result<ShardedModel> {
        crate::weights::check_checkpoint_holds(&self.dir, self.config.parameter_lower_bound())?;
        let vs = layers::var_store(dtype.kind(), device);
        let model = layers::declare_shapes_only(|| self.config.declare(vs, &self.dir))?;
        shard(model, self, collective)
    }
}

fn shard(mut model: Box<dyn Declared>, spec: &ModelSpec, collective: SharedCollective) -> Result<ShardedModel> {
    let dir = &spec.dir;
    let reader = CheckpointReader::open(dir)?;
    let mut by_stage: BTreeMap<Stage, Vec<UnitTensor>> = BTreeMap::new();
    let mut variables: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, tensor) in variables {
        let stage = spec.stage_of(&name).ok_or_else(|| Error::Tensor {
            path: dir.to_owned(),
            tensor: name.clone(),
            message: "no forward stage uses this parameter, so it cannot be sharded".into(),
        })?;
        reader.check_shape(&name, &tensor.size())?;
        by_stage.entry(stage).or_default().push(UnitTensor { name, tensor });
    }
    let order: Vec<Stage> = by_stage.keys().copied().collect();
    let mut units_of: BTreeMap<Stage, Vec<usize>> = order.iter().enumerate().map(|(i, s)| (*s, vec![i])).collect();
    if !units_of.contains_key(&Stage::Head) {
        // A tied head computes with the embedding.
        let embedding = units_of.get(&Stage::Embedding).cloned().unwrap_or_default();
        units_of.insert(Stage::Head, embedding);
    }
    let mut order = order;
    if !order.contains(&Stage::Head) {
        order.push(Stage::Head);
    }
    let units = by_stage.into_iter().map(|(stage, tensors)| (format!("{stage:?}"), tensors)).collect();
    let (kind, device) = (model.var_store().kind(), model.var_store().device());
    let parameters =
        Rc::new(ShardedParameters::new(collective, units, kind, device, |name, elements, destination| {
            reader.read_into(name, elements, destination)
        })?);
    parameters.reserve_buffers()?;
    let gatherer = Rc::new(StageGatherer {
        parameters: parameters.clone(),
        units_of,
        order,
        prefetch: std::cell::Cell::new(true),
    });
    model.set_hooks(Hooks::new(gatherer.clone()));
    Ok(ShardedModel { model: model.into_causal_lm(), parameters, gatherer })
}
