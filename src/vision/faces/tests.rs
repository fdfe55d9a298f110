use super::*;
use image::{imageops, Rgb};

fn astronaut() -> RgbImage {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/astronaut.png");
    image::open(path)
        .expect("tests/data/astronaut.png should be a readable PNG")
        .to_rgb8()
}

fn detector() -> FaceDetector {
    FaceDetector::new(FaceDetectorConfig::default()).expect("default config is valid")
}

fn seeta() -> FaceDetector {
    FaceDetector::new(FaceDetectorConfig::seeta()).expect("seeta config is valid")
}

/// Both detectors, each with its default settings.
fn both() -> [FaceDetectorConfig; 2] {
    [FaceDetectorConfig::default(), FaceDetectorConfig::seeta()]
}

/// Where the face of the astronaut is, as (x0, y0, x1, y1), checked by eye:
/// from cheek to cheek and from the top of the forehead to the chin.
const ASTRONAUT_FACE: (f32, f32, f32, f32) = (175.0, 65.0, 280.0, 185.0);

fn inside(point: (f32, f32), region: (f32, f32, f32, f32)) -> bool {
    let (x0, y0, x1, y1) = region;
    (x0..=x1).contains(&point.0) && (y0..=y1).contains(&point.1)
}

#[test]
fn finds_the_astronaut() {
    let img = astronaut();
    for cfg in both() {
        let faces = FaceDetector::new(cfg).unwrap().detect(&img);
        assert_eq!(faces.len(), 1, "{:?}: {faces:?}", cfg.kind);
        let face = faces[0];
        assert!(inside(face.center(), ASTRONAUT_FACE), "{face:?}");
        // The face is about 100 px wide; a box far off that is a wrong detection.
        assert!((60..=160).contains(&face.w), "{face:?}");
        match cfg.kind {
            DetectorKind::Seeta => {
                assert!(face.score >= cfg.score_threshold);
                assert!(face.landmarks.is_none());
            }
            DetectorKind::CenterFace => {
                assert!(face.score >= cfg.confidence && face.score <= 1.0);
                // Eyes, nose and mouth inside the face, in order.
                let l = face.landmarks.expect("CenterFace gives landmarks");
                for p in l {
                    assert!(inside((p[0], p[1]), ASTRONAUT_FACE), "{l:?}");
                }
                assert!(l[0][0] < l[1][0] && l[3][0] < l[4][0], "{l:?}");
                assert!(l[0][1] < l[2][1] && l[2][1] < l[3][1], "{l:?}");
            }
        }
    }
}

#[test]
fn full_resolution_and_downscaled_detection_agree() {
    let img = astronaut();
    for base in both() {
        let full_cfg = FaceDetectorConfig {
            max_side: 4096,
            min_face_size: 40,
            ..base
        };
        let full = FaceDetector::new(full_cfg).unwrap().detect(&img);
        let small_cfg = FaceDetectorConfig {
            max_side: 256,
            ..base
        };
        let small = FaceDetector::new(small_cfg).unwrap().detect(&img);
        assert_eq!((full.len(), small.len()), (1, 1), "{full:?} {small:?}");
        let (a, b) = (full[0].center(), small[0].center());
        // Boxes mapped back from half resolution land within a few pixels.
        assert!(
            (a.0 - b.0).abs() < 12.0 && (a.1 - b.1).abs() < 12.0,
            "{full:?} {small:?}"
        );
    }
}

#[test]
fn two_astronauts_side_by_side_come_left_to_right() {
    let one = astronaut();
    let mirrored = imageops::flip_horizontal(&one);
    let mut pair = RgbImage::new(1024, 512);
    imageops::replace(&mut pair, &one, 0, 0);
    imageops::replace(&mut pair, &mirrored, 512, 0);
    for cfg in both() {
        let faces = FaceDetector::new(cfg).unwrap().detect(&pair);
        assert_eq!(faces.len(), 2, "{faces:?}");
        assert!(faces[0].x < faces[1].x);
        assert!(inside(faces[0].center(), ASTRONAUT_FACE), "{faces:?}");
        // The mirrored face sits at 512 + (512 - x) for each x of the original.
        let (x0, y0, x1, y1) = ASTRONAUT_FACE;
        let mirrored_face = (1024.0 - x1, y0, 1024.0 - x0, y1);
        assert!(inside(faces[1].center(), mirrored_face), "{faces:?}");
    }
}

#[test]
fn blank_frames_have_no_faces() {
    for cfg in both() {
        let mut det = FaceDetector::new(cfg).unwrap();
        for value in [0u8, 128, 255] {
            let img = RgbImage::from_pixel(640, 480, Rgb([value; 3]));
            assert!(det.detect(&img).is_empty(), "uniform {value}");
            assert!(det.candidates(&img).is_empty(), "uniform {value}");
        }
    }
}

#[test]
fn empty_and_tiny_frames_have_no_faces_and_do_not_panic() {
    for base in both() {
        let mut det = FaceDetector::new(base).unwrap();
        let full_res = FaceDetectorConfig {
            min_face_size: 0,
            ..base
        };
        let mut full_res = FaceDetector::new(full_res).unwrap();
        // Sizes around the 40 px window, where rustface's pyramid arithmetic
        // (unsigned `width - 40`) would underflow if we let a smaller image through.
        let sides = [0u32, 1, 2, 3, 19, 20, 39, 40, 41, 47, 50, 63, 64, 65, 80];
        for &w in &sides {
            for &h in &sides {
                let img = RgbImage::from_pixel(w, h, Rgb([90, 60, 40]));
                assert!(det.detect(&img).is_empty(), "{w}x{h}");
                assert!(full_res.detect(&img).is_empty(), "{w}x{h}");
            }
        }
        // A thin strip: the long side fits, the short side is below the window.
        let strip = RgbImage::from_pixel(2000, 10, Rgb([200, 200, 200]));
        assert!(det.detect(&strip).is_empty());
    }
}

