//! Where on the face a descriptor (or a class) looks: maps on the ViT's
//! patch grid.
//!
//! - `fast`: the last block's input patch tokens taken through its value
//!   path only (no query-key mixing, as MaskCLIP does: `x + out_proj(v(ln1 x))`,
//!   then the MLP residual), `ln_post` and the projection, then the cosine with
//!   the descriptor's text feature, on the logit scale (/0.01). It reuses the
//!   forward pass's last-block input, so it costs a fraction of an encode.
//! - `gradcam`: gradient-weighted attention of the last block (the class
//!   token's row, heads averaged, negative contributions clipped), with
//!   respect to the target's logit (Chefer et al.'s Grad-CAM for ViTs).
//! - `occlusion`: grey out each cell of a coarse grid (the normalised value 0,
//!   i.e. CLIP's mean colour) and measure the logit drop; model-agnostic.
//!
//! A class target uses the class score: the mean of its 5 descriptor logits.

use candle_core::{Module, Tensor, Var, D};

use super::cliper::expressions::{DESCRIPTORS_PER_CLASS, TEMPERATURE};
use super::layers::l2_normalize;
use super::vision::VisionTower;

/// What a map explains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A descriptor, by global index 0..35.
    Descriptor(usize),
    /// A class, by index 0..7 (its 5 descriptors' mean logit).
    Class(usize),
}

impl Target {
    /// Weights over the 35 descriptor logits whose sum is the target's logit.
    fn weights(self, n: usize) -> Vec<f32> {
        let mut w = vec![0f32; n];
        match self {
            Target::Descriptor(i) => {
                if i < n {
                    w[i] = 1.0;
                }
            }
            Target::Class(c) => {
                for k in 0..DESCRIPTORS_PER_CLASS {
                    if let Some(x) = w.get_mut(c * DESCRIPTORS_PER_CLASS + k) {
                        *x = 1.0 / DESCRIPTORS_PER_CLASS as f32;
                    }
                }
            }
        }
        w
    }
}

/// The text feature [1, E] whose map is `target`'s under a bank of any
/// layout (a class: the mean of its descriptors' features; maps and logits
/// are linear in it), with the target that picks it: every map function
/// then gives the target's map. `text` is the bank's [D, E].
pub fn resolve(
    text: &Tensor,
    target: Target,
    layout: &crate::model::cliper::expressions::BankLayout,
) -> candle_core::Result<(Tensor, Target)> {
    let n = text.dim(0)?;
    let mut w = vec![0f32; n];
    match target {
        Target::Descriptor(i) if i < n => w[i] = 1.0,
        Target::Descriptor(i) => {
            candle_core::bail!("descriptor {i} is out of range: this bank has {n} descriptors")
        }
        Target::Class(c) => {
            let r = layout.range(c);
            if r.is_empty() || r.end > n {
                candle_core::bail!(
                    "class {c} is out of range: this bank has {} classes",
                    layout.num_classes()
                )
            }
            let k = r.len() as f32;
            for i in r {
                w[i] = 1.0 / k;
            }
        }
    }
    let w = Tensor::from_vec(w, (1, n), text.device())?.to_dtype(text.dtype())?;
    Ok((w.matmul(text)?, Target::Descriptor(0)))
}

/// How a map is computed (`--method`, `--map`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Method {
    /// The value path: every frame, no extra forward pass.
    #[default]
    Fast,
    /// Attention x gradient.
    #[value(name = "gradcam", alias = "grad-cam")]
    GradCam,
    /// Grey out grid cells, one forward pass each.
    Occlusion,
}

impl Method {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fast" => Some(Self::Fast),
            "gradcam" | "grad-cam" => Some(Self::GradCam),
            "occlusion" => Some(Self::Occlusion),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::GradCam => "gradcam",
            Self::Occlusion => "occlusion",
        }
    }
    /// For people: "fast", "Grad-CAM", "occlusion".
    pub fn label(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::GradCam => "Grad-CAM",
            Self::Occlusion => "occlusion",
        }
    }
    /// What a map's values are, for its colour scale.
    pub fn meaning(self) -> &'static str {
        match self {
            Self::Fast => "patch logit (cosine / 0.01) through the last block's value path",
            Self::GradCam => "gradient x attention of the last block, class token's row",
            Self::Occlusion => "logit drop when the cell is greyed out",
        }
    }
}

/// A map on a `rows x cols` grid, row-major, plus the target's logit on the
/// unmodified image.
#[derive(Clone, Debug)]
pub struct ExplainMap {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
    pub logit: f32,
}

