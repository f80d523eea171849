//! The collective operations FSDP and HSDP are written against, as one
//! trait on host `f32` buffers, so that the sharding code runs unchanged on
//! the CPU transport (`cpu.rs`, for tests and CPU training), on a single
//! process (`Solo`), or on NCCL (to come, on device memory through its own
//! entry points next to these).
//!
//! Contract for every implementation: all ranks of a communicator call the
//! same collectives in the same order with the same lengths; reductions are
//! bit-identical on every rank and reproducible run to run.

pub mod cpu;

pub use cpu::CpuCollectives;

use super::DistError;

/// How contributions of the ranks are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the number of ranks in the communicator.
    Avg,
    Max,
}

pub trait Collectives: Send + Sync {
    /// This process's rank in the communicator (not the global rank, for a sub-group).
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// Every rank ends with the reduction of every rank's `buf`.
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<(), DistError>;

    /// `out.len() == world_size * shard.len()`; rank r's shard lands at
    /// `out[r*len..(r+1)*len]`.
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<(), DistError>;

    /// `input.len() == world_size * out.len()`; rank r receives the reduction
    /// of every rank's `input[r*len..(r+1)*len]`.
    fn reduce_scatter(&self, input: &[f32], out: &mut [f32], op: ReduceOp)
    -> Result<(), DistError>;

    /// Every rank ends with `root`'s `buf`.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), DistError>;

    /// Every rank's bytes, indexed by rank; lengths may differ. For small
    /// metadata (loader states, hashes), not for tensors.
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError>;

    fn barrier(&self) -> Result<(), DistError>;

    /// Like `MPI_Comm_split`: ranks passing the same `color` form a new
    /// communicator, ordered by `key` (ties by current rank). Every rank of
    /// this communicator must call it. HSDP uses it to shard inside a group
    /// (a node) and replicate across groups.
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Collectives>, DistError>;
}

/// A communicator of one process: every collective is a copy or nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl Collectives for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce(&self, _buf: &mut [f32], _op: ReduceOp) -> Result<(), DistError> {
        Ok(())
    }

    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<(), DistError> {
        check_len("all_gather", "out", out.len(), shard.len(), 1)?;
        out.copy_from_slice(shard);
        Ok(())
    }

    fn reduce_scatter(
        &self,
        input: &[f32],
        out: &mut [f32],
        _op: ReduceOp,
    ) -> Result<(), DistError> {
        check_len("reduce_scatter", "input", input.len(), out.len(), 1)?;
        out.copy_from_slice(input);
        Ok(())
    }

    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<(), DistError> {
        check_root(root, 1)
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        Ok(vec![mine.to_vec()])
    }

    fn barrier(&self) -> Result<(), DistError> {
        Ok(())
    }

    fn split(&self, _color: usize, _key: usize) -> Result<Box<dyn Collectives>, DistError> {
        Ok(Box::new(Solo))
    }
}

/// `long == world * short`, or an error naming both lengths.
pub(crate) fn check_len(
    op: &'static str,
    name: &str,
    long: usize,
    short: usize,
    world: usize,
) -> Result<(), DistError> {
    if Some(long) == short.checked_mul(world) {
        Ok(())
    } else {
        Err(DistError::bad_arg(
            op,
            format!(
                "{name} has {long} elements, expected world size {world} x {short} = {}",
                short.saturating_mul(world)
            ),
        ))
    }
}

pub(crate) fn check_root(root: usize, world: usize) -> Result<(), DistError> {
    if root < world {
        Ok(())
    } else {
        Err(DistError::bad_arg(
            "broadcast",
            format!("root {root} is outside a communicator of {world} ranks"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solo_is_the_identity() {
        let s = Solo;
        let mut b = vec![1.0, 2.0];
        s.all_reduce(&mut b, ReduceOp::Avg).unwrap();
        assert_eq!(b, [1.0, 2.0]);
        let mut out = vec![0.0; 2];
        s.all_gather(&b, &mut out).unwrap();
        assert_eq!(out, b);
        s.reduce_scatter(&b, &mut out, ReduceOp::Sum).unwrap();
        assert_eq!(out, b);
        assert_eq!(s.all_gather_bytes(b"x").unwrap(), vec![b"x".to_vec()]);
        assert!(s.broadcast(&mut b, 1).is_err());
        let err = s.all_gather(&b, &mut [0.0; 3]).unwrap_err().to_string();
        assert!(err.contains("out has 3 elements"), "{err}");
        assert_eq!(s.split(3, 0).unwrap().world_size(), 1);
    }
}
