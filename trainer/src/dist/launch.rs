//! `bamba-train --nproc-per-node N ...`: start N local workers of this
//! program ourselves, as torchrun's standalone mode does, so one command
//! trains on every device of a machine without an external launcher.
//!
//! The launcher gives each worker the torchrun variables (rendezvous on
//! 127.0.0.1 at a free port), forwards SIGTERM, SIGINT and SIGUSR1 to all of
//! them (SIGUSR1 is how SLURM warns of a coming time limit), and when one
//! worker fails stops the others and returns that worker's status: a job
//! with a dead rank cannot make progress, and its survivors would otherwise
//! wait for their collective timeout.

use std::ffi::{OsStr, OsString};
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::DistError;

/// The flag `launch_local` is selected by; the caller removes it (see
/// [`take_nproc_per_node`]) before passing the rest to the workers.
pub const NPROC_FLAG: &str = "--nproc-per-node";

/// How long stopped workers get to exit after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// Signals received and not yet forwarded, as a bit set by signal number.
/// A static because a signal handler can reach nothing else; it is touched
/// only with atomic operations, which are async-signal-safe.
static PENDING: AtomicU32 = AtomicU32::new(0);

const FORWARDED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1];

extern "C" fn on_signal(sig: libc::c_int) {
    PENDING.fetch_or(1 << sig, Ordering::SeqCst);
}

/// Our handlers for the forwarded signals while it lives; the previous
/// ones are put back on drop.
struct SignalGuard {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalGuard {
    fn install() -> Result<Self, DistError> {
        PENDING.store(0, Ordering::SeqCst);
        let mut old = Vec::new();
        for sig in FORWARDED {
            // SAFETY: sigaction with a zeroed struct plus an extern "C"
            // handler that only does an atomic OR; `prev` is written by the
            // kernel.
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                act.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut act.sa_mask);
                let mut prev: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &act, &mut prev) != 0 {
                    return Err(DistError::io(
                        format!("installing the launcher's handler for signal {sig}"),
                        std::io::Error::last_os_error(),
                    ));
                }
                old.push((sig, prev));
            }
        }
        Ok(SignalGuard { old })
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: restores the action saved by `install`.
            unsafe {
                libc::sigaction(*sig, prev, std::ptr::null_mut());
            }
        }
    }
}

/// Removes `--nproc-per-node N` (or `--nproc-per-node=N`) from `args` and
/// returns N, if present.
pub fn take_nproc_per_node(args: &[OsString]) -> Result<(Option<usize>, Vec<OsString>), DistError> {
    let bad = |value: &OsStr| {
        DistError::bad_arg(
            "--nproc-per-node",
            format!("expected a positive number of workers, got {value:?}"),
        )
    };
    let mut rest = Vec::with_capacity(args.len());
    let mut nproc = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = if a == NPROC_FLAG {
            Some(
                it.next()
                    .cloned()
                    .ok_or_else(|| bad(OsStr::new("nothing")))?,
            )
        } else {
            a.to_str()
                .and_then(|s| s.strip_prefix("--nproc-per-node="))
                .map(OsString::from)
        };
        match value {
            Some(v) => {
                let n: usize = v
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| bad(&v))?;
                if n == 0 {
                    return Err(bad(&v));
                }
                nproc = Some(n);
            }
            None => rest.push(a.clone()),
        }
    }
    Ok((nproc, rest))
}