impl ExplainMap {
    pub fn grid(&self) -> Vec<Vec<f32>> {
        self.values.chunks(self.cols).map(|r| r.to_vec()).collect()
    }
    pub fn argmax(&self) -> (usize, usize) {
        let i = crate::model::cliper::scoring::argmax(&self.values);
        (i / self.cols, i % self.cols)
    }
}

/// The target's logit from normalised image features [1, E] and text features [35, E].
fn target_logit(f: &Tensor, text: &Tensor, target: Target) -> candle_core::Result<Tensor> {
    let n = text.dim(0)?;
    let w = Tensor::from_vec(target.weights(n), (n, 1), f.device())?.to_dtype(f.dtype())?;
    let combined = text.t()?.matmul(&w)?; // [E, 1]
    f.matmul(&combined)? / TEMPERATURE as f64
}

/// Fast maps for all 35 descriptors at once: [35][g*g] on the logit scale,
/// from the last block's input [1, T, D] (see `VisionTower::forward_with`).
pub fn fast_maps(
    vision: &VisionTower,
    last_block_input: &Tensor,
    text: &Tensor,
) -> candle_core::Result<Vec<Vec<f32>>> {
    let patches = vision.patch_value_embeddings(last_block_input)?; // [1, P, E]
    let p = l2_normalize(&patches.squeeze(0)?)?; // [P, E]
    let maps = (text.to_dtype(p.dtype())?.matmul(&p.t()?)? / TEMPERATURE as f64)?; // [35, P]
    maps.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()
}

/// The fast maps of `target` for every image of a batch, from the batch's
/// last-block input [B, T, D] (as `VisionTower::forward_with` returns it):
/// what the live view draws every frame without another forward pass. The
/// weighted sum of descriptor maps is the map of the weighted text feature,
/// so one product per image covers a class as cheaply as a descriptor.
/// `logit` is left for the caller (it has the scores).
pub fn fast_target_maps(
    vision: &VisionTower,
    last_block_input: &Tensor,
    text: &Tensor,
    target: Target,
) -> candle_core::Result<Vec<ExplainMap>> {
    let n = text.dim(0)?;
    let w = Tensor::from_vec(target.weights(n), (1, n), text.device())?.to_dtype(text.dtype())?;
    let combined = w.matmul(text)?; // [1, E]
    let patches = vision.patch_value_embeddings(last_block_input)?; // [B, P, E]
    let (b, p, e) = patches.dims3()?;
    let unit = l2_normalize(&patches.reshape((b * p, e))?)?;
    let values = (combined.to_dtype(unit.dtype())?.matmul(&unit.t()?)? / TEMPERATURE as f64)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let g = vision.config.grid();
    Ok(values
        .chunks(p)
        .map(|v| ExplainMap {
            rows: g,
            cols: g,
            values: v.to_vec(),
            logit: f32::NAN,
        })
        .collect())
}

/// The fast map of `target` for image `i` of a batch (see `fast_target_maps`).
pub fn fast_target_map(
    vision: &VisionTower,
    last_block_input: &Tensor,
    i: usize,
    text: &Tensor,
    target: Target,
) -> candle_core::Result<ExplainMap> {
    let x = last_block_input.narrow(0, i, 1)?;
    fast_target_maps(vision, &x, text, target)?
        .pop()
        .ok_or_else(|| candle_core::Error::Msg("no map".into()))
}

/// The fast map of one target.
pub fn fast_map(
    vision: &VisionTower,
    pixels: &Tensor,
    text: &Tensor,
    target: Target,
) -> candle_core::Result<ExplainMap> {
    let (embedding, last) = forward_to_last_block(vision, pixels)?;
    let logit = first_f32(&target_logit(&l2_normalize(&embedding)?, text, target)?)?;
    let mut map = fast_target_map(vision, &last, 0, text, target)?;
    map.logit = logit;
    Ok(map)
}

/// The image embedding [B, E] and the last block's input [B, T, D].
fn forward_to_last_block(
    vision: &VisionTower,
    pixels: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let out = vision.forward_with(pixels, false, true)?;
    let last = out
        .last_block_input
        .ok_or_else(|| candle_core::Error::Msg("no last block input".into()))?;
    Ok((out.embedding, last))
}

/// The first element of `t` as f32, whatever its dtype.
fn first_f32(t: &Tensor) -> candle_core::Result<f32> {
    t.flatten_all()?
        .narrow(0, 0, 1)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()
        .map(|v| v[0])
}

