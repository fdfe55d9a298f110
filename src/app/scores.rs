//! The selected face's scores: a bar chart of the class probabilities and
//! a timeline of each class (the classes of the bank in use). The live
//! window scrolls the last N seconds; replay shows the whole session with a
//! marker at the scrubber, and a click there seeks.

use std::collections::VecDeque;

use eframe::egui::{self, Color32, RichText};
use egui_plot::{Bar, BarChart, Line, LineStyle, Plot, PlotPoint, PlotPoints, Text, VLine};

use super::palette::class_color;
use super::store::Store;
use crate::pipeline::dynamic::DynamicMode;
use crate::session::replay::TimelinePoint;
use crate::session::report::MAX_FRAME_SECS;

/// The time the timeline spans.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Span {
    /// Live: the last this many seconds, "now" at the right edge.
    Recent(f32),
    /// Replay: the whole session (0 to `duration` seconds), with a marker
    /// at the store's time.
    Whole { duration: f64 },
}

/// Draws the panel; returns the time clicked on the timeline (replay seeks
/// there).
pub fn show(
    ui: &mut egui::Ui,
    store: &Store,
    span: Span,
    height: f32,
    dynamic: bool,
) -> Option<f64> {
    let face = store.selected_face();
    let names = store.classes();
    ui.horizontal(|ui| {
        match (face, store.selected) {
            (Some(h), _) => {
                let shown = h.displayed(dynamic);
                let c = shown.predicted;
                ui.label(RichText::new(format!("Face #{}", h.id)).strong());
                ui.label(
                    RichText::new(format!("{} {:.0}%", shown.predicted_name(), shown.probs[c] * 100.0))
                        .color(class_color(shown.predicted_name()))
                        .strong(),
                );
                if dynamic {
                    let what = match (&h.dynamic, h.window_fill) {
                        (Some((_, DynamicMode::Temporal)), _) => "dynamic: temporal module".to_string(),
                        (Some((_, DynamicMode::MeanOfFeatures)), _) => {
                            "dynamic: the head on the mean of the window's features (Exp-CLIP)"
                                .to_string()
                        }
                        (Some((_, DynamicMode::MeanOfStatic)), _) => {
                            "dynamic: no trained temporal weights, mean of the window's static scores"
                                .to_string()
                        }
                        (None, Some(n)) => format!("dynamic: filling the window ({n} frames), static shown"),
                        (None, None) => "dynamic: none recorded for this frame, static shown".to_string(),
                    };
                    ui.label(RichText::new(what).small().weak());
                }
            }
            (None, Some(id)) => {
                ui.label(RichText::new(format!("Face #{id} is not in this frame")).weak());
            }
            (None, None) => {
                ui.label(RichText::new("No face selected").weak());
            }
        }
        // One legend for both plots, in class order, where it fits beside
        // the face's line (on a narrow window it ran over it; the bars
        // carry the names and colours too).
        let font = egui::TextStyle::Small.resolve(ui.style());
        let gap = ui.spacing().item_spacing.x;
        let needed: f32 = ui.ctx().fonts_mut(|f| {
            names
                .iter()
                .map(|n| f.layout_no_wrap(n.clone(), font.clone(), egui::Color32::WHITE).size().x + gap)
                .sum()
        });
        if needed <= ui.available_width() {
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                for name in names.iter().rev() {
                    ui.label(RichText::new(name.as_str()).color(class_color(name)).small());
                }
            });
        }
    });
    let plot_h = (height - 28.0).max(120.0);
    ui.horizontal(|ui| {
        let w = ui.available_width();
        let bar_w = (w * 0.4).max(220.0);
        ui.allocate_ui(egui::vec2(bar_w, plot_h), |ui| {
            bars(ui, store, &names, plot_h, dynamic)
        });
        ui.allocate_ui(egui::vec2(ui.available_width(), plot_h), |ui| {
            timeline(ui, store, &names, span, plot_h, dynamic)
        })
        .inner
    })
    .inner
}

