//! Operands made again in backward instead of kept: the elementwise
//! outputs that feed the projections (the norms' outputs, the gated norm's,
//! SwiGLU's) are as large as the GEMM outputs they come from, but the op
//! that made each one keeps its inputs anyway. Recomputing them costs one
//! memory-bound kernel each in backward (torchtitan's op-level selective
//! checkpointing keeps the same set: the products' outputs). The SSD's
//! decayed inputs and its entering states' part are made again the same way
//! (mamba_ssm's backward recomputes everything past the scan's inputs).

//!
//! A Linear's weight can be made again too: FSDP's reshard after forward
//! frees a unit's gathered parameters once its forward has run and gathers
//! them again for its backward; the products then keep a [`ReshardSlot`]
//! that the gather fills, not the weights (see [`with_resharded`]).

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use burn::module::ParamId;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};

use super::{BambaBackend, pieces};

/// Which operand of a product its backward makes again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Side {
    Lhs,
    Rhs,
}

/// How to make an operand again, from tensors that are kept anyway.
#[derive(Clone, Debug)]
pub enum Remake<B: Backend> {
    /// `silu(g) * u`, `[b, l, m]` each.
    Swiglu(FloatTensor<B>, FloatTensor<B>),
    /// `w * rmsnorm(x)` or the gated `w * rmsnorm(x * silu(z))`, `x [b, l, d]`.
    RmsNorm {
        x: FloatTensor<B>,
        z: Option<FloatTensor<B>>,
        w: FloatTensor<B>,
        eps: f64,
    },
    /// The SSD's decayed inputs `x * s`, `x [b, nc, q, h, p]`, `s [b, nc,
    /// q, h]`, as `[b, nc, q, h * p]`; of `groups` equal parts of the heads,
    /// part `part`.
    ScaleRows {
        x: FloatTensor<B>,
        s: FloatTensor<B>,
        part: usize,
        groups: usize,
    },
    /// [`group_products`] of `c` and `e` (the SSD's entering states' part).
    GroupProducts {
        c: FloatTensor<B>,
        e: FloatTensor<B>,
        groups: usize,
    },
    /// A Linear's weight `[out, in]`, transposed as its product reads it,
    /// from elements `offset..` of the unit's flat buffer in `slot`.
    Weight {
        slot: ReshardSlot,
        offset: usize,
        shape: [usize; 2],
    },
}

/// A unit's gathered flat buffer, present only while its backward runs:
/// the FSDP wrapper fills it from a fresh all-gather before the unit's
/// backward and empties it after. Type-erased, as it holds the inner
/// backend's tensor while the recipes that read it are built on the
/// autodiff backend.
#[derive(Clone, Default)]
pub struct ReshardSlot(Arc<Mutex<Option<Box<dyn Any + Send>>>>);

impl std::fmt::Debug for ReshardSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let filled = self.0.lock().map(|s| s.is_some()).unwrap_or(false);
        write!(f, "ReshardSlot(filled: {filled})")
    }
}

impl ReshardSlot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts the unit's gathered buffer (the inner backend's) in place.
    pub fn fill<B: Backend>(&self, flat: FloatTensor<B>) {
        *self.0.lock().expect("reshard slot lock") = Some(Box::new(flat));
    }

    /// Drops the buffer (the unit's backward is done).
    pub fn clear(&self) {
        *self.0.lock().expect("reshard slot lock") = None;
    }

    fn get<B: Backend>(&self) -> FloatTensor<B> {
        let slot = self.0.lock().expect("reshard slot lock");
        let flat = slot
            .as_ref()
            .expect("a resharded unit is gathered again before its backward");
        flat.downcast_ref::<FloatTensor<B>>()
            .expect("the slot holds the backend's own tensor")
            .clone()
    }
}

