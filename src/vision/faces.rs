//! Face detection and face crops.
//!
//! Detection uses the SeetaFace frontal cascade (a funnel-structured cascade of
//! LAB-boosted and SURF-MLP classifiers, Wu et al.) through the pure-Rust
//! `rustface` port. The model file is embedded in the binary, so detection
//! needs no download and no path. Crops are square and centred on the face so
//! the expression model sees faces framed like the aligned RAF-DB crops it was
//! trained on.
//!
//! Threading: `rustface` hands out its detector as `Box<dyn Detector>` without
//! a `Send` bound, so [`FaceDetector`] is not `Send`. Build it on the thread that
//! uses it (construction only parses the embedded model, under a millisecond)
//! and send the `Copy` [`FaceDetectorConfig`] across threads instead. With its
//! default `rayon` feature, `rustface` also parallelises feature computation on
//! rayon's global pool.

use image::{imageops, GrayImage, RgbImage};
use rustface::{Detector, ImageData};

/// The SeetaFace frontal detection model (from the `rustface` 0.1.7 crate,
/// BSD-2-Clause, see `assets/SEETAFACE_RUSTFACE_LICENSE.txt`).
const SEETA_FRONTAL_MODEL: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/seeta_fd_frontal_v1.0.bin"
));

/// Side in pixels of the detector's sliding window. `rustface` 0.1.7 fixes it at
/// 40 and starts its image pyramid at scale 1, so at the resolution it is given
/// it cannot find faces smaller than this.
const DETECTOR_WINDOW: u32 = 40;

/// Margin used for the crops fed to the expression model, as a fraction of the
/// detected box side added on each side (see [`square_crop`]).
///
/// SeetaFace boxes are tight and sit high: on the astronaut test photo the box
/// runs from the top of the forehead to between the lips and the chin, cheek to
/// cheek, so without margin the chin is cut. RAF-DB's aligned crops, which
/// CLIPER is trained on, show the whole face, chin included, with a thin band of
/// hair and background around it. A quarter of the box side on each side (crop
/// side 1.5x the box side) reaches a little below the chin and into the hair,
/// with some background beside the cheeks, which matches that framing. Tried on
/// the same photo: 0.15 leaves the chin on the bottom edge; 0.4 takes in the
/// whole hairdo, the suit's neck ring and more background than face.
pub const DEFAULT_FACE_MARGIN: f32 = 0.25;

/// Errors from building a [`FaceDetector`].
#[derive(Debug, thiserror::Error)]
pub enum FaceError {
    /// The embedded model did not parse; only a broken build can cause this.
    #[error(
        "the embedded face detection model could not be read ({0}); \
         assets/seeta_fd_frontal_v1.0.bin is damaged: restore it from the rustface 0.1.7 crate and rebuild"
    )]
    Model(#[source] std::io::Error),
    /// A setting is outside what the detector accepts.
    #[error("face detector setting `{field}` = {value} is invalid: {expected}")]
    InvalidConfig {
        /// Name of the [`FaceDetectorConfig`] field.
        field: &'static str,
        /// The rejected value, as text.
        value: String,
        /// What the field accepts.
        expected: &'static str,
    },
}

/// A detected face in full-frame pixel coordinates, clamped to the frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaceBox {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width, at least 1.
    pub w: u32,
    /// Height, at least 1.
    pub h: u32,
    /// Detector confidence (SeetaFace cascade score; higher is more face-like,
    /// always at least [`FaceDetectorConfig::score_threshold`]).
    pub score: f32,
}

impl FaceBox {
    /// Centre of the box, in pixels.
    pub fn center(&self) -> (f32, f32) {
        (
            self.x as f32 + self.w as f32 / 2.0,
            self.y as f32 + self.h as f32 / 2.0,
        )
    }
}

