//! The command line: argument definitions, the config sources they give, and what each command does.
//!
//! Exit codes: 0 success, 64 bad usage or configuration, 1 start-up or run-time failure.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sollol_shared::BUILD_VERSION;
use sollol_shared::api::{API_PREFIX, ClusterSummary, Node, NodeList};
use sollol_shared::protocol::PROTOCOL_VERSION;

use crate::app::{self, StartError};
use crate::cluster::identity::ClusterToken;
use crate::config::{self, Config, ConfigSources, RawConfig};
use crate::http_client::HttpClient;

/// Exit code for bad usage or configuration (BSD `EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
/// Exit code for a failure to start or run.
pub const EXIT_FAILURE: u8 = 1;

const API_TIMEOUT: Duration = Duration::from_secs(5);

/// sollol: one endpoint in front of all your Ollama nodes.
#[derive(Debug, Parser)]
#[command(name = "sollol", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Config file (TOML). Default: `sollol/config.toml` in the platform config directory. Env: SOLLOL_CONFIG.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (token, node id, history). Env: SOLLOL_DATA_DIR.
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log filter, e.g. `info` or `sollol=debug`. Env: SOLLOL_LOG.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a coordinator and a local agent in one process, and print how other nodes join.
    Up {
        #[command(flatten)]
        coordinator: CoordinatorArgs,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Start a coordinator only.
    Coordinator {
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// Start an agent that joins a coordinator and reports this machine.
    Agent {
        /// The coordinator's cluster address, HOST:PORT. Env: SOLLOL_JOIN. Without it the agent joins
        /// the coordinator it finds over mDNS or through discovery.seeds that holds the same token.
        #[arg(long, value_name = "HOST:PORT")]
        join: Option<String>,
        /// The cluster token (`sollol token` on the coordinator prints it). Env: SOLLOL_TOKEN.
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Show the cluster summary of a running coordinator.
    Status(ClientArgs),
    /// List the nodes a running coordinator knows.
    Nodes(ClientArgs),
    /// Show what a running coordinator found by scanning address ranges (`discovery.scan`), and why
    /// the rest did not count.
    Discover(ClientArgs),
    /// Plan and load a distributed model on the agents now, with progress, and show the plan.
    Distribute {
        /// A model of `distributed.models`, `name:tag`.
        model: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print this coordinator's cluster token (created on first start).
    Token,
    /// Print the effective configuration and where each value comes from.
    PrintConfig,
    /// Print the build and protocol versions.
    Version,
    /// Print the script that installs this binary as a systemd service (an agent joining a
    /// coordinator); pipe it to `sudo sh -s -- --binary ./sollol --join HOST:PORT --token TOKEN`.
    InstallScript,
}

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// HTTP gateway address. Env: SOLLOL_GATEWAY_BIND. Default 127.0.0.1:11435.
    #[arg(long, value_name = "IP:PORT")]
    pub gateway_bind: Option<String>,
    /// Address agents join on. Env: SOLLOL_CLUSTER_BIND. Default 0.0.0.0:11436.
    #[arg(long, value_name = "IP:PORT")]
    pub cluster_bind: Option<String>,
    /// Heartbeats missed before a node is down. Env: SOLLOL_DOWN_AFTER_MISSED. Default 3.
    #[arg(long, value_name = "N")]
    pub down_after_missed: Option<String>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Name shown for this node. Env: SOLLOL_NODE_NAME. Default: the host name.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Report interval, e.g. 2s. Env: SOLLOL_HEARTBEAT_INTERVAL. Default 2s.
    #[arg(long, value_name = "DURATION")]
    pub heartbeat_interval: Option<String>,
    /// This node's Ollama, http://HOST:PORT. Env: SOLLOL_OLLAMA_URL. Default: http://127.0.0.1:11434 if it answers.
    #[arg(long, value_name = "URL")]
    pub ollama_url: Option<String>,
    /// Model directory. Env: SOLLOL_MODELS_DIR. Default: DATA_DIR/models.
    #[arg(long, value_name = "DIR")]
    pub models_dir: Option<PathBuf>,
    /// Cap of the reconnect backoff, e.g. 30s. Env: SOLLOL_RECONNECT_MAX_BACKOFF.
    #[arg(long, value_name = "DURATION")]
    pub reconnect_max_backoff: Option<String>,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The coordinator's HTTP address. Env: SOLLOL_COORDINATOR_URL. Default: from coordinator.gateway_bind.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Print JSON (the API's own) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Parses arguments; on `--help`/`--version` prints and gives exit code 0, on bad usage 64.
pub fn parse() -> Result<Cli, ExitCode> {
    Cli::try_parse().map_err(|error| {
        let _ = error.print();
        if error.use_stderr() {
            ExitCode::from(EXIT_USAGE)
        } else {
            ExitCode::SUCCESS
        }
    })
}

impl Cli {
    /// The config sources these arguments give, over the given environment.
    pub fn config_sources(&self, env: BTreeMap<String, String>) -> ConfigSources {
        let (file, file_is_explicit) = match (&self.config, env.get("SOLLOL_CONFIG")) {
            (Some(path), _) => (Some(path.clone()), true),
            (None, Some(path)) => (Some(PathBuf::from(path)), true),
            (None, None) => (config::default_config_file(), false),
        };
        let mut cli = Vec::new();
        let mut push = |key: &'static str, value: Option<String>| {
            if let Some(value) = value {
                cli.push((key, value));
            }
        };
        push(
            "data_dir",
            self.data_dir
                .as_ref()
                .map(|path| path.display().to_string()),
        );
        push("log_level", self.log_level.clone());
        match &self.command {
            Command::Up { coordinator, agent } => {
                coordinator.push_into(&mut push);
                agent.push_into(&mut push);
            }
            Command::Coordinator { coordinator } => coordinator.push_into(&mut push),
            Command::Agent { join, token, agent } => {
                push("agent.join", join.clone());
                push("agent.token", token.clone());
                agent.push_into(&mut push);
            }
            Command::Status(client)
            | Command::Nodes(client)
            | Command::Discover(client)
            | Command::Distribute { client, .. } => push("coordinator_url", client.url.clone()),
            Command::Token | Command::PrintConfig | Command::Version | Command::InstallScript => {}
        }
        ConfigSources {
            file,
            file_is_explicit,
            env,
            cli,
        }
    }
}

impl CoordinatorArgs {
    fn push_into(&self, push: &mut impl FnMut(&'static str, Option<String>)) {
        push("coordinator.gateway_bind", self.gateway_bind.clone());
        push("coordinator.cluster_bind", self.cluster_bind.clone());
        push(
            "coordinator.down_after_missed",
            self.down_after_missed.clone(),
        );
    }
}

impl AgentArgs {
    fn push_into(&self, push: &mut impl FnMut(&'static str, Option<String>)) {
        push("agent.name", self.name.clone());
        push("agent.heartbeat_interval", self.heartbeat_interval.clone());
        push("agent.ollama_url", self.ollama_url.clone());
        push(
            "agent.models_dir",
            self.models_dir
                .as_ref()
                .map(|path| path.display().to_string()),
        );
        push(
            "agent.reconnect_max_backoff",
            self.reconnect_max_backoff.clone(),
        );
    }
}

/// Loads and validates the configuration; errors are usage errors.
pub fn load_config(
    cli: &Cli,
    env: BTreeMap<String, String>,
) -> Result<(RawConfig, Config), config::ConfigError> {
    let raw = RawConfig::load(&cli.config_sources(env))?;
    let config = Config::try_from(&raw)?;
    Ok((raw, config))
}

/// Runs one command to completion.
pub async fn run(command: Command, raw: &RawConfig, config: Config) -> ExitCode {
    match command {
        Command::Version => {
            println!("sollol {BUILD_VERSION} (protocol v{PROTOCOL_VERSION})");
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
        Command::Distribute { model, client } => distribute(&config, &model, client.json).await,
        Command::Coordinator { .. } => serve(&config, false).await,
        Command::Up { .. } => serve(&config, true).await,
        Command::Agent { .. } => agent(&config).await,
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
    let coordinator = address.as_deref().unwrap_or("found by discovery");
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
    tracing::error!(instance = %mdns.announced_as(), "`agent.token` is not set: this agent cannot join a cluster. It announces itself over mDNS, so `sollol discover` on the coordinator lists it as discovered, not joined; start it again with --token TOKEN (printed by `sollol up`)");
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
    match HttpClient::default().get_json::<T>(&url, API_TIMEOUT).await {
        Ok(value) if json => print_json(&value),
        Ok(value) => {
            print!("{}", render(&value));
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error),
    }
}

fn now_ms() -> u64 {
    crate::telemetry::unix_ms(std::time::SystemTime::now())
}

/// `sollol discover` as text.
pub fn render_discovery(discovery: &sollol_shared::api::Discovery, now_ms: u64) -> String {
    let mut text = render_mdns(discovery.mdns.as_ref());
    let Some(scan) = &discovery.scan else {
        text.push_str("range scan: off (set discovery.scan, e.g. [\"192.168.1.0/24\"], to look for Ollama servers)\n");
        return text;
    };
    let ranges = scan.ranges.join(", ");
    let Some(at) = scan.scanned_at_ms else {
        let _ = writeln!(
            text,
            "range scan of {ranges} on port {}: not finished yet",
            scan.port
        );
        return text;
    };
    let _ = writeln!(
        text,
        "range scan of {ranges} on port {}: {} addresses, {} ago; {} Ollama server(s), {} other service(s)",
        scan.port,
        scan.addresses,
        human_duration(now_ms.saturating_sub(at)),
        scan.found.len(),
        scan.rejected.len()
    );
    for server in &scan.found {
        let _ = writeln!(
            text,
            "  found       {}  Ollama {} (a node: ollama@{})",
            server.address, server.version, server.address
        );
    }
    for other in &scan.rejected {
        let _ = writeln!(text, "  not Ollama  {}  {}", other.address, other.reason);
    }
    text
}

fn render_mdns(mdns: Option<&sollol_shared::api::MdnsDiscovery>) -> String {
    let mut text = String::new();
    let Some(mdns) = mdns else {
        text.push_str("mDNS: off (discovery.mdns = false)\n");
        return text;
    };
    let Some(instance) = &mdns.announced_as else {
        let _ = writeln!(
            text,
            "mDNS: not running: {}",
            mdns.error.as_deref().unwrap_or("unknown reason")
        );
        return text;
    };
    let _ = writeln!(
        text,
        "mDNS: announced as {instance}; {} peer(s)",
        mdns.peers.len()
    );
    for interface in &mdns.interfaces {
        if interface.answers == 0 {
            let _ = writeln!(
                text,
                "  mDNS: no answer on {} ({})",
                interface.name, interface.address
            );
        } else {
            let _ = writeln!(
                text,
                "  mDNS: {} answer(s) on {} ({})",
                interface.answers, interface.name, interface.address
            );
        }
    }
    for peer in &mdns.peers {
        let state = match (peer.role.as_str(), peer.joined, peer.has_token) {
            ("agent", true, _) => "agent, joined",
            ("agent", false, true) => "agent, discovered, not joined",
            ("agent", false, false) => "agent, discovered, not joined (it has no token)",
            _ => "another coordinator",
        };
        let address = peer.addresses.first().map_or("?", String::as_str);
        // An agent without a token listens on no port.
        let address = match peer.port {
            0 => address.to_owned(),
            port => format!("{address}:{port}"),
        };
        let _ = writeln!(
            text,
            "  {:<24} {address}  {state}  (sollol {}, runs {}, id {})",
            peer.name,
            peer.version,
            peer.roles.join(","),
            peer.node_id
        );
    }
    text
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
    let poller = tokio::spawn(async move {
        let client = HttpClient::default();
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
            let line = render_progress(&progress);
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
        .post_json::<sollol_shared::api::DistributedModel>(&url, PLAN_TIMEOUT)
        .await;
    poller.abort();
    if terminal {
        eprintln!();
    }
    match planned {
        Ok(status) if json => print_json(&status),
        Ok(status) => {
            print!("{}", render_plan(&status, started.elapsed()));
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error),
    }
}

/// One line of a plan's progress: the phase, the elapsed time, and each stage (✓ once loaded).
pub fn render_progress(progress: &sollol_shared::api::PlanProgress) -> String {
    use sollol_shared::api::PlanPhase;
    let seconds = progress.elapsed_ms as f64 / 1e3;
    match progress.phase {
        PlanPhase::Describing => format!("describing the agents ({seconds:.1} s)"),
        PlanPhase::Loading => {
            let loaded = progress.stages.iter().filter(|stage| stage.loaded).count();
            let stages: Vec<String> = progress
                .stages
                .iter()
                .map(|stage| {
                    let fetched = fetched_text(stage);
                    format!(
                        "{} {}-{} {}{fetched}",
                        stage.name,
                        stage.layers_start,
                        stage.layers_end.saturating_sub(1),
                        if stage.loaded { "✓" } else { "…" }
                    )
                })
                .collect();
            format!(
                "loading the stages, {loaded} of {} ready ({seconds:.1} s): {}",
                progress.stages.len(),
                stages.join(", ")
            )
        }
    }
}

/// `, fetched 12 of 47 MiB` while a stage fetches its tensors from a peer, `, fetched 47 MiB` after.
pub fn fetched_text(stage: &sollol_shared::api::StageProgress) -> String {
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    match (stage.loaded, stage.fetched_bytes, stage.fetch_total_bytes) {
        (_, 0, 0) => String::new(),
        (false, done, total) if total > 0 => {
            format!(", fetched {:.0} of {:.0} MiB", mib(done), mib(total))
        }
        (_, done, _) => format!(", fetched {:.0} MiB", mib(done)),
    }
}

/// A progress line without its elapsed time, to print a line per change when not on a terminal.
fn strip_elapsed(line: &str) -> String {
    match (line.find(" ("), line.find(" s)")) {
        (Some(start), Some(end)) if end > start => {
            format!("{}{}", &line[..start], &line[end + 3..])
        }
        _ => line.to_owned(),
    }
}

/// `sollol distribute` as text.
pub fn render_plan(status: &sollol_shared::api::DistributedModel, took: Duration) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "{} ({}) over {} stages, ready in {:.1} s",
        status.model,
        status.digest.as_deref().unwrap_or("digest unknown"),
        status.stages.len(),
        took.as_secs_f64()
    );
    let _ = writeln!(
        text,
        "  {:<5} {:<20} {:<9} {:<22} {:>9}",
        "stage", "node", "layers", "also", "resident"
    );
    for (index, stage) in status.stages.iter().enumerate() {
        let mut roles = Vec::new();
        if stage.embed {
            roles.push("embeddings");
        }
        if stage.head {
            roles.push("head, sampling");
        }
        let _ = writeln!(
            text,
            "  {:<5} {:<20} {:<9} {:<22} {:>5} MiB",
            index + 1,
            stage.name,
            format!(
                "{}-{}",
                stage.layers_start,
                stage.layers_end.saturating_sub(1)
            ),
            roles.join(", "),
            stage.resident_bytes >> 20
        );
    }
    if !status.reasons.is_empty() {
        let _ = writeln!(text, "why:");
        for reason in &status.reasons {
            let _ = writeln!(text, "  - {reason}");
        }
    }
    text
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

fn banner(coordinator: &app::CoordinatorHandle) -> String {
    let gateway = config::loopback_if_unspecified(coordinator.gateway_address);
    let cluster = coordinator.cluster_address;
    let join_host = if cluster.ip().is_unspecified() {
        crate::cluster::identity::host_name()
    } else {
        cluster.ip().to_string()
    };
    let mut text = String::new();
    let _ = writeln!(text, "sollol {BUILD_VERSION} is running");
    let _ = writeln!(text, "  Gateway:   http://{gateway}  (Ollama API)");
    let _ = writeln!(text, "  Dashboard: http://{gateway}/dashboard/");
    let _ = writeln!(text, "  Cluster:   {cluster}");
    let _ = writeln!(text, "  Data:      {}", coordinator.data_dir.display());
    let _ = writeln!(text, "Join other nodes with:");
    let _ = writeln!(
        text,
        "  sollol agent --join {join_host}:{} --token {}",
        cluster.port(),
        coordinator.token.expose()
    );
    let _ = writeln!(
        text,
        "Or, on a Linux node with systemd, install the agent as a service from a copy of this binary:"
    );
    let _ = writeln!(
        text,
        "  ./sollol install-script | sudo sh -s -- --binary ./sollol --join {join_host}:{} --token {}",
        cluster.port(),
        coordinator.token.expose()
    );
    if cluster.ip().is_loopback() {
        let _ = writeln!(
            text,
            "  (the cluster port is loopback-only; set coordinator.cluster_bind to accept other machines)"
        );
    }
    text
}

/// `scripts/install-agent.sh`, shipped inside the binary so that a copied binary can install itself.
pub const INSTALL_SCRIPT: &str = include_str!("../../../scripts/install-agent.sh");

/// `sollol status` as text.
pub fn render_status(summary: &ClusterSummary) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "coordinator  sollol {} (protocol v{}), up {}",
        summary.build_version,
        summary.protocol_version,
        human_duration(summary.uptime_ms)
    );
    let _ = writeln!(text, "gateway      {}", summary.gateway_address);
    let _ = writeln!(text, "cluster      {}", summary.cluster_address);
    let _ = writeln!(
        text,
        "nodes        {} known: {} up, {} suspect, {} down, {} left",
        summary.nodes_total,
        summary.nodes_up,
        summary.nodes_suspect,
        summary.nodes_down,
        summary.nodes_left
    );
    if summary.history_dropped > 0 {
        let _ = writeln!(
            text,
            "warning      {} history records dropped (writer behind)",
            summary.history_dropped
        );
    }
    text
}

/// `sollol nodes` as a table.
pub fn render_nodes(nodes: &[Node], now_ms: u64) -> String {
    if nodes.is_empty() {
        return "no nodes yet: start `sollol agent --join HOST:PORT --token TOKEN` on a machine\n"
            .to_owned();
    }
    let header = [
        "NAME",
        "STATUS",
        "CPU",
        "LOAD",
        "RAM USED/TOTAL",
        "GPUS",
        "TEMP",
        "OLLAMA",
        "LAST SEEN",
        "ID",
    ];
    let rows: Vec<[String; 10]> = nodes
        .iter()
        .map(|node| {
            let hardware = node.hardware.as_ref();
            let cpu = hardware.map_or("-".to_owned(), |hw| {
                format!("{} cores", hw.cpu.logical_cores)
            });
            let load = hardware.map_or("-".to_owned(), |hw| {
                format!("{:.2}", hw.cpu.load_average[0])
            });
            let ram = hardware.map_or("-".to_owned(), |hw| {
                let used = hw
                    .memory
                    .total_bytes
                    .saturating_sub(hw.memory.available_bytes);
                format!("{}/{}", gib(used), gib(hw.memory.total_bytes))
            });
            let gpus = hardware.map_or("-".to_owned(), |hw| {
                if hw.gpus.is_empty() {
                    "none".to_owned()
                } else {
                    hw.gpus
                        .iter()
                        .map(|gpu| {
                            format!(
                                "{} {}/{}",
                                gpu.name,
                                gib(gpu.vram_used_bytes),
                                gib(gpu.vram_total_bytes)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            });
            let temperature = hardware
                .and_then(|hw| {
                    hw.temperatures
                        .iter()
                        .map(|reading| reading.celsius)
                        .reduce(f32::max)
                })
                .map_or("-".to_owned(), |celsius| format!("{celsius:.0}°C"));
            let ollama = match &node.ollama {
                None => "-".to_owned(),
                Some(state) if !state.reachable => "unreachable".to_owned(),
                Some(state) => format!(
                    "{} models, {} loaded",
                    state.models.len(),
                    state.loaded.len()
                ),
            };
            let last_seen = format!(
                "{} ago",
                human_duration(now_ms.saturating_sub(node.last_seen_ms))
            );
            [
                node.name.clone(),
                node.status.as_str().to_owned(),
                cpu,
                load,
                ram,
                gpus,
                temperature,
                ollama,
                last_seen,
                node.id.chars().take(8).collect(),
            ]
        })
        .collect();
    let mut widths = header.map(|title| title.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(text, "{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    text
}

fn gib(bytes: u64) -> String {
    format!("{:.1}G", bytes as f64 / (1024.0 * 1024.0 * 1024.0))
}

fn human_duration(ms: u64) -> String {
    let seconds = ms / 1000;
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{}s", seconds / 60, seconds % 60),
        3600..86400 => format!("{}h{}m", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{}d{}h", seconds / 86400, seconds % 86400 / 3600),
    }
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

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(EXIT_FAILURE)
}

#[cfg(test)]
mod tests {

    #[test]
    fn mdns_status_names_silent_interfaces_and_peers_that_cannot_join() {
        use sollol_shared::api::{MdnsDiscovery, MdnsInterface, MdnsPeer};
        assert_eq!(
            super::render_mdns(None),
            "mDNS: off (discovery.mdns = false)\n"
        );
        let failed = MdnsDiscovery {
            error: Some("not announced: the cluster port (127.0.0.1:11436) is reachable from this machine only".to_owned()),
            ..MdnsDiscovery::default()
        };
        assert_eq!(
            super::render_mdns(Some(&failed)),
            "mDNS: not running: not announced: the cluster port (127.0.0.1:11436) is reachable from this machine only\n"
        );
        let peer = |name: &str, joined, has_token| MdnsPeer {
            instance: format!("{name}-01234567._sollol._tcp.local."),
            node_id: "0123456789abcdef".to_owned(),
            name: name.to_owned(),
            role: "agent".to_owned(),
            roles: if has_token {
                vec!["agent".to_owned(), "stage".to_owned()]
            } else {
                vec!["agent".to_owned()]
            },
            version: "0.1.0".to_owned(),
            addresses: vec!["192.168.1.23".to_owned()],
            port: if has_token { 7703 } else { 0 },
            has_token,
            joined,
        };
        let running = MdnsDiscovery {
            announced_as: Some("lab-89abcdef._sollol._tcp.local.".to_owned()),
            error: None,
            interfaces: vec![
                MdnsInterface {
                    name: "eth0".to_owned(),
                    address: "192.168.1.2/24".to_owned(),
                    answers: 2,
                },
                MdnsInterface {
                    name: "wlan0".to_owned(),
                    address: "10.0.0.2/24".to_owned(),
                    answers: 0,
                },
            ],
            peers: vec![peer("pi-left", false, true), peer("pi-right", false, false)],
        };
        let text = super::render_mdns(Some(&running));
        for line in [
            "mDNS: announced as lab-89abcdef._sollol._tcp.local.; 2 peer(s)",
            "  mDNS: 2 answer(s) on eth0 (192.168.1.2/24)",
            "  mDNS: no answer on wlan0 (10.0.0.2/24)",
            "  pi-left                  192.168.1.23:7703  agent, discovered, not joined  (sollol 0.1.0, runs agent,stage, id 0123456789abcdef)",
            "  pi-right                 192.168.1.23  agent, discovered, not joined (it has no token)  (sollol 0.1.0, runs agent, id 0123456789abcdef)",
        ] {
            assert!(
                text.lines().any(|have| have == line),
                "{line:?} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn plan_progress_reads_as_one_line() {
        use sollol_shared::api::{PlanPhase, PlanProgress, StageProgress};
        let stage =
            |name: &str, start, end, loaded, (fetched_bytes, fetch_total_bytes)| StageProgress {
                name: name.to_owned(),
                layers_start: start,
                layers_end: end,
                loaded,
                fetched_bytes,
                fetch_total_bytes,
            };
        let describing = PlanProgress {
            phase: PlanPhase::Describing,
            elapsed_ms: 300,
            stages: Vec::new(),
        };
        assert_eq!(
            render_progress(&describing),
            "describing the agents (0.3 s)"
        );
        let loading = PlanProgress {
            phase: PlanPhase::Loading,
            elapsed_ms: 2_340,
            stages: vec![
                stage("left", 0, 15, true, (48 << 20, 48 << 20)),
                stage("right", 15, 30, false, (12 << 20, 47 << 20)),
                stage("more", 30, 40, false, (0, 0)),
            ],
        };
        let line = render_progress(&loading);
        assert_eq!(
            line,
            "loading the stages, 1 of 3 ready (2.3 s): left 0-14 ✓, fetched 48 MiB, right 15-29 …, fetched 12 of 47 MiB, more 30-39 …"
        );
        assert_eq!(
            strip_elapsed(&line),
            "loading the stages, 1 of 3 ready: left 0-14 ✓, fetched 48 MiB, right 15-29 …, fetched 12 of 47 MiB, more 30-39 …"
        );
    }

    use super::*;

    #[test]
    fn durations_read_well() {
        fn check(ms: u64, expected: &str) {
            assert_eq!(human_duration(ms), expected);
        }
        check(999, "0s");
        check(59_000, "59s");
        check(61_000, "1m1s");
        check(3_600_000 + 120_000, "1h2m");
        check(90_000_000, "1d1h");
    }

    #[test]
    fn empty_node_table_says_how_to_add_one() {
        assert!(render_nodes(&[], 0).contains("sollol agent --join"));
    }
}
