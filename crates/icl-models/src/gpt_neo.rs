//! GPT-Neo (EleutherAI), as Hugging Face's `GPTNeoForCausalLM` computes it.
//!
//! Layers alternate global attention and local attention over the last `window_size` positions, as
//! `attention_types` lists them. Attention scores are not divided by `sqrt(head_dim)` (GPT-Neo was
//! trained that way), positions are a learned table, the MLP uses `gelu_new` (tanh approximation) and
//! the output head is tied to the token embedding. Tensor names follow the checkpoint:
//! `transformer.h.{i}.attn.attention.{q,k,v,out}_proj`, `transformer.h.{i}.mlp.{c_fc,c_proj}`, ...

use crate::generate::{cached_kv, key_positions};
use crate::layers::{self, LayerNorm, Linear};
use crate::{CausalLm, Error, Hooks, KvCache, ModelInput, Result, Stage};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

fn default_window_size() -> i64 {
    256
}
fn default_max_positions() -> i64 {
    2048
}
fn default_layer_norm_epsilon() -> f64 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".into()
}
fn default_true() -> bool {
    true
}
fn default_initializer_range() -> f64 {
    0.02
}

/// GPT-Neo's `config.json`, with Hugging Face's defaults for omitted fields.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct GptNeoConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<i64>,
    #[serde(default = "default_window_size")]
    pub window_size: i64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: i64,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// `[[["global", "local"], 6]]`: a pattern and how many times it repeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_types: Option<Vec<(Vec<String>, usize)>>,
    /// The expanded per-layer list; used when `attention_types` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_layers: Option<Vec<String>>,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,
    /// Dropout after the embeddings, on the attention weights, and on each residual branch; applied
    /// only in training mode ([`CausalLm::set_training`]).
    #[serde(default)]
    pub embed_dropout: f64,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default)]
    pub resid_dropout: f64,
    /// Standard deviation of the initial weights of [`GptNeo::init_weights`].
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttentionKind {
    Global,
    Local,
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    GeluNew,
    Gelu,
    Relu,
    Silu,
}

impl GptNeoConfig {
    /// Parses and validates `config.json`; errors name the file and field.
    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let config: Self =
            serde_json::from_str(text).map_err(|e| Error::Config { path: path.to_owned(), message: e.to_string() })?;
        let fail = |message: String| Error::Config { path: path.to_owned(), message };
        for (field, value) in [
            ("vocab_size", config.vocab_size),
            ("hidden_size", config.hidden_size),
            ("num_layers", config.num_layers),
            ("num_heads", config.num_heads),
            ("window_size", config.window_size),
            ("max_position_embeddings", config.max_position_embeddings),
            ("intermediate_size", config.intermediate_size.unwrap_or(1)),
        ] {
            if value <= 0 {
                return Err(fail(format!("field `{field}`: must be positive, got {value}")));
            }
        }
        config.layer_kinds().map_err(&fail)?;
        config.activation().map_err(&fail)?;
        for (field, p) in [
            ("embed_dropout", config.embed_dropout),
            ("attention_dropout", config.attention_dropout),
            ("resid_dropout", config.resid_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(fail(format!("field `{field}`: a dropout probability must be in [0, 1), got {p}")));
            }
        }
        if config.hidden_size % config.num_heads != 0 {
            return Err(fail(format!(
                "field `hidden_size`: {} is not divisible by num_heads {}",
                config.hidden_size, config.num_heads
            )));
        }
        if !config.tie_word_embeddings {
            return Err(fail("field `tie_word_embeddings`: untied GPT-Neo heads are not supported".into()));
        }
        Ok(config)
    }

    fn layer_kinds(&self) -> Result<Vec<AttentionKind>, String> {
        // Count before expanding: a hostile repeat count must not allocate.
        let described = self.attention_types.as_ref().map(|types| {
            types.iter().try_fold(0usize, |n, (pattern, repeat)| pattern.len().checked_mul(*repeat)?.checked_add(n))
        });
        if let Some(described) = described {
            if described != usize::try_from(self.num_layers).ok() {
                return Err(format!(
                    "field `attention_types`: describes {} layers, num_layers is {}",
                    described.map_or("too many".to_owned(), |n| n.to_string()),
                    self.num_layers
                ));
            }
        }
        let names: Vec<String> = match (&self.attention_types, &self.attention_layers) {
            (Some(types), _) => types
                .iter()
                .flat_map(|(pattern, repeat)| std::iter::repeat_n(pattern, *repeat).flatten().cloned())
                .collect(),
            (None, Some(layers)) => layers.clone(),
            (None, None) => {
                (0..self.num_layers).map(|i| if i % 2 == 0 { "global" } else { "local" }.to_owned()).collect()
            }
        };
        if names.len() as i64 != self.num_layers {
            return Err(format!(
                "field `attention_types`: describes {} layers, num_layers is {}",
                names.len(),
                self.num_layers
            ));
        }
        names
            .iter()
            .map(|n| match n.as_str() {
                "global" => Ok(AttentionKind::Global),
                "local" => Ok(AttentionKind::Local),
                other => Err(format!("field `attention_types`: unknown attention type `{other}`")),
            })
            .collect()
    }

    fn activation(&self) -> Result<Activation, String> {
        match self.activation_function.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluNew),
            "gelu" => Ok(Activation::Gelu),
            "relu" => Ok(Activation::Relu),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(format!("field `activation_function`: `{other}` is not supported")),
        }
    }
}