/// Grad-CAM on the last block's attention. `pixels`: [1, 3, S, S].
pub fn gradcam_map(
    vision: &VisionTower,
    pixels: &Tensor,
    text: &Tensor,
    target: Target,
) -> candle_core::Result<ExplainMap> {
    let (_, x) = forward_to_last_block(vision, pixels)?;
    let Some(last) = vision.layers.last() else {
        candle_core::bail!("vision tower has no layers")
    };
    let (b, t, d) = x.dims3()?;
    let [q_proj, k_proj, v_proj, out_proj] = last.self_attn.projections();
    let heads = last.self_attn.heads();
    let hd = d / heads;
    let h = last.layer_norm1.forward(&x)?;
    let split = |y: Tensor| -> candle_core::Result<Tensor> {
        y.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()
    };
    let q = split((q_proj.forward(&h)? * (hd as f64).powf(-0.5))?)?;
    let k = split(k_proj.forward(&h)?)?;
    let v = split(v_proj.forward(&h)?)?;
    let probs = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?.contiguous()?)?; // [1, H, T, T]
                                                                                      // The attention as a leaf: its gradient is what Grad-CAM weighs.
    let a = Var::from_tensor(&probs)?;
    let o = a
        .as_tensor()
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, t, d))?;
    let x2 = (&x + out_proj.forward(&o)?)?;
    let x3 = (&x2 + last.mlp.forward(&last.layer_norm2.forward(&x2)?)?)?;
    let cls = x3.narrow(1, 0, 1)?.squeeze(1)?;
    let emb = vision
        .projection
        .forward(&vision.post_layernorm.forward(&cls)?)?;
    let f = l2_normalize(&emb)?;
    let logit_t = target_logit(&f, text, target)?.sum_all()?;
    let logit = first_f32(&logit_t)?;
    let grads = logit_t.backward()?;
    let g = grads
        .get(a.as_tensor())
        .ok_or_else(|| candle_core::Error::Msg("no attention gradient".into()))?;
    let cam = (g * a.as_tensor())?.relu()?.mean(1)?; // [1, T, T]
    let row = cam
        .squeeze(0)?
        .narrow(0, 0, 1)?
        .narrow(D::Minus1, 1, t - 1)?; // CLS -> patches
    let values = row
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let gsz = vision.config.grid();
    Ok(ExplainMap {
        rows: gsz,
        cols: gsz,
        values,
        logit,
    })
}

/// Occlusion sensitivity on a `grid x grid` partition of the input:
/// logit(original) - logit(cell greyed). The occluded copies run in batches.
pub fn occlusion_map(
    vision: &VisionTower,
    pixels: &Tensor,
    text: &Tensor,
    target: Target,
    grid: usize,
) -> candle_core::Result<ExplainMap> {
    occlusion_map_with(vision, pixels, text, target, grid, |_, _| true)?
        .ok_or_else(|| candle_core::Error::Msg("occlusion map cancelled".into()))
}

/// Cells occluded per forward batch: small enough that progress shows and a
/// cancellation lands within a second or two on a CPU.
const OCCLUSION_BATCH: usize = 8;

/// `occlusion_map` reporting its forward passes done (of `grid^2 + 1`) to
/// `progress` after each batch; returning false from it cancels (`None`).
pub fn occlusion_map_with(
    vision: &VisionTower,
    pixels: &Tensor,
    text: &Tensor,
    target: Target,
    grid: usize,
    mut progress: impl FnMut(usize, usize) -> bool,
) -> candle_core::Result<Option<ExplainMap>> {
    let (_, c, s, _) = pixels.dims4()?;
    let grid = grid.clamp(1, s);
    let total = grid * grid + 1;
    let base = l2_normalize(&vision.forward(pixels)?)?;
    let logit = first_f32(&target_logit(&base, text, target)?)?;
    if !progress(1, total) {
        return Ok(None);
    }
    let data = pixels
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let edges: Vec<usize> = (0..=grid).map(|i| i * s / grid).collect();
    let mut values = Vec::with_capacity(grid * grid);
    let cells: Vec<(usize, usize)> = (0..grid)
        .flat_map(|r| (0..grid).map(move |cc| (r, cc)))
        .collect();
    for chunk in cells.chunks(OCCLUSION_BATCH) {
        let mut batch = Vec::with_capacity(chunk.len() * data.len());
        for &(r, cc) in chunk {
            let mut img = data.clone();
            for ch in 0..c {
                for y in edges[r]..edges[r + 1] {
                    img[(ch * s + y) * s + edges[cc]..(ch * s + y) * s + edges[cc + 1]].fill(0.0);
                }
            }
            batch.extend(img);
        }
        let px = Tensor::from_vec(batch, (chunk.len(), c, s, s), pixels.device())?
            .to_dtype(pixels.dtype())?;
        let f = l2_normalize(&vision.forward(&px)?)?;
        let l = target_logit(&f, text, target)?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        values.extend(l.into_iter().map(|v| logit - v));
        if !progress(values.len() + 1, total) {
            return Ok(None);
        }
    }
    Ok(Some(ExplainMap {
        rows: grid,
        cols: grid,
        values,
        logit,
    }))
}

