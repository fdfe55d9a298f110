//! 8-bit matrix products on x86 CPUs: AVX-512 VNNI (`vpdpbusd zmm`: 64
//! multiply-adds of u8 x i8 per instruction, four times the f32 rate),
//! AVX-VNNI (the same at 256 bits, on laptops without AVX-512) and plain
//! AVX2 (`vpmaddubsw` + `vpmaddwd`, three instructions for 32).
//!
//! `y = x W^T (+ b)` with the weights `W` [n, k] quantized once, symmetric,
//! one scale per output channel and per group of `GROUP` inputs, and the
//! activations `x` [m, k] quantized at each call, asymmetric (the
//! instructions want them unsigned): one scale and zero point per row and
//! group, so the codes span the group's own range (after GELU, mostly
//! positive values get twice the resolution of a symmetric code). The zero
//! point is taken back out with the weights' per-group column sums.
//! Products are exact in i32 within a group and rescaled to f32 between
//! groups, so the only error is the rounding of each operand.
//!
//! Plain AVX2 adds pairs of u8 x i8 products in i16, which saturates past
//! 2 x 255 x 127; there the activations get 128 codes instead of 256 (7
//! bits, as ONNX Runtime's `reduce_range` does for the weights), so every
//! pair fits and the sums stay exact.
//!
//! Used by `vision_cpu` for `--precision q8`. [`Isa::best`] picks the
//! best path this CPU has once, at load; `CLIPER_ISA` (or `cliper bench
//! --isa`) forces a slower one to measure it. Without any of them Candle's
//! Q8_0 matmul is used.

use crate::parallel::SendPtr;
use rayon::prelude::*;

/// Inputs per quantization group.
pub const GROUP: usize = 256;
/// Output columns per packed panel (three 16-lane registers).
const NR: usize = 48;
/// Rows per cache block of activations.
const MC: usize = 128;

/// The instruction set an 8-bit product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Isa {
    /// `vpdpbusd` on 512-bit registers (AVX-512 VNNI).
    #[value(name = "avx512-vnni")]
    Avx512Vnni,
    /// `vpdpbusd` on 256-bit registers: AVX-VNNI, or on a CPU with AVX-512
    /// VNNI and VL the same instruction in its EVEX form.
    #[value(name = "avx-vnni")]
    AvxVnni,
    /// `vpmaddubsw` + `vpmaddwd` (AVX2), with 7-bit activations.
    #[value(name = "avx2")]
    Avx2,
}

