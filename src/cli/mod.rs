//! The command line: one file per command, each an `Args` struct (clap)
//! with `fn run(self)`, and the argument groups they share (model, bank,
//! faces, source, dynamic branch, recording). The work is in the library.

use anyhow::{Context, Result};
use clap::Subcommand;
use cliper::model::device::{DeviceChoice, Precision};
use cliper::model::setup::{self, BankSource, ModelSpec};
use cliper::model::{self, ClipModel};
use cliper::pipeline::analyzer::{AnalyzerConfig, FaceAnalyzer};
use cliper::pipeline::output;
use cliper::vision::faces::DetectorKind;
use std::path::{Path, PathBuf};

pub(crate) use session::recover_sessions;

pub(crate) mod batch;
pub(crate) mod bench;
pub(crate) mod classify;
pub(crate) mod explain;
pub(crate) mod faces;
pub(crate) mod live;
pub(crate) mod run;
pub(crate) mod session;
pub(crate) mod train;
pub(crate) mod weights;

/// Every command takes negative numbers as values (`--x -0.5`): see
/// [`parse`](crate::parse), which sets it on each.
#[derive(Subcommand)]
pub(crate) enum Command {
    /// Print the L2-normalised CLIP embedding of an image or a text as JSON.
    Embed(classify::EmbedArgs),
    /// Classify the facial expressions of every face in images.
    Classify(classify::ClassifyArgs),
    /// Time each stage (preprocessing, image encoder, scoring, face
    /// detection, temporal pass) and report peak memory and faces per second.
    Bench(bench::BenchArgs),
    /// Classify the expression of the main face of a video clip (or a folder
    /// of frames) with the dynamic branch: 16 frames, one per equal segment.
    ClassifyClip(classify::ClassifyClipArgs),
    /// Find the faces in images (boxes, scores, landmarks) as JSON lines, and
    /// optionally draw them; no expression model needed.
    Faces(faces::FacesArgs),
    /// Map where on each face a descriptor or class looks, drawn over the image.
    Explain(explain::ExplainArgs),
    /// Train CLIPER descriptors (stage 1) and fine-tune the vision tower (stage 2).
    Train(train::TrainArgs),
    /// Evaluate on a data set's test split: WAR, UAR, per-class recall, confusion matrix.
    Eval(train::EvalArgs),
    /// CLIP weights and named models: fetch, list, info.
    Weights {
        #[command(subcommand)]
        action: weights::WeightsAction,
    },
    /// Open the live window (the default when no command is given).
    Live(live::LiveArgs),
    /// Run the live pipeline without a window: one line per processed frame.
    Run(run::RunArgs),
    /// Annotate a folder or list of videos and images as one task of an
    /// array job (Slurm, Kubernetes), resumable; `batch merge` makes Parquet tables.
    Batch(batch::BatchArgs),
    /// Replay a recorded session: its annotated video, the timelines and a
    /// scrubber (no model needed).
    Replay(session::ReplayArgs),
    /// Summarise a recorded session per face (frames, share of time per
    /// dominant expression, mean probabilities) and draw a timeline PNG per face.
    Report(session::ReportArgs),
}

impl Command {
    pub(crate) fn run(self) -> Result<()> {
        match self {
            Command::Live(a) => a.run(),
            Command::Run(a) => a.run(),
            Command::Batch(a) => a.run(),
            Command::Report(a) => a.run(),
            Command::Replay(a) => a.run(),
            Command::Train(a) => a.run(),
            Command::Eval(a) => a.run(),
            Command::ClassifyClip(a) => a.run(),
            Command::Explain(a) => a.run(),
            Command::Faces(a) => a.run(),
            Command::Classify(a) => a.run(),
            Command::Bench(a) => a.run(),
            Command::Embed(a) => a.run(),
            Command::Weights { action } => action.run(),
        }
    }
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// CLIP weights: a file (.safetensors, .pt, .pth, .bin) or a folder.
    /// Default: $CLIPER_WEIGHTS, then weights/, then the Hugging Face cache.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
}

