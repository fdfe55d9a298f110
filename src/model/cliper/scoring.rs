//! Scoring (`docs/model.md` section 3), for a bank of any shape: one logit
//! per descriptor = cos / 0.01, class score = mean of its descriptors'
//! logits, prediction = argmax, probabilities = softmax of the class scores.
//! (CLIPER: 35 descriptors, 7 classes of 5. DFER-CLIP: one per class.
//! Exp-CLIP: CLIP's logit scale 100 is the same 1 / 0.01.)

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

use super::bank::DescriptorBank;
use super::expressions::{BankLayout, TEMPERATURE};

/// The scores of one face (or one clip).
#[derive(Clone, Debug, PartialEq)]
pub struct ExpressionScores {
    /// Descriptor logits, class-major (CLIPER: 35).
    pub logits: Vec<f32>,
    /// Mean logit per class (CLIPER: 7).
    pub class_scores: Vec<f32>,
    /// Softmax of the class scores.
    pub probs: Vec<f32>,
    /// Argmax of the class scores.
    pub predicted: usize,
    /// The bank's classes and descriptor counts.
    pub layout: Arc<BankLayout>,
}

impl ExpressionScores {
    /// Scores of one face from its descriptor logits (as many as the
    /// layout has descriptors; a shorter row gives NaN class scores).
    pub fn from_logits(logits: Vec<f32>, layout: &Arc<BankLayout>) -> Self {
        debug_assert_eq!(logits.len(), layout.num_descriptors());
        let class_scores = layout.class_means(&logits);
        let probs = softmax(&class_scores);
        let predicted = argmax(&class_scores);
        Self {
            logits,
            class_scores,
            probs,
            predicted,
            layout: layout.clone(),
        }
    }

    /// Name of the predicted class.
    pub fn predicted_name(&self) -> &str {
        self.layout.name(self.predicted)
    }

    /// Name of class `c`.
    pub fn class_name(&self, c: usize) -> &str {
        self.layout.name(c)
    }

    /// Descriptor indices by decreasing logit.
    pub fn ranked(&self) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.logits.len()).collect();
        idx.sort_by(|&a, &b| self.logits[b].total_cmp(&self.logits[a]));
        idx
    }

    /// Average of several scores (e.g. the static scores of a window),
    /// computed on the logits so the result is itself CLIPER-shaped.
    pub fn mean(items: &[ExpressionScores]) -> Option<Self> {
        let first = items.first()?;
        let mut logits = vec![0f32; first.logits.len()];
        for s in items {
            for (a, b) in logits.iter_mut().zip(&s.logits) {
                *a += b / items.len() as f32;
            }
        }
        Some(Self::from_logits(logits, &first.layout))
    }
}

pub fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

pub use crate::model::argmax;

/// Logits of normalised image features [N, E] against normalised text
/// features [D, E]: [N, D]. Differentiable.
pub fn logits(image_features: &Tensor, text_features: &Tensor) -> Result<Tensor> {
    let text = text_features.to_dtype(image_features.dtype())?;
    image_features.matmul(&text.t()?)? / TEMPERATURE as f64
}

/// Scores of normalised image features [N, E] (CLIP's space) under a bank.
/// A bank with an Exp-CLIP head projects them first.
///
/// Non-finite logits (an f16 overflow on a GPU, a damaged bank) are an
/// error, never scores: NaN probabilities would otherwise read as a
/// prediction.
pub fn score(image_features: &Tensor, bank: &DescriptorBank) -> Result<Vec<ExpressionScores>> {
    let f = bank.project_images(&image_features.to_dtype(DType::F32)?)?;
    let l = logits(&f, &bank.text_features)?;
    let rows = l.to_vec2::<f32>()?;
    if let Some((face, _)) = rows
        .iter()
        .enumerate()
        .find(|(_, r)| r.iter().any(|x| !x.is_finite()))
    {
        candle_core::bail!(
            "the model's scores for face {face} are not finite (NaN or infinite): the weights or the descriptors are damaged, or the precision overflowed (try --precision f32)"
        );
    }
    Ok(rows
        .into_iter()
        .map(|row| ExpressionScores::from_logits(row, &bank.layout))
        .collect())
}

/// Logit of each image against one free-text probe feature [E] (normalised,
/// in the bank's space: see `DescriptorBank::encode_probe`): the same scale
/// as the descriptor logits, for side-by-side display.
pub fn probe_logits(
    image_features: &Tensor,
    probe_feature: &Tensor,
    bank: &DescriptorBank,
) -> Result<Vec<f32>> {
    let p = probe_feature.reshape((1, ()))?;
    let f = bank.project_images(&image_features.to_dtype(DType::F32)?)?;
    logits(&f, &p)?.squeeze(1)?.to_vec1()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_scores_are_means_and_probs_sum_to_one() {
        let mut logits = vec![0f32; 35];
        for (i, l) in logits.iter_mut().enumerate() {
            *l = i as f32;
        }
        let s = ExpressionScores::from_logits(logits, &Arc::new(BankLayout::cliper()));
        assert_eq!(s.class_scores[0], 2.0);
        assert_eq!(s.class_scores[6], 32.0);
        assert_eq!(s.predicted, 6);
        assert!((s.probs.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(s.ranked()[0], 34);
        assert_eq!(super::super::expressions::NUM_CLASSES, s.probs.len());
        assert_eq!(s.predicted_name(), "neutral");
    }
}
