//! `bamba-train bench --ops`: the model's pieces timed one by one, the
//! fused AdamW's bandwidth, the host cost of a launch and of a reservation.

use std::time::Instant;

use anyhow::Result;
use bamba_model::BambaAutodiffBackend;
use serde_json::json;

/// `bamba-train bench --ops`: forward and backward of the model's pieces at
/// the config's shape (one Mamba layer, one attention layer, the conv, the
/// SSD scan, one projection, the LM head with loss), each timed alone with a
/// device sync, to show where a step's time goes.
pub fn ops<B: BambaAutodiffBackend>(
    model_cfg: &bamba_model::BambaConfig,
    batch: usize,
    seq: usize,
    compute: burn::tensor::DType,
    only: &[String],
    device: &B::Device,
) -> Result<()> {
    use bamba_model::init::InitSource;
    use bamba_model::layer::BambaDecoderLayer;
    use bamba_model::linear::Linear;
    use bamba_model::rope::rope_tables;
    use bamba_model::ssd::ssd_chunked;
    use bamba_model::{VarBuilder, causal_lm_loss};
    use burn::module::Module;
    use burn::tensor::{Distribution, Int, Tensor};

    let source = InitSource {
        cfg: model_cfg,
        seed: 0,
    };
    let vb = VarBuilder::<B>::new(&source, device);
    let cast = |t: Tensor<B, 3>| t.cast(compute).detach().require_grad();
    let rand = |shape: [usize; 3]| {
        cast(Tensor::<B, 3>::random(
            shape,
            Distribution::Normal(0.0, 1.0),
            device,
        ))
    };
    let time = |name: &str, f: &mut dyn FnMut() -> Tensor<B, 1>| {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            return;
        }
        for round in 0..3 {
            let _ = B::sync(device);
            let t0 = Instant::now();
            let out = f();
            let _ = B::sync(device);
            let t1 = Instant::now();
            let _grads = out.backward();
            let _ = B::sync(device);
            let t2 = Instant::now();
            if round == 2 {
                println!(
                    "{}",
                    json!({"op": name, "forward_ms": (t1 - t0).as_secs_f64() * 1e3,
                        "backward_ms": (t2 - t1).as_secs_f64() * 1e3})
                );
            }
        }
    };
    // A scalar from one position: a full `sum()` would add a reduction
    // over the whole output to the piece's time (the backward still
    // computes every gradient).
    fn probe<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, 1> {
        t.narrow(1, 0, 1).sum()
    }
    // What one kernel launch costs the host (enqueue to the device thread,
    // its launch, the driver): many tiny ops timed to one sync. A step of a
    // few thousand launches is launch-bound when this times the count nears
    // the step time.
    if only.is_empty() || only.iter().any(|o| o == "launch") {
        let n = 2000;
        let tiny = Tensor::<B::InnerBackend, 1>::ones([256], device);
        let per_launch = |f: &dyn Fn(Tensor<B::InnerBackend, 1>) -> Tensor<B::InnerBackend, 1>| {
            let mut y = f(tiny.clone());
            let _ = B::sync(device);
            let t = Instant::now();
            for _ in 0..n {
                y = f(y);
            }
            let _ = B::sync(device);
            drop(y);
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        };
        let burn_us = per_launch(&|y| y.add_scalar(1.0));
        let fused_us = per_launch(&|y| bamba_model::ops::sum_squares(y).repeat_dim(0, 256));
        println!(
            "{}",
            json!({"op": "launch", "burn_op_us": burn_us,
                "fused_plus_burn_op_us": fused_us, "ops": n})
        );
    }
    if only.is_empty() || only.iter().any(|o| o == "adamw") {
        adamw_bandwidth::<B>(device);
    }
    #[cfg(feature = "cuda")]
    if only.iter().any(|o| o == "allocator") {
        allocator_presets();
    }
    let h = model_cfg.hidden_size;
    let (b, l) = (batch, seq);
    let lp = vb.pp("model").pp("layers");
    let mamba_i = (0..model_cfg.num_hidden_layers)
        .find(|&i| !model_cfg.is_attention(i))
        .unwrap_or(0);
    let mamba = BambaDecoderLayer::<B>::new(&lp.pp(mamba_i), model_cfg, mamba_i)?
        .map(&mut crate::forward::CastParams(compute));
    let rope = rope_tables(l, model_cfg.rotary_dim(), model_cfg.rope_theta, device);
    let x = rand([b, l, h]);
    time("mamba_layer", &mut || {
        probe(mamba.forward(x.clone(), &rope))
    });
    let mixer = mamba.mamba.as_ref().expect("a mamba layer");
    time("mamba_mixer", &mut || probe(mixer.forward(x.clone(), None)));
    time("in_proj", &mut || probe(mixer.in_proj.forward(x.clone())));
    time("mlp", &mut || {
        probe(mamba.feed_forward.forward(x.clone(), None))
    });
    time("rmsnorm", &mut || {
        probe(mamba.input_layernorm.forward(x.clone()))
    });
    let cd = model_cfg.conv_dim();
    let xc = rand([b, l, cd]);
    time("conv1d", &mut || {
        probe(mixer.conv1d.forward_silu(xc.clone()))
    });
    let di = model_cfg.d_inner();
    let (y, z) = (rand([b, l, di]), rand([b, l, di]));
    time("gated_norm", &mut || {
        probe(mixer.norm.forward(y.clone(), z.clone()))
    });
    let (nh, p, g, n) = (
        model_cfg.mamba_n_heads,
        model_cfg.mamba_d_head,
        model_cfg.mamba_n_groups,
        model_cfg.mamba_d_state,
    );
    let r4 = |s: [usize; 4]| {
        Tensor::<B, 4>::random(s, Distribution::Normal(0.0, 1.0), device)
            .cast(compute)
            .require_grad()
    };
    let (xs, bm, cm) = (r4([b, l, nh, p]), r4([b, l, g, n]), r4([b, l, g, n]));
    let dt = Tensor::<B, 3>::random([b, l, nh], Distribution::Uniform(0.001, 0.1), device)
        .require_grad();
    let a = Tensor::<B, 1>::random([nh], Distribution::Uniform(-8.0, -1.0), device);
    let d = Tensor::<B, 1>::random([nh], Distribution::Normal(0.0, 1.0), device).cast(compute);
    time("ssd_chunked", &mut || {
        probe(ssd_chunked(
            xs.clone(),
            dt.clone(),
            a.clone(),
            bm.clone(),
            cm.clone(),
            d.clone(),
            model_cfg.mamba_chunk_size,
            false,
        ))
    });
    if let Some(ai) = model_cfg.attn_layer_indices.first().copied() {
        let attn = BambaDecoderLayer::<B>::new(&lp.pp(ai), model_cfg, ai)?
            .map(&mut crate::forward::CastParams(compute));
        time("attention_layer", &mut || {
            probe(attn.forward(x.clone(), &rope))
        });
    }
    let head = Linear::<B>::new(&vb.pp("lm_head"), h, model_cfg.vocab_size, false)?
        .map(&mut crate::forward::CastParams(compute));
    let targets = Tensor::<B, 2, Int>::zeros([b, l], device);
    time("lm_head_loss", &mut || {
        causal_lm_loss(head.forward(x.clone()), targets.clone(), 0.0)
    });
    Ok(())
}

