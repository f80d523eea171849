//! `bamba-train bench`: warm-up plus timed full training steps (forward,
//! backward, optimizer, communication) of a config, printed as JSON lines:
//! tokens/s per device, MFU, device memory, and the step split into phases.
//!
//! Timed steps run exactly as in training (no extra synchronisation; the
//! logged loss is the one host read per step). The phase split comes from
//! separate profiled steps that wait for the device at each phase end.
//! `--ops`, `--kernels` and `--collectives` run instead of the steps:
//! [`ops`], [`kernels`], [`collectives`].

mod collectives;
mod kernels;
mod ops;

pub use collectives::collectives;
pub use kernels::kernels;
pub use ops::ops;

use std::time::Instant;

use anyhow::Result;
use bamba_model::BambaAutodiffBackend;
use serde_json::json;

use crate::metrics::mfu;
use crate::train::{PhaseTimes, Trainer};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Untimed steps first (kernel compilation, allocator warm-up); up to 4
    /// more while a step still compiles kernels (CUDA) or grows the memory
    /// pools (0: none at all).
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: u64,
    /// Profiled steps (device sync at each phase end) for the phase split.
    #[arg(long, default_value_t = 2)]
    pub profile_steps: u64,
    /// Instead of training steps, time forward and backward of each piece of
    /// the model (layers, conv, SSD scan, projections, head) at the config's
    /// shape, and the fused AdamW's memory bandwidth (GPU only).
    #[arg(long)]
    pub ops: bool,
    /// Instead of training steps, check each fused kernel (forward and
    /// gradients) against the same math in burn's ops, in f32 and bf16, and
    /// print the largest differences.
    #[arg(long)]
    pub kernels: bool,
    /// With `--ops`: only these pieces (comma-separated names, as printed);
    /// with `--kernels`: only the checks whose names start with one of these.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Instead of training steps, measure all-gather and reduce-scatter bus
    /// bandwidth of the shard group (as nccl-tests reports it) on this many MB.
    #[arg(long, value_name = "MB")]
    pub collectives: Option<usize>,
    /// Sample the host threads' stacks during the timed steps (with `--ops`:
    /// the whole run) and write them to FILE as folded stacks (flamegraph
    /// input). Needs an unstripped binary.
    #[arg(long, value_name = "FILE")]
    pub host_profile: Option<std::path::PathBuf>,
    /// Run this one process as rank 0 of an N-rank job of the config's
    /// strategy, on one device: its state shard, its share of the global
    /// batch, every gather, buffer and kernel of a rank, but the
    /// collectives replaced by copies of its own piece (no transfers; the
    /// weights are not a real model's). What a rank of Bamba-9B on N GPUs
    /// computes and holds, measured where only one GPU is at hand. hsdp
    /// needs `parallelism.shard_group_size`.
    #[arg(long, value_name = "N")]
    pub simulate_ranks: Option<usize>,
}

