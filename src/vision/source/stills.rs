//! Still images as sources: one image repeated, or a folder of images played
//! in name order ("frame2" before "frame10").

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;

use super::{Frame, FrameSource, SourceError};
use crate::vision::images::load_rgb;

/// One image, delivered again and again (endless).
pub struct StillSource {
    image: Arc<RgbImage>,
    name: String,
    fps: f64,
    index: u64,
}

impl StillSource {
    pub fn open(path: &Path, fps: f64) -> Result<Self, SourceError> {
        let image = Arc::new(load_rgb(path)?);
        Ok(Self {
            image,
            name: display_name(path),
            fps,
            index: 0,
        })
    }
}

impl FrameSource for StillSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        let index = self.index;
        self.index += 1;
        Ok(Some(Frame {
            image: self.image.clone(),
            index,
            t: index as f64 / self.fps,
        }))
    }
    fn frame_count(&self) -> Option<u64> {
        None
    }
    fn fps(&self) -> f64 {
        self.fps
    }
    fn name(&self) -> String {
        self.name.clone()
    }
}

/// The images of a folder, each one frame.
pub struct FolderSource {
    files: Vec<PathBuf>,
    name: String,
    fps: f64,
    next: usize,
}

impl FolderSource {
    pub fn open(dir: &Path, fps: f64) -> Result<Self, SourceError> {
        let entries = std::fs::read_dir(dir).map_err(|e| SourceError::Folder {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_image_file(p))
            .collect();
        if files.is_empty() {
            return Err(SourceError::EmptyFolder(dir.to_path_buf()));
        }
        files.sort_by(|a, b| natural_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
        Ok(Self {
            files,
            name: display_name(dir),
            fps,
            next: 0,
        })
    }
}

impl FrameSource for FolderSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        let Some(path) = self.files.get(self.next) else {
            return Ok(None);
        };
        let index = self.next as u64;
        self.next += 1;
        // A bad file is reported (recoverable) and the next call goes on.
        let image = load_rgb(path)?;
        Ok(Some(Frame {
            image: Arc::new(image),
            index,
            t: index as f64 / self.fps,
        }))
    }
    fn frame_count(&self) -> Option<u64> {
        Some(self.files.len() as u64)
    }
    fn fps(&self) -> f64 {
        self.fps
    }
    fn name(&self) -> String {
        self.name.clone()
    }
}

fn is_image_file(p: &Path) -> bool {
    crate::vision::images::has_image_extension(p)
}

fn display_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Compares names with runs of digits taken as numbers.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (&a[..na], &b[..nb]);
                let ta = trim_zeros(da);
                let tb = trim_zeros(db);
                let ord = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb));
                let ord = ord.then_with(|| na.cmp(&nb));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|&&c| c == b'0').count();
    &d[n.min(d.len().saturating_sub(1))..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec!["f10.png", "f2.png", "f1.png", "g.png", "f02.png"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["f1.png", "f2.png", "f02.png", "f10.png", "g.png"]);
    }

    #[test]
    fn folder_plays_in_order_and_reports_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        for i in [3u8, 1, 20] {
            let img = RgbImage::from_pixel(8, 6, image::Rgb([i, 0, 0]));
            img.save(dir.path().join(format!("f{i}.png"))).unwrap();
        }
        std::fs::write(dir.path().join("f5.png"), b"not a png").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
        let mut src = FolderSource::open(dir.path(), 10.0).unwrap();
        assert_eq!(src.frame_count(), Some(4));
        let f = src.next_frame().unwrap().unwrap();
        assert_eq!((f.index, f.image.get_pixel(0, 0)[0]), (0, 1));
        let f = src.next_frame().unwrap().unwrap();
        assert_eq!(f.image.get_pixel(0, 0)[0], 3);
        let e = src.next_frame().unwrap_err();
        assert!(
            e.is_recoverable() && e.to_string().contains("f5.png"),
            "{e}"
        );
        let f = src.next_frame().unwrap().unwrap();
        assert_eq!((f.index, f.image.get_pixel(0, 0)[0]), (3, 20));
        assert!((f.t - 0.3).abs() < 1e-9);
        assert!(src.next_frame().unwrap().is_none());
    }

    #[test]
    fn empty_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = FolderSource::open(dir.path(), 10.0).err().unwrap();
        assert!(matches!(e, SourceError::EmptyFolder(_)));
    }
}
