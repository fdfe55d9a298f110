//! Drawing on frames and report images: rectangles, filled boxes and text
//! (an 8x8 bitmap font, scaled), with no font files needed at run time.

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

/// Fills a rectangle, clipped to the image.
pub fn fill_rect(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, color: Rgb<u8>) {
    let (iw, ih) = (img.width() as i64, img.height() as i64);
    for yy in y.max(0)..(y + h).min(ih) {
        for xx in x.max(0)..(x + w).min(iw) {
            img.put_pixel(xx as u32, yy as u32, color);
        }
    }
}

/// Draws a rectangle outline `thickness` pixels wide, clipped to the image.
pub fn stroke_rect(
    img: &mut RgbImage,
    x: i64,
    y: i64,
    w: i64,
    h: i64,
    thickness: i64,
    color: Rgb<u8>,
) {
    fill_rect(img, x, y, w, thickness, color);
    fill_rect(img, x, y + h - thickness, w, thickness, color);
    fill_rect(img, x, y, thickness, h, color);
    fill_rect(img, x + w - thickness, y, thickness, h, color);
}

/// Draws a straight line `thickness` pixels wide (square pen), clipped to
/// the image.
pub fn draw_line(
    img: &mut RgbImage,
    (x0, y0): (f32, f32),
    (x1, y1): (f32, f32),
    thickness: u32,
    color: Rgb<u8>,
) {
    let t = thickness.max(1) as i64;
    let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as i64;
    for i in 0..=steps {
        let a = i as f32 / steps as f32;
        let x = (x0 + (x1 - x0) * a).round() as i64;
        let y = (y0 + (y1 - y0) * a).round() as i64;
        fill_rect(img, x - t / 2, y - t / 2, t, t, color);
    }
}

/// Black or white, whichever reads on `bg`.
pub fn text_color_on(bg: Rgb<u8>) -> Rgb<u8> {
    let [r, g, b] = bg.0;
    let l = 0.299 * r as f32 + 0.587 * g as f32 + 0.114 * b as f32;
    if l > 140.0 {
        Rgb([0, 0, 0])
    } else {
        Rgb([255, 255, 255])
    }
}

/// Width in pixels of `text` at `scale`.
pub fn text_width(text: &str, scale: u32) -> u32 {
    text.chars().count() as u32 * 8 * scale
}

/// Draws `text` with its top-left corner at (x, y); characters outside the
/// font's basic Latin set are drawn as `?`.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: u32, color: Rgb<u8>) {
    let s = scale.max(1) as i64;
    for (n, ch) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        let gx = x + n as i64 * 8 * s;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    fill_rect(img, gx + col * s, y + row as i64 * s, s, s, color);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_sets_pixels_inside_its_box_only() {
        let mut img = RgbImage::new(40, 20);
        draw_text(&mut img, 2, 2, "Hi", 1, Rgb([255, 255, 255]));
        let lit: Vec<(u32, u32)> = img
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0[0] > 0)
            .map(|(x, y, _)| (x, y))
            .collect();
        assert!(!lit.is_empty());
        assert!(lit
            .iter()
            .all(|&(x, y)| (2..18).contains(&x) && (2..10).contains(&y)));
        // Clipping: drawing off the image does not panic.
        draw_text(&mut img, -5, 15, "xyz", 2, Rgb([1, 2, 3]));
        stroke_rect(&mut img, -3, -3, 100, 100, 2, Rgb([9, 9, 9]));
        draw_line(&mut img, (-4.0, -4.0), (60.0, 30.0), 3, Rgb([7, 7, 7]));
    }

    #[test]
    fn lines_cover_their_ends() {
        let mut img = RgbImage::new(20, 20);
        draw_line(&mut img, (2.0, 3.0), (17.0, 12.0), 1, Rgb([255, 0, 0]));
        assert_eq!(img.get_pixel(2, 3).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(17, 12).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(17, 3).0, [0, 0, 0]);
        assert_eq!(text_color_on(Rgb([255, 238, 88])), Rgb([0, 0, 0]));
    }
}
