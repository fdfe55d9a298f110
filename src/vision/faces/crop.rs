//! Face crops for the expression model: a square around the box with a
//! margin, and, when the detector gives landmarks, turned so that the eyes
//! are level (RAF-DB's aligned faces, which CLIPER learned from, are).

use image::{imageops, RgbImage};

use super::{FaceBox, Landmarks};

/// Eye lines flatter than this are cropped straight: turning by a fraction
/// of a degree only resamples (and softens) the crop.
const MIN_TURN_DEGREES: f32 = 1.0;

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

/// Angle of the line from the left to the right eye (as seen in the image),
/// in degrees, clockwise positive (y grows downwards).
pub fn eye_line_degrees(landmarks: &Landmarks) -> f32 {
    let ([lx, ly], [rx, ry]) = (landmarks[0], landmarks[1]);
    (ry - ly).atan2(rx - lx).to_degrees()
}

/// The crop the expression model sees: [`crop_face`], turned about its centre
/// so that the eye line is level when `align` is set and the face has
/// landmarks. The turned square has the same side and centre as the straight
/// one; pixels beyond the image edge repeat the edge.
pub fn model_crop(img: &RgbImage, face: &FaceBox, margin: f32, align: bool) -> RgbImage {
    let angle = match (align, face.landmarks) {
        (true, Some(l)) => eye_line_degrees(&l),
        _ => 0.0,
    };
    if !angle.is_finite() || angle.abs() < MIN_TURN_DEGREES {
        return crop_face(img, face, margin);
    }
    let (x, y, side, _) = square_crop(img.width(), img.height(), face, margin);
    turned_square(
        img,
        (x as f32 + side as f32 / 2.0, y as f32 + side as f32 / 2.0),
        side,
        angle,
    )
}

/// A `side` x `side` crop centred on `centre` whose x axis runs at `degrees`
/// in the source, sampled bilinearly. Written here rather than taken from
/// `imageproc`: it is one affine map over the crop's own pixels, and that
/// crate would bring a dependency tree for these lines.
///
/// It runs on the thread that drives the model, before each forward, so it
/// reads the source's bytes directly and rounds without libm (`floor` and
/// `round` are calls to it on x86-64's baseline): the same pixels as a
/// per-pixel `get_pixel` with `f32::round` (the test keeps that version),
/// in a fraction of the time.
fn turned_square(img: &RgbImage, centre: (f32, f32), side: u32, degrees: f32) -> RgbImage {
    let (sin, cos) = degrees.to_radians().sin_cos();
    let (w, h) = (img.width() as i64, img.height() as i64);
    if w == 0 || h == 0 {
        return RgbImage::new(0, 0);
    }
    let src = img.as_raw();
    let stride = w as usize * 3;
    let at = |x: i64, y: i64| y.clamp(0, h - 1) as usize * stride + x.clamp(0, w - 1) as usize * 3;
    let half = side as f32 / 2.0;
    let n = side as usize;
    let mut out = vec![0u8; n * n * 3];
    for (v, row) in out.chunks_exact_mut(n * 3).enumerate() {
        let dv = v as f32 + 0.5 - half;
        for (u, px) in row.chunks_exact_mut(3).enumerate() {
            let du = u as f32 + 0.5 - half;
            // Source position of this pixel's centre, in pixel-centre coordinates.
            let sx = centre.0 + cos * du - sin * dv - 0.5;
            let sy = centre.1 + sin * du + cos * dv - 0.5;
            let (x0, y0) = (floor(sx), floor(sy));
            let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
            let (a, b) = (at(x0, y0), at(x0 + 1, y0));
            let (c, d) = (at(x0, y0 + 1), at(x0 + 1, y0 + 1));
            for k in 0..3 {
                let top = f32::from(src[a + k]) * (1.0 - fx) + f32::from(src[b + k]) * fx;
                let bottom = f32::from(src[c + k]) * (1.0 - fx) + f32::from(src[d + k]) * fx;
                px[k] = round_to_byte(top * (1.0 - fy) + bottom * fy);
            }
        }
    }
    RgbImage::from_raw(side, side, out).expect("a buffer of side x side RGB pixels")
}

/// `x.floor()` for the crop's source positions (finite, far inside i64).
fn floor(x: f32) -> i64 {
    let t = x as i64;
    t - i64::from((t as f32) > x)
}

