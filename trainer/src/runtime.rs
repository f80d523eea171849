//! Who this process is in the job and how it talks to the others: rank,
//! world, and the communicators each parallelism strategy needs (all ranks,
//! the shard group, the replica group), plus host-level control messages.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use sha2::{Digest, Sha256};

use crate::config::{Strategy, TrainConfig};
use crate::dist::{self, Collectives, DistEnv, InitOptions};
use crate::fsdp::{Comm, Mirror, Solo};

/// Host-side coordination that is not tensor math (checkpoint hand-shakes).
pub trait Control: Send {
    fn barrier(&self) -> Result<()>;
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
}

impl Control for Solo {
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
}

impl Control for Mirror {
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec(); self.0])
    }
}

impl Control for Box<dyn Collectives> {
    fn barrier(&self) -> Result<()> {
        Ok(Collectives::barrier(&**self)?)
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(Collectives::all_gather_bytes(&**self, mine)?)
    }
}

pub struct Runtime<B: Backend> {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub strategy: Strategy,
    pub world_comm: Box<dyn Comm<B>>,
    /// Ranks that split the parameters among them.
    pub shard_comm: Box<dyn Comm<B>>,
    /// Ranks that hold the same slice (averaged after reduce-scatter).
    pub replicate_comm: Box<dyn Comm<B>>,
    pub control: Box<dyn Control>,
    /// Keeps the process group (and rank 0's store) alive for the run.
    _dist: Option<dist::Dist>,
}

impl<B: Backend> Runtime<B> {
    /// One process, no communication.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            local_rank: 0,
            strategy: Strategy::Fsdp,
            world_comm: Box::new(Solo),
            shard_comm: Box::new(Solo),
            replicate_comm: Box::new(Solo),
            control: Box::new(Solo),
            _dist: None,
        }
    }

    /// This single process as rank 0 of an `n`-rank job of its strategy
    /// whose ranks all hold what it holds ([`Mirror`]): `bench
    /// --simulate-ranks n`. hsdp's `shard_group_size` 0 (a node's ranks)
    /// puts all `n` on one node.
    pub fn simulated(self, n: usize, shard_group_size: usize) -> Result<Self> {
        if self.world > 1 {
            bail!(
                "--simulate-ranks stands one process in for {n} ranks: run it without --nproc-per-node or a launcher"
            );
        }
        if n < 2 {
            bail!("--simulate-ranks {n}: give 2 or more ranks");
        }
        let (shard, replicate): (Box<dyn Comm<B>>, Box<dyn Comm<B>>) = match self.strategy {
            Strategy::Fsdp => (Box::new(Mirror(n)), Box::new(Solo)),
            Strategy::Ddp => (Box::new(Solo), Box::new(Mirror(n))),
            Strategy::Hsdp => {
                // 0 (a node's ranks): the n ranks on one machine, as
                // `--nproc-per-node n` would run them.
                let g = if shard_group_size == 0 {
                    n
                } else {
                    shard_group_size
                };
                if !n.is_multiple_of(g) {
                    bail!(
                        "--simulate-ranks {n} with hsdp: parallelism.shard_group_size {g} must divide {n} (the ranks that share one copy of the state: a node's GPUs)"
                    );
                }
                (Box::new(Mirror(g)), Box::new(Mirror(n / g)))
            }
        };
        Ok(Self {
            world: n,
            world_comm: Box::new(Mirror(n)),
            shard_comm: shard,
            replicate_comm: replicate,
            control: Box::new(Mirror(n)),
            ..self
        })
    }
}

