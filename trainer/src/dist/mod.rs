//! Processes, rendezvous and host collectives: everything a rank needs to
//! find the others and talk to them, below FSDP.
//!
//! One process per device. [`DistEnv`] says who we are (torchrun or SLURM
//! variables); [`init`] meets the other ranks and returns a [`Dist`] holding
//! the rendezvous [`Store`] and the world communicator; `Collectives::split`
//! makes the sub-groups HSDP needs; [`launch::launch_local`] starts the
//! workers of one machine when no external launcher does.
//!
//! Start-up protocol of `init` (world > 1):
//! 1. Rank 0 starts the store server on `MASTER_PORT` (all interfaces).
//! 2. Every rank (rank 0 too) connects to `MASTER_ADDR:MASTER_PORT`,
//!    retrying until `rendezvous_timeout`, and says which rank it is.
//! 3. Every rank publishes its binary version, then its config hash; each
//!    compares all of them with rank 0's and fails naming both values on a
//!    difference (every rank reaches the same verdict). A rank that does not
//!    arrive in time is named in the timeout error.
//! 4. Every rank opens a port for the CPU collectives, publishes its address
//!    (on the interface that reaches rank 0) and connects the full mesh.
//!
//! The store stays up for later rendezvous (e.g. the NCCL unique id, through
//! [`Dist::share_from_rank0`]); end with [`Dist::shutdown`] so that rank 0
//! does not take the store down while others still use it.

pub mod collectives;
pub mod env;
mod error;
#[cfg(unix)]
pub mod launch;
pub mod store;
mod wire;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

pub use collectives::{Collectives, CpuCollectives, ReduceOp, Solo};
pub use env::DistEnv;
pub use error::{DistError, PeerFailure, PeerFailureKind};
pub use store::{Store, StoreServer};

/// What `init` checks and how long it waits.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Hash of the resolved training config; every rank must have the same.
    pub config_hash: String,
    /// Version of the binary (e.g. crate version and git revision); every
    /// rank must run the same.
    pub version: String,
    /// How long to wait for all ranks to arrive at start-up. Generous by
    /// default: schedulers start tasks of one job minutes apart.
    pub rendezvous_timeout: Duration,
    /// How long any collective read or write may make no progress before
    /// the peer is declared lost. Must cover the longest time one rank can
    /// spend outside collectives while the others wait (a checkpoint save).
    pub collective_timeout: Duration,
    /// Address other ranks should use to reach this one. Default: this
    /// host's address on the interface that reaches rank 0's store.
    pub advertise_ip: Option<IpAddr>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            config_hash: String::new(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            rendezvous_timeout: Duration::from_secs(600),
            collective_timeout: Duration::from_secs(600),
            advertise_ip: None,
        }
    }
}

/// This process's place in the job and its ways of talking to the others.
pub struct Dist {
    pub env: DistEnv,
    /// The rendezvous store; `None` in a world of one.
    pub store: Option<Store>,
    /// The communicator of all ranks (CPU transport, or `Solo`).
    pub world: Box<dyn Collectives>,
    opts: InitOptions,
    /// Rank 0 only; dropped last so the other ranks' store clients outlive it.
    server: Option<StoreServer>,
}

/// Meets the other ranks and returns the handle; see the module docs.
pub fn init(env: &DistEnv, opts: &InitOptions) -> Result<Dist, DistError> {
    if env.world_size == 1 {
        return Ok(Dist {
            env: env.clone(),
            store: None,
            world: Box::new(Solo),
            opts: opts.clone(),
            server: None,
        });
    }
    let master = env.master();
    let server = if env.rank == 0 {
        Some(StoreServer::start(bind_addr(env)?, env.world_size)?)
    } else {
        None
    };
    let store = Store::connect(&master, env.rank, env.world_size, opts.rendezvous_timeout)?;
    check_same(
        &store,
        "binary version",
        "init/version",
        &opts.version,
        opts.rendezvous_timeout,
    )?;
    check_same(
        &store,
        "config hash",
        "init/config",
        &opts.config_hash,
        opts.rendezvous_timeout,
    )?;
    let ip = opts.advertise_ip.unwrap_or_else(|| store.local_ip());
    let world =
        CpuCollectives::connect(&store, ip, opts.collective_timeout, opts.rendezvous_timeout)?;
    Ok(Dist {
        env: env.clone(),
        store: Some(store),
        world: Box::new(world),
        opts: opts.clone(),
        server,
    })
}

impl Dist {
    pub fn rank(&self) -> usize {
        self.env.rank
    }

    pub fn world_size(&self) -> usize {
        self.env.world_size
    }

    pub fn local_rank(&self) -> usize {
        self.env.local_rank
    }

