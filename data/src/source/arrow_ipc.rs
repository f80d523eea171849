//! fms-fsdp's layout: an Arrow IPC file holding one record batch per
//! document, each with a flat column of token ids (`tokens`).
//!
//! Every batch is one footer lookup and one seek away, so the whole file is a
//! single readable group and a block is any run of batch indices.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use arrow_ipc::reader::FileReader;

use super::{DocBlock, FileInfo, Format, TOKEN_TYPES, is_token_type, push_tokens};
use crate::error::{DataError, Result};

/// fms-fsdp's column name, used when the configured one is absent so the same
/// config reads both layouts.
pub const FMS_COLUMN: &str = "tokens";

pub struct OpenFile {
    path: PathBuf,
    reader: FileReader<BufReader<File>>,
}

fn open(path: &Path, column: &str) -> Result<OpenFile> {
    let aerr = |source| DataError::Arrow {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let probe = FileReader::try_new_buffered(file, None).map_err(aerr)?;
    let schema = probe.schema();
    let idx = schema
        .index_of(column)
        .or_else(|_| schema.index_of(FMS_COLUMN))
        .map_err(|_| DataError::MissingColumn {
            path: path.to_path_buf(),
            column: format!("{column}` or `{FMS_COLUMN}"),
            found: schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let field = schema.field(idx);
    if !is_token_type(field.data_type()) {
        return Err(DataError::WrongType {
            path: path.to_path_buf(),
            column: field.name().clone(),
            found: field.data_type().to_string(),
            expected: TOKEN_TYPES.to_string(),
        });
    }
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = FileReader::try_new_buffered(file, Some(vec![idx])).map_err(aerr)?;
    Ok(OpenFile {
        path: path.to_path_buf(),
        reader,
    })
}

pub fn inspect(path: &Path, column: &str) -> Result<FileInfo> {
    let f = open(path, column)?;
    let bytes = std::fs::metadata(path)
        .map_err(|e| DataError::io(path, e))?
        .len();
    let docs = f.reader.num_batches() as u64;
    let width = match f.reader.schema().field(0).data_type().primitive_width() {
        Some(w) => w as u64,
        None => 4,
    };
    Ok(FileInfo {
        path: path.to_path_buf(),
        format: Format::ArrowIpc,
        bytes,
        groups: vec![docs],
        tokens: bytes / width,
    })
}

pub fn read(
    cache: &mut Option<OpenFile>,
    info: &FileInfo,
    column: &str,
    start: u64,
    rows: usize,
) -> Result<DocBlock> {
    if cache.as_ref().map(|f| f.path != info.path).unwrap_or(true) {
        *cache = Some(open(&info.path, column)?);
    }
    let Some(f) = cache.as_mut() else {
        unreachable!("cache filled above")
    };
    let aerr = |source| DataError::Arrow {
        path: info.path.clone(),
        source,
    };
    f.reader.set_index(start as usize).map_err(aerr)?;
    let mut block = DocBlock::new();
    for _ in 0..rows {
        let batch = match f.reader.next() {
            Some(b) => b.map_err(aerr)?,
            None => break,
        };
        push_tokens(&mut block.tokens, batch.column(0), &info.path)?;
        block.close_doc();
    }
    Ok(block)
}
