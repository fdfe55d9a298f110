//! Face tracking across frames: stable ids for the faces of a video.
//!
//! Greedy IoU matching, with a centre-distance fallback for faces that moved
//! more than their own overlap allows between two detections (low frame
//! rates, fast heads). A track survives a few frames without a detection
//! (the detector blinks on profile views and motion blur) and keeps its id
//! when the face is found again. Detections the detector is unsure of only
//! continue tracks ([`Tracker::update_scored`]).

use crate::vision::faces::FaceBox;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrackerConfig {
    /// Overlap a detection needs with a track's last box to continue it.
    pub min_iou: f32,
    /// Without overlap, a detection still continues a track when the centres
    /// are closer than this fraction of the larger box side and the sizes
    /// differ by less than 2x.
    pub max_center_shift: f32,
    /// Frames a track may go undetected before its id is retired.
    pub max_missed: u32,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            min_iou: 0.25,
            max_center_shift: 0.6,
            max_missed: 2,
        }
    }
}

/// A face followed over frames.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaceTrack {
    /// Stable id, from 1, never reused within a tracker's life.
    pub id: u64,
    /// Last detected box.
    pub bbox: FaceBox,
    /// Consecutive frames without a detection.
    pub missed: u32,
    /// Frames with a detection.
    pub hits: u64,
}

/// A detection of this frame with the id of its track.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrackedFace {
    pub id: u64,
    pub bbox: FaceBox,
}

#[derive(Debug, Default)]
pub struct Tracker {
    pub config: TrackerConfig,
    tracks: Vec<FaceTrack>,
    next_id: u64,
}

/// Intersection over union of two boxes.
pub fn iou(a: &FaceBox, b: &FaceBox) -> f32 {
    let x0 = a.x.max(b.x);
    let y0 = a.y.max(b.y);
    let x1 = (a.x + a.w).min(b.x + b.w);
    let y1 = (a.y + a.h).min(b.y + b.h);
    if x1 <= x0 || y1 <= y0 {
        return 0.0;
    }
    let inter = ((x1 - x0) as f64) * ((y1 - y0) as f64);
    let union = (a.w as f64 * a.h as f64) + (b.w as f64 * b.h as f64) - inter;
    (inter / union.max(1.0)) as f32
}

impl Tracker {
    pub fn new(config: TrackerConfig) -> Self {
        Self {
            config,
            tracks: Vec::new(),
            next_id: 1,
        }
    }

    /// The live tracks (including those missing for a frame or two).
    pub fn tracks(&self) -> &[FaceTrack] {
        &self.tracks
    }

    /// Forgets every track (a new source starts); ids keep counting up.
    pub fn reset(&mut self) {
        self.tracks.clear();
    }

    /// How well detection `d` continues track `t`: `None` when it cannot.
    fn affinity(&self, t: &FaceBox, d: &FaceBox) -> Option<f32> {
        let overlap = iou(t, d);
        if overlap >= self.config.min_iou {
            return Some(1.0 + overlap);
        }
        let (tx, ty) = t.center();
        let (dx, dy) = d.center();
        let side = t.w.max(t.h).max(d.w).max(d.h) as f32;
        let shift = ((tx - dx).powi(2) + (ty - dy).powi(2)).sqrt() / side.max(1.0);
        let (ta, da) = (t.w as f32 * t.h as f32, d.w as f32 * d.h as f32);
        let ratio = ta.max(da) / ta.min(da).max(1.0);
        (shift < self.config.max_center_shift && ratio < 4.0)
            .then_some(1.0 - shift / self.config.max_center_shift)
    }

    /// Assigns an id to each detection of a new frame, in the order given.
    pub fn update(&mut self, detections: &[FaceBox]) -> Vec<TrackedFace> {
        let all: Vec<(FaceBox, bool)> = detections.iter().map(|d| (*d, true)).collect();
        self.update_scored(&all)
    }

