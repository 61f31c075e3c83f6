//! Checkpoints: `checkpoints/step_00001000/` holding the model (`model.safetensors`,
//! named tensors), the optimizer (`optimizer.safetensors`, flat moments) and the trainer
//! state (`trainer.json`: step, sampler position, hashes, metrics so far, and the
//! checksum of every file beside it).
//!
//! A checkpoint is written under a temporary name, every file fsynced, then renamed into
//! place and the directory fsynced: a crash or kill at any moment leaves either the old
//! set of checkpoints or the new one, never a half-written directory that looks valid.
//! Resume only trusts a directory whose files match the checksums in its trainer.json.

pub mod compat;
pub mod other_runs;

pub use other_runs::RunIdentity;

use crate::data::batches::SamplerState;
use crate::data::tokenizer::TextTokenizer;
use crate::run_dir::{checkpoint_dir_name as dir_name, sha256_file};
use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const TRAINER_FILE: &str = "trainer.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The sha256 of trainer.json itself, which holds the other files' checksums: every file
/// of a checkpoint is covered, so an edited trainer.json is caught like a damaged tensor.
pub const TRAINER_CHECKSUM_FILE: &str = "trainer.json.sha256";
/// Format 2 adds [`TRAINER_CHECKSUM_FILE`]; format 1 checkpoints (without it) still load.
const FORMAT_VERSION: u32 = 2;

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Where the sampler stands after `step` steps (global, not per rank).
    pub sampler: SamplerState,
    /// Windows per optimizer step when saved (micro × accum × world).
    pub global_batch: usize,
    pub world_size: usize,
    /// Seed of the run: dropout is reseeded from (seed, step, micro-step, rank), so no
    /// generator state needs saving.
    pub seed: u64,
    /// The model section of the config that made the weights; resume refuses another.
    pub model_config: serde_json::Value,
    /// sha256 of the resolved config and of the tokenizer.
    pub config_hash: String,
    /// The optimizer settings and `train.max_steps` (dotted key → value), which a resume
    /// may change and then names (`resume_settings`). Absent before they were recorded.
    #[serde(default)]
    pub settings: Option<serde_json::Value>,
    pub tokenizer_hash: String,
    /// W&B run id, so a resumed run continues the same W&B run.
    pub wandb_run_id: Option<String>,
    /// The run this checkpoint belongs to: drawn when a run starts from scratch, kept by
    /// every resume. Retention never deletes another run's checkpoint (`retain`). Absent
    /// before it was recorded: such a checkpoint is told apart only by its model and
    /// tokenizer.
    #[serde(default)]
    pub run_id: Option<String>,
    /// Validation loss at this checkpoint, when evaluated at its step.
    pub val_loss: Option<f64>,
    /// Best validation loss seen up to this step.
    pub best_val_loss: Option<f64>,
    /// Tokens trained on so far (all ranks).
    pub tokens_seen: u64,
    /// sha256 of each tensor file in the directory.
    pub checksums: BTreeMap<String, String>,
}

/// What components other than the trainer keep in a checkpoint's trainer.json: the W&B
/// run (so that a resumed run continues it) and the validation losses (retention keeps
/// the best checkpoint).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoopState {
    pub wandb_run_id: Option<String>,
    pub val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
}

/// A checkpoint directory found on disk, with its trainer state.
#[derive(Debug, Clone)]
pub struct Found {
    pub dir: PathBuf,
    pub state: TrainerState,
}

/// The step a checkpoint directory's name gives (`step_00000010` → 10), if it has one.
fn step_in_name(dir: &Path) -> Option<u64> {
    let digits = dir.file_name()?.to_str()?.strip_prefix("step_")?;
    digits.bytes().all(|b| b.is_ascii_digit()).then(|| digits.parse().ok()).flatten()
}