/// Settings of the face detector.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaceDetectorConfig {
    /// Smallest face side, in full-frame pixels, worth finding. The detector
    /// cannot see faces smaller than its 40 px window at the resolution it runs
    /// on, so `detect` shrinks the frame until this size maps onto the window
    /// (never enlarging it), which is where most of the speed comes from. At or
    /// below 40 it has no effect; when `max_side` shrinks the frame more, the
    /// smallest face found is 40 px divided by that shrink factor.
    pub min_face_size: u32,
    /// Cascade score a detection needs; higher means fewer false positives and
    /// more missed faces. `rustface` suggests 0.95, 2.8 or 4.5; must be > 0.
    pub score_threshold: f32,
    /// Ratio between successive levels of the image pyramid, in `0.01..=0.99`.
    /// Closer to 1 finds more face sizes at the cost of time.
    pub pyramid_scale: f32,
    /// Step in pixels of the sliding window (at detection resolution), at least 1.
    pub slide_step: u32,
    /// Frames whose longer side exceeds this are downscaled to it before
    /// detection and the boxes are mapped back. At least 40.
    pub max_side: u32,
}

impl Default for FaceDetectorConfig {
    /// Defaults for a live webcam view of one or a few people at desk distance.
    ///
    /// Detection time grows with the pixels searched. Measured on the 2-core
    /// development VM (release build, median of 21 runs, see the ignored
    /// `timing_report` test): about 117 ms for a full 640x480 frame, 78 ms at
    /// 480x360, 39 ms at 320x240. With `min_face_size` 64 a 640x480 frame is
    /// searched at 400x300 (64 px faces map onto the 40 px window), about 65 ms;
    /// `max_side` 480 caps the cost for HD cameras, where the minimum face alone
    /// would leave the frame large (a 1280x720 frame is searched at 480x270).
    /// A face 60 cm from a typical webcam is about 110 px wide at 640x480 and
    /// about 70 px at 1 m, so 64 px still finds someone leaning back, and smaller
    /// faces give the 224 px expression model too little to read anyway.
    /// Score 2.0, pyramid 0.8 and step 4 are rustface's own example settings.
    fn default() -> Self {
        Self {
            min_face_size: 64,
            score_threshold: 2.0,
            pyramid_scale: 0.8,
            slide_step: 4,
            max_side: 480,
        }
    }
}

impl FaceDetectorConfig {
    /// Checks every field against what `rustface` accepts; it panics on values
    /// outside these ranges, so they are rejected here instead.
    pub fn validate(&self) -> Result<(), FaceError> {
        let invalid = |field, value: String, expected| FaceError::InvalidConfig {
            field,
            value,
            expected,
        };
        if !(self.score_threshold.is_finite() && self.score_threshold > 0.0) {
            return Err(invalid(
                "score_threshold",
                self.score_threshold.to_string(),
                "a number above 0 (typical: 0.95 to 4.5)",
            ));
        }
        if !(0.01..=0.99).contains(&self.pyramid_scale) {
            return Err(invalid(
                "pyramid_scale",
                self.pyramid_scale.to_string(),
                "a ratio between 0.01 and 0.99 (typical: 0.8)",
            ));
        }
        if self.slide_step == 0 {
            return Err(invalid(
                "slide_step",
                self.slide_step.to_string(),
                "at least 1 pixel (typical: 4)",
            ));
        }
        if self.max_side < DETECTOR_WINDOW {
            return Err(invalid(
                "max_side",
                self.max_side.to_string(),
                "at least 40 pixels, the detector's window (typical: 480)",
            ));
        }
        Ok(())
    }

    /// Factor by which a `width` x `height` frame is shrunk before detection
    /// (1 means full resolution; frames are never enlarged).
    fn detection_scale(&self, width: u32, height: u32) -> f32 {
        let longer = width.max(height).max(1) as f32;
        let by_side = self.max_side as f32 / longer;
        // rustface 0.1.7 ignores its own min_face_size (the line that would use
        // it is commented out), so honour it here: faces below it need not fit
        // the window, which allows a smaller frame.
        let by_min_face = DETECTOR_WINDOW as f32 / self.min_face_size.max(1) as f32;
        by_side.min(by_min_face).min(1.0)
    }
}

/// Finds faces in RGB frames.
///
/// Not `Send` (see the module documentation): create it on the thread that runs it.
pub struct FaceDetector {
    detector: Box<dyn Detector>,
    cfg: FaceDetectorConfig,
}

