//! Greedy generation with a key-value cache, batched over prompts of different lengths.
//!
//! Design: a model implements one extra primitive, [`CausalLm::hidden_cached`]: run new tokens after
//! those whose keys and values a [`KvCache`] holds, and append theirs. Everything else (padding,
//! masks, positions, argmax, stopping, dropping finished rows) is here, shared by every architecture.
//!
//! A batch is left-padded to its longest prompt. Each row's real tokens get positions `0, 1, ...`
//! (padding never shifts a rotary phase or a learned position), and no real token attends to padding,
//! so a row's tokens are those it would produce alone, up to float rounding. Padding queries attend
//! only to themselves (no attention row is empty). The prefill runs every prompt token at once and
//! applies the output head at the last column only; each further step runs one token per unfinished
//! row. A row finishes at the end-of-text token (not included in its output), when `stop` says so
//! (the token that triggered it is included), or after `max_new_tokens`; finished rows leave the
//! batch and the cache, so later steps cost only what is still running.

use crate::{CausalLm, Error, ModelInput, Result};
use tch::{Device, Kind, Tensor};

/// Keys and values of the tokens a batch has seen, per layer (`[rows, kv_heads, seen, head_dim]`,
/// after rotary embeddings), and the position of each of those tokens within its row's sequence
/// (advanced by the caller, one step ahead of the layers).
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    key_positions: Option<Tensor>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Columns (tokens per row, padding included) held.
    pub fn len(&self) -> i64 {
        self.key_positions.as_ref().map_or(0, |p| p.size().get(1).copied().unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the positions of the next tokens (`[rows, t]`), which the next
    /// [`CausalLm::hidden_cached`] call runs: the generator does this once per step, so that the
    /// cache knows every key's position (windows and the cache's length come from them).
    pub fn advance(&mut self, positions: &Tensor) -> Result<()> {
        let all = match &self.key_positions {
            Some(seen) => Tensor::f_cat(&[seen, positions], 1)?,
            None => positions.shallow_clone(),
        };
        self.key_positions = Some(all);
        Ok(())
    }

    /// The position of every key, `[rows, columns]` (empty before the first [`KvCache::advance`]).
    pub fn key_positions(&self) -> Tensor {
        self.key_positions.as_ref().map_or_else(|| Tensor::from_slice::<i64>(&[]), Tensor::shallow_clone)
    }

    /// Appends layer `layer`'s keys and values of the new tokens (`[rows, kv_heads, t, head_dim]`) and
    /// returns those of every token seen.
    pub fn push_layer(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, || None);
        }
        let (k, v) = match &self.layers[layer] {
            Some((ks, vs)) => (Tensor::f_cat(&[ks, k], 2)?, Tensor::f_cat(&[vs, v], 2)?),
            None => (k.shallow_clone(), v.shallow_clone()),
        };
        self.layers[layer] = Some((k.shallow_clone(), v.shallow_clone()));
        Ok((k, v))
    }

    /// Keeps only the rows at `rows` (i64 indices), in that order.
    pub fn keep_rows(&mut self, rows: &Tensor) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.f_index_select(0, rows)?;
            *v = v.f_index_select(0, rows)?;
        }
        if let Some(p) = &mut self.key_positions {
            *p = p.f_index_select(0, rows)?;
        }
        Ok(())
    }
}

/// What stops a row's generation besides the end-of-text token.
#[derive(Debug, Clone, Copy)]
pub struct GenerateOptions {
    /// Most tokens generated per prompt.
    pub max_new_tokens: usize,
    /// Generation of a row ends at this token, which its output leaves out.
    pub eos_token_id: Option<i64>,
}