/// Why a forced instruction set cannot run.
#[derive(Debug, thiserror::Error)]
pub enum IsaError {
    #[error("CLIPER_ISA={value:?} is not an instruction set: use avx512-vnni, avx-vnni or avx2")]
    Unknown { value: String },
    #[error("this CPU cannot run the {isa} path (it lacks {missing}); best here: {best}")]
    Unsupported {
        isa: &'static str,
        missing: &'static str,
        best: &'static str,
    },
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Avx512Vnni, Isa::AvxVnni, Isa::Avx2];

    pub fn as_str(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx2 => "avx2",
        }
    }

    /// The CPU features this path lacks here, or `None` when it can run.
    pub fn missing(self) -> Option<&'static str> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma");
            match self {
                Isa::Avx512Vnni => {
                    (!(has!("avx512f") && has!("avx512vnni"))).then_some("avx512f, avx512vnni")
                }
                Isa::AvxVnni => (!(avx2
                    && (has!("avxvnni") || (has!("avx512vnni") && has!("avx512vl")))))
                .then_some("avxvnni (or avx512vnni with avx512vl)"),
                Isa::Avx2 => (!avx2).then_some("avx2, fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Some("an x86-64 CPU")
        }
    }

    /// The fastest path this CPU runs, `None` when it runs none.
    pub fn best() -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.missing().is_none())
    }

    /// The path to use: `forced` (or `CLIPER_ISA`) when set and runnable,
    /// else the best one. `Ok(None)`: this CPU has none of them.
    pub fn select(forced: Option<Isa>) -> Result<Option<Isa>, IsaError> {
        let forced = match forced {
            Some(i) => Some(i),
            None => match std::env::var("CLIPER_ISA") {
                Ok(v) if !v.trim().is_empty() => Some(
                    <Isa as clap::ValueEnum>::from_str(v.trim(), true)
                        .map_err(|_| IsaError::Unknown { value: v.clone() })?,
                ),
                _ => None,
            },
        };
        match forced {
            None => Ok(Isa::best()),
            Some(i) => match i.missing() {
                None => Ok(Some(i)),
                Some(missing) => Err(IsaError::Unsupported {
                    isa: i.as_str(),
                    missing,
                    best: Isa::best().map_or("none (Candle's Q8_0)", Isa::as_str),
                }),
            },
        }
    }

    /// Codes per activation: 256, or 128 where pairs are summed in i16.
    fn activation_levels(self) -> f32 {
        match self {
            Isa::Avx2 => 127.0,
            _ => 255.0,
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
    /// Whether an [n, k] weight fits the kernel's panels and groups.
    pub fn fits(n: usize, k: usize) -> bool {
        n > 0 && k > 0 && n.is_multiple_of(NR) && k.is_multiple_of(GROUP)
    }

    pub fn new(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if !Self::fits(n, k) || w.len() != n * k {
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
/// `value = scale * (code - zero)`, `scales` and `zeros` [m, groups], for
/// the instruction set `isa` (which sets how many codes there are).
pub struct QuantizedRows {
    m: usize,
    k: usize,
    isa: Isa,
    data: Vec<u8>,
    scales: Vec<f32>,
    zeros: Vec<i32>,
}

impl QuantizedRows {
    /// Quantizes `x` [m, k] for `isa`; `k` must be a multiple of `GROUP`.
    pub fn new(x: &[f32], m: usize, k: usize, isa: Isa) -> Self {
        assert!(k.is_multiple_of(GROUP) && x.len() >= m * k);
        let groups = k / GROUP;
        let levels = isa.activation_levels();
        let mut data = vec![0u8; m * k];
        let mut scales = vec![0f32; m * groups];
        let mut zeros = vec![0i32; m * groups];
        data.par_chunks_mut(k)
            .zip(scales.par_chunks_mut(groups))
            .zip(zeros.par_chunks_mut(groups))
            .zip(x.par_chunks(k))
            .with_min_len(16)
            .for_each(|(((q, s), z), x)| quantize_row(x, q, s, z, levels));
        Self {
            m,
            k,
            isa,
            data,
            scales,
            zeros,
        }
    }
}

multiversion! {
    /// One row of activations, group by group (see [`quantize_group`]),
    /// vectorised for the CPU: with `f32::round` (a libm call per value)
    /// quantizing took a fifth of a q8 forward at batch 1.
    pub fn quantize_row(
        x: &[f32],
        q: &mut [u8],
        scales: &mut [f32],
        zeros: &mut [i32],
        levels: f32
    ) {
        let groups = x.chunks_exact(GROUP).zip(q.chunks_exact_mut(GROUP));
        for ((x, q), (s, z)) in groups.zip(scales.iter_mut().zip(zeros.iter_mut())) {
            (*s, *z) = quantize_group(x, q, levels);
        }
    }
}

multiversion! {
    /// One row of activations over its whole length (one scale and zero
    /// point, 256 codes; see [`quantize_group`]), for oneDNN's 8-bit
    /// products (`onednn::DataType::Int8`), which take one scale per row.
    pub fn quantize_whole_row(x: &[f32], q: &mut [u8], params: &mut (f32, i32)) {
        *params = quantize_group(x, q, 255.0);
    }
}

/// Rounds `x` to codes `0..=levels` over its own range, `value / scale +
/// zero`, with 0 exactly representable; returns (scale, zero).
#[inline(always)]
fn quantize_group(x: &[f32], q: &mut [u8], levels: f32) -> (f32, i32) {
    let (mut lo, mut hi) = ([0f32; 16], [0f32; 16]);
    let chunks = x.chunks_exact(16);
    let (tlo, thi) = chunks
        .remainder()
        .iter()
        .fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
    for c in chunks {
        // Compare-and-select, which is one `vminps` / `vmaxps` a lane
        // (`f32::min`'s NaN rule kept this loop scalar).
        for ((l, h), &v) in lo.iter_mut().zip(&mut hi).zip(c) {
            *l = if v < *l { v } else { *l };
            *h = if v > *h { v } else { *h };
        }
    }
    let min = lo.iter().fold(tlo, |a, &v| if v < a { v } else { a });
    let max = hi.iter().fold(thi, |a, &v| if v > a { v } else { a });
    let scale = if max > min { (max - min) / levels } else { 1.0 };
    let inv = 1.0 / scale;
    // min <= 0 <= max, so the zero point is a code.
    let zero = (-min * inv).round().clamp(0.0, levels);
    for (q, v) in q.iter_mut().zip(x) {
        // Codes are at least 0 up to rounding, so adding a half and
        // truncating rounds as `round` would, without its libm call. The
        // selects clamp to 0..=levels (a NaN becomes 0).
        let c = v * inv + zero + 0.5;
        let c = if c > 0.0 { c } else { 0.0 };
        let c = if c < levels { c } else { levels };
        // SAFETY: `c` is finite and in 0..=levels (at most 255), which i32 holds.
        *q = unsafe { c.to_int_unchecked::<i32>() } as u8;
    }
    (scale, zero as i32)
}

/// `dst[r, ..n] (+)= x[r] W^T + b` for every row of `x`, on the instruction
/// set `x` was quantized for; rows of `dst` are `dst_rs` apart. `add`:
/// accumulate into `dst`.
///
/// Panics when this CPU cannot run that instruction set or the shapes
/// disagree.
pub fn matmul(
    x: &QuantizedRows,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    dst: &mut [f32],
    dst_rs: usize,
    add: bool,
) {
    let isa = x.isa;
    assert!(
        isa.missing().is_none(),
        "this CPU cannot run the {isa} kernel"
    );
    let (m, n, k) = (x.m, w.n, w.k);
    assert_eq!(x.k, k, "activations and weights disagree on k");
    assert!(m == 0 || (dst_rs >= n && dst.len() >= (m - 1) * dst_rs + n));
    assert!(bias.is_none_or(|b| b.len() == n));
    #[cfg(target_arch = "x86_64")]
    {
        let t = Tile {
            x,
            w,
            bias,
            dst: SendPtr(dst.as_mut_ptr()),
            dst_rs,
            add,
        };
        let vex_vnni = std::arch::is_x86_feature_detected!("avxvnni");
        // Rows per register tile: 4 x 3 accumulators on zmm; on ymm, where
        // AVX2 has 16 registers, 4 x 3 with VNNI and 3 x 3 without (the
        // two-step product needs two more).
        let mr = if isa == Isa::Avx2 { 3 } else { 4 };
        let panels = n / NR;
        for m0 in (0..m).step_by(MC) {
            let mc = MC.min(m - m0);
            (0..panels).into_par_iter().for_each(|p| {
                for r0 in (m0..m0 + mc).step_by(mr) {
                    let rows = mr.min(m0 + mc - r0);
                    // SAFETY: the CPU has the features (asserted above),
                    // every index is inside the buffers (asserted above),
                    // and each task writes only its own panel's columns.
                    unsafe {
                        match isa {
                            Isa::Avx512Vnni => t.zmm_vnni(rows, r0, p),
                            Isa::AvxVnni if vex_vnni => t.ymm_vex_vnni(rows, r0, p),
                            Isa::AvxVnni => t.ymm_evex_vnni(rows, r0, p),
                            Isa::Avx2 => t.ymm_avx2(rows, r0, p),
                        }
                    }
                }
            });
        }
    }
}

/// What every register tile of one product reads and writes.
#[cfg(target_arch = "x86_64")]
struct Tile<'a> {
    x: &'a QuantizedRows,
    w: &'a PackedWeights,
    bias: Option<&'a [f32]>,
    dst: SendPtr,
    dst_rs: usize,
    add: bool,
}

#[cfg(target_arch = "x86_64")]
impl Tile<'_> {
    /// Rows `r0..r0 + rows` (1 to 4) x the 48 columns of panel `p`.
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn zmm_vnni(&self, rows: usize, r0: usize, p: usize) {
        match rows {
            4 => self.zmm::<4>(r0, p),
            3 => self.zmm::<3>(r0, p),
            2 => self.zmm::<2>(r0, p),
            _ => self.zmm::<1>(r0, p),
        }
    }

    /// One `R` x 48 tile on 512-bit registers.
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn zmm<const R: usize>(&self, r0: usize, p: usize) {
        use std::arch::x86_64::*;
        let (x, w) = (self.x, self.w);
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
                let sums =
                    _mm512_loadu_si512(w.col_sums.as_ptr().add(meta + j * 16) as *const __m512i);
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
            let b = match self.bias {
                Some(b) => _mm512_loadu_ps(b.as_ptr().add(p * NR + j * 16)),
                None => _mm512_setzero_ps(),
            };
            for (r, row) in out.iter().enumerate() {
                let d = self.dst.get().add((r0 + r) * self.dst_rs + p * NR + j * 16);
                let mut v = _mm512_add_ps(row[j], b);
                if self.add {
                    v = _mm512_add_ps(v, _mm512_loadu_ps(d));
                }
                _mm512_storeu_ps(d, v);
            }
        }
    }
}

/// The 256-bit tile, once per way of forming the four-product sums: the
/// same loop under each instruction set's `target_feature`, so that `$dot`
/// inlines. A 48-column panel is done in two halves of 3 x 8 columns.
#[cfg(target_arch = "x86_64")]
macro_rules! ymm_tile {
    ($rows:ident, $tile:ident, $features:literal, $dot:ident) => {
        impl Tile<'_> {
            #[target_feature(enable = $features)]
            unsafe fn $rows(&self, rows: usize, r0: usize, p: usize) {
                match rows {
                    4 => self.$tile::<4>(r0, p),
                    3 => self.$tile::<3>(r0, p),
                    2 => self.$tile::<2>(r0, p),
                    _ => self.$tile::<1>(r0, p),
                }
            }

            #[target_feature(enable = $features)]
            unsafe fn $tile<const R: usize>(&self, r0: usize, p: usize) {
                use std::arch::x86_64::*;
                let (x, w) = (self.x, self.w);
                let k = w.k;
                let groups = k / GROUP;
                let panel = w.data.as_ptr().add(p * (k / 4) * NR * 4);
                for half in 0..2 {
                    let c0 = half * 24;
                    let mut out = [[_mm256_setzero_ps(); 3]; R];
                    for g in 0..groups {
                        let mut acc = [[_mm256_setzero_si256(); 3]; R];
                        let mut wp = panel.add(g * (GROUP / 4) * NR * 4 + c0 * 4);
                        let mut ap: [*const u8; R] = [std::ptr::null(); R];
                        for (r, a) in ap.iter_mut().enumerate() {
                            *a = x.data.as_ptr().add((r0 + r) * k + g * GROUP);
                        }
                        for _ in 0..GROUP / 4 {
                            let w0 = _mm256_loadu_si256(wp as *const __m256i);
                            let w1 = _mm256_loadu_si256(wp.add(32) as *const __m256i);
                            let w2 = _mm256_loadu_si256(wp.add(64) as *const __m256i);
                            for r in 0..R {
                                let a = _mm256_set1_epi32((ap[r] as *const i32).read_unaligned());
                                acc[r][0] = $dot(acc[r][0], a, w0);
                                acc[r][1] = $dot(acc[r][1], a, w1);
                                acc[r][2] = $dot(acc[r][2], a, w2);
                                ap[r] = ap[r].add(4);
                            }
                            wp = wp.add(NR * 4);
                        }
                        let meta = (p * groups + g) * NR + c0;
                        for j in 0..3 {
                            let sums = _mm256_loadu_si256(
                                w.col_sums.as_ptr().add(meta + j * 8) as *const __m256i
                            );
                            let ws = _mm256_loadu_ps(w.scales.as_ptr().add(meta + j * 8));
                            for r in 0..R {
                                let xg = (r0 + r) * groups + g;
                                let xs = _mm256_set1_ps(*x.scales.get_unchecked(xg));
                                let zero = _mm256_set1_epi32(*x.zeros.get_unchecked(xg));
                                let off = _mm256_mullo_epi32(sums, zero);
                                let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][j], off));
                                out[r][j] = _mm256_fmadd_ps(v, _mm256_mul_ps(ws, xs), out[r][j]);
                            }
                        }
                    }
                    for j in 0..3 {
                        let col = p * NR + c0 + j * 8;
                        let b = match self.bias {
                            Some(b) => _mm256_loadu_ps(b.as_ptr().add(col)),
                            None => _mm256_setzero_ps(),
                        };
                        for (r, row) in out.iter().enumerate() {
                            let d = self.dst.get().add((r0 + r) * self.dst_rs + col);
                            let mut v = _mm256_add_ps(row[j], b);
                            if self.add {
                                v = _mm256_add_ps(v, _mm256_loadu_ps(d));
                            }
                            _mm256_storeu_ps(d, v);
                        }
                    }
                }
            }
        }
    };
}

