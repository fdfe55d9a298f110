//! AVI files with MJPEG or uncompressed video: a small RIFF parser that
//! finds the video stream's frame chunks (`NNdc` / `NNdb` in `movi` lists,
//! OpenDML `AVIX` extensions included), each decoded on demand.
//!
//! The parser only reads chunk headers while opening (seeking over the
//! data), so opening a large file is quick and memory stays flat.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;

use super::{Frame, FrameSource, SourceError};

/// FourCCs of Motion-JPEG in the wild.
const MJPEG_CODECS: &[&[u8; 4]] = &[
    b"MJPG", b"mjpg", b"JPEG", b"jpeg", b"AVRn", b"AVDJ", b"dmb1", b"LJPG", b"ljpg", b"MJLS",
];

/// Nesting of LIST chunks followed while looking for frames.
const MAX_DEPTH: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Codec {
    Jpeg,
    /// Uncompressed bottom-up (or top-down when `top_down`) BGR/BGRX rows.
    Raw {
        bits: u16,
        top_down: bool,
    },
}

pub struct AviSource {
    path: PathBuf,
    file: BufReader<File>,
    /// (offset, size) of each frame's data.
    chunks: Vec<(u64, u32)>,
    width: u32,
    height: u32,
    codec: Codec,
    fps: f64,
    next: usize,
    last: Option<Arc<RgbImage>>,
}

#[derive(Default)]
struct Header {
    width: u32,
    height: u32,
    micros_per_frame: u32,
    streams: u32,
    video_stream: Option<u32>,
    rate: u32,
    scale: u32,
    compression: [u8; 4],
    bits: u16,
    top_down: bool,
    chunk_ids: [[u8; 4]; 2],
}

impl AviSource {
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let err = |reason: String| SourceError::Video {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SourceError::NotFound(path.to_path_buf()),
            _ => err(e.to_string()),
        })?;
        let size = file.metadata().map_err(|e| err(e.to_string()))?.len();
        let mut file = BufReader::new(file);
        let mut head = Header::default();
        let mut chunks = Vec::new();
        let mut pos = 0u64;
        let mut riffs = 0;
        // Top level: RIFF 'AVI ' then optional RIFF 'AVIX' extensions.
        while pos + 12 <= size {
            let (id, len) = read_chunk_header(&mut file, pos).map_err(&err)?;
            let mut kind = [0u8; 4];
            file.read_exact(&mut kind)
                .map_err(|e| err(format!("truncated at byte {pos}: {e}")))?;
            if &id != b"RIFF" || !(&kind == b"AVI " || &kind == b"AVIX") {
                if riffs == 0 {
                    return Err(err("not an AVI file (no RIFF 'AVI ' header)".into()));
                }
                break;
            }
            riffs += 1;
            let end = (pos + 8 + u64::from(len)).min(size);
            walk(&mut file, pos + 12, end, 0, &mut head, &mut chunks).map_err(&err)?;
            pos = end + (end & 1);
        }
        if riffs == 0 {
            return Err(err("not an AVI file (no RIFF 'AVI ' header)".into()));
        }
        if head.video_stream.is_none() {
            return Err(err("it has no video stream".into()));
        }
        let codec = if head.compression == [0; 4] || &head.compression == b"DIB " {
            if head.bits != 24 && head.bits != 32 {
                return Err(err(format!(
                    "uncompressed video with {} bits per pixel is not supported (24 or 32 are)",
                    head.bits
                )));
            }
            Codec::Raw {
                bits: head.bits,
                top_down: head.top_down,
            }
        } else if MJPEG_CODECS.contains(&&head.compression) {
            Codec::Jpeg
        } else {
            return Err(err(format!(
                "its video codec is '{}'; cliper reads MJPEG or uncompressed AVI (convert with `ffmpeg -i IN -c:v mjpeg -q:v 3 OUT.avi`)",
                String::from_utf8_lossy(&head.compression)
            )));
        };
        if chunks.is_empty() {
            return Err(err("the video stream has no frames".into()));
        }
        let fps = if head.rate > 0 && head.scale > 0 {
            f64::from(head.rate) / f64::from(head.scale)
        } else if head.micros_per_frame > 0 {
            1e6 / f64::from(head.micros_per_frame)
        } else {
            25.0
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
            chunks,
            width: head.width,
            height: head.height,
            codec,
            fps: fps.clamp(0.1, 1000.0),
            next: 0,
            last: None,
        })
    }

    fn decode(&self, data: &[u8]) -> Result<RgbImage, String> {
        match self.codec {
            Codec::Jpeg => image::load_from_memory_with_format(data, image::ImageFormat::Jpeg)
                .map(|i| i.to_rgb8())
                .map_err(|e| format!("bad JPEG data: {e}")),
            Codec::Raw { bits, top_down } => {
                let (w, h) = (self.width as usize, self.height as usize);
                let bpp = usize::from(bits / 8);
                let stride = (w * bpp).div_ceil(4) * 4;
                if w == 0 || h == 0 || data.len() < stride * h {
                    return Err(format!(
                        "frame has {} bytes, expected {} for {w}x{h}",
                        data.len(),
                        stride * h
                    ));
                }
                let mut out = Vec::with_capacity(w * h * 3);
                for y in 0..h {
                    let row = if top_down { y } else { h - 1 - y };
                    let line = &data[row * stride..row * stride + w * bpp];
                    for p in line.chunks_exact(bpp) {
                        out.extend([p[2], p[1], p[0]]);
                    }
                }
                RgbImage::from_raw(self.width, self.height, out)
                    .ok_or_else(|| "frame size mismatch".to_string())
            }
        }
    }
}

