//! The `cliper` command line: a thin edge over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use cliper::model::device::Precision;
use cliper::model::{self, ClipModel};
use cliper::pipeline::analyzer::{AnalyzerConfig, FaceAnalyzer};
use cliper::pipeline::output;
use cliper::pipeline::setup::{self, BankSource, ModelSpec};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cliper",
    version,
    about = "Live, interpretable facial-expression recognition with CLIPER"
)]
#[command(args_conflicts_with_subcommands = true, allow_negative_numbers = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no command: `cliper live` with these options.
    #[command(flatten)]
    live: LiveArgs,
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// CLIP weights: a file (.safetensors, .pt, .pth, .bin) or a folder.
    /// Default: $CLIPER_WEIGHTS, then weights/, then the Hugging Face cache.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Compute device: auto, cpu, cuda or metal.
    #[arg(long, default_value = "auto")]
    device: String,
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
    /// What the pipeline loads: these weights and device, with `bank`.
    fn spec(&self, bank: &BankArgs) -> ModelSpec {
        ModelSpec {
            weights: self.weights.clone(),
            bank: bank.source(),
            device: self.device.clone(),
            head: bank.head.as_deref().map(cliper::model::zoo::resolve),
        }
    }
}

impl BankArgs {
    fn source(&self) -> BankSource {
        match (&self.descriptors, &self.prompts) {
            (Some(d), _) if cliper::pipeline::setup::is_prompts_file(d) => {
                BankSource::Prompts(d.clone())
            }
            (Some(d), _) => BankSource::Learned(cliper::model::zoo::resolve(d)),
            (None, Some(p)) => BankSource::Prompts(p.clone()),
            (None, None) => BankSource::BuiltinZeroShot,
        }
    }
}

