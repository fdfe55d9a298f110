//! Reading tensors: safetensors one tensor at a time, PyTorch pickles and
//! zip checkpoints through the guarded reader, and the checks every weight
//! passes (floating point, finite).

use super::*;

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
pub(super) fn read_safetensors(path: &Path) -> candle_core::Result<Vec<(String, Tensor)>> {
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

pub(super) fn non_finite(v: impl Iterator<Item = f32>) -> (usize, usize) {
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
pub(super) fn catch_quietly<T>(f: impl FnOnce() -> T) -> Option<T> {
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
pub(super) fn read_pickle(path: &Path) -> candle_core::Result<Vec<(String, Tensor)>> {
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
pub(super) fn read_pth(
    path: &Path,
    key: Option<&str>,
) -> candle_core::Result<Vec<(String, Tensor)>> {
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
pub(super) fn strided_tensor(
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

pub(super) fn read_pickle_unchecked(path: &Path) -> candle_core::Result<Vec<(String, Tensor)>> {
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

pub(super) fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}
