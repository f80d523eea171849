//! Bad input fails before training with an error naming the file and what is
//! wrong; a file that goes bad later fails `next_batch` the same way.

mod common;

use std::fs::File;
use std::sync::Arc;

use arrow_array::{ArrayRef, Int32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use bamba_data::{DataError, DatasetSpec, Loader, LoaderConfig};
use common::*;

fn one(spec_dir: &std::path::Path) -> LoaderConfig {
    common::config(&[DatasetSpec {
        name: "x".into(),
        path: spec_dir.to_path_buf(),
        weight: 1.0,
    }])
}

fn err(cfg: LoaderConfig) -> String {
    match Loader::new(cfg, 0, 1) {
        Ok(_) => panic!("loader accepted bad input"),
        Err(e) => e.to_string(),
    }
}

fn dataset(dir: &std::path::Path) -> std::path::PathBuf {
    let mut next = FIRST_TOKEN;
    write_parquet(dir, &docs(300, 1, &mut next));
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    files.remove(0)
}

#[test]
fn truncated_parquet_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dataset(dir.path());
    let len = std::fs::metadata(&file).unwrap().len();
    File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    // counts.json still has the old size, so the footer is read and fails.
    let e = err(one(dir.path()));
    assert!(
        e.contains(&file.display().to_string()) && e.contains("parquet"),
        "{e}"
    );
}

#[test]
fn corrupt_data_pages_fail_next_batch_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dataset(dir.path());
    let mut bytes = std::fs::read(&file).unwrap();
    // Scribble over the data pages, keep the footer intact.
    let half = bytes.len() / 2;
    for b in &mut bytes[8..half] {
        *b = 0xA5;
    }
    std::fs::write(&file, bytes).unwrap();
    let mut l = Loader::new(one(dir.path()), 0, 1).expect("footer is intact");
    let e = l.next_batch(4).unwrap_err().to_string();
    assert!(e.contains(&file.display().to_string()), "{e}");
    // The loader stays failed instead of going on with a hole in the data.
    assert!(l.next_batch(4).is_err());
}

#[test]
fn missing_column_and_wrong_type_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dataset(dir.path());
    let mut cfg = one(dir.path());
    cfg.column = "tokens".into();
    let e = err(cfg);
    assert!(
        e.contains(&file.display().to_string())
            && e.contains("no column `tokens`")
            && e.contains("input_ids"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("text.parquet");
    let schema = Arc::new(Schema::new(vec![Field::new(
        "input_ids",
        DataType::Utf8,
        false,
    )]));
    let col: ArrayRef = Arc::new(StringArray::from(vec!["a"; 20]));
    let batch = RecordBatch::try_new(schema.clone(), vec![col]).unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(File::create(&path).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let e = err(one(dir.path()));
    assert!(
        e.contains("text.parquet") && e.contains("has type Utf8"),
        "{e}"
    );
}

#[test]
fn empty_or_missing_directories_and_bad_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = err(one(dir.path()));
    assert!(
        e.contains("no .parquet or .arrow files") && e.contains("`x`"),
        "{e}"
    );
    let e = err(one(&dir.path().join("nope")));
    assert!(e.contains("nope") && e.contains("dataset `x`"), "{e}");
    let c = corpus();
    let mut cfg = common::config(&c.specs);
    cfg.datasets[1].weight = -1.0;
    assert!(matches!(Loader::new(cfg, 0, 1), Err(DataError::Weights(_))));
    let cfg = common::config(&c.specs);
    let e = match Loader::new(cfg, 0, 5) {
        Ok(_) => panic!("5 ranks cannot share 12 shards"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("divide"), "{e}");
}

#[test]
fn state_from_another_run_is_refused() {
    let c = corpus();
    let cfg = common::config(&c.specs);
    let l = Loader::new(cfg.clone(), 0, 1).unwrap();
    let state = l.state();
    drop(l);
    let mut other = cfg.clone();
    other.seed += 1;
    let e = match Loader::resume(other, 0, 1, std::slice::from_ref(&state)) {
        Ok(_) => panic!("resumed with another seed"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("seed"), "{e}");
    // Two ranks' states are needed for a 2-rank run; one is not enough.
    let mut half = state;
    half.world = 2;
    assert!(Loader::resume(cfg, 0, 1, &[half]).is_err());
}

/// fms-fsdp's layout: Arrow IPC files, one record batch per document.
#[test]
fn reads_fms_fsdp_arrow_files_every_token_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut next = FIRST_TOKEN;
    let all = docs(200, 5, &mut next);
    let schema = Arc::new(Schema::new(vec![Field::new(
        "tokens",
        DataType::Int32,
        false,
    )]));
    for (f, chunk) in all.chunks(70).enumerate() {
        let path = dir.path().join(format!("sub/part{f}.arrow"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut w =
            arrow_ipc::writer::FileWriter::try_new(File::create(&path).unwrap(), &schema).unwrap();
        for d in chunk {
            let col: ArrayRef = Arc::new(Int32Array::from(
                d.iter().map(|&t| t as i32).collect::<Vec<_>>(),
            ));
            w.write(&RecordBatch::try_new(schema.clone(), vec![col]).unwrap())
                .unwrap();
        }
        w.finish().unwrap();
    }
    let mut cfg = one(dir.path());
    cfg.epochs = Some(1);
    let mut l = Loader::new(cfg, 0, 1).unwrap();
    let mut seen: Vec<u32> = Vec::new();
    while let Ok(b) = l.next_batch(4) {
        seen.extend(b.into_iter().filter(|&t| t >= FIRST_TOKEN));
    }
    seen.sort();
    assert!(
        seen == (FIRST_TOKEN..next).collect::<Vec<_>>(),
        "each token once"
    );
}
