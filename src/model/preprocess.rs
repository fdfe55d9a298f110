//! Image preprocessing for the CLIP vision tower, bit-compatible with the
//! reference pipeline: OpenAI CLIP's `_transform` (torchvision `Resize(size,
//! BICUBIC)`, `CenterCrop(size)`, `ToTensor()`, `Normalize(mean, std)`) run on
//! PIL images.
//!
//! The checkpoints were trained and evaluated on pixels produced by Pillow's
//! resampler, so "a good bicubic" is not enough: `resize_bicubic` reimplements
//! Pillow's `ImagingResample` (libImaging/Resample.c) including its fixed-point
//! rounding, and is checked byte for byte against Pillow by the fixtures that
//! `tools/make_preprocess_fixture.py` writes into `tests/fixtures/preprocess/`.
//!
//! This module also owns the normalisation constants; everything else in the
//! project imports `CLIP_MEAN` / `CLIP_STD` from here.
//!
//! One known, deliberate difference: OpenAI's transform converts to RGB *after*
//! the crop, while `preprocess` converts first. For RGB and grey inputs the two
//! orders give identical pixels; for images with partial transparency Pillow
//! would resample in premultiplied alpha, which a face crop never needs.

use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};

/// Per-channel (R, G, B) mean of OpenAI's CLIP training images, on the 0..1 scale.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// Per-channel (R, G, B) standard deviation matching [`CLIP_MEAN`].
// OpenAI's published digits, kept verbatim (more than f32 holds) so they can be
// compared by eye and by grep with the Python reference; they round to the
// same f32 that torchvision's Normalize uses (the fixture test checks this).
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Pillow keeps 8 bits for the result and 2 for the overshoot of the bicubic
/// kernel's negative lobes, leaving 22 fractional bits in an `int`.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// A Pillow resampling filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Filter {
    /// `BICUBIC` (support 2).
    Bicubic,
    /// `BILINEAR` (support 1): torchvision's default `Resize` on PIL images,
    /// which DFER-CLIP's and Exp-CLIP's pipelines use.
    Bilinear,
}

impl Filter {
    /// Support radius in output pixels before scaling.
    fn support(self) -> f64 {
        match self {
            Filter::Bicubic => 2.0,
            Filter::Bilinear => 1.0,
        }
    }
    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Bicubic => bicubic_filter(x),
            // Pillow's `bilinear_filter`.
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
        }
    }
}

/// Keys' cubic convolution kernel with `a = -0.5`, written with the same
/// operation order as Pillow's `bicubic_filter` so that every double rounds
/// the same way.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point resampling weights for one axis: for output index `i`, the
/// source window starts at `starts[i]` and its weights are
/// `weights[i * window..][..lens[i]]`.
struct AxisCoefficients {
    window: usize,
    starts: Vec<usize>,
    lens: Vec<usize>,
    weights: Vec<i32>,
}

impl AxisCoefficients {
    /// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the
    /// full-image box `(0, in_size)`.
    fn new(in_size: u32, out_size: u32, filter: Filter) -> Self {
        // Pillow receives the box as C floats and divides in double.
        let scale = f64::from(in_size as f32) / f64::from(out_size);
        // Downscaling widens the kernel so every source pixel contributes.
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let window = support.ceil() as usize * 2 + 1;
        let inv_filterscale = 1.0 / filterscale;

        let out_len = out_size as usize;
        let mut starts = Vec::with_capacity(out_len);
        let mut lens = Vec::with_capacity(out_len);
        let mut weights = vec![0i32; out_len * window];
        let mut k = vec![0f64; window];
        for (i, row) in weights.chunks_exact_mut(window).enumerate() {
            let center = (i as f64 + 0.5) * scale;
            // `as i32` truncates toward zero exactly like C's `(int)` cast,
            // which is how Pillow "rounds" the window ends.
            let xmin = ((center - support + 0.5) as i32).max(0);
            let xmax = ((center + support + 0.5) as i32).min(in_size as i32);
            let len = (xmax - xmin).max(0) as usize;

            let mut sum = 0.0;
            for (x, w) in k.iter_mut().enumerate().take(len) {
                *w = filter.eval((x as f64 + f64::from(xmin) - center + 0.5) * inv_filterscale);
                sum += *w;
            }
            for (w, fixed) in k.iter().zip(row.iter_mut()).take(len) {
                let w = if sum != 0.0 { w / sum } else { *w };
                // Round half away from zero, then truncate: Pillow's
                // `(int)(±0.5 + k * (1 << PRECISION_BITS))`.
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                *fixed = if w < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                };
            }
            starts.push(xmin as usize);
            lens.push(len);
        }
        Self {
            window,
            starts,
            lens,
            weights,
        }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let row = &self.weights[i * self.window..(i + 1) * self.window];
        (self.starts[i], &row[..self.lens[i]])
    }
}

