//! The per-directory counts file (`counts.json`) that `bamba-tokenize`
//! writes next to its shards, so a loader over thousands of files learns
//! every file's documents, tokens and row groups from one small read instead
//! of opening every footer on every rank.
//!
//! An entry is trusted only while the file still has the recorded size; a
//! rewritten or truncated file falls back to reading its footer.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

pub const COUNTS_FILE: &str = "counts.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileCounts {
    /// File name, relative to the directory holding `counts.json`.
    pub file: String,
    pub bytes: u64,
    pub documents: u64,
    pub tokens: u64,
    /// Documents per row group, in file order.
    pub row_groups: Vec<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub version: u32,
    /// The token column these counts describe.
    pub column: String,
    pub files: Vec<FileCounts>,
}

impl Counts {
    pub fn documents(&self) -> u64 {
        self.files.iter().map(|f| f.documents).sum()
    }

    pub fn tokens(&self) -> u64 {
        self.files.iter().map(|f| f.tokens).sum()
    }

    /// Reads `dir/counts.json` if there is one.
    pub fn read(dir: &Path) -> Result<Option<Counts>> {
        let path = dir.join(COUNTS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DataError::io(path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| DataError::Counts {
                path,
                reason: e.to_string(),
            })
    }

    /// Writes atomically (temporary name, then rename) so a reader never
    /// sees half a file.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(COUNTS_FILE);
        let tmp = dir.join(format!(".{COUNTS_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).map_err(|e| DataError::Counts {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&tmp, text).map_err(|e| DataError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))
    }

    pub fn by_name(&self) -> BTreeMap<&str, &FileCounts> {
        self.files.iter().map(|f| (f.file.as_str(), f)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reports_bad_json() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Counts::read(dir.path()).unwrap(), None);
        let c = Counts {
            version: 1,
            column: "input_ids".into(),
            files: vec![FileCounts {
                file: "a.parquet".into(),
                bytes: 10,
                documents: 3,
                tokens: 30,
                row_groups: vec![2, 1],
            }],
        };
        c.write(dir.path()).unwrap();
        assert_eq!(Counts::read(dir.path()).unwrap(), Some(c));
        std::fs::write(dir.path().join(COUNTS_FILE), "{").unwrap();
        let e = Counts::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("counts.json"), "{e}");
    }
}
