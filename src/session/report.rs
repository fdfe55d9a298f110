//! `cliper report`: a summary per face of a recorded session (frames seen,
//! share of time per dominant expression, mean probabilities) as text and
//! JSON, and a timeline picture per face (`timeline_<id>.png`), drawn with
//! plotters (`crate::charts`).
//!
//! Each frame of a face counts for the time until the session's next
//! processed frame, at most [`MAX_FRAME_SECS`] (a face that left the picture
//! does not collect the time it was away); the last frame counts for the
//! typical gap. For a file processed frame by frame this is the same as
//! counting frames.

use std::path::{Path, PathBuf};

use image::RgbImage;
use plotters::prelude::*;
use serde::Serialize;

use super::replay::Session;
use super::SessionError;
use crate::charts::{self, ChartError};
use crate::model::argmax;
use crate::model::cliper::expressions::class_rgb;

/// The most one frame counts for, seconds.
pub const MAX_FRAME_SECS: f64 = 1.0;

/// One face's summary.
#[derive(Clone, Debug, PartialEq)]
pub struct FaceSummary {
    pub id: u64,
    pub frames: u64,
    pub first_t: f64,
    pub last_t: f64,
    /// Time the face was seen (sum of its frames' weights), seconds.
    pub seconds: f64,
    /// Share of that time per dominant (predicted) class, summing to 1.
    pub dominant_share: Vec<f64>,
    /// Time-weighted mean probability per class.
    pub mean_probs: Vec<f64>,
}

impl FaceSummary {
    /// The class dominant for the longest time.
    pub fn dominant(&self) -> usize {
        argmax(&self.dominant_share)
    }
}

/// A session's summary.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub dir: PathBuf,
    pub status: String,
    pub started: String,
    pub sources: Vec<String>,
    pub frames: u64,
    pub duration: f64,
    /// The session's classes, the order of every per-class vector.
    pub classes: Vec<String>,
    pub faces: Vec<FaceSummary>,
}

/// How long each frame of the session counts (see the module doc).
fn frame_weights(s: &Session) -> Vec<f64> {
    let t: Vec<f64> = s.frames.iter().map(|f| f.t).collect();
    let mut gaps: Vec<f64> = t.windows(2).map(|w| (w[1] - w[0]).max(0.0)).collect();
    let typical = if gaps.is_empty() {
        s.meta
            .sources
            .first()
            .map(|x| x.fps)
            .filter(|f| *f > 0.0)
            .map_or(MAX_FRAME_SECS, |f| 1.0 / f)
    } else {
        let mut g = gaps.clone();
        g.sort_by(f64::total_cmp);
        g[g.len() / 2]
    };
    gaps.push(typical);
    gaps.into_iter().map(|g| g.min(MAX_FRAME_SECS)).collect()
}

pub fn summarize(s: &Session) -> Report {
    let weights = frame_weights(s);
    let classes = s.classes();
    let n = classes.len();
    let faces = s
        .face_ids()
        .into_iter()
        .map(|id| {
            let mut f = FaceSummary {
                id,
                frames: 0,
                first_t: f64::INFINITY,
                last_t: f64::NEG_INFINITY,
                seconds: 0.0,
                dominant_share: vec![0.0; n],
                mean_probs: vec![0.0; n],
            };
            for (frame, &w) in s.frames.iter().zip(&weights) {
                let Some(face) = frame.faces.iter().find(|x| x.id == id) else {
                    continue;
                };
                f.frames += 1;
                f.first_t = f.first_t.min(frame.t);
                f.last_t = f.last_t.max(frame.t);
                f.seconds += w;
                if let Some(d) = f.dominant_share.get_mut(face.predicted_index(&classes)) {
                    *d += w;
                }
                for (m, p) in f.mean_probs.iter_mut().zip(face.probs(&classes)) {
                    // A class a later bank lacked counts as 0 there.
                    if p.is_finite() {
                        *m += w * f64::from(p);
                    }
                }
            }
            if f.seconds > 0.0 {
                f.dominant_share.iter_mut().for_each(|x| *x /= f.seconds);
                f.mean_probs.iter_mut().for_each(|x| *x /= f.seconds);
            }
            f
        })
        .collect();
    Report {
        dir: s.dir.clone(),
        status: s.meta.status.as_str().to_string(),
        started: s.meta.started.clone(),
        sources: s.meta.sources.iter().map(|x| x.source.clone()).collect(),
        frames: s.frames.len() as u64,
        duration: s.duration(),
        classes,
        faces,
    }
}

