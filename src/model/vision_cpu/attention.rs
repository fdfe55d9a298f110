//! Softmax attention of every (image, head) of a block, on the products
//! chosen at load ([`AttentionKernel`]): f32 through the `gemm` crate, or
//! bf16 through oneDNN (AMX-BF16 tiles on Xeons that have them,
//! AVX512-BF16 elsewhere), with the softmax in f32 either way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::Result;
use rayon::prelude::*;

use super::super::onednn::{self, Batched, Operand};
use super::simd;
use crate::model::scratch::Pool;
use crate::parallel::SendPtr;

/// The bf16 attention's operands (q, k, v, probabilities) and its f32
/// scores, reused from call to call (see `model::scratch`).
static BF16: Pool<u16> = Pool::new();
static SCORES: Pool<f32> = Pool::new();

/// Which products attention's two matmuls (`q k^T`, `p v`) run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionKernel {
    /// f32, the `gemm` crate, one (image, head) per task.
    #[default]
    F32,
    /// bf16 operands, f32 sums, through oneDNN: one batched product per
    /// matmul for each (image, group of heads), a task each.
    OneDnnBf16,
}

/// `CLIPER_ATTENTION` names no attention kernel.
#[derive(Debug, thiserror::Error)]
#[error("CLIPER_ATTENTION={0:?} is not an attention kernel: use f32 or bf16, or unset it")]
pub struct AttentionKernelError(pub String);

impl AttentionKernel {
    /// The kernel `CLIPER_ATTENTION` forces, `None` when it is unset or
    /// empty.
    pub fn from_env() -> std::result::Result<Option<Self>, AttentionKernelError> {
        let choices = [("f32", Self::F32), ("bf16", Self::OneDnnBf16)];
        crate::model::vision::env_choice("CLIPER_ATTENTION", &choices).map_err(AttentionKernelError)
    }

    /// The attention of the reduced-precision paths (q8, bf16): bf16
    /// through oneDNN where the CPU has bf16 instructions (AMX-BF16,
    /// AVX512-BF16) and oneDNN builds the products with a fast kernel,
    /// else f32; `CLIPER_ATTENTION` forces one (`bf16` where it cannot
    /// run is an error). On the 2-core EPYC (AVX512-BF16) bf16 attention
    /// was 1-2% faster per q8 forward than f32 (README, "oneDNN: bf16
    /// attention"); on AMX the products run on the tiles.
    pub fn for_reduced() -> Result<Self> {
        let forced = Self::from_env().map_err(candle_core::Error::wrap)?;
        if forced == Some(Self::F32) {
            return Ok(Self::F32);
        }
        let native = onednn::native_bf16();
        match (forced, native) {
            (Some(_), Ok(true)) => match onednn_impl() {
                Ok(_) => Ok(Self::OneDnnBf16),
                Err(e) => candle_core::bail!(
                    "CLIPER_ATTENTION=bf16: {e} (set CLIPER_ATTENTION=f32 or unset it)"
                ),
            },
            (Some(_), Ok(false)) => candle_core::bail!(
                "CLIPER_ATTENTION=bf16: oneDNN may not use bf16 instructions here (this CPU lacks avx512_bf16 and amx_bf16, or ONEDNN_MAX_CPU_ISA caps them); unset it or set CLIPER_ATTENTION=f32"
            ),
            (Some(_), Err(e)) => candle_core::bail!(
                "CLIPER_ATTENTION=bf16: {e} (set CLIPER_ATTENTION=f32 or unset it)"
            ),
            (None, Ok(true)) => Ok(match onednn_impl() {
                Ok(_) => Self::OneDnnBf16,
                Err(e) => {
                    log::info!("attention stays f32: {e}");
                    Self::F32
                }
            }),
            (None, _) => Ok(Self::F32),
        }
    }
}

/// Attention of every (image, head): `qkv` [B*T, 3D] holds q, k, v side by
/// side; writes the heads' outputs side by side into `out` [B*T, D].
pub(super) fn attend(
    kernel: AttentionKernel,
    qkv: &[f32],
    out: &mut [f32],
    b: usize,
    t: usize,
    d: usize,
    heads: usize,
) -> Result<()> {
    match kernel {
        AttentionKernel::F32 => {
            attention_f32(qkv, out, b, t, d, heads);
            Ok(())
        }
        AttentionKernel::OneDnnBf16 => match attention_bf16(qkv, out, b, t, d, heads) {
            Ok(()) => Ok(()),
            Err(e) if AttentionKernel::from_env().ok().flatten().is_some() => {
                candle_core::bail!(
                    "CLIPER_ATTENTION=bf16: {e} (set CLIPER_ATTENTION=f32 or unset it)"
                )
            }
            Err(e) => {
                // A shape the load-time check did not cover: f32 instead.
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| log::warn!("bf16 attention failed ({e}): f32 attention runs"));
                attention_f32(qkv, out, b, t, d, heads);
                Ok(())
            }
        },
    }
}

