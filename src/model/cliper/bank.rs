//! The descriptor bank: 35 expression descriptors (learned token embeddings
//! or zero-shot sentences), their text features (computed once per bank and
//! cached here), and what a person reads for each one.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};

use super::expressions::{
    class_index, CLASSES, DESCRIPTORS_PER_CLASS, NUM_DESCRIPTORS, SLOTS, SLOT_START, TEMPLATE_EOT,
    TEMPLATE_IDS,
};
use crate::model::layers::l2_normalize;
use crate::model::text::TextTower;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::ClipModel;

/// The built-in zero-shot descriptions (`assets/zero_shot_descriptors.txt`).
pub const DEFAULT_PROMPTS: &str = include_str!("../../../assets/zero_shot_descriptors.txt");

/// Nearest vocabulary words shown per learned token.
pub const WORDS_PER_TOKEN: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum BankError {
    #[error("{source_name}: {reason}")]
    Prompts { source_name: String, reason: String },
    #[error("{source_name}: descriptor tensor has shape {found:?}, expected [35, 4, {width}] for these CLIP weights (text width {width})")]
    Shape {
        source_name: String,
        found: Vec<usize>,
        width: usize,
    },
    #[error("cannot compute descriptor features: {0}")]
    Candle(#[from] candle_core::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BankKind {
    /// CLIPER's learned token embeddings.
    Learned,
    /// Plain-English descriptions.
    ZeroShot,
}

impl BankKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BankKind::Learned => "learned",
            BankKind::ZeroShot => "zero-shot",
        }
    }
}

/// One of the 35 descriptors, as a person reads it.
#[derive(Clone, Debug)]
pub struct Descriptor {
    pub class: usize,
    /// Index within its class (0..5).
    pub index: usize,
    /// The description (zero-shot) or the top nearest word of each learned
    /// token joined by spaces (learned).
    pub text: String,
    /// Learned only: the 5 nearest vocabulary words of each of the 4 tokens.
    pub words: Option<Vec<Vec<String>>>,
}

#[derive(Debug)]
pub struct DescriptorBank {
    pub kind: BankKind,
    /// Where it came from: a file path or "built-in".
    pub source: String,
    pub descriptors: Vec<Descriptor>,
    /// Normalised text features, [35, E] f32 on the model's device.
    pub text_features: Tensor,
}

/// Parses a zero-shot prompts file: `[class]` sections with exactly 5
/// descriptions each, all 7 classes.
pub fn parse_prompts(text: &str, source_name: &str) -> Result<Vec<String>, BankError> {
    let err = |reason: String| BankError::Prompts {
        source_name: source_name.to_string(),
        reason,
    };
    let mut per_class: Vec<Option<Vec<String>>> = vec![None; CLASSES.len()];
    let mut current: Option<usize> = None;
    // A UTF-8 byte-order mark (Windows editors) is not part of the text.
    let text = text.trim_start_matches('\u{feff}');
    for (lineno, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let c = class_index(name).ok_or_else(|| {
                err(format!(
                    "line {}: unknown class `{name}` (classes: {})",
                    lineno + 1,
                    CLASSES.join(", ")
                ))
            })?;
            if per_class[c].is_some() {
                return Err(err(format!(
                    "line {}: class `{}` appears twice",
                    lineno + 1,
                    CLASSES[c]
                )));
            }
            per_class[c] = Some(Vec::new());
            current = Some(c);
            continue;
        }
        let Some(c) = current else {
            return Err(err(format!(
                "line {}: description before any [class] header",
                lineno + 1
            )));
        };
        if let Some(list) = per_class[c].as_mut() {
            list.push(line.to_string());
        }
    }
    let mut out = Vec::with_capacity(NUM_DESCRIPTORS);
    for (c, list) in per_class.into_iter().enumerate() {
        let list = list.ok_or_else(|| err(format!("class `{}` is missing", CLASSES[c])))?;
        if list.len() != DESCRIPTORS_PER_CLASS {
            return Err(err(format!(
                "class `{}` has {} descriptions, expected {DESCRIPTORS_PER_CLASS}",
                CLASSES[c],
                list.len()
            )));
        }
        out.extend(list);
    }
    Ok(out)
}

