//! Recording what the pipeline produces: [`Recorder`] watches the
//! [`PipelineEvent`]s its owner receives (the app, `cliper run`) and feeds a
//! [`SessionWriter`]: one record per scored frame, and every frame with its
//! boxes and labels for the annotated video.
//!
//! Labels on the video are what the window shows: each frame's boxes with
//! the newest scores of each face at that moment (smoothed when smoothing is
//! on: the pipeline smooths once, and the window and the recording both
//! take its values). A frame waits here until the scores of its own frame or a later one
//! arrive, so in batch runs every frame carries exactly its own scores.
//!
//! Nothing here blocks: the writer's threads do the writing and encoding.

use crate::vision::faces::DetectorKind;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Receiver;
use serde::Serialize;
use serde_json::Value;

use crate::model::cliper::{DescriptorBank, ExpressionScores};
use crate::model::setup::{BankSource, ModelSpec};
use crate::pipeline::analyzer::AnalyzerConfig;
use crate::pipeline::worker::{
    DetectedFrame, FrameScores, ModelInfo, PipelineEvent, RunMode, SourceInfo, TrackedResult,
};
use crate::session::meta::{BankMeta, SourceMeta};
use crate::session::record::{
    class_scores_of, round_secs, DescriptorRecord, FaceRecord, FrameRecord, ProbeRecord,
    ScoresRecord,
};
use crate::session::video::FaceMark;
use crate::session::writer::{
    Clock, FinishReport, MetaUpdate, SessionOptions, SessionWriter, VideoFrame, WriterStatus,
};
use crate::session::{iso8601, SessionError};

/// Frames waiting for their scores before they go to the video with the
/// newest labels anyway (no model, or a slow one); bounds the memory held.
const MAX_PENDING: usize = 16;

/// What to record and how.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    /// The session folder (new or empty).
    pub dir: PathBuf,
    /// Record the annotated video.
    pub video: bool,
    /// Also record the video without annotations.
    pub raw_video: bool,
    /// Descriptors kept per face in the JSONL.
    pub top: usize,
    /// The run's settings, for meta.json.
    pub settings: Value,
}

impl RecordOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            video: true,
            raw_video: false,
            top: 5,
            settings: Value::Null,
        }
    }
}

/// What a recording left, for a run's summary.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordOutcome {
    /// What was written; its `errors` are the problems met besides the one
    /// that stopped the recording (kept in meta.json's errors).
    pub left: FinishReport,
    /// The error that stopped the recording (or kept it from starting).
    pub error: Option<String>,
}

impl RecordOutcome {
    pub fn failed(dir: &std::path::Path, error: String) -> Self {
        Self {
            left: FinishReport {
                dir: dir.to_path_buf(),
                ..FinishReport::default()
            },
            error: Some(error),
        }
    }
}

/// A recording in progress, fed with pipeline events.
pub struct Recorder {
    writer: SessionWriter,
    clock: Clock,
    start: Instant,
    start_wall: SystemTime,
    /// Source time of the first recorded frame (source clock).
    source_t0: Option<f64>,
    top: usize,
    /// The label each face shows now (class, probability), by session id.
    labels: HashMap<u64, (String, f32)>,
    pending: VecDeque<Arc<DetectedFrame>>,
    fps: f64,
    /// Source generation being recorded; results of others are ignored.
    generation: Option<u64>,
    /// Added to the tracker's ids so that ids stay unique across sources.
    id_offset: u64,
    max_id: u64,
    bank: Option<Arc<DescriptorBank>>,
    last_t: f64,
}

impl Recorder {
    /// Creates the session. `mode` picks the clock: live runs time frames
    /// by capture, batch runs by their time in the source.
    pub fn start(opts: RecordOptions, mode: RunMode) -> Result<Self, SessionError> {
        let clock = match mode {
            RunMode::Live => Clock::Capture,
            RunMode::Batch => Clock::Source,
        };
        let mut so = SessionOptions::new(&opts.dir, clock);
        so.settings = opts.settings.clone();
        so.video = opts.video;
        so.raw_video = opts.raw_video;
        let writer = SessionWriter::create(so)?;
        Ok(Self {
            writer,
            clock,
            start: Instant::now(),
            start_wall: SystemTime::now(),
            source_t0: None,
            top: opts.top,
            labels: HashMap::new(),
            pending: VecDeque::new(),
            fps: 25.0,
            generation: None,
            id_offset: 0,
            max_id: 0,
            bank: None,
            last_t: 0.0,
        })
    }

