//! Multi-process training through the `bamba-train` binary on CPU: 1, 2 and 4
//! processes with the same global batch give the same losses and weights for
//! fsdp, hsdp (2x2) and ddp; checkpoints reshard 4 -> 2 -> 1 and 1 -> 4; a
//! killed rank makes the others fail clearly; SIGTERM saves and exits 75.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bamba_train::checkpoint::{self, format};
use bamba_train::fsdp::Layout;

const BIN: &str = env!("CARGO_BIN_EXE_bamba-train");

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/data")
}

/// A small run on the shipped corpus; by-row data so every rank count sees
/// the same global batches. Ranks sum gradients in a different order than one
/// process does (f32 rounding, ~1e-7 relative); AdamW's default eps of 1e-8
/// turns such noise on near-zero gradients into full-size updates, so these
/// runs use eps 1e-4, under which equal math gives weights equal to 1e-5.
fn write_config(dir: &Path, name: &str, steps: u64, micro: usize, extra: &str) -> PathBuf {
    let yaml = format!(
        "
model: {{ preset: tiny, hf: {{ vocab_size: 128256, num_hidden_layers: 3, attn_layer_indices: [1] }} }}
data:
  seq_len: 24
  eos_token: 128001
  logical_shards: 12
  shuffle_buffer: 32
  distribute: by_row
  datasets:
    - {{ name: shakespeare, path: {c}/shakespeare, weight: 0.7 }}
    - {{ name: fortunes, path: {c}/fortunes, weight: 0.3 }}
optimizer: {{ lr: 3.0e-3, eps: 1.0e-4 }}
schedule: {{ warmup_steps: 1, decay: {{ kind: cosine }}, final_lr: 3.0e-4 }}
training: {{ global_batch_sequences: 8, micro_batch: {micro}, steps: {steps} }}
checkpoint: {{ output_dir: {o}, every_steps: 4, keep_last: 10 }}
logging: {{ every_steps: 1, progress: lines }}
parallelism: {{ timeout_s: 20 }}
{extra}
",
        c = corpus().display(),
        o = dir.join(name).display()
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

fn train(config: &Path, nproc: usize, extra: &[&str]) {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(["--nproc-per-node", &nproc.to_string()])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} on {nproc} processes failed:\n{}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

fn weights(out: &Path, step: u64) -> Vec<f32> {
    let dir = checkpoint::step_dir(out, step);
    format::verify(&dir).unwrap();
    let meta = format::read_meta(&dir).unwrap();
    let cfg = bamba_model::BambaConfig::from_json_str(&meta.model_config).unwrap();
    checkpoint::reshard::read_slices(&dir, &meta, &Layout::new(&cfg, 1), 0)
        .unwrap()
        .into_iter()
        .flat_map(|[m, _, _]| m)
        .collect()
}

fn assert_close(name: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    let (i, err) = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .enumerate()
        .fold((0, 0f32), |m, (i, e)| if e > m.1 { (i, e) } else { m });
    assert!(
        err <= tol,
        "{name}: weights differ by {err} at flat index {i} ({} vs {})",
        a[i],
        b[i]
    );
}

fn assert_losses(name: &str, a: &[(u64, f64)], b: &[(u64, f64)]) {
    assert_eq!(a.len(), b.len(), "{name}: number of logged steps");
    for ((s, x), (_, y)) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "{name}: step {s} loss {x} vs {y}"
        );
    }
}

