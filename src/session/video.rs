//! The session's video: annotated frames encoded as H.264 (OpenH264) in MP4
//! (the `mp4` crate), written as a rotation of short segments, joined at the
//! end, and read back frame by frame for replay.
//!
//! An MP4 is only playable once its index (`moov`) is written at the end, so
//! a single growing file would be lost entirely to a crash. Instead each
//! segment (about 2 s) starts with a key frame, is written as
//! `seg_NNNNN.mp4.part`, and is renamed to `seg_NNNNN.mp4` once finished.
//! The muxer holds samples in memory until a chunk is full, so next to the
//! segment in progress a journal, `seg_NNNNN.mp4.journal`, gets each encoded
//! sample (size, duration, key flag, bytes) as one unbuffered write: after a
//! crash [`salvage_segment`] rebuilds the unfinished segment from it, so a
//! crash loses at most the frame being written.
//! [`remux`] joins the finished segments into one file without re-encoding.
//!
//! Frames carry their own times: a sample lasts until the next frame, so the
//! video keeps real time even when frames were skipped, and frame times equal
//! the session's `t` (minus the first frame's).

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use image::{imageops, Rgb, RgbImage};
use openh264::decoder::Decoder;
use openh264::encoder::{BitRate, Encoder, EncoderConfig, FrameRate, RateControlMode};
use openh264::formats::{RgbSliceU8, YUVBuffer, YUVSource};

use super::SessionError;
use crate::model::cliper::expressions::CLASSES;
use crate::vision::draw::{
    draw_text, fill_rect, stroke_rect, text_color_on, text_width, CLASS_RGB,
};
use crate::vision::source::mp4::length_prefixed_to_annexb;

/// Ticks per second of the video track.
pub const TIMESCALE: u32 = 90_000;
/// Recorded frames are scaled down to this longer side (H.264 level and
/// encoding time); annotations stay legible.
pub const MAX_VIDEO_SIDE: u32 = 1920;

/// A face to draw on a video frame.
#[derive(Clone, Debug, PartialEq)]
pub struct FaceMark {
    pub id: u64,
    /// `[x, y, w, h]` in the frame's pixels.
    pub bbox: [u32; 4],
    /// The class shown and its probability; `None` before the face's first
    /// scores (a white box with its id).
    pub label: Option<(usize, f32)>,
}

/// Draws boxes, ids, labels and the session time on a frame.
pub fn annotate(img: &mut RgbImage, marks: &[FaceMark], t: f64) {
    let scale = (img.height() / 280).clamp(1, 4);
    // Odd and at least 3 px: the colour survives 4:2:0 chroma subsampling.
    let thick = 2 * i64::from(scale) + 1;
    for m in marks {
        let [x, y, w, h] = m.bbox.map(i64::from);
        let (color, text) = match m.label {
            Some((c, p)) => (
                CLASS_RGB.get(c).copied().unwrap_or(Rgb([255, 255, 255])),
                format!(
                    "#{} {} {:.0}%",
                    m.id,
                    CLASSES.get(c).unwrap_or(&"?"),
                    p * 100.0
                ),
            ),
            None => (Rgb([255, 255, 255]), format!("#{}", m.id)),
        };
        stroke_rect(img, x, y, w, h, thick, color);
        let pad = 3 * i64::from(scale);
        let tag_w = i64::from(text_width(&text, scale)) + 2 * pad;
        let tag_h = 8 * i64::from(scale) + 2 * pad;
        // Above the box, or inside its top when there is no room.
        let ty = if y - tag_h >= 0 { y - tag_h } else { y + thick };
        fill_rect(img, x, ty, tag_w, tag_h, color);
        draw_text(img, x + pad, ty + pad, &text, scale, text_color_on(color));
    }
    let stamp = format!("t={t:.2}s");
    let pad = 3 * i64::from(scale);
    let th = 8 * i64::from(scale) + 2 * pad;
    let ty = i64::from(img.height()) - th;
    fill_rect(
        img,
        0,
        ty,
        i64::from(text_width(&stamp, scale)) + 2 * pad,
        th,
        Rgb([0, 0, 0]),
    );
    draw_text(img, pad, ty + pad, &stamp, scale, Rgb([255, 255, 255]));
}

/// The encoded size for frames of `w` x `h`: at most [`MAX_VIDEO_SIDE`],
/// even sides (4:2:0 chroma).
pub fn video_size(w: u32, h: u32) -> (u32, u32) {
    let s = (MAX_VIDEO_SIDE as f64 / w.max(h).max(1) as f64).min(1.0);
    let w = ((w as f64 * s) as u32).max(2) & !1;
    let h = ((h as f64 * s) as u32).max(2) & !1;
    (w, h)
}

