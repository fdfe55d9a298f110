//! The inference stage: the model and its bank (`Scorer`), the dynamic
//! branch's windows, the probe, and the commands that change them.

use super::exact::ExactJob;
use super::*;

/// The model side of the pipeline, owned by the inference thread.
struct Scorer {
    /// Shared with the background thread of exact maps.
    clip: Arc<ClipModel>,
    tokenizer: ClipTokenizer,
    /// The CLIPER checkpoint of the learned bank in use (its vision tower,
    /// if any, is applied; its temporal weights await the dynamic branch).
    cliper: Option<CliperCheckpoint>,
    bank: Arc<DescriptorBank>,
    /// (text, normalised feature [E]).
    probe: Option<(String, Tensor)>,
    /// The dynamic branch: per-face windows of frame features and the
    /// temporal module of the checkpoint in use (or the mean-of-static fallback).
    windows: FeatureWindows,
    dynamic: DynamicScorer,
    last_dynamic: HashMap<u64, DynamicScores>,
    /// The target of the live explanation map, if any.
    explain: Option<Target>,
    /// The id of the exact-map request that may run (0: none); a running
    /// job stops at its next step once this changes.
    exact_current: Arc<AtomicU64>,
    /// The Exp-CLIP head given at start, for the zero-shot banks.
    head: Option<std::path::PathBuf>,
    /// The plain CLIP weights file, when known (a DFER-CLIP model brings
    /// its own CLIP; leaving it goes back to these).
    plain_weights: Option<std::path::PathBuf>,
}

impl Scorer {
    fn new(loaded: Loaded, head: Option<std::path::PathBuf>) -> Self {
        let Loaded {
            clip,
            bank,
            tokenizer,
            cliper,
        } = loaded;
        let dynamic = DynamicScorer::new(temporal_of(cliper.as_ref(), &clip), &clip.device);
        let settings = DynamicSettings::default();
        let own_clip = cliper.as_ref().is_some_and(|c| c.is_dfer_clip());
        let plain_weights = (!own_clip).then(|| clip.source.clone());
        Self {
            head,
            plain_weights,
            clip: Arc::new(clip),
            tokenizer,
            cliper,
            bank: Arc::new(bank),
            probe: None,
            windows: FeatureWindows::new(settings.window.min(dynamic.frames()), settings.stride),
            dynamic,
            last_dynamic: HashMap::new(),
            explain: None,
            exact_current: Arc::new(AtomicU64::new(0)),
        }
    }

    fn set_dynamic(&mut self, settings: DynamicSettings) {
        self.windows
            .configure(settings.window.min(self.dynamic.frames()), settings.stride);
        self.last_dynamic.clear();
    }

    /// Empties the dynamic windows: a new source's track ids start again
    /// at 1 and must not continue the old source's faces.
    fn restart_windows(&mut self) {
        let (len, stride) = (self.windows.len, self.windows.stride);
        self.windows = FeatureWindows::new(len, stride);
        self.last_dynamic.clear();
    }

    fn set_bank(&mut self, source: &BankSource) -> Result<Arc<DescriptorBank>, ModelError> {
        let mut checkpoint = source.checkpoint()?;
        // The model must match the bank: a checkpoint may carry a fine-tuned
        // vision tower or (DFER-CLIP) a whole CLIP of its own, and leaving
        // such a bank restores the plain CLIP.
        let own_next = checkpoint.as_mut().and_then(CliperCheckpoint::take_clip);
        let own_now = self.cliper.as_ref().is_some_and(|c| c.is_dfer_clip());
        let tuned_now = own_now || self.cliper.as_ref().is_some_and(|c| !c.vision.is_empty());
        let tuned_next =
            own_next.is_some() || checkpoint.as_ref().is_some_and(|c| !c.vision.is_empty());
        if tuned_now || tuned_next {
            let mut base = match own_next {
                Some((path, tensors)) => Checkpoint::from_tensors(&path, tensors)?,
                None => {
                    let plain = match &self.plain_weights {
                        Some(p) => p.clone(),
                        None => crate::model::weights::locate(None)?,
                    };
                    Checkpoint::load(&plain, candle_core::DType::F32)?
                }
            };
            if let Some(c) = checkpoint.as_ref().filter(|c| !c.vision.is_empty()) {
                c.apply_vision(&mut base)?;
            }
            let own = checkpoint.as_ref().is_some_and(|c| c.is_dfer_clip());
            self.clip = Arc::new(ClipModel::from_checkpoint(
                base,
                &self.clip.device,
                self.clip.dtype,
            )?);
            if !own {
                self.plain_weights = Some(self.clip.source.clone());
            }
        }
        let head = match source {
            BankSource::Learned(_) => None,
            _ => self.head.as_deref(),
        };
        // DFER-CLIP and Exp-CLIP models take squashed, unnormalised pixels.
        let want = if head.is_some() || checkpoint.as_ref().is_some_and(|c| c.is_dfer_clip()) {
            crate::model::preprocess::Preprocessing::Squash
        } else {
            crate::model::preprocess::Preprocessing::Clip
        };
        if self.clip.preprocessing != want {
            let c = &self.clip;
            self.clip = Arc::new(ClipModel {
                vision: c.vision.clone(),
                text: c.text.clone(),
                config: c.config.clone(),
                device: c.device.clone(),
                dtype: c.dtype,
                source: c.source.clone(),
                preprocessing: want,
            });
        }
        let bank = setup::load_bank_with(
            &self.clip,
            &self.tokenizer,
            source,
            checkpoint.as_ref(),
            head,
        )?;
        self.cliper = checkpoint;
        self.bank = Arc::new(bank);
        // Windows hold features of the old vision tower, and the temporal
        // module belongs to the checkpoint: start the dynamic branch afresh.
        self.dynamic = DynamicScorer::new(
            temporal_of(self.cliper.as_ref(), &self.clip),
            &self.clip.device,
        );
        let (len, stride) = (self.windows.len, self.windows.stride);
        self.windows = FeatureWindows::new(len.min(self.dynamic.frames()), stride);
        self.last_dynamic.clear();
        // The probe lives in the bank's space (another text tower, a head):
        // encode it again.
        if let Some((text, _)) = self.probe.take() {
            self.set_probe(Some(text))?;
        }
        Ok(self.bank.clone())
    }

