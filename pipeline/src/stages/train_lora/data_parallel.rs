//! Data-parallel training, as accelerate runs sd-scripts on several GPUs: every rank holds the
//! whole network, takes every `world_size`-th batch of the epoch's order, and the ranks' gradients
//! are averaged before each optimizer step, so every rank steps identically. Rank 0 writes the
//! files. With one rank nothing changes.
//!
//! A run of N ranks with gradient accumulation A trains the same batches per step, with the same
//! noise, as one process with accumulation N·A; with A = 1 the gradients are equal bit for bit.

use candle_core::{DType, Tensor, Var};

use crate::infra::collective::{Collective, Patience};
use crate::Result;

/// The epoch's batch positions rank `rank` of `world_size` trains on, in order: `rank`,
/// `rank + world_size`, ... When the batch count is not a multiple of `world_size`, the last
/// round wraps around to the epoch's first batches (accelerate's `even_batches`), so every rank
/// takes the same number of rounds.
pub fn rank_batches(batch_count: usize, rank: usize, world_size: usize) -> Vec<usize> {
    (0..rounds(batch_count, world_size))
        .map(|round| (round * world_size + rank) % batch_count)
        .collect()
}

/// Batches per rank and epoch: `batch_count / world_size`, rounded up.
pub fn rounds(batch_count: usize, world_size: usize) -> usize {
    batch_count.div_ceil(world_size.max(1))
}

/// The run-wide index of a micro-batch: it seeds the micro-batch's noise, timesteps, flips and
/// dropouts. With one rank it is the batch's place in the run; with several, a batch trained in
/// a wrapped round gets an index of its own.
pub fn micro_index(
    epoch: usize,
    round: usize,
    rounds_per_epoch: usize,
    rank: usize,
    world_size: usize,
) -> u64 {
    (((epoch - 1) * rounds_per_epoch + round) * world_size + rank) as u64
}

/// Sums one optimizer step's gradients (already divided by accumulation steps × ranks) and the
/// losses of its micro-batches over the ranks, in place. Afterwards `losses[k]` is the mean
/// loss of the ranks' k-th micro-batches and `grads` the mean gradient; a gradient absent on
/// every rank stays absent. Nothing happens with one rank.
pub fn reduce_step(
    group: &dyn Collective,
    vars: &[Var],
    grads: &mut [Option<Tensor>],
    losses: &mut [f32],
) -> Result<()> {
    let world_size = group.world_size();
    if world_size == 1 {
        return Ok(());
    }
    let device = match vars.first() {
        Some(var) => var.device().clone(),
        None => return Ok(()),
    };
    // One flat buffer: the losses, which gradients are present, then every gradient (zeros
    // where absent), reduced in one call.
    let presence: Vec<f32> = (grads.iter())
        .map(|g| if g.is_some() { 1.0 } else { 0.0 })
        .collect();
    let mut parts = vec![
        Tensor::new(&*losses, &device)?,
        Tensor::new(presence.as_slice(), &device)?,
    ];
    for (var, grad) in vars.iter().zip(grads.iter()) {
        parts.push(match grad {
            Some(grad) => grad.to_dtype(DType::F32)?.flatten_all()?,
            None => Tensor::zeros(var.elem_count(), DType::F32, &device)?,
        });
    }
    let summed = group.all_reduce_tensor_sum(&Tensor::cat(&parts, 0)?)?;
    let head = summed
        .narrow(0, 0, losses.len() + grads.len())?
        .to_vec1::<f32>()?;
    for (loss, sum) in losses.iter_mut().zip(&head) {
        *loss = sum / world_size as f32;
    }
    let mut offset = head.len();
    for ((var, grad), &present) in vars.iter().zip(grads.iter_mut()).zip(&head[losses.len()..]) {
        let count = var.elem_count();
        if present > 0.0 {
            let dtype = grad.as_ref().map_or(var.dtype(), Tensor::dtype);
            let sum = summed.narrow(0, offset, count)?.reshape(var.shape())?;
            *grad = Some(sum.to_dtype(dtype)?);
        }
        offset += count;
    }
    Ok(())
}

/// Whether any rank asks to stop (an interrupt on one rank stops all of them at the same step).
pub fn any_rank(group: &dyn Collective, asks: bool) -> Result<bool> {
    let mut flag = [if asks { 1.0 } else { 0.0 }];
    group.all_reduce_sum(&mut flag, Patience::Timeout)?;
    Ok(flag[0] > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infra::collective::ThreadGroup;
    use candle_core::Device;
    use std::time::Duration;

    #[test]
    fn ranks_share_the_epoch_round_robin_and_wrap_the_last_round() {
        assert_eq!(rank_batches(5, 0, 1), vec![0, 1, 2, 3, 4]);
        assert_eq!(rank_batches(6, 0, 2), vec![0, 2, 4]);
        assert_eq!(rank_batches(6, 1, 2), vec![1, 3, 5]);
        // 5 batches over 3 ranks: the second round of ranks 2 wraps to batch 0.
        assert_eq!(rank_batches(5, 0, 3), vec![0, 3]);
        assert_eq!(rank_batches(5, 1, 3), vec![1, 4]);
        assert_eq!(rank_batches(5, 2, 3), vec![2, 0]);
        // Indices of one rank are its place in the epoch; of several, distinct over the run.
        let one: Vec<u64> = (0..5).map(|round| micro_index(2, round, 5, 0, 1)).collect();
        assert_eq!(one, vec![5, 6, 7, 8, 9]);
        let mut all: Vec<u64> = (1..=2)
            .flat_map(|epoch| {
                (0..2).flat_map(move |round| {
                    (0..3).map(move |rank| micro_index(epoch, round, 2, rank, 3))
                })
            })
            .collect();
        all.sort();
        assert_eq!(all, (0..12).collect::<Vec<u64>>());
    }

    #[test]
    fn reduced_gradients_are_the_sum_and_losses_the_mean_of_the_ranks() {
        let device = Device::Cpu;
        let vars = [
            Var::zeros((2, 3), DType::F32, &device).unwrap(),
            Var::zeros(4, DType::F32, &device).unwrap(),
            Var::zeros(1, DType::F32, &device).unwrap(),
        ];
        let grads_of = |rank: usize| -> Vec<Option<Tensor>> {
            let base = (rank + 1) as f32;
            vec![
                Some(Tensor::full(base, (2, 3), &device).unwrap()),
                // Only rank 1 has a gradient for the second variable.
                (rank == 1).then(|| Tensor::arange(0f32, 4.0, &device).unwrap()),
                None,
            ]
        };
        let groups = ThreadGroup::new(2, Duration::from_secs(20));
        let threads: Vec<_> = groups
            .into_iter()
            .map(|group| {
                let vars = vars.clone();
                let mut grads = grads_of(group.rank());
                std::thread::spawn(move || {
                    let mut losses = [group.rank() as f32, 4.0];
                    reduce_step(&group, &vars, &mut grads, &mut losses).unwrap();
                    (grads, losses)
                })
            })
            .collect();
        for thread in threads {
            let (grads, losses) = thread.join().unwrap();
            assert_eq!(losses, [0.5, 4.0]);
            let values = |g: &Option<Tensor>| {
                g.as_ref()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(values(&grads[0]), vec![3.0; 6]);
            assert_eq!(values(&grads[1]), vec![0.0, 1.0, 2.0, 3.0]);
            assert!(grads[2].is_none());
        }
    }
}