/// Reads and parses a prompts file.
pub fn read_prompts(path: &Path) -> Result<Vec<String>, BankError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| BankError::Prompts {
        source_name: name.clone(),
        reason: format!("cannot read the prompts file: {e}"),
    })?;
    parse_prompts(&text, &name)
}

/// Token embeddings of the CLIPER template for every descriptor with the 4
/// learned slots replaced: [35, 11, W]. Differentiable in `descriptor`.
pub fn prompt_embeddings(text: &TextTower, descriptor: &Tensor) -> candle_core::Result<Tensor> {
    let n = descriptor.dim(0)?;
    let ids = Tensor::new(&TEMPLATE_IDS, descriptor.device())?.unsqueeze(0)?; // [1, 11]
    let base = text.embed_tokens(&ids)?.to_dtype(descriptor.dtype())?; // [1, 11, W]
    let w = base.dim(2)?;
    let head = base
        .narrow(1, 0, SLOT_START)?
        .broadcast_as((n, SLOT_START, w))?;
    let tail_len = TEMPLATE_IDS.len() - SLOT_START - SLOTS;
    let tail = base
        .narrow(1, SLOT_START + SLOTS, tail_len)?
        .broadcast_as((n, tail_len, w))?;
    Tensor::cat(&[&head, descriptor, &tail], 1)
}

/// Text features of learned descriptors [N, 4, W]: [N, E], not normalised.
/// Only the 11 template tokens are run (the causal mask makes the padding
/// irrelevant to the EOT feature). Differentiable in `descriptor`.
pub fn learned_text_features(text: &TextTower, descriptor: &Tensor) -> candle_core::Result<Tensor> {
    let embeds = prompt_embeddings(text, descriptor)?;
    let n = descriptor.dim(0)?;
    text.forward_embeds(&embeds, &vec![TEMPLATE_EOT; n])
}

/// For each descriptor and each of its tokens, the `k` vocabulary ids
/// nearest in Euclidean distance: `[N][4][k]`.
pub fn nearest_token_ids(
    table: &Tensor,
    descriptor: &Tensor,
    k: usize,
) -> candle_core::Result<Vec<Vec<Vec<u32>>>> {
    let (n, slots, w) = descriptor.dims3()?;
    let table = table.to_dtype(DType::F32)?.to_device(&Device::Cpu)?; // [V, W]
    let d = descriptor
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .reshape((n * slots, w))?;
    // |d - e|^2 = |d|^2 - 2 d.e + |e|^2; |d|^2 is constant per row.
    let e2 = table.sqr()?.sum(1)?; // [V]
    let de = d.matmul(&table.t()?)?; // [N*4, V]
    let dist = (de * -2.0)?.broadcast_add(&e2.unsqueeze(0)?)?;
    let dist = dist.to_vec2::<f32>()?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut per_slot = Vec::with_capacity(slots);
        for s in 0..slots {
            let row = &dist[i * slots + s];
            let mut idx: Vec<u32> = (0..row.len() as u32).collect();
            let k = k.min(idx.len());
            idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
                row[a as usize].total_cmp(&row[b as usize])
            });
            let mut top: Vec<u32> = idx[..k].to_vec();
            top.sort_by(|&a, &b| row[a as usize].total_cmp(&row[b as usize]));
            per_slot.push(top);
        }
        out.push(per_slot);
    }
    Ok(out)
}

