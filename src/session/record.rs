//! One processed frame as recorded: the line format of `session.jsonl` and
//! the row format of `session.csv`, written and read by the same types.
//!
//! A face's fields follow `cliper run --json` (`pipeline::output`): `id`,
//! `box`, `classes` (`name`, `score`, `prob` in class order), `predicted`,
//! `descriptors`, `probe`; a session adds `dynamic` and `smoothed`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::cliper::expressions::BankLayout;
use crate::model::cliper::scoring::argmax;
use crate::model::cliper::ExpressionScores;

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
    /// The detector's confidence in the face (CenterFace: a probability).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detection: Option<f32>,
    /// Left eye, right eye (as seen), nose tip, left and right mouth
    /// corner, `[x, y]` in source pixels, where the detector gives them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landmarks: Option<[[f32; 2]; 5]>,
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

/// `[{"name", "score", "prob"}, ...]` in the order of `classes` (the
/// model's classes, as `meta.json` lists them).
pub fn class_scores<S: AsRef<str>>(
    classes: &[S],
    scores: &[f32],
    probs: &[f32],
) -> Vec<ClassScore> {
    classes
        .iter()
        .enumerate()
        .map(|(c, name)| ClassScore {
            name: name.as_ref().to_string(),
            score: scores.get(c).copied().unwrap_or(f32::NAN),
            prob: probs.get(c).copied().unwrap_or(f32::NAN),
        })
        .collect()
}

/// The class records of scores, in their bank's class order.
pub fn class_scores_of(s: &ExpressionScores) -> Vec<ClassScore> {
    class_scores(s.layout.classes(), &s.class_scores, &s.probs)
}

impl ScoresRecord {
    pub fn new<S: AsRef<str>>(
        mode: Option<&str>,
        classes: &[S],
        predicted: usize,
        scores: &[f32],
        probs: &[f32],
    ) -> Self {
        Self {
            mode: mode.map(str::to_string),
            predicted: classes
                .get(predicted)
                .map(|c| c.as_ref().to_string())
                .unwrap_or_else(|| "?".into()),
            classes: class_scores(classes, scores, probs),
        }
    }

    /// The record of scores.
    pub fn of(mode: Option<&str>, s: &ExpressionScores) -> Self {
        Self::new(
            mode,
            s.layout.classes(),
            s.predicted,
            &s.class_scores,
            &s.probs,
        )
    }

    /// Probabilities in the order of `classes` (by name, so a reordered
    /// file still reads; NaN for a class the record lacks).
    pub fn probs<S: AsRef<str>>(&self, classes: &[S]) -> Vec<f32> {
        by_name(&self.classes, classes, |c| c.prob)
    }

    /// The scores again in `layout`'s class order, as far as a record holds
    /// them: no descriptor logits (NaN).
    pub fn expression_scores(&self, layout: &Arc<BankLayout>) -> ExpressionScores {
        scores_of(&self.classes, &self.predicted, layout)
    }
}

/// Scores from recorded classes (matched by name; NaN for a class the record
/// lacks) with every descriptor logit unknown (NaN).
fn scores_of(record: &[ClassScore], predicted: &str, layout: &Arc<BankLayout>) -> ExpressionScores {
    let names = layout.classes();
    let probs = by_name(record, names, |c| c.prob);
    ExpressionScores {
        logits: vec![f32::NAN; layout.num_descriptors()],
        class_scores: by_name(record, names, |c| c.score),
        predicted: layout.index(predicted).unwrap_or_else(|| argmax(&probs)),
        probs,
        layout: layout.clone(),
    }
}

impl FaceRecord {
    /// The static scores again in `layout`'s class order: the recorded class
    /// scores and probabilities, and the logits of the recorded top
    /// descriptors (the others were not recorded and stay NaN).
    pub fn expression_scores(&self, layout: &Arc<BankLayout>) -> ExpressionScores {
        let mut s = scores_of(&self.classes, &self.predicted, layout);
        for d in &self.descriptors {
            let Some(c) = layout.index(&d.class) else {
                continue;
            };
            let range = layout.range(c);
            if d.index < range.len() {
                s.logits[range.start + d.index] = d.logit;
            }
        }
        s
    }

