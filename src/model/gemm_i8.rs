//! 8-bit matrix products on x86 CPUs with AVX-512 VNNI (`vpdpbusd`: 64
//! multiply-adds of u8 x i8 per instruction, four times the f32 rate).
//!
//! `y = x W^T (+ b)` with the weights `W` [n, k] quantized once, symmetric,
//! one scale per output channel and per group of `GROUP` inputs, and the
//! activations `x` [m, k] quantized at each call, asymmetric (vpdpbusd wants
//! them unsigned): one scale and zero point per row and group, so the 256
//! codes span the group's own range (after GELU, mostly positive values get
//! twice the resolution of a symmetric code). The zero point is taken back
//! out with the weights' per-group column sums. Products are
//! exact in i32 within a group and rescaled to f32 between groups, so the
//! only error is the rounding of each operand to 8 bits.
//!
//! Used by `vision_cpu` for `--precision q8`; [`available`] says whether
//! this CPU can run it (otherwise Candle's Q8_0 matmul is used).

use crate::parallel::SendPtr;
use rayon::prelude::*;

/// Inputs per quantization group.
pub const GROUP: usize = 256;
/// Output columns per packed panel (three 16-lane registers).
const NR: usize = 48;
/// Rows per register tile.
const MR: usize = 4;
/// Rows per cache block of activations.
const MC: usize = 128;

/// Whether this CPU has the instructions (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Weights quantized and laid out in panels of `NR` output columns:
/// `[n / NR][k / 4][NR][4]` bytes, so that one 64-byte load holds 4
/// consecutive inputs of 16 columns.
pub struct PackedWeights {
    n: usize,
    k: usize,
    data: Vec<i8>,
    /// `[n / NR][groups][NR]`: dequantization scale.
    scales: Vec<f32>,
    /// `[n / NR][groups][NR]`: the sum of the group's quantized weights.
    col_sums: Vec<i32>,
}

impl PackedWeights {
    /// Quantizes `w` [n, k] (row-major). `None` when the shape does not fit
    /// the panels (n a multiple of 48, k of 256).
    pub fn new(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if n == 0 || k == 0 || !n.is_multiple_of(NR) || !k.is_multiple_of(GROUP) || w.len() != n * k
        {
            return None;
        }
        let groups = k / GROUP;
        let mut data = vec![0i8; n * k];
        let mut scales = vec![0f32; n * groups];
        let mut col_sums = vec![0i32; n * groups];
        for col in 0..n {
            let (p, lane) = (col / NR, col % NR);
            for g in 0..groups {
                let src = &w[col * k + g * GROUP..col * k + (g + 1) * GROUP];
                let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                let mut sum = 0i32;
                for (i, v) in src.iter().enumerate() {
                    let q = (v / scale).round().clamp(-127.0, 127.0) as i8;
                    sum += q as i32;
                    let kk = g * GROUP + i;
                    data[((p * (k / 4) + kk / 4) * NR + lane) * 4 + kk % 4] = q;
                }
                scales[(p * groups + g) * NR + lane] = scale;
                col_sums[(p * groups + g) * NR + lane] = sum;
            }
        }
        Some(Self {
            n,
            k,
            data,
            scales,
            col_sums,
        })
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }
}

/// Activations quantized per row and group: `data` [m, k] as u8 codes,
/// `value = scale * (code - zero)`, `scales` and `zeros` [m, groups].
pub struct QuantizedRows {
    m: usize,
    k: usize,
    data: Vec<u8>,
    scales: Vec<f32>,
    zeros: Vec<i32>,
}

impl QuantizedRows {
    /// Quantizes `x` [m, k]; `k` must be a multiple of `GROUP`.
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(GROUP) && x.len() >= m * k);
        let groups = k / GROUP;
        let mut data = vec![0u8; m * k];
        let mut scales = vec![0f32; m * groups];
        let mut zeros = vec![0i32; m * groups];
        data.par_chunks_mut(k)
            .zip(scales.par_chunks_mut(groups))
            .zip(zeros.par_chunks_mut(groups))
            .zip(x.par_chunks(k))
            .with_min_len(16)
            .for_each(|(((q, s), z), x)| {
                for g in 0..groups {
                    let src = &x[g * GROUP..(g + 1) * GROUP];
                    (s[g], z[g]) = quantize_group(src, &mut q[g * GROUP..(g + 1) * GROUP]);
                }
            });
        Self {
            m,
            k,
            data,
            scales,
            zeros,
        }
    }
}

