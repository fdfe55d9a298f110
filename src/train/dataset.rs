//! Training and test sets on disk.
//!
//! Layouts:
//! - `rafdb`: RAF-DB's `list_patition_label.txt` (`train_00001.jpg 5`, labels
//!   1-7 in CLIPER's class order) with aligned images `NAME_aligned.jpg`;
//! - `folder`: `root/{train,test}/<class name>/*.jpg`;
//! - `clips`: `root/{train,test}/<class name>/<clip>/*.jpg` (video frames),
//!   or `<class name>/<clip>.mp4` (any video FFmpeg reads);
//! - `csv`: a manifest `path,label,split` (paths relative to the manifest;
//!   label a class name or 1-7; split `train` or `test`); a path may be an
//!   image or a folder of frames.

use std::path::{Path, PathBuf};

use crate::model::cliper::expressions::{known_classes, known_index, known_name, NUM_CLASSES};

pub use crate::vision::clips::{clip_frames, is_image, segment_indices, IMAGE_EXTENSIONS};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("data folder {0} not found")]
    NotFound(PathBuf),
    #[error("{root}: no RAF-DB label file list_patition_label.txt (looked in {looked})")]
    NoLabelFile { root: PathBuf, looked: String },
    #[error("{file}:{line}: {reason}")]
    BadLine {
        file: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: unknown class `{name}` (classes: {classes})")]
    UnknownClass {
        path: PathBuf,
        name: String,
        classes: String,
    },
    #[error("{0}: class folder holds no images")]
    EmptyClass(PathBuf),
    #[error("{root}: the {split} split has no samples; expected the {layout} layout ({hint})")]
    Empty {
        root: PathBuf,
        split: &'static str,
        layout: &'static str,
        hint: &'static str,
    },
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    Rafdb,
    Folder,
    Clips,
    Csv,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Rafdb => "rafdb",
            Layout::Folder => "folder",
            Layout::Clips => "clips",
            Layout::Csv => "csv",
        }
    }
    fn hint(self) -> &'static str {
        match self {
            Layout::Rafdb => "EmoLabel/list_patition_label.txt and Image/aligned/*_aligned.jpg",
            Layout::Folder => "train/<class>/*.jpg and test/<class>/*.jpg",
            Layout::Clips => "train/<class>/<clip>/*.jpg and test/<class>/<clip>/*.jpg",
            Layout::Csv => "a CSV manifest path,label,split",
        }
    }
}

/// One labelled sample: an image, or a folder of video frames.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: usize,
}

#[derive(Debug)]
pub struct Dataset {
    pub root: PathBuf,
    pub layout: Layout,
    pub train: Vec<Sample>,
    pub test: Vec<Sample>,
    /// Whether samples are clips (folders of frames).
    pub clips: bool,
}

impl Dataset {
    /// Samples per known class of a split (`expressions::known_name`).
    pub fn counts(samples: &[Sample]) -> Vec<usize> {
        let mut c = vec![0; known_classes().len()];
        for s in samples {
            if let Some(n) = c.get_mut(s.label) {
                *n += 1;
            }
        }
        c
    }

    /// The class names present in a split, in known-class order.
    pub fn class_names(samples: &[Sample]) -> Vec<&'static str> {
        Self::counts(samples)
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, _)| known_name(i))
            .collect()
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DatasetError::Io {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

fn class_dirs(split_dir: &Path) -> Result<Vec<(usize, PathBuf)>, DatasetError> {
    let mut out = Vec::new();
    for p in sorted_entries(split_dir)? {
        if !p.is_dir() {
            continue;
        }
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') {
            continue;
        }
        let c = known_index(name).ok_or_else(|| DatasetError::UnknownClass {
            path: p.clone(),
            name: name.to_string(),
            classes: known_classes().join(", "),
        })?;
        out.push((c, p));
    }
    Ok(out)
}

