//! The dynamic branch at run time: a per-face sliding window of the last
//! image FEATURES (not frames), so each new frame costs one image encode plus
//! one tiny temporal pass, and clip scoring with the temporal module or,
//! without trained temporal weights, the mean of the window's static scores
//! (labelled as such).

use std::collections::{HashMap, VecDeque};

use candle_core::{Device, Tensor};

use crate::model::cliper::scoring::{self, ExpressionScores};
use crate::model::cliper::DescriptorBank;
use crate::model::temporal::{TemporalModule, DEFAULT_FRAMES};

/// How a dynamic score was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DynamicMode {
    /// The trained temporal module.
    Temporal,
    /// No temporal weights: the mean of the window's static scores.
    MeanOfStatic,
    /// An Exp-CLIP head and no temporal weights: the head on the mean of
    /// the window's features, as Exp-CLIP scores video.
    MeanOfFeatures,
}

impl DynamicMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DynamicMode::Temporal => "temporal",
            DynamicMode::MeanOfStatic => "mean-of-static",
            DynamicMode::MeanOfFeatures => "mean-of-features",
        }
    }

    /// The mode named by [`as_str`](Self::as_str) (as a session records it).
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Temporal, Self::MeanOfStatic, Self::MeanOfFeatures]
            .into_iter()
            .find(|m| m.as_str() == name)
    }
}

#[derive(Clone, Debug)]
pub struct DynamicScores {
    pub scores: ExpressionScores,
    pub mode: DynamicMode,
}

/// Scores windows of normalised frame embeddings.
pub struct DynamicScorer {
    pub temporal: Option<TemporalModule>,
    device: Device,
}

impl DynamicScorer {
    pub fn new(temporal: Option<TemporalModule>, device: &Device) -> Self {
        Self {
            temporal,
            device: device.clone(),
        }
    }

    pub fn mode(&self) -> DynamicMode {
        if self.temporal.is_some() {
            DynamicMode::Temporal
        } else {
            DynamicMode::MeanOfStatic
        }
    }

    /// Frames the temporal module expects (16 without one).
    pub fn frames(&self) -> usize {
        self.temporal
            .as_ref()
            .map(|t| t.config.frames)
            .unwrap_or(DEFAULT_FRAMES)
    }

    /// Scores one window of `F` image features, each [E], before
    /// normalisation (DFER-CLIP's temporal module takes them raw; the others
    /// normalise them here).
    pub fn score(
        &self,
        window: &[Vec<f32>],
        bank: &DescriptorBank,
    ) -> candle_core::Result<DynamicScores> {
        let rows: Vec<&[f32]> = window.iter().map(|v| v.as_slice()).collect();
        self.score_many(&[rows], bank).map(|mut v| v.remove(0))
    }

    /// Scores several windows (all faces of a frame) in one pass.
    pub fn score_many(
        &self,
        windows: &[Vec<&[f32]>],
        bank: &DescriptorBank,
    ) -> candle_core::Result<Vec<DynamicScores>> {
        let Some(first) = windows.first().and_then(|w| w.first()) else {
            return Ok(Vec::new());
        };
        let e = first.len();
        let f = windows[0].len();
        if windows
            .iter()
            .any(|w| w.len() != f || w.iter().any(|r| r.len() != e))
        {
            candle_core::bail!("dynamic windows must all hold {f} embeddings of width {e}")
        }
        let flat: Vec<f32> = windows
            .iter()
            .flat_map(|w| w.iter().flat_map(|r| r.iter().copied()))
            .collect();
        let raw = Tensor::from_vec(flat, (windows.len(), f, e), &self.device)?;
        let x = crate::model::layers::l2_normalize(&raw)?;
        // Each window's clip feature [B, E], scored against the bank.
        let clips = |features: &Tensor, mode| -> candle_core::Result<Vec<DynamicScores>> {
            let clip = crate::model::layers::l2_normalize(features)?;
            Ok((scoring::score(&clip, bank)?.into_iter())
                .map(|scores| DynamicScores { scores, mode })
                .collect())
        };
        match &self.temporal {
            Some(t) => {
                let input = if t.config.flavour.normalised_input() {
                    &x
                } else {
                    &raw
                };
                clips(&t.forward(input)?, DynamicMode::Temporal)
            }
            // Exp-CLIP's `Dynamic_FER`: project every frame, average, then
            // normalise; the head is linear, so that is the head on the
            // mean of the raw features.
            None if bank.head.is_some() => clips(&raw.mean(1)?, DynamicMode::MeanOfFeatures),
            None => {
                let per_frame = scoring::score(&x.reshape((windows.len() * f, e))?, bank)?;
                Ok(per_frame
                    .chunks(f)
                    .map(|c| DynamicScores {
                        scores: ExpressionScores::mean(c).unwrap_or_else(|| c[0].clone()),
                        mode: DynamicMode::MeanOfStatic,
                    })
                    .collect())
            }
        }
    }
}

