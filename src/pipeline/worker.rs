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
use std::sync::atomic::{AtomicU64, Ordering};
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
use crate::model::temporal::TemporalModule;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::{Checkpoint, ClipModel};
use crate::pipeline::analyzer::{AnalyzerConfig, FaceAnalyzer, FaceResult};
use crate::pipeline::dynamic::{DynamicScorer, DynamicScores, FeatureWindows};
use crate::pipeline::setup::{self, BankSource, Loaded, ModelSpec};
use crate::vision::faces::crop_face;
use crate::vision::source::{Frame, FrameSource, SourceError, SourceSpec};
use crate::vision::tracking::{TrackedFace, Tracker, TrackerConfig};

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

/// Live detection runs on frames shrunk to this longer side: 320x240 for a
/// 640x480 camera, about 40 ms with rustface on a laptop core (against about
/// 65 ms at the analyzer's default), and a new frame's boxes reach the screen
/// that much sooner. Faces down to 80 px in a 640x480 frame are still found.
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
            emit_frames: mode == RunMode::Live,
            keep_open: false,
        }
    }
}

/// What the model loader found, for the status bar.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// "CPU", "CUDA", "Metal".
    pub device: String,
    /// The CLIP weights file in use.
    pub weights: std::path::PathBuf,
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
    /// How many frame features the face's window holds.
    pub window_fill: usize,
    /// The fast explanation map of the requested target, when one is asked
    /// for ([`PipelineCommand::SetExplain`]).
    pub explain: Option<ExplainMap>,
}

/// Time spent in each stage for one frame, in milliseconds, plus rates.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimings {
    /// Decoding the frame (video files).
    pub decode_ms: f32,
    pub detect_ms: f32,
    /// Crop, preprocess and vision-tower forward of all faces (one batch).
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
        error: String,
        /// Frames of this source sent on before it failed (0: it never opened).
        frames: u64,
    },
    /// A frame was skipped (an unreadable image in a folder).
    SourceWarning(String),
    /// A finite source played to its end.
    SourceEnded {
        generation: u64,
        frames: u64,
    },
    /// A frame with its face boxes (live mode, or `emit_frames`).
    Frame(Arc<DetectedFrame>),
    ModelLoading,
    ModelReady(ModelInfo),
    ModelFailed(String),
    BankReady(Arc<DescriptorBank>),
    BankFailed(String),
    /// The probe text was encoded (`None`: probe cleared).
    ProbeReady(Option<String>),
    ProbeFailed {
        text: String,
        error: String,
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
        error: Option<String>,
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
    infer_cmd: Sender<PipelineCommand>,
    threads: Vec<JoinHandle<()>>,
}

