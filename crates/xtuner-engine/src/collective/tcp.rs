//! The collective between processes, over TCP: ranks on one machine or many (the CPU
//! backend's multi-process and multi-node runs, and the rendezvous that hands NCCL its
//! id). Rank 0 listens at `ADDR:PORT`; the others connect, say their rank, and are
//! answered once all have arrived. Every operation is one round through rank 0: each
//! rank sends its contribution; rank 0 takes them in rank order, computes each rank's
//! result (sums in rank order, as [`super::local::Local`] does) and sends it back. A
//! rank that does not arrive, answer or stay connected within the timeout fails the
//! operation with an error naming it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Collective, shard_range};
use crate::{Error, Result};

/// Protocol magic of the hello frame.
const HELLO: &[u8; 8] = b"XTNRDV01";

/// One rank of a TCP group.
#[derive(Debug)]
pub struct Tcp {
    rank: usize,
    world: usize,
    /// Rank 0: the stream of each other rank (index r - 1); others: the one to rank 0.
    peers: Mutex<Vec<TcpStream>>,
}

fn fail(message: String) -> Error {
    Error::Collective(message)
}

/// The first address `addr` resolves to.
fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| {
            fail(format!(
                "cannot resolve the rendezvous address `{addr}`: {e}"
            ))
        })?
        .next()
        .ok_or_else(|| {
            fail(format!(
                "the rendezvous address `{addr}` resolves to nothing"
            ))
        })
}

fn write_frame(stream: &mut TcpStream, op: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; 9];
    header[0] = op;
    header[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&header)?;
    stream.write_all(payload)?;
    stream.flush()
}

fn read_frame(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 9];
    stream.read_exact(&mut header)?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[1..]);
    let len = usize::try_from(u64::from_le_bytes(len))
        .map_err(|_| std::io::Error::other("frame too large"))?;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    Ok((header[0], payload))
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f64_bytes(data: &[f64]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f64s(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            f64::from_le_bytes(b)
        })
        .collect()
}

/// Element-wise sum of `f32` buckets in rank order (the first rank's copied).
fn sum_f32(all: &[Vec<u8>]) -> Vec<f32> {
    let mut out = f32s(&all[0]);
    for bucket in &all[1..] {
        out.iter_mut().zip(f32s(bucket)).for_each(|(o, x)| *o += x);
    }
    out
}

