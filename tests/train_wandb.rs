//! W&B through the real `bamba-train` binary, against a local mock of W&B's
//! HTTP API: the run is created with the training config, every metrics row
//! (train and eval) arrives as a history row at its step, the run is finished
//! with exit code 0 (75 after a preemption), a resumed run continues the same
//! run id with history offsets continuing, and an unreachable W&B neither
//! fails nor slows the run.

#[path = "wandb_mock_server.rs"]
mod mock;
#[path = "checkpoint_util.rs"]
mod util;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bamba_train::checkpoint::{self, format};
use mock::*;
use serde_json::Value;
use util::{BIN, corpus, write_config};

/// `logging.wandb` pointed at `url`, eval every 3 steps on a held-out set.
fn wandb_sets(url: &str, steps: u64) -> Vec<String> {
    vec![
        format!("training.steps={steps}"),
        "logging.every_steps=2".into(),
        format!(
            "logging.wandb={{project: {PROJECT}, name: tiny-run, group: g, tags: [t1], base_url: '{url}'}}"
        ),
        "eval.every_steps=3".into(),
        "eval.batches=2".into(),
        format!(
            "eval.datasets=[{{name: held_out, path: '{}/fortunes', weight: 1.0}}]",
            corpus().display()
        ),
    ]
}

fn run(config: &Path, sets: &[String]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(config);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd.env("WANDB_API_KEY", KEY)
        .env_remove("WANDB_BASE_URL")
        .output()
        .unwrap()
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "bamba-train failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn run_id_in_checkpoint(out: &Path, step: u64) -> Option<String> {
    format::read_meta(&checkpoint::step_dir(out, step))
        .unwrap()
        .wandb_run_id
}

/// One process's requests: the upsert first, file_stream posts with
/// consecutive history offsets, the last one completing the run. Applies the
/// history to `file` (line index = offset) and returns the run id, the first
/// history offset and the upsert's config.
fn check_session(reqs: &[Req], exit_code: i32, file: &mut Vec<Value>) -> (String, u64, Value) {
    assert!(reqs.len() >= 2, "too few requests: {reqs:#?}");
    let up = &reqs[0];
    assert_eq!(up.path, "/graphql", "the run is created first");
    assert_eq!(up.auth.as_deref(), Some(AUTH));
    let v = &up.body["variables"];
    let run_id = v["name"].as_str().expect("run id").to_string();
    assert_eq!(v["project"], PROJECT);
    assert_eq!(v["displayName"], "tiny-run");
    assert_eq!(v["groupName"], "g");
    let config: Value = serde_json::from_str(v["config"].as_str().unwrap()).unwrap();
    let stream = format!("/files/{ENTITY}/{PROJECT}/{run_id}/file_stream");
    let mut next = None::<u64>;
    let mut first = None;
    for (i, r) in reqs.iter().enumerate().skip(1) {
        assert_eq!(r.path, stream, "request {i}");
        assert_eq!(r.status, 200);
        let last = i + 1 == reqs.len();
        if last {
            assert_eq!(r.body["complete"], true, "the last post completes the run");
            assert_eq!(r.body["exitcode"], exit_code);
        } else {
            assert!(
                r.body.get("complete").is_none(),
                "request {i} completes early"
            );
        }
        let Some(h) = r.body["files"].get("wandb-history.jsonl") else {
            continue;
        };
        let offset = h["offset"].as_u64().unwrap();
        if let Some(n) = next {
            assert_eq!(offset, n, "request {i}: history offsets not consecutive");
        }
        first.get_or_insert(offset);
        let rows = h["content"].as_array().unwrap();
        for (j, line) in rows.iter().enumerate() {
            let row: Value = serde_json::from_str(line.as_str().unwrap()).unwrap();
            let idx = offset as usize + j;
            assert!(idx <= file.len(), "gap in the history at {idx}");
            if idx == file.len() {
                file.push(row);
            } else {
                file[idx] = row;
            }
        }
        next = Some(offset + rows.len() as u64);
    }
    (run_id, first.expect("no history sent"), config)
}

fn steps(rows: &[Value], key: &str) -> Vec<u64> {
    rows.iter().map(|r| r[key].as_u64().unwrap()).collect()
}

