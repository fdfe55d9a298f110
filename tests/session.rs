//! Recording sessions end to end: `cliper run --record` from an image
//! folder (JSONL, CSV, meta and video agree), a SIGKILL mid-recording and
//! the recovery by the next `cliper report`, a folder that cannot be written
//! (before and during a run), and replay and reports without weights.

mod common;

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cliper::model::cliper::expressions::CLASSES;
use cliper::session::meta::{SessionMeta, SessionStatus};
use cliper::session::record::{parse_csv_row, FrameRecord};
use cliper::session::Session;
use common::*;
use image::RgbImage;

/// Writes `n` frames; frames past `distinct` repeat earlier pictures as hard
/// links (a long source, cheaply).
fn write_frames(dir: &Path, n: u32, distinct: u32) -> Vec<RgbImage> {
    std::fs::create_dir_all(dir).unwrap();
    let portrait = astronaut();
    let frames: Vec<RgbImage> = (0..distinct.min(n))
        .map(|i| two_faces(&portrait, i))
        .collect();
    for i in 0..n {
        let path = dir.join(format!("frame{i:04}.png"));
        let k = i % distinct;
        if i < distinct {
            frames[k as usize].save(&path).unwrap();
        } else {
            let first = dir.join(format!("frame{k:04}.png"));
            std::fs::hard_link(&first, &path).unwrap_or_else(|_| {
                std::fs::copy(&first, &path).unwrap();
            });
        }
    }
    frames
}

/// Frames of a video as ffprobe counts them; `None` without ffprobe.
fn ffprobe_frames(path: &Path) -> Option<usize> {
    let out = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-count_frames"])
        .args(["-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn read_lines(path: &Path) -> Vec<String> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::io::BufReader::new(f)
        .lines()
        .map(|l| l.unwrap())
        .collect()
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap();
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Mean absolute difference of two images of the same size.
fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let s: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (*x as i64 - *y as i64).unsigned_abs())
        .sum();
    s as f64 / a.as_raw().len() as f64
}

const FRAMES: u32 = 12;

/// One recorded session (12 two-face frames at 10 fps, with the raw video)
/// shared by the tests that read it: (session dir, source frames, stdout
/// of `run --json`, stderr).
fn recorded() -> &'static (PathBuf, Vec<RgbImage>, String, String) {
    static SESSION: OnceLock<(PathBuf, Vec<RgbImage>, String, String)> = OnceLock::new();
    SESSION.get_or_init(|| {
        let root = tempfile::tempdir().unwrap().keep();
        let frames = write_frames(&root.join("frames"), FRAMES, FRAMES);
        let dir = root.join("session");
        let (code, out, err) = cliper(&[
            "run",
            "--source",
            root.join("frames").to_str().unwrap(),
            "--fps",
            "10",
            "--weights",
            &weights(),
            "--json",
            "--top",
            "3",
            "--record",
            dir.to_str().unwrap(),
            "--record-raw",
            // The live detector settings: at 40 px the frontal cascade
            // also fires on the suit in one frame, and this test is about
            // recording two stable faces, not about detection.
            "--min-face",
            "64",
            "--detect-size",
            "480",
        ]);
        assert_eq!(code, 0, "{err}");
        (dir, frames, out, err)
    })
}

