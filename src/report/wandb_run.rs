//! Rank 0's Weights & Biases reporting for one training run: the settings (config
//! section, then `WANDB_*` environment), the run config W&B shows, the rows of
//! `metrics.jsonl`, the system metrics of every rank, the console (rank 0's log lines),
//! the run's metadata, the summary, the finish with the exit code, and a Stop pressed on
//! the dashboard. Other ranks hold an inert handle, so the loop reads the same on every
//! rank.

use super::wandb::{Reporter, Settings};
use crate::config::{Config, WandbMode};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct WandbRun {
    /// Shared with the console sink (which holds a weak reference), until `finish`.
    reporter: Option<Arc<Reporter>>,
    /// `wandb.honor_stop`: a Stop on the dashboard stops training (else a warning).
    honor_stop: bool,
    /// The warning for an ignored Stop was given.
    stop_warned: AtomicBool,
}

impl WandbRun {
    /// Starts reporting on the main rank; `resume` is the (run id, step) of the checkpoint
    /// the run continues from. Never waits on the network.
    pub fn start(
        cfg: &Config,
        run_dir: &Path,
        is_main: bool,
        extra_config: Map<String, Value>,
        resume: Option<(String, u64)>,
        metadata: Option<Value>,
    ) -> anyhow::Result<WandbRun> {
        if !is_main {
            return Ok(WandbRun::inert());
        }
        let w = &cfg.wandb;
        let mut settings = settings(cfg, run_dir)?;
        settings.flush_timeout = std::time::Duration::from_secs_f64(w.flush_timeout_s);
        let mut config = match serde_json::to_value(cfg)? {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        config.extend(extra_config);
        config.insert("git_revision".into(), json!(env!("ALGPT2_GIT_REVISION")));
        // W&B must never stop training: a reporter that cannot start is a warning.
        match Reporter::start_with_metadata(settings, Value::Object(config), resume, metadata) {
            Ok(reporter) => {
                let reporter = Arc::new(reporter);
                if w.console {
                    let weak = Arc::downgrade(&reporter);
                    super::console::attach(Arc::new(move |text: &str, is_error: bool, at: f64| {
                        if let Some(r) = weak.upgrade() {
                            r.console(text, is_error, at);
                        }
                    }));
                }
                Ok(WandbRun { reporter: Some(reporter), honor_stop: w.honor_stop, stop_warned: AtomicBool::new(false) })
            }
            Err(e) => {
                super::console::detach();
                tracing::warn!("W&B reporting is off for this run: {e:#}");
                Ok(WandbRun::inert())
            }
        }
    }

    /// Refuses, before training starts anything, W&B settings that can never work: a
    /// malformed `WANDB_BASE_URL` (unparseable, a port out of range, another scheme), an
    /// unknown `WANDB_MODE`, a bad `WANDB_RUN_ID` or project. The error is a
    /// [`BadSetting`](super::wandb::BadSetting), exit code 2. Rank 0 only: it alone
    /// reports, and the others' environment is not used.
    pub fn check_settings(cfg: &Config) -> anyhow::Result<()> {
        if algpt2_launch::launcher_rank(&|key| std::env::var(key).ok()) != 0 {
            return Ok(());
        }
        settings(cfg, &crate::run_dir::RunDir::for_config(cfg).root).map(drop)
    }

    /// Whether system metrics are sampled for this run, as every rank can tell alike:
    /// W&B is not disabled, `wandb.stats` is on, and the official client's switch
    /// (`WANDB_X_DISABLE_STATS`, or its `WANDB__DISABLE_STATS` spelling) is not set.
    pub fn stats_wanted(cfg: &Config) -> bool {
        let disabled_by_env = ["WANDB_X_DISABLE_STATS", "WANDB__DISABLE_STATS"]
            .iter()
            .any(|k| std::env::var(k).is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes")));
        cfg.wandb.stats && cfg.wandb.mode != WandbMode::Disabled && !disabled_by_env
    }

    /// This handle reports (rank 0 with a started reporter).
    pub fn reports(&self) -> bool {
        self.reporter.is_some()
    }

    /// One row of system metrics (`system.*` keys) for the System panels.
    pub fn log_system(&self, row: &Map<String, Value>) {
        if let Some(r) = &self.reporter {
            r.log_events(row);
        }
    }

    /// An error that ends the run, for the Logs tab (the terminal shows it from main).
    pub fn console_error(&self, text: &str) {
        if let Some(r) = &self.reporter {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
            r.console(&format!("ERROR {text}"), true, now);
        }
    }

    fn inert() -> WandbRun {
        WandbRun { reporter: None, honor_stop: false, stop_warned: AtomicBool::new(false) }
    }

    /// True once the user pressed Stop on the W&B dashboard, with `wandb.honor_stop` on.
    /// One atomic load (the uploader thread sets the flag), so the loop asks every step.
    /// With `honor_stop: false` the Stop gives one warning and training goes on.
    pub fn stop_requested(&self) -> bool {
        let Some(r) = &self.reporter else { return false };
        if !r.stop_requested() {
            return false;
        }
        if !self.honor_stop && !self.stop_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "W&B: the run was stopped from the W&B dashboard; training goes on (wandb.honor_stop is false; stop it with a signal)"
            );
        }
        self.honor_stop
    }

    /// The W&B run id, kept in checkpoints so that a resumed run continues the same run.
    pub fn run_id(&self) -> Option<String> {
        self.reporter.as_ref().map(|r| r.run_id().to_string())
    }

    pub fn log(&self, step: u64, row: &Map<String, Value>) {
        if let Some(r) = &self.reporter {
            let mut metrics = row.clone();
            metrics.remove("step");
            r.log(step, &metrics);
        }
    }

    pub fn set_summary(&self, key: &str, value: Value) {
        if let Some(r) = &self.reporter {
            r.set_summary(key, value);
        }
    }

    /// A bounded flush, then the run is marked finished with `exit_code`.
    pub fn finish(self, exit_code: i32) {
        // The sink lets go of the reporter first: after `detach` no line is in flight.
        super::console::detach();
        if let Some(r) = self.reporter {
            match Arc::try_unwrap(r) {
                Ok(r) => {
                    r.finish(exit_code);
                }
                Err(_) => tracing::warn!("W&B: the run could not be finished (still in use); `wandb-sync` finishes it"),
            }
        }
    }
}

/// The run's W&B settings: the config section, then the `WANDB_*` environment.
fn settings(cfg: &Config, run_dir: &Path) -> anyhow::Result<Settings> {
    let w = &cfg.wandb;
    let mode = match w.mode {
        WandbMode::Online => "online",
        WandbMode::Offline => "offline",
        WandbMode::Disabled => "disabled",
    };
    let name = w.name.clone().or_else(|| cfg.run_name.clone());
    let env = |key: &str| std::env::var(key).ok();
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    Settings::resolve(mode, &w.project, w.entity.as_deref(), name.as_deref(), w.group.as_deref(), &w.tags, run_dir, &env, home.as_deref())
}
