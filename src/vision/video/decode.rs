//! Decoding: [`VideoReader`] (sequential, with accurate seeking) and
//! [`IndexedVideo`] (random access by frame number).

use std::path::{Path, PathBuf};

use ffmpeg::media::Type as Media;
use ffmpeg_next as ffmpeg;
use image::RgbImage;

use super::rgb::{display_rotation, RgbConverter};
use super::{init, VideoError};

/// What is known of a video before decoding it.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoInfo {
    /// Frame size as shown: after the display matrix's rotation.
    pub width: u32,
    pub height: u32,
    /// Clockwise rotation applied to the stored pictures: 0, 90, 180 or 270.
    pub rotation: u32,
    /// FFmpeg's codec name (`h264`, `hevc`, `vp9`, `av1`, `mjpeg`, ...).
    pub codec: String,
    /// FFmpeg's container name (`mov,mp4,m4a,3gp,3g2,mj2`, `matroska,webm`, ...).
    pub container: String,
    /// Frames in the stream: the container's count when it has one
    /// (`frame_count_exact`), otherwise duration x frame rate.
    pub frame_count: Option<u64>,
    pub frame_count_exact: bool,
    /// Seconds, when the container knows.
    pub duration: Option<f64>,
    /// The average frame rate (nominal; frame times are the timestamps).
    pub fps: f64,
    pub has_audio: bool,
}

/// One decoded picture.
#[derive(Clone, Debug)]
pub struct DecodedFrame {
    /// RGB, upright.
    pub image: RgbImage,
    /// Seconds from the stream's start (its first timestamp).
    pub t: f64,
}

/// Frames of a seek target closer than this count as the target (the
/// rounding of a timestamp to the stream's time base).
const SEEK_TOLERANCE_S: f64 = 1e-3;

/// A video file, decoded frame by frame. Memory does not grow with the
/// file's length: nothing is kept but FFmpeg's decoder state and one picture.
pub struct VideoReader {
    path: PathBuf,
    input: ffmpeg::format::context::Input,
    stream: usize,
    decoder: ffmpeg::decoder::Video,
    time_base: f64,
    /// The stream's first timestamp, in its time base: frame times count from it.
    start_pts: Option<i64>,
    info: VideoInfo,
    to_rgb: RgbConverter,
    decoded: ffmpeg::frame::Video,
    eof_sent: bool,
    done: bool,
    /// Only frames at or after this time are returned (after a seek).
    seek_target: Option<f64>,
    last_t: Option<f64>,
    frames_out: u64,
    damaged_packets: u64,
    /// Packets an edit list marks to decode but not show (a file cut
    /// without re-encoding keeps the frames before its first shown one).
    discarded_packets: u64,
    read_error: Option<String>,
    warnings: Vec<String>,
    damage_warned: bool,
    /// Read from the start without seeking: an early end can be told.
    sequential: bool,
}

fn ff_err(e: ffmpeg::Error) -> String {
    e.to_string()
}

