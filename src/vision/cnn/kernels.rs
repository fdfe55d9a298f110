//! The arithmetic: convolutions (dense through `gemm` or a small-input
//! kernel, depthwise as a stencil, transposed as a product and a scatter),
//! with the bias and ReLU applied while each block is in cache.

use crate::parallel::SendPtr;
use rayon::prelude::*;

use super::{CnnError, Conv, FeatureMap, Inverted, Workspace, MAX_MAP};

/// Inner dimension up to which a 1x1 convolution runs on [`pointwise_cols`]
/// rather than `gemm`: with 16 to 64 input channels the product is a few
/// multiply-adds per output, and gemm's packing costs more than the
/// arithmetic (measured on CenterFace's 16 -> 96 layer at 240x320: 25 ms in
/// gemm on the 2-core AMD EPYC).
const SMALL_K: usize = 64;

/// Output columns per task of [`pointwise_cols`].
const POINTWISE_BLOCK: usize = 256;

/// [`pointwise_cols`] on a map of the caller's own.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn pointwise_block(
    dst: &mut [f32],
    w: &[f32],
    xs: &[f32],
    n: usize,
    c0: usize,
    len: usize,
    bias: &[f32],
    relu: bool,
) {
    // SAFETY: the whole of `dst` is this call's.
    unsafe { pointwise_cols(Cols::of(dst), w, xs, n, c0, len, bias, relu) }
}

/// An output map of which one task writes some columns of every row while
/// other tasks write the others: only the row spans a task writes are ever
/// borrowed, never the whole map.
#[derive(Clone, Copy)]
struct Cols {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: a `Cols` is only a pointer and a length; each task borrows only
// spans no other task touches (see [`Cols::span`]).
unsafe impl Send for Cols {}
unsafe impl Sync for Cols {}

impl Cols {
    fn of(map: &mut [f32]) -> Self {
        Self {
            ptr: map.as_mut_ptr(),
            len: map.len(),
        }
    }

    /// Values `at..at + len` of the map (bounds checked).
    ///
    /// # Safety
    /// No other thread reads or writes them while the span lives, and the
    /// map outlives it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn span<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        assert!(at.checked_add(len).is_some_and(|end| end <= self.len));
        std::slice::from_raw_parts_mut(self.ptr.add(at), len)
    }
}

/// `dst [m, n][.., c0..c0 + len] = bias + w [m, k] x xs [k, n][.., c0..c0 +
/// len]`, then the ReLU; `m` is `bias.len()`. Each value is summed in the same order on
/// every instruction set (the bias, then input channel by channel, no fused
/// multiply-add), so the maps do not depend on the CPU.
///
/// Tiles of `R` output channels by `C` columns stay in registers over all
/// `k` inputs: the first version added each input channel to a whole row
/// of 256 accumulators in L1, a load and a store per multiply-add, and was
/// 31% of CenterFace's live forward (`perf` of `examples/detect_loop`,
/// 2-core EPYC). The tiles write straight into the output map: the rows
/// of 256 sums were zeroed and copied out per task, `memset` and `memmove`
/// together 10% of that profile. Columns left over after the tiles (a map
/// of 10 x 14 leaves 12 after two tiles of 64): see [`pointwise_tiles`].
///
/// # Safety
/// Those columns of `dst`'s rows are the caller's alone for the call.
#[allow(clippy::too_many_arguments)]
unsafe fn pointwise_cols(
    dst: Cols,
    w: &[f32],
    xs: &[f32],
    n: usize,
    c0: usize,
    len: usize,
    bias: &[f32],
    relu: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx512(
            dst: Cols,
            w: &[f32],
            xs: &[f32],
            n: usize,
            c0: usize,
            len: usize,
            bias: &[f32],
            relu: bool,
        ) {
            // 16 zmm registers of sums.
            pointwise_tiles::<4, 64, true>(dst, w, xs, n, c0, len, bias, relu)
        }
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx2(
            dst: Cols,
            w: &[f32],
            xs: &[f32],
            n: usize,
            c0: usize,
            len: usize,
            bias: &[f32],
            relu: bool,
        ) {
            // 12 of the 16 ymm registers.
            pointwise_tiles::<4, 24, false>(dst, w, xs, n, c0, len, bias, relu)
        }
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            // SAFETY: the features were detected.
            return unsafe { avx512(dst, w, xs, n, c0, len, bias, relu) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected.
            return unsafe { avx2(dst, w, xs, n, c0, len, bias, relu) };
        }
    }
    // SAFETY: as for the caller.
    unsafe { pointwise_tiles::<2, 8, false>(dst, w, xs, n, c0, len, bias, relu) }
}