impl Pipeline {
    /// Starts the threads. `notify` is called after every event (from the
    /// worker threads): pass `move || ctx.request_repaint()` from an app, or
    /// `|| {}`.
    pub fn start(config: PipelineConfig, notify: impl FnMut() + Send + 'static) -> Self {
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
        let mut threads = Vec::new();

        let ev = events_out.clone();
        let cfg = config.clone();
        threads.push(spawn("cliper-capture", move || {
            capture_stage(cfg, to_detect, capture_cmd_rx, ev)
        }));
        let ev = events_out.clone();
        let cfg = config.clone();
        threads.push(spawn("cliper-detect", move || {
            detect_stage(cfg, detect_rx, to_infer, ev)
        }));
        let ev = events_out;
        threads.push(spawn("cliper-infer", move || {
            infer_stage(config, infer_rx, infer_cmd_rx, ev)
        }));
        Self {
            events,
            capture_cmd,
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

fn capture_stage(
    config: PipelineConfig,
    out: StageQueue<Captured>,
    commands: Receiver<PipelineCommand>,
    events: Events,
) {
    let mut spec = Some(config.source.clone());
    let mut current = config.source.clone();
    let mut source: Option<Box<dyn FrameSource>> = None;
    let mut generation = 0u64;
    let mut seq = 0u64;
    let mut dropped = 0u64;
    let mut meter = RateMeter::default();
    // Real-time pacing of file sources: wall time of the first frame and its `t`.
    let mut clock: Option<(Instant, f64)> = None;
    let mut frames_this_source = 0u64;
    let mut paused = false;
    // Batch runs end with their source, unless told to wait for the next.
    let finish_at_end = config.mode == RunMode::Batch && !config.keep_open;
    loop {
        if let Some(s) = spec.take() {
            paused = false;
            source = None;
            generation += 1;
            clock = None;
            frames_this_source = 0;
            current = s.clone();
            match shielded(|| s.open()) {
                Ok(src) => {
                    let info = SourceInfo {
                        spec: s.clone(),
                        generation,
                        name: src.name(),
                        len: src.frame_count(),
                        fps: src.fps(),
                        live: src.is_live(),
                    };
                    source = Some(src);
                    if !events.send(PipelineEvent::SourceOpened(info)) {
                        return;
                    }
                }
                Err(e) => {
                    let failed = PipelineEvent::SourceFailed {
                        spec: s,
                        error: e.to_string(),
                        frames: 0,
                    };
                    if !events.send(failed) || finish_at_end {
                        return;
                    }
                }
            }
        }
        let Some(src) = source.as_mut() else {
            // Nothing to read: wait for a new source, or the end.
            match commands.recv() {
                Ok(PipelineCommand::SetSource(s)) => spec = Some(s),
                Ok(PipelineCommand::SetPaused(p)) => paused = p,
                Ok(_) => {}
                Err(_) => return,
            }
            continue;
        };
        // Commands arrive between frames.
        loop {
            match commands.try_recv() {
                Ok(PipelineCommand::SetSource(s)) => spec = Some(s),
                Ok(PipelineCommand::SetPaused(p)) => paused = p,
                Ok(_) => {}
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => return,
            }
        }
        if spec.is_some() {
            continue;
        }
        if paused && !src.is_live() && config.mode == RunMode::Live {
            // A file holds its frame until resumed; its clock restarts then.
            match commands.recv() {
                Ok(PipelineCommand::SetSource(s)) => spec = Some(s),
                Ok(PipelineCommand::SetPaused(p)) => paused = p,
                Ok(_) => {}
                Err(_) => return,
            }
            clock = None;
            continue;
        }
        // In batch runs a still image is one frame unless told otherwise.
        let limit = config.max_frames.or_else(|| {
            (config.mode == RunMode::Batch && matches!(current, SourceSpec::Still { .. }))
                .then_some(1)
        });
        if limit.is_some_and(|m| frames_this_source >= m) {
            // Batch: done. Live: hold the last picture until told otherwise.
            if finish_at_end {
                return;
            }
            source = None;
            if config.mode == RunMode::Batch {
                let ended = PipelineEvent::SourceEnded {
                    generation,
                    frames: frames_this_source,
                };
                if !events.send(ended) {
                    return;
                }
            }
            continue;
        }
        let next = shielded(|| src.next_frame());
        for w in src.take_warnings() {
            if !events.send(PipelineEvent::SourceWarning(w)) {
                return;
            }
        }
        let frame = match next {
            Ok(Some(f)) => f,
            Ok(None) => {
                source = None;
                let ended = PipelineEvent::SourceEnded {
                    generation,
                    frames: frames_this_source,
                };
                if !events.send(ended) || finish_at_end {
                    return;
                }
                continue;
            }
            Err(e) if e.is_recoverable() => {
                if !events.send(PipelineEvent::SourceWarning(format!(
                    "skipped a frame: {e}"
                ))) {
                    return;
                }
                continue;
            }
            Err(e) => {
                source = None;
                let failed = PipelineEvent::SourceFailed {
                    spec: current.clone(),
                    error: e.to_string(),
                    frames: frames_this_source,
                };
                if !events.send(failed) || finish_at_end {
                    return;
                }
                continue;
            }
        };
        if config.mode == RunMode::Live && !src.is_live() {
            // Play files at their own pace; a command cuts the wait short.
            let (start, t0) = *clock.get_or_insert((Instant::now(), frame.t));
            // Capped: a frame time of 1e30 s (a still at --fps 1e-30) must
            // not overflow the clock.
            let wait = Duration::try_from_secs_f64((frame.t - t0).clamp(0.0, 86_400.0))
                .unwrap_or_default();
            let due = start.checked_add(wait).unwrap_or(start);
            let now = Instant::now();
            if due > now {
                match commands.recv_timeout(due - now) {
                    Ok(PipelineCommand::SetSource(s)) => {
                        spec = Some(s);
                        continue;
                    }
                    // Paused while waiting: this frame is shown on resume.
                    Ok(PipelineCommand::SetPaused(true)) => {
                        paused = true;
                        match commands.recv() {
                            Ok(PipelineCommand::SetSource(s)) => {
                                spec = Some(s);
                                continue;
                            }
                            Ok(PipelineCommand::SetPaused(p)) => paused = p,
                            Ok(_) => {}
                            Err(_) => return,
                        }
                        clock = Some((Instant::now(), frame.t));
                    }
                    Ok(_) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                }
            } else if now.duration_since(due) > Duration::from_millis(500) {
                // Fell behind (a slow decode, a suspended laptop): re-anchor
                // instead of racing to catch up.
                clock = Some((now, frame.t));
            }
        }
        let capture_fps = meter.tick();
        frames_this_source += 1;
        let item = Captured {
            frame,
            seq,
            generation,
            captured: Instant::now(),
            capture_fps,
            decode_ms: src.decode_ms(),
            dropped,
        };
        seq += 1;
        let (open, d) = out.push(item);
        dropped += d;
        if !open {
            return;
        }
    }
}

/// Runs a source call, turning a panic in a third-party decoder or camera
/// driver binding into an error: a broken file or device must end the
/// source, not the capture thread.
fn shielded<T>(f: impl FnOnce() -> Result<T, SourceError>) -> Result<T, SourceError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".into());
        Err(SourceError::Invalid(format!(
            "the source failed inside its decoder or driver: {what}"
        )))
    })
}

