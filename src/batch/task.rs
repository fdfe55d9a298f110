//! One task of a batch: its share of the work list through one pipeline
//! (the model is loaded once), each input recorded as a session under a
//! temporary name and renamed into place when it is whole.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::model::cliper::DescriptorBank;
use crate::model::setup::ModelSpec;
use crate::pipeline::analyzer::AnalyzerConfig;
use crate::pipeline::recorder::{RecordOptions, Recorder};
use crate::pipeline::worker::{
    DynamicSettings, ModelInfo, Pipeline, PipelineCommand, PipelineConfig, PipelineEvent, RunMode,
};
use crate::session::{iso8601, LOCK_FILE};
use crate::vision::source::{SourceSpec, DEFAULT_IMAGE_FPS};

use super::{
    append_status, claim_work_list, host_name, BatchError, InputOutcome, InputResult, Outcome,
    Shard, StatusLine, WorkItem, RESULT_FILE,
};

/// What one task does.
#[derive(Clone, Debug)]
pub struct TaskOptions {
    /// The shared output folder.
    pub out: PathBuf,
    /// The whole work list (every task gets the same one).
    pub items: Vec<WorkItem>,
    pub shard: Shard,
    /// Redo inputs that are already finished.
    pub force: bool,
    /// Also write each input's annotated video.
    pub record_video: bool,
    pub model: ModelSpec,
    pub analyzer: AnalyzerConfig,
    /// Record the dynamic branch's scores too.
    pub dynamic: Option<DynamicSettings>,
    pub probe: Option<String>,
    /// Descriptors kept per face in the JSONL.
    pub top: usize,
    /// The run's settings, for each session's meta.json.
    pub settings: serde_json::Value,
}

/// One input handled, for progress lines.
#[derive(Clone, Debug)]
pub struct ItemReport {
    /// 1-based position among this task's inputs, and their number.
    pub position: usize,
    pub of: usize,
    pub status: StatusLine,
}

/// What a task did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskSummary {
    pub inputs: usize,
    pub complete: usize,
    pub partial: usize,
    pub failed: usize,
    pub skipped: usize,
    pub busy: usize,
    pub frames: u64,
    pub faces: u64,
    pub secs: f64,
}

impl TaskSummary {
    /// Whether every input of the task is finished and whole.
    pub fn all_whole(&self) -> bool {
        self.failed == 0 && self.partial == 0 && self.busy == 0
    }
}

/// Runs this task's share of the work list. Inputs that fail are recorded
/// in the status file and the task goes on; an error is returned only when
/// the task cannot go on at all (the model does not load, OUT is not
/// writable).
pub fn run_task(
    opts: &TaskOptions,
    progress: &mut dyn FnMut(&ItemReport),
) -> Result<TaskSummary, BatchError> {
    let start = Instant::now();
    std::fs::create_dir_all(&opts.out).map_err(|e| BatchError::write(&opts.out, e))?;
    claim_work_list(&opts.out, &opts.items)?;
    let mine: Vec<&WorkItem> = opts
        .items
        .iter()
        .enumerate()
        .filter(|(i, _)| opts.shard.owns(*i))
        .map(|(_, it)| it)
        .collect();
    let mut summary = TaskSummary {
        inputs: mine.len(),
        ..Default::default()
    };
    let mut runner = Runner {
        opts,
        pipeline: None,
        model: None,
        bank: None,
    };
    for (k, item) in mine.iter().enumerate() {
        let status = runner.item(item)?;
        append_status(&opts.out, &opts.shard, &status)?;
        match status.of.outcome {
            Outcome::Complete => summary.complete += 1,
            Outcome::Partial => summary.partial += 1,
            Outcome::Failed => summary.failed += 1,
            Outcome::Skipped => summary.skipped += 1,
            Outcome::Busy => summary.busy += 1,
        }
        if matches!(status.of.outcome, Outcome::Complete | Outcome::Partial) {
            summary.frames += status.of.frames;
            summary.faces += status.of.faces;
        }
        progress(&ItemReport {
            position: k + 1,
            of: mine.len(),
            status,
        });
    }
    if let Some(p) = runner.pipeline.take() {
        p.join();
    }
    summary.secs = start.elapsed().as_secs_f64();
    Ok(summary)
}

