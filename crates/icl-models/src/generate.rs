//! Greedy generation with a key-value cache, batched over prompts of different lengths.
//!
//! Design: a model implements one extra primitive, [`CausalLm::hidden_cached`]: run new tokens after
//! those whose keys and values a [`KvCache`] holds, and append theirs. Everything else (padding,
//! masks, positions, argmax, stopping, dropping finished rows) is here, shared by every architecture.
//!
//! A batch is left-padded to its longest prompt. Each row's real tokens get positions `0, 1, ...`
//! (padding never shifts a rotary phase or a learned position), and no real token attends to padding,
//! so a row's tokens are those it would produce alone, up to float rounding. Padding queries attend
//! only to themselves (no attention row is empty). The prefill runs the prompts in chunks of rows of
//! similar lengths (so it computes little padding) and applies the output head at the last column only; each further step runs one token per unfinished
//! row. A row finishes at the end-of-text token (not included in its output), when `stop` says so
//! (the token that triggered it is included), or after `max_new_tokens`; finished rows leave the
//! batch and the cache, so later steps cost only what is still running.
//!
//! A prefix that every prompt shares ([`generate_greedy_after_prefix`]) is computed once, for one row,
//! and kept once in the cache; each row's own tokens follow it, computed in chunks of rows of similar
//! lengths. The decoding steps run inside [`crate::skinny::decoding`]: their products and attention go
//! through icl's kernels. The cache preallocates its columns, so
//! a decoding step writes one column in place instead of copying the cache.

use crate::{CausalLm, Error, ModelInput, Result};
use tch::{Device, Kind, Tensor};

