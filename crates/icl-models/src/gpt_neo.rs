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
use serde::Deserialize;
use std::path::Path;
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

/// GPT-Neo's `config.json`, with Hugging Face's defaults for omitted fields.
#[derive(Debug, Clone, Deserialize)]
pub struct GptNeoConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    #[serde(default)]
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
    #[serde(default)]
    pub attention_types: Option<Vec<(Vec<String>, usize)>>,
    /// The expanded per-layer list; used when `attention_types` is absent.
    #[serde(default)]
    pub attention_layers: Option<Vec<String>>,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
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
        let config: Self = serde_json::from_str(text)
            .map_err(|e| Error::Config { path: path.to_owned(), message: e.to_string() })?;
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
            (None, None) => (0..self.num_layers)
                .map(|i| if i % 2 == 0 { "global" } else { "local" }.to_owned())
                .collect(),
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
        })
    }

    /// `mask` is boolean, broadcastable to `[rows, heads, seq, seq]`, true where attention is allowed.
    fn forward(&self, x: &Tensor, mask: &Tensor, cache: Option<&mut KvCache>, index: usize) -> Result<Tensor> {
        let (b, t, d) = x.size3()?;
        let heads = |proj: &Linear| -> Result<Tensor> {
            Ok(proj.forward(x)?.f_view([b, t, self.num_heads, d / self.num_heads])?.f_transpose(1, 2)?)
        };
        let q = heads(&self.q_proj)?;
        let (k, v) = cached_kv(cache, index, heads(&self.k_proj)?, heads(&self.v_proj)?)?;
        // GPT-Neo does not scale scores by 1/sqrt(head_dim): scale = 1.
        let y = Tensor::f_scaled_dot_product_attention(&q, &k, &v, Some(mask), 0.0, false, 1.0, false)?;
        let y = y.f_transpose(1, 2)?.f_reshape([b, t, d])?;
        self.out_proj.forward(&y)
    }
}

#[derive(Debug)]
struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    activation: Activation,
}

impl Mlp {
    fn new(p: nn::Path, config: &GptNeoConfig, activation: Activation) -> Result<Self> {
        let d = config.hidden_size;
        let inner = config.intermediate_size.unwrap_or(4 * d);
        Ok(Self {
            c_fc: Linear::new(&p / "c_fc", d, inner, true)?,
            c_proj: Linear::new(&p / "c_proj", inner, d, true)?,
            activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.c_fc.forward(x)?;
        let h = match self.activation {
            Activation::GeluNew => h.f_gelu("tanh")?,
            Activation::Gelu => h.f_gelu("none")?,
            Activation::Relu => h.f_relu()?,
            Activation::Silu => h.f_silu()?,
        };
        self.c_proj.forward(&h)
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
    fn forward(&self, x: &Tensor, mask: &Tensor, cache: Option<&mut KvCache>, index: usize) -> Result<Tensor> {
        let x = x.f_add(&self.attn.forward(&self.ln_1.forward(x)?, mask, cache, index)?)?;
        Ok(x.f_add(&self.mlp.forward(&self.ln_2.forward(&x)?)?)?)
    }
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
        Ok(Self { vs, wte, wpe, blocks, ln_f, config: config.clone(), hooks: Hooks::default() })
    }

    /// Parameters the config describes, or `None` if the count overflows.
    pub fn parameter_count(config: &GptNeoConfig) -> Option<u64> {
        let d = u64::try_from(config.hidden_size).ok()?;
        let inner = u64::try_from(config.intermediate_size.unwrap_or(4 * config.hidden_size)).ok()?;
        let embeddings = (u64::try_from(config.vocab_size).ok()?.checked_add(u64::try_from(config.max_position_embeddings).ok()?))?.checked_mul(d)?;
        // q, k, v, out (+ out bias); fc and proj with biases; two layer norms.
        let block = d.checked_mul(d)?.checked_mul(4)?.checked_add(d)?.checked_add(d.checked_mul(inner)?.checked_mul(2)?)?.checked_add(inner + 5 * d)?;
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

    /// Final hidden states `[rows, seq_len, hidden]`.
    fn hidden(&self, input: &ModelInput, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
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
            x = block.forward(&x, mask, cache.as_deref_mut(), i)?;
            self.hooks.leave(Stage::Block(i))?;
        }
        self.hooks.enter(Stage::FinalNorm)?;
        let x = self.ln_f.forward(&x)?;
        self.hooks.leave(Stage::FinalNorm)?;
        Ok(x)
    }
}

impl CausalLm for GptNeo {
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