/// [`pointwise_cols`] in tiles of `R` x `C`, then the columns left over:
/// with `MASKED` (AVX-512 only) in tiles of 16 whose loads and stores are
/// masked past the last column, else in one more tile over a zero-padded
/// copy of their inputs; the output channels left over one at a time (the
/// same sums).
///
/// # Safety
/// As [`pointwise_cols`]; `MASKED` only where the CPU has AVX-512F.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pointwise_tiles<const R: usize, const C: usize, const MASKED: bool>(
    dst: Cols,
    w: &[f32],
    xs: &[f32],
    n: usize,
    c0: usize,
    len: usize,
    bias: &[f32],
    relu: bool,
) {
    let m = bias.len();
    let k = w.len() / m.max(1);
    assert!(c0 + len <= n && w.len() >= m * k);
    assert!(k == 0 || (k - 1) * n + c0 + len <= xs.len());
    let tiled_rows = m / R * R;
    let wide = len / C * C;
    // The last columns' inputs, `C` to a row, zeros past them.
    let padded: Vec<f32> = if wide < len && !MASKED {
        let mut p = vec![0f32; k * C];
        for (kk, row) in p.chunks_exact_mut(C).enumerate() {
            let from = kk * n + c0 + wide;
            row[..len - wide].copy_from_slice(&xs[from..from + len - wide]);
        }
        p
    } else {
        Vec::new()
    };
    for co in (0..tiled_rows).step_by(R) {
        let rows: [&[f32]; R] = std::array::from_fn(|r| &w[(co + r) * k..(co + r + 1) * k]);
        let bias = &bias[co..];
        // The tiles are called directly: a closure around them was compiled
        // apart from the caller's instruction set, and ran scalar. The
        // columns they write are the caller's.
        for c in (0..wide).step_by(C) {
            let at = c0 + c;
            pointwise_tile::<R, C>(dst, n, at, C, &rows, xs, n, at, bias, relu, co);
        }
        if wide == len {
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if MASKED {
            for c in (wide..len).step_by(16) {
                let (at, keep) = (c0 + c, (len - c).min(16));
                pointwise_tile16_avx512(dst, n, at, keep, &rows, xs, bias, relu, co);
            }
            continue;
        }
        let (at, keep) = (c0 + wide, len - wide);
        pointwise_tile::<R, C>(dst, n, at, keep, &rows, &padded, C, 0, bias, relu, co);
    }
    for co in tiled_rows..m {
        pointwise_row(dst, w, xs, n, c0, len, bias, relu, co);
    }
}

/// `R` output channels by `keep` (1 to 16) columns of [`pointwise_cols`],
/// from column `at` of `xs` (rows `n` apart) to the same columns of `dst`,
/// in AVX-512 registers with the loads and stores masked past `keep`, the
/// sums in the order of [`pointwise_tile`]. LLVM compiles that portable
/// tile at widths of 16 and 32 to scalar code (at 64 and 24 it
/// vectorises): the tiles past the last 64 columns were half the time of
/// the 64 -> 384 layer at 10 x 14 (`examples/detect_loop`, 2-core EPYC).
///
/// # Safety
/// The CPU has AVX-512F; the values written are the caller's alone.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn pointwise_tile16_avx512<const R: usize>(
    dst: Cols,
    n: usize,
    at: usize,
    keep: usize,
    rows: &[&[f32]; R],
    xs: &[f32],
    bias: &[f32],
    relu: bool,
    co: usize,
) {
    use std::arch::x86_64::*;
    let k = rows[0].len();
    assert!((1..=16).contains(&keep) && bias.len() >= R);
    assert!(rows.iter().all(|r| r.len() == k));
    assert!(k == 0 || (k - 1) * n + at + keep <= xs.len());
    let mask = (u32::MAX >> (32 - keep)) as __mmask16;
    let mut t = [_mm512_setzero_ps(); R];
    for r in 0..R {
        t[r] = _mm512_set1_ps(bias[r]);
    }
    for kk in 0..k {
        // SAFETY: the masked load reads only columns `at..at + keep` of
        // row `kk`, inside `xs` (asserted above).
        let x = _mm512_maskz_loadu_ps(mask, xs.as_ptr().add(kk * n + at));
        for r in 0..R {
            // SAFETY: every row holds `k` weights (asserted above).
            let wv = _mm512_set1_ps(*rows[r].get_unchecked(kk));
            t[r] = _mm512_add_ps(t[r], _mm512_mul_ps(wv, x));
        }
    }
    for (r, &sums) in t.iter().enumerate() {
        let v = if relu {
            _mm512_max_ps(sums, _mm512_setzero_ps())
        } else {
            sums
        };
        let out = dst.span((co + r) * n + at, keep);
        _mm512_mask_storeu_ps(out.as_mut_ptr(), mask, v);
    }
}

/// One `R` x `C` tile of [`pointwise_cols`]: output channels `co..co + R`
/// (weights `rows`, biases `bias[..R]`) from input columns `x0..x0 + C` of
/// `xs` (rows `xn` apart); the first `keep` columns go to `dst` (rows `ld`
/// apart) from column `at` on.
///
/// # Safety
/// Those values of `dst` are the caller's alone.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pointwise_tile<const R: usize, const C: usize>(
    dst: Cols,
    ld: usize,
    at: usize,
    keep: usize,
    rows: &[&[f32]; R],
    xs: &[f32],
    xn: usize,
    x0: usize,
    bias: &[f32],
    relu: bool,
    co: usize,
) {
    let mut t = [[0f32; C]; R];
    for r in 0..R {
        t[r] = [bias[r]; C];
    }
    for kk in 0..rows[0].len() {
        let x: &[f32; C] = xs[kk * xn + x0..][..C].try_into().expect("C values");
        for r in 0..R {
            let wv = rows[r][kk];
            for j in 0..C {
                t[r][j] += wv * x[j];
            }
        }
    }
    for (r, sums) in t.iter().enumerate() {
        let out = dst.span((co + r) * ld + at, keep);
        for (o, &v) in out.iter_mut().zip(sums) {
            *o = if relu { v.max(0.0) } else { v };
        }
    }
}

