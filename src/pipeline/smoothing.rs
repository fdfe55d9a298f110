//! Exponential smoothing of displayed scores, per face track.
//!
//! The pipeline smooths once ([`Smoother`], in the inference stage) and
//! hands the result on with the raw scores, so the window, the recording and
//! the video's labels all show the same smoothed values.
//!
//! Smoothing runs on the 35 descriptor logits, and class scores and
//! probabilities are recomputed from them, so a smoothed result is still a
//! consistent CLIPER result (class score = mean of its logits, probabilities
//! = softmax of class scores).

use std::collections::HashMap;

use crate::model::cliper::ExpressionScores;
use crate::pipeline::worker::TrackedResult;

/// The largest smoothing factor offered: above it the display lags by
/// seconds at typical inference rates.
pub const MAX_SMOOTHING: f32 = 0.95;

/// `previous * a + new * (1 - a)` on the logits; `a = 0` returns `new`.
pub fn ema(previous: &ExpressionScores, new: &ExpressionScores, a: f32) -> ExpressionScores {
    let a = a.clamp(0.0, MAX_SMOOTHING);
    if a == 0.0 || previous.layout != new.layout {
        return new.clone();
    }
    let logits = previous
        .logits
        .iter()
        .zip(&new.logits)
        .map(|(p, n)| p * a + n * (1.0 - a))
        .collect();
    ExpressionScores::from_logits(logits, &new.layout)
}

/// A face that has not been scored for this many frames starts afresh.
const FORGET_AFTER_FRAMES: u64 = 250;

/// One face's smoothed scores and the frame they were last updated on.
#[derive(Clone, Debug)]
struct FaceState {
    seq: u64,
    shown: ExpressionScores,
    dynamic: Option<ExpressionScores>,
}

/// Per-face EMA of the static and dynamic scores, with a factor that can
/// change while it runs (the window's slider).
#[derive(Clone, Debug, Default)]
pub struct Smoother {
    a: f32,
    faces: HashMap<u64, FaceState>,
}

impl Smoother {
    pub fn new(a: f32) -> Self {
        let mut s = Self::default();
        s.set_factor(a);
        s
    }

    /// The EMA factor (0: off); NaN counts as off.
    pub fn set_factor(&mut self, a: f32) {
        self.a = if a.is_finite() {
            a.clamp(0.0, MAX_SMOOTHING)
        } else {
            0.0
        };
        if self.a == 0.0 {
            self.faces.clear();
        }
    }

    pub fn factor(&self) -> f32 {
        self.a
    }

    /// Forgets every face (a new source: its track ids start again at 1).
    pub fn clear(&mut self) {
        self.faces.clear();
    }

    /// Fills `smoothed` (and `dynamic_smoothed`) of the faces of frame `seq`;
    /// leaves them `None` when smoothing is off.
    pub fn apply(&mut self, seq: u64, faces: &mut [TrackedResult]) {
        if self.a == 0.0 {
            return;
        }
        let a = self.a;
        for f in faces.iter_mut() {
            let scores = &f.face.scores;
            let state = match self.faces.get(&f.id) {
                Some(prev) => FaceState {
                    seq,
                    shown: ema(&prev.shown, scores, a),
                    dynamic: f.dynamic.as_ref().map(|d| match &prev.dynamic {
                        Some(p) => ema(p, &d.scores, a),
                        None => d.scores.clone(),
                    }),
                },
                None => FaceState {
                    seq,
                    shown: scores.clone(),
                    dynamic: f.dynamic.as_ref().map(|d| d.scores.clone()),
                },
            };
            f.smoothed = Some(state.shown.clone());
            f.dynamic_smoothed = state.dynamic.clone();
            self.faces.insert(f.id, state);
        }
        self.faces
            .retain(|_, s| seq.saturating_sub(s.seq) <= FORGET_AFTER_FRAMES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_moves_part_way_and_zero_is_off() {
        let layout = std::sync::Arc::new(crate::model::cliper::expressions::BankLayout::cliper());
        let a = ExpressionScores::from_logits(vec![0.0; 35], &layout);
        let mut l = vec![0.0; 35];
        l[15..20].iter_mut().for_each(|x| *x = 10.0);
        let b = ExpressionScores::from_logits(l, &layout);
        assert_eq!(ema(&a, &b, 0.0), b);
        let m = ema(&a, &b, 0.75);
        assert!((m.class_scores[3] - 2.5).abs() < 1e-5);
        assert_eq!(m.predicted, 3);
        assert!((m.probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}

#[cfg(test)]
mod smoother_tests {
    use super::*;
    use crate::vision::faces::FaceBox;

    fn face(id: u64, class: usize) -> TrackedResult {
        let bbox = FaceBox {
            x: 0,
            y: 0,
            w: 9,
            h: 9,
            score: 1.0,
            landmarks: None,
        };
        TrackedResult::predicting(id, class, bbox)
    }

    #[test]
    fn smooths_per_face_and_forgets_faces_gone_for_long() {
        let mut s = Smoother::new(0.0);
        let mut f = vec![face(1, 3)];
        s.apply(0, &mut f);
        assert!(f[0].smoothed.is_none(), "off: nothing filled in");
        s.set_factor(0.5);
        s.apply(1, &mut f);
        assert_eq!(f[0].smoothed.as_ref().unwrap().predicted, 3);
        let mut f = vec![face(1, 0), face(2, 6)];
        s.apply(2, &mut f);
        let one = f[0].smoothed.as_ref().unwrap();
        // Half of the old class-3 score, half of the new class-0 one.
        assert!((one.class_scores[0] - 2.0).abs() < 1e-5);
        assert!((one.class_scores[3] - 2.0).abs() < 1e-5);
        assert_eq!(
            f[1].smoothed.as_ref().unwrap().predicted,
            6,
            "new face: raw"
        );
        // Face 1 unseen for longer than FORGET_AFTER_FRAMES starts afresh.
        s.apply(3 + FORGET_AFTER_FRAMES, &mut [face(2, 6)]);
        let mut f = vec![face(1, 0)];
        s.apply(4 + FORGET_AFTER_FRAMES, &mut f);
        assert!((f[0].smoothed.as_ref().unwrap().class_scores[3]).abs() < 1e-5);
        s.set_factor(f32::NAN);
        assert_eq!(s.factor(), 0.0);
    }
}
