//! A local mock of W&B's HTTP API (GraphQL `UpsertBucket` and
//! `file_stream`) that records every request; shared by `wandb_mock.rs` and
//! `train_wandb.rs` with `#[path]`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

pub const KEY: &str = "test-key-0123";
/// base64("api:test-key-0123"), computed independently (coreutils base64).
pub const AUTH: &str = "Basic YXBpOnRlc3Qta2V5LTAxMjM=";
pub const ENTITY: &str = "mock-entity";
pub const PROJECT: &str = "proj";

#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub auth: Option<String>,
    pub body: Value,
    pub status: u16,
}

#[derive(Clone)]
pub struct Mock {
    pub url: String,
    reqs: Arc<Mutex<Vec<Req>>>,
    /// file_stream requests still to answer 503.
    fail_streams: Arc<AtomicUsize>,
    /// Answer 401 to everything.
    reject: bool,
}

impl Mock {
    pub fn start(fail_streams: usize, reject: bool) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mock = Mock {
            url: format!("http://{}", listener.local_addr().unwrap()),
            reqs: Arc::default(),
            fail_streams: Arc::new(AtomicUsize::new(fail_streams)),
            reject,
        };
        let m = mock.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let m = m.clone();
                std::thread::spawn(move || m.serve(conn));
            }
        });
        mock
    }

    /// HTTP/1.1 with keep-alive: requests until the client closes.
    fn serve(&self, conn: TcpStream) {
        let mut out = conn.try_clone().unwrap();
        let mut r = BufReader::new(conn);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or_default().to_string();
            let path = parts.next().unwrap_or_default().to_string();
            let (mut len, mut auth) = (0usize, None);
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 {
                    return;
                }
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (name, value) = h.split_once(':').expect("header line");
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => len = value.trim().parse().unwrap(),
                    "authorization" => auth = Some(value.trim().to_string()),
                    _ => {}
                }
            }
            let mut body = vec![0; len];
            if r.read_exact(&mut body).is_err() {
                return;
            }
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let stream = path.ends_with("/file_stream");
            let (status, reply) = if self.reject {
                (401, json!({"error": "unauthorized"}))
            } else if stream
                && self
                    .fail_streams
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                (503, json!({"error": "unavailable"}))
            } else if stream {
                (200, json!({"exitcode": null, "limits": {}}))
            } else {
                let name = body.pointer("/variables/name").cloned().unwrap_or_default();
                let project = body
                    .pointer("/variables/project")
                    .cloned()
                    .unwrap_or_default();
                (
                    200,
                    json!({"data": {"upsertBucket": {"bucket": {
                        "id": "b1", "name": name, "displayName": null, "description": null,
                        "config": "{}", "sweepName": null,
                        "project": {"id": "p1", "name": project, "entity": {"id": "e1", "name": ENTITY}}},
                        "inserted": true}}}),
                )
            };
            self.reqs.lock().unwrap().push(Req {
                method,
                path,
                auth,
                body,
                status,
            });
            let reply = reply.to_string();
            let text = if status == 200 { "OK" } else { "Error" };
            let head = format!(
                "HTTP/1.1 {status} {text}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                reply.len()
            );
            if out.write_all(head.as_bytes()).is_err() || out.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    }

    pub fn requests(&self) -> Vec<Req> {
        self.reqs.lock().unwrap().clone()
    }
}
