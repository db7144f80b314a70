//! Runs every collective under the launcher that started it and checks the results on each rank:
//! `collective_check [--dist mpi|nccl|auto] [--cuda] [--fail-rank K]`. `crates/icl-shard/tests/mpi.rs`
//! starts it with `mpirun -np N`, scripts/gpu_check.sh with NCCL on a GPU (`--cuda`: the tensors live
//! on the rank's GPU). With `--fail-rank K`, rank K fails after the first collective, as a rank of a real
//! job would, to show that the job ends rather than hangs.
#![allow(clippy::unwrap_used)]
use icl_shard::{all_gather_bytes, all_gather_varlen, connect, Collective, DistChoice, Launch};
use std::process::ExitCode;
use tch::{Device, Kind, Tensor};

fn check(c: &dyn Collective, fail_rank: Option<usize>, dev: Device) -> Result<(), String> {
    let (rank, world) = (c.rank() as i64, c.world_size() as i64);
    let err = |e: icl_shard::Error| e.to_string();

    let mut t = Tensor::from_slice(&[rank as f32 + 1.0, 2.0 * (rank as f32 + 1.0)]).to_device(dev);
    c.all_reduce_sum(&mut t).map_err(err)?;
    let total = (world * (world + 1) / 2) as f32;
    expect("all_reduce_sum f32", Vec::<f32>::try_from(&host(&t)).unwrap(), vec![total, 2.0 * total])?;

    if fail_rank == Some(rank as usize) {
        return Err(format!("rank {rank} fails on purpose (--fail-rank)"));
    }

    let mut bf = Tensor::from_slice(&[1.0f32, 0.5]).to_kind(Kind::BFloat16).to_device(dev);
    c.all_reduce_sum(&mut bf).map_err(err)?;
    expect("all_reduce_sum bf16 keeps its kind", bf.kind(), Kind::BFloat16)?;
    expect(
        "all_reduce_sum bf16",
        Vec::<f32>::try_from(&host(&bf.to_kind(Kind::Float))).unwrap(),
        vec![world as f32, 0.5 * world as f32],
    )?;

    let mut counts = Tensor::from_slice(&[rank, 1]).to_device(dev);
    c.all_reduce_sum(&mut counts).map_err(err)?;
    expect("all_reduce_sum i64", Vec::<i64>::try_from(&host(&counts)).unwrap(), vec![world * (world - 1) / 2, world])?;

    let gathered =
        c.all_gather(&Tensor::from_slice(&[rank * 10, rank * 10 + 1]).reshape([1, 2]).to_device(dev)).map_err(err)?;
    let gathered: Vec<Vec<i64>> =
        gathered.iter().map(|g| Vec::<i64>::try_from(&host(&g.reshape([-1]))).unwrap()).collect();
    expect("all_gather", gathered, (0..world).map(|r| vec![r * 10, r * 10 + 1]).collect())?;

    let varlen = all_gather_varlen(c, &Tensor::arange(rank + 1, (Kind::Float, dev))).map_err(err)?;
    let varlen: Vec<Vec<f32>> = varlen.iter().map(|v| Vec::<f32>::try_from(&host(v)).unwrap()).collect();
    expect("all_gather_varlen", varlen, (0..world).map(|r| (0..=r).map(|x| x as f32).collect()).collect())?;

    let words = all_gather_bytes(c, "x".repeat(rank as usize * 3).as_bytes()).map_err(err)?;
    expect("all_gather_bytes", words, (0..world).map(|r| vec![b'x'; r as usize * 3]).collect())?;

    // Every rank holds 0..2*world shifted by its rank; rank r gets rows 2r, 2r+1 of the sum.
    let full = Tensor::arange(2 * world, (Kind::Double, dev)) + rank as f64;
    let block = c.reduce_scatter_sum(&full).map_err(err)?;
    let shift = (world * (world - 1) / 2) as f64;
    let want: Vec<f64> = (2 * rank..2 * rank + 2).map(|i| world as f64 * i as f64 + shift).collect();
    expect("reduce_scatter_sum", Vec::<f64>::try_from(&host(&block)).unwrap(), want)?;
    if c.reduce_scatter_sum(&Tensor::zeros([2 * world + 1], (Kind::Float, dev))).is_ok() {
        return Err("reduce_scatter_sum accepted a length that is not a multiple of the world size".into());
    }

    let root = world - 1;
    let mut b = Tensor::from_slice(&[rank, rank]).to_kind(Kind::BFloat16).to_device(dev);
    c.broadcast(&mut b, root as usize).map_err(err)?;
    expect("broadcast", Vec::<f32>::try_from(&host(&b.to_kind(Kind::Float))).unwrap(), vec![root as f32; 2])?;
    c.barrier().map_err(err)?;
    Ok(())
}

fn host(t: &Tensor) -> Tensor {
    t.to_device(Device::Cpu)
}

fn expect<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let fail_rank = value("--fail-rank").and_then(|r| r.parse().ok());
    let dist: DistChoice = match value("--dist").unwrap_or_else(|| "mpi".into()).parse() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let launch = match Launch::from_env() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dev = if args.iter().any(|a| a == "--cuda") {
        Device::Cuda(launch.local_rank % tch::Cuda::device_count().max(1) as usize)
    } else {
        Device::Cpu
    };
    let ordinal = match dev {
        Device::Cuda(o) => Some(o),
        _ => None,
    };
    let c = match connect(dist, &launch, ordinal) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match check(c.as_ref(), fail_rank, dev) {
        Ok(()) => {
            println!("rank {} of {}: all collectives agree ({} on {dev:?})", c.rank(), c.world_size(), c.backend());
            ExitCode::SUCCESS
        }
        Err(e) => {
            // One write: mpirun relays each rank's stderr in the chunks it reads, beside its own
            // MPI_Abort notice, so a message written in pieces can arrive split around it.
            let message = format!("error: rank {} of {}: {e}\n", c.rank(), c.world_size());
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), message.as_bytes());
            c.abort(3)
        }
    }
}
