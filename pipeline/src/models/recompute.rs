//! Gradient checkpointing (`--gradient_checkpointing`): a block's forward pass keeps only its
//! inputs, and the backward pass runs the block again to rebuild the activations its gradients
//! need, as `torch.utils.checkpoint` does for sd-scripts.
//!
//! [`checkpointed`] runs a block with detached inputs, keeps its output and drops everything in
//! between, then records one graph node over the inputs whose backward recomputes the block with
//! gradients. That inner backward yields the gradients of the block's inputs, which go back into
//! the outer graph, and of the trainable variables inside the block (LoRA weights), which candle's
//! graph cannot route out of a custom op: they are collected per thread and added to the outer
//! gradients by [`backward`], which training must use instead of `Tensor::backward`. A block
//! with nothing to train whose inputs carry no gradient gets no node: nothing to recompute.
//!
//! The recomputation repeats the forward pass exactly: the LoRA dropout masks are drawn from the
//! micro-batch's stream and the module's index, which do not change between the two passes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, Tensor, TensorId,
    Var,
};

use super::frozen::into_storage;

thread_local! {
    /// Gradients of trainable variables found by recomputations during the current backward pass.
    static RECOMPUTED: RefCell<HashMap<TensorId, Tensor>> = RefCell::new(HashMap::new());
}

/// A block that can be run again in the backward pass: a function of its input activations and
/// one conditioning tensor (the time embedding of a resnet, the text context of a transformer
/// block). Cloning must be cheap (weights are shared).
pub trait Recomputable: Clone + Send + Sync + 'static {
    /// The block's forward pass.
    fn run(&self, x: &Tensor, condition: &Tensor) -> candle_core::Result<Tensor>;
}

/// `block.run(x, condition)` with gradient checkpointing: the same value, with the same
/// gradients, but only the inputs and the output are kept until the backward pass (on every
/// device: the node's forward pass only hands over the output the block computed).
pub fn checkpointed<B: Recomputable>(
    block: &B,
    x: &Tensor,
    condition: &Tensor,
) -> candle_core::Result<Tensor> {
    let output = block.run(&x.detach(), &condition.detach())?;
    if !output.track_op() && !x.track_op() && !condition.track_op() {
        // Nothing inside trains and no gradient goes back to the inputs (the blocks before the
        // first trained module): no node, so the backward pass does not run the block again.
        return Ok(output);
    }
    // Detaching the result drops the graph of the block, and with it every activation inside.
    let output = output.detach();
    // A variable among the node's inputs makes candle record the node even where neither input
    // tracks gradients, so the variables inside the block are always reached.
    let anchor = Var::zeros(1, DType::F32, x.device())?;
    x.apply_op3(
        condition,
        anchor.as_tensor(),
        Recompute {
            block: block.clone(),
            output: HandedOver::new("checkpointed block", output),
        },
    )
}

/// `loss.backward()`, with the gradients that checkpointed blocks found for their variables added
/// in.
pub fn backward(loss: &Tensor) -> candle_core::Result<GradStore> {
    RECOMPUTED.with(|found| found.borrow_mut().clear());
    let result = loss.backward();
    // Taken before any error returns, so nothing is left for the next pass.
    let found = RECOMPUTED.with(|found| std::mem::take(&mut *found.borrow_mut()));
    let mut grads = result?;
    for (id, grad) in found {
        let total = match grads.get_id(id) {
            Some(direct) => (direct + grad)?,
            None => grad,
        };
        grads.insert_id(id, total);
    }
    Ok(grads)
}

/// A node's value computed before the node was made, handed to candle by the node's forward
/// pass (once).
struct HandedOver {
    /// The node, for messages.
    node: &'static str,
    value: Mutex<Option<Tensor>>,
}

impl HandedOver {
    fn new(node: &'static str, value: Tensor) -> Self {
        HandedOver {
            node,
            value: Mutex::new(Some(value)),
        }
    }

    /// The value's storage.
    fn take(&self) -> candle_core::Result<(Storage, Shape)> {
        let node = self.node;
        let value = (self.value.lock())
            .map_err(|_| candle_core::Error::Msg(format!("{node}: poisoned lock")))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{node} ran twice")))?;
        into_storage(value)
    }

    /// The value's storage, on the CPU.
    fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.take()? {
            (Storage::Cpu(storage), shape) => Ok((storage, shape)),
            _ => candle_core::bail!("{}: the value is not on the CPU", self.node),
        }
    }

    /// The value's storage, on the CUDA device.
    fn cuda(&self) -> candle_core::Result<(CudaStorage, Shape)> {
        match self.take()? {
            (Storage::Cuda(storage), shape) => Ok((storage, shape)),
            _ => candle_core::bail!("{}: the value is not on the CUDA device", self.node),
        }
    }
}

