//! The live pipeline end to end: frame sources (image folder, MP4/H.264,
//! MJPEG AVI) through detection, tracking, encoding and scoring with a tiny
//! CLIP model; `cliper run`; bad videos; and the window under Xvfb.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use cliper::model::setup::ModelSpec;
use cliper::pipeline::worker::{FrameScores, Pipeline, PipelineConfig, PipelineEvent, RunMode};
use cliper::vision::source::{SourceSpec, DEFAULT_IMAGE_FPS};
use common::*;
use image::RgbImage;

fn write_frames(dir: &Path, n: u32) -> Vec<RgbImage> {
    let portrait = astronaut();
    (0..n)
        .map(|i| {
            let f = two_faces(&portrait, i);
            f.save(dir.join(format!("frame{i}.png"))).unwrap();
            f
        })
        .collect()
}

fn run_batch(source: SourceSpec, max_frames: Option<u64>) -> Vec<FrameScores> {
    let model = ModelSpec {
        weights: Some(weights().into()),
        ..Default::default()
    };
    let mut config = PipelineConfig::new(source, model, RunMode::Batch);
    config.max_frames = max_frames;
    let pipeline = Pipeline::start(config, || {});
    let mut out = Vec::new();
    for ev in pipeline.events.iter() {
        match ev {
            PipelineEvent::Scores(s) => out.push(s),
            PipelineEvent::SourceFailed { error, .. } => panic!("source failed: {error}"),
            PipelineEvent::ModelFailed(e) => panic!("model failed: {e}"),
            PipelineEvent::Finished => break,
            _ => {}
        }
    }
    pipeline.join();
    out
}

/// Every frame is scored, in order, with both faces under the same ids.
fn assert_two_stable_faces(results: &[FrameScores], n: usize) {
    assert_eq!(results.len(), n, "one result per frame");
    let mut left_ids = BTreeSet::new();
    let mut right_ids = BTreeSet::new();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.index, i as u64, "frames in order");
        assert_eq!(r.faces.len(), 2, "frame {i}: {:?}", r.faces.len());
        let mut faces = r.faces.clone();
        faces.sort_by_key(|f| f.face.bbox.x);
        left_ids.insert(faces[0].id);
        right_ids.insert(faces[1].id);
        for f in &faces {
            let s = &f.face.scores;
            assert_eq!((s.logits.len(), s.probs.len()), (35, 7));
            assert!((s.probs.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            assert_eq!(f.face.embedding.len(), 24, "tiny model embedding width");
            let norm: f32 = f.face.embedding.iter().map(|v| v * v).sum();
            assert!((norm - 1.0).abs() < 1e-3, "embedding is normalised: {norm}");
        }
        // The face boxes follow the drift: left moves right, right moves left.
        assert!(faces[0].face.bbox.x < 400 && faces[1].face.bbox.x > 560);
    }
    assert_eq!(left_ids.len(), 1, "left face keeps one id: {left_ids:?}");
    assert_eq!(right_ids.len(), 1, "right face keeps one id: {right_ids:?}");
    assert_ne!(left_ids, right_ids);
    // The left face drifted right by 4 px a frame.
    let first = results[0]
        .faces
        .iter()
        .map(|f| f.face.bbox.x)
        .min()
        .unwrap();
    let last = results[n - 1]
        .faces
        .iter()
        .map(|f| f.face.bbox.x)
        .min()
        .unwrap();
    assert!(
        (last as i64 - first as i64 - 4 * (n as i64 - 1)).abs() <= 12,
        "left face moved {first} -> {last}"
    );
}

#[test]
fn image_folder_gives_every_face_with_stable_ids() {
    let dir = tempfile::tempdir().unwrap();
    write_frames(dir.path(), 10);
    let results = run_batch(
        SourceSpec::Folder {
            path: dir.path().to_path_buf(),
            fps: DEFAULT_IMAGE_FPS,
        },
        None,
    );
    assert_two_stable_faces(&results, 10);
    assert!((results[3].t - 3.0 / DEFAULT_IMAGE_FPS).abs() < 1e-9);
}

