//! Tokens for requests, by lm-evaluation-harness's rules, so that both score exactly the same tokens.

use crate::{Error, Request, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A Hugging Face `tokenizer.json`, used without special tokens (as lm-evaluation-harness does for
/// causal models).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Tokenizer { path: path.to_owned(), message: "file not found".into() });
        }
        // tokenizers::Error is a boxed error without a stable type: keep its message.
        let inner = crate::contain_panics(path, "the tokenizers library", || {
            tokenizers::Tokenizer::from_file(path)
                .map_err(|e| Error::Tokenizer { path: path.to_owned(), message: e.to_string() })
        })?;
        Ok(Self { inner, path: path.to_owned() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the id space, added tokens included: every id is below it.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| self.error(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes many texts in parallel.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encs = self.inner.encode_batch(texts.to_vec(), false).map_err(|e| self.error(e))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| self.error(e))
    }

    fn error(&self, e: tokenizers::Error) -> Error {
        Error::Tokenizer { path: self.path.clone(), message: e.to_string() }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    /// The model's maximum sequence length; longer inputs lose tokens on the left.
    pub max_length: usize,
    /// Stands in for an empty context (lm-evaluation-harness uses the EOS token).
    pub prefix_token: u32,
}

/// A request as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRequest {
    /// Model input: context then continuation tokens, without the last continuation token, at most
    /// `max_length` long.
    pub input: Vec<u32>,
    /// The continuation tokens; the last `targets.len()` positions of `input` predict them.
    pub targets: Vec<u32>,
    /// Whether tokens were dropped on the left to fit `max_length`.
    pub truncated: bool,
}

impl EncodedRequest {
    /// Positions of `input` whose next-token distribution is scored.
    pub fn scored_positions(&self) -> std::ops::Range<usize> {
        self.input.len() - self.targets.len()..self.input.len()
    }
}

/// Encodes requests the way lm-evaluation-harness's Hugging Face backend does:
/// - trailing white space of the context moves to the front of the continuation;
/// - the continuation's tokens are those of `enc(context + continuation)` after the first
///   `len(enc(context))` tokens, appended to `enc(context)`;
/// - an empty context is replaced by `prefix_token`;
/// - the input keeps the last `max_length + 1` tokens and drops the final one.
///
/// `task` names the task in errors (a continuation with no tokens, or one longer than the model).
pub fn encode_requests(
    tokenizer: &Tokenizer,
    task: &str,
    requests: &[Request],
    options: EncodeOptions,
) -> Result<Vec<EncodedRequest>> {
    encode_each(tokenizer, task, requests, options)?.into_iter().collect()
}

/// As [`encode_requests`], with one result per request, so that a caller can skip the examples of
/// the requests that cannot be scored (`--skip-bad-rows`). The outer error is a tokenizer failure.
pub fn encode_each(
    tokenizer: &Tokenizer,
    task: &str,
    requests: &[Request],
    options: EncodeOptions,
) -> Result<Vec<Result<EncodedRequest>>> {
    let pairs: Vec<(String, String)> = requests.iter().map(split_trailing_space).collect();
    // Multiple-choice requests share contexts: encode each distinct one once.
    let mut context_slot: HashMap<&str, usize> = HashMap::new();
    let mut contexts: Vec<&str> = Vec::new();
    for (context, _) in &pairs {
        context_slot.entry(context.as_str()).or_insert_with(|| {
            contexts.push(context.as_str());
            contexts.len() - 1
        });
    }
    let context_tokens = tokenizer.encode_batch(&contexts)?;
    let wholes: Vec<String> =
        pairs.iter().map(|(c, k)| if c.is_empty() { k.clone() } else { format!("{c}{k}") }).collect();
    let whole_tokens = tokenizer.encode_batch(&wholes.iter().map(String::as_str).collect::<Vec<_>>())?;

    Ok(pairs
        .iter()
        .zip(whole_tokens)
        .zip(requests)
        .map(|(((context, _), whole), request)| {
            let (mut tokens, targets) = if context.is_empty() {
                (vec![options.prefix_token], whole)
            } else {
                let ctx = &context_tokens[context_slot[context.as_str()]];
                let split = ctx.len().min(whole.len());
                (ctx.clone(), whole[split..].to_vec())
            };
            let fail = |message: String| Error::Example { task: task.to_owned(), index: request.example, message };
            if targets.is_empty() {
                return Err(fail(format!(
                    "continuation {:?} has no tokens of its own after the context",
                    request.continuation
                )));
            }
            if targets.len() > options.max_length {
                return Err(fail(format!(
                    "continuation has {} tokens, more than the model's maximum length {}",
                    targets.len(),
                    options.max_length
                )));
            }
            tokens.extend_from_slice(&targets);
            let keep = options.max_length + 1;
            let truncated = tokens.len() > keep;
            if truncated {
                tokens.drain(..tokens.len() - keep);
            }
            tokens.pop();
            Ok(EncodedRequest { input: tokens, targets, truncated })
        })
        .collect::<Vec<_>>())
}

/// lm-evaluation-harness's rolling windows over a document's tokens (`get_rolling_token_windows`
/// with `context_len` 1, then `make_disjoint_window`), as model requests: the first window feeds
/// `prefix_token` and predicts the first `min(max_length, n)` tokens; each later window predicts the
/// next `max_length` tokens (fewer at the end) after the `max_length + 1 - predicted` tokens before
/// them, so every window is at most `max_length` tokens long and every token is predicted once.
/// No tokens, no windows. `max_length` must be at least 1 (lm-eval asserts it).
pub fn rolling_windows(tokens: &[u32], prefix_token: u32, max_length: usize) -> Vec<EncodedRequest> {
    let mut windows = Vec::new();
    if tokens.is_empty() || max_length == 0 {
        return windows;
    }
    let first = max_length.min(tokens.len());
    let mut input = Vec::with_capacity(first);
    input.push(prefix_token);
    input.extend_from_slice(&tokens[..first - 1]);
    windows.push(EncodedRequest { input, targets: tokens[..first].to_vec(), truncated: false });
    let mut predicted = first;
    while predicted < tokens.len() {
        let len = (tokens.len() - predicted).min(max_length);
        let end = predicted + len;
        // lm-eval's `(context + continuation)[-(max_length + 1):][:-1]`, disjoint context.
        windows.push(EncodedRequest {
            input: tokens[end - max_length - 1..end - 1].to_vec(),
            targets: tokens[end - len..end].to_vec(),
            truncated: false,
        });
        predicted = end;
    }
    windows
}

/// The rolling windows ([`rolling_windows`]) of each perplexity request's document (its
/// continuation; the context is empty), tokenized without special tokens as lm-evaluation-harness's
/// `tok_encode` does for causal models, with `options.prefix_token` before the first token and
/// windows of `options.max_length` tokens.
pub fn encode_rolling(
    tokenizer: &Tokenizer,
    task: &str,
    requests: &[Request],
    options: EncodeOptions,
) -> Result<Vec<Vec<EncodedRequest>>> {
    if let Some(r) = requests.iter().find(|r| !r.context.is_empty()) {
        return Err(Error::Example {
            task: task.to_owned(),
            index: r.example,
            message: "a perplexity request scores a whole document and has no context".into(),
        });
    }
    if options.max_length == 0 {
        return Err(Error::Example {
            task: task.to_owned(),
            index: requests.first().map_or(0, |r| r.example),
            message: "rolling windows need a maximum length of at least 1 token".into(),
        });
    }
    let texts: Vec<&str> = requests.iter().map(|r| r.continuation.as_str()).collect();
    let tokens = tokenizer.encode_batch(&texts)?;
    Ok(tokens.iter().map(|t| rolling_windows(t, options.prefix_token, options.max_length)).collect())
}

/// lm-evaluation-harness moves the context's trailing white space into the continuation.
fn split_trailing_space(request: &Request) -> (String, String) {
    let context = request.context.as_str();
    let kept = context.trim_end_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c));
    let moved = &context[kept.len()..];
    (kept.to_owned(), format!("{moved}{}", request.continuation))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(context: &str, continuation: &str) -> Request {
        Request { example: 3, choice: 0, context: context.into(), continuation: continuation.into() }
    }

    #[test]
    fn trailing_space_moves_to_the_continuation() {
        assert_eq!(split_trailing_space(&request("a b \n", " c")), ("a b".to_owned(), " \n c".to_owned()));
    }

    /// lm-eval 0.4.13's `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`, then
    /// `(context + continuation)[-(max_length + 1):][:-1]`, written out as in Python.
    fn lm_eval_windows(tokens: &[u32], prefix: u32, max_seq_len: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
        let mut pairs: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
        if !tokens.is_empty() {
            let pred_len = max_seq_len;
            let first = max_seq_len.min(tokens.len());
            let mut context = vec![prefix];
            context.extend(&tokens[..first - 1]);
            pairs.push((context, tokens[..first].to_vec()));
            let mut predicted = first;
            while predicted < tokens.len() {
                let window_pred_len = (tokens.len() - predicted).min(pred_len);
                let window_end = predicted + window_pred_len;
                pairs.push((
                    tokens[window_end - max_seq_len - 1..window_end - 1].to_vec(),
                    tokens[window_end - window_pred_len..window_end].to_vec(),
                ));
                predicted += window_pred_len;
            }
        }
        pairs
            .into_iter()
            .map(|(a, b)| {
                let disjoint = &a[..a.len() - (b.len() - 1)];
                let whole: Vec<u32> = disjoint.iter().chain(&b).copied().collect();
                let start = whole.len().saturating_sub(max_seq_len + 1);
                (whole[start..whole.len() - 1].to_vec(), b)
            })
            .collect()
    }

    #[test]
    fn rolling_windows_are_lm_evals() {
        for n in [0usize, 1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33] {
            let tokens: Vec<u32> = (100..100 + n as u32).collect();
            for max_length in [1usize, 2, 3, 4, 8] {
                let ours: Vec<(Vec<u32>, Vec<u32>)> =
                    rolling_windows(&tokens, 7, max_length).into_iter().map(|w| (w.input, w.targets)).collect();
                assert_eq!(ours, lm_eval_windows(&tokens, 7, max_length), "n {n} max_length {max_length}");
                // Every token predicted once, in order; no window longer than the model.
                let predicted: Vec<u32> = ours.iter().flat_map(|(_, t)| t.clone()).collect();
                assert_eq!(predicted, tokens);
                assert!(ours.iter().all(|(input, t)| input.len() <= max_length && t.len() <= input.len()));
            }
        }
        // 10 tokens in windows of 4: the prefix and 3 tokens, then 4 + 2 tokens of context each.
        let w = rolling_windows(&(0..10).collect::<Vec<u32>>(), 99, 4);
        assert_eq!(w[0].input, [99, 0, 1, 2]);
        assert_eq!((w[1].input.clone(), w[1].targets.clone()), (vec![3, 4, 5, 6], vec![4, 5, 6, 7]));
        assert_eq!((w[2].input.clone(), w[2].targets.clone()), (vec![5, 6, 7, 8], vec![8, 9]));
        assert_eq!(w[2].scored_positions(), 2..4);
    }

    #[test]
    fn scored_positions_are_the_last_ones() {
        let e = EncodedRequest { input: vec![1, 2, 3, 4], targets: vec![4, 5], truncated: false };
        assert_eq!(e.scored_positions(), 2..4);
    }
}