fn detect_stage(
    config: PipelineConfig,
    input: Receiver<Captured>,
    out: StageQueue<Arc<DetectedFrame>>,
    events: Events,
) {
    // rustface parallelises on rayon, and so does the CPU model: on rayon's
    // global pool a detection would queue behind a whole forward pass. In
    // its own small pool the OS shares the cores between the two stages, so
    // boxes keep coming at detection speed while the model is busy.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(std::thread::available_parallelism().map_or(2, |n| n.get().min(4)))
        .thread_name(|i| format!("cliper-detect-{i}"))
        .build();
    match pool {
        Ok(pool) => pool.install(move || detect_loop(config, input, out, events)),
        Err(_) => detect_loop(config, input, out, events),
    }
}

fn detect_loop(
    config: PipelineConfig,
    input: Receiver<Captured>,
    out: StageQueue<Arc<DetectedFrame>>,
    events: Events,
) {
    // The detector is not Send: build it on the thread that runs it.
    let mut analyzer = match FaceAnalyzer::new(config.analyzer.clone()) {
        Ok(a) => a,
        Err(e) => {
            events.send(PipelineEvent::SourceFailed {
                spec: config.source.clone(),
                error: e.to_string(),
                frames: 0,
            });
            return;
        }
    };
    let mut tracker = Tracker::new(config.tracker);
    let mut generation = 0;
    for c in input.iter() {
        if c.generation != generation {
            if config.keep_open {
                // Each file of a batch is its own session: ids from 1.
                tracker = Tracker::new(config.tracker);
            } else {
                tracker.reset();
            }
            generation = c.generation;
        }
        let start = Instant::now();
        let boxes = analyzer.find_faces(&c.frame.image);
        let faces = tracker.update(&boxes);
        let detected = Arc::new(DetectedFrame {
            seq: c.seq,
            generation: c.generation,
            index: c.frame.index,
            t: c.frame.t,
            image: c.frame.image,
            faces,
            captured: c.captured,
            decode_ms: c.decode_ms,
            detect_ms: start.elapsed().as_secs_f32() * 1000.0,
            capture_fps: c.capture_fps,
            dropped: c.dropped,
        });
        if config.emit_frames && !events.send(PipelineEvent::Frame(detected.clone())) {
            return;
        }
        if !out.push(detected).0 {
            return;
        }
    }
}

