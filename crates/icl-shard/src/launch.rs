//! Who started this process (mpirun, srun, torchrun, or a person) and which collective it gets.

use crate::{Collective, Error, Result, SingleProcess};
use std::time::Duration;

/// The program that started the ranks, read from the variables it sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// Started by hand: one rank.
    Alone,
    /// `mpirun`/`mpiexec` (Open MPI's OMPI_COMM_WORLD_*, or MPICH/Hydra's PMI_*).
    Mpi,
    /// Slurm's `srun` (SLURM_PROCID, SLURM_STEP_NUM_TASKS); MPI initializes through Slurm's PMI.
    Slurm,
    /// `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
    Torchrun,
}

/// This process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub launcher: Launcher,
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes on this machine: picks the GPU.
    pub local_rank: usize,
    /// Processes on this machine, when the launcher says: shares out the CPU cores.
    pub local_world_size: Option<usize>,
}

impl Launch {
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the launch from `var` (the environment, or a map in tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let number = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|v| v.trim().parse::<usize>().map_err(|_| Error::Launch(format!("{name}=`{v}` is not a count"))))
                .transpose()
        };
        let required = |name: &str, launcher: &str| -> Result<usize> {
            number(name)?.ok_or_else(|| Error::Launch(format!("{launcher} set some of its variables but not {name}")))
        };
        let (launcher, rank, world_size, local_rank, local_world_size) =
            if let Some(size) = number("OMPI_COMM_WORLD_SIZE")? {
                let rank = required("OMPI_COMM_WORLD_RANK", "Open MPI")?;
                (
                    Launcher::Mpi,
                    rank,
                    size,
                    number("OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(0),
                    number("OMPI_COMM_WORLD_LOCAL_SIZE")?,
                )
            } else if let Some(size) = number("PMI_SIZE")? {
                let rank = required("PMI_RANK", "the MPI launcher")?;
                (Launcher::Mpi, rank, size, number("MPI_LOCALRANKID")?.unwrap_or(0), number("MPI_LOCALNRANKS")?)
            } else if let Some(size) = number("SLURM_STEP_NUM_TASKS")?.or(number("SLURM_NTASKS")?).filter(|&n| n > 1) {
                let rank = required("SLURM_PROCID", "srun")?;
                (Launcher::Slurm, rank, size, number("SLURM_LOCALID")?.unwrap_or(0), None)
            } else if let Some(size) = number("WORLD_SIZE")? {
                let rank = required("RANK", "torchrun")?;
                (Launcher::Torchrun, rank, size, number("LOCAL_RANK")?.unwrap_or(0), number("LOCAL_WORLD_SIZE")?)
            } else {
                (Launcher::Alone, 0, 1, 0, Some(1))
            };
        if world_size == 0 || rank >= world_size {
            return Err(Error::Launch(format!("rank {rank} of a world of {world_size}")));
        }
        Ok(Self { launcher, rank, world_size, local_rank, local_world_size })
    }
}

/// The `--dist` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DistChoice {
    /// One rank when started alone; MPI under mpirun/srun (NCCL over MPI when evaluating on a GPU with
    /// the `nccl` feature); NCCL under torchrun.
    Auto,
    /// One rank, even under a launcher (refused when the launcher started several).
    None,
    Mpi,
    Nccl,
}

impl std::str::FromStr for DistChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "none" => Ok(Self::None),
            "mpi" => Ok(Self::Mpi),
            "nccl" => Ok(Self::Nccl),
            other => Err(Error::Launch(format!("unknown --dist `{other}` (expected auto, none, mpi or nccl)"))),
        }
    }
}

/// How long ranks wait for each other while connecting (NCCL's id, torchrun's store).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// The collective for `choice` under `launch`. `cuda_ordinal` is the GPU this rank computes on
/// (`None` on CPU); NCCL needs one.
pub fn connect(choice: DistChoice, launch: &Launch, cuda_ordinal: Option<usize>) -> Result<Box<dyn Collective>> {
    let over_mpi = matches!(launch.launcher, Launcher::Mpi | Launcher::Slurm);
    // torchrun's variables are set by hand as often as by torchrun: two ranks claiming one number, or
    // a world that never fills, is an error here instead of a collective that never completes.
    if launch.launcher == Launcher::Torchrun && launch.world_size > 1 && choice != DistChoice::None {
        let (host, port, attempt) = crate::rendezvous::torchrun_store()?;
        crate::rendezvous::check_ranks(&host, port, attempt, launch.rank, launch.world_size, CONNECT_TIMEOUT)?;
    }
    match choice {
        DistChoice::None if launch.world_size > 1 => Err(Error::Launch(format!(
            "--dist none, but {:?} started {} ranks: each would evaluate everything and write the same files",
            launch.launcher, launch.world_size
        ))),
        DistChoice::None => Ok(Box::new(SingleProcess)),
        DistChoice::Auto if launch.world_size == 1 => Ok(Box::new(SingleProcess)),
        DistChoice::Auto if over_mpi && (cuda_ordinal.is_none() || !cfg!(feature = "nccl")) => connect_mpi(launch),
        DistChoice::Auto if launch.launcher == Launcher::Torchrun && cuda_ordinal.is_none() => Err(Error::Launch(
            "torchrun started several ranks on a machine without CUDA; ranks launched by torchrun talk over NCCL, \
             which needs GPUs (on CPUs, launch with `mpirun -np N icl eval ...` instead)"
                .into(),
        )),
        DistChoice::Auto | DistChoice::Nccl => connect_nccl(launch, cuda_ordinal),
        DistChoice::Mpi => connect_mpi(launch),
    }
}