/// How faces are found in stills, clips and frames.
#[derive(clap::Args, Clone)]
struct FaceArgs {
    /// Treat the whole image or frame as one face (no face detection).
    #[arg(long)]
    no_detect: bool,
    /// Margin around each detected face, as a fraction of the box side.
    #[arg(long, default_value_t = cliper::vision::faces::DEFAULT_FACE_MARGIN)]
    margin: f32,
    /// The smallest face looked for, in pixels (default: 20 for `classify`
    /// and `explain`, 40 for `run` and `batch` on files, 64 for cameras and
    /// the demo). Below 40 the frame is enlarged, which costs time.
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
        if !(0.0..=2.0).contains(&self.margin) {
            anyhow::bail!(
                "--margin {} is out of range: use a fraction between 0 and 2",
                self.margin
            );
        }
        let mut cfg = AnalyzerConfig {
            detect: !self.no_detect,
            margin: self.margin,
            ..Default::default()
        };
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

/// A whole number from MIN to MAX, with the range in the message (so that
/// `--top -1` says what to give, not "invalid digit").
fn ranged<const MIN: usize, const MAX: usize>(text: &str) -> Result<usize, String> {
    match text.trim().parse::<i128>() {
        Ok(n) if (MIN as i128..=MAX as i128).contains(&n) => Ok(n as usize),
        Ok(n) => Err(format!("{n} is out of range: give {MIN} to {MAX}")),
        Err(_) => Err(format!("give a whole number from {MIN} to {MAX}")),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Print the L2-normalised CLIP embedding of an image or a text as JSON.
    #[command(allow_negative_numbers = true)]
    Embed {
        #[command(flatten)]
        model: ModelArgs,
        /// Image to embed (the whole image, no face detection).
        #[arg(long, conflicts_with = "text", required_unless_present = "text")]
        image: Option<PathBuf>,
        /// Text to embed.
        #[arg(long)]
        text: Option<String>,
    },
    /// Classify the facial expressions of every face in images.
    #[command(allow_negative_numbers = true)]
    Classify {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        bank: BankArgs,
        #[command(flatten)]
        faces: FaceArgs,
        /// Show only the K highest-scoring descriptors per face.
        #[arg(value_parser = ranged::<1, 1000>, long)]
        top: Option<usize>,
        /// One JSON object per image on stdout.
        #[arg(long)]
        json: bool,
        /// Image-encoder precision: auto (f32 on CPU, f16 on GPUs), f32,
        /// f16, bf16 (GPUs) or q8 (8-bit, CPU; see `cliper bench`).
        #[arg(long, value_enum, default_value_t = Precision::Auto)]
        precision: Precision,
        /// Images to classify.
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Time each stage (preprocessing, image encoder, scoring, face
    /// detection, temporal pass) and report peak memory and faces per second.
    #[command(allow_negative_numbers = true)]
    Bench {
        /// CLIP weights (file or folder); default: the usual search.
        #[arg(long, conflicts_with = "random")]
        weights: Option<PathBuf>,
        /// Random ViT-B/16 weights of the real shape (no download needed).
        #[arg(long)]
        random: bool,
        /// Batch sizes of the image encoder, comma-separated.
        #[arg(value_parser = ranged::<1, 256>, long, value_delimiter = ',', default_value = "1,8")]
        batch: Vec<usize>,
        /// Image-encoder precision (q8: 8-bit, CPU; bf16/f16: GPUs).
        #[arg(long, value_enum, default_value_t = Precision::Auto)]
        precision: Precision,
        /// Timed runs per stage, after 2 warm-up runs.
        #[arg(value_parser = ranged::<1, 100000>, long, default_value_t = 10)]
        runs: usize,
        /// Worker threads (default: one per core, or $RAYON_NUM_THREADS).
        #[arg(value_parser = ranged::<1, 1024>, long)]
        threads: Option<usize>,
        /// Compute device: auto, cpu, cuda or metal.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Images for the reduced-precision agreement report (default: 64
        /// crops of the built-in demo portrait).
        #[arg(long, num_args = 1..)]
        images: Vec<PathBuf>,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Classify the expression of the main face of a video clip (or a folder
    /// of frames) with the dynamic branch: 16 frames, one per equal segment.
    #[command(allow_negative_numbers = true)]
    ClassifyClip {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        bank: BankArgs,
        #[command(flatten)]
        faces: FaceArgs,
        /// Show only the K highest-scoring descriptors.
        #[arg(value_parser = ranged::<1, 1000>, long)]
        top: Option<usize>,
        /// One JSON object per clip on stdout.
        #[arg(long)]
        json: bool,
        /// Videos (any format FFmpeg reads: .mp4, .mov, .mkv, .webm, .avi, ...) or folders of frames.
        #[arg(required = true)]
        clips: Vec<PathBuf>,
    },
    /// Map where on each face a descriptor or class looks, drawn over the image.
    #[command(allow_negative_numbers = true)]
    Explain {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        bank: BankArgs,
        /// fast (value path, every frame), gradcam (attention x gradient) or
        /// occlusion (grey out grid cells).
        #[arg(long, default_value = "fast")]
        method: String,
        /// A class name or a descriptor index 0..34 (default: each face's prediction).
        #[arg(long)]
        target: Option<String>,
        /// Occlusion grid cells per side.
        #[arg(value_parser = ranged::<1, 32>, long, default_value_t = 7)]
        grid: usize,
        /// Overlay opacity, 0..1.
        #[arg(long, default_value_t = 0.55)]
        opacity: f32,
        #[command(flatten)]
        faces: FaceArgs,
        /// The overlay PNG to write.
        #[arg(long)]
        out: PathBuf,
        /// Print the raw grid values as JSON.
        #[arg(long)]
        json: bool,
        image: PathBuf,
    },
    /// Train CLIPER descriptors (stage 1) and fine-tune the vision tower (stage 2).
    #[command(allow_negative_numbers = true)]
    Train {
        #[command(flatten)]
        model: ModelArgs,
        /// Data set root (or the CSV manifest for --layout csv).
        #[arg(long)]
        data: PathBuf,
        /// Data set layout.
        #[arg(long, value_enum)]
        layout: cliper::train::dataset::Layout,
        /// Epochs of stage 1 (descriptors only, on cached image features).
        #[arg(value_parser = ranged::<0, 100000>, long, default_value_t = 2)]
        stage1_epochs: usize,
        /// Total epochs (stage 2 = the rest).
        #[arg(value_parser = ranged::<1, 100000>, long, default_value_t = 59)]
        epochs: usize,
        /// Stop after stage 1.
        #[arg(long)]
        stage1_only: bool,
        #[arg(value_parser = ranged::<1, 65536>, long, default_value_t = 128)]
        batch_size: usize,
        /// Where to write the best CLIPER checkpoint (.safetensors).
        #[arg(long)]
        out: PathBuf,
        /// Continue from the training state saved next to --out.
        #[arg(long)]
        resume: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Feature cache folder (default: .cliper-cache next to --out).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Skip unreadable images (counted) instead of failing.
        #[arg(long)]
        skip_unreadable: bool,
        /// Replace an existing --out file that is not this run's checkpoint.
        #[arg(long)]
        force: bool,
    },
    /// Evaluate on a data set's test split: WAR, UAR, per-class recall, confusion matrix.
    #[command(allow_negative_numbers = true)]
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        bank: BankArgs,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, value_enum)]
        layout: cliper::train::dataset::Layout,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Also draw the confusion matrix into this PNG.
        #[arg(long)]
        png: Option<PathBuf>,
        #[arg(long)]
        skip_unreadable: bool,
    },
    /// Manage CLIP weights.
    #[command(allow_negative_numbers = true)]
    Weights {
        #[command(subcommand)]
        action: WeightsAction,
    },
    /// Open the live window (the default when no command is given).
    #[command(allow_negative_numbers = true)]
    Live(LiveArgs),
    /// Run the live pipeline without a window: one line per processed frame.
    #[command(allow_negative_numbers = true)]
    Run(RunArgs),
    /// Annotate a folder or list of videos and images as one task of an
    /// array job (Slurm, Kubernetes), resumable; `batch merge` makes Parquet tables.
    #[command(allow_negative_numbers = true)]
    Batch(BatchArgs),
    /// Replay a recorded session: its annotated video, the timelines and a
    /// scrubber (no model needed).
    #[command(allow_negative_numbers = true)]
    Replay {
        /// The session folder (what --record wrote).
        dir: PathBuf,
        /// Close the window after SECONDS.
        #[arg(long, value_name = "SECONDS")]
        exit_after: Option<f64>,
        /// Save a PNG of the window just before it closes (use with --exit-after).
        #[arg(long, value_name = "PATH")]
        screenshot: Option<PathBuf>,
    },
    /// Summarise a recorded session per face (frames, share of time per
    /// dominant expression, mean probabilities) and draw a timeline PNG per face.
    #[command(allow_negative_numbers = true)]
    Report {
        /// The session folder (what --record wrote).
        dir: PathBuf,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Where to write timeline_<id>.png (default: the session folder).
        #[arg(long, value_name = "DIR")]
        png_dir: Option<PathBuf>,
        /// Do not draw the timeline PNGs.
        #[arg(long, conflicts_with = "png_dir")]
        no_png: bool,
    },
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

#[derive(clap::Args, Clone)]
struct LiveArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    bank: BankArgs,
    #[command(flatten)]
    source: SourceArgs,
    /// Close the window after SECONDS and print the session's speed figures.
    #[arg(long, value_name = "SECONDS")]
    exit_after: Option<f64>,
    /// Save a PNG of the window just before it closes (use with --exit-after).
    #[arg(long, value_name = "PATH")]
    screenshot: Option<PathBuf>,
    /// Start in dynamic mode (the temporal window) instead of the saved choice.
    #[arg(long)]
    dynamic: bool,
    /// Start with the map of a class name or descriptor index 0..34 drawn over the faces.
    #[arg(long, value_name = "TARGET")]
    explain: Option<String>,
    /// Which map to draw: fast (every frame), gradcam or occlusion (computed
    /// in the background for the paused frame).
    #[arg(long, value_name = "METHOD", default_value = "fast")]
    map: String,
    /// Occlusion grid cells per side for --map occlusion.
    #[arg(value_parser = ranged::<1, 32>, long, default_value_t = 7)]
    grid: usize,
    /// Pause on the newest scored frame after SECONDS (demos and tests of
    /// the exact maps; Space pauses and resumes by hand).
    #[arg(long, value_name = "SECONDS")]
    pause_after: Option<f64>,
    #[command(flatten)]
    record: RecordArgs,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    bank: BankArgs,
    #[command(flatten)]
    source: SourceArgs,
    /// Stop after N frames (a still image gives 1 frame unless told otherwise;
    /// cameras and the demo run until interrupted).
    #[arg(long, value_name = "N")]
    frames: Option<u64>,
    /// One JSON object per frame on stdout.
    #[arg(long)]
    json: bool,
    /// Include the K highest-scoring descriptors of each face.
    #[arg(value_parser = ranged::<1, 1000>, long, value_name = "K")]
    top: Option<usize>,
    /// Also score this free-text description against each face.
    #[arg(long, value_name = "TEXT")]
    probe: Option<String>,
    #[command(flatten)]
    faces: FaceArgs,
    #[command(flatten)]
    dynamic: DynamicArgs,
    #[command(flatten)]
    record: RecordArgs,
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
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct BatchArgs {
    #[command(subcommand)]
    action: Option<BatchAction>,
    /// A folder searched recursively for videos and images (hidden entries skipped).
    #[arg(
        long,
        conflicts_with = "manifest",
        required_unless_present = "manifest"
    )]
    input: Option<PathBuf>,
    /// A file listing one video or image per line (relative paths from its folder).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// The output folder, shared by all tasks of the array.
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// This task's share: TASK/TASKS, e.g. 3/8. Default: from
    /// SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, or JOB_COMPLETION_INDEX
    /// with --shards, or the whole list.
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// The number of tasks, with Kubernetes' JOB_COMPLETION_INDEX.
    #[arg(value_parser = ranged::<1, 1000000>, long, value_name = "N")]
    shards: Option<usize>,
    /// Redo inputs that are already finished.
    #[arg(long)]
    force: bool,
    /// Also write each input's annotated video (video.mp4).
    #[arg(long)]
    record_video: bool,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    bank: BankArgs,
    #[command(flatten)]
    faces: FaceArgs,
    /// Descriptors kept per face in session.jsonl.
    #[arg(value_parser = ranged::<1, 1000>, long, value_name = "K", default_value_t = 5)]
    top: usize,
    /// Also score this free-text description against each face.
    #[arg(long, value_name = "TEXT")]
    probe: Option<String>,
    #[command(flatten)]
    dynamic: DynamicArgs,
}

#[derive(Subcommand, Clone)]
enum BatchAction {
    /// Merge a batch's results into OUT/faces.parquet (one row per frame x
    /// face) and OUT/inputs.parquet (one row per input).
    Merge {
        /// The --out folder of the batch.
        dir: PathBuf,
        /// Write the tables here instead of into DIR.
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
    },
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

/// Finalises sessions in the default recordings folder that a crash left
/// unfinished, saying so on stderr.
fn recover_sessions() {
    let base = cliper::session::default_recordings_dir();
    for (dir, r) in cliper::session::finalize::finalize_all(&base) {
        match r {
            Ok(cliper::session::finalize::Finalized::Recovered(r)) => eprintln!("note: {r}"),
            Ok(_) => {}
            Err(e) => eprintln!("warning: cannot finalise {}: {e}", dir.display()),
        }
    }
}

/// Finalises `dir` if a crash left it unfinished (replay and report).
fn recover_session(dir: &std::path::Path) -> Result<()> {
    use cliper::session::finalize::{finalize, Finalized};
    use cliper::session::SessionError;
    match finalize(dir) {
        Ok(Finalized::Recovered(r)) => eprintln!("note: {r}"),
        Ok(Finalized::AlreadyFinished(_)) => {}
        Err(SessionError::Busy(_)) => eprintln!(
            "note: {} is still being recorded; showing what is written so far",
            dir.display()
        ),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

fn report(dir: PathBuf, json: bool, png_dir: Option<PathBuf>, no_png: bool) -> Result<()> {
    use cliper::session::report::{summarize, write_timelines};
    recover_session(&dir)?;
    let session = cliper::session::Session::open(&dir)?;
    let summary = summarize(&session);
    let pngs = if no_png {
        Vec::new()
    } else {
        write_timelines(&session, png_dir.as_deref().unwrap_or(&dir))?
    };
    if json {
        let mut v = summary.to_json();
        v["timelines"] = serde_json::json!(pngs);
        println!("{v}");
    } else {
        print!("{}", summary.to_text());
        if !pngs.is_empty() {
            println!();
            for p in &pngs {
                println!("timeline: {}", p.display());
            }
        }
    }
    if session.bad_lines > 0 {
        eprintln!(
            "warning: {} unreadable line(s) of session.jsonl were skipped",
            session.bad_lines
        );
    }
    Ok(())
}

fn live(args: LiveArgs) -> Result<()> {
    if args.screenshot.is_some() && args.exit_after.is_none() {
        anyhow::bail!(
            "--screenshot needs --exit-after SECONDS: the picture is taken just before the window closes"
        );
    }
    let map = cliper::model::explain::Method::parse(&args.map).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown --map `{}`: use fast, gradcam or occlusion",
            args.map
        )
    })?;
    if !(1..=32).contains(&args.grid) {
        anyhow::bail!(
            "--grid {} is out of range: give 1 to 32 cells per side",
            args.grid
        );
    }
    if let Some(t) = args.pause_after {
        if !(t.is_finite() && t >= 0.0) {
            anyhow::bail!("--pause-after {t} is out of range: give seconds, 0 or more");
        }
    }
    let opts = cliper::app::LiveOptions {
        source: args.source.spec()?,
        model: args.model.spec(&args.bank),
        bank_given: args.bank.descriptors.is_some() || args.bank.prompts.is_some(),
        exit_after: args.exit_after,
        screenshot: args.screenshot,
        record: args.record.record.clone(),
        record_raw: args.record.record_raw,
        dynamic: args.dynamic,
        explain: args
            .explain
            .as_deref()
            .map(|t| {
                // The live app's bank is not loaded yet: targets are read
                // under CLIPER's classes.
                cliper::pipeline::explain::parse_target(
                    t,
                    &cliper::model::cliper::expressions::BankLayout::cliper(),
                )
            })
            .transpose()
            .map_err(anyhow::Error::msg)?,
        map,
        grid: args.grid,
        pause_after: args.pause_after,
    };
    let timed = opts.exit_after.is_some();
    let report = cliper::app::run_live(opts)?;
    if timed {
        eprintln!("live session: {report}");
    }
    Ok(())
}

fn run_headless(args: RunArgs) -> Result<()> {
    let Some(source) = args.source.spec()? else {
        anyhow::bail!("give --source VIDEO|IMAGE|FOLDER|demo or --camera N");
    };
    use cliper::vision::source::SourceSpec;
    let analyzer = match source {
        SourceSpec::Video(_) | SourceSpec::Still { .. } | SourceSpec::Folder { .. } => {
            args.faces.file_analyzer_config()?
        }
        SourceSpec::Camera { .. } | SourceSpec::Demo => args.faces.analyzer_config()?,
    };
    let opts = cliper::pipeline::run::RunOptions {
        source,
        model: args.model.spec(&args.bank),
        analyzer,
        frames: args.frames,
        json: args.json,
        top: args.top,
        probe: args.probe.clone(),
        dynamic: args.dynamic.settings(),
        progress: true,
        record: None,
        stop: None,
    };
    let mut opts = opts;
    if let Some(dir) = &args.record.record {
        recover_sessions();
        let mut r = cliper::pipeline::recorder::RecordOptions::new(dir);
        r.raw_video = args.record.record_raw;
        r.top = args.top.unwrap_or(5);
        r.settings = cliper::pipeline::recorder::run_settings(
            "run",
            &opts.model,
            &opts.analyzer,
            opts.frames,
            opts.probe.as_deref(),
            0.0,
        );
        opts.record = Some(r);
    }
    // Ctrl-C, SIGTERM and SIGHUP end the run as the end of the source
    // would, so that a recording is finalised; a second one quits at once.
    opts.stop = Some(cliper::stop::listen(|sig| {
        eprintln!(
            "\n{}: finishing (press Ctrl-C again to quit at once)",
            cliper::stop::name(sig)
        )
    })?);
    let stdout = std::io::stdout();
    let summary = cliper::pipeline::run::run(&opts, &mut stdout.lock())?;
    if let Some(sig) = summary.stopped_by {
        eprintln!(
            "stopped by {} after {} frames",
            cliper::stop::name(sig),
            summary.frames
        );
    }
    eprintln!(
        "processed {} frames, {} faces in {:.1} s (per frame: decode {:.1} ms, detect {:.0} ms, encode {:.0} ms, score {:.1} ms){}",
        summary.frames,
        summary.faces,
        summary.secs,
        summary.decode_ms,
        summary.detect_ms,
        summary.encode_ms,
        summary.score_ms,
        if summary.warnings > 0 {
            format!(
                "; the source was not read whole: {} warning(s) above",
                summary.warnings
            )
        } else {
            String::new()
        }
    );
    if let Some(rec) = &summary.record {
        for n in &rec.notes {
            eprintln!("warning: {n}");
        }
        if let Some(e) = &rec.error {
            anyhow::bail!(
                "the recording in {} stopped: {e} (all {} frames were processed; {} were recorded)",
                rec.dir.display(),
                summary.frames,
                rec.frames
            );
        }
        eprintln!(
            "recorded {} frames ({} face rows, {} video frames{}) to {}",
            rec.frames,
            rec.face_rows,
            rec.video_frames,
            if rec.video_dropped > 0 {
                format!(", {} dropped", rec.video_dropped)
            } else {
                String::new()
            },
            rec.dir.display()
        );
    }
    if let Some(sig) = summary.stopped_by {
        // Everything is written and closed: exit as the signal asked.
        std::process::exit(128 + sig);
    }
    Ok(())
}

fn batch(args: BatchArgs) -> Result<()> {
    use cliper::batch::{self, Outcome, Shard};
    if let Some(BatchAction::Merge { dir, to }) = args.action {
        let m = batch::merge::merge(&dir, to.as_deref())?;
        eprintln!(
            "merged {} inputs: {} complete, {} partial, {} failed, {} pending; {} face rows in {}, inputs in {}",
            m.inputs,
            m.complete,
            m.partial,
            m.failed,
            m.pending,
            m.rows,
            m.faces_table.display(),
            m.inputs_table.display()
        );
        if !m.whole() {
            anyhow::bail!(
                "{} of {} inputs have no result yet (not processed, or a task is still running): the tables hold only the finished ones",
                m.pending,
                m.inputs
            );
        }
        return Ok(());
    }
    let Some(out) = args.out.clone() else {
        anyhow::bail!("give --out DIR");
    };
    let explicit = args.shard.as_deref().map(Shard::parse).transpose()?;
    let shard = Shard::resolve(explicit, args.shards, |k| std::env::var(k).ok())?;
    let items = match (&args.input, &args.manifest) {
        (Some(dir), _) => batch::folder_work_list(dir, Some(&out))?,
        (None, Some(m)) => batch::manifest_work_list(m)?,
        (None, None) => anyhow::bail!("give --input DIR or --manifest FILE"),
    };
    let analyzer = args.faces.file_analyzer_config()?;
    let model = args.model.spec(&args.bank);
    let settings = cliper::pipeline::recorder::run_settings(
        "batch",
        &model,
        &analyzer,
        None,
        args.probe.as_deref(),
        0.0,
    );
    let opts = batch::task::TaskOptions {
        out: out.clone(),
        items,
        shard,
        force: args.force,
        record_video: args.record_video,
        model,
        analyzer,
        dynamic: args.dynamic.settings(),
        probe: args.probe.clone(),
        top: args.top,
        settings,
    };
    let mine = opts
        .items
        .iter()
        .enumerate()
        .filter(|(i, _)| shard.owns(*i))
        .count();
    eprintln!(
        "task {shard}: {mine} of {} inputs, into {}",
        opts.items.len(),
        out.display()
    );
    let summary = batch::task::run_task(&opts, &mut |r| {
        let s = &r.status;
        let what = match s.outcome {
            Outcome::Skipped => "skipped (finished by an earlier run)".to_string(),
            Outcome::Failed | Outcome::Busy => format!(
                "{}: {}",
                s.outcome.as_str(),
                s.error.as_deref().unwrap_or("unknown error")
            ),
            Outcome::Complete | Outcome::Partial => {
                let mut t = format!(
                    "{}, {} frames, {} faces in {:.1} s ({:.1} frames/s)",
                    s.outcome.as_str(),
                    s.frames,
                    s.faces,
                    s.seconds,
                    s.frames as f64 / s.seconds.max(1e-9)
                );
                if let Some(w) = s.warnings.first() {
                    t.push_str(&format!(
                        "; not read whole ({} warning(s)): {w}",
                        s.warnings.len()
                    ));
                }
                t
            }
        };
        eprintln!("[{}/{}] {}: {what}", r.position, r.of, s.input);
    })?;
    eprintln!(
        "task {shard} done in {:.1} s: {} inputs, {} complete, {} partial, {} failed, {} skipped, {} busy; {} frames, {} faces",
        summary.secs,
        summary.inputs,
        summary.complete,
        summary.partial,
        summary.failed,
        summary.skipped,
        summary.busy,
        summary.frames,
        summary.faces
    );
    if !summary.all_whole() {
        anyhow::bail!(
            "{} of this task's {} inputs failed or were not read whole (see {}); rerun the task to retry the failed ones",
            summary.failed + summary.partial + summary.busy,
            summary.inputs,
            out.join(batch::STATUS_DIR).join(shard.status_file()).display()
        );
    }
    Ok(())
}

#[derive(Subcommand)]
enum WeightsAction {
    /// Without NAME: download openai/clip-vit-base-patch16 into the Hugging
    /// Face cache. With NAME: download a named model (`cliper weights list`):
    /// an Exp-CLIP head or a DFER-CLIP checkpoint.
    Fetch {
        /// A model name from `cliper weights list`.
        name: Option<String>,
    },
    /// The models that can be fetched by name, which are installed, and
    /// what each is: backbone, classes, source, licence, published accuracy.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show which weights would be used and their architecture.
    Info {
        #[arg(long)]
        weights: Option<PathBuf>,
    },
}

fn fetch_named(name: &str) -> Result<()> {
    use indicatif::{ProgressBar, ProgressStyle};
    let entry = model::zoo::find(name).ok_or_else(|| model::zoo::ZooError::Unknown(name.into()))?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(entry.name.to_string());
    let path = model::zoo::fetch(entry.name, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let path = path?;
    let how = match entry.kind {
        model::zoo::ZooKind::ExpClipHead => format!("--head {}", entry.name),
        model::zoo::ZooKind::DferClip => format!("--model {}", entry.name),
    };
    eprintln!(
        "{} ready: {} (use it with {how})",
        entry.name,
        path.display()
    );
    if let Some(clip) = entry.needs_clip {
        eprintln!("it runs on the CLIP weights {clip}");
    }
    Ok(())
}

fn list_models(json: bool) -> Result<()> {
    let clip = model::weights::locate(None).ok();
    if json {
        let models: Vec<serde_json::Value> = model::zoo::CATALOGUE
            .iter()
            .map(|e| {
                serde_json::json!({
                    "name": e.name,
                    "kind": e.kind.as_str(),
                    "installed": e.installed(),
                    "path": e.path(),
                    "backbone": e.backbone,
                    "needs_clip": e.needs_clip,
                    "classes": e.classes,
                    "descriptors_per_class": e.descriptors_per_class,
                    "source": e.page(),
                    "project": e.project,
                    "licence": e.licence,
                    "accuracy": e.accuracy,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "clip_weights": clip,
                "models_dir": model::zoo::models_dir(),
                "models": models,
            }))?
        );
        return Ok(());
    }
    match &clip {
        Some(p) => println!("CLIP weights: {} (installed)", p.display()),
        None => println!("CLIP weights: not installed (`cliper weights fetch`)"),
    }
    println!("models folder: {}\n", model::zoo::models_dir().display());
    for e in model::zoo::CATALOGUE {
        println!(
            "{:<22} {:<13} {}",
            e.name,
            e.kind.as_str(),
            if e.installed() {
                "installed"
            } else {
                "not installed"
            }
        );
        println!("    backbone:    {}", e.backbone);
        if let Some(c) = e.needs_clip {
            println!("    needs CLIP:  {c}");
        }
        println!("    classes:     {}", e.classes);
        println!("    per class:   {}", e.descriptors_per_class);
        println!(
            "    from:        {} ({}), licence {}",
            e.project,
            e.page(),
            e.licence
        );
        println!("    accuracy:    {}", e.accuracy);
    }
    Ok(())
}

fn load_model(args: &ModelArgs) -> Result<ClipModel> {
    let device = model::device::select(&args.device)?;
    let dtype = model::device::default_dtype(&device);
    let path = model::weights::locate(args.weights.as_deref())?;
    let ckpt = model::Checkpoint::load(&path, candle_core::DType::F32)?;
    Ok(ClipModel::from_checkpoint(&ckpt, &device, dtype)?)
}

fn embed(args: &ModelArgs, image: Option<PathBuf>, text: Option<String>) -> Result<()> {
    let clip = load_model(args)?;
    let emb = match (image, text) {
        (Some(path), _) => {
            let rgb = cliper::vision::images::load_rgb(&path)?;
            let size = clip.config.vision.image_size as u32;
            let px = model::preprocess::preprocess_tensor(
                &image::DynamicImage::ImageRgb8(rgb),
                size,
                &clip.device,
            )?
            .unsqueeze(0)?;
            clip.encode_images(&px)?
        }
        (None, Some(text)) => {
            let tok = model::tokenizer::ClipTokenizer::new();
            clip.encode_texts(&tok, &[text.as_str()])
                .context("cannot embed the text")?
        }
        (None, None) => anyhow::bail!("give --image FILE or --text STRING"),
    };
    let v: Vec<f32> = emb.squeeze(0)?.to_vec1()?;
    println!("{}", serde_json::json!({ "embedding": v }));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn classify_note(bank: &cliper::model::cliper::DescriptorBank) {
    if bank.kind == cliper::model::cliper::BankKind::DferClip {
        eprintln!("note: DFER-CLIP is a video model; still images are scored by its image branch (each frame's feature against the class features). `cliper classify-clip` and the dynamic mode use its temporal module.");
    }
}

fn classify(
    model: ModelArgs,
    bank: BankArgs,
    faces: FaceArgs,
    top: Option<usize>,
    json: bool,
    precision: Precision,
    images: Vec<PathBuf>,
) -> Result<()> {
    let mut analyzer = faces.still_analyzer()?;
    let loaded = setup::load_with(&model.spec(&bank), precision)?;
    classify_note(&loaded.bank);
    let mut failed = 0;
    for path in &images {
        let rgb = match cliper::vision::images::load_rgb(path) {
            Ok(rgb) => rgb,
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
                continue;
            }
        };
        let faces = analyzer
            .analyze(&loaded.clip, &loaded.bank, &rgb)
            .with_context(|| format!("cannot classify {}", path.display()))?;
        if json {
            let faces: Vec<_> = faces
                .iter()
                .map(|f| output::face_json(&f.bbox, &f.scores, &loaded.bank, top))
                .collect();
            let mut v = serde_json::json!({"image": path, "faces": faces});
            if loaded.bank.kind == cliper::model::cliper::BankKind::DferClip {
                // DFER-CLIP is a video model: a still gets its image branch.
                v["branch"] = serde_json::json!("image");
            }
            println!("{v}");
        } else {
            print_table(path, &faces, &loaded.bank, top.unwrap_or(5));
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} images could not be read", images.len());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn classify_clip(
    model: ModelArgs,
    bank: BankArgs,
    faces: FaceArgs,
    top: Option<usize>,
    json: bool,
    clips: Vec<PathBuf>,
) -> Result<()> {
    use cliper::pipeline::clip::{classify_clip, clip_json, sample_clip};
    use cliper::pipeline::dynamic::DynamicScorer;
    let mut analyzer = faces.still_analyzer()?;
    let loaded = setup::load(&model.spec(&bank))?;
    let temporal = match &loaded.cliper {
        Some(ck) => ck
            .temporal_module(loaded.clip.config.embed_dim, &loaded.clip.device)
            .with_context(|| format!("cannot load the temporal module of {}", ck.path.display()))?,
        None => None,
    };
    let scorer = DynamicScorer::new(temporal, &loaded.clip.device);
    if scorer.temporal.is_none() {
        eprintln!("note: no trained temporal weights; dynamic scores are the mean of the 16 frames' static scores");
    }
    let mut failed = 0;
    let mut incomplete = 0;
    for path in &clips {
        let sampled = match sample_clip(path, scorer.frames()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
                continue;
            }
        };
        for n in &sampled.notes {
            eprintln!("{}: {n}", path.display());
        }
        if !sampled.complete {
            incomplete += 1;
        }
        let r = classify_clip(&loaded.clip, &loaded.bank, &mut analyzer, &scorer, &sampled)
            .with_context(|| format!("cannot classify {}", path.display()))?;
        if json {
            println!("{}", clip_json(path, &r, &sampled, &loaded.bank, top));
        } else {
            let faces: Vec<cliper::pipeline::FaceResult> = match (&r.bbox, &r.scores) {
                (Some(b), Some(s)) => vec![cliper::pipeline::FaceResult {
                    bbox: *b,
                    scores: s.scores.clone(),
                    embedding: Vec::new(),
                }],
                _ => Vec::new(),
            };
            println!(
                "[dynamic: {}, {} frames{}]",
                r.scores
                    .as_ref()
                    .map(|s| s.mode.as_str())
                    .unwrap_or("no face"),
                sampled.frames.len(),
                if sampled.complete {
                    String::new()
                } else {
                    format!(
                        ", INCOMPLETE: sampled from the {} readable frames",
                        sampled.source_frames
                    )
                }
            );
            print_table(path, &faces, &loaded.bank, top.unwrap_or(5));
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} clips could not be read", clips.len());
    }
    if incomplete > 0 {
        anyhow::bail!(
            "{incomplete} of {} clips could not be read whole (\"complete\": false; see the notes above): their scores cover only the frames read",
            clips.len()
        );
    }
    Ok(())
}

fn print_table(
    path: &std::path::Path,
    faces: &[cliper::pipeline::FaceResult],
    bank: &cliper::model::cliper::DescriptorBank,
    top: usize,
) {
    println!(
        "{}: {} face(s)  [{} descriptors: {}]",
        path.display(),
        faces.len(),
        bank.kind.as_str(),
        bank.source
    );
    for (n, f) in faces.iter().enumerate() {
        let b = &f.bbox;
        println!(
            "  face {} at x={} y={} w={} h={}: {}",
            n + 1,
            b.x,
            b.y,
            b.w,
            b.h,
            f.scores.predicted_name()
        );
        for (c, name) in f.scores.layout.classes().iter().enumerate() {
            let p = f.scores.probs[c];
            let bar = "#".repeat((p * 30.0).round() as usize);
            println!(
                "    {name:<10} score {:>8.3}  prob {p:>6.3}  {bar}",
                f.scores.class_scores[c]
            );
        }
        println!("    top descriptors:");
        for &i in f.scores.ranked().iter().take(top) {
            let d = &bank.descriptors[i];
            println!(
                "      {:>8.3}  {:<10} #{}  {}",
                f.scores.logits[i],
                bank.layout.name(d.class),
                d.index,
                d.text
            );
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let Some(command) = cli.command else {
        return live(cli.live);
    };
    match command {
        Command::Live(args) => live(args),
        Command::Run(args) => run_headless(args),
        Command::Batch(args) => batch(args),
        Command::Report {
            dir,
            json,
            png_dir,
            no_png,
        } => report(dir, json, png_dir, no_png),
        Command::Replay {
            dir,
            exit_after,
            screenshot,
        } => {
            if screenshot.is_some() && exit_after.is_none() {
                anyhow::bail!("--screenshot needs --exit-after SECONDS");
            }
            recover_session(&dir)?;
            cliper::app::replay::run_replay(cliper::app::replay::ReplayOptions {
                dir,
                exit_after,
                screenshot,
            })?;
            Ok(())
        }
        Command::Train {
            model,
            data,
            layout,
            stage1_epochs,
            epochs,
            stage1_only,
            batch_size,
            out,
            resume,
            seed,
            cache,
            skip_unreadable,
            force,
        } => {
            let opts = cliper::train::trainer::TrainOptions {
                weights: model.weights,
                data,
                layout,
                stage1_epochs,
                epochs,
                stage1_only,
                batch_size,
                out: out.clone(),
                resume,
                seed,
                cache_dir: cache,
                skip_unreadable,
                device: model.device,
                force,
            };
            let summary = cliper::train::trainer::train(&opts, &mut |line| eprintln!("{line}"))?;
            eprintln!(
                "best test WAR {:.2}% / UAR {:.2}% at epoch {}; checkpoint: {}",
                100.0 * summary.best_war,
                100.0 * summary.best_uar,
                summary.best_epoch,
                out.display()
            );
            Ok(())
        }
        Command::Eval {
            model,
            bank,
            data,
            layout,
            json,
            png,
            skip_unreadable,
        } => {
            let spec = model.spec(&bank);
            let m = cliper::train::trainer::evaluate(&spec, &data, layout, skip_unreadable)?;
            if let Some(p) = &png {
                m.save_png(p, &format!("confusion: {}", data.display()))
                    .map_err(anyhow::Error::msg)?;
            }
            if json {
                println!("{}", m.to_json());
            } else {
                print!("{}", m.to_text());
            }
            Ok(())
        }
        Command::ClassifyClip {
            model,
            bank,
            faces,
            top,
            json,
            clips,
        } => classify_clip(model, bank, faces, top, json, clips),
        Command::Explain {
            model,
            bank,
            method,
            target,
            grid,
            opacity,
            faces,
            out,
            json,
            image,
        } => {
            use cliper::model::explain::Method;
            use cliper::pipeline::explain as ex;
            let method = Method::parse(&method).ok_or_else(|| {
                anyhow::anyhow!("unknown --method `{method}`: use fast, gradcam or occlusion")
            })?;
            if !(0.0..=1.0).contains(&opacity) {
                anyhow::bail!("--opacity {opacity} is out of range 0..1");
            }
            if grid == 0 {
                anyhow::bail!("--grid must be at least 1");
            }
            let rgb = cliper::vision::images::load_rgb(&image)?;
            let loaded = setup::load(&model.spec(&bank))?;
            let layout = loaded.bank.layout.clone();
            let target = target
                .as_deref()
                .map(|t| ex::parse_target(t, &layout))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let mut analyzer = faces.still_analyzer()?;
            // Occlusion runs grid^2 + 1 forward passes per face: seconds each
            // with a full-size model on a CPU.
            let bar = (method == Method::Occlusion).then(|| {
                let pb = indicatif::ProgressBar::new(0);
                pb.set_style(
                    indicatif::ProgressStyle::with_template(
                        "occlusion [{bar:30}] {pos}/{len} forward passes, eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                pb
            });
            let faces = ex::explain_image(
                &loaded.clip,
                &loaded.bank,
                &mut analyzer,
                &rgb,
                method,
                target,
                grid,
                &mut |done, total| {
                    if let Some(b) = &bar {
                        b.set_length(total as u64);
                        b.set_position(done as u64);
                    }
                },
            )
            .with_context(|| format!("cannot explain {}", image.display()))?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let title = match faces.first().map(|f| f.target) {
                Some(cliper::model::explain::Target::Class(c)) => {
                    format!("{} map: class {}", method.as_str(), layout.name(c))
                }
                Some(cliper::model::explain::Target::Descriptor(i)) => {
                    format!(
                        "{} map: descriptor {} ({} #{})",
                        method.as_str(),
                        i,
                        layout.name(layout.locate(i).0),
                        layout.locate(i).1
                    )
                }
                None => String::new(),
            };
            ex::render(&rgb, &faces, opacity, &title)
                .save(&out)
                .with_context(|| format!("cannot write {}", out.display()))?;
            if json {
                let faces: Vec<_> = faces
                    .iter()
                    .map(|f| ex::explanation_json(f, &layout))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"image": image, "method": method.as_str(), "faces": faces})
                );
            } else {
                eprintln!("wrote {} ({} face(s))", out.display(), faces.len());
            }
            Ok(())
        }
        Command::Classify {
            model,
            bank,
            faces,
            top,
            json,
            precision,
            images,
        } => classify(model, bank, faces, top, json, precision, images),
        Command::Bench {
            weights,
            random,
            batch,
            precision,
            runs,
            threads,
            device,
            images,
            json,
        } => {
            let opts = cliper::pipeline::bench::BenchOptions {
                weights,
                random,
                batches: batch,
                precision,
                runs,
                threads,
                device,
                images,
                ..Default::default()
            };
            let report = cliper::pipeline::bench::run(&opts, &mut |s| eprintln!("bench: {s}"))?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
        Command::Embed { model, image, text } => embed(&model, image, text),
        Command::Weights { action } => match action {
            WeightsAction::Fetch { name: None } => {
                let path = model::weights::fetch().map_err(anyhow::Error::msg)?;
                eprintln!("weights ready: {}", path.display());
                Ok(())
            }
            WeightsAction::Fetch { name: Some(name) } => fetch_named(&name),
            WeightsAction::List { json } => list_models(json),
            WeightsAction::Info { weights } => {
                let path = model::weights::locate(weights.as_deref())?;
                let ckpt = model::Checkpoint::load(&path, candle_core::DType::F32)?;
                let info = serde_json::json!({
                    "path": path,
                    "naming": format!("{:?}", ckpt.naming),
                    "config": ckpt.config,
                });
                println!("{}", serde_json::to_string_pretty(&info)?);
                Ok(())
            }
        },
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line, not clap's multi-line usage block; but keep what
            // the first paragraph lists (the missing arguments' names).
            let msg = e.render().to_string();
            let first: Vec<&str> = msg
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = match first.join(" ") {
                s if s.is_empty() => "invalid arguments".to_string(),
                s => s,
            };
            eprintln!("{first} (see `cliper --help`)");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Candle appends a backtrace when RUST_BACKTRACE is set: keep
            // the message to its first line.
            let msg = format!("{e:#}");
            if std::env::var_os("CLIPER_DEBUG").is_some() {
                eprintln!("{e:?}");
            }
            eprintln!("error: {}", msg.lines().next().unwrap_or("unknown error"));
            ExitCode::FAILURE
        }
    }
}
