//! Turning frames into per-face results: model setup, face analysis, and the
//! JSON shape of results. No UI types here.

pub mod analyzer;
pub mod output;
pub mod setup;

pub use analyzer::{FaceAnalyzer, FaceResult};
