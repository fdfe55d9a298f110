//! The control panel: source (demo, cameras, files), faces, display
//! settings, static/dynamic mode, descriptor bank, and the free-text probe
//! with its live similarity next to the classes.

use std::time::{Duration, Instant};

use eframe::egui::{self, Color32, RichText};

use super::palette::{class_color, PROBE_COLOR};
use super::settings::{BankChoice, Settings};
use super::store::{SourceState, Store};
use super::Action;
use crate::pipeline::smoothing::MAX_SMOOTHING;
use crate::vision::source::camera::{CameraEntry, COMMON_RESOLUTIONS, DEFAULT_RESOLUTION};
use crate::vision::source::SourceSpec;

/// Typing pauses this long before the probe is encoded.
const PROBE_DEBOUNCE: Duration = Duration::from_millis(350);

/// Text fields and other UI-only state of the panel.
pub struct ControlsState {
    path: String,
    path_error: Option<String>,
    bank_path: String,
    probe: String,
    probe_edited: Option<Instant>,
    /// Installed named models (`cliper weights fetch NAME`) that work as a
    /// bank: (name, path, what it is). Read once, not every frame.
    installed: Vec<(String, String, String)>,
}

fn installed_models() -> Vec<(String, String, String)> {
    crate::model::zoo::CATALOGUE
        .iter()
        .filter(|e| e.kind == crate::model::zoo::ZooKind::DferClip && e.installed())
        .map(|e| {
            (
                e.name.to_string(),
                e.path().display().to_string(),
                format!("{}, classes {}, {}", e.project, e.classes, e.accuracy),
            )
        })
        .collect()
}

impl ControlsState {
    pub fn new(settings: &Settings, source: &SourceSpec) -> Self {
        let path = match source {
            SourceSpec::Video(_) | SourceSpec::Still { .. } | SourceSpec::Folder { .. } => {
                source.label()
            }
            _ => String::new(),
        };
        let bank_path = match &settings.bank {
            BankChoice::File(p) => p.clone(),
            BankChoice::ZeroShot => String::new(),
        };
        Self {
            path,
            path_error: None,
            bank_path,
            probe: settings.probe.clone(),
            installed: installed_models(),
            probe_edited: None,
        }
    }
}

pub fn show(
    ui: &mut egui::Ui,
    state: &mut ControlsState,
    settings: &mut Settings,
    store: &Store,
    source: &SourceSpec,
    cameras: &[CameraEntry],
    actions: &mut Vec<Action>,
) {
    ui.add_space(4.0);
    source_section(ui, state, settings, store, source, cameras, actions);
    ui.separator();
    faces_section(ui, store, actions);
    ui.separator();
    probe_section(ui, state, store, actions);
    ui.separator();
    display_section(ui, settings, actions);
    ui.separator();
    bank_section(ui, state, settings, actions);
}

fn section(ui: &mut egui::Ui, title: &str) {
    ui.label(RichText::new(title).heading().size(16.0));
}

fn source_section(
    ui: &mut egui::Ui,
    state: &mut ControlsState,
    settings: &Settings,
    store: &Store,
    source: &SourceSpec,
    cameras: &[CameraEntry],
    actions: &mut Vec<Action>,
) {
    section(ui, "Source");
    ui.horizontal_wrapped(|ui| {
        if ui
            .selectable_label(*source == SourceSpec::Demo, "Demo")
            .on_hover_text("The built-in portrait with gentle synthetic motion")
            .clicked()
        {
            actions.push(Action::SetSource(SourceSpec::Demo));
        }
        for c in cameras {
            let current = matches!(source, SourceSpec::Camera { index, .. } if *index == c.index);
            let label = format!("camera {}: {}", c.index, truncate(&c.name, 18));
            if ui
                .selectable_label(current, label)
                .on_hover_text(format!("camera {} ({})", c.index, c.name))
                .clicked()
            {
                actions.push(Action::SetSource(SourceSpec::Camera {
                    index: c.index,
                    resolution: settings.camera_resolution,
                }));
            }
        }
        if ui
            .small_button("rescan")
            .on_hover_text("Look for cameras again")
            .clicked()
        {
            actions.push(Action::RefreshCameras);
        }
    });
    if cameras.is_empty() {
        ui.label(RichText::new("No camera found.").weak());
    }
    if let SourceSpec::Camera { index, resolution } = source {
        let (w, h) = resolution.unwrap_or(DEFAULT_RESOLUTION);
        egui::ComboBox::from_label("resolution")
            .selected_text(format!("{w}x{h}"))
            .show_ui(ui, |ui| {
                for &(rw, rh) in COMMON_RESOLUTIONS {
                    if ui
                        .selectable_label((rw, rh) == (w, h), format!("{rw}x{rh}"))
                        .clicked()
                    {
                        actions.push(Action::SetSource(SourceSpec::Camera {
                            index: *index,
                            resolution: Some((rw, rh)),
                        }));
                    }
                }
            });
    }
    let field = ("video, image or folder path", "Open", 56.0);
    if let Some(path) = path_entry(ui, &mut state.path, field) {
        match SourceSpec::parse(&path, None) {
            Ok(spec) => {
                state.path_error = None;
                actions.push(Action::SetSource(spec));
            }
            Err(e) => state.path_error = Some(e.to_string()),
        }
    }
    ui.label(
        RichText::new("any video FFmpeg reads (MP4, MOV, MKV, WebM, AVI, ...), images, folders; or drop a file here")
            .small()
            .weak(),
    );
    if let Some(e) = &state.path_error {
        ui.colored_label(Color32::LIGHT_RED, e);
    }
    let (text, color) = match &store.source_state {
        SourceState::Playing => (
            store
                .source
                .as_ref()
                .map(|s| match s.len {
                    Some(n) => format!("playing {} ({n} frames, {:.0} fps)", s.name, s.fps),
                    None => format!("playing {} ({:.0} fps)", s.name, s.fps),
                })
                .unwrap_or_default(),
            ui.visuals().text_color(),
        ),
        SourceState::Opening(spec) => (
            format!("opening {}…", spec.label()),
            ui.visuals().weak_text_color(),
        ),
        SourceState::Ended { frames } => (
            format!("ended after {frames} frames"),
            ui.visuals().weak_text_color(),
        ),
        SourceState::Failed { .. } => (
            "source failed (see the video panel)".to_string(),
            Color32::LIGHT_RED,
        ),
    };
    ui.horizontal(|ui| {
        ui.label(RichText::new(text).color(color));
        if matches!(store.source_state, SourceState::Ended { .. })
            && ui.small_button("Replay").clicked()
        {
            actions.push(Action::SetSource(source.clone()));
        }
    });
    if let Some((w, _)) = &store.warning {
        ui.label(
            RichText::new(w)
                .small()
                .color(Color32::from_rgb(255, 200, 120)),
        );
    }
}

