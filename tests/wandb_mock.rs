//! W&B logging against a local mock of W&B's HTTP API: every request's shape
//! is checked (method, path, Basic auth, GraphQL upsert, file_stream bodies),
//! history offsets must be consecutive with no row lost or duplicated through
//! 503s, an unreachable server must never block the caller, and a resumed run
//! continues the same run id and offsets.

#[path = "wandb_mock_server.rs"]
mod mock;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use bamba_train::config::WandbSection;
use bamba_train::metrics::StepMetrics;
use bamba_train::metrics::wandb::{Wandb, WandbOptions};
use mock::*;
use serde_json::{Value, json};

fn section(base_url: &str) -> WandbSection {
    WandbSection {
        project: PROJECT.into(),
        entity: None,
        name: Some("nice-run".into()),
        group: Some("grp".into()),
        tags: vec!["t1".into(), "t2".into()],
        base_url: Some(base_url.into()),
    }
}

fn opts() -> WandbOptions {
    WandbOptions {
        min_interval: Duration::from_millis(20),
        heartbeat: Duration::from_millis(150),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        http_timeout: Duration::from_secs(2),
        finish_timeout: Duration::from_secs(3),
        max_buffered_rows: 100_000,
        max_rows_per_request: 7,
    }
}

fn run_config() -> Value {
    json!({"lr": 0.001, "model": {"layers": 2}, "seed": 7})
}

fn start(mock: &Mock, run_id: Option<String>, offset: u64) -> Wandb {
    Wandb::start_with(
        &section(&mock.url),
        run_id,
        offset,
        run_config(),
        Some(KEY.into()),
        opts(),
    )
    .expect("a key is given: W&B starts")
}

fn row(step: u64) -> StepMetrics {
    StepMetrics {
        step,
        tokens: step * 100,
        loss: 10.0 / step as f64,
        lr: 1e-3,
        grad_norm: 0.5,
        ..Default::default()
    }
}

/// What one `Wandb` session sent, checked request by request.
struct Session {
    /// Posts with `"files": {}` (before the final one).
    heartbeats: usize,
    failed_streams: usize,
    first_offset: Option<u64>,
}

/// Checks one session's requests (from its first upsert to its `complete`
/// post) and applies its accepted history to `file` (offset = line index:
/// a resent line overwrites, a gap is an error).
fn check_session(reqs: &[Req], run_id: &str, exit_code: i32, file: &mut Vec<Value>) -> Session {
    assert!(!reqs.is_empty(), "no requests");
    let stream_path = format!("/files/{ENTITY}/{PROJECT}/{run_id}/file_stream");
    let mut s = Session {
        heartbeats: 0,
        failed_streams: 0,
        first_offset: None,
    };
    let mut created = false;
    let mut next = None::<u64>;
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(r.method, "POST", "request {i}: {r:?}");
        assert_eq!(r.auth.as_deref(), Some(AUTH), "request {i}: Basic auth");
        if r.path == "/graphql" {
            assert_eq!(r.status, 200);
            let q = r.body["query"].as_str().expect("query string");
            assert!(q.starts_with("mutation UpsertBucket("), "{q}");
            assert!(
                q.contains("upsertBucket(input: {id: $id, name: $name"),
                "{q}"
            );
            let v = &r.body["variables"];
            assert_eq!(v["name"], run_id);
            assert_eq!(v["project"], PROJECT);
            assert!(v["entity"].is_null(), "entity not configured: null");
            assert_eq!(v["displayName"], "nice-run");
            assert_eq!(v["groupName"], "grp");
            assert_eq!(v["tags"], json!(["t1", "t2"]));
            let cfg: Value =
                serde_json::from_str(v["config"].as_str().expect("config is a JSON string"))
                    .unwrap();
            assert_eq!(
                cfg,
                json!({"lr": {"value": 0.001}, "model": {"value": {"layers": 2}}, "seed": {"value": 7}})
            );
            created = true;
            continue;
        }
        assert_eq!(r.path, stream_path, "request {i}");
        assert!(
            created,
            "request {i}: file_stream before the run was created"
        );
        let files = r.body["files"].as_object().expect("files object");
        for k in files.keys() {
            assert!(
                k == "wandb-history.jsonl" || k == "wandb-summary.json",
                "file {k}"
            );
        }
        if r.status != 200 {
            s.failed_streams += 1;
        }
        let last = i + 1 == reqs.len();
        if last {
            assert_eq!(r.body["complete"], true, "last request completes the run");
            assert_eq!(r.body["exitcode"], exit_code);
            assert_eq!(r.status, 200);
        } else {
            assert!(
                r.body.get("complete").is_none(),
                "request {i}: complete before the end"
            );
        }
        if files.is_empty() && !last {
            s.heartbeats += 1;
        }
        if let Some(sum) = files.get("wandb-summary.json") {
            assert_eq!(sum["offset"], 0);
            let c = sum["content"].as_array().unwrap();
            assert_eq!(c.len(), 1);
            let sum: Value = serde_json::from_str(c[0].as_str().unwrap()).unwrap();
            for k in ["_step", "_runtime", "_timestamp", "loss", "lr"] {
                assert!(sum.get(k).is_some(), "summary lacks {k}: {sum}");
            }
        }
        let Some(h) = files.get("wandb-history.jsonl") else {
            continue;
        };
        let offset = h["offset"].as_u64().expect("offset");
        let content = h["content"].as_array().expect("content");
        assert!(!content.is_empty());
        s.first_offset.get_or_insert(offset);
        // Consecutive: each request starts where the last accepted one ended
        // (a retry after a 503 resends the same offset).
        if let Some(n) = next {
            assert_eq!(offset, n, "request {i}: offset not consecutive");
        }
        let rows: Vec<Value> = content
            .iter()
            .map(|l| serde_json::from_str(l.as_str().expect("a line is a JSON string")).unwrap())
            .collect();
        for row in &rows {
            for k in [
                "_step",
                "_runtime",
                "_timestamp",
                "loss",
                "lr",
                "tokens",
                "grad_norm",
            ] {
                assert!(row.get(k).is_some(), "row lacks {k}: {row}");
            }
            assert!(row["_timestamp"].as_f64().unwrap() > 1.6e9);
        }
        if r.status == 200 {
            next = Some(offset + rows.len() as u64);
            for (j, row) in rows.into_iter().enumerate() {
                let idx = offset as usize + j;
                assert!(idx <= file.len(), "gap in history at {idx}");
                if idx == file.len() {
                    file.push(row);
                } else {
                    file[idx] = row;
                }
            }
        } else {
            next = Some(offset);
        }
    }
    s
}

