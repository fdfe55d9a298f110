//! DFER-CLIP checkpoints (Zhao & Patras, BMVC 2023; zengqunzhao/DFER-CLIP,
//! MIT), read for what they hold and rebuilt here:
//!
//! - the file is `torch.save({'epoch', 'state_dict', 'best_acc', 'optimizer'})`
//!   of a `DataParallel` model, so every name starts with `module.`;
//! - `clip_model_.*`: the whole CLIP ViT-B/32 in OpenAI naming, its visual
//!   tower fine-tuned (`image_encoder.*` and `text_encoder.*` are the same
//!   tensors saved a second time and are not read);
//! - `temporal_net.*`: the temporal transformer (see `model::temporal`);
//! - `prompt_learner.ctx` [C, n, W] (class-specific) or [n, W] (generic):
//!   learned context vectors; `prompt_learner.token_prefix` [C, 1, W] and
//!   `token_suffix` [C, 77 - 1 - n, W]: the token embeddings of SOT and of
//!   each class's text (an LLM-written description, or the class name),
//!   then EOT and padding, as the prompt "X X ... X <text>" embedded them.
//!
//! A class's text feature is the text tower run on [prefix, ctx, suffix],
//! taken at EOT. The EOT position is not saved: it is recovered by matching
//! the suffix embeddings against the token-embedding matrix, which also
//! gives back the class text for display. Logits are cos / 0.01, one
//! descriptor per class.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::model::cliper::bank::{
    nearest_token_ids, BankError, BankKind, Descriptor, DescriptorBank, WORDS_PER_TOKEN,
};
use crate::model::cliper::expressions::{canonical_class, BankLayout};
use crate::model::layers::l2_normalize;
use crate::model::tokenizer::{ClipTokenizer, EOT, SOT};
use crate::model::ClipModel;

/// The class orders DFER-CLIP trains with (`models/Text.py`): MAFW's 11,
/// whose first 7 are DFEW's and FERV39k's.
pub const MAFW_CLASSES: [&str; 11] = [
    "happiness",
    "sadness",
    "neutral",
    "anger",
    "surprise",
    "disgust",
    "fear",
    "contempt",
    "anxiety",
    "helplessness",
    "disappointment",
];
pub const DFEW_CLASSES: &[&str] = MAFW_CLASSES.split_at(7).0;

/// The prompt learner's saved tensors.
#[derive(Clone, Debug)]
pub struct PromptLearner {
    /// [C, n, W] or [n, W].
    pub ctx: Tensor,
    /// [C, 1, W].
    pub prefix: Tensor,
    /// [C, S, W].
    pub suffix: Tensor,
}

/// Whether tensor names are a DFER-CLIP model's.
pub fn is_dfer_clip<'a>(mut names: impl Iterator<Item = &'a String>) -> bool {
    names.any(|n| n == "prompt_learner.ctx" || n.ends_with(".prompt_learner.ctx"))
}

/// Whether `path` is a DFER-CLIP checkpoint holding its own CLIP (so no
/// separate CLIP weights are needed), read from the file's tensor index
/// alone, after the pickle guard.
pub fn has_own_clip(path: &std::path::Path) -> bool {
    if !crate::model::weights::is_pickle_file(path)
        || crate::model::pickle_guard::check_file(path).is_err()
    {
        return false;
    }
    let Ok(infos) = candle_core::pickle::read_pth_tensor_info(path, false, Some("state_dict"))
    else {
        return false;
    };
    is_dfer_clip(infos.iter().map(|i| &i.name))
        && infos.iter().any(|i| i.name.contains("clip_model_."))
}

/// For each row of `rows` [N, W], the id of the nearest row of `table`
/// [V, W] and the largest absolute difference to it.
fn match_rows(table: &Tensor, rows: &Tensor) -> candle_core::Result<Vec<(u32, f32)>> {
    let (n, w) = rows.dims2()?;
    let ids = nearest_token_ids(table, &rows.reshape((n, 1, w))?, 1)?;
    let ids: Vec<u32> = ids.iter().map(|r| r[0][0]).collect();
    let idx = Tensor::new(ids.as_slice(), table.device())?;
    let picked = table.index_select(&idx, 0)?;
    let diff = (picked - rows)?.abs()?.max(1)?.to_vec1::<f32>()?;
    Ok(ids.into_iter().zip(diff).collect())
}

/// BPE decoding ends every word with a space, punctuation included
/// ("smile , raised"): give the text back as it was written.
fn tidy(s: &str) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    [",", ".", ";", ":", "!", "?"]
        .iter()
        .fold(s, |acc, p| acc.replace(&format!(" {p}"), p))
}