    /// Tells a recording started mid-session what is already known (the
    /// events that carried it went by before it started).
    pub fn prime(
        &mut self,
        source: Option<&SourceInfo>,
        model: Option<&ModelInfo>,
        bank: Option<&Arc<DescriptorBank>>,
    ) {
        if let Some(s) = source {
            self.source_opened(s);
        }
        if let Some(m) = model {
            self.model_ready(m);
        }
        if let Some(b) = bank {
            self.bank_ready(b);
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        self.writer.dir()
    }

    pub fn status(&self) -> WriterStatus {
        self.writer.status()
    }

    /// The error that stopped the recording, if any.
    pub fn error(&self) -> Option<String> {
        self.writer.status().error
    }

    /// Replaces the settings in meta.json.
    pub fn set_settings(&self, settings: Value) {
        self.writer.update_meta(MetaUpdate::Settings(settings));
    }

    /// Takes in one event (call it for every event, before handing it on).
    pub fn observe(&mut self, event: &PipelineEvent) {
        match event {
            PipelineEvent::SourceOpened(info) => self.source_opened(info),
            PipelineEvent::ModelReady(info) => self.model_ready(info),
            PipelineEvent::BankReady(bank) => self.bank_ready(bank),
            PipelineEvent::Frame(f) => self.frame(f),
            PipelineEvent::Scores(s) => self.scores(s),
            _ => {}
        }
    }

    /// Finishes the recording (waits for the writer: the encoder's last
    /// frames and meta.json).
    pub fn finish(mut self) -> Result<FinishReport, SessionError> {
        self.end_pending();
        self.writer.finish()
    }

    /// [`finish`](Self::finish), summed up.
    pub fn finish_outcome(self) -> RecordOutcome {
        let dir = self.dir().to_path_buf();
        let stopped = self.error();
        match self.finish() {
            Ok(mut left) => {
                left.errors.retain(|e| Some(e) != stopped.as_ref());
                RecordOutcome {
                    left,
                    error: stopped,
                }
            }
            Err(e) => RecordOutcome::failed(&dir, stopped.unwrap_or_else(|| e.to_string())),
        }
    }

    /// [`finish`](Self::finish) on a background thread.
    pub fn finish_in_background(mut self) -> Receiver<Result<FinishReport, SessionError>> {
        self.end_pending();
        self.writer.finish_in_background()
    }

    fn source_opened(&mut self, info: &SourceInfo) {
        if self.generation == Some(info.generation) {
            return;
        }
        if self.generation.is_some() {
            // The tracker starts again at 1: keep the session's ids unique.
            self.id_offset = self.max_id;
            self.flush_pending(u64::MAX);
            self.labels.clear();
        }
        self.generation = Some(info.generation);
        if info.fps > 0.0 {
            self.fps = info.fps;
        }
        self.writer.update_meta(MetaUpdate::Source(SourceMeta {
            source: info.spec.to_arg(),
            name: info.name.clone(),
            fps: info.fps,
            live: info.live,
            frames: info.len,
            from_t: self.last_t,
            face_id_offset: self.id_offset,
        }));
    }

    fn model_ready(&mut self, info: &ModelInfo) {
        self.writer.update_meta(MetaUpdate::Model {
            weights: info.weights.clone(),
            device: info.device.clone(),
            kernel: info.kernel.clone(),
        });
    }

    fn bank_ready(&mut self, bank: &Arc<DescriptorBank>) {
        if self.bank.as_ref().is_some_and(|b| Arc::ptr_eq(b, bank)) {
            return;
        }
        self.bank = Some(bank.clone());
        let file = PathBuf::from(&bank.source);
        self.writer.update_meta(MetaUpdate::Bank {
            bank: BankMeta {
                kind: bank.kind.as_str().to_string(),
                source: bank.source.clone(),
                classes: bank.layout.classes().to_vec(),
                descriptors_per_class: (0..bank.layout.num_classes())
                    .map(|c| bank.layout.count(c))
                    .collect(),
                head: bank.head.as_ref().map(|h| h.source.clone()),
                sha256: None,
                texts: bank.descriptors.iter().map(|d| d.text.clone()).collect(),
                from_t: self.last_t,
            },
            file: file.is_file().then_some(file),
        });
    }

    /// Session time of a frame, or `None` for one captured before the
    /// recording started.
    fn time(&mut self, captured: Instant, source_t: f64) -> Option<f64> {
        match self.clock {
            Clock::Capture => captured
                .checked_duration_since(self.start)
                .map(|d| d.as_secs_f64()),
            Clock::Source => {
                let t0 = *self.source_t0.get_or_insert(source_t);
                Some((source_t - t0).max(0.0))
            }
        }
    }

    fn wall(&self, captured: Instant) -> String {
        let wall = match captured.checked_duration_since(self.start) {
            Some(d) => self.start_wall + d,
            None => self
                .start_wall
                .checked_sub(self.start.duration_since(captured))
                .unwrap_or(self.start_wall),
        };
        iso8601(wall)
    }

    fn session_id(&mut self, track_id: u64) -> u64 {
        let id = track_id + self.id_offset;
        self.max_id = self.max_id.max(id);
        id
    }

    fn current(&self, generation: u64) -> bool {
        self.generation.is_none_or(|g| g == generation)
    }

    fn frame(&mut self, f: &Arc<DetectedFrame>) {
        if !self.current(f.generation) || (self.clock == Clock::Capture && f.captured < self.start)
        {
            return;
        }
        self.pending.push_back(f.clone());
        while self.pending.len() > MAX_PENDING {
            if let Some(old) = self.pending.pop_front() {
                self.send_video(&old);
            }
        }
    }

    /// The frames still waiting when the recording ends. Live (capture
    /// clock), frames without scores belong in the video: inference skips
    /// frames by design. On the source clock every frame is scored, so a
    /// waiting frame is one a stop (a signal, a stop button) cut off before
    /// its scores: it is left out, so that the video and session.jsonl hold
    /// the same frames.
    fn end_pending(&mut self) {
        match self.clock {
            Clock::Capture => self.flush_pending(u64::MAX),
            Clock::Source => self.pending.clear(),
        }
    }

    /// Sends the waiting frames before `seq` to the video.
    fn flush_pending(&mut self, seq: u64) {
        while self.pending.front().is_some_and(|f| f.seq < seq) {
            if let Some(f) = self.pending.pop_front() {
                self.send_video(&f);
            }
        }
    }

    fn send_video(&mut self, f: &DetectedFrame) {
        let Some(t) = self.time(f.captured, f.t) else {
            return;
        };
        let marks = f
            .faces
            .iter()
            .map(|tf| {
                let id = self.session_id(tf.id);
                FaceMark {
                    id,
                    bbox: [tf.bbox.x, tf.bbox.y, tf.bbox.w, tf.bbox.h],
                    label: self.labels.get(&id).cloned(),
                }
            })
            .collect();
        self.writer.push_video(VideoFrame {
            image: f.image.clone(),
            t,
            fps: self.fps,
            marks,
        });
    }

    fn scores(&mut self, s: &FrameScores) {
        if !self.current(s.generation) {
            return;
        }
        if self.clock == Clock::Capture && s.captured < self.start {
            return;
        }
        let Some(t) = self.time(s.captured, s.t) else {
            return;
        };
        self.bank_ready(&s.bank);
        // Frames before this one were shown with the labels of before.
        self.flush_pending(s.seq);
        let faces = s.faces.iter().map(|f| self.face_record(f, s)).collect();
        let record = FrameRecord {
            frame: s.index,
            seq: s.seq,
            t: round_secs(t),
            wall: self.wall(s.captured),
            source_t: round_secs(s.t),
            faces,
        };
        self.last_t = record.t;
        self.writer.write_frame(record);
        self.flush_pending(s.seq + 1);
    }

    fn face_record(&mut self, f: &TrackedResult, s: &FrameScores) -> FaceRecord {
        let id = self.session_id(f.id);
        let sc = &f.face.scores;
        // The pipeline's smoothed scores are the window's: record those.
        let smoothed = f.smoothed.as_ref();
        let shown = smoothed.unwrap_or(sc);
        let p = shown.predicted;
        self.labels.insert(
            id,
            (
                shown.predicted_name().to_string(),
                shown.probs.get(p).copied().unwrap_or(0.0),
            ),
        );
        let descriptors = top_descriptors(sc, &s.bank, self.top);
        face_record(id, f, descriptors, s.probe.as_deref())
    }
}

/// The record of one face as a session holds it (`id`: its session id):
/// what was computed, and the smoothed scores the window showed.
pub(crate) fn face_record(
    id: u64,
    f: &TrackedResult,
    descriptors: Vec<DescriptorRecord>,
    probe: Option<&str>,
) -> FaceRecord {
    let sc = &f.face.scores;
    let b = &f.face.bbox;
    FaceRecord {
        id,
        bbox: [b.x, b.y, b.w, b.h],
        detection: Some(b.score),
        landmarks: b.landmarks.map(round_landmarks),
        predicted: sc.predicted_name().to_string(),
        classes: class_scores_of(sc),
        dynamic: f
            .dynamic
            .as_ref()
            .map(|d| ScoresRecord::of(Some(d.mode.as_str()), &d.scores)),
        smoothed: f.smoothed.as_ref().map(|x| ScoresRecord::of(None, x)),
        descriptors,
        probe: probe.zip(f.probe_logit).map(|(text, logit)| ProbeRecord {
            text: text.to_string(),
            logit,
        }),
    }
}

fn top_descriptors(s: &ExpressionScores, bank: &DescriptorBank, k: usize) -> Vec<DescriptorRecord> {
    s.ranked()
        .into_iter()
        .take(k)
        .filter_map(|i| {
            let d = bank.descriptors.get(i)?;
            Some(DescriptorRecord {
                class: bank.layout.name(d.class).to_string(),
                index: d.index,
                logit: s.logits.get(i).copied()?,
                text: d.text.clone(),
            })
        })
        .collect()
}

/// The settings of a run in meta.json: what was asked for (weights, bank,
/// device), detection and cropping, frame limit, probe, smoothing.
#[derive(Clone, Debug, Serialize)]
pub struct RunSettings<'a> {
    pub command: &'a str,
    pub weights_arg: &'a Option<PathBuf>,
    pub device_arg: &'a str,
    pub bank: BankSetting<'a>,
    pub detect: bool,
    pub margin: f32,
    pub align: bool,
    pub detector: DetectorSetting,
    pub frames: Option<u64>,
    pub probe: Option<&'a str>,
    pub smoothing: f32,
}

