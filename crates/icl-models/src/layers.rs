//! Building blocks shared by the architectures: parameters declared on a `VarStore` under their
//! checkpoint names, fallible forward passes (bad input is an error, never a panic), activations,
//! attention, and the config fields several `config.json` schemas spell the same way.

use crate::{Error, Result};
use serde::{Deserialize, Deserializer};
use std::path::Path;
use tch::nn::{self, VarStore};
use tch::{Kind, Tensor};

/// A parameter named `name` under `p`, in the store's kind and device. Allocated but never written:
/// every parameter is overwritten by the checkpoint ([`crate::load_weights`] refuses a checkpoint that
/// lacks one), which is cheaper than a fill. Under [`declare_shapes_only`] nothing is allocated.
pub(crate) fn param(p: &nn::Path, name: &str, dims: &[i64]) -> Result<Tensor> {
    let options = (p.kind(), p.device());
    let tensor = if SHAPES_ONLY.get() {
        // One element seen through every index: the shape, without memory.
        Tensor::f_zeros([1], options)?.f_expand(dims, false)?
    } else {
        Tensor::f_empty(dims, options)?
    };
    Ok(p.add(name, tensor, true))
}

thread_local! {
    static SHAPES_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `declare` (a model's `new`) with every [`param`] declared as a shape only: a single element
/// broadcast to the parameter's shape, which must be given storage (`set_data`) before it is used.
/// How a parameter-sharded model is declared: allocating the parameters, even untouched, would leave
/// a model-sized free region in the heap once they are replaced by shards, and later allocations
/// wander through it, touching pages until the process is as large as the unsharded model.
pub(crate) fn declare_shapes_only<T>(declare: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            SHAPES_ONLY.set(false);
        }
    }
    SHAPES_ONLY.set(true);
    let _reset = Reset;
    declare()
}

/// Hugging Face's `nn.Linear`: `weight` `[out, in]`, optional `bias` `[out]`.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn new(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        let weight = param(&p, "weight", &[out_dim, in_dim])?;
        let bias = if bias { Some(param(&p, "bias", &[out_dim])?) } else { None };
        Ok(Self { weight, bias })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.weight, self.bias.as_ref())?)
    }
}

/// `torch.nn.LayerNorm` over the last dimension, with `weight` and `bias`.
#[derive(Debug)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(p: nn::Path, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self { weight: param(&p, "weight", &[dim])?, bias: param(&p, "bias", &[dim])?, eps })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dim = self.weight.size();
        Ok(x.f_layer_norm(dim.as_slice(), Some(&self.weight), Some(&self.bias), self.eps, false)?)
    }
}

/// Llama's RMSNorm, computed as `transformers` does: normalised in f32, cast back to the input's
/// kind, then scaled by the gain (so bf16 rounds where the reference rounds).
#[derive(Debug)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub(crate) fn new(p: nn::Path, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self { weight: param(&p, "weight", &[dim])?, eps })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x32 = x.f_to_kind(Kind::Float)?;
        let variance = x32.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
        let normed = x32.f_mul(&variance.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        Ok(self.weight.f_mul(&normed.f_to_kind(x.kind())?)?)
    }
}

/// Token (or position) lookup that reports an out-of-range id as an error.
pub(crate) fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    Ok(Tensor::f_embedding(table, ids, -1, false, false)?)
}

/// The activations the supported configs name (`hidden_act` / `activation_function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact (erf) form.
    Gelu,
    Relu,
    Silu,
}

impl Activation {
    /// Parses an activation name; the error names `field`.
    pub(crate) fn parse(name: &str, field: &str) -> Result<Self, String> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "gelu" => Ok(Self::Gelu),
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(format!(
                "field `{field}`: `{other}` is not supported (supported: gelu, gelu_new, gelu_pytorch_tanh, \
                 gelu_fast, relu, silu)"
            )),
        }
    }

    pub(crate) fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::GeluTanh => x.f_gelu("tanh")?,
            Self::Gelu => x.f_gelu("none")?,
            Self::Relu => x.f_relu()?,
            Self::Silu => x.f_silu()?,
        })
    }
}

