//! Settings that persist between runs (through eframe's storage, a RON file
//! in the platform's data folder, e.g. `~/.local/share/cliper/app.ron`).

use serde::{Deserialize, Serialize};

/// Key under which the settings are stored.
pub const STORAGE_KEY: &str = "cliper-settings";

/// Which descriptors to score against.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum BankChoice {
    #[default]
    ZeroShot,
    /// A CLIPER checkpoint (learned) or a prompts file (zero-shot).
    File(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The last source, as `--source` takes it (`demo`, `camera:0`, a path).
    pub source: Option<String>,
    /// Requested camera resolution; `None` is the default (640x480).
    pub camera_resolution: Option<(u32, u32)>,
    /// EMA factor of the displayed scores, 0 = off.
    pub smoothing: f32,
    /// Length of the timeline, seconds.
    pub timeline_secs: f32,
    pub bank: BankChoice,
    /// The free-text probe.
    pub probe: String,
    /// Descriptors listed in the top list.
    pub top_descriptors: usize,
    /// Show the dynamic branch (temporal window) instead of the static scores.
    pub dynamic: bool,
    /// Frame features per dynamic window.
    pub dynamic_window: usize,
    /// A new dynamic score every N frames.
    pub dynamic_stride: usize,
    /// The face detector.
    pub detector: crate::vision::faces::DetectorKind,
    /// Draw the detector's landmarks (eyes, nose, mouth corners) on faces.
    pub show_landmarks: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            source: None,
            camera_resolution: None,
            smoothing: 0.6,
            timeline_secs: 20.0,
            bank: BankChoice::ZeroShot,
            probe: String::new(),
            top_descriptors: 6,
            dynamic: false,
            dynamic_window: crate::model::temporal::DEFAULT_FRAMES,
            dynamic_stride: 1,
            detector: crate::vision::faces::DetectorKind::default(),
            show_landmarks: false,
        }
    }
}

impl Settings {
    /// Brings values read from an older or edited file back into range.
    pub fn sanitized(mut self) -> Self {
        if !self.smoothing.is_finite() {
            self.smoothing = 0.0;
        }
        self.smoothing = self
            .smoothing
            .clamp(0.0, crate::pipeline::smoothing::MAX_SMOOTHING);
        if !self.timeline_secs.is_finite() {
            self.timeline_secs = 20.0;
        }
        self.timeline_secs = self.timeline_secs.clamp(5.0, 120.0);
        self.top_descriptors = self.top_descriptors.clamp(1, 35);
        self.dynamic_window = self
            .dynamic_window
            .clamp(2, crate::model::temporal::DEFAULT_FRAMES);
        self.dynamic_stride = self.dynamic_stride.clamp(1, 16);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_clamps() {
        let s = Settings {
            smoothing: f32::NAN,
            timeline_secs: 1e9,
            top_descriptors: 0,
            ..Default::default()
        }
        .sanitized();
        assert_eq!(
            (s.smoothing, s.timeline_secs, s.top_descriptors),
            (0.0, 120.0, 1)
        );
    }
}
