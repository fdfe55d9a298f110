//! The one definition of the label spaces: CLIPER's classes and prompt
//! template (`docs/model.md`), every class name other models use, and
//! [`BankLayout`], the shape of a bank of any model. Everything else
//! imports these.

/// The 7 classes in RAF-DB label order (label file value minus 1).
pub const CLASSES: [&str; 7] = [
    "surprise",
    "fear",
    "disgust",
    "happiness",
    "sadness",
    "anger",
    "neutral",
];
pub const NUM_CLASSES: usize = CLASSES.len();
/// Descriptors per class; descriptor `i` belongs to class `i / 5`.
pub const DESCRIPTORS_PER_CLASS: usize = 5;
pub const NUM_DESCRIPTORS: usize = NUM_CLASSES * DESCRIPTORS_PER_CLASS;

/// The learned-descriptor prompt; the four `X` token embeddings are replaced.
pub const TEMPLATE: &str = "an ID photo of X X X X.";
/// Token ids of `TEMPLATE` up to and including EOT (the rest is padding,
/// which the causal mask makes irrelevant to the EOT feature).
pub const TEMPLATE_IDS: [u32; 11] = [49406, 550, 1014, 1125, 539, 343, 343, 343, 343, 269, 49407];
/// First learned slot and number of learned tokens per descriptor.
pub const SLOT_START: usize = 5;
pub const SLOTS: usize = 4;
/// Position of EOT in `TEMPLATE_IDS`.
pub const TEMPLATE_EOT: usize = 10;

/// CLIPER's fixed temperature: logit = cos / 0.01.
pub const TEMPERATURE: f32 = 0.01;

/// Every expression class a supported model uses, by canonical name, with
/// the names data sets and model files use for it and the colour every view
/// draws it in. RAF-DB's 7, then FERPlus/AffectNet's contempt, then MAFW's
/// extra three.
const KNOWN_CLASSES: &[(&str, &[&str], [u8; 3])] = &[
    ("surprise", &["surprised", "surprize"], [255, 167, 38]),
    ("fear", &["fearful", "afraid", "scared"], [171, 71, 188]),
    ("disgust", &["disgusted"], [102, 187, 106]),
    ("happiness", &["happy", "joy", "happy face"], [255, 238, 88]),
    ("sadness", &["sad"], [66, 165, 245]),
    ("anger", &["angry"], [239, 83, 80]),
    ("neutral", &["neutrality", "calm"], [176, 190, 197]),
    ("contempt", &["contemptuous"], [141, 110, 99]),
    ("anxiety", &["anxious"], [236, 64, 122]),
    ("helplessness", &["helpless"], [92, 107, 192]),
    ("disappointment", &["disappointed"], [212, 225, 87]),
];

/// The canonical name of a class name as models and data sets write it:
/// case, surrounding spaces, a final full stop and the DFER-CLIP /
/// Exp-CLIP phrase "an expression of" do not matter ("Happy",
/// "happiness.", "an expression of happiness." are all `happiness`).
pub fn canonical_class(name: &str) -> Option<&'static str> {
    let n = name
        .trim()
        .trim_end_matches('.')
        .trim()
        .to_ascii_lowercase();
    let n = n.strip_prefix("an expression of ").unwrap_or(&n).trim();
    KNOWN_CLASSES
        .iter()
        .find(|(c, syn, _)| *c == n || syn.contains(&n))
        .map(|(c, _, _)| *c)
}

/// A short form of a class name for tight labels (chips, bar axes): at
/// most 6 characters.
pub fn short_class_name(name: &str) -> &str {
    match name {
        "happiness" => "happy",
        "surprise" => "surpr.",
        "sadness" => "sad",
        "disgust" => "disg.",
        "neutral" => "neutr.",
        "contempt" => "cont.",
        "anxiety" => "anx.",
        "helplessness" => "helpl.",
        "disappointment" => "disap.",
        other => other,
    }
}

/// Index of a class among all known classes (RAF-DB's 7 first, in
/// CLIPER's order, so for those it equals [`class_index`]).
pub fn known_index(name: &str) -> Option<usize> {
    let c = canonical_class(name)?;
    KNOWN_CLASSES.iter().position(|(k, _, _)| *k == c)
}

