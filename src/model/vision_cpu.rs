//! Inference-only forward of the vision tower on the CPU, on raw f32 buffers.
//!
//! Candle's op-by-op forward spends about as long outside the matrix
//! products as inside them: a temporary per op, transposes made contiguous,
//! many small batched matmuls for attention, and elementwise passes through
//! scalar `exp`. This path runs the same arithmetic with the `gemm` crate
//! (Candle's own CPU matmul) called directly: biases and residuals are
//! accumulated into each product's destination, q/k/v are read in place with
//! strides, attention runs per (image, head) in parallel, and LayerNorm,
//! softmax and the activation are single vectorised passes.
//!
//! It runs when the tower is f32 on the CPU and nothing tracks gradients
//! (training keeps Candle's differentiable path), reading the weights in
//! place from the tower's tensors. With [`QuantizedLinears`] the transformer's
//! linear layers run Candle's 8-bit (Q8_0) matmul instead (`--precision q8`).

use crate::parallel::SendPtr;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Storage, Tensor};
use candle_nn::Linear;
use rayon::prelude::*;

use super::config::Activation;
use super::gemm_f32::{self, PackedF32};
use super::gemm_i8::{self, Isa, PackedWeights, QuantizedRows};
use super::layers::LayerNorm;
use super::onednn;
use super::vision::{VisionOutput, VisionTower};

/// A read-locked view of a contiguous f32 CPU tensor's data.
struct HostF32<'a> {
    _guard: Box<dyn std::ops::Deref<Target = Storage> + 'a>,
    ptr: *const f32,
    len: usize,
}

impl<'a> HostF32<'a> {
    /// `None` unless `t` is f32, on the CPU, contiguous and untracked.
    fn new(t: &'a Tensor) -> Option<Self> {
        if t.dtype() != DType::F32 || !t.device().is_cpu() || t.track_op() {
            return None;
        }
        let (guard, layout) = t.storage_and_layout();
        let (start, end) = layout.contiguous_offsets()?;
        let ptr = match &*guard {
            Storage::Cpu(cpu) => cpu.as_slice::<f32>().ok()?.get(start..end)?.as_ptr(),
            _ => return None,
        };
        Some(Self {
            _guard: Box::new(guard),
            ptr,
            len: end - start,
        })
    }

    /// `None` unless `t` is an untracked f32 CPU matrix [n, k] stored
    /// column-major (the transposed view of a contiguous [k, n]); the slice
    /// is then that [k, n] storage.
    fn transposed(t: &'a Tensor) -> Option<Self> {
        if t.dtype() != DType::F32 || !t.device().is_cpu() || t.track_op() {
            return None;
        }
        let (guard, layout) = t.storage_and_layout();
        let &[n, k] = layout.dims() else { return None };
        if layout.stride() != [1, n] {
            return None;
        }
        let start = layout.start_offset();
        let ptr = match &*guard {
            Storage::Cpu(cpu) => cpu
                .as_slice::<f32>()
                .ok()?
                .get(start..start + n * k)?
                .as_ptr(),
            _ => return None,
        };
        Some(Self {
            _guard: Box::new(guard),
            ptr,
            len: n * k,
        })
    }

    fn slice(&self) -> &[f32] {
        // SAFETY: the read guard keeps the storage alive and unmodified.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// A linear layer `y = x W^T + b` with `W` [n, k] (nn.Linear layout),
/// stored row-major or, after [`store_transposed`], as `W^T` [k, n].
struct LinearView<'a> {
    w: HostF32<'a>,
    /// `w` holds `W^T` [k, n] row-major.
    transposed: bool,
    b: Option<HostF32<'a>>,
    n: usize,
    k: usize,
    quantized: Option<&'a QuantizedLinear>,
}

impl<'a> LinearView<'a> {
    fn new(l: &'a Linear, quantized: Option<&'a QuantizedLinear>) -> Option<Self> {
        let quantized = quantized.filter(|q| !matches!(q, QuantizedLinear::Full));
        // A layer whose f32 weights were released (`release_f32_linears`)
        // has only its 8-bit ones, which give the shape.
        let (n, k) = match quantized {
            Some(QuantizedLinear::Int8(w, _)) if l.weight().elem_count() == 0 => (w.n(), w.k()),
            Some(QuantizedLinear::OneDnn(w)) if l.weight().elem_count() == 0 => (w.n(), w.k()),
            Some(QuantizedLinear::F32(w)) if l.weight().elem_count() == 0 => (w.n(), w.k()),
            _ => l.weight().dims2().ok()?,
        };
        let (w, transposed) = match HostF32::new(l.weight()) {
            Some(w) => (w, false),
            None => (HostF32::transposed(l.weight())?, true),
        };
        let b = match l.bias() {
            Some(b) => {
                let b = HostF32::new(b)?;
                Some((b.len == n).then_some(b)?)
            }
            None => None,
        };
        Some(Self {
            w,
            transposed,
            b,
            n,
            k,
            quantized,
        })
    }