/// Keys and values of the tokens a batch has seen, per layer (`[rows, kv_heads, seen, head_dim]`,
/// after rotary embeddings), and the position of each of those tokens within its row's sequence
/// (advanced by the caller, one step ahead of the layers).
///
/// With a capacity ([`KvCache::with_capacity`]) each layer's keys and values live in one buffer of
/// that many columns, allocated at the first push: a decoding step writes its column in place and
/// the layers attend over a view of the filled columns, instead of copying the whole cache at every
/// step. A push past the capacity grows the buffer (doubling), so a capacity is a hint, never a limit.
///
/// A cache made by [`KvCache::after_prefix`] holds a prefix that every row shares once (`[1, kv_heads,
/// prefix, head_dim]` per layer) before each row's own columns: a decoding step attends to it
/// without copying it for every row ([`crate::model::Pass::attend`]).
#[derive(Debug, Default)]
pub struct KvCache {
    /// Each row's own columns (after the shared prefix).
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// The shared prefix's keys and values per layer; empty without one.
    shared: Vec<(Tensor, Tensor)>,
    shared_len: i64,
    key_positions: Option<Tensor>,
    /// Columns each layer's buffer of own columns is allocated with; 0: no buffer, keys and values
    /// concatenated.
    capacity: i64,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache whose layers keep `columns` columns preallocated (the longest prompt plus the tokens
    /// to generate).
    pub fn with_capacity(columns: i64) -> Self {
        Self { capacity: columns.max(0), ..Self::default() }
    }

    /// A cache for `rows` rows that all start with the prefix `prefix` holds (a one-row cache of
    /// the prefix alone, every layer pushed), kept once; each row's own columns get `capacity` columns
    /// preallocated.
    pub fn after_prefix(prefix: &KvCache, rows: i64, capacity: i64) -> Result<KvCache> {
        let shared_len = prefix.len();
        let positions = prefix.key_positions();
        if positions.size().first().copied() != Some(1) || !prefix.shared.is_empty() {
            return Err(Error::Input { message: "a shared prefix must be one row of its own cache".into() });
        }
        let shared = prefix
            .layers
            .iter()
            .enumerate()
            .map(|(layer, kv)| {
                let (k, v) = kv.as_ref().ok_or_else(|| Error::Input {
                    message: format!("the shared prefix's cache has no keys for layer {layer}"),
                })?;
                Ok((k.f_narrow(2, 0, shared_len)?.f_contiguous()?, v.f_narrow(2, 0, shared_len)?.f_contiguous()?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers: Vec::new(),
            shared,
            shared_len,
            key_positions: Some(positions.f_expand([rows, shared_len], false)?.f_contiguous()?),
            capacity: capacity.max(1),
        })
    }

    /// Columns (tokens per row, padding included) held.
    pub fn len(&self) -> i64 {
        self.key_positions.as_ref().map_or(0, |p| p.size().get(1).copied().unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Columns of the prefix every row shares (0 without one).
    pub fn shared_len(&self) -> i64 {
        self.shared_len
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
    /// returns those of every token seen (a shared prefix copied out for every row).
    pub fn push_layer(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (shared, (k, v)) = self.push_layer_split(layer, k, v)?;
        let Some((sk, sv)) = shared else { return Ok((k, v)) };
        Ok((prefix_per_row(&sk, &k)?, prefix_per_row(&sv, &v)?))
    }

    /// [`KvCache::push_layer`], the shared prefix's keys and values (`[1, kv_heads, prefix,
    /// head_dim]`, when there is one) apart from the rows' own (`[rows, kv_heads, seen - prefix,
    /// head_dim]`).
    #[allow(clippy::type_complexity)]
    pub fn push_layer_split(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Option<(Tensor, Tensor)>, (Tensor, Tensor))> {
        let shared = if self.shared_len > 0 {
            let (sk, sv) = self.shared.get(layer).ok_or_else(|| Error::Input {
                message: format!("layer {layer} is not in the shared prefix's cache"),
            })?;
            Some((sk.shallow_clone(), sv.shallow_clone()))
        } else {
            None
        };
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, || None);
        }
        if self.capacity == 0 {
            let (k, v) = match &self.layers[layer] {
                Some((ks, vs)) => (Tensor::f_cat(&[ks, k], 2)?, Tensor::f_cat(&[vs, v], 2)?),
                None => (k.shallow_clone(), v.shallow_clone()),
            };
            self.layers[layer] = Some((k.shallow_clone(), v.shallow_clone()));
            return Ok((shared, (k, v)));
        }
        // The new columns end where the advanced positions end.
        let end = self.len() - self.shared_len;
        let t = k.size().get(2).copied().unwrap_or(0);
        let start = end - t;
        if start < 0 {
            return Err(Error::Input {
                message: format!("layer {layer} pushed {t} new keys but the cache was advanced to {end} own columns"),
            });
        }
        let (kb, vb) = match self.layers[layer].take() {
            Some((kb, vb)) if kb.size()[2] >= end => (kb, vb),
            old => {
                let columns = self.capacity.max(end).max(old.as_ref().map_or(0, |(kb, _)| 2 * kb.size()[2]));
                let buffer = |x: &Tensor, old: Option<&Tensor>| -> Result<Tensor> {
                    let mut shape = x.size();
                    shape[2] = columns;
                    let b = Tensor::f_empty(shape.as_slice(), (x.kind(), x.device()))?;
                    if let Some(old) = old {
                        b.f_narrow(2, 0, start)?.f_copy_(&old.f_narrow(2, 0, start)?)?;
                    }
                    Ok(b)
                };
                let (ko, vo) = old.map_or((None, None), |(kb, vb)| (Some(kb), Some(vb)));
                (buffer(k, ko.as_ref())?, buffer(v, vo.as_ref())?)
            }
        };
        kb.f_narrow(2, start, t)?.f_copy_(k)?;
        vb.f_narrow(2, start, t)?.f_copy_(v)?;
        let filled = (kb.f_narrow(2, 0, end)?, vb.f_narrow(2, 0, end)?);
        self.layers[layer] = Some((kb, vb));
        Ok((shared, filled))
    }

    /// Writes the own columns of `part`, a cache of this cache's rows `rows` (i64 indices) after the
    /// same shared prefix, into those rows' last own columns; the columns before them (padding to this
    /// cache's width) are zeroed, as keys no query attends must still be finite. This cache must be
    /// advanced to its full width first.
    pub(crate) fn write_rows(&mut self, rows: &Tensor, part: &KvCache) -> Result<()> {
        let end = self.len() - self.shared_len;
        let filled = part.len() - part.shared_len;
        let total_rows = self.key_positions().size()[0];
        if filled > end {
            return Err(Error::Input { message: format!("{filled} columns written into a cache of {end}") });
        }
        if self.layers.len() < part.layers.len() {
            self.layers.resize_with(part.layers.len(), || None);
        }
        for (layer, kv) in part.layers.iter().enumerate() {
            let Some((pk, pv)) = kv else { continue };
            let columns = self.capacity.max(end);
            let buffer = |x: &Tensor| -> Result<Tensor> {
                let mut shape = x.size();
                shape[0] = total_rows;
                shape[2] = columns;
                Ok(Tensor::f_empty(shape.as_slice(), (x.kind(), x.device()))?)
            };
            let (kb, vb) = match self.layers[layer].take() {
                Some(buffers) => buffers,
                None => (buffer(pk)?, buffer(pv)?),
            };
            for (b, p) in [(&kb, pk), (&vb, pv)] {
                let _zeroed = b.f_narrow(2, 0, end - filled)?.f_index_fill_(0, rows, 0.0)?;
                let _written =
                    b.f_narrow(2, end - filled, filled)?.f_index_copy_(0, rows, &p.f_narrow(2, 0, filled)?)?;
            }
            self.layers[layer] = Some((kb, vb));
        }
        Ok(())
    }

    /// Keeps only the rows `keep` (ascending row indices) and returns the new row order: entry `p`
    /// is the old row now at row `p`. A kept row stays where it is unless it lies past the rows that
    /// remain; those fill the freed rows in place. So a finished row costs copying one row's filled
    /// columns, not the whole cache (which holds every column to the end of generation).
    pub fn retain_rows(&mut self, keep: &[usize]) -> Result<Vec<usize>> {
        let rows = self.key_positions().size().first().copied().unwrap_or(0) as usize;
        if keep.windows(2).any(|w| w[0] >= w[1]) || keep.last().is_some_and(|&r| r >= rows) {
            return Err(Error::Input { message: format!("rows to keep {keep:?} are not ascending rows of {rows}") });
        }
        let remaining = keep.len();
        let mut order: Vec<usize> = (0..remaining).collect();
        let mut kept = vec![false; rows];
        keep.iter().for_each(|&r| kept[r] = true);
        let freed = (0..remaining).filter(|&r| !kept[r]);
        let movers = keep.iter().copied().filter(|&r| r >= remaining);
        let moves: Vec<(usize, usize)> = movers.zip(freed).collect();
        for &(from, to) in &moves {
            order[to] = from;
        }
        let own = self.len() - self.shared_len;
        let device = self.key_positions.as_ref().map_or(Device::Cpu, Tensor::device);
        let index = Tensor::from_slice(&order.iter().map(|&r| r as i64).collect::<Vec<_>>()).f_to_device(device)?;
        if let Some(positions) = &mut self.key_positions {
            *positions = positions.f_index_select(0, &index)?;
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            for buffer in [k, v] {
                if self.capacity == 0 {
                    *buffer = buffer.f_index_select(0, &index)?;
                    continue;
                }
                // Only the columns written so far hold anything.
                let filled = buffer.f_narrow(2, 0, own.min(buffer.size()[2]))?;
                for &(from, to) in &moves {
                    filled.f_narrow(0, to as i64, 1)?.f_copy_(&filled.f_narrow(0, from as i64, 1)?)?;
                }
                *buffer = buffer.f_narrow(0, 0, remaining as i64)?;
            }
        }
        Ok(order)
    }
}

/// A shared prefix's keys or values (`[1, kv_heads, prefix, head_dim]`) copied for every row of `own`
/// (`[rows, kv_heads, seen, head_dim]`), followed by that row's own.
pub(crate) fn prefix_per_row(prefix: &Tensor, own: &Tensor) -> Result<Tensor> {
    let mut shape = prefix.size();
    shape[0] = own.size()[0];
    Ok(Tensor::f_cat(&[&prefix.f_expand(shape.as_slice(), false)?, own], 2)?)
}

/// Most token slots (rows times padded length) in one chunk of a prefill after a shared prefix.
const PREFILL_CHUNK_TOKENS: usize = 8192;

/// The prompts' rows in chunks for their prefill, longest first: a chunk closes before a row that
/// would pad it by more than a quarter of its width, or take it past [`PREFILL_CHUNK_TOKENS`].
fn prefill_chunks(prompts: &[Vec<i64>]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&r| std::cmp::Reverse(prompts[r].len()));
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    for row in order {
        let len = prompts[row].len();
        match chunks.last_mut() {
            Some(chunk)
                if (len * 4 >= prompts[chunk[0]].len() * 3)
                    && (chunk.len() + 1) * prompts[chunk[0]].len() <= PREFILL_CHUNK_TOKENS =>
            {
                chunk.push(row)
            }
            _ => chunks.push(vec![row]),
        }
    }
    chunks
}

/// Prompts left-padded to the longest for one prefill pass after `shared` prefix tokens: ids,
/// positions (a row's real tokens continue from the prefix; padding sits at position 0) and which
/// columns are real tokens, each `[rows, width]`.
struct Prefill {
    ids: Tensor,
    positions: Tensor,
    valid: Tensor,
    width: i64,
    shared: i64,
}

impl Prefill {
    fn new(prompts: Vec<&[i64]>, shared: i64, device: Device) -> Result<Self> {
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let (rows, width) = (prompts.len() as i64, longest as i64);
        let mut ids = Vec::with_capacity(prompts.len() * longest);
        let mut positions = Vec::with_capacity(ids.capacity());
        let mut valid = Vec::with_capacity(ids.capacity());
        for prompt in prompts {
            let pad = longest - prompt.len();
            ids.extend(std::iter::repeat_n(0, pad).chain(prompt.iter().copied()));
            positions.extend(std::iter::repeat_n(0, pad).chain(shared..shared + prompt.len() as i64));
            valid.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, prompt.len())));
        }
        let tensor = |t: Tensor| -> Result<Tensor> { Ok(t.f_view([rows, width])?.f_to_device(device)?) };
        Ok(Self {
            ids: tensor(Tensor::from_slice(&ids))?,
            positions: tensor(Tensor::from_slice(&positions))?,
            valid: tensor(Tensor::from_slice(&valid))?,
            width,
            shared,
        })
    }

