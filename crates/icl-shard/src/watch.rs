//! A side channel between the ranks of a job, beside the collective: heartbeats that end every rank
//! when one is lost, and messages that ranks stream to rank 0 (the journal's records) while others
//! are still computing.
//!
//! Why: a rank blocked in an MPI or NCCL collective never returns when a peer's host vanishes (a cut
//! link sends no reset; `mpirun` itself keeps waiting for the lost host's daemon). So every rank keeps
//! a TCP connection to rank 0 (a star), written every [`HEARTBEAT_INTERVAL`] by a thread of its own,
//! computing or not. A connection that closes (the peer's process died: `kill -9`) or stays silent
//! for the timeout (its host is gone) makes rank 0 name the lost rank(s) to every rank it still
//! reaches; each rank prints the names and exits with status 1 at once, since its main thread may be
//! inside a collective that will never return. A rank that loses rank 0 names rank 0.
//!
//! Frames: a kind byte, a u32 little-endian length, the payload. A rank that ends normally says
//! [`Watch::finish`] first, so its closing connection is no loss.

use crate::{all_gather_bytes, Collective, Error, Result};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often every rank writes to its connections.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

const HELLO: u8 = 1;
const HEARTBEAT: u8 = 2;
const MESSAGE: u8 = 3;
const LOST: u8 = 4;
const BYE: u8 = 5;
/// Largest payload a frame may claim (a batch of journal records is far smaller).
const MAX_FRAME: u32 = 1 << 30;

/// What rank 0 does with a message another rank streams to it: `(sender's rank, payload)`.
pub type MessageHandler = Box<dyn FnMut(usize, Vec<u8>) + Send>;

/// A connection to one peer; writes come from the heartbeat thread and from the rank's main thread.
struct Peer {
    rank: usize,
    stream: Mutex<TcpStream>,
}

struct Shared {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// Set by [`Watch::finish`]: closing connections are expected from now on.
    finishing: AtomicBool,
    /// Peers that said goodbye.
    finished: Mutex<Vec<usize>>,
    /// Ranks found lost, reported once.
    lost: Mutex<Vec<usize>>,
    reporting: AtomicBool,
}

/// This rank's side of the side channel; heartbeats stop when it is dropped or finished.
pub struct Watch {
    shared: Arc<Shared>,
    /// Rank 0: every other rank; other ranks: rank 0.
    peers: Vec<Arc<Peer>>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("rank", &self.shared.rank).field("peers", &self.peers.len()).finish()
    }
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(kind);
    out.extend((payload.len() as u32).to_le_bytes());
    out.extend(payload);
    out
}

fn read_frame(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head)?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a frame claims {len} bytes")));
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

fn rank_list(ranks: &[usize]) -> String {
    ranks.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
}

