//! MP4 files with H.264 video: the `mp4` crate demuxes, OpenH264 (compiled
//! from source by the `openh264` crate, no system library) decodes.
//!
//! MP4 stores H.264 as length-prefixed NAL units with the parameter sets
//! (SPS/PPS) in the track header; OpenH264 wants an Annex B byte stream, so
//! each sample is rewritten with start codes, and the parameter sets are put
//! in front of every key frame.

use std::collections::VecDeque;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;
use openh264::decoder::{DecodedYUV, Decoder};
use openh264::formats::YUVSource;

use super::{Frame, FrameSource, SourceError};

/// Give up after this many undecodable samples in a row: the file is damaged.
const MAX_BAD_SAMPLES_IN_A_ROW: u32 = 25;

pub struct Mp4Source {
    path: PathBuf,
    reader: mp4::Mp4Reader<BufReader<File>>,
    track_id: u32,
    sample_count: u32,
    next_sample: u32,
    length_size: usize,
    parameter_sets: Vec<u8>,
    decoder: Decoder,
    annexb: Vec<u8>,
    pending: VecDeque<RgbImage>,
    flushed: bool,
    fps: f64,
    out_index: u64,
    bad_in_a_row: u32,
    last: Option<Arc<RgbImage>>,
}

impl Mp4Source {
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let err = |reason: String| SourceError::Video {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SourceError::NotFound(path.to_path_buf()),
            _ => err(e.to_string()),
        })?;
        let size = file.metadata().map_err(|e| err(e.to_string()))?.len();
        if size == 0 {
            return Err(err("the file is empty".into()));
        }
        let reader = guard(|| mp4::Mp4Reader::read_header(BufReader::new(file), size))
            .and_then(|r| r.map_err(|e| format!("not a readable MP4 file ({e})")))
            .map_err(err)?;
        let mut found_other = Vec::new();
        let mut chosen = None;
        let mut ids: Vec<u32> = reader.tracks().keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let track = &reader.tracks()[&id];
            match track.media_type() {
                Ok(mp4::MediaType::H264) => {
                    chosen = Some(id);
                    break;
                }
                Ok(other) => found_other.push(other.to_string()),
                Err(_) => {}
            }
        }
        let Some(track_id) = chosen else {
            return Err(err(if found_other.is_empty() {
                "it has no video track".into()
            } else {
                format!(
                    "it has no H.264 video track (found: {})",
                    found_other.join(", ")
                )
            }));
        };
        let track = &reader.tracks()[&track_id];
        let avc = track
            .trak
            .mdia
            .minf
            .stbl
            .stsd
            .avc1
            .as_ref()
            .ok_or_else(|| err("the H.264 track has no decoder configuration (avcC)".into()))?;
        let length_size = usize::from(avc.avcc.length_size_minus_one & 3) + 1;
        let mut parameter_sets = Vec::new();
        for ps in avc
            .avcc
            .sequence_parameter_sets
            .iter()
            .chain(&avc.avcc.picture_parameter_sets)
        {
            parameter_sets.extend([0, 0, 0, 1]);
            parameter_sets.extend(&ps.bytes);
        }
        let sample_count = track.sample_count();
        if sample_count == 0 {
            return Err(err("the video track has no frames".into()));
        }
        let secs = track.duration().as_secs_f64();
        let fps = if secs > 0.0 {
            (sample_count as f64 / secs).clamp(1.0, 240.0)
        } else {
            25.0
        };
        let decoder =
            Decoder::new().map_err(|e| err(format!("cannot start the H.264 decoder: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            track_id,
            sample_count,
            next_sample: 1,
            length_size,
            parameter_sets,
            decoder,
            annexb: Vec::new(),
            pending: VecDeque::new(),
            flushed: false,
            fps,
            out_index: 0,
            bad_in_a_row: 0,
            last: None,
        })
    }

    fn error(&self, reason: String) -> SourceError {
        SourceError::Video {
            path: self.path.clone(),
            reason,
        }
    }

    /// Reads and decodes the next sample; decoded pictures go to `pending`.
    fn decode_next_sample(&mut self) -> Result<(), SourceError> {
        let id = self.next_sample;
        self.next_sample += 1;
        let (track, reader) = (self.track_id, &mut self.reader);
        let sample = guard(|| reader.read_sample(track, id))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| self.error(format!("frame {id}: {e}")))?;
        let Some(sample) = sample else {
            return Ok(());
        };
        if sample.bytes.is_empty() {
            // An empty sample (an encoder's skipped frame) shows the
            // previous picture again, so frames and samples stay in step.
            if let Some(last) = &self.last {
                self.pending.push_back((**last).clone());
            }
            return Ok(());
        }
        self.annexb.clear();
        if sample.is_sync || id == 1 {
            self.annexb.extend(&self.parameter_sets);
        }
        if let Err(e) = length_prefixed_to_annexb(&sample.bytes, self.length_size, &mut self.annexb)
        {
            return self.bad_sample(id, e);
        }
        match self.decoder.decode(&self.annexb) {
            Ok(Some(yuv)) => {
                self.bad_in_a_row = 0;
                let img = to_rgb(&yuv);
                self.last = Some(Arc::new(img.clone()));
                self.pending.push_back(img);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => self.bad_sample(id, e.to_string()),
        }
    }

    fn bad_sample(&mut self, id: u32, reason: String) -> Result<(), SourceError> {
        self.bad_in_a_row += 1;
        if self.bad_in_a_row >= MAX_BAD_SAMPLES_IN_A_ROW {
            return Err(self.error(format!(
                "{} frames in a row could not be decoded (last, frame {id}: {reason}); the file is damaged or not H.264 that OpenH264 supports",
                self.bad_in_a_row
            )));
        }
        Ok(())
    }
}

