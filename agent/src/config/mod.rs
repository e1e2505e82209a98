//! Configuration in two stages: raw string values layered from defaults < file < env < CLI, then validated into typed [`Config`].
//!
//! Every key lives in [`KEYS`], which names its environment variable, default
//! and meaning; `docs/configuration.md` is checked against that table by a
//! test. This module reads files only when told where; it never reads the
//! process environment itself (callers pass the environment in), so tests
//! build configurations from maps.
//!
//! The files follow the stages: `keys` (the table), `raw` (layering into
//! [`RawConfig`]), `parse` (the value parsers), `validate` (into [`Config`],
//! whose types live in `typed`), `print` (`print-config`) and `error`.

mod error;
mod keys;
mod parse;
mod print;
mod raw;
mod typed;
mod validate;

pub use error::{ConfigError, Source};
pub use keys::{KEYS, KeySpec};
pub use raw::{ConfigSources, RawConfig, default_config_file};
pub use typed::{
    AgentConfig, ApiKey, CacheConfig, Config, CoordinatorConfig, DiscoveryConfig,
    DistributedConfig, EngineConfig, EngineMode, HttpConfig, KeyScope, ModelsConfig,
    loopback_if_unspecified,
};

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    fn sources(
        file: Option<&str>,
        env: &[(&str, &str)],
        cli: &[(&'static str, &str)],
    ) -> ConfigSources {
        let file = file.map(|text| {
            let dir = tempfile::tempdir().expect("tempdir").keep();
            let path = dir.join("config.toml");
            std::fs::write(&path, text).expect("write config");
            path
        });
        ConfigSources {
            file_is_explicit: file.is_some(),
            file,
            env: env
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
            cli: cli
                .iter()
                .map(|(key, value)| (*key, (*value).to_owned()))
                .collect(),
        }
    }

    /// Precedence: default < file < env < CLI, one row per combination.
    #[test]
    fn precedence_table() {
        fn check(
            file: Option<&str>,
            env: &[(&str, &str)],
            cli: &[(&'static str, &str)],
            expected_ms: u64,
            expected_source: &str,
        ) {
            let raw = RawConfig::load(&sources(file, env, cli)).expect("load");
            let config = Config::try_from(&raw).expect("valid");
            assert_eq!(
                config.agent.heartbeat_interval,
                Duration::from_millis(expected_ms)
            );
            let (_, source) = raw.get("agent.heartbeat_interval").expect("set");
            assert!(
                source.to_string().starts_with(expected_source),
                "source {source} for {file:?} {env:?} {cli:?}"
            );
        }
        let file = Some("[agent]\nheartbeat_interval = \"3s\"\n");
        let env = &[("SOLLOL_HEARTBEAT_INTERVAL", "4s")][..];
        let cli = &[("agent.heartbeat_interval", "5s")][..];
        check(None, &[], &[], 2000, "default");
        check(file, &[], &[], 3000, "file");
        check(None, env, &[], 4000, "env SOLLOL_HEARTBEAT_INTERVAL");
        check(file, env, &[], 4000, "env");
        check(None, &[], cli, 5000, "command line");
        check(file, &[], cli, 5000, "command line");
        check(file, env, cli, 5000, "command line");
    }

    #[test]
    fn invalid_values_name_their_key_and_source() {
        fn check(env: &[(&str, &str)], key: &str, source: &str) {
            let raw = RawConfig::load(&sources(None, env, &[])).expect("load");
            let message = Config::try_from(&raw).expect_err("invalid").to_string();
            assert!(message.contains(&format!("`{key}`")), "{message}");
            assert!(message.contains(source), "{message}");
        }
        check(
            &[("SOLLOL_HEARTBEAT_INTERVAL", "banana")],
            "agent.heartbeat_interval",
            "SOLLOL_HEARTBEAT_INTERVAL",
        );
        check(
            &[("SOLLOL_HEARTBEAT_INTERVAL", "1ms")],
            "agent.heartbeat_interval",
            "SOLLOL_HEARTBEAT_INTERVAL",
        );
        check(
            &[("SOLLOL_GATEWAY_BIND", "localhost")],
            "coordinator.gateway_bind",
            "SOLLOL_GATEWAY_BIND",
        );
        check(
            &[("SOLLOL_DOWN_AFTER_MISSED", "0")],
            "coordinator.down_after_missed",
            "SOLLOL_DOWN_AFTER_MISSED",
        );
        check(&[("SOLLOL_JOIN", "no-port")], "agent.join", "SOLLOL_JOIN");
        check(
            &[("SOLLOL_OLLAMA_URL", "https://x:1")],
            "agent.ollama_url",
            "SOLLOL_OLLAMA_URL",
        );
        check(
            &[("SOLLOL_MODEL_SHARDING_ENABLED", "maybe")],
            "model_sharding_enabled",
            "SOLLOL_MODEL_SHARDING_ENABLED",
        );
        check(
            &[("SOLLOL_TOKEN", "has space")],
            "agent.token",
            "SOLLOL_TOKEN",
        );
        check(
            &[
                ("SOLLOL_RECONNECT_INITIAL_BACKOFF", "10s"),
                ("SOLLOL_RECONNECT_MAX_BACKOFF", "1s"),
            ],
            "agent.reconnect_max_backoff",
            "SOLLOL_RECONNECT_MAX_BACKOFF",
        );
    }

    #[test]
    fn file_errors_are_clear() {
        let unknown = RawConfig::load(&sources(Some("[agent]\nheartbeat = \"2s\"\n"), &[], &[]))
            .expect_err("unknown key");
        assert!(
            unknown
                .to_string()
                .contains("unknown key `agent.heartbeat`"),
            "{unknown}"
        );
        let broken = RawConfig::load(&sources(Some("[agent\n"), &[], &[])).expect_err("bad toml");
        assert!(broken.to_string().contains("not valid TOML"), "{broken}");
        let missing = RawConfig::load(&ConfigSources {
            file: Some(PathBuf::from("/nonexistent/sollol.toml")),
            file_is_explicit: true,
            ..ConfigSources::default()
        })
        .expect_err("missing explicit file");
        assert!(
            missing.to_string().contains("/nonexistent/sollol.toml"),
            "{missing}"
        );
        let optional = RawConfig::load(&ConfigSources {
            file: Some(PathBuf::from("/nonexistent/sollol.toml")),
            file_is_explicit: false,
            ..ConfigSources::default()
        });
        assert!(optional.is_ok());
    }

    #[test]
    fn api_keys_parse_from_env_and_file_lists() {
        let config = Config::from_pairs(&[(
            "coordinator.api_keys",
            "webui=0123456789abcdef0123, fedcba9876543210fedc",
        )])
        .expect("valid");
        let names: Vec<&str> = config
            .coordinator
            .api_keys
            .iter()
            .map(|key| key.name.as_str())
            .collect();
        assert_eq!(names, vec!["webui", "key-2"]);
        assert!(!format!("{:?}", config.coordinator.api_keys).contains("0123456789abcdef"));
        let raw = RawConfig::load(&sources(Some("[coordinator]\napi_keys = [\"a=0123456789abcdef0123\", \"b=0123456789abcdef0124\"]\n"), &[], &[])).expect("load");
        assert_eq!(
            Config::try_from(&raw)
                .expect("valid")
                .coordinator
                .api_keys
                .len(),
            2
        );
        assert!(Config::from_pairs(&[("coordinator.api_keys", "short")]).is_err());
    }

    /// The response cache is off by default; its keys come from the environment like any other and
    /// are checked.
    #[test]
    fn cache_keys_are_typed_and_checked() {
        let config = Config::from_pairs(&[]).expect("valid");
        assert_eq!(
            config.cache,
            CacheConfig {
                enabled: false,
                max_bytes: 256 << 20,
                ttl: Duration::from_secs(3600),
            }
        );
        let raw = RawConfig::load(&sources(
            Some("[cache]\nttl = \"10m\"\n"),
            &[
                ("SOLLOL_CACHE_ENABLED", "true"),
                ("SOLLOL_CACHE_MAX_BYTES", "64MiB"),
            ],
            &[],
        ))
        .expect("load");
        assert_eq!(
            Config::try_from(&raw).expect("valid").cache,
            CacheConfig {
                enabled: true,
                max_bytes: 64 << 20,
                ttl: Duration::from_secs(600),
            }
        );
        fn refused(env: (&str, &str), key: &str) {
            let raw = RawConfig::load(&sources(None, &[env], &[])).expect("load");
            let message = Config::try_from(&raw).expect_err("invalid").to_string();
            assert!(message.contains(&format!("`{key}`")), "{message}");
            assert!(message.contains(env.0), "{message}");
        }
        refused(("SOLLOL_CACHE_ENABLED", "sometimes"), "cache.enabled");
        refused(("SOLLOL_CACHE_MAX_BYTES", "1000"), "cache.max_bytes");
        refused(("SOLLOL_CACHE_MAX_BYTES", "lots"), "cache.max_bytes");
        refused(("SOLLOL_CACHE_TTL", "0s"), "cache.ttl");
        refused(("SOLLOL_CACHE_TTL", "400days"), "cache.ttl");
    }

    #[test]
    fn derived_defaults() {
        let config = Config::from_pairs(&[
            ("data_dir", "/srv/sollol"),
            ("coordinator.gateway_bind", "0.0.0.0:9000"),
            ("model_sharding_enabled", "true"),
        ])
        .expect("valid");
        assert_eq!(config.agent.models_dir, PathBuf::from("/srv/sollol/models"));
        assert_eq!(config.coordinator_url, "http://127.0.0.1:9000");
        assert!(config.model_sharding_enabled);
        assert_eq!(config.coordinator.down_after_missed.get(), 3);
        assert!(!config.agent.name.is_empty());
    }

    #[test]
    fn print_config_hides_the_token_and_names_sources() {
        let raw = RawConfig::load(&sources(
            None,
            &[("SOLLOL_TOKEN", "0123456789abcdef0123456789abcdef")],
            &[("agent.name", "board-1")],
        ))
        .expect("load");
        let config = Config::try_from(&raw).expect("valid");
        let text = raw.to_toml(&config);
        assert!(!text.contains("0123456789abcdef"), "{text}");
        assert!(
            text.contains("token = \"<set, hidden>\"  # env SOLLOL_TOKEN"),
            "{text}"
        );
        assert!(
            text.contains("name = \"board-1\"  # command line"),
            "{text}"
        );
        assert!(text.contains("[coordinator]"), "{text}");
        assert!(text.contains("# models_dir = \""), "{text}");
        // The printed file parses back as TOML.
        toml::from_str::<toml::Table>(&text).expect("print-config output is TOML");
    }

    /// Config fuzzing, as a property test: any value for any key (from the environment, as users set
    /// them) and any text as the config file is either a configuration or an error naming what is
    /// wrong; never a panic. Keys naming files to read (`*_file`) are left out: reading is not parsing.
    mod arbitrary {
        use proptest::prelude::*;

        use super::*;

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                // Anything printable, and the shapes values take, near their edges.
                "[ -~]{0,24}",
                "-?[0-9]{1,22}(\\.[0-9]{0,3})?[a-zA-Z]{0,3}",
                "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(:[0-9]{0,6})?(/[0-9]{1,3})?",
                "(https?|ftp)://[a-z0-9.:@\\[\\]]{0,20}(/[ -~]{0,8})?",
                "[a-z0-9:=,. ]{0,40}",
                "\\PC{0,12}",
            ]
        }

        fn keys() -> Vec<&'static KeySpec> {
            KEYS.iter()
                .filter(|spec| !spec.key.ends_with("_file") && spec.key != "data_dir")
                .collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn any_value_of_any_key_is_read_or_refused(
                picks in proptest::collection::vec((any::<proptest::sample::Index>(), value()), 1..6)
            ) {
                let keys = keys();
                let env: Vec<(&str, String)> = picks
                    .iter()
                    .map(|(index, value)| (index.get(&keys).env, value.clone()))
                    .collect();
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(name, value)| (*name, value.as_str())).collect();
                match RawConfig::load(&sources(None, &env, &[])) {
                    Ok(raw) => {
                        if let Err(error) = Config::try_from(&raw) {
                            prop_assert!(!error.to_string().is_empty());
                        }
                    }
                    Err(error) => prop_assert!(!error.to_string().is_empty()),
                }
            }

            #[test]
            fn any_config_file_is_read_or_refused(text in "\\PC{0,200}|(\\[[a-z]{0,12}\\]\n)?([a-z_]{1,20} = [ -~]{0,30}\n){0,6}") {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("config.toml");
                std::fs::write(&path, &text).expect("write config");
                let file = ConfigSources {
                    file: Some(path),
                    file_is_explicit: true,
                    ..ConfigSources::default()
                };
                match RawConfig::load(&file) {
                    Ok(raw) => {
                        let _ = Config::try_from(&raw);
                    }
                    Err(error) => prop_assert!(!error.to_string().is_empty()),
                }
            }
        }
    }
}