/// `acc + a . w` per group of four bytes through one `vpdpbusd ymm`: the
/// two forms differ only in encoding and the CPU flag they need.
macro_rules! vnni_dot {
    ($(#[$doc:meta] $name:ident, $features:literal, $intrinsic:ident;)*) => {$(
        #[$doc]
        #[cfg(target_arch = "x86_64")]
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $name(
            acc: std::arch::x86_64::__m256i,
            a: std::arch::x86_64::__m256i,
            w: std::arch::x86_64::__m256i,
        ) -> std::arch::x86_64::__m256i {
            std::arch::x86_64::$intrinsic(acc, a, w)
        }
    )*};
}

vnni_dot! {
    /// AVX-VNNI (VEX).
    dot_vex_vnni, "avx2,avxvnni", _mm256_dpbusd_avx_epi32;
    /// AVX-512 VNNI (EVEX), on 256-bit registers.
    dot_evex_vnni, "avx2,avx512vnni,avx512vl", _mm256_dpbusd_epi32;
}

/// AVX2: u8 x i8 pairs summed in i16 (exact for 7-bit activations), then
/// pairs of those in i32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(
    acc: std::arch::x86_64::__m256i,
    a: std::arch::x86_64::__m256i,
    w: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let pairs = _mm256_maddubs_epi16(a, w);
    _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

