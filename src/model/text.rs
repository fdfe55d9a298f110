//! CLIP's text tower: token + position embeddings, causal pre-LN
//! transformer, `final_layer_norm`, the feature at the EOT position, and the
//! projection to the joint space.
//!
//! It takes token ids or ready-made token embeddings: CLIPER's learned
//! descriptors replace some token embeddings of a prompt, and training them
//! needs gradients through the whole tower (see `model::layers`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::config::TextConfig;
use super::layers::{causal_mask, linear_no_bias, EncoderLayer, LayerNorm};

#[derive(Clone, Debug)]
pub struct TextTower {
    token_embedding: Embedding,
    position_embedding: Tensor, // [context, D]
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    projection: Linear,
    pub config: TextConfig,
}

impl TextTower {
    /// `vb` at the checkpoint root (it reaches `text_model.*` and
    /// `text_projection`).
    pub fn new(cfg: &TextConfig, embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(cfg.vocab_size, cfg.width, emb.pp("token_embedding"))?;
        let position_embedding =
            emb.get((cfg.context_length, cfg.width), "position_embedding.weight")?;
        let layers = EncoderLayer::stack(&cfg.encoder, tm.pp("encoder"))?;
        let final_layer_norm =
            LayerNorm::new(cfg.width, cfg.layer_norm_eps, tm.pp("final_layer_norm"))?;
        let projection = linear_no_bias(cfg.width, embed_dim, vb.pp("text_projection"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            projection,
            config: cfg.clone(),
        })
    }

    /// The token-embedding matrix [vocab, D] (for nearest-word readings).
    pub fn token_embedding_matrix(&self) -> &Tensor {
        self.token_embedding.embeddings()
    }

    /// Token embeddings of `ids` [B, T] (u32): [B, T, D].
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        self.token_embedding.forward(ids)
    }

    /// Text features from token ids [B, T] (T <= context length): [B, E].
    /// The EOT feature is taken at the argmax of each row's ids.
    pub fn forward_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.to_dtype(DType::U32)?;
        let rows = ids.to_vec2::<u32>()?;
        let eot: Vec<usize> = rows.iter().map(|r| super::argmax(r)).collect();
        let embeds = self.embed_tokens(&ids)?;
        self.forward_embeds(&embeds, &eot)
    }

    /// Text features from token embeddings [B, T, D] (without positions),
    /// reading the feature at `eot_positions[b]`: [B, E]. Differentiable in
    /// `embeds`.
    pub fn forward_embeds(&self, embeds: &Tensor, eot_positions: &[usize]) -> Result<Tensor> {
        let (b, t, d) = embeds.dims3()?;
        if t > self.config.context_length {
            candle_core::bail!(
                "text of {t} tokens is longer than the context length {}",
                self.config.context_length
            )
        }
        if eot_positions.len() != b || eot_positions.iter().any(|&p| p >= t) {
            candle_core::bail!("EOT positions {eot_positions:?} do not fit a batch of {b} x {t}")
        }
        let pos = self.position_embedding.narrow(0, 0, t)?;
        let mut x = embeds.broadcast_add(&pos.unsqueeze(0)?)?;
        let mask = causal_mask(t, x.device())?.to_dtype(x.dtype())?;
        for layer in &self.layers {
            x = layer.forward(&x, Some(&mask))?;
        }
        let x = self.final_layer_norm.forward(&x)?;
        let index: Vec<u32> = eot_positions
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * t + p) as u32)
            .collect();
        let index = Tensor::from_vec(index, b, x.device())?;
        let pooled = x.reshape((b * t, d))?.index_select(&index, 0)?; // [B, D]
        self.projection.forward(&pooled)
    }
}
