//! The session's video: annotated frames drawn here and encoded by
//! [`crate::vision::video::VideoWriter`] (FFmpeg, H.264 in fragmented MP4,
//! a fragment every half second): `video.mp4` is playable while it is
//! being written and after a crash, with no repair step.
//!
//! Frames carry their own times: a sample lasts until the next frame, so the
//! video keeps real time even when frames were skipped, and frame times equal
//! the session's `t` (minus the first frame's).

use std::borrow::Cow;

use image::{imageops, Rgb, RgbImage};

use crate::model::cliper::expressions::class_rgb;
use crate::vision::draw::{draw_text, fill_rect, stroke_rect, text_color_on, text_width};

/// Recorded frames are scaled down to this longer side (H.264 level and
/// encoding time); annotations stay legible.
pub const MAX_VIDEO_SIDE: u32 = 1920;

/// A face to draw on a video frame.
#[derive(Clone, Debug, PartialEq)]
pub struct FaceMark {
    pub id: u64,
    /// `[x, y, w, h]` in the frame's pixels.
    pub bbox: [u32; 4],
    /// The class shown and its probability; `None` before the face's first
    /// scores (a white box with its id).
    pub label: Option<(String, f32)>,
}

/// Draws boxes, ids, labels and the session time on a frame.
pub fn annotate(img: &mut RgbImage, marks: &[FaceMark], t: f64) {
    let scale = (img.height() / 280).clamp(1, 4);
    // Odd and at least 3 px: the colour survives 4:2:0 chroma subsampling.
    let thick = 2 * i64::from(scale) + 1;
    for m in marks {
        let [x, y, w, h] = m.bbox.map(i64::from);
        let (color, text) = match m.label.clone() {
            Some((c, p)) => (
                Rgb(class_rgb(&c)),
                format!("#{} {} {:.0}%", m.id, c, p * 100.0),
            ),
            None => (Rgb([255, 255, 255]), format!("#{}", m.id)),
        };
        stroke_rect(img, x, y, w, h, thick, color);
        let pad = 3 * i64::from(scale);
        let tag_w = i64::from(text_width(&text, scale)) + 2 * pad;
        let tag_h = 8 * i64::from(scale) + 2 * pad;
        // Above the box, or inside its top when there is no room.
        let ty = if y - tag_h >= 0 { y - tag_h } else { y + thick };
        fill_rect(img, x, ty, tag_w, tag_h, color);
        draw_text(img, x + pad, ty + pad, &text, scale, text_color_on(color));
    }
    let stamp = format!("t={t:.2}s");
    let pad = 3 * i64::from(scale);
    let th = 8 * i64::from(scale) + 2 * pad;
    let ty = i64::from(img.height()) - th;
    fill_rect(
        img,
        0,
        ty,
        i64::from(text_width(&stamp, scale)) + 2 * pad,
        th,
        Rgb([0, 0, 0]),
    );
    draw_text(img, pad, ty + pad, &stamp, scale, Rgb([255, 255, 255]));
}

/// The encoded size for frames of `w` x `h`: at most [`MAX_VIDEO_SIDE`],
/// even sides (4:2:0 chroma).
pub fn video_size(w: u32, h: u32) -> (u32, u32) {
    let s = (MAX_VIDEO_SIDE as f64 / w.max(h).max(1) as f64).min(1.0);
    let w = ((w as f64 * s) as u32).max(2) & !1;
    let h = ((h as f64 * s) as u32).max(2) & !1;
    (w, h)
}

