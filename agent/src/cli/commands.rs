//! What each command does: starting the coordinator and agents, asking a running coordinator, and
//! printing the answers (through `render`) with the exit code each outcome gets.

use std::process::ExitCode;
use std::time::Duration;

use sollol_shared::BUILD_VERSION;
use sollol_shared::api::{API_PREFIX, ClusterSummary, NodeList};
use sollol_shared::protocol::PROTOCOL_VERSION;

use super::args::Command;
use super::render::{
    render_banner, render_discovery, render_nodes, render_plan, render_progress, render_status,
    strip_elapsed, terminal_safe,
};
use super::{EXIT_FAILURE, EXIT_USAGE};
use crate::app::{self, StartError};
use crate::cluster::identity::ClusterToken;
use crate::config::{self, Config, RawConfig};
use crate::http_client::HttpClient;

pub(super) const API_TIMEOUT: Duration = Duration::from_secs(5);

/// `scripts/install-agent.sh`, shipped inside the binary so that a copied binary can install itself.
pub const INSTALL_SCRIPT: &str = include_str!("../../../scripts/install-agent.sh");

/// Runs one command to completion.
pub async fn run(command: Command, raw: &RawConfig, config: Config) -> ExitCode {
    match command {
        Command::Version => {
            // The engine's kernels are chosen on this CPU at start (`SOLLOL_KERNELS=portable` forces
            // the portable ones): saying which tells a user what speed to expect.
            let kernels = sollol_kernels::Kernels::chosen().name();
            println!("sollol {BUILD_VERSION} (protocol v{PROTOCOL_VERSION}, kernels {kernels})");
            ExitCode::SUCCESS
        }
        Command::InstallScript => {
            print!("{INSTALL_SCRIPT}");
            ExitCode::SUCCESS
        }
        Command::PrintConfig => {
            print!("{}", raw.to_toml(&config));
            ExitCode::SUCCESS
        }
        Command::Token => match ClusterToken::load(&config.data_dir) {
            Ok(Some(token)) => {
                println!("{}", token.expose());
                ExitCode::SUCCESS
            }
            Ok(None) => {
                eprintln!(
                    "error: no cluster token in {} yet; `sollol up` or `sollol coordinator` creates it on first start",
                    config.data_dir.display()
                );
                ExitCode::from(EXIT_FAILURE)
            }
            Err(error) => fail(&error),
        },
        Command::Status(client) => status(&config, client.json).await,
        Command::Nodes(client) => nodes(&config, client.json).await,
        Command::Discover(client) => discover(&config, client.json).await,
        Command::Models(client) => super::models::models(&config, client.json).await,
        Command::Pull { model, nodes, .. } => {
            super::models::pull(&config, &model, nodes.nodes.as_deref()).await
        }
        Command::Rm { model, nodes, .. } => {
            super::models::remove(&config, &model, nodes.nodes.as_deref()).await
        }
        Command::Distribute { model, client } => distribute(&config, &model, client.json).await,
        Command::Coordinator { .. } => serve(&config, false).await,
        Command::Up { .. } => serve(&config, true).await,
        Command::Agent { token, .. } => {
            if token.is_some() {
                eprintln!(
                    "warning: --token puts the cluster token on the command line, where every user of this machine can read it (ps, /proc); use --token-file FILE or SOLLOL_TOKEN"
                );
            }
            agent(&config).await
        }
    }
}

async fn serve(config: &Config, with_agent: bool) -> ExitCode {
    let coordinator = match app::start_coordinator(config).await {
        Ok(coordinator) => coordinator,
        Err(error) => return start_failed(&error),
    };
    let local_join = config::loopback_if_unspecified(coordinator.cluster_address).to_string();
    let mut agent = if with_agent {
        // The coordinator announces this machine over mDNS; its own agent joins over loopback.
        let mut agent_config = config.clone();
        agent_config.discovery.mdns = false;
        match app::start_agent(&agent_config, local_join, coordinator.token.clone()).await {
            Ok(agent) => Some(agent),
            Err(error) => {
                coordinator.shutdown(config.shutdown_grace).await;
                return start_failed(&error);
            }
        }
    } else {
        None
    };
    print!("{}", banner(&coordinator));
    let agent_failed = async {
        match agent.as_mut() {
            Some(agent) => agent.finished().await,
            None => std::future::pending().await,
        }
    };
    let mut exit = ExitCode::SUCCESS;
    tokio::select! {
        signal = wait_for_signal() => tracing::info!(%signal, "shutting down"),
        result = agent_failed => {
            if let Err(error) = result {
                tracing::error!(%error, "local agent stopped");
                exit = ExitCode::from(EXIT_FAILURE);
            }
            agent = None;
        }
    }
    let mut outcome = app::Shutdown::Graceful;
    if let Some(agent) = agent
        && !matches!(
            agent.stop(config.shutdown_grace).await,
            Ok(app::Shutdown::Graceful)
        )
    {
        outcome = app::Shutdown::Forced;
    }
    if coordinator.shutdown(config.shutdown_grace).await == app::Shutdown::Forced {
        outcome = app::Shutdown::Forced;
    }
    tracing::info!(shutdown = outcome.as_str(), "stopped");
    exit
}

