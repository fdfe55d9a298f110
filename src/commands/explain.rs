//! `cliper explain`: maps of where each face's descriptor (or class) looks,
//! drawn over the image, with the raw grid values for JSON.

use image::{Rgb, RgbImage};
use serde::Serialize;

use crate::model::cliper::expressions::BankLayout;
use crate::model::cliper::{scoring, DescriptorBank};
use crate::model::explain::{self, colormap, ExplainMap, Method, Target};
use crate::model::ClipModel;
use crate::pipeline::analyzer::FaceAnalyzer;
use crate::vision::draw::{draw_text, fill_rect, stroke_rect};
use crate::vision::faces::{crop_face, square_crop, FaceBox};

pub struct FaceExplanation {
    pub bbox: FaceBox,
    /// The square region the model saw, in image pixels: (x, y, side, side).
    pub region: (u32, u32, u32, u32),
    pub target: Target,
    pub map: ExplainMap,
}

/// A `--target` that names no class or descriptor of the bank.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("descriptor index {index} is out of range 0..{last}")]
    Index { index: usize, last: usize },
    #[error("unknown target `{given}`: give a class of this model ({classes}) or a descriptor index 0..{last}")]
    Unknown {
        given: String,
        classes: String,
        last: usize,
    },
}

/// Parses `--target` under a bank's layout: a class name, or a
/// descriptor index 0..D-1.
pub fn parse_target(s: &str, layout: &BankLayout) -> Result<Target, TargetError> {
    let last = layout.num_descriptors().saturating_sub(1);
    if let Ok(index) = s.trim().parse::<usize>() {
        if index <= last && layout.num_descriptors() > 0 {
            return Ok(Target::Descriptor(index));
        }
        return Err(TargetError::Index { index, last });
    }
    layout
        .index(s)
        .map(Target::Class)
        .ok_or_else(|| TargetError::Unknown {
            given: s.to_string(),
            classes: layout.classes().join(", "),
            last,
        })
}

/// A map's target as JSON: a class by name, or a descriptor by its index,
/// class and index within the class.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TargetJson<'a> {
    Class {
        name: &'a str,
    },
    Descriptor {
        index: usize,
        class: &'a str,
        class_index: usize,
    },
}

impl<'a> TargetJson<'a> {
    pub fn new(t: Target, layout: &'a BankLayout) -> Self {
        match t {
            Target::Class(c) => Self::Class {
                name: layout.name(c),
            },
            Target::Descriptor(i) => {
                let (c, k) = layout.locate(i);
                Self::Descriptor {
                    index: i,
                    class: layout.name(c),
                    class_index: k,
                }
            }
        }
    }
}

