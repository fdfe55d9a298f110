//! `cliper`: live, interpretable facial-expression recognition with CLIPER
//! (CLIP ViT-B/16 plus learned expression text descriptors) on Candle.
//!
//! The library holds everything the GUI and the CLI share; `main.rs` is a thin
//! command-line edge over it.

// `multiversion!`: declares `pub fn $name(args)` whose `$body` is compiled
// once per instruction set (AVX-512, AVX2+FMA, baseline) and picked at run
// time, so that a portable build still uses the wide registers (the fused
// vision forward and the face detector's kernels use it).
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident : $ty:ty),*) $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the features were detected.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the features were detected.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub mod app;
pub mod batch;
pub mod charts;
pub mod commands;
pub mod model;
pub mod parallel;
pub mod pipeline;
pub mod progress;
pub mod session;
pub mod stop;
pub mod train;
pub mod vision;