impl Report {
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "session {} ({}, started {})",
            self.dir.display(),
            self.status,
            if self.started.is_empty() {
                "?"
            } else {
                &self.started
            }
        );
        if !self.sources.is_empty() {
            let _ = writeln!(out, "source: {}", self.sources.join(", then "));
        }
        let _ = writeln!(
            out,
            "{} frames over {:.1} s, {} face(s)",
            self.frames,
            self.duration,
            self.faces.len()
        );
        for f in &self.faces {
            let d = f.dominant();
            let _ = writeln!(
                out,
                "\nface #{}: {} frames, seen {:.1} s (t = {:.1}..{:.1} s), mostly {} ({:.0}% of the time)",
                f.id,
                f.frames,
                f.seconds,
                f.first_t,
                f.last_t,
                self.class(d),
                f.dominant_share[d] * 100.0
            );
            let _ = writeln!(
                out,
                "  {:<10} {:>9} {:>10}",
                "class", "dominant", "mean prob"
            );
            for (c, name) in self.classes.iter().enumerate() {
                let bar = "#".repeat((f.dominant_share[c] * 30.0).round() as usize);
                let _ = writeln!(
                    out,
                    "  {name:<10} {:>8.1}% {:>9.1}%  {bar}",
                    f.dominant_share[c] * 100.0,
                    f.mean_probs[c] * 100.0
                );
            }
        }
        out
    }

    /// Name of class `c`.
    pub fn class(&self, c: usize) -> &str {
        self.classes.get(c).map(String::as_str).unwrap_or("?")
    }

    /// The summary as `cliper report --json` prints it (the caller adds
    /// the timelines it wrote).
    pub fn to_json(&self) -> ReportJson<'_> {
        let per_class = |values| PerClass {
            classes: &self.classes,
            values,
        };
        ReportJson {
            session: &self.dir,
            status: &self.status,
            started: &self.started,
            sources: &self.sources,
            frames: self.frames,
            duration: self.duration,
            classes: &self.classes,
            faces: (self.faces.iter())
                .map(|f| FaceJson {
                    id: f.id,
                    frames: f.frames,
                    seconds: round6(f.seconds),
                    first_t: f.first_t,
                    last_t: f.last_t,
                    dominant: self.class(f.dominant()),
                    dominant_share: per_class(&f.dominant_share),
                    mean_probs: per_class(&f.mean_probs),
                })
                .collect(),
            timelines: None,
        }
    }
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// `cliper report --json`.
#[derive(Clone, Debug, Serialize)]
pub struct ReportJson<'a> {
    pub session: &'a Path,
    pub status: &'a str,
    pub started: &'a str,
    pub sources: &'a [String],
    pub frames: u64,
    pub duration: f64,
    pub classes: &'a [String],
    pub faces: Vec<FaceJson<'a>>,
    /// The timeline pictures written, one per face.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timelines: Option<Vec<PathBuf>>,
}

/// One face of [`ReportJson`].
#[derive(Clone, Debug, Serialize)]
pub struct FaceJson<'a> {
    pub id: u64,
    pub frames: u64,
    pub seconds: f64,
    pub first_t: f64,
    pub last_t: f64,
    pub dominant: &'a str,
    pub dominant_share: PerClass<'a>,
    pub mean_probs: PerClass<'a>,
}

/// Per-class values as `{"class": value}` in class order, to 1e-6.
#[derive(Clone, Debug)]
pub struct PerClass<'a> {
    classes: &'a [String],
    values: &'a [f64],
}

impl Serialize for PerClass<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(
            (self.classes.iter())
                .zip(self.values)
                .map(|(c, &x)| (c, round6(x))),
        )
    }
}

const BG: RGBColor = RGBColor(24, 24, 30);
const AXIS: RGBColor = RGBColor(200, 200, 210);
const GRID: RGBColor = RGBColor(55, 55, 66);
const TEXT: RGBColor = RGBColor(235, 235, 240);

/// A tick step that gives at most about 10 ticks over `span`.
fn tick_step(span: f64) -> f64 {
    const STEPS: [f64; 16] = [
        0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0,
        3600.0,
    ];
    STEPS
        .iter()
        .copied()
        .find(|s| span / s <= 10.0)
        .unwrap_or(7200.0)
}

fn format_secs(t: f64, step: f64) -> String {
    if step >= 60.0 {
        format!(
            "{}:{:02}",
            (t / 60.0).floor() as u64,
            (t % 60.0).round() as u64
        )
    } else if step < 1.0 {
        format!("{t:.1}")
    } else {
        format!("{t:.0}")
    }
}