#[derive(Debug)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: i64,
    kind: AttentionKind,
    attention_dropout: f64,
    resid_dropout: f64,
}

impl SelfAttention {
    fn new(p: nn::Path, config: &GptNeoConfig, kind: AttentionKind) -> Result<Self> {
        let d = config.hidden_size;
        Ok(Self {
            q_proj: Linear::new(&p / "q_proj", d, d, false)?,
            k_proj: Linear::new(&p / "k_proj", d, d, false)?,
            v_proj: Linear::new(&p / "v_proj", d, d, false)?,
            out_proj: Linear::new(&p / "out_proj", d, d, true)?,
            num_heads: config.num_heads,
            kind,
            attention_dropout: config.attention_dropout,
            resid_dropout: config.resid_dropout,
        })
    }

    /// `mask` is boolean, broadcastable to `[rows, heads, seq, seq]`, true where attention is allowed.
    /// `train` turns dropout on; without it the computation is the inference one exactly.
    fn forward(&self, x: &Tensor, mask: &Tensor, step: Step<'_>) -> Result<Tensor> {
        let Step { cache, index, train } = step;
        let (b, t, d) = x.size3()?;
        let heads = |proj: &Linear| -> Result<Tensor> {
            Ok(proj.forward(x)?.f_view([b, t, self.num_heads, d / self.num_heads])?.f_transpose(1, 2)?)
        };
        let q = heads(&self.q_proj)?;
        let (k, v) = cached_kv(cache, index, heads(&self.k_proj)?, heads(&self.v_proj)?)?;
        // GPT-Neo does not scale scores by 1/sqrt(head_dim): scale = 1.
        let dropout = if train { self.attention_dropout } else { 0.0 };
        let y = Tensor::f_scaled_dot_product_attention(&q, &k, &v, Some(mask), dropout, false, 1.0, false)?;
        let y = y.f_transpose(1, 2)?.f_reshape([b, t, d])?;
        let y = self.out_proj.forward(&y)?;
        Ok(if train { y.f_dropout(self.resid_dropout, true)? } else { y })
    }
}

#[derive(Debug)]
struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    activation: Activation,
    resid_dropout: f64,
}

