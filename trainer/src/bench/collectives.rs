//! `bamba-train bench --collectives`: FSDP's collectives' bus bandwidth.

use std::time::Instant;

use anyhow::Result;
use serde_json::json;

/// Bus bandwidth of FSDP's two collectives on `mb` MB of f32 (nccl-tests'
/// convention: `(n - 1) / n * bytes / time`), over the runtime's shard group.
pub fn collectives<B: burn::tensor::backend::Backend>(
    rt: &crate::runtime::Runtime<B>,
    device: &B::Device,
    mb: usize,
) -> Result<()> {
    use burn::tensor::Tensor;
    let comm = &*rt.shard_comm;
    let n = comm.size();
    let full = mb * (1 << 20) / 4 / n * n;
    let big = Tensor::<B, 1>::ones([full], device);
    let small = Tensor::<B, 1>::ones([full / n], device);
    let iters = 20;
    let run = |name: &str, f: &mut dyn FnMut() -> Result<Tensor<B, 1>>| -> Result<()> {
        for _ in 0..3 {
            f()?;
        }
        let _ = B::sync(device);
        let t = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        let _ = B::sync(device);
        let dt = t.elapsed().as_secs_f64() / iters as f64;
        let bytes = (full * 4) as f64;
        if rt.rank == 0 {
            println!(
                "{}",
                json!({"collective": name, "ranks": n, "bytes": bytes, "time_ms": dt * 1e3,
                    "bus_gb_s": (n as f64 - 1.0) / n as f64 * bytes / dt / 1e9})
            );
        }
        Ok(())
    };
    run("all_gather", &mut || comm.all_gather(small.clone()))?;
    run("reduce_scatter", &mut || {
        comm.reduce_scatter_mean(big.clone())
    })?;
    Ok(())
}