    /// Which cached columns are real tokens, `[rows, shared + width]` (the prefix's all are).
    fn key_valid(&self) -> Result<Tensor> {
        if self.shared == 0 {
            return Ok(self.valid.shallow_clone());
        }
        let rows = self.valid.size()[0];
        let prefix = Tensor::f_ones([rows, self.shared], (Kind::Bool, self.valid.device()))?;
        Ok(Tensor::f_cat(&[prefix, self.valid.shallow_clone()], 1)?)
    }

    /// The pass's input: no real token attends to padding, a padding query attends only to itself,
    /// and every query sees the whole prefix (padding queries too: their outputs are never used).
    fn input(&self) -> Result<ModelInput> {
        let (rows, width) = (self.valid.size()[0], self.width);
        let device = self.valid.device();
        let columns = Tensor::f_arange(width, (Kind::Int64, device))?;
        let causal = columns.f_unsqueeze(0)?.f_le_tensor(&columns.f_unsqueeze(1)?)?;
        let own = columns.f_unsqueeze(0)?.f_eq_tensor(&columns.f_unsqueeze(1)?)?;
        let mut attention =
            causal.f_unsqueeze(0)?.f_logical_and(&self.valid.f_unsqueeze(1)?.f_logical_or(&own.f_unsqueeze(0)?)?)?;
        if self.shared > 0 {
            let prefix_keys = Tensor::f_ones([rows, width, self.shared], (Kind::Bool, device))?;
            attention = Tensor::f_cat(&[prefix_keys, attention], 2)?;
        }
        Ok(ModelInput { input_ids: self.ids.shallow_clone(), positions: self.positions.shallow_clone(), attention })
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
    generate_greedy_after_prefix(model, &[], prompts, options, stop)
}

/// [`generate_greedy`] on the prompts `prefix + suffixes[i]`, the shared `prefix` computed once: its
/// keys and values are computed for one row and copied into every row's cache, then each row's suffix
/// runs after it (left-padded between the prefix and the suffix, positions continuing from the
/// prefix, padding never attended). Each row gets the tokens it would get alone, up to float rounding.
/// Every suffix must be non-empty (the last prompt token's prediction comes from its own row).
pub fn generate_greedy_after_prefix(
    model: &dyn CausalLm,
    prefix: &[i64],
    suffixes: &[Vec<i64>],
    options: GenerateOptions,
    stop: &mut dyn FnMut(usize, &[i64]) -> bool,
) -> Result<Vec<Vec<i64>>> {
    let _guard = tch::no_grad_guard();
    // From here on a row's prompt is what follows the shared prefix.
    let prompts = suffixes;
    let mut outputs: Vec<Vec<i64>> = vec![Vec::new(); prompts.len()];
    if prompts.is_empty() || options.max_new_tokens == 0 {
        return Ok(outputs);
    }
    let invalid = |message: String| Error::Input { message };
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if let Some(row) = prompts.iter().position(Vec::is_empty) {
        return Err(invalid(format!("prompt {row} is empty (after a shared prefix of {} tokens)", prefix.len())));
    }
    if prefix.len() + longest + options.max_new_tokens > model.max_length() {
        return Err(invalid(format!(
            "a prompt of {} tokens plus {} new ones exceeds the model's {} positions",
            prefix.len() + longest,
            options.max_new_tokens,
            model.max_length()
        )));
    }
    let device = model.device();
    let (rows, width, shared) = (prompts.len() as i64, longest as i64, prefix.len() as i64);
    let to = |t: Tensor| t.f_to_device(device);
    let batch = Prefill::new(prompts.iter().map(Vec::as_slice).collect(), shared, device)?;
    let mut key_valid = batch.key_valid()?;
    // The prefix once, as a causal sequence of its own; its hidden states are not needed.
    let prefix_cache = if prefix.is_empty() {
        None
    } else {
        let ids = to(Tensor::from_slice(prefix).f_view([1, shared])?)?;
        let input = ModelInput::causal(&ids)?;
        let mut one = KvCache::with_capacity(shared);
        one.advance(&input.positions)?;
        let _prefix_hidden = model.hidden_cached(&input, &mut one)?;
        Some(one)
    };
    let own_capacity = width + options.max_new_tokens as i64;
    let mut cache = match &prefix_cache {
        Some(one) => KvCache::after_prefix(one, rows, own_capacity)?,
        None => KvCache::with_capacity(own_capacity),
    };
    cache.advance(&batch.positions)?;
    // The rows' own tokens in chunks of similar lengths: padding every prompt to the longest would
    // compute padding tokens (a third of the tokens of 32 TriviaQA questions; after a long shared
    // prefix as many as real ones).
    let chunks = prefill_chunks(prompts);
    let mut last = if let ([_], None) = (chunks.as_slice(), &prefix_cache) {
        model.hidden_cached(&batch.input()?, &mut cache)?.f_select(1, width - 1)?
    } else {
        let mut lasts = Vec::new();
        let mut order = Vec::with_capacity(prompts.len());
        for chunk in chunks {
            let part = Prefill::new(chunk.iter().map(|&r| prompts[r].as_slice()).collect(), shared, device)?;
            let mut part_cache = match &prefix_cache {
                Some(one) => KvCache::after_prefix(one, chunk.len() as i64, part.width)?,
                None => KvCache::with_capacity(part.width),
            };
            part_cache.advance(&part.positions)?;
            lasts.push(model.hidden_cached(&part.input()?, &mut part_cache)?.f_select(1, part.width - 1)?);
            let rows = to(Tensor::from_slice(&chunk.iter().map(|&r| r as i64).collect::<Vec<_>>()))?;
            cache.write_rows(&rows, &part_cache)?;
            order.extend(chunk);
        }
        // Back to the prompts' order.
        let mut inverse = vec![0i64; order.len()];
        for (at, &row) in order.iter().enumerate() {
            inverse[row] = at as i64;
        }
        Tensor::f_cat(&lasts, 0)?.f_index_select(0, &to(Tensor::from_slice(&inverse))?)?
    };
    // Row of the batch -> prompt index, and the next position of each running row.
    let mut running: Vec<usize> = (0..prompts.len()).collect();
    let mut next_position: Vec<i64> = prompts.iter().map(|p| shared + p.len() as i64).collect();
    // The steps' products and attention through icl's kernels ([`crate::skinny`]).
    crate::skinny::decoding(|| loop {
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
        // `order[p]`: the batch row that runs as row `p` from this step on.
        let order = if keep.len() < running.len() {
            let order = cache.retain_rows(&keep)?;
            let rows = to(Tensor::from_slice(&order.iter().map(|&r| r as i64).collect::<Vec<_>>()))?;
            key_valid = key_valid.f_index_select(0, &rows)?;
            running = order.iter().map(|&r| running[r]).collect();
            order
        } else {
            keep
        };
        let step_ids: Vec<i64> = order.iter().map(|&r| next[r]).collect();
        let step_positions: Vec<i64> = running.iter().map(|&prompt| next_position[prompt]).collect();
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retained_rows_keep_their_keys_and_positions() {
        for capacity in [0, 8] {
            let mut cache = KvCache::with_capacity(capacity);
            let positions = Tensor::arange(5 * 3, (Kind::Int64, Device::Cpu)).view([5, 3]);
            cache.advance(&positions).unwrap();
            let k = Tensor::randn([5, 2, 3, 4], (Kind::Float, Device::Cpu));
            let v = Tensor::randn([5, 2, 3, 4], (Kind::Float, Device::Cpu));
            let _seen = cache.push_layer(0, &k, &v).unwrap();
            // Rows 1 and 3 finish: row 4 moves into row 1, rows 0 and 2 stay.
            let order = cache.retain_rows(&[0, 2, 4]).unwrap();
            assert_eq!(order, vec![0, 4, 2]);
            let index = Tensor::from_slice(&[0i64, 4, 2]);
            assert!(cache.key_positions().equal(&positions.index_select(0, &index)));
            // The next step writes its column into the kept rows only.
            let step = Tensor::from_slice(&[3i64, 3, 3]).view([3, 1]);
            cache.advance(&step).unwrap();
            let (k1, v1) = (
                Tensor::ones([3, 2, 1, 4], (Kind::Float, Device::Cpu)),
                Tensor::zeros([3, 2, 1, 4], (Kind::Float, Device::Cpu)),
            );
            let (ks, vs) = cache.push_layer(0, &k1, &v1).unwrap();
            assert!(ks.equal(&Tensor::cat(&[k.index_select(0, &index), k1], 2)), "capacity {capacity}");
            assert!(vs.equal(&Tensor::cat(&[v.index_select(0, &index), v1], 2)), "capacity {capacity}");
            assert!(cache.retain_rows(&[2, 1]).is_err(), "not ascending");
            assert!(cache.retain_rows(&[3]).is_err(), "past the rows");
        }
    }

    #[test]
    fn prefill_chunks_group_similar_lengths_longest_first() {
        let prompts: Vec<Vec<i64>> = [10, 100, 80, 76, 74, 9, 60].iter().map(|&n| vec![1; n]).collect();
        // 100, 80 and 76 pad to 100 by at most a quarter; 74 does not; 60 pads 74 by under a quarter.
        assert_eq!(prefill_chunks(&prompts), vec![vec![1, 2, 3], vec![4, 6], vec![0, 5]]);
        let many: Vec<Vec<i64>> = (0..100).map(|_| vec![1; 1000]).collect();
        let chunks = prefill_chunks(&many);
        assert!(chunks.iter().all(|c| c.len() * 1000 <= PREFILL_CHUNK_TOKENS), "within the budget");
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 100);
    }
}
