//! `cliper bench`: per-stage timings of the pipeline on the chosen device and
//! precision (preprocessing, image encoding per batch size, scoring, face
//! detection, the temporal pass), peak memory, faces per second, and for a
//! reduced precision its agreement with f32.
//!
//! Every stage runs `warmup` times untimed, then `runs` times; the figures
//! are median, min and max in milliseconds. `tools/bench_reference.py` times
//! ONNX Runtime and PyTorch on the same ViT-B/16 shape and can run this
//! command itself so that the ratios come from one run.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use image::RgbImage;

use crate::model::cliper::scoring;
use crate::model::cliper::DescriptorBank;
use crate::model::device::{self, Precision};
use crate::model::gemm_i8::Isa;
use crate::model::temporal::{TemporalConfig, TemporalModule};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::{preprocess, weights, Checkpoint, ClipConfig, ClipModel};
use crate::vision::faces::{DetectorKind, FaceDetector, FaceDetectorConfig};
use crate::vision::source::demo::DemoSource;

mod agreement;
mod machine;
mod report;

pub use agreement::Agreement;
use agreement::{agreement, demo_crops, pixels};
pub use machine::{cpu_summary, peak_memory_mb};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// CLIP weights; `None` with `random` builds random ViT-B/16 weights.
    pub weights: Option<PathBuf>,
    pub random: bool,
    pub batches: Vec<usize>,
    pub precision: Precision,
    /// The 8-bit kernel to run (`--isa`); `None`: the best this CPU has.
    pub isa: Option<Isa>,
    pub runs: usize,
    pub warmup: usize,
    /// Worker threads (rayon, Candle, gemm); `None` keeps the default.
    pub threads: Option<usize>,
    pub device: String,
    /// Images for the agreement report (default: crops of the demo portrait).
    pub images: Vec<PathBuf>,
    /// Size of the default agreement set.
    pub agreement_images: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            weights: None,
            random: false,
            batches: vec![1, 8],
            precision: Precision::Auto,
            isa: None,
            runs: 10,
            warmup: 2,
            threads: None,
            device: "auto".into(),
            images: Vec::new(),
            agreement_images: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Device(#[from] crate::model::device::DeviceError),
    #[error("{0}")]
    Weights(#[from] crate::model::weights::WeightsError),
    #[error("{0}")]
    Bank(#[from] crate::model::cliper::bank::BankError),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Faces(#[from] crate::vision::faces::FaceError),
    #[error("{0}")]
    Video(#[from] crate::vision::video::VideoError),
    #[error("cannot read agreement image {path}: {reason}")]
    Image { path: PathBuf, reason: String },
    #[error("invalid benchmark settings: {0}")]
    Settings(String),
}

/// Median, min and max of one stage, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    fn from_ms(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            0.5 * (v[n / 2 - 1] + v[n / 2])
        };
        Self {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }

    fn scaled(self, by: f64) -> Self {
        Self {
            median: self.median * by,
            min: self.min * by,
            max: self.max * by,
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[derive(Clone, Debug)]
pub struct BenchReport {
    pub device: String,
    /// The precision that ran (`auto` resolved).
    pub precision: Precision,
    /// The image encoder's path, e.g. `q8 avx512-vnni` or `f32 avx512`.
    pub kernel: String,
    /// The CPU model and its features that matter here ([`cpu_summary`]).
    pub cpu: String,
    pub threads: usize,
    pub weights: String,
    pub runs: usize,
    pub preprocess_ms_per_image: Stat,
    /// Batch size -> per-image encode time.
    pub image_encode_ms_per_image: Vec<(usize, Stat)>,
    /// Scoring of the largest batch against the 35 descriptors.
    pub scoring_ms: (usize, Stat),
    /// Each detector at each frame size, with the settings of the live
    /// app and of stills, in the same run.
    pub face_detection: Vec<DetectionTiming>,
    /// One temporal pass over a 16-frame window (random weights).
    pub temporal_ms: Stat,
    /// The live fast explanation map of one face (value path of the last
    /// block, from the forward pass's last-block input).
    pub explain_fast_map_ms: Stat,
    /// The exact Grad-CAM map of one face (a whole forward, then the last
    /// block again with a backward pass), as the app computes it for a
    /// paused frame. An occlusion map costs `grid^2 + 1` image encodes.
    pub explain_gradcam_ms: Stat,
    /// Frame size -> FFmpeg decode (H.264 to RGB) and record-encode
    /// (RGB to H.264, libx264) time per frame.
    pub video_decode_ms: Vec<((u32, u32), Stat)>,
    pub video_encode_ms: Vec<((u32, u32), Stat)>,
    /// Batch size -> faces per second of a 640x480 frame holding that many
    /// faces: detection + preprocessing + encoding + scoring, from the medians.
    pub faces_per_second: Vec<(usize, f64)>,
    pub peak_memory_mb: Option<f64>,
    pub agreement: Option<Agreement>,
}

/// Times `f` after `warmup` untimed calls; milliseconds.
pub fn time<T>(
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<T, BenchError>,
) -> Result<Stat, BenchError> {
    for _ in 0..warmup {
        std::hint::black_box(f()?);
    }
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(f()?);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Stat::from_ms(ms))
}

/// One detector timed on one frame size.
#[derive(Clone, Debug)]
pub struct DetectionTiming {
    /// `centerface` or `seeta`.
    pub detector: &'static str,
    /// `live` (the app's and cameras' settings: faces from 64 px, frames
    /// shrunk to 320 px) or `still` (`classify`'s: full size, faces from 20 px).
    pub settings: &'static str,
    pub size: (u32, u32),
    /// Faces found in the frame (the demo face, scaled).
    pub faces: usize,
    pub ms: Stat,
}

/// Frames per run of the video stages.
const VIDEO_FRAMES: usize = 24;

type SizedStats = Vec<((u32, u32), Stat)>;

/// Time per frame of recording (RGB to H.264 in fragmented MP4) and of
/// decoding it back (FFmpeg to RGB), at 640x480 and 1280x720, on the demo
/// frame moving a little from frame to frame (so that inter frames are not empty).
fn video_stages(
    frame: &image::RgbImage,
    w: usize,
    r: usize,
) -> Result<(SizedStats, SizedStats), BenchError> {
    use crate::vision::video::{VideoReader, VideoWriter};
    let dir = tempfile_dir()?;
    let mut decode = Vec::new();
    let mut encode = Vec::new();
    for (fw, fh) in [(640u32, 480u32), (1280, 720)] {
        let base =
            image::imageops::resize(frame, fw + 32, fh, image::imageops::FilterType::Triangle);
        let frames: Vec<image::RgbImage> = (0..VIDEO_FRAMES as u32)
            .map(|i| image::imageops::crop_imm(&base, i, 0, fw, fh).to_image())
            .collect();
        let path = dir.join(format!("bench_{fw}x{fh}.mp4"));
        let write = || -> Result<(), BenchError> {
            let _ = std::fs::remove_file(&path);
            let mut wr = VideoWriter::create(&path, (fw, fh), 25.0)?;
            for (i, f) in frames.iter().enumerate() {
                wr.push(f, i as f64 / 25.0)?;
            }
            wr.finish()?;
            Ok(())
        };
        let st = time(w, r, write)?;
        encode.push(((fw, fh), st.scaled(1.0 / VIDEO_FRAMES as f64)));
        let st = time(w, r, || {
            let mut rd = VideoReader::open(&path)?;
            let mut n = 0;
            while rd.next_frame()?.is_some() {
                n += 1;
            }
            Ok(n)
        })?;
        decode.push(((fw, fh), st.scaled(1.0 / VIDEO_FRAMES as f64)));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok((decode, encode))
}

/// A fresh folder for the bench's scratch files.
fn tempfile_dir() -> Result<PathBuf, BenchError> {
    let dir = std::env::temp_dir().join(format!("cliper-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| BenchError::Video(crate::vision::video::VideoError::write(&dir, e)))?;
    Ok(dir)
}

/// Sets the worker thread count for rayon, gemm and Candle. Must run before
/// any of them starts its pool.
pub fn set_threads(n: usize) -> Result<(), BenchError> {
    if n == 0 {
        return Err(BenchError::Settings("--threads must be at least 1".into()));
    }
    // Candle reads RAYON_NUM_THREADS for its own pools.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    crate::parallel::build_model_pool(Some(n))
        .map_err(|e| BenchError::Settings(format!("cannot set --threads {n}: {e}")))
}

/// Image embeddings, one row per image.
type Embeddings = Vec<Vec<f32>>;

/// The model as `opts` asks for it, and, where it is quantized and
/// `reference` holds images, their f32 embeddings, taken before the f32
/// block weights are freed (the agreement check compares against them).
fn load_model(
    opts: &BenchOptions,
    reference: Option<&[RgbImage]>,
) -> Result<(ClipModel, String, Option<Embeddings>), BenchError> {
    let device = device::select(&opts.device)?;
    let dtype = opts.precision.dtype(&device)?;
    let ckpt = if opts.random {
        Checkpoint::random(&ClipConfig::vit_b16(), 0)?
    } else {
        let path = weights::locate(opts.weights.as_deref())?;
        Checkpoint::load(&path, DType::F32)?
    };
    let name = ckpt.path.display().to_string();
    let mut clip = ClipModel::from_checkpoint(ckpt, &device, dtype)?;
    match (opts.precision, opts.isa) {
        (Precision::Q8 | Precision::Auto, _) | (Precision::Bf16 | Precision::F32, None) if device.is_cpu() => {
            opts.precision.pack(&mut clip.vision, &device, opts.isa)?
        }
        (p, Some(isa)) => {
            return Err(BenchError::Settings(format!(
                "--isa {isa} picks the 8-bit CPU kernel, which --precision {} on {} does not run: use --precision q8 (or auto) --device cpu",
                p.as_str(),
                device::describe(&device)
            )))
        }
        _ => {}
    }
    let reference = match reference {
        Some(set) if clip.vision.backend.quantized().is_some() => {
            // The f32 twin shares the weights: nothing is copied.
            let twin = agreement::f32_reference(&clip, opts)?;
            Some(agreement::embeddings(&twin, set)?)
        }
        _ => None,
    };
    // As the app does: the 8-bit layers need no f32 copy.
    clip.vision.release_f32_linears()?;
    Ok((clip, name, reference))
}

/// The images of the agreement check: the user's, or crops of the demo portrait.
fn agreement_set(opts: &BenchOptions) -> Result<Vec<RgbImage>, BenchError> {
    if opts.images.is_empty() {
        return Ok(demo_crops(opts.agreement_images.max(1)));
    }
    opts.images
        .iter()
        .map(|p| {
            crate::vision::images::load_rgb(p).map_err(|e| BenchError::Image {
                path: p.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Runs every stage; `progress` receives one line per stage.
pub fn run(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BenchReport, BenchError> {
    // Each stage's line says the peak memory so far: what a stage added.
    let progress = &mut |stage: &str| match peak_memory_mb() {
        Some(mb) => progress(&format!("{stage} (peak memory so far {mb:.0} MB)")),
        None => progress(stage),
    };
    if opts.batches.is_empty() || opts.batches.contains(&0) {
        return Err(BenchError::Settings(
            "--batch needs sizes of at least 1, e.g. --batch 1,8".into(),
        ));
    }
    if opts.runs == 0 {
        return Err(BenchError::Settings("--runs must be at least 1".into()));
    }
    match opts.threads {
        Some(n) => set_threads(n)?,
        // As the other commands run it (a pool started already stays).
        None => {
            let _ = crate::parallel::build_model_pool(None);
        }
    }
    let (w, r) = (opts.warmup, opts.runs);
    progress("loading the model");
    let set = match opts.precision {
        Precision::F32 => None,
        _ => Some(agreement_set(opts)?),
    };
    let (clip, weights_name, reference) = load_model(opts, set.as_deref())?;
    let precision = match clip.vision.precision() {
        "q8" => Precision::Q8,
        "f16" => Precision::F16,
        "bf16" => Precision::Bf16,
        _ => Precision::F32,
    };
    let kernel = clip.vision.kernel();
    progress(&format!("image encoder: {kernel}"));
    progress("computing the descriptor features");
    let bank = DescriptorBank::default_zero_shot(&clip, &ClipTokenizer::new())?;

    let max_batch = opts.batches.iter().copied().max().unwrap_or(1);
    let crops = demo_crops(max_batch);
    progress("preprocessing");
    let size = clip.config.vision.image_size as u32;
    let preprocess_ms = time(w, r, || {
        Ok(preprocess::to_normalized_chw(
            &preprocess::resize_shorter_center_crop(&crops[0], size),
        ))
    })?;
    let px = pixels(&clip, &crops)?;

    let mut encode = Vec::new();
    for &b in &opts.batches {
        progress(&format!("image encoder, batch {b}"));
        let batch = px.narrow(0, 0, b)?;
        // Read the result back so that GPU work is finished when timed.
        let stat = time(w, r, || Ok(clip.encode_images(&batch)?.to_vec2::<f32>()?))?;
        encode.push((b, stat.scaled(1.0 / b as f64)));
    }

    progress("scoring");
    let emb = clip.encode_images(&px)?;
    let scoring_ms = time(w, r, || Ok(scoring::score(&emb, &bank)?))?;

    progress("face detection");
    let frame = DemoSource::new().render(0.0);
    // Each detection runs on a pool of its own, from one of its threads, as
    // the detect stage runs it (`pipeline::worker::detect`). Called from
    // outside a pool, each of the network's parallel loops was handed to
    // the pool's threads and waited for: 1.6 ms a frame more than the app
    // spends (8.75 against 7.1 ms, one thread, 640x480, 2-core EPYC).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(|i| format!("cliper-detect-{i}"))
        .build()
        .map_err(|e| BenchError::Settings(format!("cannot start the detection threads: {e}")))?;
    let mut detection = Vec::new();
    for kind in [DetectorKind::CenterFace, DetectorKind::Seeta] {
        for (settings, min_face, max_side) in [
            ("live", 64, crate::pipeline::worker::LIVE_DETECT_MAX_SIDE),
            ("still", 20, 4096),
        ] {
            let cfg = FaceDetectorConfig {
                kind,
                min_face_size: min_face,
                max_side,
                ..FaceDetectorConfig::default()
            };
            for (fw, fh) in [(640, 480), (1920, 1080)] {
                progress(&format!(
                    "face detection: {} ({settings}), {fw}x{fh}",
                    kind.name()
                ));
                let img =
                    image::imageops::resize(&frame, fw, fh, image::imageops::FilterType::Triangle);
                // Full-size HD stills take a second or more: fewer runs.
                let runs = if settings == "still" && fw > 1000 {
                    r.div_ceil(4)
                } else {
                    r
                };
                // The detector is made on the pool's thread: it stays there.
                let (faces, ms) = pool.install(|| -> Result<_, BenchError> {
                    let mut detector = FaceDetector::new(cfg)?;
                    let faces = detector.detect(&img).len();
                    Ok((faces, time(w.min(1), runs, || Ok(detector.detect(&img)))?))
                })?;
                detection.push(DetectionTiming {
                    detector: kind.name(),
                    settings,
                    size: (fw, fh),
                    faces,
                    ms,
                });
            }
        }
    }

    progress("video decode and encode");
    let (video_decode_ms, video_encode_ms) = video_stages(&frame, w, r)?;

    progress("temporal module");
    let temporal_ms = {
        let cfg = TemporalConfig::cliper(clip.config.embed_dim);
        let tensors = TemporalModule::init_tensors(&cfg, 0)?;
        let module = TemporalModule::from_tensors(&tensors, None, cfg.width, &clip.device)
            .map_err(|e| BenchError::Settings(format!("temporal module: {e}")))?;
        let window = Tensor::randn(0f32, 1.0, (1, cfg.frames, cfg.width), &clip.device)?;
        time(w, r, || Ok(module.forward(&window)?.to_vec2::<f32>()?))?
    };

    progress("fast explanation map");
    let explain_fast_map_ms = {
        let one = px.narrow(0, 0, 1)?;
        let out = clip
            .vision
            .forward_with(&one.to_dtype(clip.dtype)?, false, true)?;
        let last = out
            .last_block_input
            .ok_or_else(|| BenchError::Settings("no last-block input".into()))?;
        let text = bank.text_features.to_dtype(last.dtype())?;
        time(w, r, || {
            Ok(crate::model::explain::fast_target_map(
                &clip.vision,
                &last,
                0,
                &text,
                crate::model::explain::Target::Class(3),
            )?
            .values)
        })?
    };

    progress("Grad-CAM map");
    let explain_gradcam_ms = {
        let one = px.narrow(0, 0, 1)?.to_dtype(clip.dtype)?;
        let text = bank.text_features.to_dtype(clip.dtype)?;
        // A backward pass costs several forwards: fewer runs keep the bench short.
        time(1, r.div_ceil(2), || {
            Ok(crate::model::explain::gradcam_map(
                &clip.vision,
                &one,
                &text,
                crate::model::explain::Target::Class(3),
            )?
            .values)
        })?
    };

    // The pipeline's default detector at the live settings.
    let detect_640 = detection
        .iter()
        .find(|d| d.detector == "centerface" && d.settings == "live" && d.size == (640, 480))
        .map_or(0.0, |d| d.ms.median);
    let faces_per_second = encode
        .iter()
        .map(|&(b, stat)| {
            let frame_ms = detect_640
                + b as f64 * (preprocess_ms.median + stat.median)
                + scoring_ms.median * b as f64 / max_batch as f64;
            (b, 1000.0 * b as f64 / frame_ms)
        })
        .collect();

    let agreement = if precision == Precision::F32 {
        None
    } else {
        progress("agreement with f32");
        let set = match set {
            Some(set) => set,
            None => agreement_set(opts)?,
        };
        Some(agreement(&clip, &bank, &set, reference, opts)?)
    };

    Ok(BenchReport {
        device: device::describe(&clip.device).to_string(),
        precision,
        kernel,
        cpu: cpu_summary(),
        threads: if clip.device.is_cpu() {
            rayon::current_num_threads()
        } else {
            1
        },
        weights: weights_name,
        runs: r,
        preprocess_ms_per_image: preprocess_ms,
        image_encode_ms_per_image: encode,
        scoring_ms: (max_batch, scoring_ms),
        face_detection: detection,
        temporal_ms,
        explain_fast_map_ms,
        explain_gradcam_ms,
        video_decode_ms,
        video_encode_ms,
        faces_per_second,
        peak_memory_mb: peak_memory_mb(),
        agreement,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_median_min_max() {
        let s = Stat::from_ms(vec![5.0, 1.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        let s = Stat::from_ms(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!(s.median, 2.5);
        assert_eq!(s.scaled(0.5).max, 2.0);
    }

    #[test]
    fn peak_memory_is_read() {
        let mb = peak_memory_mb().expect("VmHWM in /proc/self/status");
        assert!(mb > 1.0 && mb < 1e6, "{mb}");
    }
}
