//! Packed batches: several sequences per row, multiple-choice contexts computed once.
//!
//! A *group* is a prefix and zero or more branches: a language-modelling request is a prefix alone; a
//! multiple-choice question is its context (the prefix) with one branch per choice holding the
//! continuation tokens fed to the model. Groups are packed into rows of one length (first-fit
//! decreasing). Each token carries its position within its own sequence (restarting at 0 for every
//! group, continuing from the prefix into each branch), its group's slot in the row and its branch, so a
//! model can build the mask under which every token sees exactly what it would see alone: its group's
//! prefix and its own branch, causally. Scores therefore do not depend on packing or batch size beyond
//! floating-point rounding.

use crate::EncodedRequest;

#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Upper bound on `rows * row_len` of a batch (a batch always holds at least one row).
    pub max_tokens: usize,
    /// Upper bound on rows per batch.
    pub max_rows: usize,
    /// Shortest row: groups are packed into rows of `max(row_len, longest group)` tokens. Longer rows
    /// waste less padding and spend more on attention between packed neighbours that the mask discards.
    pub row_len: usize,
    /// Token id written into padding (padding is never attended to by real tokens).
    pub pad_id: u32,
}

/// One model call over `rows x seq_len` tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Indices (into the encoded requests) of the requests scored in this batch.
    pub requests: Vec<usize>,
    pub rows: usize,
    pub seq_len: usize,
    /// Row-major `[rows, seq_len]` token ids.
    pub input_ids: Vec<i64>,
    /// Position of each token within its own sequence; 0 for padding.
    pub positions: Vec<i64>,
    /// Group slot of each token within its row; -1 for padding.
    pub segments: Vec<i64>,
    /// 0 for a group's prefix, `k + 1` for the k-th branch; 0 for padding.
    pub branches: Vec<i64>,
    /// Flat index (`row * seq_len + column`) of every scored position, grouped by request in the
    /// order of `requests`. A position may be scored for several requests (a shared context's last
    /// token predicts the first token of every choice).
    pub scored: Vec<i64>,
    /// The token each scored position should predict.
    pub targets: Vec<i64>,
    /// Index into `requests` of each scored position.
    pub owner: Vec<i64>,
}

impl Batch {
    /// Tokens that are not padding.
    pub fn real_tokens(&self) -> usize {
        self.segments.iter().filter(|&&s| s >= 0).count()
    }

    /// The same rows, at most `max_rows` per batch, in order: every row keeps its tokens exactly (a
    /// request's positions all lie in one row), so the parts score exactly what the whole does.
    pub fn split_rows(&self, max_rows: usize) -> Vec<Batch> {
        let max_rows = max_rows.max(1);
        if self.rows <= max_rows {
            return vec![self.clone()];
        }
        let s = self.seq_len;
        let row_of = |flat: i64| flat as usize / s.max(1);
        (0..self.rows)
            .step_by(max_rows)
            .map(|first| {
                let rows = max_rows.min(self.rows - first);
                let tokens = first * s..(first + rows) * s;
                let mut part = Batch {
                    requests: Vec::new(),
                    rows,
                    seq_len: s,
                    input_ids: self.input_ids[tokens.clone()].to_vec(),
                    positions: self.positions[tokens.clone()].to_vec(),
                    segments: self.segments[tokens.clone()].to_vec(),
                    branches: self.branches[tokens].to_vec(),
                    scored: Vec::new(),
                    targets: Vec::new(),
                    owner: Vec::new(),
                };
                // Scored positions are grouped by request in `requests` order, and rows fill in order,
                // so each part's requests are a run of the whole's.
                let mut owners: Vec<i64> = Vec::new();
                for ((&flat, &target), &owner) in self.scored.iter().zip(&self.targets).zip(&self.owner) {
                    let row = row_of(flat);
                    if row < first || row >= first + rows {
                        continue;
                    }
                    if owners.last() != Some(&owner) {
                        owners.push(owner);
                        part.requests.push(self.requests[owner as usize]);
                    }
                    part.scored.push(flat - (first * s) as i64);
                    part.targets.push(target);
                    part.owner.push(owners.len() as i64 - 1);
                }
                part
            })
            .collect()
    }
}