    /// Static probabilities in the order of `classes`.
    pub fn probs<S: AsRef<str>>(&self, classes: &[S]) -> Vec<f32> {
        by_name(&self.classes, classes, |c| c.prob)
    }

    /// Static class scores in the order of `classes`.
    pub fn scores<S: AsRef<str>>(&self, classes: &[S]) -> Vec<f32> {
        by_name(&self.classes, classes, |c| c.score)
    }

    /// Index in `classes` of the static prediction (the most probable
    /// class when the name is unknown).
    pub fn predicted_index<S: AsRef<str>>(&self, classes: &[S]) -> usize {
        classes
            .iter()
            .position(|n| n.as_ref() == self.predicted)
            .unwrap_or_else(|| argmax(&self.probs(classes)))
    }
}

fn by_name<S: AsRef<str>>(
    record: &[ClassScore],
    classes: &[S],
    value: impl Fn(&ClassScore) -> f32,
) -> Vec<f32> {
    classes
        .iter()
        .map(|name| {
            record
                .iter()
                .find(|c| c.name == name.as_ref())
                .map(&value)
                .unwrap_or(f32::NAN)
        })
        .collect()
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

    /// The CSV rows of this frame (one per face), each ending in a newline,
    /// with a column per class of `classes`.
    pub fn to_csv_rows<S: AsRef<str>>(&self, classes: &[S]) -> String {
        let mut out = String::new();
        for f in &self.faces {
            csv_row(self, f, classes, &mut out);
        }
        out
    }
}