/// An error when `dir` is named for another step than the one its trainer.json holds
/// (renamed, or its files copied from another checkpoint): the name is what a person,
/// retention and `checkpoint.resume` go by, and resuming it would continue (and cut
/// metrics.jsonl back to) another step than the name says.
pub fn check_name(dir: &Path, state: &TrainerState) -> anyhow::Result<()> {
    match step_in_name(dir) {
        Some(named) if named != state.step => bail!(
            "{} is named for step {named} but its {TRAINER_FILE} holds step {} (renamed, or copied from another checkpoint): rename it to {} to resume from it",
            dir.display(),
            state.step,
            dir_name(state.step)
        ),
        _ => Ok(()),
    }
}

fn fsync_path(path: &Path) -> anyhow::Result<()> {
    File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", path.display()))
}

/// Writes a checkpoint for `state.step` into `root` and returns its directory. On an
/// error (a full disk, say) the half-written directory is removed again, so that it
/// neither holds the space nor waits for the next start to be cleaned up; the existing
/// checkpoints are never touched before the new one is complete.
pub fn save(root: &Path, model: &[(String, Tensor)], optimizer: &[(String, Tensor)], state: TrainerState) -> anyhow::Result<PathBuf> {
    let step = state.step;
    let tmp_dir = root.join(format!(".tmp-{}", dir_name(step)));
    save_via(root, &tmp_dir, model, optimizer, state).map_err(|e| {
        if tmp_dir.exists() {
            if let Err(cleanup) = std::fs::remove_dir_all(&tmp_dir) {
                tracing::warn!("could not remove the half-written {}: {cleanup}", tmp_dir.display());
            }
        }
        e.context(format!("cannot save the checkpoint of step {step} in {}", root.display()))
    })
}

fn save_via(
    root: &Path,
    tmp_dir: &Path,
    model: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    mut state: TrainerState,
) -> anyhow::Result<PathBuf> {
    let final_dir = root.join(dir_name(state.step));
    if tmp_dir.exists() {
        std::fs::remove_dir_all(tmp_dir).with_context(|| format!("cannot clear {}", tmp_dir.display()))?;
    }
    std::fs::create_dir_all(tmp_dir).with_context(|| format!("cannot create {}", tmp_dir.display()))?;
    for (file, tensors) in [(MODEL_FILE, model), (OPTIMIZER_FILE, optimizer)] {
        let path = tmp_dir.join(file);
        Tensor::write_safetensors(tensors, &path).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
        crate::faults::disk_full_in_save(&path, state.step)?;
        fsync_path(&path)?;
        state.checksums.insert(file.to_string(), sha256_file(&path)?);
    }
    crate::faults::kill_in_save("tensors", state.step);
    crate::faults::slow_save(state.step);
    state.format_version = FORMAT_VERSION;
    let trainer_json = serde_json::to_string_pretty(&state)?;
    crate::run_dir::write_atomic(&tmp_dir.join(TRAINER_FILE), trainer_json.as_bytes())?;
    let digest = hex::encode(Sha256::digest(trainer_json.as_bytes()));
    crate::run_dir::write_atomic(&tmp_dir.join(TRAINER_CHECKSUM_FILE), format!("{digest}  {TRAINER_FILE}\n").as_bytes())?;
    fsync_path(tmp_dir)?;
    crate::faults::kill_in_save("state", state.step);
    if final_dir.exists() {
        // The same step saved again (e.g. the final save right after a periodic one).
        std::fs::remove_dir_all(&final_dir).with_context(|| format!("cannot replace {}", final_dir.display()))?;
    }
    std::fs::rename(tmp_dir, &final_dir).with_context(|| format!("cannot rename {} to {}", tmp_dir.display(), final_dir.display()))?;
    crate::faults::kill_in_save("renamed", state.step);
    fsync_path(root)?;
    Ok(final_dir)
}