struct Runner<'a> {
    opts: &'a TaskOptions,
    /// Started with the first input that needs work, then fed one source
    /// after another.
    pipeline: Option<Pipeline>,
    model: Option<ModelInfo>,
    bank: Option<Arc<DescriptorBank>>,
}

/// What the pipeline made of one source.
#[derive(Default)]
struct Scored {
    frames: u64,
    faces: u64,
    tracks: HashSet<u64>,
    last_t: f64,
    warnings: Vec<String>,
    /// The source failed (at open when `frames` is 0).
    failed: Option<String>,
    recording_error: Option<String>,
}

impl Runner<'_> {
    fn item(&mut self, item: &WorkItem) -> Result<StatusLine, BatchError> {
        let out = &self.opts.out;
        let done = out.join(&item.id);
        let tmp = out.join(format!("{}.tmp", item.id));
        let line = |outcome, error: Option<String>| StatusLine {
            time: iso8601(std::time::SystemTime::now()),
            task: self.opts.shard.to_string(),
            of: InputOutcome {
                input: item.key.clone(),
                path: item.path.display().to_string(),
                id: item.id.clone(),
                outcome,
                frames: 0,
                faces: 0,
            },
            seconds: 0.0,
            error,
            warnings: Vec::new(),
        };
        if done.exists() && !self.opts.force {
            let mut l = line(Outcome::Skipped, None);
            if let Ok(r) = read_result(&done) {
                (l.of.frames, l.of.faces) = (r.of.frames, r.of.faces);
            }
            return Ok(l);
        }
        if tmp.exists() {
            if lock_held(&tmp) {
                return Ok(line(
                    Outcome::Busy,
                    Some(format!(
                        "{} is being written by another process (a second run of the same task?); it is left alone",
                        tmp.display()
                    )),
                ));
            }
            // Left by a task that was killed: start it again.
            std::fs::remove_dir_all(&tmp).map_err(|e| BatchError::write(&tmp, e))?;
        }
        let start = Instant::now();
        let spec = match SourceSpec::from_path(&item.path, DEFAULT_IMAGE_FPS) {
            Ok(SourceSpec::Folder { .. }) => {
                return Ok(line(
                    Outcome::Failed,
                    Some(format!(
                        "{} is a folder: list videos and images",
                        item.path.display()
                    )),
                ))
            }
            Ok(s) => s,
            Err(e) => return Ok(line(Outcome::Failed, Some(e.to_string()))),
        };
        let scored = self.score(spec, &tmp)?;
        let seconds = start.elapsed().as_secs_f64();
        let mut status = line(Outcome::Complete, None);
        status.of.frames = scored.frames;
        status.of.faces = scored.faces;
        status.seconds = seconds;
        status.warnings = scored.warnings.clone();
        let failure = match (&scored.failed, &scored.recording_error) {
            (_, Some(e)) => Some(e.clone()),
            (Some(e), None) if scored.frames == 0 => Some(e.clone()),
            _ => None,
        };
        if let Some(e) = failure {
            status.of.outcome = Outcome::Failed;
            status.error = Some(e);
            // Nothing in it is worth keeping: a rerun starts it again.
            if tmp.exists() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            return Ok(status);
        }
        if let Some(e) = &scored.failed {
            // It failed after some frames: what was read is kept, as partial.
            status.warnings.push(e.clone());
        }
        if !status.warnings.is_empty() {
            status.of.outcome = Outcome::Partial;
        }
        let result = InputResult {
            of: InputOutcome {
                input: item.key.clone(),
                path: item.path.display().to_string(),
                id: item.id.clone(),
                outcome: status.of.outcome,
                frames: scored.frames,
                faces: scored.faces,
            },
            tracks: scored.tracks.len() as u64,
            duration_s: scored.last_t,
            seconds,
            warnings: status.warnings.clone(),
            task: self.opts.shard.to_string(),
            host: host_name(),
            finished: iso8601(std::time::SystemTime::now()),
        };
        if let Err(e) = publish(&tmp, &done, &result) {
            status.of.outcome = Outcome::Failed;
            status.error = Some(e.to_string());
        }
        Ok(status)
    }

    /// Runs one source through the pipeline, recording it into `tmp`.
    fn score(&mut self, spec: SourceSpec, tmp: &Path) -> Result<Scored, BatchError> {
        match &self.pipeline {
            Some(p) => p.command(PipelineCommand::SetSource(spec)),
            None => self.pipeline = Some(self.start(spec)),
        }
        let mut s = Scored::default();
        let mut recorder: Option<Recorder> = None;
        let mut expected: Option<u64> = None;
        let stopped = || BatchError::PipelineStopped;
        while expected != Some(s.frames) {
            let Some(p) = &self.pipeline else {
                return Err(stopped());
            };
            let Ok(event) = p.events.recv() else {
                return Err(stopped());
            };
            if let Some(r) = recorder.as_mut() {
                r.observe(&event);
                if let (None, Some(e)) = (&s.recording_error, r.error()) {
                    s.recording_error = Some(e);
                }
            }
            match event {
                PipelineEvent::ModelReady(info) => self.model = Some(info),
                PipelineEvent::BankReady(bank) => self.bank = Some(bank),
                PipelineEvent::ModelFailed(e) | PipelineEvent::BankFailed(e) => {
                    return Err(BatchError::Model(Box::new(e)))
                }
                PipelineEvent::ProbeFailed { text, error } => {
                    return Err(BatchError::Probe {
                        text,
                        error: Box::new(error),
                    })
                }
                PipelineEvent::SourceOpened(info) => {
                    let mut r = RecordOptions::new(tmp);
                    r.video = self.opts.record_video;
                    r.top = self.opts.top;
                    r.settings = self.opts.settings.clone();
                    match Recorder::start(r, RunMode::Batch) {
                        Ok(mut rec) => {
                            rec.prime(Some(&info), self.model.as_ref(), self.bank.as_ref());
                            recorder = Some(rec);
                        }
                        Err(e) => s.recording_error = Some(e.to_string()),
                    }
                }
                PipelineEvent::SourceWarning(w) => s.warnings.push(w.to_string()),
                PipelineEvent::SourceFailed { error, frames, .. } => {
                    s.failed = Some(error.to_string());
                    expected = Some(frames);
                }
                PipelineEvent::SourceEnded { frames, .. } => expected = Some(frames),
                PipelineEvent::Scores(sc) => {
                    s.frames += 1;
                    s.faces += sc.faces.len() as u64;
                    s.tracks.extend(sc.faces.iter().map(|f| f.id));
                    s.last_t = sc.t;
                }
                PipelineEvent::Finished => return Err(stopped()),
                _ => {}
            }
        }
        if let Some(rec) = recorder {
            let outcome = rec.finish_outcome();
            if let (None, Some(e)) = (&s.recording_error, outcome.error) {
                s.recording_error = Some(e);
            }
        }
        Ok(s)
    }

    fn start(&self, first: SourceSpec) -> Pipeline {
        let o = self.opts;
        let mut config = PipelineConfig::new(first, o.model.clone(), RunMode::Batch);
        config.analyzer = o.analyzer.clone();
        config.probe = o.probe.clone();
        if let Some(d) = o.dynamic {
            config.dynamic = d;
        }
        config.emit_frames = o.record_video;
        config.keep_open = true;
        Pipeline::start(config, || {})
    }
}

