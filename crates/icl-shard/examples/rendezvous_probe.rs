//! Hands a 128-byte id from rank 0 to every rank through torchrun's store, as the NCCL backend does with
//! NCCL's unique id, and prints what each rank got: `crates/icl-shard/tests/rendezvous.rs` runs it under
//! `torchrun --no-python` on CPUs.
use icl_shard::{rendezvous, Launch, Launcher, CONNECT_TIMEOUT};
use std::hash::{BuildHasher, Hasher};
use std::process::ExitCode;

fn random_id() -> Vec<u8> {
    // A different id every run: std's per-process random hasher keys, fed the time.
    let state = std::collections::hash_map::RandomState::new();
    (0..16u64)
        .flat_map(|i| {
            let mut h = state.build_hasher();
            h.write_u64(i);
            h.write_u128(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
            );
            h.finish().to_le_bytes()
        })
        .collect()
}

fn run() -> Result<String, String> {
    let launch = Launch::from_env().map_err(|e| e.to_string())?;
    if launch.launcher != Launcher::Torchrun {
        return Err("not started by torchrun".into());
    }
    let var = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
    let port: u16 = var("MASTER_PORT")?.parse().map_err(|e| format!("MASTER_PORT: {e}"))?;
    let mine = (launch.rank == 0).then(random_id);
    let id = rendezvous::share_id(&var("MASTER_ADDR")?, port, 0, mine.as_deref(), CONNECT_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("rank {} of {} id {hex}", launch.rank, launch.world_size))
}

fn main() -> ExitCode {
    match run() {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