    /// `dst[r, ..n] (+)= x[r] W^T + b` for the `m` rows of `x` [m, k]; rows
    /// of `dst` are `dst_rs` apart. `add`: accumulate into `dst`. `xq`: `x`
    /// already quantized for the 8-bit kernel (shared by q, k and v).
    fn apply(
        &self,
        x: &[f32],
        xq: Option<&QuantizedRows>,
        m: usize,
        dst: &mut [f32],
        dst_rs: usize,
        add: bool,
    ) -> Result<()> {
        let (n, k) = (self.n, self.k);
        if m == 0 || x.len() < m * k || dst_rs < n || dst.len() < (m - 1) * dst_rs + n {
            candle_core::bail!("linear layer buffers do not match [{m}, {k}] x [{n}, {k}]")
        }
        let bias = self.b.as_ref().map(|b| b.slice());
        if let Some(QuantizedLinear::OneDnn(w)) = self.quantized {
            return w
                .apply(x, m, dst, dst_rs, add)
                .map_err(candle_core::Error::wrap);
        }
        if let Some(QuantizedLinear::F32(w)) = self.quantized {
            gemm_f32::matmul(x, m, w, bias, dst, dst_rs, add);
            return Ok(());
        }
        if let Some(QuantizedLinear::Int8(w, isa)) = self.quantized {
            let owned;
            let xq = match xq {
                Some(xq) => xq,
                None => {
                    owned = QuantizedRows::new(x, m, k, *isa);
                    &owned
                }
            };
            gemm_i8::matmul(xq, w, bias, dst, dst_rs, add);
            return Ok(());
        }
        if let Some(QuantizedLinear::Candle(q)) = self.quantized {
            let y = q.forward(&Tensor::from_slice(&x[..m * k], (m, k), &Device::Cpu)?)?;
            let y = HostF32::new(&y).ok_or_else(|| candle_core::Error::Msg("q8 matmul".into()))?;
            let y = y.slice();
            rows_mut(dst, dst_rs, m).for_each(|(r, row)| {
                let row = &mut row[..n];
                let src = &y[r * n..(r + 1) * n];
                match (add, bias) {
                    (true, Some(b)) => add3(row, src, b),
                    (true, None) => add2(row, src),
                    (false, Some(b)) => set_sum(row, src, b),
                    (false, None) => row.copy_from_slice(src),
                }
            });
            return Ok(());
        }
        if let Some(b) = bias {
            rows_mut(dst, dst_rs, m).for_each(|(_, row)| {
                if add {
                    add2(&mut row[..n], b)
                } else {
                    row[..n].copy_from_slice(b)
                }
            });
        }
        // One single-threaded product per thread, each on its own slice of
        // output columns: one synchronisation per layer instead of the
        // several per call of gemm's own threading.
        let read_dst = add || bias.is_some();
        let parts = column_split(m, n, k);
        let dst_ptr = SendPtr(dst.as_mut_ptr());
        let w_ptr = SendPtr(self.w.ptr as *mut f32);
        // A gemm operand: its first element, column stride, row stride.
        type Operand = (*const f32, isize, isize);
        let transposed = self.transposed;
        let run = |(c0, c1): (usize, usize)| {
            let w = w_ptr.get() as *const f32;
            let x = (x.as_ptr(), 1, k as isize);
            // gemm's (rows, cols, dst column and row strides, lhs, rhs).
            let (rows, cols, dst_cs, dst_rs, lhs, rhs): (
                usize,
                usize,
                isize,
                isize,
                Operand,
                Operand,
            ) = if transposed {
                // dst^T = W x^T: `w` is W^T [k, n] row-major, that is W
                // column-major, a left operand gemm reads without
                // packing it (packing the weights again on every call
                // cost a third of a batch-1 forward); x^T is packed.
                // SAFETY (the add): c0 < n, inside `w`.
                let w = (unsafe { w.add(c0) }, n as isize, 1);
                let xt = (x.0, x.2, x.1);
                (c1 - c0, m, dst_rs as isize, 1, w, xt)
            } else {
                // `w` is [n, k] row-major, read as the k x n matrix W^T
                // (row stride 1, column stride k).
                // SAFETY (the add): c0 * k < n * k, inside `w`.
                let wt = (unsafe { w.add(c0 * k) }, k as isize, 1);
                (m, c1 - c0, 1, dst_rs as isize, x, wt)
            };
            // SAFETY: bounds checked above; each part writes only its own
            // columns c0..c1 of `dst`.
            unsafe {
                gemm::gemm(
                    rows,
                    cols,
                    k,
                    dst_ptr.get().add(c0),
                    dst_cs,
                    dst_rs,
                    read_dst,
                    lhs.0,
                    lhs.1,
                    lhs.2,
                    rhs.0,
                    rhs.1,
                    rhs.2,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        };
        if parts.len() == 1 {
            run(parts[0]);
        } else {
            parts.into_par_iter().for_each(run);
        }
        Ok(())
    }
}

/// Splits `n` output columns into one range per thread (multiples of 16
/// columns), or one range when the product is too small to share.
fn column_split(m: usize, n: usize, k: usize) -> Vec<(usize, usize)> {
    let threads = rayon::current_num_threads();
    if threads <= 1 || m * n * k < 64 * 64 * 64 || n < 32 * threads {
        return vec![(0, n)];
    }
    let step = n.div_ceil(threads).div_ceil(16) * 16;
    (0..n)
        .step_by(step)
        .map(|c0| (c0, (c0 + step).min(n)))
        .collect()
}

impl LinearView<'_> {
    /// `x` [m, k] quantized once for several 8-bit layers reading it.
    fn quantize_input(&self, x: &[f32], m: usize) -> Option<QuantizedRows> {
        match self.quantized {
            Some(QuantizedLinear::Int8(_, isa)) => Some(QuantizedRows::new(x, m, self.k, *isa)),
            _ => None,
        }
    }
}

/// Rows of a strided matrix, in parallel when there are enough of them.
fn rows_mut(
    dst: &mut [f32],
    rs: usize,
    m: usize,
) -> impl ParallelIterator<Item = (usize, &mut [f32])> {
    dst.par_chunks_mut(rs).take(m).with_min_len(64).enumerate()
}

/// One packed linear layer: this crate's 8-bit kernel (on the instruction
/// set chosen at load) where the CPU and the shape allow, Candle's Q8_0
/// matmul otherwise; or a oneDNN product (bf16 or f32).
enum QuantizedLinear {
    Int8(PackedWeights, Isa),
    OneDnn(onednn::Linear),
    /// f32 in this crate's panels (AVX2 + FMA).
    F32(PackedF32),
    Candle(QMatMul),
    /// Too narrow for 8-bit blocks (inputs not a multiple of 32): kept f32.
    Full,
}

/// Packed weights of the transformer's linear layers (q, k, v, out, fc1,
/// fc2 of each block): 8-bit for `--precision q8`, or oneDNN's layout for
/// `--precision bf16` (and f32 through oneDNN). LayerNorms, attention, the
/// patch embedding and the final projection stay f32.
pub struct QuantizedLinears {
    layers: Vec<BlockLinears<QuantizedLinear>>,
    packing: Packing,
}

/// What the layers of a [`QuantizedLinears`] were packed for.
#[derive(Clone, Copy, Debug)]
enum Packing {
    /// This crate's 8-bit kernel on an instruction set, `None` when this
    /// CPU has none it runs (then every layer is Candle's Q8_0).
    Int8(Option<Isa>),
    /// oneDNN's products in this type.
    OneDnn(onednn::DataType),
    /// This crate's f32 kernel ([`gemm_f32`]).
    F32,
}

/// A transformer block's six linear layers.
struct BlockLinears<T> {
    q: T,
    k: T,
    v: T,
    out: T,
    fc1: T,
    fc2: T,
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
        Ok(Self {
            layers,
            packing: Packing::Int8(isa),
        })
    }

    /// The block layers as oneDNN products in `dtype` (`Bf16` wants a CPU
    /// with AVX512-BF16 or AMX-BF16), their weights reordered once.
    pub fn onednn(tower: &VisionTower, dtype: onednn::DataType) -> Result<Self> {
        Ok(Self {
            layers: Self::each_block(tower, |l| Self::pack_onednn(l, dtype))?,
            packing: Packing::OneDnn(dtype),
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

    /// The block layers in this crate's f32 panels ([`gemm_f32`], AVX2 +
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
                    super::vision::release_linear(l)?;
                }
            }
        }
        Ok(Self { layers, packing })
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
        layer: &super::layers::EncoderLayer,
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
    /// `onednn` and its implementation (`onednn brg:avx512_core_amx`).
    pub fn kernel(&self) -> String {
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

struct NormView<'a> {
    w: HostF32<'a>,
    b: HostF32<'a>,
    eps: f32,
}

impl<'a> NormView<'a> {
    fn new(ln: &'a LayerNorm, width: usize) -> Option<Self> {
        let (w, b, eps) = ln.parts();
        let (w, b) = (HostF32::new(w)?, HostF32::new(b)?);
        (w.len == width && b.len == width).then_some(Self {
            w,
            b,
            eps: eps as f32,
        })
    }

