//! Metrics of features, of a bank, and `cliper eval`.

use super::*;

/// Predictions and metrics of normalised features [N, E] under CLIPER's
/// text features [35, E] (labels: CLIPER's class indices).
pub fn evaluate_features(
    features: &Tensor,
    labels: &[usize],
    text_features: &Tensor,
) -> Result<Metrics, TrainError> {
    let layout = cliper_layout();
    let l = score_logits(features, text_features)?.to_vec2::<f32>()?;
    Ok(Metrics::from_pairs(l.into_iter().zip(labels).map(
        |(row, &y)| (y, ExpressionScores::from_logits(row, &layout).predicted),
    )))
}

pub(super) fn cliper_layout() -> std::sync::Arc<crate::model::cliper::expressions::BankLayout> {
    std::sync::Arc::new(crate::model::cliper::expressions::BankLayout::cliper())
}

/// How many rows of descriptor `logits` [B, 35] predict their `labels`.
pub(super) fn count_correct(logits: &Tensor, labels: &[usize]) -> candle_core::Result<usize> {
    let layout = cliper_layout();
    let rows = logits.detach().to_vec2::<f32>()?;
    Ok((rows.into_iter().zip(labels))
        .filter(|(row, &y)| ExpressionScores::from_logits(row.clone(), &layout).predicted == y)
        .count())
}

/// Metrics of normalised image (or clip) features [N, E] under a bank of
/// any shape. `labels` are known-class indices (`expressions::known_name`),
/// matched to the bank's classes by name: a class the model lacks is an
/// error naming it.
pub fn evaluate_bank(
    features: &Tensor,
    labels: &[usize],
    bank: &crate::model::cliper::DescriptorBank,
) -> Result<Metrics, TrainError> {
    let truth: Vec<usize> = labels
        .iter()
        .map(|&y| {
            let name = crate::model::cliper::expressions::known_name(y);
            bank.layout.index(name).ok_or_else(|| {
                TrainError::Invalid(format!(
                    "the test set has class `{name}`, which this model does not score (its classes: {}): use a model with that class, or leave the class out",
                    bank.layout.classes().join(", ")
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let scores = crate::model::cliper::scoring::score(features, bank)?;
    Ok(Metrics::from_pairs_over(
        bank.layout.classes().to_vec(),
        truth.into_iter().zip(scores.iter().map(|s| s.predicted)),
    ))
}

/// `cliper eval`: metrics of a model and bank on the test split.
pub fn evaluate(
    spec: &crate::model::setup::ModelSpec,
    data_dir: &Path,
    layout: Layout,
    skip_unreadable: bool,
) -> Result<Metrics, TrainError> {
    let data = dataset::load_test(data_dir, layout)?;
    let loaded = crate::model::setup::load(spec)?;
    if data.clips {
        let f = encode_split(
            &loaded.clip,
            &data.test,
            true,
            skip_unreadable,
            None,
            "",
            "test clips",
        )?;
        let x = f.features.to_device(&loaded.clip.device)?;
        let temporal = match &loaded.cliper {
            Some(ck) => ck
                .temporal_module(loaded.clip.config.embed_dim, &loaded.clip.device)
                .map_err(|e| TrainError::Invalid(e.to_string()))?,
            None => None,
        };
        let feats = match &temporal {
            Some(t) if t.config.flavour.normalised_input() => l2_normalize(&t.forward(&x)?)?,
            Some(t) => l2_normalize(&t.forward(&f.raw_features.to_device(&loaded.clip.device)?)?)?,
            None => {
                log::info!("note: no trained temporal weights; scoring each clip by the mean of its frames' static scores");
                mean_of_frames(&x)?
            }
        };
        return evaluate_bank(&feats, &f.labels, &loaded.bank);
    }
    let f = encode_split(
        &loaded.clip,
        &data.test,
        false,
        skip_unreadable,
        None,
        "",
        "test",
    )?;
    evaluate_bank(
        &f.features.to_device(&loaded.clip.device)?,
        &f.labels,
        &loaded.bank,
    )
}
