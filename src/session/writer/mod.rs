//! [`SessionWriter`]: records a session on its own threads.
//!
//! ```text
//!  caller ──(unbounded)──> data thread:  session.jsonl, session.csv,
//!    │                                   meta.json; at the end marks the
//!    │                                   session complete
//!    └──(bounded, drops)──> video thread: annotate, encode (FFmpeg)
//! ```
//!
//! The caller (the app's UI thread) never waits: rows are small and always
//! queued; live video frames are dropped (and counted) when the encoder
//! falls behind, never the scores. A batch run of a file waits for the
//! encoder instead, so its video has every frame. The first write error
//! stops the recording: [`SessionWriter::status`] carries it for the caller
//! to show, later frames are ignored, and whatever was written stays
//! readable. The caller's pipeline is unaffected.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender, TrySendError};
use image::RgbImage;
use serde_json::Value;
use sha2::{Digest, Sha256};

mod data;
mod video_thread;

pub use data::sha256_file;
use data::DataThread;
use video_thread::video_loop;

use super::meta::{BankMeta, ModelMeta, SessionMeta, SessionStatus, SourceMeta, VideoMeta};
use super::record::{csv_header, FrameRecord};
use super::video::FaceMark;
use super::{iso8601, SessionError, CSV_FILE, JSONL_FILE, LOCK_FILE, VIDEO_FILE};

/// Video frames waiting for the encoder before new ones are dropped.
pub const DEFAULT_VIDEO_QUEUE: usize = 8;
/// How long finishing waits for the weights' hash before leaving it out.
const HASH_WAIT: Duration = Duration::from_secs(60);
/// Lines are flushed every frame; they are also synced to the disk this often.
const SYNC_EVERY: Duration = Duration::from_secs(2);

/// What `t` measures in a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// Seconds since recording started, when each frame was captured.
    Capture,
    /// The frame's time in its source minus the first recorded frame's.
    Source,
}

impl Clock {
    pub fn as_str(self) -> &'static str {
        match self {
            Clock::Capture => "capture",
            Clock::Source => "source",
        }
    }
}

#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// The session folder: new, or empty.
    pub dir: PathBuf,
    pub clock: Clock,
    /// Free-form settings for meta.json.
    pub settings: Value,
    /// Record the annotated video.
    pub video: bool,
    /// Also record the frames without annotations (`raw.mp4`).
    pub raw_video: bool,
    pub video_queue: usize,
    /// Drop video frames when the encoder falls behind (live: the pipeline
    /// must never wait); otherwise wait for it (batch runs of a file: the
    /// video is complete and the run goes at the encoder's pace at worst).
    pub drop_late_video: bool,
}

impl SessionOptions {
    pub fn new(dir: impl Into<PathBuf>, clock: Clock) -> Self {
        Self {
            dir: dir.into(),
            clock,
            settings: Value::Null,
            video: true,
            raw_video: false,
            video_queue: DEFAULT_VIDEO_QUEUE,
            drop_late_video: clock == Clock::Capture,
        }
    }
}

/// A frame for the video: the picture, its session time, its faces.
#[derive(Clone, Debug)]
pub struct VideoFrame {
    pub image: Arc<RgbImage>,
    pub t: f64,
    /// The source's nominal rate (sets the encoder's bit rate).
    pub fps: f64,
    pub marks: Vec<FaceMark>,
}

/// Facts learnt while recording, for meta.json.
#[derive(Clone, Debug)]
pub enum MetaUpdate {
    /// The model is loaded; the weights file is hashed in the background.
    Model {
        weights: PathBuf,
        device: String,
        kernel: String,
    },
    /// A descriptor bank came into use; `file` is hashed when given.
    Bank {
        bank: BankMeta,
        file: Option<PathBuf>,
    },
    Source(SourceMeta),
    /// Replaces meta.json's settings.
    Settings(Value),
    Video(VideoMeta),
}