/// Pillow's `clip8`: drop the fractional bits (arithmetic shift, i.e. floor)
/// and saturate to a byte.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow starts every accumulator at one half so the final shift rounds.
const ROUNDING_BIAS: i32 = 1 << (PRECISION_BITS - 1);

/// Resizes an 8-bit RGB image exactly like Pillow's
/// `Image.resize((new_w, new_h), Image.BICUBIC)`.
///
/// Separable, with an 8-bit (clipped) intermediate image between the passes;
/// an axis whose size does not change is not resampled at all. The pass order
/// follows Pillow 13: horizontal first, unless the height shrinks by more than
/// twice as many pixels as the width does (older Pillow always went
/// horizontal first; the two orders can differ by one level on some pixels).
/// An empty source gives a black image of the requested size (Pillow refuses
/// to resize it).
pub fn resize_bicubic(img: &RgbImage, new_w: u32, new_h: u32) -> RgbImage {
    resize_with(img, new_w, new_h, Filter::Bicubic)
}

/// Pillow's `Image.resize((new_w, new_h), Image.BILINEAR)`, the same way.
pub fn resize_bilinear(img: &RgbImage, new_w: u32, new_h: u32) -> RgbImage {
    resize_with(img, new_w, new_h, Filter::Bilinear)
}

fn resize_with(img: &RgbImage, new_w: u32, new_h: u32, filter: Filter) -> RgbImage {
    let (src_w, src_h) = img.dimensions();
    if (src_w, src_h) == (new_w, new_h) {
        return img.clone();
    }
    let mut out = RgbImage::new(new_w, new_h);
    if new_w == 0 || new_h == 0 || src_w == 0 || src_h == 0 {
        return out;
    }

    let src = img.as_raw();
    let width = src_w as usize;
    match (src_w != new_w, src_h != new_h) {
        (true, false) => {
            let horizontal = AxisCoefficients::new(src_w, new_w, filter);
            resample_rows(src, width, 0, &horizontal, &mut out);
        }
        (false, true) => {
            let vertical = AxisCoefficients::new(src_h, new_h, filter);
            resample_columns(src, width, 0, &vertical, &mut out);
        }
        _ => {
            let horizontal = AxisCoefficients::new(src_w, new_w, filter);
            let vertical = AxisCoefficients::new(src_h, new_h, filter);
            let height_shrink = i64::from(src_h) - i64::from(new_h);
            let width_shrink = i64::from(src_w) - i64::from(new_w);
            if height_shrink > 0 && height_shrink > 2 * width_shrink {
                let mut mid = vec![0u8; width * new_h as usize * 3];
                resample_columns(src, width, 0, &vertical, &mut mid);
                resample_rows(&mid, width, 0, &horizontal, &mut out);
            } else {
                // Only the source rows the vertical pass reads get the
                // horizontal pass; vertical windows are then relative to the
                // first of them.
                let last = new_h as usize - 1;
                let first_row = vertical.starts[0];
                let rows = vertical.starts[last] + vertical.lens[last] - first_row;
                let mut mid = vec![0u8; new_w as usize * rows * 3];
                resample_rows(src, width, first_row, &horizontal, &mut mid);
                resample_columns(&mid, new_w as usize, first_row, &vertical, &mut out);
            }
        }
    }
    out
}

