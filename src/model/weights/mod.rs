//! Finding, reading and renaming CLIP weights.
//!
//! Two namings exist in the wild: HF (`vision_model.*`, `text_model.*`, what
//! `openai/clip-vit-base-patch16` ships) and OpenAI's (`visual.*`,
//! `transformer.resblocks.N.*`, what CLIPER checkpoints hold). Everything is
//! converted to HF naming on load (see `docs/model.md` section 1 for the
//! mapping); tensors that are not CLIP's (a CLIPER `descriptor`, `temporal.*`)
//! are kept under their own names for the CLIPER head to pick up.
//!
//! The architecture is read from the checkpoint: tensor shapes give every size;
//! a `config.json` beside the file (HF format) supplies what shapes cannot
//! (attention heads, activation, LayerNorm epsilon). Without one, heads are
//! `width / 64`, as OpenAI's loader assumes.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::config::{Activation, ClipConfig, TextConfig, VisionConfig};

mod download;
mod naming;
mod read;

pub use download::*;
pub use naming::*;
pub use read::*;

/// The hub repository of the official weights.
pub const HUB_REPO: &str = "openai/clip-vit-base-patch16";
/// Environment variable that points at a weights file or folder.
pub const WEIGHTS_ENV: &str = "CLIPER_WEIGHTS";
/// Folder (relative to the working directory) searched for weights.
pub const LOCAL_WEIGHTS_DIR: &str = "weights";

const HOW_TO_GET: &str =
    "run `cliper weights fetch`, or download model.safetensors and config.json \
from https://huggingface.co/openai/clip-vit-base-patch16 into weights/, or pass --weights FILE|DIR";

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("weights not found at {0}; {HOW_TO_GET}")]
    NotFound(PathBuf),
    #[error("no CLIP weights found (looked in: {0}); {HOW_TO_GET}")]
    NoneFound(String),
    #[error("{0}: folder holds no weights file (.safetensors, .pt, .pth, .bin); {HOW_TO_GET}")]
    EmptyDir(PathBuf),
    #[error("cannot read weights file {path}: {reason}. It may be truncated or corrupt: download it again")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: not CLIP weights: tensor `{name}` is missing (found {found} tensors, e.g. {sample})")]
    Missing {
        path: PathBuf,
        name: String,
        found: usize,
        sample: String,
    },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("cannot read weights file {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{path} was not loaded: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` holds {what}; the file is damaged or was saved from a diverged run")]
    NonFinite {
        path: PathBuf,
        name: String,
        what: String,
    },
    #[error("{path}: tensor `{name}` is {dtype:?}, not floating point: these are not weights of this model")]
    NotFloat {
        path: PathBuf,
        name: String,
        dtype: DType,
    },
    #[error("{path}: {source}")]
    Candle {
        path: PathBuf,
        source: candle_core::Error,
    },
}

pub type Result<T> = std::result::Result<T, WeightsError>;

/// Which naming a checkpoint used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    Hf,
    OpenAi,
}

/// A CLIP checkpoint read into memory, renamed to HF naming.
#[derive(Clone)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub naming: Naming,
    pub config: ClipConfig,
    /// CLIP tensors in HF naming, plus any non-CLIP tensors under their own names.
    pub tensors: HashMap<String, Tensor>,
}

/// Resolves the weights to use: `explicit` (`--weights`), then
/// `$CLIPER_WEIGHTS`, then `weights/`, then the Hugging Face hub cache.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return resolve_path(p);
    }
    let mut searched = Vec::new();
    if let Some(env) = std::env::var_os(WEIGHTS_ENV) {
        return resolve_path(Path::new(&env));
    }
    searched.push(format!("${WEIGHTS_ENV} (unset)"));
    let local = Path::new(LOCAL_WEIGHTS_DIR);
    if let Ok(p) = resolve_path(local) {
        return Ok(p);
    }
    searched.push(format!("{}/", local.display()));
    if let Some(p) = hub_cached() {
        return Ok(p);
    }
    searched.push(format!("the Hugging Face cache for {HUB_REPO}"));
    Err(WeightsError::NoneFound(searched.join(", ")))
}

