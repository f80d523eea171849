//! FSDP's collectives over NCCL, directly on burn's CUDA device memory.
//!
//! Each call is enqueued on the CUDA stream that owns its output buffer
//! (exposed by the patched cubecl-cuda), so it runs after the kernels that
//! produced its input and before those that read its output, with no host
//! synchronisation. The NCCL unique id travels over the host collectives of
//! the same group (rank 0 of the group creates it).
//!
//! The `start_*` calls (FSDP's prefetch and early reduce-scatter) run in a
//! second stream instead, so the transfer overlaps the compute enqueued after
//! them: an event orders the collective after the kernels that produced its
//! input, and [`Pending::wait`](super::Pending::wait) makes the compute stream
//! wait for the collective's event before anything reads the output or reuses
//! the input's memory.

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
use cudarc::driver::{result as drv, sys as cu};
use cudarc::nccl::{result as nccl, sys};

use super::comm::{Comm, Fence, Pending};
use crate::dist::Collectives;

type Cuda<F> = CubeBackend<CudaRuntime, F, i32, u8>;
type T = CubeTensor<CudaRuntime>;

pub struct NcclComm {
    comm: sys::ncclComm_t,
    rank: usize,
    size: usize,
    ctx: Arc<CudaContext>,
    /// Where overlapped collectives run (non-blocking: no implicit sync
    /// with the compute stream).
    side: cu::CUstream,
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
        let side = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(|e| anyhow::anyhow!("creating the NCCL stream on GPU {device}: {e:?}"))?;
        Ok(Self {
            comm,
            rank,
            size,
            ctx,
            side,
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

    /// Runs one collective from `input` into a fresh `[out_len]` buffer, in
    /// the compute stream.
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
        self.launch(input, out_len, false, call).map(Pending::wait)
    }

    /// Runs one collective, in the compute stream or (`side`) overlapped in
    /// the communication stream.
    fn launch<F: FloatElement>(
        &self,
        input: Tensor<Cuda<F>, 1>,
        out_len: usize,
        side: bool,
        call: impl FnOnce(
            *const c_void,
            *mut c_void,
            sys::ncclDataType_t,
            sys::cudaStream_t,
        ) -> Result<(), nccl::NcclError>,
    ) -> Result<Pending<Cuda<F>>> {
        let input = into_contiguous(input.into_primitive().tensor());
        let out = empty_device_contiguous_dtype(
            input.client.clone(),
            input.device.clone(),
            [out_len].into(),
            input.dtype,
        );
        let dtype = Self::dtype(&input)?;
        let fence = {
            let res = |t: &T| {
                input
                    .client
                    .get_resource(t.handle.clone())
                    .expect("device memory of a CUDA tensor")
            };
            let (src, dst) = (res(&input), res(&out));
            let (src, dst) = (src.resource(), dst.resource());
            self.ctx.bind_to_thread()?;
            let compute = dst.stream as cu::CUstream;
            let err = |what: &str, e: &dyn std::fmt::Debug| {
                anyhow::anyhow!("NCCL {what} (rank {} of {}): {e:?}", self.rank, self.size)
            };
            let stream = if side {
                // The collective starts once the compute stream reaches here.
                let ready = record(compute).map_err(|e| err("stream event", &e))?;
                // SAFETY: both handles are live; the event is recorded.
                unsafe {
                    drv::stream::wait_event(
                        self.side,
                        ready.0,
                        cu::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                }
                .map_err(|e| err("stream wait", &e))?;
                self.side
            } else {
                compute
            };
            call(
                src.ptr as *const c_void,
                dst.ptr as *mut c_void,
                dtype,
                stream as _,
            )
            .map_err(|e| err("collective", &e))?;
            if side {
                let done = record(self.side).map_err(|e| err("stream event", &e))?;
                Some(Box::new(SideFence {
                    done,
                    compute,
                    _input: input,
                }) as Box<dyn Fence>)
            } else {
                drop(input);
                None
            }
        };
        let out = Tensor::from_primitive(TensorPrimitive::Float(out));
        Ok(match fence {
            Some(f) => Pending::in_flight(out, f),
            None => Pending::ready(out),
        })
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
        // SAFETY: created by `comm_init_rank` / `stream::create`, destroyed once,
        // after the side stream's work (a `Pending` holds no borrow of `self`,
        // so finish it first).
        unsafe {
            let _ = self.ctx.bind_to_thread();
            let _ = drv::stream::synchronize(self.side);
            let _ = nccl::comm_destroy(self.comm);
            let _ = drv::stream::destroy(self.side);
        }
    }
}

/// A CUDA event recorded on a stream, destroyed on drop.
struct Event(cu::CUevent);

// SAFETY: CUDA events are usable from any thread.
unsafe impl Send for Event {}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by `record`; destroying after a wait was enqueued is
        // allowed (the wait keeps what it needs).
        unsafe {
            let _ = drv::event::destroy(self.0);
        }
    }
}

fn record(stream: cu::CUstream) -> Result<Event, cudarc::driver::DriverError> {
    let e = Event(drv::event::create(
        cu::CUevent_flags::CU_EVENT_DISABLE_TIMING,
    )?);
    // SAFETY: a fresh event on a live stream.
    unsafe { drv::event::record(e.0, stream)? };
    Ok(e)
}

/// An overlapped collective: on drop the compute stream waits for it, then
/// its input is released (burn may reuse that memory from then on, in
/// compute-stream order, after the collective has read it).
struct SideFence {
    done: Event,
    compute: cu::CUstream,
    _input: T,
}

// SAFETY: the stream handle is only used to enqueue a wait.
unsafe impl Send for SideFence {}

impl Fence for SideFence {}

impl Drop for SideFence {
    fn drop(&mut self) {
        // SAFETY: live stream and event; failure here would leave the stream
        // unordered, so it is fatal.
        unsafe {
            drv::stream::wait_event(
                self.compute,
                self.done.0,
                cu::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .expect("cuStreamWaitEvent after an overlapped NCCL collective");
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
    fn start_all_gather(&self, shard: Tensor<Cuda<F>, 1>) -> Result<Pending<Cuda<F>>> {
        let n = shard.dims()[0];
        let comm = self.comm;
        self.launch(shard, n * self.size, true, |src, dst, ty, stream| unsafe {
            // SAFETY: as in `all_gather`.
            nccl::all_gather(src, dst, n, ty, comm, stream).map(|_| ())
        })
    }
    fn start_all_reduce_mean(&self, t: Tensor<Cuda<F>, 1>) -> Result<Pending<Cuda<F>>> {
        let n = t.dims()[0];
        let comm = self.comm;
        self.launch(t, n, true, |src, dst, ty, stream| unsafe {
            // SAFETY: as in `all_reduce`.
            nccl::all_reduce(src, dst, n, ty, sys::ncclRedOp_t::ncclAvg, comm, stream).map(|_| ())
        })
    }
    fn start_reduce_scatter_mean(&self, full: Tensor<Cuda<F>, 1>) -> Result<Pending<Cuda<F>>> {
        let n = full.dims()[0] / self.size;
        let comm = self.comm;
        self.launch(full, n, true, |src, dst, ty, stream| unsafe {
            // SAFETY: as in `reduce_scatter_mean`.
            nccl::reduce_scatter(src, dst, n, ty, sys::ncclRedOp_t::ncclAvg, comm, stream)
                .map(|_| ())
        })
    }
}
