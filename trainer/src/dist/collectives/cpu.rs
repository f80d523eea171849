//! Collectives between processes over TCP, for CPU training and for testing
//! the sharding logic without GPUs.
//!
//! Topology: a full mesh of persistent connections (rank r dials every lower
//! rank and accepts every higher one), set up from addresses published in
//! the rendezvous store. A sub-group from `split` gets its own mesh, so two
//! communicators never share a stream.
//!
//! Algorithms are bandwidth-optimal and deterministic: a reduction splits
//! the buffer into one chunk per rank; every rank sends chunk q to rank q,
//! which combines the contributions strictly in rank order 0..N-1, then
//! every rank sends its reduced chunk to all (an all-gather). Each element is
//! thus reduced once, by one rank, in a fixed order: every rank gets the
//! same bits, and so does the next run. Each rank moves 2(N-1)/N of the
//! buffer, as a ring would, but over N-1 connections at once.
//!
//! Each message is `header (op, sequence number, byte length) | payload`,
//! written with one large `write_all` per peer from a scoped sender thread
//! while the calling thread receives from the peers in rank order. The
//! header catches ranks that call different collectives or pass different
//! sizes. Every socket read and write has the configured timeout. After any
//! failure the communicator tells its healthy peers why (an abort message
//! carrying the failure, so a dead rank is named on every survivor, not
//! only on its direct neighbours) and refuses further use.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Collectives, ReduceOp, check_len, check_root};
use crate::dist::DistError;
use crate::dist::error::{PeerFailure, PeerFailureKind};
use crate::dist::store::Store;
use crate::dist::wire::{Dec, Enc, is_closed, is_timeout, tune};

#[cfg(target_endian = "big")]
compile_error!("the CPU transport sends f32 in native byte order and assumes little-endian hosts");

/// First bytes of a mesh hello, to turn away strays on a listening port.
const MAGIC: u64 = 0x6261_6d62_6164_6973; // "bambadis"

/// Message kinds (the first header field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
enum Kind {
    ReduceScatter = 1,
    AllReduceGather = 2,
    AllGather = 3,
    BroadcastScatter = 4,
    BroadcastGather = 5,
    Bytes = 6,
    Barrier = 7,
    /// A peer gave up; the payload says why.
    Abort = 99,
}

impl Kind {
    fn from_u64(v: u64) -> Option<Kind> {
        use Kind::*;
        [
            ReduceScatter,
            AllReduceGather,
            AllGather,
            BroadcastScatter,
            BroadcastGather,
            Bytes,
            Barrier,
            Abort,
        ]
        .into_iter()
        .find(|k| *k as u64 == v)
    }
}

const HEADER: usize = 24;
/// Largest variable-length message (`all_gather_bytes`, abort reasons) accepted.
const MAX_BYTES_MSG: usize = 1 << 30;
/// Payloads up to this size go out in the same write as their header.
const COALESCE: usize = 64 << 10;
/// Messages up to this size are sent from the calling thread. A peer holds
/// at most two unread messages of ours (we can be one phase ahead of it),
/// and Linux's smallest default receive buffer (tcp_rmem, 128 KiB) holds
/// both with room to spare, so such a write never blocks on the peer.
const INLINE_SEND: usize = 16 << 10;

struct OpState {
    seq: u64,
    poisoned: Option<String>,
    /// Receive buffer of reductions, kept to avoid page faults every step.
    scratch: Vec<f32>,
}

/// A communicator over a TCP full mesh. See the module docs for the protocol.
pub struct CpuCollectives {
    rank: usize,
    size: usize,
    /// Global rank of each member, for error messages people can act on.
    global: Vec<usize>,
    /// One connection per member, `None` at our own index.
    peers: Vec<Option<TcpStream>>,
    timeout: Duration,
    /// Where this process can be reached (for the meshes of sub-groups).
    ip: IpAddr,
    /// Shared by the members; distinguishes the meshes of different splits.
    token: u64,
    /// Held for the whole of each collective: calls from several threads
    /// must not interleave their messages on the shared streams.
    state: Mutex<OpState>,
}