/// Scaled dot-product attention over `[rows, heads, seq, head_dim]` queries and `[rows, kv_heads, keys,
/// head_dim]` keys and values; `mask` is boolean, broadcastable to `[rows, heads, seq, keys]`. Key-value
/// heads are repeated to the query heads here rather than through SDPA's `enable_gqa`: on CPU the
/// repeated form takes the fused kernel and is about twice as fast. Returns `[rows, seq, heads * head_dim]`.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, heads, t, head_dim) = q.size4()?;
    // With a key-value cache there are more keys than queries.
    let (_, kv_heads, keys, _) = k.size4()?;
    if t == 1 && kv_heads != heads {
        // One query per row (a decoding step): the query heads of a key-value head become its queries,
        // `[rows, kv_heads, groups, head_dim]`, so the cached keys and values are used without copies.
        // The mask's query axis has size 1 and broadcasts over the groups.
        let groups = heads / kv_heads;
        let q = q.f_reshape([b, kv_heads, groups, head_dim])?;
        let y = Tensor::f_scaled_dot_product_attention(&q, k, v, Some(mask), 0.0, false, scale, false)?;
        return Ok(y.f_reshape([b, 1, heads * head_dim])?);
    }
    let repeat = |x: &Tensor| -> Result<Tensor> {
        if kv_heads == heads {
            return Ok(x.shallow_clone());
        }
        let groups = heads / kv_heads;
        Ok(x.f_unsqueeze(2)?
            .f_expand([b, kv_heads, groups, keys, head_dim], false)?
            .f_reshape([b, heads, keys, head_dim])?)
    };
    let y = Tensor::f_scaled_dot_product_attention(q, &repeat(k)?, &repeat(v)?, Some(mask), 0.0, false, scale, false)?;
    Ok(y.f_transpose(1, 2)?.f_reshape([b, t, heads * head_dim])?)
}

/// `eos_token_id` as configs write it: a number, a list (the first is the end of text), or null.
pub(crate) fn token_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match Option::<Id>::deserialize(d)? {
        Some(Id::One(id)) => Some(id),
        Some(Id::Many(ids)) => ids.first().copied(),
        None => None,
    })
}

/// A token id the model does not read (`bos_token_id`, `pad_token_id`): as [`token_id`], and anything
/// else (`-1`, a string) as `None` rather than an error, so that such a field never stops a config
/// from loading.
pub(crate) fn lenient_token_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        One(u32),
        Many(Vec<u32>),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Option::<Id>::deserialize(d)? {
        Some(Id::One(id)) => Some(id),
        Some(Id::Many(ids)) => ids.first().copied(),
        Some(Id::Other(_)) | None => None,
    })
}

/// Parses `config.json` text into `T`; the error names the file.
pub(crate) fn parse_config<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Config { path: path.to_owned(), message: e.to_string() })
}

/// Whether the checkpoint in `dir` names its tensors with `prefix` (e.g. `transformer.`): models saved
/// from the bare base class (the original GPT-2 files) leave it out. Decided by `probe`, a tensor
/// every checkpoint of the architecture has; when neither spelling is found the prefixed names are
/// used, so the loader's "missing tensor" error names what a full checkpoint holds.
pub(crate) fn uses_prefix(dir: &Path, prefix: &str, probe: &str) -> Result<bool> {
    for path in crate::checkpoint_files(dir)? {
        let file = std::fs::File::open(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        // SAFETY: read-only map, dropped before returning; see `load_weights`.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io { path: path.clone(), source })?;
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| Error::Checkpoint {
            dir: path.clone(),
            message: format!("not a valid safetensors file: {e:?}"),
        })?;
        let names = metadata.tensors();
        if names.contains_key(&format!("{prefix}{probe}")) {
            return Ok(true);
        }
        if names.contains_key(probe) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A fresh `VarStore` whose new variables get `kind`.
pub(crate) fn var_store(kind: Kind, device: tch::Device) -> VarStore {
    let mut vs = VarStore::new(device);
    vs.set_kind(kind);
    vs
}

/// Bytes of every variable in `vs`.
pub(crate) fn parameter_bytes(vs: &VarStore) -> usize {
    vs.variables().values().map(|t| t.numel() * t.kind().elt_size_in_bytes()).sum()
}

/// A head `[n, hidden]` x `[vocab, hidden]`^T and an f32 log-softmax.
pub(crate) fn head_log_probs(hidden: &Tensor, head: &Tensor) -> Result<Tensor> {
    Ok(hidden.f_matmul(&head.f_tr()?)?.f_log_softmax(-1, Kind::Float)?)
}

/// Rejects positions a learned position table does not cover.
pub(crate) fn check_positions(positions: &Tensor, max_positions: i64, field: &str) -> Result<()> {
    if positions.numel() == 0 {
        return Ok(());
    }
    let max_position = positions.f_max()?.int64_value(&[]);
    if max_position >= max_positions {
        return Err(Error::Config {
            path: "config.json".into(),
            message: format!("position {max_position} is beyond {field} {max_positions}"),
        });
    }
    Ok(())
}

/// Keys attended, summed over the positions of independent causal sequences of `lengths`:
/// `n(n+1)/2` each, or at most `window` per position when attention is windowed.
pub(crate) fn attended_keys(lengths: &[usize], window: Option<usize>) -> f64 {
    lengths
        .iter()
        .map(|&n| {
            let w = window.unwrap_or(n).min(n);
            let m = w as f64;
            m * (m + 1.0) / 2.0 + (n - w) as f64 * m
        })
        .sum()
}
