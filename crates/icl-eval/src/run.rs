//! The run loop that scoring and generation share: this rank's batches in order, recovered ones
//! skipped, a batch that runs out of memory split and retried, then every rank's results gathered.

use crate::wire::{self, Record};
use crate::{Error, Observer, RequestResult, Result};
use icl_shard::Collective;
use std::collections::VecDeque;

/// A per-request result as the observer sees it: recovered from an interrupted run, or reported
/// once computed.
pub(crate) trait Outcome: Record + Clone {
    /// What an interrupted run already computed for request `request`.
    fn recovered(observer: &dyn Observer, task: &str, request: usize) -> Option<Self>;
    /// Hands computed (not recovered) results to the observer.
    fn finished(observer: &mut dyn Observer, task: &str, results: &[(usize, Self)]) -> Result<()>;
}

impl Outcome for RequestResult {
    fn recovered(observer: &dyn Observer, task: &str, request: usize) -> Option<Self> {
        observer.recovered(task, request)
    }

    fn finished(observer: &mut dyn Observer, task: &str, results: &[(usize, Self)]) -> Result<()> {
        observer.batch_finished(task, results)
    }
}

/// Generated tokens.
impl Outcome for Vec<u32> {
    fn recovered(observer: &dyn Observer, task: &str, request: usize) -> Option<Self> {
        observer.recovered_generation(task, request)
    }

    fn finished(observer: &mut dyn Observer, task: &str, results: &[(usize, Self)]) -> Result<()> {
        observer.generation_finished(task, results)
    }
}

/// What differs between scoring and generation: what a batch is, how it runs, how it is made smaller.
pub(crate) trait Job {
    type Batch;
    type Output: Outcome;
    /// The requests a batch computes, by index.
    fn requests<'b>(&self, batch: &'b Self::Batch) -> &'b [usize];
    /// Runs a batch on the model: each of its requests' results.
    fn run(&self, batch: &Self::Batch) -> Result<Vec<(usize, Self::Output)>>;
    /// Smaller batches for `batch`, which ran out of memory with `error`, and a notice that says so;
    /// an error when it cannot be made smaller.
    fn split(&self, batch: Self::Batch, error: Error) -> Result<(Vec<Self::Batch>, String)>;
    /// Waits out the collective work of the other ranks' batches: a parameter-sharded model's
    /// forward passes are collective, so a rank that ran out of batches still joins theirs.
    fn finish_collectives(&self) -> Result<()>;
}