impl Mlp {
    fn new(p: nn::Path, config: &GptNeoConfig, activation: Activation) -> Result<Self> {
        let d = config.hidden_size;
        let inner = config.intermediate_size.unwrap_or(4 * d);
        Ok(Self {
            c_fc: Linear::new(&p / "c_fc", d, inner, true)?,
            c_proj: Linear::new(&p / "c_proj", inner, d, true)?,
            activation,
            resid_dropout: config.resid_dropout,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.c_fc.forward(x)?;
        let h = match self.activation {
            Activation::GeluNew => h.f_gelu("tanh")?,
            Activation::Gelu => h.f_gelu("none")?,
            Activation::Relu => h.f_relu()?,
            Activation::Silu => h.f_silu()?,
        };
        let y = self.c_proj.forward(&h)?;
        Ok(if train { y.f_dropout(self.resid_dropout, true)? } else { y })
    }
}

#[derive(Debug)]
struct Block {
    ln_1: LayerNorm,
    attn: SelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn forward(&self, x: &Tensor, mask: &Tensor, step: Step<'_>) -> Result<Tensor> {
        let train = step.train;
        let x = x.f_add(&self.attn.forward(&self.ln_1.forward(x)?, mask, step)?)?;
        Ok(x.f_add(&self.mlp.forward(&self.ln_2.forward(&x)?, train)?)?)
    }
}

/// What a block's forward pass needs besides its input: the generation cache (and the block's index
/// in it), and whether dropout is on.
struct Step<'a> {
    cache: Option<&'a mut KvCache>,
    index: usize,
    train: bool,
}

/// GPT-Neo for causal language modelling.
#[derive(Debug)]
pub struct GptNeo {
    vs: VarStore,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    config: GptNeoConfig,
    hooks: Hooks,
    /// Training mode (dropout on); off after construction, as in `transformers` after `from_pretrained`.
    training: AtomicBool,
}

impl GptNeo {
    /// Declares the model on `vs` (parameters under `transformer.`, as in the checkpoint), its
    /// parameters allocated but not initialized until weights are loaded.
    pub fn new(vs: VarStore, config: &GptNeoConfig) -> Result<Self> {
        let kinds = config.layer_kinds().map_err(|message| Error::Config { path: "config.json".into(), message })?;
        let activation =
            config.activation().map_err(|message| Error::Config { path: "config.json".into(), message })?;
        let p = vs.root() / "transformer";
        let d = config.hidden_size;
        let eps = config.layer_norm_epsilon;
        let wte = layers::param(&(&p / "wte"), "weight", &[config.vocab_size, d])?;
        let wpe = layers::param(&(&p / "wpe"), "weight", &[config.max_position_embeddings, d])?;
        let blocks = kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let b = &p / "h" / i;
                Ok(Block {
                    ln_1: LayerNorm::new(&b / "ln_1", d, eps)?,
                    attn: SelfAttention::new(&b / "attn" / "attention", config, kind)?,
                    ln_2: LayerNorm::new(&b / "ln_2", d, eps)?,
                    mlp: Mlp::new(&b / "mlp", config, activation)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(&p / "ln_f", d, eps)?;
        Ok(Self {
            vs,
            wte,
            wpe,
            blocks,
            ln_f,
            config: config.clone(),
            hooks: Hooks::default(),
            training: AtomicBool::new(false),
        })
    }

    /// Parameters the config describes, or `None` if the count overflows.
    pub fn parameter_count(config: &GptNeoConfig) -> Option<u64> {
        let d = u64::try_from(config.hidden_size).ok()?;
        let inner = u64::try_from(config.intermediate_size.unwrap_or(4 * config.hidden_size)).ok()?;
        let embeddings =
            (u64::try_from(config.vocab_size).ok()?.checked_add(u64::try_from(config.max_position_embeddings).ok()?))?
                .checked_mul(d)?;
        // q, k, v, out (+ out bias); fc and proj with biases; two layer norms.
        let block = d
            .checked_mul(d)?
            .checked_mul(4)?
            .checked_add(d)?
            .checked_add(d.checked_mul(inner)?.checked_mul(2)?)?
            .checked_add(inner + 5 * d)?;
        embeddings.checked_add(block.checked_mul(u64::try_from(config.num_layers).ok()?)?)?.checked_add(2 * d)
    }

    /// Builds the model in `kind` on `device` and copies the checkpoint of `dir` into it.
    pub fn load(dir: &Path, config: &GptNeoConfig, kind: Kind, device: Device) -> Result<Self> {
        let mut vs = VarStore::new(device);
        vs.set_kind(kind);
        let model = Self::new(vs, config)?;
        crate::load_weights(&model.vs, dir)?;
        Ok(model)
    }

    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    pub fn config(&self) -> &GptNeoConfig {
        &self.config
    }

    /// The parameters sorted by checkpoint name (the store's map iterates in a different order in
    /// every process).
    fn variables_by_name(&self) -> Vec<(String, Tensor)> {
        let mut variables: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        variables
    }

    /// Fresh weights as `transformers` initializes GPT-Neo: linear and embedding weights from
    /// N(0, `initializer_range`), biases zero, layer norms one and zero. Draws from tch's global
    /// generator (seed it with `tch::manual_seed`).
    pub fn init_weights(&self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        // In name order, so that each parameter gets the same draws for a seeded run to repeat.
        for (name, mut var) in self.variables_by_name() {
            // In-place fills return the tensor itself; nothing else to keep.
            let _ = if name.ends_with(".bias") {
                var.f_zero_()?
            } else if name.contains(".ln_") {
                var.f_fill_(1.0)?
            } else {
                var.f_normal_(0.0, self.config.initializer_range)?
            };
        }
        Ok(())
    }

    /// Logits at every position, `[rows, seq_len, vocab]`, recording gradients (unlike
    /// [`CausalLm::logits`]); dropout applies when the model is in training mode.
    pub fn forward_t(&self, input: &ModelInput) -> Result<Tensor> {
        Ok(self.hidden(input, None)?.f_matmul(&self.wte.f_tr()?)?)
    }

    /// Mean next-token cross-entropy (f32) of right-aligned sequences `input_ids` `[rows, seq_len]`:
    /// each position predicts the token after it. Differentiable, for training.
    pub fn next_token_loss(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, t) = input_ids.size2()?;
        let logits = self.forward_t(&ModelInput::causal(input_ids)?)?;
        let predicted = logits.f_narrow(1, 0, t - 1)?.f_reshape([-1, self.config.vocab_size])?;
        let targets = input_ids.f_narrow(1, 1, t - 1)?.f_reshape([-1])?;
        let log_probs = predicted.f_log_softmax(-1, Kind::Float)?;
        Ok(log_probs.f_nll_loss(&targets, None::<Tensor>, tch::Reduction::Mean, -100)?)
    }

    /// Writes `dir/config.json` (with `model_type`) and `dir/model.safetensors` (f32, checkpoint
    /// names), a folder [`crate::load_model`] and `transformers` read. Files are written under
    /// temporary names and renamed, so an interrupted save leaves no half-written checkpoint.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let _guard = tch::no_grad_guard();
        let variables = self.variables_by_name();
        let specs: Vec<(String, safetensors::Dtype, Vec<usize>)> = variables
            .iter()
            .map(|(name, t)| (name.clone(), safetensors::Dtype::F32, t.size().iter().map(|&d| d as usize).collect()))
            .collect();
        let weights = dir.join("model.safetensors");
        let partial = dir.join("model.safetensors.partial");
        let mut writer = crate::SafetensorsWriter::create(&partial, &specs)?;
        for (name, tensor) in &variables {
            let values =
                Vec::<f32>::try_from(tensor.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            writer.write(name, &bytes)?;
        }
        writer.finish()?;
        std::fs::rename(&partial, &weights).map_err(io(&weights))?;

        let config_path = dir.join("config.json");
        let mut config = serde_json::to_value(&self.config)
            .map_err(|e| Error::Config { path: config_path.clone(), message: e.to_string() })?;
        if let Some(fields) = config.as_object_mut() {
            fields.insert("model_type".into(), "gpt_neo".into());
            fields.insert("architectures".into(), serde_json::json!(["GPTNeoForCausalLM"]));
        }
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| Error::Config { path: config_path.clone(), message: e.to_string() })?;
        let partial = dir.join("config.json.partial");
        std::fs::write(&partial, text).map_err(io(&partial))?;
        std::fs::rename(&partial, &config_path).map_err(io(&config_path))
    }

