//! The ranks of a data-parallel run and the one collective operation they need: a summing
//! all-reduce that gives every rank the same bits. Ranks are threads of one process
//! ([`ThreadGroup`], for tests) or processes launched as PyTorch launches its workers
//! ([`TcpGroup::from_env`]: `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::infra::error::{Error, Result};

/// How long a rank waits for the others in one collective call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// The group's timeout (`--ddp_timeout`).
    Timeout,
    /// As long as it takes (waiting for the main rank to prepare the dataset).
    Unlimited,
}

/// A group of ranks that sum buffers together.
pub trait Collective: Send + Sync {
    /// This rank: 0 is the main one, the one that writes files.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `values` on every rank by their element-wise sum over all ranks, added in rank
    /// order starting from rank 0's values, so that every rank receives the same bits. Every
    /// rank must pass the same number of values.
    fn all_reduce_sum(&self, values: &mut [f32], patience: Patience) -> Result<()>;

    /// [`Collective::all_reduce_sum`] of a 1-D f32 tensor, returned on its device. By default
    /// the values travel through host memory; a group that reduces on the device overrides it.
    fn all_reduce_tensor_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let mut values = tensor.to_vec1::<f32>()?;
        self.all_reduce_sum(&mut values, Patience::Timeout)?;
        Ok(Tensor::from_vec(values, tensor.dims(), tensor.device())?)
    }
}

/// Whether this rank writes the run's files.
pub fn is_main(group: &dyn Collective) -> bool {
    group.rank() == 0
}

/// Waits until every rank reaches this point.
pub fn barrier(group: &dyn Collective, patience: Patience) -> Result<()> {
    group.all_reduce_sum(&mut [0.0], patience)
}

/// Checks that every rank computed the same `fingerprint` (a hash of what it is about to do);
/// `what` names it in the error.
pub fn check_agreement(group: &dyn Collective, what: &str, fingerprint: [u8; 8]) -> Result<()> {
    // Bytes and their squares sum to size·b and size·b² on every byte only when all ranks hold
    // the same bytes (the variance is zero); both sums are exact in f32.
    let mut values: Vec<f32> = fingerprint.iter().map(|&b| b as f32).collect();
    values.extend(fingerprint.iter().map(|&b| (b as f32) * (b as f32)));
    let own = values.clone();
    group.all_reduce_sum(&mut values, Patience::Timeout)?;
    let size = group.world_size() as f32;
    if values
        .iter()
        .zip(&own)
        .all(|(sum, mine)| *sum == size * mine)
    {
        Ok(())
    } else {
        Err(Error::Group(format!(
            "the {} ranks differ in {what}: every rank must run the same command line on the \
             same files",
            group.world_size()
        )))
    }
}

/// Rank 0's `bytes`, on every rank.
pub fn broadcast_from_main(group: &dyn Collective, bytes: [u8; 8]) -> Result<[u8; 8]> {
    let mut values: Vec<f32> = match is_main(group) {
        true => bytes.iter().map(|&b| b as f32).collect(),
        false => vec![0.0; 8],
    };
    group.all_reduce_sum(&mut values, Patience::Timeout)?;
    Ok(std::array::from_fn(|i| values[i] as u8))
}

/// This rank's place among the ranks of its machine (`LOCAL_RANK`, 0 without it): the GPU it
/// trains on.
pub fn local_rank() -> usize {
    std::env::var("LOCAL_RANK")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// With several ranks on one machine (`LOCAL_WORLD_SIZE`), each computes on its share of the
/// cores unless `RAYON_NUM_THREADS` says otherwise.
fn share_cores_with_local_ranks() {
    let local_ranks: usize = std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1);
    if local_ranks <= 1 || std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / local_ranks).max(1);
    // candle reads the variable; rayon's global pool is built from it on first use.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    tracing::info!("{local_ranks} ranks on this machine: {threads} threads each");
}

/// A run of one rank: every collective call returns its values unchanged.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _values: &mut [f32], _patience: Patience) -> Result<()> {
        Ok(())
    }
}