/// The model side of the pipeline, owned by the inference thread.
struct Scorer {
    /// Shared with the background thread of exact maps.
    clip: Arc<ClipModel>,
    tokenizer: ClipTokenizer,
    /// The CLIPER checkpoint of the learned bank in use (its vision tower,
    /// if any, is applied; its temporal weights await the dynamic branch).
    cliper: Option<CliperCheckpoint>,
    bank: Arc<DescriptorBank>,
    /// (text, normalised feature [E]).
    probe: Option<(String, Tensor)>,
    /// The dynamic branch: per-face windows of frame features and the
    /// temporal module of the checkpoint in use (or the mean-of-static fallback).
    windows: FeatureWindows,
    dynamic: DynamicScorer,
    last_dynamic: HashMap<u64, DynamicScores>,
    /// The target of the live explanation map, if any.
    explain: Option<Target>,
    /// The id of the exact-map request that may run (0: none); a running
    /// job stops at its next step once this changes.
    exact_current: Arc<AtomicU64>,
    /// The Exp-CLIP head given at start, for the zero-shot banks.
    head: Option<std::path::PathBuf>,
    /// The plain CLIP weights file, when known (a DFER-CLIP model brings
    /// its own CLIP; leaving it goes back to these).
    plain_weights: Option<std::path::PathBuf>,
}

impl Scorer {
    fn new(loaded: Loaded, head: Option<std::path::PathBuf>) -> Self {
        let Loaded {
            clip,
            bank,
            tokenizer,
            cliper,
        } = loaded;
        let dynamic = DynamicScorer::new(temporal_of(cliper.as_ref(), &clip), &clip.device);
        let settings = DynamicSettings::default();
        let own_clip = cliper.as_ref().is_some_and(|c| c.is_dfer_clip());
        let plain_weights = (!own_clip).then(|| clip.source.clone());
        Self {
            head,
            plain_weights,
            clip: Arc::new(clip),
            tokenizer,
            cliper,
            bank: Arc::new(bank),
            probe: None,
            windows: FeatureWindows::new(settings.window.min(dynamic.frames()), settings.stride),
            dynamic,
            last_dynamic: HashMap::new(),
            explain: None,
            exact_current: Arc::new(AtomicU64::new(0)),
        }
    }

    fn set_dynamic(&mut self, settings: DynamicSettings) {
        self.windows
            .configure(settings.window.min(self.dynamic.frames()), settings.stride);
        self.last_dynamic.clear();
    }

    /// Empties the dynamic windows: a new source's track ids start again
    /// at 1 and must not continue the old source's faces.
    fn restart_windows(&mut self) {
        let (len, stride) = (self.windows.len, self.windows.stride);
        self.windows = FeatureWindows::new(len, stride);
        self.last_dynamic.clear();
    }

