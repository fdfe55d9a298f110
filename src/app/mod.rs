//! The live window (eframe/egui, glow renderer): `cliper live`.
//!
//! The app owns a [`Pipeline`](crate::pipeline::worker::Pipeline) and folds
//! its events into a [`store::Store`]; each panel is its own module and
//! draws from the store. Panels never act directly: they return
//! [`Action`]s that the app applies after drawing, so `ui()` stays short and
//! nothing slow ever runs on the UI thread (model loading, inference, text
//! encoding and downloads all live on background threads).

mod controls;
mod descriptors;
mod exit;
mod first_run;
mod live;
mod palette;
mod recording;
pub mod replay;
mod scores;
pub mod settings;
mod status;
pub mod store;
mod video;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::model::setup::ModelSpec;
use crate::vision::source::SourceSpec;

pub use live::CliperApp;

/// What `cliper live` was asked for on the command line.
#[derive(Clone, Debug, Default)]
pub struct LiveOptions {
    /// `--source` / `--camera`; `None`: the last source used, else the first
    /// camera, else the demo.
    pub source: Option<SourceSpec>,
    /// Weights and device. Its bank is used only when `bank_given`.
    pub model: ModelSpec,
    /// Whether `--descriptors` / `--prompts` was given (it then overrides the
    /// saved choice).
    pub bank_given: bool,
    /// Close the window after this many seconds (demos, tests, benchmarks);
    /// the session's speed figures are printed on stderr.
    pub exit_after: Option<f64>,
    /// Save a PNG of the window just before closing (with `exit_after`).
    pub screenshot: Option<PathBuf>,
    /// `--record DIR`: start recording into this folder at once.
    pub record: Option<PathBuf>,
    /// `--record-raw`: recordings also keep the video without annotations.
    pub record_raw: bool,
    /// `--dynamic`: start in dynamic mode (otherwise the saved choice).
    pub dynamic: bool,
    /// `--explain TARGET`: start with this descriptor's or class's map drawn.
    pub explain: Option<crate::model::explain::Target>,
    /// `--map`: which map is drawn (exact ones need a paused frame).
    pub map: crate::model::explain::Method,
    /// `--grid`: occlusion cells per side.
    pub grid: usize,
    /// `--pause-after SECONDS`: pause on the newest scored frame then.
    pub pause_after: Option<f64>,
    /// `--detector`: overrides the saved choice.
    pub detector: Option<crate::vision::faces::DetectorKind>,
    /// `--detector-model FILE`: a CenterFace ONNX file.
    pub detector_model: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot open the window: {0}. A display is needed (on Linux, DISPLAY or WAYLAND_DISPLAY with OpenGL); without one, use `cliper run --source SRC` or start under `xvfb-run -a`")]
    Window(String),
    #[error(transparent)]
    Screenshot(#[from] exit::ScreenshotError),
    #[error("--exit-after {0} is out of range: give a number of seconds above 0")]
    ExitAfter(f64),
}

/// Something a panel asks the app to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Open another source (or the same again: replay).
    SetSource(SourceSpec),
    SetBank(settings::BankChoice),
    SetProbe(String),
    SelectFace(u64),
    /// First-run screen: download the weights.
    Download,
    /// First-run screen: look for weights again and start if found.
    RecheckWeights,
    RefreshCameras,
    /// Start or stop recording the session.
    ToggleRecording,
    /// Open a recorded session in the replay window.
    OpenSession(PathBuf),
    /// Draw this descriptor's or class's map over the faces (`None`: stop).
    Explain(Option<crate::model::explain::Target>),
    /// Freeze the window on the current frame (`true`) or go back to live.
    SetPaused(bool),
    /// Find faces with this detector.
    SetDetector(crate::vision::faces::DetectorKind),
}

