//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tiny full-vocabulary CLIP fixture (`clip_c_hf16`), f32 on the CPU.
pub fn tiny_clip() -> cliper::model::ClipModel {
    use candle_core::{DType, Device};
    let ckpt = cliper::model::Checkpoint::load(
        &fixtures().join("clip_c_hf16/model.safetensors"),
        DType::F32,
    )
    .unwrap();
    cliper::model::ClipModel::from_checkpoint(ckpt, &Device::Cpu, DType::F32).unwrap()
}

/// `tiny_clip()` with the learned descriptor bank of its fixture checkpoint.
pub fn tiny_cliper() -> (
    cliper::model::ClipModel,
    cliper::model::cliper::DescriptorBank,
) {
    let clip = tiny_clip();
    let ck = cliper::model::cliper::CliperCheckpoint::load(
        &fixtures().join("clip_c_hf16/descriptors.safetensors"),
    )
    .unwrap();
    let bank = cliper::model::cliper::DescriptorBank::learned(
        &clip,
        &cliper::model::tokenizer::ClipTokenizer::new(),
        ck.require_descriptor().unwrap(),
        "d",
    )
    .unwrap();
    (clip, bank)
}

/// The test photo (one face).
pub fn astronaut_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/astronaut.png")
}

pub fn astronaut() -> image::RgbImage {
    image::open(astronaut_path()).unwrap().to_rgb8()
}

/// The tiny full-vocabulary CLIP fixture folder, as a `--weights` argument.
pub fn weights() -> String {
    fixtures()
        .join("clip_c_hf16")
        .to_string_lossy()
        .into_owned()
}

/// Frame `i` of a two-person scene: two copies of the portrait side by side,
/// drifting a few pixels per frame in opposite directions.
pub fn two_faces(portrait: &image::RgbImage, i: u32) -> image::RgbImage {
    let mut canvas = image::RgbImage::from_pixel(1120, 560, image::Rgb([30, 30, 40]));
    image::imageops::overlay(&mut canvas, portrait, 10 + 4 * i as i64, 20);
    image::imageops::overlay(&mut canvas, portrait, 590 - 3 * i as i64, 30 + 2 * i as i64);
    canvas
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs the `cliper` binary; returns (exit code, stdout, stderr).
pub fn cliper(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cliper"))
        .args(args)
        .output()
        .expect("run cliper");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts a clean user-facing failure: non-zero exit, one line on stderr
/// mentioning `needle`, no panic.
pub fn assert_clean_error(args: &[&str], needle: &str) -> String {
    let (code, _out, err) = cliper(args);
    assert_ne!(code, 0, "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "not one line for {args:?}: {err}"
    );
    assert!(
        err.contains(needle),
        "stderr for {args:?} lacks `{needle}`: {err}"
    );
    err
}

/// Asserts a failure without a panic whose stderr mentions `needle` (for
/// commands that also print notes or per-file errors).
pub fn assert_fails_naming(args: &[&str], needle: &str) -> String {
    let (code, _out, err) = cliper(args);
    assert_ne!(code, 0, "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    assert!(
        err.contains(needle),
        "stderr for {args:?} lacks `{needle}`: {err}"
    );
    err
}

/// A `torch.save`-shaped zip whose `archive/data.pkl` is `pickle`.
#[allow(dead_code)]
pub fn torch_zip(path: &Path, pickle: &[u8]) {
    use std::io::Write;
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pickle).unwrap();
    z.start_file("archive/version", opts).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap();
}