    fn set_probe(&mut self, text: Option<String>) -> Result<Option<String>, ModelError> {
        let Some(text) = text.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) else {
            self.probe = None;
            return Ok(None);
        };
        let feat = self
            .bank
            .encode_probe(&self.clip, &self.tokenizer, &text)
            .map_err(ModelError::Probe)?;
        self.probe = Some((text.clone(), feat));
        Ok(Some(text))
    }

    /// Starts (or, with `None`, stops) the background job of exact maps.
    /// The job gets its own handles on the model and the bank's text
    /// features, so scoring goes on while it runs.
    fn exact(&mut self, request: Option<ExactRequest>, analyzer: &AnalyzerConfig, events: &Events) {
        let Some(request) = request else {
            self.exact_current.store(0, Ordering::SeqCst);
            return;
        };
        self.exact_current.store(request.id, Ordering::SeqCst);
        let job = ExactJob {
            clip: self.clip.clone(),
            text: self.bank.text_features.clone(),
            layout: self.bank.layout.clone(),
            head: self.bank.head.is_some(),
            analyzer: analyzer.clone(),
            current: self.exact_current.clone(),
            events: events.clone(),
        };
        let id = request.id;
        let spawned = std::thread::Builder::new()
            .name("cliper-explain".into())
            .spawn(move || job.run(request));
        if let Err(e) = spawned {
            events.send(PipelineEvent::ExactDone {
                request: id,
                error: Some(ModelError::Thread(e)),
                cancelled: false,
            });
        }
    }

    /// Scores all faces of a frame in one batch: the static scores, and where
    /// the dynamic branch is on, each track's window of its last 16 image
    /// features through the temporal module against the same bank.
    fn score(
        &mut self,
        frame: &DetectedFrame,
        analyzer: &AnalyzerConfig,
        timings: &mut StageTimings,
    ) -> candle_core::Result<Vec<TrackedResult>> {
        if frame.faces.is_empty() {
            return Ok(Vec::new());
        }
        let start = Instant::now();
        let crops: Vec<RgbImage> = if analyzer.detect {
            frame
                .faces
                .iter()
                .map(|f| analyzer.crop(&frame.image, &f.bbox))
                .collect()
        } else {
            vec![(*frame.image).clone()]
        };
        // With an explanation asked for, the same forward pass also yields
        // the last block's input, from which the fast maps cost a fraction
        // of an encode.
        let px = self.clip.pixels(&crops)?;
        timings.crop_ms = start.elapsed().as_secs_f32() * 1000.0;
        let start = Instant::now();
        let (raw, last_input) = match self.explain {
            None => (self.clip.encode_images_raw(&px)?, None),
            Some(_) => {
                let px = px.to_dtype(self.clip.dtype)?;
                let out = self.clip.vision.forward_with(&px, false, true)?;
                (
                    out.embedding.to_dtype(candle_core::DType::F32)?,
                    out.last_block_input,
                )
            }
        };
        let emb = crate::model::layers::l2_normalize(&raw)?;
        timings.encode_ms = start.elapsed().as_secs_f32() * 1000.0;
        let start = Instant::now();
        let scores = scoring::score(&emb, &self.bank)?;
        let probe = match &self.probe {
            Some((_, feat)) => Some(scoring::probe_logits(&emb, feat, &self.bank)?),
            None => None,
        };
        let rows = emb.to_vec2::<f32>()?;
        let raw_rows = raw.to_vec2::<f32>()?;
        // Dynamic branch: one push per face, one batched temporal pass for
        // the faces whose window is due; windows of faces that left go.
        let ids: Vec<u64> = frame.faces.iter().map(|f| f.id).collect();
        self.windows.retain(&ids);
        self.last_dynamic.retain(|id, _| ids.contains(id));
        let due: Vec<u64> = ids
            .iter()
            .zip(&raw_rows)
            .filter_map(|(&id, e)| self.windows.push(id, e.clone()).then_some(id))
            .collect();
        if !due.is_empty() {
            let windows: Vec<Vec<&[f32]>> = due
                .iter()
                .filter_map(|&id| self.windows.window(id))
                .collect();
            let scored = self.dynamic.score_many(&windows, &self.bank)?;
            for (id, d) in due.iter().zip(scored) {
                self.last_dynamic.insert(*id, d);
            }
        }
        let mut maps: Vec<Option<ExplainMap>> = vec![None; frame.faces.len()];
        if let (Some(target), Some(last), None) = (self.explain, &last_input, &self.bank.head) {
            let text = self.bank.text_features.to_dtype(last.dtype())?;
            let (text, target) = explain::resolve(&text, target, &self.bank.layout)?;
            let fast = explain::fast_target_maps(&self.clip.vision, last, &text, target)?;
            for (m, f) in maps.iter_mut().zip(fast) {
                *m = Some(f);
            }
        }
        timings.score_ms = start.elapsed().as_secs_f32() * 1000.0;
        let mut maps = maps.into_iter();
        Ok(frame
            .faces
            .iter()
            .zip(scores)
            .zip(rows)
            .enumerate()
            .map(|(i, ((f, scores), embedding))| TrackedResult {
                id: f.id,
                face: FaceResult {
                    bbox: f.bbox,
                    scores,
                    embedding,
                },
                probe_logit: probe.as_ref().and_then(|p| p.get(i).copied()),
                dynamic: self.last_dynamic.get(&f.id).cloned(),
                smoothed: None,
                dynamic_smoothed: None,
                window_fill: self.windows.filled(f.id),
                explain: maps.next().flatten(),
            })
            .collect())
    }
}

