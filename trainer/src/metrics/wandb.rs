//! Weights & Biases logging over W&B's own HTTP protocol (there is no usable
//! Rust client): the same requests the official SDK sends.
//!
//! * `POST {base}/graphql` with the `UpsertBucket` mutation creates (or, on a
//!   resume, updates) the run with its id, project, entity, config, display
//!   name, group and tags. The reply resolves the entity when none is set.
//! * `POST {base}/files/{entity}/{project}/{run_id}/file_stream` streams the
//!   history (`wandb-history.jsonl`: one JSON row per line, each with `_step`,
//!   `_runtime`, `_timestamp`; `offset` = index of the request's first line
//!   among all lines of the run, so a resent request overwrites, never
//!   duplicates) and the summary (`wandb-summary.json`: latest value of every
//!   key). A post goes out at least every [`WandbOptions::heartbeat`] (with
//!   `"files": {}` when idle); the last one carries `"complete": true` and the
//!   exit code.
//!
//! Every request uses HTTP Basic auth, user `api`, password = the API key.
//!
//! All network work happens on one background thread: [`Wandb::log`] only
//! queues a row, so the training step never waits on the network. Failures
//! (connection errors, 429, 5xx) are retried with capped exponential backoff
//! while rows keep buffering (bounded: beyond `max_buffered_rows` the oldest
//! are dropped, with a warning). A missing key or a rejected request (other
//! 4xx) disables W&B with a warning; the run itself never fails because of W&B.
//! [`Wandb::finish`] waits for the final flush only if W&B was reached at
//! some point of the run: one that was never reachable delays no exit.
//!
//! `Trainer::train` starts it on rank 0 when `logging.wandb` is set, sends
//! every metrics.jsonl row, and keeps the run id in the checkpoints so that a
//! resumed run continues the same W&B run.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::config::WandbSection;

pub const DEFAULT_BASE_URL: &str = "https://api.wandb.ai";
pub const HISTORY_FILE: &str = "wandb-history.jsonl";
pub const SUMMARY_FILE: &str = "wandb-summary.json";

/// The SDK's run upsert mutation, verbatim.
pub const UPSERT_BUCKET: &str = "mutation UpsertBucket($id: String, $name: String, $project: String, $entity: String, $groupName: String, $description: String, $displayName: String, $notes: String, $commit: String, $config: JSONString, $host: String, $debug: Boolean, $program: String, $repo: String, $jobType: String, $state: String, $sweep: String, $tags: [String!], $summaryMetrics: JSONString) { upsertBucket(input: {id: $id, name: $name, groupName: $groupName, modelName: $project, entityName: $entity, description: $description, displayName: $displayName, notes: $notes, config: $config, commit: $commit, host: $host, debug: $debug, jobProgram: $program, jobRepo: $repo, jobType: $jobType, state: $state, sweep: $sweep, tags: $tags, summaryMetrics: $summaryMetrics}) { bucket { id name displayName description config sweepName project { id name entity { id name } } } inserted } }";

/// Timings and limits of the sender; the defaults suit real runs, tests
/// shorten them.
#[derive(Debug, Clone)]
pub struct WandbOptions {
    /// Rows are batched: at most one history post per interval.
    pub min_interval: Duration,
    /// An (empty) post goes out at least this often.
    pub heartbeat: Duration,
    /// First retry delay; doubles per failure up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Whole-request limit (connect + send + reply).
    pub http_timeout: Duration,
    /// How long [`Wandb::finish`] (and drop) waits for the final flush.
    pub finish_timeout: Duration,
    /// Unsent rows kept while W&B is unreachable; older ones are dropped.
    pub max_buffered_rows: usize,
    /// History lines per file_stream request.
    pub max_rows_per_request: usize,
}

impl Default for WandbOptions {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(2),
            heartbeat: Duration::from_secs(25),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            http_timeout: Duration::from_secs(20),
            finish_timeout: Duration::from_secs(10),
            max_buffered_rows: 100_000,
            max_rows_per_request: 1_000,
        }
    }
}

enum Msg {
    Row(Map<String, Value>),
    Finish(i32),
}

/// A W&B run fed from a background thread. Create it on rank 0 only.
pub struct Wandb {
    run_id: String,
    tx: Sender<Msg>,
    done: Receiver<()>,
    start: Instant,
    finish_timeout: Duration,
    thread: Option<JoinHandle<()>>,
}

