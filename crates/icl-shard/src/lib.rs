//! Collectives for multi-rank evaluation, and how work is split across ranks.
//!
//! Invariant: depends on tch, thiserror and libc (interface addresses and ending a rank, for [`watch`])
//! only; communication engines come in as optional backends
//! behind cargo features, so the default build needs neither MPI nor CUDA:
//! - [`SingleProcess`]: one rank, every collective is the identity (always built);
//! - [`ThreadRanks`]: ranks as threads of one process (always built; tests, in-process groups);
//! - `mpi` feature: [`MpiCollective`] over the system's MPI library (launched by `mpirun`/`srun`);
//! - `nccl` feature: [`NcclCollective`] over NCCL on CUDA tensors, its unique id handed out over MPI or
//!   through torchrun's store ([`rendezvous`]).
//!
//! [`fsdp`] shards parameters over ranks and gathers them one unit at a time.
//!
//! [`watch`] keeps a side channel beside any backend: heartbeats that end every rank when one is lost
//! (a blocked collective never returns), and messages streamed to rank 0.
//!
//! [`connect`] picks the backend from a [`DistChoice`] and the launcher's environment ([`Launch`]).

mod launch;
#[cfg(feature = "mpi")]
mod mpi_backend;
#[cfg(feature = "nccl")]
mod nccl_backend;
pub mod rendezvous;
mod tensor_bytes;
mod threads;
pub mod watch;

pub use launch::{connect, DistChoice, Launch, Launcher, CONNECT_TIMEOUT};
#[cfg(feature = "mpi")]
pub use mpi_backend::MpiCollective;
#[cfg(feature = "nccl")]
pub use nccl_backend::NcclCollective;
pub use threads::ThreadRanks;
pub mod fsdp;

