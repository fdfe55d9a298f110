//! Charts drawn with plotters into an RGB image, in a real font (Hack, the
//! monospace font egui ships, compiled in: no font has to be installed):
//! the report's timelines and the evaluation's confusion matrix.

use std::sync::OnceLock;

use image::RgbImage;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// The font family every chart uses.
pub(crate) const FONT: &str = "sans-serif";

/// A chart that could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("the chart's font cannot be read")]
    Font,
    #[error("cannot draw the chart: {0}")]
    Draw(String),
}

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for ChartError {
    fn from(e: DrawingAreaErrorKind<E>) -> Self {
        ChartError::Draw(e.to_string())
    }
}

fn register_font() -> Result<(), ChartError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::HACK_REGULAR)
            .is_ok()
    });
    ok.then_some(()).ok_or(ChartError::Font)
}

/// A `w` x `h` image drawn by `draw` on the whole of it.
pub(crate) fn render(
    w: u32,
    h: u32,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), ChartError>,
) -> Result<RgbImage, ChartError> {
    register_font()?;
    let mut buf = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw(&root)?;
        root.present()?;
    }
    RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| ChartError::Draw("a buffer of the wrong size".into()))
}

/// An `image` colour as plotters'.
pub(crate) fn rgb(c: [u8; 3]) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}
