//! What a run reports: one `StepMetrics` row per logged step, written to
//! `metrics.jsonl`, shown as a progress bar or log lines, and sent to W&B.

pub mod progress;
pub mod wandb;

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub tokens: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub tokens_per_s_per_device: f64,
    pub mfu: f64,
    pub step_time_s: f64,
    pub memory_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_ppl: Option<f64>,
    pub skipped_steps: u64,
}

/// Appends JSON rows to `<output_dir>/metrics.jsonl` (resumed runs append).
pub struct JsonlSink {
    out: BufWriter<File>,
}

impl JsonlSink {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("metrics.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            out: BufWriter::new(file),
        })
    }

    pub fn write<T: Serialize>(&mut self, row: &T) -> Result<()> {
        serde_json::to_writer(&mut self.out, row)?;
        self.out.write_all(b"\n")?;
        self.out.flush()?;
        Ok(())
    }
}

/// Model FLOPs utilisation: achieved training FLOP/s over the device peak.
pub fn mfu(flops_per_token: f64, tokens_per_s_per_device: f64, peak_tflops: f64) -> f64 {
    flops_per_token * tokens_per_s_per_device / (peak_tflops * 1e12)
}

/// Resident memory of this process (CPU runs), from /proc.
pub fn process_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// Dense bf16 peak by device name; 989 TFLOP/s for H100/H200 (datasheet).
pub fn default_peak_tflops(device_name: &str) -> f64 {
    let n = device_name.to_ascii_lowercase();
    if n.contains("a100") { 312.0 } else { 989.0 }
}

/// Rows of `<dir>/metrics.jsonl` at steps `<= step`, each step counted once
/// (a run that crashed after its last checkpoint logged some steps twice).
/// This is the W&B history length of a run resumed at `step`: every row
/// written here was also sent to W&B, and rows past `step` are overwritten
/// by the resumed run. `None` when the file cannot be read.
pub fn logged_steps_up_to(dir: &Path, step: u64) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).ok()?;
    let steps: std::collections::BTreeSet<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("step").and_then(serde_json::Value::as_u64))
        .filter(|s| *s <= step)
        .collect();
    Some(steps.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mfu_peak_by_device_name() {
        assert_eq!(default_peak_tflops("NVIDIA H100 80GB HBM3"), 989.0);
        assert_eq!(default_peak_tflops("NVIDIA H200"), 989.0);
        assert_eq!(default_peak_tflops("NVIDIA A100-SXM4-80GB"), 312.0);
        assert_eq!(default_peak_tflops("cpu"), 989.0);
        // 1e12 FLOP per token at 989 tokens/s on a 989 TFLOP/s device: 100%.
        assert!((mfu(1e12, 989.0, 989.0) - 1.0).abs() < 1e-12);
        assert_eq!(
            crate::backend::device_name(crate::config::Device::Cpu, 0),
            "cpu"
        );
    }

    #[test]
    fn logged_steps_count_each_step_once() {
        let dir = tempfile::tempdir().unwrap();
        let rows = "{\"step\":2}\n{\"step\":4}\n{\"step\":6}\n{\"step\":4}\n{\"step\":6}\nbroken\n{\"step\":8}\n";
        std::fs::write(dir.path().join("metrics.jsonl"), rows).unwrap();
        assert_eq!(logged_steps_up_to(dir.path(), 6), Some(3));
        assert_eq!(logged_steps_up_to(dir.path(), 100), Some(4));
        assert_eq!(logged_steps_up_to(dir.path(), 1), Some(0));
        assert_eq!(logged_steps_up_to(&dir.path().join("none"), 6), None);
    }
}
