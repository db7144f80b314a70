//! Collectives for multi-rank evaluation, and how examples are split across ranks.
//!
//! Invariant: depends on tch and thiserror only; communication engines (MPI, NCCL) come in as optional
//! backends behind cargo features, so the default build needs neither. Today the crate holds the
//! [`Collective`] interface with its single-process backend, the data-parallel split, and [`fsdp`]:
//! parameters sharded over ranks and gathered one unit at a time.

pub mod fsdp;

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

    /// Writes every rank's `shard` (1-D, the same length `n` on every rank) into `output` (1-D,
    /// `n * world_size`, same kind), rank `r`'s at `r * n..(r + 1) * n`: one contiguous buffer, so a
    /// parameter sharder can view the gathered parameters in place instead of concatenating copies.
    /// The default goes through [`Collective::all_gather`]; backends override it to gather in place.
    fn all_gather_into(&self, shard: &Tensor, output: &mut Tensor) -> Result<()> {
        check_gather_shapes(shard, output, self.world_size())?;
        let gathered = self.all_gather(shard)?;
        let n = shard.numel() as i64;
        for (r, piece) in gathered.iter().enumerate() {
            output.f_narrow(0, r as i64 * n, n)?.f_copy_(piece)?;
        }
        Ok(())
    }

    /// Starts [`Collective::all_gather_into`] and returns a handle to wait on, so that the caller can
    /// compute while the ranks exchange (a parameter sharder gathers the next layer during this one).
    /// Neither tensor may be used until [`PendingCollective::wait`] returns. The default runs the gather
    /// to completion before returning; backends with non-blocking collectives override it.
    fn start_all_gather_into(
        &self,
        shard: &Tensor,
        output: &mut Tensor,
    ) -> Result<Box<dyn PendingCollective>> {
        self.all_gather_into(shard, output)?;
        Ok(Box::new(Completed))
    }
}

/// A collective that was started and may still be running.
pub trait PendingCollective: std::fmt::Debug {
    /// Blocks until the collective's output is complete.
    fn wait(self: Box<Self>) -> Result<()>;
}

/// A collective that finished when it was started.
#[derive(Debug, Clone, Copy)]
pub struct Completed;

impl PendingCollective for Completed {
    fn wait(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// Checks the shapes [`Collective::all_gather_into`] requires; backends call it before communicating
/// so that a mismatch is an error on the rank that made it, not a hang or a buffer overrun.
pub fn check_gather_shapes(shard: &Tensor, output: &Tensor, world_size: usize) -> Result<()> {
    let fail = |message: String| {
        Err(Error::Collective {
            op: "all_gather_into",
            message,
        })
    };
    if shard.dim() != 1 || output.dim() != 1 {
        return fail(format!(
            "1-D tensors expected, got {:?} and {:?}",
            shard.size(),
            output.size()
        ));
    }
    if output.numel() != shard.numel() * world_size {
        return fail(format!(
            "output holds {} elements, {world_size} shards of {} need {}",
            output.numel(),
            shard.numel(),
            shard.numel() * world_size
        ));
    }
    if shard.kind() != output.kind() || shard.device() != output.device() {
        return fail(format!(
            "shard is {:?} on {:?}, output {:?} on {:?}",
            shard.kind(),
            shard.device(),
            output.kind(),
            output.device()
        ));
    }
    if !output.is_contiguous() {
        return fail("output must be contiguous".into());
    }
    Ok(())
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
    fn all_gather_into(&self, shard: &Tensor, output: &mut Tensor) -> Result<()> {
        check_gather_shapes(shard, output, 1)?;
        output.f_copy_(shard)?;
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
        let mut out = Tensor::zeros([2], (tch::Kind::Double, tch::Device::Cpu));
        c.start_all_gather_into(&t, &mut out)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(Vec::<f64>::try_from(&out).unwrap(), vec![1.0, 2.0]);
        let mut wrong = Tensor::zeros([3], (tch::Kind::Double, tch::Device::Cpu));
        let e = c.all_gather_into(&t, &mut wrong).unwrap_err().to_string();
        assert!(e.contains("output holds 3 elements"), "{e}");
    }
}
