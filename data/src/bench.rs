//! Measurement helpers for `bamba-data-bench`: synthetic token data with a
//! realistic size distribution, and process CPU time, so a throughput figure
//! means something even when other work shares the machine.

use std::path::Path;

use crate::counts::Counts;
use crate::error::Result;
use crate::shards::mix;
use crate::tokenize::writer::{ShardWriter, WriterOptions};

/// Writes `tokens` tokens of synthetic documents (lengths 1..4*mean_doc,
/// ids skewed toward small values like real text) as zstd parquet shards.
pub fn synthetic_dataset(dir: &Path, tokens: u64, mean_doc: u64, salt: u64) -> Result<Counts> {
    let opts = WriterOptions {
        shard_tokens: 64 << 20,
        ..Default::default()
    };
    let mut w = ShardWriter::new(dir, "synthetic", opts)?;
    let (mut written, mut i, mut x) = (0u64, 0u64, salt);
    let mut doc = Vec::new();
    while written < tokens {
        let len = 1 + mix(salt ^ i) % (2 * mean_doc);
        doc.clear();
        for _ in 0..len {
            x = mix(x);
            // Cubing a uniform draw skews toward frequent (small) ids.
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            doc.push((u * u * u * 128_256.0) as u32);
        }
        w.push(&doc)?;
        written += len;
        i += 1;
    }
    let counts = Counts {
        version: 1,
        column: "input_ids".into(),
        files: w.finish()?,
    };
    counts.write(dir)?;
    Ok(counts)
}

/// User + system CPU seconds of this process (Linux), if readable.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 12th and 13th of those, in clock ticks (100 per second on Linux).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}
