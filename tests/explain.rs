//! Explanation maps against PyTorch (tools/make_fixtures.py) and a sanity
//! check that occlusion finds the class-defining region.

mod common;

use candle_core::{DType, Device};
use cliper::model::cliper::{CliperCheckpoint, DescriptorBank};
use cliper::model::explain::{fast_maps, gradcam_map, occlusion_map, Target};
use cliper::model::tokenizer::ClipTokenizer;
use cliper::model::{preprocess, Checkpoint, ClipModel};
use common::*;

#[test]
fn maps_match_pytorch() {
    let ckpt = Checkpoint::load(
        &fixtures().join("clip_c_hf16/model.safetensors"),
        DType::F32,
    )
    .unwrap();
    let clip = ClipModel::from_checkpoint(&ckpt, &Device::Cpu, DType::F32).unwrap();
    let ck =
        CliperCheckpoint::load(&fixtures().join("clip_c_hf16/descriptors.safetensors")).unwrap();
    let bank = DescriptorBank::learned(
        &clip,
        &ClipTokenizer::new(),
        ck.require_descriptor().unwrap(),
        "d",
    )
    .unwrap();
    let r = read_json(&fixtures().join("clip_c_hf16/explain_reference.json"));
    let img = image::open(fixtures().join("clip_c_hf16/face.png")).unwrap();
    let px = preprocess::preprocess_tensor(&img, 24, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let text = &bank.text_features;

    let out = clip.vision.forward_with(&px, false, true).unwrap();
    let maps = fast_maps(&clip.vision, out.last_block_input.as_ref().unwrap(), text).unwrap();
    for (i, (got, want)) in maps
        .iter()
        .zip(r["fast_maps"].as_array().unwrap())
        .enumerate()
    {
        let d = max_abs_diff(got, &floats(want));
        assert!(d < 1e-4, "fast map {i} differs by {d}");
    }
    for t in r["targets"].as_array().unwrap() {
        let idx = t["index"].as_u64().unwrap() as usize;
        let target = if t["kind"] == "class" {
            Target::Class(idx)
        } else {
            Target::Descriptor(idx)
        };
        let g = gradcam_map(&clip.vision, &px, text, target).unwrap();
        assert!((g.logit - t["logit"].as_f64().unwrap() as f32).abs() < 1e-3);
        let d = max_abs_diff(&g.values, &floats(&t["gradcam"]));
        assert!(d < 1e-4, "{target:?}: Grad-CAM differs by {d}");
        for grid in [2usize, 4] {
            let o = occlusion_map(&clip.vision, &px, text, target, grid).unwrap();
            let d = max_abs_diff(&o.values, &floats(&t["occlusion"][grid.to_string()]));
            assert!(
                d < 1e-3,
                "{target:?}: occlusion {grid}x{grid} differs by {d}"
            );
        }
    }
}

/// A plain image with a coloured square in quadrant `q` (0 TL, 1 TR, 2 BL,
/// 3 BR); class 6 (neutral) is the plain grey background, so the models learn
/// that the square is what makes the other classes.
fn square_image(class: usize, q: usize, seed: u64) -> image::RgbImage {
    let colors = [
        [230, 30, 30],
        [30, 30, 230],
        [30, 200, 30],
        [240, 220, 20],
        [20, 20, 20],
        [220, 30, 220],
        [250, 250, 250],
    ];
    let mut rng = cliper::model::rng::SplitMix64::new(seed);
    let (ox, oy) = (
        (q % 2) as u32 * 24 + 2 + rng.below(4) as u32,
        (q / 2) as u32 * 24 + 2 + rng.below(4) as u32,
    );
    image::RgbImage::from_fn(48, 48, |x, y| {
        if class != 6 && x >= ox && x < ox + 18 && y >= oy && y < oy + 18 {
            image::Rgb(colors[class])
        } else {
            // CLIP's mean colour: what occlusion fills in.
            image::Rgb([123, 117, 104])
        }
    })
}

#[test]
fn occlusion_peaks_where_the_pattern_is() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for (split, n, base) in [("train", 12u64, 0u64), ("test", 4, 1000)] {
        for (c, name) in cliper::model::cliper::CLASSES.iter().enumerate() {
            let dir = data.join(split).join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                square_image(c, (i % 4) as usize, base + i * 7 + c as u64)
                    .save(dir.join(format!("{i}.png")))
                    .unwrap();
            }
        }
    }
    let w = fixtures()
        .join("clip_c_hf16")
        .to_string_lossy()
        .into_owned();
    let out = tmp
        .path()
        .join("ck.safetensors")
        .to_string_lossy()
        .into_owned();
    let (code, _, err) = cliper(&[
        "train",
        "--weights",
        &w,
        "--data",
        &data.to_string_lossy(),
        "--layout",
        "folder",
        "--stage1-only",
        "--stage1-epochs",
        "20",
        "--batch-size",
        "16",
        "--out",
        &out,
    ]);
    assert_eq!(code, 0, "{err}");
    for q in 0..4 {
        let img = tmp.path().join(format!("probe{q}.png"));
        square_image(0, q, 99 + q as u64).save(&img).unwrap();
        let png = tmp.path().join(format!("map{q}.png"));
        let (code, out_json, err) = cliper(&[
            "explain",
            "--weights",
            &w,
            "--descriptors",
            &out,
            "--method",
            "occlusion",
            "--grid",
            "2",
            "--target",
            "surprise",
            "--no-detect",
            "--json",
            "--out",
            &png.to_string_lossy(),
            &img.to_string_lossy(),
        ]);
        assert_eq!(code, 0, "{err}");
        assert!(png.is_file());
        let v: serde_json::Value = serde_json::from_str(out_json.trim()).unwrap();
        let map: Vec<f32> = v["faces"][0]["map"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(floats)
            .collect();
        let best = cliper::model::cliper::scoring::argmax(&map);
        assert_eq!(best, q, "pattern in quadrant {q}, occlusion map {map:?}");
    }
}