#[test]
fn a_recorded_run_round_trips() {
    let (dir, frames, out, err) = recorded();
    assert!(
        err.contains("recorded 12 frames (24 face rows, 12 video frames)"),
        "{err}"
    );
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "meta.json",
            "raw.mp4",
            "session.csv",
            "session.jsonl",
            "video.mp4"
        ],
        "segments, temporary files and the lock are gone"
    );

    // meta.json
    let meta = SessionMeta::read(dir).unwrap();
    assert_eq!(meta.status, SessionStatus::Complete);
    assert_eq!(meta.clock, "source");
    assert_eq!(meta.classes, CLASSES);
    assert_eq!((meta.counts.frames, meta.counts.face_rows), (12, 24));
    assert_eq!(
        (meta.counts.video_frames, meta.counts.video_frames_dropped),
        (12, 0)
    );
    assert!(meta.ended.as_deref() >= Some(meta.started.as_str()));
    let model = meta.model.as_ref().expect("model in meta");
    let weights_file = PathBuf::from(&model.weights);
    assert!(weights_file.starts_with(weights()), "{}", model.weights);
    assert_eq!(
        model.weights_sha256.as_deref(),
        Some(sha256_hex(&weights_file).as_str())
    );
    assert_eq!(model.device, "CPU");
    assert_eq!(meta.banks.len(), 1);
    assert_eq!(meta.banks[0].kind, "zero-shot");
    assert_eq!(meta.banks[0].texts.len(), 35);
    assert_eq!(meta.sources.len(), 1);
    assert_eq!(
        (meta.sources[0].fps, meta.sources[0].frames),
        (10.0, Some(12))
    );
    assert_eq!(meta.settings["command"], "run");
    let video = meta.video.as_ref().unwrap();
    assert_eq!((video.width, video.height, video.raw), (1120, 560, true));

    // session.jsonl: one record per frame, in order, two stable faces.
    let lines = read_lines(&dir.join("session.jsonl"));
    assert_eq!(lines.len(), FRAMES as usize);
    let records: Vec<FrameRecord> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut ids = BTreeSet::new();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.frame, i as u64);
        assert!((r.t - i as f64 * 0.1).abs() < 1e-6, "t {}", r.t);
        assert_eq!(r.faces.len(), 2);
        for f in &r.faces {
            ids.insert(f.id);
            let p = f.probs(&CLASSES);
            assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            assert_eq!(f.descriptors.len(), 3, "--top 3");
            assert!(f.dynamic.is_none() && f.smoothed.is_none());
        }
    }
    assert_eq!(ids, BTreeSet::from([1, 2]));

    // The recorded scores are the ones `run --json` printed.
    let printed: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(printed.len(), records.len());
    for (p, r) in printed.iter().zip(&records) {
        assert_eq!(p["frame"], r.frame);
        for (pf, rf) in p["faces"].as_array().unwrap().iter().zip(&r.faces) {
            assert_eq!(pf["id"], rf.id);
            assert_eq!(pf["box"], serde_json::json!(rf.bbox));
            assert_eq!(pf["predicted"], rf.predicted.as_str());
            for (c, cls) in rf.classes.iter().enumerate() {
                let printed_p = pf["classes"][c]["prob"].as_f64().unwrap() as f32;
                assert_eq!(printed_p, cls.prob, "frame {} face {}", r.frame, rf.id);
            }
        }
    }

    // session.csv: rows = frames x faces, equal to the JSONL.
    let csv = read_lines(&dir.join("session.csv"));
    assert!(csv[0].starts_with(
        "t,frame,face_id,x,y,w,h,predicted,surprise,fear,disgust,happiness,sadness,anger,neutral,"
    ));
    let rows: Vec<_> = csv[1..]
        .iter()
        .map(|l| parse_csv_row(l, CLASSES.len()).unwrap())
        .collect();
    assert_eq!(
        rows.len(),
        records.iter().map(|r| r.faces.len()).sum::<usize>()
    );
    let mut k = 0;
    for r in &records {
        for f in &r.faces {
            let row = &rows[k];
            k += 1;
            assert_eq!((row.frame, row.face_id, row.bbox), (r.frame, f.id, f.bbox));
            assert!((row.t - r.t).abs() < 1e-6);
            assert_eq!(row.probs, f.probs(&CLASSES));
            assert_eq!(row.scores, f.scores(&CLASSES));
            assert_eq!(row.predicted, f.predicted);
            assert_eq!(row.wall, r.wall);
            assert_eq!((&row.dynamic, &row.smoothed), (&None, &None));
        }
    }

    // video.mp4: every frame at its time, with the boxes drawn; raw.mp4:
    // the same frames without them.
    let session = Session::open(dir).unwrap();
    let mut v = session.open_video().unwrap().expect("a video");
    assert_eq!(v.len(), FRAMES as usize);
    assert_eq!(v.size(), (1120, 560));
    for k in 0..v.len() {
        assert!((v.time(k).unwrap() - k as f64 * 0.1).abs() < 1e-4);
    }
    let k = 5;
    let annotated = v.frame(k).unwrap();
    let face = &records[k].faces[0];
    let [x, y, _, h] = face.bbox;
    let want =
        cliper::model::cliper::expressions::class_rgb(CLASSES[face.predicted_index(&CLASSES)]);
    let dist = |a: [u8; 3], b: [u8; 3]| -> i32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (*x as i32 - y as i32).abs())
            .sum()
    };
    // Down the box's left edge, the class colour replaced the picture.
    for yy in (y + 10..y + h - 10).step_by(7) {
        let edge = annotated.get_pixel(x + 1, yy).0;
        let under = frames[k].get_pixel(x + 1, yy).0;
        assert!(
            dist(edge, want) < 60 && dist(edge, want) < dist(edge, under),
            "box edge at y={yy}: {edge:?}, class colour {want:?}, picture {under:?}"
        );
    }
    assert_eq!(session.raw_video_file(), Some(dir.join("raw.mp4")));
    let mut raw = cliper::vision::video::IndexedVideo::open(&dir.join("raw.mp4")).unwrap();
    assert_eq!(raw.len(), FRAMES as usize);
    let raw5 = raw.frame(k).unwrap();
    let diff = mean_abs_diff(&raw5, &frames[k]);
    assert!(diff < 6.0, "raw frame differs from the source by {diff}");
    assert!(
        mean_abs_diff(&annotated, &frames[k]) > diff,
        "annotations are drawn"
    );
    if let Some(out) = std::env::var_os("CLIPER_TEST_DUMP") {
        annotated
            .save(Path::new(&out).join("annotated_frame5.png"))
            .unwrap();
    }
}

