//! The GPU's SM clock and power draw while `bench`'s timed steps run,
//! sampled by `nvidia-smi` (what `nvidia-smi dmon` shows). MFU is counted
//! against the peak at boost clock, and a step of long bf16 GEMMs can hold
//! the card at its power limit, below that clock; kernel times from ncu,
//! which replays each kernel alone, do not show it. Reads only: the card's
//! settings are left as they are.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;

/// Samples `nvidia-smi` every 200 ms until [`ClockSampler::finish`].
pub struct ClockSampler {
    child: Child,
    reader: JoinHandle<Vec<Sample>>,
}

/// One reading: SM clock (MHz), its maximum (MHz), power draw (W).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub sm_mhz: f64,
    pub max_sm_mhz: f64,
    pub power_w: f64,
}

impl ClockSampler {
    /// Starts sampling the GPU with PCI bus id `bus_id` (as `nvidia-smi -i`
    /// takes it: the same card whatever `CUDA_VISIBLE_DEVICES` says). `None`
    /// when `nvidia-smi` cannot be started.
    pub fn start(bus_id: &str) -> Option<Self> {
        let mut child = Command::new("nvidia-smi")
            .args([
                "-i",
                bus_id,
                "--query-gpu=clocks.sm,clocks.max.sm,power.draw",
                "--format=csv,noheader,nounits",
                "-lms",
                "200",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let out = child.stdout.take()?;
        let reader = std::thread::spawn(move || {
            BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| parse(&l))
                .collect()
        });
        Some(Self { child, reader })
    }

    /// Stops sampling; the summary of what was read (`None` if nothing was).
    pub fn finish(mut self) -> Option<serde_json::Value> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        summarize(&self.reader.join().ok()?)
    }
}

/// `"1980, 1980, 612.34"` (clocks.sm, clocks.max.sm, power.draw).
pub fn parse(line: &str) -> Option<Sample> {
    let mut f = line.split(',').map(|s| s.trim().parse::<f64>().ok());
    Some(Sample {
        sm_mhz: f.next()??,
        max_sm_mhz: f.next()??,
        power_w: f.next()??,
    })
}

/// Median and minimum SM clock, its maximum, median power.
pub fn summarize(samples: &[Sample]) -> Option<serde_json::Value> {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let first = samples.first()?;
    let sm: Vec<f64> = samples.iter().map(|s| s.sm_mhz).collect();
    Some(serde_json::json!({
        "sm_mhz_median": median(sm.clone()),
        "sm_mhz_min": sm.iter().copied().fold(f64::INFINITY, f64::min),
        "sm_mhz_max_rated": first.max_sm_mhz,
        "power_w_median": median(samples.iter().map(|s| s.power_w).collect()),
        "samples": samples.len(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nvidia_smi_lines_and_summarizes_them() {
        assert_eq!(
            parse("1755, 1980, 688.12"),
            Some(Sample {
                sm_mhz: 1755.0,
                max_sm_mhz: 1980.0,
                power_w: 688.12
            })
        );
        // A field nvidia-smi cannot read comes back as text.
        assert_eq!(parse("1755, 1980, [N/A]"), None);
        assert_eq!(parse(""), None);
        let s: Vec<Sample> = ["1980, 1980, 300", "1500, 1980, 700", "1700, 1980, 690"]
            .iter()
            .filter_map(|l| parse(l))
            .collect();
        let v = summarize(&s).unwrap();
        assert_eq!(v["sm_mhz_median"], 1700.0);
        assert_eq!(v["sm_mhz_min"], 1500.0);
        assert_eq!(v["power_w_median"], 690.0);
        assert_eq!(v["samples"], 3);
        assert_eq!(summarize(&[]), None);
    }
}