    /// Final hidden states `[rows, seq_len, hidden]`, with dropout when the model is in training mode.
    fn hidden(&self, input: &ModelInput, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let train = self.training.load(Ordering::Relaxed);
        let max_position = input.positions.f_max()?.int64_value(&[]);
        if max_position >= self.config.max_position_embeddings {
            return Err(Error::Config {
                path: "config.json".into(),
                message: format!(
                    "position {max_position} is beyond max_position_embeddings {}",
                    self.config.max_position_embeddings
                ),
            });
        }
        self.hooks.enter(Stage::Embedding)?;
        let mut x = layers::embed(&self.wte, &input.input_ids)?.f_add(&layers::embed(&self.wpe, &input.positions)?)?;
        if train {
            x = x.f_dropout(self.config.embed_dropout, true)?;
        }
        self.hooks.leave(Stage::Embedding)?;
        // Local layers also need i - j < window_size, measured in positions within the sequence.
        let keys = key_positions(cache.as_deref_mut(), &input.positions)?;
        let distance = input.positions.f_unsqueeze(2)?.f_sub(&keys.f_unsqueeze(1)?)?;
        let global = input.attention.f_unsqueeze(1)?;
        let local = input.attention.f_logical_and(&distance.f_lt(self.config.window_size)?)?.f_unsqueeze(1)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let mask = match block.attn.kind {
                AttentionKind::Global => &global,
                AttentionKind::Local => &local,
            };
            self.hooks.enter(Stage::Block(i))?;
            x = block.forward(&x, mask, Step { cache: cache.as_deref_mut(), index: i, train })?;
            self.hooks.leave(Stage::Block(i))?;
        }
        self.hooks.enter(Stage::FinalNorm)?;
        let x = self.ln_f.forward(&x)?;
        self.hooks.leave(Stage::FinalNorm)?;
        Ok(x)
    }
}

