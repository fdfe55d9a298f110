//! The detect stage: faces and tracks, on its own small thread pool.

use super::*;
use crate::vision::faces::{DetectorKind, FaceError};

pub(super) fn detect_stage(
    config: PipelineConfig,
    input: Receiver<Captured>,
    commands: Receiver<PipelineCommand>,
    out: StageQueue<Arc<DetectedFrame>>,
    events: Events,
    model_on_cpu: Arc<AtomicBool>,
) {
    // Both detectors parallelise on rayon, and so does the CPU model: on rayon's
    // global pool a detection would queue behind a whole forward pass. In
    // its own small pool the OS shares the cores between the two stages, so
    // boxes keep coming at detection speed while the model is busy.
    // And the model wins the cores when both stages want them: its
    // forward waits on its slowest thread, detection is a short stage.
    crate::parallel::give_way(config.mode.give_way());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(std::thread::available_parallelism().map_or(2, |n| n.get().min(4)))
        .thread_name(|i| format!("cliper-detect-{i}"))
        .build();
    match pool {
        Ok(pool) => {
            pool.install(move || detect_loop(config, input, commands, out, events, model_on_cpu))
        }
        Err(_) => detect_loop(config, input, commands, out, events, model_on_cpu),
    }
}

/// Live, with the model on the CPU, detection shares the cores with it: a
/// detection at every camera frame takes a good part of a core and slows
/// the model's forward, which waits on its slowest thread (the README's
/// performance section has the figures). So detection runs
/// - on every frame the model is ready to take (its queue is empty), and
/// - between those, only while it stays within [`DETECT_SHARE`] of the
///   machine's CPU time (on many cores that is every frame);
///
/// the other frames carry the last boxes over (shown and recorded, not
/// scored). Batch runs and a model on a GPU detect every frame.
struct Pacer {
    /// Detection's share of one core's time (`DETECT_SHARE` x cores).
    share: f32,
    /// When the share allows the next detection for display.
    next: Option<Instant>,
}

/// The share of the machine's CPU time that detection for display may take
/// beside a CPU model (frames the model takes are always detected): 15% of
/// one core on two cores.
pub(crate) const DETECT_SHARE: f32 = 0.075;

impl Pacer {
    fn new(cores: usize) -> Self {
        Self {
            share: DETECT_SHARE * cores.max(1) as f32,
            next: None,
        }
    }

    /// Whether to detect this frame.
    fn due(&self, now: Instant, model_waiting: bool) -> bool {
        model_waiting || self.next.is_none_or(|n| now >= n)
    }

    /// Books a detection that began at `start` and took `took`.
    fn spent(&mut self, start: Instant, took: Duration) {
        self.next = Some(start + took.div_f32(self.share));
    }
}

/// The analyzer of `config`; a CenterFace file that cannot be used falls
/// back to the built-in SeetaFace cascade, with a warning.
fn analyzer_for(config: &AnalyzerConfig, events: &Events) -> Result<FaceAnalyzer, FaceError> {
    match FaceAnalyzer::new(config.clone()) {
        Err(e) if config.detector.kind == DetectorKind::CenterFace => {
            // A CenterFace file that cannot be used: keep going on the
            // built-in SeetaFace cascade, and say so.
            let fallback = config.clone().with_detector(DetectorKind::Seeta);
            events.send(PipelineEvent::SourceWarning(
                SourceWarning::DetectorFallback(e),
            ));
            FaceAnalyzer::new(fallback)
        }
        other => other,
    }
}

fn detect_loop(
    mut config: PipelineConfig,
    input: Receiver<Captured>,
    commands: Receiver<PipelineCommand>,
    out: StageQueue<Arc<DetectedFrame>>,
    events: Events,
    model_on_cpu: Arc<AtomicBool>,
) {
    // The detector is not Send: build it on the thread that runs it.
    let mut analyzer = match analyzer_for(&config.analyzer, &events) {
        Ok(a) => a,
        Err(e) => {
            events.send(PipelineEvent::SourceFailed {
                spec: config.source.clone(),
                error: e.into(),
                frames: 0,
            });
            return;
        }
    };
    let mut tracker = Tracker::new(config.tracker);
    let mut generation = 0;
    let mut pacer = Pacer::new(std::thread::available_parallelism().map_or(2, |n| n.get()));
    // The last detected frame of this generation (its boxes carry over).
    let mut last: Option<Arc<DetectedFrame>> = None;
    for c in input.iter() {
        for cmd in commands.try_iter() {
            if let PipelineCommand::SetDetector(kind) = cmd {
                let next = config.analyzer.clone().with_detector(kind);
                match analyzer_for(&next, &events) {
                    Ok(a) => {
                        analyzer = a;
                        config.analyzer = next;
                        tracker.reset();
                    }
                    Err(e) => {
                        events.send(PipelineEvent::SourceWarning(SourceWarning::Detector(e)));
                    }
                }
            }
        }
        if c.generation != generation {
            if config.keep_open {
                // Each file of a batch is its own session: ids from 1.
                tracker = Tracker::new(config.tracker);
            } else {
                tracker.reset();
            }
            generation = c.generation;
            last = None;
        }
        let start = Instant::now();
        let paced = config.mode == RunMode::Live && model_on_cpu.load(Ordering::Relaxed);
        if let Some(prev) = last.as_ref().filter(|_| paced) {
            if !pacer.due(start, out.is_empty()) {
                let held = Arc::new(DetectedFrame {
                    seq: c.seq,
                    generation: c.generation,
                    index: c.frame.index,
                    t: c.frame.t,
                    image: c.frame.image,
                    faces: prev.faces.clone(),
                    captured: c.captured,
                    decode_ms: c.decode_ms,
                    detect_ms: prev.detect_ms,
                    capture_fps: c.capture_fps,
                    dropped: c.dropped,
                    detected: false,
                });
                if config.emit_frames && !events.send(PipelineEvent::Frame(held)) {
                    return;
                }
                continue;
            }
        }
        let boxes = analyzer.candidates(&c.frame.image);
        let faces = tracker.update_scored(&boxes);
        pacer.spent(start, start.elapsed());
        let detected = Arc::new(DetectedFrame {
            seq: c.seq,
            generation: c.generation,
            index: c.frame.index,
            t: c.frame.t,
            image: c.frame.image,
            faces,
            captured: c.captured,
            decode_ms: c.decode_ms,
            detect_ms: start.elapsed().as_secs_f32() * 1000.0,
            capture_fps: c.capture_fps,
            dropped: c.dropped,
            detected: true,
        });
        last = Some(detected.clone());
        if config.emit_frames && !events.send(PipelineEvent::Frame(detected.clone())) {
            return;
        }
        if !out.push(detected).0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_for_display_keeps_to_its_share_and_the_model_is_never_kept_waiting() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut pacer = Pacer::new(2);
        assert!(pacer.due(t0, false), "the first frame is detected");
        pacer.spent(t0, Duration::from_millis(12));
        // 12 ms at 15% of a core (two cores): the next detection for
        // display at 80 ms.
        assert!(!pacer.due(ms(40), false));
        assert!(!pacer.due(ms(79), false));
        assert!(pacer.due(ms(81), false));
        // A frame the model is ready to take is detected at once.
        assert!(pacer.due(ms(1), true));
        // On 16 cores the share is 1.2 cores: every frame of a 25 fps
        // camera is detected.
        let mut many = Pacer::new(16);
        many.spent(t0, Duration::from_millis(12));
        assert!(many.due(ms(40), false));
    }
}
