//! Evaluation metrics: accuracy (WAR), mean per-class recall (UAR), the
//! confusion matrix, and a PNG of it.

use std::path::Path;

use image::{Rgb, RgbImage};
use serde_json::{json, Value};

use crate::model::cliper::expressions::CLASSES;
use crate::vision::draw::{draw_text, fill_rect, stroke_rect, text_width};

#[derive(Clone, Debug, PartialEq)]
pub struct Metrics {
    /// The model's classes, in its order.
    pub classes: Vec<String>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
}

impl Default for Metrics {
    /// CLIPER's 7 classes.
    fn default() -> Self {
        Self::new(CLASSES.iter().map(|c| c.to_string()).collect())
    }
}

impl Metrics {
    /// Empty metrics over `classes`.
    pub fn new(classes: Vec<String>) -> Self {
        let n = classes.len();
        Self {
            classes,
            confusion: vec![vec![0; n]; n],
        }
    }

    pub fn add(&mut self, truth: usize, predicted: usize) {
        if let Some(cell) = self
            .confusion
            .get_mut(truth)
            .and_then(|r| r.get_mut(predicted))
        {
            *cell += 1;
        }
    }

    /// Metrics of (truth, predicted) pairs over CLIPER's 7 classes.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (usize, usize)>) -> Self {
        Self::from_pairs_over(Self::default().classes, pairs)
    }

    /// Metrics of (truth, predicted) pairs over `classes`.
    pub fn from_pairs_over(
        classes: Vec<String>,
        pairs: impl IntoIterator<Item = (usize, usize)>,
    ) -> Self {
        let mut m = Self::new(classes);
        for (t, p) in pairs {
            m.add(t, p);
        }
        m
    }

    pub fn n(&self) -> usize {
        self.confusion.iter().flatten().sum()
    }

    /// Overall accuracy (weighted average recall).
    pub fn war(&self) -> f64 {
        let correct: usize = (0..self.classes.len()).map(|c| self.confusion[c][c]).sum();
        correct as f64 / self.n().max(1) as f64
    }

    /// Recall of each class; `None` for classes absent from the set.
    pub fn per_class_recall(&self) -> Vec<Option<f64>> {
        let mut out = vec![None; self.classes.len()];
        for (c, row) in self.confusion.iter().enumerate() {
            let support: usize = row.iter().sum();
            if support > 0 {
                out[c] = Some(row[c] as f64 / support as f64);
            }
        }
        out
    }

    /// Mean recall over the classes present (unweighted average recall).
    pub fn uar(&self) -> f64 {
        let r: Vec<f64> = self.per_class_recall().iter().flatten().copied().collect();
        if r.is_empty() {
            0.0
        } else {
            r.iter().sum::<f64>() / r.len() as f64
        }
    }

    pub fn to_json(&self) -> Value {
        let recall: serde_json::Map<String, Value> = self
            .classes
            .iter()
            .zip(self.per_class_recall())
            .map(|(name, r)| (name.to_string(), json!(r)))
            .collect();
        json!({
            "war": self.war(),
            "uar": self.uar(),
            "classes": self.classes,
            "per_class_recall": recall,
            "confusion": self.confusion,
            "n": self.n(),
        })
    }

    /// A readable report: WAR, UAR, per-class recall, confusion matrix.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "n = {}   WAR (accuracy) = {:.2}%   UAR (mean class recall) = {:.2}%\n\nper-class recall:\n",
            self.n(),
            100.0 * self.war(),
            100.0 * self.uar()
        );
        for (name, r) in self.classes.iter().zip(self.per_class_recall()) {
            match r {
                Some(r) => s.push_str(&format!("  {name:<10} {:>6.2}%\n", 100.0 * r)),
                None => s.push_str(&format!("  {name:<10}      - (no samples)\n")),
            }
        }
        s.push_str("\nconfusion (rows: true, columns: predicted):\n           ");
        for name in &self.classes {
            s.push_str(&format!("{:>6}", &name[..name.len().min(5)]));
        }
        s.push('\n');
        for (c, row) in self.confusion.iter().enumerate() {
            s.push_str(&format!("  {:<9}", self.classes[c]));
            for v in row {
                s.push_str(&format!("{v:>6}"));
            }
            s.push('\n');
        }
        s
    }

    /// Draws the confusion matrix (row-normalised colours, counts in cells).
    pub fn render_png(&self, title: &str) -> RgbImage {
        let n = self.classes.len() as i64;
        let cell = 72i64;
        let left = 120i64;
        let top = 70i64;
        let w = left + cell * n + 20;
        let h = top + cell * n + 110;
        let mut img = RgbImage::from_pixel(w as u32, h as u32, Rgb([255, 255, 255]));
        let ink = Rgb([20, 20, 30]);
        draw_text(&mut img, 10, 10, title, 2, ink);
        draw_text(
            &mut img,
            10,
            38,
            &format!(
                "WAR {:.1}%  UAR {:.1}%  n={}",
                100.0 * self.war(),
                100.0 * self.uar(),
                self.n()
            ),
            1,
            ink,
        );
        for (r, row) in self.confusion.iter().enumerate() {
            let support: usize = row.iter().sum();
            for (c, &v) in row.iter().enumerate() {
                let frac = if support > 0 {
                    v as f64 / support as f64
                } else {
                    0.0
                };
                let shade = (255.0 - 200.0 * frac) as u8;
                let color = Rgb([shade, shade, 255]);
                let (x, y) = (left + c as i64 * cell, top + r as i64 * cell);
                fill_rect(&mut img, x, y, cell, cell, color);
                stroke_rect(&mut img, x, y, cell, cell, 1, Rgb([180, 180, 200]));
                let label = v.to_string();
                let tc = if frac > 0.6 {
                    Rgb([255, 255, 255])
                } else {
                    ink
                };
                let tw = text_width(&label, 2) as i64;
                draw_text(
                    &mut img,
                    x + (cell - tw) / 2,
                    y + cell / 2 - 8,
                    &label,
                    2,
                    tc,
                );
            }
            draw_text(
                &mut img,
                8,
                top + r as i64 * cell + cell / 2 - 4,
                &self.classes[r],
                1,
                ink,
            );
        }
        for (c, name) in self.classes.iter().enumerate() {
            let short = &name[..name.len().min(8)];
            let tw = text_width(short, 1) as i64;
            draw_text(
                &mut img,
                left + c as i64 * cell + (cell - tw) / 2,
                top + cell * n + 8,
                short,
                1,
                ink,
            );
        }
        draw_text(&mut img, left, top + cell * n + 30, "predicted ->", 1, ink);
        draw_text(&mut img, 8, top - 16, "true", 1, ink);
        img
    }

    pub fn save_png(&self, path: &Path, title: &str) -> Result<(), PngError> {
        self.render_png(title)
            .save(path)
            .map_err(|source| PngError {
                path: path.to_path_buf(),
                source,
            })
    }
}