impl Tcp {
    /// Joins the group of `world` ranks meeting at `addr` (rank 0 listens there), each
    /// step of the rendezvous and every later operation bounded by `timeout`.
    ///
    /// # Errors
    /// An address that cannot be bound or reached, ranks that do not arrive in time
    /// (named), or a peer that speaks another protocol or claims a taken rank.
    pub fn connect(rank: usize, world: usize, addr: &str, timeout: Duration) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(fail(format!("rank {rank} is not one of {world} ranks")));
        }
        let addr = resolve(addr)?;
        let peers = if rank == 0 {
            Self::accept(world, addr, timeout)?
        } else {
            vec![Self::join(rank, world, addr, timeout)?]
        };
        for stream in &peers {
            stream
                .set_read_timeout(Some(timeout))
                .and_then(|()| stream.set_write_timeout(Some(timeout)))
                .and_then(|()| stream.set_nodelay(true))
                .map_err(|e| fail(format!("rendezvous at {addr}: {e}")))?;
        }
        Ok(Self {
            rank,
            world,
            peers: Mutex::new(peers),
        })
    }

    /// Rank 0: waits for ranks 1..world and answers them once all are there.
    fn accept(world: usize, addr: SocketAddr, timeout: Duration) -> Result<Vec<TcpStream>> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| fail(format!("rank 0 cannot listen at {addr}: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(format!("rank 0 at {addr}: {e}")))?;
        let deadline = Instant::now() + timeout;
        let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .and_then(|()| stream.set_read_timeout(Some(timeout)))
                        .map_err(|e| fail(format!("rank 0 at {addr}: {e}")))?;
                    let (_, hello) = read_frame(&mut stream).map_err(|e| {
                        fail(format!(
                            "rendezvous at {addr}: a peer did not say hello: {e}"
                        ))
                    })?;
                    let (rank, their_world) = parse_hello(&hello).ok_or_else(|| {
                        fail(format!(
                            "rendezvous at {addr}: a peer speaks another protocol"
                        ))
                    })?;
                    if their_world != world || rank == 0 || rank >= world {
                        return Err(fail(format!(
                            "rendezvous at {addr}: a peer is rank {rank} of {their_world}, this group has {world} ranks"
                        )));
                    }
                    if slots[rank - 1].is_some() {
                        return Err(fail(format!(
                            "rendezvous at {addr}: rank {rank} joined twice"
                        )));
                    }
                    slots[rank - 1] = Some(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = slots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        return Err(fail(format!(
                            "rendezvous at {addr}: rank(s) {} of {world} did not join within {timeout:?}",
                            missing.join(", ")
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(fail(format!("rank 0 at {addr}: {e}"))),
            }
        }
        let mut peers: Vec<TcpStream> = slots.into_iter().flatten().collect();
        for (i, stream) in peers.iter_mut().enumerate() {
            write_frame(stream, b'W', &hello(0, world))
                .map_err(|e| fail(format!("rendezvous at {addr}: rank {}: {e}", i + 1)))?;
        }
        Ok(peers)
    }

    /// Ranks 1..: connects to rank 0 (retrying until it listens) and waits for the
    /// group to be complete.
    fn join(rank: usize, world: usize, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() >= deadline => {
                    return Err(fail(format!(
                        "rank {rank}: rank 0 did not answer at {addr} within {timeout:?} ({e})"
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| fail(format!("rank {rank} at {addr}: {e}")))?;
        write_frame(&mut stream, b'H', &hello(rank, world))
            .map_err(|e| fail(format!("rank {rank} at {addr}: {e}")))?;
        match read_frame(&mut stream) {
            Ok((b'W', payload)) if parse_hello(&payload) == Some((0, world)) => Ok(stream),
            Ok(_) => Err(fail(format!(
                "rank {rank}: rank 0 at {addr} answered out of protocol"
            ))),
            Err(e) => Err(fail(format!(
                "rank {rank}: the group at {addr} was not complete within {timeout:?} ({e})"
            ))),
        }
    }

    /// One round: every rank's `mine`, gathered at rank 0 in rank order; `reply` gives
    /// rank r's result from all of them.
    fn round(
        &self,
        op: u8,
        name: &str,
        mine: Vec<u8>,
        reply: impl Fn(&[Vec<u8>], usize) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.rank != 0 {
            let stream = &mut peers[0];
            write_frame(stream, op, &mine)
                .map_err(|e| fail(format!("{name}: rank {} lost rank 0: {e}", self.rank)))?;
            return match read_frame(stream) {
                Ok((b'E', message)) => Err(fail(String::from_utf8_lossy(&message).into_owned())),
                Ok((tag, payload)) if tag == op => Ok(payload),
                Ok(_) => Err(fail(format!("{name}: rank 0 answered another operation"))),
                Err(e) => Err(fail(format!(
                    "{name}: rank {} had no answer from rank 0: {e}",
                    self.rank
                ))),
            };
        }
        let mut all = Vec::with_capacity(self.world);
        all.push(mine);
        let mut failure = None;
        for (i, stream) in peers.iter_mut().enumerate() {
            match read_frame(stream) {
                Ok((tag, payload)) if tag == op => all.push(payload),
                Ok(_) => {
                    failure
                        .get_or_insert(format!("{name}: rank {} is at another operation", i + 1));
                    all.push(Vec::new());
                }
                Err(e) => {
                    failure.get_or_insert(format!(
                        "{name}: rank 0 waited for rank {} of {}: {e}",
                        i + 1,
                        self.world
                    ));
                    all.push(Vec::new());
                }
            }
        }
        let failure = match failure {
            Some(f) => Some(f),
            None => (0..self.world)
                .map(|r| reply(&all, r))
                .collect::<Result<Vec<_>>>()
                .map(|replies| {
                    for (i, stream) in peers.iter_mut().enumerate() {
                        // A rank that cannot be answered finds out at its next read.
                        let _ = write_frame(stream, op, &replies[i + 1]);
                    }
                    replies.into_iter().next()
                })
                .err()
                .map(|e| e.to_string()),
        };
        match failure {
            None => reply(&all, 0),
            Some(message) => {
                for stream in peers.iter_mut() {
                    let _ = write_frame(stream, b'E', message.as_bytes());
                }
                Err(fail(message))
            }
        }
    }

    /// Checks that every contribution has the length of rank 0's.
    fn same_lengths(name: &str, all: &[Vec<u8>]) -> Result<()> {
        match all.iter().position(|c| c.len() != all[0].len()) {
            None => Ok(()),
            Some(r) => Err(fail(format!(
                "{name}: rank {r} sent a bucket that does not match rank 0's"
            ))),
        }
    }
}

fn hello(rank: usize, world: usize) -> Vec<u8> {
    let mut out = HELLO.to_vec();
    out.extend((rank as u64).to_le_bytes());
    out.extend((world as u64).to_le_bytes());
    out
}

fn parse_hello(bytes: &[u8]) -> Option<(usize, usize)> {
    if bytes.len() != 24 || &bytes[..8] != HELLO {
        return None;
    }
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        usize::try_from(u64::from_le_bytes(b)).ok()
    };
    Some((word(8)?, word(16)?))
}

impl Collective for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        // Rank 0 sums once; every rank gets the same bytes.
        let sum = std::sync::OnceLock::new();
        let out = self.round(b'A', "all_reduce", f32_bytes(data), |all, _| {
            Self::same_lengths("all_reduce", all)?;
            Ok(sum.get_or_init(|| f32_bytes(&sum_f32(all))).clone())
        })?;
        data.copy_from_slice(&f32s(&out));
        Ok(())
    }

    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
        let out = self.round(b'D', "all_reduce", f64_bytes(data), |all, _| {
            Self::same_lengths("all_reduce", all)?;
            let mut sum = f64s(&all[0]);
            for bucket in &all[1..] {
                sum.iter_mut().zip(f64s(bucket)).for_each(|(o, x)| *o += x);
            }
            Ok(f64_bytes(&sum))
        })?;
        data.copy_from_slice(&f64s(&out));
        Ok(())
    }

    fn reduce_scatter_sum(&self, data: &[f32]) -> Result<Vec<f32>> {
        let world = self.world;
        let sum = std::sync::OnceLock::new();
        let out = self.round(b'R', "reduce_scatter", f32_bytes(data), |all, r| {
            Self::same_lengths("reduce_scatter", all)?;
            let sum = sum.get_or_init(|| sum_f32(all));
            Ok(f32_bytes(&sum[shard_range(sum.len(), world, r)]))
        })?;
        Ok(f32s(&out))
    }

    fn all_gather(&self, shard: &[f32], len: usize) -> Result<Vec<f32>> {
        let world = self.world;
        if shard.len() != shard_range(len, world, self.rank).len() {
            return Err(fail(format!(
                "all_gather: rank {} holds {} elements of {len}, not its shard",
                self.rank,
                shard.len()
            )));
        }
        let out = self.round(b'G', "all_gather", f32_bytes(shard), |all, _| {
            let gathered: Vec<u8> = all.concat();
            if gathered.len() != 4 * len {
                return Err(fail(format!(
                    "all_gather: the shards make {} elements, not {len}",
                    gathered.len() / 4
                )));
            }
            Ok(gathered)
        })?;
        Ok(f32s(&out))
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
        let world = self.world;
        let out = self.round(b'B', "broadcast", f32_bytes(data), |all, _| {
            Self::same_lengths("broadcast", all)?;
            all.get(root)
                .cloned()
                .ok_or_else(|| fail(format!("broadcast: root {root} is not a rank of {world}")))
        })?;
        data.copy_from_slice(&f32s(&out));
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.round(b'S', "barrier", Vec::new(), |_, _| Ok(Vec::new()))
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A free loopback port.
    fn port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn ranks_meet_and_their_collectives_equal_the_in_process_ones() {
        for world in 1..=3 {
            let addr = format!("127.0.0.1:{}", port());
            let results = std::thread::scope(|s| {
                let handles: Vec<_> = (0..world)
                    .map(|rank| {
                        let addr = addr.clone();
                        s.spawn(move || {
                            let c =
                                Tcp::connect(rank, world, &addr, Duration::from_secs(20)).unwrap();
                            let mut data: Vec<f32> =
                                (0..7).map(|i| (rank * 10 + i) as f32 * 0.25).collect();
                            let shard = c.reduce_scatter_sum(&data).unwrap();
                            let gathered = c.all_gather(&shard, 7).unwrap();
                            c.all_reduce_sum(&mut data).unwrap();
                            let mut stats = [rank as f64, 1.0];
                            c.all_reduce_sum_f64(&mut stats).unwrap();
                            let mut root = vec![rank as f32; 3];
                            c.broadcast(&mut root, world - 1).unwrap();
                            c.barrier().unwrap();
                            (data, gathered, stats, root)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            });
            let sum: Vec<f32> = (0..7)
                .map(|i| (0..world).fold(0.0, |acc, r| acc + (r * 10 + i) as f32 * 0.25))
                .collect();
            for (data, gathered, stats, root) in results {
                assert_eq!(data, sum);
                assert_eq!(gathered, sum);
                assert_eq!(stats, [(0..world).sum::<usize>() as f64, world as f64]);
                assert_eq!(root, vec![(world - 1) as f32; 3]);
            }
        }
    }

    #[test]
    fn a_rank_that_never_joins_is_named() {
        let addr = format!("127.0.0.1:{}", port());
        let joined = std::thread::scope(|s| {
            let one = s.spawn(|| Tcp::connect(1, 3, &addr, Duration::from_millis(500)));
            let zero = Tcp::connect(0, 3, &addr, Duration::from_millis(500));
            (zero.map(|_| ()), one.join().unwrap().map(|_| ()))
        });
        let zero = joined.0.unwrap_err().to_string();
        assert!(zero.contains("rank(s) 2 of 3 did not join"), "{zero}");
        let one = joined.1.unwrap_err().to_string();
        assert!(one.contains("rank 1"), "{one}");
    }
}
