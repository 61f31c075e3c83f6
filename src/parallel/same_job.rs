//! Ranks launched with different settings (an MPMD `mpirun -n 1 … : -n 1 …`, a config
//! file per host, one stale `--set` in a hostfile script) must not train: the
//! collectives' shapes and order follow the settings, so a difference gives silent wrong
//! training, a hang or a corrupted heap. Before such collectives the ranks agree on what
//! must be equal, as named facts ("model.n_layer" = "2").
//!
//! The check is one all-gather of a 32-byte digest, the same size on every rank whatever
//! the facts, so it cannot corrupt anything itself. Only when the digests differ do the
//! ranks exchange the facts themselves (their lengths first, so that every buffer is
//! sized from agreed numbers), and every rank reaches the same verdict: the first fact
//! that differs, with each rank's value.

use super::World;
use sha2::{Digest, Sha256};

/// Facts that must be equal on every rank, in a fixed order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    entries: Vec<(String, String)>,
}

impl Facts {
    pub fn add(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.entries.push((key.into(), value.into()));
    }

    fn digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for (key, value) in &self.entries {
            // Lengths first: no two lists of facts hash the same text.
            hasher.update((key.len() as u64).to_le_bytes());
            hasher.update(key.as_bytes());
            hasher.update((value.len() as u64).to_le_bytes());
            hasher.update(value.as_bytes());
        }
        hasher.finalize().into()
    }

    fn to_text(&self) -> String {
        serde_json::to_string(&self.entries).expect("strings serialize")
    }

    fn from_text(text: &str) -> Facts {
        Facts { entries: serde_json::from_str(text).unwrap_or_default() }
    }

    /// The value of fact `key`, if there is one.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Ranks that do not run the same job: every rank ends with this same error, exit code 2
/// (nothing was started), without aborting the others (they all know).
#[derive(Debug, thiserror::Error)]
#[error("the ranks were launched with different settings ({what}): {detail}; launch every rank with the same config, --set flags, data and binary")]
pub struct RanksDisagree {
    what: &'static str,
    detail: String,
}

/// Checks that every rank of `world` holds the same `facts` (`what` names them in the
/// error). A collective: every rank calls it at the same point.
pub fn agree(world: &World, what: &'static str, facts: &Facts) -> Result<(), RanksDisagree> {
    if world.size() == 1 || crate::faults::unchecked_ranks() {
        return Ok(());
    }
    let digests = world.all_gather(&facts.digest());
    if digests.chunks(32).all(|d| d == &digests[..32]) {
        return Ok(());
    }
    let all: Vec<Facts> = world.all_gather_text(&facts.to_text()).iter().map(|t| Facts::from_text(t)).collect();
    Err(RanksDisagree { what, detail: first_difference(&all) })
}

/// The most ranks the message lists one by one.
const MAX_LISTED: usize = 8;

/// The first fact (in rank 0's order, then the others') on which the ranks differ, with
/// each rank's value, and how many more differ.
fn first_difference(all: &[Facts]) -> String {
    let mut keys: Vec<&str> = Vec::new();
    for facts in all {
        for (key, _) in &facts.entries {
            if !keys.contains(&key.as_str()) {
                keys.push(key);
            }
        }
    }
    let differing: Vec<&str> = keys.into_iter().filter(|k| all.iter().any(|f| f.get(k) != all[0].get(k))).collect();
    let Some(first) = differing.first() else {
        return "the same facts in another order (different binaries?)".to_string();
    };
    let mut values: Vec<String> = all
        .iter()
        .enumerate()
        .take(MAX_LISTED)
        .map(|(rank, f)| format!("rank {rank} has {}", f.get(first).map_or("nothing".to_string(), shown)))
        .collect();
    if all.len() > MAX_LISTED {
        values.push(format!("… ({} ranks)", all.len()));
    }
    let mut text = format!("{first}: {}", values.join(", "));
    if differing.len() > 1 {
        let more: Vec<&str> = differing[1..].iter().take(6).copied().collect();
        let etc = if differing.len() > 7 { ", …" } else { "" };
        text.push_str(&format!(" (and {} more: {}{etc})", differing.len() - 1, more.join(", ")));
    }
    text
}

/// A value as the message shows it: as is, unless it is empty or long.
fn shown(value: &str) -> String {
    if value.is_empty() {
        "\"\"".to_string()
    } else if value.chars().count() > 80 {
        format!("{}…", value.chars().take(80).collect::<String>())
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(pairs: &[(&str, &str)]) -> Facts {
        let mut f = Facts::default();
        for (k, v) in pairs {
            f.add(*k, *v);
        }
        f
    }

    #[test]
    fn the_first_differing_fact_is_named_with_every_ranks_value() {
        let a = facts(&[("model.n_layer", "2"), ("optim.lr", "0.001"), ("train.seed", "1")]);
        let b = facts(&[("model.n_layer", "4"), ("optim.lr", "0.001"), ("train.seed", "2")]);
        assert_ne!(a.digest(), b.digest());
        assert_eq!(first_difference(&[a.clone(), b]), "model.n_layer: rank 0 has 2, rank 1 has 4 (and 1 more: train.seed)");
        assert_eq!(a.digest(), a.clone().digest());
        let missing = facts(&[("model.n_layer", "2"), ("optim.lr", "0.001")]);
        assert_eq!(first_difference(&[missing, a]), "train.seed: rank 0 has nothing, rank 1 has 1");
    }

    #[test]
    fn the_digest_tells_where_one_fact_ends() {
        assert_ne!(facts(&[("ab", "c")]).digest(), facts(&[("a", "bc")]).digest());
        let round = facts(&[("k", "v \"quoted\"\n")]);
        assert_eq!(Facts::from_text(&round.to_text()), round);
    }
}