#[test]
fn wandb_run_is_created_streamed_finished_and_resumed() {
    let mock = Mock::start(0, false);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "w", 5, "every_steps: 100, keep_last: 5");
    let out = tmp.path().join("w");

    // Rows at 2, 3 (eval), 4 and 5 (the last step); saved at 5.
    let t = Instant::now();
    ok(run(&cfg, &wandb_sets(&mock.url, 5)));
    eprintln!("first run: {:?}", t.elapsed());
    let first = mock.requests();
    let mut history = vec![];
    let (run_id, offset, config) = check_session(&first, 0, &mut history);
    assert_eq!(offset, 0);
    assert_eq!(config["training"]["value"]["steps"], 5);
    assert_eq!(config["optimizer"]["value"]["lr"], 3.0e-3);
    assert_eq!(config["data"]["value"]["seq_len"], 16);
    assert_eq!(config["world_size"]["value"], 1);
    assert_eq!(run_id_in_checkpoint(&out, 5).as_deref(), Some(&*run_id));
    assert_eq!(steps(&history, "_step"), [2, 3, 4, 5]);
    // The history rows are the metrics.jsonl rows.
    let rows = metrics(&out);
    assert_eq!(rows.len(), history.len());
    for (h, m) in history.iter().zip(&rows) {
        for (k, v) in m.as_object().unwrap() {
            assert_eq!(&h[k], v, "history row at step {} differs in {k}", m["step"]);
        }
    }
    assert!(history[1]["eval_loss"].as_f64().unwrap() > 0.0, "eval row");
    assert!(history[0].get("eval_loss").is_none());

    // Resume to step 9: the same run, history continuing at offset 4 (the
    // rows up to step 5, including the last-step row that the step interval
    // alone would not give).
    ok(run(&cfg, &wandb_sets(&mock.url, 9)));
    let all = mock.requests();
    let (id2, offset2, config2) = check_session(&all[first.len()..], 0, &mut history);
    assert_eq!(id2, run_id, "a resumed run continues the same W&B run");
    assert_eq!(
        offset2, 4,
        "history continues after the rows already logged"
    );
    assert_eq!(config2["training"]["value"]["steps"], 9);
    assert_eq!(steps(&history, "_step"), [2, 3, 4, 5, 6, 8, 9]);
    assert_eq!(steps(&history, "step"), steps(&metrics(&out), "step"));
    assert_eq!(run_id_in_checkpoint(&out, 9).as_deref(), Some(&*run_id));
}

#[test]
fn wandb_sees_exit_code_75_after_a_preemption() {
    let mock = Mock::start(0, false);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "p", 10_000, "every_steps: 1000");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("--set")
        .arg(format!(
            "logging.wandb={{project: {PROJECT}, name: tiny-run, group: g, base_url: '{}'}}",
            mock.url
        ))
        .env("WANDB_API_KEY", KEY)
        .env_remove("WANDB_BASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let metrics = tmp.path().join("p/metrics.jsonl");
    let t0 = Instant::now();
    while util::logged_steps(&tmp.path().join("p")).len() < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(75));
    let reqs = mock.requests();
    let mut history = vec![];
    let (run_id, _, _) = check_session(&reqs, 75, &mut history);
    let logged = util::logged_steps(&tmp.path().join("p"));
    assert_eq!(steps(&history, "_step"), logged, "{}", metrics.display());
    let saved = checkpoint::list_steps(&tmp.path().join("p"))[0];
    assert_eq!(
        run_id_in_checkpoint(&tmp.path().join("p"), saved).as_deref(),
        Some(&*run_id)
    );
}

#[test]
fn unreachable_wandb_neither_fails_nor_slows_training() {
    let tmp = tempfile::tempdir().unwrap();
    // A closed port: connections are refused at once.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let time = |name: &str, sets: Vec<String>| {
        let cfg = write_config(tmp.path(), name, 6, "every_steps: 100");
        let t = Instant::now();
        let out = ok(run(&cfg, &sets));
        (t.elapsed(), out)
    };
    let plain = vec!["logging.every_steps=1".to_string()];
    let (base, _) = time("plain", plain.clone());
    let mut with = plain;
    with.push(format!(
        "logging.wandb={{project: {PROJECT}, base_url: '{url}'}}"
    ));
    let (slow, out) = time("down", with);
    eprintln!("without W&B {base:?}, with W&B unreachable {slow:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warning: wandb"), "no warning:\n{stderr}");
    assert_eq!(
        util::logged_steps(&tmp.path().join("down")),
        (1..=6).collect::<Vec<_>>()
    );
    assert!(
        slow < base + Duration::from_secs(2),
        "an unreachable W&B slowed the run: {slow:?} vs {base:?}"
    );
}