/// Removes checkpoints a crash left half-written (`.tmp-step_…`, never valid); returns
/// how many. Called by rank 0 before training starts.
pub fn clean_partial(root: &Path) -> anyhow::Result<usize> {
    let Ok(entries) = std::fs::read_dir(root) else { return Ok(0) };
    let mut removed = 0;
    for dir in entries.filter_map(Result::ok).map(|e| e.path()) {
        if dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".tmp-step_")) {
            tracing::warn!("removing {}: a checkpoint left half-written by an interrupted save", dir.display());
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Reads and verifies a checkpoint directory: trainer.json parses and every file matches
/// its checksum.
pub fn verify(dir: &Path) -> anyhow::Result<TrainerState> {
    let path = dir.join(TRAINER_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("{} is not a checkpoint: cannot read {TRAINER_FILE}", dir.display()))?;
    let recorded = std::fs::read_to_string(dir.join(TRAINER_CHECKSUM_FILE)).ok();
    if let Some(recorded) = &recorded {
        let expected = recorded.split_whitespace().next().unwrap_or("");
        if hex::encode(Sha256::digest(&bytes)) != expected {
            bail!("{}: {TRAINER_FILE} does not match its checksum in {TRAINER_CHECKSUM_FILE} (edited or damaged)", dir.display());
        }
    }
    let state: TrainerState = serde_json::from_slice(&bytes).with_context(|| format!("{} is damaged", path.display()))?;
    match (state.format_version, &recorded) {
        (FORMAT_VERSION, Some(_)) | (1, _) => {}
        (FORMAT_VERSION, None) => bail!("{}: {TRAINER_CHECKSUM_FILE} is missing (damaged or partly copied)", dir.display()),
        (other, _) => bail!("{}: checkpoint format {other} (this build reads 1 and {FORMAT_VERSION})", dir.display()),
    }
    for file in [MODEL_FILE, OPTIMIZER_FILE] {
        let expected = state.checksums.get(file).ok_or_else(|| anyhow!("{}: no checksum for {file}", dir.display()))?;
        let actual = sha256_file(&dir.join(file))?;
        if &actual != expected {
            bail!("{}: {file} does not match its checksum (damaged or partly written)", dir.display());
        }
    }
    Ok(state)
}

/// Every complete, verified checkpoint under `root`, oldest first. Damaged ones, and
/// ones named for another step than they hold, are skipped with a warning (they are
/// never deleted: a person may want to look at them).
pub fn list_valid(root: &Path) -> Vec<Found> {
    let (found, skipped) = scan(root);
    for e in skipped {
        tracing::warn!("skipping checkpoint: {e:#}");
    }
    found
}

/// `list_valid` without the warnings: the checkpoints, and why each other `step_*`
/// directory is not one.
pub fn scan(root: &Path) -> (Vec<Found>, Vec<anyhow::Error>) {
    let Ok(entries) = std::fs::read_dir(root) else { return (Vec::new(), Vec::new()) };
    let (mut found, mut skipped) = (Vec::new(), Vec::new());
    for dir in entries.filter_map(Result::ok).map(|e| e.path()) {
        if !dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step_")) {
            continue;
        }
        match verify(&dir).and_then(|state| check_name(&dir, &state).map(|()| state)) {
            Ok(state) => found.push(Found { dir, state }),
            Err(e) => skipped.push(e),
        }
    }
    found.sort_by_key(|f: &Found| f.state.step);
    (found, skipped)
}

/// Deletes this run's checkpoints beyond the `keep_last` newest, sparing the best by val
/// loss. Another run's checkpoints (`TrainerState::other_run`) are never deleted, nor
/// counted: they are returned, for the caller to name. What is not a valid checkpoint is
/// left alone without a word at every save: the start of the run named it.
pub fn retain(root: &Path, keep_last: usize, ours: &RunIdentity) -> anyhow::Result<Vec<Found>> {
    let (own, others): (Vec<Found>, Vec<Found>) = scan(root).0.into_iter().partition(|f| f.state.other_run(ours).is_none());
    let best =
        own.iter().filter_map(|f| f.state.val_loss.map(|l| (l, f.state.step))).min_by(|a, b| a.0.total_cmp(&b.0)).map(|(_, step)| step);
    let newest_kept = own.len().saturating_sub(keep_last);
    for (i, f) in own.iter().enumerate() {
        if i < newest_kept && Some(f.state.step) != best {
            std::fs::remove_dir_all(&f.dir).with_context(|| format!("cannot delete old checkpoint {}", f.dir.display()))?;
        }
    }
    Ok(others)
}

