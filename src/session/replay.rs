//! Loading a recorded session for replay and reports, without any model:
//! meta.json, the frame records of session.jsonl, and the video.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::meta::SessionMeta;
use super::record::FrameRecord;
use super::{SessionError, JSONL_FILE, META_FILE, RAW_VIDEO_FILE, VIDEO_FILE};
use crate::model::cliper::expressions::BankLayout;
use crate::vision::video::IndexedVideo;

/// A session read from its folder.
#[derive(Clone, Debug)]
pub struct Session {
    pub dir: PathBuf,
    pub meta: SessionMeta,
    /// Frame records in file order (increasing `t`).
    pub frames: Vec<FrameRecord>,
    /// Lines that could not be read (an unfinished last line of a session
    /// still being recorded, or damage); they are skipped.
    pub bad_lines: usize,
}

/// One point of a face's timeline.
#[derive(Clone, Debug, PartialEq)]
pub struct TimelinePoint {
    pub t: f64,
    /// Static probabilities in the session's class order.
    pub probs: Vec<f32>,
    pub predicted: usize,
}

impl Session {
    /// Reads a session folder (also one still being recorded: it reads what
    /// is there).
    pub fn open(dir: &Path) -> Result<Self, SessionError> {
        if !dir.join(META_FILE).is_file() && !dir.is_dir() {
            return Err(SessionError::Read {
                path: dir.to_path_buf(),
                reason: "no such folder".into(),
            });
        }
        let meta = SessionMeta::read(dir)?;
        let path = dir.join(JSONL_FILE);
        let file = std::fs::File::open(&path).map_err(|e| SessionError::read(&path, e))?;
        let mut frames = Vec::new();
        let mut bad_lines = 0;
        for line in std::io::BufReader::new(file).lines() {
            let line = line.map_err(|e| SessionError::read(&path, e))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<FrameRecord>(&line) {
                Ok(r) => frames.push(r),
                Err(_) => bad_lines += 1,
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            frames,
            bad_lines,
        })
    }

    /// The class layout of each bank the session used, with the session
    /// time it took over from, in that order. Only banks in the session's
    /// class order count (every per-class series of a session is in that
    /// order); a session with none gets a layout of its classes, one
    /// descriptor each (the recorded descriptor logits fill in where they fit).
    pub fn layouts(&self) -> Vec<(f64, Arc<BankLayout>)> {
        let classes = self.classes();
        let mut v: Vec<(f64, Arc<BankLayout>)> = (self.meta.banks.iter())
            .filter(|b| b.classes.len() == b.descriptors_per_class.len())
            .filter_map(|b| {
                let counts: Vec<(&str, usize)> = (b.classes.iter().map(String::as_str))
                    .zip(b.descriptors_per_class.iter().copied())
                    .collect();
                let layout = BankLayout::new(&counts).ok()?;
                (layout.classes() == classes.as_slice()).then(|| (b.from_t, Arc::new(layout)))
            })
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        if v.is_empty() {
            let ones: Vec<(&str, usize)> = classes.iter().map(|c| (c.as_str(), 1)).collect();
            let layout = BankLayout::new(&ones).unwrap_or_else(|_| BankLayout::cliper());
            v.push((f64::NEG_INFINITY, Arc::new(layout)));
        }
        v
    }

    /// The session's classes (`meta.json`), in the model's order; CLIPER's
    /// for a session that names none.
    pub fn classes(&self) -> Vec<String> {
        if self.meta.classes.is_empty() {
            crate::model::cliper::expressions::BankLayout::cliper()
                .classes()
                .to_vec()
        } else {
            self.meta.classes.clone()
        }
    }

    /// Face ids in the session, ascending.
    pub fn face_ids(&self) -> Vec<u64> {
        let ids: BTreeSet<u64> = self
            .frames
            .iter()
            .flat_map(|f| f.faces.iter().map(|x| x.id))
            .collect();
        ids.into_iter().collect()
    }

    /// Time of the last frame (the first is near 0).
    pub fn duration(&self) -> f64 {
        self.frames.last().map_or(0.0, |f| f.t)
    }

    /// The frame on screen at time `t`: the last one at or before it.
    pub fn index_at(&self, t: f64) -> Option<usize> {
        if self.frames.is_empty() {
            return None;
        }
        let n = self.frames.partition_point(|f| f.t <= t + 1e-9);
        Some(n.saturating_sub(1))
    }

    /// A face's static probabilities over time.
    pub fn timeline(&self, id: u64) -> Vec<TimelinePoint> {
        let classes = self.classes();
        self.frames
            .iter()
            .filter_map(|f| {
                f.faces.iter().find(|x| x.id == id).map(|x| TimelinePoint {
                    t: f.t,
                    probs: x.probs(&classes),
                    predicted: x.predicted_index(&classes),
                })
            })
            .collect()
    }

    /// The annotated video, video.mp4, when there is one.
    pub fn video_file(&self) -> Option<PathBuf> {
        Some(self.dir.join(VIDEO_FILE)).filter(|p| p.is_file())
    }

    /// The raw video, when it was recorded.
    pub fn raw_video_file(&self) -> Option<PathBuf> {
        Some(self.dir.join(RAW_VIDEO_FILE)).filter(|p| p.is_file())
    }

    /// Opens the annotated video; `None` when the session has none.
    pub fn open_video(&self) -> Result<Option<IndexedVideo>, SessionError> {
        match self.video_file() {
            Some(p) => Ok(Some(IndexedVideo::open(&p)?)),
            None => Ok(None),
        }
    }

    /// Session time of the video's first frame.
    pub fn video_start_t(&self) -> f64 {
        match &self.meta.video {
            Some(v) if v.width > 0 => v.start_t,
            _ => self.frames.first().map_or(0.0, |f| f.t),
        }
    }
}