/// Rounds `x` to u8 codes over its own range, `value / scale + zero`, with
/// 0 exactly representable; returns (scale, zero).
fn quantize_group(x: &[f32], q: &mut [u8]) -> (f32, i32) {
    let (mut lo, mut hi) = ([0f32; 16], [0f32; 16]);
    let chunks = x.chunks_exact(16);
    let (tlo, thi) = chunks
        .remainder()
        .iter()
        .fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
    for c in chunks {
        for i in 0..16 {
            lo[i] = lo[i].min(c[i]);
            hi[i] = hi[i].max(c[i]);
        }
    }
    let min = lo.iter().copied().fold(tlo, f32::min);
    let max = hi.iter().copied().fold(thi, f32::max);
    let scale = if max > min { (max - min) / 255.0 } else { 1.0 };
    let inv = 1.0 / scale;
    // min <= 0 <= max, so the zero point is a code.
    let zero = (-min * inv).round().clamp(0.0, 255.0);
    for (q, v) in q.iter_mut().zip(x) {
        *q = (v * inv + zero).round().clamp(0.0, 255.0) as u8;
    }
    (scale, zero as i32)
}

/// `dst[r, ..n] (+)= x[r] W^T + b` for every row of `x`; rows of `dst` are
/// `dst_rs` apart. `add`: accumulate into `dst`.
///
/// Panics when [`available`] is false or the shapes disagree.
pub fn matmul(
    x: &QuantizedRows,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    dst: &mut [f32],
    dst_rs: usize,
    add: bool,
) {
    assert!(available(), "gemm_i8 needs AVX-512 VNNI");
    let (m, n, k) = (x.m, w.n, w.k);
    assert_eq!(x.k, k, "activations and weights disagree on k");
    assert!(m == 0 || (dst_rs >= n && dst.len() >= (m - 1) * dst_rs + n));
    assert!(bias.is_none_or(|b| b.len() == n));
    let dst_ptr = SendPtr(dst.as_mut_ptr());
    let panels = n / NR;
    for m0 in (0..m).step_by(MC) {
        let mc = MC.min(m - m0);
        (0..panels).into_par_iter().for_each(|p| {
            for r0 in (m0..m0 + mc).step_by(MR) {
                let rows = MR.min(m0 + mc - r0);
                // SAFETY: the CPU features were checked (`available`), every
                // index is inside the buffers (asserted above), and each task
                // writes only its own panel's columns.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match rows {
                        4 => kernel::<4>(x, w, bias, dst_ptr.get(), dst_rs, add, r0, p),
                        3 => kernel::<3>(x, w, bias, dst_ptr.get(), dst_rs, add, r0, p),
                        2 => kernel::<2>(x, w, bias, dst_ptr.get(), dst_rs, add, r0, p),
                        _ => kernel::<1>(x, w, bias, dst_ptr.get(), dst_rs, add, r0, p),
                    }
                }
            }
        });
    }
}

