//! Learning rate at each step: linear warmup, then cosine, linear or constant.

use crate::config::{OptimConfig, Schedule};

/// The learning rate for optimizer step `step` (0-based) of a run of `max_steps`.
/// Warmup climbs to `lr` over `warmup_steps` steps (the first step already takes
/// lr/warmup_steps, never 0); decay then reaches `min_lr` at the last step.
pub fn learning_rate(o: &OptimConfig, step: u64, max_steps: u64) -> f64 {
    if step < o.warmup_steps {
        return o.lr * (step + 1) as f64 / o.warmup_steps as f64;
    }
    let decay_steps = max_steps.saturating_sub(o.warmup_steps).saturating_sub(1).max(1);
    let progress = ((step - o.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    match o.schedule {
        Schedule::Constant => o.lr,
        Schedule::Linear => o.lr - progress * (o.lr - o.min_lr),
        Schedule::Cosine => o.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (o.lr - o.min_lr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(schedule: Schedule) -> OptimConfig {
        OptimConfig { lr: 1.0, min_lr: 0.1, warmup_steps: 10, schedule, ..OptimConfig::default() }
    }

    #[test]
    fn warmup_then_each_decay_shape() {
        for schedule in [Schedule::Cosine, Schedule::Linear, Schedule::Constant] {
            let o = cfg(schedule);
            assert!((learning_rate(&o, 0, 110) - 0.1).abs() < 1e-12);
            assert!((learning_rate(&o, 9, 110) - 1.0).abs() < 1e-12);
            assert!((learning_rate(&o, 10, 110) - 1.0).abs() < 1e-12);
            let last = learning_rate(&o, 109, 110);
            let expected_last = if schedule == Schedule::Constant { 1.0 } else { 0.1 };
            assert!((last - expected_last).abs() < 1e-12, "{schedule:?} {last}");
        }
        // Midway: cosine and linear agree at the middle of the decay.
        let mid_c = learning_rate(&cfg(Schedule::Cosine), 10 + 99 / 2, 110);
        let mid_l = learning_rate(&cfg(Schedule::Linear), 10 + 99 / 2, 110);
        assert!((mid_c - 0.55).abs() < 0.02 && (mid_l - 0.55).abs() < 0.01, "{mid_c} {mid_l}");
    }

    #[test]
    fn no_warmup_starts_at_peak() {
        let o = OptimConfig { warmup_steps: 0, ..cfg(Schedule::Linear) };
        assert_eq!(learning_rate(&o, 0, 100), 1.0);
    }
}
