//! The video panel: the newest frame with its face boxes, track ids and top
//! expression; click a face to select it. Also shows what the source is
//! doing (opening, failed, ended) with the buttons to recover.

use eframe::egui::{
    self, Align2, Color32, CornerRadius, FontId, Pos2, Rect, RichText, Sense, Stroke, StrokeKind,
    TextureHandle, TextureOptions, Vec2,
};

use super::palette::{class_color, text_on};
use super::store::{ModelState, SourceState, Store};
use super::Action;
use crate::vision::source::SourceSpec;

#[derive(Default)]
pub struct VideoView {
    texture: Option<TextureHandle>,
    /// One texture per face for its explanation map.
    maps: std::collections::HashMap<u64, TextureHandle>,
    /// (generation, seq) of the frame in the texture.
    shown: Option<(u64, u64)>,
}

#[allow(clippy::too_many_arguments)]
pub fn show(
    ui: &mut egui::Ui,
    view: &mut VideoView,
    store: &mut Store,
    notice: Option<&str>,
    source: &SourceSpec,
    show_landmarks: bool,
    margin: f32,
    actions: &mut Vec<Action>,
) {
    if let Some(n) = notice {
        egui::Frame::new()
            .fill(Color32::from_rgb(40, 62, 90))
            .corner_radius(CornerRadius::same(4))
            .inner_margin(egui::Margin::symmetric(10, 6))
            .show(ui, |ui| {
                ui.set_width(ui.available_width());
                ui.label(RichText::new(n).color(Color32::WHITE));
            });
    }
    let (rect, response) = ui.allocate_exact_size(ui.available_size(), Sense::click());
    let painter = ui.painter_at(rect);

    let frame = store.shown_frame().cloned();
    let mut image_rect = None;
    if let Some(f) = &frame {
        let key = (f.generation, f.seq);
        if view.shown != Some(key) {
            let (w, h) = f.image.dimensions();
            let img = egui::ColorImage::from_rgb([w as usize, h as usize], f.image.as_raw());
            match &mut view.texture {
                Some(t) => t.set(img, TextureOptions::LINEAR),
                None => {
                    view.texture = Some(ui.ctx().load_texture("video", img, TextureOptions::LINEAR))
                }
            }
            view.shown = Some(key);
        }
        image_rect = paint_fitted(&painter, view.texture.as_ref(), rect);
        store.mark_frame_shown();
    } else {
        paint_fitted(&painter, None, rect);
    }

    if let (Some(f), Some((r, scale))) = (&frame, image_rect) {
        let to_screen = |x: u32, y: u32| r.min + Vec2::new(x as f32, y as f32) * scale;
        let mut clicked_face = None;
        for tf in &f.faces {
            let b = tf.bbox;
            let bx = Rect::from_min_max(to_screen(b.x, b.y), to_screen(b.x + b.w, b.y + b.h));
            if let (true, Some(l)) = (show_landmarks, b.landmarks) {
                // Eyes blue, nose red, mouth corners yellow.
                let colours = [
                    Color32::from_rgb(70, 140, 255),
                    Color32::from_rgb(70, 140, 255),
                    Color32::from_rgb(255, 80, 80),
                    Color32::from_rgb(255, 220, 40),
                    Color32::from_rgb(255, 220, 40),
                ];
                for (p, c) in l.iter().zip(colours) {
                    let at = r.min + Vec2::new(p[0], p[1]) * scale;
                    painter.circle_filled(at, (b.w as f32 * scale / 40.0).clamp(2.0, 5.0), c);
                }
            }
            let history = store.faces.get(&tf.id);
            let (color, label) = match history {
                Some(h) => {
                    let v = store.view(h);
                    let c = v.predicted;
                    (
                        class_color(v.predicted_name()),
                        format!(
                            "#{}  {} {:.0}%",
                            tf.id,
                            v.predicted_name(),
                            v.probs[c] * 100.0
                        ),
                    )
                }
                None => (Color32::WHITE, format!("#{}", tf.id)),
            };
            // The explanation map over the square the model saw.
            if let Some((map, _)) = store.map_for(tf.id) {
                let (sx, sy, side, _) = crate::vision::faces::square_crop(
                    f.image.width(),
                    f.image.height(),
                    &b,
                    margin,
                );
                let region = Rect::from_min_max(
                    r.min + Vec2::new(sx as f32, sy as f32) * scale,
                    r.min + Vec2::new((sx + side) as f32, (sy + side) as f32) * scale,
                );
                let tex = map_texture(ui.ctx(), view, tf.id, map, store.explain_opacity);
                painter.image(tex.id(), region, FULL_UV, Color32::WHITE);
            }
            let selected = store.selected == Some(tf.id);
            if selected {
                painter.rect_stroke(
                    bx.expand(3.0),
                    CornerRadius::same(3),
                    Stroke::new(5.0, color.gamma_multiply(0.35)),
                    StrokeKind::Outside,
                );
            }
            painter.rect_stroke(
                bx,
                CornerRadius::same(2),
                Stroke::new(if selected { 3.0 } else { 2.0 }, color),
                StrokeKind::Outside,
            );
            let font = FontId::proportional(15.0);
            let galley = painter.layout_no_wrap(label, font, text_on(color));
            let pad = Vec2::new(6.0, 2.0);
            let mut tag = Rect::from_min_size(
                Pos2::new(
                    bx.left() - 2.0,
                    bx.top() - galley.size().y - 2.0 * pad.y - 3.0,
                ),
                galley.size() + 2.0 * pad,
            );
            if tag.top() < rect.top() {
                tag = tag.translate(Vec2::new(0.0, bx.height() + tag.height() + 6.0));
            }
            painter.rect_filled(tag, CornerRadius::same(3), color);
            painter.galley(tag.min + pad, galley, Color32::BLACK);
            if let Some(pos) = response.interact_pointer_pos() {
                if response.clicked() && bx.expand(4.0).contains(pos) {
                    clicked_face = Some(tf.id);
                }
            }
        }
        if let Some(id) = clicked_face {
            actions.push(Action::SelectFace(id));
        }
        if let Some(p) = &store.paused {
            let mut text = format!(
                "Paused at frame {} ({:.2} s){}",
                p.frame.index,
                p.frame.t,
                if store.source.as_ref().is_some_and(|s| s.live) {
                    ": the camera keeps running (and recording) behind"
                } else {
                    ""
                }
            );
            if p.frame.faces.is_empty() {
                text.push_str("\nno face in this frame to explain");
            } else if let Some(e) = store.current_exact() {
                let (done, total) = e.progress;
                text.push_str(&match (&e.error, e.finished) {
                    (Some(err), _) => format!("\n{} map failed: {err}", e.method.label()),
                    (None, true) => format!(
                        "\n{} map of the paused frame ({:.1} s)",
                        e.method.label(),
                        e.secs.unwrap_or(0.0)
                    ),
                    (None, false) if total > 0 => format!(
                        "\ncomputing the {} map… {done}/{total} forward passes",
                        e.method.label()
                    ),
                    (None, false) => format!("\ncomputing the {} map…", e.method.label()),
                });
            }
            overlay_label(
                &painter,
                r.left_top() + Vec2::new(10.0, 10.0),
                Align2::LEFT_TOP,
                &text,
            );
        }
        if f.faces.is_empty() && matches!(store.source_state, SourceState::Playing) {
            overlay_label(
                &painter,
                r.left_bottom() + Vec2::new(10.0, -10.0),
                Align2::LEFT_BOTTOM,
                "no face found",
            );
        }
        if let ModelState::Loading = store.model {
            overlay_label(
                &painter,
                r.left_top() + Vec2::new(10.0, 10.0),
                Align2::LEFT_TOP,
                "loading the expression model…",
            );
        }
    }

    if let ModelState::Failed(e) = &store.model {
        let r = Rect::from_min_size(
            rect.left_top() + Vec2::new(12.0, 12.0),
            Vec2::new((rect.width() - 24.0).max(100.0), 64.0),
        );
        painter.rect_filled(
            r,
            CornerRadius::same(6),
            Color32::from_rgba_unmultiplied(60, 20, 20, 235),
        );
        let mut ui = ui.new_child(egui::UiBuilder::new().max_rect(r.shrink(10.0)));
        ui.label(
            RichText::new("The expression model could not be loaded")
                .strong()
                .color(Color32::WHITE),
        );
        ui.label(RichText::new(e).color(Color32::from_gray(230)));
    }

    // Pause / resume, top right over the picture.
    if frame.is_some() {
        let paused = store.paused.is_some();
        let label = if paused { "Resume" } else { "Pause" };
        let size = Vec2::new(96.0, 26.0);
        let at = Rect::from_min_size(rect.right_top() + Vec2::new(-size.x - 10.0, 10.0), size);
        let button = ui
            .put(at, egui::Button::new(RichText::new(label).strong()))
            .on_hover_text(if paused {
                "Back to live (Space)"
            } else {
                "Freeze this frame (Space): the exact maps (Grad-CAM, occlusion) are computed for it"
            });
        if button.clicked() {
            actions.push(Action::SetPaused(!paused));
        }
    }

    // Source state over the picture.
    match store.source_state.clone() {
        SourceState::Opening(spec) if frame.is_none() => {
            let mut ui = ui.new_child(egui::UiBuilder::new().max_rect(Rect::from_center_size(
                rect.center(),
                Vec2::new(360.0, 60.0),
            )));
            ui.vertical_centered(|ui| {
                ui.spinner();
                ui.label(format!("Opening {}…", spec.label()));
            });
        }
        SourceState::Failed { spec, error } => {
            let r =
                Rect::from_center_size(rect.center(), Vec2::new(rect.width().min(560.0), 170.0));
            painter.rect_filled(
                r,
                CornerRadius::same(6),
                Color32::from_rgba_unmultiplied(60, 20, 20, 235),
            );
            let mut ui = ui.new_child(egui::UiBuilder::new().max_rect(r.shrink(14.0)));
            ui.vertical(|ui| {
                ui.label(
                    RichText::new(format!("{} stopped", spec.label()))
                        .strong()
                        .color(Color32::WHITE),
                );
                ui.label(RichText::new(error).color(Color32::from_gray(230)));
                ui.add_space(6.0);
                ui.horizontal(|ui| {
                    let retry = if spec.is_camera() {
                        "Reconnect"
                    } else {
                        "Try again"
                    };
                    if ui.button(retry).clicked() {
                        actions.push(Action::SetSource(spec.clone()));
                    }
                    if *source != SourceSpec::Demo && ui.button("Use the demo").clicked() {
                        actions.push(Action::SetSource(SourceSpec::Demo));
                    }
                });
            });
        }
        SourceState::Ended { frames } => {
            let r = Rect::from_min_size(
                rect.left_bottom() + Vec2::new(12.0, -48.0),
                Vec2::new(330.0, 36.0),
            );
            painter.rect_filled(r, CornerRadius::same(6), Color32::from_black_alpha(200));
            let mut ui =
                ui.new_child(egui::UiBuilder::new().max_rect(r.shrink2(Vec2::new(10.0, 6.0))));
            ui.horizontal(|ui| {
                ui.label(
                    RichText::new(format!("End of the source ({frames} frames)"))
                        .color(Color32::WHITE),
                );
                if ui.button("Replay").clicked() {
                    actions.push(Action::SetSource(source.clone()));
                }
            });
        }
        _ => {}
    }
}