#[derive(clap::Args, Clone)]
struct BankArgs {
    /// A trained model: a CLIPER checkpoint (learned descriptors, optionally
    /// a fine-tuned vision tower and temporal module) or a DFER-CLIP `.pth`
    /// as published (it holds its own CLIP: no --weights needed), by path
    /// or by the name `cliper weights list` shows. Default: zero-shot
    /// descriptions.
    #[arg(
        long,
        visible_alias = "model",
        conflicts_with = "prompts",
        value_name = "FILE|NAME"
    )]
    descriptors: Option<PathBuf>,
    /// Zero-shot descriptions file: `[class]` sections, any classes, any
    /// number of descriptions each (format: assets/zero_shot_descriptors.txt).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// An Exp-CLIP projection head (`ExpCLIP_B16_model.pth`, ...) applied to
    /// the zero-shot descriptions (built-in or --prompts) and the probe, by
    /// path or by name (`cliper weights fetch expclip-b16`).
    #[arg(long, conflicts_with = "descriptors", value_name = "FILE|NAME")]
    head: Option<PathBuf>,
}

impl ModelArgs {
    /// What the commands that explain, train and evaluate load: these
    /// weights and device, with `bank`, in f32 (the reference precision).
    fn spec(&self, bank: &BankArgs) -> ModelSpec {
        self.spec_in(bank, Precision::F32)
    }

    /// [`Self::spec`] with the image encoder in `precision`.
    fn spec_in(&self, bank: &BankArgs, precision: Precision) -> ModelSpec {
        ModelSpec {
            weights: self.weights.clone(),
            bank: bank.source(),
            device: self.device.as_str().into(),
            head: bank.head.as_deref().map(cliper::model::zoo::resolve),
            precision,
        }
    }
}

/// `--precision` of the commands that score faces (`live`, `run`, `batch`,
/// `classify`).
#[derive(clap::Args, Clone)]
struct PrecisionArgs {
    /// Image-encoder precision: auto (on the CPU 8-bit where this CPU has
    /// an 8-bit kernel, as `cliper bench` shows, else f32; f16 on GPUs),
    /// f32, q8 (8-bit, CPU), f16 or bf16 (GPUs).
    #[arg(long, value_enum, default_value_t = Precision::Auto)]
    precision: Precision,
}

impl BankArgs {
    fn source(&self) -> BankSource {
        match (&self.descriptors, &self.prompts) {
            (Some(d), _) if cliper::model::setup::is_prompts_file(d) => {
                BankSource::Prompts(d.clone())
            }
            (Some(d), _) => BankSource::Learned(cliper::model::zoo::resolve(d)),
            (None, Some(p)) => BankSource::Prompts(p.clone()),
            (None, None) => BankSource::BuiltinZeroShot,
        }
    }
}

/// What the commands that find and score faces in files take: the model,
/// its bank of descriptors, and how faces are found.
#[derive(clap::Args, Clone)]
struct ScoringArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    bank: BankArgs,
    #[command(flatten)]
    faces: FaceArgs,
    #[command(flatten)]
    precision: PrecisionArgs,
}

impl ScoringArgs {
    /// What the pipeline loads, in the chosen precision.
    fn spec(&self) -> ModelSpec {
        self.model.spec_in(&self.bank, self.precision.precision)
    }
}

