//! Stage one: the text of every key, layered from defaults < file < env < CLI, with where each came from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::{ConfigError, Source};
use super::keys::{KEYS, spec_of};

/// What to layer, in order of increasing precedence after the defaults.
#[derive(Debug, Default)]
pub struct ConfigSources {
    /// The config file; `explicit` makes a missing file an error.
    pub file: Option<PathBuf>,
    pub file_is_explicit: bool,
    /// The process environment (only `SOLLOL_*` variables matter).
    pub env: BTreeMap<String, String>,
    /// Values given on the command line, by key.
    pub cli: Vec<(&'static str, String)>,
}

/// Stage one: every key's text and where it came from.
#[derive(Clone, Debug)]
pub struct RawConfig {
    values: BTreeMap<&'static str, (String, Source)>,
}

impl RawConfig {
    pub fn load(sources: &ConfigSources) -> Result<Self, ConfigError> {
        let mut values = BTreeMap::new();
        for spec in KEYS {
            if let Some(default) = spec.default {
                values.insert(spec.key, (default.to_owned(), Source::Default));
            }
        }
        if let Some(path) = &sources.file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    for (key, value) in parse_file(path, &text)? {
                        values.insert(key, (value, Source::File(path.clone())));
                    }
                }
                Err(error)
                    if error.kind() == std::io::ErrorKind::NotFound
                        && !sources.file_is_explicit => {}
                Err(source) => {
                    return Err(ConfigError::ReadFile {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        for spec in KEYS {
            if let Some(value) = sources.env.get(spec.env) {
                values.insert(spec.key, (value.clone(), Source::Env(spec.env)));
            }
        }
        for (key, value) in &sources.cli {
            let spec = spec_of(key);
            values.insert(spec.key, (value.clone(), Source::Cli));
        }
        Ok(Self { values })
    }

    pub fn get(&self, key: &str) -> Option<(&str, &Source)> {
        self.values
            .get(key)
            .map(|(value, source)| (value.as_str(), source))
    }
}

/// The default config file: `config.toml` in the platform config directory.
pub fn default_config_file() -> Option<PathBuf> {
    dirs::config_dir().map(|dir| dir.join("sollol").join("config.toml"))
}

/// The keys a TOML config file sets, as text: sections become dotted keys, and a list of strings
/// is joined with commas so that it reads like the same list given in the environment.
fn parse_file(path: &Path, text: &str) -> Result<Vec<(&'static str, String)>, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|error| ConfigError::ParseFile {
        path: path.to_owned(),
        message: error.to_string(),
    })?;
    let mut pairs = Vec::new();
    let mut push = |key: String, value: &toml::Value| -> Result<(), ConfigError> {
        let spec =
            KEYS.iter()
                .find(|spec| spec.key == key)
                .ok_or_else(|| ConfigError::UnknownKey {
                    key: key.clone(),
                    path: path.to_owned(),
                })?;
        let text = match value {
            toml::Value::String(text) => text.clone(),
            toml::Value::Integer(number) => number.to_string(),
            toml::Value::Float(number) => number.to_string(),
            toml::Value::Boolean(flag) => flag.to_string(),
            toml::Value::Array(items) if items.iter().all(toml::Value::is_str) => items
                .iter()
                .filter_map(toml::Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
            // A table of names to strings or numbers (`models.replicas`) reads as `name=value,…`.
            toml::Value::Table(items)
                if items
                    .values()
                    .all(|item| item.is_str() || item.is_integer()) =>
            {
                items
                    .iter()
                    .map(|(name, item)| match item {
                        toml::Value::String(text) => format!("{name}={text}"),
                        other => format!("{name}={other}"),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            }
            other => {
                return Err(ConfigError::Invalid {
                    key: spec.key,
                    value: other.to_string(),
                    origin: Source::File(path.to_owned()),
                    reason: "expected a string, number, boolean, list of strings or table of strings and numbers".to_owned(),
                });
            }
        };
        pairs.push((spec.key, text));
        Ok(())
    };
    for (name, value) in &table {
        match value {
            toml::Value::Table(section) => {
                for (inner, value) in section {
                    push(format!("{name}.{inner}"), value)?;
                }
            }
            value => push(name.clone(), value)?,
        }
    }
    Ok(pairs)
}
