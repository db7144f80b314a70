//! Ranks as threads of one process, for tests and for evaluating several in-process models together.

use crate::{Collective, Error, Result};
use std::sync::{Arc, Barrier, Mutex};
use tch::Tensor;

/// One rank of a group of threads ([`ThreadRanks::group`]). Every collective deposits this rank's
/// tensor in a shared slot, waits for all ranks, reads what it needs and waits again before the
/// slots are reused. Sums add the ranks' tensors in rank order, so every rank gets the same bits.
/// Each rank must live on its own thread; a rank that never calls a collective the others call
/// blocks them (there is no timeout).
pub struct ThreadRanks {
    rank: usize,
    world_size: usize,
    shared: Arc<(Barrier, Mutex<Vec<Option<Tensor>>>)>,
}

impl std::fmt::Debug for ThreadRanks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "thread rank {} of {}", self.rank, self.world_size)
    }
}

impl ThreadRanks {
    /// `world_size` ranks (at least one), in rank order; move each to its own thread.
    pub fn group(world_size: usize) -> Vec<ThreadRanks> {
        let world_size = world_size.max(1);
        let shared = Arc::new((Barrier::new(world_size), Mutex::new((0..world_size).map(|_| None).collect())));
        (0..world_size).map(|rank| ThreadRanks { rank, world_size, shared: shared.clone() }).collect()
    }

    /// Every rank's tensor, in rank order.
    fn exchange(&self, op: &'static str, t: &Tensor) -> Result<Vec<Tensor>> {
        let poisoned = || Error::Collective { op, message: "another thread rank panicked".into() };
        let (barrier, slots) = &*self.shared;
        slots.lock().map_err(|_| poisoned())?[self.rank] = Some(deep_copy(t)?);
        barrier.wait();
        let all = slots
            .lock()
            .map_err(|_| poisoned())?
            .iter()
            .map(|slot| slot.as_ref().map(deep_copy).transpose()?.ok_or_else(poisoned))
            .collect::<Result<Vec<_>>>();
        // Nobody overwrites a slot before every rank has read them all.
        barrier.wait();
        all
    }

    fn sum(&self, op: &'static str, t: &Tensor) -> Result<Tensor> {
        let mut all = self.exchange(op, t)?.into_iter();
        let first = all.next().ok_or(Error::Collective { op, message: "no ranks".into() })?;
        all.try_fold(first, |sum, next| sum.f_add(&next)).map_err(Error::from)
    }
}

/// A copy with its own storage (the ranks' tensors must not alias each other's).
fn deep_copy(t: &Tensor) -> Result<Tensor> {
    let mut copy = t.f_zeros_like()?;
    copy.f_copy_(t)?;
    Ok(copy)
}

impl Collective for ThreadRanks {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "threads"
    }
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        let sum = self.sum("all_reduce", t)?;
        t.f_copy_(&sum)?;
        Ok(())
    }
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        self.exchange("all_gather", t)
    }
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        let block = crate::reduce_scatter_block_rows(t, self.world_size)?;
        let sum = self.sum("reduce_scatter", t)?;
        Ok(sum.f_narrow(0, self.rank as i64 * block, block)?)
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        let all = self.exchange("broadcast", t)?;
        let from = all.get(root).ok_or(Error::Collective { op: "broadcast", message: format!("no rank {root}") })?;
        t.f_copy_(from)?;
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.shared.0.wait();
        Ok(())
    }
    fn abort(&self, exit_code: i32) -> ! {
        std::process::exit(exit_code)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// One rank's view of each collective's result.
    type Seen = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

    #[test]
    fn three_threads_agree_on_every_collective() {
        let results: Vec<Seen> = std::thread::scope(|scope| {
            let handles: Vec<_> = ThreadRanks::group(3)
                .into_iter()
                .map(|ranks| {
                    scope.spawn(move || {
                        let r = ranks.rank() as f32;
                        let mut sum = Tensor::from_slice(&[r, 10.0 * r]);
                        ranks.all_reduce_sum(&mut sum).unwrap();
                        let gathered = Tensor::cat(&ranks.all_gather(&Tensor::from_slice(&[r])).unwrap(), 0);
                        let scattered = ranks.reduce_scatter_sum(&Tensor::from_slice(&[r, r, r])).unwrap();
                        let mut root = Tensor::from_slice(&[r]);
                        ranks.broadcast(&mut root, 2).unwrap();
                        let v = |t: &Tensor| Vec::<f32>::try_from(t).unwrap();
                        (v(&sum), v(&gathered), v(&scattered), v(&root))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, gathered, scattered, root) in results {
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(gathered, vec![0.0, 1.0, 2.0]);
            assert_eq!(scattered, vec![3.0]);
            assert_eq!(root, vec![2.0]);
        }
    }
}