use std::ops::Range;
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("collective {op}: {message}")]
    Collective { op: &'static str, message: String },
    /// The launcher's environment (RANK, WORLD_SIZE, OMPI_COMM_WORLD_SIZE...) is missing or malformed.
    #[error("distributed launch: {0}")]
    Launch(String),
    /// A backend that this build or this machine does not have.
    #[error("backend {backend} is unavailable: {reason}")]
    Unavailable { backend: &'static str, reason: String },
    #[error("rendezvous with {address}: {message}")]
    Rendezvous { address: String, message: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The operations that ranks perform together; every rank calls each one in the same order, with
/// tensors of the same shape and kind unless the method says otherwise. Tensors may live on any
/// device: a backend moves them where its engine needs them and returns results on the input's device.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The engine's name, for messages: "single", "mpi", "nccl".
    fn backend(&self) -> &'static str;
    /// Replaces `t` on every rank by the element-wise sum over ranks.
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()>;
    /// Every rank's `t`, in rank order.
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>>;
    /// Sums `t` over ranks and returns this rank's block of the sum: `t` is cut along its first
    /// dimension (a multiple of the world size) into `world_size` equal blocks, and rank `r` gets block `r`.
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Replaces `t` on every rank by `root`'s.
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the job now with `exit_code`, so that no rank waits forever on one that failed.
    /// Call after printing the reason; never returns.
    fn abort(&self, exit_code: i32) -> !;

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
    fn start_all_gather_into(&self, shard: &Tensor, output: &mut Tensor) -> Result<Box<dyn PendingCollective>> {
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

/// Rows of each rank's block of [`Collective::reduce_scatter_sum`] over `t`'s first dimension; an
/// error when that dimension does not split evenly over `world_size` ranks (backends check before
/// communicating, so a bad shape is an error on its rank, not a hang).
pub fn reduce_scatter_block_rows(t: &Tensor, world_size: usize) -> Result<i64> {
    let rows = t.size().first().copied().unwrap_or(0);
    if t.dim() == 0 || world_size == 0 || rows % world_size as i64 != 0 {
        return Err(Error::Collective {
            op: "reduce_scatter_sum",
            message: format!("first dimension of {:?} is not a multiple of {world_size} ranks", t.size()),
        });
    }
    Ok(rows / world_size as i64)
}

/// Checks the shapes [`Collective::all_gather_into`] requires; backends call it before communicating
/// so that a mismatch is an error on the rank that made it, not a hang or a buffer overrun.
pub fn check_gather_shapes(shard: &Tensor, output: &Tensor, world_size: usize) -> Result<()> {
    let fail = |message: String| Err(Error::Collective { op: "all_gather_into", message });
    if shard.dim() != 1 || output.dim() != 1 {
        return fail(format!("1-D tensors expected, got {:?} and {:?}", shard.size(), output.size()));
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
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, _t: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        Ok(vec![t.shallow_clone()])
    }
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.shallow_clone())
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
    fn abort(&self, exit_code: i32) -> ! {
        std::process::exit(exit_code)
    }
}

/// Every rank's 1-D `t`, in rank order, when lengths differ between ranks (kinds must agree): the
/// lengths are gathered first, then every rank's tensor padded to the longest.
pub fn all_gather_varlen(c: &dyn Collective, t: &Tensor) -> Result<Vec<Tensor>> {
    let op = "all_gather_varlen";
    if t.dim() != 1 {
        return Err(Error::Collective { op, message: format!("expected a 1-D tensor, got shape {:?}", t.size()) });
    }
    let length = t.size()[0];
    let lengths = c.all_gather(&Tensor::from_slice(&[length]))?;
    let lengths: Vec<i64> = lengths.iter().map(|l| l.f_int64_value(&[0])).collect::<Result<_, _>>()?;
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let padded = if length < longest {
        let pad = Tensor::f_zeros([longest - length], (t.kind(), t.device()))?;
        Tensor::f_cat(&[t.shallow_clone(), pad], 0)?
    } else {
        t.shallow_clone()
    };
    c.all_gather(&padded)?.into_iter().zip(lengths).map(|(g, len)| Ok(g.f_narrow(0, 0, len)?)).collect()
}

/// Every rank's bytes, in rank order (lengths may differ): how ranks hand each other serialized records.
pub fn all_gather_bytes(c: &dyn Collective, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let gathered = all_gather_varlen(c, &Tensor::from_slice(bytes))?;
    gathered
        .iter()
        .map(|t| Ok(Vec::<u8>::try_from(&t.f_to_kind(Kind::Uint8)?.f_to_device(tch::Device::Cpu)?)?))
        .collect()
}

/// The contiguous share of `n` items that `rank` of `world_size` evaluates: shares differ by at most one
/// item, cover `0..n` exactly once, and are in rank order.
pub fn shard_range(n: usize, rank: usize, world_size: usize) -> Range<usize> {
    assert!(world_size > 0 && rank < world_size, "rank {rank} of {world_size}");
    let (base, extra) = (n / world_size, n % world_size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Which of `costs.len()` work items (batches, in plan order) `rank` takes: items are dealt greedily,
/// in order, to the rank with the least total cost so far (ties to the lower rank), so ranks finish at
/// about the same time even when items differ in cost. Every rank computes the same assignment from the
/// same costs; together the ranks' lists cover every item exactly once, each list ascending.
pub fn assign_by_cost(costs: &[u64], rank: usize, world_size: usize) -> Vec<usize> {
    assert!(world_size > 0 && rank < world_size, "rank {rank} of {world_size}");
    let mut loads = vec![0u64; world_size];
    let mut mine = Vec::new();
    for (item, &cost) in costs.iter().enumerate() {
        let (least, _) = loads.iter().enumerate().min_by_key(|&(r, &load)| (load, r)).unwrap_or((0, &0));
        loads[least] += cost.max(1);
        if least == rank {
            mine.push(item);
        }
    }
    mine
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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
    fn cost_assignment_covers_every_item_once_and_balances() {
        let costs: Vec<u64> = (0..37).map(|i| (i * 7919 % 13 + 1) as u64).collect();
        for world in 1..=5 {
            let mut seen = vec![0; costs.len()];
            let mut loads = Vec::new();
            for rank in 0..world {
                let mine = assign_by_cost(&costs, rank, world);
                assert!(mine.windows(2).all(|w| w[0] < w[1]));
                mine.iter().for_each(|&i| seen[i] += 1);
                loads.push(mine.iter().map(|&i| costs[i]).sum::<u64>());
            }
            assert!(seen.iter().all(|&s| s == 1), "world {world}: {seen:?}");
            let (lo, hi) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
            // Greedy dealing keeps ranks within one item's cost of each other.
            assert!(hi - lo <= *costs.iter().max().unwrap(), "world {world}: {loads:?}");
        }
        // Fewer items than ranks: the last ranks get nothing, and nothing is lost.
        assert_eq!(assign_by_cost(&[5, 5], 2, 3), Vec::<usize>::new());
        assert_eq!(assign_by_cost(&[5, 5], 1, 3), vec![1]);
    }

    #[test]
    fn single_process_collectives_are_identities() {
        let c = SingleProcess;
        let mut t = Tensor::from_slice(&[1.0f64, 2.0]);
        c.all_reduce_sum(&mut t).unwrap();
        assert_eq!(Vec::<f64>::try_from(&t).unwrap(), vec![1.0, 2.0]);
        assert_eq!(c.all_gather(&t).unwrap().len(), 1);
        assert_eq!(Vec::<f64>::try_from(&c.reduce_scatter_sum(&t).unwrap()).unwrap(), vec![1.0, 2.0]);
        assert!(c.broadcast(&mut t, 1).is_err());
        let mut out = Tensor::zeros([2], (tch::Kind::Double, tch::Device::Cpu));
        c.start_all_gather_into(&t, &mut out).unwrap().wait().unwrap();
        assert_eq!(Vec::<f64>::try_from(&out).unwrap(), vec![1.0, 2.0]);
        let mut wrong = Tensor::zeros([3], (tch::Kind::Double, tch::Device::Cpu));
        let e = c.all_gather_into(&t, &mut wrong).unwrap_err().to_string();
        assert!(e.contains("output holds 3 elements"), "{e}");
        assert_eq!(all_gather_bytes(&c, b"abc").unwrap(), vec![b"abc".to_vec()]);
        assert!(all_gather_varlen(&c, &Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu))).is_err());
    }
}