/// Encodes frames as H.264 in an MP4 container (cliper's own FFmpeg writer).
fn write_mp4(path: &Path, frames: &[RgbImage], fps: u32) {
    let size = frames[0].dimensions();
    let mut w = cliper::vision::video::VideoWriter::create(path, size, f64::from(fps)).unwrap();
    for (i, f) in frames.iter().enumerate() {
        w.push(f, i as f64 / f64::from(fps)).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn mp4_h264_video_gives_every_face_with_stable_ids() {
    let dir = tempfile::tempdir().unwrap();
    let portrait = astronaut();
    let frames: Vec<RgbImage> = (0..8).map(|i| two_faces(&portrait, i)).collect();
    let path = dir.path().join("two.mp4");
    write_mp4(&path, &frames, 25);
    let results = run_batch(
        SourceSpec::parse(path.to_str().unwrap(), None).unwrap(),
        None,
    );
    assert_two_stable_faces(&results, 8);
    assert!(
        (results[1].t - 0.04).abs() < 1e-6,
        "t from the track's rate"
    );

    // `cliper run` stops cleanly at the end of the file and reports every frame.
    let (code, out, err) = cliper(&[
        "run",
        "--source",
        path.to_str().unwrap(),
        "--weights",
        &weights(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 8, "{out}");

    // A file cut short gives the frames before the cut, not a panic.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.mp4");
    let run_cut = |len: usize| {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let source = cut.to_str().unwrap();
        let r = cliper(&["run", "--source", source, "--weights", &weights(), "--json"]);
        assert!(!r.2.contains("panicked"), "{}", r.2);
        r
    };
    let (code, out, err) = run_cut(bytes.len() * 9 / 10);
    assert_eq!(code, 0, "{err}");
    let n = out.lines().count();
    assert!((1..8).contains(&n), "{n} frames of a cut file: {err}");
    assert!(err.contains("cut.mp4"), "{err}");
    // Cut inside the first frame: nothing to show, an error naming the file.
    let (code, out, err) = run_cut(bytes.len() / 10);
    assert_ne!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 0);
    assert!(err.contains("cut.mp4") && err.contains("no frame"), "{err}");
}

#[test]
fn mjpeg_avi_plays() {
    let dir = tempfile::tempdir().unwrap();
    let portrait = astronaut();
    let frames: Vec<Vec<u8>> = (0..5)
        .map(|i| {
            let mut buf = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 85)
                .encode_image(&two_faces(&portrait, i))
                .unwrap();
            buf
        })
        .collect();
    let path = dir.path().join("two.avi");
    std::fs::write(&path, avi_bytes(1120, 560, 10, &frames)).unwrap();
    let results = run_batch(
        SourceSpec::parse(path.to_str().unwrap(), None).unwrap(),
        None,
    );
    assert_two_stable_faces(&results, 5);
    assert!((results[2].t - 0.2).abs() < 1e-9);
}

/// A minimal MJPEG AVI: RIFF, hdrl with one video stream, movi with `00dc` chunks.
fn avi_bytes(w: u32, h: u32, fps: u32, frames: &[Vec<u8>]) -> Vec<u8> {
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
        chunk(b"LIST", &[kind, body].concat())
    }
    let le = |v: u32| v.to_le_bytes();
    let mut avih = vec![0u8; 56];
    avih[0..4].copy_from_slice(&le(1_000_000 / fps));
    avih[32..36].copy_from_slice(&le(w));
    avih[36..40].copy_from_slice(&le(h));
    let mut strh = vec![0u8; 56];
    strh[0..4].copy_from_slice(b"vids");
    strh[4..8].copy_from_slice(b"MJPG");
    strh[20..24].copy_from_slice(&le(1));
    strh[24..28].copy_from_slice(&le(fps));
    let mut strf = vec![0u8; 40];
    strf[0..4].copy_from_slice(&le(40));
    strf[4..8].copy_from_slice(&le(w));
    strf[8..12].copy_from_slice(&le(h));
    strf[14..16].copy_from_slice(&24u16.to_le_bytes());
    strf[16..20].copy_from_slice(b"MJPG");
    let strl = list(
        b"strl",
        &[chunk(b"strh", &strh), chunk(b"strf", &strf)].concat(),
    );
    let hdrl = list(b"hdrl", &[chunk(b"avih", &avih), strl].concat());
    let movi = list(
        b"movi",
        &frames
            .iter()
            .flat_map(|f| chunk(b"00dc", f))
            .collect::<Vec<u8>>(),
    );
    chunk(b"RIFF", &[b"AVI ".as_slice(), &hdrl, &movi].concat())
}

#[test]
fn cliper_run_prints_one_json_line_per_frame() {
    let img = astronaut_path();
    let (code, out, err) = cliper(&[
        "run",
        "--source",
        img.to_str().unwrap(),
        "--frames",
        "20",
        "--json",
        "--weights",
        &weights(),
        "--top",
        "3",
        "--probe",
        "a smiling astronaut",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 20, "{out}");
    for (i, line) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["frame"], i as u64);
        assert!((v["t"].as_f64().unwrap() - i as f64 / DEFAULT_IMAGE_FPS).abs() < 1e-6);
        let faces = v["faces"].as_array().unwrap();
        assert_eq!(faces.len(), 1, "{line}");
        let f = &faces[0];
        assert_eq!(f["id"], 1, "the one face keeps id 1");
        let b: Vec<u64> = serde_json::from_value(f["box"].clone()).unwrap();
        assert!(b[0] > 150 && b[0] < 220 && b[2] > 60, "box {b:?}");
        let classes = f["classes"].as_array().unwrap();
        assert_eq!(classes.len(), 7);
        let best = classes
            .iter()
            .max_by(|a, b| {
                a["score"]
                    .as_f64()
                    .unwrap()
                    .total_cmp(&b["score"].as_f64().unwrap())
            })
            .unwrap();
        assert_eq!(f["predicted"], best["name"]);
        assert_eq!(f["descriptors"].as_array().unwrap().len(), 3);
        assert_eq!(f["probe"]["text"], "a smiling astronaut");
        assert!(f["probe"]["logit"].as_f64().unwrap().abs() <= 100.0);
    }
    // The same still gives the same scores every frame.
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(lines[0]).unwrap()["faces"],
        serde_json::from_str::<serde_json::Value>(lines[19]).unwrap()["faces"]
    );
}

