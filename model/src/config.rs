//! `BambaConfig`: HF's `config.json` for `model_type: bamba`, read in every
//! variant transformers has written, validated, and written back out.

// `!(x > 0.0)` on purpose: NaN fails the checks too.
#![allow(clippy::neg_cmp_op_on_partial_ord, clippy::nonminimal_bool)]

use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::ModelError;

/// The architecture of a Bamba model, with HF's field names.
#[derive(Debug, Clone, PartialEq)]
pub struct BambaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Layers that are attention; every other layer is a Mamba2 mixer.
    pub attn_layer_indices: Vec<usize>,
    pub mamba_n_heads: usize,
    pub mamba_d_head: usize,
    pub mamba_n_groups: usize,
    pub mamba_d_state: usize,
    pub mamba_d_conv: usize,
    pub mamba_expand: usize,
    pub mamba_chunk_size: usize,
    pub mamba_conv_bias: bool,
    pub mamba_proj_bias: bool,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub rope_theta: f64,
    pub partial_rotary_factor: f64,
    /// Clamp range of `softplus(dt + dt_bias)`; `(0, inf)` means no clamp.
    pub time_step_limit: (f64, f64),
    /// Range of the initial `dt` (mamba_ssm's `dt_min`/`dt_max`), used by init only.
    pub time_step_min: f64,
    pub time_step_max: f64,
    pub initializer_range: f64,
    pub max_position_embeddings: usize,
    pub z_loss_coefficient: f64,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl BambaConfig {
    /// Bamba-9B as released (ibm-fms/Bamba-9B config.json).
    pub fn bamba_9b() -> Self {
        Self {
            vocab_size: 128256,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            attn_layer_indices: vec![9, 18, 27],
            mamba_n_heads: 128,
            mamba_d_head: 64,
            mamba_n_groups: 1,
            mamba_d_state: 128,
            mamba_d_conv: 4,
            mamba_expand: 2,
            mamba_chunk_size: 256,
            mamba_conv_bias: true,
            mamba_proj_bias: false,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            rope_theta: 10000.0,
            partial_rotary_factor: 0.5,
            time_step_limit: (0.0, f64::INFINITY),
            time_step_min: 0.001,
            time_step_max: 0.1,
            initializer_range: 0.02,
            max_position_embeddings: 4096,
            z_loss_coefficient: 0.0,
            pad_token_id: Some(0),
            bos_token_id: Some(128000),
            eos_token_id: Some(128001),
        }
    }

    /// Bamba-9B's shape scaled to about 1.9B parameters (the PyTorch peer's `bamba_1b`).
    pub fn bamba_1b() -> Self {
        Self {
            hidden_size: 2048,
            intermediate_size: 5632,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_key_value_heads: 4,
            attn_layer_indices: vec![5, 13, 20],
            mamba_n_heads: 64,
            mamba_d_head: 64,
            ..Self::bamba_9b()
        }
    }

    /// A few-hundred-thousand-parameter model with every feature of the real one
    /// (attention and Mamba layers, GQA, two groups), for CPU runs and tests.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            attn_layer_indices: vec![2],
            mamba_n_heads: 8,
            mamba_d_head: 16,
            mamba_n_groups: 2,
            mamba_d_state: 16,
            mamba_chunk_size: 32,
            max_position_embeddings: 2048,
            pad_token_id: Some(0),
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            ..Self::bamba_9b()
        }
    }

    /// Looks a preset up by its name as it appears in configs and `--help`.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "bamba-9b" => Some(Self::bamba_9b()),
            "bamba-1b" => Some(Self::bamba_1b()),
            "tiny" => Some(Self::tiny()),
            _ => None,
        }
    }

    pub const PRESETS: &'static [&'static str] = &["bamba-9b", "bamba-1b", "tiny"];

    pub fn d_inner(&self) -> usize {
        self.mamba_expand * self.hidden_size
    }

    /// Channels of the causal conv: x, B and C.
    pub fn conv_dim(&self) -> usize {
        self.d_inner() + 2 * self.mamba_n_groups * self.mamba_d_state
    }

    /// Output width of `in_proj`: z, xBC, dt.
    pub fn in_proj_dim(&self) -> usize {
        self.d_inner() + self.conv_dim() + self.mamba_n_heads
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Leading dims of each attention head that get rotary embeddings.
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim() as f64 * self.partial_rotary_factor) as usize
    }

    pub fn is_attention(&self, layer: usize) -> bool {
        self.attn_layer_indices.contains(&layer)
    }

    /// Every parameter of the model by HF name and shape, in checkpoint order.
    /// Counting and sharding use this without allocating anything.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            if self.is_attention(i) {
                let (nq, nkv) = (self.num_attention_heads, self.num_key_value_heads);
                let hd = self.head_dim();
                out.push((format!("{p}.self_attn.q_proj.weight"), vec![nq * hd, h]));
                out.push((format!("{p}.self_attn.k_proj.weight"), vec![nkv * hd, h]));
                out.push((format!("{p}.self_attn.v_proj.weight"), vec![nkv * hd, h]));
                out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, nq * hd]));
            } else {
                let (di, cd, nh) = (self.d_inner(), self.conv_dim(), self.mamba_n_heads);
                out.push((
                    format!("{p}.mamba.in_proj.weight"),
                    vec![self.in_proj_dim(), h],
                ));
                if self.mamba_proj_bias {
                    out.push((format!("{p}.mamba.in_proj.bias"), vec![self.in_proj_dim()]));
                }
                out.push((
                    format!("{p}.mamba.conv1d.weight"),
                    vec![cd, 1, self.mamba_d_conv],
                ));
                if self.mamba_conv_bias {
                    out.push((format!("{p}.mamba.conv1d.bias"), vec![cd]));
                }
                out.push((format!("{p}.mamba.dt_bias"), vec![nh]));
                out.push((format!("{p}.mamba.A_log"), vec![nh]));
                out.push((format!("{p}.mamba.D"), vec![nh]));
                out.push((format!("{p}.mamba.norm.weight"), vec![di]));
                out.push((format!("{p}.mamba.out_proj.weight"), vec![h, di]));
                if self.mamba_proj_bias {
                    out.push((format!("{p}.mamba.out_proj.bias"), vec![h]));
                }
            }
            out.push((format!("{p}.pre_ff_layernorm.weight"), vec![h]));
            let m = self.intermediate_size;
            out.push((format!("{p}.feed_forward.gate_proj.weight"), vec![m, h]));
            out.push((format!("{p}.feed_forward.up_proj.weight"), vec![m, h]));
            out.push((format!("{p}.feed_forward.down_proj.weight"), vec![h, m]));
        }
        out.push(("model.final_layernorm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }

    /// Total parameter count, computed from shapes alone.
    pub fn num_parameters(&self) -> u64 {
        self.parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }

    /// Training FLOPs per token, torchtitan's convention: 6 x (params - input
    /// embedding) for the matmuls plus 12 x attn_layers x heads x head_dim x seq for
    /// causal attention counted in full. The SSD scan is not counted (about 1% at 9B).
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        let embed = (self.vocab_size * self.hidden_size) as f64;
        let dense = 6.0 * (self.num_parameters() as f64 - embed);
        let attn = 12.0
            * self.attn_layer_indices.len() as f64
            * (self.num_attention_heads * self.head_dim()) as f64
            * seq_len as f64;
        dense + attn
    }

    /// Reads an HF `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| e.in_file(path))
    }

    /// Parses the text of an HF `config.json`. Python's `json` writes bare
    /// `Infinity`/`NaN`, which is not JSON; those tokens are quoted first.
    pub fn from_json_str(text: &str) -> Result<Self, ModelError> {
        let value: Value = serde_json::from_str(&quote_non_finite(text))
            .map_err(|e| ModelError::config("<json>", e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| ModelError::config("<root>", "expected a JSON object"))?;
        Self::from_hf_map(obj)
    }

    fn from_hf_map(m: &Map<String, Value>) -> Result<Self, ModelError> {
        if let Some(t) = m.get("model_type").and_then(Value::as_str)
            && t != "bamba"
        {
            return Err(ModelError::config(
                "model_type",
                format!("expected \"bamba\", found \"{t}\""),
            ));
        }
        let d = Self::bamba_9b();
        let r = Reader(m);
        // HF's defaults for fields a file may leave out (BambaConfig.__init__).
        let hidden_size = r.usize("hidden_size", d.hidden_size)?;
        let num_attention_heads = r.usize("num_attention_heads", 32)?;
        let mamba_n_heads = r.usize("mamba_n_heads", 128)?;
        let mamba_expand = r.usize("mamba_expand", 2)?;
        let d_inner = mamba_expand * hidden_size;
        let mamba_d_head = match m.get("mamba_d_head") {
            None | Some(Value::Null) => d_inner / mamba_n_heads.max(1),
            Some(Value::String(s)) if s == "auto" => d_inner / mamba_n_heads.max(1),
            Some(v) => as_usize(v).ok_or_else(|| {
                ModelError::config(
                    "mamba_d_head",
                    format!("expected an integer or \"auto\", found {v}"),
                )
            })?,
        };
        let rope = m.get("rope_parameters").and_then(Value::as_object);
        let rope_theta = match rope.and_then(|p| p.get("rope_theta")) {
            Some(v) => as_f64(v).ok_or_else(|| {
                ModelError::config("rope_parameters.rope_theta", "expected a number")
            })?,
            None => r.f64("rope_theta", 10000.0)?,
        };
        if let Some(t) = rope
            .and_then(|p| p.get("rope_type"))
            .and_then(Value::as_str)
            && t != "default"
        {
            return Err(ModelError::config(
                "rope_parameters.rope_type",
                format!("only \"default\" is supported, found \"{t}\""),
            ));
        }
        // transformers hard-codes 0.5 for Bamba; an explicit value wins.
        let partial_rotary_factor = match rope.and_then(|p| p.get("partial_rotary_factor")) {
            Some(v) => as_f64(v).ok_or_else(|| {
                ModelError::config("rope_parameters.partial_rotary_factor", "expected a number")
            })?,
            None => r.f64("partial_rotary_factor", 0.5)?,
        };
        let time_step_limit = match m.get("time_step_limit") {
            None | Some(Value::Null) => (0.0, f64::INFINITY),
            Some(Value::Array(a)) if a.len() == 2 => {
                let lo = as_f64(&a[0]).ok_or_else(|| {
                    ModelError::config(
                        "time_step_limit[0]",
                        format!("expected a number, found {}", a[0]),
                    )
                })?;
                let hi = as_f64(&a[1]).ok_or_else(|| {
                    ModelError::config(
                        "time_step_limit[1]",
                        format!("expected a number, found {}", a[1]),
                    )
                })?;
                (lo, hi)
            }
            Some(v) => {
                return Err(ModelError::config(
                    "time_step_limit",
                    format!("expected [min, max], found {v}"),
                ));
            }
        };
        if let Some(act) = m.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(ModelError::config(
                "hidden_act",
                format!("only \"silu\" is supported, found \"{act}\""),
            ));
        }
        let cfg = Self {
            vocab_size: r.usize("vocab_size", 128000)?,
            hidden_size,
            intermediate_size: r.usize("intermediate_size", 14336)?,
            num_hidden_layers: r.usize("num_hidden_layers", 32)?,
            num_attention_heads,
            num_key_value_heads: r.usize("num_key_value_heads", num_attention_heads)?,
            attn_layer_indices: r.usize_list("attn_layer_indices")?,
            mamba_n_heads,
            mamba_d_head,
            mamba_n_groups: r.usize("mamba_n_groups", 1)?,
            mamba_d_state: r.usize("mamba_d_state", 256)?,
            mamba_d_conv: r.usize("mamba_d_conv", 4)?,
            mamba_expand,
            mamba_chunk_size: r.usize("mamba_chunk_size", 256)?,
            mamba_conv_bias: r.bool("mamba_conv_bias", true)?,
            mamba_proj_bias: r.bool("mamba_proj_bias", false)?,
            rms_norm_eps: r.f64("rms_norm_eps", 1e-5)?,
            tie_word_embeddings: r.bool("tie_word_embeddings", false)?,
            rope_theta,
            partial_rotary_factor,
            time_step_limit,
            time_step_min: r.f64("time_step_min", 0.001)?,
            time_step_max: r.f64("time_step_max", 0.1)?,
            initializer_range: r.f64("initializer_range", 0.02)?,
            max_position_embeddings: r.usize("max_position_embeddings", 262144)?,
            z_loss_coefficient: r.f64("z_loss_coefficient", 0.0)?,
            pad_token_id: r.token("pad_token_id")?,
            bos_token_id: r.token("bos_token_id")?,
            eos_token_id: r.token("eos_token_id")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects configurations the model cannot be built from, naming the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let pos = |v: usize, f: &str| {
            if v == 0 {
                Err(ModelError::config(f, "must be positive"))
            } else {
                Ok(())
            }
        };
        pos(self.vocab_size, "vocab_size")?;
        pos(self.hidden_size, "hidden_size")?;
        pos(self.intermediate_size, "intermediate_size")?;
        pos(self.num_hidden_layers, "num_hidden_layers")?;
        pos(self.num_attention_heads, "num_attention_heads")?;
        pos(self.num_key_value_heads, "num_key_value_heads")?;
        pos(self.mamba_n_heads, "mamba_n_heads")?;
        pos(self.mamba_d_head, "mamba_d_head")?;
        pos(self.mamba_n_groups, "mamba_n_groups")?;
        pos(self.mamba_d_state, "mamba_d_state")?;
        pos(self.mamba_d_conv, "mamba_d_conv")?;
        pos(self.mamba_expand, "mamba_expand")?;
        pos(self.mamba_chunk_size, "mamba_chunk_size")?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ModelError::config(
                "num_attention_heads",
                format!("must divide hidden_size {}", self.hidden_size),
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(ModelError::config(
                "num_key_value_heads",
                format!(
                    "must divide num_attention_heads {}",
                    self.num_attention_heads
                ),
            ));
        }
        if self.mamba_n_heads * self.mamba_d_head != self.d_inner() {
            return Err(ModelError::config(
                "mamba_d_head",
                format!(
                    "mamba_n_heads x mamba_d_head = {} must equal mamba_expand x hidden_size = {}",
                    self.mamba_n_heads * self.mamba_d_head,
                    self.d_inner()
                ),
            ));
        }
        if !self.mamba_n_heads.is_multiple_of(self.mamba_n_groups) {
            return Err(ModelError::config(
                "mamba_n_groups",
                format!("must divide mamba_n_heads {}", self.mamba_n_heads),
            ));
        }
        if let Some(&i) = self
            .attn_layer_indices
            .iter()
            .find(|&&i| i >= self.num_hidden_layers)
        {
            return Err(ModelError::config(
                "attn_layer_indices",
                format!(
                    "index {i} is not below num_hidden_layers {}",
                    self.num_hidden_layers
                ),
            ));
        }
        if !(self.partial_rotary_factor > 0.0 && self.partial_rotary_factor <= 1.0)
            || !self.rotary_dim().is_multiple_of(2)
        {
            return Err(ModelError::config(
                "partial_rotary_factor",
                "must be in (0, 1] and give an even rotary dimension",
            ));
        }
        if !(self.rms_norm_eps > 0.0) {
            return Err(ModelError::config("rms_norm_eps", "must be positive"));
        }
        let (lo, hi) = self.time_step_limit;
        if lo.is_nan() || hi.is_nan() || lo < 0.0 || lo >= hi {
            return Err(ModelError::config(
                "time_step_limit",
                format!("expected 0 <= min < max, found [{lo}, {hi}]"),
            ));
        }
        if !(self.z_loss_coefficient >= 0.0) {
            return Err(ModelError::config("z_loss_coefficient", "must be >= 0"));
        }
        Ok(())
    }

    /// The HF `config.json` object transformers loads as `BambaForCausalLM`.
    /// Rope settings are written both ways so old and new transformers agree.
    pub fn to_hf_json(&self) -> Value {
        let inf_or = |x: f64| {
            if x.is_infinite() {
                json!(INF_PLACEHOLDER)
            } else {
                json!(x)
            }
        };
        json!({
            "architectures": ["BambaForCausalLM"],
            "model_type": "bamba",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "attn_layer_indices": self.attn_layer_indices,
            "hidden_act": "silu",
            "mamba_n_heads": self.mamba_n_heads,
            "mamba_d_head": self.mamba_d_head,
            "mamba_n_groups": self.mamba_n_groups,
            "mamba_d_state": self.mamba_d_state,
            "mamba_d_conv": self.mamba_d_conv,
            "mamba_expand": self.mamba_expand,
            "mamba_chunk_size": self.mamba_chunk_size,
            "mamba_conv_bias": self.mamba_conv_bias,
            "mamba_proj_bias": self.mamba_proj_bias,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
            "time_step_limit": [inf_or(self.time_step_limit.0), inf_or(self.time_step_limit.1)],
            "time_step_min": self.time_step_min,
            "time_step_max": self.time_step_max,
            "initializer_range": self.initializer_range,
            "max_position_embeddings": self.max_position_embeddings,
            "z_loss_coefficient": self.z_loss_coefficient,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_bias": false,
            "mlp_bias": false,
            "use_cache": true,
            "num_logits_to_keep": 1,
        })
    }

    /// `config.json` text. Infinity is written as Python's `json` writes it, the
    /// one spelling every transformers version reads.
    pub fn to_hf_json_string(&self) -> String {
        Self::json_text(&self.to_hf_json())
    }

    /// Text of a `to_hf_json` object (possibly edited), infinities spelled as Python writes them.
    pub fn json_text(value: &Value) -> String {
        let text = serde_json::to_string_pretty(value).expect("config serializes");
        text.replace(&format!("\"{INF_PLACEHOLDER}\""), "Infinity")
    }
}