    /// Row-wise LayerNorm of `x` [m, d] into `y` [m, d].
    fn apply(&self, x: &[f32], y: &mut [f32], d: usize) {
        let (w, b, eps) = (self.w.slice(), self.b.slice(), self.eps);
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .with_min_len(32)
            .for_each(|(y, x)| simd::layer_norm_row(x, y, w, b, eps));
    }
}

struct BlockView<'a> {
    ln1: NormView<'a>,
    qkv: [LinearView<'a>; 3],
    out: LinearView<'a>,
    ln2: NormView<'a>,
    fc1: LinearView<'a>,
    fc2: LinearView<'a>,
    act: Activation,
    heads: usize,
}

/// Work buffers kept between forwards: fresh multi-megabyte allocations
/// would be returned to the OS and page-faulted (and zeroed) again on every
/// frame, which costs several percent of a forward.
static SCRATCH: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// Keeps at most this many idle buffers (a forward uses six).
const SCRATCH_KEEP: usize = 8;

/// A buffer of `len` floats (not necessarily zero), reused when one is free.
fn take_buffer(len: usize) -> Vec<f32> {
    let reused = SCRATCH.lock().ok().and_then(|mut pool| {
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i)?;
        Some(pool.swap_remove(best))
    });
    match reused {
        // Every caller overwrites the whole buffer, so stale values may stay.
        Some(mut v) => {
            v.resize(len, 0.0);
            v
        }
        None => vec![0f32; len],
    }
}

fn give_back(v: Vec<f32>) {
    if let Ok(mut pool) = SCRATCH.lock() {
        pool.push(v);
        if pool.len() > SCRATCH_KEEP {
            // Drop the smallest: the large ones are the expensive ones.
            if let Some(i) = pool
                .iter()
                .enumerate()
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i)
            {
                pool.swap_remove(i);
            }
        }
    }
}

/// Views of every weight the fused forward reads, checked once.
struct TowerViews<'a> {
    blocks: Vec<BlockView<'a>>,
    patch_w: HostF32<'a>,
    class_emb: HostF32<'a>,
    pos_emb: HostF32<'a>,
    pre_ln: NormView<'a>,
    post_ln: NormView<'a>,
    proj: LinearView<'a>,
}

/// The views of `tower` (with `quantized` layers), or `None` when the fused
/// path cannot run it: weights not f32 on the CPU, tracked (being trained),
/// or of shapes it does not handle.
fn tower_views<'a>(
    tower: &'a VisionTower,
    quantized: Option<&'a QuantizedLinears>,
) -> Option<TowerViews<'a>> {
    let cfg = &tower.config;
    let d = cfg.width;
    let blocks = block_views(tower, quantized)?;
    let (patch_w, class_emb, pos_emb) = tower.embedding_weights();
    let (patch_w, class_emb, pos_emb) = (
        HostF32::new(patch_w)?,
        HostF32::new(class_emb)?,
        HostF32::new(pos_emb)?,
    );
    let kdim = 3 * cfg.patch_size * cfg.patch_size;
    let fits = patch_w.len == d * kdim
        && class_emb.len == d
        && pos_emb.len == cfg.tokens() * d
        && cfg.grid() * cfg.patch_size == cfg.image_size;
    fits.then_some(())?;
    Some(TowerViews {
        blocks,
        patch_w,
        class_emb,
        pos_emb,
        pre_ln: NormView::new(tower.pre_layernorm(), d)?,
        post_ln: NormView::new(&tower.post_layernorm, d)?,
        proj: LinearView::new(&tower.projection, None)?,
    })
}

/// Stores the weights of every block's linear layers transposed, as the
/// column-major view of a contiguous `W^T` [k, n], so that the fused forward
/// hands them to gemm as an operand it need not pack (measured faster: see
/// the README's "Benchmarks"). Candle's ops read
/// the view as before (its matmul takes either layout); nothing is copied
/// twice, so memory is unchanged. Untracked f32 CPU weights only.
pub fn store_transposed(tower: &mut VisionTower) -> Result<()> {
    // `ClipModel::from_checkpoint` has laid them out so already, one at a
    // time; this catches towers built otherwise.
    for layer in &mut tower.layers {
        for l in layer.linears_mut() {
            let w = l.weight();
            if w.dtype() != DType::F32 || !w.device().is_cpu() || w.track_op() {
                continue;
            }
            if HostF32::transposed(w).is_some() {
                continue;
            }
            *l = Linear::new(transposed_layout(w.clone())?, l.bias().cloned());
        }
    }
    Ok(())
}

/// `w` [n, k] as the column-major view of a contiguous `W^T` (see
/// [`store_transposed`]); a copy, after which `w` may be dropped.
pub fn transposed_layout(w: Tensor) -> Result<Tensor> {
    w.t()?.contiguous()?.t()
}

