//! bamba-train: sharded data-parallel pretraining of Bamba models.
//!
//! The binary (`main.rs`) is only the command line; everything it runs lives
//! here so that tests drive the same code paths.

pub mod backend;
pub mod banner;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod clocks;
pub mod config;
pub mod cuda_memory;
pub mod dist;
pub mod forward;
pub mod fsdp;
pub mod host_profile;
pub mod memtrace;
pub mod metrics;
pub mod optim;
pub mod runtime;
pub mod train;
pub mod weights;