    /// Rank 0 computes a value (e.g. the NCCL unique id) and every rank gets
    /// it through the store; `make` runs on rank 0 only.
    pub fn share_from_rank0(
        &self,
        key: &str,
        make: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>, DistError> {
        let Some(store) = &self.store else {
            return Ok(make());
        };
        let key = format!("shared/{key}");
        if self.env.rank == 0 {
            let value = make();
            store.set(&key, &value)?;
            Ok(value)
        } else {
            store.get(&key, self.opts.rendezvous_timeout)
        }
    }

    /// Waits for every rank at the store, then closes. Rank 0's store server
    /// stops with it, so others must not be left needing the store.
    pub fn shutdown(mut self) -> Result<(), DistError> {
        if let Some(store) = self.store.take() {
            store.barrier("shutdown", self.opts.collective_timeout)?;
            // Leaving says BYE; rank 0 keeps serving until everyone has, so
            // that no rank loses the reply to its last barrier request.
            drop(store);
            if let Some(server) = &self.server {
                server.wait_for_clients_to_leave(self.env.rank, self.opts.collective_timeout);
            }
        }
        Ok(())
    }
}

impl Drop for Dist {
    fn drop(&mut self) {
        // Close our client (it says BYE) before rank 0's server goes away.
        self.store.take();
        self.server.take();
    }
}

/// Every rank publishes `mine`; all compare with rank 0's value.
fn check_same(
    store: &Store,
    what: &'static str,
    key: &str,
    mine: &str,
    timeout: Duration,
) -> Result<(), DistError> {
    let all = store.exchange(key, mine.as_bytes(), timeout)?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let expected = text(&all[0]);
    match all.iter().position(|v| text(v) != expected) {
        None => Ok(()),
        Some(rank) => Err(DistError::Mismatch {
            what,
            rank,
            expected,
            found: text(&all[rank]),
        }),
    }
}

/// Rank 0 listens on every interface of the family `MASTER_ADDR` resolves
/// to, so ranks on other hosts reach it whichever name they use.
fn bind_addr(env: &DistEnv) -> Result<SocketAddr, DistError> {
    let resolved = env
        .master()
        .to_socket_addrs()
        .map_err(|e| DistError::io(format!("resolving MASTER_ADDR={}", env.master_addr), e))?
        .next()
        .ok_or_else(|| DistError::BadEnv {
            var: "MASTER_ADDR".into(),
            value: env.master_addr.clone(),
            reason: "resolves to no address".into(),
        })?;
    let any: IpAddr = if resolved.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    Ok(SocketAddr::new(any, env.master_port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn env(rank: usize, world: usize, port: u16) -> DistEnv {
        DistEnv {
            rank,
            world_size: world,
            local_rank: rank,
            local_world_size: world,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    fn opts(hash: &str) -> InitOptions {
        InitOptions {
            config_hash: hash.into(),
            rendezvous_timeout: Duration::from_secs(5),
            collective_timeout: Duration::from_secs(5),
            ..InitOptions::default()
        }
    }

    /// Runs `f` as every rank of a world of threads.
    fn threads<T: Send + 'static>(
        world: usize,
        hash: impl Fn(usize) -> String,
        f: impl Fn(Dist) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<Result<T, DistError>> {
        let port = free_port();
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let (f, o) = (f.clone(), opts(&hash(r)));
                std::thread::spawn(move || init(&env(r, world, port), &o).map(f))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn init_single_process_needs_nothing() {
        let d = init(&DistEnv::single(), &InitOptions::default()).unwrap();
        assert_eq!(d.world.world_size(), 1);
        assert_eq!(d.share_from_rank0("x", || vec![7]).unwrap(), [7]);
        d.shutdown().unwrap();
    }

    #[test]
    fn init_threads_share_a_value_and_reduce() {
        let out = threads(
            3,
            |_| "same".into(),
            |d| {
                let id = d.share_from_rank0("nccl-id", || vec![42; 128]).unwrap();
                let mut v = vec![d.rank() as f32 + 1.0; 5];
                d.world.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                d.shutdown().unwrap();
                (id, v)
            },
        );
        for r in out {
            let (id, v) = r.unwrap();
            assert_eq!(id, vec![42; 128]);
            assert_eq!(v, vec![6.0; 5]);
        }
    }

    #[test]
    fn config_mismatch_names_both_values_on_every_rank() {
        let out = threads(
            3,
            |r| if r == 2 { "bbb".into() } else { "aaa".into() },
            |_| (),
        );
        for r in out {
            let err = r.expect_err("mismatch must fail").to_string();
            assert!(
                err.contains("config hash")
                    && err.contains("\"aaa\"")
                    && err.contains("rank 2 has \"bbb\""),
                "{err}"
            );
        }
    }

    #[test]
    fn a_rank_that_never_comes_is_named() {
        let port = free_port();
        let world = 3;
        let hs: Vec<_> = [0, 2]
            .into_iter()
            .map(|r| {
                std::thread::spawn(move || {
                    let o = InitOptions {
                        rendezvous_timeout: Duration::from_millis(500),
                        ..opts("h")
                    };
                    init(&env(r, world, port), &o).err().map(|e| e.to_string())
                })
            })
            .collect();
        for h in hs {
            let err = h.join().unwrap().expect("must time out");
            assert!(err.contains("[1]") && err.contains("never"), "{err}");
        }
    }
}
