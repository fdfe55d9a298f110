//! The built-in demo source: the public-domain astronaut portrait
//! (`tests/data/astronaut.png`, see `tests/data/README.md`) with gentle
//! synthetic camera motion (a slow pan, zoom and brightness sway), so the app
//! can be tried without a camera or a video.

use std::sync::Arc;

use image::{Rgb, RgbImage};

use super::{Frame, FrameSource, SourceError};

const PORTRAIT_PNG: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/astronaut.png"
));

/// Size of the demo frames, a common webcam resolution.
pub const DEMO_SIZE: (u32, u32) = (640, 480);
/// Frames per second of the demo.
pub const DEMO_FPS: f64 = 25.0;

/// Endless frames of the moving portrait.
pub struct DemoSource {
    portrait: RgbImage,
    index: u64,
}

impl Default for DemoSource {
    fn default() -> Self {
        Self::new()
    }
}

impl DemoSource {
    pub fn new() -> Self {
        // The PNG is part of the binary and checked by the tests; a grey
        // frame keeps the demo alive should it ever fail to decode.
        let portrait = image::load_from_memory(PORTRAIT_PNG)
            .map(|i| i.to_rgb8())
            .unwrap_or_else(|_| RgbImage::from_pixel(512, 512, Rgb([90, 90, 90])));
        Self { portrait, index: 0 }
    }

    /// The frame at time `t` seconds.
    pub fn render(&self, t: f64) -> RgbImage {
        let (w, h) = DEMO_SIZE;
        let (sw, sh) = self.portrait.dimensions();
        // Slow, incommensurate sways so the motion never visibly repeats.
        let zoom = 1.03 + 0.04 * (t * 0.23).sin();
        let scale = 1.4 * zoom * (sw.max(sh) as f64 / 512.0).recip();
        let cx = sw as f64 * 0.5 + 20.0 * (t * 0.31).sin();
        let cy = sh as f64 * 0.41 + 22.0 * (t * 0.19 + 1.0).sin();
        let gain = 1.0 + 0.10 * (t * 0.47).sin();
        let inv = 1.0 / scale;
        let src = self.portrait.as_raw();
        let stride = sw as usize * 3;
        // Source column and weight for each output column, computed once a
        // frame; the blend runs in 8-bit fixed point.
        let cols: Vec<(usize, u32)> = (0..w)
            .map(|x| {
                let u = (cx + (x as f64 - w as f64 / 2.0) * inv).clamp(0.0, sw as f64 - 1.001);
                let x0 = u.floor();
                (x0 as usize * 3, ((u - x0) * 256.0) as u32)
            })
            .collect();
        let gain = (gain * 256.0) as u32;
        let mut out = RgbImage::new(w, h);
        for (y, row) in out.as_mut().chunks_exact_mut(w as usize * 3).enumerate() {
            let v = (cy + (y as f64 - h as f64 / 2.0) * inv).clamp(0.0, sh as f64 - 1.001);
            let y0 = v.floor();
            let fy = ((v - y0) * 256.0) as u32;
            let top = &src[y0 as usize * stride..];
            let bottom = &top[stride..];
            for (px, &(x3, fx)) in row.chunks_exact_mut(3).zip(&cols) {
                for c in 0..3 {
                    let (a, b) = (top[x3 + c] as u32, top[x3 + 3 + c] as u32);
                    let (d, e) = (bottom[x3 + c] as u32, bottom[x3 + 3 + c] as u32);
                    let t = a * (256 - fx) + b * fx;
                    let btm = d * (256 - fx) + e * fx;
                    let val = (t * (256 - fy) + btm * fy) >> 16;
                    px[c] = ((val * gain) >> 8).min(255) as u8;
                }
            }
        }
        out
    }
}

impl FrameSource for DemoSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        let index = self.index;
        self.index += 1;
        let t = index as f64 / DEMO_FPS;
        Ok(Some(Frame {
            image: Arc::new(self.render(t)),
            index,
            t,
        }))
    }
    fn frame_count(&self) -> Option<u64> {
        None
    }
    fn fps(&self) -> f64 {
        DEMO_FPS
    }
    fn name(&self) -> String {
        "demo".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "timing report, run with --ignored --nocapture"]
    fn render_timing() {
        let demo = DemoSource::new();
        let t = std::time::Instant::now();
        for i in 0..50 {
            std::hint::black_box(demo.render(i as f64 * 0.04));
        }
        println!(
            "demo frame: {:.2} ms",
            t.elapsed().as_secs_f64() * 1000.0 / 50.0
        );
    }

    #[test]
    fn frames_move_and_keep_the_face() {
        let demo = DemoSource::new();
        assert_eq!(
            demo.portrait.dimensions(),
            (512, 512),
            "embedded PNG decodes"
        );
        let a = demo.render(0.0);
        let b = demo.render(3.0);
        assert_eq!(a.dimensions(), DEMO_SIZE);
        let diff: u64 = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| x.abs_diff(*y) as u64)
            .sum();
        assert!(diff > 1_000_000, "frames 3 s apart barely differ ({diff})");
        for t in [0.0, 7.0, 21.0] {
            let faces = crate::vision::faces::FaceDetector::new(Default::default())
                .unwrap()
                .detect(&demo.render(t));
            assert_eq!(faces.len(), 1, "t={t}: {faces:?}");
        }
    }
}