#[test]
fn bad_sources_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad_mp4 = dir.path().join("corrupt.mp4");
    std::fs::write(
        &bad_mp4,
        b"\0\0\0\x18ftypisom\0\0\0\0\0\0\x10\0moovgarbage-garbage",
    )
    .unwrap();
    let w = weights();
    let err = assert_clean_error(
        &[
            "run",
            "--source",
            bad_mp4.to_str().unwrap(),
            "--weights",
            &w,
        ],
        "corrupt.mp4",
    );
    assert!(err.contains("MP4"), "{err}");
    let bad_avi = dir.path().join("corrupt.avi");
    std::fs::write(&bad_avi, b"RIFF\x10\0\0\0AVI LIST\x04\0\0\0movi").unwrap();
    assert_clean_error(
        &[
            "run",
            "--source",
            bad_avi.to_str().unwrap(),
            "--weights",
            &w,
        ],
        "corrupt.avi",
    );
    let empty = tempfile::tempdir().unwrap();
    assert_clean_error(
        &[
            "run",
            "--source",
            empty.path().to_str().unwrap(),
            "--weights",
            &w,
        ],
        "holds no images",
    );
    assert_clean_error(
        &["run", "--source", "/no/such/clip.mp4", "--weights", &w],
        "not found",
    );
    assert_clean_error(&["run", "--weights", &w], "--source");
    let shot_dir = dir.path().join("missing-folder").join("shot.png");
    assert_clean_error(
        &[
            "live",
            "--source",
            "demo",
            "--exit-after",
            "1",
            "--screenshot",
            shot_dir.to_str().unwrap(),
        ],
        "does not exist",
    );
}

