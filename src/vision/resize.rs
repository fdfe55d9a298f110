//! `image::imageops::resize` with its `Triangle` filter, for RGB frames,
//! giving the same bytes faster.
//!
//! The face detector shrinks every frame it searches (a 640x480 camera to
//! 320x240, a 720p file to 640x360). `image` resamples through generic
//! pixel accessors, four channels in f32 and the horizontal pass column by
//! column, with a libm `roundf` call per value: in `cliper run` on a 720p
//! file that was 10% of the machine's CPU time, a sixth as much as the
//! detector's convolutions took. This is the same arithmetic (the same f32
//! weights, summed in the same order, rounded the same way), row by row in
//! loops compiled for the CPU's vector width: 0.65 ms against 4.2 for
//! 640x480 -> 320x240, 1.9 against 9.7 for 1280x720 -> 640x360
//! (`resize_timing`, 2-core EPYC). A test checks it byte for byte against
//! `image` at many ratios, shrinking and enlarging, and it runs again under
//! the AVX2 CPUID mask (`model::masked_cpu_tests`).

use image::RgbImage;

/// Where each output row or column reads: the first input index and the
/// weights of the inputs from there, as `image` computes them.
struct Taps {
    left: usize,
    weights: Vec<f32>,
}

/// The taps of `image`'s `Triangle` filter for `from` inputs to `to`
/// outputs (the code of its `vertical_sample` and `horizontal_sample`).
fn taps(from: u32, to: u32) -> Vec<Taps> {
    let ratio = from as f32 / to as f32;
    let sratio = if ratio < 1.0 { 1.0 } else { ratio };
    let support = sratio; // the triangle's support is 1
    (0..to)
        .map(|out| {
            let input = (out as f32 + 0.5) * ratio;
            let left = ((input - support).floor() as i64).clamp(0, i64::from(from) - 1);
            let right = ((input + support).ceil() as i64).clamp(left + 1, i64::from(from));
            let input = input - 0.5;
            let mut weights: Vec<f32> = (left..right)
                .map(|i| {
                    let x = ((i as u32) as f32 - input) / sratio;
                    if x.abs() < 1.0 {
                        1.0 - x.abs()
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut sum = 0.0;
            for w in &weights {
                sum += w;
            }
            for w in &mut weights {
                *w /= sum;
            }
            Taps {
                left: left as usize,
                weights,
            }
        })
        .collect()
}

/// `v` clamped to 0..=255 and rounded half away from zero, as `image`
/// rounds (`f32::round`, written so that it vectorises).
#[inline(always)]
fn to_u8(v: f32) -> u8 {
    let v = v.clamp(0.0, 255.0);
    let t = v.trunc();
    (if v - t >= 0.5 { t + 1.0 } else { t }) as u8
}

multiversion! {
    /// One output row: the input `lines` (rows of `blended.len()` bytes)
    /// blended down with `down` (f32, as `image` keeps its intermediate
    /// image), then across, `n` taps a pixel (`across`, `weights`).
    pub fn output_row(
        row: &mut [u8],
        lines: &[u8],
        down: &[f32],
        blended: &mut [f32],
        across: &[usize],
        weights: &[f32],
        n: usize
    ) {
        blended.fill(0.0);
        for (line, &wt) in lines.chunks_exact(blended.len()).zip(down) {
            for (b, &p) in blended.iter_mut().zip(line) {
                *b += f32::from(p) * wt;
            }
        }
        for ((px, at), wt) in row.chunks_exact_mut(3).zip(across.chunks_exact(n)).zip(weights.chunks_exact(n)) {
            let mut t = [0f32; 3];
            for (&i, &wt) in at.iter().zip(wt) {
                let v = &blended[i..i + 3];
                t[0] += v[0] * wt;
                t[1] += v[1] * wt;
                t[2] += v[2] * wt;
            }
            px[0] = to_u8(t[0]);
            px[1] = to_u8(t[1]);
            px[2] = to_u8(t[2]);
        }
    }
}

/// `img` resized to `width` x `height` with a triangle (bilinear) filter:
/// the bytes of `imageops::resize(img, width, height, FilterType::Triangle)`.
pub fn triangle(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return RgbImage::new(width, height);
    }
    if (w, h) == (width, height) {
        return img.clone();
    }
    let rows = taps(h, height);
    let cols = taps(w, width);
    let src = img.as_raw();
    let stride = w as usize * 3;
    // The columns' taps as `n` per column, the short ones padded with
    // weight 0 on a valid index: adding 0 changes no sum, and a fixed count
    // lets the compiler unroll.
    let n = cols.iter().map(|t| t.weights.len()).max().unwrap_or(1);
    let mut across = Vec::with_capacity(cols.len() * n);
    let mut weights = Vec::with_capacity(cols.len() * n);
    for t in &cols {
        for j in 0..n {
            across.push((t.left + j).min(w as usize - 1) * 3);
            weights.push(t.weights.get(j).copied().unwrap_or(0.0));
        }
    }
    let mut out = RgbImage::new(width, height);
    let mut blended = vec![0f32; stride];
    for (row, taps) in out.as_mut().chunks_exact_mut(width as usize * 3).zip(&rows) {
        let lines = &src[taps.left * stride..(taps.left + taps.weights.len()) * stride];
        output_row(
            row,
            lines,
            &taps.weights,
            &mut blended,
            &across,
            &weights,
            n,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::imageops::{self, FilterType};

    fn noise(w: u32, h: u32, seed: u32) -> RgbImage {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        RgbImage::from_fn(w, h, |x, y| {
            let mut byte = || {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 24) as u8
            };
            // Smooth ramps as well as noise: ties and near-ties of the
            // rounding come from both.
            let ramp = ((x * 7 + y * 3) % 256) as u8;
            image::Rgb([byte(), ramp, byte() / 2 + ramp / 2])
        })
    }

    #[test]
    fn the_same_bytes_as_image_at_every_ratio() {
        let cases = [
            ((640, 480), (320, 240)),
            ((1280, 720), (640, 360)),
            ((1920, 1080), (960, 540)),
            ((1920, 1080), (480, 270)),
            ((640, 480), (400, 300)),
            ((333, 217), (101, 73)),
            ((64, 48), (65, 49)),
            ((40, 30), (120, 90)),
            ((7, 5), (1, 1)),
            ((1, 1), (3, 2)),
            ((300, 2), (150, 1)),
        ];
        for (seed, ((w, h), (nw, nh))) in cases.into_iter().enumerate() {
            let img = noise(w, h, seed as u32 + 1);
            let want = imageops::resize(&img, nw, nh, FilterType::Triangle);
            let got = triangle(&img, nw, nh);
            assert_eq!(got.dimensions(), (nw, nh));
            let differ = want
                .as_raw()
                .iter()
                .zip(got.as_raw())
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(differ, 0, "{w}x{h} -> {nw}x{nh}: {differ} bytes differ");
        }
        assert_eq!(triangle(&RgbImage::new(0, 0), 4, 3).dimensions(), (4, 3));
    }

    #[test]
    #[ignore = "timing report, run with --ignored --nocapture"]
    fn resize_timing() {
        for ((w, h), (nw, nh)) in [((640, 480), (320, 240)), ((1280, 720), (640, 360))] {
            let img = noise(w, h, 9);
            let time = |f: &dyn Fn() -> RgbImage| {
                let t = std::time::Instant::now();
                for _ in 0..20 {
                    std::hint::black_box(f());
                }
                t.elapsed().as_secs_f64() * 1000.0 / 20.0
            };
            let ours = time(&|| triangle(&img, nw, nh));
            let theirs = time(&|| imageops::resize(&img, nw, nh, FilterType::Triangle));
            println!("{w}x{h} -> {nw}x{nh}: {ours:.2} ms against image's {theirs:.2} ms");
        }
    }
}