#[test]
fn replay_and_report_need_no_weights() {
    let (dir, _, _, _) = recorded();
    // Replay data: records, timelines and video frames, no model involved.
    let session = Session::open(dir).unwrap();
    assert_eq!(session.bad_lines, 0);
    assert_eq!(session.face_ids(), [1, 2]);
    let tl = session.timeline(1);
    assert_eq!(tl.len(), FRAMES as usize);
    assert_eq!(session.index_at(0.55), Some(5));
    // The bank's layout, as meta.json records it, for replay's store; a
    // record's scores come back in it.
    let layouts = session.layouts();
    assert_eq!(layouts.len(), 1, "{layouts:?}");
    let layout = &layouts[0].1;
    assert_eq!(layout.classes(), session.classes().as_slice());
    assert_eq!(layout.num_descriptors(), 35);
    let face = &session.frames[5].faces[0];
    let scores = face.expression_scores(layout);
    assert_eq!(scores.probs, face.probs(&session.classes()));
    assert_eq!(scores.predicted_name(), face.predicted);
    let mut v = session.open_video().unwrap().unwrap();
    let last = v.frame(v.len() - 1).unwrap();
    assert_eq!(last.dimensions(), (1120, 560));

    // The report, with the weights out of reach.
    let out_dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cliper"))
        .args(["report", dir.to_str().unwrap(), "--json", "--png-dir"])
        .arg(out_dir.path())
        .env("CLIPER_WEIGHTS", "/nonexistent")
        .env("HF_HOME", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["frames"], FRAMES);
    assert_eq!(j["faces"].as_array().unwrap().len(), 2);
    let f1 = &j["faces"][0];
    assert_eq!(f1["id"], 1);
    assert_eq!(f1["frames"], FRAMES);
    let share: f64 = CLASSES
        .iter()
        .map(|c| f1["dominant_share"][*c].as_f64().unwrap())
        .sum();
    assert!((share - 1.0).abs() < 1e-5, "{share}");
    // The dominant class is the most frequent prediction.
    let mut counts = [0usize; 7];
    for p in &tl {
        counts[p.predicted] += 1;
    }
    let most = (0..7).max_by_key(|&c| counts[c]).unwrap();
    assert_eq!(f1["dominant"], CLASSES[most]);
    let mean: f64 = tl.iter().map(|p| f64::from(p.probs[most])).sum::<f64>() / tl.len() as f64;
    let reported = f1["mean_probs"][CLASSES[most]].as_f64().unwrap();
    assert!((mean - reported).abs() < 1e-5, "{mean} vs {reported}");
    for id in [1, 2] {
        let png = out_dir.path().join(format!("timeline_{id}.png"));
        let img = image::open(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (1100, 460));
        // The dominant class's curve is in the picture.
        let want = cliper::model::cliper::expressions::class_rgb(CLASSES[most]);
        assert!(img.pixels().filter(|p| p.0 == want).count() > 200);
    }
    assert_eq!(j["timelines"].as_array().unwrap().len(), 2);

    // Text report.
    let (code, text, err) = cliper(&["report", dir.to_str().unwrap(), "--no-png"]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("12 frames over 1.1 s, 2 face(s)"), "{text}");
    assert!(text.contains("face #1: 12 frames"), "{text}");
    assert!(
        text.contains(&format!("mostly {}", CLASSES[most])),
        "{text}"
    );
    if let Some(out) = std::env::var_os("CLIPER_TEST_DUMP") {
        std::fs::copy(
            out_dir.path().join("timeline_1.png"),
            Path::new(&out).join("timeline_1.png"),
        )
        .unwrap();
    }

    // Not a session: a clean error naming the folder.
    let e = assert_clean_error(&["report", out_dir.path().to_str().unwrap()], "meta.json");
    assert!(e.contains(out_dir.path().to_str().unwrap()), "{e}");
}

