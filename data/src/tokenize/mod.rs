//! Raw text to tokenized parquet shards: the engine of `bamba-tokenize`.
//!
//! Files are tokenized in parallel (and the documents of one file too, so a
//! single huge file still uses every core). Each input file becomes one or
//! more bounded shards named after it, then a hidden `.STEM.done.json`
//! marker; a rerun skips inputs whose marker and shards are intact, and
//! finally (re)writes each output directory's `counts.json` from the
//! markers. Shards are renamed into place only when complete.

pub mod input;
pub mod writer;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::counts::{Counts, FileCounts};
use crate::error::{DataError, Result};
use input::{BadRecord, Record, for_each_record, is_input, stem};
use writer::{ShardWriter, WriterOptions};

#[derive(Debug, Clone)]
pub struct TokenizeOptions {
    /// Files, or directories searched recursively (their layout is mirrored).
    pub inputs: Vec<PathBuf>,
    pub output: PathBuf,
    pub tokenizer: PathBuf,
    /// JSON field or parquet column holding the text.
    pub text_field: String,
    pub writer: WriterOptions,
    pub threads: usize,
    pub strict: bool,
    pub progress: bool,
}

/// What a run did, printed by the binary as one JSON line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub files: usize,
    pub skipped: usize,
    pub documents: u64,
    pub tokens: u64,
    pub bad_records: u64,
    pub seconds: f64,
    pub threads: usize,
    /// Tokens per second over the files tokenized in this run.
    pub tokens_per_s: f64,
    pub tokens_per_s_per_core: f64,
}

/// The per-input completion marker.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Done {
    input: String,
    input_bytes: u64,
    bad_records: u64,
    files: Vec<FileCounts>,
}

struct Job {
    input: PathBuf,
    out_dir: PathBuf,
    stem: String,
    bytes: u64,
}

impl Job {
    fn marker(&self) -> PathBuf {
        self.out_dir.join(format!(".{}.done.json", self.stem))
    }

    /// The marker, if this input was finished by an earlier run and its
    /// shards are still what the marker says.
    fn finished(&self) -> Option<Done> {
        let done: Done =
            serde_json::from_str(&std::fs::read_to_string(self.marker()).ok()?).ok()?;
        let intact = done.input_bytes == self.bytes
            && done.files.iter().all(|f| {
                std::fs::metadata(self.out_dir.join(&f.file)).is_ok_and(|m| m.len() == f.bytes)
            });
        intact.then_some(done)
    }
}

fn jobs(opts: &TokenizeOptions) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    for input in &opts.inputs {
        let meta = std::fs::metadata(input).map_err(|e| DataError::io(input, e))?;
        if meta.is_dir() {
            let mut files = Vec::new();
            walk(input, &mut files)?;
            for f in files {
                let rel = f.strip_prefix(input).unwrap_or(&f);
                let out_dir = opts.output.join(rel.parent().unwrap_or(Path::new("")));
                jobs.push((f, out_dir));
            }
        } else {
            jobs.push((input.clone(), opts.output.clone()));
        }
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (input, out_dir) in jobs {
        let stem = stem(&input);
        if !seen.insert((out_dir.clone(), stem.clone())) {
            return Err(DataError::Config(format!(
                "two inputs would both write {}/{stem}-*.parquet (one is {})",
                out_dir.display(),
                input.display()
            )));
        }
        let bytes = std::fs::metadata(&input)
            .map_err(|e| DataError::io(&input, e))?
            .len();
        out.push(Job {
            input,
            out_dir,
            stem,
            bytes,
        });
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| DataError::io(dir, e)))
        .collect::<Result<_>>()?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_input(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Shared progress counters, drawn by one indicatif bar.
struct Progress {
    bar: ProgressBar,
    start: Instant,
    files_total: usize,
    files_done: AtomicU64,
    bytes: Arc<AtomicU64>,
    documents: AtomicU64,
    tokens: AtomicU64,
    bad: AtomicU64,
}

impl Progress {
    fn refresh(&self) {
        let tokens = self.tokens.load(Ordering::Relaxed);
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_position(self.bytes.load(Ordering::Relaxed));
        self.bar.set_message(format!(
            "files {}/{} | {} docs | {:.2}M tokens | {:.2}M tok/s",
            self.files_done.load(Ordering::Relaxed),
            self.files_total,
            self.documents.load(Ordering::Relaxed),
            tokens as f64 / 1e6,
            tokens as f64 / secs / 1e6
        ));
    }

    fn report_bad(&self, b: &BadRecord) {
        let n = self.bad.fetch_add(1, Ordering::Relaxed);
        if n < 20 {
            self.bar.println(format!("bad record: {b}"));
        } else if n == 20 {
            self.bar
                .println("bad record: (more not shown; see the summary count)");
        }
    }
}

pub fn run(opts: &TokenizeOptions) -> Result<Summary> {
    let tokenizer = Tokenizer::from_file(&opts.tokenizer).map_err(|e| DataError::Tokenizer {
        path: opts.tokenizer.clone(),
        reason: e.to_string(),
    })?;
    let mut jobs = jobs(opts)?;
    // Largest first so the last file to finish is a small one.
    jobs.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.input.cmp(&b.input)));
    let (done, todo): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|j| j.finished().is_some());
    let total: u64 = todo.iter().map(|j| j.bytes).sum();
    let bar = if opts.progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} ETA {eta} | {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let progress = Progress {
        bar,
        start: Instant::now(),
        files_total: todo.len(),
        files_done: AtomicU64::new(0),
        bytes: Arc::new(AtomicU64::new(0)),
        documents: AtomicU64::new(0),
        tokens: AtomicU64::new(0),
        bad: AtomicU64::new(0),
    };
    let threads = opts.threads.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| DataError::Config(format!("cannot start {threads} threads: {e}")))?;
    let first_error = Mutex::new(None);
    pool.install(|| {
        todo.par_iter().for_each(|job| {
            if first_error.lock().map(|e| e.is_some()).unwrap_or(true) {
                return;
            }
            if let Err(e) = tokenize_file(job, opts, &tokenizer, &progress)
                && let Ok(mut slot) = first_error.lock()
            {
                slot.get_or_insert(e);
            }
        })
    });
    progress.refresh();
    progress.bar.finish_and_clear();
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    let dirs: BTreeSet<PathBuf> = done
        .iter()
        .chain(&todo)
        .map(|j| j.out_dir.clone())
        .collect();
    for dir in dirs {
        write_counts(&dir, &opts.writer.column)?;
    }
    let seconds = progress.start.elapsed().as_secs_f64();
    let tokens = progress.tokens.load(Ordering::Relaxed);
    let tps = tokens as f64 / seconds.max(1e-9);
    Ok(Summary {
        files: todo.len(),
        skipped: done.len(),
        documents: progress.documents.load(Ordering::Relaxed),
        tokens,
        bad_records: progress.bad.load(Ordering::Relaxed),
        seconds,
        threads,
        tokens_per_s: tps,
        tokens_per_s_per_core: tps / threads as f64,
    })
}

