//! The live pipeline: background threads that turn frames into per-face
//! results, for the app and for `cliper run`.
//!
//! ```text
//!  capture ──[1]──> detect + track ──[1]──> encode + score ──> events
//!  (source)         (FaceDetector,          (CLIP vision tower, one batch
//!                    Tracker)                per frame; descriptor bank)
//! ```
//!
//! Each arrow is a queue of capacity one. Live, the newest frame wins: a
//! stage that is still busy when a new frame arrives finds only the newest
//! one waiting, so latency never piles up and slow inference simply skips
//! frames. In batch mode the queues block instead, and every frame of a file
//! is processed.
//!
//! Results leave over a channel as [`PipelineEvent`]s; after each one the
//! worker calls the `notify` callback it was given (the app passes
//! `request_repaint`). Nothing here knows about the UI.
//!
//! Faults are events, never panics: a source that cannot be opened or a
//! camera that vanishes is reported and the pipeline waits for another
//! source; a model that fails to load is reported and frames still flow
//! (boxes without scores).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender, TrySendError};
use image::RgbImage;

use crate::model::cliper::scoring;
use crate::model::cliper::{CliperCheckpoint, DescriptorBank};
use crate::model::device;
use crate::model::explain::{self, ExplainMap, Method, Target};
use crate::model::setup::{self, BankSource, Loaded, ModelSpec};
use crate::model::temporal::TemporalModule;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::{Checkpoint, ClipModel};
use crate::pipeline::analyzer::{AnalyzerConfig, FaceAnalyzer, FaceResult};
use crate::pipeline::dynamic::{DynamicScorer, DynamicScores, FeatureWindows};
use crate::vision::faces::crop_face;
use crate::vision::source::{Frame, FrameSource, SourceError, SourceSpec};
use crate::vision::tracking::{Tracker, TrackerConfig};

/// How the pipeline treats time and frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// For display: files and images play in real time, stale frames are
    /// dropped, and a source that ends leaves the pipeline waiting for the
    /// next one.
    Live,
    /// For batch processing: as fast as possible, every frame processed in
    /// order, and the pipeline finishes when the source ends.
    Batch,
}

