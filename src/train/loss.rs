//! CLIPER's training loss (`docs/model.md` section 5): a margin loss
//! (every descriptor of the true class must beat the best descriptor of any
//! other class) plus a fine-grained loss weighted by the sub-descriptor
//! balancing weights, which are constants (no gradient).

use candle_core::{DType, Device, Result, Tensor, D};

use crate::model::cliper::expressions::{DESCRIPTORS_PER_CLASS, NUM_CLASSES, NUM_DESCRIPTORS};

/// The loss and its parts.
pub struct LossOutput {
    /// Scalar, differentiable.
    pub loss: Tensor,
    /// Balancing weight of each sample.
    pub weights: Vec<f32>,
}

/// The balancing weight w_b of each sample, from the batch's logits
/// [B, 35] (values only) and labels.
pub fn balancing_weights(logits: &[Vec<f32>], labels: &[usize]) -> Vec<f32> {
    let k = DESCRIPTORS_PER_CLASS;
    // j_b: the best descriptor of the true class.
    let j: Vec<usize> = logits
        .iter()
        .zip(labels)
        .map(|(row, &y)| {
            let own = &row[y * k..(y + 1) * k];
            crate::model::cliper::scoring::argmax(own)
        })
        .collect();
    let mut n = [[0f32; DESCRIPTORS_PER_CLASS]; NUM_CLASSES];
    for (&y, &jb) in labels.iter().zip(&j) {
        n[y][jb] += 1.0;
    }
    for row in n.iter_mut() {
        for v in row.iter_mut() {
            if *v == 0.0 {
                *v = -1.0 / 99.0;
            }
        }
    }
    labels
        .iter()
        .zip(&j)
        .map(|(&y, &jb)| {
            let row = &n[y];
            let total: f32 = row.iter().sum();
            let inv: Vec<f32> = row.iter().map(|v| 1.0 / v).collect();
            let soft = crate::model::cliper::scoring::softmax(&inv);
            total * soft[jb] / row[jb]
        })
        .collect()
}

/// `mean_b(-log_softmax(x)[b, target_b])` for x [B, C].
fn cross_entropy(x: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(x, D::Minus1)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.neg()?.squeeze(1)
}

/// CLIPER loss of logits [B, 35] (class-major) with labels in 0..7.
pub fn cliper_loss(logits: &Tensor, labels: &[usize]) -> Result<LossOutput> {
    let (b, n) = logits.dims2()?;
    if n != NUM_DESCRIPTORS || labels.len() != b {
        candle_core::bail!(
            "CLIPER loss needs [B, 35] logits and B labels, got [{b}, {n}] and {}",
            labels.len()
        )
    }
    if let Some(bad) = labels.iter().find(|&&y| y >= NUM_CLASSES) {
        candle_core::bail!("label {bad} is out of range 0..{NUM_CLASSES}")
    }
    let dev = logits.device();
    let k = DESCRIPTORS_PER_CLASS;
    let s = logits.reshape((b, NUM_CLASSES, k))?;
    let y = Tensor::from_vec(labels.iter().map(|&v| v as u32).collect::<Vec<_>>(), b, dev)?;

    // Margin logits: min over the true class's descriptors, max elsewhere.
    let onehot: Vec<f32> = labels
        .iter()
        .flat_map(|&yb| (0..NUM_CLASSES).map(move |c| if c == yb { 1.0 } else { 0.0 }))
        .collect();
    let onehot = Tensor::from_vec(onehot, (b, NUM_CLASSES), dev)?.to_dtype(logits.dtype())?;
    let mins = s.min(2)?;
    let maxs = s.max(2)?;
    let margin = ((&onehot * &mins)? + ((1.0 - &onehot)? * &maxs)?)?;
    let l_margin = cross_entropy(&margin, &y)?.mean_all()?;

    // Fine-grained logits: the true class's best descriptor, then the 30
    // logits of the other classes in class order.
    let own_best = maxs.gather(&y.unsqueeze(1)?, 1)?; // [B, 1]
    let others: Vec<u32> = labels
        .iter()
        .flat_map(|&yb| (0..NUM_DESCRIPTORS as u32).filter(move |&i| i as usize / k != yb))
        .collect();
    let others = Tensor::from_vec(others, (b, NUM_DESCRIPTORS - k), dev)?;
    let rest = logits.gather(&others, 1)?; // [B, 30]
    let g = Tensor::cat(&[&own_best, &rest], 1)?; // [B, 31]
    let zeros = Tensor::zeros(b, DType::U32, dev)?;
    let l_fg = cross_entropy(&g, &zeros)?; // [B]

    let values = logits.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let weights = balancing_weights(&values, labels);
    let w = Tensor::from_vec(weights.clone(), b, dev)?.to_dtype(logits.dtype())?;
    let loss = (l_margin + (l_fg * w)?.mean_all()?)?;
    Ok(LossOutput { loss, weights })
}

/// Convenience for tests and tools: logits of a batch as [B, 35] on CPU.
pub fn logits_tensor(rows: &[Vec<f32>]) -> Result<Tensor> {
    let b = rows.len();
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (b, NUM_DESCRIPTORS), &Device::Cpu)
}
