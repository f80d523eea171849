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

    /// [`Comm::all_reduce_mean`], overlapping like [`Comm::start_all_gather`]
    /// (hsdp's average over replicas, beside the next unit's backward).
    fn start_all_reduce_mean(&self, t: Tensor<B, 1>) -> Result<Pending<B>> {
        self.all_reduce_mean(t).map(Pending::ready)
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

/// `n` ranks that all hold what this one holds, played by this one alone:
/// an all-gather repeats the shard `n` times, a reduce-scatter keeps the
/// first piece (the mean of `n` equal pieces), an all-reduce sums `n`
/// equal values. `bench --simulate-ranks` runs one rank's share of an
/// `n`-GPU job with it: its state shard, its share of the batch, the
/// same shapes, buffers and compute, and no transfers. The values are not
/// those of any real model (every shard of a unit is the first one).
pub struct Mirror(pub usize);

impl<B: Backend> Comm<B> for Mirror {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        self.0
    }
    fn all_gather(&self, shard: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        Ok(Tensor::cat(vec![shard; self.0], 0))
    }
    fn reduce_scatter_mean(&self, full: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        let piece = full.dims()[0] / self.0;
        // A buffer of its own, as NCCL's output is: a view would keep `full` alive.
        let first = full.narrow(0, 0, piece);
        Ok(first.zeros_like() + first)
    }
    fn all_reduce_mean(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        Ok(t)
    }
    fn all_reduce_sum(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        Ok(t.mul_scalar(self.0 as f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    type B = crate::backend::Cpu;

    fn t(v: &[f32]) -> Tensor<B, 1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
    }

    fn v(t: Tensor<B, 1>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    /// Three ranks that hold the same values: gathers repeat, reductions
    /// see three equal pieces.
    #[test]
    fn a_mirror_answers_as_ranks_holding_the_same() {
        let m = Mirror(3);
        assert_eq!(Comm::<B>::size(&m), 3);
        assert_eq!(
            v(m.all_gather(t(&[1., 2.])).unwrap()),
            [1., 2., 1., 2., 1., 2.]
        );
        assert_eq!(
            v(m.reduce_scatter_mean(t(&[1., 2., 3., 4., 5., 6.])).unwrap()),
            [1., 2.]
        );
        assert_eq!(v(m.all_reduce_mean(t(&[4.])).unwrap()), [4.]);
        assert_eq!(v(m.all_reduce_sum(t(&[4.])).unwrap()), [12.]);
    }
}
