//! `bamba-data-bench`: throughput of the loader end to end (parquet read,
//! decode, mixture, packing, shuffle, batching) and of the tokenizer, as
//! JSON lines on stdout.
//!
//!   bamba-data-bench loader     [--tokens N] [--seq-len 4096] [--batch 8] ...
//!   bamba-data-bench tokenizer  [--tokenizer PATH] [--corpus configs/data/shakespeare]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use bamba_data::bench::{cpu_seconds, synthetic_dataset};
use bamba_data::catalog::Catalog;
use bamba_data::source::FileCache;
use bamba_data::{DatasetSpec, Loader, LoaderConfig};
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(about)]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Loader tokens/s from zstd parquet (synthetic data unless --data).
    Loader {
        /// Tokens to load (the data holds half, so the run crosses an epoch).
        #[arg(long, default_value_t = 200_000_000)]
        tokens: u64,
        /// Existing sub-dataset directories to read instead of synthetic data.
        #[arg(long)]
        data: Vec<PathBuf>,
        #[arg(long, default_value_t = 4096)]
        seq_len: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 10_000)]
        shuffle_buffer: usize,
        #[arg(long, default_value_t = 960)]
        logical_shards: usize,
    },
    /// Tokenizer tokens/s on one core, on the shipped corpus decoded to text.
    Tokenizer {
        #[arg(
            long,
            env = "BAMBA_TOKENIZER",
            default_value = "target/tokenizer/tokenizer.json"
        )]
        tokenizer: PathBuf,
        #[arg(long, default_value = "configs/data/shakespeare")]
        corpus: PathBuf,
        /// Documents to encode.
        #[arg(long, default_value_t = 400)]
        docs: usize,
    },
}

fn main() {
    if let Err(e) = run_main() {
        eprintln!("error: {}", bamba_data::error::report(&e));
        std::process::exit(1);
    }
}

fn run_main() -> anyhow::Result<()> {
    match Args::parse().what {
        What::Loader {
            tokens,
            data,
            seq_len,
            batch,
            shuffle_buffer,
            logical_shards,
        } => loader(tokens, data, seq_len, batch, shuffle_buffer, logical_shards),
        What::Tokenizer {
            tokenizer,
            corpus,
            docs,
        } => tokenizer_bench(tokenizer, corpus, docs),
    }
}

fn loader(
    tokens: u64,
    data: Vec<PathBuf>,
    seq_len: usize,
    batch: usize,
    shuffle_buffer: usize,
    logical_shards: usize,
) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let datasets: Vec<DatasetSpec> = if data.is_empty() {
        let t0 = Instant::now();
        // Two sub-datasets, 3:1, with Dolma-like document lengths.
        let mut specs = Vec::new();
        for (name, share, mean) in [("web", 0.75, 900u64), ("books", 0.25, 4000)] {
            let dir = tmp.path().join(name);
            synthetic_dataset(&dir, (tokens as f64 / 2.0 * share) as u64, mean, mean)?;
            specs.push(DatasetSpec {
                name: name.into(),
                path: dir,
                weight: share,
            });
        }
        let bytes: u64 = walk_bytes(tmp.path());
        println!(
            "{}",
            json!({"event": "synthetic_data", "tokens": tokens / 2, "bytes": bytes,
                   "bytes_per_token": bytes as f64 / (tokens / 2) as f64,
                   "seconds": t0.elapsed().as_secs_f64()})
        );
        specs
    } else {
        data.iter()
            .map(|p| DatasetSpec {
                name: p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                path: p.clone(),
                weight: 1.0,
            })
            .collect()
    };
    let cfg = LoaderConfig {
        datasets,
        seq_len,
        logical_shards,
        shuffle_buffer,
        seed: 1,
        ..Default::default()
    };
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut loader = Loader::new(cfg, 0, 1).context("loader")?;
    let first = loader.next_batch(batch)?;
    let startup = t0.elapsed().as_secs_f64();
    let mut n = first.len() as u64;
    let (cpu1, t1) = (cpu_seconds(), Instant::now());
    let mut checksum = 0u64;
    while n < tokens {
        let b = loader.next_batch(batch)?;
        checksum = checksum.wrapping_add(b[b.len() / 2] as u64);
        n += b.len() as u64;
    }
    let steady = t1.elapsed().as_secs_f64();
    let total = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
    let steady_cpu = cpu_seconds().zip(cpu1).map(|(b, a)| b - a);
    println!(
        "{}",
        json!({
            "bench": "loader", "tokens": n, "seq_len": seq_len, "batch": batch,
            "shuffle_buffer": shuffle_buffer, "logical_shards": logical_shards,
            "seconds": total, "tokens_per_s": n as f64 / total,
            "startup_s": startup,
            "steady_tokens_per_s": (n - first.len() as u64) as f64 / steady,
            "cpu_seconds": cpu, "steady_cpu_seconds": steady_cpu,
            "checksum": checksum,
        })
    );
    Ok(())
}

fn walk_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        walk_bytes(&p)
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn tokenizer_bench(path: PathBuf, corpus: PathBuf, docs: usize) -> anyhow::Result<()> {
    let tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (run scripts/data/fetch_tokenizer.sh)",
            path.display()
        )
    })?;
    // Real English text, offline: decode the shipped corpus back to text.
    let spec = DatasetSpec {
        name: "corpus".into(),
        path: corpus,
        weight: 1.0,
    };
    let mut cat = Catalog::scan(&spec, "input_ids")?;
    cat.set_block_docs(u64::MAX);
    let mut cache = FileCache::default();
    let mut texts = Vec::new();
    'outer: for b in 0..cat.blocks.len() {
        let block = cat.read_block(&mut cache, "input_ids", b)?;
        for i in 0..block.len() {
            texts.push(
                tok.decode(block.doc(i), false)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            );
            if texts.len() == docs {
                break 'outer;
            }
        }
    }
    let bytes: usize = texts.iter().map(|t| t.len()).sum();
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut n = 0u64;
    for t in &texts {
        n += tok
            .encode_fast(t.as_str(), false)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .len() as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
    println!(
        "{}",
        json!({
            "bench": "tokenizer", "threads": 1, "documents": texts.len(), "bytes": bytes,
            "tokens": n, "seconds": secs, "tokens_per_s_per_core": n as f64 / secs,
            "cpu_seconds": cpu,
            "tokens_per_cpu_s": cpu.map(|c| n as f64 / c.max(0.01)),
        })
    );
    Ok(())
}
