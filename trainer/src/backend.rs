//! The burn backends bamba-train runs on, chosen at run time by `--device`.
//!
//! CPU: burn-flex. Of burn 0.21's CPU backends that support f32 autodiff it is
//! the fastest here: its matmuls go through the `gemm` crate (multi-threaded,
//! AVX2/AVX-512), transposed views multiply without copies, and cloning is
//! O(1) copy-on-write; burn-ndarray's matmul is the slower `matrixmultiply`
//! and burn-cpu needs an MLIR/LLVM toolchain at build time.
//! CUDA: burn's CubeCL CUDA runtime (feature `cuda`), f32 or bf16 compute.

use burn::backend::{Autodiff, Flex};

pub type Cpu = Flex;
pub type CpuTrain = Autodiff<Cpu>;

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
            #[cfg(feature = "cuda")]
            (DeviceKind::Cuda, Precision::F32) => {
                type $B = $crate::backend::CudaTrain<f32>;
                let $dev = Default::default();
                $body
            }
            #[cfg(feature = "cuda")]
            (DeviceKind::Cuda, Precision::Bf16) => {
                type $B = $crate::backend::CudaTrain<burn::tensor::bf16>;
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