/// A prefix shared by `members` (requests), each adding its own branch.
#[derive(Debug, Clone)]
struct Group {
    prefix_len: usize,
    members: Vec<usize>,
    len: usize,
}

/// Splits requests into groups. Requests listed together in `shared` (the choices of one question)
/// share a prefix when their inputs agree on it and none was truncated; every other request is a group
/// of its own.
fn groups(encoded: &[EncodedRequest], shared: &[Vec<usize>]) -> Vec<Group> {
    let mut in_shared = vec![false; encoded.len()];
    let mut out = Vec::new();
    let fed = |r: usize| encoded[r].targets.len() - 1;
    let prefix_len = |r: usize| encoded[r].input.len() - fed(r);
    for members in shared {
        let first = members[0];
        let p = prefix_len(first);
        let agree = members.iter().all(|&r| {
            !encoded[r].truncated && prefix_len(r) == p && encoded[r].input[..p] == encoded[first].input[..p]
        });
        if !agree || members.len() < 2 {
            continue;
        }
        for &r in members {
            in_shared[r] = true;
        }
        let len = p + members.iter().map(|&r| fed(r)).sum::<usize>();
        out.push(Group { prefix_len: p, members: members.clone(), len });
    }
    for (r, e) in encoded.iter().enumerate() {
        if !in_shared[r] {
            out.push(Group { prefix_len: e.input.len(), members: vec![r], len: e.input.len() });
        }
    }
    out
}

/// Packs requests into batches. `shared` lists sets of requests whose context is computed once (the
/// choices of each multiple-choice question); pass an empty slice for none.
pub fn plan_batches(encoded: &[EncodedRequest], shared: &[Vec<usize>], options: BatchOptions) -> Vec<Batch> {
    let mut groups = groups(encoded, shared);
    // First-fit decreasing; the stable sort keeps equal sizes in request order, so plans are
    // deterministic.
    groups.sort_by_key(|g| std::cmp::Reverse(g.len));
    let Some(longest) = groups.first().map(|g| g.len) else { return Vec::new() };
    let row_len = options.row_len.max(longest);
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new(); // (used, group indices)
    for (gi, g) in groups.iter().enumerate() {
        // Rows fill in order, so only the last few can have room; scanning from the back is cheap.
        match rows.iter_mut().rev().take(64).find(|(used, _)| used + g.len <= row_len) {
            Some((used, members)) => {
                *used += g.len;
                members.push(gi);
            }
            None => rows.push((g.len, vec![gi])),
        }
    }
    let per_batch = (options.max_tokens / row_len).clamp(1, options.max_rows.max(1));
    rows.chunks(per_batch)
        .map(|chunk| {
            let row_groups: Vec<Vec<&Group>> =
                chunk.iter().map(|(_, gs)| gs.iter().map(|&g| &groups[g]).collect()).collect();
            build(encoded, &row_groups, row_len, options.pad_id)
        })
        .collect()
}