fn faces_section(ui: &mut egui::Ui, store: &Store, actions: &mut Vec<Action>) {
    section(ui, "Faces");
    let faces = store.current_faces();
    if faces.is_empty() {
        ui.label(RichText::new("none in view").weak());
        return;
    }
    ui.horizontal_wrapped(|ui| {
        for h in faces {
            let v = store.view(h);
            let c = v.predicted;
            let text = RichText::new(format!(
                "#{} {} {:.0}%",
                h.id,
                v.predicted_name(),
                v.probs[c] * 100.0
            ))
            .color(class_color(v.predicted_name()));
            if ui
                .selectable_label(store.selected == Some(h.id), text)
                .clicked()
            {
                actions.push(Action::SelectFace(h.id));
            }
        }
    });
}

fn probe_section(
    ui: &mut egui::Ui,
    state: &mut ControlsState,
    store: &Store,
    actions: &mut Vec<Action>,
) {
    section(ui, "Describe it yourself");
    let edit = ui.add(
        egui::TextEdit::singleline(&mut state.probe)
            .hint_text("e.g. a person trying not to laugh")
            .desired_width(f32::INFINITY),
    );
    if edit.changed() {
        state.probe_edited = Some(Instant::now());
    }
    if let Some(t) = state.probe_edited {
        let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        if enter || t.elapsed() >= PROBE_DEBOUNCE {
            state.probe_edited = None;
            actions.push(Action::SetProbe(state.probe.clone()));
        } else {
            ui.ctx().request_repaint_after(PROBE_DEBOUNCE);
        }
    }
    if let Some(e) = &store.probe_error {
        ui.colored_label(Color32::LIGHT_RED, e);
    }
    let Some(probe) = &store.probe else {
        ui.label(
            RichText::new("Its similarity to the selected face appears here, on the same scale as the classes.")
                .small()
                .weak(),
        );
        return;
    };
    let Some(face) = store.selected_face() else {
        return;
    };
    let Some(p) = face.probe_logit else {
        ui.label(RichText::new("waiting for the next result…").weak());
        return;
    };
    // The probe against the class scores (mean descriptor logits), highest first.
    let mut rows: Vec<(String, f32, Color32, bool)> = face
        .shown
        .layout
        .classes()
        .iter()
        .enumerate()
        .map(|(c, n)| (n.clone(), face.shown.class_scores[c], class_color(n), false))
        .collect();
    let n_rows = rows.len() + 1;
    rows.push((format!("“{}”", truncate(probe, 28)), p, PROBE_COLOR, true));
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let lo = rows.iter().map(|r| r.1).fold(f32::INFINITY, f32::min);
    let hi = rows.iter().map(|r| r.1).fold(f32::NEG_INFINITY, f32::max);
    let rank = rows.iter().position(|r| r.3).unwrap_or(0) + 1;
    ui.label(
        RichText::new(format!(
            "similarity {p:.2}: ranks {rank} of {n_rows} against the classes"
        ))
        .color(PROBE_COLOR),
    );
    egui::Grid::new("probe-vs-classes")
        .num_columns(3)
        .spacing([6.0, 2.0])
        .show(ui, |ui| {
            for (name, v, color, is_probe) in rows {
                let label = RichText::new(name).color(color);
                ui.label(if is_probe { label.strong() } else { label });
                ui.label(RichText::new(format!("{v:6.2}")).monospace());
                let frac = if hi > lo { (v - lo) / (hi - lo) } else { 1.0 };
                let (r, _) = ui.allocate_exact_size(egui::vec2(70.0, 10.0), egui::Sense::hover());
                let filled =
                    egui::Rect::from_min_size(r.min, egui::vec2(4.0 + 66.0 * frac, r.height()));
                ui.painter().rect_filled(filled, 2.0, color);
                ui.end_row();
            }
        });
}

