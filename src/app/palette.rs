//! Colours of the 7 classes (in `expressions::CLASSES` order) and a few
//! shared styles, so every panel draws a class the same way.

use eframe::egui::Color32;

/// surprise, fear, disgust, happiness, sadness, anger, neutral: the same
/// colours as the recorded video's (`vision::draw::CLASS_RGB`, the one source).
pub const CLASS_COLORS: [Color32; 7] = {
    let rgb = crate::vision::draw::CLASS_RGB;
    let mut out = [Color32::GRAY; 7];
    let mut i = 0;
    while i < 7 {
        let [r, g, b] = rgb[i].0;
        out[i] = Color32::from_rgb(r, g, b);
        i += 1;
    }
    out
};

/// The probe's colour (not a class colour).
pub const PROBE_COLOR: Color32 = Color32::from_rgb(38, 198, 218);

pub fn class_color(c: usize) -> Color32 {
    CLASS_COLORS.get(c).copied().unwrap_or(Color32::GRAY)
}

/// Text colour that reads on top of `bg`.
pub fn text_on(bg: Color32) -> Color32 {
    let l = 0.299 * bg.r() as f32 + 0.587 * bg.g() as f32 + 0.114 * bg.b() as f32;
    if l > 140.0 {
        Color32::BLACK
    } else {
        Color32::WHITE
    }
}