impl CpuCollectives {
    /// Builds the world communicator: publishes a listening address in the
    /// store, reads everyone's, and connects the mesh. `timeout` bounds every
    /// later read and write; `setup_timeout` the wait for slow starters.
    pub fn connect(
        store: &Store,
        ip: IpAddr,
        timeout: Duration,
        setup_timeout: Duration,
    ) -> Result<Self, DistError> {
        let (listener, addr) = listen(ip)?;
        let addrs = store.exchange(
            "cpu-collectives/addrs",
            addr.to_string().as_bytes(),
            setup_timeout,
        )?;
        let addrs = addrs
            .iter()
            .enumerate()
            .map(|(r, a)| parse_addr(r, a))
            .collect::<Result<Vec<_>, _>>()?;
        let global: Vec<usize> = (0..store.world_size()).collect();
        Self::mesh(
            store.rank(),
            global,
            listener,
            &addrs,
            ip,
            timeout,
            setup_timeout,
            "the world",
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn mesh(
        rank: usize,
        global: Vec<usize>,
        listener: TcpListener,
        addrs: &[SocketAddr],
        ip: IpAddr,
        timeout: Duration,
        setup_timeout: Duration,
        what: &str,
    ) -> Result<Self, DistError> {
        let size = global.len();
        let token = fnv(addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
            .as_bytes());
        let mesh_err = |detail: String| DistError::Mesh {
            what: what.into(),
            detail,
        };
        let deadline = Instant::now() + setup_timeout;
        let mut peers: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();

        // Dial the lower ranks; their listeners exist already (the address
        // was published after binding), so the kernel completes the connect
        // from the backlog without waiting for their accept().
        for q in 0..rank {
            let mut s = dial(addrs[q], deadline).map_err(|e| {
                mesh_err(format!(
                    "rank {} cannot connect to rank {} at {}: {e}",
                    global[rank], global[q], addrs[q]
                ))
            })?;
            let hello = Enc::default().u64(MAGIC).u64(token).u64(rank as u64);
            s.write_all(&hello.0)
                .map_err(|e| mesh_err(format!("greeting rank {}: {e}", global[q])))?;
            peers[q] = Some(s);
        }

        // Accept the higher ranks, whatever order they arrive in.
        listener
            .set_nonblocking(true)
            .map_err(|e| mesh_err(format!("listener: {e}")))?;
        let mut waiting = size - rank - 1;
        while waiting > 0 {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let greeting = s
                        .set_nonblocking(false)
                        .and_then(|_| s.set_read_timeout(Some(Duration::from_secs(5))))
                        .and_then(|_| {
                            let mut h = [0u8; 24];
                            s.read_exact(&mut h).map(|_| h)
                        });
                    let Ok(h) = greeting else { continue };
                    let mut d = Dec(&h);
                    let (magic, tok, q) = (d.u64(), d.u64(), d.u64());
                    if let (Ok(MAGIC), Ok(t), Ok(q)) = (magic, tok, q)
                        && t == token
                        && (q as usize) > rank
                        && (q as usize) < size
                        && peers[q as usize].is_none()
                    {
                        peers[q as usize] = Some(s);
                        waiting -= 1;
                    }
                    // Anything else is a stray connection; drop it.
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = (rank + 1..size)
                            .filter(|&q| peers[q].is_none())
                            .map(|q| global[q])
                            .collect();
                        return Err(mesh_err(format!(
                            "rank(s) {missing:?} did not connect to rank {} within {setup_timeout:?}",
                            global[rank]
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(mesh_err(format!("accepting connections: {e}"))),
            }
        }

        for (q, p) in peers.iter().enumerate() {
            if let Some(s) = p {
                tune(s)
                    .and_then(|_| s.set_read_timeout(Some(timeout)))
                    .and_then(|_| s.set_write_timeout(Some(timeout)))
                    .map_err(|e| {
                        mesh_err(format!(
                            "configuring the connection to rank {}: {e}",
                            global[q]
                        ))
                    })?;
            }
        }
        Ok(CpuCollectives {
            rank,
            size,
            global,
            peers,
            timeout,
            ip,
            token,
            state: Mutex::new(OpState {
                seq: 0,
                poisoned: None,
                scratch: Vec::new(),
            }),
        })
    }

    /// The global rank of each member of this communicator, by member rank.
    pub fn global_ranks(&self) -> &[usize] {
        &self.global
    }

    /// Locks the communicator for one collective and numbers it.
    fn begin(&self) -> Result<(MutexGuard<'_, OpState>, u64), DistError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &st.poisoned {
            return Err(DistError::Poisoned(why.clone()));
        }
        st.seq += 1;
        let seq = st.seq;
        Ok((st, seq))
    }

    fn peer(&self, q: usize) -> &TcpStream {
        // Invariant of `mesh`: every index but ours holds a stream.
        self.peers[q]
            .as_ref()
            .expect("mesh has a stream for every peer")
    }

    /// One communication step: sends `sends[i].1` to peer `sends[i].0` on
    /// scoped threads while `body` receives on this thread. Any failure
    /// poisons the communicator and comes back naming every failed peer.
    fn phase<R>(
        &self,
        st: &mut OpState,
        op: &'static str,
        kind: Kind,
        seq: u64,
        sends: &[(usize, &[u8])],
        body: impl FnOnce(&mut Inbox<'_>) -> R,
    ) -> Result<R, DistError> {
        let (result, mut failures) = std::thread::scope(|s| {
            let mut inbox = Inbox {
                comm: self,
                kind,
                seq,
                failures: Vec::new(),
            };
            // Small messages are written inline: they fit in the kernel's
            // socket buffers, so the write cannot wait on the peer reading
            // (which it does only after its own writes). Saves a thread
            // spawn per peer on the many small collectives of a step.
            let (small, large): (Vec<_>, Vec<_>) =
                sends.iter().partition(|(_, d)| d.len() <= INLINE_SEND);
            for &(q, data) in small {
                if let Err(e) = send(self.peer(q), kind, seq, data) {
                    inbox.failures.push(self.failure(q, &e));
                }
            }
            let senders: Vec<_> = large
                .into_iter()
                .map(|&(q, data)| {
                    let stream = self.peer(q);
                    let t = s.spawn(move || send(stream, kind, seq, data));
                    (q, t)
                })
                .collect();
            let result = body(&mut inbox);
            let mut failures = inbox.failures;
            for (q, t) in senders {
                let outcome = t
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("sender thread panicked")));
                if let Err(e) = outcome
                    && !failures
                        .iter()
                        .any(|f: &PeerFailure| f.rank == self.global[q])
                {
                    failures.push(self.failure(q, &e));
                }
            }
            (result, failures)
        });
        if failures.is_empty() {
            return Ok(result);
        }
        failures.sort_by_key(|f| f.rank);
        let err = DistError::Collective { op, seq, failures };
        self.abort(st, seq, &err);
        Err(err)
    }

    /// Records the failure, tells the healthy peers why we stop (so they
    /// name the original cause rather than just us), and closes the streams
    /// so nobody waits on us for a full timeout.
    fn abort(&self, st: &mut OpState, seq: u64, err: &DistError) {
        let why = format!("rank {}: {err}", self.global[self.rank]);
        st.poisoned = Some(err.to_string());
        let failed: Vec<usize> = match err {
            DistError::Collective { failures, .. } => failures.iter().map(|f| f.rank).collect(),
            _ => Vec::new(),
        };
        for (q, p) in self.peers.iter().enumerate() {
            let Some(s) = p else { continue };
            if !failed.contains(&self.global[q]) {
                // Best effort, and short: the stream may be mid-message if a
                // send failed, or the peer may not read any more.
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = send(s, Kind::Abort, seq, why.as_bytes());
            }
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn failure(&self, q: usize, e: &io::Error) -> PeerFailure {
        let kind = if is_timeout(e) {
            PeerFailureKind::TimedOut(self.timeout)
        } else if is_closed(e) {
            PeerFailureKind::Closed(e.to_string())
        } else {
            PeerFailureKind::Other(e.to_string())
        };
        PeerFailure {
            rank: self.global[q],
            kind,
        }
    }

    /// Sends each peer its chunk of `input` and reduces the contributions to
    /// our chunk into `out`, in rank order.
    #[allow(clippy::too_many_arguments)]
    fn reduce_chunks(
        &self,
        st: &mut OpState,
        op_name: &'static str,
        kind: Kind,
        seq: u64,
        input: &[f32],
        chunks: &[Range<usize>],
        out: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), DistError> {
        let me = self.rank;
        let sends: Vec<(usize, &[u8])> = (0..self.size)
            .filter(|&q| q != me)
            .map(|q| (q, bytemuck::cast_slice(&input[chunks[q].clone()])))
            .collect();
        let mut scratch = std::mem::take(&mut st.scratch);
        scratch.resize(out.len(), 0.0);
        let own = &input[chunks[me].clone()];
        self.phase(st, op_name, kind, seq, &sends, |inbox| {
            for q in 0..self.size {
                if q == 0 {
                    if me == 0 {
                        out.copy_from_slice(own);
                    } else {
                        inbox.recv(q, bytemuck::cast_slice_mut(out));
                    }
                    continue;
                }
                let contribution: &[f32] = if q == me {
                    own
                } else {
                    inbox.recv(q, bytemuck::cast_slice_mut(&mut scratch[..]));
                    &scratch
                };
                combine(out, contribution, op);
            }
        })?;
        st.scratch = scratch;
        if op == ReduceOp::Avg {
            let n = self.size as f32;
            out.iter_mut().for_each(|x| *x /= n);
        }
        Ok(())
    }

    /// Every member `q` except `skip` receives `parts[p]` from every other
    /// member `p`; we send `mine` to every member except `skip`.
    #[allow(clippy::too_many_arguments)]
    fn gather_chunks(
        &self,
        st: &mut OpState,
        op_name: &'static str,
        kind: Kind,
        seq: u64,
        mine: &[f32],
        parts: Vec<&mut [f32]>,
        skip: Option<usize>,
    ) -> Result<(), DistError> {
        let me = self.rank;
        let sends: Vec<(usize, &[u8])> = (0..self.size)
            .filter(|&q| q != me && Some(q) != skip)
            .map(|q| (q, bytemuck::cast_slice(mine)))
            .collect();
        let receiving = Some(me) != skip;
        self.phase(st, op_name, kind, seq, &sends, |inbox| {
            if !receiving {
                return;
            }
            for (q, part) in parts.into_iter().enumerate() {
                if q != me {
                    inbox.recv(q, bytemuck::cast_slice_mut(part));
                }
            }
        })
    }
}

/// Receives on the calling thread; failures are collected, not returned, so
/// that every peer is still read from and every failed one gets named.
struct Inbox<'a> {
    comm: &'a CpuCollectives,
    kind: Kind,
    seq: u64,
    failures: Vec<PeerFailure>,
}

impl Inbox<'_> {
    /// Reads peer `q`'s message into `dst`, which must be its exact length.
    fn recv(&mut self, q: usize, dst: &mut [u8]) -> bool {
        match self.header(q, Some(dst.len())) {
            Some(_) => match self.comm.peer(q).read_exact(dst) {
                Ok(()) => true,
                Err(e) => {
                    self.failures.push(self.comm.failure(q, &e));
                    false
                }
            },
            None => false,
        }
    }

    /// Reads a message of any length from peer `q`.
    fn recv_vec(&mut self, q: usize) -> Option<Vec<u8>> {
        let len = self.header(q, None)?;
        let mut buf = vec![0u8; len];
        match self.comm.peer(q).read_exact(&mut buf) {
            Ok(()) => Some(buf),
            Err(e) => {
                self.failures.push(self.comm.failure(q, &e));
                None
            }
        }
    }

    /// Reads and checks a header; returns the payload length.
    fn header(&mut self, q: usize, expect_len: Option<usize>) -> Option<usize> {
        let comm = self.comm;
        let mut stream = comm.peer(q);
        let mut h = [0u8; HEADER];
        if let Err(e) = stream.read_exact(&mut h) {
            self.failures.push(comm.failure(q, &e));
            return None;
        }
        let word =
            |i: usize| u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        let (kind, seq, len) = (Kind::from_u64(word(0)), word(1), word(2) as usize);
        let rank = comm.global[q];
        let fail = |kind| PeerFailure { rank, kind };
        if kind == Some(Kind::Abort) && len <= MAX_BYTES_MSG {
            let mut why = vec![0u8; len];
            let reason = match stream.read_exact(&mut why) {
                Ok(()) => String::from_utf8_lossy(&why).into_owned(),
                Err(e) => format!("(reason lost: {e})"),
            };
            self.failures.push(fail(PeerFailureKind::Aborted(reason)));
            return None;
        }
        let expected_len = expect_len.unwrap_or(len);
        if kind != Some(self.kind) || seq != self.seq || len != expected_len || len > MAX_BYTES_MSG
        {
            let sent = match kind {
                Some(k) => format!("{k:?}"),
                None => format!("unknown message kind {}", word(0)),
            };
            self.failures.push(fail(PeerFailureKind::OutOfStep(format!(
                "it sent {sent} #{seq} of {len} bytes while this rank expected {:?} #{} of {expected_len} bytes \
                 (ranks called different collectives, or passed different lengths)",
                self.kind, self.seq
            ))));
            return None;
        }
        Some(len)
    }
}

fn send(mut stream: &TcpStream, kind: Kind, seq: u64, data: &[u8]) -> io::Result<()> {
    let mut head = Vec::with_capacity(HEADER + data.len().min(COALESCE));
    head.extend_from_slice(&(kind as u64).to_le_bytes());
    head.extend_from_slice(&seq.to_le_bytes());
    head.extend_from_slice(&(data.len() as u64).to_le_bytes());
    if data.len() <= COALESCE {
        head.extend_from_slice(data);
        stream.write_all(&head)
    } else {
        stream.write_all(&head)?;
        stream.write_all(data)
    }
}

/// `acc = acc (op) x`, element-wise. Max propagates NaN so that a diverged
/// rank is not hidden by the others.
fn combine(acc: &mut [f32], x: &[f32], op: ReduceOp) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => acc.iter_mut().zip(x).for_each(|(a, b)| *a += b),
        ReduceOp::Max => acc.iter_mut().zip(x).for_each(|(a, &b)| {
            if b > *a || b.is_nan() {
                *a = b
            }
        }),
    }
}

