//! Frames and faces: reading images, face detection and crops.

pub mod faces;
pub mod images;
