//! f32 matrix products on AVX2 + FMA with the weights packed once, at load:
//! the `--precision f32` path of CPUs without AVX-512 (laptops), where
//! oneDNN 2.6's AVX2 kernels are slower than the `gemm` crate at batch 1.
//!
//! `y = x W^T (+ b)` with `W` [n, k] stored as panels of `NR` output
//! columns, each `[k][NR]` (the order the kernel reads). The activations
//! are not packed: each of a register tile's `MR` rows is read in place, one
//! broadcast per input, so a product costs no copy of either operand. The
//! `gemm` crate packs one operand at every call (a tenth of a forward) and,
//! given our unpacked weights, reads them with strides.
//!
//! Blocking (the usual BLIS shape): a thread takes a few panels; inside, a
//! block of `MC` rows x `KC` inputs of `x` (200 KB: the 197 rows of one
//! ViT-B/16 image in one block) stays in L2 while every
//! panel of the thread passes over it, and a panel's `KC` x `NR` slice
//! (16 KB) stays in L1 while every row tile of the block passes over it.
//! The register tile is `MR` x `NR` = 6 x 16: 12 accumulators, two weight
//! vectors and one broadcast, 15 of AVX2's 16 registers.
//!
//! Written here rather than taken from a library because it was measured
//! faster than both libraries at hand on that path (the `gemm` crate at
//! batch 1, oneDNN 2.6's AVX2 f32 at both batch sizes); the figures are in
//! the README's "The AVX2 path" section.

#[cfg(target_arch = "x86_64")]
use crate::parallel::SendPtr;
use rayon::prelude::*;

/// Output columns per packed panel (two 8-lane registers).
pub const NR: usize = 16;
/// Rows per register tile.
const MR: usize = 6;
/// Inputs per cache block.
const KC: usize = 256;
/// Rows per cache block.
const MC: usize = 198;
/// Panels per parallel task: four share each block of `x` in L2.
const PANELS_PER_TASK: usize = 4;

/// `W` [n, k] in panels of `NR` columns, `[n / NR][k][NR]`.
pub struct PackedF32 {
    n: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedF32 {
    /// Whether this CPU runs the kernel (AVX2 and FMA).
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Whether an [n, k] weight fits the panels.
    pub fn fits(n: usize, k: usize) -> bool {
        n > 0 && k > 0 && n.is_multiple_of(NR)
    }

    /// Packs `w`: `W` [n, k] row-major, or with `transposed` `W^T` [k, n]
    /// row-major. `None` when the shape does not fit the panels or `w` has
    /// another length.
    pub fn new(w: &[f32], transposed: bool, n: usize, k: usize) -> Option<Self> {
        if !Self::fits(n, k) || w.len() != n * k {
            return None;
        }
        let mut data = vec![0f32; n * k];
        data.par_chunks_mut(k * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for (kk, row) in panel.chunks_exact_mut(NR).enumerate() {
                    for (lane, v) in row.iter_mut().enumerate() {
                        let col = p * NR + lane;
                        *v = if transposed {
                            w[kk * n + col]
                        } else {
                            w[col * k + kk]
                        };
                    }
                }
            });
        Some(Self { n, k, data })
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }
}

/// `dst[r, ..n] (+)= x[r] W^T + b` for the `m` rows of `x` [m, k]; rows of
/// `dst` are `dst_rs` apart. `add`: accumulate into `dst`.
///
/// Panics when this CPU lacks AVX2 or FMA, or the shapes disagree.
pub fn matmul(
    x: &[f32],
    m: usize,
    w: &PackedF32,
    bias: Option<&[f32]>,
    dst: &mut [f32],
    dst_rs: usize,
    add: bool,
) {
    assert!(PackedF32::available(), "this CPU lacks AVX2 or FMA");
    let (n, k) = (w.n, w.k);
    assert!(x.len() >= m * k, "x holds fewer than {m} rows of {k}");
    assert!(m == 0 || (dst_rs >= n && dst.len() >= (m - 1) * dst_rs + n));
    assert!(bias.is_none_or(|b| b.len() == n));
    // Elsewhere `available` is false and the first assert has panicked.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bias, dst, add);
    #[cfg(target_arch = "x86_64")]
    {
        let dst = SendPtr(dst.as_mut_ptr());
        let panels = n / NR;
        let tasks = panels.div_ceil(PANELS_PER_TASK);
        (0..tasks).into_par_iter().for_each(|t| {
            let p0 = t * PANELS_PER_TASK;
            let p1 = (p0 + PANELS_PER_TASK).min(panels);
            for m0 in (0..m).step_by(MC) {
                let mc = MC.min(m - m0);
                for k0 in (0..k).step_by(KC) {
                    let kc = KC.min(k - k0);
                    // The first block of inputs starts from the bias (and
                    // `dst` when adding); later ones from the sums so far.
                    let (load, b) = if k0 == 0 { (add, bias) } else { (true, None) };
                    for p in p0..p1 {
                        let wp = &w.data[(p * k + k0) * NR..(p * k + k0 + kc) * NR];
                        let b = b.map(|b| &b[p * NR..(p + 1) * NR]);
                        for r0 in (m0..m0 + mc).step_by(MR) {
                            let rows = MR.min(m0 + mc - r0);
                            // SAFETY: AVX2 and FMA are present (asserted);
                            // rows r0..r0 + rows of x and dst and columns
                            // p * NR..+NR are inside the buffers (asserted
                            // above); each task writes only its own panels.
                            unsafe {
                                let tile = TileArgs {
                                    x: x.as_ptr().add(r0 * k + k0),
                                    x_rs: k,
                                    w: wp,
                                    bias: b,
                                    dst: dst.get().add(r0 * dst_rs + p * NR),
                                    dst_rs,
                                    load,
                                };
                                match rows {
                                    6 => tile.run::<6>(),
                                    5 => tile.run::<5>(),
                                    4 => tile.run::<4>(),
                                    3 => tile.run::<3>(),
                                    2 => tile.run::<2>(),
                                    _ => tile.run::<1>(),
                                }
                            }
                        }
                    }
                }
            }
        });
    }
}

