//! Checkpoint integrity through the `bamba-train` binary: a truncated or a
//! one-byte-altered file is caught by its checksum and the checkpoint is
//! skipped for the previous one; a save that runs out of space (RLIMIT_FSIZE
//! makes writes fail with EFBIG, like a full disk) fails clearly and deletes
//! nothing valid; keep_last + keep_every prune to exactly the expected steps.

#[path = "checkpoint_util.rs"]
mod util;

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use bamba_train::checkpoint::{self, format};
use util::*;

/// Damages `file` in a copy of `base`, checks `verify` names the damage,
/// `newest_valid` skips it, and the binary resumes from step 2 with a warning.
fn damaged_checkpoint_is_skipped(
    d: &Path,
    name: &str,
    file: &str,
    damage: impl FnOnce(&Path),
    expect: &str,
) {
    let base = d.join("base");
    let out = d.join(name);
    copy_tree(&base, &out);
    let cfg = std::fs::read_to_string(d.join("base.yaml"))
        .unwrap()
        .replace(&base.display().to_string(), &out.display().to_string());
    let cfg_path = d.join(format!("{name}.yaml"));
    std::fs::write(&cfg_path, cfg).unwrap();

    let step3 = checkpoint::step_dir(&out, 3);
    format::verify(&step3).unwrap();
    damage(&step3.join(file));
    let err = format!("{:#}", format::verify(&step3).unwrap_err());
    assert!(
        err.contains(file) && err.contains(expect),
        "{name}: verify's error must name {file} and say '{expect}': {err}"
    );
    let (step, warnings) = newest_valid_step(&out);
    assert_eq!(
        step,
        Some(2),
        "{name}: newest_valid must fall back to step 2"
    );
    assert!(
        warnings.len() == 1
            && warnings[0].contains("skipping checkpoint")
            && warnings[0].contains(file),
        "{name}: {warnings:?}"
    );

    // The run resumes from step 2 (not 3, not from scratch), redoes step 3 and saves it anew.
    let logged_before = logged_steps(&out).len();
    let run = train(&cfg_path, &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("skipping checkpoint") && stderr.contains(file),
        "{name}: the run must warn that it skips the damaged checkpoint:\n{stderr}"
    );
    assert_eq!(
        &logged_steps(&out)[logged_before..],
        &[3],
        "{name}: resumed at the wrong step"
    );
    assert_eq!(assert_all_final_dirs_verify(&out), vec![3, 2, 1]);
}

#[test]
fn truncated_or_altered_files_are_detected_and_the_previous_checkpoint_is_used() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = write_config(d, "base", 3, "every_steps: 1, keep_last: 5");
    train(&cfg, &[]);
    assert_eq!(assert_all_final_dirs_verify(&d.join("base")), vec![3, 2, 1]);

    let shard = format::shard_file(0);
    damaged_checkpoint_is_skipped(
        d,
        "truncated",
        &shard,
        |p| {
            let f = OpenOptions::new().write(true).open(p).unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len - 4096).unwrap();
        },
        "truncated",
    );
    damaged_checkpoint_is_skipped(
        d,
        "altered",
        &shard,
        |p| {
            // One byte in the middle of the tensor data: same size, still valid safetensors.
            let mut f = OpenOptions::new().read(true).write(true).open(p).unwrap();
            let pos = f.metadata().unwrap().len() / 2;
            let mut b = [0u8];
            f.seek(SeekFrom::Start(pos)).unwrap();
            f.read_exact(&mut b).unwrap();
            f.seek(SeekFrom::Start(pos)).unwrap();
            f.write_all(&[b[0] ^ 0x01]).unwrap();
        },
        "checksum mismatch",
    );
    // The small files are covered too: one byte of the loader state.
    damaged_checkpoint_is_skipped(
        d,
        "altered_loader",
        &format::loader_file(0),
        |p| {
            let mut bytes = std::fs::read(p).unwrap();
            let i = bytes.iter().position(|c| c.is_ascii_digit()).unwrap();
            bytes[i] = if bytes[i] == b'9' { b'8' } else { bytes[i] + 1 };
            std::fs::write(p, bytes).unwrap();
        },
        "checksum mismatch",
    );
}

/// Runs the binary with every file it writes limited to `max_file_bytes`.
fn train_with_file_size_limit(
    cfg: &Path,
    max_file_bytes: u64,
    extra: &[&str],
) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(cfg).args(extra);
    unsafe {
        cmd.pre_exec(move || {
            // Writes past the limit fail with EFBIG instead of killing the process.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: max_file_bytes,
                rlim_max: max_file_bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

#[test]
fn a_save_that_runs_out_of_space_fails_clearly_and_deletes_nothing_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for async_save in [false, true] {
        let name = format!("full_async_{async_save}");
        // keep_last 1: a successful save of step 3 would prune 2; a failed one must not.
        let cfg = write_config(
            d,
            &name,
            2,
            &format!("every_steps: 1, keep_last: 1, async_save: {async_save}"),
        );
        let out = d.join(&name);
        train(&cfg, &[]);
        assert_eq!(assert_all_final_dirs_verify(&out), vec![2]);
        let before = std::fs::read(checkpoint::step_dir(&out, 2).join("manifest.json")).unwrap();

        // The shard (~49 MB) no longer fits; metrics and the loader state do.
        let run = train_with_file_size_limit(&cfg, 1 << 20, &["--set", "training.steps=5"]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            !run.status.success(),
            "{name}: the run must fail:\n{stderr}"
        );
        assert!(
            stderr.contains("error:")
                && stderr.contains(&format!("step_3.tmp/{}", format::shard_file(0)))
                && stderr.contains("File too large"),
            "{name}: the error must name the file that could not be written:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        // Step 2 is untouched and still the one to resume from; nothing half-written is under a final name.
        assert_eq!(assert_all_final_dirs_verify(&out), vec![2], "{name}");
        assert_eq!(
            std::fs::read(checkpoint::step_dir(&out, 2).join("manifest.json")).unwrap(),
            before
        );
        assert_eq!(newest_valid_step(&out), (Some(2), vec![]));
        assert_eq!(
            std::fs::read_to_string(checkpoint::checkpoints_dir(&out).join("latest")).unwrap(),
            "step_2"
        );
        // With the space back, the run resumes from step 2 and finishes.
        let logged_before = logged_steps(&out).len();
        train(&cfg, &["--set", "training.steps=4"]);
        assert_eq!(&logged_steps(&out)[logged_before..], &[3, 4], "{name}");
        assert_eq!(assert_all_final_dirs_verify(&out), vec![4], "{name}");
    }
}

#[test]
fn keep_last_and_keep_every_prune_to_the_expected_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for async_save in [false, true] {
        let name = format!("prune_async_{async_save}");
        let cfg = write_config(
            d,
            &name,
            10,
            &format!("every_steps: 1, keep_last: 2, keep_every: 4, async_save: {async_save}"),
        );
        train(&cfg, &[]);
        let out = d.join(&name);
        // 10 saves: the newest 2 (10, 9) and the multiples of 4 (8, 4).
        assert_eq!(
            assert_all_final_dirs_verify(&out),
            vec![10, 9, 8, 4],
            "{name}"
        );
        assert_eq!(
            entries(&checkpoint::checkpoints_dir(&out)),
            ["latest", "step_10", "step_4", "step_8", "step_9"],
            "{name}: nothing else is left behind"
        );
        assert_eq!(
            std::fs::read_to_string(checkpoint::checkpoints_dir(&out).join("latest")).unwrap(),
            "step_10"
        );
    }
}
