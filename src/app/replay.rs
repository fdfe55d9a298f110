//! `cliper replay DIR` (and the live window's Open Session): a recorded
//! session's annotated video with a scrubber, its faces, and their class
//! timelines. Reads the session folder only; no model is loaded.
//!
//! The records fold into the live window's [`Store`] (the scrubber's time is
//! its clock), and the live window's score panel draws it.
//!
//! The video is decoded on a background thread (a seek decodes from the key
//! frame before it, at most 2 s of video); the UI only asks for the
//! frame at the scrubber's time and shows the newest one that came back.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{unbounded, Receiver, Sender};
use eframe::egui::{self, Color32, RichText, TextureHandle, TextureOptions};
use image::RgbImage;

use super::exit::{check_writable, ExitPlan, Outcome};
use super::palette::class_color;
use super::scores::{self, Span};
use super::store::Store;
use crate::model::cliper::expressions::BankLayout;
use crate::session::report::{summarize, Report};
use crate::session::timeline::Timelines;
use crate::session::{Session, SessionError};
use crate::vision::video::IndexedVideo;

#[derive(Clone, Debug, Default)]
pub struct ReplayOptions {
    /// The session folder.
    pub dir: PathBuf,
    /// Close the window after this many seconds (tests, demos).
    pub exit_after: Option<f64>,
    /// Save a PNG of the window just before closing (with `exit_after`).
    pub screenshot: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("cannot open the window: {0}. A display is needed (on Linux, DISPLAY or WAYLAND_DISPLAY with OpenGL); without one, use `cliper report DIR`")]
    Window(String),
    #[error(transparent)]
    Screenshot(#[from] super::exit::ScreenshotError),
    #[error("--exit-after {0} is out of range: give a number of seconds above 0")]
    ExitAfter(f64),
}

/// Opens the replay window and runs until it is closed.
pub fn run_replay(opts: ReplayOptions) -> Result<(), ReplayError> {
    if let Some(s) = opts.exit_after {
        if !(s.is_finite() && s > 0.0) {
            return Err(ReplayError::ExitAfter(s));
        }
    }
    if let Some(p) = &opts.screenshot {
        check_writable(p).map_err(ReplayError::Screenshot)?;
    }
    let session = Session::open(&opts.dir)?;
    // A damaged video must not hide the timelines: replay what is there.
    let video = session.open_video().inspect_err(|e| {
        log::warn!("{e}; replaying the timelines without the video");
    });
    let outcome: Arc<Mutex<Outcome>> = Arc::default();
    let native = eframe::NativeOptions {
        renderer: eframe::Renderer::Glow,
        viewport: egui::ViewportBuilder::default()
            .with_title(format!("cliper replay: {}", opts.dir.display()))
            .with_app_id("cliper-replay")
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([900.0, 600.0]),
        dithering: super::DITHERING,
        ..Default::default()
    };
    let shared = outcome.clone();
    super::keep_freed_heap();
    eframe::run_native(
        "cliper-replay",
        native,
        Box::new(move |cc| {
            cc.egui_ctx.set_theme(egui::ThemePreference::Dark);
            Ok(Box::new(ReplayApp::new(
                &cc.egui_ctx,
                session,
                video,
                opts,
                shared,
            )))
        }),
    )
    .map_err(|e| ReplayError::Window(e.to_string().trim_end_matches('.').to_string()))?;
    let outcome = outcome.lock().map(|o| o.clone()).unwrap_or_default();
    match outcome.screenshot_error {
        Some(e) => Err(ReplayError::Screenshot(e)),
        None => Ok(()),
    }
}

/// The decoding thread's mailbox.
struct Decoder {
    requests: Sender<usize>,
    frames: Receiver<(usize, Result<RgbImage, crate::vision::video::VideoError>)>,
}

fn spawn_decoder(mut reader: IndexedVideo, ctx: egui::Context) -> Option<Decoder> {
    let (req_tx, req_rx) = unbounded::<usize>();
    let (out_tx, out_rx) = unbounded();
    std::thread::Builder::new()
        .name("cliper-replay-decode".into())
        .spawn(move || {
            while let Ok(mut k) = req_rx.recv() {
                // Only the newest request matters (the scrubber moved on).
                while let Ok(n) = req_rx.try_recv() {
                    k = n;
                }
                let r = reader.frame(k);
                if out_tx.send((k, r)).is_err() {
                    return;
                }
                ctx.request_repaint();
            }
        })
        .ok()?;
    Some(Decoder {
        requests: req_tx,
        frames: out_rx,
    })
}

