//! What the ranks of one training must hold equal (src/parallel/same_job.rs compares them):
//! first the settings, before any collective whose shape or order they decide; then the
//! data and the checkpoint, once each rank has opened them.

use crate::checkpoint::Found;
use crate::config::Config;
use crate::data::cache::Prepared;
use crate::parallel::same_job::Facts;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Config keys that may differ between ranks, each because it says where this rank finds
/// something, not what it is: what the files hold is compared instead (the token cache's
/// and the tokenizer's hashes, the checkpoint's), and only rank 0 writes the run.
/// - `out_dir`, `run_name`: where the run is (a config file per host names it after its
///   own file); rank 0 alone writes there, and the checkpoint every rank resumes from it
///   is compared;
/// - `data.train`, `data.valid`, `data.test`, `data.cache_dir`, `tokenizer.path`: where
///   this host keeps the text, the cache and the tokenizer; the cache's content and the
///   tokenizer are compared;
/// - `checkpoint.resume`: a path on this host, or `auto`; the checkpoint it gives is
///   compared.
pub const PER_RANK_KEYS: [&str; 8] =
    ["out_dir", "run_name", "data.train", "data.valid", "data.test", "data.cache_dir", "tokenizer.path", "checkpoint.resume"];

/// The resolved config (every key but [`PER_RANK_KEYS`]), what rank `rank` resolved from
/// it (device kind, precision), and the build: the binary and the libtorch it loaded.
pub fn settings(cfg: &Config, device: tch::Device, rank: usize) -> Facts {
    let mut facts = Facts::default();
    let mut flat = Vec::new();
    flatten("", &serde_json::to_value(cfg).expect("the config serializes"), &mut flat);
    for (key, value) in flat.into_iter().filter(|(k, _)| !PER_RANK_KEYS.contains(&k.as_str())) {
        facts.add(key, value);
    }
    let kind = if device == tch::Device::Cpu { "cpu" } else { "cuda" };
    facts.add("device in use", kind);
    facts.add("train.precision in use", crate::model::precision::resolve(cfg.train.precision, device).name());
    let build = if crate::faults::other_build(rank) {
        OTHER_BUILD.to_string()
    } else {
        format!("{} (commit {})", env!("CARGO_PKG_VERSION"), env!("ALGPT2_GIT_REVISION"))
    };
    facts.add("algpt2-ddp build", build);
    let libtorch = crate::versions::libtorch_dir().map_or_else(|| "unknown".to_string(), |d| algpt2_launch::read_version(&d));
    facts.add("libtorch", libtorch);
    facts
}

/// The build a rank reports under `ALGPT2_FAULT=other_build@0:R` (src/faults.rs).
const OTHER_BUILD: &str = "0.0.0-other (commit 0000000)";

/// The token cache's content (each split's tokens and chunk checksums), the tokenizer,
/// and the checkpoint this rank resumes from (its step and trainer.json's hash), or none.
pub fn data_and_checkpoint(data: &Prepared, resumed: Option<&Found>) -> anyhow::Result<Facts> {
    let mut facts = Facts::default();
    let mut cache = Sha256::new();
    for (name, split) in &data.splits {
        cache.update(name.as_bytes());
        cache.update(split.stats.tokens.to_le_bytes());
        for crc in &split.stats.chunk_crc32 {
            cache.update(crc.to_le_bytes());
        }
    }
    facts.add("token cache (content)", hex::encode(cache.finalize()));
    facts.add("tokenizer (hash)", data.tokenizer.hash_hex());
    let checkpoint = match resumed {
        None => "none (a new run)".to_string(),
        Some(found) => {
            let state = found.dir.join(crate::checkpoint::TRAINER_FILE);
            let bytes = std::fs::read(&state).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", state.display()))?;
            format!("step {} (trainer.json sha256 {})", found.state.step, &hex::encode(Sha256::digest(&bytes))[..16])
        }
    };
    facts.add("checkpoint resumed", checkpoint);
    Ok(facts)
}

/// `value` as dotted keys and their values (strings bare, anything else as JSON).
fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                let key = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                flatten(&key, v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_keys_flatten_to_their_dotted_names() {
        let mut out = Vec::new();
        flatten("", &serde_json::json!({"model": {"n_layer": 2, "share_layers": true}, "run_name": "r", "tags": ["a"]}), &mut out);
        let keys: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["model.n_layer", "model.share_layers", "run_name", "tags"]);
        assert_eq!(out[0].1, "2");
        assert_eq!(out[2].1, "r");
    }

    #[test]
    fn the_settings_carry_the_build_and_the_libtorch_loaded() {
        let cfg = crate::config::parse("model:\n  n_layer: 2\n", "t.yaml", &[]).unwrap();
        let facts = settings(&cfg, tch::Device::Cpu, 0);
        let build = facts.get("algpt2-ddp build").expect("the build is a fact");
        assert_eq!(build, format!("{} (commit {})", env!("CARGO_PKG_VERSION"), env!("ALGPT2_GIT_REVISION")));
        assert_ne!(build, OTHER_BUILD);
        // The test process has libtorch loaded, as training has: its version is known.
        let libtorch = facts.get("libtorch").expect("libtorch is a fact");
        assert!(!libtorch.is_empty() && libtorch != "unknown", "libtorch: {libtorch}");
        assert_eq!(facts.get("model.n_layer"), Some("2"));
        for key in PER_RANK_KEYS {
            assert_eq!(facts.get(key), None, "{key} is per rank");
        }
    }
}
