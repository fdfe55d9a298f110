//! CLIP's vision tower (ViT): patch embedding, class token, pre-LN
//! transformer, `ln_post` on the class token, projection to the joint space.
//!
//! Tensor names follow HF's `vision_model.*` / `visual_projection` layout;
//! OpenAI-named checkpoints are renamed on load (`model::weights`).

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

use super::config::VisionConfig;
use super::gemm_i8::Isa;
use super::layers::{linear_no_bias, EncoderLayer, LayerNorm};
use super::vision_cpu::QuantizedLinears;

/// What a vision forward returns.
#[derive(Debug)]
pub struct VisionOutput {
    /// Projected image embedding, not normalised: [B, E].
    pub embedding: Tensor,
    /// Class-token hidden state after each transformer layer (before
    /// `ln_post`), when asked for: `layers` x [B, D].
    pub layer_cls: Vec<Tensor>,
    /// Input of the last block (residual stream), when asked for: [B, T, D].
    pub last_block_input: Option<Tensor>,
}

/// How the tower runs, chosen when it is built ([`VisionTower::new`]) or
/// when the precision is set ([`VisionTower::set_quantized`]), never per call.
#[derive(Clone, Debug)]
pub enum VisionBackend {
    /// Candle's op-by-op forward: any device and dtype, with gradients.
    Candle,
    /// The fused CPU forward in f32 (`vision_cpu`).
    FusedF32,
    /// The fused CPU forward with packed linear layers: this crate's 8-bit
    /// kernels (`--precision q8`) or oneDNN's (`--precision bf16`).
    FusedPacked(Arc<QuantizedLinears>),
}

impl VisionBackend {
    /// The packed (8-bit or oneDNN) layers, when the backend has them.
    pub fn quantized(&self) -> Option<&QuantizedLinears> {
        match self {
            Self::FusedPacked(q) => Some(q),
            _ => None,
        }
    }

    pub fn is_fused(&self) -> bool {
        !matches!(self, Self::Candle)
    }
}

/// Which f32 products the CPU forward's block layers run
/// ([`VisionTower::pack_f32`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F32Kernel {
    /// The `gemm` crate on the weights as loaded.
    Gemm,
    /// oneDNN's products, weights reordered once.
    OneDnn,
    /// This crate's AVX2 + FMA kernel, weights packed once.
    Packed,
}

/// The kernel an override variable names: `Ok(None)` where it is unset
/// or empty, `Err` with its value where it names none of `choices`.
pub(crate) fn env_choice<T: Copy>(
    var: &str,
    choices: &[(&str, T)],
) -> std::result::Result<Option<T>, String> {
    match std::env::var(var).as_deref().map(str::trim) {
        Ok("") | Err(_) => Ok(None),
        Ok(value) => choices
            .iter()
            .find(|(name, _)| *name == value)
            .map(|&(_, kernel)| Some(kernel))
            .ok_or_else(|| value.to_string()),
    }
}

/// `CLIPER_F32` names no kernel.
#[derive(Debug, thiserror::Error)]
#[error("CLIPER_F32={0:?} is not a kernel: use gemm, onednn or packed, or unset it")]
pub struct F32KernelError(pub String);

impl F32Kernel {
    /// The kernel `CLIPER_F32` forces, `None` when it is unset or empty.
    pub fn from_env() -> std::result::Result<Option<Self>, F32KernelError> {
        let choices = [
            ("gemm", Self::Gemm),
            ("onednn", Self::OneDnn),
            ("packed", Self::Packed),
        ];
        env_choice("CLIPER_F32", &choices).map_err(F32KernelError)
    }
}

/// Which 8-bit products `--precision q8` runs (`CLIPER_Q8` forces one;
/// unset, the faster of the two on this CPU, timed at load).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Q8Kernel {
    /// This crate's kernels ([`super::gemm_i8`]): weights per channel and
    /// group of 256 inputs, activations per row and group.
    Own,
    /// oneDNN's int8 matmul (AMX-INT8 tiles on the Xeons that have them,
    /// else VNNI): weights per channel, activations per row.
    OneDnn,
}

/// `CLIPER_Q8` names no kernel, or one that another override rules out.
#[derive(Debug, thiserror::Error)]
pub enum Q8KernelError {
    #[error("CLIPER_Q8={0:?} is not an 8-bit kernel: use own or onednn, or unset it")]
    Unknown(String),
    #[error("CLIPER_Q8=onednn runs oneDNN's int8 products, which pick their own instructions: unset CLIPER_ISA (or --isa) or CLIPER_Q8")]
    WithIsa,
}