fn overlay_label(painter: &egui::Painter, pos: Pos2, align: Align2, text: &str) {
    let galley =
        painter.layout_no_wrap(text.to_string(), FontId::proportional(14.0), Color32::WHITE);
    let r = align.anchor_size(pos, galley.size() + Vec2::new(12.0, 6.0));
    painter.rect_filled(r, CornerRadius::same(4), Color32::from_black_alpha(170));
    painter.galley(r.min + Vec2::new(6.0, 3.0), galley, Color32::WHITE);
}

/// Texels per grid cell side of an explanation map's texture.
const MAP_TEXELS: usize = 112;

/// The map upsampled bilinearly (cell centres on cell centres, as
/// `cliper explain` draws it), coloured on its own range, with the opacity
/// as alpha, in face `id`'s texture.
fn map_texture(
    ctx: &egui::Context,
    view: &mut VideoView,
    id: u64,
    map: &crate::model::explain::ExplainMap,
    opacity: f32,
) -> TextureHandle {
    let (lo, hi) = map
        .values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, z), &v| {
            (a.min(v), z.max(v))
        });
    let span = if hi > lo { hi - lo } else { 1.0 };
    let n = MAP_TEXELS.div_ceil(map.rows.max(map.cols)).max(1) * map.rows.max(map.cols);
    let up = crate::model::explain::upsample(map, n as u32, n as u32);
    let alpha = (opacity.clamp(0.0, 1.0) * 255.0).round() as u8;
    let rgba: Vec<u8> = up
        .iter()
        .flat_map(|&v| {
            let [r, g, b] = crate::model::explain::colormap((v - lo) / span);
            [r, g, b, alpha]
        })
        .collect();
    let img = egui::ColorImage::from_rgba_unmultiplied([n, n], &rgba);
    // Faces that left keep no texture.
    if view.maps.len() > 32 {
        view.maps.clear();
    }
    view.maps
        .entry(id)
        .and_modify(|t| t.set(img.clone(), TextureOptions::LINEAR))
        .or_insert_with(|| ctx.load_texture(format!("map-{id}"), img, TextureOptions::LINEAR))
        .clone()
}