/// Where a recording stands, for a status line.
#[derive(Clone, Debug, Default)]
pub struct WriterStatus {
    pub dir: PathBuf,
    pub elapsed: Duration,
    pub frames: u64,
    pub face_rows: u64,
    pub video_frames: u64,
    pub video_dropped: u64,
    /// The error that stopped the recording.
    pub error: Option<String>,
}

/// What a finished recording left.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FinishReport {
    pub dir: PathBuf,
    pub frames: u64,
    pub face_rows: u64,
    pub video_frames: u64,
    pub video_dropped: u64,
    /// `video.mp4`, when it was written.
    pub video: Option<PathBuf>,
    /// Errors met (the first one stopped the recording).
    pub errors: Vec<String>,
}

#[derive(Default)]
struct Shared {
    frames: AtomicU64,
    face_rows: AtomicU64,
    video_frames: AtomicU64,
    video_dropped: AtomicU64,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Shared {
    /// Records the first error; later ones only go to meta.json.
    fn fail(&self, e: &SessionError) {
        self.failed.store(true, Ordering::SeqCst);
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert_with(|| e.to_string());
        }
    }

    fn error(&self) -> Option<String> {
        self.error.lock().ok().and_then(|e| e.clone())
    }
}

enum DataMsg {
    Frame(Box<FrameRecord>),
    Meta(Box<MetaUpdate>),
    Hashed { path: PathBuf, hex: Option<String> },
    Finish,
}

/// A recording in progress. Dropping it finishes the recording (and waits).
pub struct SessionWriter {
    dir: PathBuf,
    started: Instant,
    data_tx: Sender<DataMsg>,
    video_tx: Option<Sender<VideoFrame>>,
    drop_late_video: bool,
    shared: Arc<Shared>,
    data_thread: Option<JoinHandle<Result<FinishReport, SessionError>>>,
}