    fn set_bank(&mut self, source: &BankSource) -> Result<Arc<DescriptorBank>, String> {
        let mut checkpoint = match source {
            BankSource::Learned(p) => Some(CliperCheckpoint::load(p).map_err(|e| e.to_string())?),
            _ => None,
        };
        // The model must match the bank: a checkpoint may carry a fine-tuned
        // vision tower or (DFER-CLIP) a whole CLIP of its own, and leaving
        // such a bank restores the plain CLIP.
        let own_next = checkpoint
            .as_mut()
            .filter(|c| !c.clip.is_empty())
            .map(|c| (c.path.clone(), std::mem::take(&mut c.clip)));
        let own_now = self.cliper.as_ref().is_some_and(|c| c.is_dfer_clip());
        let tuned_now = own_now || self.cliper.as_ref().is_some_and(|c| !c.vision.is_empty());
        let tuned_next =
            own_next.is_some() || checkpoint.as_ref().is_some_and(|c| !c.vision.is_empty());
        if tuned_now || tuned_next {
            let mut base = match own_next {
                Some((path, tensors)) => {
                    Checkpoint::from_tensors(&path, tensors).map_err(|e| e.to_string())?
                }
                None => {
                    let plain = match &self.plain_weights {
                        Some(p) => p.clone(),
                        None => crate::model::weights::locate(None).map_err(|e| e.to_string())?,
                    };
                    Checkpoint::load(&plain, candle_core::DType::F32).map_err(|e| e.to_string())?
                }
            };
            if let Some(c) = checkpoint.as_ref().filter(|c| !c.vision.is_empty()) {
                c.apply_vision(&mut base).map_err(|e| e.to_string())?;
            }
            let own = checkpoint.as_ref().is_some_and(|c| c.is_dfer_clip());
            self.clip = Arc::new(
                ClipModel::from_checkpoint(&base, &self.clip.device, self.clip.dtype)
                    .map_err(|e| e.to_string())?,
            );
            if !own {
                self.plain_weights = Some(self.clip.source.clone());
            }
        }
        let head = match source {
            BankSource::Learned(_) => None,
            _ => self.head.as_deref(),
        };
        // DFER-CLIP and Exp-CLIP models take squashed, unnormalised pixels.
        let want = if head.is_some() || checkpoint.as_ref().is_some_and(|c| c.is_dfer_clip()) {
            crate::model::preprocess::Preprocessing::Squash
        } else {
            crate::model::preprocess::Preprocessing::Clip
        };
        if self.clip.preprocessing != want {
            let c = &self.clip;
            self.clip = Arc::new(ClipModel {
                vision: c.vision.clone(),
                text: c.text.clone(),
                config: c.config.clone(),
                device: c.device.clone(),
                dtype: c.dtype,
                source: c.source.clone(),
                preprocessing: want,
            });
        }
        let bank = setup::load_bank_with(
            &self.clip,
            &self.tokenizer,
            source,
            checkpoint.as_ref(),
            head,
        )
        .map_err(|e| e.to_string())?;
        self.cliper = checkpoint;
        self.bank = Arc::new(bank);
        // Windows hold features of the old vision tower, and the temporal
        // module belongs to the checkpoint: start the dynamic branch afresh.
        self.dynamic = DynamicScorer::new(
            temporal_of(self.cliper.as_ref(), &self.clip),
            &self.clip.device,
        );
        let (len, stride) = (self.windows.len, self.windows.stride);
        self.windows = FeatureWindows::new(len.min(self.dynamic.frames()), stride);
        self.last_dynamic.clear();
        // The probe lives in the bank's space (another text tower, a head):
        // encode it again.
        if let Some((text, _)) = self.probe.take() {
            self.set_probe(Some(text))?;
        }
        Ok(self.bank.clone())
    }

