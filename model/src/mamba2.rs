//! The Mamba2 mixer of a Bamba layer (HF's `BambaMixer`): in_proj, causal
//! depthwise conv, the SSD scan with D skip, gated RMSNorm, out_proj.

// `A_log` and `D` keep HF's parameter names: the module path is the checkpoint name.
#![allow(non_snake_case)]

use crate::ops::{BambaBackend, Remake, conv1d_silu, dt_softplus, narrow, reshape_view};
use burn::module::{Module, Param};
use burn::tensor::Tensor;

use crate::config::BambaConfig;
use crate::error::ModelError;
use crate::linear::Linear;
use crate::norm::RmsNormGated;
use crate::params::VarBuilder;
use crate::ssd::ssd_chunked;

/// Depthwise causal conv over the sequence, weight `[channels, 1, d_conv]` as
/// in `torch.nn.Conv1d(groups=channels)`.
#[derive(Module, Debug)]
pub struct CausalConv1d<B: BambaBackend> {
    pub weight: Param<Tensor<B, 3>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: BambaBackend> CausalConv1d<B> {
    /// `silu(conv(x))`, `[b, l, c] -> [b, l, c]`; output `t` sees inputs
    /// `t-d_conv+1 ..= t`.
    pub fn forward_silu(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        conv1d_silu(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()))
    }
}

#[allow(non_snake_case)]
#[derive(Module, Debug)]
pub struct BambaMixer<B: BambaBackend> {
    pub in_proj: Linear<B>,
    pub conv1d: CausalConv1d<B>,
    pub dt_bias: Param<Tensor<B, 1>>,
    pub A_log: Param<Tensor<B, 1>>,
    pub D: Param<Tensor<B, 1>>,
    pub norm: RmsNormGated<B>,
    pub out_proj: Linear<B>,
    pub n_heads: usize,
    pub d_head: usize,
    pub n_groups: usize,
    pub d_state: usize,
    pub chunk_size: usize,
    pub dt_min: f64,
    pub dt_max: f64,
}

impl<B: BambaBackend> BambaMixer<B> {
    pub fn new(vb: &VarBuilder<B>, cfg: &BambaConfig) -> Result<Self, ModelError> {
        let (h, di, cd, nh) = (
            cfg.hidden_size,
            cfg.d_inner(),
            cfg.conv_dim(),
            cfg.mamba_n_heads,
        );
        let conv = vb.pp("conv1d");
        Ok(Self {
            in_proj: Linear::new(&vb.pp("in_proj"), h, cfg.in_proj_dim(), cfg.mamba_proj_bias)?,
            conv1d: CausalConv1d {
                weight: conv.get("weight", [cd, 1, cfg.mamba_d_conv])?,
                bias: if cfg.mamba_conv_bias {
                    Some(conv.get("bias", [cd])?)
                } else {
                    None
                },
            },
            dt_bias: vb.get("dt_bias", [nh])?,
            A_log: vb.get("A_log", [nh])?,
            D: vb.get("D", [nh])?,
            norm: RmsNormGated::new(&vb.pp("norm"), di, cfg.rms_norm_eps)?,
            out_proj: Linear::new(&vb.pp("out_proj"), di, h, cfg.mamba_proj_bias)?,
            n_heads: nh,
            d_head: cfg.mamba_d_head,
            n_groups: cfg.mamba_n_groups,
            d_state: cfg.mamba_d_state,
            chunk_size: cfg.mamba_chunk_size,
            dt_min: cfg.time_step_limit.0,
            dt_max: cfg.time_step_limit.1,
        })
    }

    /// With `remake` (how to make `x` again), the products' backward makes
    /// `x` and the gated norm's output again instead of keeping them.
    pub fn forward(&self, x: Tensor<B, 3>, remake: Option<Remake<B>>) -> Tensor<B, 3> {
        let [b, l, _] = x.dims();
        let remade = remake.is_some();
        let (nh, p, g, n) = (self.n_heads, self.d_head, self.n_groups, self.d_state);
        let di = nh * p;

        // in_proj splits, in this order: z (gate), xBC (conv input), dt.
        let proj = self.in_proj.forward_remade(x, remake);
        let conv_dim = di + 2 * g * n;
        // (`narrow` of `ops`: the three share one gradient buffer.)
        let z = narrow(proj.clone(), 2, 0, di);
        let xbc = narrow(proj.clone(), 2, di, conv_dim);
        let dt = narrow(proj, 2, di + conv_dim, nh);

        let xbc = self.conv1d.forward_silu(xbc);
        // A view: scale_rows and ssd_out read x with the conv output's row stride.
        let xs = reshape_view(narrow(xbc.clone(), 2, 0, di), [b, l, nh, p]);
        let bm = narrow(xbc.clone(), 2, di, g * n).reshape([b, l, g, n]);
        let cm = narrow(xbc, 2, di + g * n, g * n).reshape([b, l, g, n]);

        let dt = dt_softplus(dt, self.dt_bias.val(), self.dt_min, self.dt_max);
        let a = self.A_log.val().exp().neg();

        let y = ssd_chunked(xs, dt, a, bm, cm, self.D.val(), self.chunk_size, remade);
        let y = y.reshape([b, l, di]);
        let again = remade.then(|| self.norm.remake(&y, &z));
        self.out_proj.forward_remade(self.norm.forward(y, z), again)
    }
}
