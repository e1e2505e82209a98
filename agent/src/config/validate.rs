//! Stage two: validating the raw text of every key into the typed [`Config`], one function per section.
//!
//! The sections are read in a fixed order (top-level keys, coordinator, agent, engine, distributed,
//! discovery, http, cache) so that, of several invalid values, the same one is always reported first.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{ConfigError, Source};
use super::parse::{
    list_items, parse_api_keys, parse_bool, parse_bytes, parse_duration, parse_host_port,
    parse_http_url, parse_node_name, parse_non_zero, parse_port, parse_positive_duration,
    parse_replicas, parse_seed, parse_socket_addr,
};
use super::raw::{ConfigSources, RawConfig};
use super::typed::{
    AgentConfig, CacheConfig, Config, CoordinatorConfig, DiscoveryConfig, DistributedConfig,
    EngineConfig, EngineMode, HttpConfig, KeyScope, ModelsConfig, loopback_if_unspecified,
};

impl TryFrom<&RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: &RawConfig) -> Result<Self, ConfigError> {
        let reader = Reader { raw };
        let data_dir = data_dir(&reader)?;
        let gateway_bind = reader.parse("coordinator.gateway_bind", parse_socket_addr)?;
        let coordinator_url = match reader.text("coordinator_url") {
            Some(text) => reader.parse_text("coordinator_url", text, parse_http_url)?,
            None => format!("http://{}", loopback_if_unspecified(gateway_bind)),
        };
        let coordinator = coordinator(&reader, gateway_bind)?;
        let agent = agent(&reader, &data_dir)?;
        let engine = engine(&reader)?;
        let model_sharding_enabled = reader.parse("model_sharding_enabled", parse_bool)?;
        let distributed = distributed(&reader, model_sharding_enabled)?;
        let discovery = discovery(&reader)?;
        let http = http(&reader)?;
        let cache = cache(&reader)?;
        let models = ModelsConfig {
            replicas: reader
                .optional("models.replicas", parse_replicas)?
                .unwrap_or_default(),
        };
        Ok(Self {
            shutdown_grace: reader.parse("shutdown_grace", parse_duration)?,
            log_level: reader.parse("log_level", |text| {
                if text.trim().is_empty() {
                    Err("must not be empty".to_owned())
                } else {
                    Ok(text.to_owned())
                }
            })?,
            model_sharding_enabled,
            coordinator_url,
            api_key: reader
                .text("api_key")
                .map(str::trim)
                .filter(|key| !key.is_empty())
                .map(str::to_owned),
            data_dir,
            coordinator,
            agent,
            engine,
            distributed,
            discovery,
            http,
            cache,
            models,
        })
    }
}

