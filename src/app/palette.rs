//! Colours of the 7 classes (in `expressions::CLASSES` order) and a few
//! shared styles, so every panel draws a class the same way.

use eframe::egui::Color32;

/// surprise, fear, disgust, happiness, sadness, anger, neutral.
pub const CLASS_COLORS: [Color32; 7] = [
    Color32::from_rgb(255, 167, 38),  // surprise: orange
    Color32::from_rgb(171, 71, 188),  // fear: purple
    Color32::from_rgb(102, 187, 106), // disgust: green
    Color32::from_rgb(255, 238, 88),  // happiness: yellow
    Color32::from_rgb(66, 165, 245),  // sadness: blue
    Color32::from_rgb(239, 83, 80),   // anger: red
    Color32::from_rgb(176, 190, 197), // neutral: grey
];

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
