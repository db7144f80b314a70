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
