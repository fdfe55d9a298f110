//! The video thread: annotates each frame and encodes it (and the raw
//! video when asked), counting frames written and dropped.

use super::super::video::{annotate, fit, video_size};
use super::super::RAW_VIDEO_FILE;
use super::*;
use crate::vision::video::VideoWriter;

pub(super) fn video_loop(
    rx: Receiver<VideoFrame>,
    dir: PathBuf,
    opts: SessionOptions,
    shared: Arc<Shared>,
    data: Sender<DataMsg>,
) {
    let mut annotated: Option<VideoWriter> = None;
    let mut raw: Option<VideoWriter> = None;
    let mut start_t = 0.0;
    let mut last_t = f64::NEG_INFINITY;
    for f in rx.iter() {
        if shared.failed.load(Ordering::SeqCst) {
            continue; // drain: the caller stops soon
        }
        // Frame times must increase; a late frame is dropped.
        if f.t <= last_t {
            shared.video_dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        last_t = f.t;
        let result = (|| -> Result<(), SessionError> {
            if annotated.is_none() {
                let size = video_size(f.image.width(), f.image.height());
                let w = VideoWriter::create(&dir.join(VIDEO_FILE), size, f.fps)?;
                if opts.raw_video {
                    raw = Some(VideoWriter::create(&dir.join(RAW_VIDEO_FILE), size, f.fps)?);
                }
                start_t = f.t;
                let _ = data.send(DataMsg::Meta(Box::new(MetaUpdate::Video(VideoMeta {
                    codec: "h264".into(),
                    encoder: w.encoder_name().to_string(),
                    container: "mp4, fragmented (a fragment every 0.5 s)".into(),
                    width: size.0,
                    height: size.1,
                    fps: f.fps,
                    start_t: f.t,
                    raw: opts.raw_video,
                }))));
                annotated = Some(w);
            }
            let mut img = (*f.image).clone();
            annotate(&mut img, &f.marks, f.t);
            if let Some(w) = annotated.as_mut() {
                let size = w.size();
                w.push(&fit(&img, size), f.t - start_t)?;
            }
            if let Some(w) = raw.as_mut() {
                let size = w.size();
                w.push(&fit(&f.image, size), f.t - start_t)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                shared.video_frames.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => shared.fail(&e),
        }
    }
    for w in [annotated, raw].into_iter().flatten() {
        if let Err(e) = w.finish() {
            shared.fail(&e.into());
        }
    }
}