/// Runs `batches` (this rank's share of a task with `requests` requests) in order and returns every
/// request's result, the same on every rank. A batch whose every request the observer recovered is
/// not run (results stay those of an uninterrupted run, as plans do not depend on what was
/// recovered); one that runs out of memory is split and its parts run next.
pub(crate) fn run_share<J: Job>(
    job: &J,
    task: &str,
    requests: usize,
    batches: Vec<J::Batch>,
    collective: &dyn Collective,
    observer: &mut dyn Observer,
) -> Result<Vec<J::Output>> {
    observer.task_started(task, batches.iter().map(|b| job.requests(b).len()).sum());
    let mut results: Vec<Option<J::Output>> = vec![None; requests];
    // The requests this rank computed or recovered, which it hands the other ranks.
    let mut here: Vec<usize> = Vec::new();
    let mut queue = VecDeque::from(batches);
    while let Some(batch) = queue.pop_front() {
        let recovered: Option<Vec<(usize, J::Output)>> =
            job.requests(&batch).iter().map(|&r| Some((r, J::Output::recovered(observer, task, r)?))).collect();
        let finished = match recovered {
            Some(recovered) => recovered,
            None => match job.run(&batch) {
                Ok(finished) => {
                    J::Output::finished(observer, task, &finished)?;
                    finished
                }
                Err(e) if is_out_of_memory(&e) => {
                    let (parts, notice) = job.split(batch, e)?;
                    observer.notice(&notice);
                    for part in parts.into_iter().rev() {
                        queue.push_front(part);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        observer.requests_done(task, finished.len());
        for (r, result) in finished {
            results[r] = Some(result);
            here.push(r);
        }
    }
    job.finish_collectives()?;
    if collective.world_size() > 1 {
        gather(task, collective, observer, &mut results, &here)?;
    }
    results
        .into_iter()
        .enumerate()
        .map(|(r, result)| result.ok_or_else(|| Error::Invalid(format!("{task}: no rank computed request {r}"))))
        .collect()
}

/// Hands every rank the results of every other rank (each computed the requests `here` of its own
/// batches) and checks that no request comes twice. Rank 0's observer sees the other ranks' results,
/// but for those it recovered itself.
fn gather<O: Outcome>(
    task: &str,
    collective: &dyn Collective,
    observer: &mut dyn Observer,
    results: &mut [Option<O>],
    here: &[usize],
) -> Result<()> {
    let message = wire::encode(here.iter().filter_map(|&r| Some((r, results[r].as_ref()?))));
    let gathered = icl_shard::all_gather_bytes(collective, &message)?;
    let mut seen = vec![false; results.len()];
    let mut from_others = Vec::new();
    for (rank, bytes) in gathered.iter().enumerate() {
        let records = wire::decode::<O>(bytes)
            .ok_or_else(|| Error::Invalid(format!("{task}: rank {rank} sent malformed results")))?;
        for (r, result) in records {
            if r >= seen.len() || std::mem::replace(&mut seen[r], true) {
                return Err(Error::Invalid(format!("{task}: rank {rank} sent request {r} twice or out of range")));
            }
            if rank != collective.rank() && O::recovered(observer, task, r).is_none() {
                from_others.push((r, result.clone()));
            }
            results[r] = Some(result);
        }
    }
    if collective.rank() == 0 && !from_others.is_empty() {
        O::finished(observer, task, &from_others)?;
    }
    Ok(())
}

/// Whether an error is libtorch failing to allocate (CPU or CUDA), which a smaller batch can avoid.
fn is_out_of_memory(e: &Error) -> bool {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text += &s.to_string();
        source = s.source();
    }
    ["can't allocate memory", "out of memory", "not enough memory"].iter().any(|m| text.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use icl_shard::{SingleProcess, ThreadRanks};
    use std::cell::{Cell, RefCell};
    use std::collections::HashSet;

    /// Runs batches of request indices: a batch of more than `max_len` requests runs out of memory;
    /// request `r` scores `-r / 3` (a value with many bits set).
    struct Fake {
        max_len: usize,
        ran: RefCell<Vec<Vec<usize>>>,
        finished: Cell<usize>,
    }

    impl Fake {
        fn new(max_len: usize) -> Self {
            Self { max_len, ran: RefCell::new(Vec::new()), finished: Cell::new(0) }
        }
    }

    fn score(r: usize) -> RequestResult {
        RequestResult { loglik: -(r as f64) / 3.0, is_greedy: r.is_multiple_of(2), n_tokens: r as i64 + 1 }
    }

    impl Job for Fake {
        type Batch = Vec<usize>;
        type Output = RequestResult;

        fn requests<'b>(&self, batch: &'b Vec<usize>) -> &'b [usize] {
            batch
        }

        fn run(&self, batch: &Vec<usize>) -> Result<Vec<(usize, RequestResult)>> {
            if batch.len() > self.max_len {
                return Err(Error::Invalid("can't allocate memory".into()));
            }
            self.ran.borrow_mut().push(batch.clone());
            Ok(batch.iter().map(|&r| (r, score(r))).collect())
        }

        fn split(&self, batch: Vec<usize>, error: Error) -> Result<(Vec<Vec<usize>>, String)> {
            if batch.len() < 2 {
                return Err(error);
            }
            let (first, second) = batch.split_at(batch.len() / 2);
            Ok((vec![first.to_vec(), second.to_vec()], format!("split {}", batch.len())))
        }

        fn finish_collectives(&self) -> Result<()> {
            self.finished.set(self.finished.get() + 1);
            Ok(())
        }
    }

    /// Recovers `recovered` and records what it is told.
    #[derive(Default)]
    struct Recorder {
        recovered: HashSet<usize>,
        started: usize,
        finished: Vec<Vec<usize>>,
        done: usize,
        notices: Vec<String>,
    }

    impl Observer for Recorder {
        fn recovered(&self, _task: &str, request: usize) -> Option<RequestResult> {
            self.recovered.contains(&request).then(|| score(request))
        }

        fn task_started(&mut self, _task: &str, requests: usize) {
            self.started = requests;
        }

        fn batch_finished(&mut self, _task: &str, results: &[(usize, RequestResult)]) -> Result<()> {
            self.finished.push(results.iter().map(|&(r, _)| r).collect());
            Ok(())
        }

        fn requests_done(&mut self, _task: &str, count: usize) {
            self.done += count;
        }

        fn notice(&mut self, message: &str) {
            self.notices.push(message.to_owned());
        }
    }

    fn bits(results: &[RequestResult]) -> Vec<(u64, bool, i64)> {
        results.iter().map(|r| (r.loglik.to_bits(), r.is_greedy, r.n_tokens)).collect()
    }

    #[test]
    fn recovered_batches_are_skipped_and_oversized_ones_split_in_place() -> Result<()> {
        let job = Fake::new(2);
        let mut observer = Recorder { recovered: [6, 7].into(), ..Recorder::default() };
        let batches = vec![vec![0, 1, 2, 3, 4], vec![6, 7], vec![5]];
        let results = run_share(&job, "t", 8, batches, &SingleProcess, &mut observer)?;
        assert_eq!(bits(&results), bits(&(0..8).map(score).collect::<Vec<_>>()));
        // The parts run first, in order; the recovered batch never runs.
        assert_eq!(*job.ran.borrow(), [vec![0, 1], vec![2], vec![3, 4], vec![5]]);
        assert_eq!(observer.finished, *job.ran.borrow());
        assert_eq!(observer.notices, ["split 5", "split 3"]);
        assert_eq!((observer.started, observer.done, job.finished.get()), (8, 8, 1));
        Ok(())
    }

    #[test]
    fn a_batch_that_cannot_be_split_fails_the_task() {
        let job = Fake::new(0);
        let e = run_share(&job, "t", 1, vec![vec![0]], &SingleProcess, &mut Recorder::default());
        assert!(e.is_err_and(|e| e.to_string().contains("can't allocate")));
    }

    #[test]
    fn ranks_share_the_batches_and_all_return_every_result() {
        let shares = [vec![vec![0, 1, 2], vec![5]], vec![vec![3, 4]]];
        let handles: Vec<_> = ThreadRanks::group(2)
            .into_iter()
            .zip(shares)
            .map(|(rank, batches)| {
                std::thread::spawn(move || {
                    let job = Fake::new(2);
                    let mut observer = Recorder { recovered: [4].into(), ..Recorder::default() };
                    let results = run_share(&job, "t", 6, batches, &rank, &mut observer).expect("run");
                    (bits(&results), observer.finished)
                })
            })
            .collect();
        let mut ranks = handles.into_iter().map(|h| h.join().expect("rank thread"));
        let (zero, one) = (ranks.next().expect("rank 0"), ranks.next().expect("rank 1"));
        assert_eq!(zero.0, bits(&(0..6).map(score).collect::<Vec<_>>()));
        assert_eq!(zero.0, one.0);
        // Rank 0 also sees rank 1's results, less the one it recovered itself.
        assert_eq!(zero.1, [vec![0], vec![1, 2], vec![5], vec![3]]);
        assert_eq!(one.1, [vec![3, 4]]);
    }

    #[test]
    fn a_request_from_two_ranks_is_refused() {
        let handles: Vec<_> = ThreadRanks::group(2)
            .into_iter()
            .map(|rank| {
                std::thread::spawn(move || {
                    run_share(&Fake::new(4), "t", 2, vec![vec![0, 1]], &rank, &mut Recorder::default())
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        for h in handles {
            let e = h.join().expect("rank thread").expect_err("request 0 twice");
            assert!(e.contains("twice"), "{e}");
        }
    }
}