const INF_PLACEHOLDER: &str = "__bamba_infinity__";

/// Typed field access with HF's defaults and errors that name the field.
struct Reader<'a>(&'a Map<String, Value>);

impl Reader<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn usize(&self, k: &str, default: usize) -> Result<usize, ModelError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => as_usize(v).ok_or_else(|| {
                ModelError::config(k, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }
    fn f64(&self, k: &str, default: f64) -> Result<f64, ModelError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => as_f64(v)
                .ok_or_else(|| ModelError::config(k, format!("expected a number, found {v}"))),
        }
    }
    fn bool(&self, k: &str, default: bool) -> Result<bool, ModelError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| ModelError::config(k, format!("expected true or false, found {v}"))),
        }
    }
    fn usize_list(&self, k: &str) -> Result<Vec<usize>, ModelError> {
        match self.get(k) {
            None => Ok(vec![]),
            Some(v) => Vec::<usize>::deserialize(v).map_err(|_| {
                ModelError::config(k, format!("expected a list of layer indices, found {v}"))
            }),
        }
    }
    /// Token ids; a list (several EOS ids) keeps its first entry.
    fn token(&self, k: &str) -> Result<Option<u32>, ModelError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Array(a)) if !a.is_empty() => as_usize(&a[0])
                .map(|x| Some(x as u32))
                .ok_or_else(|| ModelError::config(k, "expected token ids")),
            Some(v) => as_usize(v)
                .map(|x| Some(x as u32))
                .ok_or_else(|| ModelError::config(k, format!("expected a token id, found {v}"))),
        }
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().map(|x| x as usize)
}