    fn set_probe(&mut self, text: Option<String>) -> Result<Option<String>, String> {
        let Some(text) = text.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) else {
            self.probe = None;
            return Ok(None);
        };
        let feat = self
            .bank
            .encode_probe(&self.clip, &self.tokenizer, &text)
            .map_err(|e| format!("cannot encode the text: {e}"))?;
        self.probe = Some((text.clone(), feat));
        Ok(Some(text))
    }

    /// Starts (or, with `None`, stops) the background job of exact maps.
    /// The job gets its own handles on the model and the bank's text
    /// features, so scoring goes on while it runs.
    fn exact(&mut self, request: Option<ExactRequest>, analyzer: &AnalyzerConfig, events: &Events) {
        let Some(request) = request else {
            self.exact_current.store(0, Ordering::SeqCst);
            return;
        };
        self.exact_current.store(request.id, Ordering::SeqCst);
        let job = ExactJob {
            clip: self.clip.clone(),
            text: self.bank.text_features.clone(),
            layout: self.bank.layout.clone(),
            head: self.bank.head.is_some(),
            analyzer: analyzer.clone(),
            current: self.exact_current.clone(),
            events: events.clone(),
        };
        let id = request.id;
        let spawned = std::thread::Builder::new()
            .name("cliper-explain".into())
            .spawn(move || job.run(request));
        if let Err(e) = spawned {
            events.send(PipelineEvent::ExactDone {
                request: id,
                error: Some(format!("cannot start the explanation thread: {e}")),
                cancelled: false,
            });
        }
    }

    /// Scores all faces of a frame in one batch.
    ///
    /// The dynamic branch (its own issue) plugs in here: it keeps a window of
    /// the last 16 `embedding`s per track id and scores the temporal module's
    /// output against the same bank; the static results stay as they are.
    fn score(
        &mut self,
        frame: &DetectedFrame,
        analyzer: &AnalyzerConfig,
        timings: &mut StageTimings,
    ) -> candle_core::Result<Vec<TrackedResult>> {
        if frame.faces.is_empty() {
            return Ok(Vec::new());
        }
        let start = Instant::now();
        let crops: Vec<RgbImage> = if analyzer.detect {
            frame
                .faces
                .iter()
                .map(|f| crop_face(&frame.image, &f.bbox, analyzer.margin))
                .collect()
        } else {
            vec![(*frame.image).clone()]
        };
        // With an explanation asked for, the same forward pass also yields
        // the last block's input, from which the fast maps cost a fraction
        // of an encode.
        let (raw, last_input) = match self.explain {
            None => (self.clip.encode_rgb_raw(&crops)?, None),
            Some(_) => {
                let px = self.clip.pixels(&crops)?.to_dtype(self.clip.dtype)?;
                let out = self.clip.vision.forward_with(&px, false, true)?;
                (
                    out.embedding.to_dtype(candle_core::DType::F32)?,
                    out.last_block_input,
                )
            }
        };
        let emb = crate::model::layers::l2_normalize(&raw)?;
        timings.encode_ms = start.elapsed().as_secs_f32() * 1000.0;
        let start = Instant::now();
        let scores = scoring::score(&emb, &self.bank)?;
        let probe = match &self.probe {
            Some((_, feat)) => Some(scoring::probe_logits(&emb, feat, &self.bank)?),
            None => None,
        };
        let rows = emb.to_vec2::<f32>()?;
        let raw_rows = raw.to_vec2::<f32>()?;
        // Dynamic branch: one push per face, one batched temporal pass for
        // the faces whose window is due; windows of faces that left go.
        let ids: Vec<u64> = frame.faces.iter().map(|f| f.id).collect();
        self.windows.retain(&ids);
        self.last_dynamic.retain(|id, _| ids.contains(id));
        let due: Vec<u64> = ids
            .iter()
            .zip(&raw_rows)
            .filter_map(|(&id, e)| self.windows.push(id, e.clone()).then_some(id))
            .collect();
        if !due.is_empty() {
            let windows: Vec<Vec<&[f32]>> = due
                .iter()
                .filter_map(|&id| self.windows.window(id))
                .collect();
            let scored = self.dynamic.score_many(&windows, &self.bank)?;
            for (id, d) in due.iter().zip(scored) {
                self.last_dynamic.insert(*id, d);
            }
        }
        let mut maps: Vec<Option<ExplainMap>> = vec![None; frame.faces.len()];
        if let (Some(target), Some(last), None) = (self.explain, &last_input, &self.bank.head) {
            let text = self.bank.text_features.to_dtype(last.dtype())?;
            let (text, target) = explain::resolve(&text, target, &self.bank.layout)?;
            let fast = explain::fast_target_maps(&self.clip.vision, last, &text, target)?;
            for (m, f) in maps.iter_mut().zip(fast) {
                *m = Some(f);
            }
        }
        timings.score_ms = start.elapsed().as_secs_f32() * 1000.0;
        let mut maps = maps.into_iter();
        Ok(frame
            .faces
            .iter()
            .zip(scores)
            .zip(rows)
            .enumerate()
            .map(|(i, ((f, scores), embedding))| TrackedResult {
                id: f.id,
                face: FaceResult {
                    bbox: f.bbox,
                    scores,
                    embedding,
                },
                probe_logit: probe.as_ref().and_then(|p| p.get(i).copied()),
                dynamic: self.last_dynamic.get(&f.id).cloned(),
                window_fill: self.windows.filled(f.id),
                explain: maps.next().flatten(),
            })
            .collect())
    }
}

/// The temporal module of a checkpoint, if it has one that fits; a broken
/// one is reported and the fallback used.
fn temporal_of(cliper: Option<&CliperCheckpoint>, clip: &ClipModel) -> Option<TemporalModule> {
    let ck = cliper?;
    match ck.temporal_module(clip.config.embed_dim, &clip.device) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "warning: {}: temporal weights not used ({e}); dynamic scores fall back to the mean of static scores",
                ck.path.display()
            );
            None
        }
    }
}

/// The maps of one still frame, computed off the inference thread.
struct ExactJob {
    clip: Arc<ClipModel>,
    text: Tensor,
    layout: Arc<crate::model::cliper::expressions::BankLayout>,
    /// Whether the bank scores through an Exp-CLIP head (no maps then).
    head: bool,
    analyzer: AnalyzerConfig,
    current: Arc<AtomicU64>,
    events: Events,
}