impl Wandb {
    /// Starts the background sender for `cfg`'s project. `run_id` is the id
    /// stored in the checkpoint (`None`: a fresh 8-character id);
    /// `history_offset` the number of history rows the run already has (0 for
    /// a new run; on resume, the rows logged up to the checkpoint's step), and
    /// `config_json` the run's config (an object: one W&B config key per
    /// field). The key comes from `$WANDB_API_KEY`, else `~/.netrc`. Without a
    /// key this warns on stderr and returns `None`; it never fails the run.
    pub fn start(
        cfg: &WandbSection,
        run_id: Option<String>,
        history_offset: u64,
        config_json: Value,
    ) -> Option<Wandb> {
        Self::start_with(
            cfg,
            run_id,
            history_offset,
            config_json,
            None,
            WandbOptions::default(),
        )
    }

    /// [`Wandb::start`] with an explicit API key (else the environment's) and
    /// timings.
    pub fn start_with(
        cfg: &WandbSection,
        run_id: Option<String>,
        history_offset: u64,
        config_json: Value,
        api_key: Option<String>,
        opts: WandbOptions,
    ) -> Option<Wandb> {
        let base = resolve_base_url(
            cfg.base_url.as_deref(),
            std::env::var("WANDB_BASE_URL").ok(),
        );
        let Some(key) = api_key
            .filter(|k| !k.is_empty())
            .or_else(|| {
                std::env::var("WANDB_API_KEY")
                    .ok()
                    .filter(|k| !k.trim().is_empty())
            })
            .map(|k| k.trim().to_string())
            .or_else(|| netrc_key(&base))
        else {
            eprintln!(
                "warning: wandb: no API key (set WANDB_API_KEY or run `wandb login`); W&B logging disabled"
            );
            return None;
        };
        let run_id = run_id.filter(|r| !r.is_empty()).unwrap_or_else(new_run_id);
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(opts.http_timeout.min(Duration::from_secs(10)))
            .timeout(opts.http_timeout)
            .build();
        let (tx, rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let finish_timeout = opts.finish_timeout;
        let worker = Worker {
            agent,
            auth: basic_auth(&key),
            base,
            project: cfg.project.clone(),
            variables: upsert_variables(cfg, &run_id, &config_json),
            entity: cfg.entity.clone(),
            run_id: run_id.clone(),
            created: false,
            pending: VecDeque::new(),
            offset: history_offset,
            summary: Map::new(),
            summary_dirty: false,
            last_post: Instant::now(),
            retry_at: None,
            backoff: opts.backoff_initial,
            failing: false,
            dropped: 0,
            disabled: false,
            opts,
        };
        let thread = std::thread::Builder::new()
            .name("wandb".into())
            .spawn(move || worker.run(rx, done_tx));
        match thread {
            Ok(thread) => Some(Wandb {
                run_id,
                tx,
                done,
                start: Instant::now(),
                finish_timeout,
                thread: Some(thread),
            }),
            Err(e) => {
                eprintln!(
                    "warning: wandb: cannot start the sender thread ({e}); W&B logging disabled"
                );
                None
            }
        }
    }

    /// The run's id: store it in the checkpoint (`CheckpointMeta::wandb_run_id`).
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Queues one history row (any struct or map that serializes to a JSON
    /// object, e.g. `StepMetrics`) at `step`. Never blocks on the network.
    pub fn log<T: Serialize>(&self, step: u64, row: &T) {
        let mut map = match serde_json::to_value(row) {
            Ok(Value::Object(m)) => m,
            Ok(other) => {
                let mut m = Map::new();
                m.insert("value".into(), other);
                m
            }
            Err(e) => {
                eprintln!("warning: wandb: row at step {step} not serializable: {e}");
                return;
            }
        };
        map.insert("_step".into(), json!(step));
        map.insert("_runtime".into(), json!(self.start.elapsed().as_secs_f64()));
        map.insert("_timestamp".into(), json!(unix_now()));
        // Fails only once the sender gave up (W&B disabled): nothing to do.
        let _ = self.tx.send(Msg::Row(map));
    }

    /// Flushes what is buffered and marks the run finished with `exit_code`,
    /// waiting at most `finish_timeout` (10 s by default).
    pub fn finish(mut self, exit_code: i32) {
        self.close(exit_code);
    }

    fn close(&mut self, exit_code: i32) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let _ = self.tx.send(Msg::Finish(exit_code));
        match self
            .done
            .recv_timeout(self.finish_timeout + Duration::from_millis(500))
        {
            // Done (or the thread is gone): it has nothing left to do.
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
            }
            // Left detached: it stops at its own deadline or with the process.
            Err(RecvTimeoutError::Timeout) => {
                eprintln!("warning: wandb: final flush still pending, not waiting longer");
            }
        }
    }
}