/// One `R` x 48 tile of the output: rows `r0..r0 + R`, panel `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const R: usize>(
    x: &QuantizedRows,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    dst: *mut f32,
    dst_rs: usize,
    add: bool,
    r0: usize,
    p: usize,
) {
    use std::arch::x86_64::*;
    let k = w.k;
    let groups = k / GROUP;
    let mut out = [[_mm512_setzero_ps(); 3]; R];
    let panel = w.data.as_ptr().add(p * (k / 4) * NR * 4);
    for g in 0..groups {
        let mut acc = [[_mm512_setzero_si512(); 3]; R];
        let mut wp = panel.add(g * (GROUP / 4) * NR * 4);
        let mut ap: [*const u8; R] = [std::ptr::null(); R];
        for (r, a) in ap.iter_mut().enumerate() {
            *a = x.data.as_ptr().add((r0 + r) * k + g * GROUP);
        }
        for _ in 0..GROUP / 4 {
            let w0 = _mm512_loadu_si512(wp as *const __m512i);
            let w1 = _mm512_loadu_si512(wp.add(64) as *const __m512i);
            let w2 = _mm512_loadu_si512(wp.add(128) as *const __m512i);
            for r in 0..R {
                let a = _mm512_set1_epi32((ap[r] as *const i32).read_unaligned());
                acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], a, w0);
                acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], a, w1);
                acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], a, w2);
                ap[r] = ap[r].add(4);
            }
            wp = wp.add(NR * 4);
        }
        let meta = (p * groups + g) * NR;
        for j in 0..3 {
            let sums = _mm512_loadu_si512(w.col_sums.as_ptr().add(meta + j * 16) as *const __m512i);
            let ws = _mm512_loadu_ps(w.scales.as_ptr().add(meta + j * 16));
            for r in 0..R {
                let xg = (r0 + r) * groups + g;
                let xs = _mm512_set1_ps(*x.scales.get_unchecked(xg));
                let zero = _mm512_set1_epi32(*x.zeros.get_unchecked(xg));
                let off = _mm512_mullo_epi32(sums, zero);
                let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][j], off));
                out[r][j] = _mm512_fmadd_ps(v, _mm512_mul_ps(ws, xs), out[r][j]);
            }
        }
    }
    for j in 0..3 {
        let b = match bias {
            Some(b) => _mm512_loadu_ps(b.as_ptr().add(p * NR + j * 16)),
            None => _mm512_setzero_ps(),
        };
        for (r, row) in out.iter().enumerate() {
            let d = dst.add((r0 + r) * dst_rs + p * NR + j * 16);
            let mut v = _mm512_add_ps(row[j], b);
            if add {
                v = _mm512_add_ps(v, _mm512_loadu_ps(d));
            }
            _mm512_storeu_ps(d, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f32_product_within_8_bit_error() {
        if !available() {
            eprintln!("no AVX-512 VNNI on this CPU: skipped");
            return;
        }
        let (m, n, k) = (7, 96, 512);
        let mut rng = crate::model::rng::SplitMix64::new(3);
        let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.normal()).collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
        let packed = PackedWeights::new(&w, n, k).unwrap();
        let q = QuantizedRows::new(&x, m, k);
        let rs = n + 5;
        let mut y = vec![1f32; m * rs];
        matmul(&q, &packed, Some(&b), &mut y, rs, true);
        let mut worst = 0f32;
        for r in 0..m {
            for c in 0..n {
                let exact: f32 =
                    (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum::<f32>() + b[c] + 1.0;
                worst = worst.max((y[r * rs + c] - exact).abs());
            }
            // Padding columns are untouched.
            assert!(y[r * rs + n..(r + 1) * rs].iter().all(|&v| v == 1.0));
        }
        // Each product is ~N(0, 0.05^2 k) ~ 1.1 in size; 8-bit rounding of
        // both operands leaves an error of about 1%.
        assert!(worst < 0.05, "max error {worst}");
        assert!(PackedWeights::new(&w, n - 1, k).is_none());
    }

    /// After GELU the activations are mostly positive: the asymmetric codes
    /// span [min, max] only, and a constant row is exact.
    #[test]
    fn skewed_and_constant_rows_keep_their_precision() {
        if !available() {
            eprintln!("no AVX-512 VNNI on this CPU: skipped");
            return;
        }
        let (m, n, k) = (4, 48, 256);
        let mut rng = crate::model::rng::SplitMix64::new(5);
        let gelu = |v: f32| 0.5 * v * (1.0 + (0.797_884_6 * (v + 0.044715 * v * v * v)).tanh());
        let mut x: Vec<f32> = (0..m * k).map(|_| gelu(1.5 * rng.normal())).collect();
        x[3 * k..].fill(0.75); // a constant row
        let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.normal()).collect();
        let packed = PackedWeights::new(&w, n, k).unwrap();
        let q = QuantizedRows::new(&x, m, k);
        let mut y = vec![0f32; m * n];
        matmul(&q, &packed, None, &mut y, n, false);
        let (mut worst, mut worst_const) = (0f32, 0f32);
        for r in 0..m {
            for c in 0..n {
                let exact: f32 = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum();
                let e = (y[r * n + c] - exact).abs();
                if r == 3 {
                    worst_const = worst_const.max(e);
                } else {
                    worst = worst.max(e);
                }
            }
        }
        // Only the weights' rounding is left on the constant row.
        assert!(worst_const < 0.01, "constant row error {worst_const}");
        assert!(worst < 0.03, "max error {worst}");
    }
}
