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
        // Each output row blends its two source rows first, over the span
        // of columns it reads (a loop that vectorises), then across: the
        // same sums as blending across first, so the same pixels, in 1.5
        // ms a frame against 2.6 (`render_timing`, 2-core EPYC). The demo
        // renders 25 of them a second beside the model.
        let (lo, hi) = (cols[0].0, cols[cols.len() - 1].0 + 6);
        let mut blended = vec![0u32; hi - lo];
        for (y, row) in out.as_mut().chunks_exact_mut(w as usize * 3).enumerate() {
            let v = (cy + (y as f64 - h as f64 / 2.0) * inv).clamp(0.0, sh as f64 - 1.001);
            let y0 = v.floor();
            let fy = ((v - y0) * 256.0) as u32;
            let top = &src[y0 as usize * stride + lo..][..hi - lo];
            let bottom = &src[(y0 as usize + 1) * stride + lo..][..hi - lo];
            for ((b, &t), &d) in blended.iter_mut().zip(top).zip(bottom) {
                *b = t as u32 * (256 - fy) + d as u32 * fy;
            }
            for (px, &(x3, fx)) in row.chunks_exact_mut(3).zip(&cols) {
                let at = &blended[x3 - lo..x3 - lo + 6];
                for c in 0..3 {
                    let val = (at[c] * (256 - fx) + at[3 + c] * fx) >> 16;
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

    /// The first version of `render`: blends across, then down.
    fn render_across_first(demo: &DemoSource, t: f64) -> RgbImage {
        let (w, h) = DEMO_SIZE;
        let (sw, sh) = demo.portrait.dimensions();
        let zoom = 1.03 + 0.04 * (t * 0.23).sin();
        let scale = 1.4 * zoom * (sw.max(sh) as f64 / 512.0).recip();
        let cx = sw as f64 * 0.5 + 20.0 * (t * 0.31).sin();
        let cy = sh as f64 * 0.41 + 22.0 * (t * 0.19 + 1.0).sin();
        let gain = ((1.0 + 0.10 * (t * 0.47).sin()) * 256.0) as u32;
        let inv = 1.0 / scale;
        let src = demo.portrait.as_raw();
        let stride = sw as usize * 3;
        RgbImage::from_fn(w, h, |x, y| {
            let u = (cx + (x as f64 - w as f64 / 2.0) * inv).clamp(0.0, sw as f64 - 1.001);
            let v = (cy + (y as f64 - h as f64 / 2.0) * inv).clamp(0.0, sh as f64 - 1.001);
            let (x0, y0) = (u.floor(), v.floor());
            let (fx, fy) = (((u - x0) * 256.0) as u32, ((v - y0) * 256.0) as u32);
            let (x3, top) = (x0 as usize * 3, y0 as usize * stride);
            Rgb(std::array::from_fn(|c| {
                let px = |row: usize, dx: usize| src[row + x3 + dx + c] as u32;
                let t = px(top, 0) * (256 - fx) + px(top, 3) * fx;
                let b = px(top + stride, 0) * (256 - fx) + px(top + stride, 3) * fx;
                let val = (t * (256 - fy) + b * fy) >> 16;
                ((val * gain) >> 8).min(255) as u8
            }))
        })
    }

    #[test]
    fn blending_down_first_gives_the_same_pixels() {
        let demo = DemoSource::new();
        for t in [0.0, 0.04, 3.3, 7.0, 21.0, 1234.5] {
            assert!(
                demo.render(t) == render_across_first(&demo, t),
                "t={t}: the frames differ"
            );
        }
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
