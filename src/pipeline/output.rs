//! The JSON shape of results, shared by `cliper classify`, `classify-clip`
//! and `cliper run --json`: the structs below are the schema. Session
//! recordings write the same face fields (`session::record`).

use serde::Serialize;

use crate::model::cliper::{DescriptorBank, ExpressionScores};
use crate::pipeline::dynamic::DynamicScores;
use crate::vision::faces::FaceBox;

/// A class's score (mean descriptor logit) and probability.
#[derive(Clone, Debug, Serialize)]
pub struct ClassJson<'a> {
    pub name: &'a str,
    pub score: f32,
    pub prob: f32,
}

/// One descriptor with its logit; `words` (the nearest vocabulary words of
/// each learned token) for learned banks.
#[derive(Clone, Debug, Serialize)]
pub struct DescriptorJson<'a> {
    pub class: &'a str,
    pub index: usize,
    pub logit: f32,
    pub text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub words: Option<&'a [Vec<String>]>,
}

/// The free-text probe's logit against a face.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeJson<'a> {
    pub text: &'a str,
    pub logit: f32,
}

/// The dynamic branch's scores of a face (`mode`: `temporal`, or
/// `mean-of-static` without trained temporal weights).
#[derive(Clone, Debug, Serialize)]
pub struct DynamicJson<'a> {
    pub mode: &'a str,
    pub classes: Vec<ClassJson<'a>>,
    pub predicted: &'a str,
}

/// One face. `id` for tracked faces of a video; `descriptors` when asked
/// for; `landmarks` (to a tenth of a pixel) where the detector gives them;
/// `temporal` for a clip's dynamic scores (its mode).
#[derive(Clone, Debug, Serialize)]
pub struct FaceJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(rename = "box")]
    pub bbox: [u32; 4],
    pub classes: Vec<ClassJson<'a>>,
    pub predicted: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub descriptors: Option<Vec<DescriptorJson<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub landmarks: Option<[[f64; 2]; 5]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamic: Option<DynamicJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temporal: Option<&'a str>,
}

/// One processed frame of `cliper run`: `{"frame", "t", "faces"}`.
#[derive(Clone, Debug, Serialize)]
pub struct FrameJson<'a> {
    pub frame: u64,
    /// Seconds, to the microsecond.
    pub t: f64,
    pub faces: Vec<FaceJson<'a>>,
}

impl<'a> FrameJson<'a> {
    pub fn new(frame: u64, t: f64, faces: Vec<FaceJson<'a>>) -> Self {
        Self {
            frame,
            t: (t * 1e6).round() / 1e6,
            faces,
        }
    }
}

/// The classes in class order.
pub fn classes_json(s: &ExpressionScores) -> Vec<ClassJson<'_>> {
    s.layout
        .classes()
        .iter()
        .enumerate()
        .map(|(c, name)| ClassJson {
            name,
            score: s.class_scores[c],
            prob: s.probs[c],
        })
        .collect()
}

/// Descriptors ranked by logit, all of them or the top `top`.
pub fn descriptors_json<'a>(
    s: &ExpressionScores,
    bank: &'a DescriptorBank,
    top: Option<usize>,
) -> Vec<DescriptorJson<'a>> {
    let ranked = s.ranked();
    let n = top.unwrap_or(ranked.len()).min(ranked.len());
    ranked[..n]
        .iter()
        .map(|&i| {
            let d = &bank.descriptors[i];
            DescriptorJson {
                class: bank.layout.name(d.class),
                index: d.index,
                logit: s.logits[i],
                text: &d.text,
                words: d.words.as_deref(),
            }
        })
        .collect()
}

impl<'a> FaceJson<'a> {
    /// A face's box, landmarks, classes and prediction; the optional fields
    /// empty.
    pub fn new(b: &FaceBox, s: &'a ExpressionScores) -> Self {
        Self {
            id: None,
            bbox: [b.x, b.y, b.w, b.h],
            classes: classes_json(s),
            predicted: s.predicted_name(),
            descriptors: None,
            landmarks: b
                .landmarks
                .map(|l| l.map(|p| p.map(|x| (f64::from(x) * 10.0).round() / 10.0))),
            probe: None,
            dynamic: None,
            temporal: None,
        }
    }

    /// With the face's `top` descriptors of `s` (all of them with `None`).
    pub fn with_descriptors(
        mut self,
        s: &ExpressionScores,
        bank: &'a DescriptorBank,
        top: Option<usize>,
    ) -> Self {
        self.descriptors = Some(descriptors_json(s, bank, top));
        self
    }
}

impl<'a> From<&'a DynamicScores> for DynamicJson<'a> {
    fn from(d: &'a DynamicScores) -> Self {
        Self {
            mode: d.mode.as_str(),
            classes: classes_json(&d.scores),
            predicted: d.scores.predicted_name(),
        }
    }
}