/// The descriptors asked for: `"built-in zero-shot"`, `{"prompts": PATH}`
/// or `{"learned": PATH}`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BankSetting<'a> {
    #[serde(rename = "built-in zero-shot")]
    BuiltinZeroShot,
    Prompts(&'a Path),
    Learned(&'a Path),
}

/// The face detector and its settings.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum DetectorSetting {
    CenterFace {
        kind: &'static str,
        /// `built-in` or the ONNX file given.
        model: String,
        min_face_size: u32,
        confidence: f32,
        track_confidence: f32,
        max_side: u32,
    },
    Seeta {
        kind: &'static str,
        min_face_size: u32,
        score_threshold: f32,
        pyramid_scale: f32,
        slide_step: u32,
        max_side: u32,
    },
}

/// [`RunSettings`] of a run, as the JSON meta.json keeps.
pub fn run_settings(
    command: &str,
    model: &ModelSpec,
    analyzer: &AnalyzerConfig,
    frames: Option<u64>,
    probe: Option<&str>,
    smoothing: f32,
) -> Value {
    let d = &analyzer.detector;
    let settings = RunSettings {
        command,
        weights_arg: &model.weights,
        device_arg: &model.device,
        bank: match &model.bank {
            BankSource::BuiltinZeroShot => BankSetting::BuiltinZeroShot,
            BankSource::Prompts(p) => BankSetting::Prompts(p),
            BankSource::Learned(p) => BankSetting::Learned(p),
        },
        detect: analyzer.detect,
        margin: analyzer.margin,
        align: analyzer.align,
        detector: match d.kind {
            DetectorKind::CenterFace => DetectorSetting::CenterFace {
                kind: d.kind.name(),
                model: (analyzer.detector_model.as_ref())
                    .map_or("built-in".to_string(), |p| p.display().to_string()),
                min_face_size: d.min_face_size,
                confidence: d.confidence,
                track_confidence: d.track_confidence,
                max_side: d.max_side,
            },
            DetectorKind::Seeta => DetectorSetting::Seeta {
                kind: d.kind.name(),
                min_face_size: d.min_face_size,
                score_threshold: d.score_threshold,
                pyramid_scale: d.pyramid_scale,
                slide_step: d.slide_step,
                max_side: d.max_side,
            },
        },
        frames,
        probe,
        smoothing,
    };
    serde_json::to_value(settings).unwrap_or_default()
}

/// How long a recording has run, as `m:ss`.
pub fn format_elapsed(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// Landmarks to a tenth of a pixel: the detector is not finer, and the
/// JSONL stays readable.
fn round_landmarks(l: [[f32; 2]; 5]) -> [[f32; 2]; 5] {
    l.map(|p| p.map(|v| (v * 10.0).round() / 10.0))
}