impl Q8Kernel {
    /// The kernel `CLIPER_Q8` forces, `None` when it is unset or empty.
    pub fn from_env() -> std::result::Result<Option<Self>, Q8KernelError> {
        env_choice("CLIPER_Q8", &[("own", Self::Own), ("onednn", Self::OneDnn)])
            .map_err(Q8KernelError::Unknown)
    }

    /// [`from_env`](Self::from_env), also refusing `CLIPER_Q8=onednn` beside
    /// `CLIPER_ISA` (which names one of our kernels): said before a model
    /// loads.
    pub fn check_env() -> std::result::Result<Option<Self>, Q8KernelError> {
        let kernel = Self::from_env()?;
        if kernel == Some(Self::OneDnn) && named_isa_env() {
            return Err(Q8KernelError::WithIsa);
        }
        Ok(kernel)
    }
}

/// Whether `CLIPER_ISA` names an instruction set (our 8-bit kernels).
fn named_isa_env() -> bool {
    std::env::var("CLIPER_ISA").is_ok_and(|v| !v.trim().is_empty())
}

/// A reduced-precision CPU path of the block layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReducedPath {
    /// This crate's 8-bit kernels, on the instruction set chosen.
    Q8(Isa),
    /// oneDNN's int8 products.
    OneDnnQ8,
    /// oneDNN's bf16 products.
    Bf16,
}

impl std::fmt::Display for ReducedPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReducedPath::Q8(isa) => write!(f, "q8 {isa}"),
            ReducedPath::OneDnnQ8 => write!(f, "q8 onednn"),
            ReducedPath::Bf16 => write!(f, "bf16 onednn"),
        }
    }
}

/// The reduced-precision paths `q8` (`with_bf16` false) or `auto` (true)
/// chooses among, after the overrides, and whether `CLIPER_Q8=onednn`
/// forced oneDNN's int8 (then its failures are errors, not fallbacks):
/// - an instruction set named (`--isa`, `CLIPER_ISA`): our kernels on it;
/// - `CLIPER_Q8=own`: our kernels (and bf16 for `auto`);
/// - `CLIPER_Q8=onednn`: oneDNN's int8 (and bf16 for `auto`);
/// - else every path this CPU runs.
///
/// (Under `auto`, towers whose layers do not all fit our 8-bit panels get
/// f32 before this is asked, whatever `CLIPER_Q8` says.)
fn reduced_paths(
    isa: Option<Isa>,
    named_isa: bool,
    with_bf16: bool,
) -> Result<(Vec<ReducedPath>, bool)> {
    let ours = isa.map(ReducedPath::Q8);
    let kernel = Q8Kernel::from_env().map_err(candle_core::Error::wrap)?;
    let (mut paths, forced) = match (kernel, named_isa) {
        (Some(Q8Kernel::OneDnn), true) => {
            return Err(candle_core::Error::wrap(Q8KernelError::WithIsa));
        }
        (_, true) => return Ok((ours.into_iter().collect(), false)),
        (Some(Q8Kernel::OneDnn), false) => {
            if !super::onednn::native_int8().map_err(candle_core::Error::wrap)? {
                let isa = super::onednn::isa().map_err(candle_core::Error::wrap)?;
                return Err(candle_core::Error::wrap(
                    super::onednn::OneDnnError::NoInt8 { isa },
                ));
            }
            (vec![ReducedPath::OneDnnQ8], true)
        }
        (Some(Q8Kernel::Own), false) => (ours.into_iter().collect(), false),
        (None, false) => {
            let mut paths: Vec<_> = ours.into_iter().collect();
            if super::onednn::native_int8().unwrap_or(false) {
                paths.push(ReducedPath::OneDnnQ8);
            }
            (paths, false)
        }
    };
    if with_bf16 && super::onednn::native_bf16().unwrap_or(false) {
        paths.push(ReducedPath::Bf16);
    }
    Ok((paths, forced))
}

/// One block timed on reduced-precision CPU paths
/// ([`VisionTower::race_reduced`]), for `--precision auto` and `q8`:
/// each path that could be built and its fastest milliseconds.
#[derive(Clone, Debug)]
pub struct PrecisionRace {
    pub times: Vec<(ReducedPath, f64)>,
}

