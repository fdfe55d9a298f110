//! Video files through the system FFmpeg (libavformat, libavcodec,
//! libswscale, via `ffmpeg-next`): the one decoder of every video cliper
//! reads (live playback, `cliper run`, `classify-clip`, replay, training on
//! clips) and the one encoder of the videos it records.
//!
//! - [`VideoReader`] decodes any container and codec the installed FFmpeg
//!   reads, frame by frame with constant memory. Frame times come from the
//!   stream's timestamps (PTS x time base, from the stream's start), so
//!   variable-frame-rate files keep their real times. The display matrix is
//!   applied (a portrait phone video comes out upright). Seeking goes to the
//!   key frame before the time asked for and decodes forward to it.
//! - [`IndexedVideo`] adds random access by frame number (replay's scrubber).
//! - [`VideoWriter`] encodes H.264 (libx264 where the build has it) into
//!   fragmented MP4, a fragment every half second, so a killed recording
//!   plays without any repair and lacks at most its last half second.
//!
//! Damage is not fatal: an undecodable packet is skipped and counted, a
//! truncated file ends early; both are reported once through
//! [`VideoReader::take_warnings`]. FFmpeg's own log is silenced (set
//! `CLIPER_FFMPEG_LOG=warning` or `debug` to see it), since cliper reports
//! what matters itself.

mod decode;
mod encode;
mod indexed;
mod rgb;

pub use decode::{DecodedFrame, VideoInfo, VideoReader};
pub use encode::{VideoWriter, FRAGMENT_SECS};
pub use indexed::IndexedVideo;

use std::path::{Path, PathBuf};
use std::sync::Once;

pub use ffmpeg_next as ffmpeg;

/// File extensions taken for videos without looking inside. Anything else
/// that is not an image is offered to FFmpeg too.
pub const VIDEO_EXTENSIONS: &[&str] = &[
    "mp4", "m4v", "mov", "qt", "mkv", "webm", "avi", "mpg", "mpeg", "ts", "m2ts", "mts", "flv",
    "wmv", "asf", "ogv", "3gp", "3g2", "mxf", "y4m", "dv", "vob", "h264", "264", "hevc", "265",
    "ivf",
];

/// Errors of reading and writing videos; each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("video {0} not found")]
    NotFound(PathBuf),
    #[error("cannot open {path} as a video: {reason}. cliper reads what the installed FFmpeg reads (MP4, MOV, MKV, WebM, AVI, ...); check the file with `ffprobe {path}`")]
    Open { path: PathBuf, reason: String },
    #[error("{path} has no video stream{found}: give a video file")]
    NoVideoStream { path: PathBuf, found: String },
    #[error("cannot decode the video of {path}: it is {codec}, and this FFmpeg build (libavcodec {version}) has no decoder for it. Install an FFmpeg with one, or convert the file: `ffmpeg -i {path} -c:v libx264 -pix_fmt yuv420p OUT.mp4`")]
    NoDecoder {
        path: PathBuf,
        codec: String,
        version: String,
    },
    #[error("cannot read video {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("cannot write video {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("cannot record video to {path}: this FFmpeg build has no usable H.264 encoder (tried {tried}). Install an FFmpeg built with libx264 (Debian/Ubuntu: the distribution's `libavcodec-extra` or `libavcodec59`)")]
    NoEncoder { path: PathBuf, tried: String },
}

impl VideoError {
    pub(crate) fn read(path: &Path, reason: impl std::fmt::Display) -> Self {
        VideoError::Read {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn write(path: &Path, reason: impl std::fmt::Display) -> Self {
        VideoError::Write {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

/// Initialises FFmpeg once per process and sets its log level.
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = ffmpeg::init();
        use ffmpeg::util::log::Level;
        let level = match std::env::var("CLIPER_FFMPEG_LOG").as_deref() {
            Ok("debug") => Level::Debug,
            Ok("verbose") => Level::Verbose,
            Ok("info") => Level::Info,
            Ok("warning") => Level::Warning,
            Ok("error") => Level::Error,
            _ => Level::Quiet,
        };
        ffmpeg::util::log::set_level(level);
    });
}

/// `libavformat 59.27.100, libavcodec 59.37.100`: what FFmpeg this process runs.
pub fn ffmpeg_version() -> String {
    fn v(n: u32) -> String {
        format!("{}.{}.{}", n >> 16, (n >> 8) & 0xff, n & 0xff)
    }
    format!(
        "libavformat {}, libavcodec {}",
        v(ffmpeg::format::version()),
        v(ffmpeg::codec::version())
    )
}

/// Whether `path` names a video by its extension.
pub fn has_video_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| VIDEO_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}