impl VideoReader {
    /// Opens the best video stream of `path` (audio and cover art are ignored).
    pub fn open(path: &Path) -> Result<Self, VideoError> {
        init();
        if !path.exists() {
            return Err(VideoError::NotFound(path.to_path_buf()));
        }
        let open_err = |reason: String| VideoError::Open {
            path: path.to_path_buf(),
            reason,
        };
        if std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) == 0 {
            return Err(open_err("the file is empty".into()));
        }
        let input = ffmpeg::format::input(&path).map_err(|e| open_err(ff_err(e)))?;
        let container = input.format().name().to_string();
        let mut found = Vec::new();
        let mut has_audio = false;
        let mut candidates = Vec::new();
        for s in input.streams() {
            let params = s.parameters();
            let kind = params.medium();
            if kind == Media::Audio {
                has_audio = true;
            }
            if kind == Media::Video
                && !s
                    .disposition()
                    .contains(ffmpeg::format::stream::Disposition::ATTACHED_PIC)
            {
                candidates.push(s.index());
            } else {
                found.push(format!("{:?} {}", kind, params.id().name()).to_lowercase());
            }
        }
        let best = input.streams().best(Media::Video).map(|s| s.index());
        let stream_index = match best.filter(|b| candidates.contains(b)) {
            Some(b) => b,
            None => *candidates
                .first()
                .ok_or_else(|| VideoError::NoVideoStream {
                    path: path.to_path_buf(),
                    found: if found.is_empty() {
                        String::new()
                    } else {
                        format!(" (it holds: {})", found.join(", "))
                    },
                })?,
        };
        let stream = input
            .stream(stream_index)
            .ok_or_else(|| open_err("the video stream vanished".into()))?;
        let params = stream.parameters();
        let codec_id = params.id();
        let codec = codec_id.name().to_string();
        if ffmpeg::decoder::find(codec_id).is_none() {
            return Err(VideoError::NoDecoder {
                path: path.to_path_buf(),
                codec,
                version: super::ffmpeg_version(),
            });
        }
        let tb = stream.time_base();
        let time_base = if tb.denominator() != 0 && tb.numerator() != 0 {
            f64::from(tb.numerator()) / f64::from(tb.denominator())
        } else {
            1.0 / 90_000.0
        };
        let mut ctx = ffmpeg::codec::context::Context::from_parameters(params)
            .map_err(|e| open_err(format!("the {codec} stream's parameters: {}", ff_err(e))))?;
        // FFmpeg's frame and slice threads; a few are plenty for one video
        // beside the model.
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(1, 4);
        // SAFETY: `ctx` owns a valid AVCodecContext that is not opened yet;
        // thread_count may be set before avcodec_open2.
        unsafe {
            (*ctx.as_mut_ptr()).thread_count = threads as i32;
        }
        let mut decoder = ctx.decoder();
        decoder.set_packet_time_base(tb);
        let decoder = decoder
            .video()
            .map_err(|e| open_err(format!("cannot start the {codec} decoder: {}", ff_err(e))))?;
        let rotation = display_rotation(&stream);
        let (sw, sh) = (decoder.width(), decoder.height());
        let (width, height) = if rotation % 180 == 90 {
            (sh, sw)
        } else {
            (sw, sh)
        };
        let rate = |r: ffmpeg::Rational| {
            (r.numerator() > 0 && r.denominator() > 0)
                .then(|| f64::from(r.numerator()) / f64::from(r.denominator()))
                .filter(|f| f.is_finite() && *f > 0.0 && *f <= 1000.0)
        };
        let fps = rate(stream.avg_frame_rate())
            .or_else(|| rate(stream.rate()))
            .unwrap_or(25.0);
        let duration = if stream.duration() > 0 {
            Some(stream.duration() as f64 * time_base)
        } else if input.duration() > 0 {
            Some(input.duration() as f64 / f64::from(ffmpeg::ffi::AV_TIME_BASE))
        } else {
            None
        };
        let (frame_count, frame_count_exact) = if stream.frames() > 0 {
            (Some(stream.frames() as u64), true)
        } else {
            (duration.map(|d| (d * fps).round().max(1.0) as u64), false)
        };
        let start = stream.start_time();
        let start_pts = (start != ffmpeg::ffi::AV_NOPTS_VALUE).then_some(start);
        let info = VideoInfo {
            width,
            height,
            rotation,
            codec,
            container,
            frame_count,
            frame_count_exact,
            duration,
            fps,
            has_audio,
        };
        if width == 0 || height == 0 {
            return Err(open_err("the video stream has no frame size".into()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            input,
            stream: stream_index,
            decoder,
            time_base,
            start_pts,
            info,
            to_rgb: RgbConverter::default(),
            decoded: ffmpeg::frame::Video::empty(),
            eof_sent: false,
            done: false,
            seek_target: None,
            last_t: None,
            frames_out: 0,
            damaged_packets: 0,
            discarded_packets: 0,
            read_error: None,
            warnings: Vec::new(),
            damage_warned: false,
            sequential: true,
        })
    }

