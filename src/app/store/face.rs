//! One face as the window shows it, from the pipeline or from a record.

use std::sync::Arc;

use crate::model::cliper::expressions::BankLayout;
use crate::model::cliper::ExpressionScores;
use crate::model::explain::ExplainMap;
use crate::pipeline::dynamic::DynamicMode;
use crate::session::record::FaceRecord;
use crate::vision::faces::FaceBox;

/// One face's history.
#[derive(Clone, Debug)]
pub struct FaceHistory {
    pub id: u64,
    pub bbox: FaceBox,
    /// Latest scores as computed.
    pub raw: ExpressionScores,
    /// Latest scores as displayed (smoothed).
    pub shown: ExpressionScores,
    pub probe_logit: Option<f32>,
    /// App time (seconds) of the latest scores.
    pub updated: f64,
    /// The dynamic branch's latest scores as displayed (smoothed), once the
    /// face's window is full, and how they were made.
    pub dynamic: Option<(ExpressionScores, DynamicMode)>,
    /// Frame features in the face's dynamic window (`None` in replay: a
    /// session does not record it).
    pub window_fill: Option<usize>,
    /// The latest fast explanation map of the chosen target.
    pub explain: Option<ExplainMap>,
}

impl FaceHistory {
    /// The scores to display: dynamic when asked for and available.
    pub fn displayed(&self, dynamic: bool) -> &ExpressionScores {
        match (&self.dynamic, dynamic) {
            (Some((s, _)), true) => s,
            _ => &self.shown,
        }
    }

    /// A recorded face at session time `t`, as the window showed it.
    pub fn from_record(face: &FaceRecord, t: f64, layout: &Arc<BankLayout>) -> Self {
        let raw = face.expression_scores(layout);
        let shown = match &face.smoothed {
            Some(s) => s.expression_scores(layout),
            None => raw.clone(),
        };
        let [x, y, w, h] = face.bbox;
        Self {
            id: face.id,
            bbox: FaceBox {
                x,
                y,
                w,
                h,
                score: face.detection.unwrap_or(f32::NAN),
                landmarks: face.landmarks,
            },
            raw,
            shown,
            probe_logit: face.probe.as_ref().map(|p| p.logit),
            updated: t,
            dynamic: face.dynamic.as_ref().and_then(|d| {
                let mode = DynamicMode::parse(d.mode.as_deref()?)?;
                Some((d.expression_scores(layout), mode))
            }),
            window_fill: None,
            explain: None,
        }
    }
}