/// The temporal module of a checkpoint, if it has one that fits; a broken
/// one is reported and the fallback used.
fn temporal_of(cliper: Option<&CliperCheckpoint>, clip: &ClipModel) -> Option<TemporalModule> {
    let ck = cliper?;
    match ck.temporal_module(clip.config.embed_dim, &clip.device) {
        Ok(t) => t,
        Err(e) => {
            log::warn!(
                "{}: temporal weights not used ({e}); dynamic scores fall back to the mean of static scores",
                ck.path.display()
            );
            None
        }
    }
}

pub(super) fn infer_stage(
    mut config: PipelineConfig,
    input: Receiver<Arc<DetectedFrame>>,
    commands: Receiver<PipelineCommand>,
    events: Events,
    model_on_cpu: Arc<AtomicBool>,
) {
    let batch = config.mode == RunMode::Batch;
    if !events.send(PipelineEvent::ModelLoading) {
        return;
    }
    let start = Instant::now();
    let loaded = match setup::load(&config.model) {
        // Live, a bank that cannot be read (a saved choice whose file went
        // bad) must not leave the window without a model: say so and fall
        // back to the built-in descriptions. Batch runs stop instead.
        Err(e @ (setup::SetupError::Cliper(_) | setup::SetupError::Bank(_)))
            if !batch && !matches!(config.model.bank, BankSource::BuiltinZeroShot) =>
        {
            events.send(PipelineEvent::BankFailed(ModelError::BankFellBack(
                Box::new(e),
            )));
            let mut spec = config.model.clone();
            spec.bank = BankSource::BuiltinZeroShot;
            setup::load(&spec)
        }
        other => other,
    };
    let mut scorer = match loaded {
        Ok(loaded) => {
            let mut scorer = Scorer::new(loaded, config.model.head.clone());
            scorer.set_dynamic(config.dynamic);
            scorer.explain = config.explain;
            let info = ModelInfo {
                device: device::describe(&scorer.clip.device).to_string(),
                weights: scorer.clip.source.clone(),
                kernel: scorer.clip.vision.kernel(),
                load_secs: start.elapsed().as_secs_f32(),
            };
            model_on_cpu.store(scorer.clip.device.is_cpu(), Ordering::Relaxed);
            events.send(PipelineEvent::ModelReady(info));
            events.send(PipelineEvent::BankReady(scorer.bank.clone()));
            Some(scorer)
        }
        Err(e) => {
            events.send(PipelineEvent::ModelFailed(e.into()));
            if batch {
                events.send(PipelineEvent::Finished);
                return;
            }
            None
        }
    };
    if let (Some(s), Some(text)) = (scorer.as_mut(), config.probe.clone()) {
        let ev = match s.set_probe(Some(text.clone())) {
            Ok(t) => PipelineEvent::ProbeReady(t),
            Err(error) => PipelineEvent::ProbeFailed { text, error },
        };
        events.send(ev);
    }
    // Outside the scorer: the factor holds while no model is loaded.
    let mut smoother = crate::pipeline::smoothing::Smoother::new(config.smoothing);
    let mut meter = RateMeter::default();
    let mut inference_fps = 0.0;
    let mut commands_open = true;
    let mut generation = 0;
    loop {
        let frame = if commands_open {
            select! {
                recv(commands) -> cmd => {
                    match cmd {
                        // The crops follow the detector's margin.
                        Ok(PipelineCommand::SetDetector(kind)) => {
                            config.analyzer = config.analyzer.clone().with_detector(kind);
                        }
                        Ok(PipelineCommand::SetSmoothing(a)) => smoother.set_factor(a),
                        Ok(cmd) => handle_command(&mut scorer, cmd, &config.analyzer, &events),
                        // The owner is gone: finish the frames in flight
                        // (batch) or stop (live).
                        Err(_) if batch => commands_open = false,
                        Err(_) => return,
                    }
                    continue;
                }
                recv(input) -> f => f,
            }
        } else {
            input.recv()
        };
        let Ok(frame) = frame else {
            // Capture and detection are done.
            events.send(PipelineEvent::Finished);
            return;
        };
        let Some(s) = scorer.as_mut() else {
            continue;
        };
        if frame.generation != generation {
            s.restart_windows();
            smoother.clear();
            generation = frame.generation;
        }
        let mut timings = StageTimings {
            decode_ms: frame.decode_ms,
            detect_ms: frame.detect_ms,
            capture_fps: frame.capture_fps,
            inference_fps,
            ..Default::default()
        };
        let mut faces = match s.score(&frame, &config.analyzer, &mut timings) {
            Ok(f) => f,
            Err(e) => {
                events.send(PipelineEvent::ModelFailed(ModelError::Inference {
                    frame: frame.index,
                    error: e,
                }));
                if batch {
                    events.send(PipelineEvent::Finished);
                    return;
                }
                continue;
            }
        };
        smoother.apply(frame.seq, &mut faces);
        inference_fps = meter.tick();
        timings.inference_fps = inference_fps;
        let scores = FrameScores {
            seq: frame.seq,
            generation: frame.generation,
            index: frame.index,
            t: frame.t,
            captured: frame.captured,
            faces,
            timings,
            probe: s.probe.as_ref().map(|(t, _)| t.clone()),
            bank: s.bank.clone(),
        };
        if !events.send(PipelineEvent::Scores(scores)) {
            return;
        }
    }
}

