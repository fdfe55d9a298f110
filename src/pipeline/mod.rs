//! Turning frames into per-face results: face analysis, the
//! threaded live pipeline, batch runs, and the JSON shape of results. No UI
//! types here.

pub mod analyzer;
pub mod bench;
pub mod clip;
pub mod dynamic;
pub mod explain;
pub mod output;
pub mod recorder;
pub mod run;
pub mod smoothing;
pub mod worker;

pub use analyzer::{FaceAnalyzer, FaceResult};
