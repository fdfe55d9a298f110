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
//! place from the tower's tensors. With [`QuantizedLinears`] (`packed`) the
//! transformer's linear layers run packed kernels chosen at load instead:
//! this crate's 8-bit ones (`--precision q8`), oneDNN's bf16 or f32, or this
//! crate's AVX2 f32 one.

use crate::parallel::SendPtr;
use candle_core::{DType, Device, Module, Result, Storage, Tensor};
use candle_nn::Linear;
use rayon::prelude::*;

use super::config::Activation;
use super::gemm_f32;
use super::gemm_i8::{self, QuantizedRows};
use super::layers::LayerNorm;
use super::onednn::{self, Bf16Rows, Int8Output, Int8Rows};
use super::scratch::Pool;
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
    /// The layer as one of oneDNN's 8-bit products, which take rows
    /// quantized beforehand ([`onednn::Int8Rows`]).
    fn onednn_int8(&self) -> Option<&onednn::Linear> {
        match self.quantized {
            Some(QuantizedLinear::OneDnn(w)) if w.dtype() == onednn::DataType::Int8 => Some(w),
            _ => None,
        }
    }

    /// The layer as one of oneDNN's bf16 products, which take rows rounded
    /// beforehand ([`onednn::Bf16Rows`]).
    fn onednn_bf16(&self) -> Option<&onednn::Linear> {
        match self.quantized {
            Some(QuantizedLinear::OneDnn(w)) if w.dtype() == onednn::DataType::Bf16 => Some(w),
            _ => None,
        }
    }

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

mod attention;
mod packed;
mod simd;
#[cfg(test)]
mod tests;

pub use attention::{AttentionKernel, AttentionKernelError};
use packed::QuantizedLinear;
pub use packed::QuantizedLinears;

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

impl BlockView<'_> {
    /// q, k and v of `h` [m, d] side by side into `qkv` [m, 3d]; `h` is
    /// quantized (8-bit) or rounded (bf16) once for the three on oneDNN's
    /// products.
    fn qkv_apply(&self, h: &[f32], m: usize, qkv: &mut [f32]) -> Result<()> {
        let d = self.out.n;
        if let [Some(q), Some(k), Some(v)] = self.qkv.each_ref().map(|l| l.onednn_int8()) {
            let hq = Int8Rows::new(h, m, d);
            for (j, w) in [q, k, v].into_iter().enumerate() {
                let dst = &mut qkv[j * d..];
                w.apply_int8_rows(
                    &hq,
                    Int8Output::Rows {
                        dst,
                        rs: 3 * d,
                        add: false,
                    },
                )
                .map_err(candle_core::Error::wrap)?;
            }
            return Ok(());
        }
        if let [Some(q), Some(k), Some(v)] = self.qkv.each_ref().map(|l| l.onednn_bf16()) {
            let hb = Bf16Rows::new(h, m, d);
            for (j, w) in [q, k, v].into_iter().enumerate() {
                w.apply_bf16_rows(&hb, &mut qkv[j * d..], 3 * d, false)
                    .map_err(candle_core::Error::wrap)?;
            }
            return Ok(());
        }
        let hq = self.qkv[0].quantize_input(h, m);
        for (j, lin) in self.qkv.iter().enumerate() {
            lin.apply(h, hq.as_ref(), m, &mut qkv[j * d..], 3 * d, false)?;
        }
        Ok(())
    }

    /// Attention of `h` [b * t, d] into `att` when q, k and v are oneDNN's
    /// 8-bit products and attention runs in bf16: the products' rows go
    /// from their sums straight to attention's bf16 operands
    /// ([`Int8Output::Bf16Heads`]), never stored as f32 q/k/v rows to be
    /// read and rounded again (the same values). `false`: not this path,
    /// or its bf16 products could not be made (the caller runs the usual
    /// one, which says so).
    fn attend_from_int8(
        &self,
        h: &[f32],
        (b, t): (usize, usize),
        kernel: attention::AttentionKernel,
        att: &mut [f32],
    ) -> Result<bool> {
        let [Some(q), Some(k), Some(v)] = self.qkv.each_ref().map(|l| l.onednn_int8()) else {
            return Ok(false);
        };
        if kernel != attention::AttentionKernel::OneDnnBf16 {
            return Ok(false);
        }
        let (d, heads, m) = (self.out.n, self.heads, b * t);
        let scales = [attention::query_scale(d / heads), 1.0, 1.0];
        let hq = Int8Rows::new(h, m, d);
        let mut ops = attention::operand_buffers(m * d);
        for ((w, dst), scale) in [q, k, v].into_iter().zip(ops.iter_mut()).zip(scales) {
            let out = Int8Output::Bf16Heads {
                dst,
                tokens: t,
                heads,
                scale,
            };
            w.apply_int8_rows(&hq, out)
                .map_err(candle_core::Error::wrap)?;
        }
        let [qb, kb, vb] = &ops;
        Ok(attention::attend_bf16_heads([qb, kb, vb], att, b, t, d, heads).is_ok())
    }

    /// The MLP of `h` [m, d] added to the residual stream `x` [m, d]; `f`
    /// [m, hidden] is its work buffer. On oneDNN's 8-bit products fc1's
    /// rows go from its sums through the activation to fc2's codes one row
    /// at a time; on its bf16 ones the activation and the rounding for fc2
    /// are one pass (the same values as the passes below, to the bit).
    fn mlp_apply(&self, h: &[f32], m: usize, f: &mut [f32], x: &mut [f32]) -> Result<()> {
        let (d, hidden) = (self.fc1.k, self.fc1.n);
        if let (Some(fc1), Some(fc2)) = (self.fc1.onednn_int8(), self.fc2.onednn_int8()) {
            let act = self.act;
            let hq = Int8Rows::new(h, m, d);
            let mut fq = Int8Rows::unset(m, hidden);
            let next = Int8Output::Activated {
                act: &|y: &mut [f32]| activate_row(y, act),
                next: &mut fq,
            };
            fc1.apply_int8_rows(&hq, next)
                .map_err(candle_core::Error::wrap)?;
            drop(hq);
            let dst = Int8Output::Rows {
                dst: x,
                rs: d,
                add: true,
            };
            return fc2
                .apply_int8_rows(&fq, dst)
                .map_err(candle_core::Error::wrap);
        }
        if let (Some(fc1), Some(fc2)) = (self.fc1.onednn_bf16(), self.fc2.onednn_bf16()) {
            let act = self.act;
            let hb = Bf16Rows::new(h, m, d);
            fc1.apply_bf16_rows(&hb, f, hidden, false)
                .map_err(candle_core::Error::wrap)?;
            drop(hb);
            let fb = Bf16Rows::activated(f, m, hidden, &|y: &mut [f32]| activate_row(y, act));
            return fc2
                .apply_bf16_rows(&fb, x, d, true)
                .map_err(candle_core::Error::wrap);
        }
        self.fc1.apply(h, None, m, f, hidden, false)?;
        activate(f, self.act);
        self.fc2.apply(f, None, m, x, d, true)
    }
}

