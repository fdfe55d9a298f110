//! The app: owns the pipeline, the store and the settings; lays out the
//! panels and applies their actions.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use eframe::egui;

mod actions;

use super::controls::ControlsState;
use super::exit::{ExitPlan, Outcome};
use super::first_run::FirstRun;
use super::recording::{self, RecordingState};
use super::settings::{BankChoice, Settings, STORAGE_KEY};
use super::status::UiStats;
use super::store::{ExactKey, ExactMaps, Store};
use super::video::VideoView;
use super::{controls, descriptors, first_run, scores, status, video};
use super::{Action, LiveOptions, SessionReport};
use crate::model::setup::{self, BankSource, ModelSpec};
use crate::model::weights;
use crate::pipeline::worker::{DynamicSettings, PipelineEvent};
use crate::pipeline::worker::{ExactRequest, Pipeline, PipelineCommand, PipelineConfig, RunMode};
use crate::vision::source::camera::{self, CameraEntry};
use crate::vision::source::SourceSpec;

/// How long the wanted exact map must stay the same before it is computed.
const EXACT_SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

enum Screen {
    /// No weights yet: the download screen.
    FirstRun,
    Live,
}

pub struct CliperApp {
    /// Shortest time between two frames of the window: 10 ms, or 66 ms on
    /// an OpenGL that rasterises on the CPU (see [`super::software_renderer`]).
    frame_interval: std::time::Duration,
    opts: LiveOptions,
    settings: Settings,
    screen: Screen,
    pipeline: Option<Pipeline>,
    store: Store,
    source: SourceSpec,
    cameras: Vec<CameraEntry>,
    /// A camera scan running on a thread (asking drivers can take a while).
    camera_scan: Option<crossbeam_channel::Receiver<Vec<CameraEntry>>>,
    /// A message shown above the video (e.g. no camera found).
    notice: Option<String>,
    video: VideoView,
    controls: ControlsState,
    first_run: FirstRun,
    exit: ExitPlan,
    recording: RecordingState,
    ui_stats: UiStats,
    outcome: Arc<Mutex<Outcome>>,
    /// The dynamic window settings last sent to the pipeline.
    dynamic_sent: Option<DynamicSettings>,
    /// The smoothing factor the pipeline has.
    smoothing_sent: Option<f32>,
    /// The id of the last exact-map request.
    exact_requests: u64,
    /// The exact maps wanted and since when: a request goes out once the
    /// wish has held still for [`EXACT_SETTLE`] (dragging the grid slider
    /// or clicking through descriptors starts no job per frame).
    exact_wish: Option<(ExactKey, std::time::Instant)>,
    /// `--pause-after` has paused the window once.
    auto_paused: bool,
    /// A bank asked for and still loading: saved as the choice only once
    /// it has loaded, so a file that fails is never the next start's default.
    pending_bank: Option<BankChoice>,
}

/// The delay counts from the end of ui(), before rendering: 10 ms leaves
/// room for a few ms of rendering within a 60 Hz frame, vsync paces it on a
/// real display, and a display without vsync (Xvfb) is not spun at 100% CPU.
const FRAME_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// On a CPU rasteriser each frame of the window costs CPU time the model
/// needs. Measured on the 2-core EPYC under Xvfb (llvmpipe), demo source,
/// q8: see the README's live figures.
const SOFTWARE_FRAME_INTERVAL: std::time::Duration = std::time::Duration::from_millis(66);

