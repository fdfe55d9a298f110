//! Training against PyTorch (loss, gradients, AdamW, schedule; fixtures from
//! tools/make_fixtures.py) and end to end on a synthetic data set.

mod common;

use candle_core::{Device, Tensor, Var};
use cliper::model::cliper::bank::learned_text_features;
use cliper::model::cliper::scoring::logits as score_logits;
use cliper::model::cliper::CliperCheckpoint;
use cliper::model::layers::l2_normalize;
use cliper::train::loss::{cliper_loss, logits_tensor};
use cliper::train::optim::{cosine_warm_restarts, AdamW, AdamWConfig};
use common::*;

fn rows(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(floats).collect()
}

fn labels(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn loss_and_logit_gradients_match_pytorch() {
    let r = read_json(&fixtures().join("train_reference.json"));
    for case in r["logit_cases"].as_array().unwrap() {
        let s = Var::from_tensor(&logits_tensor(&rows(&case["logits"])).unwrap()).unwrap();
        let out = cliper_loss(s.as_tensor(), &labels(&case["labels"])).unwrap();
        let loss: f32 = out.loss.to_scalar().unwrap();
        let want = case["loss"].as_f64().unwrap() as f32;
        assert!((loss - want).abs() < 1e-5, "loss {loss} vs {want}");
        assert!(max_abs_diff(&out.weights, &floats(&case["weights"])) < 1e-5);
        let grads = out.loss.backward().unwrap();
        let g = grads.get(s.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        for (got, want) in g.iter().zip(rows(&case["grad"])) {
            let d = max_abs_diff(got, &want);
            assert!(d < 1e-5, "logit gradient differs by {d}");
        }
    }
}

#[test]
fn descriptor_gradient_through_the_text_tower_matches_pytorch() {
    let r = read_json(&fixtures().join("train_reference.json"));
    let case = &r["descriptor_case"];
    let clip = tiny_clip();
    let ck =
        CliperCheckpoint::load(&fixtures().join("clip_c_hf16/descriptors.safetensors")).unwrap();
    let desc = Var::from_tensor(ck.require_descriptor().unwrap()).unwrap();
    let feats = rows(&case["features"]);
    let f = Tensor::from_vec(feats.concat(), (feats.len(), feats[0].len()), &Device::Cpu).unwrap();
    let t = l2_normalize(&learned_text_features(&clip.text, desc.as_tensor()).unwrap()).unwrap();
    let logits = score_logits(&f, &t).unwrap();
    let out = cliper_loss(&logits, &labels(&case["labels"])).unwrap();
    let loss: f32 = out.loss.to_scalar().unwrap();
    let want = case["loss"].as_f64().unwrap() as f32;
    assert!(
        (loss - want).abs() < 1e-5 * want.abs().max(1.0),
        "loss {loss} vs {want}"
    );
    let grads = out.loss.backward().unwrap();
    let g: Vec<f32> = grads
        .get(desc.as_tensor())
        .expect("descriptor gradient")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f32> = case["grad"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| a.as_array().unwrap().iter().flat_map(floats))
        .collect();
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = max_abs_diff(&g, &want);
    assert!(scale > 0.0);
    assert!(
        d < 1e-5,
        "descriptor gradient differs by {d} (max |grad| {scale})"
    );
}

#[test]
fn adamw_matches_pytorch() {
    let r = read_json(&fixtures().join("train_reference.json"));
    let a = &r["adamw"];
    let p0 = rows(&a["param"]);
    let var =
        Var::from_tensor(&Tensor::from_vec(p0.concat(), (4, 3), &Device::Cpu).unwrap()).unwrap();
    let cfg = AdamWConfig {
        lr: a["lr"].as_f64().unwrap(),
        beta1: 0.9,
        beta2: 0.999,
        eps: a["eps"].as_f64().unwrap(),
        weight_decay: a["weight_decay"].as_f64().unwrap(),
    };
    let mut opt = AdamW::new(vec![var.clone()], cfg).unwrap();
    for g in a["grads"].as_array().unwrap() {
        // A loss whose gradient is exactly g: sum(p * g).
        let g = Tensor::from_vec(rows(g).concat(), (4, 3), &Device::Cpu).unwrap();
        let loss = (var.as_tensor() * &g).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&grads).unwrap();
    }
    let got: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let d = max_abs_diff(&got, &rows(&a["result"]).concat());
    assert!(d < 1e-6, "AdamW differs by {d}");
}

#[test]
fn cosine_warm_restarts_matches_pytorch() {
    let r = read_json(&fixtures().join("train_reference.json"));
    for (e, want) in floats(&r["cosine_lrs"]).iter().enumerate() {
        let got = cosine_warm_restarts(5e-6, 0.0, 10, e) as f32;
        assert!((got - want).abs() < 1e-12, "epoch {e}: {got} vs {want}");
    }
}

/// 7 visually distinct classes: colours, shapes and textures, with jitter.
fn synthetic_image(class: usize, seed: u64) -> image::RgbImage {
    let mut rng = cliper::model::rng::SplitMix64::new(seed * 7919 + class as u64);
    let (w, h) = (40u32, 40u32);
    let ox = rng.below(6) as i64;
    let oy = rng.below(6) as i64;
    image::RgbImage::from_fn(w, h, |x, y| {
        let (xi, yi) = (x as i64 + ox, y as i64 + oy);
        let n = (rng.normal() * 12.0) as i32;
        let c: [i32; 3] = match class {
            0 => [220, 40, 40], // red field
            1 => {
                if (xi - 20).pow(2) + (yi - 20).pow(2) < 150 {
                    [30, 60, 230]
                } else {
                    [235, 235, 235]
                }
            } // blue disc
            2 => {
                if (yi / 4) % 2 == 0 {
                    [40, 200, 60]
                } else {
                    [10, 60, 20]
                }
            } // green stripes
            3 => {
                if ((xi / 5) + (yi / 5)) % 2 == 0 {
                    [250, 220, 30]
                } else {
                    [40, 30, 0]
                }
            } // yellow checks
            4 => {
                if (xi / 3) % 2 == 0 {
                    [90, 90, 90]
                } else {
                    [20, 20, 20]
                }
            } // grey bars
            5 => {
                if ((xi + yi) / 4) % 2 == 0 {
                    [220, 40, 220]
                } else {
                    [250, 200, 250]
                }
            } // magenta diagonals
            _ => {
                if (xi - 20).abs() < 6 || (yi - 20).abs() < 6 {
                    [0, 0, 0]
                } else {
                    [120, 220, 230]
                }
            } // cyan with a black cross
        };
        image::Rgb(c.map(|v| (v + n).clamp(0, 255) as u8))
    })
}

fn make_dataset(root: &std::path::Path, per_class_train: usize, per_class_test: usize) {
    let classes = cliper::model::cliper::CLASSES;
    for (split, n, base) in [
        ("train", per_class_train, 0u64),
        ("test", per_class_test, 10_000),
    ] {
        for (c, name) in classes.iter().enumerate() {
            let dir = root.join(split).join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                synthetic_image(c, base + i as u64)
                    .save(dir.join(format!("{i:03}.png")))
                    .unwrap();
            }
        }
    }
}

