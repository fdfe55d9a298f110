//! The dynamic branch: the temporal module against PyTorch (tools/make_fixtures.py),
//! clip classification, fallback and bad input.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use cliper::model::cliper::CliperCheckpoint;
use common::*;

fn path(rel: &str) -> String {
    fixtures().join(rel).to_string_lossy().into_owned()
}

#[test]
fn temporal_module_matches_pytorch() {
    let r = read_json(&fixtures().join("clip_c_hf16/temporal_reference.json"));
    let inputs: Vec<f32> = r["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c.as_array().unwrap().iter().flat_map(floats))
        .collect();
    let x = Tensor::from_vec(inputs, (3, 16, 24), &Device::Cpu).unwrap();
    // (`dfer_clip_temporal.pth`, the same weights in DFER-CLIP's naming,
    // now loads as DFER-CLIP's flavour, tanh GELU on raw features: its
    // parity is tests/zoo.rs's, on a whole DFER-CLIP checkpoint.)
    for file in ["cliper_dynamic.safetensors"] {
        let ck = CliperCheckpoint::load(&fixtures().join("clip_c_hf16").join(file)).unwrap();
        // The .pth has no metadata: give the heads as a user would.
        let heads = if file.ends_with(".pth") {
            Some(2)
        } else {
            None
        };
        let m = match heads {
            Some(h) => cliper::model::temporal::TemporalModule::from_tensors(
                &ck.temporal,
                Some(h),
                24,
                &Device::Cpu,
            )
            .unwrap(),
            None => ck
                .temporal_module(24, &Device::Cpu)
                .unwrap()
                .expect("temporal weights"),
        };
        assert_eq!(m.config.layers, 2);
        assert_eq!(m.config.heads, 2);
        let y = m.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        for (got, want) in y.iter().zip(r["outputs"].as_array().unwrap()) {
            let d = max_abs_diff(got, &floats(want));
            assert!(d < 1e-4, "{file}: temporal output differs by {d}");
        }
    }
}

fn frames_dir(n: usize) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for i in 0..n {
        let img = image::RgbImage::from_fn(24, 24, |x, y| {
            image::Rgb([(x * 10 + i as u32 * 7) as u8, (y * 9) as u8, (i * 13) as u8])
        });
        img.save(d.path().join(format!("f{i:03}.png"))).unwrap();
    }
    d
}