impl CliperApp {
    pub fn new(
        cc: &eframe::CreationContext<'_>,
        opts: LiveOptions,
        outcome: Arc<Mutex<Outcome>>,
    ) -> Self {
        let settings: Settings = cc
            .storage
            .and_then(|s| eframe::get_value(s, STORAGE_KEY))
            .unwrap_or_default();
        let mut settings = settings.sanitized();
        if let Some(kind) = opts.detector {
            settings.detector = kind;
        }
        if opts.dynamic {
            settings.dynamic = true;
        }
        configure_style(&cc.egui_ctx);
        let cameras = camera::list_cameras().unwrap_or_default();
        let mut notice = None;
        let source = match &opts.source {
            Some(s) => s.clone(),
            None => initial_source(&settings, &cameras, &mut notice),
        };
        if let Some(SourceSpec::Camera { resolution, .. }) = &opts.source {
            if resolution.is_some() {
                settings.camera_resolution = *resolution;
            }
        }
        let controls = ControlsState::new(&settings, &source);
        let frame_interval = match cc.gl.as_deref().and_then(super::software_renderer) {
            Some(name) => {
                log::info!(
                    "OpenGL renders on the CPU ({name}): the window redraws at most {} times a second, to leave the cores to the model",
                    (1.0 / SOFTWARE_FRAME_INTERVAL.as_secs_f64()).round()
                );
                SOFTWARE_FRAME_INTERVAL
            }
            None => FRAME_INTERVAL,
        };
        let mut app = Self {
            frame_interval,
            exit: ExitPlan::new(opts.exit_after, opts.screenshot.clone()),
            store: Store::new(source.clone()),
            screen: Screen::FirstRun,
            pipeline: None,
            source,
            cameras,
            camera_scan: None,
            notice,
            video: VideoView::default(),
            controls,
            first_run: FirstRun::default(),
            ui_stats: UiStats::default(),
            settings,
            recording: RecordingState::new(opts.record.clone(), opts.record_raw, &cc.egui_ctx),
            opts,
            outcome,
            dynamic_sent: None,
            smoothing_sent: None,
            exact_requests: 0,
            exact_wish: None,
            auto_paused: false,
            pending_bank: None,
        };
        app.store.map_method = app.opts.map;
        if app.opts.grid > 0 {
            app.store.occlusion_grid = app.opts.grid;
        }
        // A DFER-CLIP model brings its own CLIP: nothing to download.
        let own_clip = matches!(&app.model_spec().bank,
            BankSource::Learned(p) if crate::model::dfer_clip::has_own_clip(p));
        match weights::locate(app.opts.model.weights.as_deref()) {
            _ if own_clip => app.start(&cc.egui_ctx),
            Ok(_) => app.start(&cc.egui_ctx),
            Err(e) => app.first_run.missing = Some(e.to_string()),
        }
        app
    }

    /// The model spec: weights and device from the command line, bank from
    /// the command line or the saved choice.
    fn model_spec(&mut self) -> ModelSpec {
        let mut spec = self.opts.model.clone();
        if !self.opts.bank_given {
            spec.bank = match &self.settings.bank {
                BankChoice::ZeroShot => BankSource::BuiltinZeroShot,
                BankChoice::File(p) if Path::new(p).is_file() => bank_source(Path::new(p)),
                BankChoice::File(p) => {
                    self.store.bank_error = Some(format!(
                        "descriptors file {p} is gone; using the built-in zero-shot descriptions"
                    ));
                    self.settings.bank = BankChoice::ZeroShot;
                    BankSource::BuiltinZeroShot
                }
            };
        } else {
            // Show (and remember) the bank given on the command line.
            self.settings.bank = match &spec.bank {
                BankSource::BuiltinZeroShot => BankChoice::ZeroShot,
                BankSource::Prompts(p) | BankSource::Learned(p) => {
                    BankChoice::File(p.display().to_string())
                }
            };
        }
        spec
    }

    fn dynamic_settings(&self) -> DynamicSettings {
        DynamicSettings {
            window: self.settings.dynamic_window,
            stride: self.settings.dynamic_stride,
        }
    }

    /// Sends changed dynamic window and smoothing settings to the pipeline.
    fn sync_dynamic(&mut self) {
        let Some(p) = &self.pipeline else {
            return;
        };
        let want = self.dynamic_settings();
        if self.dynamic_sent != Some(want) {
            p.command(PipelineCommand::SetDynamic(want));
            self.dynamic_sent = Some(want);
        }
        let smoothing = self.settings.smoothing;
        if self.smoothing_sent != Some(smoothing) {
            p.command(PipelineCommand::SetSmoothing(smoothing));
            self.smoothing_sent = Some(smoothing);
        }
    }

