//! The CLIP model: both towers built from a `Checkpoint` on a device.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::ClipConfig;
use super::layers::l2_normalize;
use super::text::TextTower;
use super::tokenizer::ClipTokenizer;
use super::vision::VisionTower;
use super::weights::{Checkpoint, WeightsError};

pub struct ClipModel {
    pub vision: VisionTower,
    pub text: TextTower,
    pub config: ClipConfig,
    pub device: Device,
    pub dtype: DType,
    /// Where the weights came from (for display and session metadata).
    pub source: PathBuf,
    /// How images are prepared for this model (its checkpoint's choice).
    pub preprocessing: super::preprocess::Preprocessing,
}

impl ClipModel {
    /// Builds both towers on `device` in `dtype`.
    ///
    /// Takes the checkpoint so that each tensor the model converts (to the
    /// device and dtype, or to the layout the fused CPU forward reads) is
    /// freed as soon as it is converted: the peak memory is the model's,
    /// not the model's plus the checkpoint's (ViT-B/16 f32 on the CPU:
    /// 931 -> 657 MB at `cliper bench`'s load).
    pub fn from_checkpoint(
        ckpt: Checkpoint,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, WeightsError> {
        let Checkpoint {
            path,
            config: cfg,
            tensors,
            ..
        } = ckpt;
        let wrap = |source| WeightsError::Candle {
            path: path.clone(),
            source,
        };
        let fused = device.is_cpu() && dtype == DType::F32;
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| {
                let v = v.to_device(device)?.to_dtype(dtype)?;
                let v = if fused && super::vision_cpu::is_block_linear_weight(&k) {
                    super::vision_cpu::transposed_layout(v)?
                } else {
                    v
                };
                Ok((k, v))
            })
            .collect::<candle_core::Result<_>>()
            .map_err(wrap)?;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        let cfg = &cfg;
        let vision = VisionTower::new(&cfg.vision, cfg.embed_dim, vb.clone()).map_err(wrap)?;
        let text = TextTower::new(&cfg.text, cfg.embed_dim, vb).map_err(wrap)?;
        Ok(Self {
            vision,
            text,
            config: cfg.clone(),
            device: device.clone(),
            dtype,
            source: path.clone(),
            preprocessing: Default::default(),
        })
    }

    /// L2-normalised image embeddings of preprocessed pixels [B, 3, S, S]: [B, E].
    pub fn encode_images(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let pixels = pixels.to_device(&self.device)?.to_dtype(self.dtype)?;
        l2_normalize(&self.vision.forward(&pixels)?.to_dtype(DType::F32)?)
    }

    /// Preprocessed pixels [N, 3, S, S] of RGB images, prepared as the
    /// model's [`Preprocessing`](super::preprocess::Preprocessing) says
    /// (CLIP's: resize + center crop + normalise).
    pub fn pixels(&self, images: &[image::RgbImage]) -> candle_core::Result<Tensor> {
        let size = self.config.vision.image_size as u32;
        let s = size as usize;
        let mut data = Vec::with_capacity(images.len() * 3 * s * s);
        for img in images {
            data.extend(self.preprocessing.apply(img, size));
        }
        Tensor::from_vec(data, (images.len(), 3, s, s), &self.device)
    }

    /// Image features [B, E] before normalisation, f32.
    pub fn encode_images_raw(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let pixels = pixels.to_device(&self.device)?.to_dtype(self.dtype)?;
        self.vision.forward(&pixels)?.to_dtype(DType::F32)
    }

    /// Image features [N, E] of RGB images before normalisation.
    pub fn encode_rgb_raw(&self, images: &[image::RgbImage]) -> candle_core::Result<Tensor> {
        self.encode_images_raw(&self.pixels(images)?)
    }

    /// L2-normalised embeddings [N, E] of RGB images (any size: each is
    /// resized and center-cropped like CLIP's preprocessing), in one batch.
    pub fn encode_rgb(&self, images: &[image::RgbImage]) -> candle_core::Result<Tensor> {
        self.encode_images(&self.pixels(images)?)
    }

    /// L2-normalised text embeddings of token ids [B, T]: [B, E].
    pub fn encode_token_ids(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let vocab = self.config.text.vocab_size as u32;
        if let Some(bad) = ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .find(|&i| i >= vocab)
        {
            candle_core::bail!(
                "token id {bad} is outside this model's vocabulary of {vocab} tokens"
            )
        }
        // The causal mask makes every position after a row's EOT irrelevant
        // to its feature: run only up to the last EOT of the batch (typically
        // 10-20 of the 77 positions, several times faster, same result).
        let ids = ids.to_dtype(DType::U32)?;
        let rows = ids.to_vec2::<u32>()?;
        let needed = rows.iter().map(|r| super::argmax(r) + 1).max().unwrap_or(1);
        let ids = ids.narrow(1, 0, needed.min(ids.dim(1)?))?;
        l2_normalize(&self.text.forward_ids(&ids)?.to_dtype(DType::F32)?)
    }

    /// L2-normalised text embeddings of strings: [B, E].
    pub fn encode_texts(
        &self,
        tokenizer: &ClipTokenizer,
        texts: &[&str],
    ) -> candle_core::Result<Tensor> {
        let ctx = self.config.text.context_length;
        let ids: Vec<u32> = texts
            .iter()
            .flat_map(|t| tokenizer.encode(t, ctx))
            .collect();
        let ids = Tensor::from_vec(ids, (texts.len(), ctx), &self.device)?;
        self.encode_token_ids(&ids)
    }
}
