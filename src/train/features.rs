//! Image features of a data split, computed once (with a progress bar) and
//! cached on disk: CLIPER's stage 1 trains only the descriptors, so the
//! image features never change during it.

use std::collections::HashMap;
use std::hash::Hasher;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;

use super::dataset::{clip_frames, segment_indices, Sample};
use super::TrainError;
use crate::model::ClipModel;
use crate::vision::images::load_rgb;

/// Frames per clip for the dynamic branch.
pub const CLIP_FRAMES: usize = 16;

pub struct EncodedSplit {
    /// [N, E] for images, [N, 16, E] for clips; normalised, f32, CPU.
    pub features: Tensor,
    /// The same before normalisation (DFER-CLIP's temporal module takes these).
    pub raw_features: Tensor,
    pub labels: Vec<usize>,
    /// Samples that could not be read and were skipped.
    pub skipped: usize,
}

/// FNV-1a, for cache keys (stable across runs and platforms).
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

fn file_stamp(h: &mut Fnv, p: &Path) {
    h.write(p.to_string_lossy().as_bytes());
    if let Ok(m) = std::fs::metadata(p) {
        h.write(&m.len().to_le_bytes());
        if let Ok(t) = m.modified() {
            if let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) {
                h.write(&d.as_nanos().to_le_bytes());
            }
        }
    }
}

/// The cache key of a split under a model.
pub fn cache_key(clip: &ClipModel, samples: &[Sample], clips: bool, weights_stamp: &str) -> String {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.write(weights_stamp.as_bytes());
    h.write(format!("{:?}", clip.config).as_bytes());
    h.write(&[clips as u8]);
    for s in samples {
        file_stamp(&mut h, &s.path);
        h.write(&(s.label as u64).to_le_bytes());
    }
    format!("{:016x}", h.finish())
}

fn progress(len: usize, what: &str) -> ProgressBar {
    crate::progress::bar(
        len as u64,
        "{msg:>18} [{bar:30}] {pos}/{len} ({eta} left)",
        what,
    )
}

