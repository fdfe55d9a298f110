//! Loading what the pipeline needs: CLIP weights (plus a CLIPER checkpoint's
//! fine-tuned vision tower) and the descriptor bank.

use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::model::cliper::bank::{self, BankError, DescriptorBank};
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

#[derive(Clone, Debug, Default)]
pub struct ModelSpec {
    /// `--weights`: file or folder; `None` searches the usual places.
    pub weights: Option<PathBuf>,
    pub bank: BankSource,
    /// `auto`, `cpu`, `cuda`, `metal`.
    pub device: String,
}

/// A loaded model with its bank.
pub struct Loaded {
    pub clip: ClipModel,
    pub bank: DescriptorBank,
    pub tokenizer: ClipTokenizer,
    /// The CLIPER checkpoint, when one was given (temporal weights live there).
    pub cliper: Option<CliperCheckpoint>,
}

pub fn load(spec: &ModelSpec) -> Result<Loaded, SetupError> {
    load_with(spec, Precision::Auto)
}

/// [`load`] with the image encoder in a chosen precision.
pub fn load_with(spec: &ModelSpec, precision: Precision) -> Result<Loaded, SetupError> {
    let dev_name = if spec.device.is_empty() {
        "auto"
    } else {
        &spec.device
    };
    let device = device::select(dev_name)?;
    let dtype = precision.dtype(&device)?;
    let path = weights::locate(spec.weights.as_deref())?;
    let mut ckpt = Checkpoint::load(&path, DType::F32)?;
    let cliper = match &spec.bank {
        BankSource::Learned(p) => {
            let c = CliperCheckpoint::load(p)?;
            c.apply_vision(&mut ckpt)?;
            Some(c)
        }
        _ => None,
    };
    let mut clip = ClipModel::from_checkpoint(&ckpt, &device, dtype)?;
    drop(ckpt);
    if precision.quantized() {
        clip.vision
            .set_quantized(true)
            .map_err(|source| WeightsError::Candle {
                path: clip.source.clone(),
                source,
            })?;
    }
    let tokenizer = ClipTokenizer::new();
    let bank = load_bank(&clip, &tokenizer, &spec.bank, cliper.as_ref())?;
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
    Ok(match source {
        BankSource::BuiltinZeroShot => DescriptorBank::default_zero_shot(clip, tok)?,
        BankSource::Prompts(p) => {
            let texts = bank::read_prompts(p)?;
            DescriptorBank::zero_shot(clip, tok, texts, &p.display().to_string())?
        }
        BankSource::Learned(p) => {
            let owned;
            let c = match loaded {
                Some(c) => c,
                None => {
                    owned = CliperCheckpoint::load(p)?;
                    &owned
                }
            };
            DescriptorBank::learned(clip, tok, c.require_descriptor()?, &p.display().to_string())?
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
