//! Frames and faces: frame sources, reading images, face detection and
//! crops, and tracking faces across frames.

pub mod centerface;
pub mod clips;
pub mod cnn;
pub mod draw;
pub mod faces;
pub mod images;
pub mod resize;
pub mod source;
pub mod tracking;
pub mod video;