    /// Asks the pipeline for the exact maps the window wants (the paused
    /// frame, the chosen target and method) unless they were asked for
    /// already; stops a job nobody wants any more.
    fn sync_exact(&mut self) {
        let Some(p) = &self.pipeline else {
            return;
        };
        let Some(key) = self.store.wanted_exact() else {
            if self.store.exact.iter().any(|e| !e.finished) {
                p.command(PipelineCommand::Exact(None));
                self.store.exact.retain(|e| e.finished);
            }
            return;
        };
        if self.store.exact.iter().any(|e| e.key() == key) {
            return;
        }
        match self.exact_wish {
            Some((k, since)) if k == key => {
                if since.elapsed() < EXACT_SETTLE {
                    return;
                }
            }
            _ => {
                self.exact_wish = Some((key, std::time::Instant::now()));
                return;
            }
        }
        let Some(frame) = self.store.paused.as_ref().map(|p| p.frame.clone()) else {
            return;
        };
        // The job running now (if any) is superseded: the worker stops it.
        self.store.exact.retain(|e| e.finished);
        self.exact_requests += 1;
        let (_, target, method, grid) = key;
        p.command(PipelineCommand::Exact(Some(ExactRequest {
            id: self.exact_requests,
            frame,
            target,
            method,
            grid: grid.max(1),
        })));
        self.store
            .exact
            .push(ExactMaps::pending(self.exact_requests, key));
    }

    fn set_paused(&mut self, paused: bool) {
        if paused {
            if self.store.pause() {
                if let Some(p) = &self.pipeline {
                    p.command(PipelineCommand::SetPaused(true));
                }
            }
        } else if self.store.paused.is_some() {
            self.store.resume();
            if let Some(p) = &self.pipeline {
                p.command(PipelineCommand::Exact(None));
                p.command(PipelineCommand::SetPaused(false));
            }
        }
    }

    /// Starts the pipeline (model loading happens on its thread).
    fn start(&mut self, ctx: &egui::Context) {
        let mut config = PipelineConfig::new(self.source.clone(), self.model_spec(), RunMode::Live);
        config.analyzer = config.analyzer.with_detector(self.settings.detector);
        config.analyzer.detector_model = self.opts.detector_model.clone();
        let probe = self.settings.probe.trim();
        config.probe = (!probe.is_empty()).then(|| probe.to_string());
        config.dynamic = self.dynamic_settings();
        self.store.explain = self.opts.explain;
        self.dynamic_sent = Some(config.dynamic);
        config.smoothing = self.settings.smoothing;
        self.smoothing_sent = Some(config.smoothing);
        let ctx = ctx.clone();
        config.explain = self.store.explain;
        let interval = self.frame_interval;
        self.pipeline = Some(Pipeline::start(config, move || {
            ctx.request_repaint_after(interval)
        }));
        self.screen = Screen::Live;
        if self.recording.wants_start() {
            self.toggle_recording();
        }
    }

    fn toggle_recording(&mut self) {
        if self.recording.is_recording() {
            self.recording.stop();
        } else {
            let s = &self.settings;
            (self.recording).start(
                &self.store,
                &self.opts.model,
                &s.probe,
                s.smoothing,
                s.detector,
            );
        }
    }

