//! The temporal module of CLIPER's dynamic branch (`docs/model.md`
//! section 6), after DFER-CLIP's `Temporal_Transformer_Cls`: a learnable CLS
//! token and positional embeddings (frames + 1 positions) over per-frame CLIP
//! image embeddings, pre-LayerNorm transformer blocks (multi-head attention
//! with a bias-free fused qkv projection; MLP with GELU), and the CLS
//! output. No final LayerNorm: the output is normalised and scored against
//! the descriptor features like a static image feature.
//!
//! Two flavours share the structure ([`TemporalFlavour`]): modules trained
//! here (CLIPER's dynamic branch) take normalised frame embeddings and use
//! exact GELU; DFER-CLIP's own (`models/Temporal_Model.py`) take the image
//! encoder's raw, unnormalised output and define GELU as the tanh
//! approximation. A checkpoint in DFER-CLIP's naming is DFER-CLIP's flavour.
//!
//! Tensor names (in a CLIPER checkpoint, all under `temporal.`):
//! - `temporal.cls_token` [1, 1, D], `temporal.pos_embedding` [1, F + 1, D]
//! - `temporal.layers.N.norm1.{weight,bias}` [D]
//! - `temporal.layers.N.attn.to_qkv.weight` [3 I, D] (no bias; I = heads x 64 in DFER-CLIP)
//! - `temporal.layers.N.attn.to_out.{weight [D, I], bias [D]}`
//! - `temporal.layers.N.norm2.{weight,bias}` [D]
//! - `temporal.layers.N.mlp.fc1.{weight [M, D], bias [M]}`, `temporal.layers.N.mlp.fc2.{weight [D, M], bias [D]}`
//!
//! Checkpoints in DFER-CLIP's own naming (`temporal_net.temporal_transformer.layers.N.0.fn.to_qkv.weight`, ...)
//! are renamed on load. The number of heads is the checkpoint metadata
//! `temporal_heads` when present, otherwise I / 64 (DFER-CLIP's head width).

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::layers::{softmax_last_dim, LayerNorm};
use super::rng::SplitMix64;

/// Frames per window / clip.
pub const DEFAULT_FRAMES: usize = 16;

/// What a temporal module was trained on (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemporalFlavour {
    /// Trained here: normalised frame embeddings in, exact GELU.
    Cliper,
    /// DFER-CLIP's: raw image-encoder features in, tanh GELU.
    DferClip,
}

impl TemporalFlavour {
    /// Whether the frame features it takes are L2-normalised.
    pub fn normalised_input(self) -> bool {
        self == TemporalFlavour::Cliper
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TemporalConfig {
    pub flavour: TemporalFlavour,
    pub width: usize,
    pub frames: usize,
    pub layers: usize,
    pub heads: usize,
    /// Width of the attention's inner space (heads x head width).
    pub inner: usize,
    pub mlp: usize,
}

impl TemporalConfig {
    /// CLIPER / DFER-CLIP: 16 frames, 1 layer, 8 heads of 64, MLP 1024.
    pub fn cliper(width: usize) -> Self {
        Self {
            flavour: TemporalFlavour::Cliper,
            width,
            frames: DEFAULT_FRAMES,
            layers: 1,
            heads: 8,
            inner: 512,
            mlp: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemporalError {
    #[error("temporal weights: tensor `{0}` is missing")]
    Missing(String),
    #[error("temporal weights: `{name}` has shape {found:?}, expected {expected}")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: String,
    },
    #[error("temporal weights: {0}")]
    Candle(#[from] candle_core::Error),
}

struct Block {
    norm1: LayerNorm,
    to_qkv: Linear,
    to_out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    head_dim: usize,
    flavour: TemporalFlavour,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let h = self.norm1.forward(x)?;
        let qkv = self.to_qkv.forward(&h)?; // [B, T, 3I]
        let inner = self.heads * self.head_dim;
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * inner, inner)?
                .reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let attn = (q.matmul(&k.t()?)? * (self.head_dim as f64).powf(-0.5))?;
        let attn = softmax_last_dim(&attn)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, t, inner))?;
        let x = (x + self.to_out.forward(&out)?)?;
        let h = self.fc1.forward(&self.norm2.forward(&x)?)?;
        let h = match self.flavour {
            TemporalFlavour::Cliper => h.gelu_erf()?,
            // candle's `gelu` is the tanh approximation, DFER-CLIP's formula.
            TemporalFlavour::DferClip => h.gelu()?,
        };
        x + self.fc2.forward(&h)?
    }
}

pub struct TemporalModule {
    cls_token: Tensor,     // [1, 1, D]
    pos_embedding: Tensor, // [1, F + 1, D]
    blocks: Vec<Block>,
    pub config: TemporalConfig,
}

impl std::fmt::Debug for TemporalModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemporalModule")
            .field("config", &self.config)
            .finish()
    }
}

