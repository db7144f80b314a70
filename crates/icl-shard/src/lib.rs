//! Collectives for multi-rank evaluation, and how examples are split across ranks.
//!
//! Invariant: depends on tch and thiserror only; communication engines (MPI, NCCL) come in as optional
//! backends behind cargo features, so the default build needs neither. Today the crate holds the
//! [`Collective`] interface with its single-process backend and the data-parallel split.

use std::ops::Range;
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("collective {op}: {message}")]
    Collective { op: &'static str, message: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The operations that ranks perform together; every rank calls each one in the same order.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `t` on every rank by the element-wise sum over ranks.
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()>;
    /// Every rank's `t` (same shape on every rank), in rank order.
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>>;
    /// Replaces `t` on every rank by `root`'s.
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
}

/// One process holding everything: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _t: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        Ok(vec![t.shallow_clone()])
    }
    fn broadcast(&self, _t: &mut Tensor, root: usize) -> Result<()> {
        if root != 0 {
            return Err(Error::Collective { op: "broadcast", message: format!("root {root} of 1 rank") });
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// The contiguous share of `n` items that `rank` of `world_size` evaluates: shares differ by at most one
/// item, cover `0..n` exactly once, and are in rank order.
pub fn shard_range(n: usize, rank: usize, world_size: usize) -> Range<usize> {
    assert!(world_size > 0 && rank < world_size, "rank {rank} of {world_size}");
    let (base, extra) = (n / world_size, n % world_size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_everything_once() {
        for n in [0, 1, 7, 10, 64] {
            for world in 1..=5 {
                let ranges: Vec<_> = (0..world).map(|r| shard_range(n, r, world)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[world - 1].end, n);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len().abs_diff(w[1].len()) <= 1);
                }
            }
        }
    }

    #[test]
    fn single_process_collectives_are_identities() {
        let c = SingleProcess;
        let mut t = Tensor::from_slice(&[1.0f64, 2.0]);
        c.all_reduce_sum(&mut t).unwrap();
        assert_eq!(Vec::<f64>::try_from(&t).unwrap(), vec![1.0, 2.0]);
        assert_eq!(c.all_gather(&t).unwrap().len(), 1);
        assert!(c.broadcast(&mut t, 1).is_err());
    }
}