impl Config {
    /// Builds a configuration from key/value pairs over the defaults, as tests and embedders do.
    pub fn from_pairs(pairs: &[(&'static str, &str)]) -> Result<Self, ConfigError> {
        let sources = ConfigSources {
            cli: pairs
                .iter()
                .map(|(key, value)| (*key, (*value).to_owned()))
                .collect(),
            ..ConfigSources::default()
        };
        Self::try_from(&RawConfig::load(&sources)?)
    }
}

/// `data_dir`, or the platform data directory plus `sollol` when it is unset.
fn data_dir(reader: &Reader<'_>) -> Result<PathBuf, ConfigError> {
    Ok(match reader.text("data_dir") {
        Some(text) => PathBuf::from(reader.non_empty("data_dir", text)?),
        None => dirs::data_dir()
            .or_else(|| dirs::home_dir().map(|home| home.join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("."))
            .join("sollol"),
    })
}

/// The `coordinator` section; `gateway_bind` is read first by the caller, which derives `coordinator_url` from it.
fn coordinator(
    reader: &Reader<'_>,
    gateway_bind: std::net::SocketAddr,
) -> Result<CoordinatorConfig, ConfigError> {
    Ok(CoordinatorConfig {
        gateway_bind,
        cluster_bind: reader.parse("coordinator.cluster_bind", parse_socket_addr)?,
        down_after_missed: reader.parse("coordinator.down_after_missed", parse_non_zero)?,
        handshake_timeout: reader.parse("coordinator.handshake_timeout", parse_duration)?,
        max_cluster_connections: reader
            .parse("coordinator.max_cluster_connections", parse_non_zero)?,
        event_retention: reader.parse("coordinator.event_retention", parse_non_zero)?,
        strategy: reader.parse("coordinator.strategy", |text| {
            sollol_policy::routing::Strategy::parse(text).ok_or_else(|| {
                "expected intelligent, round_robin, least_loaded, latency_first, fairness or random"
                    .to_owned()
            })
        })?,
        node_slots: reader.parse("coordinator.node_slots", parse_non_zero)?,
        node_queue_depth: reader.parse("coordinator.node_queue_depth", |text| {
            text.parse::<u32>()
                .map_err(|_| "expected a whole number".to_owned())
        })?,
        queue_capacity: reader.parse("coordinator.queue_capacity", parse_non_zero)?,
        queue_timeout: reader.parse("coordinator.queue_timeout", parse_positive_duration)?,
        queue_aging: reader.parse("coordinator.queue_aging", parse_positive_duration)?,
        max_attempts: reader.parse("coordinator.max_attempts", parse_non_zero)?,
        response_timeout: reader.parse("coordinator.response_timeout", parse_positive_duration)?,
        max_request_body: reader.parse("coordinator.max_request_body", parse_non_zero)?,
        max_response_body: reader.parse("coordinator.max_response_body", parse_bytes)?,
        api_keys: {
            let mut keys = reader
                .optional("coordinator.api_keys", |text| {
                    parse_api_keys(text, KeyScope::Inference)
                })?
                .unwrap_or_default();
            keys.extend(
                reader
                    .optional("coordinator.admin_keys", |text| {
                        parse_api_keys(text, KeyScope::Admin)
                    })?
                    .unwrap_or_default(),
            );
            keys
        },
        requests_per_minute: reader.parse("coordinator.requests_per_minute", |text| {
            text.trim()
                .parse::<u64>()
                .map_err(|_| "a whole number of requests per minute (0: no limit)".to_owned())
        })?,
        tokens_per_minute: reader.parse("coordinator.tokens_per_minute", |text| {
            text.trim().parse::<u64>().map_err(|_| {
                "a whole number of generated tokens per minute (0: no limit)".to_owned()
            })
        })?,
        hedging: reader.parse("coordinator.hedging", parse_bool)?,
        calibration: reader.parse("coordinator.calibration", parse_bool)?,
        warmup: reader.parse("coordinator.warmup", parse_bool)?,
        warmup_window: reader.parse("coordinator.warmup_window", parse_positive_duration)?,
        warmup_models: reader.parse("coordinator.warmup_models", parse_non_zero)?,
        header_read_timeout: reader
            .parse("coordinator.header_read_timeout", parse_positive_duration)?,
        body_read_timeout: reader
            .parse("coordinator.body_read_timeout", parse_positive_duration)?,
        body_deadline: reader.parse("coordinator.body_deadline", parse_positive_duration)?,
        body_memory: reader.parse("coordinator.body_memory", parse_bytes)?,
        nodes: reader
            .optional("coordinator.nodes", |text| {
                list_items(text).map(parse_http_url).collect()
            })?
            .unwrap_or_default(),
        probe_interval: reader.parse("coordinator.probe_interval", |text| {
            let interval = parse_duration(text)?;
            if interval < Duration::from_millis(100) {
                return Err("must be at least 100ms".to_owned());
            }
            Ok(interval)
        })?,
        peers: reader
            .optional("coordinator.peers", |text| {
                list_items(text).map(parse_seed).collect()
            })?
            .unwrap_or_default(),
        advertise: reader.optional("coordinator.advertise", |text| {
            let address = parse_socket_addr(text)?;
            if address.ip().is_unspecified() || address.port() == 0 {
                return Err("must be an address others can reach: an IP address that is not 0.0.0.0, and a port".to_owned());
            }
            Ok(address)
        })?,
    })
}

/// The `agent` section; an unset `agent.models_dir` is `models` inside `data_dir`.
fn agent(reader: &Reader<'_>, data_dir: &Path) -> Result<AgentConfig, ConfigError> {
    let heartbeat_interval = reader.parse("agent.heartbeat_interval", |text| {
        let interval = parse_duration(text)?;
        if interval < Duration::from_millis(100) || interval > Duration::from_secs(600) {
            return Err("must be between 100ms and 10m".to_owned());
        }
        Ok(interval)
    })?;
    let reconnect_initial_backoff =
        reader.parse("agent.reconnect_initial_backoff", parse_positive_duration)?;
    let reconnect_max_backoff =
        reader.parse("agent.reconnect_max_backoff", parse_positive_duration)?;
    if reconnect_max_backoff < reconnect_initial_backoff {
        return Err(reader.error(
            "agent.reconnect_max_backoff",
            "must not be smaller than agent.reconnect_initial_backoff".to_owned(),
        ));
    }
    Ok(AgentConfig {
        join: reader
            .optional("agent.join", |text| {
                list_items(text)
                    .map(|item| parse_host_port(item).map(|()| item.to_owned()))
                    .collect::<Result<Vec<_>, _>>()
            })?
            .unwrap_or_default(),
        token: match reader.optional("agent.token_file", |path| {
            let text = std::fs::read_to_string(path.trim())
                .map_err(|error| format!("cannot read the token file: {error}"))?;
            crate::cluster::identity::ClusterToken::parse(&text)
                .map(|token| token.expose().to_owned())
                .map_err(|error| format!("the file's token is invalid: {error}"))
        })? {
            Some(token) => Some(token),
            None => reader.optional("agent.token", |text| {
                crate::cluster::identity::ClusterToken::parse(text)
                    .map(|token| token.expose().to_owned())
                    .map_err(|error| error.to_string())
            })?,
        },
        name: match reader.text("agent.name") {
            Some(text) => reader.parse_text("agent.name", text, parse_node_name)?,
            None => crate::cluster::identity::host_name(),
        },
        heartbeat_interval,
        ollama_url: reader.optional("agent.ollama_url", parse_http_url)?,
        models_dir: match reader.text("agent.models_dir") {
            Some(text) => PathBuf::from(reader.non_empty("agent.models_dir", text)?),
            None => data_dir.join("models"),
        },
        reconnect_initial_backoff,
        reconnect_max_backoff,
    })
}

/// The `engine` section; an unset `engine.ollama_models` is Ollama's store when it exists.
fn engine(reader: &Reader<'_>) -> Result<EngineConfig, ConfigError> {
    Ok(EngineConfig {
        mode: reader.parse("engine.mode", |text| match text.trim() {
            "auto" => Ok(EngineMode::Auto),
            "on" => Ok(EngineMode::On),
            "off" => Ok(EngineMode::Off),
            _ => Err("must be auto, on or off".to_owned()),
        })?,
        bind: reader.parse("engine.bind", parse_socket_addr)?,
        parallel: reader.parse("engine.parallel", parse_non_zero)?,
        keep_alive: reader.parse("engine.keep_alive", parse_duration)?,
        ollama_models: match reader.text("engine.ollama_models") {
            Some(text) => Some(PathBuf::from(
                reader.non_empty("engine.ollama_models", text)?,
            )),
            None => dirs::home_dir()
                .map(|home| home.join(".ollama/models"))
                .filter(|store| store.is_dir()),
        },
        stage_bind: reader.parse("engine.stage_bind", parse_socket_addr)?,
        max_memory: reader.optional("engine.max_memory", parse_bytes)?,
        max_disk: reader.optional("engine.max_disk", parse_bytes)?,
    })
}

/// The `distributed` section; without `model_sharding_enabled` it names no models and distributes none.
fn distributed(
    reader: &Reader<'_>,
    model_sharding_enabled: bool,
) -> Result<DistributedConfig, ConfigError> {
    Ok(DistributedConfig {
        models: reader
            .optional("distributed.models", |text| {
                Ok(list_items(text)
                    .map(sollol_shared::model_name::normalize)
                    .collect::<Vec<_>>())
            })?
            .unwrap_or_default()
            .into_iter()
            .filter(|_| model_sharding_enabled)
            .collect(),
        auto: model_sharding_enabled && reader.parse("distributed.auto", parse_bool)?,
        max_stages: reader.parse("distributed.max_stages", parse_non_zero)?,
    })
}

/// The `discovery` section.
fn discovery(reader: &Reader<'_>) -> Result<DiscoveryConfig, ConfigError> {
    Ok(DiscoveryConfig {
        scan: reader
            .optional("discovery.scan", |text| {
                list_items(text).map(str::parse).collect()
            })?
            .unwrap_or_default(),
        scan_port: reader.parse("discovery.scan_port", parse_port)?,
        scan_interval: reader.parse("discovery.scan_interval", parse_positive_duration)?,
        mdns: reader.parse("discovery.mdns", parse_bool)?,
        seeds: reader
            .optional("discovery.seeds", |text| {
                list_items(text).map(parse_seed).collect()
            })?
            .unwrap_or_default(),
    })
}

/// The `http` section.
fn http(reader: &Reader<'_>) -> Result<HttpConfig, ConfigError> {
    let list = |key| {
        reader
            .optional(key, |text| {
                list_items(text)
                    .map(|item| {
                        if item.chars().any(char::is_control) || item.contains(char::is_whitespace)
                        {
                            Err(format!("{item:?} has spaces or control characters"))
                        } else {
                            Ok(item.to_owned())
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .map(Option::unwrap_or_default)
    };
    Ok(HttpConfig {
        allowed_origins: list("http.allowed_origins")?,
        allowed_hosts: list("http.allowed_hosts")?,
        max_connections: reader.parse("http.max_connections", parse_non_zero)?,
        max_connections_per_address: reader
            .parse("http.max_connections_per_address", parse_non_zero)?,
    })
}

/// The `cache` section.
fn cache(reader: &Reader<'_>) -> Result<CacheConfig, ConfigError> {
    /// Below this the cache could hold no answer worth keeping (entries are limited to an eighth).
    const SMALLEST: u64 = 1 << 20;
    /// A year: far enough for any use, near enough that adding it to a clock cannot overflow.
    const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);
    Ok(CacheConfig {
        enabled: reader.parse("cache.enabled", parse_bool)?,
        max_bytes: reader.parse("cache.max_bytes", |text| {
            let bytes = parse_bytes(text)?;
            if bytes < SMALLEST {
                return Err("must be at least 1MiB".to_owned());
            }
            Ok(bytes)
        })?,
        ttl: reader.parse("cache.ttl", |text| {
            let ttl = parse_positive_duration(text)?;
            if ttl > LONGEST {
                return Err("must be at most 365d".to_owned());
            }
            Ok(ttl)
        })?,
    })
}

/// Reads keys of a [`RawConfig`] through the value parsers, turning a parser's reason into a
/// [`ConfigError`] that names the key, its value and where the value came from.
struct Reader<'a> {
    raw: &'a RawConfig,
}

impl Reader<'_> {
    fn text(&self, key: &'static str) -> Option<&str> {
        self.raw.get(key).map(|(value, _)| value)
    }

    fn error(&self, key: &'static str, reason: String) -> ConfigError {
        let (value, source) = self
            .raw
            .get(key)
            .map(|(value, source)| (value.to_owned(), source.clone()))
            .unwrap_or((String::new(), Source::Default));
        ConfigError::Invalid {
            key,
            value,
            origin: source,
            reason,
        }
    }

    fn parse_text<T>(
        &self,
        key: &'static str,
        text: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        parse(text.trim()).map_err(|reason| self.error(key, reason))
    }

    fn parse<T>(
        &self,
        key: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let text = self.text(key).unwrap_or_default();
        self.parse_text(key, text, parse)
    }

    fn optional<T>(
        &self,
        key: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.text(key) {
            None => Ok(None),
            Some(text) if text.trim().is_empty() => Ok(None),
            Some(text) => self.parse_text(key, text, parse).map(Some),
        }
    }

    fn non_empty<'t>(&self, key: &'static str, text: &'t str) -> Result<&'t str, ConfigError> {
        if text.trim().is_empty() {
            Err(self.error(key, "must not be empty".to_owned()))
        } else {
            Ok(text)
        }
    }
}
