use super::*;
use crate::pipeline::worker::TrackedResult;
use crate::session::record::FaceRecord;
use crate::vision::faces::FaceBox;

fn bank() -> Arc<DescriptorBank> {
    Arc::new(DescriptorBank {
        kind: crate::model::cliper::BankKind::ZeroShot,
        source: "test".into(),
        layout: Arc::new(crate::model::cliper::expressions::BankLayout::cliper()),
        head: None,
        descriptors: Vec::new(),
        text_features: candle_core::Tensor::zeros(
            (35, 4),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    })
}

fn scores_event(generation: u64, faces: &[(u64, usize)]) -> PipelineEvent {
    let faces = faces
        .iter()
        .map(|&(id, class)| {
            let bbox = FaceBox {
                x: id as u32 * 100,
                y: 0,
                w: 50,
                h: 50,
                score: 3.0,
                landmarks: None,
            };
            TrackedResult {
                probe_logit: Some(1.5),
                ..TrackedResult::predicting(id, class, bbox)
            }
        })
        .collect();
    PipelineEvent::Scores(FrameScores {
        seq: 0,
        generation,
        index: 0,
        t: 0.0,
        captured: Instant::now(),
        faces,
        timings: StageTimings::default(),
        probe: Some("p".into()),
        bank: bank(),
    })
}

fn opened(generation: u64) -> PipelineEvent {
    PipelineEvent::SourceOpened(SourceInfo {
        spec: SourceSpec::Demo,
        generation,
        name: "demo".into(),
        len: None,
        fps: 25.0,
        live: false,
    })
}

#[test]
fn scores_build_histories_and_select_a_face() {
    let mut s = Store::new(SourceSpec::Demo);
    // The pipeline smooths; the store shows what it is given.
    let mut smoother = crate::pipeline::smoothing::Smoother::new(0.5);
    let mut smoothed = |mut ev: PipelineEvent| {
        if let PipelineEvent::Scores(f) = &mut ev {
            smoother.apply(f.seq, &mut f.faces);
        }
        ev
    };
    s.apply(opened(1), 30.0);
    s.apply(smoothed(scores_event(1, &[(2, 3), (1, 6)])), 30.0);
    assert_eq!(s.faces.len(), 2);
    assert_eq!(s.selected, Some(1), "leftmost face is selected");
    assert_eq!(s.faces[&2].shown.predicted, 3);
    // Smoothing keeps part of the old scores.
    s.apply(smoothed(scores_event(1, &[(2, 0), (1, 6)])), 30.0);
    let h = &s.faces[&2];
    assert_eq!(s.timelines.get(2).unwrap().shown.len(), 2);
    assert_eq!(h.raw.predicted, 0);
    assert!((h.shown.class_scores[0] - 2.0).abs() < 1e-5);
    assert_eq!(h.probe_logit, Some(1.5));
    // A late result from an old source is ignored.
    s.apply(scores_event(7, &[(9, 1)]), 30.0);
    assert!(!s.faces.contains_key(&9));
    assert_eq!(s.score_lag.len(), 2);
}

fn frame_event(seq: u64) -> PipelineEvent {
    PipelineEvent::Frame(Arc::new(DetectedFrame {
        seq,
        generation: 1,
        index: seq,
        t: seq as f64 / 25.0,
        image: Arc::new(image::RgbImage::new(8, 8)),
        faces: Vec::new(),
        captured: Instant::now(),
        decode_ms: 0.0,
        detect_ms: 0.0,
        detected: true,
        capture_fps: 25.0,
        dropped: 0,
    }))
}

#[test]
fn pause_freezes_the_window_and_collects_exact_maps() {
    let mut s = Store::new(SourceSpec::Demo);
    assert!(!s.pause(), "nothing to pause on before a frame");
    s.apply(opened(1), 30.0);
    s.apply(frame_event(5), 30.0);
    s.apply(scores_event(1, &[(2, 3)]), 30.0);
    assert!(s.pause());
    let t = s.now();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(s.now(), t, "the clock stands still while paused");
    // New frames and scores do not reach the window.
    s.apply(frame_event(6), 30.0);
    s.apply(scores_event(1, &[(2, 0)]), 30.0);
    assert_eq!(s.shown_frame().unwrap().seq, 5);
    assert_eq!(s.faces[&2].raw.predicted, 3);
    assert_eq!(s.timelines.get(2).unwrap().shown.len(), 1);
    // No target: nothing to compute. With one, the paused frame's key.
    assert!(s.wanted_exact().is_none());
    s.explain = Some(Target::Class(3));
    s.map_method = Method::GradCam;
    let key = s.wanted_exact().unwrap();
    assert_eq!(key, ((1, 5), Target::Class(3), Method::GradCam, 0));
    assert!(s.map_for(2).is_none(), "nothing drawn until the map comes");
    s.exact.push(ExactMaps::pending(9, key));
    let map = ExplainMap {
        rows: 1,
        cols: 2,
        values: vec![0.5, 1.0],
        logit: 2.0,
    };
    s.apply(
        PipelineEvent::ExactMap {
            request: 9,
            face: 2,
            map,
        },
        30.0,
    );
    s.apply(
        PipelineEvent::ExactDone {
            request: 9,
            error: None,
            cancelled: false,
        },
        30.0,
    );
    let (m, method) = s.map_for(2).unwrap();
    assert_eq!(
        (m.values.clone(), method),
        (vec![0.5, 1.0], Method::GradCam)
    );
    assert!(s.current_exact().unwrap().finished);
    // Another method is another request; a cancelled one is forgotten.
    s.map_method = Method::Occlusion;
    assert!(s.current_exact().is_none());
    // Resuming: live again, the clock runs on from where it stood.
    s.resume();
    assert!(s.exact.is_empty() && s.paused.is_none());
    assert!(s.now() - t < 0.02, "paused time is not counted");
    s.apply(frame_event(7), 30.0);
    assert_eq!(s.shown_frame().unwrap().seq, 7);
}

#[test]
fn latency_median() {
    let mut l = LatencyStat::default();
    for v in [5.0, 1.0, 3.0] {
        l.push(v);
    }
    assert_eq!(l.median(), Some(3.0));
    assert_eq!(l.percentile(1.0), Some(5.0));
}

/// A face as the recorder writes it, with its top descriptor.
fn record_of(f: &TrackedResult, probe: Option<&str>) -> FaceRecord {
    let sc = &f.face.scores;
    let top = sc.ranked()[0];
    let (c, index) = sc.layout.locate(top);
    let descriptor = crate::session::record::DescriptorRecord {
        class: sc.class_name(c).to_string(),
        index,
        logit: sc.logits[top],
        text: "t".into(),
    };
    crate::pipeline::recorder::face_record(f.id, f, vec![descriptor], probe)
}

#[test]
fn a_recorded_frame_replays_as_the_live_window_showed_it() {
    use crate::pipeline::dynamic::{DynamicMode, DynamicScores};
    let layout = Arc::new(crate::model::cliper::expressions::BankLayout::cliper());
    let bbox = FaceBox {
        x: 40,
        y: 8,
        w: 60,
        h: 70,
        score: 0.9,
        landmarks: Some([[1.0, 2.0]; 5]),
    };
    let mut face = TrackedResult {
        probe_logit: Some(2.5),
        ..TrackedResult::predicting(4, 3, bbox)
    };
    // Smoothed towards another class, and a dynamic score of a third.
    face.smoothed = Some(TrackedResult::predicting(4, 5, bbox).face.scores);
    let dynamic = TrackedResult::predicting(4, 1, bbox).face.scores;
    face.dynamic = Some(DynamicScores {
        scores: dynamic.clone(),
        mode: DynamicMode::MeanOfStatic,
    });
    face.dynamic_smoothed = Some(dynamic);
    let record = FrameRecord {
        frame: 0,
        seq: 0,
        t: 0.25,
        wall: String::new(),
        source_t: 0.25,
        faces: vec![record_of(&face, Some("p"))],
    };
    // Round trip through the file format, as replay reads it.
    let record: FrameRecord = serde_json::from_str(&record.to_line()).unwrap();

    let mut live = Store::new(SourceSpec::Demo);
    live.apply(opened(0), 60.0);
    let PipelineEvent::Scores(mut s) = scores_event(0, &[]) else {
        unreachable!()
    };
    s.faces = vec![face];
    live.apply(PipelineEvent::Scores(s), 60.0);

    let mut replay = Store::replay(Timelines::default(), 1);
    replay.selected = Some(4);
    replay.seek(0.3, Some(&record), &layout);
    assert_eq!(replay.now(), 0.3);
    let (a, b) = (&live.faces[&4], &replay.faces[&4]);
    assert_eq!(a.bbox, b.bbox);
    assert_eq!(a.probe_logit, b.probe_logit);
    for dynamic in [false, true] {
        let (x, y) = (a.displayed(dynamic), b.displayed(dynamic));
        assert_eq!(x.predicted, y.predicted, "dynamic view {dynamic}");
        assert_eq!(x.probs, y.probs, "dynamic view {dynamic}");
        assert_eq!(x.class_scores, y.class_scores, "dynamic view {dynamic}");
    }
    assert_eq!(b.shown.predicted, 5);
    assert_eq!(b.raw.predicted, 3);
    assert_eq!(
        b.dynamic.as_ref().map(|d| d.1),
        Some(DynamicMode::MeanOfStatic)
    );
    // The recorded top descriptor has its logit; the others were not recorded.
    let top = a.raw.ranked()[0];
    assert_eq!(b.raw.logits[top], a.raw.logits[top]);
    assert_eq!(b.raw.logits.iter().filter(|x| x.is_nan()).count(), 34);
    assert_eq!(live.selected_face().map(|f| f.id), Some(4));
    assert_eq!(replay.selected_face().map(|f| f.id), Some(4));
    // Between records (before the first), no face is on screen but the
    // selection stays for when it comes back.
    replay.seek(0.0, None, &layout);
    assert!(replay.faces.is_empty());
    assert_eq!(replay.selected, Some(4));
    assert!(replay.selected_face().is_none());
    // With no face on screen the classes (the curves' legend) are still the
    // session's, in its order (DFER-CLIP's here), not CLIPER's.
    let dfew = &crate::model::dfer_clip::MAFW_CLASSES[..7];
    let counts: Vec<(&str, usize)> = dfew.iter().map(|c| (*c, 1)).collect();
    let dfew_layout = Arc::new(BankLayout::new(&counts).unwrap());
    replay.seek(0.0, None, &dfew_layout);
    assert_eq!(replay.classes(), dfew);
}
