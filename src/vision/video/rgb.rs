//! FFmpeg's decoded pictures as upright RGB: the pixel-format converter
//! (swscale, told the frame's colour space) and the display rotation.

use ffmpeg::format::Pixel;
use ffmpeg::software::scaling;
use ffmpeg_next as ffmpeg;
use image::RgbImage;
use std::path::Path;

use super::VideoError;

/// Converts decoded frames to RGB, keeping one converter while the
/// frames' format and size stay the same.
pub(super) struct RgbConverter {
    scaler: Option<(Scaler, (Pixel, u32, u32))>,
    rgb: ffmpeg::frame::Video,
}

impl Default for RgbConverter {
    fn default() -> Self {
        Self {
            scaler: None,
            rgb: ffmpeg::frame::Video::empty(),
        }
    }
}

impl RgbConverter {
    /// `frame` as RGB, turned `rotation` degrees clockwise (upright).
    pub(super) fn convert(
        &mut self,
        frame: &ffmpeg::frame::Video,
        rotation: u32,
        path: &Path,
    ) -> Result<RgbImage, VideoError> {
        let err = |e: String| VideoError::read(path, e);
        let (fmt, w, h) = (frame.format(), frame.width(), frame.height());
        if w == 0 || h == 0 {
            return Err(err("a frame without a size".into()));
        }
        if self.scaler.as_ref().map(|s| s.1) != Some((fmt, w, h)) {
            let mut ctx = scaling::Context::get(
                fmt,
                w,
                h,
                Pixel::RGB24,
                w,
                h,
                scaling::Flags::BILINEAR
                    | scaling::Flags::ACCURATE_RND
                    | scaling::Flags::FULL_CHR_H_INT,
            )
            .map_err(|e| err(format!("cannot convert {fmt:?} pictures to RGB: {e}")))?;
            set_colorspace(&mut ctx, frame);
            self.scaler = Some((Scaler(ctx), (fmt, w, h)));
        }
        let Some((scaler, _)) = self.scaler.as_mut() else {
            return Err(err("no converter".into()));
        };
        scaler
            .0
            .run(frame, &mut self.rgb)
            .map_err(|e| err(e.to_string()))?;
        let stride = self.rgb.stride(0);
        let data = self.rgb.data(0);
        let row = w as usize * 3;
        let mut buf = Vec::with_capacity(row * h as usize);
        for y in 0..h as usize {
            buf.extend_from_slice(&data[y * stride..y * stride + row]);
        }
        let img = RgbImage::from_raw(w, h, buf)
            .ok_or_else(|| err("a picture of the wrong size".into()))?;
        Ok(match rotation {
            90 => image::imageops::rotate90(&img),
            180 => image::imageops::rotate180(&img),
            270 => image::imageops::rotate270(&img),
            _ => img,
        })
    }
}

/// A pixel-format converter that may move between threads with its reader.
struct Scaler(scaling::Context);

// SAFETY: an SwsContext has no thread affinity; it is only ever used by the
// one thread that owns the reader (`&mut self`), never shared.
unsafe impl Send for Scaler {}

/// The clockwise rotation a player applies, from the stream's display
/// matrix (as the ffmpeg program's autorotation reads it), rounded to a
/// quarter turn.
pub(super) fn display_rotation(stream: &ffmpeg::format::stream::Stream) -> u32 {
    for sd in stream.side_data() {
        if sd.kind() != ffmpeg::codec::packet::side_data::Type::DisplayMatrix {
            continue;
        }
        let d = sd.data();
        if d.len() < 36 {
            continue;
        }
        let m = |i: usize| {
            let b = [d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]];
            f64::from(i32::from_ne_bytes(b)) / 65536.0
        };
        // libavutil's av_display_rotation_get, negated: the matrix's
        // rotation is counter-clockwise, players turn clockwise.
        let (s0, s1) = (m(0).hypot(m(3)), m(1).hypot(m(4)));
        if s0 == 0.0 || s1 == 0.0 {
            return 0;
        }
        let cw = (m(1) / s1).atan2(m(0) / s0).to_degrees();
        let q = (cw / 90.0).round() as i64;
        return (q.rem_euclid(4) * 90) as u32;
    }
    0
}

/// Tells the converter the frame's YUV matrix and range (BT.709 for HD
/// video, full range for JPEG), which swscale would otherwise take for
/// BT.601 limited range.
fn set_colorspace(ctx: &mut scaling::Context, frame: &ffmpeg::frame::Video) {
    use ffmpeg::ffi;
    use ffmpeg::util::color::{Range, Space};
    let space = match frame.color_space() {
        Space::BT709 => ffi::SWS_CS_ITU709,
        Space::FCC => ffi::SWS_CS_FCC,
        Space::SMPTE240M => ffi::SWS_CS_SMPTE240M,
        Space::BT2020NCL | Space::BT2020CL => ffi::SWS_CS_BT2020,
        Space::BT470BG | Space::SMPTE170M => ffi::SWS_CS_ITU601,
        // Unspecified: what players assume, by size.
        _ if frame.height() >= 720 => ffi::SWS_CS_ITU709,
        _ => ffi::SWS_CS_ITU601,
    };
    let full = i32::from(
        frame.color_range() == Range::JPEG
            || matches!(
                frame.format(),
                Pixel::YUVJ420P | Pixel::YUVJ422P | Pixel::YUVJ444P | Pixel::YUVJ440P
            ),
    );
    // SAFETY: `ctx` holds a valid SwsContext; the coefficient tables are
    // static arrays inside libswscale.
    unsafe {
        let coeffs = ffi::sws_getCoefficients(space);
        let rgb = ffi::sws_getCoefficients(ffi::SWS_CS_DEFAULT);
        ffi::sws_setColorspaceDetails(ctx.as_mut_ptr(), coeffs, full, rgb, 1, 0, 1 << 16, 1 << 16);
    }
}
