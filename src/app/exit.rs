//! `--exit-after` and `--screenshot`: close the window after a while,
//! saving a PNG of it first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};
use eframe::egui::{self, ColorImage};

use super::SessionReport;

/// How long to wait for the renderer to hand back a screenshot.
const SHOT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the window leaves behind for `run_live`.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub report: Option<SessionReport>,
    pub screenshot_error: Option<ScreenshotError>,
}

/// Why `--screenshot` could not be written.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ScreenshotError {
    #[error("cannot write the screenshot {}: folder {} does not exist", .path.display(), .folder.display())]
    NoFolder { path: PathBuf, folder: PathBuf },
    #[error("cannot write the screenshot {}: it is a folder; give a file name ending in .png", .0.display())]
    IsFolder(PathBuf),
    #[error("the screenshot has an unexpected size")]
    Size,
    #[error("cannot write the screenshot {}: {reason}", .path.display())]
    Write { path: PathBuf, reason: String },
    #[error("the renderer did not return a screenshot within {secs} s; {} was not written", .path.display())]
    Timeout { secs: u64, path: PathBuf },
}

/// Fails early (before a window opens) when the screenshot cannot be written.
pub fn check_writable(path: &Path) -> Result<(), ScreenshotError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(ScreenshotError::NoFolder {
            path: path.to_path_buf(),
            folder: parent.to_path_buf(),
        });
    }
    if path.is_dir() {
        return Err(ScreenshotError::IsFolder(path.to_path_buf()));
    }
    Ok(())
}

enum Phase {
    Running,
    WaitingForShot {
        since: Instant,
        rx: Receiver<Arc<ColorImage>>,
    },
    Closing,
}

pub struct ExitPlan {
    after: Option<Duration>,
    screenshot: Option<PathBuf>,
    started: Instant,
    phase: Phase,
}

impl ExitPlan {
    pub fn new(after: Option<f64>, screenshot: Option<PathBuf>) -> Self {
        Self {
            after: after.map(Duration::from_secs_f64),
            screenshot,
            started: Instant::now(),
            phase: Phase::Running,
        }
    }

    /// Whether the window is about to close (the report is due).
    pub fn closing(&self) -> bool {
        matches!(self.phase, Phase::Closing)
    }

    /// Advances the plan; returns a screenshot error when saving failed.
    pub fn tick(&mut self, ctx: &egui::Context) -> Option<ScreenshotError> {
        let mut error = None;
        match &self.phase {
            Phase::Running => {
                let after = self.after?;
                if self.started.elapsed() < after {
                    ctx.request_repaint_after(after - self.started.elapsed());
                    return None;
                }
                if self.screenshot.is_some() {
                    let (tx, rx) = bounded(1);
                    let repaint = ctx.clone();
                    ctx.send_viewport_cmd(egui::ViewportCommand::Screenshot(
                        egui::ScreenshotCallback::new(move |img| {
                            let _ = tx.send(img);
                            repaint.request_repaint();
                        }),
                    ));
                    self.phase = Phase::WaitingForShot {
                        since: Instant::now(),
                        rx,
                    };
                    ctx.request_repaint();
                } else {
                    self.close(ctx);
                }
            }
            Phase::WaitingForShot { since, rx } => {
                if let Ok(img) = rx.try_recv() {
                    if let Some(path) = &self.screenshot {
                        error = save_png(&img, path).err();
                    }
                    self.close(ctx);
                } else if since.elapsed() > SHOT_TIMEOUT {
                    error = Some(ScreenshotError::Timeout {
                        secs: SHOT_TIMEOUT.as_secs(),
                        path: self
                            .screenshot
                            .clone()
                            .unwrap_or_else(|| PathBuf::from("?")),
                    });
                    self.close(ctx);
                } else {
                    ctx.request_repaint();
                }
            }
            Phase::Closing => {}
        }
        error
    }

    fn close(&mut self, ctx: &egui::Context) {
        self.phase = Phase::Closing;
        ctx.send_viewport_cmd(egui::ViewportCommand::Close);
    }
}

fn save_png(img: &ColorImage, path: &Path) -> Result<(), ScreenshotError> {
    let [w, h] = img.size;
    let rgba = image::RgbaImage::from_raw(w as u32, h as u32, img.as_raw().to_vec())
        .ok_or(ScreenshotError::Size)?;
    rgba.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| ScreenshotError::Write {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}