#[test]
fn sharded_training_matches_single_process_for_every_strategy() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    train(&write_config(d, "single", 8, 2, ""), 1, &[]);
    let (ref_losses, ref_weights) = (losses(&d.join("single")), weights(&d.join("single"), 8));
    assert!(ref_losses.last().unwrap().1 < ref_losses[0].1, "loss falls");
    for (name, nproc, micro, parallelism) in [
        ("fsdp2", 2, 2, "{ strategy: fsdp, timeout_s: 20 }"),
        ("fsdp4", 4, 1, "{ strategy: fsdp, timeout_s: 20 }"),
        (
            "hsdp2x2",
            4,
            2,
            "{ strategy: hsdp, shard_group_size: 2, timeout_s: 20 }",
        ),
        ("ddp2", 2, 1, "{ strategy: ddp, timeout_s: 20 }"),
        // Per-layer gathers with recomputation (all layers, then every other
        // one), collectives in turn and prefetched/overlapped.
        (
            "fsdp2_streamed",
            2,
            2,
            "{ strategy: fsdp, activation_checkpointing: 1.0, overlap_comm: false, timeout_s: 20 }",
        ),
        (
            "fsdp2_streamed_overlap",
            2,
            2,
            "{ strategy: fsdp, activation_checkpointing: 1.0, timeout_s: 20 }",
        ),
        // Layer by layer without recomputation: every layer keeps its graph,
        // its gathered parameters freed after forward and gathered again for
        // backward (the default), or kept.
        (
            "fsdp2_per_layer",
            2,
            2,
            "{ strategy: fsdp, per_layer: true, timeout_s: 20 }",
        ),
        (
            "fsdp2_per_layer_no_reshard",
            2,
            2,
            "{ strategy: fsdp, per_layer: true, reshard_after_forward: false, timeout_s: 20 }",
        ),
        // Accumulation over the 2 micro-batches in the per-layer step: each
        // one's gradients reduce-scattered and the slices summed (the
        // default, in every per-layer run above with 2 micro-batches a
        // rank), or the full gradients summed and reduced once.
        (
            "fsdp2_per_layer_full_accumulation",
            2,
            2,
            "{ strategy: fsdp, per_layer: true, accumulate_grads: full, timeout_s: 20 }",
        ),
        // hsdp layer by layer with 2 micro-batches a rank: slices summed
        // inside each shard group, averaged over the replicas once a step
        // beside the backward.
        (
            "hsdp2x2_ac_half",
            4,
            1,
            "{ strategy: hsdp, shard_group_size: 2, activation_checkpointing: 0.5, overlap_comm: true, timeout_s: 20 }",
        ),
    ] {
        let cfg = write_config(d, name, 8, micro, "");
        let text = std::fs::read_to_string(&cfg).unwrap();
        let text = text.replace(
            "parallelism: { timeout_s: 20 }",
            &format!("parallelism: {parallelism}"),
        );
        std::fs::write(&cfg, text).unwrap();
        train(&cfg, nproc, &[]);
        assert_losses(name, &losses(&d.join(name)), &ref_losses);
        assert_close(name, &weights(&d.join(name), 8), &ref_weights, 1e-5);
        // What a rank keeps between steps (f32 master + two moments) is its shard file.
        let held = |run: &str| {
            std::fs::metadata(checkpoint::step_dir(&d.join(run), 8).join("shard_0.safetensors"))
                .unwrap()
                .len() as f64
        };
        let shards = match name {
            "ddp2" => 1.0,
            "hsdp2x2" | "hsdp2x2_ac_half" => 2.0,
            _ => nproc as f64,
        };
        let ratio = held(name) / held("single");
        assert!(
            (ratio - 1.0 / shards).abs() < 0.01,
            "{name}: a rank holds {ratio:.4} of the state, expected 1/{shards}"
        );
    }
}

/// The streamed step (per-layer gathers, recomputation) is the same math as
/// the whole-model step, with tied embeddings too (the head then needs the
/// embedding unit, whose gradient has two contributions); so are layers
/// that make their products' inputs again in backward (`recompute_elementwise`),
/// and kept layers resharded after forward (their weights made again from a
/// new gather), with their products' inputs made again too.
#[test]
fn streamed_layers_match_the_whole_model_step() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for tied in [false, true] {
        let runs: Vec<_> = [
            "activation_checkpointing: 0.0, recompute_elementwise: false",
            "activation_checkpointing: 1.0, recompute_elementwise: false",
            "activation_checkpointing: 0.5, recompute_elementwise: false",
            "activation_checkpointing: 0.5, recompute_elementwise: false, reshard_after_forward: false",
            "activation_checkpointing: 0.5, recompute_elementwise: true",
            "activation_checkpointing: 0.0, recompute_elementwise: true",
            "activation_checkpointing: 0.0, recompute_elementwise: true, per_layer: true",
        ]
        .iter()
        .enumerate()
        .map(|(k, par)| {
            let name = format!("tied{tied}_{k}");
                let cfg = write_config(d, &name, 3, 4, "");
                let text = std::fs::read_to_string(&cfg)
                    .unwrap()
                    .replace(
                        "attn_layer_indices: [1] }",
                        &format!("attn_layer_indices: [1], tie_word_embeddings: {tied} }}"),
                    )
                    .replace(
                        "parallelism: { timeout_s: 20 }",
                        &format!("parallelism: {{ {par}, timeout_s: 20 }}"),
                    );
                std::fs::write(&cfg, text).unwrap();
                train(&cfg, 1, &[]);
                (losses(&d.join(&name)), weights(&d.join(&name), 3), par)
            })
            .collect();
        for (l, w, par) in &runs[1..] {
            let name = format!("tied {tied}, {par}");
            assert_losses(&name, l, &runs[0].0);
            assert_close(&name, w, &runs[0].1, 1e-5);
        }
    }
}