/// The tokenizer `dir` was trained with: `chosen` (`--tokenizer`) or else its run's
/// `tokenizer.json`, and its path; either must have the hash the checkpoint records, so
/// a replaced or missing file is an error rather than text in another vocabulary.
pub fn tokenizer_of(dir: &Path, state: &TrainerState, chosen: Option<&Path>) -> anyhow::Result<(TextTokenizer, PathBuf)> {
    let recorded = &state.tokenizer_hash;
    let short = &recorded[..recorded.len().min(12)];
    let path = match chosen {
        Some(path) => path.to_path_buf(),
        None => {
            let run = crate::run_dir::RunDir::of_checkpoint(dir)
                .ok_or_else(|| anyhow!("{} is not inside a run directory: pass --tokenizer PATH", dir.display()))?;
            let path = run.tokenizer();
            if !path.is_file() {
                bail!(
                    "{} is missing: checkpoint {} needs the tokenizer it was trained with (sha256 {short}…); pass --tokenizer PATH, e.g. the tokenizer.json of the run's token cache under data.cache_dir",
                    path.display(),
                    dir.display()
                );
            }
            path
        }
    };
    let tokenizer = TextTokenizer::load(&path).with_context(|| format!("the tokenizer of checkpoint {}", dir.display()))?;
    if &tokenizer.hash_hex() != recorded {
        bail!(
            "{} is not the tokenizer checkpoint {} was trained with (sha256 {}…, the checkpoint records {short}…): pass --tokenizer PATH with the right one (the run's token cache under data.cache_dir holds it)",
            path.display(),
            dir.display(),
            &tokenizer.hash_hex()[..12]
        );
    }
    Ok((tokenizer, path))
}

/// A model built from a checkpoint's weights, for evaluation, generation and export.
pub struct LoadedModel {
    // The variables live in the store; it must outlive the model that uses them.
    _vs: tch::nn::VarStore,
    pub model: crate::model::Algpt2,
}

/// The model config a verified checkpoint records, checked before anything is allocated:
/// the config's own rules, then its parameter count against the values model.safetensors
/// holds (read from the file's header, not loaded).
pub fn model_config(dir: &Path, state: &TrainerState) -> anyhow::Result<crate::config::ModelConfig> {
    let cfg: crate::config::ModelConfig = serde_json::from_value(state.model_config.clone())
        .with_context(|| format!("{}: the model config in {TRAINER_FILE} is not valid", dir.display()))?;
    check_model(dir, &cfg)?;
    Ok(cfg)
}

fn check_model(dir: &Path, cfg: &crate::config::ModelConfig) -> anyhow::Result<()> {
    let problems: Vec<String> = crate::config::model_violations(cfg).into_iter().map(|v| format!("{}: {}", v.path, v.message)).collect();
    if !problems.is_empty() {
        bail!("{}: the model config in {TRAINER_FILE} is not valid: {}", dir.display(), problems.join("; "));
    }
    let expected = crate::model::size::param_count(cfg).total;
    let stored = safetensors_values(&dir.join(MODEL_FILE))?;
    if stored != expected {
        bail!(
            "{}: its model config describes {expected} parameters but {MODEL_FILE} holds {stored} values (the files do not belong together)",
            dir.display()
        );
    }
    Ok(())
}