/// Renames DFER-CLIP tensor names to ours (others pass through).
pub fn rename_dfer_clip(name: &str) -> String {
    let Some(rest) = name
        .strip_prefix("temporal_net.")
        .or_else(|| name.strip_prefix("module.temporal_net."))
    else {
        return name.to_string();
    };
    if let Some(r) = rest.strip_prefix("temporal_transformer.layers.") {
        let mut parts = r.splitn(3, '.');
        let (Some(n), Some(which), Some(tail)) = (parts.next(), parts.next(), parts.next()) else {
            return name.to_string();
        };
        // DFER-CLIP's blocks are `Residual(PreNorm(dim, module))`: the
        // norm is `fn.norm`, the module `fn.fn` (an early fixture of ours
        // wrote them one `fn.` short; both read).
        let tail = tail
            .strip_prefix("fn.")
            .filter(|t| t.starts_with("norm.") || t.starts_with("fn."))
            .unwrap_or(tail);
        let mapped = match (which, tail) {
            ("0", t) if t.starts_with("norm.") => t.replacen("norm.", "norm1.", 1),
            ("0", "fn.to_qkv.weight") => "attn.to_qkv.weight".into(),
            ("0", t) if t.starts_with("fn.to_out.0.") => {
                t.replacen("fn.to_out.0.", "attn.to_out.", 1)
            }
            ("1", t) if t.starts_with("norm.") => t.replacen("norm.", "norm2.", 1),
            ("1", t) if t.starts_with("fn.net.0.") => t.replacen("fn.net.0.", "mlp.fc1.", 1),
            ("1", t) if t.starts_with("fn.net.3.") => t.replacen("fn.net.3.", "mlp.fc2.", 1),
            _ => return name.to_string(),
        };
        return format!("temporal.layers.{n}.{mapped}");
    }
    format!("temporal.{rest}")
}

fn get<'a>(
    t: &'a HashMap<String, Tensor>,
    name: &str,
) -> std::result::Result<&'a Tensor, TemporalError> {
    t.get(name)
        .ok_or_else(|| TemporalError::Missing(name.to_string()))
}

