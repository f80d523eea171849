//! `bamba-train export-hf` round trip: a checkpoint written by a real run
//! (4 ranks' shards, so the export has to reassemble them), exported as f32,
//! loads with `BambaForCausalLM::from_hf_dir` and its logits equal those of a
//! model built directly from the checkpoint's master weights; a bf16 export
//! loads and its logits are close.

#[path = "checkpoint_util.rs"]
mod util;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use bamba_model::{
    BambaConfig, BambaForCausalLM, HfCheckpoint, ModelError, ParamSource, VarBuilder,
};
use bamba_train::checkpoint::{self, format};
use bamba_train::fsdp::Layout;
use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use util::*;

/// Full parameters from a checkpoint's master slices, by HF name.
struct Master(HashMap<String, (Vec<usize>, Vec<f32>)>);

impl Master {
    fn read(dir: &Path) -> (Self, BambaConfig) {
        let meta = format::read_meta(dir).unwrap();
        let cfg = BambaConfig::from_json_str(&meta.model_config).unwrap();
        let layout = Layout::new(&cfg, 1);
        let slices = checkpoint::reshard::read_slices(dir, &meta, &layout, 0).unwrap();
        let mut params = HashMap::new();
        for (unit, [master, _, _]) in layout.units.iter().zip(slices) {
            for p in &unit.params {
                params.insert(
                    p.name.clone(),
                    (
                        p.shape.clone(),
                        master[p.offset..p.offset + p.numel].to_vec(),
                    ),
                );
            }
        }
        (Self(params), cfg)
    }
}

impl ParamSource for Master {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let (s, v) = self
            .0
            .get(name)
            .ok_or_else(|| ModelError::tensor(name, "not in the checkpoint"))?;
        assert_eq!(s, shape, "{name}");
        Ok(v.clone())
    }
}

fn export(ckpt: &Path, out: &Path, dtype: &str) {
    let run = Command::new(BIN)
        .args(["export-hf", "--checkpoint"])
        .arg(ckpt)
        .arg("--out")
        .arg(out)
        .args(["--dtype", dtype])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "export-hf --dtype {dtype} failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

fn logits(model: &BambaForCausalLM<Flex>, ids: &[i32]) -> Vec<f32> {
    let input = Tensor::<Flex, 2, Int>::from_data(
        TensorData::new(ids.to_vec(), [2, ids.len() / 2]),
        &Default::default(),
    );
    model
        .forward(input)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap()
}

#[test]
fn exported_hf_model_gives_the_checkpoints_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = write_config(d, "run", 3, "every_steps: 3, keep_last: 2");
    // Data by row so that 4 ranks see one global batch; the checkpoint has 4 shard files.
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "global_batch_sequences: 2, micro_batch: 2",
        "global_batch_sequences: 4, micro_batch: 1",
    );
    let text = text.replace(
        "shuffle_buffer: 32",
        "shuffle_buffer: 32\n  distribute: by_row",
    );
    std::fs::write(&cfg, text).unwrap();
    train(&cfg, &["--nproc-per-node", "4"]);
    let ckpt = checkpoint::step_dir(&d.join("run"), 3);
    format::verify(&ckpt).unwrap();
    assert_eq!(format::read_meta(&ckpt).unwrap().shards, 4);

    let (master, cfg) = Master::read(&ckpt);
    let dev = Default::default();
    let reference = BambaForCausalLM::<Flex>::new(&VarBuilder::new(&master, &dev), &cfg).unwrap();
    let ids: Vec<i32> = (0..32).map(|i| (i * 7919 + 13) % 128256).collect();
    let want = logits(&reference, &ids);
    // The checkpoint's weights are trained ones, not the seeded init.
    let init = BambaForCausalLM::<Flex>::init(&cfg, 0, &dev).unwrap();
    assert_ne!(logits(&init, &ids), want);

    // f32: every tensor exactly the master weights, and the same logits.
    let hf32 = d.join("hf32");
    export(&ckpt, &hf32, "f32");
    let (loaded, loaded_cfg) = BambaForCausalLM::<Flex>::from_hf_dir(&hf32, &dev).unwrap();
    assert_eq!(loaded_cfg, cfg);
    let hf = HfCheckpoint::open(&hf32).unwrap();
    for (name, (shape, values)) in &master.0 {
        assert_eq!(
            &hf.load(name, shape).unwrap(),
            values,
            "{name} differs in the f32 export"
        );
    }
    assert_eq!(logits(&loaded, &ids), want, "f32 export: logits differ");

    // bf16: loads, logits within 1e-2 of the f32 ones.
    let hf16 = d.join("hf16");
    export(&ckpt, &hf16, "bf16");
    let (loaded16, _) = BambaForCausalLM::<Flex>::from_hf_dir(&hf16, &dev).unwrap();
    let got = logits(&loaded16, &ids);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = want
        .iter()
        .zip(&got)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("bf16 export: max |logit error| {err:e} (max |logit| {scale})");
    assert!(
        err <= 1e-2 * scale.max(1.0),
        "bf16 export: logits differ by {err} (max |logit| {scale})"
    );

    // An output directory (not a step dir) exports its newest valid checkpoint.
    let hf_auto = d.join("hf_auto");
    export(&d.join("run"), &hf_auto, "f32");
    let (auto, _) = BambaForCausalLM::<Flex>::from_hf_dir(&hf_auto, &dev).unwrap();
    assert_eq!(logits(&auto, &ids), want);
}
