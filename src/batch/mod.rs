//! `cliper batch`: annotating an archive of videos and images as an array
//! of identical tasks (a Slurm array job, a Kubernetes Indexed Job, or one
//! process), and merging what they wrote into Parquet tables.
//!
//! Every task computes the same work list (the manifest's lines, or the
//! input folder searched recursively in byte order of the relative paths)
//! and takes the inputs whose index is its own modulo the task count. The
//! output folder is shared by all tasks:
//!
//! ```text
//! OUT/_worklist.jsonl          the work list (key, path, id), written by the first task;
//!                              later tasks check that theirs is the same
//! OUT/<id>/                    one finished input: a session folder (meta.json,
//!                              session.jsonl, session.csv, video.mp4 with
//!                              --record-video) plus batch.json
//! OUT/<id>.tmp/                an input being processed (renamed to OUT/<id> when done)
//! OUT/_status/task-I-of-N.jsonl one line per input a task handled: outcome,
//!                              frames, seconds, error (appended by reruns)
//! OUT/faces.parquet            written by `cliper batch merge`: one row per frame x face
//! OUT/inputs.parquet           one row per input: outcome, counts, expression shares
//! ```
//!
//! `<id>` is the first 16 hex digits of the SHA-256 of the input's key (its
//! path relative to `--input`, or its manifest line as written), so the same
//! archive gets the same ids on every node and in every rerun. An input is
//! finished when `OUT/<id>` exists: the rename that creates it is the last
//! step, so a task killed at any moment leaves either nothing or a `.tmp`
//! folder, which the next run removes and redoes.

pub mod merge;
pub mod task;

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::vision::source::IMAGE_EXTENSIONS;
use crate::vision::video::has_video_extension;

/// The work list of the output folder.
pub const WORKLIST_FILE: &str = "_worklist.jsonl";
/// The folder of the tasks' status files.
pub const STATUS_DIR: &str = "_status";
/// Written into each finished input's folder.
pub const RESULT_FILE: &str = "batch.json";
/// The merged tables.
pub const FACES_TABLE: &str = "faces.parquet";
pub const INPUTS_TABLE: &str = "inputs.parquet";

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("cannot read the input folder {path}: {reason}")]
    Input { path: PathBuf, reason: String },
    #[error("cannot read the manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("{path} line {line}: {reason}")]
    ManifestLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{0} holds no videos or images to process")]
    Empty(PathBuf),
    #[error("{0}")]
    Shard(String),
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{out} holds the results of another work list ({theirs} inputs, {ours} here, first difference: {what}); give a new --out folder, or the same --input/--manifest as before")]
    OtherWorkList {
        out: PathBuf,
        theirs: usize,
        ours: usize,
        what: String,
    },
    #[error("{0} is not the output of `cliper batch`: it has no {WORKLIST_FILE} (give the --out folder of a batch run)")]
    NotABatch(PathBuf),
    #[error(transparent)]
    Model(Box<crate::pipeline::worker::ModelError>),
    #[error("the pipeline stopped unexpectedly")]
    PipelineStopped,
    #[error("--probe \"{text}\": {error}")]
    Probe {
        text: String,
        #[source]
        error: Box<crate::pipeline::worker::ModelError>,
    },
}

impl BatchError {
    pub(crate) fn write(path: &Path, e: impl std::fmt::Display) -> Self {
        BatchError::Write {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }

    pub(crate) fn read(path: &Path, e: impl std::fmt::Display) -> Self {
        BatchError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}

/// One input of the work list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    /// What names the input in every table: the path relative to `--input`
    /// (with `/`), or the manifest line as written.
    pub key: String,
    /// Where to read it.
    pub path: PathBuf,
    /// [`input_id`] of the key: the input's folder name under OUT.
    pub id: String,
}

impl WorkItem {
    pub fn new(key: String, path: PathBuf) -> Self {
        let id = input_id(&key);
        Self { key, path, id }
    }
}

/// The stable id of an input key: 16 hex digits of its SHA-256.
pub fn input_id(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `path` names a file `cliper batch` processes (by extension).
pub fn is_media_file(path: &Path) -> bool {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    IMAGE_EXTENSIONS.contains(&ext.as_str()) || has_video_extension(path)
}

/// The videos and images under `root`, searched recursively, in byte order
/// of their relative paths. Hidden entries (a leading `.`) and folders
/// reached through symbolic links are skipped (no loops); links to files
/// are followed. `skip` (the output folder, when it lies inside) is left out.
pub fn folder_work_list(root: &Path, skip: Option<&Path>) -> Result<Vec<WorkItem>, BatchError> {
    let err = |e: std::io::Error| BatchError::Input {
        path: root.to_path_buf(),
        reason: e.to_string(),
    };
    if !root.is_dir() {
        return Err(BatchError::Input {
            path: root.to_path_buf(),
            reason: "it is not a folder".into(),
        });
    }
    let skip = skip.and_then(|s| s.canonicalize().ok());
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    let mut stack: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        if skip.is_some() && dir.canonicalize().ok() == skip {
            continue;
        }
        let entries = std::fs::read_dir(&dir).map_err(|e| BatchError::Input {
            path: dir.clone(),
            reason: e.to_string(),
        })?;
        for entry in entries {
            let entry = entry.map_err(err)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(BatchError::Input {
                    path: entry.path(),
                    reason:
                        "the name is not valid UTF-8; rename it or list the files in a --manifest"
                            .into(),
                });
            };
            if name.starts_with('.') {
                continue;
            }
            let key = if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}/{name}")
            };
            let kind = entry.file_type().map_err(err)?;
            let path = entry.path();
            if kind.is_dir() {
                stack.push((path, key));
            } else if (kind.is_file() || (kind.is_symlink() && path.is_file()))
                && is_media_file(&path)
            {
                found.push((key, path));
            }
        }
    }
    if found.is_empty() {
        return Err(BatchError::Empty(root.to_path_buf()));
    }
    found.sort();
    Ok(found
        .into_iter()
        .map(|(k, p)| WorkItem::new(k, p))
        .collect())
}

