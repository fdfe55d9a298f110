//! The first-run screen, shown when no CLIP weights are found: a Download
//! button (the `cliper weights fetch` path, on a thread, with progress) and
//! where to put the files by hand.

use std::path::Path;

use crossbeam_channel::{unbounded, Receiver};
use eframe::egui::{self, Color32, RichText};

use super::Action;
use crate::model::weights::{self, HUB_REPO, LOCAL_WEIGHTS_DIR, WEIGHTS_ENV};

enum Progress {
    Bytes { file: String, done: u64, total: u64 },
    Done(Result<std::path::PathBuf, weights::DownloadError>),
}

#[derive(Default)]
pub struct FirstRun {
    /// Why the weights were not found.
    pub missing: Option<String>,
    rx: Option<Receiver<Progress>>,
    status: Option<(String, u64, u64)>,
    error: Option<String>,
    /// When the last bytes arrived (a stall is shown after a few seconds).
    last_progress: Option<std::time::Instant>,
}

impl FirstRun {
    /// Starts the download on a thread.
    pub fn download(&mut self, ctx: &egui::Context) {
        if self.rx.is_some() {
            return;
        }
        let (tx, rx) = unbounded();
        let ctx = ctx.clone();
        let progress_tx = tx.clone();
        let progress_ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("cliper-download".into())
            .spawn(move || {
                // Watched: a stalled connection ends with a message naming
                // the host instead of a bar that never moves.
                let result = weights::fetch_watched(move |file, done, total| {
                    let _ = progress_tx.send(Progress::Bytes {
                        file: file.to_string(),
                        done,
                        total,
                    });
                    progress_ctx.request_repaint();
                });
                let _ = tx.send(Progress::Done(result));
                ctx.request_repaint();
            });
        match spawned {
            Ok(_) => {
                self.rx = Some(rx);
                self.error = None;
                self.status = Some(("starting".into(), 0, 0));
                self.last_progress = Some(std::time::Instant::now());
            }
            Err(e) => self.error = Some(format!("cannot start the download: {e}")),
        }
    }

    /// Takes progress messages; the weights file once the download is done.
    pub fn poll(&mut self) -> Option<std::path::PathBuf> {
        let rx = self.rx.as_ref()?;
        let mut finished = None;
        while let Ok(p) = rx.try_recv() {
            match p {
                Progress::Bytes { file, done, total } => {
                    self.status = Some((file, done, total));
                    self.last_progress = Some(std::time::Instant::now());
                }
                Progress::Done(Ok(path)) => finished = Some(path),
                Progress::Done(Err(e)) => {
                    self.error = Some(e.to_string());
                    self.status = None;
                    self.rx = None;
                    return None;
                }
            }
        }
        if finished.is_some() {
            self.rx = None;
            self.status = None;
        }
        finished
    }
}

pub fn show(ui: &mut egui::Ui, state: &mut FirstRun, actions: &mut Vec<Action>) {
    egui::CentralPanel::default().show(ui, |ui| {
        ui.vertical_centered(|ui| {
            ui.add_space((ui.available_height() * 0.12).min(120.0));
            ui.heading(RichText::new("cliper needs the CLIP ViT-B/16 weights").size(26.0));
            ui.add_space(6.0);
            ui.label(format!(
                "About 600 MB from the Hugging Face hub ({HUB_REPO}), downloaded once and cached."
            ));
            ui.add_space(16.0);
            let downloading = state.rx.is_some();
            if ui
                .add_enabled(
                    !downloading,
                    egui::Button::new(RichText::new("Download the weights").size(18.0))
                        .min_size(egui::vec2(260.0, 40.0)),
                )
                .clicked()
            {
                actions.push(Action::Download);
            }
            if let Some((file, done, total)) = &state.status {
                ui.add_space(8.0);
                let frac = if *total > 0 {
                    *done as f32 / *total as f32
                } else {
                    0.0
                };
                ui.add(
                    egui::ProgressBar::new(frac)
                        .desired_width(420.0)
                        .show_percentage()
                        .animate(true),
                );
                ui.label(format!(
                    "{file}: {:.1} / {:.1} MB",
                    *done as f64 / 1e6,
                    *total as f64 / 1e6
                ));
                let quiet = state.last_progress.map_or(0, |t| t.elapsed().as_secs());
                if quiet >= 5 {
                    ui.colored_label(
                        Color32::YELLOW,
                        format!(
                            "no data from {} for {quiet} s (it gives up after {} s)",
                            weights::hub_endpoint(),
                            weights::DOWNLOAD_STALL_SECS
                        ),
                    );
                    ui.ctx()
                        .request_repaint_after(std::time::Duration::from_secs(1));
                }
            }
            if let Some(e) = &state.error {
                ui.add_space(8.0);
                ui.colored_label(Color32::LIGHT_RED, e);
            }
            ui.add_space(24.0);
            ui.label(RichText::new("No network here? Put the files in place by hand:").strong());
            let dir = std::env::current_dir()
                .map(|d| d.join(LOCAL_WEIGHTS_DIR))
                .unwrap_or_else(|_| Path::new(LOCAL_WEIGHTS_DIR).to_path_buf());
            ui.label(format!(
                "download model.safetensors and config.json from https://huggingface.co/{HUB_REPO}"
            ));
            ui.horizontal(|ui| {
                ui.add_space((ui.available_width() - 520.0).max(0.0) / 2.0);
                ui.label("and put them in");
                let mut text = dir.display().to_string();
                ui.add(egui::TextEdit::singleline(&mut text).desired_width(320.0));
            });
            ui.label(format!(
                "or start cliper with --weights FILE|DIR, or set ${WEIGHTS_ENV}."
            ));
            ui.add_space(10.0);
            if ui.button("Look again").clicked() {
                actions.push(Action::RecheckWeights);
            }
            if let Some(m) = &state.missing {
                ui.add_space(14.0);
                ui.label(RichText::new(m).weak());
            }
        });
    });
}