impl DescriptorBank {
    /// Zero-shot bank from 35 descriptions (class-major).
    pub fn zero_shot(
        clip: &ClipModel,
        tok: &ClipTokenizer,
        texts: Vec<String>,
        source: &str,
    ) -> Result<Self, BankError> {
        if texts.len() != NUM_DESCRIPTORS {
            return Err(BankError::Prompts {
                source_name: source.to_string(),
                reason: format!("{} descriptions, expected {NUM_DESCRIPTORS}", texts.len()),
            });
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let text_features = clip.encode_texts(tok, &refs)?;
        let descriptors = texts
            .into_iter()
            .enumerate()
            .map(|(i, text)| Descriptor {
                class: i / DESCRIPTORS_PER_CLASS,
                index: i % DESCRIPTORS_PER_CLASS,
                text,
                words: None,
            })
            .collect();
        Ok(Self {
            kind: BankKind::ZeroShot,
            source: source.to_string(),
            descriptors,
            text_features,
        })
    }

    /// The built-in zero-shot descriptions.
    pub fn default_zero_shot(clip: &ClipModel, tok: &ClipTokenizer) -> Result<Self, BankError> {
        let texts = parse_prompts(DEFAULT_PROMPTS, "built-in zero-shot descriptors")?;
        Self::zero_shot(clip, tok, texts, "built-in")
    }

    /// Learned bank from a `descriptor` tensor [35, 4, W].
    pub fn learned(
        clip: &ClipModel,
        tok: &ClipTokenizer,
        descriptor: &Tensor,
        source: &str,
    ) -> Result<Self, BankError> {
        let width = clip.config.text.width;
        let dims = descriptor.dims().to_vec();
        if dims != [NUM_DESCRIPTORS, SLOTS, width] {
            return Err(BankError::Shape {
                source_name: source.to_string(),
                found: dims,
                width,
            });
        }
        let desc = descriptor.to_device(&clip.device)?.to_dtype(clip.dtype)?;
        let feats = learned_text_features(&clip.text, &desc)?.to_dtype(DType::F32)?;
        let text_features = l2_normalize(&feats)?;
        let ids = nearest_token_ids(
            clip.text.token_embedding_matrix(),
            descriptor,
            WORDS_PER_TOKEN,
        )?;
        let descriptors = ids
            .into_iter()
            .enumerate()
            .map(|(i, slots)| {
                let words: Vec<Vec<String>> = slots
                    .iter()
                    .map(|ids| ids.iter().map(|&id| tok.decode_token(id)).collect())
                    .collect();
                let text = words
                    .iter()
                    .map(|w| w.first().cloned().unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join(" ");
                Descriptor {
                    class: i / DESCRIPTORS_PER_CLASS,
                    index: i % DESCRIPTORS_PER_CLASS,
                    text,
                    words: Some(words),
                }
            })
            .collect();
        Ok(Self {
            kind: BankKind::Learned,
            source: source.to_string(),
            descriptors,
            text_features,
        })
    }

    /// Feature of descriptor `i`: [E].
    pub fn feature(&self, i: usize) -> candle_core::Result<Tensor> {
        self.text_features.i(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_prompts_parse() {
        let p = parse_prompts(DEFAULT_PROMPTS, "builtin").unwrap();
        assert_eq!(p.len(), 35);
        assert!(p[0].contains("raised eyebrows"));
    }

    #[test]
    fn prompts_errors_name_the_problem() {
        let missing = DEFAULT_PROMPTS.replace("[neutral]", "# gone");
        let e = parse_prompts(&missing, "f.txt").unwrap_err().to_string();
        assert!(
            e.contains("f.txt") && e.contains("anger") && e.contains("10"),
            "{e}"
        );
        let short: String = DEFAULT_PROMPTS
            .lines()
            .filter(|l| !l.starts_with("a cheerful"))
            .collect::<Vec<_>>()
            .join("\n");
        let e = parse_prompts(&short, "f.txt").unwrap_err().to_string();
        assert!(
            e.contains("happiness") && e.contains("4 descriptions"),
            "{e}"
        );
        let e = parse_prompts("[contempt]\na", "f.txt")
            .unwrap_err()
            .to_string();
        assert!(e.contains("contempt"), "{e}");
    }

    #[test]
    fn nearest_ids_find_exact_rows() {
        let table = Tensor::new(&[[0f32, 0.], [1., 0.], [0., 1.], [5., 5.]], &Device::Cpu).unwrap();
        let d = Tensor::new(&[[[0.9f32, 0.1], [4.0, 4.5]]], &Device::Cpu).unwrap(); // [1, 2, 2]
        let ids = nearest_token_ids(&table, &d, 2).unwrap();
        assert_eq!(ids[0][0], vec![1, 0]);
        assert_eq!(ids[0][1][0], 3);
    }
}