/// Texture coordinates of a whole texture.
const FULL_UV: Rect = Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0));

/// The video panel's colour around the picture.
const VIDEO_BACKGROUND: Color32 = Color32::from_gray(14);

/// Paints `tex` as large as fits in `rect`, centred, keeping its aspect, and
/// the panel's colour around it; returns where it went and its scale
/// (screen points per texel). With no picture, the panel's colour.
///
/// The colour goes around the picture, not under it: a software OpenGL
/// would fill each of its pixels twice a frame (llvmpipe 14.2% -> 11.6% of
/// a core at 10 frames a second, 1280x800 under Xvfb).
pub(super) fn paint_fitted(
    painter: &egui::Painter,
    tex: Option<&TextureHandle>,
    rect: Rect,
) -> Option<(Rect, f32)> {
    let Some(tex) = tex else {
        painter.rect_filled(rect, CornerRadius::same(4), VIDEO_BACKGROUND);
        return None;
    };
    let size = tex.size_vec2();
    let scale = (rect.width() / size.x).min(rect.height() / size.y);
    let r = Rect::from_center_size(rect.center(), size * scale);
    painter.image(tex.id(), r, FULL_UV, Color32::WHITE);
    for bar in bars_around(rect, r) {
        painter.rect_filled(bar, CornerRadius::ZERO, VIDEO_BACKGROUND);
    }
    Some((r, scale))
}

