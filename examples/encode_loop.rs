//! Runs only the image encoder in a loop, for profilers (`perf record`):
//! `cliper bench` times every stage, which would dilute a profile.
//!
//! ```text
//! cargo build --release --example encode_loop
//! perf record -e cpu-clock target/release/examples/encode_loop f32 1 50 2
//! ```
//!
//! Arguments: precision (`f32` = the gemm crate, `onednn-f32`, `auto-f32`
//! (what `--precision f32` runs), `q8` (our 8-bit kernels), `onednn-q8`, `bf16`,
//! `auto` (what `--precision auto` runs)), batch, iterations, threads. Random ViT-B/16 weights.

use candle_core::{DType, Device, Tensor};

// As the cliper binary: timings and memory as it has them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    let precision = get(0, "f32");
    let batch: usize = get(1, "1").parse()?;
    let iters: usize = get(2, "20").parse::<usize>()?.max(1);
    let threads: usize = get(3, "0").parse()?;
    if threads > 0 {
        cliper::commands::bench::set_threads(threads)?;
    } else {
        cliper::parallel::build_model_pool(None)?;
    }
    let config = cliper::model::ClipConfig::vit_b16();
    let ckpt = cliper::model::Checkpoint::random(&config, 0)?;
    let mut clip = cliper::model::ClipModel::from_checkpoint(ckpt, &Device::Cpu, DType::F32)?;
    match precision.as_str() {
        "f32" => {}
        "onednn-f32" => {
            clip.vision
                .pack_onednn(cliper::model::onednn::DataType::F32)?;
        }
        "bf16" => {
            clip.vision
                .pack_onednn(cliper::model::onednn::DataType::Bf16)?;
        }
        "onednn-q8" => {
            clip.vision
                .pack_onednn(cliper::model::onednn::DataType::Int8)?;
        }
        "auto-f32" => {
            clip.vision.pack_f32_fastest()?;
        }
        // Our 8-bit kernels on the best instruction set (an instruction
        // set named means ours, without the race against oneDNN's).
        "q8" => clip.vision.quantize(cliper::model::gemm_i8::Isa::best())?,
        "auto" => {
            clip.vision.pack_fastest()?;
        }
        other => return Err(format!("unknown precision {other}").into()),
    }
    eprintln!(
        "kernel: {}, peak memory so far {:.0} MB",
        clip.vision.kernel(),
        cliper::commands::bench::peak_memory_mb().unwrap_or(f64::NAN)
    );
    let px = Tensor::randn(0f32, 1.0, (batch, 3, 224, 224), &Device::Cpu)?;
    clip.vision.forward(&px)?;
    // Each forward timed alone: the fastest is the figure least touched by
    // other tenants of a shared machine, the median the typical one.
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = std::time::Instant::now();
        clip.vision.forward(&px)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3 / batch as f64);
    }
    ms.sort_by(f64::total_cmp);
    eprintln!(
        "ms per image: fastest {:.1}, median {:.1}",
        ms[0],
        ms[ms.len() / 2]
    );
    Ok(())
}
