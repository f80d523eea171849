//! Data pipeline for bamba-train: tokenizing raw text into parquet shards
//! (`bamba-tokenize`) and streaming them as packed, mixed, shuffled,
//! rank-disjoint token lines whose state resumes exactly, even on a
//! different number of ranks.
//!
//! Reading order: `config` (what the trainer sets), `loader` (the pipeline),
//! `state` (what is saved and how resume and rescale work), then the stages:
//! `catalog` and `source` (files), `shards`, `mixture`, `packing`, `shuffle`.

pub mod bench;
pub mod catalog;
pub mod config;
pub mod counts;
pub mod error;
pub mod loader;
pub mod mixture;
pub mod packing;
pub mod shards;
pub mod shuffle;
pub mod source;
pub mod state;
pub mod tokenize;

pub use config::{DatasetSpec, LoaderConfig, datasets_from_root};
pub use error::{DataError, Result};
pub use loader::Loader;
pub use packing::Line;
pub use state::{LoaderState, Segment};