/// Warm-up steps `bench` adds at most while steps still compile kernels or
/// grow the pools.
const EXTRA_WARMUP: u64 = 4;

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
        "strategy": format!("{:?}", t.cfg.parallelism.strategy).to_lowercase(),
        "simulated_ranks": args.simulate_ranks,
        "step_kind": if t.cfg.parallelism.streamed() { "per_layer" } else { "whole_model" },
        "cuda_memory": crate::cuda_memory::Preset::from_env().map(|p| format!("{p:?}").to_lowercase()).unwrap_or_default(),
        "state_bytes_per_rank": t.state_bytes()}),
    );
    let mut peak_mem = 0u64;
    // Warm-up: `--warmup` steps, then more (up to EXTRA_WARMUP) while the
    // last one still compiled kernels on any rank. Some kernels first
    // appear in a later step (likely burn's in-place variants, picked when
    // an input happens to be free by then), and a timed step that compiles
    // measures the compiler: on the 9B's layers, NVRTC took a third of the
    // host's samples in the steps after one warm-up step. Likewise while a
    // step after the first still grows the pools (the 1B's took 64 MB more
    // in its fourth step, then none over 30).
    let device = t.cfg.training.device;
    let compiled = move || crate::backend::compiled_kernels(device);
    let pools = device == crate::config::Device::Cuda;
    let (mut warmups, mut unsettled, mut last_mem) = (0, false, 0);
    loop {
        if warmups >= args.warmup
            && (warmups == 0 || warmups >= args.warmup + EXTRA_WARMUP || !t.any_rank(unsettled)?)
        {
            break;
        }
        let before = compiled();
        let s = Instant::now();
        let (loss, _, _) = t.train_step(false)?;
        let dt = s.elapsed().as_secs_f64();
        let m = memory();
        peak_mem = peak_mem.max(m);
        let fresh = compiled().zip(before).map(|(a, b)| a - b);
        warmups += 1;
        // (The CPU's probe is the process RSS, which moves on its own.)
        let grew = pools && warmups > 1 && m > last_mem;
        unsettled = fresh.unwrap_or(0) > 0 || grew;
        last_mem = m;
        line(
            json!({"warmup_step": warmups, "loss": loss, "step_time_s": dt,
            "kernels_compiled": fresh, "memory_bytes": m}),
        );
    }
    let compiled_before_timed = compiled();
    let mut times = vec![];
    let mut mem = vec![];
    // The window is timed from an idle device to an idle device: a step's
    // own time ends when its loss is read, before its optimizer has run
    // (that overlaps the next step's enqueue), so the first timed step
    // alone would leave one optimizer out of the mean.
    // Rank 0's GPU clock and power over the window (nvidia-smi, if there).
    let clocks = crate::backend::pci_bus_id(device, t.local_rank())
        .filter(|_| rank0)
        .and_then(|id| crate::clocks::ClockSampler::start(&id));
    t.sync();
    let window = Instant::now();
    let profiler = args
        .host_profile
        .as_deref()
        .map(crate::host_profile::HostProfile::start)
        .transpose()?;
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
    t.sync();
    let window = window.elapsed().as_secs_f64();
    let clocks = clocks.and_then(|c| c.finish());
    let compiled_in_timed = compiled().zip(compiled_before_timed).map(|(a, b)| a - b);
    if let (Some(p), Some(path)) = (profiler, &args.host_profile) {
        let samples = p.finish()?;
        line(json!({"bench": "host_profile", "path": path, "samples": samples}));
    }
    // One step with the memory marks (BAMBA_MEMORY_TRACE).
    if crate::memtrace::requested() {
        crate::memtrace::start();
        t.train_step(false)?;
        for (label, in_use, reserved) in crate::memtrace::finish() {
            line(json!({"memory_trace": label, "in_use": in_use, "reserved": reserved}));
        }
    }
    t.phases = Some(PhaseTimes::default());
    for _ in 0..args.profile_steps {
        t.train_step(false)?;
    }
    let phases = t.phases.take().unwrap_or_default();
    let n = args.profile_steps.max(1) as f64;
    let per_step = |m: &std::collections::BTreeMap<&'static str, f64>| {
        m.iter()
            .map(|(k, v)| (k.to_string(), json!(v / n)))
            .collect::<serde_json::Map<_, _>>()
    };
    let mean = if times.is_empty() {
        0.0
    } else {
        window / times.len() as f64
    };
    let tps = tokens / mean / world;
    let summary = json!({
        "bench": "summary",
        "device": device_name,
        "world": world,
        "simulated_ranks": args.simulate_ranks,
        "params": params,
        "step_time_s": mean,
        "tokens_per_s": tokens / mean,
        "tokens_per_s_per_device": tps,
        "mfu": mfu(flops, tps, peak),
        "peak_tflops": peak,
        "peak_memory_bytes": peak_mem,
        "memory_growth_bytes": mem.last().copied().unwrap_or(0) as i64 - mem.first().copied().unwrap_or(0) as i64,
        "warmup_steps": warmups,
        "kernels_compiled_in_timed_steps": compiled_in_timed,
        "gpu_clocks": clocks,
        "phase_s": per_step(&phases.wall),
        "phase_host_s": per_step(&phases.host),
    });
    line(summary.clone());
    Ok(summary)
}
