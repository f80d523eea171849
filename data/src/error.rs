//! The crate's one error type. Every variant names the file (or dataset, or
//! state) it is about, because the person reading it is about to start a
//! multi-week run and needs to know exactly which input to fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a readable parquet file: {source}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{path}: not a readable Arrow IPC file: {source}")]
    Arrow {
        path: PathBuf,
        #[source]
        source: arrow_schema::ArrowError,
    },
    #[error("{path}: no column `{column}` (columns: {found})")]
    MissingColumn {
        path: PathBuf,
        column: String,
        found: String,
    },
    #[error("{path}: column `{column}` has type {found}, expected {expected}")]
    WrongType {
        path: PathBuf,
        column: String,
        found: String,
        expected: String,
    },
    #[error("{path}: bad token data: {reason}")]
    BadTokens { path: PathBuf, reason: String },
    #[error("dataset `{dataset}`: no .parquet or .arrow files under {path}")]
    EmptyDataset { dataset: String, path: PathBuf },
    #[error("dataset `{dataset}`: {path}: {err}")]
    DatasetPath {
        dataset: String,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("dataset `{dataset}`: {path} is not a directory")]
    NotADirectory { dataset: String, path: PathBuf },
    #[error("dataset weights do not match the sub-datasets: {0}")]
    Weights(String),
    #[error("invalid loader config: {0}")]
    Config(String),
    #[error("{path}: bad counts file: {reason}")]
    Counts { path: PathBuf, reason: String },
    #[error("{0} (--strict makes bad records fatal)")]
    BadInput(String),
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("loader state does not fit this run: {0}")]
    State(String),
    #[error("data exhausted on rank {rank}: every document was read `epochs` times")]
    Exhausted { rank: usize },
    #[error("the loader's background thread stopped: {0}")]
    Worker(String),
}

pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