impl FrameSource for AviSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        let Some(&(offset, size)) = self.chunks.get(self.next) else {
            return Ok(None);
        };
        let index = self.next as u64;
        self.next += 1;
        let err = |reason: String| SourceError::Video {
            path: self.path.clone(),
            reason: format!("frame {index}: {reason}"),
        };
        let image = if size == 0 {
            // An empty chunk repeats the previous frame.
            match &self.last {
                Some(last) => last.clone(),
                None => return Err(err("the first frame is empty".into())),
            }
        } else {
            let mut data = vec![0u8; size as usize];
            self.file
                .seek(SeekFrom::Start(offset))
                .and_then(|_| self.file.read_exact(&mut data))
                .map_err(|e| err(format!("truncated file: {e}")))?;
            Arc::new(self.decode(&data).map_err(err)?)
        };
        self.last = Some(image.clone());
        Ok(Some(Frame {
            image,
            index,
            t: index as f64 / self.fps,
        }))
    }
    fn frame_count(&self) -> Option<u64> {
        Some(self.chunks.len() as u64)
    }
    fn fps(&self) -> f64 {
        self.fps
    }
    fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }
}

fn read_chunk_header<R: Read + Seek>(r: &mut R, pos: u64) -> Result<([u8; 4], u32), String> {
    let mut h = [0u8; 8];
    r.seek(SeekFrom::Start(pos))
        .and_then(|_| r.read_exact(&mut h))
        .map_err(|e| format!("truncated at byte {pos}: {e}"))?;
    Ok((
        [h[0], h[1], h[2], h[3]],
        u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
    ))
}

