//! One forward and backward pass of an HF checkpoint on given token ids:
//! logits, HF's causal-LM loss (`labels = input_ids`) and every gradient by
//! HF name. The parity check against transformers runs through here.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use bamba_model::BambaAutodiffBackend;
use bamba_model::hf::{named_grads, to_f32};
use bamba_model::{BambaConfig, BambaForCausalLM, NamedTensor, hf_causal_lm_loss};
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

pub struct ForwardOutputs {
    pub logits: NamedTensor,
    pub loss: f32,
    pub grads: Vec<NamedTensor>,
}

/// Reads `input_ids` (int64 or int32, `[batch, seq]`) from a safetensors file.
pub fn read_input_ids(path: &Path) -> Result<(Vec<i64>, [usize; 2])> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let t = st
        .tensor("input_ids")
        .with_context(|| format!("{}: no tensor `input_ids`", path.display()))?;
    let [b, s] = t.shape() else {
        bail!(
            "{}: `input_ids` must be [batch, seq], found {:?}",
            path.display(),
            t.shape()
        )
    };
    let ids: Vec<i64> = match t.dtype() {
        Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::I32 => t
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        d => bail!(
            "{}: `input_ids` has dtype {d:?}; int64 or int32 expected",
            path.display()
        ),
    };
    Ok((ids, [*b, *s]))
}

/// Casts every parameter to the compute dtype, as a fresh tracked leaf.
pub struct CastParams(pub DType);

impl<B: BambaAutodiffBackend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, value, mapper) = param.consume();
        let value = value.cast(self.0).detach().require_grad();
        Param::from_mapped_value(id, value, mapper)
    }
}

/// Runs the pass on backend `B`, computing in `compute` (f32 or bf16).
pub fn run<B: BambaAutodiffBackend>(
    model_dir: &Path,
    ids: &[i64],
    shape: [usize; 2],
    device: &B::Device,
    compute: DType,
) -> Result<ForwardOutputs> {
    let (model, cfg) = BambaForCausalLM::<B>::from_hf_dir(model_dir, device)?;
    let model = model.map(&mut CastParams(compute));
    check_ids(&cfg, ids)?;
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), shape), device);
    let logits = model.forward(input.clone());
    let loss = hf_causal_lm_loss(logits.clone(), input, cfg.z_loss_coefficient);
    let grads = loss.backward();
    let grads = named_grads(&model, &grads);
    let [b, s, v] = logits.dims();
    Ok(ForwardOutputs {
        logits: NamedTensor {
            name: "logits".into(),
            shape: vec![b, s, v],
            values: to_f32(logits.into_data()),
        },
        loss: to_f32(loss.into_data())[0],
        grads,
    })
}

fn check_ids(cfg: &BambaConfig, ids: &[i64]) -> Result<()> {
    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= cfg.vocab_size) {
        bail!(
            "input id {bad} is outside the vocabulary (0..{})",
            cfg.vocab_size
        );
    }
    Ok(())
}

/// Writes `logits`, `loss` and `grad.<name>` as f32 safetensors.
pub fn write_outputs(path: &Path, out: &ForwardOutputs) -> Result<()> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = vec![
        (
            "logits".into(),
            out.logits.shape.clone(),
            le_bytes(&out.logits.values),
        ),
        ("loss".into(), vec![1], le_bytes(&[out.loss])),
    ];
    for g in &out.grads {
        tensors.push((
            format!("grad.{}", g.name),
            g.shape.clone(),
            le_bytes(&g.values),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), d)?,
            ))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[derive(clap::Args, Debug, Clone)]
pub struct ForwardArgs {
    /// HF model directory: config.json plus model.safetensors or sharded safetensors with an index.
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// safetensors file with `input_ids` (int64, [batch, seq]).
    #[arg(long)]
    pub inputs: std::path::PathBuf,
    /// Output safetensors: `logits` [batch, seq, vocab], `loss` [1], `grad.<HF name>` (all f32).
    #[arg(long)]
    pub out: std::path::PathBuf,
    #[arg(long, value_enum, default_value_t = crate::backend::DeviceKind::Cpu)]
    pub device: crate::backend::DeviceKind,
    /// Compute precision (bf16 on the GPU only).
    #[arg(long, value_enum, default_value_t = crate::backend::Precision::F32)]
    pub dtype: crate::backend::Precision,
}

/// Reads the inputs, runs the pass on the chosen backend, writes the outputs.
pub fn main(args: ForwardArgs) -> Result<()> {
    let (ids, shape) = read_input_ids(&args.inputs)?;
    let t = std::time::Instant::now();
    let out = crate::with_backend!(args.device, args.dtype, |B, dev| run::<B>(
        &args.model,
        &ids,
        shape,
        &dev,
        match args.dtype {
            crate::backend::Precision::F32 => DType::F32,
            crate::backend::Precision::Bf16 => DType::BF16,
        }
    )?);
    write_outputs(&args.out, &out)?;
    eprintln!(
        "loss {:.6}, {} gradients, {:.2} s -> {}",
        out.loss,
        out.grads.len(),
        t.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