#[cfg(target_arch = "x86_64")]
ymm_tile!(
    ymm_vex_vnni,
    ymm_vex_vnni_tile,
    "avx2,fma,avxvnni",
    dot_vex_vnni
);
#[cfg(target_arch = "x86_64")]
ymm_tile!(
    ymm_evex_vnni,
    ymm_evex_vnni_tile,
    "avx2,fma,avx512vnni,avx512vl",
    dot_evex_vnni
);
#[cfg(target_arch = "x86_64")]
ymm_tile!(ymm_avx2, ymm_avx2_tile, "avx2,fma", dot_avx2);

#[cfg(test)]
mod tests {
    use super::*;

    /// The instruction sets this CPU runs; a NOTICE for each one it lacks.
    fn runnable() -> Vec<Isa> {
        Isa::ALL
            .into_iter()
            .filter(|isa| match isa.missing() {
                None => true,
                Some(m) => {
                    eprintln!("NOTICE: the {isa} 8-bit path is not tested: this CPU lacks {m}");
                    false
                }
            })
            .collect()
    }

    fn exact(x: &[f32], w: &[f32], r: usize, c: usize, k: usize) -> f32 {
        (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum()
    }

    #[test]
    fn codes_round_to_nearest_over_the_group_range() {
        let mut rng = crate::model::rng::SplitMix64::new(7);
        for levels in [127.0f32, 255.0] {
            let mut x: Vec<f32> = (0..2 * GROUP).map(|_| rng.normal() * 3.0).collect();
            x[5] = f32::NAN;
            x[GROUP + 9] = 40.0;
            let mut q = vec![0u8; x.len()];
            let (mut s, mut z) = ([0f32; 2], [0i32; 2]);
            quantize_row(&x, &mut q, &mut s, &mut z, levels);
            for (g, (xs, qs)) in x.chunks(GROUP).zip(q.chunks(GROUP)).enumerate() {
                let finite = xs.iter().filter(|v| v.is_finite());
                let min = finite.clone().fold(0f32, |a, &v| a.min(v));
                let max = finite.fold(0f32, |a, &v| a.max(v));
                let scale = (max - min) / levels;
                assert!(
                    (s[g] - scale).abs() <= scale * 1e-6,
                    "scale {} vs {scale}",
                    s[g]
                );
                assert_eq!(z[g], (-min / scale).round() as i32);
                for (&v, &c) in xs.iter().zip(qs) {
                    let want = if v.is_nan() {
                        0.0
                    } else {
                        (v / s[g] + z[g] as f32).round().clamp(0.0, levels)
                    };
                    assert_eq!(f32::from(c), want, "{v} in group {g}");
                }
            }
        }
    }

    #[test]
    fn matches_f32_product_within_8_bit_error() {
        for isa in runnable() {
            // Every tile height of both register widths (m = 7: 4 + 3 and
            // 3 + 3 + 1), two panels, two groups.
            let (m, n, k) = (7, 96, 512);
            let mut rng = crate::model::rng::SplitMix64::new(3);
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.normal()).collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            let packed = PackedWeights::new(&w, n, k).unwrap();
            let q = QuantizedRows::new(&x, m, k, isa);
            let rs = n + 5;
            let mut y = vec![1f32; m * rs];
            matmul(&q, &packed, Some(&b), &mut y, rs, true);
            let mut worst = 0f32;
            for r in 0..m {
                for c in 0..n {
                    let want = exact(&x, &w, r, c, k) + b[c] + 1.0;
                    worst = worst.max((y[r * rs + c] - want).abs());
                }
                // Padding columns are untouched.
                assert!(y[r * rs + n..(r + 1) * rs].iter().all(|&v| v == 1.0));
            }
            // Each product is ~N(0, 0.05^2 k) ~ 1.1 in size; 8-bit rounding
            // of both operands leaves an error of about 1% (7-bit
            // activations on plain AVX2: about 2%).
            let bound = if isa == Isa::Avx2 { 0.08 } else { 0.05 };
            assert!(worst < bound, "{isa}: max error {worst}");
            assert!(PackedWeights::new(&w, n - 1, k).is_none());
        }
    }

