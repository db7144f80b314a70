//! Generation: greedy decoding for batches of prompts of similar length, this rank's share run
//! through the shared loop ([`crate::run`]).

use crate::run::{run_share, Job};
use crate::{Error, GenerationRequests, Observer, Result};
use icl_data::Tokenizer;
use icl_models::{generate_greedy, CausalLm, GenerateOptions};
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
    // Batches are dealt out whole, by prompt tokens plus the tokens they may generate.
    let costs: Vec<u64> = work
        .batches
        .iter()
        .map(|b| b.iter().map(|&r| (plan.requests[r].input.len() + plan.max_new_tokens) as u64).sum())
        .collect();
    let mine = icl_shard::assign_by_cost(&costs, collective.rank(), collective.world_size());
    let batches = mine.iter().map(|&b| work.batches[b].clone()).collect();
    let options =
        GenerateOptions { max_new_tokens: plan.max_new_tokens, eos_token_id: model.eos_token_id().map(i64::from) };
    let job = Generating { model, task, work, tokenizer, options };
    run_share(&job, task, plan.requests.len(), batches, collective, observer)
}

/// Generation as a [`Job`] of the shared loop; a batch is indices into the plan's requests.
struct Generating<'a> {
    model: &'a dyn CausalLm,
    task: &'a str,
    work: &'a GenerationRequests,
    tokenizer: &'a Tokenizer,
    options: GenerateOptions,
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
        let generated = generate_greedy(self.model, &prompts, self.options, &mut stop)?;
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