/// `img` at exactly `size`: as is, cropped by the odd pixel, or scaled to
/// fit with black borders (a source of another size mid-session).
fn fit(img: &RgbImage, (w, h): (u32, u32)) -> Cow<'_, RgbImage> {
    let (iw, ih) = img.dimensions();
    if (iw, ih) == (w, h) {
        return Cow::Borrowed(img);
    }
    if (iw & !1, ih & !1) == (w, h) {
        return Cow::Owned(imageops::crop_imm(img, 0, 0, w, h).to_image());
    }
    let s = (w as f64 / iw as f64).min(h as f64 / ih as f64);
    let (sw, sh) = (
        ((iw as f64 * s).round() as u32).clamp(1, w),
        ((ih as f64 * s).round() as u32).clamp(1, h),
    );
    let scaled = imageops::resize(img, sw, sh, imageops::FilterType::Triangle);
    let mut out = RgbImage::new(w, h);
    imageops::overlay(
        &mut out,
        &scaled,
        i64::from((w - sw) / 2),
        i64::from((h - sh) / 2),
    );
    Cow::Owned(out)
}

/// One encoded frame: length-prefixed NAL units, as MP4 stores them.
pub struct EncodedFrame {
    pub sample: Vec<u8>,
    pub is_sync: bool,
}

/// OpenH264 with the parameter sets kept aside for the MP4 header.
pub struct H264Encoder {
    encoder: Encoder,
    pub sps: Option<Vec<u8>>,
    pub pps: Option<Vec<u8>>,
}

impl H264Encoder {
    pub fn new(width: u32, height: u32, fps: f64) -> Result<Self, String> {
        let fps = if fps.is_finite() && fps > 0.0 {
            fps.min(120.0)
        } else {
            25.0
        };
        // Constant quality, no rate control: OpenH264 can only hold a bit
        // rate by skipping frames, and every frame must be in the file (the
        // video keeps the session's time).
        let bps = (width as f64 * height as f64 * fps * 0.15).clamp(400e3, 16e6) as u32;
        let config = EncoderConfig::new()
            .skip_frames(false)
            .rate_control_mode(RateControlMode::Off)
            .bitrate(BitRate::from_bps(bps))
            .max_frame_rate(FrameRate::from_hz(fps as f32))
            // One thread: the cores belong to the model.
            .num_threads(1);
        let encoder = Encoder::with_api_config(openh264::OpenH264API::from_source(), config)
            .map_err(|e| format!("cannot start the H.264 encoder: {e}"))?;
        Ok(Self {
            encoder,
            sps: None,
            pps: None,
        })
    }

    /// Encodes a frame (even sides); `key` forces a key frame.
    pub fn encode(&mut self, img: &RgbImage, key: bool) -> Result<EncodedFrame, String> {
        let (w, h) = img.dimensions();
        if w % 2 == 1 || h % 2 == 1 {
            return Err(format!("frame size {w}x{h} is not even"));
        }
        let yuv =
            YUVBuffer::from_rgb8_source(RgbSliceU8::new(img.as_raw(), (w as usize, h as usize)));
        if key {
            self.encoder.force_intra_frame();
        }
        let stream = self
            .encoder
            .encode(&yuv)
            .map_err(|e| format!("H.264 encoding failed: {e}"))?;
        let mut sample = Vec::new();
        let mut is_sync = false;
        for l in 0..stream.num_layers() {
            let Some(layer) = stream.layer(l) else {
                continue;
            };
            for n in 0..layer.nal_count() {
                let Some(nal) = layer.nal_unit(n).map(strip_start_code) else {
                    continue;
                };
                if nal.is_empty() {
                    continue;
                }
                match nal[0] & 0x1f {
                    7 => self.sps = Some(nal.to_vec()),
                    8 => self.pps = Some(nal.to_vec()),
                    t => {
                        is_sync |= t == 5;
                        sample.extend((nal.len() as u32).to_be_bytes());
                        sample.extend(nal);
                    }
                }
            }
        }
        Ok(EncodedFrame { sample, is_sync })
    }
}

/// A NAL unit without its Annex B start code.
fn strip_start_code(nal: &[u8]) -> &[u8] {
    let zeros = nal.iter().take_while(|&&b| b == 0).count();
    if zeros >= 2 && nal.get(zeros) == Some(&1) {
        &nal[zeros + 1..]
    } else {
        nal
    }
}

fn ticks(secs: f64) -> u32 {
    (secs * TIMESCALE as f64)
        .round()
        .clamp(1.0, u32::MAX as f64) as u32
}