/// The canonical name of known class `i` ("?" out of range).
pub fn known_name(i: usize) -> &'static str {
    KNOWN_CLASSES.get(i).map(|(c, _, _)| *c).unwrap_or("?")
}

/// Every canonical class name, for error messages.
pub fn known_classes() -> Vec<&'static str> {
    KNOWN_CLASSES.iter().map(|(c, _, _)| *c).collect()
}

/// The colour of a class (by any of its names); grey when unknown.
pub fn class_rgb(name: &str) -> [u8; 3] {
    canonical_class(name)
        .and_then(|c| KNOWN_CLASSES.iter().find(|(k, _, _)| *k == c))
        .map(|(_, _, rgb)| *rgb)
        .unwrap_or([150, 150, 150])
}

/// Index of a class name among CLIPER's 7 (synonyms accepted).
pub fn class_index(name: &str) -> Option<usize> {
    let c = canonical_class(name)?;
    CLASSES.iter().position(|k| *k == c)
}

/// Class of a global descriptor index (CLIPER's 7 x 5 layout).
pub fn descriptor_class(i: usize) -> usize {
    i / DESCRIPTORS_PER_CLASS
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LayoutError {
    #[error("unknown class `{0}` (known classes: {known})", known = known_classes().join(", "))]
    UnknownClass(String),
    #[error("class `{0}` appears twice")]
    Duplicate(String),
    #[error("class `{0}` has no descriptor")]
    Empty(String),
    #[error("a model needs at least 2 classes, found {0}")]
    TooFew(usize),
}

/// The shape of a descriptor bank: its classes (canonical names, in the
/// model's order) and how many descriptors each has. Descriptors are stored
/// class-major: those of class 0, then class 1, ...
///
/// CLIPER has 7 classes of 5, DFER-CLIP 7 or 11 classes of 1, an Exp-CLIP or
/// zero-shot ensemble any number of prompts per class. Everything that
/// shows or stores classes reads them from here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BankLayout {
    classes: Vec<String>,
    /// `starts[c]..starts[c + 1]` are the descriptors of class `c`.
    starts: Vec<usize>,
}

impl BankLayout {
    /// Classes by (any known) name with their descriptor counts.
    pub fn new<S: AsRef<str>>(classes: &[(S, usize)]) -> Result<Self, LayoutError> {
        if classes.len() < 2 {
            return Err(LayoutError::TooFew(classes.len()));
        }
        let mut names: Vec<String> = Vec::with_capacity(classes.len());
        let mut starts = vec![0];
        for (name, count) in classes {
            let c = canonical_class(name.as_ref())
                .ok_or_else(|| LayoutError::UnknownClass(name.as_ref().trim().to_string()))?;
            if names.iter().any(|n| n == c) {
                return Err(LayoutError::Duplicate(c.to_string()));
            }
            if *count == 0 {
                return Err(LayoutError::Empty(c.to_string()));
            }
            names.push(c.to_string());
            starts.push(starts.last().copied().unwrap_or(0) + count);
        }
        Ok(Self {
            classes: names,
            starts,
        })
    }

    /// CLIPER's: the 7 RAF-DB classes, 5 descriptors each.
    pub fn cliper() -> Self {
        Self {
            classes: CLASSES.iter().map(|c| c.to_string()).collect(),
            starts: (0..=NUM_CLASSES)
                .map(|c| c * DESCRIPTORS_PER_CLASS)
                .collect(),
        }
    }

