//! Writes random CLIP ViT-B/16 weights of the real shape (HF naming,
//! safetensors), for timing `cliper run` and `cliper batch` without a
//! download:
//!
//! ```text
//! cargo run --release --example random_weights -- /tmp/vit-b16-random.safetensors
//! ```
//!
//! The scores they give mean nothing; the work per frame is the real model's.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(out) = std::env::args().nth(1) else {
        return Err("give the file to write, e.g. /tmp/vit-b16-random.safetensors".into());
    };
    let config = cliper::model::ClipConfig::vit_b16();
    let ckpt = cliper::model::Checkpoint::random(&config, 0)?;
    candle_core::safetensors::save(&ckpt.tensors, &out)?;
    eprintln!("wrote {} tensors to {out}", ckpt.tensors.len());
    Ok(())
}