fn steps(file: &[Value]) -> Vec<u64> {
    file.iter().map(|r| r["_step"].as_u64().unwrap()).collect()
}

#[test]
fn streams_history_summary_heartbeat_and_complete() {
    let mock = Mock::start(0, false);
    let w = start(&mock, None, 0);
    let run_id = w.run_id().to_string();
    assert_eq!(run_id.len(), 8);
    assert!(
        run_id
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    );
    for s in 1..=5 {
        w.log(s, &row(s));
    }
    // Idle long enough for heartbeats.
    std::thread::sleep(Duration::from_millis(500));
    for s in 6..=20 {
        w.log(s, &row(s));
    }
    let t = Instant::now();
    w.finish(0);
    assert!(t.elapsed() < Duration::from_secs(3));
    let reqs = mock.requests();
    let mut file = vec![];
    let s = check_session(&reqs, &run_id, 0, &mut file);
    assert_eq!(reqs[0].path, "/graphql", "the run is created first");
    assert_eq!(steps(&file), (1..=20).collect::<Vec<_>>());
    assert_eq!(s.first_offset, Some(0));
    assert!(s.heartbeats >= 1, "no heartbeat while idle: {reqs:#?}");
    let last = reqs.last().unwrap();
    let sum = last.body["files"]["wandb-summary.json"]["content"][0].as_str();
    let sum: Value = serde_json::from_str(sum.expect("final summary")).unwrap();
    assert_eq!(sum["_step"], 20, "summary holds the latest values");
    assert_eq!(sum["loss"], 0.5);
}

#[test]
fn retries_503_without_losing_or_duplicating_rows() {
    let mock = Mock::start(4, false);
    let w = start(&mock, None, 0);
    let run_id = w.run_id().to_string();
    for s in 1..=40 {
        w.log(s, &row(s));
        if s % 10 == 0 {
            std::thread::sleep(Duration::from_millis(30));
        }
    }
    w.finish(3);
    let reqs = mock.requests();
    let mut file = vec![];
    let s = check_session(&reqs, &run_id, 3, &mut file);
    assert_eq!(s.failed_streams, 4, "the mock's 503s were retried");
    assert_eq!(steps(&file), (1..=40).collect::<Vec<_>>());
    let accepted: usize = reqs
        .iter()
        .filter(|r| r.status == 200)
        .filter_map(|r| r.body["files"]["wandb-history.jsonl"]["content"].as_array())
        .map(Vec::len)
        .sum();
    assert_eq!(accepted, 40, "every row accepted exactly once");
}

#[test]
fn unreachable_server_never_blocks() {
    // A port that nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut o = opts();
    o.finish_timeout = Duration::from_millis(800);
    let w = Wandb::start_with(
        &section(&format!("http://127.0.0.1:{port}")),
        None,
        0,
        run_config(),
        Some(KEY.into()),
        o,
    )
    .unwrap();
    let t = Instant::now();
    for s in 1..=1000 {
        w.log(s, &row(s));
    }
    let logged = t.elapsed();
    assert!(
        logged < Duration::from_millis(50),
        "1000 logs took {logged:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    w.finish(0);
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_millis(2000),
        "finish waited {waited:?}"
    );
}

#[test]
fn rejected_key_disables_without_blocking() {
    let mock = Mock::start(0, true);
    let w = start(&mock, None, 0);
    std::thread::sleep(Duration::from_millis(100));
    for s in 1..=100 {
        w.log(s, &row(s));
    }
    let t = Instant::now();
    w.finish(0);
    assert!(t.elapsed() < Duration::from_millis(500));
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1, "a 401 is not retried: {reqs:#?}");
    assert_eq!(reqs[0].status, 401);
}

#[test]
fn resume_continues_run_id_and_offsets() {
    let mock = Mock::start(0, false);
    let w = start(&mock, None, 0);
    let run_id = w.run_id().to_string();
    for s in 1..=10 {
        w.log(s, &row(s));
    }
    w.finish(0);
    let first = mock.requests().len();

    // Resumed from a checkpoint at step 10: same id, 10 rows already sent.
    let w = start(&mock, Some(run_id.clone()), 10);
    assert_eq!(w.run_id(), run_id);
    for s in 11..=25 {
        w.log(s, &row(s));
    }
    w.finish(0);
    let reqs = mock.requests();
    let mut file = vec![];
    check_session(&reqs[..first], &run_id, 0, &mut file);
    assert_eq!(steps(&file), (1..=10).collect::<Vec<_>>());
    assert_eq!(
        reqs[first].path, "/graphql",
        "the resumed run is upserted again"
    );
    let s = check_session(&reqs[first..], &run_id, 0, &mut file);
    assert_eq!(
        s.first_offset,
        Some(10),
        "history continues at the stored offset"
    );
    assert_eq!(steps(&file), (1..=25).collect::<Vec<_>>());
}
