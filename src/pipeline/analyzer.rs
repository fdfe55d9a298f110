//! Faces in, scores out: detect (or take the whole frame), crop, encode all
//! faces of a frame in one batch, score against the bank.

use candle_core::Tensor;
use image::RgbImage;

use crate::model::cliper::scoring::{self, ExpressionScores};
use crate::model::cliper::DescriptorBank;
use crate::model::ClipModel;
use crate::vision::faces::{
    crop_face, FaceBox, FaceDetector, FaceDetectorConfig, DEFAULT_FACE_MARGIN,
};

/// One face of one frame.
#[derive(Clone, Debug)]
pub struct FaceResult {
    pub bbox: FaceBox,
    pub scores: ExpressionScores,
    /// Normalised image embedding [E] (kept for probes and the temporal window).
    pub embedding: Vec<f32>,
}

#[derive(Clone, Debug)]
pub struct AnalyzerConfig {
    /// Detect faces; `false` treats the whole frame as one face.
    pub detect: bool,
    /// Margin around each face box (see `vision::faces::square_crop`).
    pub margin: f32,
    pub detector: FaceDetectorConfig,
}

impl Default for AnalyzerConfig {
    fn default() -> Self {
        Self {
            detect: true,
            margin: DEFAULT_FACE_MARGIN,
            detector: FaceDetectorConfig::default(),
        }
    }
}

pub struct FaceAnalyzer {
    detector: Option<FaceDetector>,
    pub config: AnalyzerConfig,
}

impl FaceAnalyzer {
    pub fn new(config: AnalyzerConfig) -> Result<Self, crate::vision::faces::FaceError> {
        let detector = if config.detect {
            Some(FaceDetector::new(config.detector)?)
        } else {
            None
        };
        Ok(Self { detector, config })
    }

    /// Face boxes of a frame, left to right; the whole frame when detection is off.
    pub fn find_faces(&mut self, img: &RgbImage) -> Vec<FaceBox> {
        match self.detector.as_mut() {
            Some(d) => d.detect(img),
            None => vec![FaceBox {
                x: 0,
                y: 0,
                w: img.width(),
                h: img.height(),
                score: 1.0,
            }],
        }
    }

    /// The model input for each face: square crops (or the whole frame).
    pub fn crops(&self, img: &RgbImage, faces: &[FaceBox]) -> Vec<RgbImage> {
        if self.detector.is_none() {
            return vec![img.clone()];
        }
        faces
            .iter()
            .map(|f| crop_face(img, f, self.config.margin))
            .collect()
    }

    /// Detect, crop, encode and score.
    pub fn analyze(
        &mut self,
        clip: &ClipModel,
        bank: &DescriptorBank,
        img: &RgbImage,
    ) -> candle_core::Result<Vec<FaceResult>> {
        let faces = self.find_faces(img);
        let crops = self.crops(img, &faces);
        score_crops(clip, bank, &faces, &crops)
    }
}

/// Normalised embeddings [N, E] of crops, in one forward.
pub fn encode_crops(clip: &ClipModel, crops: &[RgbImage]) -> candle_core::Result<Tensor> {
    clip.encode_rgb(crops)
}

pub fn score_crops(
    clip: &ClipModel,
    bank: &DescriptorBank,
    faces: &[FaceBox],
    crops: &[RgbImage],
) -> candle_core::Result<Vec<FaceResult>> {
    if crops.is_empty() {
        return Ok(Vec::new());
    }
    let emb = encode_crops(clip, crops)?;
    let scores = scoring::score(&emb, bank)?;
    let rows = emb.to_vec2::<f32>()?;
    Ok(faces
        .iter()
        .zip(scores)
        .zip(rows)
        .map(|((bbox, scores), embedding)| FaceResult {
            bbox: *bbox,
            scores,
            embedding,
        })
        .collect())
}
