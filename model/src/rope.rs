//! Rotary position embeddings, GPT-NeoX style (rotate_half, not interleaved),
//! on the first `rotary_dim` dims of each head; the rest pass through.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::backend::Backend;

use crate::ops::BambaBackend;
use burn::tensor::{Tensor, TensorData};

/// cos/sin tables for positions `0..seq`, each `[1, 1, seq, rotary_dim]`.
/// Built in f32 the way HF builds them (`inv_freq` from f32 powers, angles as
/// f32 products) so positions far from 0 round the same. The host values are
/// made once per shape: a 4096-long table is a million `cos`/`sin` calls,
/// about 10 ms of host time that each forward would otherwise spend before
/// its first launch.
pub fn rope_tables<B: Backend>(
    seq: usize,
    rotary_dim: usize,
    theta: f64,
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    // (seq, rotary_dim, theta's bits) -> cos, sin.
    type Cache = Mutex<HashMap<(usize, usize, u64), Arc<(Vec<f32>, Vec<f32>)>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let key = (seq, rotary_dim, theta.to_bits());
    let tables = CACHE
        .get_or_init(Default::default)
        .lock()
        .expect("rope table cache")
        .entry(key)
        .or_insert_with(|| Arc::new(host_tables(seq, rotary_dim, theta)))
        .clone();
    let table =
        |v: &[f32]| Tensor::from_data(TensorData::new(v.to_vec(), [1, 1, seq, rotary_dim]), device);
    (table(&tables.0), table(&tables.1))
}

/// [`rope_tables`]' values, `[seq, rotary_dim]` each, row-major.
fn host_tables(seq: usize, rotary_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = rotary_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / rotary_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(seq * rotary_dim);
    let mut sin = Vec::with_capacity(seq * rotary_dim);
    for t in 0..seq {
        // emb = cat(freqs, freqs)
        for _ in 0..2 {
            for f in &inv_freq {
                let angle = t as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    (cos, sin)
}

/// Applies the rotation to `x [b, seq, heads, head_dim]` (tables from
/// [`rope_tables`] for the same `seq`).
pub fn apply_rope<B: BambaBackend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [_, _, l, rd] = cos.dims();
    crate::ops::rope(
        x,
        cos.clone().reshape([l, rd]),
        sin.clone().reshape([l, rd]),
    )
}
