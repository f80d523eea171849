//! Training checkpoints: `<output_dir>/checkpoints/step_<N>/` with each shard's
//! f32 master weights and AdamW moments as safetensors, every rank's data
//! loader state, `meta.json` (step, tokens, sharding, config) and a
//! `manifest.json` of sha256 checksums. Written under `step_<N>.tmp`, fsynced,
//! renamed into place; `latest` is replaced atomically. A reader trusts a step
//! directory only if every file matches the manifest.

pub mod format;
pub mod reshard;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub use format::{CheckpointMeta, FORMAT_VERSION, FileEntry, Manifest, RankShard};

pub fn checkpoints_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("checkpoints")
}

pub fn step_dir(output_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(output_dir).join(format!("step_{step}"))
}

pub fn tmp_step_dir(output_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(output_dir).join(format!("step_{step}.tmp"))
}

/// Completed checkpoint steps in `output_dir`, newest first (unverified).
pub fn list_steps(output_dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(checkpoints_dir(output_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("step_"))
                .and_then(|s| s.parse().ok())
        })
        .collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    steps
}

/// The newest checkpoint whose files all match their checksums; invalid ones
/// are reported through `warn` and skipped.
pub fn newest_valid(output_dir: &Path, warn: &mut dyn FnMut(String)) -> Option<PathBuf> {
    for step in list_steps(output_dir) {
        let dir = step_dir(output_dir, step);
        match format::verify(&dir) {
            Ok(()) => return Some(dir),
            Err(e) => warn(format!(
                "skipping checkpoint {}: {}",
                dir.display(),
                crate::cli::error_report(&e)
            )),
        }
    }
    None
}

/// Deletes checkpoints beyond the newest `keep_last`, except milestones
/// (steps divisible by `keep_every`) and `protect`.
pub fn prune(
    output_dir: &Path,
    keep_last: usize,
    keep_every: u64,
    protect: u64,
) -> Result<Vec<u64>> {
    let mut removed = vec![];
    for (i, step) in list_steps(output_dir).into_iter().enumerate() {
        let milestone = keep_every > 0 && step % keep_every == 0;
        if i >= keep_last && !milestone && step != protect {
            remove_step_dir(&step_dir(output_dir, step))?;
            removed.push(step);
        }
    }
    // Directories a killed process was deleting.
    for e in std::fs::read_dir(checkpoints_dir(output_dir))
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().ends_with(DELETING_SUFFIX) {
            let path = e.path();
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(removed)
}

const DELETING_SUFFIX: &str = ".deleting";

/// Deletes a step directory without ever leaving it half-deleted under its
/// final name (a process killed inside `remove_dir_all` would leave a
/// `step_<N>` that fails verification): it is first renamed out of the way,
/// atomically, to `step_<N>.deleting`, which `list_steps` ignores and the next
/// `prune` finishes removing.
pub fn remove_step_dir(dir: &Path) -> Result<()> {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(DELETING_SUFFIX);
    let doomed = dir.with_file_name(name);
    if doomed.exists() {
        std::fs::remove_dir_all(&doomed)
            .with_context(|| format!("removing {}", doomed.display()))?;
    }
    std::fs::rename(dir, &doomed)
        .with_context(|| format!("renaming {} to {}", dir.display(), doomed.display()))?;
    std::fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))
}

/// Resolves `checkpoint.resume` / `--resume-from` to a step directory.
pub fn resolve_resume(
    output_dir: &Path,
    resume: &str,
    warn: &mut dyn FnMut(String),
) -> Result<Option<PathBuf>> {
    match resume {
        "never" | "none" | "" => Ok(None),
        "auto" => Ok(newest_valid(output_dir, warn)),
        path => {
            let dir = PathBuf::from(path);
            if !dir.join("meta.json").exists() {
                bail!(
                    "--resume-from {}: not a checkpoint step directory (no meta.json)",
                    dir.display()
                );
            }
            format::verify(&dir).with_context(|| format!("checkpoint {}", dir.display()))?;
            Ok(Some(dir))
        }
    }
}