/// The confusion-matrix PNG could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {source}", .path.display())]
pub struct PngError {
    pub path: std::path::PathBuf,
    pub source: image::ImageError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn war_uar_and_recall() {
        // 4 surprise (3 right), 1 fear (wrong), 5 happiness (all right).
        let mut pairs = vec![(0, 0), (0, 0), (0, 0), (0, 6), (1, 3)];
        pairs.extend(std::iter::repeat_n((3, 3), 5));
        let m = Metrics::from_pairs(pairs);
        assert_eq!(m.n(), 10);
        assert!((m.war() - 0.8).abs() < 1e-12);
        // (0.75 + 0 + 1) / 3
        assert!((m.uar() - 1.75 / 3.0).abs() < 1e-12);
        assert_eq!(m.per_class_recall()[2], None);
        let j = m.to_json();
        assert_eq!(j["n"], 10);
        assert_eq!(j["confusion"][0][6], 1);
        let img = m.render_png("test");
        assert!(img.width() > 500);
    }

    #[test]
    fn eleven_classes() {
        let names: Vec<String> = crate::model::dfer_clip::MAFW_CLASSES
            .iter()
            .map(|c| c.to_string())
            .collect();
        let m = Metrics::from_pairs_over(names, [(10, 10), (10, 7), (7, 7)]);
        assert_eq!(m.per_class_recall()[10], Some(0.5));
        assert!((m.uar() - 0.75).abs() < 1e-12);
        assert!(m.to_text().contains("disappointment"));
        assert_eq!(m.to_json()["per_class_recall"]["contempt"], 1.0);
        assert!(m.render_png("mafw").width() > 11 * 72);
    }
}
