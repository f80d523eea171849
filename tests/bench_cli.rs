//! `bamba-train bench` on the CPU with the tiny config: the timed steps, the
//! per-piece timings and the kernel check run and print what they promise
//! (smoke only: no timing is asserted).

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_bamba-train");

fn bench(out: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let o = Command::new(BIN)
        .current_dir(&root)
        .args(["bench", "--config", "configs/tiny.yaml", "--set"])
        .arg(format!("checkpoint.output_dir={}", out.display()))
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "bench {extra:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn bench_prints_throughput_mfu_memory_and_phases() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = bench(
        tmp.path(),
        &["--warmup", "1", "--steps", "2", "--profile-steps", "1"],
    );
    let summary = rows
        .iter()
        .find(|r| r["bench"] == "summary")
        .expect("a summary line");
    for k in [
        "tokens_per_s_per_device",
        "mfu",
        "step_time_s",
        "peak_memory_bytes",
    ] {
        let v = summary[k]
            .as_f64()
            .unwrap_or_else(|| panic!("no {k} in {summary}"));
        assert!(v > 0.0, "{k} in {summary}");
    }
    let phases = summary["phase_s"].as_object().expect("phase split");
    assert!(phases.contains_key("optimizer"), "{summary}");
    // On the CPU nothing is compiled at run time: the warm-up is as asked.
    assert_eq!(summary["warmup_steps"], 1, "{summary}");
    assert!(
        summary["kernels_compiled_in_timed_steps"].is_null(),
        "{summary}"
    );
    // GPU clocks are read on CUDA only (`nvidia-smi`): present, and null here.
    assert!(
        summary.as_object().unwrap().contains_key("gpu_clocks") && summary["gpu_clocks"].is_null(),
        "{summary}"
    );
    // The state each rank keeps: f32 master weights and two moments.
    let start = rows
        .iter()
        .find(|r| r["bench"] == "start")
        .expect("a start line");
    let state = &start["state_bytes_per_rank"];
    let bytes = |k: &str| {
        state[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in {start}"))
    };
    assert!(bytes("master") > 0, "{start}");
    assert_eq!(bytes("moments"), 2 * bytes("master"), "{start}");
    // The host's share of each phase (enqueueing) is part of its wall time.
    let host = summary["phase_host_s"].as_object().expect("host split");
    for (k, wall) in phases {
        let h = host[k].as_f64().unwrap();
        assert!(
            h >= 0.0 && h <= wall.as_f64().unwrap() + 1e-9,
            "{k}: {summary}"
        );
    }
}

/// Two ranks (fsdp over the CPU transport): the warm-up decision is an
/// all-reduce, so both ranks run the same steps and the bench ends.
#[test]
fn bench_runs_on_two_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = bench(
        tmp.path(),
        &[
            "--warmup",
            "1",
            "--steps",
            "1",
            "--profile-steps",
            "0",
            "--nproc-per-node",
            "2",
        ],
    );
    let summary = rows
        .iter()
        .find(|r| r["bench"] == "summary")
        .expect("a summary line");
    assert_eq!(summary["world"], 2.0, "{summary}");
    assert_eq!(summary["warmup_steps"], 1, "{summary}");
    assert!(summary["tokens_per_s_per_device"].as_f64().unwrap() > 0.0);
}

