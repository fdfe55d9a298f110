//! The detect stage: faces and tracks, on its own small thread pool.

use super::*;

pub(super) fn detect_stage(
    config: PipelineConfig,
    input: Receiver<Captured>,
    out: StageQueue<Arc<DetectedFrame>>,
    events: Events,
) {
    // rustface parallelises on rayon, and so does the CPU model: on rayon's
    // global pool a detection would queue behind a whole forward pass. In
    // its own small pool the OS shares the cores between the two stages, so
    // boxes keep coming at detection speed while the model is busy.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(std::thread::available_parallelism().map_or(2, |n| n.get().min(4)))
        .thread_name(|i| format!("cliper-detect-{i}"))
        .build();
    match pool {
        Ok(pool) => pool.install(move || detect_loop(config, input, out, events)),
        Err(_) => detect_loop(config, input, out, events),
    }
}

fn detect_loop(
    config: PipelineConfig,
    input: Receiver<Captured>,
    out: StageQueue<Arc<DetectedFrame>>,
    events: Events,
) {
    // The detector is not Send: build it on the thread that runs it.
    let mut analyzer = match FaceAnalyzer::new(config.analyzer.clone()) {
        Ok(a) => a,
        Err(e) => {
            events.send(PipelineEvent::SourceFailed {
                spec: config.source.clone(),
                error: e.to_string(),
                frames: 0,
            });
            return;
        }
    };
    let mut tracker = Tracker::new(config.tracker);
    let mut generation = 0;
    for c in input.iter() {
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
        let boxes = analyzer.find_faces(&c.frame.image);
        let faces = tracker.update(&boxes);
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
