//! The collectives FSDP needs, on flat burn tensors. One trait, so the same
//! sharding code runs over NCCL on GPU memory or over the CPU transport.

use anyhow::Result;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

pub trait Comm<B: Backend>: Send {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// `[len]` on every rank -> `[size * len]`, rank r's piece at `r * len`.
    fn all_gather(&self, shard: Tensor<B, 1>) -> Result<Tensor<B, 1>>;
    /// `[size * len]` -> `[len]`: the mean over ranks of each rank's piece `r`.
    fn reduce_scatter_mean(&self, full: Tensor<B, 1>) -> Result<Tensor<B, 1>>;
    fn all_reduce_mean(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>>;
    fn all_reduce_sum(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>>;
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