/// Documents tokenized together: enough to keep every core busy on one file.
const CHUNK_DOCS: usize = 4096;
const CHUNK_BYTES: usize = 8 << 20;

fn tokenize_file(job: &Job, opts: &TokenizeOptions, tok: &Tokenizer, p: &Progress) -> Result<()> {
    let mut w = ShardWriter::new(&job.out_dir, &job.stem, opts.writer.clone())?;
    let mut chunk: Vec<String> = Vec::new();
    let mut chunk_bytes = 0;
    let mut bad = 0u64;
    let flush = |chunk: &mut Vec<String>, w: &mut ShardWriter| -> Result<()> {
        let encoded: Vec<_> = chunk
            .par_iter()
            .map(|t| tok.encode_fast(t.as_str(), false))
            .collect();
        for e in encoded {
            let e = e.map_err(|e| DataError::Tokenizer {
                path: job.input.clone(),
                reason: e.to_string(),
            })?;
            let ids = e.get_ids();
            if ids.is_empty() {
                continue;
            }
            w.push(ids)?;
            p.documents.fetch_add(1, Ordering::Relaxed);
            p.tokens.fetch_add(ids.len() as u64, Ordering::Relaxed);
        }
        chunk.clear();
        p.refresh();
        Ok(())
    };
    for_each_record(&job.input, &opts.text_field, p.bytes.clone(), |rec| {
        match rec {
            Record::Text(t) => {
                chunk_bytes += t.len();
                chunk.push(t);
                if chunk.len() >= CHUNK_DOCS || chunk_bytes >= CHUNK_BYTES {
                    flush(&mut chunk, &mut w)?;
                    chunk_bytes = 0;
                }
            }
            Record::Bad(b) if opts.strict => return Err(DataError::BadInput(b.to_string())),
            Record::Bad(b) => {
                bad += 1;
                p.report_bad(&b);
            }
        }
        Ok(())
    })?;
    flush(&mut chunk, &mut w)?;
    let files = w.finish()?;
    let done = Done {
        input: job.input.display().to_string(),
        input_bytes: job.bytes,
        bad_records: bad,
        files,
    };
    let marker = job.marker();
    let tmp = job.out_dir.join(format!(".{}.done.json.tmp", job.stem));
    let text = serde_json::to_string_pretty(&done).map_err(|e| DataError::Config(e.to_string()))?;
    std::fs::write(&tmp, text).map_err(|e| DataError::io(&tmp, e))?;
    std::fs::rename(&tmp, &marker).map_err(|e| DataError::io(&marker, e))?;
    p.files_done.fetch_add(1, Ordering::Relaxed);
    p.refresh();
    Ok(())
}

/// Rebuilds `dir/counts.json` from the markers of every input written there.
fn write_counts(dir: &Path, column: &str) -> Result<()> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') && name.ends_with(".done.json") {
            let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
            let done: Done = serde_json::from_str(&text).map_err(|e| DataError::Counts {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            for f in done.files {
                files.insert(f.file.clone(), f);
            }
        }
    }
    Counts {
        version: 1,
        column: column.to_string(),
        files: files.into_values().collect(),
    }
    .write(dir)
}
