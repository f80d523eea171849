//! Multi-process tests of the CPU collectives: real OS processes, one per
//! rank, meeting through the rendezvous store exactly as training does.
//!
//! The test binary is its own worker: each test re-executes it with
//! `BAMBA_DIST_TEST_ROLE` and the torchrun variables set, which makes the
//! `worker_entry` test run the role and exit instead of returning. Workers
//! check their own results against a rank-order reduction computed locally
//! (bit for bit) and print a digest of everything that must be identical on
//! every rank; the parent compares the digests.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bamba_train::dist::{self, Collectives, DistEnv, InitOptions, ReduceOp};

const ROLE: &str = "BAMBA_DIST_TEST_ROLE";
const TIMEOUT_MS: &str = "BAMBA_DIST_TEST_TIMEOUT_MS";

// ---------------------------------------------------------------- workers --

#[test]
fn worker_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return; // an ordinary test run: nothing to do
    };
    let code = match run_role(&role) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("WORKER ERROR: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn run_role(role: &str) -> Result<(), String> {
    let env = DistEnv::from_env().map_err(|e| e.to_string())?;
    let timeout = std::env::var(TIMEOUT_MS)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(10));
    let config_hash = match role {
        "mismatch" if env.rank == 1 => "cfg-B".to_string(),
        _ => "cfg-A".to_string(),
    };
    let opts = InitOptions {
        config_hash,
        rendezvous_timeout: Duration::from_secs(10),
        collective_timeout: timeout,
        ..InitOptions::default()
    };
    let d = dist::init(&env, &opts).map_err(|e| e.to_string())?;
    match role {
        "collectives" => check_collectives(&*d.world)?,
        "loop" => {
            let mut buf = vec![1.0f32; 1 << 20];
            for step in 0.. {
                d.world
                    .all_reduce(&mut buf, ReduceOp::Avg)
                    .map_err(|e| e.to_string())?;
                if step == 3 {
                    println!("READY");
                }
                if step > 100_000 {
                    break;
                }
            }
        }
        "bench" => bench(&*d.world)?,
        other => return Err(format!("unknown role {other}")),
    }
    d.shutdown().map_err(|e| e.to_string())
}

/// A value that depends on (rank, index, salt), spread over magnitudes from
/// 1e-3 to 1e4 so that the order of a sum changes its rounding.
fn value(rank: usize, i: usize, salt: u64) -> f32 {
    let mut h = (rank as u64) << 40 ^ (i as u64) ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let unit = (h >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
    unit * 10f32.powi((h & 7) as i32 - 3)
}

fn data(rank: usize, len: usize, salt: u64) -> Vec<f32> {
    (0..len).map(|i| value(rank, i, salt)).collect()
}

/// The reduction in rank order 0..n-1, as the contract requires.
fn reference(ranks: &[usize], len: usize, salt: u64, op: ReduceOp, offset: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let mut acc = value(ranks[0], offset + i, salt);
            for &r in &ranks[1..] {
                let x = value(r, offset + i, salt);
                acc = match op {
                    ReduceOp::Max => acc.max(x),
                    _ => acc + x,
                };
            }
            if op == ReduceOp::Avg {
                acc /= ranks.len() as f32
            }
            acc
        })
        .collect()
}

fn same_bits(what: &str, got: &[f32], want: &[f32]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} elements, expected {}",
            got.len(),
            want.len()
        ));
    }
    match got
        .iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits())
    {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: element {i} is {} but the rank-order result is {}",
            got[i], want[i]
        )),
    }
}

/// Digest of results that must be identical on every rank.
struct Digest(u64);

