//! The settings a resume may legitimately change (the optimizer section, the run length,
//! the seed, the sequence length, the precision), recorded in each checkpoint so that a
//! resumed run says what it changed: a new learning rate or a longer run is a decision,
//! but an unnoticed one reads later as a bug in the loss curve. The model section is not
//! among them: resume refuses another one.

use crate::config::Config;
use crate::model::precision::ComputePrecision;
use serde_json::{Map, Value};

/// This run's values of those settings, as dotted key → value. `precision` is what
/// `train.precision` resolved to on this run's device (`auto` is bf16 on one machine
/// and fp32 on another), recorded as `precision`.
pub fn of(cfg: &Config, precision: &ComputePrecision) -> Value {
    let mut out = Map::new();
    if let Ok(Value::Object(optim)) = serde_json::to_value(&cfg.optim) {
        for (key, value) in optim {
            out.insert(format!("optim.{key}"), value);
        }
    }
    let t = &cfg.train;
    out.insert("train.max_steps".into(), t.max_steps.into());
    // The seed orders the data and draws dropout: another one continues on other batches.
    out.insert("train.seed".into(), t.seed.into());
    // The sampler continues after the same share of its epoch (`Sampler::restore`).
    out.insert("train.seq_len".into(), t.seq_len.into());
    out.insert("train.precision".into(), serde_json::to_value(t.precision).unwrap_or(Value::Null));
    out.insert("precision".into(), precision.name().into());
    Value::Object(out)
}

/// `key old -> new` for each setting recorded in `saved` whose value `now` differs. A
/// checkpoint from before these were recorded (or a setting it lacks) reports nothing:
/// unknown is not changed.
pub fn changes(saved: Option<&Value>, now: &Value) -> Vec<String> {
    let (Some(Value::Object(saved)), Value::Object(now)) = (saved, now) else { return Vec::new() };
    now.iter()
        .filter_map(|(key, new)| {
            let old = saved.get(key)?;
            (!same(old, new)).then(|| format!("{key} {} -> {}", shown(old), shown(new)))
        })
        .collect()
}

/// The one line a resume logs, when anything changed.
pub fn message(changes: &[String]) -> Option<String> {
    (!changes.is_empty()).then(|| format!("resuming with changed settings: {}", changes.join(", ")))
}

/// Equal values; numbers within rounding, since a float read back from JSON text may
/// differ from the one written in its last bit.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_u64(), y.as_u64(), x.as_f64(), y.as_f64()) {
            (Some(x), Some(y), ..) => x == y,
            (_, _, Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
            _ => false,
        },
        _ => a == b,
    }
}

fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp32() -> ComputePrecision {
        ComputePrecision { bf16: false, reason: "test".into() }
    }

    #[test]
    fn changed_optimizer_and_run_length_are_named_once_each() {
        let mut cfg = Config::default();
        cfg.optim.lr = 6e-4;
        cfg.train.max_steps = 300;
        let saved = serde_json::from_str::<Value>(&of(&cfg, &fp32()).to_string()).unwrap();
        assert!(changes(Some(&saved), &of(&cfg, &fp32())).is_empty(), "a JSON round trip is no change");
        cfg.optim.lr = 3e-4;
        cfg.train.max_steps = 600;
        let c = changes(Some(&saved), &of(&cfg, &fp32()));
        assert_eq!(c, vec!["optim.lr 0.0006 -> 0.0003", "train.max_steps 300 -> 600"]);
        assert_eq!(message(&c).unwrap(), "resuming with changed settings: optim.lr 0.0006 -> 0.0003, train.max_steps 300 -> 600");
    }

    #[test]
    fn changed_seed_sequence_length_and_precision_are_named() {
        let mut cfg = Config::default();
        (cfg.train.seed, cfg.train.seq_len, cfg.train.precision) = (1, 32, crate::config::Precision::Auto);
        let saved = of(&cfg, &ComputePrecision { bf16: true, reason: "test".into() });
        (cfg.train.seed, cfg.train.seq_len, cfg.train.precision) = (2, 16, crate::config::Precision::Fp32);
        let c = changes(Some(&saved), &of(&cfg, &fp32()));
        assert_eq!(c, vec!["precision bf16 -> fp32", "train.precision auto -> fp32", "train.seed 1 -> 2", "train.seq_len 32 -> 16"]);
    }

    #[test]
    fn old_or_edited_records_report_nothing_or_what_differs() {
        let now = of(&Config::default(), &fp32());
        assert!(changes(None, &now).is_empty());
        assert!(changes(Some(&serde_json::json!(3)), &now).is_empty());
        assert!(changes(Some(&serde_json::json!({"optim.made_up": 1})), &now).is_empty());
        let c = changes(Some(&serde_json::json!({"optim.lr": "x", "train.max_steps": null})), &now);
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(message(&[]).is_none());
    }
}
