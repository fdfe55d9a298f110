//! `cliper report`: a summary per face of a recorded session (frames seen,
//! share of time per dominant expression, mean probabilities) as text and
//! JSON, and a timeline picture per face (`timeline_<id>.png`), drawn with
//! the bitmap font of `vision::draw` (no font files needed).
//!
//! Each frame of a face counts for the time until the session's next
//! processed frame, at most [`MAX_FRAME_SECS`] (a face that left the picture
//! does not collect the time it was away); the last frame counts for the
//! typical gap. For a file processed frame by frame this is the same as
//! counting frames.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use serde_json::{json, Value};

use super::replay::Session;
use super::SessionError;
use crate::vision::draw::{draw_line, draw_text, fill_rect, text_width};

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

fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
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

    pub fn to_json(&self) -> Value {
        let per_class = |v: &[f64]| -> Value {
            self.classes
                .iter()
                .zip(v)
                .map(|(c, x)| (c.to_string(), json!((x * 1e6).round() / 1e6)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        json!({
            "session": self.dir,
            "status": self.status,
            "started": self.started,
            "sources": self.sources,
            "frames": self.frames,
            "duration": self.duration,
            "classes": self.classes,
            "faces": self.faces.iter().map(|f| json!({
                "id": f.id,
                "frames": f.frames,
                "seconds": (f.seconds * 1e6).round() / 1e6,
                "first_t": f.first_t,
                "last_t": f.last_t,
                "dominant": self.class(f.dominant()),
                "dominant_share": per_class(&f.dominant_share),
                "mean_probs": per_class(&f.mean_probs),
            })).collect::<Vec<_>>(),
        })
    }
}

const BG: Rgb<u8> = Rgb([24, 24, 30]);
const AXIS: Rgb<u8> = Rgb([200, 200, 210]);
const GRID: Rgb<u8> = Rgb([55, 55, 66]);
const TEXT: Rgb<u8> = Rgb([235, 235, 240]);

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

/// The timeline of face `id`: its class probabilities over the session,
/// with axes, a legend (class names and mean probabilities) and, under the
/// plot, a strip coloured by the dominant class.
pub fn timeline_png(s: &Session, id: u64) -> RgbImage {
    let (w, h) = (1100u32, 460u32);
    let (left, right, top, bottom) = (64i64, 200i64, 44i64, 78i64);
    let (pw, ph) = (w as i64 - left - right, h as i64 - top - bottom);
    let mut img = RgbImage::from_pixel(w, h, BG);
    let points = s.timeline(id);
    let classes = s.classes();
    let rgb: Vec<Rgb<u8>> = classes
        .iter()
        .map(|c| Rgb(crate::model::cliper::expressions::class_rgb(c)))
        .collect();
    let summary = summarize(s).faces.into_iter().find(|f| f.id == id);
    let t_end = s
        .duration()
        .max(points.last().map_or(0.0, |p| p.t))
        .max(1e-3);
    let x_of = |t: f64| left as f32 + (t / t_end) as f32 * pw as f32;
    let y_of = |p: f32| top as f32 + (1.0 - p.clamp(0.0, 1.0)) * ph as f32;

    let title = format!(
        "face #{id}: class probabilities over time ({} frames, {:.1} s)",
        points.len(),
        summary.as_ref().map_or(0.0, |f| f.seconds)
    );
    draw_text(&mut img, left, 14, &title, 2, TEXT);

    // Grid and y axis.
    for k in 0..=4 {
        let p = k as f32 / 4.0;
        let y = y_of(p) as i64;
        fill_rect(&mut img, left, y, pw, 1, GRID);
        let label = format!("{:.0}%", p * 100.0);
        let lw = i64::from(text_width(&label, 1));
        draw_text(&mut img, left - 8 - lw, y - 4, &label, 1, AXIS);
    }
    // X axis with ticks in seconds.
    let step = tick_step(t_end);
    let mut t = 0.0;
    while t <= t_end + 1e-9 {
        let x = x_of(t) as i64;
        fill_rect(&mut img, x, top, 1, ph, GRID);
        fill_rect(&mut img, x, top + ph, 1, 5, AXIS);
        let label = format_secs(t, step);
        let lw = i64::from(text_width(&label, 1));
        draw_text(&mut img, x - lw / 2, top + ph + 8, &label, 1, AXIS);
        t += step;
    }
    fill_rect(&mut img, left, top, 1, ph + 1, AXIS);
    fill_rect(&mut img, left, top + ph, pw + 1, 1, AXIS);
    let xlabel = "time (s)";
    draw_text(
        &mut img,
        left + pw / 2 - i64::from(text_width(xlabel, 1)) / 2,
        top + ph + 22,
        xlabel,
        1,
        AXIS,
    );

    // The curves; a gap longer than MAX_FRAME_SECS breaks them (the face was away).
    let gap = MAX_FRAME_SECS.max(3.0 * typical_gap(&points));
    let order: Vec<usize> = {
        // The dominant class last, so it is drawn on top.
        let d = summary.as_ref().map_or(0, |f| f.dominant());
        (0..classes.len()).filter(|&c| c != d).chain([d]).collect()
    };
    for c in order {
        for pair in points.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let (Some(&pa), Some(&pb)) = (a.probs.get(c), b.probs.get(c)) else {
                continue;
            };
            if b.t - a.t > gap || !(pa.is_finite() && pb.is_finite()) {
                continue;
            }
            draw_line(
                &mut img,
                (x_of(a.t), y_of(pa)),
                (x_of(b.t), y_of(pb)),
                2,
                rgb[c],
            );
        }
        if points.len() == 1 {
            let p = &points[0];
            fill_rect(
                &mut img,
                x_of(p.t) as i64 - 2,
                y_of(p.probs.get(c).copied().unwrap_or(0.0)) as i64 - 2,
                5,
                5,
                rgb[c],
            );
        }
    }
    // Dominant class strip.
    let strip_y = top + ph + 40;
    draw_text(&mut img, 4, strip_y + 2, "top", 1, AXIS);
    for (i, p) in points.iter().enumerate() {
        let next = points
            .get(i + 1)
            .map_or(p.t + typical_gap(&points), |n| n.t)
            .min(p.t + gap);
        let (x0, x1) = (x_of(p.t) as i64, x_of(next.min(t_end)) as i64);
        fill_rect(
            &mut img,
            x0,
            strip_y,
            (x1 - x0).max(1),
            12,
            rgb.get(p.predicted).copied().unwrap_or(AXIS),
        );
    }

    // Legend.
    let lx = left + pw + 24;
    draw_text(&mut img, lx, top, "class  mean", 1, AXIS);
    // Rows shrink to fit 11 classes in the plot's height.
    let row = ((ph - 20) / classes.len().max(1) as i64).min(22);
    for (c, name) in classes.iter().enumerate() {
        let y = top + 20 + c as i64 * row;
        fill_rect(&mut img, lx, y, 14, 10, rgb[c]);
        let mean = summary.as_ref().map_or(0.0, |f| f.mean_probs[c]);
        let name = &name[..name.len().min(10)];
        let label = format!("{name:<10}{:>4.0}%", mean * 100.0);
        draw_text(&mut img, lx + 22, y + 1, &label, 1, TEXT);
    }
    img
}

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
            meta: SessionMeta::new(String::new(), "source", Value::Null),
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
        let j = r.to_json();
        assert_eq!(j["faces"][1]["dominant"], "neutral");
        assert_eq!(j["faces"][0]["dominant_share"]["sadness"], 0.4);
    }

    #[test]
    fn timeline_draws_the_dominant_curve() {
        let s = session();
        let img = timeline_png(&s, 1);
        // Happiness at 70% for the first 0.5 s: its colour on that height.
        let (left, top, ph, pw) = (64.0f32, 44.0f32, 460.0 - 44.0 - 78.0, 1100.0 - 64.0 - 200.0);
        let x = left + 0.25 / 0.9 * pw;
        let y = top + 0.3 * ph;
        let near = (-3..=3).any(|d| {
            img.get_pixel(x as u32, (y as i32 + d) as u32).0
                == crate::model::cliper::expressions::class_rgb("happiness")
        });
        assert!(near, "no happiness curve at ({x}, {y})");
    }
}
