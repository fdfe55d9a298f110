//! Recording in the live window: the Record toggle (elapsed time, folder,
//! errors) and Open Session (replay in its own window), plus the state
//! behind them. A recording is a [`Recorder`] fed with every pipeline event;
//! a write error stops it and is shown here, and the live view goes on.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};
use eframe::egui::{self, Color32, RichText};

use super::store::{ModelState, Store};
use super::Action;
use crate::model::setup::ModelSpec;
use crate::pipeline::analyzer::AnalyzerConfig;
use crate::pipeline::recorder::{format_elapsed, run_settings, RecordOptions, Recorder};
use crate::pipeline::worker::{PipelineEvent, LIVE_DETECT_MAX_SIDE};
use crate::session::finalize::{finalize_all, Finalized};
use crate::session::writer::FinishReport;
use crate::session::{default_recordings_dir, new_session_dir, SessionError, SessionMeta};

const REC_RED: Color32 = Color32::from_rgb(235, 64, 52);

/// A recording being finished on its thread (the encoder's last frames, meta.json).
struct Finishing {
    dir: PathBuf,
    rx: Receiver<Result<FinishReport, SessionError>>,
    since: Instant,
}

pub struct RecordingState {
    recorder: Option<Recorder>,
    finishing: Option<Finishing>,
    /// Where new recordings go.
    base: PathBuf,
    /// `--record DIR`: the folder of the first recording.
    first_dir: Option<PathBuf>,
    raw_video: bool,
    /// What the last recording left, or why it stopped.
    message: Option<(String, bool)>,
    /// Unfinished sessions found at start-up and finalised.
    recovered: Option<Receiver<Vec<String>>>,
    recovered_notes: Vec<String>,
    open_path: String,
}

impl RecordingState {
    /// `record`: start recording into this folder at once (`--record`).
    pub fn new(record: Option<PathBuf>, raw_video: bool, ctx: &egui::Context) -> Self {
        let base = default_recordings_dir();
        // A crash during an earlier recording left it unfinished: finish it
        // now, off the UI thread.
        let (tx, rx) = bounded(1);
        let scan = base.clone();
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("cliper-recover".into())
            .spawn(move || {
                let notes = finalize_all(&scan)
                    .into_iter()
                    .filter_map(|(dir, r)| match r {
                        Ok(Finalized::Recovered(r)) => Some(r.to_string()),
                        Ok(_) => None,
                        Err(e) => Some(format!("cannot finalise {}: {e}", dir.display())),
                    })
                    .collect();
                let _ = tx.send(notes);
                ctx.request_repaint();
            });
        Self {
            recorder: None,
            finishing: None,
            base,
            first_dir: record,
            raw_video,
            message: None,
            recovered: spawned.is_ok().then_some(rx),
            recovered_notes: Vec::new(),
            open_path: String::new(),
        }
    }

    pub fn is_recording(&self) -> bool {
        self.recorder.is_some()
    }

    /// Whether `--record` asked for a recording that has not started yet.
    pub fn wants_start(&self) -> bool {
        self.first_dir.is_some() && self.recorder.is_none()
    }

    /// Feeds an event to the recording (call before the store takes it).
    pub fn observe(&mut self, event: &PipelineEvent) {
        let Some(r) = self.recorder.as_mut() else {
            return;
        };
        r.observe(event);
        if let Some(e) = r.error() {
            self.message = Some((format!("Recording stopped: {e}"), true));
            self.stop();
        }
    }

    /// Starts a recording into a new folder (or the `--record` one).
    pub fn start(
        &mut self,
        store: &Store,
        model: &ModelSpec,
        probe: &str,
        smoothing: f32,
        detector: crate::vision::faces::DetectorKind,
    ) {
        if self.recorder.is_some() {
            return;
        }
        let dir = self
            .first_dir
            .take()
            .unwrap_or_else(|| new_session_dir(&self.base));
        let mut opts = RecordOptions::new(&dir);
        opts.raw_video = self.raw_video;
        let mut analyzer = AnalyzerConfig::default().with_detector(detector);
        analyzer.detector.max_side = LIVE_DETECT_MAX_SIDE;
        let probe = probe.trim();
        opts.settings = run_settings(
            "live",
            model,
            &analyzer,
            None,
            (!probe.is_empty()).then_some(probe),
            smoothing,
        );
        match Recorder::start(opts, crate::pipeline::worker::RunMode::Live) {
            Ok(mut r) => {
                let model_info = match &store.model {
                    ModelState::Ready(info) => Some(info),
                    _ => None,
                };
                r.prime(store.source.as_ref(), model_info, store.bank.as_ref());
                self.message = None;
                self.recorder = Some(r);
            }
            Err(e) => self.message = Some((e.to_string(), true)),
        }
    }