/// `--ops --only adamw`: the fused AdamW alone, in place over 2^28 f32
/// parameters with a bf16 gradient and the bf16 copy (as a bf16 model on one
/// GPU steps): 28 bytes of memory traffic per parameter, so its time against
/// the memory's bandwidth. Nothing on a backend without the fused kernel.
fn adamw_bandwidth<B: BambaAutodiffBackend>(device: &B::Device) {
    use bamba_model::BambaBackend;
    use bamba_model::ops::{AdamWHyper, AdamWState};
    use burn::tensor::{DType, Distribution, Tensor};
    type I<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
    if !<I<B> as BambaBackend>::bamba_fused() {
        return; // no fused kernel: nothing to time (and 3.5 GB not to allocate)
    }
    let n = 1usize << 28;
    let rnd =
        |lo: f64, hi: f64| Tensor::<I<B>, 1>::random([n], Distribution::Uniform(lo, hi), device);
    let prim = |t: Tensor<I<B>, 1>| t.into_primitive().tensor();
    let grad = prim(rnd(-1.0, 1.0).cast(DType::BF16));
    let (mut p, mut m, mut v) = (
        prim(rnd(-1.0, 1.0)),
        prim(rnd(-0.1, 0.1)),
        prim(rnd(0.0, 0.01)),
    );
    let h = AdamWHyper {
        beta1: 0.9,
        beta2: 0.95,
        lr_bc1: 1e-4,
        inv_sqrt_bc2: 1.0,
        eps: 1e-8,
        lr_wd: 1e-5,
    };
    let mut best = f64::MAX;
    for _ in 0..5 {
        let state = AdamWState {
            param: p,
            grad: vec![(grad.clone(), 0)],
            exp_avg: m,
            exp_avg_sq: v,
            no_decay: vec![(0, 5)],
            grad_scale: None,
            bf16_copy: true,
        };
        let _ = B::sync(device);
        let t = Instant::now();
        let Some(([np, nm, nv], copy)) = <I<B> as BambaBackend>::bamba_adamw(state, &h) else {
            return;
        };
        let _ = B::sync(device);
        best = best.min(t.elapsed().as_secs_f64());
        (p, m, v) = (np, nm, nv);
        drop(copy);
    }
    println!(
        "{}",
        json!({"op": "adamw", "params": n, "ms": best * 1e3,
            "gb_per_s": 28.0 * n as f64 / best / 1e9})
    );
}

