//! Cameras through `nokhwa` (V4L2 on Linux, Media Foundation on Windows,
//! AVFoundation on macOS).
//!
//! Pixel formats are decoded here rather than by nokhwa (its decoder pulls in
//! a C JPEG library): MJPEG through the `image` crate's pure-Rust JPEG decoder,
//! YUYV, NV12, grey and raw RGB/BGR by hand.

use std::sync::Arc;
use std::time::Instant;

use image::RgbImage;
use nokhwa::utils::{
    ApiBackend, CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType,
};
use nokhwa::Camera;

use super::{Frame, FrameSource, SourceError};

/// A camera the system reports.
#[derive(Clone, Debug, PartialEq)]
pub struct CameraEntry {
    /// The index to give `--camera` (on Linux, N of /dev/videoN).
    pub index: u32,
    pub name: String,
}

/// Resolutions offered in the app's camera menu.
pub const COMMON_RESOLUTIONS: &[(u32, u32)] = &[(320, 240), (640, 480), (1280, 720), (1920, 1080)];

/// Resolution asked for when none is given: plenty for faces at desk
/// distance, cheap to decode.
pub const DEFAULT_RESOLUTION: (u32, u32) = (640, 480);

const DECODABLE: &[FrameFormat] = &[
    FrameFormat::MJPEG,
    FrameFormat::YUYV,
    FrameFormat::NV12,
    FrameFormat::RAWRGB,
    FrameFormat::RAWBGR,
    FrameFormat::GRAY,
];

/// The cameras the system reports (empty when there are none).
pub fn list_cameras() -> Result<Vec<CameraEntry>, SourceError> {
    #[cfg(target_os = "linux")]
    {
        // Without any video device node there is nothing to ask V4L2 about.
        let any = std::fs::read_dir("/dev")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().starts_with("video"))
            })
            .unwrap_or(false);
        if !any {
            return Ok(Vec::new());
        }
    }
    let infos = nokhwa::query(ApiBackend::Auto)
        .map_err(|e| SourceError::NoCamera(format!(" (the camera system answered: {e})")))?;
    Ok(infos
        .into_iter()
        .filter_map(|info| match info.index() {
            CameraIndex::Index(i) => Some(CameraEntry {
                index: *i,
                name: info.human_name(),
            }),
            CameraIndex::String(s) => s.parse().ok().map(|index| CameraEntry {
                index,
                name: info.human_name(),
            }),
        })
        .collect())
}

/// An open camera stream.
pub struct CameraSource {
    camera: Camera,
    index: u32,
    name: String,
    fps: f64,
    opened: Instant,
    count: u64,
}