/// Balanced split of `len` elements into `n` contiguous chunks (the first
/// ones shorter by at most one element).
fn chunks(len: usize, n: usize) -> Vec<Range<usize>> {
    (0..n).map(|r| r * len / n..(r + 1) * len / n).collect()
}

/// Splits `buf` into the mutable pieces `ranges` (contiguous, in order).
fn split_mut<'a>(mut buf: &'a mut [f32], ranges: &[Range<usize>]) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(ranges.len());
    let mut at = 0;
    for r in ranges {
        let (piece, rest) = std::mem::take(&mut buf).split_at_mut(r.end - at);
        at = r.end;
        out.push(piece);
        buf = rest;
    }
    out
}

impl Collectives for CpuCollectives {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<(), DistError> {
        if self.size == 1 {
            return Ok(());
        }
        let (mut st, seq) = self.begin()?;
        let ranges = chunks(buf.len(), self.size);
        let mine = ranges[self.rank].clone();
        let mut reduced = vec![0.0f32; mine.len()];
        self.reduce_chunks(
            &mut st,
            "all_reduce",
            Kind::ReduceScatter,
            seq,
            buf,
            &ranges,
            &mut reduced,
            op,
        )?;
        let mut parts = split_mut(buf, &ranges);
        parts[self.rank].copy_from_slice(&reduced);
        parts[self.rank] = &mut [];
        self.gather_chunks(
            &mut st,
            "all_reduce",
            Kind::AllReduceGather,
            seq,
            &reduced,
            parts,
            None,
        )
    }

    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<(), DistError> {
        check_len("all_gather", "out", out.len(), shard.len(), self.size)?;
        let (mut st, seq) = self.begin()?;
        let ranges = chunks(out.len(), self.size);
        let mut parts = split_mut(out, &ranges);
        parts[self.rank].copy_from_slice(shard);
        parts[self.rank] = &mut [];
        self.gather_chunks(
            &mut st,
            "all_gather",
            Kind::AllGather,
            seq,
            shard,
            parts,
            None,
        )
    }