impl TemporalModule {
    /// Reads the configuration from tensor shapes; `heads` from metadata if known.
    pub fn infer_config(
        tensors: &HashMap<String, Tensor>,
        heads: Option<usize>,
    ) -> std::result::Result<TemporalConfig, TemporalError> {
        let pos = get(tensors, "temporal.pos_embedding")?.dims().to_vec();
        if pos.len() != 3 || pos[0] != 1 || pos[1] < 2 {
            return Err(TemporalError::Shape {
                name: "temporal.pos_embedding".into(),
                found: pos,
                expected: "[1, frames + 1, width]".into(),
            });
        }
        let width = pos[2];
        let layers = tensors
            .keys()
            .filter_map(|k| {
                k.strip_prefix("temporal.layers.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map(|m| m + 1)
            .unwrap_or(0);
        let qkv = get(tensors, "temporal.layers.0.attn.to_qkv.weight")?
            .dims()
            .to_vec();
        let inner = qkv.first().copied().unwrap_or(0) / 3;
        let mlp = get(tensors, "temporal.layers.0.mlp.fc1.weight")?
            .dims()
            .first()
            .copied()
            .unwrap_or(0);
        let heads = heads.unwrap_or(if inner % 64 == 0 && inner >= 64 {
            inner / 64
        } else {
            1
        });
        if heads == 0 || inner % heads != 0 {
            return Err(TemporalError::Shape {
                name: "temporal.layers.0.attn.to_qkv.weight".into(),
                found: qkv,
                expected: format!("3 x (a multiple of {heads} heads) rows"),
            });
        }
        Ok(TemporalConfig {
            flavour: TemporalFlavour::Cliper,
            width,
            frames: pos[1] - 1,
            layers,
            heads,
            inner,
            mlp,
        })
    }

    pub fn new(cfg: &TemporalConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("temporal");
        let d = cfg.width;
        let cls_token = vb.get((1, 1, d), "cls_token")?;
        let pos_embedding = vb.get((1, cfg.frames + 1, d), "pos_embedding")?;
        let blocks = (0..cfg.layers)
            .map(|i| {
                let l = vb.pp(format!("layers.{i}"));
                Ok(Block {
                    norm1: LayerNorm::new(d, 1e-5, l.pp("norm1"))?,
                    to_qkv: candle_nn::linear_no_bias(d, 3 * cfg.inner, l.pp("attn.to_qkv"))?,
                    to_out: candle_nn::linear(cfg.inner, d, l.pp("attn.to_out"))?,
                    norm2: LayerNorm::new(d, 1e-5, l.pp("norm2"))?,
                    fc1: candle_nn::linear(d, cfg.mlp, l.pp("mlp.fc1"))?,
                    fc2: candle_nn::linear(cfg.mlp, d, l.pp("mlp.fc2"))?,
                    heads: cfg.heads,
                    head_dim: cfg.inner / cfg.heads,
                    flavour: cfg.flavour,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cls_token,
            pos_embedding,
            blocks,
            config: cfg.clone(),
        })
    }

    /// Loads from checkpoint tensors (`temporal.*`, or DFER-CLIP naming),
    /// checking that the width matches the CLIP embedding width.
    pub fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        heads: Option<usize>,
        embed_dim: usize,
        device: &Device,
    ) -> std::result::Result<Self, TemporalError> {
        let renamed: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, v)| {
                Ok((
                    rename_dfer_clip(k),
                    v.to_dtype(DType::F32)?.to_device(device)?,
                ))
            })
            .collect::<Result<_>>()?;
        let mut cfg = Self::infer_config(&renamed, heads)?;
        if tensors
            .keys()
            .any(|k| k.starts_with("temporal_net.") || k.starts_with("module.temporal_net."))
        {
            cfg.flavour = TemporalFlavour::DferClip;
        }
        if cfg.width != embed_dim {
            return Err(TemporalError::Shape {
                name: "temporal.pos_embedding".into(),
                found: vec![1, cfg.frames + 1, cfg.width],
                expected: format!("width {embed_dim}, the CLIP embedding width of these weights"),
            });
        }
        let vb = VarBuilder::from_tensors(renamed, DType::F32, device);
        Ok(Self::new(&cfg, vb)?)
    }

    /// Freshly initialised tensors (training from scratch): positions and
    /// CLS with std 0.02, linear layers like PyTorch's default
    /// (uniform +-1/sqrt(fan_in)), unit LayerNorms.
    pub fn init_tensors(cfg: &TemporalConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
        let dev = Device::Cpu;
        let mut rng = SplitMix64::new(seed);
        let mut out = HashMap::new();
        let normal = |shape: &[usize], std: f32, rng: &mut SplitMix64| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            Tensor::from_vec(
                (0..n).map(|_| std * rng.normal()).collect::<Vec<f32>>(),
                shape,
                &dev,
            )
        };
        out.insert(
            "temporal.cls_token".into(),
            normal(&[1, 1, cfg.width], 0.02, &mut rng)?,
        );
        out.insert(
            "temporal.pos_embedding".into(),
            normal(&[1, cfg.frames + 1, cfg.width], 0.02, &mut rng)?,
        );
        let uniform = |shape: &[usize], fan_in: usize, rng: &mut SplitMix64| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            let b = 1.0 / (fan_in as f32).sqrt();
            Tensor::from_vec(
                (0..n).map(|_| rng.range(-b, b)).collect::<Vec<f32>>(),
                shape,
                &dev,
            )
        };
        let d = cfg.width;
        for i in 0..cfg.layers {
            let p = format!("temporal.layers.{i}");
            for ln in ["norm1", "norm2"] {
                out.insert(
                    format!("{p}.{ln}.weight"),
                    Tensor::ones(d, DType::F32, &dev)?,
                );
                out.insert(
                    format!("{p}.{ln}.bias"),
                    Tensor::zeros(d, DType::F32, &dev)?,
                );
            }
            // (name, shape, fan-in), PyTorch's default uniform bounds.
            let linears: [(&str, &[usize], usize); 6] = [
                ("attn.to_qkv.weight", &[3 * cfg.inner, d], d),
                ("attn.to_out.weight", &[d, cfg.inner], cfg.inner),
                ("attn.to_out.bias", &[d], cfg.inner),
                ("mlp.fc1.weight", &[cfg.mlp, d], d),
                ("mlp.fc1.bias", &[cfg.mlp], d),
                ("mlp.fc2.weight", &[d, cfg.mlp], cfg.mlp),
            ];
            for (name, shape, fan_in) in linears {
                out.insert(format!("{p}.{name}"), uniform(shape, fan_in, &mut rng)?);
            }
            out.insert(
                format!("{p}.mlp.fc2.bias"),
                uniform(&[d], cfg.mlp, &mut rng)?,
            );
        }
        Ok(out)
    }

