//! What the `bamba-train` command does: read the config (or a curriculum of
//! configs), set up the process group, pick the backend, train; and export
//! checkpoints to HF.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use bamba_model::hf::{NamedTensor, save_hf};
use bamba_model::{BambaConfig, SaveDtype};
use serde::Deserialize;

use crate::checkpoint::{self, format};
use crate::config::{Device, TrainConfig, load_config, parse_config};
use crate::fsdp::Layout;
use crate::train::{PREEMPTED_EXIT_CODE, Trainer};

/// The embedded default: `bamba-train` with no `--config` trains this.
pub const TINY_YAML: &str = include_str!("../../configs/tiny.yaml");

#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Training config (YAML), or a curriculum file with `stages:`. Default: the embedded configs/tiny.yaml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. `--set optimizer.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the effective config as YAML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Launch this many local worker processes (one per device), like torchrun.
    #[arg(long)]
    pub nproc_per_node: Option<usize>,
    /// Resume from this checkpoint step directory (overrides `checkpoint.resume`).
    #[arg(long)]
    pub resume_from: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Curriculum {
    stages: Vec<Stage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stage {
    /// Relative to the curriculum file.
    config: PathBuf,
    #[serde(default)]
    set: Vec<String>,
}

/// Runs training; returns the process exit code (75 after a preemption save).
pub fn train(args: TrainArgs) -> Result<i32> {
    if let Some(n) = args.nproc_per_node {
        return launch_local(n);
    }
    let stages: Vec<TrainConfig> = match &args.config {
        None => vec![parse_config(TINY_YAML, &args.set).context("the embedded configs/tiny.yaml")?],
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            if is_curriculum(&text) {
                let c: Curriculum = serde_norway::from_str(&text)
                    .with_context(|| format!("{}: curriculum", path.display()))?;
                let base = path.parent().unwrap_or(Path::new("."));
                c.stages
                    .iter()
                    .map(|s| {
                        let sets: Vec<String> = s.set.iter().chain(&args.set).cloned().collect();
                        load_config(&base.join(&s.config), &sets).map_err(Into::into)
                    })
                    .collect::<Result<_>>()?
            } else {
                vec![load_config(path, &args.set)?]
            }
        }
    };
    if args.print_config {
        for (i, cfg) in stages.iter().enumerate() {
            if stages.len() > 1 {
                println!("# stage {}", i + 1);
            }
            print!("{}", serde_norway::to_string(cfg)?);
        }
        return Ok(0);
    }
    for (i, cfg) in stages.into_iter().enumerate() {
        if i > 0 {
            eprintln!("curriculum: stage {} starts", i + 1);
        }
        // --resume-from names a checkpoint of the first stage run; later
        // stages start as their configs say (stage 2 from stage 1's weights).
        let resume_from = if i == 0 {
            args.resume_from.clone()
        } else {
            None
        };
        let code = run_stage(cfg, resume_from)?;
        if code != 0 {
            return Ok(code);
        }
    }
    Ok(0)
}

fn is_curriculum(text: &str) -> bool {
    serde_norway::from_str::<serde_norway::Value>(text)
        .ok()
        .and_then(|v| v.as_mapping().map(|m| m.contains_key("stages")))
        .unwrap_or(false)
}

/// Runs `$body` with `$B` the training backend that `$cfg` asks for, `$rt`
/// this process's runtime (rank, world, communicators) and `$dev` its device
/// (GPU `LOCAL_RANK` on CUDA).
macro_rules! on_backend {
    ($cfg:expr, |$B:ident, $rt:ident, $dev:ident| $body:expr) => {
        match ($cfg.training.device, $cfg.training.precision) {
            (Device::Cpu, _) => {
                type $B = crate::backend::CpuTrain;
                let $rt = crate::runtime::from_env::<crate::backend::Cpu>(&$cfg)?;
                let $dev = Default::default();
                $body
            }
            // bf16: bf16 tensors in the f32 backend (see `backend::Cuda`).
            #[cfg(feature = "cuda")]
            (Device::Cuda, _) => {
                type $B = crate::backend::CudaTrain<f32>;
                crate::cuda_memory::install()?;
                let $rt = crate::runtime::from_env::<crate::backend::Cuda<f32>>(&$cfg)?;
                let $dev = crate::backend::cuda_device($rt.local_rank);
                $body
            }
            #[cfg(not(feature = "cuda"))]
            (Device::Cuda, _) => {
                bail!("training.device is cuda but this binary was built without `--features cuda`")
            }
        }
    };
}

