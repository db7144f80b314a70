//! torchrun's rendezvous: ranks started by `torchrun` find each other through the key-value store
//! that torchrun's agent serves at MASTER_ADDR:MASTER_PORT (`TORCHELASTIC_USE_AGENT_STORE=True`).
//! This module speaks the few requests of that store's wire protocol (c10d TCPStore) that handing
//! out NCCL's 128-byte unique id needs: rank 0 sets a key, the others wait for it and read it.
//!
//! Protocol (little-endian, as torch's C++ client writes it): a connection starts with VALIDATE and a
//! magic number; strings and byte values are a u64 length and the bytes. SET has no reply; WAIT replies
//! one byte when the keys exist; GET replies the value. torch's client puts "/" before every key, and so
//! does this one, so that both see the same keys.

use crate::{Error, Result};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const VALIDATE: u8 = 0;
const SET: u8 = 1;
const GET: u8 = 3;
const ADD: u8 = 4;
const CHECK: u8 = 5;
const WAIT: u8 = 6;
const VALIDATION_MAGIC: u32 = 0x3C85_F7CE;
const STOP_WAITING: u8 = 0;

/// A client of a c10d TCPStore.
#[derive(Debug)]
pub struct StoreClient {
    stream: TcpStream,
    address: String,
}

impl StoreClient {
    /// Connects to `host:port`, retrying until `timeout` (the server may start after this rank).
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<Self> {
        let address = format!("{host}:{port}");
        let fail = |message: String| Error::Rendezvous { address: address.clone(), message };
        let deadline = Instant::now() + timeout;
        let stream = loop {
            let attempt = (host, port)
                .to_socket_addrs()
                .map_err(|e| fail(format!("cannot resolve: {e}")))?
                .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok());
            match attempt {
                Some(stream) => break stream,
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                None => return Err(fail(format!("no store answered within {} s", timeout.as_secs()))),
            }
        };
        stream.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
        let mut client = Self { stream, address };
        let mut hello = vec![VALIDATE];
        hello.extend(VALIDATION_MAGIC.to_le_bytes());
        client.send(&hello)?;
        Ok(client)
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let mut msg = vec![SET];
        put_bytes(&mut msg, format!("/{key}").as_bytes());
        put_bytes(&mut msg, value);
        self.send(&msg)
    }

    /// Waits until `key` exists (at most `timeout`), then reads it.
    pub fn wait_get(&mut self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let mut msg = vec![WAIT];
        msg.extend(1u64.to_le_bytes());
        put_bytes(&mut msg, format!("/{key}").as_bytes());
        self.send(&msg)?;
        self.stream.set_read_timeout(Some(timeout)).map_err(|e| self.fail(e.to_string()))?;
        let mut reply = [0u8; 1];
        self.stream.read_exact(&mut reply).map_err(|e| {
            let waited = if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                format!("key `{key}` did not appear within {} s (did rank 0 fail?)", timeout.as_secs())
            } else {
                format!("waiting for key `{key}`: {e}")
            };
            self.fail(waited)
        })?;
        if reply[0] != STOP_WAITING {
            return Err(self.fail(format!("wait for `{key}` was cancelled (reply {})", reply[0])));
        }
        let mut msg = vec![GET];
        put_bytes(&mut msg, format!("/{key}").as_bytes());
        self.send(&msg)?;
        let mut len = [0u8; 8];
        self.stream.read_exact(&mut len).map_err(|e| self.fail(format!("reading `{key}`: {e}")))?;
        let len = u64::from_le_bytes(len);
        if len > 1 << 20 {
            return Err(self.fail(format!("value of `{key}` claims {len} bytes")));
        }
        let mut value = vec![0u8; len as usize];
        self.stream.read_exact(&mut value).map_err(|e| self.fail(format!("reading `{key}`: {e}")))?;
        Ok(value)
    }

    /// Adds `amount` to the counter `key` (created at 0) and returns its new value: one request, so
    /// two clients never see the same value.
    pub fn add(&mut self, key: &str, amount: i64) -> Result<i64> {
        let mut msg = vec![ADD];
        put_bytes(&mut msg, format!("/{key}").as_bytes());
        msg.extend(amount.to_le_bytes());
        self.send(&msg)?;
        let mut value = [0u8; 8];
        self.stream.read_exact(&mut value).map_err(|e| self.fail(format!("adding to `{key}`: {e}")))?;
        Ok(i64::from_le_bytes(value))
    }

    /// Whether every one of `keys` exists.
    pub fn check(&mut self, keys: &[String]) -> Result<bool> {
        let mut msg = vec![CHECK];
        msg.extend((keys.len() as u64).to_le_bytes());
        for key in keys {
            put_bytes(&mut msg, format!("/{key}").as_bytes());
        }
        self.send(&msg)?;
        let mut reply = [0u8; 1];
        self.stream.read_exact(&mut reply).map_err(|e| self.fail(format!("checking keys: {e}")))?;
        // The server answers READY (0) or NOT_READY (1).
        Ok(reply[0] == 0)
    }

    fn send(&mut self, msg: &[u8]) -> Result<()> {
        self.stream.write_all(msg).map_err(|e| self.fail(format!("sending: {e}")))
    }

    fn fail(&self, message: String) -> Error {
        Error::Rendezvous { address: self.address.clone(), message }
    }
}

