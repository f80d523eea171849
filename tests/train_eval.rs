//! Evaluation through the real `bamba-train` binary: eval rows appear at every
//! `eval.every_steps` step (also between logging steps) with
//! `eval_ppl == exp(eval_loss)`, and evaluating does not change training: the
//! losses and the final weights equal those of a run without eval (eval must
//! not consume training data or any other training state).

#[path = "checkpoint_util.rs"]
mod util;

use std::path::Path;

use bamba_train::checkpoint::{self, format};
use bamba_train::fsdp::Layout;
use serde_json::Value;
use util::{corpus, train, write_config};

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn rows(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn weights(out: &Path, step: u64) -> Vec<Vec<f32>> {
    let dir = checkpoint::step_dir(out, step);
    let meta = format::read_meta(&dir).unwrap();
    let cfg = bamba_model::BambaConfig::from_json_str(&meta.model_config).unwrap();
    checkpoint::reshard::read_slices(&dir, &meta, &Layout::new(&cfg, 1), 0)
        .unwrap()
        .into_iter()
        .map(|[m, a, b]| [m, a, b].concat())
        .collect()
}

#[test]
fn eval_rows_at_the_right_steps_and_training_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let train_set = format!(
        "data.datasets=[{{name: shakespeare, path: '{}/shakespeare', weight: 1.0}}]",
        corpus().display()
    );
    let eval_sets = [
        "eval.every_steps=3".to_string(),
        "eval.batches=3".to_string(),
        format!(
            "eval.datasets=[{{name: fortunes, path: '{}/fortunes', weight: 1.0}}]",
            corpus().display()
        ),
    ];
    let sets = |extra: &[String]| -> Vec<String> {
        let mut v = vec!["--set".to_string(), train_set.clone()];
        for s in extra {
            v.push("--set".into());
            v.push(s.clone());
        }
        v
    };

    // Without eval: a row every step.
    let plain = write_config(d, "plain", 7, "every_steps: 100");
    let a = sets(&["logging.every_steps=1".into()]);
    train(&plain, &args(&a));
    // With eval every 3 steps and rows every 4: rows at 3 and 6 (eval), 4
    // and 7 (the last step).
    let evald = write_config(d, "eval", 7, "every_steps: 100");
    let mut extra = vec!["logging.every_steps=4".to_string()];
    extra.extend(eval_sets.iter().cloned());
    let b = sets(&extra);
    train(&evald, &args(&b));

    let plain_rows = rows(&d.join("plain"));
    let eval_rows = rows(&d.join("eval"));
    let steps: Vec<u64> = eval_rows
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [3, 4, 6, 7]);
    for r in &eval_rows {
        let step = r["step"].as_u64().unwrap();
        let has_eval = step % 3 == 0;
        assert_eq!(r.get("eval_loss").is_some(), has_eval, "step {step}: {r}");
        assert_eq!(r.get("eval_ppl").is_some(), has_eval, "step {step}: {r}");
        if has_eval {
            let (l, p) = (
                r["eval_loss"].as_f64().unwrap(),
                r["eval_ppl"].as_f64().unwrap(),
            );
            assert!(l > 0.0 && l < (128256f64).ln() + 2.0, "eval loss {l}");
            assert!(
                (p - l.exp()).abs() <= 1e-12 * p,
                "eval_ppl {p} != exp(eval_loss {l})"
            );
        }
        // The same training loss as the run without eval, to the bit.
        let same = &plain_rows[step as usize - 1];
        assert_eq!(same["step"], step);
        assert_eq!(
            r["loss"], same["loss"],
            "step {step}: eval changed training"
        );
        assert_eq!(r["grad_norm"], same["grad_norm"], "step {step}");
        assert_eq!(r["tokens"], same["tokens"], "step {step}");
    }
    assert!(plain_rows.iter().all(|r| r.get("eval_loss").is_none()));
    assert_eq!(
        weights(&d.join("eval"), 7),
        weights(&d.join("plain"), 7),
        "eval changed the final weights or optimizer state"
    );
    let loader = |run: &str| {
        std::fs::read(checkpoint::step_dir(&d.join(run), 7).join(format::loader_file(0))).unwrap()
    };
    assert!(
        loader("eval") == loader("plain"),
        "eval moved the training data loader"
    );
    // Evaluations at different steps see the same held-out batches, so a
    // falling eval loss shows the model learning (not different data).
    let e3 = eval_rows[0]["eval_loss"].as_f64().unwrap();
    let e6 = eval_rows[2]["eval_loss"].as_f64().unwrap();
    assert!(e6 < e3, "eval loss did not fall: {e3} -> {e6}");
}
