//! The collectives FSDP needs, on flat burn tensors. One trait, so the same
//! sharding code runs over NCCL on GPU memory or over the CPU transport.

use anyhow::Result;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// A collective started by [`Comm::start_all_gather`] or
/// [`Comm::start_reduce_scatter_mean`]. Its output may still be in flight
/// (on NCCL, in a communication stream that overlaps the compute stream);
/// [`Pending::wait`] orders the compute stream after it and releases the
/// input. Dropping it unwaited waits too, so an input is never freed early.
pub struct Pending<B: Backend> {
    out: Tensor<B, 1>,
    fence: Option<Box<dyn Fence>>,
}

/// What a [`Pending`] waits on: `Drop` makes later compute wait for the
/// collective and then frees what it read.
pub trait Fence: Send {}

impl<B: Backend> Pending<B> {
    /// A result that is already ordered in the compute stream.
    pub fn ready(out: Tensor<B, 1>) -> Self {
        Self { out, fence: None }
    }

    pub fn in_flight(out: Tensor<B, 1>, fence: Box<dyn Fence>) -> Self {
        Self {
            out,
            fence: Some(fence),
        }
    }

    /// The output, safe to use from the compute stream from here on.
    pub fn wait(self) -> Tensor<B, 1> {
        drop(self.fence);
        self.out
    }
}

pub trait Comm<B: Backend>: Send {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// `[len]` on every rank -> `[size * len]`, rank r's piece at `r * len`.
    fn all_gather(&self, shard: Tensor<B, 1>) -> Result<Tensor<B, 1>>;
    /// `[size * len]` -> `[len]`: the mean over ranks of each rank's piece `r`.
    fn reduce_scatter_mean(&self, full: Tensor<B, 1>) -> Result<Tensor<B, 1>>;
    fn all_reduce_mean(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>>;
    fn all_reduce_sum(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>>;

    /// [`Comm::all_gather`], overlapping the compute enqueued before `wait`
    /// where the transport can (FSDP's prefetch). Default: runs now.
    fn start_all_gather(&self, shard: Tensor<B, 1>) -> Result<Pending<B>> {
        self.all_gather(shard).map(Pending::ready)
    }

    /// [`Comm::reduce_scatter_mean`], overlapping like [`Comm::start_all_gather`].
    fn start_reduce_scatter_mean(&self, full: Tensor<B, 1>) -> Result<Pending<B>> {
        self.reduce_scatter_mean(full).map(Pending::ready)
    }
}

/// A group of one: every collective is the identity.
pub struct Solo;

impl<B: Backend> Comm<B> for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, shard: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        Ok(shard)
    }
    fn reduce_scatter_mean(&self, full: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        Ok(full)
    }
    fn all_reduce_mean(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        Ok(t)
    }
    fn all_reduce_sum(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        Ok(t)
    }
}