#[test]
fn stage1_learns_a_synthetic_dataset_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 12, 6);
    let out = tmp.path().join("ck.safetensors");
    let w = fixtures()
        .join("clip_c_hf16")
        .to_string_lossy()
        .into_owned();
    let (d, o) = (
        data.to_string_lossy().into_owned(),
        out.to_string_lossy().into_owned(),
    );
    let args = |epochs: &str, resume: bool| {
        let mut a = vec![
            "train",
            "--weights",
            &w,
            "--data",
            &d,
            "--layout",
            "folder",
            "--stage1-only",
            "--stage1-epochs",
            epochs,
            "--batch-size",
            "16",
            "--out",
            &o,
            "--device",
            "cpu",
        ];
        if resume {
            a.push("--resume");
        }
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        cliper(&refs)
    };
    let (code, _, err) = run(args("20", false));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("epoch  20/20 stage 1"), "{err}");
    assert!(err.contains("descriptor readings"), "{err}");
    // Resume continues after epoch 20 instead of starting over.
    let (code, _, err2) = run(args("24", true));
    assert_eq!(code, 0, "{err2}");
    assert!(err2.contains("resuming after epoch 20"), "{err2}");
    assert!(
        err2.contains("epoch  21/24") && !err2.contains("epoch   1/24"),
        "{err2}"
    );
    // The feature cache was reused.
    assert!(err2.contains("cached features"), "{err2}");

    let png = tmp.path().join("confusion.png");
    let (code, out_json, err) = cliper(&[
        "eval",
        "--weights",
        &w,
        "--descriptors",
        &o,
        "--data",
        &d,
        "--layout",
        "folder",
        "--json",
        "--png",
        &png.to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out_json.trim()).unwrap();
    let war = v["war"].as_f64().unwrap();
    assert!(war >= 0.9, "test accuracy {war} after stage 1: {err2}");
    assert_eq!(v["n"], 42);
    assert_eq!(v["confusion"].as_array().unwrap().len(), 7);
    assert!(png.is_file());
    // The checkpoint loads in classify.
    let img = data.join("test/happiness/000.png");
    let (code, out, err) = cliper(&[
        "classify",
        "--weights",
        &w,
        "--descriptors",
        &o,
        "--no-detect",
        "--json",
        &img.to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"predicted\""));
}

