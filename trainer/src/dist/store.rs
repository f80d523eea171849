//! The rendezvous key-value store (the role of torch's TCPStore): rank 0
//! hosts a small TCP server in background threads, every rank (rank 0
//! included) is a client. Ranks use it at start-up to meet: publish their
//! transport addresses, share the NCCL unique id, and check that they all run
//! the same config and binary.
//!
//! Protocol: one TCP connection per client; each message is a frame
//! (`u32 LE length | payload`), the payload an op byte and its fields. The
//! first request names the client's rank (`HELLO`), so the server knows
//! which rank each connection belongs to. A connection that ends without a
//! `BYE` marks its rank dead, and every blocking request then fails at once
//! naming that rank instead of waiting out its timeout: training has no
//! elasticity, so one lost rank ends the job. Blocking requests (`GET`,
//! `WAIT`) are answered by the server when the keys appear, when a rank dies
//! or when their timeout expires; the timeout reply lists the missing keys
//! and the ranks that never connected.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::DistError;
use super::wire::{Dec, Enc, is_closed, read_frame, tune, write_frame};

const OP_HELLO: u8 = 1;
const OP_SET: u8 = 2;
const OP_GET: u8 = 3;
const OP_WAIT: u8 = 4;
const OP_ADD: u8 = 5;
const OP_BYE: u8 = 6;

const R_OK: u8 = 0;
const R_VALUES: u8 = 1;
const R_INT: u8 = 2;
const R_TIMEOUT: u8 = 3;
const R_DEAD: u8 = 4;
const R_ERR: u8 = 5;

/// How long a client waits for the reply to a request that does not block
/// on other ranks, or for a blocking reply past its own timeout. The server
/// answers in microseconds; this only guards against a vanished rank 0.
const REPLY_GRACE: Duration = Duration::from_secs(30);

/// How long a dropped server keeps serving clients that are still busy.
const LINGER: Duration = Duration::from_secs(3);
/// A client idle for this long is taken to have no request coming.
const QUIET: Duration = Duration::from_millis(300);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking server thread cannot leave the map half-written (every
    // update is a single insert), so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct State {
    kv: HashMap<String, Vec<u8>>,
    /// Ranks that ever said HELLO (for "never connected" in timeouts).
    seen: Vec<bool>,
    /// Ranks with a live connection (a rank may connect only once at a time).
    live: Vec<bool>,
    /// Ranks whose connection ended without BYE.
    dead: BTreeSet<usize>,
    /// When each rank's last request arrived, and whether it is blocked in
    /// one now (for the linger of a dropped server).
    last_request: Vec<Instant>,
    blocked: Vec<bool>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    world: usize,
}