/// `img` at exactly `size`: as is, cropped by the odd pixel, or scaled to
/// fit with black borders (a source of another size mid-session).
pub fn fit(img: &RgbImage, (w, h): (u32, u32)) -> Cow<'_, RgbImage> {
    let (iw, ih) = img.dimensions();
    if (iw, ih) == (w, h) {
        return Cow::Borrowed(img);
    }
    if (iw & !1, ih & !1) == (w, h) {
        return Cow::Owned(imageops::crop_imm(img, 0, 0, w, h).to_image());
    }
    let s = (w as f64 / iw as f64).min(h as f64 / ih as f64);
    let (sw, sh) = (
        ((iw as f64 * s).round() as u32).clamp(1, w),
        ((ih as f64 * s).round() as u32).clamp(1, h),
    );
    let scaled = imageops::resize(img, sw, sh, imageops::FilterType::Triangle);
    let mut out = RgbImage::new(w, h);
    imageops::overlay(
        &mut out,
        &scaled,
        i64::from((w - sw) / 2),
        i64::from((h - sh) / 2),
    );
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vision::video::{IndexedVideo, VideoReader, VideoWriter};

    /// A frame whose left half brightens with `i` (decodable, compressible).
    fn frame(i: u32, w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            if x < w / 2 {
                Rgb([(i * 20 % 256) as u8, 80, 80])
            } else {
                Rgb([(x % 256) as u8, (y % 256) as u8, 128])
            }
        })
    }

    /// Frames at irregular times come back with those times and pictures,
    /// sequentially and in any order.
    #[test]
    fn recorded_video_keeps_times_and_pictures() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("video.mp4");
        // Odd source size: encoded one pixel smaller.
        let size = video_size(161, 121);
        assert_eq!(size, (160, 120));
        let mut w = VideoWriter::create(&out, size, 10.0).unwrap();
        // 10 fps with one gap: frame 7 comes 0.3 s after frame 6.
        let times: Vec<f64> = (0..12)
            .map(|i| i as f64 * 0.1 + if i >= 7 { 0.2 } else { 0.0 })
            .collect();
        for (i, &t) in times.iter().enumerate() {
            w.push(&fit(&frame(i as u32, 161, 121), size), t).unwrap();
        }
        assert!(!w.encoder_name().is_empty());
        assert_eq!(w.finish().unwrap(), 12);
        let mut r = VideoReader::open(&out).unwrap();
        let mut k = 0;
        while let Some(f) = r.next_frame().unwrap() {
            assert!(
                (f.t - times[k]).abs() < 1.5e-3,
                "frame {k}: {} vs {}",
                f.t,
                times[k]
            );
            assert_eq!(f.image.dimensions(), (160, 120));
            k += 1;
        }
        assert_eq!(k, 12);
        assert!(r.take_warnings().is_empty());
        let mut v = IndexedVideo::open(&out).unwrap();
        assert_eq!(v.len(), 12);
        assert_eq!(v.index_at(0.75), Some(6), "frame 6 lasts until 0.9 s");
        assert_eq!(v.index_at(0.95), Some(7));
        for k in [11, 3, 4, 9, 0] {
            let img = v.frame(k).unwrap();
            let want = (k as u32 * 20 % 256) as f32;
            let got = img.get_pixel(20, 60).0[0] as f32;
            assert!(
                (got - want).abs() < 12.0,
                "frame {k}: red {got}, want {want}"
            );
        }
    }

    #[test]
    fn annotations_draw_inside_the_frame() {
        let mut img = RgbImage::new(200, 120);
        let marks = [
            FaceMark {
                id: 1,
                bbox: [10, 2, 60, 60],
                label: Some(("happiness".into(), 0.8)),
            },
            FaceMark {
                id: 2,
                bbox: [150, 80, 80, 80],
                label: None,
            },
        ];
        annotate(&mut img, &marks, 1.5);
        assert_eq!(img.get_pixel(10, 30).0, class_rgb("happiness"), "box edge");
        assert_eq!(img.get_pixel(150, 100).0, [255, 255, 255]);
        assert!(img.get_pixel(0, 119).0 == [0, 0, 0] || img.get_pixel(3, 117).0[0] > 0);
    }

    #[test]
    fn fit_letterboxes_other_sizes() {
        let img = RgbImage::from_pixel(100, 100, Rgb([200, 0, 0]));
        let out = fit(&img, (200, 100));
        assert_eq!(out.dimensions(), (200, 100));
        assert_eq!(out.get_pixel(100, 50).0, [200, 0, 0]);
        assert_eq!(out.get_pixel(5, 50).0, [0, 0, 0]);
    }
}