/// Output channel `co` of [`pointwise_cols`], columns `c0..c0 + len`.
///
/// # Safety
/// Those values of `dst` are the caller's alone.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pointwise_row(
    dst: Cols,
    w: &[f32],
    xs: &[f32],
    n: usize,
    c0: usize,
    len: usize,
    bias: &[f32],
    relu: bool,
    co: usize,
) {
    let k = w.len() / bias.len().max(1);
    let row = dst.span(co * n + c0, len);
    row.fill(bias[co]);
    for (kk, &wv) in w[co * k..(co + 1) * k].iter().enumerate() {
        let x = &xs[kk * n + c0..kk * n + c0 + len];
        for (a, &v) in row.iter_mut().zip(x) {
            *a += wv * v;
        }
    }
    if relu {
        row.iter_mut().for_each(|v| *v = v.max(0.0));
    }
}

/// A 1x1 convolution with few input channels: blocks of output columns in
/// parallel, each task writing its columns of every output row.
fn pointwise_small(dst: &mut [f32], w: &[f32], xs: &[f32], n: usize, bias: &[f32], relu: bool) {
    let m = bias.len();
    assert!(dst.len() >= m * n);
    let cols = Cols::of(dst);
    let blocks: Vec<usize> = (0..n).step_by(POINTWISE_BLOCK).collect();
    // SAFETY: each task writes only columns `c0..c0 + len` of each row.
    let run = |&c0: &usize| unsafe {
        pointwise_cols(cols, w, xs, n, c0, POINTWISE_BLOCK.min(n - c0), bias, relu)
    };
    if blocks.len() > 1 && rayon::current_num_threads() > 1 {
        blocks.par_iter().for_each(run);
    } else {
        blocks.iter().for_each(run);
    }
}

/// Columns of the output computed per task: a block of every output row
/// stays in the core's cache from the bias fill through the product to the
/// ReLU, instead of streaming a whole feature map three times.
const COLUMN_BLOCK: usize = 1024;

/// What a product adds to.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// `dst` is overwritten.
    Zero,
    /// `dst` starts as the bias of each row.
    Bias(&'a [f32]),
    /// `dst` keeps what it holds and the product is added to it.
    Dst,
}

