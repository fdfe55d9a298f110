//! Frame sources: where the live app and `cliper run` get their frames.
//!
//! One interface, [`FrameSource`], over a camera ([`camera`]), a video file
//! of any format the system FFmpeg reads ([`video`]), a still image or a
//! folder of images ([`stills`]) and a built-in demo ([`demo`]).
//!
//! A source is described by a [`SourceSpec`] (plain data, `Send`) and opened
//! with [`SourceSpec::open`] on the thread that reads it: camera handles are not
//! `Send` on every platform, and opening a camera or a video can take a while,
//! which must not happen on the UI thread.
//!
//! Sources do not pace themselves: `next_frame` returns as soon as it has a
//! frame (a camera blocks until the device delivers one). Playing a file in
//! real time is the consumer's job (see `pipeline::worker`), so the same source
//! also serves batch processing at full speed.

pub mod camera;
pub mod demo;
pub mod stills;
pub mod video;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;

use crate::vision::images::ImageError;
use crate::vision::video::{has_video_extension, VideoError};

/// One frame of a source.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The picture, RGB.
    pub image: Arc<RgbImage>,
    /// Position in the source, from 0.
    pub index: u64,
    /// Time in seconds: the frame's timestamp in a file, or time since the
    /// source opened for a camera.
    pub t: f64,
}

