//! Parquet with one row per document and a list column of token ids: what
//! `bamba-tokenize` writes and what HF `datasets` saves (`input_ids`).
//!
//! Reads go one row range of one row group at a time with a projection on the
//! token column, so memory is bounded by a block, never by the file. The
//! loader asks for the blocks of a row group in ascending order, so the
//! decoder is kept open and continues where the last block ended: skipping
//! rows in a list column means decoding them, and restarting for every block
//! made reads quadratic in the row-group size.

use std::fs::File;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder, RowSelection, RowSelector,
};

use super::{DocBlock, FileInfo, Format, TOKEN_TYPES, is_token_type, push_tokens};
use crate::error::{DataError, Result};

/// A file kept open between blocks, with its parsed footer.
pub struct OpenFile {
    path: std::path::PathBuf,
    file: File,
    meta: ArrowReaderMetadata,
    mask: ProjectionMask,
    stream: Option<Stream>,
}

/// A decoder positioned inside one row group.
struct Stream {
    group: usize,
    next_row: u64,
    reader: ParquetRecordBatchReader,
    /// Rows decoded but not yet handed out.
    pending: Option<ArrayRef>,
}

fn open(path: &Path, column: &str) -> Result<(OpenFile, usize)> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).map_err(|source| {
        DataError::Parquet {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let schema = meta.schema();
    let Some((root, field)) = schema.fields().find(column) else {
        let found = schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(DataError::MissingColumn {
            path: path.to_path_buf(),
            column: column.to_string(),
            found,
        });
    };
    let ok = match field.data_type() {
        DataType::List(item) | DataType::LargeList(item) => is_token_type(item.data_type()),
        _ => false,
    };
    if !ok {
        return Err(DataError::WrongType {
            path: path.to_path_buf(),
            column: column.to_string(),
            found: field.data_type().to_string(),
            expected: format!("list or large_list of {TOKEN_TYPES}"),
        });
    }
    let mask = ProjectionMask::roots(meta.parquet_schema(), [root]);
    Ok((
        OpenFile {
            path: path.to_path_buf(),
            file,
            meta,
            mask,
            stream: None,
        },
        root,
    ))
}

pub fn inspect(path: &Path, column: &str) -> Result<FileInfo> {
    let (f, root) = open(path, column)?;
    let md = f.meta.metadata();
    let descr = md.file_metadata().schema_descr();
    // The token column is the single leaf under the root we matched.
    let leaf = (0..descr.num_columns()).find(|&i| descr.get_column_root_idx(i) == root);
    let mut groups = Vec::with_capacity(md.num_row_groups());
    let mut tokens = 0u64;
    for rg in md.row_groups() {
        groups.push(rg.num_rows().max(0) as u64);
        if let Some(leaf) = leaf {
            tokens += rg.column(leaf).num_values().max(0) as u64;
        }
    }
    let bytes = f.file.metadata().map_err(|e| DataError::io(path, e))?.len();
    Ok(FileInfo {
        path: path.to_path_buf(),
        format: Format::Parquet,
        bytes,
        groups,
        tokens,
    })
}

pub fn read(
    cache: &mut Option<OpenFile>,
    info: &FileInfo,
    column: &str,
    group: usize,
    start: u64,
    rows: usize,
) -> Result<DocBlock> {
    if cache.as_ref().map(|f| f.path != info.path).unwrap_or(true) {
        *cache = Some(open(&info.path, column)?.0);
    }
    let Some(f) = cache.as_mut() else {
        unreachable!("cache filled above")
    };
    let resume = f
        .stream
        .as_ref()
        .is_some_and(|s| s.group == group && s.next_row == start);
    if !resume {
        let group_rows = info.groups.get(group).copied().unwrap_or(0);
        f.stream = Some(Stream {
            group,
            next_row: start,
            reader: open_stream(
                f,
                info,
                group,
                start,
                group_rows.saturating_sub(start),
                rows,
            )?,
            pending: None,
        });
    }
    let Some(stream) = f.stream.as_mut() else {
        unreachable!("stream opened above")
    };
    let mut block = DocBlock::new();
    let mut left = rows;
    while left > 0 {
        let batch = match stream.pending.take() {
            Some(b) => b,
            None => match stream.reader.next() {
                Some(b) => b
                    .map_err(|source| DataError::Arrow {
                        path: info.path.clone(),
                        source,
                    })?
                    .column(0)
                    .clone(),
                None => break,
            },
        };
        let take = left.min(batch.len());
        append(&mut block, &batch.slice(0, take), &info.path, column)?;
        if take < batch.len() {
            stream.pending = Some(batch.slice(take, batch.len() - take));
        }
        left -= take;
    }
    stream.next_row = start + (rows - left) as u64;
    Ok(block)
}

fn open_stream(
    f: &OpenFile,
    info: &FileInfo,
    group: usize,
    start: u64,
    rest: u64,
    batch: usize,
) -> Result<ParquetRecordBatchReader> {
    let file = f
        .file
        .try_clone()
        .map_err(|e| DataError::io(&info.path, e))?;
    let mut selectors = Vec::with_capacity(2);
    if start > 0 {
        selectors.push(RowSelector::skip(start as usize));
    }
    selectors.push(RowSelector::select(rest as usize));
    ParquetRecordBatchReaderBuilder::new_with_metadata(file, f.meta.clone())
        .with_projection(f.mask.clone())
        .with_row_groups(vec![group])
        .with_row_selection(RowSelection::from(selectors))
        .with_batch_size(batch.max(1))
        .build()
        .map_err(|source| DataError::Parquet {
            path: info.path.clone(),
            source,
        })
}

fn append(block: &mut DocBlock, col: &ArrayRef, path: &Path, column: &str) -> Result<()> {
    match col.data_type() {
        DataType::List(_) => append_list(block, col.as_list::<i32>(), path),
        DataType::LargeList(_) => append_list(block, col.as_list::<i64>(), path),
        other => Err(DataError::WrongType {
            path: path.to_path_buf(),
            column: column.to_string(),
            found: other.to_string(),
            expected: format!("list of {TOKEN_TYPES}"),
        }),
    }
}

fn append_list<O: arrow_array::OffsetSizeTrait>(
    block: &mut DocBlock,
    list: &arrow_array::GenericListArray<O>,
    path: &Path,
) -> Result<()> {
    let offs = list.value_offsets();
    let (first, last) = (offs[0].as_usize(), offs[offs.len() - 1].as_usize());
    let base = block.tokens.len();
    push_tokens(
        &mut block.tokens,
        &list.values().slice(first, last - first),
        path,
    )?;
    // A null document has equal offsets, so it reads as an empty one.
    block
        .offsets
        .extend(offs[1..].iter().map(|o| base + o.as_usize() - first));
    Ok(())
}