/// MPI's world, which must be the launcher's: processes started with srun's variables but without
/// Slurm's PMI (or by hand) each come up as a world of one.
#[cfg(feature = "mpi")]
fn connect_mpi(launch: &Launch) -> Result<Box<dyn Collective>> {
    let mpi = crate::MpiCollective::init()?;
    if launch.launcher != Launcher::Alone && (mpi.world_size() != launch.world_size || mpi.rank() != launch.rank) {
        return Err(Error::Launch(format!(
            "{:?} made this process rank {} of {}, but MPI started it as rank {} of {}: the ranks never joined \
             one MPI job (under Slurm, srun must start MPI through its PMI: `srun --mpi=pmix`; or launch with \
             `mpirun`)",
            launch.launcher,
            launch.rank,
            launch.world_size,
            mpi.rank(),
            mpi.world_size()
        )));
    }
    Ok(Box::new(mpi))
}

#[cfg(not(feature = "mpi"))]
fn connect_mpi(_launch: &Launch) -> Result<Box<dyn Collective>> {
    Err(Error::Unavailable {
        backend: "mpi",
        reason: "this build has no MPI support; rebuild with `--features mpi` (needs an MPI library, e.g. \
                 Debian's libopenmpi-dev)"
            .into(),
    })
}

#[cfg(feature = "nccl")]
fn connect_nccl(launch: &Launch, cuda_ordinal: Option<usize>) -> Result<Box<dyn Collective>> {
    let ordinal = cuda_ordinal.ok_or_else(|| Error::Unavailable {
        backend: "nccl",
        reason: "no CUDA device: NCCL runs on GPUs (use --dist mpi on CPUs)".into(),
    })?;
    Ok(Box::new(crate::NcclCollective::connect(launch, ordinal)?))
}

#[cfg(not(feature = "nccl"))]
fn connect_nccl(_launch: &Launch, _cuda_ordinal: Option<usize>) -> Result<Box<dyn Collective>> {
    Err(Error::Unavailable {
        backend: "nccl",
        reason: "this build has no NCCL support; rebuild with `--features nccl`".into(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(|name| map.get(name).cloned())
    }

    #[test]
    fn launchers_are_told_apart() {
        assert_eq!(launch(&[]).unwrap().launcher, Launcher::Alone);
        let mpi = launch(&[
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "3"),
        ])
        .unwrap();
        assert_eq!(
            mpi,
            Launch { launcher: Launcher::Mpi, rank: 2, world_size: 3, local_rank: 2, local_world_size: Some(3) }
        );
        let torchrun =
            launch(&[("WORLD_SIZE", "4"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")]).unwrap();
        assert_eq!((torchrun.launcher, torchrun.rank, torchrun.local_world_size), (Launcher::Torchrun, 1, Some(2)));
        // A one-task Slurm step (e.g. the batch script itself) is not a multi-rank launch.
        assert_eq!(launch(&[("SLURM_STEP_NUM_TASKS", "1"), ("SLURM_PROCID", "0")]).unwrap().launcher, Launcher::Alone);
        assert_eq!(launch(&[("SLURM_STEP_NUM_TASKS", "8"), ("SLURM_PROCID", "5")]).unwrap().rank, 5);
        // srun's task count under either name, its local id choosing the GPU.
        let srun = launch(&[("SLURM_NTASKS", "4"), ("SLURM_PROCID", "3"), ("SLURM_LOCALID", "1")]).unwrap();
        assert_eq!((srun.launcher, srun.rank, srun.world_size, srun.local_rank), (Launcher::Slurm, 3, 4, 1));
        let e = launch(&[("SLURM_NTASKS", "4")]).unwrap_err().to_string();
        assert!(e.contains("SLURM_PROCID"), "{e}");
        let e = launch(&[("SLURM_NTASKS", "4"), ("SLURM_PROCID", "4")]).unwrap_err().to_string();
        assert!(e.contains("rank 4 of a world of 4"), "{e}");
    }

    #[test]
    fn malformed_launches_name_the_variable() {
        let e = launch(&[("WORLD_SIZE", "two"), ("RANK", "0")]).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE=`two`"), "{e}");
        let e = launch(&[("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("RANK"), "{e}");
        let e = launch(&[("WORLD_SIZE", "2"), ("RANK", "2")]).unwrap_err().to_string();
        assert!(e.contains("rank 2 of a world of 2"), "{e}");
    }

    #[test]
    fn backend_choice() {
        let alone = launch(&[]).unwrap();
        assert_eq!(connect(DistChoice::Auto, &alone, None).unwrap().world_size(), 1);
        assert_eq!(connect(DistChoice::None, &alone, None).unwrap().backend(), "single");
        let two = launch(&[("WORLD_SIZE", "2"), ("RANK", "0")]).unwrap();
        let e = connect(DistChoice::None, &two, None).err().unwrap().to_string();
        assert!(e.contains("--dist none"), "{e}");
        // torchrun's ranks check in at its store first: without MASTER_ADDR there is none.
        let e = connect(DistChoice::Auto, &two, None).err().unwrap().to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
        assert!("gloo".parse::<DistChoice>().is_err());
    }

    /// Without the CUDA driver (every development and CI machine), asking for NCCL is an error that
    /// names the missing library, not cudarc's panic. GPU machines run scripts/gpu_check.sh instead.
    #[cfg(feature = "nccl")]
    #[test]
    fn nccl_without_a_cuda_driver_is_an_error() {
        // SAFETY: only tries to dlopen the library.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            return;
        }
        let alone = launch(&[]).unwrap();
        let e = connect(DistChoice::Nccl, &alone, Some(0)).err().unwrap().to_string();
        assert!(e.contains("libcuda.so"), "{e}");
    }
}
