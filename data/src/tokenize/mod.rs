//! Raw text to tokenized parquet shards (the `bamba-tokenize` binary).

pub mod writer;
