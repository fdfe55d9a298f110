//! The status bar: capture and inference rates, per-stage latency, the
//! device and the weights in use; and the UI's own frame rate.

use std::collections::VecDeque;
use std::time::Instant;

use eframe::egui::{self, Color32, RichText};

use super::store::{ModelState, SourceState, Store};

/// The UI's own frame rate and cost.
#[derive(Default)]
pub struct UiStats {
    frames: VecDeque<Instant>,
    began: Option<Instant>,
    ui_ms: VecDeque<f32>,
}

impl UiStats {
    pub fn begin(&mut self) {
        let now = Instant::now();
        self.frames.push_back(now);
        while self
            .frames
            .front()
            .is_some_and(|t| now.duration_since(*t).as_secs_f32() > 2.0)
        {
            self.frames.pop_front();
        }
        self.began = Some(now);
    }

    pub fn end(&mut self) {
        if let Some(b) = self.began.take() {
            if self.ui_ms.len() == 120 {
                self.ui_ms.pop_front();
            }
            self.ui_ms.push_back(b.elapsed().as_secs_f32() * 1000.0);
        }
    }

    /// Frames drawn per second over the last two seconds.
    pub fn fps(&self) -> f32 {
        match (self.frames.front(), self.frames.back()) {
            (Some(a), Some(b)) if self.frames.len() > 1 => {
                (self.frames.len() - 1) as f32 / b.duration_since(*a).as_secs_f32().max(1e-3)
            }
            _ => 0.0,
        }
    }

    /// Mean time spent in `ui()` (building the frame, not rendering it).
    pub fn mean_ui_ms(&self) -> f32 {
        if self.ui_ms.is_empty() {
            0.0
        } else {
            self.ui_ms.iter().sum::<f32>() / self.ui_ms.len() as f32
        }
    }
}

pub fn show(ui: &mut egui::Ui, store: &Store, stats: &UiStats) {
    let t = &store.timings;
    let dim = ui.visuals().weak_text_color();
    ui.horizontal(|ui| {
        let sep = |ui: &mut egui::Ui| {
            ui.label(RichText::new("·").color(dim));
        };
        match &store.source_state {
            SourceState::Playing => {
                ui.label(format!("capture {:.1} fps", t.capture_fps));
            }
            SourceState::Opening(_) => {
                ui.label("opening source…");
            }
            SourceState::Ended { frames } => {
                ui.label(format!("source ended ({frames} frames)"));
            }
            SourceState::Failed { .. } => {
                ui.label(RichText::new("source failed").color(Color32::LIGHT_RED));
            }
        }
        sep(ui);
        ui.label(format!("inference {:.1} fps", t.inference_fps))
            .on_hover_text("Frames scored per second (all faces of a frame in one batch)");
        sep(ui);
        let decode = if t.decode_ms > 0.0 {
            format!("decode {:.1} ms · ", t.decode_ms)
        } else {
            String::new()
        };
        // Detection paced beside a CPU model: say on how many frames.
        let paced = match store.detected_share() {
            Some(share) if share < 0.995 => format!(" (on {:.0}% of frames)", share * 100.0),
            _ => String::new(),
        };
        ui.label(format!(
            "{decode}detect {:.0} ms{paced} · crop {:.1} ms · encode {:.0} ms · score {:.1} ms",
            t.detect_ms, t.crop_ms, t.encode_ms, t.score_ms
        ))
        .on_hover_text(
            "Per-stage time for the latest frame: video decoding (FFmpeg), face detection \
             (downscaled frame), cropping the faces into the model's input, the CLIP vision tower's forward on all crops, logits against the descriptors. \
             With the model on the CPU, detection runs on the frames the model takes and only \
             a little more, leaving the model its cores; the frames between keep the last boxes",
        );
        sep(ui);
        let lag = |v: Option<f32>| v.map_or("–".to_string(), |v| format!("{v:.0} ms"));
        ui.label(format!(
            "to screen {} · score lag {}",
            lag(store.capture_to_screen.median()),
            lag(store.score_lag.median())
        ))
        .on_hover_text(
            "Median over recent frames: capture to the frame on screen with its boxes, \
             and capture to its scores on screen",
        );
        sep(ui);
        ui.label(format!("UI {:.0} fps", stats.fps()));
        ui.with_layout(
            egui::Layout::right_to_left(egui::Align::Center),
            |ui| match &store.model {
                ModelState::Loading => {
                    ui.spinner();
                    ui.label("loading model…");
                }
                ModelState::Ready(info) => {
                    let name = info
                        .weights
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let parent = info
                        .weights
                        .parent()
                        .and_then(|p| p.file_name())
                        .map(|n| format!("{}/", n.to_string_lossy()))
                        .unwrap_or_default();
                    // Shortened, and cut to the room the rates leave: on a
                    // narrow window the full names ran over them.
                    ui.add(
                        egui::Label::new(
                            RichText::new(format!("{} {}", info.device, short_kernel(&info.kernel)))
                                .strong(),
                        )
                        .truncate(),
                    )
                    .on_hover_text(format!(
                        "{} {}: the image encoder's device, precision and kernel \
                         (--precision; cliper bench compares them)",
                        info.device, info.kernel
                    ));
                    ui.add(egui::Label::new(RichText::new(format!("{parent}{name}")).color(dim)).truncate())
                        .on_hover_text(format!(
                            "weights: {}\nloaded in {:.1} s",
                            info.weights.display(),
                            info.load_secs
                        ));
                }
                ModelState::Failed(e) => {
                    ui.label(RichText::new("model failed to load").color(Color32::LIGHT_RED))
                        .on_hover_text(e);
                }
            },
        );
    });
}

/// A kernel's name without oneDNN's implementation names (`brg:avx512_core_vnni`):
/// "q8 onednn, attention bf16". The hover text has the whole name.
fn short_kernel(kernel: &str) -> String {
    kernel
        .split(", ")
        .map(|part| {
            part.split(' ')
                .filter(|w| !w.contains(':'))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_kernel_is_shortened_to_precision_and_library() {
        assert_eq!(
            super::short_kernel(
                "q8 onednn brg:avx512_core_vnni, attention bf16 brg:avx512_core_bf16"
            ),
            "q8 onednn, attention bf16"
        );
        assert_eq!(super::short_kernel("q8 avx512-vnni"), "q8 avx512-vnni");
    }
}
