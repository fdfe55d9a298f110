//! [`IndexedVideo`]: random access by frame number over a [`VideoReader`].

use std::path::Path;

use image::RgbImage;

use super::decode::{VideoInfo, VideoReader};
use super::VideoError;

/// A video with random access by frame number: the frames' times are read
/// up front from the packets (no decoding), then a frame is decoded on
/// demand, from the key frame before it unless it follows the last one.
pub struct IndexedVideo {
    reader: VideoReader,
    times: Vec<f64>,
    /// The frame `next_frame` would return.
    next: Option<usize>,
}

impl IndexedVideo {
    pub fn open(path: &Path) -> Result<Self, VideoError> {
        let mut reader = VideoReader::open(path)?;
        let times = reader.scan_times()?;
        Ok(Self {
            reader,
            times,
            next: Some(0),
        })
    }

    pub fn len(&self) -> usize {
        self.times.len()
    }

    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    pub fn info(&self) -> &VideoInfo {
        self.reader.info()
    }

    /// Frame size as shown.
    pub fn size(&self) -> (u32, u32) {
        (self.reader.info().width, self.reader.info().height)
    }

    /// The time of frame `k`, seconds from the video's start.
    pub fn time(&self, k: usize) -> Option<f64> {
        self.times.get(k).copied()
    }

    pub fn times(&self) -> &[f64] {
        &self.times
    }

    /// The frame on screen at video time `t`: the last one starting at or
    /// before it.
    pub fn index_at(&self, t: f64) -> Option<usize> {
        if self.times.is_empty() {
            return None;
        }
        let n = self.times.partition_point(|&x| x <= t + 1e-6);
        Some(n.saturating_sub(1))
    }

    /// Decodes frame `k`.
    pub fn frame(&mut self, k: usize) -> Result<RgbImage, VideoError> {
        let Some(&t) = self.times.get(k) else {
            return Err(VideoError::read(
                self.reader.path(),
                format!("no frame {k} (the video has {})", self.times.len()),
            ));
        };
        if self.next != Some(k) {
            self.reader.seek(t)?;
        }
        self.next = None;
        let f = self.reader.next_frame()?.ok_or_else(|| {
            VideoError::read(
                self.reader.path(),
                format!("frame {k} could not be decoded"),
            )
        })?;
        // A damaged frame before it may shift the pictures: place the
        // decoder by what it returned.
        let got = self.index_at(f.t).unwrap_or(k);
        self.next = Some(got + 1);
        Ok(f.image)
    }
}
