//! One processed frame as recorded: the line format of `session.jsonl` and
//! the row format of `session.csv`, written and read by the same types.
//!
//! A face's fields follow `cliper run --json` (`pipeline::output`): `id`,
//! `box`, `classes` (`name`, `score`, `prob` in class order), `predicted`,
//! `descriptors`, `probe`; a session adds `dynamic` and `smoothed`.

use serde::{Deserialize, Serialize};

use crate::model::cliper::expressions::{CLASSES, NUM_CLASSES};

/// One line of `session.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrameRecord {
    /// Index of the frame in its source.
    pub frame: u64,
    /// Counter of frames that entered the pipeline (unique in a session).
    pub seq: u64,
    /// Seconds since the recording started, on the session's clock
    /// (`meta.json` "clock": "capture" or "source").
    pub t: f64,
    /// Wall-clock time of capture, ISO 8601 UTC.
    pub wall: String,
    /// The frame's own time in its source (video position, camera time).
    pub source_t: f64,
    pub faces: Vec<FaceRecord>,
}

/// One face of a recorded frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaceRecord {
    /// Face id, stable across the session's frames.
    pub id: u64,
    /// `[x, y, w, h]` in source pixels.
    #[serde(rename = "box")]
    pub bbox: [u32; 4],
    /// Static prediction and scores.
    pub predicted: String,
    pub classes: Vec<ClassScore>,
    /// The dynamic branch's scores, when it was on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic: Option<ScoresRecord>,
    /// The scores as displayed (smoothed), when smoothing was on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoothed: Option<ScoresRecord>,
    /// The highest-scoring descriptors, best first.
    #[serde(default)]
    pub descriptors: Vec<DescriptorRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeRecord>,
}

/// A class's score (mean descriptor logit) and probability.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    pub name: String,
    pub score: f32,
    pub prob: f32,
}

