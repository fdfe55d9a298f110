//! Clip-level inference for files (`cliper classify-clip`): sample 16 frames
//! of a video or a folder of frames, one per equal segment, follow the main
//! face, encode, and score with the dynamic branch.

use std::path::Path;

use image::RgbImage;
use serde_json::{json, Value};

use super::analyzer::FaceAnalyzer;
use super::dynamic::{DynamicScorer, DynamicScores};
use super::output;
use crate::model::cliper::DescriptorBank;
use crate::model::ClipModel;
use crate::vision::clips::{clip_frames, segment_indices};
use crate::vision::faces::FaceBox;
use crate::vision::images::load_rgb;
use crate::vision::source::SourceSpec;

/// The sampled frames of a clip and what was noticed while sampling.
pub struct SampledClip {
    pub frames: Vec<RgbImage>,
    /// Frames in the source.
    pub source_frames: usize,
    pub notes: Vec<String>,
}

/// Samples `n` frames (the middle of each of `n` equal segments). Clips
/// shorter than `n` repeat frames, as the reference sampling does.
pub fn sample_clip(path: &Path, n: usize) -> Result<SampledClip, String> {
    let mut notes = Vec::new();
    let frames: Vec<RgbImage>;
    let total;
    if path.is_dir() {
        let files = clip_frames(path)
            .map_err(|e| format!("cannot read clip folder {}: {e}", path.display()))?;
        if files.is_empty() {
            return Err(format!("clip folder {} holds no images", path.display()));
        }
        total = files.len();
        frames = segment_indices(total, n, None)
            .into_iter()
            .map(|i| load_rgb(&files[i]).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
    } else {
        let spec = SourceSpec::from_path(path, 25.0).map_err(|e| e.to_string())?;
        let mut src = spec.open().map_err(|e| e.to_string())?;
        // Read through once, keeping every frame (clips are short); the
        // length of a stream is only known at its end.
        let mut all = Vec::new();
        loop {
            match src.next_frame() {
                Ok(Some(f)) => all.push(f.image),
                Ok(None) => break,
                Err(e) if all.is_empty() => {
                    return Err(format!("cannot read {}: {e}", path.display()))
                }
                Err(e) => {
                    notes.push(format!("stopped reading after {} frames: {e}", all.len()));
                    break;
                }
            }
            if all.len() > 100_000 {
                return Err(format!(
                    "{} has more than 100000 frames: cut the clip first",
                    path.display()
                ));
            }
        }
        if all.is_empty() {
            return Err(format!("{} holds no frames", path.display()));
        }
        total = all.len();
        frames = segment_indices(total, n, None)
            .into_iter()
            .map(|i| (*all[i]).clone())
            .collect();
    }
    if total < n {
        notes.push(format!(
            "clip has {total} frames, fewer than {n}: frames repeated to fill the window"
        ));
    }
    Ok(SampledClip {
        frames,
        source_frames: total,
        notes,
    })
}

/// The result for one clip.
pub struct ClipResult {
    /// The face box in the middle frame (the whole frame without detection).
    pub bbox: Option<FaceBox>,
    pub scores: Option<DynamicScores>,
    /// Frames where the face was found.
    pub frames_with_face: usize,
}

fn largest(faces: &[FaceBox]) -> Option<FaceBox> {
    faces
        .iter()
        .copied()
        .max_by_key(|f| f.w as u64 * f.h as u64)
}

/// Follows the largest face through the sampled frames (a frame where it is
/// missed reuses the last box), encodes the crops in one batch and scores
/// them as a window.
pub fn classify_clip(
    clip: &ClipModel,
    bank: &DescriptorBank,
    analyzer: &mut FaceAnalyzer,
    scorer: &DynamicScorer,
    sampled: &SampledClip,
) -> candle_core::Result<ClipResult> {
    let boxes: Vec<Option<FaceBox>> = sampled
        .frames
        .iter()
        .map(|f| largest(&analyzer.find_faces(f)))
        .collect();
    let found = boxes.iter().filter(|b| b.is_some()).count();
    let Some(first) = boxes.iter().flatten().next().copied() else {
        return Ok(ClipResult {
            bbox: None,
            scores: None,
            frames_with_face: 0,
        });
    };
    let mut last = first;
    let mut crops = Vec::with_capacity(sampled.frames.len());
    let mut used = Vec::with_capacity(sampled.frames.len());
    for (img, b) in sampled.frames.iter().zip(&boxes) {
        if let Some(b) = b {
            last = *b;
        }
        crops.extend(analyzer.crops(img, &[last]));
        used.push(last);
    }
    let emb = clip.encode_rgb(&crops)?.to_vec2::<f32>()?;
    let scores = scorer.score(&emb, bank)?;
    Ok(ClipResult {
        bbox: used.get(used.len() / 2).copied(),
        scores: Some(scores),
        frames_with_face: found,
    })
}

/// `{"image": PATH, "mode": "dynamic", ..., "faces": [...]}`.
pub fn clip_json(
    path: &Path,
    r: &ClipResult,
    sampled: &SampledClip,
    bank: &DescriptorBank,
    top: Option<usize>,
) -> Value {
    let faces: Vec<Value> = match (&r.bbox, &r.scores) {
        (Some(b), Some(s)) => {
            let mut f = output::face_json(b, &s.scores, bank, top);
            f["temporal"] = json!(s.mode.as_str());
            vec![f]
        }
        _ => Vec::new(),
    };
    json!({
        "image": path,
        "mode": "dynamic",
        "frames": sampled.frames.len(),
        "source_frames": sampled.source_frames,
        "frames_with_face": r.frames_with_face,
        "notes": sampled.notes,
        "faces": faces,
    })
}
