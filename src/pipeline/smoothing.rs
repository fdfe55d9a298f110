//! Exponential smoothing of displayed scores, per face track.
//!
//! Smoothing runs on the 35 descriptor logits, and class scores and
//! probabilities are recomputed from them, so a smoothed result is still a
//! consistent CLIPER result (class score = mean of its logits, probabilities
//! = softmax of class scores).

use crate::model::cliper::ExpressionScores;

/// The largest smoothing factor offered: above it the display lags by
/// seconds at typical inference rates.
pub const MAX_SMOOTHING: f32 = 0.95;

/// `previous * a + new * (1 - a)` on the logits; `a = 0` returns `new`.
pub fn ema(previous: &ExpressionScores, new: &ExpressionScores, a: f32) -> ExpressionScores {
    let a = a.clamp(0.0, MAX_SMOOTHING);
    if a == 0.0 || previous.layout != new.layout {
        return new.clone();
    }
    let logits = previous
        .logits
        .iter()
        .zip(&new.logits)
        .map(|(p, n)| p * a + n * (1.0 - a))
        .collect();
    ExpressionScores::from_logits(logits, &new.layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_moves_part_way_and_zero_is_off() {
        let layout = std::sync::Arc::new(crate::model::cliper::expressions::BankLayout::cliper());
        let a = ExpressionScores::from_logits(vec![0.0; 35], &layout);
        let mut l = vec![0.0; 35];
        l[15..20].iter_mut().for_each(|x| *x = 10.0);
        let b = ExpressionScores::from_logits(l, &layout);
        assert_eq!(ema(&a, &b, 0.0), b);
        let m = ema(&a, &b, 0.75);
        assert!((m.class_scores[3] - 2.5).abs() < 1e-5);
        assert_eq!(m.predicted, 3);
        assert!((m.probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}