/// The number of values in a safetensors file, from its header alone.
fn safetensors_values(path: &Path) -> anyhow::Result<u64> {
    use std::io::Read;
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).with_context(|| format!("{}: too short for a safetensors file", path.display()))?;
    let len = u64::from_le_bytes(len);
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > size.saturating_sub(8) || len > 100 << 20 {
        bail!("{}: not a safetensors file (header length {len})", path.display());
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).with_context(|| format!("cannot read {}", path.display()))?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).with_context(|| format!("{}: damaged safetensors header", path.display()))?;
    let mut total = 0u64;
    for (name, entry) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let shape = entry["shape"].as_array().ok_or_else(|| anyhow!("{}: tensor {name} has no shape", path.display()))?;
        let count = shape.iter().try_fold(1u64, |n, d| d.as_u64().and_then(|d| n.checked_mul(d)));
        total =
            count.and_then(|c| total.checked_add(c)).ok_or_else(|| anyhow!("{}: tensor {name} has an impossible shape", path.display()))?;
    }
    Ok(total)
}

/// Builds a `cfg` model on `device` and loads `dir`'s weights into it.
pub fn load_model(dir: &Path, cfg: &crate::config::ModelConfig, device: tch::Device) -> anyhow::Result<LoadedModel> {
    check_model(dir, cfg)?;
    let vs = tch::nn::VarStore::new(device);
    let model = crate::model::Algpt2::new(&vs.root(), cfg);
    let flat = crate::model::flat::FlatParams::new(&vs);
    flat.load_named(&load_tensors(dir, MODEL_FILE)?, &format!("checkpoint {}", dir.display()))?;
    Ok(LoadedModel { _vs: vs, model })
}

