//! What the window shows: the newest frame and its boxes, per-face score
//! histories, the state of the source and the model, and the latency
//! figures. Plain data; the panels read it.
//!
//! The live window folds it from pipeline events ([`Store::apply`]); replay
//! folds it from a session's records ([`Store::replay`], [`Store::seek`]),
//! so the same panels draw both. The recorder writes what the store shows:
//! the pipeline's smoothed scores, which both read.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::cliper::expressions::BankLayout;
use crate::model::cliper::{DescriptorBank, ExpressionScores};
use crate::model::explain::{ExplainMap, Method, Target};
use crate::pipeline::worker::{
    DetectedFrame, FrameScores, ModelInfo, PipelineEvent, SourceInfo, StageTimings,
};
use crate::session::record::FrameRecord;
use crate::session::timeline::Timelines;
use crate::vision::source::SourceSpec;

/// A face whose scores have not been updated for this long leaves the face
/// list (its history stays in the timeline until it scrolls out).
pub const FACE_TIMEOUT_SECS: f64 = 2.0;

/// Frames over which the share of detected frames is shown.
const DETECTED_KEEP: usize = 50;

#[derive(Clone, Debug, PartialEq)]
pub enum SourceState {
    Opening(SourceSpec),
    Playing,
    Ended { frames: u64 },
    Failed { spec: SourceSpec, error: String },
}

#[derive(Clone, Debug)]
pub enum ModelState {
    Loading,
    Ready(ModelInfo),
    Failed(String),
}

/// A rolling sample of a latency, in milliseconds.
#[derive(Clone, Debug, Default)]
pub struct LatencyStat {
    samples: VecDeque<f32>,
}

impl LatencyStat {
    const KEEP: usize = 240;

    pub fn push(&mut self, ms: f32) {
        if self.samples.len() == Self::KEEP {
            self.samples.pop_front();
        }
        self.samples.push_back(ms);
    }

    /// The median of the recent samples.
    pub fn median(&self) -> Option<f32> {
        self.percentile(0.5)
    }