impl SessionWriter {
    /// Creates the session folder and its files and starts the threads.
    /// Fails when the folder exists and is not empty, or cannot be written.
    pub fn create(opts: SessionOptions) -> Result<Self, SessionError> {
        let dir = opts.dir.clone();
        let create_err = |e: &dyn std::fmt::Display| SessionError::Create {
            path: dir.clone(),
            reason: e.to_string(),
        };
        if dir.exists() {
            if !dir.is_dir() {
                return Err(create_err(&"it is a file"));
            }
            let mut entries = std::fs::read_dir(&dir).map_err(|e| create_err(&e))?;
            if entries.next().is_some() {
                return Err(SessionError::NotEmpty(dir));
            }
        }
        std::fs::create_dir_all(&dir).map_err(|e| create_err(&e))?;
        // The lock tells `finalize` that this session is alive.
        let lock = File::create(dir.join(LOCK_FILE)).map_err(|e| create_err(&e))?;
        match lock.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SessionError::Busy(dir.clone()));
            }
            // A file system without locks: record anyway (`finalize` then
            // cannot tell this live session from a dead one).
            Ok(()) | Err(std::fs::TryLockError::Error(_)) => {}
        }
        let _ = writeln!(&lock, "{}", std::process::id());
        let mut meta = SessionMeta::new(
            iso8601(SystemTime::now()),
            opts.clock.as_str(),
            opts.settings.clone(),
        );
        if opts.video {
            meta.video = Some(VideoMeta {
                codec: "h264".into(),
                raw: opts.raw_video,
                ..Default::default()
            });
        }
        meta.write(&dir)?;
        let open = |name: &str| {
            let path = dir.join(name);
            OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)
                .map_err(|e| SessionError::write(&path, e))
        };
        let jsonl = open(JSONL_FILE)?;
        // The header names the model's classes: it is written with the
        // first frame (or at the end), once the bank is known.
        let csv = open(CSV_FILE)?;

        let shared = Arc::new(Shared::default());
        let opts_drop_late_video = opts.drop_late_video;
        let (data_tx, data_rx) = unbounded();
        let (video_tx, video_thread) = if opts.video {
            let (tx, rx) = bounded(opts.video_queue.max(1));
            let (d, o, s, m) = (dir.clone(), opts.clone(), shared.clone(), data_tx.clone());
            let h = spawn("cliper-rec-video", move || video_loop(rx, d, o, s, m))
                .map_err(|e| create_err(&e))?;
            (Some(tx), Some(h))
        } else {
            (None, None)
        };
        let data = DataThread {
            dir: dir.clone(),
            jsonl,
            csv,
            csv_header: false,
            lock: Some(lock),
            meta,
            shared: shared.clone(),
            tx: data_tx.clone(),
            pending_hashes: 0,
            hashes: HashMap::new(),
            last_sync: Instant::now(),
            meta_write_failed: false,
            video_thread,
            opts,
        };
        let data_thread =
            spawn("cliper-rec-data", move || data.run(data_rx)).map_err(|e| create_err(&e))?;
        Ok(Self {
            dir,
            started: Instant::now(),
            data_tx,
            video_tx,
            drop_late_video: opts_drop_late_video,
            shared,
            data_thread: Some(data_thread),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether an error stopped the recording.
    pub fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::SeqCst)
    }

    /// Queues one frame's line and rows (never blocks).
    pub fn write_frame(&self, record: FrameRecord) {
        if !self.failed() {
            let _ = self.data_tx.send(DataMsg::Frame(Box::new(record)));
        }
    }

    /// Queues a video frame; returns false when it was dropped because the
    /// encoder is behind (or the video is off or failed). Waits for room
    /// instead of dropping unless `drop_late_video`.
    pub fn push_video(&self, frame: VideoFrame) -> bool {
        let Some(tx) = &self.video_tx else {
            return false;
        };
        if self.failed() {
            return false;
        }
        if !self.drop_late_video {
            return tx.send(frame).is_ok();
        }
        match tx.try_send(frame) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.shared.video_dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    pub fn update_meta(&self, update: MetaUpdate) {
        let _ = self.data_tx.send(DataMsg::Meta(Box::new(update)));
    }

    pub fn status(&self) -> WriterStatus {
        let s = &self.shared;
        WriterStatus {
            dir: self.dir.clone(),
            elapsed: self.started.elapsed(),
            frames: s.frames.load(Ordering::Relaxed),
            face_rows: s.face_rows.load(Ordering::Relaxed),
            video_frames: s.video_frames.load(Ordering::Relaxed),
            video_dropped: s.video_dropped.load(Ordering::Relaxed),
            error: s.error(),
        }
    }

    /// Stops recording: waits for the queued rows and frames, finishes
    /// video.mp4 and marks the session complete.
    pub fn finish(mut self) -> Result<FinishReport, SessionError> {
        self.finish_inner()
    }

    /// [`finish`](Self::finish) on a background thread (the app's UI thread
    /// must not wait for the encoder's last frames).
    pub fn finish_in_background(self) -> Receiver<Result<FinishReport, SessionError>> {
        let (tx, rx) = bounded(1);
        let _ = spawn("cliper-rec-finish", move || {
            let _ = tx.send(self.finish());
        });
        rx
    }

    fn finish_inner(&mut self) -> Result<FinishReport, SessionError> {
        // Closing the video queue ends the video thread once it has drained.
        self.video_tx = None;
        let _ = self.data_tx.send(DataMsg::Finish);
        match self.data_thread.take() {
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(SessionError::write(
                    &self.dir,
                    "the recording thread panicked",
                ))
            }),
            None => Err(SessionError::write(&self.dir, "already finished")),
        }
    }
}

impl Drop for SessionWriter {
    fn drop(&mut self) {
        if self.data_thread.is_some() {
            let _ = self.finish_inner();
        }
    }
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<T>> {
    std::thread::Builder::new().name(name.to_string()).spawn(f)
}
