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

fn format_of(p: &Path) -> Option<Format> {
    match p.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "safetensors" => Some(Format::Safetensors),
        "pt" | "pth" | "bin" | "ckpt" => Some(Format::Pickle),
        _ => None,
    }
}

/// Reads every tensor of a `.safetensors` or PyTorch pickle file, strips a
/// `module.` prefix and converts floating tensors to `dtype`.
pub fn read_tensors(path: &Path, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, &e))?;
    // Opening tells a permission problem from a damaged file.
    std::fs::File::open(path).map_err(|e| io_error(path, &e))?;
    if meta.len() == 0 {
        return Err(WeightsError::Corrupt {
            path: path.to_path_buf(),
            reason: "the file is empty".into(),
        });
    }
    let corrupt = |e: candle_core::Error| WeightsError::Corrupt {
        path: path.to_path_buf(),
        reason: first_line(&e.to_string()),
    };
    let format = format_of(path).unwrap_or_else(|| {
        // Unknown extension: PyTorch zips start with "PK".
        let mut magic = [0u8; 2];
        let is_zip = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .map(|_| &magic == b"PK")
            .unwrap_or(false);
        if is_zip {
            Format::Pickle
        } else {
            Format::Safetensors
        }
    });
    let raw: Vec<(String, Tensor)> = match format {
        Format::Safetensors => read_safetensors(path).map_err(corrupt)?,
        Format::Pickle => {
            crate::model::pickle_guard::check_file(path).map_err(|e| WeightsError::Refused {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            read_pickle(path).map_err(corrupt)?
        }
    };
    let mut out = HashMap::with_capacity(raw.len());
    for (name, t) in raw {
        let name = name
            .strip_prefix("module.")
            .map(str::to_string)
            .unwrap_or(name);
        let t = if t.dtype().is_float() && t.dtype() != dtype {
            t.to_dtype(dtype).map_err(corrupt)?
        } else {
            t
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Reads a safetensors file one tensor at a time.
///
/// Candle's `safetensors::load` reads the whole file into memory and then
/// copies every tensor out of it, so loading ViT-B/16 (600 MB) peaked at
/// 1.2 GB (`cliper bench`'s VmHWM). Here the header is parsed, each tensor's
/// bytes are read into a buffer of their own and turned into a tensor, and
/// the buffer goes: the peak is the tensors plus the largest one.
fn read_safetensors(path: &Path) -> candle_core::Result<Vec<(String, Tensor)>> {
    use std::io::{Read, Seek, SeekFrom};
    let bad = |m: String| candle_core::Error::Msg(m);
    let mut f = std::fs::File::open(path)?;
    let file_len = f.metadata()?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad("the file is shorter than a safetensors header".into()))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > 100 << 20 || header_len + 8 > file_len {
        return Err(bad(format!(
            "the header length {header_len} does not fit the file ({file_len} bytes)"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("the header is not valid JSON: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut entries = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match info.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("F64") => DType::F64,
            Some("I64") => DType::I64,
            Some("I32") => DType::I32,
            Some("I16") => DType::I16,
            Some("U32") => DType::U32,
            Some("U8") => DType::U8,
            other => {
                return Err(bad(format!(
                    "tensor `{name}` has dtype {other:?}, which cliper does not read"
                )))
            }
        };
        let nums = |key: &str| -> Option<Vec<u64>> {
            info.get(key)?
                .as_array()?
                .iter()
                .map(|x| x.as_u64())
                .collect()
        };
        let (Some(shape), Some(offsets)) = (nums("shape"), nums("data_offsets")) else {
            return Err(bad(format!("tensor `{name}` lacks its shape or offsets")));
        };
        let [begin, end] = offsets[..] else {
            return Err(bad(format!(
                "tensor `{name}` has {} offsets, not 2",
                offsets.len()
            )));
        };
        let elems = shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| bad(format!("tensor `{name}` has an impossible shape {shape:?}")))?;
        let bytes = elems.checked_mul(dtype.size_in_bytes() as u64);
        if begin > end || end > data_len || bytes != Some(end - begin) {
            return Err(bad(format!(
                "tensor `{name}`: shape {shape:?} of {dtype:?} does not match bytes {begin}..{end} of {data_len}"
            )));
        }
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        entries.push((begin, end, name, dtype, shape));
    }
    // In file order: one forward pass over the file.
    entries.sort_by_key(|e| e.0);
    let mut out = Vec::with_capacity(entries.len());
    for (begin, end, name, dtype, shape) in entries {
        f.seek(SeekFrom::Start(data_start + begin))?;
        let mut buf = vec![0u8; (end - begin) as usize];
        f.read_exact(&mut buf)?;
        let t = Tensor::from_raw_buffer(&buf, dtype, &shape, &Device::Cpu)?;
        out.push((name, t));
    }
    Ok(out)
}

/// The `__metadata__` of a safetensors file's header (`None`: it has none).
pub fn safetensors_metadata(path: &Path) -> std::io::Result<Option<HashMap<String, String>>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(std::io::Error::other("not a safetensors header"));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)?;
    let v: serde_json::Value = serde_json::from_slice(&header).map_err(std::io::Error::other)?;
    Ok(v.get("__metadata__").and_then(|m| {
        m.as_object().map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
    }))
}

/// The error for a file that cannot be opened, by its cause.
pub(crate) fn io_error(path: &Path, e: &std::io::Error) -> WeightsError {
    let reason = match (e.kind(), e.raw_os_error()) {
        (std::io::ErrorKind::NotFound, _) => return WeightsError::NotFound(path.to_path_buf()),
        (std::io::ErrorKind::PermissionDenied, _) => {
            "permission denied; check who may read it (`ls -l`)".to_string()
        }
        // ELOOP
        (_, Some(40)) => "symbolic links point in a loop; give the real file".to_string(),
        _ => e.to_string(),
    };
    WeightsError::Unreadable {
        path: path.to_path_buf(),
        reason,
    }
}

/// Checks that a weight tensor is floating point and finite (NaN or Inf in
/// weights would give NaN scores that look like results).
pub fn check_weight(path: &Path, name: &str, t: &Tensor) -> Result<()> {
    if !t.dtype().is_float() {
        return Err(WeightsError::NotFloat {
            path: path.to_path_buf(),
            name: name.to_string(),
            dtype: t.dtype(),
        });
    }
    let bad = |what: &str| WeightsError::NonFinite {
        path: path.to_path_buf(),
        name: name.to_string(),
        what: what.to_string(),
    };
    let (storage, layout) = t.storage_and_layout();
    let counts = match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let range = layout.start_offset()..layout.start_offset() + layout.shape().elem_count();
            let contiguous = layout.is_contiguous();
            match cpu {
                candle_core::CpuStorage::F32(v) if contiguous => {
                    Some(non_finite(v[range].iter().copied()))
                }
                candle_core::CpuStorage::F16(v) if contiguous => {
                    Some(non_finite(v[range].iter().map(|x| x.to_f32())))
                }
                candle_core::CpuStorage::BF16(v) if contiguous => {
                    Some(non_finite(v[range].iter().map(|x| x.to_f32())))
                }
                candle_core::CpuStorage::F64(v) if contiguous => {
                    Some(non_finite(v[range].iter().map(|&x| x as f32)))
                }
                _ => None,
            }
        }
        _ => None,
    };
    drop(storage);
    let (nan, inf) = match counts {
        Some(c) => c,
        None => {
            // Elsewhere (a GPU, a strided view): reduce on the device.
            let s = t
                .to_dtype(DType::F32)
                .and_then(|x| x.sub(&x))
                .and_then(|x| x.sum_all())
                .and_then(|x| x.to_scalar::<f32>())
                .map_err(|source| WeightsError::Candle {
                    path: path.to_path_buf(),
                    source,
                })?;
            (usize::from(!s.is_finite()), 0)
        }
    };
    match (nan, inf) {
        (0, 0) => Ok(()),
        (n, 0) => Err(bad(&format!("{n} NaN value(s)"))),
        (0, i) => Err(bad(&format!("{i} infinite value(s)"))),
        (n, i) => Err(bad(&format!("{n} NaN and {i} infinite value(s)"))),
    }
}

fn non_finite(v: impl Iterator<Item = f32>) -> (usize, usize) {
    v.fold((0, 0), |(n, i), x| {
        (
            n + usize::from(x.is_nan()),
            i + usize::from(x.is_infinite()),
        )
    })
}

thread_local! {
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic into `None` without the panic message: the
/// caller reports the failure as an error about the file. Panics elsewhere
/// print as before.
fn catch_quietly<T>(f: impl FnOnce() -> T) -> Option<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    QUIET_PANICS.with(|q| q.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok();
    QUIET_PANICS.with(|q| q.set(false));
    r
}

/// Candle's pickle reader indexes into the tuples it reads without checking
/// their length (fuzzing found `Vec::remove` out of range in
/// `rebuild_args`): a panic there is a malformed file, not a crash.
fn read_pickle(path: &Path) -> candle_core::Result<Vec<(String, Tensor)>> {
    catch_quietly(|| read_pickle_unchecked(path)).unwrap_or_else(|| {
        Err(candle_core::Error::Msg(
            "its pickle is malformed (a tensor record of the wrong shape)".into(),
        ))
    })
}

/// The tensors of a PyTorch zip checkpoint under `key`, read from their
/// storages here rather than by Candle's `PthTensors::get`, which refuses
/// strided views (DFER-CLIP's prompt buffers are slices of one embedding:
/// `[7, 68, W]` with the stride of `[7, 77, W]`, at an offset). Each
/// storage is read once, shared by its views, and dropped once they are
/// built.
fn read_pth(path: &Path, key: Option<&str>) -> candle_core::Result<Vec<(String, Tensor)>> {
    use std::io::Read;
    let mut infos = candle_core::pickle::read_pth_tensor_info(path, false, key)?;
    infos.sort_by(|a, b| a.path.cmp(&b.path));
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| candle_core::Error::Msg(format!("not a PyTorch zip: {e}")))?;
    let mut out = Vec::with_capacity(infos.len());
    let mut storage: (String, Vec<u8>) = (String::new(), Vec::new());
    for info in &infos {
        if storage.0 != info.path {
            let mut entry = zip.by_name(&info.path).map_err(|e| {
                candle_core::Error::Msg(format!("storage {} of `{}`: {e}", info.path, info.name))
            })?;
            let mut bytes = Vec::with_capacity(entry.size().min(1 << 34) as usize);
            entry.read_to_end(&mut bytes)?;
            storage = (info.path.clone(), bytes);
        }
        out.push((info.name.clone(), strided_tensor(&storage.1, info)?));
    }
    Ok(out)
}

/// A tensor of a storage's bytes, by its view's shape and strides (in
/// elements) and offset (Candle's pickle reader gives it in bytes).
fn strided_tensor(
    bytes: &[u8],
    info: &candle_core::pickle::TensorInfo,
) -> candle_core::Result<Tensor> {
    let es = info.dtype.size_in_bytes();
    let dims = info.layout.dims().to_vec();
    let stride = info.layout.stride().to_vec();
    if !info.layout.start_offset().is_multiple_of(es) {
        return Err(candle_core::Error::Msg(format!(
            "tensor `{}` starts inside an element of its storage",
            info.name
        )));
    }
    let offset = info.layout.start_offset() / es;
    let n: usize = dims.iter().product();
    let too_short = || {
        candle_core::Error::Msg(format!(
            "tensor `{}` reaches past the end of its storage ({} bytes)",
            info.name,
            bytes.len()
        ))
    };
    let data: std::borrow::Cow<[u8]> = if info.layout.is_contiguous() {
        let a = offset.saturating_mul(es);
        let b = offset.saturating_add(n).saturating_mul(es);
        std::borrow::Cow::Borrowed(bytes.get(a..b).ok_or_else(too_short)?)
    } else {
        // The last element read bounds them all (strides are not negative).
        let last = dims
            .iter()
            .zip(&stride)
            .map(|(&d, &s)| d.saturating_sub(1).saturating_mul(s))
            .fold(offset, usize::saturating_add);
        if n > 0 && last.saturating_add(1).saturating_mul(es) > bytes.len() {
            return Err(too_short());
        }
        // A view may repeat its storage (stride 0), but a hostile header
        // must not make it ask for terabytes.
        if n.saturating_mul(es) > bytes.len().saturating_mul(64).max(1 << 20) {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{}` is a view {n} elements large of a storage of {} bytes",
                info.name,
                bytes.len()
            )));
        }
        let mut v = Vec::with_capacity(n * es);
        let mut idx = vec![0usize; dims.len()];
        for _ in 0..n {
            let src = offset + idx.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
            v.extend_from_slice(&bytes[src * es..(src + 1) * es]);
            for k in (0..dims.len()).rev() {
                idx[k] += 1;
                if idx[k] < dims[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
        std::borrow::Cow::Owned(v)
    };
    Tensor::from_raw_buffer(&data, info.dtype, &dims, &Device::Cpu)
}

fn read_pickle_unchecked(path: &Path) -> candle_core::Result<Vec<(String, Tensor)>> {
    let all = read_pth(path, None)?;
    // Training scripts often save `{"state_dict": ..., "epoch": ...}`, and
    // may keep a tensor or two beside it (DFER-CLIP's `best_acc`): the
    // nested state dict is the model when it holds more.
    for key in ["state_dict", "model", "model_state_dict"] {
        if let Ok(v) = read_pth(path, Some(key)) {
            if v.len() > all.len() {
                return Ok(v);
            }
        }
    }
    Ok(all)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

/// Detects the naming of a tensor map.
pub fn detect_naming(tensors: &HashMap<String, Tensor>) -> Option<Naming> {
    if tensors.keys().any(|k| k.starts_with("vision_model.")) {
        Some(Naming::Hf)
    } else if tensors
        .keys()
        .any(|k| k.starts_with("visual.") || k.starts_with("transformer.resblocks."))
    {
        Some(Naming::OpenAi)
    } else {
        None
    }
}

/// Renames an OpenAI-named CLIP state dict to HF naming, splitting `in_proj`
/// and transposing the projections. Non-CLIP tensors keep their names.
pub fn openai_to_hf(
    tensors: HashMap<String, Tensor>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(tensors.len() + 64);
    for (name, t) in tensors {
        if matches!(
            name.as_str(),
            "input_resolution" | "context_length" | "vocab_size" | "attn_mask"
        ) || name.ends_with("position_ids")
        {
            continue;
        }
        let (tower, rest) = if let Some(r) = name.strip_prefix("visual.") {
            ("vision_model", r)
        } else {
            ("text_model", name.as_str())
        };
        if let Some(block) = rest.strip_prefix("transformer.resblocks.") {
            let Some((idx, part)) = block.split_once('.') else {
                out.insert(name.clone(), t);
                continue;
            };
            let base = format!("{tower}.encoder.layers.{idx}");
            match part {
                "attn.in_proj_weight" | "attn.in_proj_bias" => {
                    let kind = if part.ends_with("weight") {
                        "weight"
                    } else {
                        "bias"
                    };
                    let d = t.dim(0)? / 3;
                    for (i, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                        out.insert(
                            format!("{base}.self_attn.{p}.{kind}"),
                            t.narrow(0, i * d, d)?.contiguous()?,
                        );
                    }
                }
                _ if part.ends_with("attn_mask") => {}
                _ => {
                    let mapped = part
                        .replace("attn.out_proj", "self_attn.out_proj")
                        .replace("ln_1", "layer_norm1")
                        .replace("ln_2", "layer_norm2")
                        .replace("mlp.c_fc", "mlp.fc1")
                        .replace("mlp.c_proj", "mlp.fc2");
                    out.insert(format!("{base}.{mapped}"), t);
                }
            }
            continue;
        }
        let mapped = match (tower, rest) {
            ("vision_model", "conv1.weight") => {
                "vision_model.embeddings.patch_embedding.weight".to_string()
            }
            ("vision_model", "class_embedding") => {
                "vision_model.embeddings.class_embedding".to_string()
            }
            ("vision_model", "positional_embedding") => {
                "vision_model.embeddings.position_embedding.weight".to_string()
            }
            ("vision_model", "proj") => {
                out.insert("visual_projection.weight".into(), t.t()?.contiguous()?);
                continue;
            }
            ("vision_model", r) if r.starts_with("ln_pre.") => {
                r.replacen("ln_pre.", "vision_model.pre_layrnorm.", 1)
            }
            ("vision_model", r) if r.starts_with("ln_post.") => {
                r.replacen("ln_post.", "vision_model.post_layernorm.", 1)
            }
            ("vision_model", _) => name.clone(),
            (_, "token_embedding.weight") => {
                "text_model.embeddings.token_embedding.weight".to_string()
            }
            (_, "positional_embedding") => {
                "text_model.embeddings.position_embedding.weight".to_string()
            }
            (_, "text_projection") => {
                out.insert("text_projection.weight".into(), t.t()?.contiguous()?);
                continue;
            }
            (_, r) if r.starts_with("ln_final.") => {
                r.replacen("ln_final.", "text_model.final_layer_norm.", 1)
            }
            _ => name.clone(),
        };
        out.insert(mapped, t);
    }
    Ok(out)
}

#[derive(Debug, Default, Deserialize)]
struct HfTowerJson {
    hidden_size: Option<usize>,
    num_attention_heads: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
struct HfConfigJson {
    text_config: Option<HfTowerJson>,
    vision_config: Option<HfTowerJson>,
}

fn read_config_json(path: &Path) -> Result<Option<HfConfigJson>> {
    let Some(dir) = path.parent() else {
        return Ok(None);
    };
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| WeightsError::Config {
        path: cfg_path.clone(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| WeightsError::Config {
            path: cfg_path,
            reason: format!("not a valid HF CLIP config.json: {e}"),
        })
}

/// Counts `prefix.N.` layer indices.
fn count_layers(tensors: &HashMap<String, Tensor>, prefix: &str) -> usize {
    let idx: BTreeSet<usize> = tensors
        .keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|r| r.split('.').next()?.parse().ok())
        .collect();
    idx.len()
}

fn dims(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    name: &str,
    rank: usize,
) -> Result<Vec<usize>> {
    let Some(t) = tensors.get(name) else {
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        let sample = keys
            .iter()
            .take(3)
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(WeightsError::Missing {
            path: path.to_path_buf(),
            name: name.to_string(),
            found: tensors.len(),
            sample,
        });
    };
    let d = t.dims().to_vec();
    if d.len() != rank {
        return Err(WeightsError::Config {
            path: path.to_path_buf(),
            reason: format!(
                "tensor `{name}` has rank {} (shape {d:?}), expected rank {rank}",
                d.len()
            ),
        });
    }
    Ok(d)
}

fn tower_extras(
    path: &Path,
    json: Option<&HfTowerJson>,
    width: usize,
    tower: &str,
) -> Result<(usize, Activation, f64)> {
    let cfg_err = |reason: String| WeightsError::Config {
        path: path.with_file_name("config.json"),
        reason,
    };
    let heads = match json.and_then(|j| j.num_attention_heads) {
        Some(h) => h,
        None => (width / 64).max(1),
    };
    if let Some(h) = json.and_then(|j| j.hidden_size) {
        if h != width {
            return Err(cfg_err(format!(
                "{tower} hidden_size {h} does not match the weights (width {width})"
            )));
        }
    }
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(cfg_err(format!(
            "{tower} width {width} is not divisible by {heads} attention heads; \
             put a config.json with num_attention_heads beside the weights"
        )));
    }
    let act = match json.and_then(|j| j.hidden_act.as_deref()) {
        None => Activation::QuickGelu,
        Some(a) => Activation::from_hf(a)
            .ok_or_else(|| cfg_err(format!("{tower} hidden_act `{a}` is not supported")))?,
    };
    let eps = json.and_then(|j| j.layer_norm_eps).unwrap_or(1e-5);
    Ok((heads, act, eps))
}

/// Reads the architecture from HF-named tensors (+ optional config.json).
pub fn infer_config(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<ClipConfig> {
    let json = read_config_json(path)?;
    let json = json.unwrap_or_default();

    let patch = dims(
        path,
        tensors,
        "vision_model.embeddings.patch_embedding.weight",
        4,
    )?;
    let vpos = dims(
        path,
        tensors,
        "vision_model.embeddings.position_embedding.weight",
        2,
    )?;
    let vproj = dims(path, tensors, "visual_projection.weight", 2)?;
    let vwidth = patch[0];
    let grid = ((vpos[0].saturating_sub(1)) as f64).sqrt().round() as usize;
    if grid * grid + 1 != vpos[0] {
        return Err(WeightsError::Config {
            path: path.to_path_buf(),
            reason: format!(
                "vision position embedding has {} rows, not a square grid plus a class token",
                vpos[0]
            ),
        });
    }
    let vlayers = count_layers(tensors, "vision_model.encoder.layers.");
    let vmlp = dims(
        path,
        tensors,
        "vision_model.encoder.layers.0.mlp.fc1.weight",
        2,
    )?[0];
    let (vheads, vact, veps) = tower_extras(path, json.vision_config.as_ref(), vwidth, "vision")?;

    let tok = dims(
        path,
        tensors,
        "text_model.embeddings.token_embedding.weight",
        2,
    )?;
    let tpos = dims(
        path,
        tensors,
        "text_model.embeddings.position_embedding.weight",
        2,
    )?;
    let tproj = dims(path, tensors, "text_projection.weight", 2)?;
    let tlayers = count_layers(tensors, "text_model.encoder.layers.");
    let fc1 = dims(
        path,
        tensors,
        "text_model.encoder.layers.0.mlp.fc1.weight",
        2,
    )?;
    let tmlp = fc1[0];
    // The width from inside the tower, so that a token or position
    // embedding of another width is the one named as wrong.
    let twidth = fc1[1];
    let (theads, tact, teps) = tower_extras(path, json.text_config.as_ref(), twidth, "text")?;

    if vproj[0] != tproj[0] {
        return Err(WeightsError::Shape {
            path: path.to_path_buf(),
            name: "text_projection.weight".into(),
            expected: vec![vproj[0], twidth],
            found: tproj,
        });
    }
    Ok(ClipConfig {
        vision: VisionConfig {
            image_size: grid * patch[3],
            patch_size: patch[3],
            width: vwidth,
            layers: vlayers,
            heads: vheads,
            mlp: vmlp,
            layer_norm_eps: veps,
            activation: vact,
        },
        text: TextConfig {
            vocab_size: tok[0],
            context_length: tpos[0],
            width: twidth,
            layers: tlayers,
            heads: theads,
            mlp: tmlp,
            layer_norm_eps: teps,
            activation: tact,
        },
        embed_dim: vproj[0],
    })
}

/// Every CLIP tensor (HF naming) and its shape, for a configuration.
pub fn expected_tensors(cfg: &ClipConfig) -> Vec<(String, Vec<usize>)> {
    let mut v = Vec::new();
    let block = |v: &mut Vec<(String, Vec<usize>)>, base: String, d: usize, m: usize| {
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            v.push((format!("{base}.self_attn.{p}.weight"), vec![d, d]));
            v.push((format!("{base}.self_attn.{p}.bias"), vec![d]));
        }
        for ln in ["layer_norm1", "layer_norm2"] {
            v.push((format!("{base}.{ln}.weight"), vec![d]));
            v.push((format!("{base}.{ln}.bias"), vec![d]));
        }
        v.push((format!("{base}.mlp.fc1.weight"), vec![m, d]));
        v.push((format!("{base}.mlp.fc1.bias"), vec![m]));
        v.push((format!("{base}.mlp.fc2.weight"), vec![d, m]));
        v.push((format!("{base}.mlp.fc2.bias"), vec![d]));
    };
    let vc = &cfg.vision;
    let (d, p) = (vc.width, vc.patch_size);
    v.push((
        "vision_model.embeddings.patch_embedding.weight".into(),
        vec![d, 3, p, p],
    ));
    v.push(("vision_model.embeddings.class_embedding".into(), vec![d]));
    v.push((
        "vision_model.embeddings.position_embedding.weight".into(),
        vec![vc.tokens(), d],
    ));
    for ln in ["pre_layrnorm", "post_layernorm"] {
        v.push((format!("vision_model.{ln}.weight"), vec![d]));
        v.push((format!("vision_model.{ln}.bias"), vec![d]));
    }
    for i in 0..vc.layers {
        block(
            &mut v,
            format!("vision_model.encoder.layers.{i}"),
            d,
            vc.mlp,
        );
    }
    v.push(("visual_projection.weight".into(), vec![cfg.embed_dim, d]));
    let tc = &cfg.text;
    let d = tc.width;
    v.push((
        "text_model.embeddings.token_embedding.weight".into(),
        vec![tc.vocab_size, d],
    ));
    v.push((
        "text_model.embeddings.position_embedding.weight".into(),
        vec![tc.context_length, d],
    ));
    for i in 0..tc.layers {
        block(&mut v, format!("text_model.encoder.layers.{i}"), d, tc.mlp);
    }
    v.push(("text_model.final_layer_norm.weight".into(), vec![d]));
    v.push(("text_model.final_layer_norm.bias".into(), vec![d]));
    v.push(("text_projection.weight".into(), vec![cfg.embed_dim, d]));
    v
}

/// Checks that every CLIP tensor is present with the right shape, naming the
/// first one that is not.
pub fn validate(path: &Path, cfg: &ClipConfig, tensors: &HashMap<String, Tensor>) -> Result<()> {
    for (name, shape) in expected_tensors(cfg) {
        if let Some(t) = tensors.get(&name) {
            check_weight(path, &name, t)?;
        }
        dims(path, tensors, &name, shape.len()).or_else(|e| match e {
            // Rank mismatches are reported as shape errors below.
            WeightsError::Config { .. } => Ok(vec![]),
            e => Err(e),
        })?;
        let found = tensors[&name].dims().to_vec();
        if found != shape {
            return Err(WeightsError::Shape {
                path: path.to_path_buf(),
                name,
                expected: shape,
                found,
            });
        }
    }
    Ok(())
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

/// Seconds without a byte from the hub before a download gives up
/// (`$CLIPER_DOWNLOAD_STALL_SECS` overrides it).
pub const DOWNLOAD_STALL_SECS: u64 = 60;

/// The hub's address (`$HF_ENDPOINT`, as `hf-hub` reads it).
pub fn hub_endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".to_string())
}

fn stall_limit() -> std::time::Duration {
    let secs = std::env::var("CLIPER_DOWNLOAD_STALL_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(DOWNLOAD_STALL_SECS);
    std::time::Duration::from_secs(secs)
}

/// Downloads the official weights (safetensors + config) into the hub cache
/// with a progress bar, returning the weights file.
///
/// `hf-hub` has no timeouts of its own, so the download runs on a thread
/// watched from here: if no byte arrives for [`DOWNLOAD_STALL_SECS`]
/// (a server that accepts and never answers, a dead link), it fails with a
/// message naming the host. `hf-hub` retries 3 times and resumes a partial
/// file from where it stopped, so running the command again goes on.
pub fn fetch() -> std::result::Result<PathBuf, DownloadError> {
    let bar = download_bar();
    let b = bar.clone();
    let result = fetch_watched(move |file, done, total| {
        b.set_message(file.to_string());
        b.set_length(total);
        b.set_position(done);
    });
    bar.finish_and_clear();
    result
}

/// Why the CLIP weights could not be downloaded; each says what to do.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("cannot start the download: {0}")]
    Thread(String),
    #[error("cannot set up the Hugging Face client: {0}")]
    Client(String),
    #[error(
        "no data from {host} for {secs} s: check the network connection (and HTTPS_PROXY if you use a proxy), then run `cliper weights fetch` again, which resumes the download. Without network access, download model.safetensors and config.json from https://huggingface.co/{HUB_REPO} by hand and put them in {LOCAL_WEIGHTS_DIR}/"
    )]
    Stalled { host: String, secs: u64 },
    #[error("the download stopped without a result")]
    Stopped,
    #[error(
        "could not download {file} from {HUB_REPO} ({reason}). Without network access, download \
         model.safetensors and config.json from https://huggingface.co/{HUB_REPO} by hand \
         and put them in {LOCAL_WEIGHTS_DIR}/ (or anywhere, and pass --weights DIR or set \
         ${WEIGHTS_ENV})"
    )]
    File { file: String, reason: String },
}

/// The progress bar of every download (the hub's, the named models').
pub fn download_bar() -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// [`fetch_with_progress`] under the stall watchdog of [`fetch`].
pub fn fetch_watched(
    mut report: impl FnMut(&str, u64, u64),
) -> std::result::Result<PathBuf, DownloadError> {
    enum Msg {
        Progress(String, u64, u64),
        Done(std::result::Result<PathBuf, DownloadError>),
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    let progress = tx.clone();
    std::thread::Builder::new()
        .name("cliper-download".into())
        .spawn(move || {
            let r = fetch_with_progress(move |f, d, t| {
                let _ = progress.send(Msg::Progress(f.to_string(), d, t));
            });
            let _ = tx.send(Msg::Done(r));
        })
        .map_err(|e| DownloadError::Thread(e.to_string()))?;
    let limit = stall_limit();
    loop {
        match rx.recv_timeout(limit) {
            Ok(Msg::Progress(f, d, t)) => report(&f, d, t),
            Ok(Msg::Done(r)) => return r,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                return Err(DownloadError::Stalled {
                    host: hub_endpoint(),
                    secs: limit.as_secs(),
                })
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return Err(DownloadError::Stopped)
            }
        }
    }
}

/// Like [`fetch`], for a GUI: `report(file, bytes_done, bytes_total)` is
/// called as the download goes (from the calling thread).
pub fn fetch_with_progress(
    report: impl FnMut(&str, u64, u64) + Send + 'static,
) -> std::result::Result<PathBuf, DownloadError> {
    struct Report<F> {
        file: String,
        done: u64,
        total: u64,
        f: std::sync::Arc<std::sync::Mutex<F>>,
    }
    impl<F: FnMut(&str, u64, u64)> hf_hub::api::Progress for Report<F> {
        fn init(&mut self, size: usize, filename: &str) {
            self.file = filename.to_string();
            self.total = size as u64;
            self.done = 0;
            if let Ok(mut f) = self.f.lock() {
                f(&self.file, 0, self.total);
            }
        }
        fn update(&mut self, size: usize) {
            self.done += size as u64;
            if let Ok(mut f) = self.f.lock() {
                f(&self.file, self.done, self.total);
            }
        }
        fn finish(&mut self) {
            if let Ok(mut f) = self.f.lock() {
                f(&self.file, self.total, self.total);
            }
        }
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .with_retries(3)
        .build()
        .map_err(|e| DownloadError::Client(e.to_string()))?;
    let repo = api.model(HUB_REPO.to_string());
    let shared = std::sync::Arc::new(std::sync::Mutex::new(report));
    let mut last = PathBuf::new();
    for file in ["config.json", "model.safetensors"] {
        let cache = hf_hub::Cache::from_env();
        if let Some(p) = cache.model(HUB_REPO.to_string()).get(file) {
            last = p;
            continue;
        }
        let progress = Report {
            file: file.to_string(),
            done: 0,
            total: 0,
            f: shared.clone(),
        };
        last = repo
            .download_with_progress(file, progress)
            .map_err(|e| DownloadError::File {
                file: file.to_string(),
                reason: e.to_string(),
            })?;
    }
    Ok(last)
}
