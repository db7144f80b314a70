//! The Llama architecture in a GGUF file (llama.cpp's `llama.*` metadata and `blk.{i}.*` tensors) as
//! a Hugging Face Llama checkpoint: a [`LlamaConfig`] from the metadata ([`GgufFile::llama_params`]),
//! llama.cpp's tensor names mapped to Hugging Face's with every shape checked
//! ([`GgufFile::llama_plan`]), and the q/k row interleaving of llama.cpp's converter undone
//! ([`GgufFile::read_llama_tensor`]). The GGUF reader itself (`gguf/`) knows no architecture.

use crate::gguf::{GgufFile, GgufValue};
use crate::{Error, LlamaConfig, Result, RopeParameters};
use serde::de::value::MapDeserializer;
use serde::Deserialize;

/// The Hugging Face name of a llama.cpp Llama tensor, or `None` for names outside the mapping.
pub fn llama_hf_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_owned());
    }
    let (layer, rest) = gguf_name.strip_prefix("blk.")?.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) || (layer.len() > 1 && layer.starts_with('0')) {
        return None;
    }
    let hf = match rest {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// One tensor of the Hugging Face checkpoint and where it comes from.
#[derive(Debug, Clone)]
pub struct LlamaTensorPlan {
    pub hf_name: String,
    /// Row-major Hugging Face shape.
    pub shape: Vec<usize>,
    /// Index into [`GgufFile::tensors`].
    pub source: usize,
    /// Heads whose rows llama.cpp's converter interleaved (q: attention heads, k: key-value heads).
    permute_heads: Option<usize>,
}

impl GgufFile {
    /// The Hugging Face config of a `general.architecture = "llama"` file, from its `llama.*` and
    /// `tokenizer.ggml.*` metadata, checked for what the Hugging Face Llama model can represent.
    ///
    /// Every size is given (`num_key_value_heads`, `head_dim` too), `tie_word_embeddings` is set when
    /// the file has no `output.weight`, `rope_theta` is also in `rope_parameters` (transformers 5), and
    /// `model_type` and `architectures` name Llama; fields GGUF does not describe (`hidden_act`, the
    /// biases) keep `config.json`'s defaults, and the dtype fields are left to whoever writes the
    /// checkpoint. Serialized, it is the `config.json` of the converted folder.
    pub fn llama_params(&self) -> Result<LlamaConfig> {
        let arch = self.require("general.architecture", self.meta_str("general.architecture"))?;
        if arch != "llama" {
            return Err(self
                .meta_error("general.architecture", format!("unsupported architecture `{arch}` (supported: llama)")));
        }
        let key = |k: &str| format!("llama.{k}");
        let int = |k: &str| -> Result<Option<i64>> {
            let k = key(k);
            match self.get(&k) {
                Some(GgufValue::Array(_)) => Err(self.meta_error(&k, "per-layer values are not supported".into())),
                _ => self
                    .meta_u64(&k)?
                    .map(|v| i64::try_from(v).map_err(|_| self.meta_error(&k, format!("{v} is too large"))))
                    .transpose(),
            }
        };
        let req = |k: &str| -> Result<i64> {
            let v = self.require(&key(k), int(k))?;
            if v == 0 {
                return Err(self.meta_error(&key(k), "must be positive".into()));
            }
            Ok(v)
        };
        if int("expert_count")?.unwrap_or(0) > 0 {
            return Err(self.meta_error(&key("expert_count"), "mixture-of-experts Llama is not supported".into()));
        }
        if let Some(scaling) = self.meta_str(&key("rope.scaling.type"))? {
            if scaling != "none" {
                return Err(
                    self.meta_error(&key("rope.scaling.type"), format!("RoPE scaling `{scaling}` is not supported"))
                );
            }
        }
        if self.tensor("rope_freqs.weight").is_some() {
            return Err(self.tensor_error(
                "rope_freqs.weight",
                "RoPE frequency factors (Llama 3 scaling) are not supported".into(),
            ));
        }
        let n_layers = req("block_count")?;
        let hidden_size = req("embedding_length")?;
        let intermediate_size = req("feed_forward_length")?;
        let n_heads = req("attention.head_count")?;
        let n_kv_heads = int("attention.head_count_kv")?.unwrap_or(n_heads);
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(self.meta_error(
                &key("attention.head_count_kv"),
                format!("{n_kv_heads} key-value heads do not divide {n_heads} attention heads"),
            ));
        }
        let head_dim = match int("attention.key_length")? {
            Some(d) => d,
            None if hidden_size % n_heads == 0 => hidden_size / n_heads,
            None => {
                return Err(self.meta_error(
                    &key("embedding_length"),
                    format!("{hidden_size} is not a multiple of the {n_heads} heads"),
                ))
            }
        };
        if let Some(v) = int("attention.value_length")? {
            if v != head_dim {
                return Err(self.meta_error(
                    &key("attention.value_length"),
                    format!("{v} differs from the key length {head_dim}"),
                ));
            }
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(self
                .meta_error(&key("attention.key_length"), format!("head size {head_dim} must be even and positive")));
        }
        if let Some(rot) = int("rope.dimension_count")? {
            if rot != head_dim {
                return Err(self.meta_error(
                    &key("rope.dimension_count"),
                    format!("partial rotary embedding ({rot} of {head_dim} dimensions) is not supported"),
                ));
            }
        }
        let tokens = self.meta_strings("tokenizer.ggml.tokens")?;
        let embd = self
            .tensor("token_embd.weight")
            .ok_or_else(|| self.tensor_error("token_embd.weight", "missing (the token embedding)".into()))?;
        // Tensor dimensions fit in i64 (checked when the directory was parsed), and so does a length.
        let vocab_size = match int("vocab_size")? {
            Some(v) => v,
            None => tokens.map(|t| t.len() as i64).unwrap_or(*embd.dims.last().unwrap_or(&0) as i64),
        };
        let token_id = |k: &str| -> Result<Option<u32>> {
            let k = format!("tokenizer.ggml.{k}");
            match self.meta_u64(&k)? {
                None => Ok(None),
                Some(id) if id < vocab_size as u64 => Ok(Some(id as u32)),
                Some(id) => {
                    Err(self.meta_error(&k, format!("token id {id} is outside the vocabulary of {vocab_size}")))
                }
            }
        };
        let rms_norm_eps = self.require(
            &key("attention.layer_norm_rms_epsilon"),
            self.meta_f64(&key("attention.layer_norm_rms_epsilon")),
        )?;
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(self.meta_error(
                &key("attention.layer_norm_rms_epsilon"),
                format!("{rms_norm_eps} is not a positive number"),
            ));
        }
        // llama.cpp's default base when the file gives none.
        let rope_theta = self.meta_f64(&key("rope.freq_base"))?.unwrap_or(10000.0);
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(self.meta_error(&key("rope.freq_base"), format!("{rope_theta} is not a positive number")));
        }

        // The fields `LlamaConfig` requires, deserialized so that every other field starts at its
        // `config.json` default; the ones GGUF describes are set below.
        let required = [
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_hidden_layers", n_layers),
            ("num_attention_heads", n_heads),
        ];
        let mut config =
            LlamaConfig::deserialize(MapDeserializer::<_, serde::de::value::Error>::new(required.into_iter()))
                .map_err(|e| Error::Gguf { path: self.path().to_owned(), message: format!("Llama config: {e}") })?;
        config.num_key_value_heads = Some(n_kv_heads);
        config.head_dim = Some(head_dim);
        config.max_position_embeddings = req("context_length")?;
        config.rms_norm_eps = rms_norm_eps;
        config.rope_theta = rope_theta;
        config.rope_parameters = Some(RopeParameters {
            rope_type: Some("default".into()),
            rope_theta: Some(rope_theta),
            ..Default::default()
        });
        config.tie_word_embeddings = self.tensor("output.weight").is_none();
        config.bos_token_id = token_id("bos_token_id")?;
        config.eos_token_id = token_id("eos_token_id")?;
        config.pad_token_id = token_id("padding_token_id")?;
        config.model_type = Some("llama".into());
        config.architectures = Some(vec!["LlamaForCausalLM".into()]);
        Ok(config)
    }

    /// Every tensor of the Hugging Face checkpoint, in file order, with its name and shape checked
    /// against `config` (from [`GgufFile::llama_params`]). Fails on a missing tensor, an unknown one,
    /// or a wrong shape.
    pub fn llama_plan(&self, config: &LlamaConfig) -> Result<Vec<LlamaTensorPlan>> {
        let c = config;
        let size = |field: &str, v: Option<i64>| -> Result<usize> {
            v.and_then(|v| usize::try_from(v).ok()).ok_or_else(|| Error::Gguf {
                path: self.path().to_owned(),
                message: format!("Llama config: `{field}` is {v:?}, not a size"),
            })
        };
        let n_layers = size("num_hidden_layers", Some(c.num_hidden_layers))?;
        let hidden = size("hidden_size", Some(c.hidden_size))?;
        let ffn = size("intermediate_size", Some(c.intermediate_size))?;
        let vocab = size("vocab_size", Some(c.vocab_size))?;
        let n_heads = size("num_attention_heads", Some(c.num_attention_heads))?;
        let n_kv_heads = size("num_key_value_heads", Some(c.kv_heads()))?;
        let head_dim = size("head_dim", c.head_dim.or(c.hidden_size.checked_div(c.num_attention_heads)))?;
        let (q_rows, kv_rows) = (n_heads * head_dim, n_kv_heads * head_dim);
        let expected = |hf: &str| -> Option<(Vec<usize>, Option<usize>)> {
            Some(match hf {
                "model.embed_tokens.weight" | "lm_head.weight" => (vec![vocab, hidden], None),
                "model.norm.weight" => (vec![hidden], None),
                _ => {
                    let rest = hf.strip_prefix("model.layers.")?;
                    let (layer, what) = rest.split_once('.')?;
                    if layer.parse::<usize>().ok()? >= n_layers {
                        return None;
                    }
                    match what {
                        "self_attn.q_proj.weight" => (vec![q_rows, hidden], Some(n_heads)),
                        "self_attn.k_proj.weight" => (vec![kv_rows, hidden], Some(n_kv_heads)),
                        "self_attn.v_proj.weight" => (vec![kv_rows, hidden], None),
                        "self_attn.o_proj.weight" => (vec![hidden, q_rows], None),
                        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => (vec![ffn, hidden], None),
                        "mlp.down_proj.weight" => (vec![hidden, ffn], None),
                        "input_layernorm.weight" | "post_attention_layernorm.weight" => (vec![hidden], None),
                        _ => return None,
                    }
                }
            })
        };
        let mut plan = Vec::with_capacity(self.tensors().len());
        for (source, info) in self.tensors().iter().enumerate() {
            let hf_name = llama_hf_name(&info.name).ok_or_else(|| {
                self.tensor_error(
                    &info.name,
                    "not a tensor of the Llama architecture (no Hugging Face name for it)".into(),
                )
            })?;
            let (shape, permute_heads) = expected(&hf_name)
                .ok_or_else(|| self.tensor_error(&info.name, format!("layer beyond llama.block_count = {n_layers}")))?;
            if info.shape() != shape {
                return Err(self.tensor_error(
                    &info.name,
                    format!("shape {:?} (row-major), the metadata implies {shape:?} for {hf_name}", info.shape()),
                ));
            }
            self.check_supported(info)?;
            plan.push(LlamaTensorPlan { hf_name, shape, source, permute_heads });
        }
        // Lazily, so that a huge block count fails at its first missing layer instead of listing them all.
        const PER_LAYER: [&str; 9] =
            ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm"];
        let mut required = ["token_embd.weight".to_owned(), "output_norm.weight".to_owned()]
            .into_iter()
            .chain((0..n_layers).flat_map(|l| PER_LAYER.iter().map(move |t| format!("blk.{l}.{t}.weight"))));
        if let Some(missing) = required.find(|n| self.tensor(n).is_none()) {
            return Err(self.tensor_error(&missing, "missing from the file".into()));
        }
        Ok(plan)
    }

    /// A planned tensor as f32 in its Hugging Face layout: dequantized, and for q/k projections with
    /// llama.cpp's row interleaving undone.
    pub fn read_llama_tensor(&self, plan: &LlamaTensorPlan) -> Result<Vec<f32>> {
        let info = &self.tensors()[plan.source];
        let data = self.dequantize(info)?;
        match plan.permute_heads {
            None => Ok(data),
            Some(heads) => self.unpermute(plan, heads, &data),
        }
    }

    /// [`GgufFile::read_llama_tensor`] in row-aligned pieces of about `chunk_elements` handed to `f`
    /// in order (q/k projections, whose rows move between heads, come in one piece).
    pub fn read_llama_tensor_chunks(
        &self,
        plan: &LlamaTensorPlan,
        chunk_elements: usize,
        mut f: impl FnMut(&[f32]) -> Result<()>,
    ) -> Result<()> {
        let info = &self.tensors()[plan.source];
        match plan.permute_heads {
            None => self.dequantize_chunks(info, chunk_elements, f),
            Some(heads) => f(&self.unpermute(plan, heads, &self.dequantize(info)?)?),
        }
    }

    fn unpermute(&self, plan: &LlamaTensorPlan, heads: usize, data: &[f32]) -> Result<Vec<f32>> {
        unpermute_rows(data, &plan.shape, heads).ok_or_else(|| {
            let name = &self.tensors()[plan.source].name;
            self.tensor_error(name, format!("{:?} rows do not split into {heads} heads of even size", plan.shape))
        })
    }
}

