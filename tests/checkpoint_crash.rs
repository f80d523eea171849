//! A process killed with SIGKILL at any moment of a save leaves the previous
//! checkpoint valid, every `step_<N>` directory under a final name verifies,
//! and the next run (`checkpoint.resume: auto`) resumes from the newest one
//! and trains on.
//!
//! One output directory, saves every step (synchronous, so the timing is
//! deterministic), keep_last 2 (so saves also prune). Each round starts the
//! binary (it resumes from whatever the previous kill left), waits for the
//! save of the step after the resumed one to start (`step_<N>.tmp` appears),
//! waits `k` ms and kills it; `k` sweeps the measured save window (writing
//! the loader state and the shard, fsyncs, meta, manifest, rename, `latest`,
//! pruning) and a bit past it. A few more rounds kill at random moments
//! after the start (startup, resume, training, saving).

#[path = "checkpoint_util.rs"]
mod util;

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use bamba_train::checkpoint;
use util::*;

const SWEEP_KILLS: usize = 20;
const RANDOM_KILLS: usize = 6;

fn spawn(cfg: &Path, log: &Path) -> Child {
    Command::new(BIN)
        .arg("--config")
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::from(File::create(log).unwrap()))
        .spawn()
        .unwrap()
}

fn sigkill(child: &mut Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
}

fn latest(out: &Path) -> Option<String> {
    std::fs::read_to_string(checkpoint::checkpoints_dir(out).join("latest")).ok()
}

/// Waits until `cond` holds, polling every 200 us; panics with the run's log on timeout or exit.
fn wait_for(child: &mut Child, log: &Path, what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the run exited ({status}) while waiting for {what}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// This run left a save unfinished: a temporary step dir (or one being
/// deleted, or `latest.tmp`) that it wrote exists, or it changed the directory
/// and `latest` is not the newest step or pruning has not run. Entries older
/// than `since` are left over from earlier rounds and do not count.
fn save_unfinished(out: &Path, keep_last: usize, since: SystemTime) -> bool {
    let dir = checkpoint::checkpoints_dir(out);
    let fresh = |n: &str| {
        std::fs::metadata(dir.join(n))
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= since)
    };
    let names = entries(&dir);
    let steps = checkpoint::list_steps(out);
    let temporary = |n: &String| n.ends_with(".tmp") || n.ends_with(".deleting");
    names.iter().any(|n| temporary(n) && fresh(n))
        || (names.iter().any(|n| fresh(n))
            && (steps.len() > keep_last
                || latest(out) != steps.first().map(|s| format!("step_{s}"))))
}

