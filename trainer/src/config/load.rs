//! Reading a config: YAML (serde_norway, the maintained fork of the
//! deprecated serde_yaml) into `TrainConfig`, `--set key.path=value`
//! overrides, and the checks that span several fields.

// `!(x > 0.0)` on purpose: NaN fails the checks too.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use std::path::{Path, PathBuf};

use serde_norway::Value;

use super::schema::*;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}{key}{line}: {msg}", file = file_prefix(.file), line = line_suffix(*.line))]
    Invalid {
        file: Option<PathBuf>,
        key: String,
        line: Option<usize>,
        msg: String,
    },
    #[error("--set {arg}: {msg}")]
    Override { arg: String, msg: String },
}

fn file_prefix(f: &Option<PathBuf>) -> String {
    f.as_ref()
        .map(|f| format!("{}: ", f.display()))
        .unwrap_or_default()
}

fn line_suffix(l: Option<usize>) -> String {
    l.map(|l| format!(" (line {l})")).unwrap_or_default()
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, msg: impl Into<String>) -> Self {
        Self::Invalid {
            file: None,
            key: key.into(),
            line: None,
            msg: msg.into(),
        }
    }
    /// Gives an error without a line (checks across fields, or a config
    /// deserialized after `--set` overrides) the line of its key in `text`,
    /// or says which `--set` gave the value.
    fn located(self, text: &str, overrides: &[String]) -> Self {
        match self {
            Self::Invalid {
                file,
                key,
                line: None,
                msg,
            } => {
                let set = overrides.iter().rev().find(|o| {
                    let k = o.split_once('=').map_or(o.as_str(), |(k, _)| k);
                    key == k
                        || key.starts_with(&format!("{k}."))
                        || key.starts_with(&format!("{k}["))
                });
                match set {
                    Some(o) => Self::Invalid {
                        file,
                        key,
                        line: None,
                        msg: format!("{msg} (set by --set {o})"),
                    },
                    None => Self::Invalid {
                        file,
                        line: key_line(text, &key),
                        key,
                        msg,
                    },
                }
            }
            e => e,
        }
    }

    fn in_file(self, path: &Path) -> Self {
        match self {
            Self::Invalid { key, line, msg, .. } => Self::Invalid {
                file: Some(path.to_path_buf()),
                key,
                line,
                msg,
            },
            e => e,
        }
    }
}

/// Reads, overrides and validates a config file.
pub fn load_config(path: &Path, overrides: &[String]) -> Result<TrainConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_config(&text, overrides).map_err(|e| e.in_file(path))
}

/// Parses YAML text (with overrides) into a validated config.
pub fn parse_config(text: &str, overrides: &[String]) -> Result<TrainConfig, ConfigError> {
    parse_unlocated(text, overrides).map_err(|e| e.located(text, overrides))
}

fn parse_unlocated(text: &str, overrides: &[String]) -> Result<TrainConfig, ConfigError> {
    let cfg: TrainConfig = if overrides.is_empty() {
        // Straight from the text, so errors carry line numbers.
        let de = serde_norway::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(path_error)?
    } else {
        let mut value: Value = serde_norway::from_str(text).map_err(|e| ConfigError::Invalid {
            file: None,
            key: "<yaml>".into(),
            line: e.location().map(|l| l.line()),
            msg: e.to_string(),
        })?;
        if value.is_null() {
            value = Value::Mapping(Default::default());
        }
        for arg in overrides {
            apply_override(&mut value, arg)?;
        }
        serde_path_to_error::deserialize(value).map_err(path_error)?
    };
    validate(&cfg)?;
    Ok(cfg)
}

fn path_error(e: serde_path_to_error::Error<serde_norway::Error>) -> ConfigError {
    let key = e.path().to_string();
    let inner = e.into_inner();
    let line = inner.location().map(|l| l.line());
    let mut msg = inner.to_string();
    // serde_norway appends "at line N column M"; the line is reported separately.
    if let Some(i) = msg.find(" at line ") {
        msg.truncate(i);
    }
    ConfigError::Invalid {
        file: None,
        key: if key == "." { "<root>".into() } else { key },
        line,
        msg,
    }
}

