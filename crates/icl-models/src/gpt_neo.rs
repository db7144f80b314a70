//! GPT-Neo (EleutherAI), as Hugging Face's `GPTNeoForCausalLM` computes it.
//!
//! Layers alternate global attention and local attention over the last `window_size` positions, as
//! `attention_types` lists them. Attention scores are not divided by `sqrt(head_dim)` (GPT-Neo was
//! trained that way), positions are a learned table, the MLP uses `gelu_new` (tanh approximation) and
//! the output head is tied to the token embedding. Tensor names follow the checkpoint:
//! `transformer.h.{i}.attn.attention.{q,k,v,out}_proj`, `transformer.h.{i}.mlp.{c_fc,c_proj}`, ...

use crate::defaults;
use crate::layers::{self, Activation, LayerNorm, Linear};
use crate::model::{Declared, Decoder, Pass, PositionTable, Sizes};
use crate::registry::{self, ArchConfig, Architecture, ConfigFile, StageNames};
use crate::{Error, ModelInput, Result, Stage};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

pub(crate) const ARCHITECTURE: Architecture = Architecture { model_types: &["gpt_neo"], parse };

const STAGES: StageNames = StageNames {
    embedding: &["transformer.wte", "transformer.wpe"],
    blocks: "transformer.h",
    final_norm: &["transformer.ln_f"],
    head: &[],
};

