//! The built-in engine on an agent: whether it runs (`engine.mode`), on which port, with which models.

use std::sync::Arc;
use std::time::Duration;

use sollol_engine::engine::{self, Engine, ModelFile};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{StartError, bind, http_guard, local_address};
use crate::config::{Config, EngineMode};

/// Starts the built-in engine when the configuration asks for it (or, in `auto`, when there are GGUF
/// models and no Ollama answers) on `tasks`; returns the URL of its Ollama-compatible API.
pub(super) async fn start(
    config: &Config,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<Option<String>, StartError> {
    let settings = &config.engine;
    if settings.mode == EngineMode::Off {
        return Ok(None);
    }
    let models_dir = config.agent.models_dir.clone();
    let store = settings.ollama_models.clone();
    let files =
        tokio::task::spawn_blocking(move || engine::discover(&models_dir, store.as_deref()))
            .await
            .map_err(|error| StartError::Usage(format!("model discovery panicked: {error}")))?;
    if settings.mode == EngineMode::Auto && !auto_wants_engine(config, &files).await {
        return Ok(None);
    }
    if files.is_empty() {
        tracing::warn!(dir = %config.agent.models_dir.display(), "the built-in engine has no models: put GGUF files in the models directory (scripts/fetch-model fetches the test model)");
    }
    let listener = bind(settings.bind, "engine").await?;
    let address = crate::config::loopback_if_unspecified(local_address(&listener, settings.bind));
    let names: Vec<&str> = files.iter().map(|file| file.name.as_str()).collect();
    tracing::info!(%address, models = ?names, "built-in engine serving");
    // Without engine.max_memory, models loaded whole stay within what the node had available when
    // the engine started (unknown: no limit).
    let budget = settings.max_memory.or_else(|| {
        let available = crate::telemetry::available_memory_bytes();
        (available > 0).then_some(available)
    });
    let engine = Arc::new(
        Engine::new(files, settings.parallel.get() as usize, settings.keep_alive)
            .with_max_memory(budget)
            .watching(
                config.agent.models_dir.clone(),
                settings.ollama_models.clone(),
            ),
    );
    let (boundary, limits) = http_guard(config, settings.bind);
    tasks.spawn(sollol_engine::server::serve(
        listener,
        engine,
        boundary,
        limits,
        shutdown.clone(),
    ));
    Ok(Some(format!("http://{address}")))
}

/// `engine.mode = auto`: the engine runs only where no Ollama answers and there are models to serve.
async fn auto_wants_engine(config: &Config, files: &[ModelFile]) -> bool {
    let ollama = config
        .agent
        .ollama_url
        .clone()
        .unwrap_or_else(|| crate::telemetry::ollama::DEFAULT_OLLAMA_URL.to_owned());
    let probe = crate::http_client::HttpClient::default()
        .get_json::<serde_json::Value>(&format!("{ollama}/api/version"), Duration::from_secs(1))
        .await;
    if probe.is_ok() {
        tracing::info!(%ollama, "an Ollama answers; the built-in engine stays off (engine.mode = on serves its models anyway)");
        return false;
    }
    if files.is_empty() {
        tracing::warn!(
            %ollama,
            models_dir = %config.agent.models_dir.display(),
            "no Ollama answers and there is no GGUF model, so this node has nothing to serve: put a .gguf file in the models directory (scripts/fetch-model fetches the test model) or start Ollama"
        );
        return false;
    }
    true
}