/// The parts of `outer` outside `inner`, as up to four rectangles that do
/// not overlap each other or `inner`.
fn bars_around(outer: Rect, inner: Rect) -> impl Iterator<Item = Rect> {
    let inner = inner.intersect(outer);
    let (top, bottom) = (inner.min.y.max(outer.min.y), inner.max.y.min(outer.max.y));
    [
        Rect::from_min_max(outer.min, egui::pos2(outer.max.x, top)),
        Rect::from_min_max(egui::pos2(outer.min.x, bottom), outer.max),
        Rect::from_min_max(
            egui::pos2(outer.min.x, top),
            egui::pos2(inner.min.x, bottom),
        ),
        Rect::from_min_max(
            egui::pos2(inner.max.x, top),
            egui::pos2(outer.max.x, bottom),
        ),
    ]
    .into_iter()
    .filter(|b| b.width() > 0.0 && b.height() > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bars_and_the_picture_tile_the_panel() {
        let outer = Rect::from_min_size(egui::pos2(10.0, 20.0), egui::vec2(660.0, 480.0));
        let area = |r: Rect| r.width() * r.height();
        for inner in [
            // Pillarbox, letterbox, a picture that fills the panel, one
            // that is larger than it.
            Rect::from_center_size(outer.center(), egui::vec2(640.0, 480.0)),
            Rect::from_center_size(outer.center(), egui::vec2(660.0, 371.25)),
            outer,
            Rect::from_center_size(outer.center(), egui::vec2(700.0, 400.0)),
        ] {
            let bars: Vec<Rect> = bars_around(outer, inner).collect();
            let covered =
                area(inner.intersect(outer)) + bars.iter().copied().map(area).sum::<f32>();
            assert!(
                (covered - area(outer)).abs() < 1e-2,
                "{inner:?}: {covered} of {}",
                area(outer)
            );
            for (i, a) in bars.iter().enumerate() {
                assert!(outer.contains_rect(*a), "{a:?} leaves the panel");
                assert!(
                    !a.intersects(inner.shrink(0.01)),
                    "{a:?} covers the picture {inner:?}"
                );
                for b in &bars[i + 1..] {
                    assert!(
                        !a.shrink(0.01).intersects(b.shrink(0.01)),
                        "{a:?} and {b:?} overlap"
                    );
                }
            }
        }
        assert_eq!(bars_around(outer, outer).count(), 0);
    }
}
