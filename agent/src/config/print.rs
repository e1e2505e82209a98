//! `print-config`: the effective configuration as TOML, each value with its source and secrets hidden.

use super::keys::KEYS;
use super::raw::RawConfig;
use super::typed::Config;

impl RawConfig {
    /// The effective configuration as TOML, with each value's source; the token is masked.
    /// Keys left unset show the value derived for them in `config`, as comments.
    pub fn to_toml(&self, config: &Config) -> String {
        let mut out = String::from("# Effective sollol configuration (value  # source)\n");
        let mut section = "";
        for spec in KEYS {
            let (table, name) = spec.key.split_once('.').unwrap_or(("", spec.key));
            if table != section {
                out.push_str(&format!("\n[{table}]\n"));
                section = table;
            }
            match self.get(spec.key) {
                Some((value, source)) => {
                    let shown = if matches!(
                        spec.key,
                        "agent.token"
                            | "api_key"
                            | "coordinator.api_keys"
                            | "coordinator.admin_keys"
                    ) {
                        "<set, hidden>".to_owned()
                    } else {
                        value.to_owned()
                    };
                    out.push_str(&format!("{name} = {}  # {source}\n", toml_literal(&shown)));
                }
                None => match derived_value(config, spec.key) {
                    Some(value) => {
                        out.push_str(&format!("# {name} = {}  # derived\n", toml_literal(&value)))
                    }
                    None => out.push_str(&format!("# {name} is unset\n")),
                },
            }
        }
        out
    }
}

/// What an unset key resolves to, for `print-config`.
fn derived_value(config: &Config, key: &str) -> Option<String> {
    match key {
        "data_dir" => Some(config.data_dir.display().to_string()),
        "coordinator_url" => Some(config.coordinator_url.clone()),
        "agent.name" => Some(config.agent.name.clone()),
        "agent.models_dir" => Some(config.agent.models_dir.display().to_string()),
        "agent.ollama_url" => Some(crate::telemetry::ollama::DEFAULT_OLLAMA_URL.to_owned()),
        _ => None,
    }
}

fn toml_literal(text: &str) -> String {
    if text == "true" || text == "false" || (!text.is_empty() && text.parse::<i64>().is_ok()) {
        text.to_owned()
    } else {
        toml::Value::String(text.to_owned()).to_string()
    }
}