/// `--ops --only allocator`: what one reservation costs in each of
/// `cuda_memory`'s pool presets, on host memory (cubecl's pool logic is the
/// same for every storage), with a live set like a training step's: small
/// buffers (metadata, per-head vectors), mid-size and large tensors. Per
/// launch, burn's CUDA backend reserves two or three times.
#[cfg(feature = "cuda")]
fn allocator_presets() {
    use crate::cuda_memory::{Preset, configuration};
    use burn_cubecl::cubecl::ir::MemoryDeviceProperties;
    use cubecl_runtime::logging::ServerLogger;
    use cubecl_runtime::memory_management::{MemoryManagement, MemoryManagementOptions};
    use cubecl_runtime::storage::BytesStorage;
    let (max_page, align) = (20u64 << 30, 512u64); // an 80 GB GPU's
    for live_small in [100usize, 1000, 3000, 6000] {
        let mut row = serde_json::Map::new();
        for preset in [
            Preset::SubSlices,
            Preset::Exclusive,
            Preset::Mixed,
            Preset::Bucketed,
        ] {
            let props = MemoryDeviceProperties {
                max_page_size: max_page,
                alignment: align,
            };
            let mut mm = MemoryManagement::from_configuration(
                BytesStorage::default(),
                &props,
                configuration(preset, max_page, align),
                std::sync::Arc::new(ServerLogger::default()),
                MemoryManagementOptions::new("bench"),
            );
            // A fixed pseudo-random live set: small (64 B - 64 KiB), and a
            // tenth as many 0.5-4.5 MiB and 8-72 MiB tensors.
            let mut x = 0x9e3779b97f4a7c15u64;
            let mut rnd = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let mut live = Vec::new();
            for _ in 0..live_small {
                live.push(mm.reserve(64 + rnd() % 65536).expect("host memory"));
            }
            for _ in 0..live_small / 10 {
                live.push(
                    mm.reserve((512 << 10) + rnd() % (4 << 20))
                        .expect("host memory"),
                );
                live.push(
                    mm.reserve((8 << 20) + rnd() % (64 << 20))
                        .expect("host memory"),
                );
            }
            // Steady state: per op a metadata buffer and an output, freed a little later.
            let n = 20_000;
            let mut recent = std::collections::VecDeque::new();
            let t = Instant::now();
            for i in 0..n {
                let meta = mm.reserve(256).expect("host memory");
                let size = if i % 3 == 0 {
                    (16 << 20) + (i % 5) as u64 * 4096
                } else {
                    4096 + (i % 7) as u64 * 1024
                };
                recent.push_back((meta, mm.reserve(size).expect("host memory")));
                if recent.len() > 64 {
                    recent.pop_front();
                }
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / (2 * n) as f64;
            row.insert(format!("{preset:?}").to_lowercase() + "_us", json!(us));
        }
        row.insert("op".into(), json!("allocator"));
        row.insert(
            "live_allocations".into(),
            json!(live_small + live_small / 5),
        );
        println!("{}", serde_json::Value::Object(row));
    }
}