/// The bank of a DFER-CLIP prompt learner on the model's text tower.
pub fn bank(
    clip: &ClipModel,
    tok: &ClipTokenizer,
    pl: &PromptLearner,
    source: &str,
) -> Result<DescriptorBank, BankError> {
    let fail = |reason: String| BankError::PromptLearner {
        source_name: source.to_string(),
        reason,
    };
    let width = clip.config.text.width;
    let context = clip.config.text.context_length;
    let prefix = pl.prefix.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let suffix = pl.suffix.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let ctx = pl.ctx.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let (c, one, pw) = prefix.dims3().map_err(|_| {
        fail(format!(
            "`prompt_learner.token_prefix` has shape {:?}, expected [classes, 1, width]",
            prefix.dims()
        ))
    })?;
    let (sc, s, sw) = suffix.dims3().map_err(|_| {
        fail(format!(
            "`prompt_learner.token_suffix` has shape {:?}, expected [classes, tokens, width]",
            suffix.dims()
        ))
    })?;
    let ctx = match ctx.rank() {
        2 => ctx
            .unsqueeze(0)?
            .broadcast_as((c, ctx.dim(0)?, ctx.dim(1)?))?
            .contiguous()?,
        3 => ctx,
        _ => {
            return Err(fail(format!(
                "`prompt_learner.ctx` has shape {:?}, expected [classes, n, width] or [n, width]",
                ctx.dims()
            )))
        }
    };
    let (cc, n, cw) = ctx.dims3()?;
    if pw != width || sw != width || cw != width {
        return Err(fail(format!(
            "the prompt learner has width {cw} (prefix {pw}, suffix {sw}) but the text tower of these CLIP weights has width {width}: the checkpoint does not belong to this backbone"
        )));
    }
    if one != 1 || sc != c || cc != c || c < 2 {
        return Err(fail(format!(
            "inconsistent prompt learner: prefix {:?}, ctx {:?}, suffix {:?}",
            prefix.dims(),
            ctx.dims(),
            suffix.dims()
        )));
    }
    if 1 + n + s > context {
        return Err(fail(format!(
            "the prompts are {} tokens long, more than the text context of {context}",
            1 + n + s
        )));
    }
    let table = clip
        .text
        .token_embedding_matrix()
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    // The saved embeddings were copied from this very matrix: anything but
    // an exact match (up to float noise) means another CLIP.
    const TOLERANCE: f32 = 1e-4;
    let sot = match_rows(&table, &prefix.reshape((c, width))?)?;
    if sot.iter().any(|&(id, d)| id != SOT || d > TOLERANCE) {
        return Err(fail(
            "`prompt_learner.token_prefix` is not the start-of-text embedding of these CLIP weights: the checkpoint was made with another CLIP".into(),
        ));
    }
    let matched = match_rows(&table, &suffix.reshape((c * s, width))?)?;
    let mut texts = Vec::with_capacity(c);
    let mut eots = Vec::with_capacity(c);
    for k in 0..c {
        let row = &matched[k * s..(k + 1) * s];
        let Some(j) = row.iter().position(|&(id, d)| id == EOT && d <= TOLERANCE) else {
            return Err(fail(format!(
                "no end-of-text token in the saved prompt of class {k}: the checkpoint was made with another CLIP, or is damaged"
            )));
        };
        if let Some(&(_, d)) = row[..j].iter().find(|&&(_, d)| d > TOLERANCE) {
            return Err(fail(format!(
                "the saved prompt of class {k} does not match the token embeddings of these CLIP weights (off by {d:.2e}): the checkpoint was made with another CLIP"
            )));
        }
        let ids: Vec<u32> = row[..j].iter().map(|&(id, _)| id).collect();
        texts.push(tidy(&tok.decode(&ids)));
        eots.push(1 + n + j);
    }
    // Classes: named by the prompts themselves when they are class names
    // ("happiness.", "an expression of happiness."), else DFER-CLIP's
    // order for the class count.
    let named: Option<Vec<&str>> = texts.iter().map(|t| canonical_class(t)).collect();
    let classes: Vec<&str> = match (named, c) {
        (Some(n), _) => n,
        (None, 7) => DFEW_CLASSES.to_vec(),
        (None, 11) => MAFW_CLASSES.to_vec(),
        (None, _) => {
            return Err(fail(format!(
                "{c} classes with descriptions that name no class: DFER-CLIP's are 7 (DFEW, FERV39k) or 11 (MAFW)"
            )))
        }
    };
    let layout = BankLayout::new(&classes.iter().map(|n| (*n, 1)).collect::<Vec<_>>())
        .map_err(|e| fail(e.to_string()))?;
    // [C, T, W] with T up to the last EOT; rows whose EOT comes earlier
    // carry their own padding, which the causal mask keeps out of them.
    let t = eots.iter().max().copied().unwrap_or(1) + 1;
    let embeds = Tensor::cat(&[&prefix, &ctx, &suffix.narrow(1, 0, t - 1 - n)?], 1)?
        .to_device(&clip.device)?
        .to_dtype(clip.dtype)?;
    let feats = clip
        .text
        .forward_embeds(&embeds, &eots)?
        .to_dtype(DType::F32)?;
    let text_features = l2_normalize(&feats)?;
    // The learned context read as words, as for CLIPER's descriptors.
    let words = nearest_token_ids(&table, &ctx, WORDS_PER_TOKEN)?;
    let descriptors = texts
        .into_iter()
        .zip(words)
        .enumerate()
        .map(|(k, (text, ids))| Descriptor {
            class: k,
            index: 0,
            text,
            words: Some(
                ids.iter()
                    .map(|w| w.iter().map(|&id| tok.decode_token(id)).collect())
                    .collect(),
            ),
        })
        .collect();
    Ok(DescriptorBank {
        kind: BankKind::DferClip,
        source: source.to_string(),
        layout: Arc::new(layout),
        descriptors,
        text_features,
        head: None,
    })
}

/// The prompt-learner tensors out of a checkpoint's (prefix-free) names.
pub fn prompt_learner(
    tensors: &std::collections::HashMap<String, Tensor>,
) -> Option<PromptLearner> {
    let get = |leaf: &str| {
        tensors
            .iter()
            .find(|(k, _)| {
                *k == &format!("prompt_learner.{leaf}")
                    || k.ends_with(&format!(".prompt_learner.{leaf}"))
            })
            .map(|(_, v)| v.clone())
    };
    Some(PromptLearner {
        ctx: get("ctx")?,
        prefix: get("token_prefix")?,
        suffix: get("token_suffix")?,
    })
}