impl FrameSource for Mp4Source {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        loop {
            if let Some(img) = self.pending.pop_front() {
                let index = self.out_index;
                self.out_index += 1;
                return Ok(Some(Frame {
                    image: Arc::new(img),
                    index,
                    t: index as f64 / self.fps,
                }));
            }
            if self.next_sample <= self.sample_count {
                self.decode_next_sample()?;
                continue;
            }
            if !self.flushed {
                self.flushed = true;
                let rest = self
                    .decoder
                    .flush_remaining()
                    .map(|frames| frames.iter().map(to_rgb).collect::<Vec<_>>());
                if let Ok(rest) = rest {
                    self.pending.extend(rest);
                }
                if self.out_index == 0 && self.pending.is_empty() {
                    return Err(self.error("no frame could be decoded".into()));
                }
                continue;
            }
            return Ok(None);
        }
    }
    fn frame_count(&self) -> Option<u64> {
        Some(u64::from(self.sample_count))
    }
    fn fps(&self) -> f64 {
        self.fps
    }
    fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }
}

fn to_rgb(yuv: &DecodedYUV<'_>) -> RgbImage {
    let (w, h) = yuv.dimensions();
    let mut buf = vec![0u8; w * h * 3];
    yuv.write_rgb8(&mut buf);
    RgbImage::from_raw(w as u32, h as u32, buf).unwrap_or_else(|| RgbImage::new(1, 1))
}

/// Rewrites length-prefixed NAL units as an Annex B stream (start codes).
pub fn length_prefixed_to_annexb(
    mut data: &[u8],
    length_size: usize,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    while !data.is_empty() {
        if data.len() < length_size {
            return Err(format!(
                "{} stray bytes after the last NAL unit",
                data.len()
            ));
        }
        let n = data[..length_size]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        data = &data[length_size..];
        if n > data.len() {
            return Err(format!(
                "NAL unit of {n} bytes overruns the sample ({} left)",
                data.len()
            ));
        }
        out.extend([0, 0, 0, 1]);
        out.extend(&data[..n]);
        data = &data[n..];
    }
    Ok(())
}

/// Runs a parser step, turning a panic inside a third-party demuxer into an
/// error message: a damaged file must never take the app down.
fn guard<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| "the MP4 demuxer could not parse the file".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annexb_conversion() {
        let mut out = Vec::new();
        length_prefixed_to_annexb(&[0, 0, 0, 2, 0x65, 1, 0, 0, 0, 1, 0x41], 4, &mut out).unwrap();
        assert_eq!(out, [0, 0, 0, 1, 0x65, 1, 0, 0, 0, 1, 0x41]);
        let e = length_prefixed_to_annexb(&[0, 9, 1], 2, &mut out).unwrap_err();
        assert!(e.contains("overruns"), "{e}");
    }

    #[test]
    fn garbage_is_a_clean_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.mp4");
        std::fs::write(&p, b"\0\0\0\x18ftypisom\0\0\0\0garbage garbage garbage").unwrap();
        let e = Mp4Source::open(&p).err().unwrap().to_string();
        assert!(e.contains("bad.mp4") && e.contains("MP4"), "{e}");
    }
}
