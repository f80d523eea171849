//! Gradients of the [`BambaBackend`] hooks, so that a backend's kernels run
//! in the backward pass too (burn's own autodiff `matmul` would call the
//! inner backend's stock matmul for both gradient GEMMs).

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary};
use burn::tensor::TensorMetadata;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};

use super::BambaBackend;

/// `C = A B`: `dA = dC B^T`, `dB = A^T dC`, both through the inner hook.
#[derive(Debug)]
struct Matmul;

impl<B: BambaBackend> Backward<B, 2> for Matmul {
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let (lhs, rhs) = ops.state;
        let lhs: Option<FloatTensor<B>> = lhs.map(|id| ckpt.retrieve_node_output(id));
        let rhs: Option<FloatTensor<B>> = rhs.map(|id| ckpt.retrieve_node_output(id));
        binary::<B, _, _>(
            ops.parents,
            ops.node,
            grads,
            |grad| B::bamba_matmul(grad, B::float_transpose(rhs.expect("rhs saved"))),
            |grad| B::bamba_matmul(B::float_transpose(lhs.expect("lhs saved")), grad),
        );
    }
}

impl<B: BambaBackend, C: CheckpointStrategy> BambaBackend for Autodiff<B, C> {
    fn bamba_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let (ls, rs) = (lhs.shape(), rhs.shape());
        let batch = |s: &burn::tensor::Shape| s[..s.len() - 2].to_vec();
        if batch(&ls) != batch(&rs) {
            // Broadcast batch dims: burn's op sums the gradient over them.
            return Self::float_matmul(lhs, rhs);
        }
        let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
        match Matmul
            .prepare::<C>([lhs.node.clone(), rhs.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                // Each gradient needs only the *other* operand.
                let lhs_state = rhs_tracked.then(|| prep.checkpoint(&lhs));
                let rhs_state = lhs_tracked.then(|| prep.checkpoint(&rhs));
                let out = B::bamba_matmul(lhs.primitive, rhs.primitive);
                prep.finish((lhs_state, rhs_state), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_matmul(lhs.primitive, rhs.primitive)),
        }
    }
}