/// Horizontal pass: fills `out` (packed RGB, one row per output row, as wide
/// as `coeffs` has outputs) from the source rows starting at `first_row`.
fn resample_rows(
    src: &[u8],
    src_w: usize,
    first_row: usize,
    coeffs: &AxisCoefficients,
    out: &mut [u8],
) {
    let out_stride = coeffs.starts.len() * 3;
    for (y, out_row) in out.chunks_exact_mut(out_stride).enumerate() {
        let src_row = &src[(first_row + y) * src_w * 3..][..src_w * 3];
        for (x, px) in out_row.chunks_exact_mut(3).enumerate() {
            let (start, taps) = coeffs.taps(x);
            let mut acc = [ROUNDING_BIAS; 3];
            for (&w, s) in taps.iter().zip(src_row[start * 3..].chunks_exact(3)) {
                for (a, &v) in acc.iter_mut().zip(s) {
                    // C `int` arithmetic; PRECISION_BITS leaves headroom so
                    // it never wraps, wrapping_* just mirrors C exactly.
                    *a = a.wrapping_add(i32::from(v).wrapping_mul(w));
                }
            }
            for (p, a) in px.iter_mut().zip(acc) {
                *p = clip8(a);
            }
        }
    }
}

/// Vertical pass: fills `out` (packed RGB, `width` wide, one row per output of
/// `coeffs`) from `src`, whose row 0 is source row `first_row`.
fn resample_columns(
    src: &[u8],
    width: usize,
    first_row: usize,
    coeffs: &AxisCoefficients,
    out: &mut [u8],
) {
    let stride = width * 3;
    for (y, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (start, taps) = coeffs.taps(y);
        let start = start - first_row;
        for (i, o) in out_row.iter_mut().enumerate() {
            let mut acc = ROUNDING_BIAS;
            for (k, &w) in taps.iter().enumerate() {
                let s = src[(start + k) * stride + i];
                acc = acc.wrapping_add(i32::from(s).wrapping_mul(w));
            }
            *o = clip8(acc);
        }
    }
}

/// Python's `round(d / 2.0)` for a non-negative integer `d`: halves go to the
/// even neighbour.
fn half_round_even(d: u32) -> u32 {
    let q = d / 2;
    if d % 2 == 1 && q % 2 == 1 {
        q + 1
    } else {
        q
    }
}

/// torchvision's `Resize(size)` followed by `CenterCrop(size)` on a PIL image.
///
/// The shorter side becomes `size` and the longer `int(size * long / short)`;
/// an image already at that size is not resampled. The crop is centred with
/// `int(round((dim - size) / 2.0))`. Should the resized image still be smaller
/// than the crop (only for an empty input), the missing border is black, as
/// torchvision's padding does.
pub fn resize_shorter_center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let resized = if short == 0 {
        img.clone()
    } else {
        // Python computes `size * long` exactly and divides in double; the
        // product of two u32 is exact in f64 for any image that fits in memory.
        let new_long = (f64::from(size) * f64::from(long) / f64::from(short)) as u32;
        let (new_w, new_h) = if w <= h {
            (size, new_long)
        } else {
            (new_long, size)
        };
        if (new_w, new_h) == (w, h) {
            img.clone()
        } else {
            resize_bicubic(img, new_w, new_h)
        }
    };
    center_crop(&resized, size)
}

/// torchvision's `CenterCrop(size)`: zero-pads first when the image is smaller
/// than the crop (left/top get the floor of half the deficit).
fn center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if (w, h) == (size, size) {
        return img.clone();
    }
    // Work in the padded image's coordinates; pixels outside the source are
    // the padding's zeros.
    let pad_left = size.saturating_sub(w) / 2;
    let pad_top = size.saturating_sub(h) / 2;
    let padded_w = w.max(size);
    let padded_h = h.max(size);
    let left = half_round_even(padded_w - size);
    let top = half_round_even(padded_h - size);

    let mut out = RgbImage::new(size, size);
    for (x, y, px) in out.enumerate_pixels_mut() {
        let sx = i64::from(x) + i64::from(left) - i64::from(pad_left);
        let sy = i64::from(y) + i64::from(top) - i64::from(pad_top);
        if (0..i64::from(w)).contains(&sx) && (0..i64::from(h)).contains(&sy) {
            *px = *img.get_pixel(sx as u32, sy as u32);
        }
    }
    out
}

