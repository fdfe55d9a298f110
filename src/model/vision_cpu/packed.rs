//! The packed block layers of the fused forward: this crate's 8-bit and
//! f32 kernels' panels, or oneDNN's reordered weights, chosen at load.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Result};
use candle_nn::Linear;

use super::super::gemm_f32::PackedF32;
use super::super::gemm_i8::{Isa, PackedWeights};
use super::super::onednn;
use super::super::vision::VisionTower;
use super::attention::AttentionKernel;
use super::LinearView;

/// One packed linear layer: this crate's 8-bit kernel (on the instruction
/// set chosen at load) where the CPU and the shape allow, Candle's Q8_0
/// matmul otherwise; or a oneDNN product (bf16 or f32).
pub(super) enum QuantizedLinear {
    Int8(PackedWeights, Isa),
    OneDnn(onednn::Linear),
    /// f32 in this crate's panels (AVX2 + FMA).
    F32(PackedF32),
    Candle(QMatMul),
    /// Too narrow for 8-bit blocks (inputs not a multiple of 32): kept f32.
    Full,
}

/// Packed weights of the transformer's linear layers (q, k, v, out, fc1,
/// fc2 of each block): 8-bit for `--precision q8`, oneDNN's layout for
/// `--precision bf16`, and for f32 oneDNN's layout or this crate's AVX2
/// panels ([`PackedF32`]). LayerNorms, attention, the
/// patch embedding and the final projection stay f32.
pub struct QuantizedLinears {
    pub(super) layers: Vec<BlockLinears<QuantizedLinear>>,
    packing: Packing,
    /// The products attention runs beside these layers.
    pub(super) attention: AttentionKernel,
}

/// What the layers of a [`QuantizedLinears`] were packed for.
#[derive(Clone, Copy, Debug)]
enum Packing {
    /// This crate's 8-bit kernel on an instruction set, `None` when this
    /// CPU has none it runs (then every layer is Candle's Q8_0).
    Int8(Option<Isa>),
    /// oneDNN's products in this type.
    OneDnn(onednn::DataType),
    /// This crate's f32 kernel ([`PackedF32`]).
    F32,
}

/// A transformer block's six linear layers.
pub(super) struct BlockLinears<T> {
    pub(super) q: T,
    pub(super) k: T,
    pub(super) v: T,
    pub(super) out: T,
    pub(super) fc1: T,
    pub(super) fc2: T,
}

impl Packing {
    /// The attention beside these layers: f32 for f32 products, for the
    /// reduced precisions [`AttentionKernel::for_reduced`].
    fn attention(self) -> Result<AttentionKernel> {
        match self {
            Packing::F32 | Packing::OneDnn(onednn::DataType::F32) => Ok(AttentionKernel::F32),
            _ => AttentionKernel::for_reduced(),
        }
    }
}

impl<T> BlockLinears<T> {
    fn iter(&self) -> impl Iterator<Item = &T> {
        [&self.q, &self.k, &self.v, &self.out, &self.fc1, &self.fc2].into_iter()
    }
}

impl std::fmt::Debug for QuantizedLinears {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantizedLinears({} blocks, {} layers on {})",
            self.layers.len(),
            self.int8_layers(),
            self.kernel()
        )
    }
}

impl QuantizedLinears {
    /// Quantizes `tower`'s block weights to 8 bits: per output channel and
    /// group of 256 inputs for this crate's kernel on `isa`, Q8_0 (groups
    /// of 32) where there is no `isa` or a layer's shape does not fit it.
    pub fn new(tower: &VisionTower, isa: Option<Isa>) -> Result<Self> {
        let q = |l: &Linear| -> Result<QuantizedLinear> {
            let w = l
                .weight()
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .contiguous()?;
            let (n, k) = w.dims2()?;
            if let Some(isa) = isa {
                let data = w.flatten_all()?.to_vec1::<f32>()?;
                if let Some(p) = PackedWeights::new(&data, n, k) {
                    return Ok(QuantizedLinear::Int8(p, isa));
                }
            }
            if !k.is_multiple_of(GgmlDType::Q8_0.block_size()) {
                return Ok(QuantizedLinear::Full);
            }
            Ok(QuantizedLinear::Candle(QMatMul::from_qtensor(
                QTensor::quantize(&w, GgmlDType::Q8_0)?,
            )?))
        };
        let layers = Self::each_block(tower, q)?;
        let packing = Packing::Int8(isa);
        Ok(Self {
            layers,
            packing,
            attention: packing.attention()?,
        })
    }

    /// The block layers as oneDNN products in `dtype` (`Bf16` wants a CPU
    /// with AVX512-BF16 or AMX-BF16), their weights reordered once.
    pub fn onednn(tower: &VisionTower, dtype: onednn::DataType) -> Result<Self> {
        let packing = Packing::OneDnn(dtype);
        Ok(Self {
            layers: Self::each_block(tower, |l| Self::pack_onednn(l, dtype))?,
            packing,
            attention: packing.attention()?,
        })
    }

    /// As [`onednn`](Self::onednn), freeing each block's f32 weights (all
    /// but the last block's, which the explanation maps run) as soon as it
    /// is packed: the peak holds one packed block more than the f32 tower,
    /// not a second tower. A failure after the first block leaves the tower
    /// without those weights (load it again).
    pub fn onednn_releasing(tower: &mut VisionTower, dtype: onednn::DataType) -> Result<Self> {
        Self::releasing(tower, Packing::OneDnn(dtype), |l| {
            Self::pack_onednn(l, dtype)
        })
    }