fn build(encoded: &[EncodedRequest], rows: &[Vec<&Group>], seq_len: usize, pad_id: u32) -> Batch {
    let n = rows.len() * seq_len;
    let mut b = Batch {
        requests: Vec::new(),
        rows: rows.len(),
        seq_len,
        input_ids: vec![i64::from(pad_id); n],
        positions: vec![0; n],
        segments: vec![-1; n],
        branches: vec![0; n],
        scored: Vec::new(),
        targets: Vec::new(),
        owner: Vec::new(),
    };
    for (row, groups) in rows.iter().enumerate() {
        let mut col = row * seq_len;
        for (slot, g) in groups.iter().enumerate() {
            let prefix = &encoded[g.members[0]].input[..g.prefix_len];
            let prefix_start = col;
            for (p, &tok) in prefix.iter().enumerate() {
                b.input_ids[col] = i64::from(tok);
                b.positions[col] = p as i64;
                b.segments[col] = slot as i64;
                col += 1;
            }
            for (k, &r) in g.members.iter().enumerate() {
                let req = &encoded[r];
                let owner = b.requests.len() as i64;
                b.requests.push(r);
                let fed = &req.input[g.prefix_len..];
                let branch_start = col;
                for (t, &tok) in fed.iter().enumerate() {
                    b.input_ids[col] = i64::from(tok);
                    b.positions[col] = (g.prefix_len + t) as i64;
                    b.segments[col] = slot as i64;
                    b.branches[col] = if g.members.len() > 1 { k as i64 + 1 } else { 0 };
                    col += 1;
                }
                // Target i is predicted at sequence position prefix_len + fed_len - targets + i: the last
                // prefix token for the first target of a branch, then the branch's own tokens.
                let first = g.prefix_len + fed.len() - req.targets.len();
                for (i, &target) in req.targets.iter().enumerate() {
                    let pos = first + i;
                    let flat =
                        if pos < g.prefix_len { prefix_start + pos } else { branch_start + (pos - g.prefix_len) };
                    b.scored.push(flat as i64);
                    b.targets.push(i64::from(target));
                    b.owner.push(owner);
                }
            }
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(input: &[u32], targets: &[u32]) -> EncodedRequest {
        EncodedRequest { input: input.to_vec(), targets: targets.to_vec(), truncated: false }
    }

    fn options(max_tokens: usize, row_len: usize) -> BatchOptions {
        BatchOptions { max_tokens, max_rows: 64, row_len, pad_id: 0 }
    }

    /// For every scored position: (token there, its position, the target) must match the request's
    /// own unpacked view: input[pos] predicts targets[i].
    fn check_against_unpacked(encoded: &[EncodedRequest], batches: &[Batch]) {
        let mut seen = vec![0usize; encoded.len()];
        for b in batches {
            for ((&flat, &target), &owner) in b.scored.iter().zip(&b.targets).zip(&b.owner) {
                let r = b.requests[owner as usize];
                let e = &encoded[r];
                let i = seen[r];
                let pos = e.scored_positions().nth(i).expect("scored position");
                assert_eq!(b.positions[flat as usize], pos as i64, "request {r} target {i}");
                assert_eq!(b.input_ids[flat as usize], i64::from(e.input[pos]));
                assert_eq!(target, i64::from(e.targets[i]));
                seen[r] += 1;
            }
        }
        for (r, e) in encoded.iter().enumerate() {
            assert_eq!(seen[r], e.targets.len(), "request {r} scored once per target");
        }
    }

    #[test]
    fn language_modelling_requests_pack_into_rows() {
        let encoded = vec![req(&[1, 2, 3], &[4]), req(&[5, 6, 7, 8, 9], &[8, 9, 10]), req(&[11], &[12])];
        let batches = plan_batches(&encoded, &[], options(100, 8));
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        // Longest first: [5..9] then [1,2,3] fill row 0 (5 + 3 = 8); [11] opens row 1.
        assert_eq!((b.rows, b.seq_len), (2, 8));
        assert_eq!(&b.input_ids[..8], &[5, 6, 7, 8, 9, 1, 2, 3]);
        assert_eq!(&b.positions[..8], &[0, 1, 2, 3, 4, 0, 1, 2]);
        assert_eq!(&b.segments[..8], &[0, 0, 0, 0, 0, 1, 1, 1]);
        assert_eq!(&b.segments[8..], &[0, -1, -1, -1, -1, -1, -1, -1]);
        assert_eq!(b.real_tokens(), 9);
        check_against_unpacked(&encoded, &batches);
    }

    #[test]
    fn choices_share_their_context() {
        // Context [1, 2, 3]; choice A continues [4, 5], choice B [6], choice C [7, 8, 9].
        let encoded = vec![req(&[1, 2, 3, 4], &[4, 5]), req(&[1, 2, 3], &[6]), req(&[1, 2, 3, 7, 8], &[7, 8, 9])];
        let batches = plan_batches(&encoded, &[vec![0, 1, 2]], options(100, 4));
        let b = &batches[0];
        assert_eq!(b.seq_len, 6, "context once plus fed continuation tokens: 3 + 1 + 0 + 2");
        assert_eq!(&b.input_ids[..], &[1, 2, 3, 4, 7, 8]);
        assert_eq!(&b.positions[..], &[0, 1, 2, 3, 3, 4]);
        assert_eq!(&b.branches[..], &[0, 0, 0, 1, 3, 3]);
        // The last context token predicts the first token of every choice.
        assert_eq!(b.scored.iter().filter(|&&s| s == 2).count(), 3);
        check_against_unpacked(&encoded, &batches);
    }

    #[test]
    fn truncated_or_disagreeing_choices_are_not_shared() {
        let mut t = req(&[1, 2, 3], &[4]);
        t.truncated = true;
        let encoded = vec![t, req(&[1, 2, 3], &[5]), req(&[9, 9], &[1]), req(&[9, 8], &[1])];
        let batches = plan_batches(&encoded, &[vec![0, 1], vec![2, 3]], options(100, 1));
        assert_eq!(batches.iter().map(Batch::real_tokens).sum::<usize>(), 10);
        check_against_unpacked(&encoded, &batches);
    }

    #[test]
    fn split_rows_keeps_every_row_and_request_exactly() {
        let encoded: Vec<_> = (0..40u32).map(|i| req(&vec![i + 1; (i % 9 + 2) as usize], &[1, 2])).collect();
        let shared: Vec<Vec<usize>> = (0..8).map(|q| vec![5 * q, 5 * q + 1, 5 * q + 2]).collect();
        let whole = plan_batches(&encoded, &shared, options(10_000, 16));
        assert_eq!(whole.len(), 1);
        assert!(whole[0].rows > 5, "{} rows", whole[0].rows);
        for max_rows in [1, 2, 3, whole[0].rows, 100] {
            let parts = whole[0].split_rows(max_rows);
            assert!(parts.iter().all(|b| b.rows <= max_rows && b.rows > 0));
            assert_eq!(parts.iter().map(|b| b.rows).sum::<usize>(), whole[0].rows);
            let joined =
                |field: fn(&Batch) -> &Vec<i64>| -> Vec<i64> { parts.iter().flat_map(|b| field(b).clone()).collect() };
            assert_eq!(joined(|b| &b.input_ids), whole[0].input_ids);
            assert_eq!(joined(|b| &b.positions), whole[0].positions);
            assert_eq!(joined(|b| &b.segments), whole[0].segments);
            assert_eq!(joined(|b| &b.branches), whole[0].branches);
            assert_eq!(joined(|b| &b.targets), whole[0].targets);
            let requests: Vec<usize> = parts.iter().flat_map(|b| b.requests.clone()).collect();
            assert_eq!(requests, whole[0].requests);
            check_against_unpacked(&encoded, &parts);
        }
    }

    #[test]
    fn budgets_split_batches_and_keep_every_request_once() {
        let encoded: Vec<_> = (0..50u32).map(|i| req(&vec![i + 1; (i % 7 + 2) as usize], &[1, 2])).collect();
        let shared: Vec<Vec<usize>> = (0..10).map(|q| vec![5 * q, 5 * q + 1]).collect();
        for (max_tokens, row_len) in [(1, 1), (16, 8), (64, 16), (10_000, 64)] {
            let batches = plan_batches(&encoded, &shared, options(max_tokens, row_len));
            for b in &batches {
                assert!(b.rows == 1 || b.rows * b.seq_len <= max_tokens);
            }
            check_against_unpacked(&encoded, &batches);
        }
    }
}