/// torchvision's `ToTensor()` then `Normalize(CLIP_MEAN, CLIP_STD)`: returns
/// `[3, h, w]` in CHW order, computed in f32 with the same two roundings
/// (`x / 255`, then `(x - mean) / std`).
pub fn to_normalized_chw(img: &RgbImage) -> Vec<f32> {
    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0f32; 3 * plane];
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in img.pixels().enumerate() {
        for (c, dst) in [&mut r[i], &mut g[i], &mut b[i]].into_iter().enumerate() {
            *dst = (f32::from(px[c]) / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    out
}

/// torchvision's `ToTensor()` alone: `[3, h, w]` CHW on the 0..1 scale.
pub fn to_unit_chw(img: &RgbImage) -> Vec<f32> {
    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = f32::from(px[c]) / 255.0;
        }
    }
    out
}

/// How a model's images are prepared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preprocessing {
    /// OpenAI CLIP's (and CLIPER's): shorter side to the input size
    /// (bicubic), centre crop, normalise with [`CLIP_MEAN`]/[`CLIP_STD`].
    #[default]
    Clip,
    /// DFER-CLIP's and Exp-CLIP's test transform, `Resize((S, S))` (bilinear,
    /// the aspect ratio is not kept) then `ToTensor()`: pixels on the 0..1
    /// scale, not normalised. Their published accuracies were measured so.
    Squash,
}

impl Preprocessing {
    pub fn as_str(self) -> &'static str {
        match self {
            Preprocessing::Clip => "clip",
            Preprocessing::Squash => "squash",
        }
    }

    /// `3 * size * size` floats, `[3, size, size]` CHW.
    pub fn apply(self, img: &RgbImage, size: u32) -> Vec<f32> {
        match self {
            Preprocessing::Clip => to_normalized_chw(&resize_shorter_center_crop(img, size)),
            Preprocessing::Squash => to_unit_chw(&resize_bilinear(img, size, size)),
        }
    }
}

/// The whole CLIP image transform: to RGB, shorter side to `size`, centre
/// crop, normalise. Returns `3 * size * size` floats, `[3, size, size]` CHW.
pub fn preprocess(img: &DynamicImage, size: u32) -> Vec<f32> {
    let rgb = img.to_rgb8();
    to_normalized_chw(&resize_shorter_center_crop(&rgb, size))
}