/// Undoes llama.cpp's converter, which stores the rows of each head's q/k projection as
/// `[r0, r_half, r1, r_half+1, ...]` (pairs interleaved, its RoPE layout); Hugging Face keeps
/// `[r0, r1, ..., r_half, ...]` (rotate-half layout). For head `h` with `half = head_dim / 2`, file row
/// `h*head_dim + 2*j + i` is Hugging Face row `h*head_dim + i*half + j` — what transformers' GGUF loader
/// does with `reshape(heads, half, 2, cols).swapaxes(1, 2)`.
fn unpermute_rows(data: &[f32], shape: &[usize], heads: usize) -> Option<Vec<f32>> {
    let (&rows, cols) = shape.split_first()?;
    let cols: usize = cols.iter().product();
    if heads == 0 || rows % (2 * heads) != 0 || data.len() != rows * cols {
        return None;
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for j in 0..half {
            for i in 0..2 {
                let src = h * head_dim + 2 * j + i;
                let dst = h * head_dim + i * half + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names() {
        assert_eq!(llama_hf_name("blk.12.attn_q.weight").as_deref(), Some("model.layers.12.self_attn.q_proj.weight"));
        assert_eq!(
            llama_hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(llama_hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        for bad in [
            "blk..attn_q.weight",
            "blk.+1.attn_q.weight",
            "blk.01.attn_q.weight",
            "blk.1.attn_qq.weight",
            "rope_freqs.weight",
        ] {
            assert_eq!(llama_hf_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp's permute, written independently: reshape(heads, 2, half, cols).swapaxes(1, 2).
        let (heads, head_dim, cols) = (3, 4, 2);
        let rows = heads * head_dim;
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        let half = head_dim / 2;
        for h in 0..heads {
            for i in 0..2 {
                for j in 0..half {
                    let hf_row = h * head_dim + i * half + j;
                    let gguf_row = h * head_dim + j * 2 + i;
                    for c in 0..cols {
                        gguf[gguf_row * cols + c] = hf[hf_row * cols + c];
                    }
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rows(&gguf, &[rows, cols], heads), Some(hf));
        assert_eq!(unpermute_rows(&gguf, &[rows, cols], 5), None);
    }
}