    fn drain_events(&mut self) {
        if let Some(rx) = &self.camera_scan {
            match rx.try_recv() {
                Ok(cameras) => {
                    self.cameras = cameras;
                    self.camera_scan = None;
                }
                Err(crossbeam_channel::TryRecvError::Disconnected) => self.camera_scan = None,
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
        }
        let Some(p) = &self.pipeline else {
            return;
        };
        let keep = f64::from(self.settings.timeline_secs) + 1.0;
        while let Ok(ev) = p.events.try_recv() {
            match &ev {
                PipelineEvent::BankReady(_) => {
                    if let Some(choice) = self.pending_bank.take() {
                        self.settings.bank = choice;
                    }
                }
                // The bank asked for failed: the one before stays the choice.
                // At start-up the pipeline fell back to the zero-shot bank,
                // and so does the saved choice.
                PipelineEvent::BankFailed(_) if self.pending_bank.take().is_none() => {
                    self.settings.bank = BankChoice::ZeroShot;
                }
                _ => {}
            }
            self.recording.observe(&ev);
            self.store.apply(ev, keep);
        }
        self.recording.poll();
        self.store.prune(keep);
    }

    fn report(&self) -> SessionReport {
        let t = &self.store.timings;
        SessionReport {
            ui_fps: self.ui_stats.fps(),
            ui_ms: self.ui_stats.mean_ui_ms(),
            capture_fps: t.capture_fps,
            inference_fps: t.inference_fps,
            capture_to_screen_ms: self.store.capture_to_screen.median(),
            score_lag_ms: self.store.score_lag.median(),
            decode_ms: t.decode_ms,
            detect_ms: self.store.detect_ms.median().unwrap_or(t.detect_ms),
            detected_share: self.store.detected_share(),
            crop_ms: self.store.crop_ms.median().unwrap_or(t.crop_ms),
            encode_ms: self.store.encode_ms.median().unwrap_or(t.encode_ms),
            score_ms: t.score_ms,
            frames_shown: self.store.frames_seen,
            scores: self.store.scores_seen,
            exact_map: self
                .store
                .current_exact()
                .filter(|e| e.finished && e.error.is_none())
                .map(|e| (e.method.as_str(), e.maps.len(), e.secs.unwrap_or(0.0))),
        }
    }

    fn live_ui(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        egui::Panel::bottom("status")
            .frame(
                egui::Frame::side_top_panel(ui.style())
                    .inner_margin(egui::Margin::symmetric(10, 4)),
            )
            .show(ui, |ui| status::show(ui, &self.store, &self.ui_stats));
        egui::Panel::left("controls")
            .default_size(300.0)
            .size_range(250.0..=420.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| {
                    controls::show(
                        ui,
                        &mut self.controls,
                        &mut self.settings,
                        &self.store,
                        &self.source,
                        &self.cameras,
                        actions,
                    );
                    recording::show(ui, &mut self.recording, actions);
                });
            });
        egui::Panel::right("descriptors")
            .default_size(380.0)
            .size_range(300.0..=560.0)
            .show(ui, |ui| {
                descriptors::show(ui, &mut self.store, self.settings.top_descriptors, actions)
            });
        egui::CentralPanel::default().show(ui, |ui| {
            let plots_h = (ui.available_height() * 0.36).clamp(190.0, 300.0);
            let video_h = ui.available_height() - plots_h - ui.spacing().item_spacing.y;
            ui.allocate_ui(egui::vec2(ui.available_width(), video_h), |ui| {
                video::show(
                    ui,
                    &mut self.video,
                    &mut self.store,
                    self.notice.as_deref(),
                    &self.source,
                    self.settings.show_landmarks,
                    // The margin the pipeline crops with (the live app uses
                    // the detector's default).
                    self.settings.detector.default_margin(),
                    actions,
                );
            });
            scores::show(
                ui,
                &self.store,
                scores::Span::Recent(self.settings.timeline_secs),
                plots_h,
                self.settings.dynamic,
            );
        });
    }
}

