//! This host's CPU as the precision rule sees it: its model name, its bf16 features and
//! what `train.precision` resolves to on it. `info` prints it, so a log (CI's above all)
//! says which machine its figures came from.

use crate::config::Precision;
use crate::model::precision::{cpu_bf16_features, resolve_on, ComputePrecision, Hardware};
use serde_json::{json, Value};

/// The CPU and the precision a run on it would use.
pub struct CpuPrecision {
    /// /proc/cpuinfo's "model name" ("unknown" where it has none).
    pub model: String,
    /// amx_bf16, avx512_bf16: those of them the CPU has.
    pub bf16_features: Vec<&'static str>,
    pub wanted: Precision,
    pub resolved: ComputePrecision,
}

/// `wanted` resolved on this host's CPU (never a GPU's: `info` starts no device).
pub fn on_this_cpu(wanted: Precision) -> CpuPrecision {
    let bf16_features = cpu_bf16_features();
    let resolved = resolve_on(wanted, &Hardware::Cpu { bf16_features: bf16_features.clone() });
    CpuPrecision { model: model_name(), bf16_features, wanted, resolved }
}

fn model_name() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

fn wanted_name(p: Precision) -> &'static str {
    match p {
        Precision::Auto => "auto",
        Precision::Bf16 => "bf16",
        Precision::Fp32 => "fp32",
    }
}

impl CpuPrecision {
    /// Two lines: "cpu: MODEL (bf16 features: ...)" and "precision on this CPU: auto -> fp32 (why)".
    pub fn text(&self) -> String {
        let features = if self.bf16_features.is_empty() { "none".to_string() } else { self.bf16_features.join(", ") };
        format!(
            "cpu: {} (bf16 features: {features})\nprecision on this CPU: {} -> {} ({})\n",
            self.model,
            wanted_name(self.wanted),
            self.resolved.name(),
            self.resolved.reason
        )
    }

    pub fn json(&self) -> Value {
        json!({
            "model": self.model,
            "bf16_features": self.bf16_features,
            "precision": wanted_name(self.wanted),
            "resolves_to": self.resolved.name(),
            "reason": self.resolved.reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_precisions_resolve_to_themselves_and_the_text_names_both() {
        let fp32 = on_this_cpu(Precision::Fp32);
        assert_eq!(fp32.resolved.name(), "fp32");
        assert!(fp32.text().contains("precision on this CPU: fp32 -> fp32"), "{}", fp32.text());
        let bf16 = on_this_cpu(Precision::Bf16);
        assert_eq!(bf16.json()["resolves_to"], "bf16");
        let auto = on_this_cpu(Precision::Auto);
        assert!(auto.text().starts_with("cpu: "), "{}", auto.text());
        assert_eq!(auto.json()["precision"], "auto");
    }
}
