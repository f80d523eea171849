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
    /// Run this one process as rank 0 of an N-rank fsdp job, on one device:
    /// its state shard, its share of the global batch, the whole model
    /// gathered layer by layer, every buffer and kernel of a rank, but the
    /// collectives replaced by copies of its own piece (no transfers; the
    /// weights are not a real model's). What a rank of Bamba-9B on 2 GPUs
    /// computes and holds, measured where only one GPU is at hand.
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

/// `bamba-train bench --ops`: forward and backward of the model's pieces at
/// the config's shape (one Mamba layer, one attention layer, the conv, the
/// SSD scan, one projection, the LM head with loss), each timed alone with a
/// device sync, to show where a step's time goes.
pub fn ops<B: BambaAutodiffBackend>(
    model_cfg: &bamba_model::BambaConfig,
    batch: usize,
    seq: usize,
    compute: burn::tensor::DType,
    only: &[String],
    device: &B::Device,
) -> Result<()> {
    use bamba_model::init::InitSource;
    use bamba_model::layer::BambaDecoderLayer;
    use bamba_model::linear::Linear;
    use bamba_model::rope::rope_tables;
    use bamba_model::ssd::ssd_chunked;
    use bamba_model::{VarBuilder, causal_lm_loss};
    use burn::module::Module;
    use burn::tensor::{Distribution, Int, Tensor};

    let source = InitSource {
        cfg: model_cfg,
        seed: 0,
    };
    let vb = VarBuilder::<B>::new(&source, device);
    let cast = |t: Tensor<B, 3>| t.cast(compute).detach().require_grad();
    let rand = |shape: [usize; 3]| {
        cast(Tensor::<B, 3>::random(
            shape,
            Distribution::Normal(0.0, 1.0),
            device,
        ))
    };
    let time = |name: &str, f: &mut dyn FnMut() -> Tensor<B, 1>| {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            return;
        }
        for round in 0..3 {
            let _ = B::sync(device);
            let t0 = Instant::now();
            let out = f();
            let _ = B::sync(device);
            let t1 = Instant::now();
            let _grads = out.backward();
            let _ = B::sync(device);
            let t2 = Instant::now();
            if round == 2 {
                println!(
                    "{}",
                    json!({"op": name, "forward_ms": (t1 - t0).as_secs_f64() * 1e3,
                        "backward_ms": (t2 - t1).as_secs_f64() * 1e3})
                );
            }
        }
    };
    // A scalar from one position: a full `sum()` would add a reduction
    // over the whole output to the piece's time (the backward still
    // computes every gradient).
    fn probe<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, 1> {
        t.narrow(1, 0, 1).sum()
    }
    // What one kernel launch costs the host (enqueue to the device thread,
    // its launch, the driver): many tiny ops timed to one sync. A step of a
    // few thousand launches is launch-bound when this times the count nears
    // the step time.
    if only.is_empty() || only.iter().any(|o| o == "launch") {
        let n = 2000;
        let tiny = Tensor::<B::InnerBackend, 1>::ones([256], device);
        let per_launch = |f: &dyn Fn(Tensor<B::InnerBackend, 1>) -> Tensor<B::InnerBackend, 1>| {
            let mut y = f(tiny.clone());
            let _ = B::sync(device);
            let t = Instant::now();
            for _ in 0..n {
                y = f(y);
            }
            let _ = B::sync(device);
            drop(y);
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        };
        let burn_us = per_launch(&|y| y.add_scalar(1.0));
        let fused_us = per_launch(&|y| bamba_model::ops::sum_squares(y).repeat_dim(0, 256));
        println!(
            "{}",
            json!({"op": "launch", "burn_op_us": burn_us,
                "fused_plus_burn_op_us": fused_us, "ops": n})
        );
    }
    if only.is_empty() || only.iter().any(|o| o == "adamw") {
        adamw_bandwidth::<B>(device);
    }
    #[cfg(feature = "cuda")]
    if only.iter().any(|o| o == "allocator") {
        allocator_presets();
    }
    let h = model_cfg.hidden_size;
    let (b, l) = (batch, seq);
    let lp = vb.pp("model").pp("layers");
    let mamba_i = (0..model_cfg.num_hidden_layers)
        .find(|&i| !model_cfg.is_attention(i))
        .unwrap_or(0);
    let mamba = BambaDecoderLayer::<B>::new(&lp.pp(mamba_i), model_cfg, mamba_i)?
        .map(&mut crate::forward::CastParams(compute));
    let rope = rope_tables(l, model_cfg.rotary_dim(), model_cfg.rope_theta, device);
    let x = rand([b, l, h]);
    time("mamba_layer", &mut || {
        probe(mamba.forward(x.clone(), &rope))
    });
    let mixer = mamba.mamba.as_ref().expect("a mamba layer");
    time("mamba_mixer", &mut || probe(mixer.forward(x.clone(), None)));
    time("in_proj", &mut || probe(mixer.in_proj.forward(x.clone())));
    time("mlp", &mut || {
        probe(mamba.feed_forward.forward(x.clone(), None))
    });
    time("rmsnorm", &mut || {
        probe(mamba.input_layernorm.forward(x.clone()))
    });
    let cd = model_cfg.conv_dim();
    let xc = rand([b, l, cd]);
    time("conv1d", &mut || {
        probe(mixer.conv1d.forward_silu(xc.clone()))
    });
    let di = model_cfg.d_inner();
    let (y, z) = (rand([b, l, di]), rand([b, l, di]));
    time("gated_norm", &mut || {
        probe(mixer.norm.forward(y.clone(), z.clone()))
    });
    let (nh, p, g, n) = (
        model_cfg.mamba_n_heads,
        model_cfg.mamba_d_head,
        model_cfg.mamba_n_groups,
        model_cfg.mamba_d_state,
    );
    let r4 = |s: [usize; 4]| {
        Tensor::<B, 4>::random(s, Distribution::Normal(0.0, 1.0), device)
            .cast(compute)
            .require_grad()
    };
    let (xs, bm, cm) = (r4([b, l, nh, p]), r4([b, l, g, n]), r4([b, l, g, n]));
    let dt = Tensor::<B, 3>::random([b, l, nh], Distribution::Uniform(0.001, 0.1), device)
        .require_grad();
    let a = Tensor::<B, 1>::random([nh], Distribution::Uniform(-8.0, -1.0), device);
    let d = Tensor::<B, 1>::random([nh], Distribution::Normal(0.0, 1.0), device).cast(compute);
    time("ssd_chunked", &mut || {
        probe(ssd_chunked(
            xs.clone(),
            dt.clone(),
            a.clone(),
            bm.clone(),
            cm.clone(),
            d.clone(),
            model_cfg.mamba_chunk_size,
            false,
        ))
    });
    if let Some(ai) = model_cfg.attn_layer_indices.first().copied() {
        let attn = BambaDecoderLayer::<B>::new(&lp.pp(ai), model_cfg, ai)?
            .map(&mut crate::forward::CastParams(compute));
        time("attention_layer", &mut || {
            probe(attn.forward(x.clone(), &rope))
        });
    }
    let head = Linear::<B>::new(&vb.pp("lm_head"), h, model_cfg.vocab_size, false)?
        .map(&mut crate::forward::CastParams(compute));
    let targets = Tensor::<B, 2, Int>::zeros([b, l], device);
    time("lm_head_loss", &mut || {
        causal_lm_loss(head.forward(x.clone()), targets.clone(), 0.0)
    });
    Ok(())
}