impl CausalLm for GptNeo {
    fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    fn hidden_at(&self, input: &ModelInput, scored: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let hidden = self.hidden(input, None)?;
        Ok(hidden.f_reshape([-1, self.config.hidden_size])?.f_index_select(0, scored)?)
    }

    fn hidden_cached(&self, input: &ModelInput, cache: &mut KvCache) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.hidden(input, Some(cache))
    }

    fn head_log_probs(&self, hidden: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        // Tied head; log-softmax in f32 whatever the compute dtype.
        self.hooks.enter(Stage::Head)?;
        let log_probs = layers::head_log_probs(hidden, &self.wte)?;
        self.hooks.leave(Stage::Head)?;
        Ok(log_probs)
    }

    fn logits(&self, input: &ModelInput) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let hidden = self.hidden(input, None)?;
        self.hooks.enter(Stage::Head)?;
        let logits = hidden.f_matmul(&self.wte.f_tr()?)?;
        self.hooks.leave(Stage::Head)?;
        Ok(logits)
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn max_length(&self) -> usize {
        self.config.max_position_embeddings as usize
    }

    fn eos_token_id(&self) -> Option<u32> {
        self.config.eos_token_id
    }

    fn device(&self) -> Device {
        self.vs.device()
    }

    fn kind(&self) -> Kind {
        self.wte.kind()
    }

    fn parameter_bytes(&self) -> usize {
        self.vs.variables().values().map(|t| t.numel() * t.kind().elt_size_in_bytes()).sum()
    }

    fn forward_flops(&self, lengths: &[usize], scored: usize) -> f64 {
        let c = &self.config;
        let d = c.hidden_size as f64;
        let inner = c.intermediate_size.unwrap_or(4 * c.hidden_size) as f64;
        let window = c.window_size as usize;
        let kinds = c.layer_kinds().unwrap_or_default();
        let n_local = kinds.iter().filter(|k| **k == AttentionKind::Local).count() as f64;
        let n_global = kinds.len() as f64 - n_local;
        // Keys attended, summed over the positions of each sequence: n(n+1)/2 for global layers, and
        // at most `window` per position for local ones.
        let (mut keys_global, mut keys_local, mut tokens) = (0f64, 0f64, 0f64);
        for &n in lengths {
            let n_f = n as f64;
            tokens += n_f;
            keys_global += n_f * (n_f + 1.0) / 2.0;
            let m = n.min(window) as f64;
            keys_local += m * (m + 1.0) / 2.0 + (n.saturating_sub(window) as f64) * window as f64;
        }
        // Projections q, k, v, out (4 d^2 multiply-adds) and the MLP (2 d inner) per token and layer;
        // scores and weighted values (2 d per attended key).
        let dense = tokens * kinds.len() as f64 * 2.0 * (4.0 * d * d + 2.0 * d * inner);
        let attention = 2.0 * 2.0 * d * (n_global * keys_global + n_local * keys_local);
        let head = scored as f64 * 2.0 * d * c.vocab_size as f64;
        dense + attention + head
    }
}

