//! The burn backends bamba-train runs on, chosen at run time by `--device`.
//!
//! CPU: burn-flex. Of burn 0.21's CPU backends that support f32 autodiff it is
//! the fastest here: its matmuls go through the `gemm` crate (multi-threaded,
//! AVX2/AVX-512), transposed views multiply without copies, and cloning is
//! O(1) copy-on-write; burn-ndarray's matmul is the slower `matrixmultiply`
//! and burn-cpu needs an MLIR/LLVM toolchain at build time.
//! CUDA: burn's CubeCL CUDA runtime (feature `cuda`), f32 or bf16 compute, with
//! the model's GEMMs on cuBLAS (`bamba_model::ops`).

use burn::backend::{Autodiff, Flex};

pub type Cpu = Flex;
pub type CpuTrain = Autodiff<Cpu>;

/// The CUDA backend. Its default float type stays f32 whatever the compute
/// precision: bf16 runs as bf16 *tensors* (parameters gathered in bf16, so
/// activations follow), which keeps the f32 parts (softmax, SSD decay, loss)
/// in the backend's native type. burn 0.21's kernels mishandle f32 tensors
/// in a bf16-default backend (out-of-bounds gather in the loss, seen with
/// compute-sanitizer on the H100).
#[cfg(feature = "cuda")]
pub type Cuda<F = f32> = burn::backend::Cuda<F, i32>;
#[cfg(feature = "cuda")]
pub type CudaTrain<F = f32> = Autodiff<Cuda<F>>;

/// Where to run, from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// Compute precision of parameters and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    F32,
    Bf16,
}

/// Calls `$body` with the type alias `$B` bound to the training backend
/// picked by (`$device`, `$precision`) and `$dev` to its device.
#[macro_export]
macro_rules! with_backend {
    ($device:expr, $precision:expr, |$B:ident, $dev:ident| $body:expr) => {{
        use $crate::backend::{DeviceKind, Precision};
        match ($device, $precision) {
            (DeviceKind::Cpu, Precision::F32) => {
                type $B = $crate::backend::CpuTrain;
                let $dev = Default::default();
                $body
            }
            (DeviceKind::Cpu, Precision::Bf16) => {
                anyhow::bail!(
                    "bf16 runs on the GPU only (--device cuda); the CPU backend trains in f32"
                )
            }
            // bf16 computes with bf16 tensors in the f32 backend (see `Cuda`).
            #[cfg(feature = "cuda")]
            (DeviceKind::Cuda, _) => {
                type $B = $crate::backend::CudaTrain<f32>;
                $crate::cuda_memory::install()?;
                let $dev = Default::default();
                $body
            }
            #[cfg(not(feature = "cuda"))]
            (DeviceKind::Cuda, _) => {
                anyhow::bail!(
                    "this binary was built without GPU support: rebuild with `--features cuda`"
                )
            }
        }
    }};
}

/// The CUDA device of this process: one GPU per local rank.
#[cfg(feature = "cuda")]
pub fn cuda_device(local_rank: usize) -> burn::backend::cuda::CudaDevice {
    burn::backend::cuda::CudaDevice::new(local_rank)
}

/// A human name for the device (`NVIDIA H100 80GB HBM3`, `cpu`), for MFU peaks and reports.
pub fn device_name(device: crate::config::Device, local_rank: usize) -> String {
    match device {
        crate::config::Device::Cpu => "cpu".into(),
        #[cfg(feature = "cuda")]
        crate::config::Device::Cuda => cudarc::driver::CudaContext::new(local_rank)
            .and_then(|c| c.name())
            .unwrap_or_else(|_| "cuda".into()),
        #[cfg(not(feature = "cuda"))]
        crate::config::Device::Cuda => {
            let _ = local_rank;
            "cuda".into()
        }
    }
}

/// The PCI bus id of this process's GPU (`00000000:3B:00.0`, as
/// `nvidia-smi -i` takes it); `None` on CPU.
pub fn pci_bus_id(device: crate::config::Device, local_rank: usize) -> Option<String> {
    match device {
        #[cfg(feature = "cuda")]
        crate::config::Device::Cuda => {
            use cudarc::driver::result::device;
            use cudarc::driver::sys::CUdevice_attribute as A;
            cudarc::driver::result::init().ok()?;
            let dev = device::get(local_rank as i32).ok()?;
            // SAFETY: `dev` comes from `device::get` after `init`.
            let attr = |a| unsafe { device::get_attribute(dev, a) }.ok();
            let domain = attr(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?;
            let bus = attr(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?;
            let slot = attr(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?;
            Some(format!("{domain:08X}:{bus:02X}:{slot:02X}.0"))
        }
        _ => {
            let _ = local_rank;
            None
        }
    }
}

/// Kernels burn's CUDA backend has compiled in this process so far (`None`
/// where nothing is compiled at run time: CPU).
pub fn compiled_kernels(device: crate::config::Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        crate::config::Device::Cuda => Some(cubecl_cuda::compiled_kernels()),
        _ => None,
    }
}

/// Reads memory in use: the device's used memory on CUDA (as `nvidia-smi`
/// counts it: burn's pool included), the process RSS on CPU.
pub fn memory_probe(device: crate::config::Device, local_rank: usize) -> Box<dyn Fn() -> u64> {
    match device {
        #[cfg(feature = "cuda")]
        crate::config::Device::Cuda => {
            let ctx = cudarc::driver::CudaContext::new(local_rank).ok();
            Box::new(move || {
                ctx.as_ref()
                    .and_then(|c| c.bind_to_thread().ok())
                    .and_then(|_| cudarc::driver::result::mem_get_info().ok())
                    .map(|(free, total)| (total - free) as u64)
                    .unwrap_or(0)
            })
        }
        _ => {
            let _ = local_rank;
            Box::new(crate::metrics::process_rss_bytes)
        }
    }
}
