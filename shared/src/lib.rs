//! Wire and API types shared by the `sollol` binary and its dashboard.
//!
//! This crate is an API boundary: plain serde types and constants only, no IO,
//! and it must build for `wasm32-unknown-unknown`. A change to any type here is
//! a change to the wire format or the HTTP API, and the snapshot tests in
//! `tests/snapshots.rs` make that a reviewed diff.

pub mod api;
pub mod digest;
pub mod group;
pub mod hardware;
pub mod layers;
pub mod model_matrix;
pub mod model_name;
pub mod protocol;

/// The version of the sollol build, as written in the workspace manifest.
pub const BUILD_VERSION: &str = env!("CARGO_PKG_VERSION");
