//! Videos we did not make, against the ffmpeg program's own decode of the
//! same files: frame count, every frame's time, the size after the display
//! matrix, and the pixels of the first, middle and last frames.
//!
//! Ignored by default (the videos are not in the repository): point
//! `CLIPER_EXTERNAL_VIDEOS` at a folder of them and run
//! `cargo test --release --test video_external -- --ignored --nocapture`.

use std::path::{Path, PathBuf};
use std::process::Command;

use cliper::vision::video::{has_video_extension, VideoReader};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    for p in v {
        if p.is_dir() {
            files(&p, out);
        } else if has_video_extension(&p) {
            out.push(p);
        }
    }
}

/// (frame times from the stream's first, `None` where ffprobe has none;
/// displayed width, height) by ffprobe.
fn ffprobe(path: &Path) -> Option<(Vec<Option<f64>>, u32, u32)> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries"])
        .args([
            "frame=best_effort_timestamp_time,width,height",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut times = Vec::new();
    let mut size = (0, 0);
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 3 {
            continue;
        }
        // ffprobe prints the fields in its own order: time, width, height.
        size = (f[1].parse().ok()?, f[2].parse().ok()?);
        times.push(f[0].parse::<f64>().ok());
    }
    if times.is_empty() {
        return None;
    }
    let rot = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries"])
        .args(["stream_side_data=rotation", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .ok()?;
    let r: i64 = String::from_utf8_lossy(&rot.stdout)
        .trim()
        .trim_matches(',')
        .parse()
        .unwrap_or(0);
    let (w, h) = if r.rem_euclid(180) == 90 {
        (size.1, size.0)
    } else {
        size
    };
    let t0 = times[0]?;
    Some((times.iter().map(|t| t.map(|t| t - t0)).collect(), w, h))
}

/// Frame `k` as the ffmpeg program decodes it (autorotated), RGB.
fn ffmpeg_frame(path: &Path, k: usize) -> Option<Vec<u8>> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-vf", &format!("select=eq(n\\,{k})"), "-vsync", "0"])
        .args(["-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .ok()?;
    Some(out.stdout)
}

#[test]
#[ignore]
fn external_videos_decode_like_the_ffmpeg_program() {
    let Some(dir) = std::env::var_os("CLIPER_EXTERNAL_VIDEOS") else {
        eprintln!("CLIPER_EXTERNAL_VIDEOS is not set: nothing to check");
        return;
    };
    let mut all = Vec::new();
    files(Path::new(&dir), &mut all);
    let mut failures = Vec::new();
    for path in &all {
        let name = path.display().to_string();
        let reference = ffprobe(path);
        let mut r = match VideoReader::open(path) {
            Ok(r) => r,
            Err(e) => {
                if reference.is_some() {
                    failures.push(format!("{name}: ffprobe reads it, cliper: {e}"));
                }
                println!("{name}: not a video for cliper: {e}");
                continue;
            }
        };
        let Some((times, w, h)) = reference else {
            println!("{name}: ffprobe finds no frames; cliper opened it");
            continue;
        };
        let n = times.len();
        let pick = [0, n / 2, n - 1];
        let mut ours = Vec::new();
        let mut kept = Vec::new();
        let mut k = 0;
        let (mut warns, mut failed) = (Vec::new(), None);
        loop {
            match r.next_frame() {
                Ok(Some(f)) => {
                    if pick.contains(&k) {
                        kept.push((k, f.image.clone()));
                    }
                    ours.push(f.t);
                    k += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
            warns.extend(r.take_warnings());
        }
        warns.extend(r.take_warnings());
        let info = r.info().clone();
        let t0 = ours.first().copied().unwrap_or(0.0);
        let worst_t = ours
            .iter()
            .zip(&times)
            .filter_map(|(a, b)| b.map(|b| ((a - t0) - b).abs()))
            .fold(0.0, f64::max);
        let mut worst_px = 0.0f64;
        for (k, img) in &kept {
            if let Some(want) = ffmpeg_frame(path, *k) {
                if want.len() == img.as_raw().len() {
                    let d = img
                        .as_raw()
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs() as f64)
                        .sum::<f64>()
                        / want.len() as f64;
                    worst_px = worst_px.max(d);
                }
            }
        }
        println!(
            "{name}: {} {}x{} rot {} | frames {} (ffprobe {n}) | worst time diff {:.1} ms | worst pixel diff {worst_px:.2} | warnings {}",
            info.codec,
            info.width,
            info.height,
            info.rotation,
            ours.len(),
            worst_t * 1000.0,
            warns.len()
        );
        if let Some(e) = failed {
            failures.push(format!("{name}: stopped with an error: {e}"));
        }
        if ours.len() != n {
            failures.push(format!("{name}: {} frames, ffprobe {n}", ours.len()));
        }
        if (info.width, info.height) != (w, h) {
            failures.push(format!(
                "{name}: {}x{}, ffprobe shows {w}x{h}",
                info.width, info.height
            ));
        }
        if worst_t > 2e-3 {
            failures.push(format!("{name}: times off by {:.1} ms", worst_t * 1000.0));
        }
        if worst_px > 6.0 {
            failures.push(format!(
                "{name}: pixels differ from ffmpeg's by {worst_px:.2}"
            ));
        }
    }
    println!("{} files, {} failures", all.len(), failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