    /// As [`update`](Self::update), for detections marked confident or not
    /// (by the detector's score, `FaceDetector::is_confident`). As in
    /// ByteTrack, confident detections are matched to the tracks first; weak
    /// ones then only continue a track that is left over, so a face that
    /// turns away and scores low keeps its id, while a weak detection never
    /// starts a track of its own and is dropped when no track wants it.
    pub fn update_scored(&mut self, detections: &[(FaceBox, bool)]) -> Vec<TrackedFace> {
        if self.next_id == 0 {
            self.next_id = 1;
        }
        let mut track_of: Vec<Option<usize>> = vec![None; detections.len()];
        let mut taken = vec![false; self.tracks.len()];
        for confident in [true, false] {
            let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
            for (ti, t) in self.tracks.iter().enumerate() {
                for (di, (d, c)) in detections.iter().enumerate() {
                    if *c != confident || taken[ti] {
                        continue;
                    }
                    if let Some(a) = self.affinity(&t.bbox, d) {
                        pairs.push((a, ti, di));
                    }
                }
            }
            pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
            for (_, ti, di) in pairs {
                if !taken[ti] && track_of[di].is_none() {
                    taken[ti] = true;
                    track_of[di] = Some(ti);
                }
            }
        }
        for (ti, t) in self.tracks.iter_mut().enumerate() {
            if !taken[ti] {
                t.missed += 1;
            }
        }
        let mut out = Vec::with_capacity(detections.len());
        for (di, (d, confident)) in detections.iter().enumerate() {
            let id = match track_of[di] {
                Some(ti) => {
                    let t = &mut self.tracks[ti];
                    t.bbox = *d;
                    t.missed = 0;
                    t.hits += 1;
                    t.id
                }
                None if !confident => continue,
                None => {
                    let id = self.next_id;
                    self.next_id += 1;
                    self.tracks.push(FaceTrack {
                        id,
                        bbox: *d,
                        missed: 0,
                        hits: 1,
                    });
                    id
                }
            };
            out.push(TrackedFace { id, bbox: *d });
        }
        let max_missed = self.config.max_missed;
        self.tracks.retain(|t| t.missed <= max_missed);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x: u32, y: u32, s: u32) -> FaceBox {
        FaceBox {
            x,
            y,
            w: s,
            h: s,
            score: 5.0,
            landmarks: None,
        }
    }

    #[test]
    fn iou_values() {
        assert_eq!(iou(&b(0, 0, 10), &b(0, 0, 10)), 1.0);
        assert_eq!(iou(&b(0, 0, 10), &b(20, 0, 10)), 0.0);
        assert!((iou(&b(0, 0, 10), &b(5, 0, 10)) - 50.0 / 150.0).abs() < 1e-6);
    }

    #[test]
    fn ids_stay_with_moving_faces_and_survive_misses() {
        let mut t = Tracker::new(TrackerConfig::default());
        let f = t.update(&[b(10, 10, 100), b(300, 10, 100)]);
        assert_eq!((f[0].id, f[1].id), (1, 2));
        // Both move right; the list order flips.
        let f = t.update(&[b(320, 15, 100), b(30, 12, 100)]);
        assert_eq!((f[0].id, f[1].id), (2, 1));
        // Face 1 missed for two frames, then found again.
        t.update(&[b(330, 15, 100)]);
        t.update(&[b(340, 15, 100)]);
        let f = t.update(&[b(35, 12, 100), b(350, 15, 100)]);
        assert_eq!((f[0].id, f[1].id), (1, 2));
        // Three misses retire the id; the face comes back as a new one.
        for _ in 0..3 {
            t.update(&[b(350, 15, 100)]);
        }
        let f = t.update(&[b(35, 12, 100), b(350, 15, 100)]);
        assert_eq!((f[0].id, f[1].id), (3, 2));
    }

    #[test]
    fn fast_motion_matches_by_centre_but_far_jumps_do_not() {
        let mut t = Tracker::new(TrackerConfig::default());
        t.update(&[b(100, 100, 80)]);
        // Moved 40 px: IoU 0.33. Then 32 px right and down: IoU 0.22, below
        // the threshold, but the centre moved only 0.57 of the side.
        assert_eq!(t.update(&[b(140, 100, 80)])[0].id, 1);
        assert!(iou(&b(140, 100, 80), &b(172, 132, 80)) < 0.25);
        assert_eq!(t.update(&[b(172, 132, 80)])[0].id, 1);
        // A jump across the frame is another face.
        assert_eq!(t.update(&[b(600, 100, 80)])[0].id, 2);
        t.reset();
        assert!(t.tracks().is_empty());
        assert_eq!(t.update(&[b(600, 100, 80)])[0].id, 3);
    }

    #[test]
    fn weak_detections_continue_tracks_but_never_start_them() {
        let mut t = Tracker::new(TrackerConfig::default());
        let first = t.update_scored(&[(b(100, 100, 80), true)]);
        assert_eq!(first[0].id, 1);
        // The head turns: the detector is unsure for ten frames, longer than
        // the tracker would wait for a miss; the track carries on.
        for i in 0..10 {
            let out = t.update_scored(&[(b(104 + i, 100, 78), false), (b(400, 50, 60), false)]);
            assert_eq!(out.len(), 1, "the unsure stranger is dropped: {out:?}");
            assert_eq!(out[0].id, 1);
        }
        // Confident again, same id; a confident newcomer gets the next id.
        let out = t.update_scored(&[(b(112, 100, 80), true), (b(400, 50, 60), true)]);
        assert_eq!(out.iter().map(|f| f.id).collect::<Vec<_>>(), [1, 2]);
        // A confident detection wins the track over a weak one in the same place.
        let out = t.update_scored(&[(b(113, 101, 80), false), (b(114, 100, 80), true)]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bbox.x, 114);
    }
}