/// Whether the HF-named tensor `name` is the weight of a vision block's
/// linear layer, which the fused f32 forward reads transposed.
pub fn is_block_linear_weight(name: &str) -> bool {
    name.starts_with("vision_model.encoder.layers.")
        && [
            "q_proj.weight",
            "k_proj.weight",
            "v_proj.weight",
            "out_proj.weight",
            "fc1.weight",
            "fc2.weight",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// The instruction set of the f32 matrix products: the `gemm` crate picks
/// its kernels itself, AVX-512 where the CPU has it (its `x86-v4`
/// feature), else AVX2 with FMA.
pub fn f32_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") {
            "avx512"
        } else if has!("avx2") && has!("fma") {
            "avx2"
        } else {
            "sse"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

/// Whether the fused forward can run `tower` (with `quantized` layers):
/// decided when the tower is built or its precision set.
pub fn supports(tower: &VisionTower, quantized: Option<&QuantizedLinears>) -> bool {
    tower_views(tower, quantized).is_some()
}

fn views_of(tower: &VisionTower) -> Result<TowerViews<'_>> {
    match tower_views(tower, tower.backend.quantized()) {
        Some(v) => Ok(v),
        None => candle_core::bail!(
            "the fused CPU forward cannot run this tower (its weights changed after it was built)"
        ),
    }
}

/// The fused forward of a tower whose backend is fused, on untracked
/// pixels (a tracked input, which wants a gradient, runs Candle's ops).
pub fn forward(
    tower: &VisionTower,
    pixels: &Tensor,
    want_layer_cls: bool,
    want_last_input: bool,
) -> Result<VisionOutput> {
    // Run the whole forward on a rayon worker: its many parallel loops then
    // share work by stealing, instead of each one waking the pool from an
    // outside thread and sleeping until it is done.
    rayon::scope(|_| forward_on_worker(tower, pixels, want_layer_cls, want_last_input))
}

fn forward_on_worker(
    tower: &VisionTower,
    pixels: &Tensor,
    want_layer_cls: bool,
    want_last_input: bool,
) -> Result<VisionOutput> {
    let cfg = &tower.config;
    let d = cfg.width;
    let TowerViews {
        blocks: views,
        patch_w,
        class_emb,
        pos_emb,
        pre_ln,
        post_ln,
        proj,
    } = views_of(tower)?;
    let pixels = pixels
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let Some(px) = HostF32::new(&pixels) else {
        candle_core::bail!("the fused CPU forward cannot read these pixels")
    };
    let (b, _, s, _) = pixels.dims4()?;
    let (p, g, t) = (cfg.patch_size, cfg.grid(), cfg.tokens());
    let kdim = 3 * p * p;
    let m = b * t;

    // Patch embedding as a matmul over unfolded patches: [B*g*g, 3*p*p].
    let mut cols = take_buffer(b * g * g * kdim);
    let px = px.slice();
    cols.par_chunks_mut(kdim).enumerate().for_each(|(i, col)| {
        let (bi, cell) = (i / (g * g), i % (g * g));
        let (gy, gx) = (cell / g, cell % g);
        for c in 0..3 {
            for ky in 0..p {
                let src = ((bi * 3 + c) * s + gy * p + ky) * s + gx * p;
                let dst = (c * p + ky) * p;
                col[dst..dst + p].copy_from_slice(&px[src..src + p]);
            }
        }
    });
    let mut x = take_buffer(m * d); // [B*T, D] residual stream
    let pos = pos_emb.slice();
    for bi in 0..b {
        let xb = &mut x[bi * t * d..(bi + 1) * t * d];
        xb.copy_from_slice(pos);
        add2(&mut xb[..d], class_emb.slice());
    }
    let patch = LinearView {
        w: patch_w,
        transposed: false,
        b: None,
        n: d,
        k: kdim,
        quantized: None,
    };
    for bi in 0..b {
        patch.apply(
            &cols[bi * g * g * kdim..(bi + 1) * g * g * kdim],
            None,
            g * g,
            &mut x[(bi * t + 1) * d..(bi + 1) * t * d],
            d,
            true,
        )?;
    }
    give_back(cols);
    let mut h = take_buffer(m * d);
    pre_ln.apply(&x, &mut h, d);
    std::mem::swap(&mut x, &mut h);

    let hidden = cfg.mlp;
    let mut qkv = take_buffer(m * 3 * d);
    let mut att = take_buffer(m * d);
    let mut f = take_buffer(m * hidden);
    let mut layer_cls = Vec::new();
    let mut last_block_input = None;
    let n_layers = views.len();
    for (li, blk) in views.iter().enumerate() {
        if want_last_input && li + 1 == n_layers {
            last_block_input = Some(Tensor::from_slice(&x, (b, t, d), &Device::Cpu)?);
        }
        blk.ln1.apply(&x, &mut h, d);
        let hq = blk.qkv[0].quantize_input(&h, m);
        for (j, lin) in blk.qkv.iter().enumerate() {
            lin.apply(&h, hq.as_ref(), m, &mut qkv[j * d..], 3 * d, false)?;
        }
        attention(&qkv, &mut att, b, t, d, blk.heads);
        blk.out.apply(&att, None, m, &mut x, d, true)?;
        blk.ln2.apply(&x, &mut h, d);
        blk.fc1.apply(&h, None, m, &mut f, hidden, false)?;
        activate(&mut f, blk.act);
        blk.fc2.apply(&f, None, m, &mut x, d, true)?;
        if want_layer_cls {
            layer_cls.push(Tensor::from_vec(
                cls_rows(&x, b, t, d),
                (b, d),
                &Device::Cpu,
            )?);
        }
    }
    let cls = cls_rows(&x, b, t, d);
    for buf in [x, h, qkv, att, f] {
        give_back(buf);
    }
    let mut pooled = vec![0f32; b * d];
    post_ln.apply(&cls, &mut pooled, d);
    let e = proj.n;
    let mut emb = vec![0f32; b * e];
    proj.apply(&pooled, None, b, &mut emb, e, false)?;
    Ok(VisionOutput {
        embedding: Tensor::from_vec(emb, (b, e), &Device::Cpu)?,
        layer_cls,
        last_block_input,
    })
}

/// The patch tokens of the last block's input `x` [B, T, D] taken through
/// that block's value path only (no query-key mixing, as MaskCLIP does),
/// its MLP, `ln_post` and the projection: [B, T-1, E]. The class token is
/// skipped: without attention no token reads another. `None` when the fused
/// path does not apply (the caller runs Candle's ops).
pub fn patch_value_embeddings(tower: &VisionTower, x: &Tensor) -> Result<Tensor> {
    rayon::scope(|_| patch_values_on_worker(tower, x))
}

fn patch_values_on_worker(tower: &VisionTower, x: &Tensor) -> Result<Tensor> {
    let d = tower.config.width;
    let (b, t, dx) = x.dims3()?;
    if dx != d || t < 2 {
        candle_core::bail!("patch values of [{b}, {t}, {dx}] tokens: want [B, T > 1, {d}]")
    }
    let TowerViews {
        blocks: views,
        post_ln,
        proj,
        ..
    } = views_of(tower)?;
    let Some(blk) = views.last() else {
        candle_core::bail!("vision tower has no layers")
    };
    let x = x
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let Some(xin) = HostF32::new(&x) else {
        candle_core::bail!("the fused CPU forward cannot read these tokens")
    };
    let p = t - 1;
    let m = b * p;
    // The residual stream of the patch tokens only: [B*(T-1), D].
    let mut r = take_buffer(m * d);
    let src = xin.slice();
    for bi in 0..b {
        r[bi * p * d..(bi + 1) * p * d].copy_from_slice(&src[(bi * t + 1) * d..(bi + 1) * t * d]);
    }
    let mut h = take_buffer(m * d);
    let mut v = take_buffer(m * d);
    blk.ln1.apply(&r, &mut h, d);
    blk.qkv[2].apply(&h, None, m, &mut v, d, false)?;
    blk.out.apply(&v, None, m, &mut r, d, true)?;
    blk.ln2.apply(&r, &mut h, d);
    let hidden = blk.fc1.n;
    let mut f = take_buffer(m * hidden);
    blk.fc1.apply(&h, None, m, &mut f, hidden, false)?;
    activate(&mut f, blk.act);
    blk.fc2.apply(&f, None, m, &mut r, d, true)?;
    post_ln.apply(&r, &mut h, d);
    let e = proj.n;
    let mut out = vec![0f32; m * e];
    proj.apply(&h, None, m, &mut out, e, false)?;
    for buf in [r, h, v, f] {
        give_back(buf);
    }
    Tensor::from_vec(out, (b, p, e), &Device::Cpu)
}

fn block_views<'a>(
    tower: &'a VisionTower,
    quantized: Option<&'a QuantizedLinears>,
) -> Option<Vec<BlockView<'a>>> {
    let d = tower.config.width;
    if quantized.is_some_and(|q| q.layers.len() != tower.layers.len()) {
        return None;
    }
    tower
        .layers
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            let q = quantized.map(|q| &q.layers[i]);
            let [qp, kp, vp, op] = layer.self_attn.projections();
            let (fc1, fc2, act) = layer.mlp.parts();
            let heads = layer.self_attn.heads();
            if heads == 0 || !d.is_multiple_of(heads) {
                return None;
            }
            let view = BlockView {
                ln1: NormView::new(&layer.layer_norm1, d)?,
                qkv: [
                    LinearView::new(qp, q.map(|q| &q.q))?,
                    LinearView::new(kp, q.map(|q| &q.k))?,
                    LinearView::new(vp, q.map(|q| &q.v))?,
                ],
                out: LinearView::new(op, q.map(|q| &q.out))?,
                ln2: NormView::new(&layer.layer_norm2, d)?,
                fc1: LinearView::new(fc1, q.map(|q| &q.fc1))?,
                fc2: LinearView::new(fc2, q.map(|q| &q.fc2))?,
                act,
                heads,
            };
            let square = view
                .qkv
                .iter()
                .chain([&view.out])
                .all(|l| l.n == d && l.k == d);
            (square && view.fc1.k == d && view.fc2.n == d && view.fc2.k == view.fc1.n)
                .then_some(view)
        })
        .collect()
}