#[test]
fn sigkill_mid_recording_leaves_a_readable_session_that_report_recovers() {
    let root = tempfile::tempdir().unwrap();
    // 400 frames at 10 fps: far longer than the test waits.
    write_frames(&root.path().join("frames"), 400, 16);
    let dir = root.path().join("session");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cliper"))
        .args(["run", "--source"])
        .arg(root.path().join("frames"))
        .args(["--fps", "10", "--weights", &weights(), "--record"])
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until 50 frames are recorded.
    let jsonl = dir.join("session.jsonl");
    let start = Instant::now();
    let mut seen = 0;
    while seen < 50 {
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "only {seen} frames recorded in 240 s"
        );
        std::thread::sleep(Duration::from_millis(100));
        seen = std::fs::read(&jsonl)
            .map(|b| b.iter().filter(|&&c| c == b'\n').count())
            .unwrap_or(0);
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // As the kill left it: still "recording", and every whole line reads.
    let meta = SessionMeta::read(&dir).unwrap();
    assert_eq!(meta.status, SessionStatus::Recording);
    let text = std::fs::read_to_string(&jsonl).unwrap();
    let whole = text.matches('\n').count();
    assert!(whole >= seen, "{whole} < {seen}");
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        serde_json::from_str::<FrameRecord>(line).unwrap();
    }
    let csv = std::fs::read_to_string(dir.join("session.csv")).unwrap();
    let csv_rows: Vec<&str> = csv
        .split_inclusive('\n')
        .skip(1)
        .filter(|l| l.ends_with('\n'))
        .collect();
    for row in &csv_rows {
        assert!(parse_csv_row(row, CLASSES.len()).is_some(), "{row}");
    }
    // The video plays as the kill left it, without any repair: through
    // cliper's decoder and through ffprobe. It lacks at most the fragment
    // being filled (FRAGMENT_SECS at 10 fps) and the frame being encoded.
    let killed = cliper::vision::video::IndexedVideo::open(&dir.join("video.mp4")).unwrap();
    let most_lost = (cliper::vision::video::FRAGMENT_SECS * 10.0).ceil() as usize + 1;
    assert!(
        killed.len() + most_lost >= whole && killed.len() <= whole,
        "{} video frames for {whole} JSONL frames",
        killed.len()
    );
    if let Some(n) = ffprobe_frames(&dir.join("video.mp4")) {
        assert_eq!(n, killed.len(), "ffprobe reads what cliper reads");
    }

    // The next `cliper report` finalises it.
    let (code, out, err) = cliper(&["report", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("recovered unfinished session"), "{err}");
    assert!(out.contains("face #1:"), "{out}");
    assert!(dir.join("timeline_1.png").is_file());
    let meta = SessionMeta::read(&dir).unwrap();
    assert_eq!(meta.status, SessionStatus::Recovered);
    let rec = meta.recovery.as_ref().unwrap();
    // At most the line being written is lost.
    let session = Session::open(&dir).unwrap();
    assert_eq!(session.bad_lines, 0);
    assert_eq!(session.frames.len(), whole);
    assert_eq!(meta.counts.frames, whole as u64);
    assert!(rec.jsonl_bytes_cut < 20_000);
    // The CSV agrees with the JSONL again (rebuilt if the kill fell between
    // a frame's two writes).
    let faces: usize = session.frames.iter().map(|f| f.faces.len()).sum();
    let csv_after = read_lines(&dir.join("session.csv"));
    assert_eq!(csv_after.len() - 1, faces);
    assert_eq!(meta.counts.face_rows, faces as u64);
    assert!(csv_after[1..]
        .iter()
        .all(|r| parse_csv_row(r, CLASSES.len()).is_some()));
    // The video is the one the kill left, unchanged and counted.
    let mut v = session.open_video().unwrap().unwrap();
    assert_eq!(session.video_file(), Some(dir.join("video.mp4")));
    println!("{} JSONL frames, {} video frames", whole, v.len());
    assert_eq!(v.len(), killed.len());
    assert_eq!(rec.video_frames, Some(v.len() as u64));
    assert_eq!(meta.counts.video_frames, v.len() as u64);
    // Its frame times are the JSONL's `t` (minus the video's start).
    let start_t = session.video_start_t();
    for (k, f) in session.frames.iter().take(v.len()).enumerate() {
        let vt = v.time(k).unwrap();
        assert!(
            (vt - (f.t - start_t)).abs() < 2e-3,
            "frame {k}: {vt} vs {}",
            f.t
        );
    }
    v.frame(v.len() - 1).unwrap();
    assert!(!dir.join("recording.lock").exists());
    // Reporting again changes nothing.
    let (code, _, err) = cliper(&["report", dir.to_str().unwrap(), "--no-png"]);
    assert_eq!(code, 0);
    assert!(!err.contains("recovered"), "{err}");
}