/// `dst [m, n] = act(start + lhs [m, k] x rhs [k, n])`, row-major `dst` and
/// `rhs`, `lhs` with the given row and column strides; one task per block of
/// columns on rayon's current pool.
#[allow(clippy::too_many_arguments)]
fn conv_matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    start: Start,
    relu: bool,
) {
    assert!(dst.len() >= m * n && rhs.len() >= k * n);
    assert!(m == 0 || k == 0 || (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len());
    let dst_ptr = SendPtr(dst.as_mut_ptr());
    let blocks: Vec<(usize, usize)> = (0..n)
        .step_by(COLUMN_BLOCK)
        .map(|c0| (c0, (c0 + COLUMN_BLOCK).min(n)))
        .collect();
    let run = |&(c0, c1): &(usize, usize)| {
        let cols = c1 - c0;
        let base = dst_ptr.get();
        // SAFETY: the assertions above bound every access: `dst` and `rhs`
        // hold `m * n` and `k * n` values with row stride `n`, `lhs` covers
        // `m` rows and `k` columns at its strides. Each task touches only
        // columns `c0..c1` of `dst`, so tasks never overlap.
        unsafe {
            if let Start::Bias(b) = start {
                for (r, &v) in b.iter().enumerate().take(m) {
                    std::slice::from_raw_parts_mut(base.add(r * n + c0), cols).fill(v);
                }
            }
            gemm::gemm(
                m,
                cols,
                k,
                base.add(c0),
                1,
                n as isize,
                // Only from zero does the product overwrite `dst`.
                !matches!(start, Start::Zero),
                lhs.as_ptr(),
                lhs_cs as isize,
                lhs_rs as isize,
                rhs.as_ptr().add(c0),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
            if relu {
                for r in 0..m {
                    let row = std::slice::from_raw_parts_mut(base.add(r * n + c0), cols);
                    row.iter_mut().for_each(|v| *v = v.max(0.0));
                }
            }
        }
    };
    if blocks.len() > 1 && rayon::current_num_threads() > 1 {
        blocks.par_iter().for_each(run);
    } else {
        blocks.iter().for_each(run);
    }
}

impl Conv {
    pub(super) fn fold_affine(&mut self, scale: &[f32], shift: &[f32]) {
        let (kh, kw) = (self.kernel[0], self.kernel[1]);
        if self.transposed {
            // [in, out / g, kh, kw]: output channel = g * (out / g) + o.
            let per = self.out_ch / self.groups;
            let in_per = self.in_ch / self.groups;
            for ci in 0..self.in_ch {
                let g = ci / in_per;
                for o in 0..per {
                    let co = g * per + o;
                    let at = (ci * per + o) * kh * kw;
                    self.weight[at..at + kh * kw]
                        .iter_mut()
                        .for_each(|w| *w *= scale[co]);
                }
            }
        } else {
            let per = self.weight.len() / self.out_ch;
            for (row, &sc) in self.weight.chunks_exact_mut(per).zip(scale) {
                row.iter_mut().for_each(|w| *w *= sc);
            }
        }
        for ((b, &sc), &sh) in self.bias.iter_mut().zip(scale).zip(shift) {
            *b = *b * sc + sh;
        }
    }

    fn out_size(&self, h: usize, w: usize) -> Result<(usize, usize), CnnError> {
        self.out_size_held(h, w, self.out_ch)
    }

    /// The output size, where `channels` of it are held at once.
    fn out_size_held(
        &self,
        h: usize,
        w: usize,
        channels: usize,
    ) -> Result<(usize, usize), CnnError> {
        let dim = |i: usize, size: usize| -> Option<usize> {
            let span = self.dilation[i] * (self.kernel[i] - 1) + 1;
            let (p0, p1) = (self.pads[i], self.pads[i + 2]);
            if self.transposed {
                ((size - 1) * self.stride[i] + span + self.output_padding[i]).checked_sub(p0 + p1)
            } else {
                (size + p0 + p1)
                    .checked_sub(span)
                    .map(|v| v / self.stride[i] + 1)
            }
        };
        match (dim(0, h), dim(1, w)) {
            (Some(oh), Some(ow))
                if oh > 0
                    && ow > 0
                    && oh
                        .checked_mul(ow)
                        .and_then(|n| n.checked_mul(channels))
                        .is_some_and(|n| n <= MAX_MAP) =>
            {
                Ok((oh, ow))
            }
            _ => Err(CnnError::Input {
                got: [self.in_ch, h, w],
                expected:
                    "an image larger than the network's kernels, and feature maps under 1 GiB",
            }),
        }
    }

    pub(super) fn run(&self, x: &FeatureMap, ws: &mut Workspace) -> Result<FeatureMap, CnnError> {
        let (oh, ow) = self.out_size(x.h, x.w)?;
        let mut y = ws.map(self.out_ch, oh, ow);
        // Each kernel adds the bias and applies the ReLU while a block of its
        // output is in cache.
        if self.transposed {
            self.transposed_into(x, &mut y, ws);
        } else if self.groups == self.in_ch && self.groups == self.out_ch && self.groups > 1 {
            self.depthwise_into(x, &mut y);
        } else {
            self.dense_into(x, &mut y, ws);
        }
        Ok(y)
    }

    /// Grouped or full convolution: im2col per group, then a matrix product
    /// (a 1x1, stride-1 convolution reads the input directly).
    fn dense_into(&self, x: &FeatureMap, y: &mut FeatureMap, ws: &mut Workspace) {
        let cin_g = self.in_ch / self.groups;
        let cout_g = self.out_ch / self.groups;
        let (ip, op) = (x.h * x.w, y.h * y.w);
        for g in 0..self.groups {
            let xg = &x.data[g * cin_g * ip..(g + 1) * cin_g * ip];
            let dst = &mut y.data[g * cout_g * op..(g + 1) * cout_g * op];
            let rows = g * cout_g..(g + 1) * cout_g;
            self.dense_rows(xg, x.h, x.w, rows, dst, (y.h, y.w), ws);
        }
    }

    /// Output channels `rows` (of one group) of the convolution of that
    /// group's input planes `xg` (`ih x iw` each) into `dst` (`oh x ow`
    /// each). The im2col matrix is built for a band of output rows at a
    /// time, of at most `ws.im2col` values: whole for the live detector's
    /// maps, in bands for a still's first convolution.
    #[allow(clippy::too_many_arguments)]
    fn dense_rows(
        &self,
        xg: &[f32],
        ih: usize,
        iw: usize,
        rows: std::ops::Range<usize>,
        dst: &mut [f32],
        (oh, ow): (usize, usize),
        ws: &mut Workspace,
    ) {
        let (kh, kw) = (self.kernel[0], self.kernel[1]);
        let n = oh * ow;
        let k = (self.in_ch / self.groups) * kh * kw;
        let m = rows.len();
        let w = &self.weight[rows.start * k..rows.end * k];
        let bias = &self.bias[rows];
        let direct = kh == 1 && kw == 1 && self.stride == [1, 1] && self.pads == [0; 4];
        let band = if direct {
            oh
        } else {
            (ws.im2col / (k * ow).max(1)).clamp(1, oh)
        };
        let mut cols = if direct {
            Vec::new()
        } else {
            ws.take(k * band * ow)
        };
        // A band's product, where the band is not the whole map.
        let mut part = if band < oh {
            ws.take(m * band * ow)
        } else {
            Vec::new()
        };
        for oy0 in (0..oh).step_by(band) {
            let bn = band.min(oh - oy0) * ow;
            let rhs: &[f32] = if direct {
                xg
            } else {
                let cols = &mut cols[..k * bn];
                cols.par_chunks_mut(bn).enumerate().for_each(|(row, out)| {
                    let ci = row / (kh * kw);
                    let (ky, kx) = ((row / kw) % kh, row % kw);
                    let plane = &xg[ci * ih * iw..(ci + 1) * ih * iw];
                    self.im2col_row(plane, iw, ih, ky, kx, oy0, ow, out);
                });
                cols
            };
            let out: &mut [f32] = if band < oh {
                &mut part[..m * bn]
            } else {
                &mut *dst
            };
            if k <= SMALL_K {
                pointwise_small(out, w, rhs, bn, bias, self.relu);
            } else {
                conv_matmul(m, bn, k, out, w, k, 1, rhs, Start::Bias(bias), self.relu);
            }
            if band < oh {
                for (co, src) in part[..m * bn].chunks_exact(bn).enumerate() {
                    dst[co * n + oy0 * ow..co * n + oy0 * ow + bn].copy_from_slice(src);
                }
            }
        }
        ws.give(cols);
        ws.give(part);
    }

    /// One im2col row, tap (`ky`, `kx`) of one input `plane`, for output
    /// rows `oy0..` (as many as `out` holds).
    #[allow(clippy::too_many_arguments)]
    fn im2col_row(
        &self,
        plane: &[f32],
        iw: usize,
        ih: usize,
        ky: usize,
        kx: usize,
        oy0: usize,
        ow: usize,
        out: &mut [f32],
    ) {
        let sx = self.stride[1];
        let off = (kx * self.dilation[1]) as isize - self.pads[1] as isize;
        // Output columns whose input column is inside the row.
        let lo = if off < 0 {
            ((-off) as usize).div_ceil(sx)
        } else {
            0
        };
        let hi = if (iw as isize) > off {
            ((iw as isize - off - 1) as usize / sx + 1).min(ow)
        } else {
            0
        };
        for (r, dst) in out.chunks_exact_mut(ow).enumerate() {
            let oy = oy0 + r;
            let iy = (oy * self.stride[0] + ky * self.dilation[0]) as isize - self.pads[0] as isize;
            if iy < 0 || iy >= ih as isize || lo >= hi {
                dst.fill(0.0);
                continue;
            }
            let src = &plane[iy as usize * iw..(iy as usize + 1) * iw];
            dst[..lo].fill(0.0);
            dst[hi..].fill(0.0);
            let start = ((lo * sx) as isize + off) as usize;
            if sx == 1 {
                dst[lo..hi].copy_from_slice(&src[start..start + hi - lo]);
            } else {
                for (j, d) in dst[lo..hi].iter_mut().enumerate() {
                    *d = src[start + j * sx];
                }
            }
        }
    }

    /// One filter per channel: a direct stencil, one channel per task.
    fn depthwise_into(&self, x: &FeatureMap, y: &mut FeatureMap) {
        self.depthwise_channels(&x.data, x.w, x.h, 0, &mut y.data, y.w, y.h);
    }

    /// Channels `ch0..` of a depthwise convolution: `planes` holds their
    /// input planes (`iw x ih` each), `out` their output planes.
    #[allow(clippy::too_many_arguments)]
    fn depthwise_channels(
        &self,
        planes: &[f32],
        iw: usize,
        ih: usize,
        ch0: usize,
        out: &mut [f32],
        ow: usize,
        oh: usize,
    ) {
        let fast = self.kernel == [3, 3]
            && self.dilation == [1, 1]
            && self.pads == [1; 4]
            && (self.stride == [1, 1] || self.stride == [2, 2]);
        out.par_chunks_mut(oh * ow)
            .zip(planes.par_chunks(ih * iw))
            .enumerate()
            .for_each_init(Vec::new, |pad, (i, (out, plane))| {
                let ch = ch0 + i;
                let k = self.kernel[0] * self.kernel[1];
                let w = &self.weight[ch * k..(ch + 1) * k];
                if fast {
                    let (bias, relu) = (self.bias[ch], self.relu);
                    let s = self.stride[0];
                    depthwise3x3(plane, iw, ih, w, s, bias, relu, out, ow, oh, pad);
                    return;
                }
                out.fill(self.bias[ch]);
                self.depthwise_plane(plane, iw, ih, w, out, ow, oh);
                if self.relu {
                    out.iter_mut().for_each(|v| *v = v.max(0.0));
                }
            });
    }

    /// A 1x1, stride-1, unpadded, ungrouped convolution.
    pub(super) fn is_pointwise(&self) -> bool {
        self.is_full() && self.kernel == [1, 1] && self.stride == [1, 1] && self.pads == [0; 4]
    }

    /// An ungrouped, not transposed convolution.
    pub(super) fn is_full(&self) -> bool {
        !self.transposed && self.groups == 1
    }

    /// One filter per channel.
    pub(super) fn is_depthwise(&self) -> bool {
        !self.transposed
            && self.groups > 1
            && self.groups == self.in_ch
            && self.groups == self.out_ch
    }

    /// Any kernel, stride, padding and dilation, one plane.
    #[allow(clippy::too_many_arguments)]
    fn depthwise_plane(
        &self,
        plane: &[f32],
        iw: usize,
        ih: usize,
        w: &[f32],
        out: &mut [f32],
        ow: usize,
        oh: usize,
    ) {
        let (kh, kw) = (self.kernel[0], self.kernel[1]);
        let [sy, sx] = self.stride;
        let [dy, dx] = self.dilation;
        let (pt, pl) = (self.pads[0] as isize, self.pads[1] as isize);
        for oy in 0..oh {
            for ky in 0..kh {
                let iy = (oy * sy + ky * dy) as isize - pt;
                if iy < 0 || iy >= ih as isize {
                    continue;
                }
                let src = &plane[iy as usize * iw..(iy as usize + 1) * iw];
                for kx in 0..kw {
                    let wv = w[ky * kw + kx];
                    for (ox, d) in out[oy * ow..(oy + 1) * ow].iter_mut().enumerate() {
                        let ix = (ox * sx + kx * dx) as isize - pl;
                        if ix >= 0 && ix < iw as isize {
                            *d += wv * src[ix as usize];
                        }
                    }
                }
            }
        }
    }
    /// Transposed convolution: the matrix product `W^T x` gives each input
    /// pixel's contribution to every kernel tap, which is then added into place.
    fn transposed_into(&self, x: &FeatureMap, y: &mut FeatureMap, ws: &mut Workspace) {
        let (kh, kw) = (self.kernel[0], self.kernel[1]);
        let n = x.h * x.w;
        let cin_g = self.in_ch / self.groups;
        let cout_g = self.out_ch / self.groups;
        let rows = cout_g * kh * kw;
        let mut cols = ws.take(rows * n);
        for g in 0..self.groups {
            // Weight [in, out/g, kh, kw] of this group, read as [cin_g, rows]
            // and used transposed: lhs [rows, cin_g].
            let w = &self.weight[g * cin_g * rows..(g + 1) * cin_g * rows];
            let xg = &x.data[g * cin_g * n..(g + 1) * cin_g * n];
            conv_matmul(
                rows,
                n,
                cin_g,
                &mut cols,
                w,
                1,
                rows,
                xg,
                Start::Zero,
                false,
            );
            let (oh, ow) = (y.h, y.w);
            let out = &mut y.data[g * cout_g * oh * ow..(g + 1) * cout_g * oh * ow];
            out.par_chunks_mut(oh * ow)
                .enumerate()
                .for_each(|(co, plane)| {
                    plane.fill(self.bias[g * cout_g + co]);
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let row = &cols[((co * kh + ky) * kw + kx) * n..][..n];
                            for iy in 0..x.h {
                                let oy = (iy * self.stride[0] + ky * self.dilation[0]) as isize
                                    - self.pads[0] as isize;
                                if oy < 0 || oy >= oh as isize {
                                    continue;
                                }
                                for ix in 0..x.w {
                                    let ox = (ix * self.stride[1] + kx * self.dilation[1]) as isize
                                        - self.pads[1] as isize;
                                    if ox >= 0 && ox < ow as isize {
                                        plane[oy as usize * ow + ox as usize] += row[iy * x.w + ix];
                                    }
                                }
                            }
                        }
                    }
                    if self.relu {
                        plane.iter_mut().for_each(|v| *v = v.max(0.0));
                    }
                });
        }
        ws.give(cols);
    }
}