    fn reduce_scatter(
        &self,
        input: &[f32],
        out: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), DistError> {
        check_len("reduce_scatter", "input", input.len(), out.len(), self.size)?;
        if self.size == 1 {
            out.copy_from_slice(input);
            return Ok(());
        }
        let (mut st, seq) = self.begin()?;
        let ranges = chunks(input.len(), self.size);
        self.reduce_chunks(
            &mut st,
            "reduce_scatter",
            Kind::ReduceScatter,
            seq,
            input,
            &ranges,
            out,
            op,
        )
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), DistError> {
        check_root(root, self.size)?;
        if self.size == 1 {
            return Ok(());
        }
        let (mut st, seq) = self.begin()?;
        // Scatter then all-gather, so the root sends the buffer once in
        // total rather than once per rank.
        let ranges = chunks(buf.len(), self.size);
        let me = self.rank;
        let mut parts = split_mut(buf, &ranges);
        if me == root {
            let sends: Vec<(usize, &[u8])> = (0..self.size)
                .filter(|&q| q != me)
                .map(|q| (q, bytemuck::cast_slice(&*parts[q])))
                .collect();
            self.phase(
                &mut st,
                "broadcast",
                Kind::BroadcastScatter,
                seq,
                &sends,
                |_| (),
            )?;
        } else {
            let part = &mut *parts[me];
            self.phase(
                &mut st,
                "broadcast",
                Kind::BroadcastScatter,
                seq,
                &[],
                |inbox| {
                    inbox.recv(root, bytemuck::cast_slice_mut(part));
                },
            )?;
        }
        // The root already holds everything, so it only sends in the gather.
        let mine: &[f32] = std::mem::take(&mut parts[me]) as &mut [f32];
        self.gather_chunks(
            &mut st,
            "broadcast",
            Kind::BroadcastGather,
            seq,
            mine,
            parts,
            Some(root),
        )
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        if self.size == 1 {
            return Ok(vec![mine.to_vec()]);
        }
        let (mut st, seq) = self.begin()?;
        let me = self.rank;
        let sends: Vec<(usize, &[u8])> = (0..self.size)
            .filter(|&q| q != me)
            .map(|q| (q, mine))
            .collect();
        self.phase(
            &mut st,
            "all_gather_bytes",
            Kind::Bytes,
            seq,
            &sends,
            |inbox| {
                (0..self.size)
                    .map(|q| {
                        if q == me {
                            mine.to_vec()
                        } else {
                            inbox.recv_vec(q).unwrap_or_default()
                        }
                    })
                    .collect()
            },
        )
    }