/// One register tile's operands: `R` rows of `x` from `x` (`x_rs` apart),
/// the panel slice `w` [kc][NR], and the `R` x `NR` tile of `dst`.
#[cfg(target_arch = "x86_64")]
struct TileArgs<'a> {
    x: *const f32,
    x_rs: usize,
    w: &'a [f32],
    bias: Option<&'a [f32]>,
    dst: *mut f32,
    dst_rs: usize,
    /// Start from `dst`'s values.
    load: bool,
}

#[cfg(target_arch = "x86_64")]
impl TileArgs<'_> {
    /// # Safety
    /// AVX2 and FMA are present; `x` holds `R` rows of `w.len() / NR`
    /// inputs `x_rs` apart, and `dst` `R` rows of `NR` values `dst_rs`
    /// apart.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run<const R: usize>(&self) {
        use std::arch::x86_64::*;
        let kc = self.w.len() / NR;
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        if self.load {
            for (r, a) in acc.iter_mut().enumerate() {
                let d = self.dst.add(r * self.dst_rs);
                *a = [_mm256_loadu_ps(d), _mm256_loadu_ps(d.add(8))];
            }
        }
        if let Some(b) = self.bias {
            let b = [
                _mm256_loadu_ps(b.as_ptr()),
                _mm256_loadu_ps(b.as_ptr().add(8)),
            ];
            for a in acc.iter_mut() {
                *a = [_mm256_add_ps(a[0], b[0]), _mm256_add_ps(a[1], b[1])];
            }
        }
        let mut wp = self.w.as_ptr();
        let mut xp = self.x;
        for _ in 0..kc {
            let w0 = _mm256_loadu_ps(wp);
            let w1 = _mm256_loadu_ps(wp.add(8));
            for (r, a) in acc.iter_mut().enumerate() {
                let v = _mm256_broadcast_ss(&*xp.add(r * self.x_rs));
                a[0] = _mm256_fmadd_ps(v, w0, a[0]);
                a[1] = _mm256_fmadd_ps(v, w1, a[1]);
            }
            wp = wp.add(NR);
            xp = xp.add(1);
        }
        for (r, a) in acc.iter().enumerate() {
            let d = self.dst.add(r * self.dst_rs);
            _mm256_storeu_ps(d, a[0]);
            _mm256_storeu_ps(d.add(8), a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::model::rng::SplitMix64::new(seed);
        (0..len).map(|_| rng.normal()).collect()
    }

    /// `x W^T + b` in f64, row-major [m, n].
    fn exact(x: &[f32], w: &[f32], b: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                let s: f64 = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(w[c * k + i]))
                    .sum();
                y[r * n + c] = (s + b.map_or(0.0, |b| f64::from(b[c]))) as f32;
            }
        }
        y
    }

    fn available() -> bool {
        let ok = PackedF32::available();
        if !ok {
            eprintln!("NOTICE: the packed f32 kernel is not tested: this CPU lacks AVX2 or FMA");
        }
        ok
    }

    #[test]
    fn matches_the_exact_product_on_ragged_shapes() {
        if !available() {
            return;
        }
        // Rows that leave every remainder of the 6-row tile and the
        // 96-row block; inputs across one and several 256-input blocks
        // and not a multiple of them; panels not a multiple of four.
        for (m, n, k) in [(1, 16, 1), (7, 48, 300), (197, 80, 768), (101, 112, 513)] {
            let x = random(m * k, 1);
            let w = random(n * k, 2);
            let b = random(n, 3);
            let want = exact(&x, &w, Some(&b), m, n, k);
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            for (packed, name) in [
                (PackedF32::new(&w, false, n, k).unwrap(), "row-major"),
                (PackedF32::new(&wt, true, n, k).unwrap(), "transposed"),
            ] {
                let mut y = vec![f32::NAN; m * n];
                matmul(&x, m, &packed, Some(&b), &mut y, n, false);
                for (i, (a, e)) in y.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (k as f32).sqrt() * 4.0;
                    assert!(
                        (a - e).abs() <= tol,
                        "{name} [{m},{n},{k}] at {i}: {a} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn accumulates_into_strided_rows_without_touching_the_rest() {
        if !available() {
            return;
        }
        let (m, n, k, rs) = (13, 32, 40, 50);
        let x = random(m * k, 4);
        let w = random(n * k, 5);
        let packed = PackedF32::new(&w, false, n, k).unwrap();
        let mut dst = vec![1.5f32; (m - 1) * rs + n + 3];
        matmul(&x, m, &packed, None, &mut dst, rs, true);
        let want = exact(&x, &w, None, m, n, k);
        for r in 0..m {
            for c in 0..rs.min(dst.len() - r * rs) {
                let v = dst[r * rs + c];
                if c < n {
                    assert!((v - 1.5 - want[r * n + c]).abs() < 1e-4, "[{r},{c}]");
                } else {
                    assert_eq!(v, 1.5, "[{r},{c}] outside the product was written");
                }
            }
        }
    }

    #[test]
    fn refuses_shapes_the_panels_do_not_fit() {
        assert!(PackedF32::new(&[0.0; 8 * 4], false, 8, 4).is_none());
        assert!(PackedF32::new(&[0.0; 16 * 4], false, 16, 5).is_none());
        assert!(PackedF32::new(&[0.0; 16 * 4], false, 16, 4).is_some());
    }
}