impl std::fmt::Debug for FaceDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaceDetector")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl FaceDetector {
    /// Builds the detector from the embedded SeetaFace model.
    pub fn new(cfg: FaceDetectorConfig) -> Result<Self, FaceError> {
        cfg.validate()?;
        let model = rustface::read_model(std::io::Cursor::new(SEETA_FRONTAL_MODEL))
            .map_err(FaceError::Model)?;
        let mut detector = Self {
            detector: rustface::create_detector_with_model(model),
            cfg,
        };
        detector.apply_config();
        Ok(detector)
    }

    /// The settings in use.
    pub fn config(&self) -> &FaceDetectorConfig {
        &self.cfg
    }

    /// Changes the settings without reloading the model.
    pub fn set_config(&mut self, cfg: FaceDetectorConfig) -> Result<(), FaceError> {
        cfg.validate()?;
        self.cfg = cfg;
        self.apply_config();
        Ok(())
    }

    fn apply_config(&mut self) {
        // Values were validated, so none of these setters can panic. The
        // minimum face size is handled by `detection_scale`, not by rustface.
        self.detector
            .set_score_thresh(f64::from(self.cfg.score_threshold));
        self.detector
            .set_pyramid_scale_factor(self.cfg.pyramid_scale);
        self.detector
            .set_slide_window_step(self.cfg.slide_step, self.cfg.slide_step);
    }

    /// Detects faces in `img`, sorted left to right by their left edge.
    ///
    /// Boxes are in `img`'s pixel coordinates and clamped to it. Frames too
    /// small to hold a detector window give no faces.
    pub fn detect(&mut self, img: &RgbImage) -> Vec<FaceBox> {
        let (width, height) = img.dimensions();
        let scale = self.cfg.detection_scale(width, height);
        let det_w = (width as f32 * scale).round() as u32;
        let det_h = (height as f32 * scale).round() as u32;
        // rustface panics on an empty image, and finds nothing in one smaller
        // than its window, so skip both.
        if det_w < DETECTOR_WINDOW || det_h < DETECTOR_WINDOW {
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
        let mut faces: Vec<FaceBox> = found
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
                })
            })
            .collect();
        faces.sort_by_key(|f| f.x);
        faces
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

/// Square region `(x, y, side, side)` around `face`, for cropping.
///
/// `margin` is the fraction of the box's longer side added on each side, so the
/// crop side is `max(w, h) * (1 + 2 * margin)` (0 gives a square just covering
/// the box; negative values tighten it). The square is centred on the box, then
/// shifted inward to lie inside the image; it only shrinks when the image is
/// smaller than it, and then its side is the image's shorter side (the region
/// stays square unless that clamps it to the image). It is at least 1x1 for a
/// non-empty image; for an empty image it is empty.
pub fn square_crop(img_w: u32, img_h: u32, face: &FaceBox, margin: f32) -> (u32, u32, u32, u32) {
    let wanted = face.w.max(face.h) as f32 * (1.0 + 2.0 * margin);
    // `max` also turns a NaN from a NaN margin into 1.
    let side = wanted.round().max(1.0).min(img_w.min(img_h) as f32) as u32;
    let (cx, cy) = face.center();
    let place = |centre: f32, limit: u32| {
        let room = limit.saturating_sub(side) as f32;
        (centre - side as f32 / 2.0).round().clamp(0.0, room) as u32
    };
    (place(cx, img_w), place(cy, img_h), side, side)
}

