//! CLIP architecture description: the sizes of both towers.
//!
//! A `ClipConfig` is normally read from the checkpoint itself (tensor shapes,
//! plus an HF `config.json` when one sits beside the weights, see
//! `model::weights`); `vit_b16()` is the preset used for `--random` builds and
//! as documentation of the real model.

use serde::{Deserialize, Serialize};

/// Activation inside the transformer MLPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`: what OpenAI's CLIP was trained with.
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
    /// Tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    /// Parses HF's `hidden_act` strings.
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub image_size: usize,
    pub patch_size: usize,
    /// Its encoder's dimensions, read as `vision.width` and so on.
    #[serde(flatten)]
    pub encoder: EncoderShape,
}

impl VisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Tokens per image: the patch grid plus the class token.
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub context_length: usize,
    /// Its encoder's dimensions, read as `text.width` and so on.
    #[serde(flatten)]
    pub encoder: EncoderShape,
}

/// The transformer encoder's dimensions, the same in both towers' configs
/// (as in Hugging Face's `CLIPVisionConfig` and `CLIPTextConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncoderShape {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

/// A tower's config reads as its encoder's shape (`vision.width`), the
/// fields it adds beside.
macro_rules! deref_to_encoder {
    ($($config:ty),*) => {$(
        impl std::ops::Deref for $config {
            type Target = EncoderShape;
            fn deref(&self) -> &EncoderShape {
                &self.encoder
            }
        }
        impl std::ops::DerefMut for $config {
            fn deref_mut(&mut self) -> &mut EncoderShape {
                &mut self.encoder
            }
        }
    )*};
}
deref_to_encoder!(VisionConfig, TextConfig);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    /// Width of the joint image-text embedding space.
    pub embed_dim: usize,
}

impl ClipConfig {
    /// OpenAI's CLIP ViT-B/16 (`openai/clip-vit-base-patch16`).
    pub fn vit_b16() -> Self {
        Self {
            vision: VisionConfig {
                image_size: 224,
                patch_size: 16,
                encoder: EncoderShape {
                    width: 768,
                    layers: 12,
                    heads: 12,
                    mlp: 3072,
                    layer_norm_eps: 1e-5,
                    activation: Activation::QuickGelu,
                },
            },
            text: TextConfig {
                vocab_size: 49408,
                context_length: 77,
                encoder: EncoderShape {
                    width: 512,
                    layers: 12,
                    heads: 8,
                    mlp: 2048,
                    layer_norm_eps: 1e-5,
                    activation: Activation::QuickGelu,
                },
            },
            embed_dim: 512,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_b16_has_197_tokens() {
        let c = ClipConfig::vit_b16();
        assert_eq!(c.vision.grid(), 14);
        assert_eq!(c.vision.tokens(), 197);
    }

    #[test]
    fn hf_activation_names() {
        assert_eq!(
            Activation::from_hf("quick_gelu"),
            Some(Activation::QuickGelu)
        );
        assert_eq!(Activation::from_hf("gelu"), Some(Activation::Gelu));
        assert_eq!(Activation::from_hf("relu"), None);
    }
}