/// Why a sample's images could not be read.
#[derive(Debug, thiserror::Error)]
enum SampleError {
    #[error(transparent)]
    Clip(#[from] crate::vision::clips::ClipError),
    #[error(transparent)]
    Image(#[from] crate::vision::images::ImageError),
    #[error("{}: only {frames} frames could be read ({notes})", .path.display())]
    Incomplete {
        path: PathBuf,
        frames: usize,
        notes: String,
    },
    #[error("{}: cannot read the clip folder: {source}", .path.display())]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: clip folder holds no frames", .0.display())]
    EmptyFolder(PathBuf),
}

fn load_sample_images(s: &Sample, clips: bool) -> Result<Vec<image::RgbImage>, SampleError> {
    if clips && s.path.is_file() {
        // A video file: the same sampling through FFmpeg as classify-clip.
        let sampled = crate::vision::clips::sample_clip(&s.path, CLIP_FRAMES)?;
        if !sampled.complete {
            return Err(SampleError::Incomplete {
                path: s.path.clone(),
                frames: sampled.source_frames,
                notes: sampled.notes.join("; "),
            });
        }
        Ok(sampled.frames)
    } else if clips {
        let frames = clip_frames(&s.path).map_err(|source| SampleError::Folder {
            path: s.path.clone(),
            source,
        })?;
        if frames.is_empty() {
            return Err(SampleError::EmptyFolder(s.path.clone()));
        }
        Ok(segment_indices(frames.len(), CLIP_FRAMES, None)
            .into_iter()
            .map(|i| load_rgb(&frames[i]))
            .collect::<Result<_, _>>()?)
    } else {
        Ok(vec![load_rgb(&s.path)?])
    }
}

/// Encodes every sample (center crop, no augmentation), reading from or
/// writing to `cache_dir` when given.
pub fn encode_split(
    clip: &ClipModel,
    samples: &[Sample],
    clips: bool,
    skip_unreadable: bool,
    cache_dir: Option<&Path>,
    weights_stamp: &str,
    what: &str,
) -> Result<EncodedSplit, TrainError> {
    let key = cache_key(clip, samples, clips, weights_stamp);
    let cache_file: Option<PathBuf> =
        cache_dir.map(|d| d.join(format!("features-{what}-{key}.safetensors")));
    if let Some(f) = &cache_file {
        if let Ok(t) = candle_core::safetensors::load(f, &Device::Cpu) {
            if let (Some(raw), Some(lab)) = (t.get("raw_features"), t.get("labels")) {
                let labels: Vec<usize> = lab
                    .to_vec1::<u32>()?
                    .into_iter()
                    .map(|v| v as usize)
                    .collect();
                let skipped = t
                    .get("skipped")
                    .and_then(|s| s.to_vec1::<u32>().ok())
                    .and_then(|v| v.first().copied())
                    .unwrap_or(0) as usize;
                log::info!(
                    "{what}: {} cached features from {}",
                    labels.len(),
                    f.display()
                );
                return Ok(EncodedSplit {
                    features: normalise_last(raw)?,
                    raw_features: raw.clone(),
                    labels,
                    skipped,
                });
            }
        }
    }
    let pb = progress(samples.len(), &format!("encoding {what}"));
    let per = if clips { CLIP_FRAMES } else { 1 };
    let batch_samples = (32 / per).max(1);
    let mut feats: Vec<Tensor> = Vec::new();
    let mut labels = Vec::new();
    let mut skipped = 0;
    for chunk in samples.chunks(batch_samples) {
        let mut imgs = Vec::new();
        for s in chunk {
            match load_sample_images(s, clips) {
                Ok(v) => {
                    imgs.extend(v);
                    labels.push(s.label);
                }
                Err(e) if skip_unreadable => {
                    pb.suspend(|| log::warn!("skipping: {e}"));
                    skipped += 1;
                }
                Err(e) => {
                    pb.abandon();
                    return Err(TrainError::Unreadable(e.to_string()));
                }
            }
            pb.inc(1);
        }
        if !imgs.is_empty() {
            feats.push(
                clip.encode_rgb_raw(&imgs)?
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?,
            );
        }
    }
    pb.finish_and_clear();
    if labels.is_empty() {
        return Err(TrainError::Unreadable(format!(
            "no readable samples in the {what} split"
        )));
    }
    let raw_features = Tensor::cat(&feats, 0)?;
    let raw_features = if clips {
        let e = raw_features.dim(1)?;
        raw_features.reshape((labels.len(), CLIP_FRAMES, e))?
    } else {
        raw_features
    };
    let features = normalise_last(&raw_features)?;
    if skipped > 0 {
        log::warn!("{what}: skipped {skipped} unreadable sample(s)");
    }
    if let Some(f) = &cache_file {
        let lab = Tensor::from_vec(
            labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
            labels.len(),
            &Device::Cpu,
        )?;
        let sk = Tensor::from_vec(vec![skipped as u32], 1, &Device::Cpu)?;
        let map: HashMap<String, Tensor> = HashMap::from([
            ("raw_features".to_string(), raw_features.clone()),
            ("labels".to_string(), lab),
            ("skipped".to_string(), sk),
        ]);
        // A cache that cannot be written only costs time next run.
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(f.parent().unwrap_or(Path::new(".")))?;
            let tmp = f.with_extension("tmp");
            candle_core::safetensors::save(&map, &tmp).map_err(std::io::Error::other)?;
            std::fs::rename(&tmp, f)
        };
        if let Err(e) = write() {
            log::warn!("cannot write feature cache {}: {e}", f.display());
        }
    }
    Ok(EncodedSplit {
        features,
        raw_features,
        labels,
        skipped,
    })
}

/// L2-normalised along the last dimension.
fn normalise_last(x: &Tensor) -> candle_core::Result<Tensor> {
    crate::model::layers::l2_normalize(x)
}
