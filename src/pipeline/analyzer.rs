//! Faces in, scores out: detect (or take the whole frame), crop, encode all
//! faces of a frame in one batch, score against the bank.

use candle_core::Tensor;
use image::RgbImage;

use crate::model::cliper::scoring::{self, ExpressionScores};
use crate::model::cliper::DescriptorBank;
use crate::model::ClipModel;
use std::path::PathBuf;

use crate::vision::faces::{model_crop, FaceBox, FaceDetector, FaceDetectorConfig};

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
    /// Turn each crop so the eyes are level, where the detector gives
    /// landmarks (see `vision::faces::model_crop`).
    pub align: bool,
    pub detector: FaceDetectorConfig,
    /// A CenterFace ONNX file to use instead of the embedded one.
    pub detector_model: Option<PathBuf>,
}

impl Default for AnalyzerConfig {
    fn default() -> Self {
        let detector = FaceDetectorConfig::default();
        Self {
            detect: true,
            margin: detector.kind.default_margin(),
            align: true,
            detector,
            detector_model: None,
        }
    }
}

impl AnalyzerConfig {
    /// The model's input for one detected face.
    pub fn crop(&self, img: &RgbImage, face: &FaceBox) -> RgbImage {
        model_crop(img, face, self.margin, self.align)
    }

    /// The same settings with another detector, its default margin
    /// included when the margin was the old detector's default.
    pub fn with_detector(mut self, kind: crate::vision::faces::DetectorKind) -> Self {
        if self.margin == self.detector.kind.default_margin() {
            self.margin = kind.default_margin();
        }
        self.detector.kind = kind;
        self
    }
}

pub struct FaceAnalyzer {
    detector: Option<FaceDetector>,
    pub config: AnalyzerConfig,
}

impl FaceAnalyzer {
    pub fn new(config: AnalyzerConfig) -> Result<Self, crate::vision::faces::FaceError> {
        let detector = if config.detect {
            Some(FaceDetector::with_model(
                config.detector,
                config.detector_model.as_deref(),
            )?)
        } else {
            None
        };
        Ok(Self { detector, config })
    }

    /// Face boxes of a frame, left to right; the whole frame when detection is off.
    pub fn find_faces(&mut self, img: &RgbImage) -> Vec<FaceBox> {
        match self.detector.as_mut() {
            Some(d) => d.detect(img),
            None => vec![whole_frame(img)],
        }
    }

    /// [`find_faces`](Self::find_faces) plus weaker faces that may continue
    /// a track, each with whether it is confident enough to start one.
    pub fn candidates(&mut self, img: &RgbImage) -> Vec<(FaceBox, bool)> {
        match self.detector.as_mut() {
            Some(d) => {
                let faces = d.candidates(img);
                faces.into_iter().map(|f| (f, d.is_confident(&f))).collect()
            }
            None => vec![(whole_frame(img), true)],
        }
    }

    /// The model input for each face: square crops (or the whole frame).
    pub fn crops(&self, img: &RgbImage, faces: &[FaceBox]) -> Vec<RgbImage> {
        if self.detector.is_none() {
            return vec![img.clone()];
        }
        faces.iter().map(|f| self.config.crop(img, f)).collect()
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

fn whole_frame(img: &RgbImage) -> FaceBox {
    FaceBox {
        x: 0,
        y: 0,
        w: img.width(),
        h: img.height(),
        score: 1.0,
        landmarks: None,
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
