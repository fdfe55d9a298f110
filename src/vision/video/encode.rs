//! Encoding: [`VideoWriter`], H.264 in fragmented MP4 that survives a kill.
//!
//! The MP4 muxer writes an empty `moov` up front and then a fragment
//! (`moof` + `mdat`) every [`FRAGMENT_SECS`] of video, flushed to the file
//! as it is written (`flush_packets`): the file is playable at every moment,
//! with no index to write at the end, and a kill loses at most the fragment
//! being filled. The encoder runs without look-ahead or B-frames (libx264's
//! `zerolatency`), so nothing else waits in memory. A fragment is closed
//! when the first frame past its length arrives, and the muxer then ends the
//! fragment's last frame where that next frame starts: every frame shows
//! until the next one, and variable rates keep their exact times.
//!
//! Why not a fragment per frame (which would lose at most one frame): FFmpeg's
//! MP4 muxer keeps an index entry per fragment for the whole file. Measured
//! over 150,000 small frames, memory grew 40 bytes a frame that way and 2.9
//! with half-second fragments (README, "Soak").

use std::path::{Path, PathBuf};

use ffmpeg::format::Pixel;
use ffmpeg::software::scaling;
use ffmpeg_next as ffmpeg;
use image::RgbImage;

use super::{init, VideoError};

/// H.264 encoders tried in order: libx264 where FFmpeg was built with it,
/// then the platforms' own (OpenH264, macOS VideoToolbox, Windows Media
/// Foundation, NVIDIA, Intel, AMD).
const H264_ENCODERS: &[&str] = &[
    "libx264",
    "libopenh264",
    "h264_videotoolbox",
    "h264_mf",
    "h264_nvenc",
    "h264_qsv",
    "h264_amf",
];

/// Milliseconds: frame times are kept to the millisecond.
const TIME_BASE: (i32, i32) = (1, 1000);

/// The length of a fragment, the most video a kill can lose.
pub const FRAGMENT_SECS: f64 = 0.5;

/// Writes RGB frames with their times into an H.264 MP4.
pub struct VideoWriter {
    path: PathBuf,
    output: ffmpeg::format::context::Output,
    encoder: ffmpeg::encoder::Video,
    encoder_name: String,
    scaler: scaling::Context,
    rgb: ffmpeg::frame::Video,
    yuv: ffmpeg::frame::Video,
    stream_time_base: ffmpeg::Rational,
    size: (u32, u32),
    last_pts: Option<i64>,
    /// A frame's nominal duration in milliseconds (the last frame's).
    frame_ms: i64,
    frames: u64,
    finished: bool,
}