    /// Stops recording; the files are finished on a background thread.
    pub fn stop(&mut self) {
        if let Some(r) = self.recorder.take() {
            let dir = r.dir().to_path_buf();
            self.finishing = Some(Finishing {
                dir,
                rx: r.finish_in_background(),
                since: Instant::now(),
            });
        }
    }

    /// Stops and waits until the files are finished (closing the window).
    pub fn stop_and_wait(&mut self) {
        self.stop();
        if let Some(f) = self.finishing.take() {
            let _ = f.rx.recv();
        }
    }

    /// Takes in background results (finished recordings, start-up recovery).
    pub fn poll(&mut self) {
        if let Some(rx) = &self.recovered {
            if let Ok(notes) = rx.try_recv() {
                self.recovered_notes = notes;
                self.recovered = None;
            }
        }
        let Some(f) = &self.finishing else {
            return;
        };
        let done = match f.rx.try_recv() {
            Ok(r) => r,
            Err(crossbeam_channel::TryRecvError::Empty) => return,
            Err(crossbeam_channel::TryRecvError::Disconnected) => Err(SessionError::Write {
                path: f.dir.clone(),
                reason: "the recording thread ended unexpectedly".into(),
            }),
        };
        let dir = f.dir.clone();
        let stopped_on_error = self.message.as_ref().is_some_and(|m| m.1);
        match done {
            Ok(r) => {
                if !stopped_on_error {
                    let mut text = format!(
                        "Saved {} frames ({} video frames) to {}",
                        r.frames,
                        r.video_frames,
                        dir.display()
                    );
                    for e in &r.errors {
                        text.push_str(&format!("; {e}"));
                    }
                    self.message = Some((text, !r.errors.is_empty()));
                }
            }
            Err(e) => self.message = Some((e.to_string(), true)),
        }
        self.open_path = dir.display().to_string();
        self.finishing = None;
    }

    /// Opens a session in the replay window (its own process: one window
    /// per process).
    pub fn open_session(&mut self, dir: &Path) {
        if let Err(e) = SessionMeta::read(dir) {
            self.message = Some((e.to_string(), true));
            return;
        }
        let spawned = std::env::current_exe().and_then(|exe| {
            std::process::Command::new(exe)
                .arg("replay")
                .arg(dir)
                .spawn()
        });
        if let Err(e) = spawned {
            self.message = Some((format!("cannot start the replay window: {e}"), true));
        }
    }
}

/// The Recording section of the control panel.
pub fn show(ui: &mut egui::Ui, state: &mut RecordingState, actions: &mut Vec<Action>) {
    ui.add_space(6.0);
    ui.label(RichText::new("Recording").strong());
    ui.horizontal(|ui| match &state.recorder {
        Some(r) => {
            if ui.button("Stop").clicked() {
                actions.push(Action::ToggleRecording);
            }
            let s = r.status();
            // A blinking red dot, drawn (the UI font has no such glyph).
            let (dot, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
            if (s.elapsed.as_millis() / 500) % 2 == 0 {
                ui.painter().circle_filled(dot.center(), 5.0, REC_RED);
            }
            ui.label(RichText::new("REC").color(REC_RED).strong());
            ui.label(RichText::new(format_elapsed(s.elapsed)).monospace());
            ui.ctx().request_repaint_after(Duration::from_millis(250));
        }
        None => {
            let busy = state.finishing.is_some();
            let b = ui.add_enabled(!busy, egui::Button::new("Record"));
            if b.clicked() {
                actions.push(Action::ToggleRecording);
            }
            if let Some(f) = &state.finishing {
                ui.spinner();
                ui.label(format!("saving… {:.0} s", f.since.elapsed().as_secs_f32()));
            }
        }
    });
    if let Some(r) = &state.recorder {
        let s = r.status();
        let mut line = format!("{} frames into {}", s.frames, r.dir().display());
        if s.video_dropped > 0 {
            line.push_str(&format!(" ({} video frames dropped)", s.video_dropped));
        }
        ui.label(RichText::new(line).small());
    } else if state.recorder.is_none() && state.finishing.is_none() {
        ui.label(
            RichText::new(format!("into {}", state.base.display()))
                .small()
                .weak(),
        );
    }
    if let Some((text, is_error)) = &state.message {
        let color = if *is_error {
            Color32::LIGHT_RED
        } else {
            Color32::from_gray(200)
        };
        ui.label(RichText::new(text).color(color).small());
    }
    for n in &state.recovered_notes {
        ui.label(RichText::new(n).small().weak());
    }
    let field = ("session folder", "Open Session", 110.0);
    if let Some(path) = super::controls::path_entry(ui, &mut state.open_path, field) {
        actions.push(Action::OpenSession(PathBuf::from(path)));
    }
}