    fn barrier(&self) -> Result<(), DistError> {
        if self.size == 1 {
            return Ok(());
        }
        let (mut st, seq) = self.begin()?;
        let me = self.rank;
        let sends: Vec<(usize, &[u8])> = (0..self.size)
            .filter(|&q| q != me)
            .map(|q| (q, &[][..]))
            .collect();
        self.phase(&mut st, "barrier", Kind::Barrier, seq, &sends, |inbox| {
            for q in (0..self.size).filter(|&q| q != me) {
                inbox.recv(q, &mut []);
            }
        })
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Collectives>, DistError> {
        let (listener, addr) = listen(self.ip)?;
        let mine = Enc::default()
            .u64(color as u64)
            .u64(key as u64)
            .str(&addr.to_string());
        let all = self.all_gather_bytes(&mine.0)?;
        let mut members = Vec::new();
        for (q, bytes) in all.iter().enumerate() {
            let mut d = Dec(bytes);
            let parsed =
                (|| -> io::Result<(u64, u64, String)> { Ok((d.u64()?, d.u64()?, d.str()?)) })();
            let (c, k, a) = parsed.map_err(|e| DistError::Mesh {
                what: "split".into(),
                detail: format!(
                    "rank {} sent a malformed split request: {e}",
                    self.global[q]
                ),
            })?;
            if c == color as u64 {
                members.push((k, q, parse_addr(self.global[q], a.as_bytes())?));
            }
        }
        members.sort_by_key(|&(k, q, _)| (k, q));
        let rank = members
            .iter()
            .position(|&(_, q, _)| q == self.rank)
            .ok_or_else(|| DistError::Mesh {
                what: "split".into(),
                detail: "this rank is missing from its own group".into(),
            })?;
        let global: Vec<usize> = members.iter().map(|&(_, q, _)| self.global[q]).collect();
        let addrs: Vec<SocketAddr> = members.iter().map(|m| m.2).collect();
        let what = format!("the group of color {color} (ranks {global:?})");
        let group = Self::mesh(
            rank,
            global,
            listener,
            &addrs,
            self.ip,
            self.timeout,
            self.timeout,
            &what,
        )?;
        debug_assert_ne!(group.token, self.token);
        Ok(Box::new(group))
    }
}

fn listen(ip: IpAddr) -> Result<(TcpListener, SocketAddr), DistError> {
    // Listen on every interface of the advertised family: the advertised
    // address is just the one peers are told to use.
    let any = match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let listener = TcpListener::bind((any, 0))
        .map_err(|e| DistError::io("opening a port for the CPU collectives", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| DistError::io("reading the collectives' port", e))?
        .port();
    Ok((listener, SocketAddr::new(ip, port)))
}

fn parse_addr(rank: usize, raw: &[u8]) -> Result<SocketAddr, DistError> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| DistError::Mesh {
            what: "the world".into(),
            detail: format!(
                "rank {rank} published an unreadable address {:?}",
                String::from_utf8_lossy(raw)
            ),
        })
}

fn dial(addr: SocketAddr, deadline: Instant) -> io::Result<TcpStream> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(100))) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// FNV-1a: a stable hash (std's `DefaultHasher` may change between builds,
/// and ranks may run different builds until the version check catches it).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_in_order() {
        for len in [0, 1, 5, 7, 100] {
            for n in 1..6 {
                let c = chunks(len, n);
                assert_eq!(c.len(), n);
                assert_eq!(c[0].start, 0);
                assert_eq!(c[n - 1].end, len);
                assert!(c.windows(2).all(|w| w[0].end == w[1].start));
            }
        }
    }

    #[test]
    fn max_propagates_nan() {
        let mut a = [1.0, f32::NAN, 3.0];
        combine(&mut a, &[f32::NAN, 0.0, 4.0], ReduceOp::Max);
        assert!(a[0].is_nan() && a[1].is_nan());
        assert_eq!(a[2], 4.0);
    }
}