#[test]
fn bad_training_input() {
    let tmp = tempfile::tempdir().unwrap();
    let w = fixtures()
        .join("clip_c_hf16")
        .to_string_lossy()
        .into_owned();
    let out = tmp
        .path()
        .join("ck.safetensors")
        .to_string_lossy()
        .into_owned();
    // Empty folder.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_clean_error(
        &[
            "train",
            "--weights",
            &w,
            "--data",
            &empty.to_string_lossy(),
            "--layout",
            "folder",
            "--out",
            &out,
        ],
        "no samples",
    );
    // Unknown class folder.
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(bad.join("train/contempt")).unwrap();
    assert_clean_error(
        &[
            "train",
            "--weights",
            &w,
            "--data",
            &bad.to_string_lossy(),
            "--layout",
            "folder",
            "--out",
            &out,
        ],
        "contempt",
    );
    // RAF-DB label out of range.
    let raf = tmp.path().join("raf");
    std::fs::create_dir_all(raf.join("EmoLabel")).unwrap();
    std::fs::create_dir_all(raf.join("Image/aligned")).unwrap();
    synthetic_image(0, 1)
        .save(raf.join("Image/aligned/train_00001_aligned.jpg"))
        .unwrap();
    std::fs::write(
        raf.join("EmoLabel/list_patition_label.txt"),
        "train_00001.jpg 9\n",
    )
    .unwrap();
    assert_clean_error(
        &[
            "train",
            "--weights",
            &w,
            "--data",
            &raf.to_string_lossy(),
            "--layout",
            "rafdb",
            "--out",
            &out,
        ],
        "out of range",
    );
    // Resume without a state.
    let data = tmp.path().join("data");
    make_dataset(&data, 1, 1);
    assert_clean_error(
        &[
            "train",
            "--weights",
            &w,
            "--data",
            &data.to_string_lossy(),
            "--layout",
            "folder",
            "--out",
            &out,
            "--resume",
        ],
        "cannot resume",
    );
    // A checkpoint from a different CLIP width is refused by classify/eval.
    let other = fixtures().join("clip_a_hf").to_string_lossy().into_owned();
    let ck = fixtures()
        .join("clip_c_hf16/descriptors.safetensors")
        .to_string_lossy()
        .into_owned();
    assert_clean_error(
        &[
            "eval",
            "--weights",
            &other,
            "--descriptors",
            &ck,
            "--data",
            &data.to_string_lossy(),
            "--layout",
            "folder",
        ],
        "expected [35, 4, 32]",
    );
}

