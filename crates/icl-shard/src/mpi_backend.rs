//! Collectives over MPI: ranks are the processes that `mpirun -np N` or `srun` started. Tensors travel
//! through host memory (a CUDA tensor is copied to the host and back).

use crate::tensor_bytes::{bytes, bytes_mut, count_i32, host_contiguous, owned_copy, sum_kind, typed, typed_mut};
use crate::{Collective, Error, PendingCollective, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;
use tch::{Kind, Tensor};

pub struct MpiCollective {
    world: SimpleCommunicator,
    rank: usize,
    world_size: usize,
    /// Finalizes MPI when dropped; declared last so the communicator goes first.
    _universe: Universe,
}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCollective").field("rank", &self.rank).field("world_size", &self.world_size).finish()
    }
}

impl MpiCollective {
    /// Initializes MPI (once per process) and joins MPI_COMM_WORLD.
    pub fn init() -> Result<Self> {
        if mpi::environment::is_initialized() {
            return Err(Error::Unavailable {
                backend: "mpi",
                reason: "MPI is already initialized in this process".into(),
            });
        }
        // Funneled: only the thread that initialized MPI calls it; libtorch's worker threads never do.
        let (universe, _) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| Error::Unavailable { backend: "mpi", reason: "MPI_Init_thread failed".into() })?;
        let world = universe.world();
        let (rank, world_size) = (world.rank() as usize, world.size() as usize);
        Ok(Self { world, rank, world_size, _universe: universe })
    }

    /// The MPI communicator, for backends bootstrapped over MPI (NCCL's unique id).
    pub fn communicator(&self) -> &SimpleCommunicator {
        &self.world
    }

    fn sum_into(&self, op: &'static str, send: &Tensor, recv: &mut Tensor) -> Result<()> {
        count_i32(op, send.numel())?;
        macro_rules! sum_as {
            ($t:ty) => {
                self.world.all_reduce_into(typed::<$t>(send)?, typed_mut::<$t>(recv)?, SystemOperation::sum())
            };
        }
        match send.kind() {
            Kind::Float => sum_as!(f32),
            Kind::Double => sum_as!(f64),
            Kind::Int64 => sum_as!(i64),
            Kind::Int => sum_as!(i32),
            Kind::Int16 => sum_as!(i16),
            Kind::Int8 => sum_as!(i8),
            Kind::Uint8 => sum_as!(u8),
            other => return Err(Error::Collective { op, message: format!("no MPI sum for {other:?}") }),
        }
        Ok(())
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_gather_into(&self, shard: &Tensor, output: &mut Tensor) -> Result<()> {
        crate::check_gather_shapes(shard, output, self.world_size)?;
        if output.device() != tch::Device::Cpu {
            let mut host = output.f_to_device(tch::Device::Cpu)?;
            self.all_gather_into(&host_contiguous(shard)?, &mut host)?;
            output.f_copy_(&host)?;
            return Ok(());
        }
        let send = host_contiguous(shard)?;
        count_i32("all_gather_into", output.numel() * output.kind().elt_size_in_bytes())?;
        // Straight into the output buffer, as bytes so every kind travels unchanged.
        self.world.all_gather_into(bytes(&send), bytes_mut(output));
        Ok(())
    }

    fn start_all_gather_into(&self, shard: &Tensor, output: &mut Tensor) -> Result<Box<dyn PendingCollective>> {
        crate::check_gather_shapes(shard, output, self.world_size)?;
        if output.device() != tch::Device::Cpu {
            self.all_gather_into(shard, output)?;
            return Ok(Box::new(crate::Completed));
        }
        count_i32("start_all_gather_into", output.numel() * output.kind().elt_size_in_bytes())?;
        let send = host_contiguous(shard)?;
        let recv = output.shallow_clone();
        // SAFETY: the slices point into the storage of `send` and `recv`, which the returned handle owns
        // (shallow clones keep the storage alive) until the request completes in `wait` or `drop`; the
        // caller must not touch `output` before then (the trait's contract), and `send` is this
        // function's own copy or a view nobody writes while a gather is pending.
        let (send_bytes, recv_bytes): (&'static [u8], &'static mut [u8]) = unsafe {
            (
                std::slice::from_raw_parts(send.data_ptr() as *const u8, bytes(&send).len()),
                std::slice::from_raw_parts_mut(
                    recv.data_ptr() as *mut u8,
                    recv.numel() * recv.kind().elt_size_in_bytes(),
                ),
            )
        };
        let request = self.world.immediate_all_gather_into(mpi::request::StaticScope, send_bytes, recv_bytes);
        Ok(Box::new(PendingGather { request: Some(request), _buffers: (send, recv) }))
    }

    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        let kind = sum_kind(t.kind());
        let send = host_contiguous(t)?.f_to_kind(kind)?;
        let mut recv = send.f_empty_like()?;
        self.sum_into("all_reduce_sum", &send, &mut recv)?;
        t.f_copy_(&recv)?;
        Ok(())
    }

    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let send = host_contiguous(t)?;
        count_i32("all_gather", send.numel() * send.kind().elt_size_in_bytes() * self.world_size)?;
        let mut shape = vec![self.world_size as i64];
        shape.extend(send.size());
        let mut recv = Tensor::f_empty(shape.as_slice(), (send.kind(), tch::Device::Cpu))?;
        // Bytes, so every kind (bf16 included) travels unchanged.
        self.world.all_gather_into(bytes(&send), bytes_mut(&mut recv));
        let recv = recv.f_to_device(t.device())?;
        (0..self.world_size as i64).map(|r| Ok(recv.f_select(0, r)?)).collect()
    }

    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        let op = "reduce_scatter_sum";
        let block_rows = crate::reduce_scatter_block_rows(t, self.world_size)?;
        // MPI_Reduce_scatter_block's send buffer is the whole tensor, its receive buffer one block.
        let kind = sum_kind(t.kind());
        let send = host_contiguous(t)?.f_to_kind(kind)?;
        let mut block = send.f_narrow(0, 0, block_rows)?.f_empty_like()?;
        count_i32(op, send.numel())?;
        macro_rules! sum_as {
            ($t:ty) => {
                self.world.reduce_scatter_block_into(
                    typed::<$t>(&send)?,
                    typed_mut::<$t>(&mut block)?,
                    SystemOperation::sum(),
                )
            };
        }
        match kind {
            Kind::Float => sum_as!(f32),
            Kind::Double => sum_as!(f64),
            Kind::Int64 => sum_as!(i64),
            Kind::Int => sum_as!(i32),
            Kind::Int16 => sum_as!(i16),
            Kind::Int8 => sum_as!(i8),
            Kind::Uint8 => sum_as!(u8),
            other => return Err(Error::Collective { op, message: format!("no MPI sum for {other:?}") }),
        }
        Ok(block.f_to_kind(t.kind())?.f_to_device(t.device())?)
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(Error::Collective {
                op: "broadcast",
                message: format!("root {root} of {} ranks", self.world_size),
            });
        }
        let mut buf = owned_copy(&host_contiguous(t)?)?;
        count_i32("broadcast", buf.numel() * buf.kind().elt_size_in_bytes())?;
        self.world.process_at_rank(root as i32).broadcast_into(bytes_mut(&mut buf));
        t.f_copy_(&buf)?;
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, exit_code: i32) -> ! {
        // MPI_Abort makes the launcher end every rank of the job.
        self.world.abort(exit_code)
    }
}

/// An `MPI_Iallgather` in flight, with the tensors whose storage it reads and writes.
struct PendingGather {
    request: Option<mpi::request::Request<'static, [u8], mpi::request::StaticScope>>,
    _buffers: (Tensor, Tensor),
}

impl std::fmt::Debug for PendingGather {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingGather").field("completed", &self.request.is_none()).finish()
    }
}

impl PendingCollective for PendingGather {
    fn wait(mut self: Box<Self>) -> Result<()> {
        if let Some(request) = self.request.take() {
            request.wait_without_status();
        }
        Ok(())
    }
}

impl Drop for PendingGather {
    /// A gather must complete before its buffers are freed (and every rank takes part in it anyway).
    fn drop(&mut self) {
        if let Some(request) = self.request.take() {
            request.wait_without_status();
        }
    }
}
