//! The descriptor panel: which of the bank's expression descriptors fire
//! for the selected face. The top ones are listed with their logits and
//! what they say (the sentence of a zero-shot descriptor, the nearest
//! vocabulary words of a learned one, a DFER-CLIP class description); all
//! are shown as a grid, one row per class (CLIPER: 7 x 5).

use eframe::egui::{
    self, Align2, Color32, CornerRadius, FontId, Rect, RichText, Sense, Stroke, StrokeKind, Vec2,
};

use super::palette::{class_color, text_on};
use super::store::Store;
use super::Action;
use crate::model::cliper::bank::{BankKind, Descriptor};
use crate::model::cliper::expressions::BankLayout;
use crate::model::explain::{colormap, Method, Target};

pub fn show(ui: &mut egui::Ui, store: &mut Store, top: usize, actions: &mut Vec<Action>) {
    ui.add_space(4.0);
    ui.heading("Descriptors");
    let Some(bank) = &store.bank else {
        match &store.model {
            super::store::ModelState::Failed(_) => {
                ui.label(RichText::new("No model: see the message over the video.").weak());
            }
            _ => {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label("waiting for the model…");
                });
            }
        }
        if let Some(e) = &store.bank_error {
            ui.colored_label(Color32::LIGHT_RED, e);
        }
        return;
    };
    let source = if bank.source == "built-in" {
        "built-in".to_string()
    } else {
        std::path::Path::new(&bank.source)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| bank.source.clone())
    };
    let head = match &bank.head {
        Some(h) => format!(
            " · Exp-CLIP head {}",
            std::path::Path::new(&h.source)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
        None => String::new(),
    };
    ui.label(
        RichText::new(format!(
            "{} · {source}{head} · {} classes",
            bank.kind.as_str(),
            bank.layout.num_classes()
        ))
        .weak(),
    )
    .on_hover_text(&bank.source);
    if let Some(e) = &store.bank_error {
        ui.colored_label(Color32::LIGHT_RED, e);
    }
    let Some(face) = store.selected_face() else {
        ui.add_space(8.0);
        ui.label(RichText::new("No face yet: the descriptors light up when one is found.").weak());
        return;
    };
    let logits = &store.view(face).logits;
    if logits.len() != bank.descriptors.len() {
        return;
    }
    ui.add_space(6.0);
    ui.label(RichText::new(format!("Top {top} for face #{}", face.id)).strong());
    egui::ScrollArea::vertical()
        .id_salt("top-descriptors")
        .max_height((ui.available_height() - 250.0).max(120.0))
        .show(ui, |ui| {
            for (rank, &i) in store.view(face).ranked().iter().take(top).enumerate() {
                let name = bank.layout.name(bank.descriptors[i].class);
                descriptor_row(ui, rank, &bank.descriptors[i], name, logits[i], bank.kind);
            }
        });
    ui.add_space(8.0);
    ui.label(
        RichText::new(format!(
            "All {} (logit = cosine / 0.01)",
            bank.descriptors.len()
        ))
        .strong(),
    );
    let logits = logits.clone();
    let bank = bank.clone();
    if let Some(t) = grid(ui, &bank.layout, &bank.descriptors, &logits, store.explain) {
        actions.push(Action::Explain(Some(t)));
    }
    explain_controls(ui, store, actions);
}

