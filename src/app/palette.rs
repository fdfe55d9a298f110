//! Colours of the classes (by name, from `expressions::class_rgb`, the one
//! source, which the recorded video also uses) and a few shared styles, so
//! every panel draws a class the same way.

use eframe::egui::Color32;

/// The probe's colour (not a class colour).
pub const PROBE_COLOR: Color32 = Color32::from_rgb(38, 198, 218);

/// The colour of a class, by any of its names.
pub fn class_color(name: &str) -> Color32 {
    let [r, g, b] = crate::model::cliper::expressions::class_rgb(name);
    Color32::from_rgb(r, g, b)
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
