//! Finishing a session whose writer died (a crash, a kill, a power cut):
//! cut a partial last line from session.jsonl and session.csv, count the
//! frames of video.mp4 (fragmented: it needs no repair), and mark
//! meta.json "recovered".
//!
//! A session is unfinished when meta.json says "recording" and nobody holds
//! its lock file: the writer holds it for as long as it records, and the OS
//! releases it when the process dies, however it dies. A session that is
//! still being recorded is left alone.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::meta::{RecoveryMeta, SessionMeta, SessionStatus};
use super::record::{csv_header, FrameRecord};
use super::{iso8601, write_atomic, SessionError, CSV_FILE, JSONL_FILE, LOCK_FILE, VIDEO_FILE};
use crate::vision::video::IndexedVideo;

/// What finalising did.
#[derive(Clone, Debug, PartialEq)]
pub enum Finalized {
    /// Nothing to do: the session was already complete or recovered.
    AlreadyFinished(SessionStatus),
    Recovered(RecoveryReport),
}

#[derive(Clone, Debug, PartialEq)]
pub struct RecoveryReport {
    pub dir: PathBuf,
    pub frames: u64,
    pub face_rows: u64,
    pub jsonl_bytes_cut: u64,
    pub csv_bytes_cut: u64,
    /// video.mp4, when it holds frames.
    pub video: Option<PathBuf>,
    pub video_frames: u64,
    pub errors: Vec<String>,
}

impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "recovered unfinished session {}: {} frames, {} face rows",
            self.dir.display(),
            self.frames,
            self.face_rows
        )?;
        match &self.video {
            Some(_) => write!(f, ", {} video frames", self.video_frames)?,
            None => write!(f, ", no video")?,
        }
        if self.jsonl_bytes_cut + self.csv_bytes_cut > 0 {
            write!(f, " (cut an unfinished last line)")?;
        }
        for e in &self.errors {
            write!(f, "; {e}")?;
        }
        Ok(())
    }
}

/// Whether `dir` is a session whose meta.json still says "recording".
pub fn is_unfinished(dir: &Path) -> bool {
    SessionMeta::read(dir).is_ok_and(|m| m.status == SessionStatus::Recording)
}

/// Finalises `dir` if it is an unfinished session whose writer is gone.
pub fn finalize(dir: &Path) -> Result<Finalized, SessionError> {
    let mut meta = SessionMeta::read(dir)?;
    if meta.status != SessionStatus::Recording {
        return Ok(Finalized::AlreadyFinished(meta.status));
    }
    // Holding the lock while we work also keeps a second finaliser out.
    let _lock = take_lock(dir)?;
    let jsonl = dir.join(JSONL_FILE);
    let csv = dir.join(CSV_FILE);
    let jsonl_bytes_cut = cut_partial_line(&jsonl)?;
    let csv_bytes_cut = cut_partial_line(&csv)?;
    let records = read_records(&jsonl)?;
    let frames = records.len() as u64;
    let face_rows: u64 = records.iter().map(|r| r.faces.len() as u64).sum();
    // The CSV is the JSONL flattened, written just after it: a crash between
    // the two writes of a frame leaves it a frame short. Rebuild it then.
    // (A crash before the first frame leaves it without even its header.)
    let csv_lines = count_lines(&csv)?;
    let csv_rebuilt = csv_lines == 0 || csv_lines - 1 != face_rows;
    if csv_rebuilt {
        let classes = &meta.classes;
        let mut text = csv_header(classes);
        for r in &records {
            text.push_str(&r.to_csv_rows(classes));
        }
        write_atomic(&csv, text.as_bytes()).map_err(|e| SessionError::write(&csv, e))?;
    }
    let last_wall = records.last().map(|r| r.wall.clone());

    let mut errors = Vec::new();
    let mut video = None;
    let mut video_frames = 0;
    let path = dir.join(VIDEO_FILE);
    if path.is_file() {
        match IndexedVideo::open(&path) {
            Ok(v) if !v.is_empty() => {
                video_frames = v.len() as u64;
                video = Some(path);
            }
            Ok(_) => {}
            Err(e) => errors.push(format!("the video is not readable: {e}")),
        }
    }

    meta.status = SessionStatus::Recovered;
    meta.ended = last_wall.or(meta.ended);
    meta.counts.frames = frames;
    meta.counts.face_rows = face_rows;
    meta.counts.video_frames = video_frames;
    for e in &errors {
        if !meta.errors.contains(e) {
            meta.errors.push(e.clone());
        }
    }
    meta.recovery = Some(RecoveryMeta {
        at: iso8601(SystemTime::now()),
        jsonl_bytes_cut,
        csv_bytes_cut,
        csv_rebuilt,
        video_frames: Some(video_frames),
    });
    meta.write(dir)?;
    let _ = std::fs::remove_file(dir.join(LOCK_FILE));
    Ok(Finalized::Recovered(RecoveryReport {
        dir: dir.to_path_buf(),
        frames,
        face_rows,
        jsonl_bytes_cut,
        csv_bytes_cut,
        video,
        video_frames,
        errors,
    }))
}