struct Window {
    feats: VecDeque<Vec<f32>>,
    since_emit: usize,
}

/// Per-face windows of the last `len` embeddings, keyed by track id.
pub struct FeatureWindows {
    pub len: usize,
    /// Emit a dynamic score every `stride` new frames once a window is full.
    pub stride: usize,
    windows: HashMap<u64, Window>,
}

impl FeatureWindows {
    pub fn new(len: usize, stride: usize) -> Self {
        Self {
            len: len.max(1),
            stride: stride.max(1),
            windows: HashMap::new(),
        }
    }

    /// Adds a face's newest embedding; true when its window is full and a
    /// dynamic score is due (every `stride` frames).
    pub fn push(&mut self, id: u64, embedding: Vec<f32>) -> bool {
        let len = self.len;
        let w = self.windows.entry(id).or_insert_with(|| Window {
            feats: VecDeque::with_capacity(len),
            since_emit: 0,
        });
        if w.feats.len() == len {
            w.feats.pop_front();
        }
        w.feats.push_back(embedding);
        w.since_emit += 1;
        if w.feats.len() == len && w.since_emit >= self.stride {
            w.since_emit = 0;
            true
        } else {
            false
        }
    }

    /// The window of a face, oldest first.
    pub fn window(&self, id: u64) -> Option<Vec<&[f32]>> {
        self.windows
            .get(&id)
            .map(|w| w.feats.iter().map(|v| v.as_slice()).collect())
    }

    /// How many embeddings a face's window holds.
    pub fn filled(&self, id: u64) -> usize {
        self.windows.get(&id).map(|w| w.feats.len()).unwrap_or(0)
    }

    /// Drops the windows of faces that left.
    pub fn retain(&mut self, live: &[u64]) {
        self.windows.retain(|id, _| live.contains(id));
    }

    pub fn reset(&mut self, id: u64) {
        self.windows.remove(&id);
    }

    pub fn clear(&mut self) {
        self.windows.clear();
    }

    /// Changes the window length and stride (windows restart).
    pub fn configure(&mut self, len: usize, stride: usize) {
        if len != self.len || stride != self.stride {
            self.len = len.max(1);
            self.stride = stride.max(1);
            self.windows.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_fill_slide_and_reset_per_face() {
        let mut w = FeatureWindows::new(4, 2);
        for i in 0..3 {
            assert!(!w.push(1, vec![i as f32]));
        }
        assert!(w.push(1, vec![3.0])); // full
        assert!(!w.push(1, vec![4.0])); // stride 2
        assert!(w.push(1, vec![5.0]));
        let win: Vec<f32> = w.window(1).unwrap().iter().map(|v| v[0]).collect();
        assert_eq!(win, vec![2.0, 3.0, 4.0, 5.0]); // slid
        assert!(!w.push(2, vec![9.0]));
        assert_eq!(w.filled(2), 1);
        w.retain(&[2]);
        assert_eq!(w.filled(1), 0);
        w.reset(2);
        assert_eq!(w.filled(2), 0);
    }
}