fn mp4_config() -> mp4::Mp4Config {
    let brand = |s: &str| s.parse().unwrap_or(mp4::FourCC { value: *b"isom" });
    mp4::Mp4Config {
        major_brand: brand("isom"),
        minor_version: 512,
        compatible_brands: vec![brand("isom"), brand("iso2"), brand("avc1"), brand("mp41")],
        timescale: 1000,
    }
}

fn video_track(w: u32, h: u32, sps: Vec<u8>, pps: Vec<u8>) -> mp4::TrackConfig {
    mp4::TrackConfig {
        track_type: mp4::TrackType::Video,
        timescale: TIMESCALE,
        language: "und".into(),
        media_conf: mp4::MediaConfig::AvcConfig(mp4::AvcConfig {
            width: w as u16,
            height: h as u16,
            seq_param_set: sps,
            pic_param_set: pps,
        }),
    }
}

/// First bytes of a segment journal (`seg_NNNNN.mp4.journal`), then width
/// and height (u16 LE each), SPS and PPS (u16 LE length, bytes), then per
/// sample: size u32, duration u32 (LE), key flag u8, the sample's bytes.
const JOURNAL_MAGIC: &[u8; 8] = b"CLPRJRN1";

/// The journal of segment `part` (`seg_N.mp4.part` -> `seg_N.mp4.journal`).
pub fn journal_path(part: &Path) -> PathBuf {
    part.with_extension("journal")
}

struct OpenSegment {
    part: PathBuf,
    done: PathBuf,
    mux: mp4::Mp4Writer<BufWriter<File>>,
    /// Every sample of the segment, appended unbuffered (crash recovery).
    journal: File,
    /// Time of its first frame.
    t0: f64,
}

struct Held {
    sample: Vec<u8>,
    is_sync: bool,
    t: f64,
}

/// Writes frames into a folder of finished MP4 segments.
pub struct SegmentWriter {
    dir: PathBuf,
    size: (u32, u32),
    segment_secs: f64,
    encoder: H264Encoder,
    next_index: u32,
    open: Option<OpenSegment>,
    /// The newest frame waits for the next one: its duration is the gap.
    held: Option<Held>,
    last_duration: u32,
    /// Frames written (including the held one).
    pub frames: u64,
    /// Finished segments, in order.
    pub segments: Vec<PathBuf>,
}

impl SegmentWriter {
    /// Frames will be encoded at `size` (see [`video_size`]).
    pub fn new(
        dir: &Path,
        size: (u32, u32),
        fps: f64,
        segment_secs: f64,
    ) -> Result<Self, SessionError> {
        std::fs::create_dir_all(dir).map_err(|e| SessionError::write(dir, e))?;
        let encoder =
            H264Encoder::new(size.0, size.1, fps).map_err(|reason| SessionError::Video {
                path: dir.to_path_buf(),
                reason,
            })?;
        let fps = if fps > 0.0 { fps } else { 25.0 };
        Ok(Self {
            dir: dir.to_path_buf(),
            size,
            segment_secs: segment_secs.max(0.05),
            encoder,
            next_index: 0,
            open: None,
            held: None,
            last_duration: ticks(1.0 / fps),
            frames: 0,
            segments: Vec::new(),
        })
    }

    pub fn size(&self) -> (u32, u32) {
        self.size
    }

    /// Adds a frame shown from time `t` (seconds, increasing).
    pub fn push(&mut self, img: &RgbImage, t: f64) -> Result<(), SessionError> {
        if self
            .open
            .as_ref()
            .is_some_and(|s| t - s.t0 >= self.segment_secs)
        {
            self.release_held(Some(t))?;
            self.close_segment()?;
        }
        let frame = fit(img, self.size);
        let key = self.open.is_none();
        let enc = self
            .encoder
            .encode(&frame, key)
            .map_err(|reason| SessionError::Video {
                path: self.dir.clone(),
                reason,
            })?;
        if self.open.is_none() {
            self.open_segment(t)?;
        }
        self.release_held(Some(t))?;
        self.held = Some(Held {
            sample: enc.sample,
            is_sync: enc.is_sync || key,
            t,
        });
        self.frames += 1;
        Ok(())
    }

    /// Writes the held frame and closes the segment in progress.
    pub fn finish(&mut self) -> Result<(), SessionError> {
        self.release_held(None)?;
        self.close_segment()
    }

