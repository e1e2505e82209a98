//! The argument definitions (clap), and the configuration sources and values they give.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use super::EXIT_USAGE;
use crate::config::{self, Config, ConfigSources, RawConfig};

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
        /// A file holding the cluster token (`sollol token` on the coordinator prints it). Env:
        /// SOLLOL_TOKEN_FILE, or the token itself in SOLLOL_TOKEN.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// The cluster token itself. Avoid: a command line is visible to every user of the machine
        /// (`ps`); prefer --token-file or SOLLOL_TOKEN.
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
    /// Show which node holds which model: a model × node matrix (loaded, present, absent).
    Models(ClientArgs),
    /// Pull a model onto the cluster through the gateway, with progress: onto the best node for a new
    /// copy, or onto the nodes named.
    Pull {
        /// The model, `name:tag` as Ollama's registry names it.
        model: String,
        #[command(flatten)]
        nodes: NodesArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a model from every node that holds it, or from the nodes named.
    Rm {
        /// The model, `name:tag`.
        model: String,
        #[command(flatten)]
        nodes: NodesArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
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
    /// Print the build and protocol versions and the engine kernels chosen for this CPU.
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

/// Which nodes a model command acts on (sent as `X-Sollol-Nodes`).
#[derive(Debug, Args)]
pub struct NodesArgs {
    /// `all`, a number of nodes (the best ones for a new copy) or names, comma-separated.
    #[arg(long, value_name = "all|N|NAME,NAME")]
    pub nodes: Option<String>,
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
            Command::Agent {
                join,
                token,
                token_file,
                agent,
            } => {
                push("agent.join", join.clone());
                push("agent.token", token.clone());
                push(
                    "agent.token_file",
                    token_file.as_ref().map(|path| path.display().to_string()),
                );
                agent.push_into(&mut push);
            }
            Command::Status(client)
            | Command::Nodes(client)
            | Command::Models(client)
            | Command::Pull { client, .. }
            | Command::Rm { client, .. }
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