/// The 1-based line of `key` (`a.b[2].c`, as serde_path_to_error writes
/// paths) in YAML `text`; `None` if it is not written there (a default).
/// Follows block and flow mappings and block lists by indentation, the way
/// configs are written; the parent's extent bounds each search.
fn key_line(text: &str, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| match l.find(" #") {
            Some(i) => &l[..i],
            None if l.trim_start().starts_with('#') => "",
            None => l,
        })
        .collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    // Lines [lo, hi) with line `lo` read from column `col`.
    let (mut lo, mut hi, mut col) = (0usize, lines.len(), 0usize);
    // The end of the block under a key (or list item) at column `c` on line `i`.
    let block_end = |i: usize, c: usize| {
        (i + 1..lines.len())
            .find(|&j| !lines[j].trim().is_empty() && indent(lines[j]) <= c)
            .unwrap_or(lines.len())
    };
    let mut found = None;
    for seg in key.split('.') {
        let (name, indices) = match seg.find('[') {
            Some(i) => (&seg[..i], &seg[i..]),
            None => (seg, ""),
        };
        if !name.is_empty() && name != "<root>" {
            let mut hit = None;
            let end = hi.min(lines.len());
            'search: for (i, &l) in lines.iter().enumerate().take(end).skip(lo) {
                let from = if i == lo { col.min(l.len()) } else { 0 };
                let mut start = from;
                while let Some(p) = l[start..].find(name) {
                    let at = start + p;
                    let before = l[..at].chars().next_back();
                    let after = l[at + name.len()..].trim_start();
                    let bounded =
                        matches!(before, None | Some(' ' | '{' | ',' | '-' | '\t')) && at >= from;
                    if bounded && after.starts_with(':') {
                        hit = Some((i, at));
                        break 'search;
                    }
                    start = at + name.len();
                }
            }
            let (i, at) = hit?;
            found = Some(i);
            let rest = l_after_colon(lines[i], at + name.len());
            if rest.trim().is_empty() {
                (lo, hi, col) = (i + 1, block_end(i, at), 0);
            } else {
                (lo, hi, col) = (i, i + 1, lines[i].len() - rest.len());
            }
        }
        for idx in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
            let n: usize = idx.parse().ok()?;
            // Block list items: lines starting with `-` at the list's indent.
            let items: Vec<usize> = (lo..hi.min(lines.len()))
                .filter(|&j| j > lo || col == 0)
                .filter(|&j| lines[j].trim_start().starts_with('-'))
                .collect();
            let item_indent = items.iter().map(|&j| indent(lines[j])).min();
            let items: Vec<usize> = items
                .into_iter()
                .filter(|&j| Some(indent(lines[j])) == item_indent)
                .collect();
            match items.get(n) {
                Some(&j) => {
                    found = Some(j);
                    (lo, hi, col) = (j, block_end(j, indent(lines[j])), indent(lines[j]) + 1);
                }
                // A flow list on one line: the line of the list.
                None => return found.map(|l| l + 1),
            }
        }
    }
    found.map(|l| l + 1)
}

fn l_after_colon(line: &str, key_end: usize) -> &str {
    let rest = &line[key_end..];
    let colon = rest.find(':').map_or(rest.len(), |i| i + 1);
    &rest[colon..]
}