/// `--ops --only adamw`: the fused AdamW alone, in place over 2^28 f32
/// parameters with a bf16 gradient and the bf16 copy (as a bf16 model on one
/// GPU steps): 28 bytes of memory traffic per parameter, so its time against
/// the memory's bandwidth. Nothing on a backend without the fused kernel.
fn adamw_bandwidth<B: BambaAutodiffBackend>(device: &B::Device) {
    use bamba_model::BambaBackend;
    use bamba_model::ops::{AdamWHyper, AdamWState};
    use burn::tensor::{DType, Distribution, Tensor};
    type I<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
    if !<I<B> as BambaBackend>::bamba_fused() {
        return; // no fused kernel: nothing to time (and 3.5 GB not to allocate)
    }
    let n = 1usize << 28;
    let rnd =
        |lo: f64, hi: f64| Tensor::<I<B>, 1>::random([n], Distribution::Uniform(lo, hi), device);
    let prim = |t: Tensor<I<B>, 1>| t.into_primitive().tensor();
    let grad = prim(rnd(-1.0, 1.0).cast(DType::BF16));
    let (mut p, mut m, mut v) = (
        prim(rnd(-1.0, 1.0)),
        prim(rnd(-0.1, 0.1)),
        prim(rnd(0.0, 0.01)),
    );
    let h = AdamWHyper {
        beta1: 0.9,
        beta2: 0.95,
        lr_bc1: 1e-4,
        inv_sqrt_bc2: 1.0,
        eps: 1e-8,
        lr_wd: 1e-5,
    };
    let mut best = f64::MAX;
    for _ in 0..5 {
        let state = AdamWState {
            param: p,
            grad: vec![(grad.clone(), 0)],
            exp_avg: m,
            exp_avg_sq: v,
            no_decay: vec![(0, 5)],
            grad_scale: None,
            bf16_copy: true,
        };
        let _ = B::sync(device);
        let t = Instant::now();
        let Some(([np, nm, nv], copy)) = <I<B> as BambaBackend>::bamba_adamw(state, &h) else {
            return;
        };
        let _ = B::sync(device);
        best = best.min(t.elapsed().as_secs_f64());
        (p, m, v) = (np, nm, nv);
        drop(copy);
    }
    println!(
        "{}",
        json!({"op": "adamw", "params": n, "ms": best * 1e3,
            "gb_per_s": 28.0 * n as f64 / best / 1e9})
    );
}

