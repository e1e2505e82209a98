//! sollol: the cluster layer in front of Ollama nodes. The binary's `main` is thin; everything runs from here so tests run the real thing in-process.

pub mod app;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod distributed;
mod gateway;
mod history;
pub mod http_client;
mod observability;
mod telemetry;

/// The built dashboard, embedded by `build.rs` (empty when it was not built).
mod dashboard_assets {
    include!(concat!(env!("OUT_DIR"), "/dashboard_assets.rs"));
}
