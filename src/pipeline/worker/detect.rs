//! The detect stage: faces and tracks, on its own small thread pool.

use super::*;
use crate::vision::faces::{DetectorKind, FaceError};

pub(super) fn detect_stage(
    config: PipelineConfig,
    input: Receiver<Captured>,
    commands: Receiver<PipelineCommand>,
    out: StageQueue<Arc<DetectedFrame>>,
    events: Events,
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
        Ok(pool) => pool.install(move || detect_loop(config, input, commands, out, events)),
        Err(_) => detect_loop(config, input, commands, out, events),
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
        }
        let start = Instant::now();
        let boxes = analyzer.candidates(&c.frame.image);
        let faces = tracker.update_scored(&boxes);
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
        });
        if config.emit_frames && !events.send(PipelineEvent::Frame(detected.clone())) {
            return;
        }
        if !out.push(detected).0 {
            return;
        }
    }
}
