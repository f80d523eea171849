//! Parity with HF transformers: `bamba-forward` on the fixtures made by
//! `scripts/make_parity_fixtures.py` (transformers 5.17, CPU, f32) must give the
//! same logits and loss to 1e-4 and every gradient to 1e-3 relative (max norm).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/parity");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.safetensors").exists())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 3,
        "parity fixtures missing under {}",
        root.display()
    );
    cases
}

fn f32s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("tensor {name} missing"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    (
        t.shape().to_vec(),
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
    )
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn bamba_forward_matches_hf_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut report = BTreeMap::new();
    for case in fixtures() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let out = tmp.path().join(format!("{name}.safetensors"));
        let status = Command::new(env!("CARGO_BIN_EXE_bamba-forward"))
            .args(["--model".as_ref(), case.as_os_str()])
            .args([
                "--inputs".as_ref(),
                case.join("inputs.safetensors").as_os_str(),
            ])
            .args(["--out".as_ref(), out.as_os_str()])
            .status()
            .unwrap();
        assert!(status.success(), "{name}: bamba-forward failed");

        let (got_bytes, want_bytes) = (
            std::fs::read(&out).unwrap(),
            std::fs::read(case.join("expected.safetensors")).unwrap(),
        );
        let (got, want) = (
            SafeTensors::deserialize(&got_bytes).unwrap(),
            SafeTensors::deserialize(&want_bytes).unwrap(),
        );

        let (gs, gl) = f32s(&got, "logits");
        let (ws, wl) = f32s(&want, "logits");
        assert_eq!(gs, ws, "{name}: logits shape");
        let logits_err = max_abs_diff(&gl, &wl);
        let loss_err = max_abs_diff(&f32s(&got, "loss").1, &f32s(&want, "loss").1);
        assert!(
            logits_err < 1e-4,
            "{name}: logits max abs error {logits_err}"
        );
        assert!(loss_err < 1e-4, "{name}: loss abs error {loss_err}");

        let mut want_grads: Vec<&str> = want
            .names()
            .into_iter()
            .filter(|n| n.starts_with("grad."))
            .collect();
        let mut got_grads: Vec<&str> = got
            .names()
            .into_iter()
            .filter(|n| n.starts_with("grad."))
            .collect();
        want_grads.sort();
        got_grads.sort();
        assert_eq!(got_grads, want_grads, "{name}: gradient names");
        let mut worst = (0f32, String::new());
        for g in want_grads {
            let (ws, w) = f32s(&want, g);
            let (gs, x) = f32s(&got, g);
            assert_eq!(gs, ws, "{name}: {g} shape");
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            let rel = max_abs_diff(&x, &w) / scale;
            assert!(rel < 1e-3, "{name}: {g} relative error {rel}");
            if rel > worst.0 {
                worst = (rel, g.to_string());
            }
        }
        report.insert(name, (logits_err, loss_err, worst));
    }
    for (name, (l, s, (g, gname))) in report {
        println!(
            "{name}: logits max abs err {l:.2e}, loss err {s:.2e}, worst gradient rel err {g:.2e} ({gname})"
        );
    }
}