struct ReplayApp {
    session: Session,
    report: Report,
    /// What the panels draw: the session's curves and the faces of the
    /// record at the scrubber.
    store: Store,
    /// The class layout of each bank, from the session time it was used.
    layouts: Vec<(f64, Arc<BankLayout>)>,
    /// The record whose faces the store holds (`Some(None)`: before the
    /// first record; `None`: not synced yet).
    store_record: Option<Option<usize>>,
    /// Whether any record has dynamic scores (offers the dynamic view).
    has_dynamic: bool,
    dynamic: bool,
    /// Video time of each frame.
    video_times: Vec<f64>,
    video_start_t: f64,
    decoder: Option<Decoder>,
    video_error: Option<String>,
    texture: Option<TextureHandle>,
    requested: Option<usize>,
    /// The scrubber's session time.
    t: f64,
    playing: bool,
    speed: f64,
    last_tick: Option<Instant>,
    exit: ExitPlan,
    outcome: Arc<Mutex<Outcome>>,
}

impl ReplayApp {
    fn new(
        ctx: &egui::Context,
        session: Session,
        video: Result<Option<IndexedVideo>, crate::session::SessionError>,
        opts: ReplayOptions,
        outcome: Arc<Mutex<Outcome>>,
    ) -> Self {
        let report = summarize(&session);
        let timelines = Timelines::from_records(&session.frames, &report.classes);
        let (video, unreadable) = match video {
            Ok(v) => (v, None),
            Err(e) => (None, Some(e)),
        };
        let video_times = video
            .as_ref()
            .map(|v| (0..v.len()).filter_map(|k| v.time(k)).collect())
            .unwrap_or_default();
        let video_error = match (&video, unreadable) {
            (_, Some(e)) => Some(format!(
                "The video cannot be read ({e}); the timelines below are complete."
            )),
            (None, None) => {
                Some("This session has no video (recorded without it, or it was lost).".into())
            }
            (Some(_), None) => None,
        };
        let decoder = video.and_then(|v| spawn_decoder(v, ctx.clone()));
        let mut store = Store::replay(timelines, session.frames.len() as u64);
        store.selected = report.faces.first().map(|f| f.id);
        let has_dynamic =
            (session.frames.iter()).any(|f| f.faces.iter().any(|x| x.dynamic.is_some()));
        Self {
            layouts: session.layouts(),
            store_record: None,
            has_dynamic,
            dynamic: false,
            video_start_t: session.video_start_t(),
            t: session.frames.first().map_or(0.0, |f| f.t),
            session,
            report,
            store,
            video_times,
            decoder,
            video_error,
            texture: None,
            requested: None,
            playing: false,
            speed: 1.0,
            last_tick: None,
            exit: ExitPlan::new(opts.exit_after, opts.screenshot),
            outcome,
        }
    }

    fn duration(&self) -> f64 {
        self.session
            .duration()
            .max(self.video_start_t + self.video_times.last().copied().unwrap_or(0.0))
    }

    /// Advances playback, asks for the frame at `t`, takes in decoded frames.
    fn tick(&mut self, ctx: &egui::Context) {
        let now = Instant::now();
        if self.playing {
            if let Some(last) = self.last_tick {
                self.t += now.duration_since(last).as_secs_f64() * self.speed;
            }
            if self.t >= self.duration() {
                self.t = self.duration();
                self.playing = false;
            }
            ctx.request_repaint();
        }
        self.last_tick = self.playing.then_some(now);
        let Some(d) = &self.decoder else {
            return;
        };
        while let Ok((_, r)) = d.frames.try_recv() {
            match r {
                Ok(img) => {
                    let (w, h) = img.dimensions();
                    let ci = egui::ColorImage::from_rgb([w as usize, h as usize], img.as_raw());
                    match &mut self.texture {
                        Some(t) => t.set(ci, TextureOptions::LINEAR),
                        None => {
                            self.texture =
                                Some(ctx.load_texture("replay-video", ci, TextureOptions::LINEAR))
                        }
                    }
                    self.video_error = None;
                }
                Err(e) => self.video_error = Some(e.to_string()),
            }
        }
        let vt = self.t - self.video_start_t;
        let k = self.video_times.partition_point(|&x| x <= vt + 1e-6);
        let k = k.saturating_sub(1);
        if !self.video_times.is_empty() && self.requested != Some(k) {
            let _ = d.requests.send(k);
            self.requested = Some(k);
        }
    }

