//! `bamba-train bench`: warm-up plus timed full training steps (forward,
//! backward, optimizer, communication) of a config, printed as JSON lines:
//! tokens/s per device, MFU, device memory, and the step split into phases.
//!
//! Timed steps run exactly as in training (no extra synchronisation; the
//! logged loss is the one host read per step). The phase split comes from
//! separate profiled steps that wait for the device at each phase end.

use std::time::Instant;

use anyhow::Result;
use bamba_model::BambaAutodiffBackend;
use serde_json::json;

use crate::metrics::mfu;
use crate::train::{PhaseTimes, Trainer};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Untimed steps first (kernel compilation, allocator warm-up).
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: u64,
    /// Profiled steps (device sync at each phase end) for the phase split.
    #[arg(long, default_value_t = 2)]
    pub profile_steps: u64,
}

/// Device memory in use (bytes) as the driver reports it, or the process RSS on CPU.
pub type MemoryProbe = Box<dyn Fn() -> u64>;

pub fn run<B: BambaAutodiffBackend>(
    mut t: Trainer<B>,
    args: &BenchArgs,
    device_name: &str,
    memory: MemoryProbe,
) -> Result<serde_json::Value> {
    let world = t.world() as f64;
    let tokens = t.cfg.tokens_per_step() as f64;
    let flops = t.model_cfg.flops_per_token(t.cfg.data.seq_len);
    let peak = t
        .cfg
        .logging
        .peak_tflops
        .unwrap_or_else(|| crate::metrics::default_peak_tflops(device_name));
    let params = t.model_cfg.num_parameters();
    let rank0 = t.is_rank0();
    let line = |v: serde_json::Value| {
        if rank0 {
            println!("{v}");
        }
    };
    line(
        json!({"bench": "start", "device": device_name, "world": world, "params": params,
        "tokens_per_step": tokens, "seq_len": t.cfg.data.seq_len,
        "precision": format!("{:?}", t.cfg.training.precision).to_lowercase(),
        "strategy": format!("{:?}", t.cfg.parallelism.strategy).to_lowercase()}),
    );
    let mut peak_mem = 0u64;
    for i in 0..args.warmup {
        let s = Instant::now();
        let (loss, _, _) = t.train_step(false)?;
        peak_mem = peak_mem.max(memory());
        line(json!({"warmup_step": i + 1, "loss": loss, "step_time_s": s.elapsed().as_secs_f64()}));
    }
    let mut times = vec![];
    let mut mem = vec![];
    for i in 0..args.steps {
        let s = Instant::now();
        let (loss, _, _) = t.train_step(false)?;
        let dt = s.elapsed().as_secs_f64();
        let m = memory();
        peak_mem = peak_mem.max(m);
        times.push(dt);
        mem.push(m);
        let tps = tokens / dt / world;
        line(json!({"step": i + 1, "loss": loss, "step_time_s": dt,
            "tokens_per_s_per_device": tps, "mfu": mfu(flops, tps, peak), "memory_bytes": m}));
    }
    t.phases = Some(PhaseTimes::default());
    for _ in 0..args.profile_steps {
        t.train_step(false)?;
    }
    let phases = t.phases.take().unwrap_or_default();
    let n = args.profile_steps.max(1) as f64;
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let tps = tokens / mean / world;
    let summary = json!({
        "bench": "summary",
        "device": device_name,
        "world": world,
        "params": params,
        "step_time_s": mean,
        "tokens_per_s": tokens / mean,
        "tokens_per_s_per_device": tps,
        "mfu": mfu(flops, tps, peak),
        "peak_tflops": peak,
        "peak_memory_bytes": peak_mem,
        "memory_growth_bytes": mem.last().copied().unwrap_or(0) as i64 - mem.first().copied().unwrap_or(0) as i64,
        "phase_s": {
            "gather": phases.gather_s / n,
            "forward": phases.forward_s / n,
            "backward": phases.backward_s / n,
            "accumulate": phases.accumulate_s / n,
            "streamed_forward_backward": phases.streamed_s / n,
            "optimizer": phases.optimizer_s / n,
        },
    });
    line(summary.clone());
    Ok(summary)
}