#[test]
fn sigkill_at_any_moment_of_a_save_leaves_the_previous_checkpoint_valid() {
    let t_test = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let keep_last = 2;
    let cfg = write_config(
        d,
        "run",
        1_000_000,
        &format!("every_steps: 1, keep_last: {keep_last}, async_save: false"),
    );
    let out = d.join("run");
    let log = d.join("run.log");

    // Calibration: measure the save windows (tmp dir appears -> `latest`
    // names it, pruned) of 5 saves and take the shortest: the first saves
    // of a run can take twice as long as later ones (seen on CI's 2 cores:
    // 160 ms against 60), and a window too long sends most sweep kills past
    // the save.
    let spawned = Instant::now();
    let mut child = spawn(&cfg, &log);
    let mut windows = vec![];
    let mut first_save_done = None;
    for step in 1..=6u64 {
        let tmp_dir = checkpoint::tmp_step_dir(&out, step);
        wait_for(&mut child, &log, "a save to start", || {
            tmp_dir.exists() || checkpoint::step_dir(&out, step).exists()
        });
        let t0 = Instant::now();
        wait_for(&mut child, &log, "a save to finish", || {
            latest(&out)
                .and_then(|l| l.strip_prefix("step_")?.parse::<u64>().ok())
                .is_some_and(|l| l >= step)
        });
        first_save_done.get_or_insert(spawned.elapsed());
        if step > 1 {
            windows.push(t0.elapsed());
        }
    }
    sigkill(&mut child);
    let window = *windows.iter().min().unwrap();
    let first_save_done = first_save_done.unwrap();
    eprintln!("save window ~{window:?}, start to first saved step {first_save_done:?}");
    assert_all_final_dirs_verify(&out);

    let mut mid_save = 0;
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % 1_000_000) as f64 / 1_000_000.0
    };
    let mut report = vec![];
    for round in 0..SWEEP_KILLS + RANDOM_KILLS {
        let (before, _) = newest_valid_step(&out);
        let before = before.expect("a valid checkpoint exists before every round");
        let logged_before = logged_steps(&out).len();
        let target = before + 1;
        let spawned_at = SystemTime::now();
        let mut child = spawn(&cfg, &log);
        let how = if round < SWEEP_KILLS {
            // 0 .. 1.3 x the save window after the save starts.
            let k = window.mul_f64(1.3 * round as f64 / (SWEEP_KILLS - 1) as f64);
            let (tmp_dir, final_dir) = (
                checkpoint::tmp_step_dir(&out, target),
                checkpoint::step_dir(&out, target),
            );
            // A killed round may have left this very `step_<N>.tmp`: wait for this run's own.
            wait_for(&mut child, &log, "the save to start", || {
                let fresh = |p: &Path| {
                    std::fs::metadata(p)
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t >= spawned_at)
                };
                logged_steps(&out).len() > logged_before && (fresh(&tmp_dir) || final_dir.exists())
            });
            std::thread::sleep(k);
            format!("{:>4} ms into the save of step {target}", k.as_millis())
        } else {
            // Anywhere from the start to a bit past the first save.
            let k = first_save_done.mul_f64(1.2 * next());
            std::thread::sleep(k);
            format!("{:>4} ms after the start", k.as_millis())
        };
        sigkill(&mut child);
        let unfinished = save_unfinished(&out, keep_last, spawned_at);
        mid_save += unfinished as usize;

        // The previous checkpoint (or a newer one) is valid, and so is every final step dir.
        let steps = assert_all_final_dirs_verify(&out);
        let (now, warnings) = newest_valid_step(&out);
        let now = now.expect("a valid checkpoint must survive the kill");
        assert!(warnings.is_empty(), "round {round}: {warnings:?}");
        assert_eq!(Some(&now), steps.first(), "round {round}");
        assert!(
            now >= before,
            "round {round}: newest valid went from {before} back to {now}"
        );
        // The run resumed from `before`: the first step it logged is the one after it.
        let logged = logged_steps(&out);
        if logged.len() > logged_before {
            assert_eq!(
                logged[logged_before],
                before + 1,
                "round {round}: the run did not resume from step {before}"
            );
        }
        report.push(format!(
            "round {round:>2}: killed {how}: {} -> newest valid {now} (dirs {:?})",
            if unfinished {
                "mid-save"
            } else {
                "between saves"
            },
            entries(&checkpoint::checkpoints_dir(&out)),
        ));
    }
    for r in &report {
        eprintln!("{r}");
    }

    // A last resume runs to the step after the newest valid one and saves it.
    let (s, _) = newest_valid_step(&out);
    let s = s.unwrap();
    let logged_before = logged_steps(&out).len();
    let end = (s + 1).to_string();
    let run = train(&cfg, &["--set", &format!("training.steps={end}")]);
    let logged = logged_steps(&out);
    assert_eq!(
        &logged[logged_before..],
        &[s + 1],
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(assert_all_final_dirs_verify(&out)[0], s + 1);
    assert!(
        !entries(&checkpoint::checkpoints_dir(&out))
            .iter()
            .any(|n| n.ends_with(".tmp")),
        "the completed run left temporary files: {:?}",
        entries(&checkpoint::checkpoints_dir(&out))
    );

    eprintln!(
        "{mid_save} of {} kills landed inside a save; test took {:?}",
        SWEEP_KILLS + RANDOM_KILLS,
        t_test.elapsed()
    );
    assert!(
        mid_save >= SWEEP_KILLS / 2,
        "only {mid_save} kills landed inside a save window"
    );
}
