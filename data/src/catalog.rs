//! One sub-dataset as the loader sees it: its files in a fixed order, and
//! those files cut into *blocks*, the unit of reading and of shuffling.
//!
//! A block is a run of consecutive documents inside one parquet row group (or
//! IPC file), at most `block_docs` long. Blocks rather than documents are
//! what logical shards own, because a columnar file is read a row group at a
//! time: fms-fsdp's per-document random walk is cheap on memory-mapped IPC
//! but would decode a whole row group for every document read from parquet.
//! Documents are numbered globally (file order, then row order), which is
//! what the loader state refers to.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;

use crate::config::DatasetSpec;
use crate::counts::Counts;
use crate::error::{DataError, Result};
use crate::source::{DocBlock, FileCache, FileInfo, Format, inspect};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub file: u32,
    pub group: u32,
    /// First row inside the group.
    pub start: u64,
    pub rows: u64,
    /// Global index of the block's first document.
    pub first_doc: u64,
}

#[derive(Debug)]
pub struct Catalog {
    pub name: String,
    pub root: PathBuf,
    pub files: Vec<FileInfo>,
    pub blocks: Vec<Block>,
    /// (first block, block count) of every non-empty row group, file order.
    pub groups: Vec<(u64, u64)>,
    pub documents: u64,
    pub tokens: u64,
    pub block_docs: u64,
}

impl Catalog {
    /// Lists and validates a sub-dataset. Footers are read in parallel; files
    /// described by a fresh `counts.json` entry are not opened at all, except
    /// the first, whose schema is checked so a wrong column fails here.
    pub fn scan(spec: &DatasetSpec, column: &str) -> Result<Catalog> {
        let root = &spec.path;
        let meta = std::fs::metadata(root).map_err(|err| DataError::DatasetPath {
            dataset: spec.name.clone(),
            path: root.clone(),
            err,
        })?;
        if !meta.is_dir() {
            return Err(DataError::NotADirectory {
                dataset: spec.name.clone(),
                path: root.clone(),
            });
        }
        let mut paths = Vec::new();
        walk(root, &mut paths)?;
        paths.sort();
        if paths.is_empty() {
            return Err(DataError::EmptyDataset {
                dataset: spec.name.clone(),
                path: root.clone(),
            });
        }
        let mut counts = std::collections::BTreeMap::new();
        for p in &paths {
            let dir = p.parent().unwrap_or(Path::new("."));
            if !counts.contains_key(dir) {
                counts.insert(dir.to_path_buf(), Counts::read(dir)?);
            }
        }
        let files: Vec<FileInfo> = paths
            .par_iter()
            .enumerate()
            .map(|(i, p)| {
                let dir = p.parent().unwrap_or(Path::new("."));
                let known = counts.get(dir).and_then(|c| c.as_ref()).and_then(|c| {
                    let name = p.file_name()?.to_str()?;
                    let entry = c.files.iter().find(|f| f.file == name)?;
                    let bytes = std::fs::metadata(p).ok()?.len();
                    let fresh = c.column == column
                        && entry.bytes == bytes
                        && Format::of(p) == Some(Format::Parquet)
                        && entry.row_groups.iter().sum::<u64>() == entry.documents;
                    fresh.then(|| FileInfo {
                        path: p.clone(),
                        format: Format::Parquet,
                        bytes,
                        groups: entry.row_groups.clone(),
                        tokens: entry.tokens,
                    })
                });
                match known {
                    Some(info) if i > 0 => Ok(info),
                    _ => inspect(p, column),
                }
            })
            .collect::<Vec<Result<FileInfo>>>()
            .into_iter()
            // The first bad file in path order, so the error is reproducible.
            .collect::<Result<_>>()?;
        let documents = files.iter().map(|f| f.documents()).sum();
        let tokens = files.iter().map(|f| f.tokens).sum();
        if documents == 0 {
            return Err(DataError::EmptyDataset {
                dataset: spec.name.clone(),
                path: root.clone(),
            });
        }
        Ok(Catalog {
            name: spec.name.clone(),
            root: root.clone(),
            files,
            blocks: Vec::new(),
            groups: Vec::new(),
            documents,
            tokens,
            block_docs: 0,
        })
    }

