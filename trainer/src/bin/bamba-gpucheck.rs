//! `bamba-gpucheck`: runs the model's building blocks on the CPU backend and
//! on CUDA from the same inputs and prints the largest difference of each, to
//! find which GPU kernel disagrees. Timings are not its business.

use bamba_model::ssd::ssd_chunked;
use bamba_model::{BambaConfig, BambaForCausalLM};
use bamba_train::backend::{Cpu, Cuda};
use burn::tensor::activation::{silu, softplus};
use burn::tensor::backend::Backend;
use burn::tensor::module::conv1d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Bool, Distribution, Int, Tensor, TensorData};

type G = Cuda<f32>;

fn to_gpu<const D: usize>(t: &Tensor<Cpu, D>) -> Tensor<G, D> {
    Tensor::from_data(t.to_data(), &Default::default())
}

fn report<const D: usize>(name: &str, cpu: Tensor<Cpu, D>, gpu: Tensor<G, D>) {
    let a = cpu.into_data().to_vec::<f32>().unwrap();
    let b = gpu.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-20);
    let err = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let nan = b.iter().filter(|v| !v.is_finite()).count();
    println!(
        "{{\"op\":\"{name}\",\"max_abs\":{err:e},\"rel\":{:e},\"nonfinite\":{nan},\"n\":{}}}",
        err / scale,
        a.len()
    );
}

fn rand<const D: usize>(shape: [usize; D]) -> Tensor<Cpu, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

fn main() {
    let dev = Default::default();
    // matmuls: plain, transposed rhs, batched rank 5 with expanded operands
    let (a, b) = (rand([96, 64]), rand([64, 80]));
    report(
        "matmul_2d",
        a.clone().matmul(b.clone()),
        to_gpu(&a).matmul(to_gpu(&b)),
    );
    let w = rand([80, 64]);
    report(
        "matmul_transposed",
        a.clone().matmul(w.clone().transpose()),
        to_gpu(&a).matmul(to_gpu(&w).transpose()),
    );
    let (x5, y5) = (rand([2, 3, 4, 16, 8]), rand([2, 3, 4, 8, 16]));
    report(
        "matmul_5d",
        x5.clone().matmul(y5.clone()),
        to_gpu(&x5).matmul(to_gpu(&y5)),
    );
    let e = rand([2, 1, 4, 16, 8]);
    let ecpu = e.clone().expand([2, 3, 4, 16, 8]);
    let egpu = to_gpu(&e).expand([2, 3, 4, 16, 8]);
    report(
        "matmul_expanded",
        ecpu.matmul(y5.clone()),
        egpu.matmul(to_gpu(&y5)),
    );
    let p = rand([2, 4, 3, 16, 8]);
    report(
        "matmul_permuted",
        p.clone().swap_dims(3, 4).matmul(
            x5.clone()
                .narrow(1, 0, 2)
                .swap_dims(1, 2)
                .narrow(1, 0, 4)
                .narrow(2, 0, 3)
                .swap_dims(1, 2)
                .swap_dims(3, 4)
                .swap_dims(3, 4),
        ),
        to_gpu(&p).swap_dims(3, 4).matmul(
            to_gpu(&x5)
                .narrow(1, 0, 2)
                .swap_dims(1, 2)
                .narrow(1, 0, 4)
                .narrow(2, 0, 3)
                .swap_dims(1, 2)
                .swap_dims(3, 4)
                .swap_dims(3, 4),
        ),
    );
    // elementwise and scans
    let c = rand([2, 4, 3, 16]);
    report("cumsum_last", c.clone().cumsum(3), to_gpu(&c).cumsum(3));
    let c5 = rand([2, 4, 3, 16, 16]);
    report(
        "cumsum_dim3_of_5",
        c5.clone().cumsum(3),
        to_gpu(&c5).cumsum(3),
    );
    let m = Tensor::<Cpu, 2, Bool>::tril_mask([16, 16], -1, &dev)
        .unsqueeze::<5>()
        .expand([2, 4, 3, 16, 16]);
    let mg = Tensor::<G, 2, Bool>::tril_mask([16, 16], -1, &Default::default())
        .unsqueeze::<5>()
        .expand([2, 4, 3, 16, 16]);
    report(
        "mask_fill_expanded",
        c5.clone().mask_fill(m, 0.0),
        to_gpu(&c5).mask_fill(mg, 0.0),
    );
    let cu = c.clone().unsqueeze_dim::<5>(4).expand([2, 4, 3, 16, 16]);
    let cg = to_gpu(&c).unsqueeze_dim::<5>(4).expand([2, 4, 3, 16, 16]);
    report("expand_then_cumsum", cu.cumsum(3), cg.cumsum(3));
    report(
        "softplus",
        softplus(c.clone(), 1.0),
        softplus(to_gpu(&c), 1.0),
    );
    report("silu", silu(c.clone()), silu(to_gpu(&c)));
    report("exp", c.clone().exp(), to_gpu(&c).exp());
    // depthwise causal conv as the mixer runs it
    let (xc, wc, bc) = (rand([2, 24, 37]), rand([24, 1, 4]), rand([24]));
    let opts = || ConvOptions::new([1], [3], [1], 24);
    report(
        "conv1d_depthwise",
        conv1d(xc.clone(), wc.clone(), Some(bc.clone()), opts()),
        conv1d(to_gpu(&xc), to_gpu(&wc), Some(to_gpu(&bc)), opts()),
    );
    // the SSD scan
    let (xs, dt, av, bm, cm) = (
        rand([2, 37, 8, 16]),
        rand([2, 37, 8]).abs() * 0.1,
        rand([8]).abs().neg(),
        rand([2, 37, 2, 16]),
        rand([2, 37, 2, 16]),
    );
    report(
        "ssd_chunked",
        ssd_chunked(
            xs.clone(),
            dt.clone(),
            av.clone(),
            bm.clone(),
            cm.clone(),
            16,
        ),
        ssd_chunked(
            to_gpu(&xs),
            to_gpu(&dt),
            to_gpu(&av),
            to_gpu(&bm),
            to_gpu(&cm),
            16,
        ),
    );
    // the whole model
    let cfg = BambaConfig::tiny();
    let cpu_model = BambaForCausalLM::<Cpu>::init(&cfg, 1, &dev).unwrap();
    let gpu_model = BambaForCausalLM::<G>::init(&cfg, 1, &Default::default()).unwrap();
    let ids: Vec<i32> = (0..2 * 45)
        .map(|i| (i * 37 % cfg.vocab_size) as i32)
        .collect();
    let ci = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids.clone(), [2, 45]), &dev);
    let gi = Tensor::<G, 2, Int>::from_data(TensorData::new(ids, [2, 45]), &Default::default());
    report("model_logits", cpu_model.forward(ci), gpu_model.forward(gi));
    let _ = <G as Backend>::name(&Default::default());
}
