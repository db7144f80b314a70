//! Generation: greedy decoding for batches of prompts of similar length, this rank's share run
//! through the shared loop ([`crate::run`]).

use crate::run::{run_share, Job};
use crate::{Error, GenerationRequests, Observer, Result};
use icl_data::Tokenizer;
use icl_models::{generate_greedy_after_prefix, CausalLm, GenerateOptions};
use icl_shard::Collective;

/// Generates greedily for every request of a generation task: this rank's share of the batches, then
/// the other ranks' outputs are gathered. Returns each request's new tokens (the end-of-text token
/// left out), in request order.
pub(crate) fn generate_task(
    model: &dyn CausalLm,
    task: &str,
    work: &GenerationRequests,
    tokenizer: &Tokenizer,
    collective: &dyn Collective,
    observer: &mut dyn Observer,
) -> Result<Vec<Vec<u32>>> {
    let plan = &work.plan;
    // In bf16 the prefix computed apart rounds differently from the whole prompt, and greedy text
    // drifts from there (4 of 6 gsm8k outputs of SmolLM2 differed): reuse only where text stays equal.
    let reuse = work.prefix_reuse && model.kind() == tch::Kind::Float;
    // Without reuse every row computes its whole prompt, so batches planned for that.
    let planned = if reuse { &work.batches } else { &work.whole_prompt_batches };
    // Batches are dealt out whole, by prompt tokens plus the tokens they may generate.
    let costs: Vec<u64> = planned
        .iter()
        .map(|b| b.iter().map(|&r| (plan.requests[r].input.len() + plan.max_new_tokens) as u64).sum())
        .collect();
    let mine = icl_shard::assign_by_cost(&costs, collective.rank(), collective.world_size());
    let batches = mine.iter().map(|&b| planned[b].clone()).collect();
    let options =
        GenerateOptions { max_new_tokens: plan.max_new_tokens, eos_token_id: model.eos_token_id().map(i64::from) };
    if work.shared_prefix > 0 {
        observer.notice(&if reuse {
            format!(
                "{task}: the {}-token prefix that every prompt shares is computed once per batch",
                work.shared_prefix
            )
        } else {
            format!(
                "{task}: the {}-token prefix that every prompt shares is computed for every prompt: generation reuses \
                 prefixes in f32 only (in {:?} the rounding changes generated text)",
                work.shared_prefix,
                model.kind()
            )
        });
    }
    let job = Generating { model, task, work, tokenizer, options, reuse };
    run_share(&job, task, plan.requests.len(), batches, collective, observer)
}

/// Shortest shared prefix worth computing once: below it the extra forward pass costs more than it saves.
const MIN_SHARED_PREFIX: usize = 32;

/// Tokens that every prompt of a batch starts with, leaving each prompt at least one token of its own
/// (its last token's prediction starts its output); 0 when that is under [`MIN_SHARED_PREFIX`] or the
/// batch has one prompt.
pub(crate) fn shared_prefix_len<T: PartialEq, P: AsRef<[T]>>(prompts: &[P]) -> usize {
    let Some((first, rest)) = prompts.split_first() else { return 0 };
    if rest.is_empty() {
        return 0;
    }
    let first = first.as_ref();
    let shortest = prompts.iter().map(|p| p.as_ref().len()).min().unwrap_or(0);
    let common = rest
        .iter()
        .map(|p| first.iter().zip(p.as_ref()).take_while(|(a, b)| a == b).count())
        .min()
        .unwrap_or(0)
        .min(shortest.saturating_sub(1));
    if common >= MIN_SHARED_PREFIX {
        common
    } else {
        0
    }
}

/// Generation as a [`Job`] of the shared loop; a batch is indices into the plan's requests.
struct Generating<'a> {
    model: &'a dyn CausalLm,
    task: &'a str,
    work: &'a GenerationRequests,
    tokenizer: &'a Tokenizer,
    options: GenerateOptions,
    /// Whether a batch's shared prefix is computed once.
    reuse: bool,
}

impl Job for Generating<'_> {
    type Batch = Vec<usize>;
    type Output = Vec<u32>;

    fn requests<'b>(&self, batch: &'b Vec<usize>) -> &'b [usize] {
        batch
    }

    /// Decodes the batch, each row stopping at a stop sequence in its decoded output (or the cap, or
    /// the end-of-text token).
    fn run(&self, batch: &Vec<usize>) -> Result<Vec<(usize, Vec<u32>)>> {
        let plan = &self.work.plan;
        let prompts: Vec<Vec<i64>> =
            batch.iter().map(|&r| plan.requests[r].input.iter().map(|&t| i64::from(t)).collect()).collect();
        // Decoding fails only on ids outside the vocabulary; the first failure is reported.
        let mut decode_error: Option<icl_data::Error> = None;
        let mut stop = |_row: usize, tokens: &[i64]| -> bool {
            if plan.stop_sequences.is_empty() {
                return false;
            }
            let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
            match self.tokenizer.decode(&ids) {
                Ok(text) => plan.stop_sequences.iter().any(|s| text.contains(s.as_str())),
                Err(e) => {
                    decode_error.get_or_insert(e);
                    true
                }
            }
        };
        let shared = if self.reuse { shared_prefix_len(&prompts) } else { 0 };
        let suffixes: Vec<Vec<i64>> = prompts.iter().map(|p| p[shared..].to_vec()).collect();
        let generated =
            generate_greedy_after_prefix(self.model, &prompts[0][..shared], &suffixes, self.options, &mut stop)?;
        if let Some(e) = decode_error {
            return Err(e.into());
        }
        Ok(batch
            .iter()
            .zip(generated)
            .map(|(&r, tokens)| (r, tokens.into_iter().map(|t| t as u32).collect()))
            .collect())
    }

    /// The batch in two halves.
    fn split(&self, batch: Vec<usize>, error: Error) -> Result<(Vec<Vec<usize>>, String)> {
        if batch.len() < 2 {
            let request = &self.work.plan.requests[batch[0]];
            return Err(Error::Example {
                task: self.task.to_owned(),
                example: request.example,
                message: format!("out of memory even alone ({} prompt tokens): {error}", request.input.len()),
            });
        }
        let notice = format!("out of memory generating for {} prompts; retrying them in two halves", batch.len());
        let (first, second) = batch.split_at(batch.len() / 2);
        Ok((vec![first.to_vec(), second.to_vec()], notice))
    }

    fn finish_collectives(&self) -> Result<()> {
        Ok(self.model.finish_collectives()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_leaves_every_prompt_a_token_and_skips_short_ones() {
        let long: Vec<i64> = (0..40).collect();
        let with = |tail: &[i64]| -> Vec<i64> { long.iter().chain(tail).copied().collect() };
        assert_eq!(shared_prefix_len(&[with(&[1, 2]), with(&[1, 3]), with(&[7])]), 40);
        // A prompt that is the prefix itself keeps its last token.
        assert_eq!(shared_prefix_len(&[with(&[]), with(&[5, 6])]), 39);
        assert_eq!(shared_prefix_len(&[with(&[1])]), 0, "one prompt: nothing to share");
        assert_eq!(shared_prefix_len(&[long[..20].to_vec(), long[..30].to_vec()]), 0, "under the minimum");
        let mut other = with(&[1]);
        other[10] = -1;
        assert_eq!(shared_prefix_len(&[with(&[1]), other]), 0, "they part at token 10");
    }
}