    pub fn percentile(&self, q: f32) -> Option<f32> {
        if self.samples.is_empty() {
            return None;
        }
        let mut v: Vec<f32> = self.samples.iter().copied().collect();
        v.sort_by(f32::total_cmp);
        let i = ((v.len() - 1) as f32 * q.clamp(0.0, 1.0)).round() as usize;
        Some(v[i])
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// The window frozen on one frame ("Pause"): the pipeline goes on (a camera
/// keeps streaming and recording, a file holds still), the window shows
/// this frame, its faces and their scores as they were.
#[derive(Clone, Debug)]
pub struct Paused {
    pub frame: Arc<DetectedFrame>,
    /// App time at the pause (the store's clock stands still meanwhile).
    pub at: f64,
    pub since: Instant,
}

/// The maps of one (paused frame, target, method), filled by the
/// background job as each face is done.
#[derive(Clone, Debug)]
pub struct ExactMaps {
    pub request: u64,
    /// (generation, seq) of the frame.
    pub frame: (u64, u64),
    pub target: Target,
    pub method: Method,
    pub grid: usize,
    /// Face track id -> map.
    pub maps: HashMap<u64, ExplainMap>,
    /// Forward passes done and due.
    pub progress: (usize, usize),
    pub finished: bool,
    pub cancelled: bool,
    pub error: Option<String>,
    pub started: Instant,
    /// Seconds the job took, once finished.
    pub secs: Option<f32>,
}

/// What identifies a set of exact maps: (frame (generation, seq), target,
/// method, occlusion grid (0 for other methods)).
pub type ExactKey = ((u64, u64), Target, Method, usize);

impl ExactMaps {
    /// Asked for, nothing back yet.
    pub fn pending(request: u64, key: ExactKey) -> Self {
        let (frame, target, method, grid) = key;
        Self {
            request,
            frame,
            target,
            method,
            grid,
            maps: HashMap::new(),
            progress: (0, 0),
            finished: false,
            cancelled: false,
            error: None,
            started: Instant::now(),
            secs: None,
        }
    }

    pub fn key(&self) -> ExactKey {
        (self.frame, self.target, self.method, self.grid)
    }
}

pub struct Store {
    start: Instant,
    /// Replay: the scrubber's session time, which stands in for the clock.
    fixed_time: Option<f64>,
    /// Time the clock stood still (pauses), taken off `now()`.
    paused_total: Duration,
    /// The newest frame with its boxes.
    pub frame: Option<Arc<DetectedFrame>>,
    /// Whether `frame` has been put on screen yet (for the latency figure).
    pub frame_shown: bool,
    pub faces: BTreeMap<u64, FaceHistory>,
    /// The faces' class curves on the store's clock (the same store replay
    /// folds from a session's records).
    pub timelines: Timelines,
    pub selected: Option<u64>,
    pub source: Option<SourceInfo>,
    pub source_state: SourceState,
    pub model: ModelState,
    pub bank: Option<Arc<DescriptorBank>>,
    /// Replay: the session's classes (the order of its curves), for when
    /// no face is on screen to carry them.
    pub layout: Option<Arc<BankLayout>>,
    pub bank_error: Option<String>,
    /// The probe text the model has encoded, and the last probe error.
    pub probe: Option<String>,
    pub probe_error: Option<String>,
    pub timings: StageTimings,
    /// Latest warning (skipped frames) and when it came.
    pub warning: Option<(String, f64)>,
    /// Capture to first paint of a frame with its boxes.
    pub capture_to_screen: LatencyStat,
    /// Capture to scores arriving in the window.
    pub score_lag: LatencyStat,
    /// Whether each of the last frames had its faces detected (`false`:
    /// boxes carried over while detection was paced beside a CPU model).
    pub detected_recent: VecDeque<bool>,
    /// Recent detection, crop and encode times (the closing line's medians).
    pub detect_ms: LatencyStat,
    pub crop_ms: LatencyStat,
    pub encode_ms: LatencyStat,
    pub frames_seen: u64,
    /// Show the dynamic branch's scores where a face has them.
    pub dynamic_view: bool,
    /// The descriptor or class whose map is drawn over the faces.
    pub explain: Option<Target>,
    /// Opacity of that map.
    pub explain_opacity: f32,
    /// Which map is drawn: the fast one every frame, or an exact one
    /// (Grad-CAM, occlusion) computed for the paused frame.
    pub map_method: Method,
    /// Occlusion grid cells per side.
    pub occlusion_grid: usize,
    pub scores_seen: u64,
    /// The frozen frame, while paused.
    pub paused: Option<Paused>,
    /// Exact maps computed for the paused frame (one entry per target and
    /// method asked for; cleared on resume).
    pub exact: Vec<ExactMaps>,
}

impl Store {
    pub fn new(initial: SourceSpec) -> Self {
        Self {
            start: Instant::now(),
            fixed_time: None,
            paused_total: Duration::ZERO,
            frame: None,
            frame_shown: false,
            faces: BTreeMap::new(),
            timelines: Timelines::default(),
            selected: None,
            source: None,
            source_state: SourceState::Opening(initial),
            model: ModelState::Loading,
            bank: None,
            layout: None,
            bank_error: None,
            probe: None,
            probe_error: None,
            timings: StageTimings::default(),
            warning: None,
            capture_to_screen: LatencyStat::default(),
            score_lag: LatencyStat::default(),
            detected_recent: VecDeque::new(),
            detect_ms: LatencyStat::default(),
            crop_ms: LatencyStat::default(),
            encode_ms: LatencyStat::default(),
            frames_seen: 0,
            dynamic_view: false,
            explain: None,
            explain_opacity: 0.5,
            map_method: Method::Fast,
            occlusion_grid: 7,
            scores_seen: 0,
            paused: None,
            exact: Vec::new(),
        }
    }

    /// Seconds since the window opened, less the time spent paused (the
    /// timeline's clock: it stands still while paused).
    pub fn now(&self) -> f64 {
        if let Some(t) = self.fixed_time {
            return t;
        }
        match &self.paused {
            Some(p) => p.at,
            None => (self.start.elapsed() - self.paused_total).as_secs_f64(),
        }
    }

    /// Replay's store: the session's curves, `frames` records, no face on
    /// screen until [`seek`](Self::seek).
    pub fn replay(timelines: Timelines, frames: u64) -> Self {
        // No source is opened: the state below says the recording is over.
        let mut store = Self::new(SourceSpec::Demo);
        store.fixed_time = Some(0.0);
        store.timelines = timelines;
        store.source_state = SourceState::Ended { frames };
        store
    }

    /// Replay: the clock to session time `t`, with the faces on screen kept.
    pub fn set_time(&mut self, t: f64) {
        self.fixed_time = Some(t);
    }

    /// Replay: the clock to session time `t`, the faces to those of the
    /// record shown there (`None`: no record yet). The selection stays, so
    /// a face that leaves and comes back is followed.
    pub fn seek(&mut self, t: f64, record: Option<&FrameRecord>, layout: &Arc<BankLayout>) {
        self.fixed_time = Some(t);
        self.layout = Some(layout.clone());
        self.faces.clear();
        let at = record.map_or(t, |r| r.t);
        for face in record.map_or(&[][..], |r| &r.faces[..]) {
            self.faces
                .insert(face.id, FaceHistory::from_record(face, at, layout));
        }
    }

    /// Freezes the window on the newest frame (false when there is none).
    pub fn pause(&mut self) -> bool {
        if self.paused.is_some() {
            return true;
        }
        let Some(frame) = self.frame.clone() else {
            return false;
        };
        self.paused = Some(Paused {
            frame,
            at: self.now(),
            since: Instant::now(),
        });
        true
    }

    /// Back to live; the exact maps of the paused frame are dropped.
    pub fn resume(&mut self) {
        if let Some(p) = self.paused.take() {
            self.paused_total += p.since.elapsed();
        }
        self.exact.clear();
    }

    /// The frame on screen: the paused one, else the newest.
    pub fn shown_frame(&self) -> Option<&Arc<DetectedFrame>> {
        self.paused
            .as_ref()
            .map(|p| &p.frame)
            .or(self.frame.as_ref())
    }

    /// What the exact-map job should compute now, if anything: the paused
    /// frame, the chosen target and method. `None` when live, with no
    /// target, or when the fast map of a live frame is what is drawn.
    pub fn wanted_exact(&self) -> Option<ExactKey> {
        let p = self.paused.as_ref()?;
        let target = self.explain?;
        let grid = match self.map_method {
            Method::Occlusion => self.occlusion_grid,
            _ => 0,
        };
        Some((
            (p.frame.generation, p.frame.seq),
            target,
            self.map_method,
            grid,
        ))
    }

    /// The exact maps for the current pause, target and method, if asked for.
    pub fn current_exact(&self) -> Option<&ExactMaps> {
        let key = self.wanted_exact()?;
        self.exact.iter().find(|e| e.key() == key)
    }

    /// The map to draw over face `id`, with what it is: the exact map of the
    /// paused frame when one is chosen and done, else the face's fast map.
    pub fn map_for(&self, id: u64) -> Option<(&ExplainMap, Method)> {
        self.explain?;
        if self.paused.is_some() {
            // Paused: every method is computed for the frozen frame itself.
            return self
                .current_exact()
                .and_then(|e| e.maps.get(&id).map(|m| (m, e.method)));
        }
        self.faces
            .get(&id)
            .and_then(|h| h.explain.as_ref())
            .map(|m| (m, Method::Fast))
    }

    fn exact_mut(&mut self, request: u64) -> Option<&mut ExactMaps> {
        self.exact.iter_mut().find(|e| e.request == request)
    }

    /// Folds one event in; `keep_secs` is how much timeline to keep.
    pub fn apply(&mut self, event: PipelineEvent, keep_secs: f64) {
        match event {
            PipelineEvent::SourceOpened(info) => {
                if self.source.as_ref().map(|s| &s.spec) != Some(&info.spec) {
                    // Another source: old faces do not continue.
                    self.faces.clear();
                    self.timelines.clear();
                    self.selected = None;
                }
                self.source = Some(info);
                self.source_state = SourceState::Playing;
            }
            PipelineEvent::SourceFailed { spec, error, .. } => {
                self.source_state = SourceState::Failed {
                    spec,
                    error: error.to_string(),
                };
            }
            PipelineEvent::SourceWarning(w) => self.warning = Some((w.to_string(), self.now())),
            PipelineEvent::SourceEnded { generation, frames } => {
                if self.source.as_ref().map(|s| s.generation) == Some(generation) {
                    self.source_state = SourceState::Ended { frames };
                }
            }
            // Paused: the window keeps its frame and scores (a recording
            // still gets every event: it observes them before the store).
            PipelineEvent::Frame(_) | PipelineEvent::Scores(_) if self.paused.is_some() => {}
            PipelineEvent::Frame(f) => {
                self.frames_seen += 1;
                // Capture and detection figures come with every frame, scored or not.
                self.timings.capture_fps = f.capture_fps;
                if f.detected {
                    self.timings.detect_ms = f.detect_ms;
                    self.detect_ms.push(f.detect_ms);
                }
                if self.detected_recent.len() == DETECTED_KEEP {
                    self.detected_recent.pop_front();
                }
                self.detected_recent.push_back(f.detected);
                self.timings.decode_ms = f.decode_ms;
                let now = self.now();
                for tf in &f.faces {
                    if let Some(h) = self.faces.get_mut(&tf.id) {
                        h.bbox = tf.bbox;
                        // Seen again: it stays in the list while detected.
                        h.updated = h.updated.max(now - FACE_TIMEOUT_SECS / 2.0);
                    }
                }
                self.frame = Some(f);
                self.frame_shown = false;
            }
            PipelineEvent::ModelLoading => self.model = ModelState::Loading,
            PipelineEvent::ModelReady(info) => self.model = ModelState::Ready(info),
            PipelineEvent::ModelFailed(e) => self.model = ModelState::Failed(e.to_string()),
            PipelineEvent::BankReady(b) => {
                self.bank = Some(b);
                self.bank_error = None;
                // Scores under another bank are not comparable.
                self.timelines.clear();
                // Maps of the paused frame were made with the old text
                // features: they are asked for again.
                self.exact.clear();
            }
            PipelineEvent::BankFailed(e) => self.bank_error = Some(e.to_string()),
            PipelineEvent::ProbeReady(t) => {
                self.probe = t;
                self.probe_error = None;
            }
            PipelineEvent::ProbeFailed { error, .. } => self.probe_error = Some(error.to_string()),
            PipelineEvent::Scores(s) => self.apply_scores(s, keep_secs),
            PipelineEvent::ExactMap { request, face, map } => {
                if let Some(e) = self.exact_mut(request) {
                    e.maps.insert(face, map);
                }
            }
            PipelineEvent::ExactProgress {
                request,
                done,
                total,
            } => {
                if let Some(e) = self.exact_mut(request) {
                    e.progress = (done, total);
                }
            }
            PipelineEvent::ExactDone {
                request,
                error,
                cancelled,
            } => {
                if let Some(e) = self.exact_mut(request) {
                    e.finished = true;
                    e.cancelled = cancelled;
                    e.error = error.map(|e| e.to_string());
                    e.secs = Some(e.started.elapsed().as_secs_f32());
                }
                // A cancelled job is asked for again if it is wanted again.
                self.exact.retain(|e| !e.cancelled);
            }
            PipelineEvent::Finished => {}
        }
    }

    fn apply_scores(&mut self, s: FrameScores, keep_secs: f64) {
        if self.source.as_ref().map(|i| i.generation) != Some(s.generation) {
            return; // a late result from the previous source
        }
        self.scores_seen += 1;
        self.timings.crop_ms = s.timings.crop_ms;
        self.timings.encode_ms = s.timings.encode_ms;
        if !s.faces.is_empty() {
            self.crop_ms.push(s.timings.crop_ms);
            self.encode_ms.push(s.timings.encode_ms);
        }
        self.timings.score_ms = s.timings.score_ms;
        self.timings.inference_fps = s.timings.inference_fps;
        self.score_lag
            .push(s.captured.elapsed().as_secs_f32() * 1000.0);
        let now = self.now();
        for f in s.faces {
            let scores = f.face.scores;
            let h = self.faces.entry(f.id).or_insert_with(|| FaceHistory {
                id: f.id,
                bbox: f.face.bbox,
                raw: scores.clone(),
                shown: scores.clone(),
                probe_logit: None,
                updated: now,
                dynamic: None,
                window_fill: None,
                explain: None,
            });
            // The pipeline smooths (the recording gets the same values).
            h.shown = f.smoothed.unwrap_or_else(|| scores.clone());
            h.raw = scores;
            h.bbox = f.face.bbox;
            h.probe_logit = f.probe_logit;
            h.updated = now;
            h.window_fill = Some(f.window_fill);
            h.explain = f.explain;
            h.dynamic = f
                .dynamic
                .map(|d| (f.dynamic_smoothed.unwrap_or(d.scores), d.mode));
            // `None`: the window restarted (new bank, new settings).
            let dynamic = h.dynamic.as_ref().map(|(s, _)| s.probs.clone());
            self.timelines
                .push(f.id, now, h.shown.probs.clone(), dynamic);
        }
        self.prune(keep_secs);
    }

    /// The share of recent frames whose faces were detected (below 1 while
    /// detection is paced beside a CPU model); `None` before any frame.
    pub fn detected_share(&self) -> Option<f32> {
        let n = self.detected_recent.len();
        (n > 0).then(|| self.detected_recent.iter().filter(|d| **d).count() as f32 / n as f32)
    }

    /// The classes on display: the selected face's (its scores carry the
    /// bank they were made with), else the bank's, else the session's
    /// (replay), else CLIPER's.
    pub fn classes(&self) -> Vec<String> {
        if let Some(f) = self.selected_face() {
            return f.shown.layout.classes().to_vec();
        }
        match (&self.bank, &self.layout) {
            (Some(b), _) => b.layout.classes().to_vec(),
            (None, Some(l)) => l.classes().to_vec(),
            (None, None) => BankLayout::cliper().classes().to_vec(),
        }
    }

    /// The scores on display for a face (dynamic or static).
    pub fn view<'a>(&self, h: &'a FaceHistory) -> &'a ExpressionScores {
        h.displayed(self.dynamic_view)
    }