impl Watch {
    /// Connects every rank to rank 0 (a collective: every rank calls it) and starts the heartbeats.
    /// A rank silent for `timeout` counts as lost. `on_message` handles, on rank 0, what the other
    /// ranks [`Watch::send_to_leader`]; it runs on the receiving threads, so it must be quick.
    pub fn start(collective: &dyn Collective, timeout: Duration, on_message: Option<MessageHandler>) -> Result<Self> {
        let (rank, world_size) = (collective.rank(), collective.world_size());
        let shared = Arc::new(Shared {
            rank,
            world_size,
            timeout,
            finishing: AtomicBool::new(false),
            finished: Mutex::new(Vec::new()),
            lost: Mutex::new(Vec::new()),
            reporting: AtomicBool::new(false),
        });
        let fail = |message: String| Error::Collective { op: "watch", message };
        // Rank 0 listens everywhere and tells the others where: its addresses, its port, and a nonce
        // that tells its listener from anything else answering there.
        let listener = if rank == 0 {
            Some(TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| fail(format!("listening: {e}")))?)
        } else {
            None
        };
        let nonce = {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
        };
        let offer = match &listener {
            Some(l) => {
                let port = l.local_addr().map_err(|e| fail(e.to_string()))?.port();
                let addresses: Vec<String> = local_addresses().iter().map(IpAddr::to_string).collect();
                format!("{nonce} {port} {}", addresses.join(","))
            }
            None => String::new(),
        };
        let offers = all_gather_bytes(collective, offer.as_bytes())?;
        let offer = String::from_utf8_lossy(&offers[0]).into_owned();
        let mut fields = offer.split(' ');
        let (Some(nonce), Some(port), Some(addresses)) = (fields.next(), fields.next(), fields.next()) else {
            return Err(fail(format!("rank 0 sent a malformed address `{offer}`")));
        };
        let nonce: u64 = nonce.parse().map_err(|_| fail(format!("malformed nonce in `{offer}`")))?;
        let port: u16 = port.parse().map_err(|_| fail(format!("malformed port in `{offer}`")))?;
        let deadline = Instant::now() + crate::CONNECT_TIMEOUT;
        let peers = match listener {
            Some(listener) => accept_peers(&listener, nonce, world_size, deadline)?,
            None => vec![connect_to_leader(addresses, port, nonce, rank, deadline)?],
        };
        let watch = Self { shared, peers };
        let handler = on_message.map(|h| Arc::new(Mutex::new(h)));
        for peer in &watch.peers {
            let reader = peer
                .stream
                .lock()
                .map_err(|_| fail("poisoned".into()))?
                .try_clone()
                .map_err(|e| fail(format!("rank {}: {e}", peer.rank)))?;
            reader.set_read_timeout(Some(timeout)).map_err(|e| fail(e.to_string()))?;
            let (shared, peers, handler, from) =
                (watch.shared.clone(), watch.peers.clone(), handler.clone(), peer.rank);
            std::thread::Builder::new()
                .name(format!("icl-watch-{from}"))
                .spawn(move || listen(reader, from, &shared, &peers, handler.as_deref()))
                .map_err(|e| fail(e.to_string()))?;
        }
        let (shared, peers) = (watch.shared.clone(), watch.peers.clone());
        std::thread::Builder::new()
            .name("icl-heartbeat".into())
            .spawn(move || heartbeat(&shared, &peers))
            .map_err(|e| fail(e.to_string()))?;
        Ok(watch)
    }

    /// Sends `payload` to rank 0's message handler (from a rank other than 0).
    pub fn send_to_leader(&self, payload: &[u8]) -> Result<()> {
        if self.shared.rank == 0 {
            return Err(Error::Collective { op: "watch", message: "rank 0 sends to itself".into() });
        }
        let bytes = frame(MESSAGE, payload);
        let peer = &self.peers[0];
        let mut stream =
            peer.stream.lock().map_err(|_| Error::Collective { op: "watch", message: "poisoned".into() })?;
        stream.write_all(&bytes).map_err(|e| Error::Collective { op: "watch", message: format!("to rank 0: {e}") })
    }

    /// Ends this rank's heartbeats: the job is done here, and the connections' closing is no loss.
    /// Rank 0 calls it only after the last collective, when every rank is done with it.
    pub fn finish(&self) {
        self.shared.finishing.store(true, Ordering::SeqCst);
        for peer in &self.peers {
            if let Ok(mut stream) = peer.stream.lock() {
                let _ = stream.write_all(&frame(BYE, &[]));
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.shared.finishing.store(true, Ordering::SeqCst);
    }
}

/// Every IPv4 address of this machine's interfaces, loopback last (a rank on another host cannot use it).
fn local_addresses() -> Vec<IpAddr> {
    let mut found = Vec::new();
    // SAFETY: getifaddrs fills a list that is walked read-only and freed once.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) == 0 {
            let mut entry = list;
            while !entry.is_null() {
                let addr = (*entry).ifa_addr;
                if !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET {
                    let v4 = &*(addr as *const libc::sockaddr_in);
                    found.push(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)));
                }
                entry = (*entry).ifa_next;
            }
            libc::freeifaddrs(list);
        }
    }
    found.sort_by_key(Ipv4Addr::is_loopback);
    found.dedup();
    if !found.iter().any(Ipv4Addr::is_loopback) {
        found.push(Ipv4Addr::LOCALHOST);
    }
    found.into_iter().map(IpAddr::V4).collect()
}

