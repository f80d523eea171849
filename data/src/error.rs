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

/// An error and its causes on one line, as `{:#}` prints them, but without
/// a cause whose text the line already ends with (errors such as
/// parquet's, and ours that name their source in their own message, would
/// otherwise print it twice). What the command-line tools print.
pub fn report(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::report;

    #[test]
    fn a_report_names_each_cause_once() {
        let inner = std::io::Error::other("Corrupt footer");
        #[derive(Debug, thiserror::Error)]
        #[error("a.parquet: not readable: {source}")]
        struct Named {
            source: std::io::Error,
        }
        let e = anyhow::Error::new(Named { source: inner }).context("dataset `web`");
        assert_eq!(
            report(&e),
            "dataset `web`: a.parquet: not readable: Corrupt footer"
        );
        let plain = anyhow::anyhow!("root").context("outer");
        assert_eq!(report(&plain), "outer: root");
    }
}
