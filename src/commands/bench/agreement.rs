//! How a reduced precision agrees with f32: on crops of the demo portrait
//! (or the user's images), the same top-1 class, the largest difference of
//! a class probability and the smallest cosine of the embeddings.

use candle_core::{DType, Tensor};
use image::RgbImage;

use super::{load_model, BenchError, BenchOptions};
use crate::model::cliper::scoring::{self, ExpressionScores};
use crate::model::cliper::DescriptorBank;
use crate::model::device::Precision;
use crate::model::ClipModel;
use crate::vision::source::demo::DemoSource;

/// How a reduced precision compares with f32 on the same images.
#[derive(Clone, Debug, PartialEq)]
pub struct Agreement {
    pub images: usize,
    /// Fraction of images whose predicted class is the same.
    pub top1: f64,
    /// Largest absolute difference of any class probability.
    pub max_prob_diff: f64,
    /// Smallest cosine similarity between the two image embeddings.
    pub min_cosine: f64,
}

/// Square face crops cut from the demo portrait at varied positions, sizes
/// and brightness: a deterministic stand-in for a test set.
pub(super) fn demo_crops(n: usize) -> Vec<RgbImage> {
    let demo = DemoSource::new();
    (0..n)
        .map(|i| {
            let frame = demo.render(i as f64 * 0.73);
            let (w, h) = frame.dimensions();
            let side = (h as f32 * (0.45 + 0.4 * ((i * 7 % 11) as f32 / 10.0))) as u32;
            let side = side.min(w).min(h);
            let x = ((w - side) as f32 * ((i * 5 % 9) as f32 / 8.0)) as u32;
            let y = ((h - side) as f32 * ((i * 3 % 5) as f32 / 4.0)) as u32;
            let mut crop = image::imageops::crop_imm(&frame, x, y, side, side).to_image();
            if i % 2 == 1 {
                image::imageops::flip_horizontal_in_place(&mut crop);
            }
            crop
        })
        .collect()
}

pub(super) fn pixels(clip: &ClipModel, crops: &[RgbImage]) -> Result<Tensor, BenchError> {
    Ok(clip.pixels(crops)?)
}

/// Scores of `px` [N, 3, S, S] in batches of `batch`, plus the embeddings.
fn classify_all(
    clip: &ClipModel,
    bank: &DescriptorBank,
    px: &Tensor,
    batch: usize,
) -> Result<(Vec<ExpressionScores>, Vec<Vec<f32>>), BenchError> {
    let n = px.dim(0)?;
    let (mut scores, mut embs) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < n {
        let len = batch.min(n - i);
        let emb = clip.encode_images(&px.narrow(0, i, len)?)?;
        scores.extend(scoring::score(&emb, bank)?);
        embs.extend(emb.to_vec2::<f32>()?);
        i += len;
    }
    Ok((scores, embs))
}

/// f32 embeddings of `crops`, in batches of 8.
pub(super) fn embeddings(
    clip: &ClipModel,
    crops: &[RgbImage],
) -> Result<Vec<Vec<f32>>, BenchError> {
    let px = pixels(clip, crops)?;
    let n = px.dim(0)?;
    let mut embs = Vec::with_capacity(n);
    for i in (0..n).step_by(8) {
        let emb = clip.encode_images(&px.narrow(0, i, 8.min(n - i))?)?;
        embs.extend(emb.to_vec2::<f32>()?);
    }
    Ok(embs)
}

/// Compares `low` (a reduced precision) with f32 on `crops`: with the
/// `reference` embeddings taken before `low`'s f32 weights were freed, or
/// else with `low` rebuilt in f32.
pub(super) fn agreement(
    low: &ClipModel,
    bank: &DescriptorBank,
    crops: &[RgbImage],
    reference: Option<Vec<Vec<f32>>>,
    opts: &BenchOptions,
) -> Result<Agreement, BenchError> {
    let px = pixels(low, crops)?;
    let (low_scores, low_emb) = classify_all(low, bank, &px, 8)?;
    let full_emb = match reference {
        Some(e) if e.len() == crops.len() => e,
        _ => embeddings(&f32_reference(low, opts)?, crops)?,
    };
    let dim = full_emb.first().map_or(0, Vec::len);
    let flat: Vec<f32> = full_emb.iter().flatten().copied().collect();
    let rows = Tensor::from_vec(flat, (full_emb.len(), dim), &low.device)?;
    let full = scoring::score(&rows, bank)?;
    let low = low_scores;
    let same = low
        .iter()
        .zip(&full)
        .filter(|(a, b)| a.predicted == b.predicted)
        .count();
    let max_prob_diff = low
        .iter()
        .zip(&full)
        .flat_map(|(a, b)| a.probs.iter().zip(&b.probs).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    let min_cosine = low_emb
        .iter()
        .zip(&full_emb)
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>())
        .fold(1f32, f32::min);
    Ok(Agreement {
        images: crops.len(),
        top1: same as f64 / crops.len().max(1) as f64,
        max_prob_diff: max_prob_diff as f64,
        min_cosine: min_cosine as f64,
    })
}

/// The f32 twin of `clip`: the same weights without quantization, or
/// rebuilt in f32 when `clip` runs in a 16-bit dtype.
pub(super) fn f32_reference(
    clip: &ClipModel,
    opts: &BenchOptions,
) -> Result<ClipModel, BenchError> {
    if clip.dtype == DType::F32 && !clip.vision.f32_released() {
        let mut vision = clip.vision.clone();
        vision.set_quantized(false)?;
        return Ok(ClipModel {
            vision,
            text: clip.text.clone(),
            config: clip.config.clone(),
            device: clip.device.clone(),
            dtype: clip.dtype,
            source: clip.source.clone(),
            preprocessing: clip.preprocessing,
        });
    }
    let opts = BenchOptions {
        precision: Precision::F32,
        ..opts.clone()
    };
    Ok(load_model(&opts, None)?.0)
}
