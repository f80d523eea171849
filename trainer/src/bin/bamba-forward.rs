//! `bamba-forward`: one forward + backward of an HF Bamba checkpoint, writing
//! logits, loss and gradients by HF name: the parity check against transformers.

use std::path::PathBuf;

use anyhow::Result;
use bamba_train::backend::{DeviceKind, Precision};
use bamba_train::forward::{read_input_ids, run, write_outputs};
use bamba_train::with_backend;
use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Forward and backward of an HF Bamba checkpoint: logits, loss (labels = input_ids) and gradients"
)]
struct Args {
    /// HF model directory: config.json plus model.safetensors or sharded safetensors with an index.
    #[arg(long)]
    model: PathBuf,
    /// safetensors file with `input_ids` (int64, [batch, seq]).
    #[arg(long)]
    inputs: PathBuf,
    /// Output safetensors: `logits` [batch, seq, vocab], `loss` [1], `grad.<HF name>` (all f32).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    device: DeviceKind,
    /// Compute precision (bf16 on the GPU only).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    dtype: Precision,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (ids, shape) = read_input_ids(&args.inputs)?;
    let t = std::time::Instant::now();
    let out = with_backend!(args.device, args.dtype, |B, dev| run::<B>(
        &args.model,
        &ids,
        shape,
        &dev
    )?);
    write_outputs(&args.out, &out)?;
    eprintln!(
        "loss {:.6}, {} gradients, {:.2} s -> {}",
        out.loss,
        out.grads.len(),
        t.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
