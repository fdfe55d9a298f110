//! Bad input at the command line: one-line errors that name the culprit,
//! non-zero exit codes, never a panic.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn fixture_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("clip_a_hf/model.safetensors"), &Device::Cpu)
        .unwrap()
}

fn save_model(dir: &std::path::Path, tensors: &HashMap<String, Tensor>) -> String {
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(tensors, &path).unwrap();
    std::fs::copy(
        fixtures().join("clip_a_hf/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

fn image() -> String {
    fixtures()
        .join("clip_a_hf/square0.png")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn missing_weights_file() {
    let err = assert_clean_error(
        &[
            "embed",
            "--weights",
            "/nonexistent/w.safetensors",
            "--text",
            "x",
        ],
        "/nonexistent/w.safetensors",
    );
    assert!(err.contains("cliper weights fetch"), "{err}");
}

#[test]
fn truncated_safetensors() {
    let d = tmp();
    let bytes = std::fs::read(fixtures().join("clip_a_hf/model.safetensors")).unwrap();
    let path = d.path().join("model.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let p = path.to_string_lossy();
    assert_clean_error(&["embed", "--weights", &p, "--image", &image()], &p);
}

#[test]
fn garbage_and_empty_weights() {
    let d = tmp();
    let path = d.path().join("model.safetensors");
    std::fs::write(&path, b"this is not a tensor file at all").unwrap();
    let p = path.to_string_lossy();
    assert_clean_error(&["embed", "--weights", &p, "--image", &image()], &p);
    std::fs::write(&path, b"").unwrap();
    assert_clean_error(&["embed", "--weights", &p, "--image", &image()], "empty");
    let pt = d.path().join("model.pt");
    std::fs::write(&pt, b"PK\x03\x04 broken zip").unwrap();
    let p = pt.to_string_lossy();
    assert_clean_error(&["embed", "--weights", &p, "--image", &image()], &p);
}

#[test]
fn missing_tensor_is_named() {
    let d = tmp();
    let mut t = fixture_tensors();
    t.remove("vision_model.encoder.layers.1.self_attn.k_proj.bias");
    let p = save_model(d.path(), &t);
    assert_clean_error(
        &["embed", "--weights", &p, "--image", &image()],
        "vision_model.encoder.layers.1.self_attn.k_proj.bias",
    );
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let d = tmp();
    let mut t = fixture_tensors();
    t.insert(
        "text_model.encoder.layers.0.mlp.fc2.weight".into(),
        Tensor::zeros((32, 63), DType::F32, &Device::Cpu).unwrap(),
    );
    let p = save_model(d.path(), &t);
    let err = assert_clean_error(
        &["embed", "--weights", &p, "--text", "x"],
        "text_model.encoder.layers.0.mlp.fc2.weight",
    );
    assert!(
        err.contains("[32, 63]") && err.contains("[32, 64]"),
        "{err}"
    );
}

#[test]
fn not_clip_weights() {
    let d = tmp();
    let mut t = HashMap::new();
    t.insert(
        "foo.weight".to_string(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let p = save_model(d.path(), &t);
    assert_clean_error(
        &["embed", "--weights", &p, "--text", "x"],
        "not CLIP weights",
    );
}

#[test]
fn folder_without_weights() {
    let d = tmp();
    let p = d.path().to_string_lossy().into_owned();
    assert_clean_error(&["embed", "--weights", &p, "--text", "x"], &p);
}

#[test]
fn unreadable_and_empty_images() {
    let w = fixtures().join("clip_a_hf").to_string_lossy().into_owned();
    let d = tmp();
    let bad = d.path().join("bad.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let b = bad.to_string_lossy();
    assert_clean_error(&["embed", "--weights", &w, "--image", &b], &b);
    let empty = d.path().join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    let e = empty.to_string_lossy();
    assert_clean_error(&["embed", "--weights", &w, "--image", &e], &e);
    assert_clean_error(
        &["embed", "--weights", &w, "--image", "/no/such.png"],
        "/no/such.png",
    );
}

#[test]
fn text_outside_tiny_vocabulary() {
    // The reduced-vocabulary model cannot embed real BPE ids: say so.
    let w = fixtures().join("clip_a_hf").to_string_lossy().into_owned();
    assert_clean_error(
        &["embed", "--weights", &w, "--text", "a happy face"],
        "vocabulary",
    );
}

#[test]
fn unknown_flag() {
    assert_clean_error(&["embed", "--bogus"], "--bogus");
    let (code, _, _) = cliper(&["embed", "--bogus"]);
    assert_eq!(code, 2);
}

#[test]
fn embed_prints_unit_vector() {
    let w = fixtures()
        .join("clip_c_hf16")
        .to_string_lossy()
        .into_owned();
    let (code, out, err) = cliper(&[
        "embed",
        "--weights",
        &w,
        "--text",
        "a photo of a happy face",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let e = floats(&v["embedding"]);
    assert_eq!(e.len(), 24);
    let want = read_json(&fixtures().join("clip_c_hf16/reference.json"));
    let d = max_abs_diff(&e, &floats(&want["strings"][0]["embedding"]));
    assert!(d < 1e-4, "differs by {d}");
}