/// [`preprocess`] as a tensor on `device`: `[3, size, size]` f32.
pub fn preprocess_tensor(
    img: &DynamicImage,
    size: u32,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let side = size as usize;
    Tensor::from_vec(preprocess(img, size), (3, side, side), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::path::{Path, PathBuf};

    #[derive(Deserialize)]
    struct Manifest {
        mean: [f32; 3],
        std: [f32; 3],
        resize: Vec<ResizeCase>,
        pipeline: Vec<PipelineCase>,
    }

    #[derive(Deserialize)]
    struct ResizeCase {
        input: String,
        width: u32,
        height: u32,
        expected: String,
    }

    #[derive(Deserialize)]
    struct PipelineCase {
        input: String,
        size: u32,
        expected: String,
    }

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess")
    }

    fn manifest() -> Manifest {
        let path = fixture_dir().join("manifest.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run tools/make_preprocess_fixture.py",
                path.display()
            )
        });
        serde_json::from_str(&text).expect("manifest.json parses")
    }

    fn load_rgb(name: &str) -> RgbImage {
        let path = fixture_dir().join(name);
        image::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .to_rgb8()
    }

    fn load_f32(name: &str) -> Vec<f32> {
        let bytes = std::fs::read(fixture_dir().join(name)).expect("fixture readable");
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    #[test]
    fn constants_match_the_fixture_generator() {
        let m = manifest();
        assert_eq!(m.mean, CLIP_MEAN);
        assert_eq!(m.std, CLIP_STD);
    }

    #[test]
    fn bicubic_resize_matches_pillow_byte_for_byte() {
        let m = manifest();
        assert!(m.resize.len() >= 10, "fixture lists too few resize cases");
        for case in &m.resize {
            let input = load_rgb(&case.input);
            let expected = load_rgb(&case.expected);
            let got = resize_bicubic(&input, case.width, case.height);
            assert_eq!(got.dimensions(), expected.dimensions(), "{}", case.expected);
            let mismatches = got
                .as_raw()
                .iter()
                .zip(expected.as_raw())
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(
                mismatches, 0,
                "{}: {mismatches} bytes differ",
                case.expected
            );
        }
    }

    #[test]
    fn full_transform_matches_torchvision() {
        let m = manifest();
        assert!(
            m.pipeline.len() >= 5,
            "fixture lists too few pipeline cases"
        );
        for case in &m.pipeline {
            let input = DynamicImage::ImageRgb8(load_rgb(&case.input));
            let expected = load_f32(&case.expected);
            let got = preprocess(&input, case.size);
            assert_eq!(got.len(), expected.len(), "{}", case.expected);
            let worst = got
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-6, "{}: max abs diff {worst}", case.expected);
        }
    }

    #[test]
    fn odd_offsets_round_half_to_even() {
        // Python: round(0.5) = 0, round(1.5) = 2, round(2.5) = 2, round(3.5) = 4.
        let got: Vec<u32> = (0..8).map(half_round_even).collect();
        assert_eq!(got, [0, 0, 1, 2, 2, 2, 3, 4]);
    }

    #[test]
    fn one_pixel_wide_image_becomes_a_vertical_ramp_copy() {
        let img = RgbImage::from_fn(1, 5, |_, y| image::Rgb([y as u8 * 50, 7, 200]));
        let out = resize_shorter_center_crop(&img, 4);
        assert_eq!(out.dimensions(), (4, 4));
        // Every column repeats the single source column: nothing to interpolate across.
        for y in 0..4 {
            let first = *out.get_pixel(0, y);
            for x in 1..4 {
                assert_eq!(*out.get_pixel(x, y), first, "row {y}");
            }
            assert_eq!(first[1], 7);
            assert_eq!(first[2], 200);
        }
    }

    #[test]
    fn square_image_at_target_size_is_untouched() {
        let img = RgbImage::from_fn(6, 6, |x, y| image::Rgb([(x * 40) as u8, (y * 40) as u8, 3]));
        assert_eq!(resize_shorter_center_crop(&img, 6), img);
        assert_eq!(resize_bicubic(&img, 6, 6), img);
        let chw = to_normalized_chw(&img);
        let expected_r01 = (40.0f32 / 255.0 - CLIP_MEAN[0]) / CLIP_STD[0];
        assert_eq!(chw[1], expected_r01);
        assert_eq!(chw[36 + 6], (40.0f32 / 255.0 - CLIP_MEAN[1]) / CLIP_STD[1]);
    }

    #[test]
    fn constant_image_stays_constant_through_resampling() {
        let img = RgbImage::from_pixel(13, 7, image::Rgb([10, 128, 255]));
        for (w, h) in [(5, 3), (40, 21), (13, 30), (2, 7)] {
            let out = resize_bicubic(&img, w, h);
            assert!(out.pixels().all(|p| p.0 == [10, 128, 255]), "{w}x{h}");
        }
    }

    #[test]
    fn empty_input_gives_black_padding_not_a_panic() {
        let out = resize_shorter_center_crop(&RgbImage::new(0, 0), 3);
        assert_eq!(out, RgbImage::new(3, 3));
        assert_eq!(
            resize_bicubic(&RgbImage::new(0, 4), 2, 2),
            RgbImage::new(2, 2)
        );
        assert!(preprocess(&DynamicImage::new_rgb8(5, 5), 0).is_empty());
    }

    #[test]
    fn tensor_has_chw_shape() {
        let img = DynamicImage::ImageRgb8(RgbImage::new(30, 20));
        let t = preprocess_tensor(&img, 8, &Device::Cpu).expect("tensor builds");
        assert_eq!(t.dims(), &[3, 8, 8]);
        let v: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).expect("readable");
        assert_eq!(v, preprocess(&img, 8));
    }
}