    /// The store to the scrubber: its clock, and (when the scrubber moved
    /// to another record) the faces of the record at that time, in the
    /// layout of the bank then in use.
    fn sync_store(&mut self) {
        self.store.dynamic_view = self.dynamic;
        let index = self.session.index_at(self.t);
        if self.store_record == Some(index) {
            self.store.set_time(self.t);
            return;
        }
        self.store_record = Some(index);
        let record = index.map(|i| &self.session.frames[i]);
        let at = record.map_or(self.t, |r| r.t);
        let k = self.layouts.partition_point(|(from, _)| *from <= at + 1e-9);
        let layout = &self.layouts[k.saturating_sub(1)].1;
        self.store.seek(self.t, record, layout);
    }

    fn keys(&mut self, ctx: &egui::Context) {
        let (space, left, right) = ctx.input(|i| {
            (
                i.key_pressed(egui::Key::Space),
                i.key_pressed(egui::Key::ArrowLeft),
                i.key_pressed(egui::Key::ArrowRight),
            )
        });
        if space {
            self.toggle_play();
        }
        let i = self.session.index_at(self.t).unwrap_or(0);
        if left && i > 0 {
            self.playing = false;
            self.t = self.session.frames[i - 1].t;
        }
        if right && i + 1 < self.session.frames.len() {
            self.playing = false;
            self.t = self.session.frames[i + 1].t;
        }
    }

    fn toggle_play(&mut self) {
        if !self.playing && self.t >= self.duration() - 1e-6 {
            self.t = 0.0;
        }
        self.playing = !self.playing;
    }

