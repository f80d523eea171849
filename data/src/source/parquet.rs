//! Parquet with one row per document and a list column of token ids: what
//! `bamba-tokenize` writes and what HF `datasets` saves (`input_ids`).
//!
//! Reads go one row range of one row group at a time with a projection on the
//! token column, so memory is bounded by a block, never by the file.

use std::fs::File;
use std::path::Path;

use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection,
    RowSelector,
};

use super::{DocBlock, FileInfo, Format, TOKEN_TYPES, is_token_type, push_tokens};
use crate::error::{DataError, Result};

/// A file kept open between blocks, with its parsed footer.
pub struct OpenFile {
    path: std::path::PathBuf,
    file: File,
    meta: ArrowReaderMetadata,
    mask: ProjectionMask,
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
    let Some(f) = cache.as_ref() else {
        unreachable!("cache filled above")
    };
    let perr = |source| DataError::Parquet {
        path: info.path.clone(),
        source,
    };
    let file = f
        .file
        .try_clone()
        .map_err(|e| DataError::io(&info.path, e))?;
    let mut selectors = Vec::with_capacity(2);
    if start > 0 {
        selectors.push(RowSelector::skip(start as usize));
    }
    selectors.push(RowSelector::select(rows));
    let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(file, f.meta.clone())
        .with_projection(f.mask.clone())
        .with_row_groups(vec![group])
        .with_row_selection(RowSelection::from(selectors))
        .with_batch_size(rows.max(1))
        .build()
        .map_err(perr)?;
    let mut block = DocBlock::new();
    for batch in reader {
        let batch = batch.map_err(|source| DataError::Arrow {
            path: info.path.clone(),
            source,
        })?;
        let col = batch.column(0);
        match col.data_type() {
            DataType::List(_) => append_list(&mut block, col.as_list::<i32>(), &info.path)?,
            DataType::LargeList(_) => append_list(&mut block, col.as_list::<i64>(), &info.path)?,
            other => {
                return Err(DataError::WrongType {
                    path: info.path.clone(),
                    column: column.to_string(),
                    found: other.to_string(),
                    expected: format!("list of {TOKEN_TYPES}"),
                });
            }
        }
    }
    Ok(block)
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