    /// The paths agree with each other to the rounding of their codes: the
    /// VNNI ones to the last bit of f32 order, since their codes are equal.
    #[test]
    fn the_paths_agree() {
        let isas = runnable();
        let (m, n, k) = (5, 48, 768);
        let mut rng = crate::model::rng::SplitMix64::new(11);
        let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.normal()).collect();
        let packed = PackedWeights::new(&w, n, k).unwrap();
        let run = |isa| {
            let mut y = vec![0f32; m * n];
            matmul(
                &QuantizedRows::new(&x, m, k, isa),
                &packed,
                None,
                &mut y,
                n,
                false,
            );
            y
        };
        let vnni: Vec<Vec<f32>> = isas
            .iter()
            .filter(|&&i| i != Isa::Avx2)
            .map(|&i| run(i))
            .collect();
        for pair in vnni.windows(2) {
            let d = pair[0]
                .iter()
                .zip(&pair[1])
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            assert!(d < 1e-4, "zmm and ymm VNNI differ by {d}");
        }
    }

    /// On plain AVX2, pairs of products are summed in i16: with the largest
    /// codes (every activation at the top of its range, every weight at its
    /// channel's maximum) they must not saturate.
    #[test]
    fn extreme_codes_do_not_saturate() {
        for isa in runnable() {
            let (m, n, k) = (2, 48, 256);
            let mut x = vec![1f32; m * k];
            x[0] = 0.0; // the range is [0, 1]: zero point 0, top code for 1
            let w: Vec<f32> = (0..n * k)
                .map(|i| if (i / k) % 2 == 0 { 0.05 } else { -0.05 })
                .collect();
            let packed = PackedWeights::new(&w, n, k).unwrap();
            let mut y = vec![0f32; m * n];
            matmul(
                &QuantizedRows::new(&x, m, k, isa),
                &packed,
                None,
                &mut y,
                n,
                false,
            );
            for r in 0..m {
                for c in 0..n {
                    let want = exact(&x, &w, r, c, k);
                    let got = y[r * n + c];
                    assert!(
                        (got - want).abs() < 1e-3,
                        "{isa} [{r}, {c}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// After GELU the activations are mostly positive: the asymmetric codes
    /// span [min, max] only, and a constant row is exact.
    #[test]
    fn skewed_and_constant_rows_keep_their_precision() {
        for isa in runnable() {
            let (m, n, k) = (4, 48, 256);
            let mut rng = crate::model::rng::SplitMix64::new(5);
            let gelu = |v: f32| 0.5 * v * (1.0 + (0.797_884_6 * (v + 0.044715 * v * v * v)).tanh());
            let mut x: Vec<f32> = (0..m * k).map(|_| gelu(1.5 * rng.normal())).collect();
            x[3 * k..].fill(0.75); // a constant row
            let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.normal()).collect();
            let packed = PackedWeights::new(&w, n, k).unwrap();
            let q = QuantizedRows::new(&x, m, k, isa);
            let mut y = vec![0f32; m * n];
            matmul(&q, &packed, None, &mut y, n, false);
            let (mut worst, mut worst_const) = (0f32, 0f32);
            for r in 0..m {
                for c in 0..n {
                    let e = (y[r * n + c] - exact(&x, &w, r, c, k)).abs();
                    if r == 3 {
                        worst_const = worst_const.max(e);
                    } else {
                        worst = worst.max(e);
                    }
                }
            }
            // Only the weights' rounding is left on the constant row.
            assert!(
                worst_const < 0.01,
                "{isa}: constant row error {worst_const}"
            );
            let bound = if isa == Isa::Avx2 { 0.05 } else { 0.03 };
            assert!(worst < bound, "{isa}: max error {worst}");
        }
    }

    #[test]
    fn a_forced_path_is_checked() {
        assert!(Isa::select(Some(Isa::Avx2)).is_ok() == Isa::Avx2.missing().is_none());
        let best = Isa::select(None).unwrap();
        assert_eq!(best, Isa::best());
        for isa in Isa::ALL {
            if let Some(m) = isa.missing() {
                let e = Isa::select(Some(isa)).unwrap_err().to_string();
                assert!(e.contains(isa.as_str()) && e.contains(m), "{e}");
            }
        }
    }
}