fn load_folder(root: &Path, split: &str, clips: bool) -> Result<Vec<Sample>, DatasetError> {
    let dir = root.join(split);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (c, cdir) in class_dirs(&dir)? {
        let before = out.len();
        for p in sorted_entries(&cdir)? {
            if clips {
                let video = p.is_file() && crate::vision::video::has_video_extension(&p);
                let frames = || {
                    clip_frames(&p).map_err(|e| DatasetError::Io {
                        path: p.clone(),
                        reason: e.to_string(),
                    })
                };
                if video || (p.is_dir() && !frames()?.is_empty()) {
                    out.push(Sample { path: p, label: c });
                }
            } else if p.is_file() && is_image(&p) {
                out.push(Sample { path: p, label: c });
            }
        }
        if out.len() == before {
            return Err(DatasetError::EmptyClass(cdir));
        }
    }
    Ok(out)
}

fn find_rafdb_labels(root: &Path) -> Result<PathBuf, DatasetError> {
    let candidates = [
        root.join("list_patition_label.txt"),
        root.join("EmoLabel/list_patition_label.txt"),
        root.join("basic/EmoLabel/list_patition_label.txt"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| DatasetError::NoLabelFile {
            root: root.to_path_buf(),
            looked: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn find_rafdb_image(root: &Path, label_file: &Path, name: &str) -> Option<PathBuf> {
    let stem = Path::new(name).file_stem()?.to_str()?;
    let aligned = format!("{stem}_aligned.jpg");
    let base = label_file.parent()?.parent().unwrap_or(root);
    let dirs = [
        root.join("Image/aligned"),
        root.join("aligned"),
        root.join("basic/Image/aligned"),
        base.join("Image/aligned"),
        root.to_path_buf(),
    ];
    for d in &dirs {
        for n in [aligned.as_str(), name] {
            let p = d.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

fn load_rafdb(root: &Path) -> Result<(Vec<Sample>, Vec<Sample>), DatasetError> {
    let file = find_rafdb_labels(root)?;
    let text = std::fs::read_to_string(&file).map_err(|e| DatasetError::Io {
        path: file.clone(),
        reason: e.to_string(),
    })?;
    let text = text.trim_start_matches('\u{feff}');
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |reason: String| DatasetError::BadLine {
            file: file.clone(),
            line: i + 1,
            reason,
        };
        let mut parts = line.split_whitespace();
        let (Some(name), Some(label)) = (parts.next(), parts.next()) else {
            return Err(bad(format!(
                "expected `NAME LABEL`, found `{}`",
                shorten(line)
            )));
        };
        let label: usize = label
            .parse()
            .map_err(|_| bad(format!("label `{label}` is not a number 1-7")))?;
        if !(1..=NUM_CLASSES).contains(&label) {
            return Err(bad(format!("label {label} is out of range 1-7")));
        }
        let path = find_rafdb_image(root, &file, name).ok_or_else(|| {
            bad(format!(
                "image for `{name}` not found (expected {}_aligned.jpg under Image/aligned/)",
                name.trim_end_matches(".jpg")
            ))
        })?;
        let sample = Sample {
            path,
            label: label - 1,
        };
        if name.starts_with("train") {
            train.push(sample);
        } else if name.starts_with("test") {
            test.push(sample);
        } else {
            return Err(bad(format!(
                "`{name}` starts with neither train_ nor test_"
            )));
        }
    }
    Ok((train, test))
}

/// A line for an error message: at most 120 characters (a 50 MB line must
/// not become 50 MB of stderr).
pub(crate) fn shorten(line: &str) -> String {
    const MAX: usize = 120;
    match line.char_indices().nth(MAX) {
        None => line.to_string(),
        Some((cut, _)) => format!("{}... ({} bytes in all)", &line[..cut], line.len()),
    }
}

fn parse_label(s: &str) -> Option<usize> {
    if let Ok(n) = s.trim().parse::<usize>() {
        return (1..=NUM_CLASSES).contains(&n).then(|| n - 1);
    }
    known_index(s)
}

fn load_csv(manifest: &Path) -> Result<(Vec<Sample>, Vec<Sample>), DatasetError> {
    let text = std::fs::read_to_string(manifest).map_err(|e| DatasetError::Io {
        path: manifest.to_path_buf(),
        reason: e.to_string(),
    })?;
    let text = text.trim_start_matches('\u{feff}');
    let base = manifest.parent().unwrap_or(Path::new("."));
    let (mut train, mut test) = (Vec::new(), Vec::new());
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    for (k, record) in reader.records().enumerate() {
        let bad = |line: u64, reason: String| DatasetError::BadLine {
            file: manifest.to_path_buf(),
            line: line as usize,
            reason,
        };
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            bad(line, e.to_string())
        })?;
        let line = record.position().map_or(0, |p| p.line());
        let bad = |reason: String| bad(line, reason);
        let cols: Vec<&str> = record.iter().collect();
        if k == 0 && cols.first().is_some_and(|c| c.eq_ignore_ascii_case("path")) {
            continue;
        }
        if cols.iter().all(|c| c.is_empty()) {
            continue;
        }
        if cols.len() != 3 {
            return Err(bad(format!(
                "expected `path,label,split`, found `{}`",
                shorten(&cols.join(","))
            )));
        }
        let label = parse_label(cols[1]).ok_or_else(|| {
            bad(format!(
                "label `{}` is neither 1-7 nor a class name ({})",
                cols[1],
                known_classes().join(", ")
            ))
        })?;
        let path = base.join(cols[0]);
        if !path.exists() {
            return Err(bad(format!("{} not found", path.display())));
        }
        let s = Sample { path, label };
        match cols[2].to_ascii_lowercase().as_str() {
            "train" => train.push(s),
            "test" | "val" | "valid" => test.push(s),
            other => return Err(bad(format!("split `{other}` is neither train nor test"))),
        }
    }
    Ok((train, test))
}

/// Loads a data set for training; both splits must be non-empty.
pub fn load(root: &Path, layout: Layout) -> Result<Dataset, DatasetError> {
    load_splits(root, layout, &["train", "test"])
}

/// Loads a data set for evaluation: only the test split must be non-empty.
pub fn load_test(root: &Path, layout: Layout) -> Result<Dataset, DatasetError> {
    load_splits(root, layout, &["test"])
}

fn load_splits(root: &Path, layout: Layout, needed: &[&str]) -> Result<Dataset, DatasetError> {
    if !root.exists() {
        return Err(DatasetError::NotFound(root.to_path_buf()));
    }
    let (train, test) = match layout {
        Layout::Rafdb => load_rafdb(root)?,
        Layout::Folder => (
            load_folder(root, "train", false)?,
            load_folder(root, "test", false)?,
        ),
        Layout::Clips => (
            load_folder(root, "train", true)?,
            load_folder(root, "test", true)?,
        ),
        Layout::Csv => {
            let manifest = if root.is_dir() {
                root.join("manifest.csv")
            } else {
                root.to_path_buf()
            };
            load_csv(&manifest)?
        }
    };
    for (split, v) in [("train", &train), ("test", &test)] {
        if v.is_empty() && needed.contains(&split) {
            return Err(DatasetError::Empty {
                root: root.to_path_buf(),
                split,
                layout: layout.name(),
                hint: layout.hint(),
            });
        }
    }
    let clips = match layout {
        Layout::Clips => true,
        Layout::Csv => train.iter().chain(&test).any(|s| s.path.is_dir()),
        _ => false,
    };
    Ok(Dataset {
        root: root.to_path_buf(),
        layout,
        train,
        test,
        clips,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(parse_label("1"), Some(0));
        assert_eq!(parse_label("7"), Some(6));
        assert_eq!(parse_label("8"), None);
        assert_eq!(parse_label("happy"), Some(3));
    }

    #[test]
    fn csv_manifest_reads_quoted_paths_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["a.jpg", "b, two.jpg", "c.jpg"] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let manifest = dir.path().join("list.csv");
        std::fs::write(
            &manifest,
            "path,label,split\n# a comment\n\na.jpg, 4 ,train\n\"b, two.jpg\",happy,test\nc.jpg,7,val\n",
        )
        .unwrap();
        let (train, test) = load_csv(&manifest).unwrap();
        assert_eq!(train.len(), 1);
        assert_eq!((train[0].label, test.len()), (3, 2));
        assert_eq!(test[0].path, dir.path().join("b, two.jpg"));
        assert_eq!((test[0].label, test[1].label), (3, 6));
        std::fs::write(&manifest, "a.jpg,4,train\nc.jpg,4\n").unwrap();
        let e = load_csv(&manifest).unwrap_err().to_string();
        assert!(
            e.contains("list.csv:2:") && e.contains("path,label,split"),
            "{e}"
        );
    }
}