    fn header(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            let label = if self.playing { "Pause" } else { "Play" };
            if ui.button(label).clicked() {
                self.toggle_play();
            }
            if ui.button("Start").clicked() {
                self.t = 0.0;
            }
            egui::ComboBox::from_id_salt("speed")
                .width(70.0)
                .selected_text(format!("{}x", self.speed))
                .show_ui(ui, |ui| {
                    for s in [0.25, 0.5, 1.0, 2.0, 4.0] {
                        ui.selectable_value(&mut self.speed, s, format!("{s}x"));
                    }
                });
            if self.has_dynamic {
                ui.checkbox(&mut self.dynamic, "Dynamic")
                    .on_hover_text("Show the dynamic branch's recorded scores");
            }
            ui.separator();
            let m = &self.session.meta;
            ui.label(RichText::new(self.session.dir.display().to_string()).strong());
            ui.label(
                RichText::new(format!(
                    "{} · started {} · {} frames · {:.1} s",
                    m.status.as_str(),
                    m.started,
                    self.session.frames.len(),
                    self.session.duration()
                ))
                .weak(),
            );
        });
    }

    fn scrubber(&mut self, ui: &mut egui::Ui) {
        let dur = self.duration().max(1e-3);
        ui.horizontal(|ui| {
            ui.label(RichText::new(format!("{:>7.2} s", self.t)).monospace());
            ui.spacing_mut().slider_width = (ui.available_width() - 90.0).max(100.0);
            let r = ui.add(
                egui::Slider::new(&mut self.t, 0.0..=dur)
                    .show_value(false)
                    .smart_aim(false),
            );
            if r.dragged() || r.changed() {
                self.playing = false;
            }
            ui.label(RichText::new(format!("{dur:.2} s")).monospace());
        });
    }

    fn faces_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("Faces");
        if self.report.faces.is_empty() {
            ui.label(RichText::new("No face was recorded.").weak());
        }
        for f in &self.report.faces {
            let d = f.dominant();
            let text = RichText::new(format!(
                "#{}  {} {:.0}%  ·  {} frames, {:.1} s",
                f.id,
                self.report.class(d),
                f.dominant_share[d] * 100.0,
                f.frames,
                f.seconds
            ))
            .color(class_color(self.report.class(d)));
            if ui
                .selectable_label(self.store.selected == Some(f.id), text)
                .clicked()
            {
                self.store.selected = Some(f.id);
            }
        }
        ui.separator();
        let Some(id) = self.store.selected else {
            return;
        };
        let record = self.session.index_at(self.t).and_then(|i| {
            let fr = &self.session.frames[i];
            fr.faces.iter().find(|x| x.id == id).map(|x| (fr, x))
        });
        let Some((frame, face)) = record else {
            ui.label(RichText::new(format!("Face #{id} is not in this frame.")).weak());
            return;
        };
        let classes = &self.report.classes;
        let probs = face.probs(classes);
        ui.label(
            RichText::new(format!(
                "Face #{id} at {:.2} s (frame {}), as computed:",
                frame.t, frame.frame
            ))
            .strong(),
        );
        ui.horizontal_wrapped(|ui| {
            for (c, n) in classes.iter().enumerate() {
                ui.label(
                    RichText::new(format!("{n} {:.0}%", probs[c] * 100.0))
                        .color(class_color(n))
                        .small(),
                );
            }
        });
        if let Some(s) = &face.smoothed {
            ui.label(
                RichText::new(format!("shown (smoothed): {}", s.predicted))
                    .small()
                    .weak(),
            );
        }
        if let Some(d) = &face.dynamic {
            ui.label(RichText::new(format!("dynamic: {}", d.predicted)).small());
        }
        if !face.descriptors.is_empty() {
            ui.add_space(4.0);
            ui.label(RichText::new("Top descriptors").strong());
            for d in &face.descriptors {
                ui.label(
                    RichText::new(format!("{:>6.2}  {}", d.logit, d.text))
                        .color(class_color(&d.class))
                        .small(),
                );
            }
        }
        if let Some(p) = &face.probe {
            ui.label(RichText::new(format!("probe \"{}\": {:.2}", p.text, p.logit)).small());
        }
    }

    fn video(&self, ui: &mut egui::Ui, height: f32) {
        let (rect, _) = ui.allocate_exact_size(
            egui::vec2(ui.available_width(), height),
            egui::Sense::hover(),
        );
        let painter = ui.painter_at(rect);
        super::video::paint_fitted(&painter, self.texture.as_ref(), rect);
        if let Some(e) = &self.video_error {
            painter.text(
                rect.center(),
                egui::Align2::CENTER_CENTER,
                e,
                egui::FontId::proportional(15.0),
                Color32::from_gray(220),
            );
        }
    }

    /// The live window's score panel: the selected face's bars (what the
    /// window showed) and its curves over the whole session; a click seeks.
    fn scores(&mut self, ui: &mut egui::Ui, height: f32) {
        let duration = self.duration().max(1e-3);
        let span = Span::Whole { duration };
        if let Some(x) = scores::show(ui, &self.store, span, height, self.dynamic) {
            self.t = x.clamp(0.0, duration);
            self.playing = false;
        }
    }
}

impl eframe::App for ReplayApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let ctx = ui.ctx().clone();
        self.keys(&ctx);
        self.tick(&ctx);
        self.sync_store();
        egui::Panel::top("replay-header").show(ui, |ui| self.header(ui));
        egui::Panel::bottom("replay-scrubber")
            .frame(
                egui::Frame::side_top_panel(ui.style())
                    .inner_margin(egui::Margin::symmetric(10, 6)),
            )
            .show(ui, |ui| self.scrubber(ui));
        egui::Panel::left("replay-faces")
            .default_size(330.0)
            .size_range(260.0..=480.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.faces_panel(ui));
            });
        egui::CentralPanel::default().show(ui, |ui| {
            let plot_h = (ui.available_height() * 0.36).clamp(190.0, 300.0);
            let video_h = ui.available_height() - plot_h - ui.spacing().item_spacing.y;
            self.video(ui, video_h);
            self.scores(ui, plot_h);
        });
        if let Some(e) = self.exit.tick(&ctx) {
            if let Ok(mut o) = self.outcome.lock() {
                o.screenshot_error = Some(e);
            }
        }
    }
}
