//! What crosses the pipeline's edges: the events it sends (frames with
//! boxes, scores, model and source changes, faults) and the commands it
//! takes. Nothing here knows about the UI.

use std::sync::Arc;
use std::time::Instant;

use image::RgbImage;

use super::error::{ModelError, SourceFailure, SourceWarning};
use super::{DynamicSettings, ExactRequest};
use crate::model::cliper::{DescriptorBank, ExpressionScores};
use crate::model::explain::{ExplainMap, Target};
use crate::model::setup::BankSource;
use crate::pipeline::analyzer::FaceResult;
use crate::pipeline::dynamic::DynamicScores;
use crate::vision::source::SourceSpec;
use crate::vision::tracking::TrackedFace;

/// What the model loader found, for the status bar.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// "CPU", "CUDA", "Metal".
    pub device: String,
    /// The CLIP weights file in use.
    pub weights: std::path::PathBuf,
    /// The image encoder's path: its precision and kernel (`q8
    /// avx512-vnni`, `f32 avx2`, `candle`; `VisionTower::kernel`).
    pub kernel: String,
    /// Seconds it took to load the weights and build the bank.
    pub load_secs: f32,
}

/// A frame after detection and tracking, ready to show.
#[derive(Debug)]
pub struct DetectedFrame {
    /// Counter of frames that entered the pipeline (across sources).
    pub seq: u64,
    /// Source generation: bumps every time a source is (re)opened.
    pub generation: u64,
    /// Index and time of the frame in its source.
    pub index: u64,
    pub t: f64,
    pub image: Arc<RgbImage>,
    pub faces: Vec<TrackedFace>,
    /// When the capture stage got the frame.
    pub captured: Instant,
    /// Decoding the frame (video files; 0 for other sources).
    pub decode_ms: f32,
    pub detect_ms: f32,
    /// Capture rate of the source, frames per second.
    pub capture_fps: f32,
    /// Frames the capture stage dropped so far because detection was busy.
    pub dropped: u64,
    /// Whether `faces` were detected in this frame. `false`: they are the
    /// last detection's, carried over, because detection is paced (live,
    /// model on the CPU; see `detect::Pacer`). Such frames are shown and
    /// recorded, never scored.
    pub detected: bool,
}

/// One face of a scored frame.
#[derive(Clone, Debug)]
pub struct TrackedResult {
    /// Track id (stable across frames).
    pub id: u64,
    pub face: FaceResult,
    /// Logit of the probe text, on the descriptor logits' scale.
    pub probe_logit: Option<f32>,
    /// The dynamic branch's latest scores for this face, once its window of
    /// frame features is full (`None` before).
    pub dynamic: Option<DynamicScores>,
    /// The static scores as displayed (smoothed per face), when smoothing
    /// is on ([`PipelineCommand::SetSmoothing`]).
    pub smoothed: Option<ExpressionScores>,
    /// The dynamic scores as displayed, when smoothing is on and the face
    /// has dynamic scores.
    pub dynamic_smoothed: Option<ExpressionScores>,
    /// How many frame features the face's window holds.
    pub window_fill: usize,
    /// The fast explanation map of the requested target, when one is asked
    /// for ([`PipelineCommand::SetExplain`]).
    pub explain: Option<ExplainMap>,
}

#[cfg(test)]
impl TrackedResult {
    /// For tests: face `id` at `bbox` under CLIPER's classes, whose
    /// descriptors of `class` alone fire (logit 4), so it predicts `class`.
    pub(crate) fn predicting(id: u64, class: usize, bbox: crate::vision::faces::FaceBox) -> Self {
        let layout = Arc::new(crate::model::cliper::expressions::BankLayout::cliper());
        let mut logits = vec![0.0; layout.num_descriptors()];
        for x in &mut logits[class * 5..class * 5 + 5] {
            *x = 4.0;
        }
        TrackedResult {
            id,
            face: FaceResult {
                bbox,
                scores: ExpressionScores::from_logits(logits, &layout),
                embedding: Vec::new(),
            },
            probe_logit: None,
            dynamic: None,
            smoothed: None,
            dynamic_smoothed: None,
            window_fill: 0,
            explain: None,
        }
    }
}