impl CameraSource {
    /// Opens camera `index` near `resolution` (default 640x480).
    pub fn open(index: u32, resolution: Option<(u32, u32)>) -> Result<Self, SourceError> {
        let cameras = list_cameras()?;
        if cameras.is_empty() {
            return Err(SourceError::NoCamera(String::new()));
        }
        let name = cameras
            .iter()
            .find(|c| c.index == index)
            .map(|c| format!(" ({})", c.name))
            .ok_or_else(|| SourceError::Camera {
                index,
                name: String::new(),
                reason: format!(
                    "there is no such camera; found: {}",
                    cameras
                        .iter()
                        .map(|c| format!("{} ({})", c.index, c.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        let (w, h) = resolution.unwrap_or(DEFAULT_RESOLUTION);
        // nokhwa's "closest" request only looks at one pixel format, so try
        // the cheap ones in turn before taking whatever the camera prefers.
        let requests = [
            RequestedFormatType::Closest(CameraFormat::new_from(w, h, FrameFormat::MJPEG, 30)),
            RequestedFormatType::Closest(CameraFormat::new_from(w, h, FrameFormat::YUYV, 30)),
            RequestedFormatType::Closest(CameraFormat::new_from(w, h, FrameFormat::NV12, 30)),
            RequestedFormatType::AbsoluteHighestFrameRate,
        ];
        let mut last_err = String::from("no usable format");
        for req in requests {
            let format = RequestedFormat::with_formats(req, DECODABLE);
            match Camera::new(CameraIndex::Index(index), format) {
                Ok(mut camera) => match camera.open_stream() {
                    Ok(()) => {
                        let fps = f64::from(camera.frame_rate().max(1));
                        return Ok(Self {
                            camera,
                            index,
                            name,
                            fps,
                            opened: Instant::now(),
                            count: 0,
                        });
                    }
                    Err(e) => last_err = e.to_string(),
                },
                Err(e) => last_err = e.to_string(),
            }
        }
        Err(SourceError::Camera {
            index,
            name,
            reason: last_err,
        })
    }

    fn lost(&self, reason: String) -> SourceError {
        SourceError::CameraLost {
            index: self.index,
            name: self.name.clone(),
            reason,
        }
    }
}

impl FrameSource for CameraSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        let buffer = self.camera.frame().map_err(|e| self.lost(e.to_string()))?;
        let res = buffer.resolution();
        let image = decode(
            buffer.source_frame_format(),
            res.width(),
            res.height(),
            buffer.buffer(),
        )
        .map_err(|e| self.lost(e.to_string()))?;
        let index = self.count;
        self.count += 1;
        Ok(Some(Frame {
            image: Arc::new(image),
            index,
            t: self.opened.elapsed().as_secs_f64(),
        }))
    }
    fn frame_count(&self) -> Option<u64> {
        None
    }
    fn fps(&self) -> f64 {
        self.fps
    }
    fn name(&self) -> String {
        format!("camera {}{}", self.index, self.name)
    }
    fn is_live(&self) -> bool {
        true
    }
}

/// A camera buffer that does not hold the frame it claims to.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{format} frame of {width}x{height} has {got} bytes, expected {need}")]
    Short {
        format: FrameFormat,
        width: u32,
        height: u32,
        got: usize,
        need: usize,
    },
    #[error("bad MJPEG frame: {0}")]
    Jpeg(#[from] image::ImageError),
}

/// Decodes one camera buffer to RGB.
pub fn decode(format: FrameFormat, w: u32, h: u32, data: &[u8]) -> Result<RgbImage, FrameError> {
    let (wu, hu) = (w as usize, h as usize);
    let short = |need: usize| FrameError::Short {
        format,
        width: w,
        height: h,
        got: data.len(),
        need,
    };
    match format {
        FrameFormat::MJPEG => image::load_from_memory_with_format(data, image::ImageFormat::Jpeg)
            .map(|i| i.to_rgb8())
            .map_err(FrameError::from),
        FrameFormat::YUYV => {
            let need = wu * hu * 2;
            if data.len() < need || !w.is_multiple_of(2) {
                return Err(short(need));
            }
            let mut out = Vec::with_capacity(wu * hu * 3);
            for q in data[..need].chunks_exact(4) {
                let (y0, u, y1, v) = (q[0], q[1], q[2], q[3]);
                out.extend(yuv_to_rgb(y0, u, v));
                out.extend(yuv_to_rgb(y1, u, v));
            }
            RgbImage::from_raw(w, h, out).ok_or_else(|| short(need))
        }
        FrameFormat::NV12 => {
            let need = wu * hu + wu.div_ceil(2) * 2 * hu.div_ceil(2);
            if data.len() < need {
                return Err(short(need));
            }
            let (ys, uv) = data.split_at(wu * hu);
            let uv_stride = wu.div_ceil(2) * 2;
            let mut out = Vec::with_capacity(wu * hu * 3);
            for y in 0..hu {
                for x in 0..wu {
                    let c = (y / 2) * uv_stride + (x / 2) * 2;
                    out.extend(yuv_to_rgb(ys[y * wu + x], uv[c], uv[c + 1]));
                }
            }
            RgbImage::from_raw(w, h, out).ok_or_else(|| short(need))
        }
        FrameFormat::GRAY => {
            let need = wu * hu;
            if data.len() < need {
                return Err(short(need));
            }
            let out = data[..need].iter().flat_map(|&g| [g, g, g]).collect();
            RgbImage::from_raw(w, h, out).ok_or_else(|| short(need))
        }
        FrameFormat::RAWRGB | FrameFormat::RAWBGR => {
            let need = wu * hu * 3;
            if data.len() < need {
                return Err(short(need));
            }
            let mut out = data[..need].to_vec();
            if format == FrameFormat::RAWBGR {
                for p in out.chunks_exact_mut(3) {
                    p.swap(0, 2);
                }
            }
            RgbImage::from_raw(w, h, out).ok_or_else(|| short(need))
        }
    }
}

/// BT.601 limited-range YUV to RGB, as webcams produce.
fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = (y as i32 - 16).max(0) * 298;
    let d = u as i32 - 128;
    let e = v as i32 - 128;
    let clip = |x: i32| ((x + 128) >> 8).clamp(0, 255) as u8;
    [
        clip(c + 409 * e),
        clip(c - 100 * d - 208 * e),
        clip(c + 516 * d),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuyv_and_nv12_decode_grey_and_colour() {
        // Mid grey: Y=126, U=V=128 -> about 128 on every channel.
        let yuyv = [126u8, 128, 126, 128].repeat(2 * 2 / 2);
        let img = decode(FrameFormat::YUYV, 2, 2, &yuyv).unwrap();
        let p = img.get_pixel(1, 1).0;
        assert!(p.iter().all(|&c| (c as i32 - 128).abs() <= 2), "{p:?}");
        // NV12 red-ish: V high.
        let mut nv12 = vec![82u8; 4];
        nv12.extend([90u8, 240]);
        let img = decode(FrameFormat::NV12, 2, 2, &nv12).unwrap();
        let p = img.get_pixel(0, 1).0;
        assert!(p[0] > 200 && p[1] < 60 && p[2] < 60, "{p:?}");
        let e = decode(FrameFormat::YUYV, 4, 4, &yuyv).unwrap_err();
        assert!(e.to_string().contains("expected 32"), "{e}");
        let bgr = decode(FrameFormat::RAWBGR, 1, 1, &[1, 2, 3]).unwrap();
        assert_eq!(bgr.get_pixel(0, 0).0, [3, 2, 1]);
        assert!(decode(FrameFormat::MJPEG, 2, 2, b"junk").is_err());
    }

    #[test]
    fn no_camera_is_an_error_not_a_panic() {
        // On machines without cameras (CI), opening one fails cleanly.
        if list_cameras().map(|c| c.is_empty()).unwrap_or(true) {
            let e = CameraSource::open(0, None).err().unwrap();
            assert!(e.to_string().contains("camera"), "{e}");
        }
    }
}
