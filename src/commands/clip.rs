//! Clip-level inference for files (`cliper classify-clip`): sample 16 frames
//! of a video or a folder of frames, one per equal segment, follow the main
//! face, encode, and score with the dynamic branch.

use std::path::Path;

use serde::Serialize;

use crate::model::cliper::DescriptorBank;
use crate::model::ClipModel;
use crate::pipeline::analyzer::FaceAnalyzer;
use crate::pipeline::dynamic::{DynamicScorer, DynamicScores};
use crate::pipeline::output;
pub use crate::vision::clips::{sample_clip, SampledClip};
use crate::vision::faces::FaceBox;

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
    let emb = clip.encode_rgb_raw(&crops)?.to_vec2::<f32>()?;
    let scores = scorer.score(&emb, bank)?;
    Ok(ClipResult {
        bbox: used.get(used.len() / 2).copied(),
        scores: Some(scores),
        frames_with_face: found,
    })
}

/// `cliper classify-clip --json`'s line for one clip.
#[derive(Clone, Debug, Serialize)]
pub struct ClipJson<'a> {
    pub image: &'a Path,
    /// Always `dynamic`.
    pub mode: &'static str,
    pub frames: usize,
    pub source_frames: usize,
    pub complete: bool,
    pub repeated_frames: bool,
    pub frames_with_face: usize,
    pub notes: &'a [String],
    pub faces: Vec<output::FaceJson<'a>>,
}

/// The JSON line of a clip's result.
pub fn clip_json(
    path: &Path,
    r: &ClipResult,
    sampled: &SampledClip,
    bank: &DescriptorBank,
    top: Option<usize>,
) -> String {
    let faces = match (&r.bbox, &r.scores) {
        (Some(b), Some(s)) => {
            let mut f = output::FaceJson::new(b, &s.scores).with_descriptors(&s.scores, bank, top);
            f.temporal = Some(s.mode.as_str());
            vec![f]
        }
        _ => Vec::new(),
    };
    let line = ClipJson {
        image: path,
        mode: "dynamic",
        frames: sampled.frames.len(),
        source_frames: sampled.source_frames,
        complete: sampled.complete,
        repeated_frames: sampled.source_frames < sampled.frames.len(),
        frames_with_face: r.frames_with_face,
        notes: &sampled.notes,
        faces,
    };
    // Serialising plain structs of numbers and strings cannot fail.
    serde_json::to_string(&line).unwrap_or_default()
}
