//! The selected face's scores: a bar chart of the class probabilities and
//! a scrolling timeline of the last N seconds of each class (the classes of
//! the bank in use).

use eframe::egui::{self, RichText};
use egui_plot::{Bar, BarChart, Line, LineStyle, Plot, PlotPoint, PlotPoints, Text};

use super::palette::class_color;
use super::store::Store;
use crate::pipeline::dynamic::DynamicMode;

/// The classes on display: the selected face's (its scores carry the bank
/// they were made with), else the bank's, else CLIPER's.
fn classes(store: &Store) -> Vec<String> {
    if let Some(f) = store.selected_face() {
        return f.shown.layout.classes().to_vec();
    }
    match &store.bank {
        Some(b) => b.layout.classes().to_vec(),
        None => crate::model::cliper::expressions::BankLayout::cliper()
            .classes()
            .to_vec(),
    }
}

pub fn show(ui: &mut egui::Ui, store: &Store, timeline_secs: f32, height: f32, dynamic: bool) {
    let face = store.selected_face();
    let names = classes(store);
    ui.horizontal(|ui| {
        match face {
            Some(h) => {
                let shown = h.displayed(dynamic);
                let c = shown.predicted;
                ui.label(RichText::new(format!("Face #{}", h.id)).strong());
                ui.label(
                    RichText::new(format!("{} {:.0}%", shown.predicted_name(), shown.probs[c] * 100.0))
                        .color(class_color(shown.predicted_name()))
                        .strong(),
                );
                if dynamic {
                    let what = match &h.dynamic {
                        Some((_, DynamicMode::Temporal)) => "dynamic: temporal module".to_string(),
                        Some((_, DynamicMode::MeanOfFeatures)) => {
                            "dynamic: the head on the mean of the window's features (Exp-CLIP)"
                                .to_string()
                        }
                        Some((_, DynamicMode::MeanOfStatic)) => {
                            "dynamic: no trained temporal weights, mean of the window's static scores"
                                .to_string()
                        }
                        None => format!("dynamic: filling the window ({} frames), static shown", h.window_fill),
                    };
                    ui.label(RichText::new(what).small().weak());
                }
            }
            None => {
                ui.label(RichText::new("No face selected").weak());
            }
        }
        // One legend for both plots, in class order.
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            for name in names.iter().rev() {
                ui.label(RichText::new(name.as_str()).color(class_color(name)).small());
            }
        });
    });
    let plot_h = (height - 28.0).max(120.0);
    ui.horizontal(|ui| {
        let w = ui.available_width();
        let bar_w = (w * 0.4).max(220.0);
        ui.allocate_ui(egui::vec2(bar_w, plot_h), |ui| {
            bars(ui, store, &names, plot_h, dynamic)
        });
        ui.allocate_ui(egui::vec2(ui.available_width(), plot_h), |ui| {
            timeline(ui, store, &names, timeline_secs, plot_h, dynamic)
        });
    });
}

fn bars(ui: &mut egui::Ui, store: &Store, names: &[String], h: f32, dynamic: bool) {
    let probs = store
        .selected_face()
        .map(|f| f.displayed(dynamic).probs.clone())
        .unwrap_or_else(|| vec![0.0; names.len()]);
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
    Plot::new("class-probabilities")
        .height(h)
        .allow_drag(false)
        .allow_zoom(false)
        .allow_scroll(false)
        .allow_boxed_zoom(false)
        .allow_double_click_reset(false)
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
fn timeline(ui: &mut egui::Ui, store: &Store, names: &[String], secs: f32, h: f32, dynamic: bool) {
    let now = store.now();
    let span = f64::from(secs);
    let face = store.selected_face();
    Plot::new("class-timeline")
        .height(h)
        .allow_drag(false)
        .allow_zoom(false)
        .allow_scroll(false)
        .allow_boxed_zoom(false)
        .allow_double_click_reset(false)
        .y_axis_min_width(28.0)
        .x_axis_formatter(|mark, _| {
            if mark.value.abs() < 1e-9 {
                "now".to_string()
            } else {
                format!("{:.0} s", mark.value)
            }
        })
        .y_axis_formatter(|mark, _| format!("{:.0}%", mark.value * 100.0))
        .show(ui, |p| {
            p.set_plot_bounds_x(-span..=0.0);
            p.set_plot_bounds_y(0.0..=1.0);
            if let Some(f) = face {
                let predicted = f.displayed(dynamic).predicted;
                for (series, is_dynamic) in [(&f.timeline, false), (&f.dynamic_timeline, true)] {
                    if series.is_empty() {
                        continue;
                    }
                    let on_display = is_dynamic == (dynamic && f.dynamic.is_some());
                    for (c, name) in names.iter().enumerate() {
                        let pts: Vec<[f64; 2]> = series
                            .iter()
                            .filter(|(t, p)| now - t <= span && p.len() == names.len())
                            .map(|(t, p)| [t - now, f64::from(p[c])])
                            .collect();
                        let mut width = if c == predicted { 2.5 } else { 1.5 };
                        if !on_display {
                            width *= 0.6;
                        }
                        let mut line = Line::new(name.as_str(), PlotPoints::new(pts))
                            .color(class_color(name))
                            .width(width);
                        if is_dynamic {
                            line = line.style(LineStyle::dashed_loose());
                        }
                        p.line(line);
                    }
                }
            }
        });
}
