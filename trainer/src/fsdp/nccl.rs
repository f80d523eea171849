//! FSDP's collectives over NCCL, directly on burn's CUDA device memory.
//!
//! Each call is enqueued on the CUDA stream that owns its output buffer
//! (exposed by the patched cubecl-cuda), so it runs after the kernels that
//! produced its input and before those that read its output, with no host
//! synchronisation. The NCCL unique id travels over the host collectives of
//! the same group (rank 0 of the group creates it).

use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, FloatElement};
use cubecl_cuda::CudaRuntime;
use cudarc::driver::CudaContext;
use cudarc::nccl::{result as nccl, sys};

use super::comm::Comm;
use crate::dist::Collectives;

type Cuda<F> = CubeBackend<CudaRuntime, F, i32, u8>;
type T = CubeTensor<CudaRuntime>;

pub struct NcclComm {
    comm: sys::ncclComm_t,
    rank: usize,
    size: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time
// (`Comm` methods take `&self` but the trainer drives each from one thread).
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Joins `group` (the host collectives of the same ranks) on GPU `device`.
    pub fn new(group: &dyn Collectives, device: usize) -> Result<Self> {
        let (rank, size) = (group.rank(), group.world_size());
        let ctx = CudaContext::new(device).context("CUDA context for NCCL")?;
        ctx.bind_to_thread()?;
        let id = if rank == 0 {
            nccl::get_uniqueid().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?
        } else {
            sys::ncclUniqueId { internal: [0; 128] }
        };
        let mine: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        let all = group
            .all_gather_bytes(&mine)
            .context("sharing the NCCL unique id")?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in id.internal.iter_mut().zip(&all[0]) {
            *d = *s as _;
        }
        let mut comm = MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success; every rank of the group calls this.
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), size as i32, id, rank as i32)
                .map_err(|e| anyhow::anyhow!("ncclCommInitRank (rank {rank} of {size}, GPU {device}): {e:?} (is libnccl.so.2 on LD_LIBRARY_PATH?)"))?;
            comm.assume_init()
        };
        Ok(Self {
            comm,
            rank,
            size,
            ctx,
        })
    }

    fn dtype(t: &T) -> Result<sys::ncclDataType_t> {
        Ok(match t.dtype {
            DType::F32 => sys::ncclDataType_t::ncclFloat32,
            DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
            DType::F16 => sys::ncclDataType_t::ncclFloat16,
            d => bail!("NCCL: unsupported dtype {d:?}"),
        })
    }

    /// Runs one collective from `input` into a fresh `[out_len]` buffer.
    fn run<F: FloatElement>(
        &self,
        input: Tensor<Cuda<F>, 1>,
        out_len: usize,
        call: impl FnOnce(
            *const c_void,
            *mut c_void,
            sys::ncclDataType_t,
            sys::cudaStream_t,
        ) -> Result<(), nccl::NcclError>,
    ) -> Result<Tensor<Cuda<F>, 1>> {
        let input = into_contiguous(input.into_primitive().tensor());
        let out = empty_device_contiguous_dtype(
            input.client.clone(),
            input.device.clone(),
            [out_len].into(),
            input.dtype,
        );
        let dtype = Self::dtype(&input)?;
        {
            let res = |t: &T| {
                input
                    .client
                    .get_resource(t.handle.clone())
                    .expect("device memory of a CUDA tensor")
            };
            let (src, dst) = (res(&input), res(&out));
            let (src, dst) = (src.resource(), dst.resource());
            self.ctx.bind_to_thread()?;
            call(
                src.ptr as *const c_void,
                dst.ptr as *mut c_void,
                dtype,
                dst.stream as _,
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "NCCL collective (rank {} of {}): {e:?}",
                    self.rank,
                    self.size
                )
            })?;
        }
        drop(input);
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    fn all_reduce<F: FloatElement>(
        &self,
        t: Tensor<Cuda<F>, 1>,
        op: sys::ncclRedOp_t,
    ) -> Result<Tensor<Cuda<F>, 1>> {
        let n = t.dims()[0];
        let comm = self.comm;
        self.run(t, n, |src, dst, ty, stream| unsafe {
            // SAFETY: `n` elements of `ty` at both pointers, live until enqueued.
            nccl::all_reduce(src, dst, n, ty, op, comm, stream).map(|_| ())
        })
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: created by `comm_init_rank`, destroyed once.
        unsafe {
            let _ = nccl::comm_destroy(self.comm);
        }
    }
}

impl<F: FloatElement> Comm<Cuda<F>> for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather(&self, shard: Tensor<Cuda<F>, 1>) -> Result<Tensor<Cuda<F>, 1>> {
        let n = shard.dims()[0];
        let comm = self.comm;
        self.run(shard, n * self.size, |src, dst, ty, stream| unsafe {
            // SAFETY: `n` elements in, `size * n` out.
            nccl::all_gather(src, dst, n, ty, comm, stream).map(|_| ())
        })
    }
    fn reduce_scatter_mean(&self, full: Tensor<Cuda<F>, 1>) -> Result<Tensor<Cuda<F>, 1>> {
        let n = full.dims()[0] / self.size;
        let comm = self.comm;
        self.run(full, n, |src, dst, ty, stream| unsafe {
            // SAFETY: `size * n` elements in, `n` out.
            nccl::reduce_scatter(src, dst, n, ty, sys::ncclRedOp_t::ncclAvg, comm, stream)
                .map(|_| ())
        })
    }
    fn all_reduce_mean(&self, t: Tensor<Cuda<F>, 1>) -> Result<Tensor<Cuda<F>, 1>> {
        self.all_reduce(t, sys::ncclRedOp_t::ncclAvg)
    }
    fn all_reduce_sum(&self, t: Tensor<Cuda<F>, 1>) -> Result<Tensor<Cuda<F>, 1>> {
        self.all_reduce(t, sys::ncclRedOp_t::ncclSum)
    }
}
