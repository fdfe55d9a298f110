//! Transformer building blocks shared by both CLIP towers.
//!
//! Unlike candle-transformers' CLIP, every block here has a differentiable
//! path: when an input (or a weight) is part of an autograd graph, LayerNorm
//! and softmax switch from Candle's fused kernels (which have no backward) to
//! compositions of basic ops. Inference keeps the fast kernels.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::config::{Activation, EncoderShape};

/// Whether `t` takes part in a gradient computation.
fn tracks(t: &Tensor) -> bool {
    t.track_op()
}

#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Scale, shift and epsilon (for kernels that run outside Candle).
    pub fn parts(&self) -> (&Tensor, &Tensor, f64) {
        (&self.weight, &self.bias, self.eps)
    }

    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if tracks(x) || tracks(&self.weight) || tracks(&self.bias) {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)
        } else {
            // The fused kernel needs contiguous rows (a class token sliced
            // out of a batch is strided).
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// Softmax over the last dimension, differentiable when it needs to be.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if tracks(x) {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb)
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb)
}

pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
    }
}

/// Multi-head self-attention with separate q/k/v projections (HF layout; the
/// OpenAI `in_proj` is split when the weights are loaded).
#[derive(Clone, Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    pub fn new(width: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        if heads == 0 || !width.is_multiple_of(heads) {
            candle_core::bail!("attention width {width} is not divisible by {heads} heads")
        }
        let head_dim = width / heads;
        Ok(Self {
            q_proj: linear(width, width, vb.pp("q_proj"))?,
            k_proj: linear(width, width, vb.pp("k_proj"))?,
            v_proj: linear(width, width, vb.pp("v_proj"))?,
            out_proj: linear(width, width, vb.pp("out_proj"))?,
            heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// The q, k, v and output projections, in that order.
    pub fn projections(&self) -> [&Linear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.out_proj]
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    /// `x`: [B, T, D]; `mask`: additive [T, T] (causal text mask) or none.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q_proj.forward(x)? * self.scale)?)?; // [B, H, T, hd]
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let mut attn = q.matmul(&k.t()?)?; // [B, H, T, T]
        if let Some(mask) = mask {
            attn = attn.broadcast_add(mask)?;
        }
        let attn = softmax_last_dim(&attn)?;
        let out = attn.matmul(&v)?; // [B, H, T, hd]
        let out = out.transpose(1, 2)?.reshape((b, t, d))?;
        self.out_proj.forward(&out)
    }

    /// The value path alone (`out_proj(v_proj(x))`), used by attention-free
    /// patch readouts (MaskCLIP-style maps).
    pub fn value_path(&self, x: &Tensor) -> Result<Tensor> {
        self.out_proj.forward(&self.v_proj.forward(x)?)
    }
}

#[derive(Clone, Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    pub fn new(width: usize, hidden: usize, act: Activation, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(width, hidden, vb.pp("fc1"))?,
            fc2: linear(hidden, width, vb.pp("fc2"))?,
            act,
        })
    }
}

impl Mlp {
    /// `fc1`, `fc2` and the activation between them.
    pub fn parts(&self) -> (&Linear, &Linear, Activation) {
        (&self.fc1, &self.fc2, self.act)
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = activate(&self.fc1.forward(x)?, self.act)?;
        self.fc2.forward(&h)
    }
}

/// A pre-LN residual block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Clone, Debug)]
pub struct EncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: Attention,
    pub layer_norm2: LayerNorm,
    pub mlp: Mlp,
}

impl EncoderLayer {
    pub fn new(shape: &EncoderShape, vb: VarBuilder) -> Result<Self> {
        let (width, eps) = (shape.width, shape.layer_norm_eps);
        Ok(Self {
            layer_norm1: LayerNorm::new(width, eps, vb.pp("layer_norm1"))?,
            self_attn: Attention::new(width, shape.heads, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::new(width, eps, vb.pp("layer_norm2"))?,
            mlp: Mlp::new(width, shape.mlp, shape.activation, vb.pp("mlp"))?,
        })
    }

    /// The tower's layers, `vb.pp("layers.{i}")` each (a tower's `encoder`).
    pub fn stack(shape: &EncoderShape, vb: VarBuilder) -> Result<Vec<Self>> {
        (0..shape.layers)
            .map(|i| Self::new(shape, vb.pp(format!("layers.{i}"))))
            .collect()
    }

    /// The block's linear layers: q, k, v, out, fc1, fc2.
    pub fn linears_mut(&mut self) -> [&mut Linear; 6] {
        let a = &mut self.self_attn;
        let m = &mut self.mlp;
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.out_proj,
            &mut m.fc1,
            &mut m.fc2,
        ]
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&x)?)?;
        x + h
    }
}

/// The causal mask of the text tower: 0 on and below the diagonal, -inf above.
pub fn causal_mask(t: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, t), device)
}

/// Row-wise L2 normalisation of [N, D].
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    x.broadcast_div(&norm)
}

/// Converts an f32 [N, D] tensor to rows of `Vec<f32>`.
pub fn rows(x: &Tensor) -> Result<Vec<Vec<f32>>> {
    x.to_dtype(DType::F32)?.to_vec2::<f32>()
}
