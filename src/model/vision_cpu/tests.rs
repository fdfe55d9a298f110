use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;

use super::HostF32;

use crate::model::config::{Activation, ClipConfig};
use crate::model::{Checkpoint, ClipModel};

/// A small random CLIP of a given vision geometry (image side, patch,
/// width, heads, layers).
fn model(geometry: (usize, usize, usize, usize, usize), act: Activation, seed: u64) -> ClipModel {
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
    let native_bf16 = crate::model::onednn::native_bf16().unwrap_or(false);
    let native_int8 = crate::model::onednn::native_int8().unwrap_or(false);
    match (crate::model::gemm_i8::Isa::best(), chosen) {
        // Where oneDNN's paths run, the fastest is taken, timed.
        (Some(_), "bf16") if native_bf16 => {
            assert!(kernel.starts_with("bf16 onednn "), "{kernel}");
        }
        (Some(_), "q8") if native_int8 && kernel.starts_with("q8 onednn ") => {}
        (Some(isa), "q8") => {
            let layers = kernel.split(", attention").next().unwrap_or_default();
            assert_eq!(layers, format!("q8 {isa}"), "{kernel}");
        }
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

/// The race `auto` and `q8` run: every path this CPU has times the same
/// one-block forward, the times are real (positive, finite), and a path
/// that cannot be built here is left out, not timed.
#[test]
fn the_precision_race_times_every_path() {
    use crate::model::vision::ReducedPath;
    let Some(isa) = crate::model::gemm_i8::Isa::best() else {
        eprintln!("NOTICE: no int8 kernel here: the precision race is not run");
        return;
    };
    let wide = model((32, 16, 768, 12, 1), Activation::QuickGelu, 3);
    let paths = [
        ReducedPath::Q8(isa),
        ReducedPath::OneDnnQ8,
        ReducedPath::Bf16,
    ];
    let race = wide.vision.race_reduced(&paths).unwrap();
    assert!(race.ms(ReducedPath::Q8(isa)).is_some(), "{race}");
    let native = |r: Result<bool, _>| r.unwrap_or(false);
    assert_eq!(
        race.ms(ReducedPath::OneDnnQ8).is_some(),
        native(crate::model::onednn::native_int8()),
        "{race}"
    );
    assert_eq!(
        race.ms(ReducedPath::Bf16).is_some(),
        native(crate::model::onednn::native_bf16()),
        "{race}"
    );
    for &(path, t) in &race.times {
        assert!(t.is_finite() && t > 0.0, "{path}: {race}");
    }
    assert!(race.winner().is_some());
}

/// oneDNN's products (f32, and bf16 where the CPU has it) against the
/// f32 forward and Candle's op-by-op one, at several batch sizes, and
/// with the f32 copies of the packed layers released.
#[test]
fn onednn_forwards_match_f32() {
    if let Err(e) = crate::model::onednn::available() {
        eprintln!("NOTICE: oneDNN path skipped: {e}");
        return;
    }
    let mut reduced = vec![];
    match crate::model::onednn::native_bf16() {
        Ok(true) => reduced.push(crate::model::onednn::DataType::Bf16),
        _ => eprintln!("NOTICE: no native bf16 on this CPU: oneDNN's bf16 products are not tested"),
    }
    match crate::model::onednn::native_int8() {
        Ok(true) => reduced.push(crate::model::onednn::DataType::Int8),
        _ => eprintln!("NOTICE: no VNNI or AMX on this CPU: oneDNN's int8 products are not tested"),
    }
    for act in [Activation::QuickGelu, Activation::GeluTanh] {
        let mut m = model((32, 16, 768, 12, 2), act, 9);
        for b in [1usize, 3] {
            let px = Tensor::randn(0f32, 1.0, (b, 3, 32, 32), &Device::Cpu).unwrap();
            m.vision.backend = crate::model::vision::VisionBackend::Candle;
            let candle = m.encode_images(&px).unwrap();
            m.vision.backend = crate::model::vision::VisionBackend::FusedF32;
            let full = m.encode_images(&px).unwrap();
            assert!(max_diff(&candle, &full) < 1e-4);
            m.vision
                .pack_onednn(crate::model::onednn::DataType::F32)
                .unwrap();
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
            for &dtype in &reduced {
                m.vision.pack_onednn(dtype).unwrap();
                assert_eq!(m.vision.precision(), dtype.as_str());
                let kernel = m.vision.kernel();
                assert!(kernel.contains(" onednn "), "{kernel}");
                let low = m.encode_images(&px).unwrap();
                let cos: Vec<f32> = (full.clone() * low)
                    .unwrap()
                    .sum(1)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert!(cos.iter().all(|&c| c > 0.99), "{kernel} cosines {cos:?}");
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
    use crate::model::vision::F32Kernel;
    let mut kernels = vec![];
    match crate::model::onednn::available() {
        Ok(()) => kernels.push((F32Kernel::OneDnn, "f32 onednn ")),
        Err(e) => eprintln!("NOTICE: oneDNN's f32 products are not tested: {e}"),
    }
    if crate::model::gemm_f32::PackedF32::available() {
        kernels.push((F32Kernel::Packed, "f32 packed avx2-fma"));
    } else {
        eprintln!("NOTICE: the packed f32 kernel is not tested: this CPU lacks AVX2 or FMA");
    }
    // ViT-B/16's width, and a width (64, MLP 256) the 8-bit panels do not
    // take but these kernels do.
    let towers = [
        ((32, 16, 768, 12, 3), Activation::QuickGelu),
        ((32, 16, 768, 12, 2), Activation::GeluTanh),
        ((48, 16, 64, 4, 3), Activation::QuickGelu),
    ];
    for (kernel, name) in kernels {
        for (geometry, act) in towers {
            let side = geometry.0;
            let mut m = model(geometry, act, 11);
            let mut gemm = m.vision.clone();
            assert!(!gemm.pack_f32(F32Kernel::Gemm).unwrap());
            for b in [1usize, 3] {
                let px = Tensor::randn(0f32, 1.0, (b, 3, side, side), &Device::Cpu).unwrap();
                let full = gemm.forward(&px).unwrap();
                if b == 1 {
                    assert!(m.vision.pack_f32(kernel).unwrap(), "{kernel:?}");
                    assert!(m.vision.kernel().starts_with(name), "{}", m.vision.kernel());
                    assert!(m.vision.f32_released());
                    assert_eq!(m.vision.release_f32_linears().unwrap(), 0, "already freed");
                }
                let f = m.vision.forward(&px).unwrap();
                let d = max_diff(&full, &f);
                assert!(d < 1e-4, "{kernel:?} {geometry:?} batch {b}: {d}");
            }
        }
    }
    // A tower whose layers do not fill whole 16-column panels (width 40)
    // stays on the gemm crate with the packed kernel.
    let mut m = model((32, 16, 40, 4, 2), Activation::QuickGelu, 3);
    assert!(!m.vision.pack_f32(F32Kernel::Packed).unwrap());
    assert!(
        m.vision.kernel().starts_with("f32 "),
        "{}",
        m.vision.kernel()
    );
}

#[test]
fn released_f32_weights_leave_the_8_bit_forward_and_the_maps_unchanged() {
    if crate::model::gemm_i8::Isa::best().is_none() {
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
