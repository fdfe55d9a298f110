//! The two namings (HF and OpenAI's), the rename between them, and the
//! architecture read from tensor shapes and `config.json`.

use super::*;
use crate::model::config::EncoderShape;

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
pub(super) struct HfTowerJson {
    hidden_size: Option<usize>,
    num_attention_heads: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct HfConfigJson {
    text_config: Option<HfTowerJson>,
    vision_config: Option<HfTowerJson>,
}

pub(super) fn read_config_json(path: &Path) -> Result<Option<HfConfigJson>> {
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
pub(super) fn count_layers(tensors: &HashMap<String, Tensor>, prefix: &str) -> usize {
    let idx: BTreeSet<usize> = tensors
        .keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|r| r.split('.').next()?.parse().ok())
        .collect();
    idx.len()
}

pub(super) fn dims(
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

pub(super) fn tower_extras(
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
            encoder: EncoderShape {
                width: vwidth,
                layers: vlayers,
                heads: vheads,
                mlp: vmlp,
                layer_norm_eps: veps,
                activation: vact,
            },
        },
        text: TextConfig {
            vocab_size: tok[0],
            context_length: tpos[0],
            encoder: EncoderShape {
                width: twidth,
                layers: tlayers,
                heads: theads,
                mlp: tmlp,
                layer_norm_eps: teps,
                activation: tact,
            },
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
