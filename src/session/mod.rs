//! Recording and replay of annotated sessions.
//!
//! A session is a folder:
//!
//! ```text
//! meta.json       what was recorded with what: app version, weights and their
//!                 SHA-256, descriptor bank, device, settings, source, start
//!                 and end time, counts, and "status" (recording, complete,
//!                 recovered)
//! session.jsonl   one line per processed frame (see [`record::FrameRecord`])
//! session.csv     one row per face per frame (see [`record::CSV_COLUMNS`])
//! video.mp4       the annotated video (H.264, fragmented MP4: playable while
//!                 it is written and after a crash)
//! raw.mp4         optionally, the same frames without annotations
//! ```
//!
//! Crash safety comes from how the files are written, not from a clean exit:
//! every line is appended and flushed frame by frame, the video gets a
//! fragment every half second, and `meta.json` is replaced atomically. A session
//! whose `meta.json` still says "recording" after its writer is gone is
//! finalised by [`finalize`]: partial last lines are cut, the video's frames
//! are counted, and it is marked "recovered".
//!
//! [`writer`] records (on its own threads, never blocking the caller),
//! [`replay`] loads a session without any model, [`report`] summarises one.
//! The pipeline feeds the writer (`pipeline::recorder`); nothing here knows
//! about the pipeline or the UI.

pub mod finalize;
pub mod meta;
pub mod record;
pub mod replay;
pub mod report;
pub mod timeline;
pub mod video;
pub mod writer;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use meta::{SessionMeta, SessionStatus};
pub use record::{FaceRecord, FrameRecord};
pub use replay::Session;
pub use writer::{SessionOptions, SessionWriter, WriterStatus};

pub const META_FILE: &str = "meta.json";
pub const JSONL_FILE: &str = "session.jsonl";
pub const CSV_FILE: &str = "session.csv";
pub const VIDEO_FILE: &str = "video.mp4";
pub const RAW_VIDEO_FILE: &str = "raw.mp4";
/// Held (locked) by the writing process for as long as it records; the OS
/// releases the lock when the process dies, however it dies.
pub const LOCK_FILE: &str = "recording.lock";

/// Errors of recording, finalising, replaying and reporting sessions; each
/// names the folder or file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot record to {path}: {reason}; choose another folder (a new or empty one)")]
    Create { path: PathBuf, reason: String },
    #[error("cannot record to {0}: the folder is not empty; give a new folder (cliper never overwrites a recording)")]
    NotEmpty(PathBuf),
    #[error("cannot write {path}: {reason}. Recording stopped; what was written so far is kept (free some disk space or pick another folder)")]
    Write { path: PathBuf, reason: String },
    #[error(
        "{0} is not a cliper session: it has no meta.json (give the folder that `--record` wrote)"
    )]
    NotASession(PathBuf),
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(
        "session {0} is still being recorded by another cliper process; stop that recording first"
    )]
    Busy(PathBuf),
    #[error(transparent)]
    Video(#[from] crate::vision::video::VideoError),
}

impl SessionError {
    pub(crate) fn write(path: &Path, e: impl std::fmt::Display) -> Self {
        SessionError::Write {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }

    pub(crate) fn read(path: &Path, e: impl std::fmt::Display) -> Self {
        SessionError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}

/// Where the app keeps recordings unless told otherwise:
/// `$CLIPER_RECORDINGS`, else `cliper-recordings` in the home folder.
pub fn default_recordings_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CLIPER_RECORDINGS").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join("cliper-recordings")
}

/// A new, not yet existing folder under `base` named after the current
/// UTC time (`2026-05-01_12-30-05`, then `_2`, `_3`, ...).
pub fn new_session_dir(base: &Path) -> PathBuf {
    let now = iso8601(SystemTime::now()); // 2026-05-01T12:30:05.123Z
    let stamp = format!("{}_{}", &now[..10], now[11..19].replace(':', "-"));
    let mut dir = base.join(&stamp);
    let mut n = 2;
    while dir.exists() {
        dir = base.join(format!("{stamp}_{n}"));
        n += 1;
    }
    dir
}

/// A wall-clock time as ISO 8601 (RFC 3339) in UTC with milliseconds:
/// `2026-05-01T12:30:05.123Z`.
pub fn iso8601(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Replaces `path` with `bytes` atomically: a reader (or a crash) sees the
/// old file or the new one, never half of one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn iso8601_known_dates() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_250); // leap day
        assert_eq!(iso8601(t), "2000-02-29T00:00:00.250Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_777_638_605);
        assert_eq!(iso8601(t), "2026-05-01T12:30:05.000Z");
    }

    #[test]
    fn session_dirs_are_new() {
        let base = tempfile::tempdir().unwrap();
        let a = new_session_dir(base.path());
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name.len(), 19, "{name}");
        assert_eq!(&name[4..5], "-");
        assert_eq!(&name[10..11], "_");
        assert!(!name.contains(':'));
        std::fs::create_dir(&a).unwrap();
        let b = new_session_dir(base.path());
        assert_ne!(a, b);
    }
}