/// Softmax attention of every (image, head): `qkv` [B*T, 3D] holds q, k, v
/// side by side; writes the heads' outputs side by side into `out` [B*T, D].
fn attention_f32(qkv: &[f32], out: &mut [f32], b: usize, t: usize, d: usize, heads: usize) {
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

/// The two batched products of one attention shape.
struct Products {
    qk: Batched,
    pv: Batched,
}

/// (images, heads, tokens, head width).
type Shape = (usize, usize, usize, usize);

/// The products for `shape`, made once and kept (a handful of batch sizes
/// per process; the cache is emptied past 64 shapes).
fn products(shape: Shape) -> std::result::Result<Arc<Products>, onednn::OneDnnError> {
    static CACHE: OnceLock<Mutex<HashMap<Shape, Arc<Products>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cache.get(&shape) {
        return Ok(p.clone());
    }
    let (b, h, t, hd) = (
        shape.0 as i64,
        shape.1 as i64,
        shape.2 as i64,
        shape.3 as i64,
    );
    // Dense [b, h, rows, cols]: oneDNN's brgemm kernels want dense inputs
    // (with q read in place out of the q/k/v rows, oneDNN 2.6 fell back to
    // its older `gemm:jit`); k is read as the transposed weights.
    let dense = |rows: i64, cols: i64| [h * rows * cols, rows * cols, cols, 1];
    let (q_s, s_s, o_s) = (dense(t, hd), dense(t, t), dense(t, hd));
    let kt_s = [h * t * hd, t * hd, 1, hd];
    let (tok_dims, kt_dims, sq_dims) = ([b, h, t, hd], [b, h, hd, t], [b, h, t, t]);
    let tokens = Operand {
        dims: &tok_dims,
        strides: &q_s,
    };
    let scores = Operand {
        dims: &sq_dims,
        strides: &s_s,
    };
    let k_t = Operand {
        dims: &kt_dims,
        strides: &kt_s,
    };
    let out = Operand {
        dims: &tok_dims,
        strides: &o_s,
    };
    // q k^T, then p v (v laid out as q).
    let qk = Batched::bf16(tokens, k_t, scores)?;
    let pv = Batched::bf16(scores, tokens, out)?;
    let p = Arc::new(Products { qk, pv });
    if cache.len() >= 64 {
        cache.clear();
    }
    cache.insert(shape, p.clone());
    Ok(p)
}

/// The implementation oneDNN runs attention's products on for one
/// ViT-B/16 head group, for the kernel's name (`brg:avx512_core_amx`).
pub fn onednn_impl() -> std::result::Result<String, onednn::OneDnnError> {
    Ok(products((1, 3, 197, 64))?.qk.impl_name().to_string())
}

/// Heads per task of [`attention_bf16`]: the most (the fewest oneDNN
/// calls) that still give the pool's threads two tasks each (fewer tasks
/// balance worse); a divisor of `heads`.
fn heads_per_task(b: usize, heads: usize) -> usize {
    let want = 2 * rayon::current_num_threads().max(1);
    let groups = want.div_ceil(b.max(1)).clamp(1, heads);
    // The largest divisor of `heads` giving at least `groups` groups.
    (1..=heads)
        .rev()
        .find(|&g| heads.is_multiple_of(g) && heads / g >= groups)
        .unwrap_or(1)
}

/// [`attend`] on oneDNN's bf16 products, one task per (image, group of
/// heads), each running oneDNN on its own thread: q (scaled), k and v
/// rounded to bf16 into dense head-major copies, `s = q k^T` in f32, the
/// softmax in f32 in place, `p` rounded to bf16, `o = p v` in f32, copied
/// into the heads' columns of `out`.
fn attention_bf16(
    qkv: &[f32],
    out: &mut [f32],
    b: usize,
    t: usize,
    d: usize,
    heads: usize,
) -> std::result::Result<(), onednn::OneDnnError> {
    assert!(qkv.len() >= b * t * 3 * d);
    let hd = d / heads;
    let scale = query_scale(hd);
    head_groups(out, (b, t, d, heads), |prods, out_ptr, (bi, h0, hpt)| {
        let n = hpt * t * hd;
        let (mut q, mut k, mut v) = (BF16.take(n), BF16.take(n), BF16.take(n));
        for hi in 0..hpt {
            for ti in 0..t {
                let row = &qkv[(bi * t + ti) * 3 * d + (h0 + hi) * hd..];
                let at = (hi * t + ti) * hd..(hi * t + ti + 1) * hd;
                onednn::to_bf16_scaled(&row[..hd], &mut q[at.clone()], scale);
                onednn::to_bf16_scaled(&row[d..d + hd], &mut k[at.clone()], 1.0);
                onednn::to_bf16_scaled(&row[2 * d..2 * d + hd], &mut v[at], 1.0);
            }
        }
        heads_task(prods, [&q, &k, &v], out_ptr, (bi, h0, hpt), (t, d, hd))
    })
}

/// Runs `task(products, out, (image, first head, heads))` for each
/// (image, group of heads) of the bf16 attention of `b` images of `t`
/// tokens, width `d`, in parallel; each task writes its heads' columns of
/// its image's rows of `out` [B*T, D].
fn head_groups(
    out: &mut [f32],
    (b, t, d, heads): (usize, usize, usize, usize),
    task: impl Fn(
            &Products,
            SendPtr,
            (usize, usize, usize),
        ) -> std::result::Result<(), onednn::OneDnnError>
        + Sync,
) -> std::result::Result<(), onednn::OneDnnError> {
    let hd = d / heads;
    assert!(out.len() >= b * t * d && hd * heads == d);
    let hpt = heads_per_task(b, heads);
    let prods = products((1, hpt, t, hd))?;
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..b * (heads / hpt)).into_par_iter().try_for_each(|i| {
        let (bi, h0) = (i / (heads / hpt), i % (heads / hpt) * hpt);
        task(&prods, out_ptr, (bi, h0, hpt))
    })
}