/// Errors of frame sources; each names the file or device and what to do.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {0} not found: give a video (.mp4, .mov, .mkv, .webm, .avi, ...), an image, a folder of images, `demo`, or a camera with --camera N")]
    NotFound(PathBuf),
    #[error(transparent)]
    Video(#[from] VideoError),
    #[error("folder {0} holds no images (.png, .jpg, .jpeg, .bmp, .gif, .webp, .tif, .tiff)")]
    EmptyFolder(PathBuf),
    #[error("cannot list folder {path}: {reason}")]
    Folder { path: PathBuf, reason: String },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("no camera found{0}; plug one in, check its permissions (on Linux: membership of the `video` group), or use --source demo|VIDEO|IMAGE|FOLDER")]
    NoCamera(String),
    #[error("cannot open camera {index}{name}: {reason}; check that no other program uses it, or pick another with --camera N")]
    Camera {
        index: u32,
        name: String,
        reason: String,
    },
    #[error("camera {index}{name} stopped delivering frames: {reason}. Reconnect it and choose it again, or switch to the demo source")]
    CameraLost {
        index: u32,
        name: String,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl SourceError {
    /// Whether the source can go on after this error (a bad frame is skipped;
    /// a lost device or an unreadable file ends the source).
    pub fn is_recoverable(&self) -> bool {
        matches!(self, SourceError::Image(_))
    }
}

/// A stream of frames.
pub trait FrameSource {
    /// The next frame; `Ok(None)` when a finite source has ended. Blocks
    /// until a live source delivers.
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError>;
    /// Number of frames when known (files, folders); `None` for cameras and
    /// endless sources.
    fn frame_count(&self) -> Option<u64>;
    /// Nominal frames per second.
    fn fps(&self) -> f64;
    /// A short name for display: the file name, the camera name, `demo`.
    fn name(&self) -> String;
    /// Whether frames arrive in real time by themselves (cameras). Other
    /// sources are paced by the consumer when shown live.
    fn is_live(&self) -> bool {
        false
    }
    /// Warnings noticed since the last call that did not stop the source
    /// (a damaged packet skipped, a file that ended early).
    fn take_warnings(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// Milliseconds the last `next_frame` spent decoding (videos; 0 otherwise).
    fn decode_ms(&self) -> f32 {
        0.0
    }
}

pub use crate::vision::images::IMAGE_EXTENSIONS;

/// What to open: plain data that can cross threads and be persisted.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceSpec {
    /// A camera by index, at a requested resolution (`None`: the camera's choice).
    Camera {
        index: u32,
        resolution: Option<(u32, u32)>,
    },
    /// A video file, read through FFmpeg.
    Video(PathBuf),
    /// One image, repeated (`fps` frames per second).
    Still { path: PathBuf, fps: f64 },
    /// The images of a folder in name order, played as frames.
    Folder { path: PathBuf, fps: f64 },
    /// The built-in demo.
    Demo,
}

/// The slowest `--fps` accepted: one frame every 100 s.
pub const MIN_FPS: f64 = 0.01;

/// Frame rate of still images and folders unless told otherwise.
pub const DEFAULT_IMAGE_FPS: f64 = 25.0;

impl SourceSpec {
    /// Parses `--source`: `demo`, `camera` / `camera:N`, or a path (a video,
    /// an image or a folder). `fps` applies to images and folders.
    pub fn parse(text: &str, fps: Option<f64>) -> Result<Self, SourceError> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("demo") {
            return Ok(SourceSpec::Demo);
        }
        if let Some(rest) = text.strip_prefix("camera") {
            let rest = rest.trim_start_matches(':');
            if rest.is_empty() {
                return Ok(SourceSpec::Camera {
                    index: 0,
                    resolution: None,
                });
            }
            if let Ok(index) = rest.parse::<u32>() {
                return Ok(SourceSpec::Camera {
                    index,
                    resolution: None,
                });
            }
        }
        let fps = match fps {
            Some(f) if !(f.is_finite() && (MIN_FPS..=1000.0).contains(&f)) => {
                let shown = if f != 0.0 && !(1e-3..1e6).contains(&f.abs()) {
                    format!("{f:e}")
                } else {
                    f.to_string()
                };
                return Err(SourceError::Invalid(format!(
                    "--fps {shown} is out of range: give frames per second from {MIN_FPS} to 1000"
                )));
            }
            Some(f) => f,
            None => DEFAULT_IMAGE_FPS,
        };
        Self::from_path(Path::new(text), fps)
    }

    /// Chooses the reader for a path by its extension, or its first bytes.
    pub fn from_path(path: &Path, fps: f64) -> Result<Self, SourceError> {
        if path.is_dir() {
            return Ok(SourceSpec::Folder {
                path: path.to_path_buf(),
                fps,
            });
        }
        if !path.is_file() {
            return Err(SourceError::NotFound(path.to_path_buf()));
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            return Ok(SourceSpec::Still {
                path: path.to_path_buf(),
                fps,
            });
        }
        if has_video_extension(path) {
            return Ok(SourceSpec::Video(path.to_path_buf()));
        }
        // No telling extension: an image if the image decoder knows its
        // first bytes, otherwise FFmpeg has a go (and names the file if it
        // fails).
        let mut head = [0u8; 32];
        let n = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
            .unwrap_or(0);
        if image::guess_format(&head[..n]).is_ok() {
            Ok(SourceSpec::Still {
                path: path.to_path_buf(),
                fps,
            })
        } else {
            Ok(SourceSpec::Video(path.to_path_buf()))
        }
    }

    /// Opens the source. Call it on the thread that reads the frames.
    pub fn open(&self) -> Result<Box<dyn FrameSource>, SourceError> {
        Ok(match self {
            SourceSpec::Camera { index, resolution } => {
                Box::new(camera::CameraSource::open(*index, *resolution)?)
            }
            SourceSpec::Video(p) => Box::new(video::VideoSource::open(p)?),
            SourceSpec::Still { path, fps } => Box::new(stills::StillSource::open(path, *fps)?),
            SourceSpec::Folder { path, fps } => Box::new(stills::FolderSource::open(path, *fps)?),
            SourceSpec::Demo => Box::new(demo::DemoSource::new()),
        })
    }

    /// A short description for status lines.
    pub fn label(&self) -> String {
        match self {
            SourceSpec::Camera { index, resolution } => match resolution {
                Some((w, h)) => format!("camera {index} at {w}x{h}"),
                None => format!("camera {index}"),
            },
            SourceSpec::Video(p) => p.display().to_string(),
            SourceSpec::Still { path, .. } | SourceSpec::Folder { path, .. } => {
                path.display().to_string()
            }
            SourceSpec::Demo => "demo".to_string(),
        }
    }

    /// The text `--source` accepts for this spec (for persisted settings).
    pub fn to_arg(&self) -> String {
        match self {
            SourceSpec::Camera { index, .. } => format!("camera:{index}"),
            SourceSpec::Demo => "demo".to_string(),
            other => other.label(),
        }
    }

    /// Whether this is a camera.
    pub fn is_camera(&self) -> bool {
        matches!(self, SourceSpec::Camera { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names() {
        assert_eq!(SourceSpec::parse("demo", None).unwrap(), SourceSpec::Demo);
        assert_eq!(
            SourceSpec::parse("camera:2", None).unwrap(),
            SourceSpec::Camera {
                index: 2,
                resolution: None
            }
        );
        let e = SourceSpec::parse("/no/such/video.mp4", None).unwrap_err();
        assert!(e.to_string().contains("/no/such/video.mp4"), "{e}");
        let e = SourceSpec::parse(".", Some(-1.0)).unwrap_err();
        assert!(e.to_string().contains("--fps"), "{e}");
    }

    #[test]
    fn sniffs_files_without_extension() {
        let dir = tempfile::tempdir().unwrap();
        let avi = dir.path().join("clip");
        std::fs::write(&avi, b"RIFF\0\0\0\0AVI LIST").unwrap();
        assert!(matches!(
            SourceSpec::parse(avi.to_str().unwrap(), None).unwrap(),
            SourceSpec::Video(_)
        ));
        let png = dir.path().join("still");
        std::fs::write(&png, b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").unwrap();
        assert!(matches!(
            SourceSpec::parse(png.to_str().unwrap(), None).unwrap(),
            SourceSpec::Still { .. }
        ));
        for name in ["a.webm", "b.MKV", "c.mov"] {
            let p = dir.path().join(name);
            std::fs::write(&p, b"x").unwrap();
            assert!(
                matches!(
                    SourceSpec::parse(p.to_str().unwrap(), None).unwrap(),
                    SourceSpec::Video(_)
                ),
                "{name}"
            );
        }
        assert!(matches!(
            SourceSpec::parse(dir.path().to_str().unwrap(), Some(10.0)).unwrap(),
            SourceSpec::Folder { fps, .. } if fps == 10.0
        ));
    }
}
