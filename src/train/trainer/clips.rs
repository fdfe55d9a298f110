//! Training on clip data sets: descriptors on the mean of each clip's
//! frames, then the temporal module on the cached per-frame features.

use super::*;

/// Mean of the frame embeddings of clips [N, F, E] -> [N, E] (not
/// renormalised: its logits are the mean of the frames' static logits).
pub(super) fn mean_of_frames(x: &Tensor) -> candle_core::Result<Tensor> {
    x.mean(1)
}

/// Clip data sets: stage 1 trains the descriptors on the mean of each clip's
/// frame features (the dynamic branch's fallback); stage 2 freezes them and
/// the vision tower and trains the temporal module on the cached per-frame
/// features (AdamW lr 1e-3, weight decay 0.01, eps 1e-4, cosine warm restarts
/// every 10 epochs: our choice, as the paper's temporal recipe is not public).
#[allow(clippy::too_many_arguments)]
pub(super) fn train_clips(
    opts: &TrainOptions,
    data: &Dataset,
    clip: &ClipModel,
    mut state: State,
    rng: &mut SplitMix64,
    cache_dir: &Path,
    stamp: &str,
    total_epochs: usize,
    log: &mut dyn FnMut(&str),
) -> Result<TrainSummary, TrainError> {
    let dev = clip.device.clone();
    let train_f = encode_split(
        clip,
        &data.train,
        true,
        opts.skip_unreadable,
        Some(cache_dir),
        stamp,
        "train clips",
    )?;
    let test_f = encode_split(
        clip,
        &data.test,
        true,
        opts.skip_unreadable,
        Some(cache_dir),
        stamp,
        "test clips",
    )?;
    let train_x = train_f.features.to_device(&dev)?; // [N, 16, E]
    let test_x = test_f.features.to_device(&dev)?;
    let n = train_f.labels.len();
    let mut epochs_run = 0;
    if state.epoch < opts.stage1_epochs {
        epochs_run += descriptor_stage(
            opts,
            clip,
            &mut state,
            rng,
            (&mean_of_frames(&train_x)?, &train_f.labels),
            (&mean_of_frames(&test_x)?, &test_f.labels),
            total_epochs,
            "stage 1 (clips, mean of frames)",
            log,
        )?;
    }
    if !opts.stage1_only && state.epoch < total_epochs {
        let text = descriptor_text(clip, &state.descriptor.to_device(&dev)?)?;
        let cfg = temporal_config(clip.config.embed_dim);
        let init = if state.temporal.is_empty() {
            crate::model::temporal::TemporalModule::init_tensors(&cfg, opts.seed ^ 0x7e4)?
        } else {
            state.temporal.clone()
        };
        let varmap = VarMap::new();
        let mut names: Vec<String> = init.keys().cloned().collect();
        names.sort();
        let mut vars = Vec::new();
        {
            let mut m = varmap
                .data()
                .lock()
                .map_err(|_| TrainError::Invalid("variable store poisoned".into()))?;
            for name in &names {
                let v = Var::from_tensor(&init[name].to_device(&dev)?)?;
                m.insert(name.clone(), v.clone());
                vars.push(v);
            }
        }
        let module = crate::model::temporal::TemporalModule::new(
            &cfg,
            VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        )?;
        let base_cfg = AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-4,
            weight_decay: 0.01,
        };
        let mut opt = AdamW::new(vars.clone(), base_cfg)?;
        if !state.temporal.is_empty() && state.moments.len() == vars.len() {
            state.resume_optimiser(&mut opt, &dev)?;
        }
        while state.epoch < total_epochs {
            let e2 = state.epoch - opts.stage1_epochs;
            opt.set_lr(cosine_warm_restarts(base_cfg.lr, 0.0, 10, e2));
            let mut order: Vec<usize> = (0..n).collect();
            rng.shuffle(&mut order);
            let (mut loss_sum, mut correct) = (0f64, 0usize);
            for batch in order.chunks(opts.batch_size) {
                let (x, labels) = select_batch(&train_x, &train_f.labels, batch)?;
                let f = l2_normalize(&module.forward(&x)?)?;
                let logits = score_logits(&f, &text)?;
                let out = cliper_loss(&logits, &labels)?;
                opt.step(&out.loss.backward()?)?;
                loss_sum += out.loss.to_scalar::<f32>()? as f64 * batch.len() as f64;
                correct += count_correct(&logits, &labels)?;
            }
            let tensors: HashMap<String, Tensor> = names
                .iter()
                .zip(&vars)
                .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().to_device(&Device::Cpu)?)))
                .collect::<candle_core::Result<_>>()?;
            let frozen = crate::model::temporal::TemporalModule::from_tensors(
                &tensors,
                Some(cfg.heads),
                cfg.width,
                &dev,
            )
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
            let m = evaluate_features(
                &l2_normalize(&frozen.forward(&test_x)?)?,
                &test_f.labels,
                &text,
            )?;
            state.temporal = tensors;
            epochs_run += 1;
            let tally = EpochTally {
                stage: 2,
                label: "stage 2 (temporal)",
                total_epochs,
                loss_sum,
                correct,
                seen: n,
            };
            state.close_epoch(opts, &opt, &m, &tally, log)?;
        }
    }
    Ok(TrainSummary::of(&state, epochs_run))
}
