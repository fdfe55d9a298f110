//! Video clips as frame lists: reading a folder of frames, and sampling a
//! fixed number of frames, one per equal segment (as CLIPER / DFER-CLIP
//! sample clips for training and testing), from a folder or a video file.

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::vision::images::load_rgb;
use crate::vision::video::{VideoError, VideoReader};

pub use crate::vision::images::IMAGE_EXTENSIONS;

pub fn is_image(p: &Path) -> bool {
    crate::vision::images::has_image_extension(p)
}

/// The frames of a clip folder, sorted by name.
pub fn clip_frames(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_image(p))
        .collect();
    v.sort();
    Ok(v)
}

/// Indices of `n` frames out of `len`, one per equal segment: the middle of
/// each segment, or a random position in it when `rng` is given (training).
/// Fewer frames than `n` repeat frames, as the reference sampling does.
pub fn segment_indices(
    len: usize,
    n: usize,
    rng: Option<&mut crate::model::rng::SplitMix64>,
) -> Vec<usize> {
    if len == 0 {
        return Vec::new();
    }
    let seg = len as f64 / n as f64;
    let mut rng = rng;
    (0..n)
        .map(|i| {
            let start = (i as f64 * seg).floor() as usize;
            let end = (((i + 1) as f64 * seg).floor() as usize).max(start + 1);
            let pos = match rng.as_deref_mut() {
                Some(r) => start + r.below(end - start),
                None => (start + end - 1) / 2,
            };
            pos.min(len - 1)
        })
        .collect()
}

/// The sampled frames of a clip and what was noticed while sampling.
pub struct SampledClip {
    pub frames: Vec<RgbImage>,
    /// Frames in the source (as far as it could be read).
    pub source_frames: usize,
    /// Whether every frame of the source could be read. A clip that is not
    /// complete (truncated, damaged) is scored on what was read, and says so.
    /// A whole clip shorter than the window repeats frames (`source_frames`
    /// < `frames.len()`), as the reference sampling does.
    pub complete: bool,
    pub notes: Vec<String>,
}

/// Videos up to this many frames are decoded from start to end, keeping only
/// the sampled frames; longer ones are sampled by seeking.
const SEQUENTIAL_MAX_FRAMES: u64 = 1500;

/// Why a clip could not be sampled.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("cannot read clip folder {}: {source}", .path.display())]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("clip folder {} holds no images", .0.display())]
    EmptyFolder(PathBuf),
    #[error(transparent)]
    Image(#[from] crate::vision::images::ImageError),
    #[error(transparent)]
    Video(#[from] VideoError),
}

/// Samples `n` frames (the middle of each of `n` equal segments). Clips
/// shorter than `n` repeat frames, as the reference sampling does. Memory
/// holds the `n` frames, whatever the clip's length.
pub fn sample_clip(path: &Path, n: usize) -> Result<SampledClip, ClipError> {
    let mut notes = Vec::new();
    let (frames, total, complete) = if path.is_dir() {
        let files = clip_frames(path).map_err(|source| ClipError::Folder {
            path: path.to_path_buf(),
            source,
        })?;
        if files.is_empty() {
            return Err(ClipError::EmptyFolder(path.to_path_buf()));
        }
        let frames = segment_indices(files.len(), n, None)
            .into_iter()
            .map(|i| load_rgb(&files[i]))
            .collect::<Result<Vec<_>, _>>()?;
        (frames, files.len(), true)
    } else {
        sample_video(path, n, &mut notes)?
    };
    if total < n {
        notes.push(format!(
            "clip has {total} frames, fewer than {n} (the window): frames repeated to fill it"
        ));
    }
    Ok(SampledClip {
        frames,
        source_frames: total,
        complete,
        notes,
    })
}

/// `n` frames of a video file: (frames, frames in the file, complete).
fn sample_video(
    path: &Path,
    n: usize,
    notes: &mut Vec<String>,
) -> Result<(Vec<RgbImage>, usize, bool), VideoError> {
    let mut reader = VideoReader::open(path)?;
    let info = reader.info().clone();
    let mut times = None;
    let total = match info.frame_count {
        Some(c) if info.frame_count_exact => c,
        // No count in the container (Matroska, WebM): count the packets.
        _ => {
            let t = reader.scan_times()?;
            let c = t.len() as u64;
            times = Some(t);
            c
        }
    };
    if total == 0 {
        return Err(VideoError::read(path, "the video stream holds no frames"));
    }
    if total > SEQUENTIAL_MAX_FRAMES {
        // Seek to each sampled frame: its time from the packets when known,
        // else from its index at the average rate.
        let mut frames = Vec::with_capacity(n);
        for i in segment_indices(total as usize, n, None) {
            let t = match &times {
                Some(t) => t.get(i).copied().unwrap_or(0.0),
                None => i as f64 / info.fps,
            };
            reader.seek(t)?;
            match reader.next_frame()? {
                Some(f) => frames.push(f.image),
                None => break,
            }
        }
        for w in reader.take_warnings() {
            notes.push(w);
        }
        if frames.len() == n {
            return Ok((frames, total as usize, reader.damaged_packets() == 0));
        }
        notes.push(format!(
            "seeking failed after {} of {n} sampled frames: reading the whole file instead",
            frames.len()
        ));
        reader = VideoReader::open(path)?;
    }
    // Decode from the start, keeping the sampled frames.
    let (frames, read) = keep_frames(&mut reader, &segment_indices(total as usize, n, None))?;
    notes.extend(reader.take_warnings());
    if read >= total || frames.len() == n {
        let complete = read >= total && reader.damaged_packets() == 0;
        return Ok((frames, total as usize, complete));
    }
    // Fewer frames than the file claims: sample what is there.
    if read == 0 {
        return Err(VideoError::read(path, "no frame could be decoded"));
    }
    notes.push(format!(
        "the file holds {total} frames but only {read} could be read: sampled from those"
    ));
    let mut reader = VideoReader::open(path)?;
    let (frames, _) = keep_frames(&mut reader, &segment_indices(read as usize, n, None))?;
    Ok((frames, read as usize, false))
}

/// Decodes `reader` from its position, keeping the frames at `wanted`
/// (sorted, may repeat) and stopping after the last; returns them and the
/// number of frames read.
fn keep_frames(
    reader: &mut VideoReader,
    wanted: &[usize],
) -> Result<(Vec<RgbImage>, u64), VideoError> {
    let mut out = Vec::with_capacity(wanted.len());
    let mut k = 0usize;
    let mut read = 0u64;
    while out.len() < wanted.len() {
        let Some(f) = reader.next_frame()? else {
            break;
        };
        read += 1;
        while out.len() < wanted.len() && wanted[out.len()] == k {
            out.push(f.image.clone());
        }
        k += 1;
    }
    if out.len() == wanted.len() {
        // Count the rest without converting it: whether the file is whole.
        while reader.next_frame()?.is_some() {
            read += 1;
        }
    }
    Ok((out, read))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_the_clip() {
        assert_eq!(
            segment_indices(32, 16, None),
            (0..16).map(|i| 2 * i).collect::<Vec<_>>()
        );
        let short = segment_indices(5, 16, None);
        assert_eq!(short.len(), 16);
        assert!(short.iter().all(|&i| i < 5));
        let mut r = crate::model::rng::SplitMix64::new(3);
        let rnd = segment_indices(160, 16, Some(&mut r));
        for (i, &p) in rnd.iter().enumerate() {
            assert!(p >= i * 10 && p < (i + 1) * 10);
        }
    }
}
