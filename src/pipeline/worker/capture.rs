//! The capture stage: reads the source, paces it, answers source commands.

use super::*;

pub(super) fn capture_stage(
    config: PipelineConfig,
    out: StageQueue<Captured>,
    commands: Receiver<PipelineCommand>,
    events: Events,
) {
    crate::parallel::give_way(config.mode.give_way());
    let mut current = config.source.clone();
    let mut source: Option<Box<dyn FrameSource>> = None;
    let mut generation = 0u64;
    let mut seq = 0u64;
    let mut dropped = 0u64;
    let mut meter = RateMeter::default();
    // Real-time pacing of file sources: wall time of the first frame and its `t`.
    let mut clock: Option<(Instant, f64)> = None;
    let mut frames_this_source = 0u64;
    let mut control = Control {
        spec: Some(config.source.clone()),
        paused: false,
    };
    // Batch runs end with their source, unless told to wait for the next.
    let finish_at_end = config.mode == RunMode::Batch && !config.keep_open;
    loop {
        if let Some(s) = control.spec.take() {
            control.paused = false;
            source = None;
            generation += 1;
            clock = None;
            frames_this_source = 0;
            current = s.clone();
            match shielded(|| s.open()) {
                Ok(src) => {
                    let info = SourceInfo {
                        spec: s.clone(),
                        generation,
                        name: src.name(),
                        len: src.frame_count(),
                        fps: src.fps(),
                        live: src.is_live(),
                    };
                    source = Some(src);
                    if !events.send(PipelineEvent::SourceOpened(info)) {
                        return;
                    }
                }
                Err(e) => {
                    let failed = PipelineEvent::SourceFailed {
                        spec: s,
                        error: e.into(),
                        frames: 0,
                    };
                    if !events.send(failed) || finish_at_end {
                        return;
                    }
                }
            }
        }
        let Some(src) = source.as_mut() else {
            // Nothing to read: wait for a new source, or the end.
            if !control.wait(&commands) {
                return;
            }
            continue;
        };
        // Commands arrive between frames.
        if !control.take_waiting(&commands) {
            return;
        }
        if control.spec.is_some() {
            continue;
        }
        if control.paused && !src.is_live() && config.mode == RunMode::Live {
            // A file holds its frame until resumed; its clock restarts then.
            if !control.wait(&commands) {
                return;
            }
            clock = None;
            continue;
        }
        // In batch runs a still image is one frame unless told otherwise.
        let limit = config.max_frames.or_else(|| {
            (config.mode == RunMode::Batch && matches!(current, SourceSpec::Still { .. }))
                .then_some(1)
        });
        if limit.is_some_and(|m| frames_this_source >= m) {
            // Batch: done. Live: hold the last picture until told otherwise.
            if finish_at_end {
                return;
            }
            source = None;
            if config.mode == RunMode::Batch {
                let ended = PipelineEvent::SourceEnded {
                    generation,
                    frames: frames_this_source,
                };
                if !events.send(ended) {
                    return;
                }
            }
            continue;
        }
        let next = shielded(|| src.next_frame());
        for w in src.take_warnings() {
            if !events.send(PipelineEvent::SourceWarning(SourceWarning::Source(w))) {
                return;
            }
        }
        let frame = match next {
            Ok(Some(f)) => f,
            Ok(None) => {
                source = None;
                let ended = PipelineEvent::SourceEnded {
                    generation,
                    frames: frames_this_source,
                };
                if !events.send(ended) || finish_at_end {
                    return;
                }
                continue;
            }
            Err(e) if e.is_recoverable() => {
                if !events.send(PipelineEvent::SourceWarning(SourceWarning::SkippedFrame(e))) {
                    return;
                }
                continue;
            }
            Err(e) => {
                source = None;
                let failed = PipelineEvent::SourceFailed {
                    spec: current.clone(),
                    error: e.into(),
                    frames: frames_this_source,
                };
                if !events.send(failed) || finish_at_end {
                    return;
                }
                continue;
            }
        };
        if config.mode == RunMode::Live && !src.is_live() {
            // Play files at their own pace; a command cuts the wait short.
            let (start, t0) = *clock.get_or_insert((Instant::now(), frame.t));
            // Capped: a frame time of 1e30 s (a still at --fps 1e-30) must
            // not overflow the clock.
            let wait = Duration::try_from_secs_f64((frame.t - t0).clamp(0.0, 86_400.0))
                .unwrap_or_default();
            let due = start.checked_add(wait).unwrap_or(start);
            let now = Instant::now();
            if due > now {
                while Instant::now() < due && control.spec.is_none() && !control.paused {
                    if !control.wait_until(&commands, due) {
                        return;
                    }
                }
                // Paused while waiting: this frame is shown on resume.
                if control.paused && control.spec.is_none() {
                    while control.paused && control.spec.is_none() {
                        if !control.wait(&commands) {
                            return;
                        }
                    }
                    clock = Some((Instant::now(), frame.t));
                }
                if control.spec.is_some() {
                    continue;
                }
            } else if now.duration_since(due) > Duration::from_millis(500) {
                // Fell behind (a slow decode, a suspended laptop): re-anchor
                // instead of racing to catch up.
                clock = Some((now, frame.t));
            }
        }
        let capture_fps = meter.tick();
        frames_this_source += 1;
        let item = Captured {
            frame,
            seq,
            generation,
            captured: Instant::now(),
            capture_fps,
            decode_ms: src.decode_ms(),
            dropped,
        };
        seq += 1;
        let (open, d) = out.push(item);
        dropped += d;
        if !open {
            return;
        }
    }
}

/// The commands the capture stage obeys: another source, pause.
struct Control {
    /// A source to open before the next frame.
    spec: Option<SourceSpec>,
    paused: bool,
}

impl Control {
    fn apply(&mut self, cmd: PipelineCommand) {
        match cmd {
            PipelineCommand::SetSource(s) => self.spec = Some(s),
            PipelineCommand::SetPaused(p) => self.paused = p,
            _ => {}
        }
    }

    /// Waits for a command; false when the owner is gone.
    fn wait(&mut self, commands: &Receiver<PipelineCommand>) -> bool {
        match commands.recv() {
            Ok(cmd) => {
                self.apply(cmd);
                true
            }
            Err(_) => false,
        }
    }

    /// Takes the commands already waiting; false when the owner is gone.
    fn take_waiting(&mut self, commands: &Receiver<PipelineCommand>) -> bool {
        loop {
            match commands.try_recv() {
                Ok(cmd) => self.apply(cmd),
                Err(crossbeam_channel::TryRecvError::Empty) => return true,
                Err(crossbeam_channel::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Waits for a command until `deadline`; false when the owner is gone.
    fn wait_until(&mut self, commands: &Receiver<PipelineCommand>, deadline: Instant) -> bool {
        match commands.recv_deadline(deadline) {
            Ok(cmd) => {
                self.apply(cmd);
                true
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => true,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => false,
        }
    }
}

/// Runs a source call, turning a panic in a third-party decoder or camera
/// driver binding into an error: a broken file or device must end the
/// source, not the capture thread.
fn shielded<T>(f: impl FnOnce() -> Result<T, SourceError>) -> Result<T, SourceError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".into());
        Err(SourceError::Invalid(format!(
            "the source failed inside its decoder or driver: {what}"
        )))
    })
}