#[test]
fn classify_clip_with_trained_temporal_weights() {
    let d = frames_dir(20);
    let (code, out, err) = cliper(&[
        "classify-clip",
        "--weights",
        &path("clip_c_hf16"),
        "--descriptors",
        &path("clip_c_hf16/cliper_dynamic.safetensors"),
        "--no-detect",
        "--json",
        &d.path().to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["mode"], "dynamic");
    assert_eq!(v["frames"], 16);
    assert_eq!(v["source_frames"], 20);
    let face = &v["faces"][0];
    assert_eq!(face["temporal"], "temporal");
    let probs: f64 = face["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["prob"].as_f64().unwrap())
        .sum();
    assert!((probs - 1.0).abs() < 1e-5);
    assert_eq!(face["descriptors"].as_array().unwrap().len(), 35);
}

#[test]
fn without_temporal_weights_the_clip_score_is_the_mean_of_static_scores() {
    // 16 frames: segment sampling takes each exactly once.
    let d = frames_dir(16);
    let (code, out, err) = cliper(&[
        "classify-clip",
        "--weights",
        &path("clip_c_hf16"),
        "--descriptors",
        &path("clip_c_hf16/descriptors.safetensors"),
        "--no-detect",
        "--json",
        &d.path().to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("no trained temporal weights"), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let face = &v["faces"][0];
    assert_eq!(face["temporal"], "mean-of-static");
    let dynamic: Vec<f32> = face["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["score"].as_f64().unwrap() as f32)
        .collect();
    let mut args = vec![
        "classify".to_string(),
        "--weights".into(),
        path("clip_c_hf16"),
        "--descriptors".into(),
        path("clip_c_hf16/descriptors.safetensors"),
        "--no-detect".into(),
        "--json".into(),
    ];
    for i in 0..16 {
        args.push(
            d.path()
                .join(format!("f{i:03}.png"))
                .to_string_lossy()
                .into_owned(),
        );
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = cliper(&refs);
    assert_eq!(code, 0, "{err}");
    let mut mean = [0f32; 7];
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for (c, cls) in v["faces"][0]["classes"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            mean[c] += cls["score"].as_f64().unwrap() as f32 / 16.0;
        }
    }
    assert!(
        max_abs_diff(&dynamic, &mean) < 1e-3,
        "{dynamic:?} vs {mean:?}"
    );
}

#[test]
fn short_clip_repeats_frames_and_says_so() {
    let d = frames_dir(5);
    let (code, out, err) = cliper(&[
        "classify-clip",
        "--weights",
        &path("clip_c_hf16"),
        "--no-detect",
        "--json",
        &d.path().to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("fewer than 16"), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["frames"], 16);
    assert_eq!(v["source_frames"], 5);
    assert_eq!(v["complete"], true, "a short clip is whole");
    assert_eq!(v["repeated_frames"], true);
}

#[test]
fn corrupt_video_and_wrong_temporal_width() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("broken.mp4");
    std::fs::write(&bad, b"\x00\x00\x00\x18ftypmp42 definitely not a video").unwrap();
    assert_fails_naming(
        &[
            "classify-clip",
            "--weights",
            &path("clip_c_hf16"),
            "--json",
            &bad.to_string_lossy(),
        ],
        "broken.mp4",
    );

    let ck =
        CliperCheckpoint::load(&fixtures().join("clip_c_hf16/cliper_dynamic.safetensors")).unwrap();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert("descriptor".into(), ck.descriptor.clone().unwrap());
    let cfg = cliper::model::temporal::TemporalConfig {
        flavour: cliper::model::temporal::TemporalFlavour::Cliper,
        width: 30,
        frames: 16,
        layers: 1,
        heads: 2,
        inner: 30,
        mlp: 8,
    };
    for (k, v) in cliper::model::temporal::TemporalModule::init_tensors(&cfg, 1).unwrap() {
        tensors.insert(k, v);
    }
    let p = d.path().join("wide.safetensors");
    candle_core::safetensors::save(&tensors, &p).unwrap();
    let frames = frames_dir(3);
    let err = assert_clean_error(
        &[
            "classify-clip",
            "--weights",
            &path("clip_c_hf16"),
            "--descriptors",
            &p.to_string_lossy(),
            "--no-detect",
            &frames.path().to_string_lossy(),
        ],
        "width 24",
    );
    assert!(err.contains("temporal"), "{err}");
    let _ = DType::F32;
}

#[test]
fn run_dynamic_adds_scores_once_the_window_is_full() {
    let d = tempfile::tempdir().unwrap();
    let photo = astronaut_path();
    for i in 0..20 {
        std::fs::copy(&photo, d.path().join(format!("f{i:02}.png"))).unwrap();
    }
    let (code, out, err) = cliper(&[
        "run",
        "--weights",
        &path("clip_c_hf16"),
        "--descriptors",
        &path("clip_c_hf16/cliper_dynamic.safetensors"),
        "--source",
        &d.path().to_string_lossy(),
        "--json",
        "--dynamic",
        "--window",
        "8",
        "--stride",
        "4",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 20);
    for (i, v) in lines.iter().enumerate() {
        let face = &v["faces"][0];
        assert_eq!(face["id"], lines[0]["faces"][0]["id"], "stable id");
        // Window of 8: no dynamic scores before the 8th frame.
        assert_eq!(face.get("dynamic").is_some(), i >= 7, "frame {i}: {face}");
        if i >= 7 {
            assert_eq!(face["dynamic"]["mode"], "temporal");
            assert_eq!(face["dynamic"]["classes"].as_array().unwrap().len(), 7);
        }
    }
}

/// A video clip through FFmpeg: a whole one is scored as the clip; one cut
/// short is scored on the frames read, flagged, and fails the command.
#[test]
fn video_clips_whole_and_truncated() {
    let video = |name: &str| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/video")
            .join(name)
            .to_string_lossy()
            .into_owned()
    };
    let run = |file: &str| {
        cliper(&[
            "classify-clip",
            "--weights",
            &path("clip_c_hf16"),
            "--no-detect",
            "--json",
            file,
        ])
    };
    let (code, out, err) = run(&video("h264_high_bframes_audio.mp4"));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["complete"], true);
    assert_eq!(v["source_frames"], 30);
    assert_eq!(v["frames"], 16);
    assert_eq!(v["faces"].as_array().unwrap().len(), 1);

    let (code, out, err) = run(&video("truncated.mp4"));
    assert_eq!(code, 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["complete"], false);
    assert_eq!(v["source_frames"], 8);
    assert!(
        err.contains("truncated.mp4") && err.contains("ends early"),
        "{err}"
    );
    assert!(err.contains("could not be read whole"), "{err}");
}
