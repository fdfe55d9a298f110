//! Explanation maps against PyTorch (tools/make_fixtures.py) and a sanity
//! check that occlusion finds the class-defining region.

mod common;

use candle_core::Device;
use cliper::model::explain::{fast_maps, gradcam_map, occlusion_map, Target};
use cliper::model::preprocess;
use cliper::model::tokenizer::ClipTokenizer;
use common::*;

#[test]
fn maps_match_pytorch() {
    let (clip, bank) = tiny_cliper();
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
    use cliper::model::setup::ModelSpec;
    use cliper::pipeline::worker::{Pipeline, PipelineConfig, PipelineEvent, RunMode};
    use cliper::vision::source::SourceSpec;
    let photo = astronaut_path();
    let model = ModelSpec {
        weights: Some(fixtures().join("clip_c_hf16")),
        bank: cliper::model::setup::BankSource::Learned(
            fixtures().join("clip_c_hf16/descriptors.safetensors"),
        ),
        device: "cpu".into(),
        head: None,
        precision: Default::default(),
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
    let (clip, bank) = tiny_cliper();
    let img = image::open(&photo).unwrap().to_rgb8();
    for s in &scored {
        let f = &s.faces[0];
        let map = f.explain.as_ref().expect("a map for the face");
        assert_eq!((map.rows, map.cols), (4, 4));
        // The crop the pipeline scores: the default detector's margin, eyes levelled.
        let crop = cliper::pipeline::analyzer::AnalyzerConfig::default().crop(&img, &f.face.bbox);
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

/// The app's paused frame: Grad-CAM and occlusion maps computed on a
/// background thread from the pipeline's own model, equal to the direct
/// ones; every request ends with one `ExactDone`, and a newer request
/// supersedes a running one.
#[test]
fn live_pipeline_computes_exact_maps_of_a_paused_frame() {
    use cliper::model::explain::Method;
    use cliper::model::setup::ModelSpec;
    use cliper::pipeline::worker::{
        ExactRequest, Pipeline, PipelineCommand, PipelineConfig, PipelineEvent, RunMode,
    };
    use cliper::vision::source::SourceSpec;
    use std::time::{Duration, Instant};
    let photo = astronaut_path();
    let model = ModelSpec {
        weights: Some(fixtures().join("clip_c_hf16")),
        bank: cliper::model::setup::BankSource::Learned(
            fixtures().join("clip_c_hf16/descriptors.safetensors"),
        ),
        device: "cpu".into(),
        head: None,
        precision: Default::default(),
    };
    let config = PipelineConfig::new(
        SourceSpec::from_path(&photo, 10.0).unwrap(),
        model,
        RunMode::Live,
    );
    let pipeline = Pipeline::start(config, || {});
    let deadline = Instant::now() + Duration::from_secs(60);
    let next = || {
        pipeline
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("pipeline event in time")
    };
    // A frame with its face, once the model is ready.
    let (mut frame, mut ready) = (None, false);
    while frame.is_none() || !ready {
        match next() {
            PipelineEvent::Frame(f) if !f.faces.is_empty() => frame = Some(f),
            PipelineEvent::BankReady(_) => ready = true,
            PipelineEvent::ModelFailed(e) => panic!("{e}"),
            _ => {}
        }
    }
    let frame = frame.unwrap();
    let face = frame.faces[0];
    let request = |id, method, grid| {
        PipelineCommand::Exact(Some(ExactRequest {
            id,
            frame: frame.clone(),
            target: Target::Descriptor(7),
            method,
            grid,
        }))
    };
    // Runs requests to their `ExactDone`s; returns maps and progress by request.
    type Outcome = (
        Vec<(u64, u64, cliper::model::explain::ExplainMap)>,
        Vec<(u64, usize, usize)>,
        Vec<(u64, Option<String>, bool)>,
    );
    let collect = |ids: &[u64]| -> Outcome {
        let (mut maps, mut progress, mut done) = (Vec::new(), Vec::new(), Vec::new());
        while done.len() < ids.len() {
            match next() {
                PipelineEvent::ExactMap { request, face, map } => maps.push((request, face, map)),
                PipelineEvent::ExactProgress {
                    request,
                    done: d,
                    total,
                } => progress.push((request, d, total)),
                PipelineEvent::ExactDone {
                    request,
                    error,
                    cancelled,
                } => done.push((request, error.map(|e| e.to_string()), cancelled)),
                _ => {}
            }
        }
        (maps, progress, done)
    };

    // The direct maps on the same crop.
    let (clip, bank) = tiny_cliper();
    // Exact maps are computed on the straight square, at the detector's margin.
    let crop = cliper::vision::faces::crop_face(
        &frame.image,
        &face.bbox,
        cliper::vision::faces::DetectorKind::default().default_margin(),
    );
    let px = clip.pixels(&[crop]).unwrap();
    let text = &bank.text_features;

    pipeline.command(request(1, Method::GradCam, 0));
    let (maps, _, done) = collect(&[1]);
    assert_eq!(done, vec![(1, None, false)]);
    assert_eq!(maps.len(), frame.faces.len());
    assert_eq!(maps[0].1, face.id);
    let want = gradcam_map(&clip.vision, &px, text, Target::Descriptor(7)).unwrap();
    let d = max_abs_diff(&maps[0].2.values, &want.values);
    assert!(d < 1e-5, "background Grad-CAM differs by {d}");
    assert!((maps[0].2.logit - want.logit).abs() < 1e-4);

    pipeline.command(request(2, Method::Occlusion, 3));
    let (maps, progress, done) = collect(&[2]);
    assert_eq!(done, vec![(2, None, false)]);
    let want = occlusion_map(&clip.vision, &px, text, Target::Descriptor(7), 3).unwrap();
    assert_eq!((maps[0].2.rows, maps[0].2.cols), (3, 3));
    let d = max_abs_diff(&maps[0].2.values, &want.values);
    assert!(d < 1e-4, "background occlusion differs by {d}");
    // Progress counts forward passes up to the total (9 cells + the original).
    assert!(
        progress.windows(2).all(|w| w[0].1 <= w[1].1),
        "{progress:?}"
    );
    assert_eq!(progress.last().map(|p| (p.1, p.2)), Some((10, 10)));

    // A newer request supersedes a running one; both end, the newer one whole.
    pipeline.command(request(3, Method::Occlusion, 16));
    pipeline.command(request(4, Method::Fast, 0));
    let (maps, _, done) = collect(&[3, 4]);
    let last = done.iter().find(|d| d.0 == 4).unwrap();
    assert_eq!((last.1.as_deref(), last.2), (None, false));
    assert!(maps.iter().any(|m| m.0 == 4));
    // Cancelling with nothing running is harmless.
    pipeline.command(PipelineCommand::Exact(None));
    drop(pipeline);
}

#[test]
fn occlusion_reports_progress_and_can_be_cancelled() {
    use cliper::model::explain::occlusion_map_with;
    let clip = tiny_clip();
    let text = clip
        .encode_texts(&ClipTokenizer::new(), &["a smiling face"; 35])
        .unwrap();
    let img = image::open(astronaut_path()).unwrap().to_rgb8();
    let px = clip.pixels(&[img]).unwrap();
    let mut calls = Vec::new();
    let full = occlusion_map_with(&clip.vision, &px, &text, Target::Class(0), 5, |d, t| {
        calls.push((d, t));
        true
    })
    .unwrap()
    .expect("not cancelled");
    let plain = occlusion_map(&clip.vision, &px, &text, Target::Class(0), 5).unwrap();
    assert_eq!(full.values, plain.values);
    assert_eq!(calls.first(), Some(&(1, 26)));
    assert_eq!(calls.last(), Some(&(26, 26)));
    let mut n = 0;
    let cancelled = occlusion_map_with(&clip.vision, &px, &text, Target::Class(0), 5, |_, _| {
        n += 1;
        n < 2
    })
    .unwrap();
    assert!(cancelled.is_none());
    assert_eq!(n, 2, "stops at the first progress report that says no");
}
