//! Single-process training through the real path (config, loader on the
//! shipped corpus, model, sharded AdamW, checkpoints): the loss falls, a run
//! resumed from its own mid-run checkpoint continues bit for bit, and stage 2
//! starts from stage 1's weights with a fresh optimizer and data state.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bamba_train::backend::CpuTrain;
use bamba_train::checkpoint::{self, format};
use bamba_train::config::{TrainConfig, parse_config};
use bamba_train::fsdp::Layout;
use bamba_train::runtime::Runtime;
use bamba_train::train::{RunSummary, Trainer};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/data")
}

fn config(out: &Path, steps: u64, extra: &[&str]) -> TrainConfig {
    let yaml = format!(
        "
model: {{ preset: tiny, hf: {{ vocab_size: 128256 }} }}
data:
  seq_len: 32
  eos_token: 128001
  logical_shards: 12
  shuffle_buffer: 64
  datasets:
    - {{ name: shakespeare, path: {c}/shakespeare, weight: 0.7 }}
    - {{ name: fortunes, path: {c}/fortunes, weight: 0.3 }}
optimizer: {{ lr: 3.0e-3 }}
schedule: {{ warmup_steps: 2, decay: {{ kind: cosine }}, final_lr: 3.0e-4 }}
training: {{ global_batch_sequences: 4, micro_batch: 2, steps: {steps} }}
checkpoint: {{ output_dir: {o}, every_steps: 4, keep_last: 5, async_save: true }}
logging: {{ every_steps: 1, progress: off }}
",
        c = corpus().display(),
        o = out.display()
    );
    let sets: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    parse_config(&yaml, &sets).unwrap()
}

fn run(cfg: TrainConfig, resume: Option<PathBuf>) -> RunSummary {
    let mut t =
        Trainer::<CpuTrain>::new(cfg, Runtime::single(), Default::default(), resume).unwrap();
    t.train(Arc::new(AtomicBool::new(false))).unwrap()
}

fn master(dir: &Path) -> Vec<Vec<f32>> {
    let meta = format::read_meta(dir).unwrap();
    let cfg = bamba_model::BambaConfig::from_json_str(&meta.model_config).unwrap();
    checkpoint::reshard::read_slices(dir, &meta, &Layout::new(&cfg, 1), 0)
        .unwrap()
        .into_iter()
        .map(|[m, _, _]| m)
        .collect()
}

#[test]
fn loss_falls_and_a_resumed_run_continues_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));

    let full = run(config(&a, 12, &[]), None);
    assert_eq!(full.final_step, 12);
    let first: f64 = full.losses[..2].iter().map(|l| l.1).sum::<f64>() / 2.0;
    let last: f64 = full.losses[10..].iter().map(|l| l.1).sum::<f64>() / 2.0;
    assert!(last < first - 0.5, "loss did not fall: {first} -> {last}");

    // Resume a second run from the first run's step-4 checkpoint.
    std::fs::create_dir_all(checkpoint::checkpoints_dir(&b)).unwrap();
    let src = checkpoint::step_dir(&a, 4);
    let dst = checkpoint::step_dir(&b, 4);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let resumed = run(
        config(&b, 12, &[]),
        checkpoint::newest_valid(&b, &mut |w| panic!("{w}")),
    );
    assert_eq!(resumed.losses.first().map(|l| l.0), Some(5));
    assert_eq!(
        resumed.losses,
        full.losses[4..].to_vec(),
        "losses after resume differ"
    );
    assert_eq!(
        master(&checkpoint::step_dir(&b, 12)),
        master(&checkpoint::step_dir(&a, 12)),
        "final weights differ"
    );
}

#[test]
fn stage_two_starts_from_stage_one_weights_with_fresh_state() {
    let tmp = tempfile::tempdir().unwrap();
    let (s1, s2) = (tmp.path().join("s1"), tmp.path().join("s2"));
    run(config(&s1, 4, &[]), None);
    let init = format!("model.init_from={}", s1.display());
    let cfg2 = config(
        &s2,
        4,
        &[
            &init,
            "data.eos_token=128000",
            "optimizer.lr=2e-5",
            "schedule.final_lr=0",
            "schedule.warmup_steps=0",
        ],
    );
    let t = Trainer::<CpuTrain>::new(cfg2, Runtime::single(), Default::default(), None).unwrap();
    assert_eq!(t.step, 0, "stage 2 counts its own steps");
    assert_eq!(t.tokens_seen, 0);
    let stage1 = master(&checkpoint::step_dir(&s1, 4));
    let host = |x: &burn::tensor::Tensor<_, 1>| x.clone().into_data().to_vec::<f32>().unwrap();
    let got: Vec<Vec<f32>> = t.sharded.master.iter().map(host).collect();
    assert_eq!(
        got, stage1,
        "stage 2 must start from stage 1's final weights"
    );
    assert!(
        t.sharded
            .moments
            .iter()
            .all(|m| host(&m.exp_avg).iter().all(|v| *v == 0.0)),
        "optimizer state must be fresh"
    );
}

/// Evaluation gathers the whole model and gives it back afterwards: between
/// steps only the shards stay resident, in the whole-model and the streamed
/// step alike (the streamed step never replaces the model's own parameters,
/// so a copy left by evaluation would stay, stale, for the rest of the run).
#[test]
fn evaluation_leaves_no_gathered_model_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let eval = format!(
        "eval.datasets=[{{name: fortunes, path: '{}/fortunes', weight: 1.0}}]",
        corpus().display()
    );
    for ac in ["0.0", "1.0"] {
        let out = tmp.path().join(format!("ac{ac}"));
        let ac_set = format!("parallelism.activation_checkpointing={ac}");
        let cfg = config(&out, 2, &[&eval, "eval.batches=1", &ac_set]);
        let mut t =
            Trainer::<CpuTrain>::new(cfg, Runtime::single(), Default::default(), None).unwrap();
        t.train_step(false).unwrap();
        let between_steps = t.resident_param_elements();
        let loss = t.evaluate().unwrap();
        assert!(loss.is_finite(), "ac {ac}: eval loss {loss}");
        assert_eq!(
            t.resident_param_elements(),
            between_steps,
            "ac {ac}: evaluation left gathered parameters behind"
        );
        // Training goes on from there.
        t.train_step(false).unwrap();
    }
}
