//! `bamba-tokenize`: JSONL / JSONL.gz / parquet text to tokenized parquet
//! shards plus a `counts.json` per output directory. Prints one JSON summary
//! line on stdout; progress and bad records go to stderr.

use std::path::PathBuf;

use anyhow::Context;
use bamba_data::tokenize::writer::WriterOptions;
use bamba_data::tokenize::{TokenizeOptions, run};
use clap::Parser;

#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Input files or directories (searched recursively for .jsonl,
    /// .jsonl.gz, .json, .json.gz and .parquet; their layout is mirrored).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output directory for the parquet shards.
    #[arg(short, long)]
    output: PathBuf,
    /// A tokenizers `tokenizer.json` (scripts/data/fetch_tokenizer.sh gets Llama-3's).
    #[arg(
        long,
        env = "BAMBA_TOKENIZER",
        default_value = "target/tokenizer/tokenizer.json"
    )]
    tokenizer: PathBuf,
    /// JSON field or parquet column holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Name of the output token column.
    #[arg(long, default_value = "input_ids")]
    column: String,
    /// A shard is closed after this many tokens.
    #[arg(long, default_value_t = 256 << 20)]
    shard_tokens: u64,
    /// A row group is closed after this many tokens.
    #[arg(long, default_value_t = 1 << 20)]
    row_group_tokens: u64,
    #[arg(long, default_value_t = 3)]
    zstd_level: i32,
    /// Worker threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Fail on the first unparsable line or missing text field instead of
    /// counting and reporting it.
    #[arg(long)]
    strict: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn main() {
    if let Err(e) = run_main() {
        eprintln!("error: {}", bamba_data::error::report(&e));
        std::process::exit(1);
    }
}

fn run_main() -> anyhow::Result<()> {
    let a = Args::parse();
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let opts = TokenizeOptions {
        inputs: a.inputs,
        output: a.output,
        tokenizer: a.tokenizer,
        text_field: a.text_field,
        writer: WriterOptions {
            column: a.column,
            shard_tokens: a.shard_tokens,
            row_group_tokens: a.row_group_tokens,
            zstd_level: a.zstd_level,
        },
        threads,
        strict: a.strict,
        progress: !a.quiet,
    };
    let summary = run(&opts).context("bamba-tokenize failed")?;
    let mut line = serde_json::to_value(&summary)?;
    line["event"] = "tokenize".into();
    println!("{line}");
    Ok(())
}