/// The columns of `session.csv`, in order. Probabilities are the plain
/// class names; `score_*` are the class scores (mean descriptor logits);
/// `dynamic_*` and `smoothed_*` are probabilities and stay empty when the
/// dynamic branch or smoothing was off.
pub fn csv_columns<S: AsRef<str>>(classes: &[S]) -> Vec<String> {
    let mut cols: Vec<String> = ["t", "frame", "face_id", "x", "y", "w", "h", "predicted"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let names = || classes.iter().map(|c| c.as_ref());
    cols.extend(names().map(|c| c.to_string()));
    cols.extend(names().map(|c| format!("score_{c}")));
    cols.extend(names().map(|c| format!("dynamic_{c}")));
    cols.extend(names().map(|c| format!("smoothed_{c}")));
    cols.push("wall".to_string());
    cols
}

/// The header line of `session.csv`, with its newline.
pub fn csv_header<S: AsRef<str>>(classes: &[S]) -> String {
    csv_line(csv_columns(classes))
}

/// One CSV line of `cells`, quoted where a cell needs it, ending in `\n`.
fn csv_line<I: IntoIterator<Item = T>, T: AsRef<[u8]>>(cells: I) -> String {
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    // Writing to memory cannot fail, and the cells are UTF-8 strings.
    let _ = w.write_record(cells);
    let bytes = w.into_inner().unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_default()
}

fn csv_row<S: AsRef<str>>(frame: &FrameRecord, f: &FaceRecord, classes: &[S], out: &mut String) {
    let [x, y, w, h] = f.bbox;
    let mut cells: Vec<String> = vec![
        format!("{:.6}", frame.t),
        frame.frame.to_string(),
        f.id.to_string(),
        x.to_string(),
        y.to_string(),
        w.to_string(),
        h.to_string(),
        f.predicted.clone(),
    ];
    cells.extend(f.probs(classes).iter().map(f32::to_string));
    cells.extend(f.scores(classes).iter().map(f32::to_string));
    for extra in [&f.dynamic, &f.smoothed] {
        match extra {
            Some(s) => cells.extend(s.probs(classes).iter().map(f32::to_string)),
            None => cells.extend(std::iter::repeat_n(String::new(), classes.len())),
        }
    }
    cells.push(frame.wall.clone());
    out.push_str(&csv_line(cells));
}

/// One parsed CSV row (for checks and tools; pandas reads the file as is).
#[derive(Clone, Debug, PartialEq)]
pub struct CsvRow {
    pub t: f64,
    pub frame: u64,
    pub face_id: u64,
    pub bbox: [u32; 4],
    pub predicted: String,
    pub probs: Vec<f32>,
    pub scores: Vec<f32>,
    pub dynamic: Option<Vec<f32>>,
    pub smoothed: Option<Vec<f32>>,
    pub wall: String,
}

/// Parses a data row of a `session.csv` of `n` classes; `None` when it is
/// not a complete row.
pub fn parse_csv_row(line: &str, n: usize) -> Option<CsvRow> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(line.as_bytes());
    let mut record = csv::StringRecord::new();
    if !reader.read_record(&mut record).ok()? {
        return None;
    }
    let cells: Vec<&str> = record.iter().collect();
    if cells.len() != 8 + 4 * n + 1 {
        return None;
    }
    let f32s = |from: usize| -> Option<Vec<f32>> {
        (0..n).map(|i| cells[from + i].parse().ok()).collect()
    };
    let optional = |from: usize| -> Option<Option<Vec<f32>>> {
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
    use crate::model::cliper::expressions::CLASSES;

    pub(crate) fn sample() -> FrameRecord {
        let probs = [0.1, 0.05, 0.05, 0.5, 0.1, 0.1, 0.1];
        let scores = [20.0, 19.3, 19.3, 21.6, 20.0, 20.0, 20.0];
        let classes = crate::model::cliper::expressions::CLASSES;
        FrameRecord {
            frame: 7,
            seq: 9,
            t: 0.28,
            wall: "2026-05-01T12:30:05.123Z".into(),
            source_t: 0.28,
            faces: vec![FaceRecord {
                detection: None,
                landmarks: None,
                id: 3,
                bbox: [10, 20, 30, 40],
                predicted: "happiness".into(),
                classes: class_scores(&classes, &scores, &probs),
                dynamic: None,
                smoothed: Some(ScoresRecord::new(None, &classes, 3, &scores, &probs)),
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
        assert_eq!(back.faces[0].predicted_index(&CLASSES), 3);
    }

    #[test]
    fn csv_row_matches_header_and_parses_back() {
        let r = sample();
        let header = csv_header(&CLASSES);
        let rows = r.to_csv_rows(&CLASSES);
        assert_eq!(rows.lines().count(), 1);
        let row = rows.lines().next().unwrap();
        assert_eq!(header.trim_end().split(',').count(), row.split(',').count());
        assert!(header.starts_with("t,frame,face_id,x,y,w,h,predicted,surprise,fear,"));
        let parsed = parse_csv_row(row, 7).unwrap();
        assert_eq!(parsed.probs, r.faces[0].probs(&CLASSES));
        assert_eq!(parsed.scores, r.faces[0].scores(&CLASSES));
        assert_eq!(parsed.dynamic, None);
        assert_eq!(parsed.smoothed, Some(r.faces[0].probs(&CLASSES)));
        assert_eq!((parsed.frame, parsed.face_id), (7, 3));
        // A cut row is not a row.
        assert!(parse_csv_row(&row[..row.len() - 5], 7).is_none());
    }

    #[test]
    fn eleven_classes_get_their_own_columns() {
        let classes = crate::model::dfer_clip::MAFW_CLASSES;
        let probs: Vec<f32> = (0..11).map(|i| i as f32 / 55.0).collect();
        let scores: Vec<f32> = (0..11).map(|i| i as f32).collect();
        let mut r = sample();
        r.faces[0].classes = class_scores(&classes, &scores, &probs);
        r.faces[0].predicted = "disappointment".into();
        r.faces[0].smoothed = None;
        let header = csv_header(&classes);
        assert!(header.contains(",disappointment,") && header.contains("smoothed_contempt"));
        let row = r.to_csv_rows(&classes);
        let parsed = parse_csv_row(row.trim_end(), 11).unwrap();
        assert_eq!(parsed.probs, probs);
        assert_eq!(r.faces[0].predicted_index(&classes), 10);
        // CLIPER's columns read the classes they share by name.
        assert_eq!(r.faces[0].probs(&CLASSES)[3], probs[0]);
    }
}