    /// The block size used when a run starts: as many documents as fit in
    /// `block_tokens` on average, but small enough that every logical shard
    /// gets several blocks. A resumed run reuses the saved value instead,
    /// since the block layout defines the document order.
    pub fn default_block_docs(&self, block_tokens: u64, logical_shards: usize) -> u64 {
        let avg = (self.tokens / self.documents).max(1);
        let by_tokens = (block_tokens / avg).max(1);
        let by_shards = self.documents.div_ceil(4 * logical_shards as u64).max(1);
        by_tokens.min(by_shards)
    }

    /// Cuts every group into near-equal blocks of at most `block_docs`.
    pub fn set_block_docs(&mut self, block_docs: u64) {
        let block_docs = block_docs.max(1);
        self.block_docs = block_docs;
        self.blocks.clear();
        self.groups.clear();
        let mut first_doc = 0;
        for (fi, f) in self.files.iter().enumerate() {
            for (gi, &n) in f.groups.iter().enumerate() {
                let k = n.div_ceil(block_docs);
                if k > 0 {
                    self.groups.push((self.blocks.len() as u64, k));
                }
                for i in 0..k {
                    let (a, b) = (n * i / k, n * (i + 1) / k);
                    self.blocks.push(Block {
                        file: fi as u32,
                        group: gi as u32,
                        start: a,
                        rows: b - a,
                        first_doc,
                    });
                    first_doc += b - a;
                }
            }
        }
    }

    /// The block holding global document `doc`, and its row in that block.
    pub fn locate(&self, doc: u64) -> Option<(usize, usize)> {
        if doc >= self.documents {
            return None;
        }
        let i = self.blocks.partition_point(|b| b.first_doc <= doc) - 1;
        Some((i, (doc - self.blocks[i].first_doc) as usize))
    }

    pub fn read_block(
        &self,
        cache: &mut FileCache,
        column: &str,
        block: usize,
    ) -> Result<DocBlock> {
        let b = self.blocks[block];
        let file = &self.files[b.file as usize];
        cache.read(file, column, b.group as usize, b.start, b.rows as usize)
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            // Temporary files of an unfinished `bamba-tokenize` run.
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if Format::of(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

/// The most recently read block of one dataset, shared between the reading
/// stream and re-reads of in-flight documents after a resume.
#[derive(Default)]
pub struct BlockCache {
    files: FileCache,
    last: Option<(usize, Arc<DocBlock>)>,
}

impl BlockCache {
    pub fn get(&mut self, cat: &Catalog, column: &str, block: usize) -> Result<Arc<DocBlock>> {
        if let Some((b, data)) = &self.last
            && *b == block
        {
            return Ok(data.clone());
        }
        let data = Arc::new(cat.read_block(&mut self.files, column, block)?);
        self.last = Some((block, data.clone()));
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cat(groups: &[&[u64]]) -> Catalog {
        let files: Vec<FileInfo> = groups
            .iter()
            .map(|g| FileInfo {
                path: PathBuf::from("x.parquet"),
                format: Format::Parquet,
                bytes: 0,
                groups: g.to_vec(),
                tokens: 0,
            })
            .collect();
        let documents = files.iter().map(|f| f.documents()).sum();
        Catalog {
            name: "x".into(),
            root: PathBuf::new(),
            files,
            blocks: vec![],
            groups: vec![],
            documents,
            tokens: documents * 100,
            block_docs: 0,
        }
    }

    #[test]
    fn blocks_cover_every_document_once() {
        let mut c = cat(&[&[10, 3], &[7]]);
        c.set_block_docs(4);
        let rows: Vec<u64> = c.blocks.iter().map(|b| b.rows).collect();
        assert_eq!(rows, vec![3, 3, 4, 3, 3, 4]);
        assert_eq!(c.blocks.iter().map(|b| b.rows).sum::<u64>(), 20);
        assert_eq!(c.groups, vec![(0, 3), (3, 1), (4, 2)]);
        for doc in 0..20 {
            let (b, r) = c.locate(doc).unwrap();
            assert_eq!(c.blocks[b].first_doc + r as u64, doc);
            assert!((r as u64) < c.blocks[b].rows);
        }
        assert_eq!(c.locate(20), None);
    }

    #[test]
    fn block_size_leaves_several_blocks_per_shard() {
        let c = cat(&[&[1000]]);
        // 100 tokens per doc: 1M tokens would be 10,000 docs, but 12 shards
        // need at least 4 blocks each.
        assert_eq!(c.default_block_docs(1 << 20, 12), 21);
        assert_eq!(c.default_block_docs(1000, 12), 10);
    }
}
