//! Run configuration: schema with defaults, strict YAML loading, `--set` overrides.

mod lines;
mod load;
mod read;
mod schema;
mod validate;

pub use load::{load, parse, ConfigError};
pub use read::file_kind;
pub use schema::*;
pub use validate::{model_violations, Violation};

impl Config {
    /// The resolved config as YAML, as printed at start and saved in the run directory.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("the config serializes")
    }
}