impl RunMode {
    /// How capture and detection give way to the model. In a batch run
    /// they take only what the model leaves (`SCHED_IDLE`): the model
    /// paces the run, and they keep up in its gaps (measured on `cliper
    /// run`: see the README's "Benchmarks"). Live they must keep the boxes moving beside a
    /// busy model and window, so they step back by niceness only.
    pub(crate) fn give_way(self) -> crate::parallel::GiveWay {
        match self {
            RunMode::Live => crate::parallel::GiveWay::Nice,
            RunMode::Batch => crate::parallel::GiveWay::Idle,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub source: SourceSpec,
    pub model: ModelSpec,
    pub analyzer: AnalyzerConfig,
    pub tracker: TrackerConfig,
    pub mode: RunMode,
    /// Stop after this many frames (`cliper run --frames N`).
    pub max_frames: Option<u64>,
    /// A free-text description scored next to the classes.
    pub probe: Option<String>,
    /// The dynamic branch's window of frame features per face.
    pub dynamic: DynamicSettings,
    /// Draw this descriptor's or class's fast map for every face from the start.
    pub explain: Option<Target>,
    /// EMA factor of the displayed scores from the start (0: off); see
    /// [`PipelineCommand::SetSmoothing`].
    pub smoothing: f32,
    /// Send each frame with its boxes ([`PipelineEvent::Frame`]): on in live
    /// mode (the window shows them), and in batch runs that record video.
    pub emit_frames: bool,
    /// Batch mode: after a source ends or fails, wait for the next
    /// [`PipelineCommand::SetSource`] instead of finishing, so that one
    /// loaded model serves a whole list of files (`cliper batch`).
    pub keep_open: bool,
}

/// Window length and stride of the dynamic branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DynamicSettings {
    /// Frame features per window (capped at the temporal module's frames).
    pub window: usize,
    /// A new dynamic score every `stride` frames once a window is full.
    pub stride: usize,
}

impl Default for DynamicSettings {
    fn default() -> Self {
        Self {
            window: crate::model::temporal::DEFAULT_FRAMES,
            stride: 1,
        }
    }
}

/// A request for the maps of one still frame (the app's paused frame),
/// computed on a background thread: Grad-CAM and occlusion cost one to
/// dozens of forward passes per face, far too slow for every frame.
#[derive(Clone, Debug)]
pub struct ExactRequest {
    /// Chosen by the caller; the events about this request carry it.
    pub id: u64,
    pub frame: Arc<DetectedFrame>,
    pub target: Target,
    pub method: Method,
    /// Occlusion grid cells per side.
    pub grid: usize,
}

/// Live detection runs on frames shrunk to at most this longer side, so a
/// new frame's boxes reach the screen sooner (detection time grows with the
/// pixels searched; `cliper bench` times it). CenterFace looks for faces
/// from 64 px there, which shrinks a 640x480 frame further, to 200x150;
/// SeetaFace searches 320x240 and finds faces down to 80 px in a 640x480
/// frame.
pub const LIVE_DETECT_MAX_SIDE: u32 = 320;

impl PipelineConfig {
    /// Defaults for `mode`; live mode detects on smaller frames.
    pub fn new(source: SourceSpec, model: ModelSpec, mode: RunMode) -> Self {
        let mut analyzer = AnalyzerConfig::default();
        if mode == RunMode::Live {
            analyzer.detector.max_side = LIVE_DETECT_MAX_SIDE;
        }
        Self {
            source,
            model,
            analyzer,
            tracker: TrackerConfig::default(),
            mode,
            max_frames: None,
            probe: None,
            dynamic: DynamicSettings::default(),
            explain: None,
            smoothing: 0.0,
            emit_frames: mode == RunMode::Live,
            keep_open: false,
        }
    }
}

type Notify = Arc<Mutex<Box<dyn FnMut() + Send>>>;

/// Sends events and pokes the consumer.
#[derive(Clone)]
struct Events {
    tx: Sender<PipelineEvent>,
    notify: Notify,
}

impl Events {
    /// Returns false when nobody listens any more.
    fn send(&self, e: PipelineEvent) -> bool {
        let ok = self.tx.send(e).is_ok();
        if let Ok(mut f) = self.notify.lock() {
            f();
        }
        ok
    }
}

/// A capacity-one queue in front of a stage.
struct StageQueue<T> {
    tx: Sender<T>,
    /// A receiver kept by the sender to throw away a stale item.
    drain: Receiver<T>,
    newest_wins: bool,
}

impl<T> StageQueue<T> {
    fn new(newest_wins: bool) -> (Self, Receiver<T>) {
        let (tx, rx) = bounded(1);
        (
            Self {
                tx,
                drain: rx.clone(),
                newest_wins,
            },
            rx,
        )
    }

    /// Queues `item`; returns (still open, frames dropped).
    fn push(&self, mut item: T) -> (bool, u64) {
        if !self.newest_wins {
            return (self.tx.send(item).is_ok(), 0);
        }
        let mut dropped = 0;
        loop {
            match self.tx.try_send(item) {
                Ok(()) => return (true, dropped),
                Err(TrySendError::Full(back)) => {
                    if self.drain.try_recv().is_ok() {
                        dropped += 1;
                    }
                    item = back;
                }
                Err(TrySendError::Disconnected(_)) => return (false, dropped),
            }
        }
    }