multiversion! {
    /// A 3x3 depthwise filter with padding 1 and stride 1 or 2 over one
    /// plane, from the bias to the ReLU. The plane is first copied inside a
    /// border of zeros (stride 2: its even and odd columns apart), so every
    /// output column has all nine taps and each output row is a run of
    /// blocks of `L` columns in registers, the last block of a row running
    /// on into the next (whose own blocks then overwrite it) and that of
    /// the last row cut short. A value starts at the bias and adds each
    /// input row's taps as `(w0 l + w1 c) + w2 r` (stride 2: `w1 c`, `w2
    /// r`, `w0 l` one at a time), the order of the first version, which ran
    /// a pass over the output per tap row; the zeros of the border add
    /// nothing but may turn a zero's sign. The version before this one
    /// handled the borders apart, one column at a time: on the small maps
    /// of the network's deep layers (14 and 7 columns) those were most of
    /// the work (`examples/detect_loop` at the live size: 2.1 ms of 8 in
    /// depthwise filters, 2-core EPYC). `pad` is scratch kept by the caller.
    #[allow(clippy::too_many_arguments)]
    pub fn depthwise3x3(
        plane: &[f32],
        iw: usize,
        ih: usize,
        w: &[f32],
        stride: usize,
        bias: f32,
        relu: bool,
        out: &mut [f32],
        ow: usize,
        oh: usize,
        pad: &mut Vec<f32>
    ) {
        const L: usize = 16;
        assert!(plane.len() >= iw * ih && out.len() >= ow * oh && w.len() >= 9);
        assert!(oh == ih.div_ceil(stride) && ow == iw.div_ceil(stride));
        let out = &mut out[..ow * oh];
        let taps = [[w[0], w[1], w[2]], [w[3], w[4], w[5]], [w[6], w[7], w[8]]];
        if stride == 1 {
            // Padded rows `pw` apart; room past the end for the last
            // block's reads.
            let pw = iw + 2;
            let need = (ih + 2) * pw + L;
            if pad.len() < need {
                pad.resize(need, 0.0);
            }
            let p = &mut pad[..need];
            p[..pw].fill(0.0);
            for (r, src) in plane.chunks_exact(iw).take(ih).enumerate() {
                let row = &mut p[(r + 1) * pw..(r + 2) * pw];
                row[0] = 0.0;
                row[1..=iw].copy_from_slice(src);
                row[iw + 1] = 0.0;
            }
            p[(ih + 1) * pw..].fill(0.0);
            let p = &*p;
            for oy in 0..oh {
                for x in (0..ow).step_by(L) {
                    let mut v = [bias; L];
                    for (ky, &[w0, w1, w2]) in taps.iter().enumerate() {
                        let r: &[f32; L + 2] =
                            p[(oy + ky) * pw + x..][..L + 2].try_into().expect("block");
                        for j in 0..L {
                            v[j] += (w0 * r[j] + w1 * r[j + 1]) + w2 * r[j + 2];
                        }
                    }
                    store(out, oy * ow + x, &v, relu);
                }
            }
            return;
        }
        // Stride 2: padded row `r` split into `e` (padded columns 0, 2, ..,
        // 2 ow) and `o` (1, 3, .., 2 ow + 1), `q` apart: output column `x`
        // reads `e[x]`, `o[x]` and `e[x + 1]`.
        let q = ow + 1;
        let rows = 2 * oh + 1;
        let half = rows * q + L;
        if pad.len() < 2 * half {
            pad.resize(2 * half, 0.0);
        }
        let (e, o) = pad[..2 * half].split_at_mut(half);
        for r in 0..rows {
            let (er, or) = (&mut e[r * q..(r + 1) * q], &mut o[r * q..(r + 1) * q]);
            if r == 0 || r > ih {
                er.fill(0.0);
                or.fill(0.0);
                continue;
            }
            // Input column `2 j` is `or[j]`, `2 j + 1` is `er[j + 1]`.
            let src = &plane[(r - 1) * iw..r * iw];
            let pairs = iw / 2;
            er[0] = 0.0;
            for ((pair, ov), ev) in src.chunks_exact(2).zip(or.iter_mut()).zip(&mut er[1..]) {
                *ov = pair[0];
                *ev = pair[1];
            }
            if iw % 2 == 1 {
                or[pairs] = src[iw - 1];
            }
            er[pairs + 1..].fill(0.0);
            or[iw.div_ceil(2)..].fill(0.0);
        }
        e[rows * q..].fill(0.0);
        o[rows * q..].fill(0.0);
        let (e, o) = (&*e, &*o);
        for oy in 0..oh {
            for x in (0..ow).step_by(L) {
                let mut v = [bias; L];
                for (ky, &[w0, w1, w2]) in taps.iter().enumerate() {
                    let at = (2 * oy + ky) * q + x;
                    let er: &[f32; L + 1] = e[at..][..L + 1].try_into().expect("block");
                    let or: &[f32; L] = o[at..][..L].try_into().expect("block");
                    for j in 0..L {
                        v[j] += w1 * or[j];
                        v[j] += w2 * er[j + 1];
                        v[j] += w0 * er[j];
                    }
                }
                store(out, oy * ow + x, &v, relu);
            }
        }
    }
}