fn default_window_size() -> i64 {
    256
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
    #[serde(default = "defaults::positions_2048")]
    pub max_position_embeddings: i64,
    #[serde(default = "defaults::eps_1e5")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "defaults::gelu_new")]
    pub activation_function: String,
    /// `[[["global", "local"], 6]]`: a pattern and how many times it repeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_types: Option<Vec<(Vec<String>, usize)>>,
    /// The expanded per-layer list; used when `attention_types` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_layers: Option<Vec<String>>,
    #[serde(default = "defaults::yes")]
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

impl GptNeoConfig {
    /// Parses and validates `config.json`; errors name the file and field.
    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let file = ConfigFile::parse(path, text.to_owned())?;
        Ok(Params::validate(&file, file.deserialize()?)?.raw)
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
}

/// A validated GPT-Neo config.
#[derive(Debug, Clone)]
struct Params {
    raw: GptNeoConfig,
    kinds: Vec<AttentionKind>,
    inner: i64,
    act: Activation,
}

fn parse(file: &ConfigFile) -> Result<Arc<dyn ArchConfig>> {
    Ok(Arc::new(Params::validate(file, file.deserialize()?)?))
}

impl Params {
    fn validate(file: &ConfigFile, raw: GptNeoConfig) -> Result<Self> {
        let c = &raw;
        file.positive(&[
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("num_layers", c.num_layers),
            ("num_heads", c.num_heads),
            ("window_size", c.window_size),
            ("max_position_embeddings", c.max_position_embeddings),
            ("intermediate_size", c.intermediate_size.unwrap_or(1)),
        ])?;
        let kinds = c.layer_kinds().map_err(|m| file.error(m))?;
        let act = Activation::parse(&c.activation_function, "activation_function").map_err(|m| file.error(m))?;
        for (field, p) in [
            ("embed_dropout", c.embed_dropout),
            ("attention_dropout", c.attention_dropout),
            ("resid_dropout", c.resid_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(file.error(format!("field `{field}`: a dropout probability must be in [0, 1), got {p}")));
            }
        }
        file.divisible(("hidden_size", c.hidden_size), ("num_heads", c.num_heads))?;
        if !c.tie_word_embeddings {
            return Err(file.error("field `tie_word_embeddings`: untied GPT-Neo heads are not supported"));
        }
        let inner = c.intermediate_size.unwrap_or(4 * c.hidden_size);
        Ok(Self { raw, kinds, inner, act })
    }

    /// The config of a model built in code (training), validated as a file's would be.
    fn of(config: &GptNeoConfig) -> Result<Self> {
        let text = serde_json::to_string(config)
            .map_err(|e| Error::Config { path: "config.json".into(), message: e.to_string() })?;
        let file = ConfigFile::parse(Path::new("config.json"), text)?;
        Self::validate(&file, config.clone())
    }
}

impl ArchConfig for Params {
    fn sizes(&self) -> Sizes {
        let c = &self.raw;
        Sizes {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            max_length: c.max_position_embeddings as usize,
            positions: Some(PositionTable { size: c.max_position_embeddings, field: "max_position_embeddings" }),
            eos_token_id: c.eos_token_id,
        }
    }

    fn parameter_lower_bound(&self) -> Option<u64> {
        GptNeo::parameter_count(&self.raw)
    }

    fn declare(&self, vs: VarStore, _dir: &Path) -> Result<Box<dyn Declared>> {
        registry::declared(vs, |vs| GptNeoDecoder::new(vs, self))
    }

    fn stage_of(&self, name: &str) -> Option<Stage> {
        STAGES.stage_of(name)
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

    /// `mask` is boolean, broadcastable to `[rows, heads, seq, keys]`, true where attention is allowed.
    /// With dropout off (evaluation mode) the computation is the inference one exactly.
    fn forward(&self, x: &Tensor, mask: &Tensor, pass: &mut Pass<'_>, index: usize) -> Result<Tensor> {
        let d = x.size().last().copied().unwrap_or(0);
        let heads = |proj: &Linear| layers::split_heads(&proj.forward(x)?, self.num_heads, d / self.num_heads);
        let q = heads(&self.q_proj)?;
        let (k, v) = pass.keys_values(index, heads(&self.k_proj)?, heads(&self.v_proj)?)?;
        let train = pass.training();
        // GPT-Neo does not scale scores by 1/sqrt(head_dim): scale = 1.
        let dropout = if train { self.attention_dropout } else { 0.0 };
        let y = self.out_proj.forward(&pass.attention(&q, &k, &v, mask, 1.0, dropout)?)?;
        Ok(if train { y.f_dropout(self.resid_dropout, true)? } else { y })
    }
}

#[derive(Debug)]
struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    act: Activation,
    resid_dropout: f64,
}

impl Mlp {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.c_proj.forward(&self.act.forward(&self.c_fc.forward(x)?)?)?;
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

/// GPT-Neo's layers; the model is [`GptNeo`].
#[derive(Debug)]
pub struct GptNeoDecoder {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    params: Params,
    sizes: Sizes,
}

/// GPT-Neo for causal language modelling; trainable ([`GptNeo::init_weights`],
/// [`crate::Model::next_token_loss`], [`GptNeo::save`]).
pub type GptNeo = crate::Model<GptNeoDecoder>;

impl GptNeoDecoder {
    fn new(vs: &VarStore, params: &Params) -> Result<Self> {
        let c = &params.raw;
        let p = vs.root() / "transformer";
        let (d, eps) = (c.hidden_size, c.layer_norm_epsilon);
        let wte = layers::param(&(&p / "wte"), "weight", &[c.vocab_size, d])?;
        let wpe = layers::param(&(&p / "wpe"), "weight", &[c.max_position_embeddings, d])?;
        let blocks = params
            .kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let b = &p / "h" / i;
                let m = &b / "mlp";
                Ok(Block {
                    ln_1: LayerNorm::new(&b / "ln_1", d, eps)?,
                    attn: SelfAttention::new(&b / "attn" / "attention", c, kind)?,
                    ln_2: LayerNorm::new(&b / "ln_2", d, eps)?,
                    mlp: Mlp {
                        c_fc: Linear::new(&m / "c_fc", d, params.inner, true)?,
                        c_proj: Linear::new(&m / "c_proj", params.inner, d, true)?,
                        act: params.act,
                        resid_dropout: c.resid_dropout,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(&p / "ln_f", d, eps)?;
        Ok(Self { wte, wpe, blocks, ln_f, sizes: params.sizes(), params: params.clone() })
    }
}

impl Decoder for GptNeoDecoder {
    fn sizes(&self) -> &Sizes {
        &self.sizes
    }

    fn hidden(&self, input: &ModelInput, pass: &mut Pass<'_>) -> Result<Tensor> {
        let hooks = pass.hooks;
        let train = pass.training();
        let mut x = hooks.around(Stage::Embedding, || {
            let x = layers::embed(&self.wte, &input.input_ids)?.f_add(&layers::embed(&self.wpe, &input.positions)?)?;
            Ok(if train { x.f_dropout(self.params.raw.embed_dropout, true)? } else { x })
        })?;
        // Local layers also need i - j < window_size, measured in positions within the sequence.
        let global = pass.mask().shallow_clone();
        let local = pass.window_mask(self.params.raw.window_size)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let mask = match block.attn.kind {
                AttentionKind::Global => &global,
                AttentionKind::Local => &local,
            };
            x = hooks.around(Stage::Block(i), || {
                let x = x.f_add(&block.attn.forward(&block.ln_1.forward(&x)?, mask, pass, i)?)?;
                Ok(x.f_add(&block.mlp.forward(&block.ln_2.forward(&x)?, train)?)?)
            })?;
        }
        hooks.around(Stage::FinalNorm, || self.ln_f.forward(&x))
    }

    /// The head is tied to the token embedding.
    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        layers::output_head(hidden, &self.wte)
    }

    fn forward_flops(&self, lengths: &[usize], scored: usize) -> f64 {
        let c = &self.params.raw;
        let d = c.hidden_size as f64;
        let n_local = self.params.kinds.iter().filter(|k| **k == AttentionKind::Local).count() as f64;
        let n_global = self.params.kinds.len() as f64 - n_local;
        let window = Some(c.window_size as usize);
        let tokens: f64 = lengths.iter().map(|&n| n as f64).sum();
        // Projections q, k, v, out (4 d^2 multiply-adds) and the MLP (2 d inner) per token and layer;
        // scores and weighted values (2 d per attended key), at most `window` keys in local layers.
        let dense = tokens * (n_global + n_local) * 2.0 * (4.0 * d * d + 2.0 * d * self.params.inner as f64);
        let keys = n_global * layers::attended_keys(lengths, None) + n_local * layers::attended_keys(lengths, window);
        dense + 2.0 * 2.0 * d * keys + scored as f64 * 2.0 * d * c.vocab_size as f64
    }

    fn has_training_mode(&self) -> bool {
        true
    }
}

impl GptNeo {
    /// Declares the model on `vs` (parameters under `transformer.`, as in the checkpoint), its
    /// parameters allocated but not initialized until weights are loaded or [`GptNeo::init_weights`].
    pub fn new(vs: VarStore, config: &GptNeoConfig) -> Result<Self> {
        let decoder = GptNeoDecoder::new(&vs, &Params::of(config)?)?;
        Ok(Self::from_parts(vs, decoder))
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

    /// Builds the model in `kind` on `device` with the checkpoint of `dir` ([`crate::attach_weights`]).
    pub fn load(dir: &Path, config: &GptNeoConfig, kind: Kind, device: Device) -> Result<Self> {
        let model = layers::declare_shapes_only(|| Self::new(layers::var_store(kind, device), config))?;
        crate::attach_weights(model.var_store(), dir)?;
        Ok(model)
    }

    pub fn config(&self) -> &GptNeoConfig {
        &self.decoder().params.raw
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
                var.f_normal_(0.0, self.config().initializer_range)?
            };
        }
        Ok(())
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
        let mut config = serde_json::to_value(self.config())
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
        assert_eq!(crate::CausalLm::forward_flops(&tiny(), &[20], 3), expected);
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
