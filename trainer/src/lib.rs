//! bamba-train: sharded data-parallel pretraining of Bamba models.
//!
//! The binary (`main.rs`) is only the command line; everything it runs lives
//! here so that tests drive the same code paths.

pub mod backend;
pub mod dist;
pub mod forward;
