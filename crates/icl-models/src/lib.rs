//! Causal language models on tch, loaded from Hugging Face checkpoint folders.
//!
//! The architectures are listed in one table, `registry::ARCHITECTURES`, and chosen by `model_type`
//! in `config.json` ([`ModelSpec::read`]; [`supported_model_types`] lists them). Each lives in one
//! file:
//!
//! | `model_type` | file | models |
//! |---|---|---|
//! | `gpt_neo` | `gpt_neo.rs` | GPT-Neo (global and local attention, learned positions; trainable) |
//! | `gpt2` | `gpt2.rs` | GPT-2 (`Conv1D` weights, learned positions, tied head) |
//! | `gpt_neox` | `gpt_neox.rs` | Pythia, GPT-NeoX (parallel or sequential residual, partial rotary, `embed_out`) |
//! | `llama`, `mistral` | `llama.rs` | Llama 2/3, SmolLM2, Mistral (RoPE with none/linear/llama3 scaling, RMSNorm, SwiGLU, grouped-query attention, sliding window) |
//! | `qwen2` | `qwen2.rs` | Qwen2, Qwen2.5 (q/k/v biases, per-layer sliding windows) |
//! | `qwen3` | `qwen3.rs` | Qwen3 dense (per-head q/k norms, `head_dim`) |
//! | `gemma2` | `gemma2.rs` | Gemma 2 (scaled embeddings, `1 + weight` pre- and post-norms, soft caps, alternating windows) |
//! | `phi3` | `phi3.rs` | Phi-3 (fused `qkv_proj` and `gate_up_proj`, partial rotary, sliding window) |
//! | `olmo2` | `olmo2.rs` | OLMo 2 (norms after attention and MLP, whole-projection q/k norms) |
//! | `mpt` | `mpt.rs` | MPT (ALiBi within packed sequences, no position embeddings, bias-free LayerNorms) |
//!
//! The Llama-family architectures (llama, mistral, qwen2, qwen3, gemma2, olmo2) share one network,
//! `layers::RotaryDecoder` over a validated `layers::StackSpec`; their files hold their configs,
//! defaults and what they change in it.
//!
//! Invariant: an architecture is its file and its line in the registry; nothing else knows it. The
//! file holds a serde `Config` that mirrors Hugging Face's `config.json` (serde defaults for what
//! the file may omit), a private validated form of it (every derived value resolved, errors naming
//! the file and field) that states the sizes, a parameter lower bound, the tensors and the FSDP
//! stage of each checkpoint name, private layers declared under the checkpoint's names, and a
//! public `…Decoder` implementing [`Decoder`]. [`Model`] is the one implementation of [`CausalLm`]
//! over any decoder: no-grad inference, hooks, the position-table check, masks and windows, the
//! key-value cache, training mode and parameter counts are written once, there. Shared building
//! blocks (linear and norm layers, attention, gated MLPs, activations) live in `layers.rs`, rotary
//! embeddings in `rope.rs`. Weights come only from safetensors files, single or sharded, and are
//! cast to the compute dtype while they are copied in. Every model takes positions from
//! [`ModelInput::positions`] (never from the column), so packed rows and shared prefixes give the
//! same results as separate sequences, and computes its log-softmax in f32 whatever the compute
//! dtype. Every stage of a forward pass (embedding, each block, final norm, head) runs inside
//! [`Hooks`], which is how `sharded.rs` keeps only a shard of the parameters on each rank
//! ([`ModelSpec::load_sharded`]). Generation: every model also runs incrementally over a
//! [`KvCache`] ([`CausalLm::hidden_cached`]), whose key positions the caller advances;
//! [`generate_greedy`] builds batched greedy decoding on that. `gguf` reads llama.cpp checkpoints
//! and `llama_gguf.rs` maps the Llama architecture in them to that form.

mod bf16_attention;
mod defaults;
mod gelu_tanh;
mod generate;
pub mod gguf;
mod key_spans;
mod layers;
mod llama_gguf;
mod model;
mod registry;
mod rope;
mod sharded;
mod skinny;
mod target_scores;
mod weights;

// The architectures, one file each; each also has its line in `registry::ARCHITECTURES`.
mod gemma2;
mod gpt2;
mod gpt_neo;
mod gpt_neox;
mod llama;
mod mpt;
mod olmo2;
mod phi3;
mod qwen2;
mod qwen3;