#[test]
fn an_unwritable_folder_is_an_error_and_the_run_goes_on() {
    let root = tempfile::tempdir().unwrap();
    write_frames(&root.path().join("frames"), 4, 4);
    // A regular file where a folder should be: no user can write under it.
    let blocker = root.path().join("not-a-folder");
    std::fs::write(&blocker, b"x").unwrap();
    let target = blocker.join("session");
    let (code, out, err) = cliper(&[
        "run",
        "--source",
        root.path().join("frames").to_str().unwrap(),
        "--weights",
        &weights(),
        "--json",
        "--record",
        target.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("cannot record to"), "{err}");
    assert!(err.contains("not-a-folder"), "{err}");
    assert_eq!(out.lines().count(), 4, "every frame was still processed");

    // A folder that is not empty is refused: recordings are never overwritten.
    let busy = root.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), b"mine").unwrap();
    let (code, out, err) = cliper(&[
        "run",
        "--source",
        root.path().join("frames").to_str().unwrap(),
        "--weights",
        &weights(),
        "--record",
        busy.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(out.lines().count(), 4);
    assert_eq!(std::fs::read(busy.join("keep.txt")).unwrap(), b"mine");
}

/// The disk fills up mid-recording (here a file-size limit, `ulimit -f`,
/// with SIGXFSZ ignored, so that a write past it fails with EFBIG as one on
/// a full disk fails with ENOSPC): the recording stops with the error, the
/// run goes on to the end, and what was written stays readable.
#[test]
fn a_write_error_mid_recording_stops_the_recording_not_the_pipeline() {
    let root = tempfile::tempdir().unwrap();
    let n = 24;
    write_frames(&root.path().join("frames"), n, n);
    let dir = root.path().join("session");
    // video.mp4 grows by tens of KB a frame and passes the limit after a
    // few; session.jsonl (about 2 KB a frame) stays under it.
    let limit_kb = VIDEO_LIMIT_KB;
    let script = format!("trap '' XFSZ; ulimit -f {}; exec \"$@\"", limit_kb * 2);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_cliper"))
        .args(["run", "--source"])
        .arg(root.path().join("frames"))
        .args(["--fps", "10", "--weights", &weights(), "--json", "--record"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        stdout.lines().count(),
        n as usize,
        "the run went on to the end: {err}"
    );
    assert!(err.contains("recording stopped"), "{err}");
    assert!(err.contains("video.mp4"), "{err}");
    assert_ne!(out.status.code(), Some(0), "the exit status tells: {err}");
    // What was written before the error reads back.
    let session = Session::open(&dir).unwrap();
    assert_eq!(session.bad_lines, 0);
    assert!(!session.frames.is_empty());
    assert!(session.frames.len() < n as usize, "recording stopped");
    let meta = SessionMeta::read(&dir).unwrap();
    assert_eq!(meta.status, SessionStatus::Complete);
    assert!(
        meta.errors.iter().any(|e| e.contains("video.mp4")),
        "{:?}",
        meta.errors
    );
    assert_eq!(meta.counts.frames, session.frames.len() as u64);
    let v = cliper::vision::video::IndexedVideo::open(&dir.join("video.mp4")).unwrap();
    assert!(!v.is_empty() && v.len() < n as usize, "{} frames", v.len());
}

fn xvfb_run() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("xvfb-run"))
        .find(|p| p.is_file())
}