impl Drop for Wandb {
    /// Dropped without [`Wandb::finish`] (an error path): the run is marked
    /// finished with exit code 1, with the same bounded wait.
    fn drop(&mut self) {
        self.close(1);
    }
}

#[derive(Debug)]
enum SendError {
    /// Connection error, timeout, 429 or 5xx: try again later.
    Retry(String),
    /// Rejected (other 4xx) or unusable reply: give up on W&B.
    Fatal(String),
}

struct Worker {
    agent: ureq::Agent,
    auth: String,
    base: String,
    project: String,
    /// The upsert's variables (fixed for the run).
    variables: Value,
    entity: Option<String>,
    run_id: String,
    created: bool,
    /// Unsent history lines; `offset` is the run-wide index of the first.
    pending: VecDeque<String>,
    offset: u64,
    summary: Map<String, Value>,
    summary_dirty: bool,
    last_post: Instant,
    /// Set while failing: no attempt before this instant.
    retry_at: Option<Instant>,
    backoff: Duration,
    failing: bool,
    dropped: u64,
    disabled: bool,
    opts: WandbOptions,
}

impl Worker {
    fn run(mut self, rx: Receiver<Msg>, done: Sender<()>) {
        let mut finish: Option<i32> = None;
        loop {
            let due = self.next_due();
            let now = Instant::now();
            if now < due {
                match rx.recv_timeout(due - now) {
                    Ok(m) => {
                        self.handle(m, &mut finish);
                        if finish.is_none() {
                            continue;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    // The `Wandb` is gone without a word (cannot happen: drop
                    // sends Finish); finish as failed.
                    Err(RecvTimeoutError::Disconnected) => {
                        finish.get_or_insert(1);
                    }
                }
            }
            while let Ok(m) = rx.try_recv() {
                self.handle(m, &mut finish);
            }
            if self.disabled {
                break;
            }
            if let Some(code) = finish {
                self.finish(code, Instant::now() + self.opts.finish_timeout);
                break;
            }
            let timeout = self.opts.http_timeout;
            let r = if self.created {
                self.post(None, timeout).map(|_| ())
            } else {
                self.upsert(timeout)
            };
            self.outcome(r);
        }
        let _ = done.send(());
    }

    fn next_due(&self) -> Instant {
        if let Some(t) = self.retry_at {
            t
        } else if !self.created || self.disabled {
            Instant::now()
        } else if !self.pending.is_empty() || self.summary_dirty {
            self.last_post + self.opts.min_interval
        } else {
            self.last_post + self.opts.heartbeat
        }
    }

    fn handle(&mut self, m: Msg, finish: &mut Option<i32>) {
        match m {
            Msg::Row(row) => {
                let line = serde_json::to_string(&row).unwrap_or_else(|_| "{}".into());
                for (k, v) in row {
                    self.summary.insert(k, v);
                }
                self.summary_dirty = true;
                self.pending.push_back(line);
                if self.pending.len() > self.opts.max_buffered_rows.max(1) {
                    // Oldest first; the offset keeps counting them so later
                    // rows keep their run-wide index.
                    self.pending.pop_front();
                    self.offset += 1;
                    self.dropped += 1;
                    if self.dropped == 1 {
                        eprintln!(
                            "warning: wandb: more than {} rows buffered while W&B is unreachable; dropping the oldest",
                            self.opts.max_buffered_rows
                        );
                    }
                }
            }
            Msg::Finish(code) => {
                finish.get_or_insert(code);
            }
        }
    }

    fn outcome(&mut self, r: Result<(), SendError>) {
        match r {
            Ok(()) => {
                if self.failing {
                    eprintln!("wandb: connection restored");
                }
                self.failing = false;
                self.retry_at = None;
                self.backoff = self.opts.backoff_initial;
            }
            Err(SendError::Retry(e)) => {
                if !self.failing {
                    eprintln!(
                        "warning: wandb: request failed ({e}); buffering rows and retrying with backoff"
                    );
                }
                self.failing = true;
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(self.opts.backoff_max);
            }
            Err(SendError::Fatal(e)) => {
                eprintln!("warning: wandb: {e}; W&B logging disabled for the rest of the run");
                self.disabled = true;
            }
        }
    }

    /// Sends everything left, then the `complete` post, until `deadline`.
    fn finish(&mut self, code: i32, deadline: Instant) {
        loop {
            let now = Instant::now();
            if self.disabled {
                return;
            }
            if now >= deadline {
                eprintln!(
                    "warning: wandb: could not reach W&B before the deadline; {} rows not sent",
                    self.pending.len()
                );
                return;
            }
            // Never reached W&B during the whole run (it could not even create
            // the run): waiting out the deadline would only delay the exit.
            if !self.created && self.failing {
                eprintln!(
                    "warning: wandb: W&B was unreachable for the whole run; {} rows not sent",
                    self.pending.len()
                );
                return;
            }
            if let Some(t) = self.retry_at.filter(|t| *t > now) {
                std::thread::sleep(t.min(deadline) - now);
                continue;
            }
            let timeout = self.opts.http_timeout.min(deadline - now);
            let r = if !self.created {
                self.upsert(timeout)
            } else {
                let last = self.pending.len() <= self.opts.max_rows_per_request;
                match self.post(last.then_some(code), timeout) {
                    Ok(()) if last => {
                        if self.dropped > 0 {
                            eprintln!(
                                "warning: wandb: {} rows were dropped while W&B was unreachable",
                                self.dropped
                            );
                        }
                        return;
                    }
                    r => r,
                }
            };
            self.outcome(r);
        }
    }

    fn upsert(&mut self, timeout: Duration) -> Result<(), SendError> {
        let body = json!({"query": UPSERT_BUCKET, "variables": self.variables});
        let reply = self.request(&format!("{}/graphql", self.base), &body, timeout)?;
        if let Some(errors) = reply.get("errors").filter(|e| !e.is_null()) {
            return Err(SendError::Retry(format!("upsertBucket: {errors}")));
        }
        let entity = reply
            .pointer("/data/upsertBucket/bucket/project/entity/name")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(e) = entity {
            self.entity = Some(e);
        }
        if self.entity.is_none() {
            return Err(SendError::Fatal(
                "upsertBucket reply names no entity; set logging.wandb.entity".into(),
            ));
        }
        self.created = true;
        Ok(())
    }

    /// One file_stream post: up to `max_rows_per_request` history lines, the
    /// summary if it changed (always in the final post), and `complete`/`exitcode` when `complete` is set.
    fn post(&mut self, complete: Option<i32>, timeout: Duration) -> Result<(), SendError> {
        let n = self
            .pending
            .len()
            .min(self.opts.max_rows_per_request.max(1));
        let mut files = Map::new();
        if n > 0 {
            let content: Vec<&String> = self.pending.iter().take(n).collect();
            files.insert(
                HISTORY_FILE.into(),
                json!({"offset": self.offset, "content": content}),
            );
        }
        // The final post always carries the summary.
        let send_summary = (self.summary_dirty || complete.is_some()) && !self.summary.is_empty();
        if send_summary {
            let s = serde_json::to_string(&self.summary).unwrap_or_else(|_| "{}".into());
            files.insert(SUMMARY_FILE.into(), json!({"offset": 0, "content": [s]}));
        }
        let mut body = json!({"files": files});
        if let Some(code) = complete {
            body["complete"] = json!(true);
            body["exitcode"] = json!(code);
        }
        let url = format!(
            "{}/files/{}/{}/{}/file_stream",
            self.base,
            self.entity.as_deref().unwrap_or_default(),
            self.project,
            self.run_id
        );
        self.request(&url, &body, timeout)?;
        self.pending.drain(..n);
        self.offset += n as u64;
        if send_summary {
            self.summary_dirty = false;
        }
        self.last_post = Instant::now();
        Ok(())
    }

    fn request(&self, url: &str, body: &Value, timeout: Duration) -> Result<Value, SendError> {
        let r = self
            .agent
            .post(url)
            .timeout(timeout)
            .set("Authorization", &self.auth)
            .set("Content-Type", "application/json")
            .set(
                "User-Agent",
                concat!("bamba-train/", env!("CARGO_PKG_VERSION")),
            )
            .send_json(body);
        match r {
            Ok(resp) => {
                let text = resp.into_string().unwrap_or_default();
                Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
            }
            Err(ureq::Error::Status(code, _)) if code == 408 || code == 429 || code >= 500 => {
                Err(SendError::Retry(format!("HTTP {code} from {url}")))
            }
            Err(ureq::Error::Status(code, resp)) => {
                let mut text = resp.into_string().unwrap_or_default();
                text.truncate(300);
                Err(SendError::Fatal(format!("HTTP {code} from {url}: {text}")))
            }
            Err(ureq::Error::Transport(t)) => Err(SendError::Retry(t.to_string())),
        }
    }
}

/// `base_url` from the config, else `$WANDB_BASE_URL`, else api.wandb.ai.
pub fn resolve_base_url(configured: Option<&str>, env: Option<String>) -> String {
    let base = configured
        .map(str::to_string)
        .filter(|s| !s.trim().is_empty())
        .or(env.filter(|s| !s.trim().is_empty()))
        .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
    base.trim().trim_end_matches('/').to_string()
}

/// `Basic base64("api:<key>")`.
pub fn basic_auth(key: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("api:{key}"))
    )
}