impl Digest {
    fn add(&mut self, v: &[f32]) {
        for x in v {
            self.0 = (self.0 ^ x.to_bits() as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Runs every collective on `c` (whose members are the global ranks
/// `members`, by member rank) and checks the results.
fn check_group(
    c: &dyn Collectives,
    members: &[usize],
    digest: &mut Digest,
    salt: u64,
) -> Result<(), String> {
    let (me, n) = (c.rank(), c.world_size());
    let global = members[me];
    let e = |e: dist::DistError| e.to_string();
    for (k, len) in [0usize, 1, 2, 7, 1000, 12_345, 100_003]
        .into_iter()
        .enumerate()
    {
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
            let salt = salt + k as u64 * 3 + op as u64;
            let mut buf = data(global, len, salt);
            c.all_reduce(&mut buf, op).map_err(e)?;
            same_bits(
                &format!("all_reduce {op:?} of {len}"),
                &buf,
                &reference(members, len, salt, op, 0),
            )?;
            digest.add(&buf);
        }

        let salt = salt + 100 + k as u64;
        let shard = data(global, len, salt);
        let mut out = vec![f32::NAN; len * n];
        c.all_gather(&shard, &mut out).map_err(e)?;
        let want: Vec<f32> = members.iter().flat_map(|&r| data(r, len, salt)).collect();
        same_bits(&format!("all_gather of {len}"), &out, &want)?;
        digest.add(&out);

        let input = data(global, len * n, salt);
        let mut mine = vec![f32::NAN; len];
        c.reduce_scatter(&input, &mut mine, ReduceOp::Sum)
            .map_err(e)?;
        same_bits(
            &format!("reduce_scatter of {len} per rank"),
            &mine,
            &reference(members, len, salt, ReduceOp::Sum, me * len),
        )?;

        for (root, &root_global) in members.iter().enumerate() {
            let mut buf = if me == root {
                data(global, len + 3, salt)
            } else {
                vec![f32::NAN; len + 3]
            };
            c.broadcast(&mut buf, root).map_err(e)?;
            same_bits(
                &format!("broadcast of {} from {root}", len + 3),
                &buf,
                &data(root_global, len + 3, salt),
            )?;
            digest.add(&buf);
        }
    }
    let mine = vec![global as u8; global * 3 + 1];
    let all = c.all_gather_bytes(&mine).map_err(e)?;
    for (q, b) in all.iter().enumerate() {
        if b != &vec![members[q] as u8; members[q] * 3 + 1] {
            return Err(format!("all_gather_bytes: wrong bytes from member {q}"));
        }
    }
    c.barrier().map_err(e)
}

fn check_collectives(world: &dyn Collectives) -> Result<(), String> {
    let n = world.world_size();
    let me = world.rank();
    let mut digest = Digest(0);
    let all: Vec<usize> = (0..n).collect();
    check_group(world, &all, &mut digest, 1)?;

    // Sub-groups: "nodes" of two consecutive ranks, ordered by a reversed
    // key to check that key (not rank) orders the group; then the groups of
    // ranks with the same index in their node (HSDP's replica groups).
    let node = world.split(me / 2, n - me).map_err(|e| e.to_string())?;
    let mut node_members: Vec<usize> = (0..n).filter(|r| r / 2 == me / 2).collect();
    node_members.sort_by_key(|&r| n - r);
    if node.world_size() != node_members.len() || node_members[node.rank()] != me {
        return Err(format!(
            "split by node: rank {}/{} but expected position of {me} in {node_members:?}",
            node.rank(),
            node.world_size()
        ));
    }
    let replicas = world.split(me % 2, me).map_err(|e| e.to_string())?;
    let replica_members: Vec<usize> = (0..n).filter(|r| r % 2 == me % 2).collect();
    let mut group_digest = Digest(0);
    check_group(&*node, &node_members, &mut group_digest, 7)?;
    check_group(&*replicas, &replica_members, &mut group_digest, 9)?;
    // The parent of the groups still works after splitting.
    world.barrier().map_err(|e| e.to_string())?;
    println!("RESULT {:016x}", digest.0);
    println!("GROUPS {} {:?} {:?}", me, node_members, replica_members);
    Ok(())
}

fn bench(world: &dyn Collectives) -> Result<(), String> {
    let e = |e: dist::DistError| e.to_string();
    let n = world.world_size();
    let mb: usize = std::env::var("BAMBA_DIST_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let len = mb * (1 << 20) / 4;
    let mut buf = data(world.rank(), len, 3);
    let mut out = vec![0.0f32; len];
    let reps = 10;
    world.all_reduce(&mut buf, ReduceOp::Sum).map_err(e)?; // warm up
    let t = Instant::now();
    for _ in 0..reps {
        world.all_reduce(&mut buf, ReduceOp::Avg).map_err(e)?;
    }
    let ar = t.elapsed().as_secs_f64() / reps as f64;
    let shard = &buf[..len / n];
    let t = Instant::now();
    for _ in 0..reps {
        world
            .all_gather(shard, &mut out[..len / n * n])
            .map_err(e)?;
    }
    let ag = t.elapsed().as_secs_f64() / reps as f64;
    let t = Instant::now();
    for _ in 0..reps {
        world
            .reduce_scatter(&out[..len / n * n], &mut buf[..len / n], ReduceOp::Sum)
            .map_err(e)?;
    }
    let rs = t.elapsed().as_secs_f64() / reps as f64;
    if world.rank() == 0 {
        // Bus bandwidth as nccl-tests define it: what each rank's links
        // carry, comparable across world sizes.
        let bytes = (len * 4) as f64 / 1e6;
        let f = (n - 1) as f64 / n as f64;
        println!(
            "BENCH world {n}, {mb} MB buffers: all_reduce {:.1} ms ({:.0} MB/s bus), all_gather {:.1} ms ({:.0} MB/s bus), \
             reduce_scatter {:.1} ms ({:.0} MB/s bus)",
            ar * 1e3,
            2.0 * f * bytes / ar,
            ag * 1e3,
            f * bytes / ag,
            rs * 1e3,
            f * bytes / rs,
        );
    }
    Ok(())
}

// ----------------------------------------------------------------- parent --

struct Worker {
    child: Child,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<Vec<String>>>,
}

/// Killed on drop, so that a failing test leaves no worker behind.
impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Worker {
    fn lines(&self) -> Vec<String> {
        self.out.lock().unwrap().clone()
    }
    fn stderr(&self) -> String {
        self.err.lock().unwrap().join("\n")
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn collect(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    lines
}

fn spawn_world(world: usize, role: &str, extra: &[(&str, &str)]) -> Vec<Worker> {
    let port = free_port().to_string();
    let exe = std::env::current_exe().unwrap();
    (0..world)
        .map(|r| {
            let mut child = Command::new(&exe)
                .args(["worker_entry", "--exact", "--nocapture", "--test-threads=1"])
                .env(ROLE, role)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .envs(extra.iter().copied())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let out = collect(child.stdout.take().unwrap());
            let err = collect(child.stderr.take().unwrap());
            Worker { child, out, err }
        })
        .collect()
}

/// Waits for every worker (killing all at `limit`); returns exit codes.
fn wait_all(workers: &mut [Worker], limit: Duration) -> Vec<Option<i32>> {
    let deadline = Instant::now() + limit;
    let mut codes: Vec<Option<Option<i32>>> = vec![None; workers.len()];
    while codes.iter().any(Option::is_none) {
        for (w, c) in workers.iter_mut().zip(codes.iter_mut()) {
            if c.is_none()
                && let Some(s) = w.child.try_wait().unwrap()
            {
                *c = Some(s.code());
            }
        }
        if Instant::now() > deadline {
            for w in workers.iter_mut() {
                let _ = w.child.kill();
                let _ = w.child.wait();
            }
            panic!("workers still running after {limit:?}: {codes:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the reader threads drain the pipes.
    std::thread::sleep(Duration::from_millis(50));
    codes.into_iter().map(Option::unwrap).collect()
}

fn run_collectives(world: usize) {
    let mut ws = spawn_world(world, "collectives", &[]);
    let codes = wait_all(&mut ws, Duration::from_secs(60));
    for (r, (w, c)) in ws.iter().zip(&codes).enumerate() {
        assert_eq!(*c, Some(0), "rank {r} failed:\n{}", w.stderr());
    }
    let digests: Vec<String> = ws
        .iter()
        .map(|w| {
            // The harness prints "test worker_entry ... " without a newline
            // before the worker's own output, so look inside lines.
            let lines = w.lines();
            let line = lines
                .iter()
                .find_map(|l| l.find("RESULT ").map(|i| l[i..].to_string()));
            line.expect("RESULT line")
        })
        .collect();
    assert!(
        digests.iter().all(|d| d == &digests[0]),
        "ranks disagree: {digests:?}"
    );
}

#[test]
fn collectives_world_1() {
    run_collectives(1);
}

#[test]
fn collectives_world_2() {
    run_collectives(2);
}

#[test]
fn collectives_world_3() {
    run_collectives(3);
}

#[test]
fn collectives_world_4_with_2x2_split() {
    run_collectives(4);
}

#[test]
fn config_hash_mismatch_fails_on_every_rank_naming_both_values() {
    let mut ws = spawn_world(3, "mismatch", &[]);
    let codes = wait_all(&mut ws, Duration::from_secs(30));
    for (r, (w, c)) in ws.iter().zip(&codes).enumerate() {
        let err = w.stderr();
        assert_eq!(*c, Some(1), "rank {r} should fail:\n{err}");
        assert!(
            err.contains("config hash")
                && err.contains("rank 0 has \"cfg-A\"")
                && err.contains("rank 1 has \"cfg-B\""),
            "rank {r}: {err}"
        );
    }
}

/// Starts `world` ranks looping over all_reduce, waits until all run, does
/// `disturb` to rank `victim`, and checks that every other rank fails
/// within `limit`, naming the victim.
fn survivors_name(
    world: usize,
    victim: usize,
    timeout_ms: &str,
    disturb: impl FnOnce(&mut Child),
    limit: Duration,
) {
    let mut ws = spawn_world(world, "loop", &[(TIMEOUT_MS, timeout_ms)]);
    let start = Instant::now();
    while !ws
        .iter()
        .all(|w| w.lines().iter().any(|l| l.ends_with("READY")))
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "workers did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    disturb(&mut ws[victim].child);
    let t0 = Instant::now();
    let deadline = t0 + limit;
    let mut pending: Vec<usize> = (0..world).filter(|&r| r != victim).collect();
    while !pending.is_empty() && Instant::now() < deadline {
        pending.retain(|&r| ws[r].child.try_wait().unwrap().is_none());
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = t0.elapsed();
    for w in ws.iter_mut() {
        let _ = w.child.kill();
        let _ = w.child.wait();
    }
    assert!(
        pending.is_empty(),
        "ranks {pending:?} still running {took:?} after rank {victim} was disturbed"
    );
    std::thread::sleep(Duration::from_millis(50));
    let needle = format!("rank {victim} ");
    for r in (0..world).filter(|&r| r != victim) {
        let err = ws[r].stderr();
        assert!(
            err.contains("WORKER ERROR") && err.contains(&needle),
            "rank {r} did not name rank {victim}: {err}"
        );
    }
    eprintln!(
        "survivors of rank {victim} stopped in {took:?}; rank 0 said: {}",
        ws[if victim == 0 { 1 } else { 0 }].stderr()
    );
}

#[test]
fn a_killed_rank_makes_the_others_fail_naming_it() {
    // Collective timeout 5 s; a killed process closes its sockets, so the
    // others must notice at once, well within it.
    survivors_name(4, 2, "5000", |c| c.kill().unwrap(), Duration::from_secs(5));
}

#[test]
fn a_frozen_rank_is_named_after_the_collective_timeout() {
    // SIGSTOP keeps the sockets open: only the timeout can catch this.
    survivors_name(
        3,
        1,
        "1500",
        |c| unsafe {
            libc::kill(c.id() as i32, libc::SIGSTOP);
        },
        Duration::from_secs(8),
    );
}

/// Bandwidth of the CPU transport on this machine. Prints numbers, asserts
/// nothing: `cargo test --release -p bamba-train --test dist_collectives --
/// --ignored bench --nocapture`.
#[test]
#[ignore]
fn bench_cpu_collectives() {
    let mb = std::env::var("BAMBA_DIST_BENCH_MB").unwrap_or_else(|_| "40".into());
    for world in [2, 3, 4] {
        let mut ws = spawn_world(world, "bench", &[("BAMBA_DIST_BENCH_MB", &mb)]);
        let codes = wait_all(&mut ws, Duration::from_secs(300));
        assert!(codes.iter().all(|c| *c == Some(0)), "{}", ws[0].stderr());
        for l in ws[0].lines() {
            if let Some(i) = l.find("BENCH ") {
                println!("{}", &l[i + 6..]);
            }
        }
    }
}