/// The timeline picture of face `id`: each class's probability over time
/// (the dominant class drawn last, on top), the top class as a strip
/// underneath, and a legend with each class's mean.
pub fn timeline_png(s: &Session, id: u64) -> Result<RgbImage, ChartError> {
    let (w, h) = (1100u32, 460u32);
    let points = s.timeline(id);
    let classes = s.classes();
    let colours: Vec<RGBColor> = (classes.iter())
        .map(|c| charts::rgb(class_rgb(c)))
        .collect();
    let summary = summarize(s).faces.into_iter().find(|f| f.id == id);
    let t_end = s
        .duration()
        .max(points.last().map_or(0.0, |p| p.t))
        .max(1e-3);
    let step = tick_step(t_end);
    let gap = MAX_FRAME_SECS.max(3.0 * typical_gap(&points));
    let font = |size: u32, colour: RGBColor| (charts::FONT, size).into_font().color(&colour);
    charts::render(w, h, |root| {
        root.fill(&BG)?;
        let (main, legend) = root.split_horizontally(w - LEGEND_W);
        let (plot, strip) = main.split_vertically(h - STRIP_H);
        let title = format!(
            "face #{id}: class probabilities over time ({} frames, {:.1} s)",
            points.len(),
            summary.as_ref().map_or(0.0, |f| f.seconds)
        );
        let mut chart = ChartBuilder::on(&plot)
            .caption(title, font(20, TEXT))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..t_end, 0f64..1f64)?;
        chart
            .configure_mesh()
            .x_labels((t_end / step).floor() as usize + 1)
            .y_labels(5)
            .x_label_formatter(&|t| format_secs(*t, step))
            .y_label_formatter(&|p| format!("{:.0}%", p * 100.0))
            .x_desc("time (s)")
            .label_style(font(14, AXIS))
            .axis_desc_style(font(14, AXIS))
            .axis_style(AXIS)
            .bold_line_style(GRID)
            .light_line_style(BG)
            .draw()?;
        // The dominant class last, so it is drawn on top.
        let dominant = summary.as_ref().map_or(0, |f| f.dominant());
        let order = (0..classes.len())
            .filter(|&c| c != dominant)
            .chain([dominant]);
        for c in order {
            // A gap longer than `gap` breaks the curve (the face was away).
            let mut run: Vec<(f64, f64)> = Vec::new();
            let mut runs = Vec::new();
            for p in &points {
                let v = p.probs.get(c).copied().unwrap_or(f32::NAN);
                let broken = run.last().is_some_and(|&(t, _)| p.t - t > gap);
                if !v.is_finite() || broken {
                    runs.push(std::mem::take(&mut run));
                }
                if v.is_finite() {
                    run.push((p.t, f64::from(v).clamp(0.0, 1.0)));
                }
            }
            runs.push(run);
            for run in runs.into_iter().filter(|r| !r.is_empty()) {
                if run.len() == 1 {
                    chart.draw_series([Circle::new(run[0], 3, colours[c].filled())])?;
                } else {
                    chart.draw_series(LineSeries::new(run, colours[c].stroke_width(2)))?;
                }
            }
        }
        // The top class as a strip, on the plot's time axis.
        let (y0, y1) = (8, 22);
        let x_of = |t: f64| chart.backend_coord(&(t.min(t_end), 0.0)).0;
        strip.draw(&Text::new("top", (8, y0), font(14, AXIS)))?;
        let strip_of = |x: i32| x - main.get_base_pixel().0;
        for (i, p) in points.iter().enumerate() {
            let next = (points.get(i + 1))
                .map_or(p.t + typical_gap(&points), |n| n.t)
                .min(p.t + gap);
            let (x0, x1) = (strip_of(x_of(p.t)), strip_of(x_of(next)));
            let colour = colours.get(p.predicted).copied().unwrap_or(AXIS);
            strip.draw(&Rectangle::new(
                [(x0, y0), (x1.max(x0 + 1), y1)],
                colour.filled(),
            ))?;
        }
        // Legend: each class's colour and mean probability.
        legend.draw(&Text::new("class", (16, 44), font(15, AXIS)))?;
        legend.draw(&Text::new("mean", (136, 44), font(15, AXIS)))?;
        // Rows shrink to fit 11 classes in the plot's height.
        let row = ((h as i32 - 120) / classes.len().max(1) as i32).min(26);
        for (c, name) in classes.iter().enumerate() {
            let y = 70 + c as i32 * row;
            legend.draw(&Rectangle::new(
                [(16, y), (30, y + 12)],
                colours[c].filled(),
            ))?;
            let mean = summary.as_ref().map_or(0.0, |f| f.mean_probs[c]);
            let name: String = name.chars().take(10).collect();
            legend.draw(&Text::new(name, (38, y - 2), font(15, TEXT)))?;
            let pct = format!("{:>3.0}%", mean * 100.0);
            legend.draw(&Text::new(pct, (136, y - 2), font(15, TEXT)))?;
        }
        Ok(())
    })
}

/// The legend's width and the top-class strip's height, in pixels.
const LEGEND_W: u32 = 180;
const STRIP_H: u32 = 36;

