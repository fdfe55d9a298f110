//! The descriptor bank: the expression descriptors a model scores against
//! (CLIPER's 35 learned token embeddings, zero-shot sentences, DFER-CLIP's
//! learned contexts with their class descriptions), the classes they belong
//! to ([`BankLayout`]), their text features (computed once per bank and
//! cached here), an optional Exp-CLIP projection head, and what a person
//! reads for each descriptor.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};

use super::expressions::{
    canonical_class, known_classes, BankLayout, NUM_DESCRIPTORS, SLOTS, SLOT_START, TEMPLATE_EOT,
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
    #[error("{source_name}: {reason}")]
    Head { source_name: String, reason: String },
    #[error("{source_name}: {reason}")]
    PromptLearner { source_name: String, reason: String },
    #[error("cannot compute descriptor features: {0}")]
    Candle(#[from] candle_core::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BankKind {
    /// CLIPER's learned token embeddings.
    Learned,
    /// Plain-English descriptions.
    ZeroShot,
    /// DFER-CLIP's prompt learner: learned context vectors before each
    /// class's description.
    DferClip,
}

impl BankKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BankKind::Learned => "learned",
            BankKind::ZeroShot => "zero-shot",
            BankKind::DferClip => "dfer-clip",
        }
    }
}

/// Exp-CLIP's projection head (zengqunzhao/Exp-CLIP, `Linear_Matrix`): a
/// bias-free linear map `mlp.weight` [P, E] (P = 4096) applied to both the
/// image and the text features of CLIP, which are then normalised and
/// compared by cosine. Being linear, it gives the same direction whether
/// the CLIP feature was normalised before or not.
#[derive(Clone, Debug)]
pub struct ProjectionHead {
    /// [P, E] f32 on the model's device.
    pub weight: Tensor,
    pub source: String,
}

impl ProjectionHead {
    /// Reads a head file (`.pth` as Exp-CLIP saves it, or safetensors) for a
    /// CLIP of embedding width `embed_dim`.
    pub fn load(path: &Path, embed_dim: usize, device: &Device) -> Result<Self, BankError> {
        let source_name = path.display().to_string();
        let err = |reason: String| BankError::Head {
            source_name: source_name.clone(),
            reason,
        };
        let tensors = crate::model::weights::read_tensors(path, DType::F32)
            .map_err(|e| err(e.to_string()))?;
        let mut found: Vec<(&String, &Tensor)> = tensors
            .iter()
            .filter(|(k, _)| *k == "mlp.weight" || k.ends_with(".mlp.weight"))
            .collect();
        found.sort_by_key(|(k, _)| k.len());
        let Some((name, w)) = found.first() else {
            let mut names: Vec<&String> = tensors.keys().collect();
            names.sort();
            return Err(err(format!(
                "no `mlp.weight` tensor (an Exp-CLIP head holds one, [4096, {embed_dim}]); this file holds {}",
                names.iter().take(4).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
            )));
        };
        crate::model::weights::check_weight(path, name, w).map_err(|e| err(e.to_string()))?;
        let dims = w.dims().to_vec();
        if dims.len() != 2 || dims[1] != embed_dim {
            return Err(err(format!(
                "the head `{name}` has shape {dims:?}, but these CLIP weights have embedding width {embed_dim}: use the head made for this backbone (Exp-CLIP's B16 and B32 heads are [4096, 512], L14's is [4096, 768])"
            )));
        }
        Ok(Self {
            weight: w.to_device(device)?,
            source: source_name,
        })
    }

