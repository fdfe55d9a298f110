//! The benchmark's report: the text table and the JSON (whose schema is
//! the structs below; `tools/bench_reference.py` reads it).

use serde::Serialize;

use super::*;

#[derive(Serialize)]
struct BenchJson<'a> {
    device: &'a str,
    precision: &'a str,
    /// The image encoder's path (`q8 avx512-vnni`, `f32 avx512`, `candle`).
    kernel: &'a str,
    /// The CPU's model name and the features the kernels use.
    cpu: &'a str,
    threads: usize,
    weights: &'a str,
    runs: usize,
    /// Batch size -> per-image encode time.
    image_encode_ms_per_image: Keyed<Stat>,
    preprocess_ms_per_image: Stat,
    scoring_ms: ScoringJson,
    face_detection: Vec<DetectionJson>,
    temporal_ms: Stat,
    explain_fast_map_ms: Stat,
    explain_gradcam_ms: Stat,
    /// `WxH` -> time per frame.
    video_decode_ms_per_frame: Keyed<Stat>,
    video_encode_ms_per_frame: Keyed<Stat>,
    /// Batch size -> faces per second.
    faces_per_second: Keyed<f64>,
    peak_memory_mb: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agreement_vs_f32: Option<AgreementJson>,
}

#[derive(Serialize)]
struct ScoringJson {
    batch: usize,
    #[serde(flatten)]
    stat: Stat,
}

#[derive(Serialize)]
struct DetectionJson {
    #[serde(flatten)]
    ms: Stat,
    detector: &'static str,
    settings: &'static str,
    size: String,
    faces: usize,
}

#[derive(Serialize)]
struct AgreementJson {
    images: usize,
    top1_agreement: f64,
    max_prob_diff: f64,
    min_cosine: f64,
}

/// `(key, value)` pairs as a JSON object, in their order.
struct Keyed<V>(Vec<(String, V)>);

impl<V: Serialize> Serialize for Keyed<V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// A stage's figures to the microsecond.
impl Serialize for Stat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Stat", 3)?;
        st.serialize_field("median", &round3(self.median))?;
        st.serialize_field("min", &round3(self.min))?;
        st.serialize_field("max", &round3(self.max))?;
        st.end()
    }
}

impl BenchReport {
    /// The report as `cliper bench --json` prints it.
    pub fn to_json(&self) -> String {
        let per_image = |v: &[(usize, Stat)]| -> Vec<(String, Stat)> {
            v.iter().map(|(b, s)| (b.to_string(), *s)).collect()
        };
        let sized = |v: &[((u32, u32), Stat)]| -> Vec<(String, Stat)> {
            v.iter()
                .map(|((w, h), s)| (format!("{w}x{h}"), *s))
                .collect()
        };
        let json = BenchJson {
            device: &self.device,
            precision: self.precision.as_str(),
            kernel: &self.kernel,
            cpu: &self.cpu,
            threads: self.threads,
            weights: &self.weights,
            runs: self.runs,
            image_encode_ms_per_image: Keyed(per_image(&self.image_encode_ms_per_image)),
            preprocess_ms_per_image: self.preprocess_ms_per_image,
            scoring_ms: ScoringJson {
                batch: self.scoring_ms.0,
                stat: self.scoring_ms.1,
            },
            face_detection: (self.face_detection.iter())
                .map(|d| DetectionJson {
                    ms: d.ms,
                    detector: d.detector,
                    settings: d.settings,
                    size: format!("{}x{}", d.size.0, d.size.1),
                    faces: d.faces,
                })
                .collect(),
            temporal_ms: self.temporal_ms,
            explain_fast_map_ms: self.explain_fast_map_ms,
            explain_gradcam_ms: self.explain_gradcam_ms,
            video_decode_ms_per_frame: Keyed(sized(&self.video_decode_ms)),
            video_encode_ms_per_frame: Keyed(sized(&self.video_encode_ms)),
            faces_per_second: Keyed(
                (self.faces_per_second.iter())
                    .map(|(b, f)| (b.to_string(), (f * 10.0).round() / 10.0))
                    .collect(),
            ),
            peak_memory_mb: self.peak_memory_mb.map(f64::round),
            agreement_vs_f32: self.agreement.as_ref().map(|a| AgreementJson {
                images: a.images,
                top1_agreement: a.top1,
                max_prob_diff: (a.max_prob_diff * 1e6).round() / 1e6,
                min_cosine: a.min_cosine,
            }),
        };
        // Serialising plain structs of numbers and strings cannot fail.
        serde_json::to_string(&json).unwrap_or_default()
    }

    pub fn to_text(&self) -> String {
        let mut s = format!(
            "cliper bench: {} {} ({}), {} thread(s), weights {}, median/min/max of {} runs (ms)\n  cpu: {}\n",
            self.device,
            self.precision.as_str(),
            self.kernel,
            self.threads,
            self.weights,
            self.runs,
            self.cpu
        );
        let row = |name: &str, st: &Stat| {
            format!(
                "  {name:<44} {:>9.2} {:>9.2} {:>9.2}\n",
                st.median, st.min, st.max
            )
        };
        s += &format!(
            "  {:<44} {:>9} {:>9} {:>9}\n",
            "stage", "median", "min", "max"
        );
        s += &row("preprocess (per image)", &self.preprocess_ms_per_image);
        for (b, st) in &self.image_encode_ms_per_image {
            s += &row(&format!("image encode, batch {b} (per image)"), st);
        }
        s += &row(
            &format!("scoring (batch {})", self.scoring_ms.0),
            &self.scoring_ms.1,
        );
        for d in &self.face_detection {
            let (w, h) = d.size;
            let label = format!(
                "faces: {} {} {w}x{h} ({} found)",
                d.detector, d.settings, d.faces
            );
            s += &row(&label, &d.ms);
        }
        s += &row("temporal pass (16 frames)", &self.temporal_ms);
        s += &row("fast explanation map (1 face)", &self.explain_fast_map_ms);
        s += &row("Grad-CAM map (1 face)", &self.explain_gradcam_ms);
        for ((w, h), st) in &self.video_decode_ms {
            s += &row(&format!("video decode {w}x{h} /frame"), st);
        }
        for ((w, h), st) in &self.video_encode_ms {
            s += &row(&format!("video record {w}x{h} /frame"), st);
        }
        if let Some((_, enc)) = self.image_encode_ms_per_image.first() {
            s += &format!(
                "  temporal pass = {:.1}% and fast map = {:.1}% of one image encode; Grad-CAM = {:.1} encodes, occlusion 7x7 = 50 encodes\n",
                100.0 * self.temporal_ms.median / enc.median,
                100.0 * self.explain_fast_map_ms.median / enc.median,
                self.explain_gradcam_ms.median / enc.median
            );
        }
        for (b, f) in &self.faces_per_second {
            s += &format!("  faces per second, {b} face(s) per 640x480 frame: {f:.1}\n");
        }
        if let Some(m) = self.peak_memory_mb {
            s += &format!("  peak memory (VmHWM): {m:.0} MB\n");
        }
        if let Some(a) = &self.agreement {
            s += &format!(
                "  agreement with f32 on {} images: top-1 {:.1}%, max probability difference {:.4}, min embedding cosine {:.5}\n",
                a.images,
                100.0 * a.top1,
                a.max_prob_diff,
                a.min_cosine
            );
        }
        s
    }
}