/// What the bf16 attention multiplies q by before rounding it:
/// `head width^-0.5`.
pub(super) fn query_scale(hd: usize) -> f32 {
    (hd as f32).powf(-0.5)
}

/// Three buffers of `len` bf16 values (stale) for [`attend_bf16_heads`]'s
/// operands.
pub(super) fn operand_buffers(len: usize) -> [crate::model::scratch::Scratch<'static, u16>; 3] {
    [BF16.take(len), BF16.take(len), BF16.take(len)]
}

/// [`attend`]'s bf16 kernel on operands rounded beforehand, as the 8-bit
/// q, k and v products write them ([`onednn::Int8Output::Bf16Heads`]):
/// `q` (times `head width^-0.5`), `k` and `v` each [image, head, token,
/// head width]. The same values as [`attend`] from the f32 rows.
pub(super) fn attend_bf16_heads(
    [q, k, v]: [&[u16]; 3],
    out: &mut [f32],
    b: usize,
    t: usize,
    d: usize,
    heads: usize,
) -> std::result::Result<(), onednn::OneDnnError> {
    assert!([q, k, v].iter().all(|x| x.len() >= b * t * d));
    let hd = d / heads;
    head_groups(out, (b, t, d, heads), |prods, out_ptr, (bi, h0, hpt)| {
        let at = (bi * heads + h0) * t * hd..(bi * heads + h0 + hpt) * t * hd;
        let ops = [&q[at.clone()], &k[at.clone()], &v[at]];
        heads_task(prods, ops, out_ptr, (bi, h0, hpt), (t, d, hd))
    })
}

