//! `bamba-tokenize` end to end with the real Llama-3 tokenizer, and the
//! shipped corpus. Needs the tokenizer that scripts/data/fetch_tokenizer.sh
//! downloads: these tests fail (they do not skip) when it is absent.

use std::io::Write;
use std::path::{Path, PathBuf};

use bamba_data::counts::Counts;
use bamba_data::tokenize::writer::WriterOptions;
use bamba_data::tokenize::{TokenizeOptions, run};
use bamba_data::{DatasetSpec, Loader, LoaderConfig};
use tokenizers::Tokenizer;

fn tokenizer_path() -> PathBuf {
    let p = std::env::var_os("BAMBA_TOKENIZER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tokenizer/tokenizer.json")
        });
    assert!(
        p.is_file(),
        "{} is missing: run scripts/data/fetch_tokenizer.sh (or set BAMBA_TOKENIZER)",
        p.display()
    );
    p
}

fn opts(inputs: Vec<PathBuf>, output: &Path, strict: bool) -> TokenizeOptions {
    TokenizeOptions {
        inputs,
        output: output.to_path_buf(),
        tokenizer: tokenizer_path(),
        text_field: "text".into(),
        writer: WriterOptions {
            shard_tokens: 30,
            row_group_tokens: 12,
            ..Default::default()
        },
        threads: 2,
        strict,
        progress: false,
    }
}

const TEXTS: [&str; 4] = [
    "Hello world",
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer\nThe slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles, and by opposing end them.",
];

/// raw/a/x.jsonl (with one bad line), raw/b/y.jsonl.gz
fn inputs(root: &Path) {
    std::fs::create_dir_all(root.join("a")).unwrap();
    std::fs::create_dir_all(root.join("b")).unwrap();
    let mut body = String::new();
    for (i, t) in TEXTS.iter().enumerate() {
        body += &serde_json::json!({ "text": t, "id": i }).to_string();
        body += "\n";
        if i == 1 {
            body += "{\"id\": 99}\n";
        }
    }
    std::fs::write(root.join("a/x.jsonl"), &body).unwrap();
    let gz = std::fs::File::create(root.join("b/y.jsonl.gz")).unwrap();
    let mut enc = flate2::write::GzEncoder::new(gz, flate2::Compression::fast());
    enc.write_all(body.replace("{\"id\": 99}\n", "").as_bytes())
        .unwrap();
    enc.finish().unwrap();
}

#[test]
fn tokenizes_mirrors_layout_counts_and_round_trips() {
    let tok = Tokenizer::from_file(tokenizer_path()).unwrap();
    assert_eq!(tok.get_vocab_size(true), 128_256);
    let dir = tempfile::tempdir().unwrap();
    let (raw, out) = (dir.path().join("raw"), dir.path().join("out"));
    inputs(&raw);
    let s = run(&opts(vec![raw.clone()], &out, false)).unwrap();
    assert_eq!(
        (s.files, s.skipped, s.documents, s.bad_records),
        (2, 0, 8, 1)
    );

    for sub in ["a", "b"] {
        let counts = Counts::read(&out.join(sub)).unwrap().expect("counts.json");
        assert_eq!(counts.documents(), 4);
        assert!(counts.files.len() > 1, "shards are bounded: {counts:?}");
        assert!(counts.files.iter().all(|f| f.tokens < 30 + 25));
        // Read back through the loader, in file order (no shuffling): one
        // line per document, no framing, so each line is one document.
        let cfg = LoaderConfig {
            datasets: vec![DatasetSpec {
                name: sub.into(),
                path: out.join(sub),
                weight: 1.0,
            }],
            seq_len: 1000,
            eos_token: None,
            logical_shards: 1,
            shuffle_buffer: 0,
            epochs: Some(1),
            ..Default::default()
        };
        let mut l = Loader::new(cfg, 0, 1).unwrap();
        let mut texts = Vec::new();
        while let Ok(Some(line)) = l.next_line() {
            // Segments say how much of the line is real (the rest is padding).
            let real: u32 = line.segments.iter().map(|s| s.end - s.start).sum();
            texts.push(tok.decode(&line.tokens[..real as usize], false).unwrap());
        }
        let joined = texts.concat();
        for t in TEXTS {
            assert!(joined.contains(t), "{sub}: {t:?} not in {joined:?}");
        }
    }
    // Llama-3's ids for a known string; its post-processor adds no BOS.
    let ids = tok.encode("Hello world", false).unwrap().get_ids().to_vec();
    assert_eq!(ids, vec![9906, 1917]);
}

#[test]
fn rerun_skips_finished_inputs_and_redoes_damaged_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, out) = (dir.path().join("raw"), dir.path().join("out"));
    inputs(&raw);
    run(&opts(vec![raw.clone()], &out, false)).unwrap();
    let again = run(&opts(vec![raw.clone()], &out, false)).unwrap();
    assert_eq!((again.files, again.skipped, again.tokens), (0, 2, 0));
    let shard = out.join("b/y-00000.parquet");
    std::fs::remove_file(&shard).unwrap();
    let third = run(&opts(vec![raw], &out, false)).unwrap();
    assert_eq!((third.files, third.skipped), (1, 1));
    assert!(shard.is_file());
    assert_eq!(
        Counts::read(&out.join("b")).unwrap().unwrap().documents(),
        4
    );
}

#[test]
fn strict_mode_names_the_line_and_leaves_nothing_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, out) = (dir.path().join("raw"), dir.path().join("out"));
    inputs(&raw);
    let e = run(&opts(vec![raw.join("a/x.jsonl")], &out, true))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("x.jsonl:3") && e.contains("no field `text`"),
        "{e}"
    );
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.iter()
            .all(|n| !n.ends_with(".tmp") && !n.contains("done")),
        "left behind: {left:?}"
    );
}

/// The corpus shipped in configs/data/ is real, Llama-3-tokenized text.
#[test]
fn shipped_corpus_is_real_text() {
    let tok = Tokenizer::from_file(tokenizer_path()).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/data");
    let datasets: Vec<DatasetSpec> = ["shakespeare", "fortunes"]
        .iter()
        .map(|n| DatasetSpec {
            name: n.to_string(),
            path: root.join(n),
            weight: 1.0,
        })
        .collect();
    let cfg = LoaderConfig {
        datasets,
        seq_len: 512,
        eos_token: Some(128_001),
        logical_shards: 960,
        shuffle_buffer: 64,
        ..Default::default()
    };
    let mut l = Loader::new(cfg, 0, 8).unwrap();
    let batch = l.next_batch(64).unwrap();
    assert!(batch.iter().all(|&t| t < 128_256));
    let text = tok.decode(&batch, true).unwrap();
    let words = [" the ", " and ", " of "];
    assert!(
        words.iter().all(|w| text.contains(w)),
        "not English? {}",
        &text[..200]
    );
}