/// Joins the process group described by the environment (torchrun or SLURM
/// variables; a single process without them) and builds the communicators of
/// the configured strategy.
pub fn from_env<B: CommBackend>(cfg: &TrainConfig) -> Result<Runtime<B>> {
    let env = DistEnv::from_env()?;
    if env.world_size == 1 {
        return Ok(Runtime {
            strategy: cfg.parallelism.strategy,
            ..Runtime::single()
        });
    }
    let yaml = serde_norway::to_string(cfg)?;
    let hash: String = Sha256::digest(yaml.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let timeout = Duration::from_secs(cfg.parallelism.timeout_s);
    let opts = InitOptions {
        config_hash: hash,
        collective_timeout: timeout,
        rendezvous_timeout: timeout,
        ..Default::default()
    };
    let d = dist::init(&env, &opts).context("joining the process group")?;
    let (rank, world) = (env.rank, env.world_size);
    let local = env.local_rank;
    let host = |c: Box<dyn Collectives>| B::comm(c, local);
    let (shard, replicate): (Box<dyn Comm<B>>, Box<dyn Comm<B>>) = match cfg.parallelism.strategy {
        Strategy::Fsdp => (host(d.world.split(0, rank)?)?, Box::new(Solo)),
        Strategy::Ddp => (Box::new(Solo), host(d.world.split(0, rank)?)?),
        Strategy::Hsdp => {
            let g = match cfg.parallelism.shard_group_size {
                0 => env.local_world_size,
                g => g,
            };
            if g == 0 || world % g != 0 {
                bail!("parallelism.shard_group_size {g} does not divide the {world} ranks");
            }
            (
                host(d.world.split(rank / g, rank)?)?,
                host(d.world.split(rank % g, rank)?)?,
            )
        }
    };
    Ok(Runtime {
        rank,
        world,
        local_rank: env.local_rank,
        strategy: cfg.parallelism.strategy,
        world_comm: host(d.world.split(0, rank)?)?,
        shard_comm: shard,
        replicate_comm: replicate,
        control: Box::new(d.world.split(0, rank)?),
        _dist: Some(d),
    })
}

/// How a backend's tensors travel between ranks: NCCL on device memory for
/// CUDA, the host transport for CPU tensors (which live in host memory).
pub trait CommBackend: Backend {
    /// A communicator over the ranks of `group`, on local device `local_rank`.
    fn comm(group: Box<dyn Collectives>, local_rank: usize) -> Result<Box<dyn Comm<Self>>>;
}

impl CommBackend for crate::backend::Cpu {
    fn comm(group: Box<dyn Collectives>, _: usize) -> Result<Box<dyn Comm<Self>>> {
        Ok(Box::new(HostComm(group)))
    }
}

#[cfg(feature = "cuda")]
impl<F: burn_cubecl::FloatElement> CommBackend for crate::backend::Cuda<F> {
    fn comm(group: Box<dyn Collectives>, local_rank: usize) -> Result<Box<dyn Comm<Self>>> {
        if std::env::var_os("BAMBA_HOST_COMM").is_some() {
            // Debugging aid: route GPU collectives through the host transport.
            return Ok(Box::new(HostComm(group)));
        }
        Ok(Box::new(crate::fsdp::nccl::NcclComm::new(
            &*group, local_rank,
        )?))
    }
}

/// Collectives through host memory (the CPU backend's tensors live there anyway).
pub struct HostComm(pub Box<dyn dist::Collectives>);

fn host<B: Backend>(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data")
}

fn device<B: Backend>(v: Vec<f32>, like: &B::Device) -> Tensor<B, 1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), like)
}

impl<B: Backend> Comm<B> for HostComm {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn size(&self) -> usize {
        self.0.world_size()
    }
    fn all_gather(&self, shard: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        let dev = shard.device();
        let mine = host(shard);
        let mut out = vec![0f32; mine.len() * self.0.world_size()];
        self.0.all_gather(&mine, &mut out)?;
        Ok(device(out, &dev))
    }
    fn reduce_scatter_mean(&self, full: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        let dev = full.device();
        let input = host(full);
        let mut out = vec![0f32; input.len() / self.0.world_size()];
        self.0
            .reduce_scatter(&input, &mut out, dist::ReduceOp::Avg)?;
        Ok(device(out, &dev))
    }
    fn all_reduce_mean(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        let dev = t.device();
        let mut v = host(t);
        self.0.all_reduce(&mut v, dist::ReduceOp::Avg)?;
        Ok(device(v, &dev))
    }
    fn all_reduce_sum(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        let dev = t.device();
        let mut v = host(t);
        self.0.all_reduce(&mut v, dist::ReduceOp::Sum)?;
        Ok(device(v, &dev))
    }
}