    /// Whether the stage behind has taken everything queued (it is busy
    /// with the last item, or waiting for the next).
    fn is_empty(&self) -> bool {
        self.drain.is_empty()
    }
}

/// A captured frame on its way to detection.
struct Captured {
    frame: Frame,
    seq: u64,
    generation: u64,
    captured: Instant,
    capture_fps: f32,
    decode_ms: f32,
    dropped: u64,
}

/// Events a batch pipeline may queue ahead of its consumer.
const BATCH_EVENTS: usize = 64;

/// A running pipeline. Dropping it stops the threads (without waiting).
pub struct Pipeline {
    pub events: Receiver<PipelineEvent>,
    capture_cmd: Sender<PipelineCommand>,
    detect_cmd: Sender<PipelineCommand>,
    infer_cmd: Sender<PipelineCommand>,
    threads: Vec<JoinHandle<()>>,
}

impl Pipeline {
    /// Starts the threads. `notify` is called after every event (from the
    /// worker threads): pass `move || ctx.request_repaint()` from an app, or
    /// `|| {}`.
    pub fn start(config: PipelineConfig, notify: impl FnMut() + Send + 'static) -> Self {
        crate::parallel::start_model_pool();
        // Batch runs wait for their consumer: a slow disk under a recording
        // or a slow reader of `cliper run`'s output then slows the pipeline
        // instead of piling up frames (each one an image) in memory. Live,
        // the window drains the queue every frame and stale frames go.
        let (ev_tx, events) = match config.mode {
            RunMode::Batch => bounded(BATCH_EVENTS),
            RunMode::Live => unbounded(),
        };
        let events_out = Events {
            tx: ev_tx,
            notify: Arc::new(Mutex::new(Box::new(notify))),
        };
        let newest_wins = config.mode == RunMode::Live;
        let (to_detect, detect_rx) = StageQueue::<Captured>::new(newest_wins);
        let (to_infer, infer_rx) = StageQueue::<Arc<DetectedFrame>>::new(newest_wins);
        let (capture_cmd, capture_cmd_rx) = unbounded();
        let (infer_cmd, infer_cmd_rx) = unbounded();
        let (detect_cmd, detect_cmd_rx) = unbounded();
        let mut threads = Vec::new();

        let ev = events_out.clone();
        let cfg = config.clone();
        threads.push(spawn("cliper-capture", move || {
            capture_stage(cfg, to_detect, capture_cmd_rx, ev)
        }));
        // Set by the model stage once it knows where the model runs.
        let model_on_cpu = Arc::new(AtomicBool::new(false));
        let ev = events_out.clone();
        let cfg = config.clone();
        let on_cpu = model_on_cpu.clone();
        threads.push(spawn("cliper-detect", move || {
            detect_stage(cfg, detect_rx, detect_cmd_rx, to_infer, ev, on_cpu)
        }));
        let ev = events_out;
        // At the model pool's priority, also when the window has given way.
        let infer = crate::parallel::spawn_beside_model("cliper-infer", move || {
            infer_stage(config, infer_rx, infer_cmd_rx, ev, model_on_cpu)
        });
        threads.push(infer.unwrap_or_else(|e| panic!("cannot start thread cliper-infer: {e}")));
        Self {
            events,
            capture_cmd,
            detect_cmd,
            infer_cmd,
            threads,
        }
    }

    /// Sends a command to the stage that owns it.
    pub fn command(&self, cmd: PipelineCommand) {
        let _ = match cmd {
            PipelineCommand::SetSource(_) | PipelineCommand::SetPaused(_) => {
                self.capture_cmd.send(cmd)
            }
            PipelineCommand::SetDetector(kind) => {
                let _ = self.infer_cmd.send(PipelineCommand::SetDetector(kind));
                self.detect_cmd.send(cmd)
            }
            _ => self.infer_cmd.send(cmd),
        };
    }

    /// Stops the threads and waits for them (batch use; the app just drops
    /// the pipeline, since a camera read may block for a frame time).
    pub fn join(mut self) {
        self.shut();
        // Nobody reads the events any more: a stage blocked on a full
        // queue must see the channel closed, not wait for ever.
        self.events = crossbeam_channel::never();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    fn shut(&mut self) {
        // Closing the command channels tells capture and inference to stop;
        // detection stops when capture closes its queue.
        let (dead, _) = unbounded();
        self.capture_cmd = dead.clone();
        self.infer_cmd = dead;
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.shut();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .unwrap_or_else(|e| panic!("cannot start thread {name}: {e}"))
}

/// Rate of events from the spacing of the last few, in events per second.
#[derive(Default)]
struct RateMeter {
    last: Option<Instant>,
    period: Option<f32>,
}

impl RateMeter {
    fn tick(&mut self) -> f32 {
        let now = Instant::now();
        if let Some(last) = self.last {
            let dt = now.duration_since(last).as_secs_f32();
            self.period = Some(match self.period {
                Some(p) => 0.8 * p + 0.2 * dt,
                None => dt,
            });
        }
        self.last = Some(now);
        match self.period {
            Some(p) if p > 0.0 => 1.0 / p,
            _ => 0.0,
        }
    }
}

mod capture;
mod detect;
mod error;
mod events;
mod exact;
mod infer;

pub use error::{ModelError, SourceFailure, SourceWarning};
pub use events::{
    DetectedFrame, FrameScores, ModelInfo, PipelineCommand, PipelineEvent, SourceInfo,
    StageTimings, TrackedResult,
};

use capture::capture_stage;
use detect::detect_stage;
use infer::infer_stage;