#[test]
fn invalid_settings_are_errors_not_panics() {
    let base = FaceDetectorConfig::default();
    let bad = [
        FaceDetectorConfig {
            score_threshold: 0.0,
            ..base
        },
        FaceDetectorConfig {
            score_threshold: f32::NAN,
            ..base
        },
        FaceDetectorConfig {
            pyramid_scale: 1.0,
            ..base
        },
        FaceDetectorConfig {
            pyramid_scale: f32::NAN,
            ..base
        },
        FaceDetectorConfig {
            slide_step: 0,
            ..base
        },
        FaceDetectorConfig {
            max_side: 39,
            ..base
        },
        FaceDetectorConfig {
            confidence: 1.0,
            ..base
        },
        FaceDetectorConfig {
            confidence: f32::NAN,
            ..base
        },
        FaceDetectorConfig {
            track_confidence: 0.6,
            ..base
        },
        FaceDetectorConfig {
            track_confidence: 0.0,
            ..base
        },
    ];
    for cfg in bad {
        let err = FaceDetector::new(cfg).expect_err("config should be rejected");
        assert!(matches!(err, FaceError::InvalidConfig { .. }), "{err}");
    }
    let mut det = detector();
    assert!(det.set_config(bad[0]).is_err());
    assert!(det.set_config(FaceDetectorConfig::seeta()).is_err());
    assert_eq!(*det.config(), base);
}

#[test]
fn detection_scale_honours_max_side_and_min_face() {
    // CenterFace: 20 px at network resolution, so 64 px faces -> 0.3125.
    let cf = FaceDetectorConfig::default();
    assert!((cf.detection_scale(640, 480) - 0.3125).abs() < 1e-6);
    let cfg = FaceDetectorConfig::seeta();
    // 640x480 with max_side 480 -> 0.75; min face 64 -> 0.625 wins.
    assert!((cfg.detection_scale(640, 480) - 0.625).abs() < 1e-6);
    let no_min = FaceDetectorConfig {
        min_face_size: 0,
        ..cfg
    };
    assert!((no_min.detection_scale(640, 480) - 0.75).abs() < 1e-6);
    // Small frames are never enlarged.
    assert_eq!(no_min.detection_scale(320, 240), 1.0);
    assert_eq!(no_min.detection_scale(0, 0), 1.0);
}

#[test]
fn crop_face_has_the_region_size() {
    let img = astronaut();
    let faces = seeta().detect(&img);
    assert_eq!(faces.len(), 1, "{faces:?}");
    let crop = crop_face(&img, &faces[0], DEFAULT_FACE_MARGIN);
    assert_eq!(
        model_crop(&img, &faces[0], DEFAULT_FACE_MARGIN, false),
        crop
    );
    let (_, _, side, _) = square_crop(512, 512, &faces[0], DEFAULT_FACE_MARGIN);
    assert_eq!(crop.dimensions(), (side, side));
    // Whole face at the default margin: the crop covers the checked face region.
    let (x, y, _, _) = square_crop(512, 512, &faces[0], DEFAULT_FACE_MARGIN);
    let (fx0, fy0, fx1, fy1) = ASTRONAUT_FACE;
    assert!(x as f32 <= fx0 + 10.0 && (x + side) as f32 >= fx1 - 10.0);
    assert!(y as f32 <= fy0 + 10.0 && (y + side) as f32 >= fy1 - 20.0);
}

#[test]
fn config_and_boxes_can_cross_threads() {
    fn assert_send<T: Send + Sync>() {}
    assert_send::<FaceDetectorConfig>();
    assert_send::<FaceBox>();
}

/// Prints detection times and saves crops for eyeballing the margin; run with
/// `cargo test --release --lib faces::tests::timing_report -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_report() {
    let img = astronaut();
    let mut det = detector();
    let faces = det.detect(&img);
    println!("astronaut 512x512: {faces:?}");
    for (i, margin) in [0.0, 0.15, DEFAULT_FACE_MARGIN, 0.4].iter().enumerate() {
        let path = std::env::temp_dir().join(format!("cliper_face_crop_{i}_{margin}.png"));
        if let Some(f) = faces.first() {
            crop_face(&img, f, *margin).save(&path).unwrap();
            println!("saved {}", path.display());
        }
    }
    // Median of repeated runs: this machine may be shared with builds.
    let median_ms = |det: &mut FaceDetector, frame: &RgbImage| {
        det.detect(frame);
        let mut times: Vec<f64> = (0..21)
            .map(|_| {
                let t = std::time::Instant::now();
                det.detect(frame);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    for (w, h) in [(640, 480), (480, 360), (320, 240)] {
        let frame = imageops::resize(&img, w, h, imageops::FilterType::Triangle);
        for max_side in [4096, 640, 480, 320] {
            let cfg = FaceDetectorConfig {
                max_side,
                min_face_size: 0,
                ..FaceDetectorConfig::default()
            };
            let mut det = FaceDetector::new(cfg).unwrap();
            let n = det.detect(&frame).len();
            let ms = median_ms(&mut det, &frame);
            println!("{w}x{h} max_side {max_side}, no min face: {ms:.1} ms, {n} faces");
        }
        let mut det = detector();
        let n = det.detect(&frame).len();
        let ms = median_ms(&mut det, &frame);
        println!("{w}x{h} default config: {ms:.1} ms, {n} faces");
    }
    let t = std::time::Instant::now();
    let _ = detector();
    println!(
        "FaceDetector::new: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
}