/// One task of the bf16 attention: heads `h0..h0 + hpt` of image `bi`,
/// from their q (scaled), k and v, dense [hpt, t, hd] bf16: `s = q k^T`
/// in f32, the softmax in f32 in place, `p` rounded to bf16, `o = p v` in
/// f32, copied into the heads' columns of `out` ([B*T, D]).
fn heads_task(
    prods: &Products,
    [q, k, v]: [&[u16]; 3],
    out_ptr: SendPtr,
    (bi, h0, hpt): (usize, usize, usize),
    (t, d, hd): (usize, usize, usize),
) -> std::result::Result<(), onednn::OneDnnError> {
    let n = hpt * t * hd;
    assert!(q.len() >= n && k.len() >= n && v.len() >= n);
    let mut s = SCORES.take((hpt * t * t).max(n));
    // SAFETY: q, k and s are dense [hpt, t, hd] / [hpt, t, t], as the
    // product's operands describe.
    unsafe { prods.qk.run(q.as_ptr(), k.as_ptr(), s.as_mut_ptr(), 1)? };
    let mut p = BF16.take(hpt * t * t);
    let rows = s[..hpt * t * t].chunks_exact_mut(t);
    for (s, p) in rows.zip(p.chunks_exact_mut(t)) {
        simd::softmax_row_in_place(s);
        onednn::to_bf16_scaled(s, p, 1.0);
    }
    // The scores are spent: their buffer takes the output.
    let mut o = s;
    // SAFETY: p is dense [hpt, t, t], v and o [hpt, t, hd].
    unsafe { prods.pv.run(p.as_ptr(), v.as_ptr(), o.as_mut_ptr(), 1)? };
    for hi in 0..hpt {
        for ti in 0..t {
            let src = &o[(hi * t + ti) * hd..][..hd];
            // SAFETY: inside `out` (the callers assert its size); each task
            // writes only its own heads' columns of its own image's rows.
            unsafe {
                let dst = out_ptr.get().add((bi * t + ti) * d + (h0 + hi) * hd);
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst, hd);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention from operands rounded beforehand (as the 8-bit q, k and v
    /// products write them) gives the values of the bf16 attention that
    /// rounds the f32 q/k/v rows itself, to the bit.
    #[test]
    fn bf16_attention_from_rounded_heads_is_the_attention_of_the_rows() {
        if !onednn::native_bf16().unwrap_or(false) {
            eprintln!(
                "NOTICE: no bf16 instructions here (or no oneDNN): bf16 attention not tested"
            );
            return;
        }
        for (b, t, d, heads) in [(1, 197, 768, 12), (3, 197, 768, 12), (2, 5, 64, 4)] {
            let hd = d / heads;
            let qkv: Vec<f32> = (0..b * t * 3 * d)
                .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 4.0)
                .collect();
            let mut want = vec![0f32; b * t * d];
            attend(AttentionKernel::OneDnnBf16, &qkv, &mut want, b, t, d, heads).unwrap();
            let mut ops = vec![vec![0u16; b * t * d]; 3];
            for (j, op) in ops.iter_mut().enumerate() {
                let scale = if j == 0 { query_scale(hd) } else { 1.0 };
                for r in 0..b * t {
                    let (image, token) = (r / t, r % t);
                    for h in 0..heads {
                        let src = &qkv[r * 3 * d + j * d + h * hd..][..hd];
                        let at = ((image * heads + h) * t + token) * hd;
                        onednn::to_bf16_scaled(src, &mut op[at..at + hd], scale);
                    }
                }
            }
            let mut got = vec![f32::NAN; b * t * d];
            attend_bf16_heads([&ops[0], &ops[1], &ops[2]], &mut got, b, t, d, heads).unwrap();
            assert_eq!(want, got, "[{b}, {t}, {d}] x {heads} heads");
        }
    }

    /// bf16 attention against the f32 one, on ViT-B/16's head shape and on
    /// small ones (fewer tokens than a head is wide), one and three images.
    #[test]
    fn bf16_attention_matches_f32() {
        if !onednn::native_bf16().unwrap_or(false) {
            eprintln!(
                "NOTICE: no bf16 instructions here (or no oneDNN): bf16 attention not tested"
            );
            return;
        }
        for (b, t, d, heads) in [
            (1, 197, 768, 12),
            (3, 197, 768, 12),
            (2, 5, 64, 4),
            (1, 17, 48, 3),
        ] {
            let qkv: Vec<f32> = (0..b * t * 3 * d)
                .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 4.0)
                .collect();
            let mut want = vec![0f32; b * t * d];
            let mut got = vec![f32::NAN; b * t * d];
            attend(AttentionKernel::F32, &qkv, &mut want, b, t, d, heads).unwrap();
            attend(AttentionKernel::OneDnnBf16, &qkv, &mut got, b, t, d, heads).unwrap();
            let worst = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Outputs are averages of values within +-2: bf16 keeps about
            // three significant digits of each operand.
            assert!(worst < 0.05, "[{b}, {t}, {d}] x {heads} heads: {worst}");
        }
    }
}