/// Bilinear upsampling of a map to `w x h` (cell centres at cell centres).
pub fn upsample(map: &ExplainMap, w: u32, h: u32) -> Vec<f32> {
    let mut out = Vec::with_capacity((w * h) as usize);
    let at = |r: usize, c: usize| map.values[r * map.cols + c];
    for y in 0..h {
        let fy =
            ((y as f32 + 0.5) / h as f32 * map.rows as f32 - 0.5).clamp(0.0, (map.rows - 1) as f32);
        let (r0, ty) = (fy.floor() as usize, fy.fract());
        let r1 = (r0 + 1).min(map.rows - 1);
        for x in 0..w {
            let fx = ((x as f32 + 0.5) / w as f32 * map.cols as f32 - 0.5)
                .clamp(0.0, (map.cols - 1) as f32);
            let (c0, tx) = (fx.floor() as usize, fx.fract());
            let c1 = (c0 + 1).min(map.cols - 1);
            let top = at(r0, c0) * (1.0 - tx) + at(r0, c1) * tx;
            let bot = at(r1, c0) * (1.0 - tx) + at(r1, c1) * tx;
            out.push(top * (1.0 - ty) + bot * ty);
        }
    }
    out
}

/// A perceptual blue-to-yellow colour scale (viridis-like), t in [0, 1].
pub fn colormap(t: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] = [
        [68.0, 1.0, 84.0],
        [59.0, 82.0, 139.0],
        [33.0, 145.0, 140.0],
        [94.0, 201.0, 98.0],
        [253.0, 231.0, 37.0],
    ];
    let t = t.clamp(0.0, 1.0) * 4.0;
    let i = (t.floor() as usize).min(3);
    let f = t - i as f32;
    let a = STOPS[i];
    let b = STOPS[i + 1];
    [0, 1, 2].map(|k| (a[k] + (b[k] - a[k]) * f).round() as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsample_keeps_constant_maps_and_corners() {
        let m = ExplainMap {
            rows: 2,
            cols: 2,
            values: vec![0.0, 1.0, 2.0, 3.0],
            logit: 0.0,
        };
        let up = upsample(&m, 4, 4);
        assert_eq!(up[0], 0.0);
        assert_eq!(up[15], 3.0);
        assert_eq!(m.argmax(), (1, 1));
        let c = ExplainMap {
            rows: 3,
            cols: 3,
            values: vec![5.0; 9],
            logit: 0.0,
        };
        assert!(upsample(&c, 7, 5).iter().all(|v| (*v - 5.0).abs() < 1e-6));
        assert_eq!(colormap(0.0), [68, 1, 84]);
        assert_eq!(colormap(1.0), [253, 231, 37]);
    }

    #[test]
    fn resolved_class_targets_follow_the_layout() {
        use crate::model::cliper::expressions::BankLayout;
        let text =
            Tensor::new(&[[1f32, 0.], [0., 1.], [3., 3.]], &candle_core::Device::Cpu).unwrap();
        let layout = BankLayout::new(&[("happy", 2), ("sad", 1)]).unwrap();
        let (t, target) = resolve(&text, Target::Class(0), &layout).unwrap();
        assert_eq!(target, Target::Descriptor(0));
        assert_eq!(t.to_vec2::<f32>().unwrap(), vec![vec![0.5, 0.5]]);
        let (t, _) = resolve(&text, Target::Class(1), &layout).unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap(), vec![vec![3.0, 3.0]]);
        assert!(resolve(&text, Target::Class(2), &layout).is_err());
        assert!(resolve(&text, Target::Descriptor(3), &layout).is_err());
    }

    #[test]
    fn class_target_weights_average_five() {
        let w = Target::Class(1).weights(35);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(w[5], 0.2);
        assert_eq!(Target::Descriptor(34).weights(35)[34], 1.0);
    }
}
