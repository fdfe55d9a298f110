//! `cliper run`: the live pipeline without a window. Every frame of a file is
//! processed in order (no dropping) and reported as one line, JSON or text;
//! a progress bar goes to stderr when the length is known.

use std::io::Write;
use std::time::Instant;

use indicatif::ProgressBar;

use crate::model::setup::ModelSpec;
use crate::pipeline::analyzer::AnalyzerConfig;
use crate::pipeline::output;
use crate::pipeline::recorder::{RecordOptions, RecordOutcome, Recorder};
use crate::pipeline::worker::{
    DynamicSettings, FrameScores, ModelError, Pipeline, PipelineConfig, PipelineEvent, RunMode,
    SourceFailure,
};
use crate::vision::source::SourceSpec;

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub source: SourceSpec,
    pub model: ModelSpec,
    pub analyzer: AnalyzerConfig,
    /// Stop after this many frames. A still image gives one frame unless
    /// told otherwise; cameras and the demo run until interrupted.
    pub frames: Option<u64>,
    /// One JSON object per line instead of text.
    pub json: bool,
    /// Include the top K descriptors per face.
    pub top: Option<usize>,
    /// A free-text description scored next to the classes.
    pub probe: Option<String>,
    /// Report the dynamic branch's scores, with these window settings.
    pub dynamic: Option<DynamicSettings>,
    /// Show a progress bar on stderr (when the length is known).
    pub progress: bool,
    /// Record the run as a session (`--record DIR`).
    pub record: Option<RecordOptions>,
    /// A stop request (a signal number, see [`crate::stop`]): the run ends
    /// as if the source had ended, and a recording is finalised.
    pub stop: Option<crossbeam_channel::Receiver<i32>>,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunSummary {
    pub frames: u64,
    pub faces: u64,
    /// Warnings of the source (an unreadable image skipped, a damaged
    /// packet, a video that ends early), printed as they came.
    pub warnings: u64,
    pub secs: f64,
    /// The signal that stopped the run before its source ended.
    pub stopped_by: Option<i32>,
    /// Mean time per frame in decoding (videos) and face detection, and in
    /// cropping, encoding and scoring the frames that had faces, milliseconds.
    pub decode_ms: f64,
    pub detect_ms: f64,
    pub crop_ms: f64,
    pub encode_ms: f64,
    pub score_ms: f64,
    /// What the recording left, when one was asked for.
    pub record: Option<RecordOutcome>,
    /// The device and the image encoder's path (`CPU q8 avx512-vnni`).
    pub kernel: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] SourceFailure),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("--probe \"{text}\": {error}")]
    Probe {
        text: String,
        #[source]
        error: ModelError,
    },
    #[error("cannot write the results: {0}")]
    Output(std::io::Error),
}