/// Crops `face` out of `img` as a square with `margin` around it (see
/// [`square_crop`]); use [`DEFAULT_FACE_MARGIN`] for the expression model.
pub fn crop_face(img: &RgbImage, face: &FaceBox, margin: f32) -> RgbImage {
    let (x, y, w, h) = square_crop(img.width(), img.height(), face, margin);
    imageops::crop_imm(img, x, y, w, h).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn astronaut() -> RgbImage {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/astronaut.png");
        image::open(path)
            .expect("tests/data/astronaut.png should be a readable PNG")
            .to_rgb8()
    }

    fn detector() -> FaceDetector {
        FaceDetector::new(FaceDetectorConfig::default()).expect("default config is valid")
    }

    /// Where the face of the astronaut is, as (x0, y0, x1, y1), checked by eye:
    /// from cheek to cheek and from the top of the forehead to the chin.
    const ASTRONAUT_FACE: (f32, f32, f32, f32) = (175.0, 65.0, 280.0, 185.0);

    fn inside(point: (f32, f32), region: (f32, f32, f32, f32)) -> bool {
        let (x0, y0, x1, y1) = region;
        (x0..=x1).contains(&point.0) && (y0..=y1).contains(&point.1)
    }

    #[test]
    fn finds_the_astronaut() {
        let img = astronaut();
        let faces = detector().detect(&img);
        assert_eq!(faces.len(), 1, "{faces:?}");
        let face = faces[0];
        assert!(inside(face.center(), ASTRONAUT_FACE), "{face:?}");
        // The face is about 100 px wide; a box far off that is a wrong detection.
        assert!((60..=160).contains(&face.w), "{face:?}");
        assert!(face.score >= FaceDetectorConfig::default().score_threshold);
    }

    #[test]
    fn full_resolution_and_downscaled_detection_agree() {
        let img = astronaut();
        let full_cfg = FaceDetectorConfig {
            max_side: 4096,
            min_face_size: 40,
            ..FaceDetectorConfig::default()
        };
        let full = FaceDetector::new(full_cfg).unwrap().detect(&img);
        let small_cfg = FaceDetectorConfig {
            max_side: 256,
            ..FaceDetectorConfig::default()
        };
        let small = FaceDetector::new(small_cfg).unwrap().detect(&img);
        assert_eq!((full.len(), small.len()), (1, 1), "{full:?} {small:?}");
        let (a, b) = (full[0].center(), small[0].center());
        // Boxes mapped back from half resolution land within a few pixels.
        assert!(
            (a.0 - b.0).abs() < 12.0 && (a.1 - b.1).abs() < 12.0,
            "{full:?} {small:?}"
        );
    }

    #[test]
    fn two_astronauts_side_by_side_come_left_to_right() {
        let one = astronaut();
        let mirrored = imageops::flip_horizontal(&one);
        let mut pair = RgbImage::new(1024, 512);
        imageops::replace(&mut pair, &one, 0, 0);
        imageops::replace(&mut pair, &mirrored, 512, 0);
        let faces = detector().detect(&pair);
        assert_eq!(faces.len(), 2, "{faces:?}");
        assert!(faces[0].x < faces[1].x);
        assert!(inside(faces[0].center(), ASTRONAUT_FACE), "{faces:?}");
        // The mirrored face sits at 512 + (512 - x) for each x of the original.
        let (x0, y0, x1, y1) = ASTRONAUT_FACE;
        let mirrored_face = (1024.0 - x1, y0, 1024.0 - x0, y1);
        assert!(inside(faces[1].center(), mirrored_face), "{faces:?}");
    }

    #[test]
    fn blank_frames_have_no_faces() {
        let mut det = detector();
        for value in [0u8, 128, 255] {
            let img = RgbImage::from_pixel(640, 480, Rgb([value; 3]));
            assert!(det.detect(&img).is_empty(), "uniform {value}");
        }
    }

    #[test]
    fn empty_and_tiny_frames_have_no_faces_and_do_not_panic() {
        let mut det = detector();
        let full_res = FaceDetectorConfig {
            min_face_size: 0,
            ..FaceDetectorConfig::default()
        };
        let mut full_res = FaceDetector::new(full_res).unwrap();
        // Sizes around the 40 px window, where rustface's pyramid arithmetic
        // (unsigned `width - 40`) would underflow if we let a smaller image through.
        let sides = [0u32, 1, 2, 3, 19, 20, 39, 40, 41, 47, 50, 63, 64, 65, 80];
        for &w in &sides {
            for &h in &sides {
                let img = RgbImage::from_pixel(w, h, Rgb([90, 60, 40]));
                assert!(det.detect(&img).is_empty(), "{w}x{h}");
                assert!(full_res.detect(&img).is_empty(), "{w}x{h}");
            }
        }
        // A thin strip: the long side fits, the short side is below the window.
        let strip = RgbImage::from_pixel(2000, 10, Rgb([200, 200, 200]));
        assert!(det.detect(&strip).is_empty());
    }

    #[test]
    fn invalid_settings_are_errors_not_panics() {
        let base = FaceDetectorConfig::default();
        let bad = [
            FaceDetectorConfig {
                score_threshold: 0.0,
                ..base
            },
            FaceDetectorConfig {
                score_threshold: f32::NAN,
                ..base
            },
            FaceDetectorConfig {
                pyramid_scale: 1.0,
                ..base
            },
            FaceDetectorConfig {
                pyramid_scale: f32::NAN,
                ..base
            },
            FaceDetectorConfig {
                slide_step: 0,
                ..base
            },
            FaceDetectorConfig {
                max_side: 39,
                ..base
            },
        ];
        for cfg in bad {
            let err = FaceDetector::new(cfg).expect_err("config should be rejected");
            assert!(matches!(err, FaceError::InvalidConfig { .. }), "{err}");
        }
        let mut det = detector();
        assert!(det.set_config(bad[0]).is_err());
        assert_eq!(*det.config(), base);
    }

    #[test]
    fn detection_scale_honours_max_side_and_min_face() {
        let cfg = FaceDetectorConfig::default();
        // 640x480 with max_side 480 -> 0.75; min face 64 -> 0.625 wins.
        assert!((cfg.detection_scale(640, 480) - 0.625).abs() < 1e-6);
        let no_min = FaceDetectorConfig {
            min_face_size: 0,
            ..cfg
        };
        assert!((no_min.detection_scale(640, 480) - 0.75).abs() < 1e-6);
        // Small frames are never enlarged.
        assert_eq!(no_min.detection_scale(320, 240), 1.0);
        assert_eq!(no_min.detection_scale(0, 0), 1.0);
    }

    fn face(x: u32, y: u32, w: u32, h: u32) -> FaceBox {
        FaceBox {
            x,
            y,
            w,
            h,
            score: 5.0,
        }
    }

    /// The crop region lies inside the image and is square unless the image's
    /// shorter side limits it.
    fn check_crop(img_w: u32, img_h: u32, f: &FaceBox, margin: f32) {
        let (x, y, w, h) = square_crop(img_w, img_h, f, margin);
        assert!(w >= 1 && h >= 1, "empty crop for {f:?} in {img_w}x{img_h}");
        assert!(x + w <= img_w && y + h <= img_h, "{f:?} in {img_w}x{img_h}");
        assert_eq!(w, h, "{f:?} in {img_w}x{img_h}");
        let wanted = (f.w.max(f.h) as f32 * (1.0 + 2.0 * margin))
            .round()
            .max(1.0) as u32;
        assert_eq!(w, wanted.min(img_w.min(img_h)), "{f:?} in {img_w}x{img_h}");
    }

    #[test]
    fn square_crop_is_centred_when_there_is_room() {
        // 100x100 box at (200, 100), margin 0.25 -> side 150, centre (250, 150).
        assert_eq!(
            square_crop(640, 480, &face(200, 100, 100, 100), 0.25),
            (175, 75, 150, 150)
        );
        // A non-square box gives a square on its longer side.
        assert_eq!(
            square_crop(640, 480, &face(200, 100, 60, 100), 0.0),
            (180, 100, 100, 100)
        );
    }

    #[test]
    fn square_crop_shifts_inward_at_corners_and_shrinks_only_when_needed() {
        // Top-left corner: shifted to (0, 0), full size kept.
        assert_eq!(
            square_crop(640, 480, &face(0, 0, 80, 80), 0.25),
            (0, 0, 120, 120)
        );
        // Bottom-right corner: shifted so it ends at the image edge.
        assert_eq!(
            square_crop(640, 480, &face(600, 440, 40, 40), 0.5),
            (560, 400, 80, 80)
        );
        // Bigger than the image's shorter side: shrinks to it, still square.
        assert_eq!(
            square_crop(640, 480, &face(100, 0, 480, 480), 0.25),
            (100, 0, 480, 480)
        );
        let mut cases = Vec::new();
        for (img_w, img_h) in [(640, 480), (480, 640), (50, 50), (1, 1), (1, 300), (300, 2)] {
            for (fw, fh) in [(0, 0), (1, 1), (40, 40), (120, 90), (700, 700)] {
                for (fx, fy) in [(0, 0), (img_w / 2, img_h / 2), (img_w, img_h)] {
                    for margin in [-0.5, 0.0, DEFAULT_FACE_MARGIN, 1.0, f32::NAN] {
                        cases.push((img_w, img_h, face(fx, fy, fw, fh), margin));
                    }
                }
            }
        }
        for (img_w, img_h, f, margin) in cases {
            if margin.is_nan() {
                // Only the invariants hold; the wanted side is meaningless.
                let (x, y, w, h) = square_crop(img_w, img_h, &f, margin);
                assert!(w == h && w >= 1 && x + w <= img_w && y + h <= img_h);
            } else {
                check_crop(img_w, img_h, &f, margin);
            }
        }
        assert_eq!(square_crop(0, 0, &face(0, 0, 10, 10), 0.25), (0, 0, 0, 0));
    }

    #[test]
    fn crop_face_has_the_region_size() {
        let img = astronaut();
        let faces = detector().detect(&img);
        assert_eq!(faces.len(), 1, "{faces:?}");
        let crop = crop_face(&img, &faces[0], DEFAULT_FACE_MARGIN);
        let (_, _, side, _) = square_crop(512, 512, &faces[0], DEFAULT_FACE_MARGIN);
        assert_eq!(crop.dimensions(), (side, side));
        // Whole face at the default margin: the crop covers the checked face region.
        let (x, y, _, _) = square_crop(512, 512, &faces[0], DEFAULT_FACE_MARGIN);
        let (fx0, fy0, fx1, fy1) = ASTRONAUT_FACE;
        assert!(x as f32 <= fx0 + 10.0 && (x + side) as f32 >= fx1 - 10.0);
        assert!(y as f32 <= fy0 + 10.0 && (y + side) as f32 >= fy1 - 20.0);
    }

    #[test]
    fn config_and_boxes_can_cross_threads() {
        fn assert_send<T: Send + Sync>() {}
        assert_send::<FaceDetectorConfig>();
        assert_send::<FaceBox>();
    }

    /// Prints detection times and saves crops for eyeballing the margin; run with
    /// `cargo test --release --lib faces::tests::timing_report -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing_report() {
        let img = astronaut();
        let mut det = detector();
        let faces = det.detect(&img);
        println!("astronaut 512x512: {faces:?}");
        for (i, margin) in [0.0, 0.15, DEFAULT_FACE_MARGIN, 0.4].iter().enumerate() {
            let path = std::env::temp_dir().join(format!("cliper_face_crop_{i}_{margin}.png"));
            if let Some(f) = faces.first() {
                crop_face(&img, f, *margin).save(&path).unwrap();
                println!("saved {}", path.display());
            }
        }
        // Median of repeated runs: this machine may be shared with builds.
        let median_ms = |det: &mut FaceDetector, frame: &RgbImage| {
            det.detect(frame);
            let mut times: Vec<f64> = (0..21)
                .map(|_| {
                    let t = std::time::Instant::now();
                    det.detect(frame);
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            times.sort_by(f64::total_cmp);
            times[times.len() / 2]
        };
        for (w, h) in [(640, 480), (480, 360), (320, 240)] {
            let frame = imageops::resize(&img, w, h, imageops::FilterType::Triangle);
            for max_side in [4096, 640, 480, 320] {
                let cfg = FaceDetectorConfig {
                    max_side,
                    min_face_size: 0,
                    ..FaceDetectorConfig::default()
                };
                let mut det = FaceDetector::new(cfg).unwrap();
                let n = det.detect(&frame).len();
                let ms = median_ms(&mut det, &frame);
                println!("{w}x{h} max_side {max_side}, no min face: {ms:.1} ms, {n} faces");
            }
            let mut det = detector();
            let n = det.detect(&frame).len();
            let ms = median_ms(&mut det, &frame);
            println!("{w}x{h} default config: {ms:.1} ms, {n} faces");
        }
        let t = std::time::Instant::now();
        let _ = detector();
        println!(
            "FaceDetector::new: {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
}
