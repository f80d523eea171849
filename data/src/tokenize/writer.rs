//! Writes tokenized documents as parquet shards: one row per document, an
//! `input_ids` list<int32> column (the HF `datasets` layout), zstd, with
//! shard and row-group sizes bounded in tokens so the loader's memory per
//! block and the cost of a lost shard are both bounded.
//!
//! A shard is written under a hidden temporary name and renamed when
//! complete, so a final name always holds a whole file; the temporary file is
//! removed if the writer is dropped before `finish`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, Int32Array, ListArray, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::counts::FileCounts;
use crate::error::{DataError, Result};

#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub column: String,
    /// A shard is closed once it holds this many tokens.
    pub shard_tokens: u64,
    /// A row group is closed once it holds this many tokens.
    pub row_group_tokens: u64,
    pub zstd_level: i32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            column: "input_ids".into(),
            shard_tokens: 256 << 20,
            row_group_tokens: 1 << 20,
            zstd_level: 3,
        }
    }
}

/// Final shard name `i` for outputs named after `stem`.
pub fn shard_name(stem: &str, i: usize) -> String {
    format!("{stem}-{i:05}.parquet")
}

struct OpenShard {
    tmp: PathBuf,
    path: PathBuf,
    writer: ArrowWriter<File>,
    docs: u64,
    tokens: u64,
    groups: Vec<u64>,
    group_docs: u64,
    group_tokens: u64,
}

pub struct ShardWriter {
    dir: PathBuf,
    stem: String,
    opts: WriterOptions,
    schema: Arc<Schema>,
    props: WriterProperties,
    open: Option<OpenShard>,
    /// Documents not yet handed to the parquet writer.
    values: Vec<i32>,
    offsets: Vec<i32>,
    done: Vec<FileCounts>,
}

impl ShardWriter {
    pub fn new(dir: &Path, stem: &str, opts: WriterOptions) -> Result<ShardWriter> {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let level = ZstdLevel::try_new(opts.zstd_level).map_err(|source| DataError::Parquet {
            path: dir.to_path_buf(),
            source,
        })?;
        // Token ids are high-entropy: dictionaries and min/max statistics
        // cost write time and footer space and help neither size nor reads.
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_dictionary_enabled(false)
            .set_statistics_enabled(EnabledStatistics::None)
            .set_max_row_group_row_count(None)
            .set_max_row_group_bytes(None)
            .build();
        let item = Field::new_list_field(DataType::Int32, true);
        let schema = Arc::new(Schema::new(vec![Field::new(
            &opts.column,
            DataType::List(Arc::new(item)),
            true,
        )]));
        Ok(ShardWriter {
            dir: dir.to_path_buf(),
            stem: stem.to_string(),
            opts,
            schema,
            props,
            open: None,
            values: Vec::new(),
            offsets: vec![0],
            done: Vec::new(),
        })
    }

    pub fn push(&mut self, doc: &[u32]) -> Result<()> {
        if self.open.is_none() {
            self.open_shard()?;
        }
        if let Some(&bad) = doc.iter().find(|&&t| t > i32::MAX as u32) {
            return Err(DataError::BadTokens {
                path: self.dir.clone(),
                reason: format!("token id {bad} does not fit the int32 column"),
            });
        }
        self.values.extend(doc.iter().map(|&t| t as i32));
        self.offsets.push(self.values.len() as i32);
        let Some(shard) = self.open.as_mut() else {
            unreachable!("opened above")
        };
        shard.docs += 1;
        shard.tokens += doc.len() as u64;
        shard.group_docs += 1;
        shard.group_tokens += doc.len() as u64;
        if shard.group_tokens >= self.opts.row_group_tokens {
            self.end_group()?;
        }
        if self
            .open
            .as_ref()
            .is_some_and(|s| s.tokens >= self.opts.shard_tokens)
        {
            self.close_shard()?;
        }
        Ok(())
    }

    /// Closes the last shard and returns the counts of every shard written.
    pub fn finish(mut self) -> Result<Vec<FileCounts>> {
        if self.open.is_some() {
            self.close_shard()?;
        }
        Ok(std::mem::take(&mut self.done))
    }