fn bars(ui: &mut egui::Ui, store: &Store, names: &[String], h: f32, dynamic: bool) {
    let probs = store
        .selected_face()
        .map(|f| f.displayed(dynamic).probs.clone())
        .unwrap_or_else(|| vec![0.0; names.len()]);
    class_bars(ui, "class-probabilities", names, &probs, h);
}

/// A plot of height `h` that the mouse cannot pan or zoom (the panels set
/// their own ranges; a click on a timeline seeks instead).
fn fixed_plot(id: &str, h: f32) -> Plot<'static> {
    Plot::new(id)
        .height(h)
        .allow_drag(false)
        .allow_zoom(false)
        .allow_scroll(false)
        .allow_boxed_zoom(false)
        .allow_double_click_reset(false)
}

/// Class probabilities as bars, each class's short name under its bar (the
/// live window and replay).
pub fn class_bars(ui: &mut egui::Ui, id: &str, names: &[String], probs: &[f32], h: f32) {
    let bars: Vec<Bar> = probs
        .iter()
        .enumerate()
        .map(|(c, &p)| {
            let name = names.get(c).map(String::as_str).unwrap_or("?");
            Bar::new(c as f64, f64::from(p))
                .width(0.72)
                .fill(class_color(name))
                .name(name)
        })
        .collect();
    fixed_plot(id, h)
        .show_x(false)
        .show_axes([false, true])
        .show_grid([false, true])
        .y_axis_min_width(28.0)
        .y_axis_formatter(|mark, _| {
            if mark.value < -1e-9 {
                String::new()
            } else {
                format!("{:.0}%", mark.value * 100.0)
            }
        })
        .show(ui, |p| {
            p.set_plot_bounds_x(-0.6..=(names.len() as f64 - 0.4));
            // Room under the bars for the class names.
            p.set_plot_bounds_y(-0.1..=1.04);
            for (c, name) in names.iter().enumerate() {
                p.text(
                    Text::new(
                        name.as_str(),
                        PlotPoint::new(c as f64, -0.05),
                        RichText::new(crate::model::cliper::expressions::short_class_name(name))
                            .size(11.0),
                    )
                    .color(class_color(name)),
                );
            }
            p.bar_chart(
                BarChart::new("probability", bars).element_formatter(Box::new(|b, _| {
                    format!("{}: {:.1}%", b.name, b.value * 100.0)
                })),
            );
        });
}

/// Both curves of each class: static solid, dynamic dashed; the mode on
/// display is drawn thicker.
fn timeline(
    ui: &mut egui::Ui,
    store: &Store,
    names: &[String],
    span: Span,
    h: f32,
    dynamic: bool,
) -> Option<f64> {
    let now = store.now();
    let face = store.selected_face();
    // The selected face's curves, also while it is not in the frame (replay).
    let dynamic_shown = dynamic && face.is_some_and(|f| f.dynamic.is_some());
    let curves = store
        .selected
        .and_then(|id| store.timelines.get(id))
        .map(|t| {
            vec![
                Curves {
                    points: &t.shown,
                    dashed: false,
                    on_display: !dynamic_shown,
                },
                Curves {
                    points: &t.dynamic,
                    dashed: true,
                    on_display: dynamic_shown,
                },
            ]
        })
        .unwrap_or_default();
    let emphasize = face.map(|f| f.displayed(dynamic).predicted);
    let timeline = match span {
        Span::Recent(secs) => ClassTimeline {
            id: "class-timeline",
            names,
            from: now - f64::from(secs),
            to: now,
            origin: now,
            marker: None,
            emphasize,
            max_gap: f64::INFINITY,
        },
        Span::Whole { duration } => ClassTimeline {
            id: "class-timeline",
            names,
            from: 0.0,
            to: duration,
            origin: 0.0,
            marker: Some(now),
            emphasize,
            max_gap: MAX_FRAME_SECS,
        },
    };
    timeline.show(ui, &curves, h)
}