/// `cliper replay DIR --exit-after SECS --screenshot SHOT` under Xvfb, with
/// no weights and a home of its own.
fn replay_under_xvfb(
    xvfb: &Path,
    dir: &Path,
    secs: &str,
    shot: &Path,
    home: &Path,
) -> std::process::Output {
    std::process::Command::new(xvfb)
        .args(["-a", "-s", "-screen 0 1600x1000x24"])
        .arg(env!("CARGO_BIN_EXE_cliper"))
        .arg("replay")
        .arg(dir)
        .args(["--exit-after", secs, "--screenshot"])
        .arg(shot)
        .env("CLIPER_WEIGHTS", "/nonexistent")
        .env("HOME", home)
        .env("XDG_DATA_HOME", home)
        .output()
        .unwrap()
}

/// File-size limit of the write-error test.
const VIDEO_LIMIT_KB: u64 = 150;

#[test]
fn replay_window_shows_the_video_and_timeline() {
    let Some(xvfb) = xvfb_run() else {
        println!("NOTICE: xvfb-run not found; skipping the replay window test");
        return;
    };
    let (dir, _, _, _) = recorded();
    let tmp = tempfile::tempdir().unwrap();
    let shot = tmp.path().join("replay.png");
    let out = replay_under_xvfb(&xvfb, dir, "3", &shot, tmp.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let img = image::open(&shot).unwrap().to_rgb8();
    assert!(img.width() >= 900, "{:?}", img.dimensions());
    // The astronaut's orange suit (the video) is on screen.
    let orange = img
        .pixels()
        .filter(|p| p[0] > 180 && p[1] > 60 && p[1] < 140 && p[2] < 70)
        .count();
    assert!(
        orange > 2_000,
        "no video frame on screen ({orange} orange pixels)"
    );
    // The live window's score panel under the video: the bar of the first
    // face's class as the window showed it, in that class's colour.
    let session = Session::open(dir).unwrap();
    let face = &session.frames[0].faces[0];
    let shown = face
        .smoothed
        .as_ref()
        .map_or(&face.predicted, |s| &s.predicted);
    let [r, g, b] = cliper::model::cliper::expressions::class_rgb(shown);
    let near = |p: &image::Rgb<u8>| {
        (p[0].abs_diff(r) as u32 + p[1].abs_diff(g) as u32 + p[2].abs_diff(b) as u32) < 30
    };
    let top = img.height() * 2 / 3;
    let bar = (0..img.width())
        .flat_map(|x| (top..img.height()).map(move |y| (x, y)))
        .filter(|&(x, y)| near(img.get_pixel(x, y)))
        .count();
    // (The class's timeline curve alone is a thin line across the plot; the
    // bar fills a block: 6,852 pixels of the colour in all at this size.)
    assert!(
        bar > 4_000,
        "no {shown} bar in the score panel ({bar} pixels of its colour)"
    );
    if let Some(out) = std::env::var_os("CLIPER_TEST_DUMP") {
        std::fs::copy(&shot, Path::new(&out).join("replay.png")).unwrap();
    }
}

/// A session whose video was damaged replays its timelines anyway.
#[test]
fn replay_without_a_readable_video_shows_the_timelines() {
    let Some(xvfb) = xvfb_run() else {
        println!("NOTICE: xvfb-run not found; skipping the replay window test");
        return;
    };
    let (dir, _, _, _) = recorded();
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("session");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["meta.json", "session.jsonl", "session.csv"] {
        std::fs::copy(dir.join(f), copy.join(f)).unwrap();
    }
    std::fs::write(copy.join("video.mp4"), b"\0\0\0\x18ftypisom but no more").unwrap();
    let shot = tmp.path().join("replay.png");
    let out = replay_under_xvfb(&xvfb, &copy, "2", &shot, tmp.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("replaying the timelines without the video"),
        "{err}"
    );
    assert!(image::open(&shot).unwrap().width() >= 900);
}

/// The app's path: a recording started while a live pipeline already runs
/// (primed with the source, model and bank it announced before), timed by
/// capture, smoothed values recorded, and finished in the background.
#[test]
fn a_recording_started_mid_session_in_live_mode() {
    use cliper::model::setup::ModelSpec;
    use cliper::pipeline::recorder::{RecordOptions, Recorder};
    use cliper::pipeline::worker::{Pipeline, PipelineConfig, PipelineEvent, RunMode};
    use cliper::vision::source::SourceSpec;

    let root = tempfile::tempdir().unwrap();
    // 10 s of frames: far more than the test waits for.
    write_frames(&root.path().join("frames"), 200, 8);
    let model = ModelSpec {
        weights: Some(weights().into()),
        ..Default::default()
    };
    let source = SourceSpec::Folder {
        path: root.path().join("frames"),
        fps: 20.0,
    };
    let mut config = PipelineConfig::new(source, model, RunMode::Live);
    // The window's smoothing: the pipeline smooths, the recording keeps it.
    config.smoothing = 0.6;
    let pipeline = Pipeline::start(config, || {});
    let (mut info, mut model_info, mut bank) = (None, None, None);
    let mut recorder: Option<Recorder> = None;
    let mut recorded_scores = 0;
    let mut started: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let Ok(ev) = pipeline.events.recv_timeout(Duration::from_secs(5)) else {
            break;
        };
        if let Some(r) = recorder.as_mut() {
            r.observe(&ev);
        }
        match &ev {
            PipelineEvent::SourceOpened(i) => info = Some(i.clone()),
            PipelineEvent::ModelReady(m) => model_info = Some(m.clone()),
            PipelineEvent::BankReady(b) => bank = Some(b.clone()),
            PipelineEvent::ModelFailed(e) => panic!("{e}"),
            // Only frames captured after Record was pressed are recorded
            // (under load, scores of earlier frames still come in).
            PipelineEvent::Scores(s) if recorder.is_some() => {
                recorded_scores += u32::from(started.is_some_and(|t| s.captured >= t));
            }
            PipelineEvent::Scores(_) => {
                // Scores are flowing: press Record.
                let mut r = Recorder::start(
                    RecordOptions::new(root.path().join("session")),
                    RunMode::Live,
                )
                .unwrap();
                started = Some(Instant::now());
                r.prime(info.as_ref(), model_info.as_ref(), bank.as_ref());
                recorder = Some(r);
            }
            PipelineEvent::SourceEnded { .. } => break,
            _ => {}
        }
        if recorded_scores >= 12 {
            break;
        }
    }
    drop(pipeline);
    assert!(
        recorded_scores >= 5,
        "only {recorded_scores} scored frames recorded"
    );
    let report = recorder
        .expect("recording started")
        .finish_in_background()
        .recv()
        .unwrap()
        .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let dir = root.path().join("session");
    let meta = SessionMeta::read(&dir).unwrap();
    assert_eq!(meta.status, SessionStatus::Complete);
    assert_eq!(meta.clock, "capture");
    assert!(meta.model.is_some(), "primed with the model");
    assert_eq!(meta.banks.len(), 1, "primed with the bank");
    assert_eq!(meta.sources.len(), 1, "primed with the source");
    let session = Session::open(&dir).unwrap();
    assert!(session.frames.len() >= 5);
    assert_eq!(session.frames.len() as u64, report.frames);
    // Capture time: from the start of the recording, increasing.
    assert!(session.frames[0].t >= 0.0 && session.frames[0].t < 10.0);
    assert!(session.frames.windows(2).all(|w| w[1].t > w[0].t));
    // Smoothed values as displayed, next to the raw ones.
    // (Live detection may miss a face on a frame: take frames that have one.)
    let with_faces: Vec<_> = session
        .frames
        .iter()
        .filter(|fr| !fr.faces.is_empty())
        .collect();
    assert!(
        with_faces.len() >= 2,
        "faces on {} frames",
        with_faces.len()
    );
    let f = &with_faces[1].faces[0];
    assert!(f.smoothed.is_some());
    // Live frames the video got at least as many as were scored.
    let v = session.open_video().unwrap().expect("video");
    assert!(v.len() >= 5, "{} video frames", v.len());
    assert!(v.len() as u64 == report.video_frames);
}

