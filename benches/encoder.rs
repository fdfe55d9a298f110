//! `cargo bench`: the image encoder's CPU paths against Candle's own
//! op-by-op forward (the reference: what candle-transformers runs), measured
//! in the same run on random ViT-B/16 weights, and reported as ratios; plus
//! the explanation maps against one encode. `tools/bench_reference.py`
//! compares with ONNX Runtime and PyTorch; `cliper bench` times the whole
//! pipeline.
//!
//!     cargo bench --bench encoder -- [--runs N] [--batch B] [--threads T]

use candle_core::{DType, Device, Tensor};
use cliper::commands::bench::{self, Stat};
use cliper::model::config::ClipConfig;
use cliper::model::explain::{self, Target};
use cliper::model::{Checkpoint, ClipModel};

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let runs = arg(&args, "--runs", 5);
    let batch = arg(&args, "--batch", 1).max(1);
    let threads = arg(&args, "--threads", 0);
    if threads > 0 {
        bench::set_threads(threads)?;
    } else {
        cliper::parallel::build_model_pool(None)?;
    }
    let ckpt = Checkpoint::random(&ClipConfig::vit_b16(), 0)?;
    let mut clip = ClipModel::from_checkpoint(ckpt, &Device::Cpu, DType::F32)?;
    let px = Tensor::randn(0f32, 1.0, (batch, 3, 224, 224), &Device::Cpu)?;
    let warmup = 1;
    let per_image = |s: Stat| s.median / batch as f64;
    let mut rows: Vec<(&str, f64)> = Vec::new();

    clip.vision.backend = cliper::model::vision::VisionBackend::Candle;
    let reference = bench::time(warmup, runs, || Ok(clip.vision.forward(&px)?))?;
    rows.push(("Candle op-by-op f32 (reference)", per_image(reference)));
    clip.vision.backend = cliper::model::vision::VisionBackend::FusedF32;
    let fused = bench::time(warmup, runs, || Ok(clip.vision.forward(&px)?))?;
    rows.push(("fused f32", per_image(fused)));
    if clip.vision.set_quantized(true).is_ok() {
        let q8 = bench::time(warmup, runs, || Ok(clip.vision.forward(&px)?))?;
        rows.push(("q8", per_image(q8)));
        clip.vision.set_quantized(false)?;
    }

    let one = px.narrow(0, 0, 1)?;
    let text = Tensor::randn(0f32, 1.0, (35, clip.config.embed_dim), &Device::Cpu)?;
    let text = cliper::model::layers::l2_normalize(&text)?;
    let last = clip
        .vision
        .forward_with(&one, false, true)?
        .last_block_input
        .ok_or("no last-block input")?;
    let fast = bench::time(warmup, runs, || {
        Ok(explain::fast_target_maps(
            &clip.vision,
            &last,
            &text,
            Target::Class(3),
        )?)
    })?;
    let gradcam = bench::time(warmup, runs, || {
        Ok(explain::gradcam_map(
            &clip.vision,
            &one,
            &text,
            Target::Class(3),
        )?)
    })?;

    println!(
        "ViT-B/16 image encoder, random weights, batch {batch}, {} thread(s), median of {runs} runs",
        rayon::current_num_threads()
    );
    println!(
        "  {:<34} {:>12} {:>16}",
        "path", "ms / image", "vs reference"
    );
    let base = rows[0].1;
    for (name, ms) in &rows {
        println!("  {name:<34} {ms:>12.1} {:>16.2}", ms / base);
    }
    let enc = per_image(fused);
    println!(
        "  fast explanation map (1 face)      {:>12.1} {:>13.1}% of a fused encode",
        fast.median,
        100.0 * fast.median / enc
    );
    println!(
        "  Grad-CAM map (1 face)              {:>12.1} {:>13.1} fused encodes",
        gradcam.median,
        gradcam.median / enc
    );
    Ok(())
}