thread_local! {
    /// The weights whose products read them from a slot in backward, by
    /// parameter, while [`with_resharded`] runs.
    static RESHARDED: RefCell<HashMap<ParamId, (ReshardSlot, usize)>> =
        RefCell::new(HashMap::new());
}

/// Runs `f` (a unit's forward) with the products of `weights` (parameter ->
/// its slot and offset in the unit's flat buffer) keeping a [`Remake::Weight`]
/// recipe instead of the weight, so that the gathered buffer can be freed
/// once `f` returns.
pub fn with_resharded<R>(
    weights: HashMap<ParamId, (ReshardSlot, usize)>,
    f: impl FnOnce() -> R,
) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            RESHARDED.with(|r| r.borrow_mut().clear());
        }
    }
    RESHARDED.with(|r| *r.borrow_mut() = weights);
    let _reset = Reset;
    f()
}

/// The recipe for weight `id` (`[out, in]`) if its unit is resharded.
pub(crate) fn resharded_weight<B: Backend>(id: ParamId, shape: [usize; 2]) -> Option<Remake<B>> {
    RESHARDED.with(|r| {
        r.borrow().get(&id).map(|(slot, offset)| Remake::Weight {
            slot: slot.clone(),
            offset: *offset,
            shape,
        })
    })
}

/// Group `i`'s columns of `lhs [.., g * k]` times group `i`'s columns of
/// `rhs [.., k, g * w]`, concatenated: `[.., m, g * w]`. (The SSD's
/// entering-state part: a group's `C` serves its heads' states.)
pub fn group_products<B: BambaBackend>(
    lhs: Tensor<B, 4>,
    rhs: Tensor<B, 4>,
    groups: usize,
) -> Tensor<B, 4> {
    if groups == 1 {
        return super::matmul(lhs, rhs);
    }
    let (k, w) = (lhs.dims()[3] / groups, rhs.dims()[3] / groups);
    let parts = (0..groups)
        .map(|i| {
            super::matmul(
                super::narrow(lhs.clone(), 3, i * k, k),
                super::narrow(rhs.clone(), 3, i * w, w),
            )
        })
        .collect();
    Tensor::cat(parts, 3)
}

fn float<B: BambaBackend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: BambaBackend, const D: usize>(t: &Tensor<B, D>) -> FloatTensor<B> {
    t.clone().into_primitive().tensor()
}

impl<B: BambaBackend> Remake<B> {
    pub fn swiglu(g: &Tensor<B, 3>, u: &Tensor<B, 3>) -> Self {
        Self::Swiglu(prim(g), prim(u))
    }

    pub fn rms_norm(
        x: &Tensor<B, 3>,
        z: Option<&Tensor<B, 3>>,
        w: &Tensor<B, 1>,
        eps: f64,
    ) -> Self {
        Self::RmsNorm {
            x: prim(x),
            z: z.map(prim),
            w: prim(w),
            eps,
        }
    }

    /// `x [b, nc, q, h, p] * s [b, nc, q, h]`, part `part` of `groups`.
    pub fn scale_rows(x: &Tensor<B, 5>, s: &Tensor<B, 4>, part: usize, groups: usize) -> Self {
        Self::ScaleRows {
            x: prim(x),
            s: prim(s),
            part,
            groups,
        }
    }

    pub fn group_products(c: &Tensor<B, 4>, e: &Tensor<B, 4>, groups: usize) -> Self {
        Self::GroupProducts {
            c: prim(c),
            e: prim(e),
            groups,
        }
    }