/// The class-token rows of a [B*T, D] stream: [B, D].
fn cls_rows(x: &[f32], b: usize, t: usize, d: usize) -> Vec<f32> {
    (0..b)
        .flat_map(|bi| x[bi * t * d..bi * t * d + d].iter().copied())
        .collect()
}

/// Softmax attention of every (image, head): `qkv` [B*T, 3D] holds q, k, v
/// side by side; writes the heads' outputs side by side into `out` [B*T, D].
fn attention(qkv: &[f32], out: &mut [f32], b: usize, t: usize, d: usize, heads: usize) {
    let hd = d / heads;
    let scale = (hd as f32).powf(-0.5);
    assert!(qkv.len() >= b * t * 3 * d && out.len() >= b * t * d);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..b * heads).into_par_iter().for_each_init(
        || vec![0f32; t * t],
        |scores, task| {
            let (bi, h) = (task / heads, task % heads);
            let base = bi * t * 3 * d + h * hd;
            let (q, k, v) = (
                qkv[base..].as_ptr(),
                qkv[base + d..].as_ptr(),
                qkv[base + 2 * d..].as_ptr(),
            );
            // SAFETY: every pointer stays inside `qkv` (rows of 3D, t rows
            // from `bi * t`), `scores` is t x t, and each task writes its
            // own hd columns of its own image's rows of `out`.
            unsafe {
                // scores = scale * q k^T: [t, t]
                gemm::gemm(
                    t,
                    t,
                    hd,
                    scores.as_mut_ptr(),
                    1,
                    t as isize,
                    false,
                    q,
                    1,
                    3 * d as isize,
                    k,
                    3 * d as isize,
                    1,
                    0.0f32,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
                scores
                    .chunks_exact_mut(t)
                    .for_each(simd::softmax_row_in_place);
                // out_h = scores v: [t, hd]
                gemm::gemm(
                    t,
                    hd,
                    t,
                    out_ptr.get().add(bi * t * d + h * hd),
                    1,
                    d as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    t as isize,
                    v,
                    1,
                    3 * d as isize,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
}

fn activate(x: &mut [f32], act: Activation) {
    x.par_chunks_mut(16 * 1024).for_each(|c| match act {
        Activation::QuickGelu => simd::quick_gelu_in_place(c),
        Activation::Gelu => simd::gelu_erf_in_place(c),
        Activation::GeluTanh => simd::gelu_tanh_in_place(c),
    });
}

fn add2(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
}

fn add3(a: &mut [f32], b: &[f32], c: &[f32]) {
    a.iter_mut()
        .zip(b.iter().zip(c))
        .for_each(|(a, (b, c))| *a += b + c);
}

fn set_sum(a: &mut [f32], b: &[f32], c: &[f32]) {
    a.iter_mut()
        .zip(b.iter().zip(c))
        .for_each(|(a, (b, c))| *a = b + c);
}

/// Vectorised elementwise kernels. Each body is compiled once per
/// instruction set (AVX-512, AVX2+FMA, baseline) and picked at run time, so
/// a portable build still uses the wide registers.
mod simd {
    const LANES: usize = 16;

    /// `e^x` to about 2 ulp for x in [-87, 88] (clamped outside), written
    /// without branches or calls so that loops over it vectorise.
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        // 1.5 * 2^23: adding it rounds to an integer held in the low bits.
        const MAGIC: f32 = 12_582_912.0;
        let x = x.clamp(-87.0, 88.0);
        let shifted = x * LOG2E + MAGIC;
        let n = shifted - MAGIC;
        let r = x - n * LN2_HI - n * LN2_LO;
        let p = 1.987_569_1e-4;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 1.666_666_5e-1;
        let p = p * r + 0.5;
        let p = p * r * r + r + 1.0;
        let k = shifted.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
        p * f32::from_bits((k.wrapping_add(127) as u32) << 23)
    }

    #[inline(always)]
    fn sum(x: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for i in 0..LANES {
                acc[i] += c[i];
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    #[inline(always)]
    fn max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail = chunks
            .remainder()
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        for c in chunks {
            for i in 0..LANES {
                acc[i] = acc[i].max(c[i]);
            }
        }
        acc.iter().copied().fold(tail, f32::max)
    }

    #[inline(always)]
    fn centered_sq_sum(x: &[f32], mean: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail: f32 = chunks
            .remainder()
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum();
        for c in chunks {
            for i in 0..LANES {
                let v = c[i] - mean;
                acc[i] += v * v;
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    multiversion! {
        /// `y = (x - mean) / sqrt(var + eps) * w + b` over one row.
        pub fn layer_norm_row(x: &[f32], y: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
            let d = x.len() as f32;
            let mean = sum(x) / d;
            let inv = 1.0 / (centered_sq_sum(x, mean) / d + eps).sqrt();
            for (((y, x), w), b) in y.iter_mut().zip(x).zip(w).zip(b) {
                *y = (x - mean) * inv * w + b;
            }
        }
    }

    multiversion! {
        /// Softmax of one row, in place.
        pub fn softmax_row_in_place(x: &mut [f32]) {
            let m = max(x);
            for v in x.iter_mut() {
                *v = exp(*v - m);
            }
            let inv = 1.0 / sum(x);
            for v in x.iter_mut() {
                *v *= inv;
            }
        }
    }

    multiversion! {
        /// `x * sigmoid(1.702 x)`, in place.
        pub fn quick_gelu_in_place(x: &mut [f32]) {
            for v in x.iter_mut() {
                *v /= 1.0 + exp(-1.702 * *v);
            }
        }
    }

    multiversion! {
        /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` = `x sigmoid(2 z)`, in place.
        pub fn gelu_tanh_in_place(x: &mut [f32]) {
            const C: f32 = 0.797_884_6; // sqrt(2 / pi)
            for v in x.iter_mut() {
                let z = C * (*v + 0.044_715 * *v * *v * *v);
                *v /= 1.0 + exp(-2.0 * z);
            }
        }
    }

    multiversion! {
        /// `0.5 x (1 + erf(x / sqrt 2))`, in place; erf by Abramowitz and
        /// Stegun 7.1.26 (absolute error below 1.5e-7).
        pub fn gelu_erf_in_place(x: &mut [f32]) {
            for v in x.iter_mut() {
                let z = (*v * std::f32::consts::FRAC_1_SQRT_2).abs();
                let t = 1.0 / (1.0 + 0.327_591_1 * z);
                let poly = t
                    * (0.254_829_6
                        + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
                let erf_abs = 1.0 - poly * exp(-z * z);
                let erf = if *v < 0.0 { -erf_abs } else { erf_abs };
                *v *= 0.5 * (1.0 + erf);
            }
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn exp_is_accurate() {
            let mut worst = 0f32;
            let mut x = -80.0f32;
            while x < 80.0 {
                let rel = (super::exp(x) - x.exp()).abs() / x.exp();
                worst = worst.max(rel);
                x += 0.0137;
            }
            assert!(worst < 5e-7, "relative error {worst}");
            assert_eq!(super::exp(-1000.0), (-87.0f32).exp().max(super::exp(-87.0)));
            assert!(super::exp(1000.0).is_finite());
        }

        #[test]
        fn activations_match_their_definitions() {
            let xs: Vec<f32> = (-400..400).map(|i| i as f32 * 0.025).collect();
            let mut q = xs.clone();
            super::quick_gelu_in_place(&mut q);
            let mut e = xs.clone();
            super::gelu_erf_in_place(&mut e);
            let mut t = xs.clone();
            super::gelu_tanh_in_place(&mut t);
            for (i, &x) in xs.iter().enumerate() {
                let quick = x / (1.0 + (-1.702 * x).exp());
                assert!((q[i] - quick).abs() < 1e-6, "quick_gelu({x})");
                let tanh = 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh());
                assert!((t[i] - tanh).abs() < 1e-6, "gelu_tanh({x})");
                // erf GELU against the tanh form: they differ by < 1e-3.
                assert!((e[i] - tanh).abs() < 1e-3, "gelu({x})");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::Linear;

    use super::HostF32;

    use crate::model::config::{Activation, ClipConfig};
    use crate::model::{Checkpoint, ClipModel};

    /// A small random CLIP of a given vision geometry (image side, patch,
    /// width, heads, layers).
    fn model(
        geometry: (usize, usize, usize, usize, usize),
        act: Activation,
        seed: u64,
    ) -> ClipModel {
        let (image, patch, width, heads, layers) = geometry;
        let mut cfg = ClipConfig::vit_b16();
        cfg.vision.image_size = image;
        cfg.vision.patch_size = patch;
        cfg.vision.width = width;
        cfg.vision.layers = layers;
        cfg.vision.heads = heads;
        cfg.vision.mlp = 4 * width;
        cfg.vision.activation = act;
        cfg.text.layers = 1;
        cfg.text.vocab_size = 600;
        cfg.text.width = 64;
        cfg.text.heads = 2;
        cfg.text.mlp = 128;
        cfg.embed_dim = 32;
        let ckpt = Checkpoint::random(&cfg, seed).unwrap();
        ClipModel::from_checkpoint(ckpt, &Device::Cpu, DType::F32).unwrap()
    }

    fn small(act: Activation) -> ClipModel {
        model((48, 16, 64, 4, 3), act, 7)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn fused_forward_matches_candle_ops() {
        for act in [
            Activation::QuickGelu,
            Activation::Gelu,
            Activation::GeluTanh,
        ] {
            let mut clip = small(act);
            let px = Tensor::randn(0f32, 1.0, (3, 3, 48, 48), &Device::Cpu).unwrap();
            let fast = clip.vision.forward_with(&px, true, true).unwrap();
            clip.vision.backend = crate::model::vision::VisionBackend::Candle;
            let slow = clip.vision.forward_with(&px, true, true).unwrap();
            let d = max_diff(&fast.embedding, &slow.embedding);
            assert!(d < 1e-4, "{act:?}: embedding differs by {d}");
            for (i, (a, b)) in fast.layer_cls.iter().zip(&slow.layer_cls).enumerate() {
                let d = max_diff(a, b);
                assert!(d < 1e-4, "{act:?}: layer {i} CLS differs by {d}");
            }
            assert_eq!(fast.layer_cls.len(), 3);
            let (a, b) = (
                fast.last_block_input.unwrap(),
                slow.last_block_input.unwrap(),
            );
            assert_eq!(a.dims(), b.dims());
            assert!(max_diff(&a, &b) < 1e-4);
        }
    }

    /// The blocks' weights are stored transposed at load, and a tower whose
    /// weights are row-major (as a checkpoint holds them) gives the same
    /// forward through the other gemm layout.
    #[test]
    fn both_weight_layouts_give_the_same_forward() {
        let mut clip = small(Activation::QuickGelu);
        let layout = |clip: &mut ClipModel, transposed: bool| {
            clip.vision.layers.iter_mut().all(|layer| {
                layer.linears_mut().into_iter().all(|l| {
                    let w = l.weight();
                    if transposed {
                        HostF32::transposed(w).is_some() && HostF32::new(w).is_none()
                    } else {
                        HostF32::new(w).is_some()
                    }
                })
            })
        };
        assert!(layout(&mut clip, true));
        let px = Tensor::randn(0f32, 1.0, (2, 3, 48, 48), &Device::Cpu).unwrap();
        let a = clip.vision.forward(&px).unwrap();
        for layer in &mut clip.vision.layers {
            for l in layer.linears_mut() {
                *l = Linear::new(l.weight().contiguous().unwrap(), l.bias().cloned());
            }
        }
        assert!(layout(&mut clip, false));
        let b = clip.vision.forward(&px).unwrap();
        let d = max_diff(&a, &b);
        assert!(d < 1e-5, "the two layouts differ by {d}");
    }

    #[test]
    fn fused_patch_values_match_candle_ops() {
        for act in [Activation::QuickGelu, Activation::Gelu] {
            let mut clip = small(act);
            let px = Tensor::randn(0f32, 1.0, (2, 3, 48, 48), &Device::Cpu).unwrap();
            let x = clip
                .vision
                .forward_with(&px, false, true)
                .unwrap()
                .last_block_input
                .unwrap();
            let fast = clip.vision.patch_value_embeddings(&x).unwrap();
            clip.vision.backend = crate::model::vision::VisionBackend::Candle;
            let slow = clip.vision.patch_value_embeddings(&x).unwrap();
            assert_eq!(fast.dims(), &[2, 9, 32]);
            assert_eq!(fast.dims(), slow.dims());
            let d = max_diff(&fast, &slow);
            assert!(d < 1e-4, "{act:?}: patch values differ by {d}");
        }
    }

    /// The dtype GPUs run (f16) goes through Candle's ops; the CPU can run
    /// that path too, which keeps it tested without a GPU.
    #[test]
    fn f16_path_stays_close_to_f32() {
        let cfg = small(Activation::QuickGelu).config;
        let ckpt = Checkpoint::random(&cfg, 7).unwrap();
        let full = ClipModel::from_checkpoint(ckpt.clone(), &Device::Cpu, DType::F32).unwrap();
        let half = ClipModel::from_checkpoint(ckpt, &Device::Cpu, DType::F16).unwrap();
        let px = Tensor::randn(0f32, 1.0, (2, 3, 48, 48), &Device::Cpu).unwrap();
        let a = full.encode_images(&px).unwrap();
        let b = half.encode_images(&px).unwrap();
        assert_eq!(b.dtype(), DType::F32);
        let cos: Vec<f32> = (a * b).unwrap().sum(1).unwrap().to_vec1().unwrap();
        assert!(cos.iter().all(|&c| c > 0.999), "cosines {cos:?}");
    }

    #[test]
    fn q8_stays_close_to_f32() {
        let mut clip = small(Activation::QuickGelu);
        let px = Tensor::randn(0f32, 1.0, (2, 3, 48, 48), &Device::Cpu).unwrap();
        let full = clip.encode_images(&px).unwrap();
        clip.vision.set_quantized(true).unwrap();
        let low = clip.encode_images(&px).unwrap();
        let cos: Vec<f32> = (full * low).unwrap().sum(1).unwrap().to_vec1().unwrap();
        assert!(cos.iter().all(|&c| c > 0.995), "cosines {cos:?}");
        // Training-style (tracked) inputs cannot take the 8-bit path.
        let tracked = candle_core::Var::from_tensor(&px).unwrap();
        let err = clip.vision.forward(tracked.as_tensor()).unwrap_err();
        assert!(err.to_string().contains("no gradients"), "{err}");
    }

    /// The backbones other models bring (DFER-CLIP's ViT-B/32, Exp-CLIP's
    /// ViT-L/14 and L/14@336), scaled down with their geometry kept: patch
    /// 32 on a 2x2 grid, patch 14 on 3x3 and 6x6 grids (an input size that
    /// is no multiple of 16), head widths of 16 and 24. The fused f32 path
    /// must equal Candle's ops, and the 8-bit path stay close, on each.
    #[test]
    fn fused_paths_take_any_backbone_geometry() {
        for (image, patch, width, heads, layers) in
            [(64, 32, 48, 2, 2), (42, 14, 48, 3, 3), (84, 14, 64, 4, 2)]
        {
            let mut clip = model(
                (image, patch, width, heads, layers),
                Activation::QuickGelu,
                11,
            );
            let px = Tensor::randn(0f32, 1.0, (2, 3, image, image), &Device::Cpu).unwrap();
            let fast = clip.vision.forward_with(&px, true, true).unwrap();
            assert_eq!(fast.embedding.dims(), &[2, 32]);
            let tokens = (image / patch) * (image / patch) + 1;
            assert_eq!(
                fast.last_block_input.as_ref().unwrap().dims(),
                &[2, tokens, width]
            );
            clip.vision.backend = crate::model::vision::VisionBackend::Candle;
            let slow = clip.vision.forward_with(&px, true, true).unwrap();
            let d = max_diff(&fast.embedding, &slow.embedding);
            assert!(
                d < 1e-4,
                "patch {patch} on {image} px: embedding differs by {d}"
            );
            clip.vision.backend = crate::model::vision::VisionBackend::FusedF32;
            let full = clip.encode_images(&px).unwrap();
            clip.vision.set_quantized(true).unwrap();
            let low = clip.encode_images(&px).unwrap();
            let cos: Vec<f32> = (full * low).unwrap().sum(1).unwrap().to_vec1().unwrap();
            assert!(
                cos.iter().all(|&c| c > 0.99),
                "patch {patch}: q8 cosines {cos:?}"
            );
        }
    }

    /// `--precision auto` packs only a tower whose every block layer fits
    /// a fast kernel, and says what it runs; others stay in f32.
    #[test]
    fn auto_packs_only_towers_the_fast_kernels_fit() {
        let mut tiny = small(Activation::QuickGelu);
        assert_eq!(tiny.vision.pack_fastest().unwrap(), "f32");
        assert_eq!(tiny.vision.precision(), "f32");
        assert!(
            tiny.vision.kernel().starts_with("f32 "),
            "{}",
            tiny.vision.kernel()
        );
        // ViT-B/16's width (768 = 16 panels of 48, 3 groups of 256), one block.
        let mut wide = model((32, 16, 768, 12, 1), Activation::QuickGelu, 3);
        let px = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
        let full = wide.encode_images(&px).unwrap();
        let chosen = wide.vision.pack_fastest().unwrap();
        let kernel = wide.vision.kernel();
        let native_bf16 = super::onednn::native_bf16().unwrap_or(false);
        match (super::Isa::best(), chosen) {
            // Where bf16 is native the faster of the two is taken, timed.
            (Some(_), "bf16") if native_bf16 => {
                assert!(kernel.starts_with("bf16 onednn "), "{kernel}");
            }
            (Some(isa), "q8") => assert_eq!(kernel, format!("q8 {isa}")),
            (None, "f32") => {
                eprintln!("NOTICE: this CPU has no int8 kernel; auto stays in f32");
            }
            other => panic!("auto chose {other:?} (native bf16: {native_bf16}), kernel {kernel}"),
        }
        assert_eq!(wide.vision.precision(), chosen);
        let low = wide.encode_images(&px).unwrap();
        let cos: Vec<f32> = (full * low).unwrap().sum(1).unwrap().to_vec1().unwrap();
        assert!(cos.iter().all(|&c| c > 0.99), "{chosen} cosines {cos:?}");
    }

    /// The race `auto` runs where bf16 is native: both paths time the same
    /// one-block forward, and the times are real (positive, finite).
    #[test]
    fn the_precision_race_times_both_paths() {
        if !super::onednn::native_bf16().unwrap_or(false) {
            eprintln!("NOTICE: no native bf16 here (or no oneDNN): the q8/bf16 race is not run");
            return;
        }
        let Some(isa) = super::Isa::best() else {
            eprintln!("NOTICE: no int8 kernel here: the q8/bf16 race is not run");
            return;
        };
        let wide = model((32, 16, 768, 12, 1), Activation::QuickGelu, 3);
        let race = wide.vision.race_q8_bf16(isa).unwrap();
        for t in [race.q8_ms, race.bf16_ms] {
            assert!(t.is_finite() && t > 0.0, "{race:?}");
        }
    }

    /// oneDNN's products (f32, and bf16 where the CPU has it) against the
    /// f32 forward and Candle's op-by-op one, at several batch sizes, and
    /// with the f32 copies of the packed layers released.
    #[test]
    fn onednn_forwards_match_f32() {
        if let Err(e) = super::onednn::available() {
            eprintln!("NOTICE: oneDNN path skipped: {e}");
            return;
        }
        let bf16 = super::onednn::native_bf16().unwrap();
        if !bf16 {
            eprintln!("NOTICE: no native bf16 on this CPU: only oneDNN's f32 products are tested");
        }
        for act in [Activation::QuickGelu, Activation::GeluTanh] {
            let mut m = model((32, 16, 768, 12, 2), act, 9);
            for b in [1usize, 3] {
                let px = Tensor::randn(0f32, 1.0, (b, 3, 32, 32), &Device::Cpu).unwrap();
                m.vision.backend = super::super::vision::VisionBackend::Candle;
                let candle = m.encode_images(&px).unwrap();
                m.vision.backend = super::super::vision::VisionBackend::FusedF32;
                let full = m.encode_images(&px).unwrap();
                assert!(max_diff(&candle, &full) < 1e-4);
                m.vision.pack_onednn(super::onednn::DataType::F32).unwrap();
                assert!(
                    m.vision.kernel().starts_with("f32 onednn "),
                    "{}",
                    m.vision.kernel()
                );
                let f = m.encode_images(&px).unwrap();
                assert!(
                    max_diff(&full, &f) < 1e-4,
                    "onednn f32: {}",
                    max_diff(&full, &f)
                );
                if bf16 {
                    m.vision.pack_onednn(super::onednn::DataType::Bf16).unwrap();
                    assert_eq!(m.vision.precision(), "bf16");
                    let low = m.encode_images(&px).unwrap();
                    let cos: Vec<f32> = (full.clone() * low)
                        .unwrap()
                        .sum(1)
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    assert!(cos.iter().all(|&c| c > 0.995), "bf16 cosines {cos:?}");
                }
            }
            let px = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
            let before = m.encode_images(&px).unwrap();
            assert!(m.vision.release_f32_linears().unwrap() > 0);
            let after = m.encode_images(&px).unwrap();
            assert_eq!(max_diff(&before, &after), 0.0, "the same packed forward");
        }
    }

    /// `--precision f32`'s choices on the CPU: oneDNN's products, this
    /// crate's packed AVX2 kernel (each where this CPU runs it), with the
    /// f32 copies freed block by block, and the forward unchanged (the
    /// `gemm` crate's, from a tower that keeps its f32 weights).
    #[test]
    fn packed_f32_kernels_match_the_gemm_crate() {
        use super::super::vision::F32Kernel;
        let mut kernels = vec![];
        match super::onednn::available() {
            Ok(()) => kernels.push((F32Kernel::OneDnn, "f32 onednn ")),
            Err(e) => eprintln!("NOTICE: oneDNN's f32 products are not tested: {e}"),
        }
        if super::PackedF32::available() {
            kernels.push((F32Kernel::Packed, "f32 packed avx2-fma"));
        } else {
            eprintln!("NOTICE: the packed f32 kernel is not tested: this CPU lacks AVX2 or FMA");
        }
        for (kernel, name) in kernels {
            for act in [Activation::QuickGelu, Activation::GeluTanh] {
                let mut m = model((32, 16, 768, 12, 3), act, 11);
                let mut gemm = m.vision.clone();
                assert!(!gemm.pack_f32(F32Kernel::Gemm).unwrap());
                for b in [1usize, 3] {
                    let px = Tensor::randn(0f32, 1.0, (b, 3, 32, 32), &Device::Cpu).unwrap();
                    let full = gemm.forward(&px).unwrap();
                    if b == 1 {
                        assert!(m.vision.pack_f32(kernel).unwrap(), "{kernel:?}");
                        assert!(m.vision.kernel().starts_with(name), "{}", m.vision.kernel());
                        assert!(m.vision.f32_released());
                        assert_eq!(m.vision.release_f32_linears().unwrap(), 0, "already freed");
                    }
                    let f = m.vision.forward(&px).unwrap();
                    let d = max_diff(&full, &f);
                    assert!(d < 1e-4, "{kernel:?} {act:?} batch {b}: {d}");
                }
            }
        }
        // A tower whose layers do not fit the panels stays on the gemm crate.
        let mut m = small(Activation::QuickGelu);
        assert!(!m.vision.pack_f32(F32Kernel::Packed).unwrap());
        assert!(
            m.vision.kernel().starts_with("f32 "),
            "{}",
            m.vision.kernel()
        );
    }

    #[test]
    fn released_f32_weights_leave_the_8_bit_forward_and_the_maps_unchanged() {
        if super::Isa::best().is_none() {
            eprintln!("NOTICE: this CPU has no int8 kernel; nothing is released");
            return;
        }
        // Three blocks of ViT-B/16's width.
        let mut m = model((32, 16, 768, 12, 3), Activation::QuickGelu, 5);
        let px = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
        m.vision.quantize(None).unwrap();
        let before = m.encode_images(&px).unwrap();
        let one = px.narrow(0, 0, 1).unwrap();
        let text = crate::model::layers::l2_normalize(
            &Tensor::randn(0f32, 1.0, (4, m.config.embed_dim), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let target = crate::model::explain::Target::Class(1);
        let cam = |v: &super::VisionTower| {
            crate::model::explain::gradcam_map(v, &one, &text, target).unwrap()
        };
        let cam_before = cam(&m.vision);
        assert!(!m.vision.f32_released());
        let freed = m.vision.release_f32_linears().unwrap();
        // Two of the three blocks: 4 x 768^2 + 2 x 768 x 3072 values each.
        assert_eq!(freed, 2 * (4 * 768 * 768 + 2 * 768 * 3072));
        assert!(m.vision.f32_released());
        let after = m.encode_images(&px).unwrap();
        let diff = (before - after).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(
            diff.to_scalar::<f32>().unwrap(),
            0.0,
            "the same 8-bit forward"
        );
        let cam_after = cam(&m.vision);
        assert_eq!(
            cam_before.values, cam_after.values,
            "Grad-CAM runs the kept last block"
        );
        let back = m.vision.set_quantized(false).unwrap_err().to_string();
        assert!(back.contains("load the model again"), "{back}");
        assert_eq!(m.vision.release_f32_linears().unwrap(), 0, "released once");
    }
}
