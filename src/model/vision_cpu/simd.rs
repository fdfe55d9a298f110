//! Vectorised elementwise kernels. Each body is compiled once per
//! instruction set (AVX-512, AVX2+FMA, baseline) and picked at run time, so
//! a portable build still uses the wide registers.

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