    fn open_segment(&mut self, t: f64) -> Result<(), SessionError> {
        let done = self.dir.join(format!("seg_{:05}.mp4", self.next_index));
        let part = self
            .dir
            .join(format!("seg_{:05}.mp4.part", self.next_index));
        self.next_index += 1;
        let (Some(sps), Some(pps)) = (self.encoder.sps.clone(), self.encoder.pps.clone()) else {
            return Err(SessionError::Video {
                path: part,
                reason: "the encoder gave no parameter sets (SPS/PPS)".into(),
            });
        };
        let file = File::create(&part).map_err(|e| SessionError::write(&part, e))?;
        let mux_err = |e: mp4::Error| SessionError::write(&part, e);
        let mut mux =
            mp4::Mp4Writer::write_start(BufWriter::new(file), &mp4_config()).map_err(mux_err)?;
        let journal_path = journal_path(&part);
        let mut header = JOURNAL_MAGIC.to_vec();
        header.extend((self.size.0 as u16).to_le_bytes());
        header.extend((self.size.1 as u16).to_le_bytes());
        for ps in [&sps, &pps] {
            header.extend((ps.len() as u16).to_le_bytes());
            header.extend(ps.iter());
        }
        let mut journal =
            File::create(&journal_path).map_err(|e| SessionError::write(&journal_path, e))?;
        journal
            .write_all(&header)
            .map_err(|e| SessionError::write(&journal_path, e))?;
        mux.add_track(&video_track(self.size.0, self.size.1, sps, pps))
            .map_err(mux_err)?;
        self.open = Some(OpenSegment {
            part,
            done,
            mux,
            journal,
            t0: t,
        });
        Ok(())
    }

    fn release_held(&mut self, next_t: Option<f64>) -> Result<(), SessionError> {
        let Some(h) = self.held.take() else {
            return Ok(());
        };
        let duration = match next_t {
            Some(n) => ticks(n - h.t),
            None => self.last_duration,
        };
        self.last_duration = duration;
        let Some(seg) = self.open.as_mut() else {
            return Ok(());
        };
        // The journal first, in one write: the muxer keeps the sample in
        // memory until its chunk is full.
        let mut record = Vec::with_capacity(9 + h.sample.len());
        record.extend((h.sample.len() as u32).to_le_bytes());
        record.extend(duration.to_le_bytes());
        record.push(u8::from(h.is_sync));
        record.extend(&h.sample);
        seg.journal
            .write_all(&record)
            .map_err(|e| SessionError::write(&journal_path(&seg.part), e))?;
        let sample = mp4::Mp4Sample {
            start_time: 0, // the writer times samples by their durations
            duration,
            rendering_offset: 0,
            is_sync: h.is_sync,
            bytes: h.sample.into(),
        };
        seg.mux
            .write_sample(1, &sample)
            .map_err(|e| SessionError::write(&seg.part, e))
    }

    fn close_segment(&mut self) -> Result<(), SessionError> {
        let Some(mut seg) = self.open.take() else {
            return Ok(());
        };
        let err = |e: &dyn std::fmt::Display| SessionError::write(&seg.part, e);
        seg.mux.write_end().map_err(|e| err(&e))?;
        let file = seg
            .mux
            .into_writer()
            .into_inner()
            .map_err(|e| err(&e.error().to_string()))?;
        file.sync_all().map_err(|e| err(&e))?;
        drop(file);
        std::fs::rename(&seg.part, &seg.done).map_err(|e| err(&e))?;
        drop(seg.journal);
        let _ = std::fs::remove_file(journal_path(&seg.part));
        self.segments.push(seg.done);
        Ok(())
    }
}

