//! The one definition of CLIPER's label space and prompt template
//! (`../shared/CLIPER.md` sections 2-3). Everything else imports these.

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

/// Index of a class name (case-insensitive; also accepts a few common
/// synonyms used by data sets: happy, sad, angry, surprised, ...).
pub fn class_index(name: &str) -> Option<usize> {
    let n = name.trim().to_ascii_lowercase();
    let canonical = match n.as_str() {
        "surprised" | "surprise" => "surprise",
        "fear" | "fearful" | "afraid" | "scared" => "fear",
        "disgust" | "disgusted" => "disgust",
        "happiness" | "happy" | "joy" => "happiness",
        "sadness" | "sad" => "sadness",
        "anger" | "angry" => "anger",
        "neutral" | "neutrality" => "neutral",
        other => other,
    };
    CLASSES.iter().position(|c| *c == canonical)
}

/// Class of a global descriptor index.
pub fn descriptor_class(i: usize) -> usize {
    i / DESCRIPTORS_PER_CLASS
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
}