/// A fresh run id: 8 lowercase alphanumerics, like the SDK's.
pub fn new_run_id() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    let mut x = h.finish();
    (0..8)
        .map(|_| {
            let c = ALPHABET[(x % 36) as usize] as char;
            x /= 36;
            c
        })
        .collect()
}

/// The W&B config encoding: `{"key": {"value": v}, ...}` (a non-object
/// config becomes the single key `config`).
pub fn wandb_config(config: &Value) -> Value {
    let wrap = |v: &Value| json!({ "value": v });
    match config {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), wrap(v))).collect()),
        Value::Null => json!({}),
        other => json!({ "config": wrap(other) }),
    }
}

fn upsert_variables(cfg: &WandbSection, run_id: &str, config: &Value) -> Value {
    let mut v = json!({
        "name": run_id,
        "project": cfg.project,
        "entity": cfg.entity,
        "config": wandb_config(config).to_string(),
    });
    if let Some(name) = &cfg.name {
        v["displayName"] = json!(name);
    }
    if let Some(group) = &cfg.group {
        v["groupName"] = json!(group);
    }
    if !cfg.tags.is_empty() {
        v["tags"] = json!(cfg.tags);
    }
    v
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The password for `base`'s host in `~/.netrc` (what `wandb login` writes).
fn netrc_key(base: &str) -> Option<String> {
    let home = std::env::var_os("HOME")?;
    let text = std::fs::read_to_string(std::path::Path::new(&home).join(".netrc")).ok()?;
    netrc_password(&text, url_host(base))
}

fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

fn netrc_password(text: &str, host: &str) -> Option<String> {
    let mut tokens = text.split_whitespace();
    let mut in_host = false;
    while let Some(t) = tokens.next() {
        match t {
            "machine" => in_host = tokens.next() == Some(host),
            "default" => in_host = false,
            "password" => {
                let p = tokens.next();
                if in_host {
                    return p.map(str::to_string);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wandb_run_id_is_8_lowercase_alphanumerics() {
        let a = new_run_id();
        let b = new_run_id();
        assert_eq!(a.len(), 8);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "{a}"
        );
        assert_ne!(a, b);
    }

    #[test]
    fn wandb_config_is_wrapped_in_value() {
        let c = wandb_config(&json!({"lr": 0.1, "model": {"layers": 2}}));
        assert_eq!(
            c,
            json!({"lr": {"value": 0.1}, "model": {"value": {"layers": 2}}})
        );
        assert_eq!(wandb_config(&json!(3)), json!({"config": {"value": 3}}));
        let cfg = WandbSection {
            name: Some("nice".into()),
            tags: vec!["a".into()],
            ..Default::default()
        };
        let v = upsert_variables(&cfg, "abcd1234", &json!({"lr": 0.1}));
        assert_eq!(v["name"], "abcd1234");
        assert_eq!(v["project"], "bamba");
        assert!(v["entity"].is_null());
        assert_eq!(v["displayName"], "nice");
        assert_eq!(v["tags"], json!(["a"]));
        let parsed: Value = serde_json::from_str(v["config"].as_str().unwrap()).unwrap();
        assert_eq!(parsed, json!({"lr": {"value": 0.1}}));
    }

    #[test]
    fn wandb_auth_and_urls() {
        assert_eq!(
            basic_auth("test-key-0123"),
            "Basic YXBpOnRlc3Qta2V5LTAxMjM="
        );
        assert_eq!(
            resolve_base_url(Some("http://h:1/"), Some("http://e".into())),
            "http://h:1"
        );
        assert_eq!(resolve_base_url(None, Some("http://e/".into())), "http://e");
        assert_eq!(resolve_base_url(None, None), DEFAULT_BASE_URL);
        assert_eq!(url_host("https://api.wandb.ai"), "api.wandb.ai");
        assert_eq!(url_host("http://localhost:8080/x"), "localhost");
        let netrc = "machine other.host login u password p1\nmachine api.wandb.ai\n  login user\n  password k2\n";
        assert_eq!(netrc_password(netrc, "api.wandb.ai").as_deref(), Some("k2"));
        assert_eq!(netrc_password(netrc, "nowhere"), None);
    }
}