#[test]
fn live_window_records_with_the_record_flag() {
    let Some(xvfb) = xvfb_run() else {
        println!("NOTICE: xvfb-run not found; skipping the live recording window test");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    write_frames(&root.path().join("frames"), 30, 6);
    let dir = root.path().join("session");
    let out = std::process::Command::new(xvfb)
        .args(["-a", "-s", "-screen 0 1600x1000x24"])
        .arg(env!("CARGO_BIN_EXE_cliper"))
        .args(["live", "--source"])
        .arg(root.path().join("frames"))
        .args(["--weights", &weights(), "--exit-after", "8", "--record"])
        .arg(&dir)
        .env("HOME", root.path())
        .env("XDG_DATA_HOME", root.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Closing the window finished the recording.
    let meta = SessionMeta::read(&dir).unwrap();
    assert_eq!(meta.status, SessionStatus::Complete, "{err}");
    assert!(meta.counts.frames > 5, "{:?}", meta.counts);
    assert!(dir.join("video.mp4").is_file());
    assert!(!dir.join("recording.lock").exists());
    let session = Session::open(&dir).unwrap();
    assert_eq!(session.frames.len() as u64, meta.counts.frames);
}

/// SIGTERM to the live window finishes its recording as closing it does.
#[test]
fn sigterm_closes_the_live_window_and_finishes_the_recording() {
    let Some(xvfb) = xvfb_run() else {
        println!("NOTICE: xvfb-run not found; skipping the live SIGTERM test");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("session");
    let pidfile = root.path().join("pid");
    // The shell writes its pid and becomes cliper (exec): that pid gets the signal.
    let script = format!(
        "echo $$ > '{}'; exec '{}' live --source demo --weights '{}' --record '{}'",
        pidfile.display(),
        env!("CARGO_BIN_EXE_cliper"),
        weights(),
        dir.display()
    );
    let mut child = std::process::Command::new(xvfb)
        .args(["-a", "-s", "-screen 0 1600x1000x24", "sh", "-c", &script])
        .env("HOME", root.path())
        .env("XDG_DATA_HOME", root.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let lines = || {
        std::fs::read_to_string(dir.join("session.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    while lines() < 10 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(90),
            "the window recorded nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let pid = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the window did not close"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let meta = SessionMeta::read(&dir).unwrap();
    assert_eq!(meta.status, SessionStatus::Complete);
    let session = Session::open(&dir).unwrap();
    assert_eq!(session.frames.len() as u64, meta.counts.frames);
    if let Some(n) = ffprobe_frames(&dir.join("video.mp4")) {
        // Live, the video has every captured frame (scores only the scored
        // ones): the file holds what meta.json counts.
        assert_eq!(n as u64, meta.counts.video_frames);
        assert!(n > 0);
    }
}