/// Ranks as threads of one process, sharing memory.
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<SharedRound>,
}

struct SharedRound {
    size: usize,
    timeout: Duration,
    state: Mutex<RoundState>,
    done: Condvar,
}

struct RoundState {
    contributions: Vec<Option<Vec<f32>>>,
    arrived: usize,
    round: u64,
    result: std::result::Result<Arc<Vec<f32>>, String>,
    departed: Option<usize>,
}

impl ThreadGroup {
    /// One handle per rank, `size` in all; a rank's handle goes to the thread that runs it.
    /// A rank that waits longer than `timeout` for the others fails.
    pub fn new(size: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared = Arc::new(SharedRound {
            size,
            timeout,
            state: Mutex::new(RoundState {
                contributions: vec![None; size],
                arrived: 0,
                round: 0,
                result: Ok(Arc::new(Vec::new())),
                departed: None,
            }),
            done: Condvar::new(),
        });
        (0..size)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, values: &mut [f32], patience: Patience) -> Result<()> {
        let shared = &self.shared;
        let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rank) = state.departed {
            return Err(departed(rank));
        }
        state.contributions[self.rank] = Some(values.to_vec());
        state.arrived += 1;
        let round = state.round;
        if state.arrived == shared.size {
            let contributions: Vec<Vec<f32>> = (state.contributions.iter_mut())
                .filter_map(Option::take)
                .collect();
            state.result = sum_in_rank_order(contributions).map(Arc::new);
            state.arrived = 0;
            state.round += 1;
            shared.done.notify_all();
        } else {
            let started = Instant::now();
            while state.round == round && state.departed.is_none() {
                let waited = started.elapsed();
                let left = match patience {
                    Patience::Timeout if waited >= shared.timeout => {
                        return Err(Error::Group(format!(
                            "rank {}: the other ranks did not answer within {} s",
                            self.rank,
                            shared.timeout.as_secs()
                        )))
                    }
                    Patience::Timeout => shared.timeout - waited,
                    Patience::Unlimited => Duration::from_secs(3600),
                };
                state = (shared.done.wait_timeout(state, left))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if state.round == round {
                return Err(departed(state.departed.unwrap_or(0)));
            }
        }
        let result = state.result.clone().map_err(Error::Group)?;
        values.copy_from_slice(&result);
        Ok(())
    }
}

impl Drop for ThreadGroup {
    /// A rank that ends (or fails) leaves the group: ranks still waiting for it fail.
    fn drop(&mut self) {
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        state.departed.get_or_insert(self.rank);
        self.shared.done.notify_all();
    }
}

fn departed(rank: usize) -> Error {
    Error::Group(format!(
        "rank {rank} left the run (it stopped or failed; its own message says why)"
    ))
}

/// Rank 0's values plus each other rank's, in rank order.
fn sum_in_rank_order(contributions: Vec<Vec<f32>>) -> std::result::Result<Vec<f32>, String> {
    let mut ranks = contributions.into_iter();
    let mut sum = ranks.next().unwrap_or_default();
    for (offset, values) in ranks.enumerate() {
        if values.len() != sum.len() {
            return Err(format!(
                "rank {} sent {} values where rank 0 sent {}: the ranks run different \
                 networks or command lines",
                offset + 1,
                values.len(),
                sum.len()
            ));
        }
        for (total, value) in sum.iter_mut().zip(values) {
            *total += value;
        }
    }
    Ok(sum)
}

/// Ranks as processes, on one machine or several, joined over TCP: the main rank listens, the
/// others connect to it; sums are added on the main rank and sent back.
pub struct TcpGroup {
    rank: usize,
    size: usize,
    timeout: Duration,
    links: Links,
}

enum Links {
    /// The main rank's connections to ranks 1, 2, ...
    Main(Vec<TcpStream>),
    /// Another rank's connection to the main rank.
    Member(TcpStream),
}