/// Runs the pipeline over `opts.source`, writing one line per frame to `out`.
pub fn run(opts: &RunOptions, out: &mut dyn Write) -> Result<RunSummary, RunError> {
    let frames = match (&opts.source, opts.frames) {
        (SourceSpec::Still { .. }, None) => Some(1),
        (_, f) => f,
    };
    if frames == Some(0) {
        return Ok(RunSummary::default());
    }
    let mut config = PipelineConfig::new(opts.source.clone(), opts.model.clone(), RunMode::Batch);
    config.analyzer = opts.analyzer.clone();
    config.max_frames = frames;
    config.probe = opts.probe.clone();
    if let Some(d) = opts.dynamic {
        config.dynamic = d;
    }
    // A recording that cannot start or stops on an error is reported and
    // the run goes on: the results still reach `out`.
    let mut record_outcome = None;
    let mut recorder = match &opts.record {
        Some(r) => match Recorder::start(r.clone(), RunMode::Batch) {
            Ok(rec) => Some(rec),
            Err(e) => {
                log::error!("{e}; the run goes on without recording");
                record_outcome = Some(RecordOutcome::failed(&r.dir, e.to_string()));
                None
            }
        },
        None => None,
    };
    config.emit_frames = recorder.is_some();
    let pipeline = Pipeline::start(config, || {});
    let start = Instant::now();
    let mut summary = RunSummary::default();
    let mut bar: Option<ProgressBar> = None;
    let mut result = Ok(());
    let mut scored = 0u64;
    let never = crossbeam_channel::never();
    let stop = opts.stop.as_ref().unwrap_or(&never);
    loop {
        let event = crossbeam_channel::select! {
            recv(pipeline.events) -> e => match e {
                Ok(e) => e,
                Err(_) => break,
            },
            recv(stop) -> sig => {
                summary.stopped_by = Some(sig.unwrap_or(0));
                break;
            }
        };
        if let Some(rec) = recorder.as_mut() {
            rec.observe(&event);
            if let Some(e) = rec.error() {
                let say = || log::error!("recording stopped: {e}; the run goes on");
                match &bar {
                    Some(pb) => pb.suspend(say),
                    None => say(),
                }
                record_outcome = recorder.take().map(Recorder::finish_outcome);
            }
        }
        match event {
            PipelineEvent::SourceOpened(info) => {
                let total = match (info.len, frames) {
                    (Some(l), Some(f)) => Some(l.min(f)),
                    (l, f) => l.or(f),
                };
                if let (true, Some(total)) = (opts.progress, total) {
                    let pb = crate::progress::bar(
                        total,
                        "{msg} [{bar:30}] {pos}/{len} frames, {per_sec}, eta {eta}",
                        info.name.clone(),
                    );
                    bar = Some(pb);
                }
            }
            PipelineEvent::SourceFailed { error, .. } => {
                result = Err(RunError::Source(error));
                break;
            }
            PipelineEvent::SourceWarning(w) => {
                summary.warnings += 1;
                match &bar {
                    Some(pb) => pb.suspend(|| log::warn!("{w}")),
                    None => log::warn!("{w}"),
                }
            }
            PipelineEvent::ModelFailed(e) | PipelineEvent::BankFailed(e) => {
                result = Err(RunError::Model(e));
                break;
            }
            PipelineEvent::ProbeFailed { text, error } => {
                result = Err(RunError::Probe { text, error });
                break;
            }
            PipelineEvent::Scores(s) => {
                summary.frames += 1;
                summary.faces += s.faces.len() as u64;
                summary.detect_ms += f64::from(s.timings.detect_ms);
                summary.decode_ms += f64::from(s.timings.decode_ms);
                if !s.faces.is_empty() {
                    scored += 1;
                    summary.crop_ms += f64::from(s.timings.crop_ms);
                    summary.encode_ms += f64::from(s.timings.encode_ms);
                    summary.score_ms += f64::from(s.timings.score_ms);
                }
                let line = if opts.json {
                    json_line(&s, opts.top, opts.dynamic.is_some())
                } else {
                    text_line(&s)
                };
                let written = match &bar {
                    Some(pb) => pb.suspend(|| writeln!(out, "{line}").and_then(|_| out.flush())),
                    None => writeln!(out, "{line}").and_then(|_| out.flush()),
                };
                if let Err(e) = written {
                    // A closed pipe (`| head`) ends the run quietly.
                    if e.kind() != std::io::ErrorKind::BrokenPipe {
                        result = Err(RunError::Output(e));
                    }
                    break;
                }
                if let Some(pb) = &bar {
                    pb.inc(1);
                }
            }
            PipelineEvent::ModelReady(info) => {
                summary.kernel = format!("{} {}", info.device, info.kernel);
            }
            PipelineEvent::Finished => break,
            _ => {}
        }
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    drop(pipeline);
    if let Some(rec) = recorder.take() {
        record_outcome = Some(rec.finish_outcome());
    }
    summary.record = record_outcome;
    summary.secs = start.elapsed().as_secs_f64();
    summary.detect_ms /= summary.frames.max(1) as f64;
    summary.decode_ms /= summary.frames.max(1) as f64;
    summary.crop_ms /= scored.max(1) as f64;
    summary.encode_ms /= scored.max(1) as f64;
    summary.score_ms /= scored.max(1) as f64;
    result.map(|_| summary)
}

fn json_line(s: &FrameScores, top: Option<usize>, dynamic: bool) -> String {
    let faces = s
        .faces
        .iter()
        .map(|f| {
            let mut v = output::FaceJson::new(&f.face.bbox, &f.face.scores);
            v.id = Some(f.id);
            if let Some(k) = top {
                v = v.with_descriptors(&f.face.scores, &s.bank, Some(k));
            }
            v.probe = match (&s.probe, f.probe_logit) {
                (Some(text), Some(logit)) => Some(output::ProbeJson { text, logit }),
                _ => None,
            };
            v.dynamic = f.dynamic.as_ref().filter(|_| dynamic).map(Into::into);
            v
        })
        .collect();
    // Serialising plain structs of numbers and strings cannot fail.
    serde_json::to_string(&output::FrameJson::new(s.index, s.t, faces)).unwrap_or_default()
}

fn text_line(s: &FrameScores) -> String {
    let mut line = format!("frame {:>5}  {:>8.3}s ", s.index, s.t);
    if s.faces.is_empty() {
        line.push_str(" no face");
    }
    for f in &s.faces {
        let sc = &f.face.scores;
        let b = &f.face.bbox;
        line.push_str(&format!(
            "  face {} {} {:.0}% at {},{} {}x{}",
            f.id,
            sc.predicted_name(),
            sc.probs[sc.predicted] * 100.0,
            b.x,
            b.y,
            b.w,
            b.h
        ));
        if let (Some(p), Some(text)) = (f.probe_logit, &s.probe) {
            line.push_str(&format!(" [\"{text}\" {p:.2}]"));
        }
    }
    line
}
