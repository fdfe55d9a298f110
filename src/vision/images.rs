//! Reading still images from disk with errors that name the file.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {0} not found")]
    NotFound(PathBuf),
    #[error("image {0} is empty (0 bytes)")]
    Empty(PathBuf),
    #[error("cannot read image {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error(
        "cannot read image {path}: {reason} (is it a PNG, JPEG, BMP, GIF, WebP or TIFF file?)"
    )]
    Decode { path: PathBuf, reason: String },
    #[error("image {path} is {width}x{height} pixels: decoded, that is more than the {limit_mb} MB cliper reads; shrink it first")]
    TooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
        limit_mb: u64,
    },
    #[error("image {0} has zero width or height")]
    ZeroSize(PathBuf),
}

/// Image file extensions read as stills, folder frames, clip frames and
/// batch inputs (the one list).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff"];

/// Whether `p` has one of [`IMAGE_EXTENSIONS`] (any case).
pub fn has_image_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The most memory one decoded image may take (the image crate's default).
pub const MAX_DECODED_BYTES: u64 = 512 << 20;

/// The error for a file that cannot be opened, by its cause.
fn io_error(path: &Path, e: &std::io::Error) -> ImageError {
    let reason = match (e.kind(), e.raw_os_error()) {
        (std::io::ErrorKind::NotFound, _) => return ImageError::NotFound(path.to_path_buf()),
        (std::io::ErrorKind::PermissionDenied, _) => {
            "permission denied; check who may read it (`ls -l`)".to_string()
        }
        // ELOOP
        (_, Some(40)) => "symbolic links point in a loop; give the real file".to_string(),
        _ => e.to_string(),
    };
    ImageError::Unreadable {
        path: path.to_path_buf(),
        reason,
    }
}

/// Opens and decodes an image as RGB, turned upright by its EXIF
/// orientation (phone photos are stored sideways with a tag saying so).
pub fn load_rgb(path: &Path) -> Result<image::RgbImage, ImageError> {
    use image::ImageDecoder;
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, &e))?;
    if meta.len() == 0 {
        return Err(ImageError::Empty(path.to_path_buf()));
    }
    std::fs::File::open(path).map_err(|e| io_error(path, &e))?;
    let decode_err = |e: image::ImageError| match e {
        image::ImageError::Limits(_) => {
            let (width, height) = image::image_dimensions(path).unwrap_or((0, 0));
            ImageError::TooLarge {
                path: path.to_path_buf(),
                width,
                height,
                limit_mb: MAX_DECODED_BYTES >> 20,
            }
        }
        e => ImageError::Decode {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    };
    let mut reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| ImageError::Decode {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(decode_err)?;
    // `from_decoder` allocates without asking the limits: check first.
    if decoder.total_bytes() > MAX_DECODED_BYTES {
        let (width, height) = decoder.dimensions();
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
            limit_mb: MAX_DECODED_BYTES >> 20,
        });
    }
    // A missing or unreadable tag means upright.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    img.apply_orientation(orientation);
    if img.width() == 0 || img.height() == 0 {
        return Err(ImageError::ZeroSize(path.to_path_buf()));
    }
    Ok(img.to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::ImageEncoder;

    /// A JPEG of `w` x `h` with an EXIF APP1 segment holding `orientation`.
    fn jpeg_with_orientation(img: &image::RgbImage, orientation: u16) -> Vec<u8> {
        let mut plain = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut plain, 95)
            .encode_image(img)
            .unwrap();
        // TIFF header (little endian), one IFD entry: 0x0112 SHORT 1 value.
        let mut tiff = b"II*\0\x08\0\0\0".to_vec();
        tiff.extend(1u16.to_le_bytes());
        tiff.extend(0x0112u16.to_le_bytes());
        tiff.extend(3u16.to_le_bytes());
        tiff.extend(1u32.to_le_bytes());
        tiff.extend(orientation.to_le_bytes());
        tiff.extend([0, 0]);
        tiff.extend(0u32.to_le_bytes());
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend(tiff);
        let mut out = plain[..2].to_vec(); // SOI
        out.extend([0xFF, 0xE1]);
        out.extend(((app1.len() + 2) as u16).to_be_bytes());
        out.extend(app1);
        out.extend(&plain[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied() {
        // 40x20, left half red, right half blue.
        let img = image::RgbImage::from_fn(40, 20, |x, _| {
            if x < 20 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("phone.jpg");
        // 6: stored rotated; shown turned 90 degrees clockwise.
        std::fs::write(&p, jpeg_with_orientation(&img, 6)).unwrap();
        let up = load_rgb(&p).unwrap();
        assert_eq!(up.dimensions(), (20, 40));
        // Turned clockwise, the left (red) half is now on top.
        assert!(up.get_pixel(10, 5)[0] > 200 && up.get_pixel(10, 35)[2] > 200);
        std::fs::write(&p, jpeg_with_orientation(&img, 1)).unwrap();
        assert_eq!(load_rgb(&p).unwrap().dimensions(), (40, 20));
    }

    #[test]
    fn causes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.png");
        let b = dir.path().join("b.png");
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        let e = load_rgb(&a).unwrap_err().to_string();
        assert!(e.contains("loop"), "{e}");
        assert!(matches!(
            load_rgb(&dir.path().join("none.png")),
            Err(ImageError::NotFound(_))
        ));
        // A PNG header claiming 100000 x 100000 pixels.
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(&[0u8; 3], 1, 1, image::ExtendedColorType::Rgb8)
            .unwrap();
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        // The IHDR chunk's CRC-32 over its type and data.
        let mut crc = 0xFFFF_FFFFu32;
        for &b in &png[12..29] {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        png[29..33].copy_from_slice(&(!crc).to_be_bytes());
        let big = dir.path().join("big.png");
        std::fs::write(&big, &png).unwrap();
        let e = load_rgb(&big).unwrap_err().to_string();
        assert!(e.contains("100000x100000") && e.contains("512 MB"), "{e}");
    }
}