/// Writes batch.json into the finished session and renames it into place
/// (replacing an older result with `--force`).
fn publish(tmp: &Path, done: &Path, result: &InputResult) -> Result<(), BatchError> {
    let file = tmp.join(RESULT_FILE);
    let text = serde_json::to_string_pretty(result).map_err(|e| BatchError::write(&file, e))?;
    std::fs::write(&file, text).map_err(|e| BatchError::write(&file, e))?;
    if done.exists() {
        let old = done.with_extension("old");
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| BatchError::write(&old, e))?;
        }
        std::fs::rename(done, &old).map_err(|e| BatchError::write(done, e))?;
        std::fs::rename(tmp, done).map_err(|e| BatchError::write(done, e))?;
        let _ = std::fs::remove_dir_all(&old);
        return Ok(());
    }
    std::fs::rename(tmp, done).map_err(|e| BatchError::write(done, e))
}

/// A finished input's batch.json.
pub fn read_result(dir: &Path) -> Result<InputResult, BatchError> {
    let path = dir.join(RESULT_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| BatchError::read(&path, e))?;
    serde_json::from_str(&text).map_err(|e| BatchError::read(&path, e))
}

/// Whether a live process holds the session lock in `dir`.
fn lock_held(dir: &Path) -> bool {
    let Ok(f) = std::fs::File::open(dir.join(LOCK_FILE)) else {
        return false;
    };
    matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::setup::BankSource;

    fn options(out: &Path, items: Vec<WorkItem>, shard: Shard) -> TaskOptions {
        TaskOptions {
            out: out.to_path_buf(),
            items,
            shard,
            force: false,
            record_video: false,
            // Never loaded: a task with nothing to do starts no pipeline.
            model: ModelSpec {
                weights: Some(out.join("no-such-weights.safetensors")),
                bank: BankSource::BuiltinZeroShot,
                device: "cpu".into(),
                head: None,
                precision: Default::default(),
            },
            analyzer: AnalyzerConfig::default(),
            dynamic: None,
            probe: None,
            top: 5,
            settings: serde_json::Value::Null,
        }
    }

    #[test]
    fn finished_inputs_are_skipped_without_loading_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let items: Vec<WorkItem> = (0..5)
            .map(|i| WorkItem::new(format!("v{i}.mp4"), dir.path().join(format!("v{i}.mp4"))))
            .collect();
        std::fs::create_dir_all(&out).unwrap();
        // Task 1 of 2 owns inputs 1 and 3; both are finished.
        for i in [1, 3] {
            let d = out.join(&items[i].id);
            std::fs::create_dir_all(&d).unwrap();
            let r = InputResult {
                of: InputOutcome {
                    input: items[i].key.clone(),
                    path: items[i].path.display().to_string(),
                    id: items[i].id.clone(),
                    outcome: Outcome::Complete,
                    frames: 10 + i as u64,
                    faces: 20,
                },
                tracks: 2,
                duration_s: 1.0,
                seconds: 0.5,
                warnings: vec![],
                task: "1/2".into(),
                host: "h".into(),
                finished: "2026-01-01T00:00:00.000Z".into(),
            };
            std::fs::write(d.join(RESULT_FILE), serde_json::to_string(&r).unwrap()).unwrap();
        }
        // A stale temporary folder of an owned input is not a result.
        std::fs::create_dir_all(out.join(format!("{}.tmp", items[3].id))).unwrap();
        let shard = Shard { index: 1, count: 2 };
        let mut seen = Vec::new();
        let s = run_task(&options(&out, items.clone(), shard), &mut |r| {
            seen.push((
                r.position,
                r.of,
                r.status.of.input.clone(),
                r.status.of.outcome,
                r.status.of.frames,
            ))
        })
        .unwrap();
        assert_eq!((s.inputs, s.skipped, s.complete, s.failed), (2, 2, 0, 0));
        assert!(s.all_whole());
        assert_eq!(
            seen,
            [
                (1, 2, "v1.mp4".to_string(), Outcome::Skipped, 11),
                (2, 2, "v3.mp4".to_string(), Outcome::Skipped, 13)
            ]
        );
        let lines = crate::batch::read_status(&out).unwrap();
        assert_eq!(lines.len(), 2);
        assert!(lines
            .iter()
            .all(|l| l.task == "1/2" && l.of.outcome == Outcome::Skipped));
        // Task 0 owns missing files: each is a failure, and the task goes on.
        let s = run_task(
            &options(&out, items, Shard { index: 0, count: 2 }),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!((s.inputs, s.failed), (3, 3));
        assert!(!s.all_whole());
    }
}