    /// Per-frame embeddings [B, F, D] -> clip feature [B, D] (not normalised).
    pub fn forward(&self, frames: &Tensor) -> Result<Tensor> {
        let (b, f, d) = frames.dims3()?;
        if f > self.config.frames || d != self.config.width {
            candle_core::bail!(
                "temporal module takes up to {} frames of width {}, got [{b}, {f}, {d}]",
                self.config.frames,
                self.config.width
            )
        }
        let frames = frames.to_dtype(self.cls_token.dtype())?;
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &frames], 1)?;
        let mut x = x.broadcast_add(&self.pos_embedding.narrow(1, 0, f + 1)?)?;
        for blk in &self.blocks {
            x = blk.forward(&x)?;
        }
        x.narrow(1, 0, 1)?.squeeze(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dfer_clip_names() {
        // As DFER-CLIP's `Residual(PreNorm(...))` names them.
        for (theirs, ours) in [
            (
                "temporal_net.temporal_transformer.layers.0.0.fn.norm.weight",
                "temporal.layers.0.norm1.weight",
            ),
            (
                "temporal_net.temporal_transformer.layers.1.0.fn.fn.to_qkv.weight",
                "temporal.layers.1.attn.to_qkv.weight",
            ),
            (
                "temporal_net.temporal_transformer.layers.0.0.fn.fn.to_out.0.bias",
                "temporal.layers.0.attn.to_out.bias",
            ),
            (
                "temporal_net.temporal_transformer.layers.0.1.fn.norm.bias",
                "temporal.layers.0.norm2.bias",
            ),
            (
                "temporal_net.temporal_transformer.layers.0.1.fn.fn.net.0.weight",
                "temporal.layers.0.mlp.fc1.weight",
            ),
            (
                "temporal_net.temporal_transformer.layers.0.1.fn.fn.net.3.bias",
                "temporal.layers.0.mlp.fc2.bias",
            ),
        ] {
            assert_eq!(rename_dfer_clip(theirs), ours);
        }
        assert_eq!(
            rename_dfer_clip("temporal_net.temporal_transformer.layers.0.0.fn.to_qkv.weight"),
            "temporal.layers.0.attn.to_qkv.weight"
        );
        assert_eq!(
            rename_dfer_clip("temporal_net.temporal_transformer.layers.0.1.fn.net.3.bias"),
            "temporal.layers.0.mlp.fc2.bias"
        );
        assert_eq!(
            rename_dfer_clip("temporal_net.cls_token"),
            "temporal.cls_token"
        );
        assert_eq!(rename_dfer_clip("temporal.cls_token"), "temporal.cls_token");
    }

    #[test]
    fn init_builds_and_runs() {
        let cfg = TemporalConfig {
            flavour: TemporalFlavour::Cliper,
            width: 24,
            frames: 16,
            layers: 1,
            heads: 2,
            inner: 24,
            mlp: 32,
        };
        let t = TemporalModule::init_tensors(&cfg, 1).unwrap();
        let m = TemporalModule::from_tensors(&t, Some(2), 24, &Device::Cpu).unwrap();
        assert_eq!(m.config, cfg);
        let x = Tensor::zeros((3, 16, 24), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.forward(&x).unwrap().dims(), &[3, 24]);
        let e = TemporalModule::from_tensors(&t, Some(2), 512, &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("512"));
    }
}