fn xvfb_run() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("xvfb-run"))
        .find(|p| p.is_file())
}

/// Runs `cliper live ARGS --exit-after S --screenshot shot.png` under Xvfb;
/// returns the screenshot and stderr.
fn live_screenshot(args: &[&str], secs: &str) -> Option<(RgbImage, String)> {
    let Some(xvfb) = xvfb_run() else {
        println!("NOTICE: xvfb-run not found; skipping the window test (CI installs xvfb)");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("shot.png");
    let out = std::process::Command::new(xvfb)
        .args([
            "-a",
            "-s",
            "-screen 0 1600x1000x24",
            env!("CARGO_BIN_EXE_cliper"),
            "live",
        ])
        .args(args)
        .args(["--exit-after", secs, "--screenshot", shot.to_str().unwrap()])
        // Keep saved settings out of the user's home and the test's way.
        .env("XDG_DATA_HOME", dir.path())
        .env("HOME", dir.path())
        .output()
        .expect("run xvfb-run");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "cliper live failed: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let img = image::open(&shot)
        .unwrap_or_else(|e| panic!("no screenshot ({e}); stderr: {err}"))
        .to_rgb8();
    Some((img, err))
}

/// Standard deviation of the luminance: a blank window is near 0.
fn luma_std(img: &RgbImage) -> f64 {
    let l: Vec<f64> = img
        .pixels()
        .map(|p| 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64)
        .collect();
    let mean = l.iter().sum::<f64>() / l.len() as f64;
    (l.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / l.len() as f64).sqrt()
}

#[test]
fn live_window_runs_the_demo_and_saves_a_screenshot() {
    let Some((img, err)) = live_screenshot(&["--source", "demo", "--weights", &weights()], "8")
    else {
        return;
    };
    assert!(
        img.width() >= 900 && img.height() >= 600,
        "{:?}",
        img.dimensions()
    );
    assert!(luma_std(&img) > 25.0, "screenshot looks blank");
    // The orange of the astronaut's suit is in the video panel.
    let orange = img
        .pixels()
        .filter(|p| p[0] > 180 && p[1] > 60 && p[1] < 140 && p[2] < 70)
        .count();
    assert!(
        orange > 5_000,
        "the video frame is not on screen ({orange} orange pixels)"
    );
    // The session report: frames were shown and scored.
    let report = err
        .lines()
        .find(|l| l.starts_with("live session:"))
        .unwrap_or_else(|| panic!("{err}"));
    let scored: u64 = report
        .split(", ")
        .find_map(|p| p.strip_suffix(" scored"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{report}"));
    assert!(scored > 5, "{report}");
}

/// Pausing computes the exact map of the frozen frame in the background:
/// the window keeps drawing (the report counts UI frames after the pause)
/// and ends with the occlusion map of the face on screen.
#[test]
fn live_window_pauses_and_draws_the_exact_map() {
    let Some((img, err)) = live_screenshot(
        &[
            "--source",
            "demo",
            "--weights",
            &weights(),
            "--explain",
            "happiness",
            "--map",
            "occlusion",
            "--grid",
            "4",
            "--pause-after",
            "2",
        ],
        "7",
    ) else {
        return;
    };
    assert!(luma_std(&img) > 25.0, "screenshot looks blank");
    let report = err
        .lines()
        .find(|l| l.starts_with("live session:"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        report.contains("paused with the occlusion map of 1 face(s)"),
        "{report}"
    );
}

#[test]
fn live_window_without_weights_shows_the_first_run_screen() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-weights-here");
    let Some((img, _)) = live_screenshot(
        &["--source", "demo", "--weights", missing.to_str().unwrap()],
        "3",
    ) else {
        return;
    };
    assert!(luma_std(&img) > 5.0, "first-run screen looks blank");
}

/// Live mode: a source that ends, a camera that cannot open, and switching
/// sources are events; the pipeline keeps running through all of them.
#[test]
fn live_pipeline_survives_ending_and_failing_sources() {
    use cliper::pipeline::worker::PipelineCommand;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    write_frames(dir.path(), 3);
    let folder = SourceSpec::Folder {
        path: dir.path().to_path_buf(),
        fps: 50.0,
    };
    let model = ModelSpec {
        weights: Some(weights().into()),
        ..Default::default()
    };
    let pipeline = Pipeline::start(
        PipelineConfig::new(folder.clone(), model, RunMode::Live),
        || {},
    );
    // Waits for an event matching `want` (events may come in any order
    // between stages, so earlier ones are kept), failing after 60 s.
    let seen = std::cell::RefCell::new(Vec::<PipelineEvent>::new());
    let wait = |want: &dyn Fn(&PipelineEvent) -> bool, what: &str| {
        let earlier = seen.borrow().iter().position(want);
        if let Some(i) = earlier {
            return seen.borrow_mut().remove(i);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match pipeline.events.recv_timeout(left) {
                Ok(ev) if want(&ev) => return ev,
                Ok(ev) => seen.borrow_mut().push(ev),
                Err(e) => panic!("no {what}: {e}"),
            }
        }
    };
    wait(&|e| matches!(e, PipelineEvent::ModelReady(_)), "model");
    let ended = wait(
        &|e| matches!(e, PipelineEvent::SourceEnded { .. }),
        "end of the folder",
    );
    assert!(
        matches!(
            ended,
            PipelineEvent::SourceEnded {
                frames: 3,
                generation: 1
            }
        ),
        "{ended:?}"
    );
    pipeline.command(PipelineCommand::SetSource(SourceSpec::Camera {
        index: 97,
        resolution: None,
    }));
    let failed = wait(
        &|e| matches!(e, PipelineEvent::SourceFailed { .. }),
        "camera failure",
    );
    let PipelineEvent::SourceFailed { error, .. } = failed else {
        unreachable!()
    };
    assert!(
        matches!(
            error,
            cliper::pipeline::worker::SourceFailure::Source(
                cliper::vision::source::SourceError::NoCamera(_)
                    | cliper::vision::source::SourceError::Camera { .. }
            )
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("camera"), "{error}");
    pipeline.command(PipelineCommand::SetSource(SourceSpec::Demo));
    wait(
        &|e| matches!(e, PipelineEvent::SourceOpened(i) if i.generation == 3),
        "demo",
    );
    let scores = wait(
        &|e| matches!(e, PipelineEvent::Scores(s) if s.generation == 3 && !s.faces.is_empty()),
        "demo scores",
    );
    let PipelineEvent::Scores(s) = scores else {
        unreachable!()
    };
    assert_eq!(s.faces.len(), 1);
    // The probe is encoded on the worker and scored on the next frames.
    pipeline.command(PipelineCommand::SetProbe(Some("a smiling woman".into())));
    wait(
        &|e| matches!(e, PipelineEvent::ProbeReady(Some(_))),
        "probe",
    );
    wait(
        &|e| matches!(e, PipelineEvent::Scores(s) if s.faces.first().is_some_and(|f| f.probe_logit.is_some())),
        "probe logit",
    );
    // Switching the bank to a learned one from a file.
    let learned = fixtures().join("clip_c_hf16/descriptors.safetensors");
    pipeline.command(PipelineCommand::SetBank(
        cliper::model::setup::BankSource::Learned(learned),
    ));
    let learned_or_failed = |e: &PipelineEvent| match e {
        PipelineEvent::BankReady(b) => b.kind == cliper::model::cliper::BankKind::Learned,
        PipelineEvent::BankFailed(_) => true,
        _ => false,
    };
    let bank = wait(&learned_or_failed, "learned bank");
    let PipelineEvent::BankReady(bank) = bank else {
        panic!("{bank:?}")
    };
    assert_eq!(bank.kind, cliper::model::cliper::BankKind::Learned);
}