impl ExactJob {
    fn run(self, request: ExactRequest) {
        let id = request.id;
        let (error, cancelled) = match self.maps(&request) {
            Ok(done) => (None, !done),
            Err(e) => (Some(e.to_string()), false),
        };
        self.events.send(PipelineEvent::ExactDone {
            request: id,
            error,
            cancelled,
        });
    }

    fn live(&self, id: u64) -> bool {
        self.current.load(Ordering::SeqCst) == id
    }

    /// Sends each face's map as it is done; `Ok(false)`: cancelled.
    fn maps(&self, r: &ExactRequest) -> candle_core::Result<bool> {
        let clip = &self.clip;
        if self.head {
            candle_core::bail!(
                "explanation maps are not available for a bank scored through an Exp-CLIP head"
            )
        }
        let text = self.text.to_dtype(clip.dtype)?;
        let (text, target) = explain::resolve(&text, r.target, &self.layout)?;
        let faces = &r.frame.faces;
        let grid = r.grid.clamp(1, clip.config.vision.image_size);
        // Forward passes per face, for the progress figure.
        let per_face = match r.method {
            Method::Occlusion => grid * grid + 1,
            _ => 1,
        };
        let total = per_face * faces.len();
        for (i, face) in faces.iter().enumerate() {
            if !self.live(r.id) {
                return Ok(false);
            }
            let crop = if self.analyzer.detect {
                crop_face(&r.frame.image, &face.bbox, self.analyzer.margin)
            } else {
                (*r.frame.image).clone()
            };
            let px = clip.pixels(&[crop])?.to_dtype(clip.dtype)?;
            let vision = &clip.vision;
            let map = match r.method {
                Method::Fast => explain::fast_map(vision, &px, &text, target)?,
                Method::GradCam => explain::gradcam_map(vision, &px, &text, target)?,
                Method::Occlusion => {
                    let progress = |done: usize, _: usize| {
                        self.events.send(PipelineEvent::ExactProgress {
                            request: r.id,
                            done: i * per_face + done,
                            total,
                        });
                        self.live(r.id)
                    };
                    match explain::occlusion_map_with(vision, &px, &text, target, grid, progress)? {
                        Some(m) => m,
                        None => return Ok(false),
                    }
                }
            };
            self.events.send(PipelineEvent::ExactMap {
                request: r.id,
                face: face.id,
                map,
            });
            self.events.send(PipelineEvent::ExactProgress {
                request: r.id,
                done: (i + 1) * per_face,
                total,
            });
        }
        Ok(true)
    }
}