#[test]
fn explain_bad_input() {
    let w = fixtures()
        .join("clip_c_hf16")
        .to_string_lossy()
        .into_owned();
    let img = fixtures()
        .join("clip_c_hf16/face.png")
        .to_string_lossy()
        .into_owned();
    assert_clean_error(
        &[
            "explain",
            "--weights",
            &w,
            "--target",
            "joy!",
            "--out",
            "/tmp/x.png",
            &img,
        ],
        "joy!",
    );
    assert_clean_error(
        &[
            "explain",
            "--weights",
            &w,
            "--target",
            "35",
            "--out",
            "/tmp/x.png",
            &img,
        ],
        "35",
    );
    assert_clean_error(
        &[
            "explain",
            "--weights",
            &w,
            "--method",
            "magic",
            "--out",
            "/tmp/x.png",
            &img,
        ],
        "magic",
    );
}

#[test]
fn live_pipeline_draws_the_fast_map_of_the_chosen_target() {
    use cliper::pipeline::setup::ModelSpec;
    use cliper::pipeline::worker::{Pipeline, PipelineConfig, PipelineEvent, RunMode};
    use cliper::vision::source::SourceSpec;
    let photo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/astronaut.png");
    let model = ModelSpec {
        weights: Some(fixtures().join("clip_c_hf16")),
        bank: cliper::pipeline::setup::BankSource::Learned(
            fixtures().join("clip_c_hf16/descriptors.safetensors"),
        ),
        device: "cpu".into(),
    };
    let mut config = PipelineConfig::new(
        SourceSpec::from_path(&photo, 10.0).unwrap(),
        model,
        RunMode::Batch,
    );
    config.max_frames = Some(3);
    config.explain = Some(Target::Class(3));
    let pipeline = Pipeline::start(config, || {});
    let mut scored = Vec::new();
    for ev in pipeline.events.iter() {
        match ev {
            PipelineEvent::Scores(s) => scored.push(s),
            PipelineEvent::ModelFailed(e) => panic!("{e}"),
            PipelineEvent::Finished => break,
            _ => {}
        }
    }
    pipeline.join();
    assert_eq!(scored.len(), 3);
    // The map equals the one computed directly on the face crop.
    let ckpt = Checkpoint::load(
        &fixtures().join("clip_c_hf16/model.safetensors"),
        DType::F32,
    )
    .unwrap();
    let clip = ClipModel::from_checkpoint(&ckpt, &Device::Cpu, DType::F32).unwrap();
    let ck =
        CliperCheckpoint::load(&fixtures().join("clip_c_hf16/descriptors.safetensors")).unwrap();
    let bank = DescriptorBank::learned(
        &clip,
        &ClipTokenizer::new(),
        ck.require_descriptor().unwrap(),
        "d",
    )
    .unwrap();
    let img = image::open(&photo).unwrap().to_rgb8();
    for s in &scored {
        let f = &s.faces[0];
        let map = f.explain.as_ref().expect("a map for the face");
        assert_eq!((map.rows, map.cols), (4, 4));
        let crop = cliper::vision::faces::crop_face(
            &img,
            &f.face.bbox,
            cliper::vision::faces::DEFAULT_FACE_MARGIN,
        );
        let px = clip.pixels(&[crop]).unwrap();
        let want = cliper::model::explain::fast_map(
            &clip.vision,
            &px,
            &bank.text_features,
            Target::Class(3),
        )
        .unwrap();
        let d = max_abs_diff(&map.values, &want.values);
        assert!(d < 1e-3, "live map differs from the direct one by {d}");
    }
}