/// `--ops --only allocator`: what one reservation costs in each of
/// `cuda_memory`'s pool presets, on host memory (cubecl's pool logic is the
/// same for every storage), with a live set like a training step's: small
/// buffers (metadata, per-head vectors), mid-size and large tensors. Per
/// launch, burn's CUDA backend reserves two or three times.
#[cfg(feature = "cuda")]
fn allocator_presets() {
    use crate::cuda_memory::{Preset, configuration};
    use burn_cubecl::cubecl::ir::MemoryDeviceProperties;
    use cubecl_runtime::logging::ServerLogger;
    use cubecl_runtime::memory_management::{MemoryManagement, MemoryManagementOptions};
    use cubecl_runtime::storage::BytesStorage;
    let (max_page, align) = (20u64 << 30, 512u64); // an 80 GB GPU's
    for live_small in [100usize, 1000, 3000, 6000] {
        let mut row = serde_json::Map::new();
        for preset in [
            Preset::SubSlices,
            Preset::Exclusive,
            Preset::Mixed,
            Preset::Bucketed,
        ] {
            let props = MemoryDeviceProperties {
                max_page_size: max_page,
                alignment: align,
            };
            let mut mm = MemoryManagement::from_configuration(
                BytesStorage::default(),
                &props,
                configuration(preset, max_page, align),
                std::sync::Arc::new(ServerLogger::default()),
                MemoryManagementOptions::new("bench"),
            );
            // A fixed pseudo-random live set: small (64 B - 64 KiB), and a
            // tenth as many 0.5-4.5 MiB and 8-72 MiB tensors.
            let mut x = 0x9e3779b97f4a7c15u64;
            let mut rnd = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let mut live = Vec::new();
            for _ in 0..live_small {
                live.push(mm.reserve(64 + rnd() % 65536).expect("host memory"));
            }
            for _ in 0..live_small / 10 {
                live.push(
                    mm.reserve((512 << 10) + rnd() % (4 << 20))
                        .expect("host memory"),
                );
                live.push(
                    mm.reserve((8 << 20) + rnd() % (64 << 20))
                        .expect("host memory"),
                );
            }
            // Steady state: per op a metadata buffer and an output, freed a little later.
            let n = 20_000;
            let mut recent = std::collections::VecDeque::new();
            let t = Instant::now();
            for i in 0..n {
                let meta = mm.reserve(256).expect("host memory");
                let size = if i % 3 == 0 {
                    (16 << 20) + (i % 5) as u64 * 4096
                } else {
                    4096 + (i % 7) as u64 * 1024
                };
                recent.push_back((meta, mm.reserve(size).expect("host memory")));
                if recent.len() > 64 {
                    recent.pop_front();
                }
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / (2 * n) as f64;
            row.insert(format!("{preset:?}").to_lowercase() + "_us", json!(us));
        }
        row.insert("op".into(), json!("allocator"));
        row.insert(
            "live_allocations".into(),
            json!(live_small + live_small / 5),
        );
        println!("{}", serde_json::Value::Object(row));
    }
}

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

/// `bamba-train bench --kernels`: every fused piece against its burn-ops
/// reference (`bamba_model::ops::reference`) on random inputs, forward and
/// the gradient of each input, as JSON lines (`max_abs`, `rel` = max abs
/// difference over the reference's max abs). On backends without fused
/// kernels both sides are the reference. `large` adds the 1B model's shapes.
pub fn kernels<B: BambaAutodiffBackend>(
    device: &B::Device,
    large: bool,
    only: &[String],
) -> Result<bool> {
    use bamba_model::ops::{self, reference};
    use burn::tensor::{DType, Distribution, Tensor};

    type Inputs<B> = Vec<Tensor<B, 1>>;
    // Flattened inputs in, one output out, so one harness serves every piece.
    type Piece<'a, B> = Box<dyn Fn(&Inputs<B>) -> Tensor<B, 1> + 'a>;
    let mut ok = true;
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| name.starts_with(o.as_str()));
    // First (quick): gradient packing (FSDP's flat buffers): bf16 and f32 parts at offsets,
    // gaps zeroed, then accumulated in place; bf16 parts copied into a bf16
    // buffer, then summed into f32; checked on the host.
    if wanted("pack") {
        type I<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
        let a = Tensor::<I<B>, 2>::random([3, 5], Distribution::Normal(0.0, 1.0), device)
            .cast(DType::BF16);
        let b = Tensor::<I<B>, 2>::random([1, 7], Distribution::Normal(0.0, 1.0), device);
        let host = |t: Tensor<I<B>, 2>| t.cast(DType::F32).into_data().to_vec::<f32>().unwrap();
        let (ha, hb) = (host(a.clone()), host(b.clone()));
        let once = ops::pack(vec![(a.clone(), 2), (b.clone(), 20)], 40, None, DType::F32);
        let twice = ops::pack(
            vec![(a.clone(), 2), (b.clone(), 20)],
            40,
            Some(once),
            DType::F32,
        );
        let got = twice.into_data().to_vec::<f32>().unwrap();
        let mut want = vec![0f32; 40];
        want[2..17].copy_from_slice(&ha);
        want[20..27].copy_from_slice(&hb);
        let max_abs = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - 2.0 * w).abs())
            .fold(0f32, f32::max);
        let pass = max_abs == 0.0;
        ok &= pass;
        println!(
            "{}",
            json!({"kernel": "pack_f32", "dtype": "BF16+F32", "value": "output",
                "max_abs": max_abs, "rel": max_abs, "pass": pass})
        );
        // bf16 parts into a bf16 buffer (offsets 16-byte aligned and not), then a sum.
        let b = b.cast(DType::BF16);
        let hb = host(b.clone());
        let lp = ops::pack(vec![(a.clone(), 8), (b.clone(), 29)], 40, None, DType::BF16);
        let lp_dtype = lp.dtype();
        let sum = ops::pack(vec![(a, 8), (b, 29)], 40, Some(lp.clone()), DType::BF16);
        let (lp, sum) = (
            lp.cast(DType::F32).into_data().to_vec::<f32>().unwrap(),
            sum.into_data().to_vec::<f32>().unwrap(),
        );
        let mut want = [0f32; 40];
        want[8..23].copy_from_slice(&ha);
        want[29..36].copy_from_slice(&hb);
        let max_abs = (0..40)
            .map(|i| (lp[i] - want[i]).abs().max((sum[i] - 2.0 * want[i]).abs()))
            .fold(0f32, f32::max);
        let pass = max_abs == 0.0 && lp_dtype == DType::BF16;
        ok &= pass;
        println!(
            "{}",
            json!({"kernel": "pack_bf16", "dtype": "BF16", "value": "copy+sum",
                "max_abs": max_abs, "rel": max_abs, "pass": pass})
        );
    }
    // The gradient norm's sum of squares: against burn's own reduction, and
    // the same bits on a second run (no float atomics).
    let sizes = [
        (1usize, DType::F32),
        (1000, DType::F32),
        (3_000_001, DType::F32),
    ];
    for (n, dtype) in sizes
        .into_iter()
        .chain([(1003, DType::BF16), (3_000_001, DType::BF16)])
        .filter(|_| wanted("sum_squares"))
    {
        let x = Tensor::<B, 1>::random([n], Distribution::Normal(0.0, 1.0), device)
            .inner()
            .cast(dtype);
        let run = || -> f32 { ops::sum_squares(x.clone()).into_scalar().elem() };
        let (a, b) = (run(), run());
        let x = x.cast(DType::F32);
        let want: f32 = x.clone().powf_scalar(2.0).sum().into_scalar().elem();
        let rel = (a - want).abs() / want.abs().max(1e-30);
        let pass = rel <= 1e-5 && a.to_bits() == b.to_bits();
        ok &= pass;
        println!(
            "{}",
            json!({"kernel": "sum_squares", "dtype": format!("{dtype:?}"), "value": format!("n={n}"),
                "max_abs": (a - want).abs(), "rel": rel, "repeatable": a.to_bits() == b.to_bits(),
                "pass": pass})
        );
    }
    // Slices of one tensor add their gradients into one buffer (in place):
    // against burn's own `narrow`, with overlapping slices and a use of the
    // whole tensor, in f32 and bf16.
    for dtype in [DType::F32, DType::BF16]
        .into_iter()
        .filter(|_| wanted("add_narrow"))
    {
        let x0 = Tensor::<B, 3>::random([2, 37, 300], Distribution::Normal(0.0, 1.0), device)
            .cast(dtype);
        let w = Tensor::<B, 3>::random([2, 37, 300], Distribution::Normal(0.0, 1.0), device)
            .cast(dtype);
        let grad = |ours: bool| {
            let x = x0.clone().detach().require_grad();
            let cut = |t: Tensor<B, 3>, start, len| {
                if ours {
                    ops::narrow(t, 2, start, len)
                } else {
                    t.narrow(2, start, len)
                }
            };
            let y = (cut(x.clone(), 0, 100) * 2.0).sum()
                + cut(x.clone(), 100, 190).exp().sum()
                + (cut(x.clone(), 290, 10) * cut(x.clone(), 0, 10)).sum()
                + (x.clone() * w.clone()).sum();
            let g = y.backward();
            x.grad(&g)
                .unwrap()
                .cast(DType::F32)
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        };
        let (ours, burns) = (grad(true), grad(false));
        let max_abs = ours
            .iter()
            .zip(&burns)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = burns.iter().fold(0f32, |m, v| m.max(v.abs()));
        let rel = max_abs / scale.max(1e-30);
        let pass = rel <= if dtype == DType::F32 { 1e-6 } else { 1e-2 };
        ok &= pass;
        println!(
            "{}",
            json!({"kernel": "add_narrow", "dtype": format!("{dtype:?}"), "value": "grad0",
                "max_abs": max_abs, "rel": rel, "pass": pass})
        );
    }
    // Fused AdamW (in place, with the bf16 copy) against the update on the
    // host: f32 gradients in one buffer with no-decay ranges (unaligned
    // ends, the tail); bf16 gradients as pieces with gaps (zero gradient),
    // 4-aligned and not, decaying everywhere.
    // (gradient dtype, no-decay ranges, gradient pieces)
    type Case<'a> = (DType, bool, &'a [(usize, usize)]);
    let cases: [Case; 3] = [
        (DType::F32, true, &[(0, 1003)]),
        (DType::BF16, false, &[(0, 400), (404, 1000)]),
        (DType::BF16, false, &[(0, 5), (9, 1002)]),
    ];
    for (gdtype, masked, pieces) in cases.into_iter().filter(|_| wanted("adamw")) {
        type I<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
        use bamba_model::ops::{AdamWHyper, AdamWState};
        let n = 1003; // four-wide passes and a tail
        let rnd = |lo: f64, hi: f64| {
            Tensor::<I<B>, 1>::random([n], Distribution::Uniform(lo, hi), device)
        };
        let (p, g, m, v) = (
            rnd(-1.0, 1.0),
            rnd(-1.0, 1.0).cast(gdtype),
            rnd(-0.1, 0.1),
            rnd(0.0, 0.01),
        );
        let host = |t: &Tensor<I<B>, 1>| {
            t.clone()
                .cast(DType::F32)
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap()
        };
        let (hp, hm, hv) = (host(&p), host(&m), host(&v));
        let mut hg = vec![0f32; n];
        let all_g = host(&g);
        for &(lo, hi) in pieces {
            hg[lo..hi].copy_from_slice(&all_g[lo..hi]);
        }

        let no_decay = if masked {
            vec![(0, 5), (17, 102), (1001, 1003)]
        } else {
            vec![]
        };
        let mut hmask = vec![1f32; n];
        for &(lo, hi) in &no_decay {
            hmask[lo..hi].fill(0.0);
        }
        let h = AdamWHyper {
            beta1: 0.9,
            beta2: 0.95,
            lr_bc1: 1e-3 / 0.1,
            inv_sqrt_bc2: 1.0 / 0.05f64.sqrt(),
            eps: 1e-8,
            lr_wd: 1e-4,
        };
        let prim = |t: Tensor<I<B>, 1>| t.into_primitive().tensor();
        let grad = pieces
            .iter()
            .map(|&(lo, hi)| (prim(g.clone().narrow(0, lo, hi - lo)), lo))
            .collect();
        let state = AdamWState {
            param: prim(p),
            grad,
            exp_avg: prim(m),
            exp_avg_sq: prim(v),
            no_decay,
            grad_scale: None,
            bf16_copy: true,
        };
        if let Some(([np, nm, nv], copy)) =
            <I<B> as bamba_model::BambaBackend>::bamba_adamw(state, &h)
        {
            let t = |x| {
                host(&Tensor::<I<B>, 1>::from_primitive(
                    burn::tensor::TensorPrimitive::Float(x),
                ))
            };
            let (np, nm, nv) = (t(np), t(nm), t(nv));
            let lp = copy.map(t);
            let mut max_abs = 0f32;
            for i in 0..n {
                let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
                let mut pi = hp[i] * (1.0 - hmask[i] * h.lr_wd as f32);
                let mi = b1 * hm[i] + (1.0 - b1) * hg[i];
                let vi = b2 * hv[i] + (1.0 - b2) * hg[i] * hg[i];
                pi -= mi / (vi.sqrt() * h.inv_sqrt_bc2 as f32 + h.eps as f32) * h.lr_bc1 as f32;
                let lp_err = lp
                    .as_ref()
                    .map_or(0.0, |lp| (lp[i] - pi).abs() - pi.abs() / 128.0);
                max_abs = max_abs
                    .max((np[i] - pi).abs())
                    .max((nm[i] - mi).abs())
                    .max((nv[i] - vi).abs())
                    .max(lp_err.max(0.0));
            }
            let pass = max_abs <= 1e-5 && lp.is_some();
            ok &= pass;
            let value = format!(
                "param+moments+bf16, grad in {} piece(s){}",
                pieces.len(),
                if masked { ", no-decay ranges" } else { "" }
            );
            println!(
                "{}",
                json!({"kernel": "adamw", "dtype": format!("{gdtype:?}"), "value": value,
                    "max_abs": max_abs, "rel": max_abs, "pass": pass})
            );
        }
    }
    let mut check =
        |name: &str, dtype: DType, shapes: &[Vec<usize>], fused: Piece<B>, refr: Piece<B>| {
            if !wanted(name) {
                return;
            }
            // Each line carries the check's wall time (both sides, twice the
            // fused one): device calls are scarce, and this shows where the
            // checks' own time goes.
            let start = std::time::Instant::now();
            let inputs: Vec<Tensor<B, 1>> = shapes
                .iter()
                .map(|s| {
                    let n: usize = s.iter().product();
                    Tensor::<B, 1>::random([n], Distribution::Normal(0.0, 1.0), device).cast(dtype)
                })
                .collect();
            // One upstream gradient for both sides (its length from the
            // fused forward: the reference is the slow side).
            let out_len = fused(&inputs).dims()[0];
            let g = Tensor::<B, 1>::random([out_len], Distribution::Normal(0.0, 1.0), device);
            let run = |f: &Piece<B>| {
                let xs: Vec<_> = inputs
                    .iter()
                    .map(|t| t.clone().detach().require_grad())
                    .collect();
                let y = f(&xs);
                let g = g.clone();
                let grads = (y.clone().cast(DType::F32) * g).sum().backward();
                let mut outs = vec![y.cast(DType::F32).inner()];
                for x in &xs {
                    outs.push(
                        x.grad(&grads)
                            .map(|t| t.cast(DType::F32))
                            .unwrap_or_else(|| Tensor::<B, 1>::zeros(x.dims(), device).inner()),
                    );
                }
                outs
            };
            // The fused side twice: its outputs and gradients must be the same
            // bits (no float atomics anywhere; exact resume depends on it).
            let (a, a2, b) = (run(&fused), run(&fused), run(&refr));
            let mut lines = Vec::new();
            for (i, ((a, a2), b)) in a.into_iter().zip(a2).zip(b).enumerate() {
                let what = if i == 0 {
                    "output".to_string()
                } else {
                    format!("grad{}", i - 1)
                };
                let repeatable: bool = a.clone().equal(a2).all().into_scalar().elem();
                let max_abs: f32 = (a - b.clone()).abs().max().into_scalar().elem();
                let scale: f32 = b.abs().max().into_scalar().elem();
                let rel = max_abs / scale.max(1e-12);
                let tol = if dtype == DType::F32 { 1e-4 } else { 5e-2 };
                let pass = rel <= tol && repeatable;
                ok &= pass;
                lines.push(
                    json!({"kernel": name, "dtype": format!("{dtype:?}"), "value": what,
                    "max_abs": max_abs, "rel": rel, "repeatable": repeatable, "pass": pass}),
                );
            }
            let ms = start.elapsed().as_secs_f64() * 1e3;
            for mut line in lines {
                line["ms"] = json!((ms * 10.0).round() / 10.0);
                println!("{line}");
            }
        };
    use burn::tensor::ElementConversion;
    for dtype in [DType::F32, DType::BF16] {
        // Products written in f32 (bf16 operands: the SSD's chunk states),
        // batched, with a transposed operand as the scan passes B^T.
        for (bt, m, k, n) in [(3, 37, 19, 21), (16, 128, 256, 4096)]
            .into_iter()
            .filter(|s| large || s.3 < 1000)
        {
            let ab = move |x: &Inputs<B>| {
                let a = x[0].clone().reshape([1, bt, k, m]).swap_dims(2, 3);
                (a, x[1].clone().reshape([1, bt, k, n]))
            };
            check(
                &format!("matmul_f32_{bt}x{m}x{k}x{n}"),
                dtype,
                &[vec![bt * k * m], vec![bt * k * n]],
                Box::new(move |x| {
                    let (a, b) = ab(x);
                    ops::matmul_f32(a, b).reshape([bt * m * n])
                }),
                Box::new(move |x| {
                    let (a, b) = ab(x);
                    ops::matmul(a.cast(DType::F32), b.cast(DType::F32)).reshape([bt * m * n])
                }),
            );
        }
        for (r, c) in [(37, 19), (4096, 5632)]
            .into_iter()
            .filter(|s| large || s.0 < 1000)
        {
            check(
                &format!("swiglu_{r}x{c}"),
                dtype,
                &[vec![r, c], vec![r, c]],
                Box::new(move |x| {
                    ops::swiglu(
                        x[0].clone().reshape([1, r, c]),
                        x[1].clone().reshape([1, r, c]),
                    )
                    .reshape([r * c])
                }),
                Box::new(move |x| {
                    reference::swiglu(
                        x[0].clone().reshape([1, r, c]),
                        x[1].clone().reshape([1, r, c]),
                    )
                    .reshape([r * c])
                }),
            );
        }
        // Partial tiles (q, p not multiples of 64; p not of 32) and two groups.
        for (b, nc, q, h, p, g) in [
            (2, 3, 37, 4, 5, 2),
            (1, 2, 130, 3, 70, 1),
            (1, 2, 132, 4, 68, 2), // the pipelined kernels' partial tiles (f32 x)
            (1, 2, 136, 4, 72, 2), // the same with bf16 x, two column tiles
            (1, 2, 64, 3, 64, 1),  // bf16 pipelined, one head per block (3 per group)
            (1, 16, 256, 64, 64, 1),
        ]
        .into_iter()
        .filter(|s| large || s.3 < 64)
        {
            // Exact in f32; with bf16 x (as training feeds it, read as
            // bf16) the products run as TF32.
            let f32 = |t: Tensor<B, 1>| t.cast(DType::F32);
            let sc = move |x: &Inputs<B>| f32(x[0].clone()).reshape([b, nc, g, q, q]);
            let cs = move |x: &Inputs<B>| {
                (-f32(x[1].clone()).reshape([b, nc, q, h]).abs() * 0.1).cumsum(2)
            };
            // Time steps are positive.
            let dt = move |x: &Inputs<B>| f32(x[2].clone()).reshape([b, nc, q, h]).abs() + 0.01;
            let xs = move |x: &Inputs<B>| x[3].clone().reshape([b, nc, q, h, p]);
            let n = b * nc * q * h * p;
            let tf32 = dtype != DType::F32;
            check(
                &format!("ssd_diag_{b}x{nc}x{q}x{h}x{p}_g{g}"),
                dtype,
                &[
                    vec![b, nc, g, q, q],
                    vec![b, nc, q, h],
                    vec![b, nc, q, h],
                    vec![b, nc, q, h, p],
                ],
                Box::new(move |x| ops::ssd_diag(sc(x), cs(x), dt(x), xs(x), tf32).reshape([n])),
                Box::new(move |x| reference::ssd_diag(sc(x), cs(x), dt(x), xs(x)).reshape([n])),
            );
            // x into the intra-chunk product, the row scale and the SSD
            // output through one view, as the scan runs it: its gradients
            // add up inside the kernels, and the output's gradient reaches
            // the product in x's dtype.
            let xgrads = move |x: &Inputs<B>, fused: bool| {
                let (s, d) = (f32(x[4].clone()).reshape([b, nc, q, h]), x[5].clone());
                let x4 = x[3].clone().reshape([b, nc * q, h, p]);
                if fused {
                    let x5 = ops::reshape_view(x4, [b, nc, q, h, p]);
                    let yd = ops::ssd_diag(sc(x), cs(x), dt(x), x5.clone(), tf32);
                    let xe = ops::scale_rows(x5.clone(), s);
                    ops::ssd_out_chunks(yd, xe, cs(x), x5, d, None).reshape([n])
                } else {
                    let x5 = x4.reshape([b, nc, q, h, p]);
                    let yd = reference::ssd_diag(sc(x), cs(x), dt(x), x5.clone());
                    let xe = reference::scale_rows(x5.clone(), s);
                    reference::ssd_out(yd, xe, cs(x), x5.reshape([b, nc * q, h, p]), d).reshape([n])
                }
            };
            check(
                &format!("ssd_x_grads_{b}x{nc}x{q}x{h}x{p}_g{g}"),
                dtype,
                &[
                    vec![b, nc, g, q, q],
                    vec![b, nc, q, h],
                    vec![b, nc, q, h],
                    vec![b, nc, q, h, p],
                    vec![b, nc, q, h],
                    vec![h],
                ],
                Box::new(move |x| xgrads(x, true)),
                Box::new(move |x| xgrads(x, false)),
            );
        }
        // The whole scan with its decayed inputs and entering states' part
        // made again in backward against the scan that keeps them: the same
        // kernels, so the same bits.
        for (b, l, h, p, g, n, q) in [(2, 96, 4, 6, 2, 8, 32), (1, 4096, 64, 64, 1, 128, 256)]
            .into_iter()
            .filter(|s| large || s.1 < 4096)
        {
            use bamba_model::ssd::ssd_chunked;
            let f32 = DType::F32;
            let scan = move |x: &Inputs<B>, remake: bool| {
                let r4 = |t: &Tensor<B, 1>, s: [usize; 4]| t.clone().reshape(s);
                let dt = (x[1].clone().cast(f32).abs() * 0.05 + 0.001).reshape([b, l, h]);
                let a = -(x[4].clone().cast(f32).abs() + 0.5);
                ssd_chunked(
                    r4(&x[0], [b, l, h, p]),
                    dt,
                    a,
                    r4(&x[2], [b, l, g, n]),
                    r4(&x[3], [b, l, g, n]),
                    x[5].clone(),
                    q,
                    remake,
                )
                .reshape([b * l * h * p])
            };
            check(
                &format!("ssd_remade_{b}x{l}x{h}x{p}_g{g}"),
                dtype,
                &[
                    vec![b, l, h, p],
                    vec![b, l, h],
                    vec![b, l, g, n],
                    vec![b, l, g, n],
                    vec![h],
                    vec![h],
                ],
                Box::new(move |x| scan(x, true)),
                Box::new(move |x| scan(x, false)),
            );
        }
        for (b, nc, n, h, p) in [(2, 3, 5, 4, 7), (1, 5, 16, 3, 100), (1, 16, 128, 64, 64)]
            .into_iter()
            .filter(|s| large || s.3 < 64)
        {
            let st = move |x: &Inputs<B>| x[0].clone().reshape([b, nc, n, h, p]);
            // Log-decays are negative.
            let a = move |x: &Inputs<B>| -x[1].clone().reshape([b, nc, h]).abs();
            let len = b * nc * n * h * p;
            // Stored in f32 (f32 training) or bf16 (bf16 training).
            for out in [DType::F32, DType::BF16] {
                let f32 = DType::F32;
                check(
                    &format!("ssd_states_{b}x{nc}x{n}x{h}x{p}"),
                    out,
                    &[vec![b, nc, n, h, p], vec![b, nc, h]],
                    Box::new(move |x| {
                        ops::ssd_states(st(x).cast(f32), a(x).cast(f32), out).reshape([len])
                    }),
                    Box::new(move |x| {
                        reference::ssd_states(st(x).cast(f32), a(x).cast(f32))
                            .cast(out)
                            .reshape([len])
                    }),
                );
            }
        }
        // Cumulative log-decays: runs of q / 4 rows (q not a multiple of 4),
        // column blocks of 64 (h not a multiple of 64).
        for (b, nc, q, h) in [(2, 3, 37, 5), (1, 2, 130, 70), (1, 16, 256, 64)]
            .into_iter()
            .filter(|s| large || s.2 < 256)
        {
            let n = b * nc * q * h;
            check(
                &format!("chunk_cumsum_{b}x{nc}x{q}x{h}"),
                DType::F32,
                &[vec![n]],
                Box::new(move |x| {
                    ops::chunk_cumsum(x[0].clone().reshape([b, nc, q, h])).reshape([n])
                }),
                Box::new(move |x| {
                    reference::chunk_cumsum(x[0].clone().reshape([b, nc, q, h])).reshape([n])
                }),
            );
            let dt_cs = move |x: &Inputs<B>| {
                let r = |t: &Tensor<B, 1>| t.clone().reshape([b, nc, q, h]);
                (r(&x[0]), r(&x[1]))
            };
            check(
                &format!("end_decay_{b}x{nc}x{q}x{h}"),
                DType::F32,
                &[vec![n], vec![n]],
                Box::new(move |x| {
                    let (dt, cs) = dt_cs(x);
                    ops::end_decay(dt, cs).reshape([n])
                }),
                Box::new(move |x| {
                    let (dt, cs) = dt_cs(x);
                    reference::end_decay(dt, cs).reshape([n])
                }),
            );
        }
        // The SSD output: row widths not a multiple of 64, padded chunks
        // cropped, and the 1B config's shape.
        for (b, nc, q, l, h, p) in [
            (2, 3, 5, 13, 4, 6),
            (1, 2, 8, 16, 3, 40),
            (1, 16, 256, 4096, 64, 64),
        ]
        .into_iter()
        .filter(|s| large || s.4 < 64)
        {
            let (dims5, dims4) = ([b, nc, q, h, p], [b, nc, q, h]);
            let n5 = b * nc * q * h * p;
            let n = b * l * h * p;
            let inputs = move |x: &Inputs<B>| {
                (
                    x[0].clone().reshape(dims5),
                    x[1].clone().reshape(dims5),
                    // Log-decays are negative.
                    -x[2].clone().reshape(dims4).abs(),
                    x[3].clone().reshape([b, l, h, p]),
                    x[4].clone(),
                )
            };
            check(
                &format!("ssd_out_{b}x{nc}x{q}x{h}x{p}_l{l}"),
                dtype,
                &[vec![n5], vec![n5], vec![b * nc * q * h], vec![n], vec![h]],
                Box::new(move |x| {
                    let (yd, yo, cs, xs, d) = inputs(x);
                    ops::ssd_out(yd, yo, cs, xs, d).reshape([n])
                }),
                Box::new(move |x| {
                    let (yd, yo, cs, xs, d) = inputs(x);
                    reference::ssd_out(yd, yo, cs, xs, d).reshape([n])
                }),
            );
        }
        for (r, p) in [(37, 5), (262144, 64)]
            .into_iter()
            .filter(|s| large || s.0 < 1000)
        {
            check(
                &format!("scale_rows_{r}x{p}"),
                DType::F32,
                &[vec![r, p], vec![r]],
                Box::new(move |x| {
                    ops::scale_rows(x[0].clone().reshape([r, p]), x[1].clone()).reshape([r * p])
                }),
                Box::new(move |x| {
                    reference::scale_rows(x[0].clone().reshape([r, p]), x[1].clone())
                        .reshape([r * p])
                }),
            );
        }
        // x as the Mamba mixer passes it: heads split out of a column slice
        // of a wider row (no copy), into the row scale and the SSD output.
        for (rows, h, p, w) in [(6, 3, 4, 20), (6, 3, 16, 56), (4096, 64, 64, 4352)]
            .into_iter()
            .filter(|s| large || s.0 < 1000)
        {
            let view = move |t: Tensor<B, 1>, fused: bool| {
                let t = t.reshape([1, rows, w]);
                if fused {
                    ops::reshape_view(ops::narrow(t, 2, 0, h * p), [1, rows, h, p])
                } else {
                    t.narrow(2, 0, h * p).reshape([1, rows, h, p])
                }
            };
            let n = rows * h * p;
            check(
                &format!("scale_rows_view_{rows}x{h}x{p}_w{w}"),
                dtype,
                &[vec![rows * w], vec![rows * h]],
                Box::new(move |x| {
                    let s = x[1].clone().cast(DType::F32).reshape([1, rows, h]);
                    ops::scale_rows(view(x[0].clone(), true), s).reshape([n])
                }),
                Box::new(move |x| {
                    let s = x[1].clone().cast(DType::F32).reshape([1, rows, h]);
                    reference::scale_rows(view(x[0].clone(), false), s).reshape([n])
                }),
            );
            // The SSD's intra-chunk product reads the same view in place.
            let q = if rows % 256 == 0 { 256 } else { 3 };
            let nc = rows / q;
            let diag = move |x: &Inputs<B>, fused: bool| {
                let sc = x[1].clone().cast(DType::F32).reshape([1, nc, 1, q, q]);
                let cs =
                    (-x[2].clone().cast(DType::F32).reshape([1, nc, q, h]).abs() * 0.1).cumsum(2);
                let dt = x[3].clone().cast(DType::F32).reshape([1, nc, q, h]).abs() + 0.01;
                let xv = view(x[0].clone(), fused);
                if fused {
                    let xv = ops::reshape_view(xv, [1, nc, q, h, p]);
                    ops::ssd_diag(sc, cs, dt, xv, dtype != DType::F32).reshape([n])
                } else {
                    reference::ssd_diag(sc, cs, dt, xv.reshape([1, nc, q, h, p])).reshape([n])
                }
            };
            check(
                &format!("ssd_diag_view_{rows}x{h}x{p}_w{w}"),
                dtype,
                &[
                    vec![rows * w],
                    vec![nc * q * q],
                    vec![rows * h],
                    vec![rows * h],
                ],
                Box::new(move |x| diag(x, true)),
                Box::new(move |x| diag(x, false)),
            );
            let f32 = |t: Tensor<B, 1>, d: [usize; 4]| t.cast(DType::F32).reshape(d);
            check(
                &format!("ssd_out_view_{rows}x{h}x{p}_w{w}"),
                dtype,
                &[vec![n], vec![n], vec![rows * h], vec![rows * w], vec![h]],
                Box::new(move |x| {
                    let d4 = [1, rows, h, p];
                    let cs = -f32(x[2].clone(), [1, 1, rows, h]).abs();
                    ops::ssd_out(
                        f32(x[0].clone(), d4).reshape([1, 1, rows, h, p]),
                        f32(x[1].clone(), d4).reshape([1, 1, rows, h, p]),
                        cs,
                        view(x[3].clone(), true),
                        x[4].clone(),
                    )
                    .reshape([n])
                }),
                Box::new(move |x| {
                    let d4 = [1, rows, h, p];
                    let cs = -f32(x[2].clone(), [1, 1, rows, h]).abs();
                    reference::ssd_out(
                        f32(x[0].clone(), d4).reshape([1, 1, rows, h, p]),
                        f32(x[1].clone(), d4).reshape([1, 1, rows, h, p]),
                        cs,
                        view(x[3].clone(), false),
                        x[4].clone(),
                    )
                    .reshape([n])
                }),
            );
        }
        for (b, h, l) in [(2, 3, 37), (1, 16, 4096)]
            .into_iter()
            .filter(|s| large || s.2 < 1000)
        {
            check(
                &format!("causal_softmax_{b}x{h}x{l}"),
                dtype,
                &[vec![b, h, l, l]],
                Box::new(move |x| {
                    ops::causal_softmax(x[0].clone().reshape([b, h, l, l]), 0.125)
                        .reshape([b * h * l * l])
                }),
                Box::new(move |x| {
                    reference::causal_softmax(x[0].clone().reshape([b, h, l, l]), 0.125)
                        .reshape([b * h * l * l])
                }),
            );
        }
        // Rotary embeddings: partial and full rotary dims, odd lengths.
        for (b, l, h, d, rd) in [
            (2, 37, 3, 16, 8),
            (1, 50, 2, 32, 32),
            (1, 4096, 16, 128, 64),
        ]
        .into_iter()
        .filter(|s| large || s.1 < 1000)
        {
            let n = b * l * h * d;
            let (cos, sin) = bamba_model::rope::rope_tables::<B>(l, rd, 10000.0, device);
            let (cos, sin) = (cos.reshape([l, rd]), sin.reshape([l, rd]));
            let (c2, s2) = (cos.clone(), sin.clone());
            check(
                &format!("rope_{b}x{l}x{h}x{d}_r{rd}"),
                dtype,
                &[vec![n]],
                Box::new(move |x| {
                    let x = x[0].clone().reshape([b, l, h, d]);
                    ops::rope(x, cos.clone(), sin.clone()).reshape([n])
                }),
                Box::new(move |x| {
                    let x = x[0].clone().reshape([b, l, h, d]);
                    reference::rope(x, c2.clone(), s2.clone()).reshape([n])
                }),
            );
        }
        // Flash attention (bf16 only; f32 runs the eager path): odd
        // lengths (partial tiles), grouped heads, every compiled head dim.
        for (b, l, hq, hk, d) in [
            (2, 100, 4, 2, 64),
            (1, 130, 2, 2, 128),
            (1, 77, 4, 1, 16),
            (1, 64, 2, 1, 32),
            (1, 4096, 16, 4, 128),
        ]
        .into_iter()
        .filter(|s| dtype == DType::BF16 && (large || s.1 < 1000))
        {
            let (nq, nk) = (b * l * hq * d, b * l * hk * d);
            let split = move |x: &Inputs<B>| {
                (
                    x[0].clone().reshape([b, l, hq, d]),
                    x[1].clone().reshape([b, l, hk, d]),
                    x[2].clone().reshape([b, l, hk, d]),
                )
            };
            let scale = (d as f64).powf(-0.5);
            check(
                &format!("attention_{b}x{l}x{hq}x{hk}x{d}"),
                dtype,
                &[vec![nq], vec![nk], vec![nk]],
                Box::new(move |x| {
                    let (q, k, v) = split(x);
                    ops::attention(q, k, v, scale).reshape([nq])
                }),
                Box::new(move |x| {
                    let (q, k, v) = split(x);
                    reference::attention(q, k, v, scale).reshape([nq])
                }),
            );
        }
        // Embedding gradients: ids repeated (few distinct ids), rows wider
        // than one pass of the kernel (4096 columns), more than 256 positions.
        for (b, l, v, d, ids) in [
            (2, 37, 50, 24, 10),
            (2, 300, 1000, 5000, 7),
            (1, 4096, 128256, 2048, 3000),
        ]
        .into_iter()
        .filter(|s| large || s.2 < 10_000)
        {
            let t = Tensor::<B, 2, burn::tensor::Int>::random(
                [b, l],
                Distribution::Uniform(0.0, ids as f64),
                device,
            );
            let t2 = t.clone();
            check(
                &format!("embedding_{b}x{l}_v{v}_d{d}"),
                dtype,
                &[vec![v, d]],
                Box::new(move |x| {
                    ops::embedding(x[0].clone().reshape([v, d]), t.clone()).reshape([b * l * d])
                }),
                Box::new(move |x| {
                    burn::tensor::module::embedding(x[0].clone().reshape([v, d]), t2.clone())
                        .reshape([b * l * d])
                }),
            );
        }
        for (rows, v, z) in [(37, 1000, 0.0), (5, 1001, 1e-4), (4096, 128256, 1e-4)]
            .into_iter()
            .filter(|s| large || s.0 < 1000)
        {
            let t = Tensor::<B, 1, burn::tensor::Int>::random(
                [rows],
                Distribution::Uniform(0.0, v as f64),
                device,
            );
            let t2 = t.clone();
            check(
                &format!("cross_entropy_{rows}x{v}_z{z}"),
                dtype,
                &[vec![rows, v]],
                Box::new(move |x| {
                    ops::cross_entropy_rows(x[0].clone().reshape([rows, v]), t.clone(), z)
                }),
                Box::new(move |x| {
                    reference::cross_entropy_rows(x[0].clone().reshape([rows, v]), t2.clone(), z)
                }),
            );
        }
        for (b, l, h, p, gated) in [
            (2, 37, 4, 8, true),
            (1, 4096, 64, 64, true),
            (2, 50, 3, 5, false),
            // The vectorised norm's other widths: 2048 and 8192 (Bamba-9B's gated norm).
            (2, 256, 32, 64, false),
            (1, 1024, 128, 64, true),
        ]
        .into_iter()
        .filter(|s| large || s.1 < 1000)
        {
            let d = h * p;
            check(
                &format!("rms_norm{}_{b}x{l}x{d}", if gated { "_gated" } else { "" }),
                dtype,
                &[vec![b, l, d], vec![b, l, d], vec![d]],
                Box::new(move |x| {
                    let z = gated.then(|| x[1].clone().reshape([b, l, d]));
                    ops::rms_norm(x[0].clone().reshape([b, l, d]), z, x[2].clone(), 1e-5)
                        .reshape([b * l * d])
                }),
                Box::new(move |x| {
                    let z = gated.then(|| x[1].clone().reshape([b, l, d]));
                    reference::rms_norm(x[0].clone().reshape([b, l, d]), z, x[2].clone(), 1e-5)
                        .reshape([b * l * d])
                }),
            );
            // Odd channel counts one per thread, even ones in pairs,
            // multiples of 16 bytes tiled (a part tile where d + 8 ends).
            for (k, bias, c) in [
                (4, true, d + 8),
                (3, false, d + 8),
                (4, true, d + 3),
                (3, false, d + 3),
                (4, false, d + 2),
                (3, true, d + 2),
                (4, true, d + 2),
            ] {
                let w = move |x: &Inputs<B>| x[1].clone().reshape([c, 1, k]).div_scalar(k as f64);
                let bs = move |x: &Inputs<B>| bias.then(|| x[2].clone());
                check(
                    &format!("conv1d_silu_k{k}_bias{bias}_{b}x{l}x{c}"),
                    dtype,
                    &[vec![b, l, c], vec![c * k], vec![c]],
                    Box::new(move |x| {
                        ops::conv1d_silu(x[0].clone().reshape([b, l, c]), w(x), bs(x))
                            .reshape([b * l * c])
                    }),
                    Box::new(move |x| {
                        reference::conv1d_silu(x[0].clone().reshape([b, l, c]), w(x), bs(x))
                            .reshape([b * l * c])
                    }),
                );
            }
            // Column slices of a wider tensor, as the Mamba mixer's `in_proj`
            // splits arrive: read in place with a row stride (the start is
            // aligned, the width is not), gradients through the shared buffer.
            if gated && large {
                let (pad, wide) = (128, d + 3 + 128 + 5);
                let cut = move |x: &Inputs<B>, ours: bool, n: usize| {
                    let t = x[0].clone().reshape([b, l, wide]);
                    if ours {
                        ops::narrow(t, 2, pad, n)
                    } else {
                        t.narrow(2, pad, n)
                    }
                };
                check(
                    &format!("rms_norm_gated_z_slice_{b}x{l}x{d}"),
                    dtype,
                    &[vec![b, l, wide], vec![b, l, d], vec![d]],
                    Box::new(move |x| {
                        let y = x[1].clone().reshape([b, l, d]);
                        ops::rms_norm(y, Some(cut(x, true, d)), x[2].clone(), 1e-5)
                            .reshape([b * l * d])
                    }),
                    Box::new(move |x| {
                        let y = x[1].clone().reshape([b, l, d]);
                        reference::rms_norm(y, Some(cut(x, false, d)), x[2].clone(), 1e-5)
                            .reshape([b * l * d])
                    }),
                );
                for c in [d + 3, d + 2, d + 8] {
                    let k = 4;
                    check(
                        &format!("conv1d_silu_x_slice_{b}x{l}x{c}"),
                        dtype,
                        &[vec![b, l, wide], vec![c * k], vec![c]],
                        Box::new(move |x| {
                            let w = x[1].clone().reshape([c, 1, k]).div_scalar(k as f64);
                            ops::conv1d_silu(cut(x, true, c), w, Some(x[2].clone()))
                                .reshape([b * l * c])
                        }),
                        Box::new(move |x| {
                            let w = x[1].clone().reshape([c, 1, k]).div_scalar(k as f64);
                            reference::conv1d_silu(cut(x, false, c), w, Some(x[2].clone()))
                                .reshape([b * l * c])
                        }),
                    );
                }
            }
            for (lo, hi) in [(0.0, f64::INFINITY), (0.001, 0.6)] {
                check(
                    &format!("dt_softplus_{lo}_{hi}_{b}x{l}x{h}"),
                    dtype,
                    &[vec![b, l, h], vec![h]],
                    Box::new(move |x| {
                        ops::dt_softplus(x[0].clone().reshape([b, l, h]), x[1].clone(), lo, hi)
                            .reshape([b * l * h])
                    }),
                    Box::new(move |x| {
                        reference::dt_softplus(
                            x[0].clone().reshape([b, l, h]),
                            x[1].clone(),
                            lo,
                            hi,
                        )
                        .reshape([b * l * h])
                    }),
                );
            }
            check(
                &format!("scale_heads_{b}x{l}x{h}x{p}"),
                dtype,
                &[vec![b, l, h, p], vec![h]],
                Box::new(move |x| {
                    ops::scale_heads(x[0].clone().reshape([b, l, h, p]), x[1].clone())
                        .reshape([b * l * h * p])
                }),
                Box::new(move |x| {
                    reference::scale_heads(x[0].clone().reshape([b, l, h, p]), x[1].clone())
                        .reshape([b * l * h * p])
                }),
            );
        }
    }
    Ok(ok)
}