/// The inputs a manifest lists: one path per line, relative ones taken
/// from the manifest's folder; blank lines and lines starting with `#`
/// are skipped. A path listed twice is an error.
pub fn manifest_work_list(manifest: &Path) -> Result<Vec<WorkItem>, BatchError> {
    let text = std::fs::read_to_string(manifest).map_err(|e| BatchError::Manifest {
        path: manifest.to_path_buf(),
        reason: e.to_string(),
    })?;
    let base = manifest.parent().unwrap_or(Path::new("."));
    let mut items = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (n, line) in text.trim_start_matches('\u{feff}').lines().enumerate() {
        let key = line.trim();
        if key.is_empty() || key.starts_with('#') {
            continue;
        }
        if let Some(first) = seen.insert(key.to_string(), n + 1) {
            return Err(BatchError::ManifestLine {
                path: manifest.to_path_buf(),
                line: n + 1,
                reason: format!("{key} is listed again (first on line {first})"),
            });
        }
        let p = Path::new(key);
        let path = if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        };
        items.push(WorkItem::new(key.to_string(), path));
    }
    if items.is_empty() {
        return Err(BatchError::Empty(manifest.to_path_buf()));
    }
    Ok(items)
}

/// Task `index` of `count`: it takes the inputs whose position in the work
/// list is `index` modulo `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole list in one task.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Parses `I/N` (`--shard 3/8`).
    pub fn parse(text: &str) -> Result<Self, BatchError> {
        let bad = || {
            BatchError::Shard(format!(
                "--shard {text}: give TASK/TASKS, e.g. 0/8 for the first of 8 tasks"
            ))
        };
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let index = i.trim().parse().map_err(|_| bad())?;
        let count = n.trim().parse().map_err(|_| bad())?;
        Self::new(index, count, "--shard")
    }

    fn new(index: usize, count: usize, from: &str) -> Result<Self, BatchError> {
        if count == 0 || index >= count {
            return Err(BatchError::Shard(format!(
                "{from}: task {index} of {count} is out of range (tasks are numbered 0 to count - 1)"
            )));
        }
        Ok(Self { index, count })
    }

    /// The shard of this task: `--shard` when given, else Slurm's array
    /// variables (`SLURM_ARRAY_TASK_ID` counted from `SLURM_ARRAY_TASK_MIN`,
    /// out of `SLURM_ARRAY_TASK_COUNT`), else Kubernetes'
    /// `JOB_COMPLETION_INDEX` with `shards` (`--shards N`), else the whole list.
    pub fn resolve(
        explicit: Option<Shard>,
        shards: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, BatchError> {
        if let Some(s) = explicit {
            return Ok(s);
        }
        let num = |name: &str| -> Result<Option<usize>, BatchError> {
            match env(name).filter(|v| !v.trim().is_empty()) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| BatchError::Shard(format!("{name}={v} is not a task number"))),
            }
        };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let count = match (shards, num("SLURM_ARRAY_TASK_COUNT")?) {
                (Some(n), _) | (None, Some(n)) => n,
                (None, None) => {
                    return Err(BatchError::Shard(
                        "SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; give --shard I/N".into(),
                    ))
                }
            };
            let index = id.checked_sub(min).ok_or_else(|| {
                BatchError::Shard(format!(
                    "SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={min}"
                ))
            })?;
            return Self::new(
                index,
                count,
                "the Slurm array (use a contiguous --array=0-N or give --shard I/N)",
            );
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let Some(count) = shards else {
                return Err(BatchError::Shard(
                    "JOB_COMPLETION_INDEX is set: give the job's completions as --shards N".into(),
                ));
            };
            return Self::new(index, count, "JOB_COMPLETION_INDEX with --shards");
        }
        match shards {
            Some(n) if n != 1 => Err(BatchError::Shard(format!(
                "--shards {n} needs the task's number: --shard I/{n}, or SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX"
            ))),
            _ => Ok(Self::ALL),
        }
    }

    pub fn owns(&self, position: usize) -> bool {
        position % self.count == self.index
    }

    /// The name of this task's status file.
    pub fn status_file(&self) -> String {
        format!("task-{}-of-{}.jsonl", self.index, self.count)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// How an input ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Every frame was read and scored.
    Complete,
    /// Scored, but the file was not read whole (damaged packets skipped, a
    /// cut-off end): the result holds what could be read.
    Partial,
    /// Nothing usable: unreadable, missing, or the recording failed.
    Failed,
    /// Finished by an earlier run (left as it was).
    Skipped,
    /// Another process is working on it right now.
    Busy,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Partial => "partial",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
            Outcome::Busy => "busy",
        }
    }
}

