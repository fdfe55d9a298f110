//! The resumable training state beside the checkpoint: the descriptors,
//! the optimiser's moments, the epoch, the best score so far.

use super::*;

/// Path of the resumable state next to the checkpoint.
pub fn state_path(out: &Path) -> PathBuf {
    let name = out.file_stem().and_then(|s| s.to_str()).unwrap_or("cliper");
    out.with_file_name(format!("{name}.state.safetensors"))
}

pub(super) struct State {
    pub(super) descriptor: Tensor,
    pub(super) vision: HashMap<String, Tensor>,
    /// Temporal module tensors (`temporal.*`), clip data sets only.
    pub(super) temporal: HashMap<String, Tensor>,
    pub(super) moments: Vec<(Tensor, Tensor)>,
    pub(super) opt_step: u64,
    pub(super) epoch: usize,
    pub(super) best_war: f64,
    pub(super) best_uar: f64,
    pub(super) best_epoch: usize,
}

impl State {
    /// Ends an epoch: keeps the optimiser's state, counts the epoch, and
    /// records the test metrics if they are the best so far (returned).
    pub(super) fn end_epoch(&mut self, opt: &AdamW, m: &Metrics) -> candle_core::Result<bool> {
        self.moments = opt
            .moments
            .iter()
            .map(|(a, b)| Ok((a.to_device(&Device::Cpu)?, b.to_device(&Device::Cpu)?)))
            .collect::<candle_core::Result<_>>()?;
        self.opt_step = opt.step;
        self.epoch += 1;
        let best = m.war() > self.best_war;
        if best {
            self.best_war = m.war();
            self.best_uar = m.uar();
            self.best_epoch = self.epoch;
        }
        Ok(best)
    }
}

impl State {
    /// Gives `opt` the saved optimiser moments and step, on `dev`.
    pub(super) fn resume_optimiser(
        &self,
        opt: &mut AdamW,
        dev: &Device,
    ) -> candle_core::Result<()> {
        opt.moments = (self.moments.iter())
            .map(|(a, b)| Ok((a.to_device(dev)?, b.to_device(dev)?)))
            .collect::<candle_core::Result<_>>()?;
        opt.step = self.opt_step;
        Ok(())
    }

    /// Ends an epoch ([`Self::end_epoch`]); when it is the best so far,
    /// saves the checkpoint (the descriptors with the tuned vision or
    /// temporal tensors); logs the epoch's line and saves this state.
    pub(super) fn close_epoch(
        &mut self,
        opts: &TrainOptions,
        opt: &AdamW,
        m: &Metrics,
        tally: &EpochTally,
        log: &mut dyn FnMut(&str),
    ) -> Result<(), TrainError> {
        let best = self.end_epoch(opt, m)?;
        if best {
            save_checkpoint(
                opts,
                &self.descriptor,
                &self.vision,
                &self.temporal,
                m,
                self.epoch,
            )?;
        }
        log(&epoch_line(tally, self.epoch, opt.config.lr, m, best));
        save_state(&state_path(&opts.out), self, tally.stage)
    }
}

pub(super) fn save_state(path: &Path, s: &State, stage: u8) -> Result<(), TrainError> {
    let mut ck = CliperCheckpoint {
        descriptor: Some(s.descriptor.clone()),
        vision: s.vision.clone(),
        temporal: s.temporal.clone(),
        ..Default::default()
    };
    for (i, (m, v)) in s.moments.iter().enumerate() {
        ck.temporal.insert(format!("optim.m.{i}"), m.clone());
        ck.temporal.insert(format!("optim.v.{i}"), v.clone());
    }
    ck.save(
        path,
        &[
            ("kind", "training-state".into()),
            ("temporal_heads", temporal_heads(s).to_string()),
            ("epoch", s.epoch.to_string()),
            ("stage", stage.to_string()),
            ("optim_step", s.opt_step.to_string()),
            ("best_war", s.best_war.to_string()),
            ("best_uar", s.best_uar.to_string()),
            ("best_epoch", s.best_epoch.to_string()),
        ],
    )?;
    Ok(())
}

/// Heads of a temporal module of the state's width (see `temporal_config`).
pub(super) fn temporal_heads(s: &State) -> usize {
    s.temporal
        .get("temporal.pos_embedding")
        .and_then(|t| t.dims().last().copied())
        .map(|w| temporal_config(w).heads)
        .unwrap_or(0)
}

/// The temporal module trained for clips: CLIPER/DFER-CLIP's shape (1 layer,
/// 8 heads, MLP 2x width = 1024 for ViT-B/16) scaled to the embedding width.
pub fn temporal_config(width: usize) -> crate::model::temporal::TemporalConfig {
    let heads = if width.is_multiple_of(8) { 8 } else { 1 };
    crate::model::temporal::TemporalConfig {
        flavour: crate::model::temporal::TemporalFlavour::Cliper,
        width,
        frames: crate::model::temporal::DEFAULT_FRAMES,
        layers: 1,
        heads,
        inner: width,
        mlp: 2 * width,
    }
}

pub(super) fn load_state(path: &Path) -> Result<(State, u8), TrainError> {
    if !path.is_file() {
        return Err(TrainError::Invalid(format!(
            "cannot resume: no training state at {} (start without --resume)",
            path.display()
        )));
    }
    // The state file stores optimiser moments as extra tensors; read raw.
    // It is ours, not a download: a damaged one says how to go on.
    let damaged = |reason: String| {
        TrainError::Invalid(format!(
            "the training state {} is damaged ({reason}); start again without --resume",
            path.display()
        ))
    };
    let raw = match weights::read_tensors(path, DType::F32) {
        Err(weights::WeightsError::Corrupt { reason, .. }) => return Err(damaged(reason)),
        other => other?,
    };
    let ck = match CliperCheckpoint::load(path) {
        Err(crate::model::cliper::checkpoint::CliperFileError::Weights(
            weights::WeightsError::Corrupt { reason, .. },
        )) => return Err(damaged(reason)),
        other => other?,
    };
    let meta = &ck.metadata;
    let num = |k: &str| -> Result<f64, TrainError> {
        meta.get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| {
                TrainError::Invalid(format!("{}: training state lacks `{k}`", path.display()))
            })
    };
    let mut moments = Vec::new();
    let mut i = 0;
    while let (Some(m), Some(v)) = (
        raw.get(&format!("optim.m.{i}")),
        raw.get(&format!("optim.v.{i}")),
    ) {
        moments.push((m.clone(), v.clone()));
        i += 1;
    }
    let state = State {
        descriptor: ck.require_descriptor()?.clone(),
        vision: ck.vision.clone(),
        temporal: ck
            .temporal
            .iter()
            .filter(|(k, _)| k.starts_with("temporal."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        moments,
        opt_step: num("optim_step")? as u64,
        epoch: num("epoch")? as usize,
        best_war: num("best_war")?,
        best_uar: num("best_uar")?,
        best_epoch: num("best_epoch")? as usize,
    };
    Ok((state, num("stage")? as u8))
}