/// How faces are found in stills, clips and frames.
#[derive(clap::Args, Clone)]
struct FaceArgs {
    /// Treat the whole image or frame as one face (no face detection).
    #[arg(long)]
    no_detect: bool,
    /// The face detector: CenterFace (a CNN with landmarks; finds turned,
    /// tilted and partly covered faces) or SeetaFace's frontal cascade
    /// (lighter, frontal faces only).
    #[arg(long, value_enum, default_value_t = DetectorKind::CenterFace)]
    detector: DetectorKind,
    /// A CenterFace ONNX file to use instead of the built-in one.
    #[arg(long, value_name = "FILE")]
    detector_model: Option<PathBuf>,
    /// CenterFace: the probability a face needs, from 0.05 to 0.95.
    #[arg(long, value_name = "P", value_parser = probability)]
    confidence: Option<f32>,
    /// Crop faces straight, without turning them so the eyes are level.
    #[arg(long)]
    no_align: bool,
    /// Margin around each detected face, as a fraction of the box side
    /// (default: 0.15 for CenterFace's boxes, 0.25 for SeetaFace's).
    #[arg(long)]
    margin: Option<f32>,
    /// The smallest face looked for, in pixels (default: 20 for `classify`
    /// and `explain`, 40 for `run` and `batch` on files, 64 for cameras and
    /// the demo). Larger values shrink the frame the detector searches.
    #[arg(long, value_name = "PX", value_parser = ranged::<20, 4096>)]
    min_face: Option<usize>,
    /// Detect on frames shrunk to at most PX on the longer side (default:
    /// 4096, i.e. full size, for `classify` and `explain`; 1280 for `run` and
    /// `batch` on files; 480 for cameras and the demo).
    #[arg(long, value_name = "PX", value_parser = ranged::<40, 16384>)]
    detect_size: Option<usize>,
}

impl FaceArgs {
    fn analyzer_config(&self) -> Result<AnalyzerConfig> {
        let margin = self.margin.unwrap_or(self.detector.default_margin());
        if !(0.0..=2.0).contains(&margin) {
            anyhow::bail!("--margin {margin} is out of range: use a fraction between 0 and 2");
        }
        if self.detector_model.is_some() && self.detector != DetectorKind::CenterFace {
            anyhow::bail!(
                "--detector-model is a CenterFace ONNX file: use it with --detector centerface"
            );
        }
        let mut cfg = AnalyzerConfig {
            detect: !self.no_detect,
            margin,
            align: !self.no_align,
            detector_model: self.detector_model.clone(),
            ..Default::default()
        };
        cfg.detector.kind = self.detector;
        if let Some(p) = self.confidence {
            cfg.detector.confidence = p;
            cfg.detector.track_confidence = cfg.detector.track_confidence.min(p);
        }
        if let Some(m) = self.min_face {
            cfg.detector.min_face_size = m as u32;
        }
        if let Some(d) = self.detect_size {
            cfg.detector.max_side = d as u32;
        }
        Ok(cfg)
    }

    /// The settings for files in `run` and `batch`: unlike a webcam stream
    /// they may hold small faces (a group photo, a wide shot), so frames are
    /// searched at their own size (HD shrunk to 1280 px) down to 40 px
    /// faces, the detector's window, with no enlarging: every frame of a
    /// video pays for detection.
    fn file_analyzer_config(&self) -> Result<AnalyzerConfig> {
        let mut cfg = self.analyzer_config()?;
        cfg.detector.min_face_size = self.min_face.unwrap_or(40) as u32;
        cfg.detector.max_side = self.detect_size.unwrap_or(1280) as u32;
        Ok(cfg)
    }

    /// The analyzer for photos and clips in `classify` and `explain`: the
    /// frame is searched at full resolution down to 20 px faces.
    fn still_analyzer(&self) -> Result<FaceAnalyzer> {
        let mut cfg = self.analyzer_config()?;
        cfg.detector.min_face_size = self.min_face.unwrap_or(20) as u32;
        cfg.detector.max_side = self.detect_size.unwrap_or(4096) as u32;
        Ok(FaceAnalyzer::new(cfg)?)
    }
}

/// A probability from 0.05 to 0.95, with the range in the message.
/// Runs `f` on each image that reads; one that does not is reported on
/// stderr and skipped, and the command then fails saying how many.
pub(crate) fn each_image(
    paths: &[PathBuf],
    mut f: impl FnMut(&Path, image::RgbImage) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut failed = 0;
    for path in paths {
        match cliper::vision::images::load_rgb(path) {
            Ok(img) => f(path, img)?,
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} images could not be read", paths.len());
    }
    Ok(())
}