/// One series of a face's curves.
pub struct Curves<'a> {
    pub points: &'a VecDeque<TimelinePoint>,
    /// Dashed: the dynamic branch's.
    pub dashed: bool,
    /// The series whose scores are on display (drawn thicker).
    pub on_display: bool,
}

/// A plot of class probabilities over time (the live window's scrolling
/// one, and replay's whole session).
pub struct ClassTimeline<'a> {
    pub id: &'a str,
    pub names: &'a [String],
    /// Times shown, on the curves' clock.
    pub from: f64,
    pub to: f64,
    /// The time drawn as x = 0 and labelled "now" (live), or 0 (replay).
    pub origin: f64,
    /// A vertical line at this time (replay's position).
    pub marker: Option<f64>,
    /// The class drawn thickest (the one predicted now).
    pub emphasize: Option<usize>,
    /// A longer gap between points breaks the lines (a face that left the
    /// picture); live, where inference may be slow, nothing breaks them.
    pub max_gap: f64,
}

impl ClassTimeline<'_> {
    /// Draws the curves; returns the time clicked or dragged to.
    pub fn show(&self, ui: &mut egui::Ui, curves: &[Curves], h: f32) -> Option<f64> {
        let (origin, span) = (self.origin, self.to - self.from);
        let live = origin == self.to;
        fixed_plot(self.id, h)
            .y_axis_min_width(28.0)
            .x_axis_formatter(move |mark, _| {
                if live && mark.value.abs() < 1e-9 {
                    "now".to_string()
                } else if span < 10.0 {
                    format!("{:.1} s", mark.value)
                } else {
                    format!("{:.0} s", mark.value)
                }
            })
            .y_axis_formatter(|mark, _| format!("{:.0}%", mark.value * 100.0))
            .show(ui, |p| {
                p.set_plot_bounds_x((self.from - origin)..=(self.to - origin));
                p.set_plot_bounds_y(0.0..=1.0);
                for c in curves {
                    self.series(p, c);
                }
                if let Some(t) = self.marker {
                    p.vline(
                        VLine::new("now", t - origin)
                            .color(Color32::WHITE)
                            .width(1.5),
                    );
                }
                let r = p.response();
                if r.clicked() || r.dragged() {
                    p.pointer_coordinate().map(|c| c.x + origin)
                } else {
                    None
                }
            })
            .inner
    }

    /// One series' line per class, broken where points are more than
    /// `max_gap` apart.
    fn series(&self, p: &mut egui_plot::PlotUi, curves: &Curves) {
        let n = self.names.len();
        let shown =
            |pt: &&TimelinePoint| pt.t >= self.from - 1.0 && pt.t <= self.to && pt.probs.len() == n;
        for (c, name) in self.names.iter().enumerate() {
            let mut width = if self.emphasize == Some(c) { 2.5 } else { 1.5 };
            if !curves.on_display {
                width *= 0.6;
            }
            let line = |run: Vec<[f64; 2]>| {
                let line = Line::new(name.as_str(), PlotPoints::new(run))
                    .color(class_color(name))
                    .width(width);
                if curves.dashed {
                    line.style(LineStyle::dashed_loose())
                } else {
                    line
                }
            };
            let mut run: Vec<[f64; 2]> = Vec::new();
            let mut prev_t = f64::NEG_INFINITY;
            for pt in curves.points.iter().filter(shown) {
                if pt.t - prev_t > self.max_gap && !run.is_empty() {
                    p.line(line(std::mem::take(&mut run)));
                }
                run.push([pt.t - self.origin, f64::from(pt.probs[c])]);
                prev_t = pt.t;
            }
            if !run.is_empty() {
                p.line(line(run));
            }
        }
    }
}