/// A number, or one of the spellings of infinity Python tools write:
/// `Infinity` (quoted by `quote_non_finite`), `"inf"`, `{"__float__": "Infinity"}`.
fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "infinity" | "inf" | "+inf" | "+infinity" => Some(f64::INFINITY),
            "-infinity" | "-inf" => Some(f64::NEG_INFINITY),
            s => s.parse().ok(),
        },
        Value::Object(o) if o.len() == 1 => o.get("__float__").and_then(as_f64),
        _ => None,
    }
}

/// Quotes bare `Infinity`, `-Infinity` and `NaN` outside strings so that
/// serde_json accepts what Python's `json.dump` writes.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_str, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_str = true;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(t) = token {
            out.push('"');
            out.push_str(t);
            out.push('"');
            rest = &rest[t.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bamba_9b_has_exactly_the_published_parameter_count() {
        assert_eq!(BambaConfig::bamba_9b().num_parameters(), 9_780_235_392);
    }

    #[test]
    fn reads_every_infinity_and_rope_spelling() {
        let old = r#"{"model_type":"bamba","hidden_size":64,"num_attention_heads":4,"mamba_n_heads":8,
            "mamba_d_head":"auto","rope_theta":500.0,"time_step_limit":[0.0, Infinity],"some_unused_key":1}"#;
        let c = BambaConfig::from_json_str(old).unwrap();
        assert_eq!(c.mamba_d_head, 16);
        assert_eq!(c.rope_theta, 500.0);
        assert_eq!(c.time_step_limit, (0.0, f64::INFINITY));
        let new = r#"{"hidden_size":64,"num_attention_heads":4,"mamba_n_heads":8,"mamba_d_head":16,
            "rope_parameters":{"rope_theta":1000.0,"rope_type":"default","partial_rotary_factor":0.5},
            "time_step_limit":[0.0,{"__float__":"Infinity"}],"attn_rotary_emb":64,"use_mamba_kernels":true}"#;
        let c = BambaConfig::from_json_str(new).unwrap();
        assert_eq!(c.rope_theta, 1000.0);
        assert_eq!(c.time_step_limit.1, f64::INFINITY);
        let none = r#"{"hidden_size":64,"num_attention_heads":4,"mamba_n_heads":8}"#;
        assert_eq!(
            BambaConfig::from_json_str(none).unwrap().rope_theta,
            10000.0
        );
    }

    #[test]
    fn invalid_values_name_the_field() {
        let bad =
            r#"{"hidden_size":64,"num_attention_heads":4,"mamba_n_heads":8,"mamba_d_head":10}"#;
        let e = BambaConfig::from_json_str(bad).unwrap_err().to_string();
        assert!(e.contains("mamba_d_head"), "{e}");
        let bad = r#"{"hidden_size":"wide"}"#;
        assert!(
            BambaConfig::from_json_str(bad)
                .unwrap_err()
                .to_string()
                .contains("hidden_size")
        );
        let bad = r#"{"hidden_size":64,"num_attention_heads":4,"mamba_n_heads":8,"num_hidden_layers":2,"attn_layer_indices":[5]}"#;
        assert!(
            BambaConfig::from_json_str(bad)
                .unwrap_err()
                .to_string()
                .contains("attn_layer_indices")
        );
    }

    #[test]
    fn written_config_reads_back_identically() {
        for cfg in [BambaConfig::bamba_9b(), BambaConfig::tiny()] {
            let text = cfg.to_hf_json_string();
            assert!(text.contains("Infinity"));
            assert_eq!(BambaConfig::from_json_str(&text).unwrap(), cfg);
        }
    }

    #[test]
    fn infinity_inside_strings_is_left_alone() {
        assert_eq!(
            quote_non_finite(r#"{"a":"Infinity NaN","b":Infinity}"#),
            r#"{"a":"Infinity NaN","b":"Infinity"}"#
        );
    }
}