fn read_body<R: Read + Seek>(r: &mut R, pos: u64, len: u32, max: usize) -> Result<Vec<u8>, String> {
    let n = (len as usize).min(max);
    let mut b = vec![0u8; n];
    r.seek(SeekFrom::Start(pos))
        .and_then(|_| r.read_exact(&mut b))
        .map_err(|e| format!("truncated at byte {pos}: {e}"))?;
    Ok(b)
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    b.get(i..i + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}

/// Walks the chunks in `[start, end)`, filling the header and frame list.
fn walk<R: Read + Seek>(
    r: &mut R,
    start: u64,
    end: u64,
    depth: u32,
    head: &mut Header,
    chunks: &mut Vec<(u64, u32)>,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err("LIST chunks nested too deeply".into());
    }
    let mut pos = start;
    while pos + 8 <= end {
        let (id, len) = read_chunk_header(r, pos)?;
        let body = pos + 8;
        let body_end = body + u64::from(len);
        // A truncated last chunk ends the walk; what came before it is kept.
        // (A truncated LIST is still entered, up to the end of the file.)
        if body_end > end && &id != b"LIST" {
            break;
        }
        match &id {
            b"LIST" if len >= 4 => {
                let kind = read_body(r, body, 4, 4)?;
                if kind.as_slice() == b"strl" {
                    head.streams += 1;
                }
                walk(r, body + 4, body_end.min(end), depth + 1, head, chunks)?;
            }
            b"avih" => {
                let b = read_body(r, body, len, 64)?;
                head.micros_per_frame = u32_at(&b, 0);
                if head.width == 0 {
                    head.width = u32_at(&b, 32);
                    head.height = u32_at(&b, 36);
                }
            }
            b"strh" => {
                let b = read_body(r, body, len, 64)?;
                if b.get(..4) == Some(b"vids") && head.video_stream.is_none() {
                    let n = head.streams.saturating_sub(1);
                    head.video_stream = Some(n);
                    head.scale = u32_at(&b, 20);
                    head.rate = u32_at(&b, 24);
                    let tag = format!("{n:02}");
                    let t = tag.as_bytes();
                    head.chunk_ids = [[t[0], t[1], b'd', b'c'], [t[0], t[1], b'd', b'b']];
                }
            }
            // The strf that follows the video strh (same strl).
            b"strf"
                if head.video_stream == Some(head.streams.saturating_sub(1))
                    && head.compression == [0; 4]
                    && head.bits == 0 =>
            {
                let b = read_body(r, body, len, 40)?;
                let w = u32_at(&b, 4) as i32;
                let h = u32_at(&b, 8) as i32;
                head.width = w.unsigned_abs();
                head.height = h.unsigned_abs();
                head.top_down = h < 0;
                head.bits = b
                    .get(14..16)
                    .map(|s| u16::from_le_bytes([s[0], s[1]]))
                    .unwrap_or(0);
                if let Some(c) = b.get(16..20) {
                    head.compression = [c[0], c[1], c[2], c[3]];
                }
            }
            _ if head.video_stream.is_some() && head.chunk_ids.contains(&id) => {
                chunks.push((body, len));
            }
            _ => {}
        }
        pos = body_end + (body_end & 1);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a minimal AVI with the given codec and frame payloads.
    pub fn write_avi(
        path: &Path,
        w: u32,
        h: u32,
        codec: &[u8; 4],
        bits: u16,
        fps: u32,
        frames: &[Vec<u8>],
    ) {
        fn chunk(id: &[u8], body: &[u8]) -> Vec<u8> {
            let mut v = id.to_vec();
            v.extend((body.len() as u32).to_le_bytes());
            v.extend(body);
            if !body.len().is_multiple_of(2) {
                v.push(0);
            }
            v
        }
        fn list(kind: &[u8], body: &[u8]) -> Vec<u8> {
            let mut b = kind.to_vec();
            b.extend(body);
            chunk(b"LIST", &b)
        }
        let mut avih = vec![0u8; 56];
        avih[0..4].copy_from_slice(&(1_000_000 / fps).to_le_bytes());
        avih[16..20].copy_from_slice(&(frames.len() as u32).to_le_bytes());
        avih[24..28].copy_from_slice(&1u32.to_le_bytes());
        avih[32..36].copy_from_slice(&w.to_le_bytes());
        avih[36..40].copy_from_slice(&h.to_le_bytes());
        let mut strh = vec![0u8; 56];
        strh[0..4].copy_from_slice(b"vids");
        strh[4..8].copy_from_slice(codec);
        strh[20..24].copy_from_slice(&1u32.to_le_bytes());
        strh[24..28].copy_from_slice(&fps.to_le_bytes());
        let mut strf = vec![0u8; 40];
        strf[0..4].copy_from_slice(&40u32.to_le_bytes());
        strf[4..8].copy_from_slice(&w.to_le_bytes());
        strf[8..12].copy_from_slice(&h.to_le_bytes());
        strf[12..14].copy_from_slice(&1u16.to_le_bytes());
        strf[14..16].copy_from_slice(&bits.to_le_bytes());
        let compression: [u8; 4] = if codec == b"DIB " { [0; 4] } else { *codec };
        strf[16..20].copy_from_slice(&compression);
        let strl = list(
            b"strl",
            &[chunk(b"strh", &strh), chunk(b"strf", &strf)].concat(),
        );
        let hdrl = list(b"hdrl", &[chunk(b"avih", &avih), strl].concat());
        let movi_body: Vec<u8> = frames.iter().flat_map(|f| chunk(b"00dc", f)).collect();
        let movi = list(b"movi", &movi_body);
        let mut body = b"AVI ".to_vec();
        body.extend(hdrl);
        body.extend(movi);
        std::fs::write(path, chunk(b"RIFF", &body)).unwrap();
    }

    fn jpeg(img: &RgbImage) -> Vec<u8> {
        let mut buf = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90)
            .encode_image(img)
            .unwrap();
        buf
    }

    #[test]
    fn reads_mjpeg_frames() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("clip.avi");
        let frames: Vec<Vec<u8>> = (0..3u8)
            .map(|i| jpeg(&RgbImage::from_pixel(32, 16, image::Rgb([i * 100, 50, 50]))))
            .collect();
        let mut with_empty = frames.clone();
        with_empty.push(Vec::new());
        write_avi(&p, 32, 16, b"MJPG", 24, 10, &with_empty);
        let mut src = AviSource::open(&p).unwrap();
        assert_eq!(src.frame_count(), Some(4));
        assert!((src.fps() - 10.0).abs() < 1e-9);
        let mut reds = Vec::new();
        while let Some(f) = src.next_frame().unwrap() {
            assert_eq!(f.image.dimensions(), (32, 16));
            reds.push(f.image.get_pixel(5, 5)[0]);
        }
        assert_eq!(reds.len(), 4);
        assert!(
            reds[0] < 20 && reds[2] > 180 && reds[3] == reds[2],
            "{reds:?}"
        );
    }

    #[test]
    fn reads_uncompressed_bottom_up_frames() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("raw.avi");
        // 3x2 BGR, bottom-up, rows padded to 12 bytes; the top row is red.
        let mut data = Vec::new();
        for (b, g, r) in [(0u8, 255u8, 0u8), (0, 0, 255)] {
            for _ in 0..3 {
                data.extend([b, g, r]);
            }
            data.extend([0, 0, 0]);
        }
        write_avi(&p, 3, 2, b"DIB ", 24, 25, &[data]);
        let mut src = AviSource::open(&p).unwrap();
        let f = src.next_frame().unwrap().unwrap();
        assert_eq!(f.image.get_pixel(0, 0).0, [255, 0, 0]);
        assert_eq!(f.image.get_pixel(2, 1).0, [0, 255, 0]);
    }

    #[test]
    fn bad_files_are_clean_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.avi");
        std::fs::write(&p, b"RIFF\x04\0\0\0WAVE").unwrap();
        let e = AviSource::open(&p).err().unwrap().to_string();
        assert!(e.contains("x.avi") && e.contains("not an AVI"), "{e}");
        write_avi(&p, 4, 4, b"XVID", 24, 25, &[vec![1, 2, 3]]);
        let e = AviSource::open(&p).err().unwrap().to_string();
        assert!(e.contains("XVID"), "{e}");
        write_avi(&p, 4, 4, b"MJPG", 24, 25, &[b"not a jpeg".to_vec()]);
        let mut src = AviSource::open(&p).unwrap();
        let e = src.next_frame().unwrap_err().to_string();
        assert!(e.contains("frame 0") && e.contains("x.avi"), "{e}");
        let data = std::fs::read(&p).unwrap();
        std::fs::write(&p, &data[..data.len() / 2]).unwrap();
        assert!(AviSource::open(&p).is_err());
    }
}