pub use gemma2::{Gemma2, Gemma2Config, Gemma2Decoder};
pub use generate::{generate_greedy, generate_greedy_after_prefix, GenerateOptions, KvCache};
pub use gpt2::{Gpt2, Gpt2Config, Gpt2Decoder};
pub use gpt_neo::{GptNeo, GptNeoConfig, GptNeoDecoder};
pub use gpt_neox::{GptNeoX, GptNeoXConfig, GptNeoXDecoder};
pub use llama::{Llama, LlamaConfig, LlamaDecoder};
pub use model::{Decoder, Model, Pass, PositionTable, Sizes};
pub use mpt::{Mpt, MptAttentionConfig, MptConfig, MptDecoder};
pub use olmo2::{Olmo2, Olmo2Config, Olmo2Decoder};
pub use phi3::{Phi3, Phi3Config, Phi3Decoder};
pub use qwen2::{Qwen2, Qwen2Config, Qwen2Decoder};
pub use qwen3::{Qwen3, Qwen3Config, Qwen3Decoder};
pub use registry::supported_model_types;
pub use rope::RopeParameters;
pub use sharded::{Hooks, ParameterHooks, ShardedModel, Stage};
pub use target_scores::{target_scores, TargetScore};
pub use weights::{attach_weights, checkpoint_files, load_weights, CheckpointReader, SafetensorsWriter};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// Input a model or the generator cannot run: positions beyond a position table, an empty
    /// prompt, a cache out of step with its mask.
    #[error("{message}")]
    Input { message: String },
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor { path: PathBuf, tensor: String, message: String },
    #[error("{dir}: {message}")]
    Checkpoint { dir: PathBuf, message: String },
    /// A GGUF file whose structure (header, metadata, tensor directory) is invalid or unsupported.
    #[error("{path}: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// A collective of a parameter-sharded model failed.
    #[error(transparent)]
    Shard(#[from] icl_shard::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Makes glibc keep freed memory for reuse instead of returning it to the kernel.
///
/// libtorch's CPU tensors come from `malloc`. By default glibc serves large blocks with a fresh `mmap`
/// and unmaps them on `free`, so every activation of every batch page-faults on first touch: on a
/// 2-core machine that is over 40% of a GPT-Neo-125M forward pass. Raising the mmap and trim
/// thresholds keeps the pages mapped between batches. Call it once, early, in a process that runs
/// models on CPU; it is a no-op elsewhere. Returns whether glibc accepted the settings.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator tunables; it is safe to call at any time.
        unsafe {
            let mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX) == 1
                || libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1;
            let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1;
            mmap && trim
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// A batch as a model sees it: token ids, the position of each token within its own sequence, and
/// which earlier tokens each token may attend to. Rows may hold several packed sequences, and sequences
/// may branch from a shared prefix (see `icl_data::Batch`).
#[derive(Debug)]
pub struct ModelInput {
    /// i64 `[rows, seq_len]`.
    pub input_ids: Tensor,
    /// i64 `[rows, seq_len]`: position embeddings and local attention windows use these.
    pub positions: Tensor,
    /// bool `[rows or 1, seq_len, seq_len]`: query `i` may attend key `j`. Architecture-specific limits
    /// (GPT-Neo's local window) are applied on top by the model.
    pub attention: Tensor,
}

impl ModelInput {
    /// Right-padded rows of one sequence each: positions `0..seq_len`, causal attention.
    pub fn causal(input_ids: &Tensor) -> Result<Self> {
        let (rows, t) = input_ids.size2()?;
        let device = input_ids.device();
        let positions = Tensor::f_arange(t, (tch::Kind::Int64, device))?;
        let attention = positions.f_unsqueeze(0)?.f_le_tensor(&positions.f_unsqueeze(1)?)?.f_unsqueeze(0)?;
        Ok(Self {
            input_ids: input_ids.shallow_clone(),
            positions: positions.f_unsqueeze(0)?.f_expand([rows, t], false)?,
            attention,
        })
    }

    /// Packed rows: token `i` may attend `j` when both belong to the same group (`segments`), `j` is in
    /// the group's prefix (branch 0) or in `i`'s own branch, and `j`'s position is not after `i`'s.
    /// Padding (segment -1) attends only to padding, so no attention row is empty.
    pub fn packed(input_ids: &Tensor, positions: &Tensor, segments: &Tensor, branches: &Tensor) -> Result<Self> {
        let pair = |t: &Tensor| -> Result<(Tensor, Tensor)> { Ok((t.f_unsqueeze(2)?, t.f_unsqueeze(1)?)) };
        let (seg_i, seg_j) = pair(segments)?;
        let (br_i, br_j) = pair(branches)?;
        let (pos_i, pos_j) = pair(positions)?;
        let attention = seg_i
            .f_eq_tensor(&seg_j)?
            .f_logical_and(&br_j.f_eq(0)?.f_logical_or(&br_j.f_eq_tensor(&br_i)?)?)?
            .f_logical_and(&pos_j.f_le_tensor(&pos_i)?)?;
        Ok(Self { input_ids: input_ids.shallow_clone(), positions: positions.shallow_clone(), attention })
    }
}

/// What the evaluator needs from a model: tokens in, log-probabilities only where they are scored.
pub trait CausalLm {
    /// Log-softmax over the vocabulary (f32, `[n, vocab]`) at `scored` (i64 `[n]`), flat indices
    /// `row * seq_len + column` into the input. The distribution at a position is the model's
    /// prediction of the token after it in its sequence.
    fn log_probs_at(&self, input: &ModelInput, scored: &Tensor) -> Result<Tensor> {
        self.head_log_probs(&self.hidden_at(input, scored)?)
    }

    /// Final hidden states (`[n, hidden]`, after the last norm) at `scored`, flat indices as in
    /// [`CausalLm::log_probs_at`]. With [`CausalLm::head_log_probs`] it lets a caller apply the
    /// output head in chunks, so that `[n, vocab]` never has to exist at once.
    fn hidden_at(&self, input: &ModelInput, scored: &Tensor) -> Result<Tensor>;

    /// The output head over final hidden states `[n, hidden]`: logits `[n, vocab]` in the compute
    /// dtype, no gradient recorded.
    fn head_logits(&self, hidden: &Tensor) -> Result<Tensor>;

    /// [`CausalLm::head_logits`] and a log-softmax in f32: `[n, vocab]`.
    fn head_log_probs(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.head_logits(hidden)?.f_log_softmax(-1, Kind::Float)?)
    }

    /// Incremental decoding: final hidden states `[rows, t, hidden]` of `input`'s `t` new tokens per
    /// row, which follow the tokens whose keys and values `cache` holds; theirs are appended to it.
    /// `input.attention` is `[rows, t, seen + t]` (the cached columns, then the new ones) and
    /// `input.positions` the new tokens' positions, which the caller has already appended to the
    /// cache ([`KvCache::advance`]); windowed attention compares them with the cached keys'
    /// positions. An empty cache makes this a plain forward pass that fills it. See
    /// [`generate_greedy`], which builds the inputs.
    fn hidden_cached(&self, input: &ModelInput, cache: &mut KvCache) -> Result<Tensor>;

    /// Logits at every position, `[rows, seq_len, vocab]` in the compute dtype.
    fn logits(&self, input: &ModelInput) -> Result<Tensor>;
    /// Number of output classes: token ids must be below it.
    fn vocab_size(&self) -> i64;

    /// Longest input the model accepts (its position table).
    fn max_length(&self) -> usize;

    /// The token that stands in for an empty context (end of text).
    fn eos_token_id(&self) -> Option<u32>;

    fn device(&self) -> Device;

    fn kind(&self) -> Kind;

    /// Bytes of parameters.
    fn parameter_bytes(&self) -> usize;

    /// Whether training-only behaviour (dropout) is on, as PyTorch's `module.training`. Models
    /// without such behaviour are always in evaluation mode.
    fn is_training(&self) -> bool {
        false
    }

    /// Turns training mode on or off (PyTorch's `train()` / `eval()`); a no-op for models without
    /// training-only behaviour. An evaluator switches it off and restores it afterwards.
    fn set_training(&self, _training: bool) {}

    /// Floating-point operations the model needs for independent causal sequences of the given
    /// lengths, with the output head at `scored` positions only (a multiply-add counts 2). Padding and
    /// masked-out attention are not counted: this is the work the inputs require, not what was run.
    fn forward_flops(&self, lengths: &[usize], scored: usize) -> f64;

    /// For a model whose forward passes are collective (parameters sharded over ranks,
    /// [`ShardedModel`]): takes part in the other ranks' remaining forward passes until every rank has
    /// called it, so that ranks that ran different numbers of passes stay in step. Call after a rank's
    /// last forward pass of a phase, before any other collective. Other models return at once.
    fn finish_collectives(&self) -> Result<()> {
        Ok(())
    }
}