/// Loads the tensors of a verified checkpoint file.
pub fn load_tensors(dir: &Path, file: &str) -> anyhow::Result<BTreeMap<String, Tensor>> {
    let path = dir.join(file);
    let tensors = Tensor::read_safetensors(&path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    Ok(tensors.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn state(step: u64, val_loss: Option<f64>) -> TrainerState {
        TrainerState {
            format_version: 0,
            step,
            sampler: SamplerState { epoch: 0, offset: step * 4, windows: Some(1000) },
            global_batch: 4,
            world_size: 1,
            seed: 1,
            model_config: serde_json::json!({"n_layer": 1}),
            config_hash: "c".into(),
            settings: None,
            tokenizer_hash: "t".into(),
            wandb_run_id: None,
            run_id: Some("ours".into()),
            val_loss,
            best_val_loss: val_loss,
            tokens_seen: step * 100,
            checksums: BTreeMap::new(),
        }
    }

    fn tensors(v: f32) -> Vec<(String, Tensor)> {
        vec![("w".to_string(), Tensor::from_slice(&[v, v + 1.0]))]
    }

    #[test]
    fn save_verify_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = save(dir.path(), &tensors(1.0), &tensors(2.0), state(10, Some(3.0))).unwrap();
        assert!(path.ends_with("step_00000010"));
        let s = verify(&path).unwrap();
        assert_eq!(s.step, 10);
        assert_eq!(s.checksums.len(), 2);
        let w = &load_tensors(&path, MODEL_FILE).unwrap()["w"];
        assert_eq!(Vec::<f32>::try_from(w).unwrap(), vec![1.0, 2.0]);
        assert!(!dir.path().join(".tmp-step_00000010").exists());
    }

    #[test]
    fn damaged_or_unfinished_checkpoints_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &tensors(1.0), &tensors(2.0), state(1, None)).unwrap();
        let second = save(dir.path(), &tensors(3.0), &tensors(4.0), state(2, None)).unwrap();
        // A crash mid-save leaves only a .tmp- directory, which is never listed.
        std::fs::create_dir_all(dir.path().join(".tmp-step_00000003")).unwrap();
        // Flip one byte of the newest model file.
        let model = second.join(MODEL_FILE);
        let mut bytes = std::fs::read(&model).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&model, bytes).unwrap();
        let err = verify(&second).unwrap_err().to_string();
        assert!(err.contains("does not match its checksum"), "{err}");
        let valid: Vec<u64> = list_valid(dir.path()).iter().map(|f| f.state.step).collect();
        assert_eq!(valid, vec![1]);
    }

    fn ours() -> RunIdentity {
        RunIdentity { run_id: "ours".into(), model_config: serde_json::json!({"n_layer": 1}), tokenizer_hash: "t".into() }
    }

    #[test]
    fn retention_keeps_the_newest_and_the_best() {
        let dir = tempfile::tempdir().unwrap();
        for (step, loss) in [(1, 5.0), (2, 1.0), (3, 4.0), (4, 3.0), (5, 2.0)] {
            save(dir.path(), &tensors(0.0), &tensors(0.0), state(step, Some(loss))).unwrap();
            assert!(retain(dir.path(), 2, &ours()).unwrap().is_empty());
        }
        let kept: Vec<u64> = list_valid(dir.path()).iter().map(|f| f.state.step).collect();
        assert_eq!(kept, vec![2, 4, 5]);
    }

    /// Another run's checkpoints (another run id, or, without one, another model or
    /// tokenizer) are left alone and returned; one without a run id but of the same model
    /// and tokenizer (an older build's) counts as this run's.
    #[test]
    fn retention_never_deletes_another_runs_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let other_id = TrainerState { run_id: Some("theirs".into()), ..state(1, None) };
        let other_model = TrainerState { run_id: None, model_config: serde_json::json!({"n_layer": 2}), ..state(2, None) };
        let other_tokenizer = TrainerState { run_id: None, tokenizer_hash: "u".into(), ..state(3, None) };
        let older_build = TrainerState { run_id: None, ..state(4, None) };
        for s in [other_id, other_model, other_tokenizer, older_build] {
            save(dir.path(), &tensors(0.0), &tensors(0.0), s).unwrap();
        }
        for step in 5..=7 {
            save(dir.path(), &tensors(0.0), &tensors(0.0), state(step, None)).unwrap();
        }
        let others = retain(dir.path(), 2, &ours()).unwrap();
        let why: Vec<(u64, String)> = others.iter().map(|f| (f.state.step, f.state.other_run(&ours()).unwrap())).collect();
        assert_eq!(
            why,
            vec![
                (1, "run id theirs, this run's is ours".to_string()),
                (2, "another model config".to_string()),
                (3, "another tokenizer".to_string())
            ]
        );
        let kept: Vec<u64> = list_valid(dir.path()).iter().map(|f| f.state.step).collect();
        assert_eq!(kept, vec![1, 2, 3, 6, 7]);
    }

    /// A checkpoint renamed to another step is not trusted: skipped when listed, so it is
    /// neither resumed nor deleted, and `check_name` says what to rename it to.
    #[test]
    fn a_checkpoint_named_for_another_step_is_skipped_and_named() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &tensors(0.0), &tensors(0.0), state(1, None)).unwrap();
        let saved = save(dir.path(), &tensors(0.0), &tensors(0.0), state(2, None)).unwrap();
        let renamed = dir.path().join("step_00000009");
        std::fs::rename(&saved, &renamed).unwrap();
        let (found, skipped) = scan(dir.path());
        assert_eq!(found.iter().map(|f| f.state.step).collect::<Vec<_>>(), vec![1]);
        let err = format!("{:#}", skipped[0]);
        assert!(
            err.contains("step_00000009 is named for step 9 but its trainer.json holds step 2")
                && err.contains("rename it to step_00000002"),
            "{err}"
        );
        assert!(retain(dir.path(), 1, &ours()).unwrap().is_empty());
        assert!(renamed.is_dir());
        // Other names are not step names: a copy named `best` is checked by its contents alone.
        let state = verify(&renamed).unwrap();
        assert!(check_name(&dir.path().join("best"), &state).is_ok());
        assert!(check_name(&dir.path().join("step_2x"), &state).is_ok());
    }
}
