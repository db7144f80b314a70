//! Generation tasks (`generation_task_with_answers`) for the model: prompt tokens, the length cap,
//! the stop sequences, and batches of prompts of similar length.
//!
//! Following llm-foundry's `InContextLearningGenerationTaskWithAnswersDataset`:
//! - the length cap defaults to the token count of the longest answer or alias in the whole task
//!   file (at least 1), as llm-foundry sets `max_new_tokens`; in a file with chains of thought each
//!   counted text is `chain_of_thought + cot_delimiter + answer`, and a non-empty `cot_delimiter`
//!   adds 10 tokens (llm-foundry's `_MAX_ANSWER_BUFFER_LENGTH`); here the texts are tokenized without
//!   special tokens (llm-foundry's count includes a BOS token for tokenizers that add one);
//! - a prompt keeps its last `max_length - max_new_tokens` tokens, so prompt and answer fit the model
//!   (llm-foundry trims contexts from the left the same way);
//! - generation stops at the end-of-text token, at the cap, or once the decoded output contains a stop
//!   sequence (`early_stopping_criteria`), and the output is cut before the first stop sequence. When
//!   a task gives none, the example delimiter is the stop sequence (llm-foundry generates to the cap
//!   then; its prefix-match metric makes the difference small, and stopping saves most of the work).

use crate::{Error, Prompt, PromptOptions, Result, Task, TaskExamples, Tokenizer};

/// Tokens added to the default length cap of a task with a `cot_delimiter` (llm-foundry's
/// `_MAX_ANSWER_BUFFER_LENGTH`).
pub const COT_ANSWER_BUFFER: usize = 10;

/// One example's prompt as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationRequest {
    /// Row of the task file (0-based).
    pub example: usize,
    /// Prompt tokens, at most `max_length - max_new_tokens`.
    pub input: Vec<u32>,
    /// Whether tokens were dropped on the left to fit.
    pub truncated: bool,
    /// The accepted answers.
    pub answers: Vec<String>,
}

/// A generation task's requests and how they generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationPlan {
    pub max_new_tokens: usize,
    /// Non-empty stop sequences (may be none).
    pub stop_sequences: Vec<String>,
    /// The answer is what follows the last occurrence of this in the output (when not empty).
    pub cot_delimiter: String,
    /// Normalize answers before comparing (else only strip white space).
    pub normalize_answers: bool,
    pub requests: Vec<GenerationRequest>,
}

/// The requests of a generation task's `prompts` (from [`crate::prompts`] with the same `options`).
/// `prefix_token` stands in for an empty prompt. Errors name the task when the cap leaves no room
/// for a prompt.
pub fn generation_requests(
    tokenizer: &Tokenizer,
    task: &Task,
    prompts: &[Prompt],
    options: &PromptOptions,
    max_length: usize,
    prefix_token: u32,
) -> Result<GenerationPlan> {
    let TaskExamples::GenerationWithAnswers(examples) = &task.examples else {
        return Err(Error::Example {
            task: task.name.clone(),
            index: 0,
            message: format!("is a {} task, not generation_task_with_answers", task.kind().name()),
        });
    };
    let max_new_tokens = match options.max_new_tokens {
        Some(n) => n,
        None => {
            let cot = options.cot_delimiter.as_str();
            let responses: Vec<String> = examples
                .iter()
                .flat_map(|e| {
                    std::iter::once(&e.answer).chain(&e.aliases).map(move |a| match &e.chain_of_thought {
                        Some(thought) => format!("{thought}{cot}{a}"),
                        None => a.clone(),
                    })
                })
                .collect();
            let responses: Vec<&str> = responses.iter().map(String::as_str).collect();
            let longest = tokenizer.encode_batch(&responses)?.iter().map(Vec::len).max().unwrap_or(0);
            // Room for a chain of thought longer than any in the file.
            (longest + if cot.is_empty() { 0 } else { COT_ANSWER_BUFFER }).max(1)
        }
    };
    if max_new_tokens == 0 || max_new_tokens >= max_length {
        return Err(Error::Example {
            task: task.name.clone(),
            index: 0,
            message: format!(
                "max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's {max_length} positions"
            ),
        });
    }
    let stop_sequences: Vec<String> = options
        .stop_sequences
        .clone()
        .unwrap_or_else(|| vec![options.example_delimiter().to_owned()])
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    let contexts: Vec<&str> = prompts.iter().map(|p| p.contexts[0].as_str()).collect();
    let keep = max_length - max_new_tokens;
    let requests = tokenizer
        .encode_batch(&contexts)?
        .into_iter()
        .zip(prompts)
        .map(|(mut tokens, p)| {
            if tokens.is_empty() {
                tokens.push(prefix_token);
            }
            let truncated = tokens.len() > keep;
            let input = tokens.split_off(tokens.len().saturating_sub(keep));
            GenerationRequest { example: p.example, input, truncated, answers: p.targets.clone() }
        })
        .collect();
    Ok(GenerationPlan {
        max_new_tokens,
        stop_sequences,
        cot_delimiter: options.cot_delimiter.clone(),
        normalize_answers: options.normalize_answers,
        requests,
    })
}

/// Groups requests (by index) into batches of similar prompt length, longest first: a batch's rows
/// times (its longest prompt plus `max_new_tokens`) stays within `batch_tokens` (a single row may
/// exceed it) and it has at most `batch_rows` rows.
pub fn plan_generation_batches(
    lengths: &[usize],
    max_new_tokens: usize,
    batch_tokens: usize,
    batch_rows: usize,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut width = 0;
    for i in order {
        match batches.last_mut() {
            Some(batch) if batch.len() < batch_rows.max(1) && (batch.len() + 1) * width <= batch_tokens => {
                batch.push(i)
            }
            _ => {
                width = lengths[i] + max_new_tokens;
                batches.push(vec![i]);
            }
        }
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_the_budget_and_cover_everything_once() {
        let lengths = [5, 30, 12, 30, 7, 1, 100];
        let batches = plan_generation_batches(&lengths, 10, 100, 3);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for b in &batches {
            let width = b.iter().map(|&i| lengths[i]).max().unwrap() + 10;
            assert!(b.len() <= 3 && (b.len() == 1 || b.len() * width <= 100), "{b:?}");
        }
        // Longest first; the over-budget prompt runs alone.
        assert_eq!(batches[0], vec![6]);
        assert_eq!(batches[1], vec![1, 3]);
        assert_eq!(plan_generation_batches(&[], 4, 100, 8), Vec::<Vec<usize>>::new());
    }
}
