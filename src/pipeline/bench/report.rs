//! The benchmark's report: the text table and the JSON.

use super::*;

impl BenchReport {
    pub fn to_json(&self) -> Value {
        let per_batch = |v: &[(usize, Stat)]| {
            Value::Object(
                v.iter()
                    .map(|(b, s)| (b.to_string(), s.to_json()))
                    .collect::<Map<_, _>>(),
            )
        };
        let mut out = json!({
            "device": self.device,
            "precision": self.precision.as_str(),
            "threads": self.threads,
            "weights": self.weights,
            "runs": self.runs,
            "image_encode_ms_per_image": per_batch(&self.image_encode_ms_per_image),
            "preprocess_ms_per_image": self.preprocess_ms_per_image.to_json(),
            "scoring_ms": {
                "batch": self.scoring_ms.0,
                "median": round3(self.scoring_ms.1.median),
                "min": round3(self.scoring_ms.1.min),
                "max": round3(self.scoring_ms.1.max),
            },
            "face_detection": self
                .face_detection
                .iter()
                .map(|d| {
                    let mut v = d.ms.to_json();
                    v["detector"] = json!(d.detector);
                    v["settings"] = json!(d.settings);
                    v["size"] = json!(format!("{}x{}", d.size.0, d.size.1));
                    v["faces"] = json!(d.faces);
                    v
                })
                .collect::<Vec<_>>(),
            "temporal_ms": self.temporal_ms.to_json(),
            "explain_fast_map_ms": self.explain_fast_map_ms.to_json(),
            "explain_gradcam_ms": self.explain_gradcam_ms.to_json(),
            "video_decode_ms_per_frame": sized(&self.video_decode_ms),
            "video_encode_ms_per_frame": sized(&self.video_encode_ms),
            "faces_per_second": Value::Object(
                self.faces_per_second
                    .iter()
                    .map(|(b, f)| (b.to_string(), json!((f * 10.0).round() / 10.0)))
                    .collect(),
            ),
            "peak_memory_mb": self.peak_memory_mb.map(|m| m.round()),
        });
        if let Some(a) = &self.agreement {
            out["agreement_vs_f32"] = json!({
                "images": a.images,
                "top1_agreement": a.top1,
                "max_prob_diff": (a.max_prob_diff * 1e6).round() / 1e6,
                "min_cosine": a.min_cosine,
            });
        }
        out
    }

    pub fn to_text(&self) -> String {
        let mut s = format!(
            "cliper bench: {} {}, {} thread(s), weights {}, median/min/max of {} runs (ms)\n",
            self.device,
            self.precision.as_str(),
            self.threads,
            self.weights,
            self.runs
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
