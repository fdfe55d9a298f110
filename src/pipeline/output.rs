//! The JSON shape of results, shared by `cliper classify`, `cliper run` and
//! session recordings.

use serde_json::{json, Value};

use crate::model::cliper::{DescriptorBank, ExpressionScores};
use crate::vision::faces::FaceBox;

pub fn box_json(b: &FaceBox) -> Value {
    json!([b.x, b.y, b.w, b.h])
}

/// `[{"name", "score", "prob"}, ...]` in class order.
pub fn classes_json(s: &ExpressionScores) -> Value {
    Value::Array(
        s.layout
            .classes()
            .iter()
            .enumerate()
            .map(|(c, name)| json!({"name": name, "score": s.class_scores[c], "prob": s.probs[c]}))
            .collect(),
    )
}

/// Descriptors ranked by logit, all of them or the top `top`.
pub fn descriptors_json(s: &ExpressionScores, bank: &DescriptorBank, top: Option<usize>) -> Value {
    let ranked = s.ranked();
    let n = top.unwrap_or(ranked.len()).min(ranked.len());
    Value::Array(
        ranked[..n]
            .iter()
            .map(|&i| {
                let d = &bank.descriptors[i];
                let mut v = json!({
                    "class": bank.layout.name(d.class),
                    "index": d.index,
                    "logit": s.logits[i],
                    "text": d.text,
                });
                if let Some(words) = &d.words {
                    v["words"] = json!(words);
                }
                v
            })
            .collect(),
    )
}

/// One face: box, classes, prediction, ranked descriptors.
pub fn face_json(
    b: &FaceBox,
    s: &ExpressionScores,
    bank: &DescriptorBank,
    top: Option<usize>,
) -> Value {
    let mut v = json!({
        "box": box_json(b),
        "classes": classes_json(s),
        "predicted": s.predicted_name(),
        "descriptors": descriptors_json(s, bank, top),
    });
    add_landmarks(&mut v, b);
    v
}

/// `"landmarks": [[x, y]; 5]` (to a tenth of a pixel), where the detector
/// gives them.
fn add_landmarks(v: &mut Value, b: &FaceBox) {
    if let Some(l) = b.landmarks {
        v["landmarks"] = json!(l.map(|p| p.map(|x| (f64::from(x) * 10.0).round() / 10.0)));
    }
}

/// One tracked face of a video frame: id, box, classes, prediction, and the
/// top `top` descriptors and the probe when asked for.
pub fn tracked_face_json(
    id: u64,
    b: &FaceBox,
    s: &ExpressionScores,
    bank: &DescriptorBank,
    top: Option<usize>,
    probe: Option<(&str, f32)>,
) -> Value {
    let mut v = json!({
        "id": id,
        "box": box_json(b),
        "classes": classes_json(s),
        "predicted": s.predicted_name(),
    });
    add_landmarks(&mut v, b);
    if let Some(k) = top {
        v["descriptors"] = descriptors_json(s, bank, Some(k));
    }
    if let Some((text, logit)) = probe {
        v["probe"] = json!({"text": text, "logit": logit});
    }
    v
}

/// One processed frame of `cliper run`: `{"frame", "t", "faces"}`.
pub fn frame_json(index: u64, t: f64, faces: Vec<Value>) -> Value {
    json!({"frame": index, "t": (t * 1e6).round() / 1e6, "faces": faces})
}

/// The dynamic branch's scores of a face: `{"mode", "classes", "predicted"}`
/// (`mode` is `temporal`, or `mean-of-static` without trained temporal weights).
pub fn dynamic_json(d: &crate::pipeline::dynamic::DynamicScores) -> Value {
    json!({
        "mode": d.mode.as_str(),
        "classes": classes_json(&d.scores),
        "predicted": d.scores.predicted_name(),
    })
}
