//! `launch_local` with real worker processes: the test binary re-executes
//! itself as the workers (`BAMBA_DIST_TEST_ROLE=launch-worker`). Both
//! scenarios live in one test because the launcher owns the process's
//! signal handlers while it runs, and the harness runs tests in parallel.

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use bamba_train::dist::launch::launch_local;

/// The workers learn their part from extra arguments, which the harness
/// takes as more test-name filters (matching nothing): setting environment
/// variables in this process instead would race with the harness running
/// `launch_worker_entry` here too.
const ROLE_ARG: &str = "role=launch-worker";

fn arg(name: &str) -> Option<String> {
    std::env::args().find_map(|a| a.strip_prefix(&format!("{name}=")).map(String::from))
}

#[test]
fn launch_worker_entry() {
    if !std::env::args().any(|a| a == ROLE_ARG) {
        return;
    }
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let rank: usize = var("LOCAL_RANK").parse().unwrap_or(usize::MAX);
    // Check what the launcher promised every worker.
    let world = arg("world").unwrap_or_default();
    assert_eq!(var("RANK"), var("LOCAL_RANK"));
    assert_eq!(var("WORLD_SIZE"), world);
    assert_eq!(var("LOCAL_WORLD_SIZE"), world);
    assert_eq!(var("MASTER_ADDR"), "127.0.0.1");
    assert!(var("MASTER_PORT").parse::<u16>().unwrap_or(0) > 0);
    let dir = arg("dir").unwrap_or_default();
    std::fs::write(
        Path::new(&dir).join(format!("pid{rank}")),
        std::process::id().to_string(),
    )
    .unwrap();
    // "exit=1:3": local rank 1 exits with code 3 ("all:0": every rank, 0).
    if let Some((r, code)) = arg("exit").as_deref().and_then(|e| e.split_once(':'))
        && (r == "all" || r.parse() == Ok(rank))
    {
        std::thread::sleep(Duration::from_millis(300));
        std::process::exit(code.parse().unwrap_or(1));
    }
    // Everyone else would run for a minute unless stopped.
    std::thread::sleep(Duration::from_secs(60));
    std::process::exit(0);
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn pids(dir: &Path) -> Vec<i32> {
    (0..3)
        .filter_map(|r| std::fs::read_to_string(dir.join(format!("pid{r}"))).ok())
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn worker_args(world: usize, dir: &Path, exit: Option<&str>) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "launch_worker_entry",
        ROLE_ARG,
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.push(format!("world={world}").into());
    let mut d = OsString::from("dir=");
    d.push(dir);
    args.push(d);
    if let Some(e) = exit {
        args.push(format!("exit={e}").into());
    }
    args
}

#[test]
fn launcher_returns_the_first_failure_and_leaves_no_worker() {
    let exe = std::env::current_exe().unwrap();

    // A worker exiting with code 3 stops the others; the launcher returns 3.
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let status = launch_local(3, &exe, &worker_args(3, dir.path(), Some("1:3"))).unwrap();
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(3), "{status:?}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let started = pids(dir.path());
    assert_eq!(started.len(), 3, "all three workers should have started");
    let left: Vec<i32> = started.into_iter().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "workers still running: {left:?}");

    // SIGUSR1 to the launcher reaches the workers (whose default action is
    // to die of it), and that status comes back.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let signaller = std::thread::spawn(move || {
        let t0 = Instant::now();
        while pids(&path).len() < 3 && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: signals our own process, whose handler the launcher owns now.
        unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
    });
    let status = launch_local(3, &exe, &worker_args(3, dir.path(), None)).unwrap();
    signaller.join().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGUSR1), "{status:?}");
    let left: Vec<i32> = pids(dir.path()).into_iter().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "workers still running: {left:?}");

    // All succeeding: success.
    let dir = tempfile::tempdir().unwrap();
    let status = launch_local(2, &exe, &worker_args(2, dir.path(), Some("all:0"))).unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(pids(dir.path()).len(), 2);
}
