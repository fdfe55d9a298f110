//! Evaluation metrics: accuracy (WAR), mean per-class recall (UAR), the
//! confusion matrix, and a PNG of it.

use std::path::Path;

use image::RgbImage;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

use crate::charts::{self, ChartError};
use crate::model::cliper::expressions::CLASSES;

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

    /// `cliper eval --json`: WAR, UAR, per-class recall (null for a class
    /// with no samples), the confusion matrix (rows: truth) and the count.
    pub fn to_json(&self) -> Value {
        #[derive(serde::Serialize)]
        struct MetricsJson<'a> {
            war: f64,
            uar: f64,
            classes: &'a [String],
            per_class_recall: serde_json::Map<String, Value>,
            confusion: &'a [Vec<usize>],
            n: usize,
        }
        let json = MetricsJson {
            war: self.war(),
            uar: self.uar(),
            classes: &self.classes,
            per_class_recall: (self.classes.iter())
                .zip(self.per_class_recall())
                .map(|(name, r)| (name.clone(), r.map_or(Value::Null, Value::from)))
                .collect(),
            confusion: &self.confusion,
            n: self.n(),
        };
        serde_json::to_value(json).unwrap_or_default()
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

    /// The confusion matrix as a picture: rows the true classes, columns the
    /// predicted ones, each cell shaded by its share of the row.
    pub fn render_png(&self, title: &str) -> Result<RgbImage, ChartError> {
        let n = self.classes.len() as i32;
        let (cell, left, top) = (72i32, 130i32, 80i32);
        let (w, h) = (left + cell * n + 20, top + cell * n + 90);
        let ink = RGBColor(20, 20, 30);
        let font = |size: u32, colour: RGBColor| (charts::FONT, size).into_font().color(&colour);
        charts::render(w as u32, h as u32, |root| {
            root.fill(&WHITE)?;
            root.draw(&Text::new(title, (10, 8), font(22, ink)))?;
            let summary = format!(
                "WAR {:.1}%  UAR {:.1}%  n={}",
                100.0 * self.war(),
                100.0 * self.uar(),
                self.n()
            );
            root.draw(&Text::new(summary, (10, 38), font(15, ink)))?;
            root.draw(&Text::new("true", (8, top - 20), font(14, ink)))?;
            let centred = |size| font(size, ink).pos(Pos::new(HPos::Center, VPos::Center));
            for (r, row) in self.confusion.iter().enumerate() {
                let support: usize = row.iter().sum();
                let y = top + r as i32 * cell;
                for (c, &v) in row.iter().enumerate() {
                    let frac = if support > 0 {
                        v as f64 / support as f64
                    } else {
                        0.0
                    };
                    let shade = (255.0 - 200.0 * frac) as u8;
                    let x = left + c as i32 * cell;
                    let corners = [(x, y), (x + cell, y + cell)];
                    root.draw(&Rectangle::new(
                        corners,
                        RGBColor(shade, shade, 255).filled(),
                    ))?;
                    root.draw(&Rectangle::new(corners, RGBColor(180, 180, 200)))?;
                    let style = match frac > 0.6 {
                        true => centred(20).color(&WHITE),
                        false => centred(20),
                    };
                    let middle = (x + cell / 2, y + cell / 2);
                    root.draw(&Text::new(v.to_string(), middle, style))?;
                }
                let name = self.classes[r].as_str();
                root.draw(&Text::new(name, (8, y + cell / 2 - 8), font(14, ink)))?;
            }
            for (c, name) in self.classes.iter().enumerate() {
                let short: String = name.chars().take(9).collect();
                let at = (left + c as i32 * cell + cell / 2, top + cell * n + 14);
                root.draw(&Text::new(short, at, centred(13)))?;
            }
            let arrow = (left, top + cell * n + 36);
            root.draw(&Text::new("predicted ->", arrow, font(14, ink)))?;
            Ok(())
        })
    }

    pub fn save_png(&self, path: &Path, title: &str) -> Result<(), PngError> {
        let err = |reason: String| PngError {
            path: path.to_path_buf(),
            reason,
        };
        self.render_png(title)
            .map_err(|e| err(e.to_string()))?
            .save(path)
            .map_err(|e| err(e.to_string()))
    }
}

/// The confusion-matrix PNG could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {reason}", .path.display())]
pub struct PngError {
    pub path: std::path::PathBuf,
    pub reason: String,
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
        let img = m.render_png("test").unwrap();
        assert!(img.width() > 500);
        // Surprise's row: 3 of 4 right, so its first cell is shaded 75%, and
        // the empty disgust row stays white.
        let cell = |r: u32, c: u32| img.get_pixel(130 + c * 72 + 4, 80 + r * 72 + 4).0;
        assert_eq!(cell(0, 0), [105, 105, 255]);
        assert_eq!(cell(2, 2), [255, 255, 255]);
        if let Some(dir) = std::env::var_os("CLIPER_SAVE_CHARTS") {
            img.save(std::path::Path::new(&dir).join("confusion.png"))
                .unwrap();
        }
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
        assert!(m.render_png("mafw").unwrap().width() > 11 * 72);
    }
}
