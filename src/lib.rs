//! `cliper`: live, interpretable facial-expression recognition with CLIPER
//! (CLIP ViT-B/16 plus learned expression text descriptors) on Candle.
//!
//! The library holds everything the GUI and the CLI share; `main.rs` is a thin
//! command-line edge over it.

pub mod app;
pub mod batch;
pub mod model;
pub mod pipeline;
pub mod session;
pub mod stop;
pub mod train;
pub mod vision;
