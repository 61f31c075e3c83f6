//! Whether a checkpoint fits the run that resumes it: what a resume may not change (the
//! step its name says, the model section, the tokenizer) is an error; what it may (the
//! global batch, the settings `resume_settings` records, the train split's size) is said.

use super::{check_name, Found};
use crate::resume_settings;

/// The run that resumes a checkpoint, as the checkpoint's record is compared with it.
pub struct ResumingRun<'a> {
    /// The model section, as a checkpoint records it (`TrainerState::model_config`).
    pub model_config: &'a serde_json::Value,
    pub tokenizer_hash: &'a str,
    /// Windows per optimizer step, all ranks together.
    pub global_batch: usize,
    /// `resume_settings::of` this run.
    pub settings: &'a serde_json::Value,
    /// Windows of `seq_len` tokens in the train split.
    pub train_windows: u64,
    pub seq_len: usize,
}

/// An error when `found` may not be resumed by `run`.
pub fn check(found: &Found, run: &ResumingRun) -> anyhow::Result<()> {
    let (state, dir) = (&found.state, found.dir.display());
    check_name(&found.dir, state)?;
    if state.model_config != *run.model_config {
        anyhow::bail!(
            "checkpoint {dir} was made by another model config:\n  checkpoint: {}\n  this run:   {}\nuse the same model section, another run_name, or checkpoint.resume: none",
            state.model_config,
            run.model_config
        );
    }
    if state.tokenizer_hash != run.tokenizer_hash {
        anyhow::bail!("checkpoint {dir} was trained with another tokenizer (data or tokenizer config changed); use another run_name");
    }
    Ok(())
}

/// Logs what `run` changes of `found` that a resume may change. Said by the main rank
/// alone: every rank reads the same checkpoint and config.
pub fn log_changes(found: &Found, run: &ResumingRun) {
    let (state, dir) = (&found.state, found.dir.display());
    if state.global_batch != run.global_batch {
        tracing::warn!(
            "checkpoint {dir} was trained with a global batch of {} windows, this run uses {}: data order continues from the same position",
            state.global_batch,
            run.global_batch
        );
    }
    // The seed is recorded in every checkpoint, also in those from before the settings were.
    let mut saved = state.settings.clone().unwrap_or_else(|| serde_json::json!({}));
    if let Some(settings) = saved.as_object_mut() {
        settings.entry("train.seed").or_insert(state.seed.into());
    }
    if let Some(line) = resume_settings::message(&resume_settings::changes(Some(&saved), run.settings)) {
        tracing::info!("{line}");
    }
    if let Some(saved) = state.sampler.windows.filter(|&w| w != run.train_windows) {
        tracing::info!(
            "the train split holds {} windows of train.seq_len {} tokens, {saved} when checkpoint {dir} was saved: the data order continues after the same share of epoch {}",
            run.train_windows,
            run.seq_len,
            state.sampler.epoch
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::state;
    use std::path::PathBuf;

    fn found(dir: &str) -> Found {
        Found { dir: PathBuf::from(dir), state: state(2, None) }
    }

    fn check_with(found: &Found, model_config: serde_json::Value, tokenizer_hash: &str) -> anyhow::Result<()> {
        let settings = serde_json::json!({});
        let run = ResumingRun {
            model_config: &model_config,
            tokenizer_hash,
            global_batch: 4,
            settings: &settings,
            train_windows: 1000,
            seq_len: 32,
        };
        check(found, &run)
    }

    #[test]
    fn another_model_tokenizer_or_step_is_refused_with_the_reason() {
        let same_model = serde_json::json!({"n_layer": 1});
        assert!(check_with(&found("runs/a/checkpoints/step_00000002"), same_model.clone(), "t").is_ok());
        let err = check_with(&found("c/step_00000002"), serde_json::json!({"n_layer": 2}), "t").unwrap_err().to_string();
        assert_eq!(
            err,
            "checkpoint c/step_00000002 was made by another model config:\n  checkpoint: {\"n_layer\":1}\n  this run:   {\"n_layer\":2}\nuse the same model section, another run_name, or checkpoint.resume: none"
        );
        let err = check_with(&found("c/step_00000002"), same_model.clone(), "u").unwrap_err().to_string();
        assert!(err.starts_with("checkpoint c/step_00000002 was trained with another tokenizer"), "{err}");
        let err = check_with(&found("c/step_00000009"), same_model, "t").unwrap_err().to_string();
        assert!(err.contains("is named for step 9 but its trainer.json holds step 2"), "{err}");
    }
}
