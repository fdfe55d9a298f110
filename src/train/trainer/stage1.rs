//! Stage 1 of the recipe, the descriptors alone on fixed features, and the
//! checkpoints both stages save.

use super::*;

/// Stage 1: trains only the descriptors on fixed features [N, E] (cached
/// image features, or the mean of each clip's frames), one epoch at a time
/// until `opts.stage1_epochs`, saving the best checkpoint and the state after
/// each epoch. Returns the number of epochs run.
#[allow(clippy::too_many_arguments)]
pub(super) fn descriptor_stage(
    opts: &TrainOptions,
    clip: &ClipModel,
    state: &mut State,
    rng: &mut SplitMix64,
    (train_x, train_labels): (&Tensor, &[usize]),
    (test_x, test_labels): (&Tensor, &[usize]),
    total_epochs: usize,
    what: &str,
    log: &mut dyn FnMut(&str),
) -> Result<usize, TrainError> {
    let dev = clip.device.clone();
    let desc = Var::from_tensor(&state.descriptor.to_device(&dev)?)?;
    let mut opt = AdamW::new(vec![desc.clone()], AdamWConfig::stage1())?;
    if state.moments.len() == 1 {
        state.resume_optimiser(&mut opt, &dev)?;
    }
    let n = train_labels.len();
    let mut epochs_run = 0;
    while state.epoch < opts.stage1_epochs {
        let mut order: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut order);
        let pb = epoch_bar(
            n.div_ceil(opts.batch_size),
            format!("epoch {}/{} {what}", state.epoch + 1, total_epochs),
        );
        let (mut loss_sum, mut correct) = (0f64, 0usize);
        for batch in order.chunks(opts.batch_size) {
            let (f, labels) = select_batch(train_x, train_labels, batch)?;
            let t = descriptor_text(clip, desc.as_tensor())?;
            let logits = score_logits(&f, &t)?;
            let out = cliper_loss(&logits, &labels)?;
            opt.step(&out.loss.backward()?)?;
            loss_sum += out.loss.to_scalar::<f32>()? as f64 * batch.len() as f64;
            correct += count_correct(&logits, &labels)?;
            pb.inc(1);
        }
        pb.finish_and_clear();
        let t = descriptor_text(clip, &desc.as_tensor().detach())?;
        let m = evaluate_features(test_x, test_labels, &t)?;
        state.descriptor = desc.as_tensor().detach().to_device(&Device::Cpu)?;
        epochs_run += 1;
        let tally = EpochTally {
            stage: 1,
            label: what,
            total_epochs,
            loss_sum,
            correct,
            seen: n,
        };
        state.close_epoch(opts, &opt, &m, &tally, log)?;
    }
    log(&format!(
        "descriptor readings (nearest words per token):\n{}",
        readings(clip, &state.descriptor)?
    ));
    Ok(epochs_run)
}

pub(super) fn save_checkpoint(
    opts: &TrainOptions,
    descriptor: &Tensor,
    vision: &HashMap<String, Tensor>,
    temporal: &HashMap<String, Tensor>,
    m: &Metrics,
    epoch: usize,
) -> Result<(), TrainError> {
    let ck = CliperCheckpoint {
        descriptor: Some(descriptor.clone()),
        vision: vision.clone(),
        temporal: temporal.clone(),
        ..Default::default()
    };
    let heads = temporal
        .get("temporal.pos_embedding")
        .and_then(|t| t.dims().last().copied())
        .map(|w| temporal_config(w).heads.to_string())
        .unwrap_or_default();
    ck.save(
        &opts.out,
        &[
            ("temporal_heads", heads),
            ("epoch", epoch.to_string()),
            ("test_war", format!("{:.6}", m.war())),
            ("test_uar", format!("{:.6}", m.uar())),
            ("data", opts.data.display().to_string()),
            ("layout", opts.layout.name().into()),
        ],
    )?;
    Ok(())
}
