//! The model: CLIP towers, preprocessing, tokenizer glue, weights loading, and
//! the CLIPER head. Knows nothing of cameras, threads or GUIs.

pub mod clip;
pub mod cliper;
pub mod config;
pub mod device;
pub mod dfer_clip;
pub mod explain;
pub mod gemm_f32;
pub mod gemm_i8;
pub mod layers;
#[cfg(all(test, target_os = "linux", target_arch = "x86_64"))]
mod masked_cpu_tests;
pub mod onednn;
pub mod pickle_guard;
pub mod preprocess;
pub mod rng;
pub(crate) mod scratch;
pub mod setup;
pub mod temporal;
pub mod text;
pub mod tokenizer;
pub mod vision;
pub mod vision_cpu;
pub mod weights;
pub mod zoo;

pub use clip::ClipModel;
pub use config::ClipConfig;
pub use weights::Checkpoint;

/// First index of the maximum (0 for an empty slice; NaN never wins), like
/// torch's argmax: for class scores, summaries and CLIP's token ids alike.
pub fn argmax<T: PartialOrd>(x: &[T]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}