/// The server half, run by rank 0. Dropping it stops accepting new
/// connections; connections already open are served until their clients go.
pub struct StoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl StoreServer {
    /// Binds `addr` (port 0 picks a free port) and serves a world of
    /// `world_size` ranks in background threads.
    pub fn start(addr: SocketAddr, world_size: usize) -> Result<Self, DistError> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            DistError::io(
                format!("binding the rendezvous store on {addr} (is MASTER_PORT already in use?)"),
                e,
            )
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| DistError::io("reading the store's bound address", e))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                kv: HashMap::new(),
                seen: vec![false; world_size],
                live: vec![false; world_size],
                dead: BTreeSet::new(),
                last_request: vec![Instant::now(); world_size],
                blocked: vec![false; world_size],
            }),
            changed: Condvar::new(),
            world: world_size,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, shared2) = (stop.clone(), shared.clone());
        let accept = std::thread::Builder::new()
            .name("bamba-store".into())
            .spawn(move || accept_loop(listener, shared2, stop2))
            .map_err(|e| DistError::io("starting the store thread", e))?;
        Ok(StoreServer {
            addr,
            shared,
            stop,
            accept: Some(accept),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Keeps serving, up to `LINGER`, while some client is in the middle of
    /// a request or made one very recently (and so is likely to make the
    /// next of a sequence, like the GET after an exchange's SET). Idle
    /// clients, such as a frozen rank, do not hold it up.
    fn linger(&self) {
        let deadline = Instant::now() + LINGER;
        let mut st = lock(&self.shared.state);
        loop {
            let active = (1..self.shared.world)
                .any(|r| st.live[r] && (st.blocked[r] || st.last_request[r].elapsed() < QUIET));
            let now = Instant::now();
            if !active || now >= deadline {
                return;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, QUIET.min(deadline - now))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits up to `timeout` until every rank but `except` has closed its
    /// connection; false if some are still connected. Rank 0 calls this
    /// before exiting: the process ending would cut off replies that other
    /// ranks are still reading.
    pub fn wait_for_clients_to_leave(&self, except: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        loop {
            if st
                .live
                .iter()
                .enumerate()
                .all(|(r, &live)| r == except || !live)
            {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        // Rank 0 usually drops the server on its way out of the process;
        // give the others a moment to read their last replies (say, of the
        // exchange whose result made every rank fail) before it goes.
        self.linger();
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
                SocketAddr::V6(_) => IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
            });
        }
        if TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok()
            && let Some(t) = self.accept.take()
        {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else { continue };
        let shared = shared.clone();
        // One thread per client: requests block on other ranks' keys, and a
        // job has at most a few thousand ranks.
        let _ = std::thread::Builder::new()
            .name("bamba-store-conn".into())
            .spawn(move || serve(stream, &shared));
    }
}

fn reply(stream: &mut TcpStream, e: Enc) -> io::Result<()> {
    write_frame(stream, &e.0)
}

fn serve(mut stream: TcpStream, shared: &Shared) {
    let _ = tune(&stream);
    let Some(rank) = handshake(&mut stream, shared) else {
        return;
    };
    let said_bye = serve_requests(&mut stream, shared, rank).unwrap_or(false);
    let mut st = lock(&shared.state);
    st.live[rank] = false;
    if !said_bye {
        st.dead.insert(rank);
    }
    shared.changed.notify_all();
}

fn handshake(stream: &mut TcpStream, shared: &Shared) -> Option<usize> {
    let frame = read_frame(stream).ok()?;
    let mut d = Dec(&frame);
    let (op, rank, world) = (d.u8().ok()?, d.u64().ok()? as usize, d.u64().ok()? as usize);
    let refuse = |stream: &mut TcpStream, msg: String| {
        let _ = reply(stream, Enc::default().u8(R_ERR).str(&msg));
        None
    };
    if op != OP_HELLO {
        return refuse(stream, "the first request must be HELLO".into());
    }
    if world != shared.world {
        return refuse(
            stream,
            format!(
                "rank {rank} says the world has {world} ranks but rank 0 hosts a store for {}",
                shared.world
            ),
        );
    }
    if rank >= shared.world {
        return refuse(stream, format!("rank {rank} is outside a world of {world}"));
    }
    {
        let mut st = lock(&shared.state);
        if st.live[rank] {
            drop(st);
            return refuse(
                stream,
                format!("rank {rank} is already connected (two processes with the same RANK?)"),
            );
        }
        st.live[rank] = true;
        st.seen[rank] = true;
    }
    reply(stream, Enc::default().u8(R_OK)).ok()?;
    Some(rank)
}

/// Serves until the client leaves; `Ok(true)` if it said BYE.
fn serve_requests(stream: &mut TcpStream, shared: &Shared, rank: usize) -> io::Result<bool> {
    loop {
        let frame = read_frame(stream)?;
        lock(&shared.state).last_request[rank] = Instant::now();
        let mut d = Dec(&frame);
        let out = match d.u8()? {
            OP_BYE => return Ok(true),
            OP_SET => {
                let (key, value) = (d.str()?, d.bytes()?);
                lock(&shared.state).kv.insert(key, value);
                shared.changed.notify_all();
                Enc::default().u8(R_OK)
            }
            OP_ADD => {
                let (key, delta) = (d.str()?, d.i64()?);
                let mut st = lock(&shared.state);
                // Counters are stored as decimal text, as torch's store does,
                // so that `get` on a counter reads naturally.
                let current = match st.kv.get(&key) {
                    None => Ok(0),
                    Some(v) => std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                        .ok_or_else(|| format!("key {key:?} holds a value that is not a counter")),
                };
                match current {
                    Ok(c) => {
                        let n = c.wrapping_add(delta);
                        st.kv.insert(key, n.to_string().into_bytes());
                        drop(st);
                        shared.changed.notify_all();
                        Enc::default().u8(R_INT).i64(n)
                    }
                    Err(msg) => Enc::default().u8(R_ERR).str(&msg),
                }
            }
            op @ (OP_GET | OP_WAIT) => {
                let (keys, timeout) = (d.strs()?, Duration::from_millis(d.u64()?));
                lock(&shared.state).blocked[rank] = true;
                let out = wait_for(shared, &keys, timeout, op == OP_GET);
                let mut st = lock(&shared.state);
                st.blocked[rank] = false;
                st.last_request[rank] = Instant::now();
                out
            }
            op => Enc::default()
                .u8(R_ERR)
                .str(&format!("unknown store op {op}")),
        };
        reply(stream, out)?;
    }
}

fn wait_for(shared: &Shared, keys: &[String], timeout: Duration, values: bool) -> Enc {
    let deadline = Instant::now() + timeout;
    let mut st = lock(&shared.state);
    loop {
        let missing: Vec<&String> = keys.iter().filter(|k| !st.kv.contains_key(*k)).collect();
        if missing.is_empty() {
            if !values {
                return Enc::default().u8(R_OK);
            }
            let vals: Vec<&Vec<u8>> = keys.iter().filter_map(|k| st.kv.get(k)).collect();
            return vals.iter().fold(
                Enc::default().u8(R_VALUES).u64(vals.len() as u64),
                |e, v| e.bytes(v),
            );
        }
        if !st.dead.is_empty() {
            let dead: Vec<usize> = st.dead.iter().copied().collect();
            return Enc::default().u8(R_DEAD).u64s(&dead);
        }
        let now = Instant::now();
        if now >= deadline {
            let never: Vec<usize> = (0..shared.world).filter(|&r| !st.seen[r]).collect();
            return Enc::default().u8(R_TIMEOUT).strs(&missing).u64s(&never);
        }
        st = shared
            .changed
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// A client of the store. Requests from several threads are serialized.
pub struct Store {
    /// `None` once a request failed half-way: the stream position is lost.
    conn: Mutex<Option<TcpStream>>,
    addr: String,
    rank: usize,
    world: usize,
    local_ip: IpAddr,
    /// Per barrier name, how many times it was used: every rank calls
    /// barriers in the same order, so the count names the same instance.
    barriers: Mutex<HashMap<String, u64>>,
}

/// Why a blocking request returned without its keys.
enum Missed {
    Timeout {
        missing: Vec<String>,
        never_connected: Vec<usize>,
    },
    Dead(Vec<usize>),
}

impl Store {
    /// Connects to the store at `addr` (`host:port`) as `rank` of `world`,
    /// retrying until `timeout` because rank 0 may start after us.
    pub fn connect(
        addr: &str,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, DistError> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(10);
        let mut stream = loop {
            let err = match try_connect(addr, deadline) {
                Ok(s) => break s,
                Err(e) => e,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(DistError::StoreUnreachable {
                    rank,
                    addr: addr.into(),
                    timeout,
                    source: err,
                });
            }
            std::thread::sleep(backoff.min(deadline - now));
            backoff = (backoff * 2).min(Duration::from_millis(500));
        };
        let lost = |what: &str, e| DistError::StoreLost {
            addr: addr.into(),
            what: what.into(),
            source: e,
        };
        tune(&stream).map_err(|e| lost("configuring the connection", e))?;
        let local_ip = stream
            .local_addr()
            .map_err(|e| lost("reading the local address", e))?
            .ip();
        stream
            .set_read_timeout(Some(REPLY_GRACE))
            .map_err(|e| lost("configuring the connection", e))?;
        let hello = Enc::default()
            .u8(OP_HELLO)
            .u64(rank as u64)
            .u64(world as u64);
        write_frame(&mut stream, &hello.0).map_err(|e| lost("saying hello", e))?;
        let answer = read_frame(&mut stream).map_err(|e| lost("saying hello", e))?;
        let mut d = Dec(&answer);
        match d.u8() {
            Ok(R_OK) => {}
            Ok(R_ERR) => {
                return Err(DistError::StoreRefused {
                    what: format!("rank {rank}"),
                    reason: d.str().unwrap_or_default(),
                });
            }
            _ => return Err(lost("saying hello", bad_reply())),
        }
        Ok(Store {
            conn: Mutex::new(Some(stream)),
            addr: addr.into(),
            rank,
            world,
            local_ip,
            barriers: Mutex::new(HashMap::new()),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The address of this host on the interface that reaches rank 0: the
    /// one other ranks can reach us on, advertised for the transport.
    pub fn local_ip(&self) -> IpAddr {
        self.local_ip
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), DistError> {
        let what = format!("setting {key:?}");
        let reply = self.request(&what, Enc::default().u8(OP_SET).str(key).bytes(value), None)?;
        self.expect(&what, &reply, R_OK)
    }

    /// Adds `delta` to the counter `key` (0 if absent) and returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, DistError> {
        let what = format!("adding to {key:?}");
        let reply = self.request(&what, Enc::default().u8(OP_ADD).str(key).i64(delta), None)?;
        let mut d = Dec(&reply);
        match d.u8() {
            Ok(R_INT) => d.i64().map_err(|e| self.lost(&what, e)),
            _ => Err(self.unexpected(&what, &reply)),
        }
    }

    /// The value of `key`, waiting up to `timeout` for some rank to set it.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, DistError> {
        let mut v = self.get_many(&[key.to_string()], timeout)?;
        Ok(v.pop().unwrap_or_default())
    }

    /// The values of all `keys`, in order, once all are set.
    pub fn get_many(&self, keys: &[String], timeout: Duration) -> Result<Vec<Vec<u8>>, DistError> {
        let what = format!("waiting for {keys:?}");
        self.get_many_raw(&what, keys, timeout)?
            .map_err(|m| self.missed_keys(&what, m, timeout))
    }

    /// Waits until every key in `keys` is set.
    pub fn wait(&self, keys: &[&str], timeout: Duration) -> Result<(), DistError> {
        let what = format!("waiting for {keys:?}");
        let req = Enc::default()
            .u8(OP_WAIT)
            .strs(keys)
            .u64(timeout.as_millis() as u64);
        let reply = self.request(&what, req, Some(timeout))?;
        match self.decode_wait(&what, &reply)? {
            Ok(_) => Ok(()),
            Err(m) => Err(self.missed_keys(&what, m, timeout)),
        }
    }

    /// Every rank publishes `mine` under `name` and gets everyone's, indexed
    /// by rank. A rank that does not arrive in `timeout` is named in the error.
    pub fn exchange(
        &self,
        name: &str,
        mine: &[u8],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, DistError> {
        self.set(&format!("{name}/rank{}", self.rank), mine)?;
        let keys: Vec<String> = (0..self.world).map(|r| format!("{name}/rank{r}")).collect();
        let what = format!("exchange {name:?}");
        match self.get_many_raw(&what, &keys, timeout)? {
            Ok(v) => Ok(v),
            Err(Missed::Dead(dead)) => Err(DistError::RanksDied { what, dead }),
            Err(Missed::Timeout {
                missing,
                never_connected,
            }) => Err(DistError::RanksMissing {
                what,
                missing: keys
                    .iter()
                    .enumerate()
                    .filter(|(_, k)| missing.contains(k))
                    .map(|(r, _)| r)
                    .collect(),
                world: self.world,
                never_connected,
                timeout,
            }),
        }
    }

    /// Returns once every rank reached the barrier `name`; names the ranks
    /// that did not within `timeout`.
    pub fn barrier(&self, name: &str, timeout: Duration) -> Result<(), DistError> {
        let generation = {
            let mut b = lock(&self.barriers);
            let g = b.entry(name.to_string()).or_insert(0);
            *g += 1;
            *g
        };
        self.exchange(&format!("barrier/{name}/{generation}"), &[], timeout)
            .map(|_| ())
            .map_err(|e| match e {
                DistError::RanksMissing {
                    missing,
                    world,
                    never_connected,
                    timeout,
                    ..
                } => DistError::RanksMissing {
                    what: format!("store barrier {name:?}"),
                    missing,
                    world,
                    never_connected,
                    timeout,
                },
                other => other,
            })
    }

    fn get_many_raw(
        &self,
        what: &str,
        keys: &[String],
        timeout: Duration,
    ) -> Result<Result<Vec<Vec<u8>>, Missed>, DistError> {
        let req = Enc::default()
            .u8(OP_GET)
            .strs(keys)
            .u64(timeout.as_millis() as u64);
        let reply = self.request(what, req, Some(timeout))?;
        self.decode_wait(what, &reply)
    }

    fn decode_wait(
        &self,
        what: &str,
        reply: &[u8],
    ) -> Result<Result<Vec<Vec<u8>>, Missed>, DistError> {
        let mut d = Dec(reply);
        let parsed = (|| -> io::Result<Option<Result<Vec<Vec<u8>>, Missed>>> {
            Ok(Some(match d.u8()? {
                R_OK => Ok(Vec::new()),
                R_VALUES => {
                    let n = d.len()?;
                    Ok((0..n).map(|_| d.bytes()).collect::<io::Result<_>>()?)
                }
                R_TIMEOUT => Err(Missed::Timeout {
                    missing: d.strs()?,
                    never_connected: d.u64s()?,
                }),
                R_DEAD => Err(Missed::Dead(d.u64s()?)),
                _ => return Ok(None),
            }))
        })();
        match parsed {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(self.unexpected(what, reply)),
            Err(e) => Err(self.lost(what, e)),
        }
    }

    fn missed_keys(&self, what: &str, m: Missed, timeout: Duration) -> DistError {
        match m {
            Missed::Dead(dead) => DistError::RanksDied {
                what: what.into(),
                dead,
            },
            Missed::Timeout {
                missing,
                never_connected,
            } => DistError::StoreTimeout {
                missing,
                never_connected,
                timeout,
            },
        }
    }

    /// Sends one request and reads its reply. `blocking` is the server-side
    /// wait of a GET/WAIT; the reply may take that long plus a grace.
    fn request(
        &self,
        what: &str,
        req: Enc,
        blocking: Option<Duration>,
    ) -> Result<Vec<u8>, DistError> {
        let mut guard = lock(&self.conn);
        let Some(stream) = guard.as_mut() else {
            return Err(self.lost(
                what,
                io::Error::new(io::ErrorKind::NotConnected, "an earlier request failed"),
            ));
        };
        let wait = blocking.unwrap_or(Duration::ZERO) + REPLY_GRACE;
        let result = stream
            .set_read_timeout(Some(wait))
            .and_then(|_| write_frame(stream, &req.0))
            .and_then(|_| read_frame(stream));
        match result {
            Ok(r) => Ok(r),
            Err(e) => {
                *guard = None;
                Err(self.lost(what, e))
            }
        }
    }

    fn expect(&self, what: &str, reply: &[u8], tag: u8) -> Result<(), DistError> {
        if reply.first() == Some(&tag) {
            Ok(())
        } else {
            Err(self.unexpected(what, reply))
        }
    }

    fn unexpected(&self, what: &str, reply: &[u8]) -> DistError {
        let mut d = Dec(reply);
        if d.u8().ok() == Some(R_ERR) {
            return DistError::StoreRefused {
                what: what.into(),
                reason: d.str().unwrap_or_default(),
            };
        }
        self.lost(what, bad_reply())
    }

    fn lost(&self, what: &str, e: io::Error) -> DistError {
        let e = if is_closed(&e) {
            io::Error::new(
                e.kind(),
                format!("connection closed ({e}); did rank 0 exit or crash?"),
            )
        } else {
            e
        };
        DistError::StoreLost {
            addr: self.addr.clone(),
            what: what.into(),
            source: e,
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Tell the server this rank leaves on purpose, so that it is not
        // reported as dead to the ranks still waiting.
        if let Some(stream) = lock(&self.conn).as_mut() {
            let _ = write_frame(stream, &[OP_BYE]);
        }
    }
}

fn bad_reply() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed reply")
}

fn try_connect(addr: &str, deadline: Instant) -> io::Result<TcpStream> {
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("{addr} resolves to nothing"),
    );
    for a in addr.to_socket_addrs()? {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(50));
        match TcpStream::connect_timeout(&a, left.min(Duration::from_secs(5))) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn server(world: usize) -> (StoreServer, String) {
        let s = StoreServer::start("127.0.0.1:0".parse().unwrap(), world).unwrap();
        let addr = s.local_addr().to_string();
        (s, addr)
    }

    #[test]
    fn set_get_add_wait() {
        let (_srv, addr) = server(2);
        let a = Store::connect(&addr, 0, 2, T).unwrap();
        let b = Store::connect(&addr, 1, 2, T).unwrap();
        a.set("x", b"hello").unwrap();
        assert_eq!(b.get("x", T).unwrap(), b"hello");
        assert_eq!(a.add("n", 5).unwrap(), 5);
        assert_eq!(b.add("n", -2).unwrap(), 3);
        assert_eq!(a.get("n", T).unwrap(), b"3");
        a.wait(&["x", "n"], T).unwrap();
        // A value that is not a counter is refused, naming the key.
        let err = a.add("x", 1).unwrap_err().to_string();
        assert!(
            err.contains("\"x\"") && err.contains("not a counter"),
            "{err}"
        );
    }

    #[test]
    fn get_blocks_until_another_rank_sets() {
        let (_srv, addr) = server(2);
        let a = Store::connect(&addr, 0, 2, T).unwrap();
        let addr2 = addr.clone();
        let setter = std::thread::spawn(move || {
            let b = Store::connect(&addr2, 1, 2, T).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            b.set("late", &[1, 2, 3]).unwrap();
            b
        });
        let t0 = Instant::now();
        assert_eq!(a.get("late", T).unwrap(), [1, 2, 3]);
        assert!(t0.elapsed() >= Duration::from_millis(150));
        drop(setter.join().unwrap());
    }

    #[test]
    fn get_times_out_naming_the_key() {
        let (_srv, addr) = server(1);
        let a = Store::connect(&addr, 0, 1, T).unwrap();
        let err = a.get("never", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, DistError::StoreTimeout { .. }), "{err}");
        assert!(err.to_string().contains("never"), "{err}");
    }

    #[test]
    fn barrier_passes_with_everyone_and_repeats() {
        let world = 4;
        let (_srv, addr) = server(world);
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let s = Store::connect(&addr, r, world, T).unwrap();
                    for _ in 0..3 {
                        s.barrier("step", T).unwrap();
                    }
                    s.barrier("end", T).unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn barrier_timeout_names_missing_ranks() {
        let world = 4;
        let (_srv, addr) = server(world);
        // Rank 2 connects but never reaches the barrier; rank 3 never connects.
        let _r2 = Store::connect(&addr, 2, world, T).unwrap();
        let r1 = Store::connect(&addr, 1, world, T).unwrap();
        let t = std::thread::spawn(move || r1.barrier("b", Duration::from_millis(300)));
        let r0 = Store::connect(&addr, 0, world, T).unwrap();
        let err = r0.barrier("b", Duration::from_millis(300)).unwrap_err();
        match &err {
            DistError::RanksMissing {
                missing,
                never_connected,
                ..
            } => {
                assert_eq!(missing, &[2, 3]);
                assert_eq!(never_connected, &[3]);
            }
            other => panic!("unexpected {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("[2, 3]") && msg.contains("\"b\""), "{msg}");
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn a_client_that_vanishes_fails_waiters_at_once() {
        let world = 3;
        let (_srv, addr) = server(world);
        let r0 = Store::connect(&addr, 0, world, T).unwrap();
        let r1 = Store::connect(&addr, 1, world, T).unwrap();
        // Simulate a crash: close the socket without the BYE a drop sends.
        let r2 = Store::connect(&addr, 2, world, T).unwrap();
        let dying = lock(&r2.conn).take().unwrap();
        let t = std::thread::spawn(move || r1.barrier("b", Duration::from_secs(20)));
        std::thread::sleep(Duration::from_millis(100));
        drop(dying);
        let t0 = Instant::now();
        let err = r0.barrier("b", Duration::from_secs(20)).unwrap_err();
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t0.elapsed()
        );
        assert!(
            matches!(&err, DistError::RanksDied { dead, .. } if dead == &[2]),
            "{err}"
        );
        assert!(err.to_string().contains("[2]"), "{err}");
        assert!(matches!(
            t.join().unwrap(),
            Err(DistError::RanksDied { .. })
        ));
    }

    #[test]
    fn a_client_that_leaves_politely_is_not_dead() {
        let (_srv, addr) = server(2);
        let r0 = Store::connect(&addr, 0, 2, T).unwrap();
        let r1 = Store::connect(&addr, 1, 2, T).unwrap();
        r1.set("k", b"v").unwrap();
        drop(r1);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(r0.get("k", T).unwrap(), b"v");
        let err = r0.get("other", Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, DistError::StoreTimeout { .. }), "{err}");
    }

    #[test]
    fn duplicate_rank_and_wrong_world_are_refused() {
        let (_srv, addr) = server(2);
        let _a = Store::connect(&addr, 1, 2, T).unwrap();
        let err = Store::connect(&addr, 1, 2, T).err().unwrap().to_string();
        assert!(err.contains("rank 1 is already connected"), "{err}");
        let err = Store::connect(&addr, 0, 3, T).err().unwrap().to_string();
        assert!(err.contains("3 ranks") && err.contains("for 2"), "{err}");
    }

    #[test]
    fn unreachable_store_names_rank_and_address() {
        // Bind then drop to get a port nobody listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let err = Store::connect(&addr, 3, 4, Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("rank 3") && err.contains(&addr), "{err}");
    }
}