impl PrecisionRace {
    /// The fastest path timed, `None` when none could be.
    pub fn winner(&self) -> Option<ReducedPath> {
        self.times
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|&(p, _)| p)
    }

    /// The fastest milliseconds of `path`, when it was timed.
    pub fn ms(&self, path: ReducedPath) -> Option<f64> {
        self.times.iter().find(|t| t.0 == path).map(|t| t.1)
    }
}

impl std::fmt::Display for PrecisionRace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "one block:")?;
        if self.times.is_empty() {
            write!(f, " no path could be timed")?;
        }
        for (i, (p, t)) in self.times.iter().enumerate() {
            write!(f, "{} {p} {t:.2} ms", if i == 0 { "" } else { "," })?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct VisionTower {
    patch_embedding: Conv2d,
    class_embedding: Tensor,    // [D]
    position_embedding: Tensor, // [T, D]
    pre_layernorm: LayerNorm,
    pub layers: Vec<EncoderLayer>,
    pub post_layernorm: LayerNorm,
    pub projection: Linear,
    pub config: VisionConfig,
    /// Fused CPU kernels where the weights allow them (f32 on the CPU, not
    /// trained here), Candle's ops otherwise. Set it to
    /// [`VisionBackend::Candle`] to compare; a tracked input (a gradient
    /// wanted) runs Candle's ops whatever it says.
    pub backend: VisionBackend,
}

impl VisionTower {
    /// `vb` at the checkpoint root (it reaches `vision_model.*` and
    /// `visual_projection`).
    pub fn new(cfg: &VisionConfig, embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let conv_cfg = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let patch_embedding = candle_nn::conv2d_no_bias(
            3,
            cfg.width,
            cfg.patch_size,
            conv_cfg,
            emb.pp("patch_embedding"),
        )?;
        let class_embedding = emb.get(cfg.width, "class_embedding")?;
        let position_embedding = emb.get((cfg.tokens(), cfg.width), "position_embedding.weight")?;
        let pre_layernorm = LayerNorm::new(cfg.width, cfg.layer_norm_eps, vm.pp("pre_layrnorm"))?;
        let layers = EncoderLayer::stack(&cfg.encoder, vm.pp("encoder"))?;
        let post_layernorm =
            LayerNorm::new(cfg.width, cfg.layer_norm_eps, vm.pp("post_layernorm"))?;
        let projection = linear_no_bias(cfg.width, embed_dim, vb.pp("visual_projection"))?;
        let mut tower = Self {
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_layernorm,
            layers,
            post_layernorm,
            projection,
            config: cfg.clone(),
            backend: VisionBackend::Candle,
        };
        if super::vision_cpu::supports(&tower, None) {
            super::vision_cpu::store_transposed(&mut tower)?;
            tower.backend = VisionBackend::FusedF32;
        }
        Ok(tower)
    }

    /// Patch-embedding weight [D, 3, P, P], class embedding [D] and
    /// position embeddings [T, D].
    pub fn embedding_weights(&self) -> (&Tensor, &Tensor, &Tensor) {
        (
            self.patch_embedding.weight(),
            &self.class_embedding,
            &self.position_embedding,
        )
    }

    pub fn pre_layernorm(&self) -> &LayerNorm {
        &self.pre_layernorm
    }

    /// Quantizes the blocks' linear layers to 8 bits (`true`), on the best
    /// instruction set this CPU has (or `CLIPER_ISA`'s), or goes back to f32
    /// (`false`). Only the CPU f32 fast path uses them.
    pub fn set_quantized(&mut self, on: bool) -> Result<()> {
        if !on {
            if self.f32_released() {
                candle_core::bail!(
                    "this tower's f32 block weights were released after quantizing: load the model again in f32"
                )
            }
            if self.backend.is_fused() {
                self.backend = VisionBackend::FusedF32;
            }
            return Ok(());
        }
        self.quantize(None)
    }

    /// Quantizes the blocks' linear layers to 8 bits: for this crate's
    /// kernel on `forced` (or `CLIPER_ISA`'s) when an instruction set is
    /// named; else on the faster on this CPU of this crate's kernel on its
    /// best instruction set and oneDNN's int8 products (AMX-INT8 or VNNI),
    /// timed on one block at load ([`race_reduced`](Self::race_reduced));
    /// `CLIPER_Q8=own|onednn` forces one of the two.
    pub fn quantize(&mut self, forced: Option<Isa>) -> Result<()> {
        if self.f32_released() {
            candle_core::bail!(
                "this tower's f32 block weights were released after quantizing: load the model again to quantize it for another kernel"
            )
        }
        let named_isa = forced.is_some() || named_isa_env();
        let isa = Isa::select(forced).map_err(candle_core::Error::wrap)?;
        if !super::vision_cpu::supports(self, None) {
            candle_core::bail!(
                "8-bit precision runs only on the CPU in f32: use --precision f32 on this device"
            )
        }
        let (paths, forced_onednn) = reduced_paths(isa, named_isa, false)?;
        if self.choose(&paths, "q8") == Some(ReducedPath::OneDnnQ8) {
            match self.pack_onednn(super::onednn::DataType::Int8) {
                Ok(()) => return Ok(()),
                Err(e) if forced_onednn => return Err(e),
                Err(e) => log::warn!("oneDNN's int8 products were fastest but could not be packed ({e}): our 8-bit kernels run"),
            }
        }
        let q = QuantizedLinears::new(self, isa)?;
        if !super::vision_cpu::supports(self, Some(&q)) {
            candle_core::bail!("the 8-bit layers do not fit this tower's blocks")
        }
        self.backend = VisionBackend::FusedPacked(Arc::new(q));
        Ok(())
    }

    /// Packs the blocks' linear layers for oneDNN's products in `dtype`
    /// (`--precision bf16`: AMX or AVX512-BF16 through oneDNN). An error
    /// names what is missing: the library, or bf16 instructions.
    pub fn pack_onednn(&mut self, dtype: super::onednn::DataType) -> Result<()> {
        if self.f32_released() {
            candle_core::bail!(
                "this tower's f32 block weights were released after packing: load the model again"
            )
        }
        if !super::vision_cpu::supports(self, None) {
            candle_core::bail!(
                "oneDNN's products run only on the CPU in f32 weights: use --device cpu"
            )
        }
        let q = QuantizedLinears::onednn(self, dtype)?;
        if !super::vision_cpu::supports(self, Some(&q)) {
            candle_core::bail!("the oneDNN layers do not fit this tower's blocks")
        }
        self.backend = VisionBackend::FusedPacked(Arc::new(q));
        Ok(())
    }

    /// Whether every block layer's shape fits the 8-bit kernels' panels
    /// and groups (the towers q8 packs: ViT-B/16 and its kin).
    fn block_layers_fit_panels(&mut self) -> bool {
        self.block_layers_fit(super::gemm_i8::PackedWeights::fits)
    }

    /// Whether every block layer's [n, k] shape passes `fits`.
    fn block_layers_fit(&mut self, fits: impl Fn(usize, usize) -> bool) -> bool {
        self.layers.iter_mut().all(|layer| {
            layer
                .linears_mut()
                .iter()
                .all(|l| l.weight().dims2().is_ok_and(|(n, k)| fits(n, k)))
        })
    }

    /// The path to pack among `paths`: the only one, or the fastest of a
    /// race ([`race_reduced`](Self::race_reduced)), logged as `what`'s
    /// choice; the first when the race could not run.
    fn choose(&self, paths: &[ReducedPath], what: &str) -> Option<ReducedPath> {
        if paths.len() <= 1 {
            return paths.first().copied();
        }
        match self.race_reduced(paths) {
            Ok(race) => {
                log::info!("precision {what}: {race}");
                race.winner().or(paths.first().copied())
            }
            Err(e) => {
                log::info!("precision {what}: paths not timed ({e}); {}", paths[0]);
                paths.first().copied()
            }
        }
    }

    /// Times this tower's first block, alone, on the fused forward with
    /// each of `paths` that can be built (one that cannot is left out,
    /// with a log line): one image,
    /// interleaved, the fastest of seven runs after two: the fastest, not
    /// the median, since the live app races while its window and
    /// detection start beside it, and under that contention the medians
    /// of two paths 10% apart came out in either order. The block rather than
    /// one product, because the paths differ around the products too
    /// (bf16 converts every product's input; our q8 quantizes the input
    /// of q, k and v once); one block, so that nothing of the rest of the
    /// tower is packed twice. About 0.1 s at load for ViT-B/16.
    pub fn race_reduced(&self, paths: &[ReducedPath]) -> Result<PrecisionRace> {
        let mut one = self.clone();
        one.layers.truncate(1);
        if one.layers.is_empty() {
            candle_core::bail!("the tower has no blocks to time");
        }
        let mut towers = Vec::new();
        for &path in paths {
            let mut t = one.clone();
            let packed = match path {
                ReducedPath::Q8(isa) => QuantizedLinears::new(&t, Some(isa)).map(|q| {
                    t.backend = VisionBackend::FusedPacked(Arc::new(q));
                }),
                ReducedPath::OneDnnQ8 => t.pack_onednn(super::onednn::DataType::Int8),
                ReducedPath::Bf16 => t.pack_onednn(super::onednn::DataType::Bf16),
            };
            match packed {
                Ok(()) => towers.push((path, t, Some(Vec::new()))),
                Err(e) => log::info!("precision race: {path} left out: {e}"),
            }
        }
        let s = self.config.image_size;
        let device = self.class_embedding.device();
        let px = Tensor::zeros((1, 3, s, s), DType::F32, device)?;
        for run in 0..9 {
            for (path, tower, slot) in &mut towers {
                let Some(times) = slot else { continue };
                let t = std::time::Instant::now();
                match tower.forward(&px) {
                    Ok(_) if run >= 2 => times.push(t.elapsed().as_secs_f64() * 1e3),
                    Ok(_) => {}
                    Err(e) => {
                        log::info!("precision race: {path} left out: {e}");
                        *slot = None;
                    }
                }
            }
        }
        let times = towers
            .into_iter()
            .filter_map(|(path, _, v)| Some((path, v?.into_iter().fold(f64::INFINITY, f64::min))))
            .collect();
        Ok(PrecisionRace { times })
    }

    /// `--precision f32` on the CPU, the f32 products measured fastest on
    /// this kind of CPU (figures in the README's "oneDNN" and "The AVX2
    /// path" sections, which also time ViT-L/14's shape), where every
    /// block layer fits the kernel ([`pack_f32`](Self::pack_f32)):
    /// - oneDNN's where it runs its AVX-512 kernels (on Intel CPUs with two
    ///   FMA ports oneDNN is what OpenVINO's f32 runs);
    /// - else this crate's packed AVX2 + FMA kernel ([`super::gemm_f32`]);
    /// - else the `gemm` crate, unpacked.
    ///
    /// `CLIPER_F32=gemm|onednn|packed` forces one. The f32 copies are
    /// freed block by block as they are packed, all but the last block's.
    /// Returns whether it packed.
    pub fn pack_f32_fastest(&mut self) -> Result<bool> {
        let kernel = match F32Kernel::from_env().map_err(candle_core::Error::wrap)? {
            Some(forced) => forced,
            None if super::onednn::isa().is_ok_and(|isa| isa.starts_with("avx512_core")) => {
                F32Kernel::OneDnn
            }
            None if super::gemm_f32::PackedF32::available() => F32Kernel::Packed,
            None => F32Kernel::Gemm,
        };
        self.pack_f32(kernel)
    }

    /// Packs the block layers for `kernel`'s f32 products (nothing for
    /// [`F32Kernel::Gemm`]), where the tower runs the fused CPU forward and
    /// every block layer fits the kernel (any shape for oneDNN, whole
    /// 16-column panels for the packed kernel); returns whether it packed.
    pub fn pack_f32(&mut self, kernel: F32Kernel) -> Result<bool> {
        // oneDNN takes any shape; the packed kernel wants whole panels.
        let fits = match kernel {
            F32Kernel::Gemm => return Ok(false),
            F32Kernel::OneDnn => self.block_layers_fit(|n, k| n > 0 && k > 0),
            F32Kernel::Packed => self.block_layers_fit(super::gemm_f32::PackedF32::fits),
        };
        if !fits || self.f32_released() || !super::vision_cpu::supports(self, None) {
            return Ok(false);
        }
        let q = match kernel {
            F32Kernel::Packed => QuantizedLinears::f32_releasing(self)?,
            _ => QuantizedLinears::onednn_releasing(self, super::onednn::DataType::F32)?,
        };
        self.backend = VisionBackend::FusedPacked(Arc::new(q));
        Ok(true)
    }

    /// `--precision auto` on the CPU, the fastest path whose agreement with
    /// f32 holds, by measurement:
    /// - where every block layer fits this crate's 8-bit kernels (measured
    ///   3x faster than f32 at 100% top-1 agreement, `cliper bench`), the
    ///   fastest here of those kernels, oneDNN's int8 products (where
    ///   oneDNN runs VNNI or AMX-INT8) and oneDNN's bf16 products (where
    ///   the CPU has AVX512-BF16 or AMX-BF16): one block is timed each way
    ///   at load ([`race_reduced`](Self::race_reduced)), since which wins
    ///   depends on the CPU (on a Zen 4 EPYC our q8 is 1.6x faster than
    ///   bf16 and 1.1x faster than oneDNN's int8; on AMX Xeons the peers'
    ///   AMX paths run twice as fast as our q8);
    /// - else f32 on the fastest f32 products
    ///   ([`pack_f32_fastest`](Self::pack_f32_fastest); Candle's Q8_0, the
    ///   8-bit fallback for other shapes, is not measured to win).
    ///
    /// Returns the precision chosen (`bf16`, `q8` or `f32`).
    pub fn pack_fastest(&mut self) -> Result<&'static str> {
        if !super::vision_cpu::supports(self, None) {
            return Ok("f32");
        }
        // The towers given a reduced precision are the same on every CPU:
        // those whose every block layer fits the int8 kernels (ViT-B/16 and
        // its kin); the others get the fastest f32 products.
        let Some(isa) = Isa::select(None).map_err(candle_core::Error::wrap)? else {
            self.pack_f32_fastest()?;
            return Ok("f32");
        };
        if !self.block_layers_fit_panels() {
            // Other shapes (ViT-L/14): the fastest f32 products.
            self.pack_f32_fastest()?;
            return Ok("f32");
        }
        let named_isa = named_isa_env();
        let (paths, forced_onednn) = reduced_paths(Some(isa), named_isa, true)?;
        let onednn = match self.choose(&paths, "auto") {
            Some(ReducedPath::Bf16) => Some((super::onednn::DataType::Bf16, "bf16")),
            Some(ReducedPath::OneDnnQ8) => Some((super::onednn::DataType::Int8, "q8")),
            _ => None,
        };
        if let Some((dtype, precision)) = onednn {
            match self.pack_onednn(dtype) {
                Ok(()) => return Ok(precision),
                Err(e) => {
                    log::warn!("oneDNN's {precision} was fastest but could not be packed ({e})")
                }
            }
            if forced_onednn {
                // CLIPER_Q8=onednn: its int8 products or an error.
                self.pack_onednn(super::onednn::DataType::Int8)?;
                return Ok("q8");
            }
        }
        let q = QuantizedLinears::new(self, Some(isa))?;
        if !q.all_int8() || !super::vision_cpu::supports(self, Some(&q)) {
            return Ok("f32");
        }
        self.backend = VisionBackend::FusedPacked(Arc::new(q));
        Ok("q8")
    }

    /// Frees the f32 weights of the block layers that run on this crate's
    /// 8-bit kernel (the quantized copies are what the forward reads), all
    /// but the last block's: explanation maps run the last block in f32
    /// through Candle (fast maps, Grad-CAM). ViT-B/16: 312 of the 340 MB
    /// of block weights. Afterwards the tower cannot go back to f32
    /// ([`set_quantized`](Self::set_quantized)`(false)` is an error). Returns
    /// how many values were freed; 0 when the tower is not 8-bit.
    pub fn release_f32_linears(&mut self) -> Result<usize> {
        let Some(q) = self.backend.quantized().map(|q| q.packed_mask()) else {
            return Ok(0);
        };
        let keep = self.layers.len().saturating_sub(1);
        let mut freed = 0;
        for (layer, mask) in self.layers.iter_mut().zip(q).take(keep) {
            for (l, packed) in layer.linears_mut().into_iter().zip(mask) {
                if packed {
                    freed += release_linear(l)?;
                }
            }
        }
        Ok(freed)
    }

    /// Whether [`release_f32_linears`](Self::release_f32_linears) freed
    /// some of the f32 block weights.
    pub fn f32_released(&self) -> bool {
        self.layers.iter().any(|layer| {
            let (fc1, fc2, _) = layer.mlp.parts();
            layer
                .self_attn
                .projections()
                .into_iter()
                .chain([fc1, fc2])
                .any(|l| l.weight().elem_count() == 0)
        })
    }

    /// The precision the forward runs in: `q8` or `bf16` (or `f32`
    /// through oneDNN) when packed, else the weights' dtype (`f32`, `f16`,
    /// `bf16`).
    pub fn precision(&self) -> &'static str {
        if let Some(q) = self.backend.quantized() {
            return q.precision();
        }
        match self.patch_embedding.weight().dtype() {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            _ => "f32",
        }
    }

    /// Which path the forward runs, as the status lines name it: `f32
    /// avx512` or `f32 avx2` (the fused forward; gemm's kernels), `q8
    /// avx512-vnni`, `q8 avx-vnni`, `q8 avx2` or `q8 q8_0`, or `candle` (op
    /// by op, as on GPUs).
    pub fn kernel(&self) -> String {
        match &self.backend {
            VisionBackend::Candle => "candle".into(),
            VisionBackend::FusedF32 => format!("f32 {}", super::vision_cpu::f32_isa()),
            VisionBackend::FusedPacked(q) => format!("{} {}", q.precision(), q.kernel()),
        }
    }

    /// Token sequence entering the first block: [B, T, D].
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let d = self.config.width;
        let patches = self.patch_embedding.forward(pixels)?; // [B, D, g, g]
        let patches = patches.flatten_from(2)?.transpose(1, 2)?; // [B, g*g, D]
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?
            .to_dtype(patches.dtype())?;
        let x = Tensor::cat(&[&cls, &patches], 1)?;
        let x = x.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        self.pre_layernorm.forward(&x)
    }

    /// Full forward. `pixels`: [B, 3, S, S] normalised.
    pub fn forward_with(
        &self,
        pixels: &Tensor,
        want_layer_cls: bool,
        want_last_input: bool,
    ) -> Result<VisionOutput> {
        let (_, c, h, w) = pixels.dims4()?;
        let s = self.config.image_size;
        if c != 3 || h != s || w != s {
            candle_core::bail!(
                "vision tower expects [B, 3, {s}, {s}] pixels, got [_, {c}, {h}, {w}]"
            )
        }
        if self.backend.is_fused() && !pixels.track_op() {
            return super::vision_cpu::forward(self, pixels, want_layer_cls, want_last_input);
        }
        if self.backend.quantized().is_some() {
            candle_core::bail!(
                "8-bit precision has no gradients: use --precision f32 to explain or train"
            )
        }
        let mut x = self.embed(pixels)?;
        let mut layer_cls = Vec::new();
        let mut last_block_input = None;
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            if want_last_input && i + 1 == n {
                last_block_input = Some(x.clone());
            }
            x = layer.forward(&x, None)?;
            if want_layer_cls {
                layer_cls.push(x.narrow(1, 0, 1)?.squeeze(1)?);
            }
        }
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?; // [B, D]
        let pooled = self.post_layernorm.forward(&cls)?;
        let embedding = self.projection.forward(&pooled)?;
        Ok(VisionOutput {
            embedding,
            layer_cls,
            last_block_input,
        })
    }

    /// Projected image embeddings [B, E] (not normalised).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with(pixels, false, false)?.embedding)
    }

    /// Per-patch embeddings through the last block's value path (no
    /// query-key mixing, as in MaskCLIP), `ln_post` and the projection:
    /// [B, g*g, E], from the last block's input.
    pub fn patch_value_embeddings(&self, last_block_input: &Tensor) -> Result<Tensor> {
        if self.backend.is_fused() && !last_block_input.track_op() {
            return super::vision_cpu::patch_value_embeddings(self, last_block_input);
        }
        let Some(last) = self.layers.last() else {
            candle_core::bail!("vision tower has no layers")
        };
        let x = last_block_input;
        let v = last.self_attn.value_path(&last.layer_norm1.forward(x)?)?;
        let x = (x + v)?;
        let x = (&x + last.mlp.forward(&last.layer_norm2.forward(&x)?)?)?;
        let patches = x.narrow(1, 1, x.dim(1)? - 1)?;
        let patches = self.post_layernorm.forward(&patches)?;
        self.projection.forward(&patches)
    }

    pub fn embed_dim(&self) -> Result<usize> {
        self.projection.weight().dim(D::Minus2)
    }
}

/// Replaces `l`'s weight by an empty [0, k] one (its packed copy is what
/// the forward reads); the number of values freed.
pub(crate) fn release_linear(l: &mut Linear) -> Result<usize> {
    let w = l.weight();
    let freed = w.elem_count();
    if freed == 0 {
        return Ok(0);
    }
    let k = w.dim(1)?;
    let empty = Tensor::zeros((0, k), DType::F32, w.device())?;
    *l = Linear::new(empty, l.bias().cloned());
    Ok(freed)
}