fn put_bytes(msg: &mut Vec<u8>, bytes: &[u8]) {
    msg.extend((bytes.len() as u64).to_le_bytes());
    msg.extend(bytes);
}

/// Hands `rank 0`'s id to every rank through torchrun's store: rank 0 passes `Some(id)` (and gets it
/// back), the others `None`. `attempt` (TORCHELASTIC_RESTART_COUNT) keeps a restarted job from
/// reading the previous attempt's id.
pub fn share_id(host: &str, port: u16, attempt: u32, id: Option<&[u8]>, timeout: Duration) -> Result<Vec<u8>> {
    let key = format!("icl/attempt_{attempt}/nccl_unique_id");
    let mut store = StoreClient::connect(host, port, timeout)?;
    match id {
        Some(id) => {
            store.set(&key, id)?;
            Ok(id.to_vec())
        }
        None => store.wait_get(&key, timeout),
    }
}

/// torchrun's store, from the variables it sets: MASTER_ADDR, MASTER_PORT and the attempt
/// (TORCHELASTIC_RESTART_COUNT, 0 when unset).
pub fn torchrun_store() -> Result<(String, u16, u32)> {
    let var = |name: &str| {
        std::env::var(name).map_err(|_| Error::Launch(format!("torchrun's RANK and WORLD_SIZE are set but not {name}")))
    };
    let host = var("MASTER_ADDR")?;
    let port = var("MASTER_PORT")?;
    let port = port.parse().map_err(|_| Error::Launch(format!("MASTER_PORT=`{port}` is not a port")))?;
    let attempt = std::env::var("TORCHELASTIC_RESTART_COUNT").ok().and_then(|a| a.parse().ok()).unwrap_or(0);
    Ok((host, port, attempt))
}

/// Every rank of a torchrun-style launch checks in at the store: a rank number claimed twice is an
/// error on the second claimant at once, and a world whose ranks do not all arrive within `timeout`
/// is an error naming the missing ones, on every rank that came.
pub fn check_ranks(
    host: &str,
    port: u16,
    attempt: u32,
    rank: usize,
    world_size: usize,
    timeout: Duration,
) -> Result<()> {
    let mut store = StoreClient::connect(host, port, timeout)?;
    let key = |r: usize| format!("icl/attempt_{attempt}/world_{world_size}/rank_{r}");
    let claims = store.add(&key(rank), 1)?;
    if claims > 1 {
        return Err(Error::Launch(format!(
            "two processes claim rank {rank} of {world_size} (RANK={rank} is set twice): each rank needs its own number"
        )));
    }
    let deadline = Instant::now() + timeout;
    let keys: Vec<String> = (0..world_size).map(key).collect();
    while !store.check(&keys)? {
        if Instant::now() > deadline {
            let mut missing = Vec::new();
            for (r, k) in keys.iter().enumerate() {
                if !store.check(std::slice::from_ref(k))? {
                    missing.push(r.to_string());
                }
            }
            return Err(Error::Launch(format!(
                "WORLD_SIZE={world_size}, but rank(s) {} never joined within {} s",
                missing.join(", "),
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