/// Time spent in each stage for one frame, in milliseconds, plus rates.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimings {
    /// Decoding the frame (video files).
    pub decode_ms: f32,
    pub detect_ms: f32,
    /// Cropping the faces and turning the crops into the model's input
    /// (resize, normalise).
    pub crop_ms: f32,
    /// The vision tower's forward over all faces (one batch): what
    /// `cliper bench` times as "image encode".
    pub encode_ms: f32,
    /// Logits against the bank and the probe.
    pub score_ms: f32,
    pub capture_fps: f32,
    /// Frames scored per second.
    pub inference_fps: f32,
}

/// The scores of one frame.
#[derive(Clone, Debug)]
pub struct FrameScores {
    pub seq: u64,
    pub generation: u64,
    pub index: u64,
    pub t: f64,
    pub captured: Instant,
    /// Faces in the order they were detected (left to right).
    pub faces: Vec<TrackedResult>,
    pub timings: StageTimings,
    /// The probe text the `probe_logit`s refer to.
    pub probe: Option<String>,
    /// The bank the scores refer to.
    pub bank: Arc<DescriptorBank>,
}

/// Facts about an opened source.
#[derive(Clone, Debug)]
pub struct SourceInfo {
    pub spec: SourceSpec,
    pub generation: u64,
    pub name: String,
    pub len: Option<u64>,
    pub fps: f64,
    pub live: bool,
}

/// What the pipeline reports.
#[derive(Debug)]
pub enum PipelineEvent {
    SourceOpened(SourceInfo),
    /// The source could not be opened, or failed for good (a camera
    /// unplugged, a damaged file); the pipeline waits for another source.
    SourceFailed {
        spec: SourceSpec,
        error: SourceFailure,
        /// Frames of this source sent on before it failed (0: it never opened).
        frames: u64,
    },
    /// A frame was skipped (an unreadable image in a folder).
    SourceWarning(SourceWarning),
    /// A finite source played to its end.
    SourceEnded {
        generation: u64,
        frames: u64,
    },
    /// A frame with its face boxes (live mode, or `emit_frames`).
    Frame(Arc<DetectedFrame>),
    ModelLoading,
    ModelReady(ModelInfo),
    ModelFailed(ModelError),
    BankReady(Arc<DescriptorBank>),
    BankFailed(ModelError),
    /// The probe text was encoded (`None`: probe cleared).
    ProbeReady(Option<String>),
    ProbeFailed {
        text: String,
        error: ModelError,
    },
    Scores(FrameScores),
    /// One face's map for an [`ExactRequest`].
    ExactMap {
        request: u64,
        face: u64,
        map: ExplainMap,
    },
    /// Work done on an [`ExactRequest`], in forward passes.
    ExactProgress {
        request: u64,
        done: usize,
        total: usize,
    },
    /// An [`ExactRequest`] finished (`error`: it failed), or was cancelled
    /// (`cancelled`: a newer request or [`PipelineCommand::Exact`]`(None)`).
    ExactDone {
        request: u64,
        error: Option<ModelError>,
        cancelled: bool,
    },
    /// Batch mode: every frame was processed, or the pipeline stopped.
    Finished,
}

/// Commands to a running pipeline.
#[derive(Clone, Debug)]
pub enum PipelineCommand {
    /// Close the current source and open another (or reopen it: replay).
    SetSource(SourceSpec),
    SetBank(BankSource),
    SetProbe(Option<String>),
    /// Window length and stride of the dynamic branch (windows restart).
    SetDynamic(DynamicSettings),
    /// Compute the fast explanation map of this descriptor or class for
    /// every face (or stop: `None`).
    SetExplain(Option<Target>),
    /// Compute the maps of a still frame in the background (a newer request
    /// cancels the one running), or stop: `None`.
    Exact(Option<ExactRequest>),
    /// Hold a file source at its current frame (`true`) or play on. Live
    /// cameras keep streaming (and recording): the window freezes instead.
    SetPaused(bool),
    /// Switch the face detector (tracks restart).
    SetDetector(crate::vision::faces::DetectorKind),
    /// The EMA factor of the displayed scores (0: off, at most
    /// [`smoothing::MAX_SMOOTHING`](crate::pipeline::smoothing::MAX_SMOOTHING)).
    SetSmoothing(f32),
}
