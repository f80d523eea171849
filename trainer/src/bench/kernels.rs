//! `bamba-train bench --kernels`: every fused kernel against its burn-ops
//! reference, forward and gradients, f32 and bf16.

use anyhow::Result;
use bamba_model::BambaAutodiffBackend;
use serde_json::json;

/// `bamba-train bench --kernels`: every fused piece against its burn-ops
/// reference (`bamba_model::ops::reference`) on random inputs, forward and
/// the gradient of each input, as JSON lines (`max_abs`, `rel` = max abs
/// difference over the reference's max abs). On backends without fused
/// kernels both sides are the reference. `large` adds the 1B model's shapes.
pub fn kernels<B: BambaAutodiffBackend>(
    device: &B::Device,
    large: bool,
    only: &[String],
) -> Result<bool> {
    use bamba_model::ops::{self, reference};
    use burn::tensor::{DType, Distribution, Tensor};

    type Inputs<B> = Vec<Tensor<B, 1>>;
    // Flattened inputs in, one output out, so one harness serves every piece.
    type Piece<'a, B> = Box<dyn Fn(&Inputs<B>) -> Tensor<B, 1> + 'a>;
    let mut ok = true;
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| name.starts_with(o.as_str()));
    // First (quick): gradient packing (FSDP's flat buffers): bf16 and f32 parts at offsets,
    // gaps zeroed, then accumulated in place; bf16 parts copied into a bf16
    // buffer, then summed into f32; checked on the host.
    if wanted("pack") {
        type I<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
        let a = Tensor::<I<B>, 2>::random([3, 5], Distribution::Normal(0.0, 1.0), device)
            .cast(DType::BF16);
        let b = Tensor::<I<B>, 2>::random([1, 7], Distribution::Normal(0.0, 1.0), device);
        let host = |t: Tensor<I<B>, 2>| t.cast(DType::F32).into_data().to_vec::<f32>().unwrap();
        let (ha, hb) = (host(a.clone()), host(b.clone()));
        let once = ops::pack(vec![(a.clone(), 2), (b.clone(), 20)], 40, None, DType::F32);
        let twice = ops::pack(
            vec![(a.clone(), 2), (b.clone(), 20)],
            40,
            Some(once),
            DType::F32,
        );
        let got = twice.into_data().to_vec::<f32>().unwrap();
        let mut want = vec![0f32; 40];
        want[2..17].copy_from_slice(&ha);
        want[20..27].copy_from_slice(&hb);
        let max_abs = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - 2.0 * w).abs())
            .fold(0f32, f32::max);
        let pass = max_abs == 0.0;
        ok &= pass;
        println!(
            "{}",
            json!({"kernel": "pack_f32", "dtype": "BF16+F32", "value": "output",
                "max_abs": max_abs, "rel": max_abs, "pass": pass})
        );
        // bf16 parts into a bf16 buffer (offsets 16-byte aligned and not), then a sum.
        let b = b.cast(DType::BF16);
        let hb = host(b.clone());
        let lp = ops::pack(vec![(a.clone(), 8), (b.clone(), 29)], 40, None, DType::BF16);
        let lp_dtype = lp.dtype();
        let sum = ops::pack(vec![(a, 8), (b, 29)], 40, Some(lp.clone()), DType::BF16);
        let (lp, sum) = (
            lp.cast(DType::F32).into_data().to_vec::<f32>().unwrap(),
            sum.into_data().to_vec::<f32>().unwrap(),
        );
        let mut want = [0f32; 40];
        want[8..23].copy_from_slice(&ha);
        want[29..36].copy_from_slice(&hb);
        let max_abs = (0..40)
            .map(|i| (lp[i] - want[i]).abs().max((sum[i] - 2.0 * want[i]).abs()))
            .fold(0f32, f32::max);
        let pass = max_abs == 0.0 && lp_dtype == DType::BF16;
        ok &= pass;
        println!(
            "{}",
            json!({"kernel": "pack_bf16", "dtype": "BF16", "value": "copy+sum",
                "max_abs": max_abs, "rel": max_abs, "pass": pass})
        );
    }
    // The gradient norm's sum of squares: against burn's own reduction, and
    // the same bits on a second run (no float atomics).
    let sizes = [
        (1usize, DType::F32),
        (1000, DType::F32),
        (3_000_001, DType::F32),
    ];
    for (n, dtype) in sizes
        .into_iter()
        .chain([(1003, DType::BF16), (3_000_001, DType::BF16)])
        .filter(|_| wanted("sum_squares"))
    {
        let x = Tensor::<B, 1>::random([n], Distribution::Normal(0.0, 1.0), device)
            .inner()
            .cast(dtype);
        let run = || -> f32 { ops::sum_squares(x.clone()).into_scalar().elem() };
        let (a, b) = (run(), run());
        let x = x.cast(DType::F32);
        let want: f32 = x.clone().powf_scalar(2.0).sum().into_scalar().elem();
        let rel = (a - want).abs() / want.abs().max(1e-30);
        let pass = rel <= 1e-5 && a.to_bits() == b.to_bits();
        ok &= pass;
        println!(
            "{}",
            json!({"kernel": "sum_squares", "dtype": format!("{dtype:?}"), "value": format!("n={n}"),
                "max_abs": (a - want).abs(), "rel": rel, "repeatable": a.to_bits() == b.to_bits(),
                "pass": pass})
        );
    }
    // Checkpoint staging: f32 tensors (one across the pinned buffers'
    // 64 MB pieces, one a column view) copied to the host by the backend's
    // fast path, against burn's `into_data`, to the bit; and both speeds.
    if wanted("read_f32") {
        use bamba_model::BambaBackend;
        type I<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
        let rand =
            |n: usize| Tensor::<I<B>, 1>::random([n], Distribution::Normal(0.0, 1.0), device);
        let big = rand((16 << 20) + 3);
        let view = Tensor::<I<B>, 2>::random([300, 7], Distribution::Normal(0.0, 1.0), device)
            .narrow(1, 2, 3)
            .reshape([900]);
        let ts = [rand(5), big, view, rand(1000)];
        // As checkpoints read before: 64 MB pieces (cubecl's pinned staging).
        let plain = |ts: &[Tensor<I<B>, 1>]| -> Vec<f32> {
            let mut out = vec![];
            for t in ts {
                let n = t.dims()[0];
                for at in (0..n).step_by(16 << 20) {
                    let piece = t.clone().narrow(0, at, (16 << 20).min(n - at));
                    out.extend(piece.into_data().to_vec::<f32>().unwrap());
                }
            }
            out
        };
        let fast = |ts: &[Tensor<I<B>, 1>]| -> Option<Vec<f32>> {
            let mut out = vec![0f32; ts.iter().map(|t| t.dims()[0]).sum()];
            let prims = ts
                .iter()
                .map(|t| t.clone().into_primitive().tensor())
                .collect();
            I::<B>::bamba_read_f32(prims, &mut out).then_some(out)
        };
        let want = plain(&ts);
        let got = fast(&ts);
        let same = got.as_ref().is_none_or(|g| {
            g.len() == want.len() && g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits())
        });
        // 1 GB each way, timed after a first run of each (pinning, faults of the pools).
        let gb = rand(1 << 28);
        let one = [gb];
        let time = |f: &dyn Fn() -> usize| {
            f();
            let t = std::time::Instant::now();
            let n = f();
            (n * 4) as f64 / 1e9 / t.elapsed().as_secs_f64()
        };
        let plain_gbps = time(&|| plain(&one).len());
        let fast_gbps = got
            .is_some()
            .then(|| time(&|| fast(&one).map_or(0, |v| v.len())));
        ok &= same;
        println!(
            "{}",
            json!({"kernel": "read_f32", "dtype": "F32", "value": "to host",
                "fast_path": got.is_some(), "same_bits": same,
                "gb_per_s": fast_gbps, "into_data_gb_per_s": plain_gbps, "pass": same})
        );
    }
    // Slices of one tensor add their gradients into one buffer (in place):
    // against burn's own `narrow`, with overlapping slices and a use of the
    // whole tensor, in f32 and bf16.
    for dtype in [DType::F32, DType::BF16]
        .into_iter()
        .filter(|_| wanted("add_narrow"))
    {
        let x0 = Tensor::<B, 3>::random([2, 37, 300], Distribution::Normal(0.0, 1.0), device)
            .cast(dtype);
        let w = Tensor::<B, 3>::random([2, 37, 300], Distribution::Normal(0.0, 1.0), device)
            .cast(dtype);
        let grad = |ours: bool| {
            let x = x0.clone().detach().require_grad();
            let cut = |t: Tensor<B, 3>, start, len| {
                if ours {
                    ops::narrow(t, 2, start, len)
                } else {
                    t.narrow(2, start, len)
                }
            };
            let y = (cut(x.clone(), 0, 100) * 2.0).sum()
                + cut(x.clone(), 100, 190).exp().sum()
                + (cut(x.clone(), 290, 10) * cut(x.clone(), 0, 10)).sum()
                + (x.clone() * w.clone()).sum();
            let g = y.backward();
            x.grad(&g)
                .unwrap()
                .cast(DType::F32)
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        };
        let (ours, burns) = (grad(true), grad(false));
        let max_abs = ours
            .iter()
            .zip(&burns)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = burns.iter().fold(0f32, |m, v| m.max(v.abs()));
        let rel = max_abs / scale.max(1e-30);
        let pass = rel <= if dtype == DType::F32 { 1e-6 } else { 1e-2 };
        ok &= pass;
        println!(
            "{}",
            json!({"kernel": "add_narrow", "dtype": format!("{dtype:?}"), "value": "grad0",
                "max_abs": max_abs, "rel": rel, "pass": pass})
        );
    }
    // Fused AdamW (in place, with the bf16 copy) against the update on the
    // host: f32 gradients in one buffer with no-decay ranges (unaligned
    // ends, the tail); bf16 gradients as pieces with gaps (zero gradient),
    // 4-aligned and not, decaying everywhere.
    // (gradient dtype, no-decay ranges, gradient pieces)
    type Case<'a> = (DType, bool, &'a [(usize, usize)]);
    let cases: [Case; 3] = [
        (DType::F32, true, &[(0, 1003)]),
        (DType::BF16, false, &[(0, 400), (404, 1000)]),
        (DType::BF16, false, &[(0, 5), (9, 1002)]),
    ];
    for (gdtype, masked, pieces) in cases.into_iter().filter(|_| wanted("adamw")) {
        type I<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
        use bamba_model::ops::{AdamWHyper, AdamWState};
        let n = 1003; // four-wide passes and a tail
        let rnd = |lo: f64, hi: f64| {
            Tensor::<I<B>, 1>::random([n], Distribution::Uniform(lo, hi), device)
        };
        let (p, g, m, v) = (
            rnd(-1.0, 1.0),
            rnd(-1.0, 1.0).cast(gdtype),
            rnd(-0.1, 0.1),
            rnd(0.0, 0.01),
        );
        let host = |t: &Tensor<I<B>, 1>| {
            t.clone()
                .cast(DType::F32)
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap()
        };
        let (hp, hm, hv) = (host(&p), host(&m), host(&v));
        let mut hg = vec![0f32; n];
        let all_g = host(&g);
        for &(lo, hi) in pieces {
            hg[lo..hi].copy_from_slice(&all_g[lo..hi]);
        }

        let no_decay = if masked {
            vec![(0, 5), (17, 102), (1001, 1003)]
        } else {
            vec![]
        };
        let mut hmask = vec![1f32; n];
        for &(lo, hi) in &no_decay {
            hmask[lo..hi].fill(0.0);
        }
        let h = AdamWHyper {
            beta1: 0.9,
            beta2: 0.95,
            lr_bc1: 1e-3 / 0.1,
            inv_sqrt_bc2: 1.0 / 0.05f64.sqrt(),
            eps: 1e-8,
            lr_wd: 1e-4,
        };
        let prim = |t: Tensor<I<B>, 1>| t.into_primitive().tensor();
        let grad = pieces
            .iter()
            .map(|&(lo, hi)| (prim(g.clone().narrow(0, lo, hi - lo)), lo))
            .collect();
        let state = AdamWState {
            param: prim(p),
            grad,
            exp_avg: prim(m),
            exp_avg_sq: prim(v),
            no_decay,
            grad_scale: None,
            bf16_copy: true,
        };
        if let Some(([np, nm, nv], copy)) =
            <I<B> as bamba_model::BambaBackend>::bamba_adamw(state, &h)
        {
            let t = |x| {
                host(&Tensor::<I<B>, 1>::from_primitive(
                    burn::tensor::TensorPrimitive::Float(x),
                ))
            };
            let (np, nm, nv) = (t(np), t(nm), t(nv));
            let lp = copy.map(t);
            let mut max_abs = 0f32;
            for i in 0..n {
                let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
                let mut pi = hp[i] * (1.0 - hmask[i] * h.lr_wd as f32);
                let mi = b1 * hm[i] + (1.0 - b1) * hg[i];
                let vi = b2 * hv[i] + (1.0 - b2) * hg[i] * hg[i];
                pi -= mi / (vi.sqrt() * h.inv_sqrt_bc2 as f32 + h.eps as f32) * h.lr_bc1 as f32;
                let lp_err = lp
                    .as_ref()
                    .map_or(0.0, |lp| (lp[i] - pi).abs() - pi.abs() / 128.0);
                max_abs = max_abs
                    .max((np[i] - pi).abs())
                    .max((nm[i] - mi).abs())
                    .max((nv[i] - vi).abs())
                    .max(lp_err.max(0.0));
            }
            let pass = max_abs <= 1e-5 && lp.is_some();
            ok &= pass;
            let value = format!(
                "param+moments+bf16, grad in {} piece(s){}",
                pieces.len(),
                if masked { ", no-decay ranges" } else { "" }
            );
            println!(
                "{}",
                json!({"kernel": "adamw", "dtype": format!("{gdtype:?}"), "value": value,
                    "max_abs": max_abs, "rel": max_abs, "pass": pass})
            );
        }
    }
    let mut check =
        |name: &str, dtype: DType, shapes: &[Vec<usize>], fused: Piece<B>, refr: Piece<B>| {
            if !wanted(name) {
                return;
            }
            // Each line carries the check's wall time (both sides, twice the
            // fused one): device calls are scarce, and this shows where the
            // checks' own time goes.
            let start = std::time::Instant::now();
            let inputs: Vec<Tensor<B, 1>> = shapes
                .iter()
                .map(|s| {
                    let n: usize = s.iter().product();
                    Tensor::<B, 1>::random([n], Distribution::Normal(0.0, 1.0), device).cast(dtype)
                })
                .collect();
            // One upstream gradient for both sides (its length from the
            // fused forward: the reference is the slow side).
            let out_len = fused(&inputs).dims()[0];
            let g = Tensor::<B, 1>::random([out_len], Distribution::Normal(0.0, 1.0), device);
            let run = |f: &Piece<B>| {
                let xs: Vec<_> = inputs
                    .iter()
                    .map(|t| t.clone().detach().require_grad())
                    .collect();
                let y = f(&xs);
                let g = g.clone();
                let grads = (y.clone().cast(DType::F32) * g).sum().backward();
                let mut outs = vec![y.cast(DType::F32).inner()];
                for x in &xs {
                    outs.push(
                        x.grad(&grads)
                            .map(|t| t.cast(DType::F32))
                            .unwrap_or_else(|| Tensor::<B, 1>::zeros(x.dims(), device).inner()),
                    );
                }
                outs
            };
            // The fused side twice: its outputs and gradients must be the same
            // bits (no float atomics anywhere; exact resume depends on it).
            let (a, a2, b) = (run(&fused), run(&fused), run(&refr));
            let mut lines = Vec::new();
            for (i, ((a, a2), b)) in a.into_iter().zip(a2).zip(b).enumerate() {
                let what = if i == 0 {
                    "output".to_string()
                } else {
                    format!("grad{}", i - 1)
                };
                let repeatable: bool = a.clone().equal(a2).all().into_scalar().elem();
                let max_abs: f32 = (a - b.clone()).abs().max().into_scalar().elem();
                let scale: f32 = b.abs().max().into_scalar().elem();
                let rel = max_abs / scale.max(1e-12);
                let tol = if dtype == DType::F32 { 1e-4 } else { 5e-2 };
                let pass = rel <= tol && repeatable;
                ok &= pass;
                lines.push(
                    json!({"kernel": name, "dtype": format!("{dtype:?}"), "value": what,
                    "max_abs": max_abs, "rel": rel, "repeatable": repeatable, "pass": pass}),
                );
            }
            let ms = start.elapsed().as_secs_f64() * 1e3;
            for mut line in lines {
                line["ms"] = json!((ms * 10.0).round() / 10.0);
                println!("{line}");
            }
        };
    use burn::tensor::ElementConversion;
    for dtype in [DType::F32, DType::BF16] {
        // Products written in f32 (bf16 operands: the SSD's chunk states),
        // batched, with a transposed operand as the scan passes B^T.
        for (bt, m, k, n) in [(3, 37, 19, 21), (16, 128, 256, 4096)]
            .into_iter()
            .filter(|s| large || s.3 < 1000)
        {
            let ab = move |x: &Inputs<B>| {
                let a = x[0].clone().reshape([1, bt, k, m]).swap_dims(2, 3);
                (a, x[1].clone().reshape([1, bt, k, n]))
            };
            check(
                &format!("matmul_f32_{bt}x{m}x{k}x{n}"),
                dtype,
                &[vec![bt * k * m], vec![bt * k * n]],
                Box::new(move |x| {
                    let (a, b) = ab(x);
                    ops::matmul_f32(a, b).reshape([bt * m * n])
                }),
                Box::new(move |x| {
                    let (a, b) = ab(x);
                    ops::matmul(a.cast(DType::F32), b.cast(DType::F32)).reshape([bt * m * n])
                }),
            );
        }
        for (r, c) in [(37, 19), (4096, 5632)]
            .into_iter()
            .filter(|s| large || s.0 < 1000)
        {
            check(
                &format!("swiglu_{r}x{c}"),
                dtype,
                &[vec![r, c], vec![r, c]],
                Box::new(move |x| {
                    ops::swiglu(
                        x[0].clone().reshape([1, r, c]),
                        x[1].clone().reshape([1, r, c]),
                    )
                    .reshape([r * c])
                }),
                Box::new(move |x| {
                    reference::swiglu(
                        x[0].clone().reshape([1, r, c]),
                        x[1].clone().reshape([1, r, c]),
                    )
                    .reshape([r * c])
                }),
            );
        }
        // Partial tiles (q, p not multiples of 64; p not of 32) and two groups.
        for (b, nc, q, h, p, g) in [
            (2, 3, 37, 4, 5, 2),
            (1, 2, 130, 3, 70, 1),
            (1, 2, 132, 4, 68, 2), // the pipelined kernels' partial tiles (f32 x)
            (1, 2, 136, 4, 72, 2), // the same with bf16 x, two column tiles
            (1, 2, 64, 3, 64, 1),  // bf16 pipelined, one head per block (3 per group)
            (1, 16, 256, 64, 64, 1),
        ]
        .into_iter()
        .filter(|s| large || s.3 < 64)
        {
            // Exact in f32; with bf16 x (as training feeds it, read as
            // bf16) the products run as TF32.
            let f32 = |t: Tensor<B, 1>| t.cast(DType::F32);
            let sc = move |x: &Inputs<B>| f32(x[0].clone()).reshape([b, nc, g, q, q]);
            let cs = move |x: &Inputs<B>| {
                (-f32(x[1].clone()).reshape([b, nc, q, h]).abs() * 0.1).cumsum(2)
            };
            // Time steps are positive.
            let dt = move |x: &Inputs<B>| f32(x[2].clone()).reshape([b, nc, q, h]).abs() + 0.01;
            let xs = move |x: &Inputs<B>| x[3].clone().reshape([b, nc, q, h, p]);
            let n = b * nc * q * h * p;
            let tf32 = dtype != DType::F32;
            check(
                &format!("ssd_diag_{b}x{nc}x{q}x{h}x{p}_g{g}"),
                dtype,
                &[
                    vec![b, nc, g, q, q],
                    vec![b, nc, q, h],
                    vec![b, nc, q, h],
                    vec![b, nc, q, h, p],
                ],
                Box::new(move |x| ops::ssd_diag(sc(x), cs(x), dt(x), xs(x), tf32).reshape([n])),
                Box::new(move |x| reference::ssd_diag(sc(x), cs(x), dt(x), xs(x)).reshape([n])),
            );
            // x into the intra-chunk product, the row scale and the SSD
            // output through one view, as the scan runs it: its gradients
            // add up inside the kernels, and the output's gradient reaches
            // the product in x's dtype.
            let xgrads = move |x: &Inputs<B>, fused: bool| {
                let (s, d) = (f32(x[4].clone()).reshape([b, nc, q, h]), x[5].clone());
                let x4 = x[3].clone().reshape([b, nc * q, h, p]);
                if fused {
                    let x5 = ops::reshape_view(x4, [b, nc, q, h, p]);
                    let yd = ops::ssd_diag(sc(x), cs(x), dt(x), x5.clone(), tf32);
                    let xe = ops::scale_rows(x5.clone(), s);
                    ops::ssd_out_chunks(yd, xe, cs(x), x5, d, None).reshape([n])
                } else {
                    let x5 = x4.reshape([b, nc, q, h, p]);
                    let yd = reference::ssd_diag(sc(x), cs(x), dt(x), x5.clone());
                    let xe = reference::scale_rows(x5.clone(), s);
                    reference::ssd_out(yd, xe, cs(x), x5.reshape([b, nc * q, h, p]), d).reshape([n])
                }
            };
            check(
                &format!("ssd_x_grads_{b}x{nc}x{q}x{h}x{p}_g{g}"),
                dtype,
                &[
                    vec![b, nc, g, q, q],
                    vec![b, nc, q, h],
                    vec![b, nc, q, h],
                    vec![b, nc, q, h, p],
                    vec![b, nc, q, h],
                    vec![h],
                ],
                Box::new(move |x| xgrads(x, true)),
                Box::new(move |x| xgrads(x, false)),
            );
        }
        // The whole scan with its decayed inputs and entering states' part
        // made again in backward against the scan that keeps them: the same
        // kernels, so the same bits.
        for (b, l, h, p, g, n, q) in [(2, 96, 4, 6, 2, 8, 32), (1, 4096, 64, 64, 1, 128, 256)]
            .into_iter()
            .filter(|s| large || s.1 < 4096)
        {
            use bamba_model::ssd::ssd_chunked;
            let f32 = DType::F32;
            let scan = move |x: &Inputs<B>, remake: bool| {
                let r4 = |t: &Tensor<B, 1>, s: [usize; 4]| t.clone().reshape(s);
                let dt = (x[1].clone().cast(f32).abs() * 0.05 + 0.001).reshape([b, l, h]);
                let a = -(x[4].clone().cast(f32).abs() + 0.5);
                ssd_chunked(
                    r4(&x[0], [b, l, h, p]),
                    dt,
                    a,
                    r4(&x[2], [b, l, g, n]),
                    r4(&x[3], [b, l, g, n]),
                    x[5].clone(),
                    q,
                    remake,
                )
                .reshape([b * l * h * p])
            };
            check(
                &format!("ssd_remade_{b}x{l}x{h}x{p}_g{g}"),
                dtype,
                &[
                    vec![b, l, h, p],
                    vec![b, l, h],
                    vec![b, l, g, n],
                    vec![b, l, g, n],
                    vec![h],
                    vec![h],
                ],
                Box::new(move |x| scan(x, true)),
                Box::new(move |x| scan(x, false)),
            );
        }
        for (b, nc, n, h, p) in [(2, 3, 5, 4, 7), (1, 5, 16, 3, 100), (1, 16, 128, 64, 64)]
            .into_iter()
            .filter(|s| large || s.3 < 64)
        {
            let st = move |x: &Inputs<B>| x[0].clone().reshape([b, nc, n, h, p]);
            // Log-decays are negative.
            let a = move |x: &Inputs<B>| -x[1].clone().reshape([b, nc, h]).abs();
            let len = b * nc * n * h * p;
            // Stored in f32 (f32 training) or bf16 (bf16 training).
            for out in [DType::F32, DType::BF16] {
                let f32 = DType::F32;
                check(
                    &format!("ssd_states_{b}x{nc}x{n}x{h}x{p}"),
                    out,
                    &[vec![b, nc, n, h, p], vec![b, nc, h]],
                    Box::new(move |x| {
                        ops::ssd_states(st(x).cast(f32), a(x).cast(f32), out).reshape([len])
                    }),
                    Box::new(move |x| {
                        reference::ssd_states(st(x).cast(f32), a(x).cast(f32))
                            .cast(out)
                            .reshape([len])
                    }),
                );
            }
        }
        // Cumulative log-decays: runs of q / 4 rows (q not a multiple of 4),
        // column blocks of 64 (h not a multiple of 64).
        for (b, nc, q, h) in [(2, 3, 37, 5), (1, 2, 130, 70), (1, 16, 256, 64)]
            .into_iter()
            .filter(|s| large || s.2 < 256)
        {
            let n = b * nc * q * h;
            check(
                &format!("chunk_cumsum_{b}x{nc}x{q}x{h}"),
                DType::F32,
                &[vec![n]],
                Box::new(move |x| {
                    ops::chunk_cumsum(x[0].clone().reshape([b, nc, q, h])).reshape([n])
                }),
                Box::new(move |x| {
                    reference::chunk_cumsum(x[0].clone().reshape([b, nc, q, h])).reshape([n])
                }),
            );
            let dt_cs = move |x: &Inputs<B>| {
                let r = |t: &Tensor<B, 1>| t.clone().reshape([b, nc, q, h]);
                (r(&x[0]), r(&x[1]))
            };
            check(
                &format!("end_decay_{b}x{nc}x{q}x{h}"),
                DType::F32,
                &[vec![n], vec![n]],
                Box::new(move |x| {
                    let (dt, cs) = dt_cs(x);
                    ops::end_decay(dt, cs).reshape([n])
                }),
                Box::new(move |x| {
                    let (dt, cs) = dt_cs(x);
                    reference::end_decay(dt, cs).reshape([n])
                }),
            );
        }
        // The SSD output: row widths not a multiple of 64, padded chunks
        // cropped, and the 1B config's shape.
        for (b, nc, q, l, h, p) in [
            (2, 3, 5, 13, 4, 6),
            (1, 2, 8, 16, 3, 40),
            (1, 16, 256, 4096, 64, 64),
        ]
        .into_iter()
        .filter(|s| large || s.4 < 64)
        {
            let (dims5, dims4) = ([b, nc, q, h, p], [b, nc, q, h]);
            let n5 = b * nc * q * h * p;
            let n = b * l * h * p;
            let inputs = move |x: &Inputs<B>| {
                (
                    x[0].clone().reshape(dims5),
                    x[1].clone().reshape(dims5),
                    // Log-decays are negative.
                    -x[2].clone().reshape(dims4).abs(),
                    x[3].clone().reshape([b, l, h, p]),
                    x[4].clone(),
                )
            };
            check(
                &format!("ssd_out_{b}x{nc}x{q}x{h}x{p}_l{l}"),
                dtype,
                &[vec![n5], vec![n5], vec![b * nc * q * h], vec![n], vec![h]],
                Box::new(move |x| {
                    let (yd, yo, cs, xs, d) = inputs(x);
                    ops::ssd_out(yd, yo, cs, xs, d).reshape([n])
                }),
                Box::new(move |x| {
                    let (yd, yo, cs, xs, d) = inputs(x);
                    reference::ssd_out(yd, yo, cs, xs, d).reshape([n])
                }),
            );
        }
        for (r, p) in [(37, 5), (262144, 64)]
            .into_iter()
            .filter(|s| large || s.0 < 1000)
        {
            check(
                &format!("scale_rows_{r}x{p}"),
                DType::F32,
                &[vec![r, p], vec![r]],
                Box::new(move |x| {
                    ops::scale_rows(x[0].clone().reshape([r, p]), x[1].clone()).reshape([r * p])
                }),
                Box::new(move |x| {
                    reference::scale_rows(x[0].clone().reshape([r, p]), x[1].clone())
                        .reshape([r * p])
                }),
            );
        }
        // x as the Mamba mixer passes it: heads split out of a column slice
        // of a wider row (no copy), into the row scale and the SSD output.
        for (rows, h, p, w) in [(6, 3, 4, 20), (6, 3, 16, 56), (4096, 64, 64, 4352)]
            .into_iter()
            .filter(|s| large || s.0 < 1000)
        {
            let view = move |t: Tensor<B, 1>, fused: bool| {
                let t = t.reshape([1, rows, w]);
                if fused {
                    ops::reshape_view(ops::narrow(t, 2, 0, h * p), [1, rows, h, p])
                } else {
                    t.narrow(2, 0, h * p).reshape([1, rows, h, p])
                }
            };
            let n = rows * h * p;
            check(
                &format!("scale_rows_view_{rows}x{h}x{p}_w{w}"),
                dtype,
                &[vec![rows * w], vec![rows * h]],
                Box::new(move |x| {
                    let s = x[1].clone().cast(DType::F32).reshape([1, rows, h]);
                    ops::scale_rows(view(x[0].clone(), true), s).reshape([n])
                }),
                Box::new(move |x| {
                    let s = x[1].clone().cast(DType::F32).reshape([1, rows, h]);
                    reference::scale_rows(view(x[0].clone(), false), s).reshape([n])
                }),
            );
            // The SSD's intra-chunk product reads the same view in place.
            let q = if rows % 256 == 0 { 256 } else { 3 };
            let nc = rows / q;
            let diag = move |x: &Inputs<B>, fused: bool| {
                let sc = x[1].clone().cast(DType::F32).reshape([1, nc, 1, q, q]);
                let cs =
                    (-x[2].clone().cast(DType::F32).reshape([1, nc, q, h]).abs() * 0.1).cumsum(2);
                let dt = x[3].clone().cast(DType::F32).reshape([1, nc, q, h]).abs() + 0.01;
                let xv = view(x[0].clone(), fused);
                if fused {
                    let xv = ops::reshape_view(xv, [1, nc, q, h, p]);
                    ops::ssd_diag(sc, cs, dt, xv, dtype != DType::F32).reshape([n])
                } else {
                    reference::ssd_diag(sc, cs, dt, xv.reshape([1, nc, q, h, p])).reshape([n])
                }
            };
            check(
                &format!("ssd_diag_view_{rows}x{h}x{p}_w{w}"),
                dtype,
                &[
                    vec![rows * w],
                    vec![nc * q * q],
                    vec![rows * h],
                    vec![rows * h],
                ],
                Box::new(move |x| diag(x, true)),
                Box::new(move |x| diag(x, false)),
            );
            let f32 = |t: Tensor<B, 1>, d: [usize; 4]| t.cast(DType::F32).reshape(d);
            check(
                &format!("ssd_out_view_{rows}x{h}x{p}_w{w}"),
                dtype,
                &[vec![n], vec![n], vec![rows * h], vec![rows * w], vec![h]],
                Box::new(move |x| {
                    let d4 = [1, rows, h, p];
                    let cs = -f32(x[2].clone(), [1, 1, rows, h]).abs();
                    ops::ssd_out(
                        f32(x[0].clone(), d4).reshape([1, 1, rows, h, p]),
                        f32(x[1].clone(), d4).reshape([1, 1, rows, h, p]),
                        cs,
                        view(x[3].clone(), true),
                        x[4].clone(),
                    )
                    .reshape([n])
                }),
                Box::new(move |x| {
                    let d4 = [1, rows, h, p];
                    let cs = -f32(x[2].clone(), [1, 1, rows, h]).abs();
                    reference::ssd_out(
                        f32(x[0].clone(), d4).reshape([1, 1, rows, h, p]),
                        f32(x[1].clone(), d4).reshape([1, 1, rows, h, p]),
                        cs,
                        view(x[3].clone(), false),
                        x[4].clone(),
                    )
                    .reshape([n])
                }),
            );
        }
        for (b, h, l) in [(2, 3, 37), (1, 16, 4096)]
            .into_iter()
            .filter(|s| large || s.2 < 1000)
        {
            check(
                &format!("causal_softmax_{b}x{h}x{l}"),
                dtype,
                &[vec![b, h, l, l]],
                Box::new(move |x| {
                    ops::causal_softmax(x[0].clone().reshape([b, h, l, l]), 0.125)
                        .reshape([b * h * l * l])
                }),
                Box::new(move |x| {
                    reference::causal_softmax(x[0].clone().reshape([b, h, l, l]), 0.125)
                        .reshape([b * h * l * l])
                }),
            );
        }
        // Rotary embeddings: partial and full rotary dims, odd lengths.
        for (b, l, h, d, rd) in [
            (2, 37, 3, 16, 8),
            (1, 50, 2, 32, 32),
            (1, 4096, 16, 128, 64),
        ]
        .into_iter()
        .filter(|s| large || s.1 < 1000)
        {
            let n = b * l * h * d;
            let (cos, sin) = bamba_model::rope::rope_tables::<B>(l, rd, 10000.0, device);
            let (cos, sin) = (cos.reshape([l, rd]), sin.reshape([l, rd]));
            let (c2, s2) = (cos.clone(), sin.clone());
            check(
                &format!("rope_{b}x{l}x{h}x{d}_r{rd}"),
                dtype,
                &[vec![n]],
                Box::new(move |x| {
                    let x = x[0].clone().reshape([b, l, h, d]);
                    ops::rope(x, cos.clone(), sin.clone()).reshape([n])
                }),
                Box::new(move |x| {
                    let x = x[0].clone().reshape([b, l, h, d]);
                    reference::rope(x, c2.clone(), s2.clone()).reshape([n])
                }),
            );
        }
        // Flash attention (bf16 only; f32 runs the eager path): odd
        // lengths (partial tiles), grouped heads, every compiled head dim.
        for (b, l, hq, hk, d) in [
            (2, 100, 4, 2, 64),
            (1, 130, 2, 2, 128),
            (1, 77, 4, 1, 16),
            (1, 64, 2, 1, 32),
            (1, 4096, 16, 4, 128),
        ]
        .into_iter()
        .filter(|s| dtype == DType::BF16 && (large || s.1 < 1000))
        {
            let (nq, nk) = (b * l * hq * d, b * l * hk * d);
            let split = move |x: &Inputs<B>| {
                (
                    x[0].clone().reshape([b, l, hq, d]),
                    x[1].clone().reshape([b, l, hk, d]),
                    x[2].clone().reshape([b, l, hk, d]),
                )
            };
            let scale = (d as f64).powf(-0.5);
            check(
                &format!("attention_{b}x{l}x{hq}x{hk}x{d}"),
                dtype,
                &[vec![nq], vec![nk], vec![nk]],
                Box::new(move |x| {
                    let (q, k, v) = split(x);
                    ops::attention(q, k, v, scale).reshape([nq])
                }),
                Box::new(move |x| {
                    let (q, k, v) = split(x);
                    reference::attention(q, k, v, scale).reshape([nq])
                }),
            );
        }
        // Embedding gradients: ids repeated (few distinct ids), rows wider
        // than one pass of the kernel (4096 columns), more than 256 positions.
        for (b, l, v, d, ids) in [
            (2, 37, 50, 24, 10),
            (2, 300, 1000, 5000, 7),
            (1, 4096, 128256, 2048, 3000),
        ]
        .into_iter()
        .filter(|s| large || s.2 < 10_000)
        {
            let t = Tensor::<B, 2, burn::tensor::Int>::random(
                [b, l],
                Distribution::Uniform(0.0, ids as f64),
                device,
            );
            let t2 = t.clone();
            check(
                &format!("embedding_{b}x{l}_v{v}_d{d}"),
                dtype,
                &[vec![v, d]],
                Box::new(move |x| {
                    ops::embedding(x[0].clone().reshape([v, d]), t.clone()).reshape([b * l * d])
                }),
                Box::new(move |x| {
                    burn::tensor::module::embedding(x[0].clone().reshape([v, d]), t2.clone())
                        .reshape([b * l * d])
                }),
            );
        }
        for (rows, v, z) in [(37, 1000, 0.0), (5, 1001, 1e-4), (4096, 128256, 1e-4)]
            .into_iter()
            .filter(|s| large || s.0 < 1000)
        {
            let t = Tensor::<B, 1, burn::tensor::Int>::random(
                [rows],
                Distribution::Uniform(0.0, v as f64),
                device,
            );
            let t2 = t.clone();
            check(
                &format!("cross_entropy_{rows}x{v}_z{z}"),
                dtype,
                &[vec![rows, v]],
                Box::new(move |x| {
                    ops::cross_entropy_rows(x[0].clone().reshape([rows, v]), t.clone(), z)
                }),
                Box::new(move |x| {
                    reference::cross_entropy_rows(x[0].clone().reshape([rows, v]), t2.clone(), z)
                }),
            );
        }
        for (b, l, h, p, gated) in [
            (2, 37, 4, 8, true),
            (1, 4096, 64, 64, true),
            (2, 50, 3, 5, false),
            // The vectorised norm's other widths: 2048 and 8192 (Bamba-9B's gated norm).
            (2, 256, 32, 64, false),
            (1, 1024, 128, 64, true),
        ]
        .into_iter()
        .filter(|s| large || s.1 < 1000)
        {
            let d = h * p;
            check(
                &format!("rms_norm{}_{b}x{l}x{d}", if gated { "_gated" } else { "" }),
                dtype,
                &[vec![b, l, d], vec![b, l, d], vec![d]],
                Box::new(move |x| {
                    let z = gated.then(|| x[1].clone().reshape([b, l, d]));
                    ops::rms_norm(x[0].clone().reshape([b, l, d]), z, x[2].clone(), 1e-5)
                        .reshape([b * l * d])
                }),
                Box::new(move |x| {
                    let z = gated.then(|| x[1].clone().reshape([b, l, d]));
                    reference::rms_norm(x[0].clone().reshape([b, l, d]), z, x[2].clone(), 1e-5)
                        .reshape([b * l * d])
                }),
            );
            // Odd channel counts one per thread, even ones in pairs,
            // multiples of 16 bytes tiled (a part tile where d + 8 ends).
            for (k, bias, c) in [
                (4, true, d + 8),
                (3, false, d + 8),
                (4, true, d + 3),
                (3, false, d + 3),
                (4, false, d + 2),
                (3, true, d + 2),
                (4, true, d + 2),
            ] {
                let w = move |x: &Inputs<B>| x[1].clone().reshape([c, 1, k]).div_scalar(k as f64);
                let bs = move |x: &Inputs<B>| bias.then(|| x[2].clone());
                check(
                    &format!("conv1d_silu_k{k}_bias{bias}_{b}x{l}x{c}"),
                    dtype,
                    &[vec![b, l, c], vec![c * k], vec![c]],
                    Box::new(move |x| {
                        ops::conv1d_silu(x[0].clone().reshape([b, l, c]), w(x), bs(x))
                            .reshape([b * l * c])
                    }),
                    Box::new(move |x| {
                        reference::conv1d_silu(x[0].clone().reshape([b, l, c]), w(x), bs(x))
                            .reshape([b * l * c])
                    }),
                );
            }
            // Column slices of a wider tensor, as the Mamba mixer's `in_proj`
            // splits arrive: read in place with a row stride (the start is
            // aligned, the width is not), gradients through the shared buffer.
            if gated && large {
                let (pad, wide) = (128, d + 3 + 128 + 5);
                let cut = move |x: &Inputs<B>, ours: bool, n: usize| {
                    let t = x[0].clone().reshape([b, l, wide]);
                    if ours {
                        ops::narrow(t, 2, pad, n)
                    } else {
                        t.narrow(2, pad, n)
                    }
                };
                check(
                    &format!("rms_norm_gated_z_slice_{b}x{l}x{d}"),
                    dtype,
                    &[vec![b, l, wide], vec![b, l, d], vec![d]],
                    Box::new(move |x| {
                        let y = x[1].clone().reshape([b, l, d]);
                        ops::rms_norm(y, Some(cut(x, true, d)), x[2].clone(), 1e-5)
                            .reshape([b * l * d])
                    }),
                    Box::new(move |x| {
                        let y = x[1].clone().reshape([b, l, d]);
                        reference::rms_norm(y, Some(cut(x, false, d)), x[2].clone(), 1e-5)
                            .reshape([b * l * d])
                    }),
                );
                for c in [d + 3, d + 2, d + 8] {
                    let k = 4;
                    check(
                        &format!("conv1d_silu_x_slice_{b}x{l}x{c}"),
                        dtype,
                        &[vec![b, l, wide], vec![c * k], vec![c]],
                        Box::new(move |x| {
                            let w = x[1].clone().reshape([c, 1, k]).div_scalar(k as f64);
                            ops::conv1d_silu(cut(x, true, c), w, Some(x[2].clone()))
                                .reshape([b * l * c])
                        }),
                        Box::new(move |x| {
                            let w = x[1].clone().reshape([c, 1, k]).div_scalar(k as f64);
                            reference::conv1d_silu(cut(x, false, c), w, Some(x[2].clone()))
                                .reshape([b * l * c])
                        }),
                    );
                }
            }
            for (lo, hi) in [(0.0, f64::INFINITY), (0.001, 0.6)] {
                check(
                    &format!("dt_softplus_{lo}_{hi}_{b}x{l}x{h}"),
                    dtype,
                    &[vec![b, l, h], vec![h]],
                    Box::new(move |x| {
                        ops::dt_softplus(x[0].clone().reshape([b, l, h]), x[1].clone(), lo, hi)
                            .reshape([b * l * h])
                    }),
                    Box::new(move |x| {
                        reference::dt_softplus(
                            x[0].clone().reshape([b, l, h]),
                            x[1].clone(),
                            lo,
                            hi,
                        )
                        .reshape([b * l * h])
                    }),
                );
            }
            check(
                &format!("scale_heads_{b}x{l}x{h}x{p}"),
                dtype,
                &[vec![b, l, h, p], vec![h]],
                Box::new(move |x| {
                    ops::scale_heads(x[0].clone().reshape([b, l, h, p]), x[1].clone())
                        .reshape([b * l * h * p])
                }),
                Box::new(move |x| {
                    reference::scale_heads(x[0].clone().reshape([b, l, h, p]), x[1].clone())
                        .reshape([b * l * h * p])
                }),
            );
        }
    }
    Ok(ok)
}