/// Why a number on the command line was refused (clap prints it after the
/// flag's name).
#[derive(Debug, thiserror::Error)]
enum ArgError {
    #[error("{value} is out of range: give {range}")]
    OutOfRange { value: String, range: String },
    #[error("give {what}")]
    NotANumber { what: String },
}

fn probability(text: &str) -> Result<f32, ArgError> {
    match text.trim().parse::<f32>() {
        Ok(p) if (0.05..=0.95).contains(&p) => Ok(p),
        Ok(p) => Err(ArgError::OutOfRange {
            value: p.to_string(),
            range: "0.05 to 0.95".into(),
        }),
        Err(_) => Err(ArgError::NotANumber {
            what: "a probability from 0.05 to 0.95".into(),
        }),
    }
}

/// A whole number from MIN to MAX, with the range in the message (so that
/// `--top -1` says what to give, not "invalid digit").
fn ranged<const MIN: usize, const MAX: usize>(text: &str) -> Result<usize, ArgError> {
    match text.trim().parse::<i128>() {
        Ok(n) if (MIN as i128..=MAX as i128).contains(&n) => Ok(n as usize),
        Ok(n) => Err(ArgError::OutOfRange {
            value: n.to_string(),
            range: format!("{MIN} to {MAX}"),
        }),
        Err(_) => Err(ArgError::NotANumber {
            what: format!("a whole number from {MIN} to {MAX}"),
        }),
    }
}

#[derive(clap::Args, Clone)]
struct SourceArgs {
    /// Where frames come from: a video (any format FFmpeg reads), an image, a
    /// folder of images, or `demo`.
    #[arg(long, conflicts_with = "camera")]
    source: Option<String>,
    /// A camera by index (on Linux, N of /dev/videoN).
    #[arg(long)]
    camera: Option<u32>,
    /// Frames per second of image and folder sources.
    #[arg(long)]
    fps: Option<f64>,
}

impl SourceArgs {
    fn spec(&self) -> Result<Option<cliper::vision::source::SourceSpec>> {
        use cliper::vision::source::SourceSpec;
        Ok(match (&self.source, self.camera) {
            (_, Some(index)) => Some(SourceSpec::Camera {
                index,
                resolution: None,
            }),
            (Some(s), None) => Some(SourceSpec::parse(s, self.fps)?),
            (None, None) => None,
        })
    }
}

/// The dynamic branch's scores in `run` and `batch`.
#[derive(clap::Args, Clone)]
struct DynamicArgs {
    /// Add each face's dynamic-branch scores ("dynamic") once its window of
    /// frame features is full.
    #[arg(long)]
    dynamic: bool,
    /// Frames per dynamic window (at most the temporal module's 16).
    #[arg(value_parser = ranged::<1, 16>, long, default_value_t = 16, value_name = "N")]
    window: usize,
    /// A new dynamic score every N frames once a window is full.
    #[arg(value_parser = ranged::<1, 100000>, long, default_value_t = 1, value_name = "N")]
    stride: usize,
}

impl DynamicArgs {
    fn settings(&self) -> Option<cliper::pipeline::worker::DynamicSettings> {
        self.dynamic
            .then_some(cliper::pipeline::worker::DynamicSettings {
                window: self.window,
                stride: self.stride,
            })
    }
}

#[derive(clap::Args, Clone)]
struct RecordArgs {
    /// Record the session into this folder (new or empty): session.jsonl,
    /// session.csv, video.mp4 and meta.json (see the README, "Recording").
    #[arg(long, value_name = "DIR")]
    record: Option<PathBuf>,
    /// With --record: also keep the video without annotations (raw.mp4).
    #[arg(long, requires = "record")]
    record_raw: bool,
}
