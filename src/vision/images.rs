//! Reading still images from disk with errors that name the file.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {0} not found")]
    NotFound(PathBuf),
    #[error("image {0} is empty (0 bytes)")]
    Empty(PathBuf),
    #[error(
        "cannot read image {path}: {reason} (is it a PNG, JPEG, BMP, GIF, WebP or TIFF file?)"
    )]
    Decode { path: PathBuf, reason: String },
    #[error("image {0} has zero width or height")]
    ZeroSize(PathBuf),
}

/// Opens and decodes an image, as RGB.
pub fn load_rgb(path: &Path) -> Result<image::RgbImage, ImageError> {
    let meta = std::fs::metadata(path).map_err(|_| ImageError::NotFound(path.to_path_buf()))?;
    if meta.len() == 0 {
        return Err(ImageError::Empty(path.to_path_buf()));
    }
    let img = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| ImageError::Decode {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .decode()
        .map_err(|e| ImageError::Decode {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(ImageError::ZeroSize(path.to_path_buf()));
    }
    Ok(img.to_rgb8())
}