/// Work buffers kept between forwards: fresh multi-megabyte allocations
/// would be returned to the OS and page-faulted (and zeroed) again on every
/// frame, which costs several percent of a forward. Every caller writes
/// the whole buffer before reading it, so stale values may stay.
static SCRATCH: Pool<f32> = Pool::new();

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
    let attention_kernel = tower
        .backend
        .quantized()
        .map_or(attention::AttentionKernel::F32, |q| q.attention);
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
    let mut cols = SCRATCH.take(b * g * g * kdim);
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
    let mut x = SCRATCH.take(m * d); // [B*T, D] residual stream
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
    drop(cols);
    let mut h = SCRATCH.take(m * d);
    pre_ln.apply(&x, &mut h, d);
    std::mem::swap(&mut x, &mut h);

    let hidden = cfg.mlp;
    let mut qkv = SCRATCH.take(m * 3 * d);
    let mut att = SCRATCH.take(m * d);
    let mut f = SCRATCH.take(m * hidden);
    let mut layer_cls = Vec::new();
    let mut last_block_input = None;
    let n_layers = views.len();
    for (li, blk) in views.iter().enumerate() {
        if want_last_input && li + 1 == n_layers {
            last_block_input = Some(Tensor::from_slice(&x, (b, t, d), &Device::Cpu)?);
        }
        blk.ln1.apply(&x, &mut h, d);
        if !blk.attend_from_int8(&h, (b, t), attention_kernel, &mut att)? {
            blk.qkv_apply(&h, m, &mut qkv)?;
            attention::attend(attention_kernel, &qkv, &mut att, b, t, d, blk.heads)?;
        }
        blk.out.apply(&att, None, m, &mut x, d, true)?;
        blk.ln2.apply(&x, &mut h, d);
        blk.mlp_apply(&h, m, &mut f, &mut x)?;
        if want_layer_cls {
            layer_cls.push(Tensor::from_vec(
                cls_rows(&x, b, t, d),
                (b, d),
                &Device::Cpu,
            )?);
        }
    }
    let cls = cls_rows(&x, b, t, d);
    drop((x, h, qkv, att, f));
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
    let mut r = SCRATCH.take(m * d);
    let src = xin.slice();
    for bi in 0..b {
        r[bi * p * d..(bi + 1) * p * d].copy_from_slice(&src[(bi * t + 1) * d..(bi + 1) * t * d]);
    }
    let mut h = SCRATCH.take(m * d);
    let mut v = SCRATCH.take(m * d);
    blk.ln1.apply(&r, &mut h, d);
    blk.qkv[2].apply(&h, None, m, &mut v, d, false)?;
    blk.out.apply(&v, None, m, &mut r, d, true)?;
    blk.ln2.apply(&r, &mut h, d);
    let hidden = blk.fc1.n;
    let mut f = SCRATCH.take(m * hidden);
    blk.mlp_apply(&h, m, &mut f, &mut r)?;
    post_ln.apply(&r, &mut h, d);
    let e = proj.n;
    let mut out = vec![0f32; m * e];
    proj.apply(&h, None, m, &mut out, e, false)?;
    drop((r, h, v, f));
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

fn activate(x: &mut [f32], act: Activation) {
    x.par_chunks_mut(16 * 1024)
        .for_each(|c| activate_row(c, act));
}

/// The activation of each value of `x` (elementwise, so any split of a
/// buffer gives the same values).
fn activate_row(x: &mut [f32], act: Activation) {
    match act {
        Activation::QuickGelu => simd::quick_gelu_in_place(x),
        Activation::Gelu => simd::gelu_erf_in_place(x),
        Activation::GeluTanh => simd::gelu_tanh_in_place(x),
    }
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