/// One process standing in for rank 0 of a job (`--simulate-ranks`): a
/// rank's share of the state and of the batch, the gathers and
/// reduce-scatters on its own pieces, for each strategy (fsdp per layer: a
/// half of the state; hsdp 2 x 2: a half; ddp: all of it); hsdp groups that
/// do not divide the ranks and fewer than 2 ranks are refused by name.
#[test]
fn bench_simulates_one_rank_of_a_job() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--warmup", "1", "--steps", "2", "--profile-steps", "0"];
    let run = |extra: &[&str]| {
        let all: Vec<&str> = args.iter().chain(extra).copied().collect();
        let rows = bench(tmp.path(), &all);
        let find = |kind: &str| {
            rows.iter()
                .find(|r| r["bench"] == kind)
                .cloned()
                .unwrap_or_else(|| panic!("no {kind} line in {rows:?}"))
        };
        let losses: Vec<f64> = rows.iter().filter_map(|r| r["loss"].as_f64()).collect();
        assert_eq!(losses.len(), 3, "{extra:?}: {losses:?}");
        assert!(
            losses.iter().all(|l| l.is_finite()),
            "{extra:?}: {losses:?}"
        );
        (find("start"), find("summary"))
    };
    let master = |s: &serde_json::Value| s["state_bytes_per_rank"]["master"].as_u64().unwrap();
    let one = master(&run(&[]).0);
    // Each unit's shards are padded to aligned lengths.
    let about_half = |half: u64| 2 * half >= one && 2 * half - one < one / 100;

    let per_layer = ["--set", "parallelism.per_layer=true"];
    let (start, summary) = run(&[&per_layer[..], &["--simulate-ranks", "2"]].concat());
    assert_eq!(summary["world"], 2.0, "{summary}");
    assert_eq!(summary["simulated_ranks"], 2, "{summary}");
    assert_eq!(start["step_kind"], "per_layer", "{start}");
    assert!(about_half(master(&start)), "fsdp: {one} against {start}");

    let hsdp = [
        "--simulate-ranks",
        "4",
        "--set",
        "parallelism.strategy=hsdp",
        "--set",
        "parallelism.shard_group_size=2",
        "--set",
        "training.micro_batch=2",
    ];
    let (start, summary) = run(&hsdp);
    assert_eq!(summary["world"], 4.0, "{summary}");
    assert!(about_half(master(&start)), "hsdp: {one} against {start}");

    let (start, _) = run(&["--simulate-ranks", "2", "--set", "parallelism.strategy=ddp"]);
    assert_eq!(master(&start), one, "ddp: {start}");

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let hsdp_3_of_4: &[&str] = &[
        "4",
        "--set",
        "parallelism.strategy=hsdp",
        "--set",
        "parallelism.shard_group_size=3",
    ];
    for (extra, want) in [
        (hsdp_3_of_4, "shard_group_size 3 must divide 4"),
        (&["1", "--steps", "1"][..], "2 or more"),
    ] {
        let o = Command::new(BIN)
            .current_dir(&root)
            .args(["bench", "--config", "configs/tiny.yaml", "--simulate-ranks"])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(want),
            "{extra:?}: {err}"
        );
    }
}

#[test]
fn bench_host_profile_writes_folded_stacks() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("host.folded");
    let rows = bench(
        tmp.path(),
        &[
            "--warmup",
            "1",
            "--steps",
            "2",
            "--profile-steps",
            "0",
            "--host-profile",
            path.to_str().unwrap(),
        ],
    );
    let line = rows
        .iter()
        .find(|r| r["bench"] == "host_profile")
        .expect("a host_profile line");
    assert!(line["samples"].as_u64().unwrap() > 0, "{line}");
    let text = std::fs::read_to_string(&path).unwrap();
    // `thread;root;..;leaf count`, and the training step is on some stack.
    let mut total = 0;
    for l in text.lines() {
        let (stack, count) = l.rsplit_once(' ').expect("folded line");
        assert!(!stack.is_empty());
        total += count.parse::<u64>().expect("a sample count");
    }
    assert_eq!(total, line["samples"].as_u64().unwrap());
    assert!(text.contains("train_step"), "{text}");
}

#[test]
fn bench_ops_host_profile_samples_the_pieces() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ops.folded");
    let rows = bench(
        tmp.path(),
        &[
            "--ops",
            "--only",
            "launch,mamba_layer",
            "--host-profile",
            path.to_str().unwrap(),
        ],
    );
    assert!(rows.iter().any(|r| r["op"] == "launch"), "{rows:?}");
    assert!(rows.iter().any(|r| r["op"] == "mamba_layer"), "{rows:?}");
    let line = rows
        .iter()
        .find(|r| r["bench"] == "host_profile")
        .expect("a host_profile line");
    assert!(line["samples"].as_u64().unwrap() > 0, "{line}");
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("bench::ops")
    );
}

#[test]
fn bench_ops_times_each_piece() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = bench(tmp.path(), &["--ops"]);
    let ops: Vec<_> = rows.iter().filter_map(|r| r["op"].as_str()).collect();
    for want in [
        "mamba_layer",
        "ssd_chunked",
        "conv1d",
        "gated_norm",
        "attention_layer",
        "lm_head_loss",
    ] {
        assert!(ops.contains(&want), "no {want} in {ops:?}");
    }
}

/// On the CPU both sides are burn's ops, so this checks the harness; on a
/// GPU the same command checks the fused kernels.
#[test]
fn bench_kernels_compares_every_piece() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = bench(tmp.path(), &["--kernels"]);
    let kernels: Vec<&str> = rows.iter().filter_map(|r| r["kernel"].as_str()).collect();
    for want in [
        "rms_norm",
        "conv1d_silu",
        "dt_softplus",
        "scale_heads",
        "scale_rows",
        "ssd_diag",
        "embedding",
        "ssd_states",
        "ssd_out",
        "causal_softmax",
        "cross_entropy",
        "swiglu",
        "pack_f32",
        "sum_squares",
    ] {
        assert!(
            kernels.iter().any(|k| k.starts_with(want)),
            "no {want} kernel in {kernels:?}"
        );
    }
    assert!(
        rows.iter()
            .filter(|r| r.get("kernel").is_some())
            .all(|r| r["pass"] == true)
    );
}