/// First bytes of every connection: "lorakit data-parallel", version 1.
const HELLO: [u8; 8] = *b"LKDP\x00\x00\x00\x01";

impl TcpGroup {
    /// The group a PyTorch-style launcher describes in the environment, or `None` without one
    /// (`WORLD_SIZE` unset or 1): `RANK` of `WORLD_SIZE`, the main rank at `MASTER_ADDR` and
    /// `MASTER_PORT`. Under `torchrun`, whose own store holds `MASTER_PORT`
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`), the group uses the port after it.
    pub fn from_env(timeout: Duration) -> Result<Option<TcpGroup>> {
        let number = |name: &str| -> Result<Option<usize>> {
            match std::env::var(name) {
                Ok(text) => text.trim().parse().map(Some).map_err(|_| {
                    Error::Usage(format!("{name}={text}: a whole number is expected"))
                }),
                Err(_) => Ok(None),
            }
        };
        let size = number("WORLD_SIZE")?.unwrap_or(1);
        if size <= 1 {
            return Ok(None);
        }
        let rank = number("RANK")?
            .ok_or_else(|| Error::Usage(format!("WORLD_SIZE={size} is set but RANK is not")))?;
        let port = number("MASTER_PORT")?
            .ok_or_else(|| Error::Usage(format!("WORLD_SIZE={size}: MASTER_PORT is not set")))?;
        let host = std::env::var("MASTER_ADDR")
            .map_err(|_| Error::Usage(format!("WORLD_SIZE={size}: MASTER_ADDR is not set")))?;
        let torchrun_store = std::env::var("TORCHELASTIC_USE_AGENT_STORE")
            .is_ok_and(|v| v.eq_ignore_ascii_case("true"));
        let port = if torchrun_store { port + 1 } else { port };
        let port = u16::try_from(port)
            .map_err(|_| Error::Usage(format!("MASTER_PORT {port}: not a TCP port")))?;
        share_cores_with_local_ranks();
        TcpGroup::join(rank, size, &host, port, timeout).map(Some)
    }

    /// Joins rank `rank` of `size` to the group whose main rank listens on `host:port`
    /// (rank 0 listens there itself); waits up to `timeout` for the others.
    pub fn join(
        rank: usize,
        size: usize,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpGroup> {
        if rank >= size {
            return Err(Error::Usage(format!(
                "RANK {rank} of WORLD_SIZE {size}: ranks are 0 to {}",
                size - 1
            )));
        }
        let address = (host, port)
            .to_socket_addrs()
            .map_err(|e| Error::Usage(format!("MASTER_ADDR {host}:{port}: {e}")))?
            .next()
            .ok_or_else(|| Error::Usage(format!("MASTER_ADDR {host}: no address")))?;
        let deadline = Instant::now() + timeout;
        let links = if rank == 0 {
            let listener = TcpListener::bind(address)
                .map_err(|e| Error::Group(format!("rank 0 cannot listen on {address}: {e}")))?;
            Links::Main(accept_ranks(&listener, size, deadline, timeout)?)
        } else {
            Links::Member(connect_to_main(rank, size, address, deadline, timeout)?)
        };
        tracing::info!("data-parallel: rank {rank} of {size} joined (main rank at {address})");
        Ok(TcpGroup {
            rank,
            size,
            timeout,
            links,
        })
    }

    fn patience(&self, patience: Patience) -> Option<Duration> {
        match patience {
            Patience::Timeout => Some(self.timeout),
            Patience::Unlimited => None,
        }
    }
}

/// The main rank accepts one connection per other rank, each introducing itself.
fn accept_ranks(
    listener: &TcpListener,
    size: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<TcpStream>> {
    let failed = |e: std::io::Error| Error::Group(format!("rank 0: {e}"));
    listener.set_nonblocking(true).map_err(failed)?;
    let mut links: Vec<Option<TcpStream>> = (1..size).map(|_| None).collect();
    while links.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(failed)?;
                stream.set_nodelay(true).map_err(failed)?;
                stream.set_read_timeout(Some(timeout)).map_err(failed)?;
                let (rank, their_size) = read_hello(&stream).map_err(failed)?;
                if their_size != size || rank == 0 || rank >= size {
                    return Err(Error::Group(format!(
                        "rank 0: a process introduced itself as rank {rank} of {their_size}, \
                         this group has {size} ranks"
                    )));
                }
                if links[rank - 1].replace(stream).is_some() {
                    return Err(Error::Group(format!(
                        "rank 0: two processes claim rank {rank}; check RANK"
                    )));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (links.iter().enumerate())
                        .filter(|(_, link)| link.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    return Err(Error::Group(format!(
                        "rank 0: ranks {} did not connect within {} s",
                        missing.join(", "),
                        timeout.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(failed(e)),
        }
    }
    let links: Vec<TcpStream> = links.into_iter().flatten().collect();
    for link in &links {
        (&*link).write_all(&HELLO).map_err(failed)?;
    }
    Ok(links)
}

/// Another rank connects to the main rank (retrying until it listens) and introduces itself.
fn connect_to_main(
    rank: usize,
    size: usize,
    address: std::net::SocketAddr,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream> {
    let stream = loop {
        match TcpStream::connect_timeout(&address, Duration::from_secs(5)) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::Group(format!(
                    "rank {rank}: cannot reach the main rank at {address} within {} s: {e}",
                    timeout.as_secs()
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let failed = |e: std::io::Error| Error::Group(format!("rank {rank}: {e}"));
    stream.set_nodelay(true).map_err(failed)?;
    stream.set_read_timeout(Some(timeout)).map_err(failed)?;
    let mut hello = HELLO.to_vec();
    hello.extend((rank as u64).to_le_bytes());
    hello.extend((size as u64).to_le_bytes());
    (&stream).write_all(&hello).map_err(failed)?;
    let mut answer = [0u8; 8];
    (&stream).read_exact(&mut answer).map_err(failed)?;
    if answer != HELLO {
        return Err(Error::Group(format!(
            "rank {rank}: {address} is not the main rank of a lorakit run"
        )));
    }
    Ok(stream)
}

fn read_hello(mut stream: &TcpStream) -> std::io::Result<(usize, usize)> {
    let mut bytes = [0u8; 24];
    stream.read_exact(&mut bytes)?;
    if bytes[..8] != HELLO {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            "a connection that is not a lorakit rank",
        ));
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
    Ok((word(8), word(16)))
}

fn send_values(mut stream: &TcpStream, values: &[f32]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(8 + 4 * values.len());
    bytes.extend((values.len() as u64).to_le_bytes());
    for value in values {
        bytes.extend(value.to_le_bytes());
    }
    stream.write_all(&bytes)
}

fn receive_values(mut stream: &TcpStream) -> std::io::Result<Vec<f32>> {
    let mut count = [0u8; 8];
    stream.read_exact(&mut count)?;
    let count = u64::from_le_bytes(count) as usize;
    let mut bytes = vec![0u8; 4 * count];
    stream.read_exact(&mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect())
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, values: &mut [f32], patience: Patience) -> Result<()> {
        let wait = self.patience(patience);
        let lost = |peer: usize, e: std::io::Error| {
            let reason = match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
                    "no answer within {} s (--ddp_timeout)",
                    self.timeout.as_secs()
                ),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
                    "it left the run (it stopped or failed; its own message says why)".into()
                }
                _ => e.to_string(),
            };
            Error::Group(format!("rank {}: rank {peer}: {reason}", self.rank))
        };
        match &self.links {
            Links::Member(main) => {
                main.set_read_timeout(wait).map_err(|e| lost(0, e))?;
                send_values(main, values).map_err(|e| lost(0, e))?;
                let sum = receive_values(main).map_err(|e| lost(0, e))?;
                if sum.len() != values.len() {
                    return Err(Error::Group(format!(
                        "rank {}: the main rank summed {} values where this rank sent {}: the \
                         ranks run different networks or command lines",
                        self.rank,
                        sum.len(),
                        values.len()
                    )));
                }
                values.copy_from_slice(&sum);
            }
            Links::Main(links) => {
                let mut contributions = vec![values.to_vec()];
                for (offset, link) in links.iter().enumerate() {
                    link.set_read_timeout(wait)
                        .map_err(|e| lost(offset + 1, e))?;
                    contributions.push(receive_values(link).map_err(|e| lost(offset + 1, e))?);
                }
                let sum = sum_in_rank_order(contributions).map_err(Error::Group)?;
                for (offset, link) in links.iter().enumerate() {
                    send_values(link, &sum).map_err(|e| lost(offset + 1, e))?;
                }
                values.copy_from_slice(&sum);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contributions(rank: usize) -> Vec<f32> {
        vec![0.1 * (rank + 1) as f32, -(rank as f32), 1e-8, 3.0]
    }

    fn expected(size: usize) -> Vec<f32> {
        sum_in_rank_order((0..size).map(contributions).collect()).unwrap()
    }

    /// Every rank of `groups` sums its contribution twice (two rounds) on its own thread.
    fn run_ranks<G: Collective + 'static>(groups: Vec<G>) -> Vec<Result<Vec<f32>>> {
        let threads: Vec<_> = groups
            .into_iter()
            .map(|group| {
                std::thread::spawn(move || {
                    let mut values = contributions(group.rank());
                    group.all_reduce_sum(&mut values, Patience::Timeout)?;
                    let mut again = contributions(group.rank());
                    group.all_reduce_sum(&mut again, Patience::Timeout)?;
                    assert_eq!(values, again);
                    Ok(values)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    #[test]
    fn thread_ranks_receive_the_same_sum_in_rank_order() {
        let results = run_ranks(ThreadGroup::new(3, Duration::from_secs(20)));
        for result in results {
            assert_eq!(result.unwrap(), expected(3));
        }
        // Rank 0 alone gets its values back bit for bit.
        let single = run_ranks(ThreadGroup::new(1, Duration::from_secs(1)));
        assert_eq!(single[0].as_ref().unwrap(), &contributions(0));
    }

    #[test]
    fn tcp_ranks_receive_the_same_sum_in_rank_order() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let joins: Vec<_> = (0..3)
            .rev()
            .map(|rank| {
                std::thread::spawn(move || {
                    TcpGroup::join(rank, 3, "127.0.0.1", port, Duration::from_secs(20)).unwrap()
                })
            })
            .collect();
        let groups: Vec<TcpGroup> = joins.into_iter().map(|t| t.join().unwrap()).collect();
        for result in run_ranks(groups) {
            assert_eq!(result.unwrap(), expected(3));
        }
    }

    #[test]
    fn a_rank_that_leaves_or_differs_fails_the_others_with_a_message() {
        let mut groups = ThreadGroup::new(2, Duration::from_secs(20));
        drop(groups.pop());
        let error = groups[0]
            .all_reduce_sum(&mut [1.0], Patience::Timeout)
            .unwrap_err();
        assert!(error.to_string().contains("rank 1 left the run"), "{error}");

        let groups = ThreadGroup::new(2, Duration::from_secs(20));
        let threads: Vec<_> = groups
            .into_iter()
            .map(|group| {
                std::thread::spawn(move || {
                    let fingerprint = [group.rank() as u8 * 2; 8];
                    check_agreement(&group, "the dataset", [1; 8])?;
                    check_agreement(&group, "the dataset", fingerprint)
                })
            })
            .collect();
        for thread in threads {
            let error = thread.join().unwrap().unwrap_err();
            assert!(
                error.to_string().contains("differ in the dataset"),
                "{error}"
            );
        }

        let groups = ThreadGroup::new(2, Duration::from_millis(200));
        let error = groups[0]
            .all_reduce_sum(&mut [1.0], Patience::Timeout)
            .unwrap_err();
        assert!(error.to_string().contains("did not answer"), "{error}");
    }
}
