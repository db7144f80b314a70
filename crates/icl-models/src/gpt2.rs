//! GPT-2 (OpenAI), as Hugging Face's `GPT2LMHeadModel` computes it.
//!
//! Pre-norm blocks with LayerNorm, a learned position table (`n_positions`), one fused `c_attn`
//! projection for queries, keys and values, scores scaled by `1/sqrt(head_dim)` (and by
//! `1/(layer + 1)` with `scale_attn_by_inverse_layer_idx`), a `gelu_new` MLP and a head tied to the
//! token embedding (or `lm_head` when untied). GPT-2's projections are `Conv1D` layers whose weights
//! are stored `[in, out]`, the transpose of `nn.Linear`. Tensor names follow the checkpoint:
//! `transformer.wte`, `transformer.wpe`, `transformer.h.{i}.{ln_1,ln_2}`, `transformer.h.{i}.attn.{c_attn,c_proj}`,
//! `transformer.h.{i}.mlp.{c_fc,c_proj}`, `transformer.ln_f`. Checkpoints saved from the bare `GPT2Model`
//! (the original OpenAI files) leave out the `transformer.` prefix; both spellings load.

use crate::generate::{cached_kv, key_positions};
use crate::layers::{self, Activation, LayerNorm};
use crate::{CausalLm, Error, Hooks, KvCache, ModelInput, Result, Stage};
use serde::Deserialize;
use std::path::Path;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

fn default_n_positions() -> i64 {
    1024
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

/// GPT-2's `config.json`, with Hugging Face's defaults for omitted fields.
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    /// MLP width; defaults to `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<i64>,
    #[serde(default = "default_n_positions")]
    pub n_positions: i64,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default, deserialize_with = "layers::token_id")]
    pub eos_token_id: Option<u32>,
}

