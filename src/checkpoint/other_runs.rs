//! Which checkpoints are another run's, and the warning that names each of them once:
//! retention leaves them and resume never picks them but by path, so without a word they
//! would sit there unexplained (they were once skipped silently and then deleted by
//! rotation).

use super::{Found, TrainerState};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::PathBuf;

/// What a checkpoint shares with the run that made it: the run id, and what a resume
/// may not change (the model section, the tokenizer).
pub struct RunIdentity {
    pub run_id: String,
    pub model_config: serde_json::Value,
    pub tokenizer_hash: String,
}

impl TrainerState {
    /// Why this checkpoint is another run's than `ours`, or None when it may be this
    /// run's own (one without a run id, of the same model and tokenizer, may be).
    pub fn other_run(&self, ours: &RunIdentity) -> Option<String> {
        match &self.run_id {
            Some(id) if *id != ours.run_id => Some(format!("run id {id}, this run's is {}", ours.run_id)),
            _ if self.model_config != ours.model_config => Some("another model config".to_string()),
            _ if self.tokenizer_hash != ours.tokenizer_hash => Some("another tokenizer".to_string()),
            _ => None,
        }
    }
}

/// The other runs' checkpoints already named, so that each is named once per run.
#[derive(Default)]
pub struct OtherRunsNamed {
    dirs: RefCell<BTreeSet<PathBuf>>,
}

impl OtherRunsNamed {
    /// Warns about each of `found` that belongs to another run than `ours`, unless it was
    /// named before.
    pub fn warn(&self, found: &[Found], ours: &RunIdentity) {
        let mut named = self.dirs.borrow_mut();
        for f in found {
            if let Some(why) = f.state.other_run(ours) {
                if named.insert(f.dir.clone()) {
                    tracing::warn!(
                        "checkpoint {} (step {}) belongs to another run ({why}): this run neither resumes nor deletes it; move it out of this run's checkpoints",
                        f.dir.display(),
                        f.state.step
                    );
                }
            }
        }
    }
}
