//! HF checkpoints in and out: `model.safetensors` or sharded
//! `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`,
//! f32/bf16/f16, tensors named exactly as transformers names them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::ops::BambaBackend;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::json;

use crate::config::BambaConfig;
use crate::error::ModelError;
use crate::params::ParamSource;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// An opened HF checkpoint directory: files memory-mapped, headers checked.
pub struct HfCheckpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name -> (file index, shape)
    tensors: BTreeMap<String, (usize, Vec<usize>)>,
}

impl HfCheckpoint {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref().to_path_buf();
        let index = dir.join(INDEX_FILE);
        let names: Vec<String> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::safetensors(&index, e.to_string()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::safetensors(&index, "no `weight_map` object"))?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            files.sort();
            files.dedup();
            files
        } else if dir.join(SINGLE_FILE).exists() {
            vec![SINGLE_FILE.to_string()]
        } else {
            return Err(ModelError::safetensors(
                &dir,
                format!("neither {SINGLE_FILE} nor {INDEX_FILE} found"),
            ));
        };
        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            let path = dir.join(name);
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // Safety: checkpoint files are not modified while training reads them.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                ModelError::safetensors(
                    &path,
                    format!("not a valid safetensors file (truncated or corrupt?): {e}"),
                )
            })?;
            for (tname, view) in st.tensors() {
                if !matches!(view.dtype(), Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                    return Err(ModelError::safetensors(
                        &path,
                        format!(
                            "tensor `{tname}` has dtype {:?}; f32, bf16 or f16 expected",
                            view.dtype()
                        ),
                    ));
                }
                if let Some((other, _)) = tensors.insert(tname.clone(), (i, view.shape().to_vec()))
                {
                    return Err(ModelError::safetensors(
                        &path,
                        format!("tensor `{tname}` also stored in {}", names[other]),
                    ));
                }
            }
            files.push((path, mmap));
        }
        Ok(Self {
            dir,
            files,
            tensors,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Checks names and shapes against what `cfg` builds, reporting every
    /// missing, unexpected or mis-shaped tensor at once.
    pub fn verify(&self, cfg: &BambaConfig) -> Result<(), ModelError> {
        let want: HashMap<String, Vec<usize>> = cfg.parameter_shapes().into_iter().collect();
        let mut missing: Vec<String> = want
            .keys()
            .filter(|n| !self.tensors.contains_key(*n))
            .cloned()
            .collect();
        missing.sort();
        if !missing.is_empty() {
            return Err(ModelError::Missing {
                dir: self.dir.clone(),
                names: missing,
            });
        }
        // A tied head may still be stored; it is the embedding and is ignored.
        let unexpected: Vec<String> = self
            .tensors
            .keys()
            .filter(|n| {
                !(want.contains_key(*n) || cfg.tie_word_embeddings && *n == "lm_head.weight")
            })
            .cloned()
            .collect();
        if !unexpected.is_empty() {
            return Err(ModelError::Unexpected {
                dir: self.dir.clone(),
                names: unexpected,
            });
        }
        for (name, shape) in &want {
            let found = &self.tensors[name].1;
            if found != shape {
                return Err(ModelError::tensor(
                    name,
                    format!(
                        "shape {found:?} in {}, the config needs {shape:?}",
                        self.dir.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl ParamSource for HfCheckpoint {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let (file, found) = self.tensors.get(name).ok_or_else(|| ModelError::Missing {
            dir: self.dir.clone(),
            names: vec![name.to_string()],
        })?;
        if found != shape {
            return Err(ModelError::tensor(
                name,
                format!("shape {found:?} in the checkpoint, the model needs {shape:?}"),
            ));
        }
        let (path, mmap) = &self.files[*file];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| ModelError::safetensors(path, e.to_string()))?;
        let view = st
            .tensor(name)
            .map_err(|e| ModelError::safetensors(path, e.to_string()))?;
        Ok(bytes_to_f32(view.data(), view.dtype()))
    }
}

fn bytes_to_f32(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => unreachable!("dtype checked when the checkpoint was opened"),
    }
}

/// Storage dtype of a written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    BF16,
    F16,
}

impl SaveDtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" | "float32" => Some(Self::F32),
            "bf16" | "bfloat16" => Some(Self::BF16),
            "f16" | "float16" => Some(Self::F16),
            _ => None,
        }
    }
    fn st(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::BF16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::BF16 => "bfloat16",
            Self::F16 => "float16",
        }
    }
    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::BF16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            Self::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    }
}