    fn open_shard(&mut self) -> Result<()> {
        let name = shard_name(&self.stem, self.done.len());
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let file = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        let writer = ArrowWriter::try_new(file, self.schema.clone(), Some(self.props.clone()))
            .map_err(|source| DataError::Parquet {
                path: tmp.clone(),
                source,
            })?;
        self.open = Some(OpenShard {
            tmp,
            path,
            writer,
            docs: 0,
            tokens: 0,
            groups: Vec::new(),
            group_docs: 0,
            group_tokens: 0,
        });
        Ok(())
    }

    fn end_group(&mut self) -> Result<()> {
        let Some(shard) = self.open.as_mut() else {
            return Ok(());
        };
        if shard.group_docs == 0 {
            return Ok(());
        }
        let values = Int32Array::from(std::mem::take(&mut self.values));
        let offsets = std::mem::replace(&mut self.offsets, vec![0]);
        let field = Arc::new(Field::new_list_field(DataType::Int32, true));
        let list = ListArray::try_new(
            field,
            arrow_buffer_offsets(offsets),
            Arc::new(values) as ArrayRef,
            None,
        )
        .map_err(|source| DataError::Arrow {
            path: shard.tmp.clone(),
            source,
        })?;
        let batch =
            RecordBatch::try_new(self.schema.clone(), vec![Arc::new(list)]).map_err(|source| {
                DataError::Arrow {
                    path: shard.tmp.clone(),
                    source,
                }
            })?;
        let perr = |source| DataError::Parquet {
            path: shard.tmp.clone(),
            source,
        };
        shard.writer.write(&batch).map_err(perr)?;
        shard.writer.flush().map_err(perr)?;
        shard.groups.push(shard.group_docs);
        shard.group_docs = 0;
        shard.group_tokens = 0;
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        self.end_group()?;
        let Some(shard) = self.open.take() else {
            return Ok(());
        };
        let file = shard.writer.close().map_err(|source| DataError::Parquet {
            path: shard.tmp.clone(),
            source,
        })?;
        drop(file);
        std::fs::rename(&shard.tmp, &shard.path).map_err(|e| DataError::io(&shard.path, e))?;
        let bytes = std::fs::metadata(&shard.path)
            .map_err(|e| DataError::io(&shard.path, e))?
            .len();
        self.done.push(FileCounts {
            file: shard
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes,
            documents: shard.docs,
            tokens: shard.tokens,
            row_groups: shard.groups,
        });
        Ok(())
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if let Some(shard) = self.open.take() {
            let _ = std::fs::remove_file(&shard.tmp);
        }
    }
}

fn arrow_buffer_offsets(offsets: Vec<i32>) -> arrow_buffer::OffsetBuffer<i32> {
    arrow_buffer::OffsetBuffer::new(offsets.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{FileCache, inspect};

    #[test]
    fn writes_bounded_shards_that_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WriterOptions {
            shard_tokens: 100,
            row_group_tokens: 30,
            ..Default::default()
        };
        let mut w = ShardWriter::new(dir.path(), "x", opts).unwrap();
        let docs: Vec<Vec<u32>> = (0..20u32)
            .map(|i| (0..i).map(|t| i * 100 + t).collect())
            .collect();
        for d in &docs {
            w.push(d).unwrap();
        }
        let counts = w.finish().unwrap();
        assert!(counts.len() > 1, "{counts:?}");
        assert_eq!(counts.iter().map(|c| c.tokens).sum::<u64>(), 190);
        let mut next = 0;
        let mut cache = FileCache::default();
        for c in &counts {
            let info = inspect(&dir.path().join(&c.file), "input_ids").unwrap();
            assert_eq!(info.groups, c.row_groups);
            // Metadata counts an empty list as one (null) value.
            assert!(info.tokens >= c.tokens && info.tokens <= c.tokens + c.documents);
            assert!(c.row_groups.len() > 1 || c.documents <= 3);
            for (g, &n) in info.groups.iter().enumerate() {
                let b = cache.read(&info, "input_ids", g, 0, n as usize).unwrap();
                for i in 0..b.len() {
                    assert_eq!(b.doc(i), &docs[next][..]);
                    next += 1;
                }
            }
        }
        assert_eq!(next, 20);
        let hidden = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count();
        assert_eq!(hidden, 0);
    }

    #[test]
    fn dropping_unfinished_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(dir.path(), "x", WriterOptions::default()).unwrap();
        w.push(&[1, 2, 3]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
