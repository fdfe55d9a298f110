//! CLIPER's static branch against the PyTorch reference
//! (tools/make_fixtures.py, `cliper_reference.json`), face detection on a real
//! photo, and bad input.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use cliper::model::cliper::bank::{nearest_token_ids, DescriptorBank};
use cliper::model::cliper::CliperCheckpoint;
use cliper::model::tokenizer::ClipTokenizer;
use cliper::model::{Checkpoint, ClipModel};
use common::*;

fn model_c() -> ClipModel {
    tiny_clip()
}

fn path(rel: &str) -> String {
    fixtures().join(rel).to_string_lossy().into_owned()
}

#[test]
fn learned_text_features_and_readings_match_reference() {
    let clip = model_c();
    let reference = read_json(&fixtures().join("clip_c_hf16/cliper_reference.json"));
    for file in ["descriptors.safetensors", "descriptors_torch.pth"] {
        let ck = CliperCheckpoint::load(&fixtures().join("clip_c_hf16").join(file)).unwrap();
        let desc = ck.require_descriptor().unwrap();
        let bank = DescriptorBank::learned(&clip, &ClipTokenizer::new(), desc, file).unwrap();
        let got = bank.text_features.to_vec2::<f32>().unwrap();
        for (i, want) in reference["text_features"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let d = max_abs_diff(&got[i], &floats(want));
            assert!(
                d < 1e-4,
                "{file}: descriptor {i} text feature differs by {d}"
            );
        }
        let ids = nearest_token_ids(clip.text.token_embedding_matrix(), desc, 5).unwrap();
        let want: Vec<Vec<Vec<u32>>> =
            serde_json::from_value(reference["nearest_ids"].clone()).unwrap();
        assert_eq!(ids, want, "{file}: nearest words differ");
        let tok = ClipTokenizer::new();
        let words = bank.descriptors[7].words.as_ref().unwrap();
        assert_eq!(words.len(), 4);
        assert_eq!(words[2][0], tok.decode_token(want[7][2][0]));
    }
}

#[test]
fn classify_json_matches_reference_scores() {
    let reference = read_json(&fixtures().join("clip_c_hf16/cliper_reference.json"));
    for file in ["descriptors.safetensors", "descriptors_torch.pth"] {
        for (img, want) in reference["images"].as_object().unwrap() {
            let (code, out, err) = cliper(&[
                "classify",
                "--weights",
                &path("clip_c_hf16"),
                "--descriptors",
                &path(&format!("clip_c_hf16/{file}")),
                "--no-detect",
                "--json",
                &path(&format!("clip_c_hf16/{img}")),
            ]);
            assert_eq!(code, 0, "{err}");
            let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
            let face = &v["faces"][0];
            let classes = face["classes"].as_array().unwrap();
            assert_eq!(classes.len(), 7);
            let scores: Vec<f32> = classes
                .iter()
                .map(|c| c["score"].as_f64().unwrap() as f32)
                .collect();
            let probs: Vec<f32> = classes
                .iter()
                .map(|c| c["prob"].as_f64().unwrap() as f32)
                .collect();
            assert!(
                max_abs_diff(&scores, &floats(&want["class_scores"])) < 1e-3,
                "{file} {img}: scores"
            );
            assert!(
                max_abs_diff(&probs, &floats(&want["probs"])) < 1e-4,
                "{file} {img}: probs"
            );
            assert_eq!(face["predicted"], want["predicted"]);
            // All 35 descriptors, ranked, each logit equal to the reference.
            let descs = face["descriptors"].as_array().unwrap();
            assert_eq!(descs.len(), 35);
            let logits = floats(&want["logits"]);
            let mut last = f32::INFINITY;
            for d in descs {
                let l = d["logit"].as_f64().unwrap() as f32;
                assert!(l <= last);
                last = l;
                let class =
                    cliper::model::cliper::expressions::class_index(d["class"].as_str().unwrap())
                        .unwrap();
                let k = d["index"].as_u64().unwrap() as usize;
                assert!((l - logits[class * 5 + k]).abs() < 1e-3);
                assert_eq!(d["words"].as_array().unwrap().len(), 4);
            }
            let w = face["box"].as_array().unwrap();
            assert_eq!(w[0], 0);
            assert_eq!(w[1], 0);
        }
    }
}