impl Gpt2Config {
    /// Parses and validates `config.json`; errors name the file and field.
    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let config: Self = layers::parse_config(path, text)?;
        let fail = |message: String| Error::Config { path: path.to_owned(), message };
        for (field, value) in [
            ("vocab_size", config.vocab_size),
            ("n_embd", config.n_embd),
            ("n_layer", config.n_layer),
            ("n_head", config.n_head),
            ("n_positions", config.n_positions),
            ("n_inner", config.inner()),
        ] {
            if value <= 0 {
                return Err(fail(format!("field `{field}`: {value} is not positive")));
            }
        }
        if config.n_embd % config.n_head != 0 {
            return Err(fail(format!(
                "field `n_embd`: {} is not divisible by n_head {}",
                config.n_embd, config.n_head
            )));
        }
        Activation::parse(&config.activation_function, "activation_function").map_err(fail)?;
        Ok(config)
    }

    fn inner(&self) -> i64 {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

/// `transformers`' `Conv1D`: `y = x W + b` with `W` stored `[in, out]`.
#[derive(Debug)]
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1D {
    fn new(p: nn::Path, in_dim: i64, out_dim: i64) -> Result<Self> {
        Ok(Self {
            weight: layers::param(&p, "weight", &[in_dim, out_dim])?,
            bias: layers::param(&p, "bias", &[out_dim])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut shape = x.size();
        let in_dim = shape.pop().unwrap_or(0);
        shape.push(self.bias.size()[0]);
        let y = self.bias.f_addmm(&x.f_reshape([-1, in_dim])?, &self.weight)?;
        Ok(y.f_view(shape.as_slice())?)
    }
}

#[derive(Debug)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: LayerNorm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
    act: Activation,
    heads: i64,
    scale: f64,
}

impl Block {
    fn attention(&self, x: &Tensor, mask: &Tensor, cache: Option<&mut KvCache>, index: usize) -> Result<Tensor> {
        let (b, t, d) = x.size3()?;
        let qkv = self.c_attn.forward(x)?.f_split(d, 2)?;
        let heads =
            |t_: &Tensor| -> Result<Tensor> { Ok(t_.f_view([b, t, self.heads, d / self.heads])?.f_transpose(1, 2)?) };
        let (k, v) = cached_kv(cache, index, heads(&qkv[1])?, heads(&qkv[2])?)?;
        let y = layers::attention(&heads(&qkv[0])?, &k, &v, mask, self.scale)?;
        self.attn_proj.forward(&y)
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, cache: Option<&mut KvCache>, index: usize) -> Result<Tensor> {
        let x = x.f_add(&self.attention(&self.ln_1.forward(x)?, mask, cache, index)?)?;
        let h = self.act.forward(&self.c_fc.forward(&self.ln_2.forward(&x)?)?)?;
        Ok(x.f_add(&self.mlp_proj.forward(&h)?)?)
    }
}

/// GPT-2 for causal language modelling.
#[derive(Debug)]
pub struct Gpt2 {
    vs: VarStore,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// `lm_head.weight`, or `wte` itself when tied.
    lm_head: Tensor,
    config: Gpt2Config,
    hooks: Hooks,
}

impl Gpt2 {
    /// Declares the model on `vs`, with parameter names under `prefix` (`"transformer"`, or `""` for
    /// checkpoints of the bare base model), zero-filled until weights are loaded.
    pub fn new(vs: VarStore, config: &Gpt2Config, prefix: &str) -> Result<Self> {
        let c = config;
        let act = Activation::parse(&c.activation_function, "activation_function")
            .map_err(|message| Error::Config { path: "config.json".into(), message })?;
        let root = vs.root();
        let p = if prefix.is_empty() { root.clone() } else { &root / prefix };
        let (d, eps) = (c.n_embd, c.layer_norm_epsilon);
        let wte = layers::param(&(&p / "wte"), "weight", &[c.vocab_size, d])?;
        let wpe = layers::param(&(&p / "wpe"), "weight", &[c.n_positions, d])?;
        let head_dim = (d / c.n_head) as f64;
        let blocks = (0..c.n_layer)
            .map(|i| {
                let h = &p / "h" / i;
                let mut scale = if c.scale_attn_weights { 1.0 / head_dim.sqrt() } else { 1.0 };
                if c.scale_attn_by_inverse_layer_idx {
                    scale /= (i + 1) as f64;
                }
                Ok(Block {
                    ln_1: LayerNorm::new(&h / "ln_1", d, eps)?,
                    c_attn: Conv1D::new(&h / "attn" / "c_attn", d, 3 * d)?,
                    attn_proj: Conv1D::new(&h / "attn" / "c_proj", d, d)?,
                    ln_2: LayerNorm::new(&h / "ln_2", d, eps)?,
                    c_fc: Conv1D::new(&h / "mlp" / "c_fc", d, c.inner())?,
                    mlp_proj: Conv1D::new(&h / "mlp" / "c_proj", c.inner(), d)?,
                    act,
                    heads: c.n_head,
                    scale,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(&p / "ln_f", d, eps)?;
        let lm_head = if c.tie_word_embeddings {
            wte.shallow_clone()
        } else {
            layers::param(&(&root / "lm_head"), "weight", &[c.vocab_size, d])?
        };
        Ok(Self { vs, wte, wpe, blocks, ln_f, lm_head, config: config.clone(), hooks: Hooks::default() })
    }

    /// Builds the model in `kind` on `device` and copies the checkpoint of `dir` into it.
    pub fn load(dir: &Path, config: &Gpt2Config, kind: Kind, device: Device) -> Result<Self> {
        let prefix = if layers::uses_prefix(dir, "transformer.", "wte.weight")? { "transformer" } else { "" };
        let model = Self::new(layers::var_store(kind, device), config, prefix)?;
        crate::load_weights(&model.vs, dir)?;
        Ok(model)
    }

    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// Final hidden states `[rows, seq_len, hidden]`.
    fn hidden(&self, input: &ModelInput, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        layers::check_positions(&input.positions, self.config.n_positions, "n_positions")?;
        self.hooks.enter(Stage::Embedding)?;
        let mut x = layers::embed(&self.wte, &input.input_ids)?.f_add(&layers::embed(&self.wpe, &input.positions)?)?;
        self.hooks.leave(Stage::Embedding)?;
        // No window here, but the cache keeps every key's position (and thereby its length).
        let _ = key_positions(cache.as_deref_mut(), &input.positions)?;
        let mask = input.attention.f_unsqueeze(1)?;
        for (i, block) in self.blocks.iter().enumerate() {
            self.hooks.enter(Stage::Block(i))?;
            x = block.forward(&x, &mask, cache.as_deref_mut(), i)?;
            self.hooks.leave(Stage::Block(i))?;
        }
        self.hooks.enter(Stage::FinalNorm)?;
        let x = self.ln_f.forward(&x)?;
        self.hooks.leave(Stage::FinalNorm)?;
        Ok(x)
    }
}

impl CausalLm for Gpt2 {
    fn hidden_at(&self, input: &ModelInput, scored: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let hidden = self.hidden(input, None)?;
        Ok(hidden.f_reshape([-1, self.config.n_embd])?.f_index_select(0, scored)?)
    }

    fn hidden_cached(&self, input: &ModelInput, cache: &mut KvCache) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.hidden(input, Some(cache))
    }

    fn head_log_probs(&self, hidden: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.hooks.enter(Stage::Head)?;
        let log_probs = layers::head_log_probs(hidden, &self.lm_head)?;
        self.hooks.leave(Stage::Head)?;
        Ok(log_probs)
    }

    fn logits(&self, input: &ModelInput) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let hidden = self.hidden(input, None)?;
        self.hooks.enter(Stage::Head)?;
        let logits = hidden.f_matmul(&self.lm_head.f_tr()?)?;
        self.hooks.leave(Stage::Head)?;
        Ok(logits)
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn max_length(&self) -> usize {
        self.config.n_positions as usize
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
        layers::parameter_bytes(&self.vs)
    }

    fn forward_flops(&self, lengths: &[usize], scored: usize) -> f64 {
        let c = &self.config;
        let (d, inner) = (c.n_embd as f64, c.inner() as f64);
        let tokens: f64 = lengths.iter().map(|&n| n as f64).sum();
        // Per token and layer: q, k, v and the output projection (4 d^2 multiply-adds) and the MLP
        // (2 d inner); per attended key, scores and weighted values (d each).
        let dense = tokens * c.n_layer as f64 * 2.0 * (4.0 * d * d + 2.0 * d * inner);
        let attention = c.n_layer as f64 * 2.0 * 2.0 * d * layers::attended_keys(lengths, None);
        dense + attention + scored as f64 * 2.0 * d * c.vocab_size as f64
    }
}

impl crate::sharded::Shardable for Gpt2 {
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

    const GPT2_SMALL: &str = r#"{"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
        "bos_token_id": 50256, "eos_token_id": 50256, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
        "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024, "vocab_size": 50257}"#;

    #[test]
    fn gpt2_small_parses_and_counts_parameters() {
        let c = Gpt2Config::from_json(Path::new("config.json"), GPT2_SMALL).unwrap();
        assert!(c.tie_word_embeddings && c.scale_attn_weights);
        let model = Gpt2::new(VarStore::new(Device::Cpu), &c, "").unwrap();
        // GPT-2 small: 124,439,808 parameters.
        assert_eq!(model.parameter_bytes(), 124_439_808 * 4);
        assert!(model.var_store().variables().contains_key("h.0.attn.c_attn.weight"));
        let expected = 12.0 * 2.0 * (4.0 * 768.0 * 768.0 + 2.0 * 768.0 * 3072.0) * 3.0
            + 12.0 * 4.0 * 768.0 * 6.0
            + 2.0 * 768.0 * 50257.0;
        assert_eq!(model.forward_flops(&[3], 1), expected);
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = GPT2_SMALL.replace(r#""n_head": 12"#, r#""n_head": 7"#);
        let e = Gpt2Config::from_json(Path::new("config.json"), &bad).unwrap_err().to_string();
        assert!(e.contains("n_embd") && e.contains("config.json"), "{e}");
        let bad = GPT2_SMALL.replace(r#""gelu_new""#, r#""tanh""#);
        let e = Gpt2Config::from_json(Path::new("config.json"), &bad).unwrap_err().to_string();
        assert!(e.contains("activation_function") && e.contains("tanh"), "{e}");
        let bad = GPT2_SMALL.replace(r#""n_embd": 768,"#, "");
        let e = Gpt2Config::from_json(Path::new("config.json"), &bad).unwrap_err().to_string();
        assert!(e.contains("n_embd"), "{e}");
    }
}