/// A prediction with its per-class scores (dynamic or smoothed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoresRecord {
    /// How the scores were made (dynamic: "temporal", "mean-of-static").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    pub predicted: String,
    pub classes: Vec<ClassScore>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DescriptorRecord {
    pub class: String,
    /// Index of the descriptor within its class.
    pub index: usize,
    pub logit: f32,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeRecord {
    pub text: String,
    pub logit: f32,
}

/// `[{"name", "score", "prob"}, ...]` in class order.
pub fn class_scores(scores: &[f32], probs: &[f32]) -> Vec<ClassScore> {
    CLASSES
        .iter()
        .enumerate()
        .map(|(c, name)| ClassScore {
            name: name.to_string(),
            score: scores.get(c).copied().unwrap_or(f32::NAN),
            prob: probs.get(c).copied().unwrap_or(f32::NAN),
        })
        .collect()
}

impl ScoresRecord {
    pub fn new(mode: Option<&str>, predicted: usize, scores: &[f32], probs: &[f32]) -> Self {
        Self {
            mode: mode.map(str::to_string),
            predicted: CLASSES.get(predicted).unwrap_or(&"?").to_string(),
            classes: class_scores(scores, probs),
        }
    }

    /// Probabilities in class order (by name, so a reordered file still reads).
    pub fn probs(&self) -> [f32; NUM_CLASSES] {
        probs_by_name(&self.classes)
    }
}

impl FaceRecord {
    /// Static probabilities in class order.
    pub fn probs(&self) -> [f32; NUM_CLASSES] {
        probs_by_name(&self.classes)
    }

    /// Static class scores in class order.
    pub fn scores(&self) -> [f32; NUM_CLASSES] {
        let mut out = [f32::NAN; NUM_CLASSES];
        for c in &self.classes {
            if let Some(i) = CLASSES.iter().position(|n| *n == c.name) {
                out[i] = c.score;
            }
        }
        out
    }

    /// Index of the static prediction (the most probable class when the
    /// name is unknown).
    pub fn predicted_index(&self) -> usize {
        CLASSES
            .iter()
            .position(|n| *n == self.predicted)
            .unwrap_or_else(|| argmax(&self.probs()))
    }
}

fn probs_by_name(classes: &[ClassScore]) -> [f32; NUM_CLASSES] {
    let mut out = [f32::NAN; NUM_CLASSES];
    for c in classes {
        if let Some(i) = CLASSES.iter().position(|n| *n == c.name) {
            out[i] = c.prob;
        }
    }
    out
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Rounds seconds to microseconds, as `cliper run --json` does.
pub fn round_secs(t: f64) -> f64 {
    (t * 1e6).round() / 1e6
}

impl FrameRecord {
    /// The JSONL line, without the newline.
    pub fn to_line(&self) -> String {
        // Serialising plain structs of numbers and strings cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The CSV rows of this frame (one per face), each ending in a newline.
    pub fn to_csv_rows(&self) -> String {
        let mut out = String::new();
        for f in &self.faces {
            csv_row(self, f, &mut out);
        }
        out
    }
}

/// The columns of `session.csv`, in order. Probabilities are the plain
/// class names; `score_*` are the class scores (mean descriptor logits);
/// `dynamic_*` and `smoothed_*` are probabilities and stay empty when the
/// dynamic branch or smoothing was off.
pub fn csv_columns() -> Vec<String> {
    let mut cols: Vec<String> = ["t", "frame", "face_id", "x", "y", "w", "h", "predicted"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    cols.extend(CLASSES.iter().map(|c| c.to_string()));
    cols.extend(CLASSES.iter().map(|c| format!("score_{c}")));
    cols.extend(CLASSES.iter().map(|c| format!("dynamic_{c}")));
    cols.extend(CLASSES.iter().map(|c| format!("smoothed_{c}")));
    cols.push("wall".to_string());
    cols
}

/// The header line of `session.csv`, with its newline.
pub fn csv_header() -> String {
    format!("{}\n", csv_columns().join(","))
}

fn csv_row(frame: &FrameRecord, f: &FaceRecord, out: &mut String) {
    use std::fmt::Write;
    let [x, y, w, h] = f.bbox;
    let _ = write!(
        out,
        "{:.6},{},{},{x},{y},{w},{h},{}",
        frame.t, frame.frame, f.id, f.predicted
    );
    for p in f.probs() {
        let _ = write!(out, ",{p}");
    }
    for s in f.scores() {
        let _ = write!(out, ",{s}");
    }
    for extra in [&f.dynamic, &f.smoothed] {
        match extra {
            Some(s) => {
                for p in s.probs() {
                    let _ = write!(out, ",{p}");
                }
            }
            None => out.push_str(&",".repeat(NUM_CLASSES)),
        }
    }
    let _ = writeln!(out, ",{}", frame.wall);
}

/// One parsed CSV row (for checks and tools; pandas reads the file as is).
#[derive(Clone, Debug, PartialEq)]
pub struct CsvRow {
    pub t: f64,
    pub frame: u64,
    pub face_id: u64,
    pub bbox: [u32; 4],
    pub predicted: String,
    pub probs: [f32; NUM_CLASSES],
    pub scores: [f32; NUM_CLASSES],
    pub dynamic: Option<[f32; NUM_CLASSES]>,
    pub smoothed: Option<[f32; NUM_CLASSES]>,
    pub wall: String,
}

/// Parses a data row of `session.csv`; `None` when it is not a complete row.
pub fn parse_csv_row(line: &str) -> Option<CsvRow> {
    let cells: Vec<&str> = line.trim_end_matches(['\r', '\n']).split(',').collect();
    let n = NUM_CLASSES;
    if cells.len() != 8 + 4 * n + 1 {
        return None;
    }
    let f32s = |from: usize| -> Option<[f32; NUM_CLASSES]> {
        let mut out = [0f32; NUM_CLASSES];
        for (i, o) in out.iter_mut().enumerate() {
            *o = cells[from + i].parse().ok()?;
        }
        Some(out)
    };
    let optional = |from: usize| -> Option<Option<[f32; NUM_CLASSES]>> {
        if cells[from..from + n].iter().all(|c| c.is_empty()) {
            Some(None)
        } else {
            f32s(from).map(Some)
        }
    };
    // The wall clock closes the row: a row cut short by a crash fails here.
    let wall = cells[8 + 4 * n].to_string();
    if wall.len() != "2026-05-01T12:30:05.123Z".len() || !wall.ends_with('Z') {
        return None;
    }
    Some(CsvRow {
        t: cells[0].parse().ok()?,
        frame: cells[1].parse().ok()?,
        face_id: cells[2].parse().ok()?,
        bbox: [
            cells[3].parse().ok()?,
            cells[4].parse().ok()?,
            cells[5].parse().ok()?,
            cells[6].parse().ok()?,
        ],
        predicted: cells[7].to_string(),
        probs: f32s(8)?,
        scores: f32s(8 + n)?,
        dynamic: optional(8 + 2 * n)?,
        smoothed: optional(8 + 3 * n)?,
        wall,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> FrameRecord {
        let probs = [0.1, 0.05, 0.05, 0.5, 0.1, 0.1, 0.1];
        let scores = [20.0, 19.3, 19.3, 21.6, 20.0, 20.0, 20.0];
        FrameRecord {
            frame: 7,
            seq: 9,
            t: 0.28,
            wall: "2026-05-01T12:30:05.123Z".into(),
            source_t: 0.28,
            faces: vec![FaceRecord {
                id: 3,
                bbox: [10, 20, 30, 40],
                predicted: "happiness".into(),
                classes: class_scores(&scores, &probs),
                dynamic: None,
                smoothed: Some(ScoresRecord::new(None, 3, &scores, &probs)),
                descriptors: vec![DescriptorRecord {
                    class: "happiness".into(),
                    index: 2,
                    logit: 23.5,
                    text: "a broad smile".into(),
                }],
                probe: None,
            }],
        }
    }

    #[test]
    fn jsonl_line_round_trips_and_matches_run_json_names() {
        let r = sample();
        let line = r.to_line();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["faces"][0]["box"], serde_json::json!([10, 20, 30, 40]));
        assert_eq!(v["faces"][0]["classes"][3]["name"], "happiness");
        assert!(v["faces"][0].get("dynamic").is_none());
        let back: FrameRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.faces[0].predicted_index(), 3);
    }

    #[test]
    fn csv_row_matches_header_and_parses_back() {
        let r = sample();
        let header = csv_header();
        let rows = r.to_csv_rows();
        assert_eq!(rows.lines().count(), 1);
        let row = rows.lines().next().unwrap();
        assert_eq!(header.trim_end().split(',').count(), row.split(',').count());
        assert!(header.starts_with("t,frame,face_id,x,y,w,h,predicted,surprise,fear,"));
        let parsed = parse_csv_row(row).unwrap();
        assert_eq!(parsed.probs, r.faces[0].probs());
        assert_eq!(parsed.scores, r.faces[0].scores());
        assert_eq!(parsed.dynamic, None);
        assert_eq!(parsed.smoothed, Some(r.faces[0].probs()));
        assert_eq!((parsed.frame, parsed.face_id), (7, 3));
        // A cut row is not a row.
        assert!(parse_csv_row(&row[..row.len() - 5]).is_none());
    }
}
