//! The optimizer side of a step: AdamW on (sharded) f32 master weights, the
//! learning-rate schedule, and gradient clipping by global norm.

pub mod adamw;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig};
pub use schedule::{Decay, Schedule, WarmupShape};