/// Speed figures of a session, printed when it closes.
#[derive(Clone, Debug, Default)]
pub struct SessionReport {
    pub ui_fps: f32,
    pub ui_ms: f32,
    pub capture_fps: f32,
    pub inference_fps: f32,
    pub capture_to_screen_ms: Option<f32>,
    pub score_lag_ms: Option<f32>,
    pub decode_ms: f32,
    pub detect_ms: f32,
    /// Share of recent frames whose faces were detected (pacing, live).
    pub detected_share: Option<f32>,
    /// Cropping the faces and making the model's input from them.
    pub crop_ms: f32,
    /// The vision tower's forward alone, as `cliper bench` times it.
    pub encode_ms: f32,
    pub score_ms: f32,
    pub frames_shown: u64,
    pub scores: u64,
    /// The exact map on screen at the end, if paused with one:
    /// (method, faces mapped, seconds it took).
    pub exact_map: Option<(&'static str, usize, f32)>,
}

impl std::fmt::Display for SessionReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<f32>| v.map_or("n/a".to_string(), |v| format!("{v:.0} ms"));
        write!(
            f,
            "UI {:.0} fps (ui() {:.1} ms), capture {:.1} fps, inference {:.1} fps, capture-to-screen median {}, score lag median {} (decode {:.1} ms, detect median {:.0} ms{}, crop median {:.1} ms, encode median {:.0} ms, score {:.1} ms), {} frames shown, {} scored",
            self.ui_fps,
            self.ui_ms,
            self.capture_fps,
            self.inference_fps,
            ms(self.capture_to_screen_ms),
            ms(self.score_lag_ms),
            self.decode_ms,
            self.detect_ms,
            match self.detected_share {
                Some(s) if s < 0.995 => format!(" on {:.0}% of frames", s * 100.0),
                _ => String::new(),
            },
            self.crop_ms,
            self.encode_ms,
            self.score_ms,
            self.frames_shown,
            self.scores
        )?;
        if let Some((method, faces, secs)) = self.exact_map {
            write!(
                f,
                ", paused with the {method} map of {faces} face(s) ({secs:.1} s)"
            )?;
        }
        Ok(())
    }
}

/// Opens the window and runs until it is closed.
/// Set when a stop signal arrived; the app then closes its window.
pub(crate) static STOP_REQUESTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);
/// The running app's context, for the signal thread to wake it.
pub(crate) static APP_CONTEXT: std::sync::OnceLock<eframe::egui::Context> =
    std::sync::OnceLock::new();

pub fn run_live(opts: LiveOptions) -> Result<SessionReport, AppError> {
    if let Some(s) = opts.exit_after {
        if !(s.is_finite() && s > 0.0) {
            return Err(AppError::ExitAfter(s));
        }
    }
    if let Some(p) = &opts.screenshot {
        exit::check_writable(p).map_err(AppError::Screenshot)?;
    }
    let outcome: Arc<Mutex<exit::Outcome>> = Arc::default();
    let native = eframe::NativeOptions {
        renderer: eframe::Renderer::Glow,
        viewport: eframe::egui::ViewportBuilder::default()
            .with_title("cliper: live facial expressions")
            .with_app_id("cliper")
            .with_inner_size([1360.0, 860.0])
            .with_min_inner_size([960.0, 620.0]),
        dithering: DITHERING,
        ..Default::default()
    };
    // SIGTERM, SIGINT and SIGHUP close the window the way its close button
    // does, so that a recording is finalised; a second one quits at once.
    let _ = crate::stop::listen(|_| {
        STOP_REQUESTED.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(ctx) = APP_CONTEXT.get() {
            ctx.request_repaint();
        }
    });
    let shared = outcome.clone();
    // The window (and a software renderer's threads it starts) steps back
    // for the model, whose pool starts first at normal priority. Not to
    // `SCHED_IDLE`: under Xvfb the window then fell to 9 fps.
    crate::parallel::start_model_pool();
    crate::parallel::give_way(crate::parallel::GiveWay::Nice);
    keep_freed_heap();
    eframe::run_native(
        "cliper",
        native,
        Box::new(move |cc| Ok(Box::new(CliperApp::new(cc, opts, shared)))),
    )
    .map_err(|e| AppError::Window(e.to_string().trim_end_matches('.').to_string()))?;
    let outcome = outcome.lock().map(|o| o.clone()).unwrap_or_default();
    if let Some(e) = outcome.screenshot_error {
        return Err(AppError::Screenshot(e));
    }
    Ok(outcome.report.unwrap_or_default())
}

/// egui's dither of each pixel's colour, off: it spreads the rounding of
/// smooth gradients to 8 bits, which this window has none of (flat panels,
/// text, plot lines, video frames that are 8-bit already), and it is a
/// noise function per pixel in the fragment shader. Under a software
/// renderer that was a seventh of its time: llvmpipe 18.1-18.8% -> 15.8-16.9%
/// of a core, `cliper live --source demo` under Xvfb at 1280x800, two runs
/// each (2-core EPYC, `tools/thread_cpu.py`).
pub(crate) const DITHERING: bool = false;

