//! The run's files for the Overview and Files tabs, uploaded at finish (and by `sync`)
//! through CreateRunFiles and the signed URLs it hands out, as the official client does:
//! `config.yaml` (the config in W&B's `{key: {value: ...}}` shape), `wandb-summary.json`,
//! `wandb-metadata.json` (when the caller gave one) and `output.log` (the console as
//! plain text, when there is one).

use serde_json::Value;

/// One file to upload.
#[derive(Debug, Clone)]
pub(super) struct RunFile {
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

/// The files of a run: its config as UpsertBucket sent it (a JSON string), its summary
/// (a JSON string), and its metadata.
pub(super) fn collect(config_json: &str, summary_json: &str, metadata: Option<&Value>, console: Option<String>) -> Vec<RunFile> {
    let mut files = Vec::new();
    match config_yaml(config_json) {
        Some(yaml) => files.push(RunFile { name: "config.yaml", bytes: yaml.into_bytes() }),
        None => tracing::debug!("W&B: the run's config is not a JSON object; config.yaml is not uploaded"),
    }
    files.push(RunFile { name: "wandb-summary.json", bytes: summary_json.as_bytes().to_vec() });
    if let Some(m) = metadata {
        let mut bytes = serde_json::to_vec_pretty(m).expect("JSON values serialize");
        bytes.push(b'\n');
        files.push(RunFile { name: "wandb-metadata.json", bytes });
    }
    if let Some(text) = console {
        files.push(RunFile { name: "output.log", bytes: text.into_bytes() });
    }
    files
}

/// `config.yaml`: the same `{key: {value: v}}` mapping as the GraphQL config, in YAML.
pub(super) fn config_yaml(config_json: &str) -> Option<String> {
    let value: Value = serde_json::from_str(config_json).ok()?;
    if !value.is_object() {
        return None;
    }
    serde_yaml_ng::to_string(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_yaml_keeps_the_value_shape_and_reads_back_as_the_same_config() {
        let config = json!({"lr": {"value": 0.0006}, "model": {"value": {"n_layer": 2}}, "_wandb": {"value": {"t": {"13": "linux"}}}});
        let yaml = config_yaml(&config.to_string()).unwrap();
        assert!(yaml.contains("lr:\n  value: 0.0006\n"), "{yaml}");
        let back: Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(back, config);
        assert!(config_yaml("[1]").is_none());
        let files = collect(&config.to_string(), "{}", Some(&json!({"host": "h"})), None);
        let names: Vec<&str> = files.iter().map(|f| f.name).collect();
        assert_eq!(names, ["config.yaml", "wandb-summary.json", "wandb-metadata.json"]);
    }
}
