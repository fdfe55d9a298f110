//! Video files as a frame source: [`crate::vision::video::VideoReader`]
//! (FFmpeg) behind the [`FrameSource`] interface.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::{Frame, FrameSource, SourceError};
use crate::vision::video::{VideoInfo, VideoReader};

pub struct VideoSource {
    path: PathBuf,
    reader: VideoReader,
    index: u64,
    decode_ms: f32,
}

impl VideoSource {
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        Ok(Self {
            path: path.to_path_buf(),
            reader: VideoReader::open(path)?,
            index: 0,
            decode_ms: 0.0,
        })
    }

    pub fn info(&self) -> &VideoInfo {
        self.reader.info()
    }
}

impl FrameSource for VideoSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        let start = Instant::now();
        let f = self.reader.next_frame()?;
        self.decode_ms = start.elapsed().as_secs_f32() * 1000.0;
        Ok(f.map(|f| {
            let index = self.index;
            self.index += 1;
            Frame {
                image: Arc::new(f.image),
                index,
                t: f.t,
            }
        }))
    }
    fn frame_count(&self) -> Option<u64> {
        self.reader.info().frame_count
    }
    fn fps(&self) -> f64 {
        self.reader.info().fps
    }
    fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }
    fn take_warnings(&mut self) -> Vec<String> {
        self.reader.take_warnings()
    }
    fn decode_ms(&self) -> f32 {
        self.decode_ms
    }
}