fn display_section(ui: &mut egui::Ui, settings: &mut Settings, actions: &mut Vec<Action>) {
    section(ui, "Display");
    ui.horizontal(|ui| {
        use crate::vision::faces::DetectorKind;
        ui.label("faces");
        for (kind, name, about) in [
            (
                DetectorKind::CenterFace,
                "CenterFace",
                "A CNN with landmarks: finds turned, tilted and partly covered faces, and levels the eyes of each crop",
            ),
            (
                DetectorKind::Seeta,
                "SeetaFace",
                "SeetaFace's frontal cascade (rustface): lighter, frontal faces only",
            ),
        ] {
            if ui
                .radio(settings.detector == kind, name)
                .on_hover_text(about)
                .clicked()
                && settings.detector != kind
            {
                actions.push(Action::SetDetector(kind));
            }
        }
    });
    ui.checkbox(&mut settings.show_landmarks, "landmarks")
        .on_hover_text("Draw the eyes, nose tip and mouth corners CenterFace finds");
    ui.add(
        egui::Slider::new(&mut settings.smoothing, 0.0..=MAX_SMOOTHING)
            .text("smoothing")
            .fixed_decimals(2),
    )
    .on_hover_text(
        "Exponential moving average of the displayed scores: 0 = off, higher = steadier but slower",
    );
    ui.add(
        egui::Slider::new(&mut settings.timeline_secs, 5.0..=120.0)
            .text("timeline, s")
            .integer(),
    );
    ui.add(egui::Slider::new(&mut settings.top_descriptors, 1..=12).text("top descriptors"));
    ui.horizontal(|ui| {
        ui.label("mode");
        ui.radio_value(&mut settings.dynamic, false, "static")
            .on_hover_text("Each frame on its own (CLIPER's static branch)");
        ui.radio_value(&mut settings.dynamic, true, "dynamic")
            .on_hover_text(
                "A sliding window of each face's last frame features through the temporal module \
             (or, without trained temporal weights, the mean of the window's static scores)",
            );
    });
    if settings.dynamic {
        ui.add(
            egui::Slider::new(
                &mut settings.dynamic_window,
                2..=crate::model::temporal::DEFAULT_FRAMES,
            )
            .text("window, frames"),
        );
        ui.add(egui::Slider::new(&mut settings.dynamic_stride, 1..=16).text("stride, frames"));
    }
}

fn bank_section(
    ui: &mut egui::Ui,
    state: &mut ControlsState,
    settings: &Settings,
    actions: &mut Vec<Action>,
) {
    section(ui, "Descriptor bank");
    if ui
        .radio(
            settings.bank == BankChoice::ZeroShot,
            "zero-shot (built-in descriptions)",
        )
        .clicked()
        && settings.bank != BankChoice::ZeroShot
    {
        actions.push(Action::SetBank(BankChoice::ZeroShot));
    }
    // Installed trained models: one click each.
    for (name, path, about) in &state.installed {
        let on = matches!(&settings.bank, BankChoice::File(p) if p == path);
        if ui.radio(on, name.as_str()).on_hover_text(about).clicked() && !on {
            state.bank_path = path.clone();
            actions.push(Action::SetBank(BankChoice::File(path.clone())));
        }
    }
    let from_file = matches!(&settings.bank, BankChoice::File(p) if !state.installed.iter().any(|(_, q, _)| q == p));
    ui.radio(from_file, "from a file:").on_hover_text(
        "A CLIPER checkpoint (.safetensors, .pth) with learned descriptors, a DFER-CLIP checkpoint (.pth, as published), or a prompts file (.txt) of zero-shot descriptions (any classes, any number each)",
    );
    let field = ("descriptors.safetensors or prompts.txt", "Load", 56.0);
    if let Some(path) = path_entry(ui, &mut state.bank_path, field) {
        actions.push(Action::SetBank(BankChoice::File(path)));
    }
}

/// A path field with its button (`button_w` pixels kept for it): the
/// trimmed path, when it is not empty and the button is pressed or Enter
/// ends the edit.
pub(super) fn path_entry(
    ui: &mut egui::Ui,
    path: &mut String,
    (hint, button, button_w): (&str, &str, f32),
) -> Option<String> {
    ui.horizontal(|ui| {
        let edit = ui.add(
            egui::TextEdit::singleline(path)
                .hint_text(hint)
                .desired_width(ui.available_width() - button_w),
        );
        let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        let pressed = ui.button(button).clicked() || enter;
        (pressed && !path.trim().is_empty()).then(|| path.trim().to_string())
    })
    .inner
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!(
            "{}…",
            s.chars().take(n.saturating_sub(1)).collect::<String>()
        )
    }
}