/// A tensor on the host, by HF name, f32.
#[derive(Debug, Clone)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Writes an HF checkpoint directory: `config.json`, `generation_config.json`,
/// safetensors shards of at most `max_shard_bytes` (one file if it all fits)
/// and the index. Files go to temporary names first and are renamed, so a
/// crash never leaves a half-written file under a final name.
pub fn save_hf(
    dir: &Path,
    cfg: &BambaConfig,
    tensors: &[NamedTensor],
    dtype: SaveDtype,
    max_shard_bytes: usize,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let elem = if dtype == SaveDtype::F32 { 4 } else { 2 };
    let mut shards: Vec<Vec<&NamedTensor>> = vec![vec![]];
    let mut size = 0;
    for t in tensors {
        let bytes = t.values.len() * elem;
        if size + bytes > max_shard_bytes && !shards.last().unwrap().is_empty() {
            shards.push(vec![]);
            size = 0;
        }
        size += bytes;
        shards.last_mut().unwrap().push(t);
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    for (k, shard) in shards.iter().enumerate() {
        let fname = if n == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
        };
        let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = shard
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone(), dtype.encode(&t.values)))
            .collect();
        let views = encoded
            .iter()
            .map(|(name, shape, data)| {
                let view = safetensors::tensor::TensorView::new(dtype.st(), shape.clone(), data)
                    .map_err(|e| ModelError::tensor(name, e.to_string()))?;
                Ok((name.clone(), view))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| ModelError::safetensors(&dir.join(&fname), e.to_string()))?;
        write_atomic(&dir.join(&fname), &bytes)?;
        for (name, _, data) in &encoded {
            weight_map.insert(name.clone(), fname.clone());
            total += data.len();
        }
    }
    if n > 1 {
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        write_atomic(
            &dir.join(INDEX_FILE),
            serde_json::to_string_pretty(&index).unwrap().as_bytes(),
        )?;
    } else {
        // A stale index from an earlier sharded save would shadow the single file.
        let _ = std::fs::remove_file(dir.join(INDEX_FILE));
    }
    let mut config = cfg.to_hf_json_string();
    config = config.replacen(
        '{',
        &format!("{{\n  \"torch_dtype\": \"{}\",", dtype.torch_name()),
        1,
    );
    write_atomic(&dir.join("config.json"), config.as_bytes())?;
    let generation = json!({ "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id });
    write_atomic(
        &dir.join("generation_config.json"),
        serde_json::to_string_pretty(&generation)
            .unwrap()
            .as_bytes(),
    )?;
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file, fsynced, then renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let mut f = File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ModelError::io(&tmp, e)
    })?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

/// Every parameter of a module with its dotted path (= HF name) and value.
pub fn named_tensors<B: BambaBackend, M: Module<B>>(module: &M) -> Vec<NamedTensor> {
    struct Collect {
        path: Vec<String>,
        out: Vec<NamedTensor>,
    }
    impl<B: BambaBackend> ModuleVisitor<B> for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val();
            self.out.push(NamedTensor {
                name: self.path.join("."),
                shape: t.dims().to_vec(),
                values: to_f32(t.into_data()),
            });
        }
    }
    let mut c = Collect {
        path: vec![],
        out: vec![],
    };
    module.visit(&mut c);
    c.out
}

/// The gradient of every parameter, by HF name, after `loss.backward()`.
pub fn named_grads<B: AutodiffBackend, M: Module<B>>(
    module: &M,
    grads: &B::Gradients,
) -> Vec<NamedTensor> {
    struct Collect<'a, B: AutodiffBackend> {
        path: Vec<String>,
        grads: &'a B::Gradients,
        out: Vec<NamedTensor>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let shape = param.dims().to_vec();
            let values = match param.grad(self.grads) {
                Some(g) => to_f32(g.into_data()),
                None => vec![0.0; shape.iter().product()],
            };
            self.out.push(NamedTensor {
                name: self.path.join("."),
                shape,
                values,
            });
        }
    }
    let mut c = Collect {
        path: vec![],
        grads,
        out: vec![],
    };
    module.visit(&mut c);
    c.out
}

/// Parameter ids by HF name (optimizers and FSDP address parameters this way).
pub fn param_ids<B: BambaBackend, M: Module<B>>(module: &M) -> Vec<(String, ParamId)> {
    struct Collect {
        path: Vec<String>,
        out: Vec<(String, ParamId)>,
    }
    impl<B: BambaBackend> ModuleVisitor<B> for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.out.push((self.path.join("."), param.id));
        }
    }
    let mut c = Collect {
        path: vec![],
        out: vec![],
    };
    module.visit(&mut c);
    c.out
}

