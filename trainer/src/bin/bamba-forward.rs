//! `bamba-forward`: one forward + backward of an HF Bamba checkpoint, writing
//! logits, loss and gradients by HF name: the parity check against transformers.
//! (Also `bamba-train forward`, so one binary goes to the GPU machine.)

use anyhow::Result;
use bamba_train::forward::{ForwardArgs, main as forward};
use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Forward and backward of an HF Bamba checkpoint: logits, loss (labels = input_ids) and gradients"
)]
struct Args {
    #[command(flatten)]
    args: ForwardArgs,
}

fn main() -> Result<()> {
    forward(Args::parse().args)
}