    /// Canonical class names in the model's order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
    pub fn num_descriptors(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }
    /// Name of class `c` ("?" out of range).
    pub fn name(&self, c: usize) -> &str {
        self.classes.get(c).map(String::as_str).unwrap_or("?")
    }
    /// Index of a class by any of its names.
    pub fn index(&self, name: &str) -> Option<usize> {
        let c = canonical_class(name)?;
        self.classes.iter().position(|k| k == c)
    }
    /// The descriptors of class `c`.
    pub fn range(&self, c: usize) -> std::ops::Range<usize> {
        match (self.starts.get(c), self.starts.get(c + 1)) {
            (Some(&a), Some(&b)) => a..b,
            _ => 0..0,
        }
    }
    /// Descriptors of class `c`.
    pub fn count(&self, c: usize) -> usize {
        self.range(c).len()
    }
    /// The most descriptors any class has.
    pub fn max_count(&self) -> usize {
        (0..self.num_classes())
            .map(|c| self.count(c))
            .max()
            .unwrap_or(0)
    }
    /// Class of descriptor `i` and its index within the class.
    pub fn locate(&self, i: usize) -> (usize, usize) {
        let c = self.starts[1..].partition_point(|&s| s <= i);
        (c, i - self.starts.get(c).copied().unwrap_or(0))
    }
    /// Whether every class has `k` descriptors.
    pub fn uniform(&self) -> Option<usize> {
        let k = self.count(0);
        (0..self.num_classes())
            .all(|c| self.count(c) == k)
            .then_some(k)
    }
    /// Class scores: the mean logit of each class's descriptors.
    pub fn class_means(&self, logits: &[f32]) -> Vec<f32> {
        (0..self.num_classes())
            .map(|c| {
                let r = self.range(c);
                let n = r.len().max(1) as f32;
                logits
                    .get(r)
                    .map(|v| v.iter().sum::<f32>() / n)
                    .unwrap_or(f32::NAN)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_tokenizes_to_template_ids() {
        let tok = crate::model::tokenizer::ClipTokenizer::new();
        let ids = tok.encode(TEMPLATE, 77);
        assert_eq!(&ids[..11], &TEMPLATE_IDS);
        assert!(ids[11..].iter().all(|&i| i == 0));
    }

    #[test]
    fn synonyms() {
        assert_eq!(class_index("Happy"), Some(3));
        assert_eq!(class_index("neutral"), Some(6));
        assert_eq!(class_index("contempt"), None);
        assert_eq!(descriptor_class(34), 6);
    }

    #[test]
    fn names_from_other_models_map_to_canonical_ones() {
        for (given, want) in [
            ("happy", "happiness"),
            ("happiness.", "happiness"),
            ("An expression of Happiness.", "happiness"),
            (" Surprised ", "surprise"),
            ("contempt.", "contempt"),
            ("disappointment.", "disappointment"),
            ("helpless", "helplessness"),
        ] {
            assert_eq!(canonical_class(given), Some(want), "{given}");
        }
        assert_eq!(canonical_class("boredom"), None);
        assert_ne!(class_rgb("contempt"), class_rgb("anger"));
    }

    #[test]
    fn layouts_of_any_shape() {
        let c = BankLayout::cliper();
        assert_eq!((c.num_classes(), c.num_descriptors()), (7, 35));
        assert_eq!(c.locate(34), (6, 4));
        assert_eq!(c.locate(5), (1, 0));
        assert_eq!(c.uniform(), Some(5));
        let names = [
            "happiness.",
            "sadness.",
            "neutral.",
            "anger.",
            "surprise.",
            "disgust.",
            "fear.",
            "contempt.",
            "anxiety.",
            "helplessness.",
            "disappointment.",
        ];
        let mafw = BankLayout::new(&names.iter().map(|n| (*n, 1)).collect::<Vec<_>>()).unwrap();
        assert_eq!(mafw.num_descriptors(), 11);
        assert_eq!(mafw.name(10), "disappointment");
        assert_eq!(mafw.index("Happy"), Some(0));
        assert_eq!(mafw.locate(7), (7, 0));
        let uneven = BankLayout::new(&[("happy", 3), ("sad", 1)]).unwrap();
        assert_eq!(uneven.locate(3), (1, 0));
        assert_eq!(uneven.uniform(), None);
        assert_eq!(uneven.max_count(), 3);
        assert_eq!(uneven.class_means(&[1.0, 2.0, 3.0, 10.0]), vec![2.0, 10.0]);
        assert_eq!(
            BankLayout::new(&[("happy", 1), ("boredom", 1)]),
            Err(LayoutError::UnknownClass("boredom".into()))
        );
        assert!(BankLayout::new(&[("happy", 1), ("happiness", 1)]).is_err());
        assert!(BankLayout::new(&[("happy", 1)]).is_err());
    }
}