/// Computes a map for every face; with no target, each face's predicted class.
/// `progress(done, total)` hears of the occlusion map's forward passes, over
/// all faces.
#[allow(clippy::too_many_arguments)]
pub fn explain_image(
    clip: &ClipModel,
    bank: &DescriptorBank,
    analyzer: &mut FaceAnalyzer,
    img: &RgbImage,
    method: Method,
    target: Option<Target>,
    grid: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> candle_core::Result<Vec<FaceExplanation>> {
    let faces = analyzer.find_faces(img);
    let per_face = grid * grid + 1;
    // Straight squares, not eye-levelled crops: each map is laid over its
    // square of the image.
    let crops = if analyzer.config.detect {
        faces
            .iter()
            .map(|f| crop_face(img, f, analyzer.config.margin))
            .collect()
    } else {
        analyzer.crops(img, &faces)
    };
    let mut out = Vec::new();
    for (fi, (face, crop)) in faces.iter().zip(&crops).enumerate() {
        let region = if analyzer.config.detect {
            square_crop(img.width(), img.height(), face, analyzer.config.margin)
        } else if clip.preprocessing == crate::model::preprocess::Preprocessing::Squash {
            // Squashed whole: the model sees all of the frame.
            (0, 0, img.width(), img.height())
        } else {
            // The model sees the center crop of the whole frame.
            let side = img.width().min(img.height());
            (
                (img.width() - side) / 2,
                (img.height() - side) / 2,
                side,
                side,
            )
        };
        let px = clip
            .pixels(std::slice::from_ref(crop))?
            .to_dtype(clip.dtype)?;
        let target = match target {
            Some(t) => t,
            None => {
                let f = clip.encode_images(&px)?;
                Target::Class(scoring::score(&f, bank)?[0].predicted)
            }
        };
        if bank.head.is_some() {
            candle_core::bail!("explanation maps are not available for a bank scored through an Exp-CLIP head (the head maps whole-image features, not patches): drop --head")
        }
        let text = bank.text_features.to_dtype(clip.dtype)?;
        let (text, picked) = explain::resolve(&text, target, &bank.layout)?;
        let map = match method {
            Method::Fast => explain::fast_map(&clip.vision, &px, &text, picked)?,
            Method::GradCam => explain::gradcam_map(&clip.vision, &px, &text, picked)?,
            Method::Occlusion => {
                explain::occlusion_map_with(&clip.vision, &px, &text, picked, grid, |done, _| {
                    progress(fi * per_face + done, faces.len() * per_face);
                    true
                })?
                .ok_or_else(|| candle_core::Error::Msg("occlusion map cancelled".into()))?
            }
        };
        out.push(FaceExplanation {
            bbox: *face,
            region,
            target,
            map,
        });
    }
    Ok(out)
}

/// The image with each face's map blended over the region the model saw,
/// and a colour scale with the map's values.
pub fn render(img: &RgbImage, faces: &[FaceExplanation], opacity: f32, title: &str) -> RgbImage {
    let legend_h = 48u32;
    let mut out = RgbImage::from_pixel(
        img.width().max(320),
        img.height() + legend_h,
        Rgb([255, 255, 255]),
    );
    image::imageops::overlay(&mut out, img, 0, 0);
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for f in faces {
        for &v in &f.map.values {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    let span = if hi > lo { hi - lo } else { 1.0 };
    for f in faces {
        let (x0, y0, side, _) = f.region;
        let up = explain::upsample(&f.map, side, side);
        for yy in 0..side {
            for xx in 0..side {
                let (x, y) = (x0 + xx, y0 + yy);
                if x >= img.width() || y >= img.height() {
                    continue;
                }
                let c = colormap((up[(yy * side + xx) as usize] - lo) / span);
                let p = out.get_pixel_mut(x, y);
                for (dst, src) in p.0.iter_mut().zip(c) {
                    *dst = (*dst as f32 * (1.0 - opacity) + src as f32 * opacity).round() as u8;
                }
            }
        }
        stroke_rect(
            &mut out,
            x0 as i64,
            y0 as i64,
            side as i64,
            side as i64,
            2,
            Rgb([255, 255, 255]),
        );
    }
    // Legend: colour bar with its values.
    let y = img.height() as i64 + 6;
    let bar_w = (out.width() as i64 - 20).max(10);
    for i in 0..bar_w {
        let c = colormap(i as f32 / (bar_w - 1).max(1) as f32);
        fill_rect(&mut out, 10 + i, y, 1, 12, Rgb(c));
    }
    let ink = Rgb([20, 20, 30]);
    if faces.is_empty() {
        draw_text(&mut out, 10, y + 18, "no face found", 1, ink);
    } else {
        draw_text(&mut out, 10, y + 18, &format!("{lo:.3}"), 1, ink);
        let hi_s = format!("{hi:.3}");
        draw_text(
            &mut out,
            10 + bar_w - 8 * hi_s.len() as i64,
            y + 18,
            &hi_s,
            1,
            ink,
        );
        draw_text(&mut out, 10, y + 30, title, 1, ink);
    }
    out
}

/// One face's map in `cliper explain --json`.
#[derive(Clone, Debug, Serialize)]
pub struct ExplanationJson<'a> {
    #[serde(rename = "box")]
    pub bbox: [u32; 4],
    /// The crop the map covers, `[x, y, w, h]`.
    pub region: [u32; 4],
    pub target: TargetJson<'a>,
    pub logit: f32,
    /// `[rows, cols]`.
    pub grid: [usize; 2],
    pub map: Vec<Vec<f32>>,
}

impl<'a> ExplanationJson<'a> {
    pub fn new(f: &FaceExplanation, layout: &'a BankLayout) -> Self {
        let (x, y, w, h) = f.region;
        Self {
            bbox: [f.bbox.x, f.bbox.y, f.bbox.w, f.bbox.h],
            region: [x, y, w, h],
            target: TargetJson::new(f.target, layout),
            logit: f.map.logit,
            grid: [f.map.rows, f.map.cols],
            map: f.map.grid(),
        }
    }
}
