//! Length-sorted, right-padded batches that carry the position of every scored token.

use crate::EncodedRequest;

#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Upper bound on `rows * seq_len` of a batch (a batch always holds at least one row).
    pub max_tokens: usize,
    /// Upper bound on rows per batch.
    pub max_rows: usize,
    /// Token id written into padding; right padding is never attended to by a causal model's real
    /// tokens, so its value does not change any score.
    pub pad_id: u32,
}

/// One model call: `rows x seq_len` token ids, and for each scored token its flat position
/// (`row * seq_len + position`), its target and the request it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Index (into the encoded requests) of the request in each row.
    pub requests: Vec<usize>,
    pub rows: usize,
    pub seq_len: usize,
    /// Row-major `[rows, seq_len]`.
    pub input_ids: Vec<i64>,
    /// Flat index of every scored position, grouped by row, in order.
    pub scored: Vec<i64>,
    /// The token each scored position should predict.
    pub targets: Vec<i64>,
    /// The row (0-based within the batch) of each scored position.
    pub owner: Vec<i64>,
}

impl Batch {
    /// Tokens that are not padding.
    pub fn real_tokens(&self, encoded: &[EncodedRequest]) -> usize {
        self.requests.iter().map(|&r| encoded[r].input.len()).sum()
    }
}

/// Groups requests into batches, longest first so that a batch that does not fit in memory shows up at
/// the start, and so that rows of a batch have similar lengths and little padding.
pub fn plan_batches(encoded: &[EncodedRequest], options: BatchOptions) -> Vec<Batch> {
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    // Stable sort: equal lengths keep request order, so batching is deterministic.
    order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].input.len()));
    let mut batches = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let seq_len = encoded[order[start]].input.len();
        let mut end = start + 1;
        while end < order.len()
            && end - start < options.max_rows
            && (end - start + 1) * seq_len <= options.max_tokens
        {
            end += 1;
        }
        batches.push(build(encoded, &order[start..end], seq_len, options.pad_id));
        start = end;
    }
    batches
}

fn build(encoded: &[EncodedRequest], requests: &[usize], seq_len: usize, pad_id: u32) -> Batch {
    let rows = requests.len();
    let mut input_ids = vec![i64::from(pad_id); rows * seq_len];
    let (mut scored, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
    for (row, &r) in requests.iter().enumerate() {
        let req = &encoded[r];
        let base = row * seq_len;
        for (dst, &tok) in input_ids[base..base + req.input.len()].iter_mut().zip(&req.input) {
            *dst = i64::from(tok);
        }
        for (pos, &target) in req.scored_positions().zip(&req.targets) {
            scored.push((base + pos) as i64);
            targets.push(i64::from(target));
            owner.push(row as i64);
        }
    }
    Batch { requests: requests.to_vec(), rows, seq_len, input_ids, scored, targets, owner }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(len: usize, n_targets: usize) -> EncodedRequest {
        let input: Vec<u32> = (1..=len as u32).collect();
        let targets = (100..100 + n_targets as u32).collect();
        EncodedRequest { input, targets, truncated: false }
    }

    #[test]
    fn batches_respect_budget_and_keep_every_request_once() {
        let encoded = vec![req(3, 1), req(5, 2), req(2, 1), req(5, 1), req(1, 1)];
        let opts = BatchOptions { max_tokens: 10, max_rows: 8, pad_id: 0 };
        let batches = plan_batches(&encoded, opts);
        let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.requests.clone()).collect();
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        for b in &batches {
            assert!(b.rows * b.seq_len <= 10 || b.rows == 1);
        }
        // Longest first: the two length-5 requests share the first batch, in request order.
        assert_eq!(batches[0].requests, vec![1, 3]);
        assert_eq!(batches[0].seq_len, 5);
    }

    #[test]
    fn scored_positions_point_at_the_right_tokens() {
        let encoded = vec![req(4, 2), req(2, 1)];
        let b = &plan_batches(&encoded, BatchOptions { max_tokens: 100, max_rows: 8, pad_id: 9 })[0];
        assert_eq!(b.input_ids, vec![1, 2, 3, 4, 1, 2, 9, 9]);
        assert_eq!(b.scored, vec![2, 3, 5]);
        assert_eq!(b.targets, vec![100, 101, 100]);
        assert_eq!(b.owner, vec![0, 0, 1]);
        assert_eq!(b.real_tokens(&encoded), 6);
    }

    #[test]
    fn max_rows_is_respected() {
        let encoded: Vec<_> = (0..5).map(|_| req(2, 1)).collect();
        let batches = plan_batches(&encoded, BatchOptions { max_tokens: 1000, max_rows: 2, pad_id: 0 });
        assert_eq!(batches.iter().map(|b| b.rows).collect::<Vec<_>>(), vec![2, 2, 1]);
    }
}