/// `x.round().clamp(0.0, 255.0) as u8` for a non-negative blend of bytes:
/// halves away from zero, as `f32::round`. `x - trunc(x)` is exact.
fn round_to_byte(x: f32) -> u8 {
    let t = x as i32;
    let up = i32::from(x - t as f32 >= 0.5);
    (t + up).clamp(0, 255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vision::faces::DEFAULT_FACE_MARGIN;
    use image::Rgb;

    fn face(x: u32, y: u32, w: u32, h: u32) -> FaceBox {
        FaceBox {
            x,
            y,
            w,
            h,
            score: 5.0,
            landmarks: None,
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
    fn square_crop_is_centred_shifted_inward_and_shrunk_only_when_needed() {
        // (image, face box, margin, crop)
        let known = [
            // 100x100 box at (200, 100), margin 0.25 -> side 150, centre (250, 150).
            ((640, 480), (200, 100, 100, 100), 0.25, (175, 75, 150, 150)),
            // A non-square box gives a square on its longer side.
            ((640, 480), (200, 100, 60, 100), 0.0, (180, 100, 100, 100)),
            // Top-left corner: shifted to (0, 0), full size kept.
            ((640, 480), (0, 0, 80, 80), 0.25, (0, 0, 120, 120)),
            // Bottom-right corner: shifted so it ends at the image edge.
            ((640, 480), (600, 440, 40, 40), 0.5, (560, 400, 80, 80)),
            // Bigger than the image's shorter side: shrinks to it, still square.
            ((640, 480), (100, 0, 480, 480), 0.25, (100, 0, 480, 480)),
        ];
        for ((img_w, img_h), (x, y, w, h), margin, want) in known {
            let got = square_crop(img_w, img_h, &face(x, y, w, h), margin);
            assert_eq!(got, want, "box {:?} margin {margin}", (x, y, w, h));
        }
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

    /// A synthetic face: two dark eyes on a light disc, with the eye line
    /// at `degrees`; returns the image and its landmarks.
    fn tilted_face(degrees: f32) -> (RgbImage, Landmarks) {
        let (cx, cy) = (100.0f32, 100.0f32);
        let (sin, cos) = degrees.to_radians().sin_cos();
        let at = |dx: f32, dy: f32| [cx + cos * dx - sin * dy, cy + sin * dx + cos * dy];
        let eyes = [at(-25.0, -15.0), at(25.0, -15.0)];
        let img = RgbImage::from_fn(200, 200, |x, y| {
            let (x, y) = (x as f32 + 0.5, y as f32 + 0.5);
            let near = |p: [f32; 2], r: f32| (x - p[0]).powi(2) + (y - p[1]).powi(2) < r * r;
            if eyes.iter().any(|&e| near(e, 7.0)) {
                Rgb([20, 20, 20])
            } else if near([cx, cy], 60.0) {
                Rgb([220, 180, 150])
            } else {
                Rgb([60, 90, 60])
            }
        });
        let l = [
            eyes[0],
            eyes[1],
            at(0.0, 5.0),
            at(-18.0, 25.0),
            at(18.0, 25.0),
        ];
        (img, l)
    }

    /// Centroid of the dark (eye) pixels in the left and right halves.
    fn eye_centroids(img: &RgbImage) -> [[f32; 2]; 2] {
        let mut sums = [[0.0f32; 3]; 2];
        for (x, y, p) in img.enumerate_pixels() {
            if p.0[0] < 80 && p.0[1] < 80 {
                let s = &mut sums[usize::from(x >= img.width() / 2)];
                s[0] += x as f32;
                s[1] += y as f32;
                s[2] += 1.0;
            }
        }
        sums.map(|s| [s[0] / s[2].max(1.0), s[1] / s[2].max(1.0)])
    }

    /// The box of `tilted_face`'s face, with its landmarks.
    fn centred_face(l: [[f32; 2]; 5]) -> FaceBox {
        FaceBox {
            landmarks: Some(l),
            ..face(50, 50, 100, 100)
        }
    }

    #[test]
    fn a_tilted_face_is_cropped_upright() {
        for degrees in [-30.0f32, -12.0, 8.0, 25.0] {
            let (img, l) = tilted_face(degrees);
            assert!((eye_line_degrees(&l) - degrees).abs() < 1e-3);
            let face = centred_face(l);
            let crop = model_crop(&img, &face, DEFAULT_FACE_MARGIN, true);
            let [a, b] = eye_centroids(&crop);
            let level = (b[1] - a[1]).atan2(b[0] - a[0]).to_degrees();
            assert!(level.abs() < 2.0, "{degrees} deg in, {level} deg out");
            // Without alignment the tilt stays.
            let [a, b] = eye_centroids(&model_crop(&img, &face, DEFAULT_FACE_MARGIN, false));
            let kept = (b[1] - a[1]).atan2(b[0] - a[0]).to_degrees();
            assert!(
                (kept - degrees).abs() < 3.0,
                "{degrees} deg in, {kept} deg unaligned"
            );
        }
    }

    #[test]
    fn level_or_landmark_free_faces_are_cropped_as_before() {
        let (img, l) = tilted_face(0.3);
        let mut face = centred_face(l);
        let straight = crop_face(&img, &face, 0.25);
        assert_eq!(model_crop(&img, &face, 0.25, true), straight);
        face.landmarks = None;
        let (img, _) = tilted_face(20.0);
        assert_eq!(
            model_crop(&img, &face, 0.25, true),
            crop_face(&img, &face, 0.25)
        );
        // Degenerate images and crops do not panic.
        face.landmarks = Some(l);
        let _ = model_crop(&RgbImage::new(1, 1), &face, 0.25, true);
        let _ = model_crop(&RgbImage::new(0, 0), &face, 0.25, true);
    }

    /// The first version of `turned_square`: a closure per pixel through
    /// `get_pixel`, with `f32::floor` and `f32::round`.
    fn turned_square_per_pixel(
        img: &RgbImage,
        centre: (f32, f32),
        side: u32,
        degrees: f32,
    ) -> RgbImage {
        let (sin, cos) = degrees.to_radians().sin_cos();
        let (w, h) = (img.width() as i64, img.height() as i64);
        let px = |x: i64, y: i64| {
            img.get_pixel(x.clamp(0, w - 1) as u32, y.clamp(0, h - 1) as u32)
                .0
        };
        let half = side as f32 / 2.0;
        RgbImage::from_fn(side, side, |u, v| {
            let (du, dv) = (u as f32 + 0.5 - half, v as f32 + 0.5 - half);
            let sx = centre.0 + cos * du - sin * dv - 0.5;
            let sy = centre.1 + sin * du + cos * dv - 0.5;
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as i64, y0 as i64);
            let (a, b, c, d) = (
                px(x0, y0),
                px(x0 + 1, y0),
                px(x0, y0 + 1),
                px(x0 + 1, y0 + 1),
            );
            let mut out = [0u8; 3];
            for k in 0..3 {
                let top = f32::from(a[k]) * (1.0 - fx) + f32::from(b[k]) * fx;
                let bottom = f32::from(c[k]) * (1.0 - fx) + f32::from(d[k]) * fx;
                out[k] = (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8;
            }
            Rgb(out)
        })
    }

    /// The crop that reads bytes and rounds without libm gives the same
    /// pixels as the per-pixel version: noise and flat images, angles either
    /// way and past 90 degrees, squares inside, across and beyond the edges.
    #[test]
    fn turned_crops_are_the_pixels_of_the_per_pixel_version() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let noise = RgbImage::from_fn(97, 61, |_, _| {
            let r = next();
            Rgb([r as u8, (r >> 8) as u8, (r >> 16) as u8])
        });
        // Every byte value, and runs of 255 and 0 where blends land on .5.
        let ramps = RgbImage::from_fn(256, 9, |x, y| {
            Rgb([x as u8, if y % 2 == 0 { 255 } else { 0 }, (x * 7 + y) as u8])
        });
        for img in [
            &noise,
            &ramps,
            &RgbImage::from_pixel(1, 1, Rgb([9, 200, 255])),
        ] {
            let (w, h) = (img.width() as f32, img.height() as f32);
            for degrees in [1.5f32, -7.25, 33.0, -89.9, 135.0, 180.0, 271.3] {
                for (cx, cy) in [
                    (w / 2.0, h / 2.0),
                    (0.0, 0.0),
                    (w + 3.5, h * 0.3),
                    (-10.25, h),
                ] {
                    for side in [1u32, 2, 17, 64] {
                        let got = turned_square(img, (cx, cy), side, degrees);
                        let want = turned_square_per_pixel(img, (cx, cy), side, degrees);
                        assert!(
                            got == want,
                            "{}x{} image, {degrees} deg, centre ({cx}, {cy}), side {side}",
                            img.width(),
                            img.height()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rounding_without_libm_is_f32_round() {
        for x in [
            0.0f32, 0.49999997, 0.5, 1.5, 2.5, 254.49998, 254.5, 255.0, 255.49998, 300.0,
        ] {
            assert_eq!(round_to_byte(x), x.round().clamp(0.0, 255.0) as u8, "{x}");
        }
        for x in [
            -3.5f32, -1.0, -0.5, -0.0, 0.0, 0.3, 7.0, 7.9, -7.9, 1e6, -1e6,
        ] {
            assert_eq!(floor(x), x.floor() as i64, "{x}");
        }
    }

    #[test]
    #[ignore = "timing report, run with --ignored --nocapture"]
    fn turned_crop_timing() {
        let img = RgbImage::from_fn(640, 480, |x, y| Rgb([x as u8, y as u8, (x ^ y) as u8]));
        let time = |f: &dyn Fn() -> RgbImage| {
            let t = std::time::Instant::now();
            for _ in 0..50 {
                std::hint::black_box(f());
            }
            t.elapsed().as_secs_f64() * 1000.0 / 50.0
        };
        // A face of the demo source's size, turned 8 degrees.
        let direct = time(&|| turned_square(&img, (320.0, 200.0), 250, 8.0));
        let per_pixel = time(&|| turned_square_per_pixel(&img, (320.0, 200.0), 250, 8.0));
        println!("250x250 turned crop: {direct:.2} ms, per pixel {per_pixel:.2} ms");
    }
}