/// What the map over the faces shows, its opacity and colour scale.
fn explain_controls(ui: &mut egui::Ui, store: &mut Store, actions: &mut Vec<Action>) {
    ui.add_space(6.0);
    let Some(target) = store.explain else {
        ui.label(
            RichText::new(
                "Click a cell (a descriptor) or a class name to see where on the face it looks.",
            )
            .weak()
            .small(),
        );
        return;
    };
    let layout = store.bank.as_ref().map(|b| b.layout.clone());
    let name = match (target, layout) {
        (Target::Descriptor(i), Some(l)) => {
            let (c, k) = l.locate(i);
            format!("{} #{}", l.name(c), k + 1)
        }
        (Target::Class(c), Some(l)) => format!("class {}", l.name(c)),
        (Target::Descriptor(i), None) => format!("descriptor {}", i + 1),
        (Target::Class(c), None) => format!("class {}", c + 1),
    };
    ui.horizontal(|ui| {
        ui.label(RichText::new(format!("Map: {name}")).strong());
        if ui.button("clear").clicked() {
            actions.push(Action::Explain(None));
        }
    });
    ui.horizontal(|ui| {
        ui.label("method");
        for m in [Method::Fast, Method::GradCam, Method::Occlusion] {
            ui.selectable_value(&mut store.map_method, m, m.label())
                .on_hover_text(match m {
                    Method::Fast => "Every frame, from the same forward pass: the patch tokens through the last block's value path (MaskCLIP)",
                    Method::GradCam => "Exact, for a paused frame: gradient-weighted attention of the last block",
                    Method::Occlusion => "Exact, for a paused frame: grey out each cell of a grid and measure the logit drop (one forward pass per cell)",
                });
        }
    });
    if store.map_method == Method::Occlusion {
        let mut grid = store.occlusion_grid;
        ui.add(egui::Slider::new(&mut grid, 2..=14).text("occlusion grid"));
        store.occlusion_grid = grid;
    }
    let paused = store.paused.is_some();
    if store.map_method != Method::Fast && !paused {
        ui.horizontal_wrapped(|ui| {
            ui.label(
                RichText::new(
                    "Exact maps are computed for a paused frame; the fast map is shown meanwhile.",
                )
                .weak()
                .small(),
            );
            if ui.small_button("Pause here").clicked() {
                actions.push(Action::SetPaused(true));
            }
        });
    }
    ui.add(egui::Slider::new(&mut store.explain_opacity, 0.0..=1.0).text("opacity"));
    let shown = store
        .selected
        .and_then(|id| store.map_for(id))
        .map(|(m, method)| (m.clone(), method));
    let caption = shown.as_ref().map(|(_, m)| *m).unwrap_or(Method::Fast);
    let range = shown.as_ref().map(|(m, _)| {
        m.values
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            })
    });
    let (rect, _) = ui.allocate_exact_size(Vec2::new(ui.available_width(), 12.0), Sense::hover());
    let n = 48;
    for k in 0..n {
        let c = colormap(k as f32 / (n - 1) as f32);
        let w = rect.width() / n as f32;
        let r = Rect::from_min_size(
            egui::pos2(rect.left() + k as f32 * w, rect.top()),
            Vec2::new(w + 0.5, rect.height()),
        );
        ui.painter()
            .rect_filled(r, CornerRadius::ZERO, Color32::from_rgb(c[0], c[1], c[2]));
    }
    ui.horizontal(|ui| match range {
        Some((lo, hi)) if lo.is_finite() => {
            ui.label(RichText::new(format!("{lo:.2}")).monospace().small());
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                ui.label(RichText::new(format!("{hi:.2}")).monospace().small());
                ui.label(RichText::new(caption.meaning()).weak().small());
            });
        }
        _ if paused => {
            let text = match store.current_exact() {
                Some(e) if e.error.is_some() => {
                    "the map could not be computed (see over the video)"
                }
                Some(_) => "computing the map of the paused frame…",
                None => "waiting…",
            };
            ui.label(RichText::new(text).weak().small());
        }
        _ => {
            ui.label(RichText::new("waiting for the next frame…").weak().small());
        }
    });
}

fn descriptor_row(
    ui: &mut egui::Ui,
    rank: usize,
    d: &Descriptor,
    class: &str,
    logit: f32,
    kind: BankKind,
) {
    let color = class_color(class);
    ui.horizontal_top(|ui| {
        ui.label(RichText::new(format!("{}.", rank + 1)).monospace().weak());
        let (chip, _) = ui.allocate_exact_size(Vec2::new(64.0, 18.0), Sense::hover());
        ui.painter().rect_filled(chip, CornerRadius::same(3), color);
        ui.painter().text(
            chip.center(),
            Align2::CENTER_CENTER,
            format!("{} {}", crate::model::cliper::expressions::short_class_name(class), d.index + 1),
            FontId::proportional(12.0),
            text_on(color),
        );
        ui.label(RichText::new(format!("{logit:6.2}")).monospace());
        let text = match kind {
            BankKind::ZeroShot | BankKind::DferClip => RichText::new(&d.text),
            BankKind::Learned => RichText::new(format!("“{}”", d.text)).italics(),
        };
        let r = ui.add(egui::Label::new(text).wrap());
        if let Some(words) = &d.words {
            r.on_hover_ui(|ui| {
                ui.label(match kind {
                    BankKind::DferClip => "Nearest vocabulary words of each learned context token before the description:",
                    _ => "Nearest vocabulary words of each learned token:",
                });
                egui::Grid::new("words").striped(true).show(ui, |ui| {
                    for (slot, ws) in words.iter().enumerate() {
                        ui.label(format!("token {}", slot + 1));
                        ui.label(ws.join(", "));
                        ui.end_row();
                    }
                });
            });
        }
    });
}