impl VideoWriter {
    /// Creates `path` for frames of `size` (even sides), about `fps` per second.
    pub fn create(path: &Path, size: (u32, u32), fps: f64) -> Result<Self, VideoError> {
        init();
        let (w, h) = size;
        if w < 2 || h < 2 || w % 2 == 1 || h % 2 == 1 {
            return Err(VideoError::write(
                path,
                format!("frame size {w}x{h}: H.264 4:2:0 needs even sides"),
            ));
        }
        let fps = if fps.is_finite() && fps > 0.0 {
            fps.min(240.0)
        } else {
            25.0
        };
        let step = |what: &'static str| {
            move |e: ffmpeg::Error| VideoError::write(path, format!("{what}: {e}"))
        };
        let mut output =
            ffmpeg::format::output_as(&path, "mp4").map_err(step("creating the file"))?;
        let global_header = output
            .format()
            .flags()
            .contains(ffmpeg::format::Flags::GLOBAL_HEADER);
        let mut tried = Vec::new();
        let mut opened = None;
        for &name in H264_ENCODERS {
            let Some(codec) = ffmpeg::encoder::find_by_name(name) else {
                continue;
            };
            let pixel = match codec.video().ok().and_then(|v| v.formats()) {
                Some(mut f) => {
                    let f: Vec<Pixel> = f.by_ref().collect();
                    if f.contains(&Pixel::YUV420P) {
                        Pixel::YUV420P
                    } else if f.contains(&Pixel::NV12) {
                        Pixel::NV12
                    } else {
                        tried.push(format!("{name} (no 4:2:0 input)"));
                        continue;
                    }
                }
                None => Pixel::YUV420P,
            };
            let mut enc = ffmpeg::codec::context::Context::new_with_codec(codec)
                .encoder()
                .video()
                .map_err(step("setting up the encoder"))?;
            enc.set_width(w);
            enc.set_height(h);
            enc.set_format(pixel);
            enc.set_time_base(TIME_BASE);
            enc.set_frame_rate(Some(ffmpeg::Rational::new(
                (fps * 1000.0).round() as i32,
                1000,
            )));
            // A key frame every 2 s: replay seeks to them.
            enc.set_gop(((fps * 2.0).round() as u32).clamp(1, 600));
            enc.set_max_b_frames(0);
            enc.set_colorspace(ffmpeg::util::color::Space::SMPTE170M);
            enc.set_color_range(ffmpeg::util::color::Range::MPEG);
            if global_header {
                enc.set_flags(ffmpeg::codec::Flags::GLOBAL_HEADER);
            }
            let mut opts = ffmpeg::Dictionary::new();
            if name == "libx264" {
                // veryfast: 720p in a few ms per frame on one core, at about
                // twice ultrafast's compression; zerolatency: no look-ahead.
                opts.set("preset", "veryfast");
                opts.set("tune", "zerolatency");
                opts.set("crf", "23");
            }
            match enc.open_with(opts) {
                Ok(e) => {
                    opened = Some((e, name.to_string(), codec));
                    break;
                }
                Err(e) => tried.push(format!("{name} ({e})")),
            }
        }
        let Some((encoder, encoder_name, codec)) = opened else {
            if tried.is_empty() {
                tried.push(H264_ENCODERS.join(", ") + " (none built in)");
            }
            return Err(VideoError::NoEncoder {
                path: path.to_path_buf(),
                tried: tried.join("; "),
            });
        };
        {
            let mut stream = output
                .add_stream(codec)
                .map_err(step("adding the video stream"))?;
            stream.set_parameters(&encoder);
            stream.set_time_base(TIME_BASE);
        }
        let mut opts = ffmpeg::Dictionary::new();
        opts.set("movflags", "empty_moov+default_base_moof");
        opts.set(
            "frag_duration",
            &((FRAGMENT_SECS * 1e6).round() as i64).to_string(),
        );
        opts.set("flush_packets", "1");
        output
            .write_header_with(opts)
            .map_err(step("writing the MP4 header"))?;
        let stream_time_base = output
            .stream(0)
            .map(|s| s.time_base())
            .unwrap_or_else(|| TIME_BASE.into());
        let scaler = scaling::Context::get(
            Pixel::RGB24,
            w,
            h,
            encoder.format(),
            w,
            h,
            scaling::Flags::BILINEAR,
        )
        .map_err(step("setting up the RGB to YUV converter"))?;
        Ok(Self {
            path: path.to_path_buf(),
            output,
            encoder_name,
            scaler,
            rgb: ffmpeg::frame::Video::new(Pixel::RGB24, w, h),
            yuv: ffmpeg::frame::Video::new(encoder.format(), w, h),
            encoder,
            stream_time_base,
            size,
            last_pts: None,
            frame_ms: ((1000.0 / fps).round() as i64).max(1),
            frames: 0,
            finished: false,
        })
    }

    /// The FFmpeg encoder in use (`libx264`, ...).
    pub fn encoder_name(&self) -> &str {
        &self.encoder_name
    }

    pub fn size(&self) -> (u32, u32) {
        self.size
    }

    /// Frames written so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds a frame shown from `t` seconds (increasing; a frame within a
    /// millisecond of the previous one is moved one millisecond on).
    pub fn push(&mut self, img: &RgbImage, t: f64) -> Result<(), VideoError> {
        if img.dimensions() != self.size {
            return Err(VideoError::write(
                &self.path,
                format!(
                    "a frame of {}x{} in a {}x{} video",
                    img.width(),
                    img.height(),
                    self.size.0,
                    self.size.1
                ),
            ));
        }
        let mut pts = (t.max(0.0) * 1000.0).round() as i64;
        if let Some(last) = self.last_pts {
            pts = pts.max(last + 1);
        }
        self.last_pts = Some(pts);
        let row = self.size.0 as usize * 3;
        let stride = self.rgb.stride(0);
        let dst = self.rgb.data_mut(0);
        for (y, src) in img.as_raw().chunks_exact(row).enumerate() {
            dst[y * stride..y * stride + row].copy_from_slice(src);
        }
        self.scaler
            .run(&self.rgb, &mut self.yuv)
            .map_err(|e| VideoError::write(&self.path, format!("converting to YUV: {e}")))?;
        self.yuv.set_pts(Some(pts));
        self.encoder
            .send_frame(&self.yuv)
            .map_err(|e| VideoError::write(&self.path, format!("encoding: {e}")))?;
        self.frames += 1;
        self.drain()
    }

    /// Writes the packets the encoder has ready.
    fn drain(&mut self) -> Result<(), VideoError> {
        let mut packet = ffmpeg::Packet::empty();
        loop {
            match self.encoder.receive_packet(&mut packet) {
                Ok(()) => {
                    packet.set_stream(0);
                    // Only the file's last frame keeps this duration: the
                    // muxer ends every other one where the next starts.
                    packet.set_duration(self.frame_ms);
                    packet.rescale_ts(TIME_BASE, self.stream_time_base);
                    packet
                        .write(&mut self.output)
                        .map_err(|e| VideoError::write(&self.path, format!("muxing: {e}")))?;
                }
                Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::error::EAGAIN => {
                    return Ok(())
                }
                Err(ffmpeg::Error::Eof) => return Ok(()),
                Err(e) => {
                    return Err(VideoError::write(
                        &self.path,
                        format!("encoding: {e} ({})", i32::from(e)),
                    ))
                }
            }
        }
    }

    /// Flushes the encoder, writes the last fragment and the trailer, and
    /// syncs the file. Returns the frames written.
    pub fn finish(mut self) -> Result<u64, VideoError> {
        self.finish_in_place()?;
        Ok(self.frames)
    }

    fn finish_in_place(&mut self) -> Result<(), VideoError> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        self.encoder
            .send_eof()
            .map_err(|e| VideoError::write(&self.path, format!("flushing the encoder: {e}")))?;
        self.drain()?;
        // SAFETY: `output` owns a valid AVFormatContext whose header was
        // written. Called directly: FFmpeg 5.1's MP4 muxer returns the size of
        // its fragment index here (positive), which the binding takes for
        // an error.
        let r = unsafe { ffmpeg::ffi::av_write_trailer(self.output.as_mut_ptr()) };
        if r < 0 {
            return Err(VideoError::write(
                &self.path,
                format!("writing the trailer: {}", ffmpeg::Error::from(r)),
            ));
        }
        // The trailer is through FFmpeg's buffer; make it durable.
        std::fs::File::open(&self.path)
            .and_then(|f| f.sync_all())
            .map_err(|e| VideoError::write(&self.path, e))
    }
}
