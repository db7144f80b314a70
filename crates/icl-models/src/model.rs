//! The one [`CausalLm`] implementation, [`Model`], over each architecture's [`Decoder`].
//!
//! An architecture file says only what is its own: how token ids become final hidden states, what
//! the output head computes, its sizes and its FLOP count. Everything every model does the same way
//! lives here once: gradients off for inference, the hooks around the head, the position-table
//! check, the attention mask with its optional window, the key-value cache, training mode and the
//! parameter count. A [`Pass`] carries one forward pass's shared state into the decoder.

use crate::generate::prefix_per_row;
use crate::key_spans::KeySpans;
use crate::{layers, CausalLm, Error, Hooks, KvCache, ModelInput, Result, Stage};
use std::sync::atomic::{AtomicBool, Ordering};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// A learned position table, whose size bounds the positions a model accepts.
#[derive(Debug, Clone, Copy)]
pub struct PositionTable {
    pub size: i64,
    /// The config field that sets it, for error messages.
    pub field: &'static str,
}

/// The sizes and limits of a model, as its config gives them.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub vocab_size: i64,
    pub hidden_size: i64,
    /// Longest input the model accepts.
    pub max_length: usize,
    /// Models with learned positions refuse positions beyond their table.
    pub positions: Option<PositionTable>,
    /// The end-of-text token (the first of a list).
    pub eos_token_id: Option<u32>,
}

/// What an architecture implements: its layers, declared on a `VarStore` under the checkpoint's
/// names, and one forward pass over them.
pub trait Decoder: std::fmt::Debug + 'static {
    fn sizes(&self) -> &Sizes;

    /// Final hidden states `[rows, seq, hidden]` (after the last norm). Each [`Stage`] runs inside
    /// `pass.hooks.around(..)`; attention takes its mask from `pass` and its keys and values through
    /// [`Pass::keys_values`].
    fn hidden(&self, input: &ModelInput, pass: &mut Pass<'_>) -> Result<Tensor>;

    /// The output head: logits `[n, vocab]` in the compute dtype over final hidden states `[n, hidden]`.
    fn head(&self, hidden: &Tensor) -> Result<Tensor>;

    /// See [`CausalLm::forward_flops`].
    fn forward_flops(&self, lengths: &[usize], scored: usize) -> f64;

    /// Whether the architecture has training-only behaviour (dropout) that [`CausalLm::set_training`]
    /// switches on.
    fn has_training_mode(&self) -> bool {
        false
    }
}

/// One forward pass's state, shared by its layers.
#[derive(Debug)]
pub struct Pass<'a> {
    pub(crate) hooks: &'a Hooks,
    cache: Option<&'a mut KvCache>,
    /// bool `[rows, 1, seq, keys]`.
    mask: Tensor,
    positions: Tensor,
    key_positions: Tensor,
    training: bool,
    /// The key spans found in each mask attention was given (kept with the mask, so its storage
    /// cannot be reused by another while the pass runs).
    spans: Vec<(Tensor, Option<KeySpans>)>,
}