/// Finalises every unfinished session directly under `base` (the default
/// recordings folder at start-up); sessions still being recorded are skipped.
pub fn finalize_all(base: &Path) -> Vec<(PathBuf, Result<Finalized, SessionError>)> {
    let Ok(rd) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && is_unfinished(p))
        .collect();
    dirs.sort();
    dirs.into_iter()
        .filter_map(|d| match finalize(&d) {
            Err(SessionError::Busy(_)) => None,
            r => Some((d, r)),
        })
        .collect()
}

/// Locks the session's lock file; `Busy` when its writer still holds it.
fn take_lock(dir: &Path) -> Result<Option<File>, SessionError> {
    let path = dir.join(LOCK_FILE);
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SessionError::read(&path, e)),
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(SessionError::Busy(dir.to_path_buf())),
        // A file system without locks: go on.
        Err(std::fs::TryLockError::Error(_)) => Ok(Some(file)),
    }
}

/// Cuts everything after the last newline (a line the writer did not
/// finish); returns the bytes cut. A missing file cuts nothing.
pub fn cut_partial_line(path: &Path) -> Result<u64, SessionError> {
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(SessionError::read(path, e)),
    };
    let len = f.metadata().map_err(|e| SessionError::read(path, e))?.len();
    // Scan back from the end in blocks for the last newline.
    let mut end = len;
    let mut keep = 0;
    let mut buf = vec![0u8; 64 * 1024];
    'scan: while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))
            .and_then(|_| f.read_exact(&mut buf[..n]))
            .map_err(|e| SessionError::read(path, e))?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            keep = start + i as u64 + 1;
            break 'scan;
        }
        end = start;
    }
    if keep < len {
        f.set_len(keep)
            .and_then(|_| f.sync_all())
            .map_err(|e| SessionError::write(path, e))?;
    }
    Ok(len - keep)
}

/// Lines of a file (0 when it is missing).
fn count_lines(path: &Path) -> Result<u64, SessionError> {
    use std::io::BufRead;
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(SessionError::read(path, e)),
    };
    let mut n = 0;
    for line in std::io::BufReader::new(f).split(b'\n') {
        line.map_err(|e| SessionError::read(path, e))?;
        n += 1;
    }
    Ok(n)
}

/// The records of session.jsonl that read (none when it is missing).
fn read_records(path: &Path) -> Result<Vec<FrameRecord>, SessionError> {
    use std::io::BufRead;
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SessionError::read(path, e)),
    };
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).split(b'\n') {
        let line = line.map_err(|e| SessionError::read(path, e))?;
        if let Ok(r) = serde_json::from_slice::<FrameRecord>(&line) {
            out.push(r);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_only_the_unfinished_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(&p, "{\"a\":1}\n{\"a\":2}\n{\"a\"").unwrap();
        assert_eq!(cut_partial_line(&p).unwrap(), 4);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n"
        );
        assert_eq!(cut_partial_line(&p).unwrap(), 0);
        std::fs::write(&p, "no newline at all").unwrap();
        assert_eq!(cut_partial_line(&p).unwrap(), 17);
        assert_eq!(std::fs::read(&p).unwrap().len(), 0);
        assert_eq!(cut_partial_line(&dir.path().join("missing")).unwrap(), 0);
    }

    #[test]
    fn a_live_session_is_left_alone_and_a_dead_one_recovered() {
        use crate::session::writer::{Clock, SessionOptions, SessionWriter};
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("s");
        let mut opts = SessionOptions::new(&dir, Clock::Source);
        opts.video = false;
        let w = SessionWriter::create(opts).unwrap();
        assert!(is_unfinished(&dir));
        assert!(matches!(finalize(&dir), Err(SessionError::Busy(_))));
        assert!(
            finalize_all(base.path()).is_empty(),
            "busy sessions are skipped"
        );
        // A dead writer's session: its files with a lock file nobody holds.
        let dead = base.path().join("dead");
        std::fs::create_dir(&dead).unwrap();
        for f in [crate::session::META_FILE, JSONL_FILE, CSV_FILE, LOCK_FILE] {
            std::fs::copy(dir.join(f), dead.join(f)).unwrap();
        }
        std::fs::write(
            dead.join(JSONL_FILE),
            "{\"frame\":0,\"seq\":0,\"t\":0.0,\"wall\":\"2026-05-01T12:30:05.123Z\",\"source_t\":0.0,\"faces\":[]}\n{\"fra",
        )
        .unwrap();
        w.finish().unwrap();
        assert!(!is_unfinished(&dir));
        let out = finalize_all(base.path());
        assert_eq!(out.len(), 1, "{out:?}");
        let Ok(Finalized::Recovered(r)) = &out[0].1 else {
            panic!("{out:?}");
        };
        assert_eq!((r.frames, r.face_rows, r.jsonl_bytes_cut), (1, 0, 5));
        let meta = SessionMeta::read(&dead).unwrap();
        assert_eq!(meta.status, SessionStatus::Recovered);
        assert_eq!(meta.ended.as_deref(), Some("2026-05-01T12:30:05.123Z"));
        assert!(!dead.join(LOCK_FILE).exists());
        assert_eq!(
            finalize(&dead).unwrap(),
            Finalized::AlreadyFinished(SessionStatus::Recovered)
        );
    }
}