/// Which input, and what became of it: the fields `batch.json` and the
/// status lines share.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputOutcome {
    /// The input as the work list names it, its path and its folder's id.
    pub input: String,
    pub path: String,
    pub id: String,
    /// In `batch.json`, `complete` or `partial`.
    pub outcome: Outcome,
    pub frames: u64,
    /// Face rows (faces over all frames).
    pub faces: u64,
}

/// `OUT/<id>/batch.json`: what became of one finished input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputResult {
    #[serde(flatten)]
    pub of: InputOutcome,
    /// Distinct face tracks.
    pub tracks: u64,
    /// Source time of the last frame, seconds.
    pub duration_s: f64,
    /// Processing time, seconds.
    pub seconds: f64,
    /// Why the result is partial.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The task that made it (`I/N`) and on which host.
    pub task: String,
    pub host: String,
    /// When it finished, ISO 8601 UTC.
    pub finished: String,
}

/// One line of a task's status file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusLine {
    pub time: String,
    pub task: String,
    #[serde(flatten)]
    pub of: InputOutcome,
    pub seconds: f64,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Writes the work list into OUT, or checks that the one there is the same
/// (by keys, in order): tasks of one array must agree on their inputs.
pub fn claim_work_list(out: &Path, items: &[WorkItem]) -> Result<(), BatchError> {
    let path = out.join(WORKLIST_FILE);
    if path.is_file() {
        let theirs = read_work_list(out)?;
        let differs =
            theirs.len() != items.len() || theirs.iter().zip(items).any(|(a, b)| a.key != b.key);
        if differs {
            let what = theirs
                .iter()
                .zip(items)
                .find(|(a, b)| a.key != b.key)
                .map(|(a, b)| format!("`{}` there, `{}` here", a.key, b.key))
                .unwrap_or_else(|| "the lengths".into());
            return Err(BatchError::OtherWorkList {
                out: out.to_path_buf(),
                theirs: theirs.len(),
                ours: items.len(),
                what,
            });
        }
        return Ok(());
    }
    let mut text = String::new();
    for it in items {
        text.push_str(&serde_json::to_string(it).map_err(|e| BatchError::write(&path, e))?);
        text.push('\n');
    }
    // Written whole under a name of this process, then renamed: a task
    // that reads it sees all of it or none.
    let tmp = out.join(format!("{WORKLIST_FILE}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text).map_err(|e| BatchError::write(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| BatchError::write(&path, e))
}

/// The work list an output folder was made for.
pub fn read_work_list(out: &Path) -> Result<Vec<WorkItem>, BatchError> {
    let path = out.join(WORKLIST_FILE);
    if !path.is_file() {
        return Err(BatchError::NotABatch(out.to_path_buf()));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| BatchError::read(&path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str(l)
                .map_err(|e| BatchError::read(&path, format!("line {}: {e}", n + 1)))
        })
        .collect()
}

/// Appends one line to a task's status file (and flushes it).
pub fn append_status(out: &Path, shard: &Shard, line: &StatusLine) -> Result<(), BatchError> {
    let dir = out.join(STATUS_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| BatchError::write(&dir, e))?;
    let path = dir.join(shard.status_file());
    let mut text = serde_json::to_string(line).map_err(|e| BatchError::write(&path, e))?;
    text.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| BatchError::write(&path, e))?;
    // One write per line: lines of a rerun never interleave with a cut one.
    f.write_all(text.as_bytes())
        .and_then(|_| f.flush())
        .map_err(|e| BatchError::write(&path, e))
}

/// Every status line under OUT/_status, file by file in name order; a cut
/// last line (a task killed mid-write) is skipped.
pub fn read_status(out: &Path) -> Result<Vec<StatusLine>, BatchError> {
    let dir = out.join(STATUS_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    let mut lines = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| BatchError::read(&f, e))?;
        lines.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
    }
    Ok(lines)
}

/// The machine's name, for the status lines.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests;
