//! Shared helpers of the checkpoint robustness tests (`checkpoint_*.rs`),
//! included by each of them with `#[path]`: a small fast config on the
//! shipped corpus, running the binary, and strict checks of a checkpoint dir.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bamba_train::checkpoint::{self, format};

pub const BIN: &str = env!("CARGO_BIN_EXE_bamba-train");

pub fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/data")
}

/// A very small model (hidden 16, 2 layers) on the shipped corpus: the vocab
/// stays 128256 (Llama-3 ids), so a checkpoint is ~49 MB (embeddings and
/// head, f32 master + 2 moments) and a step takes well under a second.
/// `ckpt` is the body of the `checkpoint:` mapping besides `output_dir`.
pub fn write_config(dir: &Path, name: &str, steps: u64, ckpt: &str) -> PathBuf {
    let yaml = format!(
        "
model:
  preset: tiny
  hf:
    vocab_size: 128256
    hidden_size: 16
    intermediate_size: 32
    num_hidden_layers: 2
    attn_layer_indices: [1]
    num_attention_heads: 2
    num_key_value_heads: 1
    mamba_n_heads: 2
    mamba_d_head: 16
    mamba_n_groups: 1
data:
  seq_len: 16
  eos_token: 128001
  logical_shards: 12
  shuffle_buffer: 32
  datasets:
    - {{ name: shakespeare, path: {c}/shakespeare, weight: 0.7 }}
    - {{ name: fortunes, path: {c}/fortunes, weight: 0.3 }}
optimizer: {{ lr: 3.0e-3 }}
schedule: {{ warmup_steps: 1, decay: {{ kind: cosine }}, final_lr: 3.0e-4 }}
training: {{ global_batch_sequences: 2, micro_batch: 2, steps: {steps} }}
checkpoint: {{ output_dir: {o}, {ckpt} }}
logging: {{ every_steps: 1, progress: off }}
",
        c = corpus().display(),
        o = dir.join(name).display()
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Runs the binary to the end; panics with its stderr unless it succeeds.
pub fn train(config: &Path, extra: &[&str]) -> Output {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}",
        config.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Steps logged in `metrics.jsonl`, in order (lines that do not parse are skipped).
pub fn logged_steps(out: &Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .collect()
}

/// Every `step_<N>` directory under a final name verifies; returns their steps, newest first.
pub fn assert_all_final_dirs_verify(out: &Path) -> Vec<u64> {
    let steps = checkpoint::list_steps(out);
    for s in &steps {
        let dir = checkpoint::step_dir(out, *s);
        if let Err(e) = format::verify(&dir) {
            panic!(
                "{} is under a final name but does not verify: {e:#}\nentries: {:?}",
                dir.display(),
                entries(&dir)
            );
        }
        format::read_meta(&dir).unwrap();
    }
    steps
}

/// Names in a directory, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The step that `newest_valid` picks, with the warnings it gave.
pub fn newest_valid_step(out: &Path) -> (Option<u64>, Vec<String>) {
    let mut warnings = vec![];
    let dir = checkpoint::newest_valid(out, &mut |w| warnings.push(w));
    let step = dir.map(|d| format::read_meta(&d).unwrap().step);
    (step, warnings)
}

/// Copies a directory tree (files and folders only).
pub fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}
