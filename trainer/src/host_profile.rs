//! `bench --host-profile FILE`: samples every thread's stack (SIGPROF,
//! about 1 kHz of CPU time) while the timed steps run and writes them as
//! folded stacks (`thread;root;..;leaf count`, flamegraph.pl's input).
//! The GPU machines have no perf or nsys; this shows where the host's time
//! goes when a step is launch-bound (`phase_host_s` close to `phase_s`).
//! Symbols come from the binary's symbol table: profile an unstripped build.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub struct HostProfile {
    guard: pprof::ProfilerGuard<'static>,
    path: PathBuf,
}

/// Samples per second of CPU time.
const FREQUENCY: i32 = 997;

impl HostProfile {
    pub fn start(path: &Path) -> Result<Self> {
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(FREQUENCY)
            // The sampler must not unwind through libc or the unwinder itself.
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
            .context("starting the host profiler")?;
        Ok(Self {
            guard,
            path: path.to_path_buf(),
        })
    }

    /// Stops sampling and writes the folded stacks; returns the sample count.
    pub fn finish(self) -> Result<u64> {
        let report = self
            .guard
            .report()
            .build()
            .context("building the host profile")?;
        let mut lines: Vec<(String, isize)> = report
            .data
            .iter()
            .map(|(frames, &count)| {
                let mut line = frames.thread_name.replace([';', ' '], "_");
                // pprof lists the leaf first.
                for frame in frames.frames.iter().rev() {
                    for symbol in frame.iter().rev() {
                        let _ = write!(line, ";{}", symbol.name().replace(';', ":"));
                    }
                }
                (line, count)
            })
            .collect();
        lines.sort();
        let text: String = lines.iter().map(|(l, c)| format!("{l} {c}\n")).collect();
        std::fs::write(&self.path, text)
            .with_context(|| format!("writing the host profile {}", self.path.display()))?;
        Ok(lines.iter().map(|l| l.1.max(0) as u64).sum())
    }
}
