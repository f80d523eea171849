//! Rank 0's view of a run: an indicatif bar on a terminal, plain log lines
//! when stderr is a file (SLURM logs), nothing on other ranks.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::StepMetrics;
use crate::config::Progress as Mode;

pub struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    total_steps: u64,
}

impl Progress {
    pub fn new(mode: Mode, rank: usize, start_step: u64, total_steps: u64) -> Self {
        let (bar, lines) = match (rank, mode) {
            (r, _) if r != 0 => (false, false),
            (_, Mode::Off) => (false, false),
            (_, Mode::Lines) => (false, true),
            (_, Mode::Bar) => (true, false),
            (_, Mode::Auto) => (
                std::io::stderr().is_terminal(),
                !std::io::stderr().is_terminal(),
            ),
        };
        let bar = bar.then(|| {
            let pb = ProgressBar::new(total_steps);
            pb.set_style(
                ProgressStyle::with_template(
                    "{spinner} step {pos}/{len} [{elapsed_precise}<{eta_precise}] {bar:30} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            pb.set_position(start_step);
            pb.enable_steady_tick(Duration::from_millis(250));
            pb
        });
        Self {
            bar,
            lines,
            total_steps,
        }
    }

    /// Called after every step; `m` is set on logged steps.
    pub fn update(&self, step: u64, m: Option<&StepMetrics>) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            if let Some(m) = m {
                bar.set_message(format!(
                    "loss {:.4} | lr {:.2e} | {} tok | {:.0} tok/s",
                    m.loss,
                    m.lr,
                    human(m.tokens as f64),
                    m.tokens_per_s
                ));
            }
        } else if let (true, Some(m)) = (self.lines, m) {
            eprintln!(
                "step {}/{} | loss {:.4} | lr {:.3e} | grad_norm {:.3} | tokens {} | {:.0} tok/s ({:.0}/device) | mfu {:.1}% | {:.3} s/step | mem {:.2} GiB",
                m.step,
                self.total_steps,
                m.loss,
                m.lr,
                m.grad_norm,
                human(m.tokens as f64),
                m.tokens_per_s,
                m.tokens_per_s_per_device,
                100.0 * m.mfu,
                m.step_time_s,
                m.memory_bytes as f64 / (1u64 << 30) as f64
            );
        }
    }

    /// A line that must not be torn by the bar.
    pub fn println(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(msg),
            None if self.lines => eprintln!("{msg}"),
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// `x` with a k/M/B/T suffix (tokens, parameters).
pub fn human(x: f64) -> String {
    match x {
        x if x >= 1e12 => format!("{:.2}T", x / 1e12),
        x if x >= 1e9 => format!("{:.2}B", x / 1e9),
        x if x >= 1e6 => format!("{:.2}M", x / 1e6),
        x if x >= 1e3 => format!("{:.1}k", x / 1e3),
        x => format!("{x:.0}"),
    }
}