/// `a.b.c=value`: sets a nested key, creating mappings on the way; the value
/// is parsed as YAML (`1e-4` a number, `[a, b]` a list, `null` clears).
fn apply_override(root: &mut Value, arg: &str) -> Result<(), ConfigError> {
    let err = |msg: &str| ConfigError::Override {
        arg: arg.to_string(),
        msg: msg.to_string(),
    };
    let (path, raw) = arg
        .split_once('=')
        .ok_or_else(|| err("expected key.path=value"))?;
    let value: Value =
        serde_norway::from_str(raw).map_err(|e| err(&format!("value is not valid YAML: {e}")))?;
    let keys: Vec<&str> = path.split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(err("empty key in the path"));
    }
    let mut node = root;
    for (i, k) in keys.iter().enumerate() {
        let map = node
            .as_mapping_mut()
            .ok_or_else(|| err(&format!("`{}` is not a section", keys[..i].join("."))))?;
        let key = Value::String(k.to_string());
        if i + 1 == keys.len() {
            map.insert(key, value);
            return Ok(());
        }
        node = map
            .entry(key)
            .or_insert_with(|| Value::Mapping(Default::default()));
        if node.is_null() {
            *node = Value::Mapping(Default::default());
        }
    }
    Ok(())
}

/// Checks that span fields or that serde cannot express.
fn validate(c: &TrainConfig) -> Result<(), ConfigError> {
    let bad = |k: &str, m: String| Err(ConfigError::invalid(k, m));
    if c.data.datasets.is_empty() {
        return bad("data.datasets", "at least one dataset is needed".into());
    }
    for (i, d) in c.data.datasets.iter().enumerate() {
        if !(d.weight > 0.0 && d.weight.is_finite()) {
            return bad(
                &format!("data.datasets[{i}].weight"),
                format!("must be a positive number, found {}", d.weight),
            );
        }
        if c.data.datasets[..i].iter().any(|o| o.name == d.name) {
            return bad(
                &format!("data.datasets[{i}].name"),
                format!("`{}` appears twice", d.name),
            );
        }
    }
    if c.data.seq_len < 2 {
        return bad(
            "data.seq_len",
            format!("must be at least 2, found {}", c.data.seq_len),
        );
    }
    if c.data.logical_shards == 0 {
        return bad("data.logical_shards", "must be positive".into());
    }
    let t = &c.training;
    match (t.global_batch_tokens, t.global_batch_sequences) {
        (Some(_), Some(_)) => {
            return bad(
                "training.global_batch_tokens",
                "set either global_batch_tokens or global_batch_sequences, not both".into(),
            );
        }
        (None, None) => {
            return bad(
                "training.global_batch_sequences",
                "set global_batch_sequences or global_batch_tokens".into(),
            );
        }
        (Some(tok), None) if tok % c.data.seq_len as u64 != 0 || tok == 0 => {
            return bad(
                "training.global_batch_tokens",
                format!(
                    "{tok} is not a positive multiple of data.seq_len {}",
                    c.data.seq_len
                ),
            );
        }
        (None, Some(0)) => {
            return bad("training.global_batch_sequences", "must be positive".into());
        }
        _ => {}
    }
    if t.micro_batch == 0 {
        return bad("training.micro_batch", "must be positive".into());
    }
    match (t.steps, t.total_tokens) {
        (Some(_), Some(_)) => {
            return bad(
                "training.steps",
                "set either steps or total_tokens, not both".into(),
            );
        }
        (None, None) => return bad("training.steps", "set steps or total_tokens".into()),
        (Some(0), _) | (_, Some(0)) => {
            return bad(
                "training.steps",
                "the run must have at least one step".into(),
            );
        }
        _ => {}
    }
    if !(t.grad_clip >= 0.0) {
        return bad(
            "training.grad_clip",
            format!("must be >= 0, found {}", t.grad_clip),
        );
    }
    if t.device == Device::Cpu && t.precision == Precision::Bf16 {
        return bad(
            "training.precision",
            "bf16 needs training.device: cuda; the CPU backend trains in f32".into(),
        );
    }
    let o = &c.optimizer;
    if !(o.lr > 0.0 && o.lr.is_finite()) {
        return bad("optimizer.lr", format!("must be positive, found {}", o.lr));
    }
    if !(0.0..1.0).contains(&o.betas.0) || !(0.0..1.0).contains(&o.betas.1) {
        return bad(
            "optimizer.betas",
            format!(
                "each beta must be in [0, 1), found ({}, {})",
                o.betas.0, o.betas.1
            ),
        );
    }
    if !(o.eps > 0.0) {
        return bad("optimizer.eps", "must be positive".into());
    }
    if !(o.weight_decay >= 0.0) {
        return bad("optimizer.weight_decay", "must be >= 0".into());
    }
    if !(c.schedule.final_lr >= 0.0) || c.schedule.final_lr > o.lr {
        return bad(
            "schedule.final_lr",
            format!(
                "must be in [0, optimizer.lr = {}], found {}",
                o.lr, c.schedule.final_lr
            ),
        );
    }
    let total = c.total_steps();
    if c.schedule.warmup_steps > total {
        return bad(
            "schedule.warmup_steps",
            format!(
                "{} is longer than the run ({total} steps)",
                c.schedule.warmup_steps
            ),
        );
    }
    if let crate::optim::Decay::Wsd { decay_steps } = c.schedule.decay
        && decay_steps + c.schedule.warmup_steps > total
    {
        return bad(
            "schedule.decay.decay_steps",
            format!(
                "warmup + decay ({}) exceed the run ({total} steps)",
                decay_steps + c.schedule.warmup_steps
            ),
        );
    }
    if !(0.0..=1.0).contains(&c.parallelism.activation_checkpointing) {
        return bad(
            "parallelism.activation_checkpointing",
            "is a fraction of layers in [0, 1]".into(),
        );
    }
    if c.parallelism.timeout_s == 0 {
        return bad("parallelism.timeout_s", "must be positive".into());
    }
    if c.checkpoint.keep_last == 0 {
        return bad(
            "checkpoint.keep_last",
            "keep at least the newest checkpoint (1)".into(),
        );
    }
    if c.logging.every_steps == 0 {
        return bad("logging.every_steps", "must be positive".into());
    }
    if c.eval.every_steps > 0 && c.eval.datasets.is_empty() {
        return bad(
            "eval.datasets",
            "eval.every_steps is set but no held-out datasets are given".into(),
        );
    }
    if let Some(p) = c.logging.peak_tflops
        && !(p > 0.0)
    {
        return bad("logging.peak_tflops", "must be positive".into());
    }
    c.model_config()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
model: { preset: tiny }
data:
  seq_len: 64
  datasets:
    - { name: a, path: data/a, weight: 1.0 }
training: { global_batch_sequences: 8, micro_batch: 2, steps: 10 }
";

    fn err(text: &str, sets: &[&str]) -> String {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        parse_config(text, &sets).unwrap_err().to_string()
    }

    #[test]
    fn good_config_parses_with_defaults_and_overrides() {
        let c = parse_config(GOOD, &[]).unwrap();
        assert_eq!(c.total_steps(), 10);
        assert_eq!(c.grad_accumulation(2).unwrap(), 2);
        assert_eq!(c.optimizer.betas, (0.9, 0.95));
        let c = parse_config(
            GOOD,
            &[
                "optimizer.lr=1e-4".into(),
                "data.seq_len=32".into(),
                "model.hf.vocab_size=1000".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.optimizer.lr, 1e-4);
        assert_eq!(c.data.seq_len, 32);
        assert_eq!(c.model_config().unwrap().vocab_size, 1000);
    }

    #[test]
    fn every_shipped_config_validates() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut n = 0;
        for dir in [root.clone(), root.join("bench")] {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                if p.extension().is_some_and(|x| x == "yaml") && !text.contains("stages:") {
                    load_config(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
                    n += 1;
                }
            }
        }
        assert!(n >= 5, "found only {n} configs");
    }

    #[test]
    fn bad_configs_name_the_key_and_line() {
        let cases: Vec<(String, Vec<&str>, &str)> = vec![
            (
                GOOD.replace("seq_len: 64", "seq_len: 64\n  colour: red"),
                vec![],
                "colour",
            ),
            (
                GOOD.replace("seq_len: 64", "seq_len: lots"),
                vec![],
                "data.seq_len",
            ),
            (
                GOOD.replace("weight: 1.0", "weight: -1.0"),
                vec![],
                "data.datasets[0].weight",
            ),
            (
                GOOD.replace("steps: 10", "steps: 10, total_tokens: 100"),
                vec![],
                "training.steps",
            ),
            (
                GOOD.replace("global_batch_sequences: 8", "global_batch_tokens: 100"),
                vec![],
                "global_batch_tokens",
            ),
            (
                GOOD.replace("preset: tiny", "preset: huge"),
                vec![],
                "model.preset",
            ),
            (GOOD.to_string(), vec!["optimizer.lr=-1"], "optimizer.lr"),
            (
                GOOD.to_string(),
                vec!["optimizer.betas=[0.9, 1.5]"],
                "optimizer.betas",
            ),
            (
                GOOD.to_string(),
                vec!["schedule.warmup_steps=100"],
                "schedule.warmup_steps",
            ),
            (
                GOOD.to_string(),
                vec!["schedule.final_lr=1.0"],
                "schedule.final_lr",
            ),
            (
                GOOD.to_string(),
                vec!["training.precision=bf16"],
                "training.precision",
            ),
            (
                GOOD.to_string(),
                vec!["parallelism.strategy=zero3"],
                "parallelism.strategy",
            ),
            (
                GOOD.to_string(),
                vec!["parallelism.activation_checkpointing=2"],
                "activation_checkpointing",
            ),
            (
                GOOD.to_string(),
                vec!["training.micro_batch=0"],
                "training.micro_batch",
            ),
            (
                GOOD.to_string(),
                vec!["checkpoint.keep_last=0"],
                "checkpoint.keep_last",
            ),
            (
                GOOD.to_string(),
                vec!["eval.every_steps=5"],
                "eval.datasets",
            ),
            (
                GOOD.to_string(),
                vec!["model.hf.mamba_d_head=7"],
                "mamba_d_head",
            ),
            (GOOD.to_string(), vec!["data.datasets=[]"], "data.datasets"),
            (GOOD.to_string(), vec!["optimizer.lr"], "--set optimizer.lr"),
            (GOOD.to_string(), vec!["optimizer.lr.x=1"], "optimizer.lr"),
            (GOOD.to_string(), vec!["data.seq_len.x=1"], "not a section"),
            ("model: [1, 2\n".to_string(), vec![], "line"),
        ];
        for (text, sets, want) in cases {
            let e = err(&text, &sets);
            assert!(e.contains(want), "expected `{want}` in: {e}");
        }
        let e = err(&GOOD.replace("seq_len: 64", "seq_len: lots"), &[]);
        assert!(e.contains("line 4"), "{e}");
    }

    /// Every key on its own line, so that each error's line is known.
    const FULL: &str = "model:
  preset: tiny
data:
  seq_len: 64
  logical_shards: 12
  datasets:
    - { name: a, path: data/a, weight: 1.0 }
    - name: b
      path: data/b
      weight: 2.0
optimizer:
  lr: 3.0e-4
  betas: [0.9, 0.95]
  eps: 1.0e-8
  weight_decay: 0.1
schedule:
  warmup_steps: 2
  decay: { kind: cosine }
  final_lr: 1.0e-5
training:
  global_batch_sequences: 8
  micro_batch: 2
  steps: 10
  grad_clip: 1.0
parallelism:
  activation_checkpointing: 0.0
  timeout_s: 600
checkpoint:
  keep_last: 3
logging:
  every_steps: 10
  peak_tflops: 989
eval:
  every_steps: 0
";

    /// Every config the repository ships parses and validates as it is.
    #[test]
    fn shipped_configs_validate() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for name in [
            "stage1.yaml",
            "stage2.yaml",
            "tiny.yaml",
            "bench/bamba-1b.yaml",
            "bench/bamba-9b.yaml",
            "test/slurm-ci.yaml",
        ] {
            let path = root.join(name);
            load_config(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }

    #[test]
    fn config_errors_name_key_path_and_line() {
        parse_config(FULL, &[]).unwrap();
        // (replace this, with this, key path in the message, its line)
        let cases: &[(&str, &str, &str, Option<usize>)] = &[
            (
                "logical_shards: 12",
                "logical_shard: 12",
                "data.logical_shard",
                Some(5),
            ),
            ("seq_len: 64", "seq_len: lots", "data.seq_len", Some(4)),
            ("steps: 10", "steps: -10", "training.steps", Some(23)),
            (
                "weight: 1.0",
                "weight: -1.0",
                "data.datasets[0].weight",
                Some(7),
            ),
            (
                "weight: 2.0",
                "weight: 0",
                "data.datasets[1].weight",
                Some(10),
            ),
            ("name: b", "name: a", "data.datasets[1].name", Some(8)),
            ("seq_len: 64", "seq_len: 1", "data.seq_len", Some(4)),
            (
                "logical_shards: 12",
                "logical_shards: 0",
                "data.logical_shards",
                Some(5),
            ),
            (
                "global_batch_sequences: 8",
                "global_batch_tokens: 100",
                "training.global_batch_tokens",
                Some(21),
            ),
            (
                "global_batch_sequences: 8",
                "global_batch_sequences: 0",
                "training.global_batch_sequences",
                Some(21),
            ),
            (
                "micro_batch: 2",
                "micro_batch: 0",
                "training.micro_batch",
                Some(22),
            ),
            ("steps: 10", "steps: 0", "training.steps", Some(23)),
            ("steps: 10", "steps: 1.0e40", "training.steps", Some(23)),
            (
                "grad_clip: 1.0",
                "grad_clip: -1",
                "training.grad_clip",
                Some(24),
            ),
            (
                "grad_clip: 1.0",
                "precision: bf16",
                "training.precision",
                Some(24),
            ),
            (
                "grad_clip: 1.0",
                "precision: fp8",
                "training.precision",
                Some(24),
            ),
            ("lr: 3.0e-4", "lr: 0", "optimizer.lr", Some(12)),
            ("lr: 3.0e-4", "lr: fast", "optimizer.lr", Some(12)),
            (
                "betas: [0.9, 0.95]",
                "betas: [0.9, 1.5]",
                "optimizer.betas",
                Some(13),
            ),
            (
                "betas: [0.9, 0.95]",
                "betas: [0.9]",
                "optimizer.betas",
                Some(13),
            ),
            ("eps: 1.0e-8", "eps: 0", "optimizer.eps", Some(14)),
            (
                "weight_decay: 0.1",
                "weight_decay: -0.1",
                "optimizer.weight_decay",
                Some(15),
            ),
            (
                "warmup_steps: 2",
                "warmup_steps: 20",
                "schedule.warmup_steps",
                Some(17),
            ),
            (
                "{ kind: cosine }",
                "{ kind: exponential }",
                "schedule.decay",
                Some(18),
            ),
            (
                "{ kind: cosine }",
                "{ kind: wsd, decay_steps: 9 }",
                "schedule.decay.decay_steps",
                Some(18),
            ),
            (
                "final_lr: 1.0e-5",
                "final_lr: 1.0",
                "schedule.final_lr",
                Some(19),
            ),
            (
                "activation_checkpointing: 0.0",
                "activation_checkpointing: 1.5",
                "parallelism.activation_checkpointing",
                Some(26),
            ),
            (
                "timeout_s: 600",
                "timeout_s: 0",
                "parallelism.timeout_s",
                Some(27),
            ),
            (
                "keep_last: 3",
                "keep_last: 0",
                "checkpoint.keep_last",
                Some(29),
            ),
            (
                "every_steps: 10",
                "every_steps: 0",
                "logging.every_steps",
                Some(31),
            ),
            (
                "peak_tflops: 989",
                "peak_tflops: -1",
                "logging.peak_tflops",
                Some(32),
            ),
            (
                "eval:\n  every_steps: 0",
                "eval:\n  every_steps: 5",
                "eval.datasets",
                None,
            ),
            ("eval:\n  every_steps: 0", "eval: 7\n", "eval", Some(33)),
            ("preset: tiny", "preset: huge", "model.preset", Some(2)),
            ("preset: tiny", "preset: [tiny]", "model.preset", Some(2)),
        ];
        for (from, to, key, line) in cases {
            assert!(FULL.contains(from), "{from}");
            let e = err(&FULL.replacen(from, to, 1), &[]);
            assert!(e.contains(key), "`{to}`: expected key `{key}` in: {e}");
            match line {
                Some(l) => assert!(
                    e.contains(&format!("(line {l})")),
                    "`{to}`: expected line {l} in: {e}"
                ),
                None => assert!(!e.contains("(line"), "`{to}`: no line expected: {e}"),
            }
        }
        assert!(cases.len() >= 30);

        // Malformed YAML: the parser's line.
        for (from, to, line) in [
            ("betas: [0.9, 0.95]", "betas: [0.9, 0.95", 13),
            ("  eps: 1.0e-8", "\teps: 1.0e-8", 14),
            ("  eps: 1.0e-8", "  lr: 1.0e-8", 12),
        ] {
            let e = err(&FULL.replacen(from, to, 1), &[]);
            assert!(e.contains("line"), "`{to}`: {e}");
            assert!(
                e.contains(&line.to_string()),
                "`{to}`: expected line {line}: {e}"
            );
        }

        // With --set: a bad value names the override; a bad key of the
        // file still gets its line.
        let e = err(FULL, &["optimizer.lr=-1"]);
        assert!(
            e.contains("optimizer.lr") && e.contains("--set optimizer.lr=-1"),
            "{e}"
        );
        let e = err(
            &FULL.replacen("seq_len: 64", "seq_len: lots", 1),
            &["optimizer.lr=1e-4"],
        );
        assert!(e.contains("data.seq_len") && e.contains("(line 4)"), "{e}");
        let e = err(
            &FULL.replacen("keep_last: 3", "keep_last: 0", 1),
            &["optimizer.lr=1e-4"],
        );
        assert!(
            e.contains("checkpoint.keep_last") && e.contains("(line 29)"),
            "{e}"
        );
    }

    #[test]
    fn garbage_configs_are_errors_not_panics() {
        for text in [
            "",
            "---",
            "~",
            "42",
            "[1, 2]",
            "model: {",
            "data:\n  datasets: [{}]",
            "data:\n  datasets: 5",
            "\u{0}\u{1}\u{2}",
            "a: b: c",
            "model: !tag x",
            "data: &a\n  seq_len: *a",
            "training: { steps: 18446744073709551616 }",
            "stages: []",
            ": : :",
            "- - -",
        ] {
            for sets in [vec![], vec!["training.steps=1".to_string()]] {
                assert!(parse_config(text, &sets).is_err(), "{text:?} parsed");
            }
        }
        for bad in ["=1", "a..b=1", "x", "data=[", "optimizer.lr.x=1"] {
            assert!(parse_config(GOOD, &[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_lines_follow_blocks_flows_and_lists() {
        assert_eq!(key_line(FULL, "training.steps"), Some(23));
        assert_eq!(key_line(FULL, "data.datasets[0].weight"), Some(7));
        assert_eq!(key_line(FULL, "data.datasets[1].path"), Some(9));
        assert_eq!(key_line(FULL, "data.datasets[1]"), Some(8));
        assert_eq!(key_line(FULL, "schedule.decay.kind"), Some(18));
        // `steps` under logging is `every_steps`; under eval too: not found.
        assert_eq!(key_line(FULL, "eval.steps"), None);
        assert_eq!(key_line(FULL, "checkpoint.every_steps"), None);
        assert_eq!(key_line(GOOD, "training.micro_batch"), Some(7));
    }
}
