//! Training augmentation (`docs/model.md` section 5): bicubic resize
//! and center crop, colour jitter (brightness 0.4, hue 0.3), random
//! horizontal flip, random resized crop (scale 0.15-1, ratio 0.3-3.3), then
//! CLIP normalisation. Test images get the plain preprocessing.

use image::{imageops, RgbImage};

use crate::model::preprocess;
use crate::model::rng::SplitMix64;

#[derive(Clone, Copy, Debug)]
pub struct AugmentConfig {
    pub brightness: f32,
    pub hue: f32,
    pub flip: bool,
    pub scale: (f32, f32),
    pub ratio: (f32, f32),
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            brightness: 0.4,
            hue: 0.3,
            flip: true,
            scale: (0.15, 1.0),
            ratio: (0.3, 3.3),
        }
    }
}

fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let h = if d == 0.0 {
        0.0
    } else if max == r {
        ((g - b) / d).rem_euclid(6.0) / 6.0
    } else if max == g {
        ((b - r) / d + 2.0) / 6.0
    } else {
        ((r - g) / d + 4.0) / 6.0
    };
    let s = if max == 0.0 { 0.0 } else { d / max };
    (h, s, max)
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h.rem_euclid(1.0) * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match i as i32 % 6 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// Brightness factor in [1-b, 1+b] and hue shift in [-h, h] (fractions of
/// the colour circle), as torchvision's ColorJitter.
pub fn color_jitter(img: &mut RgbImage, brightness: f32, hue_shift: f32) {
    for p in img.pixels_mut() {
        let [r, g, b] = p.0.map(|c| (c as f32 / 255.0 * brightness).clamp(0.0, 1.0));
        let (r, g, b) = if hue_shift != 0.0 {
            let (h, s, v) = rgb_to_hsv(r, g, b);
            hsv_to_rgb(h + hue_shift, s, v)
        } else {
            (r, g, b)
        };
        p.0 = [r, g, b].map(|c| (c * 255.0).round().clamp(0.0, 255.0) as u8);
    }
}

/// torchvision's RandomResizedCrop parameters: (x, y, w, h).
pub fn random_resized_crop_box(
    w: u32,
    h: u32,
    scale: (f32, f32),
    ratio: (f32, f32),
    rng: &mut SplitMix64,
) -> (u32, u32, u32, u32) {
    let area = (w * h) as f32;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.range(scale.0, scale.1);
        let aspect = rng.range(lr0, lr1).exp();
        let cw = (target * aspect).sqrt().round() as u32;
        let ch = (target / aspect).sqrt().round() as u32;
        if cw > 0 && cw <= w && ch > 0 && ch <= h {
            let x = rng.below((w - cw + 1) as usize) as u32;
            let y = rng.below((h - ch + 1) as usize) as u32;
            return (x, y, cw, ch);
        }
    }
    // Fallback: the largest centred crop within the ratio range.
    let in_ratio = w as f32 / h as f32;
    let (cw, ch) = if in_ratio < ratio.0 {
        (w, (w as f32 / ratio.0).round() as u32)
    } else if in_ratio > ratio.1 {
        ((h as f32 * ratio.1).round() as u32, h)
    } else {
        (w, h)
    };
    let (cw, ch) = (cw.clamp(1, w), ch.clamp(1, h));
    ((w - cw) / 2, (h - ch) / 2, cw, ch)
}

/// One augmented training view, normalised CHW of `size`.
pub fn augment(img: &RgbImage, size: u32, cfg: &AugmentConfig, rng: &mut SplitMix64) -> Vec<f32> {
    let mut x = preprocess::resize_shorter_center_crop(img, size);
    let b = rng.range(1.0 - cfg.brightness, 1.0 + cfg.brightness);
    let h = rng.range(-cfg.hue, cfg.hue);
    color_jitter(&mut x, b, h);
    if cfg.flip && rng.uniform() < 0.5 {
        imageops::flip_horizontal_in_place(&mut x);
    }
    let (cx, cy, cw, ch) =
        random_resized_crop_box(x.width(), x.height(), cfg.scale, cfg.ratio, rng);
    let crop = imageops::crop_imm(&x, cx, cy, cw, ch).to_image();
    let x = imageops::resize(&crop, size, size, imageops::FilterType::Triangle);
    preprocess::to_normalized_chw(&x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsv_roundtrip() {
        for &(r, g, b) in &[
            (0.2, 0.5, 0.9),
            (1.0, 0.0, 0.0),
            (0.3, 0.3, 0.3),
            (0.9, 0.8, 0.1),
        ] {
            let (h, s, v) = rgb_to_hsv(r, g, b);
            let (r2, g2, b2) = hsv_to_rgb(h, s, v);
            assert!((r - r2).abs() < 1e-5 && (g - g2).abs() < 1e-5 && (b - b2).abs() < 1e-5);
        }
    }

    #[test]
    fn crop_boxes_stay_inside() {
        let mut rng = SplitMix64::new(9);
        for _ in 0..500 {
            let (x, y, w, h) = random_resized_crop_box(224, 224, (0.15, 1.0), (0.3, 3.3), &mut rng);
            assert!(w > 0 && h > 0 && x + w <= 224 && y + h <= 224);
            let a = (w * h) as f32 / (224.0 * 224.0);
            assert!(a > 0.1);
        }
    }

    #[test]
    fn augment_gives_normalised_chw() {
        let img = RgbImage::from_fn(40, 30, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 8) as u8, 128])
        });
        let mut rng = SplitMix64::new(1);
        let v = augment(&img, 16, &AugmentConfig::default(), &mut rng);
        assert_eq!(v.len(), 3 * 16 * 16);
        assert!(v.iter().all(|x| x.is_finite() && x.abs() < 3.0));
    }
}