/// `bamba-train bench`: timed training steps of a config, JSON lines on stdout.
pub fn bench(args: TrainArgs, bench: crate::bench::BenchArgs) -> Result<i32> {
    if let Some(n) = args.nproc_per_node {
        return launch_local(n);
    }
    let mut sets = args.set.clone();
    // Benchmarks never read or write checkpoints.
    sets.extend([
        "checkpoint.resume=none".into(),
        "checkpoint.every_steps=0".into(),
        "checkpoint.save_final=false".into(),
    ]);
    let cfg = match &args.config {
        Some(path) => load_config(path, &sets)?,
        None => parse_config(TINY_YAML, &sets).context("the embedded configs/tiny.yaml")?,
    };
    if args.print_config {
        print!("{}", serde_norway::to_string(&cfg)?);
        return Ok(0);
    }
    let local_rank = crate::dist::DistEnv::from_env()
        .map(|e| e.local_rank)
        .unwrap_or(0);
    let name = crate::backend::device_name(cfg.training.device, local_rank);
    let probe = crate::backend::memory_probe(cfg.training.device, local_rank);
    if crate::memtrace::requested() && cfg.training.device == crate::config::Device::Cuda {
        crate::memtrace::install(local_rank);
    }
    if let Some(mb) = bench.collectives {
        on_backend!(cfg, |B, rt, dev| {
            let _: Option<B> = None;
            crate::bench::collectives(&rt, &dev, mb)?
        });
        return Ok(0);
    }
    if bench.kernels {
        let large = cfg.training.device == crate::config::Device::Cuda;
        let ok = on_backend!(cfg, |B, _rt, dev| crate::bench::kernels::<B>(
            &dev,
            large,
            &bench.only
        )?);
        return Ok(if ok { 0 } else { 1 });
    }
    if bench.ops {
        let model_cfg = cfg.model_config()?;
        let compute = match cfg.training.precision {
            crate::config::Precision::F32 => burn::tensor::DType::F32,
            crate::config::Precision::Bf16 => burn::tensor::DType::BF16,
        };
        let (b, l) = (cfg.training.micro_batch, cfg.data.seq_len);
        // With --host-profile, the pieces' host time is sampled as a whole.
        let profiler = bench
            .host_profile
            .as_deref()
            .map(crate::host_profile::HostProfile::start)
            .transpose()?;
        on_backend!(cfg, |B, _rt, dev| crate::bench::ops::<B>(
            &model_cfg,
            b,
            l,
            compute,
            &bench.only,
            &dev
        )?);
        if let (Some(p), Some(path)) = (profiler, &bench.host_profile) {
            let samples = p.finish()?;
            println!(
                "{}",
                serde_json::json!({"bench": "host_profile", "path": path, "samples": samples})
            );
        }
        return Ok(0);
    }
    on_backend!(cfg, |B, rt, dev| {
        let rt = match bench.simulate_ranks {
            Some(n) => rt.simulated(n, cfg.parallelism.shard_group_size)?,
            None => rt,
        };
        crate::bench::run(Trainer::<B>::new(cfg, rt, dev, None)?, &bench, &name, probe)?
    });
    Ok(0)
}

fn run_stage(cfg: TrainConfig, resume_from: Option<PathBuf>) -> Result<i32> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let resume = match resume_from {
        Some(p) => checkpoint::resolve_resume(
            &cfg.checkpoint.output_dir,
            &p.to_string_lossy(),
            &mut |w| eprintln!("warning: {w}"),
        )?,
        None => checkpoint::resolve_resume(
            &cfg.checkpoint.output_dir,
            &cfg.checkpoint.resume,
            &mut |w| eprintln!("warning: {w}"),
        )?,
    };
    let summary = on_backend!(cfg, |B, rt, dev| Trainer::<B>::new(cfg, rt, dev, resume)?
        .train(stop)?);
    Ok(if summary.preempted {
        PREEMPTED_EXIT_CODE
    } else {
        0
    })
}

fn launch_local(n: usize) -> Result<i32> {
    if n == 0 {
        bail!("--nproc-per-node must be at least 1");
    }
    let exe = std::env::current_exe().context("locating the bamba-train executable")?;
    let mut args: Vec<std::ffi::OsString> = vec![];
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        if a == "--nproc-per-node" {
            it.next();
        } else if a.to_string_lossy().starts_with("--nproc-per-node=") {
        } else {
            args.push(a);
        }
    }
    let status = crate::dist::launch::launch_local(n, &exe, &args)?;
    Ok(status.code().unwrap_or(1))
}

/// Writes a checkpoint's weights as an HF model directory.
pub fn export_hf(checkpoint: &Path, out: &Path, dtype: &str, max_shard_gb: f64) -> Result<()> {
    let dir = if checkpoint.join("meta.json").exists() {
        checkpoint.to_path_buf()
    } else {
        checkpoint::newest_valid(checkpoint, &mut |w| eprintln!("warning: {w}"))
            .with_context(|| format!("{}: no valid checkpoint found", checkpoint.display()))?
    };
    format::verify(&dir).with_context(|| format!("checkpoint {}", dir.display()))?;
    let meta = format::read_meta(&dir)?;
    let cfg = BambaConfig::from_json_str(&meta.model_config)?;
    let layout = Layout::new(&cfg, 1);
    let slices = checkpoint::reshard::read_slices(&dir, &meta, &layout, 0)?;
    let mut tensors = vec![];
    for (unit, [master, _, _]) in layout.units.iter().zip(slices) {
        for p in &unit.params {
            tensors.push(NamedTensor {
                name: p.name.clone(),
                shape: p.shape.clone(),
                values: master[p.offset..p.offset + p.numel].to_vec(),
            });
        }
    }
    let dtype = SaveDtype::parse(dtype).with_context(|| format!("unknown dtype {dtype}"))?;
    save_hf(out, &cfg, &tensors, dtype, (max_shard_gb * 1e9) as usize)?;
    eprintln!(
        "exported step {} ({} tensors) to {}",
        meta.step,
        tensors.len(),
        out.display()
    );
    Ok(())
}

/// An error and its causes on one line, each cause once.
pub use bamba_data::error::report as error_report;
