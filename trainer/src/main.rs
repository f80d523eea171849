//! `bamba-train`: the command line. Everything it runs lives in the library.

use std::path::PathBuf;

use anyhow::Result;

// Training allocates and frees logits-sized buffers every op; glibc returns
// such blocks to the OS each time, and the page faults cost more than the
// math on CPU (measured: a third of a tiny-config step). mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use bamba_train::cli;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "Pretrain Bamba (Mamba2/attention hybrid) language models with FSDP-style sharding",
    long_about = "Pretrain Bamba (Mamba2/attention hybrid) language models with FSDP-style sharding.\n\n\
        Examples:\n  bamba-train --config configs/tiny.yaml\n  bamba-train --config configs/stage1.yaml --set optimizer.lr=1e-4\n  \
        bamba-train --config configs/tiny.yaml --nproc-per-node 4\n  bamba-train export-hf --checkpoint out/tiny/checkpoints/step_200 --out hf/\n\n\
        Rank and world size come from torchrun-style (RANK, WORLD_SIZE, MASTER_ADDR, ...) or SLURM (SLURM_PROCID, ...) \
        environment variables; without them the run is a single process."
)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    train: cli::TrainArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a checkpoint as an HF transformers model directory (config.json + safetensors).
    ExportHf {
        /// A checkpoint step directory, or an output directory (its newest valid checkpoint).
        #[arg(long)]
        checkpoint: PathBuf,
        /// The HF directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype of the weights.
        #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32", "f16"])]
        dtype: String,
        /// Largest safetensors shard, in GB.
        #[arg(long, default_value_t = 5.0)]
        max_shard_gb: f64,
    },
    /// Time full training steps of a config (warm-up, timed, profiled) and print JSON lines:
    /// tokens/s per device, MFU, device memory, and the step split into phases.
    Bench {
        #[command(flatten)]
        train: cli::TrainArgs,
        #[command(flatten)]
        bench: bamba_train::bench::BenchArgs,
    },
    /// One forward + backward of an HF checkpoint (logits, loss, gradients): the parity check.
    Forward(bamba_train::forward::ForwardArgs),
}

fn main() {
    let args = Args::parse();
    let result: Result<i32> = match args.cmd {
        Some(Cmd::ExportHf {
            checkpoint,
            out,
            dtype,
            max_shard_gb,
        }) => cli::export_hf(&checkpoint, &out, &dtype, max_shard_gb).map(|_| 0),
        Some(Cmd::Bench { train, bench }) => cli::bench(train, bench),
        Some(Cmd::Forward(f)) => bamba_train::forward::main(f).map(|_| 0),
        None => cli::train(args.train),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {}", cli::error_report(&e));
            std::process::exit(1);
        }
    }
}
