//! sollol: the cluster layer in front of Ollama nodes. The binary's `main` is thin; everything runs from here so tests run the real thing in-process.

pub mod admission;
pub mod app;
pub mod backoff;
pub mod batch;
pub mod body_timeout;
pub mod breaker;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod discovery;
pub mod gateway;
pub mod health;
pub mod history;
pub mod http_client;
pub mod identity;
pub mod inference;
pub mod join;
pub mod learning;
pub mod mdns;
pub mod membership;
pub mod observe;
pub mod partial;
pub mod pipeline;
pub mod proxy;
pub mod routing;
pub mod scan;
pub mod sharding;
pub mod stage;
pub mod telemetry;
pub mod wire;

/// The built dashboard, embedded by `build.rs` (empty when it was not built).
mod dashboard_assets {
    include!(concat!(env!("OUT_DIR"), "/dashboard_assets.rs"));
}