    /// The operand, by the same ops that made it in forward (the caller
    /// reshapes it to the operand's shape).
    pub fn run(self) -> FloatTensor<B> {
        match self {
            Self::Swiglu(g, u) => pieces::swiglu::<B>(float(g), float(u))
                .into_primitive()
                .tensor(),
            Self::RmsNorm { x, z, w, eps } => {
                pieces::rms_norm::<B>(float(x), z.map(float), float(w), eps)
                    .into_primitive()
                    .tensor()
            }
            Self::ScaleRows { x, s, part, groups } => {
                let y: Tensor<B, 5> = pieces::scale_rows(float(x), float::<B, 4>(s));
                let [b, nc, q, h, p] = y.dims();
                let y = y.reshape([b, nc, q, h * p]);
                let w = h * p / groups;
                let y = if groups == 1 {
                    y
                } else {
                    super::narrow(y, 3, part * w, w)
                };
                y.into_primitive().tensor()
            }
            Self::GroupProducts { c, e, groups } => group_products::<B>(float(c), float(e), groups)
                .into_primitive()
                .tensor(),
            Self::Weight {
                slot,
                offset,
                shape,
            } => float::<B, 1>(slot.get::<B>())
                .narrow(0, offset, shape[0] * shape[1])
                .reshape(shape)
                .transpose()
                .into_primitive()
                .tensor(),
        }
    }

    /// The same recipe on `f(t)` of each tensor (autodiff -> inner backend).
    pub(crate) fn map<B2: Backend>(
        self,
        f: impl Fn(FloatTensor<B>) -> FloatTensor<B2>,
    ) -> Remake<B2> {
        match self {
            Self::Swiglu(g, u) => Remake::Swiglu(f(g), f(u)),
            Self::RmsNorm { x, z, w, eps } => Remake::RmsNorm {
                x: f(x),
                z: z.map(&f),
                w: f(w),
                eps,
            },
            Self::ScaleRows { x, s, part, groups } => Remake::ScaleRows {
                x: f(x),
                s: f(s),
                part,
                groups,
            },
            Self::GroupProducts { c, e, groups } => Remake::GroupProducts {
                c: f(c),
                e: f(e),
                groups,
            },
            Self::Weight {
                slot,
                offset,
                shape,
            } => Remake::Weight {
                slot,
                offset,
                shape,
            },
        }
    }
}

/// `lhs @ rhs` where the operand on `side` is the output of `remake`
/// (reshaped): its gradient remakes that operand rather than keeping it
/// alive until backward.
pub fn matmul_remade<B: BambaBackend, const D: usize>(
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
    remake: Remake<B>,
    side: Side,
) -> Tensor<B, D> {
    if lhs.dtype() != rhs.dtype() {
        return super::matmul(lhs, rhs);
    }
    let (l, r) = (lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
    float(B::bamba_matmul_remade(l, r, sides(remake, side), false))
}

/// `lhs @ rhs` where either operand may be made again in backward (see
/// [`matmul_remade`]); both `None` is [`super::matmul`].
pub fn matmul_remade_both<B: BambaBackend, const D: usize>(
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
    lhs_remake: Option<Remake<B>>,
    rhs_remake: Option<Remake<B>>,
) -> Tensor<B, D> {
    if lhs.dtype() != rhs.dtype() || (lhs_remake.is_none() && rhs_remake.is_none()) {
        return super::matmul(lhs, rhs);
    }
    let (l, r) = (lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
    float(B::bamba_matmul_remade(
        l,
        r,
        [lhs_remake, rhs_remake],
        false,
    ))
}

fn sides<B: Backend>(remake: Remake<B>, side: Side) -> [Option<Remake<B>>; 2] {
    match side {
        Side::Lhs => [Some(remake), None],
        Side::Rhs => [None, Some(remake)],
    }
}

/// [`super::matmul_f32`] with an operand made again in backward (see
/// [`matmul_remade`]).
pub fn matmul_f32_remade<B: BambaBackend, const D: usize>(
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
    remake: Remake<B>,
    side: Side,
) -> Tensor<B, D> {
    if lhs.dtype() != rhs.dtype() {
        return super::matmul_f32(lhs, rhs);
    }
    let f32_out = lhs.dtype() != DType::F32;
    let (l, r) = (lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
    float(B::bamba_matmul_remade(l, r, sides(remake, side), f32_out))
}