/// `parallelism.reduce_dtype: bf16` sends gradients through reduce-scatter
/// in bf16: the run trains like the f32 one up to bf16 rounding of the
/// gradients (the loss of every step close, the weights not bit-equal).
#[test]
fn bf16_gradient_reduction_trains_like_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut runs = vec![];
    for rd in ["f32", "bf16"] {
        let name = format!("reduce_{rd}");
        let cfg = write_config(d, &name, 4, 2, "");
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            "parallelism: { timeout_s: 20 }",
            &format!("parallelism: {{ reduce_dtype: {rd}, timeout_s: 20 }}"),
        );
        std::fs::write(&cfg, text).unwrap();
        train(&cfg, 2, &[]);
        runs.push((losses(&d.join(&name)), weights(&d.join(&name), 4)));
    }
    for ((s, a), (_, b)) in runs[0].0.iter().zip(&runs[1].0) {
        assert!(
            (a - b).abs() < 1e-2 * a.abs(),
            "step {s}: loss {a} (f32) vs {b} (bf16)"
        );
    }
    assert_ne!(runs[0].1, runs[1].1, "bf16 reduction rounds the gradients");
    assert_close("bf16 reduction", &runs[1].1, &runs[0].1, 1e-2);
}

#[test]
fn checkpoints_reshard_between_rank_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // 4 ranks to step 4, then on 2 ranks to 8 and on 1 rank to 8.
    let four = write_config(d, "four", 8, 1, "");
    train(&four, 4, &[]);
    let reference = weights(&d.join("four"), 8);
    for (name, nproc) in [("to2", 2), ("to1", 1)] {
        let cfg = write_config(d, name, 8, 1, "");
        let from = checkpoint::step_dir(&d.join("four"), 4);
        train(&cfg, nproc, &["--resume-from", from.to_str().unwrap()]);
        assert_close(name, &weights(&d.join(name), 8), &reference, 1e-5);
        let l = losses(&d.join(name));
        assert_eq!(l[0].0, 5, "{name} continues at step 5");
        assert_losses(name, &l, &losses(&d.join("four"))[4..]);
    }
    // 1 rank to 4, then 4 ranks to 8.
    let one = write_config(d, "one", 8, 1, "");
    train(&one, 1, &[]);
    let up = write_config(d, "up", 8, 1, "");
    train(
        &up,
        4,
        &[
            "--resume-from",
            checkpoint::step_dir(&d.join("one"), 4).to_str().unwrap(),
        ],
    );
    assert_close(
        "1->4",
        &weights(&d.join("up"), 8),
        &weights(&d.join("one"), 8),
        1e-5,
    );
}

#[test]
fn a_killed_rank_makes_the_others_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "kill", 10_000, 1, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("timeout_s: 20", "timeout_s: 5");
    std::fs::write(&cfg, text).unwrap();
    let port = 29_500 + (std::process::id() % 1000) as u16;
    let spawn = |rank: usize| {
        Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", "2")
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let rank0 = spawn(0);
    let mut rank1 = spawn(1);
    // Let them train a few steps, then kill rank 1 outright.
    let metrics = tmp.path().join("kill/metrics.jsonl");
    let t0 = Instant::now();
    while std::fs::read_to_string(&metrics)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 2
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    let killed_at = Instant::now();
    let out = rank0.wait_with_output().unwrap();
    let waited = killed_at.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "rank 0 must fail");
    assert!(
        waited < Duration::from_secs(30),
        "rank 0 took {waited:?} to notice"
    );
    assert!(
        stderr.contains("rank 1"),
        "the error must name rank 1:\n{stderr}"
    );
}

#[test]
fn sigterm_saves_a_checkpoint_and_exits_75_then_the_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "pre", 30, 2, "");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = tmp.path().join("pre/metrics.jsonl");
    let t0 = Instant::now();
    while std::fs::read_to_string(&metrics)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 6
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(75), "preempted runs exit with 75");
    let out = tmp.path().join("pre");
    let saved = checkpoint::list_steps(&out)[0];
    assert!((6..30).contains(&saved), "saved at step {saved}");
    train(&cfg, 1, &[]);
    let l = losses(&out);
    assert_eq!(l.last().unwrap().0, 30);
    // Every step appears exactly once across the two runs... except the steps
    // after the save that the first run may have logged before stopping: none.
    let steps: Vec<u64> = l.iter().map(|x| x.0).collect();
    assert_eq!(steps, (1..=30).collect::<Vec<_>>());
}
