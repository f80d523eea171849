//! The one error type of the model crate: every message names the file,
//! config field or tensor at fault.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}config field `{field}`: {msg}", file_prefix(.file))]
    Config {
        file: Option<PathBuf>,
        field: String,
        msg: String,
    },
    #[error("{}: {msg}", .path.display())]
    Safetensors { path: PathBuf, msg: String },
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    #[error("{}: tensors missing from the checkpoint: {}", .dir.display(), list(.names))]
    Missing { dir: PathBuf, names: Vec<String> },
    #[error("{}: tensors in the checkpoint that the model does not have: {}", .dir.display(), list(.names))]
    Unexpected { dir: PathBuf, names: Vec<String> },
}

fn file_prefix(file: &Option<PathBuf>) -> String {
    file.as_ref()
        .map(|f| format!("{}: ", f.display()))
        .unwrap_or_default()
}

fn list(names: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Self::Config {
            file: None,
            field: field.into(),
            msg: msg.into(),
        }
    }
    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Self::Tensor {
            name: name.into(),
            msg: msg.into(),
        }
    }
    pub fn safetensors(path: &Path, msg: impl Into<String>) -> Self {
        Self::Safetensors {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
    /// Attaches the file a config error came from.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            Self::Config { field, msg, .. } => Self::Config {
                file: Some(path.to_path_buf()),
                field,
                msg,
            },
            e => e,
        }
    }
}