/// Greedy (argmax, lowest id on ties) continuations of `prompts` (token ids, each non-empty), run as
/// one batch. `stop(row, tokens)` is asked after each token a row gets, with its tokens so far; `true`
/// ends that row (e.g. when the decoded text contains a stop sequence). Returns each row's new
/// tokens, without the end-of-text token. Prompt plus output must fit the model's position table.
pub fn generate_greedy(
    model: &dyn CausalLm,
    prompts: &[Vec<i64>],
    options: GenerateOptions,
    stop: &mut dyn FnMut(usize, &[i64]) -> bool,
) -> Result<Vec<Vec<i64>>> {
    let _guard = tch::no_grad_guard();
    let mut outputs: Vec<Vec<i64>> = vec![Vec::new(); prompts.len()];
    if prompts.is_empty() || options.max_new_tokens == 0 {
        return Ok(outputs);
    }
    let invalid = |message: String| Error::Input { message };
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if let Some(row) = prompts.iter().position(Vec::is_empty) {
        return Err(invalid(format!("prompt {row} is empty")));
    }
    if longest + options.max_new_tokens > model.max_length() {
        return Err(invalid(format!(
            "a prompt of {longest} tokens plus {} new ones exceeds the model's {} positions",
            options.max_new_tokens,
            model.max_length()
        )));
    }
    let device = model.device();
    let (rows, width) = (prompts.len() as i64, longest as i64);
    let mut ids = Vec::with_capacity(prompts.len() * longest);
    let mut positions = Vec::with_capacity(ids.capacity());
    let mut valid = Vec::with_capacity(ids.capacity());
    for prompt in prompts {
        let pad = longest - prompt.len();
        ids.extend(std::iter::repeat_n(0, pad).chain(prompt.iter().copied()));
        positions.extend(std::iter::repeat_n(0, pad).chain(0..prompt.len() as i64));
        valid.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, prompt.len())));
    }
    let to = |t: Tensor| t.f_to_device(device);
    let input_ids = to(Tensor::from_slice(&ids).f_view([rows, width])?)?;
    let positions = to(Tensor::from_slice(&positions).f_view([rows, width])?)?;
    // Which cached columns are real tokens: `[rows, seen]`.
    let mut key_valid = to(Tensor::from_slice(&valid).f_view([rows, width])?)?;
    let columns = Tensor::f_arange(width, (Kind::Int64, device))?;
    let causal = columns.f_unsqueeze(0)?.f_le_tensor(&columns.f_unsqueeze(1)?)?;
    let own = columns.f_unsqueeze(0)?.f_eq_tensor(&columns.f_unsqueeze(1)?)?;
    let attention =
        causal.f_unsqueeze(0)?.f_logical_and(&key_valid.f_unsqueeze(1)?.f_logical_or(&own.f_unsqueeze(0)?)?)?;

    let mut cache = KvCache::new();
    cache.advance(&positions)?;
    let hidden = model.hidden_cached(&ModelInput { input_ids, positions, attention }, &mut cache)?;
    let mut last = hidden.f_select(1, width - 1)?;
    // Row of the batch -> prompt index, and the next position of each running row.
    let mut running: Vec<usize> = (0..prompts.len()).collect();
    let mut next_position: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
    loop {
        let next = model.head_log_probs(&last)?.f_argmax(-1, false)?.f_to_device(Device::Cpu)?;
        let next = Vec::<i64>::try_from(&next)?;
        let mut keep = Vec::with_capacity(running.len());
        for (row, (&prompt, &token)) in running.iter().zip(&next).enumerate() {
            let done = if Some(token) == options.eos_token_id {
                true
            } else {
                outputs[prompt].push(token);
                stop(prompt, &outputs[prompt]) || outputs[prompt].len() >= options.max_new_tokens
            };
            if !done {
                keep.push(row);
            }
        }
        if keep.is_empty() {
            return Ok(outputs);
        }
        let step_ids: Vec<i64> = keep.iter().map(|&r| next[r]).collect();
        let step_positions: Vec<i64> = keep.iter().map(|&r| next_position[running[r]]).collect();
        if keep.len() < running.len() {
            let rows = to(Tensor::from_slice(&keep.iter().map(|&r| r as i64).collect::<Vec<_>>()))?;
            cache.keep_rows(&rows)?;
            key_valid = key_valid.f_index_select(0, &rows)?;
            running = keep.iter().map(|&r| running[r]).collect();
        }
        for &prompt in &running {
            next_position[prompt] += 1;
        }
        let n = running.len() as i64;
        key_valid = Tensor::f_cat(&[&key_valid, &Tensor::f_ones([n, 1], (Kind::Bool, device))?], 1)?;
        let input = ModelInput {
            input_ids: to(Tensor::from_slice(&step_ids).f_view([n, 1])?)?,
            positions: to(Tensor::from_slice(&step_positions).f_view([n, 1])?)?,
            attention: key_valid.f_unsqueeze(1)?,
        };
        cache.advance(&input.positions)?;
        last = model.hidden_cached(&input, &mut cache)?.f_select(1, 0)?;
    }
}