    /// Drops timeline points older than `keep_secs` and faces with nothing left.
    pub fn prune(&mut self, keep_secs: f64) {
        let now = self.now();
        self.timelines.prune(now, keep_secs);
        let timelines = &self.timelines;
        self.faces
            .retain(|id, h| timelines.has(*id) || now - h.updated < FACE_TIMEOUT_SECS);
        let selected_alive = self.selected.is_some_and(|id| {
            self.faces
                .get(&id)
                .is_some_and(|h| now - h.updated < FACE_TIMEOUT_SECS)
        });
        if !selected_alive {
            self.selected = self.current_faces().first().map(|h| h.id).or_else(|| {
                // Keep showing the last face's plots after the video ends.
                self.selected.filter(|id| self.faces.contains_key(id))
            });
        }
    }

    /// Faces seen recently, left to right.
    pub fn current_faces(&self) -> Vec<&FaceHistory> {
        let now = self.now();
        let mut v: Vec<&FaceHistory> = self
            .faces
            .values()
            .filter(|h| now - h.updated < FACE_TIMEOUT_SECS)
            .collect();
        v.sort_by_key(|h| h.bbox.x);
        v
    }

    pub fn selected_face(&self) -> Option<&FaceHistory> {
        self.selected.and_then(|id| self.faces.get(&id))
    }

    /// Marks the newest frame as painted; records its latency once.
    pub fn mark_frame_shown(&mut self) {
        if let (false, Some(f)) = (self.frame_shown, &self.frame) {
            self.capture_to_screen
                .push(f.captured.elapsed().as_secs_f32() * 1000.0);
            self.frame_shown = true;
        }
    }
}

mod face;
#[cfg(test)]
mod tests;

pub use face::FaceHistory;
