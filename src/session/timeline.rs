//! The per-face class curves a window draws: what was shown (the smoothed
//! static scores when smoothing was on) and the dynamic branch's scores,
//! over time. One store for both windows: the live window pushes each
//! scored frame as it comes, replay folds the frame records of
//! `session.jsonl`, and the same panel (`app::scores`) draws either.

use std::collections::{BTreeMap, VecDeque};

use super::record::{FaceRecord, FrameRecord};
use super::replay::TimelinePoint;

/// One face's curves, oldest point first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaceTimeline {
    /// The static scores as shown.
    pub shown: VecDeque<TimelinePoint>,
    /// The dynamic scores as shown, where the face had them.
    pub dynamic: VecDeque<TimelinePoint>,
}

impl FaceTimeline {
    pub fn is_empty(&self) -> bool {
        self.shown.is_empty() && self.dynamic.is_empty()
    }
}

/// Every face's curves, by face id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timelines {
    faces: BTreeMap<u64, FaceTimeline>,
}

impl Timelines {
    /// Folds a session's frame records (`classes`: the session's order).
    pub fn from_records<S: AsRef<str>>(frames: &[FrameRecord], classes: &[S]) -> Self {
        let mut t = Self::default();
        for f in frames {
            for face in &f.faces {
                t.push_record(f.t, face, classes);
            }
        }
        t
    }

    /// Adds one recorded face at time `t`: its smoothed scores when it has
    /// them (what the window showed), else its static ones.
    pub fn push_record<S: AsRef<str>>(&mut self, t: f64, face: &FaceRecord, classes: &[S]) {
        let shown = match &face.smoothed {
            Some(s) => s.probs(classes),
            None => face.probs(classes),
        };
        let dynamic = face.dynamic.as_ref().map(|d| d.probs(classes));
        self.push(face.id, t, shown, dynamic);
    }

    /// Adds one point to face `id`'s curves (probabilities in class order).
    pub fn push(&mut self, id: u64, t: f64, shown: Vec<f32>, dynamic: Option<Vec<f32>>) {
        let face = self.faces.entry(id).or_default();
        face.shown.push_back(point(t, shown));
        if let Some(d) = dynamic {
            face.dynamic.push_back(point(t, d));
        }
    }

    pub fn get(&self, id: u64) -> Option<&FaceTimeline> {
        self.faces.get(&id)
    }

    /// Whether face `id` has any point left.
    pub fn has(&self, id: u64) -> bool {
        self.faces.get(&id).is_some_and(|f| !f.is_empty())
    }

    /// Forgets every curve (scores under another bank are not comparable).
    pub fn clear(&mut self) {
        self.faces.clear();
    }

    /// Drops points older than `now - keep_secs`, and faces left with none.
    pub fn prune(&mut self, now: f64, keep_secs: f64) {
        for f in self.faces.values_mut() {
            for series in [&mut f.shown, &mut f.dynamic] {
                while series.front().is_some_and(|p| now - p.t > keep_secs) {
                    series.pop_front();
                }
            }
        }
        self.faces.retain(|_, f| !f.is_empty());
    }
}

fn point(t: f64, probs: Vec<f32>) -> TimelinePoint {
    let mut predicted = 0;
    for (i, p) in probs.iter().enumerate() {
        if *p > probs[predicted] {
            predicted = i;
        }
    }
    TimelinePoint {
        t,
        probs,
        predicted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::record::ScoresRecord;

    fn record(id: u64, probs: &[f32], smoothed: Option<&[f32]>) -> FaceRecord {
        let classes = ["a", "b"];
        let of = |p: &[f32]| ScoresRecord::new(None, &classes, 0, &[0.0, 0.0], p);
        let s = of(probs);
        FaceRecord {
            id,
            bbox: [0, 0, 1, 1],
            detection: None,
            landmarks: None,
            predicted: s.predicted.clone(),
            classes: s.classes,
            dynamic: None,
            smoothed: smoothed.map(of),
            descriptors: Vec::new(),
            probe: None,
        }
    }

    #[test]
    fn records_fold_into_what_was_shown_and_prune_by_age() {
        let frames: Vec<FrameRecord> = (0..4)
            .map(|k| FrameRecord {
                frame: k,
                seq: k,
                t: k as f64,
                wall: String::new(),
                source_t: k as f64,
                faces: vec![record(1, &[0.9, 0.1], (k > 1).then_some(&[0.3, 0.7][..]))],
            })
            .collect();
        let mut t = Timelines::from_records(&frames, &["a", "b"]);
        let face = t.get(1).unwrap();
        assert_eq!(face.shown.len(), 4);
        assert_eq!(
            face.shown[0].predicted, 0,
            "static where nothing was smoothed"
        );
        assert_eq!(face.shown[3].probs, vec![0.3, 0.7], "smoothed where it was");
        assert_eq!(face.shown[3].predicted, 1);
        assert!(face.dynamic.is_empty());
        t.prune(3.0, 1.5);
        assert_eq!(t.get(1).unwrap().shown.len(), 2);
        t.prune(10.0, 1.5);
        assert!(!t.has(1));
    }
}