fn handle_command(
    scorer: &mut Option<Scorer>,
    cmd: PipelineCommand,
    analyzer: &AnalyzerConfig,
    events: &Events,
) {
    let Some(s) = scorer.as_mut() else {
        let what = match cmd {
            PipelineCommand::SetBank(_) => "descriptors",
            PipelineCommand::Exact(Some(r)) => {
                events.send(PipelineEvent::ExactDone {
                    request: r.id,
                    error: Some(ModelError::NoModel),
                    cancelled: false,
                });
                return;
            }
            PipelineCommand::SetProbe(_) => "probe text",
            _ => return,
        };
        events.send(PipelineEvent::ModelFailed(ModelError::NotLoaded(what)));
        return;
    };
    let ev = match cmd {
        PipelineCommand::SetBank(source) => match s.set_bank(&source) {
            Ok(bank) => PipelineEvent::BankReady(bank),
            Err(e) => PipelineEvent::BankFailed(e),
        },
        PipelineCommand::SetProbe(text) => match s.set_probe(text.clone()) {
            Ok(t) => PipelineEvent::ProbeReady(t),
            Err(error) => PipelineEvent::ProbeFailed {
                text: text.unwrap_or_default(),
                error,
            },
        },
        PipelineCommand::SetDynamic(d) => {
            s.set_dynamic(d);
            return;
        }
        PipelineCommand::SetExplain(t) => {
            s.explain = t;
            return;
        }
        PipelineCommand::Exact(r) => {
            s.exact(r, analyzer, events);
            return;
        }
        PipelineCommand::SetSource(_)
        | PipelineCommand::SetPaused(_)
        | PipelineCommand::SetDetector(_)
        | PipelineCommand::SetSmoothing(_) => return,
    };
    events.send(ev);
}