impl Pass<'_> {
    /// Where query `i` may attend key `j`, boolean `[rows, 1, seq, keys]` (broadcast over heads).
    pub(crate) fn mask(&self) -> &Tensor {
        &self.mask
    }

    /// [`Pass::mask`] limited to keys fewer than `window` positions back, counted within each
    /// sequence (so packing and caching never move a window).
    pub(crate) fn window_mask(&self, window: i64) -> Result<Tensor> {
        Ok(self.mask.f_logical_and(&self.distances()?.f_lt(window)?.f_unsqueeze(1)?)?)
    }

    /// Query position minus key position, i64 `[rows, seq, keys]`.
    pub(crate) fn distances(&self) -> Result<Tensor> {
        Ok(self.positions.f_unsqueeze(2)?.f_sub(&self.key_positions.f_unsqueeze(1)?)?)
    }

    /// Each token's position within its sequence, i64 `[rows, seq]`.
    pub(crate) fn positions(&self) -> &Tensor {
        &self.positions
    }

    /// Whether dropout is on.
    pub(crate) fn training(&self) -> bool {
        self.training
    }

    /// Layer `layer`'s keys and values to attend over: with a cache, those it holds followed by the
    /// new `k`, `v` (`[rows, kv_heads, seq, head_dim]`), which it keeps; without, `k`, `v` alone.
    pub(crate) fn keys_values(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        match self.cache.as_deref_mut() {
            Some(cache) => cache.push_layer(layer, &k, &v),
            None => Ok((k, v)),
        }
    }

    /// Attention of queries `q` over keys and values `k`, `v` under boolean `mask`, with dropout `p`:
    /// [`layers::attention_with_dropout`]'s result. Without a cache and in evaluation mode, a mask whose
    /// packed rows hide most keys from each window of queries is attended over those windows' keys only
    /// ([`crate::key_spans`]); its spans are found once per pass.
    pub(crate) fn attention(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        scale: f64,
        p: f64,
    ) -> Result<Tensor> {
        // icl's bf16 kernel finds the keys each query sees itself: no spans for it.
        let spans_used = self.cache.is_none() && !self.training && !crate::bf16_attention::applies(q, k, v, mask);
        let spans = if spans_used { self.key_spans(mask)? } else { None };
        layers::attention_with_dropout(q, k, v, mask, scale, p, spans.as_ref())
    }

    fn key_spans(&mut self, mask: &Tensor) -> Result<Option<KeySpans>> {
        let same =
            |m: &Tensor| m.data_ptr() == mask.data_ptr() && m.size() == mask.size() && m.stride() == mask.stride();
        if let Some((_, spans)) = self.spans.iter().find(|(m, _)| same(m)) {
            return Ok(spans.clone());
        }
        let spans = KeySpans::of(mask)?;
        self.spans.push((mask.shallow_clone(), spans.clone()));
        Ok(spans)
    }

    /// Layer `layer`'s attention of queries `q` (`[rows, heads, seq, head_dim]`) over the keys and
    /// values seen, the new `k`, `v` included (kept as [`Pass::keys_values`] keeps them), under boolean
    /// `mask` (`[rows, 1, seq, keys]`, [`Pass::mask`] or a window of it): [`layers::attention`]'s
    /// result. Over a cache with a shared prefix that every query sees, the prefix is attended once for
    /// all rows and each row's own keys apart, and the two softmaxes merged
    /// ([`layers::attention_after_shared`]), so the prefix is never copied per row.
    pub(crate) fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        mask: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        match self.cache.as_deref_mut() {
            Some(cache) if cache.shared_len() > 0 => {
                let prefix = cache.shared_len();
                let (shared, own) = cache.push_layer_split(layer, &k, &v)?;
                let keys = mask.size().last().copied().unwrap_or(0);
                let own_mask = mask.f_narrow(-1, prefix, keys - prefix)?;
                match shared {
                    Some(shared) if bool::try_from(mask.f_narrow(-1, 0, prefix)?.f_all()?)? => {
                        layers::attention_after_shared(q, &shared, &own, &own_mask, scale)
                    }
                    // A query that may not see all of the prefix: the prefix copied for every row.
                    Some((sk, sv)) => {
                        let (k, v) = (prefix_per_row(&sk, &own.0)?, prefix_per_row(&sv, &own.1)?);
                        layers::attention(q, &k, &v, mask, scale)
                    }
                    None => layers::attention(q, &own.0, &own.1, mask, scale),
                }
            }
            _ => {
                let (k, v) = self.keys_values(layer, k, v)?;
                self.attention(q, &k, &v, mask, scale, 0.0)
            }
        }
    }
}

/// A causal language model: an architecture's [`Decoder`] with its parameters.
#[derive(Debug)]
pub struct Model<D> {
    vs: VarStore,
    decoder: D,
    hooks: Hooks,
    training: AtomicBool,
}

impl<D: Decoder> Model<D> {
    pub(crate) fn from_parts(vs: VarStore, decoder: D) -> Self {
        Self { vs, decoder, hooks: Hooks::default(), training: AtomicBool::new(false) }
    }

    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    pub fn decoder(&self) -> &D {
        &self.decoder
    }

    /// The parameters sorted by checkpoint name (the store's map iterates in a different order in
    /// every process).
    pub fn variables_by_name(&self) -> Vec<(String, Tensor)> {
        let mut variables: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        variables
    }