/// Output values `at..at + L` of a [`depthwise3x3`] plane, or to its end
/// (a function, not a closure: closures are compiled apart from the
/// instruction set of the kernel that calls them, and ran scalar).
#[inline(always)]
fn store<const L: usize>(out: &mut [f32], at: usize, v: &[f32; L], relu: bool) {
    if at + L <= out.len() {
        let o: &mut [f32; L] = (&mut out[at..at + L]).try_into().expect("block");
        for j in 0..L {
            o[j] = act(v[j], relu);
        }
    } else {
        for (o, &x) in out[at..].iter_mut().zip(v) {
            *o = act(x, relu);
        }
    }
}

#[inline(always)]
fn act(v: f32, relu: bool) -> f32 {
    if relu {
        v.max(0.0)
    } else {
        v
    }
}

impl Inverted {
    /// Runs the three steps, holding at most `ws.expanded_block` values of
    /// expanded map.
    pub(super) fn run(&self, x: &FeatureMap, ws: &mut Workspace) -> Result<FeatureMap, CnnError> {
        let (e, d) = (&self.expand, &self.depthwise);
        let c = e.out_ch;
        let (eh, ew) = e.out_size_held(x.h, x.w, 1)?;
        let n = eh * ew;
        let (oh, ow) = d.out_size(eh, ew)?;
        let block = (ws.expanded_block / n.max(1)).clamp(1, c);
        if block == c {
            // Small maps: step by step, as unfused.
            let expanded = e.run(x, ws)?;
            let dw = d.run(&expanded, ws)?;
            ws.give(expanded.data);
            return match &self.project {
                Some(p) => {
                    let y = p.run(&dw, ws);
                    ws.give(dw.data);
                    y
                }
                None => Ok(dw),
            };
        }
        if let Some(p) = &self.project {
            p.out_size(oh, ow)?;
        }
        let no = oh * ow;
        let mut y = match &self.project {
            Some(p) => ws.map(p.out_ch, oh, ow),
            None => ws.map(c, oh, ow),
        };
        let mut expanded = ws.take(block * n);
        let mut dw = if self.project.is_some() {
            ws.take(block * no)
        } else {
            Vec::new()
        };
        for c0 in (0..c).step_by(block) {
            let c1 = (c0 + block).min(c);
            let nb = c1 - c0;
            e.dense_rows(
                &x.data,
                x.h,
                x.w,
                c0..c1,
                &mut expanded[..nb * n],
                (eh, ew),
                ws,
            );
            match &self.project {
                None => {
                    let out = &mut y.data[c0 * no..c1 * no];
                    d.depthwise_channels(&expanded[..nb * n], ew, eh, c0, out, ow, oh);
                }
                Some(p) => {
                    let out = &mut dw[..nb * no];
                    d.depthwise_channels(&expanded[..nb * n], ew, eh, c0, out, ow, oh);
                    // The projection sums over the expanded channels: add
                    // this block's share.
                    let start = if c0 == 0 {
                        Start::Bias(&p.bias)
                    } else {
                        Start::Dst
                    };
                    let w = &p.weight[c0..];
                    conv_matmul(
                        p.out_ch,
                        no,
                        nb,
                        &mut y.data,
                        w,
                        p.in_ch,
                        1,
                        out,
                        start,
                        false,
                    );
                }
            }
        }
        if self.project.as_ref().is_some_and(|p| p.relu) {
            y.data.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        ws.give(expanded);
        ws.give(dw);
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values with enough spread that a change in the order of the sums
    /// shows in the last bits, negative ones for the ReLU.
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 997.0 - 1.0)
            .map(|v| v * (1.0 + v * v * 13.7))
            .collect()
    }