/// The hub cache's copy of the official weights, if it was downloaded.
pub fn hub_cached() -> Option<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    cache.model(HUB_REPO.to_string()).get("model.safetensors")
}

/// A file as is; a folder: its best weights file.
pub fn resolve_path(p: &Path) -> Result<PathBuf> {
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    if !p.is_dir() {
        return Err(WeightsError::NotFound(p.to_path_buf()));
    }
    for name in ["model.safetensors", "pytorch_model.bin"] {
        let c = p.join(name);
        if c.is_file() {
            return Ok(c);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(p)
        .map_err(|_| WeightsError::NotFound(p.to_path_buf()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.is_file() && format_of(f).is_some())
        .collect();
    found.sort();
    // Prefer safetensors over pickles.
    found.sort_by_key(|f| format_of(f) != Some(Format::Safetensors));
    found
        .into_iter()
        .next()
        .ok_or_else(|| WeightsError::EmptyDir(p.to_path_buf()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Safetensors,
    Pickle,
}

/// Whether `p` has the extension of a weights file this crate reads
/// (`.safetensors`, or PyTorch's `.pt`, `.pth`, `.bin`, `.ckpt`).
pub fn is_weights_file(p: &Path) -> bool {
    format_of(p).is_some()
}

/// Whether `p` has the extension of a PyTorch (pickle) file.
pub fn is_pickle_file(p: &Path) -> bool {
    format_of(p) == Some(Format::Pickle)
}

fn format_of(p: &Path) -> Option<Format> {
    match p.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "safetensors" => Some(Format::Safetensors),
        "pt" | "pth" | "bin" | "ckpt" => Some(Format::Pickle),
        _ => None,
    }
}

impl Checkpoint {
    /// Reads, renames, infers the architecture and validates.
    pub fn load(path: &Path, dtype: DType) -> Result<Self> {
        let tensors = read_tensors(path, dtype)?;
        Self::from_tensors(path, tensors)
    }

    pub fn from_tensors(path: &Path, tensors: HashMap<String, Tensor>) -> Result<Self> {
        let naming = detect_naming(&tensors).ok_or_else(|| {
            let mut keys: Vec<&String> = tensors.keys().collect();
            keys.sort();
            WeightsError::Missing {
                path: path.to_path_buf(),
                name: "vision_model.* or visual.*".into(),
                found: tensors.len(),
                sample: keys
                    .iter()
                    .take(3)
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })?;
        let tensors = match naming {
            Naming::Hf => tensors,
            Naming::OpenAi => openai_to_hf(tensors).map_err(|source| WeightsError::Candle {
                path: path.to_path_buf(),
                source,
            })?,
        };
        let config = infer_config(path, &tensors)?;
        validate(path, &config, &tensors)?;
        Ok(Self {
            path: path.to_path_buf(),
            naming,
            config,
            tensors,
        })
    }

    /// Random weights of a given shape (benchmarks, shape tests): normal
    /// weights with std 0.02, unit LayerNorm scales, small biases.
    pub fn random(config: &ClipConfig, seed: u64) -> candle_core::Result<Self> {
        let dev = Device::Cpu;
        let mut rng = crate::model::rng::SplitMix64::new(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in expected_tensors(config) {
            let is_ln_scale = name.ends_with(".weight")
                && (name.contains("layer_norm") || name.contains("layrnorm"));
            let t = if is_ln_scale {
                Tensor::ones(shape, DType::F32, &dev)?
            } else {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| 0.02 * rng.normal()).collect();
                Tensor::from_vec(v, shape, &dev)?
            };
            tensors.insert(name, t);
        }
        Ok(Self {
            path: PathBuf::from("<random>"),
            naming: Naming::Hf,
            config: config.clone(),
            tensors,
        })
    }
}