/// The grid: one row per class, one cell per descriptor, shaded by logit.
/// Returns the descriptor (a cell) or class (a row label) clicked.
fn grid(
    ui: &mut egui::Ui,
    layout: &BankLayout,
    descriptors: &[Descriptor],
    logits: &[f32],
    current: Option<Target>,
) -> Option<Target> {
    let (lo, hi) = logits
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let range = (hi - lo).max(1e-6);
    let label_w = 72.0;
    // A large ensemble wraps onto several lines per class.
    let cols = layout.max_count().clamp(1, 8);
    let lines = |c: usize| layout.count(c).div_ceil(cols).max(1);
    let w = ui.available_width();
    let cell = Vec2::new(((w - label_w) / cols as f32 - 3.0).max(30.0), 24.0);
    let total_lines: usize = (0..layout.num_classes()).map(lines).sum();
    let total = Vec2::new(w, (cell.y + 3.0) * total_lines as f32);
    let (rect, response) = ui.allocate_exact_size(total, Sense::click());
    let mut clicked = None;
    let painter = ui.painter_at(rect);
    let mut hovered = None;
    let mut line = 0;
    for (c, name) in layout.classes().iter().enumerate() {
        let name = name.as_str();
        let y = rect.top() + line as f32 * (cell.y + 3.0);
        line += lines(c);
        let label =
            Rect::from_min_size(egui::pos2(rect.left(), y), Vec2::new(label_w - 4.0, cell.y));
        if current == Some(Target::Class(c)) {
            outline(&painter, label, 1.5, class_color(name));
        }
        if clicked_in(&response, label) {
            clicked = Some(Target::Class(c));
        }
        painter.text(
            egui::pos2(rect.left(), y + cell.y / 2.0),
            Align2::LEFT_CENTER,
            name,
            FontId::proportional(13.0),
            class_color(name),
        );
        for (k, i) in layout.range(c).enumerate() {
            let Some(&l) = logits.get(i) else { continue };
            let (row, col) = (k / cols, k % cols);
            let r = Rect::from_min_size(
                egui::pos2(
                    rect.left() + label_w + col as f32 * (cell.x + 3.0),
                    y + row as f32 * (cell.y + 3.0),
                ),
                cell,
            );
            let strength = ((l - lo) / range).clamp(0.0, 1.0);
            let fill = class_color(name).gamma_multiply(0.12 + 0.88 * strength * strength);
            painter.rect_filled(r, CornerRadius::same(3), fill);
            let text_color = if strength > 0.55 {
                text_on(class_color(name))
            } else {
                Color32::from_gray(220)
            };
            painter.text(
                r.center(),
                Align2::CENTER_CENTER,
                format!("{l:.1}"),
                FontId::monospace(12.0),
                text_color,
            );
            if current == Some(Target::Descriptor(i)) {
                outline(&painter, r, 2.0, Color32::YELLOW);
            }
            if clicked_in(&response, r) {
                clicked = Some(Target::Descriptor(i));
            }
            if response.hover_pos().is_some_and(|p| r.contains(p)) {
                outline(&painter, r, 1.5, Color32::WHITE);
                hovered = Some(i);
            }
        }
    }
    if let Some(i) = hovered {
        if let Some(d) = descriptors.get(i) {
            response.on_hover_ui_at_pointer(|ui| {
                ui.label(
                    RichText::new(format!("{} #{}", layout.name(d.class), d.index + 1))
                        .color(class_color(layout.name(d.class)))
                        .strong(),
                );
                ui.label(format!("logit {:.2}", logits[i]));
                ui.label(&d.text);
                ui.label(
                    RichText::new("click: show where on the face it looks")
                        .weak()
                        .small(),
                );
            });
        }
    }
    clicked
}

/// Whether `response` is a click inside `r`.
fn clicked_in(response: &egui::Response, r: Rect) -> bool {
    response.clicked()
        && response
            .interact_pointer_pos()
            .is_some_and(|p| r.contains(p))
}

/// A rounded outline of `width` inside `r`.
fn outline(painter: &egui::Painter, r: Rect, width: f32, colour: Color32) {
    painter.rect_stroke(
        r,
        CornerRadius::same(3),
        Stroke::new(width, colour),
        StrokeKind::Inside,
    );
}
