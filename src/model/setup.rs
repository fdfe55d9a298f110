//! Loading a model for the pipeline, `train` and `eval`: the CLIP weights
//! (with a CLIPER checkpoint's fine-tuned vision tower, or the whole CLIP a
//! DFER-CLIP file holds), its preprocessing, and the descriptor bank (with
//! an Exp-CLIP head).

use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::model::cliper::bank::{self, BankError, DescriptorBank, ProjectionHead};
use crate::model::cliper::checkpoint::{CliperCheckpoint, CliperFileError};
use crate::model::device::{self, DeviceError, Precision};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::weights::{self, Checkpoint, WeightsError};
use crate::model::ClipModel;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Cliper(#[from] CliperFileError),
    #[error(transparent)]
    Bank(#[from] BankError),
    #[error(transparent)]
    F32Kernel(#[from] crate::model::vision::F32KernelError),
    #[error(transparent)]
    Q8Kernel(#[from] crate::model::vision::Q8KernelError),
    #[error(transparent)]
    AttentionKernel(#[from] crate::model::vision_cpu::AttentionKernelError),
    #[error("{name} is not installed (no {path}): run `cliper weights fetch {name}` (`cliper weights list` shows what it is)")]
    NotInstalled { name: String, path: PathBuf },
    #[error("{head}: an Exp-CLIP head applies to zero-shot banks (the built-in descriptions or --prompts FILE), not to the trained model {bank}: drop --head, or the trained model")]
    HeadOnLearned { head: String, bank: String },
}

/// Which descriptors to score against.
#[derive(Clone, Debug, Default)]
pub enum BankSource {
    /// The built-in zero-shot descriptions.
    #[default]
    BuiltinZeroShot,
    /// A zero-shot prompts file.
    Prompts(PathBuf),
    /// A CLIPER checkpoint with learned descriptors.
    Learned(PathBuf),
}

impl BankSource {
    /// A learned bank's checkpoint, loaded; `None` for the other kinds.
    pub fn checkpoint(&self) -> Result<Option<CliperCheckpoint>, CliperFileError> {
        match self {
            BankSource::Learned(p) => CliperCheckpoint::load(p).map(Some),
            _ => Ok(None),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ModelSpec {
    /// `--weights`: file or folder; `None` searches the usual places.
    pub weights: Option<PathBuf>,
    pub bank: BankSource,
    /// `auto`, `cpu`, `cuda`, `metal`.
    pub device: String,
    /// `--head`: an Exp-CLIP projection head for zero-shot banks.
    pub head: Option<PathBuf>,
    /// `--precision` of the image encoder; `auto` on the CPU is the fastest
    /// path whose agreement holds (`VisionTower::pack_fastest`), else the
    /// device's default dtype.
    pub precision: Precision,
}

/// A loaded model with its bank.
pub struct Loaded {
    pub clip: ClipModel,
    pub bank: DescriptorBank,
    pub tokenizer: ClipTokenizer,
    /// The CLIPER checkpoint, when one was given (temporal weights live there).
    pub cliper: Option<CliperCheckpoint>,
}

/// Loads the model, its bank and checkpoint that `spec` names, the image
/// encoder in `spec.precision`.
pub fn load(spec: &ModelSpec) -> Result<Loaded, SetupError> {
    let precision = spec.precision;
    let dev_name = if spec.device.is_empty() {
        "auto"
    } else {
        &spec.device
    };
    for p in [
        match &spec.bank {
            BankSource::Learned(p) => Some(p),
            _ => None,
        },
        spec.head.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        if let Some(e) = crate::model::zoo::not_installed(p) {
            return Err(SetupError::NotInstalled {
                name: e.name.to_string(),
                path: p.clone(),
            });
        }
    }
    let device = device::select(dev_name)?;
    let dtype = precision.dtype(&device)?;
    // Said before a long load, not after it.
    crate::model::vision::F32Kernel::from_env()?;
    crate::model::vision::Q8Kernel::check_env()?;
    crate::model::vision_cpu::AttentionKernel::from_env()?;
    let mut cliper = spec.bank.checkpoint()?;
    // A DFER-CLIP file holds its whole CLIP: no separate weights needed.
    let own_clip = cliper.as_mut().and_then(CliperCheckpoint::take_clip);
    let mut ckpt = match own_clip {
        Some((path, tensors)) => Checkpoint::from_tensors(&path, tensors)?,
        None => Checkpoint::load(&weights::locate(spec.weights.as_deref())?, DType::F32)?,
    };
    if let Some(c) = &cliper {
        c.apply_vision(&mut ckpt)?;
    }
    let mut clip = ClipModel::from_checkpoint(ckpt, &device, dtype)?;
    // DFER-CLIP and Exp-CLIP were trained and measured on squashed,
    // unnormalised pixels: give their models the pixels they know.
    if cliper.as_ref().is_some_and(|c| c.is_dfer_clip()) || spec.head.is_some() {
        clip.preprocessing = crate::model::preprocess::Preprocessing::Squash;
    }
    // Inference alone from here: the packed layers need no f32 copy.
    let released = precision
        .pack(&mut clip.vision, &device, None)
        .and_then(|()| clip.vision.release_f32_linears().map(|_| ()));
    released.map_err(|source| WeightsError::Candle {
        path: clip.source.clone(),
        source,
    })?;
    let tokenizer = ClipTokenizer::new();
    let bank = load_bank_with(
        &clip,
        &tokenizer,
        &spec.bank,
        cliper.as_ref(),
        spec.head.as_deref(),
    )?;
    Ok(Loaded {
        clip,
        bank,
        tokenizer,
        cliper,
    })
}

/// Builds a bank for an already-loaded model (also used when the user
/// switches banks in the app).
pub fn load_bank(
    clip: &ClipModel,
    tok: &ClipTokenizer,
    source: &BankSource,
    loaded: Option<&CliperCheckpoint>,
) -> Result<DescriptorBank, SetupError> {
    load_bank_with(clip, tok, source, loaded, None)
}

/// [`load_bank`] with an optional Exp-CLIP head for zero-shot banks.
pub fn load_bank_with(
    clip: &ClipModel,
    tok: &ClipTokenizer,
    source: &BankSource,
    loaded: Option<&CliperCheckpoint>,
    head: Option<&Path>,
) -> Result<DescriptorBank, SetupError> {
    let head = match head {
        Some(h) => Some(ProjectionHead::load(
            h,
            clip.config.embed_dim,
            &clip.device,
        )?),
        None => None,
    };
    Ok(match source {
        BankSource::BuiltinZeroShot => DescriptorBank::default_zero_shot_with(clip, tok, head)?,
        BankSource::Prompts(p) => {
            let (layout, texts) = bank::read_prompts(p)?;
            DescriptorBank::zero_shot(clip, tok, layout, texts, &p.display().to_string(), head)?
        }
        BankSource::Learned(p) => {
            if let Some(h) = &head {
                return Err(SetupError::HeadOnLearned {
                    head: h.source.clone(),
                    bank: p.display().to_string(),
                });
            }
            let owned;
            let c = match loaded {
                Some(c) => c,
                None => {
                    owned = CliperCheckpoint::load(p)?;
                    &owned
                }
            };
            let name = p.display().to_string();
            match &c.prompt_learner {
                Some(pl) => crate::model::dfer_clip::bank(clip, tok, pl, &name)?,
                None => DescriptorBank::learned(clip, tok, c.require_descriptor()?, &name)?,
            }
        }
    })
}

/// Whether `path` looks like a prompts (text) file rather than a checkpoint.
pub fn is_prompts_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("txt") | Some("prompts")
    )
}
