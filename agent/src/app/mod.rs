//! Wiring: starts the coordinator's and the agent's long-lived tasks, and stops them along one shutdown path.
//!
//! Each role's tasks share one cancellation token and run on one task tracker, so a shutdown cancels
//! them all, waits up to the grace period, then reports whether it was graceful. Protocols live in
//! `cluster`, `gateway` and `distributed`, policy in `sollol_policy`; the one decision made here is
//! start-up's: whether the built-in engine runs (`engine`).
//!
//! - `coordinator`: history, cluster port, discovery, gateway, and the distributed front;
//! - `agent`: the agent's join loop, its stage port and its engine;
//! - `engine`: the built-in engine on an agent (`engine.mode`).

mod agent;
mod coordinator;
mod engine;

use std::net::SocketAddr;
use std::sync::Arc;

use sollol_http::Limits;
use sollol_policy::browser::Boundary;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cluster::identity::{IdentityError, NodeId};
use crate::cluster::mdns::{Announce, Mdns, Role};
use crate::config::Config;
use crate::history::HistoryError;

pub use agent::{AgentHandle, JoinAddresses, announce_without_token, join_target, start_agent};
pub use coordinator::{CoordinatorHandle, HISTORY_FILE, start_coordinator};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("cannot listen on {address} ({what}): {source}")]
    Bind {
        what: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

/// How a shutdown ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    Graceful,
    /// The grace period ran out with tasks still running.
    Forced,
}

impl Shutdown {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Graceful => "graceful",
            Self::Forced => "forced",
        }
    }
}

/// Announces this process over mDNS as `role`, with the port peers reach it on, until `shutdown`.
fn announce(
    config: &Config,
    role: Role,
    node_id: &NodeId,
    port: u16,
    has_token: bool,
    serves: Vec<&'static str>,
    shutdown: &CancellationToken,
) -> Result<Arc<Mdns>, String> {
    Mdns::start(
        &Announce {
            role,
            node_id: node_id.to_string(),
            name: config.agent.name.clone(),
            port,
            has_token,
            serves,
        },
        shutdown.clone(),
    )
}

async fn bind(address: SocketAddr, what: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Bind {
            what,
            address,
            source,
        })
}

/// The browser boundary and connection limits of an HTTP server listening on `bound`.
fn http_guard(config: &Config, bound: SocketAddr) -> (Arc<Boundary>, Limits) {
    let http = &config.http;
    let boundary = Boundary::new(
        bound.ip(),
        &http.allowed_origins,
        &http.allowed_hosts,
        &crate::cluster::identity::host_name(),
    );
    let limits = Limits {
        max_connections: http.max_connections.get() as usize,
        max_per_address: http.max_connections_per_address.get() as usize,
        header_read_timeout: config.coordinator.header_read_timeout,
    };
    (Arc::new(boundary), limits)
}

fn local_address(listener: &TcpListener, requested: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(requested)
}