    /// The first version's 1x1 kernel: a row of sums per output channel,
    /// each input channel added to it in turn.
    fn pointwise_by_rows(
        w: &[f32],
        xs: &[f32],
        n: usize,
        c0: usize,
        len: usize,
        bias: &[f32],
        relu: bool,
    ) -> Vec<f32> {
        let m = bias.len();
        let k = w.len() / m;
        let mut acc = vec![0f32; m * len];
        for (co, row) in acc.chunks_exact_mut(len).enumerate() {
            row.fill(bias[co]);
            for (kk, &wv) in w[co * k..(co + 1) * k].iter().enumerate() {
                for (a, &v) in row.iter_mut().zip(&xs[kk * n + c0..kk * n + c0 + len]) {
                    *a += wv * v;
                }
            }
            if relu {
                row.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
        acc
    }

    /// The register tiles give every value of the row-at-a-time kernel, to
    /// the bit, whatever the channels and columns left over, and write no
    /// column outside their block.
    #[test]
    fn pointwise_tiles_give_the_sums_of_the_row_kernel() {
        for (m, k) in [(1, 1), (3, 5), (4, 16), (7, 24), (96, 16), (9, 64), (5, 0)] {
            for len in [1, 7, 12, 16, 24, 63, 64, 65, 100, 140, 256] {
                let (c0, n) = (3, len + 11);
                let w = values(m * k, 1);
                let xs = values(k.max(1) * n, 2);
                let bias = values(m, 3);
                for relu in [false, true] {
                    let want = pointwise_by_rows(&w, &xs, n, c0, len, &bias, relu);
                    let mut got = vec![f32::NAN; m * n];
                    pointwise_block(&mut got, &w, &xs, n, c0, len, &bias, relu);
                    for (co, row) in got.chunks_exact(n).enumerate() {
                        let same = want[co * len..(co + 1) * len]
                            .iter()
                            .zip(&row[c0..c0 + len])
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "m {m}, k {k}, len {len}, relu {relu}, row {co}");
                        let outside = row[..c0].iter().chain(&row[c0 + len..]);
                        assert!(
                            outside.clone().all(|v| v.is_nan()),
                            "row {co} written outside"
                        );
                    }
                }
            }
        }
    }

    /// The first version's 3x3 depthwise filter: the bias, then a pass per
    /// tap row over the output (stride 2 as three passes of even and odd
    /// columns), then the ReLU.
    #[allow(clippy::too_many_arguments)]
    fn depthwise_by_passes(
        plane: &[f32],
        iw: usize,
        ih: usize,
        w: &[f32],
        stride: usize,
        bias: f32,
        relu: bool,
        ow: usize,
        oh: usize,
    ) -> Vec<f32> {
        let mut out = vec![bias; ow * oh];
        for oy in 0..oh {
            let dst = &mut out[oy * ow..(oy + 1) * ow];
            for ky in 0..3 {
                let iy = (oy * stride + ky) as isize - 1;
                if iy < 0 || iy >= ih as isize {
                    continue;
                }
                let row = &plane[iy as usize * iw..(iy as usize + 1) * iw];
                let (w0, w1, w2) = (w[ky * 3], w[ky * 3 + 1], w[ky * 3 + 2]);
                if stride == 1 {
                    if iw == 1 {
                        dst[0] += w1 * row[0];
                        continue;
                    }
                    for x in 1..iw - 1 {
                        dst[x] += w0 * row[x - 1] + w1 * row[x] + w2 * row[x + 1];
                    }
                    dst[0] += w1 * row[0] + w2 * row[1];
                    dst[iw - 1] += w0 * row[iw - 2] + w1 * row[iw - 1];
                } else {
                    let even: Vec<f32> = row.iter().step_by(2).copied().collect();
                    let odd: Vec<f32> = row.iter().skip(1).step_by(2).copied().collect();
                    for (d, &e) in dst.iter_mut().zip(&even) {
                        *d += w1 * e;
                    }
                    for (d, &o) in dst.iter_mut().zip(&odd) {
                        *d += w2 * o;
                    }
                    if ow > 1 {
                        for (d, &o) in dst[1..].iter_mut().zip(&odd) {
                            *d += w0 * o;
                        }
                    }
                }
            }
        }
        if relu {
            out.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        out
    }

    /// The padded planes give the sums of a pass per tap row, to the bit
    /// but for the sign of a zero, on planes from 1x1 up, odd and even, at
    /// both strides, with scratch left over from other sizes.
    #[test]
    fn depthwise_rows_on_a_padded_plane_give_the_sums_of_a_pass_per_tap() {
        let w = values(9, 4);
        let mut pad = Vec::new();
        for ih in [1, 2, 3, 4, 5, 10, 13] {
            for iw in [
                1, 2, 3, 4, 5, 7, 14, 16, 17, 18, 28, 33, 34, 35, 40, 50, 56, 67,
            ] {
                let plane = values(iw * ih, ih + iw);
                for stride in [1, 2] {
                    let (oh, ow) = ((ih - 1) / stride + 1, (iw - 1) / stride + 1);
                    for relu in [false, true] {
                        let want =
                            depthwise_by_passes(&plane, iw, ih, &w, stride, 0.25, relu, ow, oh);
                        let mut got = vec![f32::NAN; ow * oh];
                        let (p, s) = (&plane, stride);
                        depthwise3x3(p, iw, ih, &w, s, 0.25, relu, &mut got, ow, oh, &mut pad);
                        let same = want
                            .iter()
                            .zip(&got)
                            .all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0));
                        assert!(
                            same,
                            "{iw}x{ih}, stride {stride}, relu {relu}: {want:?} vs {got:?}"
                        );
                    }
                }
            }
        }
    }
}