    /// The block layers in this crate's f32 panels ([`PackedF32`], AVX2 +
    /// FMA), freeing the f32 weights block by block as
    /// [`onednn_releasing`](Self::onednn_releasing) does.
    pub fn f32_releasing(tower: &mut VisionTower) -> Result<Self> {
        if !PackedF32::available() {
            candle_core::bail!("the packed f32 kernel needs AVX2 and FMA, which this CPU lacks")
        }
        Self::releasing(tower, Packing::F32, |l| {
            let view = LinearView::new(l, None).ok_or_else(|| {
                candle_core::Error::Msg("packing needs the f32 CPU weights".into())
            })?;
            PackedF32::new(view.w.slice(), view.transposed, view.n, view.k)
                .map(QuantizedLinear::F32)
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "a [{}, {}] layer does not fit the f32 panels",
                        view.n, view.k
                    ))
                })
        })
    }

    fn releasing(
        tower: &mut VisionTower,
        packing: Packing,
        f: impl Fn(&Linear) -> Result<QuantizedLinear>,
    ) -> Result<Self> {
        let n = tower.layers.len();
        let mut layers = Vec::with_capacity(n);
        for i in 0..n {
            layers.push(Self::block(&tower.layers[i], &f)?);
            if i + 1 < n {
                for l in tower.layers[i].linears_mut() {
                    super::super::vision::release_linear(l)?;
                }
            }
        }
        Ok(Self {
            layers,
            packing,
            attention: packing.attention()?,
        })
    }

    fn pack_onednn(l: &Linear, dtype: onednn::DataType) -> Result<QuantizedLinear> {
        let view = LinearView::new(l, None).ok_or_else(|| {
            candle_core::Error::Msg("oneDNN layers need the f32 CPU weights".into())
        })?;
        let bias = view.b.as_ref().map(|b| b.slice());
        onednn::Linear::new(view.w.slice(), view.transposed, bias, view.n, view.k, dtype)
            .map(QuantizedLinear::OneDnn)
            .map_err(candle_core::Error::wrap)
    }

    fn block(
        layer: &super::super::layers::EncoderLayer,
        f: impl Fn(&Linear) -> Result<QuantizedLinear>,
    ) -> Result<BlockLinears<QuantizedLinear>> {
        let [qp, kp, vp, op] = layer.self_attn.projections();
        let (fc1, fc2, _) = layer.mlp.parts();
        Ok(BlockLinears {
            q: f(qp)?,
            k: f(kp)?,
            v: f(vp)?,
            out: f(op)?,
            fc1: f(fc1)?,
            fc2: f(fc2)?,
        })
    }

    fn each_block(
        tower: &VisionTower,
        f: impl Fn(&Linear) -> Result<QuantizedLinear>,
    ) -> Result<Vec<BlockLinears<QuantizedLinear>>> {
        tower
            .layers
            .iter()
            .map(|layer| Self::block(layer, &f))
            .collect()
    }

    /// The precision of the packed layers: `q8`, `bf16` or `f32`.
    pub fn precision(&self) -> &'static str {
        match self.packing {
            Packing::OneDnn(dt) => dt.as_str(),
            Packing::Int8(_) => "q8",
            Packing::F32 => "f32",
        }
    }

    /// Per block, which of its layers (q, k, v, out, fc1, fc2) run on a
    /// packed kernel (this crate's int8 or oneDNN's) and so need no f32
    /// weights.
    pub fn packed_mask(&self) -> Vec<[bool; 6]> {
        self.layers
            .iter()
            .map(|b| {
                let mut m = [false; 6];
                for (m, l) in m.iter_mut().zip(b.iter()) {
                    *m = matches!(
                        l,
                        QuantizedLinear::Int8(..)
                            | QuantizedLinear::OneDnn(_)
                            | QuantizedLinear::F32(_)
                    );
                }
                m
            })
            .collect()
    }

    /// Whether every layer runs one of this crate's int8 kernels (none on
    /// Candle's Q8_0 or in f32).
    pub fn all_int8(&self) -> bool {
        self.int8_layers() == self.layers.len() * 6
    }

    fn int8_layers(&self) -> usize {
        self.layers
            .iter()
            .flat_map(BlockLinears::iter)
            .filter(|l| matches!(l, QuantizedLinear::Int8(..)))
            .count()
    }

    /// Which kernel the layers run: `avx512-vnni`, `avx-vnni`, `avx2`, or
    /// `q8_0` (Candle's) where this crate's kernel does not run; for oneDNN
    /// `onednn` and its implementation (`onednn brg:avx512_core_amx`);
    /// then, where attention runs in bf16, `, attention bf16` and its
    /// implementation.
    pub fn kernel(&self) -> String {
        match self.attention {
            AttentionKernel::F32 => self.layers_kernel(),
            AttentionKernel::OneDnnBf16 => format!(
                "{}, attention bf16 {}",
                self.layers_kernel(),
                super::attention::onednn_impl().unwrap_or_default()
            ),
        }
    }

    /// [`kernel`](Self::kernel) of the block layers alone.
    fn layers_kernel(&self) -> String {
        if let Packing::F32 = self.packing {
            return "packed avx2-fma".into();
        }
        if let Packing::OneDnn(_) = self.packing {
            let name = self
                .layers
                .iter()
                .flat_map(BlockLinears::iter)
                .find_map(|l| match l {
                    QuantizedLinear::OneDnn(w) => Some(w.impl_name().to_string()),
                    _ => None,
                });
            return format!("onednn {}", name.unwrap_or_default());
        }
        match self.packing {
            Packing::Int8(Some(isa)) if self.int8_layers() > 0 => isa.as_str().into(),
            _ => "q8_0".into(),
        }
    }
}