/// The largest block glibc's malloc serves from its heap rather than from
/// a fresh mapping, and how much free memory its heap keeps before giving
/// it back: 32 MB (glibc's ceiling for the first) and 64 MB.
const HEAP_MMAP_THRESHOLD: i32 = 32 << 20;
const HEAP_TRIM_THRESHOLD: i32 = 64 << 20;

/// Keeps the memory OpenGL frees in glibc's heap for its next frame.
///
/// Mesa allocates through glibc's malloc, not our allocator. A software
/// renderer (llvmpipe) allocates and frees megabytes a frame: vertex
/// buffers, a frame's copy for the display. glibc hands such blocks back to
/// the kernel on free, and the next frame faults them in again page by page,
/// zeroed. Under Xvfb at 1280x800 that was 27,000 page faults a second on
/// the window's thread, and half its CPU time: 11.4% of a core against
/// 5.8% with these thresholds, 490 faults a second (2-core EPYC,
/// `tools/thread_cpu.py`). The heap keeps at most the window's working set.
pub(crate) fn keep_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets two of glibc's malloc parameters; it is
    // called before the window's threads allocate, and is thread-safe.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD);
    }
}

/// The renderer's name where OpenGL rasterises on the CPU (Mesa's
/// llvmpipe or softpipe, SwiftShader: a machine without a GPU driver, a
/// virtual display), `None` on a GPU.
pub(crate) fn software_renderer(gl: &eframe::glow::Context) -> Option<String> {
    use eframe::glow::HasContext;
    // SAFETY: RENDERER is a string query every OpenGL answers, and eframe
    // makes its context current on this thread before it creates the app.
    let name = unsafe { gl.get_parameter_string(eframe::glow::RENDERER) };
    let lower = name.to_ascii_lowercase();
    ["llvmpipe", "softpipe", "swiftshader", "software rasterizer"]
        .iter()
        .any(|s| lower.contains(s))
        .then_some(name)
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// Set in the child process that runs the heap test alone.
    const HEAP_CHILD: &str = "CLIPER_TEST_HEAP_CHILD";

    /// Minor page faults of the calling thread so far.
    fn faults() -> i64 {
        // SAFETY: getrusage writes one rusage struct we own.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
            usage.ru_minflt
        }
    }

    /// In a fresh process (glibc's malloc as it starts): a 24 MB block
    /// freed and taken again three times, as a software renderer does each
    /// frame, is faulted in once. With glibc's defaults the second round
    /// faults all 6,144 of its pages again.
    #[test]
    fn memory_the_renderer_frees_is_kept_for_its_next_frame() {
        if std::env::var_os(HEAP_CHILD).is_none() {
            let exe = std::env::current_exe().expect("the test binary's path");
            let out = std::process::Command::new(exe)
                .args([
                    "app::tests::memory_the_renderer_frees_is_kept_for_its_next_frame",
                    "--exact",
                    "--nocapture",
                ])
                .env(HEAP_CHILD, "1")
                .output()
                .expect("the test binary runs again");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{stdout}\n{stderr}");
            assert!(
                stdout.contains("1 passed"),
                "the child ran no test:\n{stdout}"
            );
            return;
        }
        super::keep_freed_heap();
        const SIZE: usize = 24 << 20;
        let pages = (SIZE / 4096) as i64;
        let mut per_round = Vec::new();
        for _ in 0..3 {
            // SAFETY: a block of SIZE bytes, written within its bounds and
            // freed once.
            unsafe {
                let p = libc::malloc(SIZE) as *mut u8;
                assert!(!p.is_null());
                let before = faults();
                for i in (0..SIZE).step_by(4096) {
                    p.add(i).write_volatile(1);
                }
                per_round.push(faults() - before);
                libc::free(p.cast());
            }
        }
        eprintln!("page faults per round of {pages} pages: {per_round:?}");
        assert!(
            per_round[1..].iter().all(|&f| f < pages / 20),
            "freed memory went back to the kernel: {per_round:?} faults for {pages} pages"
        );
    }
}