/// The compute dtypes the models support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    pub fn kind(self) -> Kind {
        match self {
            Self::F32 => Kind::Float,
            Self::Bf16 => Kind::BFloat16,
        }
    }
}

/// A model folder as its `config.json` describes it, before any weight is read: enough to check the
/// tokenizer and prepare the inputs, so that bad input fails before a large model loads.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub dir: PathBuf,
    pub model_type: String,
    pub vocab_size: i64,
    pub max_length: usize,
    pub eos_token_id: Option<u32>,
    /// Width of the hidden states (what a token's activations scale with).
    pub hidden_size: i64,
    config: Arc<dyn registry::ArchConfig>,
}

impl ModelSpec {
    /// Reads and validates `dir/config.json`, choosing the architecture from `model_type`.
    pub fn read(dir: &Path) -> Result<Self> {
        Self::from_file(dir, registry::ConfigFile::read(&dir.join("config.json"))?)
    }

    /// As [`ModelSpec::read`] for config text that claims to come from `path` (`dir` is its folder).
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::from_file(dir, registry::ConfigFile::parse(path, text.to_owned())?)
    }

    fn from_file(dir: &Path, file: registry::ConfigFile) -> Result<Self> {
        let Some(architecture) = registry::architecture(&file.model_type) else {
            return Err(file.error(format!(
                "field `model_type`: unsupported model type `{}` (supported: {})",
                file.model_type,
                supported_model_types().join(", ")
            )));
        };
        let config = (architecture.parse)(&file)?;
        let sizes = config.sizes();
        Ok(Self {
            dir: dir.to_owned(),
            model_type: file.model_type,
            vocab_size: sizes.vocab_size,
            max_length: sizes.max_length,
            eos_token_id: sizes.eos_token_id,
            hidden_size: sizes.hidden_size,
            config,
        })
    }

    /// A lower bound on the model's parameter count, from its config (`None` on overflow).
    pub fn parameter_count_lower_bound(&self) -> Option<u64> {
        self.config.parameter_lower_bound()
    }

    /// Builds the model in `dtype` on `device` with the checkpoint ([`attach_weights`]: mapped where
    /// it holds a tensor in `dtype` on the CPU, else read).
    pub fn load(&self, dtype: Dtype, device: Device) -> Result<Box<dyn CausalLm>> {
        self.load_from(&self.dir, dtype, device)
    }

    /// As [`ModelSpec::load`], but a folder whose only checkpoint is a pickle (`pytorch_model.bin`)
    /// is read through libtorch's unpickler instead of being refused. Only for files the user trusts.
    pub fn load_allowing_pickle(&self, dtype: Dtype, device: Device) -> Result<Box<dyn CausalLm>> {
        match weights::convert_pickle_checkpoint(&self.dir)? {
            Some(converted) => self.load_from(converted.path(), dtype, device),
            None => self.load(dtype, device),
        }
    }

    fn load_from(&self, dir: &Path, dtype: Dtype, device: Device) -> Result<Box<dyn CausalLm>> {
        weights::check_checkpoint_holds(dir, self.config.parameter_lower_bound())?;
        let vs = layers::var_store(dtype.kind(), device);
        let model = layers::declare_shapes_only(|| self.config.declare(vs, dir))?;
        attach_weights(model.var_store(), dir)?;
        Ok(model.into_causal_lm())
    }

    /// The model declared with shapes only (no memory for its parameters, which hold no values), and
    /// the element count of each stage: a model's accounting (FLOPs, stage sizes) without its weights.
    pub fn declare_shapes(&self, dtype: Dtype) -> Result<(Box<dyn CausalLm>, BTreeMap<Stage, usize>)> {
        let vs = layers::var_store(dtype.kind(), Device::Cpu);
        let model = layers::declare_shapes_only(|| self.config.declare(vs, &self.dir))?;
        let mut elements = BTreeMap::new();
        for (name, tensor) in model.var_store().variables() {
            let stage = self.stage_of(&name).ok_or_else(|| Error::Tensor {
                path: self.dir.clone(),
                tensor: name.clone(),
                message: "no forward stage uses this parameter".into(),
            })?;
            *elements.entry(stage).or_insert(0) += tensor.numel();
        }
        Ok((model.into_causal_lm(), elements))
    }

    /// The stage of the forward pass that uses parameter `name` (a checkpoint name), or `None` for a
    /// name the architecture does not have.
    pub fn stage_of(&self, name: &str) -> Option<Stage> {
        self.config.stage_of(name)
    }
}

/// Loads the model in a Hugging Face folder ([`ModelSpec::read`], then [`ModelSpec::load`]).
pub fn load_model(dir: &Path, dtype: Dtype, device: Device) -> Result<Box<dyn CausalLm>> {
    ModelSpec::read(dir)?.load(dtype, device)
}