fn infer_stage(
    config: PipelineConfig,
    input: Receiver<Arc<DetectedFrame>>,
    commands: Receiver<PipelineCommand>,
    events: Events,
) {
    let batch = config.mode == RunMode::Batch;
    if !events.send(PipelineEvent::ModelLoading) {
        return;
    }
    let start = Instant::now();
    let loaded = match setup::load(&config.model) {
        // Live, a bank that cannot be read (a saved choice whose file went
        // bad) must not leave the window without a model: say so and fall
        // back to the built-in descriptions. Batch runs stop instead.
        Err(e @ (setup::SetupError::Cliper(_) | setup::SetupError::Bank(_)))
            if !batch && !matches!(config.model.bank, BankSource::BuiltinZeroShot) =>
        {
            events.send(PipelineEvent::BankFailed(format!(
                "{e}; using the built-in zero-shot descriptions instead"
            )));
            let mut spec = config.model.clone();
            spec.bank = BankSource::BuiltinZeroShot;
            setup::load(&spec)
        }
        other => other,
    };
    let mut scorer = match loaded {
        Ok(loaded) => {
            let mut scorer = Scorer::new(loaded, config.model.head.clone());
            scorer.set_dynamic(config.dynamic);
            scorer.explain = config.explain;
            let info = ModelInfo {
                device: device::describe(&scorer.clip.device).to_string(),
                weights: scorer.clip.source.clone(),
                load_secs: start.elapsed().as_secs_f32(),
            };
            events.send(PipelineEvent::ModelReady(info));
            events.send(PipelineEvent::BankReady(scorer.bank.clone()));
            Some(scorer)
        }
        Err(e) => {
            events.send(PipelineEvent::ModelFailed(e.to_string()));
            if batch {
                events.send(PipelineEvent::Finished);
                return;
            }
            None
        }
    };
    if let (Some(s), Some(text)) = (scorer.as_mut(), config.probe.clone()) {
        let ev = match s.set_probe(Some(text.clone())) {
            Ok(t) => PipelineEvent::ProbeReady(t),
            Err(error) => PipelineEvent::ProbeFailed { text, error },
        };
        events.send(ev);
    }
    let mut meter = RateMeter::default();
    let mut inference_fps = 0.0;
    let mut commands_open = true;
    let mut generation = 0;
    loop {
        let frame = if commands_open {
            select! {
                recv(commands) -> cmd => {
                    match cmd {
                        Ok(cmd) => handle_command(&mut scorer, cmd, &config.analyzer, &events),
                        // The owner is gone: finish the frames in flight
                        // (batch) or stop (live).
                        Err(_) if batch => commands_open = false,
                        Err(_) => return,
                    }
                    continue;
                }
                recv(input) -> f => f,
            }
        } else {
            input.recv()
        };
        let Ok(frame) = frame else {
            // Capture and detection are done.
            events.send(PipelineEvent::Finished);
            return;
        };
        let Some(s) = scorer.as_mut() else {
            continue;
        };
        if frame.generation != generation {
            s.restart_windows();
            generation = frame.generation;
        }
        let mut timings = StageTimings {
            decode_ms: frame.decode_ms,
            detect_ms: frame.detect_ms,
            capture_fps: frame.capture_fps,
            inference_fps,
            ..Default::default()
        };
        let faces = match s.score(&frame, &config.analyzer, &mut timings) {
            Ok(f) => f,
            Err(e) => {
                events.send(PipelineEvent::ModelFailed(format!(
                    "inference failed on frame {}: {e}",
                    frame.index
                )));
                if batch {
                    events.send(PipelineEvent::Finished);
                    return;
                }
                continue;
            }
        };
        inference_fps = meter.tick();
        timings.inference_fps = inference_fps;
        let scores = FrameScores {
            seq: frame.seq,
            generation: frame.generation,
            index: frame.index,
            t: frame.t,
            captured: frame.captured,
            faces,
            timings,
            probe: s.probe.as_ref().map(|(t, _)| t.clone()),
            bank: s.bank.clone(),
        };
        if !events.send(PipelineEvent::Scores(scores)) {
            return;
        }
    }
}

fn handle_command(
    scorer: &mut Option<Scorer>,
    cmd: PipelineCommand,
    analyzer: &AnalyzerConfig,
    events: &Events,
) {
    let Some(s) = scorer.as_mut() else {
        let what = match cmd {
            PipelineCommand::SetBank(_) => "descriptors",
            PipelineCommand::Exact(Some(r)) => {
                events.send(PipelineEvent::ExactDone {
                    request: r.id,
                    error: Some("no model is loaded".into()),
                    cancelled: false,
                });
                return;
            }
            PipelineCommand::SetProbe(_) => "probe text",
            _ => return,
        };
        events.send(PipelineEvent::ModelFailed(format!(
            "cannot change the {what}: no model is loaded"
        )));
        return;
    };
    let ev = match cmd {
        PipelineCommand::SetBank(source) => match s.set_bank(&source) {
            Ok(bank) => PipelineEvent::BankReady(bank),
            Err(e) => PipelineEvent::BankFailed(e),
        },
        PipelineCommand::SetProbe(text) => match s.set_probe(text.clone()) {
            Ok(t) => PipelineEvent::ProbeReady(t),
            Err(error) => PipelineEvent::ProbeFailed {
                text: text.unwrap_or_default(),
                error,
            },
        },
        PipelineCommand::SetDynamic(d) => {
            s.set_dynamic(d);
            return;
        }
        PipelineCommand::SetExplain(t) => {
            s.explain = t;
            return;
        }
        PipelineCommand::Exact(r) => {
            s.exact(r, analyzer, events);
            return;
        }
        PipelineCommand::SetSource(_) | PipelineCommand::SetPaused(_) => return,
    };
    events.send(ev);
}