impl crate::sharded::Shardable for GptNeo {
    fn var_store(&self) -> &VarStore {
        &self.vs
    }
    fn set_hooks(&mut self, hooks: Hooks) {
        self.hooks = hooks;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> GptNeo {
        let json = r#"{"vocab_size": 50257, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
            "attention_types": [[["global", "local"], 1]], "window_size": 16, "intermediate_size": 256,
            "max_position_embeddings": 256}"#;
        let config = GptNeoConfig::from_json(Path::new("config.json"), json).unwrap();
        GptNeo::new(VarStore::new(Device::Cpu), &config).unwrap()
    }

    #[test]
    fn flops_count_dense_attention_within_window_and_scored_head() {
        // 20 tokens: dense 20 * 2 layers * 2 * (4*64^2 + 2*64*256); global keys 20*21/2 = 210, local
        // keys 16*17/2 + 4*16 = 200, 4*64 FLOPs per key; head at 3 positions, 2*64*50257 each.
        let expected = 20.0 * 2.0 * 2.0 * (4.0 * 4096.0 + 2.0 * 64.0 * 256.0)
            + 4.0 * 64.0 * (210.0 + 200.0)
            + 3.0 * 2.0 * 64.0 * 50257.0;
        assert_eq!(tiny().forward_flops(&[20], 3), expected);
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = r#"{"vocab_size": 10, "hidden_size": 64, "num_layers": 3, "num_heads": 4,
            "attention_types": [[["global", "local"], 1]]}"#;
        let e = GptNeoConfig::from_json(Path::new("config.json"), bad).unwrap_err().to_string();
        assert!(e.contains("attention_types") && e.contains("num_layers is 3"), "{e}");
        let bad = r#"{"vocab_size": 10, "hidden_size": 60, "num_layers": 1, "num_heads": 8}"#;
        let e = GptNeoConfig::from_json(Path::new("config.json"), bad).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let bad = r#"{"vocab_size": 10, "hidden_size": 64, "num_layers": 2, "num_heads": 0}"#;
        let e = GptNeoConfig::from_json(Path::new("config.json"), bad).unwrap_err().to_string();
        assert!(e.contains("num_heads") && e.contains("positive"), "{e}");
        // Found by the fuzzer: a huge repeat count used to be expanded before it was checked.
        let bad = r#"{"vocab_size": 10, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
            "attention_types": [[["global", "local"], 18446744073709551615]]}"#;
        let e = GptNeoConfig::from_json(Path::new("config.json"), bad).unwrap_err().to_string();
        assert!(e.contains("attention_types") && e.contains("too many"), "{e}");
    }
}