    pub fn info(&self) -> &VideoInfo {
        &self.info
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Packets the decoder rejected so far (skipped).
    pub fn damaged_packets(&self) -> u64 {
        self.damaged_packets
    }

    /// Frames returned since opening (or since the last seek).
    pub fn frames_read(&self) -> u64 {
        self.frames_out
    }

    /// Warnings noticed since the last call: damaged packets (once), an
    /// early end.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// The next frame in presentation order; `Ok(None)` at the end.
    pub fn next_frame(&mut self) -> Result<Option<DecodedFrame>, VideoError> {
        loop {
            if self.done {
                return self.end();
            }
            match self.decoder.receive_frame(&mut self.decoded) {
                Ok(()) => {
                    let t = self.frame_time();
                    if let Some(target) = self.seek_target {
                        if t < target - SEEK_TOLERANCE_S {
                            continue;
                        }
                        self.seek_target = None;
                    }
                    self.last_t = Some(t);
                    let image = self.convert_frame()?;
                    self.frames_out += 1;
                    return Ok(Some(DecodedFrame { image, t }));
                }
                Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::error::EAGAIN => {
                    self.feed()?;
                }
                Err(ffmpeg::Error::Eof) => {
                    self.done = true;
                    self.note_end();
                    return self.end();
                }
                Err(e) => self.damaged(&e),
            }
        }
    }

    /// Sends the next packet of the video stream to the decoder (or the end).
    fn feed(&mut self) -> Result<(), VideoError> {
        if self.eof_sent {
            // Draining: receive_frame answers EAGAIN only with frame
            // threads mid-flush; the next call gets the frame or EOF.
            return Ok(());
        }
        loop {
            // A fresh packet per read: av_read_frame does not release what a
            // packet held, so reusing one would leak every packet skipped.
            let mut packet = ffmpeg::Packet::empty();
            match packet.read(&mut self.input) {
                Ok(()) => {
                    if packet.stream() != self.stream {
                        continue;
                    }
                    if discarded(&packet) {
                        self.discarded_packets += 1;
                    }
                    if let Err(e) = self.decoder.send_packet(&packet) {
                        self.damaged(&e);
                        continue;
                    }
                    return Ok(());
                }
                Err(ffmpeg::Error::Eof) => break,
                Err(e) => {
                    // A read error mid-file (cut short, an I/O error): what
                    // was read so far stands.
                    self.read_error = Some(ff_err(e));
                    break;
                }
            }
        }
        self.eof_sent = true;
        if let Err(e) = self.decoder.send_eof() {
            // A decoder left in error by the last (cut) packet: what it
            // gave so far stands.
            self.damaged(&e);
            self.done = true;
            self.note_end();
        }
        Ok(())
    }

    /// The end of the stream: an error when not a single frame came out.
    fn end(&mut self) -> Result<Option<DecodedFrame>, VideoError> {
        if self.sequential && self.frames_out == 0 {
            let why = self.take_warnings().join("; ");
            return Err(VideoError::read(
                &self.path,
                if why.is_empty() {
                    "no frame could be decoded".to_string()
                } else {
                    format!("no frame could be decoded ({why})")
                },
            ));
        }
        Ok(None)
    }

    fn damaged(&mut self, e: &ffmpeg::Error) {
        self.damaged_packets += 1;
        if !self.damage_warned {
            self.damage_warned = true;
            self.warnings.push(format!(
                "{}: a damaged packet was skipped ({e}); further damage is counted, not repeated",
                self.name()
            ));
        }
    }

    fn note_end(&mut self) {
        let read = self.frames_out;
        if !self.sequential {
            return;
        }
        let count = self
            .info
            .frame_count
            .filter(|_| self.info.frame_count_exact);
        let of = count.map_or(String::new(), |n| format!(" of {n}"));
        if let Some(reason) = self.read_error.take() {
            self.warnings.push(format!(
                "{}: the file ends early ({reason}): read {read} frames{of}",
                self.name()
            ));
        } else if count.is_some_and(|n| read + self.damaged_packets + self.discarded_packets < n) {
            self.warnings.push(format!(
                "{}: the file ends early (truncated or damaged): read {read}{of} frames",
                self.name()
            ));
        } else if let (None, Some(d), Some(last)) = (count, self.info.duration, self.last_t) {
            // No frame count in the container: its duration tells.
            if d - last > (0.1 * d).max(0.5) + 2.0 / self.info.fps {
                self.warnings.push(format!(
                    "{}: the file ends early (truncated or damaged): read {read} frames, up to {last:.2} s of {d:.2} s",
                    self.name()
                ));
            }
        }
        if self.damaged_packets > 1 {
            self.warnings.push(format!(
                "{}: {} damaged packets were skipped in all",
                self.name(),
                self.damaged_packets
            ));
        }
    }

    /// The decoded frame's time in seconds from the stream's start.
    fn frame_time(&mut self) -> f64 {
        let ts = self.decoded.timestamp().or_else(|| self.decoded.pts());
        match ts {
            Some(ts) => {
                let start = *self.start_pts.get_or_insert(ts);
                (ts - start) as f64 * self.time_base
            }
            None => self.last_t.map_or(0.0, |t| t + 1.0 / self.info.fps),
        }
    }

    /// The decoded frame as upright RGB.
    fn convert_frame(&mut self) -> Result<RgbImage, VideoError> {
        self.to_rgb
            .convert(&self.decoded, self.info.rotation, &self.path)
    }

    /// Positions the reader so that the next frame is the first one at or
    /// after `t` seconds (from the stream's start): a seek to the key frame
    /// before it, then decoding forward. Falls back to reading from the
    /// start where the file cannot seek.
    pub fn seek(&mut self, t: f64) -> Result<(), VideoError> {
        let t = t.max(0.0);
        let ts = self.start_pts.unwrap_or(0) + (t / self.time_base).floor() as i64;
        // SAFETY: `input` owns a valid, opened AVFormatContext, and
        // `self.stream` is one of its streams' indices.
        let r = unsafe {
            ffmpeg::ffi::avformat_seek_file(
                self.input.as_mut_ptr(),
                self.stream as i32,
                i64::MIN,
                ts,
                ts,
                0,
            )
        };
        if r < 0 {
            let start_pts = self.start_pts;
            *self = Self::open(&self.path)?;
            self.start_pts = start_pts.or(self.start_pts);
        } else {
            self.decoder.flush();
        }
        self.eof_sent = false;
        self.done = false;
        self.read_error = None;
        self.frames_out = 0;
        self.sequential = false;
        self.seek_target = Some(t);
        Ok(())
    }

    /// Times of every frame, read from the packets without decoding (fast),
    /// in presentation order; the reader is back at the start afterwards.
    pub fn scan_times(&mut self) -> Result<Vec<f64>, VideoError> {
        let mut pts = Vec::new();
        loop {
            // A fresh packet per read: av_read_frame does not release what a
            // packet held, so reusing one would leak every packet skipped.
            let mut packet = ffmpeg::Packet::empty();
            match packet.read(&mut self.input) {
                Ok(()) => {
                    if packet.stream() != self.stream || discarded(&packet) {
                        continue;
                    }
                    if let Some(p) = packet.pts().or_else(|| packet.dts()) {
                        pts.push(p);
                    }
                }
                Err(ffmpeg::Error::Eof) => break,
                Err(_) => break, // a cut file: what was read stands
            }
        }
        pts.sort_unstable();
        pts.dedup();
        let start = self.start_pts.or_else(|| pts.first().copied()).unwrap_or(0);
        self.start_pts = Some(start);
        let times = pts
            .into_iter()
            .map(|p| (p - start) as f64 * self.time_base)
            .collect();
        self.seek(0.0)?;
        self.seek_target = None;
        self.sequential = true;
        Ok(times)
    }
}

/// Whether an edit list marks `packet` to be decoded but not shown.
/// `ffmpeg-next`'s packet flags know only KEY and CORRUPT and drop the other
/// bits, so the raw field is read.
fn discarded(packet: &ffmpeg::Packet) -> bool {
    // SAFETY: `as_ptr` points at the packet's own AVPacket, alive and not
    // written to for the duration of this read.
    let flags = unsafe { (*ffmpeg::packet::Ref::as_ptr(packet)).flags };
    flags & ffmpeg::ffi::AV_PKT_FLAG_DISCARD != 0
}
