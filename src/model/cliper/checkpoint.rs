//! The CLIPER checkpoint: one safetensors file holding the learned
//! `descriptor` [35, 4, W], optionally a fine-tuned vision tower (HF or
//! OpenAI naming) and trained `temporal.*` weights, plus metadata (format,
//! version, class names, template).
//!
//! Also reads what a CLIPER PyTorch run saves: a `.pth` state dict with
//! `text_generator.descriptor` (or `descriptor`) and CLIP tensors, possibly
//! under a module prefix.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::expressions::{CLASSES, NUM_DESCRIPTORS, SLOTS, TEMPLATE};
use crate::model::weights::{self, Checkpoint, WeightsError};

pub const FORMAT: &str = "cliper";
pub const FORMAT_VERSION: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum CliperFileError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{0}: no `descriptor` tensor (nor `text_generator.descriptor`): is this a CLIPER checkpoint?")]
    NoDescriptor(PathBuf),
    #[error("{path}: `{name}` has shape {found:?}, expected {expected}")]
    Shape {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: String,
    },
    #[error("{path}: trained for classes [{found}], but this app uses [{expected}]")]
    Classes {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

#[derive(Debug, Default)]
pub struct CliperCheckpoint {
    pub path: PathBuf,
    /// [35, 4, W] f32.
    pub descriptor: Option<Tensor>,
    /// Fine-tuned vision tower in HF naming (`vision_model.*`,
    /// `visual_projection.weight`); empty when the tower was frozen.
    pub vision: HashMap<String, Tensor>,
    /// Temporal module tensors, names starting with `temporal.`.
    pub temporal: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
    /// A whole CLIP saved in the file (DFER-CLIP's `clip_model_.*`, OpenAI
    /// naming): the model needs no separate CLIP weights.
    pub clip: HashMap<String, Tensor>,
    /// DFER-CLIP's prompt learner (instead of `descriptor`).
    pub prompt_learner: Option<crate::model::dfer_clip::PromptLearner>,
}

/// Reads the `__metadata__` of a safetensors file header.
fn safetensors_metadata(path: &Path) -> HashMap<String, String> {
    let read = || -> Option<HashMap<String, String>> {
        let mut f = std::fs::File::open(path).ok()?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).ok()?;
        let n = u64::from_le_bytes(len);
        if n > 100_000_000 {
            return None;
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
        let m = v.get("__metadata__")?.as_object()?;
        Some(
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect(),
        )
    };
    read().unwrap_or_default()
}

/// Strips whatever module path precedes `marker` (`image_encoder.visual.x`
/// -> `visual.x`).
fn from_marker(name: &str, marker: &str) -> Option<String> {
    if name.starts_with(marker) {
        return Some(name.to_string());
    }
    name.find(&format!(".{marker}"))
        .map(|i| name[i + 1..].to_string())
}

impl CliperCheckpoint {
    pub fn load(path: &Path) -> Result<Self, CliperFileError> {
        let tensors = weights::read_tensors(path, DType::F32)?;
        let metadata = if path.extension().is_some_and(|e| e == "safetensors") {
            safetensors_metadata(path)
        } else {
            HashMap::new()
        };
        if let Some(classes) = metadata.get("classes") {
            let expected = CLASSES.join(",");
            if classes != &expected {
                return Err(CliperFileError::Classes {
                    path: path.to_path_buf(),
                    found: classes.clone(),
                    expected,
                });
            }
        }
        if crate::model::dfer_clip::is_dfer_clip(tensors.keys()) {
            return Self::from_dfer_clip(path, tensors, metadata);
        }
        let mut descriptor = None;
        let mut openai_vision = HashMap::new();
        let mut vision = HashMap::new();
        let mut temporal = HashMap::new();
        for (name, t) in tensors {
            let used = name == "descriptor"
                || name.ends_with(".descriptor")
                || [
                    "temporal.",
                    "temporal_net.",
                    "vision_model.",
                    "visual_projection.",
                    "visual.",
                ]
                .iter()
                .any(|m| from_marker(&name, m).is_some());
            if used {
                weights::check_weight(path, &name, &t)?;
            }
            if name == "descriptor" || name.ends_with(".descriptor") {
                descriptor = Some(t);
            } else if let Some(n) = from_marker(&name, "temporal.") {
                temporal.insert(n, t);
            } else if let Some(n) = from_marker(&name, "temporal_net.") {
                // DFER-CLIP naming, renamed by `model::temporal`.
                temporal.insert(n, t);
            } else if let Some(n) = from_marker(&name, "vision_model.") {
                vision.insert(n, t);
            } else if let Some(n) = from_marker(&name, "visual_projection.") {
                vision.insert(n, t);
            } else if let Some(n) = from_marker(&name, "visual.") {
                openai_vision.insert(n, t);
            }
        }
        if !openai_vision.is_empty() {
            let renamed =
                weights::openai_to_hf(openai_vision).map_err(|source| WeightsError::Candle {
                    path: path.to_path_buf(),
                    source,
                })?;
            vision.extend(renamed);
        }
        if let Some(d) = &descriptor {
            let dims = d.dims();
            if dims.len() != 3 || dims[0] != NUM_DESCRIPTORS || dims[1] != SLOTS {
                return Err(CliperFileError::Shape {
                    path: path.to_path_buf(),
                    name: "descriptor".into(),
                    found: dims.to_vec(),
                    expected: format!("[{NUM_DESCRIPTORS}, {SLOTS}, text width]"),
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            descriptor,
            vision,
            temporal,
            metadata,
            ..Default::default()
        })
    }

    /// A DFER-CLIP checkpoint (`model::dfer_clip`): the CLIP under
    /// `clip_model_.`, the prompt learner and `temporal_net.*`. A file
    /// saved without `clip_model_.*` still gives its fine-tuned
    /// `image_encoder.*`, laid over the CLIP weights given with `--weights`.
    fn from_dfer_clip(
        path: &Path,
        tensors: HashMap<String, Tensor>,
        metadata: HashMap<String, String>,
    ) -> Result<Self, CliperFileError> {
        let mut out = Self {
            path: path.to_path_buf(),
            metadata,
            ..Default::default()
        };
        out.prompt_learner = crate::model::dfer_clip::prompt_learner(&tensors);
        let mut image_encoder = HashMap::new();
        for (name, t) in tensors {
            if let Some(n) = from_marker(&name, "clip_model_.") {
                let n = n["clip_model_.".len()..].to_string();
                weights::check_weight(path, &n, &t)?;
                out.clip.insert(n, t);
            } else if let Some(n) = from_marker(&name, "temporal_net.") {
                weights::check_weight(path, &n, &t)?;
                out.temporal.insert(n, t);
            } else if let Some(n) = from_marker(&name, "image_encoder.") {
                image_encoder.insert(format!("visual.{}", &n["image_encoder.".len()..]), t);
            } else if name.contains("prompt_learner.") {
                weights::check_weight(path, &name, &t)?;
            }
        }
        if out.prompt_learner.is_none() {
            return Err(CliperFileError::Shape {
                path: path.to_path_buf(),
                name: "prompt_learner.token_prefix / token_suffix".into(),
                found: vec![],
                expected:
                    "the prompt learner's saved token embeddings, next to `prompt_learner.ctx`"
                        .into(),
            });
        }
        if out.clip.is_empty() && !image_encoder.is_empty() {
            for (n, t) in &image_encoder {
                weights::check_weight(path, n, t)?;
            }
            out.vision =
                weights::openai_to_hf(image_encoder).map_err(|source| WeightsError::Candle {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
        Ok(out)
    }

    /// The descriptor, or an error naming the file.
    pub fn require_descriptor(&self) -> Result<&Tensor, CliperFileError> {
        self.descriptor
            .as_ref()
            .ok_or_else(|| CliperFileError::NoDescriptor(self.path.clone()))
    }

    /// Takes the whole CLIP a file carries (DFER-CLIP), with the file's
    /// path; `None` for a file without one.
    pub fn take_clip(&mut self) -> Option<(PathBuf, HashMap<String, Tensor>)> {
        (!self.clip.is_empty()).then(|| (self.path.clone(), std::mem::take(&mut self.clip)))
    }

    /// Whether this is a DFER-CLIP model.
    pub fn is_dfer_clip(&self) -> bool {
        self.prompt_learner.is_some()
    }

    /// The trained temporal module, when the checkpoint has one.
    pub fn temporal_module(
        &self,
        embed_dim: usize,
        device: &candle_core::Device,
    ) -> Result<Option<crate::model::temporal::TemporalModule>, crate::model::temporal::TemporalError>
    {
        if self.temporal.keys().all(|k| k.starts_with("optim.")) {
            return Ok(None);
        }
        let heads = self
            .metadata
            .get("temporal_heads")
            .and_then(|h| h.parse().ok());
        crate::model::temporal::TemporalModule::from_tensors(
            &self.temporal,
            heads,
            embed_dim,
            device,
        )
        .map(Some)
        .map_err(|e| match e {
            crate::model::temporal::TemporalError::Candle(c) => {
                crate::model::temporal::TemporalError::Candle(c)
            }
            other => other,
        })
    }

    /// Replaces the base model's vision tensors with the fine-tuned ones,
    /// checking every shape.
    pub fn apply_vision(&self, base: &mut Checkpoint) -> Result<(), CliperFileError> {
        for (name, t) in &self.vision {
            let Some(old) = base.tensors.get(name) else {
                // Not a tensor of this architecture.
                return Err(CliperFileError::Shape {
                    path: self.path.clone(),
                    name: name.clone(),
                    found: t.dims().to_vec(),
                    expected: "a tensor of the loaded CLIP vision tower (none by this name)".into(),
                });
            };
            if old.dims() != t.dims() {
                return Err(CliperFileError::Shape {
                    path: self.path.clone(),
                    name: name.clone(),
                    found: t.dims().to_vec(),
                    expected: format!("{:?} as in {}", old.dims(), base.path.display()),
                });
            }
        }
        for (name, t) in &self.vision {
            base.tensors.insert(name.clone(), t.clone());
        }
        Ok(())
    }

    /// Writes the checkpoint atomically (temporary file, then rename).
    pub fn save(
        &self,
        path: &Path,
        extra_metadata: &[(&str, String)],
    ) -> Result<(), CliperFileError> {
        let werr = |reason: String| CliperFileError::Write {
            path: path.to_path_buf(),
            reason,
        };
        let mut data: Vec<(String, Tensor)> = Vec::new();
        if let Some(d) = &self.descriptor {
            data.push((
                "descriptor".into(),
                d.to_dtype(DType::F32).map_err(|e| werr(e.to_string()))?,
            ));
        }
        for (k, v) in self.vision.iter().chain(self.temporal.iter()) {
            data.push((
                k.clone(),
                v.to_dtype(DType::F32).map_err(|e| werr(e.to_string()))?,
            ));
        }
        let mut meta: HashMap<String, String> = HashMap::new();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("version".into(), FORMAT_VERSION.into());
        meta.insert("classes".into(), CLASSES.join(","));
        meta.insert("template".into(), TEMPLATE.into());
        for (k, v) in extra_metadata {
            meta.insert((*k).to_string(), v.clone());
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("cliper"),
            std::process::id()
        ));
        let result = safetensors::serialize_to_file(data, Some(meta), &tmp)
            .map_err(|e| werr(e.to_string()))
            .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| werr(e.to_string())));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}
