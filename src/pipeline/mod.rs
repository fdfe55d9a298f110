//! Turning frames into per-face results: face analysis, the threaded live
//! pipeline (which `cliper run` and `cliper batch` drive too, from
//! `commands` and `batch`), smoothing, the recorder, and the JSON shape of
//! results. No UI types here.

pub mod analyzer;
pub mod dynamic;
pub mod output;
pub mod recorder;
pub mod smoothing;
pub mod worker;

pub use analyzer::{FaceAnalyzer, FaceResult};