/// Rank 0: waits for a hello (the nonce and the rank) from every other rank.
fn accept_peers(listener: &TcpListener, nonce: u64, world_size: usize, deadline: Instant) -> Result<Vec<Arc<Peer>>> {
    let fail = |message: String| Error::Collective { op: "watch", message };
    listener.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
    let mut peers: Vec<Option<Arc<Peer>>> = (0..world_size).map(|_| None).collect();
    while peers.iter().skip(1).any(Option::is_none) {
        match listener.accept() {
            Ok((mut stream, from)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let hello = match read_frame(&mut stream) {
                    Ok((HELLO, payload)) if payload.len() == 16 => payload,
                    // Not one of ours (a stray connection): ignored.
                    _ => continue,
                };
                let their_nonce = u64::from_le_bytes(hello[..8].try_into().unwrap_or_default());
                let rank = u64::from_le_bytes(hello[8..].try_into().unwrap_or_default()) as usize;
                if their_nonce != nonce {
                    continue;
                }
                if rank == 0 || rank >= world_size || peers[rank].is_some() {
                    return Err(fail(format!(
                        "{from} claims rank {rank} of {world_size}, which is rank 0 or taken: two ranks share a \
                         rank number"
                    )));
                }
                let _ = stream.set_nodelay(true);
                let _ = stream.write_all(&frame(HELLO, &nonce.to_le_bytes()));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                peers[rank] = Some(Arc::new(Peer { rank, stream: Mutex::new(stream) }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<usize> = (1..world_size).filter(|&r| peers[r].is_none()).collect();
                    return Err(fail(format!(
                        "rank(s) {} did not connect within {} s",
                        rank_list(&missing),
                        crate::CONNECT_TIMEOUT.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(fail(format!("accepting: {e}"))),
        }
    }
    Ok(peers.into_iter().flatten().collect())
}

/// A rank other than 0: the first of rank 0's addresses where rank 0's listener answers.
fn connect_to_leader(addresses: &str, port: u16, nonce: u64, rank: usize, deadline: Instant) -> Result<Arc<Peer>> {
    let candidates: Vec<SocketAddr> =
        addresses.split(',').filter_map(|a| a.parse::<IpAddr>().ok()).map(|ip| SocketAddr::new(ip, port)).collect();
    let mut hello = nonce.to_le_bytes().to_vec();
    hello.extend((rank as u64).to_le_bytes());
    let mut last_error = String::from("no address");
    while Instant::now() < deadline {
        for address in &candidates {
            let attempt = (|| -> std::io::Result<TcpStream> {
                let mut stream = TcpStream::connect_timeout(address, Duration::from_secs(2))?;
                stream.set_nodelay(true)?;
                stream.set_write_timeout(Some(Duration::from_secs(5)))?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                stream.write_all(&frame(HELLO, &hello))?;
                match read_frame(&mut stream)? {
                    (HELLO, payload) if payload == nonce.to_le_bytes() => Ok(stream),
                    _ => Err(std::io::Error::other("another program answered")),
                }
            })();
            match attempt {
                Ok(stream) => return Ok(Arc::new(Peer { rank: 0, stream: Mutex::new(stream) })),
                Err(e) => last_error = format!("{address}: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(Error::Collective {
        op: "watch",
        message: format!("rank {rank} cannot reach rank 0 at any of {addresses} (port {port}); last: {last_error}"),
    })
}

/// Writes a heartbeat to every connection each interval until the rank finishes.
fn heartbeat(shared: &Shared, peers: &[Arc<Peer>]) {
    let beat = frame(HEARTBEAT, &[]);
    while !shared.finishing.load(Ordering::SeqCst) {
        for peer in peers {
            if let Ok(mut stream) = peer.stream.lock() {
                // A failed write shows as silence or a closed connection on the reading side.
                let _ = stream.write_all(&beat);
            }
        }
        std::thread::sleep(HEARTBEAT_INTERVAL);
    }
}

/// Reads one peer's frames until it says goodbye; silence or a closed connection is a loss.
fn listen(
    mut stream: TcpStream,
    from: usize,
    shared: &Shared,
    peers: &[Arc<Peer>],
    handler: Option<&Mutex<MessageHandler>>,
) {
    loop {
        match read_frame(&mut stream) {
            Ok((HEARTBEAT, _)) => {}
            Ok((MESSAGE, payload)) => {
                if let Some(handler) = handler {
                    if let Ok(mut handle) = handler.lock() {
                        handle(from, payload);
                    }
                }
            }
            Ok((BYE, _)) => {
                if let Ok(mut finished) = shared.finished.lock() {
                    finished.push(from);
                }
                return;
            }
            Ok((LOST, payload)) => {
                // Rank 0 names the ranks it lost.
                let named = String::from_utf8_lossy(&payload).into_owned();
                let ranks: Vec<usize> = named.split(',').filter_map(|r| r.parse().ok()).collect();
                lose(shared, peers, &ranks, "rank 0 lost contact with it", Duration::ZERO);
            }
            Ok((kind, _)) => {
                lose(shared, peers, &[from], &format!("it sent a frame of unknown kind {kind}"), Duration::ZERO)
            }
            Err(_) if shared.finishing.load(Ordering::SeqCst) => return,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                let reason = format!("no heartbeat for {} s (its host is unreachable?)", shared.timeout.as_secs());
                // The ranks of one host fall silent within a heartbeat of each other.
                lose(shared, peers, &[from], &reason, HEARTBEAT_INTERVAL + HEARTBEAT_INTERVAL / 2);
            }
            Err(e) => {
                let reason = format!("its connection closed ({e}): the process ended");
                lose(shared, peers, &[from], &reason, Duration::from_millis(200))
            }
        }
    }
}

/// Reports lost ranks and ends this process. Rank 0 first gathers the losses found within `gather`
/// (the ranks of one host fail together), then tells every rank it still reaches.
fn lose(shared: &Shared, peers: &[Arc<Peer>], ranks: &[usize], reason: &str, gather: Duration) {
    if let Ok(mut lost) = shared.lost.lock() {
        for &rank in ranks {
            if !lost.contains(&rank) {
                lost.push(rank);
            }
        }
    }
    if shared.reporting.swap(true, Ordering::SeqCst) {
        return;
    }
    if shared.rank == 0 {
        std::thread::sleep(gather);
    }
    let mut lost = shared.lost.lock().map(|l| l.clone()).unwrap_or_default();
    lost.sort_unstable();
    if shared.rank == 0 {
        let finished = shared.finished.lock().map(|f| f.clone()).unwrap_or_default();
        let notice = frame(LOST, rank_list(&lost).replace(' ', "").as_bytes());
        for peer in peers.iter().filter(|p| !lost.contains(&p.rank) && !finished.contains(&p.rank)) {
            if let Ok(mut stream) = peer.stream.lock() {
                let _ = stream.write_all(&notice);
            }
        }
    }
    let message = format!(
        "error: icl, rank {} of {}: lost rank(s) {}: {reason}; ending this rank\n",
        shared.rank,
        shared.world_size,
        rank_list(&lost)
    );
    let _ = std::io::stderr().lock().write_all(message.as_bytes());
    if shared.rank == 0 {
        // The others print their own notice before the launcher tears the job down.
        std::thread::sleep(Duration::from_millis(500));
    }
    // SAFETY: ends the process without running exit handlers: the main thread may be blocked inside
    // MPI or libtorch, whose teardown would wait for it.
    unsafe { libc::_exit(1) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ThreadRanks;

    #[test]
    fn addresses_end_with_loopback() {
        let addresses = local_addresses();
        assert!(addresses.last().unwrap().is_loopback(), "{addresses:?}");
    }

    #[test]
    fn messages_reach_rank_0_and_finishing_is_no_loss() {
        let (sender, received) = std::sync::mpsc::channel();
        let sender = Mutex::new(sender);
        let handler: MessageHandler = Box::new(move |rank, payload| {
            let _ = sender.lock().unwrap().send((rank, payload));
        });
        let mut handler = Some(handler);
        let threads: Vec<_> = ThreadRanks::group(3)
            .into_iter()
            .map(|c| {
                let on_message = if c.rank() == 0 { handler.take() } else { None };
                std::thread::spawn(move || {
                    let watch = Watch::start(&c, Duration::from_secs(10), on_message).unwrap();
                    if c.rank() > 0 {
                        watch.send_to_leader(format!("from {}", c.rank()).as_bytes()).unwrap();
                    } else {
                        assert!(watch.send_to_leader(b"self").is_err());
                    }
                    // Past a few heartbeats, then an orderly end.
                    std::thread::sleep(HEARTBEAT_INTERVAL * 2);
                    c.barrier().unwrap();
                    watch.finish();
                    c.barrier().unwrap();
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let mut got: Vec<(usize, String)> =
            received.try_iter().map(|(r, p)| (r, String::from_utf8(p).unwrap())).collect();
        got.sort();
        assert_eq!(got, vec![(1, "from 1".to_owned()), (2, "from 2".to_owned())]);
    }

    #[test]
    fn frames_round_trip_and_oversized_ones_are_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(&frame(MESSAGE, b"abc")).unwrap();
        assert_eq!(read_frame(&mut server).unwrap(), (MESSAGE, b"abc".to_vec()));
        let mut huge = vec![MESSAGE];
        huge.extend((MAX_FRAME + 1).to_le_bytes());
        client.write_all(&huge).unwrap();
        assert!(read_frame(&mut server).unwrap_err().to_string().contains("claims"));
    }
}