/// Finished segments of a folder (`seg_*.mp4`), in order.
pub fn list_segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    name.starts_with("seg_") && name.ends_with(".mp4")
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Unfinished segments (`seg_*.mp4.part`) of a folder.
pub fn list_unfinished_segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.ends_with(".mp4.part"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Rebuilds an unfinished segment (`seg_N.mp4.part`, left by a crash) as
/// `seg_N.mp4` from its journal: every sample written whole, up to the first
/// one cut short. Returns the frames kept (0: nothing playable; the files
/// are left as they are).
pub fn salvage_segment(part: &Path) -> Result<u64, SessionError> {
    let journal = journal_path(part);
    let data = std::fs::read(&journal).map_err(|e| SessionError::read(&journal, e))?;
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = data.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let u16_of = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
    let u32_of = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let header = (|| {
        if take(8)? != JOURNAL_MAGIC {
            return None;
        }
        let w = u16_of(take(2)?);
        let h = u16_of(take(2)?);
        let n = u16_of(take(2)?) as usize;
        let sps = take(n)?.to_vec();
        let n = u16_of(take(2)?) as usize;
        let pps = take(n)?.to_vec();
        Some((w, h, sps, pps))
    })();
    let Some((w, h, sps, pps)) = header else {
        return Err(SessionError::Video {
            path: journal,
            reason: "not a cliper segment journal".into(),
        });
    };
    let mut samples = Vec::new();
    while let Some(head) = take(9) {
        let (size, duration, is_sync) = (u32_of(&head[0..4]), u32_of(&head[4..8]), head[8] != 0);
        let Some(bytes) = take(size as usize) else {
            break; // the sample being written when the writer died
        };
        samples.push(mp4::Mp4Sample {
            start_time: 0,
            duration,
            rendering_offset: 0,
            is_sync,
            bytes: bytes.to_vec().into(),
        });
    }
    if !samples.first().is_some_and(|s| s.is_sync) {
        return Ok(0); // no key frame to start from
    }
    let done = part.with_extension(""); // seg_N.mp4
    let tmp = part.with_extension("salvage");
    let out = File::create(&tmp).map_err(|e| SessionError::write(&tmp, e))?;
    let mux_err = |e: mp4::Error| SessionError::write(&tmp, e);
    let mut mux =
        mp4::Mp4Writer::write_start(BufWriter::new(out), &mp4_config()).map_err(mux_err)?;
    mux.add_track(&video_track(u32::from(w), u32::from(h), sps, pps))
        .map_err(mux_err)?;
    for sample in &samples {
        mux.write_sample(1, sample).map_err(mux_err)?;
    }
    mux.write_end().map_err(mux_err)?;
    let file = mux
        .into_writer()
        .into_inner()
        .map_err(|e| SessionError::write(&tmp, e.error().to_string()))?;
    file.sync_all().map_err(|e| SessionError::write(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, &done).map_err(|e| SessionError::write(&done, e))?;
    let _ = std::fs::remove_file(part);
    let _ = std::fs::remove_file(&journal);
    Ok(samples.len() as u64)
}

/// Runs a step of the third-party demuxer, turning a panic on a damaged file
/// into an error.
fn guard<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| "the MP4 demuxer could not parse the file".to_string())
}

/// One MP4 file's H.264 track, opened for reading.
struct Part {
    path: PathBuf,
    reader: mp4::Mp4Reader<BufReader<File>>,
    track: u32,
    timescale: u32,
    length_size: usize,
    sps: Vec<u8>,
    pps: Vec<u8>,
    width: u32,
    height: u32,
    /// (duration in ticks, is_sync) per sample.
    samples: Vec<(u32, bool)>,
}

impl Part {
    fn open(path: &Path) -> Result<Self, SessionError> {
        let err = |reason: String| SessionError::Video {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| SessionError::read(path, e))?;
        let size = file
            .metadata()
            .map_err(|e| SessionError::read(path, e))?
            .len();
        let reader = guard(|| mp4::Mp4Reader::read_header(BufReader::new(file), size))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(err)?;
        let mut ids: Vec<u32> = reader.tracks().keys().copied().collect();
        ids.sort_unstable();
        let track = ids
            .into_iter()
            .find(|id| matches!(reader.tracks()[id].media_type(), Ok(mp4::MediaType::H264)))
            .ok_or_else(|| err("no H.264 video track".into()))?;
        let t = &reader.tracks()[&track];
        let stbl = &t.trak.mdia.minf.stbl;
        let avc = stbl
            .stsd
            .avc1
            .as_ref()
            .ok_or_else(|| err("no decoder configuration (avcC)".into()))?;
        let sps = (avc.avcc.sequence_parameter_sets.first())
            .map(|n| n.bytes.clone())
            .unwrap_or_default();
        let pps = (avc.avcc.picture_parameter_sets.first())
            .map(|n| n.bytes.clone())
            .unwrap_or_default();
        let count = t.sample_count() as usize;
        let mut samples = Vec::with_capacity(count);
        for e in &stbl.stts.entries {
            for _ in 0..e.sample_count {
                samples.push((e.sample_delta, false));
            }
        }
        samples.resize(count, (samples.last().map_or(1, |s| s.0), false));
        match &stbl.stss {
            Some(stss) => {
                for &i in &stss.entries {
                    if let Some(s) = samples.get_mut(i as usize - 1) {
                        s.1 = true;
                    }
                }
            }
            None => samples.iter_mut().for_each(|s| s.1 = true),
        }
        Ok(Self {
            path: path.to_path_buf(),
            track,
            timescale: t.timescale().max(1),
            length_size: usize::from(avc.avcc.length_size_minus_one & 3) + 1,
            sps,
            pps,
            width: u32::from(avc.width),
            height: u32::from(avc.height),
            samples,
            reader,
        })
    }

    /// The bytes of sample `i` (from 0).
    fn read(&mut self, i: usize) -> Result<Vec<u8>, SessionError> {
        let (track, reader) = (self.track, &mut self.reader);
        let sample = guard(|| reader.read_sample(track, i as u32 + 1))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|reason| SessionError::Video {
                path: self.path.clone(),
                reason: format!("frame {}: {reason}", i + 1),
            })?;
        Ok(sample.map(|s| s.bytes.to_vec()).unwrap_or_default())
    }
}

