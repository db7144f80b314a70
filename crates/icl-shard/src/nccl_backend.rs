//! Collectives over NCCL on CUDA tensors. libcuda and libnccl are loaded at run time (cudarc's dynamic
//! loading), so building needs no CUDA toolkit; a machine without them gets an error, not a crash.
//!
//! NCCL needs every rank to hold the same 128-byte unique id, made by rank 0: it travels over MPI when
//! mpirun/srun started the ranks, or through torchrun's store ([`crate::rendezvous`]).
//!
//! The collectives run on the CUDA default stream, the one libtorch computes on unless told otherwise,
//! so they are ordered after the kernels that produced their inputs and before those that read results.

use crate::launch::{Launch, Launcher, CONNECT_TIMEOUT};
use crate::tensor_bytes::{owned_copy, sum_kind};
use crate::{Collective, Error, Result};
use cudarc::driver::CudaContext;
use cudarc::nccl::{result as nccl, sys};
use std::ffi::c_void;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

pub struct NcclCollective {
    comm: sys::ncclComm_t,
    ordinal: usize,
    rank: usize,
    world_size: usize,
    _context: Arc<CudaContext>,
    /// The MPI job that handed out the id: it finalizes MPI when dropped and aborts the job on failure.
    #[cfg(feature = "mpi")]
    bootstrap: Option<crate::MpiCollective>,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("cuda", &self.ordinal)
            .finish()
    }
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable { backend: "nccl", reason: reason.into() }
}

fn nccl_error(op: &'static str, e: nccl::NcclError) -> Error {
    Error::Collective { op, message: format!("NCCL: {e:?}") }
}

/// The NCCL type of `kind`.
fn data_type(op: &'static str, kind: Kind) -> Result<sys::ncclDataType_t> {
    use sys::ncclDataType_t::*;
    Ok(match kind {
        Kind::Float => ncclFloat32,
        Kind::Double => ncclFloat64,
        Kind::Half => ncclFloat16,
        Kind::BFloat16 => ncclBfloat16,
        Kind::Int64 => ncclInt64,
        Kind::Int => ncclInt32,
        Kind::Int8 => ncclInt8,
        Kind::Uint8 | Kind::Bool => ncclUint8,
        other => return Err(Error::Collective { op, message: format!("no NCCL type for {other:?}") }),
    })
}