impl eframe::App for CliperApp {
    /// The dark theme's panel colour: the panels themselves are
    /// transparent (see `configure_style`).
    fn clear_color(&self, _visuals: &egui::Visuals) -> [f32; 4] {
        egui::Visuals::dark().panel_fill.to_normalized_gamma_f32()
    }

    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        // Also runs while the window is hidden, so events never pile up.
        self.drain_events();
        let _ = super::APP_CONTEXT.set(ctx.clone());
        if super::STOP_REQUESTED.load(std::sync::atomic::Ordering::SeqCst) {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let ctx = ui.ctx().clone();
        self.ui_stats.begin();
        self.store.dynamic_view = self.settings.dynamic;
        let mut actions = Vec::new();
        self.handle_dropped_files(&ctx, &mut actions);
        if matches!(self.screen, Screen::Live)
            && !ctx.egui_wants_keyboard_input()
            && ctx.input(|i| i.key_pressed(egui::Key::Space))
        {
            actions.push(Action::SetPaused(self.store.paused.is_none()));
        }
        if let Some(t) = self.opts.pause_after {
            if !self.auto_paused && self.store.now() >= t && self.store.scores_seen > 0 {
                self.auto_paused = true;
                actions.push(Action::SetPaused(true));
            }
        }
        match self.screen {
            Screen::FirstRun => first_run::show(ui, &mut self.first_run, &mut actions),
            Screen::Live => self.live_ui(ui, &mut actions),
        }
        if let Some(path) = self.first_run.poll() {
            // Use what was downloaded, even if --weights pointed elsewhere.
            self.opts.model.weights = Some(path);
            actions.push(Action::RecheckWeights);
        }
        for a in actions {
            self.apply(a, &ctx);
        }
        self.sync_dynamic();
        self.sync_exact();
        if let Some(e) = self.exit.tick(&ctx) {
            if let Ok(mut o) = self.outcome.lock() {
                o.screenshot_error = Some(e);
            }
        }
        if self.exit.closing() {
            if let Ok(mut o) = self.outcome.lock() {
                o.report = Some(self.report());
            }
        }
        self.ui_stats.end();
        // The timeline scrolls continuously.
        if matches!(self.screen, Screen::Live) {
            ctx.request_repaint_after(self.frame_interval);
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, STORAGE_KEY, &self.settings);
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        // Finish the recording's files (the last frames of video.mp4) before the
        // process ends.
        self.recording.stop_and_wait();
    }
}

/// A checkpoint (learned descriptors) or a prompts file (zero-shot).
fn bank_source(p: &Path) -> BankSource {
    if setup::is_prompts_file(p) {
        BankSource::Prompts(p.to_path_buf())
    } else {
        BankSource::Learned(p.to_path_buf())
    }
}

/// The source to start with when none was given: the saved one if still
/// there, else the first camera, else the demo (saying so).
fn initial_source(
    settings: &Settings,
    cameras: &[CameraEntry],
    notice: &mut Option<String>,
) -> SourceSpec {
    if let Some(saved) = &settings.source {
        if let Ok(spec) = SourceSpec::parse(saved, None) {
            match &spec {
                SourceSpec::Camera { index, .. } if cameras.iter().any(|c| c.index == *index) => {
                    return SourceSpec::Camera {
                        index: *index,
                        resolution: settings.camera_resolution,
                    }
                }
                SourceSpec::Camera { .. } => {}
                other => return other.clone(),
            }
        }
    }
    match cameras.first() {
        Some(c) => SourceSpec::Camera {
            index: c.index,
            resolution: settings.camera_resolution,
        },
        None => {
            *notice = Some(
                "No camera found: showing the built-in demo. Connect a camera and pick it under Source, or open a video, an image or a folder."
                    .to_string(),
            );
            SourceSpec::Demo
        }
    }
}

fn configure_style(ctx: &egui::Context) {
    ctx.set_theme(egui::ThemePreference::Dark);
    ctx.all_styles_mut(|style| {
        style.spacing.item_spacing = egui::vec2(8.0, 6.0);
        style.spacing.button_padding = egui::vec2(8.0, 3.0);
        // The panels' colour comes from clearing the window instead
        // ([`eframe::App::clear_color`]): a software OpenGL fills every
        // pixel of a panel's rectangle again, a whole window's worth each
        // frame (llvmpipe 24-26% -> 18% of a core, 1280x800 under Xvfb).
        style.visuals.panel_fill = egui::Color32::TRANSPARENT;
    });
}