/// Joins finished segments into one MP4 without re-encoding; returns the
/// number of frames. Written to a temporary name and renamed, so `out` is
/// either complete or absent.
pub fn remux(segments: &[PathBuf], out: &Path) -> Result<u64, SessionError> {
    let tmp = out.with_extension("mp4.tmp");
    let result = remux_into(segments, &tmp);
    match result {
        Ok(n) => {
            std::fs::rename(&tmp, out).map_err(|e| SessionError::write(out, e))?;
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn remux_into(segments: &[PathBuf], out: &Path) -> Result<u64, SessionError> {
    let mut parts = segments
        .iter()
        .map(|p| Part::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(first) = parts.first() else {
        return Err(SessionError::Video {
            path: out.to_path_buf(),
            reason: "no finished video segment to join".into(),
        });
    };
    let (sps, pps) = (first.sps.clone(), first.pps.clone());
    let (w, h) = (first.width, first.height);
    let file = File::create(out).map_err(|e| SessionError::write(out, e))?;
    let werr = |e: &dyn std::fmt::Display| SessionError::write(out, e);
    let mut mux =
        mp4::Mp4Writer::write_start(BufWriter::new(file), &mp4_config()).map_err(|e| werr(&e))?;
    mux.add_track(&video_track(w, h, sps.clone(), pps.clone()))
        .map_err(|e| werr(&e))?;
    let mut n = 0u64;
    for part in &mut parts {
        // A segment with other parameter sets carries them in its key frames.
        let inband = if (&part.sps, &part.pps) != (&sps, &pps) {
            let mut v = Vec::new();
            for ps in [&part.sps, &part.pps] {
                v.extend((ps.len() as u32).to_be_bytes());
                v.extend(ps);
            }
            Some(v)
        } else {
            None
        };
        if part.length_size != 4 {
            return Err(SessionError::Video {
                path: part.path.clone(),
                reason: format!("NAL length size {} (expected 4)", part.length_size),
            });
        }
        for i in 0..part.samples.len() {
            let (duration, is_sync) = part.samples[i];
            let duration = (u64::from(duration) * u64::from(TIMESCALE) / u64::from(part.timescale))
                .clamp(1, u64::from(u32::MAX)) as u32;
            let mut bytes = part.read(i)?;
            if let (true, Some(ps)) = (is_sync, &inband) {
                let mut b = ps.clone();
                b.extend(bytes);
                bytes = b;
            }
            let sample = mp4::Mp4Sample {
                start_time: 0,
                duration,
                rendering_offset: 0,
                is_sync,
                bytes: bytes.into(),
            };
            mux.write_sample(1, &sample).map_err(|e| werr(&e))?;
            n += 1;
        }
    }
    mux.write_end().map_err(|e| werr(&e))?;
    let file = mux
        .into_writer()
        .into_inner()
        .map_err(|e| werr(&e.error().to_string()))?;
    file.sync_all().map_err(|e| werr(&e))?;
    Ok(n)
}

/// Frames of one MP4 or of a list of segments, decoded on demand in any
/// order (replay's scrubber).
pub struct VideoReader {
    parts: Vec<Part>,
    /// Per frame: (part, sample in the part, time in seconds, is_sync).
    index: Vec<(usize, usize, f64, bool)>,
    decoder: Option<Decoder>,
    /// The frame the decoder would produce next.
    next: Option<usize>,
    annexb: Vec<u8>,
}

impl VideoReader {
    /// Opens the files as one video, one after the other.
    pub fn open(paths: &[PathBuf]) -> Result<Self, SessionError> {
        let parts = paths
            .iter()
            .map(|p| Part::open(p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut index = Vec::new();
        let mut t = 0.0;
        for (pi, part) in parts.iter().enumerate() {
            for (si, &(dur, sync)) in part.samples.iter().enumerate() {
                index.push((pi, si, t, sync));
                t += f64::from(dur) / f64::from(part.timescale);
            }
        }
        Ok(Self {
            parts,
            index,
            decoder: None,
            next: None,
            annexb: Vec::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The time of frame `k`, seconds from the video's start.
    pub fn time(&self, k: usize) -> Option<f64> {
        self.index.get(k).map(|e| e.2)
    }

    /// The frame on screen at video time `t`: the last one starting at or
    /// before it.
    pub fn index_at(&self, t: f64) -> Option<usize> {
        if self.index.is_empty() {
            return None;
        }
        let n = self.index.partition_point(|e| e.2 <= t + 1e-6);
        Some(n.saturating_sub(1))
    }

    pub fn size(&self) -> Option<(u32, u32)> {
        self.parts.first().map(|p| (p.width, p.height))
    }

    /// Decodes frame `k` (from the previous key frame unless it follows the
    /// last one decoded).
    pub fn frame(&mut self, k: usize) -> Result<RgbImage, SessionError> {
        if k >= self.index.len() {
            return Err(SessionError::Video {
                path: self
                    .parts
                    .first()
                    .map(|p| p.path.clone())
                    .unwrap_or_default(),
                reason: format!("no frame {k} (the video has {})", self.index.len()),
            });
        }
        let start = if self.next == Some(k) && self.decoder.is_some() {
            k
        } else {
            let key = (0..=k).rev().find(|&i| self.index[i].3).unwrap_or(0);
            let decoder = Decoder::new().map_err(|e| self.error(k, e.to_string()))?;
            self.decoder = Some(decoder);
            key
        };
        let mut last = None;
        for i in start..=k {
            let (pi, si, _, sync) = self.index[i];
            let bytes = self.parts[pi].read(si)?;
            self.annexb.clear();
            if sync || i == start {
                for ps in [&self.parts[pi].sps, &self.parts[pi].pps] {
                    self.annexb.extend([0, 0, 0, 1]);
                    self.annexb.extend(ps.iter());
                }
            }
            let ls = self.parts[pi].length_size;
            length_prefixed_to_annexb(&bytes, ls, &mut self.annexb)
                .map_err(|e| self.error(i, e))?;
            let Some(decoder) = self.decoder.as_mut() else {
                break;
            };
            match decoder.decode(&self.annexb) {
                Ok(Some(yuv)) => {
                    if i == k {
                        last = Some(to_rgb(&yuv));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.decoder = None;
                    self.next = None;
                    return Err(self.error(i, e.to_string()));
                }
            }
        }
        self.next = Some(k + 1);
        last.ok_or_else(|| self.error(k, "the decoder returned no picture".into()))
    }

    fn error(&self, k: usize, reason: String) -> SessionError {
        let (pi, si) = self.index.get(k).map_or((0, k), |e| (e.0, e.1));
        SessionError::Video {
            path: self
                .parts
                .get(pi)
                .map(|p| p.path.clone())
                .unwrap_or_default(),
            reason: format!("frame {}: {reason}", si + 1),
        }
    }
}

fn to_rgb(yuv: &openh264::decoder::DecodedYUV<'_>) -> RgbImage {
    let (w, h) = yuv.dimensions();
    let mut buf = vec![0u8; w * h * 3];
    yuv.write_rgb8(&mut buf);
    RgbImage::from_raw(w as u32, h as u32, buf).unwrap_or_else(|| RgbImage::new(1, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame whose left half brightens with `i` (decodable, compressible).
    fn frame(i: u32, w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            if x < w / 2 {
                Rgb([(i * 20 % 256) as u8, 80, 80])
            } else {
                Rgb([(x % 256) as u8, (y % 256) as u8, 128])
            }
        })
    }

    #[test]
    fn segments_are_playable_alone_and_joined() {
        let dir = tempfile::tempdir().unwrap();
        let segs = dir.path().join("video");
        // Odd source size: encoded one pixel smaller.
        let size = video_size(161, 121);
        assert_eq!(size, (160, 120));
        let mut w = SegmentWriter::new(&segs, size, 10.0, 0.5).unwrap();
        // 10 fps with one gap: frame 7 comes 0.3 s after frame 6.
        let times: Vec<f64> = (0..12)
            .map(|i| i as f64 * 0.1 + if i >= 7 { 0.2 } else { 0.0 })
            .collect();
        for (i, &t) in times.iter().enumerate() {
            w.push(&frame(i as u32, 161, 121), t).unwrap();
            // The segment in progress is a .part until it is finished.
            assert!(w.segments.iter().all(|p| p.exists()));
        }
        w.finish().unwrap();
        assert_eq!(w.frames, 12);
        assert!(
            w.segments.len() >= 3,
            "0.5 s segments over 1.3 s: {:?}",
            w.segments
        );
        assert!(list_unfinished_segments(&segs).is_empty());
        assert_eq!(list_segments(&segs), w.segments);
        // Each finished segment plays on its own with the app's MP4 reader.
        let mut total = 0;
        for s in &w.segments {
            let mut src = crate::vision::source::mp4::Mp4Source::open(s).unwrap();
            use crate::vision::source::FrameSource;
            while let Some(f) = src.next_frame().unwrap() {
                assert_eq!(f.image.dimensions(), (160, 120));
                total += 1;
            }
        }
        assert_eq!(total, 12);
        // Joined: one file, every frame, the original times.
        let out = dir.path().join("video.mp4");
        assert_eq!(remux(&w.segments, &out).unwrap(), 12);
        let mut r = VideoReader::open(std::slice::from_ref(&out)).unwrap();
        assert_eq!(r.len(), 12);
        for (k, &t) in times.iter().enumerate() {
            assert!((r.time(k).unwrap() - t).abs() < 1e-4, "frame {k}");
        }
        assert_eq!(r.index_at(0.75), Some(6), "frame 6 lasts until 0.9 s");
        assert_eq!(r.index_at(0.95), Some(7));
        // Random access: backwards, forwards, across segments.
        for k in [11, 3, 4, 9, 0] {
            let img = r.frame(k).unwrap();
            let want = (k as u32 * 20 % 256) as f32;
            let got = img.get_pixel(20, 60).0[0] as f32;
            assert!(
                (got - want).abs() < 12.0,
                "frame {k}: red {got}, want {want}"
            );
        }
        // The segments read as one video too (before joining, or when
        // joining failed).
        let r2 = VideoReader::open(&w.segments).unwrap();
        assert_eq!(r2.len(), 12);
        assert!((r2.time(11).unwrap() - times[11]).abs() < 1e-4);
    }

    /// A writer that dies mid-segment (no `finish`): the journal rebuilds
    /// the segment up to the last whole sample, with its times and pictures.
    #[test]
    fn an_unfinished_segment_is_rebuilt_from_its_journal() {
        let dir = tempfile::tempdir().unwrap();
        let segs = dir.path().join("video");
        let size = video_size(160, 120);
        let mut w = SegmentWriter::new(&segs, size, 10.0, 60.0).unwrap();
        for i in 0..10u32 {
            w.push(&frame(i, 160, 120), f64::from(i) * 0.1).unwrap();
        }
        // Frame 9 is held for its duration: 9 samples reached the journal.
        std::mem::forget(w); // the process died: nothing is finished
        let parts = list_unfinished_segments(&segs);
        assert_eq!(parts.len(), 1);
        let journal = journal_path(&parts[0]);
        // Cut into the last sample, as a kill mid-write would.
        let len = std::fs::metadata(&journal).unwrap().len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&journal)
            .unwrap();
        f.set_len(len - 5).unwrap();
        drop(f);
        assert_eq!(salvage_segment(&parts[0]).unwrap(), 8);
        assert!(list_unfinished_segments(&segs).is_empty());
        assert!(!journal.exists());
        let segments = list_segments(&segs);
        assert_eq!(segments.len(), 1);
        let mut r = VideoReader::open(&segments).unwrap();
        assert_eq!(r.len(), 8);
        for k in [7usize, 0, 4] {
            assert!((r.time(k).unwrap() - k as f64 * 0.1).abs() < 1e-4);
            let want = (k as u32 * 20 % 256) as f32;
            let got = r.frame(k).unwrap().get_pixel(20, 60).0[0] as f32;
            assert!(
                (got - want).abs() < 12.0,
                "frame {k}: red {got}, want {want}"
            );
        }
        // A journal with no whole sample leaves the files as they are.
        let seg = segs.join("seg_00009.mp4.part");
        std::fs::write(&seg, b"").unwrap();
        std::fs::write(journal_path(&seg), b"CLPRJRN1\x00").unwrap();
        assert!(salvage_segment(&seg).is_err(), "a cut header is an error");
        assert!(seg.exists());
    }

    #[test]
    fn annotations_draw_inside_the_frame() {
        let mut img = RgbImage::new(200, 120);
        let marks = [
            FaceMark {
                id: 1,
                bbox: [10, 2, 60, 60],
                label: Some((3, 0.8)),
            },
            FaceMark {
                id: 2,
                bbox: [150, 80, 80, 80],
                label: None,
            },
        ];
        annotate(&mut img, &marks, 1.5);
        assert_eq!(img.get_pixel(10, 30).0, CLASS_RGB[3].0, "box edge");
        assert_eq!(img.get_pixel(150, 100).0, [255, 255, 255]);
        assert!(img.get_pixel(0, 119).0 == [0, 0, 0] || img.get_pixel(3, 117).0[0] > 0);
    }

    #[test]
    fn fit_letterboxes_other_sizes() {
        let img = RgbImage::from_pixel(100, 100, Rgb([200, 0, 0]));
        let out = fit(&img, (200, 100));
        assert_eq!(out.dimensions(), (200, 100));
        assert_eq!(out.get_pixel(100, 50).0, [200, 0, 0]);
        assert_eq!(out.get_pixel(5, 50).0, [0, 0, 0]);
    }
}