/// The graph node of a checkpointed block.
struct Recompute<B> {
    block: B,
    /// The block's output, computed before the node was made.
    output: HandedOver,
}

impl<B: Recomputable> CustomOp3 for Recompute<B> {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn bwd(
        &self,
        x: &Tensor,
        condition: &Tensor,
        _anchor: &Tensor,
        _output: &Tensor,
        grad_output: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Inputs that carry gradients become variables of the recomputed graph.
        let input = |t: &Tensor| -> candle_core::Result<(Tensor, Option<Var>)> {
            if t.track_op() {
                let var = Var::from_tensor(&t.detach())?;
                Ok((var.as_tensor().clone(), Some(var)))
            } else {
                Ok((t.detach(), None))
            }
        };
        let (x_in, x_var) = input(x)?;
        let (condition_in, condition_var) = input(condition)?;
        let output = self.block.run(&x_in, &condition_in)?;
        // The outer gradient flows into the block unchanged.
        let surrogate = output.apply_op1(GradientSeed::new(grad_output, output.device())?)?;
        let variables: Vec<Tensor> = (surrogate.sorted_nodes().into_iter())
            .filter(|node| node.is_variable())
            .cloned()
            .collect();
        let mut grads = surrogate.backward()?;
        let mut input_grad = |var: Option<Var>| var.and_then(|v| grads.remove(v.as_tensor()));
        let (x_grad, condition_grad) = (input_grad(x_var), input_grad(condition_var));
        RECOMPUTED.with(|found| -> candle_core::Result<()> {
            let mut found = found.borrow_mut();
            for variable in &variables {
                if let Some(grad) = grads.remove(variable) {
                    let total = match found.remove(&variable.id()) {
                        Some(earlier) => (earlier + grad)?,
                        None => grad,
                    };
                    found.insert(variable.id(), total);
                }
            }
            Ok(())
        })?;
        Ok((x_grad, condition_grad, None))
    }
}

/// The root of a recomputed block's graph: a scalar node over the block's output whose backward
/// pass hands the outer gradient `g` to the output as it is. It stands for `sum(output · g)`
/// without computing the product and the sum, whose backward would cost several more passes over
/// the output. Its value (zero) is never used.
struct GradientSeed {
    gradient: Tensor,
    value: HandedOver,
}

impl GradientSeed {
    fn new(gradient: &Tensor, device: &candle_core::Device) -> candle_core::Result<Self> {
        let value = Tensor::zeros((), DType::F32, device)?;
        Ok(GradientSeed {
            gradient: gradient.detach(),
            value: HandedOver::new("gradient seed", value),
        })
    }
}

impl CustomOp1 for GradientSeed {
    fn name(&self) -> &'static str {
        "gradient-seed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.value.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.value.cuda()
    }

    /// The node is the root of the backward pass, so its own gradient is 1.
    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.gradient.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `x · scale + condition`, its scale trainable or fixed.
    #[derive(Clone)]
    struct Scaled {
        scale: Tensor,
    }

    impl Recomputable for Scaled {
        fn run(&self, x: &Tensor, condition: &Tensor) -> candle_core::Result<Tensor> {
            x.broadcast_mul(&self.scale)? + condition
        }
    }

    #[test]
    fn a_block_with_nothing_to_train_on_untracked_inputs_makes_no_node() {
        let device = Device::Cpu;
        let x = Tensor::new(&[1f32, 2.0, 3.0], &device).unwrap();
        let condition = Tensor::new(&[0.5f32, 0.5, 0.5], &device).unwrap();
        let fixed = Scaled {
            scale: Tensor::new(&[2f32], &device).unwrap(),
        };
        let output = checkpointed(&fixed, &x, &condition).unwrap();
        assert!(!output.track_op(), "nothing to recompute: no node");
        assert_eq!(output.to_vec1::<f32>().unwrap(), [2.5, 4.5, 6.5]);

        // A trainable scale inside the same block on the same inputs still gets its gradient,
        // found by recomputing the block: d(sum(x · s + c))/ds = sum(x).
        let scale = Var::new(&[2f32], &device).unwrap();
        let trained = Scaled {
            scale: scale.as_tensor().clone(),
        };
        let output = checkpointed(&trained, &x, &condition).unwrap();
        assert!(output.track_op());
        assert_eq!(output.to_vec1::<f32>().unwrap(), [2.5, 4.5, 6.5]);
        let grads = backward(&output.sum_all().unwrap()).unwrap();
        let grad = grads.get(scale.as_tensor()).expect("the scale's gradient");
        assert_eq!(grad.to_vec1::<f32>().unwrap(), [6.0]);
    }
}