#[test]
fn clips_train_descriptors_then_the_temporal_module() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("clips");
    let classes = cliper::model::cliper::CLASSES;
    for (split, n, base) in [("train", 4u64, 0u64), ("test", 2, 500)] {
        for (c, name) in classes.iter().enumerate() {
            for k in 0..n {
                let dir = data.join(split).join(name).join(format!("clip{k}"));
                std::fs::create_dir_all(&dir).unwrap();
                for f in 0..10u64 {
                    synthetic_image(c, base + k * 100 + f)
                        .save(dir.join(format!("{f:04}.png")))
                        .unwrap();
                }
            }
        }
    }
    let out = tmp.path().join("dyn.safetensors");
    let w = fixtures()
        .join("clip_c_hf16")
        .to_string_lossy()
        .into_owned();
    let (d, o) = (
        data.to_string_lossy().into_owned(),
        out.to_string_lossy().into_owned(),
    );
    let (code, _, err) = cliper(&[
        "train",
        "--weights",
        &w,
        "--data",
        &d,
        "--layout",
        "clips",
        "--stage1-epochs",
        "15",
        "--epochs",
        "18",
        "--batch-size",
        "8",
        "--out",
        &o,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("stage 1 (clips") && err.contains("stage 2 (temporal)"),
        "{err}"
    );
    let (code, out_json, err) = cliper(&[
        "eval",
        "--weights",
        &w,
        "--descriptors",
        &o,
        "--data",
        &d,
        "--layout",
        "clips",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out_json.trim()).unwrap();
    assert_eq!(v["n"], 14);
    assert!(v["war"].as_f64().unwrap() >= 0.7, "{v}");
    // The best checkpoint may be from stage 1 (no temporal weights) or stage 2;
    // classify-clip handles both and says which.
    let clip_dir = data.join("test/anger/clip0");
    let (code, out, err) = cliper(&[
        "classify-clip",
        "--weights",
        &w,
        "--descriptors",
        &o,
        "--no-detect",
        "--json",
        &clip_dir.to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let mode = v["faces"][0]["temporal"].as_str().unwrap().to_string();
    let ck = CliperCheckpoint::load(&out_path(&o)).unwrap();
    assert_eq!(mode == "temporal", !ck.temporal.is_empty(), "{mode}");
}

fn out_path(s: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(s)
}

#[test]
fn stage2_fine_tunes_the_vision_tower_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 3, 1);
    let out = tmp.path().join("ck.safetensors");
    let w = fixtures()
        .join("clip_c_hf16")
        .to_string_lossy()
        .into_owned();
    let (d, o) = (
        data.to_string_lossy().into_owned(),
        out.to_string_lossy().into_owned(),
    );
    let base = [
        "train",
        "--weights",
        &w,
        "--data",
        &d,
        "--layout",
        "folder",
        "--stage1-epochs",
        "1",
        "--batch-size",
        "8",
        "--out",
        &o,
    ];
    let mut args: Vec<&str> = base.to_vec();
    args.extend(["--epochs", "3"]);
    let (code, _, err) = cliper(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("epoch   2/3 stage 2") && err.contains("epoch   3/3 stage 2"),
        "{err}"
    );
    // The state holds the tuned tower; resuming continues in stage 2.
    let state = CliperCheckpoint::load(&tmp.path().join("ck.state.safetensors")).unwrap();
    assert!(state
        .vision
        .contains_key("vision_model.post_layernorm.weight"));
    let mut args: Vec<&str> = base.to_vec();
    args.extend(["--epochs", "4", "--resume"]);
    let (code, _, err) = cliper(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("resuming after epoch 3 (stage 2)") && err.contains("epoch   4/4 stage 2"),
        "{err}"
    );
    // Whatever epoch was best, the checkpoint loads in classify.
    let img = data.join("test/anger/000.png");
    let (code, _, err) = cliper(&[
        "classify",
        "--weights",
        &w,
        "--descriptors",
        &o,
        "--no-detect",
        "--json",
        &img.to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
}
