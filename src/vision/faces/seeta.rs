//! The SeetaFace frontal cascade (a funnel-structured cascade of LAB-boosted
//! and SURF-MLP classifiers, Wu et al.) through the pure-Rust `rustface`
//! port: the light fallback detector. It finds frontal faces only.
//!
//! Threading: `rustface` hands out its detector as `Box<dyn Detector>` without
//! a `Send` bound, so this backend (and the [`super::FaceDetector`] holding
//! it) is not `Send`. With its default `rayon` feature, `rustface` also
//! parallelises feature computation on rayon's current pool.

use image::{imageops, GrayImage, RgbImage};
use rustface::{Detector, ImageData};

use super::{FaceBox, FaceDetectorConfig, FaceError};

/// The SeetaFace frontal detection model (from the `rustface` 0.1.7 crate,
/// BSD-2-Clause, see `assets/SEETAFACE_RUSTFACE_LICENSE.txt`).
const SEETA_FRONTAL_MODEL: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/seeta_fd_frontal_v1.0.bin"
));

/// Side in pixels of the detector's sliding window. `rustface` 0.1.7 fixes it at
/// 40 and starts its image pyramid at scale 1, so at the resolution it is given
/// it cannot find faces smaller than this.
pub const WINDOW: u32 = 40;

pub(super) struct Seeta {
    detector: Box<dyn Detector>,
}

impl Seeta {
    pub(super) fn new(cfg: &FaceDetectorConfig) -> Result<Self, FaceError> {
        let model = rustface::read_model(std::io::Cursor::new(SEETA_FRONTAL_MODEL))
            .map_err(FaceError::Model)?;
        let mut s = Self {
            detector: rustface::create_detector_with_model(model),
        };
        s.apply(cfg);
        Ok(s)
    }

    /// Values were validated, so none of these setters can panic. The
    /// minimum face size is handled by `detection_scale`, not by rustface.
    pub(super) fn apply(&mut self, cfg: &FaceDetectorConfig) {
        self.detector
            .set_score_thresh(f64::from(cfg.score_threshold));
        self.detector.set_pyramid_scale_factor(cfg.pyramid_scale);
        self.detector
            .set_slide_window_step(cfg.slide_step, cfg.slide_step);
    }

    /// Faces in `img` searched at `scale`, in `img`'s pixels.
    pub(super) fn detect(&mut self, img: &RgbImage, scale: f32) -> Vec<FaceBox> {
        let (width, height) = img.dimensions();
        let det_w = (width as f32 * scale).round() as u32;
        let det_h = (height as f32 * scale).round() as u32;
        // rustface panics on an empty image, and finds nothing in one smaller
        // than its window, so skip both.
        if det_w < WINDOW || det_h < WINDOW {
            return Vec::new();
        }

        // Grey first, then resize: resizing one channel is a third of the work.
        let gray = imageops::grayscale(img);
        let gray: GrayImage = if (det_w, det_h) == (width, height) {
            gray
        } else {
            imageops::resize(&gray, det_w, det_h, imageops::FilterType::Triangle)
        };
        let found = self
            .detector
            .detect(&ImageData::new(gray.as_raw(), det_w, det_h));

        // Per-axis ratios, so rounding of the detection size does not skew boxes.
        let sx = width as f32 / det_w as f32;
        let sy = height as f32 / det_h as f32;
        found
            .iter()
            .filter_map(|face| {
                let b = face.bbox();
                let (x0, x1) = map_span(b.x(), b.width(), sx, width);
                let (y0, y1) = map_span(b.y(), b.height(), sy, height);
                (x1 > x0 && y1 > y0).then(|| FaceBox {
                    x: x0,
                    y: y0,
                    w: x1 - x0,
                    h: y1 - y0,
                    score: face.score() as f32,
                    landmarks: None,
                })
            })
            .collect()
    }
}

/// Maps a detection-resolution span `[start, start + len)` to full resolution
/// and clamps it to `[0, limit]`. rustface boxes can start at negative
/// coordinates and run past the image edge.
fn map_span(start: i32, len: u32, ratio: f32, limit: u32) -> (u32, u32) {
    let lo = (start as f32 * ratio).round();
    let hi = ((start as f32 + len as f32) * ratio).round();
    let clamp = |v: f32| v.clamp(0.0, limit as f32) as u32;
    (clamp(lo), clamp(hi))
}