    /// Projected and normalised features [N, P] of features [N, E].
    pub fn project(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight.to_dtype(x.dtype())?.to_device(x.device())?;
        l2_normalize(&x.matmul(&w.t()?)?)
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
    /// Classes and descriptors per class.
    pub layout: Arc<BankLayout>,
    pub descriptors: Vec<Descriptor>,
    /// Normalised text features, [D, E] f32 on the model's device (in the
    /// head's space [D, P] when there is a head).
    pub text_features: Tensor,
    /// Exp-CLIP's projection head, applied to image features before scoring.
    pub head: Option<ProjectionHead>,
}

/// Parses a zero-shot prompts file: `[class]` sections, each followed by
/// its descriptions, one per line (any number per class; at least two
/// classes, named as any model or data set names them: see
/// `expressions::canonical_class`). Returns the layout (classes in file
/// order) and the descriptions, class-major.
pub fn parse_prompts(
    text: &str,
    source_name: &str,
) -> Result<(BankLayout, Vec<String>), BankError> {
    let err = |reason: String| BankError::Prompts {
        source_name: source_name.to_string(),
        reason,
    };
    let mut per_class: Vec<(&'static str, Vec<String>)> = Vec::new();
    let mut current: Option<usize> = None;
    // A UTF-8 byte-order mark (Windows editors) is not part of the text.
    let text = text.trim_start_matches('\u{feff}');
    for (lineno, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let c = canonical_class(name).ok_or_else(|| {
                err(format!(
                    "line {}: unknown class `{name}` (known classes: {})",
                    lineno + 1,
                    known_classes().join(", ")
                ))
            })?;
            if per_class.iter().any(|(k, _)| *k == c) {
                return Err(err(format!(
                    "line {}: class `{c}` appears twice",
                    lineno + 1
                )));
            }
            per_class.push((c, Vec::new()));
            current = Some(per_class.len() - 1);
            continue;
        }
        let Some(c) = current else {
            return Err(err(format!(
                "line {}: description before any [class] header",
                lineno + 1
            )));
        };
        per_class[c].1.push(line.to_string());
    }
    let counts: Vec<(&str, usize)> = per_class.iter().map(|(c, l)| (*c, l.len())).collect();
    let layout = BankLayout::new(&counts).map_err(|e| {
        err(match e {
            super::expressions::LayoutError::Empty(c) => {
                format!("class `{c}` has no descriptions (give at least one line under [{c}])")
            }
            super::expressions::LayoutError::TooFew(n) => format!(
                "{n} class section(s): give at least two `[class]` sections, each followed by its descriptions"
            ),
            other => other.to_string(),
        })
    })?;
    Ok((layout, per_class.into_iter().flat_map(|(_, l)| l).collect()))
}

/// Reads and parses a prompts file.
pub fn read_prompts(path: &Path) -> Result<(BankLayout, Vec<String>), BankError> {
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
    /// Zero-shot bank from descriptions laid out by `layout` (class-major),
    /// optionally in an Exp-CLIP head's space.
    pub fn zero_shot(
        clip: &ClipModel,
        tok: &ClipTokenizer,
        layout: BankLayout,
        texts: Vec<String>,
        source: &str,
        head: Option<ProjectionHead>,
    ) -> Result<Self, BankError> {
        if texts.len() != layout.num_descriptors() {
            return Err(BankError::Prompts {
                source_name: source.to_string(),
                reason: format!(
                    "{} descriptions, expected {}",
                    texts.len(),
                    layout.num_descriptors()
                ),
            });
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        // Encoded in batches: a large ensemble stays within memory.
        let mut parts = Vec::new();
        for chunk in refs.chunks(64) {
            parts.push(clip.encode_texts(tok, chunk)?);
        }
        let mut text_features = Tensor::cat(&parts, 0)?;
        if let Some(h) = &head {
            text_features = h.project(&text_features)?;
        }
        let descriptors = texts
            .into_iter()
            .enumerate()
            .map(|(i, text)| {
                let (class, index) = layout.locate(i);
                Descriptor {
                    class,
                    index,
                    text,
                    words: None,
                }
            })
            .collect();
        Ok(Self {
            kind: BankKind::ZeroShot,
            source: source.to_string(),
            layout: Arc::new(layout),
            descriptors,
            text_features,
            head,
        })
    }

    /// The built-in zero-shot descriptions.
    pub fn default_zero_shot(clip: &ClipModel, tok: &ClipTokenizer) -> Result<Self, BankError> {
        Self::default_zero_shot_with(clip, tok, None)
    }

    /// The built-in zero-shot descriptions, optionally through a head.
    pub fn default_zero_shot_with(
        clip: &ClipModel,
        tok: &ClipTokenizer,
        head: Option<ProjectionHead>,
    ) -> Result<Self, BankError> {
        let (layout, texts) = parse_prompts(DEFAULT_PROMPTS, "built-in zero-shot descriptors")?;
        Self::zero_shot(clip, tok, layout, texts, "built-in", head)
    }

    /// Image features [N, E] (normalised, CLIP's space) in the space the
    /// text features live in: through the head when there is one.
    pub fn project_images(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.head {
            Some(h) => h.project(x),
            None => Ok(x.clone()),
        }
    }

    /// The normalised feature [E] of a free-text probe, in this bank's space.
    pub fn encode_probe(
        &self,
        clip: &ClipModel,
        tok: &ClipTokenizer,
        text: &str,
    ) -> candle_core::Result<Tensor> {
        let f = clip.encode_texts(tok, &[text])?;
        self.project_images(&f)?.squeeze(0)
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
        let layout = BankLayout::cliper();
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
                let (class, index) = layout.locate(i);
                Descriptor {
                    class,
                    index,
                    text,
                    words: Some(words),
                }
            })
            .collect();
        Ok(Self {
            kind: BankKind::Learned,
            source: source.to_string(),
            layout: Arc::new(layout),
            descriptors,
            text_features,
            head: None,
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
        let (layout, p) = parse_prompts(DEFAULT_PROMPTS, "builtin").unwrap();
        assert_eq!(p.len(), 35);
        assert_eq!(layout, BankLayout::cliper());
        assert!(p[0].contains("raised eyebrows"));
    }

    #[test]
    fn prompts_of_any_shape() {
        // Exp-CLIP's class names, MAFW's 11 classes, uneven counts.
        let text =
            "[happiness.]\na\nb\n[Contempt]\nc\n[an expression of disappointment.]\nd\ne\nf\n";
        let (layout, p) = parse_prompts(text, "f.txt").unwrap();
        assert_eq!(
            layout.classes(),
            ["happiness", "contempt", "disappointment"]
        );
        assert_eq!(p, ["a", "b", "c", "d", "e", "f"]);
        assert_eq!(layout.locate(3), (2, 0));
    }

    #[test]
    fn prompts_errors_name_the_problem() {
        let e = parse_prompts("[happy]\na\n[boredom]\nb", "f.txt")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f.txt")
                && e.contains("line 3")
                && e.contains("boredom")
                && e.contains("contempt"),
            "{e}"
        );
        let e = parse_prompts("[happy]\na\n[sad]\n", "f.txt")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sadness") && e.contains("no descriptions"),
            "{e}"
        );
        let e = parse_prompts("[happy]\na\n", "f.txt")
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least two"), "{e}");
        let e = parse_prompts("[happy]\na\n[happiness]\nb", "f.txt")
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
        let e = parse_prompts("a\n[happy]\nb", "f.txt")
            .unwrap_err()
            .to_string();
        assert!(e.contains("before any [class]"), "{e}");
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
