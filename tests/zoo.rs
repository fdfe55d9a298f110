//! Models of other projects, run as published: DFER-CLIP checkpoints and the
//! Exp-CLIP head, against PyTorch references on tiny random models in their
//! exact file layouts (`tools/make_zoo_fixtures.py` writes
//! tests/fixtures/zoo/), and banks of any shape end to end.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

use cliper::model::setup::{self, BankSource, ModelSpec};
use cliper::pipeline::dynamic::DynamicScorer;

fn zoo(name: &str) -> PathBuf {
    fixtures().join("zoo").join(name)
}

fn reference() -> Value {
    read_json(&zoo("reference.json"))
}

fn dfer_spec(file: &str) -> ModelSpec {
    ModelSpec {
        // No CLIP weights: the checkpoint holds its own.
        weights: None,
        bank: BankSource::Learned(zoo(file)),
        device: "cpu".into(),
        head: None,
        precision: Default::default(),
    }
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

/// Both published checkpoint variants: class-specific contexts with the
/// optimizer state saved (DFEW, 7 classes, 1 temporal layer), and a generic
/// context without it (MAFW, 11 classes named by the prompts, 2 layers).
#[test]
fn dfer_clip_checkpoints_match_pytorch() {
    let all = reference();
    for (file, key) in [
        ("dfer_dfew.pth", "dfer_dfew"),
        ("dfer_mafw.pth", "dfer_mafw"),
    ] {
        let r = &all[key];
        let loaded = setup::load(&dfer_spec(file)).unwrap();
        let bank = &loaded.bank;
        assert_eq!(bank.kind.as_str(), "dfer-clip");
        assert_eq!(bank.layout.classes(), names(&r["classes"]), "{file}");
        assert_eq!(bank.descriptors.len(), bank.layout.num_classes());
        // The class texts are read back out of the saved embeddings.
        for (d, want) in bank.descriptors.iter().zip(names(&r["texts"])) {
            assert_eq!(d.text, want, "{file}");
            assert_eq!(
                d.words.as_ref().unwrap().len(),
                8,
                "8 learned context tokens"
            );
        }
        assert_eq!(
            loaded.clip.preprocessing,
            cliper::model::preprocess::Preprocessing::Squash
        );
        let t = bank.text_features.to_vec2::<f32>().unwrap();
        for (got, want) in t.iter().zip(r["text_features"].as_array().unwrap()) {
            let d = max_abs_diff(got, &floats(want));
            assert!(d < 1e-5, "{file}: text feature differs by {d}");
        }
        // Single frames: the image branch.
        let frames: Vec<image::RgbImage> = names(&r["frames"])
            .iter()
            .map(|f| image::open(zoo(f)).unwrap().to_rgb8())
            .collect();
        let emb = loaded.clip.encode_rgb(&frames).unwrap();
        let scores = cliper::model::cliper::scoring::score(&emb, bank).unwrap();
        for (s, want) in scores.iter().zip(r["frame_logits"].as_array().unwrap()) {
            let d = max_abs_diff(&s.logits, &floats(want));
            assert!(d < 1e-4, "{file}: frame logits differ by {d}");
        }
        // The 16-frame clip: the temporal module on raw features.
        let ck = loaded.cliper.as_ref().unwrap();
        let temporal = ck
            .temporal_module(loaded.clip.config.embed_dim, &loaded.clip.device)
            .unwrap()
            .expect("temporal_net");
        assert_eq!(
            temporal.config.flavour,
            cliper::model::temporal::TemporalFlavour::DferClip
        );
        assert_eq!(
            temporal.config.layers,
            if key == "dfer_dfew" { 1 } else { 2 }
        );
        let scorer = DynamicScorer::new(Some(temporal), &loaded.clip.device);
        let raw = loaded.clip.encode_rgb_raw(&frames).unwrap();
        let rows = raw.to_vec2::<f32>().unwrap();
        let clip = scorer.score(&rows, bank).unwrap();
        let d = max_abs_diff(&clip.scores.logits, &floats(&r["clip_logits"]));
        assert!(d < 1e-4, "{file}: clip logits differ by {d}");
        assert_eq!(clip.scores.predicted_name(), r["clip_predicted"]);
    }
}

fn frames_dir(key: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in names(&reference()[key]["frames"]) {
        std::fs::copy(zoo(&f), d.path().join(&f)).unwrap();
    }
    d
}

#[test]
fn classify_and_classify_clip_take_a_dfer_clip_file_as_published() {
    let r = reference();
    let frames = frames_dir("dfer_dfew");
    let (code, out, err) = cliper(&[
        "classify-clip",
        "--model",
        &zoo("dfer_dfew.pth").to_string_lossy(),
        "--no-detect",
        "--json",
        &frames.path().to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let face = &v["faces"][0];
    assert_eq!(face["temporal"], "temporal");
    assert_eq!(face["predicted"], r["dfer_dfew"]["clip_predicted"]);
    let scores: Vec<f32> = face["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["score"].as_f64().unwrap() as f32)
        .collect();
    // One descriptor per class: the class score is its logit.
    let d = max_abs_diff(&scores, &floats(&r["dfer_dfew"]["clip_logits"]));
    assert!(d < 1e-4, "clip scores differ by {d}");

    let first = zoo(&names(&r["dfer_mafw"]["frames"])[0]);
    let (code, out, err) = cliper(&[
        "classify",
        "--model",
        &zoo("dfer_mafw.pth").to_string_lossy(),
        "--no-detect",
        "--json",
        &first.to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["branch"], "image", "a still says which branch scored it");
    assert!(err.contains("image branch"), "{err}");
    let classes = v["faces"][0]["classes"].as_array().unwrap();
    assert_eq!(classes.len(), 11);
    assert_eq!(classes[10]["name"], "disappointment");
    let logits: Vec<f32> = classes
        .iter()
        .map(|c| c["score"].as_f64().unwrap() as f32)
        .collect();
    let want = floats(&r["dfer_mafw"]["frame_logits"][0]);
    assert!(max_abs_diff(&logits, &want) < 1e-4);
}

#[test]
fn exp_clip_head_matches_pytorch() {
    let r = &reference()["expclip"];
    let spec = ModelSpec {
        weights: Some(fixtures().join("clip_c_hf16")),
        bank: BankSource::Prompts(zoo("expclip_prompts.txt")),
        device: "cpu".into(),
        head: Some(zoo("expclip_head.pth")),
        precision: Default::default(),
    };
    let loaded = setup::load(&spec).unwrap();
    let bank = &loaded.bank;
    assert_eq!(bank.layout.classes(), names(&r["classes"]));
    assert_eq!(bank.layout.uniform(), Some(2));
    let t = bank.text_features.to_vec2::<f32>().unwrap();
    for (got, want) in t.iter().zip(r["text_features"].as_array().unwrap()) {
        let d = max_abs_diff(got, &floats(want));
        assert!(d < 1e-5, "projected text feature differs by {d}");
    }
    for (name, want) in r["images"].as_object().unwrap() {
        let img = image::open(fixtures().join("clip_c_hf16").join(name))
            .unwrap()
            .to_rgb8();
        let emb = loaded.clip.encode_rgb(&[img]).unwrap();
        let f = bank.project_images(&emb).unwrap().to_vec2::<f32>().unwrap();
        let d = max_abs_diff(&f[0], &floats(&want["feature"]));
        assert!(d < 1e-5, "{name}: projected image feature differs by {d}");
        let s = cliper::model::cliper::scoring::score(&emb, bank).unwrap();
        let d = max_abs_diff(&s[0].logits, &floats(&want["logits"]));
        assert!(d < 1e-4, "{name}: logits differ by {d}");
        let d = max_abs_diff(&s[0].probs, &floats(&want["probs"]));
        assert!(d < 1e-5, "{name}: probabilities differ by {d}");
    }
    // A clip without temporal weights: the head on the mean feature, as
    // Exp-CLIP scores video.
    let imgs: Vec<image::RgbImage> = ["square0.png", "face.png"]
        .iter()
        .map(|n| {
            image::open(fixtures().join("clip_c_hf16").join(n))
                .unwrap()
                .to_rgb8()
        })
        .collect();
    let raw = loaded
        .clip
        .encode_rgb_raw(&imgs)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let clip = DynamicScorer::new(None, &loaded.clip.device)
        .score(&raw, bank)
        .unwrap();
    assert_eq!(clip.mode.as_str(), "mean-of-features");
    let d = max_abs_diff(&clip.scores.logits, &floats(&r["clip_logits"]));
    assert!(d < 1e-4, "clip logits differ by {d}");
    // The probe goes through the head too: its logit is on the same scale.
    let probe = bank
        .encode_probe(
            &loaded.clip,
            &loaded.tokenizer,
            "an expression of happiness.",
        )
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let d = max_abs_diff(&probe, &t[0]);
    assert!(
        d < 1e-5,
        "probe feature differs from the same prompt's by {d}"
    );
}

#[test]
fn bad_models_and_heads_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let w = fixtures()
        .join("clip_c_hf16")
        .to_string_lossy()
        .into_owned();
    // A head made for another width.
    let bad_head = tmp.path().join("head.safetensors");
    let t =
        candle_core::Tensor::zeros((64, 23), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("mlp.weight".to_string(), t)]),
        &bad_head,
    )
    .unwrap();
    let img = fixtures().join("clip_c_hf16/square0.png");
    let img = img.to_string_lossy();
    let e = assert_clean_error(
        &[
            "classify",
            "--weights",
            &w,
            "--head",
            &bad_head.to_string_lossy(),
            &img,
        ],
        "[64, 23]",
    );
    assert!(e.contains("embedding width 24"), "{e}");
    // A head file without the head.
    let e = assert_clean_error(
        &[
            "classify",
            "--weights",
            &w,
            "--head",
            &zoo("dfer_mafw.pth").to_string_lossy(),
            &img,
        ],
        "mlp.weight",
    );
    assert!(e.contains("dfer_mafw.pth"), "{e}");
    // A head on a trained model.
    assert_clean_error(
        &[
            "classify",
            "--weights",
            &w,
            "--descriptors",
            &fixtures()
                .join("clip_c_hf16/descriptors.safetensors")
                .to_string_lossy(),
            "--head",
            &zoo("expclip_head.pth").to_string_lossy(),
            &img,
        ],
        "cannot be used with",
    );
    // A DFER-CLIP prompt learner on a CLIP of another text width.
    let base = cliper::model::Checkpoint::load(
        &cliper::model::weights::locate(Some(&fixtures().join("clip_c_hf16"))).unwrap(),
        candle_core::DType::F32,
    )
    .unwrap();
    let clip_c = cliper::model::ClipModel::from_checkpoint(
        base,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let ck = cliper::model::cliper::CliperCheckpoint::load(&zoo("dfer_dfew.pth")).unwrap();
    let e = cliper::model::dfer_clip::bank(
        &clip_c,
        &cliper::model::tokenizer::ClipTokenizer::new(),
        ck.prompt_learner.as_ref().unwrap(),
        "dfer_dfew.pth",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("width 8") && e.contains("width 16"), "{e}");
    // An unknown class in a prompts file.
    let p = tmp.path().join("p.txt");
    std::fs::write(&p, "[happy]\na smile\n[boredom]\na yawn\n").unwrap();
    let e = assert_clean_error(
        &[
            "classify",
            "--weights",
            &w,
            "--prompts",
            &p.to_string_lossy(),
            &img,
        ],
        "boredom",
    );
    assert!(e.contains("contempt"), "the known classes are listed: {e}");
    // A pickle that would run code is refused, as a model or a head.
    let evil = tmp.path().join("evil.pth");
    write_evil_pickle(&evil);
    for flag in ["--model", "--head"] {
        let mut args = vec!["classify", "--weights", &w, flag];
        let ev = evil.to_string_lossy().into_owned();
        args.push(&ev);
        args.push(&img);
        let e = assert_clean_error(&args, "evil.pth");
        assert!(
            e.contains("posix") || e.contains("system") || e.contains("refuse"),
            "{e}"
        );
    }
    // A name that is not installed says how to get it.
    let e = assert_fails_naming(
        &["classify", "--model", "dfer-clip-dfew-fold1", &img],
        "weights fetch dfer-clip-dfew-fold1",
    );
    let _ = e;
}

/// A torch zip whose pickle calls `posix.system`.
fn write_evil_pickle(path: &Path) {
    // protocol 2: GLOBAL posix system, a string, TUPLE1, REDUCE, STOP
    torch_zip(
        path,
        b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.",
    );
}

/// An 11-class model end to end: a recorded run, its report, and eval.
#[test]
fn an_eleven_class_model_records_reports_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let frames = frames_dir("dfer_mafw");
    let model = zoo("dfer_mafw.pth").to_string_lossy().into_owned();
    let rec = tmp.path().join("rec");
    let (code, _out, err) = cliper(&[
        "run",
        "--model",
        &model,
        "--source",
        &frames.path().to_string_lossy(),
        "--no-detect",
        "--dynamic",
        "--record",
        &rec.to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
    let meta = read_json(&rec.join("meta.json"));
    assert_eq!(meta["classes"].as_array().unwrap().len(), 11);
    assert_eq!(meta["banks"][0]["kind"], "dfer-clip");
    assert_eq!(meta["banks"][0]["descriptors_per_class"][10], 1);
    let csv = std::fs::read_to_string(rec.join("session.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    assert!(header.contains(",contempt,") && header.contains(",dynamic_disappointment,"));
    let rows: Vec<_> = csv
        .lines()
        .skip(1)
        .map(|l| cliper::session::record::parse_csv_row(l, 11).expect("a whole 11-class row"))
        .collect();
    assert_eq!(rows.len(), 16);
    assert!(rows
        .iter()
        .all(|r| (r.probs.iter().sum::<f32>() - 1.0).abs() < 1e-4));
    // The last frame's window was full: the temporal module scored it.
    assert!(rows.last().unwrap().dynamic.is_some());

    let (code, out, err) = cliper(&["report", &rec.to_string_lossy(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["classes"].as_array().unwrap().len(), 11);
    let share: f64 = v["faces"][0]["dominant_share"]
        .as_object()
        .unwrap()
        .values()
        .map(|x| x.as_f64().unwrap())
        .sum();
    assert!((share - 1.0).abs() < 1e-6);

    // eval: a test split with MAFW's class folders.
    let data = tmp.path().join("data");
    let r = reference();
    for (i, class) in ["contempt", "happiness", "disappointment"]
        .iter()
        .enumerate()
    {
        let dir = data.join("test").join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for f in names(&r["dfer_mafw"]["frames"]).iter().skip(i * 4).take(4) {
            std::fs::copy(zoo(f), dir.join(f)).unwrap();
        }
    }
    let (code, out, err) = cliper(&[
        "eval",
        "--model",
        &model,
        "--data",
        &data.to_string_lossy(),
        "--layout",
        "folder",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["n"], 12);
    assert_eq!(v["classes"].as_array().unwrap().len(), 11);
    assert_eq!(v["confusion"].as_array().unwrap().len(), 11);
    // The predictions are the image branch's argmax of each frame.
    let frame_logits = r["dfer_mafw"]["frame_logits"].as_array().unwrap();
    let mut want = vec![vec![0u64; 11]; 11];
    for (i, truth) in [7usize, 0, 10].iter().enumerate() {
        for l in frame_logits.iter().skip(i * 4).take(4) {
            let l = floats(l);
            let p = (0..11).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap();
            want[*truth][p] += 1;
        }
    }
    let got: Vec<Vec<u64>> = v["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(got, want);
}
