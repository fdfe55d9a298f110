//! Video clips as frame lists: reading a folder of frames, and sampling a
//! fixed number of frames, one per equal segment (as CLIPER / DFER-CLIP
//! sample clips for training and testing).

use std::path::{Path, PathBuf};

pub const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff"];

pub fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The frames of a clip folder, sorted by name.
pub fn clip_frames(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_image(p))
        .collect();
    v.sort();
    Ok(v)
}

/// Indices of `n` frames out of `len`, one per equal segment: the middle of
/// each segment, or a random position in it when `rng` is given (training).
/// Fewer frames than `n` repeat frames, as the reference sampling does.
pub fn segment_indices(
    len: usize,
    n: usize,
    rng: Option<&mut crate::model::rng::SplitMix64>,
) -> Vec<usize> {
    if len == 0 {
        return Vec::new();
    }
    let seg = len as f64 / n as f64;
    let mut rng = rng;
    (0..n)
        .map(|i| {
            let start = (i as f64 * seg).floor() as usize;
            let end = (((i + 1) as f64 * seg).floor() as usize).max(start + 1);
            let pos = match rng.as_deref_mut() {
                Some(r) => start + r.below(end - start),
                None => (start + end - 1) / 2,
            };
            pos.min(len - 1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_the_clip() {
        assert_eq!(
            segment_indices(32, 16, None),
            (0..16).map(|i| 2 * i).collect::<Vec<_>>()
        );
        let short = segment_indices(5, 16, None);
        assert_eq!(short.len(), 16);
        assert!(short.iter().all(|&i| i < 5));
        let mut r = crate::model::rng::SplitMix64::new(3);
        let rnd = segment_indices(160, 16, Some(&mut r));
        for (i, &p) in rnd.iter().enumerate() {
            assert!(p >= i * 10 && p < (i + 1) * 10);
        }
    }
}
