//! Raw text documents out of Dolma-style JSONL (plain or gzipped) and
//! parquet files with a text column, with bad records reported by file and
//! line (or row) instead of silently dropped.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::{DataError, Result};

/// A record that could not be turned into a document.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRecord {
    pub path: PathBuf,
    /// 1-based line for JSONL, 1-based row for parquet.
    pub line: u64,
    pub reason: String,
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.reason)
    }
}

pub enum Record {
    Text(String),
    Bad(BadRecord),
}

/// Whether a path is an input this tool reads.
pub fn is_input(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    [".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// The file name without its input extensions: `en_0001.json.gz` -> `en_0001`.
pub fn stem(path: &Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("input");
    for ext in [".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet"] {
        if let Some(s) = name.strip_suffix(ext) {
            return s.to_string();
        }
    }
    name.to_string()
}

/// Counts the raw (possibly compressed) bytes read, for the progress bar.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Calls `each` for every record of `path`, in order; stops at the first
/// error `each` returns.
pub fn for_each_record(
    path: &Path,
    field: &str,
    bytes_read: Arc<AtomicU64>,
    mut each: impl FnMut(Record) -> Result<()>,
) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.ends_with(".parquet") {
        let r = parquet_records(path, field, &mut each);
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        bytes_read.fetch_add(len, Ordering::Relaxed);
        return r;
    }
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let counted = Counting {
        inner: file,
        read: bytes_read,
    };
    let reader: Box<dyn BufRead> = if name.ends_with(".gz") {
        Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, counted)),
        ))
    } else {
        Box::new(BufReader::with_capacity(1 << 20, counted))
    };
    let bad = |line: u64, reason: String| {
        Record::Bad(BadRecord {
            path: path.to_path_buf(),
            line,
            reason,
        })
    };
    for (i, line) in reader.lines().enumerate() {
        let n = i as u64 + 1;
        let line = match line {
            Ok(l) => l,
            // A truncated gzip stream or invalid UTF-8: the rest of the file
            // cannot be trusted, so this is an error, not a skipped line.
            Err(e) => {
                return Err(DataError::io(
                    path,
                    std::io::Error::new(e.kind(), format!("line {n}: {e}")),
                ));
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let rec = match serde_json::from_str::<serde_json::Value>(&line) {
            Err(e) => bad(n, format!("not JSON: {e}")),
            Ok(serde_json::Value::Object(mut m)) => match m.remove(field) {
                Some(serde_json::Value::String(s)) => Record::Text(s),
                Some(other) => bad(
                    n,
                    format!("field `{field}` is not a string but {}", kind(&other)),
                ),
                None => bad(n, format!("no field `{field}`")),
            },
            Ok(other) => bad(n, format!("not a JSON object but {}", kind(&other))),
        };
        each(rec)?;
    }
    Ok(())
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn parquet_records(
    path: &Path,
    field: &str,
    each: &mut impl FnMut(Record) -> Result<()>,
) -> Result<()> {
    let perr = |source| DataError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(perr)?;
    let schema = builder.schema().clone();
    let Some((idx, f)) = schema.fields().find(field) else {
        return Err(DataError::MissingColumn {
            path: path.to_path_buf(),
            column: field.to_string(),
            found: schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    if !matches!(
        f.data_type(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    ) {
        return Err(DataError::WrongType {
            path: path.to_path_buf(),
            column: field.to_string(),
            found: f.data_type().to_string(),
            expected: "string".into(),
        });
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), [idx]);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(1024)
        .build()
        .map_err(perr)?;
    let mut row = 0u64;
    for batch in reader {
        let batch = batch.map_err(|source| DataError::Arrow {
            path: path.to_path_buf(),
            source,
        })?;
        let col = batch.column(0);
        let texts: Box<dyn Iterator<Item = Option<&str>>> = match col.data_type() {
            DataType::Utf8 => Box::new(col.as_string::<i32>().iter()),
            DataType::LargeUtf8 => Box::new(col.as_string::<i64>().iter()),
            _ => Box::new(col.as_string_view().iter()),
        };
        for t in texts {
            row += 1;
            each(match t {
                Some(s) => Record::Text(s.to_string()),
                None => Record::Bad(BadRecord {
                    path: path.to_path_buf(),
                    line: row,
                    reason: format!("`{field}` is null"),
                }),
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_jsonl_and_gz_and_reports_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let body =
            "{\"text\": \"a\"}\nnot json\n\n{\"id\": 1}\n{\"text\": 3}\n[1]\n{\"text\": \"b\"}\n";
        let plain = dir.path().join("x.jsonl");
        std::fs::write(&plain, body).unwrap();
        let gz = dir.path().join("y.jsonl.gz");
        let mut enc =
            flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        enc.write_all(body.as_bytes()).unwrap();
        enc.finish().unwrap();
        for p in [plain, gz] {
            let (mut texts, mut bad) = (vec![], vec![]);
            let read = Arc::new(AtomicU64::new(0));
            for_each_record(&p, "text", read.clone(), |r| {
                match r {
                    Record::Text(t) => texts.push(t),
                    Record::Bad(b) => bad.push(b),
                }
                Ok(())
            })
            .unwrap();
            assert_eq!(texts, vec!["a", "b"]);
            let lines: Vec<u64> = bad.iter().map(|b| b.line).collect();
            assert_eq!(lines, vec![2, 4, 5, 6]);
            assert!(bad[1].to_string().contains("no field `text`"), "{}", bad[1]);
            assert!(read.load(Ordering::Relaxed) > 0);
        }
        assert_eq!(stem(Path::new("a/en_01.json.gz")), "en_01");
        assert!(is_input(Path::new("x.jsonl.gz")) && !is_input(Path::new("x.txt")));
    }
}