/// Runs `nproc` copies of `program args` as ranks 0..nproc of one job on
/// this machine and waits for them. Returns success when all succeed, or
/// the status of the first worker that failed, after stopping the others
/// (SIGTERM, then SIGKILL after a grace period). Only one launch may run in
/// a process at a time: it owns the process's SIGTERM/SIGINT/SIGUSR1
/// handlers while it runs.
pub fn launch_local(
    nproc: usize,
    program: &Path,
    args: &[OsString],
) -> Result<ExitStatus, DistError> {
    if nproc == 0 {
        return Err(DistError::bad_arg(
            "launch_local",
            "needs at least one worker",
        ));
    }
    let port = free_port()?;
    let _signals = SignalGuard::install()?;
    let mut workers: Vec<Option<Child>> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("GROUP_RANK", "0")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            // Own process group: a Ctrl-C in the terminal reaches only the
            // launcher, which forwards it once (not twice) to each worker.
            .process_group(0);
        die_with_parent(&mut cmd);
        match cmd.spawn() {
            Ok(child) => workers.push(Some(child)),
            Err(source) => {
                stop_all(&mut workers);
                return Err(DistError::Spawn {
                    local_rank: rank,
                    program: program.display().to_string(),
                    source,
                });
            }
        }
    }

    loop {
        let pending = PENDING.swap(0, Ordering::SeqCst);
        for sig in FORWARDED.into_iter().filter(|s| pending & (1 << s) != 0) {
            signal_all(&workers, sig);
        }
        let mut running = 0;
        for (rank, slot) in workers.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(status)) => {
                    *slot = None;
                    if !status.success() {
                        eprintln!(
                            "bamba-train launcher: worker {rank} {}; stopping the other workers",
                            describe(status)
                        );
                        stop_all(&mut workers);
                        return Ok(status);
                    }
                }
                Err(e) => {
                    stop_all(&mut workers);
                    return Err(DistError::io(format!("waiting for local worker {rank}"), e));
                }
            }
        }
        if running == 0 {
            return Ok(ExitStatus::from_raw(0));
        }
        std::thread::sleep(POLL);
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => format!("ended with {status}"),
    }
}

fn signal_all(workers: &[Option<Child>], sig: libc::c_int) {
    for child in workers.iter().flatten() {
        // SAFETY: kill(2) on the pid of a child we have not reaped yet, so
        // the pid cannot have been reused.
        unsafe {
            libc::kill(child.id() as libc::pid_t, sig);
        }
    }
}

/// SIGTERM to every worker still running, SIGKILL to those still there after
/// the grace period, and reap them all: none outlives the launcher.
fn stop_all(workers: &mut [Option<Child>]) {
    signal_all(workers, libc::SIGTERM);
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline {
        let mut running = false;
        for slot in workers.iter_mut() {
            if let Some(child) = slot {
                match child.try_wait() {
                    Ok(None) => running = true,
                    _ => *slot = None,
                }
            }
        }
        if !running {
            return;
        }
        std::thread::sleep(POLL);
    }
    for slot in workers.iter_mut() {
        if let Some(mut child) = slot.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// On Linux, workers get SIGKILL if the launcher dies without stopping them
/// (it was SIGKILLed itself), instead of training on as orphans.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours,
    // which is all that is allowed between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_: &mut Command) {}

/// A port free right now on the loopback interface. Another process could
/// take it before rank 0 binds it; rank 0 then fails clearly, naming it.
fn free_port() -> Result<u16, DistError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DistError::io("finding a free port for the rendezvous store", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn nproc_flag_is_taken_out() {
        let (n, rest) =
            take_nproc_per_node(&os(&["train", "--nproc-per-node", "4", "cfg.yaml"])).unwrap();
        assert_eq!((n, rest), (Some(4), os(&["train", "cfg.yaml"])));
        let (n, rest) = take_nproc_per_node(&os(&["--nproc-per-node=2", "x"])).unwrap();
        assert_eq!((n, rest), (Some(2), os(&["x"])));
        let (n, rest) = take_nproc_per_node(&os(&["x"])).unwrap();
        assert_eq!((n, rest), (None, os(&["x"])));
        for bad in [
            &["--nproc-per-node"][..],
            &["--nproc-per-node", "0"],
            &["--nproc-per-node=x"],
        ] {
            let err = take_nproc_per_node(&os(bad)).unwrap_err().to_string();
            assert!(err.contains("--nproc-per-node"), "{err}");
        }
    }
}
