//! Reading tokenized documents from disk, whatever the container.
//!
//! The loader only ever needs three things from a file: how many documents it
//! holds (grouped the way the file can be read efficiently: parquet row
//! groups), an estimate of its tokens (to size read blocks), and the tokens of
//! a contiguous run of documents. Everything format specific stays behind
//! these functions so the sharding and resume logic never sees parquet or IPC.

pub mod arrow_ipc;
pub mod parquet;

use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;

use crate::error::{DataError, Result};

/// The two on-disk layouts we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One row per document, a list column of token ids (HF datasets, bamba-tokenize).
    Parquet,
    /// fms-fsdp: one record batch per document, a flat token column.
    ArrowIpc,
}

impl Format {
    pub fn of(path: &Path) -> Option<Format> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("parquet") => Some(Format::Parquet),
            Some("arrow") | Some("arrows") | Some("ipc") => Some(Format::ArrowIpc),
            _ => None,
        }
    }
}

/// What the loader knows about one file without reading its data.
#[derive(Debug, Clone)]
pub struct FileInfo {
    pub path: PathBuf,
    pub format: Format,
    pub bytes: u64,
    /// Documents per independently readable group (parquet row group; the
    /// whole file for IPC, where any document is one seek away).
    pub groups: Vec<u64>,
    /// Exact from a counts file; from parquet metadata it also counts each
    /// empty document as one; estimated from the file size for IPC. Only
    /// used to size read blocks.
    pub tokens: u64,
}

impl FileInfo {
    pub fn documents(&self) -> u64 {
        self.groups.iter().sum()
    }
}

/// A run of consecutive documents, decoded. Tokens are kept flat (one
/// allocation per block, not per document) because the packer copies slices.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DocBlock {
    pub tokens: Vec<u32>,
    /// `offsets[i]..offsets[i + 1]` are document i's tokens.
    pub offsets: Vec<usize>,
}

impl DocBlock {
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn doc(&self, i: usize) -> &[u32] {
        &self.tokens[self.offsets[i]..self.offsets[i + 1]]
    }

    fn new() -> DocBlock {
        DocBlock {
            tokens: Vec::new(),
            offsets: vec![0],
        }
    }

    fn close_doc(&mut self) {
        self.offsets.push(self.tokens.len());
    }
}

/// Reads footers and schemas: the cheap part, done for every file before
/// training so a bad file fails the run at startup, not in week three.
pub fn inspect(path: &Path, column: &str) -> Result<FileInfo> {
    match Format::of(path) {
        Some(Format::Parquet) => parquet::inspect(path, column),
        Some(Format::ArrowIpc) => arrow_ipc::inspect(path, column),
        None => Err(DataError::BadTokens {
            path: path.to_path_buf(),
            reason: "unknown file extension (expected .parquet or .arrow)".into(),
        }),
    }
}

/// Keeps the last opened file of a dataset so consecutive blocks of one file
/// do not re-parse its footer.
#[derive(Default)]
pub struct FileCache {
    parquet: Option<parquet::OpenFile>,
    ipc: Option<arrow_ipc::OpenFile>,
}

impl FileCache {
    /// Documents `start .. start + rows` of group `group` of `file`.
    pub fn read(
        &mut self,
        file: &FileInfo,
        column: &str,
        group: usize,
        start: u64,
        rows: usize,
    ) -> Result<DocBlock> {
        let block = match file.format {
            Format::Parquet => parquet::read(&mut self.parquet, file, column, group, start, rows)?,
            Format::ArrowIpc => arrow_ipc::read(&mut self.ipc, file, column, start, rows)?,
        };
        if block.len() != rows {
            return Err(DataError::BadTokens {
                path: file.path.clone(),
                reason: format!(
                    "group {group} should hold rows {start}..{} but {} came back",
                    start + rows as u64,
                    block.len()
                ),
            });
        }
        Ok(block)
    }
}

/// Whether `dt` can hold token ids, for the error messages.
pub(crate) fn is_token_type(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::Int32 | DataType::UInt32 | DataType::Int64 | DataType::UInt64
    )
}

pub(crate) const TOKEN_TYPES: &str = "int32, uint32, int64 or uint64";

/// Appends a flat array of token ids, rejecting ids a u32 cannot hold.
pub(crate) fn push_tokens(out: &mut Vec<u32>, values: &ArrayRef, path: &Path) -> Result<()> {
    let bad = |reason: String| DataError::BadTokens {
        path: path.to_path_buf(),
        reason,
    };
    if values.null_count() > 0 {
        return Err(bad(format!("{} null token ids", values.null_count())));
    }
    match values.data_type() {
        DataType::UInt32 => out.extend_from_slice(values.as_primitive::<UInt32Type>().values()),
        DataType::Int32 => {
            let v = values.as_primitive::<Int32Type>().values();
            // One pass to validate, one to copy: both vectorise, and a negative
            // id silently wrapping to 4 billion would poison the embedding.
            if let Some(x) = v.iter().find(|&&x| x < 0) {
                return Err(bad(format!("negative token id {x}")));
            }
            out.extend(v.iter().map(|&x| x as u32));
        }
        DataType::Int64 => {
            let v = values.as_primitive::<Int64Type>().values();
            if let Some(x) = v.iter().find(|&&x| !(0..=u32::MAX as i64).contains(&x)) {
                return Err(bad(format!("token id {x} does not fit in u32")));
            }
            out.extend(v.iter().map(|&x| x as u32));
        }
        DataType::UInt64 => {
            let v = values.as_primitive::<UInt64Type>().values();
            if let Some(x) = v.iter().find(|&&x| x > u32::MAX as u64) {
                return Err(bad(format!("token id {x} does not fit in u32")));
            }
            out.extend(v.iter().map(|&x| x as u32));
        }
        other => return Err(bad(format!("token type {other}, expected {TOKEN_TYPES}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int32Array, Int64Array};
    use std::sync::Arc;

    #[test]
    fn rejects_negative_and_oversized_ids() {
        let mut out = Vec::new();
        let p = Path::new("x.parquet");
        let ok: ArrayRef = Arc::new(Int32Array::from(vec![1, 2, 3]));
        push_tokens(&mut out, &ok, p).unwrap();
        assert_eq!(out, vec![1, 2, 3]);
        let neg: ArrayRef = Arc::new(Int32Array::from(vec![1, -2]));
        let e = push_tokens(&mut out, &neg, p).unwrap_err().to_string();
        assert!(e.contains("x.parquet") && e.contains("negative"), "{e}");
        let big: ArrayRef = Arc::new(Int64Array::from(vec![1i64 << 40]));
        assert!(push_tokens(&mut out, &big, p).is_err());
    }
}