async fn agent(config: &Config) -> ExitCode {
    if config.agent.token.is_none() && config.discovery.mdns {
        return agent_without_token(config).await;
    }
    let (address, token) = match app::join_target(config) {
        Ok(target) => target,
        Err(error) => return start_failed(&error),
    };
    let mut agent = match app::start_agent(config, address.clone(), token).await {
        Ok(agent) => agent,
        Err(error) => return start_failed(&error),
    };
    let coordinator = if address.is_empty() {
        "found by discovery".to_owned()
    } else {
        address.join(", ")
    };
    tracing::info!(id = %agent.node_id, name = %config.agent.name, %coordinator, "agent started");
    tokio::select! {
        signal = wait_for_signal() => {
            tracing::info!(%signal, "shutting down");
            let outcome = match agent.stop(config.shutdown_grace).await {
                Ok(outcome) => outcome,
                Err(error) => return fail(&error),
            };
            tracing::info!(shutdown = outcome.as_str(), "stopped");
            ExitCode::SUCCESS
        }
        result = agent.finished() => match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => fail(&error),
        },
    }
}

/// `sollol agent` without a token: visible to the coordinators on the LAN, waiting to be given one.
async fn agent_without_token(config: &Config) -> ExitCode {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mdns = match app::announce_without_token(config, shutdown.clone()) {
        Ok(mdns) => mdns,
        Err(error) => return start_failed(&error),
    };
    tracing::error!(instance = %mdns.announced_as(), "`agent.token` is not set: this agent cannot join a cluster. It announces itself over mDNS, so `sollol discover` on the coordinator lists it as discovered, not joined; start it again with --token-file FILE (a copy of the coordinator's token, which `sollol token` prints)");
    let signal = wait_for_signal().await;
    tracing::info!(%signal, "shutting down");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), mdns.stopped()).await;
    ExitCode::SUCCESS
}

async fn status(config: &Config, json: bool) -> ExitCode {
    show(config, "cluster", json, |summary: &ClusterSummary| {
        render_status(summary)
    })
    .await
}

async fn nodes(config: &Config, json: bool) -> ExitCode {
    show(config, "nodes", json, |list: &NodeList| {
        render_nodes(&list.nodes, now_ms())
    })
    .await
}

async fn discover(config: &Config, json: bool) -> ExitCode {
    show(
        config,
        "discovery",
        json,
        |found: &sollol_shared::api::Discovery| render_discovery(found, now_ms()),
    )
    .await
}

/// Fetches `path` of the coordinator's sollol API and prints it: as the API's JSON, or as `render` says.
async fn show<T: serde::de::DeserializeOwned + serde::Serialize>(
    config: &Config,
    path: &str,
    json: bool,
    render: impl FnOnce(&T) -> String,
) -> ExitCode {
    let url = format!("{}{API_PREFIX}/{path}", config.coordinator_url);
    match HttpClient::default()
        .with_key(config.api_key.as_deref())
        .get_json::<T>(&url, API_TIMEOUT)
        .await
    {
        Ok(value) if json => print_json(&value),
        Ok(value) => {
            print!("{}", terminal_safe(&render(&value)));
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error),
    }
}

fn now_ms() -> u64 {
    crate::telemetry::unix_ms(std::time::SystemTime::now())
}

/// Loading a large model's stages can take minutes.
const PLAN_TIMEOUT: Duration = Duration::from_secs(600);

async fn distribute(config: &Config, model: &str, json: bool) -> ExitCode {
    use std::io::{IsTerminal, Write};
    let url = format!(
        "{}{API_PREFIX}/distributed/{}/plan",
        config.coordinator_url,
        sollol_shared::model_name::normalize(model)
    );
    let started = std::time::Instant::now();
    let terminal = std::io::stderr().is_terminal();
    eprintln!("planning {model} on the agents and loading each stage's layers…");
    // The plan's progress, from the coordinator's API while the plan is made.
    let list_url = format!("{}{API_PREFIX}/distributed", config.coordinator_url);
    let wanted = sollol_shared::model_name::normalize(model);
    let client = HttpClient::default().with_key(config.api_key.as_deref());
    let poller = tokio::spawn(async move {
        let mut shown = String::new();
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let Ok(list) = client
                .get_json::<sollol_shared::api::DistributedList>(&list_url, API_TIMEOUT)
                .await
            else {
                continue;
            };
            let Some(progress) = list
                .models
                .into_iter()
                .find(|status| status.model == wanted)
                .and_then(|status| status.planning)
            else {
                continue;
            };
            let line = terminal_safe(&render_progress(&progress)).into_owned();
            if terminal {
                eprint!("\r  {line:<100}");
                let _ = std::io::stderr().flush();
            } else if strip_elapsed(&line) != strip_elapsed(&shown) {
                eprintln!("  {line}");
            }
            shown = line;
        }
    });
    let planned = HttpClient::default()
        .with_key(config.api_key.as_deref())
        .post_json::<sollol_shared::api::DistributedModel>(&url, PLAN_TIMEOUT)
        .await;
    poller.abort();
    if terminal {
        eprintln!();
    }
    match planned {
        Ok(status) if json => print_json(&status),
        Ok(status) => {
            print!(
                "{}",
                terminal_safe(&render_plan(&status, started.elapsed()))
            );
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error),
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error),
    }
}

/// The start-up banner: where the gateway and cluster listen, and how other nodes join.
fn banner(coordinator: &app::CoordinatorHandle) -> String {
    let cluster = coordinator.cluster_address;
    // An unspecified bind address is no address to join; the host name is the best guess at one.
    let join_host = if cluster.ip().is_unspecified() {
        crate::cluster::identity::host_name()
    } else {
        cluster.ip().to_string()
    };
    render_banner(
        coordinator.gateway_address,
        cluster,
        &join_host,
        &coordinator.data_dir,
        coordinator.token.expose(),
    )
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

fn start_failed(error: &StartError) -> ExitCode {
    match error {
        StartError::Usage(message) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_USAGE)
        }
        error => fail(error),
    }
}

pub(super) fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {}", terminal_safe(&error.to_string()));
    ExitCode::from(EXIT_FAILURE)
}