fn typical_gap(points: &[super::replay::TimelinePoint]) -> f64 {
    let mut g: Vec<f64> = points.windows(2).map(|w| w[1].t - w[0].t).collect();
    if g.is_empty() {
        return 0.04;
    }
    g.sort_by(f64::total_cmp);
    g[g.len() / 2]
}

/// Writes `timeline_<id>.png` for every face into `out`; returns the files.
pub fn write_timelines(s: &Session, out: &Path) -> Result<Vec<PathBuf>, SessionError> {
    std::fs::create_dir_all(out).map_err(|e| SessionError::write(out, e))?;
    s.face_ids()
        .into_iter()
        .map(|id| {
            let path = out.join(format!("timeline_{id}.png"));
            timeline_png(s, id)
                .map_err(|e| SessionError::write(&path, e))?
                .save(&path)
                .map_err(|e| SessionError::write(&path, e))?;
            Ok(path)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cliper::expressions::CLASSES;
    use crate::session::meta::SessionMeta;
    use crate::session::record::{class_scores, FaceRecord, FrameRecord};

    fn face(id: u64, class: usize) -> FaceRecord {
        let mut probs = [0.05f32; 7];
        probs[class] = 0.7;
        FaceRecord {
            detection: None,
            landmarks: None,
            id,
            bbox: [0, 0, 10, 10],
            predicted: CLASSES[class].into(),
            classes: class_scores(&CLASSES, &[0.0; 7], &probs),
            dynamic: None,
            smoothed: None,
            descriptors: Vec::new(),
            probe: None,
        }
    }

    /// 10 frames at 0.1 s: face 1 happy for 6, sad for 4; face 2 only in the
    /// last 2 frames, neutral.
    fn session() -> Session {
        let frames = (0..10)
            .map(|i| {
                let mut faces = vec![face(1, if i < 6 { 3 } else { 4 })];
                if i >= 8 {
                    faces.push(face(2, 6));
                }
                FrameRecord {
                    frame: i,
                    seq: i,
                    t: i as f64 * 0.1,
                    wall: String::new(),
                    source_t: 0.0,
                    faces,
                }
            })
            .collect();
        Session {
            dir: PathBuf::from("s"),
            meta: SessionMeta::new(String::new(), "source", serde_json::Value::Null),
            frames,
            bad_lines: 0,
        }
    }

    #[test]
    fn shares_and_means() {
        let r = summarize(&session());
        assert_eq!(r.faces.len(), 2);
        let f = &r.faces[0];
        assert_eq!(f.frames, 10);
        assert!((f.seconds - 1.0).abs() < 1e-9, "{}", f.seconds);
        assert!((f.dominant_share[3] - 0.6).abs() < 1e-9);
        assert!((f.dominant_share[4] - 0.4).abs() < 1e-9);
        assert_eq!(f.dominant(), 3);
        assert!((f.mean_probs[3] - (0.6 * 0.7 + 0.4 * 0.05)).abs() < 1e-6);
        let g = &r.faces[1];
        assert_eq!((g.frames, g.dominant()), (2, 6));
        let text = r.to_text();
        assert!(text.contains("face #1: 10 frames") && text.contains("mostly happiness (60%"));
        let j = serde_json::to_value(r.to_json()).unwrap();
        assert_eq!(j["faces"][1]["dominant"], "neutral");
        assert_eq!(j["faces"][0]["dominant_share"]["sadness"], 0.4);
    }

    #[test]
    fn timeline_draws_the_dominant_curve() {
        let s = session();
        let img = timeline_png(&s, 1).unwrap();
        if let Some(dir) = std::env::var_os("CLIPER_SAVE_CHARTS") {
            img.save(std::path::Path::new(&dir).join("timeline.png"))
                .unwrap();
        }
        let happy = class_rgb("happiness");
        let (plot_w, plot_h) = (1100 - LEGEND_W, 460 - STRIP_H);
        // Happiness is at 70% for the first 0.6 s, then at 5%: its curve is
        // high on the left of the plot and low on the right.
        let curve_y = |xs: std::ops::Range<u32>| {
            let mut ys: Vec<u32> = xs
                .flat_map(|x| (40..plot_h - 50).map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0 == happy)
                .map(|(_, y)| y)
                .collect();
            ys.sort();
            ys.get(ys.len() / 2).copied()
        };
        let left = curve_y(100..300).expect("no happiness curve on the left");
        let right = curve_y(plot_w - 150..plot_w - 30).expect("no happiness curve on the right");
        assert!(right > left + 150, "happiness at y {left} then {right}");
        // The strip below shows happiness first and sadness last.
        let strip_y = plot_h + 15;
        assert_eq!(img.get_pixel(150, strip_y).0, happy);
        assert_eq!(img.get_pixel(plot_w - 60, strip_y).0, class_rgb("sadness"));
    }
}