impl NcclCollective {
    /// Joins the job of `launch` on GPU `ordinal`.
    pub fn connect(launch: &Launch, ordinal: usize) -> Result<Self> {
        // cudarc panics when it cannot load a library: look first.
        // SAFETY: only tries to dlopen the library by its usual names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(unavailable("the CUDA driver library (libcuda.so) is not on this machine"));
        }
        // SAFETY: as above.
        if !unsafe { sys::is_culib_present() } {
            return Err(unavailable(
                "libnccl.so was not found on the library path; pip's nvidia-nccl wheels ship only \
                 libnccl.so.2: add a folder holding a `libnccl.so` link to it to LD_LIBRARY_PATH \
                 (`cargo xtask setup` makes .icl/nccl/libnccl.so)",
            ));
        }
        let context = CudaContext::new(ordinal).map_err(|e| unavailable(format!("CUDA device {ordinal}: {e:?}")))?;
        let mut collective = Self {
            comm: std::ptr::null_mut(),
            ordinal,
            rank: launch.rank,
            world_size: launch.world_size,
            _context: context,
            #[cfg(feature = "mpi")]
            bootstrap: None,
        };
        let id = collective.share_unique_id(launch)?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: every rank passes the same id and world size and its own rank; NCCL fills `comm`.
        unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), launch.world_size as i32, id, launch.rank as i32)
                .map_err(|e| nccl_error("init", e))?;
            collective.comm = comm.assume_init();
        }
        Ok(collective)
    }

    fn share_unique_id(&mut self, launch: &Launch) -> Result<sys::ncclUniqueId> {
        let mine =
            if launch.rank == 0 { Some(nccl::get_uniqueid().map_err(|e| nccl_error("unique id", e))?) } else { None };
        let mine_bytes = mine.map(|id| id.internal.map(|c| c as u8));
        let bytes: Vec<u8> = match launch.launcher {
            Launcher::Alone => mine_bytes.map(Vec::from).unwrap_or_default(),
            Launcher::Torchrun => {
                let var =
                    |name: &str| std::env::var(name).map_err(|_| Error::Launch(format!("torchrun did not set {name}")));
                let host = var("MASTER_ADDR")?;
                let port = var("MASTER_PORT")?;
                let port = port.parse().map_err(|_| Error::Launch(format!("MASTER_PORT=`{port}` is not a port")))?;
                let attempt =
                    std::env::var("TORCHELASTIC_RESTART_COUNT").ok().and_then(|a| a.parse().ok()).unwrap_or(0);
                crate::rendezvous::share_id(&host, port, attempt, mine_bytes.as_ref().map(|b| &b[..]), CONNECT_TIMEOUT)?
            }
            Launcher::Mpi | Launcher::Slurm => self.share_over_mpi(mine_bytes)?,
        };
        let internal: [std::ffi::c_char; 128] = bytes
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| Error::Launch(format!("the NCCL unique id came with {} bytes, not 128", bytes.len())))?;
        Ok(sys::ncclUniqueId { internal })
    }

    #[cfg(feature = "mpi")]
    fn share_over_mpi(&mut self, mine: Option<[u8; 128]>) -> Result<Vec<u8>> {
        let mpi = crate::MpiCollective::init()?;
        let mut id = Tensor::from_slice(&mine.unwrap_or([0u8; 128]));
        mpi.broadcast(&mut id, 0)?;
        self.bootstrap = Some(mpi);
        Ok(Vec::<u8>::try_from(&id)?)
    }

    #[cfg(not(feature = "mpi"))]
    fn share_over_mpi(&mut self, _mine: Option<[u8; 128]>) -> Result<Vec<u8>> {
        Err(unavailable(
            "mpirun/srun started the ranks, and NCCL's id travels over MPI, but this build has no MPI \
             support (rebuild with `--features mpi,nccl`, or launch with torchrun)",
        ))
    }

    /// `t` as a contiguous tensor on this rank's GPU (a view when it already is one).
    fn on_device(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.f_to_device(Device::Cuda(self.ordinal))?.f_contiguous()?)
    }

    fn stream() -> sys::cudaStream_t {
        std::ptr::null_mut()
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: the communicator was made by comm_init_rank and is destroyed once.
            // A failure here changes nothing for the caller: the process is leaving the job.
            let _ = unsafe { nccl::comm_destroy(self.comm) };
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        let op = "all_reduce_sum";
        let buf = owned_copy(&self.on_device(t)?.f_to_kind(sum_kind(t.kind()))?)?;
        // SAFETY: `buf` is a contiguous device tensor of numel elements of its kind, summed in place.
        unsafe {
            nccl::all_reduce(
                buf.data_ptr() as *const c_void,
                buf.data_ptr(),
                buf.numel(),
                data_type(op, buf.kind())?,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                Self::stream(),
            )
            .map_err(|e| nccl_error(op, e))?;
        }
        t.f_copy_(&buf)?;
        Ok(())
    }

    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let send = self.on_device(t)?;
        let mut shape = vec![self.world_size as i64];
        shape.extend(send.size());
        let recv = Tensor::f_empty(shape.as_slice(), (send.kind(), send.device()))?;
        let bytes = send.numel() * send.kind().elt_size_in_bytes();
        // SAFETY: `recv` holds world_size blocks of `bytes` bytes; gathering bytes serves every kind.
        unsafe {
            nccl::all_gather(
                send.data_ptr() as *const c_void,
                recv.data_ptr(),
                bytes,
                sys::ncclDataType_t::ncclUint8,
                self.comm,
                Self::stream(),
            )
            .map_err(|e| nccl_error("all_gather", e))?;
        }
        let recv = recv.f_to_device(t.device())?;
        (0..self.world_size as i64).map(|r| Ok(recv.f_select(0, r)?)).collect()
    }

    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        let op = "reduce_scatter_sum";
        let block_rows = crate::reduce_scatter_block_rows(t, self.world_size)?;
        let send = self.on_device(t)?.f_to_kind(sum_kind(t.kind()))?;
        let block = send.f_narrow(0, 0, block_rows)?.f_empty_like()?;
        // SAFETY: `send` holds world_size blocks of block.numel() elements, `block` one.
        unsafe {
            nccl::reduce_scatter(
                send.data_ptr() as *const c_void,
                block.data_ptr(),
                block.numel(),
                data_type(op, send.kind())?,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                Self::stream(),
            )
            .map_err(|e| nccl_error(op, e))?;
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
        let buf = owned_copy(&self.on_device(t)?)?;
        // SAFETY: `buf` is a contiguous device tensor; bytes serve every kind.
        unsafe {
            nccl::broadcast(
                buf.data_ptr() as *const c_void,
                buf.data_ptr(),
                buf.numel() * buf.kind().elt_size_in_bytes(),
                sys::ncclDataType_t::ncclUint8,
                root as i32,
                self.comm,
                Self::stream(),
            )
            .map_err(|e| nccl_error("broadcast", e))?;
        }
        t.f_copy_(&buf)?;
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let mut token = Tensor::f_ones([1], (Kind::Float, Device::Cuda(self.ordinal)))?;
        self.all_reduce_sum(&mut token)?;
        tch::Cuda::synchronize(self.ordinal as i64);
        Ok(())
    }

    fn abort(&self, exit_code: i32) -> ! {
        // SAFETY: aborting unblocks this rank's pending NCCL work; the process exits right after.
        let _ = unsafe { nccl::comm_abort(self.comm) };
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.bootstrap {
            mpi.abort(exit_code)
        }
        // Under torchrun the agent ends the other ranks when this one exits non-zero.
        std::process::exit(exit_code)
    }
}