#[test]
fn top_k_limits_descriptors() {
    let (code, out, err) = cliper(&[
        "classify",
        "--weights",
        &path("clip_c_hf16"),
        "--no-detect",
        "--json",
        "--top",
        "3",
        &path("clip_c_hf16/square0.png"),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let d = v["faces"][0]["descriptors"].as_array().unwrap();
    assert_eq!(d.len(), 3);
    // Zero-shot: real text, no words.
    assert!(d[0]["text"].as_str().unwrap().contains(' '));
    assert!(d[0].get("words").is_none());
}

#[test]
fn finds_the_astronaut_face() {
    let photo = astronaut_path();
    let (code, out, err) = cliper(&[
        "classify",
        "--weights",
        &path("clip_c_hf16"),
        "--json",
        &photo.to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let faces = v["faces"].as_array().unwrap();
    assert_eq!(faces.len(), 1, "{out}");
    let b: Vec<f64> = faces[0]["box"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let (cx, cy) = (b[0] + b[2] / 2.0, b[1] + b[3] / 2.0);
    assert!(
        (170.0..280.0).contains(&cx) && (70.0..200.0).contains(&cy),
        "box {b:?}"
    );
    assert!(b[2] > 50.0 && b[2] < 200.0, "box {b:?}");
    assert_eq!(faces[0]["classes"].as_array().unwrap().len(), 7);
}

#[test]
fn no_face_gives_empty_list() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("blank.png");
    image::RgbImage::from_pixel(200, 150, image::Rgb([120, 130, 140]))
        .save(&p)
        .unwrap();
    let (code, out, err) = cliper(&[
        "classify",
        "--weights",
        &path("clip_c_hf16"),
        "--json",
        &p.to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["faces"].as_array().unwrap().len(), 0);
}

#[test]
fn wrong_descriptor_shape_says_what_was_expected() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.safetensors");
    let mut t = HashMap::new();
    t.insert(
        "descriptor".to_string(),
        Tensor::zeros((35, 4, 7), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &p).unwrap();
    let err = assert_clean_error(
        &[
            "classify",
            "--weights",
            &path("clip_c_hf16"),
            "--descriptors",
            &p.to_string_lossy(),
            &path("clip_c_hf16/square0.png"),
        ],
        "[35, 4, 16]",
    );
    assert!(err.contains("bad.safetensors"), "{err}");
    let mut t = HashMap::new();
    t.insert(
        "descriptor".to_string(),
        Tensor::zeros((7, 5, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &p).unwrap();
    assert_clean_error(
        &[
            "classify",
            "--weights",
            &path("clip_c_hf16"),
            "--descriptors",
            &p.to_string_lossy(),
            &path("clip_c_hf16/square0.png"),
        ],
        "[35, 4,",
    );
    let mut t = HashMap::new();
    t.insert(
        "other".to_string(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &p).unwrap();
    assert_clean_error(
        &[
            "classify",
            "--weights",
            &path("clip_c_hf16"),
            "--descriptors",
            &p.to_string_lossy(),
            &path("clip_c_hf16/square0.png"),
        ],
        "no `descriptor`",
    );
}

#[test]
fn bad_prompts_files() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.txt");
    let builtin = cliper::model::cliper::bank::DEFAULT_PROMPTS;
    std::fs::write(&p, builtin.replace("[fear]", "[feer]")).unwrap();
    assert_clean_error(
        &[
            "classify",
            "--weights",
            &path("clip_c_hf16"),
            "--prompts",
            &p.to_string_lossy(),
            &path("clip_c_hf16/square0.png"),
        ],
        "feer",
    );
    // A class header with no descriptions under it.
    let anger_start = builtin.find("[anger]").unwrap();
    let anger_end = builtin[anger_start..]
        .find("\n\n")
        .map_or(builtin.len(), |e| anger_start + e);
    let empty_anger = format!(
        "{}[anger]\n{}",
        &builtin[..anger_start],
        &builtin[anger_end..]
    );
    std::fs::write(&p, empty_anger).unwrap();
    assert_clean_error(
        &[
            "classify",
            "--weights",
            &path("clip_c_hf16"),
            "--prompts",
            &p.to_string_lossy(),
            &path("clip_c_hf16/square0.png"),
        ],
        "anger",
    );
    // Fewer classes and uneven counts are a bank of another shape, not an
    // error: the scores have the file's classes.
    let no_neutral = &builtin[..builtin.find("[neutral]").unwrap()];
    let cut: String = no_neutral
        .lines()
        .filter(|l| !l.starts_with("a scowling"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&p, cut).unwrap();
    let (code, out, err) = cliper(&[
        "classify",
        "--weights",
        &path("clip_c_hf16"),
        "--prompts",
        &p.to_string_lossy(),
        "--no-detect",
        "--json",
        &path("clip_c_hf16/square0.png"),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let classes = v["faces"][0]["classes"].as_array().unwrap();
    let names: Vec<&str> = classes
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "surprise",
            "fear",
            "disgust",
            "happiness",
            "sadness",
            "anger"
        ]
    );
    let p_sum: f64 = classes.iter().map(|c| c["prob"].as_f64().unwrap()).sum();
    assert!((p_sum - 1.0).abs() < 1e-5);
    assert_eq!(v["faces"][0]["descriptors"].as_array().unwrap().len(), 29);
}

#[test]
fn not_an_image_fails_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.jpg");
    std::fs::write(&p, b"hello").unwrap();
    let (code, out, err) = cliper(&[
        "classify",
        "--weights",
        &path("clip_c_hf16"),
        "--json",
        &p.to_string_lossy(),
        &path("clip_c_hf16/square0.png"),
    ]);
    assert_ne!(code, 0);
    assert!(!err.contains("panicked"));
    assert!(err.contains("x.jpg"), "{err}");
    // The readable image was still classified.
    assert_eq!(out.lines().count(), 1);
}

#[test]
fn checkpoint_roundtrip_with_vision_tower() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("ck.safetensors");
    let mut base = Checkpoint::load(
        &fixtures().join("clip_c_hf16/model.safetensors"),
        DType::F32,
    )
    .unwrap();
    let src =
        CliperCheckpoint::load(&fixtures().join("clip_c_hf16/descriptors.safetensors")).unwrap();
    let name = "vision_model.post_layernorm.bias";
    let tuned = (base.tensors[name].clone() + 0.5).unwrap();
    let ck = CliperCheckpoint {
        descriptor: src.descriptor.clone(),
        vision: HashMap::from([(name.to_string(), tuned.clone())]),
        ..Default::default()
    };
    ck.save(&out, &[("note", "test".into())]).unwrap();
    let back = CliperCheckpoint::load(&out).unwrap();
    assert_eq!(back.metadata["format"], "cliper");
    assert_eq!(back.metadata["note"], "test");
    back.apply_vision(&mut base).unwrap();
    let diff: f32 = (&base.tensors[name] - &tuned)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);
    // A vision tensor of another width is refused, naming it.
    let bad = CliperCheckpoint {
        vision: HashMap::from([(
            name.to_string(),
            Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
        )]),
        ..Default::default()
    };
    let e = bad.apply_vision(&mut base).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("[7]"), "{e}");
}
