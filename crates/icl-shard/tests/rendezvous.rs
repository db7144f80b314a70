//! The torchrun rendezvous on CPUs: the id travels through a real torch TCPStore (the project's venv),
//! between threads and between processes that `torchrun --no-python` starts.
#![allow(clippy::unwrap_used)]

use icl_shard::rendezvous::{check_ranks, share_id, StoreClient};
use icl_test_support::{example, venv_bin};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

/// torch's own TCPStore server; prints its port, then the value of `key` once a client set it.
const SERVER: &str = r#"
import sys, torch.distributed as dist
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
print(store.port, flush=True)
print(store.get(sys.argv[1]).hex(), flush=True)
sys.stdin.read()
"#;

#[test]
fn threads_share_an_id_through_torchs_store() {
    let key = "icl/attempt_0/nccl_unique_id";
    let mut server = Command::new(venv_bin("python"))
        .args(["-c", SERVER, key])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let port: u16 = lines.next().unwrap().unwrap().trim().parse().unwrap();
    let id: Vec<u8> = (0..128u8).map(|b| b.wrapping_mul(37)).collect();
    let timeout = Duration::from_secs(30);
    // Readers first: they must wait for rank 0, not fail.
    let readers: Vec<_> =
        (1..4).map(|_| std::thread::spawn(move || share_id("127.0.0.1", port, 0, None, timeout).unwrap())).collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(share_id("127.0.0.1", port, 0, Some(&id), timeout).unwrap(), id);
    for reader in readers {
        assert_eq!(reader.join().unwrap(), id);
    }
    // torch's own client reads what ours wrote: the keys and bytes are the ones torch uses.
    let seen = lines.next().unwrap().unwrap();
    assert_eq!(seen.trim(), id.iter().map(|b| format!("{b:02x}")).collect::<String>());
    // A key that never comes is an error after the timeout, not a hang.
    let mut client = StoreClient::connect("127.0.0.1", port, timeout).unwrap();
    let e = client.wait_get("icl/attempt_9/nccl_unique_id", Duration::from_secs(1)).unwrap_err().to_string();
    assert!(e.contains("did not appear within 1 s"), "{e}");
    server.stdin.take().unwrap().write_all(b"").unwrap();
    server.wait().unwrap();
}

#[test]
fn no_store_is_an_error_naming_the_address() {
    // Port 9 (discard) has no store on a test machine.
    let e = StoreClient::connect("127.0.0.1", 9, Duration::from_millis(300)).unwrap_err().to_string();
    assert!(e.contains("127.0.0.1:9") && e.contains("no store answered"), "{e}");
}

#[test]
fn torchrun_ranks_get_rank_zeros_id() {
    let probe = example("rendezvous_probe");
    let out = Command::new(venv_bin("torchrun"))
        .args(["--standalone", "--nproc-per-node", "3", "--no-python"])
        .arg(&probe)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let mut ids: Vec<(usize, String)> = stdout
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("rank ")?;
            let (rank, rest) = rest.split_once(" of 3 id ")?;
            Some((rank.parse().ok()?, rest.to_owned()))
        })
        .collect();
    ids.sort();
    assert_eq!(ids.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![0, 1, 2], "{stdout}");
    assert_eq!(ids[0].1.len(), 256);
    assert!(ids.iter().all(|(_, id)| *id == ids[0].1), "{stdout}");
}

/// torch's TCPStore server that prints its port and runs until its stdin closes.
fn store_server() -> (std::process::Child, u16) {
    let mut server = Command::new(venv_bin("python"))
        .args(["-c", SERVER, "unused-key"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let port = lines.next().unwrap().unwrap().trim().parse().unwrap();
    (server, port)
}

/// Ranks `claimed` of a world of `world_size`, each checking in from its own thread: their outcomes.
fn check_in(port: u16, attempt: u32, world_size: usize, claimed: &[usize]) -> Vec<Result<(), String>> {
    let threads: Vec<_> = claimed
        .iter()
        .map(|&rank| {
            std::thread::spawn(move || {
                check_ranks("127.0.0.1", port, attempt, rank, world_size, Duration::from_secs(2))
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn ranks_check_in_and_mismatches_are_errors_within_the_timeout() {
    let (mut server, port) = store_server();
    let start = std::time::Instant::now();
    assert!(check_in(port, 0, 3, &[0, 1, 2]).iter().all(Result::is_ok));
    // Two processes claim rank 0 of 2: the second is told at once; rank 1 never comes.
    let outcomes = check_in(port, 1, 2, &[0, 0]);
    let errors: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(errors.iter().any(|e| e.contains("two processes claim rank 0 of 2")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("rank(s) 1 never joined within 2 s")), "{errors:?}");
    // A world of 3 that only 2 ranks join: both say which rank is missing.
    for outcome in check_in(port, 2, 3, &[0, 1]) {
        let e = outcome.unwrap_err();
        assert!(e.contains("WORLD_SIZE=3, but rank(s) 2 never joined"), "{e}");
    }
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
    server.stdin.take().unwrap().write_all(b"").unwrap();
    drop(server.stdin.take());
    let _ = server.kill();
    server.wait().unwrap();
}
