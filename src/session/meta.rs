//! `meta.json`: what a session was recorded with, and whether it finished.
//!
//! Written when recording starts ("status": "recording"), rewritten
//! atomically when something is learnt (the model, the weights' SHA-256, a
//! new descriptor bank or source) and at the end ("complete"). Every field
//! but `status` is optional on reading, so a session from an older or
//! interrupted writer still loads.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{write_atomic, SessionError, META_FILE};
use crate::model::cliper::expressions::CLASSES;

pub const FORMAT: &str = "cliper-session";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    /// Being recorded, or the writer died (see `finalize`).
    Recording,
    /// Finished by its writer.
    Complete,
    /// Finished by `finalize` after the writer died.
    Recovered,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Recording => "recording",
            SessionStatus::Complete => "complete",
            SessionStatus::Recovered => "recovered",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionMeta {
    #[serde(default)]
    pub format: String,
    #[serde(default)]
    pub format_version: u32,
    pub status: SessionStatus,
    #[serde(default)]
    pub app: AppInfo,
    /// Wall clock, ISO 8601 UTC.
    #[serde(default)]
    pub started: String,
    #[serde(default)]
    pub ended: Option<String>,
    /// What `t` measures: "capture" (seconds since recording started, when
    /// each frame was captured: live sources) or "source" (the frame's time
    /// in its source minus the first recorded frame's: files in batch runs).
    #[serde(default)]
    pub clock: String,
    /// Class names in the order of every per-class list and column.
    #[serde(default)]
    pub classes: Vec<String>,
    #[serde(default)]
    pub model: Option<ModelMeta>,
    /// Descriptor banks in use, in order (the bank can change mid-session).
    #[serde(default)]
    pub banks: Vec<BankMeta>,
    /// Sources, in order (the app can switch sources mid-session).
    #[serde(default)]
    pub sources: Vec<SourceMeta>,
    /// Free-form settings of the run (detection, margin, smoothing, probe, ...).
    #[serde(default)]
    pub settings: Value,
    #[serde(default)]
    pub video: Option<VideoMeta>,
    #[serde(default)]
    pub counts: Counts,
    /// Problems met while recording (the first one stopped the recording).
    #[serde(default)]
    pub errors: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoveryMeta>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AppInfo {
    pub name: String,
    pub version: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// The CLIP weights file.
    pub weights: String,
    /// Hex SHA-256 of the weights file; computed in the background, `None`
    /// until it is done (or when the file could not be read).
    pub weights_sha256: Option<String>,
    /// "CPU", "CUDA", "Metal".
    pub device: String,
    /// The image encoder's precision and kernel, as `--precision auto`
    /// chose it or as given (`q8 avx512-vnni`, `f32 avx2`, `candle`).
    #[serde(default)]
    pub kernel: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BankMeta {
    /// "learned", "zero-shot" or "dfer-clip".
    pub kind: String,
    /// The checkpoint or prompts file, or "built-in".
    pub source: String,
    /// The bank's classes, in its order, and descriptors per class.
    #[serde(default)]
    pub classes: Vec<String>,
    #[serde(default)]
    pub descriptors_per_class: Vec<usize>,
    /// The Exp-CLIP head the bank was scored through, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// SHA-256 of the checkpoint or prompts file, when it is one.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The descriptor texts, class-major (nearest-word readings for
    /// learned descriptors).
    pub texts: Vec<String>,
    /// Session time from which this bank was used.
    pub from_t: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceMeta {
    /// What `--source` takes for it (`camera:0`, `demo`, a path).
    pub source: String,
    /// A short display name.
    pub name: String,
    pub fps: f64,
    pub live: bool,
    /// Frames, when known.
    pub frames: Option<u64>,
    /// Session time from which this source was used.
    pub from_t: f64,
    /// Added to the tracker's ids of this source so that ids stay unique in
    /// the session (0 for the first source).
    pub face_id_offset: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VideoMeta {
    pub codec: String,
    pub width: u32,
    pub height: u32,
    /// The source's nominal rate; frames carry their own times (the video
    /// time of a frame is its `t` minus `start_t`).
    pub fps: f64,
    /// Session time of the first video frame.
    pub start_t: f64,
    /// The FFmpeg encoder that wrote it (`libx264`, ...).
    #[serde(default)]
    pub encoder: String,
    #[serde(default)]
    pub container: String,
    /// Whether `raw.mp4` (no annotations) was recorded too.
    pub raw: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Lines of session.jsonl.
    pub frames: u64,
    /// Rows of session.csv (faces over all frames).
    pub face_rows: u64,
    pub video_frames: u64,
    /// Video frames not recorded because the encoder fell behind (their
    /// scores are still in the JSONL and CSV).
    pub video_frames_dropped: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecoveryMeta {
    /// When the session was finalised, ISO 8601 UTC.
    pub at: String,
    /// Bytes of an unfinished last line cut from session.jsonl and session.csv.
    pub jsonl_bytes_cut: u64,
    pub csv_bytes_cut: u64,
    /// Whether session.csv was rebuilt from session.jsonl (the crash fell
    /// between the two writes of a frame).
    #[serde(default)]
    pub csv_rebuilt: bool,
    /// Frames of video.mp4 readable after the crash (it needs no repair:
    /// it is fragmented MP4; the open fragment, at most 0.5 s, is lost).
    #[serde(default)]
    pub video_frames: Option<u64>,
}

impl SessionMeta {
    /// A new session's meta, status "recording".
    pub fn new(started: String, clock: &str, settings: Value) -> Self {
        Self {
            format: FORMAT.to_string(),
            format_version: FORMAT_VERSION,
            status: SessionStatus::Recording,
            app: AppInfo {
                name: env!("CARGO_PKG_NAME").to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
            started,
            ended: None,
            clock: clock.to_string(),
            classes: CLASSES.iter().map(|c| c.to_string()).collect(),
            model: None,
            banks: Vec::new(),
            sources: Vec::new(),
            settings,
            video: None,
            counts: Counts::default(),
            errors: Vec::new(),
            recovery: None,
        }
    }

    pub fn read(dir: &Path) -> Result<Self, SessionError> {
        let path = dir.join(META_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SessionError::NotASession(dir.to_path_buf()))
            }
            Err(e) => return Err(SessionError::read(&path, e)),
        };
        serde_json::from_str(&text).map_err(|e| SessionError::read(&path, e))
    }

    /// Replaces `meta.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<(), SessionError> {
        let path = dir.join(META_FILE);
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        write_atomic(&path, text.as_bytes()).map_err(|e| SessionError::write(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_reads_leniently() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = SessionMeta::new("2026-05-01T12:30:05.123Z".into(), "source", Value::Null);
        m.counts.frames = 4;
        m.write(dir.path()).unwrap();
        let back = SessionMeta::read(dir.path()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.classes.len(), 7);
        assert!(!dir.path().join("meta.tmp").exists());
        std::fs::write(dir.path().join(META_FILE), r#"{"status": "recording"}"#).unwrap();
        let minimal = SessionMeta::read(dir.path()).unwrap();
        assert_eq!(minimal.status, SessionStatus::Recording);
        let e = SessionMeta::read(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(e, SessionError::NotASession(_)), "{e}");
    }
}