    /// Final hidden states `[rows, seq, hidden]`; with a cache, of the new tokens only.
    fn hidden(&self, input: &ModelInput, cache: Option<&mut KvCache>) -> Result<Tensor> {
        if let Some(table) = self.decoder.sizes().positions {
            check_positions(&input.positions, table)?;
        }
        let key_positions = match cache.as_deref() {
            Some(cache) => {
                let keys = input.attention.size().last().copied().unwrap_or(0);
                if cache.len() != keys {
                    return Err(Error::Input {
                        message: format!(
                            "the cache holds {} key positions but the attention mask has {keys} keys: advance the \
                             cache (KvCache::advance) with the new tokens' positions first",
                            cache.len()
                        ),
                    });
                }
                cache.key_positions().shallow_clone()
            }
            None => input.positions.shallow_clone(),
        };
        let mut pass = Pass {
            hooks: &self.hooks,
            cache,
            mask: input.attention.f_unsqueeze(1)?,
            positions: input.positions.shallow_clone(),
            key_positions,
            training: self.is_training(),
            spans: Vec::new(),
        };
        self.decoder.hidden(input, &mut pass)
    }

    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.hooks.around(Stage::Head, || self.decoder.head(hidden))
    }

    /// Logits at every position, `[rows, seq, vocab]`, recording gradients (unlike
    /// [`CausalLm::logits`]); dropout applies when the model is in training mode.
    pub fn forward_t(&self, input: &ModelInput) -> Result<Tensor> {
        self.head(&self.hidden(input, None)?)
    }

    /// Mean next-token cross-entropy (f32) of right-aligned sequences `input_ids` `[rows, seq]`: each
    /// position predicts the token after it. Differentiable, for training.
    pub fn next_token_loss(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, t) = input_ids.size2()?;
        let logits = self.forward_t(&ModelInput::causal(input_ids)?)?;
        let predicted = logits.f_narrow(1, 0, t - 1)?.f_reshape([-1, self.decoder.sizes().vocab_size])?;
        let targets = input_ids.f_narrow(1, 1, t - 1)?.f_reshape([-1])?;
        let log_probs = predicted.f_log_softmax(-1, Kind::Float)?;
        Ok(log_probs.f_nll_loss(&targets, None::<Tensor>, tch::Reduction::Mean, -100)?)
    }
}

/// Rejects positions a learned position table does not cover.
fn check_positions(positions: &Tensor, table: PositionTable) -> Result<()> {
    if positions.numel() == 0 {
        return Ok(());
    }
    let max_position = positions.f_max()?.f_int64_value(&[])?;
    if max_position >= table.size {
        return Err(Error::Input {
            message: format!("position {max_position} is beyond {} {}", table.field, table.size),
        });
    }
    Ok(())
}

impl<D: Decoder> CausalLm for Model<D> {
    fn hidden_at(&self, input: &ModelInput, scored: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let hidden = self.hidden(input, None)?;
        Ok(hidden.f_reshape([-1, self.decoder.sizes().hidden_size])?.f_index_select(0, scored)?)
    }

    fn hidden_cached(&self, input: &ModelInput, cache: &mut KvCache) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.hidden(input, Some(cache))
    }

    fn head_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.head(hidden)
    }

    fn logits(&self, input: &ModelInput) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.forward_t(input)
    }

    fn vocab_size(&self) -> i64 {
        self.decoder.sizes().vocab_size
    }

    fn max_length(&self) -> usize {
        self.decoder.sizes().max_length
    }

    fn eos_token_id(&self) -> Option<u32> {
        self.decoder.sizes().eos_token_id
    }

    fn device(&self) -> Device {
        self.vs.device()
    }

    fn kind(&self) -> Kind {
        self.vs.kind()
    }

    fn parameter_bytes(&self) -> usize {
        self.vs.variables().values().map(|t| t.numel() * t.kind().elt_size_in_bytes()).sum()
    }

    fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    fn set_training(&self, training: bool) {
        if self.decoder.has_training_mode() {
            self.training.store(training, Ordering::Relaxed);
        }
    }

    fn forward_flops(&self, lengths: &[usize], scored: usize) -> f64 {
        self.decoder.forward_flops(lengths, scored)
    }
}

/// A declared model, before it is boxed as a [`CausalLm`]: what loading and sharding need.
pub(crate) trait Declared {
    fn var_store(&self) -> &VarStore;
    fn set_hooks(&mut self, hooks: Hooks);
    fn into_causal_lm(self: Box<Self>) -> Box<dyn CausalLm>;
}

impl<D: Decoder> Declared for Model<D> {
    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn set_hooks(&mut self, hooks: Hooks) {
        self.hooks = hooks;
    }

    fn into_causal_lm(self: Box<Self>) -> Box<dyn CausalLm> {
        self
    }
}
