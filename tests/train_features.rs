//! User-facing features of the `bamba-train` binary on CPU: a curriculum file
//! chains stage 1 then stage 2 (stage 2 starts from stage 1's final weights
//! with a fresh optimizer and data state), SIGUSR1 (SLURM's time-limit
//! warning) saves and exits 75 like SIGTERM, and metrics.jsonl carries every
//! documented field with consistent values (MFU against the configured or
//! default peak).

#[path = "checkpoint_util.rs"]
mod util;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bamba_train::checkpoint::{self, format};
use bamba_train::fsdp::Layout;
use serde_json::Value;
use util::{BIN, logged_steps, train, write_config};

fn rows(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    rows(out)
        .iter()
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

fn state(out: &Path, step: u64) -> (Vec<Vec<f32>>, Vec<u8>) {
    let dir = checkpoint::step_dir(out, step);
    format::verify(&dir).unwrap();
    let meta = format::read_meta(&dir).unwrap();
    let cfg = bamba_model::BambaConfig::from_json_str(&meta.model_config).unwrap();
    let slices = checkpoint::reshard::read_slices(&dir, &meta, &Layout::new(&cfg, 1), 0)
        .unwrap()
        .into_iter()
        .map(|[m, a, b]| [m, a, b].concat())
        .collect();
    (
        slices,
        std::fs::read(dir.join(format::loader_file(0))).unwrap(),
    )
}

/// One of master (0), exp_avg (1), exp_avg_sq (2) over all units.
fn flat(out: &Path, step: u64, which: usize) -> Vec<f32> {
    let dir = checkpoint::step_dir(out, step);
    let meta = format::read_meta(&dir).unwrap();
    let cfg = bamba_model::BambaConfig::from_json_str(&meta.model_config).unwrap();
    checkpoint::reshard::read_slices(&dir, &meta, &Layout::new(&cfg, 1), 0)
        .unwrap()
        .into_iter()
        .flat_map(|u| u[which].clone())
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn curriculum_runs_stage_two_from_stage_one_weights_with_fresh_state() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_config(d, "stage1", 6, "every_steps: 3, keep_last: 5");
    write_config(d, "stage2", 4, "every_steps: 1, keep_last: 10");
    let s1 = d.join("stage1");
    // Stage 2 as the shipped curriculum sets it up: weights from stage 1's
    // output directory, its own LR schedule and document separator.
    let stage2_sets = [
        format!("model.init_from={}", s1.display()),
        "optimizer.lr=1.0e-3".into(),
        "schedule.warmup_steps=0".into(),
        "schedule.final_lr=0".into(),
        "data.eos_token=128000".into(),
    ];
    let curriculum = d.join("curriculum.yaml");
    std::fs::write(
        &curriculum,
        format!(
            "stages:\n  - config: stage1.yaml\n  - config: stage2.yaml\n    set: {}\n",
            serde_json::to_string(&stage2_sets).unwrap()
        ),
    )
    .unwrap();
    let out = train(&curriculum, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("curriculum: stage 2 starts"), "{stderr}");

    // The same stage 2 as a standalone run from stage 1's weights.
    let reference = write_config(d, "reference", 4, "every_steps: 1, keep_last: 10");
    let mut args = vec![];
    for s in &stage2_sets {
        args.extend(["--set", s.as_str()]);
    }
    train(&reference, &args);

    let (l1, l2) = (losses(&s1), losses(&d.join("stage2")));
    eprintln!("stage 1 losses {l1:?}\nstage 2 losses {l2:?}");
    assert_eq!(
        l1.iter().map(|l| l.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(
        l2.iter().map(|l| l.0).collect::<Vec<_>>(),
        [1, 2, 3, 4],
        "stage 2 counts its own steps"
    );
    // Stage 2's first step moved stage 1's final weights by at most ~lr:
    // a fresh AdamW's first update is lr * (g / (|g| + eps) + wd * w).
    let (m1_3, m1_6, m2_1) = (
        flat(&s1, 3, 0),
        flat(&s1, 6, 0),
        flat(&d.join("stage2"), 1, 0),
    );
    let moved = max_diff(&m2_1, &m1_6);
    assert!(
        moved <= 1.0e-3 * 1.01 + 1e-6,
        "stage 2 did not start from stage 1's final weights: moved {moved}"
    );
    assert!(
        max_diff(&m2_1, &m1_3) > 2.0e-3,
        "stage 1's last steps changed too little for the check above to mean anything"
    );
    // Fresh moments after one step: m = (1 - b1) g, v = (1 - b2) g^2, so
    // m^2 / v = 0.01 / 0.05 = 0.2 for every element with a gradient; moments
    // carried over from stage 1 would not give a constant ratio.
    let (m, v) = (flat(&d.join("stage2"), 1, 1), flat(&d.join("stage2"), 1, 2));
    let mut checked = 0;
    for (a, b) in m.iter().zip(&v) {
        if *b > 1e-30 {
            let ratio = (*a as f64).powi(2) / *b as f64;
            assert!(
                (ratio - 0.2).abs() < 1e-4,
                "m^2/v = {ratio}: optimizer state not fresh"
            );
            checked += 1;
        }
    }
    assert!(
        checked > m.len() / 2,
        "only {checked} elements have gradients"
    );
    let r2 = rows(&d.join("stage2"));
    assert_eq!(r2[0]["tokens"], 32, "stage 2 counts its own tokens");
    // Its own schedule: no warmup, cosine from 1e-3 to 0 over 4 steps.
    let lr1 = 1.0e-3 * 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos());
    assert!(
        (r2[0]["lr"].as_f64().unwrap() - lr1).abs() < 1e-15,
        "stage 2 runs its own schedule: {}",
        r2[0]
    );
    // Equal to the standalone run: weights from stage 1's final (newest)
    // checkpoint, fresh moments, step counter and loader.
    assert_eq!(l2, losses(&d.join("reference")));
    let (w2, loader2) = state(&d.join("stage2"), 4);
    let (wr, loader_r) = state(&d.join("reference"), 4);
    assert!(
        w2 == wr,
        "stage 2 state differs from a fresh start on stage 1's weights"
    );
    assert!(loader2 == loader_r, "stage 2 data state is not fresh");
    let meta = format::read_meta(&checkpoint::step_dir(&d.join("stage2"), 4)).unwrap();
    assert_eq!((meta.step, meta.tokens_seen), (4, 4 * 32));

    // Running the finished curriculum again resumes each stage at its end.
    train(&curriculum, &[]);
    assert_eq!(logged_steps(&s1).len(), 6);
    assert_eq!(logged_steps(&d.join("stage2")).len(), 4);
}

#[test]
fn sigusr1_saves_a_checkpoint_and_exits_75_then_the_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "usr1", 10_000, "every_steps: 1000");
    let out = tmp.path().join("usr1");
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while logged_steps(&out).len() < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let done = child.wait_with_output().unwrap();
    assert_eq!(
        done.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let saved = checkpoint::list_steps(&out);
    assert_eq!(saved.len(), 1, "one checkpoint, at the stop: {saved:?}");
    let logged = logged_steps(&out);
    assert_eq!(
        saved[0],
        *logged.last().unwrap(),
        "saved at the last step run"
    );
    assert!(saved[0] >= 3 && saved[0] < 10_000);

    let end = saved[0] + 3;
    train(&cfg, &["--set", &format!("training.steps={end}")]);
    assert_eq!(logged_steps(&out), (1..=end).collect::<Vec<_>>());
}

#[test]
fn metrics_rows_carry_every_field() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, peak) in [("default_peak", None), ("peak_2", Some(2.0))] {
        let cfg = write_config(tmp.path(), name, 3, "every_steps: 100");
        let mut args = vec![];
        let set = peak.map(|p| format!("logging.peak_tflops={p}"));
        if let Some(s) = &set {
            args.extend(["--set", s.as_str()]);
        }
        train(&cfg, &args);
        let out = tmp.path().join(name);
        let meta = format::read_meta(&checkpoint::step_dir(&out, 3)).unwrap();
        let model = bamba_model::BambaConfig::from_json_str(&meta.model_config).unwrap();
        let flops = model.flops_per_token(16);
        // 989 TFLOP/s (H100/H200) unless configured.
        let peak = peak.unwrap_or(989.0) * 1e12;
        let r = rows(&out);
        assert_eq!(r.len(), 3);
        for (i, row) in r.iter().enumerate() {
            let step = i as u64 + 1;
            let f = |k: &str| {
                row[k]
                    .as_f64()
                    .unwrap_or_else(|| panic!("step {step}: no number `{k}` in {row}"))
            };
            for k in [
                "step",
                "tokens",
                "loss",
                "lr",
                "grad_norm",
                "tokens_per_s",
                "tokens_per_s_per_device",
                "mfu",
                "step_time_s",
                "memory_bytes",
                "skipped_steps",
            ] {
                assert!(f(k).is_finite(), "{k} at step {step}: {row}");
            }
            assert_eq!(row["step"], step);
            assert_eq!(row["tokens"], step * 32, "2 sequences of 16 tokens a step");
            assert!(f("loss") > 0.0);
            // lr 3e-3, 1 warmup step, cosine to 3e-4 over the other 2.
            let lr = [3.0e-3, 3.0e-4 + 2.7e-3 * 0.5, 3.0e-4][i];
            assert!((f("lr") - lr).abs() < 1e-12, "lr at step {step}: {row}");
            assert!(f("grad_norm") > 0.0);
            assert!(f("tokens_per_s") > 0.0);
            assert_eq!(
                f("tokens_per_s_per_device"),
                f("tokens_per_s"),
                "one device"
            );
            let tokens_in_step = f("tokens_per_s") * f("step_time_s");
            assert!((tokens_in_step - 32.0).abs() < 1e-6, "{row}");
            let mfu = flops * f("tokens_per_s_per_device") / peak;
            assert!(
                (f("mfu") - mfu).abs() <= 1e-9 * mfu,
                "mfu {row}, expected {mfu}"
            );
            assert!(f("memory_bytes") > 1e6, "{row}");
            assert_eq!(row["skipped_steps"], 0);
        }
    }
}
