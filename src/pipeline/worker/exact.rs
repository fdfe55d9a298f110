//! Exact explanation maps (Grad-CAM, occlusion) of a paused frame, on a
//! thread of their own so scoring goes on.

use super::*;

/// The maps of one still frame, computed off the inference thread.
pub(super) struct ExactJob {
    pub(super) clip: Arc<ClipModel>,
    pub(super) text: Tensor,
    pub(super) layout: Arc<crate::model::cliper::expressions::BankLayout>,
    /// Whether the bank scores through an Exp-CLIP head (no maps then).
    pub(super) head: bool,
    pub(super) analyzer: AnalyzerConfig,
    pub(super) current: Arc<AtomicU64>,
    pub(super) events: Events,
}

impl ExactJob {
    pub(super) fn run(self, request: ExactRequest) {
        let id = request.id;
        let (error, cancelled) = match self.maps(&request) {
            Ok(done) => (None, !done),
            Err(e) => (Some(ModelError::Candle(e)), false),
        };
        self.events.send(PipelineEvent::ExactDone {
            request: id,
            error,
            cancelled,
        });
    }

    fn live(&self, id: u64) -> bool {
        self.current.load(Ordering::SeqCst) == id
    }

    /// Sends each face's map as it is done; `Ok(false)`: cancelled.
    fn maps(&self, r: &ExactRequest) -> candle_core::Result<bool> {
        let clip = &self.clip;
        if self.head {
            candle_core::bail!(
                "explanation maps are not available for a bank scored through an Exp-CLIP head"
            )
        }
        let text = self.text.to_dtype(clip.dtype)?;
        let (text, target) = explain::resolve(&text, r.target, &self.layout)?;
        let faces = &r.frame.faces;
        let grid = r.grid.clamp(1, clip.config.vision.image_size);
        // Forward passes per face, for the progress figure.
        let per_face = match r.method {
            Method::Occlusion => grid * grid + 1,
            _ => 1,
        };
        let total = per_face * faces.len();
        for (i, face) in faces.iter().enumerate() {
            if !self.live(r.id) {
                return Ok(false);
            }
            // The straight square, not the eye-levelled crop: the map is drawn
            // over that square of the frame.
            let crop = if self.analyzer.detect {
                crop_face(&r.frame.image, &face.bbox, self.analyzer.margin)
            } else {
                (*r.frame.image).clone()
            };
            let px = clip.pixels(&[crop])?.to_dtype(clip.dtype)?;
            let vision = &clip.vision;
            let map = match r.method {
                Method::Fast => explain::fast_map(vision, &px, &text, target)?,
                Method::GradCam => explain::gradcam_map(vision, &px, &text, target)?,
                Method::Occlusion => {
                    let progress = |done: usize, _: usize| {
                        self.events.send(PipelineEvent::ExactProgress {
                            request: r.id,
                            done: i * per_face + done,
                            total,
                        });
                        self.live(r.id)
                    };
                    match explain::occlusion_map_with(vision, &px, &text, target, grid, progress)? {
                        Some(m) => m,
                        None => return Ok(false),
                    }
                }
            };
            self.events.send(PipelineEvent::ExactMap {
                request: r.id,
                face: face.id,
                map,
            });
            self.events.send(PipelineEvent::ExactProgress {
                request: r.id,
                done: (i + 1) * per_face,
                total,
            });
        }
        Ok(true)
    }
}