pub fn to_f32(data: TensorData) -> Vec<f32> {
    data.convert::<f32>()
        .to_vec::<f32>()
        .expect("float tensor converts to f32")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BambaForCausalLM, ModelError};
    use burn::backend::Flex;

    type B = Flex;

    fn tiny() -> (BambaConfig, Vec<NamedTensor>) {
        let cfg = BambaConfig::tiny();
        let model = BambaForCausalLM::<B>::init(&cfg, 3, &Default::default()).unwrap();
        let tensors = named_tensors(&model);
        (cfg, tensors)
    }

    fn reload(dir: &Path) -> Result<Vec<NamedTensor>, ModelError> {
        let (model, _) = BambaForCausalLM::<B>::from_hf_dir(dir, &Default::default())?;
        Ok(named_tensors(&model))
    }

    #[test]
    fn names_and_shapes_are_the_configs() {
        let (cfg, tensors) = tiny();
        let got: Vec<(String, Vec<usize>)> = tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        let mut want = cfg.parameter_shapes();
        let mut got_sorted = got.clone();
        want.sort();
        got_sorted.sort();
        assert_eq!(got_sorted, want);
        let count: usize = tensors.iter().map(|t| t.values.len()).sum();
        assert_eq!(count as u64, cfg.num_parameters());
    }

    #[test]
    fn round_trips_single_and_sharded_in_every_dtype() {
        let (cfg, tensors) = tiny();
        for (dtype, shard_bytes) in [
            (SaveDtype::F32, usize::MAX),
            (SaveDtype::BF16, 40_000),
            (SaveDtype::F16, 100_000),
        ] {
            let dir = tempfile::tempdir().unwrap();
            save_hf(dir.path(), &cfg, &tensors, dtype, shard_bytes).unwrap();
            assert_eq!(
                dir.path().join(INDEX_FILE).exists(),
                shard_bytes != usize::MAX,
                "{dtype:?}"
            );
            let back = reload(dir.path()).unwrap();
            for (a, b) in tensors.iter().zip(&back) {
                assert_eq!(a.name, b.name);
                let round = |v: f32| match dtype {
                    SaveDtype::F32 => v,
                    SaveDtype::BF16 => half::bf16::from_f32(v).to_f32(),
                    SaveDtype::F16 => half::f16::from_f32(v).to_f32(),
                };
                assert!(
                    a.values.iter().zip(&b.values).all(|(x, y)| round(*x) == *y),
                    "{dtype:?} {}",
                    a.name
                );
            }
            assert_eq!(
                BambaConfig::from_file(dir.path().join("config.json")).unwrap(),
                cfg
            );
        }
    }

    #[test]
    fn missing_extra_misshaped_and_truncated_tensors_are_named() {
        let (cfg, mut tensors) = tiny();
        let dir = tempfile::tempdir().unwrap();
        let removed = tensors.remove(5);
        save_hf(dir.path(), &cfg, &tensors, SaveDtype::F32, usize::MAX).unwrap();
        let e = reload(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&removed.name) && e.contains("missing"), "{e}");

        tensors.insert(5, removed);
        tensors.push(NamedTensor {
            name: "model.layers.0.bogus.weight".into(),
            shape: vec![2],
            values: vec![0.0; 2],
        });
        save_hf(dir.path(), &cfg, &tensors, SaveDtype::F32, usize::MAX).unwrap();
        let e = reload(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("model.layers.0.bogus.weight") && e.contains("does not have"),
            "{e}"
        );

        tensors.pop();
        let t = tensors
            .iter_mut()
            .find(|t| t.name == "model.layers.0.mamba.D")
            .unwrap();
        t.shape = vec![t.values.len() / 2, 2];
        save_hf(dir.path(), &cfg, &tensors, SaveDtype::F32, usize::MAX).unwrap();
        let e = reload(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("model.layers.0.mamba.D") && e.contains("shape"),
            "{e}"
        );

        let t = tensors
            .iter_mut()
            .find(|t| t.name == "model.layers.0.mamba.D")
            .unwrap();
        t.shape = vec![t.values.len()];
        save_hf(dir.path(), &cfg, &tensors, SaveDtype::F32, usize::MAX).unwrap();
        let file = dir.path().join(SINGLE_FILE);
        let len = std::fs::metadata(&file).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
        let e = reload(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("truncated"),
            "{e}"
        );
    }
}
